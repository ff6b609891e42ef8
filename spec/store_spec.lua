-- The key store contract, one suite run against every store URL:
--   always a fresh file:<tmpdir> and a fresh sqlite:<tmpdir>/contract.db;
--   SOFTCXI_TEST_REDIS_URL, SOFTCXI_TEST_REDIS_UNIX_URL (the same server over its Unix
--   socket), SOFTCXI_TEST_REDIS_CLUSTER_URL and SOFTCXI_TEST_PG_URL when set.
-- A Redis store is shared between tests and runs, so every id and group
-- here carries a per-run random tag and every test deletes what it put.
-- File-store-specific faults (torn files, fan-out, concurrent writers,
-- reindex) follow in "file store".

local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local store = require "softcxi.store"
local sys = require "softcxi.sys"

-- a per-run tag: ids from an earlier (failed) run never collide
local function run_tag()
    local f = io.open("/dev/urandom", "rb")
    local r = f and f:read(6) or tostring(os.time())
    if f then f:close() end
    return H.hex(r)
end
local RUN = run_tag()
local G1, G2 = "g" .. RUN .. "-a", "g" .. RUN .. "-b"
local N = 200

local root = H.tmpdir()
local urls = { "file:" .. root .. "/contract", "sqlite:" .. root .. "/contract.db" }
for _, var in ipairs { "SOFTCXI_TEST_REDIS_URL", "SOFTCXI_TEST_REDIS_UNIX_URL",
                       "SOFTCXI_TEST_REDIS_CLUSTER_URL", "SOFTCXI_TEST_PG_URL" } do
    local u = os.getenv(var)
    if u and u ~= "" then urls[#urls + 1] = u end
end

-- ~200 real blobs, made once: groups G1/G2 alternate, specifier i % 4,
-- every 10th key AES (find by algo), names unique to this run.
local dev, blobs, infos
local function make_blobs()
    if blobs then return end
    dev = H.new_device()
    blobs, infos = {}, {}
    for i = 1, N do
        local t = { algo = "ec", curve = "P-256", name = "n" .. RUN .. "-" .. i,
                    group = i % 2 == 1 and G1 or G2, specifier = i % 4 }
        if i % 10 == 0 then t = { algo = "aes", name = t.name, group = t.group, specifier = t.specifier } end
        blobs[i] = H.gen(dev.hsm, t)
        infos[i] = assert(H.softcxi.key_info(blobs[i]))
    end
end

local function default_id(i)
    local info = infos[i]
    return info.group .. "/" .. info.name .. "/" .. info.specifier
end

--- All pages of find(filter) with the given limit; asserts page sizes.
local function find_all(s, filter, limit)
    local out, cursor, pages = {}, nil, 0
    repeat
        local ids, nxt, code = s:find(filter, cursor, limit)
        assert(ids, tostring(nxt) .. " " .. tostring(code))
        assert(#ids <= limit, "page larger than limit")
        for _, id in ipairs(ids) do out[#out + 1] = id end
        cursor = nxt
        pages = pages + 1
        assert(pages < 10000, "find does not end")
    until not cursor
    return out, pages
end

local function set_of(list)
    local s = {}
    for _, v in ipairs(list) do s[v] = (s[v] or 0) + 1 end
    return s
end

local count_markers -- defined with the file store tests, used by both

local function ours(list)
    local out = {}
    for _, id in ipairs(list) do
        if id:find(RUN, 1, true) then out[#out + 1] = id end
    end
    return out
end

describe("store contract", function()
    lazy_setup(make_blobs)

    lazy_teardown(function()
        H.destroy(dev)
        H.rm_rf(root)
    end)

    for _, url in ipairs(urls) do
        local scheme = url:match("^([%w%-%+]+):")

        describe("store " .. scheme, function()
            local s, put_ids

            before_each(function()
                local msg, code
                s, msg, code = store.open(url)
                assert(s, "store.open(" .. url .. "): " .. tostring(msg) .. " " .. tostring(code))
                put_ids = {}
            end)

            -- leave the store as found: a shared Redis outlives the test
            after_each(function()
                for id in pairs(put_ids) do s:delete(id) end
                s:close()
            end)

            local function put(id, blob, opts)
                local ok, msg, code = s:put(id, blob, opts)
                if ok then put_ids[id or assert(store.id_of(blob))] = true end
                return ok, msg, code
            end

            local function put_many(items, opts)
                for _, it in ipairs(items) do put_ids[it.id or assert(store.id_of(it.blob))] = true end
                return s:put_many(items, opts)
            end

            local function all_items()
                local items = {}
                for i = 1, N do items[i] = { blob = blobs[i] } end
                return items
            end

            it("stores and returns a blob byte for byte", function()
                local id = "rt-" .. RUN
                assert.is_true(put(id, blobs[1]))
                assert.are.equal(blobs[1], s:get(id))
            end)

            it("defaults the id to group/name[/specifier]", function()
                assert.is_true(put(nil, blobs[3]))
                assert.are.equal(blobs[3], s:get(default_id(3)))
                local nospec = H.gen(dev.hsm, { algo = "ec", curve = "P-256", name = "nospec" .. RUN,
                                                group = G1 })
                assert.is_true(put(nil, nospec))
                assert.are.equal(nospec, s:get(G1 .. "/nospec" .. RUN))
                assert.are.equal(G1 .. "/nospec" .. RUN, store.id_of(nospec))
            end)

            it("refuses to replace an existing id without overwrite (EEXIST)", function()
                local id = "dup-" .. RUN
                assert.is_true(put(id, blobs[1]))
                local msg = H.expect_err("EEXIST", s:put(id, blobs[2]))
                assert.truthy(msg:find(id, 1, true), msg)
                assert.are.equal(blobs[1], s:get(id))
            end)

            it("replaces with overwrite", function()
                local id = "ow-" .. RUN
                assert.is_true(put(id, blobs[1]))
                assert.is_true(put(id, blobs[2], { overwrite = true }))
                assert.are.equal(blobs[2], s:get(id))
                assert.is_true(put(id, blobs[2], { overwrite = true })) -- same bytes again
                assert.are.equal(blobs[2], s:get(id))
                assert.is_true(put("ow-new-" .. RUN, blobs[4], { overwrite = true })) -- creates too
                assert.are.equal(blobs[4], s:get("ow-new-" .. RUN))
            end)

            it("compare-and-sets with if_match", function()
                local id = "cas-" .. RUN
                assert.is_true(put(id, blobs[1]))
                assert.is_true(put(id, blobs[2], { if_match = blobs[1] }))
                assert.are.equal(blobs[2], s:get(id))
                H.expect_err("ECONFLICT", s:put(id, blobs[3], { if_match = blobs[1] }))
                assert.are.equal(blobs[2], s:get(id))
                H.expect_err("ENOTFOUND", s:put("cas-none-" .. RUN, blobs[3], { if_match = blobs[1] }))
                H.expect_err("ENOTFOUND", s:get("cas-none-" .. RUN))
            end)

            it("refuses what is not a well-formed blob (EFORMAT) and stores nothing", function()
                local id = "bad-" .. RUN
                H.expect_err("EFORMAT", s:put(id, "not a blob"))
                H.expect_err("EFORMAT", s:put(id, blobs[1]:sub(1, -2)))
                H.expect_err("EFORMAT", s:put(id, blobs[1] .. "x"))
                H.expect_err("EFORMAT", s:put(id, ""))
                H.expect_err("ENOTFOUND", s:get(id))
                local bad = { { id = id, blob = blobs[1] }, { id = id .. "2", blob = "x" } }
                H.expect_err("EFORMAT", s:put_many(bad))
                H.expect_err("ENOTFOUND", s:get(id))
                H.expect_err("EFORMAT", s:put(nil, "junk"))
            end)

            it("raises on misuse", function()
                assert.has_error(function() s:put("x", 42) end)
                assert.has_error(function() s:put("x", blobs[1], { bogus = true }) end)
                assert.has_error(function() s:get(nil) end)
                assert.has_error(function() s:find("group") end)
            end)

            it("reports a missing id as ENOTFOUND and deletes", function()
                local id = "del-" .. RUN
                local msg = H.expect_err("ENOTFOUND", s:get(id))
                assert.truthy(msg:find(id, 1, true), msg)
                assert.is_true(put(id, blobs[1]))
                assert.is_true(s:delete(id))
                H.expect_err("ENOTFOUND", s:get(id))
                H.expect_err("ENOTFOUND", s:delete(id))
                assert.is_true(put(id, blobs[1])) -- the id is free again
                assert.are.equal(blobs[1], s:get(id))
            end)

            it("puts 200 blobs in one put_many and reads them back with get_many", function()
                local before = assert(s:count())
                assert.are.equal(N, put_many(all_items()))
                assert.are.equal(before + N, s:count())
                local ids = {}
                for i = 1, N do ids[i] = default_id(i) end
                ids[#ids + 1] = "missing-" .. RUN
                local got = assert(s:get_many(ids))
                for i = 1, N do assert.are.equal(blobs[i], got[default_id(i)]) end
                assert.is_nil(got["missing-" .. RUN])
            end)

            it("put_many: an existing id fails alone (EEXIST), skip_existing skips, overwrite replaces",
               function()
                local function id(i) return "pm-" .. RUN .. "-" .. i end
                assert.is_true(put(id(2), blobs[1]))
                local items = {}
                for i = 1, 3 do items[i] = { id = id(i), blob = blobs[i + 1] } end
                local r = H.pack(put_many(items))
                assert.is_nil(r[1])
                assert.are.equal("EEXIST", r[3], r[2])
                assert.truthy(r[2]:find(id(2), 1, true), r[2])
                assert.are.equal(2, r[4]) -- the other two are stored
                assert.are.equal(blobs[1], s:get(id(2)))
                assert.are.equal(blobs[2], s:get(id(1)))
                assert.are.equal(blobs[4], s:get(id(3)))
                items[4] = { id = id(4), blob = blobs[5] }
                local stored, skipped = put_many(items, { skip_existing = true })
                assert.are.equal(1, stored)
                assert.are.equal(3, skipped)
                assert.are.equal(blobs[1], s:get(id(2)))
                assert.are.equal(4, put_many(items, { overwrite = true }))
                for i = 1, 4 do assert.are.equal(items[i].blob, s:get(id(i))) end
            end)

            it("put_many compare-and-sets the items that carry if_match", function()
                local function id(i) return "pmcas-" .. RUN .. "-" .. i end
                assert.is_true(put(id(1), blobs[1]))
                assert.is_true(put(id(2), blobs[2]))
                local r = H.pack(put_many({
                    { id = id(1), blob = blobs[5], if_match = blobs[1] },
                    { id = id(2), blob = blobs[6], if_match = blobs[9] },
                    { id = id(3), blob = blobs[7], if_match = blobs[1] },
                }))
                assert.is_nil(r[1])
                assert.are.equal("ECONFLICT", r[3], r[2]) -- the first failure; id(3) failed too
                assert.are.equal(1, r[4])
                for _, p in ipairs { { 1, 5 }, { 2, 2 } } do
                    assert.are.equal(blobs[p[2]], s:get(id(p[1])))
                end
                H.expect_err("ENOTFOUND", s:get(id(3)))
            end)

            it("put_many reports each chunk as it is stored", function()
                local items, calls = {}, {}
                for i = 1, 5 do items[i] = { id = "chunk-" .. RUN .. "-" .. i, blob = blobs[i] } end
                assert.are.equal(5, put_many(items, { chunk = 2, on_chunk = function(done, total)
                    calls[#calls + 1] = done .. "/" .. total
                end }))
                assert.are.same({ "2/5", "4/5", "5/5" }, calls)
            end)

            it("scans in pages of 17, visiting every id exactly once", function()
                assert.are.equal(N, put_many(all_items()))
                local seen, cursor, pages = {}, nil, 0
                repeat
                    local ids, nxt = s:scan(cursor, 17)
                    assert.is_table(ids, tostring(nxt))
                    assert.is_true(#ids <= 17 * 2) -- a backend may round a page up, never unbounded
                    for _, id in ipairs(ours(ids)) do seen[id] = (seen[id] or 0) + 1 end
                    cursor, pages = nxt, pages + 1
                until not cursor or pages > 10000
                assert.is_nil(cursor)
                for i = 1, N do assert.are.equal(1, seen[default_id(i)], default_id(i)) end
                local n = 0
                for _ in pairs(seen) do n = n + 1 end
                assert.are.equal(N, n)
            end)

            -- these tests share one fill of the store (each fill and cleanup of
            -- 200 durable writes costs real time); the last one changes it
            describe("find", function()
                local filled

                lazy_setup(function()
                    filled = assert(store.open(url))
                    assert.are.equal(N, filled:put_many(all_items()))
                end)

                lazy_teardown(function()
                    for i = 1, N do filled:delete(default_id(i)) end
                    filled:close()
                end)

                local function expect(filter, pred, limit)
                    local got, pages = find_all(s, filter, limit or 1000)
                    local want = {}
                    for i = 1, N do if pred(i) then want[default_id(i)] = 1 end end
                    assert.are.same(want, set_of(ours(got)))
                    return pages
                end

                it("by group", function()
                    expect({ group = G1 }, function(i) return i % 2 == 1 end)
                    expect({ group = G2 }, function(i) return i % 2 == 0 end)
                    assert.are.same({}, find_all(s, { group = "none-" .. RUN }, 10))
                end)

                it("by name", function()
                    expect({ name = "n" .. RUN .. "-7" }, function(i) return i == 7 end)
                end)

                it("by group and specifier", function()
                    expect({ group = G2, specifier = 2 }, function(i) return i % 2 == 0 and i % 4 == 2 end)
                    expect({ group = G1, specifier = "3" }, function(i) return i % 2 == 1 and i % 4 == 3 end)
                end)

                it("by a field that is not indexed: EINVAL", function()
                    H.expect_err("EINVAL", s:find({ label = "x" }))
                end)

                it("by algo", function()
                    local got = ours(find_all(s, { algo = "aes" }, 1000))
                    local want = {}
                    for i = 10, N, 10 do want[default_id(i)] = 1 end
                    assert.are.same(want, set_of(got))
                    local ec = ours(find_all(s, { algo = "ec", group = G1 }, 1000))
                    assert.are.equal(N / 2, #ec) -- every 10th key is even: G1 is all EC
                end)

                it("in pages no larger than the limit, each id once", function()
                    local pages = expect({ group = G1 }, function(i) return i % 2 == 1 end, 7)
                    assert.is_true(pages >= 100 / 7, "pages: " .. pages)
                end)

                it("skips deleted and overwritten blobs (runs last: it changes the fill)", function()
                    assert.is_true(s:delete(default_id(1)))
                    assert.is_true(s:put(default_id(3), blobs[2], { overwrite = true }))
                    local got = set_of(ours(find_all(s, { group = G1 }, 1000)))
                    assert.is_nil(got[default_id(1)])
                    assert.is_nil(got[default_id(3)]) -- now holds a G2 blob
                    assert.are.equal(1, got[default_id(5)])
                    got = set_of(ours(find_all(s, { group = G2 }, 1000)))
                    assert.are.equal(1, got[default_id(3)])
                end)
            end)

            it("keeps ids with '/', spaces and unicode apart", function()
                local ids = { "a/b/c " .. RUN, "spaces in id " .. RUN, "ünïcødé/ключ/鍵 " .. RUN,
                              ".dot " .. RUN, "pct%2F " .. RUN, "tab\tnl\n " .. RUN }
                for i, id in ipairs(ids) do assert.is_true(put(id, blobs[i])) end
                for i, id in ipairs(ids) do assert.are.equal(blobs[i], s:get(id)) end
                H.expect_err("ENOTFOUND", s:get("a/b/c"))
                local seen, cursor = {}, nil
                repeat
                    local page
                    page, cursor = s:scan(cursor, 17)
                    for _, id in ipairs(page) do seen[id] = true end
                until not cursor
                for _, id in ipairs(ids) do assert.is_true(seen[id], id) end
                local found = set_of(find_all(s, { name = infos[3].name }, 10))
                assert.are.equal(1, found[ids[3]])
            end)
        end)
    end
end)

-- ---- the file store itself ---------------------------------------------------

-- files under index/ other than locks: the index markers
count_markers = function(ks)
    local rc, out = H.run("find " .. H.q(ks .. "/index") .. " -type f ! -name '*.lock' | wc -l")
    assert(rc == 0, out)
    return tonumber(out)
end

local function items_of(first, last)
    local items = {}
    for i = first, last do items[#items + 1] = { blob = blobs[i] } end
    return items
end

describe("file store", function()
    local dir, s

    lazy_setup(make_blobs)

    before_each(function()
        dir = H.tmpdir()
        s = assert(store.open("file:" .. dir .. "/ks"))
    end)

    after_each(function()
        if s then s:close() end
        H.rm_rf(dir)
    end)

    local function path_of(id)
        return s:_loc(id).path
    end

    it("opens by file:DIR and file:///DIR, refuses a directory that is not a store", function()
        local s2 = assert(store.open("file://" .. dir .. "/ks"))
        s2:close()
        H.expect_err("EINVAL", store.open("file://relative/ks"))
        H.expect_err("EINVAL", store.open("file:"))
        H.mkdir_p(dir .. "/other")
        H.writefile(dir .. "/other/notes.txt", "mine")
        H.expect_err("EINVAL", store.open("file:" .. dir .. "/other"))
        H.expect_err("EINVAL", store.open("file:" .. dir .. "/other/notes.txt"))
        assert.has_error(function() store.open("file:" .. dir .. "/ks", { bogus = 1 }) end)
    end)

    it("processes opening one new directory at once all open it as a store", function()
        -- what one process's set-up has made (blobs/, index/, the marker's temp
        -- file, the marker placed after this one read it) must not look like
        -- foreign content to another; 5 rounds of 8 processes
        local env = "LUA_PATH=" .. H.q(os.getenv("LUA_PATH") or package.path) .. " LUA_CPATH="
            .. H.q(os.getenv("LUA_CPATH") or package.cpath) .. " "
        -- each child spins until the go file appears (bounded), then opens
        local child = dir .. "/open.lua"
        H.writefile(child, "for _ = 1, 1e6 do local f = io.open(arg[1]); if f then f:close(); break end end\n"
            .. "local s, err = require('softcxi.store').open('file:' .. arg[2])\n"
            .. "if not s then io.stderr:write(err, '\\n'); os.exit(1) end\n"
            .. "s:close()\n")
        local n = 8
        for round = 1, 5 do
            local d, go, out = dir .. "/fresh-" .. round, dir .. "/go-" .. round, dir .. "/r" .. round
            for i = 1, n do
                local rc, msg = H.run("( " .. env .. H.q(H.interpreter()) .. " " .. H.q(child) .. " "
                    .. H.q(go) .. " " .. H.q(d) .. " >" .. H.q(out .. "-" .. i .. ".out")
                    .. " 2>&1; echo $? >" .. H.q(out .. "-" .. i .. ".tmp") .. "; mv "
                    .. H.q(out .. "-" .. i .. ".tmp") .. " " .. H.q(out .. "-" .. i .. ".rc")
                    .. " ) >/dev/null 2>&1 &")
                assert(rc == 0, msg)
            end
            H.writefile(go, "")
            for i = 1, n do
                local rcfile = out .. "-" .. i .. ".rc"
                for _ = 1, 3000 do
                    if H.readfile(rcfile) then break end
                    os.execute("sleep 0.02")
                end
                assert.are.equal("0", (H.readfile(rcfile) or "no exit status"):match("%S+"),
                    H.readfile(out .. "-" .. i .. ".out"))
            end
            local s2 = assert(store.open("file:" .. d))
            assert.is_true(s2:put("after", blobs[1]))
            assert.are.equal(blobs[1], (s2:get("after")))
            s2:close()
        end
    end)

    it("a torn blob file: get names the id and the path (EFORMAT), other ids unaffected", function()
        assert.is_true(s:put("one", blobs[1]))
        assert.is_true(s:put("two", blobs[2]))
        local p = path_of("one")
        H.writefile(p, blobs[1]:sub(1, 60))
        local msg = H.expect_err("EFORMAT", s:get("one"))
        assert.truthy(msg:find("'one'", 1, true), msg)
        assert.truthy(msg:find(p, 1, true), msg)
        assert.truthy(msg:find("^store%.file%.get: "), msg)
        assert.are.equal(blobs[2], s:get("two"))
        local got, errs = s:get_many({ "one", "two" })
        assert.are.equal(blobs[2], got.two)
        assert.is_nil(got.one)
        assert.are.equal("EFORMAT", errs.one[2])
        assert.are.same({}, (s:find({ name = infos[1].name }, nil, 10)))
        H.writefile(p, "")
        H.expect_err("EFORMAT", s:get("one"))
        assert.are.equal(2, s:count())
        local n, skipped = s:reindex()
        assert.are.equal(1, n)
        assert.are.equal(1, skipped)
        -- a torn blob is replaced by overwrite, never matched by if_match
        H.expect_err("ECONFLICT", s:put("one", blobs[3], { if_match = blobs[1] }))
        assert.is_true(s:put("one", blobs[1], { overwrite = true }))
        assert.are.equal(blobs[1], s:get("one"))
    end)

    it("a put that crashed halfway leaves no torn blob: temp files are ignored", function()
        assert.is_true(s:put("kept", blobs[1]))
        local p = path_of("half")
        local pdir = p:match("^(.*)/[^/]*$")
        H.mkdir_p(pdir)
        -- what a writer killed before its rename leaves behind
        H.writefile(pdir .. "/.half.blob.4242.1.tmp", blobs[2]:sub(1, 50))
        H.writefile(path_of("kept"):match("^(.*)/") .. "/.kept.blob.4242.2.tmp", blobs[3])
        -- and a writer killed after its markers were durable, before the rename
        for _, m in ipairs(s:_markers(s:_loc("half"), "half", infos[2])) do
            H.mkdir_p(m[1]:match("^(.*)/"))
            H.writefile(m[1], "")
        end
        assert.are.same({}, (s:find({ group = infos[2].group, name = infos[2].name }, nil, 100)))
        assert.are.same({}, (s:find({ name = infos[2].name }, nil, 100)))
        H.expect_err("ENOTFOUND", s:get("half"))
        assert.are.equal(1, s:count())
        assert.are.same({ "kept" }, (s:scan(nil, 100)))
        assert.are.same({ "kept" }, (s:find({}, nil, 100)))
        assert.are.equal(blobs[1], s:get("kept"))
        assert.is_true(s:put("half", blobs[2])) -- neither blocks the id
        assert.are.equal(blobs[2], s:get("half"))
        assert.are.same({ "half" }, (s:find({ name = infos[2].name }, nil, 100)))
    end)

    it("keeps ids too long for a file name", function()
        local long = ("ключ/"):rep(60) .. RUN
        assert.is_true(s:put(long, blobs[1]))
        assert.are.equal(blobs[1], s:get(long))
        local name = path_of(long):match("[^/]*$")
        assert.is_true(#name < 255, name)
        assert.are.same({ long }, (s:scan(nil, 10)))
        assert.are.same({ long }, (s:find({ name = infos[1].name }, nil, 10)))
        assert.are.same({ long }, (s:find({ group = infos[1].group }, nil, 10)))
        H.expect_err("EEXIST", s:put(long, blobs[2]))
        assert.is_true(s:delete(long))
        assert.are.equal(0, s:count())
        assert.are.equal(0, count_markers(dir .. "/ks"))
    end)

    it("delete and overwrite remove the index markers they make stale", function()
        assert.are.equal(20, s:put_many(items_of(1, 20)))
        assert.are.equal(40, count_markers(dir .. "/ks"))
        assert.is_true(s:delete(default_id(1)))
        assert.are.equal(38, count_markers(dir .. "/ks"))
        -- default_id(3) now holds blob 2 (another group, another name)
        assert.is_true(s:put(default_id(3), blobs[2], { overwrite = true }))
        assert.are.equal(38, count_markers(dir .. "/ks"))
        assert.are.same({ [default_id(2)] = 1, [default_id(3)] = 1 },
            set_of(find_all(s, { name = infos[2].name }, 10)))
        assert.are.same({}, (find_all(s, { name = infos[3].name }, 10)))
        -- an item that fails (the id exists, with another blob) leaves no marker
        local more = items_of(21, 30)
        more[#more + 1] = { id = default_id(5), blob = blobs[6] }
        more[#more + 1] = { blob = blobs[31] }
        local r = H.pack(s:put_many(more))
        assert.are.equal("EEXIST", r[3])
        assert.are.equal(11, r[4])
        assert.truthy(r[2]:find(default_id(5), 1, true), r[2])
        assert.are.equal(blobs[31], s:get(default_id(31)))
        assert.are.equal(60, count_markers(dir .. "/ks"))
        assert.are.same({ default_id(6) }, (find_all(s, { name = infos[6].name }, 10)))
    end)

    it("markers are links to their blob: no copy of a replaced or deleted blob stays behind", function()
        -- every regular file under the store: its bytes
        local function contents()
            local rc, out = H.run("find " .. H.q(dir .. "/ks") .. " -type f ! -name '*.lock'"
                .. " ! -name softcxi-store")
            assert(rc == 0, out)
            local all = {}
            for path in out:gmatch("[^\n]+") do all[#all + 1] = assert(sys.read(path)) end
            return all
        end
        local function copies(blob)
            local n = 0
            for _, data in ipairs(contents()) do
                if data:find(blob, 1, true) then n = n + 1 end
            end
            return n
        end
        -- two blobs with the same attributes (same markers), as a rewrap makes
        local t = { algo = "ec", curve = "P-256", name = "same-" .. RUN, group = G1 }
        local d = H.new_device()
        finally(function() H.destroy(d) end)
        local a, b = H.gen(d.hsm, t), H.gen(d.hsm, t)
        local long = ("ключ/"):rep(60) .. RUN
        assert.are.equal(2, s:put_many({ { id = "k", blob = a }, { id = long, blob = a } }))
        -- the blob files and their 2 markers each: one inode each, 3 names
        assert.are.equal(6, copies(a))
        assert.are.equal(4, count_markers(dir .. "/ks"))
        assert.are.equal(2, s:put_many({ { id = "k", blob = b, if_match = a },
                                         { id = long, blob = b, if_match = a } }))
        assert.are.equal(0, copies(a))
        assert.are.equal(6, copies(b))
        assert.are.same({ k = 1, [long] = 1 }, set_of(find_all(s, { name = t.name }, 10)))
        assert.are.equal(2, #find_all(s, { group = G1 }, 10))
        -- a reindex links the markers to the blob files again
        assert.are.same({ 2, 0 }, { s:reindex() })
        assert.are.equal(6, copies(b))
        assert.are.same({ k = 1, [long] = 1 }, set_of(find_all(s, { name = t.name }, 10)))
        assert.is_true(s:delete("k"))
        assert.is_true(s:delete(long))
        assert.are.equal(0, copies(b))
        assert.are.equal(0, count_markers(dir .. "/ks"))
    end)

    it("finds by name among many names that share an index directory", function()
        -- 600 keys: every name-index directory (256) holds two or three
        for _, it in ipairs(items_of(1, N)) do assert(s:put(nil, it.blob)) end
        for i = 1, N, 37 do
            assert.are.same({ default_id(i) }, (find_all(s, { name = infos[i].name }, 10)))
        end
        assert.are.same({}, (find_all(s, { name = "n" .. RUN .. "-" }, 10)))
    end)

    it("a find cursor stays valid across a reindex", function()
        assert.are.equal(20, s:put_many(items_of(1, 20)))
        local page, cursor = s:find({ group = G1 }, nil, 3)
        assert.are.equal(3, #page)
        assert.is_string(cursor)
        assert.are.equal(20, s:reindex())
        local all = {}
        for _, id in ipairs(page) do all[#all + 1] = id end
        repeat
            page, cursor = s:find({ group = G1 }, cursor, 3)
            for _, id in ipairs(page) do all[#all + 1] = id end
        until not cursor
        local seen, n = set_of(all), 0
        for _, c in pairs(seen) do assert.are.equal(1, c); n = n + 1 end
        assert.are.equal(10, n)
        assert.has_error(function() s:find({ group = G1 }, 42) end)
        H.expect_err("EINVAL", s:find({ group = G1 }, "not/a/cursor/of/this/shape", 3))
    end)

    it("raises on a closed store", function()
        s:close()
        assert.has_error(function() s:get("x") end, "store.file.get: the store is closed")
        assert.is_true(s:close())
        s = nil
    end)

    -- One store filled by two processes at once; the tests below read it,
    -- and the reindex test leaves it as it found it.
    describe("with 200 ids written by two processes at once", function()
        local shared, ks

        lazy_setup(function()
            make_blobs()
            shared = H.tmpdir()
            ks = shared .. "/ks"
            local work = shared .. "/work"
            H.mkdir_p(work)
            for w = 1, 2 do
                for k = 1, 100 do
                    H.writefile(work .. "/" .. w .. "-" .. k .. ".blob", blobs[(w - 1) * 100 + k])
                end
            end
            local script = work .. "/writer.lua"
            H.writefile(script, [[
                local store = require "softcxi.store"
                local dir, w, work = arg[1], arg[2], arg[3]
                local s = assert(store.open("file:" .. dir))
                local batch = {}
                for k = 1, 100 do
                    local f = assert(io.open(work .. "/" .. w .. "-" .. k .. ".blob", "rb"))
                    local blob = f:read("*a")
                    f:close()
                    -- single puts and group commits of 5, interleaved with the other writer
                    if k % 2 == 0 then
                        assert(s:put(nil, blob))
                    else
                        batch[#batch + 1] = { blob = blob }
                        if #batch == 5 then
                            assert(s:put_many(batch) == 5)
                            batch = {}
                        end
                    end
                end
                s:close()
                io.write("done ", w, "\n")
            ]])
            assert(store.open("file:" .. ks)):close() -- both writers open an existing store
            local env = "LUA_PATH=" .. H.q(package.path) .. " LUA_CPATH=" .. H.q(package.cpath) .. " "
            local procs = {}
            for w = 1, 2 do
                procs[w] = assert(io.popen(env .. H.q(H.interpreter()) .. " " .. H.q(script) .. " "
                    .. H.q(ks) .. " " .. w .. " " .. H.q(work) .. " 2>&1"))
            end
            for w = 1, 2 do
                local out = procs[w]:read("*a")
                procs[w]:close()
                assert(out == "done " .. w .. "\n", "writer " .. w .. ": " .. out)
            end
        end)

        lazy_teardown(function() H.rm_rf(shared) end)

        before_each(function()
            s:close()
            s = assert(store.open("file:" .. ks))
        end)

        it("stores all of them and indexes all of them", function()
            assert.are.equal(N, s:count())
            local g1 = find_all(s, { group = G1 }, 1000)
            local g2 = find_all(s, { group = G2 }, 37)
            local want = {}
            for i = 1, N do if i % 2 == 1 then want[default_id(i)] = 1 end end
            assert.are.same(want, set_of(g1))
            assert.are.equal(N / 2, #g2)
            for _, i in ipairs { 1, 2, 100, 101, 102, 200 } do -- each writer, single and batched
                assert.are.same({ default_id(i) }, (find_all(s, { name = infos[i].name }, 10)))
            end
            assert.are.equal(2 * N, count_markers(ks))
        end)

        it("fans out: at most 256 entries, two hex digits each, per directory level", function()
            local tops = assert(sys.listdir(ks .. "/blobs"))
            assert.is_true(#tops <= 256 and #tops > 1)
            local leaves = 0
            for _, ab in ipairs(tops) do
                assert.truthy(ab:match("^%x%x$"), ab)
                local subs = assert(sys.listdir(ks .. "/blobs/" .. ab))
                assert.is_true(#subs <= 256)
                for _, cd in ipairs(subs) do
                    assert.truthy(cd:match("^%x%x$"), cd)
                    leaves = leaves + 1
                end
            end
            assert.is_true(leaves > 100, "200 ids should spread over many buckets: " .. leaves)
            for _, attr in ipairs { "group", "name" } do
                local pps = assert(sys.listdir(ks .. "/index/" .. attr))
                assert.is_true(#pps <= 256)
                for _, pp in ipairs(pps) do assert.truthy(pp:match("^%x%x$"), pp) end
            end
            -- group markers fan out by id (pp/ab/), name markers by value (pp/qq/):
            -- find by name lists one of 65,536 directories
            for _, attr in ipairs { "group", "name" } do
                for _, pp in ipairs(assert(sys.listdir(ks .. "/index/" .. attr))) do
                    local subs = assert(sys.listdir(ks .. "/index/" .. attr .. "/" .. pp))
                    assert.is_true(#subs >= 1 and #subs <= 256)
                    for _, sub in ipairs(subs) do
                        assert.truthy(sub:match("^%x%x$"), sub)
                        local st = sys.stat(ks .. "/index/" .. attr .. "/" .. pp .. "/" .. sub)
                        assert.are.equal("dir", st.type)
                    end
                end
            end
            local npath = s:_markers(s:_loc(default_id(3)), default_id(3), infos[3])[2][1]
            local ppqq = npath:match("/index/name/(%x%x/%x%x)/[^/]+$")
            assert.truthy(ppqq, npath)
            local h = math.floor(sys.hash32(infos[3].name) / 65536)
            assert.are.equal(string.format("%02x/%02x", math.floor(h / 256), h % 256), ppqq)
            assert.are.equal(blobs[3], H.readfile(npath)) -- a hard link to the blob's file
            -- one lock file for every bucket, no file per bucket
            assert.are.same({ "buckets" }, assert(sys.listdir(ks .. "/locks")))
            for _, pp in ipairs(assert(sys.listdir(ks .. "/index/group"))) do
                local abs = assert(sys.listdir(ks .. "/index/group/" .. pp))
                assert.is_true(#abs <= 256)
                for _, ab in ipairs(abs) do assert.truthy(ab:match("^%x%x$"), ab) end
            end
            local p = s:_loc(default_id(5)).path
            assert.truthy(p:find("/blobs/%x%x/%x%x/[^/]+%.blob$"), p)
            assert.are.equal(blobs[5], H.readfile(p)) -- a blob file is the blob, nothing else
        end)

        it("reindex rebuilds the index from the blobs", function()
            H.rm_rf(ks .. "/index/group")
            H.rm_rf(ks .. "/index/name")
            assert.are.same({}, (find_all(s, { group = G1 }, 1000)))
            local n, skipped = s:reindex()
            assert.are.equal(N, n)
            assert.are.equal(0, skipped)
            assert.are.equal(N / 2, #find_all(s, { group = G1 }, 1000))
            assert.are.same({ default_id(7) }, (find_all(s, { name = infos[7].name }, 10)))
            -- a copy of blobs/ alone (no index at all) is reindexed on open
            s:close()
            H.rm_rf(ks .. "/index")
            s = assert(store.open("file:" .. ks))
            assert.are.equal(N / 2, #find_all(s, { group = G2 }, 1000))
            assert.are.equal(2 * N, count_markers(ks))
        end)

        it("opens a format 1 store (name markers in pp/, a lock file per bucket) by migrating it", function()
            -- make the store what the previous version wrote: name markers one
            -- level up, a lock file per bucket, the format 1 marker
            s:close()
            local names_before = {}
            for _, pp in ipairs(assert(sys.listdir(ks .. "/index/name"))) do
                for _, qq in ipairs(assert(sys.listdir(ks .. "/index/name/" .. pp))) do
                    local d = ks .. "/index/name/" .. pp .. "/" .. qq
                    for _, m in ipairs(assert(sys.listdir(d))) do
                        assert(os.rename(d .. "/" .. m, ks .. "/index/name/" .. pp .. "/" .. m))
                        names_before[#names_before + 1] = m
                    end
                    assert(sys.rmdir(d))
                end
            end
            assert.are.equal(N, #names_before)
            H.rm_rf(ks .. "/locks")
            H.mkdir_p(ks .. "/locks")
            for _, b in ipairs { "0001", "abcd", "ffff" } do
                H.writefile(ks .. "/locks/" .. b .. ".lock", "")
            end
            H.writefile(ks .. "/softcxi-store", "softcxi file store 1\n")
            -- a reader of format 2 does not see those name markers ...
            local raw = setmetatable({ dir = ks, sync = "auto" }, getmetatable(s))
            assert.are.same({}, (find_all(raw, { name = infos[7].name }, 10)))
            -- ... and open migrates: same ids, same finds, the new layout, no old lock file
            s = assert(store.open("file:" .. ks))
            assert.are.equal("softcxi file store 2\n", H.readfile(ks .. "/softcxi-store"))
            assert.are.same({}, assert(sys.listdir(ks .. "/locks")))
            assert.are.equal(N, s:count())
            for _, i in ipairs { 1, 7, 100, 101, 200 } do
                assert.are.same({ default_id(i) }, (find_all(s, { name = infos[i].name }, 10)))
            end
            assert.are.equal(N / 2, #find_all(s, { group = G1 }, 1000))
            assert.are.equal(2 * N, count_markers(ks))
            for _, pp in ipairs(assert(sys.listdir(ks .. "/index/name"))) do
                for _, qq in ipairs(assert(sys.listdir(ks .. "/index/name/" .. pp))) do
                    assert.are.equal("dir", sys.stat(ks .. "/index/name/" .. pp .. "/" .. qq).type)
                end
            end
            -- opened again: already format 2, nothing to do; writes work
            s:close()
            s = assert(store.open("file:" .. ks))
            assert.is_true(s:put("migrated-extra", blobs[1]))
            assert.is_true(s:delete("migrated-extra"))
            assert.are.same({ "buckets" }, assert(sys.listdir(ks .. "/locks")))
            assert.are.equal(2 * N, count_markers(ks))
            -- a format this version does not know is refused, naming the file
            H.writefile(ks .. "/softcxi-store", "softcxi file store 3\n")
            local msg = H.expect_err("EFORMAT", store.open("file:" .. ks))
            assert.truthy(msg:find(ks .. "/softcxi-store", 1, true), msg)
            H.writefile(ks .. "/softcxi-store", "softcxi file store 2\n")
        end)

        it("a backup is a copy of the directory", function()
            assert.are.equal(0, (H.run("cp -a " .. H.q(ks) .. " " .. H.q(dir .. "/copy"))))
            local c = assert(store.open("file:" .. dir .. "/copy"))
            assert.are.equal(N, c:count())
            assert.are.equal(blobs[4], c:get(default_id(4)))
            assert.are.equal(N / 2, #find_all(c, { group = G1 }, 1000))
            c:close()
        end)
    end)
end)
