-- backup_database / restore_database: the whole internal key database,
-- sealed under the MBK, restores on another device that imported the same
-- MBK from shares; a bad image changes nothing.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

describe("database backup", function()
    local a, b, root, admins

    local function admin(d, opts)
        local h = assert(softcxi.open { path = d.path, keyfile = d.keyfile,
            keydb_limit = opts and opts.keydb_limit })
        assert(h:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        admins[#admins + 1] = h
        return h
    end

    local function names(hsm)
        local out = {}
        for _, k in ipairs(assert(hsm:key_list())) do
            out[#out + 1] = k.group .. "/" .. k.name .. (k.specifier and ("/" .. k.specifier) or "")
        end
        table.sort(out)
        return out
    end

    before_each(function()
        admins = {}
        a, b = H.new_device(), H.new_device()
        root = H.tmpdir()
        -- the second device imports the first one's MBK from 2 of 3 shares
        local shares = { root .. "/s1", root .. "/s2", root .. "/s3" }
        local pws = { "share-pw-one", "share-pw-two", "share-pw-three" }
        local adm = admin(a)
        assert(adm:mbk_generate { m = 2, n = 3, shares = shares, passwords = pws, kdf_cost = 10 })
        assert(adm:mbk_import { shares = { shares[1], shares[2] }, passwords = { pws[1], pws[2] } })
        assert(admin(b):mbk_import { shares = { shares[3], shares[1] },
            passwords = { pws[3], pws[1] } })
    end)

    after_each(function()
        for _, h in ipairs(admins) do h:close() end
        H.destroy(a)
        H.destroy(b)
        H.rm_rf(root)
    end)

    it("database backup restores on the second device", function()
        local ca = assert(a.hsm:key_generate(0, { algo = "ec", name = "ca-root", group = "pki" }))
        assert(a.hsm:key_generate(0, { algo = "ed25519", name = "fw", group = "iot", specifier = 7 }))
        assert(a.hsm:key_generate(0, { algo = "aes", name = "db", group = "billing" }))
        assert(a.hsm:key_generate(0, { algo = "ec", name = "stay", group = "pki",
            export = "deny-backup" }))
        assert(b.hsm:key_generate(0, { algo = "ec", name = "old", group = "pki" }))
        local image, keys, skipped = admin(a):backup_database()
        assert.is_string(image)
        assert.are.equal(3, keys)
        assert.are.equal(1, skipped)
        assert.are.equal("K", image:sub(1, 1))
        assert.are.equal(3, image:byte(3))               -- blob type 0x03
        assert.are.equal(3, assert(admin(b):restore_database(image)))
        -- b's database is now a's (without the deny-backup key), and the keys sign the same
        assert.are.same({ "billing/db", "iot/fw/7", "pki/ca-root" }, names(b.hsm))
        local hb = assert(b.hsm:key_open("pki", "ca-root"))
        local sig = assert(b.hsm:sign(hb, "ecdsa-sha256", "m"))
        assert.is_true(a.hsm:verify(ca, "ecdsa-sha256", "m", sig))
        local ct = assert(b.hsm:encrypt(assert(b.hsm:key_open("billing", "db")), "aes-gcm", "x"))
        assert.are.equal("x", assert(a.hsm:decrypt(assert(a.hsm:key_open("billing", "db")),
            "aes-gcm", ct)))
        -- a process that opened b before sees the restored database
        local later = H.open(b)
        assert.are.same(names(b.hsm), names(later))
        later:close()
        -- audited on both devices
        local function events(d)
            local out = {}
            for _, r in ipairs(assert(admin(d):audit_log())) do out[r.event] = r.subject end
            return out
        end
        assert.is_not_nil(events(a).backup_database)
        assert.are.equal("replace", events(b).restore_database)
    end)

    it("merges into the keys there, refusing or overwriting a key in both", function()
        assert(a.hsm:key_generate(0, { algo = "ec", name = "shared", group = "pki" }))
        assert(a.hsm:key_generate(0, { algo = "ec", name = "new", group = "pki" }))
        local old = assert(b.hsm:key_generate(0, { algo = "ec", name = "shared", group = "pki" }))
        local pub = assert(b.hsm:public_key(old))
        assert(b.hsm:key_generate(0, { algo = "ec", name = "mine", group = "pki" }))
        local image = assert(admin(a):backup_database())
        local adm = admin(b)
        local msg = H.expect_err("EEXIST", adm:restore_database(image, softcxi.RESTORE_MERGE))
        assert.matches("'pki/shared'", msg, 1, true)
        assert.are.same({ "pki/mine", "pki/shared" }, names(b.hsm))
        assert.are.equal(pub, assert(b.hsm:public_key(old)))
        assert.are.equal(2, assert(adm:restore_database(image,
            softcxi.RESTORE_MERGE + softcxi.FLAG_OVERWRITE)))
        assert.are.same({ "pki/mine", "pki/new", "pki/shared" }, names(b.hsm))
        assert.are_not.equal(pub, assert(b.hsm:public_key(assert(b.hsm:key_open("pki", "shared")))))
        local msg2 = H.expect_err("EINVAL", adm:restore_database(image, softcxi.FLAG_OVERWRITE))
        assert.matches("RESTORE_MERGE", msg2, 1, true)
        H.expect_err("EINVAL", adm:restore_database(image, 0x100))
    end)

    it("a damaged, truncated, foreign or oversized image gives a clear error and changes nothing", function()
        assert(a.hsm:key_generate(0, { algo = "ec", name = "k1", group = "g" }))
        assert(a.hsm:key_generate(0, { algo = "ec", name = "k2", group = "g" }))
        local image = assert(admin(a):backup_database())
        local keep = assert(b.hsm:key_generate(0, { algo = "ec", name = "keep", group = "g" }))
        local adm = admin(b)
        local before = H.readfile(b.path .. "/keys.db")
        local function intact()
            assert.are.same({ "g/keep" }, names(b.hsm))
            assert(b.hsm:sign(keep, "ecdsa-sha256", "m"))
            assert.are.equal(before, H.readfile(b.path .. "/keys.db"))
        end
        local msg = H.expect_err("EFORMAT", adm:restore_database(image:sub(1, #image - 1)))
        assert.matches("truncated", msg, 1, true)
        intact()
        msg = H.expect_err("EFORMAT", adm:restore_database(image:sub(1, 30)))
        assert.matches("truncated", msg, 1, true)
        H.expect_err("ETAMPER", adm:restore_database(H.bitflip(image, 100, 3)))
        H.expect_err("ETAMPER", adm:restore_database(H.bitflip(image, 40, 0))) -- header date
        intact()
        msg = H.expect_err("EFORMAT", adm:restore_database("not an image at all, no"))
        assert.matches("not a softcxi database backup", msg, 1, true)
        H.expect_err("EFORMAT", adm:restore_database(keep))     -- a handle is no image
        -- a device with another MBK
        local c = H.new_device()
        local cimage = assert(admin(c):backup_database())
        msg = H.expect_err("EMBK", adm:restore_database(cimage))
        assert.matches(adm:mbk_info().current, msg, 1, true)
        H.destroy(c)
        intact()
        -- a database limit the image does not fit
        local small = admin(b, { keydb_limit = 300 })
        msg = H.expect_err("EFULL", small:restore_database(image))
        assert.matches("nothing was restored", msg, 1, true)
        intact()
        -- every failure is in the audit log
        local failed = 0
        for _, r in ipairs(assert(adm:audit_log())) do
            if r.event == "restore_database-failed" then failed = failed + 1 end
        end
        assert.are.equal(8, failed)
    end)

    it("a restore cures a damaged keys.db, in this process and a fresh one", function()
        assert(a.hsm:key_generate(0, { algo = "ec", name = "k", group = "g" }))
        local image = assert(admin(a):backup_database())
        assert(b.hsm:key_generate(0, { algo = "ec", name = "lost", group = "g" }))
        local db = b.path .. "/keys.db"
        H.writefile(db, H.bitflip(H.readfile(db), 60, 2))
        H.expect_err("ETAMPER", b.hsm:key_open("g", "lost"))
        local fresh = assert(softcxi.open { path = b.path, keyfile = b.keyfile })
        assert(fresh:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        admins[#admins + 1] = fresh
        -- merging needs the keys there: refused, and the file stays as it is
        H.expect_err("ETAMPER", fresh:restore_database(image, softcxi.RESTORE_MERGE))
        assert.are.equal(1, assert(fresh:restore_database(image)))
        assert(b.hsm:sign(assert(b.hsm:key_open("g", "k")), "ecdsa-sha256", "m"))
        assert.are.same({ "g/k" }, names(b.hsm))
    end)

    it("needs administrators of level 2; a key user cannot", function()
        H.expect_err("EAUTH", a.hsm:backup_database())
        local image = assert(admin(a):backup_database())
        local msg = H.expect_err("EAUTH", b.hsm:restore_database(image))
        assert.matches("level 2", msg, 1, true)
        local adm = admin(b)
        assert(adm:user_add { name = "half", password = "half-password", role = "admin", level = 1,
            kdf_cost = H.KDF_COST })
        local half = assert(softcxi.open { path = b.path, keyfile = b.keyfile })
        assert(half:logon_pass("half", "half-password"))
        H.expect_err("EAUTH", half:restore_database(image))
        half:close()
    end)

    it("an image made before an MBK rotation restores while the old MBK is held", function()
        assert(a.hsm:key_generate(0, { algo = "ec", name = "k", group = "g" }))
        local adm = admin(a)
        local image = assert(adm:backup_database())
        local old = adm:mbk_info().current
        local shares = { root .. "/t1", root .. "/t2" }
        assert(adm:mbk_generate { m = 2, shares = shares, passwords = { "pw-share-1", "pw-share-2" },
            kdf_cost = 10 })
        assert(adm:mbk_import { shares = shares, passwords = { "pw-share-1", "pw-share-2" } })
        assert.are.equal(1, assert(adm:restore_database(image)))
        -- restored keys are resealed under the current MBK, so the old one can go
        assert(adm:mbk_retire(old))
        assert(a.hsm:sign(assert(a.hsm:key_open("g", "k")), "ecdsa-sha256", "m"))
        H.expect_err("EMBK", adm:restore_database(image))
    end)
end)
