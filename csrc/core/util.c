/*
 * util.c - errors, names, buffers, locked memory and the algorithm tables
 * the other files look things up in.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- errors ------------------------------------------------------------ */

static const char *const code_names[] = {
    "OK",      "EINVAL", "EFORMAT", "ETAMPER", "EMBK",    "EPOLICY", "EAUTH",
    "ENOTFOUND", "EFULL", "EEXIST", "EIO",     "EPERM",   "ECRYPTO", "ENOMEM", "EACCESS", "EREVOKED",
};

const char *softcxi_code_name(int code)
{
    if (code > 0 || (size_t)-code >= sizeof code_names / sizeof code_names[0])
        return "EUNKNOWN";
    return code_names[-code];
}

static int vfail(softcxi_error *err, int code, int with_ssl, const char *fmt, va_list ap)
{
    if (err) {
        err->code = code;
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        if (with_ssl) {
            /* Only the reason strings: they name what failed, never data. */
            unsigned long e;
            size_t n = strlen(err->msg);
            const char *sep = " (openssl: ";
            while ((e = ERR_get_error()) != 0 && n + 8 < sizeof err->msg) {
                const char *r = ERR_reason_error_string(e);
                int w = snprintf(err->msg + n, sizeof err->msg - n, "%s%s", sep,
                                 r ? r : "unknown");
                if (w < 0)
                    break;
                n = strlen(err->msg);
                sep = "; ";
            }
            if (sep[0] == ';' && n + 2 < sizeof err->msg)
                strcat(err->msg, ")");
        }
    }
    ERR_clear_error();
    return code;
}

int scx_fail(softcxi_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(err, code, 0, fmt, ap);
    va_end(ap);
    return code;
}

int scx_fail_ssl(softcxi_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(err, code, 1, fmt, ap);
    va_end(ap);
    return code;
}

void scx_ok(softcxi_error *err)
{
    if (err) {
        err->code = SOFTCXI_OK;
        err->msg[0] = '\0';
    }
}

/* ---- names ------------------------------------------------------------- */

typedef struct name_map {
    const char *name;
    int value;
} name_map;

static int lookup(const name_map *m, size_t n, const char *name)
{
    if (!name)
        return SOFTCXI_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (strcmp(m[i].name, name) == 0)
            return m[i].value;
    return SOFTCXI_EINVAL;
}

static const char *rlookup(const name_map *m, size_t n, int value)
{
    for (size_t i = 0; i < n; i++)
        if (m[i].value == value)
            return m[i].name;
    return NULL;
}

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static const name_map algos[] = {
    {"ec", SOFTCXI_ALGO_EC},
    {"ed25519", SOFTCXI_ALGO_ED25519},
    {"x25519", SOFTCXI_ALGO_X25519},
    {"rsa", SOFTCXI_ALGO_RSA},
    {"aes", SOFTCXI_ALGO_AES},
    {"hmac-sha256", SOFTCXI_ALGO_HMAC_SHA256},
    {"hmac-sha384", SOFTCXI_ALGO_HMAC_SHA384},
    {"hmac-sha512", SOFTCXI_ALGO_HMAC_SHA512},
    {"hmac", SOFTCXI_ALGO_HMAC_SHA256}, /* alias; listed last so names round-trip */
};

int softcxi_algo_from_name(const char *name) { return lookup(algos, COUNT(algos), name); }
const char *softcxi_algo_name(int algo) { return rlookup(algos, COUNT(algos), algo); }

static const name_map curves[] = {
    {"P-256", SOFTCXI_CURVE_P256},         {"P-384", SOFTCXI_CURVE_P384},
    {"P-521", SOFTCXI_CURVE_P521},         {"secp256k1", SOFTCXI_CURVE_SECP256K1},
    {"prime256v1", SOFTCXI_CURVE_P256},    {"secp256r1", SOFTCXI_CURVE_P256},
    {"secp384r1", SOFTCXI_CURVE_P384},     {"secp521r1", SOFTCXI_CURVE_P521},
};

int softcxi_curve_from_name(const char *name) { return lookup(curves, COUNT(curves), name); }
const char *softcxi_curve_name(int curve) { return rlookup(curves, COUNT(curves), curve); }

