-- `--out FILE` of the softcxi command (softcxi.cli.util.write_file): a regular file is
-- written durably (temp file, fsync, rename); a FIFO or a device is written to, never
-- replaced.  The rename used to put a regular file in the device's place: run as root,
-- `softcxi sign ... --out /dev/null` replaced /dev/null itself, and everything run
-- afterwards as another user (initdb) failed on "cannot create /dev/null".

local H = dofile((debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./") .. "helpers.lua")
local util = require "softcxi.cli.util"
local sys = require "softcxi.sys"

describe("cli write_file", function()
    local dir
    before_each(function() dir = H.tmpdir() end)
    after_each(function() H.rm_rf(dir) end)

    it("writes a regular file whole", function()
        util.write_file(dir .. "/out.bin", "\0bytes\255")
        assert.are.equal("\0bytes\255", H.readfile(dir .. "/out.bin"))
        util.write_file(dir .. "/out.bin", "again")
        assert.are.equal("again", H.readfile(dir .. "/out.bin"))
    end)

    it("writes into a FIFO and leaves it a FIFO", function()
        local fifo = dir .. "/pipe"
        assert(H.run("mkfifo " .. H.q(fifo)) == 0)
        -- a reader in the background (gone after 10 s whatever happens), or opening the
        -- FIFO for writing blocks
        assert(H.run("timeout 10 cat " .. H.q(fifo) .. " > " .. H.q(dir .. "/got") .. " 2>/dev/null &") == 0)
        util.write_file(fifo, "through the pipe")
        assert.are.equal("other", assert(sys.stat(fifo)).type)
        local rc, kind = H.run("stat -c %F " .. H.q(fifo))
        assert.are.equal(0, rc)
        assert.truthy(kind:find("fifo", 1, true), kind)
        for _ = 1, 100 do
            if H.readfile(dir .. "/got") == "through the pipe" then break end
            os.execute("sleep 0.05")
        end
        assert.are.equal("through the pipe", H.readfile(dir .. "/got"))
        local _, listing = H.run("ls -a " .. H.q(dir))
        assert.is_nil(listing:find("%.tmp"), listing)      -- no temp file left behind
    end)
end)
