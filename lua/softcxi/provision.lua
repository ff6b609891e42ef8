-- softcxi.provision: the IoT job.  Generate N keys from one template, name
-- them from a pattern, and write them to any store in batches.
--
--   local provision = require "softcxi.provision"
--   local r = assert(provision.run {
--       hsm = hsm, store = store, count = 1000000,
--       template = { algo = "ec", curve = "P-256", group = "iot", usage = { "sign", "verify" } },
--       name_format = "dev-%07d",                 -- key i is named name_format:format(start + i - 1)
--       on_progress = function(done, total, r) ... end,
--   })
--   -- r.generated, r.stored, r.skipped (already in the store), r.batches; r.generated
--   -- may exceed r.stored + failures when ids were stored meanwhile by another writer
--   -- opts.batch: keys per generation job and existence check (default 1000, or the
--   -- store's preferred_batch); opts.piece: keys per put_many call (default the store's
--   -- preferred_piece, else the batch)
--
-- Memory stays flat: at most four batches (default 1000 keys each; a Redis
-- Cluster store's chunk, 16,384 with 256 buckets) are alive: two being
-- generated and two waiting for the store.  A run is resumable: an id
-- already in the store is never written again, and a re-run after a failure
-- generates only the keys missing (the store is asked which ids it has, per
-- batch, until a batch finds none).  Keys are generated on C threads
-- (hsm:bulk_generate_start, two batches at a time) while this thread checks
-- the store and writes the batches before with put_many (pipelined for
-- Redis, group-committed for files): generation and storage overlap.  hsm
-- is busy while a batch is being generated (its other calls raise); run
-- returns, or raises, only after the last job has been collected or
-- cancelled.

local softcxi = require "softcxi"

local type, error, tostring, pairs, pcall = type, error, tostring, pairs, pcall
local string_format = string.format
local math_min = math.min
local table_remove = table.remove

local _M = { _VERSION = softcxi._VERSION }

-- Batches generated at once: two jobs on the session (docs/api.md, bulk_generate_start).
local GEN_AHEAD = 2

local RUN_OPTS = {
    hsm = true, store = true, template = true, count = true, name_format = true, start = true,
    batch = true, piece = true, threads = true, flags = true, on_progress = true,
}

local function need(cond, msg)
    if not cond then error("provision.run: " .. msg, 3) end
end

-- The store id of a key is group/name[/specifier], as softcxi.store.id_of: the parts
-- around the name.
local function id_parts(template)
    return (template.group or "") .. "/", template.specifier and "/" .. template.specifier or ""
end

-- A generation job for names: hsm:bulk_generate_start, or (a session
-- without it) bulk_generate run now behind the same face.
local function start_job(hsm, flags, template, names, threads)
    local opts = { names = names, threads = threads }
    if hsm.bulk_generate_start then
        return hsm:bulk_generate_start(flags, template, #names, opts)
    end
    local blobs, err, code = hsm:bulk_generate(flags, template, #names, opts)
    return { wait = function() return blobs, err, code end, cancel = function() end,
             ready = function() return true end }
end

--- Run a provisioning job; returns a report table, or nil, msg, code,
-- report (report.stored counts keys confirmed stored before the failure).
function _M.run(opts)
    need(type(opts) == "table", "expects an options table")
    for k in pairs(opts) do need(RUN_OPTS[k], "unknown option '" .. tostring(k) .. "'") end
    local hsm, store, template = opts.hsm, opts.store, opts.template
    need(hsm ~= nil and store ~= nil, "hsm and store are required")
    need(type(template) == "table", "template must be a table")
    need(template.name == nil, "name keys with name_format, not template.name")
    local count = opts.count
    need(type(count) == "number" and count >= 0 and count % 1 == 0, "count must be an integer >= 0")
    local fmt = opts.name_format
    need(type(fmt) == "string", "name_format is required (e.g. \"dev-%07d\")")
    local start = opts.start or 1
    -- a store may say what suits it (the cluster store: one chunk, ~64 keys per bucket)
    local batch = opts.batch or store.preferred_batch or 1000
    need(type(batch) == "number" and batch >= 1 and batch % 1 == 0, "batch must be a positive integer")
    local flags = opts.flags or softcxi.FLAG_EXTERNAL
    local on_progress = opts.on_progress

    local id_pre, id_post = id_parts(template)
    local report = { generated = 0, stored = 0, skipped = 0, batches = 0, total = count }
    local gens = {} -- batches being generated, oldest first (b.job: the job, until collected)
    -- Cancel the jobs of gens and drop their batches.
    local function cancel_gens()
        for i = #gens, 1, -1 do
            if gens[i].job then gens[i].job:cancel() end
            gens[i] = nil
        end
    end

    -- Which ids are already stored is asked per batch while the answers find some, and
    -- no longer after a batch of which none was stored (the new part of the store:
    -- asking costs a read per key that finds nothing).  A write that finds an id stored
    -- meanwhile (put_many's skip_existing) turns the asking back on.  So a re-run after a
    -- failure generates only what is missing, and an id is never written twice.
    local checking = true

    -- Batch at key first+1: its names and ids, and (when checking) which ids the store lacks.
    local function prepare(first)
        local n = math_min(batch, count - first)
        local b = { first = first, n = n }
        local names, ids, at = {}, {}, start + first - 1
        for i = 1, n do
            local name = string_format(fmt, at + i)
            names[i], ids[i] = name, id_pre .. name .. id_post
        end
        if not checking then
            b.missing_names, b.missing_ids = names, ids
            return b
        end
        -- exists_many where the store has it (Redis: one EXISTS per bucket), else get_many
        local have, err, code
        if store.exists_many then
            have, err, code = store:exists_many(ids)
        else
            have, err, code = store:get_many(ids)
        end
        if not have then
            b.err = "provision.run: reading batch at key " .. (first + 1) .. ": " .. tostring(err)
            b.code = code
            return b
        end
        local mn, mi = {}, {}
        for i = 1, n do
            if have[ids[i]] == nil then
                mn[#mn + 1], mi[#mi + 1] = names[i], ids[i]
            end
        end
        if #mn == n then checking = false end
        b.missing_names, b.missing_ids = mn, mi
        return b
    end

    -- Start generating batch b's missing keys; false, msg, code if the start fails.
    local function start_batch(b)
        if #b.missing_names == 0 then return true end
        local job, err, code = start_job(hsm, flags, template, b.missing_names, opts.threads)
        if not job then
            return false, "provision.run: generating batch at key " .. (b.first + 1) .. ": "
                .. tostring(err), code
        end
        b.job = job
        return true
    end

    -- Storage runs in pieces (a store's preferred_piece: the Redis store's 1000 keys, else a
    -- whole batch).  GEN_AHEAD batches are generated at once (the session runs a job for
    -- each): when the older one is done, the workers of the next are already at work, so
    -- they never wait for this thread to collect.  Between pieces this thread looks
    -- whether the oldest job is done, collects it and starts the next batch.  At most two
    -- generated batches wait for the store (memory stays flat).
    local piece = opts.piece or math_min(store.preferred_piece or batch, batch)
    need(type(piece) == "number" and piece >= 1 and piece % 1 == 0, "piece must be a positive integer")

    local function body()
        if count == 0 then return report end
        local queue = {}                -- generated batches, oldest first, being stored
        local first = 0                 -- the first key of the next batch to start
        -- A batch that cannot be checked, started or generated ends the run, once the
        -- batches generated before it are stored: deferred holds its error until then.
        local deferred
        local function fill()
            -- check and start batches until GEN_AHEAD are being generated
            while not deferred and #gens < GEN_AHEAD and first < count do
                local b = prepare(first)
                first = first + b.n
                if b.err then
                    deferred = { b.err, b.code }
                    return
                end
                local ok, err, code = start_batch(b)
                if not ok then
                    deferred = { err, code }
                    return
                end
                gens[#gens + 1] = b
            end
        end
        local function collect()
            -- take the oldest generated batch into the queue (its job stays in gens until
            -- wait returns: a raise in wait leaves it to run's cleanup to cancel)
            local b = gens[1]
            b.pos = 1
            local job = b.job
            local blobs, err, code
            if job then blobs, err, code = job:wait() end
            table_remove(gens, 1)
            b.job = nil
            if job then
                if not blobs then
                    -- the batches after it are not stored: no hole is left behind
                    cancel_gens()
                    deferred = { "provision.run: generating batch at key " .. (b.first + 1) .. ": "
                        .. tostring(err), code }
                    return
                end
                report.generated = report.generated + #blobs
                b.blobs = blobs
            end
            queue[#queue + 1] = b
        end
        -- the items of a collected batch, made once the next batch is started
        local function items_of(b)
            local items, blobs = {}, b.blobs
            for i = 1, blobs and #blobs or 0 do items[i] = { id = b.missing_ids[i], blob = blobs[i] } end
            b.items, b.blobs = items, nil
            return items
        end
        fill()
        while gens[1] or queue[1] do
            local g = gens[1]
            if g and (not queue[1] or (#queue < 2 and (not g.job or g.job:ready()))) then
                collect()
                fill()
            end
            local b = queue[1]
            if b then
                local items = b.items or items_of(b)
                local last = math_min(#items, b.pos + piece - 1)
                if last >= b.pos then
                    local part = items
                    if b.pos ~= 1 or last ~= #items then
                        part = {}
                        for i = b.pos, last do part[#part + 1] = items[i] end
                    end
                    -- skip_existing: an id stored meanwhile, or not asked about, is left alone
                    local stored, skipped_or_err, c, confirmed =
                        store:put_many(part, { skip_existing = true })
                    if not stored then
                        report.stored = report.stored + (confirmed or 0)
                        return nil, "provision.run: storing batch at key " .. (b.first + 1) .. ": "
                            .. tostring(skipped_or_err) .. " (" .. report.stored .. " keys confirmed "
                            .. "stored in all; run again to complete)", c, report
                    end
                    report.stored = report.stored + stored
                    if (skipped_or_err or 0) > 0 then
                        report.skipped = report.skipped + skipped_or_err
                        checking = true
                    end
                    b.pos = last + 1
                end
                if b.pos > #items then
                    -- the ids found stored count once the batch is done, with its writes
                    report.skipped = report.skipped + (b.n - #b.missing_names)
                    table_remove(queue, 1)
                    report.batches = report.batches + 1
                    if on_progress then on_progress(b.first + b.n, count, report) end
                end
            end
        end
        if deferred then return nil, deferred[1], deferred[2], report end
        return report
    end

    -- Whatever way body ends (a return, an error, a raise from the store or
    -- on_progress), no job is left running on hsm.
    local r = { pcall(body) }
    cancel_gens()
    if not r[1] then error(r[2], 0) end
    return r[2], r[3], r[4], r[5]
end

return _M
