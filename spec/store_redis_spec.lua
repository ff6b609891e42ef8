-- Redis-specific tests of the Redis and Redis Cluster stores; the contract every store
-- meets is spec/store_spec.lua.  Here: the hiredis binding, AUTH and ACL users, index
-- and counter kept in step with the blobs, values under the prefix that are not blobs,
-- reconnects, WAIT, Redis killed in the middle of put_many, cluster key slots, MOVED
-- and ASK, index bucketing.
--
-- Uses the servers ./run test starts (SOFTCXI_TEST_REDIS_URL,
-- SOFTCXI_TEST_REDIS_CLUSTER_URL) and starts throw-away redis-servers of its own on free
-- loopback ports for the tests that kill or replicate one; each is stopped by PID.
-- Pending when the variables are unset.

local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")

local have_hiredis, hiredis = pcall(require, "softcxi.hiredis")
local URL = os.getenv("SOFTCXI_TEST_REDIS_URL")
local CURL = os.getenv("SOFTCXI_TEST_REDIS_CLUSTER_URL")
if URL == "" then URL = nil end
if CURL == "" then CURL = nil end

if not have_hiredis then
    describe("redis stores", function()
        pending("softcxi.hiredis is not built (libhiredis-dev missing)")
    end)
    return
end

local softcxi = require "softcxi"
local store = require "softcxi.store"
local redis = require "softcxi.store.redis"
local cluster = require "softcxi.store.redis_cluster"

local function urandom_hex(n)
    local f = assert(io.open("/dev/urandom", "rb"))
    local r = f:read(n)
    f:close()
    return H.hex(r)
end

local RUN = urandom_hex(4)
local seq = 0

--- A fresh prefix for one test: nothing of another test or run is under it.
local function fresh_prefix()
    seq = seq + 1
    return "t" .. RUN .. "-" .. seq .. ":"
end

--- url with its prefix= replaced by (or extended with) p, and extra query parameters.
local function with_prefix(url, p, extra)
    if url:find("[?&]prefix=") then
        url = url:gsub("([?&]prefix=)[^&]*", "%1" .. p)
    else
        url = url .. (url:find("?", 1, true) and "&" or "?") .. "prefix=" .. p
    end
    return url .. (extra or "")
end

local function open(url)
    local s, msg, code = store.open(url)
    assert(s, "store.open(" .. url .. "): " .. tostring(msg) .. " " .. tostring(code))
    return s
end

-- ---- blobs ------------------------------------------------------------------------

local dev
local function device()
    dev = dev or H.new_device()
    return dev.hsm
end

--- n EC blobs named name-1..name-n in group (specifier i % 2).
-- The ids the index holds for field = value: a set's members (specifier, group, algo);
-- for a name, its field in its index hash: the one id, or '' and then its set's members.
local function index_members(c, s, P, field, value)
    local function q(argv)
        local v, m = c:command(argv)
        assert(v ~= nil, m)
        return v
    end
    if field ~= "name" then return q { "SMEMBERS", P .. "idx:" .. field .. ":" .. value } end
    local v = q { "HGET", s:name_key("any", value), value }
    if v == "" then return q { "SMEMBERS", P .. "idx:name:" .. value } end
    assert.are.equal(0, q { "EXISTS", P .. "idx:name:" .. value })   -- one id: no set
    return v == hiredis.null and {} or { v }
end

local function make_blobs(n, name, group)
    local out = {}
    for i = 1, n do
        out[i] = H.gen(device(), { algo = "ec", curve = "P-256", name = name .. "-" .. i, group = group,
                                   specifier = i % 2, usage = { "sign" } })
    end
    return out
end

local function items_of(blobs)
    local items = {}
    for i, b in ipairs(blobs) do items[i] = { blob = b } end
    return items
end

local function ids_of(blobs)
    local ids = {}
    for i, b in ipairs(blobs) do ids[i] = assert(store.id_of(b)) end
    return ids
end

