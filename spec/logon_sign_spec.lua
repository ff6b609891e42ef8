-- Logon by key (logon_sign), changing users (user_set), list_files and
-- get_state.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local EXT = softcxi.FLAG_EXTERNAL

-- A private key file made by the openssl command line, and its public PEM.
local function keypair(dir, name, algo)
    local key, pub = dir .. "/" .. name .. ".pem", dir .. "/" .. name .. ".pub"
    local gen = algo == "ed25519" and "-algorithm ed25519"
        or "-algorithm EC -pkeyopt ec_paramgen_curve:" .. (algo or "P-256")
    if algo == "rsa" then gen = "-algorithm RSA -pkeyopt rsa_keygen_bits:2048" end
    local rc, out = H.run("openssl genpkey " .. gen .. " -out " .. H.q(key) ..
        " && openssl pkey -in " .. H.q(key) .. " -pubout -out " .. H.q(pub))
    assert(rc == 0, out)
    return key, H.readfile(pub)
end

-- The audit records about subject, as "event:detail" (those starting with
-- prefix when given).
local function events(admin, subject, prefix)
    local out = {}
    for _, r in ipairs(assert(admin:audit_log())) do
        if r.subject == subject and r.event:sub(1, #(prefix or "")) == (prefix or "") then
            out[#out + 1] = r.event .. ":" .. r.detail
        end
    end
    return out
end

describe("logon_sign", function()
    local dev, keys

    before_each(function()
        dev = H.new_device({ open = false })
        keys = dev.root .. "/userkeys"
        H.mkdir_p(keys)
    end)

    after_each(function()
        if dev.extra then for _, h in ipairs(dev.extra) do h:close() end end
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

    it("logs a user on with an EC P-256 key file and an Ed25519 key in PEM data", function()
        local a = admin()
        local eckey, ecpub = keypair(keys, "ops", "P-256")
        local edkey, edpub = keypair(keys, "bot", "ed25519")
        assert(a:user_add { name = "ops", pubkey = ecpub, groups = { "iot" } })
        assert(a:user_add { name = "bot", pubkey = edpub, groups = "fleet-*" })
        local h = session()
        assert(h:logon_sign("ops", eckey))                      -- a file name
        assert(h:key_generate(EXT, { algo = "ec", name = "k", group = "iot" }))
        H.expect_err("EACCESS", h:key_generate(EXT, { algo = "ec", name = "k", group = "fleet-1" }))
        assert(h:logon_sign("bot", H.readfile(edkey)))          -- PEM data
        local rc, out = H.run("openssl pkey -in " .. H.q(eckey) .. " -outform DER -out "
            .. H.q(eckey .. ".der"))
        assert(rc == 0, out)
        local again = session()
        assert(again:logon_sign("ops", H.readfile(eckey .. ".der"))) -- DER data
        assert(h:key_generate(EXT, { algo = "ec", name = "k", group = "fleet-1" }))
        assert.are.equal(2, h:get_state().logged_on)
        local users = {}
        for _, u in ipairs(a:user_list()) do users[u.name] = u end
        assert.is_false(users.ops.password)
        assert.is_true(users.ops.pubkey)
        assert.is_true(users[H.ADMIN].password)
        assert.are.same({ "logon:user by key", "logon:user by key" }, events(a, "ops", "logon"))
    end)

    it("a key level counts toward the admin threshold like a password logon", function()
        local a = admin()
        local k1, p1 = keypair(keys, "sec1")
        assert(a:user_add { name = "sec1", pubkey = p1, role = "admin", level = 1 })
        assert(a:user_add { name = "sec2", password = "sec2-password", role = "admin", level = 1,
            kdf_cost = H.KDF_COST })
        local h = session()
        assert(h:logon_sign("sec1", k1))
        H.expect_err("EAUTH", h:user_list())
        assert(h:logon_pass("sec2", "sec2-password"))
        assert(h:user_list())
    end)

    it("a wrong key is EAUTH, counted toward the lockout and audited", function()
        local a = admin()
        local _, pub = keypair(keys, "ops")
        local other = keypair(keys, "other")
        assert(a:user_add { name = "ops", pubkey = pub })
        local h = session()
        for _ = 1, 4 do
            local msg = H.expect_err("EAUTH", h:logon_sign("ops", other))
            assert.matches("'ops'", msg, 1, true)
        end
        local msg = H.expect_err("EAUTH", h:logon_sign("ops", other))
        assert.matches("locked out", msg, 1, true)
        for _, u in ipairs(a:user_list()) do
            if u.name == "ops" then assert.are.equal(4, u.failures) end
        end
        local ev = events(a, "ops", "logon")
        assert.are.equal("logon-failed:bad signature", ev[1])
        assert.are.equal("logon-failed:locked out", ev[5])
        -- an administrator lifts the lockout
        assert(a:user_set { name = "ops", unlock = true })
        H.expect_err("EAUTH", h:logon_sign("ops", other))
    end)

    it("names what is wrong: no key file, not a key, an RSA key, no logon key, unknown user", function()
        local a = admin()
        local key, pub = keypair(keys, "ops")
        local msg = H.expect_err("ENOTFOUND", session():logon_sign("ops", keys .. "/missing.pem"))
        assert.matches("missing.pem", msg, 1, true)
        local rsakey, rsapub = keypair(keys, "big", "rsa")
        msg = H.expect_err("EINVAL", a:user_add { name = "big", pubkey = rsapub })
        assert.matches("'big'", msg, 1, true)
        assert.matches("P-256 or Ed25519", msg, 1, true)
        msg = H.expect_err("EINVAL", a:user_add { name = "junk", pubkey = "not a key" })
        assert.matches("'junk'", msg, 1, true)
        H.expect_err("EINVAL", a:user_add { name = "none", groups = "iot" })
        local _, p384 = keypair(keys, "p384", "P-384")
        H.expect_err("EINVAL", a:user_add { name = "p384", pubkey = p384 })
        for _, u in ipairs(a:user_list()) do
            assert.is_true(u.name == H.ADMIN or u.name == H.USER, u.name)
        end
        assert(a:user_add { name = "ops", pubkey = pub })
        msg = H.expect_err("EINVAL", session():logon_sign("ops", rsakey))
        assert.matches("'ops'", msg, 1, true)
        -- a user with a key has no password, and a password user no key
        msg = H.expect_err("EAUTH", session():logon_pass("ops", "whatever-password"))
        assert.matches("logon_sign", msg, 1, true)
        msg = H.expect_err("EAUTH", session():logon_sign(H.USER, key))
        assert.matches("logon_pass", msg, 1, true)
        msg = H.expect_err("EAUTH", session():logon_sign("nobody", key))
        assert.matches("'nobody'", msg, 1, true)
        assert.are.same({ "logon-failed:unknown user" }, events(a, "nobody"))
    end)

    it("challenge and response: one answer per challenge, bound to the user", function()
        local a = admin()
        local key, pub = keypair(keys, "ops", "ed25519")
        local key2, pub2 = keypair(keys, "dev", "P-256")
        assert(a:user_add { name = "ops", pubkey = pub })
        assert(a:user_add { name = "dev", pubkey = pub2 })
        local h = session()
        local m = assert(h:logon_challenge("ops"))
        assert.are.equal("softcxi-logon-v1\0", m:sub(1, 17))
        local sig = assert(softcxi.logon_answer(m, key))
        assert(h:logon_response("ops", sig))
        h:logoff()
        -- the same answer again: no challenge pending
        H.expect_err("EINVAL", h:logon_response("ops", sig))
        -- an answer to an old challenge after a new one was asked for
        assert(h:logon_challenge("ops"))
        H.expect_err("EAUTH", h:logon_response("ops", sig))
        -- a challenge for one user does not log another on
        local md = assert(h:logon_challenge("dev"))
        H.expect_err("EINVAL", h:logon_response("ops", assert(softcxi.logon_answer(md, key))))
        md = assert(h:logon_challenge("dev"))
        assert(h:logon_response("dev", assert(softcxi.logon_answer(md, key2))))
        H.expect_err("EINVAL", softcxi.logon_answer(md, "-----BEGIN PRIVATE KEY-----\nxx\n"))
        -- another device's challenge names another device
        local other = H.new_device({ open = false })
        local o = assert(softcxi.open { path = other.path, keyfile = other.keyfile })
        assert.are_not.equal(md:sub(18, 49), assert(o:logon_challenge("dev")):sub(18, 49))
        o:close()
        H.destroy(other)
    end)
end)

describe("user_set", function()
    local dev

    before_each(function() dev = H.new_device({ open = false }) end)
    after_each(function() H.destroy(dev) end)

    local function session(name, pw)
        local h = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
        if name then assert(h:logon_pass(name, pw)) end
        return h
    end

    it("a user changes his own password, nothing else; administrators change all", function()
        local u = session(H.USER, H.USER_PASSWORD)
        assert(u:user_set { name = H.USER, password = "new-app-password", kdf_cost = H.KDF_COST })
        H.expect_err("EAUTH", session():logon_pass(H.USER, H.USER_PASSWORD))
        assert(session():logon_pass(H.USER, "new-app-password"))
        local msg = H.expect_err("EAUTH", u:user_set { name = H.USER, groups = "*,x" })
        assert.matches("level 2", msg, 1, true)
        H.expect_err("EAUTH", u:user_set { name = H.ADMIN, password = "stolen-password" })
        local a = session(H.ADMIN, H.ADMIN_PASSWORD)
        assert(a:user_set { name = H.USER, groups = { "iot" }, level = 0 })
        local h = session(H.USER, "new-app-password")
        H.expect_err("EACCESS", h:key_generate(EXT, { algo = "ec", name = "k", group = "ops" }))
        assert(h:key_generate(EXT, { algo = "ec", name = "k", group = "iot" }))
        -- a password user gets a logon key as well
        local dir = dev.root .. "/k"
        H.mkdir_p(dir)
        local key, pub = keypair(dir, "app")
        assert(h:user_set { name = H.USER, pubkey = pub })
        assert(session():logon_sign(H.USER, key))
        local ev = events(a, H.USER)
        assert.is_truthy(table.concat(ev, " "):find("user_set:by self password", 1, true))
        assert.is_truthy(table.concat(ev, " "):find("user_set:by ADMIN groups,level", 1, true))
        for _, s in ipairs { u, a, h } do s:close() end
    end)

    it("bad input names the user and changes nothing", function()
        local a = session(H.ADMIN, H.ADMIN_PASSWORD)
        local msg = H.expect_err("ENOTFOUND", a:user_set { name = "ghost", level = 1 })
        assert.matches("'ghost'", msg, 1, true)
        msg = H.expect_err("EINVAL", a:user_set { name = H.USER, password = "short", groups = "x" })
        assert.matches("'" .. H.USER .. "'", msg, 1, true)
        H.expect_err("EINVAL", a:user_set { name = H.USER })
        H.expect_err("EINVAL", a:user_set { name = H.USER, groups = "a b" })
        H.expect_err("EINVAL", a:user_set { name = H.USER, pubkey = "nope" })
        assert.has_error(function() a:user_set { name = H.USER, bogus = 1 } end)
        -- the admin's level may not drop below what administration needs
        msg = H.expect_err("EPOLICY", a:user_set { name = H.ADMIN, level = 1 })
        assert.matches("below", msg, 1, true)
        for _, u in ipairs(a:user_list()) do
            if u.name == H.USER then assert.are.equal("*", u.groups) end
            if u.name == H.ADMIN then assert.are.equal(2, u.level) end
        end
        assert(session():logon_pass(H.USER, H.USER_PASSWORD))
        a:close()
    end)
end)

describe("list_files and get_state", function()
    it("lists the state directory's files with their sizes", function()
        local dev = H.new_device()
        assert(dev.hsm:key_generate(0, { algo = "ec", name = "k", group = "g" }))
        local files = assert(dev.hsm:list_files())
        local by = {}
        for i, f in ipairs(files) do
            by[f.name] = f
            if i > 1 then assert.is_true(files[i - 1].name < f.name) end
        end
        for _, name in ipairs { "device.mbk", "users.db", "keys.db", "audit.log", "generation" } do
            assert.is_table(by[name], name)
            assert.are.equal(#H.readfile(dev.path .. "/" .. name), by[name].size)
            assert.is_true(by[name].mtime > 0)
        end
        H.expect_err("EAUTH", assert(softcxi.open { path = dev.path, keyfile = dev.keyfile }):list_files())
        local st = assert(dev.hsm:get_state())
        assert.is_true(st.initialised)
        assert.is_true(st.mbk_loaded)
        assert.are.equal(softcxi._VERSION, st.version)
        H.destroy(dev)
    end)
end)
