/*
 * audit.c - the device's tamper-evident audit log: administrative actions,
 * logons and revocations, appended to a MAC chain in the state directory.
 *
 * ---- to go into internal.h --------------------------------------------------
 *
 *   #define SCX_AUDIT_FIELD_MAX 1024   (bytes of event, subject, detail each)
 *
 *   // key: the 32-byte audit key (derived from the device key with
 *   // SCX_LABEL_AUDIT).  event must be non-empty; NULL subject/detail = "".
 *   int scx_audit_append(const char *dir, const uint8_t key[32], const char *event,
 *                        const char *subject, const char *detail, softcxi_error *err);
 *   // Calls cb for each record, in order, once its MAC has checked; returns
 *   // ETAMPER at the first record that does not check (the records before it
 *   // were delivered), or the callback's value if it returned non-zero.
 *   typedef int (*scx_audit_cb)(void *ctx, uint64_t seq, int64_t time, const char *event,
 *                               const char *subject, const char *detail);
 *   int scx_audit_read(const char *dir, const uint8_t key[32], scx_audit_cb cb, void *ctx,
 *                      softcxi_error *err);
 *   // The whole chain and the sealed counter: 0 when intact, ETAMPER naming
 *   // the first bad record or the cut-off tail; *records = good records.
 *   int scx_audit_verify(const char *dir, const uint8_t key[32], uint64_t *records,
 *                        softcxi_error *err);
 *
 * ---- design -----------------------------------------------------------------
 *
 * <dir>/audit.log, append-only, one record per line:
 *
 *     seq TAB unix_time TAB event TAB subject TAB detail TAB mac_hex LF
 *
 * seq counts from 1 and equals the line number; unix_time is signed decimal.
 * event, subject and detail are escaped (\t \n \\, other bytes below 0x20
 * and 0x7f as \xHH; bytes from 0x80 up pass as they are) so one line is
 * always one record, and are at most SCX_AUDIT_FIELD_MAX bytes unescaped.
 *
 *     mac = HMAC-SHA256(key, prev_mac || line up to and including the TAB
 *                             before mac_hex)
 *
 * with prev_mac the previous record's MAC (32 zero bytes for record 1).  An
 * edited, inserted, removed or reordered record breaks the chain at the
 * first record it touches.  The chain alone cannot show a cut-off tail, so
 *
 * <dir>/audit.count holds the sealed record counter (72 bytes):
 *
 *     count (8 bytes BE) || last_mac (32) ||
 *     HMAC-SHA256(key, "softcxi/v1/audit-count" || count || last_mac)
 *
 * rewritten atomically (temp, fsync, rename, fsync of the directory) after
 * every append.  last_mac is stored in the clear as well (the brief had only
 * count || tag) so the counter authenticates on its own: a "the last N
 * records were cut off" verdict rests on a counter the key vouches for, and
 * an append can check the log's tail against it without reading further
 * back.  The label keeps counter MACs and record MACs apart.
 *
 * Appends hold an exclusive flock on <dir>/audit.lock for the whole
 * read-tail / check / append / fsync / update-counter sequence, so processes
 * can append at once without forking the chain; an append reads only the
 * last line (a window at the end of the file), never the whole log.
 * Readers take the lock shared just long enough to snapshot the counter and
 * the log's size, then scan without it: the log only grows, so the prefix
 * they read is stable.
 *
 * An append refuses (ETAMPER) when the tail does not match the counter:
 * rewriting the counter over a cut log would erase the evidence.  Two states
 * a crash can leave are not tampering and are accepted:
 *  - the log one record ahead of the counter (crash between the log's fsync
 *    and the counter's rename): that record must chain onto the sealed
 *    last_mac, which nobody without the key can arrange;
 *  - an unterminated fragment after the last LF (a torn write): it is no
 *    record, readers skip it and the next append truncates it away.
 * A first append writes a counter of 0 before record 1, so a log with
 * records and no counter is always ETAMPER.
 *
 * Cost: every append makes three fsyncs (log, counter temp, directory) and
 * so takes milliseconds, not microseconds: test_audit measured 1.6-3.8 ms
 * on ext4 on a virtual disk, 50-75 us on tmpfs (the work without the
 * disk).  Appends are serialised by the lock, so that is also the most
 * records a second a device can log.  Logons and administrative actions
 * are rare enough for that, and an audit record that a crash can lose
 * would defeat the point; nothing on the key-operation path is audited.
 * verify costs about 1.5 us a record (one HMAC each).
 *
 * What it cannot do: someone who can write the state directory can put back
 * an older copy of both files (rollback) or delete both; a hardware HSM
 * keeps its counter in tamper-resistant storage, an emulator has none.
 * Messages never contain the key.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- the API (moves to internal.h) --------------------------------------- */

/* The API (scx_audit_append, scx_audit_read, scx_audit_verify) is declared in
 * internal.h. */

/* ---- constants ------------------------------------------------------------ */

