/*
 * device.c - the emulated device: its state directory, the MBK sealed at
 * rest under a device key file kept outside that directory, and sessions.
 *
 * State directory:   <path>/device.mbk   blob type 0x10: the MBK, sealed
 *                                         under the device key
 * Device key file:   <keyfile>           'K' 01 11 00 | KCV(8) | key(32),
 *                                         owner-only (checked on every open)
 * A copy of the state directory alone reveals nothing.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define STATE_FILE "device.mbk"
#define KEYFILE_LEN (4 + SCX_KCV_LEN + 32)
#define STATE_MAX 4096

/* ---- small file helpers ------------------------------------------------ */

static int mkdirs(const char *path, mode_t mode)
{
    char tmp[PATH_MAX];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof tmp)
        return -1;
    memcpy(tmp, path, n + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, mode) != 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    }
    if (mkdir(tmp, mode) != 0 && errno != EEXIST)
        return -1;
    return 0;
}



/* Read a whole small file; returns bytes read or -1 (errno set). */
static ssize_t read_small(int fd, uint8_t *buf, size_t cap)
{
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            return (ssize_t)n;
        n += (size_t)r;
        if (n == cap) {
            errno = EFBIG;
            return -1;
        }
    }
}

static char *joinpath(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", a, b);
    return p;
}

static char *default_keyfile(const char *id)
{
    char dir[PATH_MAX];
    const char *c = getenv("SOFTCXI_CONFIG_DIR");
    const char *x = getenv("XDG_CONFIG_HOME");
    const char *h = getenv("HOME");
    if (c && *c)
        snprintf(dir, sizeof dir, "%s/devices", c);
    else if (x && *x)
        snprintf(dir, sizeof dir, "%s/softcxi/devices", x);
    else if (h && *h)
        snprintf(dir, sizeof dir, "%s/.config/softcxi/devices", h);
    else
        return NULL;
    char name[64];
    snprintf(name, sizeof name, "%s.key", id);
    return joinpath(dir, name);
}

/* Resolve path as far as it exists: realpath() of the longest existing
 * prefix, then the rest with "." and ".." applied by hand.  The key file and
 * its folders may not exist yet when we ask where they will be. */
static int resolve(char out[PATH_MAX], const char *path)
{
    char abs[PATH_MAX], cwd[PATH_MAX];
    int w;
    if (path[0] == '/')
        w = snprintf(abs, sizeof abs, "%s", path);
    else if (getcwd(cwd, sizeof cwd))
        w = snprintf(abs, sizeof abs, "%s/%s", cwd, path);
    else
        return -1;
    if (w < 0 || (size_t)w >= sizeof abs)
        return -1;
    /* Lexical normalisation first, so "dir/sub/../x" cannot hide. */
    char norm[PATH_MAX] = "";
    size_t n = 0;
    for (char *save = NULL, *c = strtok_r(abs, "/", &save); c; c = strtok_r(NULL, "/", &save)) {
        if (!strcmp(c, "."))
            continue;
        if (!strcmp(c, "..")) {
            char *slash = strrchr(norm, '/');
            n = slash ? (size_t)(slash - norm) : 0;
            norm[n] = '\0';
            continue;
        }
        w = snprintf(norm + n, sizeof norm - n, "/%s", c);
        if (w < 0 || (size_t)w >= sizeof norm - n)
            return -1;
        n += (size_t)w;
    }
    if (!n)
        snprintf(norm, sizeof norm, "/");
    /* Longest existing prefix through realpath(), the rest appended. */
    char head[PATH_MAX];
    snprintf(head, sizeof head, "%s", norm);
    for (;;) {
        char real[PATH_MAX];
        if (realpath(head, real)) {
            const char *rest = norm + strlen(head);
            w = snprintf(out, PATH_MAX, "%s%s", strcmp(real, "/") ? real : "", rest);
            return w < 0 || w >= PATH_MAX ? -1 : 0;
        }
        char *slash = strrchr(head, '/');
        if (!slash)
            return -1;
        if (slash == head) {
            head[1] = '\0';
        } else {
            *slash = '\0';
        }
    }
}

