/*
 * ops.c - what a key blob is used for: sign / verify / bulk_sign, MAC,
 * encrypt / decrypt, secret agreement, random bytes and hashing.
 *
 * Every keyed operation opens the blob (through the cache), then checks the
 * key's usage set and expiry before it touches the key.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/kdf.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

enum { FAM_NONE, FAM_ECDSA, FAM_PKCS1, FAM_PSS, FAM_ED25519, FAM_HMAC, FAM_GCM, FAM_OAEP,
       FAM_ECDH, FAM_X25519, FAM_HASH };

typedef struct mech_info {
    int family;
    int md; /* SCX_MD_* or -1 */
} mech_info;

static mech_info mech(int m)
{
    mech_info r = {FAM_NONE, -1};
    switch (m) {
    case SOFTCXI_MECH_ECDSA_SHA256: r.family = FAM_ECDSA, r.md = SCX_MD_SHA256; break;
    case SOFTCXI_MECH_ECDSA_SHA384: r.family = FAM_ECDSA, r.md = SCX_MD_SHA384; break;
    case SOFTCXI_MECH_ECDSA_SHA512: r.family = FAM_ECDSA, r.md = SCX_MD_SHA512; break;
    case SOFTCXI_MECH_RSA_PKCS1_SHA256: r.family = FAM_PKCS1, r.md = SCX_MD_SHA256; break;
    case SOFTCXI_MECH_RSA_PKCS1_SHA384: r.family = FAM_PKCS1, r.md = SCX_MD_SHA384; break;
    case SOFTCXI_MECH_RSA_PKCS1_SHA512: r.family = FAM_PKCS1, r.md = SCX_MD_SHA512; break;
    case SOFTCXI_MECH_RSA_PSS_SHA256: r.family = FAM_PSS, r.md = SCX_MD_SHA256; break;
    case SOFTCXI_MECH_RSA_PSS_SHA384: r.family = FAM_PSS, r.md = SCX_MD_SHA384; break;
    case SOFTCXI_MECH_RSA_PSS_SHA512: r.family = FAM_PSS, r.md = SCX_MD_SHA512; break;
    case SOFTCXI_MECH_ED25519: r.family = FAM_ED25519; break;
    case SOFTCXI_MECH_HMAC_SHA256: r.family = FAM_HMAC, r.md = SCX_MD_SHA256; break;
    case SOFTCXI_MECH_HMAC_SHA384: r.family = FAM_HMAC, r.md = SCX_MD_SHA384; break;
    case SOFTCXI_MECH_HMAC_SHA512: r.family = FAM_HMAC, r.md = SCX_MD_SHA512; break;
    case SOFTCXI_MECH_AES_GCM: r.family = FAM_GCM; break;
    case SOFTCXI_MECH_RSA_OAEP_SHA1: r.family = FAM_OAEP, r.md = SCX_MD_SHA1; break;
    case SOFTCXI_MECH_RSA_OAEP_SHA256: r.family = FAM_OAEP, r.md = SCX_MD_SHA256; break;
    case SOFTCXI_MECH_RSA_OAEP_SHA384: r.family = FAM_OAEP, r.md = SCX_MD_SHA384; break;
    case SOFTCXI_MECH_RSA_OAEP_SHA512: r.family = FAM_OAEP, r.md = SCX_MD_SHA512; break;
    case SOFTCXI_MECH_ECDH: r.family = FAM_ECDH; break;
    case SOFTCXI_MECH_X25519: r.family = FAM_X25519; break;
    case SOFTCXI_MECH_SHA1: r.family = FAM_HASH, r.md = SCX_MD_SHA1; break;
    case SOFTCXI_MECH_SHA224: r.family = FAM_HASH, r.md = SCX_MD_SHA224; break;
    case SOFTCXI_MECH_SHA256: r.family = FAM_HASH, r.md = SCX_MD_SHA256; break;
    case SOFTCXI_MECH_SHA384: r.family = FAM_HASH, r.md = SCX_MD_SHA384; break;
    case SOFTCXI_MECH_SHA512: r.family = FAM_HASH, r.md = SCX_MD_SHA512; break;
    case SOFTCXI_MECH_SHA3_256: r.family = FAM_HASH, r.md = SCX_MD_SHA3_256; break;
    case SOFTCXI_MECH_SHA3_384: r.family = FAM_HASH, r.md = SCX_MD_SHA3_384; break;
    case SOFTCXI_MECH_SHA3_512: r.family = FAM_HASH, r.md = SCX_MD_SHA3_512; break;
    default: break;
    }
    return r;
}

