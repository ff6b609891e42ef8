/*
 * test_device.c - the device calls added after the first round: logon by
 * key (challenge and response), changing users, list_files, get_state,
 * key_rewrap_many.
 *
 * Each test makes a file-backed device under $SOFTCXI_TEST_TMP (default
 * /tmp), removed at the end, and checks what a user relies on, including
 * every bad input: the precise code and a message naming the user or key.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

#define CHECK_RC(expr, want) CHECK_RC_MSG(expr, want, s->err.msg)
#define CHECK_MSG(sub) CHECK(strstr(s->err.msg, (sub)) != NULL)

static char tmproot[512];
static int ndev;

/* A fresh device with ADMIN (level 2) and "app" (groups "*"); the session
 * returned has nobody logged on. */
static softcxi_session *new_device(char *dir, size_t cap)
{
    char key[700];
    softcxi_error err;
    softcxi_device *dev = NULL;
    snprintf(dir, cap, "%s/dev%d", tmproot, ++ndev);
    snprintf(key, sizeof key, "%s/keys/dev%d.key", tmproot, ndev);
    softcxi_init_req init = {dir, key, "ADMIN", "admin-password", 10};
    softcxi_open_req req = {dir, key, -1, 0};
    if (softcxi_device_init(&init, &err) != 0 || softcxi_device_open(&dev, &req, &err) != 0) {
        fprintf(stderr, "device: %s\n", err.msg);
        exit(2);
    }
    softcxi_session *s = softcxi_session_new(dev);
    softcxi_device_free(dev);
    softcxi_user_req u = {"app", "app-password", SOFTCXI_ROLE_USER, 1, "*", 10, NULL, 0};
    CHECK_RC(softcxi_logon_pass(s, "ADMIN", "admin-password"), 0);
    CHECK_RC(softcxi_user_add(s, &u), 0);
    softcxi_logoff(s);
    return s;
}

/* A second session on the device of s. */
static softcxi_session *another(softcxi_session *s)
{
    return softcxi_session_new(softcxi_session_device(s));
}

/* A key pair as PEM: private (PKCS#8) and public (SPKI). */
static void keypair(const char *type, const char *curve, char **priv, char **pub)
{
    EVP_PKEY *pk = curve                   ? EVP_PKEY_Q_keygen(NULL, NULL, type, curve)
                   : !strcmp(type, "RSA") ? EVP_PKEY_Q_keygen(NULL, NULL, type, (size_t)2048)
                                          : EVP_PKEY_Q_keygen(NULL, NULL, type);
    BIO *a = BIO_new(BIO_s_mem()), *b = BIO_new(BIO_s_mem());
    char *p;
    if (!pk || !a || !b || PEM_write_bio_PrivateKey(a, pk, NULL, NULL, 0, NULL, NULL) != 1 ||
        PEM_write_bio_PUBKEY(b, pk) != 1)
        exit(2);
    long n = BIO_get_mem_data(a, &p);
    *priv = strndup(p, (size_t)n);
    n = BIO_get_mem_data(b, &p);
    *pub = strndup(p, (size_t)n);
    BIO_free(a);
    BIO_free(b);
    EVP_PKEY_free(pk);
}

static softcxi_user_req key_user(const char *name, const char *pub, int role, unsigned level)
{
    softcxi_user_req u = {name, NULL, role, level, "iot", 10, (const uint8_t *)pub, strlen(pub)};
    return u;
}

static uint32_t failures_of(softcxi_session *adm, const char *name);

