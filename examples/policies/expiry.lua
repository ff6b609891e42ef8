-- Mandatory expiry: a maximum lifetime per group.
--
-- A key made without an expiry gets one (now + the group's lifetime); an
-- expiry past that, or already past, is refused.  The expiry is the
-- template's `expiry` attribute (Unix seconds), bound into the blob: the
-- device itself refuses the key from that second on, policy or not.  A key
-- without an expiry (made before this policy) may still verify, nothing
-- else.
--
-- params.max_days replaces the table below: group -> days; "*" is for every
-- other group.

local params = ... or {}
local DAY = 86400

local MAX_DAYS = params.max_days or {
    iot = 5 * 365,
    payments = 365,
    ["*"] = 90,
}

local VERIFY_ONLY = { verify = true, mac_verify = true }

local function max_lifetime(group)
    local days = MAX_DAYS[group or ""] or MAX_DAYS["*"]
    return days and days * DAY, days
end

return {
    name = "expiry",

    on_generate = function(t, ctx)
        local max, days = max_lifetime(t.group)
        if not max then return false, "group '" .. tostring(t.group) .. "' has no lifetime" end
        if t.expiry == nil or t.expiry == 0 then
            t.expiry = ctx.now + max
            return t -- amended: the device seals this expiry into the blob
        end
        if type(t.expiry) ~= "number" then return true end -- the device says EINVAL
        if t.expiry <= ctx.now then
            return false, "expiry " .. os.date("!%Y-%m-%d %H:%M:%S", t.expiry) .. " UTC is past"
        end
        if t.expiry > ctx.now + max then
            return false, string.format("expiry %s UTC is beyond the %d-day lifetime of group '%s'",
                os.date("!%Y-%m-%d", t.expiry), days, tostring(t.group))
        end
        return true
    end,

    on_use = function(key, ctx)
        if (key.expiry == nil or key.expiry == 0) and not VERIFY_ONLY[ctx.op] then
            return false, "a key without an expiry may only verify"
        end
        return true
    end,
}
