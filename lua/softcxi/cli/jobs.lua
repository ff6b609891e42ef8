-- softcxi.cli.jobs: the long jobs over a key store -- provision and rewrap --
-- and store stats.
--
-- Both jobs show progress (a bar on a terminal, plain lines every few
-- seconds otherwise), stop cleanly on Ctrl-C or SIGTERM after the batch in
-- flight is stored, and resume when run again with the same arguments.

local softcxi = require "softcxi"
local sys = require "softcxi.sys"
local util = require "softcxi.cli.util"
local keys = require "softcxi.cli.keys"

local ipairs, pairs, tonumber, tostring, error, pcall, select, math, table =
    ipairs, pairs, tonumber, tostring, error, pcall, select, math, table
local check, die, usage = util.check, util.die, util.usage

local STOP = {} -- raised from a progress callback when a signal came in

local function number_opt(v, name, min, max)
    if v == nil then return nil end
    local n = tonumber(v)
    if not n or n % 1 ~= 0 or n < (min or 0) or (max and n > max) then
        usage("--" .. name .. " must be an integer " .. (max and ("from " .. (min or 0) .. " to " .. max)
            or (">= " .. (min or 0))) .. ", not '" .. tostring(v) .. "'")
    end
    return n
end

local MAX_THREADS = 16 -- the device's limit (SOFTCXI_BULK_MAX_THREADS)

