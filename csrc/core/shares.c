/*
 * shares.c - the MBK split into key shares and put back together.
 *
 * Schemes: m-of-n Shamir secret sharing over GF(2^8) (the AES field,
 * x^8 + x^4 + x^3 + x + 1), one polynomial per MBK byte with share i
 * evaluated at x = i; or XOR n-of-n.  Field arithmetic is constant-time
 * (no tables indexed by secret bytes).
 *
 * A share lives in a key file protected by its own password, in the blob
 * framing (docs/blob-format.md) with type 0x20:
 *   KCV field  = the MBK's key check value (so shares of different MBKs,
 *                and the recombined MBK, can be told apart)
 *   salt       = the XAES nonce and the scrypt salt
 *   attributes = scheme, share index, m, n, scrypt cost, creation date
 *                (plain TLVs, authenticated as associated data)
 *   secret     = the 32 share bytes, sealed with XAES-256-GCM under
 *                scrypt(password, salt, N = 2^cost, r = 8, p = 1)
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SHARE_LEN 32
#define SHARE_FILE_MAX 512

/* Share attributes: non-critical tags above the key attributes. */
#define A_SCHEME 0x10u
#define A_INDEX 0x11u
#define A_M 0x12u
#define A_N 0x13u
#define A_COST 0x14u
#define A_CREATED 0x15u

/* ---- GF(2^8) ----------------------------------------------------------- */

static uint8_t gf_mul(uint8_t a, uint8_t b)
{
    uint8_t p = 0;
    for (int i = 0; i < 8; i++) {
        p ^= (uint8_t)(-(b & 1) & a);
        uint8_t hi = (uint8_t)-(a >> 7);
        a = (uint8_t)((a << 1) ^ (0x1B & hi));
        b >>= 1;
    }
    return p;
}

/* a^254 = a^-1 (and 0 for 0), by square-and-multiply with a fixed
 * exponent: no branch on a. */
static uint8_t gf_inv(uint8_t a)
{
    uint8_t r = 1, x = a;
    for (int bit = 0; bit < 8; bit++) {
        if ((254 >> bit) & 1)
            r = gf_mul(r, x);
        x = gf_mul(x, x);
    }
    return r;
}

/* ---- splitting and combining in memory --------------------------------- */

int scx_shares_split(uint8_t shares[][SHARE_LEN], const uint8_t secret[SHARE_LEN], unsigned m,
                     unsigned n, int scheme)
{
    uint8_t coef[255];
    if (n < 1 || n > 255 || m < 1 || m > n || (scheme == SOFTCXI_SHARES_XOR && m != n))
        return SOFTCXI_EINVAL;
    if (scheme == SOFTCXI_SHARES_XOR) {
        memcpy(shares[n - 1], secret, SHARE_LEN);
        for (unsigned i = 0; i + 1 < n; i++) {
            if (RAND_priv_bytes(shares[i], SHARE_LEN) != 1)
                return SOFTCXI_ECRYPTO;
            for (unsigned j = 0; j < SHARE_LEN; j++)
                shares[n - 1][j] ^= shares[i][j];
        }
        return 0;
    }
    int rc = 0;
    for (unsigned j = 0; j < SHARE_LEN && rc == 0; j++) {
        /* f(x) = secret[j] + c1 x + ... + c(m-1) x^(m-1) */
        if (m > 1 && RAND_priv_bytes(coef, (int)(m - 1)) != 1) {
            rc = SOFTCXI_ECRYPTO;
            break;
        }
        for (unsigned i = 0; i < n; i++) {
            uint8_t x = (uint8_t)(i + 1), y = 0;
            for (unsigned k = m - 1; k >= 1; k--) /* Horner */
                y = gf_mul((uint8_t)(y ^ coef[k - 1]), x);
            shares[i][j] = (uint8_t)(y ^ secret[j]);
        }
    }
    OPENSSL_cleanse(coef, sizeof coef);
    return rc;
}