/* Does the mechanism family fit the key's algorithm? */
static int fits(int family, int algo, int m)
{
    switch (family) {
    case FAM_ECDSA:
    case FAM_ECDH:
        return algo == SOFTCXI_ALGO_EC;
    case FAM_PKCS1:
    case FAM_PSS:
    case FAM_OAEP:
        return algo == SOFTCXI_ALGO_RSA;
    case FAM_ED25519:
        return algo == SOFTCXI_ALGO_ED25519;
    case FAM_X25519:
        return algo == SOFTCXI_ALGO_X25519;
    case FAM_GCM:
        return algo == SOFTCXI_ALGO_AES;
    case FAM_HMAC:
        return (m == SOFTCXI_MECH_HMAC_SHA256 && algo == SOFTCXI_ALGO_HMAC_SHA256) ||
               (m == SOFTCXI_MECH_HMAC_SHA384 && algo == SOFTCXI_ALGO_HMAC_SHA384) ||
               (m == SOFTCXI_MECH_HMAC_SHA512 && algo == SOFTCXI_ALGO_HMAC_SHA512);
    default:
        return 0;
    }
}

/* Open the blob and check mechanism, usage and expiry.  On success the
 * caller owns *out until scx_key_release. */
static int use_key(softcxi_session *s, scx_key **out, const uint8_t *blob, size_t len, int m,
                   unsigned usage, const char *op, mech_info *mi)
{
    *mi = mech(m);
    if (!softcxi_mech_name(m))
        return scx_fail(&s->err, SOFTCXI_EINVAL, "%s: unknown mechanism %d", op, m);
    int rc = scx_key_get(s, out, blob, len);
    if (rc)
        return rc;
    scx_key *k = *out;
    rc = scx_access_key(s, k->info.group, k->info.group_len, op);
    if (rc)
        goto refused;
    if (!fits(mi->family, k->info.algo, m))
        rc = scx_fail(&s->err, SOFTCXI_EINVAL, "%s: mechanism '%s' does not fit key %s (%s%s%s)",
                      op, softcxi_mech_name(m), REF(&k->info), softcxi_algo_name(k->info.algo),
                      k->info.curve ? " " : "",
                      k->info.curve ? softcxi_curve_name(k->info.curve) : "");
    else if (!(k->info.usage & usage))
        rc = scx_fail(&s->err, SOFTCXI_EPOLICY, "%s: key %s may not be used to %s", op, REF(&k->info),
                      softcxi_usage_name(usage));
    else if (k->info.expiry && (int64_t)time(NULL) >= k->info.expiry) {
        char when[32];
        struct tm tm;
        time_t t = (time_t)k->info.expiry;
        gmtime_r(&t, &tm);
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
        rc = scx_fail(&s->err, SOFTCXI_EPOLICY, "%s: key %s expired at %s", op, REF(&k->info), when);
    }
refused:
    if (rc) {
        scx_key_release(s, k);
        *out = NULL;
    }
    return rc;
}

/* ---- signatures -------------------------------------------------------- */

static int sign_init(softcxi_session *s, EVP_MD_CTX **mctx, scx_key *k, const mech_info *mi,
                     int verify)
{
    EVP_PKEY_CTX *pctx = NULL;
    const EVP_MD *md = mi->md >= 0 ? scx_md(s->dev, mi->md) : NULL;
    *mctx = EVP_MD_CTX_new();
    if (!*mctx || (mi->md >= 0 && !md))
        return 0;
    int ok = verify ? EVP_DigestVerifyInit(*mctx, &pctx, md, NULL, k->pkey) == 1
                    : EVP_DigestSignInit(*mctx, &pctx, md, NULL, k->pkey) == 1;
    if (ok && mi->family == FAM_PKCS1)
        ok = EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) == 1;
    if (ok && mi->family == FAM_PSS)
        ok = EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) == 1 &&
             EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) == 1 &&
             EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, md) == 1;
    return ok;
}

/* DER ECDSA-Sig-Value -> r||s, each padded to the field size. */
static int ecdsa_der_to_raw(uint8_t *raw, size_t flen, const uint8_t *der, size_t der_len)
{
    const unsigned char *p = der;
    ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long)der_len);
    int ok = sig && p == der + der_len &&
             BN_bn2binpad(ECDSA_SIG_get0_r(sig), raw, (int)flen) == (int)flen &&
             BN_bn2binpad(ECDSA_SIG_get0_s(sig), raw + flen, (int)flen) == (int)flen;
    ECDSA_SIG_free(sig);
    return ok;
}

