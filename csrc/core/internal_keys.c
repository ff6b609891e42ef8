/*
 * internal_keys.c - keys kept in the device (the internal key database,
 * keydb.c) and the handles that name them, their backups under the MBK (one
 * key: key_backup; the whole database: backup_database), get_state, and the
 * device's use of the audit log (audit.c).
 *
 * A handle is what key_generate without FLAG_EXTERNAL and key_open return:
 *
 *   'I' 0x01 | u8 group_len, group | u8 name_len, name | u8 has_spec | u32 spec
 *
 * It names a key; it holds nothing secret.  Every operation that takes a
 * blob takes a handle too: scx_key_get resolves it to the blob stored in
 * the database (sealed under the MBK like any other), so the key never
 * leaves the device and deleting it from the database ends it.
 */
#include "internal.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define HANDLE_MAGIC 0x49u /* 'I' */
#define HANDLE_VERSION 1u

/* ---- the database ------------------------------------------------------ */

static int keydb(softcxi_session *s, scx_keydb **out)
{
    softcxi_device *dev = s->dev;
    int rc;
    if (!dev->path)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "this device keeps no internal keys");
    if (!dev->keydb)
        rc = scx_keydb_open(&dev->keydb, dev->path, dev->sec->storage_key, dev->keydb_limit,
                            &s->err);
    else /* another process may have changed it */
        rc = scx_keydb_reload(dev->keydb, &s->err);
    /* What was just read may hold keys sealed under an MBK that another
     * process imported after this call's first sync: the writer saved that
     * MBK and bumped the generation before it sealed, so a second sync, after
     * the read, always knows it. */
    if (rc == 0)
        rc = scx_device_sync(s);
    *out = dev->keydb;
    return rc;
}

static size_t handle_make(uint8_t *h, size_t cap, const char *group, const char *name,
                          uint32_t spec, int has_spec)
{
    size_t gl = group ? strlen(group) : 0, nl = name ? strlen(name) : 0;
    if (gl > 255 || nl > 255 || 2 + 1 + gl + 1 + nl + 5 > cap)
        return 0;
    size_t k = 0;
    h[k++] = HANDLE_MAGIC, h[k++] = HANDLE_VERSION;
    h[k++] = (uint8_t)gl, memcpy(h + k, group, gl), k += gl;
    h[k++] = (uint8_t)nl, memcpy(h + k, name, nl), k += nl;
    h[k++] = (uint8_t)(has_spec ? 1 : 0);
    for (int i = 0; i < 4; i++)
        h[k++] = (uint8_t)(spec >> (24 - 8 * i));
    return k;
}

typedef struct address {
    char group[256], name[256];
    uint32_t spec;
    int has_spec;
} address;

static int handle_parse(address *a, const uint8_t *h, size_t len)
{
    size_t k = 2;
    if (len < 2 + 1 + 1 + 5 || h[0] != HANDLE_MAGIC || h[1] != HANDLE_VERSION)
        return -1;
    size_t gl = h[k++];
    if (len - k < gl + 1)
        return -1;
    memcpy(a->group, h + k, gl), a->group[gl] = '\0', k += gl;
    size_t nl = h[k++];
    if (len - k != nl + 5 || memchr(a->group, 0, gl))
        return -1;
    memcpy(a->name, h + k, nl), a->name[nl] = '\0', k += nl;
    if (memchr(a->name, 0, nl) || h[k] > 1)
        return -1;
    a->has_spec = h[k++];
    a->spec = (uint32_t)h[k] << 24 | (uint32_t)h[k + 1] << 16 | (uint32_t)h[k + 2] << 8 | h[k + 3];
    return 0;
}

int scx_handle_resolve(softcxi_session *s, const uint8_t *h, size_t len, const uint8_t **blob,
                       size_t *blob_len)
{
    address a;
    scx_keydb *db = NULL;
    if (handle_parse(&a, h, len) != 0)
        return scx_fail(&s->err, SOFTCXI_EFORMAT, "not a softcxi internal key handle");
    int rc = keydb(s, &db);
    if (rc == 0)
        rc = scx_keydb_get(db, a.group, a.name, a.spec, a.has_spec, blob, blob_len, &s->err);
    return rc;
}

