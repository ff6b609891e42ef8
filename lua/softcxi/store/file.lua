-- softcxi.store.file: the embedded key store.  One blob per file in a
-- fan-out directory tree, an attribute index of marker files beside it.
-- docs/stores.md has the contract and the reasoning; the layout:
--
--   DIR/softcxi-store                      marker: "softcxi file store 2"
--   DIR/blobs/ab/cd/<name>.blob            the blob, byte for byte
--   DIR/locks/buckets                      byte 0xabcd locked: writers of bucket ab/cd's ids
--   DIR/index/.lock                        flock: writers and find shared, reindex exclusive
--   DIR/index/group/pp/ab/<group>@<name>   index marker: id <name> has this group
--   DIR/index/name/pp/qq/<kname>@<name>    index marker: id <name> has this key name
--
-- Format 1 (before this version) kept the name markers in index/name/pp/
-- and a lock file per bucket (locks/abcd.lock, flock); open migrates a
-- format 1 store: it rebuilds the index and removes the old lock files
-- (docs/stores.md, "Formats").
--
-- A marker is a hard link to its blob's file (a directory entry, no inode
-- of its own: on this project's ext4 without a journal, inode allocation was
-- most of a put's cost, docs/performance.md); only its name matters to find.
-- A store indexed by an older version has empty marker files instead; both
-- are read.
--
-- ab/cd: the top two bytes of FNV-1a-32(id) in hex; pp/qq: the top two
-- bytes of FNV-1a-32(the value).  A group can hold millions of keys, so its
-- markers fan out again by id (a million-key group: ~4k entries a
-- directory); a key name is held by few keys, so all markers of one name
-- share one of 65,536 directories, which find by name lists (~15 entries at
-- a million keys: find by name stays flat as the store grows).
-- No directory is ever made per key.  <name>, <group>, <kname>: percent-encoded
-- (every byte outside [A-Za-z0-9._-], and a leading '.'), so '@' and '~'
-- never occur in them; one too long for a file name becomes
-- "<start>~<sha256>", and then the file holds the id (a blob file starts
-- with a header carrying it; its markers, links to it, too).
--
-- A put writes the blob to a temp file and links its markers to that file,
-- flushes both in one sync pass, then renames the blob into place and fsyncs
-- the directory (softcxi.sys).  Markers are durable before the blob's name
-- appears: a crash can leave a marker without a blob, never a blob without
-- its markers.  Every write of an id holds the lock of its bucket, so a put
-- and a delete of one id never interleave, and delete and overwrite remove
-- the markers they make stale.  find checks each candidate against the blob
-- itself (present, parses, matches), so a stale marker is skipped, never
-- returned; a directory entry exists once, so no id is returned twice.

local sys = require "softcxi.sys"
local store = require "softcxi.store"
local softcxi = require "softcxi"

local type, error, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, pcall =
    type, error, pairs, ipairs, tostring, tonumber, setmetatable, getmetatable, pcall
local floor, min = math.floor, math.min
local os_time = os.time
local byte, char, fmt, sub, find, gsub, match =
    string.byte, string.char, string.format, string.sub, string.find, string.gsub,
    string.match
local sort = table.sort
local key_info, hash_compute = softcxi.key_info, softcxi.hash_compute
local write_many, read, unlink, listdir, flock, lock_slots, hash32, fstat, rmdir =
    sys.write_durable_many, sys.read, sys.unlink, sys.listdir, sys.flock, sys.lock_slots,
    sys.hash32, sys.stat, sys.rmdir
local check_blob, matches = store.check, store.matches

local _M = { _VERSION = softcxi._VERSION }
local mt = { __index = _M }

local MARKER = "softcxi file store 2\n"
local MARKER_1 = "softcxi file store 1\n" -- migrated on open
local BLOB_NAME_MAX = 200    -- longest escaped id kept as a blob file name
local PART_MAX = 100         -- longest escaped value or id in a marker name
local BATCH = 1024           -- ids per group commit (two syncs: the data, then the names)
local CHUNK_MAX = 4096       -- most ids per group commit (opts.chunk)
local FIND_CHECKS = 20000    -- candidate blobs one find page may read
local FIND_VISITS = 200000   -- directory entries one find page may look at
local TEMP_MAX_AGE = 3600    -- reindex removes temp files older than this (s)
local LONG = "softcxi-long-id "
local INDEXED = { "group", "name" }
local FANOUT = { group = true } -- markers of these values fan out by id
local FILTER_FIELDS = { group = true, name = true, specifier = true, algo = true }

