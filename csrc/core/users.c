/*
 * users.c - the device's users, logon and the access rules.
 *
 * <path>/users.db holds every user, sealed at rest in the blob framing
 * (type 0x12) under a key derived from the device key with the label
 * "softcxi/v1/users": a copy of the state directory alone reveals nothing,
 * and the users survive an MBK rotation.  The sealed payload is
 *
 *   u32 count | 0x80000000, then per user:
 *     u8 name_len, name | u8 role | u8 level | u16 groups_len, groups
 *     | u8 kdf_cost | 16 salt | 32 verifier | u32 failures | i64 locked_until
 *     | u8 pub_len, pub
 *
 * (A file written before logon_sign existed has the top bit of count clear
 * and no pub fields; it still reads.)  verifier = scrypt(password, salt,
 * N = 2^kdf_cost, r = 8, p = 1); kdf_cost 0 means the user has no password.
 * pub is the SubjectPublicKeyInfo DER of the user's logon key (EC P-256 or
 * Ed25519), empty when the user has none: logon_sign checks a signature of
 * a fresh device challenge against it.  groups is
 * a comma-separated list of group names or prefixes ending in '*' ("iot-*",
 * or "*" for all), as CXI_GROUP allows.
 *
 * Every change (a user added, a failed logon counted) rewrites the file
 * under an exclusive flock of <path>/users.lock (temp + fsync + rename), so
 * concurrent processes never lose an update; every logon and user call
 * reads the file afresh, so a change made by one process is seen by the
 * next call of every other.
 *
 * Authentication levels add up over the users logged on in one session;
 * administrative calls need the administrators' sum to reach the device's
 * threshold (SCX_ADMIN_THRESHOLD), as on a CryptoServer: the administrator
 * made by init has level 2 and may act alone; two level-1 administrators
 * give dual control.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define USERS_FILE "users.db"
#define USERS_LOCK "users.lock"
#define USERS_MAX_FILE (1u << 20)
#define SALT_LEN 16
#define VERIFIER_LEN 32

/* Failed logons: the first FREE_FAILURES cost nothing; after that the user
 * is locked out for 2^(n - FREE_FAILURES) seconds, at most LOCK_MAX. */
#define FREE_FAILURES 3
#define LOCK_MAX 900

#define PUB_MAX 128              /* SPKI DER: P-256 91 bytes, Ed25519 44 */
#define FORMAT_V2 0x80000000u    /* count's top bit: users carry a pub */
#define CHALLENGE_TTL 120        /* seconds a logon challenge stays good */
#define LOGON_LABEL "softcxi-logon-v1"

typedef struct user {
    char name[SCX_USER_NAME_MAX + 1];
    unsigned role, level;
    char groups[SCX_GROUPS_MAX + 1];
    unsigned cost;
    uint8_t salt[SALT_LEN], verifier[VERIFIER_LEN];
    uint32_t failures;
    int64_t locked_until;
    uint8_t pub[PUB_MAX];
    size_t pub_len;
} user;

typedef struct users {
    user *u;
    size_t n;
} users;

static void users_free(users *us)
{
    if (us->u)
        OPENSSL_clear_free(us->u, us->n * sizeof *us->u);
    us->u = NULL;
    us->n = 0;
}

/* ---- password verifiers ------------------------------------------------ */

static int verifier(uint8_t out[VERIFIER_LEN], const char *password, const uint8_t salt[SALT_LEN],
                    unsigned cost)
{
    return scx_scrypt(out, VERIFIER_LEN, password, salt, SALT_LEN, cost);
}

static int set_password(user *u, const char *password, unsigned cost, softcxi_error *err)
{
    if (!password || strlen(password) < 8)
        return scx_fail(err, SOFTCXI_EINVAL, "user '%s': a password needs 8 characters or more",
                        u->name);
    if (cost < 10 || cost > 20)
        return scx_fail(err, SOFTCXI_EINVAL, "kdf_cost %u is out of 10..20", cost);
    u->cost = cost;
    if (RAND_bytes(u->salt, SALT_LEN) != 1 || verifier(u->verifier, password, u->salt, cost) != 0)
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "user '%s': hashing the password failed",
                            u->name);
    return 0;
}

/* ---- the file ---------------------------------------------------------- */

