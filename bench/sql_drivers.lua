-- Which SQL driver for the SQL stores: Debian's LuaSQL 2.6 (lua-sql-postgres,
-- lua-sql-sqlite3) or softcxi's own thin bindings (softcxi.pq, softcxi.sqlite3)?
-- Same work through both, in one run, so the ratios hold however loaded the machine is:
--
--   put   N real P-256 key blobs, 1000 per transaction, multi-row INSERTs of 500 rows
--   get   them back, 500 ids per SELECT ... WHERE id IN (...)
--   and a round-trip check of every blob (bytes in == bytes out), for LuaSQL both with
--   its own conn:escape() and with hex literals.
--
--   lua5.4 bench/sql_drivers.lua PG_URL [N=10000] [SQLITE_FILE]
--
-- LuaSQL has no bound parameters: a blob must become SQL text.  Its escape() is
-- PQescapeStringConn / sqlite3 %q, made for text: see what it does to a blob with a
-- zero byte.  Hex literals ('\x..'::bytea, X'..') are correct but cost an encode per
-- write and, for PostgreSQL, a decode per read (LuaSQL fetches bytea as hex text).
-- Needs: apt-get install lua-sql-postgres lua-sql-sqlite3 (not a softcxi dependency).

local softcxi = require "softcxi"
local sys = require "softcxi.sys"
local pq = require "softcxi.pq"
local sqlite3 = require "softcxi.sqlite3"

local url = arg[1] or error("usage: sql_drivers.lua PG_URL [N] [SQLITE_FILE]")
local N = tonumber(arg[2] or "") or 10000
local root = os.tmpname()
os.remove(root)
assert(sys.mkdir_p(root .. "/keys", 448))
local sqlite_file = arg[3] or (root .. "/drivers.db")

local ok_pg, luasql_pg = pcall(require, "luasql.postgres")
local ok_sq, luasql_sq = pcall(require, "luasql.sqlite3")
if not ok_pg or not ok_sq then
    error("LuaSQL is not installed (apt-get install lua-sql-postgres lua-sql-sqlite3)")
end

-- N blobs from a throw-away device
assert(softcxi.init { path = root .. "/state", keyfile = root .. "/keys/dev.key",
    password = "bench-admin-password", kdf_cost = 10 })
local hsm = assert(softcxi.open { path = root .. "/state", keyfile = root .. "/keys/dev.key" })
assert(hsm:logon_pass("ADMIN", "bench-admin-password"))
assert(hsm:user_add { name = "bench", password = "bench-password", groups = { "*" }, kdf_cost = 10 })
hsm:logoff()
assert(hsm:logon_pass("bench", "bench-password"))
local blobs = {}
for first = 1, N, 1000 do
    local got = assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL, { algo = "ec", curve = "P-256", group = "b" },
        math.min(1000, N - first + 1), { name_format = "d-%08d", start = first }))
    for i = 1, #got do blobs[first + i - 1] = got[i] end
