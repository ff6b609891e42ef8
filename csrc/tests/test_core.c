/*
 * test_core.c - unit and known-answer tests of the softcxi core.
 *
 *   test_core VECTOR_DIR
 *
 * Known answers: the C2SP XAES-256-GCM vectors, and blob_v1.txt, made by an
 * independent Python implementation of docs/blob-format.md.  The rest checks
 * behaviour a user relies on: every algorithm round-trips, every truncation
 * and bit flip of a blob is refused, a foreign MBK is named, usage and expiry
 * hold, the hand-built SPKI equals OpenSSL's, a device reopens.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define CHECK_RC(expr, want) CHECK_RC_MSG(expr, want, "")

static char tmproot[512];

static void tmp_path(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", tmproot, name);
}

static size_t unhex(uint8_t *out, size_t cap, const char *hex)
{
    size_t n = strlen(hex) / 2;
    if (n > cap)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return 0;
        out[i] = (uint8_t)v;
    }
    return n;
}

static softcxi_session *mem_session(const uint8_t mbk[32], long cache)
{
    softcxi_device *dev;
    softcxi_error err;
    if (scx_device_new_mem(&dev, mbk, cache, &err) != 0) {
        fprintf(stderr, "device: %s\n", err.msg);
        exit(2);
    }
    softcxi_session *s = softcxi_session_new(dev);
    softcxi_device_free(dev);
    return s;
}

static softcxi_session *random_session(long cache)
{
    uint8_t mbk[32];
    if (RAND_bytes(mbk, sizeof mbk) != 1)
        exit(2);
    softcxi_session *s = mem_session(mbk, cache);
    OPENSSL_cleanse(mbk, sizeof mbk);
    return s;
}

/* ---- tests ------------------------------------------------------------- */

static void test_free_null(void)
{
    current = "free(NULL)";
    softcxi_device_free(NULL);
    softcxi_session_free(NULL);
    softcxi_buf_free(NULL);
    softcxi_buf b = {0};
    softcxi_buf_free(&b);
    softcxi_bulk_job_free(NULL);
    CHECK(1);
}

static void test_names(void)
{
    current = "names";
    CHECK(strcmp(softcxi_code_name(SOFTCXI_ETAMPER), "ETAMPER") == 0);
    CHECK(strcmp(softcxi_code_name(SOFTCXI_ENOMEM), "ENOMEM") == 0);
    CHECK(strcmp(softcxi_code_name(-99), "EUNKNOWN") == 0);
    CHECK(softcxi_mech_from_name("ecdsa-sha256") == SOFTCXI_MECH_ECDSA_SHA256);
    CHECK(softcxi_mech_from_name("nope") < 0);
    CHECK(softcxi_algo_from_name("hmac") == SOFTCXI_ALGO_HMAC_SHA256);
    CHECK(strcmp(softcxi_algo_name(SOFTCXI_ALGO_HMAC_SHA256), "hmac-sha256") == 0);
    CHECK(softcxi_curve_from_name("P-521") == SOFTCXI_CURVE_P521);
    for (int m = 1; m < SOFTCXI_MECH_COUNT; m++)
        CHECK(softcxi_mech_from_name(softcxi_mech_name(m)) == m);
}

static void test_xaes_c2sp(void)
{
    /* C2SP XAES-256-GCM test vectors. */
    static const struct {
        uint8_t key_byte;
        const char *aad, *expect;
    } v[] = {
        {0x01, "", "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271"},
        {0x03, "c2sp.org/XAES-256-GCM", "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d"},
    };
    current = "xaes c2sp";
    EVP_CIPHER_CTX *gcm = EVP_CIPHER_CTX_new();
    for (size_t i = 0; i < 2; i++) {
        uint8_t key[32], out[28], want[28], back[12];
        scx_xaes x;
        memset(key, v[i].key_byte, sizeof key);
        unhex(want, sizeof want, v[i].expect);
        CHECK(scx_xaes_init(&x, key) == 0);
        const uint8_t *nonce = (const uint8_t *)"ABCDEFGHIJKLMNOPQRSTUVWX";
        CHECK(scx_xaes_seal(&x, gcm, out, out + 12, nonce, (const uint8_t *)v[i].aad,
                            strlen(v[i].aad), (const uint8_t *)"XAES-256-GCM", 12) == 0);
        CHECK(memcmp(out, want, 28) == 0);
        CHECK(scx_xaes_open(&x, gcm, back, out, 12, out + 12, nonce, (const uint8_t *)v[i].aad,
                            strlen(v[i].aad)) == 0);
        CHECK(memcmp(back, "XAES-256-GCM", 12) == 0);
        out[3] ^= 1;
        CHECK_RC(scx_xaes_open(&x, gcm, back, out, 12, out + 12, nonce,
                               (const uint8_t *)v[i].aad, strlen(v[i].aad)),
                 SOFTCXI_ETAMPER);
        scx_xaes_clear(&x);
    }
    EVP_CIPHER_CTX_free(gcm);
}

/* One record of blob_v1.txt. */
typedef struct vec {
    char f[20][2][1200];
    int n;
} vec;

static const char *vget(const vec *v, const char *k)
{
    for (int i = 0; i < v->n; i++)
        if (!strcmp(v->f[i][0], k))
            return v->f[i][1];
    return NULL;
}