/* Store a freshly sealed blob as an internal key and hand back its handle. */
int scx_store_internal(softcxi_session *s, softcxi_buf *out, const softcxi_template *t,
                       unsigned flags)
{
    scx_keydb *db = NULL;
    uint8_t h[600];
    if (!t->name || !*t->name) {
        softcxi_buf_free(out);
        return scx_fail(&s->err, SOFTCXI_EINVAL,
                        "template.name: an internal key needs a name (its address)");
    }
    size_t hl = handle_make(h, sizeof h, t->group ? t->group : "", t->name, t->specifier,
                            t->has_specifier);
    int rc = keydb(s, &db);
    if (rc == 0)
        rc = scx_keydb_put(db, t->group ? t->group : "", t->name, t->specifier, t->has_specifier,
                           out->data, out->len, flags, &s->err);
    softcxi_buf_free(out);
    if (rc)
        return rc;
    if (!hl || !(out->data = OPENSSL_memdup(h, hl)))
        return scx_fail(&s->err, SOFTCXI_ENOMEM, "out of memory");
    out->len = hl;
    return 0;
}

int softcxi_key_open(softcxi_session *s, softcxi_buf *handle, const char *group, const char *name,
                     uint32_t specifier, int has_specifier)
{
    scx_keydb *db = NULL;
    const uint8_t *blob;
    size_t blob_len, gl = group ? strlen(group) : 0;
    uint8_t h[600];
    handle->data = NULL, handle->len = 0, handle->secret = 0;
    int rc = scx_access_key(s, group, gl, "key_open");
    if (rc == 0)
        rc = keydb(s, &db);
    if (rc == 0)
        rc = scx_keydb_get(db, group ? group : "", name ? name : "", specifier, has_specifier,
                           &blob, &blob_len, &s->err);
    if (rc)
        return rc;
    size_t hl = handle_make(h, sizeof h, group ? group : "", name ? name : "", specifier,
                            has_specifier);
    if (!hl || !(handle->data = OPENSSL_memdup(h, hl)))
        return scx_fail(&s->err, SOFTCXI_ENOMEM, "out of memory");
    handle->len = hl;
    scx_ok(&s->err);
    return 0;
}

int softcxi_key_delete(softcxi_session *s, const uint8_t *handle, size_t len)
{
    address a;
    scx_keydb *db = NULL;
    if (handle_parse(&a, handle, len) != 0)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "key_delete: not an internal key handle");
    char subject[520];
    snprintf(subject, sizeof subject, "%s/%s", a.group, a.name);
    int rc = scx_access_key(s, a.group, strlen(a.group), "key_delete");
    if (rc == 0) /* recorded before it happens: a log that cannot take it stops it */
        rc = scx_audit(s, "key_delete", subject, s->nlogons ? s->logons[0].name : "");
    if (rc == 0 && (rc = keydb(s, &db)) == 0) {
        rc = scx_keydb_delete(db, a.group, a.name, a.spec, a.has_spec, &s->err);
        scx_audit_outcome(s, "key_delete", subject, rc);
    }
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

typedef struct list_ctx {
    softcxi_session *s;
    softcxi_key_cb cb;
    void *ctx;
} list_ctx;

static int list_one(void *p, const char *group, const char *name, uint32_t spec, int has_spec,
                    const uint8_t *blob, size_t blob_len)
{
    list_ctx *l = p;
    (void)blob, (void)blob_len;
    softcxi_error keep = l->s->err;
    /* Only the groups the logged-on users may use are listed. */
    int ok = scx_access_key(l->s, group, strlen(group), "key_list") == 0;
    l->s->err = keep;
    return ok ? l->cb(l->ctx, group, name, spec, has_spec) : 0;
}

