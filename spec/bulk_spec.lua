-- bulk_generate: many keys of one template on C worker threads.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

describe("bulk_generate", function()
    local dev, hsm

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
    end)

    teardown(function()
        H.destroy(dev)
    end)

    it("makes n keys in order, named by name_format from start, all usable", function()
        local blobs = assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL,
            { algo = "ec", curve = "P-256", group = "iot", usage = { "sign", "verify" } }, 100,
            { name_format = "dev-%06d", start = 501, threads = 2 }))
        assert.are.equal(100, #blobs)
        local seen = {}
        for i, blob in ipairs(blobs) do
            assert.are.equal(0x4B, blob:byte(1))
            local info = softcxi.key_info(blob)
            assert.are.equal(("dev-%06d"):format(500 + i), info.name)
            assert.are.equal("iot", info.group)
            assert.is_nil(seen[info.public_key], "two keys share a public key")
            seen[info.public_key] = true
        end
        local sig = assert(hsm:sign(blobs[100], "ecdsa-sha256", "m"))
        assert.is_true(hsm:verify(blobs[100], "ecdsa-sha256", "m", sig))
    end)

    it("takes explicit names, and works for ed25519 and aes on one thread", function()
        local blobs = assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "ed25519" }, 3,
            { names = { "a", "b", "c" }, threads = 1 }))
        assert.are.equal("c", softcxi.key_info(blobs[3]).name)
        local aes = assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "aes", name = "k" }, 5))
        assert.are.equal(5, #aes)
        local ct = assert(hsm:encrypt(aes[5], "aes-gcm", "x"))
        assert.are.equal("x", hsm:decrypt(aes[5], "aes-gcm", ct))
    end)

    it("n = 0 gives an empty table", function()
        assert.are.same({}, hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 0))
    end)

    it("a bad template or name fails the whole call with EINVAL naming it", function()
        local msg = H.expect_err("EINVAL",
            hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", curve = "P-1" }, 10))
        assert.matches("template.curve", msg, 1, true)
        local names = {}
        for i = 1, 10 do names[i] = "n" .. i end
        names[4] = string.rep("x", 300)
        msg = H.expect_err("EINVAL",
            hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 10, { names = names }))
        assert.matches("key 4", msg, 1, true)
        H.expect_err("EINVAL", hsm:bulk_generate(0, { algo = "ec" }, 2))
    end)

    it("misuse raises", function()
        assert.has_error(function()
            hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 2, { bogus = 1 })
        end)
        assert.has_error(function()
            hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 2,
                { names = { "a", "b" }, name_format = "x%d" })
        end)
        assert.has_error(function()
            hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 2, { threads = 99 })
        end)
    end)
end)
