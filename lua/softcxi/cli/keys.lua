-- softcxi.cli.keys: key sub-commands (generate, list, info, delete, backup,
-- restore, import, export, revoke, revoked, public) and the operations
-- (sign, verify, encrypt, decrypt).
--
-- A KEY argument names a key in one of three ways:
--   * with --store URL: the key's id in that store (default group/name[/specifier]);
--   * a file holding a blob (or "-" for standard input);
--   * otherwise an internal key's address GROUP/NAME[/SPECIFIER] on the device.

local softcxi = require "softcxi"
local util = require "softcxi.cli.util"

local ipairs, pairs, tonumber, tostring, type, pcall, load, io, table, setmetatable =
    ipairs, pairs, tonumber, tostring, type, pcall, load, io, table, setmetatable
local check, die, usage = util.check, util.die, util.usage

local _M = {}

-- ---- naming keys ------------------------------------------------------------------

--- group/name[/specifier] -> group, name, specifier (or nil)
local function parse_address(ref)
    local group, name, spec = ref:match("^([^/]*)/([^/]+)/(%d+)$")
    if group then return group, name, tonumber(spec) end
    group, name = ref:match("^([^/]*)/([^/]+)$")
    return group, name
end

--- resolve(ctx, ref [, store_url]) -> key (blob or handle), kind ("store" |
-- "file" | "internal").  store_url defaults to --store.
function _M.resolve(ctx, ref, store_url)
    if store_url == nil then store_url = ctx.args.store end
    if store_url then
        local blob, err, code = ctx:store(store_url):get(ref)
        if not blob then
            if code == "ENOTFOUND" or err == nil then
                die("key " .. ref .. ": not found in store " .. store_url)
            end
            check("key " .. ref .. " in store " .. store_url, nil, err, code)
        end
        return blob, "store"
    end
    if ref == "-" or util.exists(ref) then
        local data = util.read_file(ref, "key " .. ref)
        if data:byte(1) ~= 0x4B then
            die("key " .. ref .. ": not a key blob (a blob starts with 'K')")
        end
        return data, "file"
    end
    local group, name, spec = parse_address(ref)
    if not group then
        die("key " .. ref .. ": no such file and not an internal key address GROUP/NAME"
            .. "[/SPECIFIER] (for a store id give --store URL)")
    end
    return check("key " .. ref, ctx:session():key_open(group, name, spec)), "internal"
end

-- ---- templates ----------------------------------------------------------------------

local TEMPLATE_OPTS = { "algo", "curve", "size", "hash", "name", "group", "specifier", "label",
    "usage", "export", "expiry" }

--- Read a template file: JSON ({...}) or a Lua file returning a table, run
-- with no access to anything (it is data, not a program).
function _M.load_template(file)
    local src = util.read_file(file, "template")
    if src:match("^%s*{") then
        local t, err = util.json_decode(src)
        if type(t) ~= "table" then die("template " .. file .. ": not valid JSON: " .. tostring(err)) end
        return t
    end
    local chunk, err
    if _VERSION == "Lua 5.1" then
        chunk, err = loadstring(src, "@" .. file) -- luacheck: ignore (LuaJIT)
        if chunk then setfenv(chunk, {}) end       -- luacheck: ignore
    else
        chunk, err = load(src, "@" .. file, "t", {})
    end
    if not chunk then die("template " .. tostring(err)) end
    local ok, t = pcall(chunk)
    if not ok then die("template " .. file .. ": " .. tostring(t)) end
    if type(t) ~= "table" then die("template " .. file .. ": must return a table") end
    return t
end

--- The template of a command: --template FILE, then the single options.
function _M.template(ctx)
    local a = ctx.args
    local t = a.template and _M.load_template(a.template) or {}
    for _, k in ipairs(TEMPLATE_OPTS) do
        local v = a[k]
        if v ~= nil then
            if k == "size" or k == "specifier" then
                local n = tonumber(v)
                if not n then usage("--" .. k .. " must be a number, not '" .. v .. "'") end
                v = n
            elseif k == "usage" then
                v = util.split(v)
            elseif k == "expiry" then
                local at, err = util.parse_time(v)
                if not at then usage("--expiry '" .. v .. "': " .. err) end
                v = at
            end
            t[k] = v
        end
    end
    if type(t.expiry) == "string" then
        local at, err = util.parse_time(t.expiry)
        if not at then die("template: expiry '" .. t.expiry .. "': " .. err) end
        t.expiry = at
    end
    return t
