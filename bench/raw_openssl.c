/*
 * raw_openssl.c - baseline benchmark of raw OpenSSL 3 EVP costs.
 *
 * softcxi's own benchmark compares its per-operation cost against these
 * numbers, so each case mirrors what softcxi does internally, minus softcxi.
 *
 * Build: gcc -O2 -Wall -Wextra -Wpedantic -Wconversion \
 *            -o /tmp/raw_openssl bench/raw_openssl.c -lcrypto
 * Usage: raw_openssl [SECONDS_PER_CASE]   (default 1.0)
 * Output, one line per case: raw <case> <ops_per_second> <microseconds_per_op>
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <openssl/param_build.h>
#include <openssl/bn.h>
#include <openssl/rand.h>
#include <openssl/err.h>

/* Reading the clock every iteration would distort the sub-microsecond cases. */
#define CLOCK_CHECK_EVERY 256

static void die(const char *what)
{
    fprintf(stderr, "raw_openssl: %s failed\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}
#define CHECK(cond, what) do { if (!(cond)) die(what); } while (0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- shared state, set up once outside the timed loops ---- */
static EVP_PKEY_CTX *g_kgctx;     /* reused keygen ctx (P-256) */
static EVP_PKEY_CTX *g_fdctx;     /* reused fromdata ctx (EC) */
static EVP_PKEY *g_p256;          /* long-lived key for p256_sign */
static EVP_PKEY *g_ed25519;
static EVP_CIPHER_CTX *g_gcm;
static unsigned char g_priv_be[32], g_pub[65];   /* raw form of g_p256 */
static unsigned char g_msg[32];
static unsigned char g_pt[256], g_ct[256], g_tag[16], g_iv[12];
static unsigned char g_sig[72];
static size_t g_siglen;

static EVP_PKEY *p256_keygen_once(void)
{
    EVP_PKEY *pkey = NULL;
    CHECK(EVP_PKEY_keygen(g_kgctx, &pkey) == 1, "EVP_PKEY_keygen");
    return pkey;
}

static void export_raw(const EVP_PKEY *pkey, unsigned char pub[65], unsigned char priv[32])
{
    size_t publen = 0;
    BIGNUM *d = NULL;
    CHECK(EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_PUB_KEY,
                                          pub, 65, &publen) == 1 && publen == 65,
          "get PUB_KEY");
    CHECK(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_PRIV_KEY, &d) == 1, "get PRIV_KEY");
    CHECK(BN_bn2binpad(d, priv, 32) == 32, "BN_bn2binpad");
    BN_clear_free(d);
}

static void sign_with(EVP_PKEY *pkey, const char *md, unsigned char *sig, size_t *siglen)
{
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    CHECK(mctx != NULL, "EVP_MD_CTX_new");
    CHECK(EVP_DigestSignInit_ex(mctx, NULL, md, NULL, NULL, pkey, NULL) == 1,
          "EVP_DigestSignInit_ex");
    *siglen = sizeof g_sig;
    CHECK(EVP_DigestSign(mctx, sig, siglen, g_msg, sizeof g_msg) == 1, "EVP_DigestSign");
    EVP_MD_CTX_free(mctx);
}

static void verify_with(EVP_PKEY *pkey, const unsigned char *sig, size_t siglen, const char *what)
{
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    CHECK(mctx != NULL, "EVP_MD_CTX_new");
    CHECK(EVP_DigestVerifyInit_ex(mctx, NULL, "SHA256", NULL, NULL, pkey, NULL) == 1,
          "EVP_DigestVerifyInit_ex");
    if (EVP_DigestVerify(mctx, sig, siglen, g_msg, sizeof g_msg) != 1)
        die(what);
    EVP_MD_CTX_free(mctx);
}

/* OSSL_PARAM BN buffers are native-endian, so softcxi's big-endian scalar
 * must be flipped on little-endian hosts; that flip is part of the cost. */
static EVP_PKEY *p256_from_raw(const unsigned char priv_be[32], const unsigned char pub[65])
{
    static const uint16_t one = 1;
    unsigned char priv_native[32];
    char group[] = "prime256v1";
    OSSL_PARAM params[4];
    EVP_PKEY *pkey = NULL;
    size_t i;

    if (*(const unsigned char *)&one == 1)
        for (i = 0; i < 32; i++) priv_native[i] = priv_be[31 - i];
    else
        memcpy(priv_native, priv_be, 32);

    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0);
    params[1] = OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_PRIV_KEY, priv_native, 32);
    params[2] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)pub, 65);
    params[3] = OSSL_PARAM_construct_end();
    CHECK(EVP_PKEY_fromdata(g_fdctx, &pkey, EVP_PKEY_KEYPAIR, params) == 1, "EVP_PKEY_fromdata");
    OPENSSL_cleanse(priv_native, sizeof priv_native);
    return pkey;
}

/* ---- the timed operations ---- */
static void op_p256_keygen(void)
{
    EVP_PKEY_free(p256_keygen_once());
}

static void op_p256_keygen_export(void)
{
    unsigned char pub[65], priv[32];
    EVP_PKEY *pkey = p256_keygen_once();
    export_raw(pkey, pub, priv);
    OPENSSL_cleanse(priv, sizeof priv);
    EVP_PKEY_free(pkey);
}

static void op_p256_sign(void)
{
    sign_with(g_p256, "SHA256", g_sig, &g_siglen);
}

static void op_p256_open_sign(void)
{
    EVP_PKEY *pkey = p256_from_raw(g_priv_be, g_pub);
    sign_with(pkey, "SHA256", g_sig, &g_siglen);
    EVP_PKEY_free(pkey);
}

