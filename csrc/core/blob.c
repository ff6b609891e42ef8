/*
 * blob.c - the v1 key blob: attribute TLVs, the frame around them, and the
 * template rules a key must satisfy before it is sealed.
 *
 * The parser is total: any byte string yields a frame or a precise error,
 * and it never reads outside [blob, blob + len).  docs/blob-format.md is the
 * reference; the C tests check its vectors byte for byte.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

/* ---- attributes -------------------------------------------------------- */

typedef struct wbuf {
    uint8_t *p;
    size_t len, cap;
    int overflow;
} wbuf;

static void put_tlv(wbuf *w, unsigned tag, const void *v, size_t n)
{
    if (n > 0xFFFF || w->len + 3 + n > w->cap) {
        w->overflow = 1;
        return;
    }
    w->p[w->len] = (uint8_t)tag;
    scx_put16(w->p + w->len + 1, (unsigned)n);
    if (n)
        memcpy(w->p + w->len + 3, v, n);
    w->len += 3 + n;
}

static void put_u8(wbuf *w, unsigned tag, unsigned v)
{
    uint8_t b = (uint8_t)v;
    put_tlv(w, tag, &b, 1);
}

static void put_be(wbuf *w, unsigned tag, uint64_t v, size_t n)
{
    uint8_t b[8];
    for (size_t i = 0; i < n; i++)
        b[i] = (uint8_t)(v >> (8 * (n - 1 - i)));
    put_tlv(w, tag, b, n);
}

static void put_str(wbuf *w, unsigned tag, const char *s)
{
    if (s && *s)
        put_tlv(w, tag, s, strlen(s));
}

size_t scx_attrs_encode(uint8_t *out, size_t cap, const softcxi_template *t, int64_t gen_date,
                        const uint8_t *pub, size_t pub_len)
{
    wbuf w = {out, 0, cap, 0};
    /* Ascending tag order (low seven bits): the parser insists on it, which
     * also rules out duplicates. */
    put_u8(&w, SCX_A_ALGO, (unsigned)t->algo);
    if (t->algo == SOFTCXI_ALGO_EC)
        put_u8(&w, SCX_A_CURVE, (unsigned)t->curve);
    if (t->algo == SOFTCXI_ALGO_RSA || t->algo == SOFTCXI_ALGO_AES ||
        scx_hmac_digest(t->algo))
        put_be(&w, SCX_A_SIZE, t->size, 2);
    put_u8(&w, SCX_A_USAGE, t->usage);
    put_u8(&w, SCX_A_EXPORT, (unsigned)t->export_policy);
    if (t->expiry)
        put_be(&w, SCX_A_EXPIRY, (uint64_t)t->expiry, 8);
    put_str(&w, SCX_A_GROUP, t->group);
    put_str(&w, SCX_A_NAME, t->name);
    if (t->has_specifier)
        put_be(&w, SCX_A_SPECIFIER, t->specifier, 4);
    put_str(&w, SCX_A_LABEL, t->label);
    if (gen_date)
        put_be(&w, SCX_A_GEN_DATE, (uint64_t)gen_date, 8);
    if (pub_len)
        put_tlv(&w, SCX_A_PUB, pub, pub_len);
    return w.overflow ? 0 : w.len;
}

