-- The SQL stores beyond the contract (spec/store_spec.lua runs that against sqlite: and
-- SOFTCXI_TEST_PG_URL): URLs, the schema and its migration, a unique violation, two
-- writer processes at once, a row that is not a blob, and for PostgreSQL a server
-- restarted in the middle of a put_many.
--
-- SQLite tests always run (a file in a temp dir).  PostgreSQL tests use the cluster
-- ./run test starts (SOFTCXI_TEST_PG_URL, a table per run); the restart test starts a
-- server of its own from SOFTCXI_TEST_PG_TEMPLATE (a fresh cluster ./run keeps) with
-- SOFTCXI_TEST_PG_BIN, as SOFTCXI_TEST_PG_AS when running as root, and stops it by PID.

local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local softcxi = H.softcxi
local store = require "softcxi.store"

local PG_URL = os.getenv("SOFTCXI_TEST_PG_URL")
if PG_URL == "" then PG_URL = nil end
local PG_BIN, PG_TEMPLATE = os.getenv("SOFTCXI_TEST_PG_BIN"), os.getenv("SOFTCXI_TEST_PG_TEMPLATE")
local PG_AS = os.getenv("SOFTCXI_TEST_PG_AS")

local function run_tag()
    local f = io.open("/dev/urandom", "rb")
    local r = f and f:read(4) or tostring(os.time())
    if f then f:close() end
    return H.hex(r)
end
local RUN = run_tag()

local root = H.tmpdir()
local dev, blobs

-- 300 P-256 blobs named n<RUN>-<i>, group g<RUN>; made once.
local function make_blobs()
    if blobs then return end
    dev = H.new_device()
    blobs = assert(dev.hsm:bulk_generate(softcxi.FLAG_EXTERNAL,
        { algo = "ec", curve = "P-256", group = "g" .. RUN }, 300, { name_format = "n" .. RUN .. "-%d" }))
end

local function id_of(i) return "g" .. RUN .. "/n" .. RUN .. "-" .. i end

