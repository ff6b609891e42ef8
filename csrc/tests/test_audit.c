/*
 * test_audit.c - the audit log (audit.c): records round-trip, every kind of
 * tampering a user would try is named, concurrent appenders keep one chain,
 * and what a crash can leave behind is not mistaken for tampering.
 *
 *   test_audit        (temp files under $SOFTCXI_TEST_TMP or /tmp)
 *
 * The format checks recompute MACs with OpenSSL's one-shot HMAC() from the
 * layout documented at the top of audit.c, independently of audit.c.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define CHECK_RC(expr, want) CHECK_RC_MSG(expr, want, err.msg)

/* err.msg contains s */
#define CHECK_MSG(s)                                                                     \
    do {                                                                                 \
        if (strstr(err.msg, (s))) {                                                      \
            passed++;                                                                    \
        } else {                                                                         \
            failed++;                                                                    \
            fprintf(stderr, "FAIL %s:%d [%s]: message \"%s\" lacks \"%s\"\n", __FILE__,  \
                    __LINE__, current, err.msg, (s));                                    \
        }                                                                                \
    } while (0)

static char tmproot[512];
static const uint8_t key[32] = {0x61, 0x75, 0x64, 0x69, 0x74, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27};

/* ---- file helpers ------------------------------------------------------------ */

static void mkdir_in(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", tmproot, name);
    if (mkdir(out, 0700) != 0) {
        perror(out);
        exit(2);
    }
}

static void path_in(char *out, size_t cap, const char *dir, const char *name)
{
    snprintf(out, cap, "%s/%s", dir, name);
}

/* The whole file, NUL-terminated; *len its size; NULL if missing. */
static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t r;
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *bigger = realloc(buf, 2 * cap + 1);
            if (!bigger) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = bigger;
            cap *= 2;
        }
    }
    fclose(f);
    if (!buf)
        exit(2);
    buf[n] = '\0';
    if (len)
        *len = n;
    return buf;
}

