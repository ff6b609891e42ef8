/*
 * fuzz_users.c - libFuzzer target for users.db (users.c: users_load and
 * the payload it deserializes), reached through softcxi_user_list, which
 * reads the file afresh on every call.
 *
 * Input: mode byte, then the rest.
 *   mode & 1 == 0  the rest is users.db as it lies on disk (framing, KCV,
 *                  tag: what anyone with write access to the directory can
 *                  put there);
 *   mode & 1 == 1  the rest is the plaintext payload, sealed here under the
 *                  device's users key, so the deserializer sees it.
 * The list must come back complete or fail; every string it hands out is a
 * bounded C string.  Logon is not called: it runs scrypt at the cost the
 * record says.
 */
#include "fuzz_util.h"

static int on_user(void *ctx, const softcxi_user_info *u)
{
    (*(size_t *)ctx)++;
    fz_check_str(u->name, SCX_USER_NAME_MAX);
    fz_check_str(u->groups, SCX_GROUPS_MAX);
    if (!u->role)
        __builtin_trap();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    softcxi_session *s = fz_device();
    if (!s || size < 1)
        return 0;
    softcxi_device *dev = softcxi_session_device(s);
    static uint8_t *good;
    static size_t good_len;
    char path[600];
    snprintf(path, sizeof path, "%s/users.db", dev->path);
    if (!good) { /* keep the real file: it goes back after each input */
        FILE *f = fopen(path, "rb");
        good = malloc(1 << 16);
        good_len = f && good ? fread(good, 1, 1 << 16, f) : 0;
        if (f)
            fclose(f);
    }

    uint8_t *sealed = NULL;
    size_t len = size - 1;
    const uint8_t *file = data + 1;
    if (data[0] & 1) {
        sealed = fz_seal(&len, SCX_TYPE_USERS, dev->sec->state_key, NULL, NULL, 0, data + 1,
                         size - 1);
        if (!sealed)
            return 0;
        file = sealed;
    }
    if (fz_write(path, file, len) == 0) {
        size_t n = 0, m = 0;
        int rc = softcxi_user_list(s, on_user, &n);
        if (fz_trace("user_list", rc, softcxi_session_error(s)) == 0 &&
            scx_users_count(s, &m) == 0 && n != m)
            __builtin_trap();
    }
    OPENSSL_free(sealed);
    (void)fz_write(path, good, good_len);
    return 0;
}
