/*
 * softcxi.h - the public interface of the softcxi core: an emulated HSM for
 * unmanaged (external) keys.
 *
 * The device holds one secret, the Master Backup Key (MBK).  Every key it
 * generates with SOFTCXI_FLAG_EXTERNAL comes back as a sealed key blob (a byte
 * string starting with 'K'), which the caller stores and hands back for each
 * operation.  See docs/blob-format.md for the bytes and docs/api.md for the
 * calls.
 *
 * Conventions (after hiredis and libsodium):
 *  - every exported name starts with softcxi_ / SOFTCXI_;
 *  - outputs first, each pointer beside its size;
 *  - functions return 0 (or 1/0 for verify) on success and a negative
 *    softcxi_code on failure; the session keeps the code and a message that
 *    names the key but never contains key bytes;
 *  - calls are message-shaped, (session, request) -> result, so that a device
 *    daemon can later serve the same requests over a socket;
 *  - every *_free / *_close accepts NULL.
 *
 * A session (and its device) is not thread-safe: use one per thread.
 */
#ifndef SOFTCXI_H
#define SOFTCXI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SOFTCXI_VERSION_MAJOR 0
#define SOFTCXI_VERSION_MINOR 1
#define SOFTCXI_VERSION_PATCH 0
#define SOFTCXI_VERSION_STRING "0.1.0"

#if defined(__GNUC__) || defined(__clang__)
#define SOFTCXI_MUST_CHECK __attribute__((warn_unused_result))
#else
#define SOFTCXI_MUST_CHECK
#endif

/* ---- errors ------------------------------------------------------------ */

typedef enum softcxi_code {
    SOFTCXI_OK = 0,
    SOFTCXI_EINVAL = -1,    /* bad argument, template or mechanism */
    SOFTCXI_EFORMAT = -2,   /* malformed or truncated blob / file */
    SOFTCXI_ETAMPER = -3,   /* authentication tag does not verify */
    SOFTCXI_EMBK = -4,      /* blob sealed under an MBK this device lacks */
    SOFTCXI_EPOLICY = -5,   /* usage, expiry or export policy refuses */
    SOFTCXI_EAUTH = -6,     /* not logged on / wrong credentials */
    SOFTCXI_ENOTFOUND = -7, /* device, key file or key missing */
    SOFTCXI_EFULL = -8,     /* key database or buffer full */
    SOFTCXI_EEXIST = -9,    /* already exists */
    SOFTCXI_EIO = -10,      /* file system error */
    SOFTCXI_EPERM = -11,    /* unsafe file permissions */
    SOFTCXI_ECRYPTO = -12,  /* OpenSSL failed */
    SOFTCXI_ENOMEM = -13,
    SOFTCXI_EACCESS = -14, /* logged on, but not for this key's group */
    SOFTCXI_EREVOKED = -15 /* the key is on the device's revocation list */
} softcxi_code;

#define SOFTCXI_ERRSTR_MAX 256

typedef struct softcxi_error {
    int code;                      /* softcxi_code */
    char msg[SOFTCXI_ERRSTR_MAX]; /* never contains key bytes */
} softcxi_error;

/* "EINVAL", "ETAMPER", ... ("OK" for 0, "EUNKNOWN" otherwise). */
const char *softcxi_code_name(int code);

/* ---- names ------------------------------------------------------------- */

typedef enum softcxi_algo {
    SOFTCXI_ALGO_NONE = 0,
    SOFTCXI_ALGO_EC = 1,
    SOFTCXI_ALGO_ED25519 = 2,
    SOFTCXI_ALGO_X25519 = 3,
    SOFTCXI_ALGO_RSA = 4,
    SOFTCXI_ALGO_AES = 5,
    SOFTCXI_ALGO_HMAC_SHA256 = 6,
    SOFTCXI_ALGO_HMAC_SHA384 = 7,
    SOFTCXI_ALGO_HMAC_SHA512 = 8
} softcxi_algo;

typedef enum softcxi_curve {
    SOFTCXI_CURVE_NONE = 0,
    SOFTCXI_CURVE_P256 = 1,
    SOFTCXI_CURVE_P384 = 2,
    SOFTCXI_CURVE_P521 = 3,
    SOFTCXI_CURVE_SECP256K1 = 4
} softcxi_curve;

/* Usage bits (CXI's usage set). */
#define SOFTCXI_USAGE_DECRYPT 0x01u
#define SOFTCXI_USAGE_SIGN 0x02u
#define SOFTCXI_USAGE_DERIVE 0x04u
#define SOFTCXI_USAGE_WRAP 0x08u
#define SOFTCXI_USAGE_ENCRYPT 0x10u
#define SOFTCXI_USAGE_VERIFY 0x20u
#define SOFTCXI_USAGE_UNWRAP 0x40u
#define SOFTCXI_USAGE_ALL 0x7Fu

