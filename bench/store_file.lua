-- bench/store_file.lua - the file key store: durable put_many and get.
--
-- Runs under Lua 5.4 and LuaJIT, with LUA_PATH / LUA_CPATH as for
-- bench/core.lua.
--
--   lua5.4 bench/store_file.lua [--keys N] [--chunk C] [--sync auto|fsync|syncfs] [--dir D]
--
-- Output, one line per figure (the shape of bench/core.lua's):
--   softcxi file_put_many_fresh <keys_per_second> <us_per_key>
--       N new keys into an empty store: every bucket directory is new
--   softcxi file_put_many <keys_per_second> <us_per_key>
--       N more new keys into the store of N: the directories exist
--   raw file_durable_writes <files_per_second> <us_per_file>
--       the same number of files written by softcxi.sys.write_durable_many
--       alone (same chunking, same fan-out, no index, no checks): what the
--       disk allows; the ratio of the two is the store's own cost
--   softcxi file_get_<N> <gets_per_second> <us_per_get>
--       random get of one of the 2N ids (read + key_info)
--   softcxi file_find_group <ids_per_second> <us_per_id>
--       find by group, all pages
-- plus: info <interpreter> <_VERSION> <dir>, and info cpu_us_per_key <us>
-- (user + system CPU per key of file_put_many).
--
-- Timing is wall time (softcxi.sys.monotonic): a durable write mostly
-- waits for the disk, which CPU time would not see.  The store lives in a
-- fresh directory under --dir (default $TMPDIR or /tmp; it must be on the
-- disk to be measured, not a tmpfs) and is removed at the end, as is the
-- throw-away device that makes the keys.

local softcxi = require "softcxi"
local store = require "softcxi.store"
local sys = require "softcxi.sys"

local now = sys.monotonic

local function usage(msg)
    io.stderr:write("store_file.lua: ", msg, "\n",
        "usage: store_file.lua [--keys N] [--chunk C] [--sync auto|fsync|syncfs] [--dir D]\n")
    os.exit(2)
end

local keys, chunk, sync = 10000, 256, "auto"
local base = os.getenv("TMPDIR") or "/tmp"
do
    local i = 1
    while i <= #arg do
        local opt, val = arg[i], arg[i + 1]
        if val == nil then usage(opt .. " needs a value") end
        if opt == "--keys" then keys = tonumber(val)
        elseif opt == "--chunk" then chunk = tonumber(val)
        elseif opt == "--sync" then sync = val
        elseif opt == "--dir" then base = val
        else usage("unknown option " .. opt) end
        i = i + 2
    end
    if not keys or keys < 1 or not chunk or chunk < 1 then usage("--keys and --chunk take numbers") end
end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local root = os.tmpname()
os.remove(root)
root = base .. "/softcxi-bench-" .. root:match("[^/]*$")
assert(sys.mkdir_p(root .. "/keys"))

local function cleanup() os.execute("rm -rf " .. q(root)) end

local function line(who, case, n, secs)
    print(string.format("%s %s %.0f %.2f", who, case, n / secs, secs * 1e6 / n))
    io.stdout:flush()
end

local function run()
    print(string.format("info %s %s %s", type(jit) == "table" and jit.version or _VERSION,
        softcxi._VERSION, root))
    -- a throw-away device, and a user who may make keys of any group
    assert(softcxi.init { path = root .. "/dev", keyfile = root .. "/keys/device.key",
        password = "bench-admin-password", kdf_cost = 10 })
    local hsm = assert(softcxi.open { path = root .. "/dev", keyfile = root .. "/keys/device.key" })
    assert(hsm:logon_pass("ADMIN", "bench-admin-password"))
    assert(hsm:user_add { name = "bench", password = "bench-password", groups = { "*" }, kdf_cost = 10 })
    hsm:logoff()
    assert(hsm:logon_pass("bench", "bench-password"))

    -- 2N keys of one group, made before any clock runs
    local blobs = assert(hsm:bulk_generate(softcxi.FLAG_EXTERNAL,
        { algo = "ec", curve = "P-256", group = "bench" }, 2 * keys, { name_format = "dev-%08d" }))
    hsm:close()

    local s = assert(store.open("file:" .. root .. "/ks", { sync = sync }))
    local function put_range(first, last)
        local t = now()
        for c = first, last, chunk do
            local items = {}
            for i = c, math.min(c + chunk - 1, last) do items[#items + 1] = { blob = blobs[i] } end
            assert(s:put_many(items))
        end
        return now() - t
    end
    line("softcxi", "file_put_many_fresh", keys, put_range(1, keys))
    -- A store of a few hundred thousand keys has every bucket directory and
    -- every name index directory (65,536 of each); a store of N has few.
    -- Make those the next N keys need (untimed) so this measures the steady
    -- state, not directory creation.
    for i = keys + 1, 2 * keys do
        local id = assert(store.id_of(blobs[i]))
        local loc = s:_loc(id)
        assert(sys.mkdir_p(loc.path:match("^(.*)/")))
        for _, m in ipairs(s:_markers(loc, id, assert(softcxi.key_info(blobs[i])))) do
            assert(sys.mkdir_p(m[1]:match("^(.*)/")))
        end
    end
    local c1 = os.clock()
    line("softcxi", "file_put_many", keys, put_range(keys + 1, 2 * keys))
    -- CPU (user + system) per key of that run: where the disk is fast, this is the bound
    print(string.format("info cpu_us_per_key %.1f", (os.clock() - c1) * 1e6 / keys))

    -- the disk's own figure: the same number of files in the same fan-out
    -- (directories made beforehand, as they are for file_put_many), nothing else
    local chunks = {}
    for c = 1, keys, chunk do
        local files = {}
        for i = c, math.min(c + chunk - 1, keys) do
            local h = sys.hash32("raw-" .. i)
            local dir = string.format("%s/raw/%02x/%02x", root, math.floor(h / 16777216),
                math.floor(h / 65536) % 256)
            assert(sys.mkdir_p(dir))
            files[#files + 1] = { dir .. "/k" .. i .. ".blob", blobs[i] }
        end
        chunks[#chunks + 1] = files
    end
    local t = now()
    for _, files in ipairs(chunks) do assert(sys.write_durable_many(files, { sync = sync })) end
    line("raw", "file_durable_writes", keys, now() - t)

    -- random gets over the 2N ids
    local ids = {}
    for i = 1, 2 * keys do ids[i] = assert(store.id_of(blobs[i])) end
    math.randomseed(42)
    local n_get = math.min(20000, 4 * keys)
    t = now()
    for _ = 1, n_get do assert(s:get(ids[math.random(2 * keys)])) end
    line("softcxi", "file_get_" .. (2 * keys), n_get, now() - t)

    t = now()
    local found, cursor = 0, nil
    repeat
        local page
        page, cursor = assert(s:find({ group = "bench" }, cursor, 1000))
        found = found + #page
    until not cursor
    assert(found == 2 * keys, "find found " .. found)
    line("softcxi", "file_find_group", found, now() - t)
    s:close()
end

local ok, err = pcall(run)
cleanup()
if not ok then
    io.stderr:write("store_file.lua: ", tostring(err), "\n")
    os.exit(1)
end
