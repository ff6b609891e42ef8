-- softcxi.cli.util: what every sub-command of the `softcxi` command shares:
-- failing with one line on stderr, reading and atomically writing files,
-- passwords from a file, the environment or a terminal, JSON and plain
-- output, dates, and the progress display of the long jobs.

local sys = require "softcxi.sys"
local cjson = require "cjson"

local tostring, tonumber, error, ipairs, setmetatable, getmetatable =
    tostring, tonumber, error, ipairs, setmetatable, getmetatable
local io, os, string, table, math = io, os, string, table, math

local _M = {}

-- ---- failing -------------------------------------------------------------

local FAIL_MT = { __tostring = function(e) return e.msg end }

--- Stop the command: msg goes to stderr as one line, the exit status is
-- status (1, a failure, unless said).
function _M.die(msg, status)
    error(setmetatable({ msg = msg, status = status or 1 }, FAIL_MT), 0)
end

--- A usage error: exit status 2.
function _M.usage(msg)
    _M.die(msg, 2)
end

function _M.is_failure(e)
    return getmetatable(e) == FAIL_MT
end

--- check(what, v, err, code): v, or stop with "what: err (code)".
function _M.check(what, v, err, code)
    if v == nil then
        local msg = tostring(err)
        if code and not msg:find(code, 1, true) then msg = msg .. " (" .. tostring(code) .. ")" end
        _M.die(what .. ": " .. msg)
    end
    return v
end

-- ---- files ---------------------------------------------------------------

--- Read a whole file ("-": standard input).
function _M.read_file(path, what)
    if path == "-" then return io.stdin:read("*a") or "" end
    local f, err = io.open(path, "rb")
    if not f then _M.die((what or "reading") .. ": cannot open " .. err) end
    local data = f:read("*a")
    f:close()
    if not data then _M.die((what or "reading") .. ": cannot read " .. path) end
    return data
end

function _M.exists(path)
    local f = io.open(path, "rb")
    if f then f:close() return true end
    return false
end

--- Write data to path all or nothing: into a temp file beside it (mode
-- 0600), fsynced, then renamed over it; a failure leaves no partial file
-- behind.  "-" is standard output.
function _M.write_file(path, data, what)
    what = what or "writing"
    if path == "-" then
        io.stdout:write(data)
        io.stdout:flush()
        return
    end
    -- A device or a FIFO (/dev/null, /dev/stderr, a pipe) is written to, never replaced:
    -- write_durable renames a temp file onto the name, which would leave a regular file
    -- where the device was (run as root, `--out /dev/null` replaced /dev/null itself).
    local st = sys.stat(path)
    if st and st.type == "other" then
        local f, err = io.open(path, "wb")
        local ok = f and f:write(data)
        if f then
            local closed, cerr = f:close()
            if ok and not closed then ok, err = nil, cerr end
        end
        if not ok then _M.die(what .. ": cannot write " .. path .. " (" .. tostring(err) .. ")") end
        return
    end
    local ok, err = sys.write_durable(path, data)
    if not ok then _M.die(what .. ": cannot write " .. path .. " (" .. tostring(err) .. ")") end
end

-- ---- passwords ------------------------------------------------------------

local function first_line(s)
    return (s:match("^([^\r\n]*)"))
end

local function stdin_is_terminal()
    return sys.isatty(0)
end

--- Prompt on the terminal without echo; nil when there is no terminal.
function _M.prompt_secret(prompt)
    local tty = io.open("/dev/tty", "r+")
    if not tty then return nil end
    tty:write(prompt)
    tty:flush()
    os.execute("stty -echo </dev/tty 2>/dev/null")
    local line = tty:read("*l")
    os.execute("stty echo </dev/tty 2>/dev/null")
    tty:write("\n")
    tty:close()
    return line
end

--- A password: from file (its first line), else the environment variable
-- env, else a prompt on the terminal (twice when confirm).  what names it
-- in messages, never the password itself.
function _M.password(what, file, env, confirm)
    if file then
        local pw = first_line(_M.read_file(file, what .. ": password file"))
        if pw == "" then _M.die(what .. ": the password file " .. file .. " is empty") end
        return pw
    end
    local pw = env and os.getenv(env)
    if pw and pw ~= "" then return pw end
    if not stdin_is_terminal() then
        _M.die(what .. ": no password: give a password file" .. (env and (", set " .. env) or "")
            .. " or run on a terminal")
    end
    pw = _M.prompt_secret(what .. " password: ")
    if not pw or pw == "" then _M.die(what .. ": no password given") end
    if confirm then
        local again = _M.prompt_secret(what .. " password again: ")
        if again ~= pw then _M.die(what .. ": the passwords differ") end
    end
    return pw
