/*
 * mbk.c - the MBK lifecycle: key shares out, key shares in, rotation,
 * retirement, rewrapping blobs, and keeping every process of a device in
 * step.
 *
 * A device holds one current MBK (new blobs are sealed under it) and up to
 * SCX_MAX_OLD_MBKS older ones, kept only to open blobs until they are
 * rewrapped.  device.mbk stores them all (current first), sealed under the
 * device key.  Importing an MBK from shares makes it current and keeps the
 * previous one; retiring forgets an old one, after which its blobs give
 * EMBK everywhere.
 *
 * <path>/generation is an 8-byte counter mapped shared by every process
 * that opens the device.  A process that changes device.mbk bumps it; every
 * keyed call compares it with the value its device was loaded at (a memory
 * load) and reloads device.mbk and drops its key cache when it moved.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- the set of MBKs --------------------------------------------------- */

int scx_mbk_set(softcxi_device *dev, const uint8_t *payload, size_t len, softcxi_error *err)
{
    size_t n = len / 32;
    if (n == 0 || len % 32 || n > 1 + SCX_MAX_OLD_MBKS)
        return scx_fail(err, SOFTCXI_EFORMAT, "device state holds %zu bytes of MBKs", len);
    for (int i = 0; i < dev->nold; i++)
        scx_xaes_clear(&dev->old[i].x);
    dev->nold = 0;
    memcpy(dev->sec->mbk, payload, 32);
    int rc = scx_derive_working_keys(dev, err);
    for (size_t i = 1; rc == 0 && i < n; i++) {
        uint8_t key[32];
        scx_old_mbk *o = &dev->old[dev->nold];
        memcpy(dev->sec->old_mbk[dev->nold], payload + 32 * i, 32);
        if (scx_kcv(o->kcv, payload + 32 * i) != 0 ||
            scx_label_key(key, payload + 32 * i, SCX_LABEL_BLOB_KEY) != 0 ||
            scx_xaes_init(&o->x, key) != 0)
            rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "deriving an older MBK's keys failed");
        else
            dev->nold++;
        OPENSSL_cleanse(key, sizeof key);
    }
    return rc;
}

scx_xaes *scx_mbk_for(softcxi_device *dev, const uint8_t kcv[SCX_KCV_LEN])
{
    if (CRYPTO_memcmp(kcv, dev->kcv, SCX_KCV_LEN) == 0)
        return &dev->xblob;
    for (int i = 0; i < dev->nold; i++)
        if (CRYPTO_memcmp(kcv, dev->old[i].kcv, SCX_KCV_LEN) == 0)
            return &dev->old[i].x;
    return NULL;
}

/* ---- the generation counter -------------------------------------------- */

int scx_gen_open(softcxi_device *dev, softcxi_error *err)
{
    size_t n = strlen(dev->path) + sizeof "/generation";
    char *path = malloc(n);
    if (!path)
        return scx_fail(err, SOFTCXI_ENOMEM, "out of memory");
    snprintf(path, n, "%s/generation", dev->path);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    struct stat st;
    int rc = 0;
    if (fd < 0 || fstat(fd, &st) != 0 || (st.st_size < 8 && ftruncate(fd, 8) != 0)) {
        rc = scx_fail(err, SOFTCXI_EIO, "%s: %s", path, strerror(errno));
    } else {
        void *m = mmap(NULL, 8, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED)
            rc = scx_fail(err, SOFTCXI_EIO, "%s: mmap: %s", path, strerror(errno));
        else {
            dev->gen_map = m;
            dev->generation = __atomic_load_n(dev->gen_map, __ATOMIC_ACQUIRE);
        }
    }
    if (fd >= 0)
        close(fd); /* the mapping stays */
    free(path);
    return rc;
}

void scx_gen_close(softcxi_device *dev)
{
    if (dev->gen_map)
        munmap((void *)(uintptr_t)dev->gen_map, 8);
    dev->gen_map = NULL;
}

