-- The examples run as a user would run them: examples/quickstart.lua (the Lua
-- API) and the ops scripts of examples/ops/ (the softcxi command), in the
-- order an operator would: provision, rotate, move the store to Redis, move
-- the device to a second machine.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")

local root = (debug.getinfo(1, "S").source:match("^@(.-)spec/[^/]*$") or "./")
if root == "" then root = "./" end
root = select(2, H.run("cd " .. H.q(root) .. " && pwd")):match("^%s*(.-)%s*$") .. "/"
local LUA = H.interpreter()

describe("examples", function()
    local dir, env

    setup(function()
        dir = H.tmpdir()
        H.writefile(dir .. "/admin.pw", "ops-admin-password\n")
        H.writefile(dir .. "/user.pw", "ops-user-password\n")
        H.writefile(dir .. "/shares.pw", "share-password-1\nshare-password-2\nshare-password-3\n")
        env = "env -u SOFTCXI_PASSWORD SOFTCXI_LUA=" .. H.q(LUA)
            .. " SOFTCXI_DEVICE=" .. H.q(dir .. "/hsm") .. " SOFTCXI_DEVICE_KEY=" .. H.q(dir .. "/hsm.key")
            .. " ADMIN_PW_FILE=" .. H.q(dir .. "/admin.pw") .. " USER_PW_FILE=" .. H.q(dir .. "/user.pw")
            .. " "
    end)
    teardown(function() H.rm_rf(dir) end)

    local function script(name, args)
        local rc, out = H.run(env .. H.q(root .. "examples/ops/" .. name) .. " " .. args)
        assert(rc == 0, name .. " failed (rc " .. tostring(rc) .. "):\n" .. out)
        return out
    end

    it("quickstart.lua: the Lua API end to end, checked by openssl", function()
        local qs = dir .. "/qs"
        local rc, out = H.run("cd " .. H.q(dir) .. " && HOME=" .. H.q(qs .. "-home") .. " " .. LUA .. " "
            .. H.q(root .. "examples/quickstart.lua") .. " " .. H.q(qs .. "-hsm") .. " "
            .. H.q(qs .. "-keystore") .. " 50")
        assert(rc == 0, out)
        assert.matches("quickstart: ok", out)
    end)

    it("ops/provision.sh creates the device on first use, and resumes", function()
        local store = "file:" .. dir .. "/keystore"
        local out = script("provision.sh", H.q(store) .. " 120 iot")
        assert.matches("provisioned 120 keys", out)
        assert.matches("keys%s+120", out)
        out = script("provision.sh", H.q(store) .. " 150 iot")
        assert.matches("30 generated and stored", out)
        assert.matches("120 already there", out)
    end)

    it("ops/rotate-mbk.sh moves every blob to a new MBK and retires the old one", function()
        local out = script("rotate-mbk.sh", H.q(dir .. "/shares") .. " " .. H.q(dir .. "/shares.pw")
            .. " " .. H.q("file:" .. dir .. "/keystore"))
        assert.matches("rewrapped 150 of 150 blobs", out)
        assert.matches("retired MBK", out)
        assert.is_string(out:match("\ncurrent +(" .. ("%x"):rep(16) .. ")\n"))
        assert.is_nil(out:match("\nolder +" .. ("%x"):rep(16)))
    end)

    it("ops/keystore-file-to-redis.sh copies the store and signs from the copy", function()
        local url = os.getenv("SOFTCXI_TEST_REDIS_URL")
        local to
        if url then
            to = url:gsub("prefix=[^&]*", "prefix=ops-example-" .. os.time() .. ":")
        else
            to = "file:" .. dir .. "/keystore-copy" -- no Redis here: the same script, file to file
        end
        local out = script("keystore-file-to-redis.sh", H.q("file:" .. dir .. "/keystore") .. " "
            .. H.q(to) .. " iot/dev-00000042")
        assert.matches("moved 150 keys", out)
    end)

    it("ops/device-to-second-machine.sh restores the internal keys on a second device", function()
        local bin = LUA .. " " .. H.q(root .. "bin/softcxi")
        local rc, out = H.run(env .. bin .. " --user provisioner --password-file " .. H.q(dir .. "/user.pw")
            .. " key generate --algo ec --group iot --name gateway-root")
        assert(rc == 0, out)
        local shares = {}
        local _, ls = H.run("ls " .. H.q(dir .. "/shares") .. "/mbk-*-1.key " .. H.q(dir .. "/shares")
            .. "/mbk-*-3.key")
        for f in ls:gmatch("[^\n]+") do shares[#shares + 1] = H.q(f) end
        assert.are.equal(2, #shares)
        H.writefile(dir .. "/two.pw", "share-password-1\nshare-password-3\n")
        out = script("device-to-second-machine.sh", H.q(dir .. "/hsm2") .. " " .. H.q(dir .. "/two.pw")
            .. " " .. table.concat(shares, " "))
        assert.matches("restored 1 keys", out)
        assert.matches("iot%s+gateway%-root", out)
    end)
end)
