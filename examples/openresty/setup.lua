-- Prepare the key service's device under a prefix (run by `run` before nginx starts):
--
--   luajit setup.lua PREFIX
--
-- First start: a device in PREFIX/device with its key file and the
-- administrator's password in PREFIX/secrets/ (mode 0600), and a tokens file
-- with a random bearer token for group "iot" and one for group "lab".  Every
-- start: the service user "svc" (its password in PREFIX/secrets/svc.password)
-- with exactly the groups the tokens name, so the service may use what its
-- tokens may and no more.  Prints nothing secret.

local softcxi = require "softcxi"

local prefix = assert(arg[1], "usage: setup.lua PREFIX")
local secrets = prefix .. "/secrets"
local device = prefix .. "/device"
local keyfile = secrets .. "/device.key"
local USER = "svc"

local function exists(path)
    local f = io.open(path, "rb")
    if f then f:close() end
    return f ~= nil
end

local function hex(s)
    return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local hsm_rnd -- random bytes come from the device's RAND_bytes once it exists

local function random_hex(n)
    if hsm_rnd then return hex(assert(hsm_rnd:rnd_gen(n))) end
    local f = assert(io.open("/dev/urandom", "rb"))
    local b = f:read(n)
    f:close()
    return hex(b)
end

-- Write a secret file only the owner may read (created 0600 before any byte).
local function write_secret(path, data)
    assert(os.execute("umask 077 && : > '" .. path .. "'"))
    local f = assert(io.open(path, "wb"))
    f:write(data, "\n")
    f:close()
end

local function read_secret(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a"):gsub("%s+$", "")
    f:close()
    return s
end

assert(os.execute("umask 077 && mkdir -p '" .. secrets .. "'"))

if not exists(device .. "/device.mbk") then
    local admin_pw = random_hex(16)
    write_secret(secrets .. "/admin.password", admin_pw)
    assert(softcxi.init { path = device, keyfile = keyfile, admin = "ADMIN", password = admin_pw })
end

local tokens_file = secrets .. "/tokens"
if not exists(tokens_file) then
    write_secret(tokens_file, "# <bearer token> <group>[,<group>...]\n"
        .. random_hex(24) .. " iot\n" .. random_hex(24) .. " lab")
end

-- The groups the tokens name.
local groups, seen = {}, {}
for line in io.lines(tokens_file) do
    local tok, list = line:match("^%s*(%S+)%s+(%S+)")
    if tok and tok:sub(1, 1) ~= "#" then
        for g in list:gmatch("[^,]+") do
            if not seen[g] then seen[g] = true; groups[#groups + 1] = g end
        end
    end
end
table.sort(groups)
local want = table.concat(groups, ",")

local adm = assert(softcxi.open { path = device, keyfile = keyfile })
hsm_rnd = adm
assert(adm:logon_pass("ADMIN", read_secret(secrets .. "/admin.password")))
local have
for _, u in ipairs(assert(adm:user_list())) do
    if u.name == USER then have = u end
end
local pw_file = secrets .. "/svc.password"
if have and (have.groups ~= want or not exists(pw_file)) then
    assert(adm:user_delete(USER)) -- groups cannot be changed in place: add the user again
    have = nil
end
if not have then
    local pw = random_hex(16)
    write_secret(pw_file, pw)
    assert(adm:user_add { name = USER, password = pw, groups = groups })
end
adm:close()
print("device ready: " .. device .. " (user " .. USER .. ", groups " .. want .. ")")
