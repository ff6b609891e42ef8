-- Internal keys (the device's key database, 8 MiB) and the audit log.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local EXT, OVERWRITE = softcxi.FLAG_EXTERNAL, softcxi.FLAG_OVERWRITE

describe("internal keys", function()
    local dev, hsm

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
    end)

    teardown(function()
        H.destroy(dev)
    end)

    it("key_generate without FLAG_EXTERNAL stores the key and returns a handle", function()
        local h = assert(hsm:key_generate(0, { algo = "ec", name = "root", group = "ca" }))
        assert.are.equal("I", h:sub(1, 1))
        assert.is_true(#h < 32)
        local sig = assert(hsm:sign(h, "ecdsa-sha256", "m"))
        assert.is_true(hsm:verify(h, "ecdsa-sha256", "m", sig))
        local info = assert(hsm:key_info(h))
        assert.is_true(info.verified)
        assert.are.equal("root", info.name)
        H.expect_err("EFORMAT", softcxi.key_info(h)) -- a handle is not a blob
        H.expect_err("EINVAL", hsm:key_generate(0, { algo = "ec", group = "ca" })) -- no name
    end)

    it("an address is taken once; FLAG_OVERWRITE replaces", function()
        local h1 = assert(hsm:key_generate(0, { algo = "ed25519", name = "k", group = "g" }))
        local pub1 = assert(hsm:public_key(h1, "raw"))
        H.expect_err("EEXIST", hsm:key_generate(0, { algo = "ed25519", name = "k", group = "g" }))
        assert(hsm:key_generate(OVERWRITE, { algo = "ed25519", name = "k", group = "g" }))
        assert.are_not.equal(pub1, assert(hsm:public_key(h1, "raw")))
    end)

    it("key_open, key_list, key_delete; other sessions see the database", function()
        assert(hsm:key_generate(0, { algo = "aes", name = "data", group = "g", specifier = 3 }))
        local other = H.open(dev)
        local h = assert(other:key_open("g", "data", 3))
        local ct = assert(other:encrypt(h, "aes-gcm", "x"))
        assert.are.equal("x", hsm:decrypt(h, "aes-gcm", ct))
        H.expect_err("ENOTFOUND", other:key_open("g", "data"))
        local names = {}
        for _, k in ipairs(assert(other:key_list())) do names[#names + 1] = k.group .. "/" .. k.name end
        assert.is_truthy(table.concat(names, " "):find("g/data", 1, true))
        assert(other:key_delete(h))
        H.expect_err("ENOTFOUND", hsm:encrypt(h, "aes-gcm", "x"))
        other:close()
    end)

    it("a user sees and uses only internal keys of his groups", function()
        assert(hsm:key_generate(0, { algo = "ec", name = "secret", group = "billing" }))
        local admin = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        assert(admin:user_add { name = "carol", password = "carol-password", groups = { "iot" },
            kdf_cost = H.KDF_COST })
        local carol = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(carol:logon_pass("carol", "carol-password"))
        H.expect_err("EACCESS", carol:key_open("billing", "secret"))
        for _, k in ipairs(assert(carol:key_list())) do assert.are.equal("iot", k.group) end
        admin:close()
        carol:close()
    end)

    it("the database refuses cleanly when full, and keeps what it had", function()
        local small = H.new_device({ open = false })
        local h = assert(softcxi.open { path = small.path, keyfile = small.keyfile,
            keydb_limit = 2000 })
        assert(h:logon_pass(H.USER, H.USER_PASSWORD))
        local stored, msg, code = 0, nil, nil
        for i = 1, 100 do
            local r
            r, msg, code = h:key_generate(0, { algo = "ec", name = "k" .. i, group = "g" })
            if not r then break end
            stored = i
        end
        assert.are.equal("EFULL", code)
        assert.matches("FLAG_EXTERNAL", msg, 1, true)
        assert.is_true(stored >= 5)
        local used, limit = assert(h:keydb_usage())
        assert.is_true(used <= limit and limit == 2000)
        h:close()
        local again = H.open(small)
        for i = 1, stored do assert(again:key_open("g", "k" .. i)) end
        assert(again:key_generate(EXT, { algo = "ec", name = "outside", group = "g" }))
        again:close()
        H.destroy(small)
    end)
end)

describe("audit log", function()
    local dev, admin

    setup(function()
        dev = H.new_device()
        admin = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        H.expect_err("EAUTH", softcxi.open({ path = dev.path, keyfile = dev.keyfile })
            :logon_pass(H.USER, "wrong-password"))
    end)

    teardown(function()
        admin:close()
        H.destroy(dev)
    end)

    it("records init, logons (failed ones too) and user management, and verifies", function()
        local events = {}
        for _, r in ipairs(assert(admin:audit_log())) do
            events[#events + 1] = r.event .. ":" .. r.subject
        end
        local all = table.concat(events, " ")
        for _, want in ipairs { "init:ADMIN", "logon:ADMIN", "user_add:app", "logon:app",
                                "logon-failed:app" } do
            assert.is_truthy(all:find(want, 1, true), want .. " missing in " .. all)
        end
        local ok, n = admin:audit_verify()
        assert.is_true(ok)
        assert.are.equal(#events, n)
        H.expect_err("EAUTH", dev.hsm:audit_log())
    end)

    it("an edited byte or a cut-off last record is detected", function()
        local log = dev.path .. "/audit.log"
        local text = H.readfile(log)
        local pos = text:find("logon\t", 1, true)
        H.writefile(log, text:sub(1, pos - 1) .. "Logon" .. text:sub(pos + 5))
        local msg = H.expect_err("ETAMPER", admin:audit_verify())
        assert.matches("record", msg, 1, true)
        H.writefile(log, text)
        assert(admin:audit_verify())
        H.writefile(log, text:gsub("[^\n]*\n$", ""))
        msg = H.expect_err("ETAMPER", admin:audit_verify())
        assert.matches("cut off", msg, 1, true)
        -- an administrative action the log cannot record does not happen
        H.expect_err("ETAMPER", admin:user_add { name = "ghost", password = "ghost-password",
            kdf_cost = H.KDF_COST })
        H.writefile(log, text)
        assert(admin:audit_verify())
        for _, u in ipairs(assert(admin:user_list())) do assert.are_not.equal("ghost", u.name) end
    end)
end)

describe("get_state", function()
    it("tells the device's id, MBK, users, database use and revocations", function()
        local dev = H.new_device()
        local st = assert(dev.hsm:get_state())
        assert.is_true(st.initialised)
        assert.are.equal(softcxi._VERSION, st.version)
        assert.are.equal(dev.hsm:device_info().id, st.id)
        assert.are.equal(dev.hsm:mbk_info().current, st.mbk)
        assert.are.equal(2, st.users)
        assert.are.equal(0, st.keydb_used)
        assert.are.equal(8 * 1024 * 1024, st.keydb_limit)
        assert.are.equal(1, st.logged_on)
        assert(dev.hsm:key_generate(0, { algo = "ec", name = "k", group = "g" }))
        local blob = assert(dev.hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", name = "e" }))
        assert(dev.hsm:key_revoke(blob))
        local st2 = assert(dev.hsm:get_state())
        assert.is_true(st2.keydb_used > 0)
        assert.are.equal(1, st2.revoked)
        assert.is_true(st2.generation > st.generation)
        H.destroy(dev)
    end)
end)

