-- Policy bound into the blob: usage and expiry, enforced by the device.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")

local function expect_policy(...)
    local r = H.pack(...)
    assert.is_true(r[1] == nil, "expected EPOLICY, got a result of type " .. type(r[1]))
    assert.is_string(r[2])
    assert.are.equal("EPOLICY", r[3], "message: " .. tostring(r[2]))
    return r[2]
end

describe("policy", function()
    local dev, hsm, rsa_crypt, rsa_sign

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
        -- the two RSA-2048 keys of this file, made once
        rsa_crypt = H.gen(hsm, { algo = "rsa", size = 2048, name = "crypt-only", group = "pol",
                                 usage = { "encrypt", "decrypt" } })
        rsa_sign = H.gen(hsm, { algo = "rsa", size = 2048, name = "sign-only", group = "pol",
                                usage = { "sign", "verify" } })
    end)

    teardown(function()
        H.destroy(dev)
    end)

    describe("usage", function()
        it("sign with an encrypt-only RSA key is EPOLICY and names the key", function()
            local msg = expect_policy(hsm:sign(rsa_crypt, "rsa-pss-sha256", "m"))
            assert.truthy(msg:find("'pol/crypt-only'", 1, true), msg)
            assert.truthy(msg:find("sign", 1, true), msg)
            expect_policy(hsm:sign(rsa_crypt, "rsa-pkcs1-sha256", "m"))
            expect_policy(hsm:bulk_sign(rsa_crypt, "rsa-pkcs1-sha256", { "m" }))
        end)

        it("verify with an encrypt-only RSA key is EPOLICY", function()
            local sig = assert(hsm:sign(rsa_sign, "rsa-pss-sha256", "m"))
            expect_policy(hsm:verify(rsa_crypt, "rsa-pss-sha256", "m", sig))
        end)

        it("encrypt with a sign-only key is EPOLICY and names the key", function()
            local msg = expect_policy(hsm:encrypt(rsa_sign, "rsa-oaep-sha256", "m"))
            assert.truthy(msg:find("'pol/sign-only'", 1, true), msg)
            assert.truthy(msg:find("encrypt", 1, true), msg)
        end)

        it("decrypt with a sign-only key is EPOLICY", function()
            local ct = assert(hsm:encrypt(rsa_crypt, "rsa-oaep-sha256", "m"))
            expect_policy(hsm:decrypt(rsa_sign, "rsa-oaep-sha256", ct))
        end)

        it("the permitted operations still work", function()
            local ct = assert(hsm:encrypt(rsa_crypt, "rsa-oaep-sha256", "m"))
            assert.are.equal("m", assert(hsm:decrypt(rsa_crypt, "rsa-oaep-sha256", ct)))
            local sig = assert(hsm:sign(rsa_sign, "rsa-pss-sha256", "m"))
            assert.is_true(hsm:verify(rsa_sign, "rsa-pss-sha256", "m", sig))
        end)

        it("a sign-only ec key (no verify) may sign but not verify", function()
            local blob = H.gen(hsm, { algo = "ec", name = "s", group = "pol", usage = { "sign" } })
            local sig = assert(hsm:sign(blob, "ecdsa-sha256", "m"))
            local msg = expect_policy(hsm:verify(blob, "ecdsa-sha256", "m", sig))
            assert.truthy(msg:find("'pol/s'", 1, true), msg)
        end)

        it("an ec key without derive may not agree a secret", function()
            local a = H.gen(hsm, { algo = "ec", name = "nod", group = "pol" })
            local b = H.gen(hsm, { algo = "ec", name = "peer", group = "pol", usage = { "derive" } })
            expect_policy(hsm:secret_agree(a, "ecdh", assert(hsm:public_key(b, "der"))))
        end)

        it("an encrypt-only aes key may not decrypt", function()
            local blob = H.gen(hsm, { algo = "aes", name = "enc", group = "pol", usage = { "encrypt" } })
            local ct = assert(hsm:encrypt(blob, "aes-gcm", "m"))
            local msg = expect_policy(hsm:decrypt(blob, "aes-gcm", ct))
            assert.truthy(msg:find("'pol/enc'", 1, true), msg)
        end)

        it("an hmac key without verify may mac but not mac_verify", function()
            local blob = H.gen(hsm, { algo = "hmac", name = "m", group = "pol", usage = { "sign" } })
            local tag = assert(hsm:mac(blob, "hmac-sha256", "d"))
            expect_policy(hsm:mac_verify(blob, "hmac-sha256", "d", tag))
        end)

        it("names a key with a specifier as 'group/name/specifier'", function()
            local blob = H.gen(hsm, { algo = "ec", name = "spec", group = "pol", specifier = 3,
                                      usage = { "derive" } })
            local msg = expect_policy(hsm:sign(blob, "ecdsa-sha256", "m"))
            assert.truthy(msg:find("'pol/spec/3'", 1, true), msg)
        end)
    end)

    describe("expiry", function()
        it("an expired key is EPOLICY, 'expired', naming the key", function()
            local blob = H.gen(hsm, { algo = "ec", name = "old", group = "pol",
                                      expiry = os.time() - 10 })
            local msg = expect_policy(hsm:sign(blob, "ecdsa-sha256", "m"))
            assert.truthy(msg:find("expired", 1, true), msg)
            assert.truthy(msg:find("'pol/old'", 1, true), msg)
            expect_policy(hsm:verify(blob, "ecdsa-sha256", "m", "sig"))
            expect_policy(hsm:bulk_sign(blob, "ecdsa-sha256", { "m" }))
        end)

        it("an expired aes key neither encrypts nor decrypts", function()
            local blob = H.gen(hsm, { algo = "aes", name = "old-aes", group = "pol",
                                      expiry = os.time() - 10 })
            local msg = expect_policy(hsm:encrypt(blob, "aes-gcm", "m"))
            assert.truthy(msg:find("expired", 1, true), msg)
            expect_policy(hsm:decrypt(blob, "aes-gcm", string.rep("\0", 40)))
        end)

        it("an expired key still shows its info and public key", function()
            local blob = H.gen(hsm, { algo = "ed25519", name = "old-ed", group = "pol",
                                      expiry = os.time() - 10 })
            local info = assert(hsm:key_info(blob))
            assert.is_true(info.verified)
            assert.is_true(info.expiry < os.time())
            assert.is_string(assert(hsm:public_key(blob, "pem")))
        end)

        it("a key with expiry in the future works", function()
            local blob = H.gen(hsm, { algo = "ec", name = "fresh", group = "pol",
                                      expiry = os.time() + 3600 })
            local sig = assert(hsm:sign(blob, "ecdsa-sha256", "m"))
            assert.is_true(hsm:verify(blob, "ecdsa-sha256", "m", sig))
        end)

        it("an expired key is refused even when it is in the cache", function()
            local expiry = os.time() + 2
            local blob = H.gen(hsm, { algo = "ec", name = "soon", group = "pol", expiry = expiry })
            assert(hsm:sign(blob, "ecdsa-sha256", "m")) -- now cached
            while os.time() < expiry do os.execute("sleep 0.2") end -- at most ~2 s
            local msg = expect_policy(hsm:sign(blob, "ecdsa-sha256", "m"))
            assert.truthy(msg:find("expired", 1, true), msg)
        end)
    end)