static void check_vector(const vec *v)
{
    uint8_t mbk[32], kcv[8], bkey[32], salt[24], pub[200], secret[100], blob[600], attrs[600];
    uint8_t got[600], k2[32];
    softcxi_template t = {0};
    char usage[100];
    unhex(mbk, 32, vget(v, "mbk"));
    unhex(kcv, 8, vget(v, "kcv"));
    unhex(bkey, 32, vget(v, "blob_key"));
    unhex(salt, 24, vget(v, "salt"));
    size_t pub_len = vget(v, "pub") ? unhex(pub, sizeof pub, vget(v, "pub")) : 0;
    size_t sec_len = unhex(secret, sizeof secret, vget(v, "secret"));
    size_t blob_len = unhex(blob, sizeof blob, vget(v, "blob"));

    /* The labelled derivations. */
    uint8_t kcv2[8];
    CHECK(scx_kcv(kcv2, mbk) == 0 && memcmp(kcv2, kcv, 8) == 0);
    CHECK(scx_label_key(k2, mbk, SCX_LABEL_BLOB_KEY) == 0 && memcmp(k2, bkey, 32) == 0);

    /* The template as the core would encode it. */
    t.algo = softcxi_algo_from_name(vget(v, "algo"));
    if (vget(v, "curve"))
        t.curve = softcxi_curve_from_name(vget(v, "curve"));
    if (vget(v, "size"))
        t.size = (unsigned)atoi(vget(v, "size"));
    t.group = vget(v, "group");
    t.name = vget(v, "name");
    t.label = vget(v, "label");
    if (vget(v, "specifier"))
        t.specifier = (uint32_t)atol(vget(v, "specifier")), t.has_specifier = 1;
    if (vget(v, "expiry"))
        t.expiry = atoll(vget(v, "expiry"));
    t.export_policy = softcxi_export_from_name(vget(v, "export"));
    snprintf(usage, sizeof usage, "%s", vget(v, "usage"));
    for (char *tok = strtok(usage, ","); tok; tok = strtok(NULL, ","))
        t.usage |= (unsigned)softcxi_usage_from_name(tok);
    size_t alen = scx_attrs_encode(attrs, sizeof attrs, &t, atoll(vget(v, "gen_date")), pub,
                                   pub_len);
    CHECK(alen > 0);

    scx_xaes x;
    EVP_CIPHER_CTX *gcm = EVP_CIPHER_CTX_new();
    CHECK(scx_xaes_init(&x, bkey) == 0);
    CHECK(scx_frame_seal(got, SCX_TYPE_KEY, kcv, salt, attrs, alen, secret, sec_len, &x, gcm) ==
          0);
    size_t total = SCX_HDR_LEN + alen + sec_len + SCX_TAG_LEN;
    CHECK(total == blob_len);
    CHECK(memcmp(got, blob, blob_len) == 0); /* byte for byte */
    scx_xaes_clear(&x);
    EVP_CIPHER_CTX_free(gcm);

    /* And a device with that MBK opens and uses it. */
    softcxi_session *s = mem_session(mbk, 16);
    softcxi_key_info info;
    CHECK_RC(softcxi_key_info_check(s, &info, blob, blob_len), 0);
    CHECK(info.verified == 1 && info.algo == t.algo && info.usage == t.usage);
    if (t.algo == SOFTCXI_ALGO_EC || t.algo == SOFTCXI_ALGO_ED25519) {
        softcxi_sign_req r = {blob, blob_len,
                              t.algo == SOFTCXI_ALGO_EC ? SOFTCXI_MECH_ECDSA_SHA256
                                                        : SOFTCXI_MECH_ED25519,
                              0, (const uint8_t *)"msg", 3};
        softcxi_buf sig = {0};
        CHECK_RC(softcxi_sign(s, &sig, &r), 0);
        /* A signature checked by OpenSSL against the vector's public key. */
        EVP_PKEY *pk = NULL;
        CHECK(scx_pkey_public(s->dev, &pk, t.algo, t.curve, pub, pub_len) == 0);
        EVP_MD_CTX *m = EVP_MD_CTX_new();
        CHECK(EVP_DigestVerifyInit(m, NULL, t.algo == SOFTCXI_ALGO_EC ? EVP_sha256() : NULL,
                                   NULL, pk) == 1 &&
              EVP_DigestVerify(m, sig.data, sig.len, (const uint8_t *)"msg", 3) == 1);
        EVP_MD_CTX_free(m);
        EVP_PKEY_free(pk);
        softcxi_buf_free(&sig);
    } else if (t.algo == SOFTCXI_ALGO_AES) {
        /* expiry 2030: the key still works today */
        softcxi_crypt_req r = {0};
        uint8_t iv[12], tag[16];
        softcxi_buf ct = {0};
        r.blob = blob, r.blob_len = blob_len, r.mech = SOFTCXI_MECH_AES_GCM;
        r.in = (const uint8_t *)"data", r.in_len = 4;
        CHECK_RC(softcxi_encrypt(s, &ct, iv, tag, &r), 0);
        softcxi_buf_free(&ct);
    }
    softcxi_session_free(s);
}

static void test_blob_vectors(const char *dir)
{
    char path[600], line[1400];
    current = "blob vectors";
    snprintf(path, sizeof path, "%s/blob_v1.txt", dir);
    FILE *f = fopen(path, "r");
    CHECK(f != NULL);
    if (!f)
        return;
    vec v;
    int count = 0;
    v.n = 0;
    for (;;) {
        char *l = fgets(line, sizeof line, f);
        if (l) {
            l[strcspn(l, "\r\n")] = '\0';
            if (l[0] == '#')
                continue;
        }
        if (!l || !l[0]) {
            if (v.n) {
                check_vector(&v);
                count++;
            }
            v.n = 0;
            if (!l)
                break;
            continue;
        }
        char *eq = strstr(l, " = ");
        if (!eq || v.n >= 20)
            continue;
        *eq = '\0';
        snprintf(v.f[v.n][0], sizeof v.f[v.n][0], "%s", l);
        snprintf(v.f[v.n][1], sizeof v.f[v.n][1], "%s", eq + 3);
        v.n++;
    }
    fclose(f);
    CHECK(count == 3);
}

/* SOFTCXI_TEST_NO_RSA_KEYGEN=1 skips the checks that generate RSA keys:
 * under valgrind each takes half a minute (./run test sets it there; the
 * plain and sanitizer runs keep them). */
static int no_rsa_keygen(void)
{
    const char *v = getenv("SOFTCXI_TEST_NO_RSA_KEYGEN");
    return v && v[0] == '1';
}

static softcxi_buf gen(softcxi_session *s, int algo, int curve, unsigned size, unsigned usage)
{
    softcxi_template t = {0};
    softcxi_buf b = {0};
    t.algo = algo, t.curve = curve, t.size = size, t.usage = usage;
    t.name = "k1", t.group = "g";
    int rc = softcxi_key_generate(s, &b, SOFTCXI_FLAG_EXTERNAL, &t);
    if (rc)
        fprintf(stderr, "keygen %s: %s\n", softcxi_algo_name(algo), softcxi_session_error(s)->msg);
    CHECK(rc == 0);
    return b;
}

static void sign_roundtrip(softcxi_session *s, const softcxi_buf *b, int mech, unsigned flags)
{
    softcxi_sign_req r = {b->data, b->len, mech, flags, (const uint8_t *)"hello", 5};
    softcxi_buf sig = {0};
    CHECK_RC(softcxi_sign(s, &sig, &r), 0);
    CHECK_RC(softcxi_verify(s, &r, sig.data, sig.len), 1);
    r.msg = (const uint8_t *)"hellp";
    CHECK_RC(softcxi_verify(s, &r, sig.data, sig.len), 0);
    softcxi_buf_free(&sig);
}

