-- The key service's policy (softcxi.policy): which bearer token may act for
-- which groups, and the rules for the keys it makes.
--
-- Tokens come from params.tokens_file, one per line: "<token> <group>[,<group>...]".
-- Only their SHA-256 is kept; `run` writes the file (mode 0600) with a token for
-- group "iot" and one for group "lab" on the first start.

local softcxi = require "softcxi"

local params = ... or {}

local function hex(s)
    return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local tokens = {}
if params.tokens_file then
    local f = assert(io.open(params.tokens_file, "rb"))
    for line in f:lines() do
        local tok, groups = line:match("^%s*(%S+)%s+(%S+)")
        if tok and tok:sub(1, 1) ~= "#" then
            local list = {}
            for g in groups:gmatch("[^,]+") do list[#list + 1] = g end
            tokens[hex(softcxi.hash_compute("sha256", tok))] = { groups = list }
        end
    end
    f:close()
end

-- Algorithms per group: algo -> true, or the allowed curves / sizes.
local ALLOWED = {
    iot = { ec = { "P-256", "P-384" }, ed25519 = true },
    lab = { ec = { "P-256", "P-384", "P-521" }, ed25519 = true, aes = { 128, 256 },
            ["hmac-sha256"] = true, rsa = { 3072, 4096 } },
}
local DEFAULT = { ec = "P-256", rsa = 2048, aes = 256 }
local CURVES = { prime256v1 = "P-256", secp256r1 = "P-256", secp384r1 = "P-384",
                 secp521r1 = "P-521" }
local NAME = "^[a-z0-9][a-z0-9._-]*$"

return {
    name = "keyservice",
    tokens = tokens, -- sha256 hex of a token -> { groups = { ... } }

    on_generate = function(t)
        local allowed = ALLOWED[t.group or ""]
        if not allowed then return false, "group '" .. tostring(t.group) .. "' may make no keys" end
        local algo = t.algo == "hmac" and ("hmac-" .. (t.hash or "sha256")) or t.algo
        local rule = allowed[algo or ""]
        if rule == nil then
            return false, "algorithm '" .. tostring(algo) .. "' is not allowed in group '" .. t.group .. "'"
        end
        if rule ~= true then
            local v = algo == "ec" and (CURVES[t.curve] or t.curve or DEFAULT.ec)
                or (t.size or DEFAULT[algo])
            local ok = false
            for _, x in ipairs(rule) do ok = ok or x == v end
            if not ok then
                return false, string.format("%s %s is not allowed in group '%s' (allowed: %s)", algo,
                    tostring(v), t.group, table.concat(rule, ", "))
            end
        end
        if type(t.name) ~= "string" or not t.name:find(NAME) then
            return false, "a key needs a name matching " .. NAME
        end
        return true
    end,

    on_store = function(id, key)
        if key and not id:find("^" .. (key.group or ""):gsub("%p", "%%%0") .. "/") then
            return false, "a key of group '" .. tostring(key.group) .. "' is stored under '"
                .. tostring(key.group) .. "/...'"
        end
        return true
    end,
}
