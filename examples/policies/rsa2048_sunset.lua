-- No RSA-2048 after a date.
--
-- From the cut-off on, no RSA-2048 key is generated or imported, and the
-- existing ones may no longer sign or encrypt; they may still verify and
-- decrypt, so what they protected stays readable while it is migrated.
-- (NIST SP 800-131A rev. 2 ends 112-bit security, RSA-2048, for protection
-- after 2030.)
--
-- params.cutoff: Unix seconds (default 2030-01-01T00:00:00Z).  The time is
-- ctx.now: the policy's clock (policy.load(file, { clock = fn })), os.time by
-- default.

local params = ... or {}

local CUTOFF = params.cutoff or 1893456000 -- 2030-01-01T00:00:00Z
local DAY = os.date("!%Y-%m-%d", CUTOFF)

local STILL_ALLOWED = { verify = true, decrypt = true }

return {
    name = "rsa2048-sunset",

    on_generate = function(t, ctx)
        if ctx.now < CUTOFF then return true end
        if ctx.op == "key_import" and (t.algo == nil or (t.algo == "rsa" and t.size == nil)) then
            -- the key's size comes from the data: have the device check it
            return false, "since " .. DAY .. " an import must state algo (and size for rsa)"
        end
        if t.algo == "rsa" and (t.size == nil or t.size == 2048) then
            return false, "no RSA-2048 keys since " .. DAY .. ": use 3072 bits or more"
        end
        return true
    end,

    on_use = function(key, ctx)
        if ctx.now < CUTOFF or key.algo ~= "rsa" or key.size ~= 2048 then return true end
        if STILL_ALLOWED[ctx.op] then return true end
        return false, "RSA-2048 may not " .. ctx.op .. " since " .. DAY
            .. " (verify and decrypt only)"
    end,
}
