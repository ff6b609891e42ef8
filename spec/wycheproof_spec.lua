-- Wycheproof test vectors (spec/vectors/wycheproof, Apache 2.0) run through
-- the Lua API: keys come in with key_import, then verify / decrypt /
-- secret_agree / mac_verify must agree with every vector's verdict.
-- "valid" must succeed with the exact result, "invalid" must fail, and
-- "acceptable" may go either way.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local cjson = require "cjson"

local dir = (debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "vectors/wycheproof/"
local EXT = softcxi.FLAG_EXTERNAL

local function load(name)
    local f = assert(io.open(dir .. name, "rb"))
    local doc = cjson.decode(f:read("*a"))
    f:close()
    return doc
end

local unhex = H.unhex

-- Runs every test of every group; check(group_state, test) returns true
-- when softcxi accepted the input (result matched), false when it refused.
-- Returns the number of vectors run; asserts that none disagreed.
local function run(doc, setup_group, check)
    local ran, bad = 0, {}
    for _, g in ipairs(doc.testGroups) do
        local state = setup_group(g)
        if state then
            for _, t in ipairs(g.tests) do
                local accepted = check(state, t)
                if accepted ~= nil then
                    ran = ran + 1
                    if (t.result == "valid" and not accepted) or (t.result == "invalid" and accepted) then
                        bad[#bad + 1] = ("tcId %d (%s, %s): softcxi %s it"):format(t.tcId, t.result,
                            table.concat(t.flags or {}, ","), accepted and "accepted" or "refused")
                    end
                end
            end
        end
    end
    assert.are.same({}, bad)
    return ran
end

describe("wycheproof", function()
    local dev, hsm

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
    end)

    teardown(function()
        H.destroy(dev)
    end)

    local function import_public(der_hex)
        return assert(hsm:key_import(EXT, { usage = { "verify" } }, unhex(der_hex), "spki"))
    end

    local function verifier(mech, format)
        return function(blob, t)
            local ok, err = hsm:verify(blob, mech, unhex(t.msg), unhex(t.sig),
                format and { format = format } or nil)
            assert(ok ~= nil, err)
            return ok
        end
    end

    for _, case in ipairs {
        { "ecdsa_secp256r1_sha256_test.json", "ecdsa-sha256" },
        { "ecdsa_secp384r1_sha384_test.json", "ecdsa-sha384" },
        { "ecdsa_secp256k1_sha256_test.json", "ecdsa-sha256" },
        { "ecdsa_secp256r1_sha256_p1363_test.json", "ecdsa-sha256", "raw" },
        { "ed25519_test.json", "ed25519" },
        { "rsa_signature_2048_sha256_test.json", "rsa-pkcs1-sha256" },
        { "rsa_pss_2048_sha256_mgf1_32_test.json", "rsa-pss-sha256" },
    } do
        local file, mech, format = case[1], case[2], case[3]
        it(file .. " through a verify-only blob", function()
            local doc = load(file)
            local n = run(doc, function(g) return import_public(g.publicKeyDer) end,
                verifier(mech, format))
            assert.is_true(n >= doc.numberOfTests * 0.9, "ran only " .. n .. " vectors")
        end)
    end

    it("rsa_oaep_2048_sha256_mgf1sha256_test.json through an imported PKCS#8 key", function()
        local doc = load("rsa_oaep_2048_sha256_mgf1sha256_test.json")
        local n = run(doc, function(g)
            return assert(hsm:key_import(EXT, { usage = { "decrypt" } }, unhex(g.privateKeyPkcs8),
                "pkcs8"))
        end, function(blob, t)
            local pt, err, code = hsm:decrypt(blob, "rsa-oaep-sha256", unhex(t.ct),
                { aad = unhex(t.label) })
            if pt == nil then
                assert.are.equal("ETAMPER", code, err)
                return false
            end
            return pt == unhex(t.msg)
        end)
        assert.is_true(n == doc.numberOfTests)
    end)

    it("x25519_test.json through imported raw private keys", function()
        local doc = load("x25519_test.json")
        local n = run(doc, function() return true end, function(_, t)
            local blob = assert(hsm:key_import(EXT, { algo = "x25519" }, unhex(t.private), "raw"))
            local z = hsm:secret_agree(blob, "x25519", unhex(t.public), { raw = true })
            return z ~= nil and z == unhex(t.shared)
        end)
        assert.is_true(n == doc.numberOfTests)
    end)

    it("ecdh_secp256r1_test.json through imported raw scalars and SPKI peers", function()
        local doc = load("ecdh_secp256r1_test.json")
        local n = run(doc, function() return true end, function(_, t)
            -- the scalar as 32 bytes: Wycheproof adds a sign byte or drops zeros
            local d = unhex(t.private)
            while #d > 32 and d:byte(1) == 0 do d = d:sub(2) end
            d = string.rep("\0", 32 - #d) .. d
            local blob = assert(hsm:key_import(EXT, { algo = "ec", curve = "P-256",
                usage = { "derive" } }, d, "raw"))
            local z = hsm:secret_agree(blob, "ecdh", unhex(t.public), { raw = true })
            return z ~= nil and z == unhex(t.shared)
        end)
        assert.is_true(n == doc.numberOfTests)
    end)

    it("aes_gcm_test.json (96-bit IVs) through imported raw keys", function()
        local doc = load("aes_gcm_test.json")
        local n = run(doc, function(g)
            return g.ivSize == 96 and g.tagSize == 128 and g
        end, function(_, t)
            local blob = assert(hsm:key_import(EXT, { algo = "aes" }, unhex(t.key), "raw"))
            local iv, aad, msg = unhex(t.iv), unhex(t.aad), unhex(t.msg)
            local pt = hsm:decrypt(blob, "aes-gcm", unhex(t.ct),
                { iv = iv, tag = unhex(t.tag), aad = aad })
            if t.result == "valid" then
                -- and encryption with the same IV gives exactly the vector
                local ct, iv2, tag = assert(hsm:encrypt(blob, "aes-gcm", msg,
                    { iv = iv, aad = aad, detached = true }))
                assert.are.equal(t.ct, H.hex(ct))
                assert.are.equal(t.tag, H.hex(tag))
                assert.are.equal(iv, iv2)
            end
            return pt ~= nil and pt == msg
        end)
        assert.is_true(n > 50, "ran only " .. n .. " vectors")
    end)

    it("hmac_sha256_test.json (full-length tags) through imported raw keys", function()
        local doc = load("hmac_sha256_test.json")
        local n = run(doc, function(g)
            return g.tagSize == 256 and g.keySize >= 128 and g
        end, function(_, t)
            local blob = assert(hsm:key_import(EXT, { algo = "hmac-sha256" }, unhex(t.key), "raw"))
            local ok, err = hsm:mac_verify(blob, "hmac-sha256", unhex(t.msg), unhex(t.tag))
            assert(ok ~= nil, err)
            return ok
        end)
        assert.is_true(n > 50, "ran only " .. n .. " vectors")
    end)

    it("aes_kwp_test.json (RFC 5649) through key_import of wrapped keys", function()
        -- Each test's key is imported as an AES unwrapping key, its ct is
        -- unwrapped inside the device into an HMAC key, and that key must MAC
        -- like the test's msg imported in the clear.  A valid wrapping of
        -- fewer than 16 or more than 256 bytes cannot become a key (HMAC keys
        -- are 128 to 2048 bits): those are skipped and counted; an invalid one
        -- must be refused whatever its length.
        local doc = load("aes_kwp_test.json")
        local skipped = 0
        local n = run(doc, function(g) return g end, function(_, t)
            local kek = assert(hsm:key_import(EXT, { algo = "aes", usage = { "unwrap" } },
                unhex(t.key), "raw"))
            local msg = unhex(t.msg)
            if t.result == "valid" and (#msg < 16 or #msg > 256) then
                skipped = skipped + 1
                return nil
            end
            local blob = hsm:key_import(EXT, { algo = "hmac-sha256" }, unhex(t.ct), "aes-kwp", kek)
            if not blob then return false end
            local clear = assert(hsm:key_import(EXT, { algo = "hmac-sha256" }, msg, "raw"))
            return assert(hsm:mac(blob, "hmac-sha256", "probe"))
                == assert(hsm:mac(clear, "hmac-sha256", "probe"))
        end)
        print(("aes_kwp_test.json: %d vectors run, %d valid ones of a length no key has skipped")
            :format(n, skipped))
        assert.is_true(n > 150, "ran only " .. n .. " vectors")
    end)
end)
