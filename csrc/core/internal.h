/*
 * internal.h - what the core's files share and nothing outside may use.
 */
#ifndef SOFTCXI_INTERNAL_H
#define SOFTCXI_INTERNAL_H

#include "softcxi.h"

#include <openssl/evp.h>
#include <stdarg.h>
#include <sys/types.h>

/* ---- blob framing (docs/blob-format.md) -------------------------------- */

#define SCX_MAGIC 0x4Bu /* 'K' */
#define SCX_VERSION 1u
#define SCX_TYPE_KEY 0x01u        /* external key */
#define SCX_TYPE_KEY_BACKUP 0x02u /* reserved for key_backup */
#define SCX_TYPE_DB_BACKUP 0x03u  /* backup_database: the internal keys, under the MBK */
#define SCX_TYPE_DEVICE_MBK 0x10u /* the MBK sealed at rest under the device key */
#define SCX_TYPE_DEVICE_KEY 0x11u /* the device key file */
#define SCX_TYPE_USERS 0x12u      /* users.db, sealed under the device key */
#define SCX_TYPE_REVOKED 0x13u    /* revoked.db, sealed under the storage key */
#define SCX_TYPE_MBK_SHARE 0x20u  /* one MBK key share, sealed under its password */

#define SCX_KCV_LEN 8
#define SCX_SALT_LEN 24
#define SCX_TAG_LEN 16
#define SCX_HDR_LEN 40 /* magic..secret_len, before the attributes */
#define SCX_MIN_BLOB (SCX_HDR_LEN + SCX_TAG_LEN)
#define SCX_MAX_ATTRS 0xFFFFu
#define SCX_MAX_SECRET 0xFFFFu

/* Attribute tags; 0x80 marks a critical attribute (an unknown critical
 * attribute makes the blob unusable, an unknown plain one is kept). */
#define SCX_ATTR_CRITICAL 0x80u
#define SCX_A_ALGO 0x81u
#define SCX_A_CURVE 0x82u
#define SCX_A_SIZE 0x83u
#define SCX_A_USAGE 0x84u
#define SCX_A_EXPORT 0x85u
#define SCX_A_EXPIRY 0x86u
#define SCX_A_GROUP 0x87u
#define SCX_A_NAME 0x08u
#define SCX_A_SPECIFIER 0x09u
#define SCX_A_LABEL 0x0Au
#define SCX_A_GEN_DATE 0x0Bu
#define SCX_A_PUB 0x0Cu

/* Labels for everything derived from the MBK: one key, many purposes. */
#define SCX_LABEL_KCV "softcxi/v1/kcv"
#define SCX_LABEL_BLOB_KEY "softcxi/v1/blob/key"
#define SCX_LABEL_KEY_BACKUP "softcxi/v1/blob/key-backup"
#define SCX_LABEL_DB_BACKUP "softcxi/v1/blob/db-backup"
#define SCX_LABEL_DEVICE_MBK "softcxi/v1/blob/device-mbk"
#define SCX_LABEL_AUDIT "softcxi/v1/audit"
#define SCX_LABEL_STORAGE "softcxi/v1/storage"
#define SCX_LABEL_USERS "softcxi/v1/users" /* from the device key, not the MBK */
/* The audit log and the internal key database are sealed with keys from the
 * device key too, so that they outlive an MBK rotation. */

/* ---- errors ------------------------------------------------------------ */

#if defined(__GNUC__) || defined(__clang__)
#define SCX_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define SCX_PRINTF(a, b)
#endif

/* Set err (if not NULL) and return code.  scx_fail_ssl appends the drained
 * OpenSSL error queue.  Both leave the OpenSSL queue empty. */
int scx_fail(softcxi_error *err, int code, const char *fmt, ...) SCX_PRINTF(3, 4);
int scx_fail_ssl(softcxi_error *err, int code, const char *fmt, ...) SCX_PRINTF(3, 4);
void scx_ok(softcxi_error *err);