static void test_algorithms(void)
{
    current = "algorithms";
    softcxi_session *s = random_session(64);
    struct {
        int algo, curve, mech;
        unsigned size, flags;
    } sig[] = {
        {SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P256, SOFTCXI_MECH_ECDSA_SHA256, 0, 0},
        {SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P256, SOFTCXI_MECH_ECDSA_SHA256, 0, SOFTCXI_SIG_RAW},
        {SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P384, SOFTCXI_MECH_ECDSA_SHA384, 0, 0},
        {SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P521, SOFTCXI_MECH_ECDSA_SHA512, 0, SOFTCXI_SIG_RAW},
        {SOFTCXI_ALGO_EC, SOFTCXI_CURVE_SECP256K1, SOFTCXI_MECH_ECDSA_SHA256, 0, 0},
        {SOFTCXI_ALGO_ED25519, 0, SOFTCXI_MECH_ED25519, 0, 0},
        {SOFTCXI_ALGO_RSA, 0, SOFTCXI_MECH_RSA_PKCS1_SHA256, 2048, 0},
        {SOFTCXI_ALGO_RSA, 0, SOFTCXI_MECH_RSA_PSS_SHA384, 2048, 0},
    };
    for (size_t i = 0; i < sizeof sig / sizeof sig[0]; i++) {
        if (sig[i].algo == SOFTCXI_ALGO_RSA && no_rsa_keygen())
            continue;
        softcxi_buf b = gen(s, sig[i].algo, sig[i].curve, sig[i].size, 0);
        CHECK(b.len > 0 && b.data[0] == 'K');
        if (sig[i].algo == SOFTCXI_ALGO_EC && sig[i].curve == SOFTCXI_CURVE_P256)
            CHECK(b.len < 300);
        sign_roundtrip(s, &b, sig[i].mech, sig[i].flags);
        softcxi_buf_free(&b);
    }

    /* AES-GCM, with AAD and a device-drawn IV. */
    softcxi_buf aes = gen(s, SOFTCXI_ALGO_AES, 0, 128, 0);
    softcxi_crypt_req cr = {0};
    uint8_t iv[12], tag[16], iv2[12];
    softcxi_buf ct = {0}, pt = {0}, ct2 = {0};
    cr.blob = aes.data, cr.blob_len = aes.len, cr.mech = SOFTCXI_MECH_AES_GCM;
    cr.in = (const uint8_t *)"secret data", cr.in_len = 11;
    cr.aad = (const uint8_t *)"hdr", cr.aad_len = 3;
    CHECK_RC(softcxi_encrypt(s, &ct, iv, tag, &cr), 0);
    CHECK_RC(softcxi_encrypt(s, &ct2, iv2, tag, &cr), 0);
    CHECK(memcmp(iv, iv2, 12) != 0); /* a fresh IV each time */
    softcxi_buf_free(&ct2);
    CHECK_RC(softcxi_encrypt(s, &ct2, iv2, tag, &cr), 0);
    softcxi_crypt_req dr = cr;
    dr.in = ct2.data, dr.in_len = ct2.len, dr.iv = iv2, dr.iv_len = 12, dr.tag = tag,
    dr.tag_len = 16;
    CHECK_RC(softcxi_decrypt(s, &pt, &dr), 0);
    CHECK(pt.len == 11 && memcmp(pt.data, "secret data", 11) == 0);
    softcxi_buf_free(&pt);
    dr.aad = (const uint8_t *)"hdx";
    CHECK_RC(softcxi_decrypt(s, &pt, &dr), SOFTCXI_ETAMPER);
    CHECK(pt.data == NULL);
    softcxi_buf_free(&ct);
    softcxi_buf_free(&ct2);
    softcxi_buf_free(&aes);

    /* HMAC */
    softcxi_buf hm = gen(s, SOFTCXI_ALGO_HMAC_SHA512, 0, 0, 0);
    softcxi_sign_req mr = {hm.data, hm.len, SOFTCXI_MECH_HMAC_SHA512, 0, (const uint8_t *)"m", 1};
    softcxi_buf mac = {0};
    CHECK_RC(softcxi_mac(s, &mac, &mr), 0);
    CHECK(mac.len == 64);
    CHECK_RC(softcxi_mac_verify(s, &mr, mac.data, mac.len), 1);
    mac.data[0] ^= 1;
    CHECK_RC(softcxi_mac_verify(s, &mr, mac.data, mac.len), 0);
    softcxi_buf_free(&mac);
    mr.mech = SOFTCXI_MECH_HMAC_SHA256;
    CHECK_RC(softcxi_mac(s, &mac, &mr), SOFTCXI_EINVAL);
    CHECK(mac.data == NULL);
    softcxi_buf_free(&hm);

    /* X25519 agreement: both sides derive the same raw secret. */
    softcxi_buf a = gen(s, SOFTCXI_ALGO_X25519, 0, 0, 0), b = gen(s, SOFTCXI_ALGO_X25519, 0, 0, 0);
    softcxi_buf pa = {0}, pb = {0}, za = {0}, zb = {0};
    CHECK_RC(softcxi_public_key(s, &pa, a.data, a.len, SOFTCXI_PUB_RAW), 0);
    CHECK_RC(softcxi_public_key(s, &pb, b.data, b.len, SOFTCXI_PUB_DER), 0);
    softcxi_agree_req ar = {a.data, a.len, SOFTCXI_MECH_X25519, pb.data, pb.len,
                            SOFTCXI_AGREE_RAW, NULL, NULL, 0, NULL, 0};
    CHECK_RC(softcxi_secret_agree(s, &za, &ar), 0);
    ar.blob = b.data, ar.blob_len = b.len, ar.peer = pa.data, ar.peer_len = pa.len;
    CHECK_RC(softcxi_secret_agree(s, &zb, &ar), 0);
    CHECK(za.len == 32 && zb.len == 32 && memcmp(za.data, zb.data, 32) == 0 && za.secret);
    ar.flags = 0;
    softcxi_buf derived = {0};
    CHECK_RC(softcxi_secret_agree(s, &derived, &ar), 0);
    softcxi_key_info di;
    CHECK_RC(softcxi_key_info_check(s, &di, derived.data, derived.len), 0);
    CHECK(di.algo == SOFTCXI_ALGO_AES && di.size == 256 && di.group_len == 1);
    softcxi_buf_free(&derived);
    softcxi_buf_free(&za), softcxi_buf_free(&zb), softcxi_buf_free(&pa), softcxi_buf_free(&pb);
    softcxi_buf_free(&a), softcxi_buf_free(&b);

    /* Hashing */
    uint8_t d[64];
    size_t dl = 0;
    softcxi_error err;
    uint8_t want[32];
    unhex(want, 32, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    CHECK_RC(softcxi_hash_compute(d, &dl, SOFTCXI_MECH_SHA256, (const uint8_t *)"abc", 3, &err), 0);
    CHECK(dl == 32 && memcmp(d, want, 32) == 0);
    CHECK_RC(softcxi_hash_compute(d, &dl, SOFTCXI_MECH_AES_GCM, (const uint8_t *)"abc", 3, &err),
             SOFTCXI_EINVAL);
    softcxi_session_free(s);
}

static void test_bad_blobs(void)
{
    current = "truncation and bit flips";
    softcxi_session *s = random_session(64);
    softcxi_buf b = gen(s, SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P256, 0, 0);
    softcxi_sign_req r = {b.data, b.len, SOFTCXI_MECH_ECDSA_SHA256, 0, (const uint8_t *)"m", 1};
    softcxi_buf sig = {0};
    CHECK_RC(softcxi_sign(s, &sig, &r), 0); /* now cached */
    softcxi_buf_free(&sig);
    uint8_t *copy = malloc(b.len + 1);
    int bad = 0;
    for (size_t n = 0; n < b.len; n++) {
        memcpy(copy, b.data, n);
        r.blob = copy, r.blob_len = n;
        int rc = softcxi_sign(s, &sig, &r);
        if (rc != SOFTCXI_EFORMAT && rc != SOFTCXI_ETAMPER)
            bad++;
        softcxi_buf_free(&sig);
    }
    CHECK(bad == 0);
    bad = 0;
    for (size_t i = 0; i < b.len * 8; i++) {
        memcpy(copy, b.data, b.len);
        copy[i / 8] ^= (uint8_t)(1u << (i % 8));
        r.blob = copy, r.blob_len = b.len;
        int rc = softcxi_sign(s, &sig, &r);
        int want_mbk = i / 8 >= 4 && i / 8 < 12; /* a flip in the KCV */
        if (want_mbk ? rc != SOFTCXI_EMBK : rc != SOFTCXI_EFORMAT && rc != SOFTCXI_ETAMPER)
            bad++;
        softcxi_buf_free(&sig);
    }
    CHECK(bad == 0);
    /* Trailing bytes */
    memcpy(copy, b.data, b.len);
    copy[b.len] = 0;
    r.blob = copy, r.blob_len = b.len + 1;
    CHECK_RC(softcxi_sign(s, &sig, &r), SOFTCXI_EFORMAT);
    CHECK(strstr(softcxi_session_error(s)->msg, "'g/k1'") != NULL);
    free(copy);

    /* A foreign MBK is named, both check values in the message. */
    current = "foreign MBK";
    softcxi_session *s2 = random_session(64);
    uint8_t k1[8], k2[8];
    char h1[17], h2[17];
    softcxi_device_kcv(s->dev, k1);
    softcxi_device_kcv(s2->dev, k2);
    scx_hex(h1, k1, 8);
    scx_hex(h2, k2, 8);
    r.blob = b.data, r.blob_len = b.len;
    CHECK_RC(softcxi_sign(s2, &sig, &r), SOFTCXI_EMBK);
    CHECK(strstr(s2->err.msg, h1) && strstr(s2->err.msg, h2));
    softcxi_session_free(s2);
    softcxi_buf_free(&b);
    softcxi_session_free(s);
}

static void test_policy(void)
{
    current = "usage and expiry";
    softcxi_session *s = random_session(8);
    softcxi_sign_req r = {NULL, 0, SOFTCXI_MECH_RSA_PSS_SHA256, 0, (const uint8_t *)"m", 1};
    softcxi_buf out = {0};
    if (!no_rsa_keygen()) {
        softcxi_buf enc =
            gen(s, SOFTCXI_ALGO_RSA, 0, 2048, SOFTCXI_USAGE_ENCRYPT | SOFTCXI_USAGE_DECRYPT);
        r.blob = enc.data, r.blob_len = enc.len;
        CHECK_RC(softcxi_sign(s, &out, &r), SOFTCXI_EPOLICY);
        CHECK(strstr(s->err.msg, "'g/k1'") && strstr(s->err.msg, "sign"));
        softcxi_buf_free(&enc);
    }

    softcxi_template t = {0};
    t.algo = SOFTCXI_ALGO_EC;
    t.group = "g", t.name = "old";
    t.expiry = (int64_t)time(NULL) - 5;
    softcxi_buf ex = {0};
    CHECK_RC(softcxi_key_generate(s, &ex, SOFTCXI_FLAG_EXTERNAL, &t), 0);
    r.blob = ex.data, r.blob_len = ex.len, r.mech = SOFTCXI_MECH_ECDSA_SHA256;
    CHECK_RC(softcxi_sign(s, &out, &r), SOFTCXI_EPOLICY);
    CHECK(strstr(s->err.msg, "expired") != NULL);
    softcxi_buf_free(&ex);

    current = "template errors";
    t.expiry = 0;
    t.curve = 99;
    CHECK_RC(softcxi_key_generate(s, &ex, SOFTCXI_FLAG_EXTERNAL, &t), SOFTCXI_EINVAL);
    CHECK(strstr(s->err.msg, "template.curve") != NULL);
    t.curve = 0, t.algo = SOFTCXI_ALGO_RSA, t.size = 1024;
    CHECK_RC(softcxi_key_generate(s, &ex, SOFTCXI_FLAG_EXTERNAL, &t), SOFTCXI_EINVAL);
    CHECK(strstr(s->err.msg, "template.size") != NULL);
    t.algo = SOFTCXI_ALGO_ED25519, t.size = 0, t.usage = SOFTCXI_USAGE_ENCRYPT;
    CHECK_RC(softcxi_key_generate(s, &ex, SOFTCXI_FLAG_EXTERNAL, &t), SOFTCXI_EINVAL);
    CHECK(strstr(s->err.msg, "template.usage") != NULL);
    t.algo = 77;
    CHECK_RC(softcxi_key_generate(s, &ex, SOFTCXI_FLAG_EXTERNAL, &t), SOFTCXI_EINVAL);
    CHECK(strstr(s->err.msg, "template.algo") != NULL);
    t.algo = SOFTCXI_ALGO_EC, t.usage = 0;
    CHECK_RC(softcxi_key_generate(s, &ex, 0, &t), SOFTCXI_EINVAL);
    softcxi_session_free(s);
}

static void test_spki(void)
{
    current = "SPKI equals OpenSSL's";
    softcxi_session *s = random_session(16);
    struct {
        int algo, curve;
        unsigned size;
    } k[] = {{SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P256, 0}, {SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P384, 0},
             {SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P521, 0}, {SOFTCXI_ALGO_EC, SOFTCXI_CURVE_SECP256K1, 0},
             {SOFTCXI_ALGO_ED25519, 0, 0},             {SOFTCXI_ALGO_X25519, 0, 0},
             {SOFTCXI_ALGO_RSA, 0, 2048}};
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
        if (k[i].algo == SOFTCXI_ALGO_RSA && no_rsa_keygen())
            continue;
        softcxi_buf b = gen(s, k[i].algo, k[i].curve, k[i].size,
                            k[i].algo == SOFTCXI_ALGO_X25519 ? 0 : 0);
        softcxi_buf der = {0};
        scx_key *key;
        CHECK_RC(softcxi_public_key(s, &der, b.data, b.len, SOFTCXI_PUB_DER), 0);
        CHECK_RC(scx_key_get(s, &key, b.data, b.len), 0);
        unsigned char *ossl = NULL;
        int n = i2d_PUBKEY(key->pkey, &ossl);
        CHECK(n > 0 && (size_t)n == der.len && memcmp(ossl, der.data, der.len) == 0);
        OPENSSL_free(ossl);
        scx_key_release(s, key);
        softcxi_buf_free(&der);
        softcxi_buf_free(&b);
    }
    softcxi_session_free(s);
}

