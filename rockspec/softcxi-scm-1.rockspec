-- softcxi: a software HSM for unmanaged (external) keys.
-- Installs offline: luarocks --lua-version=5.4 make --deps-mode=none rockspec/softcxi-scm-1.rockspec
-- LuaJIT: luarocks --lua-version=5.1 make ... LUA_INCDIR=/usr/include/luajit-2.1
-- (needs cmake, libssl-dev; for 5.1/LuaJIT also lua-compat53-dev).
rockspec_format = "3.0"
package = "softcxi"
version = "scm-1"
source = { url = "git+file:///dev/null" }
description = {
   summary = "Software HSM for unmanaged keys: MBK-sealed external key blobs, in C with a Lua face",
   detailed = [[
softcxi emulates a CXI-style CryptoServer for external keys: keys are generated
on the device and come back sealed under its Master Backup Key as blobs that
the application stores; every sign/decrypt hands the blob back.]],
   license = "MIT",
}
-- argparse and lua-cjson come from Debian (lua-argparse, lua-cjson): hence --deps-mode=none.
dependencies = { "lua >= 5.1", "argparse >= 0.7", "lua-cjson >= 2.1" }
build = {
   type = "cmake",
   variables = {
      CMAKE_INSTALL_PREFIX = "$(PREFIX)",
      CMAKE_BUILD_TYPE = "Release",
      CMAKE_C_FLAGS = "$(CFLAGS)",
      SOFTCXI_TESTS = "OFF",
      SOFTCXI_LUAJIT = "OFF",
      SOFTCXI_INSTALL_LIB = "OFF", -- a rock carries the Lua module only
      SOFTCXI_INSTALL_BIN = "OFF", -- LuaRocks installs the command itself (build.install.bin)
      LUA_INCDIR = "$(LUA_INCDIR)",
      INSTALL_CMOD = "$(LIBDIR)",
      INSTALL_LMOD = "$(LUADIR)",
   },
   install = { bin = { softcxi = "bin/softcxi" } },
}
test = { type = "command", command = "./run test" }