/* Is file (which may not exist yet) inside dir? */
static int inside(const char *file, const char *dir)
{
    char rd[PATH_MAX], rf[PATH_MAX];
    if (resolve(rd, dir) != 0 || resolve(rf, file) != 0)
        return 1; /* cannot tell: refuse rather than risk it */
    size_t n = strlen(rd);
    return strncmp(rf, rd, n) == 0 && (rf[n] == '\0' || rf[n] == '/');
}

/* ---- the device key file ----------------------------------------------- */

static int load_keyfile(uint8_t key[32], uint8_t kcv[SCX_KCV_LEN], const char *path,
                        softcxi_error *err)
{
    uint8_t buf[KEYFILE_LEN + 1];
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0 && errno == ELOOP)
        return scx_fail(err, SOFTCXI_EPERM,
                        "device key file %s is a symbolic link: give the real path", path);
    if (fd < 0)
        return scx_fail(err, errno == ENOENT ? SOFTCXI_ENOTFOUND : SOFTCXI_EIO,
                        "device key file %s: %s", path, strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return scx_fail(err, SOFTCXI_EPERM, "device key file %s is not a regular file", path);
    }
    if (st.st_uid != geteuid() || (st.st_mode & 077)) {
        close(fd);
        return scx_fail(err, SOFTCXI_EPERM,
                        "device key file %s must be owned by uid %u and not readable by group "
                        "or others (mode 0%03o, uid %u): chmod 600 it",
                        path, (unsigned)geteuid(), (unsigned)(st.st_mode & 0777),
                        (unsigned)st.st_uid);
    }
    ssize_t n = read_small(fd, buf, sizeof buf);
    close(fd);
    int rc = 0;
    if (n != KEYFILE_LEN || buf[0] != SCX_MAGIC || buf[1] != SCX_VERSION ||
        buf[2] != SCX_TYPE_DEVICE_KEY || buf[3] != 0) {
        rc = scx_fail(err, SOFTCXI_EFORMAT, "device key file %s is not a softcxi v1 key file",
                      path);
    } else {
        uint8_t check[SCX_KCV_LEN];
        memcpy(key, buf + 4 + SCX_KCV_LEN, 32);
        memcpy(kcv, buf + 4, SCX_KCV_LEN);
        if (scx_kcv(check, key) != 0 || CRYPTO_memcmp(check, kcv, SCX_KCV_LEN) != 0)
            rc = scx_fail(err, SOFTCXI_EFORMAT, "device key file %s is corrupt (check value)",
                          path);
    }
    OPENSSL_cleanse(buf, sizeof buf);
    if (rc)
        OPENSSL_cleanse(key, 32);
    return rc;
}

static int create_keyfile(const char *path, const uint8_t key[32], softcxi_error *err)
{
    uint8_t buf[KEYFILE_LEN];
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = '\0';
        if (mkdirs(dir, 0700) != 0)
            return scx_fail(err, SOFTCXI_EIO, "cannot create %s: %s", dir, strerror(errno));
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0 && errno == EEXIST)
        return scx_fail(err, SOFTCXI_EEXIST,
                        "device key file %s already exists: it may seal another device, so a "
                        "new device will not overwrite it",
                        path);
    if (fd < 0)
        return scx_fail(err, SOFTCXI_EIO, "device key file %s: %s", path, strerror(errno));
    buf[0] = SCX_MAGIC, buf[1] = SCX_VERSION, buf[2] = SCX_TYPE_DEVICE_KEY, buf[3] = 0;
    int rc = scx_kcv(buf + 4, key);
    memcpy(buf + 4 + SCX_KCV_LEN, key, 32);
    if (rc == 0 && (scx_write_all(fd, buf, sizeof buf) != 0 || fsync(fd) != 0))
        rc = scx_fail(err, SOFTCXI_EIO, "writing device key file %s: %s", path, strerror(errno));
    OPENSSL_cleanse(buf, sizeof buf);
    close(fd);
    if (rc == 0 && slash && slash != dir)
        (void)scx_fsync_dir(dir);
    if (rc)
        unlink(path);
    return rc;
}

