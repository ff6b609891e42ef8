-- softcxi.policy: policy scripts.  A policy is a Lua file returning a table
-- of hooks; a session given one consults it before every key call.
--
--   local policy = require "softcxi.policy"
--   local pol = assert(policy.load("policies/fleet.lua", { store = store }))
--   local hsm = assert(softcxi.open{ path = "./hsm", policy = pol })  -- or hsm:set_policy(pol)
--   local blob, err, code = hsm:key_generate(softcxi.FLAG_EXTERNAL, template)
--   -- code == "EPOLICY": err says which policy denied it, and why
--
-- Hooks (every one optional; docs/policy.md has the contract in full):
--   on_generate(t, ctx)   key_generate, bulk_generate, key_import: t is a copy of
--                         the template; return true, or a table (the amended template)
--   on_use(key, ctx)      sign, verify, bulk_sign, mac, mac_verify, encrypt, decrypt,
--                         secret_agree: key is the blob's info table
--   on_export(key, ctx)   key_export, key_backup
--   on_logon(user, ctx)   logon_pass, logon_sign: user is the name (never the secret)
--   on_store(id, key, ctx)  store writes through policy.wrap_store / pol:check_store
-- A hook allows with `return true`; it denies with `return false, "reason"` (or
-- nil, "reason"); anything else, or an error it raises, is a denial too, and
-- the message says what happened.  Denials come back as nil, message, "EPOLICY".
--
-- The hard rules bound into a blob (group, usage, export policy, expiry) are
-- the C core's; a policy adds the soft ones (which templates, names, lifetimes,
-- quotas, who may log on when).  It runs in the calling process, before the
-- device call.

local core = require "softcxi.core"

local type, error, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, pcall =
    type, error, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, pcall
local os_time, io_open = os.time, io.open
local string_format, string_byte, string_gsub, string_sub =
    string.format, string.byte, string.gsub, string.sub
local table_concat = table.concat
local key_info = core.key_info

local _M = { _VERSION = core._VERSION }
local mt = { __index = _M }

local HOOKS = { on_generate = true, on_use = true, on_export = true, on_logon = true,
                on_store = true }
local HOOK_LIST = "on_generate, on_use, on_export, on_logon, on_store"
local POLICY_OPTS = { name = true, store = true, clock = true, params = true }

-- ---- building policies -----------------------------------------------------------

local function is_policy(p)
    return getmetatable(p) == mt
end
_M.is_policy = is_policy

-- Check a hooks table; returns nil or a message naming the bad field.
local function hooks_problem(t)
    if type(t) ~= "table" then
        return "must return a table of hooks (" .. HOOK_LIST .. "), not a " .. type(t)
    end
    for k, v in pairs(t) do
        if type(k) == "string" and string_sub(k, 1, 3) == "on_" then
            if not HOOKS[k] then
                return "unknown hook '" .. k .. "' (hooks: " .. HOOK_LIST .. ")"
            end
            if type(v) ~= "function" then
                return "hook '" .. k .. "' must be a function, not a " .. type(v)
            end
        end
    end
    if t.name ~= nil and type(t.name) ~= "string" then
        return "field 'name' must be a string"
    end
    return nil
end

local function check_opts(opts, fn)
    if opts == nil then return {} end
    if type(opts) ~= "table" then error(fn .. ": options must be a table", 3) end
    for k in pairs(opts) do
        if not POLICY_OPTS[k] then error(fn .. ": unknown option '" .. tostring(k) .. "'", 3) end
    end
    if opts.name ~= nil and type(opts.name) ~= "string" then
        error(fn .. ": name must be a string", 3)
    end
    local s = opts.store
    if s ~= nil and type(s) ~= "table" and type(s) ~= "function" then
        error(fn .. ": store must be a store or a function returning one", 3)
    end
    if opts.clock ~= nil and type(opts.clock) ~= "function" then
        error(fn .. ": clock must be a function returning Unix seconds", 3)
    end
    return opts
end

