/*
 * keydb.c - the internal key database, softcxi's CXIKEY.db: the keys made
 * without FLAG_EXTERNAL, kept on the device and addressed by
 * (group, name, specifier).
 *
 * The database stores each key as the v1 key blob the device already sealed
 * under the MBK, plus its address.  It never sees a plaintext key and never
 * parses a blob.  Everything lives in one file, <dir>/keys.db, sealed at rest
 * under a 32-byte storage key the device passes in (derived with the label
 * "softcxi/v1/storage"), so that names, groups and the set of keys do not
 * show on disk either, and any change to the file is detected.
 *
 * The whole database is held in memory (8 MiB is small) as an array of
 * entries sorted by address: look-ups are a binary search.  Every change
 * rewrites the whole file: temp file, fsync, rename, fsync of the directory.
 * A reader therefore sees the old file or the new one, never half of one.
 * Changes run under an exclusive flock() of <dir>/keys.lock and re-read the
 * file first when another process has changed it, so concurrent writers in
 * several processes lose no key.  The lock file is opened afresh for each
 * change: a lock inherited across fork() would be shared, not exclusive.
 *
 * ---- keys.db (all integers big-endian) ----------------------------------
 *
 *   offset  size  field
 *   0       1     magic      0x4B ('K')
 *   1       1     version    0x01
 *   2       1     type       0x30 (internal key database)
 *   3       1     flags      0x00
 *   4       8     KCV        key check value of the storage key (scx_kcv)
 *   12      24    salt       random per write; the XAES-256-GCM nonce
 *   36      8     generation bumped by one on every write; at 2^64-1 every
 *                   write is refused (EFULL) rather than wrap to 0
 *   44      4     P          length of the sealed payload
 *   48      P     ciphertext XAES-256-GCM(storage key, salt, aad = [0, 48))
 *   48+P    16    tag
 *
 * The first 36 bytes are the v1 blob header (docs/blob-format.md), so a
 * reader can tell what the file is; after them it differs, because the blob
 * frame's 16-bit lengths cannot hold a multi-megabyte payload.  The file is
 * exactly 64 + P bytes.  The generation sits in the authenticated header so
 * that a copy put back over a newer file (a rollback) is noticed by every
 * process that saw the newer one, and so that, with the salt that is fresh
 * on every write and the file's inode and times, a process sees whether the
 * file changed with an fstat() and a 48-byte read.
 *
 * Payload, once opened:
 *
 *   count(4)  entry * count
 *   entry  =  flags(1)  glen(1)  nlen(1)  specifier(4)  blob_len(4)
 *             group(glen)  name(nlen)  blob(blob_len)
 *
 * flags bit 0: the address has a specifier (else specifier is 0); other bits
 * must be 0.  Group and name are UTF-8 without NUL (name not empty, group
 * may be).  Entries appear in strictly ascending address order: group bytes,
 * then name bytes (memcmp, a prefix first), then no specifier before any
 * specifier, then specifier as a number.  Anything else is EFORMAT.
 *
 * ---- the limit -----------------------------------------------------------
 *
 * used = sum over entries of (blob_len + SCX_KEYDB_ENTRY_OVERHEAD), with a
 * fixed overhead of 16 bytes per entry (the 11 bytes of entry header,
 * rounded up).  The address itself is not counted: it is a copy of the
 * group, name and specifier attributes inside the blob.  With the default
 * limit of 8 MiB that is 38,836 EC P-256 keys of 200-byte blobs.  An insert
 * that would take used past the limit fails with EFULL before the file is
 * touched.
 *
 * ---- errors ----------------------------------------------------------------
 *
 * A corrupt, truncated or foreign file gives EFORMAT, a wrong storage key or
 * a failed tag ETAMPER, each naming the file; the file is left as it is and
 * no change is written while it stays that way (restoring an image with
 * scx_keydb_import is the way out).
 *
 * A handle is not thread-safe (like a session): one per thread, or a lock.
 */
#define _GNU_SOURCE
#include "internal.h"

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
#include <unistd.h>

/* ---- to go into internal.h ----------------------------------------------
 * Copy this block verbatim into internal.h (section "internal key
 * database"); the guard then keeps this copy out.
 */
/* The API is declared in internal.h. */
/* ---- end of the block for internal.h ----------------------------------- */

#define DB_FILE "keys.db"
#define DB_LOCK "keys.lock"
#define DB_HDR 48                      /* magic .. P: the associated data */
#define DB_MIN (DB_HDR + SCX_TAG_LEN) /* an image with no payload at all */
#define ENTRY_HDR 11
#define FLAG_HAS_SPEC 0x01u
#define DB_ADDR_MAX 200 /* a formatted address in messages */

/* One key: one allocation holding group NUL name NUL blob. */
typedef struct entry {
    uint32_t spec;
    uint32_t blob_len;
    uint8_t has_spec, glen, nlen;
    char data[];
} entry;

static const char *e_group(const entry *e) { return e->data; }
static const char *e_name(const entry *e) { return e->data + e->glen + 1; }
static const uint8_t *e_blob(const entry *e)
{
    return (const uint8_t *)(e->data + e->glen + e->nlen + 2);
}
static size_t e_cost(const entry *e) { return (size_t)e->blob_len + SCX_KEYDB_ENTRY_OVERHEAD; }

/* Which file (inode, size, times) the entries came from. */
typedef struct file_sig {
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime, ctime;
} file_sig;