int softcxi_key_list(softcxi_session *s, softcxi_key_cb cb, void *ctx)
{
    scx_keydb *db = NULL;
    if (s->nlogons == 0 && !s->dev->open_access)
        return scx_fail(&s->err, SOFTCXI_EAUTH, "key_list: log on first (logon_pass)");
    int rc = keydb(s, &db);
    list_ctx l = {s, cb, ctx};
    if (rc == 0)
        rc = scx_keydb_list(db, list_one, &l, &s->err);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

int softcxi_keydb_usage(softcxi_session *s, size_t *used, size_t *limit)
{
    scx_keydb *db = NULL;
    int rc = keydb(s, &db);
    if (rc)
        return rc;
    *used = scx_keydb_used(db);
    *limit = scx_keydb_limit(db);
    scx_ok(&s->err);
    return 0;
}

/* ---- audit ------------------------------------------------------------- */

void scx_admins(const softcxi_session *s, char *out, size_t cap)
{
    size_t k = 0;
    out[0] = '\0';
    for (int i = 0; i < s->nlogons && k + 1 < cap; i++) {
        if (s->logons[i].role != SCX_ROLE_ADMIN)
            continue;
        int w = snprintf(out + k, cap - k, "%s%s", k ? "," : "by ", s->logons[i].name);
        if (w < 0)
            break;
        k += (size_t)w;
    }
}

int scx_audit(softcxi_session *s, const char *event, const char *subject, const char *detail)
{
    if (!s->dev->path)
        return 0;
    return scx_audit_append(s->dev->path, s->dev->sec->audit_key, event, subject, detail,
                            &s->err);
}

int scx_audit_request(softcxi_session *s, const char *event, const char *subject)
{
    char by[200];
    scx_admins(s, by, sizeof by);
    return scx_audit(s, event, subject, by[0] ? by : "requested");
}

void scx_audit_outcome(softcxi_session *s, const char *event, const char *subject, int rc)
{
    if (rc == 0)
        return;
    /* Best effort, and the caller's error stays what it was. */
    softcxi_error keep = s->err;
    char what[64];
    snprintf(what, sizeof what, "%s-failed", event);
    (void)scx_audit(s, what, subject, softcxi_code_name(rc));
    s->err = keep;
}

int softcxi_audit_log(softcxi_session *s, softcxi_audit_cb cb, void *ctx)
{
    int rc = scx_access_admin(s, "audit_log");
    if (rc)
        return rc;
    if (!s->dev->path)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "audit_log: this device keeps no log");
    rc = scx_audit_read(s->dev->path, s->dev->sec->audit_key, cb, ctx, &s->err);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

int softcxi_audit_verify(softcxi_session *s, uint64_t *records)
{
    int rc = scx_access_admin(s, "audit_verify");
    if (rc)
        return rc;
    if (!s->dev->path)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "audit_verify: this device keeps no log");
    rc = scx_audit_verify(s->dev->path, s->dev->sec->audit_key, records, &s->err);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

/* ---- internal keys across an MBK rotation -------------------------------- */

int scx_internal_rewrap(softcxi_session *s, softcxi_buf *out, const uint8_t *handle, size_t len,
                        int *changed)
{
    address a;
    scx_keydb *db = NULL;
    const uint8_t *blob;
    size_t blob_len;
    softcxi_buf fresh = {0};
    if (handle_parse(&a, handle, len) != 0)
        return scx_fail(&s->err, SOFTCXI_EFORMAT, "not a softcxi internal key handle");
    int rc = scx_access_key(s, a.group, strlen(a.group), "key_rewrap");
    if (rc == 0)
        rc = keydb(s, &db);
    if (rc == 0)
        rc = scx_keydb_get(db, a.group, a.name, a.spec, a.has_spec, &blob, &blob_len, &s->err);
    if (rc == 0)
        rc = scx_rewrap_blob(s, &fresh, blob, blob_len, changed, 1);
    if (rc == 0 && *changed)
        rc = scx_keydb_put(db, a.group, a.name, a.spec, a.has_spec, fresh.data, fresh.len,
                           SOFTCXI_FLAG_OVERWRITE, &s->err);
    softcxi_buf_free(&fresh);
    if (rc)
        return rc;
    if (!(out->data = OPENSSL_memdup(handle, len)))
        return scx_fail(&s->err, SOFTCXI_ENOMEM, "out of memory");
    out->len = len;
    return 0;
}

/* Copies of every entry, so the database can be written while walking. */
typedef struct entry_copy {
    address a;
    uint8_t *blob;
    size_t len;
} entry_copy;

typedef struct copy_ctx {
    entry_copy *e;
    size_t n, cap;
    int oom;
} copy_ctx;

static int copy_one(void *p, const char *group, const char *name, uint32_t spec, int has_spec,
                    const uint8_t *blob, size_t blob_len)
{
    copy_ctx *c = p;
    if (c->n == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 64;
        entry_copy *e = OPENSSL_realloc(c->e, cap * sizeof *e);
        if (!e) {
            c->oom = 1;
            return 1;
        }
        c->e = e, c->cap = cap;
    }
    entry_copy *e = &c->e[c->n];
    snprintf(e->a.group, sizeof e->a.group, "%s", group);
    snprintf(e->a.name, sizeof e->a.name, "%s", name);
    e->a.spec = spec, e->a.has_spec = has_spec;
    if (!(e->blob = OPENSSL_memdup(blob, blob_len))) {
        c->oom = 1;
        return 1;
    }
    e->len = blob_len;
    c->n++;
    return 0;
}

static void copies_free(copy_ctx *c)
{
    for (size_t i = 0; i < c->n; i++)
        OPENSSL_free(c->e[i].blob);
    OPENSSL_free(c->e);
}

static int copy_all(softcxi_session *s, copy_ctx *c)
{
    scx_keydb *db = NULL;
    memset(c, 0, sizeof *c);
    if (!s->dev->path)
        return 0; /* an in-memory device keeps no internal keys */
    int rc = keydb(s, &db);
    if (rc == 0)
        rc = scx_keydb_list(db, copy_one, c, &s->err);
    if (c->oom)
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "out of memory walking the key database");
    return rc;
}

