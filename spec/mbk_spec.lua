-- The MBK lifecycle: key shares out, in on another device, rotation,
-- rewrap, retirement seen by every session and process.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local EXT = softcxi.FLAG_EXTERNAL

describe("mbk", function()
    local a, b, shares_dir, admin_a, app_a
    local PW = { "share-one-pw", "share-two-pw", "share-three-pw" }
    local shares = {}

    setup(function()
        a = H.new_device()
        b = H.new_device()
        app_a = a.hsm
        admin_a = assert(softcxi.open { path = a.path, keyfile = a.keyfile })
        assert(admin_a:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        shares_dir = H.tmpdir()
        for i = 1, 3 do shares[i] = shares_dir .. "/share-" .. i .. ".key" end
    end)

    teardown(function()
        admin_a:close()
        H.destroy(a)
        H.destroy(b)
        H.rm_rf(shares_dir)
    end)

    local blob0, blob1, rewrapped, kcv0

    it("an application user may not generate shares; an administrator writes 2-of-3 files", function()
        H.expect_err("EAUTH", app_a:mbk_generate { m = 2, shares = shares, passwords = PW })
        kcv0 = admin_a:mbk_info().current
        blob0 = assert(app_a:key_generate(EXT, { algo = "ec", name = "old", group = "iot" }))
        -- an internal key too: it must survive the rotation below
        assert(app_a:key_generate(0, { algo = "ec", name = "inside", group = "iot" }))
        assert.are.equal(kcv0, softcxi.key_info(blob0).kcv)
        assert(admin_a:mbk_generate { m = 2, shares = shares, passwords = PW, kdf_cost = 10 })
        for i = 1, 3 do
            local _, mode = H.run("stat -c %a " .. H.q(shares[i]))
            assert.are.equal("600", mode:match("%d+"))
        end
        -- never overwritten
        H.expect_err("EEXIST", admin_a:mbk_generate { m = 2, shares = shares, passwords = PW,
            kdf_cost = 10 })
        assert.are.equal(kcv0, admin_a:mbk_info().current) -- generating does not load it
    end)

    it("import: bad input is refused precisely and changes nothing", function()
        H.expect_err("EINVAL", admin_a:mbk_import { shares = { shares[1] }, passwords = { PW[1] } })
        local msg = H.expect_err("EAUTH", admin_a:mbk_import { shares = { shares[1], shares[2] },
            passwords = { PW[1], "wrong-password" } })
        assert.matches("share-2.key", msg, 1, true)
        H.expect_err("EINVAL", admin_a:mbk_import { shares = { shares[2], shares[2] },
            passwords = { PW[2], PW[2] } })
        H.expect_err("EAUTH", app_a:mbk_import { shares = { shares[1], shares[2] },
            passwords = { PW[1], PW[2] } })
        assert.are.equal(kcv0, admin_a:mbk_info().current)
    end)

    it("import makes the shared MBK current; older blobs still open, in every session", function()
        assert(admin_a:mbk_import { shares = { shares[3], shares[1] }, passwords = { PW[3], PW[1] } })
        local info = admin_a:mbk_info()
        assert.are_not.equal(kcv0, info.current)
        assert.are.same({ kcv0 }, info.older)
        -- app_a is another device instance: it follows at its next call
        assert.are.same(info, app_a:mbk_info())
        assert(app_a:sign(blob0, "ecdsa-sha256", "m"))
        blob1 = assert(app_a:key_generate(EXT, { algo = "ed25519", name = "new", group = "iot" }))
        assert.are.equal(info.current, softcxi.key_info(blob1).kcv)
        H.expect_err("EEXIST", admin_a:mbk_import { shares = { shares[1], shares[2] },
            passwords = { PW[1], PW[2] } })
    end)

    it("key_rewrap moves a blob to the current MBK, keeping key and attributes", function()
        local changed
        rewrapped, changed = assert(app_a:key_rewrap(blob0))
        assert.is_true(changed)
        local old, new = softcxi.key_info(blob0), softcxi.key_info(rewrapped)
        assert.are.equal(admin_a:mbk_info().current, new.kcv)
        assert.are.equal(old.public_key, new.public_key)
        assert.are.equal(old.name, new.name)
        local sig = assert(app_a:sign(rewrapped, "ecdsa-sha256", "m"))
        assert.is_true(app_a:verify(blob0, "ecdsa-sha256", "m", sig))
        local again, changed2 = assert(app_a:key_rewrap(rewrapped))
        assert.is_false(changed2)
        assert.are.equal(rewrapped, again)
    end)

    it("key_rewrap_many re-seals a page in one call, each blob as key_rewrap would", function()
        local olds = {}
        for i = 1, 30 do
            olds[i] = assert(app_a:key_generate(EXT, { algo = "ec", name = "m" .. i, group = "iot" }))
        end
        -- under the old MBK: blob0, a tampered copy, one of another device (foreign MBK),
        -- a malformed one, a current one; in the middle of blobs of the current MBK (which
        -- moved since the others were made: app_a made olds under the new one)
        local tampered = blob0:sub(1, -21) .. string.char((blob0:byte(-20) + 1) % 256) .. blob0:sub(-19)
        local foreign = assert(b.hsm:key_generate(EXT, { algo = "ec", name = "f", group = "iot" }))
        local list = { blob0 }
        for i = 1, 30 do list[#list + 1] = olds[i] end
        table.insert(list, 10, tampered)
        table.insert(list, 20, foreign)
        table.insert(list, 25, "K-not-a-blob")
        for _, threads in ipairs { 1, 2, 0 } do
            local res, n = assert(app_a:key_rewrap_many(list, #list, threads))
            assert.are.equal(#list, #res)
            assert.are.equal(1, n)
            for i, old in ipairs(list) do
                local new, changed, code = app_a:key_rewrap(old)
                if not new then
                    assert.are.equal(code, res[i])
                elseif changed then
                    local a1, a2 = softcxi.key_info(new), softcxi.key_info(res[i])
                    assert.are.equal(a1.kcv, a2.kcv)
                    assert.are.equal(a1.public_key, a2.public_key)
                    assert.are.equal(a1.name, a2.name)
                    assert.are_not.equal(new, res[i])   -- a salt of its own
                    local sig = assert(app_a:sign(res[i], "ecdsa-sha256", "m"))
                    assert.is_true(app_a:verify(old, "ecdsa-sha256", "m", sig))
                else
                    assert.are.equal("current", res[i])
                end
            end
            assert.are.equal("ETAMPER", res[10])
            assert.are.equal("EMBK", res[20])
            assert.are.equal("EFORMAT", res[25])
        end
        -- a prefix of the table; nothing at all
        local res, n = assert(app_a:key_rewrap_many(list, 1))
        assert.are.equal(1, #res)
        assert.are.equal(1, n)
        assert.are.same({}, (assert(app_a:key_rewrap_many({}))))
        -- misuse raises
        assert.has_error(function() app_a:key_rewrap_many("x") end)
        assert.has_error(function() app_a:key_rewrap_many({ blob0, 42 }) end)
        assert.has_error(function() app_a:key_rewrap_many({ blob0 }, -1) end)
        assert.has_error(function() app_a:key_rewrap_many({ blob0 }, 1, 99) end)
        assert.has_error(function() app_a:key_rewrap_many({ blob0 }, 2) end)
        -- a session nobody logged on to: EAUTH for each blob, the call itself runs
        local other = assert(softcxi.open { path = a.path, keyfile = a.keyfile })
        res = assert(other:key_rewrap_many({ blob0, olds[1] }))
        assert.are.same({ "EAUTH", "EAUTH" }, res)
        other:close()
    end)

    it("a second device that imports two of the shares opens the first device's blobs", function()
        local admin_b = assert(softcxi.open { path = b.path, keyfile = b.keyfile })
        assert(admin_b:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        H.expect_err("EMBK", b.hsm:sign(blob1, "ed25519", "m"))
        assert(admin_b:mbk_import { shares = { shares[2], shares[3] }, passwords = { PW[2], PW[3] } })
        local sig = assert(b.hsm:sign(blob1, "ed25519", "m"))
        assert.is_true(app_a:verify(blob1, "ed25519", "m", sig))
        assert(b.hsm:sign(rewrapped, "ecdsa-sha256", "m"))
        local msg = H.expect_err("EMBK", b.hsm:sign(blob0, "ecdsa-sha256", "m"))
        assert.matches(kcv0, msg, 1, true)
        admin_b:close()
    end)

    it("retiring the old MBK: its blobs give EMBK in every session and process, cache or not", function()
        assert(app_a:sign(blob0, "ecdsa-sha256", "m")) -- in app_a's cache now
        H.expect_err("EPOLICY", admin_a:mbk_retire(admin_a:mbk_info().current))
        H.expect_err("ENOTFOUND", admin_a:mbk_retire("0011223344556677"))
        H.expect_err("EINVAL", admin_a:mbk_retire("xyz"))
        assert(admin_a:mbk_retire(kcv0))
        assert.are.same({}, admin_a:mbk_info().older)
        -- the device rewrapped its own keys at import: the internal key still works
        local inside = assert(app_a:key_open("iot", "inside"))
        assert(app_a:sign(inside, "ecdsa-sha256", "m"))
        assert.are.equal(admin_a:mbk_info().current, assert(app_a:key_info(inside)).kcv)
        H.expect_err("EMBK", app_a:sign(blob0, "ecdsa-sha256", "m"))
        H.expect_err("EMBK", app_a:key_rewrap(blob0))
        assert.are.same({ "EMBK", "current" }, (assert(app_a:key_rewrap_many({ blob0, rewrapped }))))
        assert(app_a:sign(rewrapped, "ecdsa-sha256", "m"))
        -- and in a process started now
        assert.are.equal("EMBK", H.child_sign_code(a, blob0))
    end)
end)