#define LOG_FILE "audit.log"
#define COUNT_FILE "audit.count"
#define COUNT_TMP ".audit.count.tmp"
#define LOCK_FILE "audit.lock"
#define COUNT_LABEL "softcxi/v1/audit-count"

#define MAC_LEN 32
#define MAC_HEX (2 * MAC_LEN)
#define COUNT_LEN (8 + MAC_LEN + MAC_LEN)
#define ESC_MAX (4 * SCX_AUDIT_FIELD_MAX) /* every byte as \xHH */
/* Longest line, LF included: two 20-character numbers, three escaped
 * fields, five TABs, the MAC. */
#define REC_MAX (20 + 20 + 3 * ESC_MAX + 5 + MAC_HEX + 1)
#define READ_BUF (64 * 1024)




/* Read exactly n bytes at off; -1 on error or a short file. */
static int pread_all(int fd, void *buf, size_t n, off_t off)
{
    uint8_t *p = buf;
    while (n) {
        ssize_t r = pread(fd, p, n, off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EIO;
            return -1;
        }
        p += r;
        n -= (size_t)r;
        off += r;
    }
    return 0;
}

typedef struct audit_paths {
    const char *dir;
    char log[PATH_MAX], count[PATH_MAX], tmp[PATH_MAX], lock[PATH_MAX];
} audit_paths;

static int paths_init(audit_paths *p, const char *dir, softcxi_error *err)
{
    struct stat st;
    if (!dir || !*dir)
        return scx_fail(err, SOFTCXI_EINVAL, "audit: no state directory given");
    p->dir = dir;
    int a = snprintf(p->log, sizeof p->log, "%s/" LOG_FILE, dir);
    int b = snprintf(p->count, sizeof p->count, "%s/" COUNT_FILE, dir);
    int c = snprintf(p->tmp, sizeof p->tmp, "%s/" COUNT_TMP, dir);
    int d = snprintf(p->lock, sizeof p->lock, "%s/" LOCK_FILE, dir);
    if (a < 0 || b < 0 || c < 0 || d < 0 || (size_t)c >= sizeof p->tmp ||
        (size_t)a >= sizeof p->log || (size_t)b >= sizeof p->count || (size_t)d >= sizeof p->lock)
        return scx_fail(err, SOFTCXI_EINVAL, "audit: state directory path too long");
    if (stat(dir, &st) != 0)
        return scx_fail(err, errno == ENOENT ? SOFTCXI_ENOTFOUND : SOFTCXI_EIO,
                        "audit: state directory %s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return scx_fail(err, SOFTCXI_ENOTFOUND, "audit: %s is not a directory", dir);
    return 0;
}

/* Take the audit lock (LOCK_EX or LOCK_SH) into *fd.  A reader that may not
 * create the lock file, and finds none, goes on without it (*fd = -1): no
 * appender has ever run there. */
static int lock_take(const audit_paths *p, int op, int *fd, softcxi_error *err)
{
    *fd = open(p->lock, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (*fd < 0 && op == LOCK_SH && (errno == EACCES || errno == EROFS || errno == EPERM)) {
        *fd = open(p->lock, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (*fd < 0 && errno == ENOENT)
            return 0; /* nobody ever appended here */
    }
    if (*fd < 0)
        return scx_fail(err, SOFTCXI_EIO, "audit: lock %s: %s", p->lock, strerror(errno));
    while (flock(*fd, op) != 0) {
        if (errno == EINTR)
            continue;
        int e = errno;
        close(*fd);
        *fd = -1;
        return scx_fail(err, SOFTCXI_EIO, "audit: lock %s: %s", p->lock, strerror(e));
    }
    return 0;
}

static void lock_drop(int *fd)
{
    if (*fd >= 0)
        close(*fd); /* releases the flock */
    *fd = -1;
}

/* ---- MACs ----------------------------------------------------------------- */

/* One keyed HMAC context per call; re-initialised with a NULL key for each
 * record, which keeps the key schedule instead of redoing it. */
typedef struct audit_mac {
    EVP_MAC *mac;
    EVP_MAC_CTX *ctx;
} audit_mac;

static void mac_free(audit_mac *m)
{
    EVP_MAC_CTX_free(m->ctx); /* wipes the keyed state */
    EVP_MAC_free(m->mac);
    m->ctx = NULL;
    m->mac = NULL;
}

static int mac_init(audit_mac *m, const uint8_t key[32], softcxi_error *err)
{
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                           OSSL_PARAM_construct_end()};
    m->ctx = NULL;
    m->mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (m->mac)
        m->ctx = EVP_MAC_CTX_new(m->mac);
    if (!m->ctx || EVP_MAC_init(m->ctx, key, 32, params) != 1) {
        mac_free(m);
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "audit: HMAC-SHA256 unavailable");
    }
    return 0;
}

static int mac_final(audit_mac *m, uint8_t out[MAC_LEN])
{
    size_t n = 0;
    return EVP_MAC_final(m->ctx, out, &n, MAC_LEN) == 1 && n == MAC_LEN ? 0 : SOFTCXI_ECRYPTO;
}

/* HMAC(key, prev || prefix): one record's MAC. */
static int mac_record(audit_mac *m, uint8_t out[MAC_LEN], const uint8_t prev[MAC_LEN],
                      const char *prefix, size_t len)
{
    if (EVP_MAC_init(m->ctx, NULL, 0, NULL) != 1 || EVP_MAC_update(m->ctx, prev, MAC_LEN) != 1 ||
        EVP_MAC_update(m->ctx, (const uint8_t *)prefix, len) != 1)
        return SOFTCXI_ECRYPTO;
    return mac_final(m, out);
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* HMAC(key, COUNT_LABEL || count || last): the counter's seal. */
static int mac_count(audit_mac *m, uint8_t out[MAC_LEN], uint64_t count,
                     const uint8_t last[MAC_LEN])
{
    uint8_t be[8];
    put64(be, count);
    if (EVP_MAC_init(m->ctx, NULL, 0, NULL) != 1 ||
        EVP_MAC_update(m->ctx, (const uint8_t *)COUNT_LABEL, sizeof COUNT_LABEL - 1) != 1 ||
        EVP_MAC_update(m->ctx, be, sizeof be) != 1 || EVP_MAC_update(m->ctx, last, MAC_LEN) != 1)
        return SOFTCXI_ECRYPTO;
    return mac_final(m, out);
}

/* ---- the counter file ------------------------------------------------------ */

typedef struct audit_count {
    int present;
    uint64_t count;
    uint8_t last[MAC_LEN], tag[MAC_LEN];
} audit_count;

/* Load without judging: the seal is checked by the caller, after the chain,
 * so a wrong key is reported at record 1 rather than at the counter. */
static int count_load(audit_count *c, const audit_paths *p, softcxi_error *err)
{
    uint8_t buf[COUNT_LEN + 1];
    size_t n = 0;
    memset(c, 0, sizeof *c);
    int fd = open(p->count, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0 && errno == ENOENT)
        return 0;
    if (fd < 0)
        return scx_fail(err, SOFTCXI_EIO, "audit: %s: %s", p->count, strerror(errno));
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            return scx_fail(err, SOFTCXI_EIO, "audit: %s: %s", p->count, strerror(e));
        }
        if (r == 0 || (n += (size_t)r) == sizeof buf)
            break;
    }
    close(fd);
    if (n != COUNT_LEN)
        return scx_fail(err, SOFTCXI_ETAMPER,
                        "audit: %s is malformed (%s%zu bytes, a sealed counter has %d)",
                        p->count, n == sizeof buf ? "over " : "", n == sizeof buf ? n - 1 : n,
                        COUNT_LEN);
    c->present = 1;
    c->count = get64(buf);
    memcpy(c->last, buf + 8, MAC_LEN);
    memcpy(c->tag, buf + 8 + MAC_LEN, MAC_LEN);
    return 0;
}