static int users_key(scx_xaes *x, const softcxi_device *dev)
{
    return scx_xaes_init(x, dev->sec->state_key);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static size_t serialize(uint8_t *out, const users *us)
{
    size_t k = 4;
    put_u32(out, (uint32_t)us->n | FORMAT_V2);
    for (size_t i = 0; i < us->n; i++) {
        const user *u = &us->u[i];
        size_t nl = strlen(u->name), gl = strlen(u->groups);
        out[k++] = (uint8_t)nl;
        memcpy(out + k, u->name, nl), k += nl;
        out[k++] = (uint8_t)u->role;
        out[k++] = (uint8_t)u->level;
        scx_put16(out + k, (unsigned)gl), k += 2;
        memcpy(out + k, u->groups, gl), k += gl;
        out[k++] = (uint8_t)u->cost;
        memcpy(out + k, u->salt, SALT_LEN), k += SALT_LEN;
        memcpy(out + k, u->verifier, VERIFIER_LEN), k += VERIFIER_LEN;
        put_u32(out + k, u->failures), k += 4;
        put_u32(out + k, (uint32_t)((uint64_t)u->locked_until >> 32));
        put_u32(out + k + 4, (uint32_t)u->locked_until), k += 8;
        out[k++] = (uint8_t)u->pub_len;
        memcpy(out + k, u->pub, u->pub_len), k += u->pub_len;
    }
    return k;
}

static size_t serialized_max(const users *us)
{
    return 4 + us->n * (1 + SCX_USER_NAME_MAX + 2 + 2 + SCX_GROUPS_MAX + 1 + SALT_LEN +
                        VERIFIER_LEN + 4 + 8 + 1 + PUB_MAX);
}

static int deserialize(users *us, const uint8_t *p, size_t len)
{
    size_t k = 4;
    if (len < 4)
        return -1;
    uint32_t head = get_u32(p);
    int v2 = (head & FORMAT_V2) != 0;
    size_t n = head & ~FORMAT_V2;
    if (n > 10000)
        return -1;
    us->u = OPENSSL_zalloc((n ? n : 1) * sizeof *us->u);
    if (!us->u)
        return -1;
    us->n = n;
    for (size_t i = 0; i < n; i++) {
        user *u = &us->u[i];
        if (len - k < 1)
            return -1;
        size_t nl = p[k++];
        if (nl == 0 || nl > SCX_USER_NAME_MAX || len - k < nl + 4)
            return -1;
        memcpy(u->name, p + k, nl), k += nl;
        u->role = p[k++];
        u->level = p[k++];
        size_t gl = scx_get16(p + k);
        k += 2;
        if (gl > SCX_GROUPS_MAX || len - k < gl + 1 + SALT_LEN + VERIFIER_LEN + 12)
            return -1;
        memcpy(u->groups, p + k, gl), k += gl;
        u->cost = p[k++];
        memcpy(u->salt, p + k, SALT_LEN), k += SALT_LEN;
        memcpy(u->verifier, p + k, VERIFIER_LEN), k += VERIFIER_LEN;
        u->failures = get_u32(p + k), k += 4;
        u->locked_until = (int64_t)((uint64_t)get_u32(p + k) << 32 | get_u32(p + k + 4)), k += 8;
        if (v2) {
            if (len - k < 1 || p[k] > PUB_MAX || len - k - 1 < p[k])
                return -1;
            u->pub_len = p[k++];
            memcpy(u->pub, p + k, u->pub_len), k += u->pub_len;
        }
        if ((u->cost == 0 && u->pub_len == 0) || memchr(u->name, 0, nl) || memchr(u->groups, 0, gl))
            return -1;
    }
    return k == len ? 0 : -1;
}

static char *users_path(const softcxi_device *dev, const char *name)
{
    size_t n = strlen(dev->path) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dev->path, name);
    return p;
}

static int users_load(const softcxi_device *dev, users *us, softcxi_error *err)
{
    uint8_t *buf = NULL, *pt = NULL;
    char *path = users_path(dev, USERS_FILE);
    int rc = 0, fd = -1;
    scx_frame f;
    softcxi_key_info info;
    softcxi_error why;
    struct stat st;
    scx_xaes x;
    int have_x = 0;

    us->u = NULL, us->n = 0;
    if (!path)
        return scx_fail(err, SOFTCXI_ENOMEM, "users: out of memory");
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = scx_fail(err, errno == ENOENT ? SOFTCXI_ENOTFOUND : SOFTCXI_EIO,
                      "users: %s: %s", path, strerror(errno));
        goto done;
    }
    if (fstat(fd, &st) != 0 || st.st_size <= 0 || (size_t)st.st_size > USERS_MAX_FILE ||
        !(buf = OPENSSL_malloc((size_t)st.st_size))) {
        rc = scx_fail(err, SOFTCXI_EFORMAT, "users: %s has an impossible size", path);
        goto done;
    }
    size_t len = (size_t)st.st_size;
    if (read(fd, buf, len) != (ssize_t)len) {
        rc = scx_fail(err, SOFTCXI_EIO, "users: reading %s failed", path);
        goto done;
    }
    if (scx_frame_parse(&f, &info, buf, len, &why) != 0 || f.type != SCX_TYPE_USERS) {
        rc = scx_fail(err, SOFTCXI_EFORMAT, "users: %s is corrupt: %s", path,
                      why.msg[0] ? why.msg : "not a users file");
        goto done;
    }
    if (!(pt = OPENSSL_secure_malloc(f.ct_len ? f.ct_len : 1)) || users_key(&x, dev) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ENOMEM, "users: out of memory");
        goto done;
    }
    have_x = 1;
    rc = scx_xaes_open(&x, dev->gcm, pt, f.ct, f.ct_len, f.tag, f.salt, buf, f.aad_len);
    if (rc == SOFTCXI_ETAMPER) {
        rc = scx_fail(err, SOFTCXI_ETAMPER, "users: %s fails authentication (tampered, or "
                                            "another device's)",
                      path);
        goto done;
    }
    if (rc || deserialize(us, pt, f.ct_len) != 0) {
        users_free(us);
        rc = scx_fail(err, SOFTCXI_EFORMAT, "users: %s is corrupt", path);
    }