static uint64_t get_be(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

static int want_len(softcxi_error *err, unsigned tag, size_t got, size_t want)
{
    if (got == want)
        return 0;
    return scx_fail(err, SOFTCXI_EFORMAT,
                    "blob attribute 0x%02x has length %zu, expected %zu", tag, got, want);
}

static int decode_attrs(softcxi_key_info *info, const uint8_t *a, size_t len, softcxi_error *err)
{
    size_t off = 0;
    int last = -1;
    while (off < len) {
        if (len - off < 3)
            return scx_fail(err, SOFTCXI_EFORMAT, "blob attributes end inside a TLV header");
        unsigned tag = a[off];
        size_t n = scx_get16(a + off + 1);
        const uint8_t *v = a + off + 3;
        if (n > len - off - 3)
            return scx_fail(err, SOFTCXI_EFORMAT,
                            "blob attribute 0x%02x runs past the attribute block", tag);
        if ((int)(tag & 0x7F) <= last)
            return scx_fail(err, SOFTCXI_EFORMAT,
                            "blob attribute 0x%02x out of order or repeated", tag);
        last = (int)(tag & 0x7F);
        int rc = 0;
        switch (tag) {
        case SCX_A_ALGO:
            if (!(rc = want_len(err, tag, n, 1)))
                info->algo = v[0];
            break;
        case SCX_A_CURVE:
            if (!(rc = want_len(err, tag, n, 1)))
                info->curve = v[0];
            break;
        case SCX_A_SIZE:
            if (!(rc = want_len(err, tag, n, 2)))
                info->size = scx_get16(v);
            break;
        case SCX_A_USAGE:
            if (!(rc = want_len(err, tag, n, 1)))
                info->usage = v[0];
            break;
        case SCX_A_EXPORT:
            if (!(rc = want_len(err, tag, n, 1)))
                info->export_policy = v[0];
            break;
        case SCX_A_EXPIRY:
            if (!(rc = want_len(err, tag, n, 8)))
                info->expiry = (int64_t)get_be(v, 8);
            break;
        case SCX_A_GEN_DATE:
            if (!(rc = want_len(err, tag, n, 8)))
                info->gen_date = (int64_t)get_be(v, 8);
            break;
        case SCX_A_SPECIFIER:
            if (!(rc = want_len(err, tag, n, 4))) {
                info->specifier = (uint32_t)get_be(v, 4);
                info->has_specifier = 1;
            }
            break;
        case SCX_A_GROUP:
        case SCX_A_NAME:
        case SCX_A_LABEL:
            if (n > SOFTCXI_NAME_MAX || memchr(v, 0, n))
                return scx_fail(err, SOFTCXI_EFORMAT,
                                "blob attribute 0x%02x is not a valid name", tag);
            if (tag == SCX_A_GROUP)
                info->group = (const char *)v, info->group_len = n;
            else if (tag == SCX_A_NAME)
                info->name = (const char *)v, info->name_len = n;
            else
                info->label = (const char *)v, info->label_len = n;
            break;
        case SCX_A_PUB:
            info->pub = v;
            info->pub_len = n;
            break;
        default:
            if (tag & SCX_ATTR_CRITICAL)
                return scx_fail(err, SOFTCXI_EFORMAT,
                                "blob has unknown critical attribute 0x%02x "
                                "(made by a newer softcxi?)", tag);
            break; /* unknown, not critical: kept in the blob, ignored here */
        }
        if (rc)
            return rc;
        off += 3 + n;
    }
    return 0;
}

/* ---- frame ------------------------------------------------------------- */

int scx_frame_parse(scx_frame *f, softcxi_key_info *info, const uint8_t *b, size_t len,
                    softcxi_error *err)
{
    memset(f, 0, sizeof *f);
    memset(info, 0, sizeof *info);
    if (!b || len == 0)
        return scx_fail(err, SOFTCXI_EFORMAT, "empty blob");
    if (b[0] != SCX_MAGIC)
        return scx_fail(err, SOFTCXI_EFORMAT,
                        "not a softcxi blob: first byte 0x%02x is not 'K'", b[0]);
    if (len < SCX_MIN_BLOB)
        return scx_fail(err, SOFTCXI_EFORMAT,
                        "blob truncated: %zu bytes, a v1 blob has at least %d", len,
                        SCX_MIN_BLOB);
    if (b[1] != SCX_VERSION)
        return scx_fail(err, SOFTCXI_EFORMAT, "unsupported blob version %u (this is v%u)",
                        b[1], SCX_VERSION);
    if (b[3] != 0)
        return scx_fail(err, SOFTCXI_EFORMAT, "blob header has reserved flags 0x%02x set", b[3]);

    f->type = b[2];
    f->kcv = b + 4;
    f->salt = b + 12;
    f->attrs_len = scx_get16(b + 36);
    f->ct_len = scx_get16(b + 38);
    f->aad_len = SCX_HDR_LEN + f->attrs_len;
    f->total = f->aad_len + f->ct_len + SCX_TAG_LEN;
    f->attrs = b + SCX_HDR_LEN;
    f->ct = b + f->aad_len;
    f->tag = f->ct + f->ct_len;

    info->version = b[1];
    info->type = (int)f->type;
    memcpy(info->kcv, f->kcv, SCX_KCV_LEN);
    info->blob_len = len;

    int rc = 0;
    if (f->aad_len <= len)
        rc = decode_attrs(info, f->attrs, f->attrs_len, err);
    if (len != f->total) {
        char ref[200];
        /* Name the key when the attributes survived. */
        if (rc == 0 && f->aad_len <= len)
            scx_keyref(ref, sizeof ref, info);
        else
            snprintf(ref, sizeof ref, "(attributes cut off)");
        return scx_fail(err, SOFTCXI_EFORMAT,
                        len < f->total ? "blob of key %s truncated: %zu of %zu bytes"
                                       : "blob of key %s has trailing bytes: %zu, expected %zu",
                        ref, len, f->total);
    }
    if (rc)
        return rc;
    if (f->type == SCX_TYPE_KEY && (!info->algo || !softcxi_algo_name(info->algo))) {
        char ref[200];
        return scx_fail(err, SOFTCXI_EFORMAT, "blob of key %s has no valid algorithm",
                        scx_keyref(ref, sizeof ref, info));
    }
    return 0;
}

int scx_frame_seal(uint8_t *out, unsigned type, const uint8_t kcv[SCX_KCV_LEN],
                   const uint8_t salt[SCX_SALT_LEN], const uint8_t *attrs, size_t attrs_len,
                   const uint8_t *secret, size_t secret_len, scx_xaes *x, EVP_CIPHER_CTX *gcm)
{
    if (attrs_len > SCX_MAX_ATTRS || secret_len > SCX_MAX_SECRET)
        return SOFTCXI_EINVAL;
    out[0] = SCX_MAGIC;
    out[1] = SCX_VERSION;
    out[2] = (uint8_t)type;
    out[3] = 0;
    memcpy(out + 4, kcv, SCX_KCV_LEN);
    memcpy(out + 12, salt, SCX_SALT_LEN);
    scx_put16(out + 36, (unsigned)attrs_len);
    scx_put16(out + 38, (unsigned)secret_len);
    if (attrs_len)
        memcpy(out + SCX_HDR_LEN, attrs, attrs_len);
    size_t aad = SCX_HDR_LEN + attrs_len;
    return scx_xaes_seal(x, gcm, out + aad, out + aad + secret_len, salt, out, aad, secret,
                         secret_len);
}

int softcxi_key_info_read(softcxi_key_info *info, const uint8_t *blob, size_t blob_len,
                          softcxi_error *err)
{
    scx_frame f;
    int rc = scx_frame_parse(&f, info, blob, blob_len, err);
    if (rc)
        return rc;
    /* A key backup carries the key's attributes too: it can be identified
     * (info->type says which it is), but no operation takes it. */
    if (f.type != SCX_TYPE_KEY && f.type != SCX_TYPE_KEY_BACKUP)
        return scx_fail(err, SOFTCXI_EFORMAT, "not a key blob (blob type 0x%02x)", f.type);
    scx_ok(err);
    return 0;
}

/* ---- templates --------------------------------------------------------- */

static unsigned allowed_usage(int algo)
{
    switch (algo) {
    case SOFTCXI_ALGO_EC:
        return SOFTCXI_USAGE_SIGN | SOFTCXI_USAGE_VERIFY | SOFTCXI_USAGE_DERIVE;
    case SOFTCXI_ALGO_ED25519:
        return SOFTCXI_USAGE_SIGN | SOFTCXI_USAGE_VERIFY;
    case SOFTCXI_ALGO_X25519:
        return SOFTCXI_USAGE_DERIVE;
    case SOFTCXI_ALGO_RSA:
        return SOFTCXI_USAGE_SIGN | SOFTCXI_USAGE_VERIFY | SOFTCXI_USAGE_ENCRYPT |
               SOFTCXI_USAGE_DECRYPT | SOFTCXI_USAGE_WRAP | SOFTCXI_USAGE_UNWRAP;
    case SOFTCXI_ALGO_AES:
        return SOFTCXI_USAGE_ENCRYPT | SOFTCXI_USAGE_DECRYPT | SOFTCXI_USAGE_WRAP |
               SOFTCXI_USAGE_UNWRAP | SOFTCXI_USAGE_DERIVE;
    default: /* HMAC */
        return SOFTCXI_USAGE_SIGN | SOFTCXI_USAGE_VERIFY;
    }
}

static unsigned default_usage(int algo)
{
    switch (algo) {
    case SOFTCXI_ALGO_X25519:
        return SOFTCXI_USAGE_DERIVE;
    case SOFTCXI_ALGO_AES:
        return SOFTCXI_USAGE_ENCRYPT | SOFTCXI_USAGE_DECRYPT;
    default:
        return SOFTCXI_USAGE_SIGN | SOFTCXI_USAGE_VERIFY;
    }
}

static int check_name(softcxi_error *err, const char *field, const char *s)
{
    if (s && strlen(s) > SOFTCXI_NAME_MAX)
        return scx_fail(err, SOFTCXI_EINVAL, "template.%s: longer than %d bytes", field,
                        SOFTCXI_NAME_MAX);
    return 0;
}

int scx_template_check(softcxi_template *t, softcxi_error *err)
{
    const char *an = softcxi_algo_name(t->algo);
    if (!an)
        return scx_fail(err, SOFTCXI_EINVAL, "template.algo: unknown algorithm %d", t->algo);
    switch (t->algo) {
    case SOFTCXI_ALGO_EC: {
        if (t->curve == SOFTCXI_CURVE_NONE)
            t->curve = SOFTCXI_CURVE_P256;
        const scx_curve_def *c = scx_curve(t->curve);
        if (!c)
            return scx_fail(err, SOFTCXI_EINVAL,
                            "template.curve: unknown curve (expected P-256, P-384, P-521 or "
                            "secp256k1)");
        unsigned bits = t->curve == SOFTCXI_CURVE_P521 ? 521u : (unsigned)c->flen * 8;
        if (t->size && t->size != bits)
            return scx_fail(err, SOFTCXI_EINVAL, "template.size: %u does not match curve %s (%u)",
                            t->size, softcxi_curve_name(t->curve), bits);
        t->size = 0; /* the curve says it */
        break;
    }
    case SOFTCXI_ALGO_ED25519:
    case SOFTCXI_ALGO_X25519:
        if (t->size && t->size != 255 && t->size != 256)
            return scx_fail(err, SOFTCXI_EINVAL, "template.size: %s keys have no size %u", an,
                            t->size);
        t->size = 0;
        break;
    case SOFTCXI_ALGO_RSA:
        if (!t->size)
            t->size = 2048;
        if (t->size != 2048 && t->size != 3072 && t->size != 4096)
            return scx_fail(err, SOFTCXI_EINVAL,
                            "template.size: RSA modulus must be 2048, 3072 or 4096 bits, not %u",
                            t->size);
        break;
    case SOFTCXI_ALGO_AES:
        if (!t->size)
            t->size = 256;
        if (t->size != 128 && t->size != 192 && t->size != 256)
            return scx_fail(err, SOFTCXI_EINVAL,
                            "template.size: AES keys are 128, 192 or 256 bits, not %u", t->size);
        break;
    default: /* HMAC: the hash's output size unless asked otherwise */
        if (!t->size)
            t->size = t->algo == SOFTCXI_ALGO_HMAC_SHA256   ? 256
                      : t->algo == SOFTCXI_ALGO_HMAC_SHA384 ? 384
                                                            : 512;
        if (t->size < 128 || t->size > 2048 || t->size % 8)
            return scx_fail(err, SOFTCXI_EINVAL,
                            "template.size: HMAC keys are 128 to 2048 bits in whole bytes, not %u",
                            t->size);
        break;
    }
    if (t->algo != SOFTCXI_ALGO_EC && t->curve)
        return scx_fail(err, SOFTCXI_EINVAL, "template.curve: %s keys take no curve", an);
    if (!t->usage)
        t->usage = default_usage(t->algo);
    unsigned bad = t->usage & ~allowed_usage(t->algo);
    if (t->usage & ~SOFTCXI_USAGE_ALL)
        return scx_fail(err, SOFTCXI_EINVAL, "template.usage: unknown usage bits 0x%x",
                        t->usage & ~SOFTCXI_USAGE_ALL);
    if (bad) {
        unsigned bit = bad & (~bad + 1u);
        return scx_fail(err, SOFTCXI_EINVAL, "template.usage: '%s' does not apply to %s keys",
                        softcxi_usage_name(bit), an);
    }
    if (!softcxi_export_name(t->export_policy))
        return scx_fail(err, SOFTCXI_EINVAL, "template.export: unknown export policy %d",
                        t->export_policy);
    if (t->expiry < 0)
        return scx_fail(err, SOFTCXI_EINVAL, "template.expiry: negative time");
    int rc;
    if ((rc = check_name(err, "name", t->name)) || (rc = check_name(err, "group", t->group)) ||
        (rc = check_name(err, "label", t->label)))
        return rc;
    return 0;
}
