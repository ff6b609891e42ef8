-- bench/core.lua - softcxi's per-operation cost, seen from Lua.
--
-- Runs under Lua 5.4 and LuaJIT.  bench/run sets LUA_PATH / LUA_CPATH and
-- compares these numbers with bench/raw_openssl.c (the same work done with
-- raw OpenSSL, minus softcxi) and bench/softhsm2.c (SoftHSMv2 through
-- PKCS#11), measured in the same run.
--
--   lua5.4 bench/core.lua [--seconds S | --ops N] [--case NAME]...
--
-- Output, one line per case (the shape of bench_raw_openssl's):
--   softcxi <case> <ops_per_s_wall> <ops_per_s_cpu> <peak_rss_kib>
-- plus one line: info <interpreter> <_VERSION>
--
-- Cases (one op is one call; "p256" is EC P-256):
--   keygen_seal_<algo>   key_generate(FLAG_EXTERNAL, ...), a new name per
--                        op: keygen + raw export + attribute encoding +
--                        XAES seal + the blob back to Lua; algo is p256,
--                        p384, ed25519, rsa2048 (4x the time), aes256
--   bulk_generate_1t     P-256 keys from bulk_generate in batches of 500 on
--   bulk_generate_2t     1 and on 2 threads; one op is one key (wall clock)
--   sign_cached_<algo>   sign(blob, mech, msg), same blob every time, on a
--                        device with the default cache (p256, ed25519,
--                        rsa2048), a 32-byte message
--   sign_cold_p256       the same on a device opened with cache = 0: every
--                        op parses, unseals and loads the blob
--   verify_p256          verify(blob, "ecdsa-sha256", msg, sig), cached
--   encrypt_aes_gcm_256  encrypt(aes_blob, "aes-gcm", 256 bytes), cached:
--                        a fresh random IV, iv .. ct .. tag back to Lua
--   rewrap_p256          key_rewrap(blob) after an MBK rotation, on the
--                        cache = 0 device and over 1000 distinct blobs (a
--                        rewrap meets every blob once): open under the old
--                        MBK, seal under the new one
--
-- Clocks: ops_per_s_cpu divides by os.clock() (the process's CPU time),
-- ops_per_s_wall by softcxi.sys.monotonic() over the same interval.  The
-- single-threaded cases are compared on CPU time; bulk_generate on wall
-- time (it runs threads).  peak_rss_kib is VmHWM from /proc/self/status,
-- reset before each case through /proc/self/clear_refs (0 where there is
-- no /proc).
--
-- The device is a throw-away one: a state directory and an explicit key
-- file (outside it) under a fresh temporary directory, removed at the end,
-- also when a case fails.

local softcxi = require "softcxi"
local sys = require "softcxi.sys"

local clock, monotonic = os.clock, sys.monotonic

-- ---- arguments -------------------------------------------------------------

local CASES = {
    "keygen_seal_p256", "keygen_seal_p384", "keygen_seal_ed25519", "keygen_seal_rsa2048",
    "keygen_seal_aes256", "bulk_generate_1t", "bulk_generate_2t",
    "sign_cached_p256", "sign_cold_p256", "verify_p256", "sign_cached_ed25519",
    "sign_cached_rsa2048", "encrypt_aes_gcm_256", "rewrap_p256",
}
local WEIGHT = { keygen_seal_rsa2048 = 4 } -- times --seconds: one RSA keygen is 50-250 ms

local function usage(msg)
    io.stderr:write("core.lua: ", msg, "\n",
        "usage: core.lua [--seconds S | --ops N] [--case NAME]...   (cases: ",
        table.concat(CASES, ", "), ")\n")
    os.exit(2)
end

local seconds, ops, only = 1.0, nil, nil
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
        elseif opt == "--ops" then
            ops = tonumber(value())
            if not ops or ops < 1 or ops % 1 ~= 0 then usage("--ops must be a positive integer") end
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
local function wanted(c) return not only or only[c] end

-- ---- peak RSS per case -------------------------------------------------------

local function rss_reset()
    collectgarbage() -- the peak of this case, not of the garbage of the last
    local f = io.open("/proc/self/clear_refs", "w")
    if f then
        f:write("5") -- 5: reset the peak resident set size to the current one
        f:close()
    end
end

local function rss_peak_kib()
    local f = io.open("/proc/self/status", "r")
    if not f then return 0 end
    local kib = f:read("*a"):match("VmHWM:%s*(%d+)")
    f:close()
    return tonumber(kib) or 0
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
    os.execute("rm -rf '" .. root:gsub("'", "'\\''") .. "'")
    os.remove(tmpfile)
end

local ADMIN_PW, USER_PW = "bench-admin-password", "bench-user-password"
local initialised = false

-- A session logged on as a user of every group (or as the administrator);
-- the first call creates the device and that user.
local function open_device(cache, as_admin)
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
    if as_admin then
        assert(hsm:logon_pass("ADMIN", ADMIN_PW))
    else
        assert(hsm:logon_pass("bench", USER_PW))
    end
    sessions[#sessions + 1] = hsm
    return hsm
end

-- ---- the timing loop -------------------------------------------------------

-- op(i) runs `per_call` operations; i counts calls up across warm-up and
-- measurement, so keygen names never repeat.  The clock is read after
-- every block of calls; the block doubles up to 100 while a block takes
-- under 1 ms (sub-microsecond clock reads do not distort fast ops, and a
-- 100 ms RSA keygen does not overrun the time).
-- With --ops N, a case runs exactly N calls instead, with no warm-up and no
-- clock, and prints "softcxi <case> ops <N>": bench/icount counts its
-- instructions under callgrind, where time means nothing.
local function count_case(name, op)
    for i = 1, ops do op(i) end
    io.stdout:write(string.format("softcxi %s ops %d\n", name, ops))
    io.stdout:flush()
    return ops
end

local function run_case(name, op, per_call)
    if ops then return count_case(name, op) end
    per_call = per_call or 1
    local secs = seconds * (WEIGHT[name] or 1)
    local i = 0
    rss_reset()
    -- Warm-up: fills OpenSSL's method caches and softcxi's contexts, and
    -- lets LuaJIT compile the loop.  10% of the time, at least 20 ms.
    local warm = secs * 0.1
    if warm < 0.02 then warm = 0.02 end
    local stop = clock() + warm
    repeat
        i = i + 1
        op(i)
    until clock() >= stop

    local calls, block = 0, 1
    local w0, t0 = monotonic(), clock()
    stop = t0 + secs
    local t, tb
    tb = t0
    repeat
        for _ = 1, block do
            i = i + 1
            op(i)
        end
        calls = calls + block
        t = clock()
        if t - tb < 1e-3 and block < 100 then block = block * 2 end
        tb = t
    until t >= stop
    local wall = monotonic() - w0
    local n = calls * per_call
    io.stdout:write(string.format("softcxi %s %.1f %.1f %d\n", name, n / wall, n / (t - t0),
        rss_peak_kib()))
    io.stdout:flush()
    return calls
end

-- the same for threaded calls: timed on the wall clock
local function run_case_wall(name, op, per_call)
    if ops then return count_case(name, op) end
    local secs = seconds * (WEIGHT[name] or 1)
    local i = 0
    rss_reset()
    local warm = secs * 0.1
    if warm < 0.02 then warm = 0.02 end
    local stop = monotonic() + warm
    repeat
        i = i + 1
        op(i)
    until monotonic() >= stop
    local calls = 0
    local w0, c0 = monotonic(), clock()
    local t
    repeat
        i = i + 1
        op(i)
        calls = calls + 1
        t = monotonic()
    until t >= w0 + secs
    local n = calls * per_call
    io.stdout:write(string.format("softcxi %s %.1f %.1f %d\n", name, n / (t - w0),
        n / (clock() - c0), rss_peak_kib()))
    io.stdout:flush()
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

    -- keygen + seal, one template table per algorithm, its name changed per
    -- op (no table garbage)
    for _, k in ipairs {
        { "p256", { algo = "ec", curve = "P-256" } },
        { "p384", { algo = "ec", curve = "P-384" } },
        { "ed25519", { algo = "ed25519" } },
        { "rsa2048", { algo = "rsa", size = 2048 } },
        { "aes256", { algo = "aes", size = 256 } },
    } do
        local case, t = "keygen_seal_" .. k[1], k[2]
        if wanted(case) then
            t.name, t.group = "", "iot"
            run_case(case, function(i)
                t.name = "dev-" .. i
                local b, err = key_generate(hot, EXTERNAL, t)
                if not b then error("key_generate: " .. tostring(err)) end
            end)
        end
    end

    local BATCH = 500
    for _, threads in ipairs { 1, 2 } do
        local case = "bulk_generate_" .. threads .. "t"
        if wanted(case) then
            local t = { algo = "ec", curve = "P-256", group = "iot" }
            local opts = { name_format = "bulk-%08d", start = 1, threads = threads }
            run_case_wall(case, function(i)
                opts.start = (i - 1) * BATCH + 1
                local blobs, err = hot:bulk_generate(EXTERNAL, t, BATCH, opts)
                if not blobs or #blobs ~= BATCH then error("bulk_generate: " .. tostring(err)) end
            end, BATCH)
        end
    end

    if wanted("sign_cached_p256") then
        local before = hot:device_info()
        local n = run_case("sign_cached_p256", function()
            local s, err = sign(hot, blob, MECH, msg)
            if not s then error("sign: " .. tostring(err)) end
        end)
        local after = hot:device_info()
        -- every timed sign (and its warm-up) must have hit the cache
        if after.cache_misses ~= before.cache_misses or after.cache_hits - before.cache_hits < n then
            error(string.format("sign_cached_p256 missed the cache (%d misses)",
                after.cache_misses - before.cache_misses))
        end
    end

    if wanted("sign_cold_p256") then
        run_case("sign_cold_p256", function()
            local s, err = sign(cold, blob, MECH, msg)
            if not s then error("sign: " .. tostring(err)) end
        end)
        local ci = cold:device_info()
        if ci.cache_hits ~= 0 or ci.cache_entries ~= 0 then
            error("sign_cold_p256 used a cache")
        end
    end

    if wanted("verify_p256") then
        local sig = check(sign(hot, blob, MECH, msg))
        local verify = hot.verify
        run_case("verify_p256", function()
            if verify(hot, blob, MECH, msg, sig) ~= true then error("verify failed") end
        end)
    end

    for _, k in ipairs {
        { "ed25519", { algo = "ed25519", name = "bench-ed", group = "iot" }, "ed25519" },
        { "rsa2048", { algo = "rsa", size = 2048, name = "bench-rsa", group = "iot" }, "rsa-pkcs1-sha256" },
    } do
        local case = "sign_cached_" .. k[1]
        if wanted(case) then
            local b, mech = check(key_generate(hot, EXTERNAL, k[2])), k[3]
            local sig = check(sign(hot, b, mech, msg))
            if hot:verify(b, mech, msg, sig) ~= true then error(case .. ": signature does not verify") end
            run_case(case, function()
                local s, err = sign(hot, b, mech, msg)
                if not s then error("sign: " .. tostring(err)) end
            end)
        end
    end

    if wanted("encrypt_aes_gcm_256") then
        local aes = check(key_generate(hot, EXTERNAL, { algo = "aes", size = 256, name = "bench-aes",
            group = "iot" }))
        local data = check(hot:rnd_gen(256))
        local box = check(hot:encrypt(aes, "aes-gcm", data))
        if #box ~= 256 + 28 or hot:decrypt(aes, "aes-gcm", box) ~= data then error("aes-gcm round trip") end
        local encrypt = hot.encrypt
        run_case("encrypt_aes_gcm_256", function()
            local c, err = encrypt(hot, aes, "aes-gcm", data)
            if not c then error("encrypt: " .. tostring(err)) end
        end)
    end

    -- last: it rotates the MBK
    if wanted("rewrap_p256") then
        local POOL = 1000
        local pool = check(hot:bulk_generate(EXTERNAL, { algo = "ec", curve = "P-256", group = "iot" },
            POOL, { name_format = "rw-%06d" }))
        local admin = open_device(nil, true)
        local shares = { root .. "/share1", root .. "/share2" }
        local pws = { "bench-share-one", "bench-share-two" }
        assert(admin:mbk_generate { m = 2, shares = shares, passwords = pws, kdf_cost = 10 })
        assert(admin:mbk_import { shares = shares, passwords = pws })
        local new, changed = cold:key_rewrap(pool[1])
        if not new then error("key_rewrap: " .. tostring(changed)) end
        if changed ~= true or new == pool[1] then error("key_rewrap did not rewrap") end
        local sig = check(sign(cold, new, MECH, msg))
        if cold:verify(pool[1], MECH, msg, sig) ~= true then error("the rewrapped key is another key") end
        local rewrap = cold.key_rewrap
        run_case("rewrap_p256", function(i)
            local b, err = rewrap(cold, pool[i % POOL + 1])
            if not b then error("key_rewrap: " .. tostring(err)) end
        end)
    end
end

local ok, err = xpcall(main, debug.traceback)
cleanup()
if not ok then
    io.stderr:write("core.lua: ", tostring(err), "\n")
    os.exit(1)
end