static void test_logon_sign(void)
{
    char dir[600], *ecpriv, *ecpub, *edpriv, *edpub, *rsapriv, *rsapub, *p384priv, *p384pub;
    current = "logon_sign";
    softcxi_session *s = new_device(dir, sizeof dir);
    keypair("EC", "P-256", &ecpriv, &ecpub);
    keypair("ED25519", NULL, &edpriv, &edpub);
    keypair("RSA", NULL, &rsapriv, &rsapub);
    keypair("EC", "P-384", &p384priv, &p384pub);

    CHECK_RC(softcxi_logon_pass(s, "ADMIN", "admin-password"), 0);
    softcxi_user_req u = key_user("ops", ecpub, SOFTCXI_ROLE_USER, 1);
    CHECK_RC(softcxi_user_add(s, &u), 0);
    u = key_user("bot", edpub, SOFTCXI_ROLE_ADMIN, 1);
    CHECK_RC(softcxi_user_add(s, &u), 0);
    u = key_user("big", rsapub, SOFTCXI_ROLE_USER, 1);
    CHECK_RC(softcxi_user_add(s, &u), SOFTCXI_EINVAL);
    CHECK_MSG("'big'");
    u = key_user("p384", p384pub, SOFTCXI_ROLE_USER, 1);
    CHECK_RC(softcxi_user_add(s, &u), SOFTCXI_EINVAL);
    u = key_user("neither", "", SOFTCXI_ROLE_USER, 1);
    u.pubkey = NULL;
    CHECK_RC(softcxi_user_add(s, &u), SOFTCXI_EINVAL);
    CHECK_MSG("'neither'");
    softcxi_logoff(s);

    /* One call, both kinds of key; levels add up with a password logon. */
    CHECK_RC(softcxi_logon_sign(s, "ops", (const uint8_t *)ecpriv, strlen(ecpriv)), 0);
    CHECK_RC(softcxi_logon_sign(s, "bot", (const uint8_t *)edpriv, strlen(edpriv)), 0);
    CHECK_RC(softcxi_user_list(s, NULL, NULL), SOFTCXI_EAUTH); /* bot alone has level 1 */
    softcxi_logoff(s);

    /* Challenge and response by hand; the answer is good once. */
    softcxi_buf msg = {0}, sig = {0}, msg2 = {0};
    CHECK_RC(softcxi_logon_challenge(s, &msg, "bot"), 0);
    CHECK(msg.len == 17 + 32 + 1 + 3 + 1 + 32 && memcmp(msg.data, "softcxi-logon-v1", 17) == 0);
    CHECK(memcmp(msg.data + 17, softcxi_device_id(softcxi_session_device(s)), 32) == 0);
    CHECK_RC(softcxi_logon_answer(&sig, msg.data, msg.len, (const uint8_t *)edpriv,
                                  strlen(edpriv), &s->err),
             0);
    CHECK_RC(softcxi_logon_response(s, "bot", sig.data, sig.len), 0);
    softcxi_logoff(s);
    CHECK_RC(softcxi_logon_response(s, "bot", sig.data, sig.len), SOFTCXI_EINVAL);
    CHECK_MSG("'bot'");
    CHECK_RC(softcxi_logon_challenge(s, &msg2, "bot"), 0);
    CHECK_RC(softcxi_logon_response(s, "bot", sig.data, sig.len), SOFTCXI_EAUTH); /* replay */
    CHECK_RC(softcxi_logon_response(s, "ops", sig.data, sig.len), SOFTCXI_EINVAL);
    /* An expired challenge is refused and used up. */
    softcxi_buf_free(&msg2);
    CHECK_RC(softcxi_logon_challenge(s, &msg2, "ops"), 0);
    s->challenge_time -= 121;
    softcxi_buf_free(&sig);
    CHECK_RC(softcxi_logon_answer(&sig, msg2.data, msg2.len, (const uint8_t *)ecpriv,
                                  strlen(ecpriv), &s->err),
             0);
    CHECK_RC(softcxi_logon_response(s, "ops", sig.data, sig.len), SOFTCXI_EAUTH);
    CHECK_MSG("seconds old");
    CHECK_RC(softcxi_logon_response(s, "ops", sig.data, sig.len), SOFTCXI_EINVAL);

    /* Keys that cannot answer, users who have no key, unknown users. */
    CHECK_RC(softcxi_logon_sign(s, "ops", (const uint8_t *)rsapriv, strlen(rsapriv)),
             SOFTCXI_EINVAL);
    CHECK_MSG("'ops'");
    CHECK_RC(softcxi_logon_sign(s, "ops", (const uint8_t *)"junk", 4), SOFTCXI_EINVAL);
    CHECK_RC(softcxi_logon_sign(s, "app", (const uint8_t *)ecpriv, strlen(ecpriv)),
             SOFTCXI_EAUTH);
    CHECK_MSG("no logon key");
    CHECK_RC(softcxi_logon_pass(s, "ops", "any-password"), SOFTCXI_EAUTH);
    CHECK_MSG("no password");
    CHECK_RC(softcxi_logon_sign(s, "nobody", (const uint8_t *)ecpriv, strlen(ecpriv)),
             SOFTCXI_EAUTH);
    CHECK_MSG("'nobody'");
    CHECK_RC(softcxi_logon_sign(s, "", (const uint8_t *)ecpriv, strlen(ecpriv)), SOFTCXI_EINVAL);

    /* A wrong key counts toward the lockout, as a wrong password does. */
    softcxi_session *adm = another(s);
    CHECK_RC(softcxi_logon_pass(adm, "ADMIN", "admin-password"), 0);
    uint32_t before = failures_of(adm, "ops");
    for (int i = 0; i < 4; i++) /* an Ed25519 key for an EC user: it signs, the check fails */
        CHECK_RC(softcxi_logon_sign(s, "ops", (const uint8_t *)edpriv, strlen(edpriv)),
                 SOFTCXI_EAUTH);
    /* one failure before (the replay), three now, then the lock stops counting */
    CHECK(before == 1 && failures_of(adm, "ops") == 4);
    CHECK_RC(softcxi_logon_sign(s, "ops", (const uint8_t *)ecpriv, strlen(ecpriv)),
             SOFTCXI_EAUTH);
    CHECK_MSG("locked out");
    softcxi_user_set_req up = {"ops", NULL, NULL, 0, NULL, -1, 1, 0};
    CHECK_RC(softcxi_user_set(adm, &up), 0);
    CHECK_RC(softcxi_logon_sign(s, "ops", (const uint8_t *)ecpriv, strlen(ecpriv)), 0);

    softcxi_buf_free(&msg);
    softcxi_buf_free(&msg2);
    softcxi_buf_free(&sig);
    softcxi_session_free(adm);
    softcxi_session_free(s);
    free(ecpriv), free(ecpub), free(edpriv), free(edpub), free(rsapriv), free(rsapub);
    free(p384priv), free(p384pub);
}

/* A users.db as written before logon keys existed (count without the top
 * bit, no pub fields) still opens, and the next change rewrites it. */
