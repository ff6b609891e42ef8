#!/usr/bin/env bash
# Rotate the MBK: a new 2-of-3 MBK as key share files, every blob of each
# store re-sealed under it, then the old MBK retired -- only if every store
# was rewrapped completely.
#
#   rotate-mbk.sh SHARE_DIR SHARE_PASSWORD_FILE STORE_URL...
#   (SHARE_PASSWORD_FILE: three lines, one password per share)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
shares=${1:?SHARE_DIR} pwfile=${2:?SHARE_PASSWORD_FILE}
shift 2
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$shares"
old=$(softcxi --json mbk info | json_field current)
softcxi "${admin[@]}" mbk rotate --m 2 --n 3 --share-passwords "$pwfile" \
    --out "$shares/mbk-$stamp-1.key,$shares/mbk-$stamp-2.key,$shares/mbk-$stamp-3.key"
for store in "$@"; do
    softcxi "${user[@]}" rewrap --store "$store"   # exits 1 if any blob was left behind
done
softcxi "${admin[@]}" mbk retire "$old"
softcxi mbk info