int scx_internal_rewrap_all(softcxi_session *s, size_t *moved)
{
    copy_ctx c;
    scx_keydb *db = NULL;
    *moved = 0;
    int rc = copy_all(s, &c);
    for (size_t i = 0; rc == 0 && i < c.n; i++) {
        softcxi_buf fresh = {0};
        int changed = 0;
        rc = scx_rewrap_blob(s, &fresh, c.e[i].blob, c.e[i].len, &changed, 0);
        if (rc == 0 && changed && (rc = keydb(s, &db)) == 0) {
            rc = scx_keydb_put(db, c.e[i].a.group, c.e[i].a.name, c.e[i].a.spec,
                               c.e[i].a.has_spec, fresh.data, fresh.len, SOFTCXI_FLAG_OVERWRITE,
                               &s->err);
            *moved += rc == 0;
        }
        softcxi_buf_free(&fresh);
    }
    copies_free(&c);
    return rc;
}

int scx_internal_count_under(softcxi_session *s, const uint8_t kcv[SCX_KCV_LEN], size_t *n)
{
    copy_ctx c;
    *n = 0;
    int rc = copy_all(s, &c);
    for (size_t i = 0; rc == 0 && i < c.n; i++)
        if (c.e[i].len >= 12 && memcmp(c.e[i].blob + 4, kcv, SCX_KCV_LEN) == 0)
            (*n)++;
    copies_free(&c);
    return rc;
}

/* ---- key backup and restore --------------------------------------------- */

/* A key backup is a v1 frame of type 0x02 sealed under a key derived from
 * the MBK with its own label: it restores on any device that holds the same
 * MBK (current or older).  The sealed payload is the key's address and its
 * stored blob (itself sealed under the MBK):
 *   u8 group_len, group | u8 name_len, name | u8 has_spec | u32 spec | blob
 * The attribute block of the backup repeats the key's, so a backup can be
 * identified without the MBK. */

static int backup_key(scx_xaes *x, const uint8_t mbk[32])
{
    uint8_t k[32];
    int rc = scx_label_key(k, mbk, SCX_LABEL_KEY_BACKUP);
    if (rc == 0)
        rc = scx_xaes_init(x, k);
    OPENSSL_cleanse(k, sizeof k);
    return rc;
}

/* The MBK of kcv (current or older), or NULL. */
static const uint8_t *mbk_of(const softcxi_device *dev, const uint8_t *kcv)
{
    if (memcmp(kcv, dev->kcv, SCX_KCV_LEN) == 0)
        return dev->sec->mbk;
    for (int i = 0; i < dev->nold; i++)
        if (memcmp(kcv, dev->old[i].kcv, SCX_KCV_LEN) == 0)
            return dev->sec->old_mbk[i];
    return NULL;
}

int softcxi_key_backup(softcxi_session *s, softcxi_buf *out, const uint8_t *handle, size_t len)
{
    softcxi_device *dev = s->dev;
    address a;
    scx_keydb *db = NULL;
    const uint8_t *blob;
    size_t blob_len;
    scx_frame f;
    softcxi_key_info info;
    uint8_t salt[SCX_SALT_LEN], *payload = NULL;
    scx_xaes x;
    int rc, have_x = 0;

    out->data = NULL, out->len = 0, out->secret = 0;
    if (handle_parse(&a, handle, len) != 0)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "key_backup: not an internal key handle");
    if ((rc = scx_device_sync(s)) != 0 ||
        (rc = scx_access_key(s, a.group, strlen(a.group), "key_backup")) != 0 ||
        (rc = keydb(s, &db)) != 0 ||
        (rc = scx_keydb_get(db, a.group, a.name, a.spec, a.has_spec, &blob, &blob_len,
                            &s->err)) != 0 ||
        (rc = scx_frame_parse(&f, &info, blob, blob_len, &s->err)) != 0)
        return rc;
    if (info.export_policy == SOFTCXI_EXPORT_DENY_BACKUP)
        return scx_fail(&s->err, SOFTCXI_EPOLICY,
                        "key_backup: key %s has export policy deny-backup", REF(&info));
    size_t gl = strlen(a.group), nl = strlen(a.name);
    size_t plen = 1 + gl + 1 + nl + 5 + blob_len, k = 0;
    size_t total = SCX_HDR_LEN + f.attrs_len + plen + SCX_TAG_LEN;
    if (plen > SCX_MAX_SECRET || !(payload = OPENSSL_malloc(plen)) ||
        !(out->data = OPENSSL_malloc(total)))
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "key_backup: out of memory");
    if (rc == 0) {
        payload[k++] = (uint8_t)gl, memcpy(payload + k, a.group, gl), k += gl;
        payload[k++] = (uint8_t)nl, memcpy(payload + k, a.name, nl), k += nl;
        payload[k++] = (uint8_t)a.has_spec;
        for (int i = 0; i < 4; i++)
            payload[k++] = (uint8_t)(a.spec >> (24 - 8 * i));
        memcpy(payload + k, blob, blob_len);
        if (scx_rnd_public(&dev->pool, salt, sizeof salt) != 0 ||
            backup_key(&x, dev->sec->mbk) != 0)
            rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "key_backup: sealing failed");
        else
            have_x = 1;
    }
    if (rc == 0 && scx_frame_seal(out->data, SCX_TYPE_KEY_BACKUP, dev->kcv, salt, f.attrs,
                                  f.attrs_len, payload, plen, &x, dev->gcm) != 0)
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "key_backup: sealing failed");
    if (have_x)
        scx_xaes_clear(&x);
    OPENSSL_free(payload);
    if (rc) {
        softcxi_buf_free(out);
        return rc;
    }
    out->len = total;
    scx_ok(&s->err);
    return 0;
}