static void test_users_db_v1(void)
{
    char dir[600], path[700];
    current = "users.db written before logon_sign";
    softcxi_session *s = new_device(dir, sizeof dir);
    softcxi_device *dev = softcxi_session_device(s);
    uint8_t pt[200], salt[16] = {1, 2, 3}, v[32], fsalt[SCX_SALT_LEN] = {9}, kcv[8], out[300];
    size_t k = 0;
    CHECK(scx_scrypt(v, sizeof v, "old-password", salt, sizeof salt, 10) == 0);
    pt[k++] = 0, pt[k++] = 0, pt[k++] = 0, pt[k++] = 1; /* one user */
    pt[k++] = 3, memcpy(pt + k, "old", 3), k += 3;
    pt[k++] = SOFTCXI_ROLE_ADMIN, pt[k++] = 2;
    pt[k++] = 0, pt[k++] = 1, pt[k++] = '*';
    pt[k++] = 10, memcpy(pt + k, salt, 16), k += 16, memcpy(pt + k, v, 32), k += 32;
    memset(pt + k, 0, 12), k += 12; /* failures, locked_until */
    scx_xaes x;
    CHECK(scx_kcv(kcv, dev->sec->state_key) == 0 && scx_xaes_init(&x, dev->sec->state_key) == 0);
    CHECK(scx_frame_seal(out, SCX_TYPE_USERS, kcv, fsalt, NULL, 0, pt, k, &x, dev->gcm) == 0);
    scx_xaes_clear(&x);
    snprintf(path, sizeof path, "%s/users.db", dir);
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(out, 1, SCX_HDR_LEN + k + SCX_TAG_LEN, f) == SCX_HDR_LEN + k + SCX_TAG_LEN);
    if (f)
        fclose(f);
    CHECK_RC(softcxi_logon_pass(s, "old", "old-password"), 0);
    softcxi_user_req u = {"new", "new-password", SOFTCXI_ROLE_USER, 1, "*", 10, NULL, 0};
    CHECK_RC(softcxi_user_add(s, &u), 0);
    softcxi_logoff(s);
    CHECK_RC(softcxi_logon_pass(s, "new", "new-password"), 0);
    CHECK_RC(softcxi_logon_pass(s, "old", "old-password"), 0);
    softcxi_session_free(s);
}

typedef struct failures {
    const char *name;
    uint32_t n;
} failures;

static int find_failures(void *ctx, const softcxi_user_info *u)
{
    failures *f = ctx;
    if (!strcmp(u->name, f->name))
        f->n = u->failures;
    return 0;
}

static uint32_t failures_of(softcxi_session *adm, const char *name)
{
    failures f = {name, 0};
    if (softcxi_user_list(adm, find_failures, &f) != 0)
        return UINT32_MAX;
    return f.n;
}

static void test_user_set(void)
{
    char dir[600];
    current = "user_set";
    softcxi_session *s = new_device(dir, sizeof dir);
    /* A user changes his own password, and nothing else. */
    CHECK_RC(softcxi_logon_pass(s, "app", "app-password"), 0);
    softcxi_user_set_req r = {"app", "new-app-password", NULL, 0, NULL, -1, 0, 10};
    CHECK_RC(softcxi_user_set(s, &r), 0);
    r.password = NULL, r.groups = "iot";
    CHECK_RC(softcxi_user_set(s, &r), SOFTCXI_EAUTH);
    softcxi_user_set_req theirs = {"ADMIN", "stolen-password", NULL, 0, NULL, -1, 0, 10};
    CHECK_RC(softcxi_user_set(s, &theirs), SOFTCXI_EAUTH);
    softcxi_logoff(s);
    CHECK_RC(softcxi_logon_pass(s, "app", "app-password"), SOFTCXI_EAUTH);
    CHECK_RC(softcxi_logon_pass(s, "app", "new-app-password"), 0);
    softcxi_logoff(s);
    /* Administrators change groups and levels; bad input changes nothing. */
    CHECK_RC(softcxi_logon_pass(s, "ADMIN", "admin-password"), 0);
    softcxi_user_set_req g = {"app", "short", NULL, 0, "iot", 0, 0, 10};
    CHECK_RC(softcxi_user_set(s, &g), SOFTCXI_EINVAL);
    CHECK_MSG("'app'");
    g.password = NULL;
    CHECK_RC(softcxi_user_set(s, &g), 0);
    softcxi_user_set_req ghost = {"ghost", NULL, NULL, 0, NULL, 1, 0, 0};
    CHECK_RC(softcxi_user_set(s, &ghost), SOFTCXI_ENOTFOUND);
    CHECK_MSG("'ghost'");
    softcxi_user_set_req none = {"app", NULL, NULL, 0, NULL, -1, 0, 0};
    CHECK_RC(softcxi_user_set(s, &none), SOFTCXI_EINVAL);
    softcxi_user_set_req lower = {"ADMIN", NULL, NULL, 0, NULL, 1, 0, 0};
    CHECK_RC(softcxi_user_set(s, &lower), SOFTCXI_EPOLICY);
    softcxi_user_set_req badpub = {"app", NULL, (const uint8_t *)"x", 1, NULL, -1, 0, 0};
    CHECK_RC(softcxi_user_set(s, &badpub), SOFTCXI_EINVAL);
    /* Dual control: a second level-1 administrator, then ADMIN down to 1. */
    softcxi_user_req a2 = {"sec2", "sec2-password", SOFTCXI_ROLE_ADMIN, 1, "", 10, NULL, 0};
    CHECK_RC(softcxi_user_add(s, &a2), 0);
    CHECK_RC(softcxi_user_set(s, &lower), 0);
    softcxi_logoff(s);
    CHECK_RC(softcxi_logon_pass(s, "ADMIN", "admin-password"), 0);
    CHECK_RC(softcxi_user_set(s, &lower), SOFTCXI_EAUTH);
    CHECK_RC(softcxi_logon_pass(s, "sec2", "sec2-password"), 0);
    softcxi_user_set_req drop = {"sec2", NULL, NULL, 0, NULL, 0, 0, 0};
    CHECK_RC(softcxi_user_set(s, &drop), SOFTCXI_EPOLICY);
    /* Nor may deleting one of two level-1 administrators leave level 1. */
    CHECK_RC(softcxi_user_delete(s, "sec2"), SOFTCXI_EPOLICY);
    CHECK(strstr(s->err.msg, "'sec2'") != NULL);
    softcxi_logoff(s);
    /* The group change holds. */
    CHECK_RC(softcxi_logon_pass(s, "app", "new-app-password"), 0);
    softcxi_template t = {0};
    softcxi_buf b = {0};
    t.algo = SOFTCXI_ALGO_EC, t.group = "ops", t.name = "k";
    CHECK_RC(softcxi_key_generate(s, &b, SOFTCXI_FLAG_EXTERNAL, &t), SOFTCXI_EACCESS);
    softcxi_session_free(s);
}

