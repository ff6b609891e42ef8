-- The PostgreSQL store at scale: provision N P-256 keys into a fresh table and compare
-- with generating+sealing them alone, in the same run; then get and find latency at N
-- rows and the table's size per key.
--
--   lua5.4 bench/store_sql.lua PG_URL [N=100000 [BATCH=1000]]
--
-- PG_URL as for softcxi.store (postgres://user@host:port/db); the table is
-- bench_<time>, left in place for inspection (DROP TABLE it afterwards).  Prints:
--   sql generate_only <keys/s>           bulk_generate alone, same batches
--   sql provision <keys/s>               softcxi.provision into the table (existence
--                                        check, bulk_generate, put_many: one transaction
--                                        of multi-row INSERTs per batch)
--   sql ratio <provision time / generation time>   (issue 9's target: <= 2)
--   sql get_us / find_name_us / find_group_page_us / find_kcv_page_us   mean, p50, p99 of
--                                        single calls on random keys (microseconds)
--   sql size heap / indexes / total bytes per key, each index by name
--   sql plan <find by group, page 100 after a cursor>  (EXPLAIN: an index scan)
--   sql cas <rows/s>                     put_many with if_match (a rewrap's write path)
-- Times are wall clock (softcxi.sys.monotonic): the generator uses both cores, and the
-- server shares them.

local softcxi = require "softcxi"
local sys = require "softcxi.sys"
local provision = require "softcxi.provision"
local keystore = require "softcxi.store"

local url = arg[1] or error("usage: store_sql.lua PG_URL [N [BATCH]]")
local N = tonumber(arg[2] or "") or 100000
local batch = tonumber(arg[3] or "") or 1000
local SAMPLES = 2000

local root = os.tmpname()
os.remove(root)
assert(sys.mkdir_p(root .. "/keys", 448))
assert(softcxi.init { path = root .. "/state", keyfile = root .. "/keys/dev.key",
    password = "bench-admin-password", kdf_cost = 10 })
local hsm = assert(softcxi.open { path = root .. "/state", keyfile = root .. "/keys/dev.key" })
assert(hsm:logon_pass("ADMIN", "bench-admin-password"))
assert(hsm:user_add { name = "bench", password = "bench-password", groups = { "*" }, kdf_cost = 10 })
hsm:logoff()
assert(hsm:logon_pass("bench", "bench-password"))
local template = { algo = "ec", curve = "P-256", group = "bench", usage = { "sign", "verify" } }
local name_format = "dev-%09d"

-- 1. generation alone, in the same batches
local c0 = os.clock() -- this process's CPU, every thread
local t0 = sys.monotonic()
for first = 1, N, batch do
    assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, template, math.min(batch, N - first + 1),
        { name_format = name_format, start = first }))
end
local gen_s = sys.monotonic() - t0
local gen_cpu = os.clock() - c0
print(("sql generate_only %.0f keys/s (%d keys, %.1f s, %.1f us CPU/key)"):format(N / gen_s, N, gen_s,
    gen_cpu / N * 1e6))

-- 2. the whole pipeline into a fresh table
local tname = ("bench_%d"):format(os.time())
local sep = url:find("?", 1, true) and "&" or "?"
local s = assert(keystore.open(url:gsub("([?&])table=[^&]*&?", "%1") .. sep .. "table=" .. tname))
local last_pct = 0
c0 = os.clock()
t0 = sys.monotonic()
local r = assert(provision.run {
    hsm = hsm, store = s, template = template, count = N, batch = batch, name_format = name_format,
    on_progress = function(done, total)
        local pct = math.floor(done * 10 / total) * 10
        if pct > last_pct then
            last_pct = pct
            io.stderr:write(("  %d%% %.0f keys/s\n"):format(pct, done / (sys.monotonic() - t0)))
        end
    end,
})
local prov_s = sys.monotonic() - t0
local prov_cpu = os.clock() - c0
print(("sql provision %.0f keys/s (%d stored, %d skipped, %.1f s, %.1f us client CPU/key)"):format(
    N / prov_s, r.stored, r.skipped, prov_s, prov_cpu / N * 1e6))
print(("sql ratio %.2f (provision time / generation time; issue 9's target <= 2)"):format(prov_s / gen_s))

-- 3. latency of single calls on random keys
local function stats(name, f)
    local t = {}
    for i = 1, SAMPLES do
        local k = math.random(1, N)
        local a = sys.monotonic()
        f(k)
        t[i] = (sys.monotonic() - a) * 1e6
    end
    table.sort(t)
    local sum = 0
    for i = 1, #t do sum = sum + t[i] end
    print(("sql %s mean %.0f us, p50 %.0f us, p99 %.0f us (%d calls at %d rows)"):format(name, sum / #t,
        t[math.floor(#t * 0.5)], t[math.floor(#t * 0.99)], #t, N))
end
local function id(k) return "bench/" .. name_format:format(k) end
math.randomseed(42)
stats("get_us", function(k) assert(s:get(id(k))) end)
stats("find_name_us", function(k)
    local ids = assert(s:find({ group = "bench", name = name_format:format(k) }, nil, 10))
    assert(#ids == 1 and ids[1] == id(k))
end)
stats("find_group_page_us", function(k)
    local ids = assert(s:find({ group = "bench" }, "sql:" .. id(k), 100))
    assert(#ids == math.min(100, N - k))
end)
local kcv = assert(softcxi.key_info(assert(s:get(id(1))))).kcv
stats("find_kcv_page_us", function(k)
    local ids = assert(s:find({ kcv = kcv }, "sql:" .. id(k), 100))
    assert(#ids == math.min(100, N - k))
end)
local a = sys.monotonic()
local n = assert(s:count())
print(("sql count %d in %.0f ms (count(*): O(rows))"):format(n, (sys.monotonic() - a) * 1e3))

-- 4. the plans of the paging queries the store sends, before any ANALYZE
local q = s._q
for _, case in ipairs {
    { "find group", ("EXPLAIN SELECT id FROM %s WHERE grp = $1 AND id > $2 ORDER BY grp, id LIMIT 101"):format(tname),
      { "bench", id(math.floor(N / 2)) } },
    { "find group+name", ("EXPLAIN SELECT id FROM %s WHERE name = $1 AND grp = $2 ORDER BY name, id LIMIT 11")
      :format(tname), { name_format:format(math.floor(N / 2)), "bench" } },
    { "rewrap candidates", ("EXPLAIN SELECT id FROM %s WHERE kcv = $1 AND id > $2 ORDER BY kcv, id LIMIT 101")
      :format(tname), { kcv, id(math.floor(N / 2)) } },
} do
    local plan = assert(q(s, case[2], case[3]))
    local lines = {}
    for _, p in ipairs(plan) do lines[#lines + 1] = p[1]:gsub("^%s+", "") end
    print(("sql plan %s: %s"):format(case[1], table.concat(lines, " | ")))
end

-- 5. size per key
assert(q(s, "VACUUM ANALYZE " .. tname))
local rows = assert(q(s, "SELECT pg_relation_size($1::text::regclass), pg_indexes_size($1::text::regclass),"
    .. " pg_total_relation_size($1::text::regclass)", { tname }))
local heap, idx, total = rows[1][1], rows[1][2], rows[1][3]
print(("sql size heap %.0f B/key, indexes %.0f B/key, total %.0f B/key (%.1f MiB for %d rows)"):format(
    heap / n, idx / n, total / n, total / 1048576, n))
rows = assert(q(s, "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index"
    .. " WHERE indrelid = $1::text::regclass ORDER BY 1", { tname }))
for _, row in ipairs(rows) do print(("sql size index %s %.1f B/key"):format(row[1], row[2] / n)) end

-- 6. compare-and-set throughput, the write path of a rewrap: put_many with if_match over
-- SAMPLES * 10 rows, each replaced by another key's blob (another name: like a rewrap's
-- new kcv, an indexed column changes, so no update is HOT and every index is written)
do
    local M = math.min(N - 1, SAMPLES * 10)
    local ids = {}
    for k = 1, M + 1 do ids[k] = id(k) end
    local got = assert(s:get_many(ids))
    local items = {}
    for k = 1, M do items[k] = { id = id(k), blob = got[id(k + 1)], if_match = got[id(k)] } end
    local t = sys.monotonic()
    local stored = assert(s:put_many(items, { chunk = batch }))
    local dt = sys.monotonic() - t
    print(("sql cas %.0f rows/s (put_many with if_match, %d rows, non-HOT updates)"):format(stored / dt, stored))
end

s:close()
hsm:close()
os.execute("rm -rf '" .. root .. "'")
print(("sql table %s left in place (DROP TABLE %s;)"):format(tname, tname))