-- ---- names ----------------------------------------------------------------

local function pct(c) return fmt("%%%02X", byte(c)) end

--- Percent-encode every byte outside [A-Za-z0-9._-], and a leading '.',
-- so no id names a hidden or temp file.
local function escape(s)
    s = gsub(s, "[^A-Za-z0-9._-]", pct)
    if byte(s, 1) == 46 then s = "%2E" .. sub(s, 2) end
    return s
end

local function unhex(h) return char(tonumber(h, 16)) end

local function unescape(s)
    return (gsub(s, "%%(%x%x)", unhex))
end

local function hex(s)
    return (gsub(s, ".", function(c) return fmt("%02x", byte(c)) end))
end

--- ab, cd (hex) and the bucket number 0xabcd of s.
local function top_bytes(s)
    local h = floor(hash32(s) / 65536)
    return fmt("%02x", floor(h / 256)), fmt("%02x", h % 256), h
end

--- A file name for s of at most max bytes: escaped, or for a long s a
-- readable start, '~' (never in an escaped string) and a digest.
-- Returns name, long.
local function file_name(s, max)
    local name = escape(s)
    if #name <= max then return name, false end
    local head = gsub(sub(name, 1, max - 40), "%%%x?$", "")
    return head .. "~" .. hex(sub(hash_compute("sha256", s), 1, 16)), true
end

