-- The Redis store alone: put_many of fresh blobs, get_many, and put_many with if_match
-- (rewrap's compare-and-set), each as wall time and as CPU time of this process (os.clock)
-- and of the Redis server (INFO cpu: used_cpu_user + used_cpu_sys).  On a shared, loaded
-- machine the wall clock swings by 2x between runs; CPU time per key moves far less, so
-- compare versions by it (SOFTCXI_LUA_DIR in bench/provision.sh style: run this with
-- LUA_PATH pointing at another lua/ tree against the same server).
--
--   lua5.4 bench/store_redis.lua REDIS_URL [COUNT] [TAG]
--
-- Prints "store_redis <TAG> <case> wall <us/key> client_cpu <us/key> server_cpu <us/key>".
-- The server must be otherwise idle (its CPU counter is global); keys go under a fresh
-- prefix and are deleted at the end (FLUSHDB is not used).

local softcxi = require "softcxi"
local sys = require "softcxi.sys"
local keystore = require "softcxi.store"
local hiredis = require "softcxi.hiredis"

local url = arg[1] or error("usage: store_redis.lua REDIS_URL [COUNT] [TAG]")
local count = tonumber(arg[2] or "") or 20000
local tag = arg[3] or "softcxi"
local host, port = url:match("^redis://[^/]-([%w%.%-]+):(%d+)")
local prefix = ("sr%d%04d:"):format(os.time(), math.random(0, 9999))

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

local blobs, again = {}, {}
for first = 1, count, 1000 do
    local n = math.min(1000, count - first + 1)
    local b = assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, template, n, { name_format = "k%08d", start = first }))
    for i = 1, #b do blobs[#blobs + 1] = b[i] end
end
for i = 1, count do again[i] = assert(hsm:key_rewrap(blobs[i])) end   -- same MBK: a new seal
local ids = {}
for i = 1, count do ids[i] = ("bench/k%08d"):format(i) end

local store = assert(keystore.open((url:gsub("prefix=[^&]*", "prefix=" .. prefix))))
local admin = assert(hiredis.connect(host, tonumber(port), 10))
local function server_cpu()
    local st = assert(admin:command { "INFO", "cpu" })
    return tonumber(st:match("used_cpu_user:([%d.]+)")) + tonumber(st:match("used_cpu_sys:([%d.]+)"))
end

local function measure(case, fn)
    local t0, c0, s0 = sys.monotonic(), os.clock(), server_cpu()
    for first = 1, count, 1000 do fn(first, math.min(count, first + 999)) end
    local wall, cpu, scpu = sys.monotonic() - t0, os.clock() - c0, server_cpu() - s0
    print(("store_redis %s %s wall %.1f client_cpu %.1f server_cpu %.1f us/key"):format(
        tag, case, wall / count * 1e6, cpu / count * 1e6, scpu / count * 1e6))
end

measure("put_many", function(a, b)
    local items = {}
    for i = a, b do items[#items + 1] = { id = ids[i], blob = blobs[i] } end
    assert(store:put_many(items))
end)
measure("get_many", function(a, b)
    local want = {}
    for i = a, b do want[#want + 1] = ids[i] end
    assert(store:get_many(want))
end)
measure("put_many_if_match", function(a, b)
    local items = {}
    for i = a, b do items[#items + 1] = { id = ids[i], blob = again[i], if_match = blobs[i] } end
    assert(store:put_many(items))
end)
for i = 1, count do assert(store:delete(ids[i])) end
store:close()
admin:close()
hsm:close()
os.execute("rm -rf '" .. root .. "'")
