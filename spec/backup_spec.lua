-- key_backup / key_restore: an internal key moves, sealed under the MBK, to
-- another device that holds the same MBK.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

describe("key backup", function()
    local a, b, root

    setup(function()
        a, b = H.new_device(), H.new_device()
        root = H.tmpdir()
        -- the second device imports the first one's (shared) MBK
        local shares, pws = { root .. "/s1", root .. "/s2" }, { "share-pw-one", "share-pw-two" }
        for _, d in ipairs { a, b } do
            local admin = assert(softcxi.open { path = d.path, keyfile = d.keyfile })
            assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
            if d == a then
                assert(admin:mbk_generate { m = 2, shares = shares, passwords = pws, kdf_cost = 10 })
            end
            assert(admin:mbk_import { shares = shares, passwords = pws })
            admin:close()
        end
    end)

    teardown(function()
        H.destroy(a)
        H.destroy(b)
        H.rm_rf(root)
    end)

    it("restores on a device with the same MBK, at the same address, and signs the same", function()
        local h = assert(a.hsm:key_generate(0, { algo = "ec", name = "ca-root", group = "pki" }))
        local backup = assert(a.hsm:key_backup(h))
        assert.are.equal("K", backup:sub(1, 1))
        local info = softcxi.key_info(backup) -- readable, but a backup is no usable blob
        assert.are.equal("ca-root", info.name)
        assert.are.equal("key-backup", info.type)
        H.expect_err("EFORMAT", a.hsm:sign(backup, "ecdsa-sha256", "m"))
        local hb = assert(b.hsm:key_restore(0, backup))
        local sig = assert(b.hsm:sign(hb, "ecdsa-sha256", "m"))
        assert.is_true(a.hsm:verify(h, "ecdsa-sha256", "m", sig))
        H.expect_err("EEXIST", b.hsm:key_restore(0, backup))
        assert(b.hsm:key_restore(softcxi.FLAG_OVERWRITE, backup))
    end)

    it("refuses deny-backup keys, tampered backups and devices without the MBK", function()
        local deny = assert(a.hsm:key_generate(0, { algo = "ec", name = "nb", group = "pki",
            export = "deny-backup" }))
        H.expect_err("EPOLICY", a.hsm:key_backup(deny))
        local h = assert(a.hsm:key_generate(0, { algo = "ed25519", name = "x", group = "pki" }))
        local backup = assert(a.hsm:key_backup(h))
        local code = select(3, b.hsm:key_restore(0, H.bitflip(backup, #backup - 5, 2)))
        assert.are.equal("ETAMPER", code)
        local c = H.new_device() -- its own MBK
        local msg = H.expect_err("EMBK", c.hsm:key_restore(0, backup))
        assert.matches("'pki/x'", msg, 1, true)
        H.destroy(c)
        H.expect_err("EINVAL", a.hsm:key_backup(assert(a.hsm:key_generate(softcxi.FLAG_EXTERNAL,
            { algo = "ec", name = "ext", group = "pki" }))))
    end)
end)
