-- Revocation: a revoked key fails everywhere, copies and rewraps included.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local EXT = softcxi.FLAG_EXTERNAL

describe("key_revoke", function()
    local dev, hsm

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
    end)

    teardown(function()
        H.destroy(dev)
    end)

    it("a revoked blob fails with EREVOKED in this session, another one and another process", function()
        local blob = assert(hsm:key_generate(EXT, { algo = "ec", name = "lost-device", group = "iot" }))
        local keep = assert(hsm:key_generate(EXT, { algo = "ec", name = "fine", group = "iot" }))
        local other = H.open(dev)
        assert(other:sign(blob, "ecdsa-sha256", "m")) -- cached there
        assert(hsm:key_revoke(blob, "device stolen"))
        local msg = H.expect_err("EREVOKED", hsm:sign(blob, "ecdsa-sha256", "m"))
        assert.matches("'iot/lost-device'", msg, 1, true)
        H.expect_err("EREVOKED", other:sign(blob, "ecdsa-sha256", "m"))
        assert(other:sign(keep, "ecdsa-sha256", "m"))
        local list = assert(other:key_revoked())
        assert.are.equal(1, #list)
        assert.are.equal("lost-device", list[1].name)
        assert.are.equal("device stolen", list[1].reason)
        -- a process started now
        assert.are.equal("EREVOKED", H.child_sign_code(dev, blob))
        other:close()
    end)

    it("an internal key can be revoked through its handle", function()
        local h = assert(hsm:key_generate(0, { algo = "ed25519", name = "inside", group = "iot" }))
        assert(hsm:key_revoke(h))
        H.expect_err("EREVOKED", hsm:sign(h, "ed25519", "m"))
    end)

    it("only administrators and users of the key's group may revoke", function()
        local blob = assert(hsm:key_generate(EXT, { algo = "ec", name = "b", group = "billing" }))
        local admin = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        assert(admin:user_add { name = "ivy", password = "ivy-password", groups = { "iot" },
            kdf_cost = H.KDF_COST })
        local ivy = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(ivy:logon_pass("ivy", "ivy-password"))
        H.expect_err("EACCESS", ivy:key_revoke(blob))
        assert(hsm:sign(blob, "ecdsa-sha256", "m"))
        assert(admin:key_revoke(blob, "by the administrator"))
        H.expect_err("EREVOKED", hsm:sign(blob, "ecdsa-sha256", "m"))
        local found = false
        for _, r in ipairs(assert(admin:audit_log())) do
            if r.event == "key_revoke" and r.subject == "'billing/b'" then found = true end
        end
        assert.is_true(found)
        admin:close()
        ivy:close()
    end)
end)