/* What the entries of one version of the file are. */
typedef struct state {
    entry **v;
    size_t n, cap, used;
    uint64_t generation;
    uint8_t salt[SCX_SALT_LEN]; /* of the file v came from */
    file_sig sig;               /* of that file; all zero: unknown */
    int have_file;              /* 0: no keys.db seen yet */
} state;

struct scx_keydb {
    char *dir, *file, *lock;
    size_t limit;
    state st;
    uint8_t kcv[SCX_KCV_LEN];
    scx_xaes x;
    EVP_CIPHER_CTX *gcm;
};

/* An address as the caller gives it. */
typedef struct addr {
    const char *g, *n;
    size_t glen, nlen;
    uint32_t spec;
    int has_spec;
} addr;

/* ---- small helpers ---------------------------------------------------- */

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static char *joinpath(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", a, b);
    return p;
}



static int read_all(int fd, uint8_t *p, size_t n)
{
    size_t off = 0;
    while (off < n) {
        ssize_t r = pread(fd, p + off, n - off, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0) {
            errno = EIO; /* shrank under us: cannot happen with rename */
            return -1;
        }
        off += (size_t)r;
    }
    return 0;
}

/* "'group/name[/specifier]'", shortened for messages. */
static const char *addr_ref(char *buf, size_t cap, const char *g, size_t glen, const char *n,
                            size_t nlen, int has_spec, uint32_t spec)
{
    int gl = (int)(glen > 64 ? 64 : glen), nl = (int)(nlen > 96 ? 96 : nlen);
    if (has_spec)
        snprintf(buf, cap, "'%.*s/%.*s/%u'", gl, g, nl, n, (unsigned)spec);
    else
        snprintf(buf, cap, "'%.*s/%.*s'", gl, g, nl, n);
    return buf;
}
#define AREF(a)                                                                        \
    addr_ref((char[DB_ADDR_MAX]){0}, DB_ADDR_MAX, (a)->g, (a)->glen, (a)->n, (a)->nlen, \
             (a)->has_spec, (a)->spec)

static int make_addr(addr *a, const char *group, const char *name, uint32_t spec,
                     int has_spec, softcxi_error *err)
{
    a->g = group ? group : "";
    a->n = name ? name : "";
    a->glen = strlen(a->g);
    a->nlen = strlen(a->n);
    a->has_spec = has_spec != 0;
    a->spec = has_spec ? spec : 0;
    if (a->nlen == 0)
        return scx_fail(err, SOFTCXI_EINVAL, "internal key database: a key needs a name");
    if (a->glen > SOFTCXI_NAME_MAX || a->nlen > SOFTCXI_NAME_MAX)
        return scx_fail(err, SOFTCXI_EINVAL,
                        "internal key database: group and name are at most %d bytes",
                        SOFTCXI_NAME_MAX);
    return 0;
}

static int bytes_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c)
        return c;
    return alen < blen ? -1 : alen > blen;
}

static int addr_cmp(const addr *a, const entry *e)
{
    int c = bytes_cmp(a->g, a->glen, e_group(e), e->glen);
    if (!c)
        c = bytes_cmp(a->n, a->nlen, e_name(e), e->nlen);
    if (!c)
        c = a->has_spec - (int)e->has_spec;
    if (!c)
        c = a->spec < e->spec ? -1 : a->spec > e->spec;
    return c;
}

static entry *entry_new(const addr *a, const uint8_t *blob, size_t blob_len)
{
    entry *e = malloc(sizeof *e + a->glen + a->nlen + 2 + blob_len);
    if (!e)
        return NULL;
    e->spec = a->spec;
    e->has_spec = (uint8_t)a->has_spec;
    e->glen = (uint8_t)a->glen;
    e->nlen = (uint8_t)a->nlen;
    e->blob_len = (uint32_t)blob_len;
    memcpy(e->data, a->g, a->glen);
    e->data[a->glen] = '\0';
    memcpy(e->data + a->glen + 1, a->n, a->nlen);
    e->data[a->glen + 1 + a->nlen] = '\0';
    memcpy(e->data + a->glen + a->nlen + 2, blob, blob_len);
    return e;
}

/* 1 and *pos = its index when present, else 0 and *pos = where it goes. */
static int find(const state *s, const addr *a, size_t *pos)
{
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = addr_cmp(a, s->v[mid]);
        if (c == 0) {
            *pos = mid;
            return 1;
        }
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    *pos = lo;
    return 0;
}

static void state_free(state *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i]);
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int state_reserve(state *s, size_t want)
{
    if (want <= s->cap)
        return 0;
    size_t cap = s->cap ? s->cap : 64;
    while (cap < want)
        cap *= 2;
    entry **v = realloc(s->v, cap * sizeof *v);
    if (!v)
        return -1;
    s->v = v;
    s->cap = cap;
    return 0;
}

/* ---- the sealed image ------------------------------------------------- */

/* One change to apply on top of a state while writing it out. */
enum { ED_NONE, ED_INSERT, ED_REPLACE, ED_DELETE };
typedef struct edit {
    int op;
    size_t pos;
    entry *e;
} edit;

static size_t entry_size(const entry *e)
{
    return ENTRY_HDR + (size_t)e->glen + e->nlen + e->blob_len;
}

static uint8_t *emit(uint8_t *p, const entry *e)
{
    p[0] = e->has_spec ? FLAG_HAS_SPEC : 0;
    p[1] = e->glen;
    p[2] = e->nlen;
    put32(p + 3, e->spec);
    put32(p + 7, e->blob_len);
    p += ENTRY_HDR;
    memcpy(p, e_group(e), e->glen);
    p += e->glen;
    memcpy(p, e_name(e), e->nlen);
    p += e->nlen;
    memcpy(p, e_blob(e), e->blob_len);
    return p + e->blob_len;
}