typedef struct files {
    int n, sorted, has_users;
    char last[256];
} files;

static int on_file(void *ctx, const char *name, uint64_t size, int64_t mtime)
{
    files *f = ctx;
    if (f->n && strcmp(f->last, name) >= 0)
        f->sorted = 0;
    snprintf(f->last, sizeof f->last, "%s", name);
    if (!strcmp(name, "users.db") && size > 0 && mtime > 0)
        f->has_users = 1;
    f->n++;
    return 0;
}

static void test_list_files_state(void)
{
    char dir[600];
    current = "list_files, get_state";
    softcxi_session *s = new_device(dir, sizeof dir);
    files f = {0, 1, 0, ""};
    CHECK_RC(softcxi_list_files(s, on_file, &f), SOFTCXI_EAUTH);
    CHECK_RC(softcxi_logon_pass(s, "app", "app-password"), 0);
    CHECK_RC(softcxi_list_files(s, on_file, &f), 0);
    CHECK(f.n >= 5 && f.sorted && f.has_users);
    softcxi_state st;
    CHECK_RC(softcxi_get_state(s, &st), 0);
    CHECK(st.initialised && st.mbk_loaded && st.users == 2 && st.keydb_limit == 8u << 20);
    CHECK(!strcmp(st.version, SOFTCXI_VERSION_STRING));
    softcxi_session_free(s);
}

/* ---- database backup ------------------------------------------------------ */

static softcxi_buf internal_key(softcxi_session *s, const char *name, int export_policy)
{
    softcxi_template t = {0};
    softcxi_buf h = {0};
    t.algo = SOFTCXI_ALGO_EC, t.group = "g", t.name = name, t.export_policy = export_policy;
    CHECK_RC(softcxi_key_generate(s, &h, 0, &t), 0);
    return h;
}

typedef struct names {
    char all[512];
} names;

static int add_name(void *ctx, const char *group, const char *name, uint32_t spec, int has)
{
    names *n = ctx;
    (void)spec, (void)has;
    size_t k = strlen(n->all);
    snprintf(n->all + k, sizeof n->all - k, "%s%s/%s", k ? " " : "", group, name);
    return 0;
}

static const char *list_keys(softcxi_session *s, names *n)
{
    n->all[0] = '\0';
    CHECK_RC(softcxi_key_list(s, add_name, n), 0);
    return n->all;
}

