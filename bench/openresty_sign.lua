-- wrk script for bench/openresty: POST /v1/keys/{id}/sign, the key chosen
-- round-robin from BENCH_KEYS keys named bench-0001..., so every request
-- fetches a blob from Redis (the device's opened-key cache then has it).
-- Environment: BENCH_TOKEN (bearer token), BENCH_KEYS (number of keys).
-- The requests are formatted once per wrk thread (init), not per request:
-- wrk runs on the cores it measures, so its own Lua work counts against the
-- service.
-- luacheck: globals wrk init request

local token = assert(os.getenv("BENCH_TOKEN"), "BENCH_TOKEN is not set")
local nkeys = tonumber(os.getenv("BENCH_KEYS") or "1")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.body = '{"data":"ZmlybXdhcmUgbWFuaWZlc3QgdjEuMi4z"}' -- "firmware manifest v1.2.3"

local requests = {}
local i = 0

function init()
    for k = 1, nkeys do
        requests[k] = wrk.format(nil, string.format("/v1/keys/iot%%2Fbench-%04d/sign", k))
    end
end

function request()
    i = i % nkeys + 1
    return requests[i]
end