end

function _M.template_options(c, with_name)
    c:option("--template", "Template file: JSON, or Lua returning a table; options below override.")
        :argname("FILE")
    c:option("--algo", "ec, ed25519, x25519, rsa, aes, hmac-sha256|384|512."):argname("ALGO")
    c:option("--curve", "P-256 (default), P-384, P-521, secp256k1."):argname("CURVE")
    c:option("--size", "Bits (rsa 2048|3072|4096, aes 128|192|256, hmac)."):argname("BITS")
    c:option("--hash", "With --algo hmac: sha256, sha384, sha512."):argname("HASH")
    if with_name then c:option("--name", "Key name."):argname("NAME") end
    c:option("--group", "Key group: who may use the key."):argname("GROUP")
    c:option("--specifier", "Key specifier (0..2^32-1)."):argname("N")
    c:option("--label", "Free label."):argname("TEXT")
    c:option("--usage", "sign,verify,encrypt,decrypt,wrap,unwrap,derive (comma-separated).")
        :argname("LIST")
    c:option("--export", "deny (default), allow, allow-plain, deny-backup."):argname("POLICY")
    c:option("--expiry", "Unix seconds, YYYY-MM-DD[THH:MM[:SS]] (UTC) or +N[d|h|y]."):argname("WHEN")
end

-- ---- output -------------------------------------------------------------------------------

local function info_doc(info)
    local doc = {}
    for k, v in pairs(info) do doc[k] = v end
    if doc.public_key then doc.public_key = util.hex(doc.public_key) end
    if doc.usage then doc.usage = util.array(doc.usage) end
    return doc
end

local function say_info(say, ref, info)
    say("key        %s", ref)
    say("algorithm  %s%s%s", info.algo, info.curve and (" " .. info.curve) or "",
        info.size and (" " .. info.size .. " bits") or "")
    if info.group then say("group      %s", info.group) end
    if info.name then say("name       %s", info.name) end
    if info.specifier then say("specifier  %d", info.specifier) end
    if info.label then say("label      %s", info.label) end
    if info.usage then say("usage      %s", table.concat(info.usage, ",")) end
    if info.export then say("export     %s", info.export) end
    if info.gen_date then say("generated  %s", util.iso_time(info.gen_date)) end
    say("expires    %s", util.iso_time(info.expiry))
    if info.kcv then say("MBK        %s", info.kcv) end
    if info.blob_size then say("blob       %d bytes, format v%d", info.blob_size, info.version or 1) end
    say("verified   %s", info.verified and "yes (tag checked by the device)"
        or "no (clear attributes; log on with --verify to check)")
end

-- where an external key goes: --out FILE and/or --store URL [--id ID]
local function keep_blob(ctx, blob, what)
    local a = ctx.args
    local where = {}
    if a.store then
        local store = ctx:store(a.store) -- with --policy, its on_store checks the put
        local ok, err, code = store:put(a.id, blob, { overwrite = a.overwrite or nil })
        if not ok then
            if code == "EEXIST" then
                die(what .. ": " .. tostring(err) .. " (give --overwrite to replace it)")
            end
            check(what .. ": storing in " .. a.store, nil, err, code)
        end
        where.store, where.id = a.store, a.id or check("id", require("softcxi.store").id_of(blob))
    end
    if a.out then
        util.write_file(a.out, blob, what .. ": writing " .. a.out)
        where.out = a.out
    end
    return where
end

-- ---- key generate / import -------------------------------------------------------------------

