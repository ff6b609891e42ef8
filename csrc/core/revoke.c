/*
 * revoke.c - the revocation list.  Deleting a blob from a store leaves its
 * copies valid, so the device keeps a list of revoked keys and refuses
 * them (EREVOKED) in every process, cached or not.
 *
 * A key is identified by SHA-256 of its blob's attribute block: every copy
 * of a blob has it, and so does the blob key_rewrap makes (it keeps the
 * attributes), so a revoked key stays revoked across MBK rotations.
 *
 * <path>/revoked.db, blob framing type 0x13 sealed under the storage key
 * (from the device key; nobody can quietly drop an entry), payload:
 *   per entry: id (32) | time (8) | u8 len, group | u8 len, name | u8 len, reason
 * Written under the device lock (temp + fsync + rename), then the shared
 * generation counter is bumped, so every process reloads the list at its
 * next call.
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
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define REVOKED_FILE "revoked.db"
#define REVOKED_MAX_FILE (8u << 20)

static char *rpath(const softcxi_device *dev, const char *name)
{
    size_t n = strlen(dev->path) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dev->path, name);
    return p;
}

int scx_key_id(uint8_t id[32], const uint8_t *attrs, size_t len)
{
    unsigned int n = 32;
    return EVP_Digest(attrs, len, id, &n, EVP_sha256(), NULL) == 1 ? 0 : SOFTCXI_ECRYPTO;
}

/* Read and unseal revoked.db into a malloc'd payload (NULL, 0 if absent). */
static int load_payload(softcxi_device *dev, uint8_t **out, size_t *out_len, softcxi_error *err)
{
    char *path = rpath(dev, REVOKED_FILE);
    uint8_t *buf = NULL, *pt = NULL;
    struct stat st;
    scx_frame f;
    softcxi_key_info info;
    softcxi_error why;
    scx_xaes x;
    int rc = 0, fd = -1, have_x = 0;

    *out = NULL, *out_len = 0;
    if (!path)
        return scx_fail(err, SOFTCXI_ENOMEM, "out of memory");
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = errno == ENOENT ? 0 : scx_fail(err, SOFTCXI_EIO, "%s: %s", path, strerror(errno));
        goto done;
    }
    if (fstat(fd, &st) != 0 || st.st_size <= 0 || (size_t)st.st_size > REVOKED_MAX_FILE ||
        !(buf = OPENSSL_malloc((size_t)st.st_size)) ||
        read(fd, buf, (size_t)st.st_size) != st.st_size) {
        rc = scx_fail(err, SOFTCXI_EFORMAT, "%s cannot be read whole", path);
        goto done;
    }
    size_t len = (size_t)st.st_size;
    /* The frame's 16-bit lengths bound the list at 64 KiB of entries. */
    if (scx_frame_parse(&f, &info, buf, len, &why) != 0 || f.type != SCX_TYPE_REVOKED) {
        rc = scx_fail(err, SOFTCXI_EFORMAT, "%s is corrupt: %s", path,
                      why.msg[0] ? why.msg : "not a revocation list");
        goto done;
    }
    if (!(pt = OPENSSL_malloc(f.ct_len ? f.ct_len : 1)) ||
        scx_xaes_init(&x, dev->sec->storage_key) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ENOMEM, "out of memory");
        goto done;
    }
    have_x = 1;
    rc = scx_xaes_open(&x, dev->gcm, pt, f.ct, f.ct_len, f.tag, f.salt, buf, f.aad_len);
    if (rc) {
        rc = scx_fail(err, SOFTCXI_ETAMPER, "%s fails authentication", path);
        goto done;
    }
    *out = pt, *out_len = f.ct_len;
    pt = NULL;
done:
    if (have_x)
        scx_xaes_clear(&x);
    OPENSSL_free(pt);
    OPENSSL_free(buf);
    if (fd >= 0)
        close(fd);
    free(path);
    return rc;
}

/* Walk the entries of a payload; cb gets each entry's fields. */
typedef int (*entry_cb)(void *ctx, const uint8_t id[32], int64_t t, const char *group,
                        size_t gl, const char *name, size_t nl, const char *reason, size_t rl);

