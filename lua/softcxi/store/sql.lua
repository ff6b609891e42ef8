-- softcxi.store.sql: key blobs in table rows, PostgreSQL (softcxi.pq) or SQLite
-- (softcxi.sqlite3), behind the one store interface.  docs/stores.md, "SQL stores".
--
--   local store = require "softcxi.store"
--   local s = assert(store.open("postgres://app@127.0.0.1:5432/keys?table=keys"))
--   local s = assert(store.open("sqlite:./keys.db"))
--
-- One table per store (name from ?table=, default "softcxi_keys"):
--   id text PRIMARY KEY (byte order: COLLATE "C" / SQLite BINARY), blob bytea/BLOB,
--   and the blob's clear attributes as columns: grp, name, specifier, algo, gen_date,
--   expiry, kcv (of the MBK that sealed it).  Indexes: (grp, id), (name, id), (kcv, id)
--   and expiry (partial), so find by group or name, "the blobs sealed under MBK x" and
--   "the keys that expire before t" are index range scans in id order.
-- A table softcxi_schema (tbl, version) records each store table's schema version;
-- open migrates a table to the current version once, under a lock (an advisory lock /
-- BEGIN IMMEDIATE), every step idempotent.
--
-- Writes: put is one statement (INSERT, INSERT ... ON CONFLICT DO UPDATE for overwrite,
-- UPDATE ... WHERE blob = old for if_match), atomic in the database.  put_many writes
-- each chunk in one transaction of multi-row INSERT ... ON CONFLICT ... RETURNING id
-- (and one UPDATE ... FROM for the items with if_match), so a chunk is committed whole
-- or not at all, and the count of committed keys is exact.  PostgreSQL gets the rows as
-- one array parameter per column (unnest); SQLite as a VALUES list.
-- scan and find page by keyset (id > last id ORDER BY id LIMIT n), never OFFSET.

local softcxi = require "softcxi"
local store = require "softcxi.store"

local type, tostring, tonumber, pairs, ipairs, setmetatable, error, require, pcall =
    type, tostring, tonumber, pairs, ipairs, setmetatable, error, require, pcall
local fmt, concat, sort = string.format, table.concat, table.sort
local floor, min = math.floor, math.min
local key_info, check = softcxi.key_info, store.check

local _M = { _VERSION = softcxi._VERSION }
local mt = { __index = _M }

_M.SCHEMA_VERSION = 1

local ROWS_PER_STMT = 500  -- SQLite: rows in one multi-row statement (x 10 parameters)
local IN_CHUNK = 500       -- SQLite: ids in one IN (...) list
local TX_RETRIES = 5       -- a chunk transaction that hit a deadlock / busy database
local CURSOR_TAG = "sql:"  -- find/scan cursors: "sql:" .. last id returned

-- The columns of a row, in parameter order, and how each is sent.
local COLS = { "id", "blob", "grp", "name", "specifier", "algo", "gen_date", "expiry", "kcv" }
local NCOLS = #COLS
local PG_TYPES = { "text", "bytea", "text", "text", "bigint", "text", "bigint", "bigint", "text" }
local ROW_TYPES = "tbttttttt"  -- SQLite: the blob as BLOB, the rest by Lua type (strings TEXT)
local ARRAY_TYPES_OF = { "text", "bytea", "text", "text", "int8", "text", "int8", "int8", "text" }

-- find fields -> columns.  kcv is an extra (not in every store): the blobs sealed under
-- one MBK, which is what a rewrap after a rotation is looking for.
local FIND_COLS = { group = "grp", name = "name", specifier = "specifier", algo = "algo",
                    kcv = "kcv" }
local FIND_ORDER = { "name", "group", "kcv", "specifier", "algo" }
local INDEXED = { name = true, group = true, kcv = true }   -- lead an (x, id) index

-- ---- schema --------------------------------------------------------------------

-- Migration steps: MIGRATIONS[v](dialect, table) is the SQL that brings a table from
-- version v - 1 to v.  Every statement is idempotent (IF NOT EXISTS), so a step
-- interrupted halfway is simply run again.
local MIGRATIONS = {
    [1] = function(d, t)
        return fmt([[
CREATE TABLE IF NOT EXISTS %s (
    id %s PRIMARY KEY,
    blob %s NOT NULL,
    grp text,
    name text,
    specifier bigint,
    algo text,
    gen_date bigint,
    expiry bigint,
    kcv text
);
CREATE INDEX IF NOT EXISTS %s_grp ON %s (grp, id);
CREATE INDEX IF NOT EXISTS %s_name ON %s (name, id);
CREATE INDEX IF NOT EXISTS %s_kcv ON %s (kcv, id);
CREATE INDEX IF NOT EXISTS %s_expiry ON %s (expiry) WHERE expiry IS NOT NULL;
]], t, d.id_type, d.blob_type, t, t, t, t, t, t, t, t)
    end,
}

-- ---- dialects ------------------------------------------------------------------

local pg = {
    scheme = "postgres", name = "store.postgres",
    id_type = 'text COLLATE "C"', blob_type = "bytea",
    begin = "BEGIN",
    table_exists = "to_regclass($1) IS NOT NULL",
    -- batches go as one array parameter per column (unnest / = ANY): PostgreSQL parses
    -- and plans a VALUES list of thousands of parameters at ~25 us a row, ten times the
    -- insert itself; an array costs it next to nothing
    arrays = true, rows_per_stmt = 1000, in_chunk = 5000,
}
function pg.ph(i, col) -- placeholder i, typed where the server cannot infer it
    if col then return "$" .. i .. "::" .. PG_TYPES[col] end
    return "$" .. i