local function run_key_generate(ctx)
    local a = ctx.args
    local t = _M.template(ctx)
    if not t.algo then usage("key generate: give --algo (or an algo in --template)") end
    local flags = a.overwrite and softcxi.FLAG_OVERWRITE or 0
    local hsm = ctx:session()
    local what = "key generate " .. (t.group or "") .. "/" .. (t.name or "")
    if a.external then
        if not a.out and not a.store then
            usage("key generate --external: give --out FILE and/or --store URL for the blob")
        end
        local blob = check(what, hsm:key_generate(softcxi.FLAG_EXTERNAL, t))
        local where = keep_blob(ctx, blob, what)
        local info = softcxi.key_info(blob)
        local doc = info_doc(info)
        doc.store, doc.id, doc.out, doc.external = where.store, where.id, where.out, true
        ctx:report(doc, function(say)
            say("generated external %s key %s (MBK %s)%s%s",
                info.algo .. (info.curve and (" " .. info.curve) or ""),
                (info.group or "") .. "/" .. (info.name or ""), info.kcv,
                where.store and (", stored as " .. where.id .. " in " .. where.store) or "",
                where.out and (", blob in " .. where.out) or "")
        end)
        return
    end
    if a.out or a.store then usage("key generate: --out and --store are for --external keys") end
    if not t.name then usage("key generate: an internal key needs --name") end
    local h = check(what, hsm:key_generate(flags, t))
    local info = check(what, hsm:key_info(h))
    local used, limit = hsm:keydb_usage()
    local doc = info_doc(info)
    doc.external, doc.keydb_used, doc.keydb_limit = false, used, limit
    ctx:report(doc, function(say)
        say("generated internal %s key %s; internal DB %s of %s", info.algo,
            (info.group or "") .. "/" .. info.name .. (info.specifier and ("/" .. info.specifier) or ""),
            util.bytes(used or 0), util.bytes(limit or 0))
    end)
end

local function run_key_import(ctx)
    local a = ctx.args
    local t = _M.template(ctx)
    local data = util.read_file(a.file, "key import")
    local format = a.format
    if not format and not data:find("^%-%-%-%-%-BEGIN") and not data:find("^%s*{") then
        usage("key import: give --format (pkcs8, spki, jwk, raw, aes-kwp or rsa-aes-kwp) for "
            .. "non-PEM data")
    end
    local hsm = ctx:session()
    local unwrap
    if format == "aes-kwp" or format == "rsa-aes-kwp" then
        if not a.unwrap then usage("key import --format " .. format .. ": give --unwrap KEY") end
        unwrap = _M.resolve(ctx, a.unwrap, a.unwrap_store or false)
    elseif a.unwrap then
        usage("key import: --unwrap goes with --format aes-kwp or rsa-aes-kwp")
    end
    local what = "key import " .. a.file
    if a.external then
        if not a.out and not a.store then
            usage("key import --external: give --out FILE and/or --store URL for the blob")
        end
        local blob = check(what, hsm:key_import(softcxi.FLAG_EXTERNAL, t, data, format, unwrap))
        data = nil -- luacheck: ignore (dropped as soon as used)
        local where = keep_blob(ctx, blob, what)
        local doc = info_doc(softcxi.key_info(blob))
        doc.store, doc.id, doc.out = where.store, where.id, where.out
        ctx:report(doc, function(say)
            say("imported %s as an external %s key%s%s", a.file, doc.algo,
                where.store and (", stored as " .. where.id .. " in " .. where.store) or "",
                where.out and (", blob in " .. where.out) or "")
        end)
        return
    end
    if not t.name then usage("key import: an internal key needs --name") end
    local flags = a.overwrite and softcxi.FLAG_OVERWRITE or 0
    local h = check(what, hsm:key_import(flags, t, data, format, unwrap))
    data = nil -- luacheck: ignore
    local info = check(what, hsm:key_info(h))
    ctx:report(info_doc(info), function(say)
        say("imported %s as internal %s key %s/%s", a.file, info.algo, info.group or "", info.name)
    end)
end

-- ---- list / info / public -------------------------------------------------------------

