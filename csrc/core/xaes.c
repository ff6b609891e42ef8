/*
 * xaes.c - the sealing primitive and the labelled derivations.
 *
 * XAES-256-GCM (C2SP XAES-256-GCM): for a 24-byte nonce N,
 *   L  = AES-256_K(0^128),  K1 = dbl(L)            (CMAC subkey, once per K)
 *   Kx = AES_K(K1 ^ 00 01 'X' 00 || N[0:12]) || AES_K(K1 ^ 00 02 'X' 00 || N[0:12])
 *   AES-256-GCM(Kx, iv = N[12:24])
 * Two AES blocks per blob buy a fresh GCM key for every blob, so random
 * nonces stay safe far beyond 2^32 blobs under one MBK.
 */
#include "internal.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <string.h>

int scx_xaes_init(scx_xaes *x, const uint8_t key[32])
{
    static const uint8_t zero[16];
    uint8_t l[16];
    int n = 0;

    memset(x, 0, sizeof *x);
    x->ecb = EVP_CIPHER_CTX_new();
    x->gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    if (!x->ecb || !x->gcm || !EVP_EncryptInit_ex2(x->ecb, EVP_aes_256_ecb(), key, NULL, NULL) ||
        !EVP_CIPHER_CTX_set_padding(x->ecb, 0) || !EVP_EncryptUpdate(x->ecb, l, &n, zero, 16) ||
        n != 16) {
        scx_xaes_clear(x);
        return SOFTCXI_ECRYPTO;
    }
    /* dbl(): shift left one bit, reduce by x^128 + x^7 + x^2 + x + 1. */
    uint8_t msb = (uint8_t)(l[0] >> 7);
    for (int i = 0; i < 15; i++)
        x->k1[i] = (uint8_t)(l[i] << 1 | l[i + 1] >> 7);
    x->k1[15] = (uint8_t)(l[15] << 1);
    x->k1[15] ^= (uint8_t)(0x87u & (0u - msb));
    OPENSSL_cleanse(l, sizeof l);
    return 0;
}

void scx_xaes_clear(scx_xaes *x)
{
    EVP_CIPHER_CTX_free(x->ecb); /* cleanses the key schedule */
    EVP_CIPHER_free(x->gcm);
    OPENSSL_cleanse(x, sizeof *x);
}

int scx_xaes_dup(scx_xaes *dst, const scx_xaes *src)
{
    memset(dst, 0, sizeof *dst);
    dst->ecb = EVP_CIPHER_CTX_new();
    if (!dst->ecb || !EVP_CIPHER_CTX_copy(dst->ecb, src->ecb) || !EVP_CIPHER_up_ref(src->gcm)) {
        EVP_CIPHER_CTX_free(dst->ecb);
        OPENSSL_cleanse(dst, sizeof *dst);
        return SOFTCXI_ECRYPTO;
    }
    dst->gcm = src->gcm;
    memcpy(dst->k1, src->k1, sizeof dst->k1);
    return 0;
}

static int derive(scx_xaes *x, uint8_t kx[32], const uint8_t nonce[SCX_SALT_LEN])
{
    uint8_t m[32];
    int n = 0;
    m[0] = 0x00, m[1] = 0x01, m[2] = 'X', m[3] = 0x00;
    memcpy(m + 4, nonce, 12);
    memcpy(m + 16, m, 16);
    m[17] = 0x02;
    for (int i = 0; i < 16; i++) {
        m[i] ^= x->k1[i];
        m[16 + i] ^= x->k1[i];
    }
    int ok = EVP_EncryptUpdate(x->ecb, kx, &n, m, 32) && n == 32;
    OPENSSL_cleanse(m, sizeof m);
    return ok ? 0 : SOFTCXI_ECRYPTO;
}

int scx_xaes_seal(scx_xaes *x, EVP_CIPHER_CTX *gcm, uint8_t *ct, uint8_t tag[SCX_TAG_LEN],
                  const uint8_t nonce[SCX_SALT_LEN], const uint8_t *aad, size_t aad_len,
                  const uint8_t *pt, size_t pt_len)
{
    uint8_t kx[32];
    int n = 0, ok;

    if (aad_len > INT32_MAX || pt_len > INT32_MAX)
        return SOFTCXI_EINVAL;
    ok = derive(x, kx, nonce) == 0 &&
         EVP_EncryptInit_ex2(gcm, scx_cipher_once(gcm, x->gcm), kx, nonce + 12, NULL) &&
         (aad_len == 0 || EVP_EncryptUpdate(gcm, NULL, &n, aad, (int)aad_len)) &&
         (pt_len == 0 || EVP_EncryptUpdate(gcm, ct, &n, pt, (int)pt_len)) &&
         EVP_EncryptFinal_ex(gcm, ct + pt_len, &n) &&
         EVP_CIPHER_CTX_ctrl(gcm, EVP_CTRL_AEAD_GET_TAG, SCX_TAG_LEN, tag);
    OPENSSL_cleanse(kx, sizeof kx);
    return ok ? 0 : SOFTCXI_ECRYPTO;
}