/* Seal s (with ed applied) as a complete file image of generation gen. */
static int build_image(scx_keydb *db, const state *s, const edit *ed, uint64_t gen,
                       uint8_t **out, size_t *out_len, uint8_t salt[SCX_SALT_LEN],
                       softcxi_error *err)
{
    size_t plen = 4, count = s->n;
    for (size_t i = 0; i < s->n; i++)
        plen += entry_size(s->v[i]);
    if (ed->op == ED_INSERT)
        plen += entry_size(ed->e), count++;
    else if (ed->op == ED_REPLACE)
        plen += entry_size(ed->e) - entry_size(s->v[ed->pos]);
    else if (ed->op == ED_DELETE)
        plen -= entry_size(s->v[ed->pos]), count--;
    if (plen > INT32_MAX)
        return scx_fail(err, SOFTCXI_EFULL, "internal key database: %zu bytes is too large",
                        plen);

    uint8_t *pt = malloc(plen), *img = OPENSSL_malloc(DB_MIN + plen);
    if (!pt || !img) {
        free(pt);
        OPENSSL_free(img);
        return scx_fail(err, SOFTCXI_ENOMEM, "internal key database: out of memory");
    }
    uint8_t *p = pt;
    put32(p, (uint32_t)count);
    p += 4;
    for (size_t i = 0; i <= s->n; i++) {
        if (ed->op == ED_INSERT && ed->pos == i)
            p = emit(p, ed->e);
        if (i == s->n)
            break;
        if (ed->op == ED_DELETE && ed->pos == i)
            continue;
        p = emit(p, ed->op == ED_REPLACE && ed->pos == i ? ed->e : s->v[i]);
    }

    int rc = 0;
    img[0] = SCX_MAGIC, img[1] = SCX_VERSION, img[2] = SCX_TYPE_KEYDB, img[3] = 0;
    memcpy(img + 4, db->kcv, SCX_KCV_LEN);
    if (RAND_bytes(salt, SCX_SALT_LEN) != 1) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "internal key database: random generator failed");
    } else {
        memcpy(img + 12, salt, SCX_SALT_LEN);
        put64(img + 36, gen);
        put32(img + 44, (uint32_t)plen);
        if (scx_xaes_seal(&db->x, db->gcm, img + DB_HDR, img + DB_HDR + plen, salt, img, DB_HDR,
                          pt, plen) != 0)
            rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "internal key database: sealing failed");
    }
    /* Blobs are sealed already, but names and groups are why the file is. */
    OPENSSL_cleanse(pt, plen);
    free(pt);
    if (rc) {
        OPENSSL_free(img);
        return rc;
    }
    *out = img;
    *out_len = DB_MIN + plen;
    return 0;
}

static int decode_payload(const uint8_t *pt, size_t plen, const char *what, state *s,
                          softcxi_error *err);

/* Check and open an image; on success *s holds its entries.  what names it
 * in messages (the file's path, or "database image"). */
static int decode_image(scx_keydb *db, const uint8_t *img, size_t len, const char *what,
                        state *s, softcxi_error *err)
{
    memset(s, 0, sizeof *s);
    if (len < DB_MIN || img[0] != SCX_MAGIC)
        return scx_fail(err, SOFTCXI_EFORMAT,
                        len < DB_MIN && len && img[0] == SCX_MAGIC
                            ? "%s is truncated: %zu bytes, not a softcxi key database"
                            : "%s is not a softcxi key database (%zu bytes)",
                        what, len);
    if (img[1] != SCX_VERSION || img[2] != SCX_TYPE_KEYDB || img[3] != 0)
        return scx_fail(err, SOFTCXI_EFORMAT,
                        "%s is not a softcxi v1 key database (version %u, type 0x%02x)", what,
                        img[1], img[2]);
    size_t plen = get32(img + 44);
    if (len != DB_MIN + plen)
        return scx_fail(err, SOFTCXI_EFORMAT,
                        len < DB_MIN + plen ? "%s is truncated: %zu of %zu bytes"
                                            : "%s has trailing bytes: %zu, expected %zu",
                        what, len, DB_MIN + plen);
    if (CRYPTO_memcmp(img + 4, db->kcv, SCX_KCV_LEN) != 0) {
        char want[2 * SCX_KCV_LEN + 1], have[2 * SCX_KCV_LEN + 1];
        scx_hex(have, img + 4, SCX_KCV_LEN);
        scx_hex(want, db->kcv, SCX_KCV_LEN);
        return scx_fail(err, SOFTCXI_ETAMPER,
                        "%s was sealed under storage key %s, this device's is %s", what, have,
                        want);
    }
    uint8_t *pt = malloc(plen ? plen : 1);
    if (!pt)
        return scx_fail(err, SOFTCXI_ENOMEM, "%s: out of memory", what);
    int rc = scx_xaes_open(&db->x, db->gcm, pt, img + DB_HDR, plen, img + DB_HDR + plen,
                           img + 12, img, DB_HDR);
    if (rc == SOFTCXI_ETAMPER) {
        free(pt);
        return scx_fail(err, SOFTCXI_ETAMPER, "%s fails authentication (changed or damaged)",
                        what);
    }
    if (rc) {
        free(pt);
        return scx_fail_ssl(err, rc, "%s: opening failed", what);
    }

    /* Authentic from here on: a shape error is a bug or a newer writer. */
    rc = decode_payload(pt, plen, what, s, err);
    if (rc == 0) {
        s->generation = get64(img + 36);
        memcpy(s->salt, img + 12, SCX_SALT_LEN);
        s->have_file = 1;
    }
    OPENSSL_cleanse(pt, plen);
    free(pt);
    return rc;
}

