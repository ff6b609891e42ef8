-- Crash tests: a child process is killed with SIGKILL at a random moment
-- while it provisions keys into the file store, stores internal keys, or
-- imports an MBK.  Afterwards every write the child saw confirmed must be
-- there and readable, nothing half-written may be visible, and running the
-- same job again must complete.
--
-- SOFTCXI_CRASH_RUNS (default 20) kill runs per kind; the seed is printed
-- so a failure can be replayed with SOFTCXI_CRASH_SEED.  The device and the
-- store live under SOFTCXI_CRASH_DIR (default /dev/shm when there is one):
-- a SIGKILL tests what a process leaves behind (temp files, renames, locks),
-- which tmpfs keeps exactly as a disk does, at a fraction of the fsync time.
-- (What a power cut leaves is the fsyncs' business, not a kill's.)  Runs under Lua 5.4
-- only: what is tested is the C core and the file system, not the
-- interpreter, and the kill runs are the slowest part of the suite.

local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

local RUNS = tonumber(os.getenv("SOFTCXI_CRASH_RUNS") or "") or 20
local SEED = tonumber(os.getenv("SOFTCXI_CRASH_SEED") or "") or os.time()

-- The child scripts log each confirmed write on its own line, flushed
-- before the next write starts: what the log holds, the child saw
-- succeed.  A SIGKILL loses no written data (the page cache outlives the
-- process), so the log is exact.
local PRELUDE = [[
local softcxi = require "softcxi"
local path, keyfile, user, password, log_path = arg[1], arg[2], arg[3], arg[4], arg[5]
local h = assert(softcxi.open { path = path, keyfile = keyfile })
assert(h:logon_pass(user, password))
local log = assert(io.open(log_path, "a"))
local function confirm(s) log:write(s, "\n"); log:flush() end
]]

local PROVISION = PRELUDE .. [[
local provision = require "softcxi.provision"
local store = assert(require("softcxi.store").open("file:" .. arg[6]))
assert(provision.run { hsm = h, store = store, count = tonumber(arg[7]), batch = 4, threads = 1,
    template = { algo = "ec", curve = "P-256", group = "iot", usage = { "sign", "verify" } },
    name_format = arg[8] .. "-%05d",
    on_progress = function(done) confirm("stored " .. done) end })
confirm("complete")
]]

local INTERNAL = PRELUDE .. [[
for i = 1, tonumber(arg[6]) do
    local name = string.format(arg[7] .. "-%05d", i)
    local hd, msg, code = h:key_generate(0, { algo = "ec", group = "iot", name = name,
        usage = { "sign", "verify" } })
    assert(hd or code == "EEXIST", msg)
    confirm(name)
end
confirm("complete")
]]

local IMPORT = PRELUDE .. [[
local ok, msg, code = h:mbk_import { shares = { arg[6], arg[7] }, passwords = { arg[8], arg[9] } }
assert(ok or code == "EEXIST", msg)
confirm("imported " .. h:mbk_info().current)
confirm("complete")
]]

local sys = require "softcxi.sys"

-- How long a whole job takes here (a run with its own names, not
-- counted): the kill moments are drawn from that span, so that they fall
-- anywhere in the job, start-up and open included, whatever the machine.
local function span(fn)
    local t0 = sys.monotonic()
    fn()
    return sys.monotonic() - t0
end