static const name_map usages[] = {
    {"decrypt", SOFTCXI_USAGE_DECRYPT}, {"sign", SOFTCXI_USAGE_SIGN},
    {"derive", SOFTCXI_USAGE_DERIVE},   {"wrap", SOFTCXI_USAGE_WRAP},
    {"encrypt", SOFTCXI_USAGE_ENCRYPT}, {"verify", SOFTCXI_USAGE_VERIFY},
    {"unwrap", SOFTCXI_USAGE_UNWRAP},
};

int softcxi_usage_from_name(const char *name) { return lookup(usages, COUNT(usages), name); }
const char *softcxi_usage_name(unsigned bit) { return rlookup(usages, COUNT(usages), (int)bit); }

static const name_map exports[] = {
    {"deny", SOFTCXI_EXPORT_DENY},
    {"allow", SOFTCXI_EXPORT_ALLOW},
    {"allow-plain", SOFTCXI_EXPORT_ALLOW_PLAIN},
    {"deny-backup", SOFTCXI_EXPORT_DENY_BACKUP},
};

int softcxi_export_from_name(const char *name) { return lookup(exports, COUNT(exports), name); }
const char *softcxi_export_name(int p) { return rlookup(exports, COUNT(exports), p); }

static const name_map mechs[] = {
    {"ecdsa-sha256", SOFTCXI_MECH_ECDSA_SHA256},
    {"ecdsa-sha384", SOFTCXI_MECH_ECDSA_SHA384},
    {"ecdsa-sha512", SOFTCXI_MECH_ECDSA_SHA512},
    {"rsa-pkcs1-sha256", SOFTCXI_MECH_RSA_PKCS1_SHA256},
    {"rsa-pkcs1-sha384", SOFTCXI_MECH_RSA_PKCS1_SHA384},
    {"rsa-pkcs1-sha512", SOFTCXI_MECH_RSA_PKCS1_SHA512},
    {"rsa-pss-sha256", SOFTCXI_MECH_RSA_PSS_SHA256},
    {"rsa-pss-sha384", SOFTCXI_MECH_RSA_PSS_SHA384},
    {"rsa-pss-sha512", SOFTCXI_MECH_RSA_PSS_SHA512},
    {"ed25519", SOFTCXI_MECH_ED25519},
    {"aes-gcm", SOFTCXI_MECH_AES_GCM},
    {"rsa-oaep-sha1", SOFTCXI_MECH_RSA_OAEP_SHA1},
    {"rsa-oaep-sha256", SOFTCXI_MECH_RSA_OAEP_SHA256},
    {"rsa-oaep-sha384", SOFTCXI_MECH_RSA_OAEP_SHA384},
    {"rsa-oaep-sha512", SOFTCXI_MECH_RSA_OAEP_SHA512},
    {"hmac-sha256", SOFTCXI_MECH_HMAC_SHA256},
    {"hmac-sha384", SOFTCXI_MECH_HMAC_SHA384},
    {"hmac-sha512", SOFTCXI_MECH_HMAC_SHA512},
    {"ecdh", SOFTCXI_MECH_ECDH},
    {"x25519", SOFTCXI_MECH_X25519},
    {"sha1", SOFTCXI_MECH_SHA1},
    {"sha224", SOFTCXI_MECH_SHA224},
    {"sha256", SOFTCXI_MECH_SHA256},
    {"sha384", SOFTCXI_MECH_SHA384},
    {"sha512", SOFTCXI_MECH_SHA512},
    {"sha3-256", SOFTCXI_MECH_SHA3_256},
    {"sha3-384", SOFTCXI_MECH_SHA3_384},
    {"sha3-512", SOFTCXI_MECH_SHA3_512},
};

int softcxi_mech_from_name(const char *name) { return lookup(mechs, COUNT(mechs), name); }
const char *softcxi_mech_name(int mech) { return rlookup(mechs, COUNT(mechs), mech); }

static const name_map pubfmts[] = {
    {"der", SOFTCXI_PUB_DER},
    {"pem", SOFTCXI_PUB_PEM},
    {"jwk", SOFTCXI_PUB_JWK},
    {"raw", SOFTCXI_PUB_RAW},
};

int softcxi_pubfmt_from_name(const char *name) { return lookup(pubfmts, COUNT(pubfmts), name); }

/* ---- algorithm tables -------------------------------------------------- */