local function run_key_list(ctx)
    local keys = check("key list", ctx:session():key_list())
    local g = ctx.args.group
    local out = {}
    for _, k in ipairs(keys) do
        if not g or k.group == g then out[#out + 1] = k end
    end
    ctx:report(util.array(out), function(say)
        local rows = {}
        for _, k in ipairs(out) do
            rows[#rows + 1] = { k.group ~= "" and k.group or "-", k.name, k.specifier or "" }
        end
        util.table_print(say, { "GROUP", "NAME", "SPECIFIER" }, rows)
    end)
end

local function run_key_info(ctx)
    local ref = ctx.args.key
    local key, kind = _M.resolve(ctx, ref)
    local info
    if kind == "internal" or ctx.args.verify then
        info = check("key " .. ref, ctx:session():key_info(key))
    else
        info = check("key " .. ref, softcxi.key_info(key))
    end
    local doc = info_doc(info)
    doc.key = ref
    ctx:report(doc, function(say) say_info(say, ref, info) end)
end

local function run_key_public(ctx)
    local a = ctx.args
    local key, kind = _M.resolve(ctx, a.key)
    local pub
    if a.unverified then
        if kind == "internal" then usage("key public --unverified: only for blobs, not internal keys") end
        pub = check("key " .. a.key, softcxi.public_key(key, a.format))
        ctx:note("key %s: public key read from the blob's clear attributes, NOT verified by "
            .. "the device", a.key)
    else
        pub = check("key " .. a.key, ctx:session():public_key(key, a.format))
    end
    if a.out then
        util.write_file(a.out, pub, "key public " .. a.key)
    elseif a.json then
        local doc = { key = a.key, format = a.format, verified = not a.unverified }
        doc.public_key = (a.format == "der" or a.format == "raw") and util.hex(pub) or pub
        ctx:report(doc)
    else
        io.stdout:write(pub)
        if a.format == "pem" or a.format == "jwk" then
            if pub:sub(-1) ~= "\n" then io.stdout:write("\n") end
        end
    end
end

-- ---- delete / backup / restore / revoke / export ------------------------------------------

local function run_key_delete(ctx)
    local a = ctx.args
    local ref = a.key
    if a.store then
        local store = ctx:store(a.store)
        if a.revoke then
            local blob = _M.resolve(ctx, ref)
            check("key revoke " .. ref, ctx:session():key_revoke(blob, a.reason or "deleted"))
        end
        check("key delete " .. ref, store:delete(ref))
        ctx:report({ deleted = ref, store = a.store, revoked = a.revoke or false }, function(say)
            say("deleted %s from %s%s", ref, a.store, a.revoke and " (and revoked)"
                or "; copies of the blob elsewhere stay valid: 'key revoke' withdraws them")
        end)
        return
    end
    local key, kind = _M.resolve(ctx, ref)
    if kind ~= "internal" then
        die("key delete " .. ref .. ": a blob file is not deleted by the device; remove the file, "
            .. "and 'softcxi key revoke " .. ref .. "' withdraws every copy")
    end
    check("key delete " .. ref, ctx:session():key_delete(key))
    ctx:report({ deleted = ref }, function(say) say("deleted internal key %s", ref) end)
end

local function run_key_backup(ctx)
    local a = ctx.args
    local key, kind = _M.resolve(ctx, a.key)
    if kind ~= "internal" then
        die("key backup " .. a.key .. ": only internal keys are backed up (an external key's blob "
            .. "is its own backup)")
    end
    local backup = check("key backup " .. a.key, ctx:session():key_backup(key))
    util.write_file(a.out, backup, "key backup " .. a.key)
    ctx:report({ key = a.key, out = a.out, bytes = #backup }, function(say)
        say("backed up %s to %s (%d bytes, sealed under MBK %s)", a.key, a.out, #backup,
            softcxi.key_info(backup).kcv)
    end)
end

local function run_key_restore(ctx)
    local a = ctx.args
    local backup = util.read_file(a.file, "key restore")
    local flags = a.overwrite and softcxi.FLAG_OVERWRITE or 0
    local hsm = ctx:session()
    local h = check("key restore " .. a.file, hsm:key_restore(flags, backup))
    local info = check("key restore " .. a.file, hsm:key_info(h))
    local ref = (info.group or "") .. "/" .. info.name .. (info.specifier and ("/" .. info.specifier) or "")
    ctx:report({ restored = ref, file = a.file }, function(say)
        say("restored internal key %s from %s", ref, a.file)
    end)
end

local function run_key_revoke(ctx)
    local a = ctx.args
    local key = _M.resolve(ctx, a.key)
    check("key revoke " .. a.key, ctx:session():key_revoke(key, a.reason))
    ctx:report({ revoked = a.key, reason = a.reason or util.json_null }, function(say)
        say("revoked %s: every copy of it now fails with EREVOKED", a.key)
    end)
end

local function run_key_revoked(ctx)
    local list = check("key revoked", ctx:session():key_revoked())
    ctx:report(util.array(list), function(say)
        local rows = {}
        for _, r in ipairs(list) do
            rows[#rows + 1] = { util.iso_time(r.time), (r.group or "") .. "/" .. (r.name or ""),
                r.reason or "", r.id }
        end
        util.table_print(say, { "REVOKED", "KEY", "REASON", "ID" }, rows)
    end)
end

local function run_key_export(ctx)
    local a = ctx.args
    local hsm = ctx:session()
    local key = _M.resolve(ctx, a.key)
    local wrapping = "plain"
    if a.wrap then wrapping = _M.resolve(ctx, a.wrap, a.wrap_store or false) end
    local out = check("key export " .. a.key, hsm:key_export(key, wrapping, a.mech))
    util.write_file(a.out, out, "key export " .. a.key)
    out = nil -- luacheck: ignore (a plain export is key material: dropped at once)
    ctx:report({ key = a.key, out = a.out, wrapped = a.wrap ~= nil, wrapping_key = a.wrap },
        function(say)
            say("exported %s to %s (%s)", a.key, a.out,
                a.wrap and ("wrapped under " .. a.wrap) or "plain: keep the file secret")
        end)
end

-- ---- operations -----------------------------------------------------------------------------

local DEFAULT_MECH = {
    ec = { ["P-256"] = "ecdsa-sha256", ["secp256k1"] = "ecdsa-sha256", ["P-384"] = "ecdsa-sha384",
           ["P-521"] = "ecdsa-sha512" },
    ed25519 = "ed25519", rsa = "rsa-pss-sha256", aes = "aes-gcm",
    ["hmac-sha256"] = "hmac-sha256", ["hmac-sha384"] = "hmac-sha384", ["hmac-sha512"] = "hmac-sha512",
}

local function mech_for(ctx, key, kind, op)
    if ctx.args.mech then return ctx.args.mech end
    local info = kind == "internal" and ctx:session():key_info(key) or softcxi.key_info(key)
    if not info then usage(op .. ": give --mech") end
    local m = DEFAULT_MECH[info.algo]
    if type(m) == "table" then m = m[info.curve] end
    if info.algo == "rsa" and (op == "encrypt" or op == "decrypt") then m = "rsa-oaep-sha256" end
    if not m then usage(op .. ": give --mech for a " .. tostring(info.algo) .. " key") end
    return m
end

local function input(ctx)
    return util.read_file(ctx.args["in"] or "-", "reading the input")
end

-- The result of sign, encrypt or decrypt: raw bytes to --out (default
-- stdout); with --json a report instead, holding the bytes in base64 unless
-- they went to a file.
local function output(ctx, data, what, doc)
    local out = ctx.args.out
    if ctx.args.json then
        if out and out ~= "-" then
            util.write_file(out, data, what)
            doc.out = out
        else
            doc.base64 = util.base64(data)
        end
        doc.bytes = #data
        ctx:report(doc)
        return
    end
    util.write_file(out or "-", data, what)
end

local function run_sign(ctx)
    local a = ctx.args
    local key, kind = _M.resolve(ctx, a.key)
    local mech = mech_for(ctx, key, kind, "sign")
    local msg = input(ctx)
    local hsm = ctx:session()
    local sig
    if mech:find("^hmac") then
        sig = check("sign with " .. a.key, hsm:mac(key, mech, msg))
    else
        sig = check("sign with " .. a.key, hsm:sign(key, mech, msg, a.format and { format = a.format }))
    end
    output(ctx, sig, "sign with " .. a.key, { key = a.key, mech = mech })
end

local function run_verify(ctx)
    local a = ctx.args
    local key, kind = _M.resolve(ctx, a.key)
    local mech = mech_for(ctx, key, kind, "verify")
    local sig = util.read_file(a.sig, "verify: signature")
    local msg = input(ctx)
    local hsm = ctx:session()
    local ok, err, code
    if mech:find("^hmac") then
        ok, err, code = hsm:mac_verify(key, mech, msg, sig)
    else
        ok, err, code = hsm:verify(key, mech, msg, sig, a.format and { format = a.format })
    end
    check("verify with " .. a.key, ok, err, code)
    ctx:report({ key = a.key, mech = mech, valid = ok }, function(say)
        say(ok and "signature valid" or "signature INVALID")
    end)
    return ok and 0 or 1
end

local function run_crypt(op)
    return function(ctx)
        local a = ctx.args
        local key, kind = _M.resolve(ctx, a.key)
        local mech = mech_for(ctx, key, kind, op)
        local data = input(ctx)
        local hsm = ctx:session()
        local res = check(op .. " with " .. a.key, hsm[op](hsm, key, mech, data, { aad = a.aad }))
        output(ctx, res, op .. " with " .. a.key, { key = a.key, mech = mech })
    end
end

-- ---- the commands ---------------------------------------------------------------------------

local function key_source(c)
    c:argument("key", "Blob file, '-', store id (with --store) or GROUP/NAME[/SPECIFIER].")
    c:option("--store", "Read the key from this store (file:DIR, redis://...)."):argname("URL")
end

function _M.define(p, cmd)
    local key = cmd(p, "key", "Keys: generate, list, inspect, back up, import, export, revoke.")

    local g = cmd(key, "generate", "Generate a key, internal or external (--external).", run_key_generate,
        [[
Examples:
  softcxi key generate --algo ec --group iot --name root          # internal
  softcxi key generate --external --algo ed25519 --group iot --name dev-1 \
      --store file:./keystore
  softcxi key generate --external --template iot.json --name dev-2 --out dev-2.blob]])
    _M.template_options(g, true)
    g:flag("--external", "Return the key as an MBK-sealed blob instead of keeping it inside.")
    g:option("--out", "Write the blob to FILE ('-': stdout)."):argname("FILE")
    g:option("--store", "Put the blob into this key store."):argname("URL")
    g:option("--id", "Store id (default group/name[/specifier])."):argname("ID")
    g:flag("--overwrite", "Replace an existing key at that address or id.")

    local l = cmd(key, "list", "List the internal keys of your groups.", run_key_list)
    l:option("--group", "Only this group."):argname("GROUP")

    local i = cmd(key, "info", "Show a key's attributes (blobs: no logon needed).", run_key_info, [[
Examples:
  softcxi key info dev-1.blob
  softcxi key info --store file:./keystore iot/dev-000001
  softcxi key info --verify --user app dev-1.blob     # tag checked by the device]])
    key_source(i)
    i:flag("--verify", "Log on and have the device check the blob's tag.")

    local pub = cmd(key, "public", "Print a key's public key.", run_key_public, [[
Examples:
  softcxi key public --user app dev-1.blob > dev-1.pem
  softcxi key public --unverified --format jwk --store file:./keystore iot/dev-1]])
    key_source(pub)
    pub:option("--format", "pem, der, jwk or raw.", "pem"):choices({ "pem", "der", "jwk", "raw" })
    pub:flag("--unverified", "Read it from the blob's clear attributes, without the device.")
    pub:option("--out", "Write to FILE."):argname("FILE")

    local d = cmd(key, "delete", "Delete an internal key, or a blob from a store.", run_key_delete, [[
Examples:
  softcxi key delete iot/root
  softcxi key delete --store redis://127.0.0.1:6379/0 --revoke iot/dev-7]])
    key_source(d)
    d:flag("--revoke", "With --store: also revoke the key, so copies fail too.")
    d:option("--reason", "Revocation reason."):argname("TEXT")

    local b = cmd(key, "backup", "Back up an internal key (MBK-sealed).", run_key_backup,
        "Example:\n  softcxi key backup iot/root --out root.bak")
    key_source(b)
    b:option("--out", "Backup file (written all or nothing)."):argname("FILE"):count(1)

    local r = cmd(key, "restore", "Restore a key backup into the internal database.", run_key_restore,
        "Example:\n  softcxi --device ./hsm2 key restore root.bak")
    r:argument("file", "Backup file.")
    r:flag("--overwrite", "Replace a key at the same address.")

    local im = cmd(key, "import", "Import a key (PKCS#8, SPKI, raw) as a blob or internal key.",
        run_key_import, [[
Examples:
  softcxi key import partner.pem --external --group iot --name partner --out partner.blob
  softcxi key import aes.bin --format raw --algo aes --group iot --name k1
  softcxi key import root.wrapped --format aes-kwp --unwrap iot/kek --group iot \
      --name root2]])
    im:argument("file", "Key file ('-': stdin).")
    im:option("--format", "pkcs8, spki, jwk, raw, aes-kwp or rsa-aes-kwp (PEM and JWK need none).")
        :argname("FORMAT")
    im:option("--unwrap", "Unwrapping key for aes-kwp / rsa-aes-kwp input."):argname("KEY")
    im:option("--unwrap-store", "Read the unwrapping key from this store."):argname("URL")
    _M.template_options(im, true)
    im:flag("--external", "Return a blob instead of storing the key inside.")
    im:option("--out", "Write the blob to FILE."):argname("FILE")
    im:option("--store", "Put the blob into this key store."):argname("URL")
    im:option("--id", "Store id (default group/name[/specifier])."):argname("ID")
    im:flag("--overwrite", "Replace an existing key at that address or id.")

    local ex = cmd(key, "export", "Export a key where its export policy allows.", run_key_export, [[
Without --wrap the key is exported plain (PKCS#8 DER, or the AES/HMAC key bytes),
which only an allow-plain key permits. Every export is in the audit log.

Examples:
  softcxi key export iot/root --wrap iot/kek --out root.wrapped
  softcxi key export dev-1.blob --out dev-1.p8        # export policy allow-plain]])
    key_source(ex)
    ex:option("--wrap", "Wrapping key (AES: RFC 5649 KWP; RSA: OAEP + KWP)."):argname("KEY")
    ex:option("--wrap-store", "Read the wrapping key from this store."):argname("URL")
    ex:option("--mech", "aes-kwp or rsa-aes-kwp (default: from the wrapping key)."):argname("MECH")
    ex:option("--out", "Output file."):argname("FILE"):count(1)

    local rv = cmd(key, "revoke", "Revoke a key: every copy of its blob fails (EREVOKED).",
        run_key_revoke, "Example:\n  softcxi key revoke --store file:./keystore iot/dev-7 --reason stolen")
    key_source(rv)
    rv:option("--reason", "Why (recorded)."):argname("TEXT")
    cmd(key, "revoked", "List revoked keys.", run_key_revoked)

    local function op_command(name, summary, run, epilog)
        local c = cmd(p, name, summary, run, epilog)
        key_source(c)
        c:option("--mech", "Mechanism (default from the key: ecdsa-sha256, ed25519, rsa-pss-sha256, "
            .. "aes-gcm, rsa-oaep-sha256, hmac-...).")
            :argname("MECH")
        c:option("--in", "Input file (default stdin)."):argname("FILE")
        return c
    end
    local s = op_command("sign", "Sign data with a key (or MAC with an HMAC key).", run_sign, [[
Examples:
  softcxi sign --user app dev-1.blob --in fw.bin --out fw.sig
  softcxi sign --store file:./keystore iot/dev-000001 < manifest.json > manifest.sig]])
    s:option("--out", "Signature file (default stdout)."):argname("FILE")
    s:option("--format", "ECDSA signature as der (default) or raw r||s."):choices({ "der", "raw" })
    local v = op_command("verify", "Verify a signature (exit 0 valid, 1 invalid).", run_verify,
        "Example:\n  softcxi verify dev-1.blob --sig fw.sig --in fw.bin")
    v:option("--sig", "Signature file."):argname("FILE"):count(1)
    v:option("--format", "ECDSA signature as der (default) or raw r||s."):choices({ "der", "raw" })
    for _, op in ipairs({ "encrypt", "decrypt" }) do
        local c = op_command(op, op == "encrypt" and "Encrypt data (AES-GCM: iv||ct||tag; RSA-OAEP)."
            or "Decrypt data (the plaintext only after the tag checks).", run_crypt(op),
            "Example:\n  softcxi " .. op .. " --store file:./keystore iot/k1 --in a --out b")
        c:option("--out", "Output file (default stdout; written all or nothing)."):argname("FILE")
        c:option("--aad", "Additional authenticated data (AES-GCM) or OAEP label."):argname("TEXT")
    end
end

return setmetatable(_M, { __call = function(_, p, cmd) return _M.define(p, cmd) end })