done:
    if (have_x)
        scx_xaes_clear(&x);
    if (pt)
        OPENSSL_secure_clear_free(pt, f.ct_len ? f.ct_len : 1);
    OPENSSL_free(buf);
    if (fd >= 0)
        close(fd);
    free(path);
    return rc;
}

static int users_save(const softcxi_device *dev, const users *us, softcxi_error *err)
{
    size_t cap = serialized_max(us);
    uint8_t *pt = OPENSSL_secure_malloc(cap), salt[SCX_SALT_LEN], kcv[SCX_KCV_LEN];
    uint8_t *out = NULL;
    char *path = users_path(dev, USERS_FILE), tmp[4200];
    scx_xaes x;
    int rc = 0, have_x = 0;

    if (!pt || !path) {
        rc = scx_fail(err, SOFTCXI_ENOMEM, "users: out of memory");
        goto done;
    }
    size_t len = serialize(pt, us);
    size_t total = SCX_HDR_LEN + len + SCX_TAG_LEN;
    if (len > SCX_MAX_SECRET || !(out = OPENSSL_malloc(total))) {
        rc = scx_fail(err, SOFTCXI_EFULL, "users: too many users");
        goto done;
    }
    if (RAND_bytes(salt, sizeof salt) != 1 || scx_kcv(kcv, dev->sec->state_key) != 0 ||
        users_key(&x, dev) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "users: sealing failed");
        goto done;
    }
    have_x = 1;
    if (scx_frame_seal(out, SCX_TYPE_USERS, kcv, salt, NULL, 0, pt, len, &x, dev->gcm) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "users: sealing failed");
        goto done;
    }
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
    rc = scx_write_file_atomic(path, tmp, out, total, err);
done:
    if (have_x)
        scx_xaes_clear(&x);
    if (pt)
        OPENSSL_secure_clear_free(pt, cap);
    OPENSSL_free(out);
    free(path);
    return rc;
}

/* Exclusive lock around a read-modify-write of users.db. */
static int users_lock(const softcxi_device *dev, softcxi_error *err)
{
    char *path = users_path(dev, USERS_LOCK);
    int fd = path ? open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600) : -1;
    if (fd < 0 || flock(fd, LOCK_EX) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        scx_fail(err, SOFTCXI_EIO, "users: cannot lock %s: %s", path ? path : "users.lock",
                 strerror(e));
        free(path);
        return -1;
    }
    free(path);
    return fd;
}

static void users_unlock(int fd)
{
    if (fd >= 0)
        close(fd); /* releases the flock */
}

static user *find_user(users *us, const char *name)
{
    for (size_t i = 0; i < us->n; i++)
        if (!strcmp(us->u[i].name, name))
            return &us->u[i];
    return NULL;
}

/* ---- creation (init) ---------------------------------------------------- */

int scx_users_create(const softcxi_device *dev, const char *admin, const char *password,
                     unsigned cost, softcxi_error *err)
{
    users us = {OPENSSL_zalloc(sizeof(user)), 1};
    if (!us.u)
        return scx_fail(err, SOFTCXI_ENOMEM, "users: out of memory");
    user *u = &us.u[0];
    if (!admin || !*admin || strlen(admin) > SCX_USER_NAME_MAX || strchr(admin, ',')) {
        users_free(&us);
        return scx_fail(err, SOFTCXI_EINVAL, "init: the administrator needs a name of 1 to %d "
                                             "characters",
                        SCX_USER_NAME_MAX);
    }
    snprintf(u->name, sizeof u->name, "%s", admin);
    u->role = SCX_ROLE_ADMIN;
    u->level = SCX_ADMIN_THRESHOLD;
    int rc = set_password(u, password, cost, err);
    if (rc == 0)
        rc = users_save(dev, &us, err);
    users_free(&us);
    return rc;
}

/* ---- logon keys (logon_sign) -------------------------------------------- */

/* Only EC P-256 (ECDSA-SHA256) and Ed25519 keys log on. */
static int logon_key_ok(EVP_PKEY *pk)
{
    char group[64];
    size_t gl = 0;
    if (EVP_PKEY_is_a(pk, "ED25519"))
        return 1;
    return EVP_PKEY_is_a(pk, "EC") && scx_ec_named(pk) &&
           EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                          &gl) == 1 &&
           strcmp(group, "prime256v1") == 0;
}

/* Encrypted PEM is refused rather than prompting on a terminal. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf, (void)size, (void)rwflag, (void)u;
    return -1;
}

static int is_pem(const uint8_t *data, size_t len)
{
    return len > 11 && len < INT32_MAX && memcmp(data, "-----BEGIN", 10) == 0;
}

/* A user's logon key: SPKI DER or PEM, kept as DER in u->pub. */
static int set_pubkey(user *u, const uint8_t *data, size_t len, softcxi_error *err)
{
    EVP_PKEY *pk = NULL;
    if (is_pem(data, len)) {
        BIO *b = BIO_new_mem_buf(data, (int)len);
        pk = b ? PEM_read_bio_PUBKEY(b, NULL, no_passphrase, NULL) : NULL;
        BIO_free(b);
    } else if (len > 0 && len < INT32_MAX) {
        const unsigned char *p = data;
        pk = d2i_PUBKEY(NULL, &p, (long)len);
        if (pk && p != data + len) {
            EVP_PKEY_free(pk);
            pk = NULL;
        }
    }
    if (!pk)
        return scx_fail_ssl(err, SOFTCXI_EINVAL,
                            "user '%s': pubkey is not a public key (SubjectPublicKeyInfo PEM or "
                            "DER)",
                            u->name);
    unsigned char *der = NULL;
    int n = logon_key_ok(pk) ? i2d_PUBKEY(pk, &der) : -1;
    EVP_PKEY_free(pk);
    if (n <= 0 || (size_t)n > PUB_MAX) {
        OPENSSL_free(der);
        return scx_fail_ssl(err, SOFTCXI_EINVAL,
                            "user '%s': a logon key is EC P-256 or Ed25519", u->name);
    }
    memcpy(u->pub, der, (size_t)n);
    u->pub_len = (size_t)n;
    OPENSSL_free(der);
    return 0;
}

