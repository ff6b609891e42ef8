-- softcxi.provision: N keys from a template into a store, resumable.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local provision = require "softcxi.provision"
local store_mod = require "softcxi.store"

local TEMPLATE = { algo = "ec", curve = "P-256", group = "fleet", usage = { "sign", "verify" } }

describe("provision", function()
    local dev, hsm, root

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
        root = H.tmpdir()
    end)

    teardown(function()
        H.destroy(dev)
        H.rm_rf(root)
    end)

    local n_stores = 0
    local function new_store()
        n_stores = n_stores + 1
        return assert(store_mod.open("file:" .. root .. "/store" .. n_stores))
    end

    it("stores count keys named from the pattern, reporting progress per batch", function()
        local store = new_store()
        local seen = {}
        local r = assert(provision.run {
            hsm = hsm, store = store, template = TEMPLATE, count = 150, batch = 64,
            name_format = "dev-%05d", start = 10,
            on_progress = function(done, total) seen[#seen + 1] = done .. "/" .. total end,
        })
        assert.are.equal(150, r.generated)
        assert.are.equal(150, r.stored)
        assert.are.equal(0, r.skipped)
        assert.are.same({ "64/150", "128/150", "150/150" }, seen)
        assert.are.equal(150, store:count())
        local blob = assert(store:get("fleet/dev-00010"))
        assert.are.equal("dev-00010", softcxi.key_info(blob).name)
        assert.is_truthy(store:get("fleet/dev-00159"))
        assert.is_nil(store:get("fleet/dev-00160"))
        local sig = assert(hsm:sign(blob, "ecdsa-sha256", "m"))
        assert.is_true(hsm:verify(blob, "ecdsa-sha256", "m", sig))
        store:close()
    end)

    it("a re-run generates nothing and leaves the stored keys as they were", function()
        local store = new_store()
        assert(provision.run { hsm = hsm, store = store, template = TEMPLATE, count = 40,
            name_format = "k%d" })
        local before = store:get("fleet/k7")
        local r = assert(provision.run { hsm = hsm, store = store, template = TEMPLATE, count = 60,
            name_format = "k%d", batch = 25 })
        assert.are.equal(20, r.generated)
        assert.are.equal(40, r.skipped)
        assert.are.equal(60, store:count())
        assert.are.equal(before, store:get("fleet/k7"))
        store:close()
    end)

    it("a store that fails mid-run: the error says how many are stored; a re-run completes", function()
        local real = new_store()
        -- a store that breaks on its third put_many, after writing half the batch
        local calls = 0
        local flaky = setmetatable({}, { __index = function(_, k)
            if k == "put_many" then
                return function(_, items, opts)
                    calls = calls + 1
                    if calls == 3 then
                        local half = {}
                        for i = 1, math.floor(#items / 2) do half[i] = items[i] end
                        local n = assert(real:put_many(half, opts))
                        return nil, "connection lost", "ECONN", n
                    end
                    return real:put_many(items, opts)
                end
            end
            local v = real[k]
            if type(v) == "function" then return function(_, ...) return v(real, ...) end end
            return v
        end })
        local r, msg, code, partial = provision.run { hsm = hsm, store = flaky, template = TEMPLATE,
            count = 100, batch = 20, name_format = "d%03d" }
        assert.is_nil(r)
        assert.are.equal("ECONN", code)
        assert.are.equal(50, partial.stored)
        assert.matches("50 keys confirmed stored", msg, 1, true)
        assert.are.equal(50, real:count())
        r = assert(provision.run { hsm = hsm, store = real, template = TEMPLATE, count = 100,
            batch = 20, name_format = "d%03d" })
        assert.are.equal(50, r.generated)
        assert.are.equal(100, real:count())
        for i = 1, 100 do assert.is_truthy(real:get(("fleet/d%03d"):format(i)), i) end
        real:close()
    end)

    -- A store that forwards to real, with some methods replaced.
    local function wrap(real, over)
        return setmetatable({}, { __index = function(_, k)
            if over[k] then return over[k] end
            local v = real[k]
            if type(v) == "function" then return function(_, ...) return v(real, ...) end end
            return v
        end })
    end

    it("generates the next batch while it stores this one (hsm busy during put_many)", function()
        local real = new_store()
        local busy = {}
        local st = wrap(real, { put_many = function(_, items, o)
            -- another call on hsm raises exactly when a generation job runs on it
            local ok, err = pcall(hsm.device_info, hsm)
            busy[#busy + 1] = not ok and tostring(err):find("busy", 1, true) ~= nil
            return real:put_many(items, o)
        end })
        local r = assert(provision.run { hsm = hsm, store = st, template = TEMPLATE, count = 50,
            batch = 20, name_format = "ov%03d" })
        assert.are.equal(50, r.stored)
        -- batches 1 and 2 were stored while the next one was being generated; the last not
        assert.are.same({ true, true, false }, busy)
        assert(hsm:device_info()) -- and nothing is left running
        assert.are.equal(50, real:count())
        real:close()
    end)

    it("an on_progress that raises: the error comes out, and hsm is left free", function()
        local store = new_store()
        assert.has_error(function()
            provision.run { hsm = hsm, store = store, template = TEMPLATE, count = 60, batch = 20,
                name_format = "pr%03d", on_progress = function(done)
                    if done == 20 then error("stop here", 0) end
                end }
        end, "stop here")
        assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", name = "free-again" }))
        assert.are.equal(20, store:count())
        local r = assert(provision.run { hsm = hsm, store = store, template = TEMPLATE, count = 60,
            batch = 20, name_format = "pr%03d" })
        assert.are.equal(40, r.generated)
        assert.are.equal(20, r.skipped)
        store:close()
    end)

    it("a store that fails to read the next batch: the batch before is still stored", function()
        local real = new_store()
        -- keys 1-30 there already: the store is asked about batches 1, 2 and 3
        assert(provision.run { hsm = hsm, store = real, template = TEMPLATE, count = 30,
            name_format = "rd%03d" })
        local reads = 0
        local st = wrap(real, { get_many = function(_, ids)
            reads = reads + 1
            if reads == 3 then return nil, "read timeout", "ETIMEOUT" end
            return real:get_many(ids)
        end })
        local r, msg, code, partial = provision.run { hsm = hsm, store = st, template = TEMPLATE,
            count = 100, batch = 20, name_format = "rd%03d" }
        assert.is_nil(r)
        assert.are.equal("ETIMEOUT", code)
        assert.matches("reading batch at key 41", msg, 1, true)
        assert.are.equal(10, partial.stored)
        assert.are.equal(30, partial.skipped)
        assert.are.equal(40, real:count())
        assert(hsm:device_info())
        real:close()
    end)

    it("asks the store which ids it has until a batch finds none, and again after a skip", function()
        local real = new_store()
        -- keys 1-25 and 61-70 there already (another writer, or an earlier run with holes)
        assert(provision.run { hsm = hsm, store = real, template = TEMPLATE, count = 25,
            name_format = "ask%03d" })
        assert(provision.run { hsm = hsm, store = real, template = TEMPLATE, count = 10, start = 61,
            name_format = "ask%03d" })
        local asked, skips = {}, {}
        local st = wrap(real, {
            get_many = function(_, ids)
                asked[#asked + 1] = ids[1]
                return real:get_many(ids)
            end,
            put_many = function(_, items, o)
                local n, skipped, c, d = real:put_many(items, o)
                if n and skipped > 0 then skips[#skips + 1] = items[1].id .. ":" .. skipped end
                return n, skipped, c, d
            end,
        })
        local r = assert(provision.run { hsm = hsm, store = st, template = TEMPLATE, count = 160,
            batch = 20, name_format = "ask%03d" })
        -- batches 1 and 2 have stored ids; batch 3 none: batches 4, 5 and 6 are not asked
        -- about; the write of batch 4 finds 61-70 (batch 6 was started with it, two jobs
        -- running at once): batch 7 is asked about again, finds none, and batch 8 is not
        assert.are.same({ "fleet/ask001", "fleet/ask021", "fleet/ask041", "fleet/ask121" }, asked)
        assert.are.same({ "fleet/ask061:10" }, skips)
        assert.are.equal(160, real:count())
        assert.are.equal(125, r.stored)
        assert.are.equal(35, r.skipped)
        assert.are.equal(135, r.generated)   -- 61-70 made again, and dropped
        for i = 1, 160 do assert.is_truthy(real:get(("fleet/ask%03d"):format(i)), i) end
        assert.are.equal("ask061", softcxi.key_info(real:get("fleet/ask061")).name)
        real:close()
    end)

    it("generation refused for a later batch: the error names it, counts are exact", function()
        local store = new_store()
        local calls = 0
        local h = H.open(dev)
        h:set_policy(require("softcxi.policy").new { on_generate = function()
            calls = calls + 1
            if calls == 3 then return false, "enough" end
            return true
        end })
        local r, msg, code, partial = provision.run { hsm = h, store = store, template = TEMPLATE,
            count = 100, batch = 20, name_format = "pg%03d" }
        assert.is_nil(r)
        assert.are.equal("EPOLICY", code)
        assert.matches("generating batch at key 41", msg, 1, true)
        assert.are.equal(40, partial.stored)
        assert.are.equal(40, partial.generated)
        assert.are.equal(40, store:count())
        h:close()
        store:close()
    end)

    it("a job that fails at wait: later jobs are cancelled, earlier batches stored", function()
        local store = new_store()
        -- key 100's name has 256 bytes, one too many for a blob: the batch at key 81 fails
        -- when it is collected, while the batch at key 101 is being generated
        local fmt = string.rep("a", 253) .. "%d"
        local r, msg, code, partial = provision.run { hsm = hsm, store = store, template = TEMPLATE,
            count = 160, batch = 20, name_format = fmt }
        assert.is_nil(r)
        assert.are.equal("EINVAL", code)
        assert.matches("generating batch at key 81", msg, 1, true)
        assert.are.equal(80, partial.stored)
        assert.are.equal(80, partial.generated)
        assert.are.equal(80, store:count())
        assert.is_truthy(store:get("fleet/" .. fmt:format(80)))
        assert.is_nil(store:get("fleet/" .. fmt:format(81)))
        assert(hsm:device_info()) -- no job is left running on hsm
        store:close()
    end)

    it("a job whose wait raises is still cancelled when run ends", function()
        local store = new_store()
        local started, cancelled = 0, 0
        -- a session whose jobs are wrapped: the second one's wait raises
        local wrapped = setmetatable({}, { __index = function(_, k)
            if k == "bulk_generate_start" then
                return function(_, ...)
                    local job, err, c = hsm:bulk_generate_start(...)
                    if not job then return nil, err, c end
                    started = started + 1
                    local n = started
                    return {
                        ready = function() return job:ready() end,
                        wait = function()
                            if n == 2 then error("wait broke", 0) end
                            return job:wait()
                        end,
                        cancel = function()
                            cancelled = cancelled + 1
                            return job:cancel()
                        end,
                    }
                end
            end
            local v = hsm[k]
            if type(v) == "function" then return function(_, ...) return v(hsm, ...) end end
            return v
        end })
        assert.has_error(function()
            provision.run { hsm = wrapped, store = store, template = TEMPLATE, count = 100,
                batch = 20, name_format = "wr%03d" }
        end, "wait broke")
        -- jobs 2 (its wait raised) and 3 (running beside it) were cancelled by run itself
        assert.are.equal(2, cancelled)
        assert(hsm:device_info())
        assert.are.equal(20, store:count())
        store:close()
    end)

    it("a session without bulk_generate_start, stored in pieces: every key once", function()
        local store = new_store()
        -- the session as an older binding has it: bulk_generate only
        local plain = setmetatable({}, { __index = function(_, k)
            if k == "bulk_generate_start" then return nil end
            local v = hsm[k]
            if type(v) == "function" then return function(_, ...) return v(hsm, ...) end end
            return v
        end })
        -- a run; seen: per batch "done/total:<report[field]>"
        local function run(field)
            local seen = {}
            local r = assert(provision.run { hsm = plain, store = store, template = TEMPLATE,
                count = 95, batch = 40, piece = 15, name_format = "pc%03d",
                on_progress = function(done, total, rep)
                    seen[#seen + 1] = done .. "/" .. total .. ":" .. rep[field]
                end })
            return r, seen
        end
        local r, seen = run("stored")
        assert.are.equal(95, r.generated)
        assert.are.equal(95, r.stored)
        assert.are.same({ "40/95:40", "80/95:80", "95/95:95" }, seen)
        assert.are.equal(95, store:count())
        -- a re-run: the stored ids count as skipped once their batch is done
        r, seen = run("skipped")
        assert.are.equal(0, r.generated)
        assert.are.equal(95, r.skipped)
        assert.are.same({ "40/95:40", "80/95:80", "95/95:95" }, seen)
        store:close()
    end)

    it("misuse raises, a bad template is EINVAL", function()
        local store = new_store()
        assert.has_error(function() provision.run { hsm = hsm, store = store, count = 1 } end)
        assert.has_error(function()
            provision.run { hsm = hsm, store = store, template = TEMPLATE, count = 1,
                name_format = "x%d", bogus = true }
        end)
        local _, _, code = provision.run { hsm = hsm, store = store, count = 3, name_format = "x%d",
            template = { algo = "ec", curve = "P-7" } }
        assert.are.equal("EINVAL", code)
        assert.are.equal(0, store:count())
        store:close()
    end)
end)