typedef enum softcxi_export {
    SOFTCXI_EXPORT_DENY = 0,
    SOFTCXI_EXPORT_ALLOW = 1,       /* wrapped export only */
    SOFTCXI_EXPORT_ALLOW_PLAIN = 2, /* plain export allowed */
    SOFTCXI_EXPORT_DENY_BACKUP = 3  /* not even in a key backup */
} softcxi_export;

typedef enum softcxi_mech {
    SOFTCXI_MECH_NONE = 0,
    SOFTCXI_MECH_ECDSA_SHA256,
    SOFTCXI_MECH_ECDSA_SHA384,
    SOFTCXI_MECH_ECDSA_SHA512,
    SOFTCXI_MECH_RSA_PKCS1_SHA256,
    SOFTCXI_MECH_RSA_PKCS1_SHA384,
    SOFTCXI_MECH_RSA_PKCS1_SHA512,
    SOFTCXI_MECH_RSA_PSS_SHA256,
    SOFTCXI_MECH_RSA_PSS_SHA384,
    SOFTCXI_MECH_RSA_PSS_SHA512,
    SOFTCXI_MECH_ED25519,
    SOFTCXI_MECH_AES_GCM,
    SOFTCXI_MECH_RSA_OAEP_SHA1,
    SOFTCXI_MECH_RSA_OAEP_SHA256,
    SOFTCXI_MECH_RSA_OAEP_SHA384,
    SOFTCXI_MECH_RSA_OAEP_SHA512,
    SOFTCXI_MECH_HMAC_SHA256,
    SOFTCXI_MECH_HMAC_SHA384,
    SOFTCXI_MECH_HMAC_SHA512,
    SOFTCXI_MECH_ECDH,
    SOFTCXI_MECH_X25519,
    SOFTCXI_MECH_SHA1,
    SOFTCXI_MECH_SHA224,
    SOFTCXI_MECH_SHA256,
    SOFTCXI_MECH_SHA384,
    SOFTCXI_MECH_SHA512,
    SOFTCXI_MECH_SHA3_256,
    SOFTCXI_MECH_SHA3_384,
    SOFTCXI_MECH_SHA3_512,
    SOFTCXI_MECH_COUNT
} softcxi_mech;

typedef enum softcxi_pubfmt {
    SOFTCXI_PUB_DER = 0, /* SubjectPublicKeyInfo */
    SOFTCXI_PUB_PEM = 1,
    SOFTCXI_PUB_JWK = 2,
    SOFTCXI_PUB_RAW = 3 /* EC point, 32-byte Ed/X25519 key, RSAPublicKey DER */
} softcxi_pubfmt;

/* Name <-> value.  *_from_name returns a negative code for an unknown name;
 * *_name returns NULL for an unknown value.  Names are the ones the Lua API
 * uses: "ec", "P-256", "sign", "allow-plain", "ecdsa-sha256", "pem", ... */
int softcxi_algo_from_name(const char *name);
const char *softcxi_algo_name(int algo);
int softcxi_curve_from_name(const char *name);
const char *softcxi_curve_name(int curve);
int softcxi_usage_from_name(const char *name); /* one bit */
const char *softcxi_usage_name(unsigned bit);
int softcxi_export_from_name(const char *name);
const char *softcxi_export_name(int policy);
int softcxi_mech_from_name(const char *name);
const char *softcxi_mech_name(int mech);
int softcxi_pubfmt_from_name(const char *name);

/* MBK key share schemes (m-of-n Shamir over GF(2^8), or XOR n-of-n), and
 * the default scrypt cost (N = 2^15, r = 8, p = 1: 32 MiB) of share files. */
#define SOFTCXI_SHARES_SHAMIR 1
#define SOFTCXI_SHARES_XOR 2
#define SOFTCXI_SHARE_COST_DEFAULT 15u

/* ---- buffers ----------------------------------------------------------- */

/* An output the core allocated.  softcxi_buf_free wipes it first when it
 * holds a secret (a raw ECDH secret, say). */
typedef struct softcxi_buf {
    uint8_t *data;
    size_t len;
    int secret;
} softcxi_buf;

void softcxi_buf_free(softcxi_buf *buf);

/* ---- device and session ------------------------------------------------ */

typedef struct softcxi_device softcxi_device;
typedef struct softcxi_session softcxi_session;

