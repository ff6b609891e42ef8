/*
 * keys.c - key generation, sealing keys into blobs, opening blobs into
 * usable keys, and the bounded cache of opened keys.
 *
 * Keys are opened from raw parameters on stack-built OSSL_PARAM arrays
 * (EVP_PKEY_fromdata), never through OpenSSL's decoder framework, which
 * costs an order of magnitude more than the signature itself.
 */
#include "internal.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PUB_MAX 1100 /* RSA-4096 RSAPublicKey DER with a large exponent */
#define RSA_PARTS 6  /* d, p, q, dp, dq, qinv */

static const char *const rsa_part_names[RSA_PARTS] = {
    OSSL_PKEY_PARAM_RSA_D,         OSSL_PKEY_PARAM_RSA_FACTOR1,
    OSSL_PKEY_PARAM_RSA_FACTOR2,   OSSL_PKEY_PARAM_RSA_EXPONENT1,
    OSSL_PKEY_PARAM_RSA_EXPONENT2, OSSL_PKEY_PARAM_RSA_COEFFICIENT1,
};

/* Big-endian <-> native (OSSL_PARAM BIGNUMs are native-endian). */
static void to_native(uint8_t *dst, const uint8_t *be, size_t n)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (size_t i = 0; i < n; i++)
        dst[i] = be[n - 1 - i];
#else
    memcpy(dst, be, n);
#endif
}

static const char *keytype(int algo)
{
    switch (algo) {
    case SOFTCXI_ALGO_EC:
        return "EC";
    case SOFTCXI_ALGO_ED25519:
        return "ED25519";
    case SOFTCXI_ALGO_X25519:
        return "X25519";
    case SOFTCXI_ALGO_RSA:
        return "RSA";
    default:
        return NULL;
    }
}

static int from_index(int algo)
{
    return algo == SOFTCXI_ALGO_EC ? 0 : algo == SOFTCXI_ALGO_ED25519 ? 1
                                     : algo == SOFTCXI_ALGO_X25519    ? 2
                                                                      : 3;
}

static EVP_PKEY_CTX *from_ctx(softcxi_device *dev, int algo)
{
    int i = from_index(algo);
    if (!dev->from[i]) {
        EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(NULL, keytype(algo), NULL);
        if (!c || EVP_PKEY_fromdata_init(c) <= 0) {
            EVP_PKEY_CTX_free(c);
            return NULL;
        }
        dev->from[i] = c;
    }
    return dev->from[i];
}

/* ---- opening keys from raw parts --------------------------------------- */

static int rsa_from_parts(softcxi_device *dev, EVP_PKEY **out, const uint8_t *pub, size_t pub_len,
                          const uint8_t *sec, size_t sec_len)
{
    const uint8_t *n, *e;
    size_t n_len, e_len;
    OSSL_PARAM params[3 + RSA_PARTS];
    size_t k = 0, off = 0, scratch_len = 0;
    int rc = SOFTCXI_EFORMAT;

    if (scx_rsa_pub_parse(pub, pub_len, &n, &n_len, &e, &e_len) != 0 || n_len > 1024 ||
        e_len > 8)
        return SOFTCXI_EFORMAT;
    /* One scratch area for every native-endian number, wiped at the end. */
    scratch_len = n_len + e_len + sec_len;
    uint8_t *scratch = OPENSSL_secure_malloc(scratch_len);
    if (!scratch)
        return SOFTCXI_ENOMEM;
    uint8_t *w = scratch;
    to_native(w, n, n_len);
    params[k++] = OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_RSA_N, w, n_len);
    w += n_len;
    to_native(w, e, e_len);
    params[k++] = OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_RSA_E, w, e_len);
    w += e_len;
    for (size_t i = 0; i < RSA_PARTS; i++) {
        if (sec_len - off < 2)
            goto done;
        size_t len = scx_get16(sec + off);
        off += 2;
        if (len == 0 || len > sec_len - off)
            goto done;
        to_native(w, sec + off, len);
        params[k++] = OSSL_PARAM_construct_BN(rsa_part_names[i], w, len);
        w += len;
        off += len;
    }
    if (off != sec_len)
        goto done;
    params[k] = OSSL_PARAM_construct_end();
    EVP_PKEY_CTX *c = from_ctx(dev, SOFTCXI_ALGO_RSA);
    rc = c && EVP_PKEY_fromdata(c, out, EVP_PKEY_KEYPAIR, params) == 1 ? 0 : SOFTCXI_ECRYPTO;
done:
    OPENSSL_secure_clear_free(scratch, scratch_len);
    return rc;
}

int scx_pkey_from_parts(softcxi_device *dev, EVP_PKEY **out, int algo, int curve,
                        const uint8_t *pub, size_t pub_len, const uint8_t *sec, size_t sec_len)
{
    OSSL_PARAM params[4];
    uint8_t le[66];
    int rc;

    *out = NULL;
    if (algo == SOFTCXI_ALGO_RSA)
        return rsa_from_parts(dev, out, pub, pub_len, sec, sec_len);
    if (algo == SOFTCXI_ALGO_EC) {
        const scx_curve_def *cd = scx_curve(curve);
        if (!cd || sec_len != cd->flen || pub_len != 2 * cd->flen + 1)
            return SOFTCXI_EFORMAT;
        to_native(le, sec, sec_len);
        params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                                     (char *)(uintptr_t)cd->ossl_name, 0);
        params[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                                      (void *)(uintptr_t)pub, pub_len);
        params[2] = OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_PRIV_KEY, le, sec_len);
        params[3] = OSSL_PARAM_construct_end();
    } else if (algo == SOFTCXI_ALGO_ED25519 || algo == SOFTCXI_ALGO_X25519) {
        if (sec_len != 32 || pub_len != 32)
            return SOFTCXI_EFORMAT;
        /* With the public half given, OpenSSL skips recomputing it. */
        params[0] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                                      (void *)(uintptr_t)pub, pub_len);
        params[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PRIV_KEY,
                                                      (void *)(uintptr_t)sec, sec_len);
        params[2] = OSSL_PARAM_construct_end();
    } else {
        return SOFTCXI_EINVAL;
    }
    EVP_PKEY_CTX *c = from_ctx(dev, algo);
    rc = c && EVP_PKEY_fromdata(c, out, EVP_PKEY_KEYPAIR, params) == 1 ? 0 : SOFTCXI_ECRYPTO;
    OPENSSL_cleanse(le, sizeof le);
    return rc;
}