static const uint8_t oid_p256[] = {0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
static const uint8_t oid_p384[] = {0x2b, 0x81, 0x04, 0x00, 0x22};
static const uint8_t oid_p521[] = {0x2b, 0x81, 0x04, 0x00, 0x23};
static const uint8_t oid_k256[] = {0x2b, 0x81, 0x04, 0x00, 0x0a};

static const scx_curve_def curve_defs[] = {
    {NULL, 0, NULL, 0, NULL},
    {"prime256v1", 32, oid_p256, sizeof oid_p256, "P-256"},
    {"secp384r1", 48, oid_p384, sizeof oid_p384, "P-384"},
    {"secp521r1", 66, oid_p521, sizeof oid_p521, "P-521"},
    {"secp256k1", 32, oid_k256, sizeof oid_k256, "secp256k1"},
};

const scx_curve_def *scx_curve(int curve)
{
    if (curve <= 0 || (size_t)curve >= COUNT(curve_defs))
        return NULL;
    return &curve_defs[curve];
}

size_t scx_secret_len(int algo, int curve, unsigned size)
{
    switch (algo) {
    case SOFTCXI_ALGO_EC: {
        const scx_curve_def *c = scx_curve(curve);
        return c ? c->flen : 0;
    }
    case SOFTCXI_ALGO_ED25519:
    case SOFTCXI_ALGO_X25519:
        return 32;
    case SOFTCXI_ALGO_AES:
    case SOFTCXI_ALGO_HMAC_SHA256:
    case SOFTCXI_ALGO_HMAC_SHA384:
    case SOFTCXI_ALGO_HMAC_SHA512:
        return size / 8;
    default:
        return 0;
    }
}

const char *scx_hmac_digest(int algo)
{
    switch (algo) {
    case SOFTCXI_ALGO_HMAC_SHA256:
        return "SHA256";
    case SOFTCXI_ALGO_HMAC_SHA384:
        return "SHA384";
    case SOFTCXI_ALGO_HMAC_SHA512:
        return "SHA512";
    default:
        return NULL;
    }
}

/* ---- buffers and memory ------------------------------------------------ */

void softcxi_buf_free(softcxi_buf *buf)
{
    if (!buf)
        return;
    if (buf->data) {
        if (buf->secret)
            OPENSSL_clear_free(buf->data, buf->len);
        else
            OPENSSL_free(buf->data);
    }
    buf->data = NULL;
    buf->len = 0;
    buf->secret = 0;
}

static size_t page_round(size_t len)
{
    long ps = sysconf(_SC_PAGESIZE);
    size_t p = ps > 0 ? (size_t)ps : 4096;
    return (len + p - 1) / p * p;
}

void *scx_locked_alloc(size_t len)
{
    size_t n = page_round(len);
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    /* Best effort: an unprivileged process may exceed RLIMIT_MEMLOCK; the
     * page is still kept out of core dumps. */
    (void)mlock(p, n);
#ifdef MADV_DONTDUMP
    (void)madvise(p, n, MADV_DONTDUMP);
#endif
    return p;
}

void scx_locked_free(void *p, size_t len)
{
    if (!p)
        return;
    size_t n = page_round(len);
    OPENSSL_cleanse(p, n);
    (void)munlock(p, n);
    (void)munmap(p, n);
}

void scx_secure_heap_init(void)
{
    /* OpenSSL keeps private-key BIGNUMs here once initialised.  The opened-
     * key cache is sized so that it fits (see cache.c). */
    if (!CRYPTO_secure_malloc_initialized())
        (void)CRYPTO_secure_malloc_init(SCX_SECURE_HEAP, 16);
}

int scx_fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int scx_write_all(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

void scx_hex(char *out, const uint8_t *in, size_t len)
{
    static const char d[] = "0123456789abcdef";
    for (size_t i = 0; i < len; i++) {
        out[2 * i] = d[in[i] >> 4];
        out[2 * i + 1] = d[in[i] & 15];
    }
    out[2 * len] = '\0';
}

const char *scx_keyref(char *buf, size_t cap, const softcxi_key_info *info)
{
    int gl = (int)(info->group_len > 64 ? 64 : info->group_len);
    int nl = (int)(info->name_len > 96 ? 96 : info->name_len);
    if (!info->name && !info->group) {
        snprintf(buf, cap, "(unnamed %s key)", info->algo ? softcxi_algo_name(info->algo) : "?");
        return buf;
    }
    if (info->has_specifier)
        snprintf(buf, cap, "'%.*s/%.*s/%u'", gl, info->group ? info->group : "", nl,
                 info->name ? info->name : "", (unsigned)info->specifier);
    else
        snprintf(buf, cap, "'%.*s/%.*s'", gl, info->group ? info->group : "", nl,
                 info->name ? info->name : "");
    return buf;
}
