-- softcxi.cli.device: the device's own sub-commands: init, state, files, mbk,
-- user, audit and db.  Each run(ctx) uses ctx:device() (no logon) or
-- ctx:session() (logged on as --user) and reports through ctx:report.

local softcxi = require "softcxi"
local util = require "softcxi.cli.util"

local ipairs, tonumber, tostring, os, table = ipairs, tonumber, tostring, os, table
local check, die = util.check, util.die

-- ---- init, state, files -------------------------------------------------------

local function run_init(ctx)
    local a = ctx.args
    local path = ctx:device_path()
    local admin = a.admin
    local pw = util.password("administrator " .. admin, (a.password_files or {})[1],
        "SOFTCXI_PASSWORD", true)
    check("init " .. path, softcxi.init{ path = path, admin = admin, password = pw,
        keyfile = ctx:device_key(), kdf_cost = tonumber(a.kdf_cost) })
    local info = ctx:device():device_info()
    ctx:report({ device = path, id = info.id, mbk = info.kcv, keyfile = info.keyfile, admin = admin },
        function(say)
            say("created device %s in %s", info.id, path)
            say("administrator %s (level 2); auto-generated MBK %s", admin, info.kcv)
            say("device key: %s", info.keyfile)
            say("  keep the device key out of %s and back it up: without it the device", path)
            say("  cannot be opened (a new device can import the MBK from key shares)")
        end)
end

local function run_state(ctx)
    local st = check("state of " .. ctx:device_path(), ctx:device():get_state())
    st.device = ctx:device_path()
    ctx:report(st, function(say)
        say("device        %s (%s)", st.device, st.id)
        say("version       %s", st.version)
        say("initialised   %s", tostring(st.initialised))
        say("MBK           %s (%d older kept for opening blobs)", st.mbk, st.older_mbks or 0)
        say("users         %d", st.users)
        say("revoked keys  %d", st.revoked)
        say("internal DB   %s of %s used (%.1f%%)", util.bytes(st.keydb_used),
            util.bytes(st.keydb_limit), 100 * st.keydb_used / st.keydb_limit)
        say("generation    %d", st.generation)
    end)
end