typedef struct softcxi_open_req {
    const char *path;    /* device state directory */
    const char *keyfile; /* device key file outside path; NULL: default
                            $SOFTCXI_CONFIG_DIR, $XDG_CONFIG_HOME/softcxi or
                            ~/.config/softcxi, then devices/<id>.key */
    long cache_entries;  /* opened-key cache size; < 0: default, 0: off */
    size_t keydb_limit;  /* bytes of internal key data; 0: 8 MiB */
} softcxi_open_req;

/* Open the device at req->path (ENOTFOUND when there is none: see
 * softcxi_device_init).  On failure returns a negative code, *out is NULL
 * and err (if not NULL) says why. */
SOFTCXI_MUST_CHECK int softcxi_device_open(softcxi_device **out, const softcxi_open_req *req,
                                           softcxi_error *err);
void softcxi_device_free(softcxi_device *dev);

/* The device's MBK key check value (8 bytes) and id (hex string). */
void softcxi_device_kcv(const softcxi_device *dev, uint8_t kcv[8]);
const char *softcxi_device_id(const softcxi_device *dev);
const char *softcxi_device_keyfile(const softcxi_device *dev);

/* Create a device: a new MBK sealed under a new device key (kept outside
 * path), and its first administrator (level 2, who may act alone).  EEXIST
 * when a device lives in path already.  kdf_cost is log2 of scrypt's N for
 * password hashes (0: 15). */
typedef struct softcxi_init_req {
    const char *path;
    const char *keyfile;
    const char *admin;    /* the administrator's name */
    const char *password; /* at least 8 characters */
    unsigned kdf_cost;
} softcxi_init_req;

SOFTCXI_MUST_CHECK int softcxi_device_init(const softcxi_init_req *req, softcxi_error *err);

/* A session holds a reference to its device; the device lives until its
 * last session closes (softcxi_device_free drops the opener's reference). */
softcxi_session *softcxi_session_new(softcxi_device *dev);
void softcxi_session_free(softcxi_session *s);
const softcxi_error *softcxi_session_error(const softcxi_session *s);
softcxi_device *softcxi_session_device(const softcxi_session *s);

/* ---- users and logon ---------------------------------------------------- */

#define SOFTCXI_ROLE_ADMIN 1 /* MBK, users, backups, database */
#define SOFTCXI_ROLE_USER 2  /* key operations in the user's groups */

/* Log a user on to the session; several may be, their levels add up.  Key
 * calls need a logged-on user whose groups cover the key's group (EAUTH
 * without logon, EACCESS for another group); administrative calls need
 * administrators of level 2 in all. */
SOFTCXI_MUST_CHECK int softcxi_logon_pass(softcxi_session *s, const char *name,
                                          const char *password);
void softcxi_logoff(softcxi_session *s);

/* Logon by key (CXI LogonSign): the device hands out a fresh random
 * challenge, as the exact message to sign,
 *   "softcxi-logon-v1" 00 | device id (32 hex) | 00 | name | 00 | 32 random bytes
 * and checks the signature against the public key stored for the user
 * (ECDSA-SHA256 DER for EC P-256, Ed25519 otherwise).  A challenge is good
 * for one answer within 120 s, in the session that asked for it.  A wrong
 * signature counts toward the lockout and is audited, like a wrong
 * password.  softcxi_logon_answer signs a challenge with a private key
 * (PEM or DER, unencrypted) on the user's side; softcxi_logon_sign does the
 * three steps in one call.  The private key is the user's credential: the
 * core reads it, signs and frees it, and keeps nothing. */
SOFTCXI_MUST_CHECK int softcxi_logon_challenge(softcxi_session *s, softcxi_buf *msg,
                                               const char *name);
SOFTCXI_MUST_CHECK int softcxi_logon_response(softcxi_session *s, const char *name,
                                              const uint8_t *sig, size_t sig_len);
SOFTCXI_MUST_CHECK int softcxi_logon_answer(softcxi_buf *sig, const uint8_t *msg, size_t msg_len,
                                            const uint8_t *key, size_t key_len,
                                            softcxi_error *err);
SOFTCXI_MUST_CHECK int softcxi_logon_sign(softcxi_session *s, const char *name,
                                          const uint8_t *key, size_t key_len);

typedef struct softcxi_user_req {
    const char *name;
    const char *password;
    int role;        /* SOFTCXI_ROLE_* */
    unsigned level;  /* 0..2 */
    const char *groups; /* "iot,fleet-*" ("*": every group) */
    unsigned kdf_cost;  /* 0: 15 */
    const uint8_t *pubkey; /* logon key (SPKI PEM/DER, EC P-256 or Ed25519) or NULL; */
    size_t pubkey_len;     /* a user needs a password, a pubkey or both */
} softcxi_user_req;