/* What the user's key signs: a label, the device, the user and the fresh
 * challenge, so that a signature answers one challenge of one device for
 * one user and nothing else. */
#define MSG_MAX (sizeof LOGON_LABEL + 33 + SCX_USER_NAME_MAX + 1 + 32)
static size_t challenge_message(uint8_t out[MSG_MAX], const char *dev_id, const char *name,
                                const uint8_t challenge[32])
{
    size_t k = 0, il = strlen(dev_id), nl = strlen(name);
    memcpy(out, LOGON_LABEL, sizeof LOGON_LABEL), k += sizeof LOGON_LABEL; /* with its NUL */
    memcpy(out + k, dev_id, il), k += il;
    out[k++] = 0;
    memcpy(out + k, name, nl), k += nl;
    out[k++] = 0;
    memcpy(out + k, challenge, 32), k += 32;
    return k;
}

/* 1: the signature verifies, 0: it does not, < 0: error. */
static int verify_signature(const user *u, const uint8_t *msg, size_t msg_len,
                            const uint8_t *sig, size_t sig_len)
{
    const unsigned char *p = u->pub;
    EVP_PKEY *pk = d2i_PUBKEY(NULL, &p, (long)u->pub_len);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int rc = -1;
    if (pk && md) {
        int ed = EVP_PKEY_is_a(pk, "ED25519");
        rc = EVP_DigestVerifyInit_ex(md, NULL, ed ? NULL : "SHA256", NULL, NULL, pk, NULL) == 1 &&
             EVP_DigestVerify(md, sig, sig_len, msg, msg_len) == 1;
    }
    ERR_clear_error();
    EVP_MD_CTX_free(md);
    EVP_PKEY_free(pk);
    return rc;
}

int softcxi_logon_answer(softcxi_buf *sig, const uint8_t *msg, size_t msg_len,
                         const uint8_t *key, size_t key_len, softcxi_error *err)
{
    EVP_PKEY *pk = NULL;
    EVP_MD_CTX *md = NULL;
    size_t n = 0;
    int rc = 0;

    sig->data = NULL, sig->len = 0, sig->secret = 0;
    if (is_pem(key, key_len)) {
        BIO *b = BIO_new_mem_buf(key, (int)key_len);
        pk = b ? PEM_read_bio_PrivateKey(b, NULL, no_passphrase, NULL) : NULL;
        BIO_free(b);
    } else if (key_len > 0 && key_len < INT32_MAX) {
        const unsigned char *p = key;
        pk = d2i_AutoPrivateKey(NULL, &p, (long)key_len);
        if (pk && p != key + key_len) {
            EVP_PKEY_free(pk);
            pk = NULL;
        }
    }
    if (!pk || !logon_key_ok(pk)) {
        rc = scx_fail(err, SOFTCXI_EINVAL,
                      "logon key: not an EC P-256 or Ed25519 private key (PKCS#8 or SEC1, PEM "
                      "or DER, unencrypted)");
        goto done;
    }
    int ed = EVP_PKEY_is_a(pk, "ED25519");
    if (!(md = EVP_MD_CTX_new()) ||
        EVP_DigestSignInit_ex(md, NULL, ed ? NULL : "SHA256", NULL, NULL, pk, NULL) != 1 ||
        EVP_DigestSign(md, NULL, &n, msg, msg_len) != 1 || !(sig->data = OPENSSL_malloc(n)) ||
        EVP_DigestSign(md, sig->data, &n, msg, msg_len) != 1) {
        softcxi_buf_free(sig);
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "logon key: signing the challenge failed");
        goto done;
    }
    sig->len = n;
    scx_ok(err);
done:
    EVP_MD_CTX_free(md);
    EVP_PKEY_free(pk); /* frees (and clears) the private key */
    ERR_clear_error();
    return rc;
}

/* ---- logon ------------------------------------------------------------- */

/* A credential to check: a password, or a signature of a challenge. */
typedef struct credential {
    const char *op;       /* "logon_pass" / "logon_sign" */
    const char *password; /* or */
    const uint8_t *msg, *sig;
    size_t msg_len, sig_len;
} credential;