/* The entries of a payload (count, entries in address order) into s. */
static int decode_payload(const uint8_t *pt, size_t plen, const char *what, state *s,
                          softcxi_error *err)
{
    int rc = 0;
    memset(s, 0, sizeof *s);
    size_t off = 4, count = plen >= 4 ? get32(pt) : 0;
    if (plen < 4 || count > (plen - 4) / ENTRY_HDR) {
        rc = scx_fail(err, SOFTCXI_EFORMAT, "%s: bad entry count", what);
        goto done;
    }
    if (state_reserve(s, count) != 0) {
        rc = scx_fail(err, SOFTCXI_ENOMEM, "%s: out of memory", what);
        goto done;
    }
    for (size_t i = 0; i < count; i++) {
        if (plen - off < ENTRY_HDR) {
            rc = scx_fail(err, SOFTCXI_EFORMAT, "%s: entry %zu is cut off", what, i);
            goto done;
        }
        const uint8_t *h = pt + off;
        addr a = {0};
        size_t blen = get32(h + 7);
        a.glen = h[1], a.nlen = h[2], a.spec = get32(h + 3);
        a.has_spec = (h[0] & FLAG_HAS_SPEC) != 0;
        off += ENTRY_HDR;
        if ((h[0] & ~FLAG_HAS_SPEC) || (!a.has_spec && a.spec) || a.nlen == 0 || blen == 0 ||
            a.glen + a.nlen > plen - off || blen > plen - off - a.glen - a.nlen) {
            rc = scx_fail(err, SOFTCXI_EFORMAT, "%s: entry %zu is malformed", what, i);
            goto done;
        }
        a.g = (const char *)pt + off;
        a.n = a.g + a.glen;
        if (memchr(a.g, 0, a.glen + a.nlen)) {
            rc = scx_fail(err, SOFTCXI_EFORMAT, "%s: entry %zu has a NUL in its address", what,
                          i);
            goto done;
        }
        if (i > 0 && addr_cmp(&a, s->v[i - 1]) <= 0) {
            rc = scx_fail(err, SOFTCXI_EFORMAT,
                          "%s: entry %zu %s is out of address order or repeated", what, i,
                          AREF(&a));
            goto done;
        }
        if (!(s->v[i] = entry_new(&a, pt + off + a.glen + a.nlen, blen))) {
            rc = scx_fail(err, SOFTCXI_ENOMEM, "%s: out of memory", what);
            goto done;
        }
        s->n++;
        s->used += e_cost(s->v[i]);
        off += a.glen + a.nlen + blen;
    }
    if (off != plen)
        rc = scx_fail(err, SOFTCXI_EFORMAT, "%s: %zu bytes after the last entry", what,
                      plen - off);
done:
    if (rc)
        state_free(s);
    return rc;
}

/* ---- the file ------------------------------------------------------------ */

static void sig_of(file_sig *g, const struct stat *st)
{
    memset(g, 0, sizeof *g);
    g->dev = st->st_dev;
    g->ino = st->st_ino;
    g->size = st->st_size;
    g->mtime = st->st_mtim;
    g->ctime = st->st_ctim;
}

static int sig_same(const file_sig *a, const file_sig *b)
{
    return a->ino != 0 && a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
           a->mtime.tv_sec == b->mtime.tv_sec && a->mtime.tv_nsec == b->mtime.tv_nsec &&
           a->ctime.tv_sec == b->ctime.tv_sec && a->ctime.tv_nsec == b->ctime.tv_nsec;
}

static int lock_db(const scx_keydb *db, softcxi_error *err)
{
    int fd = open(db->lock, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return scx_fail(err, SOFTCXI_EIO, "internal key database: %s: %s", db->lock,
                        strerror(errno));
    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR) {
            int e = errno;
            close(fd);
            return scx_fail(err, SOFTCXI_EIO, "internal key database: locking %s: %s", db->lock,
                            strerror(e));
        }
    }
    return fd;
}

static void unlock_db(int fd) { close(fd); /* drops the flock */ }

static int write_atomic(const scx_keydb *db, const uint8_t *img, size_t len, softcxi_error *err)
{
    char tmp[PATH_MAX];
    int w = snprintf(tmp, sizeof tmp, "%s/." DB_FILE ".%ld.tmp", db->dir, (long)getpid());
    if (w < 0 || (size_t)w >= sizeof tmp)
        return scx_fail(err, SOFTCXI_EINVAL, "internal key database: path too long");
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return scx_fail(err, SOFTCXI_EIO, "internal key database: %s: %s", tmp, strerror(errno));
    if (scx_write_all(fd, img, len) != 0 || fsync(fd) != 0) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return scx_fail(err, SOFTCXI_EIO, "internal key database: writing %s: %s", tmp,
                        strerror(e));
    }
    if (close(fd) != 0 || rename(tmp, db->file) != 0) {
        int e = errno;
        unlink(tmp);
        return scx_fail(err, SOFTCXI_EIO, "internal key database: replacing %s: %s", db->file,
                        strerror(e));
    }
    (void)scx_fsync_dir(db->dir);
    return 0;
}

/* Write s with ed applied as generation after + 1: the caller's `after` is
 * the highest generation any process may have seen.  At 2^64-1 the counter
 * cannot move forward, and a wrap to 0 would make every older copy look newer
 * (the rollback check in adopt() compares generations): EFULL, nothing
 * written.  On success s->generation and s->salt describe the new file. */
