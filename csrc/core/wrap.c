/*
 * wrap.c - keys out of the device and back in under a wrapping key:
 * key_export and the wrapped forms of key_import.
 *
 * Two wrappings, both what key management services take for BYOK:
 *
 *   aes-kwp      RFC 5649 AES key wrap with padding (OpenSSL
 *                "AES-<n>-WRAP-PAD") under an AES key blob;
 *   rsa-aes-kwp  RSA-OAEP (SHA-256, MGF1-SHA-256, empty label) of a fresh
 *                AES-256 key, followed by that key's RFC 5649 wrap of the
 *                target: PKCS #11 CKM_RSA_AES_KEY_WRAP, AWS KMS
 *                RSA_AES_KEY_WRAP_SHA_256, Vault's BYOK format.
 *
 * What is wrapped is the key in its usual outside form: PKCS #8 DER
 * (PrivateKeyInfo) for EC, Ed25519, X25519 and RSA keys, the raw key bytes
 * for AES and HMAC keys.  Plain export hands out that same form unwrapped,
 * and only for a key whose export policy is allow-plain; a wrapped export
 * needs allow or allow-plain.  The wrapping key must carry the wrap usage,
 * the unwrapping key unwrap.  Every export is audited before it happens.
 *
 * The key's bytes live in OpenSSL's secure heap and are wiped on every path.
 */
#include "internal.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define EPHEMERAL_LEN 32 /* rsa-aes-kwp: an AES-256 key */

const char *softcxi_wrap_name(int mech)
{
    switch (mech) {
    case SOFTCXI_WRAP_AES_KWP:
        return "aes-kwp";
    case SOFTCXI_WRAP_RSA_AES_KWP:
        return "rsa-aes-kwp";
    default:
        return NULL;
    }
}

int softcxi_wrap_from_name(const char *name)
{
    if (name && !strcmp(name, "aes-kwp"))
        return SOFTCXI_WRAP_AES_KWP;
    if (name && !strcmp(name, "rsa-aes-kwp"))
        return SOFTCXI_WRAP_RSA_AES_KWP;
    return SOFTCXI_EINVAL;
}

/* The group check, a usage bit (0: none needed) and the expiry date of an
 * opened key. */
static int may_use(softcxi_session *s, scx_key *k, unsigned usage, const char *op)
{
    int rc = scx_access_key(s, k->info.group, k->info.group_len, op);
    if (rc)
        return rc;
    if (usage && !(k->info.usage & usage))
        return scx_fail(&s->err, SOFTCXI_EPOLICY, "%s: key %s may not be used to %s", op,
                        REF(&k->info), softcxi_usage_name(usage));
    if (k->info.expiry && (int64_t)time(NULL) >= k->info.expiry)
        return scx_fail(&s->err, SOFTCXI_EPOLICY, "%s: key %s has expired", op, REF(&k->info));
    return 0;
}

/* Which wrapping a key can do: AES -> aes-kwp, RSA -> rsa-aes-kwp. */
static int mech_for(const scx_key *w, int mech, const char *op, softcxi_session *s)
{
    int fits = w->info.algo == SOFTCXI_ALGO_AES   ? SOFTCXI_WRAP_AES_KWP
               : w->info.algo == SOFTCXI_ALGO_RSA ? SOFTCXI_WRAP_RSA_AES_KWP
                                                  : 0;
    if (!fits)
        return scx_fail(&s->err, SOFTCXI_EINVAL,
                        "%s: key %s (%s) cannot wrap: use an AES or RSA key", op, REF(&w->info),
                        softcxi_algo_name(w->info.algo));
    if (mech != SOFTCXI_WRAP_AUTO && mech != fits)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "%s: mechanism '%s' does not fit key %s (%s)",
                        op, softcxi_wrap_name(mech) ? softcxi_wrap_name(mech) : "?",
                        REF(&w->info), softcxi_algo_name(w->info.algo));
    return fits;
}