int softcxi_key_restore(softcxi_session *s, softcxi_buf *handle, unsigned flags,
                        const uint8_t *backup, size_t len)
{
    softcxi_device *dev = s->dev;
    scx_frame f;
    softcxi_key_info info;
    scx_xaes x;
    uint8_t *pt = NULL, none[1];
    int rc;

    handle->data = NULL, handle->len = 0, handle->secret = 0;
    if ((rc = scx_device_sync(s)) != 0 ||
        (rc = scx_frame_parse(&f, &info, backup, len, &s->err)) != 0)
        return rc;
    if (f.type != SCX_TYPE_KEY_BACKUP)
        return scx_fail(&s->err, SOFTCXI_EFORMAT, "key_restore: not a key backup");
    const uint8_t *mbk = mbk_of(dev, f.kcv);
    if (!mbk) {
        char want[17], have[17];
        scx_hex(want, f.kcv, SCX_KCV_LEN);
        scx_hex(have, dev->kcv, SCX_KCV_LEN);
        return scx_fail(&s->err, SOFTCXI_EMBK,
                        "key_restore: the backup of key %s was made under MBK %s; this device "
                        "holds %s",
                        REF(&info), want, have);
    }
    if ((rc = scx_access_key(s, info.group, info.group_len, "key_restore")) != 0)
        return rc;
    if (!(pt = OPENSSL_malloc(f.ct_len ? f.ct_len : 1)) || backup_key(&x, mbk) != 0) {
        OPENSSL_free(pt);
        return scx_fail_ssl(&s->err, SOFTCXI_ENOMEM, "key_restore: out of memory");
    }
    rc = scx_xaes_open(&x, dev->gcm, f.ct_len ? pt : none, f.ct, f.ct_len, f.tag, f.salt, backup,
                       f.aad_len);
    scx_xaes_clear(&x);
    if (rc) {
        OPENSSL_free(pt);
        return scx_fail(&s->err, SOFTCXI_ETAMPER,
                        "key_restore: the backup of key %s fails authentication", REF(&info));
    }
    /* address, then the stored blob */
    softcxi_template t = {0};
    char group[256], name[256];
    size_t k = 0, n = f.ct_len;
    int ok = n >= 1 && (size_t)pt[0] + 1 <= n;
    if (ok) {
        size_t gl = pt[k++];
        memcpy(group, pt + k, gl), group[gl] = '\0', k += gl;
        ok = n - k >= 1;
        size_t nl = ok ? pt[k++] : 0;
        ok = ok && n - k >= nl + 5;
        if (ok) {
            memcpy(name, pt + k, nl), name[nl] = '\0', k += nl;
            t.has_specifier = pt[k++] != 0;
            t.specifier = (uint32_t)pt[k] << 24 | (uint32_t)pt[k + 1] << 16 |
                          (uint32_t)pt[k + 2] << 8 | pt[k + 3];
            k += 4;
        }
    }
    softcxi_buf stored = {0};
    int changed = 0;
    if (!ok || k >= n)
        rc = scx_fail(&s->err, SOFTCXI_EFORMAT, "key_restore: the backup's content is malformed");
    else /* under the current MBK, whatever MBK the backup was made under */
        rc = scx_rewrap_blob(s, &stored, pt + k, n - k, &changed, 0);
    OPENSSL_free(pt);
    if (rc)
        return rc;
    t.group = group, t.name = name;
    rc = scx_store_internal(s, &stored, &t, flags & SOFTCXI_FLAG_OVERWRITE);
    if (rc == 0)
        rc = scx_audit(s, "key_restore", name, group);
    if (rc == 0) {
        *handle = stored;
        scx_ok(&s->err);
    } else {
        softcxi_buf_free(&stored);
    }
    return rc;
}