int scx_shares_combine(uint8_t secret[SHARE_LEN], const uint8_t shares[][SHARE_LEN],
                       const uint8_t *index, size_t k, int scheme)
{
    memset(secret, 0, SHARE_LEN);
    if (scheme == SOFTCXI_SHARES_XOR) {
        for (size_t i = 0; i < k; i++)
            for (unsigned j = 0; j < SHARE_LEN; j++)
                secret[j] ^= shares[i][j];
        return 0;
    }
    /* Lagrange at 0: secret = sum y_i * prod_{l != i} x_l / (x_l - x_i). */
    for (size_t i = 0; i < k; i++) {
        uint8_t num = 1, den = 1;
        for (size_t l = 0; l < k; l++) {
            if (l == i)
                continue;
            if (index[l] == index[i] || index[l] == 0)
                return SOFTCXI_EINVAL;
            num = gf_mul(num, index[l]);
            den = gf_mul(den, (uint8_t)(index[l] ^ index[i]));
        }
        uint8_t coef = gf_mul(num, gf_inv(den));
        for (unsigned j = 0; j < SHARE_LEN; j++)
            secret[j] ^= gf_mul(shares[i][j], coef);
    }
    return 0;
}

/* ---- share files ------------------------------------------------------- */

static int password_key(uint8_t key[32], const char *password, const uint8_t salt[SCX_SALT_LEN],
                        unsigned cost)
{
    return scx_scrypt(key, 32, password, salt, SCX_SALT_LEN, cost);
}

static void tlv(uint8_t *out, size_t *off, unsigned tag, const uint8_t *v, size_t n)
{
    out[*off] = (uint8_t)tag;
    scx_put16(out + *off + 1, (unsigned)n);
    memcpy(out + *off + 3, v, n);
    *off += 3 + n;
}

static int write_share(const char *path, const uint8_t share[SHARE_LEN],
                       const uint8_t kcv[SCX_KCV_LEN], int scheme, unsigned index, unsigned m,
                       unsigned n, unsigned cost, const char *password, softcxi_error *err)
{
    uint8_t salt[SCX_SALT_LEN], key[32], attrs[64], out[SHARE_FILE_MAX], created[8];
    size_t alen = 0;
    int64_t now = (int64_t)time(NULL);
    for (int i = 0; i < 8; i++)
        created[i] = (uint8_t)((uint64_t)now >> (56 - 8 * i));
    uint8_t v[4] = {(uint8_t)scheme, (uint8_t)index, (uint8_t)m, (uint8_t)n};
    uint8_t c = (uint8_t)cost;
    tlv(attrs, &alen, A_SCHEME, &v[0], 1);
    tlv(attrs, &alen, A_INDEX, &v[1], 1);
    tlv(attrs, &alen, A_M, &v[2], 1);
    tlv(attrs, &alen, A_N, &v[3], 1);
    tlv(attrs, &alen, A_COST, &c, 1);
    tlv(attrs, &alen, A_CREATED, created, 8);

    scx_xaes x;
    EVP_CIPHER_CTX *gcm = EVP_CIPHER_CTX_new();
    int rc = RAND_bytes(salt, sizeof salt) == 1 && gcm ? 0 : SOFTCXI_ECRYPTO;
    if (rc == 0)
        rc = password_key(key, password, salt, cost);
    if (rc == 0 && (rc = scx_xaes_init(&x, key)) == 0) {
        rc = scx_frame_seal(out, SCX_TYPE_MBK_SHARE, kcv, salt, attrs, alen, share, SHARE_LEN,
                            &x, gcm);
        scx_xaes_clear(&x);
    }
    OPENSSL_cleanse(key, sizeof key);
    EVP_CIPHER_CTX_free(gcm);
    if (rc)
        return scx_fail_ssl(err, rc, "mbk share %u: sealing failed", index);

    size_t total = SCX_HDR_LEN + alen + SHARE_LEN + SCX_TAG_LEN;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return scx_fail(err, errno == EEXIST ? SOFTCXI_EEXIST : SOFTCXI_EIO,
                        "share file %s: %s (share files are never overwritten)", path,
                        strerror(errno));
    ssize_t w = write(fd, out, total);
    int ok = w == (ssize_t)total && fsync(fd) == 0;
    close(fd);
    if (!ok) {
        unlink(path);
        return scx_fail(err, SOFTCXI_EIO, "share file %s: write failed", path);
    }
    return 0;
}