int scx_xaes_open(scx_xaes *x, EVP_CIPHER_CTX *gcm, uint8_t *pt, const uint8_t *ct,
                  size_t ct_len, const uint8_t tag[SCX_TAG_LEN], const uint8_t nonce[SCX_SALT_LEN],
                  const uint8_t *aad, size_t aad_len)
{
    uint8_t kx[32];
    int n = 0, ok;

    if (aad_len > INT32_MAX || ct_len > INT32_MAX)
        return SOFTCXI_EINVAL;
    ok = derive(x, kx, nonce) == 0 &&
         EVP_DecryptInit_ex2(gcm, scx_cipher_once(gcm, x->gcm), kx, nonce + 12, NULL) &&
         (aad_len == 0 || EVP_DecryptUpdate(gcm, NULL, &n, aad, (int)aad_len)) &&
         (ct_len == 0 || EVP_DecryptUpdate(gcm, pt, &n, ct, (int)ct_len)) &&
         EVP_CIPHER_CTX_ctrl(gcm, EVP_CTRL_AEAD_SET_TAG, SCX_TAG_LEN, (void *)(uintptr_t)tag);
    OPENSSL_cleanse(kx, sizeof kx);
    if (!ok) {
        OPENSSL_cleanse(pt, ct_len);
        return SOFTCXI_ECRYPTO;
    }
    if (EVP_DecryptFinal_ex(gcm, pt + ct_len, &n) <= 0) {
        /* Nothing of an unauthenticated plaintext leaves this function. */
        OPENSSL_cleanse(pt, ct_len);
        return SOFTCXI_ETAMPER;
    }
    return 0;
}

int scx_label_key(uint8_t out[32], const uint8_t key[32], const char *label)
{
    unsigned int n = 32;
    if (!HMAC(EVP_sha256(), key, 32, (const unsigned char *)label, strlen(label), out, &n) ||
        n != 32)
        return SOFTCXI_ECRYPTO;
    return 0;
}

int scx_kcv(uint8_t kcv[SCX_KCV_LEN], const uint8_t key[32])
{
    uint8_t full[32];
    int rc = scx_label_key(full, key, SCX_LABEL_KCV);
    memcpy(kcv, full, SCX_KCV_LEN);
    OPENSSL_cleanse(full, sizeof full);
    return rc;
}

const EVP_CIPHER *scx_cipher_once(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher)
{
    /* Passing the cipher again makes OpenSSL 3.0 tear down and rebuild the
     * provider context; re-keying with NULL keeps it (~0.4 us a blob). */
    return EVP_CIPHER_CTX_get0_cipher(ctx) == cipher ? NULL : cipher;
}

/* Bumped in every forked child, so a pool filled before fork() is thrown
 * away without a getpid() system call per draw. */
static volatile unsigned long fork_generation = 1;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void) { fork_generation++; }
static void register_atfork(void) { (void)pthread_atfork(NULL, NULL, on_fork_child); }

int scx_rnd_public(scx_rndpool *p, uint8_t *out, size_t len)
{
    if (len > sizeof p->buf)
        return RAND_bytes(out, (int)len) == 1 ? 0 : SOFTCXI_ECRYPTO;
    if (p->generation == 0)
        (void)pthread_once(&atfork_once, register_atfork);
    /* A forked child must never replay its parent's salts or IVs. */
    if (p->generation != fork_generation || p->pos + len > sizeof p->buf) {
        if (RAND_bytes(p->buf, (int)sizeof p->buf) != 1)
            return SOFTCXI_ECRYPTO;
        p->pos = 0;
        p->generation = fork_generation;
    }
    memcpy(out, p->buf + p->pos, len);
    /* Used bytes are zeroed so the pool never hands the same value twice. */
    memset(p->buf + p->pos, 0, len);
    p->pos += len;
    return 0;
}

int scx_scrypt(uint8_t *out, size_t out_len, const char *password, const uint8_t *salt,
               size_t salt_len, unsigned cost)
{
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, OSSL_KDF_NAME_SCRYPT, NULL);
    EVP_KDF_CTX *c = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
    uint64_t n = (uint64_t)1 << cost;
    /* scrypt needs 128 * r * N bytes (and a little more): allow exactly that. */
    uint64_t maxmem = 128u * 8u * (n + 2) + ((uint64_t)1 << 20);
    uint32_t r = 8, p = 1;
    OSSL_PARAM params[7];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_PASSWORD,
                                                  (void *)(uintptr_t)password, strlen(password));
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)(uintptr_t)salt,
                                                  salt_len);
    params[2] = OSSL_PARAM_construct_uint64(OSSL_KDF_PARAM_SCRYPT_N, &n);
    params[3] = OSSL_PARAM_construct_uint32(OSSL_KDF_PARAM_SCRYPT_R, &r);
    params[4] = OSSL_PARAM_construct_uint32(OSSL_KDF_PARAM_SCRYPT_P, &p);
    params[5] = OSSL_PARAM_construct_uint64(OSSL_KDF_PARAM_SCRYPT_MAXMEM, &maxmem);
    params[6] = OSSL_PARAM_construct_end();
    int ok = c && EVP_KDF_derive(c, out, out_len, params) == 1;
    EVP_KDF_CTX_free(c);
    EVP_KDF_free(kdf);
    return ok ? 0 : SOFTCXI_ECRYPTO;
}