/* ---- state -------------------------------------------------------------- */

int softcxi_get_state(softcxi_session *s, softcxi_state *st)
{
    softcxi_device *dev = s->dev;
    int rc = scx_device_sync(s);
    memset(st, 0, sizeof *st);
    if (rc)
        return rc;
    st->version = SOFTCXI_VERSION_STRING;
    st->id = dev->id;
    memcpy(st->kcv, dev->kcv, SCX_KCV_LEN);
    st->older_mbks = (unsigned)dev->nold;
    st->generation = dev->generation;
    st->revoked = dev->nrevoked;
    st->logged_on = (unsigned)s->nlogons;
    st->mbk_loaded = 1; /* a device does not open without its MBK */
    st->initialised = dev->path != NULL;
    if (dev->path) {
        scx_keydb *db = NULL;
        if ((rc = scx_users_count(s, &st->users)) != 0 || (rc = keydb(s, &db)) != 0)
            return rc;
        st->keydb_used = scx_keydb_used(db);
        st->keydb_limit = scx_keydb_limit(db);
    }
    scx_ok(&s->err);
    return 0;
}

/* ---- database backup and restore (CXI BackupDatabase / RestoreDatabase) -- */

/* A database backup (docs/blob-format.md, "Database backups"):
 *
 *   'K' 01 03 00 | KCV(8) of the MBK | salt(24) | created(8) | P(4)
 *   | XAES-256-GCM(HMAC-SHA256(MBK, "softcxi/v1/blob/db-backup"), salt,
 *                  aad = the 48 header bytes) of the P-byte payload | tag(16)
 *
 * The payload is the keys.db payload: count, then the entries in address
 * order, each blob sealed under the same MBK as the image (the backup
 * rewraps older ones), so the image restores on any device holding that
 * MBK.  The header is the v1 blob header for its first 36 bytes; the 32-bit
 * length follows because 8 MiB does not fit the frame's 16-bit lengths. */
#define DBB_HDR 48
#define DBB_MIN (DBB_HDR + SCX_TAG_LEN)

static int db_backup_key(scx_xaes *x, const uint8_t mbk[32])
{
    uint8_t k[32];
    int rc = scx_label_key(k, mbk, SCX_LABEL_DB_BACKUP);
    if (rc == 0)
        rc = scx_xaes_init(x, k);
    OPENSSL_cleanse(k, sizeof k);
    return rc;
}

static void put_be(uint8_t *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
}

static uint64_t get_be(const uint8_t *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = v << 8 | p[i];
    return v;
}

