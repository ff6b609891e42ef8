-- softcxi: a software HSM for unmanaged (external) keys.
--
-- The facade over softcxi.core (C).  It adds what is convenience rather
-- than cryptography: option tables, the packed AES-GCM form, CXI-style names.
-- Runtime failures return nil, message, code; misuse raises.
--
--   local softcxi = require "softcxi"
--   local hsm = assert(softcxi.open{ path = "./hsm" })
--   local blob = assert(hsm:key_generate(softcxi.FLAG_EXTERNAL,
--       { algo = "ec", curve = "P-256", name = "dev-1", group = "iot" }))
--   local sig = assert(hsm:sign(blob, "ecdsa-sha256", "hello"))

local core = require "softcxi.core"

local type, error, pairs, tostring = type, error, pairs, tostring
local string_sub = string.sub

local _M = {
    _VERSION = core._VERSION,
    FLAG_OVERWRITE = core.FLAG_OVERWRITE, -- CXI_FLAG_KEY_OVERWRITE
    FLAG_EXTERNAL = core.FLAG_EXTERNAL,   -- CXI_FLAG_KEY_EXTERNAL
    RESTORE_MERGE = core.RESTORE_MERGE,   -- restore_database: add to the keys there
}

local GCM_IV, GCM_TAG = 12, 16

local methods = core.methods

local function opt_table(opts, fn)
    if opts == nil then return {} end
    if type(opts) ~= "table" then
        error(fn .. ": options must be a table", 3)
    end
    return opts
end

local function check_fields(opts, allowed, fn)
    for k in pairs(opts) do
        if not allowed[k] then
            error(fn .. ": unknown option '" .. tostring(k) .. "'", 3)
        end
    end
end