int scx_mbk_split_files(const uint8_t mbk[32], unsigned m, unsigned n, int scheme,
                        const char *const *paths, const char *const *passwords, unsigned cost,
                        softcxi_error *err)
{
    uint8_t (*shares)[SHARE_LEN] = OPENSSL_secure_zalloc(255 * SHARE_LEN);
    uint8_t kcv[SCX_KCV_LEN];
    int rc;
    if (!shares)
        return scx_fail(err, SOFTCXI_ENOMEM, "mbk shares: out of secure memory");
    if (cost == 0)
        cost = SOFTCXI_SHARE_COST_DEFAULT;
    if (cost < 10 || cost > 20) {
        rc = scx_fail(err, SOFTCXI_EINVAL, "mbk shares: scrypt cost 2^%u is out of 2^10..2^20",
                      cost);
        goto done;
    }
    if ((rc = scx_shares_split(shares, mbk, m, n, scheme)) != 0) {
        rc = scx_fail(err, rc,
                      rc == SOFTCXI_EINVAL ? "mbk shares: %u of %u is not a valid split (1 <= m "
                                             "<= n <= 255; XOR needs m = n)"
                                           : "mbk shares: %u of %u: random generator failed",
                      m, n);
        goto done;
    }
    if ((rc = scx_kcv(kcv, mbk)) != 0)
        goto done;
    for (unsigned i = 0; i < n; i++) {
        if (!passwords[i] || strlen(passwords[i]) < 8) {
            rc = scx_fail(err, SOFTCXI_EINVAL,
                          "share file %s: the password needs 8 characters or more", paths[i]);
            break;
        }
    }
    unsigned written = 0;
    for (; rc == 0 && written < n; written++)
        if ((rc = write_share(paths[written], shares[written], kcv, scheme, written + 1, m, n,
                              cost, passwords[written], err)) != 0)
            break;
    if (rc) /* all or nothing: no stray subset of shares stays behind */
        for (unsigned i = 0; i < written; i++)
            unlink(paths[i]);
done:
    OPENSSL_secure_clear_free(shares, 255 * SHARE_LEN);
    return rc;
}

/* One share read back: its bytes (in the caller's secure buffer) and what
 * its attributes say. */
typedef struct share_meta {
    uint8_t kcv[SCX_KCV_LEN];
    unsigned scheme, index, m, n;
} share_meta;

static int tlv_u8(const uint8_t *a, size_t len, unsigned tag, unsigned *out)
{
    for (size_t off = 0; off + 3 <= len;) {
        size_t n = scx_get16(a + off + 1);
        if (n > len - off - 3)
            return -1;
        if (a[off] == tag) {
            if (n != 1)
                return -1;
            *out = a[off + 3];
            return 0;
        }
        off += 3 + n;
    }
    return -1;
}

static int read_share(uint8_t share[SHARE_LEN], share_meta *meta, const char *path,
                      const char *password, softcxi_error *err)
{
    uint8_t buf[SHARE_FILE_MAX + 1], key[32];
    scx_frame f;
    softcxi_key_info info;
    softcxi_error why;
    unsigned cost = 0;

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return scx_fail(err, errno == ENOENT ? SOFTCXI_ENOTFOUND : SOFTCXI_EIO,
                        "share file %s: %s", path, strerror(errno));
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (n < 0)
        return scx_fail(err, SOFTCXI_EIO, "share file %s: %s", path, strerror(errno));
    if (scx_frame_parse(&f, &info, buf, (size_t)n, &why) != 0)
        return scx_fail(err, SOFTCXI_EFORMAT, "share file %s is corrupt: %s", path, why.msg);
    if (f.type != SCX_TYPE_MBK_SHARE || f.ct_len != SHARE_LEN ||
        tlv_u8(f.attrs, f.attrs_len, A_SCHEME, &meta->scheme) ||
        tlv_u8(f.attrs, f.attrs_len, A_INDEX, &meta->index) ||
        tlv_u8(f.attrs, f.attrs_len, A_M, &meta->m) || tlv_u8(f.attrs, f.attrs_len, A_N, &meta->n) ||
        tlv_u8(f.attrs, f.attrs_len, A_COST, &cost) || cost < 10 || cost > 20 ||
        meta->index < 1 || meta->index > meta->n || meta->m < 1 || meta->m > meta->n)
        return scx_fail(err, SOFTCXI_EFORMAT, "%s is not a softcxi MBK share file", path);
    memcpy(meta->kcv, f.kcv, SCX_KCV_LEN);

    scx_xaes x;
    EVP_CIPHER_CTX *gcm = EVP_CIPHER_CTX_new();
    int rc = gcm ? password_key(key, password, f.salt, cost) : SOFTCXI_ENOMEM;
    if (rc == 0 && (rc = scx_xaes_init(&x, key)) == 0) {
        rc = scx_xaes_open(&x, gcm, share, f.ct, f.ct_len, f.tag, f.salt, buf, f.aad_len);
        scx_xaes_clear(&x);
    }
    OPENSSL_cleanse(key, sizeof key);
    OPENSSL_cleanse(buf, sizeof buf);
    EVP_CIPHER_CTX_free(gcm);
    if (rc == SOFTCXI_ETAMPER)
        return scx_fail(err, SOFTCXI_EAUTH,
                        "share file %s: wrong password (or the file was altered)", path);
    if (rc)
        return scx_fail_ssl(err, rc, "share file %s: opening failed", path);
    return 0;
}