/* ---- the sealed MBK ---------------------------------------------------- */


static int valid_id(const char *s, size_t n)
{
    if (n != 32)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

/* Read device.mbk; returns 0 with dev->id set and the frame in state. */
static int read_state(softcxi_device *dev, uint8_t *state, size_t *state_len, const char *file,
                      softcxi_error *err)
{
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? SOFTCXI_ENOTFOUND
                               : scx_fail(err, SOFTCXI_EIO, "%s: %s", file, strerror(errno));
    ssize_t n = read_small(fd, state, STATE_MAX);
    close(fd);
    if (n < 0)
        return scx_fail(err, SOFTCXI_EIO, "%s: %s", file, strerror(errno));
    scx_frame f;
    softcxi_key_info info;
    softcxi_error why;
    if (scx_frame_parse(&f, &info, state, (size_t)n, &why) != 0)
        return scx_fail(err, SOFTCXI_EFORMAT, "%s is corrupt: %s", file, why.msg);
    if (f.type != SCX_TYPE_DEVICE_MBK || f.ct_len == 0 || f.ct_len % 32 ||
        f.ct_len > 32 * (1 + SCX_MAX_OLD_MBKS) || !valid_id(info.name, info.name_len))
        return scx_fail(err, SOFTCXI_EFORMAT, "%s is not a softcxi device state file", file);
    memcpy(dev->id, info.name, 32);
    dev->id[32] = '\0';
    *state_len = (size_t)n;
    return 0;
}

/* Unseal device.mbk with the rest key in dev->sec (from the device key):
 * the current MBK, then the older ones still held. */
static int unseal_state(softcxi_device *dev, const uint8_t *state, size_t len,
                        softcxi_error *err)
{
    scx_frame f;
    softcxi_key_info info;
    int rc = scx_frame_parse(&f, &info, state, len, err);
    if (rc)
        return rc;
    if (CRYPTO_memcmp(f.kcv, dev->devkcv, SCX_KCV_LEN) != 0) {
        char want[17], have[17];
        scx_hex(want, f.kcv, SCX_KCV_LEN);
        scx_hex(have, dev->devkcv, SCX_KCV_LEN);
        return scx_fail(err, SOFTCXI_EMBK,
                        "device %s was sealed under device key %s, but key file %s holds %s",
                        dev->id, want, dev->keyfile, have);
    }
    scx_xaes x;
    uint8_t *payload = OPENSSL_secure_malloc(f.ct_len);
    if (!payload || scx_xaes_init(&x, dev->sec->rest_key) != 0) {
        OPENSSL_secure_free(payload);
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "device key setup failed");
    }
    rc = scx_xaes_open(&x, dev->gcm, payload, f.ct, f.ct_len, f.tag, f.salt, state, f.aad_len);
    scx_xaes_clear(&x);
    if (rc == SOFTCXI_ETAMPER)
        rc = scx_fail(err, SOFTCXI_ETAMPER, "device %s: %s/" STATE_FILE " fails authentication",
                      dev->id, dev->path);
    else if (rc)
        rc = scx_fail_ssl(err, rc, "device %s: unsealing the MBK failed", dev->id);
    else
        rc = scx_mbk_set(dev, payload, f.ct_len, err);
    OPENSSL_secure_clear_free(payload, f.ct_len);
    return rc;
}

int scx_state_reload(softcxi_device *dev, softcxi_error *err)
{
    uint8_t state[STATE_MAX];
    size_t state_len = 0;
    char *file = joinpath(dev->path, STATE_FILE);
    int rc = file ? read_state(dev, state, &state_len, file, err) : SOFTCXI_ENOMEM;
    if (rc == 0)
        rc = unseal_state(dev, state, state_len, err);
    free(file);
    return rc;
}