static void test_database_backup(void)
{
    char dir1[600], dir2[600], sh[2][700];
    const char *pws[2] = {"share-pw-one", "share-pw-two"};
    const char *paths[2] = {sh[0], sh[1]};
    names n;
    size_t keys, skipped;
    current = "backup_database / restore_database";
    softcxi_session *s = new_device(dir1, sizeof dir1), *s2 = new_device(dir2, sizeof dir2);
    snprintf(sh[0], sizeof sh[0], "%s/share1", tmproot);
    snprintf(sh[1], sizeof sh[1], "%s/share2", tmproot);
    /* Both devices import one MBK from shares. */
    CHECK_RC(softcxi_logon_pass(s, "ADMIN", "admin-password"), 0);
    CHECK_RC(softcxi_logon_pass(s2, "ADMIN", "admin-password"), 0);
    softcxi_mbk_req mr = {2, 2, SOFTCXI_SHARES_SHAMIR, paths, pws, 10};
    CHECK_RC(softcxi_mbk_generate(s, &mr), 0);
    CHECK_RC(softcxi_mbk_import(s, paths, pws, 2), 0);
    CHECK_RC(softcxi_mbk_import(s2, paths, pws, 2), 0);
    softcxi_logoff(s);
    softcxi_logoff(s2);

    CHECK_RC(softcxi_logon_pass(s, "app", "app-password"), 0);
    softcxi_buf h1 = internal_key(s, "a", SOFTCXI_EXPORT_DENY);
    softcxi_buf h2 = internal_key(s, "b", SOFTCXI_EXPORT_ALLOW);
    softcxi_buf h3 = internal_key(s, "nb", SOFTCXI_EXPORT_DENY_BACKUP);
    softcxi_buf image = {0};
    CHECK_RC(softcxi_backup_database(s, &image, &keys, &skipped), SOFTCXI_EAUTH);
    CHECK_RC(softcxi_logon_pass(s, "ADMIN", "admin-password"), 0);
    CHECK_RC(softcxi_backup_database(s, &image, &keys, &skipped), 0);
    CHECK(keys == 2 && skipped == 1);

    /* The bytes are as docs/blob-format.md says: open them by hand. */
    softcxi_device *dev = softcxi_session_device(s);
    CHECK(image.len >= 64 && image.data[0] == 'K' && image.data[1] == 1 && image.data[2] == 3 &&
          image.data[3] == 0 && memcmp(image.data + 4, dev->kcv, 8) == 0);
    size_t plen = (size_t)image.data[44] << 24 | (size_t)image.data[45] << 16 |
                  (size_t)image.data[46] << 8 | image.data[47];
    CHECK(image.len == 64 + plen);
    uint8_t k[32], *pt = malloc(plen);
    scx_xaes x;
    CHECK(scx_label_key(k, dev->sec->mbk, "softcxi/v1/blob/db-backup") == 0 &&
          scx_xaes_init(&x, k) == 0);
    CHECK_RC(scx_xaes_open(&x, dev->gcm, pt, image.data + 48, plen, image.data + 48 + plen,
                           image.data + 12, image.data, 48),
             0);
    CHECK(pt[0] == 0 && pt[1] == 0 && pt[2] == 0 && pt[3] == 2); /* two entries */
    CHECK(pt[4] == 0 && pt[5] == 1 && pt[6] == 1 && pt[15] == 'g' && pt[16] == 'a');
    scx_xaes_clear(&x);
    OPENSSL_cleanse(k, sizeof k);
    free(pt);

    /* Restores on the second device, replacing what it had. */
    CHECK_RC(softcxi_logon_pass(s2, "app", "app-password"), 0);
    softcxi_buf other = internal_key(s2, "other", SOFTCXI_EXPORT_DENY);
    CHECK_RC(softcxi_restore_database(s2, image.data, image.len, 0, &keys), SOFTCXI_EAUTH);
    CHECK_RC(softcxi_logon_pass(s2, "ADMIN", "admin-password"), 0);
    CHECK_RC(softcxi_restore_database(s2, image.data, image.len, 0, &keys), 0);
    CHECK(keys == 2 && !strcmp(list_keys(s2, &n), "g/a g/b"));
    softcxi_sign_req r = {h1.data, h1.len, SOFTCXI_MECH_ECDSA_SHA256, 0, (const uint8_t *)"m", 1};
    softcxi_buf sig = {0};
    CHECK_RC(softcxi_sign(s2, &sig, &r), 0); /* the same handle names the restored key */
    CHECK_RC(softcxi_verify(s, &r, sig.data, sig.len), 1);
    /* Merge: a key in both is EEXIST unless FLAG_OVERWRITE; other keys stay. */
    softcxi_buf_free(&other);
    CHECK_RC(softcxi_key_generate(s2, &other, 0, &(softcxi_template){.algo = SOFTCXI_ALGO_EC,
                                                                      .group = "g",
                                                                      .name = "other"}),
             0);
    CHECK_RC(softcxi_restore_database(s2, image.data, image.len, SOFTCXI_RESTORE_MERGE, &keys),
             SOFTCXI_EEXIST);
    CHECK(strstr(s2->err.msg, "'g/a'") != NULL);
    CHECK_RC(softcxi_restore_database(s2, image.data, image.len,
                                      SOFTCXI_RESTORE_MERGE | SOFTCXI_FLAG_OVERWRITE, &keys),
             0);
    CHECK(!strcmp(list_keys(s2, &n), "g/a g/b g/other"));

    /* Bad images change nothing. */
    uint8_t *bad = malloc(image.len);
    memcpy(bad, image.data, image.len);
    bad[image.len - 20] ^= 1;
    CHECK_RC(softcxi_restore_database(s2, bad, image.len, 0, &keys), SOFTCXI_ETAMPER);
    CHECK_RC(softcxi_restore_database(s2, image.data, image.len - 1, 0, &keys), SOFTCXI_EFORMAT);
    CHECK(strstr(s2->err.msg, "truncated") != NULL);
    CHECK_RC(softcxi_restore_database(s2, image.data, 10, 0, &keys), SOFTCXI_EFORMAT);
    CHECK_RC(softcxi_restore_database(s2, NULL, 0, 0, &keys), SOFTCXI_EFORMAT);
    bad[image.len - 20] ^= 1;
    bad[5] ^= 1; /* another MBK's check value */
    CHECK_RC(softcxi_restore_database(s2, bad, image.len, 0, &keys), SOFTCXI_EMBK);
    CHECK_RC(softcxi_restore_database(s2, image.data, image.len, 0x100, &keys), SOFTCXI_EINVAL);
    CHECK(!strcmp(list_keys(s2, &n), "g/a g/b g/other"));

    free(bad);
    softcxi_buf_free(&sig);
    softcxi_buf_free(&other);
    softcxi_buf_free(&image);
    softcxi_buf_free(&h1);
    softcxi_buf_free(&h2);
    softcxi_buf_free(&h3);
    softcxi_session_free(s);
    softcxi_session_free(s2);
}

/* ---- key export, wrapped import, JWK ----------------------------------------- */

static size_t unhex(uint8_t *out, const char *hex)
{
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return 0;
        out[i] = (uint8_t)v;
    }
    return n;
}

static softcxi_buf import_raw(softcxi_session *s, int algo, const char *name, const char *hex,
                              unsigned usage, int export_policy)
{
    uint8_t k[64];
    softcxi_template t = {0};
    softcxi_buf b = {0};
    size_t n = unhex(k, hex);
    t.algo = algo, t.group = "g", t.name = name, t.usage = usage, t.export_policy = export_policy;
    CHECK_RC(softcxi_key_import(s, &b, SOFTCXI_FLAG_EXTERNAL, &t, k, n, SOFTCXI_IMPORT_RAW), 0);
    OPENSSL_cleanse(k, sizeof k);
    return b;
}