static int write_db(scx_keydb *db, state *s, const edit *ed, uint64_t after,
                    softcxi_error *err)
{
    uint8_t *img = NULL, salt[SCX_SALT_LEN];
    size_t len = 0;
    if (after == UINT64_MAX)
        return scx_fail(err, SOFTCXI_EFULL,
                        "%s is at generation 2^64-1, the last one: nothing was written (the "
                        "counter must not wrap to 0, where an older copy would look newer)",
                        db->file);
    uint64_t gen = after + 1;
    int rc = build_image(db, s, ed, gen, &img, &len, salt, err);
    if (rc)
        return rc;
    rc = write_atomic(db, img, len, err);
    OPENSSL_free(img);
    if (rc)
        return rc;
    s->generation = gen;
    memcpy(s->salt, salt, SCX_SALT_LEN);
    s->have_file = 1;
    /* Under the lock nobody else replaces it; rename changed its ctime. */
    struct stat st;
    if (stat(db->file, &st) == 0)
        sig_of(&s->sig, &st);
    else
        memset(&s->sig, 0, sizeof s->sig);
    return 0;
}

/* Take ns as the database's state unless it is older than what this handle
 * has seen (a copy put back over a newer file). */
static int adopt(scx_keydb *db, state *ns, softcxi_error *err)
{
    if (db->st.have_file && ns->generation < db->st.generation) {
        uint64_t had = db->st.generation, got = ns->generation;
        state_free(ns);
        return scx_fail(err, SOFTCXI_ETAMPER,
                        "%s went back from generation %llu to %llu: an older copy was put "
                        "back (use restore_database to restore a backup)",
                        db->file, (unsigned long long)had, (unsigned long long)got);
    }
    state_free(&db->st);
    db->st = *ns;
    return 0;
}

/* Read the open keys.db in full; st is its fstat(). */
static int read_file(const scx_keydb *db, int fd, const struct stat *st, uint8_t **img,
                     size_t *len, softcxi_error *err)
{
    *img = NULL;
    *len = 0;
    if (!S_ISREG(st->st_mode))
        return scx_fail(err, SOFTCXI_EFORMAT, "%s is not a regular file", db->file);
    if ((uint64_t)st->st_size > (uint64_t)DB_MIN + UINT32_MAX)
        return scx_fail(err, SOFTCXI_EFORMAT, "%s is too large for a key database (%lld bytes)",
                        db->file, (long long)st->st_size);
    size_t n = (size_t)st->st_size;
    uint8_t *buf = OPENSSL_malloc(n ? n : 1);
    if (!buf)
        return scx_fail(err, SOFTCXI_ENOMEM, "%s: out of memory", db->file);
    if (read_all(fd, buf, n) != 0) {
        int e = errno;
        OPENSSL_free(buf);
        return scx_fail(err, SOFTCXI_EIO, "%s: %s", db->file, strerror(e));
    }
    *img = buf;
    *len = n;
    return 0;
}

static int gone(const scx_keydb *db, softcxi_error *err)
{
    return scx_fail(err, SOFTCXI_ETAMPER,
                    "%s has disappeared (this process saw generation %llu): restore it from a "
                    "backup",
                    db->file, (unsigned long long)db->st.generation);
}

/* Bring db->st up to date with the file.  With want_img, also hand back
 * the file's bytes (export). */
static int refresh(scx_keydb *db, uint8_t **want_img, size_t *want_len, softcxi_error *err)
{
    int fd = open(db->file, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        if (errno != ENOENT)
            return scx_fail(err, SOFTCXI_EIO, "%s: %s", db->file, strerror(errno));
        return db->st.have_file ? gone(db, err) : 0;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return scx_fail(err, SOFTCXI_EIO, "%s: %s", db->file, strerror(e));
    }
    file_sig sig;
    sig_of(&sig, &st);
    if (!want_img && db->st.have_file && sig_same(&db->st.sig, &sig)) {
        /* Writers replace the file by rename, and the salt is fresh on
         * every write: the same inode, size and times (an edit in place
         * changes ctime) and the same salt and generation mean the same
         * file.  A recycled inode number within one clock tick is what the
         * salt is there for. */
        uint8_t h[DB_HDR];
        ssize_t r = pread(fd, h, sizeof h, 0);
        if (r == (ssize_t)sizeof h && h[0] == SCX_MAGIC && h[2] == SCX_TYPE_KEYDB &&
            get64(h + 36) == db->st.generation &&
            memcmp(h + 12, db->st.salt, SCX_SALT_LEN) == 0) {
            close(fd);
            return 0;
        }
    }
    uint8_t *img;
    size_t len;
    int rc = read_file(db, fd, &st, &img, &len, err);
    close(fd);
    if (rc)
        return rc;
    state ns;
    rc = decode_image(db, img, len, db->file, &ns, err);
    if (rc == 0) {
        ns.sig = sig;
        rc = adopt(db, &ns, err);
    }
    if (rc == 0 && want_img) {
        *want_img = img;
        *want_len = len;
    } else {
        OPENSSL_free(img);
    }
    return rc;
}

/* ---- the API --------------------------------------------------------------- */

int scx_keydb_open(scx_keydb **out, const char *dir, const uint8_t storage_key[32],
                   size_t limit_bytes, softcxi_error *err)
{
    int rc = scx_keydb_handle(out, dir, storage_key, limit_bytes, err);
    if (rc == 0 && (rc = refresh(*out, NULL, NULL, err)) != 0) {
        scx_keydb_free(*out);
        *out = NULL;
    }
    return rc;
}

