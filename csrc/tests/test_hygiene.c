/*
 * test_hygiene.c - secret hygiene, checked from outside the core.
 *
 *   test_hygiene VECTOR_DIR
 *
 * The test knows every secret it makes the core handle: the MBK of the
 * blob_v1.txt vectors, the keys derived from it, the vectors' private and
 * secret keys, and (for a device on disk) the device key and the keys
 * derived from it.  With those it checks:
 *
 *  1. Freed memory holds none of them.  OpenSSL's allocator is hooked
 *     (CRYPTO_set_mem_functions, before the first allocation): every block
 *     freed through OPENSSL_free/realloc is scanned as it is released, so a
 *     free without OPENSSL_clear_free/cleanse names itself.  After every
 *     session and device is closed, every private writable anonymous mapping
 *     and the heap are scanned as well (memory freed with plain free(), the
 *     secure heap, the MBK page), big-endian and byte-reversed (BIGNUM
 *     words), so a secret left anywhere in the process shows.
 *  2. The MBK page is locked (when RLIMIT_MEMLOCK allows it) and excluded
 *     from core dumps (VmFlags "lo", "dd" in /proc/self/smaps), and so is
 *     OpenSSL's secure heap.
 *  3. No error message holds key material: every error the test provokes
 *     (tampered, truncated, foreign-MBK blobs, policy refusals, a wrong share
 *     password, a tampered backup, a wrong device key file, ...) is checked
 *     for each secret, raw and as hex in either case.
 *
 * The test's own copies of the secrets live in one static table that the
 * scans skip; the stack is not scanned (dead frames of the test itself).
 * The vectors' MBK (00 01 .. 1f) is left out of the process scan: it is
 * also CTR-DRBG's fixed derivation key, which OpenSSL's DRBG keeps.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <ctype.h>
#include <openssl/crypto.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"

#define CHECK_RC(expr, want) CHECK_RC_MSG(expr, want, "")

/* ---- the secrets the test knows ----------------------------------------- */

#define MAX_SECRETS 32
static struct {
    uint8_t v[MAX_SECRETS][2][32]; /* [i][0] as given, [i][1] byte-reversed */
    const char *name[MAX_SECRETS];
    size_t len[MAX_SECRETS];
    int not_in_scan[MAX_SECRETS];
    int n;
} sec;
static int scanning; /* the process scan (not a freed block, not a message) */
static const char *verdict = "FAIL"; /* "found, as it must be" in the self-test */

static void add_secret(const char *name, const uint8_t *v, size_t len)
{
    if (sec.n >= MAX_SECRETS || len > 32)
        exit(2);
    memcpy(sec.v[sec.n][0], v, len);
    for (size_t i = 0; i < len; i++)
        sec.v[sec.n][1][i] = v[len - 1 - i];
    sec.len[sec.n] = len;
    sec.name[sec.n++] = name;
}

static void add_secret_hex(const char *name, const char *hex)
{
    uint8_t v[32];
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n && i < 32; i++) {
        unsigned x;
        if (sscanf(hex + 2 * i, "%2x", &x) != 1)
            exit(2);
        v[i] = (uint8_t)x;
    }
    add_secret(name, v, n);
    OPENSSL_cleanse(v, sizeof v);
}

/* Which secret (index), if any, p[0..n) holds, outside the test's table. */
static int find_secret(const uint8_t *p, size_t n, const uint8_t **where)
{
    const uint8_t *lo = (const uint8_t *)&sec, *hi = lo + sizeof sec;
    for (int i = 0; i < sec.n; i++)
        for (int form = 0; form < 2; form++) {
            if (scanning && sec.not_in_scan[i])
                continue;
            const uint8_t *at = p;
            size_t left = n;
            while (left >= sec.len[i]) {
                const uint8_t *hit = memmem(at, left, sec.v[i][form], sec.len[i]);
                if (!hit)
                    break;
                if (hit < lo || hit >= hi) {
                    if (where)
                        *where = hit;
                    return i;
                }
                left -= (size_t)(hit + 1 - at);
                at = hit + 1;
            }
        }
    return -1;
}