/* Change a user: each field left NULL (level < 0, unlock 0) stays as it
 * is.  Administrators (level 2 in all) may change anything of anyone; a
 * logged-on user may change his own password and logon key.  EPOLICY when
 * the administrators' levels would no longer reach the threshold. */
typedef struct softcxi_user_set_req {
    const char *name;
    const char *password;
    const uint8_t *pubkey;
    size_t pubkey_len;
    const char *groups;
    int level;         /* 0..2, or < 0: unchanged */
    int unlock;        /* 1: clear the failed-logon count and the lockout */
    unsigned kdf_cost; /* 0: 15 */
} softcxi_user_set_req;

typedef struct softcxi_user_info {
    const char *name, *role;
    unsigned level;
    const char *groups;
    uint32_t failures;
    int64_t locked_until;
    int has_password, has_pubkey;
} softcxi_user_info;
typedef int (*softcxi_user_cb)(void *ctx, const softcxi_user_info *user);

SOFTCXI_MUST_CHECK int softcxi_user_add(softcxi_session *s, const softcxi_user_req *req);
SOFTCXI_MUST_CHECK int softcxi_user_set(softcxi_session *s, const softcxi_user_set_req *req);
SOFTCXI_MUST_CHECK int softcxi_user_delete(softcxi_session *s, const char *name);
SOFTCXI_MUST_CHECK int softcxi_user_list(softcxi_session *s, softcxi_user_cb cb, void *ctx);

/* ---- internal keys (the device's key database, CXIKEY.db) -------------- */

/* key_generate / key_import without SOFTCXI_FLAG_EXTERNAL store the key in
 * the device (addressed by group, name, specifier; SOFTCXI_FLAG_OVERWRITE
 * replaces) and return a handle instead of a blob: a short byte string
 * starting with 'I' that every operation accepts where it takes a blob.
 * The database holds 8 MiB of key data (keydb_limit); past that, EFULL. */
SOFTCXI_MUST_CHECK int softcxi_key_open(softcxi_session *s, softcxi_buf *handle, const char *group,
                                        const char *name, uint32_t specifier, int has_specifier);
SOFTCXI_MUST_CHECK int softcxi_key_delete(softcxi_session *s, const uint8_t *handle,
                                          size_t len);
typedef int (*softcxi_key_cb)(void *ctx, const char *group, const char *name, uint32_t specifier,
                              int has_specifier);
/* The internal keys of the groups the logged-on users may use. */
SOFTCXI_MUST_CHECK int softcxi_key_list(softcxi_session *s, softcxi_key_cb cb, void *ctx);
/* Bytes of key data used and the limit. */
SOFTCXI_MUST_CHECK int softcxi_keydb_usage(softcxi_session *s, size_t *used, size_t *limit);

/* A backup of an internal key (export policy permitting), sealed under the
 * MBK: it restores into the internal database of any device holding that
 * MBK, at the same address (SOFTCXI_FLAG_OVERWRITE replaces).  *handle
 * receives the restored key's handle. */
SOFTCXI_MUST_CHECK int softcxi_key_backup(softcxi_session *s, softcxi_buf *backup,
                                          const uint8_t *handle, size_t len);
SOFTCXI_MUST_CHECK int softcxi_key_restore(softcxi_session *s, softcxi_buf *handle,
                                           unsigned flags, const uint8_t *backup, size_t len);

/* An image of the whole internal key database, sealed under the current
 * MBK (CXI BackupDatabase): it restores on any device that holds that MBK.
 * Keys whose export policy is deny-backup are left out (*skipped counts
 * them).  Administrators (level 2 in all); audited. */
SOFTCXI_MUST_CHECK int softcxi_backup_database(softcxi_session *s, softcxi_buf *image,
                                               size_t *keys, size_t *skipped);
/* Restore an image (CXI RestoreDatabase): by default it replaces the whole
 * internal database; with SOFTCXI_RESTORE_MERGE its keys are added to the
 * ones there (an address in both: EEXIST, or with SOFTCXI_FLAG_OVERWRITE
 * the image's key replaces it).  Every key is checked and resealed under
 * the current MBK before anything is written: a damaged, truncated or
 * foreign image changes nothing.  Administrators; audited. */
#define SOFTCXI_RESTORE_MERGE 0x10u
SOFTCXI_MUST_CHECK int softcxi_restore_database(softcxi_session *s, const uint8_t *image,
                                                size_t len, unsigned flags, size_t *keys);

/* ---- state (CXI GetState) ----------------------------------------------- */

