-- The OpenResty example service (examples/openresty) in a real nginx: started
-- with its own `run` (redis-server and nginx on free loopback ports, state in
-- a temp prefix), driven over HTTP with curl, stopped with SIGTERM.
local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local cjson = require "cjson.safe"

local spec_dir = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./"
local root = select(2, H.run("cd " .. H.q(spec_dir .. "..") .. " && pwd")):match("^%s*(.-)%s*$")

local function have(cmd)
    return H.run("command -v " .. cmd) == 0
end

local usable = have("nginx") and have("redis-server") and have("curl")
    and H.exists("/usr/lib/nginx/modules/ngx_http_lua_module.so")
    and H.exists(root .. "/build/luajit/softcxi/core.so")

local function b64(s)
    local alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    local out = {}
    for i = 1, #s, 3 do
        local a, b, c = s:byte(i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local q = {}
        for k = 4, 1, -1 do
            q[k] = n % 64
            n = math.floor(n / 64)
        end
        out[#out + 1] = alpha:sub(q[1] + 1, q[1] + 1) .. alpha:sub(q[2] + 1, q[2] + 1)
            .. (b and alpha:sub(q[3] + 1, q[3] + 1) or "=") .. (c and alpha:sub(q[4] + 1, q[4] + 1) or "=")
    end
    return table.concat(out)
end

describe("openresty example service", function()
    local prefix, run_pid, base, redis_port
    local tok = {}     -- group -> bearer token
    local n_req = 0

    local function sleep(s) os.execute("sleep " .. s) end

    local function alive(pid)
        return H.run("kill -0 " .. pid) == 0
    end

    setup(function()
        if not usable then return end
        prefix = H.tmpdir()
        os.execute(H.q(root .. "/examples/openresty/run") .. " --prefix " .. H.q(prefix)
            .. " >" .. H.q(prefix .. "/run.out") .. " 2>&1 </dev/null & echo $! >"
            .. H.q(prefix .. "/run.pid"))
        run_pid = assert(H.readfile(prefix .. "/run.pid")):match("%d+")
        for _ = 1, 600 do -- a bounded wait for the "listening" line
            local out = H.readfile(prefix .. "/run.out") or ""
            base = out:match("listening on (http://127%.0%.0%.1:%d+)")
            redis_port = out:match("redis on 127%.0%.0%.1:(%d+)")
            if base and redis_port then break end
            assert(alive(run_pid), "run exited:\n" .. out .. "\nerror.log:\n"
                .. (H.readfile(prefix .. "/logs/error.log") or "") .. "\nredis.log:\n"
                .. (H.readfile(prefix .. "/logs/redis.log") or ""))
            sleep(0.1)
        end
        assert(base, "run never printed its address:\n" .. (H.readfile(prefix .. "/run.out") or ""))
        for line in assert(io.open(prefix .. "/secrets/tokens")):lines() do
            local t, g = line:match("^(%x+)%s+(%S+)")
            if t then tok[g] = t end
        end
        assert(tok.iot and tok.lab, "the tokens file has no iot and lab tokens")
    end)

    teardown(function()
        if run_pid then
            os.execute("kill -TERM " .. run_pid)
            for _ = 1, 300 do
                if not alive(run_pid) then break end
                sleep(0.1)
            end
        end
        H.rm_rf(prefix)
    end)

    -- One HTTP request with curl: status (number), decoded JSON body (or nil), raw body.
    -- body: a table (sent as JSON) or a string (sent as is).
    local function http(method, path, body, token, headers)
        n_req = n_req + 1
        local out, req = prefix .. "/resp." .. n_req, prefix .. "/req." .. n_req
        local cmd = { "curl -s -o", H.q(out), "-w '%{http_code}' -X", method }
        if token then cmd[#cmd + 1] = "-H " .. H.q("Authorization: Bearer " .. token) end
        for _, h in ipairs(headers or {}) do cmd[#cmd + 1] = "-H " .. H.q(h) end
        if body ~= nil then
            H.writefile(req, type(body) == "table" and assert(cjson.encode(body)) or body)
            cmd[#cmd + 1] = "-H 'Content-Type: application/json' --data-binary @" .. H.q(req)
        end
        cmd[#cmd + 1] = H.q(base .. path)
        local rc, code = H.run(table.concat(cmd, " "))
        assert(rc == 0, "curl failed: " .. code)
        local raw = H.readfile(out) or ""
        return tonumber(code), cjson.decode(raw), raw
    end

    -- Assert the status and, for an error, the JSON error code; returns the body.
    local function expect(want, want_code, status, json, raw)
        assert.are.equal(want, status, raw)
        if want_code then
            assert.is_table(json, raw)
            assert.are.equal(want_code, json.code, raw)
            assert.is_string(json.error)
        end
        return json, raw
    end

    local function pend()
        if not usable then
            pending("nginx with the Lua module, redis-server, curl and the LuaJIT build are needed")
            return true
        end
    end

    local IOT = "/v1/keys/iot%2Fdev-1"

    it("answers /healthz and /metrics without a token", function()
        if pend() then return end
        local j = expect(200, nil, http("GET", "/healthz"))
        assert.are.equal("ok", j.status)
        local status, _, text = http("GET", "/metrics")
        assert.are.equal(200, status)
        assert.truthy(text:find('softcxi_http_requests_total{route="healthz",status="200"}', 1, true), text)
        assert.truthy(text:find("# TYPE softcxi_http_request_duration_seconds histogram", 1, true), text)
    end)

    it("creates a key: id, url, verified attributes, public key as PEM and JWK", function()
        if pend() then return end
        local j = expect(201, nil, http("POST", "/v1/keys", { algo = "ec", name = "dev-1" }, tok.iot))
        assert.are.equal("iot/dev-1", j.id)
        assert.are.equal(IOT, j.url)
        assert.are.equal("iot", j.group)
        assert.is_true(j.verified)
        assert.truthy(j.public_key.pem:find("^%-%-%-%-%-BEGIN PUBLIC KEY%-%-%-%-%-"))
        assert.are.equal("EC", j.public_key.jwk.kty)
        assert.are.equal("P-256", j.public_key.jwk.crv)
    end)

    it("GET gives the device-verified attributes and public key", function()
        if pend() then return end
        local j = expect(200, nil, http("GET", IOT, nil, tok.iot))
        assert.are.equal("iot/dev-1", j.id)
        assert.is_true(j.verified)
        assert.are.same({ "sign", "verify" }, j.usage)
        assert.truthy(j.public_key.pem:find("BEGIN PUBLIC KEY", 1, true))
    end)

    it("signs and verifies; a changed message does not verify", function()
        if pend() then return end
        local j = expect(200, nil, http("POST", IOT .. "/sign", { data = b64("firmware v1") }, tok.iot))
        assert.are.equal("ecdsa-sha256", j.mech)
        local sig = j.signature
        assert.is_string(H.b64decode(sig))
        j = expect(200, nil, http("POST", IOT .. "/verify", { data = b64("firmware v1"), signature = sig },
            tok.iot))
        assert.is_true(j.valid)
        j = expect(200, nil, http("POST", IOT .. "/verify", { data = b64("firmware v2"), signature = sig },
            tok.iot))
        assert.is_false(j.valid)
    end)

    it("encrypts and decrypts with an aes key, with and without aad", function()
        if pend() then return end
        expect(201, nil, http("POST", "/v1/keys", { algo = "aes", name = "box", group = "lab" }, tok.lab))
        local url = "/v1/keys/lab%2Fbox"
        local j = expect(200, nil, http("POST", url .. "/encrypt", { data = b64("secret data") }, tok.lab))
        assert.are.equal("aes-gcm", j.mech)
        j = expect(200, nil, http("POST", url .. "/decrypt", { ciphertext = j.ciphertext }, tok.lab))
        assert.are.equal(b64("secret data"), j.data)
        j = expect(200, nil, http("POST", url .. "/encrypt", { data = b64("d"), aad = b64("hdr") }, tok.lab))
        local ct = j.ciphertext
        expect(200, nil, http("POST", url .. "/decrypt", { ciphertext = ct, aad = b64("hdr") }, tok.lab))
        -- wrong aad, or an altered ciphertext: the client's fault, 400 ETAMPER
        expect(400, "ETAMPER", http("POST", url .. "/decrypt", { ciphertext = ct, aad = b64("x") }, tok.lab))
        local raw = H.b64decode(ct)
        local bad = b64(H.bytebump(raw, #raw))
        expect(400, "ETAMPER", http("POST", url .. "/decrypt", { ciphertext = bad, aad = b64("hdr") },
            tok.lab))
    end)

    it("401 without a token, with an unknown one or a malformed header", function()
        if pend() then return end
        local status, j = http("POST", IOT .. "/sign", { data = b64("m") })
        expect(401, "EAUTH", status, j, "")
        expect(401, "EAUTH", http("GET", IOT, nil, "not-a-token"))
        expect(401, "EAUTH", http("GET", IOT, nil, nil, { "Authorization: Basic " .. tok.iot }))
        expect(401, "EAUTH", http("POST", "/v1/keys", { algo = "ec", name = "x" }))
    end)

    it("403: a token never touches another group's keys, nor makes them", function()
        if pend() then return end
        expect(403, "EACCESS", http("GET", IOT, nil, tok.lab))
        expect(403, "EACCESS", http("POST", IOT .. "/sign", { data = b64("m") }, tok.lab))
        expect(403, "EACCESS", http("POST", IOT .. "/verify", { data = b64("m"), signature = b64("s") },
            tok.lab))
        expect(403, "EACCESS", http("DELETE", IOT, nil, tok.lab))
        expect(403, "EACCESS", http("POST", "/v1/keys", { algo = "ec", name = "x", group = "iot" }, tok.lab))
        expect(200, nil, http("GET", IOT, nil, tok.iot)) -- still there
    end)

    it("400 for bad JSON, bad base64, bad fields and templates the device refuses", function()
        if pend() then return end
        expect(400, "EINVAL", http("POST", IOT .. "/sign", "{not json", tok.iot))
        expect(400, "EINVAL", http("POST", IOT .. "/sign", '"a string"', tok.iot))
        expect(400, "EINVAL", http("POST", IOT .. "/sign", "", tok.iot))
        local j = expect(400, "EINVAL",
            http("POST", IOT .. "/sign", { data = "***not base64***" }, tok.iot))
        assert.truthy(j.error:find("'data' is not valid base64", 1, true), j.error)
        expect(400, "EINVAL", http("POST", IOT .. "/sign", { data = 42 }, tok.iot))
        expect(400, "EINVAL", http("POST", IOT .. "/verify", { data = b64("m"), signature = "%%" }, tok.iot))
        expect(400, "EINVAL", http("POST", IOT .. "/sign", { data = b64("m"), mech = "rot13" }, tok.iot))
        expect(400, "EINVAL", http("POST", "/v1/keys", "[1,2", tok.iot))
        expect(400, "EINVAL", http("POST", "/v1/keys", { algo = "ec", name = "u", usage = { "fly" } },
            tok.iot))
        expect(400, "EINVAL", http("POST", "/v1/keys", { algo = "ec", name = "u", id = 5 }, tok.iot))
    end)

    it("404 for an unknown key or endpoint, 405 for a wrong method", function()
        if pend() then return end
        expect(404, "ENOTFOUND", http("GET", "/v1/keys/iot%2Fnobody", nil, tok.iot))
        expect(404, "ENOTFOUND", http("POST", "/v1/keys/iot%2Fnobody/sign", { data = b64("m") }, tok.iot))
        expect(404, "ENOTFOUND", http("GET", "/v2/nothing", nil, tok.iot))
        expect(405, "EINVAL", http("GET", IOT .. "/sign", nil, tok.iot))
    end)

    it("409 when the id exists", function()
        if pend() then return end
        local j = expect(409, "EEXIST", http("POST", "/v1/keys", { algo = "ec", name = "dev-1" }, tok.iot))
        assert.truthy(j.error:find("iot/dev-1", 1, true), j.error)
    end)

    it("422 when the policy refuses the template or the store id", function()
        if pend() then return end
        local j = expect(422, "EPOLICY", http("POST", "/v1/keys", { algo = "rsa", name = "r" }, tok.iot))
        assert.truthy(j.error:find("denied by policy 'keyservice': algorithm 'rsa' is not allowed", 1, true),
            j.error)
        expect(422, "EPOLICY", http("POST", "/v1/keys", { algo = "ec", name = "Bad Name" }, tok.iot))
        expect(422, "EPOLICY",
            http("POST", "/v1/keys", { algo = "ec", curve = "P-521", name = "c" }, tok.iot))
        j = expect(422, "EPOLICY", http("POST", "/v1/keys", { algo = "ec", name = "s", id = "lab/s" },
            tok.iot))
        assert.truthy(j.error:find("stored under 'iot/...'", 1, true), j.error)
        expect(404, "ENOTFOUND", http("GET", "/v1/keys/lab%2Fs", nil, tok.lab)) -- nothing was stored
    end)

    it("DELETE revokes and removes the key", function()
        if pend() then return end
        expect(201, nil, http("POST", "/v1/keys", { algo = "ed25519", name = "gone" }, tok.iot))
        local url = "/v1/keys/iot%2Fgone"
        local j = expect(200, nil, http("POST", url .. "/sign", { data = b64("m") }, tok.iot))
        assert.are.equal("ed25519", j.mech)
        local status = http("DELETE", url, nil, tok.iot)
        assert.are.equal(204, status)
        expect(404, "ENOTFOUND", http("GET", url, nil, tok.iot))
        expect(404, "ENOTFOUND", http("DELETE", url, nil, tok.iot))
    end)

    it("2 workers under concurrent requests: every answer right, nothing in the error log", function()
        if pend() then return end
        local master = assert(H.readfile(prefix .. "/logs/nginx.pid")):match("%d+")
        local _, kids = H.run("ps --ppid " .. master .. " -o pid= | wc -l")
        assert.are.equal(2, tonumber(kids))
        local req = prefix .. "/conc.json"
        H.writefile(req, assert(cjson.encode { data = b64("load") }))
        local curl = "curl -s -o /dev/null -w '%{http_code}\\n' -H "
            .. H.q("Authorization: Bearer " .. tok.iot)
            .. " --data-binary @" .. H.q(req) .. " " .. H.q(base .. IOT .. "/sign")
        local rc, out = H.run("seq 1 120 | xargs -P 8 -I{} sh -c " .. H.q(curl))
        assert.are.equal(0, rc, out)
        local n, ok = 0, 0
        for code in out:gmatch("%d+") do
            n = n + 1
            if code == "200" then ok = ok + 1 end
        end
        assert.are.equal(120, n, out)
        assert.are.equal(120, ok, out)
        local log = H.readfile(prefix .. "/logs/error.log") or ""
        for _, level in ipairs { "[error]", "[crit]", "[alert]", "[emerg]" } do
            assert.is_nil(log:find(level, 1, true), log)
        end
        local status, _, text = http("GET", "/metrics")
        assert.are.equal(200, status)
        local signed = text:match('softcxi_http_requests_total{route="sign",status="200"} (%d+)')
        assert.is_true(tonumber(signed) >= 120, text)
        -- the histogram is cumulative: each bucket holds the ones below it, +Inf is the count
        local H_ = "softcxi_http_request_duration_seconds"
        local last, inf = 0, nil
        for le, v in text:gmatch(H_ .. '_bucket{route="sign",le="([^"]+)"} (%d+)') do
            assert.is_true(tonumber(v) >= last, text)
            last = tonumber(v)
            if le == "+Inf" then inf = last end
        end
        assert.are.equal(tonumber(text:match(H_ .. '_count{route="sign"} (%d+)')), inf, text)
        assert.is_true(inf >= 120, text)
        -- the workers' cache counters are not routes
        assert.is_nil(text:find('_bucket{route="%d+"'), text)
        -- each worker opened the key once and then served it from its bounded cache
        local hits = 0
        for h in text:gmatch('softcxi_device_cache{worker="%d+",field="hits"} (%d+)') do
            hits = hits + tonumber(h)
        end
        assert.is_true(hits >= 100, text)
    end)

    it("reaches Redis over its Unix socket (redis+unix://), not TCP", function()
        if pend() then return end
        local out = H.readfile(prefix .. "/run.out") or ""
        local sock = out:match("and unix:(%S+) %(the service uses the socket%)")
        assert.truthy(sock, out)
        assert.are.equal(prefix .. "/redis/redis.sock", sock)
        -- a request that needs Redis, then the server's own list of its clients
        expect(404, "ENOTFOUND", http("POST", "/v1/keys/iot%2Fno-such-key/sign", { data = b64("m") },
                                      tok.iot))
        local rc, clients = H.run("redis-cli -p " .. redis_port .. " client list")
        assert.are.equal(0, rc, clients)
        local by_sock, by_tcp = 0, 0
        for line in clients:gmatch("[^\n]+") do
            if not line:find("cmd=client", 1, true) then -- not redis-cli itself
                if line:find("addr=" .. sock, 1, true) then by_sock = by_sock + 1
                elseif line:find("addr=127.0.0.1:", 1, true) then by_tcp = by_tcp + 1 end
            end
        end
        assert.is_true(by_sock >= 1, clients)
        assert.are.equal(0, by_tcp, clients)
    end)

    it("run refuses bad options before starting anything", function()
        if pend() then return end
        local run = "SOFTCXI_NO_APT=1 " .. H.q(root .. "/examples/openresty/run")
        local rc, out = H.run(run .. " --bogus")
        assert.are.equal(2, rc)
        assert.truthy(out:find("run: unknown option '--bogus'", 1, true), out)
        assert.truthy(out:find("--redis-port N", 1, true), out) -- the usage follows
        rc, out = H.run(run .. " --port 0")
        assert.are.equal(1, rc)
        assert.truthy(out:find("a port is a number from 1 to 65535, not '0'", 1, true), out)
        rc, out = H.run(run .. " --redis-port http")
        assert.are.equal(1, rc)
        assert.truthy(out:find("not 'http'", 1, true), out)
        rc, out = H.run(run .. " --port 30001 --redis-port 30001")
        assert.are.equal(1, rc)
        assert.truthy(out:find("--port and --redis-port must differ", 1, true), out)
        rc, out = H.run(run .. " --workers 0")
        assert.are.equal(1, rc)
        assert.truthy(out:find("--workers takes 1 to 99, not '0'", 1, true), out)
        rc, out = H.run(run .. " --redis-via pipe")
        assert.are.equal(1, rc)
        assert.truthy(out:find("--redis-via takes unix or tcp, not 'pipe'", 1, true), out)
        local taken = base:match("%d+$")
        rc, out = H.run(run .. " --port " .. taken)
        assert.are.equal(1, rc)
        assert.truthy(out:find("127.0.0.1:" .. taken .. " is taken", 1, true), out)
        rc, out = H.run(run .. " --help")
        assert.are.equal(0, rc)
        assert.truthy(out:find("listening on http://127.0.0.1:N", 1, true), out)
    end)

    it("503 while Redis is down, and /healthz says so", function()
        if pend() then return end
        H.run("redis-cli -p " .. redis_port .. " shutdown nosave") -- the reply may never come
        for _ = 1, 100 do -- until the port is closed
            if H.run("redis-cli -p " .. redis_port .. " ping") ~= 0 then break end
            sleep(0.05)
        end
        expect(503, nil, http("POST", IOT .. "/sign", { data = b64("m") }, tok.iot))
        local status, j = http("GET", "/healthz")
        assert.are.equal(503, status)
        assert.truthy(j.error:find("redis", 1, true), j.error)
        expect(503, nil, http("POST", "/v1/keys", { algo = "ec", name = "later" }, tok.iot))
        -- the token is still checked first
        expect(401, "EAUTH", http("POST", IOT .. "/sign", { data = b64("m") }))
    end)
end)