int scx_pkey_public(softcxi_device *dev, EVP_PKEY **out, int algo, int curve,
                    const uint8_t *pub, size_t pub_len)
{
    OSSL_PARAM params[4];
    uint8_t ne[1024 + 8];
    *out = NULL;
    if (algo == SOFTCXI_ALGO_EC) {
        const scx_curve_def *cd = scx_curve(curve);
        if (!cd)
            return SOFTCXI_EFORMAT;
        params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                                     (char *)(uintptr_t)cd->ossl_name, 0);
        params[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                                      (void *)(uintptr_t)pub, pub_len);
        params[2] = OSSL_PARAM_construct_end();
    } else if (algo == SOFTCXI_ALGO_ED25519 || algo == SOFTCXI_ALGO_X25519) {
        if (pub_len != 32)
            return SOFTCXI_EFORMAT;
        params[0] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                                      (void *)(uintptr_t)pub, pub_len);
        params[1] = OSSL_PARAM_construct_end();
    } else if (algo == SOFTCXI_ALGO_RSA) {
        const uint8_t *n, *e;
        size_t n_len, e_len;
        if (scx_rsa_pub_parse(pub, pub_len, &n, &n_len, &e, &e_len) != 0 || n_len > 1024 ||
            e_len > 8)
            return SOFTCXI_EFORMAT;
        to_native(ne, n, n_len);
        to_native(ne + n_len, e, e_len);
        params[0] = OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_RSA_N, ne, n_len);
        params[1] = OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_RSA_E, ne + n_len, e_len);
        params[2] = OSSL_PARAM_construct_end();
    } else {
        return SOFTCXI_EINVAL;
    }
    EVP_PKEY_CTX *c = from_ctx(dev, algo);
    return c && EVP_PKEY_fromdata(c, out, EVP_PKEY_PUBLIC_KEY, params) == 1 ? 0
                                                                           : SOFTCXI_EFORMAT;
}

/* ---- sealing ----------------------------------------------------------- */

/* What sealing needs: the device's own contexts, or a worker thread's
 * copies of them (OpenSSL contexts are not shared across threads). */
typedef struct sealer {
    scx_xaes *x;
    EVP_CIPHER_CTX *gcm;
    scx_rndpool *pool;
    const uint8_t *kcv;
} sealer;

static int seal_with(sealer *z, softcxi_buf *blob, const softcxi_template *t, const uint8_t *pub,
                     size_t pub_len, const uint8_t *secret, size_t secret_len, softcxi_error *err)
{
    uint8_t attrs[3 * 300 + 64 + PUB_MAX], salt[SCX_SALT_LEN];
    size_t alen = scx_attrs_encode(attrs, sizeof attrs, t, (int64_t)time(NULL), pub, pub_len);
    if (!alen)
        return scx_fail(err, SOFTCXI_EINVAL, "key_generate: attributes too large");
    if (scx_rnd_public(z->pool, salt, sizeof salt) != 0)
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "key_generate: random generator failed");
    size_t total = SCX_HDR_LEN + alen + secret_len + SCX_TAG_LEN;
    uint8_t *out = OPENSSL_malloc(total);
    if (!out)
        return scx_fail(err, SOFTCXI_ENOMEM, "key_generate: out of memory");
    if (scx_frame_seal(out, SCX_TYPE_KEY, z->kcv, salt, attrs, alen, secret, secret_len, z->x,
                       z->gcm) != 0) {
        OPENSSL_free(out);
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "key_generate: sealing failed");
    }
    blob->data = out;
    blob->len = total;
    blob->secret = 0;
    return 0;
}

int scx_seal_key(softcxi_session *s, softcxi_buf *blob, const softcxi_template *t,
                 const uint8_t *pub, size_t pub_len, const uint8_t *secret, size_t secret_len)
{
    sealer z = {&s->dev->xblob, s->dev->gcm, &s->dev->pool, s->dev->kcv};
    return seal_with(&z, blob, t, pub, pub_len, secret, secret_len, &s->err);
}

/* ---- generation -------------------------------------------------------- */

/* A reusable keygen context (EC, Ed25519, X25519); NULL for the others. */
static int uses_gen_ctx(int algo)
{
    return algo == SOFTCXI_ALGO_EC || algo == SOFTCXI_ALGO_ED25519 || algo == SOFTCXI_ALGO_X25519;
}

static EVP_PKEY_CTX *new_gen_ctx(const softcxi_template *t)
{
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(NULL, keytype(t->algo), NULL);
    if (!c || EVP_PKEY_keygen_init(c) <= 0 ||
        (t->algo == SOFTCXI_ALGO_EC &&
         EVP_PKEY_CTX_set_group_name(c, scx_curve(t->curve)->ossl_name) <= 0)) {
        EVP_PKEY_CTX_free(c);
        return NULL;
    }
    return c;
}

static EVP_PKEY_CTX *gen_ctx(softcxi_device *dev, const softcxi_template *t)
{
    EVP_PKEY_CTX **slot;
    if (t->algo == SOFTCXI_ALGO_EC)
        slot = &dev->gen_ec[t->curve];
    else if (t->algo == SOFTCXI_ALGO_ED25519)
        slot = &dev->gen_ed25519;
    else
        slot = &dev->gen_x25519;
    if (!*slot)
        *slot = new_gen_ctx(t);
    return *slot;
}

/* Copy a private BIGNUM out as fixed-length big-endian, without a BIGNUM
 * allocation outside the secure heap. */
static int get_priv_be(EVP_PKEY *pk, const char *name, uint8_t *out, size_t len)
{
    uint8_t le[66];
    OSSL_PARAM p[2];
    if (len > sizeof le)
        return 0;
    p[0] = OSSL_PARAM_construct_BN(name, le, len);
    p[1] = OSSL_PARAM_construct_end();
    int ok = EVP_PKEY_get_params(pk, p) == 1 && p[0].return_size == len;
    if (ok)
        to_native(out, le, len); /* the reversal is its own inverse */
    OPENSSL_cleanse(le, sizeof le);
    return ok;
}

static int rsa_parts(EVP_PKEY *pk, uint8_t *pub, size_t *pub_len, uint8_t *sec, size_t *sec_len,
                     size_t sec_cap, int public_only)
{
    BIGNUM *bn = BN_secure_new(), *n = NULL, *e = NULL;
    uint8_t nb[512], eb[8];
    size_t off = 0;
    int ok = bn && EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_N, &n) == 1 &&
             EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_RSA_E, &e) == 1 &&
             BN_num_bytes(n) <= (int)sizeof nb && BN_num_bytes(e) <= (int)sizeof eb;
    if (ok) {
        int nl = BN_bn2bin(n, nb), el = BN_bn2bin(e, eb);
        *pub_len = scx_der_rsa_pub(pub, PUB_MAX, nb, (size_t)nl, eb, (size_t)el);
        ok = *pub_len > 0;
    }
    for (size_t i = 0; ok && !public_only && i < RSA_PARTS; i++) {
        ok = EVP_PKEY_get_bn_param(pk, rsa_part_names[i], &bn) == 1;
        size_t len = ok ? (size_t)BN_num_bytes(bn) : 0;
        ok = ok && len > 0 && off + 2 + len <= sec_cap;
        if (ok) {
            scx_put16(sec + off, (unsigned)len);
            BN_bn2bin(bn, sec + off + 2);
            off += 2 + len;
        }
    }
    *sec_len = off;
    BN_clear_free(bn);
    BN_free(n);
    BN_free(e);
    return ok;
}

