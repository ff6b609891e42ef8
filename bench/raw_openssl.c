/*
 * raw_openssl.c - the raw OpenSSL 3 reference: the work softcxi cannot
 * avoid, done with bare EVP calls and nothing else.
 *
 * softcxi's benchmarks compare their per-operation cost against these
 * numbers, so each case mirrors what softcxi does internally, minus
 * softcxi: keygen and export of the key as bytes (what softcxi seals),
 * sign and verify with a long-lived key, opening a key from raw parameters
 * and signing, AES-256-GCM sealing with a reused context.
 *
 * Build: bench/run builds it (build-bench/bench_raw_openssl), or
 *   gcc -O2 -pthread -o /tmp/raw_openssl bench/raw_openssl.c -lcrypto
 * Usage: bench_raw_openssl [--threads N] SECONDS [CASE...]
 *        bench_raw_openssl --ops N [CASE...]
 *   SECONDS per case (RSA key generation gets 4x: one op takes 50-250 ms);
 *   --threads N runs every case on N threads at once, each with its own
 *   keys and contexts, and reports their combined rate.
 *   --ops N runs exactly N operations of each case on this thread, with no
 *   clock and no warm-up, and prints `raw <case> ops <N>`: for counting
 *   instructions under callgrind (bench/icount), where time means nothing.
 * Output, one line per case:
 *   raw <case> <ops_per_s_wall> <ops_per_s_cpu> <peak_rss_kib>
 * ops_per_s_wall counts CLOCK_MONOTONIC, ops_per_s_cpu the process's CPU
 * time (all threads) over the same interval; with one thread the two differ
 * by the time the scheduler took the CPU away.  peak_rss_kib is VmHWM,
 * reset before the case through /proc/self/clear_refs (0 if unavailable).
 * With N threads the case is named <case>_<N>t.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <openssl/rsa.h>
#include <openssl/bn.h>
#include <openssl/rand.h>
#include <openssl/err.h>

static void die(const char *what)
{
    fprintf(stderr, "raw_openssl: %s failed\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}
#define CHECK(cond, what) do { if (!(cond)) die(what); } while (0)

static double clock_s(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static double now_s(void) { return clock_s(CLOCK_MONOTONIC); }

/* ---- peak RSS per case --------------------------------------------------- */

static void rss_reset(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f); /* 5: reset the peak resident set size to the current one */
        fclose(f);
    }
}

static long rss_peak_kib(void)
{
    char line[256];
    long kib = 0;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld", &kib) == 1) break;
    fclose(f);
    return kib;
}

/* ---- per-thread state, set up outside the timed loops -------------------- */

typedef struct {
    EVP_PKEY_CTX *kg_p256, *kg_p384, *kg_ed25519; /* reused keygen contexts */
    EVP_PKEY_CTX *fd_ec;                          /* reused fromdata context */
    EVP_PKEY *p256, *p384, *ed25519, *rsa2048;    /* long-lived keys */
    EVP_CIPHER_CTX *gcm;
    unsigned char p256_priv_be[32], p256_pub[65];
    unsigned char msg[32];
    unsigned char pt[256], ct[256], tag[16], iv[12];
    unsigned char sig[512];
    size_t siglen, p256_siglen, ed_siglen;
    unsigned char p256_sig[72], ed_sig[64];
} state;

static EVP_PKEY_CTX *keygen_ctx(const char *type, const char *group)
{
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(NULL, type, NULL);
    CHECK(c != NULL, "EVP_PKEY_CTX_new_from_name");
    CHECK(EVP_PKEY_keygen_init(c) == 1, "EVP_PKEY_keygen_init");
    if (group) CHECK(EVP_PKEY_CTX_set_group_name(c, group) == 1, "set group");
    return c;
}

static EVP_PKEY *keygen(EVP_PKEY_CTX *c)
{
    EVP_PKEY *pkey = NULL;
    CHECK(EVP_PKEY_keygen(c, &pkey) == 1, "EVP_PKEY_keygen");
    return pkey;
}