static void test_export(void)
{
    char dir[600];
    uint8_t want[64];
    current = "key_export, wrapped key_import, JWK";
    softcxi_session *s = new_device(dir, sizeof dir);
    CHECK_RC(softcxi_logon_pass(s, "app", "app-password"), 0);
    /* RFC 5649 section 6, both vectors: a 192-bit KEK wrapping 20 and 7 bytes. */
    softcxi_buf kek = import_raw(s, SOFTCXI_ALGO_AES, "kek",
                                 "5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8",
                                 SOFTCXI_USAGE_WRAP | SOFTCXI_USAGE_UNWRAP, 0);
    softcxi_buf mac = import_raw(s, SOFTCXI_ALGO_HMAC_SHA256, "mac",
                                 "c37b7e6492584340bed12207808941155068f738",
                                 SOFTCXI_USAGE_SIGN | SOFTCXI_USAGE_VERIFY,
                                 SOFTCXI_EXPORT_ALLOW);
    softcxi_buf w = {0}, back = {0}, m1 = {0}, m2 = {0}, plain = {0};
    CHECK_RC(softcxi_key_export(s, &w, mac.data, mac.len, SOFTCXI_WRAP_AES_KWP, kek.data,
                                kek.len),
             0);
    size_t n = unhex(want, "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a");
    CHECK(w.len == n && memcmp(w.data, want, n) == 0);
    /* the wrapped key comes back in as the same key */
    softcxi_template t = {0};
    t.algo = SOFTCXI_ALGO_HMAC_SHA256, t.group = "g", t.name = "mac2";
    CHECK_RC(softcxi_key_unwrap(s, &back, SOFTCXI_FLAG_EXTERNAL, &t, w.data, w.len,
                                SOFTCXI_WRAP_AUTO, kek.data, kek.len),
             0);
    softcxi_sign_req r1 = {mac.data, mac.len, SOFTCXI_MECH_HMAC_SHA256, 0,
                           (const uint8_t *)"m", 1};
    softcxi_sign_req r2 = {back.data, back.len, SOFTCXI_MECH_HMAC_SHA256, 0,
                           (const uint8_t *)"m", 1};
    CHECK_RC(softcxi_mac(s, &m1, &r1), 0);
    CHECK_RC(softcxi_mac(s, &m2, &r2), 0);
    CHECK(m1.len == 32 && m2.len == 32 && memcmp(m1.data, m2.data, 32) == 0);
    /* A wrong byte does not unwrap; nothing is made. */
    w.data[3] ^= 1;
    softcxi_buf none = {0};
    CHECK_RC(softcxi_key_unwrap(s, &none, SOFTCXI_FLAG_EXTERNAL, &t, w.data, w.len,
                                SOFTCXI_WRAP_AES_KWP, kek.data, kek.len),
             SOFTCXI_ETAMPER);
    CHECK_MSG("'g/kek'");
    CHECK(none.data == NULL);
    /* Plain export needs allow-plain; the result is marked secret. */
    CHECK_RC(softcxi_key_export(s, &plain, mac.data, mac.len, 0, NULL, 0), SOFTCXI_EPOLICY);
    CHECK_MSG("'g/mac'");
    softcxi_buf ap = import_raw(s, SOFTCXI_ALGO_HMAC_SHA256, "ap", "466f7250617369466f7250617369aabb",
                                SOFTCXI_USAGE_SIGN, SOFTCXI_EXPORT_ALLOW_PLAIN);
    CHECK_RC(softcxi_key_export(s, &plain, ap.data, ap.len, 0, NULL, 0), 0);
    CHECK(plain.secret == 1 && plain.len == 16 && plain.data[0] == 0x46);
    /* The KEK itself (export deny) goes nowhere; an unknown mechanism is EINVAL. */
    softcxi_buf_free(&w);
    CHECK_RC(softcxi_key_export(s, &w, kek.data, kek.len, 0, kek.data, kek.len), SOFTCXI_EPOLICY);
    CHECK_RC(softcxi_key_export(s, &w, mac.data, mac.len, 9, kek.data, kek.len), SOFTCXI_EINVAL);
    CHECK_RC(softcxi_key_export(s, &w, mac.data, mac.len, SOFTCXI_WRAP_RSA_AES_KWP, kek.data,
                                kek.len),
             SOFTCXI_EINVAL);

    /* JWK: good, private, and malformed. */
    softcxi_buf ec = {0}, jwk = {0}, v = {0};
    t = (softcxi_template){0};
    t.algo = SOFTCXI_ALGO_EC, t.group = "g", t.name = "ec";
    CHECK_RC(softcxi_key_generate(s, &ec, SOFTCXI_FLAG_EXTERNAL, &t), 0);
    CHECK_RC(softcxi_public_key(s, &jwk, ec.data, ec.len, SOFTCXI_PUB_JWK), 0);
    t.algo = 0, t.name = "v";
    CHECK_RC(softcxi_key_import(s, &v, SOFTCXI_FLAG_EXTERNAL, &t, jwk.data, jwk.len,
                                SOFTCXI_IMPORT_JWK),
             0);
    softcxi_key_info info;
    CHECK_RC(softcxi_key_info_read(&info, v.data, v.len, &s->err), 0);
    CHECK(info.usage == SOFTCXI_USAGE_VERIFY && info.curve == SOFTCXI_CURVE_P256);
    static const char *const bad[] = {
        "{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\","
        "\"d\":\"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\"}",
        "{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"",
        "{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHUR\"}",
        "{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"\\u0000\"}",
        "{\"a\":[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}",
        "[]",
        "{\"kty\":\"EC\"}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        softcxi_buf x = {0};
        CHECK_RC(softcxi_key_import(s, &x, SOFTCXI_FLAG_EXTERNAL, &t, (const uint8_t *)bad[i],
                                    strlen(bad[i]), SOFTCXI_IMPORT_JWK),
                 SOFTCXI_EINVAL);
        softcxi_buf_free(&x);
    }
    /* RFC 8037's Ed25519 example public key imports. */
    const char *ed = "{\"kty\":\"OKP\",\"crv\":\"Ed25519\","
                     "\"x\":\"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"}";
    softcxi_buf edb = {0};
    CHECK_RC(softcxi_key_import(s, &edb, SOFTCXI_FLAG_EXTERNAL, &t, (const uint8_t *)ed,
                                strlen(ed), SOFTCXI_IMPORT_JWK),
             0);
    n = unhex(want, "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
    CHECK_RC(softcxi_key_info_read(&info, edb.data, edb.len, &s->err), 0);
    CHECK(info.algo == SOFTCXI_ALGO_ED25519 && info.pub_len == n && !memcmp(info.pub, want, n));

    softcxi_buf bufs[] = {kek, mac, w, back, m1, m2, plain, ap, ec, jwk, v, edb};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        softcxi_buf_free(&bufs[i]);
    softcxi_session_free(s);
}