/* ---- memory ------------------------------------------------------------ */

/* Page-backed memory that is mlock()ed and excluded from core dumps. */
void *scx_locked_alloc(size_t len);
void scx_locked_free(void *p, size_t len);
/* OpenSSL's secure heap, initialised once per process.  The key cache keeps
 * its use under three quarters of it. */
#define SCX_SECURE_HEAP (4u << 20)
void scx_secure_heap_init(void);

void scx_hex(char *out, const uint8_t *in, size_t len); /* out: 2*len+1 */
/* Files: write everything (EINTR-safe); fsync a directory (after a rename). */
int scx_write_all(int fd, const void *buf, size_t n);
int scx_fsync_dir(const char *dir);

/* ---- primitives -------------------------------------------------------- */

/* XAES-256-GCM (C2SP): AES-256-GCM under a per-nonce subkey derived with two
 * AES blocks, safe for any number of messages under one key with random
 * 192-bit nonces. */
typedef struct scx_xaes {
    EVP_CIPHER_CTX *ecb; /* AES-256-ECB under the long-term key */
    EVP_CIPHER *gcm;     /* fetched once: implicit fetches cost a lock each */
    uint8_t k1[16];      /* CMAC subkey K1 = dbl(AES_K(0^128)) */
} scx_xaes;

int scx_xaes_init(scx_xaes *x, const uint8_t key[32]);
void scx_xaes_clear(scx_xaes *x);
/* A copy of src's contexts for another thread (an EVP_CIPHER_CTX is not
 * shared between threads); no raw key needed.  0 or SOFTCXI_ECRYPTO. */
int scx_xaes_dup(scx_xaes *dst, const scx_xaes *src);
/* 0 ok, SOFTCXI_ECRYPTO on failure. */
int scx_xaes_seal(scx_xaes *x, EVP_CIPHER_CTX *gcm, uint8_t *ct, uint8_t tag[SCX_TAG_LEN],
                  const uint8_t nonce[SCX_SALT_LEN], const uint8_t *aad, size_t aad_len,
                  const uint8_t *pt, size_t pt_len);
/* 0 ok, SOFTCXI_ETAMPER on a bad tag (pt wiped), SOFTCXI_ECRYPTO otherwise. */
int scx_xaes_open(scx_xaes *x, EVP_CIPHER_CTX *gcm, uint8_t *pt, const uint8_t *ct,
                  size_t ct_len, const uint8_t tag[SCX_TAG_LEN], const uint8_t nonce[SCX_SALT_LEN],
                  const uint8_t *aad, size_t aad_len);

/* HMAC-SHA256(key, label): the derivation behind every labelled key. */
int scx_label_key(uint8_t out[32], const uint8_t key[32], const char *label);
int scx_kcv(uint8_t kcv[SCX_KCV_LEN], const uint8_t key[32]);
/* scrypt(password, salt, N = 2^cost, r = 8, p = 1): share files, verifiers. */
int scx_scrypt(uint8_t *out, size_t out_len, const char *password, const uint8_t *salt,
               size_t salt_len, unsigned cost);

/* Batched randomness for public values (salts, IVs): one RAND_bytes per
 * 4 KiB, thrown away when the process forks. */
typedef struct scx_rndpool {
    uint8_t buf[4096];
    size_t pos;
    unsigned long generation; /* fork generation it was filled in; 0 = never */
} scx_rndpool;
int scx_rnd_public(scx_rndpool *p, uint8_t *out, size_t len);
/* cipher, or NULL when ctx already runs it (re-key without a rebuild). */
const EVP_CIPHER *scx_cipher_once(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher);

/* ---- attributes and framing -------------------------------------------- */

/* Encode a template's attributes (plus generation date and public key).
 * Returns the length, or 0 when cap is too small. */
size_t scx_attrs_encode(uint8_t *out, size_t cap, const softcxi_template *t, int64_t gen_date,
                        const uint8_t *pub, size_t pub_len);

