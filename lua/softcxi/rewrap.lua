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
-- has it, which returns the values scan read anyway).  Each blob
-- is re-sealed by the device (hsm:key_rewrap: the key never leaves C) and
-- a page is written back in one put_many with compare-and-set per item
-- (if_match = old), so a blob replaced meanwhile by another writer is left
-- alone and counted.  Blobs
-- already under the current MBK are skipped, so a run is resumable: run it
-- again after any failure.  When it reports no failures, the old MBK can be
-- retired (hsm:mbk_retire).

local softcxi = require "softcxi"

local type, error, tostring, pairs = type, error, tostring, pairs

local _M = { _VERSION = softcxi._VERSION }

local RUN_OPTS = { hsm = true, store = true, page = true, on_progress = true }

--- Returns a report, or nil, msg, code, report when the store or the device
-- fails (the report says how far it got).
function _M.run(opts)
    if type(opts) ~= "table" then error("rewrap.run: expects an options table", 2) end
    for k in pairs(opts) do
        if not RUN_OPTS[k] then error("rewrap.run: unknown option '" .. tostring(k) .. "'", 2) end
    end
    local hsm, store = opts.hsm, opts.store
    if hsm == nil or store == nil then error("rewrap.run: hsm and store are required", 2) end
    local page = opts.page or 1000
    local on_progress = opts.on_progress
    local r = { seen = 0, rewrapped = 0, current = 0, conflicts = 0, skipped = 0 }
    local key_rewrap = hsm.key_rewrap

    -- A page read: ids, { [id] = blob }, next cursor | nil, msg, code.  A store that reads
    -- the values while it scans (Redis) hands them over; else a get_many of the page.
    local function fetch(cursor)
        if store.scan_blobs then
            local ids, blobs, nxt = store:scan_blobs(cursor, page)
            if not ids then return nil, "rewrap.run: scan: " .. tostring(blobs), nxt end
            return ids, blobs, nxt
        end
        local ids, nxt, code = store:scan(cursor, page)
        if not ids then return nil, "rewrap.run: scan: " .. tostring(nxt), code end
        local blobs, errs = store:get_many(ids)
        if not blobs then return nil, "rewrap.run: get_many: " .. tostring(errs), "EIO" end
        return ids, blobs, nxt
    end

    -- A page re-sealed: its write { items, n, seen, current, skipped [, send, finish] }
    -- (commands built, not sent, where the store has put_many_later) | nil, msg, code, w
    -- (the device failed: w counts the blobs before the one that failed).
    local function reseal(ids, blobs)
        local items, n = {}, 0
        local w = { items = items, n = 0, seen = 0, current = 0, skipped = 0 }
        for i = 1, #ids do
            local id = ids[i]
            local old = blobs[id]
            if old == nil then
                w.skipped = w.skipped + 1 -- deleted meanwhile, or not a blob
            else
                local new, changed, c = key_rewrap(hsm, old)
                if not new then
                    -- a blob of a retired or foreign MBK stays as it is
                    if c == "EMBK" or c == "EACCESS" or c == "ETAMPER" or c == "EFORMAT" then
                        w.skipped = w.skipped + 1
                    else
                        w.seen = i - 1
                        return nil, "rewrap.run: '" .. id .. "': " .. tostring(changed), c, w
                    end
                elseif not changed then
                    w.current = w.current + 1
                else
                    n = n + 1
                    items[n] = { id = id, blob = new, if_match = old }
                end
            end
        end
        w.n, w.seen = n, #ids
        if n > 0 and store.put_many_later then
            w.send, w.finish = store:put_many_later(items)
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
    local ids, blobs, nxt = fetch(nil)
    if not ids then return fail(nil, blobs, nxt) end
    local w, msg, code, part = reseal(ids, blobs)
    if not w then
        r.seen, r.current, r.skipped = part.seen, part.current, part.skipped
        return nil, msg, code, r
    end
    while true do
        local nids, nblobs, nnxt
        if nxt then
            nids, nblobs, nnxt = fetch(nxt)
            if not nids then return fail(w, nblobs, nnxt) end
        end
        if w.send then w.send() end
        local nw
        if nids then
            nw, msg, code, part = reseal(nids, nblobs)
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