end
function pg.old_ph(i) return "$" .. i .. "::bytea" end

-- The store code for a driver failure.  retry: a deadlock or serialization failure,
-- which the transaction may simply run again.
function pg.code(code)
    if code == "ECONN" then return "ECONN" end
    if code == "23505" then return "EEXIST" end
    if code == "40001" or code == "40P01" then return "EIO", true end
    local class = code:sub(1, 2)
    if class == "08" or code:sub(1, 3) == "57P" then return "ECONN" end
    if class == "22" then return "EINVAL" end          -- e.g. an id that is not UTF-8
    if code == "42501" or class == "28" then return "EPERM" end
    return "EIO"
end

local sq = {
    scheme = "sqlite", name = "store.sqlite",
    id_type = "TEXT", blob_type = "BLOB",
    begin = "BEGIN IMMEDIATE",   -- take the write lock up front: no upgrade deadlock
    table_exists = "EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
    -- the store writes every id as TEXT; a row edited to a BLOB id sorts after every text
    -- cursor (SQLite orders by type first), so paging over it would never end: left out
    id_ok = "typeof(id) = 'text'",
    -- SQLite has no arrays; its VALUES lists are cheap (at most 32766 parameters)
    arrays = false, rows_per_stmt = ROWS_PER_STMT, in_chunk = IN_CHUNK,
}
function sq.ph(i) return "?" .. i end
function sq.old_ph(i) return "?" .. i end
function sq.code(code, msg)
    if code == "ECONSTRAINT" and msg:find("UNIQUE", 1, true) then return "EEXIST" end
    if code == "EBUSY" then return "EBUSY", true end
    return "EIO"
end

-- ---- small helpers -------------------------------------------------------------

local check_opts, check_id = store.check_opts, store.check_id

local function check_limit(fn, n, default)
    if n == nil then return default end
    if type(n) ~= "number" or n < 1 or n ~= floor(n) then
        error(fn .. ": limit/count must be a positive integer", 3)
    end
    return n
end

local function pct_decode(s)
    return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- Append the nine column values of a row to params from position n + 1.
local function put_row(params, n, id, blob, info)
    params[n + 1], params[n + 2], params[n + 3], params[n + 4], params[n + 5], params[n + 6],
    params[n + 7], params[n + 8], params[n + 9] =
        id, blob, info.group, info.name, info.specifier, info.algo, info.gen_date,
        info.expiry, info.kcv
    return n + NCOLS
end

-- The rows of group as one array parameter per column (PostgreSQL): { type =, n =, ... }
-- each, in COLS order; with old, the expected blobs go third (the compare-and-set shape).
local function column_arrays(group, with_old)
    local params, n = {}, #group
    local cols = {}
    for j = 1, NCOLS do cols[j] = { type = ARRAY_TYPES_OF[j], n = n } end
    for r, e in ipairs(group) do
        local info = e.info
        cols[1][r], cols[2][r], cols[3][r], cols[4][r], cols[5][r], cols[6][r], cols[7][r],
        cols[8][r], cols[9][r] = e.id, e.blob, info.group, info.name, info.specifier, info.algo,
            info.gen_date, info.expiry, info.kcv
    end
    if with_old then
        local old = { type = "bytea", n = n }
        for r, e in ipairs(group) do old[r] = e.old end
        params[1], params[2], params[3] = cols[1], cols[2], old
        for j = 3, NCOLS do params[j + 1] = cols[j] end
    else
        params = cols
    end
    return params
end

-- ---- connection and queries ------------------------------------------------------

function _M:connect()
    local c = self.c
    if c and c:alive() then return c end
    if c then c:close() end
    self.c = nil
    local err, code
    c, err, code = self.driver_open()
    if not c then return nil, err, code end
    self.c = c
    return c
end

function _M:drop()
    if self.c then self.c:close() end
    self.c = nil
end

-- Run one statement.  Returns rows, n or nil, msg, store_code, retryable.  retry:
-- resend once on a fresh connection when the old one turned out dead (a server
-- restart, an idle timeout) -- for statements that are safe to run twice.
local function q(self, sql, params, types, retry)
    local stale = self.c ~= nil
    local c, err, code = self:connect()
    if not c then return nil, err, code end
    local rows, n, dcode = c:exec(sql, params, types)
    if rows then return rows, n end
    if dcode == "ECONN" then
        self:drop()
        if retry and stale then return q(self, sql, params, types, false) end
    end
    local scode, again = self.d.code(dcode, n)
    return nil, n, scode, again
end
_M._q = q

-- Run body() inside one transaction, again (up to TX_RETRIES times) after a deadlock
-- or a busy database.  body returns true or nil, msg, code, retryable.  Returns true once
-- COMMIT succeeded, else nil, msg, code -- and a fourth value "commit_unknown" when the
-- connection broke while COMMIT was in flight (it may or may not have committed).
local function transaction(self, body)
    local msg, code, again
    for _ = 1, TX_RETRIES do
        local ok
        ok, msg, code = q(self, self.d.begin)
        if not ok then return nil, msg, code end
        ok, msg, code, again = body()
        if ok then
            local done
            done, msg, code, again = q(self, "COMMIT")
            if done then return true end
            if code == "ECONN" then return nil, msg, code, "commit_unknown" end
        end
        if self.c and self.c:alive() and self.c:in_transaction() then q(self, "ROLLBACK") end
        if not again then return nil, msg, code end
    end
    return nil, msg, code