/* ---- 1a. OpenSSL's allocator, hooked --------------------------------------- */

#define HDR 16 /* keeps the block size in front of each block */
static unsigned long hook_allocs, hook_frees, hook_dirty;

static void scan_freed(void *p, const char *file, int line)
{
    size_t n;
    memcpy(&n, (uint8_t *)p - HDR, sizeof n);
    hook_frees++;
    int i = find_secret(p, n, NULL);
    if (i >= 0) {
        hook_dirty++;
        fprintf(stderr, "%s [freed memory]: %s freed unwiped (%zu-byte block from %s:%d)\n",
                verdict, sec.name[i], n, file ? file : "?", line);
    }
}

static void *h_malloc(size_t n, const char *file, int line)
{
    (void)file, (void)line;
    uint8_t *p = malloc(n + HDR);
    if (!p)
        return NULL;
    memcpy(p, &n, sizeof n);
    hook_allocs++;
    return p + HDR;
}

static void h_free(void *p, const char *file, int line)
{
    if (!p)
        return;
    if (sec.n)
        scan_freed(p, file, line);
    free((uint8_t *)p - HDR);
}

/* realloc leaves the old block behind: scan it like a free. */
static void *h_realloc(void *p, size_t n, const char *file, int line)
{
    if (!p)
        return h_malloc(n, file, line);
    if (n == 0) {
        h_free(p, file, line);
        return NULL;
    }
    size_t old;
    memcpy(&old, (uint8_t *)p - HDR, sizeof old);
    void *q = h_malloc(n, file, line);
    if (!q)
        return NULL;
    memcpy(q, p, old < n ? old : n);
    h_free(p, file, line);
    return q;
}

/* ---- 1b. the whole process, after close -------------------------------------- */

/* Every private writable mapping that is anonymous or the heap; want:
 * how many secrets must be found (0, but for the self-test). */
#if defined(__SANITIZE_ADDRESS__)
#define SCAN_PROCESS 0 /* ASan's redzones and quarantine may not be read, */
                       /* and its mlock() does nothing */
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SCAN_PROCESS 0
#endif
#endif
#ifndef SCAN_PROCESS
#define SCAN_PROCESS 1
#endif

static void scan_process_want(const char *when, int want)
{
    if (!SCAN_PROCESS) {
        printf("  %s: process scan skipped under AddressSanitizer\n", when);
        return;
    }
    current = when;
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    size_t regions = 0, bytes = 0;
    int dirty = 0;
    if (!f) {
        CHECK(!"/proc/self/maps readable");
        return;
    }
    while (fgets(line, sizeof line, f)) {
        unsigned long a, b;
        char perms[8], path[256] = "";
        if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %255s", &a, &b, perms, path) < 3)
            continue;
        if (perms[0] != 'r' || perms[1] != 'w' || perms[3] != 'p')
            continue;
        if (path[0] && strcmp(path, "[heap]") != 0)
            continue; /* files (the test's own data), [stack], [vvar] */
        const uint8_t *where = NULL;
        scanning = 1;
        int i = find_secret((const uint8_t *)a, b - a, &where);
        scanning = 0;
        if (i >= 0) {
            dirty++;
            fprintf(stderr, "%s [%s]: %s found at %p in %s %lx-%lx\n", verdict, when, sec.name[i],
                    (const void *)where, path[0] ? path : "(anonymous)", a, b);
        }
        regions++;
        bytes += b - a;
    }
    fclose(f);
    CHECK(dirty == want);
    printf("  %s: %zu regions, %zu KiB scanned, %d secret%s found\n", when, regions, bytes >> 10,
           dirty, dirty == 1 ? "" : "s");
}

static void scan_process(const char *when) { scan_process_want(when, 0); }

/* The scans must see what they look for: a canary secret freed unwiped
 * through OpenSSL, and one left in live heap memory. */