static int count_check(const audit_count *c, audit_mac *m, const audit_paths *p,
                       softcxi_error *err)
{
    uint8_t want[MAC_LEN];
    if (mac_count(m, want, c->count, c->last) != 0)
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "audit: HMAC failed");
    if (CRYPTO_memcmp(want, c->tag, MAC_LEN) != 0)
        return scx_fail(err, SOFTCXI_ETAMPER,
                        "audit: %s (the sealed record counter) fails authentication: it was "
                        "altered, or the key is not this device's",
                        p->count);
    return 0;
}

/* Replace the counter atomically: temp, fsync, rename, fsync the directory.
 * Called with the lock held, so one temp name does. */
static int count_write(const audit_paths *p, audit_mac *m, uint64_t count,
                       const uint8_t last[MAC_LEN], softcxi_error *err)
{
    uint8_t buf[COUNT_LEN];
    put64(buf, count);
    memcpy(buf + 8, last, MAC_LEN);
    if (mac_count(m, buf + 8 + MAC_LEN, count, last) != 0)
        return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "audit: HMAC failed");
    int fd = open(p->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0 || scx_write_all(fd, buf, sizeof buf) != 0 || fsync(fd) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        unlink(p->tmp);
        return scx_fail(err, SOFTCXI_EIO, "audit: writing %s: %s", p->tmp, strerror(e));
    }
    close(fd);
    if (rename(p->tmp, p->count) != 0) {
        int e = errno;
        unlink(p->tmp);
        return scx_fail(err, SOFTCXI_EIO, "audit: renaming %s to %s: %s", p->tmp, p->count,
                        strerror(e));
    }
    if (scx_fsync_dir(p->dir) != 0)
        return scx_fail(err, SOFTCXI_EIO, "audit: fsync %s: %s", p->dir, strerror(errno));
    return 0;
}

