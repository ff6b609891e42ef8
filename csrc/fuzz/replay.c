/*
 * replay.c - runs fuzz inputs through LLVMFuzzerTestOneInput without
 * libFuzzer: every file of the given directories, then every truncation and
 * single-byte change of each (cheap, deterministic mutation coverage).
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static size_t run_file(const char *path)
{
    uint8_t buf[1 << 16];
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    size_t runs = 0;
    LLVMFuzzerTestOneInput(buf, n), runs++;
    for (size_t len = 0; len < n; len++)
        LLVMFuzzerTestOneInput(buf, len), runs++;
    for (size_t i = 0; i < n; i++) {
        uint8_t keep = buf[i];
        static const uint8_t vals[] = {0x00, 0xFF, 0x80, 0x7F};
        for (size_t v = 0; v < sizeof vals; v++) {
            buf[i] = vals[v] == keep ? (uint8_t)(keep ^ 1) : vals[v];
            LLVMFuzzerTestOneInput(buf, n), runs++;
        }
        buf[i] = keep;
    }
    return runs;
}

int main(int argc, char **argv)
{
    size_t files = 0, runs = 0;
    for (int i = 1; i < argc; i++) {
        DIR *d = opendir(argv[i]);
        if (!d) {
            runs += run_file(argv[i]);
            files++;
            continue;
        }
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.')
                continue;
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", argv[i], e->d_name);
            runs += run_file(path);
            files++;
        }
        closedir(d);
    }
    printf("replayed %zu inputs (%zu runs)\n", files, runs);
    return files ? 0 : 1;
}
