-- bench/core.lua - softcxi's per-operation cost, seen from Lua.
--
-- Runs under Lua 5.4 and LuaJIT.  bench/run sets LUA_PATH / LUA_CPATH and
-- compares these numbers with bench/raw_openssl.c (the same work done with
-- raw OpenSSL, minus softcxi).
--
--   lua5.4 bench/core.lua [--seconds S] [--case NAME]...
--
-- Output, one line per case (same shape as raw_openssl):
--   softcxi <case> <ops_per_second> <microseconds_per_op>
-- plus one line: info <interpreter> <_VERSION>
--
-- Cases:
--   p256_keygen_seal  key_generate(FLAG_EXTERNAL, P-256), a new name per op:
--                     keygen + raw export + attribute encoding + XAES seal
--   p256_sign_cached  sign one blob over and over: the opened key is cached
--   p256_sign_cold    the same on a device opened with cache = 0, so every
--                     sign parses, unseals and loads the blob from scratch
--
-- Timing: plain Lua has no monotonic wall clock, so this uses os.clock(),
-- the process's CPU time (user + system).  That is acceptable here: all the
-- work is in-process, single-threaded and never blocks, so CPU time and
-- wall time agree up to time the scheduler takes away from us -- which
-- os.clock() does not count and raw_openssl's CLOCK_MONOTONIC does.  On a
-- busy machine this favours softcxi slightly.
--
-- The device is a throw-away one: a state directory and an explicit key
-- file (outside it) under a fresh temporary directory, both removed at the
-- end, also when a case fails.

local softcxi = require "softcxi"

local clock = os.clock
local BLOCK = 100 -- ops between two clock readings

-- ---- arguments -------------------------------------------------------------

local CASES = { "p256_keygen_seal", "p256_sign_cached", "p256_sign_cold" }

local function usage(msg)
    io.stderr:write("core.lua: ", msg, "\n",
        "usage: core.lua [--seconds S] [--case NAME]...   (cases: ",
        table.concat(CASES, ", "), ")\n")
    os.exit(2)
end

local seconds, only = 1.0, nil
do
    local i = 1
    while i <= #arg do
        local a = arg[i]
        local opt, val = a:match("^(%-%-[%w-]+)=(.*)$")
        if not opt then opt = a end
        local function value()
            if val then return val end
            i = i + 1
            if arg[i] == nil then usage(opt .. " needs a value") end
            return arg[i]
        end
        if opt == "--seconds" then
            seconds = tonumber(value())
            if not seconds or seconds <= 0 then usage("--seconds must be a positive number") end
        elseif opt == "--case" then
            local c = value()
            local known = false
            for _, k in ipairs(CASES) do known = known or k == c end
            if not known then usage("unknown case '" .. c .. "'") end
            only = only or {}
            only[c] = true
        elseif opt == "-h" or opt == "--help" then
            usage("help")
        else
            usage("unknown argument '" .. a .. "'")
        end
        i = i + 1
    end
end

-- ---- the temporary device ------------------------------------------------

-- os.tmpname() creates an empty, uniquely named file; its name plus a suffix
-- is ours alone.  The core creates the directories (mode 0700) itself.
local tmpfile = os.tmpname()
local root = tmpfile .. ".softcxi-bench"
local state_dir = root .. "/state"
local keyfile = root .. "/keys/device.key"

local sessions = {}

local function cleanup()
    for _, s in ipairs(sessions) do s:close() end
    -- Everything the core writes is known; remove it file by file.  Should
    -- anything be left (a newer core writing more), fall back to rm -rf.
    for _, f in ipairs { "device.mbk", "users.db", "users.lock" } do
        os.remove(state_dir .. "/" .. f)
    end
    os.remove(state_dir)
    os.remove(keyfile)
    os.remove(root .. "/keys")
    local ok, _, errno = os.remove(root)
    if not ok and errno ~= 2 then -- not ENOENT: something is left inside
        os.execute("rm -rf '" .. root:gsub("'", "'\\''") .. "'")
    end
    os.remove(tmpfile)
end

local ADMIN_PW, USER_PW = "bench-admin-password", "bench-user-password"
local initialised = false

