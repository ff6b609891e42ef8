-- key_export and wrapped key_import (RFC 5649 AES-KWP, RSA-OAEP + AES-KWP as
-- AWS / Vault BYOK take it), plain export where the policy allows, and JWK
-- public keys.  The wrapped forms are checked against the openssl command.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local EXT = softcxi.FLAG_EXTERNAL

describe("key_export and wrapped key_import", function()
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
        return out
    end

    local function file(name, data)
        local path = tmp .. "/" .. name
        if data then H.writefile(path, data) end
        return path
    end

    -- An AES-256 wrapping key whose bytes the test knows (openssl needs them).
    local KEK = string.rep("\42", 16) .. string.rep("\7", 16)
    local function kek(usage)
        return assert(hsm:key_import(EXT, { algo = "aes", name = "kek", group = "g",
            usage = usage or { "wrap", "unwrap" } }, KEK, "raw"))
    end

    it("aes-kwp: a key wrapped under an AES key unwraps with openssl and imports back", function()
        local key = assert(hsm:key_generate(EXT, { algo = "ec", name = "k", group = "g",
            export = "allow" }))
        local w = kek()
        local wrapped = assert(hsm:key_export(key, w))
        assert.are.equal(0, #wrapped % 8)
        -- openssl unwraps it to the PKCS#8 of the same key
        openssl("enc -d -id-aes256-wrap-pad -K " .. H.hex(KEK) .. " -iv A65959A6 -in "
            .. H.q(file("w.bin", wrapped)) .. " -out " .. H.q(file("k.der")))
        assert.are.equal(assert(hsm:public_key(key, "pem")),
            openssl("pkey -inform DER -in " .. H.q(file("k.der")) .. " -pubout"))
        -- and the device takes it back, with the new template's policy
        local back = assert(hsm:key_import(EXT, { name = "k2", group = "g" }, wrapped, "aes-kwp", w))
        local sig = assert(hsm:sign(back, "ecdsa-sha256", "m"))
        assert.is_true(hsm:verify(key, "ecdsa-sha256", "m", sig))
        assert.are.equal("deny", softcxi.key_info(back).export)
        -- an AES key wraps as its raw bytes; the template says what comes back
        local aes = assert(hsm:key_generate(EXT, { algo = "aes", size = 128, name = "a",
            group = "g", export = "allow" }))
        local wa = assert(hsm:key_export(aes, w, "aes-kwp"))
        assert.are.equal(24, #wa)
        local aes2 = assert(hsm:key_import(EXT, { algo = "aes", name = "a2", group = "g" }, wa,
            "aes-kwp", w))
        local ct = assert(hsm:encrypt(aes, "aes-gcm", "secret"))
        assert.are.equal("secret", assert(hsm:decrypt(aes2, "aes-gcm", ct)))
    end)

    it("rsa-aes-kwp: imports a key wrapped by openssl the way AWS KMS and Vault BYOK do", function()
        local rsa = assert(hsm:key_generate(EXT, { algo = "rsa", name = "import-key", group = "g",
            usage = { "unwrap" } }))
        H.writefile(file("rsa.pub"), assert(hsm:public_key(rsa, "pem")))
        openssl("genpkey -algorithm ed25519 -outform DER -out " .. H.q(file("ed.der")))
        openssl("rand -out " .. H.q(file("eph.bin")) .. " 32")
        openssl("pkeyutl -encrypt -pubin -inkey " .. H.q(file("rsa.pub"))
            .. " -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256"
            .. " -pkeyopt rsa_mgf1_md:sha256 -in " .. H.q(file("eph.bin")) .. " -out "
            .. H.q(file("eph.enc")))
        openssl("enc -id-aes256-wrap-pad -K " .. H.hex(H.readfile(file("eph.bin")))
            .. " -iv A65959A6 -in " .. H.q(file("ed.der")) .. " -out " .. H.q(file("ed.wrapped")))
        local material = H.readfile(file("eph.enc")) .. H.readfile(file("ed.wrapped"))
        local blob = assert(hsm:key_import(EXT, { name = "byok", group = "g" }, material,
            "rsa-aes-kwp", rsa))
        assert.are.equal("ed25519", softcxi.key_info(blob).algo)
        assert.are.equal(openssl("pkey -inform DER -in " .. H.q(file("ed.der")) .. " -pubout"),
            assert(hsm:public_key(blob, "pem")))
        -- into the internal database: a handle comes back
        local h = assert(hsm:key_import(0, { name = "byok", group = "g" }, material,
            "rsa-aes-kwp", rsa))
        assert.are.equal("I", h:sub(1, 1))
        assert(hsm:sign(h, "ed25519", "m"))
        -- a damaged wrap, another RSA key, a short input: clear errors, no key
        local other = assert(hsm:key_generate(EXT, { algo = "rsa", name = "other", group = "g",
            usage = { "unwrap" } }))
        local msg = H.expect_err("ETAMPER", hsm:key_import(EXT, { name = "x", group = "g" },
            material, "rsa-aes-kwp", other))
        assert.matches("'g/other'", msg, 1, true)
        H.expect_err("ETAMPER", hsm:key_import(EXT, { name = "x", group = "g" },
            H.bitflip(material, #material - 3, 1), "rsa-aes-kwp", rsa))
        H.expect_err("EINVAL", hsm:key_import(EXT, { name = "x", group = "g" },
            material:sub(1, 100), "rsa-aes-kwp", rsa))
    end)

    it("rsa-aes-kwp export under an RSA public key opens with openssl", function()
        -- the receiving side's public key, imported as a wrap-only blob
        openssl("genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out " .. H.q(file("peer.pem")))
        local peer = assert(hsm:key_import(EXT, { name = "peer", group = "g", usage = { "wrap" } },
            openssl("pkey -in " .. H.q(file("peer.pem")) .. " -pubout")))
        local key = assert(hsm:key_generate(EXT, { algo = "ec", curve = "P-384", name = "out",
            group = "g", export = "allow-plain" }))
        local wrapped = assert(hsm:key_export(key, peer))
        assert.are.equal(256 + 8 * math.ceil(#assert(hsm:key_export(key, "plain")) / 8) + 8,
            #wrapped)
        H.writefile(file("eph.enc"), wrapped:sub(1, 256))
        H.writefile(file("key.wrapped"), wrapped:sub(257))
        openssl("pkeyutl -decrypt -inkey " .. H.q(file("peer.pem"))
            .. " -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256"
            .. " -pkeyopt rsa_mgf1_md:sha256 -in " .. H.q(file("eph.enc")) .. " -out "
            .. H.q(file("eph.bin")))
        openssl("enc -d -id-aes256-wrap-pad -K " .. H.hex(H.readfile(file("eph.bin")))
            .. " -iv A65959A6 -in " .. H.q(file("key.wrapped")) .. " -out " .. H.q(file("out.der")))
        assert.are.equal(H.readfile(file("out.der")), assert(hsm:key_export(key, "plain")))
        -- a public-only blob cannot unwrap, nor be exported
        H.expect_err("EPOLICY", hsm:key_import(EXT, { name = "x", group = "g" }, wrapped,
            "rsa-aes-kwp", peer))
        H.expect_err("EINVAL", hsm:key_export(peer, "plain"))
    end)

    it("the export policy decides: deny, allow (wrapped only), allow-plain, deny-backup", function()
        local w = kek()
        local function key(policy)
            return assert(hsm:key_generate(EXT, { algo = "ec", name = "p-" .. policy, group = "g",
                export = policy }))
        end
        for _, policy in ipairs { "deny", "deny-backup" } do
            local k = key(policy)
            local msg = H.expect_err("EPOLICY", hsm:key_export(k, w))
            assert.matches("'g/p-" .. policy .. "'", msg, 1, true)
            assert.matches(policy, msg, 1, true)
            H.expect_err("EPOLICY", hsm:key_export(k, "plain"))
        end
        local allow = key("allow")
        assert(hsm:key_export(allow, w))
        local msg = H.expect_err("EPOLICY", hsm:key_export(allow, "plain"))
        assert.matches("allow-plain", msg, 1, true)
        local plain = assert(hsm:key_export(key("allow-plain"), "plain"))
        assert.are.equal(0x30, plain:byte(1))           -- PKCS#8 DER
        -- an internal key exports by handle
        local h = assert(hsm:key_generate(0, { algo = "hmac", name = "mac", group = "g",
            export = "allow-plain" }))
        assert.are.equal(32, #assert(hsm:key_export(h, "plain")))
        -- every export is audited
        local adm = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(adm:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        local seen = {}
        for _, r in ipairs(assert(adm:audit_log())) do
            if r.event == "key_export" then seen[#seen + 1] = r.subject .. " " .. r.detail end
        end
        assert.is_truthy(table.concat(seen, "|"):find("'g/p-allow' aes-kwp under 'g/kek'", 1, true))
        assert.is_truthy(table.concat(seen, "|"):find("'g/mac' plain", 1, true))
        adm:close()
    end)

    it("the wrapping key needs the wrap usage, the right kind and the user's group", function()
        local k = assert(hsm:key_generate(EXT, { algo = "ec", name = "k", group = "g",
            export = "allow" }))
        local msg = H.expect_err("EPOLICY", hsm:key_export(k, kek({ "encrypt" })))
        assert.matches("'g/kek'", msg, 1, true)
        assert.matches("wrap", msg, 1, true)
        H.expect_err("EPOLICY", hsm:key_import(EXT, { name = "x", group = "g" },
            assert(hsm:key_export(k, kek())), "aes-kwp", kek({ "wrap" })))
        local ec = assert(hsm:key_generate(EXT, { algo = "ec", name = "ec", group = "g" }))
        msg = H.expect_err("EINVAL", hsm:key_export(k, ec))
        assert.matches("AES or RSA", msg, 1, true)
        H.expect_err("EINVAL", hsm:key_export(k, kek(), "rsa-aes-kwp"))
        H.expect_err("EINVAL", hsm:key_export(k, kek(), "des"))
        H.expect_err("ETAMPER", hsm:key_import(EXT, { name = "x", group = "g" },
            string.rep("\0", 40), "aes-kwp", kek()))
        H.expect_err("EINVAL", hsm:key_import(EXT, { name = "x", group = "g" }, "short",
            "aes-kwp", kek()))
        assert.has_error(function() hsm:key_import(EXT, {}, "x", "aes-kwp") end)
        assert.has_error(function() hsm:key_export(k) end)
        -- a user of group g only may not wrap under a key of group h
        local adm = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(adm:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        assert(adm:user_add { name = "gonly", password = "gonly-password", groups = "g",
            kdf_cost = H.KDF_COST })
        adm:close()
        local hk = assert(hsm:key_import(EXT, { algo = "aes", name = "kek-h", group = "h",
            usage = { "wrap" } }, KEK, "raw"))
        local u = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(u:logon_pass("gonly", "gonly-password"))
        msg = H.expect_err("EACCESS", u:key_export(k, hk))
        assert.matches("'h'", msg, 1, true)
        u:close()
    end)
end)

describe("key_import of a JWK", function()
    local dev, hsm

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
    end)

    teardown(function() H.destroy(dev) end)

    it("EC, Ed25519 and RSA public JWKs become verify-only blobs that verify", function()
        for _, t in ipairs {
            { { algo = "ec", curve = "P-256" }, "ecdsa-sha256" },
            { { algo = "ec", curve = "P-521" }, "ecdsa-sha512" },
            { { algo = "ed25519" }, "ed25519" },
            { { algo = "rsa" }, "rsa-pss-sha256" },
        } do
            local tpl = t[1]
            tpl.name, tpl.group = "signer", "g"
            local signer = assert(hsm:key_generate(EXT, tpl))
            local jwk = assert(hsm:public_key(signer, "jwk"))
            -- members a JWK may carry besides the key are skipped
            local decorated = jwk:gsub("^{", '{"use":"sig","key_ops":["verify"],"ext":true,'
                .. '"kid":"k\\u0031","n2":{"a":[1,2.5e3,null]},')
            local v = assert(hsm:key_import(EXT, { name = "v", group = "g" }, decorated))
            assert.are.same({ "verify" }, softcxi.key_info(v).usage)
            assert.are.equal(assert(hsm:public_key(signer, "pem")), assert(hsm:public_key(v, "pem")))
            local sig = assert(hsm:sign(signer, t[2], "m"))
            assert.is_true(hsm:verify(v, t[2], "m", sig))
            H.expect_err("EPOLICY", hsm:sign(v, t[2], "m"))
        end
    end)

    it("refuses private, malformed and inconsistent JWKs with the reason", function()
        local signer = assert(hsm:key_generate(EXT, { algo = "ec", name = "s", group = "g" }))
        local jwk = assert(hsm:public_key(signer, "jwk"))
        local function bad(text, want)
            local msg = H.expect_err("EINVAL", hsm:key_import(EXT, { name = "v", group = "g" },
                text, "jwk"))
            if want then assert.matches(want, msg, 1, true) end
        end
        bad(jwk:gsub("}$", ',"d":"AAAA"}'), "private")
        bad(jwk:gsub("}$", ""), "not a JWK")
        bad(jwk .. "x", "not a JWK")
        bad(jwk:gsub('"P%-256"', '"P-999"'), "P-999")
        bad(jwk:gsub('"kty":"EC"', '"kty":"oct"'), "oct")
        bad(jwk:gsub('"x":"', '"x":"AA'), "x and y")
        bad(jwk:gsub('"x":"', '"x":"!'), "x and y")
        bad(jwk:gsub('"crv"', '"x":"A","crv"'), "not a JWK")              -- x twice
        bad('{"kty":"OKP","crv":"Ed448","x":"AAAA"}', "Ed25519")
        bad('{"kty":"RSA","e":"AQAB"}', "RSA")
        bad(string.rep("[", 40) .. string.rep("]", 40), "not a JWK")
        bad("", "not a JWK")
        -- a point off the curve is refused by the SPKI check behind it
        local x = jwk:match('"x":"([^"]+)"')
        H.expect_err("EINVAL", hsm:key_import(EXT, { name = "v", group = "g" },
            jwk:gsub('"y":"[^"]+"', '"y":"' .. x .. '"'), "jwk"))
    end)
end)