/* After this process changed the device: tell the others. */
static void gen_bump(softcxi_device *dev)
{
    if (dev->gen_map)
        dev->generation = __atomic_add_fetch(dev->gen_map, 1, __ATOMIC_ACQ_REL);
}

int scx_device_sync(softcxi_session *s)
{
    softcxi_device *dev = s->dev;
    if (!dev->gen_map)
        return 0;
    uint64_t now = __atomic_load_n(dev->gen_map, __ATOMIC_ACQUIRE);
    if (now == dev->generation)
        return 0;
    /* Another process rotated or retired an MBK: nothing opened under the
     * old state may be served again. */
    size_t cap = dev->cache.capacity;
    scx_cache_clear(&dev->cache);
    scx_cache_init(&dev->cache, cap);
    int rc = scx_state_reload(dev, &s->err);
    if (rc == 0)
        rc = scx_revoked_reload(dev, &s->err);
    if (rc == 0)
        dev->generation = now;
    return rc;
}

/* Exclusive lock of <path>/device.lock around a change of device.mbk. */
static int device_lock(softcxi_device *dev, softcxi_error *err)
{
    size_t n = strlen(dev->path) + sizeof "/device.lock";
    char *path = malloc(n);
    if (!path)
        return scx_fail(err, SOFTCXI_ENOMEM, "out of memory");
    snprintf(path, n, "%s/device.lock", dev->path);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 || flock(fd, LOCK_EX) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        scx_fail(err, SOFTCXI_EIO, "cannot lock %s: %s", path, strerror(e));
        free(path);
        return -1;
    }
    free(path);
    return fd;
}

/* Run change() on the freshest state under the lock, then save and bump. */
static int change_state(softcxi_session *s, int (*change)(softcxi_session *, void *), void *arg)
{
    softcxi_device *dev = s->dev;
    if (!dev->path)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "this device keeps no state");
    int lock = device_lock(dev, &s->err);
    if (lock < 0)
        return s->err.code;
    int rc = scx_state_reload(dev, &s->err);
    if (rc == 0)
        rc = change(s, arg);
    if (rc == 0)
        rc = scx_state_save(dev, &s->err);
    if (rc == 0) {
        size_t cap = dev->cache.capacity;
        scx_cache_clear(&dev->cache);
        scx_cache_init(&dev->cache, cap);
        gen_bump(dev);
    }
    close(lock);
    if (rc) /* leave memory as the disk says */
        (void)scx_state_reload(dev, NULL);
    return rc;
}

/* ---- generate, import, retire, info ------------------------------------ */

int softcxi_mbk_generate(softcxi_session *s, const softcxi_mbk_req *req)
{
    uint8_t mbk[32];
    int rc = scx_access_admin(s, "mbk_generate");
    if (rc)
        return rc;
    char what[64];
    snprintf(what, sizeof what, "%u of %u shares", req->m, req->n);
    if ((rc = scx_audit_request(s, "mbk_generate", what)) != 0)
        return rc;
    if (RAND_priv_bytes(mbk, sizeof mbk) != 1)
        return scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "mbk_generate: random generator failed");
    rc = scx_mbk_split_files(mbk, req->m, req->n, req->scheme ? req->scheme : SOFTCXI_SHARES_SHAMIR,
                             req->paths, req->passwords, req->kdf_cost, &s->err);
    uint8_t kcv[SCX_KCV_LEN];
    char hex[17];
    if (rc == 0 && scx_kcv(kcv, mbk) == 0) { /* which MBK the shares hold */
        scx_hex(hex, kcv, SCX_KCV_LEN);
        rc = scx_audit(s, "mbk_generated", hex, what);
    }
    scx_audit_outcome(s, "mbk_generate", what, rc);
    OPENSSL_cleanse(mbk, sizeof mbk);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

