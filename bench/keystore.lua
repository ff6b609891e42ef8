-- bench/keystore.lua - softcxi with its file key store: keygen-and-persist
-- (durable) and find/get as the store grows, the figures bench/run sets
-- against SoftHSMv2's token objects.
--
-- Runs under Lua 5.4 and LuaJIT, with LUA_PATH / LUA_CPATH as for
-- bench/core.lua.
--
--   lua5.4 bench/keystore.lua [--seconds S] [--keys N[,N...]] [--dir D]
--
-- Output (the shape of bench/core.lua's):
--   softcxi <case> <ops_per_s_wall> <ops_per_s_cpu> <peak_rss_kib>
--   info keystore_fill <N> <keys_per_s>      each growth step
-- Cases:
--   keygen_persist_fresh P-256 keys made and stored durably by
--                        softcxi.provision (bulk_generate on the CPUs, then
--                        put_many with a group commit per batch of 1000):
--                        the growth of the store to each N of --keys
--                        (default 1000,10000), all steps together; most keys
--                        of a young store also create their bucket directory
--   keygen_persist_bulk  the same for 1000-5000 more keys whose bucket
--                        directories exist (made untimed first): the steady
--                        state of a store in service
--   keygen_persist_one   key_generate + put, one key at a time, each put
--                        durable before the next key (fsync per key), into
--                        a second store, for S seconds
--   find_name_<N>        find({ name = <a random stored key name> }) until
--                        the cursor is nil, in the store of N keys
--   get_<N>              get(<a random stored id>) in the store of N keys,
--                        after one get of every id (the kernel's dentry, inode
--                        and page caches then hold the store, as in service;
--                        that pass is printed as info keystore_first_get
--                        <N> <us_per_get>: the first touch after the fill)
-- One op is one key (persist) or one call (find, get).  Wall clock
-- (softcxi.sys.monotonic): a durable write waits for the disk.  The stores
-- live in a fresh directory under --dir (default $TMPDIR or /tmp; it must
-- be on the disk to be measured, not a tmpfs) and are removed at the end,
-- with the throw-away device that makes the keys.  A million keys take
-- about 3.5 GB and, at the file store's ~1,000 keys/s, a quarter of an hour
-- to fill: bench/run does that only when asked (--store-keys).

local softcxi = require "softcxi"
local store = require "softcxi.store"
local sys = require "softcxi.sys"
local provision = require "softcxi.provision"

local monotonic, clock = sys.monotonic, os.clock

local function usage(msg)
    io.stderr:write("keystore.lua: ", msg, "\n",
        "usage: keystore.lua [--seconds S] [--keys N[,N...]] [--dir D]\n")
    os.exit(2)
end

local seconds, sizes = 1.0, { 1000, 10000 }
local base = os.getenv("TMPDIR") or "/tmp"
do
    local i = 1
    while i <= #arg do
        local opt, val = arg[i], arg[i + 1]
        if val == nil then usage(opt .. " needs a value") end
        if opt == "--seconds" then
            seconds = tonumber(val)
            if not seconds or seconds <= 0 then usage("--seconds must be a positive number") end
        elseif opt == "--keys" then
            sizes = {}
            for n in val:gmatch("[^,]+") do
                local k = tonumber(n)
                if not k or k < 1 or k % 1 ~= 0 or (sizes[1] and k <= sizes[#sizes]) then
                    usage("--keys takes increasing positive integers, e.g. 1000,10000")
                end
                sizes[#sizes + 1] = k
            end
            if not sizes[1] then usage("--keys is empty") end
        elseif opt == "--dir" then
            base = val
        else
            usage("unknown option " .. opt)
        end
        i = i + 2
    end
end

local function rss_reset()
    collectgarbage() -- the peak of this case, not of the garbage of the last
    local f = io.open("/proc/self/clear_refs", "w")
    if f then f:write("5"); f:close() end
end

local function rss_peak_kib()
    local f = io.open("/proc/self/status", "r")
    if not f then return 0 end
    local kib = f:read("*a"):match("VmHWM:%s*(%d+)")
    f:close()
    return tonumber(kib) or 0
end

local function line(case, n, wall, cpu)
    io.stdout:write(string.format("softcxi %s %.1f %.1f %d\n", case, n / wall, n / cpu, rss_peak_kib()))
    io.stdout:flush()
end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local root = os.tmpname()
os.remove(root)
root = base .. "/softcxi-bench-keystore-" .. root:match("[^/]*$")

local function cleanup() os.execute("rm -rf " .. q(root)) end

-- op(i) for S seconds of wall time (10% warm-up, at least 20 ms); one op per call
local function run_case(case, op)
    rss_reset()
    local i = 0
    local stop = monotonic() + math.max(seconds * 0.1, 0.02)
    repeat i = i + 1; op(i) until monotonic() >= stop
    local n, w0, c0 = 0, monotonic(), clock()
    local t
    repeat
        i = i + 1
        op(i)
        n = n + 1
        t = monotonic()
    until t >= w0 + seconds
    line(case, n, t - w0, clock() - c0)
end

local NAME = "dev-%08d"
local GROUP = "bench"

local function run()
    print(string.format("info keystore %s %s %s", type(jit) == "table" and jit.version or _VERSION,
        softcxi._VERSION, root))
    assert(sys.mkdir_p(root .. "/keys"))
    local PW = "bench-admin-password"
    assert(softcxi.init { path = root .. "/dev", keyfile = root .. "/keys/device.key",
        password = PW, kdf_cost = 10 })
    local hsm = assert(softcxi.open { path = root .. "/dev", keyfile = root .. "/keys/device.key" })
    assert(hsm:logon_pass("ADMIN", PW))
    assert(hsm:user_add { name = "bench", password = "bench-user-password", groups = { "*" },
        kdf_cost = 10 })
    hsm:logoff()
    assert(hsm:logon_pass("bench", "bench-user-password"))
    local template = { algo = "ec", curve = "P-256", group = GROUP }

    -- the store grows to each size; find and get are measured at each
    local s = assert(store.open("file:" .. root .. "/ks"))
    local have, fill_keys, fill_wall, fill_cpu = 0, 0, 0, 0
    local results = {}
    math.randomseed(42)
    for _, n in ipairs(sizes) do
        rss_reset()
        local w0, c0 = monotonic(), clock()
        local r = assert(provision.run { hsm = hsm, store = s, template = template,
            count = n - have, start = have + 1, name_format = NAME })
        local w, c = monotonic() - w0, clock() - c0
        assert(r.stored == n - have, "provision stored " .. tostring(r.stored))
        print(string.format("info keystore_fill %d %.1f", n, (n - have) / w))
        fill_keys, fill_wall, fill_cpu = fill_keys + n - have, fill_wall + w, fill_cpu + c
        have = n
        results[#results + 1] = { n = n, rss = rss_peak_kib() }

        -- names are made per op: a table of a million names would be most of
        -- the peak RSS measured
        local filter = { name = "" }
        local random = math.random
        run_case("find_name_" .. n, function()
            filter.name = NAME:format(random(n))
            local found, cursor = 0, nil
            repeat
                local page
                page, cursor = s:find(filter, cursor, 100)
                if not page then error("find: " .. tostring(cursor)) end
                found = found + #page
            until not cursor
            if found ~= 1 then error("find found " .. found .. " ids for " .. filter.name) end
        end)
        -- one get of every id first, timed on its own: right after a large fill the
        -- first touch of a key misses the kernel's caches (docs/scaling.md)
        do
            local w1 = monotonic()
            for i = 1, n do
                local b, err = s:get(GROUP .. "/" .. NAME:format(i))
                if not b then error("get: " .. tostring(err)) end
            end
            print(string.format("info keystore_first_get %d %.1f", n, (monotonic() - w1) / n * 1e6))
        end
        run_case("get_" .. n, function()
            local b, err = s:get(GROUP .. "/" .. NAME:format(random(n)))
            if not b then error("get: " .. tostring(err)) end
        end)
    end
    -- the growth steps together: keygen-and-persist into a young store,
    -- where most keys also create their bucket directories; its peak RSS is
    -- that of the largest step
    local rss = 0
    for _, r in ipairs(results) do if r.rss > rss then rss = r.rss end end
    io.stdout:write(string.format("softcxi keygen_persist_fresh %.1f %.1f %d\n", fill_keys / fill_wall,
        fill_keys / fill_cpu, rss))

    -- the steady state: a store in service (of a few hundred thousand keys
    -- and more) has all 65,536 bucket directories and name index
    -- directories, so make those the next keys need first (untimed, as
    -- bench/store_file.lua does), then time the same provisioning
    local k = math.max(1000, math.min(5000, math.floor(have / 2)))
    for i = have + 1, have + k do
        local id, name = GROUP .. "/" .. NAME:format(i), NAME:format(i)
        local loc = s:_loc(id)
        assert(sys.mkdir_p(loc.path:match("^(.*)/")))
        for _, m in ipairs(s:_markers(loc, id, { group = GROUP, name = name })) do
            assert(sys.mkdir_p(m[1]:match("^(.*)/")))
        end
    end
    rss_reset()
    local w0, c0 = monotonic(), clock()
    local r = assert(provision.run { hsm = hsm, store = s, template = template,
        count = k, start = have + 1, name_format = NAME })
    local w, c = monotonic() - w0, clock() - c0
    assert(r.stored == k, "provision stored " .. tostring(r.stored))
    line("keygen_persist_bulk", k, w, c)
    s:close()

    -- one key at a time, each durable before the next
    local s1 = assert(store.open("file:" .. root .. "/ks1"))
    local t = { algo = "ec", curve = "P-256", group = GROUP, name = "" }
    run_case("keygen_persist_one", function(i)
        t.name = NAME:format(i)
        local blob = assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, t))
        local ok, err = s1:put(nil, blob)
        if not ok then error("put: " .. tostring(err)) end
    end)
    s1:close()
    hsm:close()
end

local ok, err = xpcall(run, debug.traceback)
cleanup()
if not ok then
    io.stderr:write("keystore.lua: ", tostring(err), "\n")
    os.exit(1)
end