/* Write device.mbk afresh (current MBK, then the older ones), atomically. */
int scx_state_save(softcxi_device *dev, softcxi_error *err)
{
    uint8_t attrs[128], salt[SCX_SALT_LEN];
    size_t plen = 32 * (1 + (size_t)dev->nold);
    uint8_t *payload = OPENSSL_secure_malloc(plen);
    size_t total = 0;
    uint8_t *out = NULL;
    char *file = joinpath(dev->path, STATE_FILE), tmp[PATH_MAX];
    scx_xaes x;
    int rc, have_x = 0;
    if (!payload || !file) {
        rc = scx_fail(err, SOFTCXI_ENOMEM, "out of memory");
        goto done;
    }
    memcpy(payload, dev->sec->mbk, 32);
    for (int i = 0; i < dev->nold; i++)
        memcpy(payload + 32 * (size_t)(i + 1), dev->sec->old_mbk[i], 32);
    softcxi_template t = {0};
    t.algo = SOFTCXI_ALGO_AES;
    t.size = 256;
    t.usage = SOFTCXI_USAGE_WRAP | SOFTCXI_USAGE_UNWRAP;
    t.name = dev->id;
    t.group = "device";
    size_t alen = scx_attrs_encode(attrs, sizeof attrs, &t, (int64_t)time(NULL), NULL, 0);
    total = SCX_HDR_LEN + alen + plen + SCX_TAG_LEN;
    if (!alen || !(out = OPENSSL_malloc(total)) || RAND_bytes(salt, sizeof salt) != 1 ||
        scx_xaes_init(&x, dev->sec->rest_key) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "sealing the MBKs failed");
        goto done;
    }
    have_x = 1;
    if (scx_frame_seal(out, SCX_TYPE_DEVICE_MBK, dev->devkcv, salt, attrs, alen, payload, plen,
                       &x, dev->gcm) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "sealing the MBKs failed");
        goto done;
    }
    snprintf(tmp, sizeof tmp, "%s/.%s.%ld.tmp", dev->path, STATE_FILE, (long)getpid());
    rc = scx_write_file_atomic(file, tmp, out, total, err);
done:
    if (have_x)
        scx_xaes_clear(&x);
    if (payload)
        OPENSSL_secure_clear_free(payload, plen);
    OPENSSL_free(out);
    free(file);
    return rc;
}

static int create_state(softcxi_device *dev, const char *file, const softcxi_init_req *init,
                        softcxi_error *err)
{
    uint8_t devkey[32], idraw[16], salt[SCX_SALT_LEN], kcv[SCX_KCV_LEN];
    uint8_t attrs[128], out[SCX_HDR_LEN + 128 + 32 + SCX_TAG_LEN];
    char tmp[PATH_MAX];
    int rc = 0, fd = -1;
    scx_xaes x;
    int have_x = 0, wrote_key = 0;

    if (RAND_bytes(idraw, sizeof idraw) != 1 || RAND_priv_bytes(devkey, sizeof devkey) != 1 ||
        RAND_priv_bytes(dev->sec->mbk, 32) != 1 || RAND_bytes(salt, sizeof salt) != 1) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "random generator failed");
        goto done;
    }
    scx_hex(dev->id, idraw, sizeof idraw);
    if (!dev->keyfile && !(dev->keyfile = default_keyfile(dev->id))) {
        rc = scx_fail(err, SOFTCXI_EINVAL,
                      "no device key file given and neither SOFTCXI_CONFIG_DIR, "
                      "XDG_CONFIG_HOME nor HOME is set");
        goto done;
    }
    if (inside(dev->keyfile, dev->path)) {
        rc = scx_fail(err, SOFTCXI_EINVAL,
                      "device key file %s must live outside the state directory %s",
                      dev->keyfile, dev->path);
        goto done;
    }
    if ((rc = create_keyfile(dev->keyfile, devkey, err)) != 0)
        goto done;
    wrote_key = 1;
    /* The users come first: device.mbk appearing is the commit point. */
    if ((rc = scx_label_key(dev->sec->state_key, devkey, SCX_LABEL_USERS)) != 0 ||
        (rc = scx_label_key(dev->sec->audit_key, devkey, SCX_LABEL_AUDIT)) != 0 ||
        (rc = scx_users_create(dev, init->admin, init->password,
                               init->kdf_cost ? init->kdf_cost : SCX_KDF_COST, err)) != 0)
        goto done;

    softcxi_template t = {0};
    t.algo = SOFTCXI_ALGO_AES;
    t.size = 256;
    t.usage = SOFTCXI_USAGE_WRAP | SOFTCXI_USAGE_UNWRAP;
    t.name = dev->id;
    t.group = "device";
    size_t alen = scx_attrs_encode(attrs, sizeof attrs, &t, (int64_t)time(NULL), NULL, 0);
    if (!alen || scx_kcv(kcv, devkey) != 0 ||
        scx_label_key(dev->sec->rest_key, devkey, SCX_LABEL_DEVICE_MBK) != 0 ||
        scx_xaes_init(&x, dev->sec->rest_key) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "sealing the new MBK failed");
        goto done;
    }
    have_x = 1;
    if (scx_frame_seal(out, SCX_TYPE_DEVICE_MBK, kcv, salt, attrs, alen, dev->sec->mbk, 32, &x,
                       dev->gcm) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "sealing the new MBK failed");
        goto done;
    }
    size_t total = SCX_HDR_LEN + alen + 32 + SCX_TAG_LEN;
    snprintf(tmp, sizeof tmp, "%s/.%s.%ld.tmp", dev->path, STATE_FILE, (long)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || scx_write_all(fd, out, total) != 0 || fsync(fd) != 0) {
        rc = scx_fail(err, SOFTCXI_EIO, "writing %s: %s", tmp, strerror(errno));
        unlink(tmp);
        goto done;
    }
    /* link() fails if another process created the device first: then its
     * MBK wins and ours is thrown away. */
    if (link(tmp, file) != 0) {
        int e = errno;
        unlink(tmp);
        rc = e == EEXIST ? SOFTCXI_EEXIST
                         : scx_fail(err, SOFTCXI_EIO, "creating %s: %s", file, strerror(e));
        goto done;
    }
    unlink(tmp);
    (void)scx_fsync_dir(dev->path);
    wrote_key = 0; /* the device now depends on it */