/* the private scalar as fixed-length big-endian bytes, as softcxi takes it */
static void export_ec(const EVP_PKEY *pkey, unsigned char *pub, size_t publen,
                      unsigned char *priv, int privlen)
{
    size_t got = 0;
    BIGNUM *d = NULL;
    CHECK(EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_PUB_KEY, pub, publen, &got) == 1 &&
          got == publen, "get PUB_KEY");
    CHECK(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_PRIV_KEY, &d) == 1, "get PRIV_KEY");
    CHECK(BN_bn2binpad(d, priv, privlen) == privlen, "BN_bn2binpad");
    BN_clear_free(d);
}

static void sign_with(state *s, EVP_PKEY *pkey, const char *md, unsigned char *sig, size_t cap,
                      size_t *siglen)
{
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    CHECK(mctx != NULL, "EVP_MD_CTX_new");
    CHECK(EVP_DigestSignInit_ex(mctx, NULL, md, NULL, NULL, pkey, NULL) == 1, "EVP_DigestSignInit_ex");
    *siglen = cap;
    CHECK(EVP_DigestSign(mctx, sig, siglen, s->msg, sizeof s->msg) == 1, "EVP_DigestSign");
    EVP_MD_CTX_free(mctx);
}

static int verify_with(state *s, EVP_PKEY *pkey, const char *md, const unsigned char *sig,
                       size_t siglen)
{
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    int ok;
    CHECK(mctx != NULL, "EVP_MD_CTX_new");
    CHECK(EVP_DigestVerifyInit_ex(mctx, NULL, md, NULL, NULL, pkey, NULL) == 1,
          "EVP_DigestVerifyInit_ex");
    ok = EVP_DigestVerify(mctx, sig, siglen, s->msg, sizeof s->msg) == 1;
    EVP_MD_CTX_free(mctx);
    return ok;
}

/* OSSL_PARAM BN buffers are native-endian, so softcxi's big-endian scalar
 * must be flipped on little-endian hosts; that flip is part of the cost. */
static EVP_PKEY *p256_from_raw(state *s)
{
    static const uint16_t one = 1;
    unsigned char priv_native[32];
    char group[] = "prime256v1";
    OSSL_PARAM params[4];
    EVP_PKEY *pkey = NULL;
    size_t i;

    if (*(const unsigned char *)&one == 1)
        for (i = 0; i < 32; i++) priv_native[i] = s->p256_priv_be[31 - i];
    else
        memcpy(priv_native, s->p256_priv_be, 32);
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0);
    params[1] = OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_PRIV_KEY, priv_native, 32);
    params[2] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, s->p256_pub, 65);
    params[3] = OSSL_PARAM_construct_end();
    CHECK(EVP_PKEY_fromdata(s->fd_ec, &pkey, EVP_PKEY_KEYPAIR, params) == 1, "EVP_PKEY_fromdata");
    OPENSSL_cleanse(priv_native, sizeof priv_native);
    return pkey;
}

static int need_rsa; /* the long-lived RSA key is made only for rsa2048_sign */