-- A session logged on as a user of every group; the first call creates
-- the device and that user.
local function open_device(cache)
    if not initialised then
        local ok, err = softcxi.init { path = state_dir, keyfile = keyfile,
            password = ADMIN_PW, kdf_cost = 10 }
        if not ok then error("softcxi.init: " .. tostring(err), 2) end
        local admin = assert(softcxi.open { path = state_dir, keyfile = keyfile })
        assert(admin:logon_pass("ADMIN", ADMIN_PW))
        assert(admin:user_add { name = "bench", password = USER_PW, groups = { "*" },
            kdf_cost = 10 })
        admin:close()
        initialised = true
    end
    local hsm, err = softcxi.open { path = state_dir, keyfile = keyfile, cache = cache }
    if not hsm then error("softcxi.open: " .. tostring(err), 2) end
    assert(hsm:logon_pass("bench", USER_PW))
    sessions[#sessions + 1] = hsm
    return hsm
end

-- ---- the timing loop -------------------------------------------------------

-- op(i) runs one operation; i counts up across warm-up and measurement, so
-- keygen names never repeat.
local function run_case(name, op)
    local i = 0
    -- Warm-up: fills OpenSSL's method caches and softcxi's contexts, and
    -- lets LuaJIT compile the loop.  10% of the time, at least 20 ms.
    local warm = seconds * 0.1
    if warm < 0.02 then warm = 0.02 end
    local stop = clock() + warm
    repeat
        for _ = 1, 16 do
            i = i + 1
            op(i)
        end
    until clock() >= stop

    local n = 0
    local t0 = clock()
    stop = t0 + seconds
    local t
    repeat
        for _ = 1, BLOCK do
            i = i + 1
            op(i)
        end
        n = n + BLOCK
        t = clock()
    until t >= stop
    local elapsed = t - t0
    io.stdout:write(string.format("softcxi %s %.1f %.2f\n", name, n / elapsed,
        elapsed * 1e6 / n))
    io.stdout:flush()
    return n
end

-- v, err from a softcxi call: v, or raise with err
local function check(v, err)
    if v == nil then error(tostring(err), 2) end
    return v
end

-- ---- the cases -------------------------------------------------------------

local function main()
    local interp = rawget(_G, "jit") and "luajit" or ("lua" .. _VERSION:match("%d+%.%d+"))
    io.stdout:write("info ", interp, " ", _VERSION, "\n")

    local hot = open_device() -- default cache
    local cold = open_device(0)
    local key_generate, sign = hot.key_generate, hot.sign
    local EXTERNAL = softcxi.FLAG_EXTERNAL
    local MECH = "ecdsa-sha256"

    local blob = check(key_generate(hot, EXTERNAL,
        { algo = "ec", curve = "P-256", name = "bench-sign", group = "iot" }))
    local msg = check(hot:rnd_gen(32)) -- the 32-byte message every sign signs

    -- A fast benchmark of a broken path would be meaningless: check that
    -- both devices produce signatures that verify, before timing anything.
    for _, h in ipairs { hot, cold } do
        local sig = check(sign(h, blob, MECH, msg))
        if h:verify(blob, MECH, msg, sig) ~= true then error("signature does not verify") end
    end
    if hot:device_info().cache_capacity == 0 then error("the default device has no cache") end
    if cold:device_info().cache_capacity ~= 0 then error("cache = 0 did not turn the cache off") end

    if not only or only.p256_keygen_seal then
        -- one template table, its name changed per op (no table garbage)
        local t = { algo = "ec", curve = "P-256", name = "", group = "iot" }
        run_case("p256_keygen_seal", function(i)
            t.name = "dev-" .. i
            local b, err = key_generate(hot, EXTERNAL, t)
            if not b then error("key_generate: " .. tostring(err)) end
        end)
    end

    if not only or only.p256_sign_cached then
        local before = hot:device_info()
        local n = run_case("p256_sign_cached", function()
            local s, err = sign(hot, blob, MECH, msg)
            if not s then error("sign: " .. tostring(err)) end
        end)
        local after = hot:device_info()
        -- every timed sign (and its warm-up) must have hit the cache
        if after.cache_misses ~= before.cache_misses or after.cache_hits - before.cache_hits < n then
            error(string.format("p256_sign_cached missed the cache (%d misses)",
                after.cache_misses - before.cache_misses))
        end
    end

    if not only or only.p256_sign_cold then
        run_case("p256_sign_cold", function()
            local s, err = sign(cold, blob, MECH, msg)
            if not s then error("sign: " .. tostring(err)) end
        end)
        local ci = cold:device_info()
        if ci.cache_hits ~= 0 or ci.cache_entries ~= 0 then
            error("p256_sign_cold used a cache")
        end
    end
end

local ok, err = xpcall(main, debug.traceback)
cleanup()
if not ok then
    io.stderr:write("core.lua: ", tostring(err), "\n")
    os.exit(1)
end