--- Where id lives: { ab =, bucket = 0xabcd, path =, name =, header = }
-- (header: the id-carrying prefix of a long id's file).
function _M:_loc(id)
    local ab, cd, bucket = top_bytes(id)
    local name, long = file_name(id, BLOB_NAME_MAX)
    return {
        ab = ab,
        bucket = bucket,
        name = name,
        path = self.dir .. "/blobs/" .. ab .. "/" .. cd .. "/" .. name .. ".blob",
        header = long and (LONG .. #id .. "\n" .. id) or nil,
    }
end

--- Split a long id's file into blob, id (nil if the header is bad).
local function unwrap_long(data)
    local n, rest = match(data, "^softcxi%-long%-id (%d+)\n()")
    if not n then return nil end
    n = tonumber(n)
    return sub(data, rest + n), sub(data, rest, rest + n - 1)
end

--- Where the markers for attr = value live: directory, name prefix, and
-- the depth of the tree below the directory (1: fanned out by id).
function _M:_value_root(attr, value)
    local pp, qq = top_bytes(value)
    local prefix = (file_name(value, PART_MAX)) .. "@"
    if FANOUT[attr] then return self.dir .. "/index/" .. attr .. "/" .. pp, prefix, 1 end
    return self.dir .. "/index/" .. attr .. "/" .. pp .. "/" .. qq, prefix, 0
end

--- Marker entries { path } of a blob stored as loc.
function _M:_markers(loc, id, info)
    local out = {}
    local idname = file_name(id, PART_MAX)
    for _, attr in ipairs(INDEXED) do
        local v = info[attr]
        if type(v) == "string" then
            local root, prefix, depth = self:_value_root(attr, v)
            if depth == 1 then root = root .. "/" .. loc.ab end
            out[#out + 1] = { root .. "/" .. prefix .. idname }
        end
    end
    return out
end

local function sorted_dir(path, prefix)
    local names, err, code = listdir(path, prefix)
    if not names then
        if code == "ENOTFOUND" then return {} end
        return nil, err, code
    end
    sort(names)
    return names
end

local function is_hex2(s) return #s == 2 and find(s, "^%x%x$") ~= nil end

local function rm_tree(path)
    local st = fstat(path)
    if not st then return true end
    if st.type ~= "dir" then return unlink(path) end
    local names, err, code = listdir(path)
    if not names then return nil, err, code end
    for _, n in ipairs(names) do
        local ok
        ok, err, code = rm_tree(path .. "/" .. n)
        if not ok then return nil, err, code end
    end
    return rmdir(path)
end

-- ---- open / close ---------------------------------------------------------

local OPEN_OPTS = { sync = true }

--- open(rest, opts, url): rest is "DIR" from "file:DIR", or "//" .. absolute
-- path from "file:///DIR".  opts.sync: "auto" (default: one syncfs for a
-- batch of 8 files or more, else fsync file by file), "fsync", "syncfs".
function _M.open(rest, opts, url)
    opts = opts or {}
    for k in pairs(opts) do
        if not OPEN_OPTS[k] then
            error("store.file.open: unknown option '" .. tostring(k) .. "'", 3)
        end
    end
    local sync = opts.sync or "auto"
    if sync ~= "auto" and sync ~= "fsync" and sync ~= "syncfs" then
        error("store.file.open: sync must be 'auto', 'fsync' or 'syncfs'", 3)
    end
    local dir = rest
    if type(dir) == "string" and sub(dir, 1, 2) == "//" then
        dir = sub(dir, 3)
        if sub(dir, 1, 1) ~= "/" then
            return nil, "store.file.open: '" .. tostring(url)
                .. "': file:// needs an absolute path (file:///DIR)", "EINVAL"
        end
    end
    if type(dir) ~= "string" or dir == "" then
        return nil, "store.file.open: '" .. tostring(url) .. "': no directory", "EINVAL"
    end
    dir = gsub(dir, "(.)/+$", "%1")

    local st = fstat(dir)
    if st and st.type ~= "dir" then
        return nil, "store.file.open: " .. dir .. " is not a directory", "EINVAL"
    end
    local marker = read(dir .. "/softcxi-store")
    local fresh = not marker
    if fresh then
        -- Processes opening one new directory at once: what another one's
        -- set-up (below) has made so far does not count as foreign content,
        -- and a marker it placed since the read above is read again.
        local foreign
        for _, name in ipairs(st and listdir(dir) or {}) do
            if name == "softcxi-store" then
                marker = read(dir .. "/softcxi-store")
                fresh = not marker
            elseif not foreign and name ~= "blobs" and name ~= "index"
                and not find(name, "^%.softcxi%-store%..*%.tmp$") then
                foreign = name
            end
        end
        if foreign and fresh then
            return nil, "store.file.open: " .. dir .. " is not empty (it holds '" .. foreign
                .. "') and not a softcxi store (no softcxi-store marker)", "EINVAL"
        end
        if fresh then
            local ok, err, code = sys.mkdir_p(dir .. "/blobs")
            if ok then ok, err, code = sys.mkdir_p(dir .. "/index") end
            if ok then ok, err, code = sys.write_durable(dir .. "/softcxi-store", MARKER) end
            if not ok then return nil, "store.file.open: " .. err, code end
        end
    end
    if not fresh and marker ~= MARKER and marker ~= MARKER_1 then
        return nil, "store.file.open: " .. dir .. "/softcxi-store: unknown format", "EFORMAT"
    end

    local self = setmetatable({ dir = dir, sync = sync }, mt)
    if marker == MARKER_1 then
        local ok, err, code = self:_migrate()
        if not ok then return nil, "store.file.open: " .. err, code end
    elseif not fresh and not fstat(dir .. "/index") then
        -- No index at all: a store restored from a copy of blobs/ alone.
        local ok, err, code = self:reindex()
        if not ok then return nil, "store.file.open: " .. err, code end
    end
    return self
end

--- Format 1 -> 2, under the index lock held exclusively (writers of this
-- version wait; find waits): rebuild the index in the new layout, remove
-- the old per-bucket lock files, then write the new marker, durably, last
-- -- a crash before it leaves a format 1 store that the next open migrates
-- again.  Another process may have migrated it while this one waited for
-- the lock: then there is nothing to do.  Writers of the old version must
-- be stopped first (they lock buckets through the old files and write name
-- markers where this version does not look).
function _M:_migrate()
    local lock, err, code = flock(self.dir .. "/index/.lock", "ex")
    if not lock then return nil, err, code end
    local ok, a, b, c = pcall(function()
        if read(self.dir .. "/softcxi-store") == MARKER then return true end
        local n, e, ecode = self:_reindex()
        if not n then return nil, e, ecode end
        for _, name in ipairs(listdir(self.dir .. "/locks") or {}) do
            if find(name, "^%x%x%x%x%.lock$") then unlink(self.dir .. "/locks/" .. name) end
        end
        return sys.write_durable(self.dir .. "/softcxi-store", MARKER)
    end)
    lock:unlock()
    if not ok then error(a, 0) end
    if not a then return nil, "migrating " .. self.dir .. " from format 1: " .. b, c end
    return true
end

local function check_open(self, fn)
    if getmetatable(self) ~= mt then
        error("store.file." .. fn .. ": call it as a method (s:" .. fn .. "(...))", 3)
    end
    if self.closed then
        error("store.file." .. fn .. ": the store is closed", 3)
    end
end

--- close() -> true.  The store holds no descriptor between calls.
function _M:close()
    self.closed = true
    return true
end

-- ---- locks ----------------------------------------------------------------

--- Exclusive locks on buckets (numbers 0-65535: one byte each of
-- locks/buckets, taken in increasing order so two batches never deadlock,
-- any number behind one descriptor), then the index lock shared.  Returns
-- a release function.
function _M:_lock(buckets)
    local held, err, code = lock_slots(self.dir .. "/locks/buckets", buckets)
    if not held then return nil, err, code end
    local ilock
    ilock, err, code = flock(self.dir .. "/index/.lock", "sh")
    if not ilock then held:unlock(); return nil, err, code end
    return function()
        ilock:unlock()
        held:unlock()
    end
end

-- ---- reading ----------------------------------------------------------------

--- What is stored under id: blob, loc | nil, err, code (err unprefixed).
function _M:_read(id, loc)
    loc = loc or self:_loc(id)
    local data, err, code = read(loc.path)
    if not data then
        if code == "ENOTFOUND" then return nil, "'" .. id .. "' not found", code end
        return nil, "'" .. id .. "': " .. err, code
    end
    if loc.header then
        local blob, stored = unwrap_long(data)
        if stored ~= id then
            return nil, "'" .. id .. "' (" .. loc.path .. "): bad long-id header", "EFORMAT"
        end
        data = blob
    end
    return data, loc
end

--- As _read, and the blob must parse: blob, info | nil, err, code.  A torn
-- or edited file is EFORMAT naming the id and the path.
function _M:_get(id, loc)
    local blob, l, code = self:_read(id, loc)
    if not blob then return nil, l, code end
    local info, err = key_info(blob)
    if not info then
        return nil, "'" .. id .. "' (" .. l.path .. "): " .. err, "EFORMAT"
    end
    return blob, info
end

local function check_id(id, fn)
    if type(id) ~= "string" or id == "" then
        error(fn .. ": id must be a non-empty string", 3)
    end
end

--- get(id) -> blob
function _M:get(id)
    check_open(self, "get")
    check_id(id, "store.file.get")
    local blob, err, code = self:_get(id)
    if not blob then return nil, "store.file.get: " .. err, code end
    return blob
end

--- get_many(ids) -> { [id] = blob }, errors.  Missing ids are absent;
-- errors is nil, or { [id] = { message, code } } for ids that could not be
-- read (EFORMAT, EIO) -- one bad file never fails the batch.
function _M:get_many(ids)
    check_open(self, "get_many")
    if type(ids) ~= "table" then error("store.file.get_many: ids must be a table", 2) end
    local out, errs = {}, nil
    for _, id in ipairs(ids) do
        check_id(id, "store.file.get_many")
        local blob, err, code = self:_get(id)
        if blob then
            out[id] = blob
        elseif code ~= "ENOTFOUND" then
            errs = errs or {}
            errs[id] = { "store.file.get_many: " .. err, code }
        end
    end
    return out, errs
end

-- ---- writing ----------------------------------------------------------------

local function check_opts(opts, allowed, fn)
    if opts == nil then return {} end
    if type(opts) ~= "table" then error(fn .. ": options must be a table", 3) end
    for k in pairs(opts) do
        if not allowed[k] then error(fn .. ": unknown option '" .. tostring(k) .. "'", 3) end
    end
    return opts
end

--- A checked item: { id, blob, info, loc, data, markers } | nil, err, code.
function _M:_row(id, blob, fn)
    local info, code
    id, info, code = check_blob(id, blob, fn)
    if not id then return nil, info, code end
    local loc = self:_loc(id)
    return { id = id, blob = blob, info = info, loc = loc,
             data = loc.header and loc.header .. blob or blob,
             markers = self:_markers(loc, id, info) }
end

--- Markers of the blob old that the new row does not have: stale once the
-- row replaces it.
function _M:_stale_markers(row, old)
    local info = key_info(old)
    if not info then return {} end
    local keep = {}
    for _, m in ipairs(row.markers) do keep[m[1]] = true end
    local out = {}
    for _, m in ipairs(self:_markers(row.loc, row.id, info)) do
        if not keep[m[1]] then out[#out + 1] = m[1] end
    end
    return out
end

--- Write rows in one group commit.  The caller holds their bucket locks,
-- so no other writer of these ids runs and what is read here stays true.
-- Each row says how it may be written: row.old (compare-and-set: the
-- stored blob must be old), mode.overwrite (replace whatever is there), or
-- neither (the id must be free; with mode.skip_existing a taken id is
-- skipped).  A row that may not be written fails alone -- EEXIST,
-- ECONFLICT, ENOTFOUND, recorded in fails -- and the rest are written.  A
-- row whose blob is already stored is not written again; the markers of a
-- replaced blob that the new one lacks are removed.  No id may appear
-- twice in rows.  Returns stored, skipped | nil, err, code, stored (a
-- system error: nothing after it is confirmed).
function _M:_commit(rows, mode, fails)
    local files, markers, stale, to_write = {}, {}, {}, {}
    local stored, skipped = 0, 0
    for _, r in ipairs(rows) do
        -- cur: the blob stored (nil when none, or unreadable); taken: the name exists
        local cur, taken, why, code
        if r.old ~= nil or mode.overwrite then
            local _, rcode
            cur, _, rcode = self:_read(r.id, r.loc)
            taken = cur ~= nil or rcode ~= "ENOTFOUND"
        else
            taken = fstat(r.loc.path) ~= nil -- an insert needs no more
        end
        if r.old ~= nil then
            if not taken then
                why, code = "not found", "ENOTFOUND"
            elseif cur ~= r.old then
                why, code = "does not hold the expected blob", "ECONFLICT"
            end
        elseif taken and not mode.overwrite and not mode.skip_existing then
            why, code = "exists (overwrite or if_match to replace)", "EEXIST"
        end
        if why then
            fails[#fails + 1] = { r, why, code }
        elseif taken and not mode.overwrite and r.old == nil then
            skipped = skipped + 1 -- skip_existing
        elseif cur == r.blob then
            stored = stored + 1 -- already there
        else
            to_write[#to_write + 1] = r
            files[#files + 1] = { r.loc.path, r.data, not taken }
            -- each marker a hard link to the blob's temp file: no inode of its own
            for _, m in ipairs(r.markers) do markers[#markers + 1] = { m[1], nil, #files } end
            if cur then stale[#to_write] = self:_stale_markers(r, cur) end
        end
    end
    local n, err, code, placed = 0, nil, nil, 0
    if #to_write > 0 then
        n, err, code, placed = write_many(files, { markers = markers, sync = self.sync })
    end
    placed = n or placed or 0
    for i = 1, placed do
        -- durable: a stale marker is a link that would keep the old blob's bytes
        for _, p in ipairs(stale[i] or {}) do unlink(p, true) end
    end
    if not n then
        -- Markers made for rows that were not placed, and whose id holds no
        -- blob, would only be skipped by find: remove them.
        for i = placed + 1, #to_write do
            if not fstat(to_write[i].loc.path) then
                for _, m in ipairs(to_write[i].markers) do unlink(m[1]) end
            end
        end
        local bad = to_write[placed + 1]
        return nil, (bad and "'" .. bad.id .. "': " or "") .. err, code, stored + placed
    end
    return stored + n, skipped
end

--- The message of the first of fails, and how many more failed.
local function fail_message(fails)
    local f = fails[1]
    local msg = "'" .. f[1].id .. "' " .. f[2]
    if #fails > 1 then msg = msg .. " (and " .. (#fails - 1) .. " more failed)" end
    return msg, f[3]
end

--- put(id, blob [, opts]) -> true.  id nil: group/name[/specifier].
-- opts.overwrite replaces; opts.if_match = old replaces only if the stored
-- blob is old (ECONFLICT if not, ENOTFOUND if there is none).
function _M:put(id, blob, opts)
    check_open(self, "put")
    opts = check_opts(opts, { overwrite = true, if_match = true }, "store.file.put")
    local old = opts.if_match
    if old ~= nil and type(old) ~= "string" then
        error("store.file.put: if_match must be a blob (string)", 2)
    end
    local row, err, code = self:_row(id, blob, "store.file.put")
    if not row then return nil, err, code end
    row.old = old
    local release
    release, err, code = self:_lock({ row.loc.bucket })
    if not release then return nil, "store.file.put: '" .. row.id .. "': " .. err, code end
    local fails = {}
    local ok, n
    ok, n, err, code = pcall(self._commit, self, { row }, { overwrite = opts.overwrite }, fails)
    release()
    if not ok then error(n, 0) end
    if fails[1] then
        err, code = fail_message(fails)
        return nil, "store.file.put: " .. err, code
    end
    if not n then return nil, "store.file.put: " .. err, code end
    return true
end

local PUT_MANY_OPTS = { overwrite = true, skip_existing = true, chunk = true, on_chunk = true }

--- put_many({ {id=, blob= [, if_match=]}, ... } [, opts]) -> stored, skipped
-- Every item is checked before anything is written (EFORMAT fails the call).
-- Group commit: one sync pass per chunk (opts.chunk, default 1024, at most
-- 4096).  opts.overwrite and a per-item if_match as in put;
-- opts.skip_existing: an id already stored is left alone and counted in
-- skipped.  opts.on_chunk(done, total) runs after each chunk is durable.
-- An item that may not be written (EEXIST, ECONFLICT, ENOTFOUND) fails
-- alone: the rest are written, then the first failure is returned as
-- nil, msg, code, stored -- stored counting the items confirmed stored.
function _M:put_many(items, opts)
    check_open(self, "put_many")
    if type(items) ~= "table" then error("store.file.put_many: items must be a table", 2) end
    opts = check_opts(opts, PUT_MANY_OPTS, "store.file.put_many")
    local chunk = opts.chunk or BATCH
    if type(chunk) ~= "number" or chunk < 1 or chunk ~= floor(chunk) then
        error("store.file.put_many: chunk must be a positive integer", 2)
    end
    chunk = min(chunk, CHUNK_MAX)
    local on_chunk = opts.on_chunk
    if on_chunk ~= nil and type(on_chunk) ~= "function" then
        error("store.file.put_many: on_chunk must be a function", 2)
    end
    local rows = {}
    for i, it in ipairs(items) do
        if type(it) ~= "table" then
            error("store.file.put_many: item " .. i .. " must be a table { id =, blob = }", 2)
        end
        if it.if_match ~= nil and type(it.if_match) ~= "string" then
            error("store.file.put_many: item " .. i .. ": if_match must be a blob (string)", 2)
        end
        local row, err, code = self:_row(it.id, it.blob, "store.file.put_many")
        if not row then return nil, err .. " (item " .. i .. ")", code, 0 end
        row.old = it.if_match
        rows[i] = row
    end
    local total, stored, skipped, fails = #rows, 0, 0, {}
    local mode = { overwrite = opts.overwrite, skip_existing = opts.skip_existing }
    local first = 1
    while first <= total do
        -- a chunk ends early where an id repeats: the second write of an
        -- id must see the first
        local batch, buckets, ids, last = {}, {}, {}, first - 1
        for i = first, min(first + chunk - 1, total) do
            if ids[rows[i].id] then break end
            ids[rows[i].id] = true
            batch[#batch + 1] = rows[i]
            buckets[#buckets + 1] = rows[i].loc.bucket
            last = i
        end
        first = last + 1
        local release, err, code = self:_lock(buckets)
        if not release then
            return nil, "store.file.put_many: " .. err .. "; " .. stored .. " of " .. total
                .. " stored", code, stored
        end
        local ok, n, skip_or_err, confirmed
        ok, n, skip_or_err, code, confirmed = pcall(self._commit, self, batch, mode, fails)
        release()
        if not ok then error(n, 0) end
        if not n then
            stored = stored + confirmed
            return nil, "store.file.put_many: " .. skip_or_err .. "; " .. stored .. " of " .. total
                .. " stored", code, stored
        end
        stored, skipped = stored + n, skipped + skip_or_err
        if on_chunk then on_chunk(last, total) end
    end
    if fails[1] then
        local msg, code = fail_message(fails)
        return nil, "store.file.put_many: " .. msg .. "; " .. stored .. " of " .. total .. " stored",
            code, stored
    end
    return stored, skipped
end

--- delete(id) -> true
function _M:delete(id)
    check_open(self, "delete")
    check_id(id, "store.file.delete")
    local loc = self:_loc(id)
    local release, err, code = self:_lock({ loc.bucket })
    if not release then return nil, "store.file.delete: '" .. id .. "': " .. err, code end
    local blob = self:_read(id, loc)
    local info = blob and key_info(blob)
    local ok
    ok, err, code = unlink(loc.path, true)
    if ok and info then
        -- Markers are hard links to the blob's file: removed durably too, so
        -- the deleted blob's bytes do not live on in the index.  Blob first:
        -- a crash between leaves a marker without a blob (find skips it),
        -- never a blob without its markers.
        for _, m in ipairs(self:_markers(loc, id, info)) do unlink(m[1], true) end
    end
    release()
    if ok then return true end
    if code == "ENOTFOUND" then return nil, "store.file.delete: '" .. id .. "' not found", code end
    return nil, "store.file.delete: '" .. id .. "': " .. err, code
end

-- ---- iteration --------------------------------------------------------------

--- Visit the files of the tree root/[xx/[yy/]]name in sorted order, after
-- position `after`; fn(dir, name, pos) returns true to stop.  depth 2:
-- root/ab/cd/name (blobs), 1: root/ab/name (group markers), 0: root/name
-- (name markers).  Memory: one directory listing at a time.  leaf_prefix:
-- only the files whose names start with it (listed so by softcxi.sys: a find
-- by name makes one Lua string per match, not one per directory entry).
local function walk(root, depth, after, fn, leaf_prefix)
    local cut = {}
    if after then
        for part in (after .. "/"):gmatch("([^/]*)/") do cut[#cut + 1] = part end
        if #cut ~= depth + 1 then return nil, "bad cursor '" .. after .. "'", "EINVAL" end
    end
    local function level(dir, d, prefix, bound)
        local names, err, code = sorted_dir(dir, d > depth and leaf_prefix or nil)
        if not names then return nil, err, code end
        for _, name in ipairs(names) do
            local b = bound and cut[d]
            local leaf = d > depth
            if leaf then
                if not b or name > b then
                    if fn(dir, name, prefix .. name) then return true, true end
                end
            elseif is_hex2(name) and (not b or name >= b) then
                local ok, stop, ecode = level(dir .. "/" .. name, d + 1, prefix .. name .. "/",
                                              b and name == b)
                if not ok then return nil, stop, ecode end
                if stop then return true, true end
            end
        end
        return true, false
    end
    local ok, err, code = level(root, 1, "", after ~= nil)
    if not ok then return nil, err, code end
    return true
end

--- The id stored in blob file `name` of dir (nil: not a blob file).
local function id_of_blob_file(dir, name)
    if byte(name, 1) == 46 or sub(name, -5) ~= ".blob" then return nil end
    local base = sub(name, 1, -6)
    if not find(base, "~", 1, true) then return unescape(base) end
    local data = read(dir .. "/" .. name)
    local _, id = unwrap_long(data or "")
    return id
end

--- The id marker `name` (after its value prefix) stands for; a long id is
-- read from the marker: a hard link to the blob's file, whose header holds
-- it (or, in a store indexed before markers were links, the id itself).
local function id_of_marker(dir, name, prefix_len)
    local idname = sub(name, prefix_len + 1)
    if not find(idname, "~", 1, true) then return unescape(idname) end
    local data = read(dir .. "/" .. name)
    if not data or data == "" then return nil end
    if sub(data, 1, #LONG) == LONG then
        local _, id = unwrap_long(data)
        return id
    end
    return data
end

--- scan([cursor [, count]]) -> ids, next_cursor (nil when done).  The
-- cursor is the tree position of the last id returned: an id present for
-- the whole iteration is returned exactly once, whatever changes meanwhile.
function _M:scan(cursor, count)
    check_open(self, "scan")
    if cursor ~= nil and type(cursor) ~= "string" then
        error("store.file.scan: cursor must be a string or nil", 2)
    end
    count = count or 100
    if type(count) ~= "number" or count < 1 then
        error("store.file.scan: count must be a positive number", 2)
    end
    local ids, next_cursor = {}, nil
    local ok, err, code = walk(self.dir .. "/blobs", 2, cursor, function(dir, name, pos)
        local id = id_of_blob_file(dir, name)
        if id then
            ids[#ids + 1] = id
            if #ids >= count then next_cursor = pos; return true end
        end
    end)
    if not ok then return nil, "store.file.scan: " .. err, code end
    return ids, next_cursor
end

--- count() -> n: one listing of every bucket (O(n) directory entries).
function _M:count()
    check_open(self, "count")
    local n = 0
    local ok, err, code = walk(self.dir .. "/blobs", 2, nil, function(_, name)
        if byte(name, 1) ~= 46 and sub(name, -5) == ".blob" then n = n + 1 end
    end)
    if not ok then return nil, "store.file.count: " .. err, code end
    return n
end

-- ---- find -------------------------------------------------------------------

--- find(filter [, cursor [, limit]]) -> ids, next_cursor (nil when done)
-- filter: any of group, name, specifier, algo (others: EINVAL), compared
-- as store.matches does.  With a group or a name it walks that value's
-- markers; otherwise it walks the blobs.  Every candidate is checked
-- against its blob.  A page holds at most limit ids (default 100) and may
-- hold fewer, even none, before the end: iterate until the cursor is nil.
function _M:find(filter, cursor, limit)
    check_open(self, "find")
    if type(filter) ~= "table" then error("store.file.find: filter must be a table", 2) end
    if cursor ~= nil and type(cursor) ~= "string" then
        error("store.file.find: cursor must be a string or nil", 2)
    end
    limit = limit or 100
    if type(limit) ~= "number" or limit < 1 then
        error("store.file.find: limit must be a positive number", 2)
    end
    for k in pairs(filter) do
        if not FILTER_FIELDS[k] then
            return nil, "store.file.find: cannot find by '" .. tostring(k)
                .. "' (fields: group, name, specifier, algo)", "EINVAL"
        end
    end

    local root, depth, prefix
    for _, attr in ipairs(INDEXED) do
        local v = filter[attr]
        if v ~= nil then
            if type(v) ~= "string" then return {}, nil end -- matches no blob
            root, prefix, depth = self:_value_root(attr, v)
            break
        end
    end
    if not root then root, depth = self.dir .. "/blobs", 2 end

    local ids, next_cursor, checks, visits = {}, nil, 0, 0
    local plen = prefix and #prefix
    local ok, err, code = walk(root, depth, cursor, function(dir, name, pos)
        visits = visits + 1
        local id
        if not prefix then
            id = id_of_blob_file(dir, name)
        elseif sub(name, 1, plen) == prefix then
            id = id_of_marker(dir, name, plen)
        end
        if id then
            checks = checks + 1
            local blob, info = self:_get(id)
            if blob and matches(info, filter) then ids[#ids + 1] = id end
        end
        if #ids >= limit or checks >= FIND_CHECKS or visits >= FIND_VISITS then
            next_cursor = pos
            return true
        end
    end, prefix)
    if not ok then return nil, "store.file.find: " .. err, code end
    return ids, next_cursor
end

-- ---- reindex ----------------------------------------------------------------

--- reindex() -> n_indexed, n_skipped: rebuild the index from the blobs.
-- Holds the index lock exclusively (writers wait).  Skips and counts blob
-- files that do not parse; removes temp files a crashed writer left behind
-- (older than an hour).
function _M:reindex()
    check_open(self, "reindex")
    local lock, err, code = flock(self.dir .. "/index/.lock", "ex")
    if not lock then return nil, "store.file.reindex: " .. err, code end
    local ok, a, b, c = pcall(self._reindex, self)
    lock:unlock()
    if not ok then error(a, 0) end
    if not a then return nil, "store.file.reindex: " .. b, c end
    return a, b
end

function _M:_reindex()
    for _, attr in ipairs(INDEXED) do
        local ok, err, code = rm_tree(self.dir .. "/index/" .. attr)
        if not ok then return nil, err, code end
    end
    local n, skipped, pending, now, failure = 0, 0, {}, os_time(), nil
    local function flush()
        if #pending == 0 then return true end
        local ok, err, code = write_many({}, { markers = pending, sync = self.sync })
        pending = {}
        if not ok then failure = { err, code } end
        return ok
    end
    local ok, err, code = walk(self.dir .. "/blobs", 2, nil, function(dir, name)
        if byte(name, 1) == 46 then
            if sub(name, -4) == ".tmp" then
                local st = fstat(dir .. "/" .. name)
                if st and now - st.mtime > TEMP_MAX_AGE then unlink(dir .. "/" .. name) end
            end
            return
        end
        local id = id_of_blob_file(dir, name)
        if not id then return end
        local loc = self:_loc(id)
        local blob, info = self:_get(id, loc)
        if not blob then skipped = skipped + 1; return end
        for _, m in ipairs(self:_markers(loc, id, info)) do
            pending[#pending + 1] = { m[1], nil, loc.path }
        end
        n = n + 1
        if #pending >= 4096 and not flush() then return true end
    end)
    if not ok then return nil, err, code end
    if failure or not flush() then return nil, failure[1], failure[2] end
    return n, skipped
end

return _M
