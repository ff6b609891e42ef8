/*
 * fuzz_devkey.c - libFuzzer target for the files softcxi_device_open reads
 * first: the device key file (device.c: load_keyfile, 44 bytes) and the
 * sealed MBKs it unlocks (device.mbk: read_state, unseal_state,
 * scx_mbk_set).
 *
 * Input: mode byte, then the rest.
 *   mode % 3 == 0  the rest is the device key file;
 *   mode % 3 == 1  the rest is device.mbk as it lies on disk;
 *   mode % 3 == 2  byte 1 is the attribute block's length A, then A bytes
 *                  of attributes and the MBK payload, sealed here under the
 *                  real device key, as init and mbk_import write it.
 * An open either fails with a message or gives a device whose id is 32 hex
 * digits.
 */
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    softcxi_session *s = fz_device();
    if (!s || size < 1)
        return 0;
    softcxi_device *real = softcxi_session_device(s);
    static char dir[600], state[640], keyfile[640];
    static uint8_t rest_key[32], devkcv[SCX_KCV_LEN];
    if (!dir[0]) {
        /* A second state directory: the fuzzed device.mbk goes there, the
         * real device stays as it is. */
        snprintf(dir, sizeof dir, "%s/device2", fz_root);
        snprintf(state, sizeof state, "%s/device.mbk", dir);
        snprintf(keyfile, sizeof keyfile, "%s/fuzzed.key", fz_root);
        (void)mkdir(dir, 0700);
        memcpy(rest_key, real->sec->rest_key, 32);
        memcpy(devkcv, real->devkcv, SCX_KCV_LEN);
    }
    unsigned mode = data[0] % 3;
    uint8_t *sealed = NULL;
    const uint8_t *file = data + 1;
    size_t len = size - 1;
    const char *use_dir = real->path, *use_key = keyfile;
    if (mode == 2) {
        if (size < 2 || (size_t)data[1] > size - 2)
            return 0;
        size_t alen = data[1];
        sealed = fz_seal(&len, SCX_TYPE_DEVICE_MBK, rest_key, devkcv, data + 2, alen,
                         data + 2 + alen, size - 2 - alen);
        if (!sealed)
            return 0;
        file = sealed;
    }
    if (mode != 0) {
        use_dir = dir;
        use_key = real->keyfile;
    }
    if (fz_write(mode == 0 ? keyfile : state, file, len) == 0) {
        softcxi_device *dev = NULL;
        softcxi_error err;
        softcxi_open_req op = {use_dir, use_key, 0, 0};
        if (fz_trace("device_open", softcxi_device_open(&dev, &op, &err), &err) == 0) {
            const char *id = softcxi_device_id(dev);
            if (strlen(id) != 32 || strspn(id, "0123456789abcdef") != 32)
                __builtin_trap();
            softcxi_device_free(dev);
        } else if (dev || err.code == 0 || !err.msg[0]) {
            __builtin_trap();
        }
    }
    OPENSSL_free(sealed);
    return 0;
}