end
local with_zero = 0
for i = 1, N do if blobs[i]:find("\0", 1, true) then with_zero = with_zero + 1 end end
print(("info %d blobs of %d bytes; %d of them hold a zero byte"):format(N, #blobs[1], with_zero))

local function hex(s)
    return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end
local function unhex(h)
    return (h:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end
local function id(i) return ("id-%08d"):format(i) end

local results = {}
local function timed(name, f)
    local t0 = sys.monotonic()
    local extra = f()
    local dt = sys.monotonic() - t0
    results[name] = dt
    print(("%-34s %9.0f keys/s  %7.2f us/key%s"):format(name, N / dt, dt / N * 1e6,
        extra and ("  " .. extra) or ""))
end

-- ---- PostgreSQL -------------------------------------------------------------------
local conninfo = url:gsub("^postgres:", "postgresql:"):gsub("[?&]table=[^&]*", "")
local c = assert(pq.connect(conninfo))
local function reset(exec)
    assert(exec("DROP TABLE IF EXISTS softcxi_drivers"))
    assert(exec("CREATE TABLE softcxi_drivers (id text COLLATE \"C\" PRIMARY KEY, blob bytea NOT NULL)"))
end

local function check_all(get)
    local bad = 0
    for first = 1, N, 500 do
        local got = get(first, math.min(N, first + 499))
        for i = first, math.min(N, first + 499) do
            if got[id(i)] ~= blobs[i] then bad = bad + 1 end
        end
    end
    return bad
end

-- softcxi.pq: bound parameters, binary format both ways
reset(function(s) return c:script(s) end)
timed("pg put  softcxi.pq (binary params)", function()
    for first = 1, N, 1000 do
        assert(c:exec("BEGIN"))
        for s = first, math.min(N, first + 999), 500 do
            local e = math.min(N, s + 499, first + 999)
            local ph, params = {}, {}
            for i = s, e do
                local k = #params
                params[k + 1], params[k + 2] = id(i), blobs[i]
                ph[#ph + 1] = ("($%d, $%d)"):format(k + 1, k + 2)
            end
            assert(c:exec("INSERT INTO softcxi_drivers VALUES " .. table.concat(ph, ","), params))
        end
        assert(c:exec("COMMIT"))
    end
end)
local function pq_get(first, last)
    local ph, params = {}, {}
    for i = first, last do params[#params + 1] = id(i); ph[#ph + 1] = "$" .. #params end
    local rows = assert(c:exec("SELECT id, blob FROM softcxi_drivers WHERE id IN (" .. table.concat(ph, ",")
        .. ")", params))
    local out = {}
    for _, r in ipairs(rows) do out[r[1]] = r[2] end
    return out
end
local bad
timed("pg get  softcxi.pq", function() bad = check_all(pq_get) end)
print(("info softcxi.pq: %d of %d blobs differ after the round trip"):format(bad, N))

-- LuaSQL: SQL text only
local env = assert(luasql_pg.postgres())
local user, host, port, db = url:match("^postgres://([^@]+)@([^:/]+):(%d+)/([^?]+)")
local lc = assert(env:connect(db, user, nil, host, port))
local function lexec(sql)
    local r, err = lc:execute(sql)
    if not r then return nil, err end
    return r
end
reset(lexec)
timed("pg put  LuaSQL (hex bytea literals)", function()
    for first = 1, N, 1000 do
        assert(lexec("BEGIN"))
        for s = first, math.min(N, first + 999), 500 do
            local e = math.min(N, s + 499, first + 999)
            local v = {}
            for i = s, e do v[#v + 1] = ("('%s', '\\x%s')"):format(lc:escape(id(i)), hex(blobs[i])) end
            assert(lexec("INSERT INTO softcxi_drivers VALUES " .. table.concat(v, ",")))
        end
        assert(lexec("COMMIT"))
    end
end)
local function luasql_get(first, last)
    local v = {}
    for i = first, last do v[#v + 1] = "'" .. id(i) .. "'" end
    local cur = assert(lc:execute("SELECT id, blob FROM softcxi_drivers WHERE id IN (" .. table.concat(v, ",")
        .. ")"))
    local out = {}
    local row = cur:fetch({}, "n")
    while row do
        out[row[1]] = unhex(row[2]:sub(3)) -- bytea comes back as text: \x<hex>
        row = cur:fetch(row, "n")
    end
    cur:close()
    return out
end
timed("pg get  LuaSQL (hex text decoded)", function() bad = check_all(luasql_get) end)
print(("info LuaSQL hex: %d of %d blobs differ after the round trip"):format(bad, N))

-- LuaSQL's own escape() on a blob
reset(lexec)
local refused, stored = 0, 0
for i = 1, math.min(N, 1000) do
    local r = lc:execute(("INSERT INTO softcxi_drivers VALUES ('%s', '%s')"):format(id(i), lc:escape(blobs[i])))
    if r then stored = stored + 1 else refused = refused + 1 end
end
bad = 0
for first = 1, math.min(N, 1000), 500 do
    local got = luasql_get(first, math.min(N, 1000, first + 499))
    for i = first, math.min(N, 1000, first + 499) do if got[id(i)] ~= blobs[i] then bad = bad + 1 end end
end
print(("info LuaSQL escape(): of %d blobs, %d refused by the server, %d stored, %d of all differ after the"
    .. " round trip"):format(math.min(N, 1000), refused, stored, bad))
lc:close()
env:close()
assert(c:script("DROP TABLE softcxi_drivers"))
c:close()
print(("ratio pg put LuaSQL/softcxi.pq %.2f, get %.2f"):format(
    results["pg put  LuaSQL (hex bytea literals)"] / results["pg put  softcxi.pq (binary params)"],
    results["pg get  LuaSQL (hex text decoded)"] / results["pg get  softcxi.pq"]))

-- ---- SQLite -----------------------------------------------------------------------
os.remove(sqlite_file)
local sdb = assert(sqlite3.open(sqlite_file))
assert(sdb:exec("PRAGMA journal_mode=WAL"))
assert(sdb:script("PRAGMA synchronous=FULL; CREATE TABLE softcxi_drivers (id TEXT PRIMARY KEY, blob BLOB NOT NULL)"))
timed("sqlite put softcxi.sqlite3 (bound)", function()
    for first = 1, N, 1000 do
        assert(sdb:exec("BEGIN IMMEDIATE"))
        for s = first, math.min(N, first + 999), 500 do
            local e = math.min(N, s + 499, first + 999)
            local ph, params = {}, {}
            for i = s, e do
                local k = #params
                params[k + 1], params[k + 2] = id(i), blobs[i]
                ph[#ph + 1] = ("(?%d, ?%d)"):format(k + 1, k + 2)
            end
            assert(sdb:exec("INSERT INTO softcxi_drivers VALUES " .. table.concat(ph, ","), params,
                ("tb"):rep(e - s + 1)))
        end
        assert(sdb:exec("COMMIT"))
    end
end)
local function sq_get(first, last)
    local ph, params = {}, {}
    for i = first, last do params[#params + 1] = id(i); ph[#ph + 1] = "?" .. #params end
    local rows = assert(sdb:exec("SELECT id, blob FROM softcxi_drivers WHERE id IN (" .. table.concat(ph, ",")
        .. ")", params))
    local out = {}
    for _, r in ipairs(rows) do out[r[1]] = r[2] end
    return out
end
timed("sqlite get softcxi.sqlite3", function() bad = check_all(sq_get) end)
print(("info softcxi.sqlite3: %d of %d blobs differ after the round trip"):format(bad, N))
sdb:close()

os.remove(sqlite_file)
local senv = assert(luasql_sq.sqlite3())
local sc = assert(senv:connect(sqlite_file))
assert(sc:execute("PRAGMA journal_mode=WAL"))
assert(sc:execute("PRAGMA synchronous=FULL"))
assert(sc:execute("CREATE TABLE softcxi_drivers (id TEXT PRIMARY KEY, blob BLOB NOT NULL)"))
timed("sqlite put LuaSQL (X'hex' literals)", function()
    for first = 1, N, 1000 do
        assert(sc:execute("BEGIN IMMEDIATE"))
        for s = first, math.min(N, first + 999), 500 do
            local e = math.min(N, s + 499, first + 999)
            local v = {}
            for i = s, e do v[#v + 1] = ("('%s', X'%s')"):format(sc:escape(id(i)), hex(blobs[i])) end
            assert(sc:execute("INSERT INTO softcxi_drivers VALUES " .. table.concat(v, ",")))
        end
        assert(sc:execute("COMMIT"))
    end
end)
local function lsq_get(first, last)
    local v = {}
    for i = first, last do v[#v + 1] = "'" .. id(i) .. "'" end
    local cur = assert(sc:execute("SELECT id, blob FROM softcxi_drivers WHERE id IN (" .. table.concat(v, ",")
        .. ")"))
    local out = {}
    local row = cur:fetch({}, "n")
    while row do
        out[row[1]] = row[2]
        row = cur:fetch(row, "n")
    end
    cur:close()
    return out
end
timed("sqlite get LuaSQL", function() bad = check_all(lsq_get) end)
print(("info LuaSQL sqlite3 hex: %d of %d blobs differ after the round trip"):format(bad, N))
assert(sc:execute("DELETE FROM softcxi_drivers"))
stored, refused = 0, 0
for i = 1, math.min(N, 1000) do
    local r = sc:execute(("INSERT INTO softcxi_drivers VALUES ('%s', '%s')"):format(id(i), sc:escape(blobs[i])))
    if r then stored = stored + 1 else refused = refused + 1 end
end
bad = 0
for first = 1, math.min(N, 1000), 500 do
    local got = lsq_get(first, math.min(N, 1000, first + 499))
    for i = first, math.min(N, 1000, first + 499) do if got[id(i)] ~= blobs[i] then bad = bad + 1 end end
end
print(("info LuaSQL sqlite3 escape(): of %d blobs, %d refused, %d stored, %d of all differ after the"
    .. " round trip"):format(math.min(N, 1000), refused, stored, bad))
sc:close()
senv:close()
print(("ratio sqlite put LuaSQL/softcxi.sqlite3 %.2f, get %.2f"):format(
    results["sqlite put LuaSQL (X'hex' literals)"] / results["sqlite put softcxi.sqlite3 (bound)"],
    results["sqlite get LuaSQL"] / results["sqlite get softcxi.sqlite3"]))

hsm:close()
os.remove(sqlite_file)
os.execute("rm -rf '" .. root .. "'")
