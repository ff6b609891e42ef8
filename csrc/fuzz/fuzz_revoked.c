/*
 * fuzz_revoked.c - libFuzzer target for revoked.db, the revocation list
 * (revoke.c: load_payload, walk), through scx_revoked_reload (what every
 * process runs when the generation moves) and softcxi_key_revoked (the
 * listing).
 *
 * Input: mode byte, then the rest.
 *   mode & 1 == 0  the rest is revoked.db as it lies on disk;
 *   mode & 1 == 1  the rest is the plaintext list, sealed here under the
 *                  device's storage key.
 * Both readers must agree on whether the list is well formed, and the
 * reload must count every entry the listing shows.
 */
#include "fuzz_util.h"

static int on_entry(void *ctx, const char *id_hex, int64_t t, const char *g, const char *n,
                    const char *r)
{
    (void)t;
    (*(size_t *)ctx)++;
    fz_check_str(id_hex, 64);
    fz_check_str(g, 255);
    fz_check_str(n, 255);
    fz_check_str(r, 255);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    softcxi_session *s = fz_device();
    if (!s || size < 1)
        return 0;
    softcxi_device *dev = softcxi_session_device(s);
    char path[600];
    snprintf(path, sizeof path, "%s/revoked.db", dev->path);

    uint8_t *sealed = NULL;
    size_t len = size - 1;
    const uint8_t *file = data + 1;
    if (data[0] & 1) {
        sealed = fz_seal(&len, SCX_TYPE_REVOKED, dev->sec->storage_key, NULL, NULL, 0, data + 1,
                         size - 1);
        if (!sealed)
            return 0;
        file = sealed;
    }
    if (fz_write(path, file, len) == 0) {
        softcxi_error err;
        size_t listed = 0;
        int a = fz_trace("revoked_reload", scx_revoked_reload(dev, &err), &err);
        int b = softcxi_key_revoked(s, on_entry, &listed);
        if ((a == 0) != (b == 0) || (a == 0 && listed != dev->nrevoked))
            __builtin_trap();
    }
    OPENSSL_free(sealed);
    (void)unlink(path);
    softcxi_error err;
    (void)scx_revoked_reload(dev, &err); /* back to an empty list */
    return 0;
}
