/*
 * fuzz_audit.c - libFuzzer target for the audit log's text lines and its
 * sealed counter (audit.c: rec_split, rec_fields, unescape, parse_num, the
 * tail window, count_load), through scx_audit_read, scx_audit_verify and
 * scx_audit_append.  A line is split and its MAC field decoded before the
 * MAC is checked; the numbers and escapes are parsed after.
 *
 * Input: mode byte, then the log.
 *   mode & 1       re-MAC every line that has a TAB: whatever follows its
 *                  last TAB is replaced by the right MAC for the chain so
 *                  far, so the parser behind the MAC check sees the line;
 *   mode >> 1 & 3  the counter: 0 none, 1 sealed for all the lines,
 *                  2 sealed for one line fewer (a crash between the two
 *                  writes), 3 the mode's 72 bytes after the log as given.
 * Read and verify must agree on a good chain; an append either refuses
 * with a message or leaves a log that verifies.
 */
#include "fuzz_util.h"

#include <openssl/hmac.h>

#define MAC_LEN 32
static const uint8_t audit_key[32] = "softcxi fuzz audit key 32 bytes";

static void hex(char *out, const uint8_t *in, size_t n)
{
    for (size_t i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", in[i]);
}

static int on_record(void *ctx, uint64_t seq, int64_t t, const char *event, const char *subject,
                     const char *detail)
{
    uint64_t *n = ctx;
    (void)t;
    if (seq != ++*n || !event[0])
        __builtin_trap();
    fz_check_str(event, SCX_AUDIT_FIELD_MAX);
    fz_check_str(subject, SCX_AUDIT_FIELD_MAX);
    fz_check_str(detail, SCX_AUDIT_FIELD_MAX);
    return 0;
}

/* The counter file: count || last || HMAC(key, label || count || last). */
static void seal_count(uint8_t out[72], uint64_t count, const uint8_t last[MAC_LEN])
{
    uint8_t msg[22 + 8 + MAC_LEN];
    unsigned int n = MAC_LEN;
    for (int i = 0; i < 8; i++)
        out[i] = (uint8_t)(count >> (56 - 8 * i));
    memcpy(out + 8, last, MAC_LEN);
    memcpy(msg, "softcxi/v1/audit-count", 22);
    memcpy(msg + 22, out, 8 + MAC_LEN);
    (void)HMAC(EVP_sha256(), audit_key, 32, msg, sizeof msg, out + 8 + MAC_LEN, &n);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > (1u << 20) || !fz_dir())
        return 0;
    static char dir[600], log[640], cnt[640];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/audit", fz_root);
        snprintf(log, sizeof log, "%s/audit.log", dir);
        snprintf(cnt, sizeof cnt, "%s/audit.count", dir);
        (void)mkdir(dir, 0700);
    }
    unsigned mode = data[0], counter = mode >> 1 & 3;
    const char *in = (const char *)data + 1;
    size_t in_len = size - 1;
    uint8_t raw_count[72];
    if (counter == 3) {
        if (in_len < 72)
            return 0;
        memcpy(raw_count, in + in_len - 72, 72);
        in_len -= 72;
    }
    /* Each line may grow by 64 hex digits. */
    char *out = malloc(in_len + 65 * (in_len + 1));
    if (!out)
        return 0;
    size_t o = 0, lines = 0;
    uint8_t prev[MAC_LEN] = {0}, before[MAC_LEN] = {0};
    for (size_t pos = 0; pos < in_len;) {
        const char *line = in + pos, *nl = memchr(line, '\n', in_len - pos);
        size_t ll = nl ? (size_t)(nl - line) : in_len - pos;
        const char *tab = memrchr(line, '\t', ll);
        if ((mode & 1) && nl && tab) {
            size_t keep = (size_t)(tab - line) + 1;
            uint8_t mac[MAC_LEN];
            unsigned int mlen = MAC_LEN;
            uint8_t *msg = malloc(MAC_LEN + keep);
            if (!msg)
                break;
            memcpy(msg, prev, MAC_LEN);
            memcpy(msg + MAC_LEN, line, keep);
            (void)HMAC(EVP_sha256(), audit_key, 32, msg, MAC_LEN + keep, mac, &mlen);
            free(msg);
            memcpy(out + o, line, keep), o += keep;
            hex(out + o, mac, MAC_LEN), o += 2 * MAC_LEN;
            memcpy(before, prev, MAC_LEN);
            memcpy(prev, mac, MAC_LEN);
        } else {
            memcpy(out + o, line, ll), o += ll;
        }
        if (nl) {
            out[o++] = '\n';
            lines++;
        }
        pos += ll + (nl ? 1 : 0);
    }
    int ok = fz_write(log, (const uint8_t *)out, o) == 0;
    free(out);
    uint8_t c[72];
    (void)unlink(cnt);
    if (counter == 1 || (counter == 2 && lines > 0)) {
        seal_count(c, counter == 1 ? lines : lines - 1, counter == 1 ? prev : before);
        ok = ok && fz_write(cnt, c, sizeof c) == 0;
    } else if (counter == 3) {
        ok = ok && fz_write(cnt, raw_count, sizeof raw_count) == 0;
    }
    if (!ok)
        return 0;

    softcxi_error err;
    uint64_t n = 0, records = 0;
    int r = fz_trace("audit_read", scx_audit_read(dir, audit_key, on_record, &n, &err), &err);
    int v = fz_trace("audit_verify", scx_audit_verify(dir, audit_key, &records, &err), &err);
    if (v == 0 && (r != 0 || records != n))
        __builtin_trap(); /* verify passed what read refused */
    if (scx_audit_append(dir, audit_key, "fuzz", "subject\twith\ttabs", "detail\n", &err) == 0) {
        uint64_t after = 0;
        if (scx_audit_verify(dir, audit_key, &after, &err) != 0 && v == 0)
            __builtin_trap(); /* an append broke a log that verified */
    } else if (err.code == 0 || !err.msg[0]) {
        __builtin_trap();
    }
    return 0;
}