/* r||s -> DER; returns the DER length or 0. */
static size_t ecdsa_raw_to_der(uint8_t *der, size_t cap, const uint8_t *raw, size_t len)
{
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, (int)(len / 2), NULL), *sv = BN_bin2bn(raw + len / 2, (int)(len / 2), NULL);
    size_t n = 0;
    if (sig && r && sv && ECDSA_SIG_set0(sig, r, sv) == 1) {
        r = sv = NULL;
        int need = i2d_ECDSA_SIG(sig, NULL);
        unsigned char *p = der;
        if (need > 0 && (size_t)need <= cap && i2d_ECDSA_SIG(sig, &p) == need)
            n = (size_t)need;
    }
    BN_free(r);
    BN_free(sv);
    ECDSA_SIG_free(sig);
    return n;
}

static int sign_one(softcxi_session *s, softcxi_buf *out, scx_key *k, const mech_info *mi,
                    unsigned flags, const uint8_t *msg, size_t msg_len)
{
    EVP_MD_CTX *mctx = NULL;
    size_t cap = (size_t)EVP_PKEY_get_size(k->pkey), len = cap;
    uint8_t *sig = OPENSSL_malloc(cap ? cap : 1);
    int ok;
    if (mi->family == FAM_ECDSA) {
        /* ECDSA signs the digest: hash with the device's pre-fetched EVP_MD
         * and sign that.  EVP_DigestSignInit would, on every call, fetch the
         * digest again by name inside the provider and DER-encode the
         * AlgorithmIdentifier -- a fifth of a P-256 sign (docs/performance.md). */
        uint8_t dig[EVP_MAX_MD_SIZE];
        unsigned dlen = 0;
        const EVP_MD *md = scx_md(s->dev, mi->md);
        EVP_PKEY_CTX *pc = EVP_PKEY_CTX_new_from_pkey(NULL, k->pkey, NULL);
        ok = sig && md && pc && EVP_Digest(msg, msg_len, dig, &dlen, md, NULL) == 1 &&
             EVP_PKEY_sign_init(pc) == 1 && EVP_PKEY_sign(pc, sig, &len, dig, dlen) == 1;
        EVP_PKEY_CTX_free(pc);
    } else {
        ok = sig && sign_init(s, &mctx, k, mi, 0) &&
             EVP_DigestSign(mctx, sig, &len, msg, msg_len) == 1;
        EVP_MD_CTX_free(mctx);
    }
    if (ok && mi->family == FAM_ECDSA && (flags & SOFTCXI_SIG_RAW)) {
        size_t flen = scx_curve(k->info.curve)->flen;
        uint8_t *raw = OPENSSL_malloc(2 * flen);
        ok = raw && ecdsa_der_to_raw(raw, flen, sig, len);
        OPENSSL_free(sig);
        sig = raw;
        len = 2 * flen;
    }
    if (!ok) {
        OPENSSL_free(sig);
        return scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "sign: signing with key %s failed",
                            REF(&k->info));
    }
    out->data = sig;
    out->len = len;
    out->secret = 0;
    return 0;
}

