-- wrk script for bench/openresty: POST /v1/keys/{id}/sign, the key chosen
-- round-robin from BENCH_KEYS keys named bench-0001..., so every request
-- fetches a blob from Redis (the device's opened-key cache then has it).
-- Environment: BENCH_TOKEN (bearer token), BENCH_KEYS (number of keys).
-- luacheck: globals wrk request

local token = assert(os.getenv("BENCH_TOKEN"), "BENCH_TOKEN is not set")
local nkeys = tonumber(os.getenv("BENCH_KEYS") or "1")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.body = '{"data":"ZmlybXdhcmUgbWFuaWZlc3QgdjEuMi4z"}' -- "firmware manifest v1.2.3"

local i = 0
function request()
    i = i % nkeys + 1
    return wrk.format(nil, string.format("/v1/keys/iot%%2Fbench-%04d/sign", i))
end
