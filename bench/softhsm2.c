/*
 * softhsm2.c - the SoftHSMv2 reference: what the software HSM people use
 * today costs for the operations softcxi is compared on, measured through
 * PKCS#11 inside one logged-in session.
 *
 * The module is dlopen()ed (default /usr/lib/softhsm/libsofthsm2.so, Debian
 * softhsm2); pkcs11.h comes from p11-kit (libp11-kit-dev).  A fresh token
 * lives in a temporary directory (SOFTHSM2_CONF points at a config written
 * there, file object store), is initialised with C_InitToken / C_InitPIN,
 * and is removed at the end.  One session is opened and the user logged in
 * once; nothing below counts the login.
 *
 * Usage: bench_softhsm2 [--module PATH] [--find N[,N...]] SECONDS [CASE...]
 *   cases (default: all):
 *     ec_keygen_token    C_GenerateKeyPair P-256, both halves token objects
 *     ec_keygen_session  the same as session objects (destroyed, untimed,
 *                        after each block so the session does not grow)
 *     ecdsa_sign         C_SignInit + C_Sign, CKM_ECDSA_SHA256, token key,
 *                        32-byte message
 *     rsa2048_sign       the same with CKM_SHA256_RSA_PKCS, RSA-2048
 *     find_label         C_FindObjectsInit(CKA_LABEL) + C_FindObjects +
 *                        C_FindObjectsFinal for one label, after the token
 *                        has been filled with token objects (EC public
 *                        keys, each with its own label) up to each N of
 *                        --find (default 1000,10000); one line per N
 * Output, one line per case (the shape of bench_raw_openssl's):
 *   softhsm2 <case> <ops_per_s_wall> <ops_per_s_cpu> <peak_rss_kib>
 * plus `info softhsm2 <library description> <version>` and
 * `info softhsm2_fill <N> <objects_per_second>` for each fill step.
 * Timing: CLOCK_MONOTONIC (wall: token operations wait for the file
 * system, which CPU time would not see) and the process's CPU time over the
 * same interval.  Peak RSS: VmHWM, reset per case via /proc/self/clear_refs.
 * Exit status: 0, 1 on any failure, 2 on bad usage, 3 when the module
 * cannot be loaded (bench/run reports SoftHSMv2 as missing).
 */
#define _POSIX_C_SOURCE 200809L
#define _XOPEN_SOURCE 700
#include <dlfcn.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>
#include <p11-kit/pkcs11.h>

#define SO_PIN "12345678"
#define USER_PIN "1234"
#define TOKEN_LABEL "softcxi-bench"

static CK_FUNCTION_LIST *p11;
static CK_SESSION_HANDLE sess;
static char tmpdir[] = "/tmp/softcxi-bench-softhsm2.XXXXXX";
static int have_tmpdir;

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

static void cleanup(void)
{
    if (p11) {
        p11->C_CloseAllSessions(0); /* harmless if the slot differs; Finalize closes all */
        p11->C_Finalize(NULL);
        p11 = NULL;
    }
    if (have_tmpdir) {
        nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
        have_tmpdir = 0;
    }
}

static void die(const char *what, CK_RV rv)
{
    fprintf(stderr, "softhsm2: %s failed (CKR 0x%lx)\n", what, (unsigned long)rv);
    cleanup();
    exit(1);
}
#define P11(call, what) do { CK_RV rv_ = (call); if (rv_ != CKR_OK) die(what, rv_); } while (0)