int scx_keydb_handle(scx_keydb **out, const char *dir, const uint8_t storage_key[32],
                     size_t limit_bytes, softcxi_error *err)
{
    struct stat st;
    *out = NULL;
    if (!dir || !*dir || !storage_key)
        return scx_fail(err, SOFTCXI_EINVAL, "internal key database: directory and key needed");
    if (stat(dir, &st) != 0)
        return scx_fail(err, errno == ENOENT ? SOFTCXI_ENOTFOUND : SOFTCXI_EIO,
                        "internal key database: %s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return scx_fail(err, SOFTCXI_EINVAL, "internal key database: %s is not a directory", dir);

    scx_keydb *db = calloc(1, sizeof *db);
    if (!db)
        return scx_fail(err, SOFTCXI_ENOMEM, "internal key database: out of memory");
    db->limit = limit_bytes ? limit_bytes : SCX_KEYDB_DEFAULT_LIMIT;
    db->dir = strdup(dir);
    db->file = joinpath(dir, DB_FILE);
    db->lock = joinpath(dir, DB_LOCK);
    db->gcm = EVP_CIPHER_CTX_new();
    int rc;
    if (!db->dir || !db->file || !db->lock || !db->gcm) {
        rc = scx_fail(err, SOFTCXI_ENOMEM, "internal key database: out of memory");
        goto fail;
    }
    if (scx_kcv(db->kcv, storage_key) != 0 || scx_xaes_init(&db->x, storage_key) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "internal key database: key setup failed");
        goto fail;
    }
    *out = db;
    scx_ok(err);
    return 0;
fail:
    scx_keydb_free(db);
    return rc;
}

void scx_keydb_free(scx_keydb *db)
{
    if (!db)
        return;
    state_free(&db->st);
    if (db->x.ecb)
        scx_xaes_clear(&db->x);
    EVP_CIPHER_CTX_free(db->gcm);
    free(db->dir);
    free(db->file);
    free(db->lock);
    OPENSSL_cleanse(db, sizeof *db);
    free(db);
}

int scx_keydb_reload(scx_keydb *db, softcxi_error *err)
{
    int rc = refresh(db, NULL, NULL, err);
    if (rc == 0)
        scx_ok(err);
    return rc;
}

int scx_keydb_put(scx_keydb *db, const char *group, const char *name, uint32_t specifier,
                  int has_specifier, const uint8_t *blob, size_t blob_len, unsigned flags,
                  softcxi_error *err)
{
    addr a;
    int rc = make_addr(&a, group, name, specifier, has_specifier, err);
    if (rc)
        return rc;
    if (!blob || blob_len == 0 || blob_len > UINT32_MAX)
        return scx_fail(err, SOFTCXI_EINVAL, "internal key database: key %s has no blob",
                        AREF(&a));
    entry *e = entry_new(&a, blob, blob_len);
    if (!e)
        return scx_fail(err, SOFTCXI_ENOMEM, "internal key database: out of memory");

    int lk = lock_db(db, err);
    if (lk < 0) {
        free(e);
        return lk;
    }
    if ((rc = refresh(db, NULL, NULL, err)) != 0)
        goto done;
    size_t pos;
    int found = find(&db->st, &a, &pos);
    if (found && !(flags & SOFTCXI_FLAG_OVERWRITE)) {
        rc = scx_fail(err, SOFTCXI_EEXIST,
                      "key %s already exists in the internal key database: use FLAG_OVERWRITE "
                      "to replace it",
                      AREF(&a));
        goto done;
    }
    size_t old = found ? e_cost(db->st.v[pos]) : 0;
    if (db->st.used - old + e_cost(e) > db->limit) {
        rc = scx_fail(err, SOFTCXI_EFULL,
                      "internal key database full: %zu of %zu bytes used, this key needs %zu; "
                      "generate it with FLAG_EXTERNAL and keep the blob in a key store (key %s)",
                      db->st.used, db->limit, e_cost(e), AREF(&a));
        goto done;
    }
    if (!found && state_reserve(&db->st, db->st.n + 1) != 0) {
        rc = scx_fail(err, SOFTCXI_ENOMEM, "internal key database: out of memory");
        goto done;
    }
    edit ed = {found ? ED_REPLACE : ED_INSERT, pos, e};
    if ((rc = write_db(db, &db->st, &ed, db->st.generation, err)) != 0)
        goto done;
    if (found) {
        db->st.used -= old;
        free(db->st.v[pos]);
    } else {
        memmove(db->st.v + pos + 1, db->st.v + pos, (db->st.n - pos) * sizeof *db->st.v);
        db->st.n++;
    }
    db->st.v[pos] = e;
    db->st.used += e_cost(e);
    e = NULL;
    scx_ok(err);
done:
    unlock_db(lk);
    free(e);
    return rc;
}

int scx_keydb_get(scx_keydb *db, const char *group, const char *name, uint32_t specifier,
                  int has_specifier, const uint8_t **blob, size_t *blob_len, softcxi_error *err)
{
    addr a;
    size_t pos;
    *blob = NULL;
    *blob_len = 0;
    int rc = make_addr(&a, group, name, specifier, has_specifier, err);
    if (rc)
        return rc;
    if (!find(&db->st, &a, &pos))
        return scx_fail(err, SOFTCXI_ENOTFOUND, "key %s is not in the internal key database",
                        AREF(&a));
    *blob = e_blob(db->st.v[pos]);
    *blob_len = db->st.v[pos]->blob_len;
    scx_ok(err);
    return 0;
}

