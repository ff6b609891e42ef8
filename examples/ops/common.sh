# Sourced by the ops examples: the softcxi command from this source tree (or
# the one on PATH), and the credentials every example takes from the
# environment:
#   SOFTCXI_DEVICE, SOFTCXI_DEVICE_KEY  the device (state dir, device key file)
#   ADMIN_PW_FILE                       password file of the administrator ADMIN
#   KEY_USER, USER_PW_FILE              the key user (default "provisioner")
set -euo pipefail
ops_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -x "$ops_root/bin/softcxi" ] && [ -d "$ops_root/lua/softcxi" ]; then
    softcxi() { "${SOFTCXI_LUA:-lua5.4}" "$ops_root/bin/softcxi" "$@"; }
fi
: "${SOFTCXI_DEVICE:?set SOFTCXI_DEVICE to the device state directory}"
: "${ADMIN_PW_FILE:?set ADMIN_PW_FILE to the administrator password file}"
export SOFTCXI_DEVICE
key_user=${KEY_USER:-provisioner}
admin=(--user ADMIN --password-file "$ADMIN_PW_FILE")
user=(--user "$key_user" --password-file "${USER_PW_FILE:-/dev/null}")
json_field() { # json_field FIELD < json
    FIELD=$1 "${SOFTCXI_LUA:-lua5.4}" -e 'local v = require("cjson").decode(io.read("*a"))[os.getenv("FIELD")]
        print(type(v) == "number" and string.format("%.0f", v) or tostring(v))'
}