static double clock_s(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static double now_s(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu_s(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

/* peak RSS per case: VmHWM, reset through /proc/self/clear_refs */
static void rss_reset(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
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

static void pad(CK_UTF8CHAR *dst, size_t n, const char *s)
{
    size_t len = strlen(s);
    memset(dst, ' ', n);
    memcpy(dst, s, len < n ? len : n);
}

/* ---- keys ---------------------------------------------------------------- */

/* DER of the P-256 OID, CKA_EC_PARAMS */
static CK_BYTE p256_oid[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
static CK_BBOOL yes = CK_TRUE;
static unsigned long label_seq;

static void ec_keypair(CK_BBOOL token, CK_OBJECT_HANDLE *pub, CK_OBJECT_HANDLE *priv)
{
    CK_MECHANISM mech = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    char label[32];
    CK_ATTRIBUTE pubt[] = {
        { CKA_TOKEN, &token, sizeof token },
        { CKA_EC_PARAMS, p256_oid, sizeof p256_oid },
        { CKA_VERIFY, &yes, sizeof yes },
        { CKA_LABEL, label, 0 },
    };
    CK_ATTRIBUTE privt[] = {
        { CKA_TOKEN, &token, sizeof token },
        { CKA_PRIVATE, &yes, sizeof yes },
        { CKA_SENSITIVE, &yes, sizeof yes },
        { CKA_SIGN, &yes, sizeof yes },
        { CKA_LABEL, label, 0 },
    };
    int n = snprintf(label, sizeof label, "kg-%lu", label_seq++);
    pubt[3].ulValueLen = privt[4].ulValueLen = (CK_ULONG)n;
    P11(p11->C_GenerateKeyPair(sess, &mech, pubt, 4, privt, 5, pub, priv), "C_GenerateKeyPair(EC)");
}

static CK_OBJECT_HANDLE rsa_token_key(void)
{
    CK_MECHANISM mech = { CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0 };
    CK_ULONG bits = 2048;
    CK_BYTE e[] = { 0x01, 0x00, 0x01 };
    CK_ATTRIBUTE pubt[] = {
        { CKA_TOKEN, &yes, sizeof yes },
        { CKA_MODULUS_BITS, &bits, sizeof bits },
        { CKA_PUBLIC_EXPONENT, e, sizeof e },
        { CKA_VERIFY, &yes, sizeof yes },
    };
    CK_ATTRIBUTE privt[] = {
        { CKA_TOKEN, &yes, sizeof yes },
        { CKA_PRIVATE, &yes, sizeof yes },
        { CKA_SENSITIVE, &yes, sizeof yes },
        { CKA_SIGN, &yes, sizeof yes },
    };
    CK_OBJECT_HANDLE pub, priv;
    P11(p11->C_GenerateKeyPair(sess, &mech, pubt, 4, privt, 4, &pub, &priv), "C_GenerateKeyPair(RSA)");
    return priv;
}

/* ---- the timed loop ------------------------------------------------------ */

typedef void (*op_fn)(void);

/* Every op here costs tens of microseconds or more, so the clock is read
 * after every op.  after_block, if given, runs untimed every 64 ops. */
static void run_case(const char *name, op_fn op, void (*after_block)(void), double secs)
{
    unsigned long n = 0, i = 0;
    double t0, c0, t, end, paused = 0, cpaused = 0;

    rss_reset();
    end = now_s() + (secs * 0.1 > 0.02 ? secs * 0.1 : 0.02);
    do { op(); } while (now_s() < end);
    if (after_block) after_block();

    t0 = now_s();
    c0 = cpu_s();
    end = t0 + secs;
    do {
        op();
        n++;
        t = now_s();
        if (after_block && ++i == 64) {
            double c = cpu_s();
            after_block();
            i = 0;
            cpaused += cpu_s() - c;
            paused += now_s() - t;
            end = t0 + secs + paused;
        }
    } while (t < end);
    t -= t0 + paused;
    c0 = cpu_s() - c0 - cpaused;
    if (after_block) after_block();
    printf("softhsm2 %s %.1f %.1f %ld\n", name, (double)n / t, (double)n / c0, rss_peak_kib());
    fflush(stdout);
}

/* ec_keygen_session: the session objects of the last block, destroyed untimed */
static CK_OBJECT_HANDLE sess_objs[2 * 1024];
static size_t n_sess_objs;

static void op_keygen_token(void)
{
    CK_OBJECT_HANDLE pub, priv;
    ec_keypair(CK_TRUE, &pub, &priv);
}

static void op_keygen_session(void)
{
    CK_OBJECT_HANDLE pub, priv;
    ec_keypair(CK_FALSE, &pub, &priv);
    if (n_sess_objs + 2 > sizeof sess_objs / sizeof sess_objs[0]) die("session object list", 0);
    sess_objs[n_sess_objs++] = pub;
    sess_objs[n_sess_objs++] = priv;
}

static void destroy_session_objs(void)
{
    while (n_sess_objs > 0)
        P11(p11->C_DestroyObject(sess, sess_objs[--n_sess_objs]), "C_DestroyObject");
}

static CK_OBJECT_HANDLE sign_key;
static CK_MECHANISM sign_mech;
static CK_BYTE msg[32];

static void op_sign(void)
{
    CK_BYTE sig[512];
    CK_ULONG siglen = sizeof sig;
    P11(p11->C_SignInit(sess, &sign_mech, sign_key), "C_SignInit");
    P11(p11->C_Sign(sess, msg, sizeof msg, sig, &siglen), "C_Sign");
}

static char find_label[32];

static void op_find(void)
{
    CK_ATTRIBUTE t[] = { { CKA_LABEL, find_label, strlen(find_label) } };
    CK_OBJECT_HANDLE h[4];
    CK_ULONG got = 0;
    P11(p11->C_FindObjectsInit(sess, t, 1), "C_FindObjectsInit");
    P11(p11->C_FindObjects(sess, h, 4, &got), "C_FindObjects");
    P11(p11->C_FindObjectsFinal(sess), "C_FindObjectsFinal");
    if (got != 1) die("find-by-label: not exactly one object", 0);
}

/* token objects to search among: EC public keys, each with its own label
 * ("obj-<i>"); a public key object is the cheapest key object to create */
static void fill_to(unsigned long *have, unsigned long want)
{
    static CK_BYTE point[67] = { 0x04, 0x41, 0x04 }; /* DER OCTET STRING of an uncompressed point */
    CK_OBJECT_CLASS cls = CKO_PUBLIC_KEY;
    CK_KEY_TYPE kt = CKK_EC;
    char label[32];
    CK_ATTRIBUTE t[] = {
        { CKA_CLASS, &cls, sizeof cls },
        { CKA_KEY_TYPE, &kt, sizeof kt },
        { CKA_TOKEN, &yes, sizeof yes },
        { CKA_EC_PARAMS, p256_oid, sizeof p256_oid },
        { CKA_EC_POINT, point, sizeof point },
        { CKA_LABEL, label, 0 },
    };
    CK_OBJECT_HANDLE h;
    unsigned long start = *have;
    double t0 = now_s();
    if (*have >= want) return;
    for (; *have < want; (*have)++) {
        t[5].ulValueLen = (CK_ULONG)snprintf(label, sizeof label, "obj-%lu", *have);
        /* any point will do for a search; vary it so no two objects are equal */
        memcpy(point + 3, have, sizeof *have);
        P11(p11->C_CreateObject(sess, t, 6, &h), "C_CreateObject");
    }
    printf("info softhsm2_fill %lu %.1f\n", want, (double)(want - start) / (now_s() - t0));
    fflush(stdout);
}

/* ---- setup --------------------------------------------------------------- */

static void setup(const char *module)
{
    char conf[sizeof tmpdir + 32], tokens[sizeof tmpdir + 16];
    FILE *f;
    void *lib;
    CK_C_GetFunctionList getfl;
    CK_SLOT_ID slots[64];
    CK_ULONG nslots = 64, i;
    CK_UTF8CHAR label[32];
    CK_INFO info;
    const char *tmp = getenv("TMPDIR");

    if (tmp && *tmp && strlen(tmp) < 200) {
        static char buf[256];
        snprintf(buf, sizeof buf, "%s/softcxi-bench-softhsm2.XXXXXX", tmp);
        if (!mkdtemp(buf)) { perror("softhsm2: mkdtemp"); exit(1); }
        /* keep one name: tmpdir is what cleanup removes */
        if (strlen(buf) >= sizeof tmpdir) { fprintf(stderr, "softhsm2: TMPDIR too long\n"); exit(1); }
        memcpy(tmpdir, buf, strlen(buf) + 1);
    } else if (!mkdtemp(tmpdir)) {
        perror("softhsm2: mkdtemp");
        exit(1);
    }
    have_tmpdir = 1;
    snprintf(tokens, sizeof tokens, "%s/tokens", tmpdir);
    snprintf(conf, sizeof conf, "%s/softhsm2.conf", tmpdir);
    if (mkdir(tokens, 0700) != 0) { perror("softhsm2: mkdir"); cleanup(); exit(1); }
    f = fopen(conf, "w");
    if (!f) { perror("softhsm2: config"); cleanup(); exit(1); }
    fprintf(f, "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
               "slots.removable = false\n", tokens);
    if (fclose(f) != 0) { perror("softhsm2: config"); cleanup(); exit(1); }
    setenv("SOFTHSM2_CONF", conf, 1);

    lib = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "softhsm2: cannot load %s: %s\n", module, dlerror());
        cleanup();
        exit(3);
    }
    *(void **)&getfl = dlsym(lib, "C_GetFunctionList");
    if (!getfl) { fprintf(stderr, "softhsm2: no C_GetFunctionList in %s\n", module); cleanup(); exit(3); }
    P11(getfl(&p11), "C_GetFunctionList");
    P11(p11->C_Initialize(NULL), "C_Initialize");
    P11(p11->C_GetInfo(&info), "C_GetInfo");
    printf("info softhsm2 %.32s %u.%u\n", (const char *)info.libraryDescription,
           info.libraryVersion.major, info.libraryVersion.minor);

    /* a fresh store has one uninitialised slot; init the token there, then
     * find it again by label (its slot id changes after C_InitToken) */
    P11(p11->C_GetSlotList(CK_TRUE, slots, &nslots), "C_GetSlotList");
    if (nslots == 0) die("no slot", 0);
    pad(label, sizeof label, TOKEN_LABEL);
    P11(p11->C_InitToken(slots[0], (CK_UTF8CHAR *)SO_PIN, strlen(SO_PIN), label), "C_InitToken");
    nslots = 64;
    P11(p11->C_GetSlotList(CK_TRUE, slots, &nslots), "C_GetSlotList");
    for (i = 0; i < nslots; i++) {
        CK_TOKEN_INFO ti;
        if (p11->C_GetTokenInfo(slots[i], &ti) == CKR_OK && memcmp(ti.label, label, sizeof label) == 0)
            break;
    }
    if (i == nslots) die("the new token's slot", 0);
    P11(p11->C_OpenSession(slots[i], CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &sess),
        "C_OpenSession");
    P11(p11->C_Login(sess, CKU_SO, (CK_UTF8CHAR *)SO_PIN, strlen(SO_PIN)), "C_Login(SO)");
    P11(p11->C_InitPIN(sess, (CK_UTF8CHAR *)USER_PIN, strlen(USER_PIN)), "C_InitPIN");
    P11(p11->C_Logout(sess), "C_Logout");
    P11(p11->C_Login(sess, CKU_USER, (CK_UTF8CHAR *)USER_PIN, strlen(USER_PIN)), "C_Login(USER)");
}

static int wanted(int argc, char **argv, int first, const char *name)
{
    int i;
    if (first >= argc) return 1;
    for (i = first; i < argc; i++)
        if (strcmp(argv[i], name) == 0) return 1;
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_softhsm2 [--module PATH] [--find N[,N...]] SECONDS [CASE...]\n"
                    "cases: ec_keygen_token ec_keygen_session ecdsa_sign rsa2048_sign find_label\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *module = "/usr/lib/softhsm/libsofthsm2.so";
    const char *finds = "1000,10000";
    static const char *const known[] = { "ec_keygen_token", "ec_keygen_session", "ecdsa_sign",
                                         "rsa2048_sign", "find_label" };
    double secs;
    char *endp;
    int a = 1, i;
    unsigned long have = 0;
    CK_OBJECT_HANDLE pub;

    while (a < argc && strncmp(argv[a], "--", 2) == 0) {
        if (strcmp(argv[a], "--module") == 0 && a + 1 < argc) module = argv[a + 1];
        else if (strcmp(argv[a], "--find") == 0 && a + 1 < argc) finds = argv[a + 1];
        else usage();
        a += 2;
    }
    if (a >= argc) usage();
    secs = strtod(argv[a], &endp);
    if (*endp != '\0' || !(secs > 0.0)) usage();
    for (i = a + 1; i < argc; i++) {
        size_t k;
        for (k = 0; k < sizeof known / sizeof known[0] && strcmp(argv[i], known[k]) != 0; k++) {}
        if (k == sizeof known / sizeof known[0]) {
            fprintf(stderr, "bench_softhsm2: unknown case '%s'\n", argv[i]);
            usage();
        }
    }
    a++;

    setup(module);
    for (i = 0; i < (int)sizeof msg; i++) msg[i] = (CK_BYTE)(i * 7 + 1);

    if (wanted(argc, argv, a, "ec_keygen_token")) run_case("ec_keygen_token", op_keygen_token, NULL, secs);
    if (wanted(argc, argv, a, "ec_keygen_session"))
        run_case("ec_keygen_session", op_keygen_session, destroy_session_objs, secs);
    if (wanted(argc, argv, a, "ecdsa_sign")) {
        ec_keypair(CK_TRUE, &pub, &sign_key);
        sign_mech.mechanism = CKM_ECDSA; /* 2.6.1 has no CKM_ECDSA_SHA256: msg is the digest */
        run_case("ecdsa_sign", op_sign, NULL, secs);
    }
    if (wanted(argc, argv, a, "rsa2048_sign")) {
        sign_key = rsa_token_key();
        sign_mech.mechanism = CKM_SHA256_RSA_PKCS;
        run_case("rsa2048_sign", op_sign, NULL, secs);
    }
    if (wanted(argc, argv, a, "find_label")) {
        const char *p = finds;
        while (*p) {
            unsigned long want = strtoul(p, &endp, 10);
            char name[48];
            if (endp == p || want == 0 || (*endp != ',' && *endp != '\0')) usage();
            p = *endp ? endp + 1 : endp;
            fill_to(&have, want);
            /* a label from the middle of the fill: SoftHSM scans them all anyway */
            snprintf(find_label, sizeof find_label, "obj-%lu", want / 2);
            snprintf(name, sizeof name, "find_label_%lu", want);
            run_case(name, op_find, NULL, secs);
        }
    }
    cleanup();
    return 0;
}
