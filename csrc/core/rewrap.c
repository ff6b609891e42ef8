/*
 * rewrap.c - re-sealing a batch of blobs under the current MBK on worker
 * threads (softcxi_key_rewrap_many): a page of a store's rewrap in one call.
 *
 * Each blob gets exactly what softcxi_key_rewrap would give it one by one:
 * the checks that need the session (frame, access to its group, which MBK
 * opens it) run first in the calling thread, in order; the part that costs
 * (open, new salt, seal) runs on up to `threads` workers that take blobs a
 * few at a time from a shared counter, as bulk_generate's do.  A worker
 * works on copies of the device's sealing contexts (an EVP_CIPHER_CTX is
 * not shared between threads) and never touches the device or the session;
 * the calling thread is worker 0 and uses the device's own.  The opened
 * key lives in secure memory inside scx_rewrap_seal and is wiped there,
 * whatever happens.
 */
#include "internal.h"

#include <openssl/crypto.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* Blobs a worker takes from the shared counter at a time (~3 us each). */
#define REWRAP_CHUNK 16

/* A blob that passed the checks: its frame, and which MBK opens it (-1:
 * the current one, else dev->old[from]). */
typedef struct job {
    scx_frame f;
    softcxi_key_info info;
    size_t idx; /* its position in the caller's arrays */
    int from;
} job;

typedef struct rworker {
    pthread_t thread;
    int started;
    /* contexts: the device's own for worker 0, copies for the others */
    scx_xaes own[1 + SCX_MAX_OLD_MBKS];
    scx_xaes *cur, *old[SCX_MAX_OLD_MBKS];
    int nowned;
    EVP_CIPHER_CTX *gcm;
    scx_rndpool *pool;
    const uint8_t *kcv;
    /* the shared work */
    const job *jobs;
    size_t njobs, *next;
    const uint8_t *const *blobs;
    const size_t *lens;
    softcxi_buf *outs;
    int *status;
    /* the first blob this worker failed, for the call's message */
    size_t failed_idx;
    int failed;
    softcxi_error err;
} rworker;

static void *rworker_run(void *arg)
{
    rworker *w = arg;
    softcxi_error err = {0, {0}};
    for (;;) {
        size_t i = __atomic_fetch_add(w->next, REWRAP_CHUNK, __ATOMIC_RELAXED);
        if (i >= w->njobs)
            break;
        size_t end = i + REWRAP_CHUNK < w->njobs ? i + REWRAP_CHUNK : w->njobs;
        for (; i < end; i++) {
            const job *j = &w->jobs[i];
            size_t k = j->idx;
            int changed = 0;
            int rc = scx_rewrap_seal(&w->outs[k], &changed, &j->f, &j->info, w->blobs[k],
                                     w->lens[k], j->from < 0 ? w->cur : w->old[j->from], w->cur,
                                     w->kcv, w->gcm, w->pool, &err);
            if (rc == 0 && !changed)
                softcxi_buf_free(&w->outs[k]); /* "current": nothing to hand back */
            w->status[k] = rc ? rc : changed;
            if (rc && (!w->failed || k < w->failed_idx)) {
                w->failed = 1, w->failed_idx = k;
                w->err = err;
            }
        }
    }
    return NULL;
}

/* Copies of the device's contexts that worker w needs (used[m]: an MBK
 * some blob is under; 0 the current one, 1 + k dev->old[k]).  0 or
 * SOFTCXI_ECRYPTO / ENOMEM. */
static int rworker_setup(rworker *w, softcxi_device *dev, const int *used)
{
    if (!(w->gcm = EVP_CIPHER_CTX_new()) || !(w->pool = OPENSSL_zalloc(sizeof *w->pool)))
        return SOFTCXI_ENOMEM;
    if (scx_xaes_dup(&w->own[w->nowned], &dev->xblob) != 0)
        return SOFTCXI_ECRYPTO;
    w->cur = &w->own[w->nowned++];
    for (int k = 0; k < dev->nold; k++) {
        if (!used[1 + k])
            continue;
        if (scx_xaes_dup(&w->own[w->nowned], &dev->old[k].x) != 0)
            return SOFTCXI_ECRYPTO;
        w->old[k] = &w->own[w->nowned++];
    }
    return 0;
}

static void rworker_free(rworker *w)
{
    for (int i = 0; i < w->nowned; i++)
        scx_xaes_clear(&w->own[i]);
    w->nowned = 0;
    EVP_CIPHER_CTX_free(w->gcm);
    if (w->pool)
        OPENSSL_clear_free(w->pool, sizeof *w->pool);
    w->gcm = NULL, w->pool = NULL;
}

