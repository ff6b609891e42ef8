-- softcxi.store.redis_transport: how the Redis stores reach a server.
--
-- The stores (redis.lua, redis_cluster.lua) hold the data layout and the logic; a transport
-- only moves commands and replies.  Two exist, with one interface:
--   softcxi.store.redis_transport_hiredis  plain Lua: softcxi.hiredis, blocking sockets,
--                                          one connection per node kept by the store
--   softcxi.store.redis_transport_resty    inside nginx: resty.redis (Debian: nginx.redis)
--                                          cosockets, a connection from nginx's pool per
--                                          operation, back to the pool (set_keepalive)
--                                          right after it: a store object holds none
-- choose("auto") takes resty when running inside nginx (the ngx API is there), else hiredis;
-- the URL parameter / open option transport=hiredis|resty forces one.
--
-- A transport module has
--   T.name, T.null (the nil reply: a NULL light userdata in both), T.sleep(seconds),
--   T.Node.new(host, port, cfg) -> node   cfg: user, password, db, timeout (s),
--                                         wait_replicas
--   node:connect() -> true | nil, msg, code   (checks the server answers and AUTH/SELECT work)
--   node:pipeline(cmds [, {retry=, write=}]) -> res [, msg, code]
--        cmds[i] is an argv array; res[i] is the reply, { err = text } for a Redis error, or
--        nil when no reply came (msg, code then say why: ECONN); retry = resend once on a
--        fresh connection after ECONN on a reused one (idempotent commands only)
--   node:nodes() -> { node }        node:wait(n, ms) -> fewest acks since the last wait
--   node:close()                    node.addr, node.host, node.dirty

local _M = {}

local string_format = string.format

--- The stable code for a Redis error reply.
function _M.rcode(text)
    if text:find("^WRONGPASS") or text:find("^NOAUTH") then return "EAUTH" end
    if text:find("^NOPERM") then return "EPERM" end
    if text:find("^WRONGTYPE") then return "EFORMAT" end
    return "EIO"
end

--- The message and code for a failed AUTH (err: the server's answer).
function _M.auth_failed(addr, cfg, err)
    return string_format("%s: AUTH%s failed: %s", addr,
                         cfg.user and (" as '" .. cfg.user .. "'") or "", err), "EAUTH"
end

--- The message and code for a failed SELECT.
function _M.select_failed(addr, cfg, err)
    local code = _M.rcode(err)
    return string_format("%s: SELECT %d: %s", addr, cfg.db, err), code == "EIO" and "EINVAL" or code
end

--- Inside nginx (the ngx API with cosockets)?
function _M.in_nginx()
    local ngx = rawget(_G, "ngx")
    return type(ngx) == "table" and type(ngx.socket) == "table" and ngx.socket.tcp ~= nil
        and type(ngx.get_phase) == "function"
end

local NAMES = { hiredis = true, resty = true }

--- The transport module for name ("auto", "hiredis", "resty"), or nil, msg.
function _M.choose(name)
    if name == nil or name == "auto" then name = _M.in_nginx() and "resty" or "hiredis" end
    if not NAMES[name] then
        return nil, "transport must be auto, hiredis or resty, not '" .. tostring(name) .. "'"
    end
    local ok, mod = pcall(require, "softcxi.store.redis_transport_" .. name)
    if not ok then return nil, "the " .. name .. " transport is not available: " .. tostring(mod) end
    return mod
end

return _M