done:
    if (fd >= 0)
        close(fd);
    if (have_x)
        scx_xaes_clear(&x);
    if (wrote_key)
        unlink(dev->keyfile);
    OPENSSL_cleanse(devkey, sizeof devkey);
    if (rc)
        OPENSSL_cleanse(dev->sec->mbk, 32);
    return rc;
}

/* ---- open / free ------------------------------------------------------- */

int scx_derive_working_keys(softcxi_device *dev, softcxi_error *err)
{
    scx_xaes_clear(&dev->xblob);
    if (scx_kcv(dev->kcv, dev->sec->mbk) != 0 ||
        scx_label_key(dev->sec->blob_key, dev->sec->mbk, SCX_LABEL_BLOB_KEY) != 0 ||
        scx_xaes_init(&dev->xblob, dev->sec->blob_key) != 0)
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "deriving the MBK's working keys failed");
    return 0;
}

int scx_write_file_atomic(const char *path, const char *tmp, const uint8_t *data, size_t len,
                          softcxi_error *err)
{
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || scx_write_all(fd, data, len) != 0 || fsync(fd) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        unlink(tmp);
        return scx_fail(err, SOFTCXI_EIO, "writing %s: %s", tmp, strerror(e));
    }
    close(fd);
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return scx_fail(err, SOFTCXI_EIO, "replacing %s: %s", path, strerror(e));
    }
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = '\0';
        (void)scx_fsync_dir(slash == dir ? "/" : dir);
    }
    return 0;
}

/* What every device has: the locked secrets page and the sealing contexts. */
static softcxi_device *device_alloc(void)
{
    softcxi_device *dev = OPENSSL_zalloc(sizeof *dev);
    if (!dev)
        return NULL;
    dev->refs = 1;
    dev->sec = scx_locked_alloc(sizeof *dev->sec);
    dev->gcm = EVP_CIPHER_CTX_new();
    dev->data_gcm = EVP_CIPHER_CTX_new();
    if (!dev->sec || !dev->gcm || !dev->data_gcm) {
        softcxi_device_free(dev);
        return NULL;
    }
    return dev;
}