int softcxi_sign(softcxi_session *s, softcxi_buf *sig, const softcxi_sign_req *req)
{
    scx_key *k;
    mech_info mi;
    sig->data = NULL, sig->len = 0, sig->secret = 0;
    int rc = use_key(s, &k, req->blob, req->blob_len, req->mech, SOFTCXI_USAGE_SIGN, "sign", &mi);
    if (rc)
        return rc;
    if (mi.family == FAM_HMAC)
        rc = scx_fail(&s->err, SOFTCXI_EINVAL, "sign: use mac for HMAC keys");
    else
        rc = sign_one(s, sig, k, &mi, req->flags, req->msg, req->msg_len);
    scx_key_release(s, k);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

int softcxi_bulk_sign(softcxi_session *s, softcxi_buf *sigs, const softcxi_sign_req *req,
                      const uint8_t *const *msgs, const size_t *lens, size_t n)
{
    scx_key *k;
    mech_info mi;
    memset(sigs, 0, n * sizeof *sigs);
    int rc = use_key(s, &k, req->blob, req->blob_len, req->mech, SOFTCXI_USAGE_SIGN,
                     "bulk_sign", &mi);
    if (rc)
        return rc;
    if (mi.family == FAM_HMAC)
        rc = scx_fail(&s->err, SOFTCXI_EINVAL, "bulk_sign: use mac for HMAC keys");
    for (size_t i = 0; rc == 0 && i < n; i++)
        rc = sign_one(s, &sigs[i], k, &mi, req->flags, msgs[i], lens[i]);
    scx_key_release(s, k);
    if (rc) {
        for (size_t i = 0; i < n; i++)
            softcxi_buf_free(&sigs[i]);
        return rc;
    }
    scx_ok(&s->err);
    return 0;
}

int softcxi_verify(softcxi_session *s, const softcxi_sign_req *req, const uint8_t *sig,
                   size_t sig_len)
{
    scx_key *k;
    mech_info mi;
    EVP_MD_CTX *mctx = NULL;
    uint8_t der[160];
    int rc = use_key(s, &k, req->blob, req->blob_len, req->mech, SOFTCXI_USAGE_VERIFY, "verify",
                     &mi);
    if (rc)
        return rc;
    if (mi.family == FAM_HMAC) {
        scx_key_release(s, k);
        return scx_fail(&s->err, SOFTCXI_EINVAL, "verify: use mac_verify for HMAC keys");
    }
    if (mi.family == FAM_ECDSA && (req->flags & SOFTCXI_SIG_RAW)) {
        size_t flen = scx_curve(k->info.curve)->flen;
        size_t n = sig_len == 2 * flen ? ecdsa_raw_to_der(der, sizeof der, sig, sig_len) : 0;
        if (!n) {
            scx_key_release(s, k);
            ERR_clear_error();
            scx_ok(&s->err);
            return 0; /* not an r||s of this curve: simply not a valid signature */
        }
        sig = der;
        sig_len = n;
    }
    if (!sign_init(s, &mctx, k, &mi, 1)) {
        EVP_MD_CTX_free(mctx);
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "verify: setting up key %s failed",
                          REF(&k->info));
        scx_key_release(s, k);
        return rc;
    }
    rc = EVP_DigestVerify(mctx, sig, sig_len, req->msg, req->msg_len) == 1 ? 1 : 0;
    EVP_MD_CTX_free(mctx);
    scx_key_release(s, k);
    ERR_clear_error(); /* a bad signature leaves decoding errors behind */
    scx_ok(&s->err);
    return rc;
}

/* ---- MAC --------------------------------------------------------------- */

static int hmac_compute(softcxi_session *s, uint8_t *out, size_t *out_len, scx_key *k,
                        const mech_info *mi, const uint8_t *msg, size_t msg_len)
{
    static const char *const mdn[] = {"SHA1", "SHA224", "SHA256", "SHA384", "SHA512"};
    if (!s->dev->hmac && !(s->dev->hmac = EVP_MAC_fetch(NULL, "HMAC", NULL)))
        return 0;
    EVP_MAC_CTX *c = EVP_MAC_CTX_new(s->dev->hmac);
    OSSL_PARAM p[2];
    p[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)(uintptr_t)mdn[mi->md],
                                            0);
    p[1] = OSSL_PARAM_construct_end();
    int ok = c && EVP_MAC_init(c, k->sym, k->sym_len, p) == 1 &&
             EVP_MAC_update(c, msg, msg_len) == 1 && EVP_MAC_final(c, out, out_len, 64) == 1;
    EVP_MAC_CTX_free(c);
    return ok;
}

int softcxi_mac(softcxi_session *s, softcxi_buf *out, const softcxi_sign_req *req)
{
    scx_key *k;
    mech_info mi;
    uint8_t mac[64];
    size_t len = 0;
    out->data = NULL, out->len = 0, out->secret = 0;
    int rc = use_key(s, &k, req->blob, req->blob_len, req->mech, SOFTCXI_USAGE_SIGN, "mac", &mi);
    if (rc)
        return rc;
    if (mi.family != FAM_HMAC)
        rc = scx_fail(&s->err, SOFTCXI_EINVAL, "mac: '%s' is not a MAC mechanism",
                      softcxi_mech_name(req->mech));
    else if (!hmac_compute(s, mac, &len, k, &mi, req->msg, req->msg_len))
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "mac: HMAC with key %s failed",
                          REF(&k->info));
    else if (!(out->data = OPENSSL_malloc(len)))
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "mac: out of memory");
    else {
        memcpy(out->data, mac, len);
        out->len = len;
        scx_ok(&s->err);
    }
    scx_key_release(s, k);
    return rc;
}