typedef struct softcxi_state {
    const char *version, *id;
    uint8_t kcv[8];        /* the current MBK */
    unsigned older_mbks;   /* held for opening older blobs */
    uint64_t generation;   /* bumped by every change of device state */
    size_t users, revoked;
    size_t keydb_used, keydb_limit;
    unsigned logged_on;    /* users logged on to this session */
    int initialised;       /* a device made by softcxi_device_init (0: in memory) */
    int mbk_loaded;        /* an MBK is loaded (always, once the device opened) */
} softcxi_state;

SOFTCXI_MUST_CHECK int softcxi_get_state(softcxi_session *s, softcxi_state *st);

/* The files of the device's state directory (CXI ListFiles): regular files
 * in name order, with size in bytes and modification time.  Any logged-on
 * user. */
typedef int (*softcxi_file_cb)(void *ctx, const char *name, uint64_t size, int64_t mtime);
SOFTCXI_MUST_CHECK int softcxi_list_files(softcxi_session *s, softcxi_file_cb cb, void *ctx);

/* ---- revocation ---------------------------------------------------------- */

/* Revoke the key of a blob (or handle): every copy, and every rewrap of it,
 * fails with EREVOKED in every process from the next call on.  Allowed to
 * administrators and to users of the key's group; recorded in the audit. */
SOFTCXI_MUST_CHECK int softcxi_key_revoke(softcxi_session *s, const uint8_t *blob, size_t len,
                                          const char *reason);
typedef int (*softcxi_revoked_cb)(void *ctx, const char *id_hex, int64_t time,
                                  const char *group, const char *name, const char *reason);
SOFTCXI_MUST_CHECK int softcxi_key_revoked(softcxi_session *s, softcxi_revoked_cb cb, void *ctx);

/* ---- the audit log ------------------------------------------------------ */

typedef int (*softcxi_audit_cb)(void *ctx, uint64_t seq, int64_t time, const char *event,
                                const char *subject, const char *detail);
/* Read the log (every record's MAC chain checked); administrators. */
SOFTCXI_MUST_CHECK int softcxi_audit_log(softcxi_session *s, softcxi_audit_cb cb, void *ctx);
/* 0 and *records when intact, ETAMPER naming the first bad record. */
SOFTCXI_MUST_CHECK int softcxi_audit_verify(softcxi_session *s, uint64_t *records);

/* ---- the MBK ------------------------------------------------------------ */

/* A new MBK, written only as key share files (m of n, each under its own
 * password); the device does not load it: mbk_import does.  Administrators. */
typedef struct softcxi_mbk_req {
    unsigned m, n;
    int scheme;                    /* SOFTCXI_SHARES_SHAMIR (default) or _XOR */
    const char *const *paths;      /* n share files, never overwritten */
    const char *const *passwords;  /* n passwords, 8 characters or more */
    unsigned kdf_cost;             /* 0: SOFTCXI_SHARE_COST_DEFAULT */
} softcxi_mbk_req;

SOFTCXI_MUST_CHECK int softcxi_mbk_generate(softcxi_session *s, const softcxi_mbk_req *req);
/* Load the MBK from k share files: it becomes current, the previous one is
 * kept for opening (and rewrapping) older blobs.  Every process of the
 * device sees the change at its next call.  Administrators. */
SOFTCXI_MUST_CHECK int softcxi_mbk_import(softcxi_session *s, const char *const *paths,
                                          const char *const *passwords, size_t k);
/* Forget an older MBK: its blobs give EMBK from now on, in every process. */
SOFTCXI_MUST_CHECK int softcxi_mbk_retire(softcxi_session *s, const uint8_t kcv[8]);
/* The check values of the MBKs held, current first. */
SOFTCXI_MUST_CHECK int softcxi_mbk_info(softcxi_session *s, uint8_t kcvs[][8], size_t cap,
                                        size_t *n);
/* Re-seal a blob under the current MBK (the key never leaves the core).
 * *changed = 0 when it was current already (out is then a copy). */
SOFTCXI_MUST_CHECK int softcxi_key_rewrap(softcxi_session *s, softcxi_buf *out,
                                          const uint8_t *blob, size_t len, int *changed);
/* Re-seal n blobs under the current MBK, each exactly as softcxi_key_rewrap
 * would one by one, the costly part on up to `threads` worker threads (0:
 * one per online CPU; at most SOFTCXI_BULK_MAX_THREADS; the calling thread
 * is one of them).  Per blob i, status[i] is 1 (rewrapped: outs[i] holds the
 * new blob, free it), 0 (under the current MBK already: outs[i] is empty) or
 * a negative error code (EFORMAT, EACCESS, EMBK, ETAMPER, ...; outs[i]
 * empty): a blob that fails does not stop the others.  Returns 0 when the
 * call as a whole ran (the session's message then names the first blob
 * that failed, if one did), or an error code with every outs[i] empty.
 * blobs[i] must stay unchanged until the call returns. */
