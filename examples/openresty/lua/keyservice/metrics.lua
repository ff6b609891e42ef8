-- keyservice.metrics: request counts and latencies in a lua_shared_dict
-- (keyservice_metrics), shared by every worker, rendered in the Prometheus
-- text format (version 0.0.4).
--
--   softcxi_http_requests_total{route="sign",status="200"} 42
--   softcxi_http_request_duration_seconds_bucket{route="sign",le="0.005"} 40
--   softcxi_http_request_duration_seconds_sum{route="sign"} 0.081
--   softcxi_http_request_duration_seconds_count{route="sign"} 42
--   softcxi_device_cache{worker="1234",field="hits"} 40    (per worker: hits, misses,
--                                                            evictions, entries)
--
-- Only a few keys per route: no per-key or per-token label, so the dict stays
-- small whatever the traffic.
--
-- A request costs three updates of the dict (each takes its lock, shared with
-- the other workers): its route-and-status count, the one latency bucket it falls
-- in (the cumulative Prometheus buckets and the count are summed when rendered)
-- and the sum of latencies; the device's cache counters of the worker are a
-- fourth, one value for all four.  Keys: "r|route|status", "h|route|bucket" (not
-- cumulative: a dict kept across `nginx -s reload` may still hold the cumulative "b|"
-- keys of earlier versions, which are ignored), "s|route", "w|pid".

local ngx = ngx
local pairs, ipairs, tostring, tonumber = pairs, ipairs, tostring, tonumber
local str_format, str_match, table_concat, table_sort = string.format, string.match, table.concat,
    table.sort

local _M = {}

-- Upper bounds of the latency buckets, in seconds.
local BUCKETS = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1 }

local function dict()
    return ngx.shared.keyservice_metrics
end

local NB = #BUCKETS -- bucket NB + 1 holds what is above the last bound (+Inf)

-- The dict keys of a route, made once: routes and statuses are few.
local keys_of = {}
local function route_keys(route)
    local k = keys_of[route]
    if not k then
        k = { status = {}, bucket = {}, sum = "s|" .. route }
        for i = 1, NB + 1 do k.bucket[i] = "h|" .. route .. "|" .. i end
        keys_of[route] = k
    end
    return k
end

--- Count one request of route with its status and duration (seconds).
function _M.observe(route, status, seconds)
    local d = dict()
    if not d then return end
    local k = route_keys(route)
    local sk = k.status[status]
    if not sk then
        sk = "r|" .. route .. "|" .. tostring(status)
        k.status[status] = sk
    end
    d:incr(sk, 1, 0)
    local i = 1
    while i <= NB and seconds > BUCKETS[i] do i = i + 1 end
    d:incr(k.bucket[i], 1, 0)
    d:incr(k.sum, seconds, 0)
end

-- This worker's device cache counters (hsm:device_info()), one value
-- "hits misses evictions entries", kept for a while: a worker that is gone
-- drops out of /metrics once it expires.
local CACHE_FIELDS = { "hits", "misses", "evictions", "entries" }
local WORKER_TTL = 600
local worker_key -- "w|<pid>", once per worker

function _M.device(info)
    local d = dict()
    if not d or not info then return end
    worker_key = worker_key or ("w|" .. ngx.worker.pid())
    d:set(worker_key, str_format("%d %d %d %d", info.cache_hits or 0, info.cache_misses or 0,
                                 info.cache_evictions or 0, info.cache_entries or 0), WORKER_TTL)
end

--- The metrics as Prometheus text.
function _M.render()
    local d = dict()
    local out = {
        "# HELP softcxi_http_requests_total Requests by route and status.",
        "# TYPE softcxi_http_requests_total counter",
    }
    if not d then return table_concat(out, "\n") .. "\n" end
    local keys = d:get_keys(0)
    table_sort(keys)
    local routes = {}
    for _, k in ipairs(keys) do
        local kind, route, rest = k:match("^(%a)|([^|]+)|?(.*)$")
        if kind == "r" then
            out[#out + 1] = str_format('softcxi_http_requests_total{route="%s",status="%s"} %d',
                route, rest, d:get(k) or 0)
        end
        if kind == "r" then routes[route] = true end -- not "w|<pid>": a worker, not a route
    end
    out[#out + 1] = "# HELP softcxi_http_request_duration_seconds Request latency by route."
    out[#out + 1] = "# TYPE softcxi_http_request_duration_seconds histogram"
    local names = {}
    for r in pairs(routes) do names[#names + 1] = r end
    table_sort(names)
    for _, r in ipairs(names) do
        local count = 0
        for i, le in ipairs(BUCKETS) do
            count = count + (tonumber(d:get("h|" .. r .. "|" .. i)) or 0)
            out[#out + 1] = str_format('softcxi_http_request_duration_seconds_bucket{route="%s",le="%s"} %d',
                r, tostring(le), count)
        end
        count = count + (tonumber(d:get("h|" .. r .. "|" .. (NB + 1))) or 0)
        out[#out + 1] = str_format('softcxi_http_request_duration_seconds_bucket{route="%s",le="+Inf"} %d',
            r, count)
        out[#out + 1] = str_format('softcxi_http_request_duration_seconds_sum{route="%s"} %.6f', r,
            tonumber(d:get("s|" .. r)) or 0)
        out[#out + 1] = str_format('softcxi_http_request_duration_seconds_count{route="%s"} %d', r, count)
    end
    out[#out + 1] = "# HELP softcxi_device_cache The opened-key cache of each worker's device session."
    out[#out + 1] = "# TYPE softcxi_device_cache gauge"
    for _, k in ipairs(keys) do
        local pid = str_match(k, "^w|(%d+)$")
        local v = pid and d:get(k)
        if v then
            local n = { str_match(v, "^(%d+) (%d+) (%d+) (%d+)$") }
            for i, f in ipairs(CACHE_FIELDS) do
                out[#out + 1] = str_format('softcxi_device_cache{worker="%s",field="%s"} %s', pid, f,
                    n[i] or "0")
            end
        end
    end
    return table_concat(out, "\n") .. "\n"
end

return _M