/* ---- records ---------------------------------------------------------------- */

static int needs_hex(unsigned char c) { return c < 0x20 || c == 0x7f; }

/* Escape s into out (ESC_MAX + 1 bytes); returns the length, or -1 when s is
 * longer than SCX_AUDIT_FIELD_MAX. */
static long escape(char *out, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    size_t n = 0, i = 0;
    for (; s[i]; i++) {
        unsigned char c = (unsigned char)s[i];
        if (i >= SCX_AUDIT_FIELD_MAX)
            return -1;
        if (c == '\t' || c == '\n' || c == '\\') {
            out[n++] = '\\';
            out[n++] = c == '\t' ? 't' : c == '\n' ? 'n' : '\\';
        } else if (needs_hex(c)) {
            out[n++] = '\\';
            out[n++] = 'x';
            out[n++] = hex[c >> 4];
            out[n++] = hex[c & 15];
        } else {
            out[n++] = (char)c;
        }
    }
    out[n] = '\0';
    return (long)n;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Undo escape(): out (SCX_AUDIT_FIELD_MAX + 1 bytes, or NULL to check only).
 * Accepts only what escape() writes, so a record has one spelling. */
static int unescape(char *out, const char *in, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)in[i];
        if (needs_hex(c))
            return -1;
        if (c == '\\') {
            if (++i >= len)
                return -1;
            if (in[i] == 't' || in[i] == 'n' || in[i] == '\\') {
                c = in[i] == 't' ? '\t' : in[i] == 'n' ? '\n' : '\\';
            } else if (in[i] == 'x' && i + 2 < len) {
                int hi = hexval(in[i + 1]), lo = hexval(in[i + 2]);
                if (hi < 0 || lo < 0)
                    return -1;
                c = (unsigned char)(hi << 4 | lo);
                if (!needs_hex(c) || c == 0 || c == '\t' || c == '\n')
                    return -1;
                i += 2;
            } else {
                return -1;
            }
        }
        if (n >= SCX_AUDIT_FIELD_MAX)
            return -1;
        if (out)
            out[n] = (char)c;
        n++;
    }
    if (out)
        out[n] = '\0';
    return 0;
}

/* A canonical decimal: no sign (unless neg_ok), no leading zero. */
static int parse_num(const char *s, size_t len, int neg_ok, uint64_t max, uint64_t *v, int *neg)
{
    *neg = 0;
    if (neg_ok && len > 0 && s[0] == '-') {
        *neg = 1;
        s++, len--;
    }
    if (len == 0 || len > 20 || (s[0] == '0' && (len > 1 || *neg)))
        return -1;
    uint64_t x = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (x > (max - d) / 10)
            return -1;
        x = x * 10 + d;
    }
    *v = x;
    return 0;
}

/* One line split at its TABs.  Fields point into the line. */
typedef struct audit_rec {
    const char *field[6]; /* seq, time, event, subject, detail, mac */
    size_t len[6];
    size_t mac_off; /* bytes covered by the MAC */
    uint8_t mac[MAC_LEN];
    uint64_t seq;
    int64_t time;
} audit_rec;