static void state_init(state *s)
{
    EVP_PKEY_CTX *c;
    unsigned char key[32];
    memset(s, 0, sizeof *s);
    CHECK(RAND_bytes(s->msg, (int)sizeof s->msg) == 1, "RAND_bytes");
    CHECK(RAND_bytes(s->pt, (int)sizeof s->pt) == 1, "RAND_bytes");
    CHECK(RAND_bytes(s->iv, (int)sizeof s->iv) == 1, "RAND_bytes");
    CHECK(RAND_bytes(key, (int)sizeof key) == 1, "RAND_bytes");

    s->kg_p256 = keygen_ctx("EC", "P-256");
    s->kg_p384 = keygen_ctx("EC", "P-384");
    s->kg_ed25519 = keygen_ctx("ED25519", NULL);
    s->fd_ec = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    CHECK(s->fd_ec != NULL && EVP_PKEY_fromdata_init(s->fd_ec) == 1, "EVP_PKEY_fromdata_init");

    s->p256 = keygen(s->kg_p256);
    export_ec(s->p256, s->p256_pub, 65, s->p256_priv_be, 32);
    s->p384 = keygen(s->kg_p384);
    s->ed25519 = keygen(s->kg_ed25519);
    if (need_rsa) { /* 50-250 ms: only when a case uses it */
        c = keygen_ctx("RSA", NULL);
        CHECK(EVP_PKEY_CTX_set_rsa_keygen_bits(c, 2048) == 1, "RSA bits");
        s->rsa2048 = keygen(c);
        EVP_PKEY_CTX_free(c);
    }

    s->gcm = EVP_CIPHER_CTX_new();
    CHECK(s->gcm != NULL, "EVP_CIPHER_CTX_new");
    {
        EVP_CIPHER *aes = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
        CHECK(aes != NULL, "EVP_CIPHER_fetch(AES-256-GCM)");
        CHECK(EVP_EncryptInit_ex(s->gcm, aes, NULL, key, NULL) == 1, "EVP_EncryptInit_ex(key)");
        EVP_CIPHER_free(aes);
    }
    OPENSSL_cleanse(key, sizeof key);

    /* signatures for the verify cases; a fast benchmark of a broken
     * signature path would be meaningless, so check both sign paths */
    sign_with(s, s->p256, "SHA256", s->p256_sig, sizeof s->p256_sig, &s->p256_siglen);
    CHECK(verify_with(s, s->p256, "SHA256", s->p256_sig, s->p256_siglen), "verify p256_sign");
    {
        EVP_PKEY *k = p256_from_raw(s);
        sign_with(s, k, "SHA256", s->sig, sizeof s->sig, &s->siglen);
        EVP_PKEY_free(k);
        CHECK(verify_with(s, s->p256, "SHA256", s->sig, s->siglen), "verify p256_open_sign");
    }
    sign_with(s, s->ed25519, NULL, s->ed_sig, sizeof s->ed_sig, &s->ed_siglen);
    CHECK(verify_with(s, s->ed25519, NULL, s->ed_sig, s->ed_siglen), "verify ed25519_sign");
}

static void state_free(state *s)
{
    OPENSSL_cleanse(s->p256_priv_be, sizeof s->p256_priv_be);
    EVP_CIPHER_CTX_free(s->gcm);
    EVP_PKEY_free(s->p256);
    EVP_PKEY_free(s->p384);
    EVP_PKEY_free(s->ed25519);
    EVP_PKEY_free(s->rsa2048);
    EVP_PKEY_CTX_free(s->kg_p256);
    EVP_PKEY_CTX_free(s->kg_p384);
    EVP_PKEY_CTX_free(s->kg_ed25519);
    EVP_PKEY_CTX_free(s->fd_ec);
}

/* ---- the timed operations ------------------------------------------------ */

static void op_p256_keygen(state *s)
{
    EVP_PKEY_free(keygen(s->kg_p256));
}

static void op_p256_keygen_export(state *s)
{
    unsigned char pub[65], priv[32];
    EVP_PKEY *pkey = keygen(s->kg_p256);
    export_ec(pkey, pub, sizeof pub, priv, (int)sizeof priv);
    OPENSSL_cleanse(priv, sizeof priv);
    EVP_PKEY_free(pkey);
}

static void op_p384_keygen_export(state *s)
{
    unsigned char pub[97], priv[48];
    EVP_PKEY *pkey = keygen(s->kg_p384);
    export_ec(pkey, pub, sizeof pub, priv, (int)sizeof priv);
    OPENSSL_cleanse(priv, sizeof priv);
    EVP_PKEY_free(pkey);
}

