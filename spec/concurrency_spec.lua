-- Concurrency (issue 8, item 6): several processes use one device and one store at the
-- same time, and afterwards nothing confirmed is lost and nothing is corrupted.  The same
-- run for each store: file, SQLite, and Redis, Redis Cluster and PostgreSQL when `./run
-- test` started them.
--
--   * WORKERS processes (users of group "*") each loop: an external key generated and put
--     into the store, an internal key generated, every third internal key backed up to a
--     file, every fourth external key revoked;
--   * one administrator process rotates the MBK twice while the workers run (mbk_import of
--     a new share set, which also rewraps the internal keys) and rewraps the store after
--     each rotation (softcxi.rewrap: compare-and-set per blob);
--   * a second rewrap runs over and over until the workers and rotations are done, racing
--     the first over the same blobs (the stores' compare-and-set across processes);
--   * one administrator process makes database backups in a loop, each after reading which
--     internal keys the workers had confirmed by then, and verifies the audit log and lists
--     the keys between them.
--
-- Every child logs each confirmed step on its own flushed line before the next, so the
-- logs say exactly what each process saw succeed.  The children start together (each
-- opens and logs on, says "ready", and waits for a go file); the administrators' steps
-- wait for the workers' progress in their logs, and the workers wait halfway for the
-- first rotation and at three quarters for the second, so the rotations and backups fall
-- in the middle of the key writes on any machine.  No wall-clock assertion.
--
-- Afterwards: every confirmed external blob is in the store, opens, and signs (or is
-- refused as revoked, for the revoked ones); count, find by group (each id once, nothing
-- else), find by name and scan agree with what was confirmed; every blob file parses
-- (file store); every confirmed
-- internal key is listed and signs; every key backup restores on a second device that
-- holds the same MBKs (imported from the same shares); every database image restores
-- there, holding every internal key confirmed before it was made; the audit log verifies.
-- Under Lua 5.4 only (LuaJIT reports it pending): the C core, the file
-- system, the servers and the stores' locking are what is tested.

local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

local WORKERS = 3
local KEYS = tonumber(os.getenv("SOFTCXI_CONCURRENCY_KEYS") or "") or 60   -- per worker
local PW = { "share-password-1", "share-password-2", "share-password-3" }

-- Every child: open, log on (each name in turn), say ready, wait for the go file.
local PRELUDE = [[
local softcxi = require "softcxi"
local path, keyfile, log_path, go, dir = arg[1], arg[2], arg[3], arg[4], arg[5]
local h = assert(softcxi.open { path = path, keyfile = keyfile })
for user, password in (arg[6]):gmatch("([^:,]+):([^,]+)") do
    assert(h:logon_pass(user, password))
end
local log = assert(io.open(log_path, "a"))
local function confirm(s) log:write(s, "\n"); log:flush() end
local function lines(p)
    local t, f = {}, io.open(p, "rb")
    if not f then return t end
    for l in f:lines() do t[#t + 1] = l end
    f:close()
    return t
end
-- softcxi.hiredis's sleep, not sleep(1): no process per pause (hundreds under ASan); the
-- waits are bounded by their counts (15,000 pauses: 5 min), never by a clock
local have_sleep, hiredis = pcall(require, "softcxi.hiredis")
local function pause()
    if have_sleep then hiredis.sleep(0.02) else os.execute("sleep 0.02") end
end
confirm("ready")
for _ = 1, 15000 do
    local f = io.open(go, "rb")
    if f then f:close() break end
    pause()
end
-- The workers' logs so far: how many steps each confirmed, and the internal keys.
local function progress()
    local steps, done, internal = 0, 0, {}
    for w = 1, tonumber(arg[7]) do
        for _, l in ipairs(lines(dir .. "/worker-" .. w .. ".log")) do
            steps = steps + 1
            if l == "complete" then done = done + 1 end
            local name = l:match("^int (%S+)$")
            if name then internal[#internal + 1] = name end
        end
    end
    return steps, done, internal
end
-- Wait until the workers have confirmed `n` steps in all (or all finished).
local function wait_steps(n)
    for _ = 1, 15000 do
        local steps, done = progress()
        if steps >= n or done == tonumber(arg[7]) then return end
        pause()
    end
end
]]

local WORKER = PRELUDE .. [[
local prefix, n = arg[8], tonumber(arg[9])
local store = assert(require("softcxi.store").open(os.getenv("SOFTCXI_CONC_STORE")))
local usage = { "sign", "verify" }
-- Halfway, and at three quarters, wait for the first and the second rotation: both fall
-- in the middle of this worker's writes, however the processes are scheduled.
local function wait_rotations(k)
    for _ = 1, 15000 do
        local m = 0
        for _, l in ipairs(lines(dir .. "/rotate.log")) do
            if l:match("^mbk ") or l == "complete" then m = m + 1 end
        end
        if m >= k then return end
        pause()
    end
end
for i = 1, n do
    if i == math.floor(n / 2) then wait_rotations(1) end
    if i == math.floor(n * 3 / 4) then wait_rotations(2) end
    local ename, iname = string.format("%s-ext-%03d", prefix, i), string.format("%s-int-%03d", prefix, i)
    local blob = assert(h:key_generate(softcxi.FLAG_EXTERNAL,
        { algo = "ec", group = "iot", name = ename, usage = usage }))
    local id = "iot/" .. ename
    assert(store:put(id, blob))
    confirm("ext " .. id)
    local hd = assert(h:key_generate(0, { algo = "ec", group = "iot", name = iname, usage = usage }))
    confirm("int " .. iname)
    if i % 3 == 0 then
        local file = dir .. "/backup-" .. iname
        local f = assert(io.open(file, "wb"))
        f:write(assert(h:key_backup(hd)))
        assert(f:close())
        confirm("backup " .. iname .. " " .. file)
    end
    if i % 4 == 0 then
        assert(h:key_revoke(blob, "concurrency spec"))
        confirm("revoked " .. id)
    end
end
confirm("complete")
]]

local ROTATE = PRELUDE .. [[
local rewrap = require "softcxi.rewrap"
local store = assert(require("softcxi.store").open(os.getenv("SOFTCXI_CONC_STORE")))
local total = tonumber(arg[7]) * tonumber(arg[8]) * 2
for round = 2, 3 do
    wait_steps(math.floor(total * (round - 1) / 3))
    local shares = { dir .. "/mbk-" .. round .. "-1.share", dir .. "/mbk-" .. round .. "-3.share" }
    assert(h:mbk_import { shares = shares, passwords = { arg[9], arg[10] } })
    confirm("mbk " .. h:mbk_info().current)
    local steps = progress()
    local r = assert(rewrap.run { hsm = h, store = store, page = 16 })
    confirm(string.format("rewrap after %d worker steps: seen %d rewrapped %d current %d "
        .. "conflicts %d skipped %d", steps, r.seen, r.rewrapped, r.current, r.conflicts, r.skipped))
end
confirm("complete")
]]

-- A second rewrap, run over and over from the start until the workers and the rotations
-- are done: it races the first over the same blobs, so the compare-and-set of each store
-- is exercised across processes (a lost race is a conflict, counted, never a lost write).
local REWRAP = PRELUDE .. [[
local rewrap = require "softcxi.rewrap"
local store = assert(require("softcxi.store").open(os.getenv("SOFTCXI_CONC_STORE")))
local k = 0
repeat
    k = k + 1
    local _, done = progress()
    local rotated = false
    for _, l in ipairs(lines(dir .. "/rotate.log")) do rotated = rotated or l == "complete" end
    local r = assert(rewrap.run { hsm = h, store = store, page = 8 })
    confirm(string.format("rewrap2 %d: seen %d rewrapped %d current %d conflicts %d skipped %d",
        k, r.seen, r.rewrapped, r.current, r.conflicts, r.skipped))
    if not (done == tonumber(arg[7]) and rotated) then pause() end
until (done == tonumber(arg[7]) and rotated) or k >= 400
confirm("complete")
]]

local DBBACKUP = PRELUDE .. [[
local total = tonumber(arg[7]) * tonumber(arg[8]) * 2
local k = 0
repeat
    k = k + 1
    local _, done, internal = progress()
    local image, keys = assert(h:backup_database())
    local file = dir .. "/db-" .. k .. ".img"
    local f = assert(io.open(file, "wb"))
    f:write(image)
    assert(f:close())
    confirm("db " .. file .. " " .. keys .. " " .. table.concat(internal, ","))
    assert(h:audit_verify())
    confirm("audit")
    assert(h:key_list())
    if done < tonumber(arg[7]) then wait_steps(math.floor(total * k / 6)) end
until done == tonumber(arg[7]) or k >= 12
confirm("complete")
]]

local have_hiredis, hiredis_mod = pcall(require, "softcxi.hiredis") -- its sleep: no process

local function lines(path)
    local t = {}
    local data = H.readfile(path) or ""
    for l in data:gmatch("([^\n]*)\n") do t[#t + 1] = l end
    return t
end

local function env()
    return "LUA_PATH=" .. H.q(os.getenv("LUA_PATH") or package.path) .. " LUA_CPATH="
        .. H.q(os.getenv("LUA_CPATH") or package.cpath) .. " "
end

-- The stores, each in a run of its own (a fresh pair of devices each): the file store and
-- SQLite always; Redis, Redis Cluster and PostgreSQL when `./run test` started them (their
-- URLs in SOFTCXI_TEST_*), each under a prefix or table of its own.
local TAG = string.format("%d%04d", os.time(), math.random(0, 9999))
local function with_param(url, key, value) -- url with ?key=value set (replaced or added)
    local base, query = url:match("^([^?]*)%??(.*)$")
    local params = {}
    for kv in query:gmatch("[^&]+") do
        if kv:match("^([^=]*)") ~= key then params[#params + 1] = kv end
    end
    params[#params + 1] = key .. "=" .. value
    return base .. "?" .. table.concat(params, "&")
end
local STORES = {
    { "file", function(dir) return "file:" .. dir .. "/store" end },
    { "SQLite", function(dir) return "sqlite:" .. dir .. "/store.db" end },
}
for _, s in ipairs {
    { "Redis", "SOFTCXI_TEST_REDIS_URL", "prefix", "conc" .. TAG .. ":" },
    { "Redis Cluster", "SOFTCXI_TEST_REDIS_CLUSTER_URL", "prefix", "conc" .. TAG .. ":" },
    { "PostgreSQL", "SOFTCXI_TEST_PG_URL", "table", "conc_" .. TAG },
} do
    local url = os.getenv(s[2])
    if url and url ~= "" then
        STORES[#STORES + 1] = { s[1], function() return with_param(url, s[3], s[4]) end }
    end
end

--- Every page of find(filter), asserting that no id comes twice.
local function find_all(store, filter)
    local out, seen, cursor = {}, {}, nil
    for _ = 1, 10000 do
        local ids, nxt, code = store:find(filter, cursor, 50)
        assert(ids, tostring(nxt) .. " " .. tostring(code))
        for _, id in ipairs(ids) do
            assert(not seen[id], "find returned " .. id .. " twice")
            seen[id] = true
            out[#out + 1] = id
        end
        cursor = nxt
        if not cursor then return out, seen end
    end
    error("find does not end")
end

local function scan_all(store)
    local seen, n, cursor = {}, 0, nil
    for _ = 1, 10000 do
        local ids, nxt, code = store:scan(cursor, 50)
        assert(ids, tostring(nxt) .. " " .. tostring(code))
        for _, id in ipairs(ids) do
            if not seen[id] then n = n + 1 end
            seen[id] = true
        end
        cursor = nxt
        if not cursor then return seen, n end
    end
    error("scan does not end")
end

describe("concurrency: processes sharing one device and one store", function()
    if type(jit) == "table" then
        pending("runs under Lua 5.4 only (the C core, the file system and the locks are tested)")
        return
    end
    local function shm()
        if H.run("test -d /dev/shm -a -w /dev/shm") == 0 then return { root = "/dev/shm" } end
    end

    for _, st in ipairs(STORES) do
    local kind, url_for = st[1], st[2]
    it("(" .. kind .. ") keys generated, the MBK rotated with rewrap, database and key backups, "
        .. "revocations at once: nothing confirmed lost, nothing corrupted", function()
        local dev, dev2 = H.new_device(shm()), H.new_device(shm())
        finally(function()
            H.destroy(dev)
            H.destroy(dev2)
        end)
        local dir = dev.root .. "/conc"
        H.mkdir_p(dir)
        local url = url_for(dir)
        -- three share sets: set 1 is imported first on both devices (so that the database
        -- images, sealed under whatever MBK is current, restore on the second), sets 2
        -- and 3 are the rotations, imported on the second device afterwards
        local admin = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        for s = 1, 3 do
            local shares = {}
            for i = 1, 3 do shares[i] = dir .. "/mbk-" .. s .. "-" .. i .. ".share" end
            assert(admin:mbk_generate { m = 2, shares = shares, passwords = PW, kdf_cost = 10 })
        end
        assert(admin:mbk_import { shares = { dir .. "/mbk-1-1.share", dir .. "/mbk-1-2.share" },
            passwords = { PW[1], PW[2] } })
        admin:close()

        local go = dir .. "/go"
        local users = H.USER .. ":" .. H.USER_PASSWORD
        local admins = H.ADMIN .. ":" .. H.ADMIN_PASSWORD .. "," .. users
        local children = {}
        local function spawn(name, script, who, ...)
            local sf = dir .. "/" .. name .. ".lua"
            H.writefile(sf, script)
            local c = { name = name, log = dir .. "/" .. name .. ".log", rc = dir .. "/" .. name .. ".rc",
                out = dir .. "/" .. name .. ".out" }
            local args = { dev.path, dev.keyfile, c.log, go, dir, who, tostring(WORKERS), ... }
            for i, a in ipairs(args) do args[i] = H.q(a) end
            local rc, out = H.run("( SOFTCXI_CONC_STORE=" .. H.q(url) .. " " .. env()
                .. H.q(H.interpreter()) .. " " .. H.q(sf) .. " " .. table.concat(args, " ")
                .. " >" .. H.q(c.out) .. " 2>&1 </dev/null; echo $? >"
                .. H.q(c.rc) .. ".tmp; mv " .. H.q(c.rc) .. ".tmp " .. H.q(c.rc)
                .. " ) >/dev/null 2>&1 &")
            assert(rc == 0, out)
            children[#children + 1] = c
        end
        for w = 1, WORKERS do
            spawn("worker-" .. w, WORKER, users, "w" .. w, tostring(KEYS))
        end
        spawn("rotate", ROTATE, admins, tostring(KEYS), PW[1], PW[3])
        spawn("dbbackup", DBBACKUP, admins, tostring(KEYS))
        spawn("rewrap2", REWRAP, admins)
        -- all ready (opened, logged on), then go
        local function all(pred)
            for _ = 1, 30000 do
                local n = 0
                for _, c in ipairs(children) do if pred(c) then n = n + 1 end end
                if n == #children then return true end
                if have_hiredis then hiredis_mod.sleep(0.02) else os.execute("sleep 0.02") end
            end
            return false
        end
        local function ready(c) return (lines(c.log)[1] == "ready") or H.exists(c.rc) end
        assert(all(ready), "the children did not all get ready")
        H.writefile(go, "")
        assert(all(function(c) return H.exists(c.rc) end), "the children did not all finish")
        for _, c in ipairs(children) do
            local rc = tonumber(H.readfile(c.rc):match("%d+"))
            assert(rc == 0, c.name .. " failed (" .. rc .. "): " .. (H.readfile(c.out) or ""))
            local l = lines(c.log)
            assert.are.equal("complete", l[#l], c.name)
        end

        -- what the children confirmed
        local ext, int, backups, revoked, images, kcvs = {}, {}, {}, {}, {}, {}
        local rewrap2 = { runs = 0, conflicts = 0 }
        for _, c in ipairs(children) do
            for _, l in ipairs(lines(c.log)) do
                local id = l:match("^ext (%S+)$")
                if id then ext[#ext + 1] = id end
                local name = l:match("^int (%S+)$")
                if name then int[#int + 1] = name end
                local bname, bfile = l:match("^backup (%S+) (%S+)$")
                if bname then backups[#backups + 1] = { name = bname, file = bfile } end
                id = l:match("^revoked (%S+)$")
                if id then revoked[id] = true end
                local file, keys, names = l:match("^db (%S+) (%d+) ?(%S*)$")
                if file then images[#images + 1] = { file = file, keys = tonumber(keys), names = names } end
                local kcv = l:match("^mbk (%x+)$")
                if kcv then kcvs[#kcvs + 1] = kcv end
                local c2 = l:match("^rewrap2 %d+: .* conflicts (%d+)")
                if c2 then rewrap2.runs, rewrap2.conflicts = rewrap2.runs + 1, rewrap2.conflicts + c2 end
                if l:match("^rewrap ") then
                    io.write("\n  concurrency_spec: ", l)
                end
            end
        end
        assert.are.equal(WORKERS * KEYS, #ext)
        assert.are.equal(WORKERS * KEYS, #int)
        assert.are.equal(2, #kcvs)
        assert.is_true(#images >= 2, "database backups: " .. #images)

        local hsm = H.open(dev)
        assert.are.equal(kcvs[2], hsm:mbk_info().current)
        -- every confirmed external blob is stored, opens and signs; a revoked one is refused
        local store = assert(require("softcxi.store").open(url))
        assert.are.equal(#ext, store:count())
        local nrev = 0
        for _, id in ipairs(ext) do
            local blob = assert(store:get(id))
            local info = assert(softcxi.key_info(blob))
            assert.are.equal(id, "iot/" .. info.name)
            if revoked[id] then
                nrev = nrev + 1
                H.expect_err("EREVOKED", hsm:sign(blob, "ecdsa-sha256", "m"))
            else
                assert(hsm:sign(blob, "ecdsa-sha256", "m"), id)
            end
        end
        assert.are.equal(WORKERS * math.floor(KEYS / 4), nrev)
        -- the index and the listing agree with what was confirmed: find by group returns
        -- every id once and nothing else, find by name each id, scan every id
        local want = {}
        for _, id in ipairs(ext) do want[id] = true end
        local found, fset = find_all(store, { group = "iot" })
        assert.are.equal(#ext, #found)
        for _, id in ipairs(found) do assert(want[id], "find returned " .. id) end
        for _, id in ipairs(ext) do
            assert(fset[id], "find { group = 'iot' } misses " .. id)
            local byname = find_all(store, { name = id:sub(5) })
            assert.are.same({ id }, byname)
        end
        local scanned, nscanned = scan_all(store)
        assert.are.equal(#ext, nscanned)
        for _, id in ipairs(ext) do assert(scanned[id], "scan misses " .. id) end
        if kind == "file" then
            -- every blob file parses: none torn by the concurrent rewraps
            local rc, out = H.run("find " .. H.q(dir .. "/store/blobs") .. " -type f -name '*.blob'")
            assert(rc == 0, out)
            local files = 0
            for f in out:gmatch("[^\n]+") do
                assert(softcxi.key_info(assert(H.readfile(f))), "torn blob file " .. f)
                files = files + 1
            end
            assert.are.equal(#ext, files)
        end
        -- a rewrap now finds the blobs that were stored under an older MBK after the last
        -- rewrap passed them, and nothing else to do
        local r = assert(require("softcxi.rewrap").run { hsm = hsm, store = store })
        assert.are.equal(#ext, r.seen)
        assert.are.equal(0, r.conflicts)
        r = assert(require("softcxi.rewrap").run { hsm = hsm, store = store })
        assert.are.equal(#ext, r.current)
        assert.are.equal(#ext, store:count())
        if kind ~= "file" and kind ~= "SQLite" then
            -- the server outlives the test: leave nothing under this prefix / in this table
            for _, id in ipairs(ext) do assert(store:delete(id)) end
            assert.are.equal(0, store:count())
        end
        store:close()

        -- every confirmed internal key is listed and signs
        local listed = {}
        for _, k in ipairs(assert(hsm:key_list())) do listed[k.name] = true end
        for _, name in ipairs(int) do
            assert(listed[name], "internal key " .. name .. " is not listed")
            assert(hsm:sign(assert(hsm:key_open("iot", name)), "ecdsa-sha256", "m"), name)
        end
        hsm:close()

        -- the audit log verifies
        admin = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        assert(admin:audit_verify())
        admin:close()

        -- the second device: the same MBKs from the same shares
        admin = assert(softcxi.open { path = dev2.path, keyfile = dev2.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        assert(admin:logon_pass(H.USER, H.USER_PASSWORD))
        for s = 1, 3 do
            assert(admin:mbk_import { shares = { dir .. "/mbk-" .. s .. "-2.share",
                dir .. "/mbk-" .. s .. "-3.share" }, passwords = { PW[2], PW[3] } })
        end
        -- every key backup restores there and signs
        assert.are.equal(WORKERS * math.floor(KEYS / 3), #backups)
        for _, b in ipairs(backups) do
            local hd = assert(admin:key_restore(0, assert(H.readfile(b.file))))
            assert(admin:sign(hd, "ecdsa-sha256", "m"), b.name)
        end
        -- every database image restores there (replacing), with every internal key the
        -- workers had confirmed before it was made, and each of its keys signs
        for _, img in ipairs(images) do
            local n = assert(admin:restore_database(assert(H.readfile(img.file))))
            assert.are.equal(img.keys, n, img.file)
            local have = {}
            for _, k in ipairs(assert(admin:key_list())) do
                have[k.name] = true
                assert(admin:sign(assert(admin:key_open(k.group, k.name)), "ecdsa-sha256", "m"))
            end
            local count = 0
            for _ in pairs(have) do count = count + 1 end
            assert.are.equal(n, count, img.file)
            for name in img.names:gmatch("[^,]+") do
                assert(have[name], img.file .. " lacks " .. name .. ", confirmed before it was made")
            end
        end
        assert(admin:audit_verify())
        admin:close()
        io.write(string.format("\n  concurrency_spec (%s store): %d processes, %d external keys "
            .. "(%d revoked), %d internal, %d key backups, %d database images, 2 MBK rotations, "
            .. "%d racing rewraps (%d conflicts)\n",
            kind, #children, #ext, nrev, #int, #backups, #images, rewrap2.runs, rewrap2.conflicts))
    end)
    end
end)
