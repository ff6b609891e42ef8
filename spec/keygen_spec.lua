-- Key generation: every algorithm, the blob's clear attributes, template
-- errors.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

local function has(list, x)
    for _, v in ipairs(list or {}) do
        if v == x then return true end
    end
    return false
end

describe("softcxi constants", function()
    it("FLAG_OVERWRITE == 1 and FLAG_EXTERNAL == 2", function()
        assert.are.equal(1, softcxi.FLAG_OVERWRITE)
        assert.are.equal(2, softcxi.FLAG_EXTERNAL)
    end)

    it("has a version string", function()
        assert.is_string(softcxi._VERSION)
        assert.truthy(softcxi._VERSION:match("^%d+%.%d+%.%d+"))
    end)
end)

describe("key_generate", function()
    local dev, hsm

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
    end)

    teardown(function()
        H.destroy(dev)
    end)

    -- Generate, then check the blob's framing and both forms of key_info.
    local function check(template, want)
        local t0 = os.time()
        local blob, msg, code = hsm:key_generate(softcxi.FLAG_EXTERNAL, template)
        assert.is_string(blob, tostring(msg) .. " " .. tostring(code))
        assert.are.equal(0x4B, blob:byte(1))
        assert.are.equal("K", blob:sub(1, 1))

        local info = assert(softcxi.key_info(blob))
        assert.is_false(info.verified)
        assert.are.equal(want.algo, info.algo)
        assert.are.equal(want.curve, info.curve)
        assert.are.equal(want.size, info.size)
        assert.are.equal(#blob, info.blob_size)
        assert.are.equal(1, info.version)
        assert.are.equal(hsm:device_info().kcv, info.kcv)
        assert.is_table(info.usage)
        assert.is_number(info.gen_date)
        assert.is_true(info.gen_date >= t0 - 1 and info.gen_date <= os.time() + 1)

        local vinfo, vmsg = hsm:key_info(blob)
        assert.is_table(vinfo, vmsg)
        assert.is_true(vinfo.verified)
        assert.are.equal(info.algo, vinfo.algo)
        assert.are.equal(info.gen_date, vinfo.gen_date)
        return blob, info
    end

    describe("ec", function()
        local sizes = { ["P-256"] = 32, ["P-384"] = 48, ["P-521"] = 66, secp256k1 = 32 }
        for _, curve in ipairs { "P-256", "P-384", "P-521", "secp256k1" } do
            it("curve " .. curve, function()
                local _, info = check({ algo = "ec", curve = curve }, { algo = "ec", curve = curve })
                -- uncompressed point: 04 || X || Y
                assert.are.equal(1 + 2 * sizes[curve], #info.public_key)
                assert.are.equal(4, info.public_key:byte(1))
                assert.is_true(has(info.usage, "sign"))
                assert.is_true(has(info.usage, "verify"))
            end)
        end

        it("defaults to P-256", function()
            check({ algo = "ec" }, { algo = "ec", curve = "P-256" })
        end)

        it("keeps a P-256 blob with its public key under 300 bytes", function()
            local blob = check({ algo = "ec", curve = "P-256", name = "dev-000001", group = "iot" },
                { algo = "ec", curve = "P-256" })
            assert.is_true(#blob < 300, "P-256 blob is " .. #blob .. " bytes")
        end)

        it("makes a different key each time", function()
            local a = check({ algo = "ec" }, { algo = "ec", curve = "P-256" })
            local b = check({ algo = "ec" }, { algo = "ec", curve = "P-256" })
            assert.are_not.equal(a, b)
            assert.are_not.equal(softcxi.key_info(a).public_key, softcxi.key_info(b).public_key)
        end)
    end)

    it("ed25519", function()
        local _, info = check({ algo = "ed25519" }, { algo = "ed25519" })
        assert.are.equal(32, #info.public_key)
        assert.is_true(has(info.usage, "sign"))
    end)

    it("x25519", function()
        local _, info = check({ algo = "x25519" }, { algo = "x25519" })
        assert.are.equal(32, #info.public_key)
        assert.are.same({ "derive" }, info.usage)
    end)

    describe("rsa", function()
        it("2048 (the default size)", function()
            local _, info = check({ algo = "rsa" }, { algo = "rsa", size = 2048 })
            assert.is_string(info.public_key)
            assert.are.equal(0x30, info.public_key:byte(1)) -- RSAPublicKey DER
        end)

        -- 3072 and 4096 are generated once each: check them thoroughly here
        for _, bits in ipairs { 3072, 4096 } do
            it(tostring(bits) .. ", signs, and its SPKI is what openssl would write", function()
                local blob = check({ algo = "rsa", size = bits }, { algo = "rsa", size = bits })
                local sig = assert(hsm:sign(blob, "rsa-pss-sha256", "m"))
                assert.are.equal(bits / 8, #sig)
                assert.is_true(hsm:verify(blob, "rsa-pss-sha256", "m", sig))
                if H.run("openssl version") ~= 0 then return end
                local der = assert(hsm:public_key(blob, "der"))
                local pem = dev.root .. "/rsa" .. bits .. ".pem"
                local out = dev.root .. "/rsa" .. bits .. ".der"
                H.writefile(pem, assert(hsm:public_key(blob, "pem")))
                local rc, o = H.run("openssl pkey -pubin -in " .. H.q(pem)
                    .. " -outform DER -out " .. H.q(out))
                assert.are.equal(0, rc, o)
                assert.are.equal(H.hex(assert(H.readfile(out))), H.hex(der))
            end)
        end
    end)

    describe("aes", function()
        for _, size in ipairs { 128, 192, 256 } do
            it(tostring(size), function()
                local _, info = check({ algo = "aes", size = size }, { algo = "aes", size = size })
                assert.is_nil(info.public_key)
                assert.is_true(has(info.usage, "encrypt"))
                assert.is_true(has(info.usage, "decrypt"))
            end)
        end

        it("defaults to 256 bits", function()
            check({ algo = "aes" }, { algo = "aes", size = 256 })
        end)
    end)

    describe("hmac", function()
        for _, v in ipairs { { "hmac-sha256", 256 }, { "hmac-sha384", 384 }, { "hmac-sha512", 512 } } do
            it(v[1], function()
                local _, info = check({ algo = v[1] }, { algo = v[1], size = v[2] })
                assert.is_nil(info.public_key)
            end)
        end

        it('algo = "hmac", hash = "sha384"', function()
            check({ algo = "hmac", hash = "sha384" }, { algo = "hmac-sha384", size = 384 })
        end)

        it('algo = "hmac" alone is hmac-sha256', function()
            check({ algo = "hmac" }, { algo = "hmac-sha256", size = 256 })
        end)
    end)

    it("carries every attribute of the template", function()
        local expiry = os.time() + 86400
        local blob, info = check({
            algo = "ec", curve = "P-384", name = "dev-42", group = "iot", label = "a label",
            specifier = 7, usage = { "sign", "derive" }, export = "allow-plain", expiry = expiry,
        }, { algo = "ec", curve = "P-384" })
        assert.are.equal("dev-42", info.name)
        assert.are.equal("iot", info.group)
        assert.are.equal("a label", info.label)
        assert.are.equal(7, info.specifier)
        assert.is_true(has(info.usage, "sign"))
        assert.is_true(has(info.usage, "derive"))
        assert.is_false(has(info.usage, "verify"))
        assert.are.equal(2, #info.usage)
        assert.are.equal("allow-plain", info.export)
        assert.are.equal(expiry, info.expiry)

        local v = assert(hsm:key_info(blob))
        for _, k in ipairs { "algo", "curve", "name", "group", "label", "specifier", "export",
                             "expiry", "gen_date", "public_key", "kcv", "blob_size" } do
            assert.are.equal(info[k], v[k], "field " .. k)
        end
        assert.are.same(info.usage, v.usage)
    end)

    it("accepts integral float numbers as integers (as luaL_checkinteger does)", function()
        -- Lua 5.4 makes 365.25 * 86400 a float; LuaJIT has no integer subtype
        local expiry = os.time() + 365.25 * 86400
        local blob, msg = hsm:key_generate(softcxi.FLAG_EXTERNAL,
            { algo = "aes", size = 2 ^ 8, expiry = expiry, specifier = 10 / 2 })
        assert.is_string(blob, msg)
        local info = softcxi.key_info(blob)
        assert.are.equal(256, info.size)
        assert.are.equal(math.floor(expiry), info.expiry)
        assert.are.equal(5, info.specifier)
    end)

    it("rejects non-integral numbers", function()
        local r = H.pack(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "aes", size = 256.5 }))
        assert.is_nil(r[1])
        assert.are.equal("EINVAL", r[3])
        r = H.pack(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", specifier = 1.5 }))
        assert.are.equal("EINVAL", r[3])
    end)

    it("uses deny export and no expiry by default", function()
        local _, info = check({ algo = "ed25519" }, { algo = "ed25519" })
        assert.are.equal("deny", info.export)
        assert.is_nil(info.expiry)
        assert.is_nil(info.specifier)
    end)

    describe("template errors", function()
        local function einval(template, field, flags)
            local r = H.pack(hsm:key_generate(flags or softcxi.FLAG_EXTERNAL, template))
            local i = r[1] and softcxi.key_info(r[1]) or {}
            assert.is_true(r[1] == nil, "template accepted: made an " .. tostring(i.algo)
                .. " key, name '" .. tostring(i.name) .. "', group '" .. tostring(i.group)
                .. "', label '" .. tostring(i.label) .. "'")
            assert.is_string(r[2])
            assert.are.equal("EINVAL", r[3])
            if field then
                assert.truthy(r[2]:find(field, 1, true),
                    "message '" .. r[2] .. "' does not name " .. field)
            end
            return r[2]
        end

        it("unknown algo", function()
            einval({ algo = "dsa" }, "template.algo")
        end)

        it("missing algo", function()
            einval({ curve = "P-256" }, "template.algo")
        end)

        it("unknown curve", function()
            einval({ algo = "ec", curve = "P-192" }, "template.curve")
        end)

        it("a curve on a non-ec key", function()
            einval({ algo = "rsa", curve = "P-256" }, "template.curve")
        end)

        it("rsa 1024", function()
            local msg = einval({ algo = "rsa", size = 1024 }, "template.size")
            assert.truthy(msg:find("1024", 1, true))
        end)

        it("aes 100", function()
            einval({ algo = "aes", size = 100 }, "template.size")
        end)

        it("size that does not match the curve", function()
            einval({ algo = "ec", curve = "P-256", size = 384 }, "template.size")
        end)

        it("size of the wrong type", function()
            einval({ algo = "aes", size = "256" }, "template.size")
        end)

        it("usage 'encrypt' on ed25519", function()
            local msg = einval({ algo = "ed25519", usage = { "encrypt" } }, "template.usage")
            assert.truthy(msg:find("encrypt", 1, true))
        end)

        it("unknown usage name", function()
            einval({ algo = "ec", usage = { "fly" } }, "template.usage")
        end)

        it("unknown export policy", function()
            einval({ algo = "ec", export = "everyone" }, "template.export")
        end)

        it("negative expiry", function()
            einval({ algo = "ec", expiry = -1 }, "template.expiry")
        end)

        it("unknown field", function()
            einval({ algo = "ec", colour = "blue" }, "colour")
        end)

        it("hash on a non-hmac key", function()
            einval({ algo = "aes", hash = "sha384" }, "template.hash")
        end)

        it("unknown hash", function()
            einval({ algo = "hmac", hash = "md5" }, "template.hash")
        end)

        it("a name longer than 255 bytes", function()
            einval({ algo = "ec", name = string.rep("n", 256) }, "template.name")
        end)

        it("flags without FLAG_EXTERNAL", function()
            einval({ algo = "ec" }, nil, 0)
            einval({ algo = "ec" }, nil, softcxi.FLAG_OVERWRITE)
        end)

        it("a contradictory hash (algo = hmac-sha256, hash = sha512)", function()
            -- "hmac-sha256" names the hash already; silently making an
            -- hmac-sha512 key out of it is wrong
            einval({ algo = "hmac-sha256", hash = "sha512" }, "template.hash")
        end)

        it("a name, group or label with an embedded NUL", function()
            -- names are NUL-free in the blob (the parser rejects NULs); the
            -- binding must not silently cut "iot\0x" down to "iot"
            einval({ algo = "ec", name = "dev\0evil" }, "template.name")
            einval({ algo = "ec", group = "iot\0other" }, "template.group")
            einval({ algo = "ec", label = "a\0b" }, "template.label")
        end)

        it("raises on a non-table template", function()
            assert.has_error(function() hsm:key_generate(softcxi.FLAG_EXTERNAL, "ec") end)
        end)
    end)
end)
