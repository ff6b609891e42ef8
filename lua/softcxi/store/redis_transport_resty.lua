-- softcxi.store.redis_transport_resty: the Redis stores' transport inside nginx, over
-- lua-resty-redis cosockets (require "resty.redis", OpenResty's name; Debian installs it
-- as "nginx.redis").  The interface is in redis_transport.lua.
--
-- Never a blocking call: every socket operation is a cosocket that yields to nginx's event
-- loop, and back-off sleeps are ngx.sleep.  No connection outlives an operation: each
-- pipeline takes a connection from nginx's per-worker pool (a pool per server, database
-- and user, so a pooled connection is always AUTHed and SELECTed as this store needs; a
-- fresh one is AUTHed and SELECTed once), and hands it back with set_keepalive as soon as
-- the replies are in.  So a store object holds no socket: it may be opened once per worker
-- and used from any request handler or timer, and close() has nothing left to release.
-- A connection that failed is closed, never pooled.
--
-- Cosockets exist in the rewrite, access and content phases, in ngx.timer callbacks and in
-- the ssl_* handlers; a store used anywhere else (init_by_lua, init_worker_by_lua outside a
-- timer, header/body filters, log) raises.
--
-- WAIT (wait_replicas) goes in the same pipeline as the writes it waits for, on the same
-- connection.

local ok_resty, resty_redis = pcall(require, "resty.redis")
if not ok_resty then
    local ok_deb, deb = pcall(require, "nginx.redis")
    if not ok_deb then
        error("softcxi.store.redis_transport_resty: neither resty.redis nor nginx.redis "
              .. "(lua-resty-redis; Debian: lua-nginx-redis) can be loaded: " .. tostring(resty_redis), 0)
    end
    resty_redis = deb
end

local common = require "softcxi.store.redis_transport"

local ngx = ngx
local type, setmetatable, error, tostring = type, setmetatable, error, tostring
local unpack = table.unpack or unpack   -- luacheck: ignore 143
local string_format, math_floor, math_min = string.format, math.floor, math.min
local rcode = common.rcode

local _M = { name = "resty", null = ngx.null, module = resty_redis }

local POOL_SIZE = 64          -- idle connections per pool and worker
local POOL_IDLE_MS = 60000    -- an idle pooled connection is closed after this

-- resty.redis passes a command's arguments as a Lua vararg: keep well under LuaJIT's
-- unpack limit (8000) -- the store's write calls stay below it.
local MAX_ARGS = 7900

local COSOCKET_PHASES = {
    rewrite = true, access = true, content = true, timer = true,
    ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true, preread = true,
}

--- Can this phase use cosockets?  (true, or false and the phase)
function _M.cosockets()
    local phase = ngx.get_phase()
    return COSOCKET_PHASES[phase] == true, phase
end

local function need_cosockets(what)
    local ok, phase = _M.cosockets()
    if not ok then
        error(string_format("%s: no cosockets in nginx's '%s' phase: use the store from a request "
                            .. "handler (rewrite, access, content) or an ngx.timer", what, phase), 3)
    end
end

function _M.sleep(s)
    ngx.sleep(s)
end

local Node = {}
Node.__index = Node
_M.Node = Node

--- A node of host:port, or of the Unix socket at path host when port is nil.
-- cfg: user, password, db, timeout (seconds), wait_replicas.
function Node.new(host, port, cfg)
    local timeout = cfg.timeout
    local addr = port and host .. ":" .. port or "unix:" .. host
    return setmetatable({
        host = host, port = port, addr = addr, cfg = cfg, dirty = false,
        acked = nil,
        -- connections differ by database and user: one pool for each
        pool = string_format("softcxi:%s:%d:%s", addr, cfg.db or 0, cfg.user or ""),
        timeout_ms = (timeout and timeout > 0) and math_floor(timeout * 1000) or 365 * 86400000,
    }, Node)
end