local function lines(path)
    local t = {}
    local data = H.readfile(path) or ""
    for l in data:gmatch("([^\n]*)\n") do t[#t + 1] = l end
    return t
end

-- Run script in a child; kill it after `after` seconds (nil: let it
-- finish).  Returns true when it was killed.
local function child(dev, script_text, user, password, log_path, after, ...)
    local script = dev.root .. "/crash-child.lua"
    H.writefile(script, script_text)
    local env = "LUA_PATH=" .. H.q(os.getenv("LUA_PATH") or package.path) .. " LUA_CPATH="
        .. H.q(os.getenv("LUA_CPATH") or package.cpath) .. " "
    local args = {}
    for i, a in ipairs({ dev.path, dev.keyfile, user, password, log_path, ... }) do
        args[i] = H.q(a)
    end
    -- (timeout 0 would mean no timeout at all)
    local cmd = env .. (after and ("timeout -s KILL " .. string.format("%.3f", math.max(after, 0.001))
        .. " ") or "")
        .. H.q(H.interpreter()) .. " " .. H.q(script) .. " " .. table.concat(args, " ")
    -- A shell that waits (not execs) reports the kill into the captured
    -- output instead of the terminal.
    local rc, out = H.run("sh -c " .. H.q(cmd .. "; exit $?"))
    if after and rc == 137 then return true end
    assert(rc == 0, "child failed (" .. rc .. "): " .. out)
    return false
end

-- No file the store or the device shows may be half-written: every
-- regular file under dir that is not a temp file must be whole.
local function no_torn_blobs(store_dir)
    local rc, out = H.run("find " .. H.q(store_dir .. "/blobs") .. " -type f -name '*.blob'")
    assert(rc == 0, out)
    local n = 0
    for f in out:gmatch("[^\n]+") do
        local data = assert(H.readfile(f))
        local info, msg = softcxi.key_info(data)
        assert(info, "torn or foreign blob file " .. f .. ": " .. tostring(msg))
        n = n + 1
    end
    return n
end

describe("crash safety: SIGKILL at random moments", function()
    if type(jit) == "table" then
        pending("runs under Lua 5.4 only (the C core and the file system are what is tested)")
        return
    end
    local dev
    local kills, completes = {}, {}
    local function tally(kind, killed)
        local t = killed and kills or completes
        t[kind] = (t[kind] or 0) + 1
    end
    setup(function()
        math.randomseed(SEED)
        io.write(string.format("\n  crash_spec: seed %d (SOFTCXI_CRASH_SEED), %d runs per kind\n",
            SEED, RUNS))
        local base = os.getenv("SOFTCXI_CRASH_DIR")
        if not base and H.run("test -d /dev/shm -a -w /dev/shm") == 0 then base = "/dev/shm" end
        dev = H.new_device(base and { root = base } or nil)
    end)
    teardown(function()
        for _, kind in ipairs({ "provision", "internal", "import" }) do
            io.write(string.format("  crash_spec: %-9s %2d kills survived, %2d runs completed\n",
                kind, kills[kind] or 0, completes[kind] or 0))
        end
        H.destroy(dev)
    end)

    it("provisioning into the file store: every confirmed blob is readable, none is torn, "
        .. "a re-run completes", function()
        local store_dir = dev.root .. "/store"
        local total = 40
        local T = span(function()
            child(dev, PROVISION, H.USER, H.USER_PASSWORD, dev.root .. "/calibrate.log", nil,
                store_dir, tostring(total), "calibrate")
        end)
        for run = 1, RUNS do
            -- each run its own names, so that every run has work to be killed in
            local prefix = string.format("run%02d", run)
            local log_path = dev.root .. "/provision-" .. run .. ".log"
            local killed = child(dev, PROVISION, H.USER, H.USER_PASSWORD, log_path,
                math.random() * T, store_dir, tostring(total), prefix)
            tally("provision", killed)
            local confirmed = 0
            for _, l in ipairs(lines(log_path)) do
                local n = l:match("^stored (%d+)$")
                if n then confirmed = tonumber(n) end
            end
            local store = assert(require("softcxi.store").open("file:" .. store_dir))
            for i = 1, confirmed do
                local id = string.format("iot/%s-%05d", prefix, i)
                local blob = store:get(id)
                assert(blob, "run " .. run .. ": confirmed " .. id .. " is missing")
                assert(dev.hsm:key_info(blob), "run " .. run .. ": " .. id .. " does not open")
            end
            no_torn_blobs(store_dir)
            -- the same job again completes: every key of the run there, each once
            child(dev, PROVISION, H.USER, H.USER_PASSWORD, log_path .. ".rerun", nil, store_dir,
                tostring(total), prefix)
            assert.are.equal(total * (run + 1), store:count())
            store:close()
        end
        local store = assert(require("softcxi.store").open("file:" .. store_dir))
        assert.are.equal(total * (RUNS + 1), no_torn_blobs(store_dir))
        local blob = assert(store:get(string.format("iot/run%02d-%05d", RUNS, total)))
        assert(dev.hsm:sign(blob, "ecdsa-sha256", "after the crashes"))
        store:close()
        assert((kills.provision or 0) > 0, "no run was killed: the kill window missed the writes")
    end)

    it("internal key database writes: every confirmed key opens and signs, "
        .. "the database stays whole", function()
        local total = 30
        local T = span(function()
            child(dev, INTERNAL, H.USER, H.USER_PASSWORD, dev.root .. "/calibrate.log", nil,
                tostring(total), "calibrate")
        end)
        for run = 1, RUNS do
            local prefix = string.format("run%02d", run)
            local log_path = dev.root .. "/internal-" .. run .. ".log"
            local killed = child(dev, INTERNAL, H.USER, H.USER_PASSWORD, log_path,
                math.random() * T, tostring(total), prefix)
            tally("internal", killed)
            local hsm = H.open(dev)
            for _, name in ipairs(lines(log_path)) do
                if name ~= "complete" then
                    local hd, msg = hsm:key_open("iot", name)
                    assert(hd, "run " .. run .. ": confirmed internal key " .. name .. ": "
                        .. tostring(msg))
                    assert(hsm:sign(hd, "ecdsa-sha256", "m"))
                end
            end
            -- the whole database lists and every key in it opens
            for _, k in ipairs(assert(hsm:key_list())) do
                assert(hsm:sign(assert(hsm:key_open(k.group, k.name)), "ecdsa-sha256", "m"))
            end
            hsm:close()
            child(dev, INTERNAL, H.USER, H.USER_PASSWORD, log_path .. ".rerun", nil,
                tostring(total), prefix)
        end
        local hsm = H.open(dev)
        assert.are.equal(total * (RUNS + 1), #assert(hsm:key_list()))
        hsm:close()
        assert((kills.internal or 0) > 0, "no run was killed: the kill window missed the writes")
    end)

    it("MBK import: the device opens, holds the old or the new MBK, every key still works, "
        .. "a re-run completes", function()
        local admin = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        local pw = { "share-password-1", "share-password-2", "share-password-3" }
        local sets = {}
        for s = 1, 2 do
            local shares = {}
            for i = 1, 3 do shares[i] = dev.root .. "/mbk-" .. s .. "-" .. i .. ".share" end
            assert(admin:mbk_generate { m = 2, shares = shares, passwords = pw, kdf_cost = 10 })
            sets[s] = shares
        end
        admin:close()
        local hd = H.gen(dev.hsm, { algo = "ec", group = "iot", name = "before-imports" })
        local internal = assert(dev.hsm:key_generate(0, { algo = "ec", group = "iot",
            name = "internal-before-imports" }))
        local T = span(function()
            child(dev, IMPORT, H.ADMIN, H.ADMIN_PASSWORD, dev.root .. "/calibrate.log", nil,
                sets[1][1], sets[1][2], pw[1], pw[2])
        end)
        for run = 1, RUNS do
            local set = sets[run % 2 + 1]
            local log_path = dev.root .. "/import-" .. run .. ".log"
            local killed = child(dev, IMPORT, H.ADMIN, H.ADMIN_PASSWORD, log_path,
                math.random() * T, set[1], set[2], pw[1], pw[2])
            tally("import", killed)
            local hsm = H.open(dev)
            local current = hsm:mbk_info().current
            for _, l in ipairs(lines(log_path)) do
                local kcv = l:match("^imported (%x+)$")
                if kcv then assert.are.equal(kcv, current, "run " .. run) end
            end
            assert(hsm:sign(hd, "ecdsa-sha256", "m"), "run " .. run .. ": external key")
            assert(hsm:sign(internal, "ecdsa-sha256", "m"), "run " .. run .. ": internal key")
            hsm:close()
            -- the same import again completes (or finds it done)
            child(dev, IMPORT, H.ADMIN, H.ADMIN_PASSWORD, log_path .. ".rerun", nil,
                set[1], set[2], pw[1], pw[2])
        end
        local hsm = H.open(dev)
        assert(hsm:sign(hd, "ecdsa-sha256", "m"))
        assert(hsm:sign(internal, "ecdsa-sha256", "m"))
        hsm:close()
        -- an append cut short is not tampering: the log still verifies
        admin = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        assert(admin:audit_verify())
        admin:close()
    end)
end)
