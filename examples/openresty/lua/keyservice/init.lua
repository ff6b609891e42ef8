-- keyservice: a small key service on softcxi inside OpenResty (docs/openresty.md).
--
--   POST   /v1/keys                  create an external key, store its blob (201)
--   GET    /v1/keys/{id}             verified attributes and public key
--   DELETE /v1/keys/{id}             revoke the key on the device, delete its blob (204)
--   POST   /v1/keys/{id}/sign        { data }            -> { signature }
--   POST   /v1/keys/{id}/verify      { data, signature } -> { valid }
--   POST   /v1/keys/{id}/encrypt     { data [, aad] }    -> { ciphertext }
--   POST   /v1/keys/{id}/decrypt     { ciphertext [, aad] } -> { data }
--   GET    /healthz, GET /metrics    (no token)
-- Binary fields are base64; {id} is the store id percent-encoded (iot%2Fdev-1).
--
-- Phases: configure() in init_by_lua (master: load the policy, nothing else);
-- init_worker() per worker (open the device, log on once, open the store object);
-- handle() per request (the token's groups are checked against the key's group
-- before any device call); log() records metrics.
--
-- The store: on the resty.redis transport a store object holds no connection (each
-- operation takes one from nginx's per-worker pool and gives it back), so one object
-- per worker serves every request.  Any other store (a file or SQL URL, hiredis
-- forced by transport=hiredis, a cluster, or wait_replicas, whose acknowledgement
-- count a store object keeps between calls) is opened per request and closed when
-- the request ends.

local softcxi = require "softcxi"
local policy = require "softcxi.policy"
local stores = require "softcxi.store"
local cjson = require "cjson.safe"
local metrics = require "keyservice.metrics"

local ngx = ngx
local type, pairs, ipairs, tostring, tonumber, pcall, error, setmetatable =
    type, pairs, ipairs, tostring, tonumber, pcall, error, setmetatable
local str_char, str_gsub = string.char, string.gsub
local encode_base64, decode_base64 = ngx.encode_base64, ngx.decode_base64
local ngx_now, req_start_time = ngx.now, ngx.req.start_time
local hash_compute, key_info = softcxi.hash_compute, softcxi.key_info

local _M = { _VERSION = softcxi._VERSION }

local cfg   -- configure()'s table, read-only once the workers run
local pol   -- the policy, loaded in the master, shared by every worker after fork
local hsm   -- this worker's device session (init_worker)
local wstore -- this worker's store object, when it may be shared (see the top)
local token_groups -- raw SHA-256 digest of a token -> the policy's entry ({ groups = })

local CONFIG = { device = true, keyfile = true, user = true, password_file = true, policy = true,
                 tokens_file = true, store = true, cache = true }

--- init_by_lua: remember the configuration and load the policy (tokens and
-- key rules).  A bad policy stops nginx from starting.
function _M.configure(c)
    for k in pairs(c) do
        if not CONFIG[k] then error("keyservice.configure: unknown field '" .. tostring(k) .. "'") end
    end
    cfg = c
    local err
    pol, err = policy.load(c.policy, {
        -- the request's store, for hooks that count
        store = function() return wstore or ngx.ctx.store end,
        params = { tokens_file = c.tokens_file },
    })
    if not pol then error("keyservice.configure: " .. err) end
    -- the policy keys tokens by the hex of their SHA-256; a request looks its
    -- token up by the raw digest (no hex encoding per request)
    token_groups = {}
    for h, entry in pairs(pol.config.tokens or {}) do
        if type(h) ~= "string" or not h:match("^%x+$") or #h ~= 64 then
            error("keyservice.configure: the policy's tokens must be keyed by the hex SHA-256 of "
                  .. "each token")
        end
        token_groups[str_gsub(h, "%x%x", function(x) return str_char(tonumber(x, 16)) end)] = entry
    end
end

local function read_secret(path)
    local f, err = io.open(path, "rb")
    if not f then return nil, err end
    local s = f:read("*a")
    f:close()
    return (str_gsub(s, "%s+$", ""))
end

-- A store object shared by this worker's requests, or nil (opened per request).
-- No cosockets in init_worker: the Redis store connects on its first use.
local function open_worker_store()
    local st, err = stores.open(cfg.store)
    if not st then
        -- a bad URL: every request reports it (503), as it would when opening its own
        ngx.log(ngx.WARN, "keyservice: the key store: ", err)
        return nil
    end
    if st.name == "store.redis" and st.transport_name == "resty" and st.wait_replicas == 0 then
        return st
    end
    st:close()
    return nil
end

--- init_worker_by_lua: this worker's session, logged on as the service user.
-- Blocking here is fine (no request is served yet); a failure is logged and
-- every request then gets 503.
function _M.init_worker()
    local h, err = softcxi.open { path = cfg.device, keyfile = cfg.keyfile, cache = cfg.cache,
                                  policy = pol }
    if not h then
        ngx.log(ngx.ERR, "keyservice: opening the device: ", err)
        return
    end
    local pw
    pw, err = read_secret(cfg.password_file)
    if pw then
        local ok
        ok, err = h:logon_pass(cfg.user, pw)
        if ok then
            hsm = h
            wstore = open_worker_store()
            return
        end
    end
    ngx.log(ngx.ERR, "keyservice: logon of '", cfg.user, "': ", err)
    h:close()
end

-- ---- responses --------------------------------------------------------------

local function reply(status, body)
    return { status = status, body = body }
end

local function fail(status, msg, code)
    return reply(status, { error = msg, code = code })
end

-- Device errors to HTTP statuses; anything unlisted is the service's fault (500).
local DEVICE_STATUS = { EINVAL = 400, EACCESS = 403, EPOLICY = 422, EREVOKED = 410 }
-- Store errors: a missing id, an id taken; anything else means Redis is unwell.
local STORE_STATUS = { ENOTFOUND = 404, EEXIST = 409, EINVAL = 400 }

local function device_fail(msg, code)
    return fail(DEVICE_STATUS[code] or 500, msg, code)
end

local function store_fail(msg, code)
    return fail(STORE_STATUS[code] or 503, msg, code)
end

-- ---- requests -----------------------------------------------------------------

-- The caller's token entry ({ groups = ... }) or nil.
local function token_of()
    local h = ngx.var.http_authorization
    local tok = h and h:match("^[Bb]earer%s+(%S+)%s*$")
    if not tok then return nil end
    return token_groups[hash_compute("sha256", tok)]
end

-- Does one of the token's groups cover group g?  Same rule as the device's
-- users: a name, a prefix ending in "*", or "*" for every group.
local function covers(token, g)
    g = g or ""
    for _, want in ipairs(token.groups) do
        if want == g or want == "*" then return true end
        if want:sub(-1) == "*" and g ~= "" and g:sub(1, #want - 1) == want:sub(1, -2) then
            return true
        end
    end
    return false
end

-- The JSON body as a table, or nil, failure.
local function json_body()
    ngx.req.read_body()
    local data = ngx.req.get_body_data()
    if not data then return nil, fail(400, "the body must be a JSON object", "EINVAL") end
    local body = cjson.decode(data)
    if type(body) ~= "table" then
        return nil, fail(400, "the body is not a JSON object", "EINVAL")
    end
    return body
end

-- body[field] decoded from base64 (required unless optional), or nil, failure.
local function b64_field(body, field, optional)
    local v = body[field]
    if v == nil and optional then return nil end
    if type(v) ~= "string" then
        return nil, fail(400, "field '" .. field .. "' must be a base64 string", "EINVAL")
    end
    local d = decode_base64(v)
    if not d then return nil, fail(400, "field '" .. field .. "' is not valid base64", "EINVAL") end
    return d
end

-- Fetch the key's blob and check the token may touch it.  The group read here
-- is the blob's clear (unverified) one: it is bound into the blob's tag, so an
-- edited group fails the device call that follows with ETAMPER.
local function load_key(st, token, id)
    local blob, err, code = st:get(id)
    if not blob then return nil, store_fail(err, code) end
    local info
    info, err, code = key_info(blob)
    if not info then return nil, fail(500, "the stored blob of '" .. id .. "': " .. err, code) end
    if not covers(token, info.group) then
        return nil, fail(403, "this token may not use keys of group '" .. tostring(info.group) .. "'",
            "EACCESS")
    end
    return blob, info
end

local TEMPLATE_INFO = { "algo", "curve", "size", "name", "group", "specifier", "label", "usage",
                        "export", "expiry", "gen_date", "kcv" }

local function key_view(id, info, blob)
    local out = { id = id, url = "/v1/keys/" .. ngx.escape_uri(id), verified = info.verified }
    for _, k in ipairs(TEMPLATE_INFO) do out[k] = info[k] end
    if info.usage then out.usage = setmetatable(info.usage, cjson.array_mt) end
    if info.public_key then
        local pem, err, code = hsm:public_key(blob, "pem")
        if not pem then return nil, device_fail(err, code) end
        local jwk = hsm:public_key(blob, "jwk")
        out.public_key = { pem = pem, jwk = jwk and cjson.decode(jwk) or nil }
    end
    return out
end

local DEFAULT_SIGN = { ec = "ecdsa-sha256", ed25519 = "ed25519", rsa = "rsa-pss-sha256" }
local DEFAULT_CRYPT = { aes = "aes-gcm", rsa = "rsa-oaep-sha256" }

local function is_hmac(info)
    return info.algo:sub(1, 5) == "hmac-"
end

local function mech_of(body, info, defaults)
    local m = body.mech
    if m ~= nil and type(m) ~= "string" then return nil end
    if m then return m end
    if is_hmac(info) then return info.algo end
    return defaults[info.algo] or ""
end

-- ---- handlers -------------------------------------------------------------------

local handlers = {}

function handlers.create(st, token)
    local body, bad = json_body()
    if not body then return bad end
    local id = body.id
    if id ~= nil and (type(id) ~= "string" or id == "") then
        return fail(400, "field 'id' must be a non-empty string", "EINVAL")
    end
    local t = {}
    for k, v in pairs(body) do if k ~= "id" then t[k] = v end end
    if t.group == nil and #token.groups == 1 and not token.groups[1]:find("*", 1, true) then
        t.group = token.groups[1]
    end
    if type(t.group) ~= "string" then
        return fail(400, "field 'group' is required (a string)", "EINVAL")
    end
    if not covers(token, t.group) then
        return fail(403, "this token may not make keys of group '" .. t.group .. "'", "EACCESS")
    end
    local blob, err, code = hsm:key_generate(softcxi.FLAG_EXTERNAL, t) -- on_generate runs first
    if not blob then return device_fail(err, code) end
    local info = assert(hsm:key_info(blob))
    id = id or policy.id_of(info)
    if not id then return fail(400, "a key without a name needs an 'id'", "EINVAL") end
    local ok
    ok, err, code = pol:check_store(id, blob)
    if not ok then return fail(422, err, code) end
    ok, err, code = st:put(id, blob)
    if not ok then return store_fail(err, code) end
    local view
    view, bad = key_view(id, info, blob)
    if not view then return bad end
    return reply(201, view)
end

function handlers.get(st, token, id)
    local blob, info = load_key(st, token, id)
    if not blob then return info end
    local verified, err, code = hsm:key_info(blob) -- the device checks the tag
    if not verified then return device_fail(err, code) end
    local view, bad = key_view(id, verified, blob)
    if not view then return bad end
    return reply(200, view)
end

function handlers.delete(st, token, id)
    local blob, info = load_key(st, token, id)
    if not blob then return info end
    -- Revoke first: a copy of the blob elsewhere is dead too, in every worker.
    local ok, err, code = hsm:key_revoke(blob, "deleted through the key service")
    if not ok then return device_fail(err, code) end
    ok, err, code = st:delete(id)
    if not ok then return store_fail(err, code) end
    return reply(204, nil)
end

function handlers.sign(st, token, id)
    local body, bad = json_body()
    if not body then return bad end
    local data
    data, bad = b64_field(body, "data")
    if not data then return bad end
    local blob, info = load_key(st, token, id)
    if not blob then return info end
    local mech = mech_of(body, info, DEFAULT_SIGN)
    if not mech then return fail(400, "field 'mech' must be a string", "EINVAL") end
    local sig, err, code
    if is_hmac(info) then
        sig, err, code = hsm:mac(blob, mech, data)
    else
        sig, err, code = hsm:sign(blob, mech, data)
    end
    if not sig then return device_fail(err, code) end
    return reply(200, { signature = encode_base64(sig), mech = mech })
end

function handlers.verify(st, token, id)
    local body, bad = json_body()
    if not body then return bad end
    local data, sig
    data, bad = b64_field(body, "data")
    if not data then return bad end
    sig, bad = b64_field(body, "signature")
    if not sig then return bad end
    local blob, info = load_key(st, token, id)
    if not blob then return info end
    local mech = mech_of(body, info, DEFAULT_SIGN)
    if not mech then return fail(400, "field 'mech' must be a string", "EINVAL") end
    local valid, err, code
    if is_hmac(info) then
        valid, err, code = hsm:mac_verify(blob, mech, data, sig)
    else
        valid, err, code = hsm:verify(blob, mech, data, sig)
    end
    if valid == nil then return device_fail(err, code) end
    return reply(200, { valid = valid })
end

function handlers.encrypt(st, token, id)
    local body, bad = json_body()
    if not body then return bad end
    local data, aad
    data, bad = b64_field(body, "data")
    if not data then return bad end
    aad, bad = b64_field(body, "aad", true)
    if bad then return bad end
    local blob, info = load_key(st, token, id)
    if not blob then return info end
    local mech = mech_of(body, info, DEFAULT_CRYPT)
    if not mech then return fail(400, "field 'mech' must be a string", "EINVAL") end
    local ct, err, code = hsm:encrypt(blob, mech, data, { aad = aad })
    if not ct then return device_fail(err, code) end
    return reply(200, { ciphertext = encode_base64(ct), mech = mech })
end

function handlers.decrypt(st, token, id)
    local body, bad = json_body()
    if not body then return bad end
    local ct, aad
    ct, bad = b64_field(body, "ciphertext")
    if not ct then return bad end
    aad, bad = b64_field(body, "aad", true)
    if bad then return bad end
    local blob, info = load_key(st, token, id)
    if not blob then return info end
    local mech = mech_of(body, info, DEFAULT_CRYPT)
    if not mech then return fail(400, "field 'mech' must be a string", "EINVAL") end
    local pt, err, code = hsm:decrypt(blob, mech, ct, { aad = aad })
    if not pt then
        -- the ciphertext, not the service, is at fault
        if code == "ETAMPER" then return fail(400, err, code) end
        return device_fail(err, code)
    end
    return reply(200, { data = encode_base64(pt) })
end

local function healthz()
    if not hsm then return fail(503, "the device is not open in this worker", "EAUTH") end
    local st = wstore
    if not st then
        local err, code
        st, err, code = stores.open(cfg.store)
        if not st then return fail(503, "redis: " .. tostring(err), code) end
    end
    local n, err, code = st:count()
    if st ~= wstore then st:close() end
    if not n then return fail(503, "redis: " .. tostring(err), code) end
    return reply(200, { status = "ok", keys = n })
end

-- ---- routing -----------------------------------------------------------------------

local OPS = { sign = true, verify = true, encrypt = true, decrypt = true }

-- The route of a request: name, handler key, id (decoded), allowed method.
local function route(method, path)
    if path == "/healthz" then return "healthz", nil, nil, "GET" end
    if path == "/metrics" then return "metrics", nil, nil, "GET" end
    if path == "/v1/keys" then return "create", "create", nil, "POST" end
    local raw, op = path:match("^/v1/keys/([^/]+)/(%a+)$")
    if raw and OPS[op] then return op, op, ngx.unescape_uri(raw), "POST" end
    raw = path:match("^/v1/keys/([^/]+)$")
    if raw then
        local id = ngx.unescape_uri(raw)
        if method == "DELETE" then return "delete", "delete", id, "DELETE" end
        return "get", "get", id, "GET"
    end
    return nil
end

local function send(r)
    ngx.status = r.status
    if r.status == 401 then ngx.header["WWW-Authenticate"] = 'Bearer realm="softcxi"' end
    if r.body ~= nil then ngx.say(cjson.encode(r.body)) end
end

-- One request on the worker's store, or on its own store, closed whatever
-- happens (a raised error too).
local function with_store(h, token, id)
    if wstore then return handlers[h](wstore, token, id) end
    local st, err, code = stores.open(cfg.store)
    if not st then return fail(503, "the key store is unavailable: " .. tostring(err), code) end
    ngx.ctx.store = st
    local ok, r = pcall(handlers[h], st, token, id)
    ngx.ctx.store = nil
    st:close()
    if not ok then error(r, 0) end
    return r
end

--- content_by_lua: route, authenticate, run the handler, answer JSON.
function _M.handle()
    local path = ngx.var.uri
    local method = ngx.req.get_method()
    local name, h, id, want = route(method, ngx.var.request_uri:match("^[^?]*"))
    ngx.ctx.route = name or "unknown"
    if not name then
        return send(fail(404, "no such endpoint: " .. path, "ENOTFOUND"))
    end
    if method ~= want then
        ngx.header["Allow"] = want
        return send(fail(405, "use " .. want .. " for " .. path, "EINVAL"))
    end
    if name == "metrics" then
        ngx.header["Content-Type"] = "text/plain; version=0.0.4"
        return ngx.print(metrics.render())
    end
    if name == "healthz" then return send(healthz()) end
    local token = token_of()
    if not token then
        return send(fail(401, "a valid bearer token is required (Authorization: Bearer ...)",
            "EAUTH"))
    end
    if not hsm then return send(fail(503, "the device is not open in this worker", "EAUTH")) end
    return send(with_store(h, token, id))
end

--- log_by_lua: count the request and its latency.
function _M.log()
    metrics.observe(ngx.ctx.route or "unknown", ngx.status, ngx_now() - req_start_time())
    if hsm then metrics.device(hsm:device_info()) end
end

return _M