static void test_cache(void)
{
    current = "cache";
    softcxi_session *s = random_session(8);
    softcxi_buf b = gen(s, SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P256, 0, 0);
    softcxi_cache_stats st;
    for (int i = 0; i < 5; i++)
        sign_roundtrip(s, &b, SOFTCXI_MECH_ECDSA_SHA256, 0);
    softcxi_cache_stats_get(s, &st);
    CHECK(st.misses == 1 && st.hits >= 14 && st.entries == 1);
    /* More keys than slots: stays bounded. */
    for (int i = 0; i < 40; i++) {
        softcxi_buf x = gen(s, SOFTCXI_ALGO_ED25519, 0, 0, 0);
        sign_roundtrip(s, &x, SOFTCXI_MECH_ED25519, 0);
        softcxi_buf_free(&x);
    }
    softcxi_cache_stats_get(s, &st);
    CHECK(st.entries <= st.capacity && st.capacity == 8 && st.evictions > 0);
    softcxi_buf_free(&b);
    softcxi_session_free(s);

    s = random_session(0); /* cache off */
    b = gen(s, SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P256, 0, 0);
    sign_roundtrip(s, &b, SOFTCXI_MECH_ECDSA_SHA256, 0);
    softcxi_cache_stats_get(s, &st);
    CHECK(st.capacity == 0 && st.entries == 0);
    softcxi_buf_free(&b);
    softcxi_session_free(s);
}