local function make(parts, opts, config)
    -- Which hooks any part has: a session call whose hook no part has skips
    -- the policy altogether (no attribute parsing, no context).
    local has = {}
    for _, part in ipairs(parts) do
        for hook in pairs(HOOKS) do
            if part.hooks[hook] then has[hook] = true end
        end
    end
    return setmetatable({
        name = opts.name or (#parts == 1 and parts[1].name) or "policy",
        parts = parts,           -- { { name =, hooks = }, ... }, consulted in order
        has = has,               -- hook name -> true when a part has it
        config = config,         -- the table the policy file returned (its own data too)
        store = opts.store,      -- a store, or a function returning the one to use now
        clock = opts.clock or os_time,
    }, mt)
end

--- policy.new(hooks [, opts]) -> policy.  hooks: the table a policy file
-- returns.  opts: name (for messages), store (a store or a function giving
-- the store to use at each call: ctx.store), clock (a function returning
-- Unix seconds: ctx.now; default os.time).  A bad table raises.
function _M.new(hooks, opts)
    opts = check_opts(opts, "policy.new")
    local why = hooks_problem(hooks)
    if why then error("policy.new: the hooks table " .. why:gsub("^must return", "must be"), 2) end
    return make({ { name = opts.name or hooks.name or "policy", hooks = hooks } }, opts, hooks)
end

--- policy.load(file [, opts]) -> policy | nil, message, code.  Runs the
-- file (text only, in its own environment whose reads fall through to the
-- globals) with opts.params as its `...`, and checks what it returns.  A
-- missing file is ENOTFOUND; a syntax error, an error while it runs or a
-- bad hooks table is EINVAL, the message naming file and line.  opts as in
-- policy.new; the name defaults to the file's base name.
function _M.load(file, opts)
    if type(file) ~= "string" then error("policy.load: file must be a string", 2) end
    opts = check_opts(opts, "policy.load")
    local f, err = io_open(file, "rb")
    if not f then
        return nil, "policy.load: " .. tostring(err), "ENOTFOUND"
    end
    f:close()
    local env = setmetatable({}, { __index = _G })
    local chunk
    chunk, err = loadfile(file, "t", env)
    if not chunk then
        err = tostring(err)
        if not err:find(file, 1, true) then err = file .. ": " .. err end
        return nil, "policy.load: " .. err, "EINVAL"
    end
    local ok, hooks = pcall(chunk, opts.params)
    if not ok then
        return nil, "policy.load: " .. file .. ": error while loading: " .. tostring(hooks), "EINVAL"
    end
    if is_policy(hooks) then -- a file may build its policy with policy.combine
        local o = {}
        for k, v in pairs(opts) do o[k] = v end
        o.name = o.name or hooks.name
        return make(hooks.parts, o, hooks.config)
    end
    local why = hooks_problem(hooks)
    if why then return nil, "policy.load: " .. file .. ": " .. why, "EINVAL" end
    local name = opts.name or hooks.name or (string_gsub(file, "^.*/", ""))
    return make({ { name = name, hooks = hooks } }, { name = name, store = opts.store,
        clock = opts.clock }, hooks)
end

--- policy.combine({ p1, p2, ... } [, opts]) -> policy.  Each pi is a policy
-- or a hooks table.  Every hook of every part runs, in order; the first
-- denial wins; on_generate amendments feed the next part.
function _M.combine(list, opts)
    opts = check_opts(opts, "policy.combine")
    if type(list) ~= "table" then error("policy.combine: expects a list of policies", 2) end
    local parts = {}
    for i, p in ipairs(list) do
        if is_policy(p) then
            for _, part in ipairs(p.parts) do parts[#parts + 1] = part end
        else
            local why = hooks_problem(p)
            if why then
                error("policy.combine: entry " .. i .. " " .. why:gsub("^must return", "must be"), 2)
            end
            parts[#parts + 1] = { name = p.name or ("part " .. i), hooks = p }
        end
    end
    local names = {}
    for i, part in ipairs(parts) do names[i] = part.name end
    opts.name = opts.name or table_concat(names, "+")
    return make(parts, opts, nil)
end

-- ---- consulting a policy -------------------------------------------------------

local function copy(v)
    if type(v) ~= "table" then return v end
    local c = {}
    for k, x in pairs(v) do c[k] = copy(x) end
    return c
end

-- The context handed to a hook: the caller's fields, plus now and store.
function _M:_ctx(ctx)
    local c = {}
    if ctx then for k, v in pairs(ctx) do c[k] = v end end
    if c.now == nil then c.now = self.clock() end
    if c.store == nil then
        local s = self.store
        if type(s) == "function" then s = s() end
        c.store = s
    end
    c.policy = self.name
    return c
end

local function subject(key)
    if type(key) ~= "table" or not key.name or key.name == "" then return "" end
    local s = (key.group or "") .. "/" .. key.name
    if key.specifier then s = s .. "/" .. key.specifier end
    return "'" .. s .. "': "
end

-- Run one hook; returns true, value | false, message.
local function decide(part, hook, fn, what, amend, ...)
    local ok, r, reason = pcall(part.hooks[hook], ...)
    if not ok then
        return false, string_format("%s: %spolicy '%s' failed in %s (treated as a denial): %s",
            fn, what, part.name, hook, tostring(r))
    end
    if r == true then return true end
    if amend and type(r) == "table" then return true, r end
    if r == false or r == nil then
        if type(reason) == "string" and reason ~= "" then
            return false, string_format("%s: %sdenied by policy '%s': %s", fn, what, part.name,
                reason)
        end
        return false, string_format("%s: %sdenied by policy '%s' (%s gave no reason%s)", fn, what,
            part.name, hook, r == nil and "; return true to allow" or "")
    end
    return false, string_format("%s: %spolicy '%s': %s returned a %s (treated as a denial; "
        .. "return true%s or false, reason)", fn, what, part.name, hook, type(r),
        amend and ", a template table" or "")
end

-- Consult every part's hook; true | nil, message, "EPOLICY".
local function consult(self, hook, fn, what, ...)
    for _, part in ipairs(self.parts) do
        if part.hooks[hook] then
            local ok, msg = decide(part, hook, fn, what, false, ...)
            if not ok then return nil, msg, "EPOLICY" end
        end
    end
    return true
end

--- pol:check_generate(template [, ctx]) -> template | nil, message, "EPOLICY".
-- The template to generate with: a copy, amended by the on_generate hooks.
-- ctx.op defaults to "key_generate".
function _M:check_generate(template, ctx)
    if type(template) ~= "table" then error("check_generate: template must be a table", 2) end
    local c = self:_ctx(ctx)
    c.op = c.op or "key_generate"
    local t = copy(template)
    local what = subject(t)
    for _, part in ipairs(self.parts) do
        if part.hooks.on_generate then
            local ok, r = decide(part, "on_generate", c.op, what, true, t, c)
            if not ok then return nil, r, "EPOLICY" end
            if r ~= nil then t = copy(r) end
        end
    end
    return t
end

local function info_of(key, fn)
    if type(key) == "table" then return key end
    if type(key) ~= "string" then error(fn .. ": key must be a blob or an info table", 3) end
    return key_info(key)
end

--- pol:check_use(key, ctx) -> true | nil, message, code.  key: a blob or its
-- info table; ctx.op: the operation ("sign", ...), ctx.mech, ctx.count.
function _M:check_use(key, ctx)
    local info, err, code = info_of(key, "check_use")
    if not info then return nil, err, code end
    local c = self:_ctx(ctx)
    c.op = c.op or "use"
    c.count = c.count or 1
    c.id = c.id or _M.id_of(info)
    return consult(self, "on_use", c.op, subject(info), info, c)
end

--- pol:check_export(key, ctx) -> true | nil, message, code (ctx.op:
-- "key_export" or "key_backup").
function _M:check_export(key, ctx)
    local info, err, code = info_of(key, "check_export")
    if not info then return nil, err, code end
    local c = self:_ctx(ctx)
    c.op = c.op or "key_export"
    c.id = c.id or _M.id_of(info)
    return consult(self, "on_export", c.op, subject(info), info, c)
end

--- pol:check_logon(user [, ctx]) -> true | nil, message, "EPOLICY".
function _M:check_logon(user, ctx)
    if type(user) ~= "string" then error("check_logon: user must be a string", 2) end
    local c = self:_ctx(ctx)
    c.op = c.op or "logon_pass"
    return consult(self, "on_logon", c.op, "user '" .. user .. "': ", user, c)
end

--- The default id of a key: group/name[/specifier] (softcxi.store's).
function _M.id_of(info)
    if not info.name or info.name == "" then return nil end
    local id = (info.group or "") .. "/" .. info.name
    if info.specifier then id = id .. "/" .. info.specifier end
    return id
end

--- pol:check_store(id, blob [, ctx]) -> true | nil, message, code.  Also
-- policy.check_store(pol, id, blob).  id nil: the blob's default id.  blob
-- nil with ctx.op = "delete": a deletion.  A blob that does not parse is
-- returned as the parser's error (EFORMAT).
function _M:check_store(id, blob, ctx)
    local c = self:_ctx(ctx)
    c.op = c.op or (blob == nil and "delete" or "put")
    local info
    if blob ~= nil then
        local err, code
        info, err, code = info_of(blob, "check_store")
        if not info then return nil, "store." .. c.op .. ": " .. err, code end
        id = id or _M.id_of(info)
    end
    if type(id) ~= "string" then
        return nil, "store." .. c.op .. ": no id (a blob without a name needs one)", "EINVAL"
    end
    return consult(self, "on_store", "store." .. c.op, "'" .. id .. "': ", id, info, c)
end

-- ---- a store that asks the policy first ----------------------------------------

--- policy.wrap_store(store, pol) -> a store whose put, put_many and delete
-- consult pol's on_store first (a denial is nil, message, "EPOLICY" and
-- nothing is written: put_many checks every item before writing any).
-- Every other method is the store's own.
function _M.wrap_store(store, pol)
    if type(store) ~= "table" then error("policy.wrap_store: store must be a store", 2) end
    if not is_policy(pol) then error("policy.wrap_store: pol must be a policy", 2) end
    local w = { inner = store, policy = pol }
    function w.put(_, id, blob, opts)
        local ok, err, code = pol:check_store(id, blob, { op = "put" })
        if not ok then return nil, err, code end
        return store:put(id, blob, opts)
    end
    function w.put_many(_, items, opts)
        if type(items) == "table" then
            for _, it in ipairs(items) do
                if type(it) == "table" and type(it.blob) == "string" then
                    local ok, err, code = pol:check_store(it.id, it.blob, { op = "put" })
                    if not ok then return nil, err, code, 0 end
                end
            end
        end
        return store:put_many(items, opts)
    end
    function w.delete(_, id)
        if type(id) == "string" then
            local ok, err, code = pol:check_store(id, nil, { op = "delete" })
            if not ok then return nil, err, code end
        end
        return store:delete(id)
    end
    return setmetatable(w, { __index = function(_, k)
        local v = store[k]
        if type(v) ~= "function" then return v end
        return function(self, ...)
            if self == w then self = store end
            return v(self, ...)
        end
    end })
end

-- ---- counters kept in a store (quotas) -------------------------------------------

local Counter = {}
Counter.__index = Counter

local function escape(s)
    return (string_gsub(s, "[^%w%.%-_]", function(ch) return string_format("%%%02X", string_byte(ch)) end))
end

-- File store: one small file per counter under DIR/policy/counters/<hh>/,
-- read and rewritten under an flock of its bucket.
local FileCounters = setmetatable({}, Counter)
FileCounters.__index = FileCounters

function FileCounters:_path(name)
    local sys = require "softcxi.sys"
    local h = string_format("%02x", sys.hash32(name) % 256)
    local e = escape(name)
    if #e > 200 then e = string_sub(e, 1, 120) .. "~" .. string_format("%08x", sys.hash32(e)) end
    return self.root .. "/" .. h .. "/" .. e, self.root .. "/" .. h .. ".lock", sys
end

function FileCounters:_update(name, fn)
    local path, lockpath, sys = self:_path(name)
    local lock, err, code = sys.flock(lockpath, "ex")
    if not lock then return nil, err, code end
    local data
    data, err, code = sys.read(path)
    if not data and code ~= "ENOTFOUND" then lock:unlock(); return nil, err, code end
    local cur = tonumber(data or "0") or 0
    local new = fn(cur)
    if new ~= cur then
        local ok
        ok, err, code = sys.write_durable(path, tostring(new))
        if not ok then lock:unlock(); return nil, err, code end
    end
    lock:unlock()
    return cur, new
end

function FileCounters:take(name, n, limit)
    local cur, new = self:_update(name, function(c)
        if limit and c + n > limit then return c end
        return c + n
    end)
    if not cur then return nil, new end
    if new == cur and n ~= 0 then return false, cur end
    return true, new
end

function FileCounters:get(name)
    local path, _, sys = self:_path(name)
    local data, err, code = sys.read(path)
    if not data then
        if code == "ENOTFOUND" then return 0 end
        return nil, err, code
    end
    return tonumber(data) or 0
end

function FileCounters:reset(name)
    local cur, err, code = self:_update(name, function() return 0 end)
    if not cur then return nil, err, code end
    return true
end

-- Redis and Redis Cluster stores: a string per counter under the store's prefix,
-- changed by one script (atomic on the server), sent through the store's transport.
local RedisCounters = setmetatable({}, Counter)
RedisCounters.__index = RedisCounters

local TAKE = [[
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local n, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if limit >= 0 and cur + n > limit then return {0, cur} end
return {1, redis.call('INCRBY', KEYS[1], n)}
]]

function RedisCounters:_call(argv, write)
    argv.key = argv[argv.keyat or 2]
    local res, err, code = self.t:pipeline({ argv }, write and { write = true } or { retry = true })
    local r = res and res[1]
    if r == nil then return nil, err or "no reply", code or "ECONN" end
    if type(r) == "table" and r.err then return nil, r.err, "EIO" end
    return r
end

function RedisCounters:take(name, n, limit)
    local key = self.P .. "policy:n:" .. name
    local r, err, code = self:_call({ "EVAL", TAKE, 1, key, n, limit or -1, keyat = 4 }, true)
    if not r then return nil, "policy.counter: " .. tostring(err), code end
    return r[1] == 1, tonumber(r[2])
end

function RedisCounters:get(name)
    local r, err, code = self:_call({ "GET", self.P .. "policy:n:" .. name })
    if r == nil then return nil, "policy.counter: " .. tostring(err), code end
    return tonumber(r) or 0
end

function RedisCounters:reset(name)
    local r, err, code = self:_call({ "DEL", self.P .. "policy:n:" .. name }, true)
    if r == nil then return nil, "policy.counter: " .. tostring(err), code end
    return true
end

--- policy.counter(store) -> counters | nil, message, code.  Counters kept
-- beside the blobs of a file, redis or redis-cluster store, for quotas:
--   c:take(name, n [, limit]) -> true, total | false, total (nothing taken:
--                                total + n would pass limit) | nil, msg, code
--   c:get(name) -> total;  c:reset(name) -> true
-- file: DIR/policy/counters/ (flock and a durable write per change: blocking,
-- not for nginx workers); redis: keys <prefix>policy:n:<name>, one atomic
-- script per take.
function _M.counter(store)
    if type(store) ~= "table" then
        return nil, "policy.counter: no store (give the policy one: policy.load(file, "
            .. "{ store = s }))", "EINVAL"
    end
    if store.inner and store.policy then store = store.inner end -- a wrap_store
    if type(store.transport) == "table" and type(store.P) == "string" then
        return setmetatable({ t = store.transport, P = store.P }, RedisCounters)
    end
    if type(store.dir) == "string" then
        return setmetatable({ root = store.dir .. "/policy/counters" }, FileCounters)
    end
    return nil, "policy.counter: this store keeps no counters (file:, redis:, redis-cluster: do)",
        "EINVAL"
end

-- ---- the session hook ------------------------------------------------------------

-- Sessions are userdata: their policies live here, weakly keyed.
local attached = setmetatable({}, { __mode = "k" })

--- The policy a session consults, or nil.
function _M.of(hsm)
    return attached[hsm]
end

local function names_of(n, opts)
    if type(opts) ~= "table" then return nil end
    if type(opts.names) == "table" then return opts.names end
    if type(opts.name_format) == "string" and type(n) == "number" then
        local first = (type(opts.start) == "number" and opts.start or 1) - 1
        local names = {}
        local ok = pcall(function()
            for i = 1, n do names[i] = string_format(opts.name_format, first + i) end
        end)
        if ok then return names end
    end
    return nil
end

--- Install the hook: softcxi.open{ policy = }, hsm:set_policy(pol),
-- hsm:get_policy(), and the key methods wrapped to consult the policy.
-- Called once by softcxi (init.lua) after its methods are defined.
function _M._attach(softcxi, methods)
    local c_check = methods._check
    local c_key_info = methods.key_info

    local orig_open = softcxi.open
    softcxi.open = function(opts)
        if type(opts) ~= "table" or opts.policy == nil then return orig_open(opts) end
        local pol = opts.policy
        if not is_policy(pol) then
            error("softcxi.open: policy must be a policy (softcxi.policy.load / .new)", 2)
        end
        local o = {}
        for k, v in pairs(opts) do if k ~= "policy" then o[k] = v end end
        local hsm, err, code = orig_open(o)
        if hsm then attached[hsm] = pol end
        return hsm, err, code
    end

    --- hsm:set_policy(pol | nil) -> true: the policy this session consults.
    function methods:set_policy(pol)
        c_check(self)
        if pol ~= nil and not is_policy(pol) then
            error("set_policy: expects a policy (softcxi.policy.load / .new) or nil", 2)
        end
        attached[self] = pol
        return true
    end

    function methods:get_policy()
        c_check(self)
        return attached[self]
    end

    -- The info of a blob (clear attributes: an edited attribute fails the
    -- device's tag check right after) or of a handle (through the device).
    local function key_of(self, blob)
        if type(blob) ~= "string" then return nil end
        if string_byte(blob, 1) == 0x49 then return c_key_info(self, blob) end
        return key_info(blob)
    end

    local function wrap_generate(op)
        local orig = methods[op]
        if not orig then return end
        methods[op] = function(self, flags, template, a, b, ...)
            local pol = attached[self]
            if not pol or not pol.has.on_generate or type(template) ~= "table" then
                return orig(self, flags, template, a, b, ...)
            end
            c_check(self, op) -- bulk_generate_start: beside the session's running jobs
            local ctx = { op = op, flags = flags, count = 1 }
            if op == "bulk_generate" or op == "bulk_generate_start" then
                ctx.count, ctx.names = a, names_of(a, b)
            end
            local t, err, code = pol:check_generate(template, ctx)
            if not t then return nil, err, code end
            return orig(self, flags, t, a, b, ...)
        end
    end

    local function wrap_keyed(op, check)
        local orig = methods[op]
        if not orig then return end
        local hook = check == "check_use" and "on_use" or "on_export"
        methods[op] = function(self, blob, a, b, ...)
            local pol = attached[self]
            if not pol or not pol.has[hook] then return orig(self, blob, a, b, ...) end
            c_check(self)
            local info, err, code = key_of(self, blob)
            if info then
                local ctx = { op = op, count = 1 }
                if check == "check_use" then
                    ctx.mech = a
                    if op == "bulk_sign" and type(b) == "table" then ctx.count = #b end
                else
                    ctx.args = { a, b, ... }
                end
                local ok
                ok, err, code = pol[check](pol, info, ctx)
                if not ok then return nil, err, code end
            elseif code and type(blob) == "string" and string_byte(blob, 1) == 0x49 then
                return nil, err, code -- a handle the device cannot resolve
            end
            return orig(self, blob, a, b, ...)
        end
    end

    local function wrap_logon(op)
        local orig = methods[op]
        if not orig then return end
        methods[op] = function(self, user, ...)
            local pol = attached[self]
            if not pol or not pol.has.on_logon or type(user) ~= "string" then
                return orig(self, user, ...)
            end
            c_check(self)
            local ok, err, code = pol:check_logon(user, { op = op })
            if not ok then return nil, err, code end
            return orig(self, user, ...)
        end
    end

    for _, op in ipairs { "key_generate", "bulk_generate", "bulk_generate_start", "key_import" } do
        wrap_generate(op)
    end
    for _, op in ipairs { "sign", "verify", "bulk_sign", "mac", "mac_verify", "encrypt", "decrypt",
                          "secret_agree" } do
        wrap_keyed(op, "check_use")
    end
    for _, op in ipairs { "key_export", "key_backup" } do wrap_keyed(op, "check_export") end
    for _, op in ipairs { "logon_pass", "logon_sign" } do wrap_logon(op) end
end

return _M
