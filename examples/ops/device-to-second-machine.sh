#!/usr/bin/env bash
# Back up a device and restore it onto a second machine: the second device
# imports the same MBK from 2 of the 3 key share files (carried over by their
# custodians), then restores the internal key database image; external blobs
# work there unchanged.
#
#   device-to-second-machine.sh NEW_DEVICE_DIR SHARE_PASSWORD_FILE SHARE1 SHARE2
#   (SHARE_PASSWORD_FILE: one line per share given, in order)
# The new device gets the same administrator password (ADMIN_PW_FILE) and
# key user (KEY_USER, USER_PW_FILE, groups GROUPS_LIST, default iot).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
new=${1:?NEW_DEVICE_DIR} pwfile=${2:?SHARE_PASSWORD_FILE}
shift 2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# on the first machine
softcxi "${admin[@]}" db backup "$work/keys.db.backup"
# on the second machine
export SOFTCXI_DEVICE=$new
unset SOFTCXI_DEVICE_KEY
softcxi --device-key "$new.key" "${admin[@]}" init
export SOFTCXI_DEVICE_KEY="$new.key"
softcxi "${admin[@]}" mbk import "$@" --share-passwords "$pwfile"
softcxi "${admin[@]}" db restore "$work/keys.db.backup"
softcxi "${admin[@]}" user add "$key_user" --groups "${GROUPS_LIST:-iot}" --new-password-file "$USER_PW_FILE"
softcxi "${user[@]}" key list