/* Enough to check the MAC: six fields, a 64-digit lowercase hex MAC. */
static int rec_split(audit_rec *r, const char *line, size_t len)
{
    size_t start = 0;
    int f = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && line[i] != '\t')
            continue;
        if (f == 6)
            return -1;
        r->field[f] = line + start;
        r->len[f++] = i - start;
        start = i + 1;
    }
    if (f != 6 || r->len[5] != MAC_HEX)
        return -1;
    r->mac_off = (size_t)(r->field[5] - line);
    for (size_t i = 0; i < MAC_LEN; i++) {
        int hi = hexval(r->field[5][2 * i]), lo = hexval(r->field[5][2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        r->mac[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}

/* The rest: numbers and escapes. */
static int rec_fields(audit_rec *r)
{
    uint64_t v;
    int neg;
    if (parse_num(r->field[0], r->len[0], 0, UINT64_MAX, &v, &neg) != 0 || v == 0)
        return -1;
    r->seq = v;
    if (parse_num(r->field[1], r->len[1], 1, (uint64_t)INT64_MAX + 1, &v, &neg) != 0 ||
        (!neg && v > (uint64_t)INT64_MAX))
        return -1;
    r->time = neg ? (v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v) : (int64_t)v;
    if (r->len[2] == 0)
        return -1; /* every record names its event */
    for (int i = 2; i < 5; i++)
        if (unescape(NULL, r->field[i], r->len[i]) != 0)
            return -1;
    return 0;
}

/* ---- the log's tail ----------------------------------------------------------- */

typedef struct audit_tail {
    char *buf;      /* a window at the end of the file */
    audit_rec rec;  /* the last complete record, when has */
    const char *line;
    size_t line_len;
    int has;
    off_t end;      /* end of the last complete line: size less a torn fragment */
} audit_tail;

/* Find the last complete line without reading the whole log: a window of
 * two records' length at the end holds it and any torn fragment after it. */
static int tail_read(audit_tail *t, int fd, off_t size, const audit_paths *p, softcxi_error *err)
{
    memset(t, 0, sizeof *t);
    t->end = size;
    if (size == 0)
        return 0;
    size_t w = size < 2 * REC_MAX ? (size_t)size : 2 * REC_MAX;
    off_t base = size - (off_t)w;
    if (!(t->buf = malloc(w)))
        return scx_fail(err, SOFTCXI_ENOMEM, "audit: out of memory");
    if (pread_all(fd, t->buf, w, base) != 0)
        return scx_fail(err, SOFTCXI_EIO, "audit: reading %s: %s", p->log, strerror(errno));

    char *nl = memrchr(t->buf, '\n', w);
    size_t e = nl ? (size_t)(nl - t->buf) + 1 : 0; /* end of the complete part */
    if (w - e >= REC_MAX || (!nl && base > 0))
        return scx_fail(err, SOFTCXI_ETAMPER,
                        "audit: %s ends in %zu bytes that are no record: run verify", p->log,
                        w - e);
    t->end = base + (off_t)e;
    if (e == 0)
        return 0; /* only a torn first record */
    char *prev = e > 1 ? memrchr(t->buf, '\n', e - 1) : NULL;
    size_t s = prev ? (size_t)(prev - t->buf) + 1 : 0;
    if (!prev && base > 0)
        return scx_fail(err, SOFTCXI_ETAMPER,
                        "audit: the last line of %s is too long to be a record: run verify",
                        p->log);
    t->line = t->buf + s;
    t->line_len = e - 1 - s;
    if (rec_split(&t->rec, t->line, t->line_len) != 0 || rec_fields(&t->rec) != 0)
        return scx_fail(err, SOFTCXI_ETAMPER,
                        "audit: the last record of %s (at byte %lld) is malformed: run verify",
                        p->log, (long long)(base + (off_t)s));
    t->has = 1;
    return 0;
}

/* ---- append ----------------------------------------------------------------- */

static const char *plural(uint64_t n) { return n == 1 ? " was" : "s were"; }

/* Does the log's tail agree with the sealed counter?  (Lock held.) */
static int tail_check(const audit_tail *t, const audit_count *c, audit_mac *m,
                      const audit_paths *p, softcxi_error *err)
{
    uint8_t want[MAC_LEN];
    if (!t->has) {
        if (c->present && c->count > 0)
            return scx_fail(err, SOFTCXI_ETAMPER,
                            "audit: %s holds no records but the sealed counter says %" PRIu64
                            ": the last %" PRIu64 " record%s cut off",
                            p->log, c->count, c->count, plural(c->count));
        return 0;
    }
    if (!c->present)
        return scx_fail(err, SOFTCXI_ETAMPER,
                        "audit: %s (the sealed record counter) is missing while %s holds "
                        "records",
                        p->count, p->log);
    uint64_t s = t->rec.seq;
    if (s == c->count && CRYPTO_memcmp(t->rec.mac, c->last, MAC_LEN) == 0)
        return 0;
    if (s == c->count + 1) { /* an append that stopped before the counter */
        if (mac_record(m, want, c->last, t->line, t->rec.mac_off) != 0)
            return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "audit: HMAC failed");
        if (CRYPTO_memcmp(want, t->rec.mac, MAC_LEN) == 0)
            return 0;
    }
    if (s < c->count)
        return scx_fail(err, SOFTCXI_ETAMPER,
                        "audit: %s ends at record %" PRIu64 " but the sealed counter says %" PRIu64
                        ": the last %" PRIu64 " record%s cut off; nothing appended",
                        p->log, s, c->count, c->count - s, plural(c->count - s));
    return scx_fail(err, SOFTCXI_ETAMPER,
                    "audit: the last record of %s (seq %" PRIu64 ") does not match the sealed "
                    "counter (%" PRIu64 "): the log or the counter was replaced; nothing "
                    "appended",
                    p->log, s, c->count);
}

int scx_audit_append(const char *dir, const uint8_t key[32], const char *event,
                     const char *subject, const char *detail, softcxi_error *err)
{
    audit_paths p;
    audit_mac m = {0};
    audit_count c;
    audit_tail t = {0};
    uint8_t prev[MAC_LEN] = {0}, mac[MAC_LEN];
    char *line = NULL;
    int rc, lockfd = -1, fd = -1, created = 0;

    scx_ok(err);
    if (!key)
        return scx_fail(err, SOFTCXI_EINVAL, "audit: no key given");
    if (!event || !*event)
        return scx_fail(err, SOFTCXI_EINVAL, "audit: every record needs an event name");
    if ((rc = paths_init(&p, dir, err)) != 0)
        return rc;
    const char *fields[3] = {event, subject ? subject : "", detail ? detail : ""};
    static const char *const names[3] = {"event", "subject", "detail"};
    if (!(line = malloc(REC_MAX + 1)))
        return scx_fail(err, SOFTCXI_ENOMEM, "audit: out of memory");

    /* The record's fields first, so a bad argument costs no lock. */
    char *esc = line + 42; /* room for "seq\ttime\t" in front */
    size_t n = 0;
    for (int i = 0; i < 3; i++) {
        long w = escape(esc + n, fields[i]);
        if (w < 0) {
            rc = scx_fail(err, SOFTCXI_EINVAL, "audit: %s is longer than %d bytes", names[i],
                          SCX_AUDIT_FIELD_MAX);
            goto done;
        }
        n += (size_t)w;
        esc[n++] = '\t';
    }

    if ((rc = mac_init(&m, key, err)) != 0 || (rc = lock_take(&p, LOCK_EX, &lockfd, err)) != 0 ||
        (rc = count_load(&c, &p, err)) != 0 ||
        (c.present && (rc = count_check(&c, &m, &p, err)) != 0))
        goto done;
    fd = open(p.log, O_RDWR | O_APPEND | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0 && errno == ENOENT) {
        if (c.present && c.count > 0) {
            rc = scx_fail(err, SOFTCXI_ETAMPER,
                          "audit: %s is missing but the sealed counter says %" PRIu64
                          " record%s written; nothing appended",
                          p.log, c.count, plural(c.count));
            goto done;
        }
        fd = open(p.log, O_RDWR | O_APPEND | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        created = 1;
    }
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        rc = scx_fail(err, SOFTCXI_EIO, "audit: %s: %s", p.log, strerror(errno));
        goto done;
    }
    if ((rc = tail_read(&t, fd, st.st_size, &p, err)) != 0 ||
        (rc = tail_check(&t, &c, &m, &p, err)) != 0)
        goto done;

    uint64_t seq = t.has ? t.rec.seq + 1 : 1;
    if (t.has)
        memcpy(prev, t.rec.mac, MAC_LEN);
    if (seq == 0) {
        rc = scx_fail(err, SOFTCXI_EFULL, "audit: %s is full", p.log);
        goto done;
    }
    if (!c.present && (rc = count_write(&p, &m, 0, prev, err)) != 0)
        goto done; /* so that a log with records always has a counter */
    if (t.end < st.st_size && ftruncate(fd, t.end) != 0) {
        rc = scx_fail(err, SOFTCXI_EIO, "audit: dropping a torn record from %s: %s", p.log,
                      strerror(errno));
        goto done;
    }

    /* seq and time go in front of the escaped fields, right-aligned. */
    char head[48];
    int hl = snprintf(head, sizeof head, "%" PRIu64 "\t%" PRId64 "\t", seq,
                      (int64_t)time(NULL));
    if (hl <= 0 || hl > 42) {
        rc = scx_fail(err, SOFTCXI_EINVAL, "audit: cannot format the record");
        goto done;
    }
    char *rec = esc - hl;
    memcpy(rec, head, (size_t)hl);
    size_t plen = (size_t)hl + n;
    if (mac_record(&m, mac, prev, rec, plen) != 0) {
        rc = scx_fail_ssl(err, SOFTCXI_ECRYPTO, "audit: HMAC failed");
        goto done;
    }
    scx_hex(rec + plen, mac, MAC_LEN);
    rec[plen + MAC_HEX] = '\n';

    if (scx_write_all(fd, rec, plen + MAC_HEX + 1) != 0 || fsync(fd) != 0) {
        int e = errno;
        /* Leave no half record behind; if this fails too the next append
         * drops the fragment. */
        if (ftruncate(fd, t.end) == 0)
            (void)fsync(fd);
        rc = scx_fail(err, SOFTCXI_EIO, "audit: appending to %s: %s", p.log, strerror(e));
        goto done;
    }
    if (created && scx_fsync_dir(p.dir) != 0) {
        rc = scx_fail(err, SOFTCXI_EIO, "audit: fsync %s: %s", p.dir, strerror(errno));
        goto done;
    }
    if ((rc = count_write(&p, &m, seq, mac, err)) != 0) {
        /* The record is durable; the log is one ahead of the counter, a
         * state the next append and verify accept. */
        size_t ml = strlen(err ? err->msg : "");
        if (err && ml + 40 < sizeof err->msg)
            snprintf(err->msg + ml, sizeof err->msg - ml, " (record %" PRIu64 " was logged)",
                     seq);
        goto done;
    }
    rc = 0;
done:
    if (fd >= 0)
        close(fd);
    lock_drop(&lockfd);
    mac_free(&m);
    free(t.buf);
    free(line);
    return rc;
}

/* ---- reading and verifying ------------------------------------------------ */

/* Snapshot under the shared lock: the counter and how much of the log
 * belongs to it.  The log only grows, so scanning up to *size after the
 * lock is gone still reads one consistent state.  *fd = -1: no log. */
static int snapshot(const audit_paths *p, audit_count *c, int *fd, off_t *size,
                    softcxi_error *err)
{
    int lockfd = -1, rc;
    struct stat st;
    *fd = -1;
    *size = 0;
    if ((rc = lock_take(p, LOCK_SH, &lockfd, err)) != 0)
        return rc;
    if ((rc = count_load(c, p, err)) != 0)
        goto done;
    *fd = open(p->log, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (*fd < 0 && errno != ENOENT)
        rc = scx_fail(err, SOFTCXI_EIO, "audit: %s: %s", p->log, strerror(errno));
    else if (*fd >= 0 && fstat(*fd, &st) != 0)
        rc = scx_fail(err, SOFTCXI_EIO, "audit: %s: %s", p->log, strerror(errno));
    else if (*fd >= 0)
        *size = st.st_size;
done:
    lock_drop(&lockfd);
    if (rc && *fd >= 0) {
        close(*fd);
        *fd = -1;
    }
    return rc;
}

typedef struct audit_scan {
    uint64_t n;                 /* records whose chain checked */
    uint8_t last[MAC_LEN];      /* MAC of record n (zeros: none) */
    uint8_t before[MAC_LEN];    /* MAC of record n - 1 */
    char *buf;                  /* READ_BUF bytes */
    char *text[3];              /* unescaped fields, for the callback */
} audit_scan;

/* Walk the chain up to size.  Stops at the first record that is malformed,
 * fails its MAC or is out of sequence (ETAMPER naming it), or when cb
 * returns non-zero (that value). */
static int scan(audit_scan *sc, int fd, off_t size, audit_mac *m, const audit_paths *p,
                scx_audit_cb cb, void *ctx, softcxi_error *err)
{
    size_t pos = 0, len = 0;
    off_t left = size;
    uint8_t want[MAC_LEN];
    audit_rec r;

    memset(sc->last, 0, MAC_LEN);
    memset(sc->before, 0, MAC_LEN);
    for (;;) {
        char *line = sc->buf + pos, *nl = memchr(line, '\n', len - pos);
        uint64_t no = sc->n + 1; /* the line number, and the seq it must carry */
        if (!nl) {
            if (len - pos >= REC_MAX)
                return scx_fail(err, SOFTCXI_ETAMPER,
                                "audit: %s: record %" PRIu64 " (line %" PRIu64
                                ") is too long to be a record",
                                p->log, no, no);
            if (left == 0)
                return 0; /* anything left is a torn append, no record */
            memmove(sc->buf, line, len - pos);
            len -= pos;
            pos = 0;
            size_t want_n = READ_BUF - len < (size_t)left ? READ_BUF - len : (size_t)left;
            ssize_t got = read(fd, sc->buf + len, want_n);
            if (got < 0 && errno == EINTR)
                continue;
            if (got < 0)
                return scx_fail(err, SOFTCXI_EIO, "audit: reading %s: %s", p->log,
                                strerror(errno));
            if (got == 0)
                left = 0; /* shrank under us: what is gone shows as cut off */
            len += (size_t)got;
            left -= got;
            continue;
        }
        size_t ll = (size_t)(nl - line);
        pos += ll + 1;
        if (ll >= REC_MAX)
            return scx_fail(err, SOFTCXI_ETAMPER,
                            "audit: %s: record %" PRIu64 " (line %" PRIu64
                            ") is too long to be a record",
                            p->log, no, no);
        if (rec_split(&r, line, ll) != 0)
            return scx_fail(err, SOFTCXI_ETAMPER,
                            "audit: %s: record %" PRIu64 " (line %" PRIu64 ") is malformed",
                            p->log, no, no);
        if (mac_record(m, want, sc->last, line, r.mac_off) != 0)
            return scx_fail_ssl(err, SOFTCXI_ECRYPTO, "audit: HMAC failed");
        if (CRYPTO_memcmp(want, r.mac, MAC_LEN) != 0)
            return scx_fail(err, SOFTCXI_ETAMPER,
                            "audit: %s: record %" PRIu64 " (line %" PRIu64
                            ") fails authentication: it or the chain before it was changed, "
                            "or the key is not this device's",
                            p->log, no, no);
        if (rec_fields(&r) != 0) /* authentic yet malformed: a writer's bug */
            return scx_fail(err, SOFTCXI_ETAMPER,
                            "audit: %s: record %" PRIu64 " (line %" PRIu64 ") is malformed",
                            p->log, no, no);
        if (r.seq != no)
            return scx_fail(err, SOFTCXI_ETAMPER,
                            "audit: %s: record %" PRIu64 " (line %" PRIu64
                            ") is out of sequence: it says seq %" PRIu64,
                            p->log, no, no, r.seq);
        memcpy(sc->before, sc->last, MAC_LEN);
        memcpy(sc->last, r.mac, MAC_LEN);
        sc->n = no;
        if (cb) {
            for (int i = 0; i < 3; i++)
                (void)unescape(sc->text[i], r.field[2 + i], r.len[2 + i]); /* checked */
            int v = cb(ctx, r.seq, r.time, sc->text[0], sc->text[1], sc->text[2]);
            if (v != 0)
                return v;
        }
    }
}

static int scan_init(audit_scan *sc, int with_text, softcxi_error *err)
{
    memset(sc, 0, sizeof *sc);
    size_t total = READ_BUF + (with_text ? 3 * (SCX_AUDIT_FIELD_MAX + 1) : 0);
    if (!(sc->buf = malloc(total)))
        return scx_fail(err, SOFTCXI_ENOMEM, "audit: out of memory");
    for (int i = 0; with_text && i < 3; i++)
        sc->text[i] = sc->buf + READ_BUF + (size_t)i * (SCX_AUDIT_FIELD_MAX + 1);
    return 0;
}

int scx_audit_read(const char *dir, const uint8_t key[32], scx_audit_cb cb, void *ctx,
                   softcxi_error *err)
{
    audit_paths p;
    audit_mac m = {0};
    audit_count c;
    audit_scan sc = {0};
    int fd = -1, rc;
    off_t size;

    scx_ok(err);
    if (!key || !cb)
        return scx_fail(err, SOFTCXI_EINVAL, "audit: read needs a key and a callback");
    if ((rc = paths_init(&p, dir, err)) != 0 || (rc = snapshot(&p, &c, &fd, &size, err)) != 0)
        return rc;
    if (fd >= 0 && (rc = mac_init(&m, key, err)) == 0 && (rc = scan_init(&sc, 1, err)) == 0)
        rc = scan(&sc, fd, size, &m, &p, cb, ctx, err);
    if (fd >= 0)
        close(fd);
    mac_free(&m);
    free(sc.buf);
    return rc;
}

int scx_audit_verify(const char *dir, const uint8_t key[32], uint64_t *records,
                     softcxi_error *err)
{
    audit_paths p;
    audit_mac m = {0};
    audit_count c;
    audit_scan sc = {0};
    int fd = -1, rc;
    off_t size;

    scx_ok(err);
    if (records)
        *records = 0;
    if (!key)
        return scx_fail(err, SOFTCXI_EINVAL, "audit: no key given");
    if ((rc = paths_init(&p, dir, err)) != 0 || (rc = snapshot(&p, &c, &fd, &size, err)) != 0)
        return rc;
    if ((rc = mac_init(&m, key, err)) != 0)
        goto done;
    if (fd < 0) {
        if (c.present && (rc = count_check(&c, &m, &p, err)) == 0 && c.count > 0)
            rc = scx_fail(err, SOFTCXI_ETAMPER,
                          "audit: %s is missing but the sealed counter says %" PRIu64
                          " record%s written",
                          p.log, c.count, plural(c.count));
        goto done;
    }
    if ((rc = scan_init(&sc, 0, err)) != 0 ||
        (rc = scan(&sc, fd, size, &m, &p, NULL, NULL, err)) != 0)
        goto done;
    if (!c.present) {
        if (sc.n > 0)
            rc = scx_fail(err, SOFTCXI_ETAMPER,
                          "audit: %s (the sealed record counter) is missing while %s holds %" PRIu64
                          " record%s",
                          p.count, p.log, sc.n, sc.n == 1 ? "" : "s");
        goto done;
    }
    if ((rc = count_check(&c, &m, &p, err)) != 0)
        goto done;
    if (sc.n < c.count)
        rc = scx_fail(err, SOFTCXI_ETAMPER,
                      "audit: %s holds %" PRIu64 " records but the sealed counter says %" PRIu64
                      ": the last %" PRIu64 " record%s cut off",
                      p.log, sc.n, c.count, c.count - sc.n, plural(c.count - sc.n));
    else if (sc.n == c.count && CRYPTO_memcmp(sc.last, c.last, MAC_LEN) != 0)
        rc = scx_fail(err, SOFTCXI_ETAMPER,
                      "audit: record %" PRIu64 " of %s does not match the sealed counter: the "
                      "log was replaced",
                      sc.n, p.log);
    else if (sc.n == c.count + 1 && CRYPTO_memcmp(sc.before, c.last, MAC_LEN) != 0)
        rc = scx_fail(err, SOFTCXI_ETAMPER,
                      "audit: record %" PRIu64 " of %s does not match the sealed counter: the "
                      "log was replaced",
                      c.count, p.log);
    else if (sc.n > c.count + 1)
        rc = scx_fail(err, SOFTCXI_ETAMPER,
                      "audit: %s holds %" PRIu64 " records but the sealed counter says %" PRIu64
                      ": the counter was replaced by an older copy",
                      p.log, sc.n, c.count);
done:
    if (records)
        *records = sc.n;
    if (fd >= 0)
        close(fd);
    mac_free(&m);
    free(sc.buf);
    return rc;
}
