-- What Redis's CPU pays per key for each way of indexing a new key, with no client or
-- generator work in the measure: COUNT keys (default 200,000) written in slices of 250,
-- as the Redis store's transaction sends them (a 203-byte blob per key, ids and names as
-- provisioning makes them, 16 name hashes), once per mix of commands below, each into an
-- emptied database.  Prints the server's CPU per key (INFO cpu) and used_memory per key.
--
--   lua5.4 bench/redis_index_cost.lua PORT [COUNT]     (bench/redis_index_cost.sh starts a Redis)
--
-- The mixes: MSET alone (blobs, nothing else: the floor of any Redis store); with the
-- existence check (EXISTS); with each index structure alone (SADD to one set of ids;
-- HMGET + HSET of the name hashes; ZADD of name\0id to 16 sorted sets, read-free); the
-- store's present mix (EXISTS, HMGET, MSET, HSET, SADD group, SADD algo); and indexes kept
-- as append-only strings (one APPEND per slice and index: ids, or name\0id per bucket), a
-- layout softcxi does not have, measured as the next lever (docs/scaling.md).
local hiredis = require "softcxi.hiredis"
local port = assert(tonumber(arg[1]), "usage: redis_index_cost.lua PORT [COUNT]")
local N = tonumber(arg[2] or "") or 200000
local SLICE, BUCKETS = 250, 16
local c = assert(hiredis.connect("127.0.0.1", port, 30))
local blob = string.rep("x", 203)

local function info(section, field)
    local st = assert(c:command { "INFO", section })
    return st:match(field .. ":([%d.]+)")
end
local function server_cpu()
    return tonumber(info("cpu", "used_cpu_user")) + tonumber(info("cpu", "used_cpu_sys"))
end

local MIXES = {
    { "mset" },
    { "mset", "exists" },
    { "mset", "sadd_group" },
    { "mset", "hmget", "hset" },
    { "mset", "zadd" },
    { "mset", "exists", "hmget", "hset", "sadd_group", "sadd_algo" },
    { "mset", "append_group" },
    { "mset", "exists", "append_name", "append_group", "append_algo" },
}

print(("redis_index_cost: %d keys per mix, slices of %d, %d name buckets"):format(N, SLICE, BUCKETS))
for _, mix in ipairs(MIXES) do
    assert(c:command { "FLUSHALL" })
    local mem0 = tonumber(info("memory", "used_memory"))
    local has = {}
    for _, m in ipairs(mix) do has[m] = true end
    local c0 = server_cpu()
    for first = 1, N, SLICE do
        local mset, exists = { "MSET" }, { "EXISTS" }
        local hmget, hset, zadd, names = {}, {}, {}, {}
        local sadd_g, sadd_a = { "SADD", "p:idx:group:bench" }, { "SADD", "p:idx:algo:ec" }
        local ids = {}
        for i = first, math.min(N, first + SLICE - 1) do
            local name = ("dev-%08d"):format(i)
            local id = "bench/" .. name
            local key = "p:k:" .. id
            mset[#mset + 1], mset[#mset + 2] = key, blob
            exists[#exists + 1] = key
            local b = i % BUCKETS
            if not hmget[b] then
                hmget[b], hset[b], zadd[b], names[b] = { "HMGET", "p:nx:" .. b }, { "HSET", "p:nx:" .. b },
                    { "ZADD", "p:nz:" .. b }, {}
            end
            local t = hmget[b]
            t[#t + 1] = name
            t = hset[b]
            t[#t + 1], t[#t + 2] = name, id
            t = zadd[b]
            t[#t + 1], t[#t + 2] = 0, name .. "\0" .. id
            t = names[b]
            t[#t + 1] = name .. "\0" .. id
            sadd_g[#sadd_g + 1], sadd_a[#sadd_a + 1] = id, id
            ids[#ids + 1] = id
        end
        local seg = math.floor(first / 65536) -- an append-only index string per 64k keys
        local cmds = {}
        local function add(cmd) cmds[#cmds + 1] = cmd end
        if has.exists then add(exists) end
        for b = 0, BUCKETS - 1 do if has.hmget and hmget[b] then add(hmget[b]) end end
        add(mset)
        for b = 0, BUCKETS - 1 do
            if has.hset and hset[b] then add(hset[b]) end
            if has.zadd and zadd[b] then add(zadd[b]) end
            if has.append_name and names[b] then
                add({ "APPEND", "p:ix:name:" .. b .. ":" .. seg, table.concat(names[b], "\0") .. "\0" })
            end
        end
        if has.sadd_group then add(sadd_g) end
        if has.sadd_algo then add(sadd_a) end
        local list = table.concat(ids, "\0") .. "\0"
        if has.append_group then add({ "APPEND", "p:ix:group:bench:" .. seg, list }) end
        if has.append_algo then add({ "APPEND", "p:ix:algo:ec:" .. seg, list }) end
        for _, cmd in ipairs(cmds) do assert(c:append(cmd)) end
        for _ = 1, #cmds do
            local r = c:get_reply()
            assert(type(r) ~= "table" or not r.err, type(r) == "table" and r.err or nil)
        end
    end
    local cpu = (server_cpu() - c0) / N * 1e6
    local mem = (tonumber(info("memory", "used_memory")) - mem0) / N
    print(("redis_index_cost %-55s %5.2f us/key server, %4.0f bytes/key")
        :format(table.concat(mix, "+"), cpu, mem))
end
