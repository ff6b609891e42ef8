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

local ngx = ngx
local pairs, ipairs, tostring, tonumber = pairs, ipairs, tostring, tonumber
local str_format, table_concat, table_sort = string.format, table.concat, table.sort

local _M = {}

-- Upper bounds of the latency buckets, in seconds.
local BUCKETS = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1 }

local function dict()
    return ngx.shared.keyservice_metrics
end

--- Count one request of route with its status and duration (seconds).
function _M.observe(route, status, seconds)
    local d = dict()
    if not d then return end
    d:incr("r|" .. route .. "|" .. tostring(status), 1, 0)
    for i, le in ipairs(BUCKETS) do
        if seconds <= le then d:incr("b|" .. route .. "|" .. i, 1, 0) end
    end
    d:incr("c|" .. route, 1, 0)
    d:incr("s|" .. route, seconds, 0)
end

-- This worker's device cache counters (hsm:device_info()), kept for a while:
-- a worker that is gone drops out of /metrics once they expire.
local CACHE_FIELDS = { "cache_hits", "cache_misses", "cache_evictions", "cache_entries" }
local WORKER_TTL = 600

function _M.device(info)
    local d = dict()
    if not d or not info then return end
    local pid = ngx.worker.pid()
    for _, f in ipairs(CACHE_FIELDS) do
        d:set("w|" .. pid .. "|" .. f, info[f] or 0, WORKER_TTL)
    end
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
        if route then routes[route] = true end
    end
    out[#out + 1] = "# HELP softcxi_http_request_duration_seconds Request latency by route."
    out[#out + 1] = "# TYPE softcxi_http_request_duration_seconds histogram"
    local names = {}
    for r in pairs(routes) do names[#names + 1] = r end
    table_sort(names)
    for _, r in ipairs(names) do
        for i, le in ipairs(BUCKETS) do
            out[#out + 1] = str_format('softcxi_http_request_duration_seconds_bucket{route="%s",le="%s"} %d',
                r, tostring(le), d:get("b|" .. r .. "|" .. i) or 0)
        end
        local count = tonumber(d:get("c|" .. r)) or 0
        out[#out + 1] = str_format('softcxi_http_request_duration_seconds_bucket{route="%s",le="+Inf"} %d',
            r, count)
        out[#out + 1] = str_format('softcxi_http_request_duration_seconds_sum{route="%s"} %.6f', r,
            tonumber(d:get("s|" .. r)) or 0)
        out[#out + 1] = str_format('softcxi_http_request_duration_seconds_count{route="%s"} %d', r, count)
    end
    out[#out + 1] = "# HELP softcxi_device_cache The opened-key cache of each worker's device session."
    out[#out + 1] = "# TYPE softcxi_device_cache gauge"
    for _, k in ipairs(keys) do
        local pid, f = k:match("^w|(%d+)|(.+)$")
        if pid then
            out[#out + 1] = str_format('softcxi_device_cache{worker="%s",field="%s"} %d', pid,
                f:sub(7), d:get(k) or 0)
        end
    end
    return table_concat(out, "\n") .. "\n"
end

return _M
