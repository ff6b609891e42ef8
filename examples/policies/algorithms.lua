-- Allowed algorithms and sizes, per group.
--
-- A key may be made (generated or imported) only with an algorithm and a
-- size or curve listed for its group; a group not listed may make no key.
-- A store accepts only blobs that would pass the same rule, so keys made
-- elsewhere cannot slip in through provisioning.
--
--   softcxi --policy examples/policies/algorithms.lua key generate ...
--   policy.load("examples/policies/algorithms.lua", { params = { allowed = {...} } })
--
-- params.allowed replaces the table below: group -> { algo -> true | { size or curve, ... } }.

local params = ... or {}

local ALLOWED = params.allowed or {
    iot      = { ec = { "P-256", "P-384" }, ed25519 = true },
    payments = { rsa = { 3072, 4096 }, aes = { 256 }, ["hmac-sha256"] = true },
    backend  = { ec = { "P-256", "P-384", "P-521" }, ed25519 = true, aes = { 128, 256 },
                 rsa = { 3072, 4096 } },
}

-- The names the device accepts for a curve, and the defaults it applies.
local CURVES = { prime256v1 = "P-256", secp256r1 = "P-256", secp384r1 = "P-384",
                 secp521r1 = "P-521" }
local DEFAULT_SIZE = { rsa = 2048, aes = 256 }

-- The algorithm and its size or curve as the device will make it.
local function shape(k)
    local algo = k.algo
    if algo == "hmac" then algo = "hmac-" .. (k.hash or "sha256") end
    if algo == "ec" then
        local c = k.curve or "P-256"
        return algo, CURVES[c] or c
    end
    return algo, k.size or DEFAULT_SIZE[algo]
end

local function check(group, algo, detail)
    local g = ALLOWED[group or ""]
    if not g then return false, "group '" .. tostring(group) .. "' may make no keys" end
    local rule = g[algo or ""]
    if rule == true then return true end
    if type(rule) == "table" then
        for _, v in ipairs(rule) do if v == detail then return true end end
        return false, string.format("%s %s is not allowed for group '%s' (allowed: %s)",
            algo, tostring(detail), group, table.concat(rule, ", "))
    end
    return false, string.format("algorithm '%s' is not allowed for group '%s'", tostring(algo),
        group)
end

return {
    name = "algorithms",

    on_generate = function(t, ctx)
        if ctx.op == "key_import" then
            -- The device takes algo, size and curve from the imported data and
            -- only checks the template's when given: ask for them, so the
            -- device enforces what this policy checks.
            if t.algo == nil then return false, "an import must state algo in the template" end
            if t.algo == "ec" and t.curve == nil then
                return false, "an ec import must state the curve"
            end
            if (t.algo == "rsa" or t.algo == "aes") and t.size == nil then
                return false, "an " .. t.algo .. " import must state the size"
            end
        end
        return check(t.group, shape(t))
    end,

    on_store = function(_, key)
        if not key then return true end -- deletions
        return check(key.group, shape(key))
    end,
}