static void self_test(void)
{
    current = "self-test";
    uint8_t canary[32];
    CHECK(RAND_bytes(canary, sizeof canary) == 1);
    add_secret("the self-test canary", canary, sizeof canary);
    verdict = "self-test: found, as it must be";
    OPENSSL_cleanse(canary, sizeof canary);
    uint8_t *p = OPENSSL_malloc(96);
    CHECK(p != NULL);
    memcpy(p + 32, sec.v[sec.n - 1][0], 32);
    OPENSSL_free(p); /* unwiped, on purpose */
    CHECK(hook_dirty == 1);
    uint8_t *q = malloc(96);
    CHECK(q != NULL);
    memcpy(q + 32, sec.v[sec.n - 1][1], 32); /* byte-reversed form */
    scan_process_want("self-test: a canary in the heap", SCAN_PROCESS ? 1 : 0);
    OPENSSL_cleanse(q, 96);
    free(q);
    /* The freed canary stays in the heap: forget it. */
    sec.n--;
    hook_dirty = 0;
    verdict = "FAIL";
}

/* ---- 2. locked, not dumped --------------------------------------------------- */

/* The VmFlags of the mapping that holds p, into flags. */
static int vmflags(const void *p, char *flags, size_t cap)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int inside = 0, found = 0;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long a, b;
        if (sscanf(line, "%lx-%lx ", &a, &b) == 2) { /* a mapping's first line */
            inside = (uintptr_t)p >= a && (uintptr_t)p < b;
            continue;
        }
        if (inside && strncmp(line, "VmFlags:", 8) == 0) {
            snprintf(flags, cap, "%.200s", line + 8);
            found = 1;
            break;
        }
    }
    fclose(f);
    return found ? 0 : -1;
}

static int has_flag(const char *flags, const char *fl)
{
    char want[8];
    snprintf(want, sizeof want, " %s", fl);
    return strstr(flags, want) != NULL;
}

static void check_locked(const void *p, const char *what)
{
    char flags[256] = "";
    struct rlimit rl;
    current = what;
    CHECK(vmflags(p, flags, sizeof flags) == 0);
    CHECK(has_flag(flags, "dd")); /* MADV_DONTDUMP */
    /* mlock is best effort: it needs RLIMIT_MEMLOCK room; ASan's mlock
     * interceptor does nothing. */
    rlim_t room = (rlim_t)SCX_SECURE_HEAP + (1u << 20); /* the secure heap and the MBK */
    int can_lock = SCAN_PROCESS && getrlimit(RLIMIT_MEMLOCK, &rl) == 0 &&
                   (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= room);
    if (can_lock)
        CHECK(has_flag(flags, "lo"));
    printf("  %s: VmFlags%s", what, flags);
}

/* ---- 3. error messages ------------------------------------------------------- */

static unsigned long messages;

static void hexs(char *out, const uint8_t *v, size_t n, int upper)
{
    for (size_t i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, upper ? "%02X" : "%02x", v[i]);
}

/* msg must hold no secret: raw, or as hex in either case. */
static void check_msg(const char *msg, const char *what)
{
    messages++;
    size_t n = strlen(msg);
    int bad = -1;
    for (int i = 0; i < sec.n && bad < 0; i++) {
        if (memmem(msg, n, sec.v[i][0], sec.len[i]))
            bad = i;
        for (int up = 0; up < 2 && bad < 0; up++) {
            char h[65];
            /* 8 bytes of hex is already a leak (a KCV is 8 bytes, but of
             * another value, never of a key). */
            for (size_t off = 0; off + 8 <= sec.len[i] && bad < 0; off += 8) {
                hexs(h, sec.v[i][0] + off, 8, up);
                if (strcasestr(msg, h))
                    bad = i;
            }
        }
    }
    if (bad >= 0) {
        failed++;
        fprintf(stderr, "FAIL [messages]: %s: the message holds %s: %s\n", what, sec.name[bad],
                msg);
    } else {
        passed++;
    }
}