/* Open a file-backed device and log on a user who may use every group
 * (added on first use by the administrator). */
static softcxi_session *file_session(const softcxi_open_req *req, int add_user)
{
    softcxi_device *dev = NULL;
    softcxi_error err;
    if (softcxi_device_open(&dev, req, &err) != 0) {
        fprintf(stderr, "open: %s\n", err.msg);
        return NULL;
    }
    softcxi_session *s = softcxi_session_new(dev);
    softcxi_device_free(dev);
    if (add_user) {
        softcxi_user_req u = {"app", "app-password", SOFTCXI_ROLE_USER, 1, "*", 10, NULL, 0};
        CHECK_RC(softcxi_logon_pass(s, "ADMIN", "admin-password"), 0);
        CHECK_RC(softcxi_user_add(s, &u), 0);
        softcxi_logoff(s);
    }
    CHECK_RC(softcxi_logon_pass(s, "app", "app-password"), 0);
    return s;
}

static void test_users(void)
{
    char dir[600], key[600];
    softcxi_error err;
    current = "users and logon";
    tmp_path(dir, sizeof dir, "udev");
    tmp_path(key, sizeof key, "keys/udev.key");
    softcxi_init_req init = {dir, key, "ADMIN", "admin-password", 10};
    CHECK_RC(softcxi_device_init(&init, &err), 0);
    CHECK_RC(softcxi_device_init(&init, &err), SOFTCXI_EEXIST);
    softcxi_open_req req = {dir, key, -1, 0};
    softcxi_session *s = file_session(&req, 1);
    if (!s)
        return;
    /* The user may use any group; a user of group A may not use B. */
    softcxi_buf b = gen(s, SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P256, 0, 0); /* group "g" */
    softcxi_logoff(s);
    softcxi_sign_req r = {b.data, b.len, SOFTCXI_MECH_ECDSA_SHA256, 0, (const uint8_t *)"m", 1};
    softcxi_buf sig = {0};
    CHECK_RC(softcxi_sign(s, &sig, &r), SOFTCXI_EAUTH);
    CHECK_RC(softcxi_logon_pass(s, "ADMIN", "admin-password"), 0);
    softcxi_user_req ua = {"alice", "alice-password", SOFTCXI_ROLE_USER, 1, "iot,fleet-*", 10,
                           NULL, 0};
    CHECK_RC(softcxi_user_add(s, &ua), 0);
    CHECK_RC(softcxi_user_add(s, &ua), SOFTCXI_EEXIST);
    /* an administrator is no key user */
    CHECK_RC(softcxi_sign(s, &sig, &r), SOFTCXI_EACCESS);
    softcxi_logoff(s);
    CHECK_RC(softcxi_logon_pass(s, "alice", "alice-password"), 0);
    CHECK_RC(softcxi_sign(s, &sig, &r), SOFTCXI_EACCESS);
    CHECK(strstr(s->err.msg, "'g'") != NULL);
    softcxi_template t = {0};
    softcxi_buf fb = {0};
    t.algo = SOFTCXI_ALGO_EC, t.group = "fleet-7", t.name = "f";
    CHECK_RC(softcxi_key_generate(s, &fb, SOFTCXI_FLAG_EXTERNAL, &t), 0);
    t.group = "fleet";
    CHECK_RC(softcxi_key_generate(s, &sig, SOFTCXI_FLAG_EXTERNAL, &t), SOFTCXI_EACCESS);
    /* alice is no administrator */
    CHECK_RC(softcxi_user_add(s, &ua), SOFTCXI_EAUTH);
    softcxi_logoff(s);
    /* Wrong passwords count on disk and lock the user out. */
    for (int i = 0; i < 4; i++)
        CHECK_RC(softcxi_logon_pass(s, "alice", "wrong-password"), SOFTCXI_EAUTH);
    CHECK_RC(softcxi_logon_pass(s, "alice", "alice-password"), SOFTCXI_EAUTH);
    CHECK(strstr(s->err.msg, "locked out") != NULL);
    CHECK_RC(softcxi_logon_pass(s, "nobody", "whatever-pw"), SOFTCXI_EAUTH);
    softcxi_session_free(s);
    softcxi_buf_free(&b);
    softcxi_buf_free(&fb);
}

