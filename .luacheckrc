-- luacheck configuration: lua/ runs under Lua 5.4 and LuaJIT (5.1 API).
std = "max"
max_line_length = 110
files["spec/"] = { std = "+busted" }
files["bench/"] = { max_line_length = 120 }
exclude_files = { "build*/**" }
files["examples/openresty/"] = { std = "max+ngx_lua" }
-- the nginx transport runs where OpenResty's ngx API is a global
files["lua/softcxi/store/redis_transport_resty.lua"] = { read_globals = { "ngx" } }
files["spec/nginx/"] = { read_globals = { "ngx" } }