typedef struct import_arg {
    const uint8_t *mbk;
} import_arg;

static int do_import(softcxi_session *s, void *argp)
{
    softcxi_device *dev = s->dev;
    const uint8_t *mbk = ((import_arg *)argp)->mbk;
    uint8_t kcv[SCX_KCV_LEN];
    char hex[17];
    if (scx_kcv(kcv, mbk) != 0)
        return scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "mbk_import: check value failed");
    scx_hex(hex, kcv, SCX_KCV_LEN);
    if (CRYPTO_memcmp(kcv, dev->kcv, SCX_KCV_LEN) == 0)
        return scx_fail(&s->err, SOFTCXI_EEXIST, "mbk_import: MBK %s is current already", hex);
    /* The current MBK joins the older ones (an older copy of the new one
     * leaves them); the oldest falls off only if there is no room. */
    uint8_t olds[SCX_MAX_OLD_MBKS + 1][32];
    int n = 0;
    memcpy(olds[n++], dev->sec->mbk, 32);
    for (int i = 0; i < dev->nold; i++)
        if (CRYPTO_memcmp(dev->old[i].kcv, kcv, SCX_KCV_LEN) != 0)
            memcpy(olds[n++], dev->sec->old_mbk[i], 32);
    if (n > SCX_MAX_OLD_MBKS) {
        OPENSSL_cleanse(olds, sizeof olds);
        return scx_fail(&s->err, SOFTCXI_EFULL,
                        "mbk_import: the device holds %d older MBKs: retire one first",
                        SCX_MAX_OLD_MBKS);
    }
    uint8_t payload[32 * (SCX_MAX_OLD_MBKS + 1)];
    memcpy(payload, mbk, 32);
    memcpy(payload + 32, olds, 32 * (size_t)n);
    int rc = scx_mbk_set(dev, payload, 32 * (size_t)(n + 1), &s->err);
    OPENSSL_cleanse(olds, sizeof olds);
    OPENSSL_cleanse(payload, sizeof payload);
    return rc;
}

int softcxi_mbk_import(softcxi_session *s, const char *const *paths,
                       const char *const *passwords, size_t k)
{
    uint8_t mbk[32];
    int rc = scx_access_admin(s, "mbk_import");
    if (rc)
        return rc;
    if ((rc = scx_mbk_combine_files(mbk, paths, passwords, k, &s->err)) != 0)
        return rc;
    uint8_t kcv[SCX_KCV_LEN];
    char hex[17];
    if (scx_kcv(kcv, mbk) != 0) {
        OPENSSL_cleanse(mbk, sizeof mbk);
        return scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "mbk_import: check value failed");
    }
    scx_hex(hex, kcv, SCX_KCV_LEN);
    if ((rc = scx_audit_request(s, "mbk_import", hex)) != 0) {
        OPENSSL_cleanse(mbk, sizeof mbk);
        return rc;
    }
    import_arg a = {mbk};
    rc = change_state(s, do_import, &a);
    /* The device's own keys follow at once: they must never be stranded
     * under an MBK that gets retired. */
    size_t moved = 0;
    if (rc == 0)
        rc = scx_internal_rewrap_all(s, &moved);
    scx_audit_outcome(s, "mbk_import", hex, rc);
    OPENSSL_cleanse(mbk, sizeof mbk);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

