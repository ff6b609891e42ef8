-- The `softcxi` command, run for real as a subprocess (bin/softcxi) under the
-- interpreter running the specs.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local cjson = require "cjson"

local root = (debug.getinfo(1, "S").source:match("^@(.-)spec/[^/]*$") or "./")
if root == "" then root = "./" end
local BIN = H.interpreter() .. " " .. H.q(root .. "bin/softcxi")

local ADMIN_PW, APP_PW = "cli-admin-password", "cli-app-password"

-- A device for the CLI: state dir, key file and password files under one temp dir.
local function new_env()
    local e = { dir = H.tmpdir() }
    e.hsm, e.key = e.dir .. "/hsm", e.dir .. "/hsm.key"
    e.admin_pw, e.app_pw = e.dir .. "/admin.pw", e.dir .. "/app.pw"
    H.writefile(e.admin_pw, ADMIN_PW .. "\n")
    H.writefile(e.app_pw, APP_PW .. "\n")
    e.base = BIN .. " --device " .. H.q(e.hsm) .. " --device-key " .. H.q(e.key)
    e.admin = e.base .. " --user ADMIN --password-file " .. H.q(e.admin_pw)
    e.app = e.base .. " --user app --password-file " .. H.q(e.app_pw)
    return e
end

-- run a command with no password in the environment; returns rc, stdout, stderr
local function sh(cmd)
    local errf = os.tmpname()
    local rc, out = H.run("env -u SOFTCXI_PASSWORD -u SOFTCXI_DEVICE sh -c " .. H.q(cmd) .. " 2>"
        .. H.q(errf) .. " </dev/null")
    local err = H.readfile(errf) or ""
    os.remove(errf)
    return rc, out, err
end

local function ok(cmd)
    local rc, out, err = sh(cmd)
    assert(rc == 0, "command failed (rc " .. tostring(rc) .. "): " .. cmd .. "\n" .. err .. out)
    return out, err
end

local function json(cmd)
    local out = ok(cmd)
    local v = cjson.decode(out)
    return v
end

local function fails(cmd, want_rc)
    local rc, out, err = sh(cmd)
    assert(rc == (want_rc or 1), "expected rc " .. (want_rc or 1) .. ", got " .. tostring(rc)
        .. ": " .. cmd .. "\n" .. err .. out)
    return err, out
end

local function setup_device(e)
    ok(e.admin .. " init --kdf-cost 10")
    ok(e.admin .. " user add app --groups iot --kdf-cost 10 --new-password-file " .. H.q(e.app_pw))
end