SOFTCXI_MUST_CHECK int softcxi_key_rewrap_many(softcxi_session *s, softcxi_buf *outs, int *status,
                                               const uint8_t *const *blobs, const size_t *lens,
                                               size_t n, unsigned threads);

/* Opened-key cache statistics (hits, misses, entries). */
typedef struct softcxi_cache_stats {
    uint64_t hits, misses, evictions;
    size_t entries, capacity;
} softcxi_cache_stats;
void softcxi_cache_stats_get(const softcxi_session *s, softcxi_cache_stats *st);

/* ---- keys -------------------------------------------------------------- */

#define SOFTCXI_FLAG_OVERWRITE 1u /* CXI_FLAG_KEY_OVERWRITE */
#define SOFTCXI_FLAG_EXTERNAL 2u  /* CXI_FLAG_KEY_EXTERNAL */

#define SOFTCXI_NAME_MAX 255

/* The template (CXI property list) for key generation.  Zero means
 * "default" for size, usage and curve (P-256). */
typedef struct softcxi_template {
    int algo;         /* softcxi_algo */
    unsigned size;    /* bits: RSA 2048/3072/4096, AES 128/192/256, HMAC */
    int curve;        /* softcxi_curve, for SOFTCXI_ALGO_EC */
    const char *name; /* may be NULL */
    const char *group;
    const char *label;
    uint32_t specifier;
    int has_specifier;
    unsigned usage;    /* SOFTCXI_USAGE_* bits */
    int export_policy; /* softcxi_export */
    int64_t expiry;    /* Unix seconds; 0 = never */
} softcxi_template;

/* What a blob says about its key.  Strings and pub point into the blob the
 * info was read from and live as long as it does (they are not NUL-ended). */
typedef struct softcxi_key_info {
    int version, type;
    uint8_t kcv[8];
    int algo, curve;
    unsigned size;
    const char *name, *group, *label;
    size_t name_len, group_len, label_len;
    uint32_t specifier;
    int has_specifier;
    unsigned usage;
    int export_policy;
    int64_t gen_date, expiry;
    const uint8_t *pub;
    size_t pub_len;
    size_t blob_len;
    int verified; /* 1 only when the device checked the tag */
} softcxi_key_info;

/* Read a blob's clear attributes without the MBK: unverified. */
SOFTCXI_MUST_CHECK int softcxi_key_info_read(softcxi_key_info *info, const uint8_t *blob,
                                             size_t blob_len, softcxi_error *err);
/* Same, after the device checked the blob's tag (info->verified = 1). */
SOFTCXI_MUST_CHECK int softcxi_key_info_check(softcxi_session *s, softcxi_key_info *info,
                                        const uint8_t *blob, size_t blob_len);

/* The public key of a blob.  softcxi_public_key_read reads the clear
 * attributes (unverified); softcxi_public_key checks the tag first. */
SOFTCXI_MUST_CHECK int softcxi_public_key_read(softcxi_buf *out, const uint8_t *blob,
                                               size_t blob_len, int fmt, softcxi_error *err);
SOFTCXI_MUST_CHECK int softcxi_public_key(softcxi_session *s, softcxi_buf *out,
                                          const uint8_t *blob, size_t blob_len, int fmt);

/* Generate a key.  With SOFTCXI_FLAG_EXTERNAL the blob comes back in *blob;
 * without it the key is stored in the device (the template's group, name
 * and specifier are its address; SOFTCXI_FLAG_OVERWRITE replaces) and *blob
 * receives its handle. */
SOFTCXI_MUST_CHECK int softcxi_key_generate(softcxi_session *s, softcxi_buf *blob,
                                            unsigned flags, const softcxi_template *t);

/* Generate n keys of one template on worker threads (threads = 0: one per
 * online CPU; at most SOFTCXI_BULK_MAX_THREADS).  names[i] (or NULL: the
 * template's name) names key i.  blobs[0..n) are filled in order (free
 * each); on failure none is returned and the message names the key. */
#define SOFTCXI_BULK_MAX_THREADS 16
SOFTCXI_MUST_CHECK int softcxi_bulk_generate(softcxi_session *s, softcxi_buf *blobs,
                                             unsigned flags, const softcxi_template *t,
                                             const char *const *names, size_t n,
                                             unsigned threads);