static int spew(const char *path, const char *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int ok = fwrite(data, 1, len, f) == len;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static int append_raw(const char *path, const char *data)
{
    FILE *f = fopen(path, "ab");
    if (!f)
        return -1;
    int ok = fputs(data, f) >= 0;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static int copy_file(const char *to, const char *from)
{
    size_t n;
    char *d = slurp(from, &n);
    if (!d)
        return -1;
    int rc = spew(to, d, n);
    free(d);
    return rc;
}

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

/* Offset of the start of line no (1-based) in s. */
static size_t line_start(const char *s, size_t no)
{
    size_t off = 0;
    for (size_t l = 1; l < no; l++)
        off += (size_t)(strchr(s + off, '\n') - (s + off)) + 1;
    return off;
}

/* ---- reading records back --------------------------------------------------- */

#define MAXREC 128

typedef struct got {
    size_t n;
    uint64_t seq[MAXREC];
    int64_t time[MAXREC];
    char *event[MAXREC], *subject[MAXREC], *detail[MAXREC];
    size_t stop_after; /* 0: never */
} got;

static int collect(void *ctx, uint64_t seq, int64_t t, const char *event, const char *subject,
                   const char *detail)
{
    got *g = ctx;
    if (g->n < MAXREC) {
        g->seq[g->n] = seq;
        g->time[g->n] = t;
        g->event[g->n] = strdup(event);
        g->subject[g->n] = strdup(subject);
        g->detail[g->n] = strdup(detail);
    }
    g->n++;
    return g->stop_after && g->n == g->stop_after ? 7 : 0;
}

static void got_free(got *g)
{
    for (size_t i = 0; i < g->n && i < MAXREC; i++) {
        free(g->event[i]);
        free(g->subject[i]);
        free(g->detail[i]);
    }
    memset(g, 0, sizeof *g);
}

/* ---- tests ------------------------------------------------------------------ */

static char binary[256]; /* bytes 1..255 */

static const char *const details[5] = {
    "plain",
    "tab\there, newline\nthere, backslash\\ and \\t literally",
    "the middle record",
    "\\x41 is not an escape here; CR\r, ESC\x1b, DEL\x7f, UTF-8 \xc3\xa9",
    binary,
};

static void append5(const char *dir)
{
    softcxi_error err;
    char subj[32];
    for (int i = 0; i < 5; i++) {
        snprintf(subj, sizeof subj, "user-%d", i + 1);
        CHECK_RC(scx_audit_append(dir, key, i % 2 ? "logon" : "user_add", subj, details[i], &err),
                 0);
    }
}

static void test_roundtrip(const char *dir)
{
    current = "roundtrip";
    softcxi_error err;
    uint64_t records = 99;
    got g = {0};
    for (int i = 1; i < 256; i++)
        binary[i - 1] = (char)i;

    /* No log yet: no records, intact. */
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == 0);
    CHECK_RC(scx_audit_read(dir, key, collect, &g, &err), 0);
    CHECK(g.n == 0);

    int64_t before = (int64_t)time(NULL);
    append5(dir);
    int64_t after = (int64_t)time(NULL);

    CHECK_RC(scx_audit_read(dir, key, collect, &g, &err), 0);
    CHECK(g.n == 5);
    for (size_t i = 0; i < 5 && i < g.n; i++) {
        char subj[32];
        snprintf(subj, sizeof subj, "user-%zu", i + 1);
        CHECK(g.seq[i] == i + 1);
        CHECK(g.time[i] >= before && g.time[i] <= after);
        CHECK(strcmp(g.event[i], i % 2 ? "logon" : "user_add") == 0);
        CHECK(strcmp(g.subject[i], subj) == 0);
        CHECK(strcmp(g.detail[i], details[i]) == 0);
    }
    got_free(&g);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == 5);

    /* One record per line, whatever the fields held. */
    char path[1024];
    size_t len;
    path_in(path, sizeof path, dir, "audit.log");
    char *log = slurp(path, &len);
    CHECK(log && count_lines(log) == 5 && log[len - 1] == '\n');
    CHECK(log && strlen(log) == len); /* no NUL written */
    free(log);

    /* A callback that returns non-zero stops the walk; its value comes back. */
    g.stop_after = 2;
    CHECK_RC(scx_audit_read(dir, key, collect, &g, &err), 7);
    CHECK(g.n == 2);
    got_free(&g);
}

/* The documented layout, recomputed without audit.c. */
static void test_format(const char *dir)
{
    current = "format";
    char path[1024];
    uint8_t prev[32] = {0}, mac[32];
    unsigned ml = 32;
    size_t len;
    path_in(path, sizeof path, dir, "audit.log");
    char *log = slurp(path, &len);
    if (!log) {
        CHECK(log != NULL);
        return;
    }
    uint8_t *buf = malloc(32 + len);
    char *p = log;
    int lines_ok = 1;
    for (int i = 0; i < 5; i++) {
        char *nl = strchr(p, '\n'), *tab = memrchr(p, '\t', (size_t)(nl - p));
        size_t plen = (size_t)(tab - p) + 1;
        memcpy(buf, prev, 32);
        memcpy(buf + 32, p, plen);
        HMAC(EVP_sha256(), key, 32, buf, 32 + plen, mac, &ml);
        char hex[65];
        scx_hex(hex, mac, 32);
        lines_ok &= nl - tab - 1 == 64 && memcmp(tab + 1, hex, 64) == 0;
        memcpy(prev, mac, 32);
        p = nl + 1;
    }
    CHECK(lines_ok);
    CHECK(strncmp(log, "1\t", 2) == 0);
    CHECK(strstr(log, "\tuser-2\ttab\\there, newline\\nthere, backslash\\\\ and \\\\t literally\t"));
    CHECK(strstr(log, "CR\\x0d, ESC\\x1b, DEL\\x7f, UTF-8 \xc3\xa9\t"));
    free(log);

    /* audit.count: count BE || last_mac || HMAC(key, label || count || last_mac) */
    path_in(path, sizeof path, dir, "audit.count");
    char *cnt = slurp(path, &len);
    CHECK(cnt && len == 72);
    if (cnt && len == 72) {
        uint8_t in[22 + 8 + 32], tag[32];
        memcpy(in, "softcxi/v1/audit-count", 22);
        memcpy(in + 22, cnt, 40);
        HMAC(EVP_sha256(), key, 32, in, sizeof in, tag, &ml);
        CHECK(memcmp(cnt, "\0\0\0\0\0\0\0\5", 8) == 0);
        CHECK(memcmp(cnt + 8, prev, 32) == 0);
        CHECK(memcmp(cnt + 40, tag, 32) == 0);
    }
    free(cnt);
    free(buf);
}