/* 1 good, 0 wrong (*why says how, for the audit), < 0 error (err set). */
static int credential_check(const user *u, const credential *c, const char **why,
                            softcxi_error *err)
{
    if (c->password) {
        uint8_t v[VERIFIER_LEN];
        if (u->cost == 0) {
            *why = "no password";
            return 0;
        }
        if (verifier(v, c->password, u->salt, u->cost) != 0)
            return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "logon_pass: hashing failed");
        int good = CRYPTO_memcmp(v, u->verifier, VERIFIER_LEN) == 0;
        OPENSSL_cleanse(v, sizeof v);
        *why = "wrong password";
        return good;
    }
    if (!u->pub_len) {
        *why = "no logon key";
        return 0;
    }
    int good = verify_signature(u, c->msg, c->msg_len, c->sig, c->sig_len);
    if (good < 0)
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "logon_sign: verifying failed");
    *why = "bad signature";
    return good;
}

static int logon(softcxi_session *s, const char *name, const credential *c)
{
    softcxi_device *dev = s->dev;
    const char *op = c->op, *what = c->password ? "password" : "signature";
    users us;
    int rc, lock;

    if ((lock = users_lock(dev, &s->err)) < 0)
        return s->err.code;
    if ((rc = users_load(dev, &us, &s->err)) != 0) {
        users_unlock(lock);
        return rc;
    }
    user *u = find_user(&us, name);
    int64_t now = (int64_t)time(NULL);
    const char *why = "";
    if (!u) {
        if (c->password) {
            /* The same work as for a known user: timing does not tell who exists. */
            uint8_t v[VERIFIER_LEN], salt[SALT_LEN] = {0};
            (void)verifier(v, c->password, salt, SCX_KDF_COST);
            OPENSSL_cleanse(v, sizeof v);
        }
        rc = scx_audit(s, "logon-failed", name, "unknown user");
        if (rc == 0)
            rc = scx_fail(&s->err, SOFTCXI_EAUTH, "%s: unknown user or wrong %s for '%s'", op,
                          what, name);
    } else if (u->locked_until > now) {
        (void)scx_audit(s, "logon-failed", name, "locked out");
        rc = scx_fail(&s->err, SOFTCXI_EAUTH,
                      "%s: user '%s' is locked out for %lld more seconds after %u failed "
                      "logons",
                      op, name, (long long)(u->locked_until - now), u->failures);
    } else if ((rc = credential_check(u, c, &why, &s->err)) < 0) {
        /* an error, not a wrong credential: nothing counted */
    } else if (rc == 0) {
        /* Counted on disk, so a restart does not reset it. */
        u->failures++;
        if (u->failures > FREE_FAILURES) {
            unsigned shift = u->failures - FREE_FAILURES;
            int64_t wait = shift >= 10 ? LOCK_MAX : (int64_t)1 << shift;
            u->locked_until = now + (wait > LOCK_MAX ? LOCK_MAX : wait);
        }
        int src = users_save(dev, &us, &s->err);
        if (src == 0)
            src = scx_audit(s, "logon-failed", name, why);
        if (src)
            rc = src;
        else if (!strcmp(why, "no password"))
            rc = scx_fail(&s->err, SOFTCXI_EAUTH,
                          "logon_pass: user '%s' has no password: log on with logon_sign", name);
        else if (!strcmp(why, "no logon key"))
            rc = scx_fail(&s->err, SOFTCXI_EAUTH,
                          "logon_sign: user '%s' has no logon key: log on with logon_pass", name);
        else
            rc = scx_fail(&s->err, SOFTCXI_EAUTH, "%s: unknown user or wrong %s for '%s'", op,
                          what, name);
    } else {
        rc = 0;
        if (u->failures || u->locked_until) {
            u->failures = 0;
            u->locked_until = 0;
            rc = users_save(dev, &us, &s->err);
        }
        const char *role = u->role == SCX_ROLE_ADMIN ? "admin" : "user";
        char detail[32];
        snprintf(detail, sizeof detail, "%s%s", role, c->password ? "" : " by key");
        if (rc == 0)
            rc = scx_audit(s, "logon", name, detail);
        if (rc == 0) {
            scx_logon *l = &s->logons[s->nlogons++];
            snprintf(l->name, sizeof l->name, "%s", u->name);
            snprintf(l->groups, sizeof l->groups, "%s", u->groups);
            l->role = u->role;
            l->level = u->level;
            scx_ok(&s->err);
        }
    }
    users_free(&us);
    users_unlock(lock);
    return rc;
}

/* What every logon checks before it looks at a credential. */
static int logon_precheck(softcxi_session *s, const char *name, const char *op)
{
    if (!s->dev->path)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "%s: this device has no users", op);
    if (!*name || strlen(name) > SCX_USER_NAME_MAX)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "%s: a user name has 1 to %d characters", op,
                        SCX_USER_NAME_MAX);
    if (s->nlogons >= SCX_MAX_LOGONS)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "%s: %d users are logged on already", op,
                        SCX_MAX_LOGONS);
    for (int i = 0; i < s->nlogons; i++)
        if (!strcmp(s->logons[i].name, name))
            return scx_fail(&s->err, SOFTCXI_EINVAL, "%s: '%s' is logged on already", op, name);
    return 0;
}

int softcxi_logon_pass(softcxi_session *s, const char *name, const char *password)
{
    int rc;
    if (!name || !password)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "logon_pass: name and password are required");
    if ((rc = logon_precheck(s, name, "logon_pass")) != 0)
        return rc;
    credential c = {"logon_pass", password, NULL, NULL, 0, 0};
    return logon(s, name, &c);
}

