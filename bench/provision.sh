#!/usr/bin/env bash
# bench/provision.sh [COUNT [BATCH]]: provisioning P-256 keys into a local
# Redis (started here on a free loopback port, stopped by PID) and into the
# file store, against generation alone; prints keys/s, the ratio and the
# client's RSS along the way.  Needs a build (./run build).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$repo/build}
count=${1:-100000} batch=${2:-1000}
export LUA_PATH="$repo/lua/?.lua;$repo/lua/?/init.lua;;" LUA_CPATH="$build/lua54/?.so;;"
tmp=$(mktemp -d)
port=0
for p in $(seq 26379 26479); do
    if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then port=$p; break; fi
done
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
    --daemonize no >"$tmp/redis.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
echo "== redis (127.0.0.1:$port), $count keys, batches of $batch"
lua5.4 "$repo/bench/provision.lua" "redis://127.0.0.1:$port/0?prefix=bench:" "$count" "$batch"
echo "== file store ($tmp/store), $((count / 10)) keys"
lua5.4 "$repo/bench/provision.lua" "file:$tmp/store" "$((count / 10))" "$batch"