/* Generate one key of the checked template t and seal it with z.  gen is
 * the keygen context for EC/Ed25519/X25519 (NULL otherwise). */
static int generate_one(EVP_PKEY_CTX *gen, sealer *z, softcxi_buf *blob,
                        const softcxi_template *t, softcxi_error *err)
{
    uint8_t pub[PUB_MAX];
    size_t pub_len = 0, sec_len = 0, sec_cap = 0;
    EVP_PKEY *pk = NULL;
    int rc;

    blob->data = NULL;
    blob->len = 0;
    /* Small secrets live on the stack (wiped below); RSA's CRT parts go to
     * the secure heap. */
    uint8_t small[256];
    sec_cap = t->algo == SOFTCXI_ALGO_RSA ? 2048 : sizeof small;
    uint8_t *sec = t->algo == SOFTCXI_ALGO_RSA ? OPENSSL_secure_malloc(sec_cap) : small;
    if (!sec)
        return scx_fail(err, SOFTCXI_ENOMEM, "key_generate: out of secure memory");

    switch (t->algo) {
    case SOFTCXI_ALGO_EC:
    case SOFTCXI_ALGO_ED25519:
    case SOFTCXI_ALGO_X25519:
        if (!gen || EVP_PKEY_keygen(gen, &pk) != 1)
            goto crypto;
        if (t->algo == SOFTCXI_ALGO_EC) {
            sec_len = scx_curve(t->curve)->flen;
            if (!EVP_PKEY_get_octet_string_param(pk, OSSL_PKEY_PARAM_PUB_KEY, pub, sizeof pub,
                                                 &pub_len) ||
                !get_priv_be(pk, OSSL_PKEY_PARAM_PRIV_KEY, sec, sec_len))
                goto crypto;
        } else {
            sec_len = 32;
            pub_len = 32;
            if (EVP_PKEY_get_raw_public_key(pk, pub, &pub_len) != 1 ||
                EVP_PKEY_get_raw_private_key(pk, sec, &sec_len) != 1)
                goto crypto;
        }
        break;
    case SOFTCXI_ALGO_RSA: {
        EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
        int ok = c && EVP_PKEY_keygen_init(c) == 1 &&
                 EVP_PKEY_CTX_set_rsa_keygen_bits(c, (int)t->size) == 1 &&
                 EVP_PKEY_keygen(c, &pk) == 1;
        EVP_PKEY_CTX_free(c);
        if (!ok || !rsa_parts(pk, pub, &pub_len, sec, &sec_len, sec_cap, 0))
            goto crypto;
        break;
    }
    default: /* AES and HMAC: the key is random bytes */
        sec_len = t->size / 8;
        if (RAND_priv_bytes(sec, (int)sec_len) != 1)
            goto crypto;
        break;
    }
    rc = seal_with(z, blob, t, pub, pub_len, sec, sec_len, err);
    goto done;
crypto:
    rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "key_generate: %s key generation failed",
                      softcxi_algo_name(t->algo));
done:
    EVP_PKEY_free(pk);
    if (sec == small)
        OPENSSL_cleanse(small, sizeof small);
    else
        OPENSSL_secure_clear_free(sec, sec_cap);
    return rc;
}

static int check_flags(unsigned flags, softcxi_error *err)
{
    if ((flags & ~(SOFTCXI_FLAG_EXTERNAL | SOFTCXI_FLAG_OVERWRITE)) == 0)
        return 0;
    return scx_fail(err, SOFTCXI_EINVAL, "key_generate: unknown flags 0x%x",
                    flags & ~(SOFTCXI_FLAG_EXTERNAL | SOFTCXI_FLAG_OVERWRITE));
}

