-- Request handlers for spec/store_nginx_spec.lua: the store contract run inside a real nginx
-- worker, over the resty transport (cosockets).  Each handler prints one line per check,
-- "ok <name>" or "FAIL <name>: <why>"; the spec reads them over HTTP.
--
-- store_test_config (written by the spec beside nginx.conf) gives the URLs and the blobs
-- (hex), made by the spec with a softcxi device outside nginx.

local store = require "softcxi.store"
local cfg = require "store_test_config"

local _M = {}

local function unhex(h)
    return (h:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

local BLOBS = {}
for i, h in ipairs(cfg.blobs) do BLOBS[i] = unhex(h) end
local IDS = cfg.ids

-- A store opened in init_worker_by_lua, where nginx has no cosockets: it must open without
-- connecting and work from any request later (it holds no connection between calls).
local worker_store

function _M.init_worker()
    local s, err, code = store.open(cfg.url .. "&prefix=" .. cfg.prefix .. "w:")
    if not s then
        ngx.log(ngx.ERR, "store.open in init_worker: ", err, " ", code)
        return
    end
    worker_store = s
end

local out
local function check(name, cond, why)
    if cond then
        out[#out + 1] = "ok " .. name
    else
        out[#out + 1] = "FAIL " .. name .. ": " .. tostring(why)
    end
end

local function code_of(...)
    local r = { ... }
    return r[3], r[2]
end

-- The store contract, as spec/store_spec.lua checks it, on url with prefix P.
local function contract(tag, url)
    local s, err, code = store.open(url)
    check(tag .. " open", s, tostring(err) .. " " .. tostring(code))
    if not s then return end
    check(tag .. " transport is resty", s.transport_name == "resty", s.transport_name)
    local a, b = BLOBS[1], BLOBS[2]
    check(tag .. " put", s:put("x", a) == true)
    check(tag .. " get is byte for byte", s:get("x") == a)
    local c, m = code_of(s:put("x", b))
    check(tag .. " put of a taken id is EEXIST", c == "EEXIST", m)
    check(tag .. " overwrite", s:put("x", b, { overwrite = true }) == true and s:get("x") == b)
    c, m = code_of(s:put("x", a, { if_match = a }))
    check(tag .. " stale if_match is ECONFLICT", c == "ECONFLICT", m)
    check(tag .. " if_match", s:put("x", a, { if_match = b }) == true and s:get("x") == a)
    c, m = code_of(s:put("y", "not a blob"))
    check(tag .. " a non-blob is EFORMAT", c == "EFORMAT", m)
    check(tag .. " delete", s:delete("x") == true)
    c, m = code_of(s:get("x"))
    check(tag .. " get of a deleted id is ENOTFOUND", c == "ENOTFOUND", m)

    local items = {}
    for i = 3, #BLOBS do items[#items + 1] = { blob = BLOBS[i] } end
    local n, skipped = s:put_many(items, { chunk = 50 })
    check(tag .. " put_many", n == #items and skipped == 0, tostring(n) .. " " .. tostring(skipped))
    n, skipped = s:put_many(items, { skip_existing = true })
    check(tag .. " put_many skip_existing", n == 0 and skipped == #items,
          tostring(n) .. " " .. tostring(skipped))
    local got = s:get_many(IDS)
    local same = got ~= nil
    for i, id in ipairs(IDS) do same = same and got[id] == BLOBS[i + 2] end
    check(tag .. " get_many", same)
    check(tag .. " count", s:count() == #items, s:count())
    local seen, cursor, pages = {}, nil, 0
    repeat
        local ids
        ids, cursor = s:scan(cursor, 17)
        if not ids then break end
        for _, id in ipairs(ids) do seen[#seen + 1] = id end
        pages = pages + 1
    until not cursor or pages > 1000
    check(tag .. " scan visits every id", #seen >= #items and pages > 1,
          #seen .. " ids in " .. pages .. " pages")
    local found, fc = {}, nil
    repeat
        local ids
        ids, fc = s:find({ group = cfg.group }, fc, 25)
        if not ids then break end
        for _, id in ipairs(ids) do found[#found + 1] = id end
    until not fc
    check(tag .. " find by group", #found == #items, #found)
    local cas = {}
    for i, id in ipairs(IDS) do cas[i] = { id = id, blob = BLOBS[i + 2], if_match = BLOBS[i + 2] } end
    n = s:put_many(cas)
    check(tag .. " put_many with if_match", n == #cas, n)
    for _, id in ipairs(IDS) do s:delete(id) end
    check(tag .. " count after deletes", s:count() == 0, s:count())
    check(tag .. " close", s:close() == true)
    local ok, e = pcall(s.get, s, "x")
    check(tag .. " a closed store raises", not ok and tostring(e):find("closed", 1, true), e)
end

function _M.contract()
    out = {}
    contract("redis", cfg.url .. "&prefix=" .. cfg.prefix)
    if cfg.curl then contract("cluster", cfg.curl .. "?prefix=" .. cfg.prefix) end
    if cfg.socket_url then contract("redis+unix", cfg.socket_url .. "&prefix=" .. cfg.prefix .. "u:") end

    -- the store opened in init_worker_by_lua (no cosockets there)
    check("init_worker store exists", worker_store ~= nil)
    if worker_store then
        check("init_worker store works in a request", worker_store:put("w", BLOBS[1]) == true
              and worker_store:get("w") == BLOBS[1] and worker_store:delete("w") == true)
    end

    -- Redis not there: a runtime error, not a raise, and no worker blocked
    local s, err, code = store.open(cfg.dead_url)
    check("a dead server is ECONN", s == nil and code == "ECONN", tostring(err) .. " " .. tostring(code))

    -- the blobs the spec wrote through hiredis read back through cosockets: one layout
    s = store.open(cfg.url .. "&prefix=" .. cfg.prefix .. "h:")
    check("reads what hiredis wrote", s and s:get("from-hiredis") == BLOBS[1])
    if s then
        check("writes what hiredis reads", s:put("from-nginx", BLOBS[2]) == true)
        s:close()
    end
    ngx.say(table.concat(out, "\n"))
end

-- Pooling: a second operation takes the connection the first one gave back (over TCP, and
-- over the Unix socket when there is one).
local function pool(tag, url)
    local s = store.open(url)
    check(tag .. " opens on the resty transport", s and s.transport_name == "resty")
    if not s then return end
    local node = s.transport
    local red1, reused1 = node:acquire()
    local r1 = red1:get_reused_times()
    red1:set_keepalive(60000, 8)
    local red2, reused2 = node:acquire()
    check(tag .. " a released connection is reused", reused2 == true and red2:get_reused_times() > r1,
          tostring(reused1) .. " " .. tostring(reused2))
    red2:set_keepalive(60000, 8)
    s:count()
    check(tag .. " an operation leaves no connection in the store", node.red == nil)
    s:close()
end

function _M.pool()
    out = {}
    pool("redis", cfg.url .. "&prefix=" .. cfg.prefix .. "p:")
    if cfg.socket_url then pool("redis+unix", cfg.socket_url .. "&prefix=" .. cfg.prefix .. "p:") end
    ngx.say(table.concat(out, "\n"))
end

return _M