end

-- ---- schema migration --------------------------------------------------------------

-- The table's recorded schema version, 0 when there is none -- or when the table itself
-- is gone (dropped by hand): every step is idempotent, so it is simply made again.
local function schema_version(self, retry)
    local rows, err, code = q(self, "SELECT version FROM softcxi_schema WHERE tbl = "
                              .. self.d.ph(1) .. " AND " .. self.d.table_exists, { self.table }, "t", retry)
    if not rows then return nil, err, code end
    local v = rows[1] and rows[1][1] or 0
    -- a row edited by hand (a negative, fractional or text version) is refused, not migrated
    if type(v) ~= "number" or v < 0 or v ~= math.floor(v) then
        return nil, fmt("table %s: softcxi_schema records version '%s', which is not a schema "
                        .. "version", self.table, tostring(v):sub(1, 40)), "EINVAL"
    end
    return v
end

--- Bring the table to SCHEMA_VERSION (a no-op when it is there).  Returns the version
-- found before, or nil, msg, code.  open runs it.
function _M:migrate()
    local fn = self.name .. ".migrate"
    local have = schema_version(self, true)
    if have == _M.SCHEMA_VERSION then return have end
    local before
    local ok, msg, code = transaction(self, function()
        local r, e, c
        if self.d == pg then
            -- one migrator at a time in the database (a rare event): two concurrent
            -- CREATE ... IF NOT EXISTS of one table, softcxi_schema included, race in
            -- the catalog and one fails with a unique violation
            r, e, c = q(self, "SELECT pg_advisory_xact_lock(7290415)::text")
            if not r then return nil, e, c end
        end
        r, e, c = self.c:script([[CREATE TABLE IF NOT EXISTS softcxi_schema (
            tbl text PRIMARY KEY, version integer NOT NULL, migrated_at bigint)]])
        if not r then return nil, e, self.d.code(c, e) end
        local v
        v, e, c = schema_version(self)
        if not v then return nil, e, c end
        before = v
        if v > _M.SCHEMA_VERSION then
            return nil, fmt("table %s has schema version %d, newer than this softcxi knows (%d)",
                            self.table, v, _M.SCHEMA_VERSION), "EINVAL"
        end
        for step = v + 1, _M.SCHEMA_VERSION do
            r, e, c = self.c:script(MIGRATIONS[step](self.d, self.table))
            if not r then
                return nil, fmt("step %d: %s", step, e), self.d.code(c, e)
            end
        end
        local ph = self.d.ph
        return q(self, fmt("INSERT INTO softcxi_schema (tbl, version, migrated_at) VALUES (%s, %s, %s)"
                           .. " ON CONFLICT (tbl) DO UPDATE SET version = excluded.version,"
                           .. " migrated_at = excluded.migrated_at", ph(1), ph(2), ph(3)),
                 { self.table, _M.SCHEMA_VERSION, os.time() }, "t")
    end)
    if not ok then return nil, fmt("%s: table %s: %s", fn, self.table, msg), code end
    return before
end

-- ---- statements ---------------------------------------------------------------------

-- SQL text is built once per shape and kept.
local function cached(self, key, build)
    local s = self.sql[key]
    if not s then
        s = build()
        self.sql[key] = s
    end
    return s
end

