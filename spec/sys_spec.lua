-- softcxi.sys: the POSIX calls under the file store (csrc/lua/lsys.c).

local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local sys = require "softcxi.sys"

describe("softcxi.sys", function()
    local dir

    before_each(function() dir = H.tmpdir() end)
    after_each(function() H.rm_rf(dir) end)

    local function names(path)
        local l = assert(sys.listdir(path))
        table.sort(l)
        return l
    end

    it("writes durably, replacing, and leaves no temp file", function()
        assert.is_true(sys.write_durable(dir .. "/f", "one"))
        assert.is_true(sys.write_durable(dir .. "/f", "two"))
        assert.are.equal("two", sys.read(dir .. "/f"))
        assert.are.same({ "f" }, names(dir))
    end)

    it("write_new refuses an existing name (EEXIST) and keeps its content", function()
        assert.is_true(sys.write_new(dir .. "/f", "one"))
        local msg = H.expect_err("EEXIST", sys.write_new(dir .. "/f", "two"))
        assert.truthy(msg:find(dir .. "/f", 1, true), msg)
        assert.are.equal("one", sys.read(dir .. "/f"))
        assert.are.same({ "f" }, names(dir))
    end)

    it("reads a range; a missing file is ENOTFOUND naming the path", function()
        assert.is_true(sys.write_durable(dir .. "/f", "hello"))
        assert.are.equal("ell", sys.read(dir .. "/f", 1, 3))
        assert.are.equal("", sys.read(dir .. "/f", 99))
        local msg = H.expect_err("ENOTFOUND", sys.read(dir .. "/nope"))
        assert.truthy(msg:find(dir .. "/nope", 1, true), msg)
        H.expect_err("ENOTFOUND", sys.listdir(dir .. "/nope"))
        H.expect_err("ENOTFOUND", sys.stat(dir .. "/nope"))
        H.expect_err("ENOTFOUND", sys.unlink(dir .. "/nope"))
    end)

    it("group-commits many files, creating directories, with markers", function()
        local files = {}
        for i = 1, 20 do files[i] = { dir .. "/d" .. (i % 3) .. "/f" .. i, ("x"):rep(i) } end
        local markers = { { dir .. "/m/a/x" }, { dir .. "/m/b/y", "id" } }
        local n = sys.write_durable_many(files, { markers = markers })
        assert.are.equal(20, n)
        for i = 1, 20 do assert.are.equal(("x"):rep(i), sys.read(files[i][1])) end
        assert.are.equal("", sys.read(dir .. "/m/a/x"))
        assert.are.equal("id", sys.read(dir .. "/m/b/y"))
        for _, d in ipairs { "d0", "d1", "d2" } do
            for _, f in ipairs(names(dir .. "/" .. d)) do assert.truthy(f:match("^f%d+$"), f) end
        end
    end)

    it("makes markers hard links to a file of the batch or to a path, replacing what is there", function()
        local files = { { dir .. "/d/f1", "one" }, { dir .. "/d/f2", "two" } }
        H.mkdir_p(dir .. "/m")
        H.writefile(dir .. "/m/old", "stale")
        local markers = { { dir .. "/m/x", nil, 1 }, { dir .. "/m/old", nil, 2 },
                          { dir .. "/m/new/y", nil, dir .. "/d/f1" } }
        -- the third links to a path that exists only once the batch is placed: refused
        local r = H.pack(sys.write_durable_many(files, { markers = markers }))
        assert.is_nil(r[1])
        assert.are.equal("ENOTFOUND", r[3])
        assert.is_nil(sys.stat(dir .. "/d/f1"))
        markers[3] = nil
        assert.are.equal(2, sys.write_durable_many(files, { markers = markers }))
        assert.are.equal("one", sys.read(dir .. "/m/x"))
        assert.are.equal("two", sys.read(dir .. "/m/old"))
        assert.are.equal(1, sys.write_durable_many({ { dir .. "/e/g", "three" } },
            { markers = { { dir .. "/m/new/y", nil, dir .. "/d/f1" } } }))
        assert.are.equal("one", sys.read(dir .. "/m/new/y"))
        -- no temp link left beside a replaced marker
        assert.are.same({ "new", "old", "x" }, names(dir .. "/m"))
        assert.has_error(function()
            sys.write_durable_many(files, { markers = { { dir .. "/m/z", nil, 3 } } })
        end)
        assert.has_error(function()
            sys.write_durable_many(files, { markers = { { dir .. "/m/z", nil, true } } })
        end)
    end)

    it("lists only the names with a prefix", function()
        for _, n in ipairs { "ab@1", "ab@2", "abc@3", "b@4" } do H.writefile(dir .. "/" .. n, "") end
        local l = assert(sys.listdir(dir, "ab@"))
        table.sort(l)
        assert.are.same({ "ab@1", "ab@2" }, l)
        assert.are.same({}, assert(sys.listdir(dir, "zz")))
        assert.are.equal(4, #assert(sys.listdir(dir)))
    end)

    it("stops a batch at the first name that must be new and exists", function()
        assert.is_true(sys.write_new(dir .. "/b", "old"))
        -- a single argument (no options table) is fine too
        local r = H.pack(sys.write_durable_many({ { dir .. "/a", "1", true }, { dir .. "/b", "2", true },
                                                  { dir .. "/c", "3", true } }))
        assert.is_nil(r[1])
        assert.are.equal("EEXIST", r[3])
        assert.are.equal(1, r[4])
        assert.are.equal("old", sys.read(dir .. "/b"))
        assert.are.same({ "a", "b" }, names(dir))
    end)

    it("locks: exclusive excludes, nowait says EBUSY, unlock releases", function()
        local a = assert(sys.flock(dir .. "/locks/x.lock", "ex"))
        H.expect_err("EBUSY", sys.flock(dir .. "/locks/x.lock", "sh", true))
        a:unlock()
        local b = assert(sys.flock(dir .. "/locks/x.lock", "sh", true))
        local c = assert(sys.flock(dir .. "/locks/x.lock", "sh", true))
        b:unlock()
        c:unlock()
        assert.has_error(function() sys.flock(dir .. "/x", "both") end)
    end)

    it("makes a large batch on two threads: every file placed, every marker its file's link", function()
        -- 64 files (the second half made on a helper thread), each with a
        -- marker linking to it and a plain marker, in 8 directories
        local files, markers = {}, {}
        for i = 1, 64 do
            files[i] = { dir .. "/d" .. (i % 8) .. "/f" .. i, "data " .. i }
            markers[#markers + 1] = { dir .. "/m" .. (i % 8) .. "/l" .. i, nil, i }
            markers[#markers + 1] = { dir .. "/p/e" .. i }
        end
        assert.are.equal(64, sys.write_durable_many(files, { markers = markers, sync = "syncfs" }))
        for i = 1, 64 do
            assert.are.equal("data " .. i, sys.read(dir .. "/d" .. (i % 8) .. "/f" .. i))
            assert.are.equal("data " .. i, sys.read(dir .. "/m" .. (i % 8) .. "/l" .. i))
            assert.are.equal("", sys.read(dir .. "/p/e" .. i))
        end
        for k = 0, 7 do
            assert.are.equal(8, #names(dir .. "/d" .. k)) -- no temp file left
            assert.are.equal(8, #names(dir .. "/m" .. k))
        end
        -- fsynced file by file, too
        for i = 1, 64 do files[i][1] = dir .. "/s/f" .. i end
        assert.are.equal(64, sys.write_durable_many(files, { sync = "fsync" }))
        assert.are.equal(64, #names(dir .. "/s"))
    end)

    it("a large batch failing on its helper thread places nothing and leaves no temp file", function()
        assert.is_true(sys.write_durable(dir .. "/plain", "x"))
        local files = {}
        for i = 1, 40 do files[i] = { dir .. "/d/f" .. i, "data " .. i } end
        -- file 35 is in the second half: its directory cannot be made under a file
        files[35][1] = dir .. "/plain/sub/f35"
        local r = H.pack(sys.write_durable_many(files))
        assert.is_nil(r[1])
        assert.are.equal("EIO", r[3])
        assert.truthy(r[2]:find(dir .. "/plain/sub", 1, true), r[2])
        assert.are.equal(0, r[4])
        assert.are.same({}, names(dir .. "/d")) -- the first half's temp files are gone too
    end)

    it("lock_slots: any number of slots behind one lock, exclusive, nowait says EBUSY", function()
        local p = dir .. "/locks/slots"
        local a = assert(sys.lock_slots(p, { 5, 1, 65535, 5 }))
        H.expect_err("EBUSY", sys.lock_slots(p, { 2, 5 }, true))
        H.expect_err("EBUSY", sys.lock_slots(p, { 65535 }, true))
        local b = assert(sys.lock_slots(p, { 2, 3, 4, 6 }, true)) -- the gaps are free
        a:unlock()
        local c = assert(sys.lock_slots(p, { 1, 5, 65535 }, true))
        H.expect_err("EBUSY", sys.lock_slots(p, { 4 }, true))
        b:unlock()
        c:unlock()
        assert(sys.lock_slots(p, { 1, 2, 3, 4, 5, 6, 65535 }, true)):unlock()
        assert.is_true(assert(sys.lock_slots(p, {})):unlock()) -- none: a lock all the same
        assert.has_error(function() sys.lock_slots(p, { -1 }) end)
        assert.has_error(function() sys.lock_slots(p, { 1.5 }) end)
        assert.has_error(function() sys.lock_slots(p, { "x" }) end)
    end)

    it("hashes with FNV-1a 32", function()
        assert.are.equal(2166136261, sys.hash32(""))
        assert.are.equal(3826002220, sys.hash32("a"))
        assert.are.equal(0xbf9cf968, sys.hash32("foobar"))
    end)
end)