describe("softcxi command", function()
    describe("usage", function()
        it("prints help that fits 80 columns, for the command and every sub-command", function()
            local out = ok(BIN .. " --help")
            assert.matches("Usage: softcxi", out)
            local cmds = { "init", "state", "files", "mbk generate", "mbk import", "mbk info",
                "mbk rotate", "mbk retire", "user add", "user delete", "user list", "key generate",
                "key list", "key info", "key public", "key delete", "key backup", "key restore",
                "key import", "key export", "key revoke", "key revoked", "sign", "verify", "encrypt",
                "decrypt", "provision", "rewrap", "store stats", "store migrate", "store upgrade",
                "db backup", "db restore", "audit show", "audit verify", "user set" }
            for _, c in ipairs(cmds) do
                local help = ok(BIN .. " " .. c .. " --help")
                assert.matches("Usage: softcxi " .. c:gsub("%-", "%%-"), help)
                for line in help:gmatch("[^\n]+") do
                    assert(#line <= 80, c .. " --help: line over 80 columns: " .. line)
                end
            end
        end)

        it("exits 2 with usage on an unknown sub-command or option", function()
            local err = fails(BIN .. " frobnicate", 2)
            assert.matches("unknown command 'frobnicate'", err)
            assert.matches("Usage: softcxi", err)
            err = fails(BIN .. " key generate --colour blue", 2)
            assert.matches("unknown option '%-%-colour'", err)
            assert.matches("Usage: softcxi key generate", err)
            err = fails(BIN .. " provision --count 3", 2)
            assert.matches("missing option '%-%-store'", err)
            fails(BIN, 2)
        end)

        it("says where there is no device", function()
            local e = new_env()
            local err = fails(e.base .. " state")
            assert.matches("no device there: create one with 'softcxi init'", err)
            H.rm_rf(e.dir)
        end)
    end)

    describe("on a device", function()
        local e

        setup(function()
            e = new_env()
            setup_device(e)
        end)
        teardown(function() H.rm_rf(e.dir) end)

        it("init refuses an existing device", function()
            local err = fails(e.admin .. " init --kdf-cost 10")
            assert.matches("init " .. e.hsm:gsub("%p", "%%%0"), err)
        end)

        it("state and mbk info need no logon, and give JSON", function()
            local st = json(e.base .. " --json state")
            assert.are.equal(true, st.initialised)
            assert.are.equal(2, st.users)
            assert.are.equal(8388608, st.keydb_limit)
            local mi = json(e.base .. " --json mbk info")
            assert.are.equal(st.mbk, mi.current)
            assert.matches("^%x+$", mi.current)
        end)

        it("a wrong password fails with the user named and no secret echoed", function()
            local pw = e.dir .. "/wrong.pw"
            H.writefile(pw, "not-the-password-xyz\n")
            local err = fails(e.base .. " --user app --password-file " .. H.q(pw) .. " key list")
            assert.matches("logon as 'app'", err)
            assert.matches("EAUTH", err)
            assert.is_nil(err:find("not-the-password-xyz", 1, true))
            -- no password source at all, and no terminal
            err = fails(e.base .. " --user app key list")
            assert.matches("no password", err)
        end)

        it("lists, adds and deletes users", function()
            local pw = e.dir .. "/tmp.pw"
            H.writefile(pw, "temp-user-password\n")
            ok(e.admin .. " user add temp --groups a,b-* --kdf-cost 10 --new-password-file " .. H.q(pw))
            local users = json(e.admin .. " --json user list")
            local found
            for _, u in ipairs(users) do if u.name == "temp" then found = u end end
            assert.are.equal("a,b-*", found.groups)
            ok(e.admin .. " user delete temp")
            for _, u in ipairs(json(e.admin .. " --json user list")) do
                assert.are_not.equal("temp", u.name)
            end
            assert.matches("user delete nobody", fails(e.admin .. " user delete nobody"))
        end)

        it("generates internal keys, backs them up and restores them", function()
            ok(e.app .. " key generate --algo ec --group iot --name root")
            local keys = json(e.app .. " --json key list")
            assert.are.equal(1, #keys)
            assert.are.equal("root", keys[1].name)
            local info = json(e.app .. " --json key info iot/root")
            assert.are.equal(true, info.verified)
            assert.are.equal("P-256", info.curve)
            local bak = e.dir .. "/root.bak"
            ok(e.app .. " key backup iot/root --out " .. H.q(bak))
            ok(e.app .. " key delete iot/root")
            assert.matches("ENOTFOUND", fails(e.app .. " key info iot/root"))
            ok(e.app .. " key restore " .. H.q(bak))
            assert.are.equal("root", json(e.app .. " --json key info iot/root").name)
            -- a key of another group: EACCESS, named
            local err = fails(e.app .. " key generate --algo ec --group fleet --name x")
            assert.matches("fleet", err)
            assert.matches("EACCESS", err)
        end)

        it("makes external keys, signs, verifies, encrypts and decrypts", function()
            local store = "file:" .. e.dir .. "/ks"
            ok(e.app .. " key generate --external --algo ed25519 --group iot --name d1 --store "
                .. H.q(store))
            ok(e.app .. " key generate --external --algo aes --group iot --name k1 --out "
                .. H.q(e.dir .. "/k1.blob"))
            -- info on a store id and on a blob file works without logon
            local info = json(e.base .. " --json key info --store " .. H.q(store) .. " iot/d1")
            assert.are.equal("ed25519", info.algo)
            assert.are.equal(false, info.verified)
            local k1 = json(e.base .. " --json key info " .. H.q(e.dir .. "/k1.blob"))
            assert.are.equal("aes", k1.algo)
            -- storing again without --overwrite: EEXIST with the remedy
            local err = fails(e.app .. " key generate --external --algo ed25519 --group iot --name d1 "
                .. "--store " .. H.q(store))
            assert.matches("%-%-overwrite", err)

            local msg, sig = e.dir .. "/msg", e.dir .. "/msg.sig"
            H.writefile(msg, "firmware manifest\n")
            ok(e.app .. " sign --store " .. H.q(store) .. " iot/d1 --in " .. H.q(msg)
                .. " --out " .. H.q(sig))
            assert.are.equal(64, #H.readfile(sig))
            local v = json(e.app .. " --json verify --store " .. H.q(store) .. " iot/d1 --in "
                .. H.q(msg) .. " --sig " .. H.q(sig))
            assert.are.equal(true, v.valid)
            assert.are.equal("ed25519", v.mech)
            H.writefile(msg, "firmware manifest, edited\n")
            local _, out = fails(e.app .. " verify --store " .. H.q(store) .. " iot/d1 --in "
                .. H.q(msg) .. " --sig " .. H.q(sig))
            assert.matches("signature INVALID", out)

            -- public key: verified by the device, or unverified and said so
            local pem = ok(e.app .. " key public --store " .. H.q(store) .. " iot/d1")
            assert.matches("^%-%-%-%-%-BEGIN PUBLIC KEY", pem)
            local jwk, note = ok(e.base .. " key public --unverified --format jwk --store "
                .. H.q(store) .. " iot/d1")
            assert.are.equal("OKP", cjson.decode(jwk).kty)
            assert.matches("NOT verified", note)

            -- --json: the signature in base64, which verifies like the raw one
            local js = json(e.app .. " --json sign --store " .. H.q(store) .. " iot/d1 --in " .. H.q(msg))
            assert.are.equal(64, js.bytes)
            H.writefile(sig, H.b64decode(js.base64))
            assert.are.equal(true, json(e.app .. " --json verify --store " .. H.q(store) .. " iot/d1 --in "
                .. H.q(msg) .. " --sig " .. H.q(sig)).valid)

            -- AES-GCM through stdin and stdout
            local blob = H.q(e.dir .. "/k1.blob")
            local plain = ok("printf 'attack at dawn' | " .. e.app .. " encrypt " .. blob .. " | "
                .. e.app .. " decrypt " .. blob)
            assert.are.equal("attack at dawn", plain)
        end)

        it("revokes a key so that it stops working", function()
            local blob = e.dir .. "/rv.blob"
            ok(e.app .. " key generate --external --algo ec --group iot --name rv --out " .. H.q(blob))
            ok("printf x | " .. e.app .. " sign " .. H.q(blob) .. " --out /dev/null")
            ok(e.app .. " key revoke " .. H.q(blob) .. " --reason lost")
            local err = fails("printf x | " .. e.app .. " sign " .. H.q(blob))
            assert.matches("EREVOKED", err)
            local list = json(e.app .. " --json key revoked")
            assert.are.equal("lost", list[#list].reason)
        end)

        it("leaves nothing behind when the output cannot be written", function()
            local blob = e.dir .. "/w.blob"
            ok(e.app .. " key generate --external --algo ec --group iot --name w --out " .. H.q(blob))
            H.writefile(e.dir .. "/afile", "x")
            local err = fails("printf x | " .. e.app .. " sign " .. H.q(blob) .. " --out "
                .. H.q(e.dir .. "/afile/sig"))
            assert.matches("afile/sig", err)
            assert.are.equal("x", H.readfile(e.dir .. "/afile"))
            local _, left = H.run("find " .. H.q(e.dir) .. " -name '.*.tmp'")
            assert.are.equal("", left) -- no temp file left
        end)

        it("reports a store it cannot open or reach", function()
            local err = fails(e.app .. " key info --store nosuch://x iot/d1")
            assert.matches("unknown store URL", err)
            err = fails(e.app .. " key info --store redis://127.0.0.1:1/0 iot/d1")
            assert.matches("store redis://127.0.0.1:1/0", err)
        end)

        it("reads templates from JSON and Lua files, and reports a broken one with its line", function()
            local j, l, bad = e.dir .. "/t.json", e.dir .. "/t.lua", e.dir .. "/bad.lua"
            H.writefile(j, '{"algo": "ec", "curve": "P-384", "group": "iot", "usage": ["sign"]}')
            H.writefile(l, 'return { algo = "rsa", size = 2048, group = "iot", expiry = "2030-01-01" }')
            H.writefile(bad, 'return {\n  algo = "ec",\n  curve = = "P-256" }\n')
            local a = json(e.app .. " --json key generate --external --template " .. H.q(j)
                .. " --name tj --out " .. H.q(e.dir .. "/tj.blob"))
            assert.are.equal("P-384", a.curve)
            local b = json(e.app .. " --json key generate --external --template " .. H.q(l)
                .. " --name tl --out " .. H.q(e.dir .. "/tl.blob"))
            assert.are.equal(1893456000, b.expiry)
            local err = fails(e.app .. " key generate --external --template " .. H.q(bad)
                .. " --name tb --out " .. H.q(e.dir .. "/tb.blob"))
            assert.matches("bad%.lua:3:", err)
            assert.is_false(H.exists(e.dir .. "/tb.blob"))
        end)

        it("shows and verifies the audit log", function()
            local recs = json(e.admin .. " --json audit show")
            assert.is_true(#recs >= 3)
            assert.are.equal("init", recs[1].event)
            assert.are.equal(2, #json(e.admin .. " --json audit show --last 2"))
            local v = json(e.admin .. " --json audit verify")
            assert.are.equal(true, v.ok)
        end)
    end)

    describe("logon, policy, export and the database", function()
        local e

        setup(function()
            e = new_env()
            setup_device(e)
        end)
        teardown(function() H.rm_rf(e.dir) end)

        it("logs on with a key file, and two level-1 administrators act together", function()
            local key, pub = e.dir .. "/op.pem", e.dir .. "/op.pub"
            ok("openssl genpkey -algorithm ed25519 -out " .. H.q(key) .. " 2>/dev/null && "
                .. "openssl pkey -in " .. H.q(key) .. " -pubout -out " .. H.q(pub))
            ok(e.admin .. " user add op --groups iot --pubkey " .. H.q(pub))
            local files = json(e.base .. " --user op --keyfile " .. H.q(key) .. " --json files")
            local names = {}
            for _, f in ipairs(files) do names[f.name] = f.size end
            assert.is_number(names["users.db"])
            assert.is_number(names["audit.log"])
            -- a second administrator, both at level 1: one alone is not enough
            local pw2 = e.dir .. "/admin2.pw"
            H.writefile(pw2, "second-admin-password\n")
            ok(e.admin .. " user add ADMIN2 --role admin --level 2 --kdf-cost 10 --new-password-file "
                .. H.q(pw2))
            ok(e.admin .. " user set ADMIN2 --level 1")
            local both = e.base .. " --user ADMIN --password-file " .. H.q(e.admin_pw)
                .. " --user ADMIN2 --password-file " .. H.q(pw2)
            ok(both .. " user set ADMIN --level 1")
            local err = fails(e.admin .. " user list")
            assert.matches("EAUTH", err)
            assert.are.equal(4, #json(both .. " --json user list"))
            -- back to one level-2 administrator for the other tests
            ok(both .. " user set ADMIN --level 2")
            ok(e.admin .. " user delete ADMIN2")
        end)

        it("checks a policy file, and reports a broken one with file and line", function()
            local pol = root .. "examples/policies/algorithms.lua"
            local blob = e.dir .. "/p.blob"
            local err = fails(e.app .. " --policy " .. H.q(pol) .. " key generate --external "
                .. "--algo rsa --size 2048 --group iot --name p1 --out " .. H.q(blob))
            assert.matches("EPOLICY", err)
            assert.matches("rsa", err)
            assert.is_false(H.exists(blob))
            ok(e.app .. " --policy " .. H.q(pol) .. " key generate --external --algo ec --group iot "
                .. "--name p2 --out " .. H.q(blob))
            local bad, raises = e.dir .. "/bad-policy.lua", e.dir .. "/raises.lua"
            H.writefile(bad, "return {\n  on_use = function(k, c)\n    return tru e\n  end }\n")
            err = fails(e.app .. " --policy " .. H.q(bad) .. " key list")
            assert.matches("bad%-policy%.lua:3:", err)
            H.writefile(raises, "return { on_use = function() error('quota service down') end }\n")
            err = fails("printf m | " .. e.app .. " --policy " .. H.q(raises) .. " sign " .. H.q(blob))
            assert.matches("quota service down", err)
            assert.matches("EPOLICY", err)
        end)

        it("exports a key wrapped under another and imports it back", function()
            ok(e.app .. " key generate --algo aes --group iot --name kek --usage wrap,unwrap")
            ok(e.app .. " key generate --algo ec --group iot --name mover --export allow")
            local wrapped = e.dir .. "/mover.wrapped"
            ok(e.app .. " key export iot/mover --wrap iot/kek --out " .. H.q(wrapped))
            ok(e.app .. " key import " .. H.q(wrapped) .. " --format aes-kwp --unwrap iot/kek "
                .. "--group iot --name moved")
            local a = json(e.app .. " --json key info iot/mover")
            local b = json(e.app .. " --json key info iot/moved")
            assert.are.equal(a.public_key, b.public_key)
            -- a plain export of an "allow" key is refused, and nothing is written
            local plain = e.dir .. "/mover.p8"
            local err = fails(e.app .. " key export iot/mover --out " .. H.q(plain))
            assert.matches("EPOLICY", err)
            assert.is_false(H.exists(plain))
        end)

        it("backs up the internal database and restores it on a second device with the same MBK", function()
            local pws = e.dir .. "/db-shares.pw"
            H.writefile(pws, "db-share-password-1\ndb-share-password-2\ndb-share-password-3\n")
            local s = {}
            for i = 1, 3 do s[i] = e.dir .. "/db-share" .. i .. ".key" end
            ok(e.admin .. " mbk rotate --kdf-cost 10 --share-passwords " .. H.q(pws) .. " --out "
                .. H.q(table.concat(s, ",")))
            ok(e.app .. " key generate --algo ec --group iot --name db-key")
            local img = e.dir .. "/keys.img"
            local r = json(e.admin .. " --json db backup " .. H.q(img))
            assert.is_true(r.keys >= 1)
            local b = new_env()
            setup_device(b)
            -- another MBK: refused, nothing changed
            local err = fails(b.admin .. " db restore " .. H.q(img))
            assert.matches("EMBK", err)
            H.writefile(b.dir .. "/pw", "db-share-password-2\ndb-share-password-3\n")
            ok(b.admin .. " mbk import " .. H.q(s[2]) .. " " .. H.q(s[3]) .. " --share-passwords "
                .. H.q(b.dir .. "/pw"))
            local got = json(b.admin .. " --json db restore " .. H.q(img))
            assert.are.equal(r.keys, got.keys)
            assert.are.equal(json(e.app .. " --json key info iot/db-key").public_key,
                json(b.app .. " --json key info iot/db-key").public_key)
            H.rm_rf(b.dir)
        end)
    end)

    describe("MBK shares across two devices", function()
        it("generates 2-of-3 shares, imports 2 on a second device, which opens the first's blobs", function()
            local a, b = new_env(), new_env()
            setup_device(a)
            setup_device(b)
            local pws = a.dir .. "/share.pws"
            H.writefile(pws, "share-password-1\nshare-password-2\nshare-password-3\n")
            local s = {}
            for i = 1, 3 do s[i] = a.dir .. "/share" .. i .. ".key" end
            local before = json(a.base .. " --json mbk info").current
            local r = json(a.admin .. " --json mbk rotate --m 2 --n 3 --kdf-cost 10 --share-passwords "
                .. H.q(pws) .. " --out " .. H.q(table.concat(s, ",")))
            assert.are.equal(before, r.previous)
            -- shares are never overwritten
            local err = fails(a.admin .. " mbk generate --kdf-cost 10 --share-passwords " .. H.q(pws)
                .. " --out " .. H.q(table.concat(s, ",")))
            assert.matches("exists", err)

            local blob = a.dir .. "/x.blob"
            ok(a.app .. " key generate --external --algo ec --group iot --name x --out " .. H.q(blob))
            -- device b: shares 1 and 3; a wrong password first
            local bad = b.dir .. "/bad.pws"
            H.writefile(bad, "share-password-1\nwrong-password-3\n")
            err = fails(b.admin .. " mbk import " .. H.q(s[1]) .. " " .. H.q(s[3])
                .. " --share-passwords " .. H.q(bad))
            assert.matches("share3%.key", err)
            assert.is_nil(err:find("wrong-password-3", 1, true))
            -- the passwords from the environment, as a script would give them
            ok("SOFTCXI_SHARE_PASSWORD_1=share-password-1 SOFTCXI_SHARE_PASSWORD_2=share-password-3 "
                .. b.admin .. " mbk import " .. H.q(s[1]) .. " " .. H.q(s[3]))
            assert.are.equal(r.current, json(b.base .. " --json mbk info").current)
            ok("printf 'hi' | " .. b.app .. " sign " .. H.q(blob) .. " --out " .. H.q(b.dir .. "/sig"))
            local v = json("printf 'hi' | " .. a.app .. " --json verify " .. H.q(blob) .. " --sig "
                .. H.q(b.dir .. "/sig"))
            assert.are.equal(true, v.valid)
            -- retire the auto MBK on a
            ok(a.admin .. " mbk retire " .. before)
            assert.are.equal(0, #json(a.base .. " --json mbk info").older)
            H.rm_rf(a.dir)
            H.rm_rf(b.dir)
        end)
    end)

    describe("bulk jobs", function()
        local e, store

        setup(function()
            e = new_env()
            setup_device(e)
            store = "file:" .. e.dir .. "/ks"
        end)
        teardown(function() H.rm_rf(e.dir) end)

        local function stats()
            return json(e.base .. " --json store stats --scan " .. H.q(store))
        end

        it("provisions, resumes, and a re-run adds nothing", function()
            local r = json(e.app .. " --json provision --algo ec --group iot --count 300 --batch 50 "
                .. "--name 'dev-%05d' --store " .. H.q(store))
            assert.are.equal(300, r.generated)
            assert.are.equal(300, r.stored)
            r = json(e.app .. " --json provision --algo ec --group iot --count 350 --batch 50 "
                .. "--name 'dev-%05d' --store " .. H.q(store))
            assert.are.equal(50, r.generated)
            assert.are.equal(300, r.skipped)
            local st = stats()
            assert.are.equal(350, st.count)
            assert.are.equal(350, st.by_group.iot)
            local err = fails(e.app .. " provision --algo ec --group iot --count 3 --name dev "
                .. "--store " .. H.q(store), 2)
            assert.matches("%%d", err)
            -- more threads than the device runs: a usage error before any work, for both jobs
            err = fails(e.app .. " provision --algo ec --group iot --count 3 --name 'x-%d' --threads 17 "
                .. "--store " .. H.q(store), 2)
            assert.matches("%-%-threads must be an integer from 1 to 16, not '17'", err)
            err = fails(e.app .. " rewrap --threads 0 --store " .. H.q(store), 2)
            assert.matches("%-%-threads must be an integer from 1 to 16, not '0'", err)
        end)

        it("stops cleanly on SIGINT and a re-run completes", function()
            local s2 = "file:" .. e.dir .. "/ks-int"
            local log = e.dir .. "/int.log"
            local cmd = e.app .. " --json provision --algo ec --group iot --count 3000 --batch 50 "
                .. "--name 'k-%06d' --store " .. H.q(s2)
            -- start in the background, wait for some keys, then Ctrl-C
            local script = "( " .. cmd .. " >" .. H.q(log) .. " 2>&1 ) & pid=$!; "
                .. "for i in $(seq 1 300); do n=$(ls -R " .. H.q(e.dir .. "/ks-int") .. " 2>/dev/null "
                .. "| grep -c '\\.blob$'); [ \"$n\" -ge 100 ] && break; sleep 0.05; done; "
                .. "kill -INT $pid; wait $pid; echo \"rc=$?\""
            local _, out = H.run("env -u SOFTCXI_PASSWORD sh -c " .. H.q(script))
            local rc = tonumber(out:match("rc=(%d+)"))
            local doc = cjson.decode(H.readfile(log):match("{.*}"))
            if rc == 0 then
                pending("the job finished before the signal came")
                return
            end
            assert.are.equal(130, rc)
            assert.are.equal("SIGINT", doc.interrupted)
            local n = json(e.base .. " --json store stats --scan " .. H.q(s2))
            assert.are.equal(doc.stored, n.count) -- everything reported is there, readable
            assert.are.equal(0, n.unreadable)
            local r = json(e.app .. " --json provision --algo ec --group iot --count 3000 --batch 1000 "
                .. "--name 'k-%06d' --store " .. H.q(s2))
            assert.are.equal(n.count, r.skipped)
            assert.are.equal(3000, json(e.base .. " --json store stats " .. H.q(s2)).count)
        end)

        it("rewraps a store after rotation, then the old MBK can be retired", function()
            local pws = e.dir .. "/rot.pws"
            H.writefile(pws, "rotate-password-1\nrotate-password-2\nrotate-password-3\n")
            local old = json(e.base .. " --json mbk info").current
            local shares = {}
            for i = 1, 3 do shares[i] = e.dir .. "/rot" .. i .. ".key" end
            local r = json(e.admin .. " --json mbk rotate --kdf-cost 10 --share-passwords " .. H.q(pws)
                .. " --out " .. H.q(table.concat(shares, ",")))
            local w = json(e.app .. " --json rewrap --store " .. H.q(store))
            assert.are.equal(w.seen, w.rewrapped)
            assert.are.equal(r.current, w.mbk)
            local st = stats()
            assert.are.equal(st.count, st.by_mbk[r.current])
            ok(e.admin .. " mbk retire " .. old)
            -- every blob still signs after the retirement
            ok("printf m | " .. e.app .. " sign --store " .. H.q(store) .. " iot/dev-00001 --out /dev/null")
            -- a second run finds nothing to do (on one device thread, small pages)
            w = json(e.app .. " --json rewrap --threads 1 --page 7 --store " .. H.q(store))
            assert.are.equal(0, w.rewrapped)
            assert.are.equal(w.seen, w.current)
        end)

        it("migrates a store to another, resumably", function()
            local to = os.getenv("SOFTCXI_TEST_REDIS_URL")
            if to then
                to = to:gsub("prefix=[^&]*", "prefix=cli-migrate-" .. os.time() .. ":")
            else
                to = "file:" .. e.dir .. "/ks-copy"
            end
            local r = json(e.base .. " --json store migrate --page 64 --from " .. H.q(store)
                .. " --to " .. H.q(to))
            local n = stats().count
            assert.are.equal(n, r.copied)
            r = json(e.base .. " --json store migrate --from " .. H.q(store) .. " --to " .. H.q(to))
            assert.are.equal(0, r.copied)
            assert.are.equal(n, r.skipped)
            local st = json(e.base .. " --json store stats " .. H.q(to))
            assert.are.equal(n, st.count)
            if to:find("^redis:") then
                -- a new Redis store: its recorded layout, in JSON and in text
                assert.are.same({ name_buckets = 16, algo_index = 0, name_index = "other" }, st.layout)
                local rc, out = H.run(e.base .. " store stats " .. H.q(to))
                assert.are.equal(0, rc, out)
                assert.truthy(out:find("name_buckets=16 algo_index=0 name_index=other", 1, true), out)
            else
                assert.is_nil(st.layout)
            end
        end)

        it("upgrades a Redis store of the old layout (a set per name) that open refuses", function()
            local url, port = os.getenv("SOFTCXI_TEST_REDIS_URL"), os.getenv("SOFTCXI_TEST_REDIS_PORT")
            if not (url and port) then
                pending("SOFTCXI_TEST_REDIS_URL / SOFTCXI_TEST_REDIS_PORT are not set")
                return
            end
            local P = "cli-upgrade-" .. os.time() .. "-" .. math.random(1, 1e6) .. ":"
            -- (name_index=all: the old layout gave every key a name entry)
            url = url:gsub("prefix=[^&]*", "prefix=" .. P) .. "&name_index=all"
            json(e.base .. " --json store migrate --from " .. H.q(store) .. " --to " .. H.q(url))
            local n = stats().count
            -- what an older softcxi wrote: the name index as a set per name, no record
            local c = assert(require("softcxi.hiredis").connect("127.0.0.1", tonumber(port), 5))
            local function cmd(argv) return assert(c:command(argv)) end
            local cursor, sets = "0", 0
            repeat
                local r = cmd { "SCAN", cursor, "MATCH", P .. "nx:*", "COUNT", 1000 }
                cursor = r[1]
                for _, k in ipairs(r[2]) do
                    local kv = cmd { "HGETALL", k }
                    for i = 1, #kv, 2 do
                        -- a name of several ids has its set already
                        if kv[i + 1] ~= "" then
                            sets = sets + cmd { "SADD", P .. "idx:name:" .. kv[i], kv[i + 1] }
                        end
                    end
                    cmd { "DEL", k }
                end
            until cursor == "0"
            cmd { "DEL", P .. "name-buckets" }
            assert.are.equal(n, sets)           -- one name per key here
            local err = fails(e.base .. " store stats " .. H.q(url))
            assert.matches("ELAYOUT", err)
            assert.truthy(err:find("softcxi store upgrade " .. url, 1, true), err)
            local r = json(e.base .. " --json store upgrade " .. H.q(url))
            assert.are.equal(n, r.name_sets_moved)
            assert.are.equal(n, r.keys)
            assert.are.equal(16, r.name_buckets)
            assert.are.equal(n, json(e.base .. " --json store stats " .. H.q(url)).count)
            assert.are.equal(0, #cmd { "KEYS", P .. "idx:name:*" })
            -- once more: nothing left to move
            assert.are.equal(0, json(e.base .. " --json store upgrade " .. H.q(url)).name_sets_moved)
            cursor = "0"
            repeat
                local r2 = cmd { "SCAN", cursor, "MATCH", P .. "*", "COUNT", 1000 }
                cursor = r2[1]
                for _, k in ipairs(r2[2]) do cmd { "DEL", k } end
            until cursor == "0"
            c:close()
            fails(e.base .. " store upgrade " .. H.q("file:" .. e.dir .. "/ks"), 2)
        end)
    end)

    it("runs the README's main job (examples/provision-demo) at a small count", function()
        local dir = H.tmpdir()
        H.rm_rf(dir)
        local rc, out = H.run("env -u SOFTCXI_PASSWORD SOFTCXI_LUA=" .. H.interpreter() .. " "
            .. H.q(root .. "examples/provision-demo") .. " --dir " .. H.q(dir) .. " --count 200")
        assert(rc == 0, out)
        assert.matches("Verified OK.*Verified OK", out)
        assert.matches("provision%-demo: ok", out)
        H.rm_rf(dir)
    end)
end)