int scx_keydb_delete(scx_keydb *db, const char *group, const char *name, uint32_t specifier,
                     int has_specifier, softcxi_error *err)
{
    addr a;
    size_t pos;
    int rc = make_addr(&a, group, name, specifier, has_specifier, err);
    if (rc)
        return rc;
    int lk = lock_db(db, err);
    if (lk < 0)
        return lk;
    if ((rc = refresh(db, NULL, NULL, err)) != 0)
        goto done;
    if (!find(&db->st, &a, &pos)) {
        rc = scx_fail(err, SOFTCXI_ENOTFOUND, "key %s is not in the internal key database",
                      AREF(&a));
        goto done;
    }
    edit ed = {ED_DELETE, pos, NULL};
    if ((rc = write_db(db, &db->st, &ed, db->st.generation, err)) != 0)
        goto done;
    db->st.used -= e_cost(db->st.v[pos]);
    free(db->st.v[pos]);
    memmove(db->st.v + pos, db->st.v + pos + 1, (db->st.n - pos - 1) * sizeof *db->st.v);
    db->st.n--;
    scx_ok(err);
done:
    unlock_db(lk);
    return rc;
}

int scx_keydb_list(scx_keydb *db, scx_keydb_cb cb, void *ctx, softcxi_error *err)
{
    scx_ok(err);
    for (size_t i = 0; i < db->st.n; i++) {
        const entry *e = db->st.v[i];
        int rc = cb(ctx, e_group(e), e_name(e), e->spec, e->has_spec, e_blob(e), e->blob_len);
        if (rc)
            return rc;
    }
    return 0;
}

size_t scx_keydb_used(const scx_keydb *db) { return db->st.used; }
size_t scx_keydb_limit(const scx_keydb *db) { return db->limit; }
uint64_t scx_keydb_generation(const scx_keydb *db) { return db->st.generation; }

int scx_keydb_export(scx_keydb *db, uint8_t **image, size_t *len, softcxi_error *err)
{
    *image = NULL;
    *len = 0;
    /* The bytes handed out are the ones just opened and checked. */
    int rc = refresh(db, image, len, err);
    if (rc)
        return rc;
    if (!*image) {
        /* No file yet: an empty database, as it would be written. */
        uint8_t salt[SCX_SALT_LEN];
        edit none = {ED_NONE, 0, NULL};
        if ((rc = build_image(db, &db->st, &none, db->st.generation, image, len, salt, err)))
            return rc;
    }
    scx_ok(err);
    return 0;
}

/* The generation in a header we cannot open, so that a restore over a
 * damaged file still moves the counter forward; 0 when unreadable. */