local UPDATE_SET
do
    local set = {}
    for i = 2, NCOLS do set[#set + 1] = COLS[i] .. " = excluded." .. COLS[i] end
    UPDATE_SET = concat(set, ", ")
end

-- INSERT of k rows; conflict "nothing" (an existing id is left, and not returned) or
-- "update" (overwritten).  Returns the ids written.
local PG_ARRAYS = {}
for j = 1, NCOLS do PG_ARRAYS[j] = "$" .. j .. "::" .. PG_TYPES[j] .. "[]" end

local function insert_sql(self, k, conflict)
    if self.d.arrays then
        return cached(self, "ins:" .. conflict, function()
            return fmt("INSERT INTO %s (%s) SELECT * FROM unnest(%s) ON CONFLICT (id) DO %s RETURNING id",
                       self.table, concat(COLS, ", "), concat(PG_ARRAYS, ", "),
                       conflict == "update" and ("UPDATE SET " .. UPDATE_SET) or "NOTHING")
        end)
    end
    return cached(self, "ins:" .. conflict .. k, function()
        local ph, rows = self.d.ph, {}
        for r = 0, k - 1 do
            local v = {}
            for j = 1, NCOLS do v[j] = ph(r * NCOLS + j) end
            rows[#rows + 1] = "(" .. concat(v, ", ") .. ")"
        end
        return fmt("INSERT INTO %s (%s) VALUES %s ON CONFLICT (id) DO %s RETURNING id",
                   self.table, concat(COLS, ", "), concat(rows, ", "),
                   conflict == "update" and ("UPDATE SET " .. UPDATE_SET) or "NOTHING")
    end)
end

-- Compare-and-set of k rows: (id, blob, old, attributes...) each; returns the ids
-- whose stored blob was old and is now blob.
local function cas_sql(self, k)
    if self.d.arrays then
        return cached(self, "cas", function()
            local arrays = { "$1::text[]", "$2::bytea[]", "$3::bytea[]" }
            local names, set = { "id", "blob", "old" }, {}
            for j = 3, NCOLS do
                arrays[#arrays + 1] = "$" .. (j + 1) .. "::" .. PG_TYPES[j] .. "[]"
                names[#names + 1] = COLS[j]
            end
            for j = 2, NCOLS do set[#set + 1] = COLS[j] .. " = v." .. COLS[j] end
            local t = self.table
            return fmt("UPDATE %s SET %s FROM unnest(%s) AS v (%s) WHERE %s.id = v.id AND %s.blob = v.old"
                       .. " RETURNING %s.id", t, concat(set, ", "), concat(arrays, ", "),
                       concat(names, ", "), t, t, t)
        end)
    end
    return cached(self, "cas:" .. k, function()
        local d, t, rows = self.d, self.table, {}
        local w = NCOLS + 1
        for r = 0, k - 1 do
            local v = { d.ph(r * w + 1, 1), d.ph(r * w + 2, 2), d.old_ph(r * w + 3) }
            for j = 3, NCOLS do v[#v + 1] = d.ph(r * w + j + 1, j) end
            rows[#rows + 1] = "(" .. concat(v, ", ") .. ")"
        end
        local names, set = { "id", "blob", "old" }, {}
        for j = 3, NCOLS do names[#names + 1] = COLS[j] end
        for j = 2, NCOLS do set[#set + 1] = COLS[j] .. " = v." .. COLS[j] end
        return fmt("WITH v (%s) AS (VALUES %s) UPDATE %s SET %s FROM v WHERE %s.id = v.id"
                   .. " AND %s.blob = v.old RETURNING %s.id",
                   concat(names, ", "), concat(rows, ", "), t, concat(set, ", "), t, t, t)
    end)
end

local function cas_types(k)
    return ("tbb" .. ("t"):rep(NCOLS - 2)):rep(k)
end

-- "<select> FROM table WHERE id IN <the ids>" and its parameters: one text[] parameter
-- for PostgreSQL (= ANY), a list of ?n for SQLite.
local function id_list_sql(self, select, ids)
    if self.d.arrays then
        local arr = { type = "text", n = #ids }
        for i = 1, #ids do arr[i] = ids[i] end
        return cached(self, "any:" .. select, function()
            return fmt("%s FROM %s WHERE id = ANY($1::text[])", select, self.table)
        end), { arr }
    end
    return cached(self, "in:" .. select .. #ids, function()
        local v = {}
        for i = 1, #ids do v[i] = "?" .. i end
        return fmt("%s FROM %s WHERE id IN (%s)", select, self.table, concat(v, ", "))
    end), ids
end

-- The ids of list (a set { [id] = true }) that are stored: { [id] = true }.
local function existing(self, ids)
    local out, list = {}, {}
    for id in pairs(ids) do list[#list + 1] = id end
    local step = self.d.in_chunk
    for first = 1, #list, step do
        local last = min(#list, first + step - 1)
        local params = {}
        for i = first, last do params[#params + 1] = list[i] end
        local sql, args = id_list_sql(self, "SELECT id", params)
        local rows, err, code = q(self, sql, args)
        if not rows then return nil, err, code end
        for _, r in ipairs(rows) do out[r[1]] = true end
    end
    return out
end

-- ---- the contract ----------------------------------------------------------------

local PUT_OPTS = { overwrite = true, if_match = true }

--- Store blob under id (nil: group/name[/specifier]).  Plain put never replaces (EEXIST:
-- the primary key refuses it); opts.overwrite replaces; opts.if_match = old replaces only
-- old (ECONFLICT, ENOTFOUND).
function _M:put(id, blob, opts)
    local fn = self.name .. ".put"
    if self.closed then error(fn .. ": the store is closed", 2) end
    opts = check_opts(fn, opts, PUT_OPTS)
    local info, code
    id, info, code = check(id, blob, fn)
    if not id then return nil, info, code end
    local old = opts.if_match
    if old ~= nil and type(old) ~= "string" then error(fn .. ": if_match must be a blob string", 2) end
    local params = { n = NCOLS }
    put_row(params, 0, id, blob, info)
    local rows, n, err
    if old ~= nil then
        params[NCOLS + 1], params.n = old, NCOLS + 1
        rows, err, code = q(self, cached(self, "put:cas", function()
            local set, ph = {}, self.d.ph
            for j = 2, NCOLS do set[#set + 1] = COLS[j] .. " = " .. ph(j) end
            return fmt("UPDATE %s SET %s WHERE id = %s AND blob = %s", self.table, concat(set, ", "),
                       ph(1), self.d.old_ph(NCOLS + 1))
        end), params, ROW_TYPES .. "b")
        if rows and err == 0 then
            local ex, e2, c2 = existing(self, { [id] = true })
            if not ex then return nil, fmt("%s: '%s': %s", fn, id, e2), c2 end
            if ex[id] then
                return nil, fmt("%s: '%s' changed (the stored blob is not the one expected)", fn, id),
                    "ECONFLICT"
            end
            return nil, fmt("%s: '%s' not found", fn, id), "ENOTFOUND"
        end
    else
        rows, err, code = q(self, cached(self, opts.overwrite and "put:ow" or "put", function()
            local v = {}
            for j = 1, NCOLS do v[j] = self.d.ph(j) end
            return fmt("INSERT INTO %s (%s) VALUES (%s)%s", self.table, concat(COLS, ", "),
                       concat(v, ", "), opts.overwrite
                       and (" ON CONFLICT (id) DO UPDATE SET " .. UPDATE_SET) or "")
        end), params, ROW_TYPES)
    end
    n = err
    if not rows then
        if code == "EEXIST" then
            return nil, fmt("%s: '%s' exists (use overwrite or if_match)", fn, id), code
        end
        return nil, fmt("%s: '%s': %s", fn, id, n), code
    end
    return true
end

local function not_a_blob(self, fn, id, why)
    return fmt("%s: '%s' (table %s): not a key blob: %s", fn, id, self.table, why)
end

--- The blob stored under id, or nil, msg, ENOTFOUND / EFORMAT (a row that is not a blob).
function _M:get(id)
    local fn = self.name .. ".get"
    if self.closed then error(fn .. ": the store is closed", 2) end
    check_id(fn, id)
    local rows, err, code = q(self, cached(self, "get", function()
        return fmt("SELECT blob FROM %s WHERE id = %s", self.table, self.d.ph(1))
    end), { id }, "t", true)
    if not rows then return nil, fmt("%s: '%s': %s", fn, id, err), code end
    local row = rows[1]
    if not row then return nil, fmt("%s: '%s' not found", fn, id), "ENOTFOUND" end
    local blob = row[1]
    local info, why = key_info(blob)
    if not info then return nil, not_a_blob(self, fn, id, why), "EFORMAT" end
    return blob
end

--- Remove id.  true or nil, msg, ENOTFOUND.
function _M:delete(id)
    local fn = self.name .. ".delete"
    if self.closed then error(fn .. ": the store is closed", 2) end
    check_id(fn, id)
    local rows, n, code = q(self, cached(self, "del", function()
        return fmt("DELETE FROM %s WHERE id = %s", self.table, self.d.ph(1))
    end), { id }, "t")
    if not rows then return nil, fmt("%s: '%s': %s", fn, id, n), code end
    if n == 0 then return nil, fmt("%s: '%s' not found", fn, id), "ENOTFOUND" end
    return true
end

local PUT_MANY_OPTS = { overwrite = true, skip_existing = true, chunk = true, on_chunk = true }

--- Store many { id =, blob = [, if_match = old] }, each chunk (opts.chunk, default the
-- store's chunk=, 1000) in one transaction.  Returns stored, skipped; or nil, msg, code,
-- stored, where stored counts the keys committed before the failure.
function _M:put_many(items, opts)
    local fn = self.name .. ".put_many"
    if self.closed then error(fn .. ": the store is closed", 2) end
    local chunk, on_chunk
    opts, chunk, on_chunk = store.put_many_args(fn, items, opts, PUT_MANY_OPTS, self.chunk)
    local overwrite, skip_existing = opts.overwrite, opts.skip_existing
    local total = #items

    -- every item is checked before anything is written
    local checked = {}
    for i = 1, total do
        local it = items[i]
        if type(it) ~= "table" then
            error(fmt("%s: item %d must be a table { id =, blob = }", fn, i), 2)
        end
        if it.if_match ~= nil and type(it.if_match) ~= "string" then
            error(fmt("%s: item %d: if_match must be a blob string", fn, i), 2)
        end
        local id, info, code = check(it.id, it.blob, fn)
        if not id then return nil, fmt("%s (item %d)", info, i), code, 0 end
        checked[i] = { id = id, info = info, blob = it.blob, old = it.if_match, i = i }
    end

    local stored, skipped, nfail = 0, 0, 0
    local fail_msg, fail_code, fail_i
    local function failed(e, msg, code)
        nfail = nfail + 1
        if not fail_i or e.i < fail_i then
            fail_i, fail_msg, fail_code = e.i, fmt("'%s' %s", e.id, msg), code
        end
    end

    -- One statement's worth of items: the inserts, or the compare-and-sets.
    local function run_insert(group, res)
        local params, types
        if self.d.arrays then
            params = column_arrays(group, false)
        else
            local n = 0
            params, types = { n = #group * NCOLS }, ROW_TYPES:rep(#group)
            for _, e in ipairs(group) do n = put_row(params, n, e.id, e.blob, e.info) end
        end
        local rows, err, code, again = q(self, insert_sql(self, #group, overwrite and "update" or "nothing"),
                                         params, types)
        if not rows then return nil, err, code, again end
        local written = {}
        for _, r in ipairs(rows) do written[r[1]] = true end
        for _, e in ipairs(group) do
            if written[e.id] then res.stored = res.stored + 1
            elseif skip_existing then res.skipped = res.skipped + 1
            else res.refused[#res.refused + 1] = { e, "exists (use overwrite or if_match)", "EEXIST" }
            end
        end
        return true
    end

    local function run_cas(group, res)
        local params
        if self.d.arrays then
            params = column_arrays(group, true)
        else
            local w = NCOLS + 1
            params = { n = #group * w }
            for r, e in ipairs(group) do
                local b = (r - 1) * w
                put_row(params, b, e.id, e.blob, e.info)
                -- (id, blob, old, attributes...): old goes third
                for j = b + NCOLS, b + 3, -1 do params[j + 1] = params[j] end
                params[b + 3] = e.old
            end
        end
        local rows, err, code, again = q(self, cas_sql(self, #group), params, cas_types(#group))
        if not rows then return nil, err, code, again end
        local written, missing = {}, {}
        for _, r in ipairs(rows) do written[r[1]] = true end
        local any = false
        for _, e in ipairs(group) do
            if not written[e.id] then missing[e.id] = true; any = true end
        end
        local there = {}
        if any then
            there, err, code = existing(self, missing)
            if not there then return nil, err, code end
        end
        for _, e in ipairs(group) do
            if written[e.id] then res.stored = res.stored + 1
            elseif there[e.id] then
                res.refused[#res.refused + 1] = { e, "changed (the stored blob is not the one expected)",
                                                  "ECONFLICT" }
            else res.refused[#res.refused + 1] = { e, "not found", "ENOTFOUND" }
            end
        end
        return true
    end

    -- Split a chunk into statements: consecutive items of one kind, no id twice in one
    -- statement (ON CONFLICT DO UPDATE may not touch a row twice), at most ROWS_PER_STMT;
    -- each statement's rows sorted by id, so writers lock rows in one order (no deadlock).
    local function statements(batch)
        local out, cur, seen = {}, nil, nil
        for _, e in ipairs(batch) do
            local kind = e.old ~= nil and "cas" or "ins"
            if not cur or cur.kind ~= kind or seen[e.id] or #cur >= self.d.rows_per_stmt then
                cur, seen = { kind = kind }, {}
                out[#out + 1] = cur
            end
            cur[#cur + 1] = e
            seen[e.id] = true
        end
        for _, g in ipairs(out) do sort(g, function(a, b) return a.id < b.id end) end
        return out
    end

    for first = 1, total, chunk do
        local last = min(total, first + chunk - 1)
        local batch = {}
        for i = first, last do batch[#batch + 1] = checked[i] end
        local groups = statements(batch)
        local res
        local ok, err, code, unknown = transaction(self, function()
            res = { stored = 0, skipped = 0, refused = {} }
            for _, g in ipairs(groups) do
                local done, e, c, again
                if g.kind == "cas" then done, e, c, again = run_cas(g, res)
                else done, e, c, again = run_insert(g, res) end
                if not done then return nil, e, c, again end
            end
            return true
        end)
        if not ok then
            local what = unknown == "commit_unknown"
                and fmt("; the connection broke during COMMIT: the %d keys of the last chunk may"
                        .. " or may not be stored", #batch) or ""
            return nil, fmt("%s: %d of %d keys were committed (%d skipped as existing) before the"
                            .. " failure%s: %s", fn, stored, total, skipped, what, err), code, stored
        end
        stored, skipped = stored + res.stored, skipped + res.skipped
        for _, r in ipairs(res.refused) do failed(r[1], r[2], r[3]) end
        if on_chunk then on_chunk(last, total) end
    end
    if fail_msg then
        return nil, fmt("%s: %s%s; %d of %d keys stored", fn, fail_msg,
                        nfail > 1 and fmt(" (and %d more failed)", nfail - 1) or "",
                        stored, total), fail_code, stored
    end
    return stored, skipped
end

--- { [id] = blob } for the ids stored (missing ids absent), and nil or, for rows that
-- are not key blobs (also absent), { [id] = { msg, "EFORMAT" } }.
function _M:get_many(ids)
    local fn = self.name .. ".get_many"
    if self.closed then error(fn .. ": the store is closed", 2) end
    if type(ids) ~= "table" then error(fn .. ": ids must be an array of strings", 2) end
    for i = 1, #ids do
        if type(ids[i]) ~= "string" or ids[i] == "" then
            error(fmt("%s: ids[%d] must be a non-empty string", fn, i), 2)
        end
    end
    local out, errs = {}, nil
    local step = self.d.in_chunk
    for first = 1, #ids, step do
        local last = min(#ids, first + step - 1)
        local params = {}
        for i = first, last do params[#params + 1] = ids[i] end
        local sql, args = id_list_sql(self, "SELECT id, blob", params)
        local rows, err, code = q(self, sql, args, nil, true)
        if not rows then return nil, fmt("%s: %s", fn, err), code end
        for _, r in ipairs(rows) do
            local info, why = key_info(r[2])
            if info then
                out[r[1]] = r[2]
            else
                errs = errs or {}
                errs[r[1]] = { not_a_blob(self, fn, r[1], why), "EFORMAT" }
            end
        end
    end
    return out, errs
end

--- How many rows the table holds (SELECT count(*): an index-only scan, O(rows)).
function _M:count()
    local fn = self.name .. ".count"
    if self.closed then error(fn .. ": the store is closed", 2) end
    local rows, err, code = q(self, "SELECT count(*) FROM " .. self.table, nil, nil, true)
    if not rows then return nil, fn .. ": " .. err, code end
    return rows[1][1]
end

local function parse_cursor(fn, cursor)
    if cursor == nil or cursor == "0" or cursor == "" then return nil end
    if type(cursor) ~= "string" then error(fn .. ": cursor must be a string or nil", 3) end
    if cursor:sub(1, #CURSOR_TAG) ~= CURSOR_TAG or #cursor == #CURSOR_TAG then
        return false
    end
    return cursor:sub(#CURSOR_TAG + 1)
end

-- One keyset page: ids matching where (SQL over params, placeholders from 1), after the
-- cursor's id, at most limit; next cursor when there are more.  lead: a column the
-- filter fixes to one value and that leads an (lead, id) index; ordering by (lead, id),
-- the same order as by id, makes that index the plan whatever the statistics say.
local function page(self, fn, where, params, cursor, limit, lead)
    local after = parse_cursor(fn, cursor)
    if after == false then
        return nil, fmt("%s: bad cursor '%s'", fn, tostring(cursor)), "EINVAL"
    end
    local conds = {}
    for _, w in ipairs(where) do conds[#conds + 1] = w end
    local np = #params
    -- from "" on, not including it: no call can name an empty id, so a row edited to one
    -- is left out rather than handed to a caller whose get() would raise
    after = after or ""
    if self.d.id_ok then conds[#conds + 1] = self.d.id_ok end
    if after then
        np = np + 1
        params[np] = after
        conds[#conds + 1] = "id > " .. self.d.ph(np)
    end
    np = np + 1
    params[np] = limit + 1
    params.n = np
    local sql = fmt("SELECT id FROM %s%s ORDER BY %sid LIMIT %s", self.table,
                    #conds > 0 and (" WHERE " .. concat(conds, " AND ")) or "",
                    lead and (lead .. ", ") or "", self.d.ph(np))
    local rows, err, code = q(self, sql, params, nil, true)
    if not rows then return nil, fmt("%s: %s", fn, err), code end
    local ids = {}
    for i = 1, min(#rows, limit) do ids[i] = rows[i][1] end
    if #rows > limit then return ids, CURSOR_TAG .. ids[limit] end
    return ids, nil
end

--- Every id, in id order, a page of at most count (default 100) at a time:
-- ids, next_cursor (nil at the end).  Keyset pagination: the cursor is the last id
-- returned, so a page costs an index range scan however deep the iteration is.
function _M:scan(cursor, count)
    local fn = self.name .. ".scan"
    if self.closed then error(fn .. ": the store is closed", 2) end
    return page(self, fn, {}, {}, cursor, check_limit(fn, count, 100))
end

--- Ids whose attributes match filter (group, name, specifier, algo; kcv too), in id
-- order, at most limit (default 100) per call: ids, next_cursor (nil at the end).
function _M:find(filter, cursor, limit)
    local fn = self.name .. ".find"
    if self.closed then error(fn .. ": the store is closed", 2) end
    if type(filter) ~= "table" then error(fn .. ": filter must be a table", 2) end
    limit = check_limit(fn, limit, 100)
    for k in pairs(filter) do
        if not FIND_COLS[k] then
            return nil, fmt("%s: cannot find by '%s' (indexed: group, name, specifier, algo, kcv)",
                            fn, tostring(k)), "EINVAL"
        end
    end
    local where, params, lead = {}, {}, nil
    for _, f in ipairs(FIND_ORDER) do
        local v = filter[f]
        if v ~= nil then
            if f == "specifier" then
                v = tonumber(v)
                -- no blob has a specifier that is not an integer
                if not v or v ~= floor(v) or v < -2 ^ 53 or v > 2 ^ 53 then return {}, nil end
                v = floor(v)
            else
                v = tostring(v)
            end
            params[#params + 1] = v
            local col = FIND_COLS[f]
            if INDEXED[f] and lead then
                -- not indexable on purpose: with stale statistics (a table just filled)
                -- the planner may otherwise walk a whole group's index for one name
                col = col .. " || ''"
            elseif INDEXED[f] then
                lead = col
            end
            where[#where + 1] = col .. " = " .. self.d.ph(#params)
        end
    end
    return page(self, fn, where, params, cursor, limit, lead)
end

--- Close the connection.  Closing twice is fine; any other call then raises.
function _M:close()
    if not self.closed then self:drop() end
    self.closed = true
    return true
end

-- ---- open -------------------------------------------------------------------------

local PARAMS = { table = true, chunk = true, busy_timeout = true, synchronous = true }

local function parse_query(fn, query, out, pass)
    for pair in query:gmatch("[^&]+") do
        local k, v = pair:match("^([^=]+)=(.*)$")
        if k and PARAMS[k] then
            out[k] = pct_decode(v)
        elseif pass then
            pass[#pass + 1] = pair      -- a libpq parameter (sslmode=, connect_timeout=, ...)
        else
            return nil, fmt("%s: unknown URL parameter '%s' (table, chunk, busy_timeout, synchronous)",
                            fn, k or pair)
        end
    end
    return true
end

local function config(fn, merged, dialect)
    local cfg = {}
    cfg.table = merged.table or "softcxi_keys"
    if type(cfg.table) ~= "string" or not cfg.table:match("^[a-z_][a-z0-9_]*$") or #cfg.table > 40 then
        return nil, fmt("%s: table must be a lower-case SQL name ([a-z_][a-z0-9_]*, at most 40"
                        .. " characters), not '%s'", fn, tostring(cfg.table))
    end
    if cfg.table == "softcxi_schema" then return nil, fn .. ": table softcxi_schema is reserved" end
    cfg.chunk = tonumber(merged.chunk or 1000)
    if not cfg.chunk or cfg.chunk < 1 or cfg.chunk ~= floor(cfg.chunk) then
        return nil, fmt("%s: chunk must be a positive integer, not '%s'", fn, tostring(merged.chunk))
    end
    if dialect == pg then
        if merged.busy_timeout or merged.synchronous then
            return nil, fn .. ": busy_timeout and synchronous are for sqlite: URLs"
        end
        return cfg
    end
    cfg.busy_timeout = tonumber(merged.busy_timeout or 5000)
    if not cfg.busy_timeout or cfg.busy_timeout < 0 or cfg.busy_timeout ~= floor(cfg.busy_timeout) then
        return nil, fmt("%s: busy_timeout must be milliseconds, not '%s'", fn,
                        tostring(merged.busy_timeout))
    end
    cfg.synchronous = (merged.synchronous or "full"):lower()
    if cfg.synchronous ~= "full" and cfg.synchronous ~= "normal" and cfg.synchronous ~= "extra" then
        return nil, fmt("%s: synchronous must be full, extra or normal, not '%s'", fn,
                        tostring(merged.synchronous))
    end
    return cfg
end

local function merge(fn, query, opts)
    local merged = {}
    for k, v in pairs(query) do merged[k] = v end
    for k, v in pairs(opts or {}) do
        -- store.open tail-calls open: level 3 is store.open's caller
        if not PARAMS[k] then error(fn .. ": unknown option '" .. tostring(k) .. "'", 3) end
        merged[k] = v
    end
    return merged
end

local function new(d, cfg, url)
    return setmetatable({ d = d, name = d.name, table = cfg.table, chunk = cfg.chunk,
                          sql = {}, url = url, skipped = 0 }, mt)
end

local function finish_open(s, fn)
    local c, err, code = s:connect()
    if not c then return nil, fn .. ": " .. err, code end
    local ok
    ok, err, code = s:migrate()
    if not ok then
        s:close()
        return nil, err, code
    end
    return s
end

local function open_pg(rest, opts, url)
    local fn = "store.postgres.open"
    local ok, pq = pcall(require, "softcxi.pq")
    if not ok then return nil, fn .. ": softcxi.pq is not built (libpq-dev): " .. tostring(pq), "EINVAL" end
    if not rest:match("^//[^/?]") then
        return nil, fn .. ": the URL must look like postgres://user@host:port/db[?table=...]", "EINVAL"
    end
    local base, query = rest:match("^([^?]*)%??(.*)$")
    local ours, pass = {}, {}
    local good, err = parse_query(fn, query, ours, pass)
    if not good then return nil, err, "EINVAL" end
    local cfg
    cfg, err = config(fn, merge(fn, ours, opts), pg)
    if not cfg then return nil, err, "EINVAL" end
    local has = {}
    for _, p in ipairs(pass) do has[p:match("^[^=]*")] = true end
    if not has.connect_timeout then pass[#pass + 1] = "connect_timeout=10" end
    if not has.application_name then pass[#pass + 1] = "application_name=softcxi" end
    local conninfo = "postgresql:" .. base .. "?" .. concat(pass, "&")
    local shown = (url or ("postgres:" .. rest)):gsub("//([^:/@]*):[^@/]*@", "//%1:***@")
    local s = new(pg, cfg, shown)
    s.driver_open = function()
        local c, e, code = pq.connect(conninfo)
        if not c then
            -- libpq's messages name host and port, never the password
            return nil, shown:match("^[^?]*") .. ": " .. e, code
        end
        -- Every query here is a point lookup or an ordered range scan with a LIMIT.  On a
        -- table whose statistics are stale (just filled: autovacuum has not analyzed it)
        -- the planner prefers a bitmap scan of a whole group plus a sort to the index
        -- walk that stops after one page: 13 ms instead of 0.2 ms at 20k rows, growing
        -- with the group.  Never the right plan for these queries: off, for this session.
        local ok2, e2, c2 = c:script("SET enable_bitmapscan = off")
        if not ok2 then
            c:close()
            return nil, shown:match("^[^?]*") .. ": " .. e2, pg.code(c2)
        end
        return c
    end
    return finish_open(s, fn)
end

local function open_sqlite(rest, opts, url)
    local fn = "store.sqlite.open"
    local ok, sqlite3 = pcall(require, "softcxi.sqlite3")
    if not ok then
        return nil, fn .. ": softcxi.sqlite3 is not built (libsqlite3-dev): " .. tostring(sqlite3), "EINVAL"
    end
    local path, query = rest:match("^([^?]*)%??(.*)$")
    if path:sub(1, 2) == "//" then
        path = path:sub(3)
        if path:sub(1, 1) ~= "/" then
            return nil, fn .. ": sqlite://HOST/... is not a local file (sqlite:PATH or sqlite:///ABS)",
                "EINVAL"
        end
    end
    if path == "" then return nil, fn .. ": no file name (sqlite:./keys.db)", "EINVAL" end
    local ours = {}
    local good, err = parse_query(fn, query, ours, nil)
    if not good then return nil, err, "EINVAL" end
    local cfg
    cfg, err = config(fn, merge(fn, ours, opts), sq)
    if not cfg then return nil, err, "EINVAL" end
    local s = new(sq, cfg, url or ("sqlite:" .. rest))
    s.path = path
    s.driver_open = function()
        local db, e, code = sqlite3.open(path, cfg.busy_timeout)
        if not db then return nil, fmt("%s: %s", path, e), code == "EOPEN" and "EIO" or code end
        -- WAL: readers never block the writer; synchronous=FULL: a commit is on disk when
        -- it returns (NORMAL may lose the last commits on a power loss)
        local r, e2, c2
        for _ = 1, 50 do
            r, e2, c2 = db:exec("PRAGMA journal_mode=WAL")
            if r or c2 ~= "EBUSY" then break end
        end
        if r and r[1] and r[1][1] ~= "wal" then
            r, e2, c2 = nil, "journal_mode is " .. tostring(r[1][1]) .. ", not wal", "EIO"
        end
        if r then r, e2, c2 = db:script("PRAGMA synchronous=" .. cfg.synchronous) end
        if not r then
            db:close()
            local what = c2 == "ECORRUPT" and "not an SQLite database (or a corrupt one)" or e2
            return nil, fmt("%s: %s", path, what), c2 == "EBUSY" and "EBUSY" or "EIO"
        end
        return db
    end
    return finish_open(s, fn)
end

--- store.open("postgres://..." | "postgresql://..." | "sqlite:...") lands here; rest is
-- the URL after "scheme:".
function _M.open(rest, opts, url)
    local scheme = type(url) == "string" and url:match("^([%w%-]+):") or "sqlite"
    if scheme == "postgres" or scheme == "postgresql" then return open_pg(rest, opts, url) end
    return open_sqlite(rest, opts, url)
end


return _M