static void check_err(softcxi_session *s, int rc, const char *what)
{
    if (rc == 0)
        return;
    const softcxi_error *e = softcxi_session_error(s);
    CHECK(e->msg[0] != '\0');
    check_msg(e->msg, what);
}

/* ---- the vectors -------------------------------------------------------------- */

typedef struct vec {
    uint8_t blob[1024];
    size_t len;
} vec;

static int read_vectors(vec v[3], const char *dir)
{
    char path[600], line[4096];
    snprintf(path, sizeof path, "%s/blob_v1.txt", dir);
    FILE *f = fopen(path, "r");
    int n = 0;
    if (!f)
        return 0;
    while (n < 3 && fgets(line, sizeof line, f)) {
        if (strncmp(line, "blob = ", 7) != 0)
            continue;
        char *h = line + 7;
        size_t len = strcspn(h, "\r\n") / 2;
        for (size_t i = 0; i < len && i < sizeof v[n].blob; i++) {
            unsigned x;
            if (sscanf(h + 2 * i, "%2x", &x) != 1)
                break;
            v[n].blob[i] = (uint8_t)x;
        }
        v[n].len = len;
        n++;
    }
    fclose(f);
    return n;
}

static void label_secret(const char *name, const uint8_t key[32], const char *label)
{
    uint8_t k[32];
    unsigned int n = 32;
    if (!HMAC(EVP_sha256(), key, 32, (const uint8_t *)label, strlen(label), k, &n))
        exit(2);
    add_secret(name, k, 32);
    OPENSSL_cleanse(k, sizeof k);
}

/* ---- part A: a device in memory with the vectors' MBK --------------------------- */