/* RFC 5649 one way or the other; out holds in_len + 15 bytes.  0 ok, -1
 * on failure (for unwrap: the integrity check failed). */
static int kwp(int enc, const uint8_t *key, size_t key_len, uint8_t *out, size_t *out_len,
               const uint8_t *in, size_t in_len)
{
    const char *name = key_len == 16 ? "AES-128-WRAP-PAD"
                       : key_len == 24 ? "AES-192-WRAP-PAD"
                                       : "AES-256-WRAP-PAD";
    EVP_CIPHER *c = EVP_CIPHER_fetch(NULL, name, NULL);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int n1 = 0, n2 = 0, ok = 0;
    if (c && ctx && in_len < INT32_MAX && (key_len == 16 || key_len == 24 || key_len == 32)) {
        EVP_CIPHER_CTX_set_flags(ctx, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
        ok = EVP_CipherInit_ex2(ctx, c, key, NULL, enc, NULL) == 1 &&
             EVP_CipherUpdate(ctx, out, &n1, in, (int)in_len) == 1 &&
             EVP_CipherFinal_ex(ctx, out + n1, &n2) == 1;
    }
    EVP_CIPHER_CTX_free(ctx); /* clears the key schedule */
    EVP_CIPHER_free(c);
    *out_len = ok ? (size_t)n1 + (size_t)n2 : 0;
    return ok ? 0 : -1;
}

static EVP_PKEY_CTX *oaep_ctx(EVP_PKEY *pk, int enc)
{
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, pk, NULL);
    if (!c || (enc ? EVP_PKEY_encrypt_init(c) : EVP_PKEY_decrypt_init(c)) != 1 ||
        EVP_PKEY_CTX_set_rsa_padding(c, RSA_PKCS1_OAEP_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_oaep_md_name(c, "SHA256", NULL) != 1 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md_name(c, "SHA256", NULL) != 1) {
        EVP_PKEY_CTX_free(c);
        return NULL;
    }
    return c;
}

/* The key's outside form into the secure heap: PKCS #8 DER or raw bytes. */
static int key_bytes(softcxi_session *s, const scx_key *k, uint8_t **out, size_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    if (k->sym) {
        if (!(*out = OPENSSL_secure_malloc(k->sym_len)))
            return scx_fail(&s->err, SOFTCXI_ENOMEM, "key_export: out of secure memory");
        memcpy(*out, k->sym, k->sym_len);
        *out_len = k->sym_len;
        return 0;
    }
    PKCS8_PRIV_KEY_INFO *p8 = EVP_PKEY2PKCS8(k->pkey);
    unsigned char *der = NULL;
    int n = p8 ? i2d_PKCS8_PRIV_KEY_INFO(p8, &der) : -1;
    PKCS8_PRIV_KEY_INFO_free(p8); /* clears the key it held */
    if (n > 0 && (*out = OPENSSL_secure_malloc((size_t)n)) != NULL) {
        memcpy(*out, der, (size_t)n);
        *out_len = (size_t)n;
    }
    if (der)
        OPENSSL_clear_free(der, n > 0 ? (size_t)n : 0);
    if (!*out)
        return scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "key_export: encoding key %s failed",
                            REF(&k->info));
    return 0;
}