/* The same, started now and collected later: the workers run on threads of
 * their own and the call returns at once (the checks of template, flags and
 * logon are made here, and fail here).  The job copies what it uses (the
 * template, the names, the sealing key), so once started it depends on
 * neither the session nor the caller's memory: the session may be used or
 * freed meanwhile, and the keys are sealed under the MBK current at the
 * start.  (The Lua binding still refuses other calls on a session while its
 * job runs: see docs/api.md.)  Threads as above; a worker whose thread cannot
 * be started runs in the starting call. */
typedef struct softcxi_bulk_job softcxi_bulk_job;
SOFTCXI_MUST_CHECK int softcxi_bulk_generate_start(softcxi_session *s, softcxi_bulk_job **job,
                                                   unsigned flags, const softcxi_template *t,
                                                   const char *const *names, size_t n,
                                                   unsigned threads);
/* 1 when every worker has finished (softcxi_bulk_job_wait will not block). */
int softcxi_bulk_job_ready(const softcxi_bulk_job *job);
/* The number of keys the job makes. */
size_t softcxi_bulk_job_count(const softcxi_bulk_job *job);
/* Wait for the workers.  0: *blobs points to the job's count blobs, in
 * order (the caller may take and free each; softcxi_bulk_job_free frees the
 * rest).  On failure none is returned and err says which key failed, as
 * softcxi_bulk_generate.  Once per job: a second call is EINVAL. */
SOFTCXI_MUST_CHECK int softcxi_bulk_job_wait(softcxi_bulk_job *job, softcxi_buf **blobs,
                                             softcxi_error *err);
/* Stop a running job early (each worker after its current key), wait for
 * its threads, wipe and free it.  NULL is fine. */
void softcxi_bulk_job_free(softcxi_bulk_job *job);

/* Import a key from outside into a blob.  Formats:
 *  PKCS8  a private key, PKCS#8 (or traditional) DER, or PEM;
 *  SPKI   a public key (SubjectPublicKeyInfo DER or PEM): the blob has no
 *         secret and may only verify (default), encrypt or wrap;
 *  JWK    a public key as a JSON Web Key (kty EC, OKP or RSA), like SPKI;
 *  RAW    secret bytes, the template saying what they are: an AES or HMAC
 *         key, a 32-byte Ed25519/X25519 private key, an EC private scalar.
 * The template gives name, group, usage, export policy, expiry; its algo,
 * curve and size, when set, must match the key. */
#define SOFTCXI_IMPORT_PKCS8 1
#define SOFTCXI_IMPORT_SPKI 2
#define SOFTCXI_IMPORT_RAW 3
#define SOFTCXI_IMPORT_JWK 4 /* a public JWK (EC, OKP, RSA): as SPKI */
SOFTCXI_MUST_CHECK int softcxi_key_import(softcxi_session *s, softcxi_buf *blob, unsigned flags,
                                          const softcxi_template *t, const uint8_t *data,
                                          size_t len, int format);

/* ---- export and wrapped import ------------------------------------------ */

/* Wrapping mechanisms.  AUTO picks by the wrapping key: AES -> AES_KWP,
 * RSA -> RSA_AES_KWP. */
#define SOFTCXI_WRAP_AUTO 0
#define SOFTCXI_WRAP_AES_KWP 1     /* RFC 5649 (AES-<n>-WRAP-PAD) under an AES key */
#define SOFTCXI_WRAP_RSA_AES_KWP 2 /* RSA-OAEP-SHA256(fresh AES-256 key) || RFC 5649 under it */
const char *softcxi_wrap_name(int mech); /* "aes-kwp", "rsa-aes-kwp", NULL */
int softcxi_wrap_from_name(const char *name);

/* Export a key (blob or handle) in its outside form: PKCS #8 DER for
 * asymmetric keys, the key bytes for AES and HMAC keys.  With wrap_blob
 * (an AES or RSA key with the wrap usage) that form is wrapped by mech, and
 * the key's export policy must be allow or allow-plain; without, the form
 * comes back plain (a secret buf), and only for allow-plain.  Users of both
 * keys' groups; audited before the key leaves. */
SOFTCXI_MUST_CHECK int softcxi_key_export(softcxi_session *s, softcxi_buf *out,
                                          const uint8_t *blob, size_t len, int mech,
                                          const uint8_t *wrap_blob, size_t wrap_len);
/* Import a key wrapped by key_export (or by any RFC 5649 / CKM_RSA_AES_KEY_WRAP
 * wrapper) under unwrap_blob (an AES or RSA key with the unwrap usage).  The
 * unwrapped bytes are PKCS #8, or raw when t->algo is AES or HMAC; then as
 * softcxi_key_import.  ETAMPER when they do not unwrap. */
