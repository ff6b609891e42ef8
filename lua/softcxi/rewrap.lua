-- softcxi.rewrap: after an MBK rotation, move every blob of a store to the
-- current MBK.
--
--   local rewrap = require "softcxi.rewrap"
--   local r = assert(rewrap.run { hsm = hsm, store = store,
--       on_progress = function(seen, r) ... end })
--   -- r.seen, r.rewrapped, r.current (already under the current MBK),
--   -- r.conflicts (changed by someone else meanwhile), r.skipped
--
-- The store is walked with scan() in pages (memory stays flat; scan_blobs where the store
-- has it, which returns the values scan read anyway).  A page is re-sealed by the device
-- in one call (hsm:key_rewrap_many, on C threads: the keys never leave C) and written
-- back with compare-and-set per blob (old value expected), so a blob replaced meanwhile
-- by another writer is left alone and counted: swap_later where the store has it (Redis:
-- arrays, no table per blob), else put_many with if_match.  Blobs already under the
-- current MBK are skipped, so a run is resumable: run it again after any failure.  When
-- it reports no failures, the old MBK can be retired (hsm:mbk_retire).

local softcxi = require "softcxi"

local type, error, tostring, pairs = type, error, tostring, pairs

local _M = { _VERSION = softcxi._VERSION }

local RUN_OPTS = { hsm = true, store = true, page = true, on_progress = true, threads = true }

-- Codes of a blob left as it is (a retired or foreign MBK, another group, damage): counted
-- as skipped.  Any other code stops the run, naming the blob.
local SKIP = { EMBK = true, EACCESS = true, ETAMPER = true, EFORMAT = true }

local K = 0x4B -- a blob's first byte; key_rewrap_many's codes and "current" never start so