int scx_mbk_combine_files(uint8_t mbk[32], const char *const *paths,
                          const char *const *passwords, size_t k, softcxi_error *err)
{
    uint8_t (*shares)[SHARE_LEN] = OPENSSL_secure_zalloc(255 * SHARE_LEN);
    uint8_t index[255], check[SCX_KCV_LEN];
    share_meta first, meta;
    int rc = 0;
    char want[17], got[17];

    if (!shares)
        return scx_fail(err, SOFTCXI_ENOMEM, "mbk import: out of secure memory");
    if (k == 0 || k > 255) {
        rc = scx_fail(err, SOFTCXI_EINVAL, "mbk import: give 1 to 255 share files, not %zu", k);
        goto done;
    }
    for (size_t i = 0; i < k && rc == 0; i++) {
        if ((rc = read_share(shares[i], i ? &meta : &first, paths[i],
                             passwords[i] ? passwords[i] : "", err)) != 0)
            break;
        if (i == 0) {
            index[0] = (uint8_t)first.index;
            continue;
        }
        if (memcmp(meta.kcv, first.kcv, SCX_KCV_LEN) != 0) {
            scx_hex(want, first.kcv, SCX_KCV_LEN);
            scx_hex(got, meta.kcv, SCX_KCV_LEN);
            rc = scx_fail(err, SOFTCXI_EMBK,
                          "share file %s belongs to MBK %s, but %s to MBK %s", paths[i], got,
                          paths[0], want);
        } else if (meta.scheme != first.scheme || meta.m != first.m || meta.n != first.n) {
            rc = scx_fail(err, SOFTCXI_EFORMAT, "share file %s was split differently from %s",
                          paths[i], paths[0]);
        }
        for (size_t l = 0; rc == 0 && l < i; l++)
            if (index[l] == meta.index)
                rc = scx_fail(err, SOFTCXI_EINVAL,
                              "share files %s and %s are the same share (#%u)", paths[l],
                              paths[i], meta.index);
        index[i] = (uint8_t)meta.index;
    }
    if (rc)
        goto done;
    if (k < first.m) {
        scx_hex(want, first.kcv, SCX_KCV_LEN);
        rc = scx_fail(err, SOFTCXI_EINVAL, "mbk import: MBK %s needs %u of its %u shares, got %zu",
                      want, first.m, first.n, k);
        goto done;
    }
    /* Exactly m shares enter the interpolation: more add nothing. */
    if ((rc = scx_shares_combine(mbk, (const uint8_t(*)[SHARE_LEN])shares, index, first.m,
                                 (int)first.scheme)) != 0 ||
        (rc = scx_kcv(check, mbk)) != 0) {
        rc = scx_fail(err, rc ? rc : SOFTCXI_ECRYPTO, "mbk import: combining failed");
        goto done;
    }
    if (CRYPTO_memcmp(check, first.kcv, SCX_KCV_LEN) != 0) {
        scx_hex(want, first.kcv, SCX_KCV_LEN);
        scx_hex(got, check, SCX_KCV_LEN);
        rc = scx_fail(err, SOFTCXI_ETAMPER,
                      "mbk import: the shares combine to a key with check value %s, not %s", got,
                      want);
    }
done:
    if (rc)
        OPENSSL_cleanse(mbk, 32);
    OPENSSL_secure_clear_free(shares, 255 * SHARE_LEN);
    return rc;
}