int softcxi_mac_verify(softcxi_session *s, const softcxi_sign_req *req, const uint8_t *tag,
                       size_t tag_len)
{
    scx_key *k;
    mech_info mi;
    uint8_t mac[64];
    size_t len = 0;
    int rc = use_key(s, &k, req->blob, req->blob_len, req->mech, SOFTCXI_USAGE_VERIFY,
                     "mac_verify", &mi);
    if (rc)
        return rc;
    if (mi.family != FAM_HMAC)
        rc = scx_fail(&s->err, SOFTCXI_EINVAL, "mac_verify: '%s' is not a MAC mechanism",
                      softcxi_mech_name(req->mech));
    else if (!hmac_compute(s, mac, &len, k, &mi, req->msg, req->msg_len))
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "mac_verify: HMAC with key %s failed",
                          REF(&k->info));
    else {
        rc = tag_len == len && CRYPTO_memcmp(mac, tag, len) == 0;
        scx_ok(&s->err);
    }
    scx_key_release(s, k);
    return rc;
}

/* ---- encryption -------------------------------------------------------- */

static EVP_CIPHER *gcm_cipher(softcxi_device *dev, size_t key_len)
{
    static const char *const names[3] = {"AES-128-GCM", "AES-192-GCM", "AES-256-GCM"};
    size_t i = key_len == 16 ? 0 : key_len == 24 ? 1 : 2;
    if (!dev->aes_gcm[i])
        dev->aes_gcm[i] = EVP_CIPHER_fetch(NULL, names[i], NULL);
    return dev->aes_gcm[i];
}

/* An RSA-OAEP context; the request's AAD, if any, is the OAEP label. */
static EVP_PKEY_CTX *oaep_ctx(softcxi_session *s, scx_key *k, const mech_info *mi, int enc,
                              const softcxi_crypt_req *req)
{
    const EVP_MD *md = scx_md(s->dev, mi->md);
    if (req->aad_len > INT32_MAX)
        return NULL;
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, k->pkey, NULL);
    if (!c || !md || (enc ? EVP_PKEY_encrypt_init(c) : EVP_PKEY_decrypt_init(c)) != 1 ||
        EVP_PKEY_CTX_set_rsa_padding(c, RSA_PKCS1_OAEP_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_oaep_md(c, md) != 1 || EVP_PKEY_CTX_set_rsa_mgf1_md(c, md) != 1) {
        EVP_PKEY_CTX_free(c);
        return NULL;
    }
    if (req->aad_len) {
        /* OpenSSL takes ownership of the label buffer. */
        void *label = OPENSSL_memdup(req->aad, req->aad_len);
        if (!label || EVP_PKEY_CTX_set0_rsa_oaep_label(c, label, (int)req->aad_len) != 1) {
            OPENSSL_free(label);
            EVP_PKEY_CTX_free(c);
            return NULL;
        }
    }
    return c;
}

int softcxi_encrypt(softcxi_session *s, softcxi_buf *out, uint8_t iv[SOFTCXI_GCM_IV_LEN],
                    uint8_t tag[SOFTCXI_GCM_TAG_LEN], const softcxi_crypt_req *req)
{
    scx_key *k;
    mech_info mi;
    out->data = NULL, out->len = 0, out->secret = 0;
    int rc = use_key(s, &k, req->blob, req->blob_len, req->mech, SOFTCXI_USAGE_ENCRYPT,
                     "encrypt", &mi);
    if (rc)
        return rc;
    if (mi.family == FAM_GCM) {
        int n = 0;
        EVP_CIPHER_CTX *c = s->dev->data_gcm;
        EVP_CIPHER *ciph = gcm_cipher(s->dev, k->sym_len);
        if (req->iv && req->iv_len != SOFTCXI_GCM_IV_LEN) {
            rc = scx_fail(&s->err, SOFTCXI_EINVAL, "encrypt: aes-gcm IV must be %d bytes, not %zu",
                          SOFTCXI_GCM_IV_LEN, req->iv_len);
        } else if (req->in_len > INT32_MAX || req->aad_len > INT32_MAX) {
            rc = scx_fail(&s->err, SOFTCXI_EINVAL, "encrypt: input too large");
        } else if (req->iv) {
            memcpy(iv, req->iv, SOFTCXI_GCM_IV_LEN);
        } else if (scx_rnd_public(&s->dev->pool, iv, SOFTCXI_GCM_IV_LEN) != 0) {
            rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "encrypt: random generator failed");
        }
        if (rc == 0) {
            out->data = OPENSSL_malloc(req->in_len ? req->in_len : 1);
            int ok = out->data && ciph && EVP_EncryptInit_ex2(c, scx_cipher_once(c, ciph), k->sym, iv, NULL) == 1 &&
                     (!req->aad_len ||
                      EVP_EncryptUpdate(c, NULL, &n, req->aad, (int)req->aad_len) == 1) &&
                     (!req->in_len ||
                      EVP_EncryptUpdate(c, out->data, &n, req->in, (int)req->in_len) == 1) &&
                     EVP_EncryptFinal_ex(c, out->data + req->in_len, &n) == 1 &&
                     EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, SOFTCXI_GCM_TAG_LEN, tag) == 1;
            if (ok)
                out->len = req->in_len;
            else
                rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "encrypt: aes-gcm with key %s failed",
                                  REF(&k->info));
        }
    } else if (mi.family == FAM_OAEP) {
        EVP_PKEY_CTX *c = oaep_ctx(s, k, &mi, 1, req);
        size_t len = 0;
        if (!c || EVP_PKEY_encrypt(c, NULL, &len, req->in, req->in_len) != 1 ||
            !(out->data = OPENSSL_malloc(len)) ||
            EVP_PKEY_encrypt(c, out->data, &len, req->in, req->in_len) != 1)
            rc = scx_fail_ssl(&s->err, SOFTCXI_EINVAL,
                              "encrypt: rsa-oaep with key %s failed (message too long?)", REF(&k->info));
        else
            out->len = len;
        EVP_PKEY_CTX_free(c);
    } else {
        rc = scx_fail(&s->err, SOFTCXI_EINVAL, "encrypt: '%s' is not an encryption mechanism",
                      softcxi_mech_name(req->mech));
    }
    scx_key_release(s, k);
    if (rc)
        softcxi_buf_free(out);
    else
        scx_ok(&s->err);
    return rc;
}