static void test_tamper(const char *dir)
{
    softcxi_error err;
    uint64_t records;
    char logp[1024], cntp[1024];
    size_t len, clen;
    path_in(logp, sizeof logp, dir, "audit.log");
    path_in(cntp, sizeof cntp, dir, "audit.count");
    char *good = slurp(logp, &len), *goodc = slurp(cntp, &clen);
    if (!good || !goodc) {
        CHECK(good && goodc);
        return;
    }

    current = "flip a byte in record 3";
    char *bad = strdup(good);
    char *at = strstr(bad, "user-3");
    CHECK(at != NULL);
    if (at)
        at[5] ^= 1; /* user-3 -> user-2 */
    CHECK(spew(logp, bad, len) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK(records == 2);
    CHECK_MSG("record 3 (line 3) fails authentication");
    got g = {0};
    CHECK_RC(scx_audit_read(dir, key, collect, &g, &err), SOFTCXI_ETAMPER);
    CHECK(g.n == 2); /* the good ones come first, then the verdict */
    got_free(&g);
    free(bad);

    current = "cut the last line";
    size_t cut = line_start(good, 5);
    CHECK(spew(logp, good, cut) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK(records == 4);
    CHECK_MSG("the last 1 record was cut off");
    /* An append must not paper over the cut by resealing the counter. */
    CHECK_RC(scx_audit_append(dir, key, "logon", "mallory", "", &err), SOFTCXI_ETAMPER);
    CHECK_MSG("cut off");
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK_MSG("cut off");

    current = "cut the last two lines mid-line";
    CHECK(spew(logp, good, line_start(good, 4) + 10) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK(records == 3);
    CHECK_MSG("the last 2 records were cut off");

    current = "everything cut";
    CHECK(spew(logp, good, 0) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK_MSG("cut off");
    CHECK_RC(scx_audit_append(dir, key, "logon", "mallory", "", &err), SOFTCXI_ETAMPER);

    current = "log deleted";
    CHECK(unlink(logp) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK_MSG("missing");
    CHECK_RC(scx_audit_append(dir, key, "logon", "mallory", "", &err), SOFTCXI_ETAMPER);
    CHECK(access(logp, F_OK) != 0); /* and no empty log made */

    current = "counter deleted";
    CHECK(spew(logp, good, len) == 0);
    CHECK(unlink(cntp) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK(records == 5);
    CHECK_MSG("counter) is missing");
    CHECK_RC(scx_audit_append(dir, key, "logon", "mallory", "", &err), SOFTCXI_ETAMPER);

    current = "counter altered";
    char *c2 = malloc(clen);
    memcpy(c2, goodc, clen);
    c2[7] = 9; /* count 5 -> 9 */
    CHECK(spew(cntp, c2, clen) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK_MSG("fails authentication");
    CHECK(spew(cntp, goodc, 40) == 0); /* truncated */
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK_MSG("malformed");
    free(c2);
    CHECK(spew(cntp, goodc, clen) == 0);

    current = "wrong key";
    uint8_t other[32];
    memcpy(other, key, 32);
    other[31] ^= 0x80;
    CHECK_RC(scx_audit_verify(dir, other, &records, &err), SOFTCXI_ETAMPER);
    CHECK(records == 0);
    CHECK_MSG("record 1 (line 1) fails authentication");
    CHECK_RC(scx_audit_append(dir, other, "logon", "mallory", "", &err), SOFTCXI_ETAMPER);

    current = "two lines swapped";
    bad = malloc(len + 1);
    size_t l2 = line_start(good, 2), l3 = line_start(good, 3), l4 = line_start(good, 4);
    memcpy(bad, good, l2);
    memcpy(bad + l2, good + l3, l4 - l3);
    memcpy(bad + l2 + (l4 - l3), good + l2, l3 - l2);
    memcpy(bad + l4, good + l4, len - l4);
    CHECK(spew(logp, bad, len) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK_MSG("record 2 (line 2) fails authentication");
    free(bad);

    current = "a record removed from the middle";
    bad = malloc(len + 1);
    memcpy(bad, good, l2);
    memcpy(bad + l2, good + l3, len - l3);
    CHECK(spew(logp, bad, len - (l3 - l2)) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK_MSG("record 2 (line 2) fails authentication");
    free(bad);

    current = "a malformed line";
    CHECK(spew(logp, good, len) == 0);
    CHECK(append_raw(logp, "garbage\n") == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK(records == 5);
    CHECK_MSG("record 6 (line 6) is malformed");
    CHECK_RC(scx_audit_append(dir, key, "logon", "mallory", "", &err), SOFTCXI_ETAMPER);

    current = "an endless line";
    CHECK(spew(logp, good, len) == 0);
    char *longline = malloc(40001);
    memset(longline, 'a', 40000);
    longline[40000] = '\0';
    CHECK(append_raw(logp, longline) == 0 && append_raw(logp, "\n") == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK_MSG("record 6 (line 6) is too long");
    CHECK_RC(scx_audit_append(dir, key, "logon", "mallory", "", &err), SOFTCXI_ETAMPER);
    free(longline);

    current = "a forged record out of sequence";
    /* Only the key holder can write a record that authenticates; a writer
     * bug that skipped a number is still caught. */
    CHECK(spew(logp, good, len) == 0);
    {
        uint8_t prev[32], mac[32], *buf = malloc(32 + 200);
        unsigned ml = 32;
        char line[200], hex[65];
        const char *last = good + l4;
        last += strlen(last) - 65; /* the fifth MAC, LF after it */
        for (int i = 0; i < 32; i++) {
            unsigned v;
            sscanf(last + 2 * i, "%2x", &v);
            prev[i] = (uint8_t)v;
        }
        int pl = snprintf(line, sizeof line, "7\t1700000000\tlogon\tx\t\t");
        memcpy(buf, prev, 32);
        memcpy(buf + 32, line, (size_t)pl);
        HMAC(EVP_sha256(), key, 32, buf, 32 + (size_t)pl, mac, &ml);
        scx_hex(hex, mac, 32);
        snprintf(line + pl, sizeof line - (size_t)pl, "%s\n", hex);
        CHECK(append_raw(logp, line) == 0);
        free(buf);
    }
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK(records == 5);
    CHECK_MSG("record 6 (line 6) is out of sequence: it says seq 7");

    /* Put the good state back for the tests that follow. */
    CHECK(spew(logp, good, len) == 0 && spew(cntp, goodc, clen) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == 5);
    free(good);
    free(goodc);
}

static void test_older_copy(void)
{
    current = "log replaced by an older copy";
    softcxi_error err;
    uint64_t records;
    char dir[700], logp[1024], cntp[1024], savedlog[1024], savedcnt[1024];
    mkdir_in(dir, sizeof dir, "older");
    path_in(logp, sizeof logp, dir, "audit.log");
    path_in(cntp, sizeof cntp, dir, "audit.count");
    snprintf(savedlog, sizeof savedlog, "%s/older-log", tmproot);
    snprintf(savedcnt, sizeof savedcnt, "%s/older-count", tmproot);

    for (int i = 0; i < 3; i++)
        CHECK_RC(scx_audit_append(dir, key, "mbk_import", "admin", "", &err), 0);
    CHECK(copy_file(savedlog, logp) == 0 && copy_file(savedcnt, cntp) == 0);
    for (int i = 0; i < 2; i++)
        CHECK_RC(scx_audit_append(dir, key, "key_revoke", "admin", "", &err), 0);
    CHECK(copy_file(logp, savedlog) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK(records == 3);
    CHECK_MSG("the last 2 records were cut off");

    CHECK_RC(scx_audit_append(dir, key, "x", "", "", &err), SOFTCXI_ETAMPER);

    current = "counter replaced by an older copy";
    /* 5 records against a counter of 3: the counter went back. */
    CHECK(unlink(logp) == 0 && unlink(cntp) == 0);
    for (int i = 0; i < 3; i++)
        CHECK_RC(scx_audit_append(dir, key, "mbk_import", "admin", "", &err), 0);
    CHECK(copy_file(savedcnt, cntp) == 0);
    for (int i = 0; i < 2; i++)
        CHECK_RC(scx_audit_append(dir, key, "key_revoke", "admin", "", &err), 0);
    CHECK(copy_file(cntp, savedcnt) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), SOFTCXI_ETAMPER);
    CHECK(records == 5);
    CHECK_MSG("older copy");
    CHECK_RC(scx_audit_append(dir, key, "x", "", "", &err), SOFTCXI_ETAMPER);

    current = "crash between the log and the counter";
    /* The log one record ahead of the counter, the record chaining onto the
     * sealed MAC: what a crash after the log's fsync leaves.  Accepted, and
     * the next append catches the counter up. */
    CHECK(unlink(logp) == 0 && unlink(cntp) == 0);
    for (int i = 0; i < 3; i++)
        CHECK_RC(scx_audit_append(dir, key, "a", "", "", &err), 0);
    CHECK(copy_file(savedcnt, cntp) == 0);
    CHECK_RC(scx_audit_append(dir, key, "b", "", "", &err), 0);
    CHECK(copy_file(cntp, savedcnt) == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == 4);
    CHECK_RC(scx_audit_append(dir, key, "c", "", "", &err), 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == 5);

    current = "crash in the middle of a write";
    /* A torn line (no LF) is no record: skipped, then dropped by the next
     * append. */
    CHECK(append_raw(logp, "6\t17000000") == 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == 5);
    got g = {0};
    CHECK_RC(scx_audit_read(dir, key, collect, &g, &err), 0);
    CHECK(g.n == 5);
    got_free(&g);
    CHECK_RC(scx_audit_append(dir, key, "d", "", "", &err), 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == 6);
    size_t len;
    char *log = slurp(logp, &len);
    CHECK(log && count_lines(log) == 6 && log[len - 1] == '\n' && !strstr(log, "17000000"));
    free(log);

    current = "crash before the first record";
    char dir2[700];
    mkdir_in(dir2, sizeof dir2, "empty");
    path_in(logp, sizeof logp, dir2, "audit.log");
    CHECK(spew(logp, "", 0) == 0);
    CHECK_RC(scx_audit_verify(dir2, key, &records, &err), 0);
    CHECK(records == 0);
    CHECK_RC(scx_audit_append(dir2, key, "init", "admin", NULL, &err), 0);
    CHECK_RC(scx_audit_verify(dir2, key, &records, &err), 0);
    CHECK(records == 1);
}

static void test_inputs(void)
{
    current = "inputs";
    softcxi_error err;
    uint64_t records;
    char dir[700], missing[800];
    mkdir_in(dir, sizeof dir, "inputs");
    snprintf(missing, sizeof missing, "%s/no-such-dir", tmproot);

    CHECK_RC(scx_audit_append(NULL, key, "e", "", "", &err), SOFTCXI_EINVAL);
    CHECK_RC(scx_audit_append(dir, NULL, "e", "", "", &err), SOFTCXI_EINVAL);
    CHECK_RC(scx_audit_append(dir, key, NULL, "", "", &err), SOFTCXI_EINVAL);
    CHECK_RC(scx_audit_append(dir, key, "", "", "", &err), SOFTCXI_EINVAL);
    CHECK_RC(scx_audit_append(missing, key, "e", "", "", &err), SOFTCXI_ENOTFOUND);
    CHECK_RC(scx_audit_verify(missing, key, &records, &err), SOFTCXI_ENOTFOUND);
    CHECK_RC(scx_audit_read(dir, key, NULL, NULL, &err), SOFTCXI_EINVAL);
    CHECK_RC(scx_audit_append(dir, key, "e", "", "", NULL), 0); /* err may be NULL */

    char *big = malloc(1026);
    memset(big, 0x01, 1025); /* the worst case: every byte escaped */
    big[1025] = '\0';
    CHECK_RC(scx_audit_append(dir, key, "e", big, "", &err), SOFTCXI_EINVAL);
    CHECK_MSG("subject is longer than 1024 bytes");
    CHECK_RC(scx_audit_append(dir, key, "e", "", big, &err), SOFTCXI_EINVAL);
    CHECK_RC(scx_audit_append(dir, key, big, "", "", &err), SOFTCXI_EINVAL);
    big[1024] = '\0';
    CHECK_RC(scx_audit_append(dir, key, big, big, big, &err), 0);
    CHECK_RC(scx_audit_append(dir, key, "after", NULL, NULL, &err), 0);

    got g = {0};
    CHECK_RC(scx_audit_read(dir, key, collect, &g, &err), 0);
    CHECK(g.n == 3);
    if (g.n == 3) {
        CHECK(strcmp(g.detail[1], big) == 0 && strcmp(g.event[1], big) == 0);
        CHECK(strcmp(g.subject[2], "") == 0 && strcmp(g.detail[2], "") == 0);
    }
    got_free(&g);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == 3);
    CHECK_RC(scx_audit_verify(dir, key, NULL, &err), 0); /* records may be NULL */
    free(big);
}

static void test_concurrent(void)
{
    current = "two processes append at once";
    softcxi_error err;
    uint64_t records;
    char dir[700];
    mkdir_in(dir, sizeof dir, "concurrent");
    pid_t pids[2];
    for (int c = 0; c < 2; c++) {
        pids[c] = fork();
        if (pids[c] == 0) {
            char detail[16];
            softcxi_error e;
            for (int i = 0; i < 50; i++) {
                snprintf(detail, sizeof detail, "%d", i);
                if (scx_audit_append(dir, key, "logon", c ? "proc-b" : "proc-a", detail, &e) != 0) {
                    fprintf(stderr, "child %d: %s\n", c, e.msg);
                    _exit(1);
                }
            }
            _exit(0);
        }
        CHECK(pids[c] > 0);
    }
    for (int c = 0; c < 2; c++) {
        int status = 0;
        CHECK(waitpid(pids[c], &status, 0) == pids[c] && WIFEXITED(status) &&
              WEXITSTATUS(status) == 0);
    }
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == 100);
    got g = {0};
    CHECK_RC(scx_audit_read(dir, key, collect, &g, &err), 0);
    CHECK(g.n == 100);
    int seq_ok = 1, order_ok = 1, next[2] = {0, 0};
    for (size_t i = 0; i < g.n && i < MAXREC; i++) {
        seq_ok &= g.seq[i] == i + 1;
        int c = strcmp(g.subject[i], "proc-b") == 0;
        order_ok &= atoi(g.detail[i]) == next[c]++;
    }
    CHECK(seq_ok);
    CHECK(order_ok && next[0] == 50 && next[1] == 50);
    got_free(&g);
}

/* A log written from the format description alone (the test's own HMACs):
 * audit.c must accept it, and appending to a large one reads only its tail. */
static void test_foreign_large(void)
{
    current = "a large log written from the spec";
    softcxi_error err;
    uint64_t records;
    char dir[700], logp[1024], cntp[1024];
    mkdir_in(dir, sizeof dir, "large");
    path_in(logp, sizeof logp, dir, "audit.log");
    path_in(cntp, sizeof cntp, dir, "audit.count");
    const uint64_t n = 20000;
    FILE *f = fopen(logp, "wb");
    uint8_t prev[32] = {0}, buf[32 + 256];
    unsigned ml = 32;
    char line[256], hex[65];
    int ok = f != NULL;
    for (uint64_t i = 1; ok && i <= n; i++) {
        int pl = snprintf(line, sizeof line,
                          "%" PRIu64 "\t%" PRId64 "\tkey_revoke\tadmin\tkey #%" PRIu64 "\\n(rev)\t",
                          i, (int64_t)1700000000 + (int64_t)i, i);
        memcpy(buf, prev, 32);
        memcpy(buf + 32, line, (size_t)pl);
        HMAC(EVP_sha256(), key, 32, buf, 32 + (size_t)pl, prev, &ml);
        scx_hex(hex, prev, 32);
        ok = fprintf(f, "%s%s\n", line, hex) > 0;
    }
    CHECK(ok && f && fclose(f) == 0);
    uint8_t cnt[72], in[22 + 40];
    for (int i = 0; i < 8; i++)
        cnt[i] = (uint8_t)(n >> (56 - 8 * i));
    memcpy(cnt + 8, prev, 32);
    memcpy(in, "softcxi/v1/audit-count", 22);
    memcpy(in + 22, cnt, 40);
    HMAC(EVP_sha256(), key, 32, in, sizeof in, cnt + 40, &ml);
    CHECK(spew(cntp, (const char *)cnt, sizeof cnt) == 0);

    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == n);
    CHECK_RC(scx_audit_append(dir, key, "logon", "admin", "after the import", &err), 0);
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    CHECK(records == n + 1);
    got g = {0};
    g.stop_after = 2;
    CHECK_RC(scx_audit_read(dir, key, collect, &g, &err), 7);
    CHECK(g.n == 2 && g.time[1] == 1700000002 && strcmp(g.detail[1], "key #2\n(rev)") == 0);
    got_free(&g);
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

/* Not a check: what an append costs with its fsyncs, and a verify. */
static void measure(void)
{
    current = "measure";
    softcxi_error err;
    uint64_t records;
    char dir[700];
    mkdir_in(dir, sizeof dir, "measure");
    const int n = 200;
    CHECK_RC(scx_audit_append(dir, key, "warm-up", "", "", &err), 0);
    double t0 = now_us();
    for (int i = 0; i < n; i++)
        CHECK_RC(scx_audit_append(dir, key, "logon", "operator-7", "success, level 1", &err), 0);
    double t1 = now_us();
    CHECK_RC(scx_audit_verify(dir, key, &records, &err), 0);
    double t2 = now_us();
    CHECK(records == (uint64_t)n + 1);
    printf("append: %.0f us each (3 fsyncs), verify: %.1f us per record\n", (t1 - t0) / n,
           (t2 - t1) / (n + 1));
}

int main(void)
{
    const char *base = getenv("SOFTCXI_TEST_TMP");
    snprintf(tmproot, sizeof tmproot, "%s/test_audit.%ld", base ? base : "/tmp", (long)getpid());
    char cmd[700], dir[700];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", tmproot);
    if (system(cmd) != 0)
        return 2;

    mkdir_in(dir, sizeof dir, "main");
    test_roundtrip(dir);
    test_format(dir);
    test_tamper(dir);
    test_older_copy();
    test_inputs();
    test_concurrent();
    test_foreign_large();
    measure();

    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmproot);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmproot);
    printf("%d checks passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
