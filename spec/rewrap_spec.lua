-- softcxi.rewrap: a whole store moved to the current MBK after a rotation.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local provision = require "softcxi.provision"
local rewrap = require "softcxi.rewrap"
local store_mod = require "softcxi.store"

describe("rewrap", function()
    local dev, hsm, admin, root, store

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
        admin = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        root = H.tmpdir()
        store = assert(store_mod.open("file:" .. root .. "/store"))
    end)

    teardown(function()
        store:close()
        admin:close()
        H.destroy(dev)
        H.rm_rf(root)
    end)

    it("moves every blob to the new MBK, resumably, and then the old MBK can go", function()
        assert(provision.run { hsm = hsm, store = store, count = 60, batch = 25,
            name_format = "d%02d", template = { algo = "ec", group = "iot" } })
        local old_kcv = admin:mbk_info().current
        local shares, pws = {}, { "share-pw-one", "share-pw-two" }
        for i = 1, 2 do shares[i] = root .. "/s" .. i end
        assert(admin:mbk_generate { m = 2, shares = shares, passwords = pws, kdf_cost = 10 })
        assert(admin:mbk_import { shares = shares, passwords = pws })
        local new_kcv = admin:mbk_info().current

        -- someone replaces d07 after rewrap read it: compare-and-set leaves it alone
        local ids = {}
        for i = 1, 60 do ids[i] = ("iot/d%02d"):format(i) end
        local snapshot = assert(store:get_many(ids))
        local theirs = assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", group = "iot",
            name = "d07" }))
        assert(store:put("iot/d07", theirs, { overwrite = true }))
        local stale = setmetatable({
            get_many = function(_, want)
                local out = {}
                for _, id in ipairs(want) do out[id] = snapshot[id] end
                return out
            end,
        }, { __index = function(_, k)
            local v = store[k]
            if type(v) == "function" then return function(_, ...) return v(store, ...) end end
            return v
        end })
        local pages = 0
        local r = assert(rewrap.run { hsm = hsm, store = stale, page = 16,
            on_progress = function() pages = pages + 1 end })
        assert.are.equal(60, r.seen)
        assert.are.equal(59, r.rewrapped)
        assert.are.equal(1, r.conflicts)
        assert.is_true(pages >= 4)
        assert.are.equal(theirs, store:get("iot/d07"))
        for i = 1, 60 do
            local blob = assert(store:get(("iot/d%02d"):format(i)))
            assert.are.equal(new_kcv, softcxi.key_info(blob).kcv)
        end

        local again = assert(rewrap.run { hsm = hsm, store = store })
        assert.are.equal(0, again.rewrapped)
        assert.are.equal(60, again.current)

        assert(admin:mbk_retire(old_kcv))
        for i = 1, 60 do
            assert(hsm:sign(assert(store:get(("iot/d%02d"):format(i))), "ecdsa-sha256", "m"))
        end
    end)

    it("a blob of a retired MBK is skipped and counted, not fatal", function()
        local s2 = assert(store_mod.open("file:" .. root .. "/store2"))
        local other = H.new_device()
        local foreign = assert(other.hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec",
            group = "iot", name = "foreign" }))
        assert(s2:put(nil, foreign))
        assert(s2:put(nil, assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec",
            group = "iot", name = "mine" }))))
        local r = assert(rewrap.run { hsm = hsm, store = s2 })
        assert.are.equal(2, r.seen)
        assert.are.equal(1, r.skipped)
        assert.are.equal(1, r.current)
        s2:close()
        H.destroy(other)
    end)
    local CURL = os.getenv("SOFTCXI_TEST_REDIS_CLUSTER_URL")
    if CURL and CURL ~= "" then
        it("in a Redis Cluster: pages split by bucket and slot, compare-and-set per blob", function()
            local P = "rwc" .. tostring(os.time()) .. math.random(1000000) .. ":"
            local cs = assert(store_mod.open(CURL .. "?prefix=" .. P .. "&buckets=8"))
            assert(provision.run { hsm = hsm, store = cs, count = 45, batch = 20,
                name_format = "c%02d", template = { algo = "ec", group = "iot" } })
            local shares, pws = {}, { "share-pw-seven", "share-pw-eight" }
            for i = 1, 2 do shares[i] = root .. "/c" .. i end
            assert(admin:mbk_generate { m = 2, shares = shares, passwords = pws, kdf_cost = 10 })
            assert(admin:mbk_import { shares = shares, passwords = pws })
            local new_kcv = admin:mbk_info().current
            local theirs = assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", group = "iot",
                name = "c11" }))
            local replaced = false
            local stale = setmetatable({
                scan_blobs = function(_, cursor, count)
                    local ids, blobs, nxt, bad = cs:scan_blobs(cursor, count)
                    for i = 1, ids and #ids or 0 do
                        if ids[i] == "iot/c11" and not replaced then
                            assert(cs:put("iot/c11", theirs, { overwrite = true }))
                            replaced = true
                        end
                    end
                    return ids, blobs, nxt, bad
                end,
            }, { __index = function(_, k)
                local v = cs[k]
                if type(v) == "function" then return function(_, ...) return v(cs, ...) end end
                return v
            end })
            local r = assert(rewrap.run { hsm = hsm, store = stale, page = 10 })
            assert.are.equal(45, r.seen)
            assert.are.equal(44, r.rewrapped)
            assert.are.equal(1, r.conflicts)
            local again = assert(rewrap.run { hsm = hsm, store = cs, page = 10 })
            assert.are.equal(45, again.current)
            for i = 1, 45 do
                local id = ("iot/c%02d"):format(i)
                local blob = assert(cs:get(id))
                if i == 11 then assert.are.equal(theirs, blob) end
                assert.are.equal(new_kcv, softcxi.key_info(blob).kcv)
                assert(cs:delete(id))
            end
            cs:close()
        end)
    end
    local URL = os.getenv("SOFTCXI_TEST_REDIS_URL")
    if URL and URL ~= "" then
        it("in Redis takes the values scan read (scan_blobs) and compare-and-sets them "
           .. "(swap_later)", function()
            local P = "rw" .. tostring(os.time()) .. math.random(1000000) .. ":"
            local rs = assert(store_mod.open(URL .. "&prefix=" .. P))
            assert(provision.run { hsm = hsm, store = rs, count = 40, batch = 16,
                name_format = "r%02d", template = { algo = "ec", group = "iot" } })
            local shares, pws = {}, { "share-pw-three", "share-pw-four" }
            for i = 1, 2 do shares[i] = root .. "/r" .. i end
            assert(admin:mbk_generate { m = 2, shares = shares, passwords = pws, kdf_cost = 10 })
            assert(admin:mbk_import { shares = shares, passwords = pws })
            local new_kcv = admin:mbk_info().current
            -- r05 is replaced after the scan read it: its compare-and-set must fail alone
            local theirs = assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", group = "iot",
                name = "r05" }))
            local replaced = false
            local stale = setmetatable({
                scan_blobs = function(_, cursor, count)
                    local ids, blobs, nxt, bad = rs:scan_blobs(cursor, count)
                    for i = 1, ids and #ids or 0 do
                        -- blobs[i] is the blob of ids[i]
                        assert.are.equal(blobs[i], rs:get(ids[i]))
                        if ids[i] == "iot/r05" and not replaced then
                            assert(rs:put("iot/r05", theirs, { overwrite = true }))
                            replaced = true
                        end
                    end
                    return ids, blobs, nxt, bad
                end,
            }, { __index = function(_, k)
                local v = rs[k]
                if type(v) == "function" then return function(_, ...) return v(rs, ...) end end
                return v
            end })
            local r = assert(rewrap.run { hsm = hsm, store = stale, page = 7 })
            assert.are.equal(40, r.seen)
            assert.are.equal(39, r.rewrapped)
            assert.are.equal(1, r.conflicts)
            assert.are.equal(theirs, rs:get("iot/r05"))
            local n = 0
            local cursor
            repeat
                local ids, blobs, nxt = assert(rs:scan_blobs(cursor, 100))
                assert.are.equal(#ids, #blobs)
                for i, id in ipairs(ids) do
                    n = n + 1
                    if id ~= "iot/r05" then assert.are.equal(new_kcv, softcxi.key_info(blobs[i]).kcv) end
                end
                cursor = nxt
            until not cursor
            assert.are.equal(40, n)
            assert.are.equal(40, rs:count())
            assert.are.equal(40, #assert(rs:find({ group = "iot" }, nil, 100)))
            local cleanup = {}
            for i = 1, 40 do cleanup[i] = ("iot/r%02d"):format(i) end
            for _, id in ipairs(cleanup) do assert(rs:delete(id)) end
            rs:close()
        end)

        it("in Redis writes a page while it re-seals the next; a failed read settles the write "
           .. "in flight, and a re-run finishes", function()
            local P = "rw" .. tostring(os.time()) .. math.random(1000000) .. ":"
            local rs = assert(store_mod.open(URL .. "&prefix=" .. P))
            assert(provision.run { hsm = hsm, store = rs, count = 50, batch = 25,
                name_format = "q%02d", template = { algo = "ec", group = "iot" } })
            local shares, pws = {}, { "share-pw-five", "share-pw-six" }
            for i = 1, 2 do shares[i] = root .. "/q" .. i end
            assert(admin:mbk_generate { m = 2, shares = shares, passwords = pws, kdf_cost = 10 })
            assert(admin:mbk_import { shares = shares, passwords = pws })
            local new_kcv = admin:mbk_info().current
            -- the third page's read fails: the first page is written, the second is in flight
            local reads, sent, finished = 0, 0, 0
            local flaky = setmetatable({
                scan_blobs = function(_, cursor, count)
                    reads = reads + 1
                    if reads == 3 then return nil, "connection reset (test)", "ECONN" end
                    return rs:scan_blobs(cursor, count)
                end,
                swap_later = function(_, ids, olds, news, n)
                    local send, finish = rs:swap_later(ids, olds, news, n)
                    return function() sent = sent + 1 return send() end,
                        function() finished = finished + 1 return finish() end
                end,
            }, { __index = function(_, k)
                local v = rs[k]
                if type(v) == "function" then return function(_, ...) return v(rs, ...) end end
                return v
            end })
            local progress = {}
            local r, msg, code, rep = rewrap.run { hsm = hsm, store = flaky, page = 10,
                on_progress = function(seen, report)
                    progress[#progress + 1] = { seen, report.rewrapped }
                end }
            assert.is_nil(r)
            assert.are.equal("ECONN", code, msg)
            assert.truthy(msg:find("connection reset (test)", 1, true), msg)
            -- pages 1 and 2 were read: page 1 written before the failure, page 2 written on
            -- the way out; both reported and counted (a page holds up to 10 ids)
            assert.are.equal(2, #progress)
            assert.are.equal(progress[1][1], progress[1][2])
            assert.is_true(progress[1][1] > 0)
            assert.are.equal(rep.seen, progress[2][1])
            assert.are.equal(rep.seen, progress[2][2])
            assert.is_true(rep.seen > progress[1][1] and rep.seen <= 20)
            assert.are.equal(rep.seen, rep.rewrapped)
            assert.are.equal(1, sent)       -- page 2's write went out in its finish
            assert.are.equal(2, finished)
            local done = rep.seen
            -- the re-run finds those current and rewraps the rest; progress in whole pages
            progress = {}
            local again = assert(rewrap.run { hsm = hsm, store = rs, page = 10,
                on_progress = function(seen, report)
                    progress[#progress + 1] = { seen, report.rewrapped + report.current }
                end })
            assert.are.equal(50, again.seen)
            assert.are.equal(done, again.current)
            assert.are.equal(50 - done, again.rewrapped)
            assert.are.equal(0, again.conflicts)
            for i, p in ipairs(progress) do
                assert.are.equal(p[1], p[2])
                -- never backwards; SCAN may answer a page with no keys, and then the
                -- count stays where it was
                if i > 1 then assert.is_true(p[1] >= progress[i - 1][1]) end
            end
            assert.are.equal(50, progress[#progress][1])
            for i = 1, 50 do
                local id = ("iot/q%02d"):format(i)
                assert.are.equal(new_kcv, softcxi.key_info(assert(rs:get(id))).kcv)
                assert(rs:delete(id))
            end
            rs:close()
        end)
    end
end)