/* Record blob idx's failure (message in e) as the call's first when it is. */
static void note_failure(int *failed, size_t *first, softcxi_error *keep, size_t idx,
                         const softcxi_error *e)
{
    if (*failed && *first < idx)
        return;
    *failed = 1, *first = idx;
    *keep = *e;
}

int softcxi_key_rewrap_many(softcxi_session *s, softcxi_buf *outs, int *status,
                            const uint8_t *const *blobs, const size_t *lens, size_t n,
                            unsigned threads)
{
    softcxi_device *dev = s->dev;
    rworker ws[SOFTCXI_BULK_MAX_THREADS];
    int used[1 + SCX_MAX_OLD_MBKS] = {0};
    int failed = 0;
    size_t first = 0, njobs = 0, next = 0;
    softcxi_error first_err = {0, {0}};

    memset(outs, 0, n * sizeof *outs);
    memset(status, 0, n * sizeof *status);
    int rc = scx_device_sync(s);
    if (rc)
        return rc;
    if (n == 0) {
        scx_ok(&s->err);
        return 0;
    }
    job *jobs = n <= SIZE_MAX / sizeof *jobs ? OPENSSL_malloc(n * sizeof *jobs) : NULL;
    if (!jobs)
        return scx_fail(&s->err, SOFTCXI_ENOMEM, "key_rewrap_many: out of memory");

    /* The checks, in order, in this thread: they read the session. */
    for (size_t i = 0; i < n; i++) {
        int changed = 0;
        if (lens[i] > 0 && blobs[i][0] == 0x49) {
            /* an internal key: rewrapped where it is stored, one by one */
            rc = scx_internal_rewrap(s, &outs[i], blobs[i], lens[i], &changed);
            if (rc == 0 && !changed)
                softcxi_buf_free(&outs[i]);
        } else {
            job *j = &jobs[njobs];
            scx_xaes *from;
            rc = scx_rewrap_check(s, &j->f, &j->info, &from, blobs[i], lens[i], 1);
            if (rc == 0) {
                int k = -1;
                for (int m = 0; m < dev->nold; m++)
                    if (from == &dev->old[m].x)
                        k = m;
                j->idx = i, j->from = k;
                used[k + 1] = 1;
                njobs++;
                continue;
            }
        }
        status[i] = rc ? rc : changed;
        if (rc)
            note_failure(&failed, &first, &first_err, i, &s->err);
    }

    /* The sealing, on worker threads. */
    if (threads == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cpus > 0 ? (unsigned)cpus : 1;
    }
    if (threads > SOFTCXI_BULK_MAX_THREADS)
        threads = SOFTCXI_BULK_MAX_THREADS;
    /* a worker for less than a chunk or two would cost more than it saves */
    size_t enough = (njobs + 2 * REWRAP_CHUNK - 1) / (2 * REWRAP_CHUNK);
    if (threads > enough)
        threads = enough ? (unsigned)enough : 1;
    for (unsigned t = 0; t < threads; t++) {
        rworker *w = &ws[t];
        memset(w, 0, sizeof *w);
        w->jobs = jobs, w->njobs = njobs, w->next = &next;
        w->blobs = blobs, w->lens = lens, w->outs = outs, w->status = status;
        w->kcv = dev->kcv;
    }
    ws[0].cur = &dev->xblob, ws[0].gcm = dev->gcm, ws[0].pool = &dev->pool;
    for (int k = 0; k < dev->nold; k++)
        ws[0].old[k] = &dev->old[k].x;
    /* Copies are made here, before any worker runs: nothing reads a device
     * context while another thread uses it.  A worker that cannot be set
     * up or started does not run; the others take its share. */
    for (unsigned t = 1; t < threads; t++) {
        if (rworker_setup(&ws[t], dev, used) == 0)
            ws[t].started = pthread_create(&ws[t].thread, NULL, rworker_run, &ws[t]) == 0;
        if (!ws[t].started)
            rworker_free(&ws[t]);
    }
    rworker_run(&ws[0]);
    for (unsigned t = 0; t < threads; t++) {
        if (t > 0 && ws[t].started) {
            pthread_join(ws[t].thread, NULL);
            rworker_free(&ws[t]);
        }
        if (ws[t].failed)
            note_failure(&failed, &first, &first_err, ws[t].failed_idx, &ws[t].err);
        OPENSSL_cleanse(&ws[t].err, sizeof ws[t].err);
    }
    OPENSSL_free(jobs);
    /* The call itself succeeded; the session's message says which blob
     * failed first, for a caller that wants more than its code. */
    if (failed) {
        scx_fail(&s->err, first_err.code, "key_rewrap_many: blob %zu: %s", first + 1,
                 first_err.msg);
        return 0;
    }
    scx_ok(&s->err);
    return 0;
}