static void part_memory(const vec v[3])
{
    current = "memory device";
    uint8_t mbk[32];
    softcxi_device *dev;
    softcxi_error err;
    for (int i = 0; i < 32; i++)
        mbk[i] = (uint8_t)i;
    if (scx_device_new_mem(&dev, mbk, 16, &err) != 0)
        exit(2);
    OPENSSL_cleanse(mbk, sizeof mbk);
    softcxi_session *s = softcxi_session_new(dev);
    softcxi_device_free(dev);
    check_locked(s->dev->sec, "MBK page");
    void *sp = OPENSSL_secure_malloc(32);
    CHECK(CRYPTO_secure_malloc_initialized() == 1 && CRYPTO_secure_allocated(sp));
    check_locked(sp, "OpenSSL secure heap");
    OPENSSL_secure_free(sp);

    /* Use every vector key. */
    softcxi_buf out = {0}, pt = {0};
    softcxi_sign_req r = {v[0].blob, v[0].len, SOFTCXI_MECH_ECDSA_SHA256, 0,
                          (const uint8_t *)"hello", 5};
    CHECK_RC(softcxi_sign(s, &out, &r), 0);
    softcxi_buf_free(&out);
    r.blob = v[2].blob, r.blob_len = v[2].len, r.mech = SOFTCXI_MECH_ED25519;
    CHECK_RC(softcxi_sign(s, &out, &r), 0);
    softcxi_buf_free(&out);
    uint8_t iv[12], tag[16];
    softcxi_crypt_req cr = {v[1].blob, v[1].len, SOFTCXI_MECH_AES_GCM, (const uint8_t *)"data",
                            4, NULL, 0, NULL, 0, NULL, 0};
    CHECK_RC(softcxi_encrypt(s, &out, iv, tag, &cr), 0);
    softcxi_crypt_req dr = cr;
    dr.in = out.data, dr.in_len = out.len, dr.iv = iv, dr.iv_len = 12, dr.tag = tag,
    dr.tag_len = 16;
    CHECK_RC(softcxi_decrypt(s, &pt, &dr), 0);
    softcxi_buf_free(&pt);
    tag[0] ^= 1; /* a wrong tag: the plaintext is never released */
    int rc = softcxi_decrypt(s, &pt, &dr);
    CHECK(rc != 0 && pt.data == NULL);
    check_err(s, rc, "decrypt with a bad tag");
    softcxi_buf_free(&out);

    /* Error paths, each message checked. */
    current = "error messages";
    r.blob = v[1].blob, r.blob_len = v[1].len, r.mech = SOFTCXI_MECH_ECDSA_SHA256;
    check_err(s, softcxi_sign(s, &out, &r), "sign with an AES key");
    r.blob = v[0].blob, r.blob_len = v[0].len, r.mech = SOFTCXI_MECH_ED25519;
    check_err(s, softcxi_sign(s, &out, &r), "sign with the wrong mechanism");
    cr.blob = v[0].blob, cr.blob_len = v[0].len;
    check_err(s, softcxi_encrypt(s, &out, iv, tag, &cr), "encrypt with an EC key");
    for (int k = 0; k < 3; k++) {
        uint8_t m[1024];
        softcxi_key_info info;
        for (size_t n = 0; n < v[k].len; n++)
            check_err(s, softcxi_key_info_check(s, &info, v[k].blob, n), "truncated blob");
        memcpy(m, v[k].blob, v[k].len);
        for (size_t i = 0; i < v[k].len; i++)
            for (int bit = 0; bit < 8; bit++) {
                m[i] ^= (uint8_t)(1u << bit);
                check_err(s, softcxi_key_info_check(s, &info, m, v[k].len), "bit flip");
                r.blob = m, r.blob_len = v[k].len, r.mech = SOFTCXI_MECH_ECDSA_SHA256;
                if (bit == 0)
                    check_err(s, softcxi_sign(s, &out, &r), "sign with a changed blob");
                m[i] ^= (uint8_t)(1u << bit);
            }
    }
    /* A device with another MBK names both check values, nothing more. */
    uint8_t other[32];
    softcxi_device *d2;
    CHECK(RAND_bytes(other, 32) == 1 && scx_device_new_mem(&d2, other, 0, &err) == 0);
    OPENSSL_cleanse(other, sizeof other);
    softcxi_session *s2 = softcxi_session_new(d2);
    softcxi_device_free(d2);
    r.blob = v[0].blob, r.blob_len = v[0].len;
    rc = softcxi_sign(s2, &out, &r);
    CHECK_RC(rc, SOFTCXI_EMBK);
    check_err(s2, rc, "foreign MBK");
    softcxi_session_free(s2);

    /* Bulk jobs copy the blob key: the copy must be gone once each job is
     * (waited for and freed, freed while running, or outliving its session). */
    current = "bulk jobs";
    softcxi_template t = {0};
    t.algo = SOFTCXI_ALGO_EC, t.name = "job";
    softcxi_bulk_job *job = NULL;
    softcxi_buf *blobs = NULL;
    CHECK_RC(softcxi_bulk_generate_start(s, &job, SOFTCXI_FLAG_EXTERNAL, &t, NULL, 20, 2), 0);
    CHECK_RC(softcxi_bulk_job_wait(job, &blobs, &err), 0);
    softcxi_bulk_job_free(job);
    CHECK_RC(softcxi_bulk_generate_start(s, &job, SOFTCXI_FLAG_EXTERNAL, &t, NULL, 500, 2), 0);
    softcxi_bulk_job_free(job);
    CHECK_RC(softcxi_bulk_generate_start(s, &job, SOFTCXI_FLAG_EXTERNAL, &t, NULL, 20, 2), 0);
    softcxi_session_free(s);
    CHECK_RC(softcxi_bulk_job_wait(job, &blobs, &err), 0);
    softcxi_bulk_job_free(job);
}

/* ---- part B: a device on disk ----------------------------------------------------- */