static void test_device_files(void)
{
    char dir[600], key[600], key2[600], dir2[600];
    softcxi_device *dev = NULL, *dev2 = NULL;
    softcxi_error err;
    current = "device files";
    tmp_path(dir, sizeof dir, "dev");
    tmp_path(key, sizeof key, "keys/dev.key");
    softcxi_open_req req = {dir, key, -1, 0};
    CHECK_RC(softcxi_device_open(&dev, &req, &err), SOFTCXI_ENOTFOUND); /* no init yet */
    softcxi_init_req init = {dir, key, "ADMIN", "admin-password", 10};
    CHECK_RC(softcxi_device_init(&init, &err), 0);
    uint8_t kcv1[8], kcv2[8];
    softcxi_session *s = file_session(&req, 1);
    if (!s)
        return;
    softcxi_device_kcv(s->dev, kcv1);
    softcxi_buf b = gen(s, SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P256, 0, 0);
    softcxi_session_free(s);

    /* Reopen: same MBK, the blob still works. */
    s = file_session(&req, 0);
    if (!s)
        return;
    softcxi_device_kcv(s->dev, kcv2);
    CHECK(memcmp(kcv1, kcv2, 8) == 0);
    sign_roundtrip(s, &b, SOFTCXI_MECH_ECDSA_SHA256, 0);
    softcxi_session_free(s);

    /* Key file permissions are checked. */
    chmod(key, 0644);
    CHECK_RC(softcxi_device_open(&dev, &req, &err), SOFTCXI_EPERM);
    CHECK(strstr(err.msg, key) != NULL);
    chmod(key, 0600);
    char link_path[600];
    tmp_path(link_path, sizeof link_path, "keys/link.key");
    CHECK(symlink(key, link_path) == 0);
    req.keyfile = link_path;
    CHECK_RC(softcxi_device_open(&dev, &req, &err), SOFTCXI_EPERM);
    CHECK(strstr(err.msg, "symbolic link") != NULL);
    req.keyfile = key;

    /* Another device's key file: named KCVs. */
    tmp_path(dir2, sizeof dir2, "dev2");
    tmp_path(key2, sizeof key2, "keys/dev2.key");
    softcxi_open_req req2 = {dir2, key2, -1, 0};
    softcxi_init_req init2 = {dir2, key2, "ADMIN", "admin-password", 10};
    CHECK_RC(softcxi_device_init(&init2, &err), 0);
    req.keyfile = key2;
    CHECK_RC(softcxi_device_open(&dev, &req, &err), SOFTCXI_EMBK);
    req.keyfile = key;

    /* Missing key file, and a key file inside the state directory. */
    unlink(key2);
    CHECK_RC(softcxi_device_open(&dev2, &req2, &err), SOFTCXI_ENOTFOUND);
    char dir3[600], key3[600];
    tmp_path(dir3, sizeof dir3, "dev3");
    tmp_path(key3, sizeof key3, "dev3/inside.key");
    softcxi_init_req req3 = {dir3, key3, "ADMIN", "admin-password", 10};
    CHECK_RC(softcxi_device_init(&req3, &err), SOFTCXI_EINVAL);
    CHECK(strstr(err.msg, "outside") != NULL);

    /* A corrupt state file is refused, not overwritten. */
    char state[700];
    snprintf(state, sizeof state, "%s/device.mbk", dir);
    FILE *f = fopen(state, "r+b");
    CHECK(f != NULL);
    if (f) {
        fseek(f, 60, SEEK_SET);
        int c = fgetc(f);
        fseek(f, 60, SEEK_SET);
        fputc(c ^ 0x10, f);
        fclose(f);
        int rc = softcxi_device_open(&dev, &req, &err);
        CHECK(rc == SOFTCXI_ETAMPER || rc == SOFTCXI_EFORMAT);
        struct stat st;
        CHECK(stat(state, &st) == 0);
    }
    softcxi_buf_free(&b);
}

static void test_bulk_generate(void)
{
    current = "bulk_generate";
    softcxi_session *s = random_session(16);
    enum { N = 40 };
    softcxi_buf blobs[N];
    char namebuf[N][16];
    const char *names[N];
    for (int i = 0; i < N; i++) {
        snprintf(namebuf[i], sizeof namebuf[i], "dev-%04d", i);
        names[i] = namebuf[i];
    }
    softcxi_template t = {0};
    t.algo = SOFTCXI_ALGO_EC, t.group = "iot";
    CHECK_RC(softcxi_bulk_generate(s, blobs, SOFTCXI_FLAG_EXTERNAL, &t, names, N, 3), 0);
    int ok = 1;
    for (int i = 0; i < N; i++) {
        softcxi_key_info info;
        /* In order, each named as asked, each usable, all distinct. */
        ok &= softcxi_key_info_check(s, &info, blobs[i].data, blobs[i].len) == 0 &&
              info.name_len == strlen(names[i]) && !memcmp(info.name, names[i], info.name_len);
        if (i > 0)
            ok &= blobs[i].len != blobs[i - 1].len ||
                  memcmp(blobs[i].data, blobs[i - 1].data, blobs[i].len) != 0;
    }
    CHECK(ok);
    sign_roundtrip(s, &blobs[N - 1], SOFTCXI_MECH_ECDSA_SHA256, 0);
    for (int i = 0; i < N; i++)
        softcxi_buf_free(&blobs[i]);

    /* A bad name fails the whole call, names the key, returns nothing. */
    char longname[300];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    names[7] = longname;
    CHECK_RC(softcxi_bulk_generate(s, blobs, SOFTCXI_FLAG_EXTERNAL, &t, names, N, 2),
             SOFTCXI_EINVAL);
    CHECK(strstr(s->err.msg, "key 8") != NULL);
    int none = 1;
    for (int i = 0; i < N; i++)
        none &= blobs[i].data == NULL;
    CHECK(none);
    softcxi_session_free(s);
}

/* The start-now, collect-later form: the same blobs and errors, and a job
 * that outlives its session and its caller's strings. */