/* Where the parts of a framed blob are. */
typedef struct scx_frame {
    unsigned type;
    const uint8_t *kcv, *salt, *attrs, *ct, *tag;
    size_t attrs_len, ct_len, aad_len, total;
} scx_frame;

/* Parse the frame and (for key-shaped types) the attributes into info. */
int scx_frame_parse(scx_frame *f, softcxi_key_info *info, const uint8_t *blob, size_t len,
                    softcxi_error *err);
/* Write a frame: header, attrs, sealed secret, tag.  out must hold
 * SCX_HDR_LEN + attrs_len + secret_len + SCX_TAG_LEN bytes. */
int scx_frame_seal(uint8_t *out, unsigned type, const uint8_t kcv[SCX_KCV_LEN],
                   const uint8_t salt[SCX_SALT_LEN], const uint8_t *attrs, size_t attrs_len,
                   const uint8_t *secret, size_t secret_len, scx_xaes *x, EVP_CIPHER_CTX *gcm);

/* "'group/name[/specifier]'" for messages; never key bytes.  REF() formats
 * into a temporary, so the cost is paid on error paths only. */
const char *scx_keyref(char *buf, size_t cap, const softcxi_key_info *info);
#define SCX_REF_MAX 200
#define REF(info) scx_keyref((char[SCX_REF_MAX]){0}, SCX_REF_MAX, (info))

/* ---- algorithms -------------------------------------------------------- */

/* Curve facts: OpenSSL group name, field size in bytes, SPKI OID body. */
typedef struct scx_curve_def {
    const char *ossl_name;
    size_t flen;
    const uint8_t *oid;
    size_t oid_len;
    const char *jwk_crv;
} scx_curve_def;
const scx_curve_def *scx_curve(int curve);

/* Expected secret payload length for a key, 0 when variable (RSA). */
size_t scx_secret_len(int algo, int curve, unsigned size);
/* Bits of a key's HMAC hash or 0. */
const char *scx_hmac_digest(int algo);

/* ---- MBK key shares (shares.c) ----------------------------------------- */

/* In memory: shares[i] is the share at x = i + 1. */
int scx_shares_split(uint8_t shares[][32], const uint8_t secret[32], unsigned m, unsigned n,
                     int scheme);
int scx_shares_combine(uint8_t secret[32], const uint8_t shares[][32], const uint8_t *index,
                       size_t k, int scheme);
/* Share files: written all or nothing, never overwritten; cost = log2 of
 * scrypt's N (0: SOFTCXI_SHARE_COST_DEFAULT). */
int scx_mbk_split_files(const uint8_t mbk[32], unsigned m, unsigned n, int scheme,
                        const char *const *paths, const char *const *passwords, unsigned cost,
                        softcxi_error *err);
int scx_mbk_combine_files(uint8_t mbk[32], const char *const *paths,
                          const char *const *passwords, size_t k, softcxi_error *err);

/* ---- the internal key database (keydb.c) -------------------------------- */

#ifndef SCX_KEYDB_DEFAULT_LIMIT
#define SCX_TYPE_KEYDB 0x30u /* <dir>/keys.db, the internal key database */
#define SCX_KEYDB_DEFAULT_LIMIT ((size_t)8 << 20) /* bytes of key data */
#define SCX_KEYDB_ENTRY_OVERHEAD 16u /* counted per entry on top of its blob */

typedef struct scx_keydb scx_keydb;

/* Open the database in dir (missing keys.db = empty database).  limit_bytes
 * 0 means SCX_KEYDB_DEFAULT_LIMIT. */
int scx_keydb_open(scx_keydb **db, const char *dir, const uint8_t storage_key[32],
                   size_t limit_bytes, softcxi_error *err) SOFTCXI_MUST_CHECK;
