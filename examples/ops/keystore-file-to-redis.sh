#!/usr/bin/env bash
# Move a key store from files to Redis: copy every blob (resumable, bounded
# memory), check the counts match, and spot-check one key by signing with it
# from the new store.  The file store is left as it is: delete it once the
# application reads from Redis.
#
#   keystore-file-to-redis.sh FILE_STORE_URL REDIS_URL SAMPLE_ID
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
from=${1:?FILE_STORE_URL} to=${2:?REDIS_URL} sample=${3:?SAMPLE_ID}
softcxi store migrate --from "$from" --to "$to"
n_from=$(softcxi --json store stats "$from" | json_field count)
n_to=$(softcxi --json store stats "$to" | json_field count)
if [ "$n_from" != "$n_to" ]; then
    echo "keystore-file-to-redis: $from has $n_from keys but $to has $n_to" >&2
    exit 1
fi
printf 'migration check' | softcxi "${user[@]}" sign --store "$to" "$sample" --out /dev/null
echo "moved $n_to keys from $from to $to; $sample signs from the new store"
