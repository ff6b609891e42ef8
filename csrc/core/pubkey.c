/*
 * pubkey.c - public keys out of blobs: SubjectPublicKeyInfo DER, PEM and
 * JWK, built by hand from the raw public key the blob carries.
 *
 * The formats are fixed, so a few DER helpers do what OpenSSL's encoder
 * framework does at roughly a hundredth of the cost (i2d_PUBKEY ~78 us).
 */
#include "internal.h"

#include <ctype.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

static const uint8_t oid_ec_pub[] = {0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01};
static const uint8_t oid_ed25519[] = {0x2b, 0x65, 0x70};
static const uint8_t oid_x25519[] = {0x2b, 0x65, 0x6e};
static const uint8_t oid_rsa[] = {0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01};

/* ---- DER writing ------------------------------------------------------- */

typedef struct der {
    uint8_t *p;
    size_t len, cap;
    int overflow;
} der;

static size_t len_size(size_t n) { return n < 0x80 ? 1 : n < 0x100 ? 2 : n < 0x10000 ? 3 : 4; }

static void der_put(der *d, const void *v, size_t n)
{
    if (d->len + n > d->cap) {
        d->overflow = 1;
        return;
    }
    memcpy(d->p + d->len, v, n);
    d->len += n;
}

static void der_hdr(der *d, uint8_t tag, size_t n)
{
    uint8_t h[5];
    size_t k = 0;
    h[k++] = tag;
    if (n < 0x80) {
        h[k++] = (uint8_t)n;
    } else if (n < 0x100) {
        h[k++] = 0x81;
        h[k++] = (uint8_t)n;
    } else if (n < 0x10000) {
        h[k++] = 0x82;
        h[k++] = (uint8_t)(n >> 8);
        h[k++] = (uint8_t)n;
    } else {
        h[k++] = 0x83;
        h[k++] = (uint8_t)(n >> 16);
        h[k++] = (uint8_t)(n >> 8);
        h[k++] = (uint8_t)n;
    }
    der_put(d, h, k);
}

/* An unsigned big-endian INTEGER, minimal: strip zeros, add one if the top
 * bit is set. */
static size_t int_body(const uint8_t *v, size_t n, const uint8_t **start, int *pad)
{
    while (n > 1 && v[0] == 0)
        v++, n--;
    *start = v;
    *pad = n > 0 && (v[0] & 0x80);
    return n + (size_t)*pad;
}

size_t scx_der_rsa_pub(uint8_t *out, size_t cap, const uint8_t *n, size_t n_len,
                       const uint8_t *e, size_t e_len)
{
    const uint8_t *ns, *es;
    int np, ep;
    size_t nb = int_body(n, n_len, &ns, &np), eb = int_body(e, e_len, &es, &ep);
    size_t body = 1 + len_size(nb) + nb + 1 + len_size(eb) + eb;
    der d = {out, 0, cap, 0};
    static const uint8_t zero = 0;
    der_hdr(&d, 0x30, body);
    der_hdr(&d, 0x02, nb);
    if (np)
        der_put(&d, &zero, 1);
    der_put(&d, ns, nb - (size_t)np);
    der_hdr(&d, 0x02, eb);
    if (ep)
        der_put(&d, &zero, 1);
    der_put(&d, es, eb - (size_t)ep);
    return d.overflow ? 0 : d.len;
}

/* ---- DER reading (RSAPublicKey only) ----------------------------------- */

static int der_read(const uint8_t **p, const uint8_t *end, uint8_t tag, const uint8_t **v,
                    size_t *n)
{
    const uint8_t *q = *p;
    if (end - q < 2 || q[0] != tag)
        return -1;
    size_t len = q[1];
    q += 2;
    if (len & 0x80) {
        size_t k = len & 0x7F;
        if (k == 0 || k > 3 || (size_t)(end - q) < k)
            return -1;
        len = 0;
        for (size_t i = 0; i < k; i++)
            len = len << 8 | *q++;
    }
    if ((size_t)(end - q) < len)
        return -1;
    *v = q;
    *n = len;
    *p = q + len;
    return 0;
}