static void op_ed25519_keygen_export(state *s)
{
    unsigned char pub[32], priv[32];
    size_t publen = sizeof pub, privlen = sizeof priv;
    EVP_PKEY *pkey = keygen(s->kg_ed25519);
    CHECK(EVP_PKEY_get_raw_public_key(pkey, pub, &publen) == 1 &&
          EVP_PKEY_get_raw_private_key(pkey, priv, &privlen) == 1, "Ed25519 export");
    OPENSSL_cleanse(priv, sizeof priv);
    EVP_PKEY_free(pkey);
}

/* A new context per key, as softcxi makes one (RSA keygen is 1000x the
 * context's cost); the export is n, e and the six private parts as bytes. */
static void op_rsa2048_keygen_export(state *s)
{
    static const char *const parts[] = {
        OSSL_PKEY_PARAM_RSA_N, OSSL_PKEY_PARAM_RSA_E, OSSL_PKEY_PARAM_RSA_D,
        OSSL_PKEY_PARAM_RSA_FACTOR1, OSSL_PKEY_PARAM_RSA_FACTOR2, OSSL_PKEY_PARAM_RSA_EXPONENT1,
        OSSL_PKEY_PARAM_RSA_EXPONENT2, OSSL_PKEY_PARAM_RSA_COEFFICIENT1,
    };
    unsigned char buf[8 * 256];
    size_t i, off = 0;
    EVP_PKEY_CTX *c = keygen_ctx("RSA", NULL);
    EVP_PKEY *pkey;
    (void)s;
    CHECK(EVP_PKEY_CTX_set_rsa_keygen_bits(c, 2048) == 1, "RSA bits");
    pkey = keygen(c);
    EVP_PKEY_CTX_free(c);
    for (i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        BIGNUM *bn = NULL;
        CHECK(EVP_PKEY_get_bn_param(pkey, parts[i], &bn) == 1, "RSA export");
        off += (size_t)BN_bn2bin(bn, buf + off);
        BN_clear_free(bn);
    }
    OPENSSL_cleanse(buf, off);
    EVP_PKEY_free(pkey);
}

static void op_aes256_keygen(state *s)
{
    unsigned char key[32];
    (void)s;
    CHECK(RAND_priv_bytes(key, (int)sizeof key) == 1, "RAND_priv_bytes");
    OPENSSL_cleanse(key, sizeof key);
}

static void op_p256_sign(state *s)
{
    sign_with(s, s->p256, "SHA256", s->sig, sizeof s->sig, &s->siglen);
}

static void op_p256_open_sign(state *s)
{
    EVP_PKEY *pkey = p256_from_raw(s);
    sign_with(s, pkey, "SHA256", s->sig, sizeof s->sig, &s->siglen);
    EVP_PKEY_free(pkey);
}

static void op_p256_verify(state *s)
{
    CHECK(verify_with(s, s->p256, "SHA256", s->p256_sig, s->p256_siglen), "p256 verify");
}

static void op_p384_sign(state *s)
{
    sign_with(s, s->p384, "SHA384", s->sig, sizeof s->sig, &s->siglen);
}

static void op_ed25519_sign(state *s)
{
    sign_with(s, s->ed25519, NULL, s->sig, sizeof s->sig, &s->siglen);
}

static void op_rsa2048_sign(state *s)
{
    sign_with(s, s->rsa2048, "SHA256", s->sig, sizeof s->sig, &s->siglen);
}