int softcxi_logon_challenge(softcxi_session *s, softcxi_buf *msg, const char *name)
{
    uint8_t m[MSG_MAX];
    int rc;
    msg->data = NULL, msg->len = 0, msg->secret = 0;
    if (!name)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "logon_challenge: a user name is required");
    if ((rc = logon_precheck(s, name, "logon_challenge")) != 0)
        return rc;
    /* Handed out whether or not the user exists: the answer tells, and it
     * is checked, counted and audited like a password. */
    if (RAND_bytes(s->challenge, sizeof s->challenge) != 1)
        return scx_fail_ssl(&s->err, SOFTCXI_ECRYPTO, "logon_challenge: random generator failed");
    snprintf(s->challenge_user, sizeof s->challenge_user, "%s", name);
    s->challenge_time = (int64_t)time(NULL);
    s->has_challenge = 1;
    size_t n = challenge_message(m, s->dev->id, name, s->challenge);
    if (!(msg->data = OPENSSL_memdup(m, n)))
        return scx_fail(&s->err, SOFTCXI_ENOMEM, "logon_challenge: out of memory");
    msg->len = n;
    scx_ok(&s->err);
    return 0;
}

int softcxi_logon_response(softcxi_session *s, const char *name, const uint8_t *sig,
                           size_t sig_len)
{
    uint8_t m[MSG_MAX], challenge[32];
    int rc;
    if (!name || !sig)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "logon_sign: name and signature are required");
    if ((rc = logon_precheck(s, name, "logon_sign")) != 0)
        return rc;
    if (!s->has_challenge || strcmp(s->challenge_user, name) != 0)
        return scx_fail(&s->err, SOFTCXI_EINVAL,
                        "logon_sign: no challenge was handed out for '%s' in this session "
                        "(logon_challenge first)",
                        name);
    /* One answer per challenge, right or wrong. */
    memcpy(challenge, s->challenge, sizeof challenge);
    int64_t age = (int64_t)time(NULL) - s->challenge_time;
    OPENSSL_cleanse(s->challenge, sizeof s->challenge);
    s->has_challenge = 0;
    if (age < 0 || age > CHALLENGE_TTL)
        return scx_fail(&s->err, SOFTCXI_EAUTH,
                        "logon_sign: the challenge for '%s' is %lld seconds old (at most %d): "
                        "ask for a new one",
                        name, (long long)age, CHALLENGE_TTL);
    size_t n = challenge_message(m, s->dev->id, name, challenge);
    credential c = {"logon_sign", NULL, m, sig, n, sig_len};
    return logon(s, name, &c);
}

int softcxi_logon_sign(softcxi_session *s, const char *name, const uint8_t *key, size_t key_len)
{
    softcxi_buf msg = {0}, sig = {0};
    int rc = softcxi_logon_challenge(s, &msg, name);
    if (rc == 0 && (rc = softcxi_logon_answer(&sig, msg.data, msg.len, key, key_len,
                                              &s->err)) != 0) {
        /* a key that cannot sign never reached the device: nothing counted */
        char why[SOFTCXI_ERRSTR_MAX];
        snprintf(why, sizeof why, "%s", s->err.msg);
        scx_fail(&s->err, rc, "logon_sign: user '%s': %s", name, why);
        OPENSSL_cleanse(s->challenge, sizeof s->challenge);
        s->has_challenge = 0;
    }
    if (rc == 0)
        rc = softcxi_logon_response(s, name, sig.data, sig.len);
    softcxi_buf_free(&msg);
    softcxi_buf_free(&sig);
    return rc;
}

void softcxi_logoff(softcxi_session *s)
{
    OPENSSL_cleanse(s->logons, sizeof s->logons);
    s->nlogons = 0;
    OPENSSL_cleanse(s->challenge, sizeof s->challenge);
    s->has_challenge = 0;
}

/* ---- access rules ------------------------------------------------------ */

static int group_matches(const char *patterns, const char *group, size_t group_len)
{
    const char *p = patterns;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == 0) {
            /* an empty entry (",iot") names no group */
        } else if (p[n - 1] == '*') {
            if (group_len >= n - 1 && memcmp(group, p, n - 1) == 0)
                return 1;
        } else if (n == group_len && memcmp(group, p, n) == 0) {
            return 1;
        }
        p += n + (end ? 1 : 0);
    }
    return 0;
}

int scx_access_key(softcxi_session *s, const char *group, size_t group_len, const char *op)
{
    if (s->dev->open_access)
        return 0;
    if (s->nlogons == 0)
        return scx_fail(&s->err, SOFTCXI_EAUTH, "%s: log on first (logon_pass)", op);
    for (int i = 0; i < s->nlogons; i++)
        if (group_matches(s->logons[i].groups, group ? group : "", group ? group_len : 0))
            return 0;
    return scx_fail(&s->err, SOFTCXI_EACCESS,
                    "%s: no user logged on here may use keys of group '%.*s'", op,
                    (int)(group_len > 64 ? 64 : group_len), group ? group : "");
}

int scx_access_admin(softcxi_session *s, const char *op)
{
    unsigned sum = 0;
    for (int i = 0; i < s->nlogons; i++)
        if (s->logons[i].role == SCX_ROLE_ADMIN)
            sum += s->logons[i].level;
    if (sum >= SCX_ADMIN_THRESHOLD)
        return 0;
    return scx_fail(&s->err, SOFTCXI_EAUTH,
                    "%s: needs administrators of authentication level %d in all; logged on: %u",
                    op, SCX_ADMIN_THRESHOLD, sum);
}