static int walk(const uint8_t *p, size_t len, entry_cb cb, void *ctx)
{
    size_t k = 0;
    while (k < len) {
        if (len - k < 32 + 8 + 1)
            return -1;
        const uint8_t *id = p + k;
        uint64_t t = 0;
        for (int i = 0; i < 8; i++)
            t = t << 8 | p[k + 32 + (size_t)i];
        k += 40;
        size_t gl = p[k++];
        if (len - k < gl + 1)
            return -1;
        const char *g = (const char *)p + k;
        k += gl;
        size_t nl = p[k++];
        if (len - k < nl + 1)
            return -1;
        const char *n = (const char *)p + k;
        k += nl;
        size_t rl = p[k++];
        if (len - k < rl)
            return -1;
        const char *r = (const char *)p + k;
        k += rl;
        if (cb && cb(ctx, id, (int64_t)t, g, gl, n, nl, r, rl) != 0)
            return 1;
    }
    return 0;
}

static int collect_id(void *ctx, const uint8_t id[32], int64_t t, const char *g, size_t gl,
                      const char *n, size_t nl, const char *r, size_t rl)
{
    softcxi_device *dev = ctx;
    (void)t, (void)g, (void)gl, (void)n, (void)nl, (void)r, (void)rl;
    memcpy(dev->revoked[dev->nrevoked++], id, 32);
    return 0;
}

static int count_entry(void *ctx, const uint8_t id[32], int64_t t, const char *g, size_t gl,
                       const char *n, size_t nl, const char *r, size_t rl)
{
    (void)id, (void)t, (void)g, (void)gl, (void)n, (void)nl, (void)r, (void)rl;
    (*(size_t *)ctx)++;
    return 0;
}

int scx_revoked_reload(softcxi_device *dev, softcxi_error *err)
{
    uint8_t *p;
    size_t len, n = 0;
    if (!dev->path)
        return 0;
    int rc = load_payload(dev, &p, &len, err);
    if (rc)
        return rc;
    OPENSSL_free(dev->revoked);
    dev->revoked = NULL;
    dev->nrevoked = 0;
    if (p && (walk(p, len, count_entry, &n) != 0 ||
              (n && !(dev->revoked = OPENSSL_malloc(n * 32))))) {
        OPENSSL_free(p);
        return scx_fail(err, SOFTCXI_EFORMAT, "the revocation list is malformed");
    }
    if (p)
        (void)walk(p, len, collect_id, dev);
    OPENSSL_free(p);
    return 0;
}

int scx_is_revoked(const softcxi_device *dev, const uint8_t id[32])
{
    for (size_t i = 0; i < dev->nrevoked; i++)
        if (memcmp(dev->revoked[i], id, 32) == 0)
            return 1;
    return 0;
}

static int save_payload(softcxi_device *dev, const uint8_t *p, size_t len, softcxi_error *err)
{
    uint8_t salt[SCX_SALT_LEN], kcv[SCX_KCV_LEN];
    size_t total = SCX_HDR_LEN + len + SCX_TAG_LEN;
    uint8_t *out = OPENSSL_malloc(total);
    char *path = rpath(dev, REVOKED_FILE), tmp[4200];
    scx_xaes x;
    int rc;
    if (!out || !path || len > SCX_MAX_SECRET) {
        rc = scx_fail(err, len > SCX_MAX_SECRET ? SOFTCXI_EFULL : SOFTCXI_ENOMEM,
                      "the revocation list is full (64 KiB)");
        goto done;
    }
    if (RAND_bytes(salt, sizeof salt) != 1 || scx_kcv(kcv, dev->sec->storage_key) != 0 ||
        scx_xaes_init(&x, dev->sec->storage_key) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "sealing the revocation list failed");
        goto done;
    }
    rc = scx_frame_seal(out, SCX_TYPE_REVOKED, kcv, salt, NULL, 0, p, len, &x, dev->gcm);
    scx_xaes_clear(&x);
    if (rc) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "sealing the revocation list failed");
        goto done;
    }
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
    rc = scx_write_file_atomic(path, tmp, out, total, err);
done:
    OPENSSL_free(out);
    free(path);
    return rc;
}

