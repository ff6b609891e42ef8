-- Provisioning throughput: P-256 keys generated and sealed on worker threads
-- (bulk_generate alone), against the same keys provisioned into a store
-- (softcxi.provision: existence check, bulk_generate, pipelined put_many),
-- then the rewrap of the whole store after an MBK rotation (softcxi.rewrap).
--
--   lua5.4 bench/provision.lua STORE_URL [COUNT [BATCH]]
--
-- Prints `provision <case> <keys/s>` lines and the ratio of the two times;
-- the issue's target is provision time <= 1.3 x generation time.  Wall
-- clock (softcxi.sys.monotonic): the generators run on several threads.
-- The client's resident memory is printed every 10% to show it stays flat.

local softcxi = require "softcxi"
local sys = require "softcxi.sys"
local provision = require "softcxi.provision"
local keystore = require "softcxi.store"
local rewrap = require "softcxi.rewrap"

local url = arg[1] or error("usage: provision.lua STORE_URL [COUNT [BATCH]]")
local count = tonumber(arg[2] or "") or 100000
local batch = tonumber(arg[3] or "") or 1000

local function rss_mib()
    local f = io.open("/proc/self/status", "r")
    if not f then return 0 end
    local kb = f:read("*a"):match("VmRSS:%s*(%d+)")
    f:close()
    return (tonumber(kb) or 0) / 1024
end

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

-- 1. generation alone, in the same batches
local t0 = sys.monotonic()
for first = 1, count, batch do
    local n = math.min(batch, count - first + 1)
    assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, template, n,
        { name_format = "gen-%08d", start = first }))
end
local gen_s = sys.monotonic() - t0
print(("provision generate_only %.0f"):format(count / gen_s))

-- 2. the whole pipeline into the store
local store = assert(keystore.open(url))
local marks = {}
t0 = sys.monotonic()
local r = assert(provision.run {
    hsm = hsm, store = store, template = template, count = count, batch = batch,
    name_format = ("b%d-"):format(os.time()) .. "%08d",
    on_progress = function(done, total)
        if done * 10 % total < batch * 10 and done * 10 >= total then
            marks[#marks + 1] = ("%d%%:%.0fMiB"):format(math.floor(done * 100 / total), rss_mib())
        end
    end,
})
local prov_s = sys.monotonic() - t0
print(("provision into_store %.0f"):format(count / prov_s))
print(("provision stored %d skipped %d"):format(r.stored, r.skipped))
print("provision rss " .. table.concat(marks, " "))
print(("provision ratio %.2f (provision time / generation time; target <= 1.30)"):format(prov_s / gen_s))
-- 3. an MBK rotation, then every blob of the store rewrapped (compare-and-set)
local admin = assert(softcxi.open { path = root .. "/state", keyfile = root .. "/keys/dev.key" })
assert(admin:logon_pass("ADMIN", "bench-admin-password"))
local shares = { root .. "/share1", root .. "/share2" }
local pws = { "bench-share-one", "bench-share-two" }
assert(admin:mbk_generate { m = 2, shares = shares, passwords = pws, kdf_cost = 10 })
assert(admin:mbk_import { shares = shares, passwords = pws })
t0 = sys.monotonic()
local rw = assert(rewrap.run { hsm = hsm, store = store, page = 1000 })
local rw_s = sys.monotonic() - t0
print(("provision rewrap %.0f (%d rewrapped, %d conflicts; target >= 50000/s in Redis)")
    :format(rw.seen / rw_s, rw.rewrapped, rw.conflicts))
admin:close()
store:close()
hsm:close()
os.execute("rm -rf '" .. root .. "'")