int softcxi_decrypt(softcxi_session *s, softcxi_buf *out, const softcxi_crypt_req *req)
{
    scx_key *k;
    mech_info mi;
    out->data = NULL, out->len = 0, out->secret = 1;
    int rc = use_key(s, &k, req->blob, req->blob_len, req->mech, SOFTCXI_USAGE_DECRYPT,
                     "decrypt", &mi);
    if (rc)
        return rc;
    if (mi.family == FAM_GCM) {
        int n = 0;
        EVP_CIPHER_CTX *c = s->dev->data_gcm;
        EVP_CIPHER *ciph = gcm_cipher(s->dev, k->sym_len);
        if (!req->iv || req->iv_len != SOFTCXI_GCM_IV_LEN || !req->tag ||
            req->tag_len != SOFTCXI_GCM_TAG_LEN) {
            rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                          "decrypt: aes-gcm needs a %d-byte IV and a %d-byte tag",
                          SOFTCXI_GCM_IV_LEN, SOFTCXI_GCM_TAG_LEN);
        } else if (req->in_len > INT32_MAX || req->aad_len > INT32_MAX) {
            rc = scx_fail(&s->err, SOFTCXI_EINVAL, "decrypt: input too large");
        } else {
            out->data = OPENSSL_malloc(req->in_len ? req->in_len : 1);
            int ok = out->data && ciph && EVP_DecryptInit_ex2(c, scx_cipher_once(c, ciph), k->sym, req->iv, NULL) == 1 &&
                     (!req->aad_len ||
                      EVP_DecryptUpdate(c, NULL, &n, req->aad, (int)req->aad_len) == 1) &&
                     (!req->in_len ||
                      EVP_DecryptUpdate(c, out->data, &n, req->in, (int)req->in_len) == 1) &&
                     EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, SOFTCXI_GCM_TAG_LEN,
                                         (void *)(uintptr_t)req->tag) == 1;
            out->len = req->in_len;
            if (!ok)
                rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "decrypt: aes-gcm with key %s failed",
                                  REF(&k->info));
            else if (EVP_DecryptFinal_ex(c, out->data + req->in_len, &n) != 1)
                rc = scx_fail(&s->err, SOFTCXI_ETAMPER,
                              "decrypt: aes-gcm authentication failed with key %s (wrong key, "
                              "IV, AAD or tag, or tampered data)",
                              REF(&k->info));
        }
    } else if (mi.family == FAM_OAEP) {
        EVP_PKEY_CTX *c = oaep_ctx(s, k, &mi, 0, req);
        size_t len = 0;
        if (!c || EVP_PKEY_decrypt(c, NULL, &len, req->in, req->in_len) != 1 ||
            !(out->data = OPENSSL_malloc(len ? len : 1))) {
            rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "decrypt: rsa-oaep setup with key %s failed",
                              REF(&k->info));
        } else {
            out->len = len;
            if (EVP_PKEY_decrypt(c, out->data, &len, req->in, req->in_len) != 1)
                rc = scx_fail(&s->err, SOFTCXI_ETAMPER,
                              "decrypt: rsa-oaep decryption with key %s failed (not a "
                              "ciphertext for this key and mechanism)",
                              REF(&k->info));
            else
                out->len = len;
        }
        EVP_PKEY_CTX_free(c);
    } else {
        rc = scx_fail(&s->err, SOFTCXI_EINVAL, "decrypt: '%s' is not an encryption mechanism",
                      softcxi_mech_name(req->mech));
    }
    scx_key_release(s, k);
    if (rc)
        softcxi_buf_free(out); /* wipes: secret = 1 */
    else
        scx_ok(&s->err);
    return rc;
}

