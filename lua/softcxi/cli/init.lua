-- softcxi.cli: the `softcxi` command, the csadm of this project.
--
--   softcxi [--device DIR] [--user NAME] [--json] [--quiet] COMMAND [SUBCOMMAND] ...
--
-- main(argv) parses the command line (lua-argparse), runs one sub-command and
-- returns the exit status: 0 ok, 1 failure (one line on stderr naming the
-- object), 2 usage.  The sub-commands live in softcxi.cli.device (init,
-- state, files, mbk, user, audit, db), softcxi.cli.keys (key, sign, verify,
-- encrypt, decrypt) and softcxi.cli.jobs (provision, rewrap, store); each is a
-- function(ctx) over the context built here: the parsed arguments, the
-- device session (opened and logged on on first use), stores and output.

local argparse = require "argparse"
local softcxi = require "softcxi"
local util = require "softcxi.cli.util"

local io, os, table, tostring, ipairs, pairs, pcall, xpcall, select, setmetatable =
    io, os, table, tostring, ipairs, pairs, pcall, xpcall, select, setmetatable

local _M = { _VERSION = softcxi._VERSION }

local DESCRIPTION = [[
softcxi: a software HSM for unmanaged keys. The device is a state directory
(--device, default $SOFTCXI_DEVICE or ./hsm); external keys are MBK-sealed blobs
kept in files or a key store (file:DIR, redis://..., redis-cluster://...).]]

local EPILOG = [[
Logon: commands that need a session log on as --user (default $SOFTCXI_USER,
else ADMIN) with the password from --password-file, $SOFTCXI_PASSWORD or a
prompt, or with --keyfile (a signed challenge). Give --user twice, each with
its --password-file or --keyfile, for dual control.

Exit status: 0 ok, 1 failure (one line on stderr), 2 usage error.
Run 'softcxi COMMAND --help' for a command's options and examples.]]

-- ---- the context ------------------------------------------------------------

local Ctx = {}
Ctx.__index = Ctx

--- A line of human output (not with --json or --quiet).
function Ctx:say(fmt, ...)
    if self.args.json or self.args.quiet then return end
    io.stdout:write(select("#", ...) > 0 and fmt:format(...) or fmt, "\n")
end

--- A note on stderr (not with --quiet): warnings, hints.
function Ctx:note(fmt, ...)
    if self.args.quiet then return end
    io.stderr:write("softcxi: ", select("#", ...) > 0 and fmt:format(...) or fmt, "\n")
end

--- Report a result: as one JSON document with --json, else through human().
function Ctx:report(doc, human)
    if self.args.json then
        io.stdout:write(util.json(doc), "\n")
    elseif not self.args.quiet and human then
        human(function(fmt, ...)
            io.stdout:write(select("#", ...) > 0 and fmt:format(...) or fmt, "\n")
        end)
    end
end

function Ctx:device_path()
    return self.args.device or os.getenv("SOFTCXI_DEVICE") or "./hsm"
end

function Ctx:device_key()
    return self.args.device_key or os.getenv("SOFTCXI_DEVICE_KEY")
end

--- The device, opened once (no logon).
function Ctx:device()
    if self.hsm then return self.hsm end
    local path = self:device_path()
    local hsm, err, code = softcxi.open{ path = path, keyfile = self:device_key() }
    if not hsm then
        if code == "ENOTFOUND" then
            util.die("device " .. path .. ": no device there: create one with 'softcxi init' "
                .. "(or give --device DIR)")
        end
        util.check("device " .. path, nil, err, code)
    end
    self.hsm = hsm
    if self.policy then
        util.check("policy", hsm:set_policy(self.policy))
    end
    return hsm
end

--- The device with the users of --user logged on (once).
function Ctx:session()
    local hsm = self:device()
    if self.logged_on then return hsm end
    -- pair each credential with its user
    local users, default = {}, { name = os.getenv("SOFTCXI_USER") or "ADMIN" }
    for _, o in ipairs(self.args.logon or {}) do
        if o.kind == "user" then
            users[#users + 1] = { name = o.value }
        else
            local u = users[#users] or default
            if #users == 0 and default.used == nil then users[1], default.used = default, true end
            if u.password or u.key then
                util.usage("user " .. u.name .. ": one --password-file or --keyfile each")
            end
            u[o.kind] = o.value
        end
    end
    if #users == 0 then users[1] = default end
    for _, u in ipairs(users) do
        local ok, err, code
        if u.key then
            ok, err, code = hsm:logon_sign(u.name, u.key)
        else
            local pw = util.password("user " .. u.name, u.password,
                #users == 1 and "SOFTCXI_PASSWORD" or nil)
            ok, err, code = hsm:logon_pass(u.name, pw)
            pw = nil -- luacheck: ignore (dropped as soon as used)
        end
        util.check("logon as '" .. u.name .. "'", ok, err, code)
    end
    self.logged_on = true
    return hsm
end

--- A key store by URL, opened once per URL and closed at exit.
function Ctx:store(url)
    if not url then util.usage("give --store URL (file:DIR, redis://HOST:PORT/DB, redis-cluster://...)") end
    self.stores = self.stores or {}
    if self.stores[url] then return self.stores[url] end
    local store, err, code = require("softcxi.store").open(url)
    util.check("store " .. url, store, err, code)
    self.last_store = store
    if self.policy then
        -- every write is checked by the policy's on_store first
        store = require("softcxi.policy").wrap_store(store, self.policy)
    end
    self.stores[url] = store
    return store
end

function Ctx:close()
    for _, s in pairs(self.stores or {}) do pcall(s.close, s) end
    if self.hsm then pcall(self.hsm.close, self.hsm) end
end

-- ---- the parser ---------------------------------------------------------------

local function build_parser()
    local p = argparse("softcxi", DESCRIPTION, EPILOG)
        :command_target("command")
        :help_max_width(80)
        :add_help_command()
    p:option("--device", "Device state directory (default $SOFTCXI_DEVICE, else ./hsm).")
        :argname("DIR")
    p:option("--device-key", "Device key file, if not in its default place "
        .. "(~/.config/softcxi/devices/ID.key); default $SOFTCXI_DEVICE_KEY.")
        :argname("FILE")
    -- The logon options in command-line order: a --password-file or --keyfile
    -- belongs to the --user before it (or, before any, to the default user).
    local function logon_arg(kind)
        return function(result, target, value)
            result[target] = result[target] or {}
            table.insert(result[target], value)
            result.logon = result.logon or {}
            table.insert(result.logon, { kind = kind, value = value })
        end
    end
    p:option("-u --user", "Log on as NAME (repeat for dual control; default $SOFTCXI_USER, "
        .. "else ADMIN).")
        :argname("NAME"):count("*"):target("users"):action(logon_arg("user"))
    p:option("--password-file", "Read the password of the --user before it from FILE's first line.")
        :argname("FILE"):count("*"):target("password_files"):action(logon_arg("password"))
    p:option("--keyfile", "Log on the --user before it with the private key (PEM, EC P-256 "
        .. "or Ed25519) in FILE instead of a password.")
        :argname("FILE"):count("*"):target("keyfiles"):action(logon_arg("key"))
    p:option("--policy", "Policy script (Lua) checked before key generation, use and export.")
        :argname("FILE")
    p:flag("--json", "Print results as one JSON document.")
    p:flag("-q --quiet", "Print nothing but errors.")
    p:flag("--version", "Print the version and exit.")
        :action(function() print("softcxi " .. softcxi._VERSION) os.exit(0) end)

    local handlers = {}
    --- cmd(parent, name, summary, run [, description]) -> the command's parser.
    -- run(ctx) carries it out; parents without run group sub-commands.
    local function cmd(parent, name, summary, run, epilog)
        local c = parent:command(name, summary, epilog)
        c:summary(summary)
        if run then
            handlers[c] = run
        else
            c:command_target("sub_" .. name)
        end
        return c
    end
    require("softcxi.cli.device")(p, cmd)
    require("softcxi.cli.keys")(p, cmd)
    require("softcxi.cli.jobs")(p, cmd)
    return p, handlers
end

-- the handler of the command line parsed, found through the command targets
-- ("command" at the top, "sub_NAME" below a group)
local function find_handler(p, handlers, args)
    local parser, chosen = p, args.command
    while chosen do
        local found
        for _, c in ipairs(parser._commands) do
            if c._name == chosen then found = c break end
        end
        if not found then return nil end
        if handlers[found] then return handlers[found] end
        parser, chosen = found, args["sub_" .. found._name]
    end
    return nil
end

-- the parser of the deepest command named on a command line (for its usage)
local function deepest(p, argv)
    local parser = p
    for _, word in ipairs(argv) do
        for _, c in ipairs(parser._commands) do
            if c._name == word then parser = c break end
        end
    end
    return parser
end

local function traceback(e)
    if util.is_failure(e) then return e end
    return debug.traceback(tostring(e), 2)
end

--- Run the command line argv (a list of strings); returns the exit status.
function _M.main(argv)
    local p, handlers = build_parser()
    local ok, args = p:pparse(argv)
    if not ok then
        io.stderr:write(deepest(p, argv):get_usage(), "\n\nsoftcxi: ", tostring(args), "\n")
        return 2
    end
    local run = find_handler(p, handlers, args)
    if not run then
        io.stderr:write(p:get_usage(), "\n\nsoftcxi: missing sub-command\n")
        return 2
    end
    local ctx = setmetatable({ args = args }, Ctx)
    local status = 0
    local done, err = xpcall(function()
        if args.policy then
            -- a policy that keeps state (a quota) keeps it in the store of the command
            local policy = require "softcxi.policy"
            ctx.policy = util.check("policy " .. args.policy, policy.load(args.policy,
                { store = function() return ctx.last_store end }))
        end
        status = run(ctx) or 0
    end, traceback)
    ctx:close()
    if not done then
        if util.is_failure(err) then
            io.stderr:write("softcxi: ", err.msg, "\n")
            return err.status
        end
        io.stderr:write("softcxi: internal error: ", tostring(err), "\n")
        return 1
    end
    return status
end

_M.parse_time = util.parse_time

return _M