int softcxi_key_export(softcxi_session *s, softcxi_buf *out, const uint8_t *blob, size_t len,
                       int mech, const uint8_t *wrap_blob, size_t wrap_len)
{
    scx_key *k = NULL, *w = NULL;
    uint8_t *pt = NULL, *ek = NULL;
    size_t pt_len = 0, n = 0;
    EVP_PKEY_CTX *oc = NULL;
    char subject[SCX_REF_MAX], detail[SCX_REF_MAX + 64];
    int rc;

    out->data = NULL, out->len = 0, out->secret = 0;
    if (mech != SOFTCXI_WRAP_AUTO && !softcxi_wrap_name(mech))
        return scx_fail(&s->err, SOFTCXI_EINVAL, "key_export: unknown wrapping mechanism %d",
                        mech);
    if ((rc = scx_key_get(s, &k, blob, len)) != 0 ||
        (rc = may_use(s, k, 0, "key_export")) != 0)
        goto done;
    if (!k->has_secret) {
        rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                      "key_export: key %s is a public key only: public_key gives it",
                      REF(&k->info));
        goto done;
    }
    int pol = k->info.export_policy;
    if (!wrap_blob && pol != SOFTCXI_EXPORT_ALLOW_PLAIN) {
        rc = scx_fail(&s->err, SOFTCXI_EPOLICY,
                      "key_export: key %s has export policy %s: plain export needs allow-plain",
                      REF(&k->info), softcxi_export_name(pol));
        goto done;
    }
    if (wrap_blob && pol != SOFTCXI_EXPORT_ALLOW && pol != SOFTCXI_EXPORT_ALLOW_PLAIN) {
        rc = scx_fail(&s->err, SOFTCXI_EPOLICY,
                      "key_export: key %s has export policy %s: export needs allow or "
                      "allow-plain",
                      REF(&k->info), softcxi_export_name(pol));
        goto done;
    }
    if ((rc = key_bytes(s, k, &pt, &pt_len)) != 0)
        goto done;
    scx_keyref(subject, sizeof subject, &k->info);
    /* Done with the key before the wrapping key is opened: opening one may
     * evict the other from the cache. */
    scx_key_release(s, k);
    k = NULL;
    if (wrap_blob) {
        if ((rc = scx_key_get(s, &w, wrap_blob, wrap_len)) != 0 ||
            (rc = mech_for(w, mech, "key_export", s)) < 0)
            goto done;
        mech = rc;
        if ((rc = may_use(s, w, SOFTCXI_USAGE_WRAP, "key_export")) != 0)
            goto done;
    }
    /* Recorded before the key leaves; a log that cannot take it stops it. */
    if (w)
        snprintf(detail, sizeof detail, "%s under %s", softcxi_wrap_name(mech), REF(&w->info));
    else
        snprintf(detail, sizeof detail, "plain");
    if ((rc = scx_audit(s, "key_export", subject, detail)) != 0)
        goto done;
    if (!w) { /* out of the secure heap: the caller frees with softcxi_buf_free */
        if (!(out->data = OPENSSL_malloc(pt_len)))
            rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "key_export: out of memory");
        else
            memcpy(out->data, pt, pt_len), out->len = pt_len, out->secret = 1;
        goto done;
    }
    size_t head = 0;
    if (mech == SOFTCXI_WRAP_RSA_AES_KWP) {
        size_t olen = 0;
        head = (size_t)EVP_PKEY_get_size(w->pkey);
        if (!(ek = OPENSSL_secure_malloc(EPHEMERAL_LEN)) ||
            RAND_priv_bytes(ek, EPHEMERAL_LEN) != 1 || !(oc = oaep_ctx(w->pkey, 1)) ||
            !(out->data = OPENSSL_malloc(head + pt_len + 16)) ||
            EVP_PKEY_encrypt(oc, NULL, &olen, ek, EPHEMERAL_LEN) != 1 || olen != head ||
            EVP_PKEY_encrypt(oc, out->data, &olen, ek, EPHEMERAL_LEN) != 1) {
            rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "key_export: RSA-OAEP under %s failed",
                              REF(&w->info));
            goto done;
        }
        head = olen;
    } else if (!(out->data = OPENSSL_malloc(pt_len + 16))) {
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "key_export: out of memory");
        goto done;
    }
    if (kwp(1, ek ? ek : w->sym, ek ? EPHEMERAL_LEN : w->sym_len, out->data + head, &n, pt,
            pt_len) != 0) {
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "key_export: AES key wrap failed");
        goto done;
    }
    out->len = head + n;
