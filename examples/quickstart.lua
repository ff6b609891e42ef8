-- The main job, end to end: a device, a batch of external IoT device keys
-- kept by the application (here: one file per blob), a signature made with
-- a blob handed back to the device, and that signature checked by the
-- `openssl` command line tool on the exported public key.
--
--   ./run demo [STATE_DIR [KEYSTORE_DIR [COUNT]]]
--
-- The device key that seals STATE_DIR lives outside it, in the user's
-- config directory (~/.config/softcxi/devices/<id>.key).

local softcxi = require "softcxi"

local state_dir = arg[1] or "./demo-hsm"
local store_dir = arg[2] or "./demo-keystore"
local count = tonumber(arg[3] or "") or 5

local function sh(cmd)
    local ok = os.execute(cmd)
    return ok == true or ok == 0
end

local function write(path, data)
    local f = assert(io.open(path, "wb"))
    assert(f:write(data))
    assert(f:close())
end

local function read(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local d = f:read("*a")
    f:close()
    return d
end

local hsm = assert(softcxi.open{ path = state_dir })
local dev = hsm:device_info()
print(("device %s (MBK kcv %s), key file %s"):format(dev.id, dev.kcv, dev.keyfile))

-- Provision: keys are generated on the device and come back as blobs; the
-- application stores them where it likes.  A blob already on disk is kept.
assert(sh("mkdir -p '" .. store_dir .. "/iot'"))
local first
for i = 1, count do
    local name = ("dev-%06d"):format(i)
    local path = ("%s/iot/%s.blob"):format(store_dir, name)
    local blob = read(path)
    if not blob then
        blob = assert(hsm:key_generate(softcxi.FLAG_EXTERNAL, {
            algo = "ec", curve = "P-256", name = name, group = "iot",
            usage = { "sign", "verify" },
        }))
        write(path, blob)
    end
    first = first or { name = name, blob = blob, path = path }
end
local info = softcxi.key_info(first.blob)       -- clear attributes, no MBK needed
print(("%d device keys in %s/iot; %s: %s %s, %d-byte blob starting with '%s', verified=%s")
    :format(count, store_dir, first.name, info.algo, info.curve, #first.blob,
        first.blob:sub(1, 1), tostring(info.verified)))

-- Use: hand the stored blob back for a signature.
local message = "telemetry from " .. first.name .. " at " .. os.date("!%Y-%m-%dT%H:%M:%SZ")
local blob = assert(read(first.path))
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
hsm:close()
print("quickstart: ok")