static void test_bulk_job(void)
{
    current = "bulk_generate_start";
    uint8_t mbk[32];
    CHECK(RAND_bytes(mbk, sizeof mbk) == 1);
    softcxi_session *s = mem_session(mbk, 16);
    enum { N = 40 };
    char namebuf[N][16], group[8] = "iot";
    const char *names[N];
    for (int i = 0; i < N; i++) {
        snprintf(namebuf[i], sizeof namebuf[i], "job-%04d", i);
        names[i] = namebuf[i];
    }
    softcxi_template t = {0};
    t.algo = SOFTCXI_ALGO_EC, t.group = group;
    softcxi_bulk_job *job = NULL;
    CHECK_RC(softcxi_bulk_generate_start(s, &job, SOFTCXI_FLAG_EXTERNAL, &t, names, N, 2), 0);
    CHECK(job != NULL && softcxi_bulk_job_count(job) == N);
    /* The caller's strings and the session go away while the job runs. */
    memset(namebuf, 'z', sizeof namebuf);
    memset(group, 0, sizeof group);
    softcxi_session_free(s);
    softcxi_buf *blobs = NULL;
    softcxi_error err;
    CHECK_RC_MSG(softcxi_bulk_job_wait(job, &blobs, &err), 0, err.msg);
    CHECK(blobs != NULL && softcxi_bulk_job_ready(job));
    s = mem_session(mbk, 16);
    int ok = blobs != NULL;
    for (int i = 0; ok && i < N; i++) {
        softcxi_key_info info;
        char want[16];
        snprintf(want, sizeof want, "job-%04d", i);
        ok &= softcxi_key_info_check(s, &info, blobs[i].data, blobs[i].len) == 0 &&
              info.name_len == strlen(want) && !memcmp(info.name, want, info.name_len) &&
              info.group_len == 3 && !memcmp(info.group, "iot", 3);
    }
    CHECK(ok);
    if (blobs)
        sign_roundtrip(s, &blobs[N - 1], SOFTCXI_MECH_ECDSA_SHA256, 0);
    /* The caller may take blobs; the job frees the rest. */
    if (blobs)
        softcxi_buf_free(&blobs[0]);
    /* Waiting twice is refused. */
    CHECK_RC(softcxi_bulk_job_wait(job, &blobs, &err), SOFTCXI_EINVAL);
    CHECK(blobs == NULL);
    softcxi_bulk_job_free(job);

    /* A bad name fails the whole job at wait, names the key, returns nothing. */
    for (int i = 0; i < N; i++) {
        snprintf(namebuf[i], sizeof namebuf[i], "job-%04d", i);
        names[i] = namebuf[i];
    }
    memcpy(group, "iot", 4);
    char longname[300];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    names[7] = longname;
    CHECK_RC(softcxi_bulk_generate_start(s, &job, SOFTCXI_FLAG_EXTERNAL, &t, names, N, 3), 0);
    CHECK_RC(softcxi_bulk_job_wait(job, &blobs, &err), SOFTCXI_EINVAL);
    CHECK(strstr(err.msg, "key 8") != NULL && blobs == NULL);
    softcxi_bulk_job_free(job);

    /* Checks of the call itself fail at the start, with no job. */
    CHECK_RC(softcxi_bulk_generate_start(s, &job, 0, &t, NULL, N, 2), SOFTCXI_EINVAL);
    CHECK(job == NULL);
    softcxi_template bad = t;
    bad.algo = 99;
    CHECK_RC(softcxi_bulk_generate_start(s, &job, SOFTCXI_FLAG_EXTERNAL, &bad, NULL, N, 2),
             SOFTCXI_EINVAL);
    CHECK(job == NULL);

    /* No keys: ready at once, an empty result. */
    CHECK_RC(softcxi_bulk_generate_start(s, &job, SOFTCXI_FLAG_EXTERNAL, &t, NULL, 0, 0), 0);
    CHECK(job && softcxi_bulk_job_ready(job));
    CHECK_RC(softcxi_bulk_job_wait(job, &blobs, &err), 0);
    softcxi_bulk_job_free(job);

    /* A job freed while it runs stops, joins its threads, frees what it made. */
    CHECK_RC(softcxi_bulk_generate_start(s, &job, SOFTCXI_FLAG_EXTERNAL, &t, NULL, 2000, 2), 0);
    softcxi_bulk_job_free(job);
    /* ... and one that ran to the end without a wait. */
    CHECK_RC(softcxi_bulk_generate_start(s, &job, SOFTCXI_FLAG_EXTERNAL, &t, NULL, 5, 1), 0);
    while (!softcxi_bulk_job_ready(job))
        sched_yield();
    softcxi_bulk_job_free(job);

    /* Several jobs at once on one session (softcxi.provision runs two): each delivers
     * its own keys, whatever order they are waited for in. */
    softcxi_bulk_job *jobs[3] = {NULL, NULL, NULL};
    const char *const *job_names[3] = {names + 10, names + 20, names + 30}; /* 7 is bad */
    for (int k = 0; k < 3; k++)
        CHECK_RC(softcxi_bulk_generate_start(s, &jobs[k], SOFTCXI_FLAG_EXTERNAL, &t,
                                             job_names[k], 10, 2),
                 0);
    for (int k = 2; k >= 0; k--) {
        softcxi_buf *got = NULL;
        CHECK_RC_MSG(softcxi_bulk_job_wait(jobs[k], &got, &err), 0, err.msg);
        int fine = got != NULL;
        for (int i = 0; fine && i < 10; i++) {
            softcxi_key_info info;
            const char *want = job_names[k][i];
            fine &= softcxi_key_info_check(s, &info, got[i].data, got[i].len) == 0 &&
                    info.name_len == strlen(want) && !memcmp(info.name, want, info.name_len);
        }
        CHECK(fine);
        if (got && k == 1)
            sign_roundtrip(s, &got[9], SOFTCXI_MECH_ECDSA_SHA256, 0);
        softcxi_bulk_job_free(jobs[k]);
    }
    softcxi_session_free(s);
    OPENSSL_cleanse(mbk, sizeof mbk);
}