local function run_files(ctx)
    local hsm = ctx:session()
    local files = check("files of " .. ctx:device_path(), hsm:list_files())
    ctx:report(util.array(files), function(say)
        local rows = {}
        for _, f in ipairs(files) do
            rows[#rows + 1] = { f.name, tostring(f.size), util.iso_time(f.mtime) }
        end
        util.table_print(say, { "FILE", "BYTES", "MODIFIED" }, rows)
    end)
end

-- ---- mbk ----------------------------------------------------------------------------

local function share_list(a)
    local outs = util.split(a.out)
    local n = tonumber(a.n) or #outs
    if #outs == 0 then util.usage("give the share files: --out s1.key,s2.key,s3.key") end
    if #outs ~= n then
        util.usage(("--n %d but --out names %d file(s)"):format(n, #outs))
    end
    local m = tonumber(a.m) or (a.scheme == "xor" and n or 2)
    return outs, m, n
end

local function generate_shares(ctx, hsm, what)
    local a = ctx.args
    local outs, m, n = share_list(a)
    for _, f in ipairs(outs) do
        if util.exists(f) then
            die(what .. ": share file " .. f .. " exists; shares are never overwritten")
        end
    end
    local pws = util.share_passwords(n, a.share_passwords,
        function(i) return "share " .. i .. " (" .. outs[i] .. ")" end, true)
    check(what, hsm:mbk_generate{ m = m, n = n, shares = outs, passwords = pws,
        scheme = a.scheme, kdf_cost = tonumber(a.kdf_cost) })
    return outs, m, n, pws
end

local function run_mbk_generate(ctx)
    local hsm = ctx:session()
    local outs, m, n = generate_shares(ctx, hsm, "mbk generate")
    ctx:report({ shares = outs, m = m, n = n, loaded = false }, function(say)
        say("wrote a new MBK as %d key shares (any %d rebuild it): %s", n, m, table.concat(outs, ", "))
        say("not loaded yet: 'softcxi mbk import SHARE...' makes it current")
    end)
end

local function run_mbk_import(ctx)
    local a = ctx.args
    local hsm = ctx:session()
    local files = a.share
    local pws = util.share_passwords(#files, a.share_passwords,
        function(i) return "share " .. files[i] end, false)
    local before = hsm:mbk_info()
    check("mbk import", hsm:mbk_import{ shares = files, passwords = pws })
    local after = check("mbk info", hsm:mbk_info())
    ctx:report({ current = after.current, previous = before and before.current or util.json_null,
        older = util.array(after.older) }, function(say)
        say("MBK %s is current (previous %s kept for opening older blobs)", after.current,
            before and before.current or "?")
        say("next: 'softcxi rewrap --store URL', then 'softcxi mbk retire %s'",
            before and before.current or "OLD-KCV")
    end)
end

local function run_mbk_info(ctx)
    local info = check("mbk info", ctx:device():mbk_info())
    ctx:report({ current = info.current, older = util.array(info.older) }, function(say)
        say("current  %s", info.current)
        for _, k in ipairs(info.older) do say("older    %s", k) end
    end)
end

local function run_mbk_rotate(ctx)
    local hsm = ctx:session()
    local before = check("mbk info", hsm:mbk_info())
    local outs, m, n, pws = generate_shares(ctx, hsm, "mbk rotate")
    local files, use = {}, {}
    for i = 1, m do files[i], use[i] = outs[i], pws[i] end
    check("mbk rotate: importing the new MBK", hsm:mbk_import{ shares = files, passwords = use })
    local after = check("mbk info", hsm:mbk_info())
    ctx:report({ current = after.current, previous = before.current, shares = outs, m = m, n = n },
        function(say)
            say("rotated: MBK %s is current; %s is kept for opening older blobs", after.current,
                before.current)
            say("new key shares (%d of %d): %s", m, n, table.concat(outs, ", "))
            say("next: 'softcxi rewrap --store URL' for every store, then "
                .. "'softcxi mbk retire %s'", before.current)
        end)
end

local function run_mbk_retire(ctx)
    local kcv = ctx.args.kcv
    check("mbk retire " .. kcv, ctx:session():mbk_retire(kcv))
    ctx:report({ retired = kcv }, function(say)
        say("retired MBK %s: blobs still under it no longer open (EMBK)", kcv)
    end)
end

-- ---- users ---------------------------------------------------------------------------

local function run_user_add(ctx)
    local a = ctx.args
    local hsm = ctx:session()
    local u = { name = a.name, role = a.role, level = tonumber(a.level),
        groups = util.split(a.groups), kdf_cost = tonumber(a.kdf_cost) }
    if a.pubkey then
        u.pubkey = util.read_file(a.pubkey, "user add " .. a.name .. ": public key")
    else
        u.password = util.password("new user " .. a.name, a.new_password_file,
            "SOFTCXI_NEW_PASSWORD", true)
    end
    check("user add " .. a.name, hsm:user_add(u))
    ctx:report({ name = a.name, role = a.role, level = u.level or 1, groups = util.array(u.groups) },
        function(say)
            say("added %s %s (level %d, groups %s)", a.role, a.name, u.level or 1,
                #u.groups > 0 and table.concat(u.groups, ",") or "none")
        end)
end

local function run_user_set(ctx)
    local a = ctx.args
    local hsm = ctx:session()
    local u = { name = a.name, level = tonumber(a.level), kdf_cost = tonumber(a.kdf_cost),
        unlock = a.unlock or nil }
    if a.groups then u.groups = util.split(a.groups) end
    if a.pubkey then u.pubkey = util.read_file(a.pubkey, "user set " .. a.name .. ": public key") end
    if a.new_password_file or a.password then
        u.password = util.password("new password of " .. a.name, a.new_password_file,
            "SOFTCXI_NEW_PASSWORD", true)
    end
    if not (u.level or u.groups or u.pubkey or u.password or u.unlock) then
        util.usage("user set " .. a.name .. ": nothing to change (--groups, --level, --password, "
            .. "--new-password-file, --pubkey, --unlock)")
    end
    check("user set " .. a.name, hsm:user_set(u))
    local what = {}
    for _, k in ipairs({ "groups", "level", "password", "pubkey", "unlock" }) do
        if u[k] ~= nil then what[#what + 1] = k end
    end
    ctx:report({ name = a.name, changed = util.array(what) }, function(say)
        say("changed %s of user %s", table.concat(what, ", "), a.name)
    end)
end

local function run_user_delete(ctx)
    local name = ctx.args.name
    check("user delete " .. name, ctx:session():user_delete(name))
    ctx:report({ deleted = name }, function(say) say("deleted user %s", name) end)
end

local function run_user_list(ctx)
    local users = check("user list", ctx:session():user_list())
    ctx:report(util.array(users), function(say)
        local rows, now = {}, os.time()
        for _, u in ipairs(users) do
            local locked = (u.locked_until or 0) > now and ("until " .. util.iso_time(u.locked_until)) or "no"
            rows[#rows + 1] = { u.name, u.role, u.level, u.groups ~= "" and u.groups or "-",
                u.failures, locked }
        end
        util.table_print(say, { "NAME", "ROLE", "LEVEL", "GROUPS", "FAILURES", "LOCKED" }, rows)
    end)
end

-- ---- audit ------------------------------------------------------------------------------

local function run_audit_show(ctx)
    local recs = check("audit show", ctx:session():audit_log())
    local last = tonumber(ctx.args.last)
    if last and last < #recs then
        local tail = {}
        for i = #recs - last + 1, #recs do tail[#tail + 1] = recs[i] end
        recs = tail
    end
    ctx:report(util.array(recs), function(say)
        local rows = {}
        for _, r in ipairs(recs) do
            rows[#rows + 1] = { r.seq, util.iso_time(r.time), r.event, r.subject or "", r.detail or "" }
        end
        util.table_print(say, { "SEQ", "TIME", "EVENT", "SUBJECT", "DETAIL" }, rows)
    end)
end

local function run_audit_verify(ctx)
    local ok, n = check("audit verify", ctx:session():audit_verify())
    ctx:report({ ok = ok, records = n }, function(say)
        say("audit log intact: %d records, chain and counter verified", n)
    end)
end

-- ---- db -------------------------------------------------------------------------------------

local function run_db_backup(ctx)
    local file = ctx.args.file
    local hsm = ctx:session()
    local image, keys, skipped = hsm:backup_database()
    check("db backup", image, keys, skipped)
    util.write_file(file, image, "db backup " .. file)
    local kcv = hsm:mbk_info().current
    ctx:report({ file = file, bytes = #image, keys = keys, skipped = skipped, mbk = kcv }, function(say)
        say("wrote %d internal keys to %s (%s, sealed under MBK %s)", keys, file, util.bytes(#image), kcv)
        if skipped > 0 then say("left out %d keys whose export policy is deny-backup", skipped) end
    end)
end

local function run_db_restore(ctx)
    local file = ctx.args.file
    local hsm = ctx:session()
    local image = util.read_file(file, "db restore")
    local flags = 0
    if ctx.args.merge then flags = flags + softcxi.RESTORE_MERGE end
    if ctx.args.overwrite then
        if not ctx.args.merge then util.usage("db restore: --overwrite goes with --merge") end
        flags = flags + softcxi.FLAG_OVERWRITE
    end
    local keys = check("db restore " .. file, hsm:restore_database(image, flags))
    local used = hsm:keydb_usage()
    ctx:report({ file = file, keys = keys, merged = ctx.args.merge or false, keydb_used = used },
        function(say)
            say("%s %d keys from %s; the internal database holds %s of key data",
                ctx.args.merge and "merged" or "restored", keys, file, util.bytes(used or 0))
        end)
end

-- ---- the commands -------------------------------------------------------------------------

return function(p, cmd)
    local c = cmd(p, "init", "Create a device and its first administrator.", run_init, [[
Examples:
  softcxi --device ./hsm init                       # prompts for the password
  SOFTCXI_PASSWORD=... softcxi --device ./hsm init --admin ADMIN]])
    c:option("--admin", "Name of the first administrator (level 2).", "ADMIN"):argname("NAME")
    c:option("--kdf-cost", "log2 of scrypt's N for password hashes (default 15).")
        :argname("N")

    cmd(p, "state", "Show the device state (GetState); no logon.", run_state)
    cmd(p, "files", "List the files of the device state directory (ListFiles).", run_files)

    local mbk = cmd(p, "mbk", "Master Backup Key: key shares, import, rotation.")
    local function share_opts(g)
        g:option("--m", "Shares needed to rebuild the MBK (default 2; n for xor).")
            :argname("M")
        g:option("--n", "Number of shares (default: the number of --out files).")
            :argname("N")
        g:option("--out", "The share files to write, comma-separated (never overwritten).")
            :argname("FILES"):count(1)
        g:option("--scheme", "shamir (m of n) or xor (n of n).", "shamir")
            :choices({ "shamir", "xor" })
        g:option("--share-passwords", "FILE with one password per share, in order "
            .. "(default: prompt for each).")
            :argname("FILE")
        g:option("--kdf-cost", "log2 of scrypt's N for the share passwords (default 15).")
            :argname("N")
    end
    share_opts(cmd(mbk, "generate", "Write a new MBK as m-of-n key share files.", run_mbk_generate, [[
Example:
  softcxi mbk generate --m 2 --n 3 --out s1.key,s2.key,s3.key]]))
    local imp = cmd(mbk, "import", "Load an MBK from m key share files; it becomes current.",
        run_mbk_import, [[
Example:
  softcxi mbk import s1.key s3.key --share-passwords pw.txt]])
    imp:argument("share", "Share files."):args("+")
    imp:option("--share-passwords", "FILE with one password per share file, in order "
        .. "(default: prompt for each).")
        :argname("FILE")
    cmd(mbk, "info", "Show the current and older MBKs' check values; no logon.", run_mbk_info)
    share_opts(cmd(mbk, "rotate", "Generate a new MBK as shares and make it current.", run_mbk_rotate,
        [[
The previous MBK stays for opening older blobs until 'mbk retire'. Then run
'softcxi rewrap --store URL' on every store.
Example:
  softcxi mbk rotate --m 2 --n 3 --out new1.key,new2.key,new3.key]]))
    cmd(mbk, "retire", "Forget an older MBK: its blobs stop opening (EMBK).", run_mbk_retire,
        "Example:\n  softcxi mbk retire 0123456789abcdef")
        :argument("kcv", "The MBK's key check value (16 hex digits, from 'mbk info').")

    local user = cmd(p, "user", "Users, roles, groups and levels.")
    local ua = cmd(user, "add", "Add a user (administrators).", run_user_add, [[
Examples:
  softcxi user add app --groups iot,fleet-* --new-password-file app.pw
  softcxi user add ADMIN2 --role admin --level 1]])
    ua:argument("name", "User name.")
    ua:option("--role", "user or admin.", "user"):choices({ "user", "admin" })
    ua:option("--level", "Authentication level (default 1; administrators need 2 in all).")
        :argname("N")
    ua:option("--groups", "Key groups, comma-separated; patterns like iot-* allowed.")
        :argname("LIST")
    ua:option("--new-password-file", "The new user's password (default $SOFTCXI_NEW_PASSWORD, "
        .. "else a prompt).")
        :argname("FILE")
    ua:option("--pubkey", "Public key (PEM) for logon with a signed challenge instead.")
        :argname("FILE")
    ua:option("--kdf-cost", "log2 of scrypt's N for the password hash (default 15).")
        :argname("N")
    local us = cmd(user, "set", "Change a user (administrators; anyone: own password or key).",
        run_user_set, [[
Examples:
  softcxi user set app --groups iot,fleet
  softcxi --user app user set app --password      # prompts for the new password
  softcxi user set ADMIN --level 1 ; softcxi user set app --unlock]])
    us:argument("name", "User name.")
    us:option("--groups", "New key groups, comma-separated."):argname("LIST")
    us:option("--level", "New authentication level."):argname("N")
    us:flag("--password", "Set a new password (prompt, or $SOFTCXI_NEW_PASSWORD).")
    us:option("--new-password-file", "Set the new password from FILE."):argname("FILE")
    us:option("--pubkey", "New public key (PEM) for key logon."):argname("FILE")
    us:flag("--unlock", "Clear a lockout after failed logons.")
    us:option("--kdf-cost", "log2 of scrypt's N for the new password hash."):argname("N")
    cmd(user, "delete", "Delete a user (administrators).", run_user_delete)
        :argument("name", "User name.")
    cmd(user, "list", "List users (administrators).", run_user_list)

    local audit = cmd(p, "audit", "The tamper-evident audit log (administrators).")
    cmd(audit, "show", "Print the audit records.", run_audit_show)
        :option("--last", "Only the last N records."):argname("N")
    cmd(audit, "verify", "Check the whole HMAC chain and the sealed counter.", run_audit_verify)

    local db = cmd(p, "db", "Back up and restore the internal key database (administrators).")
    cmd(db, "backup", "Write an MBK-sealed image of the internal key database.", run_db_backup,
        "Example:\n  softcxi db backup keys-2026-11-27.db")
        :argument("file", "Output file ('-' for stdout); written all or nothing.")
    local dr = cmd(db, "restore", "Replace the internal key database with a backup image.",
        run_db_restore, [[
All or nothing: a damaged image, or one sealed under an MBK this device does
not hold, changes nothing.
Examples:
  softcxi --device ./hsm2 db restore keys-2026-11-27.db
  softcxi db restore --merge --overwrite keys-2026-11-27.db]])
    dr:argument("file", "Backup image ('-' for stdin).")
    dr:flag("--merge", "Add the image's keys to those already there (EEXIST on a taken address).")
    dr:flag("--overwrite", "With --merge: replace keys at taken addresses.")
end