static void op_aes256gcm_seal_256(state *s)
{
    int len = 0, fin = 0;
    size_t i;
    /* A counter IV keeps every op a distinct (key, IV) pair without RNG cost. */
    for (i = sizeof s->iv; i-- > 0; )
        if (++s->iv[i] != 0) break;
    CHECK(EVP_EncryptInit_ex(s->gcm, NULL, NULL, NULL, s->iv) == 1, "EVP_EncryptInit_ex(iv)");
    CHECK(EVP_EncryptUpdate(s->gcm, s->ct, &len, s->pt, (int)sizeof s->pt) == 1, "EVP_EncryptUpdate");
    CHECK(EVP_EncryptFinal_ex(s->gcm, s->ct + len, &fin) == 1, "EVP_EncryptFinal_ex");
    CHECK(len + fin == (int)sizeof s->pt, "GCM length");
    CHECK(EVP_CIPHER_CTX_ctrl(s->gcm, EVP_CTRL_GCM_GET_TAG, (int)sizeof s->tag, s->tag) == 1,
          "GCM get tag");
}

static void op_rand_24(state *s)
{
    unsigned char buf[24];
    (void)s;
    CHECK(RAND_bytes(buf, (int)sizeof buf) == 1, "RAND_bytes");
}

typedef struct {
    const char *name;
    void (*op)(state *);
    double weight; /* times SECONDS */
} bench_case;

static const bench_case cases[] = {
    { "p256_keygen", op_p256_keygen, 1 },
    { "p256_keygen_export", op_p256_keygen_export, 1 },
    { "p384_keygen_export", op_p384_keygen_export, 1 },
    { "ed25519_keygen_export", op_ed25519_keygen_export, 1 },
    { "rsa2048_keygen_export", op_rsa2048_keygen_export, 4 },
    { "aes256_keygen", op_aes256_keygen, 1 },
    { "p256_sign", op_p256_sign, 1 },
    { "p256_open_sign", op_p256_open_sign, 1 },
    { "p256_verify", op_p256_verify, 1 },
    { "p384_sign", op_p384_sign, 1 },
    { "ed25519_sign", op_ed25519_sign, 1 },
    { "rsa2048_sign", op_rsa2048_sign, 1 },
    { "aes256gcm_seal_256", op_aes256gcm_seal_256, 1 },
    { "rand_24", op_rand_24, 1 },
};
#define NCASES (sizeof cases / sizeof cases[0])

/* ---- the timing loop ----------------------------------------------------- */

typedef struct {
    state st;
    pthread_t tid;
    const bench_case *c;
    double secs, t_end;
    unsigned long n;
} worker;

/* ready: every thread is warm; go: the clock has started (t_start) */
static pthread_barrier_t ready, go;
static double t_start;

/* The clock is read after every block of ops; the block doubles up to 4096
 * while a block takes under 1 ms, so that sub-microsecond ops are not
 * distorted by the clock and 100 ms ops do not overrun the time. */
static unsigned long timed_loop(worker *w, double end, double *t_end)
{
    unsigned long n = 0, block = 1, i;
    double t0 = now_s(), t;
    do {
        for (i = 0; i < block; i++) w->c->op(&w->st);
        n += block;
        t = now_s();
        if (t - t0 < 1e-3 && block < 4096) block *= 2;
        t0 = t;
    } while (t < end);
    *t_end = t;
    return n;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    double warm = w->secs * 0.1 > 0.02 ? w->secs * 0.1 : 0.02, t;
    /* warm-up: fills provider/method caches and lets the CPU clock settle */
    timed_loop(w, now_s() + warm, &t);
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&go);
    w->n = timed_loop(w, t_start + w->secs, &w->t_end);
    return NULL;
}