--- Create a device in opts.path: a new MBK sealed under a new device key
-- (opts.keyfile, outside path; default in the user's config directory),
-- and its first administrator (opts.admin, default "ADMIN", level 2) with
-- opts.password.  opts.kdf_cost: log2 of scrypt's N for password hashes
-- (default 15; tests use less).  Returns true or nil, err, code.
function _M.init(opts)
    if type(opts) ~= "table" or type(opts.path) ~= "string" or type(opts.password) ~= "string" then
        error("softcxi.init: expects { path = DIR, password = ... [, admin =] [, keyfile =] }", 2)
    end
    check_fields(opts, { path = true, keyfile = true, admin = true, password = true,
        kdf_cost = true }, "softcxi.init")
    return core.init(opts.path, opts.keyfile, opts.admin or "ADMIN", opts.password, opts.kdf_cost)
end

--- Open the device whose state lives in opts.path (ENOTFOUND when there is
-- none: softcxi.init creates one).  opts.keyfile: the device key file, if
-- not in the default place.  opts.cache: size of the opened-key cache (0 =
-- off).  Key calls need a logon (hsm:logon_pass).
function _M.open(opts)
    if type(opts) ~= "table" or type(opts.path) ~= "string" then
        error("softcxi.open: expects { path = DIR [, keyfile = FILE] [, cache = N] }", 2)
    end
    check_fields(opts, { path = true, keyfile = true, cache = true, keydb_limit = true },
        "softcxi.open")
    return core.open(opts.path, opts.keyfile, opts.cache, opts.keydb_limit)
end

--- A blob's attributes read without the MBK: info.verified is false.
_M.key_info = core.key_info

--- A blob's public key (fmt "pem" by default, "der", "jwk", "raw") read
-- without the MBK: unverified, for display and indexing only.
_M.public_key = core.public_key

--- Digest of data: mech "sha256", "sha384", "sha512", "sha3-256", ...
_M.hash_compute = core.hash_compute

-- ---- session methods -----------------------------------------------------

local c_sign, c_verify, c_bulk_sign = methods.sign, methods.verify, methods.bulk_sign
local c_encrypt, c_decrypt, c_agree = methods.encrypt, methods.decrypt, methods.secret_agree
local c_check = methods._check

local c_bulk_generate = methods.bulk_generate
local c_bulk_generate_start = methods.bulk_generate_start
local string_format = string.format

local BULK_GEN_OPTS = { name_format = true, start = true, names = true, threads = true }

local function bulk_names(opts, n, fn)
    opts = opt_table(opts, fn)
    check_fields(opts, BULK_GEN_OPTS, fn)
    local names = opts.names
    if opts.name_format then
        if names then error(fn .. ": give names or name_format, not both", 3) end
        local first = (opts.start or 1) - 1
        names = {}
        for i = 1, n do names[i] = string_format(opts.name_format, first + i) end
    end
    return names, opts.threads
end

--- bulk_generate(flags, template, n [, opts]) -> { blob1, ..., blobn }
-- n keys of one template, generated and sealed on C worker threads (one per
-- core unless opts.threads says).  Key i is named opts.names[i], or
-- string.format(opts.name_format, opts.start + i - 1) (start defaults to 1),
-- or template.name.
function methods:bulk_generate(flags, template, n, opts)
    local names, threads = bulk_names(opts, n, "bulk_generate")
    return c_bulk_generate(self, flags, template, n, names, threads)
end

--- bulk_generate_start(flags, template, n [, opts]) -> job
-- The same keys, generated on C threads while Lua goes on: job:wait()
-- returns what bulk_generate would have (the blobs, or nil, msg, code),
-- job:ready() says whether wait would block, job:cancel() stops it.  Until
-- then every other call on this session raises (close excepted).  Checks of
-- the arguments, flags and logon fail here, as nil, msg, code.
function methods:bulk_generate_start(flags, template, n, opts)
    local names, threads = bulk_names(opts, n, "bulk_generate_start")
    return c_bulk_generate_start(self, flags, template, n, names, threads)
end

local c_key_import = methods.key_import

local WRAPPED = { ["aes-kwp"] = true, ["rsa-aes-kwp"] = true }

--- key_import(flags, template, data [, format [, unwrap_key]]) -> blob
-- format "pkcs8" (a private key, DER or PEM), "spki" (a public key: the
-- blob may only verify, encrypt or wrap), "jwk" (a public JSON Web Key,
-- likewise), "raw" (secret bytes; template.algo says what they are), or a
-- wrapped key: "aes-kwp" / "rsa-aes-kwp", unwrapped inside the device by
-- unwrap_key (a blob or handle with the unwrap usage).  PEM and JWK input
-- needs no format: its first bytes tell.
function methods:key_import(flags, template, data, format, unwrap_key)
    if format == nil and type(data) == "string" then
        if data:find("^%-%-%-%-%-BEGIN PUBLIC KEY") then
            format = "spki"
        elseif data:find("^%-%-%-%-%-BEGIN [%u ]*PRIVATE KEY") then
            format = "pkcs8"
        elseif data:find("^%s*{") then
            format = "jwk"
        else
            error("key_import: give the format ('pkcs8', 'spki', 'jwk', 'raw', 'aes-kwp' or "
                .. "'rsa-aes-kwp') for this data", 2)
        end
    end
    if WRAPPED[format] then
        if type(unwrap_key) ~= "string" then
            error("key_import: a wrapped key needs the unwrapping key (a blob or handle)", 2)
        end
        return c_key_import(self, flags, template, data, format, unwrap_key)
    end
    if unwrap_key ~= nil then
        error("key_import: an unwrapping key goes with format 'aes-kwp' or 'rsa-aes-kwp'", 2)
    end
    return c_key_import(self, flags, template, data, format)
end

local c_key_export = methods.key_export

--- key_export(blob, wrapping [, mech]) -> the key, wrapped or plain
-- wrapping is a wrapping key (a blob or handle of an AES or RSA key with
-- the wrap usage): the key comes back wrapped, aes-kwp under an AES key,
-- rsa-aes-kwp under an RSA key (mech may say which, to be sure); the key's
-- export policy must be allow or allow-plain.  wrapping = "plain" returns
-- the key itself (PKCS#8 DER, or the bytes of an AES/HMAC key) and needs
-- allow-plain: one of the few calls that put key material in a Lua string.
function methods:key_export(blob, wrapping, mech)
    if wrapping == "plain" then
        if mech ~= nil then error("key_export: a plain export takes no mechanism", 2) end
        return c_key_export(self, blob)
    end
    if type(wrapping) ~= "string" then
        error("key_export: wrapping must be a wrapping key (blob or handle) or \"plain\"", 2)
    end
    return c_key_export(self, blob, wrapping, mech)
end

local c_user_add, c_user_set = methods.user_add, methods.user_set
local USER_OPTS = { name = true, password = true, pubkey = true, role = true, level = true,
    groups = true, kdf_cost = true }
local USER_SET_OPTS = { name = true, password = true, pubkey = true, level = true,
    groups = true, unlock = true, kdf_cost = true }

local function group_list(groups)
    if type(groups) == "table" then return table.concat(groups, ",") end
    return groups
end

--- user_add{ name =, password = | pubkey = PEM, role = "user" | "admin", level = 1,
-- groups = { "iot", "fleet-*" } } -> true.  Needs administrators of level 2.
-- pubkey (an EC P-256 or Ed25519 public key, PEM or SPKI DER) lets the user
-- log on with logon_sign; a user has a password, a pubkey or both.
function methods:user_add(u)
    if type(u) ~= "table" then error("user_add: expects a table", 2) end
    check_fields(u, USER_OPTS, "user_add")
    return c_user_add(self, u.name, u.password, u.role, u.level, group_list(u.groups),
        u.kdf_cost, u.pubkey)
end

--- user_set{ name = [, password =] [, pubkey =] [, groups =] [, level =]
-- [, unlock = true] } -> true.  Administrators change anything of anyone; a
-- logged-on user may change his own password or pubkey.
function methods:user_set(u)
    if type(u) ~= "table" then error("user_set: expects a table", 2) end
    check_fields(u, USER_SET_OPTS, "user_set")
    return c_user_set(self, u.name, u.password, u.pubkey, group_list(u.groups), u.level,
        u.unlock and true or false, u.kdf_cost)
end

local c_logon_sign = methods.logon_sign

-- Key data or the name of a file holding it: PEM starts with "-----BEGIN",
-- DER with a SEQUENCE (0x30) and holds bytes no file name has.
local function key_data(key, fn)
    if type(key) ~= "string" then error(fn .. ": key must be PEM/DER data or a file name", 3) end
    if key:find("^%-%-%-%-%-BEGIN ") or (key:byte(1) == 0x30 and key:find("%z")) then
        return key
    end
    local f, err = io.open(key, "rb")
    if not f then
        return nil, fn .. ": cannot read key file '" .. key .. "': " .. tostring(err), "ENOTFOUND"
    end
    local data = f:read("*a")
    f:close()
    return data
end

--- logon_sign(name, key) -> true: log on by key.  key is the user's private
-- key (EC P-256 or Ed25519, PEM or DER, unencrypted) or the name of a file
-- holding it.  The device hands out a fresh challenge, the key signs it in
-- C, the device checks it against the user's stored public key.
function methods:logon_sign(name, key)
    local data, msg, code = key_data(key, "logon_sign")
    if not data then
        c_check(self)
        return nil, msg, code
    end
    return c_logon_sign(self, name, data)
end

--- softcxi.logon_answer(message, key) -> signature: the user's side of
-- logon_challenge / logon_response, when the device is elsewhere.
function _M.logon_answer(message, key)
    local data, msg, code = key_data(key, "logon_answer")
    if not data then return nil, msg, code end
    return core.logon_answer(message, data)
end

local c_mbk_generate, c_mbk_import = methods.mbk_generate, methods.mbk_import
local MBK_GEN_OPTS = { m = true, n = true, shares = true, passwords = true, scheme = true,
    kdf_cost = true }

--- mbk_generate{ m = 2, n = 3, shares = { file, ... }, passwords = { ... }
-- [, scheme = "shamir" | "xor"] } -> true.  A new MBK as n key share files,
-- any m of which rebuild it; not loaded (mbk_import does).  Administrators.
function methods:mbk_generate(o)
    if type(o) ~= "table" then error("mbk_generate: expects a table", 2) end
    check_fields(o, MBK_GEN_OPTS, "mbk_generate")
    local shares = o.shares
    if type(shares) ~= "table" then error("mbk_generate: shares must list the share files", 2) end
    local n = o.n or #shares
    return c_mbk_generate(self, o.m or 2, n, shares, o.passwords, o.scheme, o.kdf_cost)
end

--- mbk_import{ shares = { file, ... }, passwords = { ... } } -> true: the MBK
-- rebuilt from m shares becomes current; the previous one stays for opening
-- older blobs until mbk_retire(kcv).  Administrators.
function methods:mbk_import(o)
    if type(o) ~= "table" then error("mbk_import: expects a table", 2) end
    check_fields(o, { shares = true, passwords = true }, "mbk_import")
    return c_mbk_import(self, o.shares, o.passwords)
end

local SIGN_OPTS = { format = true }

local function raw_format(opts, fn)
    opts = opt_table(opts, fn)
    check_fields(opts, SIGN_OPTS, fn)
    local f = opts.format
    if f ~= nil and f ~= "der" and f ~= "raw" then
        error(fn .. ": format must be 'der' or 'raw'", 3)
    end
    return f == "raw"
end

--- sign(blob, mech, msg [, { format = "raw" }]) -> signature
-- ECDSA signatures are DER (as openssl expects) unless format = "raw" (r||s).
function methods:sign(blob, mech, msg, opts)
    if opts == nil then return c_sign(self, blob, mech, msg) end
    return c_sign(self, blob, mech, msg, raw_format(opts, "sign"))
end

--- verify(blob, mech, msg, sig [, opts]) -> true / false / nil, err, code
function methods:verify(blob, mech, msg, sig, opts)
    if opts == nil then return c_verify(self, blob, mech, msg, sig) end
    return c_verify(self, blob, mech, msg, sig, raw_format(opts, "verify"))
end

--- bulk_sign(blob, mech, { msg1, msg2, ... } [, opts]) -> { sig1, sig2, ... }
function methods:bulk_sign(blob, mech, msgs, opts)
    return c_bulk_sign(self, blob, mech, msgs, raw_format(opts, "bulk_sign"))
end

local CRYPT_OPTS = { aad = true, iv = true, tag = true, detached = true }

--- encrypt(blob, mech, data [, opts]) -> ciphertext
-- aes-gcm: returns iv .. ciphertext .. tag (12 + n + 16 bytes); the device
-- draws the IV unless opts.iv gives one; opts.aad is authenticated too.
-- With opts.detached = true returns ciphertext, iv, tag instead.
function methods:encrypt(blob, mech, data, opts)
    opts = opt_table(opts, "encrypt")
    check_fields(opts, CRYPT_OPTS, "encrypt")
    local ct, iv, tag = c_encrypt(self, blob, mech, data, opts.aad, opts.iv)
    if not ct or mech ~= "aes-gcm" then return ct, iv, tag end
    if opts.detached then return ct, iv, tag end
    return iv .. ct .. tag
end

--- decrypt(blob, mech, data [, opts]) -> plaintext
-- aes-gcm: data is iv .. ciphertext .. tag unless opts.iv and opts.tag are
-- given.  The plaintext is released only after the tag checks.
function methods:decrypt(blob, mech, data, opts)
    opts = opt_table(opts, "decrypt")
    check_fields(opts, CRYPT_OPTS, "decrypt")
    if mech ~= "aes-gcm" then
        return c_decrypt(self, blob, mech, data, opts.aad) -- rsa-oaep: aad is the label
    end
    local iv, tag = opts.iv, opts.tag
    if iv == nil and tag == nil then
        if type(data) ~= "string" then error("decrypt: data must be a string", 2) end
        if #data < GCM_IV + GCM_TAG then
            c_check(self) -- a closed session raises before any runtime error
            return nil, "decrypt: aes-gcm input is shorter than IV + tag ("
                .. (GCM_IV + GCM_TAG) .. " bytes)", "EINVAL"
        end
        iv = string_sub(data, 1, GCM_IV)
        tag = string_sub(data, -GCM_TAG)
        data = string_sub(data, GCM_IV + 1, -GCM_TAG - 1)
    end
    return c_decrypt(self, blob, mech, data, opts.aad, iv, tag)
end

local AGREE_OPTS = { raw = true, template = true, salt = true, info = true }

--- secret_agree(blob, mech, peer [, opts]) -> blob of a derived key
-- mech "ecdh" or "x25519"; peer as raw point/key, SPKI DER or PEM.  The
-- shared secret goes through HKDF-SHA256 (opts.salt, opts.info) into a new
-- key (opts.template, default AES-256 encrypt/decrypt) sealed as a blob of
-- the base key's group.  opts.raw = true returns the raw secret instead.
function methods:secret_agree(blob, mech, peer, opts)
    opts = opt_table(opts, "secret_agree")
    check_fields(opts, AGREE_OPTS, "secret_agree")
    return c_agree(self, blob, mech, peer, opts.raw and true or false, opts.template,
        opts.salt, opts.info)
end

-- Policy scripts (softcxi.policy): softcxi.open{ policy = }, hsm:set_policy();
-- the key methods consult a session's policy first.  Last: it wraps them all.
require("softcxi.policy")._attach(_M, methods)

return _M