/* ---- key_rewrap_many ---------------------------------------------------- */

/* Import a new MBK from two fresh share files (admin logged on in s). */
static void rotate_mbk(softcxi_session *s, const char *tag)
{
    char sh[2][700];
    const char *pws[2] = {"share-pw-one", "share-pw-two"};
    const char *paths[2] = {sh[0], sh[1]};
    snprintf(sh[0], sizeof sh[0], "%s/%s-1", tmproot, tag);
    snprintf(sh[1], sizeof sh[1], "%s/%s-2", tmproot, tag);
    softcxi_mbk_req mr = {2, 2, SOFTCXI_SHARES_SHAMIR, paths, pws, 10};
    CHECK_RC(softcxi_mbk_generate(s, &mr), 0);
    CHECK_RC(softcxi_mbk_import(s, paths, pws, 2), 0);
}

/* A batch rewrapped by key_rewrap_many on `threads` threads gives, blob by
 * blob, what key_rewrap gives one by one: the same code, the same "current",
 * and for a rewrapped blob one under the current MBK, with the same
 * attributes, holding the same key (its public key, and it signs). */
static void check_many_as_one(softcxi_session *s, const uint8_t *const *blobs,
                              const size_t *lens, size_t n, unsigned threads, int *status)
{
    softcxi_buf outs[64];
    softcxi_device *dev = softcxi_session_device(s);
    CHECK_RC(softcxi_key_rewrap_many(s, outs, status, blobs, lens, n, threads), 0);
    for (size_t i = 0; i < n; i++) {
        softcxi_buf one = {0};
        int changed = -1;
        int rc = softcxi_key_rewrap(s, &one, blobs[i], lens[i], &changed);
        CHECK(status[i] == (rc ? rc : changed));
        if (status[i] == 1) {
            softcxi_key_info a, b;
            softcxi_error err;
            CHECK(outs[i].data && outs[i].len == lens[i]);
            CHECK(softcxi_key_info_read(&a, blobs[i], lens[i], &err) == 0 &&
                  softcxi_key_info_read(&b, outs[i].data, outs[i].len, &err) == 0);
            CHECK(memcmp(b.kcv, dev->kcv, 8) == 0 && memcmp(a.kcv, b.kcv, 8) != 0);
            CHECK(a.name_len == b.name_len && !memcmp(a.name, b.name, a.name_len) &&
                  a.pub_len == b.pub_len && !memcmp(a.pub, b.pub, a.pub_len));
            /* a fresh salt: not the bytes key_rewrap just made either */
            CHECK(memcmp(outs[i].data + 12, one.data + 12, 24) != 0);
            softcxi_buf sig = {0};
            softcxi_sign_req sr = {outs[i].data, outs[i].len, SOFTCXI_MECH_ECDSA_SHA256, 0,
                                   (const uint8_t *)"m", 1};
            CHECK_RC(softcxi_sign(s, &sig, &sr), 0);
            softcxi_buf_free(&sig);
        } else {
            CHECK(outs[i].data == NULL && outs[i].len == 0);
        }
        softcxi_buf_free(&one);
        softcxi_buf_free(&outs[i]);
    }
}

