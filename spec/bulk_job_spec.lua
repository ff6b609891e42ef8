-- bulk_generate_start: bulk generation on C threads while Lua goes on, collected with job:wait().
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi

local EC = { algo = "ec", curve = "P-256", group = "iot", usage = { "sign", "verify" } }

-- What does not depend on the key itself: the clear attributes bar the generation date
-- and the public key.
local function shape(blob)
    local info = softcxi.key_info(blob)
    info.gen_date, info.public_key = nil, nil
    return info
end

describe("bulk_generate_start", function()
    local dev, hsm

    setup(function()
        dev = H.new_device()
        hsm = dev.hsm
    end)

    teardown(function()
        H.destroy(dev)
    end)

    it("job:wait() returns what bulk_generate returns: the keys in order, named, usable", function()
        local job = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 100,
            { name_format = "dev-%06d", start = 501, threads = 2 }))
        assert.matches("softcxi.bulk_job", tostring(job), 1, true)
        local blobs = assert(job:wait())
        assert.is_true(job:ready())
        local same = assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, EC, 100,
            { name_format = "dev-%06d", start = 501, threads = 2 }))
        assert.are.equal(100, #blobs)
        local seen = {}
        for i, blob in ipairs(blobs) do
            assert.are.equal(#same[i], #blob)
            assert.are.same(shape(same[i]), shape(blob))
            assert.are.equal(("dev-%06d"):format(500 + i), softcxi.key_info(blob).name)
            local pub = softcxi.key_info(blob).public_key
            assert.is_nil(seen[pub], "two keys share a public key")
            seen[pub] = true
            assert.are.equal(softcxi.key_info(same[i]).kcv, softcxi.key_info(blob).kcv)
        end
        local sig = assert(hsm:sign(blobs[100], "ecdsa-sha256", "m"))
        assert.is_true(hsm:verify(blobs[100], "ecdsa-sha256", "m", sig))
        assert.is_true(assert(hsm:key_info(blobs[1])).verified)
    end)

    it("takes explicit names and other algorithms; n = 0 gives an empty table", function()
        local job = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, { algo = "ed25519" }, 3,
            { names = { "a", "b", "c" }, threads = 1 }))
        local blobs = assert(job:wait())
        assert.are.equal("c", softcxi.key_info(blobs[3]).name)
        job = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, { algo = "aes", name = "k" }, 5))
        local aes = assert(job:wait())
        local ct = assert(hsm:encrypt(aes[5], "aes-gcm", "x"))
        assert.are.equal("x", hsm:decrypt(aes[5], "aes-gcm", ct))
        job = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 0))
        assert.is_true(job:ready())
        assert.are.same({}, job:wait())
    end)

    it("checks of the call fail at the start; a bad name fails the whole job at wait", function()
        local msg = H.expect_err("EINVAL",
            hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, { algo = "ec", curve = "P-1" }, 10))
        assert.matches("template.curve", msg, 1, true)
        H.expect_err("EINVAL", hsm:bulk_generate_start(0, { algo = "ec" }, 2))
        -- the session is not left busy by a failed start
        assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", name = "after-fail" }))
        local names = {}
        for i = 1, 10 do names[i] = "n" .. i end
        names[4] = string.rep("x", 300)
        local want = H.expect_err("EINVAL",
            hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 10, { names = names }))
        local job = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 10,
            { names = names }))
        msg = H.expect_err("EINVAL", job:wait())
        assert.matches("key 4", msg, 1, true)
        assert.are.equal(want, msg)
        -- and the session is free again
        assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", name = "after-job" }))
    end)

    it("a logged-off session or a group outside the user's fails at the start", function()
        local other = H.new_device()
        local admin = assert(softcxi.open { path = other.path, keyfile = other.keyfile })
        assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
        assert(admin:user_add { name = "narrow", password = "narrow-password", groups = { "a" },
            kdf_cost = H.KDF_COST })
        admin:close()
        local h = H.open(other, { user = "narrow", password = "narrow-password" })
        H.expect_err("EACCESS", h:bulk_generate_start(softcxi.FLAG_EXTERNAL,
            { algo = "ec", group = "b" }, 2))
        h:logoff()
        H.expect_err("EAUTH", h:bulk_generate_start(softcxi.FLAG_EXTERNAL,
            { algo = "ec", group = "a" }, 2))
        h:close()
        H.destroy(other)
    end)

    it("waiting twice raises; so does waiting after cancel", function()
        local job = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 4))
        assert(job:wait())
        assert.has_error(function() job:wait() end, "softcxi: bulk_generate job: waited for already")
        assert.is_true(job:ready())
        job:cancel() -- a no-op once over
        job = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 500))
        job:cancel()
        assert.has_error(function() job:wait() end, "softcxi: bulk_generate job: cancelled already")
        assert.is_true(job:ready())
        assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", name = "after-cancel" }))
    end)

    it("every other call on the session raises while the job runs, and works after wait", function()
        local blob = H.gen(hsm, { algo = "ec", name = "busy-test" })
        local job = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 200))
        local calls = {
            function() return hsm:sign(blob, "ecdsa-sha256", "m") end,
            function() return hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec" }) end,
            function() return hsm:bulk_generate(softcxi.FLAG_EXTERNAL, EC, 2) end,
            function() return hsm:key_info(blob) end,
            function() return hsm:device_info() end,
            function() return hsm:logoff() end,
            function() return hsm:logon_pass(H.USER, H.USER_PASSWORD) end,
            function() return hsm:key_rewrap(blob) end,
            function() return hsm:decrypt(blob, "aes-gcm", "short") end,
        }
        for i, f in ipairs(calls) do
            local ok, err = pcall(f)
            assert.is_false(ok, "call " .. i .. " went through on a busy session")
            assert.matches("session is busy", tostring(err), 1, true)
        end
        local blobs = assert(job:wait())
        assert.are.equal(200, #blobs)
        assert(hsm:sign(blob, "ecdsa-sha256", "m"))
        assert(hsm:sign(blobs[200], "ecdsa-sha256", "m"))
    end)

    it("up to four jobs run at once on a session, each delivering its own keys", function()
        local blob = H.gen(hsm, { algo = "ec", name = "jobs-test" })
        local jobs = {}
        for k = 1, 4 do
            jobs[k] = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 50,
                { name_format = "job" .. k .. "-%d" }))
        end
        -- a fifth raises, naming the limit; nothing else runs meanwhile
        assert.has_error(function() hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 2) end,
            "softcxi: the session is busy: 4 bulk_generate_start jobs run on it "
            .. "(job:wait() or job:cancel() one first)")
        -- collected in any order; one cancelled; the session is busy until the last is over
        jobs[2]:cancel()
        local b3 = assert(jobs[3]:wait())
        local b1 = assert(jobs[1]:wait())
        local ok, err = pcall(hsm.sign, hsm, blob, "ecdsa-sha256", "m")
        assert.is_false(ok)
        assert.matches("session is busy", tostring(err), 1, true)
        -- a slot is free again: a new job starts beside the one still running
        local j5 = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 10, { name_format = "job5-%d" }))
        local b4 = assert(jobs[4]:wait())
        local b5 = assert(j5:wait())
        assert.are.equal(50, #b1)
        assert.are.equal(50, #b3)
        assert.are.equal(50, #b4)
        assert.are.equal(10, #b5)
        assert.are.equal("job1-50", softcxi.key_info(b1[50]).name)
        assert.are.equal("job3-1", softcxi.key_info(b3[1]).name)
        assert.are.equal("job4-50", softcxi.key_info(b4[50]).name)
        assert.are.equal("job5-10", softcxi.key_info(b5[10]).name)
        assert.are_not.equal(softcxi.key_info(b1[1]).public_key, softcxi.key_info(b3[1]).public_key)
        assert(hsm:sign(blob, "ecdsa-sha256", "m"))
        assert(hsm:sign(b3[50], "ecdsa-sha256", "m"))

        -- a session closed with two jobs running: both still deliver
        local h = H.open(dev)
        local ja = assert(h:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 200, { name_format = "a-%d" }))
        local jb = assert(h:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 200, { name_format = "b-%d" }))
        h:close()
        assert.are.equal("b-200", softcxi.key_info(assert(jb:wait())[200]).name)
        assert.are.equal("a-200", softcxi.key_info(assert(ja:wait())[200]).name)
    end)

    it("a running job that Lua drops is stopped and joined by the collector", function()
        for _ = 1, 3 do
            local job = assert(hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 2000,
                { name_format = "gc-%d" }))
            assert.is_not_nil(job)
            job = nil -- luacheck: ignore
            collectgarbage()
            collectgarbage()
        end
        -- the session is free once the job is gone
        assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", name = "after-gc" }))
    end)

    it("a session closed (or collected) during a job: the job still delivers", function()
        local h = H.open(dev)
        local job = assert(h:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 300,
            { name_format = "closed-%d" }))
        h:close()
        assert.has_error(function() h:sign("x", "ecdsa-sha256", "m") end,
            "softcxi: the session is closed")
        local blobs = assert(job:wait())
        assert.are.equal(300, #blobs)
        assert.are.equal("closed-300", softcxi.key_info(blobs[300]).name)
        assert(hsm:sign(blobs[300], "ecdsa-sha256", "m"))

        h = H.open(dev)
        job = assert(h:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 300))
        h = nil -- luacheck: ignore
        collectgarbage()
        collectgarbage()
        assert.are.equal(300, #assert(job:wait()))

        -- a session with two jobs running, collected first: both still deliver
        h = H.open(dev)
        local j1 = assert(h:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 200, { name_format = "c1-%d" }))
        local j2 = assert(h:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 200, { name_format = "c2-%d" }))
        h = nil -- luacheck: ignore
        collectgarbage()
        collectgarbage()
        assert.are.equal("c2-200", softcxi.key_info(assert(j2:wait())[200]).name)
        assert.are.equal("c1-1", softcxi.key_info(assert(j1:wait())[1]).name)

        -- both dropped together, the job running
        do
            local h2 = H.open(dev)
            assert(h2:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 2000))
        end
        collectgarbage()
        collectgarbage()
    end)

    it("a policy's on_generate sees the start form", function()
        local seen
        local pol = require("softcxi.policy").new {
            on_generate = function(_, ctx)
                seen = ctx
                if ctx.count > 50 then return false, "too many" end
                return true
            end,
        }
        local h = H.open(dev)
        h:set_policy(pol)
        H.expect_err("EPOLICY", h:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 51))
        assert.are.equal("bulk_generate_start", seen.op)
        local job = assert(h:bulk_generate_start(softcxi.FLAG_EXTERNAL, EC, 3,
            { name_format = "p-%d" }))
        assert.are.same({ "p-1", "p-2", "p-3" }, seen.names)
        assert.are.equal(3, #assert(job:wait()))
        h:close()
    end)

    it("misuse raises", function()
        assert.has_error(function()
            hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 2, { bogus = 1 })
        end)
        assert.has_error(function()
            hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 2,
                { names = { "a", "b" }, name_format = "x%d" })
        end)
        assert.has_error(function()
            hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 2, { threads = 99 })
        end)
        assert.has_error(function()
            hsm:bulk_generate_start(softcxi.FLAG_EXTERNAL, { algo = "ec" }, 2, { names = { "a", 7 } })
        end)
        -- nothing was left running: the session works
        assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", name = "after-misuse" }))
    end)
end)