int scx_rsa_pub_parse(const uint8_t *der_in, size_t len, const uint8_t **n, size_t *n_len,
                      const uint8_t **e, size_t *e_len)
{
    const uint8_t *p = der_in, *end = der_in + len, *seq;
    size_t seq_len;
    if (!der_in || der_read(&p, end, 0x30, &seq, &seq_len) != 0 || p != end)
        return -1;
    p = seq;
    end = seq + seq_len;
    if (der_read(&p, end, 0x02, n, n_len) != 0 || der_read(&p, end, 0x02, e, e_len) != 0 ||
        p != end || *n_len == 0 || *e_len == 0)
        return -1;
    /* Leading zero of a positive INTEGER is not part of the number. */
    while (*n_len > 1 && **n == 0)
        (*n)++, (*n_len)--;
    while (*e_len > 1 && **e == 0)
        (*e)++, (*e_len)--;
    return 0;
}

/* ---- SPKI, PEM, JWK ---------------------------------------------------- */

static int spki(softcxi_buf *out, const softcxi_key_info *i, softcxi_error *err)
{
    const uint8_t *oid, *param_oid = NULL;
    size_t oid_len, param_len = 0;
    int null_param = 0;
    switch (i->algo) {
    case SOFTCXI_ALGO_EC: {
        const scx_curve_def *c = scx_curve(i->curve);
        if (!c)
            return scx_fail(err, SOFTCXI_EFORMAT, "blob has an unknown curve");
        oid = oid_ec_pub, oid_len = sizeof oid_ec_pub;
        param_oid = c->oid, param_len = c->oid_len;
        break;
    }
    case SOFTCXI_ALGO_ED25519:
        oid = oid_ed25519, oid_len = sizeof oid_ed25519;
        break;
    case SOFTCXI_ALGO_X25519:
        oid = oid_x25519, oid_len = sizeof oid_x25519;
        break;
    case SOFTCXI_ALGO_RSA:
        oid = oid_rsa, oid_len = sizeof oid_rsa;
        null_param = 1;
        break;
    default:
        return scx_fail(err, SOFTCXI_EINVAL, "%s keys have no public key",
                        softcxi_algo_name(i->algo));
    }
    size_t alg = 1 + len_size(oid_len) + oid_len +
                 (param_oid ? 1 + len_size(param_len) + param_len : 0) + (null_param ? 2 : 0);
    size_t bits = 1 + i->pub_len;
    size_t body = 1 + len_size(alg) + alg + 1 + len_size(bits) + bits;
    size_t total = 1 + len_size(body) + body;
    der d = {OPENSSL_malloc(total), 0, total, 0};
    if (!d.p)
        return scx_fail(err, SOFTCXI_ENOMEM, "public_key: out of memory");
    static const uint8_t null_der[2] = {0x05, 0x00}, unused_bits = 0;
    der_hdr(&d, 0x30, body);
    der_hdr(&d, 0x30, alg);
    der_hdr(&d, 0x06, oid_len);
    der_put(&d, oid, oid_len);
    if (param_oid) {
        der_hdr(&d, 0x06, param_len);
        der_put(&d, param_oid, param_len);
    }
    if (null_param)
        der_put(&d, null_der, 2);
    der_hdr(&d, 0x03, bits);
    der_put(&d, &unused_bits, 1);
    der_put(&d, i->pub, i->pub_len);
    if (d.overflow || d.len != total) {
        OPENSSL_free(d.p);
        return scx_fail(err, SOFTCXI_ECRYPTO, "public_key: DER encoding overflow");
    }
    out->data = d.p;
    out->len = d.len;
    out->secret = 0;
    return 0;
}

