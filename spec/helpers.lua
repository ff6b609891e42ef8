-- Shared helpers for the softcxi busted specs.
--
-- Valid under Lua 5.4 and LuaJIT: no integer division, no bitwise
-- operators, no <close>.  Load it from a spec with
--
--   local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
--
-- The specs never touch ~/.config: every device gets an explicit key file
-- in a sibling directory of its state directory, both under one temp root.

local softcxi = require "softcxi"

local H = {}

H.softcxi = softcxi

-- ---- shell -------------------------------------------------------------

--- Quote s for /bin/sh.
function H.q(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- Run a shell command; returns exit code (number) and combined output.
-- Portable across Lua 5.4 and LuaJIT (whose os.execute results differ).
function H.run(cmd)
    local p = assert(io.popen("( " .. cmd .. " ) 2>&1; echo \"__rc=$?\""))
    local out = p:read("*a")
    p:close()
    local body, rc = out:match("^(.-)__rc=(%d+)%s*$")
    if not body then return -1, out end
    return tonumber(rc), body
end

function H.rm_rf(path)
    if path and path ~= "" and path ~= "/" then
        os.execute("rm -rf " .. H.q(path))
    end
end

function H.mkdir_p(path)
    os.execute("mkdir -p " .. H.q(path))
end

--- A fresh empty directory under the system temp dir.
function H.tmpdir()
    local name = os.tmpname()
    os.remove(name)
    H.mkdir_p(name)
    return name
end

function H.writefile(path, data)
    local f = assert(io.open(path, "wb"))
    f:write(data)
    f:close()
end

function H.readfile(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local d = f:read("*a")
    f:close()
    return d
end

function H.exists(path)
    local f = io.open(path, "rb")
    if f then f:close() return true end
    return false
end

--- The interpreter running this process (lua5.4 / luajit binary path).
function H.interpreter()
    local rc, out = H.run("readlink /proc/$PPID/exe")
    local exe = rc == 0 and out:match("^%s*(.-)%s*$") or ""
    if exe ~= "" and exe:find("lua") then return exe end
    return type(jit) == "table" and "luajit" or "lua5.4"
end

-- ---- bytes -------------------------------------------------------------

function H.hex(s)
    return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

function H.unhex(h)
    return (h:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

--- s with bit `bit` (0..7) of byte `pos` (1-based) flipped; no bitwise ops.
function H.bitflip(s, pos, bit)
    local b = s:byte(pos)
    local p = 2 ^ bit
    local set = math.floor(b / p) % 2 == 1
    local nb = set and (b - p) or (b + p)
    return s:sub(1, pos - 1) .. string.char(nb) .. s:sub(pos + 1)
end

--- Decode base64 or base64url (padding optional, whitespace ignored).
-- Arithmetic only, no bitwise operators.  Returns nil on a bad character.
function H.b64decode(s)
    local alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    local val = {}
    for i = 1, #alpha do val[alpha:sub(i, i)] = i - 1 end
    val["+"], val["/"], val["-"], val["_"] = 62, 63, 62, 63
    s = s:gsub("%s", ""):gsub("=+$", "")
    local out, acc, nbits = {}, 0, 0
    for i = 1, #s do
        local v = val[s:sub(i, i)]
        if not v then return nil end
        acc = acc * 64 + v
        nbits = nbits + 6
        if nbits >= 8 then
            nbits = nbits - 8
            local p = 2 ^ nbits
            local byte = math.floor(acc / p)
            out[#out + 1] = string.char(byte)
            acc = acc - byte * p
        end
    end
    return table.concat(out)
end

--- s with byte `pos` (1-based) replaced by (byte + delta) mod 256.
function H.bytebump(s, pos, delta)
    local b = (s:byte(pos) + (delta or 1)) % 256
    return s:sub(1, pos - 1) .. string.char(b) .. s:sub(pos + 1)
end

-- ---- devices -----------------------------------------------------------

-- Credentials of every test device: an administrator and an application
-- user whose groups cover every group ("*").  kdf_cost 10 keeps logons fast.
H.ADMIN, H.ADMIN_PASSWORD = "ADMIN", "admin-password"
H.USER, H.USER_PASSWORD = "app", "app-password"
H.KDF_COST = 10

--- Open a session on dev and log the application user on (opts.cache).
function H.open(dev, opts)
    opts = opts or {}
    local hsm, msg, code = softcxi.open { path = dev.path, keyfile = dev.keyfile, cache = opts.cache }
    assert(hsm, "softcxi.open failed: " .. tostring(msg) .. " " .. tostring(code))
    assert(hsm:logon_pass(opts.user or H.USER, opts.password or H.USER_PASSWORD))
    return hsm
end

--- A fresh device: { root, path, keyfile, hsm }, created with softcxi.init,
-- with the application user added and logged on in dev.hsm.  The key file
-- lives in a sibling directory of the state directory, never in ~/.config.
-- opts.cache is passed through; opts.open = false makes no session;
-- opts.root puts the device in a fresh directory under that one.
function H.new_device(opts)
    opts = opts or {}
    local root
    if opts.root then
        local rc, out = H.run("mktemp -d " .. H.q(opts.root .. "/softcxi-spec.XXXXXX"))
        assert(rc == 0, out)
        root = out:match("^%s*(.-)%s*$")
    else
        root = H.tmpdir()
    end
    local dev = {
        root = root,
        path = root .. "/state",
        keyfile = root .. "/keys/device.key",
    }
    assert(softcxi.init { path = dev.path, keyfile = dev.keyfile, admin = H.ADMIN,
        password = H.ADMIN_PASSWORD, kdf_cost = H.KDF_COST })
    local admin = assert(softcxi.open { path = dev.path, keyfile = dev.keyfile })
    assert(admin:logon_pass(H.ADMIN, H.ADMIN_PASSWORD))
    assert(admin:user_add { name = H.USER, password = H.USER_PASSWORD, groups = { "*" },
        kdf_cost = H.KDF_COST })
    admin:close()
    if opts.open ~= false then dev.hsm = H.open(dev, opts) end
    return dev
end

local CHILD_SIGN = [[
local softcxi = require "softcxi"
local h = assert(softcxi.open { path = arg[1], keyfile = arg[2] })
assert(h:logon_pass(arg[3], arg[4]))
local f = assert(io.open(arg[5], "rb")); local blob = f:read("*a"); f:close()
local _, _, code = h:sign(blob, "ecdsa-sha256", "m")
io.write(tostring(code))
]]

--- In a new process of the same interpreter: open dev, log the application
-- user on, sign with blob.  Returns the error code it got ("nil" on success)
-- after asserting the child itself ran cleanly.
function H.child_sign_code(dev, blob)
    local bf, script = dev.root .. "/child.blob", dev.root .. "/child.lua"
    H.writefile(bf, blob)
    H.writefile(script, CHILD_SIGN)
    local env = "LUA_PATH=" .. H.q(os.getenv("LUA_PATH") or package.path) .. " LUA_CPATH="
        .. H.q(os.getenv("LUA_CPATH") or package.cpath) .. " "
    local rc, out = H.run(env .. H.q(H.interpreter()) .. " " .. H.q(script) .. " "
        .. H.q(dev.path) .. " " .. H.q(dev.keyfile) .. " " .. H.q(H.USER) .. " "
        .. H.q(H.USER_PASSWORD) .. " " .. H.q(bf))
    assert(rc == 0, out)
    return out
end

--- Close the device's session (if any) and remove its files.
function H.destroy(dev)
    if not dev then return end
    if dev.hsm then pcall(dev.hsm.close, dev.hsm) end
    H.rm_rf(dev.root)
end

--- Generate a key on hsm, asserting success.
function H.gen(hsm, template)
    local blob, msg, code = hsm:key_generate(softcxi.FLAG_EXTERNAL, template)
    assert(blob, "key_generate failed: " .. tostring(msg) .. " " .. tostring(code))
    return blob
end

--- Pack (nil/value, msg, code) results into a table with n.
function H.pack(...)
    return { n = select("#", ...), ... }
end

--- Assert that a call returned nil, message, want_code; returns the message.
function H.expect_err(want_code, ...)
    local check = require "luassert" -- helpers load outside busted's spec environment
    local r = H.pack(...)
    check.is_true(r[1] == nil, "expected " .. want_code .. ", got a result of type " .. type(r[1]))
    check.is_string(r[2])
    check.are.equal(want_code, r[3], "message: " .. tostring(r[2]))
    return r[2]
end

return H
