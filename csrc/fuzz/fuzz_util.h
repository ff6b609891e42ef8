/*
 * fuzz_util.h - what the file-format fuzz targets share: a private scratch
 * directory (on /dev/shm when there is one, removed at exit), a device made
 * once per process, whole-file writes, and sealing a fuzz input the way the
 * core seals its files, so that a target reaches the parser behind the tag
 * check as well as the framing in front of it.
 *
 * Header-only on purpose: each target is one .c file plus this, built both
 * for libFuzzer (SOFTCXI_FUZZ) and as a corpus replay under ctest
 * (replay.c), so every seed and every crash found stays a regression test.
 *
 * Most targets read their first input byte as a mode: "raw" writes the
 * input as the file, exactly as an attacker with write access to the state
 * directory could; "sealed" treats the rest as the plaintext payload and
 * seals it under the right key, which only a bug in a writer (or a newer
 * writer) could produce, and which is where a length or count read from the
 * payload matters.
 */
#ifndef SOFTCXI_FUZZ_UTIL_H
#define SOFTCXI_FUZZ_UTIL_H

#define _GNU_SOURCE
#include "internal.h"

#include <fcntl.h>
#include <ftw.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FZ_ADMIN "ADMIN"
#define FZ_ADMIN_PW "fuzz-admin-password"
#define FZ_USER "fuzz"
#define FZ_USER_PW "fuzz-user-password"

static char fz_root[256];

static int fz_rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static void fz_cleanup(void)
{
    if (fz_root[0])
        (void)nftw(fz_root, fz_rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* The scratch directory, made on first use; NULL when it cannot be. */
static inline const char *fz_dir(void)
{
    if (fz_root[0])
        return fz_root;
    struct stat st;
    const char *base = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    if (stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && access("/dev/shm", W_OK) == 0)
        base = "/dev/shm";
    snprintf(fz_root, sizeof fz_root, "%s/softcxi-fuzz.XXXXXX", base);
    if (!mkdtemp(fz_root)) {
        fz_root[0] = '\0';
        return NULL;
    }
    atexit(fz_cleanup);
    return fz_root;
}

/* "<scratch>/<name>" into a static buffer per slot (0..3). */
static inline const char *fz_path(int slot, const char *name)
{
    static char buf[4][512];
    snprintf(buf[slot & 3], sizeof buf[0], "%s/%s", fz_dir(), name);
    return buf[slot & 3];
}

/* Replace path with exactly these bytes (mode 0600). */
static inline int fz_write(const char *path, const uint8_t *data, size_t len)
{
    (void)unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    int rc = len ? scx_write_all(fd, data, len) : 0;
    close(fd);
    return rc;
}

/* A v1 frame of type over attrs and payload, sealed under key with the
 * key's own KCV (or kcv when given) and a fixed salt.  OPENSSL_free it. */
static inline uint8_t *fz_seal(size_t *out_len, unsigned type, const uint8_t key[32],
                               const uint8_t *kcv_or_null, const uint8_t *attrs, size_t alen,
                               const uint8_t *payload, size_t plen)
{
    static const uint8_t salt[SCX_SALT_LEN] = "softcxi-fuzz-fixed-salt";
    uint8_t kcv[SCX_KCV_LEN];
    scx_xaes x;
    if (alen > SCX_MAX_ATTRS || plen > SCX_MAX_SECRET)
        return NULL;
    EVP_CIPHER_CTX *gcm = EVP_CIPHER_CTX_new();
    size_t total = SCX_HDR_LEN + alen + plen + SCX_TAG_LEN;
    uint8_t *out = OPENSSL_malloc(total);
    int ok = gcm && out && scx_kcv(kcv, key) == 0 && scx_xaes_init(&x, key) == 0;
    if (ok) {
        if (kcv_or_null)
            memcpy(kcv, kcv_or_null, SCX_KCV_LEN);
        ok = scx_frame_seal(out, type, kcv, salt, attrs, alen, payload, plen, &x, gcm) == 0;
        scx_xaes_clear(&x);
    }
    EVP_CIPHER_CTX_free(gcm);
    if (!ok) {
        OPENSSL_free(out);
        return NULL;
    }
    *out_len = total;
    return out;
}

/* The MBK of the blob_v1.txt vectors (00 01 .. 1f), so that seeds built
 * from the vectors open on the fuzz device. */
static inline void fz_vector_mbk(uint8_t mbk[32])
{
    for (int i = 0; i < 32; i++)
        mbk[i] = (uint8_t)i;
}

/* A device on disk, made once: administrator FZ_ADMIN (level 2) and user
 * FZ_USER (groups "*"), the current MBK the vectors' one (imported from
 * two share files), and a session with both logged on.  NULL on failure
 * (reported once on stderr). */
static inline softcxi_session *fz_device(void)
{
    static softcxi_session *s;
    static int tried;
    if (s || tried)
        return s;
    tried = 1;
    softcxi_error err = {0};
    softcxi_device *dev = NULL;
    char dir[512], keyfile[512], sh1[512], sh2[512];
    if (!fz_dir())
        return NULL;
    snprintf(dir, sizeof dir, "%s/device", fz_root);
    snprintf(keyfile, sizeof keyfile, "%s/device.key", fz_root);
    snprintf(sh1, sizeof sh1, "%s/mbk-1.share", fz_root);
    snprintf(sh2, sizeof sh2, "%s/mbk-2.share", fz_root);
    softcxi_init_req init = {dir, keyfile, FZ_ADMIN, FZ_ADMIN_PW, 10};
    softcxi_open_req op = {dir, keyfile, 0, 0};
    uint8_t mbk[32];
    const char *paths[2] = {sh1, sh2}, *pws[2] = {"share-password-1", "share-password-2"};
    fz_vector_mbk(mbk);
    if (softcxi_device_init(&init, &err) != 0 || softcxi_device_open(&dev, &op, &err) != 0)
        goto fail;
    s = softcxi_session_new(dev);
    softcxi_device_free(dev);
    softcxi_user_req user = {FZ_USER, FZ_USER_PW, SOFTCXI_ROLE_USER, 0, "*", 10, NULL, 0};
    if (!s || softcxi_logon_pass(s, FZ_ADMIN, FZ_ADMIN_PW) != 0 ||
        scx_mbk_split_files(mbk, 2, 2, SOFTCXI_SHARES_XOR, paths, pws, 10, &err) != 0 ||
        softcxi_mbk_import(s, paths, pws, 2) != 0 || softcxi_user_add(s, &user) != 0 ||
        softcxi_logon_pass(s, FZ_USER, FZ_USER_PW) != 0) {
        if (s)
            err = *softcxi_session_error(s);
        goto fail;
    }
    return s;
fail:
    fprintf(stderr, "fuzz: setting up the device failed: %s\n", err.msg);
    softcxi_session_free(s);
    s = NULL;
    return NULL;
}

/* With SOFTCXI_FUZZ_TRACE set, say what each call returned: to check that
 * the seeds reach the parser they are for (replay one file with it). */
static inline int fz_trace(const char *what, int rc, const softcxi_error *err)
{
    static int on = -1;
    if (on < 0)
        on = getenv("SOFTCXI_FUZZ_TRACE") != NULL;
    if (on)
        fprintf(stderr, "  %s: %d %s\n", what, rc, rc && err ? err->msg : "");
    return rc;
}

/* Every NUL-terminated string a parser hands out must be one. */
static inline void fz_check_str(const char *p, size_t max)
{
    if (p && strnlen(p, max + 1) > max)
        __builtin_trap();
}

#endif /* SOFTCXI_FUZZ_UTIL_H */
