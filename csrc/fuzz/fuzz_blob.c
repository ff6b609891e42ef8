/*
 * fuzz_blob.c - libFuzzer target for the blob parser and everything that
 * reads a blob: clear attributes, public key encodings, and opening it
 * on a device (frame, KCV, tag, key shape).  Inputs starting with 'I' reach
 * the internal key handle parser the same way (seeds handle*.bin).  The
 * same input also goes to the public JWK reader (seeds jwk-*.json) and to
 * the key database payload reader behind restore_database (seed
 * payload.bin): both take bytes from outside.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Icsrc/core \
 *       csrc/fuzz/fuzz_blob.c csrc/core/\*.c -lcrypto -o fuzz_blob
 *   ./fuzz_blob csrc/fuzz/corpus/blob   (better: csrc/fuzz/run-fuzz.sh, on a copy)
 *
 * Without libFuzzer, replay.c runs the corpus through the same function
 * (a ctest), so every seed and every crash found stays a regression test.
 */
#include "internal.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static softcxi_session *session(void)
{
    static softcxi_session *s;
    if (!s) {
        /* The MBK of the blob_v1.txt vectors, so the seeds open for real. */
        uint8_t mbk[32];
        softcxi_device *dev;
        softcxi_error err;
        for (int i = 0; i < 32; i++)
            mbk[i] = (uint8_t)i;
        if (scx_device_new_mem(&dev, mbk, 16, &err) != 0)
            return NULL;
        s = softcxi_session_new(dev);
        softcxi_device_free(dev);
    }
    return s;
}

static int entry_seen(void *ctx, const char *group, const char *name, uint32_t spec, int has,
                      const uint8_t *blob, size_t blob_len)
{
    (void)ctx, (void)spec, (void)has, (void)blob;
    /* Entries are checked before any is handed out: names are C strings,
     * a name is never empty and a blob never is. */
    if (!name[0] || strlen(group) > 255 || strlen(name) > 255 || !blob_len)
        __builtin_trap();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    softcxi_key_info info;
    softcxi_error err;
    softcxi_buf out = {0};
    softcxi_session *s = session();

    if (softcxi_key_info_read(&info, data, size, &err) == 0) {
        /* Every pointer the parser hands out lies inside the input. */
        if ((info.name && (info.name < (const char *)data ||
                           info.name + info.name_len > (const char *)data + size)) ||
            (info.pub && (info.pub < data || info.pub + info.pub_len > data + size)))
            __builtin_trap();
        for (int fmt = SOFTCXI_PUB_DER; fmt <= SOFTCXI_PUB_RAW; fmt++) {
            if (softcxi_public_key_read(&out, data, size, fmt, &err) == 0)
                softcxi_buf_free(&out);
        }
    }
    if (scx_jwk_to_spki(&out, data, size, &err) == 0)
        softcxi_buf_free(&out);
    if (scx_keydb_parse(data, size, "fuzz input", entry_seen, NULL, &err) != 0 && !err.msg[0])
        __builtin_trap(); /* every refusal says why */
    if (s) {
        softcxi_sign_req r = {data, size, SOFTCXI_MECH_ECDSA_SHA256, 0, (const uint8_t *)"m", 1};
        if (softcxi_sign(s, &out, &r) == 0)
            softcxi_buf_free(&out);
        if (softcxi_key_info_check(s, &info, data, size) == 0 && !info.verified)
            __builtin_trap();
        if (softcxi_key_delete(s, data, size) == 0) /* an in-memory device has no keys */
            __builtin_trap();
    }
    return 0;
}