--- Returns a report, or nil, msg, code, report when the store or the device
-- fails (the report says how far it got).  opts.threads: the device's worker threads
-- per page (default 0: one per online CPU).
function _M.run(opts)
    if type(opts) ~= "table" then error("rewrap.run: expects an options table", 2) end
    for k in pairs(opts) do
        if not RUN_OPTS[k] then error("rewrap.run: unknown option '" .. tostring(k) .. "'", 2) end
    end
    local hsm, store = opts.hsm, opts.store
    if hsm == nil or store == nil then error("rewrap.run: hsm and store are required", 2) end
    local page = opts.page or 1000
    local threads = opts.threads or 0
    local on_progress = opts.on_progress
    local r = { seen = 0, rewrapped = 0, current = 0, conflicts = 0, skipped = 0 }
    local key_rewrap, key_rewrap_many = hsm.key_rewrap, hsm.key_rewrap_many
    local swap_later = store.swap_later

    -- A page read: ids, olds (olds[i] the blob of ids[i], false when it is gone or not a
    -- blob), next cursor | nil, msg, code.  A store that reads the values while it scans
    -- (Redis) hands them over; else a get_many of the page.
    local function fetch(cursor)
        if store.scan_blobs then
            local ids, olds, nxt = store:scan_blobs(cursor, page)
            if not ids then return nil, "rewrap.run: scan: " .. tostring(olds), nxt end
            return ids, olds, nxt
        end
        local ids, nxt, code = store:scan(cursor, page)
        if not ids then return nil, "rewrap.run: scan: " .. tostring(nxt), code end
        local blobs, errs = store:get_many(ids)
        if not blobs then return nil, "rewrap.run: get_many: " .. tostring(errs), "EIO" end
        local olds = {}
        for i = 1, #ids do olds[i] = blobs[ids[i]] or false end
        return ids, olds, nxt
    end

    -- The device's answers for olds[1..n]: results[i] a new blob, "current" or a code.
    local function reseal_all(olds, n)
        local list, idx = olds, nil
        for i = 1, n do
            if not olds[i] then -- deleted meanwhile, or not a blob: the device skips it
                list, idx = {}, {}
                for j = 1, n do
                    if olds[j] then
                        list[#list + 1] = olds[j]
                        idx[#idx + 1] = j
                    end
                end
                break
            end
        end
        local res
        if key_rewrap_many then
            local msg, code
            res, msg, code = key_rewrap_many(hsm, list, #list, threads)
            if not res then return nil, msg, code end
        else
            res = {}
            for i = 1, #list do
                local new, changed, c = key_rewrap(hsm, list[i])
                if not new then
                    res[i] = c or "EIO"
                else
                    res[i] = changed and new or "current"
                end
            end
        end
        if not idx then return res end
        local out = {}
        for i = 1, n do out[i] = "gone" end
        for j = 1, #idx do out[idx[j]] = res[j] end
        return out
    end

    -- A page re-sealed: its write { n, seen, current, skipped [, send, finish | items] }
    -- (commands built, not sent, where the store can) | nil, msg, code, w (the device
    -- failed: w counts the blobs before the one that failed).
    local function reseal(ids, olds)
        local m = #ids
        local w = { n = 0, seen = 0, current = 0, skipped = 0 }
        local res, msg, code = reseal_all(olds, m)
        if not res then return nil, "rewrap.run: " .. tostring(msg), code, w end
        local news, n, current, skipped = {}, 0, 0, 0
        for i = 1, m do
            local x = res[i]
            if x:byte(1) == K then
                n = n + 1
                news[i] = x
            else
                news[i] = false
                if x == "current" then
                    current = current + 1
                elseif x == "gone" or SKIP[x] then
                    skipped = skipped + 1 -- deleted meanwhile, not a blob, or left as it is
                else
                    -- the device's own message (once more, alone: a transient failure
                    -- such as ENOMEM may pass now, and then the blob goes on)
                    local new, changed, c = key_rewrap(hsm, olds[i])
                    if new and changed then
                        n = n + 1
                        news[i] = new
                    elseif new then
                        current = current + 1
                    elseif SKIP[c] then
                        skipped = skipped + 1
                    else
                        w.seen, w.current, w.skipped = i - 1, current, skipped
                        return nil, "rewrap.run: '" .. ids[i] .. "': " .. tostring(changed), c, w
                    end
                end
            end
        end
        w.n, w.seen, w.current, w.skipped = n, m, current, skipped
        if n > 0 then
            if swap_later then
                local send, finish, c = swap_later(store, ids, olds, news, m)
                if not send then
                    w.n, w.seen, w.current, w.skipped = 0, 0, 0, 0
                    return nil, "rewrap.run: " .. tostring(finish), c, w
                end
                w.send, w.finish = send, finish
            else
                local items, k = {}, 0
                for i = 1, m do
                    if news[i] then
                        k = k + 1
                        items[k] = { id = ids[i], blob = news[i], if_match = olds[i] }
                    end
                end
                w.items = items
                if store.put_many_later then w.send, w.finish = store:put_many_later(items) end
            end
        end
        return w
    end

    -- Settle a page's write w: its counts into r, then on_progress.  true | nil, msg, code
    -- when the write failed other than by refused compare-and-sets.
    local function settle(w)
        local stored, err, pc, confirmed
        if w.finish then
            stored, err, pc, confirmed = w.finish()
        elseif w.n > 0 then
            stored, err, pc, confirmed = store:put_many(w.items)
        else
            stored = 0
        end
        r.seen, r.current, r.skipped = r.seen + w.seen, r.current + w.current, r.skipped + w.skipped
        if stored then
            r.rewrapped = r.rewrapped + stored
        elseif pc == "ECONFLICT" or pc == "ENOTFOUND" then
            -- a refused compare-and-set fails alone
            r.rewrapped = r.rewrapped + (confirmed or 0)
            r.conflicts = r.conflicts + w.n - (confirmed or 0)
        else
            r.rewrapped = r.rewrapped + (confirmed or 0)
            return nil, "rewrap.run: writing: " .. tostring(err), pc
        end
        if on_progress then on_progress(r.seen, r) end
        return true
    end

    -- A failure, after settling the write in flight w (the report counts it).
    local function fail(w, msg, code)
        if w then
            local ok, m2, c2 = settle(w)
            if not ok then msg, code = msg .. "; and " .. m2, code or c2 end
        end
        return nil, msg, code, r
    end

    -- Page k's write goes out once page k+1 is read (so that the read does not wait behind
    -- it in Redis), and page k+1 is re-sealed while Redis runs it.
    local ids, olds, nxt = fetch(nil)
    if not ids then return fail(nil, olds, nxt) end
    local w, msg, code, part = reseal(ids, olds)
    if not w then
        r.seen, r.current, r.skipped = part.seen, part.current, part.skipped
        return nil, msg, code, r
    end
    while true do
        local nids, nolds, nnxt
        if nxt then
            nids, nolds, nnxt = fetch(nxt)
            if not nids then return fail(w, nolds, nnxt) end
        end
        if w.send then w.send() end
        local nw
        if nids then
            nw, msg, code, part = reseal(nids, nolds)
            if not nw then
                local _, m, c = fail(w, msg, code)
                r.seen, r.current, r.skipped = r.seen + part.seen, r.current + part.current,
                    r.skipped + part.skipped
                return nil, m, c, r
            end
        end
        local ok, m, c = settle(w)
        if not ok then
            -- the next page's write is built: it goes too, and counts (or fails as well)
            if nw then
                local ok2, m2 = settle(nw)
                if not ok2 then m = m .. "; and " .. m2 end
            end
            return nil, m, c, r
        end
        if not nids then break end
        w, nxt = nw, nnxt
    end
    return r
end

return _M
