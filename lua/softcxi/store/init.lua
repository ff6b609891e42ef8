-- softcxi.store: where blobs live.  One interface, several backends,
-- opened by URL:
--
--   local store = require "softcxi.store"
--   local s = assert(store.open("file:./keystore"))
--   local s = assert(store.open("redis://[user:password@]127.0.0.1:6379/0?prefix=keys:"))
--   local s = assert(store.open("redis+unix:///run/redis/redis.sock?db=0&prefix=keys:"))
--   local s = assert(store.open("redis-cluster://127.0.0.1:7000,127.0.0.1:7001"))
--   local s = assert(store.open("postgres://app@127.0.0.1:5432/keys?table=keys"))
--   local s = assert(store.open("sqlite:./keys.db"))
--
-- Every backend implements (docs/stores.md has the contract in full):
--   s:put(id, blob [, opts])   -> true            opts.overwrite, opts.if_match = old_blob
--   s:get(id)                  -> blob
--   s:delete(id)               -> true
--   s:put_many(items [, opts]) -> n               items: { {id=, blob=}, ... } (id may be nil)
--   s:get_many(ids)            -> { [id] = blob } (missing ids absent)
--   s:find(filter [, cursor [, limit]]) -> ids, next_cursor   filter: group/name/specifier/algo
--   s:scan([cursor [, count]]) -> ids, next_cursor (nil when done)
--   s:count()                  -> n
--   s:close()
-- Failures return nil, message, code (EINVAL, EFORMAT, EEXIST, ENOTFOUND,
-- ECONFLICT, EIO, ECONN); the message names the id.  CXI's host-side
-- KeyStore maps onto it: insertKey -> put, getKey -> get, findKey -> find,
-- deleteKey -> delete.

local softcxi = require "softcxi"

local type, tostring, tonumber, pairs, require = type, tostring, tonumber, pairs, require
local key_info = softcxi.key_info

local _M = { _VERSION = softcxi._VERSION }

--- The id a blob is stored under by default: group/name[/specifier], the
-- address the device's internal key database uses.
local function id_from(info)
    if not info.name or info.name == "" then
        return nil, "store: a blob without a name needs an explicit id", "EINVAL"
    end
    local id = (info.group or "") .. "/" .. info.name
    if info.specifier then id = id .. "/" .. info.specifier end
    return id, info
end

function _M.id_of(blob)
    local info, err, code = key_info(blob)
    if not info then return nil, err, code end
    return id_from(info)
end

--- Check that blob is a well-formed key blob (its attributes parse) and
-- find its id when none is given.  Returns id, info or nil, err, code.
function _M.check(id, blob, fn)
    if type(blob) ~= "string" then
        error(fn .. ": blob must be a string", 3)
    end
    local info, err, code = key_info(blob)
    if not info then
        return nil, fn .. ": " .. (id and ("'" .. tostring(id) .. "': ") or "") .. err, code
    end
    if id == nil then
        local derived, why, c = id_from(info) -- parsed once above
        if not derived then return nil, fn .. ": " .. why, c end
        id = derived
    end
    if type(id) ~= "string" or id == "" then
        error(fn .. ": id must be a non-empty string", 3)
    end
    return id, info
end

-- ---- misuse checks the backends share (they raise) ----------------------------

--- opts (nil, or a table of allowed keys) -> opts or {}.  Raises at level
-- (default 3: the caller of the store method that called this).
function _M.check_opts(fn, opts, allowed, level)
    level = level or 3
    if opts == nil then return {} end
    if type(opts) ~= "table" then error(fn .. ": opts must be a table", level) end
    for k in pairs(opts) do
        if not allowed[k] then error(fn .. ": unknown option '" .. tostring(k) .. "'", level) end
    end
    return opts
end

function _M.check_id(fn, id)
    if type(id) ~= "string" or id == "" then error(fn .. ": id must be a non-empty string", 3) end
end

--- The arguments of a put_many: items an array, opts of allowed keys, chunk a
-- positive integer (opts.chunk or default_chunk), on_chunk a function or nil.
-- Returns opts, chunk, on_chunk; raises at the level of put_many's caller.
function _M.put_many_args(fn, items, opts, allowed, default_chunk)
    if type(items) ~= "table" then error(fn .. ": items must be an array of { id =, blob = }", 3) end
    opts = _M.check_opts(fn, opts, allowed, 4)
    local chunk = opts.chunk or default_chunk
    if type(chunk) ~= "number" or chunk < 1 or chunk ~= math.floor(chunk) then
        error(fn .. ": chunk must be a positive integer", 3)
    end
    local on_chunk = opts.on_chunk
    if on_chunk ~= nil and type(on_chunk) ~= "function" then
        error(fn .. ": on_chunk must be a function", 3)
    end
    return opts, chunk, on_chunk
end

--- Does a blob's clear attribute set match a find filter?
function _M.matches(info, filter)
    for k, v in pairs(filter) do
        local have = info[k]
        if k == "specifier" then v = tonumber(v) end
        if have ~= v then return false end
    end
    return true
end

local schemes = {
    file = "softcxi.store.file",
    redis = "softcxi.store.redis",
    ["redis+unix"] = { "softcxi.store.redis", "open_unix" },
    ["redis-cluster"] = "softcxi.store.redis_cluster",
    postgres = "softcxi.store.sql", postgresql = "softcxi.store.sql", sqlite = "softcxi.store.sql",
}

--- Open a store by URL.  opts are passed to the backend.
function _M.open(url, opts)
    if type(url) ~= "string" then
        error("store.open: url must be a string", 2)
    end
    local scheme, rest = url:match("^([%a][%w%-%+]*):(.*)$")
    local mod = scheme and schemes[scheme]
    if not mod then
        -- never the password of a mistyped URL
        return nil, "store.open: unknown store URL '" .. (url:gsub("//.*@", "//***@"))
            .. "' (file:DIR, redis://HOST:PORT/DB, redis+unix:///SOCKET, redis-cluster://HOST:PORT,...,"
            .. " postgres://USER@HOST/DB, sqlite:FILE)", "EINVAL"
    end
    if type(mod) == "table" then return require(mod[1])[mod[2]](rest, opts or {}, url) end
    return require(mod).open(rest, opts or {}, url)
end

return _M
