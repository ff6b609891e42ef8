-- softcxi.store.redis_cluster: key blobs in a Redis Cluster.
--
--   local s = assert(require("softcxi.store").open(
--       "redis-cluster://[user:password@]10.0.0.1:7000,10.0.0.2:7000?prefix=keys:&buckets=256"))
--
-- The store itself is redis.lua's, run over two things defined here:
--
-- * A router (the transport): it keeps the slot map from CLUSTER SLOTS, sends every command
--   to the master owning its key's slot (CRC16-XMODEM of the key, or of its {hash tag},
--   mod 16384), splits pipelines by node, follows MOVED (remember the new owner, refresh
--   the map, resend) and ASK (resend to the importing node behind ASKING, map unchanged),
--   and backs off and resends on TRYAGAIN / CLUSTERDOWN.  A redirected command was not
--   run, so resending writes is safe.
--
-- * A bucketed layout.  Each id falls in one of N buckets (crc16(id) mod N, N = buckets=,
--   default 256, fixed when the store is first opened); bucket b's keys carry the hash tag
--   {b}, so a blob, its index entries and its bucket's counter share one slot and one
--   write script still updates them atomically:
--     P{b}k:<id>    P{b}nx:<h>    P{b}idx:<field>:<value>    P{b}n
--   An index set holds one bucket's share of a group, never the whole group: 100M keys in
--   one group make N sets of 100M/N members spread over the cluster; the name index is
--   name_buckets / N hashes per bucket (redis.lua).  find pages through the buckets
--   (fetching small ones several at a time); count sums the N counters; scan SCANs each
--   master in turn.  P{meta}buckets records N, P{meta}name-buckets name_buckets.
--
-- CRC16 is pure Lua with arithmetic only: LuaJIT's parser has no bitwise operators and
-- Lua 5.4 has no bit library.

local redis = require "softcxi.store.redis"

local type, tostring, tonumber, pairs, ipairs, setmetatable =
    type, tostring, tonumber, pairs, ipairs, setmetatable
local string_byte, string_format = string.byte, string.format
local math_floor, math_min = math.floor, math.min
local table_sort = table.sort
local is_err = redis.is_err

local _M = { _VERSION = redis._VERSION }

local DEFAULT_BUCKETS = 256
local CHUNK_PER_BUCKET = 64  -- the default chunk: 16,384 keys with 256 buckets
local MAX_ROUNDS = 12        -- redirection / back-off rounds for one pipeline
local RETRY = { retry = true }

-- ---- CRC16-XMODEM (poly 0x1021, init 0), table driven, no bitwise operators --------

-- XOR4[a * 16 + b] = a xor b for nibbles a, b; HI16/HI/LO16/LO split a byte into the
-- nibble offsets XOR4 is indexed by, so a byte xor costs table lookups and no calls.
local XOR4, HI16, HI, LO16, LO = {}, {}, {}, {}, {}
for a = 0, 15 do
    for b = 0, 15 do
        local r, p, x, y = 0, 1, a, b
        for _ = 1, 4 do
            if x % 2 ~= y % 2 then r = r + p end
            x, y, p = math_floor(x / 2), math_floor(y / 2), p * 2
        end
        XOR4[a * 16 + b] = r
    end
end
for v = 0, 255 do
    HI[v], LO[v] = math_floor(v / 16), v % 16
    HI16[v], LO16[v] = HI[v] * 16, LO[v] * 16
end

local function xor8(a, b)
    return XOR4[HI16[a] + HI[b]] * 16 + XOR4[LO16[a] + LO[b]]
end

-- CRC_HI[i], CRC_LO[i]: the two bytes of the CRC table entry for byte i
local CRC_HI, CRC_LO = {}, {}
for i = 0, 255 do
    local hi, lo = i, 0                       -- crc = i << 8
    for _ = 1, 8 do
        local top = hi >= 128
        hi, lo = (hi * 2) % 256 + math_floor(lo / 128), (lo * 2) % 256   -- crc <<= 1
        if top then hi, lo = xor8(hi, 0x10), xor8(lo, 0x21) end           -- crc ^= 0x1021
    end
    CRC_HI[i], CRC_LO[i] = hi, lo
end