static void part_disk(const char *root)
{
    current = "disk device";
    char dir[600], keyfile[600], key2[600], sh[2][600], bad[600], cmd[1400];
    softcxi_error err = {0};
    snprintf(dir, sizeof dir, "%s/dev", root);
    snprintf(keyfile, sizeof keyfile, "%s/dev.key", root);
    snprintf(key2, sizeof key2, "%s/other.key", root);
    snprintf(sh[0], sizeof sh[0], "%s/mbk-1.share", root);
    snprintf(sh[1], sizeof sh[1], "%s/mbk-2.share", root);
    snprintf(bad, sizeof bad, "%s/bad.share", root);
    softcxi_init_req init = {dir, keyfile, "ADMIN", "admin-password", 10};
    CHECK_RC(softcxi_device_init(&init, &err), 0);

    /* The device key, read back from its file (44 bytes: 'K' 01 11 00,
     * KCV, key), and the keys derived from it. */
    uint8_t kf[44], devkey[32];
    FILE *f = fopen(keyfile, "rb");
    CHECK(f && fread(kf, 1, sizeof kf, f) == sizeof kf);
    if (f)
        fclose(f);
    memcpy(devkey, kf + 12, 32);
    OPENSSL_cleanse(kf, sizeof kf);
    add_secret("the device key", devkey, 32);
    label_secret("the users key", devkey, SCX_LABEL_USERS);
    label_secret("the device.mbk key", devkey, SCX_LABEL_DEVICE_MBK);
    label_secret("the audit key", devkey, SCX_LABEL_AUDIT);
    label_secret("the storage key", devkey, SCX_LABEL_STORAGE);
    OPENSSL_cleanse(devkey, sizeof devkey);

    softcxi_device *dev;
    softcxi_open_req op = {dir, keyfile, 0, 0};
    CHECK_RC(softcxi_device_open(&dev, &op, &err), 0);
    softcxi_session *s = softcxi_session_new(dev);
    softcxi_device_free(dev);
    CHECK_RC(softcxi_logon_pass(s, "ADMIN", "admin-password"), 0);

    /* A random MBK the test knows, imported from two share files. */
    uint8_t mbk[32];
    CHECK(RAND_bytes(mbk, sizeof mbk) == 1);
    add_secret("the disk device's MBK", mbk, 32);
    label_secret("the disk device's blob key", mbk, SCX_LABEL_BLOB_KEY);
    label_secret("the disk device's key-backup key", mbk, SCX_LABEL_KEY_BACKUP);
    const char *paths[2] = {sh[0], sh[1]}, *pws[2] = {"share-password-1", "share-password-2"};
    CHECK(scx_mbk_split_files(mbk, 2, 2, SOFTCXI_SHARES_XOR, paths, pws, 10, &err) == 0);
    OPENSSL_cleanse(mbk, sizeof mbk);
    const char *wrong[2] = {"share-password-1", "not the password"};
    int rc = softcxi_mbk_import(s, paths, wrong, 2);
    CHECK_RC(rc, SOFTCXI_EAUTH);
    check_err(s, rc, "mbk_import, wrong password");
    snprintf(cmd, sizeof cmd, "head -c 60 '%s' > '%s'", sh[0], bad);
    CHECK(system(cmd) == 0);
    const char *badp[2] = {bad, sh[1]};
    check_err(s, softcxi_mbk_import(s, badp, pws, 2), "mbk_import, truncated share");
    CHECK_RC(softcxi_mbk_import(s, paths, pws, 2), 0);
    check_locked(s->dev->sec, "MBK page (device on disk)");

    softcxi_user_req u = {"app", "app-password", SOFTCXI_ROLE_USER, 0, "*", 10, NULL, 0};
    CHECK_RC(softcxi_user_add(s, &u), 0);
    CHECK_RC(softcxi_logon_pass(s, "app", "app-password"), 0);
    rc = softcxi_logon_pass(s, "app", "wrong-password");
    check_err(s, rc, "logon, wrong password");

    /* An internal key, its backup, a tampered backup. */
    softcxi_template t = {0};
    t.algo = SOFTCXI_ALGO_AES, t.size = 256, t.group = "iot", t.name = "root";
    t.export_policy = SOFTCXI_EXPORT_ALLOW;
    softcxi_buf h = {0}, b = {0}, h2 = {0}, ct = {0};
    CHECK_RC(softcxi_key_generate(s, &h, 0, &t), 0);
    uint8_t iv[12], tag[16];
    softcxi_crypt_req cr = {h.data, h.len, SOFTCXI_MECH_AES_GCM, (const uint8_t *)"d", 1,
                            NULL, 0, NULL, 0, NULL, 0};
    CHECK_RC(softcxi_encrypt(s, &ct, iv, tag, &cr), 0);
    softcxi_buf_free(&ct);
    CHECK_RC(softcxi_key_backup(s, &b, h.data, h.len), 0);
    if (b.data && b.len > 60) {
        b.data[b.len - 1] ^= 1;
        check_err(s, softcxi_key_restore(s, &h2, SOFTCXI_FLAG_OVERWRITE, b.data, b.len),
                  "key_restore, tampered backup");
        b.data[b.len - 1] ^= 1;
        CHECK_RC(softcxi_key_restore(s, &h2, SOFTCXI_FLAG_OVERWRITE, b.data, b.len), 0);
        softcxi_buf_free(&h2);
    }
    softcxi_buf_free(&b);
    softcxi_buf_free(&h);
    softcxi_session_free(s);

    /* The same directory under another device's key file. */
    char dir2[600];
    snprintf(dir2, sizeof dir2, "%s/dev2", root);
    softcxi_init_req init2 = {dir2, key2, "ADMIN", "admin-password", 10};
    CHECK_RC(softcxi_device_init(&init2, &err), 0);
    softcxi_open_req op2 = {dir, key2, 0, 0};
    rc = softcxi_device_open(&dev, &op2, &err);
    CHECK(rc != 0);
    if (rc)
        check_msg(err.msg, "open under another device key");
    else
        softcxi_device_free(dev);
}

