-- The key blob under bad input: truncation, bit flips, a foreign MBK,
-- trailing bytes, junk; and blobs that cross process boundaries.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

local KCV_FIRST, KCV_LAST = 5, 12 -- 1-based: 'K' ver type flags | KCV(8) | ...

local function codes_of(...)
    local r = H.pack(...)
    return r
end

describe("blob", function()
    local dev, hsm, blob

    setup(function()
        dev = H.new_device() -- default cache on
        hsm = dev.hsm
        blob = H.gen(hsm, { algo = "ec", curve = "P-256", name = "dev-7", group = "iot" })
    end)

    teardown(function()
        H.destroy(dev)
    end)

    it("is a 'K' blob under 300 bytes that signs", function()
        assert.are.equal(0x4B, blob:byte(1))
        assert.is_true(#blob < 300)
        local sig = assert(hsm:sign(blob, "ecdsa-sha256", "m"))
        assert.is_true(hsm:verify(blob, "ecdsa-sha256", "m", sig))
    end)

    describe("truncation", function()
        it("every truncation fails softcxi.key_info with EFORMAT, never succeeds", function()
            for len = 0, #blob - 1 do
                local ok, r = pcall(codes_of, softcxi.key_info(blob:sub(1, len)))
                assert.is_true(ok, "key_info raised at length " .. len .. ": " .. tostring(r))
                assert.is_nil(r[1], "key_info succeeded on a blob truncated to " .. len)
                assert.is_string(r[2])
                assert.are.equal("EFORMAT", r[3], "length " .. len .. ": " .. tostring(r[2]))
            end
        end)

        it("every truncation fails softcxi.public_key with EFORMAT", function()
            for len = 0, #blob - 1 do
                local ok, r = pcall(codes_of, softcxi.public_key(blob:sub(1, len), "der"))
                assert.is_true(ok, "public_key raised at length " .. len .. ": " .. tostring(r))
                assert.is_nil(r[1], "public_key succeeded on a blob truncated to " .. len)
                assert.are.equal("EFORMAT", r[3], "length " .. len)
            end
        end)

        it("every truncation fails hsm:sign with EFORMAT or ETAMPER, never raises", function()
            assert(hsm:sign(blob, "ecdsa-sha256", "m")) -- the whole blob is cached
            for len = 0, #blob - 1 do
                local ok, r = pcall(codes_of, hsm:sign(blob:sub(1, len), "ecdsa-sha256", "m"))
                assert.is_true(ok, "sign raised at length " .. len .. ": " .. tostring(r))
                assert.is_nil(r[1], "sign succeeded on a blob truncated to " .. len)
                assert.is_string(r[2])
                assert.is_true(r[3] == "EFORMAT" or r[3] == "ETAMPER",
                    "length " .. len .. ": " .. tostring(r[3]) .. " " .. tostring(r[2]))
            end
        end)
    end)

    describe("single-bit flips", function()
        it("every one of 8*#blob flips is rejected by hsm:sign (cache on, blob used once)", function()
            local info0 = hsm:device_info()
            assert.is_true(info0.cache_capacity > 0, "the cache must be on for this test")
            assert(hsm:sign(blob, "ecdsa-sha256", "warm")) -- the original is now cached
            assert(hsm:sign(blob, "ecdsa-sha256", "warm"))
            local before = hsm:device_info()
            assert.is_true(before.cache_hits > info0.cache_hits, "the original was not served from cache")

            local seen = {}
            for pos = 1, #blob do
                for bit = 0, 7 do
                    local bad = H.bitflip(blob, pos, bit)
                    assert.are_not.equal(blob, bad)
                    local ok, r = pcall(codes_of, hsm:sign(bad, "ecdsa-sha256", "m"))
                    local where = "byte " .. pos .. " bit " .. bit
                    assert.is_true(ok, where .. ": sign raised: " .. tostring(r))
                    assert.is_nil(r[1], where .. ": a tampered blob signed")
                    assert.is_string(r[2], where)
                    if pos >= KCV_FIRST and pos <= KCV_LAST then
                        assert.are.equal("EMBK", r[3], where .. ": " .. tostring(r[2]))
                    else
                        assert.is_true(r[3] == "ETAMPER" or r[3] == "EFORMAT",
                            where .. ": " .. tostring(r[3]) .. " " .. tostring(r[2]))
                    end
                    seen[r[3]] = (seen[r[3]] or 0) + 1
                end
            end
            assert.are.equal(8 * #blob, (seen.ETAMPER or 0) + (seen.EFORMAT or 0) + (seen.EMBK or 0))
            assert.are.equal(64, seen.EMBK)
            assert.is_true((seen.ETAMPER or 0) > 0)

            -- no tampered blob went into the cache, and the original still works
            local after = hsm:device_info()
            assert.are.equal(before.cache_entries, after.cache_entries)
            local sig = assert(hsm:sign(blob, "ecdsa-sha256", "m"))
            assert.is_true(hsm:verify(blob, "ecdsa-sha256", "m", sig))
        end)

        it("every flip is rejected by hsm:key_info and hsm:public_key too", function()
            assert(hsm:key_info(blob))
            for pos = 1, #blob do
                for bit = 0, 7 do
                    local bad = H.bitflip(blob, pos, bit)
                    local where = "byte " .. pos .. " bit " .. bit
                    local ok, r = pcall(codes_of, hsm:key_info(bad))
                    assert.is_true(ok, where)
                    assert.is_nil(r[1], where .. ": key_info accepted a tampered blob")
                    assert.is_true(r[3] == "ETAMPER" or r[3] == "EFORMAT" or r[3] == "EMBK", where)
                    ok, r = pcall(codes_of, hsm:public_key(bad, "der"))
                    assert.is_true(ok, where)
                    assert.is_nil(r[1], where .. ": public_key accepted a tampered blob")
                end
            end
        end)

        it("an edited name reads back unverified, and the device refuses it", function()
            local s = blob:find("dev-7", 1, true)
            assert.is_number(s)
            local bad = H.bitflip(blob, s + 4, 1) -- "dev-7" -> "dev-5"
            local info = assert(softcxi.key_info(bad))
            assert.are.equal("dev-5", info.name)
            assert.is_false(info.verified)
            local r = H.pack(hsm:key_info(bad))
            assert.is_nil(r[1])
            assert.are.equal("ETAMPER", r[3])
            assert.truthy(r[2]:find("dev-5", 1, true), r[2])
        end)
    end)

    describe("malformed input", function()
        local function eformat(b, what)
            local r = H.pack(hsm:sign(b, "ecdsa-sha256", "m"))
            assert.is_nil(r[1], what)
            assert.are.equal("EFORMAT", r[3], what .. ": " .. tostring(r[2]))
            r = H.pack(softcxi.key_info(b))
            assert.is_nil(r[1], what)
            assert.are.equal("EFORMAT", r[3], what .. ": " .. tostring(r[2]))
            r = H.pack(hsm:key_info(b))
            assert.is_nil(r[1], what)
            assert.are.equal("EFORMAT", r[3], what .. ": " .. tostring(r[2]))
            return r[2]
        end

        it("trailing bytes are EFORMAT", function()
            local msg = eformat(blob .. "\0", "one trailing byte")
            assert.truthy(msg:find("trailing", 1, true), msg)
            eformat(blob .. blob, "two blobs")
        end)

        it("the empty string is EFORMAT", function()
            eformat("", "empty")
        end)

        it("junk not starting with K is EFORMAT", function()
            eformat("hello, world", "text")
            eformat(string.rep("\0", #blob), "zeros")
            eformat("k" .. blob:sub(2), "lower-case k")
            eformat(hsm:rnd_gen(#blob):gsub("^K", "J"), "random")
        end)

        it("a lone K and a header-only blob are EFORMAT", function()
            eformat("K", "K")
            eformat(blob:sub(1, 40), "header only")
        end)

        it("a non-key blob type is EFORMAT", function()
            eformat(blob:sub(1, 2) .. "\16" .. blob:sub(4), "type 0x10")
        end)

        it("raises on a non-string blob", function()
            assert.has_error(function() hsm:sign(nil, "ecdsa-sha256", "m") end)
            assert.has_error(function() hsm:sign({}, "ecdsa-sha256", "m") end)
            assert.has_error(function() softcxi.key_info(nil) end)
        end)
    end)

    describe("another device", function()
        local dev2

        setup(function()
            dev2 = H.new_device()
        end)

        teardown(function()
            H.destroy(dev2)
        end)

        it("has its own MBK", function()
            assert.are_not.equal(hsm:device_info().kcv, dev2.hsm:device_info().kcv)
            assert.are_not.equal(hsm:device_info().id, dev2.hsm:device_info().id)
        end)

        it("rejects our blob with EMBK, naming both KCVs", function()
            local kcv1, kcv2 = hsm:device_info().kcv, dev2.hsm:device_info().kcv
            assert.truthy(kcv1:match("^%x+$"))
            assert.are.equal(16, #kcv1)
            assert.are.equal(16, #kcv2)
            assert.are.equal(kcv1, softcxi.key_info(blob).kcv)
            for _, call in ipairs {
                function() return dev2.hsm:sign(blob, "ecdsa-sha256", "m") end,
                function() return dev2.hsm:key_info(blob) end,
                function() return dev2.hsm:public_key(blob) end,
                function() return dev2.hsm:verify(blob, "ecdsa-sha256", "m", "s") end,
            } do
                local r = H.pack(call())
                assert.is_nil(r[1])
                assert.are.equal("EMBK", r[3], tostring(r[2]))
                assert.truthy(r[2]:find(kcv1, 1, true), r[2])
                assert.truthy(r[2]:find(kcv2, 1, true), r[2])
                assert.truthy(r[2]:find("'iot/dev-7'", 1, true), r[2])
            end
        end)

        it("and we reject its blobs with EMBK", function()
            local other = H.gen(dev2.hsm, { algo = "ed25519" })
            local r = H.pack(hsm:sign(other, "ed25519", "m"))
            assert.is_nil(r[1])
            assert.are.equal("EMBK", r[3])
        end)
    end)

    describe("across processes", function()
        local interp, env

        setup(function()
            interp = H.interpreter()
            local lpath = os.getenv("LUA_PATH") or package.path
            local cpath = os.getenv("LUA_CPATH") or package.cpath
            env = "LUA_PATH=" .. H.q(lpath) .. " LUA_CPATH=" .. H.q(cpath) .. " "
        end)

        local child_src = [[
local softcxi = require "softcxi"
local path, keyfile, mode, blobfile, out = arg[1], arg[2], arg[3], arg[4], arg[5]
local hsm = assert(softcxi.open { path = path, keyfile = keyfile })
assert(hsm:logon_pass(arg[6], arg[7]))
local function rd(p) local f = assert(io.open(p, "rb")); local d = f:read("*a"); f:close(); return d end
local function wr(p, d) local f = assert(io.open(p, "wb")); f:write(d); f:close() end
if mode == "sign" then
    local sig, msg, code = hsm:sign(rd(blobfile), "ecdsa-sha256", "cross-process")
    if not sig then io.stderr:write(tostring(msg), " ", tostring(code), "\n"); os.exit(3) end
    wr(out, sig)
elseif mode == "gen" then
    wr(blobfile, assert(hsm:key_generate(softcxi.FLAG_EXTERNAL,
        { algo = "ed25519", name = "child", group = "iot" })))
    wr(out, hsm:device_info().kcv)
end
hsm:close()
os.exit(0)
]]

        local function child(mode, blobfile, out)
            local script = dev.root .. "/child.lua"
            H.writefile(script, child_src)
            local cmd = env .. H.q(interp) .. " " .. H.q(script) .. " " .. H.q(dev.path) .. " "
                .. H.q(dev.keyfile) .. " " .. mode .. " " .. H.q(blobfile) .. " " .. H.q(out)
                .. " " .. H.q(H.USER) .. " " .. H.q(H.USER_PASSWORD)
            return H.run(cmd)
        end

        it("a blob made here signs in the next process; the signature verifies here", function()
            local bf, sf = dev.root .. "/blob.bin", dev.root .. "/sig.bin"
            H.writefile(bf, blob)
            local rc, out = child("sign", bf, sf)
            assert.are.equal(0, rc, out)
            local sig = assert(H.readfile(sf))
            assert.is_true(#sig > 0)
            assert.is_true(hsm:verify(blob, "ecdsa-sha256", "cross-process", sig))
            assert.is_false(hsm:verify(blob, "ecdsa-sha256", "other", sig))
        end)

        it("a blob made by another process opens here", function()
            local bf, kf = dev.root .. "/child-blob.bin", dev.root .. "/child-kcv.txt"
            local rc, out = child("gen", bf, kf)
            assert.are.equal(0, rc, out)
            assert.are.equal(hsm:device_info().kcv, H.readfile(kf))
            local cblob = assert(H.readfile(bf))
            local info = assert(hsm:key_info(cblob))
            assert.is_true(info.verified)
            assert.are.equal("child", info.name)
            local sig = assert(hsm:sign(cblob, "ed25519", "m"))
            assert.is_true(hsm:verify(cblob, "ed25519", "m", sig))
        end)

        it("the child fails cleanly on a tampered blob", function()
            local bf, sf = dev.root .. "/bad-blob.bin", dev.root .. "/bad-sig.bin"
            H.writefile(bf, H.bitflip(blob, #blob, 0))
            local rc, out = child("sign", bf, sf)
            assert.are.equal(3, rc, out)
            assert.truthy(out:find("ETAMPER", 1, true), out)
        end)
    end)
end)
