/*
 * internal_keys.c - keys kept in the device (the internal key database,
 * keydb.c) and the handles that name them, plus the device's use of the
 * audit log (audit.c).
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

#include <stdio.h>
#include <string.h>

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
    scx_keydb *db;
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
    scx_keydb *db;
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
    scx_keydb *db;
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
    scx_keydb *db;
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
    scx_keydb *db;
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
    scx_keydb *db;
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
    scx_keydb *db;
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
    scx_keydb *db;
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
    scx_keydb *db;
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
    scx_keydb *db;
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
        scx_keydb *db;
        if ((rc = scx_users_count(s, &st->users)) != 0 || (rc = keydb(s, &db)) != 0)
            return rc;
        st->keydb_used = scx_keydb_used(db);
        st->keydb_limit = scx_keydb_limit(db);
    }
    scx_ok(&s->err);
    return 0;
}
