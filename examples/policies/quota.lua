-- A signing quota per key, counted in the key store.
--
-- Every sign, bulk_sign (one per message) and mac takes from the key's
-- counter; once its group's limit is reached the key signs no more until an
-- operator resets the counter (policy.counter(store):reset("sign:" .. id)).
-- The counter lives beside the blobs (softcxi.policy.counter): in a file
-- store under DIR/policy/counters/, in Redis as <prefix>policy:n:sign:<id>,
-- changed atomically, so every process and nginx worker sharing the store
-- shares the count.
--
-- The store: give the policy one when loading it,
--   policy.load("examples/policies/quota.lua", { store = store })
-- or a function returning the store of the moment (OpenResty: one per request),
--   policy.load(file, { store = function() return ngx.ctx.store end })
-- Without a store the hook raises, which denies every signature (EPOLICY).
--
-- params.limits replaces the table below: group -> signatures per key; "*"
-- is for every other group.

local policy = require "softcxi.policy"

local params = ... or {}

local LIMITS = params.limits or {
    iot = 1000,
    ["*"] = 1000000,
}

local SIGNING = { sign = true, bulk_sign = true, mac = true }

return {
    name = "quota",

    on_use = function(key, ctx)
        if not SIGNING[ctx.op] then return true end
        local limit = LIMITS[key.group or ""] or LIMITS["*"]
        if not limit then return true end
        if not ctx.id then error("quota: a key without a name has no counter") end
        local counters = assert(policy.counter(ctx.store))
        local ok, total = counters:take("sign:" .. ctx.id, ctx.count, limit)
        if ok == nil then error("quota: " .. tostring(total)) end
        if not ok then
            return false, string.format("signing quota used up: %d of %d signatures made, %d asked",
                total, limit, ctx.count)
        end
        return true
    end,
}
