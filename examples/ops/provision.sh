#!/usr/bin/env bash
# Provision device keys into a key store, creating the device and its key
# user on first use.  Re-running resumes an interrupted run.
#
#   provision.sh STORE_URL COUNT [GROUP]
#   e.g. SOFTCXI_DEVICE=./hsm ADMIN_PW_FILE=admin.pw USER_PW_FILE=user.pw \
#        examples/ops/provision.sh file:./keystore 100000 iot
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
store=${1:?STORE_URL} count=${2:?COUNT} group=${3:-iot}
if ! softcxi -q state 2>/dev/null; then
    softcxi "${admin[@]}" init
    softcxi "${admin[@]}" user add "$key_user" --groups "$group" --new-password-file "$USER_PW_FILE"
fi
softcxi "${user[@]}" provision --algo ec --curve P-256 --group "$group" --usage sign,verify \
    --count "$count" --name 'dev-%08d' --store "$store"
softcxi store stats --scan "$store"
