/*
 * test_mutate.c - exhaustive mutation of key blobs: for a blob of every key
 * type (every EC curve, Ed25519, X25519, RSA, AES, every HMAC), each with
 * every attribute present, every
 *   - truncation (lengths 0 .. n-1),
 *   - single-bit flip,
 *   - byte set to 0x00 and to 0xFF (where that changes it),
 *   - attribute re-encoded with a changed value (same length, and for the
 *     text attributes one byte longer, with the header's lengths fixed up
 *     so the frame still parses)
 * is rejected by the device: softcxi_key_info_check (the tag checked) and
 * scx_key_get (what every operation opens a blob with) both fail with an
 * error code and a message, and never hand out a key.  The unmutated blob
 * must open, or the test proves nothing.  Runs under ASan/UBSan in ./run
 * test as well, so "never a crash" includes no over-read.
 *
 * Prints the number of mutations tried; docs/hardening.md keeps the figure.
 * SOFTCXI_TEST_NO_RSA_KEYGEN=1 leaves RSA out (under valgrind, where one
 * RSA key takes half a minute to generate).
 */
#include "internal.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"

#define CHECK_RC(expr, want) CHECK_RC_MSG(expr, want, "")

static unsigned long tried, accepted;

/* One mutated blob: must be refused by both ways of opening it. */
static void must_reject(softcxi_session *s, const uint8_t *b, size_t len, const char *what,
                        size_t at)
{
    softcxi_key_info info;
    scx_key *k = NULL;
    tried++;
    int rc1 = softcxi_key_info_check(s, &info, b, len);
    const softcxi_error *e = softcxi_session_error(s);
    int msg1 = e->msg[0] != '\0' && e->code == rc1;
    int rc2 = scx_key_get(s, &k, b, len);
    int msg2 = e->msg[0] != '\0' && e->code == rc2;
    if (rc2 == 0 && k)
        scx_key_release(s, k);
    if (rc1 == 0 || rc2 == 0 || !msg1 || !msg2) {
        accepted++;
        failed++;
        fprintf(stderr, "FAIL [%s]: %s at %zu (of %zu bytes): info_check %s, key_get %s\n",
                current, what, at, len, softcxi_code_name(rc1), softcxi_code_name(rc2));
    }
}