local function items(first, last)
    local out = {}
    for i = first, last do out[#out + 1] = { blob = blobs[i] } end
    return out
end

local function scan_all(s)
    local out, cursor = {}, nil
    repeat
        local ids, nxt = assert(s:scan(cursor, 97))
        for _, id in ipairs(ids) do out[#out + 1] = id end
        cursor = nxt
    until not cursor
    return out
end

-- The table name a PostgreSQL URL gets for one test: its own table, dropped afterwards.
local function pg_url(name)
    return (PG_URL:gsub("([?&])table=[^&]*", "%1table=" .. name .. "_" .. RUN))
end

local function env_prefix()
    return "LUA_PATH=" .. H.q(package.path) .. " LUA_CPATH=" .. H.q(package.cpath) .. " "
end

teardown(function()
    H.destroy(dev)
    H.rm_rf(root)
end)

-- Drivers: each test runs against a fresh store of each kind available.
local kinds = { { "sqlite", function(name) return "sqlite:" .. root .. "/" .. name .. ".db" end } }
if PG_URL then kinds[#kinds + 1] = { "postgres", pg_url } end

describe("sql stores", function()
    lazy_setup(make_blobs)

    describe("URLs", function()
        it("refuses bad URLs and parameters with EINVAL, unknown options raise", function()
            H.expect_err("EINVAL", store.open("sqlite:"))
            H.expect_err("EINVAL", store.open("sqlite://host/keys.db"))
            H.expect_err("EINVAL", store.open("sqlite:" .. root .. "/u.db?bogus=1"))
            H.expect_err("EINVAL", store.open("sqlite:" .. root .. "/u.db?table=Keys;drop"))
            H.expect_err("EINVAL", store.open("sqlite:" .. root .. "/u.db?table=softcxi_schema"))
            H.expect_err("EINVAL", store.open("sqlite:" .. root .. "/u.db?chunk=0"))
            H.expect_err("EINVAL", store.open("sqlite:" .. root .. "/u.db?synchronous=off"))
            H.expect_err("EINVAL", store.open("postgres:nohost"))
            H.expect_err("EINVAL", store.open("postgres://u@127.0.0.1/db?busy_timeout=5"))
            assert.has_error(function() store.open("sqlite:" .. root .. "/u.db", { bogus = 1 }) end)
        end)

        it("a file that is not an SQLite database: a clear error naming it", function()
            H.writefile(root .. "/notadb.db", ("not a database\n"):rep(100))
            local msg = H.expect_err("EIO", store.open("sqlite:" .. root .. "/notadb.db"))
            assert.truthy(msg:find(root .. "/notadb.db", 1, true), msg)
            assert.truthy(msg:find("not an SQLite database", 1, true), msg)
            assert.are.equal(("not a database\n"):rep(100), H.readfile(root .. "/notadb.db"))
        end)

        it("a server that does not answer: ECONN naming host and port, never the password", function()
            -- port 1 on loopback: nothing listens there
            local msg = H.expect_err("ECONN",
                store.open("postgres://u:s3cret@127.0.0.1:1/db?connect_timeout=2"))
            assert.truthy(msg:find("127.0.0.1", 1, true), msg)
            assert.is_nil(msg:find("s3cret", 1, true), msg)
        end)
    end)

    for _, kind in ipairs(kinds) do
        local name, url_for = kind[1], kind[2]

        describe(name, function()
            local opened = {}
            local function open(tname, opts)
                local url = url_for(tname)
                local s, msg, code = store.open(url, opts)
                assert(s, tostring(msg) .. " " .. tostring(code))
                opened[#opened + 1] = s
                return s, url
            end

            -- the driver underneath, for what a store never does (raw rows, the catalog)
            local function raw(s, sql, params, types)
                return assert(s._q(s, sql, params, types))
            end

            after_each(function()
                for _, s in ipairs(opened) do
                    if not s.closed then
                        if name == "postgres" then
                            pcall(s._q, s, "DROP TABLE IF EXISTS " .. s.table)
                            pcall(s._q, s, "DELETE FROM softcxi_schema WHERE tbl = $1", { s.table })
                        end
                        s:close()
                    end
                end
                opened = {}
            end)

            it("creates the schema once, records its version, and opens it again as it is", function()
                local s, url = open("schema")
                local rows = raw(s, "SELECT version FROM softcxi_schema WHERE tbl = "
                                 .. (name == "postgres" and "$1" or "?1"), { s.table })
                assert.are.same({ { 1 } }, rows)
                local idx
                if name == "postgres" then
                    idx = raw(s, "SELECT indexname FROM pg_indexes WHERE tablename = $1 ORDER BY 1",
                              { s.table })
                else
                    idx = raw(s, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1"
                              .. " AND name NOT LIKE 'sqlite_autoindex%' ORDER BY 1", { s.table })
                end
                local names = {}
                for _, r in ipairs(idx) do names[#names + 1] = r[1]:sub(#s.table + 2) end
                for _, want in ipairs { "expiry", "grp", "kcv", "name" } do
                    assert.truthy(table.concat(names, " "):find(want, 1, true), table.concat(names, " "))
                end
                if name == "sqlite" then
                    assert.are.same({ { "wal" } }, raw(s, "PRAGMA journal_mode"))
                    assert.are.same({ { 2 } }, raw(s, "PRAGMA synchronous"))      -- FULL
                end
                assert.is_true(s:put(nil, blobs[1]))
                -- a second open (and a migrate run again) changes nothing
                local s2 = assert(store.open(url))
                assert.are.equal(1, s2:migrate())
                assert.are.equal(blobs[1], s2:get(id_of(1)))
                s2:close()
                -- a table from a newer softcxi is refused, not touched
                raw(s, "UPDATE softcxi_schema SET version = 99 WHERE tbl = "
                    .. (name == "postgres" and "$1" or "?1"), { s.table })
                local msg = H.expect_err("EINVAL", store.open(url))
                assert.truthy(msg:find("schema version 99", 1, true), msg)
                raw(s, "UPDATE softcxi_schema SET version = 1 WHERE tbl = "
                    .. (name == "postgres" and "$1" or "?1"), { s.table })
                assert.are.equal(blobs[1], s:get(id_of(1)))
            end)

            it("bad cursors and bad calls: EINVAL or a raise, naming the call", function()
                local s, url = open("badcalls")
                assert.are.equal(5, s:put_many(items(1, 5)))
                local ids, cursor = assert(s:scan(nil, 2))
                assert.are.equal(2, #ids)
                assert.is_string(cursor)
                local msg = H.expect_err("EINVAL", s:scan("not a cursor", 2))
                assert.truthy(msg:find("scan: bad cursor 'not a cursor'", 1, true), msg)
                H.expect_err("EINVAL", s:find({ group = "g" .. RUN }, "sql:", 2))
                assert.has_error(function() s:scan(42) end)
                assert.has_error(function() s:scan(nil, 0) end)
                assert.has_error(function() s:find({ group = "x" }, nil, 1.5) end)
                assert.has_error(function() s:put_many({ "not a table" }) end)
                assert.has_error(function() s:put_many({ { blob = blobs[1], if_match = 3 } }) end)
                assert.has_error(function() s:put_many(items(1, 2), { chunk = 0 }) end)
                assert.has_error(function() s:get_many({ "" }) end)
                -- a specifier that no blob can have matches nothing, and is not an error
                assert.are.same({}, (s:find({ specifier = "x" })))
                assert.are.same({}, (s:find({ specifier = 1.5 })))
                -- the rest of the pages after a cursor: every id once, in id order
                local rest = assert(s:scan(cursor, 100))
                assert.are.equal(3, #rest)
                assert.is_true(rest[1] > ids[2])
                local s2 = assert(store.open(url))
                s2:close()
                assert.has_error(function() s2:get("x") end, s2.name .. ".get: the store is closed")
                assert.is_true(s2:close())
            end)

            it("keeps the clear attributes in indexed columns, and finds by kcv", function()
                local s = open("cols")
                assert.are.equal(3, s:put_many(items(1, 3)))
                local info = softcxi.key_info(blobs[2])
                local rows = raw(s, "SELECT grp, name, algo, gen_date, kcv FROM " .. s.table .. " WHERE id = "
                                 .. (name == "postgres" and "$1" or "?1"), { id_of(2) })
                assert.are.same({ { info.group, info.name, "ec", info.gen_date, info.kcv } }, rows)
                local ids = assert(s:find({ kcv = info.kcv }, nil, 10))
                assert.are.same({ id_of(1), id_of(2), id_of(3) }, ids)
                assert.are.same({}, (s:find({ kcv = "0000000000000000" }, nil, 10)))
            end)

            it("a unique violation on put of an existing id is EEXIST naming the id; nothing changes",
               function()
                local s = open("uniq")
                assert.is_true(s:put("dup", blobs[1]))
                local msg = H.expect_err("EEXIST", s:put("dup", blobs[2]))
                assert.truthy(msg:find("'dup'", 1, true), msg)
                assert.are.equal(blobs[1], s:get("dup"))
                -- the same id twice in one put_many: the first is stored, the second refused
                local r = H.pack(s:put_many({ { id = "twice", blob = blobs[3] },
                                              { id = "twice", blob = blobs[4] },
                                              { id = "once", blob = blobs[5] } }))
                assert.is_nil(r[1])
                assert.are.equal("EEXIST", r[3], r[2])
                assert.are.equal(2, r[4])
                assert.are.equal(blobs[3], s:get("twice"))
                -- and with overwrite the last one wins
                assert.are.equal(2, s:put_many({ { id = "ow", blob = blobs[6] },
                                                 { id = "ow", blob = blobs[7] } }, { overwrite = true }))
                assert.are.equal(blobs[7], s:get("ow"))
                assert.are.equal(4, s:count())
            end)

            it("a row that is not a blob: get and get_many name the id (EFORMAT), nothing else is lost",
               function()
                local s = open("corrupt")
                assert.are.equal(10, s:put_many(items(1, 10)))
                local ph = name == "postgres" and "$" or "?"
                raw(s, ("UPDATE %s SET blob = %s1 WHERE id = %s2"):format(s.table, ph, ph),
                    { blobs[5]:sub(1, 60), id_of(5) }, "bt")
                raw(s, ("INSERT INTO %s (id, blob) VALUES (%s1, %s2)"):format(s.table, ph, ph),
                    { "foreign", "\0\1 not a blob" }, "tb")
                local msg = H.expect_err("EFORMAT", s:get(id_of(5)))
                assert.truthy(msg:find("'" .. id_of(5) .. "'", 1, true), msg)
                assert.truthy(msg:find("table " .. s.table, 1, true), msg)
                msg = H.expect_err("EFORMAT", s:get("foreign"))
                assert.truthy(msg:find("'foreign'", 1, true), msg)
                local ids = { "foreign" }
                for i = 1, 10 do ids[#ids + 1] = id_of(i) end
                local got, errs = s:get_many(ids)
                assert.are.equal("EFORMAT", errs[id_of(5)][2])
                assert.are.equal("EFORMAT", errs.foreign[2])
                assert.truthy(errs.foreign[1]:find("'foreign'", 1, true))
                for i = 1, 10 do
                    if i ~= 5 then assert.are.equal(blobs[i], got[id_of(i)]) end
                end
                assert.is_nil(got[id_of(5)])
                assert.are.equal(11, s:count())
                assert.are.equal(11, #scan_all(s))                 -- rows, listed; get decides
                -- a torn row is replaced by overwrite, never matched by if_match
                H.expect_err("ECONFLICT", s:put(id_of(5), blobs[5], { if_match = blobs[5] }))
                assert.is_true(s:put(id_of(5), blobs[5], { overwrite = true }))
                assert.are.equal(blobs[5], s:get(id_of(5)))
            end)

            it("two writer processes at once: every blob stored once, shared ids split between them",
               function()
                -- neither table nor schema exists yet: both writers' opens migrate at once
                local url = url_for("conc")
                local work = root .. "/conc-" .. name
                H.mkdir_p(work)
                for i = 1, 250 do H.writefile(work .. "/" .. i .. ".blob", blobs[i]) end
                local script = work .. "/writer.lua"
                H.writefile(script, [[
                    local store = require "softcxi.store"
                    local url, w, work = arg[1], tonumber(arg[2]), arg[3]
                    local s = assert(store.open(url))
                    local function blob(i)
                        local f = assert(io.open(work .. "/" .. i .. ".blob", "rb"))
                        local b = f:read("*a")
                        f:close()
                        return b
                    end
                    -- 100 ids of its own, single puts and batches of 5 interleaved
                    local batch = {}
                    for k = 1, 100 do
                        local i = (w - 1) * 100 + k
                        if k % 2 == 0 then
                            assert(s:put(nil, blob(i)))
                        else
                            batch[#batch + 1] = { blob = blob(i) }
                            if #batch == 5 then assert(s:put_many(batch) == 5); batch = {} end
                        end
                    end
                    -- and the same 50 ids as the other writer, in batches of 10
                    local stored, skipped = 0, 0
                    for first = 201, 250, 10 do
                        local items = {}
                        for i = first, first + 9 do items[#items + 1] = { blob = blob(i) } end
                        local n, sk = assert(s:put_many(items, { skip_existing = true }))
                        stored, skipped = stored + n, skipped + sk
                    end
                    s:close()
                    io.write("done ", w, " ", stored, " ", skipped, "\n")
                ]])
                local procs = {}
                for w = 1, 2 do
                    procs[w] = assert(io.popen(env_prefix() .. H.q(H.interpreter()) .. " " .. H.q(script)
                        .. " "
                        .. H.q(url) .. " " .. w .. " " .. H.q(work) .. " 2>&1"))
                end
                local shared_stored, shared_skipped = 0, 0
                for w = 1, 2 do
                    local out = procs[w]:read("*a")
                    procs[w]:close()
                    local n, sk = out:match("^done " .. w .. " (%d+) (%d+)\n$")
                    assert(n, "writer " .. w .. ": " .. out)
                    shared_stored, shared_skipped = shared_stored + n, shared_skipped + sk
                end
                assert.are.equal(50, shared_stored)
                assert.are.equal(50, shared_skipped)
                local s = open("conc")
                assert.are.equal(250, s:count())
                local ids = scan_all(s)
                assert.are.equal(250, #ids)
                local got = assert(s:get_many(ids))
                for i = 1, 250 do assert.are.equal(blobs[i], got[id_of(i)]) end
                assert.are.equal(250, #assert(s:find({ group = "g" .. RUN }, nil, 1000)))
            end)
        end)
    end
end)

-- ---- the bindings underneath ---------------------------------------------------------------

describe("softcxi.sqlite3", function()
    local sqlite3 = require "softcxi.sqlite3"

    it("binds and returns NULL, integers, floats, text and blobs with zero bytes as they are", function()
        local db = assert(sqlite3.open(root .. "/bind.db"))
        assert(db:script("CREATE TABLE t (a, b, c, d, e)"))
        local bin = "\0\1\255 zero \0 inside"
        local _, n = assert(db:exec("INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)",
            { n = 5, nil, 42, 2.5, "text\0too", bin }, "tttt" .. "b"))
        assert.are.equal(1, n)
        local rows = assert(db:exec("SELECT a, b, c, d, e, typeof(d), typeof(e) FROM t"))
        assert.are.same({ { nil, 42, 2.5, "text\0too", bin, "text", "blob" } }, rows)
        assert.is_true(db:exec("SELECT 1")[1][1] == 1)
        db:close()
    end)

    it("raises on misuse, returns nil, msg, code on runtime failure", function()
        local db = assert(sqlite3.open(root .. "/misuse.db"))
        assert.has_error(function() db:exec("SELECT ?1", { {} }) end)
        assert.has_error(function() db:exec("SELECT ?1, ?2", { 1 }) end)
        local r = H.pack(db:exec("SELEKT 1"))
        assert.is_nil(r[1])
        assert.are.equal("ESQLITE", r[3])
        assert.truthy(r[2]:find("syntax error", 1, true), r[2])
        assert(db:script("CREATE TABLE u (id TEXT PRIMARY KEY)"))
        assert(db:exec("INSERT INTO u VALUES (?1)", { "x" }))
        r = H.pack(db:exec("INSERT INTO u VALUES (?1)", { "x" }))
        assert.are.equal("ECONSTRAINT", r[3], r[2])
        db:close()
        db:close() -- twice is fine
        assert.has_error(function() db:exec("SELECT 1") end, "softcxi.sqlite3: the database is closed")
        H.expect_err("EOPEN", sqlite3.open(root .. "/no/such/dir/x.db"))
    end)
end)

describe("softcxi.pq", function()
    if not PG_URL then
        pending("SOFTCXI_TEST_PG_URL is not set (./run test starts a PostgreSQL)")
        return
    end
    local pq = require "softcxi.pq"
    local conninfo = PG_URL:gsub("^postgres:", "postgresql:"):gsub("%?.*$", "")

    it("sends strings as binary (bytea with zero bytes intact) and reads every column type it knows",
       function()
        local c = assert(pq.connect(conninfo))
        local bin = "\0\1\255 zero \0 inside"
        local rows = assert(c:exec("SELECT $1::bytea, $2::text, $3::int8, $4::int4, $5::int2,"
            .. " $6::float8, $7::float4, $8::bool, $9::text, -9007199254740993::int8",
            { n = 9, bin, "tëxt", 42, -7, 3, 2.5, 0.5, true, nil }))
        assert.are.same({ { bin, "tëxt", 42, -7, 3, 2.5, 0.5, true, nil, -9007199254740993 } }, rows)
        local _, n = assert(c:exec("SELECT * FROM generate_series(1, 3)"))
        assert.are.equal(3, n)
        -- arrays: one parameter per column of a batch, NULL elements included
        rows = assert(c:exec("SELECT * FROM unnest($1::bytea[], $2::int8[], $3::text[])",
            { { type = "bytea", n = 3, bin, "", nil }, { type = "int8", n = 3, 1, nil, -2 },
              { type = "text", n = 3, "a", "b", "c" } }))
        assert.are.same({ { bin, 1, "a" }, { "", nil, "b" }, { nil, -2, "c" } }, rows)
        assert.are.same({}, assert(c:exec("SELECT * FROM unnest($1::text[])", { { type = "text" } })))
        assert.has_error(function() c:exec("SELECT $1::text[]", { { type = "uuid", "x" } }) end)
        assert.has_error(function() c:exec("SELECT $1::int8[]", { { type = "int8", "1" } }) end)
        assert.has_error(function() c:exec("SELECT $1::text[]", { { type = "text", 1 } }) end)
        c:close()
    end)

    it("raises on misuse, returns SQLSTATE codes and ECONN", function()
        local c = assert(pq.connect(conninfo))
        assert.has_error(function() c:exec("SELECT $1", { {} }) end)
        assert.has_error(function() c:exec("SELECT now()") end) -- a type it does not read
        local r = H.pack(c:exec("SELEKT 1"))
        assert.is_nil(r[1])
        assert.are.equal("42601", r[3])
        assert.truthy(r[2]:find("syntax error", 1, true), r[2])
        assert.is_true(c:alive())
        -- the server ends the session: the connection is lost, not a SQL error
        r = H.pack(c:exec("SELECT pg_terminate_backend(pg_backend_pid())::text"))
        assert.are.equal("ECONN", r[3], r[2])
        assert.is_false(c:alive())
        c:close()
        c:close()
        assert.has_error(function() c:exec("SELECT 1") end, "softcxi.pq: the connection is closed")
        H.expect_err("ECONN", pq.connect("postgresql://nobody@127.0.0.1:1/x?connect_timeout=2"))
    end)

    it("an id PostgreSQL cannot hold (not UTF-8) is EINVAL naming the call, nothing stored", function()
        make_blobs()
        local s = assert(store.open(pg_url("utf")))
        finally(function()
            pcall(s._q, s, "DROP TABLE IF EXISTS " .. s.table)
            pcall(s._q, s, "DELETE FROM softcxi_schema WHERE tbl = $1", { s.table })
            s:close()
        end)
        local msg = H.expect_err("EINVAL", s:put("bad\255id", blobs[1]))
        assert.truthy(msg:find("^store%.postgres%.put: 'bad"), msg)
        assert.are.equal(0, s:count())
    end)
end)

describe("softcxi store migrate", function()
    it("copies a file store into SQLite and on into PostgreSQL, resumably", function()
        make_blobs()
        local repo = (debug.getinfo(1, "S").source:match("^@(.-)spec/[^/]*$") or "./")
        local bin = H.q(H.interpreter()) .. " " .. H.q(repo .. "bin/softcxi") .. " --json "
        local src = assert(store.open("file:" .. root .. "/mig-src"))
        assert.are.equal(40, src:put_many(items(1, 40)))
        src:close()
        local chain = { "file:" .. root .. "/mig-src", "sqlite:" .. root .. "/mig.db" }
        if PG_URL then chain[3] = pg_url("mig") end
        for i = 2, #chain do
            for _, want in ipairs { '"copied":40', '"skipped":40' } do
                local rc, out = H.run(env_prefix() .. bin .. "store migrate --from " .. H.q(chain[i - 1])
                    .. " --to " .. H.q(chain[i]))
                assert(rc == 0, out)
                assert.truthy(out:find(want, 1, true), out)
            end
        end
        local dst = assert(store.open(chain[#chain]))
        local got = assert(dst:get_many((function()
            local ids = {}
            for i = 1, 40 do ids[i] = id_of(i) end
            return ids
        end)()))
        for i = 1, 40 do assert.are.equal(blobs[i], got[id_of(i)]) end
        if PG_URL then
            dst._q(dst, "DROP TABLE " .. dst.table)
            dst._q(dst, "DELETE FROM softcxi_schema WHERE tbl = $1", { dst.table })
        end
        dst:close()
    end)
end)

-- ---- PostgreSQL restarted in the middle of a put_many -----------------------------------

local function sleep(seconds) os.execute("sleep " .. seconds) end

local function alive(pid)
    local f = io.open("/proc/" .. pid .. "/stat", "rb")
    if not f then return false end
    local stat = f:read("*a") or ""
    f:close()
    return stat:match("^%d+ %b() (%a)") ~= "Z"
end

local function as_user(cmd)
    if PG_AS and PG_AS ~= "" then
        return "setpriv --reuid=" .. PG_AS .. " --regid=" .. PG_AS:gsub("^nobody$", "nogroup")
            .. " --clear-groups -- " .. cmd
    end
    return cmd
end

local function pg_ready(port)
    return H.run(H.q(PG_BIN .. "/pg_isready") .. " -q -h 127.0.0.1 -p " .. port) == 0
end

-- signal: INT (fast shutdown) or QUIT (immediate: like a crash, recovery from WAL on start)
local function stop_pg(srv, signal)
    if not srv.pid then return end
    for _, sig in ipairs { signal or "INT", "KILL" } do
        os.execute("kill -" .. sig .. " " .. srv.pid .. " 2>/dev/null")
        for _ = 1, 200 do
            if not alive(srv.pid) then srv.pid = nil return end
            sleep(0.05)
        end
    end
end

local function start_pg(srv)
    for _ = 1, 5 do
        local port = srv.port or (20000 + math.random(0, 19999))
        local _, out = H.run(as_user(H.q(PG_BIN .. "/postgres") .. " -D " .. H.q(srv.dir .. "/data")
            .. " -p " .. port .. " -h 127.0.0.1 -k " .. H.q(srv.dir) .. " -c fsync=off"
            .. " </dev/null >>" .. H.q(srv.dir .. "/postgres.log") .. " 2>&1 & echo \"pid=$!\""))
        srv.pid = tonumber(out:match("pid=(%d+)"))
        for _ = 1, 300 do
            if pg_ready(port) then srv.port = port return srv end
            if not alive(srv.pid) then break end
            sleep(0.05)
        end
        stop_pg(srv, "KILL")
        if srv.port then break end
    end
    error("could not start postgres in " .. srv.dir .. ": "
        .. tostring(H.readfile(srv.dir .. "/postgres.log")))
end

describe("postgres store, server restarted", function()
    if not (PG_URL and PG_BIN and PG_TEMPLATE) then
        pending("SOFTCXI_TEST_PG_URL/_BIN/_TEMPLATE are not set (./run test sets them)")
        return
    end
    local srv

    lazy_setup(function()
        make_blobs()
        math.randomseed(os.time() + tonumber(RUN, 16) % 100000)
        srv = { dir = root .. "/pg-restart" }
        H.mkdir_p(srv.dir)
        assert(H.run("cp -a " .. H.q(PG_TEMPLATE) .. " " .. H.q(srv.dir .. "/data")) == 0)
        if PG_AS and PG_AS ~= "" then
            assert(H.run("chown -R " .. PG_AS .. " " .. H.q(srv.dir)) == 0)
        end
        start_pg(srv)
    end)

    lazy_teardown(function()
        if srv then stop_pg(srv, "INT") end
    end)

    it("mid-put_many: the error says how many keys were committed; a re-run completes, none twice",
       function()
        local url = ("postgres://softcxi@127.0.0.1:%d/postgres?table=restart"):format(srv.port)
        local s = assert(store.open(url))
        local all = items(1, 300)
        local progress = {}
        local r = H.pack(s:put_many(all, { chunk = 50, on_chunk = function(done)
            progress[#progress + 1] = done
            if done == 150 then
                stop_pg(srv, "QUIT")   -- immediate: no shutdown checkpoint, recovery on start
                start_pg(srv)          -- same port, same data directory
            end
        end }))
        assert.are.same({ 50, 100, 150 }, progress)
        assert.is_nil(r[1])
        assert.are.equal("ECONN", r[3], r[2])
        assert.are.equal(150, r[4])
        assert.truthy(r[2]:find("^store%.postgres%.put_many: 150 of 300 keys were committed"), r[2])
        -- the same store object reconnects; what was committed survived the crash
        assert.are.equal(150, s:count())
        local n, skipped = s:put_many(all, { chunk = 50, skip_existing = true })
        assert.are.equal(150, n)
        assert.are.equal(150, skipped)
        assert.are.equal(300, s:count())
        local ids = scan_all(s)
        assert.are.equal(300, #ids)
        local got = assert(s:get_many(ids))
        for i = 1, 300 do assert.are.equal(blobs[i], got[id_of(i)]) end
        s:close()
    end)
end)