--- Every id of a store through scan; returns the list, the skipped total and #pages.
local function scan_all(s, count)
    local out, cursor, skipped, pages = {}, nil, 0, 0
    repeat
        local ids, nxt, sk = s:scan(cursor, count or 50)
        assert(ids, tostring(nxt))
        for _, id in ipairs(ids) do out[#out + 1] = id end
        skipped, cursor, pages = skipped + sk, nxt, pages + 1
        assert(pages < 10000, "scan does not end")
    until not cursor
    return out, skipped, pages
end

local function set_of(list)
    local s = {}
    for _, v in ipairs(list) do s[v] = (s[v] or 0) + 1 end
    return s
end

--- Every key matching pattern, over a full SCAN of the connection's server.
local function scan_keys(c, pattern)
    local out, cursor = {}, "0"
    repeat
        local r, m = c:command({ "SCAN", cursor, "MATCH", pattern, "COUNT", 1000 })
        assert(r ~= nil, m)
        cursor = r[1]
        for _, k in ipairs(r[2]) do out[#out + 1] = k end
    until cursor == "0"
    table.sort(out)
    return out
end

--- All ids of find(filter), paging by limit.
local function sorted_ids(t)
    table.sort(t)
    return t
end

local function find_all(s, filter, limit)
    local out, cursor, pages = {}, nil, 0
    repeat
        local ids, nxt = s:find(filter, cursor, limit or 100)
        assert(ids, tostring(nxt))
        for _, id in ipairs(ids) do out[#out + 1] = id end
        cursor, pages = nxt, pages + 1
        assert(pages < 10000, "find does not end")
    until not cursor
    table.sort(out)
    return out
end

--- The keys an older softcxi wrote for blobs (a list of { id, blob }) under prefix P: the
-- blob, a set per attribute value, the name's included (P idx:name:<name>), the counter;
-- tag(id) is the key infix ("" on one server, "{b}" in a cluster).  put(argv) runs one
-- command routed by its key.  Returns the name sets' keys.
local function old_layout(put, P, blobs, tag)
    local counts, name_sets = {}, {}
    for _, e in ipairs(blobs) do
        local id, blob = e[1], e[2]
        local info = assert(softcxi.key_info(blob))
        local base = P .. tag(id)
        put { "SET", base .. "k:" .. id, blob }
        for _, f in ipairs { "name", "specifier", "group", "algo" } do
            local v = info[f]
            if v ~= nil then
                local k = base .. "idx:" .. f .. ":" .. (f == "specifier" and string.format("%d", v) or v)
                put { "SADD", k, id }
                if f == "name" then name_sets[k] = true end
            end
        end
        counts[base .. "n"] = (counts[base .. "n"] or 0) + 1
    end
    for k, n in pairs(counts) do put { "SET", k, n } end
    local keys = {}
    for k in pairs(name_sets) do keys[#keys + 1] = k end
    table.sort(keys)
    return keys
end

-- ---- throw-away servers -------------------------------------------------------------

local servers = {}   -- every server this file started, to stop whatever happens

local function port_open(port)
    local c = hiredis.connect("127.0.0.1", port, 0.5)
    if not c then return false end
    local pong = c:command { "PING" }
    c:close()
    return pong == "PONG"
end

local function free_port()
    for _ = 1, 200 do
        local hex = urandom_hex(2)
        local p = 20000 + tonumber(hex, 16) % 20000
        if not hiredis.connect("127.0.0.1", p, 0.2) then return p end
    end
    error("no free port")
end

-- Running, not a zombie: a server started through a shell has init as its parent, which
-- reaps it when it pleases.
local function alive(pid)
    local f = io.open("/proc/" .. pid .. "/stat", "rb")
    if not f then return false end
    local stat = f:read("*a") or ""
    f:close()
    return stat:match("^%d+ %b() (%a)") ~= "Z"
end

--- Stop a server by PID (signal: "TERM" or "KILL"): wait until it is gone, and if a
-- TERM is not enough within 5 s, KILL it.  No redis-server of ours outlives the file.
local function stop_server(srv, signal)
    if not srv.pid then return end
    for _, sig in ipairs { signal or "TERM", "KILL" } do
        os.execute("kill -" .. sig .. " " .. srv.pid .. " 2>/dev/null")
        for _ = 1, 100 do
            if not alive(srv.pid) then
                srv.pid = nil
                return
            end
            hiredis.sleep(0.05)
        end
    end
end

--- A redis-server on a free port (or on port), data in dir, with extra arguments.
local function start_server(dir, extra, port)
    for _ = 1, 5 do
        local p = port or free_port()
        local cmd = string.format("redis-server --port %d --bind 127.0.0.1 --save '' --dir %s "
            .. "--daemonize no --logfile %s %s </dev/null >/dev/null 2>&1 & echo \"pid=$!\"",
            p, H.q(dir), H.q(dir .. "/redis-" .. p .. ".log"), extra or "--appendonly no")
        local _, out = H.run(cmd)
        local srv = { port = p, pid = tonumber(out:match("pid=(%d+)")), dir = dir }
        servers[#servers + 1] = srv
        for _ = 1, 100 do
            if port_open(p) then return srv end
            hiredis.sleep(0.05)
        end
        stop_server(srv, "KILL")
    end
    error("could not start redis-server in " .. dir)
end

local function admin(port)
    return assert(hiredis.connect("127.0.0.1", port, 5))
end

local function cmd(c, argv)
    local r, msg, code = c:command(argv)
    assert(r ~= nil, table.concat(argv, " ") .. ": " .. tostring(msg) .. " " .. tostring(code))
    return r
end

local tmp_root = H.tmpdir()

teardown(function()
    for _, srv in ipairs(servers) do stop_server(srv, "KILL") end
    if dev then H.destroy(dev) end
    H.rm_rf(tmp_root)
end)

-- ---- CRC16 and slots (no server needed) ------------------------------------------------

describe("redis cluster key slots", function()
    it("CRC16-XMODEM and hash tags give Redis's slots, under Lua 5.4 and LuaJIT alike", function()
        assert.are.equal(0x31C3, cluster.crc16("123456789"))
        assert.are.equal(0, cluster.crc16(""))
        assert.are.equal(12182, cluster.key_slot("foo"))
        assert.are.equal(cluster.key_slot("{user1000}.following"), cluster.key_slot("{user1000}.followers"))
        assert.are.equal(cluster.key_slot("user1000"), cluster.key_slot("{user1000}.following"))
        -- an empty tag does not count; only the first { and the next } do
        assert.are.equal(cluster.crc16("foo{}{bar}") % 16384, cluster.key_slot("foo{}{bar}"))
        assert.are.equal(cluster.key_slot("{bar"), cluster.key_slot("foo{{bar}}zap"))
        assert.are.equal(cluster.key_slot("bar"), cluster.key_slot("foo{bar}{zap}"))
        assert.are.equal("number", type(cluster.key_slot("\0\255binary")))
    end)
end)

if not URL then
    describe("redis store", function()
        pending("SOFTCXI_TEST_REDIS_URL is not set (./run test starts a Redis)")
    end)
    return
end

local MAIN = assert(redis.parse_url(URL:match("^redis:(.*)$"))).hosts[1]

--- Pages of every size visit every id exactly once, through scan, find({}) and find by
-- group, with other keys under the prefix and elsewhere in the database.
local function check_paging(s, tag)
    local blobs = make_blobs(40, "pg" .. tag .. RUN, "gpg" .. tag)
    assert.are.equal(40, s:put_many(items_of(blobs)))
    local want = set_of(ids_of(blobs))
    for _, n in ipairs { 1, 3, 4, 7, 39, 40, 1000 } do
        local ids = scan_all(s, n)
        assert.are.same(want, set_of(ids), "scan count " .. n)
        for _, filter in ipairs { {}, { group = "gpg" .. tag } } do
            local got, cursor, pages = {}, nil, 0
            repeat
                local page
                page, cursor = s:find(filter, cursor, n)
                assert.is_true(#page <= n)
                for _, id in ipairs(page) do got[#got + 1] = id end
                pages = pages + 1
            until not cursor or pages > 1000
            assert.are.same(want, set_of(got), "find limit " .. n)
        end
    end
    H.expect_err("EINVAL", s:find({}, "nonsense", 3))
    H.expect_err("EINVAL", s:find({ colour = "red" }))
    for _, id in ipairs(ids_of(blobs)) do assert.is_true(s:delete(id)) end
end

-- ---- the binding -----------------------------------------------------------------------

describe("softcxi.hiredis", function()
    local c, P

    before_each(function()
        c = admin(MAIN.port)
        P = fresh_prefix()
    end)

    after_each(function()
        c:close()
    end)

    it("is binary safe both ways and maps every reply type", function()
        local key, val = P .. "bin\0ary\r\n", "\0\1\2\255 value\0"
        assert.are.equal("OK", c:command { "SET", key, val })          -- status -> string
        assert.are.equal(val, c:command { "GET", key })                -- bulk, with NULs
        assert.are.equal(hiredis.null, c:command { "GET", P .. "none" }) -- nil -> null
        assert.are.equal(5, c:command { "INCRBY", P .. "n", 5 })       -- integer; numbers in argv
        local arr = c:command { "MGET", key, P .. "none" }            -- array, null inside
        assert.are.same({ val, hiredis.null }, arr)
        local r = H.pack(c:command { "HSET", key, "f", "v" })          -- error -> nil, text, EREDIS
        assert.is_nil(r[1])
        assert.truthy(r[2]:find("^WRONGTYPE"), r[2])
        assert.are.equal("EREDIS", r[3])
        local nested = c:command { "EVAL", "return {1, 'a', {2}, redis.error_reply('boom')}", 0 }
        assert.are.same({ 1, "a", { 2 } }, { nested[1], nested[2], nested[3] })
        assert.truthy(nested[4].err:find("boom$"), nested[4].err)   -- error inside -> { err = }
        c:command { "DEL", key, P .. "n" }
    end)

    it("pipelines with append and get_reply", function()
        for i = 1, 100 do assert.is_true(c:append { "SET", P .. i, i }) end
        assert.is_true(c:append { "GET", P .. 42 })
        assert.are.equal(101, c:pending())
        for _ = 1, 100 do assert.are.equal("OK", c:get_reply()) end
        assert.are.equal("42", c:get_reply())
        assert.are.equal(0, c:pending())
        local keys = { "DEL" }
        for i = 1, 100 do keys[#keys + 1] = P .. i end
        assert.are.equal(100, c:command(keys))
        -- a long argv (past the binding's stack arrays) with numbers and binary strings
        local argv, want = { "RPUSH", P .. "list" }, {}
        for i = 1, 60 do
            local v = (i % 3 == 0) and i or (i % 3 == 1) and (i + 0.5) or ("\0" .. i .. "\255")
            argv[#argv + 1] = v
            want[i] = type(v) == "number" and tostring(v) or v
        end
        assert.are.equal(60, c:command(argv))
        assert.are.same(want, c:command { "LRANGE", P .. "list", 0, -1 })
        c:command { "DEL", P .. "list" }
        -- flush sends what is queued now; the replies wait, in order, until read
        assert.is_true(c:append { "SET", P .. "f", "sent" })
        assert.is_true(c:flush())
        assert.is_true(c:flush())                       -- nothing queued: a no-op
        local other = admin(MAIN.port)
        for _ = 1, 50 do
            if other:command { "GET", P .. "f" } == "sent" then break end
            hiredis.sleep(0.01)
        end
        assert.are.equal("sent", other:command { "GET", P .. "f" })   -- ran before any read
        other:close()
        assert.is_true(c:append { "DEL", P .. "f" })
        assert.are.equal(2, c:pending())
        assert.are.equal("OK", c:get_reply())
        assert.are.equal(1, c:get_reply())
    end)

    it("raises on misuse and returns ECONN for a refused connection", function()
        assert.has_error(function() c:get_reply() end, "softcxi.hiredis: get_reply with no command pending")
        assert.has_error(function() c:command {} end)
        assert.has_error(function() c:command { "GET", {} } end)
        c:append { "PING" }
        assert.has_error(function() c:command { "PING" } end)   -- a reply is still pending
        assert.are.equal("PONG", c:get_reply())
        local r = H.pack(hiredis.connect("127.0.0.1", free_port(), 0.5))
        assert.is_nil(r[1])
        assert.truthy(r[2]:find("127.0.0.1:", 1, true), r[2])
        assert.are.equal("ECONN", r[3])
        r = H.pack(hiredis.connect_unix("/nonexistent/softcxi.sock", 0.5))
        assert.is_nil(r[1])
        assert.truthy(r[2]:find("unix:/nonexistent/softcxi.sock", 1, true), r[2])
        assert.are.equal("ECONN", r[3])
        -- longer than sun_path holds: refused, never cut short onto another socket
        r = H.pack(hiredis.connect_unix("/tmp/" .. string.rep("s", 120), 0.5))
        assert.is_nil(r[1])
        assert.truthy(r[2]:find("the socket path is too long (107 bytes at most)", 1, true), r[2])
        assert.are.equal("EINVAL", r[3])
        assert.has_error(function() hiredis.connect_unix("") end)
        assert.has_error(function() hiredis.connect_unix("/a\0b") end)
        c:close()
        c:close()                                               -- twice is fine
        assert.has_error(function() c:command { "PING" } end, "softcxi.hiredis: the connection is closed")
        assert.truthy(tostring(c):find("closed"))
    end)

    it("a server that dies gives ECONN, never SIGPIPE, and the connection stays dead", function()
        local dir = tmp_root .. "/dies"
        H.mkdir_p(dir)
        local srv = start_server(dir)
        local d = admin(srv.port)
        assert.are.equal("PONG", d:command { "PING" })
        stop_server(srv, "KILL")
        -- 2 MB in one pipeline: the writes after the peer's reset would raise SIGPIPE
        local big = ("x"):rep(1024)
        for i = 1, 2000 do d:append { "SET", "k" .. i, big } end
        local r = H.pack(d:get_reply())
        assert.is_nil(r[1])
        assert.are.equal("ECONN", r[3], r[2])
        assert.is_false(d:alive())
        assert.are.equal(0, d:pending())
        H.expect_err("ECONN", d:command { "PING" })
        H.expect_err("ECONN", d:flush())
        d:close()
        -- flush itself meets the dead peer: ECONN, nothing pending, no SIGPIPE.  The
        -- first write after the peer's FIN succeeds by TCP's rules, and when the socket
        -- buffer takes all 2 MB in that write, flush has nothing left to fail on: then
        -- the next flush meets the reset (this was a flaky failure under load).
        srv = start_server(dir)
        d = admin(srv.port)
        stop_server(srv, "KILL")
        local r2
        for _ = 1, 20 do
            for i = 1, 2000 do d:append { "SET", "k" .. i, big } end
            r2 = H.pack(d:flush())
            if r2[1] == nil then break end
        end
        H.expect_err("ECONN", r2[1], r2[2], r2[3])
        assert.is_false(d:alive())
        assert.are.equal(0, d:pending())
        d:close()
    end)
end)

-- ---- the single-server store ----------------------------------------------------------------

describe("redis store", function()
    local c

    before_each(function()
        c = admin(MAIN.port)
    end)

    after_each(function()
        c:close()
    end)

    it("parses its URL and refuses bad ones (EINVAL), never echoing a password", function()
        local u = assert(redis.parse_url("//us%40er:p%3Ass@[::1]:7000/3?prefix=a%3Ab:&timeout=0.5"))
        assert.are.equal("us@er", u.user)
        assert.are.equal("p:ss", u.password)
        assert.are.equal("::1", u.hosts[1].host)
        assert.are.equal(7000, u.hosts[1].port)
        assert.are.equal(3, u.db)
        assert.are.equal("a:b:", u.query.prefix)
        u = assert(redis.parse_url("//:only@localhost"))
        assert.is_nil(u.user)
        assert.are.equal("only", u.password)
        assert.are.equal(6379, u.hosts[1].port)
        for _, bad in ipairs { "redis:localhost", "redis://h:0", "redis://h:99999", "redis://h:1/x",
                               "redis://h:1?bogus=1", "redis://h:1?timeout=-1", "redis://a:1,b:2",
                               "redis://nocolon@h:1", "redis://h:1?buckets=4",
                               "redis://h:1?wait_replicas=1.5", "redis://h:1?transport=bogus" } do
            H.expect_err("EINVAL", store.open(bad))
        end
        -- outside nginx there is no resty transport; auto is hiredis
        local msg = H.expect_err("EINVAL", store.open("redis://h:1?transport=resty"))
        assert.truthy(msg:find("resty transport is not available", 1, true), msg)
        local s = open(URL .. "&transport=auto")
        assert.are.equal("hiredis", s.transport_name)
        s:close()
        msg = H.expect_err("EINVAL", store.open("redis://u:s3cr3t@h:1?bogus=1"))
        assert.is_nil(msg:find("s3cr3t", 1, true), msg)
    end)

    it("redis+unix:// reaches the server over its Unix socket: URL, AUTH, database, errors",
       function()
        local sock = os.getenv("SOFTCXI_TEST_REDIS_SOCKET")
        if not sock or sock == "" then
            pending("SOFTCXI_TEST_REDIS_SOCKET is unset (./run test starts Redis with a socket)")
            return
        end
        local u = assert(redis.parse_url("//us%40er:p%3Ass@/run/re%20dis.sock?db=5&prefix=a%3Ab:",
                                         true))
        assert.are.equal("us@er", u.user)
        assert.are.equal("p:ss", u.password)
        assert.are.equal("/run/re dis.sock", u.hosts[1].host)
        assert.is_nil(u.hosts[1].port)
        assert.are.equal(5, u.db)
        assert.are.equal("a:b:", u.query.prefix)
        for _, bad in ipairs { "redis+unix:relative.sock", "redis+unix://relative.sock",
                               "redis+unix://" .. sock .. "?db=x", "redis+unix://" .. sock .. "?bogus=1",
                               "redis+unix://" .. sock .. "?buckets=4", "redis+unix://:s3cr3t@" } do
            local msg = H.expect_err("EINVAL", store.open(bad))
            assert.is_nil(msg:find("s3cr3t", 1, true), msg)
        end
        -- an unencoded '?' in a password: refused without echoing any part of it
        for _, leaky in ipairs { "redis+unix://:pa?ss@/tmp/x.sock", "redis://:pa?b=c@h:1/0" } do
            local m = H.expect_err("EINVAL", store.open(leaky))
            assert.is_nil(m:find("ss@", 1, true) or m:find("'b'", 1, true), m)
        end
        local m = H.expect_err("EINVAL", store.open("redis+unix:///tmp/" .. string.rep("s", 110)))
        assert.truthy(m:find("too long", 1, true), m)
        m = H.expect_err("EINVAL", store.open("redis+unix://localhost:6379"))
        assert.truthy(m:find("redis://host:port", 1, true), m)
        local missing = sock .. ".missing"
        local msg = H.expect_err("ECONN", store.open("redis+unix://" .. missing))
        assert.truthy(msg:find("unix:" .. missing, 1, true), msg)

        -- one store over TCP and one over the socket, same server and database: each sees
        -- the other's writes
        local P = fresh_prefix()
        local over_tcp = open(with_prefix(URL, P))
        local over_sock = assert(store.open("redis+unix://" .. sock .. "?db=0&prefix=" .. P))
        assert.are.equal("hiredis", over_sock.transport_name)
        local blobs = make_blobs(2, "ux" .. RUN, "ux")
        assert.is_true(over_sock:put("one", blobs[1]))
        assert.is_true(over_tcp:put("two", blobs[2]))
        assert.are.equal(blobs[1], over_tcp:get("one"))
        assert.are.equal(blobs[2], over_sock:get("two"))
        assert.are.equal(2, over_sock:count())
        assert.is_true(over_sock:delete("one"))
        assert.is_true(over_sock:delete("two"))
        over_tcp:close()
        over_sock:close()

        -- another database through ?db=: invisible from database 0
        local db4 = assert(store.open("redis+unix://" .. sock .. "?db=4&prefix=" .. P))
        assert.is_true(db4:put("one", blobs[1]))
        local db0 = open(with_prefix(URL, P))
        H.expect_err("ENOTFOUND", db0:get("one"))
        assert.is_true(db4:delete("one"))
        db0:close()
        db4:close()

        -- a password for a server whose default user needs none: EAUTH, the password untold
        local r = H.pack(store.open("redis+unix://:s3cr3t@" .. sock))
        assert.are.equal("EAUTH", r[3], r[2])
        assert.is_nil(r[2]:find("s3cr3t", 1, true), r[2])
    end)

    it("AUTHs as an ACL user held to its prefix; a wrong password is EAUTH", function()
        local P = fresh_prefix()
        local user, pw = "softcxi-" .. RUN, "pw-" .. RUN .. " with spaces"
        -- the commands the store needs, and nothing else (docs/stores.md's list)
        cmd(c, { "ACL", "SETUSER", user, "reset", "on", ">" .. pw, "~" .. P .. "*",
                 "+get", "+mget", "+exists", "+set", "+mset", "+del", "+eval", "+evalsha", "+scan",
                 "+sscan", "+sismember", "+sadd", "+srem", "+scard", "+spop", "+hget", "+hmget", "+hset",
                 "+hsetnx", "+hdel", "+incr", "+incrby", "+decr", "+type", "+watch", "+unwatch", "+multi",
                 "+exec", "+wait", "+select", "+ping" })
        finally(function() c:command { "ACL", "DELUSER", user } end)
        local enc = pw:gsub(" ", "%%20")
        local base = string.format("redis://%s:%s@127.0.0.1:%d/0", user, enc, MAIN.port)
        local s = open(with_prefix(base, P))
        local blobs = make_blobs(3, "acl" .. RUN, "acl")
        assert.is_true(s:put("one", blobs[1]))
        cmd(c, { "CONFIG", "RESETSTAT" })
        assert.are.equal(2, s:put_many({ { id = "two", blob = blobs[2] },
                                         { id = "three", blob = blobs[3] } }))
        -- as a transaction: the list is enough for it
        assert.truthy(cmd(c, { "INFO", "commandstats" }):find("cmdstat_exec:calls=1,", 1, true))
        assert.are.equal(blobs[1], s:get("one"))
        assert.are.equal(3, s:count())
        assert.are.equal(3, #scan_all(s))
        assert.are.equal(2, #s:find({ group = "acl", specifier = 1 }))
        assert.are.same({ "one" }, s:find({ name = softcxi.key_info(blobs[1]).name }))
        for _, id in ipairs { "one", "two", "three" } do assert.is_true(s:delete(id)) end
        s:close()

        -- keys outside its pattern: NOPERM from Redis, EPERM from the store (open reads
        -- the store's name index record)
        local msg = H.expect_err("EPERM", store.open(with_prefix(base, "x" .. P)))
        assert.truthy(msg:find("NOPERM", 1, true), msg)

        local r = H.pack(store.open(string.format("redis://%s:wrong-%s@127.0.0.1:%d/0",
                                                  user, RUN, MAIN.port)))
        assert.is_nil(r[1])
        assert.are.equal("EAUTH", r[3], r[2])
        assert.truthy(r[2]:find("^store%.redis%.open: "), r[2])
        assert.truthy(r[2]:find("AUTH as '" .. user .. "' failed", 1, true), r[2])
        assert.is_nil(r[2]:find("wrong-" .. RUN, 1, true), "the password leaked: " .. r[2])
        -- a password for a server whose default user needs none
        H.expect_err("EAUTH", store.open(string.format("redis://:pw@127.0.0.1:%d/0", MAIN.port)))
    end)

    it("puts a name in the same index hash under Lua 5.4 and LuaJIT (known answers)", function()
        -- the bucket decides where a name's entries live: a store written by the CLI (Lua
        -- 5.4) is read by nginx (LuaJIT), so these must never change
        local nb = redis.name_bucket
        assert.are.equal(0, nb("", 65536))
        assert.are.equal(53493, nb("dev-00000001", 65536))
        assert.are.equal(28460, nb("dev-00000002", 65536))
        assert.are.equal(16785, nb("\195\188tf-8 name", 65536))
        assert.are.equal(722, nb("\0\255x", 1000))
        assert.are.equal(2191852, nb(string.rep("long-", 40), 16777216))
        assert.are.equal(208, nb("dev-00000001", 256))
        assert.are.equal(0, nb("a", 1))
        -- put_many starts from key_attrs' name_h31 (the first step, in C): the same buckets
        local ka = require("softcxi.core").key_attrs
        for _, name in ipairs { "dev-00000001", "\195\188tf-8 name", string.rep("long-", 40), "x" } do
            local blob = H.gen(device(), { algo = "ec", curve = "P-256", name = name, group = "gk" })
            local info = assert(ka(blob))
            assert.are.equal(name, info.name)
            for _, m in ipairs { 65536, 1000, 16777216 } do
                assert.are.equal(nb(name, m), nb(name, m, info.name_h31), name)
            end
        end
        -- and the store writes the entry there: id -> name (a store made with 65,536 name
        -- hashes; a new store's default is 16)
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P, "&name_buckets=65536"))
        local blob = H.gen(device(), { algo = "ec", curve = "P-256", name = "dev-00000001", group = "gk" })
        assert.is_true(s:put("kid", blob))
        assert.are.equal(P .. "nx:53493", s:name_key("kid", "dev-00000001"))
        assert.are.same({ "dev-00000001", "kid" }, cmd(c, { "HGETALL", P .. "nx:53493" }))
        assert.are.equal("65536", cmd(c, { "GET", P .. "name-buckets" }))
        assert.are.same({ "kid" }, s:find({ name = "dev-00000001" }))
        assert.are.same({}, s:find({ name = "dev-00000002" }))
        s:close()
        P = fresh_prefix()
        s = open(with_prefix(URL, P))
        assert.are.equal(16, s.name_buckets)
        assert.are.equal("16", cmd(c, { "GET", P .. "name-buckets" }))
        assert.is_true(s:put("kid", blob))
        assert.are.equal(P .. "nx:" .. nb("dev-00000001", 16), s:name_key("kid", "dev-00000001"))
        assert.are.same({ "dev-00000001", "kid" }, cmd(c, { "HGETALL", s:name_key("kid", "dev-00000001") }))
        s:close()
    end)

    it("keeps a name index hash exact when names of one call share it (renames, deletes)", function()
        -- name_buckets=1: every name in one hash, so an id renamed in a call leaves and
        -- joins the same key; y joins "nb" before x leaves "na" within one script call
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P, "&name_buckets=1"))
        assert.are.equal(1, s.name_buckets)
        local d = device()
        local function g(name, spec)
            return H.gen(d, { algo = "ec", curve = "P-256", name = name, group = "gr", specifier = spec })
        end
        local xa, yc, xb, yb = g("na"), g("nc"), g("nb"), g("nb", 2)
        assert.are.equal(2, s:put_many({ { id = "x", blob = xa }, { id = "y", blob = yc } }))
        assert.are.same({ "x" }, find_all(s, { name = "na" }))
        assert.are.equal(2, s:put_many({ { id = "y", blob = yb }, { id = "x", blob = xb } },
                                       { overwrite = true }))
        assert.are.same({}, find_all(s, { name = "na" }))
        assert.are.same({}, find_all(s, { name = "nc" }))
        assert.are.same({ "x", "y" }, find_all(s, { name = "nb" }))
        assert.are.same({ "y" }, find_all(s, { name = "nb", specifier = 2 }))
        assert.are.same({ "x", "y" }, find_all(s, { name = "nb", group = "gr", algo = "ec" }, 1))
        -- two ids, one name: the field says so, the ids are in the name's set
        assert.are.same({ "nb", "" }, cmd(c, { "HGETALL", P .. "nx:0" }))
        local both = cmd(c, { "SMEMBERS", P .. "idx:name:nb" })
        table.sort(both)
        assert.are.same({ "x", "y" }, both)
        -- compare-and-set back to the old name: one id left, the field holds it, no set
        assert.is_true(s:put("x", xa, { if_match = xb }))
        assert.are.same({ "x" }, find_all(s, { name = "na" }))
        assert.are.same({ "y" }, find_all(s, { name = "nb" }))
        assert.are.equal("y", cmd(c, { "HGET", P .. "nx:0", "nb" }))
        assert.are.equal(0, cmd(c, { "EXISTS", P .. "idx:name:nb" }))
        assert.is_true(s:delete("y"))
        assert.are.same({}, find_all(s, { name = "nb" }))
        assert.are.same({ "na", "x" }, cmd(c, { "HGETALL", P .. "nx:0" }))
        -- a page of a shared name's set, and its paging
        local many = {}
        for i = 1, 25 do
            many[i] = "m" .. string.format("%02d", i)
            assert.is_true(s:put(many[i], g("shared", i)))
        end
        assert.are.same(many, find_all(s, { name = "shared" }, 7))
        assert.are.same({ "m03" }, find_all(s, { name = "shared", specifier = 3 }, 7))
        -- a damaged index (an empty id in a name's set): never returned
        cmd(c, { "SADD", P .. "idx:name:shared", "" })
        assert.are.same(many, find_all(s, { name = "shared" }, 7))
        for i = 1, 25 do assert.is_true(s:delete(many[i])) end
        assert.are.same({ "na", "x" }, cmd(c, { "HGETALL", P .. "nx:0" }))
        assert.are.equal(0, cmd(c, { "EXISTS", P .. "idx:name:shared" }))
        s:close()
        -- the count is the store's: another is refused, the same or none is fine
        local msg = H.expect_err("EINVAL", store.open(with_prefix(URL, P, "&name_buckets=64")))
        assert.truthy(msg:find("name_buckets=1", 1, true), msg)
        open(with_prefix(URL, P)):close()
        H.expect_err("EINVAL", store.open(with_prefix(URL, P, "&name_buckets=0")))
        H.expect_err("EINVAL", store.open(with_prefix(URL, P, "&name_buckets=16777217")))
        H.expect_err("EINVAL", store.open(with_prefix(URL, P, "&upgrade=maybe")))
    end)

    it("a lost record of the name hash count: upgrade takes only the count the hashes were "
        .. "made with", function()
        local P = fresh_prefix()
        local url = with_prefix(URL, P)
        -- (name_index=all: default ids with name entries, in the hashes)
        local s = open(url .. "&name_buckets=65536&name_index=all")
        local blobs = make_blobs(30, "lost" .. RUN, "glost")
        assert.are.equal(30, s:put_many(items_of(blobs)))
        s:close()
        cmd(c, { "DEL", P .. "name-buckets" })
        H.expect_err("ELAYOUT", store.open(url))
        -- without a count (the default, 16), or with 16, or 1024: refused, nothing changed
        local msg = H.expect_err("EFORMAT", store.open(url, { upgrade = true }))
        assert.truthy(msg:find("no record of how many", 1, true), msg)
        assert.truthy(msg:find("name_buckets=16 (the default) does not fit", 1, true), msg)
        assert.truthy(msg:find("65536", 1, true), msg)
        msg = H.expect_err("EFORMAT", store.open(url, { upgrade = true, name_buckets = 16 }))
        assert.truthy(msg:find("name_buckets=16 does not fit", 1, true), msg)
        H.expect_err("EFORMAT", store.open(url, { upgrade = true, name_buckets = 1024 }))
        assert.are.equal(hiredis.null, cmd(c, { "GET", P .. "name-buckets" }))
        assert.are.equal(hiredis.null, cmd(c, { "GET", P .. "name-buckets:upgrading" }))
        -- the count they were made with: recorded, and every name is found again
        s = assert(store.open(url, { upgrade = true, name_buckets = 65536 }))
        assert.are.equal(65536, s.name_buckets)
        assert.are.equal("65536", cmd(c, { "GET", P .. "name-buckets" }))
        for i = 1, 30, 7 do
            assert.are.same({ ids_of(blobs)[i] }, s:find({ name = "lost" .. RUN .. "-" .. i }))
        end
        s:close()
        -- a store of the default 16 hashes that lost its record: the default fits, a larger
        -- count does not (its names would be looked for in hashes that do not hold them)
        P = fresh_prefix()
        url = with_prefix(URL, P)
        s = open(url .. "&name_index=all")
        assert.are.equal(30, s:put_many(items_of(blobs)))
        s:close()
        cmd(c, { "DEL", P .. "name-buckets" })
        H.expect_err("EFORMAT", store.open(url, { upgrade = true, name_buckets = 65536 }))
        s = assert(store.open(url, { upgrade = true }))
        assert.are.equal(16, s.name_buckets)
        assert.are.same({ ids_of(blobs)[3] }, s:find({ name = "lost" .. RUN .. "-3" }))
        s:close()
    end)

    it("refuses a store of the old layout (a set per name), naming what to run; upgrade moves "
       .. "it in place, resumes after an interruption and loses nothing", function()
        local P = fresh_prefix()
        local d = device()
        local blobs, ids = {}, {}
        for i = 1, 30 do
            local id = "old/" .. i
            local name = i <= 2 and "shared" or ("n" .. i)   -- two ids, one name
            blobs[#blobs + 1] = { id, H.gen(d, { algo = "ec", curve = "P-256", name = name, group = "gold",
                                                 specifier = i }) }
            ids[#ids + 1] = id
        end
        local name_sets = old_layout(function(argv) cmd(c, argv) end, P, blobs, function() return "" end)
        assert.are.equal(29, #name_sets)
        -- a name set of 2,500 members (more than one upgrade call moves)
        local many = {}
        for i = 1, 2500 do many[i] = "many/" .. i end
        local unpack_ = table.unpack or unpack -- luacheck: ignore 143
        for f = 1, 2500, 500 do cmd(c, { "SADD", P .. "idx:name:many", unpack_(many, f, f + 499) }) end
        local url = with_prefix(URL, P)

        local msg = H.expect_err("ELAYOUT", store.open(url))
        assert.truthy(msg:find("softcxi store upgrade ", 1, true), msg)
        assert.truthy(msg:find("a Redis set per name", 1, true), msg)
        assert.truthy(msg:find(P, 1, true), msg)
        assert.are.equal(0, cmd(c, { "EXISTS", P .. "name-buckets" }))   -- nothing written

        -- an upgrade interrupted half way (as its script calls leave it: a set's members
        -- moved to the hash, the set gone, the count in use recorded)
        cmd(c, { "SET", P .. "name-buckets:upgrading", "64" })
        local first = name_sets[#name_sets - 1]  -- "n9" (after it: "shared"): one id
        local moved_name = first:sub(#P + 10)
        assert.are.equal("n9", moved_name)
        cmd(c, { "HSET", P .. "nx:" .. redis.name_bucket(moved_name, 64), moved_name,
                 cmd(c, { "SPOP", first }) })
        msg = H.expect_err("ELAYOUT", store.open(url))
        assert.truthy(msg:find("did not finish", 1, true), msg)
        -- the upgrade keeps the count it started with: another is refused
        H.expect_err("EINVAL", store.open(url, { upgrade = true, name_buckets = 128 }))

        local progress = 0
        local s = assert(store.open(url, { upgrade = true,
                                           on_upgrade = function() progress = progress + 1 end }))
        assert.are.equal(64, s.name_buckets)
        assert.are.equal(29, s.upgraded.sets)        -- 27 of one id, "shared" and "many"
        assert.are.equal(30, s.upgraded.blobs)
        assert.is_true(progress >= 1)
        -- the names of several ids keep their sets, the others have none
        assert.are.same({ P .. "idx:name:many", P .. "idx:name:shared" }, scan_keys(c, P .. "idx:name:*"))
        assert.are.equal("64", cmd(c, { "GET", P .. "name-buckets" }))
        assert.are.equal(0, cmd(c, { "EXISTS", P .. "name-buckets:upgrading" }))
        for i, e in ipairs(blobs) do
            local name = i <= 2 and "shared" or ("n" .. i)
            local want = i <= 2 and { "old/1", "old/2" } or { e[1] }
            assert.are.same(want, find_all(s, { name = name }), name)
            assert.are.same({ e[1] }, find_all(s, { name = name, specifier = i }))
            assert.are.equal(e[2], s:get(e[1]))
        end
        table.sort(many)
        assert.are.same(many, find_all(s, { name = "many" }, 700))
        table.sort(ids)
        assert.are.same(ids, find_all(s, { group = "gold" }))
        assert.are.equal(30, s:count())
        -- the store works on: writes, deletes, and a plain open
        assert.is_true(s:delete("old/1"))
        assert.are.same({ "old/2" }, find_all(s, { name = "shared" }))
        assert.is_true(s:put("old/1", blobs[1][2]))
        assert.are.same({ "old/1", "old/2" }, find_all(s, { name = "shared" }))
        s:close()
        s = open(url)
        assert.are.equal(64, s.name_buckets)
        assert.are.same({ "old/3" }, find_all(s, { name = "n3" }))
        s:close()
        -- upgrade again (a set an older softcxi wrote since): folded in, nothing else moves
        cmd(c, { "SADD", P .. "idx:name:late", "old/7" })
        s = assert(store.open(url, { upgrade = true }))
        assert.are.equal(1, s.upgraded.sets)
        assert.are.same({ "old/7" }, find_all(s, { name = "late" }))
        s:close()
    end)

    for _, ai in ipairs { 0, 1 } do
    -- algo_index=0 (the default): no algo sets, find{ algo = } reads the blobs
    local function algo_ids(ids) return ai == 1 and ids or {} end
    it("keeps the index sets and the counter in step with every write (algo_index=" .. ai .. ")", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P, ai == 1 and "&algo_index=1" or nil))
        local a = H.gen(device(), { algo = "ec", curve = "P-256", name = "na", group = "ga", specifier = 1 })
        local b = H.gen(device(), { algo = "aes", size = 256, name = "nb", group = "gb" })
        local function members(field, value)
            local m = index_members(c, s, P, field, value)
            table.sort(m)
            return m
        end
        local function n() return tonumber(cmd(c, { "GET", P .. "n" })) end

        assert.is_true(s:put("x", a))
        assert.are.same({ "x" }, members("group", "ga"))
        assert.are.same({ "x" }, members("name", "na"))
        assert.are.same({ "x" }, members("specifier", "1"))
        assert.are.same(algo_ids({ "x" }), members("algo", "ec"))
        assert.are.same({ "x" }, find_all(s, { algo = "ec" }))
        assert.are.equal(1, n())
        assert.are.equal(a, cmd(c, { "GET", P .. "k:x" }))   -- the blob, byte for byte

        assert.is_true(s:put("x", b, { overwrite = true }))
        assert.are.same({}, members("group", "ga"))
        assert.are.same({}, members("specifier", "1"))
        assert.are.same({ "x" }, members("group", "gb"))
        assert.are.same(algo_ids({ "x" }), members("algo", "aes"))
        assert.are.same({}, members("algo", "ec"))
        assert.are.same({ "x" }, find_all(s, { algo = "aes" }))
        assert.are.same({ "x" }, find_all(s, { algo = "aes", group = "gb" }))
        assert.are.same({}, find_all(s, { algo = "ec" }))
        assert.are.same({}, find_all(s, { algo = "aes", group = "ga" }))
        assert.are.equal(1, n())

        assert.is_true(s:put("y", a))
        assert.is_true(s:put("x", a, { if_match = b }))
        assert.are.same({ "x", "y" }, members("group", "ga"))
        assert.are.same({}, members("group", "gb"))
        assert.are.equal(2, n())

        assert.is_true(s:delete("x"))
        assert.is_true(s:delete("y"))
        assert.are.equal(0, n())
        for _, pat in ipairs { "idx:*", "nx:*" } do assert.are.same({}, scan_keys(c, P .. pat)) end
        s:close()
    end)
    end

    it("records whether it keeps an algo index; an older store (no record) keeps one", function()
        local P = fresh_prefix()
        local a = H.gen(device(), { algo = "ec", curve = "P-256", name = "ra", group = "ra" })
        local s = open(with_prefix(URL, P))
        assert.are.equal("0", cmd(c, { "GET", P .. "algo-index" }))
        s:close()
        -- asked otherwise than the store was made: EINVAL, naming both
        local r = H.pack(store.open(with_prefix(URL, P, "&algo_index=1")))
        assert.is_nil(r[1])
        assert.are.equal("EINVAL", r[3])
        assert.matches("created with algo_index=0, not 1", r[2], 1, true)
        H.expect_err("EINVAL", store.open(with_prefix(URL, P, "&algo_index=2")))
        -- a store made before the record (name record, no algo record) keeps its algo sets
        cmd(c, { "DEL", P .. "algo-index" })
        s = open(with_prefix(URL, P))
        assert.is_true(s:put("old", a))
        assert.are.same({ "old" }, index_members(c, s, P, "algo", "ec"))
        assert.are.same({ "old" }, find_all(s, { algo = "ec" }))
        assert.are.equal(hiredis.null, cmd(c, { "GET", P .. "algo-index" }))   -- nothing recorded
        assert.is_true(s:delete("old"))
        assert.are.same({}, index_members(c, s, P, "algo", "ec"))
        s:close()
        -- opened with upgrade, a new store is made as any other: both records, no algo sets
        local P2 = fresh_prefix()
        s = open(with_prefix(URL, P2, "&upgrade=1"))
        assert.are.equal("0", cmd(c, { "GET", P2 .. "algo-index" }))
        assert.are.equal("16", cmd(c, { "GET", P2 .. "name-buckets" }))
        assert.is_true(s:put("new", a))
        assert.are.same({}, index_members(c, s, P2, "algo", "ec"))
        assert.are.same({ "new" }, find_all(s, { algo = "ec" }))
        s:close()
        s = open(with_prefix(URL, P2))                 -- and a plain open takes it as it is
        assert.are.same({ "new" }, find_all(s, { algo = "ec" }))
        s:close()
        -- an older layout (algo sets) opened to upgrade with algo_index=0: refused before
        -- anything is written (no upgrade record left to block the next open)
        local P3 = fresh_prefix()
        old_layout(function(argv) cmd(c, argv) end, P3, { { "o1", a } }, function() return "" end)
        r = H.pack(store.open(with_prefix(URL, P3, "&upgrade=1&algo_index=0")))
        assert.is_nil(r[1])
        assert.are.equal("EINVAL", r[3])
        assert.matches("created with algo_index=1, not 0", r[2], 1, true)
        assert.are.same({}, scan_keys(c, P3 .. "name-buckets*"))
        s = open(with_prefix(URL, P3, "&upgrade=1"))
        assert.are.same({ "o1" }, find_all(s, { algo = "ec" }))
        assert.are.same({ "o1" }, index_members(c, s, P3, "algo", "ec"))
        s:close()
        -- a record that is neither 0 nor 1: EFORMAT, naming the key
        cmd(c, { "SET", P .. "algo-index", "maybe" })
        r = H.pack(store.open(with_prefix(URL, P)))
        assert.is_nil(r[1])
        assert.are.equal("EFORMAT", r[3])
        assert.matches(P .. "algo-index holds 'maybe'", r[2], 1, true)
        cmd(c, { "DEL", P .. "algo-index" })
    end)

    -- name_index=other (the default): a key under its default id, group/name[/specifier],
    -- has no name entry; find{ name = } tests the default ids of the groups and specifiers
    -- recorded in P default-ids.  Both write paths: the transaction (16 name hashes) and
    -- the scripts (65,536).
    for _, nb in ipairs { 16, 65536 } do
    it("keys under their default id get no name entry; find by name still finds each once "
       .. "(name_buckets=" .. nb .. ")", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P, "&name_buckets=" .. nb))
        assert.are.equal("other", cmd(c, { "GET", P .. "name-index" }))
        assert.is_true(s.probe)
        local nm = "pr" .. RUN
        local function gen(t)
            t.algo, t.curve = t.algo or "ec", t.algo ~= "aes" and "P-256" or nil
            if t.algo == "aes" then t.size = 256 end
            return H.gen(device(), t)
        end
        local a = gen { name = nm, group = "g1" }                     -- g1/pr
        local b = gen { name = nm, group = "g2", specifier = 7 }      -- g2/pr/7
        local e = gen { name = nm, algo = "aes" }                     -- no group: /pr
        local x = gen { name = "other" .. RUN, group = "g1" }
        local many = make_blobs(30, nm .. "m", "g3")                  -- g3/prm-i/(i % 2)
        assert.are.equal(33, s:put_many({ { blob = a }, { blob = b }, { blob = e },
                                          table.unpack(items_of(many)) }))
        -- the same name under other ids: name entries, found there
        assert.is_true(s:put("mine/" .. nm, a))                       -- id is not a's default
        assert.is_true(s:put("g1/" .. nm .. "/3", b))                 -- looks like a default id
        assert.is_true(s:put("g2/" .. nm, x))                         -- holds another name
        assert.are.same({ "g1/" .. nm .. "/3", "mine/" .. nm },
                        sorted_ids(index_members(c, s, P, "name", nm)))
        assert.are.same({ "g2/" .. nm }, index_members(c, s, P, "name", "other" .. RUN))
        assert.are.same({}, index_members(c, s, P, "name", nm .. "m-3"))
        assert.are.same({ "\0", "g1\0", "g2\0" .. "7", "g3\0" .. "0", "g3\0" .. "1" },
                        sorted_ids(cmd(c, { "SMEMBERS", P .. "default-ids" })))
        -- each once, whatever the page size
        local want = { "/" .. nm, "g1/" .. nm, "g1/" .. nm .. "/3", "g2/" .. nm .. "/7", "mine/" .. nm }
        for _, limit in ipairs { 1, 2, 100 } do
            assert.are.same(want, find_all(s, { name = nm }, limit))
        end
        assert.are.same({ "g3/" .. nm .. "m-3/1" }, find_all(s, { name = nm .. "m-3" }))
        -- a name entry for a key under its default id (an older softcxi wrote it): still once
        cmd(c, { "HSET", s:name_key("x", nm .. "m-3"), nm .. "m-3", "g3/" .. nm .. "m-3/1" })
        assert.are.same({ "g3/" .. nm .. "m-3/1" }, find_all(s, { name = nm .. "m-3" }))
        -- and its delete takes that entry too
        assert.is_true(s:delete("g3/" .. nm .. "m-3/1"))
        assert.are.same({}, index_members(c, s, P, "name", nm .. "m-3"))
        assert.are.same({}, find_all(s, { name = nm .. "m-3" }))
        -- mine/pr holds a (group g1); g1/pr/3 holds b (group g2, specifier 7)
        assert.are.same({ "g1/" .. nm, "mine/" .. nm }, find_all(s, { name = nm, group = "g1" }))
        assert.are.same({ "g1/" .. nm .. "/3", "g2/" .. nm .. "/7" },
                        find_all(s, { name = nm, group = "g2" }))
        assert.are.same({ "g1/" .. nm .. "/3", "g2/" .. nm .. "/7" },
                        find_all(s, { name = nm, specifier = 7 }))
        assert.are.same({}, find_all(s, { name = nm, specifier = 3 }))
        assert.are.same({ "/" .. nm }, find_all(s, { name = nm, algo = "aes" }))
        assert.are.same({}, find_all(s, { name = nm, group = "g9" }))
        assert.are.same({ "g2/" .. nm }, find_all(s, { name = "other" .. RUN }))
        -- a default id that changes hands: renamed by overwrite (its entry comes), back
        -- by if_match (it goes), deleted (nothing left behind)
        local a2 = gen { name = "renamed" .. RUN, group = "g1" }
        assert.is_true(s:put("g1/" .. nm, a2, { overwrite = true }))
        assert.are.same({ "g1/" .. nm }, index_members(c, s, P, "name", "renamed" .. RUN))
        assert.are.same({ "/" .. nm, "g1/" .. nm .. "/3", "g2/" .. nm .. "/7", "mine/" .. nm },
                        find_all(s, { name = nm }))
        assert.is_true(s:put("g1/" .. nm, a, { if_match = a2 }))
        assert.are.same({}, index_members(c, s, P, "name", "renamed" .. RUN))
        assert.are.same(want, find_all(s, { name = nm }))
        for _, id in ipairs(want) do assert.is_true(s:delete(id)) end
        assert.is_true(s:delete("g2/" .. nm))
        assert.are.same({}, find_all(s, { name = nm }))
        assert.are.same({}, scan_keys(c, P .. "idx:name:*"))
        assert.are.same({}, scan_keys(c, P .. "nx:*"))
        assert.are.equal(29, s:count())
        s:close()
    end)
    end

    it("default ids: pairs are recorded only once Redis has them, ids two pairs make are "
       .. "found, stray entries go with a rename, a probe is one MGET", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local function gen(t)
            t.algo, t.curve = "ec", "P-256"
            return H.gen(device(), t)
        end
        local function members() return #cmd(c, { "SMEMBERS", P .. "default-ids" }) end
        -- an if_match refused (nothing there): the pair is not taken as recorded
        local a1, a2 = gen { name = "A", group = "gr" }, gen { name = "A", group = "gr" }
        H.expect_err("ENOTFOUND", s:put("gr/A", a2, { if_match = a1 }))
        assert.is_true(s:put(nil, gen { name = "B", group = "gr" }))
        assert.are.same({ "gr/B" }, find_all(s, { name = "B" }))
        -- a put_many stopped by its on_chunk while slices are in flight (the scripts, sent
        -- ahead): the next write of the pair still records it
        s.no_transaction = true
        local b1, b2 = gen { name = "one", group = "g1" }, gen { name = "two", group = "g2" }
        local ok = pcall(s.put_many, s, { { blob = b1 }, { blob = b2 } },
                         { chunk = 1, on_chunk = function(done) error("stop after " .. done) end })
        assert.is_false(ok)
        s.no_transaction = nil
        assert.is_true(s:put(nil, b2))
        assert.are.same({ "g2/two" }, find_all(s, { name = "two" }))
        -- two pairs that make the same id (group a and specifier 5, group a/5 and none, for
        -- the name 5): found whichever pair the probe meets first
        local k, x, want = {}, {}, {}
        for i = 1, 8 do
            k[i] = { blob = gen { name = "5", group = "a" .. i .. "/5" } }
            x[i] = { blob = gen { name = "x" .. RUN, group = "a" .. i, specifier = 5 } }
            want[i] = "a" .. i .. "/5/5"
        end
        assert.are.equal(8, s:put_many(k))
        assert.are.equal(8, s:put_many(x))
        table.sort(want)
        assert.are.same(want, find_all(s, { name = "5" }))
        assert.are.same({ "a3/5/5" }, find_all(s, { name = "5", group = "a3/5" }))
        assert.are.same({}, find_all(s, { name = "5", group = "a3" }))
        -- no group and an empty group are two things, as in the sets
        assert.is_true(s:put(nil, gen { name = "E" .. RUN }))
        assert.are.same({ "/E" .. RUN }, find_all(s, { name = "E" .. RUN }))
        assert.are.same({}, find_all(s, { name = "E" .. RUN, group = "" }))
        -- a stray name entry of a default id (an older softcxi's) goes when the key is
        -- renamed by overwrite
        local nm = "st" .. RUN
        assert.is_true(s:put(nil, gen { name = nm, group = "gs" }))
        cmd(c, { "HSET", s:name_key("x", nm), nm, "gs/" .. nm })
        assert.is_true(s:put("gs/" .. nm, gen { name = "R" .. RUN, group = "gs" }, { overwrite = true }))
        assert.are.same({}, index_members(c, s, P, "name", nm))
        assert.are.same({}, find_all(s, { name = nm }))
        assert.are.same({ "gs/" .. nm }, index_members(c, s, P, "name", "R" .. RUN))
        -- a probe over many pairs: one SSCAN page, one MGET, no GET per absent candidate
        local many = {}
        for i = 1, 40 do many[i] = { blob = gen { name = "m" .. i, group = "gm" .. i } } end
        assert.are.equal(40, s:put_many(many))
        assert.is_true(members() >= 40)
        cmd(c, { "CONFIG", "RESETSTAT" })
        assert.are.same({ "gm7/m7" }, find_all(s, { name = "m7" }, 100))
        local stats = cmd(c, { "INFO", "commandstats" })
        assert.are.equal("1", stats:match("cmdstat_mget:calls=(%d+)"))
        assert.is_nil(stats:match("cmdstat_get:calls=(%d+)"))
        s:close()
    end)

    it("records which keys have name entries; an older store (no record) gives every name one",
       function()
        local P = fresh_prefix()
        local a = H.gen(device(), { algo = "ec", curve = "P-256", name = "ni" .. RUN, group = "gni" })
        local s = open(with_prefix(URL, P, "&name_index=all"))
        assert.are.equal("all", cmd(c, { "GET", P .. "name-index" }))
        assert.is_true(s:put(nil, a))
        assert.are.same({ "gni/ni" .. RUN }, index_members(c, s, P, "name", "ni" .. RUN))
        assert.are.equal(0, cmd(c, { "EXISTS", P .. "default-ids" }))
        s:close()
        -- asked otherwise than the store was made: EINVAL, naming both
        local r = H.pack(store.open(with_prefix(URL, P, "&name_index=other")))
        assert.are.equal("EINVAL", r[3])
        assert.matches("created with name_index=all, not other", r[2], 1, true)
        H.expect_err("EINVAL", store.open(with_prefix(URL, P, "&name_index=some")))
        -- made before the record (name and algo records only): every name has its entry
        local P2 = fresh_prefix()
        cmd(c, { "SET", P2 .. "name-buckets", "16" })
        cmd(c, { "SET", P2 .. "algo-index", "0" })
        s = open(with_prefix(URL, P2))
        assert.is_false(s.probe)
        assert.is_true(s:put(nil, a))
        assert.are.same({ "gni/ni" .. RUN }, index_members(c, s, P2, "name", "ni" .. RUN))
        assert.are.same({ "gni/ni" .. RUN }, find_all(s, { name = "ni" .. RUN }))
        assert.are.equal(hiredis.null, cmd(c, { "GET", P2 .. "name-index" }))   -- nothing recorded
        s:close()
        H.expect_err("EINVAL", store.open(with_prefix(URL, P2, "&name_index=other")))
        -- a record that is neither: EFORMAT, naming the key
        cmd(c, { "SET", P .. "name-index", "some" })
        r = H.pack(store.open(with_prefix(URL, P)))
        assert.are.equal("EFORMAT", r[3])
        assert.matches(P .. "name-index holds 'some'", r[2], 1, true)
    end)

    it("a damaged P default-ids: the write fails naming it, before any blob is written; find "
       .. "by name fails naming it", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local blobs = make_blobs(3, "dmg" .. RUN, "gdmg")
        cmd(c, { "SET", P .. "default-ids", "not a set" })
        for _, try in ipairs {
            function() return s:put_many(items_of(blobs)) end,
            function() return s:put(nil, blobs[1]) end,
        } do
            local r = H.pack(try())
            assert.is_nil(r[1])
            assert.matches(P .. "default-ids", r[2], 1, true)
            assert.matches("WRONGTYPE", r[2], 1, true)
            assert.are.same({}, scan_keys(c, P .. "k:*"))
            assert.are.equal(0, s:count())
        end
        local r = H.pack(s:find({ name = "dmg" .. RUN .. "-1" }))
        assert.is_nil(r[1])
        assert.matches("WRONGTYPE", r[2], 1, true)
        -- mended: the writes land and are found
        cmd(c, { "DEL", P .. "default-ids" })
        assert.are.equal(3, s:put_many(items_of(blobs)))
        assert.are.same({ ids_of(blobs)[2] }, find_all(s, { name = "dmg" .. RUN .. "-2" }))
        s:close()
    end)

    it("put_many batches keys into one script call and keeps index and counter exact", function()
        -- 65,536 name hashes: a slice's names fall in too many for one transaction, so
        -- new keys go through the scripts too (the transaction is tested below)
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P, "&name_buckets=65536&name_index=all"))
        local a = H.gen(device(), { algo = "ec", curve = "P-256", name = "ba", group = "ga", specifier = 1 })
        local b = H.gen(device(), { algo = "aes", size = 256, name = "bb", group = "gb" })
        local a2 = H.gen(device(), { algo = "ec", curve = "P-256", name = "ba", group = "ga", specifier = 1 })
        local function members(field, value)
            local m = index_members(c, s, P, field, value)
            table.sort(m)
            return m
        end
        local function n() return tonumber(cmd(c, { "GET", P .. "n" })) end
        cmd(c, { "CONFIG", "RESETSTAT" })
        -- one id twice in one batch: the second is EEXIST, the first stays with its index
        local r = H.pack(s:put_many({ { id = "x", blob = a }, { id = "y", blob = b },
                                      { id = "x", blob = b } }))
        assert.is_nil(r[1])
        assert.are.equal("EEXIST", r[3], r[2])
        assert.are.equal(2, r[4])
        assert.are.equal(a, s:get("x"))
        assert.are.same({ "x" }, members("group", "ga"))
        assert.are.same({ "y" }, members("group", "gb"))
        assert.are.equal(2, n())
        -- compare-and-set items in one batch: one moves group, one keeps its attributes,
        -- one is stale (ECONFLICT), one is of another type (EFORMAT); the rest lands
        cmd(c, { "SADD", P .. "k:z", "not a string" })
        r = H.pack(s:put_many({ { id = "x", blob = b, if_match = a }, { id = "y", blob = b, if_match = a },
                                { id = "z", blob = a, if_match = b }, { id = "w", blob = a, if_match = b } }))
        assert.is_nil(r[1])
        assert.are.equal(1, r[4], r[2])
        assert.truthy(r[2]:find("and 2 more failed", 1, true), r[2])
        assert.are.same({}, members("group", "ga"))
        assert.are.same({}, members("specifier", "1"))
        assert.are.same({ "x", "y" }, members("group", "gb"))
        assert.are.equal(2, n())
        assert.is_true(s:put("x", b, { if_match = b }))     -- same attributes: index untouched
        assert.are.same({ "x", "y" }, members("group", "gb"))
        assert.are.same({ "x", "y" }, members("name", "bb"))
        assert.is_true(s:put("x", a2, { if_match = b }))
        assert.are.same({ "x" }, members("name", "ba"))
        assert.are.same({ "y" }, members("name", "bb"))
        assert.are.equal(2, n())
        -- 1200 new keys: more than one script call, far fewer calls than keys
        local many = make_blobs(1200, "bm" .. RUN, "gbm")
        cmd(c, { "CONFIG", "RESETSTAT" })
        assert.are.equal(1200, s:put_many(items_of(many)))
        local stats = cmd(c, { "INFO", "commandstats" })
        local calls = 0
        for _, name in ipairs { "eval", "evalsha" } do
            calls = calls + tonumber(stats:match("cmdstat_" .. name .. ":calls=(%d+)") or "0")
        end
        assert.is_true(calls >= 2 and calls <= 10, "EVALSHA calls: " .. tostring(calls))
        assert.are.equal(1200, #members("group", "gbm"))
        assert.are.equal(1202, n())
        assert.are.equal(1202, s:count())
        cmd(c, { "DEL", P .. "k:z" })
        s:close()
    end)

    it("put_many writes new keys as one transaction per slice; a name another id holds, a key "
        .. "already there, a write between its reads and EXEC, a new connection", function()
        local P = fresh_prefix()
        -- the default 16 name hashes: the transaction; name_index=all: default ids have name
        -- entries (name_index=other is tested below)
        local s = open(with_prefix(URL, P, "&name_index=all"))
        local function members(field, value)
            local m = index_members(c, s, P, field, value)
            table.sort(m)
            return m
        end
        local function n() return tonumber(cmd(c, { "GET", P .. "n" })) end
        local function calls(name)
            local stats = cmd(c, { "INFO", "commandstats" })
            return tonumber(stats:match("cmdstat_" .. name .. ":calls=(%d+)") or "0")
        end
        local function sorted(t)
            table.sort(t)
            return t
        end
        local function gen(name, group)
            return H.gen(device(), { algo = "ec", curve = "P-256", name = name, group = group })
        end
        -- 1. 1,200 new keys: two slices, two EXECs, no script; index and counter exact
        local many = make_blobs(1200, "fp" .. RUN, "gfp")
        cmd(c, { "CONFIG", "RESETSTAT" })
        assert.are.equal(1200, s:put_many(items_of(many)))
        assert.are.equal(0, calls("evalsha") + calls("eval"))
        assert.are.equal(2, calls("exec"))
        assert.are.equal(1200, #members("group", "gfp"))
        assert.are.equal(600, #members("specifier", "1"))
        assert.are.same({ ids_of(many)[7] }, members("name", "fp" .. RUN .. "-7"))
        assert.are.equal(1200, n())
        -- 2. a name an id already holds, and one two keys of the slice share: '' and the
        -- name's set, as the scripts make them; deletes (scripts) undo them exactly
        local sh, tw = "shared" .. RUN, "twin" .. RUN
        local a, b, d = gen(sh, "g1"), gen(sh, "g2"), gen(sh, "g3")
        local e, f = gen(tw, "g1"), gen(tw, "g2")
        local id = function(x) return (assert(store.id_of(x))) end
        assert.is_true(s:put(nil, a))
        cmd(c, { "CONFIG", "RESETSTAT" })
        assert.are.equal(4, s:put_many(items_of { b, d, e, f }))
        assert.are.equal(1, calls("exec"))
        assert.are.same(sorted { id(a), id(b), id(d) }, members("name", sh))
        assert.are.same(sorted { id(e), id(f) }, members("name", tw))
        assert.are.same(sorted { id(a), id(b), id(d) }, sorted(assert(s:find { name = sh })))
        assert.are.equal(1205, n())
        assert.is_true(s:delete(id(b)))
        assert.is_true(s:delete(id(e)))
        assert.are.same(sorted { id(a), id(d) }, members("name", sh))
        assert.are.same({ id(f) }, members("name", tw))
        -- 3. a key of the slice already there: the slice goes to the scripts, that key alone
        -- is EEXIST (skip_existing: skipped)
        local more = make_blobs(3, "fq" .. RUN, "gfq")
        assert.is_true(s:put(nil, more[2]))
        cmd(c, { "CONFIG", "RESETSTAT" })
        local r = H.pack(s:put_many(items_of(more)))
        assert.is_nil(r[1])
        assert.are.equal("EEXIST", r[3], r[2])
        assert.are.equal(2, r[4])
        assert.are.equal(0, calls("exec"))
        assert.are.equal(3, #members("group", "gfq"))
        assert.are.same({ 0, 3 }, { s:put_many(items_of(more), { skip_existing = true }) })
        -- 4. another writer between the reads and EXEC: EXEC runs nothing, the slice is read
        -- again and lands once
        local node, other = s.transport, open(with_prefix(URL, P))
        local late, intruder = make_blobs(5, "fr" .. RUN, "gfr"), gen("intruder" .. RUN, "gfr")
        local sends = 0
        node.before_send = function()
            sends = sends + 1
            if sends == 2 then assert.is_true(other:put(nil, intruder)) end
        end
        cmd(c, { "CONFIG", "RESETSTAT" })
        local ok, msg = s:put_many(items_of(late))
        node.before_send = nil
        assert.are.equal(5, ok, msg)
        assert.are.equal(4, sends)
        assert.are.equal(2, calls("exec"))
        assert.are.equal(6, #members("group", "gfr"))
        assert.are.equal(n(), s:count())
        assert.are.equal(1212, n())
        -- 5. a new connection between the reads and EXEC (its WATCH is gone): nothing is
        -- sent on it, ECONN with 0 confirmed; a re-run writes the keys
        local lost = make_blobs(4, "fs" .. RUN, "gfs")
        sends = 0
        node.before_send = function()
            sends = sends + 1
            if sends == 2 then
                node:drop()
                assert(node:connect())
            end
        end
        cmd(c, { "CONFIG", "RESETSTAT" })
        r = H.pack(s:put_many(items_of(lost)))
        node.before_send = nil
        assert.is_nil(r[1])
        assert.are.equal("ECONN", r[3], r[2])
        assert.are.equal(0, r[4])
        assert.are.equal(0, calls("exec") + calls("multi"))
        assert.are.equal(0, #members("group", "gfs"))
        assert.are.equal(4, s:put_many(items_of(lost)))
        assert.are.equal(4, #members("group", "gfs"))
        assert.are.equal(1216, n())
        -- 6. an index set of another type: the scripts write the slice and report it
        cmd(c, { "SET", P .. "idx:group:gft", "not a set" })
        cmd(c, { "CONFIG", "RESETSTAT" })
        r = H.pack(s:put_many(items_of(make_blobs(2, "ft" .. RUN, "gft"))))
        assert.is_nil(r[1])
        assert.truthy(tostring(r[2]):find("WRONGTYPE", 1, true), r[2])
        assert.are.equal(0, calls("exec"))
        cmd(c, { "DEL", P .. "idx:group:gft" })
        other:close()
        s:close()
    end)

    it("exists_many tells stored ids from missing ones in every mix (provision's check)", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local blobs = make_blobs(6, "ex" .. RUN, "gex")
        local ids = ids_of(blobs)
        assert.are.equal(3, s:put_many({ { blob = blobs[1] }, { blob = blobs[2] }, { blob = blobs[3] } }))
        cmd(c, { "SET", P .. "k:foreign", "not a blob" })     -- a value: it exists
        assert.are.same({}, s:exists_many({ ids[4], ids[5], ids[6] }))         -- none
        assert.are.same({ [ids[1]] = true, [ids[2]] = true, [ids[3]] = true },
                        s:exists_many({ ids[1], ids[2], ids[3] }))            -- all
        assert.are.same({ [ids[2]] = true, foreign = true },
                        s:exists_many({ ids[4], ids[2], "foreign", ids[5] })) -- some
        assert.are.same({ [ids[1]] = true }, s:exists_many({ ids[1], ids[1], ids[4] }))
        assert.are.same({}, s:exists_many({}))
        assert.has_error(function() s:exists_many({ "a", "" }) end,
                         "store.redis.exists_many: ids[2] must be a non-empty string")
        cmd(c, { "DEL", P .. "k:foreign" })
        s:close()
    end)

    it("compare-and-set, attributes unchanged (rewrap): each outcome; index, counter kept", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local d = device()
        local tpl = { algo = "ec", curve = "P-256", name = "sw", group = "gsw", specifier = 3 }
        local v1, v2, v3 = H.gen(d, tpl), H.gen(d, tpl), H.gen(d, tpl)   -- same attributes
        assert.are.equal(3, s:put_many({ { id = "s1", blob = v1 }, { id = "s2", blob = v1 },
                                         { id = "s3", blob = v1 } }))
        cmd(c, { "SADD", P .. "k:s4", "a set" })
        local r = H.pack(s:put_many({
            { id = "s1", blob = v2, if_match = v1 },     -- lands
            { id = "s2", blob = v2, if_match = v3 },     -- stale: ECONFLICT
            { id = "s4", blob = v2, if_match = v1 },     -- another type: EFORMAT
            { id = "s5", blob = v2, if_match = v1 },     -- absent: ENOTFOUND
            { id = "s3", blob = v3, if_match = v1 },     -- lands
        }))
        assert.is_nil(r[1])
        assert.are.equal("ECONFLICT", r[3], r[2])
        assert.are.equal(2, r[4], r[2])
        assert.truthy(r[2]:find("'s2' changed", 1, true), r[2])
        assert.truthy(r[2]:find("and 2 more failed", 1, true), r[2])
        assert.are.equal(v2, s:get("s1"))
        assert.are.equal(v1, s:get("s2"))
        assert.are.equal(v3, s:get("s3"))
        H.expect_err("ENOTFOUND", s:get("s5"))
        local function members(field, value)
            local m = index_members(c, s, P, field, value)
            table.sort(m)
            return m
        end
        for _, fv in ipairs { { "name", "sw" }, { "group", "gsw" }, { "specifier", "3" } } do
            assert.are.same({ "s1", "s2", "s3" }, members(fv[1], fv[2]))
        end
        assert.are.same({ "s1", "s2", "s3" }, sorted_ids(find_all(s, { algo = "ec", group = "gsw" })))
        assert.are.equal(3, s:count())
        cmd(c, { "DEL", P .. "k:s4" })
        s:close()
    end)

    it("put_many_later of new keys: two calls in flight get their own replies, on the writer's "
        .. "connection (scripts there, no transaction)", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local one, two = make_blobs(5, "la" .. RUN, "gla"), make_blobs(5, "lb" .. RUN, "glb")
        local send1, finish1 = s:put_many_later(items_of(one))
        local send2, finish2 = s:put_many_later(items_of(two))
        send1()
        send2()
        assert.are.same({ 5, 0 }, { finish2() })   -- finishes the first one first
        assert.are.same({ 5, 0 }, { finish1() })
        assert.are.equal(10, s:count())
        assert.are.equal(5, #index_members(c, s, P, "group", "gla"))
        assert.are.equal(5, #index_members(c, s, P, "group", "glb"))
        -- 1,500 new keys in one call: every slice on the writer, none left to finish()
        local many = make_blobs(1500, "lc" .. RUN, "glc")
        local send3, finish3 = s:put_many_later(items_of(many))
        send3()
        assert.are.same({ 1500, 0 }, { finish3() })
        assert.are.equal(1510, s:count())
        s:close()
    end)

    it("an ACL user without WATCH: the first slice finds out, every slice goes to the scripts",
       function()
        local P = fresh_prefix()
        local user, pw = "nowatch-" .. RUN, "pw-" .. RUN
        -- the commands of the scripts alone (an older softcxi's list)
        cmd(c, { "ACL", "SETUSER", user, "reset", "on", ">" .. pw, "~" .. P .. "*",
                 "+get", "+mget", "+exists", "+set", "+del", "+eval", "+evalsha", "+scan", "+sscan",
                 "+sismember", "+sadd", "+srem", "+scard", "+spop", "+hget", "+hset", "+hsetnx",
                 "+hdel", "+incr", "+decr", "+wait", "+select", "+ping" })
        finally(function() c:command { "ACL", "DELUSER", user } end)
        local s = open(with_prefix(string.format("redis://%s:%s@127.0.0.1:%d/0", user, pw, MAIN.port), P))
        local many = make_blobs(1200, "nw" .. RUN, "gnw")
        cmd(c, { "CONFIG", "RESETSTAT" })
        assert.are.equal(1200, s:put_many(items_of(many)))
        local stats = cmd(c, { "INFO", "commandstats" })
        assert.are.equal("1", stats:match("cmdstat_watch:[^\r\n]*rejected_calls=(%d+)"))
        assert.is_nil(stats:match("cmdstat_exec:"))
        assert.are.equal(1200, s:count())
        assert.are.equal(1200, #index_members(c, s, P, "group", "gnw"))
        s:close()
    end)

    it("a name set of another type, for a name another id holds: the scripts write the slice "
        .. "and the name stays found", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P, "&name_index=all"))
        local nm = "typed" .. RUN
        local a = H.gen(device(), { algo = "ec", curve = "P-256", name = nm, group = "g1" })
        local b = H.gen(device(), { algo = "ec", curve = "P-256", name = nm, group = "g2" })
        assert.is_true(s:put(nil, a))
        cmd(c, { "SET", P .. "idx:name:" .. nm, "not a set" })
        cmd(c, { "CONFIG", "RESETSTAT" })
        local r = H.pack(s:put_many(items_of { b }))
        assert.is_nil(r[1])
        assert.truthy(tostring(r[2]):find("WRONGTYPE", 1, true), r[2])
        assert.falsy(cmd(c, { "INFO", "commandstats" }):find("cmdstat_exec:", 1, true))
        assert.are.equal((store.id_of(a)), cmd(c, { "HGET", s:name_key("x", nm), nm }))
        cmd(c, { "DEL", P .. "idx:name:" .. nm })
        s:close()
    end)

    it("put_many_later: built now, sent by send, answered by finish as put_many; the store "
       .. "answers meanwhile; calls go out and finish in the order made", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local d = device()
        local tpl = { algo = "ec", curve = "P-256", name = "pl", group = "gpl" }
        local v1, v2, v3 = H.gen(d, tpl), H.gen(d, tpl), H.gen(d, tpl)
        local ids = {}
        for i = 1, 30 do ids[i] = "p" .. i end
        local items = {}
        for i = 1, 30 do items[i] = { id = ids[i], blob = v1 } end
        assert.are.equal(30, s:put_many(items))
        -- compare-and-set of all 30, p7 stale
        items = {}
        for i = 1, 30 do items[i] = { id = ids[i], blob = v2, if_match = i == 7 and v3 or v1 } end
        local send, finish = s:put_many_later(items)
        assert.are.equal("function", type(send))
        assert.are.equal(v1, s:get("p8"))        -- built, not sent
        send()
        -- the store's own connection answers while the writes are out
        assert.are.equal(30, s:count())
        local page, nxt = assert(s:scan(nil, 100))
        assert.are.equal(30, #page)
        assert.is_nil(nxt)
        local r = H.pack(finish())
        assert.is_nil(r[1])
        assert.are.equal("ECONFLICT", r[3], r[2])
        assert.are.equal(29, r[4], r[2])
        assert.truthy(r[2]:find("'p7' changed", 1, true), r[2])
        assert.are.equal(v1, s:get("p7"))
        assert.are.equal(v2, s:get("p8"))
        -- all well: put_many's count; finish alone sends
        finish = select(2, s:put_many_later({ { id = "p7", blob = v2, if_match = v1 } }))
        assert.are.same({ 1, 0 }, { finish() })
        assert.are.equal(v2, s:get("p7"))
        -- two at once, the later one finished first: the earlier goes out and is answered
        -- first, each gets its own replies; one left unfinished is finished by the next
        local send1, finish1 = s:put_many_later({ { id = "p1", blob = v3, if_match = v2 } })
        local send2, finish2 = s:put_many_later({ { id = "p2", blob = v3, if_match = v2 },
                                                  { id = "p3", blob = v3, if_match = v1 } })
        send2()
        r = H.pack(finish2())
        assert.are.equal("ECONFLICT", r[3], r[2])
        assert.are.equal(1, r[4], r[2])
        assert.truthy(r[2]:find("'p3' changed", 1, true), r[2])
        assert.are.same({ 1, 0 }, { finish1() })   -- already done: the same answer
        send1()                                    -- and nothing more
        assert.are.same({ 1, 0 }, { finish1() })
        s:put_many_later({ { id = "p4", blob = v3, if_match = v2 } })   -- never sent by us
        finish = select(2, s:put_many_later({ { id = "p5", blob = v3, if_match = v2 } }))
        assert.are.same({ 1, 0 }, { finish() })
        assert.are.equal(v3, s:get("p4"))
        assert.are.equal(v3, s:get("p5"))
        assert.are.equal(30, s:count())
        assert.are.equal(30, #cmd(c, { "SMEMBERS", P .. "idx:group:gpl" }))
        -- a malformed item raises at once, as put_many's
        assert.has_error(function() s:put_many_later({ { id = "x", blob = 42 } }) end)
        s:close()
        assert.has_error(function() s:put_many_later({}) end)
    end)

    it("swap_later: rewrap's compare-and-set in arrays, built now, sent by send, answered by "
       .. "finish as put_many; a blob that is not a rewrap of the old one is refused", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local d = device()
        local tpl = { algo = "ec", curve = "P-256", name = "sw", group = "gsw" }
        local v1, v2, v3 = H.gen(d, tpl), H.gen(d, tpl), H.gen(d, tpl)
        local ids, olds, news, items = {}, {}, {}, {}
        for i = 1, 30 do
            ids[i] = "s" .. i
            items[i] = { id = ids[i], blob = v1 }
            olds[i], news[i] = v1, v2
        end
        assert.are.equal(30, s:put_many(items))
        olds[7] = v3      -- stale: someone else's value is stored
        news[3] = false   -- left alone
        assert(s:delete("s9"))
        local send, finish = s:swap_later(ids, olds, news, 30)
        assert.are.equal("function", type(send))
        assert.are.equal(v1, s:get("s8"))        -- built, not sent
        send()
        assert.are.equal(29, s:count())           -- the store answers meanwhile
        local r = H.pack(finish())
        assert.is_nil(r[1])
        assert.are.equal("ECONFLICT", r[3], r[2])
        assert.are.equal(27, r[4], r[2])
        assert.truthy(r[2]:find("'s7' changed", 1, true), r[2])
        assert.truthy(r[2]:find("and 1 more failed", 1, true), r[2])
        assert.are.same(r, H.pack(finish()))      -- the same answer again
        assert.are.equal(v1, s:get("s3"))
        assert.are.equal(v1, s:get("s7"))
        assert.are.equal(v2, s:get("s8"))
        H.expect_err("ENOTFOUND", s:get("s9"))    -- not brought back
        assert.are.equal(29, s:count())
        assert.are.equal(29, #cmd(c, { "SMEMBERS", P .. "idx:group:gsw" }))
        -- the first refused item names the code: ENOTFOUND for a deleted one
        finish = select(2, s:swap_later({ "s9", "s8" }, { v1, v2 }, { v2, v3 }))
        r = H.pack(finish())
        assert.are.equal("ENOTFOUND", r[3], r[2])
        assert.are.equal(1, r[4])
        -- all well: the count; nothing to write: 0
        finish = select(2, s:swap_later({ "s1", "s2" }, { v2, v2 }, { v3, v3 }, 2))
        assert.are.same({ 2 }, { finish() })
        finish = select(2, s:swap_later({ "s1" }, { v3 }, { false }))
        assert.are.same({ 0 }, { finish() })
        -- later ones finished first: the earlier go out and are answered first
        local send1, finish1 = s:swap_later({ "s4" }, { v2 }, { v3 })
        local _, finish2 = s:swap_later({ "s5" }, { v2 }, { v3 })
        s:swap_later({ "s6" }, { v2 }, { v3 })    -- never sent by us
        local _, finish4 = s:swap_later({ "s10" }, { v2 }, { v3 })
        assert.are.same({ 1 }, { finish2() })
        assert.are.same({ 1 }, { finish1() })
        send1()
        assert.are.same({ 1 }, { finish4() })
        for _, id in ipairs { "s4", "s5", "s6", "s10" } do assert.are.equal(v3, s:get(id)) end
        -- not a rewrap: another name, not a blob; refused before anything is sent
        local other = H.gen(d, { algo = "ec", curve = "P-256", name = "sw2", group = "gsw" })
        local msg = H.expect_err("EINVAL", s:swap_later({ "s11", "s12" }, { v2, v2 }, { v3, other }))
        assert.truthy(msg:find("'s12'", 1, true) and msg:find("name", 1, true), msg)
        msg = H.expect_err("EFORMAT", s:swap_later({ "s11" }, { v2 }, { "K-no-blob" }))
        assert.truthy(msg:find("'s11'", 1, true), msg)
        assert.are.equal(v2, s:get("s11"))
        assert.has_error(function() s:swap_later({ "s11" }, { v2 }, { 42 }) end)
        assert.has_error(function() s:swap_later("s11", { v2 }, { v3 }) end)
        -- a script call refused as a whole (an ACL user without EVAL): the call's own code
        -- and message, naming its first id, not a compare-and-set code
        local user, pw = "noeval-" .. RUN, "pw-" .. RUN
        cmd(c, { "ACL", "SETUSER", user, "reset", "on", ">" .. pw, "~" .. P .. "*", "+get", "+mget",
                 "+exists", "+set", "+del", "+scan", "+sscan", "+ping", "+select" })
        finally(function() c:command { "ACL", "DELUSER", user } end)
        local weak = open(with_prefix(string.format("redis://%s:%s@127.0.0.1:%d/0", user, pw, MAIN.port), P))
        r = H.pack(select(2, weak:swap_later({ "s1", "s2" }, { v3, v3 }, { v2, v2 }))())
        assert.is_nil(r[1])
        assert.are.equal("EPERM", r[3], r[2])
        assert.truthy(r[2]:find("'s1' and 1 more: NOPERM", 1, true), r[2])
        assert.are.equal(0, r[4])
        assert.are.equal(v3, s:get("s1"))
        weak:close()
        s:close()
        assert.has_error(function() s:swap_later({}, {}, {}) end)
    end)

    it("scan fills a page in few SCAN round trips although index keys dilute the keyspace", function()
        -- a database of its own: only this store's keys (a blob each, and 1,000 names in
        -- 65,536 name index hashes: nearly one hash each)
        local s = open(with_prefix(URL:gsub("/0%?", "/9?"), fresh_prefix(),
                                   "&name_buckets=65536&name_index=all"))
        cmd(c, { "SELECT", "9" })
        finally(function() cmd(c, { "FLUSHDB" }); cmd(c, { "SELECT", "0" }) end)
        local blobs = make_blobs(1000, "dil" .. RUN, "gdil")
        assert.are.equal(1000, s:put_many(items_of(blobs)))
        assert.is_true(cmd(c, { "DBSIZE" }) >= 1950)
        cmd(c, { "CONFIG", "RESETSTAT" })
        local ids, skipped, pages = scan_all(s, 250)
        assert.are.same(set_of(ids_of(blobs)), set_of(ids))
        assert.are.equal(0, skipped)
        local stats = cmd(c, { "INFO", "commandstats" })
        local scans = tonumber(stats:match("cmdstat_scan:calls=(%d+)"))
        -- asking SCAN for the page size alone took 15 SCANs for these 4 pages (now 5)
        assert.is_true(scans <= pages + 3, scans .. " SCANs for " .. pages .. " pages")
        s:close()
    end)

    for _, ai in ipairs { 0, 1 } do
    it("put_many of new keys with mixed attributes puts each in its own index sets (algo_index="
       .. ai .. ")", function()
        -- new keys go through the lean script, one call per bucket and combination of
        -- specifier, group and algo; a blob without a name through the general one
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P, ai == 1 and "&algo_index=1" or nil))
        local d = device()
        local ec, aes = { algo = "ec", curve = "P-256" }, { algo = "aes", size = 256 }
        local function t(base, extra)
            local r = {}
            for k, v in pairs(base) do r[k] = v end
            for k, v in pairs(extra) do r[k] = v end
            return r
        end
        local items = {
            { id = "m1", blob = H.gen(d, t(ec, { name = "mn1", group = "mg1", specifier = 2 })) },
            { id = "m2", blob = H.gen(d, t(ec, { name = "mn2", group = "mg1" })) },
            { id = "m3", blob = H.gen(d, t(aes, { name = "mn3", group = "mg2" })) },
            { id = "m4", blob = H.gen(d, t(aes, { name = "mn1", group = "mg1", specifier = 2 })) },
            { id = "m5", blob = H.gen(d, t(ec, { group = "mg2" })) },
            { id = "m6", blob = H.gen(d, t(ec, { name = "mn6", group = "mg1", specifier = 2 })) },
        }
        cmd(c, { "SET", P .. "k:m6", "taken" })    -- not a blob: left alone, counted as skipped
        local stored, skipped = s:put_many(items, { skip_existing = true })
        assert.are.equal(5, stored)
        assert.are.equal(1, skipped)
        local function members(field, value)
            local m = index_members(c, s, P, field, value)
            table.sort(m)
            return m
        end
        assert.are.same({ "m1", "m4" }, members("name", "mn1"))
        assert.are.same({ "m2" }, members("name", "mn2"))
        assert.are.same({ "m3" }, members("name", "mn3"))
        assert.are.same({}, members("name", "mn6"))
        assert.are.same({ "m1", "m2", "m4" }, members("group", "mg1"))
        assert.are.same({ "m3", "m5" }, members("group", "mg2"))
        assert.are.same({ "m1", "m4" }, members("specifier", "2"))
        assert.are.same(ai == 1 and { "m1", "m2", "m5" } or {}, members("algo", "ec"))
        assert.are.same(ai == 1 and { "m3", "m4" } or {}, members("algo", "aes"))
        assert.are.same({ "m1", "m2", "m5" }, sorted_ids(find_all(s, { algo = "ec" })))
        assert.are.same({ "m4" }, sorted_ids(find_all(s, { algo = "aes", group = "mg1" })))
        assert.are.equal(5, s:count())
        assert.are.equal("taken", cmd(c, { "GET", P .. "k:m6" }))
        for _, it in ipairs(items) do
            if it.id ~= "m6" then assert.are.equal(it.blob, s:get(it.id)) end
        end
        cmd(c, { "DEL", P .. "k:m6" })
        s:close()
    end)
    end

    it("an on_chunk that raises leaves no reply unread: the store answers right afterwards", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local blobs = make_blobs(150, "oc" .. RUN, "goc")
        local ok, err = pcall(s.put_many, s, items_of(blobs), { chunk = 50, on_chunk = function(done)
            if done == 50 then error("stop here", 0) end
        end })
        assert.is_false(ok)
        assert.are.equal("stop here", err)
        -- the chunk sent ahead (51-100) may have landed; its reply was dropped with the
        -- connection, never read as the answer to what follows
        local ids = ids_of(blobs)
        assert.are.equal(blobs[1], s:get(ids[1]))
        local n = s:count()
        assert.is_true(n == 50 or n == 100, "count " .. tostring(n))
        H.expect_err("ENOTFOUND", s:get(ids[150]))
        local stored, skipped = s:put_many(items_of(blobs), { skip_existing = true })
        assert.are.equal(150 - n, stored)
        assert.are.equal(n, skipped)
        for _, id in ipairs(ids) do assert.is_true(s:delete(id)) end
        s:close()
    end)

    it("skips and counts values under the prefix that are not key blobs", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local blobs = make_blobs(3, "junk" .. RUN, "gj")
        assert.are.equal(3, s:put_many(items_of(blobs)))
        cmd(c, { "SET", P .. "k:junk", "hello" })          -- bytes that are no blob
        cmd(c, { "SET", P .. "k:cut", blobs[1]:sub(1, 40) }) -- a truncated blob
        cmd(c, { "SADD", P .. "k:aset", "x" })             -- another type
        cmd(c, { "SET", P .. "unrelated", "y" })           -- not a blob key at all
        local ids, skipped = scan_all(s, 2)
        assert.are.same(set_of(ids_of(blobs)), set_of(ids))
        assert.are.equal(3, skipped)
        assert.are.equal(3, s.skipped)
        -- scan_blobs too (rewrap's read): arrays of ids and their blobs
        local by_id, cur, sk = {}, nil, 0
        repeat
            local pids, pblobs, nxt, bad = s:scan_blobs(cur, 2)
            assert(pids, pblobs)
            assert.are.equal(#pids, #pblobs)
            for i = 1, #pids do by_id[pids[i]] = pblobs[i] end
            cur, sk = nxt, sk + bad
        until not cur
        for i, id in ipairs(ids_of(blobs)) do assert.are.equal(blobs[i], by_id[id]) end
        assert.are.same(set_of(ids_of(blobs)), set_of((function()
            local l = {}
            for id in pairs(by_id) do l[#l + 1] = id end
            return l
        end)()))
        assert.are.equal(3, sk)
        assert.are.equal(6, s.skipped)
        local all, cursor = {}, nil
        repeat
            local page
            page, cursor = s:find({}, cursor, 4)
            for _, id in ipairs(page) do all[#all + 1] = id end
        until not cursor
        assert.are.same(set_of(ids_of(blobs)), set_of(all))
        for _, id in ipairs { "junk", "cut", "aset" } do
            local msg = H.expect_err("EFORMAT", s:get(id))
            assert.truthy(msg:find("'" .. id .. "'", 1, true), msg)
            assert.truthy(msg:find(P .. "k:" .. id, 1, true), msg)
        end
        local got, errs = s:get_many({ "junk", ids_of(blobs)[1], "aset", "missing" })
        assert.are.equal(blobs[1], got[ids_of(blobs)[1]])
        assert.is_nil(got.junk)
        assert.are.equal("EFORMAT", errs.junk[2])
        assert.are.equal("EFORMAT", errs.aset[2])
        assert.is_nil(errs.missing)
        assert.are.equal(3, s:count())                    -- the counter counts blobs only
        cmd(c, { "DEL", P .. "k:junk", P .. "k:cut", P .. "k:aset", P .. "unrelated" })
        for _, id in ipairs(ids_of(blobs)) do assert.is_true(s:delete(id)) end
        s:close()
    end)

    it("pages of any size visit every id exactly once", function()
        local s = open(with_prefix(URL, fresh_prefix()))
        check_paging(s, "r")
        assert.is_true(s:close())
        assert.is_true(s:close())
        assert.has_error(function() s:get("x") end, "store.redis.get: the store is closed")
    end)

    it("reconnects for a read; a write on a broken connection is not resent", function()
        local P = fresh_prefix()
        local s = open(with_prefix(URL, P))
        local blobs = make_blobs(2, "rc" .. RUN, "grc")
        assert.is_true(s:put("a", blobs[1]))
        local function kill_conn()
            local id = cmd(s.transport.c, { "CLIENT", "ID" })
            assert.are.equal(1, cmd(c, { "CLIENT", "KILL", "ID", id }))
        end
        kill_conn()
        assert.are.equal(blobs[1], s:get("a"))              -- retried on a new connection
        kill_conn()
        H.expect_err("ECONN", s:put("b", blobs[2]))         -- may or may not have run: say so
        assert.is_true(s:put("b", blobs[2], { overwrite = true }))  -- the next call reconnects
        assert.are.equal(2, s:count())
        assert.is_true(s:delete("a"))
        assert.is_true(s:delete("b"))
        s:close()
    end)

    it("wait_replicas: put returns once the replicas have the write, EREPL when too few do", function()
        local dir = tmp_root .. "/repl"
        H.mkdir_p(dir .. "/m")
        H.mkdir_p(dir .. "/r")
        local m = start_server(dir .. "/m", "--appendonly no --repl-diskless-sync-delay 0")
        local r = start_server(dir .. "/r", "--appendonly no --replicaof 127.0.0.1 " .. m.port)
        finally(function()
            stop_server(r)
            stop_server(m)
        end)
        local mc, rc = admin(m.port), admin(r.port)
        for _ = 1, 100 do
            local info = cmd(rc, { "INFO", "replication" })
            if info:find("master_link_status:up", 1, true) then break end
            hiredis.sleep(0.05)
        end
        local blobs = make_blobs(3, "wr" .. RUN, "gwr")
        local s = open(string.format("redis://127.0.0.1:%d?prefix=w:&wait_replicas=1&wait_timeout_ms=5000",
                                     m.port))
        assert.is_true(s:put("a", blobs[1]))
        assert.are.equal(blobs[1], cmd(rc, { "GET", "w:k:a" }))   -- on the replica when put returned
        assert.are.equal(1, s:put_many({ { id = "b", blob = blobs[2] } }))
        assert.are.equal(blobs[2], cmd(rc, { "GET", "w:k:b" }))
        s:close()
        s = open(string.format("redis://127.0.0.1:%d?prefix=w:&wait_replicas=2&wait_timeout_ms=100", m.port))
        local msg = H.expect_err("EREPL", s:put("c", blobs[3]))
        assert.truthy(msg:find("only 1 of 2 replicas", 1, true), msg)
        assert.are.equal(blobs[3], s:get("c"))                      -- written on the master all the same
        s:close()
        mc:close()
        rc:close()
    end)

    it("Redis killed mid-put_many: the error says how many keys are confirmed; a re-run completes",
       function()
        local dir = tmp_root .. "/crash"
        H.mkdir_p(dir)
        -- AOF with fsync always: what Redis confirmed survives kill -9 (docs/stores-redis.md)
        local persist = "--appendonly yes --appendfsync always"
        local srv = start_server(dir, persist)
        finally(function() stop_server(srv, "KILL") end)
        local s = open(string.format("redis://127.0.0.1:%d/0?prefix=crash:&timeout=2", srv.port))
        local blobs = make_blobs(500, "crash" .. RUN, "gcrash")
        local items = items_of(blobs)
        local progress = {}
        local r = H.pack(s:put_many(items, { chunk = 50, on_chunk = function(done, total)
            progress[#progress + 1] = done
            assert.are.equal(500, total)
            if done == 150 then stop_server(srv, "KILL") end
        end }))
        -- put_many sends each chunk before it reads the replies of the one before: the
        -- chunk in flight when Redis died (151-200) may have been answered before the
        -- kill, and then it is confirmed too -- as a whole, or (its items split between
        -- two script calls by specifier) the call whose reply came in before the kill.
        -- What is confirmed is stored, and the message and the fourth value say exactly
        -- how much that is.
        local last_chunk = progress[#progress]
        assert.is_true(last_chunk == 150 or last_chunk == 200, "on_chunk: " .. tostring(last_chunk))
        for i, done in ipairs(progress) do assert.are.equal(50 * i, done) end
        assert.is_nil(r[1])
        assert.are.equal("ECONN", r[3], r[2])
        local confirmed = r[4]
        assert.is_true(confirmed == last_chunk or confirmed == last_chunk + 25
                       or confirmed == last_chunk + 50,
                       "confirmed " .. tostring(confirmed) .. ", on_chunk " .. last_chunk)
        assert.truthy(r[2]:find(confirmed .. " of 500 keys were confirmed stored", 1, true), r[2])
        assert.truthy(r[2]:find("^store%.redis%.put_many: "), r[2])

        srv = start_server(dir, persist, srv.port)          -- same port, same AOF
        -- the same store object reconnects; the chunk sent ahead of the last confirmed one
        -- may have run before the kill: confirmed <= stored <= confirmed + one chunk
        local have = s:count()
        assert.is_true(have >= confirmed and have <= confirmed + 50,
                       "stored after the kill: " .. tostring(have))
        local n, skipped = s:put_many(items, { chunk = 50, skip_existing = true })
        assert.are.equal(500 - have, n)
        assert.are.equal(have, skipped)
        assert.are.equal(500, s:count())
        local ids, bad = scan_all(s, 100)
        assert.are.equal(0, bad)
        assert.are.equal(500, #ids)                                  -- no duplicates
        assert.are.same(set_of(ids_of(blobs)), set_of(ids))         -- none missing
        local got = assert(s:get_many(ids_of(blobs)))
        for i, id in ipairs(ids_of(blobs)) do assert.are.equal(blobs[i], got[id]) end
        s:close()
    end)
end)

-- ---- the cluster store -------------------------------------------------------------------

if not CURL then
    describe("redis cluster store", function()
        pending("SOFTCXI_TEST_REDIS_CLUSTER_URL is not set (./run test starts a cluster)")
    end)
    return
end

describe("redis cluster store", function()
    local conns = {}

    local function conn(addr)
        if not conns[addr] then
            local port = tonumber(addr:match(":(%d+)$"))
            conns[addr] = admin(port)
        end
        return conns[addr]
    end

    -- the first node of the URL
    local function seed()
        local h = assert(redis.parse_url(CURL:match("^redis%-cluster:(.*)$"))).hosts[1]
        return h.host .. ":" .. h.port
    end

    teardown(function()
        for _, x in pairs(conns) do x:close() end
    end)

    it("computes the slots Redis computes", function()
        local c = conn(seed())
        for i = 1, 50 do
            local key = urandom_hex(i % 7 + 1) .. (i % 3 == 0 and ("{" .. i .. "}") or "") .. "/k" .. i
            assert.are.equal(cmd(c, { "CLUSTER", "KEYSLOT", key }), cluster.key_slot(key), key)
        end
    end)

    it("spreads one group's index over many slots and nodes; a blob shares its index's slot", function()
        local P = fresh_prefix()
        local s = open(with_prefix(CURL, P))
        assert.are.equal(256, s.nb)
        local blobs = make_blobs(64, "spread" .. RUN, "gspread")
        assert.are.equal(64, s:put_many(items_of(blobs)))
        local t = s.transport
        local buckets, slots, nodes = 0, {}, {}
        local cmds = {}
        for b = 0, s.nb - 1 do
            local k = P .. "{" .. b .. "}idx:group:gspread"
            cmds[#cmds + 1] = { "SCARD", k, key = k }
        end
        local res = t:pipeline(cmds)
        local members = 0
        for i, n in ipairs(res) do
            if n > 0 then
                buckets = buckets + 1
                members = members + n
                slots[cluster.key_slot(cmds[i][2])] = true
                nodes[t:addr_of(cmds[i][2])] = true
            end
        end
        assert.are.equal(64, members)
        assert.is_true(buckets >= 40, "buckets used: " .. buckets)
        local nslots, nnodes = 0, 0
        for _ in pairs(slots) do nslots = nslots + 1 end
        for _ in pairs(nodes) do nnodes = nnodes + 1 end
        assert.are.equal(buckets, nslots)
        assert.is_true(nnodes >= 2, "nodes used: " .. nnodes)
        for _, id in ipairs(ids_of(blobs)) do
            local b = s:bucket(id)
            assert.are.equal(cluster.key_slot(P .. "{" .. b .. "}idx:group:gspread"),
                             cluster.key_slot(s:blob_key(id)))
            assert.is_true(s:delete(id))
        end
        assert.are.equal(0, s:count())
        s:close()
    end)

    it("pages of any size visit every id exactly once, across buckets and nodes", function()
        local s = open(with_prefix(CURL, fresh_prefix()))
        check_paging(s, "c")
        s:close()
    end)

    it("exists_many asks each bucket's node, and sees what is stored across buckets", function()
        local s = open(with_prefix(CURL, fresh_prefix()))
        local blobs = make_blobs(40, "cex" .. RUN, "gcex")
        local ids = ids_of(blobs)
        local items = {}
        for i = 1, 20 do items[i] = { blob = blobs[i] } end
        assert.are.equal(20, s:put_many(items))
        local have = assert(s:exists_many(ids))
        for i = 1, 40 do assert.are.equal(i <= 20 or nil, have[ids[i]], ids[i]) end
        s:close()
    end)

    it("has no put_many_later (one connection per node): rewrap writes with put_many", function()
        local s = open(with_prefix(CURL, fresh_prefix()))
        assert.is_nil(s:put_many_later({}))
        s:close()
    end)

    it("defaults to a chunk of 64 keys per bucket, which provision takes as its batch", function()
        local s = open(with_prefix(CURL, fresh_prefix()))
        assert.are.equal(64 * 256, s.chunk)
        assert.are.equal(64 * 256, s.preferred_batch)
        s:close()
        s = open(with_prefix(CURL, fresh_prefix(), "&buckets=16&chunk=300"))
        assert.are.equal(300, s.chunk)
        assert.are.equal(300, s.preferred_batch)
        s:close()
        s = open(with_prefix(CURL, fresh_prefix(), "&buckets=16"))
        assert.are.equal(64 * 16, s.chunk)
        s:close()
    end)

    it("a stale slot map: commands answered MOVED mid-batch still land", function()
        local P = fresh_prefix()
        local s = open(with_prefix(CURL, P))
        local t = s.transport
        local blobs = make_blobs(200, "moved" .. RUN, "gmoved")
        t:_scramble()
        local moved0 = t.stats.moved
        local n = s:put_many(items_of(blobs), { chunk = 50, on_chunk = function() t:_scramble() end })
        assert.are.equal(200, n)
        -- every chunk is redirected (a write script call per bucket: fewer calls than keys)
        assert.is_true(t.stats.moved - moved0 >= 4, "MOVED answers: " .. (t.stats.moved - moved0))
        t:_scramble()
        local got = assert(s:get_many(ids_of(blobs)))
        for i, id in ipairs(ids_of(blobs)) do assert.are.equal(blobs[i], got[id]) end
        t:_scramble()
        assert.are.equal(200, s:count())
        t:_scramble()
        local ids = scan_all(s, 64)
        assert.are.same(set_of(ids_of(blobs)), set_of(ids))
        for _, id in ipairs(ids_of(blobs)) do assert.is_true(s:delete(id)) end
        s:close()
    end)

    it("follows ASK while a slot migrates and MOVED once it has moved", function()
        local P = fresh_prefix()
        local s = open(with_prefix(CURL, P))
        local t = s.transport
        local blob = H.gen(device(), { algo = "ec", curve = "P-256", name = "mig" .. RUN, group = "gmig" })
        assert.is_true(s:put("a", blob))
        local key = s:blob_key("a")
        local slot = cluster.key_slot(key)
        local src = t:addr_of(key)
        local dst
        for _, a in ipairs(t.masters) do if a ~= src then dst = a break end end
        local src_id, dst_id = cmd(conn(src), { "CLUSTER", "MYID" }), cmd(conn(dst), { "CLUSTER", "MYID" })
        local dst_port = tonumber(dst:match(":(%d+)$"))

        local function migrate_all(from, to_port)
            repeat
                local keys = cmd(conn(from), { "CLUSTER", "GETKEYSINSLOT", slot, 100 })
                if #keys > 0 then
                    local argv = { "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS" }
                    for _, k in ipairs(keys) do argv[#argv + 1] = k end
                    cmd(conn(from), argv)
                end
            until #keys == 0
        end
        local function assign(to_id)
            for _, a in ipairs(t.masters) do cmd(conn(a), { "CLUSTER", "SETSLOT", slot, "NODE", to_id }) end
        end

        cmd(conn(dst), { "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id })
        cmd(conn(src), { "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id })
        finally(function()
            -- whatever happened, give the slot back to src with every key in it
            conn(src):command { "CLUSTER", "SETSLOT", slot, "STABLE" }
            conn(dst):command { "CLUSTER", "SETSLOT", slot, "STABLE" }
        end)
        cmd(conn(src), { "MIGRATE", "127.0.0.1", dst_port, key, 0, 5000 })   -- the blob moves first
        local ask0 = t.stats.ask
        assert.are.equal(blob, s:get("a"))                  -- src answers ASK, dst serves it
        assert.is_true(t.stats.ask > ask0)

        migrate_all(src, dst_port)
        cmd(conn(dst), { "CLUSTER", "SETSLOT", slot, "NODE", dst_id })
        assign(dst_id)
        local moved0 = t.stats.moved
        assert.are.equal(blob, s:get("a"))                  -- src answers MOVED, the map follows
        assert.is_true(t.stats.moved > moved0)
        assert.are.equal(dst, t:addr_of(key))
        assert.are.same({ "a" }, s:find({ group = "gmig" }))

        -- and back where it was, so every run starts from the same cluster
        local src_port = tonumber(src:match(":(%d+)$"))
        cmd(conn(src), { "CLUSTER", "SETSLOT", slot, "IMPORTING", dst_id })
        cmd(conn(dst), { "CLUSTER", "SETSLOT", slot, "MIGRATING", src_id })
        migrate_all(dst, src_port)
        cmd(conn(src), { "CLUSTER", "SETSLOT", slot, "NODE", src_id })
        assign(src_id)
        assert.are.equal(blob, s:get("a"))
        assert.are.equal(src, t:addr_of(key))
        assert.is_true(s:delete("a"))
        s:close()
    end)

    it("upgrades a cluster store of the old layout, bucket by bucket", function()
        local P = fresh_prefix()
        local t = open(with_prefix(CURL, fresh_prefix())).transport   -- a router to write with
        local d = device()
        local blobs = {}
        for i = 1, 40 do
            blobs[i] = { "cold/" .. i, H.gen(d, { algo = "ec", curve = "P-256", name = "cn" .. (i % 20),
                                                  group = "gcold" }) }
        end
        old_layout(function(argv)
            argv.key = argv[2]
            local r = t:pipeline({ argv })
            assert(r[1] ~= nil and not (type(r[1]) == "table" and r[1].err), tostring(r[1]))
        end, P, blobs, function(id) return "{" .. cluster.crc16(id) % 256 .. "}" end)
        local url = with_prefix(CURL, P)
        local msg = H.expect_err("ELAYOUT", store.open(url))
        assert.truthy(msg:find("softcxi store upgrade", 1, true), msg)
        local s = assert(store.open(url, { upgrade = true }))
        assert.are.equal(16, s.name_buckets)
        assert.are.equal(1, s.nm)           -- one name hash per bucket
        assert.are.equal(40, s.upgraded.blobs)
        for k = 0, 19 do
            local want = { "cold/" .. (k == 0 and 20 or k), "cold/" .. (k == 0 and 40 or k + 20) }
            table.sort(want)
            assert.are.same(want, find_all(s, { name = "cn" .. k }))
        end
        assert.are.equal(40, #find_all(s, { group = "gcold" }))
        for i = 1, 40 do assert.is_true(s:delete(blobs[i][1])) end
        assert.are.equal(0, s:count())
        -- nothing of the index is left: the hashes emptied, the old sets gone
        for _, node in ipairs(s.transport:nodes()) do
            for _, pat in ipairs { "{*}nx:*", "{*}idx:*" } do
                local cursor, left = "0", 0
                repeat
                    local r = node:pipeline({ { "SCAN", cursor, "MATCH", P .. pat, "COUNT", 1000 } })[1]
                    cursor, left = r[1], left + #r[2]
                until cursor == "0"
                assert.are.equal(0, left, pat)
            end
        end
        s:close()
        t:close()
    end)

    it("keeps a name entry for every key (name_index=all); name_index=other is refused", function()
        local P = fresh_prefix()
        local msg = H.expect_err("EINVAL", store.open(with_prefix(CURL, P, "&buckets=16&name_index=other")))
        assert.truthy(msg:find("name_index=other is for one Redis", 1, true), msg)
        local s = open(with_prefix(CURL, P, "&buckets=16"))
        assert.is_false(s.probe)
        local nrec = P .. "{meta}name-index"
        assert.are.equal("all", s.transport:pipeline({ { "GET", nrec, key = nrec } })[1])
        local blobs = make_blobs(4, "cni" .. RUN, "gcni")
        assert.are.equal(4, s:put_many(items_of(blobs)))
        assert.are.same({ ids_of(blobs)[3] }, find_all(s, { name = "cni" .. RUN .. "-3" }))
        for _, id in ipairs(ids_of(blobs)) do assert.is_true(s:delete(id)) end
        s:close()
    end)

    it("refuses another bucket count for an existing store, and braces in the prefix", function()
        local P = fresh_prefix()
        local s = open(with_prefix(CURL, P, "&buckets=16"))
        assert.are.equal(16, s.nb)
        s:close()
        s = open(with_prefix(CURL, P, "&buckets=16"))
        s:close()
        local msg = H.expect_err("EINVAL", store.open(with_prefix(CURL, P, "&buckets=32")))
        assert.truthy(msg:find("buckets=16", 1, true), msg)
        H.expect_err("EINVAL", store.open(with_prefix(CURL, P)))   -- the default, 256
        H.expect_err("EINVAL", store.open(with_prefix(CURL, "a{b}:")))
        H.expect_err("EINVAL", store.open(CURL .. "/1"))
        -- the bucket count lives under the prefix, routed like any key
        local meta = P .. "{meta}buckets"
        s = open(with_prefix(CURL, P, "&buckets=16"))
        assert.are.equal("16", s.transport:pipeline({ { "GET", meta, key = meta } })[1])
        s.transport:pipeline({ { "DEL", meta, key = meta } })
        s:close()
    end)
end)
