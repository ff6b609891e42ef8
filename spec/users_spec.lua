-- Users, groups and logon: init, logon_pass, access by group, dual control.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local EXT = softcxi.FLAG_EXTERNAL

describe("users and logon", function()
    local dev

    before_each(function()
        dev = H.new_device({ open = false })
    end)

    after_each(function()
        H.destroy(dev)
    end)

    local function session()
        local h = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        dev.extra = dev.extra or {}
        dev.extra[#dev.extra + 1] = h
        return h
    end

    local function admin()
        local h = session()
        assert(h:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        return h
    end

    it("open without init is ENOTFOUND; init twice is EEXIST", function()
        local root = H.tmpdir()
        local msg = H.expect_err("ENOTFOUND", softcxi.open { path = root .. "/none",
            keyfile = root .. "/k.key" })
        assert.matches("softcxi.init", msg, 1, true)
        H.expect_err("EEXIST", softcxi.init { path = dev.path, keyfile = dev.keyfile,
            password = H.ADMIN_PASSWORD, kdf_cost = H.KDF_COST })
        H.rm_rf(root)
    end)

    it("key calls need a logon; public calls do not", function()
        local h = session()
        H.expect_err("EAUTH", h:key_generate(EXT, { algo = "ec", group = "iot" }))
        assert.are.equal(16, #assert(h:rnd_gen(16)))
        assert.is_string(h:hash_compute("sha256", "x"))
        assert(h:logon_pass(H.USER, H.USER_PASSWORD))
        local blob = assert(h:key_generate(EXT, { algo = "ec", group = "iot", name = "k" }))
        h:logoff()
        H.expect_err("EAUTH", h:sign(blob, "ecdsa-sha256", "m"))
        H.expect_err("EAUTH", h:key_info(blob))
        assert.is_false(softcxi.key_info(blob).verified) -- the unverified reader needs none
    end)

    it("a user may use only keys of his groups (names and prefix*)", function()
        local a = admin()
        assert(a:user_add { name = "alice", password = "alice-password", groups = { "iot", "fleet-*" },
            kdf_cost = H.KDF_COST })
        local app = H.open(dev)
        local other = assert(app:key_generate(EXT, { algo = "ec", group = "billing", name = "b" }))
        local alice = session()
        assert(alice:logon_pass("alice", "alice-password"))
        assert(alice:key_generate(EXT, { algo = "ec", group = "fleet-7", name = "f" }))
        assert(alice:key_generate(EXT, { algo = "ec", group = "iot", name = "i" }))
        local msg = H.expect_err("EACCESS", alice:key_generate(EXT, { algo = "ec", group = "fleet",
            name = "x" }))
        assert.matches("'fleet'", msg, 1, true)
        H.expect_err("EACCESS", alice:sign(other, "ecdsa-sha256", "m"))
        -- an administrator is not a key user
        H.expect_err("EACCESS", a:sign(other, "ecdsa-sha256", "m"))
        app:close()
    end)

    it("wrong passwords are EAUTH, and lock the user out after three", function()
        local h = session()
        for _ = 1, 4 do H.expect_err("EAUTH", h:logon_pass(H.USER, "not-the-password")) end
        local msg = H.expect_err("EAUTH", h:logon_pass(H.USER, H.USER_PASSWORD))
        assert.matches("locked out", msg, 1, true)
        -- the counter is on disk: a new session (or process) sees it too
        local msg2 = H.expect_err("EAUTH", session():logon_pass(H.USER, H.USER_PASSWORD))
        assert.matches("locked out", msg2, 1, true)
        assert.are.equal(4, (function()
            for _, u in ipairs(admin():user_list()) do
                if u.name == H.USER then return u.failures end
            end
        end)())
        H.expect_err("EAUTH", h:logon_pass("nobody", "whatever-password"))
    end)

    it("user management needs administrators; two level-1 administrators give dual control", function()
        local a = admin()
        assert(a:user_add { name = "sec1", password = "sec1-password", role = "admin", level = 1,
            kdf_cost = H.KDF_COST })
        assert(a:user_add { name = "sec2", password = "sec2-password", role = "admin", level = 1,
            kdf_cost = H.KDF_COST })
        local one = session()
        assert(one:logon_pass("sec1", "sec1-password"))
        local msg = H.expect_err("EAUTH", one:user_add { name = "x", password = "x-password-1",
            kdf_cost = H.KDF_COST })
        assert.matches("level 2", msg, 1, true)
        assert(one:logon_pass("sec2", "sec2-password"))      -- both together reach level 2
        assert(one:user_add { name = "x", password = "x-password-1", kdf_cost = H.KDF_COST })
        H.expect_err("EEXIST", one:user_add { name = "x", password = "x-password-1",
            kdf_cost = H.KDF_COST })
        local app = H.open(dev)
        H.expect_err("EAUTH", app:user_list())               -- a key user is no administrator
        local names = {}
        for _, u in ipairs(one:user_list()) do names[#names + 1] = u.name .. ":" .. u.role end
        table.sort(names)
        assert.are.same({ "ADMIN:admin", "app:user", "sec1:admin", "sec2:admin", "x:user" }, names)
        assert(one:user_delete("x"))
        H.expect_err("ENOTFOUND", one:user_delete("x"))
        app:close()
    end)

    it("the last administrator cannot be deleted; a short password is EINVAL", function()
        local a = admin()
        H.expect_err("EPOLICY", a:user_delete(H.ADMIN))
        H.expect_err("EINVAL", a:user_add { name = "y", password = "short" })
        assert.has_error(function() a:user_add { name = "y", password = "long-enough", bogus = 1 } end)
    end)

    it("a user added in one session logs on in another right away", function()
        local a = admin()
        local later = session()
        assert(a:user_add { name = "bob", password = "bob-password", groups = "iot",
            kdf_cost = H.KDF_COST })
        assert(later:logon_pass("bob", "bob-password"))
        assert(later:key_generate(EXT, { algo = "ed25519", group = "iot", name = "b" }))
    end)
end)