/* Once the MBK is in place: its working keys and the opened-key cache. */
static int device_finish(softcxi_device *dev, long cache_entries, softcxi_error *err)
{
    int rc = scx_derive_working_keys(dev, err);
    if (rc)
        return rc;
    scx_cache_init(&dev->cache, cache_entries < 0 ? 1024 : (size_t)cache_entries);
    if (dev->cache.capacity == 0 && cache_entries != 0)
        return scx_fail(err, SOFTCXI_ENOMEM, "open: out of memory for the key cache");
    return 0;
}

/* What init and open start with: a device with its paths, and the path of
 * its device.mbk in *file (free it). */
static int device_prepare(softcxi_device **out, char **file, const char *op, const char *path,
                          const char *keyfile, softcxi_error *err)
{
    *out = NULL;
    *file = NULL;
    if (!path || !*path)
        return scx_fail(err, SOFTCXI_EINVAL, "%s: path (the device state directory) is required",
                        op);
    scx_secure_heap_init();
    softcxi_device *dev = device_alloc();
    if (!dev)
        return scx_fail(err, SOFTCXI_ENOMEM, "%s: out of memory", op);
    dev->path = strdup(path);
    dev->keyfile = keyfile ? strdup(keyfile) : NULL;
    *file = dev->path ? joinpath(dev->path, STATE_FILE) : NULL;
    if (!dev->path || !*file || (keyfile && !dev->keyfile)) {
        free(*file);
        *file = NULL;
        softcxi_device_free(dev);
        return scx_fail(err, SOFTCXI_ENOMEM, "%s: out of memory", op);
    }
    *out = dev;
    return 0;
}

int softcxi_device_init(const softcxi_init_req *req, softcxi_error *err)
{
    char *file = NULL;
    int rc, lock = -1;
    softcxi_device *dev;

    if ((rc = device_prepare(&dev, &file, "init", req ? req->path : NULL,
                             req ? req->keyfile : NULL, err)) != 0)
        return rc;
    if (mkdirs(dev->path, 0700) != 0) {
        rc = scx_fail(err, SOFTCXI_EIO, "init: cannot create %s: %s", dev->path, strerror(errno));
        goto done;
    }
    /* One init at a time per directory: a second one waits, then finds the
     * device and leaves its users.db alone. */
    char lockpath[PATH_MAX];
    snprintf(lockpath, sizeof lockpath, "%s/init.lock", dev->path);
    lock = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock < 0 || flock(lock, LOCK_EX) != 0) {
        rc = scx_fail(err, SOFTCXI_EIO, "init: cannot lock %s: %s", lockpath, strerror(errno));
        goto done;
    }
    if (access(file, F_OK) == 0) {
        rc = scx_fail(err, SOFTCXI_EEXIST, "init: a device lives in %s already", dev->path);
        goto done;
    }
    rc = create_state(dev, file, req, err);
    if (rc == SOFTCXI_EEXIST && access(file, F_OK) == 0)
        rc = scx_fail(err, SOFTCXI_EEXIST, "init: a device lives in %s already", dev->path);
    if (rc == 0)
        rc = scx_audit_append(dev->path, dev->sec->audit_key, "init", req->admin,
                              "device created; first administrator", err);
    if (rc == 0)
        scx_ok(err);
done:
    if (lock >= 0)
        close(lock);
    free(file);
    softcxi_device_free(dev);
    return rc;
}