end)

-- ---- policy scripts (softcxi.policy) -------------------------------------------

describe("policy scripts", function()
    local policy = require "softcxi.policy"
    local softcxi = H.softcxi
    local EXT = softcxi.FLAG_EXTERNAL
    local spec_dir = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./"
    local examples = spec_dir .. "../examples/policies/"
    local dev, hsm, tmp

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
        tmp = H.tmpdir()
    end)

    teardown(function()
        H.destroy(dev)
        H.rm_rf(tmp)
    end)

    after_each(function()
        hsm:set_policy(nil)
    end)

    -- A policy file with this text; returns its path.
    local n_files = 0
    local function policy_file(text)
        n_files = n_files + 1
        local path = tmp .. "/p" .. n_files .. ".lua"
        H.writefile(path, text)
        return path
    end

    local function example(file, opts)
        return assert(policy.load(examples .. file, opts))
    end

    local function gen(t) return hsm:key_generate(EXT, t) end

    local function has(msg, text)
        assert.truthy(msg:find(text, 1, true), msg)
    end

    describe("load", function()
        it("loads a file of hooks and names the policy after the file", function()
            local pol = assert(policy.load(policy_file("return { on_use = function() return true end }")))
            assert.is_true(policy.is_policy(pol))
            assert.truthy(pol.name:find("^p%d+%.lua$"), pol.name)
        end)

        it("a missing file is ENOTFOUND naming it", function()
            local msg = H.expect_err("ENOTFOUND", policy.load(tmp .. "/nope.lua"))
            has(msg, "nope.lua")
        end)

        it("a directory is EINVAL saying it cannot be read", function()
            local msg = H.expect_err("EINVAL", policy.load(tmp))
            assert.are.equal("policy.load: cannot read " .. tmp .. ": Is a directory", msg)
        end)

        it("a syntax error is EINVAL with file and line, and no policy", function()
            local path = policy_file("return {\n  on_use = function(key, ctx)\n    return key.\n  end,\n}\n")
            local msg = H.expect_err("EINVAL", policy.load(path))
            has(msg, path .. ":4:")
        end)

        it("an error while the file runs is EINVAL with file and line", function()
            local path = policy_file("local x = nil\nreturn x.field\n")
            local msg = H.expect_err("EINVAL", policy.load(path))
            has(msg, path .. ":2:")
            has(msg, "while loading")
        end)

        it("a file that returns no table is EINVAL", function()
            local msg = H.expect_err("EINVAL", policy.load(policy_file("return 42")))
            has(msg, "must return a table of hooks")
            H.expect_err("EINVAL", policy.load(policy_file("")))
        end)

        it("an unknown hook (a typo) is EINVAL naming it", function()
            local msg = H.expect_err("EINVAL", policy.load(policy_file(
                "return { on_sign = function() return true end }")))
            has(msg, "unknown hook 'on_sign'")
        end)

        it("a hook that is not a function, or a name that is not a string, is EINVAL", function()
            local msg = H.expect_err("EINVAL", policy.load(policy_file("return { on_use = true }")))
            has(msg, "hook 'on_use' must be a function")
            msg = H.expect_err("EINVAL", policy.load(policy_file("return { name = 1 }")))
            has(msg, "'name' must be a string")
        end)

        it("does not load precompiled chunks", function()
            local f = assert(load("return {}"))
            local path = tmp .. "/bytecode.lua"
            H.writefile(path, string.dump(f))
            local msg = H.expect_err("EINVAL", policy.load(path))
            has(msg, "bytecode.lua")
        end)

        it("keeps the file's globals to itself and passes params as ...", function()
            local pol = assert(policy.load(policy_file(
                "leaked_global = 1\nlocal p = ...\nreturn { name = p.name }"), { params = { name = "pp" } }))
            assert.are.equal("pp", pol.name)
            assert.is_nil(rawget(_G, "leaked_global"))
        end)

        it("raises for misuse: a non-string file, unknown or bad options", function()
            assert.has_error(function() policy.load(42) end, "policy.load: file must be a string")
            assert.has_error(function() policy.load("x.lua", { colour = 1 }) end,
                "policy.load: unknown option 'colour'")
            assert.has_error(function() policy.load("x.lua", { clock = 5 }) end)
            assert.has_error(function() policy.load("x.lua", { store = "file:x" }) end)
            assert.has_error(function() policy.new({ on_sign = print }) end)
            assert.has_error(function() policy.new("hooks") end)
            assert.has_error(function() policy.combine({ 1 }) end)
        end)
    end)

    describe("the session hook", function()
        it("softcxi.open{ policy = } consults it; set_policy(nil) stops it", function()
            local pol = policy.new { name = "no-ec", on_generate = function(t)
                if t.algo == "ec" then return false, "no ec here" end
                return true
            end }
            local h = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile, policy = pol })
            assert(h:logon_pass(H.USER, H.USER_PASSWORD))
            assert.are.equal(pol, h:get_policy())
            local msg = H.expect_err("EPOLICY", h:key_generate(EXT, { algo = "ec", name = "k", group = "g" }))
            assert.are.equal("key_generate: 'g/k': denied by policy 'no-ec': no ec here", msg)
            assert(h:key_generate(EXT, { algo = "ed25519", name = "k", group = "g" }))
            assert.is_true(h:set_policy(nil))
            assert(h:key_generate(EXT, { algo = "ec", name = "k", group = "g" }))
            h:close()
            assert.has_error(function() h:set_policy(pol) end)
        end)

        it("raises for something that is not a policy", function()
            assert.has_error(function() hsm:set_policy({ on_use = print }) end)
            assert.has_error(function()
                softcxi.open { path = dev.path, keyfile = dev.keyfile, policy = "p.lua" }
            end)
        end)

        it("a session without a policy is unaffected by another's", function()
            local other = H.open(dev)
            other:set_policy(policy.new { on_use = function() return false, "no" end })
            local blob = H.gen(hsm, { algo = "ec", name = "free", group = "g" })
            assert(hsm:sign(blob, "ecdsa-sha256", "m"))
            H.expect_err("EPOLICY", other:sign(blob, "ecdsa-sha256", "m"))
            other:close()
        end)

        it("on_generate may amend the template; the hook gets a copy", function()
            local seen
            hsm:set_policy(policy.new { on_generate = function(t, ctx)
                seen = ctx
                t.label = "stamped"
                t.usage[#t.usage + 1] = "verify"
                return t
            end })
            local template = { algo = "ec", name = "amend", group = "g", usage = { "sign" } }
            local blob = assert(gen(template))
            local info = softcxi.key_info(blob)
            assert.are.equal("stamped", info.label)
            assert.are.same({ "sign", "verify" }, info.usage)
            assert.is_nil(template.label)
            assert.are.same({ "sign" }, template.usage)
            assert.are.equal("key_generate", seen.op)
            assert.are.equal(EXT, seen.flags)
            assert.is_number(seen.now)
        end)

        it("an amended template the device refuses is the device's EINVAL", function()
            hsm:set_policy(policy.new { on_generate = function(t) t.algo = "des"; return t end })
            H.expect_err("EINVAL", gen { algo = "ec", name = "x", group = "g" })
        end)

        it("bulk_generate gives the hook every name and the count", function()
            local seen
            hsm:set_policy(policy.new { on_generate = function(_, ctx) seen = ctx; return true end })
            assert(hsm:bulk_generate(EXT, { algo = "ed25519", group = "g" }, 3,
                { name_format = "b-%02d", start = 7 }))
            assert.are.equal("bulk_generate", seen.op)
            assert.are.equal(3, seen.count)
            assert.are.same({ "b-07", "b-08", "b-09" }, seen.names)
            assert(hsm:bulk_generate(EXT, { algo = "ed25519", group = "g" }, 2, { names = { "x", "y" } }))
            assert.are.same({ "x", "y" }, seen.names)
        end)

        it("key_import consults on_generate with op key_import", function()
            local seen
            hsm:set_policy(policy.new { on_generate = function(t, ctx)
                seen = ctx.op
                return false, "no imports of " .. tostring(t.algo)
            end })
            local msg = H.expect_err("EPOLICY", hsm:key_import(EXT, { algo = "aes", name = "i", group = "g" },
                string.rep("k", 32), "raw"))
            assert.are.equal("key_import", seen)
            has(msg, "no imports of aes")
        end)

        it("every keyed operation consults on_use with its op, mech and count", function()
            local ec = H.gen(hsm, { algo = "ec", name = "u-ec", group = "g",
                                    usage = { "sign", "verify", "derive" } })
            local aes = H.gen(hsm, { algo = "aes", name = "u-aes", group = "g" })
            local mk = H.gen(hsm, { algo = "hmac-sha256", name = "u-mac", group = "g" })
            local sig = assert(hsm:sign(ec, "ecdsa-sha256", "m"))
            local ct = assert(hsm:encrypt(aes, "aes-gcm", "m"))
            local tag = assert(hsm:mac(mk, "hmac-sha256", "m"))
            local peer = assert(hsm:public_key(ec, "der"))
            local log = {}
            hsm:set_policy(policy.new { on_use = function(key, ctx)
                log[#log + 1] = { op = ctx.op, mech = ctx.mech, count = ctx.count, id = ctx.id,
                                  name = key.name }
                return false, "logged"
            end })
            local calls = {
                { "sign", function() return hsm:sign(ec, "ecdsa-sha256", "m") end, "ecdsa-sha256", 1 },
                { "verify", function() return hsm:verify(ec, "ecdsa-sha256", "m", sig) end,
                  "ecdsa-sha256", 1 },
                { "bulk_sign", function() return hsm:bulk_sign(ec, "ecdsa-sha256", { "a", "b", "c" }) end,
                  "ecdsa-sha256", 3 },
                { "encrypt", function() return hsm:encrypt(aes, "aes-gcm", "m") end, "aes-gcm", 1 },
                { "decrypt", function() return hsm:decrypt(aes, "aes-gcm", ct) end, "aes-gcm", 1 },
                { "mac", function() return hsm:mac(mk, "hmac-sha256", "m") end, "hmac-sha256", 1 },
                { "mac_verify", function() return hsm:mac_verify(mk, "hmac-sha256", "m", tag) end,
                  "hmac-sha256", 1 },
                { "secret_agree", function() return hsm:secret_agree(ec, "ecdh", peer) end, "ecdh", 1 },
            }
            for i, c in ipairs(calls) do
                local msg = H.expect_err("EPOLICY", c[2]())
                assert.truthy(msg:find("^" .. c[1] .. ": 'g/u%-"), msg)
                has(msg, "denied by policy 'policy': logged")
                assert.are.equal(c[1], log[i].op)
                assert.are.equal(c[3], log[i].mech)
                assert.are.equal(c[4], log[i].count)
                assert.truthy(log[i].id:find("^g/u%-"))
            end
        end)

        it("an internal key's handle is resolved for on_use and on_export", function()
            local handle = assert(hsm:key_generate(0, { algo = "ec", name = "inner", group = "g" }))
            local seen = {}
            hsm:set_policy(policy.new {
                on_use = function(key, ctx) seen[#seen + 1] = ctx.op .. ":" .. key.name; return true end,
                on_export = function(key, ctx)
                    seen[#seen + 1] = ctx.op .. ":" .. key.name
                    return false, "no backups"
                end,
            })
            assert(hsm:sign(handle, "ecdsa-sha256", "m"))
            local msg = H.expect_err("EPOLICY", hsm:key_backup(handle))
            has(msg, "key_backup: 'g/inner': denied by policy 'policy': no backups")
            assert.are.same({ "sign:inner", "key_backup:inner" }, seen)
            assert(hsm:key_delete(handle))
            H.expect_err("ENOTFOUND", hsm:sign(handle, "ecdsa-sha256", "m"))
        end)

        it("a malformed blob still gets the device's precise error", function()
            hsm:set_policy(policy.new { on_use = function() return true end })
            H.expect_err("EFORMAT", hsm:sign("Knot a blob", "ecdsa-sha256", "m"))
            assert.has_error(function() hsm:sign({}, "ecdsa-sha256", "m") end)
        end)

        it("on_logon may refuse a user before any password check", function()
            local h = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile,
                policy = policy.new { on_logon = function(user, ctx)
                    if user == H.ADMIN then return false, "administrators log on with the CLI only" end
                    assert(ctx.op == "logon_pass")
                    return true
                end } })
            local msg = H.expect_err("EPOLICY", h:logon_pass(H.ADMIN, "wrong-but-never-checked"))
            assert.are.equal("logon_pass: user 'ADMIN': denied by policy 'policy': "
                .. "administrators log on with the CLI only", msg)
            assert(h:logon_pass(H.USER, H.USER_PASSWORD))
            h:close()
        end)
    end)

    describe("decisions", function()
        local blob
        setup(function()
            blob = H.gen(hsm, { algo = "ec", name = "d", group = "g" })
        end)

        local function use_with(hook)
            hsm:set_policy(policy.new { name = "t", on_use = hook })
            return H.expect_err("EPOLICY", hsm:sign(blob, "ecdsa-sha256", "m"))
        end

        it("a hook that raises denies, and the message carries the error", function()
            local msg = use_with(function() error("counter store unreachable") end)
            has(msg, "policy 't' failed in on_use (treated as a denial)")
            has(msg, "counter store unreachable")
        end)

        it("a hook in a file that raises names the file and line", function()
            local path = policy_file("return {\n on_use = function(key)\n  return key.nope.field\n end }\n")
            hsm:set_policy(assert(policy.load(path)))
            local msg = H.expect_err("EPOLICY", hsm:sign(blob, "ecdsa-sha256", "m"))
            has(msg, path .. ":3:")
        end)

        it("no decision is a denial that says how to allow", function()
            local msg = use_with(function() end)
            has(msg, "on_use gave no reason; return true to allow")
            msg = use_with(function() return false end)
            has(msg, "on_use gave no reason)")
            msg = use_with(function() return nil, "nil, reason works too" end)
            has(msg, "denied by policy 't': nil, reason works too")
        end)

        it("anything but true, false or nil is a denial naming what came back", function()
            local msg = use_with(function() return "yes" end)
            has(msg, "on_use returned a string (treated as a denial")
            msg = use_with(function() return {} end) -- only on_generate may amend
            has(msg, "on_use returned a table")
            hsm:set_policy(policy.new { on_generate = function() return 1 end })
            msg = H.expect_err("EPOLICY", gen { algo = "ec", group = "g", name = "n" })
            has(msg, "on_generate returned a number")
            has(msg, "a template table")
        end)

        it("combine: every part runs in order, the first denial wins, amendments carry over", function()
            local order = {}
            local a = policy.new({ on_generate = function(t)
                order[#order + 1] = "a"; t.label = "from-a"; return t
            end }, { name = "a" })
            local b = {
                name = "b",
                on_generate = function(t)
                    order[#order + 1] = "b"
                    if t.label ~= "from-a" then return false, "a did not run first" end
                    return true
                end,
                on_use = function() return false, "b says no" end,
            }
            local pol = policy.combine({ a, b })
            assert.are.equal("a+b", pol.name)
            hsm:set_policy(pol)
            local k = assert(gen { algo = "ec", group = "g", name = "c" })
            assert.are.same({ "a", "b" }, order)
            assert.are.equal("from-a", softcxi.key_info(k).label)
            local msg = H.expect_err("EPOLICY", hsm:sign(k, "ecdsa-sha256", "m"))
            has(msg, "denied by policy 'b': b says no")
        end)
    end)

    describe("stores", function()
        local store_mod = require "softcxi.store"
        local st, pol, blob

        setup(function()
            st = assert(store_mod.open("file:" .. tmp .. "/store"))
            pol = policy.new { on_store = function(id, key, ctx)
                if ctx.op == "delete" then
                    if id:find("^keep/") then return false, "keep/ is permanent" end
                    return true
                end
                if key.group == "tmp" then return false, "no tmp keys in the store" end
                return true
            end }
            blob = H.gen(hsm, { algo = "ec", name = "s1", group = "g" })
        end)

        teardown(function() st:close() end)

        it("check_store allows, denies with the id, and passes on a parse error", function()
            assert.is_true(policy.check_store(pol, nil, blob))
            local tmpkey = H.gen(hsm, { algo = "ec", name = "t1", group = "tmp" })
            local msg = H.expect_err("EPOLICY", pol:check_store(nil, tmpkey))
            assert.are.equal("store.put: 'tmp/t1': denied by policy 'policy': no tmp keys in the store", msg)
            H.expect_err("EFORMAT", pol:check_store("x", "not a blob"))
            H.expect_err("EPOLICY", pol:check_store("keep/x", nil, { op = "delete" }))
        end)

        it("wrap_store checks put, put_many and delete and passes everything else", function()
            local w = policy.wrap_store(st, pol)
            assert(w:put(nil, blob))
            assert.are.equal(blob, assert(w:get("g/s1")))
            local tmpkey = H.gen(hsm, { algo = "ec", name = "t2", group = "tmp" })
            H.expect_err("EPOLICY", w:put(nil, tmpkey))
            local b2 = H.gen(hsm, { algo = "ec", name = "s2", group = "g" })
            local r = H.pack(w:put_many({ { blob = b2 }, { blob = tmpkey } }))
            assert.is_nil(r[1])
            assert.are.equal("EPOLICY", r[3])
            assert.is_nil(st:get("g/s2")) -- nothing of the batch was written
            assert.are.equal(1, assert(w:count()))
            assert(w:put("keep/s2", b2))
            H.expect_err("EPOLICY", w:delete("keep/s2"))
            assert(w:delete("g/s1"))
            assert.has_error(function() policy.wrap_store(st, {}) end)
        end)
    end)

    describe("example: algorithms.lua", function()
        local pol
        setup(function() pol = example("algorithms.lua") end)
        before_each(function() hsm:set_policy(pol) end)

        it("allows what the group lists", function()
            assert(gen { algo = "ec", name = "a1", group = "iot" })
            assert(gen { algo = "ec", curve = "secp384r1", name = "a2", group = "iot" })
            assert(gen { algo = "ed25519", name = "a3", group = "iot" })
            assert(gen { algo = "aes", size = 256, name = "a4", group = "payments" })
            assert(gen { algo = "hmac", hash = "sha256", name = "a5", group = "payments" })
            assert(pol:check_generate { algo = "rsa", size = 4096, group = "payments" })
        end)

        it("refuses other algorithms, sizes, curves and groups, saying what is allowed", function()
            local msg = H.expect_err("EPOLICY",
                gen { algo = "ec", curve = "P-521", name = "b1", group = "iot" })
            has(msg, "ec P-521 is not allowed for group 'iot' (allowed: P-256, P-384)")
            msg = H.expect_err("EPOLICY", gen { algo = "rsa", name = "b2", group = "payments" })
            has(msg, "rsa 2048 is not allowed for group 'payments' (allowed: 3072, 4096)")
            msg = H.expect_err("EPOLICY", gen { algo = "aes", size = 128, name = "b3", group = "payments" })
            has(msg, "aes 128")
            msg = H.expect_err("EPOLICY", gen { algo = "x25519", name = "b4", group = "iot" })
            has(msg, "algorithm 'x25519' is not allowed for group 'iot'")
            msg = H.expect_err("EPOLICY", gen { algo = "ec", name = "b5", group = "lab" })
            has(msg, "group 'lab' may make no keys")
            H.expect_err("EPOLICY", gen { algo = "ec", name = "b6" })
        end)

        it("an import must state what it imports", function()
            local raw = string.rep("\1", 32)
            local msg = H.expect_err("EPOLICY",
                hsm:key_import(EXT, { name = "i1", group = "iot" }, raw, "raw"))
            has(msg, "must state algo")
            msg = H.expect_err("EPOLICY",
                hsm:key_import(EXT, { algo = "ec", name = "i2", group = "iot" }, raw, "raw"))
            has(msg, "must state the curve")
            msg = H.expect_err("EPOLICY",
                hsm:key_import(EXT, { algo = "aes", name = "i3", group = "payments" }, raw, "raw"))
            has(msg, "must state the size")
            assert(hsm:key_import(EXT, { algo = "aes", size = 256, name = "i4", group = "payments" },
                raw, "raw"))
            assert(hsm:key_import(EXT, { algo = "ec", curve = "P-256", name = "i5", group = "iot" },
                raw, "raw"))
        end)

        it("a store takes only blobs that pass the same rule", function()
            hsm:set_policy(nil)
            local ok_blob = H.gen(hsm, { algo = "ed25519", name = "s-ok", group = "iot" })
            local bad_blob = H.gen(hsm, { algo = "ec", curve = "P-521", name = "s-bad", group = "iot" })
            assert.is_true(pol:check_store(nil, ok_blob))
            local msg = H.expect_err("EPOLICY", pol:check_store(nil, bad_blob))
            has(msg, "ec P-521 is not allowed")
            assert.is_true(pol:check_store("iot/s-bad", nil, { op = "delete" }))
        end)

        it("params replace the table", function()
            local p = example("algorithms.lua", { params = { allowed = { lab = { x25519 = true } } } })
            assert(p:check_generate { algo = "x25519", group = "lab" })
            H.expect_err("EPOLICY", p:check_generate { algo = "ec", group = "iot" })
        end)
    end)

    describe("example: naming.lua", function()
        local pol
        setup(function() pol = example("naming.lua") end)
        before_each(function() hsm:set_policy(pol) end)

        it("names must match the group's pattern", function()
            assert(gen { algo = "ed25519", name = "dev-00000001", group = "iot" })
            assert(gen { algo = "ed25519", name = "billing-2", group = "backend" })
            local msg = H.expect_err("EPOLICY", gen { algo = "ed25519", name = "Dev-1", group = "iot" })
            has(msg, "name 'Dev-1' does not match ^dev%-%d%d%d%d%d%d%d%d$ (group 'iot')")
            msg = H.expect_err("EPOLICY", gen { algo = "ed25519", name = "Billing", group = "backend" })
            has(msg, "does not match")
            msg = H.expect_err("EPOLICY", gen { algo = "ed25519", group = "iot" })
            has(msg, "a key needs a name")
        end)

        it("checks every name of a bulk run and names the first bad one", function()
            assert(hsm:bulk_generate(EXT, { algo = "ed25519", group = "iot" }, 2,
                { name_format = "dev-%08d" }))
            local msg = H.expect_err("EPOLICY", hsm:bulk_generate(EXT, { algo = "ed25519", group = "iot" }, 2,
                { names = { "dev-00000001", "device-2" } }))
            has(msg, "key 2: name 'device-2' does not match")
            msg = H.expect_err("EPOLICY", hsm:bulk_generate(EXT, { algo = "ed25519", group = "iot" }, 2,
                { name_format = "dev-%04d" }))
            has(msg, "key 1: name 'dev-0001'")
        end)

        it("provisioning through a policy-checked session and store", function()
            local st = assert(require("softcxi.store").open("file:" .. tmp .. "/prov"))
            local w = policy.wrap_store(st, pol)
            local r = assert(require("softcxi.provision").run { hsm = hsm, store = w, count = 3,
                template = { algo = "ed25519", group = "iot" }, name_format = "dev-%08d" })
            assert.are.equal(3, r.stored)
            local _, msg, code = require("softcxi.provision").run { hsm = hsm, store = w, count = 1,
                template = { algo = "ed25519", group = "iot" }, name_format = "d%d" }
            assert.are.equal("EPOLICY", code)
            has(msg, "does not match")
            st:close()
        end)

        it("a store takes a blob only under its default id", function()
            hsm:set_policy(nil)
            local b = H.gen(hsm, { algo = "ed25519", name = "dev-00000042", group = "iot", specifier = 2 })
            assert.is_true(pol:check_store(nil, b))
            assert.is_true(pol:check_store("iot/dev-00000042/2", b))
            local msg = H.expect_err("EPOLICY", pol:check_store("elsewhere", b))
            has(msg, "store it under its id 'iot/dev-00000042/2', not 'elsewhere'")
        end)
    end)

    describe("example: expiry.lua", function()
        local NOW = 1900000000
        local pol
        setup(function() pol = example("expiry.lua", { clock = function() return NOW end }) end)
        before_each(function() hsm:set_policy(pol) end)

        it("a key without expiry gets the group's maximum lifetime", function()
            local t = assert(pol:check_generate { algo = "ec", group = "payments" })
            assert.are.equal(NOW + 365 * 86400, t.expiry)
            t = assert(pol:check_generate { algo = "ec", group = "iot", expiry = 0 })
            assert.are.equal(NOW + 5 * 365 * 86400, t.expiry)
            t = assert(pol:check_generate { algo = "ec", group = "other" })
            assert.are.equal(NOW + 90 * 86400, t.expiry)
        end)

        it("the amended expiry is sealed into the blob by the device", function()
            local t0 = os.time() -- the policy's clock stands still at t0
            local p = example("expiry.lua", { clock = function() return t0 end,
                                              params = { max_days = { g = 1 } } })
            hsm:set_policy(p)
            local blob = assert(gen { algo = "ec", name = "e1", group = "g" })
            assert.are.equal(t0 + 86400, softcxi.key_info(blob).expiry)
            assert(hsm:sign(blob, "ecdsa-sha256", "m"))
        end)

        it("refuses an expiry beyond the lifetime, or in the past", function()
            assert(pol:check_generate { algo = "ec", group = "payments", expiry = NOW + 86400 })
            local msg = H.expect_err("EPOLICY", pol:check_generate { algo = "ec", group = "payments",
                expiry = NOW + 366 * 86400 })
            has(msg, "beyond the 365-day lifetime of group 'payments'")
            msg = H.expect_err("EPOLICY",
                pol:check_generate { algo = "ec", group = "payments", expiry = NOW })
            has(msg, "is past")
        end)

        it("a key without expiry may only verify", function()
            hsm:set_policy(nil)
            local blob = H.gen(hsm, { algo = "ec", name = "noexp", group = "g" })
            local sig = assert(hsm:sign(blob, "ecdsa-sha256", "m"))
            hsm:set_policy(pol)
            local msg = H.expect_err("EPOLICY", hsm:sign(blob, "ecdsa-sha256", "m"))
            has(msg, "a key without an expiry may only verify")
            assert.is_true(hsm:verify(blob, "ecdsa-sha256", "m", sig))
        end)
    end)

    describe("example: rsa2048_sunset.lua", function()
        local CUTOFF = 1893456000
        local now
        local pol, rsa
        setup(function()
            pol = example("rsa2048_sunset.lua", { clock = function() return now end })
            now = CUTOFF - 1
            hsm:set_policy(pol)
            rsa = H.gen(hsm, { algo = "rsa", name = "legacy", group = "g",
                               usage = { "sign", "verify", "encrypt", "decrypt" } })
            hsm:set_policy(nil)
        end)
        before_each(function() hsm:set_policy(pol) end)

        it("before the cut-off RSA-2048 is made and used as ever", function()
            now = CUTOFF - 1
            assert(pol:check_generate { algo = "rsa", size = 2048, group = "g" })
            assert(hsm:sign(rsa, "rsa-pss-sha256", "m"))
            assert(hsm:encrypt(rsa, "rsa-oaep-sha256", "m"))
        end)

        it("from the cut-off no RSA-2048 key is generated or imported", function()
            now = CUTOFF
            local msg = H.expect_err("EPOLICY", gen { algo = "rsa", name = "new", group = "g" })
            has(msg, "no RSA-2048 keys since 2030-01-01: use 3072 bits or more")
            H.expect_err("EPOLICY", pol:check_generate { algo = "rsa", size = 2048, group = "g" })
            assert(pol:check_generate { algo = "rsa", size = 3072, group = "g" })
            assert(pol:check_generate { algo = "ec", group = "g" })
            msg = H.expect_err("EPOLICY",
                pol:check_generate({ algo = "rsa", group = "g" }, { op = "key_import" }))
            has(msg, "must state algo (and size for rsa)")
            assert(pol:check_generate({ algo = "rsa", size = 4096, group = "g" }, { op = "key_import" }))
        end)

        it("from the cut-off RSA-2048 keys verify and decrypt but neither sign nor encrypt", function()
            now = CUTOFF - 1
            local sig = assert(hsm:sign(rsa, "rsa-pss-sha256", "m"))
            local ct = assert(hsm:encrypt(rsa, "rsa-oaep-sha256", "m"))
            now = CUTOFF + 86400
            local msg = H.expect_err("EPOLICY", hsm:sign(rsa, "rsa-pss-sha256", "m"))
            has(msg, "RSA-2048 may not sign since 2030-01-01")
            H.expect_err("EPOLICY", hsm:encrypt(rsa, "rsa-oaep-sha256", "m"))
            assert.is_true(hsm:verify(rsa, "rsa-pss-sha256", "m", sig))
            assert.are.equal("m", assert(hsm:decrypt(rsa, "rsa-oaep-sha256", ct)))
        end)
    end)

    local function quota_cases(label, open_store)
        describe("example: quota.lua (" .. label .. ")", function()
            local st, pol, blob, id
            setup(function()
                st = open_store()
                if not st then return end
                pol = example("quota.lua", { store = st, params = { limits = { q = 3 } } })
                blob = H.gen(hsm, { algo = "ec", name = "quota-" .. label, group = "q" })
                id = "q/quota-" .. label
                assert(policy.counter(st):reset("sign:" .. id))
            end)
            teardown(function() if st then st:close() end end)

            it("a key signs up to its group's limit, then EPOLICY; verify does not count", function()
                if not st then pending("no " .. label) return end
                hsm:set_policy(pol)
                local sig = assert(hsm:sign(blob, "ecdsa-sha256", "1"))
                assert(hsm:verify(blob, "ecdsa-sha256", "1", sig))
                assert(hsm:bulk_sign(blob, "ecdsa-sha256", { "2", "3" }))
                local msg = H.expect_err("EPOLICY", hsm:sign(blob, "ecdsa-sha256", "4"))
                has(msg, "signing quota used up: 3 of 3 signatures made, 1 asked")
                assert.is_true(hsm:verify(blob, "ecdsa-sha256", "1", sig))
                assert.are.equal(3, assert(policy.counter(st):get("sign:" .. id)))
            end)

            it("a bulk_sign that would pass the limit takes nothing", function()
                if not st then pending("no " .. label) return end
                local c = assert(policy.counter(st))
                assert(c:reset("sign:" .. id))
                hsm:set_policy(pol)
                assert(hsm:sign(blob, "ecdsa-sha256", "1"))
                H.expect_err("EPOLICY", hsm:bulk_sign(blob, "ecdsa-sha256", { "a", "b", "c" }))
                assert.are.equal(1, c:get("sign:" .. id))
                assert(hsm:bulk_sign(blob, "ecdsa-sha256", { "a", "b" }))
            end)

            it("the count is shared by every policy and session on the store, and reset restores", function()
                if not st then pending("no " .. label) return end
                local c = assert(policy.counter(st))
                assert(c:reset("sign:" .. id))
                local other = H.open(dev)
                other:set_policy(example("quota.lua", { store = function() return st end,
                    params = { limits = { q = 3 } } }))
                hsm:set_policy(pol)
                assert(hsm:sign(blob, "ecdsa-sha256", "1"))
                assert(other:sign(blob, "ecdsa-sha256", "2"))
                assert(hsm:sign(blob, "ecdsa-sha256", "3"))
                H.expect_err("EPOLICY", other:sign(blob, "ecdsa-sha256", "4"))
                assert(c:reset("sign:" .. id))
                assert(other:sign(blob, "ecdsa-sha256", "5"))
                other:close()
            end)
        end)
    end

    quota_cases("file store", function()
        return assert(require("softcxi.store").open("file:" .. tmp .. "/quota"))
    end)
    quota_cases("redis store", function()
        local url = os.getenv("SOFTCXI_TEST_REDIS_URL")
        if not url then return nil end
        return assert(require("softcxi.store").open(url))
    end)

    describe("example: quota.lua without a store", function()
        it("denies every signature and says why", function()
            hsm:set_policy(example("quota.lua"))
            local blob = H.gen(hsm, { algo = "ec", name = "nostore", group = "g" })
            local msg = H.expect_err("EPOLICY", hsm:sign(blob, "ecdsa-sha256", "m"))
            has(msg, "failed in on_use (treated as a denial)")
            has(msg, "policy.counter: no store")
            assert.is_false(hsm:verify(blob, "ecdsa-sha256", "m", "not a signature"))
        end)

        it("policy.counter refuses what is not a counting store", function()
            H.expect_err("EINVAL", policy.counter(nil))
            local msg = H.expect_err("EINVAL", policy.counter({}))
            has(msg, "this store keeps no counters")
        end)
    end)

    describe("policy.counter on a file store", function()
        local st, c
        setup(function()
            st = assert(require("softcxi.store").open("file:" .. tmp .. "/counters"))
            c = assert(policy.counter(st))
        end)
        teardown(function() st:close() end)

        it("takes up to a limit, never past it, and without a limit always", function()
            assert.are.equal(0, c:get("a"))
            assert.are.same({ true, 2 }, { c:take("a", 2, 3) })
            assert.are.same({ false, 2 }, { c:take("a", 2, 3) })
            assert.are.same({ true, 3 }, { c:take("a", 1, 3) })
            assert.are.same({ true, 103 }, { c:take("a", 100) })
            assert.is_true(c:reset("a"))
            assert.are.equal(0, c:get("a"))
        end)

        it("keeps names of any bytes and length apart, in the store's directory", function()
            local long1, long2 = string.rep("x", 300) .. "1", string.rep("x", 300) .. "2"
            for _, name in ipairs { "sign:iot/dev-1", "sign:iot%2Fdev-1", "a b\0", long1, long2 } do
                assert(c:take(name, 1))
            end
            assert(c:take(long1, 1))
            assert.are.equal(2, c:get(long1))
            assert.are.equal(1, c:get(long2))
            assert.are.equal(1, c:get("sign:iot/dev-1"))
            assert.are.equal(1, c:get("sign:iot%2Fdev-1"))
            local rc, out = H.run("ls -R " .. H.q(tmp .. "/counters/policy/counters"))
            assert.are.equal(0, rc, out)
        end)

        it("works through a policy-wrapped store, and the store still counts only blobs", function()
            local w = policy.wrap_store(st, policy.new { on_store = function() return true end })
            local wc = assert(policy.counter(w))
            assert(wc:take("shared", 5))
            assert.are.equal(5, c:get("shared"))
            assert.are.equal(0, assert(st:count()))
        end)
    end)

    describe("example: fleet.lua (all of them combined)", function()
        it("applies every rule, first denial wins, with the store and clock of the load", function()
            local st = assert(require("softcxi.store").open("file:" .. tmp .. "/fleet"))
            local pol = example("fleet.lua", { store = st,
                params = { ["quota.lua"] = { limits = { iot = 1 } } } })
            assert.are.equal("fleet", pol.name)
            hsm:set_policy(pol)
            local blob = assert(gen { algo = "ec", name = "dev-00000100", group = "iot" })
            assert.is_true(softcxi.key_info(blob).expiry > os.time())
            assert(hsm:sign(blob, "ecdsa-sha256", "1"))
            local msg = H.expect_err("EPOLICY", hsm:sign(blob, "ecdsa-sha256", "2"))
            has(msg, "denied by policy 'quota'")
            msg = H.expect_err("EPOLICY", gen { algo = "rsa", name = "dev-00000101", group = "iot" })
            has(msg, "denied by policy 'algorithms'")
            msg = H.expect_err("EPOLICY", gen { algo = "ec", name = "bad", group = "iot" })
            has(msg, "denied by policy 'naming'")
            st:close()
        end)
    end)
end)
