/*
 * fuzz_keydb.c - libFuzzer target for keys.db, the internal key database
 * (keydb.c).  Its 48-byte header (magic .. generation .. payload length) is
 * read before the tag is checked, and again on every call to see whether
 * the file changed; the payload's entries are parsed after.
 *
 * Input: mode byte, then the rest.
 *   mode & 3 == 0  the rest is keys.db as it lies on disk;
 *   mode & 3 == 1  the first 8 bytes are the generation, the rest the
 *                  plaintext payload, sealed here under the storage key;
 *   mode & 3 == 2  as 0, but handed to scx_keydb_import (a restore) on a
 *                  database opened from a valid empty file;
 *   mode & 3 == 3  as 1, then as 2.
 * An opened database must list exactly as many entries as it counts, each
 * with a bounded address; a failed open leaves nothing behind (the leak
 * checker sees to that).
 */
#include "fuzz_util.h"

#define HDR 48

static const uint8_t storage_key[32] = "softcxi fuzz storage key 32 byte";

static int on_entry(void *ctx, const char *g, const char *n, uint32_t spec, int has_spec,
                    const uint8_t *blob, size_t blob_len)
{
    (void)spec;
    (*(size_t *)ctx)++;
    fz_check_str(g, 255);
    fz_check_str(n, 255);
    if (!n[0] || (has_spec != 0 && has_spec != 1) || !blob || !blob_len)
        __builtin_trap();
    return 0;
}

/* An image as keydb.c writes it: the 48-byte header, payload, tag. */
static uint8_t *seal_image(size_t *len, const uint8_t gen[8], const uint8_t *pt, size_t plen)
{
    static const uint8_t salt[SCX_SALT_LEN] = "softcxi-fuzz-keydb-salt";
    uint8_t *img = OPENSSL_malloc(HDR + plen + SCX_TAG_LEN);
    EVP_CIPHER_CTX *gcm = EVP_CIPHER_CTX_new();
    scx_xaes x;
    int ok = img && gcm && scx_xaes_init(&x, storage_key) == 0;
    if (ok) {
        img[0] = SCX_MAGIC, img[1] = SCX_VERSION, img[2] = SCX_TYPE_KEYDB, img[3] = 0;
        ok = scx_kcv(img + 4, storage_key) == 0;
        memcpy(img + 12, salt, SCX_SALT_LEN);
        memcpy(img + 36, gen, 8);
        for (int i = 0; i < 4; i++)
            img[44 + i] = (uint8_t)(plen >> (24 - 8 * i));
        ok = ok && scx_xaes_seal(&x, gcm, img + HDR, img + HDR + plen, salt, img, HDR, pt,
                                 plen) == 0;
        scx_xaes_clear(&x);
    }
    EVP_CIPHER_CTX_free(gcm);
    if (!ok) {
        OPENSSL_free(img);
        return NULL;
    }
    *len = HDR + plen + SCX_TAG_LEN;
    return img;
}

static void try_open(const char *dir)
{
    scx_keydb *db = NULL;
    softcxi_error err;
    if (fz_trace("keydb_open", scx_keydb_open(&db, dir, storage_key, 0, &err), &err) != 0) {
        if (db || err.code == 0 || !err.msg[0])
            __builtin_trap();
        return;
    }
    size_t n = 0, used = scx_keydb_used(db);
    if (scx_keydb_list(db, on_entry, &n, &err) != 0 || (n == 0) != (used == 0))
        __builtin_trap();
    /* Unchanged file: the 48-byte header peek says so. */
    if (scx_keydb_reload(db, &err) != 0 || scx_keydb_used(db) != used)
        __builtin_trap();
    scx_keydb_free(db);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || !fz_dir())
        return 0;
    static char dir[600], file[640], rdir[600], rfile[640];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/keydb", fz_root);
        snprintf(file, sizeof file, "%s/keys.db", dir);
        snprintf(rdir, sizeof rdir, "%s/keydb-restore", fz_root);
        snprintf(rfile, sizeof rfile, "%s/keys.db", rdir);
        (void)mkdir(dir, 0700);
        (void)mkdir(rdir, 0700);
    }
    unsigned mode = data[0] & 3;
    uint8_t *img = NULL;
    const uint8_t *file_bytes = data + 1;
    size_t len = size - 1;
    if (mode & 1) {
        if (size < 9)
            return 0;
        img = seal_image(&len, data + 1, data + 9, size - 9);
        if (!img)
            return 0;
        file_bytes = img;
    }
    if (fz_write(file, file_bytes, len) == 0)
        try_open(dir);
    if (mode & 2) {
        /* A restore: the image is checked before it replaces anything. */
        static const uint8_t zero_gen[8] = {0, 0, 0, 0, 0, 0, 0, 1};
        static const uint8_t empty[4] = {0};
        size_t elen;
        uint8_t *e = seal_image(&elen, zero_gen, empty, sizeof empty);
        scx_keydb *db = NULL;
        softcxi_error err;
        if (e && fz_write(rfile, e, elen) == 0 &&
            scx_keydb_open(&db, rdir, storage_key, 0, &err) == 0) {
            if (fz_trace("keydb_import", scx_keydb_import(db, file_bytes, len, &err), &err) == 0)
                try_open(rdir);
            else if (scx_keydb_used(db) != 0)
                __builtin_trap(); /* a refused image changed nothing */
            scx_keydb_free(db);
        }
        OPENSSL_free(e);
    }
    OPENSSL_free(img);
    return 0;
}
