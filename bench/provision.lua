-- Provisioning throughput: P-256 keys generated and sealed on worker threads
-- (bulk_generate alone), against the same number of keys provisioned into a store
-- (softcxi.provision: existence check, bulk_generate, batched put_many), then the store's
-- own costs (put_many of ready blobs, get_many) and the rewrap of the whole store after an
-- MBK rotation (softcxi.rewrap, compare-and-set).
--
--   lua5.4 bench/provision.lua STORE_URL [COUNT [BATCH]] [--rounds R] [--piece N] [--no-rewrap]
--                                        [--floor] [--log-index] [--before PROVISION_LUA]
--
-- The machine is shared and noisy, so generation alone and provisioning alternate: R rounds
-- (default 5) of COUNT/R keys each, generation first, then provisioning; the ratio is the
-- sum of provisioning times over the sum of generation times, with the lowest and highest
-- round.  The issue's target is provision time <= 1.3 x generation time.  Wall clock
-- (softcxi.sys.monotonic): the generators run on several threads.  The client's resident
-- memory is printed every 10% of the provisioning to show it stays flat.
--
-- --floor (redis:// only) adds, in every round, a run of the same provisioning into a
-- writer that keeps blobs only: one MSET per piece on the store's own connection, no
-- check, no existence test, no index.  Its ratio is what any Redis store costs on this
-- machine before it indexes anything (docs/scaling.md).
--
-- --log-index (redis:// only) adds, likewise, a prototype of an index the Redis store does
-- not have: every index entry appended to a string (docs/scaling.md, "An index as
-- append-only strings").  Per piece, in one round trip: each blob checked (key_attrs, as
-- the store checks), one APPEND of the piece's name\0id entries per name bucket touched
-- (4,096 buckets; LOG_INDEX_BUCKETS, 0 for no name entries), one APPEND of its ids to
-- the group's and to the algo's log, MSETNX of the blobs, INCRBY of a counter.  Not a
-- store: nothing reads these logs, and a refused MSETNX only fails the bench.
--
-- Output: "provision <case> <value> ..." lines.

local softcxi = require "softcxi"
local sys = require "softcxi.sys"
local provision = require "softcxi.provision"
local keystore = require "softcxi.store"
local rewrap = require "softcxi.rewrap"

local args, rounds, do_rewrap, before_file, piece, floor, log_index = {}, 5, true, nil, nil, false, false
do
    local i = 1
    while i <= #arg do
        if arg[i] == "--rounds" then
            rounds = assert(tonumber(arg[i + 1]), "--rounds N")
            i = i + 1
        elseif arg[i] == "--piece" then
            piece = assert(tonumber(arg[i + 1]), "--piece N")
            i = i + 1
        elseif arg[i] == "--no-rewrap" then
            do_rewrap = false
        elseif arg[i] == "--floor" then
            floor = true
        elseif arg[i] == "--log-index" then
            log_index = true
        elseif arg[i] == "--before" then
            before_file = assert(arg[i + 1], "--before FILE")
            i = i + 1
        else
            args[#args + 1] = arg[i]
        end
        i = i + 1
    end
end
local url = args[1] or error("usage: provision.lua STORE_URL [COUNT [BATCH]] [--rounds R] [--no-rewrap] "
    .. "[--before PROVISION_LUA]")
local count = tonumber(args[2] or "") or 100000
local batch = tonumber(args[3] or "") or 1000
local per_round = math.floor(count / rounds)
count = per_round * rounds

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
local T = sys.monotonic

local store = assert(keystore.open(url))
local stamp = ("b%d-"):format(os.time())
local gen_s, prov_s, lo, hi = 0, 0, math.huge, 0
-- CPU: this process's (os.clock: every thread, the generators included) and, for a
-- redis:// store, the server's (INFO cpu).  On a loaded machine CPU per key is the figure
-- that other jobs disturb least.
local server_cpu = function() return 0 end
local srv_fmt = "server n/a%.0s" -- measured for redis:// only
do
    local host, port = url:match("^redis://[^/]-([%w%.%-]+):(%d+)")
    if host then
        local admin = assert(require("softcxi.hiredis").connect(host, tonumber(port), 10))
        srv_fmt = "server %.1f us"
        server_cpu = function()
            local st = assert(admin:command { "INFO", "cpu" })
            return tonumber(st:match("used_cpu_user:([%d.]+)")) + tonumber(st:match("used_cpu_sys:([%d.]+)"))
        end
    end
end
-- The CPU time of this thread alone (the client's own work: the store calls, not the
-- generator threads), from /proc/thread-self/stat (clock ticks, usually 100 per second).
local function thread_cpu()
    local f = io.open("/proc/thread-self/stat", "r")
    if not f then return 0 end
    local st = f:read("*a")
    f:close()
    -- the fields after the command name (in parentheses, which may hold spaces)
    local rest = st:match("%) (.*)$") or ""
    local fields = {}
    for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
    -- utime and stime are fields 14 and 15 of the line, 12 and 13 after the name
    return ((tonumber(fields[12]) or 0) + (tonumber(fields[13]) or 0)) / 100
end
local gen_cpu, prov_cpu, prov_srv, prov_main = 0, 0, 0, 0
local marks, done_total = {}, 0
-- --before FILE: another version's provision.lua, run in every round as well (the order
-- alternating), so that both versions see the same load.
local old = before_file and assert(loadfile(before_file))()
local old_s, old_cpu, old_srv, old_lo, old_hi = 0, 0, 0, math.huge, 0

-- --floor: blobs only, as MSET on the store's connection (its own keys: "<prefix>floor:")
local floor_store
if floor then
    local t = store.transport
    assert(t and t.send_ahead and store.P, "--floor needs a redis:// store")
    local kbase = store.P .. "floor:"
    floor_store = { preferred_piece = store.preferred_piece }
    function floor_store.exists_many() return {} end
    function floor_store.put_many(_, items)
        local mset = { "MSET" }
        for i = 1, #items do
            local it = items[i]
            mset[2 * i], mset[2 * i + 1] = kbase .. it.id, it.blob
        end
        local ok, err = t:send_ahead({ mset })
        local res = t:receive(1)
        if not ok or res[1] ~= "OK" then return nil, tostring(err or res[1]), "EIO", 0 end
        return #items, 0
    end
end
local floor_s, floor_cpu, floor_srv = 0, 0, 0

-- --log-index: the prototype (keys under "<prefix>logix:")
local log_store
local log_written = 0 -- keys the prototype wrote: its log segment is log_written / 65536
if log_index then
    local t = store.transport
    assert(t and t.send_ahead and store.P, "--log-index needs a redis:// store")
    local key_attrs = require("softcxi.core").key_attrs
    local base = store.P .. "logix:"
    local kbase, NAME_BUCKETS = base .. "k:", tonumber(os.getenv("LOG_INDEX_BUCKETS") or "") or 4096
    log_store = { preferred_piece = store.preferred_piece }
    function log_store.exists_many() return {} end
    function log_store.put_many(_, items)
        local mset, names, order, groups, algos = { "MSETNX" }, {}, {}, {}, {}
        for i = 1, #items do
            local it = items[i]
            local info = assert(key_attrs(it.blob))
            mset[2 * i], mset[2 * i + 1] = kbase .. it.id, it.blob
            if NAME_BUCKETS > 0 then
                local b = info.name_h31 % NAME_BUCKETS
                local nb = names[b]
                if not nb then
                    nb = {}
                    names[b] = nb
                    order[#order + 1] = b
                end
                nb[#nb + 1] = info.name .. "\0" .. it.id .. "\0"
            end
            local g, a = info.group or "", info.algo
            local gl, al = groups[g], algos[a]
            if not gl then
                gl = {}
                groups[g] = gl
            end
            if not al then
                al = {}
                algos[a] = al
            end
            gl[#gl + 1], al[#al + 1] = it.id, it.id
        end
        local seg = math.floor(log_written / 65536)
        local cmds = {}
        for j = 1, #order do
            local b = order[j]
            cmds[j] = { "APPEND", base .. "ix:name:" .. b .. ":" .. seg, table.concat(names[b]) }
        end
        for g, list in pairs(groups) do
            cmds[#cmds + 1] = { "APPEND", base .. "ix:group:" .. g .. ":" .. seg, table.concat(list, "\0") .. "\0" }
        end
        for a, list in pairs(algos) do
            cmds[#cmds + 1] = { "APPEND", base .. "ix:algo:" .. a .. ":" .. seg, table.concat(list, "\0") .. "\0" }
        end
        cmds[#cmds + 1] = mset
        cmds[#cmds + 1] = { "INCRBY", base .. "n", #items }
        log_written = log_written + #items
        local ok, err = t:send_ahead(cmds)
        local res = t:receive(#cmds)
        if not ok or res[#cmds - 1] ~= 1 then
            return nil, tostring(err or res[#cmds - 1]), "EIO", 0
        end
        return #items, 0
    end
end
local log_s, log_cpu, log_srv = 0, 0, 0

local new_done = 0 -- keys provisioned by this version, for the RSS marks
local function provision_round(mod, track, into)
    local c0, s0, t0, m0 = os.clock(), server_cpu(), T(), thread_cpu()
    local base, mark_base = done_total, new_done
    assert(mod.run {
        hsm = hsm, store = into or store, template = template, count = per_round, batch = batch, piece = piece,
        start = base + 1, name_format = stamp .. "%08d",
        on_progress = track and function(done)
            local before, now = mark_base + done - batch, mark_base + done
            if math.floor(now * 10 / count) > math.floor(before * 10 / count) then
                marks[#marks + 1] = ("%d%%:%.0fMiB"):format(math.floor(now * 100 / count), rss_mib())
            end
        end or nil,
    })
    done_total = done_total + per_round
    if track then
        new_done = new_done + per_round
        prov_main = prov_main + thread_cpu() - m0
    end
    return T() - t0, os.clock() - c0, server_cpu() - s0
end

for r = 1, rounds do
    -- 1. generation alone, in the same batches
    local c0 = os.clock()
    local t0 = T()
    for first = 1, per_round, batch do
        local n = math.min(batch, per_round - first + 1)
        assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, template, n,
            { name_format = "gen-%08d", start = first }))
    end
    local g = T() - t0
    gen_cpu = gen_cpu + os.clock() - c0
    -- 2. the whole pipeline into the store (and the other version's, in turn)
    local p, pc, ps, o, oc, os_
    if old and r % 2 == 0 then o, oc, os_ = provision_round(old, false) end
    p, pc, ps = provision_round(provision, true)
    if old and r % 2 == 1 then o, oc, os_ = provision_round(old, false) end
    if floor then
        local f, fc, fs = provision_round(provision, false, floor_store)
        floor_s, floor_cpu, floor_srv = floor_s + f, floor_cpu + fc, floor_srv + fs
    end
    if log_index then
        local f, fc, fs = provision_round(provision, false, log_store)
        log_s, log_cpu, log_srv = log_s + f, log_cpu + fc, log_srv + fs
    end
    prov_cpu, prov_srv = prov_cpu + pc, prov_srv + ps
    gen_s, prov_s = gen_s + g, prov_s + p
    lo, hi = math.min(lo, p / g), math.max(hi, p / g)
    if old then
        old_s, old_cpu, old_srv = old_s + o, old_cpu + oc, old_srv + os_
        old_lo, old_hi = math.min(old_lo, o / g), math.max(old_hi, o / g)
    end
end
print(("provision generate_only %.0f keys/s"):format(count / gen_s))
print(("provision into_store %.0f keys/s"):format(count / prov_s))
print(("provision ratio %.2f range %.2f-%.2f (provision time / generation time, %d rounds; target <= 1.30)")
    :format(prov_s / gen_s, lo, hi, rounds))
print(("provision cpu_per_key generate_only %.1f us, into_store %.1f us (this process, all threads; "
    .. "%.1f us its main thread, the store client), " .. srv_fmt):format(gen_cpu / count * 1e6,
    prov_cpu / count * 1e6, prov_main / count * 1e6, prov_srv / count * 1e6))
if old then
    print(("provision before_into_store %.0f keys/s (%s)"):format(count / old_s, before_file))
    print(("provision before_ratio %.2f range %.2f-%.2f (the same rounds, the other version)")
        :format(old_s / gen_s, old_lo, old_hi))
    print(("provision before_cpu_per_key into_store %.1f us (this process), " .. srv_fmt)
        :format(old_cpu / count * 1e6, old_srv / count * 1e6))
    print(("provision after/before time %.2f"):format(prov_s / old_s))
end
if floor then
    print(("provision floor_ratio %.2f (blobs only: one MSET per piece, no check, no index; "
        .. "the same rounds)"):format(floor_s / gen_s))
    print(("provision floor_cpu_per_key %.1f us (this process), " .. srv_fmt)
        :format(floor_cpu / count * 1e6, floor_srv / count * 1e6))
end
if log_index then
    print(("provision log_index_ratio %.2f (the prototype: every index entry appended to a string; "
        .. "the same rounds)"):format(log_s / gen_s))
    print(("provision log_index_cpu_per_key %.1f us (this process), " .. srv_fmt)
        :format(log_cpu / count * 1e6, log_srv / count * 1e6))
end
-- the floor's and the prototype's keys go, so that the memory per key printed after this
-- is the store's
local extra_keys = {}
if floor then extra_keys[#extra_keys + 1] = "floor:*" end
if log_index then extra_keys[#extra_keys + 1] = "logix:*" end
for _, pattern in ipairs(extra_keys) do
    local t, cursor = store.transport, "0"
    repeat
        local res = t:pipeline({ { "SCAN", cursor, "MATCH", store.P .. pattern, "COUNT", 1000 } })
        local page = assert(type(res[1]) == "table" and res[1], "SCAN of the bench's extra keys failed")
        cursor = page[1]
        if #page[2] > 0 then
            local del = { "UNLINK" }
            for i = 1, #page[2] do del[i + 1] = page[2][i] end
            t:pipeline({ del })
        end
    until cursor == "0"
end
print("provision rss " .. table.concat(marks, " "))
local n_stored = store:count()
print(("provision stored %d"):format(n_stored or -1))

-- 3. the store alone: put_many of blobs made beforehand (fresh ids), get_many of them
local sample = math.min(per_round, 20000)
local blobs = {}
for first = 1, sample, batch do
    local n = math.min(batch, sample - first + 1)
    local b = assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, template, n,
        { name_format = stamp .. "s%08d", start = first }))
    for i = 1, #b do blobs[#blobs + 1] = b[i] end
end
local ids = {}
for i = 1, sample do ids[i] = ("bench/" .. stamp .. "s%08d"):format(i) end
local t0 = T()
for first = 1, sample, batch do
    local items = {}
    for i = first, math.min(sample, first + batch - 1) do items[#items + 1] = { id = ids[i], blob = blobs[i] } end
    assert(store:put_many(items))
end
local put_s = T() - t0
t0 = T()
for first = 1, sample, batch do
    local want = {}
    for i = first, math.min(sample, first + batch - 1) do want[#want + 1] = ids[i] end
    assert(store:get_many(want))
end
local get_s = T() - t0
print(("provision store_put_many %.0f keys/s (%.1f us/key, %d keys)")
    :format(sample / put_s, put_s / sample * 1e6, sample))
print(("provision store_get_many %.0f keys/s (%.1f us/key)"):format(sample / get_s, get_s / sample * 1e6))

-- 4. an MBK rotation, then every blob of the store rewrapped (compare-and-set)
if do_rewrap then
    local admin = assert(softcxi.open { path = root .. "/state", keyfile = root .. "/keys/dev.key" })
    assert(admin:logon_pass("ADMIN", "bench-admin-password"))
    local shares = { root .. "/share1", root .. "/share2" }
    local pws = { "bench-share-one", "bench-share-two" }
    assert(admin:mbk_generate { m = 2, shares = shares, passwords = pws, kdf_cost = 10 })
    assert(admin:mbk_import { shares = shares, passwords = pws })
    -- the device's part alone, on the sample: what rewrap cannot go below
    t0 = T()
    for i = 1, sample do assert(hsm:key_rewrap(blobs[i])) end
    local dev_s = T() - t0
    print(("provision rewrap_device_only %.0f blobs/s"):format(sample / dev_s))
    t0 = T()
    local rw = assert(rewrap.run { hsm = hsm, store = store, page = 1000 })
    local rw_s = T() - t0
    print(("provision rewrap %.0f blobs/s (%d rewrapped, %d conflicts; target >= 50000/s in Redis)")
        :format(rw.seen / rw_s, rw.rewrapped, rw.conflicts))
    admin:close()
end
store:close()
hsm:close()
os.execute("rm -rf '" .. root .. "'")