static void run_case(worker *ws, int nthreads, const bench_case *c, double secs)
{
    unsigned long n = 0;
    double wall = 0, cpu, c0;
    int i;
    char name[64];

    rss_reset();
    CHECK(pthread_barrier_init(&ready, NULL, (unsigned)nthreads + 1) == 0, "pthread_barrier_init");
    CHECK(pthread_barrier_init(&go, NULL, (unsigned)nthreads + 1) == 0, "pthread_barrier_init");
    for (i = 0; i < nthreads; i++) {
        ws[i].c = c;
        ws[i].secs = secs * c->weight;
        CHECK(pthread_create(&ws[i].tid, NULL, worker_main, &ws[i]) == 0, "pthread_create");
    }
    pthread_barrier_wait(&ready);
    t_start = now_s();
    c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID);
    pthread_barrier_wait(&go);
    for (i = 0; i < nthreads; i++) {
        pthread_join(ws[i].tid, NULL);
        n += ws[i].n;
        if (ws[i].t_end - t_start > wall) wall = ws[i].t_end - t_start;
    }
    cpu = clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0;
    pthread_barrier_destroy(&ready);
    pthread_barrier_destroy(&go);
    if (nthreads > 1)
        snprintf(name, sizeof name, "%s_%dt", c->name, nthreads);
    else
        snprintf(name, sizeof name, "%s", c->name);
    printf("raw %s %.1f %.1f %ld\n", name, (double)n / wall, (double)n / cpu, rss_peak_kib());
    fflush(stdout);
}

/* --ops: exactly n operations, for instruction counts */
static void count_case(worker *w, const bench_case *c, unsigned long n)
{
    for (unsigned long i = 0; i < n; i++) c->op(&w->st);
    printf("raw %s ops %lu\n", c->name, n);
    fflush(stdout);
}

static void usage(void)
{
    size_t i;
    fprintf(stderr, "usage: bench_raw_openssl [--threads N] SECONDS [CASE...]\n"
                    "       bench_raw_openssl --ops N [CASE...]\ncases:");
    for (i = 0; i < NCASES; i++) fprintf(stderr, " %s", cases[i].name);
    fprintf(stderr, "\n");
    exit(2);
}

int main(int argc, char **argv)
{
    double secs = 0;
    unsigned long ops = 0;
    int nthreads = 1, a = 1, i;
    char *endp;
    worker *ws;
    size_t k;

    if (a + 1 < argc && strcmp(argv[a], "--ops") == 0) {
        long long o = strtoll(argv[a + 1], &endp, 10);
        if (*endp != '\0' || o < 1) usage();
        ops = (unsigned long)o;
        a += 1; /* argv[a] is now the count: the cases follow it, as they follow SECONDS */
    } else {
        if (a + 1 < argc && strcmp(argv[a], "--threads") == 0) {
            long t = strtol(argv[a + 1], &endp, 10);
            if (*endp != '\0' || t < 1 || t > 64) usage();
            nthreads = (int)t;
            a += 2;
        }
        if (a >= argc) usage();
        secs = strtod(argv[a], &endp);
        if (*endp != '\0' || !(secs > 0.0)) usage();
    }
    for (i = a + 1; i < argc; i++) {
        for (k = 0; k < NCASES && strcmp(argv[i], cases[k].name) != 0; k++) {}
        if (k == NCASES) {
            fprintf(stderr, "bench_raw_openssl: unknown case '%s'\n", argv[i]);
            usage();
        }
    }

    need_rsa = a + 1 >= argc;
    for (i = a + 1; i < argc; i++)
        if (strcmp(argv[i], "rsa2048_sign") == 0) need_rsa = 1;
    ws = calloc((size_t)nthreads, sizeof *ws);
    CHECK(ws != NULL, "calloc");
    for (i = 0; i < nthreads; i++) state_init(&ws[i].st);

    /* cases in the order given, or all in table order */
    if (a + 1 < argc) {
        for (i = a + 1; i < argc; i++)
            for (k = 0; k < NCASES; k++)
                if (strcmp(argv[i], cases[k].name) == 0) {
                    if (ops) count_case(&ws[0], &cases[k], ops);
                    else run_case(ws, nthreads, &cases[k], secs);
                }
    } else {
        for (k = 0; k < NCASES; k++) {
            if (ops) count_case(&ws[0], &cases[k], ops);
            else run_case(ws, nthreads, &cases[k], secs);
        }
    }

    for (i = 0; i < nthreads; i++) state_free(&ws[i].st);
    free(ws);
    return 0;
}