/* The same without reading keys.db: for a restore over a damaged file. */
int scx_keydb_handle(scx_keydb **db, const char *dir, const uint8_t storage_key[32],
                     size_t limit_bytes, softcxi_error *err) SOFTCXI_MUST_CHECK;
void scx_keydb_free(scx_keydb *db);
/* Re-read keys.db if another process changed it (when not: an fstat and a
 * 48-byte read). */
int scx_keydb_reload(scx_keydb *db, softcxi_error *err) SOFTCXI_MUST_CHECK;
/* SOFTCXI_FLAG_OVERWRITE replaces an entry of the same address, else
 * EEXIST; EFULL when the limit would be exceeded (file untouched). */
int scx_keydb_put(scx_keydb *db, const char *group, const char *name, uint32_t specifier,
                  int has_specifier, const uint8_t *blob, size_t blob_len, unsigned flags,
                  softcxi_error *err) SOFTCXI_MUST_CHECK;
/* *blob points into db: valid until the next call on db. */
int scx_keydb_get(scx_keydb *db, const char *group, const char *name, uint32_t specifier,
                  int has_specifier, const uint8_t **blob, size_t *blob_len,
                  softcxi_error *err) SOFTCXI_MUST_CHECK;
int scx_keydb_delete(scx_keydb *db, const char *group, const char *name, uint32_t specifier,
                     int has_specifier, softcxi_error *err) SOFTCXI_MUST_CHECK;
/* A non-zero return from cb stops the walk and is returned. */
typedef int (*scx_keydb_cb)(void *ctx, const char *group, const char *name, uint32_t specifier,
                            int has_specifier, const uint8_t *blob, size_t blob_len);
int scx_keydb_list(scx_keydb *db, scx_keydb_cb cb, void *ctx, softcxi_error *err);
size_t scx_keydb_used(const scx_keydb *db);
size_t scx_keydb_limit(const scx_keydb *db);
uint64_t scx_keydb_generation(const scx_keydb *db);
/* The sealed file bytes (OPENSSL_free them), and restore from such an image
 * (must open under this storage key; replaces the database atomically). */
int scx_keydb_export(scx_keydb *db, uint8_t **image, size_t *len,
                     softcxi_error *err) SOFTCXI_MUST_CHECK;
int scx_keydb_import(scx_keydb *db, const uint8_t *image, size_t len,
                     softcxi_error *err) SOFTCXI_MUST_CHECK;

/* Database backups carry the keys.db payload (count, entries in address
 * order), sealed under the MBK instead of the storage key. */
typedef struct scx_keydb_item {
    const char *group, *name;
    uint32_t spec;
    int has_spec;
    const uint8_t *blob;
    size_t blob_len;
} scx_keydb_item;
/* Encode items (in address order) as a payload; OPENSSL_free *out. */
int scx_keydb_encode(uint8_t **out, size_t *out_len, const scx_keydb_item *items, size_t n,
                     softcxi_error *err) SOFTCXI_MUST_CHECK;
/* Check a whole payload (EFORMAT naming what), then call cb per entry. */
int scx_keydb_parse(const uint8_t *payload, size_t len, const char *what, scx_keydb_cb cb,
                    void *ctx, softcxi_error *err) SOFTCXI_MUST_CHECK;
/* Replace the database with a payload's entries, or with MERGE add them to
 * it (an address in both: EEXIST, or with OVERWRITE the payload's wins).
 * All or nothing, under the lock; EFULL past the limit. */
#define SCX_KEYDB_MERGE 1u
#define SCX_KEYDB_OVERWRITE 2u
int scx_keydb_restore(scx_keydb *db, const uint8_t *payload, size_t len, const char *what,
                      unsigned mode, softcxi_error *err) SOFTCXI_MUST_CHECK;
#endif

/* ---- the audit log (audit.c) -------------------------------------------- */

#ifndef SCX_AUDIT_FIELD_MAX
#define SCX_AUDIT_FIELD_MAX 1024
#endif