static int do_retire(softcxi_session *s, void *argp)
{
    softcxi_device *dev = s->dev;
    const uint8_t *kcv = argp;
    char hex[17];
    scx_hex(hex, kcv, SCX_KCV_LEN);
    if (CRYPTO_memcmp(kcv, dev->kcv, SCX_KCV_LEN) == 0)
        return scx_fail(&s->err, SOFTCXI_EPOLICY,
                        "mbk_retire: MBK %s is the current one (import another first)", hex);
    uint8_t payload[32 * (SCX_MAX_OLD_MBKS + 1)];
    size_t n = 0;
    int found = 0;
    memcpy(payload, dev->sec->mbk, 32), n = 1;
    for (int i = 0; i < dev->nold; i++) {
        if (CRYPTO_memcmp(dev->old[i].kcv, kcv, SCX_KCV_LEN) == 0)
            found = 1;
        else
            memcpy(payload + 32 * n++, dev->sec->old_mbk[i], 32);
    }
    int rc = found ? scx_mbk_set(dev, payload, 32 * n, &s->err)
                   : scx_fail(&s->err, SOFTCXI_ENOTFOUND, "mbk_retire: the device holds no MBK %s",
                              hex);
    OPENSSL_cleanse(payload, sizeof payload);
    return rc;
}

int softcxi_mbk_retire(softcxi_session *s, const uint8_t kcv[8])
{
    int rc = scx_access_admin(s, "mbk_retire");
    if (rc)
        return rc;
    uint8_t k[SCX_KCV_LEN];
    memcpy(k, kcv, SCX_KCV_LEN);
    size_t still = 0;
    if ((rc = scx_internal_count_under(s, k, &still)) != 0)
        return rc;
    if (still) {
        char hex[17];
        scx_hex(hex, k, SCX_KCV_LEN);
        return scx_fail(&s->err, SOFTCXI_EPOLICY,
                        "mbk_retire: %zu internal keys are still sealed under MBK %s "
                        "(key_rewrap them first)",
                        still, hex);
    }
    char hexk[17];
    scx_hex(hexk, k, SCX_KCV_LEN);
    if ((rc = scx_audit_request(s, "mbk_retire", hexk)) != 0)
        return rc;
    rc = change_state(s, do_retire, k);
    scx_audit_outcome(s, "mbk_retire", hexk, rc);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

int softcxi_mbk_info(softcxi_session *s, uint8_t kcvs[][8], size_t cap, size_t *n)
{
    int rc = scx_device_sync(s);
    if (rc)
        return rc;
    softcxi_device *dev = s->dev;
    *n = 0;
    if (cap > 0)
        memcpy(kcvs[(*n)++], dev->kcv, SCX_KCV_LEN);
    for (int i = 0; i < dev->nold && *n < cap; i++)
        memcpy(kcvs[(*n)++], dev->old[i].kcv, SCX_KCV_LEN);
    scx_ok(&s->err);
    return 0;
}

/* ---- rewrap ------------------------------------------------------------ */

/* The checks of a rewrap, before any secret is touched: the frame parses,
 * holds a key, the session may use its group (check_access = 0 for the
 * device's own internal keys, rewrapped by an administrator during
 * mbk_import), and an MBK held opens it (*from: its context). */
int scx_rewrap_check(softcxi_session *s, scx_frame *f, softcxi_key_info *info, scx_xaes **from,
                     const uint8_t *blob, size_t len, int check_access)
{
    softcxi_device *dev = s->dev;
    int rc;

    *from = NULL;
    if ((rc = scx_frame_parse(f, info, blob, len, &s->err)) != 0)
        return rc;
    if (f->type != SCX_TYPE_KEY)
        return scx_fail(&s->err, SOFTCXI_EFORMAT, "key_rewrap: not a key blob");
    if (check_access && (rc = scx_access_key(s, info->group, info->group_len, "key_rewrap")) != 0)
        return rc;
    if (!(*from = scx_mbk_for(dev, f->kcv))) {
        char want[17], have[17];
        scx_hex(want, f->kcv, SCX_KCV_LEN);
        scx_hex(have, dev->kcv, SCX_KCV_LEN);
        return scx_fail(&s->err, SOFTCXI_EMBK,
                        "key_rewrap: blob of key %s was sealed under MBK %s, which this device "
                        "does not hold (current: %s)",
                        REF(info), want, have);
    }
    return 0;
}

/* The rest of a rewrap of a checked blob: open it with from, and unless
 * from is to (the current MBK's context: *changed = 0, out a copy) seal
 * the same attributes and key under to with a new salt from pool.  The key
 * itself never leaves this function.  Touches nothing of the device: the
 * workers of softcxi_key_rewrap_many run it on contexts of their own. */
int scx_rewrap_seal(softcxi_buf *out, int *changed, const scx_frame *f,
                    const softcxi_key_info *info, const uint8_t *blob, size_t len, scx_xaes *from,
                    scx_xaes *to, const uint8_t kcv[SCX_KCV_LEN], EVP_CIPHER_CTX *gcm,
                    scx_rndpool *pool, softcxi_error *err)
{
    uint8_t salt[SCX_SALT_LEN], *sec = NULL, none[1];
    int rc;

    out->data = NULL, out->len = 0, out->secret = 0;
    *changed = 0;
    if (f->ct_len && !(sec = OPENSSL_secure_malloc(f->ct_len)))
        return scx_fail(err, SOFTCXI_ENOMEM, "key_rewrap: out of secure memory");
    rc = scx_xaes_open(from, gcm, sec ? sec : none, f->ct, f->ct_len, f->tag, f->salt, blob,
                       f->aad_len);
    if (rc) {
        rc = rc == SOFTCXI_ETAMPER
                 ? scx_fail(err, SOFTCXI_ETAMPER,
                            "key_rewrap: blob of key %s fails authentication", REF(info))
                 : scx_fail_ssl(err, rc, "key_rewrap: opening failed");
        goto done;
    }
    if (from == to) { /* current already: the same blob back */
        if (!(out->data = OPENSSL_memdup(blob, len)))
            rc = scx_fail(err, SOFTCXI_ENOMEM, "key_rewrap: out of memory");
        out->len = len;
        goto done;
    }
    size_t total = SCX_HDR_LEN + f->attrs_len + f->ct_len + SCX_TAG_LEN;
    if (scx_rnd_public(pool, salt, sizeof salt) != 0 || !(out->data = OPENSSL_malloc(total)) ||
        scx_frame_seal(out->data, SCX_TYPE_KEY, kcv, salt, f->attrs, f->attrs_len,
                       sec ? sec : none, f->ct_len, to, gcm) != 0) {
        OPENSSL_free(out->data);
        out->data = NULL;
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "key_rewrap: sealing failed");
        goto done;
    }
    out->len = total;
    *changed = 1;
done:
    if (sec)
        OPENSSL_secure_clear_free(sec, f->ct_len);
    return rc;
}

