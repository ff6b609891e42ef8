-- The device: its state directory, its key file, reopening, the cache
-- setting and the session's life cycle.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

local expect_err = H.expect_err

describe("device", function()
    local devs = {}
    local function fresh(opts)
        local d = H.new_device(opts)
        devs[#devs + 1] = d
        return d
    end

    teardown(function()
        for _, d in ipairs(devs) do H.destroy(d) end
    end)

    it("creates its state directory and key file, with a 16-hex-digit KCV", function()
        local d = fresh()
        local info = d.hsm:device_info()
        assert.truthy(info.kcv:match("^" .. string.rep("%x", 16) .. "$"), info.kcv)
        assert.truthy(info.id:match("^%x+$"), info.id)
        assert.are.equal(d.keyfile, info.keyfile)
        assert.is_true(H.exists(d.keyfile))
        assert.is_true(H.exists(d.path .. "/device.mbk"))
        local rc, mode = H.run("stat -c %a " .. H.q(d.keyfile))
        assert.are.equal(0, rc)
        assert.are.equal("600", mode:match("%d+"))
    end)

    it("reopening the same path gives the same device", function()
        local d = fresh()
        local info1 = d.hsm:device_info()
        local blob = H.gen(d.hsm, { algo = "ec" })
        d.hsm:close()
        local h2 = H.open(d)
        d.hsm = h2
        local info2 = h2:device_info()
        assert.are.equal(info1.kcv, info2.kcv)
        assert.are.equal(info1.id, info2.id)
        local sig = assert(h2:sign(blob, "ecdsa-sha256", "m"))
        assert.is_true(h2:verify(blob, "ecdsa-sha256", "m", sig))
    end)

    it("two sessions on the same path at once share the MBK", function()
        local d = fresh()
        local h2 = H.open(d)
        assert.are.equal(d.hsm:device_info().kcv, h2:device_info().kcv)
        local blob = H.gen(d.hsm, { algo = "ed25519" })
        assert.is_true(h2:verify(blob, "ed25519", "m", assert(d.hsm:sign(blob, "ed25519", "m"))))
        h2:close()
    end)

    it("a key file readable by others (0644) is EPERM", function()
        local d = fresh()
        d.hsm:close()
        d.hsm = nil
        assert.are.equal(0, (H.run("chmod 0644 " .. H.q(d.keyfile))))
        local msg = expect_err("EPERM", softcxi.open { path = d.path, keyfile = d.keyfile })
        assert.truthy(msg:find(d.keyfile, 1, true), msg)
        -- chmod 600 it, as the message says, and it opens again
        assert.are.equal(0, (H.run("chmod 0600 " .. H.q(d.keyfile))))
        d.hsm = assert(softcxi.open { path = d.path, keyfile = d.keyfile })
    end)

    it("a group-readable key file (0640) is EPERM", function()
        local d = fresh()
        d.hsm:close()
        d.hsm = nil
        assert.are.equal(0, (H.run("chmod 0640 " .. H.q(d.keyfile))))
        expect_err("EPERM", softcxi.open { path = d.path, keyfile = d.keyfile })
    end)

    it("a missing key file for an existing device is ENOTFOUND", function()
        local d = fresh()
        local kcv = d.hsm:device_info().kcv
        d.hsm:close()
        d.hsm = nil
        expect_err("ENOTFOUND", softcxi.open { path = d.path, keyfile = d.root .. "/keys/nope.key" })
        -- moving the real one away gives the same answer
        assert.are.equal(0, (H.run("mv " .. H.q(d.keyfile) .. " " .. H.q(d.keyfile .. ".moved"))))
        expect_err("ENOTFOUND", softcxi.open { path = d.path, keyfile = d.keyfile })
        -- and no new key file was made in its place (the MBK is not replaced)
        assert.is_false(H.exists(d.keyfile))
        assert.are.equal(0, (H.run("mv " .. H.q(d.keyfile .. ".moved") .. " " .. H.q(d.keyfile))))
        d.hsm = assert(softcxi.open { path = d.path, keyfile = d.keyfile })
        assert.are.equal(kcv, d.hsm:device_info().kcv)
    end)

    it("a key file inside the state directory at creation is EINVAL", function()
        local root = H.tmpdir()
        devs[#devs + 1] = { root = root }
        local msg = expect_err("EINVAL", softcxi.init { path = root .. "/state",
            keyfile = root .. "/state/device.key", password = H.ADMIN_PASSWORD, kdf_cost = H.KDF_COST })
        assert.truthy(msg:find("outside", 1, true), msg)
        assert.is_false(H.exists(root .. "/state/device.key"))
    end)

    it("a key file in a new subdirectory of the state directory is EINVAL", function()
        local root = H.tmpdir()
        devs[#devs + 1] = { root = root }
        local kf = root .. "/state/keys/device.key"
        local r = H.pack(softcxi.init { path = root .. "/state", keyfile = kf,
            password = H.ADMIN_PASSWORD, kdf_cost = H.KDF_COST })
        assert.is_false(H.exists(kf), "the device key file was created inside the state directory")
        assert.is_nil(r[1], "created with the key file inside the state directory")
        assert.are.equal("EINVAL", r[3])
    end)

    it("a key file inside the state directory via '..' is EINVAL", function()
        local root = H.tmpdir()
        devs[#devs + 1] = { root = root }
        local kf = root .. "/state/sub/../device.key"
        local r = H.pack(softcxi.init { path = root .. "/state", keyfile = kf,
            password = H.ADMIN_PASSWORD, kdf_cost = H.KDF_COST })
        assert.is_false(H.exists(root .. "/state/device.key"),
            "the device key file was created inside the state directory")
        assert.is_nil(r[1], "created with the key file inside the state directory")
        assert.are.equal("EINVAL", r[3])
    end)

    it("another device's key file is EMBK", function()
        local a, b = fresh(), fresh()
        a.hsm:close()
        a.hsm = nil
        expect_err("EMBK", softcxi.open { path = a.path, keyfile = b.keyfile })
        -- the right one still works
        a.hsm = assert(softcxi.open { path = a.path, keyfile = a.keyfile })
    end)

    it("a corrupt key file is refused", function()
        local d = fresh()
        d.hsm:close()
        d.hsm = nil
        local kf = H.readfile(d.keyfile)
        H.writefile(d.keyfile, H.bitflip(kf, #kf, 0))
        local r = H.pack(softcxi.open { path = d.path, keyfile = d.keyfile })
        assert.is_nil(r[1])
        assert.is_true(r[3] == "EFORMAT" or r[3] == "EMBK" or r[3] == "ETAMPER", tostring(r[3]))
    end)

    it("a tampered state file is ETAMPER or EFORMAT", function()
        local d = fresh()
        d.hsm:close()
        d.hsm = nil
        local sf = d.path .. "/device.mbk"
        local st = H.readfile(sf)
        H.writefile(sf, H.bitflip(st, #st - 20, 2)) -- inside the sealed MBK
        local r = H.pack(softcxi.open { path = d.path, keyfile = d.keyfile })
        assert.is_nil(r[1])
        assert.are.equal("ETAMPER", r[3], tostring(r[2]))
        H.writefile(sf, st:sub(1, 30))
        r = H.pack(softcxi.open { path = d.path, keyfile = d.keyfile })
        assert.is_nil(r[1])
        assert.are.equal("EFORMAT", r[3], tostring(r[2]))
    end)

    it("cache off ({ cache = 0 }) works", function()
        local d = fresh { cache = 0 }
        local info = d.hsm:device_info()
        assert.are.equal(0, info.cache_capacity)
        local blob = H.gen(d.hsm, { algo = "ec" })
        for i = 1, 3 do
            local sig = assert(d.hsm:sign(blob, "ecdsa-sha256", "m" .. i))
            assert.is_true(d.hsm:verify(blob, "ecdsa-sha256", "m" .. i, sig))
        end
        info = d.hsm:device_info()
        assert.are.equal(0, info.cache_entries)
        assert.are.equal(0, info.cache_hits)
        local aes = H.gen(d.hsm, { algo = "aes" })
        assert.are.equal("x", d.hsm:decrypt(aes, "aes-gcm", assert(d.hsm:encrypt(aes, "aes-gcm", "x"))))
    end)

    it("cache on counts hits", function()
        local d = fresh { cache = 16 }
        local blob = H.gen(d.hsm, { algo = "ec" })
        for i = 1, 4 do assert(d.hsm:sign(blob, "ecdsa-sha256", "m" .. i)) end
        local info = d.hsm:device_info()
        assert.is_true(info.cache_capacity >= 16)
        assert.are.equal(1, info.cache_entries)
        assert.are.equal(1, info.cache_misses)
        assert.are.equal(3, info.cache_hits)
    end)

    it("raises on misuse of open", function()
        assert.has_error(function() softcxi.open() end)
        assert.has_error(function() softcxi.open("path") end)
        assert.has_error(function() softcxi.open { keyfile = "x" } end)
        assert.has_error(function() softcxi.open { path = "/tmp/x", colour = 1 } end)
    end)

    describe("close", function()
        local d, blob, aes

        setup(function()
            d = fresh()
            blob = H.gen(d.hsm, { algo = "ec", usage = { "sign", "verify", "derive" } })
            aes = H.gen(d.hsm, { algo = "aes" })
            d.hsm:close()
        end)

        local calls = {
            device_info = function(h) return h:device_info() end,
            key_generate = function(h) return h:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec" }) end,
            sign = function(h) return h:sign(blob, "ecdsa-sha256", "m") end,
            sign_raw = function(h) return h:sign(blob, "ecdsa-sha256", "m", { format = "raw" }) end,
            verify = function(h) return h:verify(blob, "ecdsa-sha256", "m", "sig") end,
            bulk_sign = function(h) return h:bulk_sign(blob, "ecdsa-sha256", { "m" }) end,
            mac = function(h) return h:mac(blob, "hmac-sha256", "m") end,
            mac_verify = function(h) return h:mac_verify(blob, "hmac-sha256", "m", "t") end,
            encrypt = function(h) return h:encrypt(aes, "aes-gcm", "m") end,
            decrypt = function(h) return h:decrypt(aes, "aes-gcm", string.rep("\0", 40)) end,
            secret_agree = function(h) return h:secret_agree(blob, "ecdh", "peer") end,
            rnd_gen = function(h) return h:rnd_gen(8) end,
            key_info = function(h) return h:key_info(blob) end,
            public_key = function(h) return h:public_key(blob) end,
            hash_compute = function(h) return h:hash_compute("sha256", "abc") end,
        }
        local names = {}
        for name in pairs(calls) do names[#names + 1] = name end
        table.sort(names)

        for _, name in ipairs(names) do
            it("then " .. name .. " raises an error containing 'closed'", function()
                local ok, err = pcall(calls[name], d.hsm)
                assert.is_false(ok, name .. " on a closed session did not raise")
                assert.truthy(tostring(err):find("closed", 1, true), tostring(err))
            end)
        end

        it("then decrypt of a too-short aes-gcm input still raises 'closed'", function()
            local ok, err = pcall(function() return d.hsm:decrypt(aes, "aes-gcm", "short") end)
            assert.is_false(ok, "decrypt on a closed session returned instead of raising")
            assert.truthy(tostring(err):find("closed", 1, true), tostring(err))
        end)

        it("twice is fine", function()
            d.hsm:close()
            d.hsm:close()
            assert.are.equal("softcxi.session (closed)", tostring(d.hsm))
        end)
    end)

    it("an open session prints as softcxi.session", function()
        local d = fresh()
        assert.truthy(tostring(d.hsm):find("^softcxi%.session"))
        assert.is_nil(tostring(d.hsm):find("closed", 1, true))
    end)

    it("a dropped session is collected without harm", function()
        local d = fresh()
        for _ = 1, 5 do
            local h = assert(softcxi.open { path = d.path, keyfile = d.keyfile })
            assert(h:rnd_gen(1))
        end
        collectgarbage()
        collectgarbage()
        assert.is_string(d.hsm:rnd_gen(4))
    end)

    describe("reloading the module", function()
        -- package.loaded cleared and require "softcxi" run again, as busted's
        -- insulation, a hot reload or OpenResty's lua_code_cache off do.
        it("a second require of softcxi still signs raw, encrypts and agrees", function()
            local d = fresh()
            local methods = getmetatable(d.hsm).__index
            local saved = {}
            for k, v in pairs(methods) do saved[k] = v end
            local was = { package.loaded.softcxi, package.loaded["softcxi.core"] }
            package.loaded.softcxi, package.loaded["softcxi.core"] = nil, nil
            local ok, err = pcall(function()
                local s2 = require "softcxi"
                local h = assert(s2.open { path = d.path, keyfile = d.keyfile })
                assert(h:logon_pass(H.USER, H.USER_PASSWORD))
                local ec = assert(h:key_generate(s2.FLAG_EXTERNAL,
                    { algo = "ec", usage = { "sign", "verify", "derive" } }))
                local sig = assert(h:sign(ec, "ecdsa-sha256", "m", { format = "raw" }))
                assert(#sig == 64, "raw signature of " .. #sig .. " bytes")
                assert(h:verify(ec, "ecdsa-sha256", "m", sig, { format = "raw" }) == true)
                local aes = assert(h:key_generate(s2.FLAG_EXTERNAL, { algo = "aes" }))
                local ct = assert(h:encrypt(aes, "aes-gcm", "x"))
                assert(assert(h:decrypt(aes, "aes-gcm", ct)) == "x")
                assert(h:secret_agree(ec, "ecdh", assert(h:public_key(ec, "raw")), { raw = true }))
                h:close()
            end)
            -- put the shared methods table and package.loaded back as they were
            local keys = {}
            for k in pairs(methods) do keys[#keys + 1] = k end
            for _, k in ipairs(keys) do methods[k] = nil end
            for k, v in pairs(saved) do methods[k] = v end
            package.loaded.softcxi, package.loaded["softcxi.core"] = was[1], was[2]
            assert.is_true(ok, tostring(err))
        end)

        it("the original facade still works afterwards", function()
            local d = fresh()
            local blob = H.gen(d.hsm, { algo = "ec" })
            local sig = assert(d.hsm:sign(blob, "ecdsa-sha256", "m", { format = "raw" }))
            assert.are.equal(64, #sig)
            local aes = H.gen(d.hsm, { algo = "aes" })
            assert.are.equal(40, #assert(d.hsm:encrypt(aes, "aes-gcm", "abcdefghijkl")))
        end)
    end)

    it("local h <close> works under Lua 5.4", function()
        if _VERSION ~= "Lua 5.4" then
            pending("<close> needs Lua 5.4")
            return
        end
        local d = fresh { open = false }
        local chunk = assert(load([[
            local softcxi, path, keyfile = ...
            local kept
            do
                local h <close> = assert(softcxi.open { path = path, keyfile = keyfile })
                kept = h
                assert(h:rnd_gen(4))
            end
            return kept
        ]], "=close_test", "t"))
        local kept = chunk(softcxi, d.path, d.keyfile)
        assert.are.equal("softcxi.session (closed)", tostring(kept))
        local ok, err = pcall(function() return kept:rnd_gen(4) end)
        assert.is_false(ok)
        assert.truthy(tostring(err):find("closed", 1, true))
    end)
end)