static void put16(uint8_t *p, size_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* Re-encode each attribute with another value: every byte of the value
 * changed in turn (xor 0x01), and, for the text attributes, the value one
 * byte longer with the lengths fixed up. */
static void mutate_attrs(softcxi_session *s, const uint8_t *blob, size_t len)
{
    size_t alen = scx_get16(blob + 36);
    uint8_t *m = malloc(len + 1);
    if (!m)
        exit(2);
    for (size_t off = 0; off + 3 <= alen;) {
        size_t at = SCX_HDR_LEN + off;
        unsigned tag = blob[at];
        size_t vlen = scx_get16(blob + at + 1), v = at + 3;
        for (size_t i = 0; i < vlen; i++) {
            memcpy(m, blob, len);
            m[v + i] ^= 0x01;
            must_reject(s, m, len, "attribute value changed", v + i);
        }
        if (tag == SCX_A_NAME || tag == SCX_A_GROUP || tag == SCX_A_LABEL) {
            /* "x" appended: still valid text, still a well-formed frame */
            memcpy(m, blob, v + vlen);
            m[v + vlen] = 'x';
            memcpy(m + v + vlen + 1, blob + v + vlen, len - v - vlen);
            put16(m + at + 1, vlen + 1);
            put16(m + 36, alen + 1);
            must_reject(s, m, len + 1, "text attribute one byte longer", at);
        }
        off += 3 + vlen;
    }
    free(m);
}

static void mutate(softcxi_session *s, const uint8_t *blob, size_t len)
{
    uint8_t *m = malloc(len);
    if (!m)
        exit(2);
    for (size_t n = 0; n < len; n++) {
        /* A copy of exactly n bytes, so the sanitizers see an over-read. */
        uint8_t *t = malloc(n ? n : 1);
        if (!t)
            exit(2);
        memcpy(t, blob, n);
        must_reject(s, t, n, "truncated", n);
        free(t);
    }
    memcpy(m, blob, len);
    for (size_t i = 0; i < len; i++) {
        for (int bit = 0; bit < 8; bit++) {
            m[i] ^= (uint8_t)(1u << bit);
            must_reject(s, m, len, "bit flipped", i);
            m[i] ^= (uint8_t)(1u << bit);
        }
        static const uint8_t set[2] = {0x00, 0xFF};
        for (int v = 0; v < 2; v++) {
            if (blob[i] == set[v])
                continue;
            m[i] = set[v];
            must_reject(s, m, len, set[v] ? "byte set to 0xff" : "byte set to 0x00", i);
            m[i] = blob[i];
        }
    }
    free(m);
    mutate_attrs(s, blob, len);
}

int main(void)
{
    uint8_t mbk[32];
    softcxi_device *dev;
    softcxi_error err;
    if (RAND_bytes(mbk, sizeof mbk) != 1 || scx_device_new_mem(&dev, mbk, 0, &err) != 0)
        return 2;
    OPENSSL_cleanse(mbk, sizeof mbk);
    softcxi_session *s = softcxi_session_new(dev);
    softcxi_device_free(dev);

    static const struct {
        const char *what;
        int algo, curve;
        unsigned size;
    } keys[] = {
        {"ec P-256", SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P256, 0},
        {"ec P-384", SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P384, 0},
        {"ec P-521", SOFTCXI_ALGO_EC, SOFTCXI_CURVE_P521, 0},
        {"ec secp256k1", SOFTCXI_ALGO_EC, SOFTCXI_CURVE_SECP256K1, 0},
        {"ed25519", SOFTCXI_ALGO_ED25519, 0, 0},
        {"x25519", SOFTCXI_ALGO_X25519, 0, 0},
        {"rsa 2048", SOFTCXI_ALGO_RSA, 0, 2048},
        {"aes 128", SOFTCXI_ALGO_AES, 0, 128},
        {"aes 256", SOFTCXI_ALGO_AES, 0, 256},
        {"hmac-sha256", SOFTCXI_ALGO_HMAC_SHA256, 0, 256},
        {"hmac-sha384", SOFTCXI_ALGO_HMAC_SHA384, 0, 384},
        {"hmac-sha512", SOFTCXI_ALGO_HMAC_SHA512, 0, 512},
    };
    const char *no_rsa = getenv("SOFTCXI_TEST_NO_RSA_KEYGEN");
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        current = keys[i].what;
        if (keys[i].algo == SOFTCXI_ALGO_RSA && no_rsa && no_rsa[0] == '1')
            continue;
        softcxi_template t = {0};
        softcxi_buf b = {0};
        t.algo = keys[i].algo, t.curve = keys[i].curve, t.size = keys[i].size;
        t.name = "dev-000042", t.group = "iot", t.label = "mutation test";
        t.specifier = 7, t.has_specifier = 1;
        t.export_policy = SOFTCXI_EXPORT_ALLOW;
        t.expiry = (int64_t)time(NULL) + 86400;
        int rc = softcxi_key_generate(s, &b, SOFTCXI_FLAG_EXTERNAL, &t);
        CHECK_RC_MSG(rc, 0, softcxi_session_error(s)->msg);
        if (rc)
            continue;
        softcxi_key_info info;
        CHECK_RC(softcxi_key_info_check(s, &info, b.data, b.len), 0);
        unsigned long before = tried, bad = accepted;
        mutate(s, b.data, b.len);
        /* One check per blob, so the count stays readable. */
        CHECK(accepted == bad && tried > before);
        printf("  %-13s %4zu bytes: %6lu mutations, all rejected%s\n", keys[i].what, b.len,
               tried - before, accepted == bad ? "" : " -- NOT ALL");
        softcxi_buf_free(&b);
    }
    softcxi_session_free(s);
    printf("mutations: %lu tried, %lu accepted\n", tried, accepted);
    printf("%d checks passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
