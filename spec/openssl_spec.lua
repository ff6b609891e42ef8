-- Interop with the openssl CLI: softcxi's signatures, public keys (hand-built
-- SubjectPublicKeyInfo) and RSA-OAEP as OpenSSL sees them.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")

local have_openssl = (H.run("openssl version")) == 0

describe("openssl interop", function()
    if not have_openssl then
        pending("the openssl command is not available")
        return
    end

    local dev, hsm, dir, rsa_blob
    local message = "softcxi talks to openssl\n" .. string.rep("payload ", 100)

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
        dir = dev.root .. "/ossl"
        H.mkdir_p(dir)
        H.writefile(dir .. "/msg.bin", message)
        rsa_blob = H.gen(hsm, { algo = "rsa", size = 2048, name = "rsa", group = "ossl",
                                usage = { "sign", "verify", "encrypt", "decrypt" } })
    end)

    teardown(function()
        H.destroy(dev)
    end)

    local function f(name) return dir .. "/" .. name end

    -- Write the blob's PEM public key; returns its path.
    local function pem_of(blob, name)
        local pem = assert(hsm:public_key(blob, "pem"))
        assert.truthy(pem:find("-----BEGIN PUBLIC KEY-----", 1, true))
        local path = f(name .. ".pem")
        H.writefile(path, pem)
        return path
    end

    local function ossl(args)
        return H.run("openssl " .. args)
    end

    local function verified_ok(rc, out)
        assert.are.equal(0, rc, out)
        assert.truthy(out:find("Verified OK", 1, true), out)
    end

    local function rejected(rc, out)
        assert.are_not.equal(0, rc, out)
        assert.is_nil(out:find("Verified OK", 1, true), out)
    end

    describe("ECDSA (openssl dgst -verify)", function()
        for _, c in ipairs {
            { "P-256", "ecdsa-sha256", "sha256" },
            { "P-384", "ecdsa-sha384", "sha384" },
            { "P-521", "ecdsa-sha512", "sha512" },
            { "secp256k1", "ecdsa-sha256", "sha256" },
        } do
            local curve, mech, md = c[1], c[2], c[3]
            it(curve .. " with " .. md, function()
                local blob = H.gen(hsm, { algo = "ec", curve = curve })
                local pub = pem_of(blob, "ec-" .. curve)
                local sig = assert(hsm:sign(blob, mech, message))
                H.writefile(f("sig.bin"), sig)
                verified_ok(ossl("dgst -" .. md .. " -verify " .. H.q(pub) .. " -signature "
                    .. H.q(f("sig.bin")) .. " " .. H.q(f("msg.bin"))))
                -- a signature over another message is refused
                local other = assert(hsm:sign(blob, mech, "something else"))
                H.writefile(f("sig.bin"), other)
                rejected(ossl("dgst -" .. md .. " -verify " .. H.q(pub) .. " -signature "
                    .. H.q(f("sig.bin")) .. " " .. H.q(f("msg.bin"))))
            end)
        end

        it("a P-256 signature parses as DER SEQUENCE { r, s } (openssl asn1parse)", function()
            local blob = H.gen(hsm, { algo = "ec", curve = "P-256" })
            local sig = assert(hsm:sign(blob, "ecdsa-sha256", message))
            H.writefile(f("sig.der"), sig)
            local rc, out = ossl("asn1parse -inform DER -in " .. H.q(f("sig.der")))
            assert.are.equal(0, rc, out)
            local _, n = out:gsub("INTEGER", "")
            assert.are.equal(2, n, out) -- SEQUENCE { r INTEGER, s INTEGER }
        end)
    end)

    it("Ed25519 (openssl pkeyutl -verify -rawin)", function()
        local blob = H.gen(hsm, { algo = "ed25519" })
        local pub = pem_of(blob, "ed25519")
        H.writefile(f("sig.bin"), assert(hsm:sign(blob, "ed25519", message)))
        local cmd = "pkeyutl -verify -pubin -inkey " .. H.q(pub) .. " -rawin -in "
            .. H.q(f("msg.bin")) .. " -sigfile " .. H.q(f("sig.bin"))
        local rc, out = ossl(cmd)
        assert.are.equal(0, rc, out)
        assert.truthy(out:find("Signature Verified Successfully", 1, true), out)
        H.writefile(f("sig.bin"), assert(hsm:sign(blob, "ed25519", "other")))
        rc, out = ossl(cmd)
        assert.are_not.equal(0, rc, out)
    end)

    it("RSA-PSS (openssl dgst -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:-1)", function()
        local pub = pem_of(rsa_blob, "rsa")
        H.writefile(f("sig.bin"), assert(hsm:sign(rsa_blob, "rsa-pss-sha256", message)))
        verified_ok(ossl("dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:-1 -verify "
            .. H.q(pub) .. " -signature " .. H.q(f("sig.bin")) .. " " .. H.q(f("msg.bin"))))
        -- salt length = digest length: also accepted when openssl is told so
        verified_ok(ossl("dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32 -verify "
            .. H.q(pub) .. " -signature " .. H.q(f("sig.bin")) .. " " .. H.q(f("msg.bin"))))
        -- and it is not a PKCS#1 v1.5 signature
        rejected(ossl("dgst -sha256 -verify " .. H.q(pub) .. " -signature " .. H.q(f("sig.bin"))
            .. " " .. H.q(f("msg.bin"))))
    end)

    it("RSA PKCS#1 v1.5 (openssl dgst -sha256 -verify)", function()
        local pub = pem_of(rsa_blob, "rsa")
        H.writefile(f("sig.bin"), assert(hsm:sign(rsa_blob, "rsa-pkcs1-sha256", message)))
        verified_ok(ossl("dgst -sha256 -verify " .. H.q(pub) .. " -signature " .. H.q(f("sig.bin"))
            .. " " .. H.q(f("msg.bin"))))
        H.writefile(f("msg2.bin"), message .. "x")
        rejected(ossl("dgst -sha256 -verify " .. H.q(pub) .. " -signature " .. H.q(f("sig.bin"))
            .. " " .. H.q(f("msg2.bin"))))
    end)

    it("RSA-OAEP-SHA256: openssl encrypts, softcxi decrypts", function()
        local pub = pem_of(rsa_blob, "rsa")
        local pt = "a 32-byte session key, at most.."
        H.writefile(f("pt.bin"), pt)
        local rc, out = ossl("pkeyutl -encrypt -pubin -inkey " .. H.q(pub)
            .. " -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256"
            .. " -pkeyopt rsa_mgf1_md:sha256 -in " .. H.q(f("pt.bin")) .. " -out " .. H.q(f("ct.bin")))
        assert.are.equal(0, rc, out)
        local ct = assert(H.readfile(f("ct.bin")))
        assert.are.equal(256, #ct)
        assert.are.equal(pt, assert(hsm:decrypt(rsa_blob, "rsa-oaep-sha256", ct)))
        -- the sha1 mechanism does not open a sha256 ciphertext
        local r = H.pack(hsm:decrypt(rsa_blob, "rsa-oaep-sha1", ct))
        assert.is_nil(r[1])
    end)

    describe("SubjectPublicKeyInfo DER equals openssl's re-encoding", function()
        local cases = {
            { "ec P-256", { algo = "ec", curve = "P-256" } },
            { "ec P-384", { algo = "ec", curve = "P-384" } },
            { "ec P-521", { algo = "ec", curve = "P-521" } },
            { "ec secp256k1", { algo = "ec", curve = "secp256k1" } },
            { "ed25519", { algo = "ed25519" } },
            { "x25519", { algo = "x25519" } },
            { "rsa 2048", "rsa" },
        }
        for _, c in ipairs(cases) do
            it(c[1], function()
                local blob = c[2] == "rsa" and rsa_blob or H.gen(hsm, c[2])
                local pub = pem_of(blob, "spki")
                local der = assert(hsm:public_key(blob, "der"))
                local rc, out = ossl("pkey -pubin -in " .. H.q(pub) .. " -outform DER -out "
                    .. H.q(f("spki.der")))
                assert.are.equal(0, rc, out)
                local want = assert(H.readfile(f("spki.der")))
                assert.are.equal(H.hex(want), H.hex(der))
                -- the unverified read gives the same bytes
                assert.are.equal(der, assert(H.softcxi.public_key(blob, "der")))
                -- and openssl parses our DER directly too
                H.writefile(f("ours.der"), der)
                rc, out = ossl("pkey -pubin -inform DER -in " .. H.q(f("ours.der")) .. " -noout")
                assert.are.equal(0, rc, out)
            end)
        end
    end)
end)
