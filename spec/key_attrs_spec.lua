-- softcxi.core.key_attrs: the four attributes the stores index (name, group, specifier,
-- algo), parsed and checked exactly as key_info does; the Redis store checks every blob it
-- scans or put_many writes with it.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local core = require "softcxi.core"

describe("key_attrs", function()
    local dev, hsm

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
    end)

    teardown(function()
        H.destroy(dev)
    end)

    it("gives key_info's name, group, specifier and algo, the name's h*31 sum, nothing else", function()
        local blobs = {
            H.gen(hsm, { algo = "ec", curve = "P-256", group = "g1", name = "n1", specifier = 7 }),
            H.gen(hsm, { algo = "aes", size = 256, group = "g2", name = "n2" }),
            H.gen(hsm, { algo = "ed25519", name = "n3" }),
        }
        for i, b in ipairs(blobs) do
            local info = assert(softcxi.key_info(b))
            local a = assert(core.key_attrs(b))
            -- name_h31: "n1" is 110 * 31 + 49 (the Redis store's name index starts from it)
            assert.are.same({ name = info.name, group = info.group, specifier = info.specifier,
                              algo = info.algo, name_h31 = 3458 + i }, a, "blob " .. i)
        end
        local long = string.rep("\255", 40)   -- wraps mod 2^32 many times: as the Lua form
        local a = assert(core.key_attrs(H.gen(hsm, { algo = "ec", curve = "P-256", name = long })))
        local h = 0
        for k = 1, #long do h = (h * 31 + long:byte(k)) % 4294967296 end
        assert.are.equal(h, a.name_h31)
        assert.are.equal(7, core.key_attrs(blobs[1]).specifier)
        assert.is_nil(core.key_attrs(blobs[2]).specifier)
    end)

    it("refuses what key_info refuses, with its message and code", function()
        local blob = H.gen(hsm, { algo = "ec", group = "g", name = "t" })
        local bad = { "", "not a blob", blob:sub(1, 20), blob:sub(1, #blob - 1) }
        for len = 0, #blob - 1, 7 do bad[#bad + 1] = blob:sub(1, len) end
        for _, b in ipairs(bad) do
            local want = H.pack(softcxi.key_info(b))
            local got = H.pack(core.key_attrs(b))
            assert.is_nil(got[1])
            assert.are.equal("EFORMAT", got[3], got[2])
            assert.are.same(want, got)
        end
        assert.has_error(function() core.key_attrs(nil) end)
        assert.has_error(function() core.key_attrs({}) end)
    end)
end)