int main(int argc, char **argv)
{
    /* Before anything allocates through OpenSSL. */
    if (!CRYPTO_set_mem_functions(h_malloc, h_realloc, h_free)) {
        fprintf(stderr, "CRYPTO_set_mem_functions refused: something allocated first\n");
        return 2;
    }
    const char *vectors = argc > 1 ? argv[1] : "csrc/tests/vectors";
    const char *base = getenv("SOFTCXI_TEST_TMP");
    char root[400], cmd[900];
    snprintf(root, sizeof root, "%.300s/test_hygiene.%ld", base ? base : "/tmp", (long)getpid());
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", root, root);
    if (system(cmd) != 0)
        return 2;

    vec v[3];
    current = "vectors";
    CHECK(read_vectors(v, vectors) == 3);
    uint8_t mbk[32];
    for (int i = 0; i < 32; i++)
        mbk[i] = (uint8_t)i;
    add_secret("the vectors' MBK", mbk, 32);
    /* 00 01 .. 1f is also the key of CTR-DRBG's derivation function (SP
     * 800-90A), which OpenSSL's DRBG keeps: no process scan for it (the
     * disk device's random MBK is scanned for instead). */
    sec.not_in_scan[sec.n - 1] = 1;
    label_secret("the blob key", mbk, SCX_LABEL_BLOB_KEY);
    label_secret("the key-backup key", mbk, SCX_LABEL_KEY_BACKUP);
    OPENSSL_cleanse(mbk, sizeof mbk);
    add_secret_hex("the EC vector's private key",
                   "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721");
    add_secret_hex("the AES vector's key",
                   "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf");
    add_secret_hex("the Ed25519 vector's private key",
                   "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");

    self_test();
    scan_process("before any device");
    part_memory(v);
    scan_process("after the memory device closed");
    part_disk(root);
    scan_process("after the disk devices closed");

    current = "freed memory";
    CHECK(hook_dirty == 0);
    CHECK(hook_frees > 1000);
    printf("  OpenSSL allocator: %lu allocations, %lu frees scanned, %lu unwiped\n", hook_allocs,
           hook_frees, hook_dirty);
    printf("  error messages checked: %lu\n", messages);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", root);
    printf("%d checks passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
