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

    local cursor
    repeat
        -- a store that reads the values while it scans (Redis) hands them over; else a
        -- get_many of the page
        local ids, blobs, nxt, code
        if store.scan_blobs then
            ids, blobs, nxt = store:scan_blobs(cursor, page)
            if not ids then return nil, "rewrap.run: scan: " .. tostring(blobs), nxt, r end
        else
            ids, nxt, code = store:scan(cursor, page)
            if not ids then
                return nil, "rewrap.run: scan: " .. tostring(nxt), code, r
            end
            local errs
            blobs, errs = store:get_many(ids)
            if not blobs then
                return nil, "rewrap.run: get_many: " .. tostring(errs), "EIO", r
            end
        end
        local items = {}
        for _, id in ipairs(ids) do
            local old = blobs[id]
            r.seen = r.seen + 1
            if old == nil then
                r.skipped = r.skipped + 1 -- deleted meanwhile, or not a blob
            else
                local new, changed, c = hsm:key_rewrap(old)
                if not new then
                    -- a blob of a retired or foreign MBK stays as it is
                    if c == "EMBK" or c == "EACCESS" or c == "ETAMPER" or c == "EFORMAT" then
                        r.skipped = r.skipped + 1
                    else
                        return nil, "rewrap.run: '" .. id .. "': " .. tostring(changed), c, r
                    end
                elseif not changed then
                    r.current = r.current + 1
                else
                    items[#items + 1] = { id = id, blob = new, if_match = old }
                end
            end
        end
        if #items > 0 then
            -- one pipelined batch per page; a refused compare-and-set fails alone
            local stored, err, pc, confirmed = store:put_many(items)
            if stored then
                r.rewrapped = r.rewrapped + stored
            elseif pc == "ECONFLICT" or pc == "ENOTFOUND" then
                r.rewrapped = r.rewrapped + (confirmed or 0)
                r.conflicts = r.conflicts + #items - (confirmed or 0)
            else
                r.rewrapped = r.rewrapped + (confirmed or 0)
                return nil, "rewrap.run: writing: " .. tostring(err), pc, r
            end
        end
        if on_progress then on_progress(r.seen, r) end
        cursor = nxt
    until not cursor
    return r
end

return _M