--- CRC16-XMODEM of s, the checksum Redis Cluster uses for key slots.
function _M.crc16(s)
    local hi, lo = 0, 0
    for i = 1, #s do
        local c = string_byte(s, i)
        local t = XOR4[HI16[hi] + HI[c]] * 16 + XOR4[LO16[hi] + LO[c]]    -- hi xor c
        local h = CRC_HI[t]
        hi, lo = XOR4[HI16[lo] + HI[h]] * 16 + XOR4[LO16[lo] + LO[h]], CRC_LO[t]
    end
    return hi * 256 + lo
end

-- Faster forms of the same function where the interpreter has bitwise operations: Lua 5.3+
-- operators (compiled from a string: LuaJIT would not parse them) or LuaJIT's bit library.
-- Measured under Lua 5.4: 3.8 us per id with the nibble tables, a fraction of it with
-- operators; the cluster store computes a CRC per id for its bucket.  Both are checked
-- against the portable form when this module loads, and on any difference it stays.
do
    local CRC = {}
    for i = 0, 255 do CRC[i] = CRC_HI[i] * 256 + CRC_LO[i] end
    local fast
    local native = load and load([[
        local CRC, byte = ...
        return function(s)
            local crc = 0
            for i = 1, #s do crc = ((crc << 8) & 0xffff) ~ CRC[((crc >> 8) ~ byte(s, i)) & 0xff] end
            return crc
        end]], "=crc16", "t")
    if native and _VERSION ~= "Lua 5.1" and _VERSION ~= "Lua 5.2" then
        fast = native(CRC, string_byte)
    else
        local ok, bit = pcall(require, "bit")
        if ok and type(bit) == "table" and bit.bxor then
            local bxor, band, lshift, rshift = bit.bxor, bit.band, bit.lshift, bit.rshift
            fast = function(s)
                local crc = 0
                for i = 1, #s do
                    local t = band(bxor(rshift(crc, 8), string_byte(s, i)), 0xff)
                    crc = bxor(band(lshift(crc, 8), 0xffff), CRC[t])
                end
                return crc
            end
        end
    end
    if fast then
        local same = true
        for _, t in ipairs { "", "123456789", "foo", "{user1000}.following", "\0\255\128 x" } do
            if fast(t) ~= _M.crc16(t) then same = false end
        end
        if same then _M.crc16 = fast end
    end
end
local crc16 = _M.crc16

--- The cluster slot of key: CRC16 of its hash tag (the part between the first '{' and
-- the next '}', when not empty) or of the whole key, mod 16384.
function _M.key_slot(key)
    local s = key:find("{", 1, true)
    if s then
        local e = key:find("}", s + 1, true)
        if e and e > s + 1 then key = key:sub(s + 1, e - 1) end
    end
    return crc16(key) % 16384
end
local key_slot = _M.key_slot

-- ---- the router ----------------------------------------------------------------------

local Router = {}
Router.__index = Router
_M.Router = Router

local ASKING = { "ASKING" }

--- A router over the seed addresses ("host:port") with node settings cfg (cfg.T: the
-- transport module of its nodes).
function Router.new(seeds, cfg)
    return setmetatable({
        cfg = cfg, T = cfg.T, seeds = seeds, by_addr = {}, slots = {}, masters = {},
        tag_slots = {}, ntags = 0,
        stats = { moved = 0, ask = 0, tryagain = 0, refresh = 0 },
    }, Router)
end

function Router:node(addr)
    local n = self.by_addr[addr]
    if not n then
        local host, port = addr:match("^(.*):(%d+)$")
        n = self.T.Node.new(host, tonumber(port), self.cfg)
        self.by_addr[addr] = n
    end
    return n
end

-- "host:port" from a reply that may leave the host out (":7002", "?:7002").
local function fix_addr(addr, asked)
    local host, port = addr:match("^(.*):(%d+)$")
    if not host then return addr end
    if host == "" or host == "?" then host = asked.host end
    return host .. ":" .. port
end