/* ---- secret agreement -------------------------------------------------- */

static int peer_key(softcxi_session *s, EVP_PKEY **out, scx_key *k, const uint8_t *peer,
                    size_t len)
{
    *out = NULL;
    if (len > 11 && memcmp(peer, "-----BEGIN", 10) == 0) {
        BIO *b = BIO_new_mem_buf(peer, (int)len);
        *out = b ? PEM_read_bio_PUBKEY(b, NULL, NULL, NULL) : NULL;
        BIO_free(b);
    } else if (len > 0 && peer[0] == 0x30 &&
               !(k->info.algo == SOFTCXI_ALGO_X25519 && len == 32)) {
        const unsigned char *p = peer;
        *out = d2i_PUBKEY(NULL, &p, (long)len);
        if (*out && p != peer + len) {
            EVP_PKEY_free(*out);
            *out = NULL;
        }
    } else {
        (void)scx_pkey_public(s->dev, out, k->info.algo, k->info.curve, peer, len);
    }
    if (!*out)
        return 0;
    /* The peer must be on our curve / of our type. */
    if (k->info.algo == SOFTCXI_ALGO_X25519)
        return EVP_PKEY_is_a(*out, "X25519");
    char group[64];
    size_t gl = 0;
    return EVP_PKEY_is_a(*out, "EC") && scx_ec_named(*out) &&
           EVP_PKEY_get_utf8_string_param(*out, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                          &gl) == 1 &&
           strcmp(group, scx_curve(k->info.curve)->ossl_name) == 0;
}

static int hkdf(uint8_t *out, size_t out_len, const uint8_t *z, size_t z_len,
                const softcxi_agree_req *req)
{
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    EVP_KDF_CTX *c = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
    OSSL_PARAM p[5];
    size_t k = 0;
    p[k++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)(uintptr_t) "SHA256", 0);
    p[k++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)(uintptr_t)z, z_len);
    if (req->salt_len)
        p[k++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT,
                                                   (void *)(uintptr_t)req->salt, req->salt_len);
    if (req->info_len)
        p[k++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO,
                                                   (void *)(uintptr_t)req->info, req->info_len);
    p[k] = OSSL_PARAM_construct_end();
    int ok = c && EVP_KDF_derive(c, out, out_len, p) == 1;
    EVP_KDF_CTX_free(c);
    EVP_KDF_free(kdf);
    return ok;
}