/* ---- user management --------------------------------------------------- */

static int valid_groups(const char *g)
{
    for (const char *p = g; *p; p++)
        if ((unsigned char)*p < 0x21 || *p == ';')
            return 0;
    return strlen(g) <= SCX_GROUPS_MAX;
}

int softcxi_user_add(softcxi_session *s, const softcxi_user_req *req)
{
    softcxi_device *dev = s->dev;
    users us;
    int rc, lock;

    if ((rc = scx_access_admin(s, "user_add")) != 0)
        return rc;
    if (!req->name || !*req->name || strlen(req->name) > SCX_USER_NAME_MAX)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "user_add: a name of 1 to %d characters",
                        SCX_USER_NAME_MAX);
    if (req->role != SCX_ROLE_ADMIN && req->role != SCX_ROLE_USER)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "user_add: role must be admin or user");
    if (req->level > SCX_ADMIN_THRESHOLD)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "user_add: level is 0 to %d",
                        SCX_ADMIN_THRESHOLD);
    if (req->groups && !valid_groups(req->groups))
        return scx_fail(&s->err, SOFTCXI_EINVAL, "user_add: groups '%s' is not a list of names",
                        req->groups);
    if ((rc = scx_audit_request(s, "user_add", req->name)) != 0)
        return rc;
    if ((lock = users_lock(dev, &s->err)) < 0)
        return s->err.code;
    if ((rc = users_load(dev, &us, &s->err)) != 0) {
        users_unlock(lock);
        scx_audit_outcome(s, "user_add", req->name, rc);
        return rc;
    }
    if (find_user(&us, req->name)) {
        rc = scx_fail(&s->err, SOFTCXI_EEXIST, "user_add: user '%s' exists", req->name);
    } else {
        user *grown = OPENSSL_zalloc((us.n + 1) * sizeof *grown);
        if (!grown) {
            rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "user_add: out of memory");
        } else {
            memcpy(grown, us.u, us.n * sizeof *grown);
            OPENSSL_clear_free(us.u, us.n * sizeof *us.u);
            us.u = grown;
            user *u = &us.u[us.n++];
            snprintf(u->name, sizeof u->name, "%s", req->name);
            snprintf(u->groups, sizeof u->groups, "%s", req->groups ? req->groups : "");
            u->role = (unsigned)req->role;
            u->level = req->level;
            if (!req->password && !req->pubkey)
                rc = scx_fail(&s->err, SOFTCXI_EINVAL,
                              "user_add: user '%s' needs a password or a pubkey", req->name);
            if (rc == 0 && req->password)
                rc = set_password(u, req->password,
                                  req->kdf_cost ? req->kdf_cost : SCX_KDF_COST, &s->err);
            if (rc == 0 && req->pubkey)
                rc = set_pubkey(u, req->pubkey, req->pubkey_len, &s->err);
            if (rc == 0)
                rc = users_save(dev, &us, &s->err);
        }
    }
    users_free(&us);
    users_unlock(lock);
    scx_audit_outcome(s, "user_add", req->name, rc);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

/* The administrators' levels, added up over every administrator: below the
 * threshold nobody could ever administer the device again. */
static unsigned admin_capacity(const users *us)
{
    unsigned sum = 0;
    for (size_t i = 0; i < us->n; i++)
        if (us->u[i].role == SCX_ROLE_ADMIN)
            sum += us->u[i].level;
    return sum;
}

static int logged_on_as(const softcxi_session *s, const char *name)
{
    for (int i = 0; i < s->nlogons; i++)
        if (!strcmp(s->logons[i].name, name))
            return 1;
    return 0;
}

