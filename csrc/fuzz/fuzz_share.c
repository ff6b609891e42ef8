/*
 * fuzz_share.c - libFuzzer target for MBK key share files (shares.c:
 * read_share, then the combination), through scx_mbk_combine_files, which
 * mbk_import calls.
 *
 * Input: mode byte, then the rest.
 *   mode & 1 == 0  the rest is a share file as it lies on disk;
 *   mode & 1 == 1  byte 1 is the attribute block's length A, then A bytes
 *                  of attributes and the share; sealed here under the
 *                  password (KCV: the share's own when it is 32 bytes),
 *                  so the combination sees what the file says.
 * mode & 2 combines the file with itself (two shares of one index).
 * Files whose attributes ask for an scrypt cost above the minimum (10) are
 * skipped: a valid cost of 20 takes a second and a gigabyte, by design.
 */
#include "fuzz_util.h"

#define PASSWORD "fuzz share password"
#define A_COST 0x14u

/* The scrypt cost a share file's attributes ask for (0: none found). */
static unsigned cost_of(const uint8_t *file, size_t len)
{
    scx_frame f;
    softcxi_key_info info;
    softcxi_error err;
    if (scx_frame_parse(&f, &info, file, len, &err) != 0)
        return 0;
    for (size_t off = 0; off + 3 <= f.attrs_len;) {
        size_t n = scx_get16(f.attrs + off + 1);
        if (n > f.attrs_len - off - 3)
            return 0;
        if (f.attrs[off] == A_COST)
            return n == 1 ? f.attrs[off + 3] : 0;
        off += 3 + n;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t pwkey[32];
    static const uint8_t salt[SCX_SALT_LEN] = "softcxi-fuzz-fixed-salt";
    static int have_key;
    if (size < 1 || !fz_dir())
        return 0;
    if (!have_key) {
        if (scx_scrypt(pwkey, 32, PASSWORD, salt, SCX_SALT_LEN, 10) != 0)
            return 0;
        have_key = 1;
    }
    uint8_t *sealed = NULL;
    const uint8_t *file = data + 1;
    size_t len = size - 1;
    if (data[0] & 1) {
        if (size < 2 || (size_t)data[1] > size - 2)
            return 0;
        /* The KCV of the share itself: a 1-of-1 share is the key. */
        uint8_t kcv[SCX_KCV_LEN] = {0};
        size_t alen = data[1];
        if (size - 2 - alen == 32)
            (void)scx_kcv(kcv, data + 2 + alen);
        sealed = fz_seal(&len, SCX_TYPE_MBK_SHARE, pwkey, kcv, data + 2, alen, data + 2 + alen,
                         size - 2 - alen);
        if (!sealed)
            return 0;
        file = sealed;
    }
    if (cost_of(file, len) <= 10) {
        const char *path = fz_path(0, "fuzz.share");
        const char *paths[2] = {path, path}, *pws[2] = {PASSWORD, PASSWORD};
        uint8_t mbk[32];
        softcxi_error err;
        if (fz_write(path, file, len) == 0 &&
            fz_trace("combine", scx_mbk_combine_files(mbk, paths, pws, data[0] & 2 ? 2 : 1, &err),
                     &err) != 0 &&
            (err.code == 0 || !err.msg[0]))
            __builtin_trap();
        OPENSSL_cleanse(mbk, sizeof mbk);
    }
    OPENSSL_free(sealed);
    return 0;
}