int softcxi_secret_agree(softcxi_session *s, softcxi_buf *out, const softcxi_agree_req *req)
{
    scx_key *k;
    mech_info mi;
    char group[SOFTCXI_NAME_MAX + 1];
    EVP_PKEY *peer = NULL;
    EVP_PKEY_CTX *c = NULL;
    uint8_t *z = NULL, *dk = NULL;
    size_t z_len = 0, dk_len = 0;
    out->data = NULL, out->len = 0, out->secret = 0;

    int rc = use_key(s, &k, req->blob, req->blob_len, req->mech, SOFTCXI_USAGE_DERIVE,
                     "secret_agree", &mi);
    if (rc)
        return rc;
    if (mi.family != FAM_ECDH && mi.family != FAM_X25519) {
        rc = scx_fail(&s->err, SOFTCXI_EINVAL, "secret_agree: '%s' is not an agreement mechanism",
                      softcxi_mech_name(req->mech));
        goto done;
    }
    if (!peer_key(s, &peer, k, req->peer, req->peer_len)) {
        rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                      "secret_agree: the peer key is not a %s public key (raw, SPKI DER or PEM)",
                      k->info.algo == SOFTCXI_ALGO_EC ? softcxi_curve_name(k->info.curve)
                                                      : "X25519");
        goto done;
    }
    c = EVP_PKEY_CTX_new_from_pkey(NULL, k->pkey, NULL);
    if (!c || EVP_PKEY_derive_init(c) != 1) {
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "secret_agree: agreement with key %s failed",
                          REF(&k->info));
        goto done;
    }
    /* A peer that parses but yields no secret (a small-order X25519 point,
     * say) is the caller's bad input, not a device failure. */
    if (EVP_PKEY_derive_set_peer(c, peer) != 1 || EVP_PKEY_derive(c, NULL, &z_len) != 1 ||
        !(z = OPENSSL_secure_malloc(z_len)) || EVP_PKEY_derive(c, z, &z_len) != 1) {
        rc = scx_fail_ssl(&s->err, z_len && !z ? SOFTCXI_ENOMEM : SOFTCXI_EINVAL,
                          "secret_agree: the peer key gives no valid shared secret with key %s",
                          REF(&k->info));
        goto done;
    }
    if (req->flags & SOFTCXI_AGREE_RAW) {
        /* The caller asked for the raw secret explicitly. */
        out->data = OPENSSL_malloc(z_len);
        if (!out->data) {
            rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "secret_agree: out of memory");
            goto done;
        }
        memcpy(out->data, z, z_len);
        out->len = z_len;
        out->secret = 1;
        goto done;
    }
    softcxi_template t = {0};
    if (req->derived)
        t = *req->derived;
    else
        t.algo = SOFTCXI_ALGO_AES, t.size = 256;
    snprintf(group, sizeof group, "%.*s", (int)k->info.group_len,
             k->info.group ? k->info.group : "");
    if (t.group && strcmp(t.group, group) != 0) {
        rc = scx_fail(&s->err, SOFTCXI_EPOLICY,
                      "secret_agree: a key derived from %s stays in its group '%s'", REF(&k->info), group);
        goto done;
    }
    t.group = group;
    if (t.algo == SOFTCXI_ALGO_NONE)
        t.algo = SOFTCXI_ALGO_AES;
    if (t.algo != SOFTCXI_ALGO_AES && !scx_hmac_digest(t.algo)) {
        rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                      "secret_agree: template.algo: a derived key is aes or hmac, not %s",
                      softcxi_algo_name(t.algo) ? softcxi_algo_name(t.algo) : "unknown");
        goto done;
    }
    if ((rc = scx_template_check(&t, &s->err)) != 0)
        goto done;
    dk_len = t.size / 8;
    if (!(dk = OPENSSL_secure_malloc(dk_len)) || !hkdf(dk, dk_len, z, z_len, req)) {
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "secret_agree: HKDF failed");
        goto done;
    }
    rc = scx_seal_key(s, out, &t, NULL, 0, dk, dk_len);
done:
    OPENSSL_secure_clear_free(z, z_len);
    OPENSSL_secure_clear_free(dk, dk_len);
    EVP_PKEY_CTX_free(c);
    EVP_PKEY_free(peer);
    scx_key_release(s, k);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

/* ---- random and hashing ------------------------------------------------ */

int softcxi_rnd_gen(softcxi_session *s, uint8_t *out, size_t len)
{
    if (len > INT32_MAX)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "rnd_gen: %zu bytes is too many at once", len);
    if (len && RAND_bytes(out, (int)len) != 1)
        return scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "rnd_gen: random generator failed");
    scx_ok(&s->err);
    return 0;
}

int softcxi_hash_compute(uint8_t *out, size_t *out_len, int m, const uint8_t *in, size_t in_len,
                         softcxi_error *err)
{
    static const char *const names[SCX_MD_COUNT] = {
        "SHA1", "SHA224", "SHA256", "SHA384", "SHA512", "SHA3-256", "SHA3-384", "SHA3-512"};
    mech_info mi = mech(m);
    if (mi.family != FAM_HASH)
        return scx_fail(err, SOFTCXI_EINVAL, "hash_compute: '%s' is not a hash",
                        softcxi_mech_name(m) ? softcxi_mech_name(m) : "?");
    EVP_MD *md = EVP_MD_fetch(NULL, names[mi.md], NULL);
    unsigned int n = 0;
    int ok = md && EVP_Digest(in, in_len, out, &n, md, NULL) == 1;
    EVP_MD_free(md);
    if (!ok)
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "hash_compute: %s failed", names[mi.md]);
    *out_len = n;
    scx_ok(err);
    return 0;
}
