-- Rewrap of a whole Redis store after an MBK rotation (softcxi.rewrap, compare-and-set),
-- alone: one fill, then as many timed rewraps as wanted, each by its own process, so that
-- two lua/ trees (before/after a change: LUA_PATH) take turns on the same blobs, device
-- and server in one sitting.  Each rewrap first rotates the MBK (a new one is generated
-- and imported, after the older ones are retired: a rewrap must have finished since the
-- last rotation), so every blob has something to do.
--
--   lua5.4 bench/rewrap_redis.lua fill   ROOT REDIS_URL COUNT
--   lua5.4 bench/rewrap_redis.lua rewrap ROOT REDIS_URL [TAG [THREADS]]
--
-- ROOT: a directory for the device's state (made by fill).  THREADS: rewrap.run's threads
-- (the device's worker threads per page; default: rewrap's, one per CPU).  Prints
-- "rewrap_redis <TAG> <seen> blobs <blobs/s> blobs/s client_cpu <us/blob> server_cpu <us/blob>"
-- (client CPU: os.clock of this process; server CPU: INFO cpu of the server, which must be
-- otherwise idle).

local softcxi = require "softcxi"
local sys = require "softcxi.sys"
local keystore = require "softcxi.store"
local hiredis = require "softcxi.hiredis"
local rewrap = require "softcxi.rewrap"

local usage = "usage: rewrap_redis.lua fill ROOT REDIS_URL COUNT | rewrap ROOT REDIS_URL [TAG [THREADS]]"
local mode, root, url = arg[1], arg[2], arg[3]
if not (mode and root and url) then error(usage) end
local state, keyfile = root .. "/state", root .. "/keys/dev.key"
local admin_pw = "bench-admin-password"

local function device()
    local hsm = assert(softcxi.open { path = state, keyfile = keyfile })
    assert(hsm:logon_pass("bench", "bench-password"))
    return hsm
end

if mode == "fill" then
    local count = tonumber(arg[4] or "") or error(usage)
    assert(sys.mkdir_p(root .. "/keys", 448))
    assert(softcxi.init { path = state, keyfile = keyfile, password = admin_pw, kdf_cost = 10 })
    local adm = assert(softcxi.open { path = state, keyfile = keyfile })
    assert(adm:logon_pass("ADMIN", admin_pw))
    assert(adm:user_add { name = "bench", password = "bench-password", groups = { "*" }, kdf_cost = 10 })
    adm:close()
    local hsm = device()
    local store = assert(keystore.open(url))
    local template = { algo = "ec", curve = "P-256", group = "bench", usage = { "sign", "verify" } }
    for first = 1, count, 1000 do
        local n = math.min(1000, count - first + 1)
        local b = assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, template, n,
            { name_format = "k%08d", start = first }))
        local items = {}
        for i = 1, #b do items[i] = { blob = b[i] } end
        assert(store:put_many(items))
    end
    print(("rewrap_redis fill %d blobs, store count %d"):format(count, assert(store:count())))
    store:close()
    hsm:close()
elseif mode == "rewrap" then
    local tag = arg[4] or "softcxi"
    local adm = assert(softcxi.open { path = state, keyfile = keyfile })
    assert(adm:logon_pass("ADMIN", admin_pw))
    -- the device keeps at most 7 older MBKs: the last run moved every blob to the current
    -- one, so the older ones can go
    for _, kcv in ipairs(assert(adm:mbk_info()).older) do assert(adm:mbk_retire(kcv)) end
    local n = 0
    for name in io.popen("ls '" .. root .. "'"):lines() do
        if name:match("^share") then n = n + 1 end
    end
    local shares = { ("%s/share%d-a"):format(root, n), ("%s/share%d-b"):format(root, n) }
    local pws = { "bench-share-one", "bench-share-two" }
    assert(adm:mbk_generate { m = 2, shares = shares, passwords = pws, kdf_cost = 10 })
    assert(adm:mbk_import { shares = shares, passwords = pws })
    adm:close()
    local hsm = device()
    local store = assert(keystore.open(url))
    local host, port = url:match("^redis://[^/]-([%w%.%-]+):(%d+)")
    local admin = assert(hiredis.connect(host, tonumber(port), 10))
    local function server_cpu()
        local st = assert(admin:command { "INFO", "cpu" })
        return tonumber(st:match("used_cpu_user:([%d.]+)")) + tonumber(st:match("used_cpu_sys:([%d.]+)"))
    end
    local t0, c0, s0 = sys.monotonic(), os.clock(), server_cpu()
    -- (an older tree's rewrap.run knows no threads option: passed only when given)
    local rw = assert(rewrap.run { hsm = hsm, store = store, threads = tonumber(arg[5] or "") })
    local wall, cpu, scpu = sys.monotonic() - t0, os.clock() - c0, server_cpu() - s0
    assert(rw.rewrapped == rw.seen, "not every blob was rewrapped")
    print(("rewrap_redis %s %d blobs %.0f blobs/s client_cpu %.1f server_cpu %.1f us/blob")
        :format(tag, rw.seen, rw.seen / wall, cpu / rw.seen * 1e6, scpu / rw.seen * 1e6))
    admin:close()
    store:close()
    hsm:close()
else
    error(usage)
end