int softcxi_device_open(softcxi_device **out, const softcxi_open_req *req, softcxi_error *err)
{
    uint8_t state[STATE_MAX], devkey[32], devkcv[SCX_KCV_LEN];
    size_t state_len = 0;
    char *file = NULL;
    int rc;
    softcxi_device *dev;

    *out = NULL;
    if ((rc = device_prepare(&dev, &file, "open", req ? req->path : NULL,
                             req ? req->keyfile : NULL, err)) != 0)
        return rc;
    rc = read_state(dev, state, &state_len, file, err);
    if (rc == SOFTCXI_ENOTFOUND)
        rc = scx_fail(err, SOFTCXI_ENOTFOUND,
                      "open: no device in %s (softcxi.init creates one)", dev->path);
    /* The counter is read before device.mbk is read again below: a change
     * made in between is then seen at the first call. */
    if (rc == 0)
        rc = scx_gen_open(dev, err);
    if (rc == 0)
        rc = read_state(dev, state, &state_len, file, err);
    if (rc)
        goto fail;

    if (state_len) {
        if (!dev->keyfile && !(dev->keyfile = default_keyfile(dev->id))) {
            rc = scx_fail(err, SOFTCXI_EINVAL, "open: no device key file given and no HOME");
            goto fail;
        }
        rc = load_keyfile(devkey, devkcv, dev->keyfile, err);
        if (rc == 0) {
            memcpy(dev->devkcv, devkcv, SCX_KCV_LEN);
            if (scx_label_key(dev->sec->rest_key, devkey, SCX_LABEL_DEVICE_MBK) != 0 ||
                scx_label_key(dev->sec->state_key, devkey, SCX_LABEL_USERS) != 0 ||
                scx_label_key(dev->sec->audit_key, devkey, SCX_LABEL_AUDIT) != 0 ||
                scx_label_key(dev->sec->storage_key, devkey, SCX_LABEL_STORAGE) != 0)
                rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "deriving the device's keys failed");
        }
        OPENSSL_cleanse(devkey, sizeof devkey);
        if (rc == 0)
            rc = unseal_state(dev, state, state_len, err);
        if (rc)
            goto fail;
    }
    if ((rc = device_finish(dev, req->cache_entries, err)) != 0 ||
        (rc = scx_revoked_reload(dev, err)) != 0)
        goto fail;
    dev->keydb_limit = req->keydb_limit;
    free(file);
    scx_ok(err);
    *out = dev;
    return 0;
fail:
    free(file);
    softcxi_device_free(dev);
    return rc;
}

int scx_device_new_mem(softcxi_device **out, const uint8_t mbk[32], long cache_entries,
                       softcxi_error *err)
{
    int rc;
    *out = NULL;
    scx_secure_heap_init();
    softcxi_device *dev = device_alloc();
    if (!dev)
        return scx_fail(err, SOFTCXI_ENOMEM, "out of memory");
    memcpy(dev->sec->mbk, mbk, 32);
    dev->open_access = 1;
    if ((rc = device_finish(dev, cache_entries, err)) != 0) {
        softcxi_device_free(dev);
        return rc;
    }
    *out = dev;
    return 0;
}

static void device_destroy(softcxi_device *dev)
{
    scx_cache_clear(&dev->cache);
    scx_xaes_clear(&dev->xblob);
    for (int i = 0; i < dev->nold; i++)
        scx_xaes_clear(&dev->old[i].x);
    scx_gen_close(dev);
    scx_keydb_free(dev->keydb);
    OPENSSL_free(dev->revoked);
    EVP_CIPHER_CTX_free(dev->gcm);
    EVP_CIPHER_CTX_free(dev->data_gcm);
    for (size_t i = 0; i < 3; i++)
        EVP_CIPHER_free(dev->aes_gcm[i]);
    EVP_MAC_free(dev->hmac);
    for (size_t i = 0; i < SCX_MD_COUNT; i++)
        EVP_MD_free(dev->md[i]);
    for (size_t i = 0; i < 5; i++)
        EVP_PKEY_CTX_free(dev->gen_ec[i]);
    EVP_PKEY_CTX_free(dev->gen_ed25519);
    EVP_PKEY_CTX_free(dev->gen_x25519);
    for (size_t i = 0; i < 4; i++)
        EVP_PKEY_CTX_free(dev->from[i]);
    OPENSSL_cleanse(&dev->pool, sizeof dev->pool);
    scx_locked_free(dev->sec, sizeof *dev->sec);
    free(dev->path);
    free(dev->keyfile);
    OPENSSL_clear_free(dev, sizeof *dev);
}

void softcxi_device_free(softcxi_device *dev)
{
    if (dev && --dev->refs == 0)
        device_destroy(dev);
}

void softcxi_device_kcv(const softcxi_device *dev, uint8_t kcv[8])
{
    memcpy(kcv, dev->kcv, SCX_KCV_LEN);
}