int softcxi_key_generate(softcxi_session *s, softcxi_buf *blob, unsigned flags,
                         const softcxi_template *tin)
{
    softcxi_device *dev = s->dev;
    softcxi_template t = *tin;
    int rc;

    blob->data = NULL;
    blob->len = 0;
    if ((rc = check_flags(flags, &s->err)) != 0 || (rc = scx_template_check(&t, &s->err)) != 0 ||
        (rc = scx_access_key(s, t.group, t.group ? strlen(t.group) : 0, "key_generate")) != 0 ||
        (rc = scx_device_sync(s)) != 0)
        return rc;
    if (!(flags & SOFTCXI_FLAG_EXTERNAL) && (!t.name || !*t.name))
        return scx_fail(&s->err, SOFTCXI_EINVAL,
                        "template.name: an internal key needs a name (its address)");
    sealer z = {&dev->xblob, dev->gcm, &dev->pool, dev->kcv};
    EVP_PKEY_CTX *gen = uses_gen_ctx(t.algo) ? gen_ctx(dev, &t) : NULL;
    rc = generate_one(gen, &z, blob, &t, &s->err);
    /* Without FLAG_EXTERNAL the blob goes into the device; a handle comes back. */
    if (rc == 0 && !(flags & SOFTCXI_FLAG_EXTERNAL))
        rc = scx_store_internal(s, blob, &t, flags);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

/* ---- bulk generation on worker threads --------------------------------- */

/* A worker needs only the blob key and its check value, never the device:
 * an asynchronous job (below) runs on a copy of them. */
typedef struct worker {
    pthread_t thread;
    const uint8_t *blob_key, *kcv;
    const softcxi_template *t; /* checked */
    const char *const *names;
    softcxi_buf *blobs;
    size_t *next;        /* the next key no worker has taken yet: atomic */
    size_t n;
    int *stop;           /* set by the first worker that fails */
    unsigned *finished;  /* a job's count of finished workers, or NULL */
    int rc;
    size_t failed_at;
    softcxi_error err;
} worker;

/* Keys a worker takes from the shared counter at a time: few enough that
 * the last chunk is short (a P-256 key is ~35 us), enough that neighbouring
 * blob slots are mostly written by one thread. */
#define BULK_CHUNK 4

static void *worker_run(void *arg)
{
    worker *w = arg;
    scx_xaes x;
    scx_rndpool *pool = OPENSSL_zalloc(sizeof *pool);
    EVP_CIPHER_CTX *gcm = EVP_CIPHER_CTX_new();
    EVP_PKEY_CTX *gen = uses_gen_ctx(w->t->algo) ? new_gen_ctx(w->t) : NULL;
    int have_x = scx_xaes_init(&x, w->blob_key) == 0;

    w->rc = 0;
    if (!pool || !gcm || !have_x || (uses_gen_ctx(w->t->algo) && !gen)) {
        w->rc = scx_fail_ssl(&w->err, SOFTCXI_ECRYPTO, "bulk_generate: worker setup failed");
        size_t at = __atomic_load_n(w->next, __ATOMIC_RELAXED);
        w->failed_at = at < w->n ? at : w->n - 1;
        __atomic_store_n(w->stop, 1, __ATOMIC_RELAXED);
    } else {
        sealer z = {&x, gcm, pool, w->kcv};
        softcxi_template t = *w->t;
        /* Keys are taken a few at a time from a shared counter, not dealt
         * out in fixed shares: when the scheduler holds one thread back (a
         * busy machine), the others make its keys, and the call ends one
         * chunk after the last key instead of waiting for the slowest
         * thread's whole share (docs/performance.md). */
        for (;;) {
            size_t i = __atomic_fetch_add(w->next, BULK_CHUNK, __ATOMIC_RELAXED);
            if (i >= w->n)
                break;
            size_t end = i + BULK_CHUNK < w->n ? i + BULK_CHUNK : w->n;
            for (; i < end && !w->rc; i++) {
                if (__atomic_load_n(w->stop, __ATOMIC_RELAXED))
                    break;
                if (w->names)
                    t.name = w->names[i];
                if ((w->names && (w->rc = scx_template_check(&t, &w->err)) != 0) ||
                    (w->rc = generate_one(gen, &z, &w->blobs[i], &t, &w->err)) != 0) {
                    w->failed_at = i;
                    __atomic_store_n(w->stop, 1, __ATOMIC_RELAXED);
                }
            }
            if (w->rc || __atomic_load_n(w->stop, __ATOMIC_RELAXED))
                break;
        }
    }
    if (have_x)
        scx_xaes_clear(&x);
    EVP_CIPHER_CTX_free(gcm);
    EVP_PKEY_CTX_free(gen);
    if (pool)
        OPENSSL_clear_free(pool, sizeof *pool);
    /* Last: the job's owner may look at everything above once it counts. */
    if (w->finished)
        __atomic_add_fetch(w->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* What both forms check before any key is made; t is the caller's copy. */
static int bulk_prepare(softcxi_session *s, unsigned flags, softcxi_template *t)
{
    int rc;
    if (!(flags & SOFTCXI_FLAG_EXTERNAL))
        return scx_fail(&s->err, SOFTCXI_EINVAL,
                        "bulk_generate: FLAG_EXTERNAL is required (the internal database "
                        "holds 8 MiB: bulk keys belong outside)");
    if ((rc = check_flags(flags, &s->err)) != 0 || (rc = scx_template_check(t, &s->err)) != 0 ||
        (rc = scx_access_key(s, t->group, t->group ? strlen(t->group) : 0, "bulk_generate")) !=
            0 ||
        (rc = scx_device_sync(s)) != 0)
        return rc;
    return 0;
}

static unsigned bulk_threads(unsigned threads, size_t n)
{
    if (threads == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cpus > 0 ? (unsigned)cpus : 1;
    }
    if (threads > SOFTCXI_BULK_MAX_THREADS)
        threads = SOFTCXI_BULK_MAX_THREADS;
    if (threads > n)
        threads = (unsigned)n;
    return threads;
}

/* The first failed worker's error (in worker order), as the message of the
 * whole call; 0 when none failed. */
static int bulk_outcome(softcxi_error *err, const worker *ws, unsigned threads,
                        const char *const *names)
{
    for (unsigned i = 0; i < threads; i++) {
        if (ws[i].rc)
            return scx_fail(err, ws[i].rc, "bulk_generate: key %zu%s%s%s: %s",
                            ws[i].failed_at + 1, names ? " ('" : "",
                            names ? names[ws[i].failed_at] : "", names ? "')" : "",
                            ws[i].err.msg);
    }
    return 0;
}

int softcxi_bulk_generate(softcxi_session *s, softcxi_buf *blobs, unsigned flags,
                          const softcxi_template *tin, const char *const *names, size_t n,
                          unsigned threads)
{
    softcxi_template t = *tin;
    worker ws[SOFTCXI_BULK_MAX_THREADS];
    int stop = 0, rc;
    size_t next = 0;

    memset(blobs, 0, n * sizeof *blobs);
    if ((rc = bulk_prepare(s, flags, &t)) != 0)
        return rc;
    if (n == 0) {
        scx_ok(&s->err);
        return 0;
    }
    threads = bulk_threads(threads, n);
    /* Each worker takes keys from the shared counter, with contexts of its
     * own.  The calling thread is worker 0; a worker whose thread could not
     * be started runs here after it and finds whatever is left. */
    int running[SOFTCXI_BULK_MAX_THREADS] = {0};
    for (unsigned i = 0; i < threads; i++) {
        worker *w = &ws[i];
        memset(w, 0, sizeof *w);
        w->blob_key = s->dev->sec->blob_key, w->kcv = s->dev->kcv;
        w->t = &t, w->names = names, w->blobs = blobs;
        w->next = &next, w->n = n, w->stop = &stop;
    }
    for (unsigned i = 1; i < threads; i++)
        running[i] = pthread_create(&ws[i].thread, NULL, worker_run, &ws[i]) == 0;
    for (unsigned i = 0; i < threads; i++)
        if (!running[i])
            worker_run(&ws[i]);
    for (unsigned i = 1; i < threads; i++)
        if (running[i])
            pthread_join(ws[i].thread, NULL);
    if ((rc = bulk_outcome(&s->err, ws, threads, names)) != 0) {
        for (size_t i = 0; i < n; i++)
            softcxi_buf_free(&blobs[i]);
        return rc;
    }
    scx_ok(&s->err);
    return 0;
}

/* ---- bulk generation that runs while the caller does something else ------ */

/* Everything a job's workers touch is the job's own: copies of the checked
 * template (and its strings), of the names, and of the blob key (on a locked
 * page) and its check value.  Nothing points into the session, the device
 * or the caller's memory, so neither may change or go away under a worker. */
struct softcxi_bulk_job {
    worker ws[SOFTCXI_BULK_MAX_THREADS];
    int running[SOFTCXI_BULK_MAX_THREADS];
    unsigned threads;
    unsigned finished; /* workers done: atomic */
    int stop;          /* atomic */
    size_t next;       /* the workers' shared key counter: atomic */
    int joined, collected;
    softcxi_template t;
    char *strings;      /* the template's strings, then the names */
    size_t strings_len;
    const char **names; /* NULL: the template's name */
    size_t n;
    softcxi_buf *blobs;
    uint8_t *key;       /* the blob key: locked, wiped once the workers end */
    uint8_t kcv[SCX_KCV_LEN];
};

/* Copy s (or NULL) to *p, advancing it. */
static const char *job_str(char **p, const char *s)
{
    if (!s)
        return NULL;
    size_t len = strlen(s) + 1;
    memcpy(*p, s, len);
    const char *out = *p;
    *p += len;
    return out;
}

static void job_join(softcxi_bulk_job *job)
{
    if (job->joined)
        return;
    for (unsigned i = 0; i < job->threads; i++)
        if (job->running[i])
            pthread_join(job->ws[i].thread, NULL);
    job->joined = 1;
    scx_locked_free(job->key, 32); /* the workers are gone: wipe it now */
    job->key = NULL;
}

void softcxi_bulk_job_free(softcxi_bulk_job *job)
{
    if (!job)
        return;
    __atomic_store_n(&job->stop, 1, __ATOMIC_RELAXED); /* a running job stops early */
    job_join(job);
    if (job->blobs)
        for (size_t i = 0; i < job->n; i++)
            softcxi_buf_free(&job->blobs[i]);
    OPENSSL_free(job->blobs);
    OPENSSL_free(job->names);
    OPENSSL_clear_free(job->strings, job->strings_len);
    OPENSSL_clear_free(job, sizeof *job);
}

int softcxi_bulk_generate_start(softcxi_session *s, softcxi_bulk_job **out, unsigned flags,
                                const softcxi_template *tin, const char *const *names,
                                size_t n, unsigned threads)
{
    softcxi_template t = *tin;
    int rc;

    *out = NULL;
    if ((rc = bulk_prepare(s, flags, &t)) != 0)
        return rc;
    softcxi_bulk_job *job = OPENSSL_zalloc(sizeof *job);
    if (!job)
        return scx_fail(&s->err, SOFTCXI_ENOMEM, "bulk_generate: out of memory");
    job->n = n;
    /* One allocation for the template's strings and the names. */
    size_t len = (t.name ? strlen(t.name) + 1 : 0) + (t.group ? strlen(t.group) + 1 : 0) +
                 (t.label ? strlen(t.label) + 1 : 0);
    for (size_t i = 0; names && i < n; i++)
        len += names[i] ? strlen(names[i]) + 1 : 0;
    job->strings_len = len ? len : 1;
    job->strings = OPENSSL_malloc(job->strings_len);
    job->blobs = OPENSSL_zalloc((n ? n : 1) * sizeof *job->blobs);
    job->names = names ? OPENSSL_malloc((n ? n : 1) * sizeof *job->names) : NULL;
    job->key = scx_locked_alloc(32);
    if (!job->strings || !job->blobs || (names && !job->names) || !job->key) {
        softcxi_bulk_job_free(job);
        return scx_fail(&s->err, SOFTCXI_ENOMEM, "bulk_generate: out of memory");
    }
    char *p = job->strings;
    job->t = t;
    job->t.name = job_str(&p, t.name);
    job->t.group = job_str(&p, t.group);
    job->t.label = job_str(&p, t.label);
    for (size_t i = 0; names && i < n; i++)
        job->names[i] = job_str(&p, names[i]);
    memcpy(job->key, s->dev->sec->blob_key, 32);
    memcpy(job->kcv, s->dev->kcv, SCX_KCV_LEN);

    job->threads = n ? bulk_threads(threads, n) : 0;
    for (unsigned i = 0; i < job->threads; i++) {
        worker *w = &job->ws[i];
        w->blob_key = job->key, w->kcv = job->kcv;
        w->t = &job->t, w->names = job->names, w->blobs = job->blobs;
        w->next = &job->next, w->n = n;
        w->stop = &job->stop, w->finished = &job->finished;
    }
    /* Every worker on a thread of its own; one whose thread cannot be
     * started runs here, before returning, and takes keys with the others
     * (slower, never wrong). */
    for (unsigned i = 0; i < job->threads; i++)
        job->running[i] = pthread_create(&job->ws[i].thread, NULL, worker_run, &job->ws[i]) == 0;
    for (unsigned i = 0; i < job->threads; i++)
        if (!job->running[i])
            worker_run(&job->ws[i]);
    *out = job;
    scx_ok(&s->err);
    return 0;
}

int softcxi_bulk_job_ready(const softcxi_bulk_job *job)
{
    return job->collected || __atomic_load_n(&job->finished, __ATOMIC_ACQUIRE) == job->threads;
}

size_t softcxi_bulk_job_count(const softcxi_bulk_job *job) { return job->n; }

int softcxi_bulk_job_wait(softcxi_bulk_job *job, softcxi_buf **blobs, softcxi_error *err)
{
    *blobs = NULL;
    if (job->collected)
        return scx_fail(err, SOFTCXI_EINVAL, "bulk_generate: the job was waited for already");
    job_join(job);
    job->collected = 1;
    int rc = bulk_outcome(err, job->ws, job->threads, job->names);
    if (rc) {
        for (size_t i = 0; i < job->n; i++)
            softcxi_buf_free(&job->blobs[i]);
        return rc;
    }
    *blobs = job->blobs;
    scx_ok(err);
    return 0;
}

/* ---- import -------------------------------------------------------------- */

int scx_ec_named(EVP_PKEY *pk)
{
    /* A key that spells out its curve parameters may carry a wrong cofactor
     * or generator next to a familiar field: only named curves are taken. */
    char enc[32];
    size_t n = 0;
    return EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_EC_ENCODING, enc, sizeof enc, &n) ==
               1 &&
           strcmp(enc, OSSL_PKEY_EC_ENCODING_GROUP) == 0;
}

/* SEC1 ECPrivateKey { version 1, privateKey, [0] curve } without the public
 * key: OpenSSL's decoder computes the public point from the scalar. */
static EVP_PKEY *ec_from_scalar(const scx_curve_def *c, const uint8_t *d, size_t len)
{
    uint8_t der[128];
    size_t body = 3 + 2 + len + 2 + 2 + c->oid_len, k = 0;
    if (len != c->flen || body > 127)
        return NULL;
    der[k++] = 0x30, der[k++] = (uint8_t)body;
    der[k++] = 0x02, der[k++] = 0x01, der[k++] = 0x01;
    der[k++] = 0x04, der[k++] = (uint8_t)len;
    memcpy(der + k, d, len), k += len;
    der[k++] = 0xA0, der[k++] = (uint8_t)(2 + c->oid_len);
    der[k++] = 0x06, der[k++] = (uint8_t)c->oid_len;
    memcpy(der + k, c->oid, c->oid_len), k += c->oid_len;
    const unsigned char *p = der;
    EVP_PKEY *pk = d2i_PrivateKey(EVP_PKEY_EC, NULL, &p, (long)k);
    OPENSSL_cleanse(der, sizeof der);
    return pk;
}

/* Encrypted PEM is refused rather than prompting on a terminal. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf, (void)size, (void)rwflag, (void)u;
    return -1;
}

static EVP_PKEY *parse_key(const uint8_t *data, size_t len, int format, int *is_public)
{
    EVP_PKEY *pk = NULL;
    int pem = len > 11 && memcmp(data, "-----BEGIN", 10) == 0;
    *is_public = format == SOFTCXI_IMPORT_SPKI;
    if (len > INT32_MAX)
        return NULL;
    if (pem) {
        BIO *b = BIO_new_mem_buf(data, (int)len);
        if (b)
            pk = *is_public ? PEM_read_bio_PUBKEY(b, NULL, no_passphrase, NULL)
                            : PEM_read_bio_PrivateKey(b, NULL, no_passphrase, NULL);
        BIO_free(b);
    } else {
        const unsigned char *p = data;
        pk = *is_public ? d2i_PUBKEY(NULL, &p, (long)len) : d2i_AutoPrivateKey(NULL, &p, (long)len);
        if (pk && p != data + len) {
            EVP_PKEY_free(pk);
            pk = NULL;
        }
    }
    return pk;
}

/* What kind of key pk is, in template terms. */
static int describe(EVP_PKEY *pk, int *algo, int *curve, unsigned *size)
{
    *curve = SOFTCXI_CURVE_NONE;
    *size = 0;
    if (EVP_PKEY_is_a(pk, "ED25519"))
        *algo = SOFTCXI_ALGO_ED25519;
    else if (EVP_PKEY_is_a(pk, "X25519"))
        *algo = SOFTCXI_ALGO_X25519;
    else if (EVP_PKEY_is_a(pk, "RSA")) {
        *algo = SOFTCXI_ALGO_RSA;
        *size = (unsigned)EVP_PKEY_get_bits(pk);
    } else if (EVP_PKEY_is_a(pk, "EC")) {
        char group[64];
        size_t gl = 0;
        *algo = SOFTCXI_ALGO_EC;
        if (!scx_ec_named(pk) ||
            EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                           &gl) != 1)
            return -1;
        for (int c = SOFTCXI_CURVE_P256; c <= SOFTCXI_CURVE_SECP256K1; c++)
            if (!strcmp(group, scx_curve(c)->ossl_name))
                *curve = c;
        if (!*curve)
            return -1;
    } else {
        return -1;
    }
    return 0;
}

int softcxi_key_import(softcxi_session *s, softcxi_buf *blob, unsigned flags,
                       const softcxi_template *tin, const uint8_t *data, size_t len, int format)
{
    softcxi_device *dev = s->dev;
    softcxi_template t = *tin;
    uint8_t pub[PUB_MAX], *sec = NULL;
    size_t pub_len = 0, sec_len = 0, sec_cap = 2048;
    EVP_PKEY *pk = NULL;
    int rc, is_public = 0, algo = 0, curve = 0;
    unsigned size = 0;

    blob->data = NULL, blob->len = 0, blob->secret = 0;
    if ((rc = check_flags(flags, &s->err)) != 0)
        return rc;
    if (format == SOFTCXI_IMPORT_JWK) {
        /* A public JWK is an SPKI in other clothes. */
        softcxi_buf der = {0};
        if ((rc = scx_jwk_to_spki(&der, data, len, &s->err)) != 0)
            return rc;
        rc = softcxi_key_import(s, blob, flags, tin, der.data, der.len, SOFTCXI_IMPORT_SPKI);
        softcxi_buf_free(&der);
        return rc;
    }
    if (format == SOFTCXI_IMPORT_RAW) {
        /* Raw bytes: the template says what they are. */
        algo = t.algo;
        if (algo == SOFTCXI_ALGO_AES || scx_hmac_digest(algo)) {
            if (len == 0 || len > 256 || (t.size && t.size != len * 8))
                return scx_fail(&s->err, SOFTCXI_EINVAL,
                                "key_import: %zu raw bytes do not make a %s key of %u bits", len,
                                softcxi_algo_name(algo), t.size);
            t.size = (unsigned)len * 8;
        } else if (algo == SOFTCXI_ALGO_ED25519 || algo == SOFTCXI_ALGO_X25519) {
            if (len == 32)
                pk = EVP_PKEY_new_raw_private_key(algo == SOFTCXI_ALGO_ED25519 ? EVP_PKEY_ED25519
                                                                              : EVP_PKEY_X25519,
                                                  NULL, data, len);
        } else if (algo == SOFTCXI_ALGO_EC) {
            const scx_curve_def *c = scx_curve(t.curve ? t.curve : SOFTCXI_CURVE_P256);
            pk = c ? ec_from_scalar(c, data, len) : NULL;
        } else {
            return scx_fail(&s->err, SOFTCXI_EINVAL,
                            "key_import: raw import needs template.algo aes, hmac-*, ec, "
                            "ed25519 or x25519");
        }
        if (!pk && !(algo == SOFTCXI_ALGO_AES || scx_hmac_digest(algo)))
            return scx_fail_ssl(&s->err, SOFTCXI_EINVAL,
                                "key_import: the raw bytes are not a valid %s private key",
                                softcxi_algo_name(algo));
    } else if (format == SOFTCXI_IMPORT_PKCS8 || format == SOFTCXI_IMPORT_SPKI) {
        pk = parse_key(data, len, format, &is_public);
        if (!pk)
            return scx_fail_ssl(&s->err, SOFTCXI_EINVAL, "key_import: not a %s key (DER or PEM)",
                                is_public ? "SubjectPublicKeyInfo public" : "PKCS#8 private");
    } else {
        return scx_fail(&s->err, SOFTCXI_EINVAL, "key_import: unknown format %d", format);
    }
    if (pk) {
        if (describe(pk, &algo, &curve, &size) != 0) {
            rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                          "key_import: unsupported key type or curve (ec P-256/P-384/P-521/"
                          "secp256k1, ed25519, x25519, rsa)");
            goto done;
        }
        if ((t.algo && t.algo != algo) || (t.curve && t.curve != curve) ||
            (t.size && size && t.size != size)) {
            rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                          "key_import: the template says %s%s%s, the key is %s%s%s",
                          t.algo ? softcxi_algo_name(t.algo) : "", t.curve ? " " : "",
                          t.curve ? softcxi_curve_name(t.curve) : "", softcxi_algo_name(algo),
                          curve ? " " : "", curve ? softcxi_curve_name(curve) : "");
            goto done;
        }
        t.algo = algo, t.curve = curve, t.size = size;
    }
    if (is_public) {
        if (!t.usage)
            t.usage = SOFTCXI_USAGE_VERIFY;
        if ((t.usage & ~SCX_PUBLIC_USAGE) || algo == SOFTCXI_ALGO_X25519) {
            rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                          "template.usage: a public key can only verify, encrypt or wrap");
            goto done;
        }
    }
    if ((rc = scx_template_check(&t, &s->err)) != 0 ||
        (rc = scx_access_key(s, t.group, t.group ? strlen(t.group) : 0, "key_import")) != 0 ||
        (rc = scx_device_sync(s)) != 0)
        goto done;
    if (!(sec = OPENSSL_secure_malloc(sec_cap))) {
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "key_import: out of secure memory");
        goto done;
    }
    int ok = 1;
    if (!pk) { /* AES, HMAC */
        memcpy(sec, data, len);
        sec_len = len;
    } else if (algo == SOFTCXI_ALGO_RSA) {
        ok = rsa_parts(pk, pub, &pub_len, sec, &sec_len, sec_cap, is_public);
    } else if (algo == SOFTCXI_ALGO_EC) {
        sec_len = is_public ? 0 : scx_curve(curve)->flen;
        ok = EVP_PKEY_get_octet_string_param(pk, OSSL_PKEY_PARAM_PUB_KEY, pub, sizeof pub,
                                             &pub_len) == 1 &&
             (is_public || get_priv_be(pk, OSSL_PKEY_PARAM_PRIV_KEY, sec, sec_len));
        /* Always store the uncompressed point. */
        if (ok && pub[0] != 4) {
            EVP_PKEY *full = NULL;
            ok = scx_pkey_public(dev, &full, algo, curve, pub, pub_len) == 0 &&
                 EVP_PKEY_set_utf8_string_param(full, OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT,
                                                "uncompressed") == 1 &&
                 EVP_PKEY_get_octet_string_param(full, OSSL_PKEY_PARAM_PUB_KEY, pub,
                                                 sizeof pub, &pub_len) == 1;
            EVP_PKEY_free(full);
        }
    } else {
        pub_len = 32;
        sec_len = is_public ? 0 : 32;
        ok = EVP_PKEY_get_raw_public_key(pk, pub, &pub_len) == 1 &&
             (is_public || EVP_PKEY_get_raw_private_key(pk, sec, &sec_len) == 1);
    }
    if (!ok) {
        rc = scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "key_import: taking the %s key apart failed",
                          softcxi_algo_name(algo));
        goto done;
    }
    rc = scx_seal_key(s, blob, &t, pub, pub_len, sec, sec_len);
    if (rc == 0 && !(flags & SOFTCXI_FLAG_EXTERNAL))
        rc = scx_store_internal(s, blob, &t, flags);