typedef int (*scx_audit_cb)(void *ctx, uint64_t seq, int64_t time, const char *event,
                            const char *subject, const char *detail);
int scx_audit_append(const char *dir, const uint8_t key[32], const char *event,
                     const char *subject, const char *detail, softcxi_error *err);
int scx_audit_read(const char *dir, const uint8_t key[32], scx_audit_cb cb, void *ctx,
                   softcxi_error *err);
int scx_audit_verify(const char *dir, const uint8_t key[32], uint64_t *records,
                     softcxi_error *err);

/* ---- device, keys, cache ----------------------------------------------- */

/* What a key without its private half (a verify-only blob) may do. */
#define SCX_PUBLIC_USAGE (SOFTCXI_USAGE_VERIFY | SOFTCXI_USAGE_ENCRYPT | SOFTCXI_USAGE_WRAP)

enum { SCX_MD_SHA1, SCX_MD_SHA224, SCX_MD_SHA256, SCX_MD_SHA384, SCX_MD_SHA512,
       SCX_MD_SHA3_256, SCX_MD_SHA3_384, SCX_MD_SHA3_512, SCX_MD_COUNT };

/* An opened key: the verified attributes, the blob they point into, and the
 * key material (an EVP_PKEY, or raw bytes in OpenSSL's secure heap). */
typedef struct scx_key {
    softcxi_key_info info;
    uint8_t *blob;
    size_t blob_len;
    EVP_PKEY *pkey;
    uint8_t *sym;
    size_t sym_len;
    uint64_t stamp;
    int cached;
    int has_secret; /* 0: a public key only (a verify-only blob) */
    uint8_t id[32]; /* SHA-256 of the attributes: the key across copies */
} scx_key;

typedef struct scx_cache {
    scx_key **slot; /* capacity entries in sets of SCX_CACHE_WAYS */
    size_t capacity, entries, sweep;
    uint64_t clock, hits, misses, evictions;
} scx_cache;
#define SCX_CACHE_WAYS 4

/* MBKs a device holds besides the current one: kept for opening blobs
 * (and rewrapping them) until retired. */
#define SCX_MAX_OLD_MBKS 7

typedef struct scx_secrets {
    uint8_t mbk[32];
    uint8_t blob_key[32];
    uint8_t state_key[32]; /* seals users.db; derived from the device key */
    uint8_t rest_key[32];  /* seals device.mbk; derived from the device key */
    uint8_t audit_key[32]; /* MACs the audit log; from the device key */
    uint8_t storage_key[32]; /* seals keys.db; from the device key */
    uint8_t old_mbk[SCX_MAX_OLD_MBKS][32];
} scx_secrets;

typedef struct scx_old_mbk {
    uint8_t kcv[SCX_KCV_LEN];
    scx_xaes x;
} scx_old_mbk;

/* Users and logon (users.c). */
#define SCX_ROLE_ADMIN SOFTCXI_ROLE_ADMIN
#define SCX_ROLE_USER SOFTCXI_ROLE_USER
#define SCX_ADMIN_THRESHOLD 2u
#define SCX_KDF_COST 15u
#define SCX_USER_NAME_MAX 64
#define SCX_GROUPS_MAX 255
#define SCX_MAX_LOGONS 4

typedef struct scx_logon {
    char name[SCX_USER_NAME_MAX + 1];
    char groups[SCX_GROUPS_MAX + 1];
    unsigned role, level;
} scx_logon;