local unpack = table.unpack or unpack -- luacheck: ignore (LuaJIT's global unpack)

local function pack(...)
    return { n = select("#", ...), ... }
end

--- Run job() with SIGINT/SIGTERM turned into a clean stop between batches.
-- Returns job's results, or STOP and the signal's name.
local function stoppable(job)
    sys.trap_signals()
    local res = pack(pcall(job))
    local sig = sys.interrupted()
    sys.untrap_signals()
    if not res[1] then
        if res[2] == STOP then return STOP, sig end
        error(res[2], 0)
    end
    return unpack(res, 2, res.n)
end

local function poll_stop()
    if sys.interrupted() then error(STOP, 0) end
end

-- ---- provision ------------------------------------------------------------------------

local function run_provision(ctx)
    local a = ctx.args
    local count = number_opt(a.count, "count", 0)
    local start = number_opt(a.start, "start", 0) or 1
    local batch = number_opt(a.batch, "batch", 1)
    local threads = number_opt(a.threads, "threads", 1, MAX_THREADS)
    local fmt = a.name
    if not fmt:find("%%[0-9]*d") then
        usage("--name must hold a %d (e.g. 'dev-%08d'), not '" .. fmt .. "'")
    end
    local template = keys.template(ctx)
    if not template.algo then usage("provision: give --algo (or an algo in --template)") end
    template.name = nil
    local store = ctx:store(a.store)
    local hsm = ctx:session()
    local provision = require "softcxi.provision"

    local bar = util.progress("provision", count, { quiet = a.quiet })
    local last_report
    local r, err, code, partial = stoppable(function()
        return provision.run {
            hsm = hsm, store = store, template = template, count = count, start = start,
            name_format = fmt, batch = batch, threads = threads,
            on_progress = function(done, _, rep)
                last_report = rep
                bar.update(done)
                poll_stop()
            end,
        }
    end)
    bar.finish()
    local secs = bar.elapsed()
    if r == STOP then
        local rep = last_report or { generated = 0, stored = 0, skipped = 0 }
        ctx:report({ interrupted = err, generated = rep.generated, stored = rep.stored,
            skipped = rep.skipped, total = count }, function(say)
            say("interrupted (%s): %d keys stored so far, all confirmed; run the same command "
                .. "again to resume", err, rep.stored + rep.skipped)
        end)
        return 130
    end
    if not r then
        local rep = partial or {}
        die(("provision into %s: %s"):format(a.store, tostring(err))
            .. (code and (" (" .. code .. ")") or "")
            .. ("; %d keys confirmed stored, run again to resume"):format(rep.stored or 0))
    end
    local rate = secs > 0 and r.generated / secs or 0
    ctx:report({ store = a.store, total = count, generated = r.generated, stored = r.stored,
        skipped = r.skipped, seconds = secs, keys_per_second = rate }, function(say)
        say("provisioned %d keys into %s in %.1f s: %d generated and stored (%.0f keys/s), "
            .. "%d already there", count, a.store, secs, r.stored, rate, r.skipped)
    end)
end

-- ---- rewrap -------------------------------------------------------------------------------

local function run_rewrap(ctx)
    local a = ctx.args
    local page = number_opt(a.page, "page", 1)
    local threads = number_opt(a.threads, "threads", 1, MAX_THREADS)
    local store = ctx:store(a.store)
    local hsm = ctx:session()
    local total = store:count()
    local rewrap = require "softcxi.rewrap"
    local bar = util.progress("rewrap", total, { quiet = a.quiet })
    local last
    local r, err, code, partial = stoppable(function()
        return rewrap.run {
            hsm = hsm, store = store, page = page, threads = threads,
            on_progress = function(seen, rep)
                last = rep
                bar.update(seen)
                poll_stop()
            end,
        }
    end)
    bar.finish()
    local secs = bar.elapsed()
    local current = check("mbk info", hsm:mbk_info()).current
    if r == STOP then
        local rep = last or { seen = 0, rewrapped = 0 }
        ctx:report({ interrupted = err, seen = rep.seen, rewrapped = rep.rewrapped }, function(say)
            say("interrupted (%s) after %d blobs (%d rewrapped); run the same command again to "
                .. "resume", err, rep.seen, rep.rewrapped)
        end)
        return 130
    end
    if not r then
        local rep = partial or {}
        die(("rewrap of %s: %s (%s); %d blobs rewrapped so far, run again to resume")
            :format(a.store, tostring(err), tostring(code), rep.rewrapped or 0))
    end
    local doc = { store = a.store, mbk = current, seen = r.seen, rewrapped = r.rewrapped,
        current = r.current, conflicts = r.conflicts, skipped = r.skipped, seconds = secs,
        blobs_per_second = secs > 0 and r.seen / secs or 0 }
    ctx:report(doc, function(say)
        say("rewrapped %d of %d blobs in %s to MBK %s in %.1f s (%.0f blobs/s); %d already "
            .. "current, %d changed meanwhile, %d skipped", r.rewrapped, r.seen, a.store, current,
            secs, doc.blobs_per_second, r.current, r.conflicts, r.skipped)
        if r.conflicts + r.skipped > 0 then
            say("some blobs were not rewrapped: run again, and check skipped ones with "
                .. "'softcxi store stats --scan %s'", a.store)
        else
            local older = hsm:mbk_info().older or {}
            if #older > 0 then
                say("every blob is under the current MBK: 'softcxi mbk retire %s' may follow "
                    .. "once every other store is done", older[1])
            end
        end
    end)
    return (r.conflicts + r.skipped > 0) and 1 or 0
end

-- ---- store stats -----------------------------------------------------------------------

local function run_store_stats(ctx)
    local a = ctx.args
    local url = a.url
    local store = ctx:store(url)
    local n = check("store " .. url .. ": count", store:count())
    local doc = { store = url, count = n }
    if store.layout then
        -- a Redis store's recorded layout (docs/stores.md)
        doc.layout = check("store " .. url .. ": layout", store:layout())
    end
    if a.scan then
        local by = { kcv = {}, algo = {}, group = {} }
        local bytes, bad, cursor = 0, 0, nil
        local page = 1000
        repeat
            local ids, nxt, code = store:scan(cursor, page)
            check("store " .. url .. ": scan", ids, nxt, code)
            local blobs = check("store " .. url .. ": get_many", store:get_many(ids))
            for _, id in ipairs(ids) do
                local blob = blobs[id]
                local info = blob and softcxi.key_info(blob)
                if not info then
                    bad = bad + 1
                else
                    bytes = bytes + #blob
                    by.kcv[info.kcv] = (by.kcv[info.kcv] or 0) + 1
                    local algo = info.algo .. (info.curve and (" " .. info.curve) or "")
                        .. (info.size and (" " .. info.size) or "")
                    by.algo[algo] = (by.algo[algo] or 0) + 1
                    local g = info.group or ""
                    by.group[g] = (by.group[g] or 0) + 1
                end
            end
            cursor = nxt
        until not cursor
        doc.blob_bytes, doc.unreadable, doc.by_mbk, doc.by_algo, doc.by_group =
            bytes, bad, by.kcv, by.algo, by.group
    end
    ctx:report(doc, function(say)
        say("store      %s", url)
        say("keys       %d", n)
        if doc.layout then
            say("layout     name_buckets=%d algo_index=%d name_index=%s", doc.layout.name_buckets,
                doc.layout.algo_index, doc.layout.name_index)
        end
        if a.scan then
            say("blob bytes %s (%.0f per key)", util.bytes(doc.blob_bytes),
                n > 0 and doc.blob_bytes / math.max(n - doc.unreadable, 1) or 0)
            if doc.unreadable > 0 then say("unreadable %d (not a key blob)", doc.unreadable) end
            for _, part in ipairs({ { "by MBK", doc.by_mbk }, { "by algo", doc.by_algo },
                                     { "by group", doc.by_group } }) do
                local names = {}
                for k in pairs(part[2]) do names[#names + 1] = k end
                table.sort(names)
                for i, k in ipairs(names) do
                    say("%-10s %s: %d", i == 1 and part[1] or "", k ~= "" and k or "(none)", part[2][k])
                end
            end
        end
    end)
end

-- ---- store migrate ----------------------------------------------------------------------

local function run_store_migrate(ctx)
    local a = ctx.args
    local page = number_opt(a.page, "page", 1) or 1000
    if a.from == a.to then usage("store migrate: --from and --to are the same store") end
    local from, to = ctx:store(a.from), ctx:store(a.to)
    local total = from:count()
    local bar = util.progress("migrate", total, { quiet = a.quiet })
    local r = { seen = 0, copied = 0, skipped = 0, missing = 0 }
    local res, sig = stoppable(function()
        local cursor
        repeat
            local ids, nxt, code = from:scan(cursor, page)
            check("store migrate: scanning " .. a.from, ids, nxt, code)
            local blobs = check("store migrate: reading " .. a.from, from:get_many(ids))
            local items = {}
            for _, id in ipairs(ids) do
                if blobs[id] then
                    items[#items + 1] = { id = id, blob = blobs[id] }
                else
                    r.missing = r.missing + 1 -- deleted meanwhile
                end
            end
            r.seen = r.seen + #ids
            if #items > 0 then
                local stored, skipped, pcode, confirmed = to:put_many(items,
                    { overwrite = a.overwrite or nil, skip_existing = not a.overwrite or nil })
                if not stored then
                    die(("store migrate: writing to %s: %s (%s); %d keys copied so far, run again "
                        .. "to resume"):format(a.to, tostring(skipped), tostring(pcode),
                        r.copied + (confirmed or 0)))
                end
                r.copied = r.copied + stored
                r.skipped = r.skipped + (skipped or 0)
            end
            bar.update(r.seen)
            poll_stop()
            cursor = nxt
        until not cursor
        return r
    end)
    bar.finish()
    local secs = bar.elapsed()
    if res == STOP then
        ctx:report({ interrupted = sig, seen = r.seen, copied = r.copied }, function(say)
            say("interrupted (%s) after %d keys (%d copied); run the same command again to resume",
                sig, r.seen, r.copied)
        end)
        return 130
    end
    ctx:report({ from = a.from, to = a.to, seen = r.seen, copied = r.copied, skipped = r.skipped,
        missing = r.missing, seconds = secs }, function(say)
        say("copied %d of %d keys from %s to %s in %.1f s; %d already there%s", r.copied, r.seen,
            a.from, a.to, secs, r.skipped,
            r.missing > 0 and (", " .. r.missing .. " deleted meanwhile") or "")
    end)
end

-- ---- store upgrade ----------------------------------------------------------------------

local function run_store_upgrade(ctx)
    local a = ctx.args
    local url = a.url
    if not url:match("^redis:") and not url:match("^redis%-cluster:") then
        usage("store upgrade: only redis:// and redis-cluster:// stores have a layout to upgrade")
    end
    local bar = util.progress("upgrade (name sets moved)", nil, { quiet = a.quiet })
    local opts = { upgrade = true, on_upgrade = function(sets) bar.update(sets) end }
    opts.name_buckets = number_opt(a.name_buckets, "name-buckets", 1)
    local s, err, code = require("softcxi.store").open(url, opts)
    bar.finish()
    check("store upgrade " .. url, s, err, code)
    ctx.stores = ctx.stores or {}
    ctx.stores[url .. "#upgrade"] = s        -- closed with the others
    local u = s.upgraded
    ctx:report({ store = url, name_buckets = s.name_buckets, name_sets_moved = u.sets, keys = u.blobs,
        passes = u.passes, not_sets = u.foreign, seconds = bar.elapsed() }, function(say)
        say("store %s: %d name sets moved into %d name index hashes (%d keys in the store) in %.1f s",
            url, u.sets, s.name_buckets, u.blobs, bar.elapsed())
        if u.foreign > 0 then
            say("left alone: %d keys under idx:name: that are not sets (not written by softcxi)", u.foreign)
        end
    end)
end

-- ---- the commands -----------------------------------------------------------------------

return function(p, cmd)
    local pr = cmd(p, "provision", "Generate N external keys from a template into a store.",
        run_provision, [[
Keys are generated on the device (on worker threads) and stored in batches;
ids already in the store are skipped, so re-running resumes an interrupted
job. Ctrl-C stops after the batch in flight is stored.

Examples:
  softcxi --user provisioner provision --algo ec --group iot --count 10000 \
      --name 'dev-%08d' --store file:./keystore
  softcxi provision --template iot.json --count 1000000 --name 'dev-%08d' \
      --store redis://127.0.0.1:6379/0?prefix=keys:]])
    pr:option("--store", "Key store URL."):argname("URL"):count(1)
    pr:option("--count", "Number of keys."):argname("N"):count(1)
    pr:option("--name", "Name pattern with a %d: key i is named NAME:format(start + i - 1).")
        :argname("PATTERN"):count(1)
    pr:option("--start", "First number (default 1)."):argname("N")
    pr:option("--batch", "Keys per batch (default 1000)."):argname("N")
    pr:option("--threads", "Generator threads (default: one per core)."):argname("N")
    keys.template_options(pr, false)

    local rw = cmd(p, "rewrap", "Re-seal every blob of a store under the current MBK.", run_rewrap, [[
After 'mbk rotate' or 'mbk import'. Blobs already current are skipped, so a
re-run resumes; a blob changed meanwhile by another writer is left alone and
counted. Exit status 1 if any blob was not rewrapped.

Example:
  softcxi rewrap --store file:./keystore]])
    rw:option("--store", "Key store URL."):argname("URL"):count(1)
    rw:option("--page", "Blobs per page (default 500)."):argname("N")
    rw:option("--threads", "Device threads re-sealing a page (default: one per core)."):argname("N")

    local st = cmd(p, "store", "Key store inspection.")
    local ss = cmd(st, "stats", "Count the keys of a store (--scan: by MBK, algorithm, group).",
        run_store_stats, "Example:\n  softcxi store stats --scan file:./keystore")
    ss:argument("url", "Key store URL.")
    ss:flag("--scan", "Read every blob's clear attributes (bounded memory).")
    local sm = cmd(st, "migrate", "Copy every blob from one store to another.", run_store_migrate, [[
Streams in pages (bounded memory). Ids already in the target are left alone,
so a re-run resumes; --overwrite replaces them instead. Blobs are copied as
they are: no logon is needed, no key is opened.

Example:
  softcxi store migrate --from file:./keystore --to redis://127.0.0.1:6379/0?prefix=keys:]])
    sm:option("--from", "Source store URL."):argname("URL"):count(1)
    sm:option("--to", "Target store URL."):argname("URL"):count(1)
    sm:option("--page", "Keys per page (default 1000)."):argname("N")
    sm:flag("--overwrite", "Replace blobs already in the target.")
    local su = cmd(st, "upgrade", "Move a Redis store to this version's name index, in place.",
        run_store_upgrade, [[
A Redis store written by a softcxi that kept one Redis set per key name is
refused on open (ELAYOUT) until upgraded. The upgrade moves every name set into
the bucketed name index hashes, atomically set by set: it may be stopped and
run again, nothing is lost. Stop the writers of older softcxi versions first;
run it again afterwards if one wrote meanwhile. Needs no logon.

Example:
  softcxi store upgrade redis://127.0.0.1:6379/0?prefix=keys:]])
    su:argument("url", "Key store URL (redis:// or redis-cluster://).")
    su:option("--name-buckets", "Name index hashes, for a store that has none recorded yet "
        .. "(default 16).")
        :argname("N")
end