static uint64_t peek_generation(const scx_keydb *db)
{
    uint8_t h[DB_HDR];
    uint64_t gen = 0;
    int fd = open(db->file, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return 0;
    if (pread(fd, h, sizeof h, 0) == (ssize_t)sizeof h && h[0] == SCX_MAGIC &&
        h[2] == SCX_TYPE_KEYDB)
        gen = get64(h + 36);
    close(fd);
    return gen < ((uint64_t)1 << 62) ? gen : 0;
}

int scx_keydb_import(scx_keydb *db, const uint8_t *image, size_t len, softcxi_error *err)
{
    state ns;
    if (!image)
        return scx_fail(err, SOFTCXI_EINVAL, "internal key database: no image given");
    int rc = decode_image(db, image, len, "database image", &ns, err);
    if (rc)
        return rc;
    if (ns.used > db->limit) {
        rc = scx_fail(err, SOFTCXI_EFULL,
                      "database image holds %zu bytes of keys, over this database's limit of "
                      "%zu; nothing was replaced",
                      ns.used, db->limit);
        state_free(&ns);
        return rc;
    }
    int lk = lock_db(db, err);
    if (lk < 0) {
        state_free(&ns);
        return lk;
    }
    /* The written generation must pass every one any process has seen, so
     * that they all notice the change: the current file's when it opens, its
     * header's when it does not (a restore is the cure for a damaged file),
     * and the image's. */
    uint64_t gen = ns.generation;
    softcxi_error ignored;
    if (refresh(db, NULL, NULL, &ignored) == 0) {
        if (db->st.generation > gen)
            gen = db->st.generation;
    } else {
        uint64_t peek = peek_generation(db);
        if (peek > gen)
            gen = peek;
        if (db->st.generation > gen)
            gen = db->st.generation;
    }
    edit none = {ED_NONE, 0, NULL};
    rc = write_db(db, &ns, &none, gen, err);
    unlock_db(lk);
    if (rc) {
        state_free(&ns);
        return rc;
    }
    state_free(&db->st);
    db->st = ns;
    scx_ok(err);
    return 0;
}

/* ---- payloads: database backups ------------------------------------------ */

int scx_keydb_encode(uint8_t **out, size_t *out_len, const scx_keydb_item *items, size_t n,
                     softcxi_error *err)
{
    size_t plen = 4;
    *out = NULL;
    *out_len = 0;
    for (size_t i = 0; i < n; i++) {
        size_t gl = strlen(items[i].group), nl = strlen(items[i].name);
        if (gl > SOFTCXI_NAME_MAX || nl == 0 || nl > SOFTCXI_NAME_MAX ||
            items[i].blob_len == 0 || items[i].blob_len > UINT32_MAX)
            return scx_fail(err, SOFTCXI_EINVAL, "internal key database: entry %zu is malformed",
                            i);
        plen += ENTRY_HDR + gl + nl + items[i].blob_len;
    }
    if (plen > INT32_MAX || n > UINT32_MAX)
        return scx_fail(err, SOFTCXI_EFULL, "internal key database: %zu bytes is too large",
                        plen);
    uint8_t *p = OPENSSL_malloc(plen);
    if (!p)
        return scx_fail(err, SOFTCXI_ENOMEM, "internal key database: out of memory");
    size_t k = 4;
    put32(p, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        const scx_keydb_item *it = &items[i];
        size_t gl = strlen(it->group), nl = strlen(it->name);
        p[k] = it->has_spec ? FLAG_HAS_SPEC : 0;
        p[k + 1] = (uint8_t)gl;
        p[k + 2] = (uint8_t)nl;
        put32(p + k + 3, it->has_spec ? it->spec : 0);
        put32(p + k + 7, (uint32_t)it->blob_len);
        k += ENTRY_HDR;
        memcpy(p + k, it->group, gl), k += gl;
        memcpy(p + k, it->name, nl), k += nl;
        memcpy(p + k, it->blob, it->blob_len), k += it->blob_len;
    }
    *out = p;
    *out_len = plen;
    return 0;
}

int scx_keydb_parse(const uint8_t *payload, size_t len, const char *what, scx_keydb_cb cb,
                    void *ctx, softcxi_error *err)
{
    state ns;
    int rc = decode_payload(payload, len, what, &ns, err);
    for (size_t i = 0; rc == 0 && i < ns.n; i++) {
        const entry *e = ns.v[i];
        rc = cb(ctx, e_group(e), e_name(e), e->spec, e->has_spec, e_blob(e), e->blob_len);
    }
    state_free(&ns);
    return rc;
}

static int entry_cmp(const entry *a, const entry *b)
{
    addr x = {e_group(a), e_name(a), a->glen, a->nlen, a->spec, a->has_spec};
    return addr_cmp(&x, b);
}

static entry *entry_dup(const entry *e)
{
    size_t n = sizeof *e + (size_t)e->glen + e->nlen + 2 + e->blob_len;
    entry *d = malloc(n);
    if (d)
        memcpy(d, e, n);
    return d;
}

/* Into *m: the entries of cur and add in address order.  An address in
 * both is EEXIST unless overwrite (then add's entry wins). */
static int merge_states(state *m, const state *cur, const state *add, int overwrite,
                        const char *what, softcxi_error *err)
{
    size_t i = 0, j = 0;
    memset(m, 0, sizeof *m);
    if (state_reserve(m, cur->n + add->n + 1) != 0)
        return scx_fail(err, SOFTCXI_ENOMEM, "%s: out of memory", what);
    while (i < cur->n || j < add->n) {
        const entry *pick;
        if (j == add->n) {
            pick = cur->v[i++];
        } else if (i == cur->n) {
            pick = add->v[j++];
        } else {
            int c = entry_cmp(cur->v[i], add->v[j]);
            if (c < 0) {
                pick = cur->v[i++];
            } else if (c > 0) {
                pick = add->v[j++];
            } else if (!overwrite) {
                const entry *e = add->v[j];
                addr a = {e_group(e), e_name(e), e->glen, e->nlen, e->spec, e->has_spec};
                state_free(m);
                return scx_fail(err, SOFTCXI_EEXIST,
                                "%s: key %s is in the database already: restore with "
                                "FLAG_OVERWRITE to replace it; nothing was restored",
                                what, AREF(&a));
            } else {
                pick = add->v[j++];
                i++;
            }
        }
        if (!(m->v[m->n] = entry_dup(pick))) {
            state_free(m);
            return scx_fail(err, SOFTCXI_ENOMEM, "%s: out of memory", what);
        }
        m->used += e_cost(m->v[m->n]);
        m->n++;
    }
    return 0;
}

int scx_keydb_restore(scx_keydb *db, const uint8_t *payload, size_t len, const char *what,
                      unsigned mode, softcxi_error *err)
{
    state ns, merged, *result = &ns;
    int rc = decode_payload(payload, len, what, &ns, err);
    if (rc)
        return rc;
    int lk = lock_db(db, err);
    if (lk < 0) {
        state_free(&ns);
        return lk;
    }
    /* As for an import, the written generation passes every one seen. */
    uint64_t gen = 0;
    softcxi_error why;
    if ((rc = refresh(db, NULL, NULL, &why)) == 0) {
        gen = db->st.generation;
    } else if (mode & SCX_KEYDB_MERGE) {
        /* Merging needs the current keys; replacing is the cure for a damaged file. */
        *err = why;
        goto done;
    } else {
        rc = 0;
        gen = peek_generation(db);
        if (db->st.generation > gen)
            gen = db->st.generation;
    }
    if (mode & SCX_KEYDB_MERGE) {
        if ((rc = merge_states(&merged, &db->st, &ns, (mode & SCX_KEYDB_OVERWRITE) != 0, what,
                               err)) != 0)
            goto done;
        state_free(&ns);
        result = &merged;
    }
    if (result->used > db->limit) {
        rc = scx_fail(err, SOFTCXI_EFULL,
                      "%s: the restored database would hold %zu bytes of keys, over the limit of "
                      "%zu; nothing was restored",
                      what, result->used, db->limit);
        goto done;
    }
    edit none = {ED_NONE, 0, NULL};
    if ((rc = write_db(db, result, &none, gen, err)) != 0)
        goto done;
    state_free(&db->st);
    db->st = *result;
    memset(result, 0, sizeof *result);
    scx_ok(err);
done:
    unlock_db(lk);
    state_free(result);
    return rc;
}
