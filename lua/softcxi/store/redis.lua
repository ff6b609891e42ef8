-- softcxi.store.redis: key blobs in one Redis server.
--
--   local store = require "softcxi.store"
--   local s = assert(store.open("redis://[user:password@]127.0.0.1:6379/0?prefix=keys:"))
--
-- URL query (each may also come as a field of store.open's opts, which wins):
--   prefix=softcxi:      every key starts with it (ACL key patterns: ~prefix*)
--   timeout=2            seconds, for connect and for every reply
--   wait_replicas=0      after each write, WAIT until this many replicas have it
--   wait_timeout_ms=1000 how long WAIT may block; fewer acks -> EREPL
--   chunk=1000           items per pipeline in put_many
--   algo_index=0         1: a set of ids per algo (find{ algo = } reads it); 0: none, and
--                        find{ algo = } reads the blobs (fixed when the store is made)
--   name_index=other     which keys get a name index entry: all (every key with a name),
--                        or other (those stored under an id other than their default id
--                        group/name[/specifier]; find{ name = } looks the default ids up
--                        instead; fixed when the store is made; one Redis only)
--   transport=auto       hiredis (plain Lua) or resty (cosockets, inside nginx); auto picks
--
-- Layout under the prefix P (docs/stores.md):
--   P k:<id>                   the blob, a Redis string
--   P nx:<h>                   the name index: a hash of id -> name for the names whose
--                              hash falls in bucket h (of name_buckets, default 16)
--   P idx:<field>:<value>      a set of ids per attribute value (specifier, group; algo
--                              when the store keeps an algo index, algo_index=1)
--   P n                        how many blobs the store holds (kept by the write scripts)
--   P name-buckets             name_buckets, recorded when the store is first opened
--   P algo-index               1 or 0 (algo_index), recorded with name-buckets; absent in
--                              a store made before it: that one has algo sets
--   P name-index               all or other (name_index), recorded with name-buckets;
--                              absent in a store made before it: all
--   P default-ids              name_index=other: the groups and specifiers of the keys
--                              stored under their default id, a set of group\0specifier
--                              (find{ name = X } tests <group>/X[/<specifier>] for each)
-- Every write is a Lua script run by Redis (EVALSHA): it checks the current value (absent
-- for a plain put, equal to what the caller expects for if_match, overwrite and delete),
-- writes or deletes the blob, updates the index sets and the counter; one call writes up
-- to SCRIPT_ITEMS keys.  Redis runs a script atomically, so a blob and its index entries
-- never disagree, whatever else runs.
--
-- The same code serves the Redis Cluster store (redis_cluster.lua): a store is a layout (how
-- ids map to keys: here one bucket and no hash tag) over a transport (here one node; there a
-- router that sends each command to the node owning its key's slot).  Nodes come from a
-- transport module (redis_transport.lua: hiredis or resty); what the store needs of t:
--   t:pipeline(cmds [, {retry=, write=}]) -> res [, msg, code]
--        cmds[i] is an argv array with .key (routing key); res[i] is the reply, { err = text }
--        for a Redis error, or nil when no reply came (msg, code then say why: ECONN);
--        retry = resend once on a fresh connection after ECONN (idempotent commands only)
--   t:nodes() -> { node, ... }   the masters, each with :pipeline (SCAN runs per node)
--   t:wait(n, ms) -> fewest replicas that acknowledged the writes since the last wait
--   t:close()

local softcxi = require "softcxi"
local store = require "softcxi.store"
local transport = require "softcxi.store.redis_transport"

local unpack, select, pcall = table.unpack or unpack, select, pcall -- luacheck: ignore 143
local type, tostring, tonumber, pairs, ipairs, setmetatable, error =
    type, tostring, tonumber, pairs, ipairs, setmetatable, error
local string_format, string_char, string_byte = string.format, string.char, string.byte
local table_remove = table.remove
local coroutine_create, coroutine_resume, coroutine_status, coroutine_yield =
    coroutine.create, coroutine.resume, coroutine.status, coroutine.yield
local math_floor, math_min, math_max = math.floor, math.min, math.max
local key_info, check = softcxi.key_info, store.check
local core = require "softcxi.core"
local key_check, same_index = core.key_check, core.same_index
-- the four attributes the store indexes, parsed and checked as key_info does, in a table
-- of four fields rather than key_info's sixteen: put_many checks every blob it writes with
-- it (scans check with key_check, and swap_later with same_index: no table at all)
local key_attrs = require("softcxi.core").key_attrs or key_info

local _M = { _VERSION = softcxi._VERSION }
local mt = { __index = _M }

-- Indexed attributes, in the order find prefers to scan them (most selective first).
local FIELDS = { "name", "specifier", "group", "algo" }
-- the fields with index entries in a store made without an algo index (algo_index=0, the
-- default since 2026-11-27 night): find{ algo = } reads the blobs instead
local FIELDS_NO_ALGO = { "name", "specifier", "group" }
local INDEXED = { name = true, specifier = true, group = true, algo = true }

-- The name index: NAME_BUCKETS hashes by default (id -> name), the bucket of a name picked
-- by name_bucket.  16 large hashes let put_many write a slice's names with a few HSETs in
-- one transaction (fast_slice); a store made with many buckets (65,536 hashes of a few
-- dozen names each: the compact listpack encoding, ~7% less memory) takes the scripts,
-- about twice the server CPU per new key (docs/stores.md, docs/scaling.md).
local NAME_BUCKETS = 16
local MAX_NAME_BUCKETS = 16777216

local MAX_RACE = 16      -- read-then-compare-and-set rounds before giving up (ECONFLICT)
local MAX_ROUNDS = 64    -- server round trips one find/scan call may make
local MAX_WINDOW = 32    -- buckets find asks for in one pipeline
local GET_CHUNK = 1000   -- GETs per pipeline in get_many / scan

local RETRY = { retry = true }
local WRITE = { write = true }

-- ---- scripts ---------------------------------------------------------------

-- The name index, inside the scripts.  The hash h (P nx:<bucket of name>) has a field per
-- name: the one id with that name, or '' when several ids share it, which are then the
-- members of the set s (P idx:name:<name>, declared by the caller as a key of the call).
-- A name usually belongs to one key: a field, no Redis key of its own.
local NAME_OPS = [[
local function name_join(h, s, name, id)
  if redis.call('HSETNX', h, name, id) == 1 then return end
  local v = redis.call('HGET', h, name)
  if v == id then return end
  if v == '' then
    redis.call('SADD', s, id)
  else
    redis.call('SADD', s, v, id)
    redis.call('HSET', h, name, '')
  end
end
local function name_leave(h, s, name, id)
  local v = redis.call('HGET', h, name)
  if v == id then
    redis.call('HDEL', h, name)
  elseif v == '' then
    redis.call('SREM', s, id)
    local left = redis.call('SCARD', s)
    if left == 0 then
      redis.call('HDEL', h, name)
    elseif left == 1 then
      local last = redis.call('SPOP', s)
      if last == '' then redis.call('HDEL', h, name) else redis.call('HSET', h, name, last) end
    end
  end
end
]]

-- One script call writes a batch of items (put_many's chunk, or put's one item), all in
-- one bucket: in a cluster its keys share one slot.
-- KEYS: the counter, m index keys (a set; for a name, its hash and its set), then the n
-- items' blob keys.
-- ARGV: m, n; per item: id, blob, expected, how -- "a": must be absent (one SET NX);
--       "b"/"f": the stored value must equal expected, a key blob / foreign bytes (a GET,
--       then a SET); then per index entry: its kind ("s": a set, one key; "h<name>": the
--       name's index hash and set, two keys), the count and ids that leave it, the count
--       and ids that join it (only items written take effect).
-- Returns one result per item: 1 (written), 0 ("a": the key exists, whatever it holds),
-- -1 (absent), -2 (differs), -3 (holds another type).
-- The set updates go out once per set (SREM/SADD with many members), the name index
-- entries one by one (name_leave, name_join), the counter once per call by GET and SET.
-- Item ids of one call are distinct (write_cmds); an id never both leaves and joins one
-- entry, but two names of a call may share a hash: every leave goes before any join.
local WRITE_SCRIPT = NAME_OPS .. [[
local m, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, ok, delta = {}, {}, 0
local a = 3
for i = 1, n do
  local key, id, how = KEYS[1 + m + i], ARGV[a], ARGV[a + 3]
  local r = 1
  if how == 'a' then
    if not redis.call('SET', key, ARGV[a + 1], 'NX') then r = 0 end
  else
    local cur = redis.pcall('GET', key)
    if type(cur) == 'table' then r = -3
    elseif not cur then r = -1
    elseif cur ~= ARGV[a + 2] then r = -2
    else redis.call('SET', key, ARGV[a + 1]) end
  end
  if r == 1 then
    ok[id] = true
    if how ~= 'b' then delta = delta + 1 end
  end
  out[i] = r
  a = a + 4
end
local sets, ki = {}, 2
while ki <= m + 1 do
  local st = { key = KEYS[ki], kind = ARGV[a] }
  a = a + 1
  if st.kind == 's' then
    ki = ki + 1
  else
    st.set, st.name = KEYS[ki + 1], string.sub(st.kind, 2)
    ki = ki + 2
  end
  for half = 1, 2 do
    local c = tonumber(ARGV[a])
    local t = {}
    for j = a + 1, a + c do
      local id = ARGV[j]
      if ok[id] then t[#t + 1] = id end
    end
    a = a + c + 1
    st[half] = t
  end
  sets[#sets + 1] = st
end
-- every leave before any join: two names of one call may share an index hash, and an
-- id renamed within it leaves one and joins the other
for half = 1, 2 do
  for _, st in ipairs(sets) do
    local t = st[half]
    if st.kind == 's' then
      local op = half == 1 and 'SREM' or 'SADD'
      for f = 1, #t, 1000 do redis.call(op, st.key, unpack(t, f, math.min(#t, f + 999))) end
    else
      local op = half == 1 and name_leave or name_join
      for j = 1, #t do op(st.key, st.set, st.name, t[j]) end
    end
  end
end
if delta ~= 0 then
  local cnt = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
  redis.call('SET', KEYS[1], string.format('%d', cnt + delta))
end
return out
]]

-- The common case of WRITE_SCRIPT, new keys (provisioning), with fewer arguments: items
-- that must be absent, each with a name, all sharing one bucket and the same other indexed
-- attributes (their index sets are the call's shared sets).
-- KEYS: the counter, m shared index sets, then per item: its blob key, its name's index
-- hash.  ARGV: m, then per item: id, blob, name.
-- Returns per item 1 (written) or 0 (the key exists, whatever it holds).  Measured
-- against WRITE_SCRIPT (bench/store_redis.lua): 5 arguments per key instead of 11.
-- A name taken by another id needs the name's set: its key is not passed (one argument
-- fewer per key, for a case provisioning never meets) but made from the hash's key,
-- <base>nx:<h> -> <base>idx:name:<name>: the same hash tag, so the same slot.
-- The end of both fresh scripts: the ids written (t) join the m shared sets (KEYS[2] to
-- KEYS[m + 1]), and the counter (KEYS[1]) grows by as many.
local FRESH_END = [[
if #t > 0 then
  for s = 2, m + 1 do
    for f = 1, #t, 1000 do redis.call('SADD', KEYS[s], unpack(t, f, math.min(#t, f + 999))) end
  end
  local cnt = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
  redis.call('SET', KEYS[1], string.format('%d', cnt + #t))
end
return out
]]
local FRESH_SCRIPT = NAME_OPS .. [[
local m = tonumber(ARGV[1])
local n = (#KEYS - 1 - m) / 2
local out, t = {}, {}
local k, a = m + 2, 2
for i = 1, n do
  local id = ARGV[a]
  if redis.call('SET', KEYS[k], ARGV[a + 1], 'NX') then
    local h, name = KEYS[k + 1], ARGV[a + 2]
    if redis.call('HSETNX', h, name, id) == 0 then
      name_join(h, string.match(h, '^(.*)nx:%d+$') .. 'idx:name:' .. name, name, id)
    end
    t[#t + 1] = id
    out[i] = 1
  else
    out[i] = 0
  end
  k, a = k + 2, a + 3
end
]] .. FRESH_END

-- FRESH_SCRIPT for items without a name entry: keys without a name, or (name_index=other)
-- stored under their default id.  KEYS: the counter, m shared index sets, then per item its
-- blob key.  ARGV: m, then per item: id, blob.  Returns per item 1 or 0, as FRESH_SCRIPT.
local FRESH_PLAIN_SCRIPT = [[
local m = tonumber(ARGV[1])
local out, t = {}, {}
local a = 2
for k = m + 2, #KEYS do
  if redis.call('SET', KEYS[k], ARGV[a + 1], 'NX') then
    t[#t + 1] = ARGV[a]
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  a = a + 2
end
]] .. FRESH_END

-- Compare-and-set of blobs whose indexed attributes stay the same (rewrap's case): no
-- index set and no counter changes.  KEYS: the items' blob keys (one bucket).  ARGV: per
-- item: expected, new.  Returns per item 1 (written), -1 (absent), -2 (differs), -3
-- (holds another type), as WRITE_SCRIPT.
local SWAP_SCRIPT = [[
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local cur = redis.pcall('GET', key)
  local r = 1
  if type(cur) == 'table' then r = -3
  elseif not cur then r = -1
  elseif cur ~= ARGV[2 * i - 1] then r = -2
  else redis.call('SET', key, ARGV[2 * i]) end
  out[i] = r
end
return out
]]

-- KEYS: blob, counter, [the name's index hash and set,] the index sets to leave.
-- ARGV: id, expected, expected-is-a-blob[, name].
-- Returns 1 (deleted), -1 (absent), -2 (differs).
local DELETE_SCRIPT = NAME_OPS .. [[
local cur = redis.call('GET', KEYS[1])
if not cur then return -1 end
if cur ~= ARGV[2] then return -2 end
redis.call('DEL', KEYS[1])
local first = 3
if ARGV[4] then
  name_leave(KEYS[3], KEYS[4], ARGV[4], ARGV[1])
  first = 5
end
for i = first, #KEYS do redis.call('SREM', KEYS[i], ARGV[1]) end
if ARGV[3] == '1' then redis.call('DECR', KEYS[2]) end
return 1
]]

-- KEYS: index sets, the first one scanned.  ARGV: cursor, count.
-- Returns { next_cursor, { ids in every set } } like SSCAN, in bounded memory.
local FIND_SCRIPT = [[
local r = redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local out = {}
for _, m in ipairs(r[2]) do
  local all = true
  for i = 2, #KEYS do
    if redis.call('SISMEMBER', KEYS[i], m) == 0 then all = false break end
  end
  if all then out[#out + 1] = m end
end
return { r[1], out }
]]

-- find by name: KEYS: the name's index hash and set, then the sets of the filter's other
-- fields.  ARGV: cursor, count, name.  Returns { next_cursor, { ids } } as FIND_SCRIPT:
-- the name's id (one HGET), or a page of its set (SSCAN) when several ids share it,
-- those in every other set.
local FIND_NAME_SCRIPT = [[
local v = redis.call('HGET', KEYS[1], ARGV[3])
local ids, nxt = {}, '0'
if v == '' then
  local r = redis.call('SSCAN', KEYS[2], ARGV[1], 'COUNT', ARGV[2])
  ids, nxt = r[2], r[1]
elseif v and ARGV[1] == '0' then
  ids = { v }
end
local out = {}
for _, id in ipairs(ids) do
  if id ~= '' then
    local all = true
    for k = 3, #KEYS do
      if redis.call('SISMEMBER', KEYS[k], id) == 0 then all = false break end
    end
    if all then out[#out + 1] = id end
  end
end
return { nxt, out }
]]

-- store.open(url, { upgrade = true }): the name index of a store made by softcxi before
-- name_buckets (one set per name, P idx:name:<name>) moved into the hashes.  KEYS: pairs
-- of an old name set and the index hash of its name (one slot); ARGV: the names.  A set
-- of one id becomes the hash's field (SPOP and HSET in one call: nothing is lost however
-- the upgrade stops); a set of several stays where it is, as the name's set, and the field
-- says so ('').  Returns per set 1 (changed), 0 (already in this layout), -1 (the key is
-- not a set: left alone).
local UPGRADE_SCRIPT = [[
local out = {}
for i = 1, #ARGV do
  local set, h, name = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i]
  local r = 0
  if redis.call('TYPE', set)['ok'] ~= 'set' then
    r = -1
  else
    local v = redis.call('HGET', h, name)
    local n = redis.call('SCARD', set)
    if v == '' then
      r = 0
    elseif v then
      redis.call('SADD', set, v)
      redis.call('HSET', h, name, '')
      r = 1
    elseif n == 1 then
      redis.call('HSET', h, name, redis.call('SPOP', set))
      r = 1
    elseif n > 1 then
      redis.call('HSET', h, name, '')
      r = 1
    end
  end
  out[i] = r
end
return out
]]

-- A new store's records: KEYS[1] the name bucket count (ARGV[1]), KEYS[2] whether it keeps
-- an algo index (ARGV[2]), KEYS[3] which keys have name entries (ARGV[3]); all or none, so
-- that a store whose name record another process made first (or an older softcxi, without
-- the later records) is left as it is.
local RECORDS_SCRIPT = [[
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('SET', KEYS[3], ARGV[3])
end
return 1
]]

local function sha1_hex(s)
    return (softcxi.hash_compute("sha1", s):gsub(".", function(c)
        return string_format("%02x", c:byte())
    end))
end

local SCRIPTS = {}
for name, text in pairs { write = WRITE_SCRIPT, fresh = FRESH_SCRIPT, swap = SWAP_SCRIPT,
                          fresh_plain = FRESH_PLAIN_SCRIPT,
                          delete = DELETE_SCRIPT, find = FIND_SCRIPT, find_name = FIND_NAME_SCRIPT,
                          upgrade = UPGRADE_SCRIPT, records = RECORDS_SCRIPT } do
    SCRIPTS[name] = { text = text, sha = sha1_hex(text) }
end

-- ---- small helpers -----------------------------------------------------------

local function is_err(r)
    return type(r) == "table" and type(r.err) == "string"
end
_M.is_err = is_err

local rcode = transport.rcode

-- An attribute value as it appears in an index key (specifier 3 -> "3", never "3.0").
local function attr_str(v)
    if type(v) == "number" and v == math_floor(v) then return string_format("%d", v) end
    return tostring(v)
end

--- The name index bucket of name among m: a 32-bit hash of its bytes (h * 31 + byte, mod
-- 2^32, then a multiplicative mix), scaled to 0..m-1 by its top bits.  Arithmetic only,
-- every value an exact integer below 2^53: the same bucket under Lua 5.4 (integers) and
-- LuaJIT (doubles), in a CLI and in nginx.  spec/store_redis_spec.lua pins known answers.
-- h31: the first step's result when known (key_attrs' name_h31: put_many has it).
local function name_bucket(name, m, h31)
    local h, n, i = h31 or 0, h31 and 0 or #name, 1
    -- four bytes at a time, the same sum (h * 31^4 < 2^53), eight per string.byte call
    while i + 7 <= n do
        local a, b, c, d, e, f, g, k = string_byte(name, i, i + 7)
        h = (h * 923521 + a * 29791 + b * 961 + c * 31 + d) % 4294967296
        h = (h * 923521 + e * 29791 + f * 961 + g * 31 + k) % 4294967296
        i = i + 8
    end
    if i + 3 <= n then
        local a, b, c, d = string_byte(name, i, i + 3)
        h = (h * 923521 + a * 29791 + b * 961 + c * 31 + d) % 4294967296
        i = i + 4
    end
    for j = i, n do h = (h * 31 + string_byte(name, j)) % 4294967296 end
    local hi, lo = math_floor(h / 65536), h % 65536
    h = ((hi * 2654435761) % 65536 * 65536 + lo * 2654435761) % 4294967296
    return math_floor(h / 4294967296 * m)
end
_M.name_bucket = name_bucket

local function glob_escape(s)
    return (s:gsub("[%*%?%[%]\\]", "\\%0"))
end
_M.glob_escape = glob_escape

local function pct_decode(s)
    return (s:gsub("%%(%x%x)", function(h) return string_char(tonumber(h, 16)) end))
end

local check_opts, check_id = store.check_opts, store.check_id

-- A script call as an argv with its routing key and text (for the NOSCRIPT fallback).
local function script_cmd(script, keys, args)
    local argv = { "EVALSHA", script.sha, #keys }
    for i = 1, #keys do argv[3 + i] = keys[i] end
    local n = 3 + #keys
    for i = 1, #args do argv[n + i] = args[i] end
    argv.key, argv.script = keys[1], script.text
    return argv
end

-- ---- URL ----------------------------------------------------------------------

local QUERY = { prefix = true, timeout = true, wait_replicas = true, wait_timeout_ms = true,
                buckets = true, chunk = true, transport = true, name_buckets = true, upgrade = true,
                algo_index = true, name_index = true }
-- store.open's opts only
local OPTS_ONLY = { on_upgrade = true }

--- Parse "//[user:password@]host:port[,host:port...][/db][?k=v&...]" (the part after
-- "redis:" / "redis-cluster:"), or with unix set "//[user:password@]/path/to/socket[?db=N&...]"
-- (the part after "redis+unix:").  Returns { user, password, db, hosts = { {host, port} },
-- query = {} } (a socket: hosts = { {host = path} }) or nil, message.  Messages never
-- contain the password.
function _M.parse_url(rest, unix)
    local body = type(rest) == "string" and rest:match("^//(.*)$")
    if not body then
        return nil, unix and "the URL must look like redis+unix:///path/to/redis.sock[?db=0&prefix=...]"
            or "the URL must look like redis://host:port[/db][?prefix=...]"
    end
    local u = { hosts = {}, query = {} }
    local q = body:find("?", 1, true)
    local db
    if q then
        for pair in body:sub(q + 1):gmatch("[^&]+") do
            local k, v = pair:match("^([^=]+)=(.*)$")
            if unix and k == "db" then
                db = v
            elseif not k or not QUERY[k] then
                -- an unencoded '?' or '&' in a password puts part of it here: no name then
                local what = body:find("@", 1, true) and "" or " '" .. (k or pair) .. "'"
                return nil, "unknown URL parameter" .. what .. " (" .. (unix and "db, " or "")
                    .. "prefix, timeout, wait_replicas, wait_timeout_ms, buckets, name_buckets, chunk, "
                    .. "transport, upgrade, algo_index, name_index; percent-encode ? & @ % in a password)"
            else
                u.query[k] = pct_decode(v)     -- a later repetition wins
            end
        end
        body = body:sub(1, q - 1)
    end
    local auth, hostpart = body:match("^(.*)@([^@]*)$")
    if auth then
        local user, pass = auth:match("^([^:]*):(.*)$")
        if not user then
            return nil, "credentials must be user:password@ or :password@"
                .. (unix and " (an @ in the socket path is written %40)" or "")
        end
        u.user = user ~= "" and pct_decode(user) or nil
        u.password = pct_decode(pass)
        body = hostpart
    end
    if unix then
        local path = pct_decode(body)
        if path:find("\0", 1, true) then return nil, "the socket path holds a NUL byte" end
        if path:sub(1, 1) ~= "/" then
            return nil, "the socket path must be absolute: redis+unix:///path/to/redis.sock"
                .. " (a host and port: redis://host:port)"
        end
        if #path > 107 then -- sun_path: a longer one would be cut short, onto another socket
            return nil, "the socket path is too long (107 bytes at most)"
        end
        u.hosts[1] = { host = path }
    else
        local hosts
        hosts, db = body:match("^([^/]*)/(.*)$")
        if hosts then body = hosts end
    end
    if db and db ~= "" then
        u.db = tonumber(db)
        if not db:match("^%d+$") or not u.db then return nil, "bad database number '" .. db .. "'" end
    end
    if unix then return u end
    for h in body:gmatch("[^,]+") do
        local host, port = h:match("^%[([^%]]+)%]:?(%d*)$")
        if not host then host, port = h:match("^([^:]+):?(%d*)$") end
        port = tonumber(port ~= "" and port or "6379")
        if not host or not port or port < 1 or port > 65535 then
            return nil, "bad host:port '" .. h .. "'"
        end
        u.hosts[#u.hosts + 1] = { host = host, port = math_floor(port) }
    end
    if #u.hosts == 0 then return nil, "no host:port in the URL" end
    return u
end

local function num_opt(fn, cfg, name, min, integer)
    local v = cfg[name]
    if v == nil then return nil end
    local n = tonumber(v)
    if not n or n < min or (integer and n ~= math_floor(n)) then
        return nil, string_format("%s: %s must be %s >= %d, not '%s'", fn, name,
                                  integer and "an integer" or "a number", min, tostring(v))
    end
    return n
end

--- Merge URL query and opts into the store configuration.  Returns cfg or nil, msg.
function _M.config(fn, u, opts)
    local merged = {}
    for k, v in pairs(u.query) do merged[k] = v end
    for k, v in pairs(opts or {}) do
        -- store.open tail-calls open, which calls this: level 3 is store.open's caller
        if not QUERY[k] and not OPTS_ONLY[k] then
            error(fn .. ": unknown option '" .. tostring(k) .. "'", 3)
        end
        merged[k] = v
    end
    local cfg = { user = u.user, password = u.password, db = u.db }
    cfg.prefix = merged.prefix or "softcxi:"
    if type(cfg.prefix) ~= "string" then return nil, fn .. ": prefix must be a string" end
    local err
    for _, spec in ipairs { { "timeout", 0, false, 2 }, { "wait_replicas", 0, true, 0 },
                            { "wait_timeout_ms", 0, true, 1000 }, { "chunk", 1, true, 1000 },
                            { "buckets", 1, true, false }, { "name_buckets", 1, true, false } } do
        local v
        v, err = num_opt(fn, merged, spec[1], spec[2], spec[3])
        if err then return nil, err end
        if v == nil then v = spec[4] or nil end
        cfg[spec[1]] = v
    end
    if cfg.name_buckets and cfg.name_buckets > MAX_NAME_BUCKETS then
        return nil, string_format("%s: name_buckets must be at most %d", fn, MAX_NAME_BUCKETS)
    end
    local up = merged.upgrade
    if up ~= nil and up ~= true and up ~= false and up ~= "1" and up ~= "0" and up ~= "true"
       and up ~= "false" then
        return nil, fn .. ": upgrade must be true or false (1 or 0), not '" .. tostring(up) .. "'"
    end
    cfg.upgrade = up == true or up == "1" or up == "true"
    local ai = merged.algo_index
    if ai ~= nil then
        if ai == true or ai == "1" or ai == 1 then
            cfg.algo_index = true
        elseif ai == false or ai == "0" or ai == 0 then
            cfg.algo_index = false
        else
            return nil, fn .. ": algo_index must be 1 or 0, not '" .. tostring(ai) .. "'"
        end
    end
    local ni = merged.name_index
    if ni ~= nil then
        if ni ~= "all" and ni ~= "other" then
            return nil, fn .. ": name_index must be all or other, not '" .. tostring(ni) .. "'"
        end
        cfg.name_index = ni
    end
    if merged.on_upgrade ~= nil and type(merged.on_upgrade) ~= "function" then
        error(fn .. ": on_upgrade must be a function", 3)
    end
    cfg.on_upgrade = merged.on_upgrade
    local T
    T, err = transport.choose(merged.transport)
    if not T then return nil, fn .. ": " .. err end
    cfg.T = T
    -- a WAIT must not outlast the socket timeout
    if cfg.wait_replicas > 0 then
        cfg.timeout = math_max(cfg.timeout, cfg.wait_timeout_ms / 1000 + 1)
    end
    return cfg
end

-- ---- the store -------------------------------------------------------------------

--- A store over transport t (a node or a router of cfg.T's nodes).  layout: name (message
-- prefix), buckets, tags (bucket -> key infix, 0-based), bucket_of(id) and key_id(key) for
-- bucketed layouts.
function _M.new(t, cfg, layout)
    local P = cfg.prefix
    local s = {
        transport = t, null = cfg.T.null, transport_name = cfg.T.name,
        name = layout.name, P = P, cluster = layout.cluster or false,
        nb = layout.buckets or 1, tags = layout.tags or { [0] = "" },
        bucket_of = layout.bucket_of, key_id = layout.key_id,
        match = layout.match or (glob_escape(P) .. "k:*"),
        wait_replicas = cfg.wait_replicas, wait_timeout_ms = cfg.wait_timeout_ms,
        chunk = cfg.chunk, skipped = 0,
        -- the name index: name_buckets asked for (nil: the default, or what the store
        -- recorded), and once the store's record is read (ready()), name_buckets and nm,
        -- the hashes per bucket
        want_names = cfg.name_buckets, upgrade = cfg.upgrade, on_upgrade = cfg.on_upgrade,
        name_buckets = nil, nm = nil,
        -- the algo index: asked for (nil: the default), and what the store recorded (a
        -- store without the record has one: made before it was optional)
        want_algo = cfg.algo_index, by_algo = true, fields = FIELDS,
        -- the name index: asked for (nil: the default), and what the store recorded:
        -- probe true when keys under their default id have no name entry (name_index=other)
        want_nidx = cfg.name_index, probe = false, defaults_known = {}, ndefaults_known = 0,
    }
    return setmetatable(s, mt)
end

-- Run cmds; scripts a node has not cached yet (a restart, a failover, a node it has never
-- been sent to) come back NOSCRIPT and are sent again as EVAL, which also caches them.
local function run(self, cmds, opts)
    local res, err, code = self.transport:pipeline(cmds, opts)
    local again
    for i = 1, #cmds do
        local r = res[i]
        if is_err(r) and cmds[i].script and r.err:find("^NOSCRIPT") then
            local c = cmds[i]
            local e = { "EVAL", c.script }
            for k = 3, #c do e[k] = c[k] end
            e.key = c.key
            again = again or { idx = {}, cmds = {} }
            again.idx[#again.idx + 1] = i
            again.cmds[#again.cmds + 1] = e
        end
    end
    if again then
        local res2, err2, code2 = self.transport:pipeline(again.cmds, opts)
        for j, i in ipairs(again.idx) do res[i] = res2[j] end
        err, code = err or err2, code or code2
    end
    return res, err, code
end

-- One command: reply or nil, msg, code.
local function call(self, argv, opts)
    local res, err, code = run(self, { argv }, opts)
    local r = res[1]
    if r == nil then return nil, err or "no reply", code or "ECONN" end
    if is_err(r) then return nil, r.err, rcode(r.err) end
    return r
end

-- One command on one node (SCAN): reply or nil, msg, code.
local function node_call(node, argv)
    local res, err, code = node:pipeline({ argv }, RETRY)
    local r = res[1]
    if r == nil then return nil, err or "no reply", code or "ECONN" end
    if is_err(r) then return nil, r.err, rcode(r.err) end
    return r
end

function _M:bucket(id)
    return self.bucket_of and self.bucket_of(id) or 0
end

-- ---- the name index: its record, its keys, the upgrade from name sets ---------------

-- The key of name's index hash in the bucket whose keys start with base.  name_bucket's
-- result is an integer (Lua 5.4) or an integral double (LuaJIT): both concatenate as
-- digits alone, without string.format's call.
local function name_key(self, base, name, h31)
    return base .. "nx:" .. name_bucket(name, self.nm, h31)
end

--- The key of the index hash that holds name's entry for id (for tests and tools).
function _M:name_key(id, name)
    assert(self.nm, "the store's name index is not read yet")
    return name_key(self, self.P .. self.tags[self:bucket(id)], attr_str(name))
end

-- Where the name bucket count is recorded, and where an upgrade records the count it uses
-- until it is done (a cluster: one slot, {meta}).
local function names_record(self)
    local k = self.P .. (self.cluster and "{meta}" or "") .. "name-buckets"
    return k, k .. ":upgrading"
end

-- Where a store records whether it keeps an algo index ("1") or not ("0").
local function algo_record(self)
    return self.P .. (self.cluster and "{meta}" or "") .. "algo-index"
end

-- Where a store records which keys have name index entries ("all" or "other").
local function nidx_record(self)
    return self.P .. (self.cluster and "{meta}" or "") .. "name-index"
end

-- The set of the groups and specifiers of keys under their default id (name_index=other).
local function defaults_key(self)
    return self.P .. "default-ids"
end

-- Take the name index record's value v (null: none, an older store: every name has an
-- entry).
local function take_nidx(self, fn, v)
    local which
    if v == self.null or v == "all" then
        which = "all"
    elseif v == "other" and not self.cluster then
        which = "other"
    else
        return nil, string_format("%s: %s holds '%s', not all or other", fn, nidx_record(self), tostring(v)),
            "EFORMAT"
    end
    if self.want_nidx ~= nil and self.want_nidx ~= which then
        return nil, string_format("%s: the store under prefix '%s' was created with name_index=%s, not %s",
                                  fn, self.P, which, self.want_nidx), "EINVAL"
    end
    self.probe = which == "other"
    return true
end

-- Take the algo index record's value v (null: none, an older store, which has the index).
local function take_algo(self, fn, v)
    local by
    if v == self.null or v == "1" then
        by = true
    elseif v == "0" then
        by = false
    else
        return nil, string_format("%s: %s holds '%s', not 0 or 1", fn, algo_record(self), tostring(v)),
            "EFORMAT"
    end
    if self.want_algo ~= nil and self.want_algo ~= by then
        return nil, string_format("%s: the store under prefix '%s' was created with algo_index=%d, not %d",
                                  fn, self.P, by and 1 or 0, by and 0 or 1), "EINVAL"
    end
    self.by_algo, self.fields = by, by and FIELDS or FIELDS_NO_ALGO
    return true
end

local function take_names(self, fn, v)
    local m = tonumber(v)
    if not m or m < 1 or m > MAX_NAME_BUCKETS or m ~= math_floor(m) then
        return nil, string_format("%s: %s holds '%s', not a name bucket count", fn,
                                  (names_record(self)), tostring(v)), "EFORMAT"
    end
    if self.want_names and self.want_names ~= m then
        return nil, string_format("%s: the store under prefix '%s' was created with name_buckets=%d, not %d",
                                  fn, self.P, m, self.want_names), "EINVAL"
    end
    self.name_buckets, self.nm = m, math_max(1, math_floor(m / self.nb))
    return true
end

-- take_algo, take_nidx, then take_names: true or nil, msg, code.
local function take_records(self, fn, names, algo, nidx)
    local ok, err, code = take_algo(self, fn, algo)
    if not ok then return nil, err, code end
    ok, err, code = take_nidx(self, fn, nidx)
    if not ok then return nil, err, code end
    return take_names(self, fn, names)
end

local upgrade

--- Read the store's name index record (once): true, or nil, msg, code.  A store with none
-- is new (the record is made) or was written by a softcxi with one set per name: that one
-- is refused (ELAYOUT) unless opened with upgrade, which converts it first.
local function ready(self, fn)
    if self.nm then return true end
    local rec, up = names_record(self)
    local arec, nrec = algo_record(self), nidx_record(self)
    local res, err, code = run(self, { { "GET", rec, key = rec }, { "GET", up, key = up },
                                       { "GET", arec, key = arec }, { "GET", nrec, key = nrec } }, RETRY)
    if err then return nil, fn .. ": " .. err, code end
    for i = 1, 4 do
        if is_err(res[i]) then return nil, fn .. ": " .. res[i].err, rcode(res[i].err) end
    end
    local null = self.null
    if res[1] ~= null and not self.upgrade then return take_records(self, fn, res[1], res[3], res[4]) end
    local made = res[1] ~= null    -- the records are there (upgrade: run again over a store)
    local old = res[2] ~= null
    if not old and res[1] == null then
        local n
        n, err, code = self:count()
        if not n then return nil, fn .. ": " .. err, code end
        if n > 0 then
            -- blobs, and no record when first asked: another process of this version may
            -- have made the store meanwhile.  It recorded the count before it wrote any
            -- blob, so asking again after the count settles it.
            local again
            again, err, code = run(self, { { "GET", rec, key = rec }, { "GET", arec, key = arec },
                                           { "GET", nrec, key = nrec } }, RETRY)
            if err then return nil, fn .. ": " .. err, code end
            for i = 1, 3 do
                if is_err(again[i]) then return nil, fn .. ": " .. again[i].err, rcode(again[i].err) end
            end
            if again[1] ~= null and not self.upgrade then
                return take_records(self, fn, again[1], again[2], again[3])
            end
            made, old = again[1] ~= null, again[1] == null
            res[3], res[4] = again[2], again[3]
        end
    end
    if old and not self.upgrade then
        return nil, string_format("%s: the store under prefix '%s' has %s: run 'softcxi store upgrade %s' "
            .. "(or store.open(url, { upgrade = true })) to move it to the name index of this "
            .. "version, in place and resumable; nothing is lost", fn, self.P,
            res[2] ~= null and "a name index upgrade that did not finish"
                or "the name index of an older softcxi (a Redis set per name)",
            self.url or "URL"), "ELAYOUT"
    end
    -- upgrade: an older layout, or a store of this one run again; a new store (nothing
    -- there) is made below, records and all, as without upgrade
    if old or (self.upgrade and made) then
        -- algo_index or name_index asked otherwise than the store has: refused before
        -- anything is written
        local ok, e, c = take_algo(self, fn, res[3])
        if ok then ok, e, c = take_nidx(self, fn, res[4]) end
        if not ok then return nil, e, c end
        return upgrade(self, fn)
    end
    -- a new store: both records at once (RECORDS_SCRIPT: another process making the store
    -- now either wrote both first or writes neither), then whichever are there
    local want = self.want_names or NAME_BUCKETS
    -- (the script alone first: a NOSCRIPT answer is sent again as EVAL after the replies
    -- of the rest of its pipeline were read)
    -- (name_index=other by default on one Redis; a cluster keeps every name's entry)
    local nidx = self.want_nidx or (self.cluster and "all" or "other")
    if self.cluster and nidx == "other" then
        return nil, fn .. ": name_index=other is for one Redis; a cluster store keeps name_index=all",
            "EINVAL"
    end
    local mk = script_cmd(SCRIPTS.records, { rec, arec, nrec }, { want, self.want_algo and "1" or "0", nidx })
    local r1
    r1, err, code = call(self, mk)
    if r1 == nil then return nil, fn .. ": " .. err, code end
    res, err, code = run(self, { { "GET", rec, key = rec }, { "GET", arec, key = arec },
                                 { "GET", nrec, key = nrec } })
    if err then return nil, fn .. ": " .. err, code end
    for i = 1, 3 do
        if is_err(res[i]) then return nil, fn .. ": " .. res[i].err, rcode(res[i].err) end
    end
    return take_records(self, fn, res[1], res[2], res[3])
end
_M.ready = ready

-- The upgrade: every old name set (P idx:name:<name>, in a cluster P{b}idx:name:<name>)
-- taken into the index hashes by UPGRADE_SCRIPT calls, until a full SCAN of every master
-- changes nothing; then the record.  The count it uses is recorded first (P name-buckets
-- :upgrading), so a run that stops (a crash, a lost connection) resumes with the same.
-- Safe to run again on an upgraded store: it folds in name sets an older softcxi wrote
-- since.  self.upgraded = { sets =, blobs =, passes =, foreign = } says what it did (sets:
-- name sets taken in; blobs: the store's count; foreign: keys under idx:name: that are
-- not sets, left alone).
-- The highest name index hash number among the store's keys (a full SCAN of every
-- master), or false when there is none, and up to 8 of the hashes found ({ node, key, h });
-- nil, msg, code on failure.
local function name_hashes(self, fn)
    local pat = glob_escape(self.P) .. (self.cluster and "{*}" or "") .. "nx:*"
    local top, some = false, {}
    for _, node in ipairs(self.transport:nodes()) do
        local cursor = "0"
        repeat
            local r, err, code = node_call(node, { "SCAN", cursor, "MATCH", pat, "COUNT", 5000 })
            if not r then return nil, string_format("%s: upgrade: %s: %s", fn, node.addr, err), code end
            cursor = r[1]
            for _, key in ipairs(r[2]) do
                local h = tonumber(key:match("nx:(%d+)$"))
                if h then
                    if not top or h > top then top = h end
                    if #some < 8 then some[#some + 1] = { node, key, h } end
                end
            end
        until cursor == "0"
    end
    return top, some
end

-- Whether the names in the hashes some (name_hashes) lie where want hashes put them:
-- true, false, or nil, msg, code.
local function names_fit(self, fn, want, top, some)
    local per = math_max(1, math_floor(want / self.nb))
    if top >= per then return false end
    for _, s in ipairs(some) do
        local r, err, code = node_call(s[1], { "HSCAN", s[2], "0", "COUNT", 32 })
        if not r then return nil, string_format("%s: upgrade: %s", fn, err), code end
        local kv = type(r[2]) == "table" and r[2] or {}
        for i = 1, #kv, 2 do
            if name_bucket(kv[i], per) ~= s[3] then return false end
        end
    end
    return true
end

upgrade = function(self, fn)
    local rec, up = names_record(self)
    local want = self.want_names or NAME_BUCKETS
    do
        -- Name index hashes but no record of their count (neither done nor begun): the
        -- record was lost, and a count other than the one they were made with would put
        -- every name where find never looks.  Only a count the names fit goes on.
        local res, err, code = run(self, { { "GET", rec, key = rec }, { "GET", up, key = up } })
        if err then return nil, fn .. ": upgrade: " .. err, code end
        if res[1] == self.null and res[2] == self.null then
            local top, some, c2 = name_hashes(self, fn)
            if top == nil then return nil, some, c2 end
            if top then
                local fits
                fits, err, code = names_fit(self, fn, want, top, some)
                if fits == nil then return nil, err, code end
                if not fits then
                    return nil, string_format("%s: upgrade: the store under prefix '%s' has name index "
                        .. "hashes (up to nx:%d) but no record of how many (%s), and name_buckets=%d%s "
                        .. "does not fit the names in them: give the count it was made with "
                        .. "(name_buckets=, softcxi store upgrade --name-buckets N; 65536 for a store made "
                        .. "before 2026-11-27 evening)", fn, self.P, top, rec, want,
                        self.want_names and "" or " (the default)"), "EFORMAT"
                end
            end
        end
    end
    local arec, nrec = algo_record(self), nidx_record(self)
    local res, err, code = run(self, { { "GET", rec, key = rec }, { "SET", up, want, "NX", key = up },
                                       { "GET", up, key = up }, { "GET", arec, key = arec },
                                       { "GET", nrec, key = nrec } })
    if err then return nil, fn .. ": upgrade: " .. err, code end
    for i = 1, 5 do
        if is_err(res[i]) then return nil, fn .. ": upgrade: " .. res[i].err, rcode(res[i].err) end
    end
    local ok, msg
    ok, msg, code = take_records(self, fn, res[1] ~= self.null and res[1] or res[3], res[4], res[5])
    if not ok then return nil, msg, code end
    local P, cluster = self.P, self.cluster
    local pat = glob_escape(P) .. (cluster and "{*}" or "") .. "idx:name:*"
    local done = { sets = 0, blobs = 0, passes = 0, foreign = 0 }
    local up_sha = SCRIPTS.upgrade
    local on = self.on_upgrade
    repeat
        local changed, foreign = 0, 0
        done.passes = done.passes + 1
        for _, node in ipairs(self.transport:nodes()) do
            local cursor = "0"
            repeat
                local r
                r, err, code = node_call(node, { "SCAN", cursor, "MATCH", pat, "COUNT", 5000 })
                if not r then return nil, string_format("%s: upgrade: %s: %s", fn, node.addr, err), code end
                cursor = r[1]
                -- the sets of this page by bucket (one script call per slot)
                local groups, order = {}, {}
                for _, key in ipairs(r[2]) do
                    local tag, at
                    if cluster then
                        tag, at = key:match("^({%d+})idx:name:()", #P + 1)
                    else
                        tag, at = "", #P + 10
                    end
                    if tag then
                        local g = groups[tag]
                        if not g then
                            g = { keys = {}, names = {} }
                            groups[tag] = g
                            order[#order + 1] = tag
                        end
                        local name = key:sub(at)
                        g.keys[#g.keys + 1] = key
                        g.keys[#g.keys + 1] = name_key(self, P .. tag, name)
                        g.names[#g.names + 1] = name
                    end
                end
                local calls = {}
                for _, tag in ipairs(order) do
                    local g = groups[tag]
                    for f = 1, #g.names, 200 do
                        local keys, names = {}, {}
                        for i = f, math_min(#g.names, f + 199) do
                            local k = #keys
                            keys[k + 1], keys[k + 2] = g.keys[2 * i - 1], g.keys[2 * i]
                            names[#names + 1] = g.names[i]
                        end
                        calls[#calls + 1] = script_cmd(up_sha, keys, names)
                    end
                end
                if #calls > 0 then
                    res, err, code = run(self, calls, WRITE)
                    if err then return nil, fn .. ": upgrade: " .. err, code end
                    for i = 1, #calls do
                        local rc = res[i]
                        if is_err(rc) then return nil, fn .. ": upgrade: " .. rc.err, rcode(rc.err) end
                        for j = 1, #rc do
                            if rc[j] == -1 then
                                foreign = foreign + 1
                            elseif rc[j] == 1 then
                                changed = changed + 1
                            end
                        end
                    end
                end
                if on then on(done.sets + changed) end
            until cursor == "0"
        end
        done.foreign, done.sets = foreign, done.sets + changed
    until changed == 0
    local n
    n, err, code = self:count()
    if not n then return nil, fn .. ": upgrade: " .. err, code end
    done.blobs = n
    res, err, code = run(self, { { "SET", rec, self.name_buckets, key = rec }, { "DEL", up, key = up } })
    if err then return nil, fn .. ": upgrade: " .. err, code end
    for i = 1, 2 do
        if is_err(res[i]) then return nil, fn .. ": upgrade: " .. res[i].err, rcode(res[i].err) end
    end
    self.upgraded, self.upgrade = done, false
    return true
end

function _M:blob_key(id)
    return self.P .. self.tags[self:bucket(id)] .. "k:" .. id
end

-- ---- default ids: keys without a name entry (name_index=other) --------------------

-- Whether id is info's default id, group/name[/specifier] (store.id_of's).
local function is_default(id, info)
    local name = info.name
    if name == nil or name == "" then return false end
    local spec = info.specifier
    local d = (info.group or "") .. "/" .. attr_str(name)
    if spec ~= nil then d = d .. "/" .. attr_str(spec) end
    return d == id
end

-- The name id's entry in the name index holds for info: its name, or nil when it has none
-- or (name_index=other) id is its default id.
local function entry_name(self, id, info)
    local name = info.name
    if name == nil or (self.probe and is_default(id, info)) then return nil end
    return attr_str(name)
end

-- A key's group and specifier as P default-ids holds them: group\0specifier (no group: '';
-- no specifier: nothing after the NUL; a specifier is digits, never empty).
local function default_member(info)
    local spec = info.specifier
    return (info.group or "") .. "\0" .. (spec ~= nil and attr_str(spec) or "")
end

local MAX_DEFAULTS_KNOWN = 65536

-- Record in P default-ids the groups and specifiers of the entries of batch marked dflt
-- (keys to be written under their default id) that this store object has not recorded
-- yet: before the keys are written, so that find{ name = } finds them as soon as they are
-- there.  A member stays when its keys go (find tests and skips it).  A pair counts as
-- recorded only once Redis confirmed its SADD: a write that fails before (or a request
-- of another nginx worker coroutine sharing the store object) sends it again.
-- true, or nil, msg, code.  before() runs first when a write is needed (put_many: land
-- the slices in flight on the connection).
local function record_defaults(self, batch, before)
    local known, add, pairs_new = self.defaults_known, nil, nil
    for i = 1, #batch do
        local e = batch[i]
        if e.dflt then
            local info = e.info
            local g, spec = info.group or "", info.specifier
            local kg = known[g]
            local sk = spec == nil and "" or spec
            if not (kg and kg[sk]) then
                local m = default_member(info)
                pairs_new = pairs_new or {}
                if not pairs_new[m] then
                    pairs_new[m] = { g, sk }
                    add = add or { "SADD", defaults_key(self) }
                    add[#add + 1] = m
                end
            end
        end
    end
    if not add then return true end
    if before then
        local ok, msg, code = before()
        if not ok then return nil, msg, code end
    end
    add.key = add[2]
    local r, err, code = call(self, add, WRITE)
    if r == nil then
        return nil, string_format("recording the key's group and specifier in %s: %s", add[2], err), code
    end
    known = self.defaults_known
    for _, p in pairs(pairs_new) do
        if self.ndefaults_known >= MAX_DEFAULTS_KNOWN then
            known, self.ndefaults_known = {}, 0
            self.defaults_known = known
        end
        local kg = known[p[1]]
        if not kg then
            kg = {}
            known[p[1]] = kg
        end
        if not kg[p[2]] then
            kg[p[2]] = true
            self.ndefaults_known = self.ndefaults_known + 1
        end
    end
    return true
end

-- The key of the index set of field:v in the bucket whose keys start with base.
local function set_key(base, field, v)
    return base .. "idx:" .. field .. ":" .. attr_str(v)
end

-- Append info's index set keys (not the name's: fields[1]) to argv from position n + 1;
-- returns the new n.
local function index_keys(argv, n, base, info, fields)
    for i = 2, #fields do
        local f = fields[i]
        local v = info[f]
        if v ~= nil then
            n = n + 1
            argv[n] = set_key(base, f, v)
        end
    end
    return n
end

local WRITE_SHA, WRITE_TEXT = SCRIPTS.write.sha, SCRIPTS.write.text
local FRESH_SHA, FRESH_TEXT = SCRIPTS.fresh.sha, SCRIPTS.fresh.text
local FRESH_PLAIN_SHA, FRESH_PLAIN_TEXT = SCRIPTS.fresh_plain.sha, SCRIPTS.fresh_plain.text
local SWAP_SHA, SWAP_TEXT = SCRIPTS.swap.sha, SCRIPTS.swap.text

-- Items per write script call: Redis runs a script alone, so a call must stay short
-- (a few ms at this size); a larger chunk of put_many is several calls in one pipeline.
local SCRIPT_ITEMS = 500
-- and at most about this many arguments (resty.redis passes them as a vararg: LuaJIT's
-- unpack stops at 8000)
local SCRIPT_ARGS = 6000
-- put_many over hiredis sends slices of at most this many items (never more than a
-- chunk), AHEAD_WINDOW of them before it reads the replies of the oldest (see put_many).
-- Measured on 2 loaded cores (bench/store_redis.lua): 1000 x 1 beat 250 x 1, 100 x 4 and
-- 50 x 4 on wall time and client CPU; the server's CPU per key is the same.
local AHEAD_ITEMS = 1000
local AHEAD_WINDOW = 1

-- The shared empty list of a set nobody leaves or joins (yet): most sets are only joined.
local EMPTY = {}

-- A call being built: one bucket's keys (one slot in a cluster).
local function new_call(base)
    return { base = base, n = 0, nargs = 8, ids = {}, memo = {}, sets = {}, keys = {}, args = {},
             idx = {} }
end

-- The index entry of field:value in call g: { key, kind, leave = {ids}, join = {ids} };
-- kind "s" for a set, "h<name>" for a name (key: its index hash, .set: its set).
local function set_of(self, g, f, v)
    local memo = g.memo[f]
    if not memo then
        memo = {}
        g.memo[f] = memo
    end
    local set = memo[v]
    if not set then
        local s = attr_str(v)
        if f == "name" then
            set = { name_key(self, g.base, s), "h" .. s, leave = EMPTY, join = EMPTY,
                    set = g.base .. "idx:name:" .. s }
        else
            set = { g.base .. "idx:" .. f .. ":" .. s, "s", leave = EMPTY, join = EMPTY }
        end
        g.sets[#g.sets + 1] = set
        g.nargs = g.nargs + 5
        memo[v] = set
    end
    return set
end

-- A FRESH_SCRIPT call being built (plain: FRESH_PLAIN_SCRIPT's): bucket base, the shared
-- sets' keys.
local function new_fresh(base, shared, plain)
    return { base = base, fresh = true, plain = plain, shared = shared, n = 0, nargs = 8 + #shared,
             ids = {}, keys = {}, args = {}, idx = {} }
end

-- The shared index sets (specifier, group, algo: those present) of a fresh item.
local function shared_sets(base, spec, grp, algo)
    local sets = {}
    if spec ~= nil then sets[#sets + 1] = set_key(base, "specifier", spec) end
    if grp ~= nil then sets[#sets + 1] = set_key(base, "group", grp) end
    if algo ~= nil then sets[#sets + 1] = set_key(base, "algo", algo) end
    return sets
end

-- The write script calls for entries { id =, blob =, info =, expect = } (expect: nil for
-- "must be absent", else the value the stored one must equal, whose index entries the id
-- leaves).  One call per bucket and at most SCRIPT_ITEMS items, ids distinct within a
-- call; items that must be absent and have a name go to FRESH_SCRIPT calls, one per
-- bucket and combination of the other indexed attributes.  Returns cmds and, per cmd,
-- the entry positions it carries (in order).  eval: send the script's text (EVAL) rather
-- than its SHA1.
-- Add entry e (position ei, no expected value; nm: its name index entry, or nil for none)
-- to the open fresh call (plain when nm is nil) for its bucket b and other indexed
-- attributes, or to a new one.
local function add_fresh(self, fresh, calls, b, e, ei, nm)
    local id, info = e.id, e.info
    local spec, grp, algo = info.specifier, info.group, info.algo
    local t1 = fresh[b]
    if not t1 then
        t1 = {}
        fresh[b] = t1
    end
    local k1 = spec
    if k1 == nil then k1 = false end
    local t2 = t1[k1]
    if not t2 then
        t2 = {}
        t1[k1] = t2
    end
    local k2 = grp
    if k2 == nil then k2 = false end
    local t3 = t2[k2]
    if not t3 then
        t3 = {}
        t2[k2] = t3
    end
    local k3 = algo
    if k3 == nil then k3 = false end
    local g = t3[k3]
    if not g or g.n >= SCRIPT_ITEMS or g.nargs > SCRIPT_ARGS or g.ids[id] then
        local base = self.P .. self.tags[b]
        g = new_fresh(base, g and g.shared or shared_sets(base, spec, grp, self.by_algo and algo or nil),
                      nm == nil)
        t3[k3] = g
        calls[#calls + 1] = g
    end
    local k = g.n + 1
    local keys, args = g.keys, g.args
    g.n, g.ids[id], g.idx[k] = k, true, ei
    if nm then
        g.nargs = g.nargs + 5
        local j = 3 * k
        keys[2 * k - 1], keys[2 * k] = g.base .. "k:" .. id, name_key(self, g.base, nm, info.name_h31)
        args[j - 2], args[j - 1], args[j] = id, e.blob, nm
    else
        g.nargs = g.nargs + 3
        keys[k] = g.base .. "k:" .. id
        args[2 * k - 1], args[2 * k] = id, e.blob
    end
end

-- Add entry e (position ei) to the open SWAP_SCRIPT call for bucket b, or a new one.
local function add_swap(self, swaps, calls, b, e, ei)
    local id = e.id
    local g = swaps[b]
    if not g or g.n >= SCRIPT_ITEMS or g.nargs > SCRIPT_ARGS or g.ids[id] then
        g = { base = self.P .. self.tags[b], swap = true, n = 0, nargs = 3, ids = {}, keys = {},
              args = {}, idx = {} }
        swaps[b] = g
        calls[#calls + 1] = g
    end
    local k = g.n + 1
    g.n, g.ids[id], g.idx[k], g.nargs = k, true, ei, g.nargs + 3
    g.keys[k] = g.base .. "k:" .. id
    g.args[2 * k - 1], g.args[2 * k] = e.expect, e.blob
end

-- Add entry e (position ei; old_info: its expected value's attributes, nil when that is
-- not a key blob) to the open WRITE_SCRIPT call for bucket b, or a new one.
local function add_write(self, open, calls, b, e, ei, old_info)
    local id, info, old = e.id, e.info, e.expect
    local fields = self.fields
    local nfields = #fields
    local g = open[b]
    if not g or g.n >= SCRIPT_ITEMS or g.nargs > SCRIPT_ARGS or g.ids[id] then
        g = new_call(self.P .. self.tags[b])
        open[b] = g
        calls[#calls + 1] = g
    end
    local k = g.n + 1
    g.n, g.ids[id], g.idx[k] = k, true, ei
    g.nargs = g.nargs + 5 + 2 * nfields
    g.keys[k] = g.base .. "k:" .. id
    local args = g.args
    local n = #args
    args[n + 1], args[n + 2], args[n + 3] = id, e.blob, old or ""
    args[n + 4] = not old and "a" or old_info and "b" or "f"
    -- the name entries (fields[1] is the name): none for a key under its default id
    -- (name_index=other).  The old name's entry is left whenever the new one differs,
    -- even for an old value under its default id: an older softcxi may have written one
    -- (name_leave removes only an entry for this id); it is joined when the old value had
    -- none or another.
    local new_name = not e.dflt and info.name ~= nil and attr_str(info.name) or nil
    local old_name = old_info and entry_name(self, id, old_info)
    local old_any = old_info and old_info.name ~= nil and attr_str(old_info.name) or nil
    -- an attribute value that does not change touches no set
    if old_info then
        for i = 1, nfields do
            local f = fields[i]
            local v, nv = old_info[f], info[f]
            if i == 1 then v, nv = old_any, new_name end
            if v ~= nil and v ~= nv then
                local set = set_of(self, g, f, v)
                if set.leave == EMPTY then set.leave = {} end
                set.leave[#set.leave + 1] = id
            end
        end
    end
    for i = 1, nfields do
        local f = fields[i]
        local v, ov = info[f], old_info and old_info[f]
        if i == 1 then v, ov = new_name, old_name end
        if v ~= nil and (not old_info or ov ~= v) then
            local set = set_of(self, g, f, v)
            if set.join == EMPTY then set.join = {} end
            set.join[#set.join + 1] = id
        end
    end
end

-- The argv of a fresh call g.
local function fresh_argv(g, eval)
    local sets, keys, args = g.shared, g.keys, g.args
    local counter = g.base .. "n"
    local sha, text = FRESH_SHA, FRESH_TEXT
    if g.plain then sha, text = FRESH_PLAIN_SHA, FRESH_PLAIN_TEXT end
    local argv = { "EVALSHA", sha, 1 + #sets + #keys, counter, key = counter, script = text }
    if eval then argv[1], argv[2], argv.script = "EVAL", text, nil end
    local n = 4
    for i = 1, #sets do argv[n + i] = sets[i] end
    n = n + #sets
    for i = 1, #keys do argv[n + i] = keys[i] end
    n = n + #keys + 1
    argv[n] = #sets
    for i = 1, #args do argv[n + i] = args[i] end
    return argv
end

-- The argv of a swap call g.
local function swap_argv(g, eval)
    local keys, args = g.keys, g.args
    local argv = { "EVALSHA", SWAP_SHA, #keys, key = keys[1], script = SWAP_TEXT }
    if eval then argv[1], argv[2], argv.script = "EVAL", SWAP_TEXT, nil end
    local n = 3
    for i = 1, #keys do argv[n + i] = keys[i] end
    n = n + #keys
    for i = 1, #args do argv[n + i] = args[i] end
    return argv
end

-- The argv of a WRITE_SCRIPT call g.
local function write_argv(g, eval)
    local sets, keys, args = g.sets, g.keys, g.args
    local counter = g.base .. "n"
    local argv = { "EVALSHA", WRITE_SHA, 0, counter, key = counter, script = WRITE_TEXT }
    if eval then argv[1], argv[2], argv.script = "EVAL", WRITE_TEXT, nil end
    local n = 4
    for i = 1, #sets do
        local set = sets[i]
        n = n + 1
        argv[n] = set[1]
        if set.set then
            n = n + 1
            argv[n] = set.set
        end
    end
    local m = n - 4
    for i = 1, #keys do argv[n + i] = keys[i] end
    n = n + #keys
    argv[3] = 1 + m + #keys
    argv[n + 1], argv[n + 2] = m, #keys
    n = n + 2
    for i = 1, #args do argv[n + i] = args[i] end
    n = n + #args
    for i = 1, #sets do
        local set = sets[i]
        local list = set.leave
        argv[n + 1] = set[2]
        n = n + 2
        argv[n] = #list
        for j = 1, #list do argv[n + j] = list[j] end
        n = n + #list
        list = set.join
        n = n + 1
        argv[n] = #list
        for j = 1, #list do argv[n + j] = list[j] end
        n = n + #list
    end
    return argv
end

-- The write script calls for entries { id =, blob =, info =, expect = } (expect: nil for
-- "must be absent", else the value the stored one must equal, whose index entries the id
-- leaves).  Items that must be absent and have a name go to FRESH_SCRIPT calls, one per
-- bucket and combination of the other indexed attributes; the rest to WRITE_SCRIPT
-- calls, one per bucket.  At most SCRIPT_ITEMS items per call, ids distinct within a
-- call.  Returns cmds and, per cmd, the entry positions it carries (in order).  eval:
-- send the script's text (EVAL) rather than its SHA1.
local function write_cmds(self, entries, eval)
    local open, fresh, plain, swaps, calls = {}, {}, {}, {}, {}
    local bucket_of, memo, probe = self.bucket_of, self.info_memo, self.probe
    for ei = 1, #entries do
        local e = entries[ei]
        local b = bucket_of and bucket_of(e.id) or 0
        local old, info = e.expect, e.info
        if e.dflt == nil then e.dflt = probe and is_default(e.id, info) end
        if old == nil then
            local nm = not e.dflt and info.name ~= nil and attr_str(info.name) or nil
            add_fresh(self, nm and fresh or plain, calls, b, e, ei, nm)
        else
            local oi = memo and memo[old] or key_attrs(old)
            if oi and oi.name == info.name and oi.specifier == info.specifier
               and oi.group == info.group and oi.algo == info.algo then
                add_swap(self, swaps, calls, b, e, ei)
            else
                add_write(self, open, calls, b, e, ei, oi or nil)
            end
        end
    end
    local cmds, members = {}, {}
    for c = 1, #calls do
        local g = calls[c]
        local argv
        if g.fresh then
            argv = fresh_argv(g, eval)
        elseif g.swap then
            argv = swap_argv(g, eval)
        else
            argv = write_argv(g, eval)
        end
        cmds[c], members[c] = argv, g.idx
    end
    return cmds, members
end

-- One item's write: its result (1, 0, -1, -2, -3) or nil, msg, code.
local function write_one(self, id, blob, info, expect)
    local e = { id = id, blob = blob, info = info, expect = expect }
    e.dflt = self.probe and is_default(id, info)
    if e.dflt then
        local ok, err, code = record_defaults(self, { e })
        if not ok then return nil, err, code end
    end
    local cmds = write_cmds(self, { e })
    local r, err, code = call(self, cmds[1], WRITE)
    if r == nil then return nil, err, code end
    return r[1]
end

local function delete_cmd(self, id, old)
    local base = self.P .. self.tags[self:bucket(id)]
    local keys = { base .. "k:" .. id, base .. "n" }
    local args = { id, old, "0" }
    local old_info = key_info(old)
    if old_info then
        args[3] = "1"
        -- the name's entry, if it has one: a key under its default id has none with
        -- name_index=other, unless an older softcxi wrote it (name_leave removes only an
        -- entry for this id)
        local name = old_info.name ~= nil and attr_str(old_info.name) or nil
        if name then
            keys[3], keys[4], args[4] = name_key(self, base, name), base .. "idx:name:" .. name, name
        end
        index_keys(keys, #keys, base, old_info, self.fields)
    end
    return script_cmd(SCRIPTS.delete, keys, args)
end

-- After writes: WAIT for the configured replicas.  true or nil, msg, code.
local function replicated(self, fn, what)
    local want = self.wait_replicas
    if want <= 0 then return true end
    local acked, err, code = self.transport:wait(want, self.wait_timeout_ms)
    if not acked then return nil, string_format("%s: %s: WAIT: %s", fn, what, err), code end
    if acked < want then
        return nil, string_format("%s: %s written, but only %d of %d replicas acknowledged within %d ms",
                                  fn, what, acked, want, self.wait_timeout_ms), "EREPL"
    end
    return true
end

local WRITE_RESULT = {
    [0] = { "exists (use overwrite or if_match)", "EEXIST" },
    [-1] = { "not found", "ENOTFOUND" },
    [-2] = { "changed (the stored blob is not the one expected)", "ECONFLICT" },
    [-3] = { "holds a value of another type, not a key blob", "EFORMAT" },
}

local PUT_OPTS = { overwrite = true, if_match = true }

--- Store blob under id (nil: group/name[/specifier]).  Plain put never replaces (EEXIST);
-- opts.overwrite replaces; opts.if_match = old replaces only old (ECONFLICT, ENOTFOUND).
function _M:put(id, blob, opts)
    local fn = self.name .. ".put"
    if self.closed then error(fn .. ": the store is closed", 2) end
    opts = check_opts(fn, opts, PUT_OPTS)
    local info, code
    id, info, code = check(id, blob, fn)
    if not id then return nil, info, code end
    local ok, msg, c = ready(self, fn)
    if not ok then return nil, msg, c end
    local old = opts.if_match
    if old ~= nil and type(old) ~= "string" then error(fn .. ": if_match must be a blob string", 2) end
    local key = self:blob_key(id)
    local r, err
    if old ~= nil then
        r, err, code = write_one(self, id, blob, info, old)
    elseif opts.overwrite then
        -- read, then compare-and-set against what was read, so the old index entries go
        for _ = 1, MAX_RACE do
            local cur
            r = nil
            cur, err, code = call(self, { "GET", key, key = key }, RETRY)
            if cur == nil then break end
            if cur == self.null then
                r, err, code = write_one(self, id, blob, info, nil)
            else
                r, err, code = write_one(self, id, blob, info, cur)
            end
            if r == nil or r == 1 then break end
        end
        if r and r ~= 1 then
            return nil, string_format("%s: '%s' kept changing under %d overwrite attempts",
                                      fn, id, MAX_RACE), "ECONFLICT"
        end
    else
        r, err, code = write_one(self, id, blob, info, nil)
    end
    if r == nil then return nil, string_format("%s: '%s': %s", fn, id, err), code end
    if r ~= 1 then
        local why = WRITE_RESULT[r] or { "unexpected reply " .. tostring(r), "EIO" }
        return nil, string_format("%s: '%s' %s", fn, id, why[1]), why[2]
    end
    return replicated(self, fn, "'" .. id .. "'")
end

--- The blob stored under id, or nil, msg, ENOTFOUND / EFORMAT (not a key blob).
function _M:get(id)
    local fn = self.name .. ".get"
    if self.closed then error(fn .. ": the store is closed", 2) end
    check_id(fn, id)
    local key = self:blob_key(id)
    local v, err, code = call(self, { "GET", key, key = key }, RETRY)
    if v == nil then
        if code == "EFORMAT" then err = "not a key blob (" .. err .. ")" end
        return nil, string_format("%s: '%s' (key %s): %s", fn, id, key, err), code
    end
    if v == self.null then return nil, string_format("%s: '%s' not found", fn, id), "ENOTFOUND" end
    local info, why = key_info(v)
    if not info then
        return nil, string_format("%s: '%s' (key %s): not a key blob: %s", fn, id, key, why), "EFORMAT"
    end
    return v
end

--- Remove id and its index entries.  true or nil, msg, ENOTFOUND.
function _M:delete(id)
    local fn = self.name .. ".delete"
    if self.closed then error(fn .. ": the store is closed", 2) end
    check_id(fn, id)
    local ok, msg, c = ready(self, fn)
    if not ok then return nil, msg, c end
    local key = self:blob_key(id)
    for _ = 1, MAX_RACE do
        local cur, err, code = call(self, { "GET", key, key = key }, RETRY)
        if cur == nil then return nil, string_format("%s: '%s' (key %s): %s", fn, id, key, err), code end
        if cur == self.null then return nil, string_format("%s: '%s' not found", fn, id), "ENOTFOUND" end
        local r
        r, err, code = call(self, delete_cmd(self, id, cur), WRITE)
        if r == nil then return nil, string_format("%s: '%s': %s", fn, id, err), code end
        if r == 1 then return replicated(self, fn, "'" .. id .. "'") end
        if r == -1 then return nil, string_format("%s: '%s' not found", fn, id), "ENOTFOUND" end
    end
    return nil, string_format("%s: '%s' kept changing under %d delete attempts", fn, id, MAX_RACE),
        "ECONFLICT"
end

-- store.check for put_many: id, the blob's indexed attributes (key_attrs) | nil, msg, code.
-- Raises at the level of put_many's caller, as store.check.  A blob without an id takes
-- store.check's path (it derives the id).
local function check_item(id, blob, fn)
    if type(blob) ~= "string" then error(fn .. ": blob must be a string", 3) end
    if id == nil then return check(id, blob, fn) end
    local info, err, code = key_attrs(blob)
    if not info then return nil, fn .. ": '" .. tostring(id) .. "': " .. err, code end
    if type(id) ~= "string" or id == "" then
        error(fn .. ": id must be a non-empty string", 3)
    end
    return id, info
end

-- ---- new keys as one transaction: the fast path of put_many -------------------------

-- A slice of new keys (no if_match, no overwrite: the provisioning case) on one Redis over
-- hiredis goes as plain commands in an optimistic transaction rather than FRESH_SCRIPT
-- calls: a script's arguments are converted twice (to Lua strings, back for redis.call),
-- which cost more than the writes themselves (bench/store_redis.lua; docs/scaling.md).
--   1. WATCH the counter and the slice's name index hashes; GET the counter, EXISTS of the
--      slice's blob keys, HMGET of its names in each hash, TYPE of its index sets.
--   2. when nothing is there: MULTI, MSET of the blobs, HSET of the names (a name another
--      id holds becomes '' and a set of both, as NAME_OPS does), SADD to the index sets,
--      INCRBY of the counter, EXEC.
-- EXEC runs nothing if a watched key changed since WATCH: every write script of this store
-- sets the counter when it creates or deletes a blob, and any change of a name index
-- entry changes its hash, so what step 1 read still holds when step 2 runs.  The slice
-- falls back to the scripts when step 1 finds a key present, a counter, hash or set of
-- the wrong form (the sets of names held by other ids too, in one more round trip), more
-- name hashes than FAST_HASHES (a store made with many name buckets:
-- WATCH checks its list per key, quadratic), or when EXEC is refused FAST_TRIES times.
-- Never across a reconnection: WATCH belongs to the connection it was sent on.
local FAST_HASHES = 64
local FAST_TRIES = 2
local FAST_PIECE = AHEAD_ITEMS

local function fast_ok(t)
    return t.session ~= nil and t.send_ahead ~= nil
end

-- One round trip on the connection of session (nil: whichever; returns the one used):
-- res or nil, msg, code.
local function fast_trip(t, cmds, session)
    local ok, err, code = t:send_ahead(cmds, session)
    if not ok then
        t:receive(#cmds)
        return nil, err, code
    end
    local res
    res, err, code = t:receive(#cmds)
    if err then return nil, err, code end
    return res, t:session()
end

-- Write batch (entries { id, blob, info }, none with expect, every one named) as one
-- transaction.  Returns true (all written), false (take the scripts: nothing was written),
-- { err = msg } (Redis refused a command of the transaction: EXECABORT, nothing written;
-- or WRONGTYPE inside it, the blobs written as a script's SET would have), or nil, msg,
-- code (the connection failed: nothing or all of the slice was written).
-- The SADD of index set field:v, new in fast_slice's table by (and in order).
local function new_sadd(by, order, base, field, v)
    local st = { "SADD", set_key(base, field, v) }
    by[v] = st
    order[#order + 1] = st
    return st
end

local function fast_slice(self, t, batch)
    local base = self.P .. self.tags[0]
    local kbase, counter = base .. "k:", base .. "n"
    local n = #batch
    local keys = { "EXISTS" }
    local mset = { "MSET" }
    local seen, named = {}, {}          -- the slice's ids, its names
    local twins = false                 -- two keys of the slice share a name
    -- per name hash: h.hm the HMGET of its names, h.hs the HSET of name, id pairs (what it
    -- becomes when none of the names is held yet)
    local hashes, horder = {}, {}
    local sets, sorder = { specifier = {}, group = {}, algo = {} }, {} -- value -> { "SADD", key, ids... }
    local nm, by_algo = self.nm, self.by_algo
    for i = 1, n do
        local e = batch[i]
        local id, info = e.id, e.info
        if seen[id] then return false end
        seen[id] = true
        local key = kbase .. id
        keys[i + 1] = key
        mset[2 * i], mset[2 * i + 1] = key, e.blob
        -- a name entry, unless the key is under its default id (name_index=other)
        if not e.dflt then
            local name = info.name
            if type(name) ~= "string" then name = attr_str(name) end
            if named[name] then twins = true end
            named[name] = true
            local hb = name_bucket(name, nm, info.name_h31)
            local h = hashes[hb]
            if not h then
                if #horder >= FAST_HASHES then return false end
                local hk = base .. "nx:" .. hb
                h = { key = hk, hm = { "HMGET", hk }, hs = { "HSET", hk } }
                hashes[hb] = h
                horder[#horder + 1] = h
            end
            local hm, hs = h.hm, h.hs
            hm[#hm + 1] = name
            local k = #hs
            hs[k + 1], hs[k + 2] = name, id
        end
        -- the index sets (FIELDS but the name), most slices having one value of each
        local v = info.specifier
        if v ~= nil then
            local st = sets.specifier[v] or new_sadd(sets.specifier, sorder, base, "specifier", v)
            st[#st + 1] = id
        end
        v = info.group
        if v ~= nil then
            local st = sets.group[v] or new_sadd(sets.group, sorder, base, "group", v)
            st[#st + 1] = id
        end
        v = by_algo and info.algo
        if v then
            local st = sets.algo[v] or new_sadd(sets.algo, sorder, base, "algo", v)
            st[#st + 1] = id
        end
    end
    local null = self.null
    for _ = 1, FAST_TRIES do
        local watch = { "WATCH", counter }
        local reads = { watch, { "GET", counter }, keys }
        for j = 1, #horder do
            local h = horder[j]
            watch[j + 2] = h.key
            reads[#reads + 1] = h.hm
        end
        for j = 1, #sorder do reads[#reads + 1] = { "TYPE", sorder[j][2] } end
        local res, session, code = fast_trip(t, reads)
        if not res then return nil, session, code end
        local cnt = res[2]
        if is_err(res[1]) then self.no_transaction = true end   -- WATCH refused (NOPERM)
        -- a counter INCRBY takes (no sign, no leading zero), or none yet
        local fine = res[3] == 0 and not is_err(res[1])
            and (cnt == null or (type(cnt) == "string" and #cnt < 16
                                 and (cnt == "0" or cnt:match("^[1-9]%d*$") ~= nil)))
        local tx = { { "MULTI" }, mset }
        local names_sets = {}           -- names shared with other ids: their sets
        for j = 1, fine and #horder or 0 do
            local h, cur = horder[j], res[3 + j]
            if type(cur) ~= "table" or is_err(cur) then
                fine = false
                break
            end
            local free = not twins
            for k = 1, free and #cur or 0 do
                if cur[k] ~= null then free = false end
            end
            if free then
                tx[#tx + 1] = h.hs              -- every name new, each of one key
            else
                -- per name: who holds it now (cur), who joins (the slice's ids with it)
                local hm, hs = h.hm, h.hs
                local hset, joins, order = { "HSET", h.key }, {}, {}
                for k = 1, #hm - 2 do
                    local name = hm[k + 2]
                    local js = joins[name]
                    if not js then
                        local v = cur[k]
                        js = { held = v ~= null and v or nil }
                        joins[name] = js
                        order[#order + 1] = name
                    end
                    js[#js + 1] = hs[2 * k + 2]
                end
                for _, name in ipairs(order) do
                    local js = joins[name]
                    local held = js.held
                    for k = 1, held and #js or 0 do
                        if js[k] == held then fine = false end  -- an entry for a key not there
                    end
                    if held == nil and #js == 1 then
                        hset[#hset + 1], hset[#hset + 2] = name, js[1]
                    else
                        -- '' with the ids in the name's set (the one holding it too, if one did)
                        local st = { "SADD", base .. "idx:name:" .. name }
                        if held ~= nil and held ~= "" then st[3] = held end
                        for k = 1, #js do st[#st + 1] = js[k] end
                        names_sets[#names_sets + 1] = st
                        if held ~= "" then hset[#hset + 1], hset[#hset + 2] = name, "" end
                    end
                end
                if #hset > 2 then tx[#tx + 1] = hset end
            end
        end
        for j = 1, fine and #sorder or 0 do
            local ty = res[3 + #horder + j]
            if ty ~= "set" and ty ~= "none" then
                fine = false
                break
            end
            tx[#tx + 1] = sorder[j]
        end
        if fine and #names_sets > 0 then
            -- the sets of names held or shared: sets or none, or the scripts take the slice
            -- (an SADD refused inside EXEC would leave the name's field at '' alone)
            local types = {}
            for j = 1, #names_sets do types[j] = { "TYPE", names_sets[j][2] } end
            local tr, err, c = fast_trip(t, types, session)
            if not tr then return nil, err, c end
            for j = 1, #types do
                if tr[j] ~= "set" and tr[j] ~= "none" then fine = false end
            end
        end
        if not fine then
            local done, err, c = fast_trip(t, { { "UNWATCH" } }, session)
            if not done then return nil, err, c end
            return false
        end
        for j = 1, #names_sets do tx[#tx + 1] = names_sets[j] end
        tx[#tx + 1] = { "INCRBY", counter, n }
        tx[#tx + 1] = { "EXEC" }
        local err
        res, err, code = fast_trip(t, tx, session)
        if not res then return nil, err, code end
        local out = res[#tx]
        if is_err(out) then return out end
        if type(out) == "table" then
            for j = 1, #out do
                if is_err(out[j]) then return out[j] end
            end
            return true
        end
        -- a watched key changed: read again
    end
    return false
end

local PUT_MANY_OPTS = { overwrite = true, skip_existing = true, chunk = true, on_chunk = true }

--- Store many { id =, blob = [, if_match = old] } in pipelined chunks (opts.chunk, default
-- the store's chunk=, 1000).  opts.overwrite and per-item if_match as in put;
-- opts.skip_existing: an id already stored is left alone and counted, not an error.
-- opts.on_chunk(done, total) runs after each chunk is confirmed (and replicated).
-- Returns stored, skipped; or nil, msg, code, stored -- stored counts the keys whose
-- write Redis confirmed before the failure (ECONN: the connection broke mid-batch; the
-- unconfirmed chunk, and over hiredis the one sent ahead of it, may or may not be written).
-- Every item is checked first: a malformed one (EFORMAT) fails the call before anything
-- is written.  Items failing one by one at the server (EEXIST, ECONFLICT) do not stop
-- the pipeline: the rest is written, then the first failure is returned with how many
-- failed.
function _M:put_many(items, opts)
    local fn = self.name .. ".put_many"
    if self.closed then error(fn .. ": the store is closed", 2) end
    local chunk, on_chunk
    opts, chunk, on_chunk = store.put_many_args(fn, items, opts, PUT_MANY_OPTS, self.chunk)
    local overwrite, skip_existing = opts.overwrite, opts.skip_existing
    local total = #items
    do
        local ok, msg, c = ready(self, fn)
        if not ok then return nil, msg, c, 0 end
    end
    local probe = self.probe
    local stored, skipped, nfail = 0, 0, 0
    local fail_msg, fail_code

    -- With the hiredis transport (one node, no WAIT, no overwrite's reads in between), a
    -- slice is sent before the previous one's replies are read: Redis runs one slice's
    -- script while this process checks and encodes the next.  A chunk larger than
    -- AHEAD_ITEMS goes out in slices of that size.
    local t = self.transport
    local ahead = t.send_ahead ~= nil and not overwrite and (self.wait_replicas or 0) <= 0
    local slice = ahead and math_min(chunk, AHEAD_ITEMS) or chunk
    -- (not on put_many_later's writer: its replies are read in the order its calls were
    -- made, one send and one receive per slice, which a transaction's two round trips
    -- would break; nor once Redis refused WATCH, e.g. to an ACL user without it)
    local fast_path = ahead and not self.cluster and fast_ok(t) and not t.no_transaction
        and not self.no_transaction
    local flight = {}   -- slices sent, replies not read yet (oldest first)

    -- a malformed item fails the whole call before anything is written (each slice is
    -- checked before it is sent: a single slice needs no pass of its own)
    for i = 1, total > slice and total or 0 do
        local it = items[i]
        if type(it) ~= "table" then
            error(string_format("%s: item %d must be a table { id =, blob = }", fn, i), 2)
        end
        if it.if_match ~= nil and type(it.if_match) ~= "string" then
            error(string_format("%s: item %d: if_match must be a blob string", fn, i), 2)
        end
        local id, msg, code = check_item(it.id, it.blob, fn)
        if not id then return nil, string_format("%s (item %d)", msg, i), code, 0 end
    end

    local function failed(id, msg, code)
        nfail = nfail + 1
        if not fail_msg then fail_msg, fail_code = string_format("'%s' %s", id, msg), code end
    end

    -- Count the replies of one slice (sent as cmds, carrying members[c] of batch; or
    -- sl.all: every item of it written); then, at the end of a chunk, WAIT and on_chunk.
    -- nil, or the error to return.
    local function settle(sl, res, err, code)
        local batch, members = sl.batch, sl.members
        if sl.all then stored = stored + sl.all end
        for c = 1, sl.all and 0 or #sl.cmds do
            local rc = res[c]
            local each = type(rc) == "table" and not is_err(rc)   -- a result per item
            local mc = members[c]
            for k = 1, #mc do
                local e = batch[mc[k]]
                local r = rc
                if each then r = rc[k] end
                if r == 1 then
                    stored = stored + 1
                elseif r == nil then -- luacheck: ignore 542
                    -- no reply: the connection broke (reported below)
                elseif is_err(r) then
                    failed(e.id, r.err, rcode(r.err))
                elseif r == 0 and skip_existing and e.old == nil and not overwrite then
                    skipped = skipped + 1
                elseif overwrite and e.old == nil and r ~= -3 then
                    -- raced with another writer between our GET and our write: one at a time
                    local ok, msg, c2 = self:put(e.id, e.blob, { overwrite = true })
                    if ok then stored = stored + 1 else failed(e.id, msg, c2) end
                else
                    local why = WRITE_RESULT[r] or { "unexpected reply " .. tostring(r), "EIO" }
                    failed(e.id, why[1], why[2])
                end
            end
        end
        if err then
            return { nil, string_format("%s: connection lost after %d of %d keys were confirmed stored"
                                        .. " (%d skipped as existing): %s", fn, stored, total, skipped, err),
                     code, stored }
        end
        if sl.chunk_end then
            local ok, msg, c = replicated(self, fn, string_format("%d keys", stored))
            if not ok then return { nil, msg, c, stored } end
            if on_chunk then
                if #flight > 0 then
                    -- replies are outstanding: a raise in the callback must not leave them
                    -- to be read as the answers to the store's next commands
                    local fine, e = pcall(on_chunk, sl.last, total)
                    if not fine then
                        t:drop()
                        error(e, 0)
                    end
                else
                    on_chunk(sl.last, total)
                end
            end
        end
    end

    -- Read and count the replies of the oldest slices until at most keep are in flight.
    -- nil, or the error to return.
    local function land(keep)
        while #flight > keep do
            local sl = table_remove(flight, 1)
            local r = settle(sl, t:receive(#sl.cmds))
            if r then return r end
        end
    end

    -- A slice as one transaction (fast_slice), once the slices sent ahead have landed:
    -- true, or false (the scripts must write it), and the error to return, if any.
    local function fast_write(batch, last, chunk_end)
        local r = land(0)
        if r then return true, r end
        local ok, err, code = fast_slice(self, t, batch)
        if ok == nil then
            return true, { nil, string_format("%s: connection lost after %d of %d keys were confirmed "
                                              .. "stored (%d skipped as existing): %s", fn, stored, total,
                                              skipped, err), code, stored }
        end
        if not ok then return false end
        if ok == true then
            return true, settle({ all = #batch, last = last, chunk_end = chunk_end })
        end
        local idx = {}   -- a command refused: the error for every item
        for j = 1, #batch do idx[j] = j end
        return true, settle({ batch = batch, cmds = { true }, members = { idx }, last = last,
                              chunk_end = chunk_end }, { ok })
    end

    for cfirst = 1, total, chunk do
        local clast = math_min(total, cfirst + chunk - 1)
        for first = cfirst, clast, slice do
            local last = math_min(clast, first + slice - 1)
            local batch = {}
            for i = first, last do
                local it = items[i]
                if type(it) ~= "table" then
                    error(string_format("%s: item %d must be a table { id =, blob = }", fn, i), 2)
                end
                if it.if_match ~= nil and type(it.if_match) ~= "string" then
                    error(string_format("%s: item %d: if_match must be a blob string", fn, i), 2)
                end
                local id, info, code = check_item(it.id, it.blob, fn)
                if not id then
                    local r = land(0)
                    if r then return r[1], r[2], r[3], r[4] end
                    return nil, string_format("%s (item %d)", info, i), code, stored
                end
                -- expect (set below) made now: a field added later would grow the table
                batch[#batch + 1] = { id = id, info = info, blob = it.blob, old = it.if_match,
                                      expect = it.if_match, dflt = probe and is_default(id, info) }
            end

            -- overwrite: read what is there first, then compare-and-set against it
            local cur = {}
            if overwrite then
                local gets = {}
                for j, e in ipairs(batch) do
                    local key = self:blob_key(e.id)
                    gets[j] = { "GET", key, key = key }
                end
                local res, err, code = run(self, gets, RETRY)
                if err then
                    return nil, string_format("%s: reading current values: %s (%d of %d keys stored)",
                                              fn, err, stored, total), code, stored
                end
                for j = 1, #batch do cur[j] = res[j] end
            end

            local fast = fast_path and not self.no_transaction
            for j, e in ipairs(batch) do
                local old = e.old
                if old == nil and overwrite and type(cur[j]) == "string" then old = cur[j] end
                e.expect = old
                if old ~= nil or e.info.name == nil then fast = false end
            end
            if probe then
                -- the groups and specifiers of keys under their default id, recorded first
                -- (once per store object; the slices in flight landed before)
                local landed
                local ok, msg, c = record_defaults(self, batch, function()
                    landed = land(0)
                    return landed == nil
                end)
                if landed then return landed[1], landed[2], landed[3], landed[4] end
                if not ok then
                    return nil, string_format("%s: %s (%d of %d keys stored)", fn, msg, stored, total), c,
                        stored
                end
            end
            local handled = false
            if fast then
                local r
                handled, r = fast_write(batch, last, last == clast)
                if r then return r[1], r[2], r[3], r[4] end
            end
            if not handled then
                local cmds, members = write_cmds(self, batch, ahead)
                local sl = { batch = batch, cmds = cmds, members = members, last = last,
                             chunk_end = last == clast }
                if ahead then
                    -- EVAL (write_cmds' third argument): never NOSCRIPT, so no reply needs
                    -- a resend while the next slice is in flight
                    local ok, err, code = t:send_ahead(cmds)
                    flight[#flight + 1] = sl
                    local r = land(ok and AHEAD_WINDOW or 0)
                    if r then return r[1], r[2], r[3], r[4] end
                    if not ok then
                        return nil, string_format("%s: connection lost after %d of %d keys were confirmed "
                                                  .. "stored (%d skipped as existing): %s", fn, stored, total,
                                                  skipped, err), code, stored
                    end
                else
                    local r = settle(sl, run(self, cmds, WRITE))
                    if r then return r[1], r[2], r[3], r[4] end
                end
            end
        end
    end
    local r = land(0)
    if r then return r[1], r[2], r[3], r[4] end
    if fail_msg then
        return nil, string_format("%s: %s%s; %d of %d keys stored", fn, fail_msg,
                                  nfail > 1 and string_format(" (and %d more failed)", nfail - 1) or "",
                                  stored, total), fail_code, stored
    end
    return stored, skipped
end

local function pack(...) return { n = select("#", ...), ... } end

--- put_many(items) in steps, for a caller that works on while Redis runs the writes
-- (rewrap re-seals its next page): returns send, finish; nil when this store cannot (a
-- cluster, the resty transport, wait_replicas): then call put_many.  The items are checked
-- and their commands built now; send() puts them on the wire (a second connection, the
-- store's own, so that its other calls are answered meanwhile); finish() sends what is not
-- sent yet, reads the replies and returns what put_many would have.  Calls are sent and
-- finished in the order they were made: send or finish of a later one sends or finishes
-- the earlier ones first (so one left unfinished is finished by the next finish).
function _M:put_many_later(items)
    local fn = self.name .. ".put_many_later"
    if self.closed then error(fn .. ": the store is closed", 2) end
    local t = self.transport
    if self.cluster or not t.twin or not t.send_ahead or (self.wait_replicas or 0) > 0 then
        return nil
    end
    -- put_many reads the name index record on the store's connection, not the writer's
    local ready_ok, ready_msg, ready_code = ready(self, fn)
    if not ready_ok then
        return function() end, function() return nil, ready_msg, ready_code, 0 end
    end
    local w = self.writer
    if not w then
        w = t:twin()
        -- put_many yields just before it sends and before it reads replies
        w.before_send, w.before_receive = coroutine_yield, coroutine_yield
        w.no_transaction = true
        self.writer, self.later = w, {}
    end
    local open = self.later
    local h = { sent = false }
    open[#open + 1] = h
    local function forget()
        for i = #open, 1, -1 do if open[i] == h then table_remove(open, i) end end
    end
    local co = coroutine_create(function() return self:put_many(items) end)
    local function step()
        local r = pack(coroutine_resume(co))
        if not r[1] then
            h.res = { n = 1 }
            forget()
            error(r[2], 0)
        end
        if coroutine_status(co) == "dead" then
            h.res = r
            forget()
        end
    end
    -- put_many takes its transport once, at its start: the writer, for this call only
    self.transport = w
    local ok, err = pcall(step)
    self.transport = t
    if not ok then error(err, 0) end
    function h.send()
        if h.sent or h.res then return end
        local older = {}
        for i = 1, #open do
            if open[i] == h then break end
            older[i] = open[i]
        end
        for i = 1, #older do older[i].send() end
        h.sent = true
        step()
    end
    function h.finish()
        while not h.res do
            while open[1] ~= h and open[1] do open[1].finish() end
            h.sent = true
            step()
        end
        return unpack(h.res, 2, h.res.n)
    end
    return h.send, h.finish
end

-- ---- rewrap's compare-and-set -------------------------------------------------

local SWAP_RESULT = {
    [-1] = { "not found (deleted meanwhile)", "ENOTFOUND" },
    [-2] = { "changed (the stored blob is not the one expected)", "ECONFLICT" },
    [-3] = { "holds a value of another type, not a key blob", "EFORMAT" },
}

-- The swap calls of items i (news[i] a string) of ids/olds/news[1..n]: cmds (argv
-- arrays; EVAL when eval, else EVALSHA) and, per cmd, the item positions it carries.
-- One call per bucket and at most SCRIPT_ITEMS items; an id twice in one page goes to
-- a later call (SWAP_SCRIPT compares each key once).
local function swap_cmds(self, ids, olds, news, n, eval)
    local P, tags, bucket_of = self.P, self.tags, self.bucket_of
    local open, calls = {}, {}
    for i = 1, n do
        if news[i] then
            local id = ids[i]
            local b = bucket_of and bucket_of(id) or 0
            local g = open[b]
            if not g or g.n >= SCRIPT_ITEMS or g.seen[id] then
                g = { n = 0, b = b, seen = {} }
                open[b] = g
                calls[#calls + 1] = g
            end
            g.n = g.n + 1
            g[g.n], g.seen[id] = i, true
        end
    end
    local cmds, members = {}, {}
    for c = 1, #calls do
        local g = calls[c]
        local m, base = g.n, P .. tags[g.b] .. "k:"
        local argv = eval and { "EVAL", SWAP_TEXT, m } or { "EVALSHA", SWAP_SHA, m, script = SWAP_TEXT }
        local a = 3 + m
        for j = 1, m do
            local i = g[j]
            argv[3 + j] = base .. ids[i]
            argv[a + 2 * j - 1], argv[a + 2 * j] = olds[i], news[i]
        end
        argv.key = argv[4]
        g.seen = nil
        cmds[c], members[c] = argv, g
    end
    return cmds, members
end

--- Compare-and-set for rewrap, in arrays (no table per item): for each i in 1..n where
-- news[i] is a blob (false: left alone), ids[i] goes from olds[i] to news[i] if it still
-- holds olds[i].  A new blob must be a key blob with the indexed attributes (algo, name,
-- group, specifier) of the old one, so no index set or counter changes (one GET and SET
-- per key in SWAP_SCRIPT); else nil, msg (naming the id), EINVAL / EFORMAT, and nothing
-- is sent.  Returns send, finish, as put_many_later: send() puts the calls on the wire
-- (on a connection of their own where the store can: one Redis over hiredis, no
-- wait_replicas; else finish does it all), finish() reads the replies and returns what
-- put_many with if_match would: stored, or nil, msg, code, stored (ECONFLICT /
-- ENOTFOUND: the first refused item, the rest written; ECONN: the connection broke and
-- stored counts the keys confirmed).  Handles are sent and finished in the order made.
function _M:swap_later(ids, olds, news, n)
    local fn = self.name .. ".swap_later"
    if self.closed then error(fn .. ": the store is closed", 2) end
    if type(ids) ~= "table" or type(olds) ~= "table" or type(news) ~= "table" then
        error(fn .. ": ids, olds and news must be arrays", 2)
    end
    n = n or #ids
    local total = 0
    for i = 1, n do
        local new = news[i]
        if new then
            local id, old = ids[i], olds[i]
            if type(id) ~= "string" or id == "" or type(old) ~= "string" or type(new) ~= "string" then
                error(string_format("%s: item %d: id, old and new blob must be strings", fn, i), 2)
            end
            local same, why, code = same_index(old, new)
            if not same then
                if same == nil then return nil, string_format("%s: '%s': %s", fn, id, why), code end
                return nil, string_format("%s: '%s': %s (not a rewrap: use put_many with if_match)",
                                          fn, id, why), "EINVAL"
            end
            total = total + 1
        end
    end
    local t = self.transport
    local ahead = not self.cluster and t.twin ~= nil and t.send_ahead ~= nil
        and (self.wait_replicas or 0) <= 0
    local cmds, members = swap_cmds(self, ids, olds, news, n, ahead)
    local h = { sent = false }

    -- count the replies: put_many's return values
    local function settle(res, err, code)
        local stored, nfail, fail_msg, fail_code = 0, 0, nil, nil
        local call_msg, call_code -- a script call that failed as a whole (OOM, READONLY, ...)
        for c = 1, #cmds do
            local rc, g = res[c], members[c]
            if is_err(rc) and not call_msg then
                call_msg, call_code = string_format("'%s' and %d more: %s", ids[g[1]], g.n - 1, rc.err),
                    rcode(rc.err)
            end
            for j = 1, g.n do
                local r = rc
                if type(rc) == "table" and not is_err(rc) then r = rc[j] end
                if r == 1 then
                    stored = stored + 1
                elseif r ~= nil then
                    local msg, rcd
                    if is_err(r) then
                        msg, rcd = r.err, rcode(r.err)
                    else
                        local why = SWAP_RESULT[r] or { "unexpected reply " .. tostring(r), "EIO" }
                        msg, rcd = why[1], why[2]
                    end
                    nfail = nfail + 1
                    if not fail_msg then
                        fail_msg, fail_code = string_format("'%s' %s", ids[g[j]], msg), rcd
                    end
                end
            end
        end
        if err then
            return nil, string_format("%s: connection lost after %d of %d keys were confirmed stored: %s",
                                      fn, stored, total, err), code, stored
        end
        local ok, msg, c = replicated(self, fn, string_format("%d keys", stored))
        if not ok then return nil, msg, c, stored end
        -- a failed call says more than a refused compare-and-set: its code, not ECONFLICT,
        -- tells the caller (rewrap) to stop
        if call_msg then
            return nil, string_format("%s: %s; %d of %d keys stored", fn, call_msg, stored, total),
                call_code, stored
        end
        if fail_msg then
            return nil, string_format("%s: %s%s; %d of %d keys stored", fn, fail_msg,
                                      nfail > 1 and string_format(" (and %d more failed)", nfail - 1) or "",
                                      stored, total), fail_code, stored
        end
        return stored
    end

    if not ahead or #cmds == 0 then
        function h.send() end
        function h.finish()
            if not h.res then
                if #cmds == 0 then
                    h.res = { 0, n = 1 }
                else
                    h.res = pack(settle(run(self, cmds, WRITE)))
                end
            end
            return unpack(h.res, 1, h.res.n)
        end
        return h.send, h.finish
    end

    -- their own connection: the store's others (and put_many_later's) answer meanwhile
    local w = self.swapper
    if not w then
        w = t:twin()
        self.swapper, self.swaps = w, {}
    end
    local queue = self.swaps
    queue[#queue + 1] = h
    function h.send()
        if h.sent then return end
        for i = 1, #queue do
            local o = queue[i]
            if o == h then break end
            o.send()
        end
        h.sent = true
        local ok, err, code = w:send_ahead(cmds)
        if not ok then h.send_err = { err, code } end
    end
    function h.finish()
        if not h.res then
            while queue[1] ~= h do queue[1].finish() end
            h.send()
            local res, err, code = w:receive(#cmds)
            if h.send_err and not err then err, code = h.send_err[1], h.send_err[2] end
            table_remove(queue, 1)
            h.res = pack(settle(res, err, code))
        end
        return unpack(h.res, 1, h.res.n)
    end
    return h.send, h.finish
end

-- Read the keys of ids: one MGET per bucket (at most GET_CHUNK keys each, all in one
-- pipeline); a key MGET answers nil for (deleted meanwhile, or holding another type) is
-- asked again with GET, which tells the two apart.  Returns { [id] = blob } for the
-- values that are key blobs, and nil or { [id] = { msg, code } } for those holding
-- something else (another type, foreign bytes); or nil, msg, code.
-- The MGETs that read the keys of ids: one per bucket, at most GET_CHUNK keys each;
-- cmds[c].pos[k] is the index in ids of command c's k-th key.
local function mget_cmds(self, ids)
    local P, tags, bucket_of = self.P, self.tags, self.bucket_of
    local open, cmds = {}, {}
    for i = 1, #ids do
        local id = ids[i]
        local b = bucket_of and bucket_of(id) or 0
        local g = open[b]
        if not g or g.n >= GET_CHUNK then
            g = { "MGET", n = 0, pos = {} }
            open[b] = g
            cmds[#cmds + 1] = g
        end
        local n = g.n + 1
        g.n, g[n + 1], g.pos[n] = n, P .. tags[b] .. "k:" .. id, i
        if n == 1 then g.key = g[2] end
    end
    return cmds
end

local function fetch_blobs(self, fn, ids)
    local out, errs = {}, nil
    local null = self.null
    local cmds = mget_cmds(self, ids)
    local function take(id, key, v)
        local why
        if is_err(v) then
            why = v.err
        else
            local ok, e = key_check(v)
            if ok then
                out[id] = v
            else
                why = e
            end
        end
        if why then
            errs = errs or {}
            errs[id] = { string_format("%s: '%s' (key %s): not a key blob: %s", fn, id, key, why),
                         "EFORMAT" }
        end
    end
    local res, err, code = run(self, cmds, RETRY)
    if err then return nil, err, code end
    local again = {}
    for j = 1, #cmds do
        local g, r = cmds[j], res[j]
        if is_err(r) then return nil, r.err, rcode(r.err) end
        local pos = g.pos
        for k = 1, g.n do
            local v = r[k]
            if v == null then
                again[#again + 1] = { "GET", g[k + 1], key = g[k + 1], id = ids[pos[k]] }
            else
                take(ids[pos[k]], g[k + 1], v)
            end
        end
    end
    if #again > 0 then
        res, err, code = run(self, again, RETRY)
        if err then return nil, err, code end
        for k = 1, #again do
            local v = res[k]
            if v ~= null then take(again[k].id, again[k][2], v) end
        end
    end
    return out, errs
end

--- { [id] = blob } for the ids stored (missing ids absent), and nil or, for the ids that
-- hold something other than a key blob (also absent), { [id] = { msg, "EFORMAT" } }.
function _M:get_many(ids)
    local fn = self.name .. ".get_many"
    if self.closed then error(fn .. ": the store is closed", 2) end
    if type(ids) ~= "table" then error(fn .. ": ids must be an array of strings", 2) end
    for i = 1, #ids do
        if type(ids[i]) ~= "string" or ids[i] == "" then
            error(string_format("%s: ids[%d] must be a non-empty string", fn, i), 2)
        end
    end
    local out, errs, code = fetch_blobs(self, fn, ids)
    if not out then return nil, fn .. ": " .. errs, code end
    return out, errs
end

--- Which of ids hold a value (a key blob or anything else): { [id] = true }, or nil, msg,
-- code.  Cheaper than get_many for provision's "skip what is stored": one EXISTS with
-- every key of a bucket, whose count settles the usual cases (none stored, all stored)
-- with one integer reply; only a bucket partly stored asks key by key.
function _M:exists_many(ids)
    local fn = self.name .. ".exists_many"
    if self.closed then error(fn .. ": the store is closed", 2) end
    if type(ids) ~= "table" then error(fn .. ": ids must be an array of strings", 2) end
    local P, tags, bucket_of = self.P, self.tags, self.bucket_of
    local open, cmds = {}, {}   -- cmds[j] = { "EXISTS", keys..., n =, ids = }
    for i = 1, #ids do
        local id = ids[i]
        if type(id) ~= "string" or id == "" then
            error(string_format("%s: ids[%d] must be a non-empty string", fn, i), 2)
        end
        local b = bucket_of and bucket_of(id) or 0
        local g = open[b]
        if not g or g.n >= GET_CHUNK then
            g = { "EXISTS", n = 0, ids = {}, kbase = P .. tags[b] .. "k:" }
            open[b] = g
            cmds[#cmds + 1] = g
        end
        local n = g.n + 1
        local key = g.kbase .. id
        g.n, g[n + 1], g.ids[n] = n, key, id
        if n == 1 then g.key = key end
    end
    local res, err, code = run(self, cmds, RETRY)
    if err then return nil, fn .. ": " .. err, code end
    local out, partly = {}, {}
    for j = 1, #cmds do
        local g, r = cmds[j], res[j]
        if is_err(r) then return nil, fn .. ": " .. r.err, rcode(r.err) end
        if r == g.n then
            for k = 1, g.n do out[g.ids[k]] = true end
        elseif r ~= 0 then
            for k = 1, g.n do
                partly[#partly + 1] = { "EXISTS", g[k + 1], key = g[k + 1], id = g.ids[k] }
            end
        end
    end
    if #partly > 0 then
        res, err, code = run(self, partly, RETRY)
        if err then return nil, fn .. ": " .. err, code end
        for k = 1, #partly do
            local r = res[k]
            if is_err(r) then return nil, fn .. ": " .. r.err, rcode(r.err) end
            if r == 1 then out[partly[k].id] = true end
        end
    end
    return out
end

--- The number of blobs stored (the counter the write scripts keep; O(buckets)).
function _M:count()
    local fn = self.name .. ".count"
    if self.closed then error(fn .. ": the store is closed", 2) end
    local cmds = {}
    for b = 0, self.nb - 1 do
        local key = self.P .. self.tags[b] .. "n"
        cmds[#cmds + 1] = { "GET", key, key = key }
    end
    local res, err, code = run(self, cmds, RETRY)
    if err then return nil, fn .. ": " .. err, code end
    local n = 0
    for i = 1, #cmds do
        local v = res[i]
        if is_err(v) then return nil, fn .. ": " .. v.err, rcode(v.err) end
        n = n + (tonumber(v ~= self.null and v or 0) or 0)
    end
    return n
end

-- ---- paging: find and scan ------------------------------------------------------

-- Cursor "part:server_cursor[:carry]": part is a bucket (find) or a node (scan), and
-- server_cursor is where that part's SCAN/SSCAN resumes.  carry holds the ids of a server
-- reply that did not fit the last page ("<len>,<id>" each); they come first.  A reply is
-- never fetched twice: Redis may rehash between two calls, so the same server cursor need
-- not give the same reply again.  nil / "0" start.
local function parse_cursor(cursor)
    if cursor == nil or cursor == "0" or cursor == "" then return 0, "0", {} end
    if type(cursor) ~= "string" then return nil end
    local b, c, rest = cursor:match("^(%d+):(%d+):?(.*)$")
    if not b then return nil end
    local carry, pos = {}, 1
    while pos <= #rest do
        local len, after = rest:match("^(%d+),()", pos)
        if not len then return nil end
        len = tonumber(len)
        local id = rest:sub(after, after + len - 1)
        if #id ~= len then return nil end
        carry[#carry + 1] = id
        pos = after + len
    end
    return tonumber(b), c, carry
end

local function make_cursor(b, c, carry, from)
    local parts = { string_format("%d:%s", b, c) }
    if from <= #carry then
        parts[2] = ":"
        for i = from, #carry do parts[#parts + 1] = #carry[i] .. "," .. carry[i] end
    end
    return table.concat(parts)
end

-- fetch(reqs) with reqs = { {part, server_cursor, count}, ... } returns
-- { {items, next_server_cursor}, ... } (or nil, msg, code).  Parts whose server cursor
-- starts at "0" may be fetched ahead, up to maxwin at once, once parts turn out small.
local function page(nparts, cursor, limit, fetch, maxwin, min_count)
    local b, c, carry = parse_cursor(cursor)
    if not b then return nil, "bad cursor '" .. tostring(cursor) .. "'", "EINVAL" end
    local out = {}
    for i = 1, math_min(#carry, limit) do out[i] = carry[i] end
    if #carry > limit then return out, make_cursor(b, c, carry, limit + 1) end
    local win = 1
    for _ = 1, MAX_ROUNDS do
        if b >= nparts then return out, nil end
        local room = limit - #out
        if room == 0 then return out, make_cursor(b, c, carry, #carry + 1) end
        local count = math_max(room, min_count)
        local reqs = { { b, c, count } }
        if c == "0" then
            for j = 1, win - 1 do
                if b + j < nparts then reqs[#reqs + 1] = { b + j, "0", count } end
            end
        end
        local got, err, code = fetch(reqs)
        if not got then return nil, err, code end
        local finished = true
        for j = 1, #reqs do
            local items, nc = got[j][1], got[j][2]
            -- where this part goes on after this reply
            local nb, ncur = b, nc
            if nc == "0" then nb, ncur = b + 1, "0" end
            if #items > room then
                -- the rest rides in the cursor; parts fetched ahead are fetched again
                for i = 1, room do out[#out + 1] = items[i] end
                return out, make_cursor(nb, ncur, items, room + 1)
            end
            for i = 1, #items do out[#out + 1] = items[i] end
            room = limit - #out
            b, c = nb, ncur
            if nc ~= "0" then
                finished = false
                break
            end
        end
        win = finished and math_min(win * 2, maxwin) or 1
    end
    if b >= nparts then return out, nil end
    return out, make_cursor(b, c, carry, #carry + 1)
end

local function check_limit(fn, n, default)
    if n == nil then return default end
    if type(n) ~= "number" or n < 1 or n ~= math_floor(n) then
        error(fn .. ": limit/count must be a positive integer", 3)
    end
    return n
end

-- Ids under the prefix, page by page, SCAN on every node in turn (not checked).
local function scan_ids(self, cursor, count)
    local nodes = self.transport:nodes()
    local pat = self.match
    local function fetch(reqs)
        local req = reqs[1]
        local node = nodes[req[1] + 1]
        -- SCAN's COUNT is work, not matches: other keys (the name index hashes: up to one
        -- per blob in a small store) dilute ours.  Ask for a quarter more than the last
        -- reply's hit rate says fills the page, so that one round trip usually does (asking
        -- for the page size took ~12 per page of 1,000); what does not fit rides in the
        -- cursor.
        local ratio = self.scan_ratio or 1
        local want = req[3]
        local n = math_min(math_floor(want * 1.25 / ratio) + 1, want * 16)
        local r, err, code = node_call(node, { "SCAN", req[2], "MATCH", pat, "COUNT", n })
        if not r then return nil, node.addr .. ": " .. err, code end
        local ids, seen = {}, {}
        for _, key in ipairs(r[2]) do
            local id = self.key_id and self.key_id(key) or key:sub(#self.P + 3)
            if id and id ~= "" and not seen[id] then -- "P k:" is no key's: no id is empty
                seen[id] = true
                ids[#ids + 1] = id
            end
        end
        if r[1] ~= "0" then
            self.scan_ratio = math_max(1 / 16, math_min(1, #r[2] / n))
        end
        return { { ids, r[1] } }
    end
    return page(#nodes, cursor, count, fetch, 1, 100)
end

-- scan's work; fn names the caller in messages (find({}) scans too).
local function scan(self, fn, cursor, count)
    local ids, nxt, code = scan_ids(self, cursor, count)
    if not ids then return nil, fn .. ": " .. nxt, code end
    local blobs, errs, c = fetch_blobs(self, fn, ids)
    if not blobs then return nil, fn .. ": " .. errs, c end
    -- an id deleted between SCAN and GET is left out too, but not counted: it is gone,
    -- not foreign
    local out, bad = {}, 0
    for _, id in ipairs(ids) do
        if blobs[id] then
            out[#out + 1] = id
        elseif errs and errs[id] then
            bad = bad + 1
        end
    end
    self.skipped = self.skipped + bad
    return out, nxt, bad
end

--- Iterate the store in bounded memory: ids, next_cursor (nil when done), skipped.
-- Values under the prefix that are not key blobs (another type, foreign bytes) are left
-- out and counted: skipped for this page, self.skipped in total.  Like SCAN, an id stored
-- throughout the iteration is returned at least once (twice is possible while Redis
-- resizes its table); ids written meanwhile may or may not be.  A page holds at most
-- count (default 100) ids, maybe none before the end.
function _M:scan(cursor, count)
    local fn = self.name .. ".scan"
    if self.closed then error(fn .. ": the store is closed", 2) end
    local ids, nxt, bad = scan(self, fn, cursor, check_limit(fn, count, 100))
    return ids, nxt, bad
end

-- The values of ids for scan_blobs, in arrays: ids and blobs of the key blobs (one MGET
-- per bucket, at most GET_CHUNK keys each, in one pipeline; a key MGET answers nil for is
-- asked again with GET: deleted meanwhile, or another type), and how many held something
-- else; or nil, msg, code.  Blobs are checked with key_check (no table per blob).
local function fetch_values(self, ids)
    local null = self.null
    local cmds = mget_cmds(self, ids)
    local res, err, code = run(self, cmds, RETRY)
    if err then return nil, err, code end
    local vals, again, bad = {}, {}, 0
    for j = 1, #cmds do
        local g, r = cmds[j], res[j]
        if is_err(r) then return nil, r.err, rcode(r.err) end
        local pos = g.pos
        for k = 1, g.n do
            local v = r[k]
            if v == null then
                again[#again + 1] = { "GET", g[k + 1], key = g[k + 1], i = pos[k] }
            elseif key_check(v) then
                vals[pos[k]] = v
            else
                bad = bad + 1
            end
        end
    end
    if #again > 0 then
        res, err, code = run(self, again, RETRY)
        if err then return nil, err, code end
        for k = 1, #again do
            local v = res[k]
            if v ~= null then
                if type(v) == "string" and key_check(v) then vals[again[k].i] = v else bad = bad + 1 end
            end
        end
    end
    local out_ids, out_vals, m = {}, {}, 0
    for i = 1, #ids do
        local v = vals[i]
        if v then
            m = m + 1
            out_ids[m], out_vals[m] = ids[i], v
        end
    end
    return out_ids, out_vals, bad
end

--- scan with the values, for rewrap: ids, blobs, next_cursor, skipped, where blobs[i] is
-- the blob of ids[i] (arrays: no table per blob).  scan reads every value anyway (to leave
-- out what is not a key blob); rewrap takes them from here instead of a second round of
-- GETs.  A blob deleted meanwhile is absent from ids; values that are not key blobs are
-- left out and counted, as scan does.
function _M:scan_blobs(cursor, count)
    local fn = self.name .. ".scan_blobs"
    if self.closed then error(fn .. ": the store is closed", 2) end
    local ids, nxt, code = scan_ids(self, cursor, check_limit(fn, count, 100))
    if not ids then return nil, fn .. ": " .. nxt, code end
    local out, vals, bad = fetch_values(self, ids)
    if not out then return nil, fn .. ": " .. vals, bad end
    self.skipped = self.skipped + bad
    return out, vals, nxt, bad
end

-- find{ name = } in a store with name_index=other, the keys under their default id: a
-- page of P default-ids (SSCAN from cursor), and for each group g and specifier s there
-- (those the filter allows) the key <g>/<name>[/<s>], kept when it holds a blob whose
-- group, name and specifier are those (and algo, if asked): a key under another id has a
-- name entry instead, and is found there.  A key found here that has a name entry all the
-- same (written by a softcxi before name_index, or a damaged index) is left to the name
-- index's part: each id once.  Returns ids, the next SSCAN cursor; or nil, msg, code.
local PROBE_COUNT = 256

local function probe_defaults(self, name, filter, cursor, count)
    local fg = filter.group ~= nil and attr_str(filter.group) or nil
    local fs = filter.specifier ~= nil and attr_str(tonumber(filter.specifier)) or nil
    local fa = filter.algo ~= nil and attr_str(filter.algo) or nil
    local key, hkey = defaults_key(self), name_key(self, self.P, name)
    local res, err, code = run(self, {
        { "SSCAN", key, cursor, "COUNT", math_max(count, PROBE_COUNT), key = key },
        { "HGET", hkey, name, key = hkey } }, RETRY)
    if err then return nil, err, code end
    for i = 1, 2 do
        if is_err(res[i]) then return nil, res[i].err, rcode(res[i].err) end
    end
    local r, held = res[1], res[2]   -- held: the name's entry (an id, or '': its set)
    -- the candidate ids, each with the pairs that make it (two pairs can: group a and
    -- specifier 5, group a/5 and none, for a name 5)
    local ids, want = {}, {}
    for _, m in ipairs(r[2]) do
        local g, spec = m:match("^(.*)%z(%-?%d*)$")
        if g and (fg == nil or g == fg) and (fs == nil or spec == fs) then
            local id = g .. "/" .. name
            if spec ~= "" then id = id .. "/" .. spec end
            local w = want[id]
            if not w then
                w = {}
                want[id] = w
                ids[#ids + 1] = id
            end
            w[#w + 1] = g
            w[#w + 1] = spec
        end
    end
    local out, kbase, null = {}, self.P .. "k:", self.null
    for first = 1, #ids, GET_CHUNK do
        local last = math_min(#ids, first + GET_CHUNK - 1)
        local mget = { "MGET" }
        for i = first, last do mget[#mget + 1] = kbase .. ids[i] end
        mget.key = mget[2]
        local vals
        vals, err, code = call(self, mget, RETRY)
        if not vals then return nil, err, code end
        for i = first, last do
            local v, id = vals[i - first + 1], ids[i]
            -- absent (nearly every candidate), or not a blob: not this name's key
            local info = v ~= null and type(v) == "string" and key_attrs(v) or nil
            if info and info.name ~= nil and attr_str(info.name) == name and id ~= held
               and (fa == nil or attr_str(info.algo) == fa)
               and (fg == nil or (info.group ~= nil and attr_str(info.group) == fg)) then
                local g, spec = info.group or "", info.specifier ~= nil and attr_str(info.specifier) or ""
                local w = want[id]
                for k = 1, #w, 2 do
                    if w[k] == g and w[k + 1] == spec then
                        out[#out + 1] = id
                        break
                    end
                end
            end
        end
    end
    if held == "" and #out > 0 then
        local set = self.P .. "idx:name:" .. name
        local q = {}
        for i = 1, #out do q[i] = { "SISMEMBER", set, out[i], key = set } end
        res, err, code = run(self, q, RETRY)
        if err then return nil, err, code end
        local kept = {}
        for i = 1, #out do
            if is_err(res[i]) then return nil, res[i].err, rcode(res[i].err) end
            if res[i] ~= 1 then kept[#kept + 1] = out[i] end
        end
        out = kept
    end
    return out, r[1]
end

--- Ids whose blob's attributes match filter (fields name, specifier, group, algo; an
-- empty filter matches every blob), at most limit (default 100) per call, paged by
-- cursor: ids, next_cursor (nil when done).
function _M:find(filter, cursor, limit)
    local fn = self.name .. ".find"
    if self.closed then error(fn .. ": the store is closed", 2) end
    if type(filter) ~= "table" then error(fn .. ": filter must be a table", 2) end
    limit = check_limit(fn, limit, 100)
    local fields = {}
    for k in pairs(filter) do
        if not INDEXED[k] then
            return nil, string_format("%s: cannot find by '%s' (indexed: name, specifier, group, algo)",
                                      fn, tostring(k)), "EINVAL"
        end
    end
    local name
    local ok, msg, c0 = ready(self, fn)    -- the records: which fields have index entries
    if not ok then return nil, msg, c0 end
    -- algo without an index (algo_index=0): the candidates' blobs are read and checked
    local algo = filter.algo ~= nil and not self.by_algo and attr_str(filter.algo) or nil
    for _, f in ipairs(self.fields) do
        local v = filter[f]
        if v ~= nil then
            if f == "specifier" then
                v = tonumber(v)
                if not v then return {}, nil end  -- no blob has a non-numeric specifier
            end
            if f == "name" then
                name = attr_str(v)
            else
                fields[#fields + 1] = f .. ":" .. attr_str(v)
            end
        end
    end
    local ids, nxt, code
    if algo and #fields == 0 and not name then
        -- every blob, as scan_blobs reads them, kept when its algo matches
        local page_ids, after, c = scan_ids(self, cursor, limit)
        if not page_ids then return nil, fn .. ": " .. after, c end
        local got, vals, bad = fetch_values(self, page_ids)
        if not got then return nil, fn .. ": " .. vals, bad end
        self.skipped = self.skipped + bad
        ids = {}
        for i = 1, #got do
            local info = key_attrs(vals[i])
            if info and attr_str(info.algo) == algo then ids[#ids + 1] = got[i] end
        end
        return ids, after, bad
    elseif #fields == 0 and not name then
        return scan(self, fn, cursor, limit)
    else
        local P, tags, nb = self.P, self.tags, self.nb
        -- name_index=other: the default ids are a part after the buckets'
        local probe = name ~= nil and self.probe
        local fetch = function(reqs)
            local cmds = {}
            local last = reqs[#reqs]
            local probe_req = probe and last[1] == nb and last or nil
            for j = 1, #reqs - (probe_req and 1 or 0) do
                local req = reqs[j]
                local base = P .. tags[req[1]]
                local keys = {}
                if name then keys[1], keys[2] = name_key(self, base, name), base .. "idx:name:" .. name end
                for _, f in ipairs(fields) do keys[#keys + 1] = base .. "idx:" .. f end
                if name then
                    cmds[j] = script_cmd(SCRIPTS.find_name, keys, { req[2], req[3], name })
                elseif #keys == 1 then
                    cmds[j] = { "SSCAN", keys[1], req[2], "COUNT", req[3], key = keys[1] }
                else
                    cmds[j] = script_cmd(SCRIPTS.find, keys, { req[2], req[3] })
                end
            end
            local got = {}
            if #cmds > 0 then
                local res, err, c = run(self, cmds, RETRY)
                if err then return nil, err, c end
                for j = 1, #cmds do
                    local r = res[j]
                    if is_err(r) then return nil, r.err, rcode(r.err) end
                    -- an empty member (a damaged set: no id is empty) is left out, never
                    -- handed to a caller whose get() would raise
                    local members = r[2]
                    for k = #members, 1, -1 do
                        if members[k] == "" then table.remove(members, k) end
                    end
                    got[j] = { members, r[1] }
                end
            end
            if probe_req then
                local found, after, c = probe_defaults(self, name, filter, probe_req[2], probe_req[3])
                if not found then return nil, after, c end
                got[#got + 1] = { found, after }
            end
            return got
        end
        ids, nxt, code = page(nb + (probe and 1 or 0), cursor, limit, fetch, MAX_WINDOW, 10)
    end
    if not ids then return nil, fn .. ": " .. nxt, code end
    if algo and #ids > 0 then
        -- the other fields' candidates whose blob has the algo (a page may come out short)
        local got, vals, c = fetch_values(self, ids)
        if not got then return nil, fn .. ": " .. vals, c end
        ids = {}
        for i = 1, #got do
            local info = key_attrs(vals[i])
            if info and attr_str(info.algo) == algo then ids[#ids + 1] = got[i] end
        end
    end
    return ids, nxt
end

--- The store's layout, as recorded when it was made: { name_buckets =, algo_index = 0|1,
-- name_index = "all"|"other" }, or nil, msg, code (softcxi store stats prints it).
function _M:layout()
    local fn = self.name .. ".layout"
    if self.closed then error(fn .. ": the store is closed", 2) end
    local ok, msg, code = ready(self, fn)
    if not ok then return nil, msg, code end
    return { name_buckets = self.name_buckets, algo_index = self.by_algo and 1 or 0,
             name_index = self.probe and "other" or "all" }
end

--- Close the connections (hiredis; the resty transport holds none between calls).
-- Closing twice is fine; any other call then raises.
function _M:close()
    if not self.closed then
        self.transport:close()
        if self.writer then self.writer:close() end
        if self.swapper then self.swapper:close() end
    end
    self.closed, self.info_memo, self.writer, self.swapper = true, nil, nil, nil
    return true
end

-- ---- open ------------------------------------------------------------------------

--- store.open("redis://...") lands here with rest = "//...", and store.open("redis+unix://...")
-- with unix = true.
function _M.open(rest, opts, url, unix)
    local fn = "store.redis.open"
    local u, err = _M.parse_url(rest, unix)
    if not u then return nil, fn .. ": " .. err, "EINVAL" end
    if #u.hosts ~= 1 then
        return nil, fn .. ": one host:port (use redis-cluster:// for a cluster)", "EINVAL"
    end
    local cfg
    cfg, err = _M.config(fn, u, opts)
    if not cfg then return nil, err, "EINVAL" end
    if cfg.buckets then return nil, fn .. ": buckets= is for redis-cluster:// URLs", "EINVAL" end
    local node = cfg.T.Node.new(u.hosts[1].host, u.hosts[1].port, cfg)
    -- connect now, to report a bad address or password at once; inside nginx only where
    -- cosockets exist (in init_worker_by_lua the store connects on first use)
    if not cfg.T.cosockets or cfg.T.cosockets() then
        local c, code
        c, err, code = node:connect()
        if not c then return nil, fn .. ": " .. err, code end
    end
    local s = _M.new(node, cfg, { name = "store.redis" })
    s.url = url and url:gsub("//[^@/]*@", "//***@")   -- for messages: never the password
    -- provision.run stores its batches in pieces of this many keys when new keys go as
    -- transactions (fast_slice: one at a time, two round trips each), and between
    -- pieces collects a generated batch and starts the next.  A whole slice (1000): with
    -- two generation jobs running, the generators need no collection mid-batch, and
    -- paired runs gave 1000 keys 0.90-0.94 of the time of 250 and 0.97 of 500 (fewer
    -- transactions: 1-2 us less CPU per key, client and Redis)
    if fast_ok(node) and (cfg.wait_replicas or 0) <= 0 then s.preferred_piece = FAST_PIECE end
    -- the name index record (or the refusal of an old layout) now, where the store can
    -- talk to Redis; inside nginx without cosockets, on first use
    if not cfg.T.cosockets or cfg.T.cosockets() then
        local ok, code
        ok, err, code = ready(s, fn)
        if not ok then
            s:close()
            return nil, err, code
        end
    end
    return s
end

--- store.open("redis+unix:///path/to/redis.sock?...") lands here.
function _M.open_unix(rest, opts, url)
    return _M.open(rest, opts, url, true)
end

return _M
