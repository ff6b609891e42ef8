-- Operations: sign/verify, bulk_sign, AES-GCM, RSA-OAEP, HMAC, secret
-- agreement, random bytes, hashing.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

local expect_err = H.expect_err

describe("operations", function()
    local dev, hsm
    local keys = {}
    local function key(id, template)
        if not keys[id] then keys[id] = H.gen(hsm, template) end
        return keys[id]
    end
    local function rsa()
        -- one RSA-2048 key for every RSA test of this file
        return key("rsa", { algo = "rsa", size = 2048, name = "rsa-1", group = "ops",
                            usage = { "sign", "verify", "encrypt", "decrypt" } })
    end

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
    end)

    teardown(function()
        H.destroy(dev)
    end)

    describe("sign / verify", function()
        local msg = "the quick brown fox jumps over the lazy dog"

        local ecdsa = {
            { "ecdsa-sha256", "P-256", 32 },
            { "ecdsa-sha384", "P-384", 48 },
            { "ecdsa-sha512", "P-521", 66 },
            { "ecdsa-sha256", "secp256k1", 32 },
            { "ecdsa-sha512", "P-256", 32 },
        }
        for _, c in ipairs(ecdsa) do
            local mech, curve, flen = c[1], c[2], c[3]

            it(mech .. " on " .. curve .. " (DER)", function()
                local blob = key("ec-" .. curve, { algo = "ec", curve = curve, name = curve, group = "ops" })
                local sig = assert(hsm:sign(blob, mech, msg))
                assert.are.equal(0x30, sig:byte(1)) -- DER SEQUENCE
                assert.is_true(hsm:verify(blob, mech, msg, sig))
                assert.is_true(hsm:verify(blob, mech, msg, sig, { format = "der" }))
                assert.is_false(hsm:verify(blob, mech, msg .. "!", sig))
            end)

            it(mech .. " on " .. curve .. " (raw r||s)", function()
                local blob = key("ec-" .. curve, { algo = "ec", curve = curve, name = curve, group = "ops" })
                local sig = assert(hsm:sign(blob, mech, msg, { format = "raw" }))
                assert.are.equal(2 * flen, #sig)
                assert.is_true(hsm:verify(blob, mech, msg, sig, { format = "raw" }))
                assert.is_false(hsm:verify(blob, mech, "other", sig, { format = "raw" }))
                -- a raw signature is not a DER one, and the other way round
                assert.is_false(hsm:verify(blob, mech, msg, sig))
                local der = assert(hsm:sign(blob, mech, msg))
                assert.is_false(hsm:verify(blob, mech, msg, der, { format = "raw" }))
                -- wrong length raw: false, not an error
                assert.is_false(hsm:verify(blob, mech, msg, sig:sub(2), { format = "raw" }))
            end)
        end

        it("rsa-pkcs1-sha256", function()
            local blob = rsa()
            local sig = assert(hsm:sign(blob, "rsa-pkcs1-sha256", msg))
            assert.are.equal(256, #sig)
            -- PKCS#1 v1.5 is deterministic
            assert.are.equal(sig, hsm:sign(blob, "rsa-pkcs1-sha256", msg))
            assert.is_true(hsm:verify(blob, "rsa-pkcs1-sha256", msg, sig))
            assert.is_false(hsm:verify(blob, "rsa-pkcs1-sha256", msg .. "x", sig))
            assert.is_false(hsm:verify(blob, "rsa-pss-sha256", msg, sig))
        end)

        it("rsa-pss-sha256", function()
            local blob = rsa()
            local sig = assert(hsm:sign(blob, "rsa-pss-sha256", msg))
            assert.are.equal(256, #sig)
            -- PSS is randomised
            assert.are_not.equal(sig, hsm:sign(blob, "rsa-pss-sha256", msg))
            assert.is_true(hsm:verify(blob, "rsa-pss-sha256", msg, sig))
            assert.is_false(hsm:verify(blob, "rsa-pss-sha256", msg .. "x", sig))
            assert.is_false(hsm:verify(blob, "rsa-pkcs1-sha256", msg, sig))
        end)

        it("ed25519", function()
            local blob = key("ed", { algo = "ed25519", name = "ed-1", group = "ops" })
            local sig = assert(hsm:sign(blob, "ed25519", msg))
            assert.are.equal(64, #sig)
            assert.are.equal(sig, hsm:sign(blob, "ed25519", msg)) -- deterministic
            assert.is_true(hsm:verify(blob, "ed25519", msg, sig))
            assert.is_false(hsm:verify(blob, "ed25519", msg .. "x", sig))
        end)

        it("signs the empty message", function()
            local blob = key("ec-P-256", { algo = "ec", curve = "P-256", name = "P-256", group = "ops" })
            local sig = assert(hsm:sign(blob, "ecdsa-sha256", ""))
            assert.is_true(hsm:verify(blob, "ecdsa-sha256", "", sig))
        end)

        it("verify returns false (not nil) for a garbage signature", function()
            local cases = {
                { key("ec-P-256", { algo = "ec", curve = "P-256", name = "P-256", group = "ops" }),
                  "ecdsa-sha256" },
                { key("ed", { algo = "ed25519", name = "ed-1", group = "ops" }), "ed25519" },
                { rsa(), "rsa-pkcs1-sha256" },
                { rsa(), "rsa-pss-sha256" },
            }
            for _, c in ipairs(cases) do
                for _, garbage in ipairs { "", "x", string.rep("\0", 64), string.rep("\255", 256),
                                           "\48\6\2\1\1\2\1\1" } do
                    local r = H.pack(hsm:verify(c[1], c[2], msg, garbage))
                    assert.are.equal(false, r[1], c[2] .. ": " .. tostring(r[2]))
                end
            end
        end)

        it("bulk_sign signs 50 messages, each verifies", function()
            local blob = key("ec-P-256", { algo = "ec", curve = "P-256", name = "P-256", group = "ops" })
            local msgs = {}
            for i = 1, 50 do msgs[i] = "message #" .. i end
            local sigs = assert(hsm:bulk_sign(blob, "ecdsa-sha256", msgs))
            assert.are.equal(50, #sigs)
            for i = 1, 50 do
                assert.is_true(hsm:verify(blob, "ecdsa-sha256", msgs[i], sigs[i]), "message " .. i)
            end
            assert.is_false(hsm:verify(blob, "ecdsa-sha256", msgs[2], sigs[1]))
        end)

        it("bulk_sign with raw format and with ed25519", function()
            local blob = key("ec-P-256", { algo = "ec", curve = "P-256", name = "P-256", group = "ops" })
            local sigs = assert(hsm:bulk_sign(blob, "ecdsa-sha256", { "a", "b" }, { format = "raw" }))
            assert.are.equal(64, #sigs[1])
            assert.is_true(hsm:verify(blob, "ecdsa-sha256", "b", sigs[2], { format = "raw" }))
            local ed = key("ed", { algo = "ed25519", name = "ed-1", group = "ops" })
            local esigs = assert(hsm:bulk_sign(ed, "ed25519", { "a", "b", "c" }))
            assert.are.equal(esigs[3], hsm:sign(ed, "ed25519", "c"))
            assert.are.same({}, assert(hsm:bulk_sign(ed, "ed25519", {})))
        end)

        it("a mechanism that does not fit the key is EINVAL", function()
            local ec = key("ec-P-256", { algo = "ec", curve = "P-256", name = "P-256", group = "ops" })
            local ed = key("ed", { algo = "ed25519", name = "ed-1", group = "ops" })
            expect_err("EINVAL", hsm:sign(ec, "ed25519", msg))
            expect_err("EINVAL", hsm:sign(ed, "ecdsa-sha256", msg))
            expect_err("EINVAL", hsm:sign(ec, "rsa-pss-sha256", msg))
            expect_err("EINVAL", hsm:sign(rsa(), "ecdsa-sha256", msg))
            expect_err("EINVAL", hsm:verify(ec, "ed25519", msg, "sig"))
            expect_err("EINVAL", hsm:bulk_sign(ec, "ed25519", { msg }))
            expect_err("EINVAL", hsm:sign(ec, "aes-gcm", msg))
            expect_err("EINVAL", hsm:sign(ec, "sha256", msg))
        end)

        it("an unknown mechanism is EINVAL", function()
            local ec = key("ec-P-256", { algo = "ec", curve = "P-256", name = "P-256", group = "ops" })
            local m = expect_err("EINVAL", hsm:sign(ec, "ecdsa-md5", msg))
            assert.truthy(m:find("ecdsa-md5", 1, true))
        end)

        it("raises on a bad format option", function()
            local ec = key("ec-P-256", { algo = "ec", curve = "P-256", name = "P-256", group = "ops" })
            assert.has_error(function() hsm:sign(ec, "ecdsa-sha256", msg, { format = "pem" }) end)
            assert.has_error(function() hsm:sign(ec, "ecdsa-sha256", msg, { colour = 1 }) end)
            assert.has_error(function() hsm:sign(ec, "ecdsa-sha256", msg, "raw") end)
            assert.has_error(function() hsm:sign(ec, "ecdsa-sha256", nil) end)
        end)
    end)

    describe("aes-gcm", function()
        local function aes(size)
            size = size or 256
            return key("aes" .. size, { algo = "aes", size = size, name = "aes-" .. size, group = "ops" })
        end

        for _, size in ipairs { 128, 192, 256 } do
            it("round trip, AES-" .. size, function()
                local blob = aes(size)
                local pt = "attack at dawn"
                local packed = assert(hsm:encrypt(blob, "aes-gcm", pt))
                assert.are.equal(12 + #pt + 16, #packed)
                assert.are.equal(pt, assert(hsm:decrypt(blob, "aes-gcm", packed)))
            end)
        end

        it("draws a fresh IV each time", function()
            local a = assert(hsm:encrypt(aes(), "aes-gcm", "same"))
            local b = assert(hsm:encrypt(aes(), "aes-gcm", "same"))
            assert.are_not.equal(a:sub(1, 12), b:sub(1, 12))
            assert.are_not.equal(a, b)
        end)

        it("round trip with aad", function()
            local blob = aes()
            local packed = assert(hsm:encrypt(blob, "aes-gcm", "secret", { aad = "header" }))
            assert.are.equal(12 + 6 + 16, #packed)
            assert.are.equal("secret", assert(hsm:decrypt(blob, "aes-gcm", packed, { aad = "header" })))
        end)

        it("round trip of the empty plaintext and of 100 KiB", function()
            local blob = aes()
            local e = assert(hsm:encrypt(blob, "aes-gcm", ""))
            assert.are.equal(28, #e)
            assert.are.equal("", assert(hsm:decrypt(blob, "aes-gcm", e)))
            local big = string.rep("0123456789abcdef", 6400)
            local c = assert(hsm:encrypt(blob, "aes-gcm", big))
            assert.are.equal(12 + #big + 16, #c)
            assert.are.equal(big, assert(hsm:decrypt(blob, "aes-gcm", c)))
        end)

        it("detached form: ct, iv, tag; decrypt with { iv =, tag = }", function()
            local blob = aes()
            local ct, iv, tag = hsm:encrypt(blob, "aes-gcm", "hello world", { detached = true, aad = "A" })
            assert.is_string(ct)
            assert.are.equal(11, #ct)
            assert.are.equal(12, #iv)
            assert.are.equal(16, #tag)
            assert.are.equal("hello world",
                assert(hsm:decrypt(blob, "aes-gcm", ct, { iv = iv, tag = tag, aad = "A" })))
            -- the same bytes packed
            assert.are.equal("hello world",
                assert(hsm:decrypt(blob, "aes-gcm", iv .. ct .. tag, { aad = "A" })))
        end)

        it("uses a caller-supplied iv", function()
            local blob = aes()
            local myiv = "0123456789ab"
            local ct, iv, tag = hsm:encrypt(blob, "aes-gcm", "data", { iv = myiv, detached = true })
            assert.are.equal(myiv, iv)
            local packed = assert(hsm:encrypt(blob, "aes-gcm", "data", { iv = myiv }))
            assert.are.equal(myiv, packed:sub(1, 12))
            assert.are.equal(myiv .. ct .. tag, packed) -- same key, iv, data: same output
            assert.are.equal("data", assert(hsm:decrypt(blob, "aes-gcm", packed)))
        end)

        it("rejects an iv of the wrong length", function()
            expect_err("EINVAL", hsm:encrypt(aes(), "aes-gcm", "data", { iv = "short" }))
        end)

        it("tampered ciphertext, iv or tag is ETAMPER", function()
            local blob = aes()
            local packed = assert(hsm:encrypt(blob, "aes-gcm", "some plaintext"))
            for _, pos in ipairs { 1, 12, 13, 20, #packed - 16, #packed - 15, #packed } do
                expect_err("ETAMPER", hsm:decrypt(blob, "aes-gcm", H.bitflip(packed, pos, 0)))
            end
        end)

        it("wrong or missing aad is ETAMPER", function()
            local blob = aes()
            local packed = assert(hsm:encrypt(blob, "aes-gcm", "payload", { aad = "right" }))
            expect_err("ETAMPER", hsm:decrypt(blob, "aes-gcm", packed, { aad = "wrong" }))
            expect_err("ETAMPER", hsm:decrypt(blob, "aes-gcm", packed))
            local noaad = assert(hsm:encrypt(blob, "aes-gcm", "payload"))
            expect_err("ETAMPER", hsm:decrypt(blob, "aes-gcm", noaad, { aad = "extra" }))
        end)

        it("another key is ETAMPER", function()
            local packed = assert(hsm:encrypt(aes(256), "aes-gcm", "payload"))
            local other = H.gen(hsm, { algo = "aes", size = 256 })
            expect_err("ETAMPER", hsm:decrypt(other, "aes-gcm", packed))
        end)

        it("input shorter than iv + tag is EINVAL", function()
            expect_err("EINVAL", hsm:decrypt(aes(), "aes-gcm", string.rep("x", 27)))
        end)

        it("aes-gcm on an ec key is EINVAL", function()
            local ec = key("ec-P-256", { algo = "ec", curve = "P-256", name = "P-256", group = "ops" })
            expect_err("EINVAL", hsm:encrypt(ec, "aes-gcm", "x"))
        end)
    end)

    describe("rsa-oaep", function()
        it("rsa-oaep-sha256 round trip", function()
            local blob = rsa()
            local pt = "a session key, say"
            local ct = assert(hsm:encrypt(blob, "rsa-oaep-sha256", pt))
            assert.are.equal(256, #ct)
            assert.are_not.equal(ct, hsm:encrypt(blob, "rsa-oaep-sha256", pt)) -- randomised
            assert.are.equal(pt, assert(hsm:decrypt(blob, "rsa-oaep-sha256", ct)))
        end)

        it("a corrupt ciphertext or another mechanism fails", function()
            local blob = rsa()
            local ct = assert(hsm:encrypt(blob, "rsa-oaep-sha256", "x"))
            local r = H.pack(hsm:decrypt(blob, "rsa-oaep-sha256", H.bitflip(ct, 100, 3)))
            assert.is_nil(r[1])
            assert.is_string(r[3])
            r = H.pack(hsm:decrypt(blob, "rsa-oaep-sha1", ct))
            assert.is_nil(r[1])
        end)

        it("a message too long for the modulus is an error", function()
            local r = H.pack(hsm:encrypt(rsa(), "rsa-oaep-sha256", string.rep("x", 300)))
            assert.is_nil(r[1])
            assert.is_string(r[2])
            assert.is_string(r[3])
        end)
    end)

    describe("mac", function()
        it("hmac-sha256: mac and mac_verify", function()
            local blob = key("hmac", { algo = "hmac-sha256", name = "mac-1", group = "ops" })
            local tag = assert(hsm:mac(blob, "hmac-sha256", "data"))
            assert.are.equal(32, #tag)
            assert.are.equal(tag, hsm:mac(blob, "hmac-sha256", "data"))
            assert.are.equal(true, hsm:mac_verify(blob, "hmac-sha256", "data", tag))
            assert.are.equal(false, hsm:mac_verify(blob, "hmac-sha256", "datA", tag))
            assert.are.equal(false, hsm:mac_verify(blob, "hmac-sha256", "data", H.bitflip(tag, 5, 1)))
            assert.are.equal(false, hsm:mac_verify(blob, "hmac-sha256", "data", tag:sub(1, 16)))
            assert.are.equal(false, hsm:mac_verify(blob, "hmac-sha256", "data", ""))
        end)

        it("hmac-sha384 and hmac-sha512 sizes", function()
            local b384 = H.gen(hsm, { algo = "hmac", hash = "sha384" })
            local b512 = H.gen(hsm, { algo = "hmac-sha512" })
            assert.are.equal(48, #assert(hsm:mac(b384, "hmac-sha384", "d")))
            assert.are.equal(64, #assert(hsm:mac(b512, "hmac-sha512", "d")))
        end)

        it("a mac mechanism of another hash, or sign on an hmac key, is EINVAL", function()
            local blob = key("hmac", { algo = "hmac-sha256", name = "mac-1", group = "ops" })
            expect_err("EINVAL", hsm:mac(blob, "hmac-sha512", "data"))
            expect_err("EINVAL", hsm:sign(blob, "hmac-sha256", "data"))
            expect_err("EINVAL", hsm:mac(rsa(), "hmac-sha256", "data"))
        end)
    end)

    describe("secret_agree", function()
        local salt, info = "some salt", "softcxi spec"

        local function pair(algo, mech)
            local t = algo == "ec" and { algo = "ec", curve = "P-256", usage = { "derive" } }
                or { algo = "x25519" }
            t.group = "agree"
            local ta, tb = {}, {}
            for k, v in pairs(t) do ta[k], tb[k] = v, v end
            ta.name, tb.name = "alice", "bob"
            return key(mech .. "-a", ta), key(mech .. "-b", tb)
        end

        for _, c in ipairs { { "ec", "ecdh", 32 }, { "x25519", "x25519", 32 } } do
            local algo, mech, zlen = c[1], c[2], c[3]

            describe(mech, function()
                it("raw secrets are equal both ways", function()
                    local a, b = pair(algo, mech)
                    local pa, pb = assert(hsm:public_key(a, "der")), assert(hsm:public_key(b, "der"))
                    local za = assert(hsm:secret_agree(a, mech, pb, { raw = true }))
                    local zb = assert(hsm:secret_agree(b, mech, pa, { raw = true }))
                    assert.are.equal(zlen, #za)
                    assert.are.equal(za, zb)
                end)

                for _, fmt in ipairs { "pem", "der", "raw" } do
                    it("peer given as " .. fmt, function()
                        local a, b = pair(algo, mech)
                        local pa = assert(hsm:public_key(a, fmt))
                        local pb = assert(hsm:public_key(b, fmt))
                        local pb_der = assert(hsm:public_key(b, "der"))
                        local ref = assert(hsm:secret_agree(a, mech, pb_der, { raw = true }))
                        assert.are.equal(ref, assert(hsm:secret_agree(a, mech, pb, { raw = true })))
                        assert.are.equal(ref, assert(hsm:secret_agree(b, mech, pa, { raw = true })))
                        -- and the default: a derived key blob
                        local d = assert(hsm:secret_agree(a, mech, pb, { salt = salt, info = info }))
                        assert.are.equal("K", d:sub(1, 1))
                    end)
                end

                it("default returns an AES key blob of the base key's group", function()
                    local a, b = pair(algo, mech)
                    local pa, pb = assert(hsm:public_key(a, "pem")), assert(hsm:public_key(b, "pem"))
                    local da = assert(hsm:secret_agree(a, mech, pb, { salt = salt, info = info }))
                    local db = assert(hsm:secret_agree(b, mech, pa, { salt = salt, info = info }))
                    assert.are.equal(0x4B, da:byte(1))
                    local ia = assert(softcxi.key_info(da))
                    assert.are.equal("aes", ia.algo)
                    assert.are.equal(256, ia.size)
                    assert.are.equal("agree", ia.group)
                    assert.are.equal("agree", softcxi.key_info(db).group)
                    assert.is_true(assert(hsm:key_info(da)).verified)

                    -- each side decrypts what the other encrypted
                    local c1 = assert(hsm:encrypt(da, "aes-gcm", "from alice"))
                    assert.are.equal("from alice", assert(hsm:decrypt(db, "aes-gcm", c1)))
                    local c2 = assert(hsm:encrypt(db, "aes-gcm", "from bob", { aad = "x" }))
                    assert.are.equal("from bob", assert(hsm:decrypt(da, "aes-gcm", c2, { aad = "x" })))
                end)

                it("different HKDF info gives a different key", function()
                    local a, b = pair(algo, mech)
                    local pa, pb = assert(hsm:public_key(a, "der")), assert(hsm:public_key(b, "der"))
                    local da = assert(hsm:secret_agree(a, mech, pb, { salt = salt, info = "one" }))
                    local db = assert(hsm:secret_agree(b, mech, pa, { salt = salt, info = "two" }))
                    local ct = assert(hsm:encrypt(da, "aes-gcm", "x"))
                    expect_err("ETAMPER", hsm:decrypt(db, "aes-gcm", ct))
                end)

                it("a derived template (hmac) is honoured", function()
                    local a, b = pair(algo, mech)
                    local pa, pb = assert(hsm:public_key(a, "der")), assert(hsm:public_key(b, "der"))
                    local t = { algo = "hmac-sha256" }
                    local da = assert(hsm:secret_agree(a, mech, pb, { template = t }))
                    local db = assert(hsm:secret_agree(b, mech, pa, { template = t }))
                    assert.are.equal("hmac-sha256", softcxi.key_info(da).algo)
                    local tag = assert(hsm:mac(da, "hmac-sha256", "m"))
                    assert.is_true(hsm:mac_verify(db, "hmac-sha256", "m", tag))
                end)
            end)
        end

        it("peer on the wrong curve is EINVAL", function()
            local a = pair("ec", "ecdh")
            local p384 = H.gen(hsm, { algo = "ec", curve = "P-384", usage = { "derive" } })
            local k1 = H.gen(hsm, { algo = "ec", curve = "secp256k1", usage = { "derive" } })
            local x = pair("x25519", "x25519")
            for _, fmt in ipairs { "pem", "der", "raw" } do
                expect_err("EINVAL", hsm:secret_agree(a, "ecdh", assert(hsm:public_key(p384, fmt))))
                expect_err("EINVAL", hsm:secret_agree(a, "ecdh", assert(hsm:public_key(k1, fmt))))
                expect_err("EINVAL", hsm:secret_agree(a, "ecdh", assert(hsm:public_key(x, fmt))))
            end
            expect_err("EINVAL", hsm:secret_agree(x, "x25519", assert(hsm:public_key(a, "der"))))
            expect_err("EINVAL", hsm:secret_agree(a, "ecdh", "not a key"))
        end)

        it("an x25519 raw peer key that begins with 0x30 is a raw key, not DER", function()
            local a = pair("x25519", "x25519")
            local peer = "\48" .. string.rep("\7", 31)
            local z = assert(hsm:secret_agree(a, "x25519", peer, { raw = true }))
            assert.are.equal(32, #z)
        end)

        it("ecdh on an x25519 key, or x25519 on an ec key, is EINVAL", function()
            local a = pair("ec", "ecdh")
            local x = pair("x25519", "x25519")
            expect_err("EINVAL", hsm:secret_agree(a, "x25519", assert(hsm:public_key(x, "raw"))))
            expect_err("EINVAL", hsm:secret_agree(x, "ecdh", assert(hsm:public_key(a, "raw"))))
        end)

        it("a derived key may not leave the base key's group", function()
            local a, b = pair("ec", "ecdh")
            expect_err("EPOLICY", hsm:secret_agree(a, "ecdh", assert(hsm:public_key(b, "der")),
                { template = { algo = "aes", group = "elsewhere" } }))
        end)
    end)

    describe("public_key formats", function()
        local function jwk_field(j, k)
            return j:match('"' .. k .. '"%s*:%s*"([^"]*)"')
        end

        local ec = { { "P-256", 32 }, { "P-384", 48 }, { "P-521", 66 }, { "secp256k1", 32 } }
        for _, c in ipairs(ec) do
            local curve, flen = c[1], c[2]
            it("ec " .. curve .. ": raw point, JWK x/y, PEM = base64(DER)", function()
                local blob = key("ec-" .. curve, { algo = "ec", curve = curve, name = curve, group = "ops" })
                local raw = assert(hsm:public_key(blob, "raw"))
                assert.are.equal(1 + 2 * flen, #raw)
                assert.are.equal(4, raw:byte(1))
                assert.are.equal(softcxi.key_info(blob).public_key, raw)

                local jwk = assert(hsm:public_key(blob, "jwk"))
                assert.are.equal("EC", jwk_field(jwk, "kty"))
                assert.are.equal(curve, jwk_field(jwk, "crv"))
                local x, y = H.b64decode(jwk_field(jwk, "x")), H.b64decode(jwk_field(jwk, "y"))
                assert.is_nil(jwk_field(jwk, "x"):find("[=+/]")) -- base64url, unpadded
                assert.are.equal(flen, #x) -- full field length (RFC 7518 6.2.1.2)
                assert.are.equal(flen, #y)
                assert.are.equal(raw, "\4" .. x .. y)
                assert.is_nil(jwk:find('"d"', 1, true)) -- never the private part

                local der = assert(hsm:public_key(blob, "der"))
                local pem = assert(hsm:public_key(blob)) -- pem is the default
                assert.truthy(pem:match("^%-%-%-%-%-BEGIN PUBLIC KEY%-%-%-%-%-\n"))
                assert.truthy(pem:match("\n%-%-%-%-%-END PUBLIC KEY%-%-%-%-%-\n?$"))
                local body = pem:gsub("%-%-%-%-%-[A-Z ]+%-%-%-%-%-", "")
                assert.are.equal(der, H.b64decode(body))
                -- the raw point closes the SPKI
                assert.are.equal(raw, der:sub(-#raw))
            end)
        end

        for _, c in ipairs { { "ed25519", "Ed25519" }, { "x25519", "X25519" } } do
            it(c[1] .. ": raw 32 bytes, JWK OKP", function()
                local blob = H.gen(hsm, { algo = c[1] })
                local raw = assert(hsm:public_key(blob, "raw"))
                assert.are.equal(32, #raw)
                local jwk = assert(hsm:public_key(blob, "jwk"))
                assert.are.equal("OKP", jwk_field(jwk, "kty"))
                assert.are.equal(c[2], jwk_field(jwk, "crv"))
                assert.are.equal(raw, H.b64decode(jwk_field(jwk, "x")))
                local der = assert(hsm:public_key(blob, "der"))
                assert.are.equal(44, #der)
                assert.are.equal(raw, der:sub(-32))
            end)
        end

        it("rsa: JWK n/e and raw RSAPublicKey", function()
            local blob = rsa()
            local jwk = assert(hsm:public_key(blob, "jwk"))
            assert.are.equal("RSA", jwk_field(jwk, "kty"))
            assert.are.equal("AQAB", jwk_field(jwk, "e"))
            local n = H.b64decode(jwk_field(jwk, "n"))
            assert.are.equal(256, #n)
            assert.is_true(n:byte(1) >= 128) -- no leading zero octet
            local raw = assert(hsm:public_key(blob, "raw"))
            assert.are.equal(0x30, raw:byte(1))
            assert.truthy(raw:find(n, 1, true))
            assert.truthy(assert(hsm:public_key(blob, "der")):find(raw, 1, true))
        end)

        it("the unverified module function gives the same bytes", function()
            local blob = key("ed", { algo = "ed25519", name = "ed-1", group = "ops" })
            for _, fmt in ipairs { "der", "pem", "jwk", "raw" } do
                assert.are.equal(assert(hsm:public_key(blob, fmt)), assert(softcxi.public_key(blob, fmt)))
            end
        end)

        it("a symmetric key has no public key: EINVAL", function()
            local blob = key("aes256", { algo = "aes", size = 256, name = "aes-256", group = "ops" })
            expect_err("EINVAL", hsm:public_key(blob, "der"))
            expect_err("EINVAL", softcxi.public_key(blob, "pem"))
        end)

        it("an unknown format raises", function()
            local blob = key("ed", { algo = "ed25519", name = "ed-1", group = "ops" })
            assert.has_error(function() hsm:public_key(blob, "ssh") end)
            assert.has_error(function() softcxi.public_key(blob, "ssh") end)
        end)
    end)

    describe("rnd_gen", function()
        it("returns the asked number of bytes, different each call", function()
            local a = assert(hsm:rnd_gen(32))
            local b = assert(hsm:rnd_gen(32))
            assert.are.equal(32, #a)
            assert.are.equal(32, #b)
            assert.are_not.equal(a, b)
            assert.are.equal("", hsm:rnd_gen(0))
            assert.are.equal(1000, #hsm:rnd_gen(1000))
        end)

        it("raises on a negative length", function()
            assert.has_error(function() hsm:rnd_gen(-1) end)
        end)
    end)

    describe("hash_compute", function()
        local abc256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

        it("sha256('abc') as softcxi.hash_compute", function()
            assert.are.equal(abc256, H.hex(assert(softcxi.hash_compute("sha256", "abc"))))
        end)

        it("sha256('abc') as hsm:hash_compute", function()
            assert.are.equal(abc256, H.hex(assert(hsm:hash_compute("sha256", "abc"))))
        end)

        it("other digests of 'abc'", function()
            local want = {
                sha1 = "a9993e364706816aba3e25717850c26c9cd0d89d",
                sha384 = "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed"
                    .. "8086072ba1e7cc2358baeca134c825a7",
                sha512 = "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
                    .. "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
                ["sha3-256"] = "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532",
            }
            for mech, hex in pairs(want) do
                assert.are.equal(hex, H.hex(assert(softcxi.hash_compute(mech, "abc"))), mech)
            end
        end)

        it("a non-hash mechanism is EINVAL", function()
            expect_err("EINVAL", softcxi.hash_compute("ecdsa-sha256", "abc"))
            expect_err("EINVAL", softcxi.hash_compute("md5", "abc"))
        end)
    end)
end)