static void op_ed25519_sign(void)
{
    sign_with(g_ed25519, NULL, g_sig, &g_siglen);
}

static void op_aes256gcm_seal_256(void)
{
    int len = 0, fin = 0;
    size_t i;
    /* A counter IV keeps every op a distinct (key, IV) pair without RNG cost. */
    for (i = sizeof g_iv; i-- > 0; )
        if (++g_iv[i] != 0) break;
    CHECK(EVP_EncryptInit_ex(g_gcm, NULL, NULL, NULL, g_iv) == 1, "EVP_EncryptInit_ex(iv)");
    CHECK(EVP_EncryptUpdate(g_gcm, g_ct, &len, g_pt, (int)sizeof g_pt) == 1, "EVP_EncryptUpdate");
    CHECK(EVP_EncryptFinal_ex(g_gcm, g_ct + len, &fin) == 1, "EVP_EncryptFinal_ex");
    CHECK(len + fin == (int)sizeof g_pt, "GCM length");
    CHECK(EVP_CIPHER_CTX_ctrl(g_gcm, EVP_CTRL_GCM_GET_TAG, (int)sizeof g_tag, g_tag) == 1,
          "GCM get tag");
}

static void op_rand_24(void)
{
    unsigned char buf[24];
    CHECK(RAND_bytes(buf, (int)sizeof buf) == 1, "RAND_bytes");
}

static void run_case(const char *name, void (*op)(void), double secs)
{
    unsigned long n = 0, i;
    double t0, end, elapsed;

    /* Warm-up fills provider/method caches and lets the CPU clock settle. */
    end = now_s() + (secs * 0.1 > 0.02 ? secs * 0.1 : 0.02);
    do {
        for (i = 0; i < 16; i++) op();
    } while (now_s() < end);

    t0 = now_s();
    end = t0 + secs;
    do {
        for (i = 0; i < CLOCK_CHECK_EVERY; i++) op();
        n += CLOCK_CHECK_EVERY;
    } while (now_s() < end);
    elapsed = now_s() - t0;

    printf("raw %s %.1f %.2f\n", name, (double)n / elapsed, elapsed * 1e6 / (double)n);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    double secs = 1.0;
    EVP_CIPHER *aes;
    unsigned char key[32];

    if (argc > 1) {
        char *endp;
        secs = strtod(argv[1], &endp);
        if (*endp != '\0' || !(secs > 0.0)) {
            fprintf(stderr, "usage: %s [SECONDS_PER_CASE]\n", argv[0]);
            return 2;
        }
    }

    CHECK(RAND_bytes(g_msg, (int)sizeof g_msg) == 1, "RAND_bytes");
    CHECK(RAND_bytes(g_pt, (int)sizeof g_pt) == 1, "RAND_bytes");
    CHECK(RAND_bytes(g_iv, (int)sizeof g_iv) == 1, "RAND_bytes");
    CHECK(RAND_bytes(key, (int)sizeof key) == 1, "RAND_bytes");

    g_kgctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    CHECK(g_kgctx != NULL, "EVP_PKEY_CTX_new_from_name(EC)");
    CHECK(EVP_PKEY_keygen_init(g_kgctx) == 1, "EVP_PKEY_keygen_init");
    CHECK(EVP_PKEY_CTX_set_group_name(g_kgctx, "P-256") == 1, "set group P-256");

    g_fdctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    CHECK(g_fdctx != NULL, "EVP_PKEY_CTX_new_from_name(EC)");
    CHECK(EVP_PKEY_fromdata_init(g_fdctx) == 1, "EVP_PKEY_fromdata_init");

    g_p256 = p256_keygen_once();
    export_raw(g_p256, g_pub, g_priv_be);
    CHECK(g_pub[0] == 0x04, "uncompressed public point");

    g_ed25519 = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    CHECK(g_ed25519 != NULL, "Ed25519 keygen");

    aes = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    CHECK(aes != NULL, "EVP_CIPHER_fetch(AES-256-GCM)");
    g_gcm = EVP_CIPHER_CTX_new();
    CHECK(g_gcm != NULL, "EVP_CIPHER_CTX_new");
    CHECK(EVP_EncryptInit_ex(g_gcm, aes, NULL, key, NULL) == 1, "EVP_EncryptInit_ex(key)");
    OPENSSL_cleanse(key, sizeof key);

    /* A fast benchmark of a broken signature path would be meaningless. */
    op_p256_sign();
    verify_with(g_p256, g_sig, g_siglen, "verify p256_sign signature");
    op_p256_open_sign();
    verify_with(g_p256, g_sig, g_siglen, "verify p256_open_sign signature");

    run_case("p256_keygen", op_p256_keygen, secs);
    run_case("p256_keygen_export", op_p256_keygen_export, secs);
    run_case("p256_sign", op_p256_sign, secs);
    run_case("p256_open_sign", op_p256_open_sign, secs);
    run_case("ed25519_sign", op_ed25519_sign, secs);
    run_case("aes256gcm_seal_256", op_aes256gcm_seal_256, secs);
    run_case("rand_24", op_rand_24, secs);

    OPENSSL_cleanse(g_priv_be, sizeof g_priv_be);
    EVP_CIPHER_CTX_free(g_gcm);
    EVP_CIPHER_free(aes);
    EVP_PKEY_free(g_ed25519);
    EVP_PKEY_free(g_p256);
    EVP_PKEY_CTX_free(g_fdctx);
    EVP_PKEY_CTX_free(g_kgctx);
    return 0;
}
