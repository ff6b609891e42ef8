-- The Redis store inside a real nginx: the resty transport (cosockets), run by a private
-- nginx (nginx-extras: the Lua module) on a free loopback port with every path under a temp
-- prefix, against the Redis (and Redis Cluster) that ./run test starts.  The checks run in
-- content_by_lua handlers (spec/nginx/store_handler.lua) and come back over HTTP (curl).
--
-- Pending, with the reason, when nginx or its Lua module is not installed or no Redis is
-- set (SOFTCXI_TEST_REDIS_URL); nginx is stopped by PID (QUIT) when the spec ends.

local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./"
if SPEC_DIR:sub(1, 1) ~= "/" then SPEC_DIR = os.getenv("PWD") .. "/" .. SPEC_DIR end
local REPO = SPEC_DIR .. "../"
local URL = os.getenv("SOFTCXI_TEST_REDIS_URL")
local CURL = os.getenv("SOFTCXI_TEST_REDIS_CLUSTER_URL")
local SOCK = os.getenv("SOFTCXI_TEST_REDIS_SOCKET")
if SOCK == "" then SOCK = nil end
if URL == "" then URL = nil end
if CURL == "" then CURL = nil end

local MODULES = "/usr/lib/nginx/modules/"

local function nginx_binary()
    -- ./run's ASan stage gives a wrapper that preloads the ASan runtime into nginx alone
    local given = os.getenv("SOFTCXI_TEST_NGINX")
    if given and given ~= "" then return given end
    for _, p in ipairs { "/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx" } do
        if H.exists(p) then return p end
    end
end

-- The LuaJIT build of the module: BUILD_DIR (./run) or ./build.
local function luajit_cpath()
    local build = os.getenv("BUILD_DIR")
    if not build or build == "" then build = REPO .. "build" end
    if H.exists(build .. "/luajit/softcxi/core.so") then return build .. "/luajit/?.so" end
end

local why_not
local NGINX = nginx_binary()
if not NGINX then
    why_not = "nginx is not installed (Debian: nginx-extras, lua-nginx-redis)"
elseif not H.exists(MODULES .. "ngx_http_lua_module.so") then
    why_not = "nginx's Lua module is not installed (Debian: nginx-extras)"
elseif not URL then
    why_not = "SOFTCXI_TEST_REDIS_URL is not set (./run test starts a Redis)"
elseif not luajit_cpath() then
    why_not = "the LuaJIT build of softcxi is missing (./run build)"
elseif not (H.exists("/usr/share/lua/5.1/resty/redis.lua") or H.exists("/usr/share/lua/5.1/nginx/redis.lua")
            or H.exists("/usr/local/openresty/lualib/resty/redis.lua")) then
    why_not = "lua-resty-redis is not installed (Debian: lua-nginx-redis)"
end

if why_not then
    describe("redis store inside nginx", function()
        pending(why_not)
    end)
    return
end

local store = require "softcxi.store"

local function port_taken(p)
    return H.run("bash -c 'exec 3<>/dev/tcp/127.0.0.1/" .. p .. "' 2>/dev/null") == 0
end

local function http_get(port, path)
    local rc, body = H.run(string.format("curl -sS --max-time 60 http://127.0.0.1:%d%s", port, path))
    assert(rc == 0, "curl " .. path .. ": " .. body)
    return body
end

-- As root, nginx's workers would drop to "nobody", who cannot read a checkout
-- under /root (or the files the specs make): they stay the master's user.
local CONF = [[
@USER@
load_module @MODULES@ndk_http_module.so;
load_module @MODULES@ngx_http_lua_module.so;
worker_processes 2;
error_log logs/error.log warn;
pid logs/nginx.pid;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    lua_package_path "@REPO@lua/?.lua;@REPO@lua/?/init.lua;@SPEC@nginx/?.lua;@PREFIX@/lua/?.lua;;";
    lua_package_cpath "@CPATH@;;";
    # the store returns socket errors to the caller (ECONN); the dead-server check would
    # log one otherwise
    lua_socket_log_errors off;
    init_worker_by_lua_block { require("store_handler").init_worker() }
    server {
        listen 127.0.0.1:@PORT@;
        location = /contract { content_by_lua_block { require("store_handler").contract() } }
        location = /pool { content_by_lua_block { require("store_handler").pool() } }
    }
}
]]

