/*
 * check.h - the few lines every C test program shares: counters and CHECK
 * macros that report the file, line, current test and expression.  Each
 * program ends by printing "N checks passed, N failed".
 */
#ifndef SOFTCXI_CHECK_H
#define SOFTCXI_CHECK_H

#include <stdio.h>

#include "softcxi.h"

static int passed, failed;
static const char *current;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (cond) {                                                                      \
            passed++;                                                                    \
        } else {                                                                         \
            failed++;                                                                    \
            fprintf(stderr, "FAIL %s:%d [%s]: %s\n", __FILE__, __LINE__, current, #cond); \
        }                                                                                \
    } while (0)

/* expr must return want; msg (a string) is printed on failure. */
#define CHECK_RC_MSG(expr, want, msg)                                                    \
    do {                                                                                 \
        int rc_ = (expr);                                                                \
        if (rc_ == (want)) {                                                             \
            passed++;                                                                    \
        } else {                                                                         \
            failed++;                                                                    \
            fprintf(stderr, "FAIL %s:%d [%s]: %s = %s (%s), want %s\n", __FILE__,        \
                    __LINE__, current, #expr, softcxi_code_name(rc_), (msg),             \
                    softcxi_code_name(want));                                            \
        }                                                                                \
    } while (0)

#endif
