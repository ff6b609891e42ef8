/*
 * fuzz_backup.c - libFuzzer target for key backup images (key_backup's
 * output, type 0x02), through softcxi_key_restore: the frame, the MBK it
 * names, the tag, then the sealed address and the stored blob inside,
 * which is rewrapped and stored as an internal key.
 *
 * Input: mode byte, then the rest.
 *   mode & 1 == 0  the rest is a backup image as a user would hand it in;
 *   mode & 1 == 1  byte 1 is the attribute block's length A, then A bytes
 *                  of attributes and the payload (group, name, specifier,
 *                  blob), sealed here under the backup key of the device's
 *                  MBK, the vectors' one, so a seed can carry a real blob.
 * A restore either fails with a message or gives a handle that opens.
 */
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    softcxi_session *s = fz_device();
    if (!s || size < 1)
        return 0;
    softcxi_device *dev = softcxi_session_device(s);
    static uint8_t bkey[32];
    static int have_key;
    if (!have_key) {
        if (scx_label_key(bkey, dev->sec->mbk, SCX_LABEL_KEY_BACKUP) != 0)
            return 0;
        have_key = 1;
    }
    uint8_t *sealed = NULL;
    const uint8_t *img = data + 1;
    size_t len = size - 1;
    if (data[0] & 1) {
        if (size < 2 || (size_t)data[1] > size - 2)
            return 0;
        size_t alen = data[1];
        sealed = fz_seal(&len, SCX_TYPE_KEY_BACKUP, bkey, dev->kcv, data + 2, alen,
                         data + 2 + alen, size - 2 - alen);
        if (!sealed)
            return 0;
        img = sealed;
    }
    softcxi_buf h = {0};
    if (fz_trace("key_restore", softcxi_key_restore(s, &h, SOFTCXI_FLAG_OVERWRITE, img, len),
                 softcxi_session_error(s)) == 0) {
        softcxi_key_info info;
        if (!h.data || h.data[0] != 'I' || softcxi_key_info_check(s, &info, h.data, h.len) != 0)
            __builtin_trap();
        if (softcxi_key_delete(s, h.data, h.len) != 0)
            __builtin_trap();
        softcxi_buf_free(&h);
    } else {
        const softcxi_error *e = softcxi_session_error(s);
        if (h.data || e->code == 0 || !e->msg[0])
            __builtin_trap();
    }
    OPENSSL_free(sealed);
    return 0;
}