struct softcxi_device {
    int refs;
    char *path, *keyfile;
    char id[33];
    scx_secrets *sec; /* locked, non-dumpable */
    uint8_t kcv[SCX_KCV_LEN];
    scx_xaes xblob;
    EVP_CIPHER_CTX *gcm;     /* blob sealing */
    EVP_CIPHER_CTX *data_gcm; /* AES-GCM operations */
    EVP_CIPHER *aes_gcm[3]; /* 128, 192, 256 */
    EVP_MAC *hmac;
    EVP_MD *md[SCX_MD_COUNT];
    EVP_PKEY_CTX *gen_ec[5], *gen_ed25519, *gen_x25519;
    EVP_PKEY_CTX *from[4]; /* EVP_PKEY_fromdata: EC, Ed25519, X25519, RSA */
    scx_rndpool pool;
    scx_cache cache;
    int open_access; /* in-memory test devices: no users, no access rules */
    scx_old_mbk old[SCX_MAX_OLD_MBKS];
    int nold;
    uint8_t devkcv[SCX_KCV_LEN];
    /* <path>/generation, mapped shared: bumped by every process that
     * changes the device state; compared on each call (one memory load). */
    volatile uint64_t *gen_map;
    uint64_t generation;
    scx_keydb *keydb; /* opened on first use */
    uint8_t (*revoked)[32]; /* ids of revoked keys (revoke.c) */
    size_t nrevoked;
    size_t keydb_limit;
};

struct softcxi_session {
    softcxi_device *dev;
    softcxi_error err;
    scx_logon logons[SCX_MAX_LOGONS];
    int nlogons;
    /* logon_sign: the challenge handed out and not yet answered */
    uint8_t challenge[32];
    char challenge_user[SCX_USER_NAME_MAX + 1];
    int64_t challenge_time;
    int has_challenge;
};

/* MBK lifecycle (mbk.c). */
int scx_mbk_set(softcxi_device *dev, const uint8_t *payload, size_t len, softcxi_error *err);
int scx_device_sync(softcxi_session *s);
int scx_state_reload(softcxi_device *dev, softcxi_error *err);
int scx_state_save(softcxi_device *dev, softcxi_error *err);
int scx_derive_working_keys(softcxi_device *dev, softcxi_error *err);
int scx_gen_open(softcxi_device *dev, softcxi_error *err);
void scx_gen_close(softcxi_device *dev);
/* The xaes context that opens blobs sealed under kcv, or NULL. */
scx_xaes *scx_mbk_for(softcxi_device *dev, const uint8_t kcv[SCX_KCV_LEN]);

/* Append an audit record (no-op for in-memory devices); fails closed. */
int scx_audit(softcxi_session *s, const char *event, const char *subject, const char *detail);
/* An administrative action is recorded before it is carried out (a log
 * that cannot take the record stops it); a failure is recorded after. */
int scx_audit_request(softcxi_session *s, const char *event, const char *subject);
void scx_audit_outcome(softcxi_session *s, const char *event, const char *subject, int rc);
/* Who is logged on as administrator, for audit details. */
void scx_admins(const softcxi_session *s, char *out, size_t cap);
/* Rewrap (mbk.c, internal_keys.c, rewrap.c): scx_rewrap_blob is
 * scx_rewrap_check (parse, access, which MBK) then scx_rewrap_seal (open and
 * seal again, on the contexts given: thread-safe with contexts of its own). */
int scx_rewrap_check(softcxi_session *s, scx_frame *f, softcxi_key_info *info, scx_xaes **from,
                     const uint8_t *blob, size_t len, int check_access);
int scx_rewrap_seal(softcxi_buf *out, int *changed, const scx_frame *f,
                    const softcxi_key_info *info, const uint8_t *blob, size_t len, scx_xaes *from,
                    scx_xaes *to, const uint8_t kcv[SCX_KCV_LEN], EVP_CIPHER_CTX *gcm,
                    scx_rndpool *pool, softcxi_error *err);
int scx_rewrap_blob(softcxi_session *s, softcxi_buf *out, const uint8_t *blob, size_t len,
                    int *changed, int check_access);
int scx_internal_rewrap(softcxi_session *s, softcxi_buf *out, const uint8_t *handle,
                        size_t len, int *changed);