static void test_shares(void)
{
    current = "mbk shares in memory";
    uint8_t secret[32], shares[5][32], back[32], idx[5];
    CHECK(RAND_bytes(secret, 32) == 1);
    /* Every 3-subset of a 3-of-5 split gives the secret back; 2 do not. */
    CHECK(scx_shares_split(shares, secret, 3, 5, SOFTCXI_SHARES_SHAMIR) == 0);
    int all = 1;
    for (int a = 0; a < 5; a++)
        for (int b = a + 1; b < 5; b++)
            for (int c = b + 1; c < 5; c++) {
                uint8_t pick[3][32];
                memcpy(pick[0], shares[a], 32), memcpy(pick[1], shares[b], 32),
                    memcpy(pick[2], shares[c], 32);
                idx[0] = (uint8_t)(a + 1), idx[1] = (uint8_t)(b + 1), idx[2] = (uint8_t)(c + 1);
                all &= scx_shares_combine(back, (const uint8_t(*)[32])pick, idx, 3,
                                          SOFTCXI_SHARES_SHAMIR) == 0 &&
                       memcmp(back, secret, 32) == 0;
            }
    CHECK(all);
    idx[0] = 1, idx[1] = 2;
    CHECK(scx_shares_combine(back, (const uint8_t(*)[32])shares, idx, 2, SOFTCXI_SHARES_SHAMIR) ==
              0 &&
          memcmp(back, secret, 32) != 0);
    CHECK(scx_shares_split(shares, secret, 3, 3, SOFTCXI_SHARES_XOR) == 0);
    CHECK(scx_shares_combine(back, (const uint8_t(*)[32])shares, idx, 3, SOFTCXI_SHARES_XOR) ==
              0 &&
          memcmp(back, secret, 32) == 0);
    CHECK(scx_shares_split(shares, secret, 2, 3, SOFTCXI_SHARES_XOR) == SOFTCXI_EINVAL);
    CHECK(scx_shares_split(shares, secret, 4, 3, SOFTCXI_SHARES_SHAMIR) == SOFTCXI_EINVAL);

    current = "mbk share files";
    char p[4][600];
    const char *paths[4], *pw[4] = {"password-one", "password-two", "password-three", NULL};
    for (int i = 0; i < 4; i++) {
        snprintf(p[i], sizeof p[i], "%s/share-%d.key", tmproot, i + 1);
        paths[i] = p[i];
    }
    softcxi_error err;
    uint8_t mbk[32], out[32];
    CHECK(RAND_bytes(mbk, 32) == 1);
    CHECK_RC(scx_mbk_split_files(mbk, 2, 3, SOFTCXI_SHARES_SHAMIR, paths, pw, 10, &err), 0);
    struct stat st;
    CHECK(stat(paths[0], &st) == 0 && (st.st_mode & 077) == 0);
    const char *two[2] = {paths[2], paths[0]}, *twopw[2] = {pw[2], pw[0]};
    CHECK_RC(scx_mbk_combine_files(out, two, twopw, 2, &err), 0);
    CHECK(memcmp(out, mbk, 32) == 0);
    /* Too few, duplicated, wrong password. */
    CHECK_RC(scx_mbk_combine_files(out, two, twopw, 1, &err), SOFTCXI_EINVAL);
    CHECK(strstr(err.msg, "needs 2 of its 3") != NULL);
    const char *dup[2] = {paths[1], paths[1]}, *duppw[2] = {pw[1], pw[1]};
    CHECK_RC(scx_mbk_combine_files(out, dup, duppw, 2, &err), SOFTCXI_EINVAL);
    CHECK(strstr(err.msg, "same share") != NULL);
    const char *badpw[2] = {pw[2], "not-the-password"};
    CHECK_RC(scx_mbk_combine_files(out, two, badpw, 2, &err), SOFTCXI_EAUTH);
    CHECK(strstr(err.msg, paths[0]) && strstr(err.msg, "wrong password"));
    /* A share of another MBK is named as such. */
    uint8_t mbk2[32];
    CHECK(RAND_bytes(mbk2, 32) == 1);
    const char *other[1] = {p[3]}, *otherpw[1] = {"password-four"};
    CHECK_RC(scx_mbk_split_files(mbk2, 1, 1, SOFTCXI_SHARES_SHAMIR, other, otherpw, 10, &err), 0);
    const char *mixed[2] = {paths[0], p[3]}, *mixedpw[2] = {pw[0], "password-four"};
    CHECK_RC(scx_mbk_combine_files(out, mixed, mixedpw, 2, &err), SOFTCXI_EMBK);
    /* Never overwritten: splitting onto existing files fails and leaves
     * no partial set behind. */
    char fresh[600];
    snprintf(fresh, sizeof fresh, "%s/share-new.key", tmproot);
    const char *clash[2] = {fresh, paths[0]}, *clashpw[2] = {"password-new1", "password-new2"};
    CHECK_RC(scx_mbk_split_files(mbk2, 2, 2, SOFTCXI_SHARES_XOR, clash, clashpw, 10, &err),
             SOFTCXI_EEXIST);
    CHECK(stat(fresh, &st) != 0);
    /* A corrupt share file: a clear error, and the file is left alone. */
    FILE *f = fopen(paths[1], "r+b");
    CHECK(f != NULL);
    if (f) {
        fseek(f, 50, SEEK_SET);
        int c = fgetc(f);
        fseek(f, 50, SEEK_SET);
        fputc(c ^ 1, f);
        fclose(f);
    }
    const char *bad[2] = {paths[1], paths[0]}, *badpw2[2] = {pw[1], pw[0]};
    int rc = scx_mbk_combine_files(out, bad, badpw2, 2, &err);
    CHECK(rc == SOFTCXI_EAUTH || rc == SOFTCXI_EFORMAT);
    CHECK(pw[3] == NULL); /* (the fourth path is the other MBK's share) */
    OPENSSL_cleanse(mbk, 32);
    OPENSSL_cleanse(mbk2, 32);
}

static void test_fork_pool(void)
{
    /* Salts and IVs come from a pool: a forked child (an nginx worker) must
     * not hand out the values its parent will. */
    current = "random pool across fork";
    scx_rndpool pool;
    uint8_t first[12], parent[24], child[24];
    int fds[2];
    memset(&pool, 0, sizeof pool);
    CHECK(scx_rnd_public(&pool, first, sizeof first) == 0);
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        uint8_t c[24];
        int ok = scx_rnd_public(&pool, c, sizeof c) == 0 && write(fds[1], c, sizeof c) == 24;
        _exit(ok ? 0 : 1);
    }
    CHECK(pid > 0);
    CHECK(scx_rnd_public(&pool, parent, sizeof parent) == 0);
    CHECK(read(fds[0], child, sizeof child) == 24);
    CHECK(memcmp(parent, child, sizeof parent) != 0);
    close(fds[0]);
    close(fds[1]);
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main(int argc, char **argv)
{
    const char *vectors = argc > 1 ? argv[1] : "csrc/tests/vectors";
    const char *base = getenv("SOFTCXI_TEST_TMP");
    snprintf(tmproot, sizeof tmproot, "%s/test_core.%ld", base ? base : "/tmp", (long)getpid());
    char cmd[700];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", tmproot);
    if (system(cmd) != 0)
        return 2;

    test_free_null();
    test_names();
    test_xaes_c2sp();
    test_blob_vectors(vectors);
    test_algorithms();
    test_bad_blobs();
    test_policy();
    test_spki();
    test_cache();
    test_device_files();
    test_users();
    test_fork_pool();
    test_bulk_generate();
    test_bulk_job();
    test_shares();

    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmproot);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmproot);
    printf("%d checks passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
