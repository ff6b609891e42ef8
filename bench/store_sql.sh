#!/usr/bin/env bash
# bench/store_sql.lua against a PostgreSQL cluster of its own: initdb into a temp dir
# (as nobody when run as root: PostgreSQL refuses root), postgres on a free loopback
# port with the default durability (fsync on, synchronous_commit on) and
# shared_buffers=512MB, max_wal_size=4GB; stopped by PID and removed at the end.
#
#   bench/store_sql.sh [N=100000 [BATCH=1000]]      (run ./run build first)
#
# Environment: BUILD_DIR (default ./build), SOFTCXI_LUA (default lua5.4), SOFTCXI_LUA_DIR
# (another lua/ tree, e.g. an older commit's from git archive, against the same build),
# SQL_BENCH=provision runs bench/provision.lua (generation and provisioning alternated in
# rounds, CPU per key; pass --no-rewrap to skip its rewrap) instead of bench/store_sql.lua,
# PGDIR_PARENT (where the cluster goes, default $TMPDIR or /tmp: put it on the disk to
# measure), KEEP=1 keeps the cluster's directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$here/build}
lua=${SOFTCXI_LUA:-lua5.4}
mod=lua54
[ "$lua" = luajit ] && mod=luajit
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "store_sql.sh: PostgreSQL is not installed" >&2; exit 1; }
[ -c /dev/null ] || { echo "store_sql.sh: /dev/null is not a character device: initdb cannot run" >&2; exit 1; }

dir=$(mktemp -d "${PGDIR_PARENT:-${TMPDIR:-/tmp}}/softcxi-pgbench.XXXXXX")
as=()
if [ "$(id -u)" -eq 0 ]; then
    chown nobody:nogroup "$dir"
    as=(setpriv --reuid=nobody --regid=nogroup --clear-groups --)
fi
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
}
trap cleanup EXIT
"${as[@]}" "$bin/initdb" -D "$dir/data" -U softcxi --auth=trust -E UTF8 --locale=C.UTF-8 \
    >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log"; exit 1; }
for try in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 20000))
    "${as[@]}" "$bin/postgres" -D "$dir/data" -p "$port" -h 127.0.0.1 -k "$dir" \
        -c shared_buffers=512MB -c max_wal_size=4GB </dev/null >"$dir/postgres.log" 2>&1 &
    pid=$!
    for i in $(seq 1 300); do
        "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && break 2
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""
done
[ -n "$pid" ] || { cat "$dir/postgres.log"; echo "store_sql.sh: postgres did not start" >&2; exit 1; }
echo "info postgres $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, data in $dir/data"
echo "info $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
luadir=${SOFTCXI_LUA_DIR:-$here/lua}
LUA_PATH="$luadir/?.lua;$luadir/?/init.lua;;" LUA_CPATH="$build/$mod/?.so;;" \
    "$lua" "$here/bench/${SQL_BENCH:-store_sql}.lua" "postgres://softcxi@127.0.0.1:$port/postgres" "$@"