int scx_internal_rewrap_all(softcxi_session *s, size_t *moved);
int scx_internal_count_under(softcxi_session *s, const uint8_t kcv[SCX_KCV_LEN], size_t *n);
/* Revocation (revoke.c). */
int scx_key_id(uint8_t id[32], const uint8_t *attrs, size_t len);
int scx_revoked_reload(softcxi_device *dev, softcxi_error *err);
int scx_is_revoked(const softcxi_device *dev, const uint8_t id[32]);
/* Store a sealed blob as an internal key; out becomes its handle. */
int scx_store_internal(softcxi_session *s, softcxi_buf *out, const softcxi_template *t,
                       unsigned flags);
/* Internal key handles ('I' ...): resolved to the stored blob. */
int scx_handle_resolve(softcxi_session *s, const uint8_t *h, size_t len, const uint8_t **blob,
                       size_t *blob_len);

int scx_users_count(softcxi_session *s, size_t *n);
int scx_users_create(const softcxi_device *dev, const char *admin, const char *password,
                     unsigned cost, softcxi_error *err);
/* 0, or EAUTH / EACCESS with the message set. */
int scx_access_key(softcxi_session *s, const char *group, size_t group_len, const char *op);
int scx_access_admin(softcxi_session *s, const char *op);
/* Write path durably: tmp, fsync, rename over path, fsync of the folder. */
int scx_write_file_atomic(const char *path, const char *tmp, const uint8_t *data, size_t len,
                          softcxi_error *err);

/* A device that lives in memory only, with the given MBK (tests; MBK
 * import builds on it). */
int scx_device_new_mem(softcxi_device **out, const uint8_t mbk[32], long cache_entries,
                       softcxi_error *err);

/* Open a key blob (through the cache when it is on).  *tmp receives a key
 * that the caller must release with scx_key_release. */
int scx_key_get(softcxi_session *s, scx_key **out, const uint8_t *blob, size_t len);
void scx_key_release(softcxi_session *s, scx_key *k);
void scx_key_free(scx_key *k);
void scx_cache_init(scx_cache *c, size_t capacity);
void scx_cache_clear(scx_cache *c);

/* Build an EVP_PKEY from raw parts (as stored in blobs). */
int scx_pkey_from_parts(softcxi_device *dev, EVP_PKEY **out, int algo, int curve,
                        const uint8_t *pub, size_t pub_len, const uint8_t *secret,
                        size_t secret_len);
/* Is this EC key on a named curve (not explicit parameters)? */
int scx_ec_named(EVP_PKEY *pk);
/* Public key from the raw form (no secret). */
int scx_pkey_public(softcxi_device *dev, EVP_PKEY **out, int algo, int curve,
                    const uint8_t *pub, size_t pub_len);

/* Seal a key of template t (secret bytes and raw public key) into a blob. */
int scx_seal_key(softcxi_session *s, softcxi_buf *blob, const softcxi_template *t,
                 const uint8_t *pub, size_t pub_len, const uint8_t *secret, size_t secret_len);
/* Check and default a template; messages name the field. */
int scx_template_check(softcxi_template *t, softcxi_error *err);

const EVP_MD *scx_md(softcxi_device *dev, int which);

/* Public key encodings (pubkey.c). */
int scx_pub_encode(softcxi_buf *out, const softcxi_key_info *info, int fmt, softcxi_error *err);
/* Minimal DER: RSAPublicKey { n, e } */
int scx_rsa_pub_parse(const uint8_t *der, size_t len, const uint8_t **n, size_t *n_len,
                      const uint8_t **e, size_t *e_len);
size_t scx_der_rsa_pub(uint8_t *out, size_t cap, const uint8_t *n, size_t n_len,
                       const uint8_t *e, size_t e_len);
/* A public JWK (EC, OKP, RSA) as SPKI DER; EINVAL naming what is wrong. */
int scx_jwk_to_spki(softcxi_buf *out, const uint8_t *json, size_t len, softcxi_error *err);

/* Big-endian helpers. */
static inline void scx_put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static inline unsigned scx_get16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }

#endif /* SOFTCXI_INTERNAL_H */
