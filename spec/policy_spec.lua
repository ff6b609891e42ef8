-- Policy bound into the blob: usage and expiry, enforced by the device.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")

local function expect_policy(...)
    local r = H.pack(...)
    assert.is_true(r[1] == nil, "expected EPOLICY, got a result of type " .. type(r[1]))
    assert.is_string(r[2])
    assert.are.equal("EPOLICY", r[3], "message: " .. tostring(r[2]))
    return r[2]
end

describe("policy", function()
    local dev, hsm, rsa_crypt, rsa_sign

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
        -- the two RSA-2048 keys of this file, made once
        rsa_crypt = H.gen(hsm, { algo = "rsa", size = 2048, name = "crypt-only", group = "pol",
                                 usage = { "encrypt", "decrypt" } })
        rsa_sign = H.gen(hsm, { algo = "rsa", size = 2048, name = "sign-only", group = "pol",
                                usage = { "sign", "verify" } })
    end)

    teardown(function()
        H.destroy(dev)
    end)

    describe("usage", function()
        it("sign with an encrypt-only RSA key is EPOLICY and names the key", function()
            local msg = expect_policy(hsm:sign(rsa_crypt, "rsa-pss-sha256", "m"))
            assert.truthy(msg:find("'pol/crypt-only'", 1, true), msg)
            assert.truthy(msg:find("sign", 1, true), msg)
            expect_policy(hsm:sign(rsa_crypt, "rsa-pkcs1-sha256", "m"))
            expect_policy(hsm:bulk_sign(rsa_crypt, "rsa-pkcs1-sha256", { "m" }))
        end)

        it("verify with an encrypt-only RSA key is EPOLICY", function()
            local sig = assert(hsm:sign(rsa_sign, "rsa-pss-sha256", "m"))
            expect_policy(hsm:verify(rsa_crypt, "rsa-pss-sha256", "m", sig))
        end)

        it("encrypt with a sign-only key is EPOLICY and names the key", function()
            local msg = expect_policy(hsm:encrypt(rsa_sign, "rsa-oaep-sha256", "m"))
            assert.truthy(msg:find("'pol/sign-only'", 1, true), msg)
            assert.truthy(msg:find("encrypt", 1, true), msg)
        end)

        it("decrypt with a sign-only key is EPOLICY", function()
            local ct = assert(hsm:encrypt(rsa_crypt, "rsa-oaep-sha256", "m"))
            expect_policy(hsm:decrypt(rsa_sign, "rsa-oaep-sha256", ct))
        end)

        it("the permitted operations still work", function()
            local ct = assert(hsm:encrypt(rsa_crypt, "rsa-oaep-sha256", "m"))
            assert.are.equal("m", assert(hsm:decrypt(rsa_crypt, "rsa-oaep-sha256", ct)))
            local sig = assert(hsm:sign(rsa_sign, "rsa-pss-sha256", "m"))
            assert.is_true(hsm:verify(rsa_sign, "rsa-pss-sha256", "m", sig))
        end)

        it("a sign-only ec key (no verify) may sign but not verify", function()
            local blob = H.gen(hsm, { algo = "ec", name = "s", group = "pol", usage = { "sign" } })
            local sig = assert(hsm:sign(blob, "ecdsa-sha256", "m"))
            local msg = expect_policy(hsm:verify(blob, "ecdsa-sha256", "m", sig))
            assert.truthy(msg:find("'pol/s'", 1, true), msg)
        end)

        it("an ec key without derive may not agree a secret", function()
            local a = H.gen(hsm, { algo = "ec", name = "nod", group = "pol" })
            local b = H.gen(hsm, { algo = "ec", name = "peer", group = "pol", usage = { "derive" } })
            expect_policy(hsm:secret_agree(a, "ecdh", assert(hsm:public_key(b, "der"))))
        end)

        it("an encrypt-only aes key may not decrypt", function()
            local blob = H.gen(hsm, { algo = "aes", name = "enc", group = "pol", usage = { "encrypt" } })
            local ct = assert(hsm:encrypt(blob, "aes-gcm", "m"))
            local msg = expect_policy(hsm:decrypt(blob, "aes-gcm", ct))
            assert.truthy(msg:find("'pol/enc'", 1, true), msg)
        end)

        it("an hmac key without verify may mac but not mac_verify", function()
            local blob = H.gen(hsm, { algo = "hmac", name = "m", group = "pol", usage = { "sign" } })
            local tag = assert(hsm:mac(blob, "hmac-sha256", "d"))
            expect_policy(hsm:mac_verify(blob, "hmac-sha256", "d", tag))
        end)

        it("names a key with a specifier as 'group/name/specifier'", function()
            local blob = H.gen(hsm, { algo = "ec", name = "spec", group = "pol", specifier = 3,
                                      usage = { "derive" } })
            local msg = expect_policy(hsm:sign(blob, "ecdsa-sha256", "m"))
            assert.truthy(msg:find("'pol/spec/3'", 1, true), msg)
        end)
    end)

    describe("expiry", function()
        it("an expired key is EPOLICY, 'expired', naming the key", function()
            local blob = H.gen(hsm, { algo = "ec", name = "old", group = "pol",
                                      expiry = os.time() - 10 })
            local msg = expect_policy(hsm:sign(blob, "ecdsa-sha256", "m"))
            assert.truthy(msg:find("expired", 1, true), msg)
            assert.truthy(msg:find("'pol/old'", 1, true), msg)
            expect_policy(hsm:verify(blob, "ecdsa-sha256", "m", "sig"))
            expect_policy(hsm:bulk_sign(blob, "ecdsa-sha256", { "m" }))
        end)

        it("an expired aes key neither encrypts nor decrypts", function()
            local blob = H.gen(hsm, { algo = "aes", name = "old-aes", group = "pol",
                                      expiry = os.time() - 10 })
            local msg = expect_policy(hsm:encrypt(blob, "aes-gcm", "m"))
            assert.truthy(msg:find("expired", 1, true), msg)
            expect_policy(hsm:decrypt(blob, "aes-gcm", string.rep("\0", 40)))
        end)

        it("an expired key still shows its info and public key", function()
            local blob = H.gen(hsm, { algo = "ed25519", name = "old-ed", group = "pol",
                                      expiry = os.time() - 10 })
            local info = assert(hsm:key_info(blob))
            assert.is_true(info.verified)
            assert.is_true(info.expiry < os.time())
            assert.is_string(assert(hsm:public_key(blob, "pem")))
        end)

        it("a key with expiry in the future works", function()
            local blob = H.gen(hsm, { algo = "ec", name = "fresh", group = "pol",
                                      expiry = os.time() + 3600 })
            local sig = assert(hsm:sign(blob, "ecdsa-sha256", "m"))
            assert.is_true(hsm:verify(blob, "ecdsa-sha256", "m", sig))
        end)

        it("an expired key is refused even when it is in the cache", function()
            local expiry = os.time() + 2
            local blob = H.gen(hsm, { algo = "ec", name = "soon", group = "pol", expiry = expiry })
            assert(hsm:sign(blob, "ecdsa-sha256", "m")) -- now cached
            while os.time() < expiry do os.execute("sleep 0.2") end -- at most ~2 s
            local msg = expect_policy(hsm:sign(blob, "ecdsa-sha256", "m"))
            assert.truthy(msg:find("expired", 1, true), msg)
        end)
    end)
end)