describe("redis store inside nginx (resty transport)", function()
    local prefix, pid, port, dev
    local RUN = H.hex(io.open("/dev/urandom", "rb"):read(4))
    local P = "ngx" .. RUN .. ":"
    local blobs, ids = {}, {}

    lazy_setup(function()
        dev = H.new_device()
        for i = 1, 120 do
            blobs[i] = H.gen(dev.hsm, { algo = "ec", curve = "P-256", name = "n-" .. i, group = "gngx" .. RUN,
                                        usage = { "sign" } })
            if i > 2 then ids[#ids + 1] = assert(store.id_of(blobs[i])) end
        end
        prefix = H.tmpdir()
        for _, d in ipairs { "conf", "logs", "tmp", "lua" } do H.mkdir_p(prefix .. "/" .. d) end
        local hex = {}
        for i, b in ipairs(blobs) do hex[i] = string.format("%q", H.hex(b)) end
        local idq = {}
        for i, id in ipairs(ids) do idq[i] = string.format("%q", id) end
        H.writefile(prefix .. "/lua/store_test_config.lua", table.concat {
            "return { url = ", string.format("%q", URL), ", prefix = ", string.format("%q", P),
            ", curl = ", CURL and string.format("%q", CURL) or "nil",
            ", socket_url = ", SOCK and string.format("%q", "redis+unix://" .. SOCK .. "?db=0") or "nil",
            ", dead_url = ", string.format("%q", "redis://127.0.0.1:1/0?timeout=1"),
            ", group = ", string.format("%q", "gngx" .. RUN),
            ", blobs = {", table.concat(hex, ","), "}, ids = {", table.concat(idq, ","), "} }\n" })

        -- what hiredis writes, nginx must read (and the other way round, checked below)
        local h = assert(store.open(URL .. "&prefix=" .. P .. "h:", { transport = "hiredis" }))
        assert(h:put("from-hiredis", blobs[1], { overwrite = true }))
        h:close()

        for _ = 1, 20 do
            port = 30000 + math.random(0, 9999)
            if not port_taken(port) then
                local uid = select(2, H.run("id -u")):match("%d+")
                local conf = CONF:gsub("@(%u+)@", { MODULES = MODULES, REPO = REPO, SPEC = SPEC_DIR,
                                                    USER = uid == "0" and "user root;" or "",
                                                    PREFIX = prefix, CPATH = luajit_cpath(),
                                                    PORT = tostring(port) })
                H.writefile(prefix .. "/conf/nginx.conf", conf)
                local rc, out = H.run(string.format("%s -p %s -c conf/nginx.conf -g 'daemon off;' "
                                                    .. ">%s/logs/stdout.log 2>&1 & echo $!",
                                                    NGINX, H.q(prefix), H.q(prefix)))
                assert(rc == 0, out)
                pid = tonumber(out:match("(%d+)"))
                local up = false
                for _ = 1, 100 do
                    if H.run("kill -0 " .. pid) ~= 0 then break end
                    if port_taken(port) then
                        up = true
                        break
                    end
                    H.run("sleep 0.05")
                end
                if up then return end
                H.run("kill -QUIT " .. pid .. "; sleep 0.2; kill -KILL " .. pid)
                pid = nil
            end
        end
        error("nginx did not start: " .. (H.readfile(prefix .. "/logs/error.log") or "")
              .. (H.readfile(prefix .. "/logs/stdout.log") or ""))
    end)

    lazy_teardown(function()
        if pid then
            H.run("kill -QUIT " .. pid)
            for _ = 1, 100 do
                if H.run("kill -0 " .. pid) ~= 0 then break end
                H.run("sleep 0.05")
            end
            H.run("kill -KILL " .. pid .. " 2>/dev/null")
        end
        local s = store.open(URL .. "&prefix=" .. P .. "h:", { transport = "hiredis" })
        if s then
            s:delete("from-hiredis")
            s:delete("from-nginx")
            s:close()
        end
        if dev then H.destroy(dev) end
        H.rm_rf(prefix)
    end)

    local function expect_all_ok(body)
        local n = 0
        for line in body:gmatch("[^\n]+") do
            n = n + 1
            assert.is_truthy(line:find("^ok "), line)
        end
        assert.is_true(n > 0, "no checks ran: " .. body)
        return n
    end

    it("meets the store contract in a content handler, on Redis" .. (CURL and ", Redis Cluster" or "")
       .. (SOCK and ", Redis over its Unix socket" or ""),
       function()
        local body = http_get(port, "/contract")
        local n = expect_all_ok(body)
        assert.is_true(n >= 25, n)
        if SOCK then assert.truthy(body:find("\nok redis+unix ", 1, true), body) end
        -- what nginx wrote, hiredis reads: one data layout for both transports
        local h = assert(store.open(URL .. "&prefix=" .. P .. "h:", { transport = "hiredis" }))
        assert.are.equal(blobs[2], h:get("from-nginx"))
        h:close()
    end)

    it("pools connections: each operation gives its connection back (set_keepalive)", function()
        local body = http_get(port, "/pool")
        expect_all_ok(body)
        if SOCK then
            assert.truthy(body:find("ok redis+unix a released connection is reused", 1, true), body)
        end
    end)

    it("serves concurrent requests on 2 workers with nothing in the error log", function()
        local rc, out = H.run(string.format(
            "for i in 1 2 3 4; do curl -sS --max-time 60 http://127.0.0.1:%d/pool & done; wait", port))
        assert.are.equal(0, rc, out)
        expect_all_ok(out)
        local log = H.readfile(prefix .. "/logs/error.log") or ""
        assert.is_nil(log:find("%[error%]") or log:find("%[alert%]") or log:find("%[crit%]"), log)
    end)
end)
