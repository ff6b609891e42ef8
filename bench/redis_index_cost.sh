#!/usr/bin/env bash
# bench/redis_index_cost.sh [COUNT]: bench/redis_index_cost.lua against a Redis started here
# on a free loopback port (no persistence) and stopped by PID.  Needs a build (./run build).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$repo/build}
export LUA_PATH="$repo/lua/?.lua;$repo/lua/?/init.lua;;" LUA_CPATH="$build/lua54/?.so;;"
tmp=$(mktemp -d)
port=0
for p in $(seq 26480 26580); do
    if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then port=$p; break; fi
done
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
    --daemonize no >"$tmp/redis.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
lua5.4 "$repo/bench/redis_index_cost.lua" "$port" "${1:-200000}"