done:
    EVP_PKEY_free(pk);
    OPENSSL_secure_clear_free(sec, sec_cap);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

/* ---- opening blobs ----------------------------------------------------- */

void scx_key_free(scx_key *k)
{
    if (!k)
        return;
    EVP_PKEY_free(k->pkey);
    OPENSSL_secure_clear_free(k->sym, k->sym_len);
    OPENSSL_free(k->blob);
    OPENSSL_free(k);
}

/* A blob without a secret is a public key: it may only verify or encrypt. */
static int public_only_ok(const softcxi_key_info *i)
{
    return (i->algo == SOFTCXI_ALGO_EC || i->algo == SOFTCXI_ALGO_ED25519 ||
            i->algo == SOFTCXI_ALGO_RSA) &&
           i->pub_len > 0 && (i->usage & ~SCX_PUBLIC_USAGE) == 0;
}

static int check_shape(const softcxi_key_info *i, size_t sec_len)
{
    if (sec_len == 0)
        return public_only_ok(i);
    switch (i->algo) {
    case SOFTCXI_ALGO_EC: {
        const scx_curve_def *c = scx_curve(i->curve);
        return c && sec_len == c->flen && i->pub_len == 2 * c->flen + 1;
    }
    case SOFTCXI_ALGO_ED25519:
    case SOFTCXI_ALGO_X25519:
        return sec_len == 32 && i->pub_len == 32;
    case SOFTCXI_ALGO_RSA:
        return i->pub_len > 0 && (i->size == 2048 || i->size == 3072 || i->size == 4096);
    case SOFTCXI_ALGO_AES:
        return (i->size == 128 || i->size == 192 || i->size == 256) && sec_len == i->size / 8;
    default:
        return i->size >= 128 && sec_len == i->size / 8;
    }
}