int softcxi_backup_database(softcxi_session *s, softcxi_buf *image, size_t *keys,
                            size_t *skipped)
{
    softcxi_device *dev = s->dev;
    copy_ctx c;
    scx_keydb_item *items = NULL;
    softcxi_buf *fresh = NULL;
    uint8_t *pt = NULL, salt[SCX_SALT_LEN];
    size_t plen = 0, n = 0;
    scx_xaes x;
    int rc, have_x = 0;

    image->data = NULL, image->len = 0, image->secret = 0;
    *keys = 0, *skipped = 0;
    memset(&c, 0, sizeof c);
    if ((rc = scx_access_admin(s, "backup_database")) != 0 || (rc = scx_device_sync(s)) != 0)
        return rc;
    if (!dev->path)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "backup_database: this device keeps no keys");
    if ((rc = scx_audit_request(s, "backup_database", "")) != 0)
        return rc;
    if ((rc = copy_all(s, &c)) != 0)
        goto done;
    items = OPENSSL_zalloc((c.n ? c.n : 1) * sizeof *items);
    fresh = OPENSSL_zalloc((c.n ? c.n : 1) * sizeof *fresh);
    if (!items || !fresh) {
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "backup_database: out of memory");
        goto done;
    }
    for (size_t i = 0; i < c.n; i++) {
        softcxi_key_info info;
        scx_frame f;
        int changed;
        if ((rc = scx_frame_parse(&f, &info, c.e[i].blob, c.e[i].len, &s->err)) != 0)
            goto done;
        if (info.export_policy == SOFTCXI_EXPORT_DENY_BACKUP) {
            (*skipped)++;
            continue;
        }
        /* Every key under the current MBK: the image needs only that one. */
        if ((rc = scx_rewrap_blob(s, &fresh[n], c.e[i].blob, c.e[i].len, &changed, 0)) != 0) {
            char why[SOFTCXI_ERRSTR_MAX];
            snprintf(why, sizeof why, "%s", s->err.msg);
            scx_fail(&s->err, rc, "backup_database: key '%s/%s': %s", c.e[i].a.group,
                     c.e[i].a.name, why);
            goto done;
        }
        items[n] = (scx_keydb_item){c.e[i].a.group, c.e[i].a.name, c.e[i].a.spec,
                                    c.e[i].a.has_spec, fresh[n].data, fresh[n].len};
        n++;
    }
    if ((rc = scx_keydb_encode(&pt, &plen, items, n, &s->err)) != 0)
        goto done;
    size_t total = DBB_MIN + plen;
    if (!(image->data = OPENSSL_malloc(total))) {
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "backup_database: out of memory");
        goto done;
    }
    uint8_t *h = image->data;
    h[0] = SCX_MAGIC, h[1] = SCX_VERSION, h[2] = SCX_TYPE_DB_BACKUP, h[3] = 0;
    memcpy(h + 4, dev->kcv, SCX_KCV_LEN);
    if (RAND_bytes(salt, sizeof salt) != 1 || db_backup_key(&x, dev->sec->mbk) != 0) {
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "backup_database: sealing failed");
        goto done;
    }
    have_x = 1;
    memcpy(h + 12, salt, SCX_SALT_LEN);
    put_be(h + 36, (uint64_t)time(NULL), 8);
    put_be(h + 44, plen, 4);
    if (scx_xaes_seal(&x, dev->gcm, h + DBB_HDR, h + DBB_HDR + plen, salt, h, DBB_HDR, pt,
                      plen) != 0) {
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "backup_database: sealing failed");
        goto done;
    }
    image->len = total;
    *keys = n;
done:
    if (have_x)
        scx_xaes_clear(&x);
    if (pt)
        OPENSSL_clear_free(pt, plen);
    for (size_t i = 0; fresh && i < n; i++)
        softcxi_buf_free(&fresh[i]);
    OPENSSL_free(fresh);
    OPENSSL_free(items);
    copies_free(&c);
    if (rc) {
        softcxi_buf_free(image);
        scx_audit_outcome(s, "backup_database", "", rc);
        return rc;
    }
    scx_ok(&s->err);
    return 0;
}

/* Restore collects every entry of the image, rewrapped under the current
 * MBK, before anything is written. */
typedef struct restore_ctx {
    softcxi_session *s;
    copy_ctx c;
} restore_ctx;

static int restore_one(void *p, const char *group, const char *name, uint32_t spec,
                       int has_spec, const uint8_t *blob, size_t blob_len)
{
    restore_ctx *r = p;
    softcxi_buf fresh = {0};
    int changed, rc = scx_rewrap_blob(r->s, &fresh, blob, blob_len, &changed, 0);
    if (rc) {
        char why[SOFTCXI_ERRSTR_MAX];
        snprintf(why, sizeof why, "%s", r->s->err.msg);
        return scx_fail(&r->s->err, rc, "restore_database: key '%s/%s' in the image: %s", group,
                        name, why);
    }
    rc = copy_one(&r->c, group, name, spec, has_spec, fresh.data, fresh.len);
    softcxi_buf_free(&fresh);
    if (r->c.oom)
        return scx_fail(&r->s->err, SOFTCXI_ENOMEM, "restore_database: out of memory");
    return rc;
}

