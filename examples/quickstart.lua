-- The main job, end to end: a device, a batch of external IoT device keys
-- provisioned into the embedded file key store, a signature made with a
-- blob handed back to the device, and that signature checked by the
-- `openssl` command line tool on the exported public key.
--
--   ./run demo [STATE_DIR [KEYSTORE_DIR [COUNT]]]
--
-- The device key that seals STATE_DIR lives outside it, in the user's
-- config directory (~/.config/softcxi/devices/<id>.key).

local softcxi = require "softcxi"
local keystore = require "softcxi.store"
local provision = require "softcxi.provision"

local state_dir = arg[1] or "./demo-hsm"
local store_dir = arg[2] or "./demo-keystore"
local count = tonumber(arg[3] or "") or 1000

local function sh(cmd)
    local ok = os.execute(cmd)
    return ok == true or ok == 0
end

local function write(path, data)
    local f = assert(io.open(path, "wb"))
    assert(f:write(data))
    assert(f:close())
end

-- Demo credentials; a real deployment sets its own (SOFTCXI_ADMIN_PASSWORD,
-- SOFTCXI_PASSWORD) and keeps them out of scripts.
local admin_pw = os.getenv("SOFTCXI_ADMIN_PASSWORD") or "demo-admin-password"
local user_pw = os.getenv("SOFTCXI_PASSWORD") or "demo-iot-password"

-- Once, by an administrator: create the device and a user for the IoT keys.
local hsm, err, code = softcxi.open{ path = state_dir }
if not hsm and code == "ENOTFOUND" then
    assert(softcxi.init{ path = state_dir, admin = "ADMIN", password = admin_pw })
    hsm = assert(softcxi.open{ path = state_dir })
    assert(hsm:logon_pass("ADMIN", admin_pw))
    assert(hsm:user_add{ name = "provisioner", password = user_pw, groups = { "iot" } })
    hsm:logoff()
    print("created the device in " .. state_dir .. " with users ADMIN and provisioner")
elseif not hsm then
    error(err)
end
-- Every run: the application logs on; it may use keys of group "iot" only.
assert(hsm:logon_pass("provisioner", user_pw))
local dev = hsm:device_info()
print(("device %s (MBK kcv %s), key file %s"):format(dev.id, dev.kcv, dev.keyfile))

-- Provision: keys are generated on the device (on worker threads) and come
-- back as blobs; the application keeps them in its key store.  Keys already
-- stored are kept, so running again completes an interrupted job.
local store = assert(keystore.open("file:" .. store_dir))
local report = assert(provision.run {
    hsm = hsm, store = store, count = count, name_format = "dev-%06d",
    template = { algo = "ec", curve = "P-256", group = "iot", usage = { "sign", "verify" } },
})
print(("%d device keys in %s: %d generated now, %d already there")
    :format(store:count(), store_dir, report.generated, report.skipped))

local first = { name = "dev-000001", id = "iot/dev-000001" }
local stored = assert(store:get(first.id))
local info = softcxi.key_info(stored)           -- clear attributes, no MBK needed
print(("%s: %s %s, %d-byte blob starting with '%s', verified=%s")
    :format(first.id, info.algo, info.curve, #stored, stored:sub(1, 1), tostring(info.verified)))

-- Use: hand the stored blob back for a signature.
local message = "telemetry from " .. first.name .. " at " .. os.date("!%Y-%m-%dT%H:%M:%SZ")
local blob = assert(store:get(first.id))
local sig = assert(hsm:sign(blob, "ecdsa-sha256", message))
assert(hsm:verify(blob, "ecdsa-sha256", message, sig) == true)
local pem = assert(hsm:public_key(blob, "pem"))  -- the device checks the blob's tag first
print(("signed %d bytes: %d-byte DER ECDSA signature"):format(#message, #sig))

-- Check it the way a relying party would: with openssl, on the public key.
local tmp = os.tmpname()
write(tmp .. ".pem", pem)
write(tmp .. ".msg", message)
write(tmp .. ".sig", sig)
local ok = sh(("openssl dgst -sha256 -verify %s.pem -signature %s.sig %s.msg"):format(tmp, tmp, tmp))
os.remove(tmp); os.remove(tmp .. ".pem"); os.remove(tmp .. ".msg"); os.remove(tmp .. ".sig")
if not ok then
    io.stderr:write("openssl could not verify the signature\n")
    os.exit(1)
end
store:close()
hsm:close()
print("quickstart: ok")
