-- A naming pattern per group.
--
-- Every key needs a name matching its group's Lua pattern (a bulk run's
-- names each one); a store takes a blob only under its default id,
-- group/name[/specifier], so the id always says what the key is.
--
-- params.patterns replaces the table below: group -> Lua pattern; "*" is
-- for every other group.

local params = ... or {}

local PATTERNS = params.patterns or {
    iot = "^dev%-%d%d%d%d%d%d%d%d$",      -- dev-00000001
    ["*"] = "^[a-z][a-z0-9%-]*$",         -- lower case, digits and dashes
}

local function check(group, name)
    local pattern = PATTERNS[group or ""] or PATTERNS["*"]
    if not pattern then return false, "group '" .. tostring(group) .. "' has no naming rule" end
    if type(name) ~= "string" or name == "" then
        return false, "a key needs a name (group '" .. tostring(group) .. "': " .. pattern .. ")"
    end
    if not name:find(pattern) then
        return false, string.format("name '%s' does not match %s (group '%s')", name, pattern,
            tostring(group))
    end
    return true
end

return {
    name = "naming",

    on_generate = function(t, ctx)
        if ctx.names then
            for i, name in ipairs(ctx.names) do
                local ok, why = check(t.group, name)
                if not ok then return false, "key " .. i .. ": " .. why end
            end
            return true
        end
        return check(t.group, t.name)
    end,

    on_store = function(id, key)
        if not key then return true end
        local ok, why = check(key.group, key.name)
        if not ok then return false, why end
        local want = (key.group or "") .. "/" .. key.name
            .. (key.specifier and ("/" .. key.specifier) or "")
        if id ~= want then
            return false, "store it under its id '" .. want .. "', not '" .. id .. "'"
        end
        return true
    end,
}