static size_t b64url(char *out, const uint8_t *in, size_t n)
{
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t k = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[k++] = a[v >> 18 & 63], out[k++] = a[v >> 12 & 63];
        out[k++] = a[v >> 6 & 63], out[k++] = a[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[k++] = a[v >> 18 & 63], out[k++] = a[v >> 12 & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[k++] = a[v >> 18 & 63], out[k++] = a[v >> 12 & 63], out[k++] = a[v >> 6 & 63];
    }
    out[k] = '\0';
    return k;
}

static int jwk(softcxi_buf *out, const softcxi_key_info *i, softcxi_error *err)
{
    char x[700], y[100];
    size_t cap = 1600;
    char *s = OPENSSL_malloc(cap);
    if (!s)
        return scx_fail(err, SOFTCXI_ENOMEM, "public_key: out of memory");
    int n = -1;
    if (i->algo == SOFTCXI_ALGO_EC) {
        const scx_curve_def *c = scx_curve(i->curve);
        size_t fl = c ? c->flen : 0;
        if (c && i->pub_len == 2 * fl + 1 && i->pub[0] == 4) {
            b64url(x, i->pub + 1, fl);
            b64url(y, i->pub + 1 + fl, fl);
            n = snprintf(s, cap, "{\"kty\":\"EC\",\"crv\":\"%s\",\"x\":\"%s\",\"y\":\"%s\"}",
                         c->jwk_crv, x, y);
        }
    } else if (i->algo == SOFTCXI_ALGO_ED25519 || i->algo == SOFTCXI_ALGO_X25519) {
        if (i->pub_len == 32) {
            b64url(x, i->pub, 32);
            n = snprintf(s, cap, "{\"kty\":\"OKP\",\"crv\":\"%s\",\"x\":\"%s\"}",
                         i->algo == SOFTCXI_ALGO_ED25519 ? "Ed25519" : "X25519", x);
        }
    } else if (i->algo == SOFTCXI_ALGO_RSA) {
        const uint8_t *nb, *eb;
        size_t nl, el;
        if (scx_rsa_pub_parse(i->pub, i->pub_len, &nb, &nl, &eb, &el) == 0 && nl <= 512 &&
            el <= 8) {
            b64url(x, nb, nl);
            b64url(y, eb, el);
            n = snprintf(s, cap, "{\"kty\":\"RSA\",\"n\":\"%s\",\"e\":\"%s\"}", x, y);
        }
    } else {
        OPENSSL_free(s);
        return scx_fail(err, SOFTCXI_EINVAL, "%s keys have no public key",
                        softcxi_algo_name(i->algo));
    }
    if (n < 0 || (size_t)n >= cap) {
        OPENSSL_free(s);
        return scx_fail(err, SOFTCXI_EFORMAT, "blob's public key is malformed");
    }
    out->data = (uint8_t *)s;
    out->len = (size_t)n;
    out->secret = 0;
    return 0;
}

static int pem(softcxi_buf *out, const softcxi_key_info *i, softcxi_error *err)
{
    softcxi_buf d = {0};
    int rc = spki(&d, i, err);
    if (rc)
        return rc;
    static const char head[] = "-----BEGIN PUBLIC KEY-----\n";
    static const char tail[] = "-----END PUBLIC KEY-----\n";
    size_t b64 = 4 * ((d.len + 2) / 3);
    size_t cap = sizeof head + b64 + b64 / 64 + 2 + sizeof tail;
    char *s = OPENSSL_malloc(cap);
    if (!s) {
        softcxi_buf_free(&d);
        return scx_fail(err, SOFTCXI_ENOMEM, "public_key: out of memory");
    }
    size_t k = 0;
    memcpy(s, head, sizeof head - 1);
    k = sizeof head - 1;
    for (size_t off = 0; off < d.len; off += 48) {
        size_t n = d.len - off < 48 ? d.len - off : 48;
        k += (size_t)EVP_EncodeBlock((unsigned char *)s + k, d.data + off, (int)n);
        s[k++] = '\n';
    }
    memcpy(s + k, tail, sizeof tail - 1);
    k += sizeof tail - 1;
    softcxi_buf_free(&d);
    out->data = (uint8_t *)s;
    out->len = k;
    out->secret = 0;
    return 0;
}

int scx_pub_encode(softcxi_buf *out, const softcxi_key_info *info, int fmt, softcxi_error *err)
{
    out->data = NULL;
    out->len = 0;
    out->secret = 0;
    if (!info->pub_len)
        return scx_fail(err, SOFTCXI_EINVAL, "%s keys have no public key",
                        softcxi_algo_name(info->algo) ? softcxi_algo_name(info->algo) : "these");
    switch (fmt) {
    case SOFTCXI_PUB_DER:
        return spki(out, info, err);
    case SOFTCXI_PUB_PEM:
        return pem(out, info, err);
    case SOFTCXI_PUB_JWK:
        return jwk(out, info, err);
    case SOFTCXI_PUB_RAW:
        if (!(out->data = OPENSSL_malloc(info->pub_len)))
            return scx_fail(err, SOFTCXI_ENOMEM, "public_key: out of memory");
        memcpy(out->data, info->pub, info->pub_len);
        out->len = info->pub_len;
        return 0;
    default:
        return scx_fail(err, SOFTCXI_EINVAL, "public_key: unknown format %d", fmt);
    }
}

/* ---- public keys in: JWK ---------------------------------------------------
 *
 * A JWK (RFC 7517) is a JSON object.  Only what a public key needs is read:
 * kty, crv, x, y, n, e (string members); every other member (use, kid,
 * key_ops, ext, alg, ...) is skipped whatever its type.  A private member
 * "d" is refused: private keys come in as PKCS#8.  The key is turned into
 * the raw public form a blob carries and from there into SPKI DER, which
 * key_import then checks with OpenSSL like any other SPKI. */

#define JWK_DEPTH 16
#define JWK_FIELDS 7

typedef struct jwk_in {
    const char *p, *end;
    /* kty crv x y n e d: the string's bytes (escapes decoded) */
    char *v[JWK_FIELDS];
    size_t len[JWK_FIELDS];
} jwk_in;

static const char *const jwk_names[JWK_FIELDS] = {"kty", "crv", "x", "y", "n", "e", "d"};

static void jwk_ws(jwk_in *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

/* A JSON string at j->p; *out (when wanted) receives its bytes. */
static int jwk_string(jwk_in *j, char **out, size_t *out_len)
{
    if (j->p >= j->end || *j->p != '"')
        return -1;
    const char *s = ++j->p;
    while (j->p < j->end && *j->p != '"') {
        if ((unsigned char)*j->p < 0x20)
            return -1;
        if (*j->p == '\\' && ++j->p >= j->end)
            return -1;
        j->p++;
    }
    if (j->p >= j->end)
        return -1;
    size_t raw = (size_t)(j->p - s);
    j->p++; /* the closing quote */
    if (!out)
        return 0;
    char *d = OPENSSL_malloc(raw + 1);
    size_t k = 0;
    if (!d)
        return -1;
    for (size_t i = 0; i < raw; i++) {
        char c = s[i];
        if (c == '\\') {
            c = s[++i];
            if (c == 'u') { /* \u00XX only: key material is ASCII */
                unsigned v;
                if (raw - i < 5 || !isxdigit((unsigned char)s[i + 1]) ||
                    !isxdigit((unsigned char)s[i + 2]) || !isxdigit((unsigned char)s[i + 3]) ||
                    !isxdigit((unsigned char)s[i + 4]) || sscanf(s + i + 1, "%4x", &v) != 1 ||
                    v == 0 || v > 0x7F) {
                    OPENSSL_free(d);
                    return -1;
                }
                c = (char)v;
                i += 4;
            } else if (c == 'n') {
                c = '\n';
            } else if (c == 't') {
                c = '\t';
            } else if (c == 'r') {
                c = '\r';
            } else if (c == 'b') {
                c = '\b';
            } else if (c == 'f') {
                c = '\f';
            } else if (c != '"' && c != '\\' && c != '/') {
                OPENSSL_free(d);
                return -1;
            }
        }
        d[k++] = c;
    }
    d[k] = '\0';
    *out = d;
    *out_len = k;
    return 0;
}

/* Skip any JSON value (nested at most JWK_DEPTH deep). */
static int jwk_skip(jwk_in *j, int depth)
{
    jwk_ws(j);
    if (j->p >= j->end || depth > JWK_DEPTH)
        return -1;
    char c = *j->p;
    if (c == '"')
        return jwk_string(j, NULL, NULL);
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->p++;
        jwk_ws(j);
        if (j->p < j->end && *j->p == close) {
            j->p++;
            return 0;
        }
        for (;;) {
            if (c == '{') {
                jwk_ws(j);
                if (jwk_string(j, NULL, NULL) != 0)
                    return -1;
                jwk_ws(j);
                if (j->p >= j->end || *j->p++ != ':')
                    return -1;
            }
            if (jwk_skip(j, depth + 1) != 0)
                return -1;
            jwk_ws(j);
            if (j->p >= j->end)
                return -1;
            if (*j->p == close) {
                j->p++;
                return 0;
            }
            if (*j->p++ != ',')
                return -1;
        }
    }
    /* a number, true, false or null */
    const char *s = j->p;
    while (j->p < j->end && strchr("+-.0123456789eEtruefalsn", *j->p))
        j->p++;
    return j->p > s ? 0 : -1;
}

static int jwk_object(jwk_in *j)
{
    jwk_ws(j);
    if (j->p >= j->end || *j->p++ != '{')
        return -1;
    jwk_ws(j);
    if (j->p < j->end && *j->p == '}') {
        j->p++;
        return 0;
    }
    for (;;) {
        char *name = NULL;
        size_t nl = 0;
        int field = -1;
        jwk_ws(j);
        if (jwk_string(j, &name, &nl) != 0)
            return -1;
        for (int f = 0; f < JWK_FIELDS; f++)
            if (strlen(jwk_names[f]) == nl && !memcmp(name, jwk_names[f], nl))
                field = f;
        OPENSSL_free(name);
        jwk_ws(j);
        if (j->p >= j->end || *j->p++ != ':')
            return -1;
        jwk_ws(j);
        if (field >= 0) {
            if (j->v[field]) /* a member given twice */
                return -1;
            if (j->p < j->end && *j->p == '"') {
                if (jwk_string(j, &j->v[field], &j->len[field]) != 0)
                    return -1;
            } else if (jwk_skip(j, 1) != 0) {
                return -1;
            } else if (field == 6) {
                j->v[6] = OPENSSL_zalloc(1); /* "d" of any type is private */
                if (!j->v[6])
                    return -1;
            }
        } else if (jwk_skip(j, 1) != 0) {
            return -1;
        }
        jwk_ws(j);
        if (j->p >= j->end)
            return -1;
        if (*j->p == '}') {
            j->p++;
            return 0;
        }
        if (*j->p++ != ',')
            return -1;
    }
}

/* base64url (RFC 4648 section 5), padding optional: 0 and *n, or -1. */
static int b64url_decode(uint8_t *out, size_t cap, size_t *n, const char *in, size_t len)
{
    uint32_t acc = 0;
    int bits = 0;
    *n = 0;
    while (len && in[len - 1] == '=')
        len--;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        int v = c >= 'A' && c <= 'Z'   ? c - 'A'
                : c >= 'a' && c <= 'z' ? c - 'a' + 26
                : c >= '0' && c <= '9' ? c - '0' + 52
                : c == '-'             ? 62
                : c == '_'             ? 63
                                       : -1;
        if (v < 0)
            return -1;
        acc = (acc << 6 | (uint32_t)v) & 0xFFFFFF;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (*n >= cap)
                return -1;
            out[(*n)++] = (uint8_t)(acc >> bits);
        }
    }
    /* leftover bits must be zero padding: a length of 4k+1 is no encoding */
    return bits >= 6 || (acc & ((1u << bits) - 1)) ? -1 : 0;
}