/* Re-seal one blob under the current MBK; check_access as scx_rewrap_check. */
int scx_rewrap_blob(softcxi_session *s, softcxi_buf *out, const uint8_t *blob, size_t len,
                    int *changed, int check_access)
{
    softcxi_device *dev = s->dev;
    scx_frame f;
    softcxi_key_info info;
    scx_xaes *from;
    int rc;

    out->data = NULL, out->len = 0, out->secret = 0;
    *changed = 0;
    if ((rc = scx_rewrap_check(s, &f, &info, &from, blob, len, check_access)) != 0 ||
        (rc = scx_rewrap_seal(out, changed, &f, &info, blob, len, from, &dev->xblob, dev->kcv,
                              dev->gcm, &dev->pool, &s->err)) != 0)
        return rc;
    scx_ok(&s->err);
    return 0;
}

int softcxi_key_rewrap(softcxi_session *s, softcxi_buf *out, const uint8_t *blob, size_t len,
                       int *changed)
{
    int rc = scx_device_sync(s);
    out->data = NULL, out->len = 0, out->secret = 0;
    *changed = 0;
    if (rc)
        return rc;
    if (len > 0 && blob[0] == 0x49) /* an internal key: rewrapped where it is stored */
        return scx_internal_rewrap(s, out, blob, len, changed);
    return scx_rewrap_blob(s, out, blob, len, changed, 1);
}
