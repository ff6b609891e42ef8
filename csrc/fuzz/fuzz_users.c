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
 *   mode & 3 == 3  as 1, then a logon as the first user of the payload
 *                  with FZ_LOGON_PW (the seeds hold its verifier), on a new
 *                  session: lockout, failure counting and the rewrite of
 *                  users.db run on what the payload says.  Each record's
 *                  scrypt cost is clamped to 10 first (a cost of 20 takes a
 *                  second and a gigabyte, by design).
 * The list must come back complete or fail; every string it hands out is a
 * bounded C string.
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

#define FZ_LOGON_PW "fuzz-logon-password"

/* Walk the records as users.c lays them out, clamping each scrypt cost to
 * 10; the first user's name into name (empty when there is none). */
static void clamp_costs(uint8_t *p, size_t len, char name[SCX_USER_NAME_MAX + 1])
{
    size_t k = 4;
    name[0] = '\0';
    if (len < 4)
        return;
    uint32_t n = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    for (uint32_t i = 0; i < n && k < len; i++) {
        size_t nl = p[k];
        if (len - k < 1 + nl + 4)
            return;
        if (i == 0 && nl <= SCX_USER_NAME_MAX) {
            memcpy(name, p + k + 1, nl);
            name[nl] = '\0';
        }
        k += 1 + nl + 2;
        size_t gl = scx_get16(p + k);
        k += 2;
        if (len - k < gl + 1)
            return;
        k += gl;
        if (p[k] > 10)
            p[k] = 10;
        k += 1 + 16 + 32 + 12;
    }
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

    uint8_t *sealed = NULL, *payload = NULL;
    size_t len = size - 1;
    const uint8_t *file = data + 1;
    char first[SCX_USER_NAME_MAX + 1] = "";
    if (data[0] & 1) {
        payload = malloc(size);
        if (!payload)
            return 0;
        memcpy(payload, data + 1, size - 1);
        clamp_costs(payload, size - 1, first);
        sealed = fz_seal(&len, SCX_TYPE_USERS, dev->sec->state_key, NULL, NULL, 0, payload,
                         size - 1);
        free(payload);
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
        if ((data[0] & 3) == 3 && first[0] && rc == 0) {
            /* A fresh log each time: a logon appends to it. */
            char log[600], cnt[600];
            snprintf(log, sizeof log, "%s/audit.log", dev->path);
            snprintf(cnt, sizeof cnt, "%s/audit.count", dev->path);
            (void)unlink(log);
            (void)unlink(cnt);
            softcxi_session *t = softcxi_session_new(dev);
            if (t) {
                int lrc = softcxi_logon_pass(t, first, FZ_LOGON_PW);
                (void)fz_trace("logon", lrc, softcxi_session_error(t));
                if (lrc == 0 && softcxi_session_error(t)->code != 0)
                    __builtin_trap();
                softcxi_session_free(t);
            }
        }
    }
    OPENSSL_free(sealed);
    (void)fz_write(path, good, good_len);
    return 0;
}