int softcxi_key_revoke(softcxi_session *s, const uint8_t *blob, size_t len, const char *reason)
{
    softcxi_device *dev = s->dev;
    scx_frame f;
    softcxi_key_info info;
    uint8_t id[32], *old = NULL, *p = NULL;
    size_t old_len = 0;
    int rc, lock = -1;

    if (!dev->path)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "key_revoke: this device keeps no list");
    if (len > 0 && blob[0] == 0x49 && (rc = scx_handle_resolve(s, blob, len, &blob, &len)) != 0)
        return rc;
    if ((rc = scx_frame_parse(&f, &info, blob, len, &s->err)) != 0)
        return rc;
    /* An administrator, or a user of the key's group, may revoke it. */
    if (scx_access_admin(s, "key_revoke") != 0 &&
        (rc = scx_access_key(s, info.group, info.group_len, "key_revoke")) != 0)
        return rc;
    if ((rc = scx_key_id(id, f.attrs, f.attrs_len)) != 0)
        return scx_fail_ssl(&s->err, rc, "key_revoke: digest failed");
    if ((rc = scx_audit(s, "key_revoke", REF(&info), reason ? reason : "")) != 0)
        return rc;
    char lp[4200];
    snprintf(lp, sizeof lp, "%s/device.lock", dev->path);
    lock = open(lp, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock < 0 || flock(lock, LOCK_EX) != 0) {
        rc = scx_fail(&s->err, SOFTCXI_EIO, "key_revoke: cannot lock %s", lp);
        goto done;
    }
    if ((rc = load_payload(dev, &old, &old_len, &s->err)) != 0)
        goto done;
    size_t gl = info.group_len > 255 ? 255 : info.group_len;
    size_t nl = info.name_len > 255 ? 255 : info.name_len;
    size_t rl = reason ? strlen(reason) : 0;
    if (rl > 255)
        rl = 255;
    size_t add = 32 + 8 + 1 + gl + 1 + nl + 1 + rl, k = old_len;
    if (!(p = OPENSSL_malloc(old_len + add))) {
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "out of memory");
        goto done;
    }
    if (old_len)
        memcpy(p, old, old_len);
    memcpy(p + k, id, 32), k += 32;
    uint64_t now = (uint64_t)time(NULL);
    for (int i = 0; i < 8; i++)
        p[k++] = (uint8_t)(now >> (56 - 8 * i));
    p[k++] = (uint8_t)gl;
    if (gl)
        memcpy(p + k, info.group, gl), k += gl;
    p[k++] = (uint8_t)nl;
    if (nl)
        memcpy(p + k, info.name, nl), k += nl;
    p[k++] = (uint8_t)rl;
    if (rl)
        memcpy(p + k, reason, rl), k += rl;
    if ((rc = save_payload(dev, p, k, &s->err)) != 0)
        goto done;
    /* Every process, this one included, reloads at its next call. */
    if (dev->gen_map)
        __atomic_add_fetch(dev->gen_map, 1, __ATOMIC_ACQ_REL);
    rc = scx_device_sync(s);
done:
    if (lock >= 0)
        close(lock);
    OPENSSL_free(old);
    OPENSSL_free(p);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

typedef struct list_ctx {
    softcxi_revoked_cb cb;
    void *ctx;
} list_ctx;

static int list_entry(void *ctx, const uint8_t id[32], int64_t t, const char *g, size_t gl,
                      const char *n, size_t nl, const char *r, size_t rl)
{
    list_ctx *l = ctx;
    char hex[65], group[256], name[256], reason[256];
    scx_hex(hex, id, 32);
    snprintf(group, sizeof group, "%.*s", (int)gl, g);
    snprintf(name, sizeof name, "%.*s", (int)nl, n);
    snprintf(reason, sizeof reason, "%.*s", (int)rl, r);
    return l->cb(l->ctx, hex, t, group, name, reason);
}

int softcxi_key_revoked(softcxi_session *s, softcxi_revoked_cb cb, void *ctx)
{
    uint8_t *p;
    size_t len;
    if (s->nlogons == 0 && !s->dev->open_access)
        return scx_fail(&s->err, SOFTCXI_EAUTH, "key_revoked: log on first (logon_pass)");
    if (!s->dev->path)
        return 0;
    int rc = load_payload(s->dev, &p, &len, &s->err);
    if (rc)
        return rc;
    list_ctx l = {cb, ctx};
    if (p && walk(p, len, list_entry, &l) < 0)
        rc = scx_fail(&s->err, SOFTCXI_EFORMAT, "the revocation list is malformed");
    OPENSSL_free(p);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}
