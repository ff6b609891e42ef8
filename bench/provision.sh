#!/usr/bin/env bash
# [LUA=luajit] bench/provision.sh [COUNT [BATCH]] [--no-file] [--rounds R] [--piece N] [--no-rewrap]
# [--floor] [--log-index] [--before PROVISION_LUA]:
# provisioning P-256 keys into a local Redis (started here on a free loopback port, stopped
# by PID) and into the file store, against generation alone; prints keys/s, the ratio, the client's RSS along the
# way, the store's own put_many/get_many rates, the rewrap rate, and Redis's memory per key.
# Needs a build (./run build).  REDIS_ARGS adds redis-server options (default: no
# persistence), e.g. REDIS_ARGS="--appendonly yes --appendfsync everysec".  SOFTCXI_LUA_DIR
# runs another lua/ tree (e.g. an older commit's, from git archive) against the same build
# and bench script: a before/after in one sitting.  --before FILE runs another version's
# provision.lua too, in the same rounds (order alternating), and prints both ratios.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$repo/build}
pos=() file=1 extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --no-file) file=0 ;;
    --rounds) extra+=(--rounds "$2"); shift ;;
    --before) extra+=(--before "$2"); shift ;;
    --piece) extra+=(--piece "$2"); shift ;;
    --no-rewrap) extra+=(--no-rewrap) ;;
    --floor) extra+=(--floor) ;;
    --log-index) extra+=(--log-index) ;;
    *) pos+=("$1") ;;
    esac
    shift
done
count=${pos[0]:-100000} batch=${pos[1]:-1000}
luadir=${SOFTCXI_LUA_DIR:-$repo/lua}
# LUA=luajit runs the client under LuaJIT (the modules of $build/luajit)
lua=${LUA:-lua5.4} mods=lua54
[ "$lua" = lua5.4 ] || mods=luajit
export LUA_PATH="$luadir/?.lua;$luadir/?/init.lua;;" LUA_CPATH="$build/$mods/?.so;;"
tmp=$(mktemp -d)
port=0
for p in $(seq 26379 26479); do
    if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then port=$p; break; fi
done
# shellcheck disable=SC2086
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
    ${REDIS_ARGS:-} --daemonize no >"$tmp/redis.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
mem0=$(redis-cli -p "$port" info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p')
echo "== redis (127.0.0.1:$port${REDIS_ARGS:+, $REDIS_ARGS}), $count keys, batches of $batch"
"$lua" "$repo/bench/provision.lua" "redis://127.0.0.1:$port/0?prefix=bench:" "$count" "$batch" "${extra[@]}"
mem1=$(redis-cli -p "$port" info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p')
keys=$(redis-cli -p "$port" get bench:n)
echo "redis used_memory $((mem1 - mem0)) bytes for $keys blobs: $(( (mem1 - mem0) / keys )) bytes/key" \
     "(blob, its index entries, the keyspace; $(redis-cli -p "$port" dbsize) Redis keys)"
if [ "$file" = 1 ]; then
    echo "== file store ($tmp/store), $((count / 10)) keys"
    fx=()
    for x in "${extra[@]}"; do [ "$x" = --floor ] || [ "$x" = --log-index ] || fx+=("$x"); done
    "$lua" "$repo/bench/provision.lua" "file:$tmp/store" "$((count / 10))" "$batch" --no-rewrap ${fx[@]+"${fx[@]}"}
fi