int softcxi_restore_database(softcxi_session *s, const uint8_t *image, size_t len,
                             unsigned flags, size_t *keys)
{
    softcxi_device *dev = s->dev;
    restore_ctx r = {s, {0}};
    scx_keydb_item *items = NULL;
    scx_keydb *db = NULL;
    uint8_t *pt = NULL, *payload = NULL;
    size_t plen = 0, payload_len = 0;
    scx_xaes x;
    int rc, have_x = 0;

    *keys = 0;
    if (flags & ~(SOFTCXI_RESTORE_MERGE | SOFTCXI_FLAG_OVERWRITE))
        return scx_fail(&s->err, SOFTCXI_EINVAL, "restore_database: unknown flags 0x%x",
                        flags & ~(SOFTCXI_RESTORE_MERGE | SOFTCXI_FLAG_OVERWRITE));
    if ((flags & SOFTCXI_FLAG_OVERWRITE) && !(flags & SOFTCXI_RESTORE_MERGE))
        return scx_fail(&s->err, SOFTCXI_EINVAL,
                        "restore_database: FLAG_OVERWRITE goes with RESTORE_MERGE (a restore "
                        "without it replaces the whole database)");
    if ((rc = scx_access_admin(s, "restore_database")) != 0 || (rc = scx_device_sync(s)) != 0)
        return rc;
    if (!dev->path)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "restore_database: this device keeps no keys");
    /* Recorded before anything happens; a failure is recorded after. */
    const char *how = flags & SOFTCXI_RESTORE_MERGE ? "merge" : "replace";
    if ((rc = scx_audit_request(s, "restore_database", how)) != 0)
        return rc;
    if (!image || len < DBB_MIN || image[0] != SCX_MAGIC || image[1] != SCX_VERSION ||
        image[2] != SCX_TYPE_DB_BACKUP || image[3] != 0) {
        rc = scx_fail(&s->err, SOFTCXI_EFORMAT,
                      image && len >= 3 && image[0] == SCX_MAGIC && image[2] == SCX_TYPE_DB_BACKUP
                          ? "restore_database: the image is truncated or damaged (%zu bytes)"
                          : "restore_database: not a softcxi database backup (%zu bytes)",
                      len);
        goto done;
    }
    plen = (size_t)get_be(image + 44, 4);
    if (len != DBB_MIN + plen) {
        rc = scx_fail(&s->err, SOFTCXI_EFORMAT,
                      len < DBB_MIN + plen
                          ? "restore_database: the image is truncated: %zu of %zu bytes"
                          : "restore_database: the image has trailing bytes: %zu, expected %zu",
                      len, DBB_MIN + plen);
        goto done;
    }
    const uint8_t *mbk = mbk_of(dev, image + 4);
    if (!mbk) {
        char want[17], have[17];
        scx_hex(want, image + 4, SCX_KCV_LEN);
        scx_hex(have, dev->kcv, SCX_KCV_LEN);
        rc = scx_fail(&s->err, SOFTCXI_EMBK,
                      "restore_database: the image was made under MBK %s; this device holds %s "
                      "(import that MBK from its shares first)",
                      want, have);
        goto done;
    }
    if (!(pt = OPENSSL_malloc(plen ? plen : 1)) || db_backup_key(&x, mbk) != 0) {
        rc = scx_fail_ssl(&s->err, SOFTCXI_ENOMEM, "restore_database: out of memory");
        goto done;
    }
    have_x = 1;
    if (scx_xaes_open(&x, dev->gcm, pt, image + DBB_HDR, plen, image + DBB_HDR + plen,
                      image + 12, image, DBB_HDR) != 0) {
        rc = scx_fail(&s->err, SOFTCXI_ETAMPER,
                      "restore_database: the image fails authentication (damaged or edited)");
        goto done;
    }
    if ((rc = scx_keydb_parse(pt, plen, "restore_database: the image", restore_one, &r,
                              &s->err)) != 0)
        goto done;
    if (!(items = OPENSSL_zalloc((r.c.n ? r.c.n : 1) * sizeof *items))) {
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "restore_database: out of memory");
        goto done;
    }
    for (size_t i = 0; i < r.c.n; i++)
        items[i] = (scx_keydb_item){r.c.e[i].a.group, r.c.e[i].a.name, r.c.e[i].a.spec,
                                    r.c.e[i].a.has_spec, r.c.e[i].blob, r.c.e[i].len};
    unsigned mode = (flags & SOFTCXI_RESTORE_MERGE ? SCX_KEYDB_MERGE : 0) |
                    (flags & SOFTCXI_FLAG_OVERWRITE ? SCX_KEYDB_OVERWRITE : 0);
    if ((rc = scx_keydb_encode(&payload, &payload_len, items, r.c.n, &s->err)) != 0)
        goto done;
    /* Replacing is the cure for a damaged keys.db, so it need not read. */
    if (mode & SCX_KEYDB_MERGE) {
        rc = keydb(s, &db);
    } else {
        if (!dev->keydb)
            rc = scx_keydb_handle(&dev->keydb, dev->path, dev->sec->storage_key,
                                  dev->keydb_limit, &s->err);
        db = dev->keydb;
    }
    if (rc || (rc = scx_keydb_restore(db, payload, payload_len, "restore_database", mode,
                                      &s->err)) != 0)
        goto done;
    *keys = r.c.n;
done:
    if (have_x)
        scx_xaes_clear(&x);
    if (pt)
        OPENSSL_clear_free(pt, plen ? plen : 1);
    if (payload)
        OPENSSL_clear_free(payload, payload_len);
    OPENSSL_free(items);
    copies_free(&r.c);
    if (rc) {
        scx_audit_outcome(s, "restore_database", how, rc);
        return rc;
    }
    scx_ok(&s->err);
    return 0;
}
