-- softcxi.store.redis_transport_hiredis: the Redis stores' transport in plain Lua, over
-- softcxi.hiredis (csrc/redis/lhiredis.c): blocking sockets, one connection per node,
-- (re)connected lazily and kept until close().  The interface is in redis_transport.lua.

local hiredis = require "softcxi.hiredis"
local common = require "softcxi.store.redis_transport"

local setmetatable = setmetatable
local rcode = common.rcode

local _M = { name = "hiredis", null = hiredis.null, sleep = hiredis.sleep }

local Node = {}
Node.__index = Node
_M.Node = Node

--- A node of host:port, or of the Unix socket at path host when port is nil.
-- cfg: user, password, db, timeout (seconds).
function Node.new(host, port, cfg)
    return setmetatable({ host = host, port = port, cfg = cfg, dirty = false,
                          addr = port and host .. ":" .. port or "unix:" .. host }, Node)
end

function Node:drop()
    if self.c then self.c:close() end
    self.c = nil
    self.inflight = 0
end

--- The live connection, connecting (AUTH, SELECT) when there is none.
function Node:connect()
    local c = self.c
    if c and c:alive() then return c end
    self:drop()
    local cfg = self.cfg
    local err, code
    if self.port then
        c, err, code = hiredis.connect(self.host, self.port, cfg.timeout)
    else
        c, err, code = hiredis.connect_unix(self.host, cfg.timeout)
    end
    if not c then return nil, err, code end
    if cfg.password then
        local ok
        ok, err, code = c:command(cfg.user and { "AUTH", cfg.user, cfg.password }
                                  or { "AUTH", cfg.password })
        if not ok then
            c:close()
            if code ~= "EREDIS" then return nil, err .. " (during AUTH)", code end
            return nil, common.auth_failed(self.addr, cfg, err)
        end
    end
    if cfg.db and cfg.db ~= 0 then
        local ok
        ok, err, code = c:command { "SELECT", cfg.db }
        if not ok then
            c:close()
            if code ~= "EREDIS" then return nil, err .. " (during SELECT)", code end
            return nil, common.select_failed(self.addr, cfg, err)
        end
    end
    self.c = c
    return c
end

-- One pipeline on one connection, no retry.  The fourth value says whether the
-- connection used was an old one (which may simply have gone stale).
function Node:send(cmds)
    local old = self.c ~= nil and self.c:alive()
    local c, err, code = self:connect()
    if not c then return {}, err, code, false end
    local n = #cmds
    for i = 1, n do
        local ok
        ok, err, code = c:append(cmds[i])
        if not ok then
            self:drop()
            return {}, err, code, old
        end
    end
    local res = {}
    for i = 1, n do
        local v
        v, err, code = c:get_reply()
        if v == nil then
            if code ~= "EREDIS" then
                self:drop()          -- the context is dead; the next call reconnects
                return res, err, code, old
            end
            v = { err = err }
        end
        res[i] = v
    end
    return res
end

--- opts.retry resends once on a new connection when an old one failed (a server
-- restart, an idle timeout): for reads.
function Node:pipeline(cmds, opts)
    local res, err, code, stale = self:send(cmds)
    if err and stale and code == "ECONN" and opts and opts.retry then
        res, err, code = self:send(cmds)
    end
    if opts and opts.write then self.dirty = true end
    return res, err, code
end

--- Send cmds without reading their replies: true | nil, msg, code.  put_many overlaps
-- its work on the next slice with the server's on this one; receive(n) reads the replies
-- later, in order.  Never reconnects while replies are outstanding: they would be lost.
-- A node with a before_send function calls it first (put_many_later's coroutine.yield).
-- session: send only on that connection (a store transaction's WATCH is on it): ECONN if
-- it is gone, nothing sent.
function Node:send_ahead(cmds, session)
    if self.before_send then self.before_send() end
    local c = self.c
    if session and not (c == session and c:alive()) then
        self.inflight = (self.inflight or 0) + #cmds -- receive() reports them lost, as below
        return nil, self.addr .. ": the connection changed between a transaction's reads and its write",
            "ECONN"
    end
    if self.inflight and self.inflight > 0 then
        if not (c and c:alive()) then
            return nil, self.addr .. ": the connection broke with replies outstanding", "ECONN"
        end
    else
        local err, code
        c, err, code = self:connect()
        if not c then return nil, err, code end
    end
    local ok, err, code
    for i = 1, #cmds do
        ok, err, code = c:append(cmds[i])
        if not ok then break end
    end
    if ok then ok, err, code = c:flush() end
    self.dirty = true
    self.inflight = (self.inflight or 0) + #cmds
    if not ok then return nil, err, code end    -- receive() reports the rest
    return true
end

--- The replies of n commands sent ahead: res [, msg, code] as pipeline's.  A node with a
-- before_receive function calls it first (the store's put_many_later: a coroutine.yield,
-- so that its caller works on while Redis runs the commands).
function Node:receive(n)
    if self.before_receive then self.before_receive() end
    self.inflight = (self.inflight or 0) - n
    local c = self.c
    local res = {}
    if not (c and c:alive() and c:pending() >= n) then
        self:drop()
        return res, self.addr .. ": the connection broke before the replies came", "ECONN"
    end
    for i = 1, n do
        local v, err, code = c:get_reply()
        if v == nil then
            if code ~= "EREDIS" then
                self:drop()
                self.inflight = 0
                return res, err, code
            end
            v = { err = err }
        end
        res[i] = v
    end
    return res
end

--- The live connection (an opaque token), or nil: the store's transactions check that
-- their WATCH and their EXEC went over the same one.
function Node:session()
    local c = self.c
    if c and c:alive() then return c end
    return nil
end

--- A second, unconnected node of the same address and settings (its own connection).
function Node:twin()
    return Node.new(self.host, self.port, self.cfg)
end

function Node:nodes()
    return { self }
end

--- WAIT for n replicas on this connection if it wrote since the last wait.
function Node:wait(n, ms)
    if not self.dirty then return n end
    self.dirty = false
    if not self.c then
        return nil, self.addr .. ": the connection broke before WAIT", "ECONN"
    end
    local r, err, code = self.c:command { "WAIT", n, ms }
    if r == nil then
        if code == "EREDIS" then code = rcode(err) else self:drop() end
        return nil, self.addr .. ": " .. err, code
    end
    return r
end

function Node:close()
    self:drop()
end

return _M