static void test_rewrap_many(void)
{
    char dir[600];
    current = "key_rewrap_many";
    softcxi_session *s = new_device(dir, sizeof dir);
    softcxi_session *adm = another(s);
    CHECK_RC(softcxi_logon_pass(adm, "ADMIN", "admin-password"), 0);
    softcxi_user_req u = {"iot-ops", "iot-password", SOFTCXI_ROLE_USER, 1, "iot", 10, NULL, 0};
    CHECK_RC(softcxi_user_add(adm, &u), 0);
    CHECK_RC(softcxi_logon_pass(s, "app", "app-password"), 0);

    /* 40 keys of group iot and one of group ops under MBK A */
    enum { N = 40 };
    softcxi_buf a[N], ops = {0}, c_blobs[4], b2[N];
    char knames[N][16];
    const char *np[N];
    for (int i = 0; i < N; i++) {
        snprintf(knames[i], sizeof knames[i], "k%02d", i);
        np[i] = knames[i];
    }
    softcxi_template t = {0};
    t.algo = SOFTCXI_ALGO_EC, t.group = "iot", t.usage = SOFTCXI_USAGE_SIGN;
    CHECK_RC(softcxi_bulk_generate(s, a, SOFTCXI_FLAG_EXTERNAL, &t, np, N, 2), 0);
    t.group = "ops", t.name = "o";
    CHECK_RC(softcxi_key_generate(s, &ops, SOFTCXI_FLAG_EXTERNAL, &t), 0);

    /* MBK B: blobs of A move, blobs of B are current */
    rotate_mbk(adm, "rw-b");
    t.group = "iot", t.name = NULL;
    CHECK_RC(softcxi_bulk_generate(s, c_blobs, SOFTCXI_FLAG_EXTERNAL, &t, np, 4, 1), 0);
    uint8_t tampered[400], *garbage = (uint8_t *)"K-not-a-blob";
    CHECK(a[7].len <= sizeof tampered);
    memcpy(tampered, a[7].data, a[7].len);
    tampered[a[7].len - 20] ^= 1; /* in the sealed key */

    /* 46 blobs: old ones, a tampered one in the middle, current ones, a
     * malformed one, an empty one, a key of a group iot-ops may not use */
    const uint8_t *blobs[64];
    size_t lens[64], n = 0;
    int status[64];
    for (int i = 0; i < N; i++) {
        if (i == 20) {
            blobs[n] = tampered, lens[n++] = a[7].len;
            blobs[n] = c_blobs[0].data, lens[n++] = c_blobs[0].len;
        }
        blobs[n] = a[i].data, lens[n++] = a[i].len;
    }
    blobs[n] = c_blobs[1].data, lens[n++] = c_blobs[1].len;
    blobs[n] = garbage, lens[n++] = strlen((const char *)garbage);
    blobs[n] = garbage, lens[n++] = 0;
    blobs[n] = ops.data, lens[n++] = ops.len;
    CHECK(n == 46);

    /* one thread, two, and more threads than the batch needs */
    check_many_as_one(s, blobs, lens, n, 1, status);
    CHECK(status[0] == 1 && status[20] == SOFTCXI_ETAMPER && status[21] == 0 &&
          status[42] == 0 && status[43] == SOFTCXI_EFORMAT && status[44] == SOFTCXI_EFORMAT &&
          status[45] == 1);
    check_many_as_one(s, blobs, lens, n, 2, status);
    CHECK(status[20] == SOFTCXI_ETAMPER && status[45] == 1);
    check_many_as_one(s, blobs, lens, n, 16, status);
    /* the session's message names the first blob that failed */
    softcxi_buf outs[64];
    CHECK_RC(softcxi_key_rewrap_many(s, outs, status, blobs, lens, n, 2), 0);
    CHECK_MSG("blob 21:");
    CHECK_MSG("fails authentication");
    for (size_t i = 0; i < n; i++)
        softcxi_buf_free(&outs[i]);

    /* a user of group iot only: the ops key is refused, the rest works */
    softcxi_session *iot = another(s);
    CHECK_RC(softcxi_logon_pass(iot, "iot-ops", "iot-password"), 0);
    check_many_as_one(iot, blobs, lens, n, 2, status);
    CHECK(status[0] == 1 && status[45] == SOFTCXI_EACCESS);
    /* nobody logged on: every blob says so, the call itself runs */
    softcxi_session *none = another(s);
    check_many_as_one(none, blobs, lens, n, 2, status);
    CHECK(status[0] == SOFTCXI_EAUTH && status[21] == SOFTCXI_EAUTH);

    /* Rewrap A's blobs to B, rotate to C, retire A: blobs of A give EMBK,
     * blobs of B move to C, in one batch. */
    for (int i = 0; i < N; i++)
        blobs[i] = a[i].data, lens[i] = a[i].len;
    CHECK_RC(softcxi_key_rewrap_many(s, b2, status, blobs, lens, N, 2), 0);
    for (int i = 0; i < N; i++)
        CHECK(status[i] == 1);
    rotate_mbk(adm, "rw-c");
    uint8_t kcv_a[8];
    softcxi_key_info ia;
    softcxi_error err;
    CHECK(softcxi_key_info_read(&ia, a[0].data, a[0].len, &err) == 0);
    memcpy(kcv_a, ia.kcv, 8);
    CHECK_RC(softcxi_mbk_retire(adm, kcv_a), 0);
    n = 0;
    for (int i = 0; i < N; i += 2) {
        blobs[n] = a[i].data, lens[n++] = a[i].len;
        blobs[n] = b2[i].data, lens[n++] = b2[i].len;
    }
    check_many_as_one(s, blobs, lens, n, 2, status);
    for (size_t i = 0; i < n; i++)
        CHECK(status[i] == (i % 2 ? 1 : SOFTCXI_EMBK));
    CHECK_RC(softcxi_key_rewrap_many(s, outs, status, blobs, lens, n, 2), 0);
    CHECK_MSG("blob 1:");
    CHECK_MSG("does not hold");
    for (size_t i = 0; i < n; i++)
        softcxi_buf_free(&outs[i]);

    /* nothing to do is fine */
    CHECK_RC(softcxi_key_rewrap_many(s, outs, status, blobs, lens, 0, 2), 0);

    for (int i = 0; i < N; i++) {
        softcxi_buf_free(&a[i]);
        softcxi_buf_free(&b2[i]);
    }
    for (int i = 0; i < 4; i++)
        softcxi_buf_free(&c_blobs[i]);
    softcxi_buf_free(&ops);
    softcxi_session_free(none);
    softcxi_session_free(iot);
    softcxi_session_free(adm);
    softcxi_session_free(s);
}

int main(void)
{
    const char *base = getenv("SOFTCXI_TEST_TMP");
    snprintf(tmproot, sizeof tmproot, "%s/test_device.%ld", base ? base : "/tmp", (long)getpid());
    char cmd[700];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", tmproot);
    if (system(cmd) != 0)
        return 2;

    test_logon_sign();
    test_users_db_v1();
    test_user_set();
    test_list_files_state();
    test_database_backup();
    test_export();
    test_rewrap_many();

    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmproot);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmproot);
    printf("%d checks passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
