-- All the example rules at once: policy.combine runs each part's hooks in
-- order; the first denial wins and on_generate amendments carry over.
--
--   policy.load("examples/policies/fleet.lua", { store = store,
--       params = { ["quota.lua"] = { limits = { iot = 10 } } } })
--
-- params: per part file name, that part's params.

local policy = require "softcxi.policy"

local params = ... or {}
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

local parts = {}
for _, file in ipairs { "algorithms.lua", "naming.lua", "expiry.lua", "rsa2048_sunset.lua",
                        "quota.lua" } do
    parts[#parts + 1] = assert(policy.load(dir .. file, { params = params[file] }))
end
return policy.combine(parts, { name = "fleet" })