int softcxi_user_set(softcxi_session *s, const softcxi_user_set_req *req)
{
    softcxi_device *dev = s->dev;
    users us;
    int rc, lock;
    const char *name = req->name ? req->name : "";
    int own = req->groups == NULL && req->level < 0 && !req->unlock;

    if (!*name)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "user_set: a user name is required");
    if (!req->password && !req->pubkey && !req->groups && req->level < 0 && !req->unlock)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "user_set: nothing to change for '%s'", name);
    /* A user may change his own password or logon key; the rest, and
     * anyone else's, is for administrators. */
    if (!(own && logged_on_as(s, name)) && (rc = scx_access_admin(s, "user_set")) != 0)
        return rc;
    if (req->level > (int)SCX_ADMIN_THRESHOLD)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "user_set: level is 0 to %d",
                        SCX_ADMIN_THRESHOLD);
    if (req->groups && !valid_groups(req->groups))
        return scx_fail(&s->err, SOFTCXI_EINVAL, "user_set: groups '%s' is not a list of names",
                        req->groups);
    char detail[200];
    scx_admins(s, detail, sizeof detail);
    snprintf(detail + strlen(detail), sizeof detail - strlen(detail), "%s%s%s%s%s%s",
             detail[0] ? " " : "by self ", req->password ? "password," : "",
             req->pubkey ? "pubkey," : "", req->groups ? "groups," : "",
             req->level >= 0 ? "level," : "", req->unlock ? "unlock," : "");
    detail[strlen(detail) - 1] = '\0'; /* the last comma */
    if ((rc = scx_audit(s, "user_set", name, detail)) != 0)
        return rc;
    if ((lock = users_lock(dev, &s->err)) < 0)
        return s->err.code;
    if ((rc = users_load(dev, &us, &s->err)) != 0) {
        users_unlock(lock);
        scx_audit_outcome(s, "user_set", name, rc);
        return rc;
    }
    user *u = find_user(&us, name), keep;
    if (!u) {
        rc = scx_fail(&s->err, SOFTCXI_ENOTFOUND, "user_set: no user '%s'", name);
    } else {
        /* Changes go to a copy: a bad field leaves the user as he was. */
        keep = *u;
        if (req->password)
            rc = set_password(&keep, req->password, req->kdf_cost ? req->kdf_cost : SCX_KDF_COST,
                              &s->err);
        if (rc == 0 && req->pubkey)
            rc = set_pubkey(&keep, req->pubkey, req->pubkey_len, &s->err);
        if (rc == 0) {
            if (req->groups)
                snprintf(keep.groups, sizeof keep.groups, "%s", req->groups);
            if (req->level >= 0)
                keep.level = (unsigned)req->level;
            if (req->unlock)
                keep.failures = 0, keep.locked_until = 0;
            user before = *u;
            *u = keep;
            unsigned cap = admin_capacity(&us);
            if (cap < SCX_ADMIN_THRESHOLD) {
                *u = before;
                rc = scx_fail(&s->err, SOFTCXI_EPOLICY,
                              "user_set: the administrators' levels would add up to %u, below "
                              "the %d needed to administer the device",
                              cap, SCX_ADMIN_THRESHOLD);
            }
            OPENSSL_cleanse(&before, sizeof before);
        }
        OPENSSL_cleanse(&keep, sizeof keep);
        if (rc == 0)
            rc = users_save(dev, &us, &s->err);
    }
    users_free(&us);
    users_unlock(lock);
    scx_audit_outcome(s, "user_set", name, rc);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

int softcxi_user_delete(softcxi_session *s, const char *name)
{
    softcxi_device *dev = s->dev;
    users us;
    int rc, lock;

    if ((rc = scx_access_admin(s, "user_delete")) != 0)
        return rc;
    if ((rc = scx_audit_request(s, "user_delete", name ? name : "")) != 0)
        return rc;
    if ((lock = users_lock(dev, &s->err)) < 0)
        return s->err.code;
    if ((rc = users_load(dev, &us, &s->err)) != 0) {
        users_unlock(lock);
        scx_audit_outcome(s, "user_delete", name ? name : "", rc);
        return rc;
    }
    user *u = find_user(&us, name ? name : "");
    size_t admins = 0;
    for (size_t i = 0; i < us.n; i++)
        admins += us.u[i].role == SCX_ROLE_ADMIN;
    if (!u) {
        rc = scx_fail(&s->err, SOFTCXI_ENOTFOUND, "user_delete: no user '%s'", name ? name : "");
    } else if (u->role == SCX_ROLE_ADMIN && admins == 1) {
        rc = scx_fail(&s->err, SOFTCXI_EPOLICY,
                      "user_delete: '%s' is the last administrator", name);
    } else if (u->role == SCX_ROLE_ADMIN &&
               admin_capacity(&us) - u->level < SCX_ADMIN_THRESHOLD) {
        rc = scx_fail(&s->err, SOFTCXI_EPOLICY,
                      "user_delete: without '%s' the administrators' levels add up to %u, below "
                      "the %d needed to administer the device",
                      name, admin_capacity(&us) - u->level, SCX_ADMIN_THRESHOLD);
    } else {
        size_t i = (size_t)(u - us.u);
        memmove(&us.u[i], &us.u[i + 1], (us.n - i - 1) * sizeof *us.u);
        OPENSSL_cleanse(&us.u[us.n - 1], sizeof *us.u);
        us.n--;
        rc = users_save(dev, &us, &s->err);
    }
    users_free(&us);
    users_unlock(lock);
    scx_audit_outcome(s, "user_delete", name ? name : "", rc);
    if (rc == 0)
        scx_ok(&s->err);
    return rc;
}

int softcxi_user_list(softcxi_session *s, softcxi_user_cb cb, void *ctx)
{
    users us;
    int rc;
    if ((rc = scx_access_admin(s, "user_list")) != 0)
        return rc;
    if ((rc = users_load(s->dev, &us, &s->err)) != 0)
        return rc;
    for (size_t i = 0; i < us.n; i++) {
        softcxi_user_info ui = {us.u[i].name, us.u[i].role == SCX_ROLE_ADMIN ? "admin" : "user",
                                us.u[i].level, us.u[i].groups, us.u[i].failures,
                                us.u[i].locked_until, us.u[i].cost != 0,
                                us.u[i].pub_len != 0};
        if (cb(ctx, &ui) != 0)
            break;
    }
    users_free(&us);
    scx_ok(&s->err);
    return 0;
}

int scx_users_count(softcxi_session *s, size_t *n)
{
    users us;
    int rc = users_load(s->dev, &us, &s->err);
    *n = rc == 0 ? us.n : 0;
    users_free(&us);
    return rc;
}
