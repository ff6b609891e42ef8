-- key_import: keys from outside become blobs (PKCS#8, SPKI, raw).
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local EXT = softcxi.FLAG_EXTERNAL

describe("key_import", function()
    local dev, hsm, tmp

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
        tmp = H.tmpdir()
    end)

    teardown(function()
        H.destroy(dev)
        H.rm_rf(tmp)
    end)

    local function openssl(args)
        local rc, out = H.run("openssl " .. args)
        assert.are.equal(0, rc, out)
    end

    it("a PKCS#8 PEM private key from openssl signs, and openssl verifies it", function()
        openssl("genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out " .. H.q(tmp .. "/k.pem"))
        openssl("pkey -in " .. H.q(tmp .. "/k.pem") .. " -pubout -out " .. H.q(tmp .. "/pub.pem"))
        local blob = assert(hsm:key_import(EXT, { name = "imported", group = "ops" },
            H.readfile(tmp .. "/k.pem")))
        local info = softcxi.key_info(blob)
        assert.are.equal("ec", info.algo)
        assert.are.equal("P-384", info.curve)
        assert.are.same({ "sign", "verify" }, info.usage)
        -- the device's public key is the one openssl has
        assert.are.equal(H.readfile(tmp .. "/pub.pem"), hsm:public_key(blob, "pem"))
        local sig = assert(hsm:sign(blob, "ecdsa-sha384", "hello"))
        H.writefile(tmp .. "/msg", "hello")
        H.writefile(tmp .. "/sig", sig)
        openssl("dgst -sha384 -verify " .. H.q(tmp .. "/pub.pem") .. " -signature "
            .. H.q(tmp .. "/sig") .. " " .. H.q(tmp .. "/msg"))
    end)

    it("a DER PKCS#8 RSA key needs the format named", function()
        openssl("genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -outform DER -out "
            .. H.q(tmp .. "/rsa.der"))
        local der = H.readfile(tmp .. "/rsa.der")
        assert.has_error(function() hsm:key_import(EXT, {}, der) end)
        local blob = assert(hsm:key_import(EXT, { usage = { "decrypt", "encrypt" } }, der, "pkcs8"))
        local ct = assert(hsm:encrypt(blob, "rsa-oaep-sha256", "secret"))
        assert.are.equal("secret", hsm:decrypt(blob, "rsa-oaep-sha256", ct))
    end)

    it("a public key becomes a verify-only blob that cannot sign", function()
        local signer = assert(hsm:key_generate(EXT, { algo = "ed25519", name = "s", group = "g" }))
        local pub = assert(hsm:public_key(signer, "pem"))
        local vblob = assert(hsm:key_import(EXT, { name = "s-pub", group = "g" }, pub))
        local info = softcxi.key_info(vblob)
        assert.are.same({ "verify" }, info.usage)
        assert.is_true(#vblob < #signer + 16)
        local sig = assert(hsm:sign(signer, "ed25519", "m"))
        assert.is_true(hsm:verify(vblob, "ed25519", "m", sig))
        assert.is_false(hsm:verify(vblob, "ed25519", "x", sig))
        H.expect_err("EPOLICY", hsm:sign(vblob, "ed25519", "m"))
        assert.are.equal(pub, hsm:public_key(vblob, "pem"))
        -- and it is sealed like any blob: a flipped bit is refused
        local code = select(3, hsm:verify(H.bitflip(vblob, #vblob - 20, 0), "ed25519", "m", sig))
        assert.is_true(code == "ETAMPER" or code == "EFORMAT")
    end)

    it("a public key cannot be given signing usage", function()
        local k = assert(hsm:key_generate(EXT, { algo = "ec" }))
        local msg = H.expect_err("EINVAL", hsm:key_import(EXT, { usage = { "sign" } },
            assert(hsm:public_key(k, "pem"))))
        assert.matches("template.usage", msg, 1, true)
    end)

    it("raw AES and HMAC keys, sized by their bytes", function()
        local aes = assert(hsm:key_import(EXT, { algo = "aes", name = "a" }, string.rep("k", 16), "raw"))
        assert.are.equal(128, softcxi.key_info(aes).size)
        local hm = assert(hsm:key_import(EXT, { algo = "hmac-sha256" }, string.rep("h", 32), "raw"))
        local mac = assert(hsm:mac(hm, "hmac-sha256", "m"))
        assert.are.equal(32, #mac)
        H.expect_err("EINVAL", hsm:key_import(EXT, { algo = "aes" }, string.rep("k", 17), "raw"))
        H.expect_err("EINVAL", hsm:key_import(EXT, { algo = "aes", size = 256 },
            string.rep("k", 16), "raw"))
        H.expect_err("EINVAL", hsm:key_import(EXT, { algo = "rsa" }, "xx", "raw"))
    end)

    it("junk, a template that contradicts the key, and flags without EXTERNAL are EINVAL", function()
        H.expect_err("EINVAL", hsm:key_import(EXT, {}, "not a key", "pkcs8"))
        H.expect_err("EINVAL", hsm:key_import(EXT, {}, "-----BEGIN PUBLIC KEY-----\nAAAA\n"
            .. "-----END PUBLIC KEY-----\n"))
        local k = assert(hsm:key_generate(EXT, { algo = "ec" }))
        local msg = H.expect_err("EINVAL", hsm:key_import(EXT, { algo = "rsa" },
            assert(hsm:public_key(k, "der")), "spki"))
        assert.matches("the key is ec", msg, 1, true)
        H.expect_err("EINVAL", hsm:key_import(0, {}, assert(hsm:public_key(k, "pem"))))
        assert.has_error(function() hsm:key_import(EXT, {}, "x", "bogus") end)
    end)
end)