end

--- n passwords for share files: the lines of file, else the environment
-- (SOFTCXI_SHARE_PASSWORD_1 .. _n), else prompts.
function _M.share_passwords(n, file, what, confirm)
    local pws = {}
    if file then
        for line in (_M.read_file(file, "share passwords") .. "\n"):gmatch("([^\r\n]*)\r?\n") do
            if line ~= "" then pws[#pws + 1] = line end
        end
        if #pws < n then
            _M.die(("share passwords: %s has %d password line(s), %d needed"):format(file, #pws, n))
        end
        return pws
    end
    -- for scripts: SOFTCXI_SHARE_PASSWORD_1 .. _n, all of them
    for i = 1, n do pws[i] = os.getenv("SOFTCXI_SHARE_PASSWORD_" .. i) end
    if #pws == n then return pws end
    pws = {}
    if not stdin_is_terminal() then
        _M.die("share passwords: give --share-passwords FILE (one line per share), set "
            .. "SOFTCXI_SHARE_PASSWORD_1.." .. n .. ", or run on a terminal")
    end
    for i = 1, n do
        pws[i] = _M.password(what(i), nil, nil, confirm)
    end
    return pws
end

-- ---- values ---------------------------------------------------------------

function _M.split(s)
    local t = {}
    if s == nil then return t end
    for part in tostring(s):gmatch("[^,]+") do
        part = part:match("^%s*(.-)%s*$")
        if part ~= "" then t[#t + 1] = part end
    end
    return t
end

local floor = math.floor

local function days_from_civil(y, m, d) -- days since 1970-01-01, proleptic Gregorian
    y = m <= 2 and y - 1 or y
    local era = floor((y >= 0 and y or y - 399) / 400)
    local yoe = y - era * 400
    local doy = floor((153 * (m + (m > 2 and -3 or 9)) + 2) / 5) + d - 1
    local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
    return era * 146097 + doe - 719468
end

--- A date for --expiry: Unix seconds, YYYY-MM-DD[THH:MM[:SS][Z]] (UTC), or
-- +N[d|h|m|s|y] from now.  Returns seconds or nil, message.
function _M.parse_time(s, now)
    now = now or os.time()
    if s:match("^%d+$") then return tonumber(s) end
    local n, unit = s:match("^%+(%d+)([smhdy]?)$")
    if n then
        local mult = ({ s = 1, m = 60, h = 3600, d = 86400, y = 365 * 86400, [""] = 86400 })[unit]
        return now + tonumber(n) * mult
    end
    local y, mo, d, rest = s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)(.*)$")
    if y then
        local hh, mm, ss = 0, 0, 0
        if rest ~= "" then
            local h2, m2, s2 = rest:match("^[T ](%d%d):(%d%d):?(%d*)Z?$")
            if not h2 then return nil, "expected YYYY-MM-DD[THH:MM[:SS]]" end
            hh, mm, ss = tonumber(h2), tonumber(m2), tonumber(s2) or 0
        end
        y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
        if mo < 1 or mo > 12 or d < 1 or d > 31 or hh > 23 or mm > 59 or ss > 60 then
            return nil, "not a date"
        end
        return days_from_civil(y, mo, d) * 86400 + hh * 3600 + mm * 60 + ss
    end
    return nil, "expected Unix seconds, YYYY-MM-DD[THH:MM[:SS]] or +N[d|h|m|s|y]"
end

function _M.iso_time(t)
    if not t or t == 0 then return "never" end
    return os.date("!%Y-%m-%dT%H:%M:%SZ", t)
end

function _M.hex(s)
    return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

--- Standard base64 (RFC 4648, with padding).
function _M.base64(s)
    local out, n = {}, #s
    for i = 1, n, 3 do
        local a, b, c = s:byte(i, i + 2)
        local v = a * 65536 + (b or 0) * 256 + (c or 0)
        local c1, c2 = floor(v / 262144) % 64, floor(v / 4096) % 64
        local c3, c4 = floor(v / 64) % 64, v % 64
        out[#out + 1] = B64:sub(c1 + 1, c1 + 1) .. B64:sub(c2 + 1, c2 + 1)
            .. (b and B64:sub(c3 + 1, c3 + 1) or "=") .. (c and B64:sub(c4 + 1, c4 + 1) or "=")
    end
    return table.concat(out)
end

--- Byte counts the way people read them.
function _M.bytes(n)
    local units = { "B", "KiB", "MiB", "GiB", "TiB" }
    local i = 1
    while n >= 1024 and i < #units do n = n / 1024; i = i + 1 end
    return i == 1 and string.format("%d B", n) or string.format("%.1f %s", n, units[i])
end

-- ---- output ---------------------------------------------------------------

_M.json_null = cjson.null
_M.json_array = cjson.empty_array_mt

--- Mark t as a JSON array even when it is empty.
function _M.array(t)
    return setmetatable(t or {}, cjson.array_mt)
end

function _M.json(v)
    return cjson.encode(v)
end

function _M.json_decode(s)
    local ok, v = pcall(cjson.decode, s)
    if not ok then return nil, tostring(v) end
    return v
end

--- Print rows as aligned columns (all values strings or numbers).
function _M.table_print(out, header, rows)
    local widths = {}
    for i, h in ipairs(header) do widths[i] = #h end
    for _, row in ipairs(rows) do
        for i = 1, #header do
            local v = tostring(row[i] == nil and "" or row[i])
            row[i] = v
            if #v > widths[i] then widths[i] = #v end
        end
    end
    local function line(cells)
        local parts = {}
        for i = 1, #header do
            local v = cells[i]
            parts[i] = i == #header and v or v .. string.rep(" ", widths[i] - #v)
        end
        out(table.concat(parts, "  "))
    end
    line(header)
    for _, row in ipairs(rows) do line(row) end
end

-- ---- progress ---------------------------------------------------------------

local function clock_str(s)
    if s ~= s or s == math.huge or s < 0 then return "--:--" end
    s = math.floor(s + 0.5)
    local h, m = floor(s / 3600), floor((s % 3600) / 60)
    if h > 0 then return string.format("%d:%02d:%02d", h, m, s % 60) end
    return string.format("%d:%02d", m, s % 60)
end
_M.clock_str = clock_str

--- A progress display for a job of total units (nil: unknown).  On a
-- terminal (stderr) a bar redrawn in place at most 10 times a second;
-- otherwise one plain line every `every` seconds (default 5).  quiet: no
-- output at all.  update(done [, note]) and finish() return nothing.
function _M.progress(label, total, opts)
    opts = opts or {}
    local tty = not opts.plain and sys.isatty(2)
    local t0 = sys.monotonic()
    local last, drawn = t0, false
    local every = opts.every or 5
    local p = {}
    local quiet = opts.quiet

    local function text(done, note, width)
        local el = sys.monotonic() - t0
        local rate = el > 0 and done / el or 0
        local s
        if total and total > 0 then
            local frac = math.min(done / total, 1)
            local eta = rate > 0 and (total - done) / rate or math.huge
            local stats = string.format(" %3d%% %d/%d  %.0f/s  ETA %s", math.floor(frac * 100),
                done, total, rate, clock_str(eta))
            if width then
                local barw = math.max(10, width - #label - #stats - 4 - (note and #note + 2 or 0))
                local fill = math.floor(frac * barw)
                s = label .. " [" .. string.rep("#", fill) .. string.rep(".", barw - fill) .. "]" .. stats
            else
                s = label .. ":" .. stats
            end
        else
            s = string.format("%s: %d  %.0f/s  %s elapsed", label, done, rate, clock_str(el))
        end
        if note then s = s .. "  " .. note end
        return s
    end

    function p.update(done, note)
        if quiet then return end
        local now = sys.monotonic()
        if tty then
            if now - last < 0.1 and not (total and done >= total) then return end
            last = now
            io.stderr:write("\r", text(done, note, 78), "\27[K")
            drawn = true
        elseif now - last >= every then
            last = now
            io.stderr:write(text(done, note), "\n")
        end
        io.stderr:flush()
    end

    function p.finish()
        if quiet then return end
        if tty and drawn then io.stderr:write("\n") end
        io.stderr:flush()
    end

    function p.elapsed()
        return sys.monotonic() - t0
    end

    return p
end

return _M