done:
    if (rc)
        softcxi_buf_free(out);
    if (pt)
        OPENSSL_secure_clear_free(pt, pt_len);
    if (ek)
        OPENSSL_secure_clear_free(ek, EPHEMERAL_LEN);
    EVP_PKEY_CTX_free(oc);
    scx_key_release(s, k);
    scx_key_release(s, w);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

int softcxi_key_unwrap(softcxi_session *s, softcxi_buf *blob, unsigned flags,
                       const softcxi_template *t, const uint8_t *data, size_t len, int mech,
                       const uint8_t *unwrap_blob, size_t unwrap_len)
{
    scx_key *w = NULL;
    uint8_t *ek = NULL, *pt = NULL;
    size_t ek_len = 0, pt_len = 0, head = 0, cap = 0;
    EVP_PKEY_CTX *oc = NULL;
    int rc;

    blob->data = NULL, blob->len = 0, blob->secret = 0;
    if (!softcxi_wrap_name(mech) && mech != SOFTCXI_WRAP_AUTO)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "key_import: unknown wrapping mechanism %d",
                        mech);
    if ((rc = scx_key_get(s, &w, unwrap_blob, unwrap_len)) != 0 ||
        (rc = mech_for(w, mech, "key_import", s)) < 0)
        goto done;
    mech = rc;
    if ((rc = may_use(s, w, SOFTCXI_USAGE_UNWRAP, "key_import")) != 0)
        goto done;
    if (mech == SOFTCXI_WRAP_RSA_AES_KWP) {
        head = (size_t)EVP_PKEY_get_size(w->pkey);
        if (len < head + 16) {
            rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                          "key_import: %zu bytes are too few for rsa-aes-kwp under %s (the "
                          "RSA-OAEP part alone is %zu)",
                          len, REF(&w->info), head);
            goto done;
        }
        ek_len = head;
        if (!(ek = OPENSSL_secure_malloc(head)) || !(oc = oaep_ctx(w->pkey, 0))) {
            rc = scx_fail_ssl(&s->err, SOFTCXI_ENOMEM, "key_import: out of secure memory");
            goto done;
        }
        if (EVP_PKEY_decrypt(oc, ek, &ek_len, data, head) != 1 || ek_len != EPHEMERAL_LEN) {
            rc = scx_fail(&s->err, SOFTCXI_ETAMPER,
                          "key_import: the wrapped key does not open under %s (another key's, "
                          "or damaged)",
                          REF(&w->info));
            goto done;
        }
    }
    if (len - head < 16 || (len - head) % 8 != 0) {
        rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                      "key_import: %zu bytes are not an AES key wrap (a multiple of 8, at "
                      "least 16)",
                      len - head);
        goto done;
    }
    cap = len - head;
    if (!(pt = OPENSSL_secure_malloc(cap))) {
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "key_import: out of secure memory");
        goto done;
    }
    if (kwp(0, ek ? ek : w->sym, ek ? EPHEMERAL_LEN : w->sym_len, pt, &pt_len, data + head,
            len - head) != 0) {
        rc = scx_fail(&s->err, SOFTCXI_ETAMPER,
                      "key_import: the wrapped key does not unwrap under %s (another key's, or "
                      "damaged)",
                      REF(&w->info));
        goto done;
    }
    ERR_clear_error();
    /* The template says what the bytes are: AES and HMAC keys are raw,
     * every other kind comes as PKCS #8. */
    int raw = t->algo == SOFTCXI_ALGO_AES || scx_hmac_digest(t->algo) != NULL;
    rc = softcxi_key_import(s, blob, flags, t, pt, pt_len,
                            raw ? SOFTCXI_IMPORT_RAW : SOFTCXI_IMPORT_PKCS8);
done:
    ERR_clear_error();
    if (pt)
        OPENSSL_secure_clear_free(pt, cap);
    if (ek)
        OPENSSL_secure_clear_free(ek, head);
    EVP_PKEY_CTX_free(oc);
    scx_key_release(s, w);
    return rc;
}