SOFTCXI_MUST_CHECK int softcxi_key_unwrap(softcxi_session *s, softcxi_buf *blob, unsigned flags,
                                          const softcxi_template *t, const uint8_t *data,
                                          size_t len, int mech, const uint8_t *unwrap_blob,
                                          size_t unwrap_len);

/* ---- operations -------------------------------------------------------- */

#define SOFTCXI_SIG_RAW 1u /* ECDSA: r||s instead of DER */

typedef struct softcxi_sign_req {
    const uint8_t *blob;
    size_t blob_len;
    int mech;       /* softcxi_mech */
    unsigned flags; /* SOFTCXI_SIG_RAW */
    const uint8_t *msg;
    size_t msg_len;
} softcxi_sign_req;

SOFTCXI_MUST_CHECK int softcxi_sign(softcxi_session *s, softcxi_buf *sig,
                                    const softcxi_sign_req *req);
/* 1: good signature, 0: bad signature, < 0: error. */
SOFTCXI_MUST_CHECK int softcxi_verify(softcxi_session *s, const softcxi_sign_req *req,
                                      const uint8_t *sig, size_t sig_len);
/* Sign n messages with one key: sigs[0..n) are filled (free each). */
SOFTCXI_MUST_CHECK int softcxi_bulk_sign(softcxi_session *s, softcxi_buf *sigs,
                                         const softcxi_sign_req *req,
                                         const uint8_t *const *msgs, const size_t *lens,
                                         size_t n);

/* MAC with an HMAC key (mech must match the key's hash). */
SOFTCXI_MUST_CHECK int softcxi_mac(softcxi_session *s, softcxi_buf *mac,
                                   const softcxi_sign_req *req);
SOFTCXI_MUST_CHECK int softcxi_mac_verify(softcxi_session *s, const softcxi_sign_req *req,
                                          const uint8_t *mac, size_t mac_len);

#define SOFTCXI_GCM_IV_LEN 12
#define SOFTCXI_GCM_TAG_LEN 16

typedef struct softcxi_crypt_req {
    const uint8_t *blob;
    size_t blob_len;
    int mech; /* SOFTCXI_MECH_AES_GCM or SOFTCXI_MECH_RSA_OAEP_* */
    const uint8_t *in;
    size_t in_len;
    const uint8_t *aad; /* AES-GCM only */
    size_t aad_len;
    const uint8_t *iv; /* AES-GCM: NULL lets the device draw one */
    size_t iv_len;
    const uint8_t *tag; /* AES-GCM decrypt */
    size_t tag_len;
} softcxi_crypt_req;

/* AES-GCM fills iv (the one used) and tag; RSA-OAEP leaves them alone. */
SOFTCXI_MUST_CHECK int softcxi_encrypt(softcxi_session *s, softcxi_buf *out,
                                       uint8_t iv[SOFTCXI_GCM_IV_LEN],
                                       uint8_t tag[SOFTCXI_GCM_TAG_LEN],
                                       const softcxi_crypt_req *req);
/* The plaintext is released only after the tag (or OAEP padding) checks. */
SOFTCXI_MUST_CHECK int softcxi_decrypt(softcxi_session *s, softcxi_buf *out,
                                       const softcxi_crypt_req *req);

#define SOFTCXI_AGREE_RAW 1u /* return the raw shared secret (a secret buf) */

typedef struct softcxi_agree_req {
    const uint8_t *blob;
    size_t blob_len;
    int mech;                 /* SOFTCXI_MECH_ECDH or SOFTCXI_MECH_X25519 */
    const uint8_t *peer;      /* raw point / key, SPKI DER or PEM */
    size_t peer_len;
    unsigned flags;           /* SOFTCXI_AGREE_RAW */
    const softcxi_template *derived; /* NULL: AES-256 encrypt/decrypt */
    const uint8_t *salt;      /* HKDF-SHA256 salt and info */
    size_t salt_len;
    const uint8_t *info;
    size_t info_len;
} softcxi_agree_req;

/* By default the secret goes through HKDF-SHA256 into a new key of the
 * derived template, returned as a blob of the base key's group. */
SOFTCXI_MUST_CHECK int softcxi_secret_agree(softcxi_session *s, softcxi_buf *out,
                                            const softcxi_agree_req *req);

SOFTCXI_MUST_CHECK int softcxi_rnd_gen(softcxi_session *s, uint8_t *out, size_t len);

/* Stateless: digest into out (up to 64 bytes); *out_len gets the size. */
SOFTCXI_MUST_CHECK int softcxi_hash_compute(uint8_t *out, size_t *out_len, int mech,
                                            const uint8_t *in, size_t in_len,
                                            softcxi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* SOFTCXI_H */