const char *softcxi_device_id(const softcxi_device *dev) { return dev->id; }
const char *softcxi_device_keyfile(const softcxi_device *dev) { return dev->keyfile; }

softcxi_session *softcxi_session_new(softcxi_device *dev)
{
    if (!dev)
        return NULL;
    softcxi_session *s = OPENSSL_zalloc(sizeof *s);
    if (!s)
        return NULL;
    s->dev = dev;
    dev->refs++;
    return s;
}

void softcxi_session_free(softcxi_session *s)
{
    if (!s)
        return;
    softcxi_device_free(s->dev);
    OPENSSL_clear_free(s, sizeof *s); /* logons, a pending challenge */
}

const softcxi_error *softcxi_session_error(const softcxi_session *s) { return &s->err; }
softcxi_device *softcxi_session_device(const softcxi_session *s) { return s->dev; }

void softcxi_cache_stats_get(const softcxi_session *s, softcxi_cache_stats *st)
{
    const scx_cache *c = &s->dev->cache;
    st->hits = c->hits;
    st->misses = c->misses;
    st->evictions = c->evictions;
    st->entries = c->entries;
    st->capacity = c->capacity;
}

const EVP_MD *scx_md(softcxi_device *dev, int which)
{
    static const char *const names[SCX_MD_COUNT] = {
        "SHA1", "SHA224", "SHA256", "SHA384", "SHA512", "SHA3-256", "SHA3-384", "SHA3-512"};
    if (which < 0 || which >= SCX_MD_COUNT)
        return NULL;
    /* Fetched on first use; threads sharing the device may race here, so the
     * slot is published with a compare-and-swap and a loser frees its copy. */
    EVP_MD *md = __atomic_load_n(&dev->md[which], __ATOMIC_ACQUIRE);
    if (md)
        return md;
    EVP_MD *fetched = EVP_MD_fetch(NULL, names[which], NULL);
    if (!fetched)
        return NULL;
    if (__atomic_compare_exchange_n(&dev->md[which], &md, fetched, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE))
        return fetched;
    EVP_MD_free(fetched);
    return md;
}

/* ---- ListFiles ------------------------------------------------------------ */

typedef struct file_entry {
    char *name;
    uint64_t size;
    int64_t mtime;
} file_entry;

static int by_name(const void *a, const void *b)
{
    return strcmp(((const file_entry *)a)->name, ((const file_entry *)b)->name);
}

int softcxi_list_files(softcxi_session *s, softcxi_file_cb cb, void *ctx)
{
    softcxi_device *dev = s->dev;
    file_entry *v = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;

    if (!dev->path)
        return scx_fail(&s->err, SOFTCXI_EINVAL, "list_files: this device keeps no files");
    if (s->nlogons == 0)
        return scx_fail(&s->err, SOFTCXI_EAUTH, "list_files: log on first");
    DIR *d = opendir(dev->path);
    if (!d)
        return scx_fail(&s->err, SOFTCXI_EIO, "list_files: %s: %s", dev->path, strerror(errno));
    int dfd = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        struct stat st;
        /* Regular files only; a vanished temporary file is no error. */
        if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
            continue;
        if (n == cap) {
            size_t ncap = cap ? 2 * cap : 32;
            file_entry *nv = realloc(v, ncap * sizeof *nv);
            if (!nv) {
                rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "list_files: out of memory");
                break;
            }
            v = nv, cap = ncap;
        }
        if (!(v[n].name = strdup(e->d_name))) {
            rc = scx_fail(&s->err, SOFTCXI_ENOMEM, "list_files: out of memory");
            break;
        }
        v[n].size = (uint64_t)st.st_size;
        v[n].mtime = (int64_t)st.st_mtime;
        n++;
    }
    closedir(d);
    if (rc == 0) {
        if (n)
            qsort(v, n, sizeof *v, by_name);
        for (size_t i = 0; i < n; i++)
            if (cb(ctx, v[i].name, v[i].size, v[i].mtime) != 0)
                break;
        scx_ok(&s->err);
    }
    for (size_t i = 0; i < n; i++)
        free(v[i].name);
    free(v);
    return rc;
}