static int open_key(softcxi_session *s, scx_key **out, const uint8_t *blob, size_t len)
{
    softcxi_device *dev = s->dev;
    scx_frame f;
    uint8_t *sec = NULL;
    int rc;

    *out = NULL;
    scx_key *k = OPENSSL_zalloc(sizeof *k);
    if (!k || !(k->blob = OPENSSL_malloc(len ? len : 1))) {
        OPENSSL_free(k);
        return scx_fail(&s->err, SOFTCXI_ENOMEM, "out of memory opening a blob");
    }
    memcpy(k->blob, blob, len);
    k->blob_len = len;
    if ((rc = scx_frame_parse(&f, &k->info, k->blob, len, &s->err)) != 0)
        goto fail;
    if (f.type != SCX_TYPE_KEY) {
        rc = scx_fail(&s->err, SOFTCXI_EFORMAT, "not a key blob (blob type 0x%02x)", f.type);
        goto fail;
    }
    scx_xaes *x = scx_mbk_for(dev, f.kcv);
    if (!x) {
        char want[17], have[17];
        scx_hex(want, f.kcv, SCX_KCV_LEN);
        scx_hex(have, dev->kcv, SCX_KCV_LEN);
        rc = scx_fail(&s->err, SOFTCXI_EMBK,
                      "blob of key %s was sealed under MBK %s; this device holds MBK %s", REF(&k->info),
                      want, have);
        goto fail;
    }
    /* No secret: a verify-only key made by key_import from a public key. */
    uint8_t none[1];
    if (f.ct_len == 0 && !public_only_ok(&k->info)) {
        rc = scx_fail(&s->err, SOFTCXI_EFORMAT, "blob of key %s holds no key", REF(&k->info));
        goto fail;
    }
    if (f.ct_len && !(sec = OPENSSL_secure_malloc(f.ct_len))) {
        rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "out of secure memory opening %s", REF(&k->info));
        goto fail;
    }
    rc = scx_xaes_open(x, dev->gcm, f.ct_len ? sec : none, f.ct, f.ct_len, f.tag,
                       f.salt, k->blob, f.aad_len);
    if (rc == SOFTCXI_ETAMPER) {
        rc = scx_fail(&s->err, SOFTCXI_ETAMPER,
                      "blob of key %s fails authentication: tampered or corrupt", REF(&k->info));
        goto fail;
    }
    if (rc) {
        rc = scx_fail_ssl(&s->err, rc, "opening blob of key %s failed", REF(&k->info));
        goto fail;
    }
    /* Authentic, so a bad shape means a bug or an unknown algorithm. */
    if (!check_shape(&k->info, f.ct_len)) {
        rc = scx_fail(&s->err, SOFTCXI_EFORMAT, "blob of key %s has an inconsistent key shape",
                      REF(&k->info));
        goto fail;
    }
    if (f.ct_len == 0) {
        rc = scx_pkey_public(dev, &k->pkey, k->info.algo, k->info.curve, k->info.pub,
                             k->info.pub_len);
        if (rc) {
            rc = scx_fail_ssl(&s->err, rc, "blob of key %s: the public key does not load",
                              REF(&k->info));
            goto fail;
        }
    } else if (keytype(k->info.algo)) {
        rc = scx_pkey_from_parts(dev, &k->pkey, k->info.algo, k->info.curve, k->info.pub,
                                 k->info.pub_len, sec, f.ct_len);
        if (rc) {
            rc = scx_fail_ssl(&s->err, rc, "blob of key %s: the key does not load", REF(&k->info));
            goto fail;
        }
        OPENSSL_secure_clear_free(sec, f.ct_len);
    } else {
        k->sym = sec;
        k->sym_len = f.ct_len;
    }
    if ((rc = scx_key_id(k->id, f.attrs, f.attrs_len)) != 0) {
        rc = scx_fail_ssl(&s->err, rc, "blob of key %s: digest failed", REF(&k->info));
        goto fail;
    }
    k->info.verified = 1;
    k->has_secret = f.ct_len != 0;
    *out = k;
    return 0;