--- Load the slot map from the first node that answers CLUSTER SLOTS (known masters
-- first, then the seeds).  true or nil, msg, code.
function Router:refresh()
    self.stats.refresh = self.stats.refresh + 1
    local tried, err, code = {}, "no node to ask", "ECONN"
    local candidates = {}
    for _, a in ipairs(self.masters) do candidates[#candidates + 1] = a end
    for _, a in ipairs(self.seeds) do candidates[#candidates + 1] = a end
    for _, addr in ipairs(candidates) do
        if not tried[addr] then
            tried[addr] = true
            local node = self:node(addr)
            local res, e, c = node:pipeline({ { "CLUSTER", "SLOTS" } }, RETRY)
            local r = res[1]
            if type(r) == "table" and not is_err(r) and #r > 0 then
                local slots, seen, masters = {}, {}, {}
                for _, range in ipairs(r) do
                    local m = range[3]
                    local host = m[1]
                    if host == self.T.null or host == "" or host == "?" then host = node.host end
                    local a = host .. ":" .. string_format("%d", m[2])
                    for s = range[1], range[2] do slots[s] = a end
                    if not seen[a] then
                        seen[a] = true
                        masters[#masters + 1] = a
                    end
                end
                table_sort(masters)
                self.slots, self.masters = slots, masters
                return true
            end
            if is_err(r) then
                err, code = addr .. ": CLUSTER SLOTS: " .. r.err, "EIO"
            elseif e then
                err, code = e, c
                if c == "EAUTH" or c == "EPERM" then return nil, err, code end
            else
                err, code = addr .. ": CLUSTER SLOTS: no slots assigned", "EIO"
            end
        end
    end
    return nil, "no cluster node answered (" .. err .. ")", code
end

-- The store's keys hash by a few tags ({0}..{N-1}, {meta}): remember their slots.
function Router:addr_of(key)
    local tag = key:match("^[^{]*{([^}]*)}")
    local slot
    if tag and tag ~= "" then
        local memo = self.tag_slots
        slot = memo[tag]
        if not slot then
            if self.ntags >= 65536 then   -- not the store's keys: do not grow forever
                memo, self.ntags = {}, 0
                self.tag_slots = memo
            end
            slot = crc16(tag) % 16384
            memo[tag], self.ntags = slot, self.ntags + 1
        end
    else
        slot = key_slot(key)
    end
    return self.slots[slot] or self.masters[1] or self.seeds[1]
end

--- Send cmds (argv arrays with .key), each to the node owning its key, one pipeline per
-- node; follow redirections.  Returns res [, msg, code] as the transport contract says.
function Router:pipeline(cmds, opts)
    local res, err, code = {}, nil, nil
    local pending, ask = {}, {}
    for i = 1, #cmds do pending[i] = i end
    local backoff = 0.01
    for round = 1, MAX_ROUNDS do
        local groups, order = {}, {}
        for _, i in ipairs(pending) do
            local addr = ask[i] or self:addr_of(cmds[i].key)
            local g = groups[addr]
            if not g then
                g = { idx = {}, cmds = {} }
                groups[addr], order[#order + 1] = g, addr
            end
            if ask[i] then
                g.cmds[#g.cmds + 1], g.idx[#g.idx + 1] = ASKING, false
            end
            g.cmds[#g.cmds + 1], g.idx[#g.idx + 1] = cmds[i], i
        end
        local again, nask, refresh, busy = {}, {}, false, false
        for _, addr in ipairs(order) do
            local g, node = groups[addr], self:node(addr)
            local r, e, c = node:pipeline(g.cmds, opts)
            for j, i in ipairs(g.idx) do
                local v = i and r[j]
                local redirected = false
                if is_err(v) then
                    local kind, slot, to = v.err:match("^(%u+) (%d+) (%S+)$")
                    if kind == "MOVED" then
                        self.stats.moved = self.stats.moved + 1
                        self.slots[tonumber(slot)] = fix_addr(to, node)
                        refresh, redirected = true, true
                    elseif kind == "ASK" then
                        self.stats.ask = self.stats.ask + 1
                        nask[i], redirected = fix_addr(to, node), true
                    elseif v.err:find("^TRYAGAIN") or v.err:find("^CLUSTERDOWN") then
                        self.stats.tryagain = self.stats.tryagain + 1
                        busy, redirected = true, true
                    end
                end
                if redirected then
                    again[#again + 1] = i
                    if round == MAX_ROUNDS then res[i] = v end   -- give up: the last answer
                elseif i and v ~= nil then
                    res[i] = v
                end
            end
            if e then
                -- Unanswered commands stay nil.  A read goes once more after a map refresh
                -- (the node may have failed over); a write may have run: report it.
                refresh = true
                if opts and opts.retry and round == 1 then
                    for j, i in ipairs(g.idx) do
                        if i and r[j] == nil then again[#again + 1] = i end
                    end
                else
                    err, code = e, c
                end
            end
        end
        if refresh then self:refresh() end
        if #again == 0 then break end
        if busy then
            self.T.sleep(backoff)
            backoff = math_min(backoff * 2, 0.5)
        end
        pending, ask = again, nask
    end
    return res, err, code
end

--- The masters, in address order (scan pages through them by position).
function Router:nodes()
    local out = {}
    for i, addr in ipairs(self.masters) do out[i] = self:node(addr) end
    return out
end

--- WAIT on every node written since the last wait; the fewest acknowledgements.
function Router:wait(n, ms)
    local least = n
    for _, node in pairs(self.by_addr) do
        if node.dirty then
            local acked, err, code = node:wait(n, ms)
            if not acked then return nil, err, code end
            if acked < least then least = acked end
        end
    end
    return least
end

function Router:close()
    for _, node in pairs(self.by_addr) do node:close() end
end

--- Test hook: point every slot at the wrong master, so every command is answered MOVED.
function Router:_scramble()
    local m = self.masters
    if #m < 2 then return end
    local next_of = {}
    for i, a in ipairs(m) do next_of[a] = m[i % #m + 1] end
    for s = 0, 16383 do
        local a = self.slots[s]
        if a then self.slots[s] = next_of[a] end
    end
end

-- ---- open ------------------------------------------------------------------------------

--- store.open("redis-cluster://...") lands here with rest = "//...".
function _M.open(rest, opts, url)
    local fn = "store.redis_cluster.open"
    local u, err = redis.parse_url(rest)
    if not u then return nil, fn .. ": " .. err, "EINVAL" end
    if u.db and u.db ~= 0 then return nil, fn .. ": a cluster has database 0 only", "EINVAL" end
    local cfg
    cfg, err = redis.config(fn, u, opts)
    if not cfg then return nil, err, "EINVAL" end
    local P = cfg.prefix
    if P:find("[{}]") then
        return nil, fn .. ": the prefix must not contain '{' or '}' (the store's hash tags)", "EINVAL"
    end
    local nb = cfg.buckets or DEFAULT_BUCKETS
    if nb > 16384 then return nil, fn .. ": buckets must be at most 16384", "EINVAL" end
    -- A chunk is split into one script call per bucket: 1,000 keys over 256 buckets are
    -- ~4 keys a call, and per-call costs dominate (docs/scaling.md).  Unless chunk= is
    -- given, a chunk holds CHUNK_PER_BUCKET keys per bucket on average.
    if u.query.chunk == nil and (type(opts) ~= "table" or opts.chunk == nil) then
        cfg.chunk = CHUNK_PER_BUCKET * nb
    end

    local can, phase = true, nil
    if cfg.T.cosockets then can, phase = cfg.T.cosockets() end
    if not can then
        return nil, fn .. ": no cosockets in nginx's '" .. tostring(phase) .. "' phase: open a "
            .. "cluster store in a request handler or an ngx.timer (it reads the slot map)", "EINVAL"
    end
    local seeds = {}
    for i, h in ipairs(u.hosts) do seeds[i] = h.host .. ":" .. h.port end
    local router = Router.new(seeds, cfg)
    local ok, code
    ok, err, code = router:refresh()
    if not ok then return nil, fn .. ": " .. err, code end

    local tags = {}
    for b = 0, nb - 1 do tags[b] = string_format("{%d}", b) end
    local s = redis.new(router, cfg, {
        name = "store.redis_cluster", cluster = true, buckets = nb, tags = tags,
        bucket_of = function(id) return crc16(id) % nb end,
        key_id = function(key)
            local pos = key:match("^{%d+}k:()", #P + 1)
            return pos and key:sub(pos) or nil
        end,
        match = redis.glob_escape(P) .. "{*}k:*",
    })
    s.url = url and url:gsub("//[^@/]*@", "//***@")
    -- softcxi.provision's default batch: as many keys as one chunk
    s.preferred_batch = cfg.chunk

    -- The bucket count decides where every id lives: record it, refuse another one.
    local meta = P .. "{meta}buckets"
    local res
    res, err, code = router:pipeline({ { "SET", meta, nb, "NX", key = meta }, { "GET", meta, key = meta } })
    if err then return nil, fn .. ": " .. err, code end
    local have = res[2]
    if is_err(have) then return nil, fn .. ": " .. have.err, "EIO" end
    if tonumber(have) ~= nb then
        router:close()
        return nil, string_format("%s: the store under prefix '%s' was created with buckets=%s, not %d",
                                  fn, P, tostring(have), nb), "EINVAL"
    end
    -- the name index record, or the refusal of an old layout (or its upgrade)
    ok, err, code = redis.ready(s, fn)
    if not ok then
        router:close()
        return nil, err, code
    end
    return s
end

return _M