-- A connection: from the pool, or new and AUTHed/SELECTed.  red, reused | nil, msg, code.
function Node:acquire()
    need_cosockets("store.redis")
    local red, err = resty_redis:new()
    if not red then return nil, self.addr .. ": " .. tostring(err), "ECONN" end
    red:set_timeout(self.timeout_ms)
    local ok
    if self.port then
        ok, err = red:connect(self.host, self.port, { pool = self.pool })
    else -- cosockets take "unix:PATH" and the options as the second argument
        ok, err = red:connect(self.addr, { pool = self.pool })
    end
    if not ok then return nil, self.addr .. ": " .. tostring(err), "ECONN" end
    local reused = (red:get_reused_times() or 0) > 0
    if reused then return red, true end
    local cfg = self.cfg
    if cfg.password then
        local r
        if cfg.user then r, err = red:auth(cfg.user, cfg.password) else r, err = red:auth(cfg.password) end
        if not r then
            red:close()
            if err == "closed" or err == "timeout" then
                return nil, self.addr .. ": " .. err .. " (during AUTH)", "ECONN"
            end
            return nil, common.auth_failed(self.addr, cfg, tostring(err))
        end
    end
    if cfg.db and cfg.db ~= 0 then
        local r
        r, err = red:select(cfg.db)
        if not r then
            red:close()
            if err == "closed" or err == "timeout" then
                return nil, self.addr .. ": " .. err .. " (during SELECT)", "ECONN"
            end
            return nil, common.select_failed(self.addr, cfg, tostring(err))
        end
    end
    return red, false
end

local function release(red)
    local ok = red:set_keepalive(POOL_IDLE_MS, POOL_SIZE)
    if not ok then red:close() end
end

--- Check that the server answers (AUTH and SELECT included).
function Node:connect()
    local red, err, code = self:acquire()
    if not red then return nil, err, code end
    release(red)
    return true
end

-- resty.redis gives a Redis error as { false, text }: the stores want { err = text }.
local function convert(v)
    if type(v) == "table" then
        if v[1] == false and type(v[2]) == "string" then return { err = v[2] } end
        for i = 1, #v do
            local e = v[i]
            if type(e) == "table" then v[i] = convert(e) end
        end
    end
    return v
end

-- One pipeline on one connection, no retry: res [, msg, code, reused].  resty.redis reads
-- every reply before it returns any: on a failure mid-pipeline none counts as received.
function Node:send(cmds, want_wait)
    local red, reused, code = self:acquire()
    if not red then return {}, reused, code, false end
    local err
    red:init_pipeline(#cmds + 1)
    for i = 1, #cmds do
        local argv = cmds[i]
        if #argv > MAX_ARGS then
            red:cancel_pipeline()
            release(red)
            error(string_format("store.redis: a command of %d arguments (at most %d through resty.redis)",
                                #argv, MAX_ARGS), 3)
        end
        red[argv[1]](red, unpack(argv, 2, #argv))
    end
    if want_wait then red:wait(self.cfg.wait_replicas, self.cfg.wait_timeout_ms) end
    local vals
    vals, err = red:commit_pipeline()
    if not vals then
        red:close()
        return {}, self.addr .. ": " .. tostring(err), "ECONN", reused
    end
    release(red)
    local res = {}
    for i = 1, #cmds do res[i] = convert(vals[i]) end
    if want_wait then
        local acked = convert(vals[#cmds + 1])
        if type(acked) ~= "number" then
            self.wait_err = acked and acked.err or "no reply to WAIT"
            acked = -1
        end
        self.acked = self.acked and math_min(self.acked, acked) or acked
    end
    return res
end

--- opts.retry resends once on a new connection when a pooled one failed (the server
-- restarted, or closed it while idle): for reads.  opts.write with wait_replicas: WAIT
-- rides in the same pipeline; wait() reports it.
function Node:pipeline(cmds, opts)
    local write = opts and opts.write and (self.cfg.wait_replicas or 0) > 0
    local res, err, code, reused = self:send(cmds, write)
    if err and reused and code == "ECONN" and opts and opts.retry then
        res, err, code = self:send(cmds, write)
    end
    if opts and opts.write and not err then self.dirty = true end
    return res, err, code
end

function Node:nodes()
    return { self }
end

--- The fewest replicas that acknowledged the writes since the last wait (WAIT was sent
-- with each write pipeline).
function Node:wait(n)
    if not self.dirty then return n end
    self.dirty = false
    local acked, why = self.acked, self.wait_err
    self.acked, self.wait_err = nil, nil
    if acked == nil then return nil, self.addr .. ": no WAIT was sent", "EIO" end
    if acked < 0 then return nil, self.addr .. ": " .. tostring(why), rcode(tostring(why)) end
    return acked
end

function Node:close()
    self.dirty, self.acked = false, nil
end

return _M