fail:
    OPENSSL_secure_clear_free(sec, f.ct_len);
    scx_key_free(k);
    return rc;
}

/* ---- the cache --------------------------------------------------------- */

void scx_cache_init(scx_cache *c, size_t capacity)
{
    memset(c, 0, sizeof *c);
    if (!capacity)
        return;
    capacity = (capacity + SCX_CACHE_WAYS - 1) / SCX_CACHE_WAYS * SCX_CACHE_WAYS;
    c->slot = OPENSSL_zalloc(capacity * sizeof *c->slot);
    if (c->slot)
        c->capacity = capacity;
}

void scx_cache_clear(scx_cache *c)
{
    for (size_t i = 0; i < c->capacity; i++)
        scx_key_free(c->slot[i]);
    OPENSSL_free(c->slot);
    memset(c, 0, sizeof *c);
}

static size_t cache_set(const scx_cache *c, const uint8_t *blob, size_t len)
{
    /* The tag closes every blob and is pseudo-random: a fine hash.  A match
     * is decided by comparing whole blobs, never by the hash. */
    uint64_t h = 0;
    for (size_t i = 0; i < 8 && i < len; i++)
        h = h << 8 | blob[len - 1 - i];
    return (size_t)(h % (c->capacity / SCX_CACHE_WAYS)) * SCX_CACHE_WAYS;
}