static void jwk_free(jwk_in *j)
{
    for (int f = 0; f < JWK_FIELDS; f++)
        OPENSSL_free(j->v[f]);
}

static int jwk_is(const jwk_in *j, int f, const char *want)
{
    return j->v[f] && j->len[f] == strlen(want) && !memcmp(j->v[f], want, j->len[f]);
}

int scx_jwk_to_spki(softcxi_buf *out, const uint8_t *json, size_t len, softcxi_error *err)
{
    jwk_in j;
    uint8_t pub[1100], a[520], b[520];
    size_t al = 0, bl = 0;
    softcxi_key_info info;
    int rc = 0;

    memset(&j, 0, sizeof j);
    memset(&info, 0, sizeof info);
    out->data = NULL, out->len = 0, out->secret = 0;
    j.p = (const char *)json;
    j.end = j.p + len;
    if (jwk_object(&j) != 0 || (jwk_ws(&j), j.p != j.end)) {
        rc = scx_fail(err, SOFTCXI_EINVAL, "key_import: not a JWK (a JSON object) at byte %zu",
                      (size_t)(j.p - (const char *)json));
        goto done;
    }
    if (j.v[6]) {
        rc = scx_fail(err, SOFTCXI_EINVAL,
                      "key_import: a private JWK (it has \"d\") is not taken: import private "
                      "keys as PKCS#8");
        goto done;
    }
    if (jwk_is(&j, 0, "EC")) {
        const scx_curve_def *c = NULL;
        for (int k = SOFTCXI_CURVE_P256; k <= SOFTCXI_CURVE_SECP256K1; k++)
            if (jwk_is(&j, 1, scx_curve(k)->jwk_crv))
                c = scx_curve(k), info.curve = k;
        if (!c) {
            rc = scx_fail(err, SOFTCXI_EINVAL,
                          "key_import: JWK crv '%.32s' is not P-256, P-384, P-521 or secp256k1",
                          j.v[1] ? j.v[1] : "(none)");
            goto done;
        }
        if (!j.v[2] || !j.v[3] || b64url_decode(a, sizeof a, &al, j.v[2], j.len[2]) != 0 ||
            b64url_decode(b, sizeof b, &bl, j.v[3], j.len[3]) != 0 || al != c->flen ||
            bl != c->flen) {
            rc = scx_fail(err, SOFTCXI_EINVAL,
                          "key_import: JWK x and y must be %zu-byte base64url numbers for %s",
                          c->flen, c->jwk_crv);
            goto done;
        }
        info.algo = SOFTCXI_ALGO_EC;
        pub[0] = 4;
        memcpy(pub + 1, a, al);
        memcpy(pub + 1 + al, b, bl);
        info.pub_len = 1 + al + bl;
    } else if (jwk_is(&j, 0, "OKP")) {
        if (jwk_is(&j, 1, "Ed25519"))
            info.algo = SOFTCXI_ALGO_ED25519;
        else if (jwk_is(&j, 1, "X25519"))
            info.algo = SOFTCXI_ALGO_X25519;
        if (!info.algo || !j.v[2] || b64url_decode(pub, 32, &al, j.v[2], j.len[2]) != 0 ||
            al != 32) {
            rc = scx_fail(err, SOFTCXI_EINVAL,
                          "key_import: an OKP JWK needs crv Ed25519 or X25519 and a 32-byte x");
            goto done;
        }
        info.pub_len = 32;
    } else if (jwk_is(&j, 0, "RSA")) {
        if (!j.v[4] || !j.v[5] || b64url_decode(a, sizeof a, &al, j.v[4], j.len[4]) != 0 ||
            b64url_decode(b, 8, &bl, j.v[5], j.len[5]) != 0 || al == 0 || bl == 0 ||
            !(info.pub_len = scx_der_rsa_pub(pub, sizeof pub, a, al, b, bl))) {
            rc = scx_fail(err, SOFTCXI_EINVAL,
                          "key_import: an RSA JWK needs base64url n (up to 4096 bits) and e");
            goto done;
        }
        info.algo = SOFTCXI_ALGO_RSA;
    } else {
        rc = scx_fail(err, SOFTCXI_EINVAL, "key_import: JWK kty '%.16s' is not EC, OKP or RSA",
                      j.v[0] ? j.v[0] : "(none)");
        goto done;
    }
    info.pub = pub;
    rc = scx_pub_encode(out, &info, SOFTCXI_PUB_DER, err);
done:
    jwk_free(&j);
    return rc;
}