static void cache_evict(scx_cache *c, size_t i)
{
    scx_key_free(c->slot[i]);
    c->slot[i] = NULL;
    c->entries--;
    c->evictions++;
}

/* Keep OpenSSL's secure heap from filling up with cached private keys: a
 * full secure heap makes every later key load fail. */
static void cache_trim(scx_cache *c)
{
    size_t limit = SCX_SECURE_HEAP / 4 * 3;
    for (size_t n = 0; n < c->capacity && c->entries && CRYPTO_secure_used() > limit; n++) {
        c->sweep = (c->sweep + 1) % c->capacity;
        if (c->slot[c->sweep])
            cache_evict(c, c->sweep);
    }
}

static int revoked_check(softcxi_session *s, scx_key *k)
{
    if (!s->dev->nrevoked || !scx_is_revoked(s->dev, k->id))
        return 0;
    return scx_fail(&s->err, SOFTCXI_EREVOKED, "key %s was revoked", REF(&k->info));
}

int scx_key_get(softcxi_session *s, scx_key **out, const uint8_t *blob, size_t len)
{
    int rc = scx_device_sync(s); /* an MBK retired elsewhere is never served */
    if (rc)
        return rc;
    if (len > 0 && blob[0] == 0x49 && (rc = scx_handle_resolve(s, blob, len, &blob, &len)) != 0)
        return rc; /* an internal key's handle: its blob comes from the database */
    scx_cache *c = &s->dev->cache;
    size_t base = 0;
    if (c->capacity) {
        base = cache_set(c, blob, len);
        for (size_t i = base; i < base + SCX_CACHE_WAYS; i++) {
            scx_key *k = c->slot[i];
            if (k && k->blob_len == len && memcmp(k->blob, blob, len) == 0) {
                k->stamp = ++c->clock;
                c->hits++;
                *out = k;
                return revoked_check(s, k);
            }
        }
        c->misses++;
    }
    rc = open_key(s, out, blob, len);
    if (rc == 0 && (rc = revoked_check(s, *out)) != 0) {
        scx_key_free(*out);
        *out = NULL;
        return rc;
    }
    if (rc || !c->capacity)
        return rc;
    size_t victim = base;
    for (size_t i = base; i < base + SCX_CACHE_WAYS; i++) {
        if (!c->slot[i]) {
            victim = i;
            break;
        }
        if (c->slot[i]->stamp < c->slot[victim]->stamp)
            victim = i;
    }
    if (c->slot[victim])
        cache_evict(c, victim);
    (*out)->stamp = ++c->clock;
    (*out)->cached = 1;
    c->slot[victim] = *out;
    c->entries++;
    cache_trim(c);
    if (!c->slot[victim]) /* trimmed away at once: hand it over uncached */
        return open_key(s, out, blob, len); /* (checked for revocation above) */
    return 0;
}

void scx_key_release(softcxi_session *s, scx_key *k)
{
    (void)s;
    if (k && !k->cached)
        scx_key_free(k);
}

/* ---- verified info and public keys ------------------------------------- */

int softcxi_key_info_check(softcxi_session *s, softcxi_key_info *info, const uint8_t *blob,
                     size_t blob_len)
{
    scx_key *k;
    int rc = 0;
    /* A handle: read the stored blob (valid until the next database call). */
    if (blob_len > 0 && blob[0] == 0x49 &&
        (rc = scx_handle_resolve(s, blob, blob_len, &blob, &blob_len)) != 0)
        return rc;
    rc = scx_key_get(s, &k, blob, blob_len);
    if (rc)
        return rc;
    rc = scx_access_key(s, k->info.group, k->info.group_len, "key_info");
    scx_key_release(s, k);
    if (rc)
        return rc;
    /* Point into the caller's blob, not the cache's copy. */
    rc = softcxi_key_info_read(info, blob, blob_len, &s->err);
    if (rc == 0)
        info->verified = 1;
    return rc;
}

int softcxi_public_key_read(softcxi_buf *out, const uint8_t *blob, size_t blob_len, int fmt,
                            softcxi_error *err)
{
    softcxi_key_info info;
    int rc = softcxi_key_info_read(&info, blob, blob_len, err);
    if (rc)
        return rc;
    return scx_pub_encode(out, &info, fmt, err);
}

int softcxi_public_key(softcxi_session *s, softcxi_buf *out, const uint8_t *blob,
                       size_t blob_len, int fmt)
{
    softcxi_key_info info;
    int rc = softcxi_key_info_check(s, &info, blob, blob_len);
    if (rc)
        return rc;
    return scx_pub_encode(out, &info, fmt, &s->err);
}
