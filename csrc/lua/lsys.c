/*
 * lsys.c - softcxi.sys, the few POSIX calls the file key store needs and
 * plain Lua lacks: durable writes (temp file, fsync, rename, fsync of the
 * directory), a group commit for many files, exclusive creation, flock,
 * mkdir -p, directory listing, stat.
 *
 * One source for Lua 5.4 and LuaJIT (5.1 API through compat-5.3); no liblua
 * linked.  Policy (layout, ids, the index) lives in lua/softcxi/store/file.lua;
 * this file only moves bytes to disk in an order that survives a crash:
 *
 *   1. every new file is written to a unique temp name in its final directory
 *      ("." prefix, ".tmp" suffix: the store never mistakes it for a blob);
 *   2. all of them are flushed in one sync pass (fsync each, or one syncfs
 *      for a large batch) together with the index markers that go with them;
 *   3. they are renamed into place (renameat2 RENAME_NOREPLACE when the name
 *      must be new, so creating an existing name fails instead of replacing);
 *   4. every directory touched is fsynced once (or one more syncfs).
 *
 * A crash before 3 leaves only temp files; after 3 a name points at a file
 * whose data was already durable, so no reader ever sees a torn blob.
 *
 * It also lets a long job (the CLI's provision and rewrap) stop cleanly on
 * Ctrl-C: trap_signals() turns SIGINT/SIGTERM into a flag the job polls
 * between batches, so a batch is never cut in the middle.
 *
 * Runtime failures return nil, message, code: the message names the path
 * and carries strerror; code is "ENOTFOUND" (ENOENT), "EEXIST", "EBUSY" (a
 * lock held elsewhere) or "EIO" (anything else).  Misuse raises.
 */
#define _GNU_SOURCE /* syncfs, renameat2 */
#include <lauxlib.h>
#include <lua.h>
#if LUA_VERSION_NUM < 502
#include "compat-5.3.h"
#endif

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

#define LOCK_MT "softcxi.sys.lock"
#define DIR_MT "softcxi.sys.dir"

/* A batch at least this large is flushed with one syncfs() rather than one
 * fsync() per file: on ext4 that is one journal commit for the batch instead
 * of one per file.  syncfs() flushes the whole filesystem (other writers'
 * dirty data too) and reports writeback errors only since Linux 5.8: the
 * store's sync = "fsync" option avoids it. */
#define SYNCFS_MIN 8

/* A batch of at least this many files makes its temp files and markers on
 * two threads (the kernel's open/write/link per file is most of a batch's
 * CPU, and the machines this runs on have two cores or more); a smaller one
 * is not worth a thread. */
#ifndef SOFTCXI_THREAD_MIN
#define SOFTCXI_THREAD_MIN 16
#endif
#define THREAD_MIN SOFTCXI_THREAD_MIN

/* ---- errors ------------------------------------------------------------- */

typedef struct syserr {
    int errnum;
    char msg[4096 + 256]; /* a path of PATH_MAX and strerror */
} syserr;

static int fail(syserr *e, const char *op, const char *path)
{
    e->errnum = errno;
    snprintf(e->msg, sizeof e->msg, "%s %s: %s", op, path, strerror(e->errnum));
    return -1;
}

static const char *code_of(int errnum)
{
    switch (errnum) {
    case ENOENT:
        return "ENOTFOUND";
    case EEXIST:
        return "EEXIST";
    case EWOULDBLOCK:
        return "EBUSY";
    default:
        return "EIO";
    }
}

static int push_fail(lua_State *L, const syserr *e)
{
    lua_pushnil(L);
    lua_pushstring(L, e->msg);
    lua_pushstring(L, code_of(e->errnum));
    return 3;
}

static int push_errno(lua_State *L, const char *op, const char *path)
{
    syserr e;
    fail(&e, op, path);
    return push_fail(L, &e);
}

/* ---- small POSIX helpers -------------------------------------------------- */

static int write_all(int fd, const char *p, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

static int close_keep_errno(int fd)
{
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

/* Length of the directory part of path ("a/b/c" -> 3, "c" -> 0). */
static size_t dir_len(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return 0;
    return slash == path ? 1 : (size_t)(slash - path);
}

static int fsync_dir(const char *dir, syserr *e)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return fail(e, "open", dir);
    if (fsync(fd) != 0) {
        fail(e, "fsync", dir);
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

/* fsync the directory holding path (dlen bytes of it, 0 = "."). */
static int fsync_parent(const char *path, size_t dlen, syserr *e)
{
    char dir[4096];
    if (dlen == 0) {
        dir[0] = '.';
        dir[1] = '\0';
    } else {
        if (dlen >= sizeof dir) {
            errno = ENAMETOOLONG;
            return fail(e, "fsync", path);
        }
        memcpy(dir, path, dlen);
        dir[dlen] = '\0';
    }
    return fsync_dir(dir, e);
}

/* Directories a commit created, whose parents it must fsync before it
 * places anything: fsyncing them there, after the files' data, rather than
 * at each mkdir lets one journal commit cover the new directories and the
 * files (on ext4 with a journal an fsync finds the rest already committed);
 * a young store's put creates up to three. */
typedef struct dirlog {
    char **dirs;
    size_t n, cap;
} dirlog;

/* Remember dir; -1 when out of memory (the caller then fsyncs at once). */
static int log_dir(dirlog *log, const char *dir)
{
    if (log->n == log->cap) {
        size_t cap = log->cap ? 2 * log->cap : 8;
        char **d = realloc(log->dirs, cap * sizeof *d);
        if (!d)
            return -1;
        log->dirs = d, log->cap = cap;
    }
    char *copy = strdup(dir);
    if (!copy)
        return -1;
    log->dirs[log->n++] = copy;
    return 0;
}

static void log_free(dirlog *log)
{
    for (size_t i = 0; i < log->n; i++)
        free(log->dirs[i]);
    free(log->dirs);
    log->dirs = NULL, log->n = log->cap = 0;
}

/* mkdir -p of the first len bytes of path.  With durable, every directory
 * created is made durable by an fsync of its parent, so a file put in it
 * survives (a caller that ends with syncfs() passes 0) -- at once, or, with
 * a log, by the caller before it relies on it (see dirlog). */
static int mkdir_p(const char *path, size_t len, mode_t mode, int durable, dirlog *log,
                   syserr *e)
{
    char buf[4096];
    struct stat st;
    if (len == 0 || len >= sizeof buf) {
        errno = ENAMETOOLONG;
        return fail(e, "mkdir", path);
    }
    memcpy(buf, path, len);
    buf[len] = '\0';
    if (stat(buf, &st) == 0 && S_ISDIR(st.st_mode))
        return 0;
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        char c = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, mode) == 0) {
            if (durable && !(log && log_dir(log, buf) == 0) &&
                fsync_parent(buf, dir_len(buf), e) != 0)
                return -1;
        } else if (errno != EEXIST) {
            return fail(e, "mkdir", buf);
        } else if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) {
            errno = ENOTDIR;
            return fail(e, "mkdir", buf);
        }
        buf[i] = c;
    }
    return 0;
}

/* open(2) that creates missing parent directories on ENOENT; -2 when
 * that fails (e filled), else open's result with errno. */
static int open_mkdir(const char *path, int flags, int durable, dirlog *log, syserr *e)
{
    int fd = open(path, flags, 0600);
    if (fd < 0 && errno == ENOENT && dir_len(path) > 0) {
        if (mkdir_p(path, dir_len(path), 0700, durable, log, e) != 0)
            return -2;
        fd = open(path, flags, 0600);
    }
    return fd;
}

/* Move tmp to path; with exclusive, fail with EEXIST when path exists
 * (renameat2 RENAME_NOREPLACE, or link + unlink where that is missing). */
static int place(const char *tmp, const char *path, int exclusive, syserr *e)
{
    if (!exclusive) {
        if (rename(tmp, path) != 0)
            return fail(e, "rename", path);
        return 0;
    }
#ifdef RENAME_NOREPLACE
    if (renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE) == 0)
        return 0;
    if (errno != EINVAL && errno != ENOSYS)
        return fail(e, "create", path);
#endif
    if (link(tmp, path) != 0)
        return fail(e, "create", path);
    unlink(tmp);
    return 0;
}

/* ---- the commit: write, one sync pass, place, fsync directories ---------- */

typedef struct entry {
    const char *path;
    const char *data;
    size_t len;
    char *tmp;    /* temp name (files); NULL for markers */
    int fd;       /* open while the batch is fsynced file by file */
    int created;  /* the temp file or marker was created by this call */
    int excl;     /* the path must not exist (placed with NOREPLACE) */
    const char *link; /* markers: a hard link to this file, not a file of their own */
    size_t link_idx;  /* markers: 1-based, a hard link to that file's temp file */
} entry;

/* shared by the threads of a batch: every temp name is unique */
static unsigned long tmp_counter;

static unsigned long next_tmp(void)
{
    return __atomic_add_fetch(&tmp_counter, 1, __ATOMIC_RELAXED);
}

/* Create a unique temp file beside en->path, named ".<base>.<pid>.<n>.tmp":
 * the leading dot and the suffix keep it out of every store listing.
 * Fills en->tmp (tmpcap bytes) and en->fd. */
static int open_tmp(entry *en, size_t tmpcap, int durable, dirlog *log, syserr *e)
{
    const char *slash = strrchr(en->path, '/');
    const char *base = slash ? slash + 1 : en->path;
    int dlen = (int)(base - en->path); /* the directory part, slash included */
    int blen = (int)strlen(base);
    if (blen > 64) /* keep the temp name under NAME_MAX */
        blen = 64;
    for (int tries = 0; tries < 100; tries++) {
        int n = snprintf(en->tmp, tmpcap, "%.*s.%.*s.%ld.%lu.tmp", dlen, en->path, blen, base,
                         (long)getpid(), next_tmp());
        if (n < 0 || (size_t)n >= tmpcap) {
            errno = ENAMETOOLONG;
            return fail(e, "create", en->path);
        }
        en->fd = open_mkdir(en->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, durable, log, e);
        if (en->fd >= 0) {
            en->created = 1;
            return 0;
        }
        if (en->fd == -2)
            return -1;
        if (errno != EEXIST)
            return fail(e, "create", en->tmp);
    }
    return fail(e, "create", en->path);
}

/* Create marker en->path with its data unless it exists (then leave it). */
static int open_marker(entry *en, int durable, dirlog *log, syserr *e)
{
    en->fd = open_mkdir(en->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, durable, log, e);
    if (en->fd >= 0) {
        en->created = 1;
        return 0;
    }
    if (en->fd == -2)
        return -1;
    en->fd = -1;
    if (errno == EEXIST)
        return 0;
    return fail(e, "create", en->path);
}

/* A hard link at path to src, creating missing parent directories; -2 when
 * that fails (e filled), else link's result with errno. */
static int link_mkdir(const char *src, const char *path, int durable, dirlog *log,
                      syserr *e)
{
    int r = link(src, path);
    if (r != 0 && errno == ENOENT && dir_len(path) > 0) {
        if (mkdir_p(path, dir_len(path), 0700, durable, log, e) != 0)
            return -2;
        r = link(src, path);
    }
    return r;
}

/* Make marker en->path a hard link to src: a directory entry, no inode of
 * its own (on ext4 without a journal, allocating inodes is most of what a
 * put costs).  An existing marker is replaced through a temp link and a
 * rename, so it never goes missing and never keeps an older blob alive. */
static int link_marker(entry *en, const char *src, int durable, dirlog *log, syserr *e)
{
    int r = link_mkdir(src, en->path, durable, log, e);
    if (r == -2)
        return -1;
    if (r == 0) {
        en->created = 1;
        return 0;
    }
    if (errno != EEXIST)
        return fail(e, "link", en->path);
    char tmp[4096 + 96];
    size_t dl = dir_len(en->path);
    const char *base = dl ? en->path + dl + 1 : en->path;
    int blen = (int)strlen(base);
    if (blen > 64)
        blen = 64;
    for (int tries = 0; tries < 100; tries++) {
        int n = snprintf(tmp, sizeof tmp, "%.*s%s.%.*s.%ld.%lu.tmp", (int)dl, en->path,
                         dl ? "/" : "", blen, base, (long)getpid(), next_tmp());
        if (n < 0 || (size_t)n >= sizeof tmp) {
            errno = ENAMETOOLONG;
            return fail(e, "link", en->path);
        }
        if (link(src, tmp) == 0) {
            if (rename(tmp, en->path) != 0) {
                fail(e, "rename", en->path);
                unlink(tmp);
                return -1;
            }
            en->created = 1;
            return 0;
        }
        if (errno != EEXIST)
            return fail(e, "link", tmp);
    }
    return fail(e, "link", en->path);
}

static int cmp_dirs(const void *a, const void *b)
{
    const char *pa = *(const char *const *)a, *pb = *(const char *const *)b;
    size_t la = dir_len(pa), lb = dir_len(pb);
    size_t m = la < lb ? la : lb;
    int c = memcmp(pa, pb, m);
    if (c)
        return c;
    return la < lb ? -1 : la > lb;
}

/* fsync each distinct directory among paths[0..n) (sorted in place). */
static int fsync_dirs(const char **paths, size_t n, syserr *e)
{
    qsort(paths, n, sizeof *paths, cmp_dirs);
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && cmp_dirs(&paths[i - 1], &paths[i]) == 0)
            continue;
        if (fsync_parent(paths[i], dir_len(paths[i]), e) != 0)
            return -1;
    }
    return 0;
}

/* One syncfs of the filesystem holding path's directory. */
static int syncfs_at(const char *path, syserr *e)
{
    char dir[4096];
    size_t dl = dir_len(path);
    if (dl == 0 || dl >= sizeof dir) {
        dir[0] = '.';
        dl = 1;
    } else {
        memcpy(dir, path, dl);
    }
    dir[dl] = '\0';
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return fail(e, "open", dir);
    if (syncfs(fd) != 0) {
        fail(e, "syncfs", dir);
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

static int close_fd(entry *en, syserr *e, int failed)
{
    if (en->fd < 0)
        return 0;
    int r = close(en->fd);
    en->fd = -1;
    if (r != 0 && !failed)
        return fail(e, "close", en->tmp ? en->tmp : en->path);
    return 0;
}

/* Step 1 of a commit for one share of a batch: files [wlo, whi) and the
 * markers that go with them (those linking to one of these files; share 0
 * also takes the markers that link to nothing or to a path). */
typedef struct share {
    entry *w, *m;
    size_t nw, nm, wlo, whi;
    int first, use_syncfs;
    size_t tmpcap;
    int *stop; /* set by a share that failed: the other stops early */
    dirlog *log; /* directories this share created (fsync path) */
    int failed;
    syserr e;
} share;

static int mine(const share *sh, const entry *mk)
{
    if (mk->link_idx == 0)
        return sh->first;
    return mk->link_idx - 1 >= sh->wlo && mk->link_idx - 1 < sh->whi;
}

static int stopped(const share *sh)
{
    return __atomic_load_n(sh->stop, __ATOMIC_RELAXED);
}

static void *write_share(void *arg)
{
    share *sh = arg;
    entry *w = sh->w, *m = sh->m;
    syserr *e = &sh->e;
    int failed = 0;
    size_t i;
    e->errnum = 0;
    for (i = sh->wlo; i < sh->whi && !failed && !stopped(sh); i++) {
        if (open_tmp(&w[i], sh->tmpcap, !sh->use_syncfs, sh->log, e) != 0)
            failed = 1;
        else if (write_all(w[i].fd, w[i].data, w[i].len) != 0) {
            fail(e, "write", w[i].tmp);
            failed = 1;
        }
        if (sh->use_syncfs && close_fd(&w[i], e, failed) != 0)
            failed = 1;
    }
    for (i = 0; i < sh->nm && !failed && !stopped(sh); i++) {
        if (!mine(sh, &m[i]))
            continue;
        if (m[i].link_idx > 0 || m[i].link) {
            const char *src = m[i].link ? m[i].link : w[m[i].link_idx - 1].tmp;
            if (link_marker(&m[i], src, !sh->use_syncfs, sh->log, e) != 0)
                failed = 1;
            continue;
        }
        if (open_marker(&m[i], !sh->use_syncfs, sh->log, e) != 0)
            failed = 1;
        else if (m[i].fd >= 0 && write_all(m[i].fd, m[i].data, m[i].len) != 0) {
            fail(e, "write", m[i].path);
            failed = 1;
        }
        if (sh->use_syncfs && close_fd(&m[i], e, failed) != 0)
            failed = 1;
    }
    if (failed)
        __atomic_store_n(sh->stop, 1, __ATOMIC_RELAXED);
    sh->failed = failed;
    return NULL;
}

/* Step 1: every temp file written, every marker made.  A batch of
 * THREAD_MIN files or more is split in two halves, the second made on a
 * helper thread (all signals blocked in it, so a signal meant for the
 * process -- nginx's, the CLI's Ctrl-C -- still reaches the caller's
 * thread); if the thread cannot start, the caller does both.  Nothing is
 * placed in this step, so the order in which the two halves finish does
 * not matter.  Returns 1 on failure (e filled). */
static int write_phase(entry *w, size_t nw, entry *m, size_t nm, int use_syncfs, size_t tmpcap,
                       dirlog logs[2], syserr *e)
{
    int stop = 0;
    share sh[2];
    size_t half = nw >= THREAD_MIN ? nw / 2 : nw;
    for (int k = 0; k < 2; k++) {
        sh[k].w = w, sh[k].m = m, sh[k].nw = nw, sh[k].nm = nm;
        sh[k].wlo = k ? half : 0, sh[k].whi = k ? nw : half;
        sh[k].first = k == 0;
        sh[k].use_syncfs = use_syncfs, sh[k].tmpcap = tmpcap;
        sh[k].stop = &stop, sh[k].failed = 0;
        sh[k].log = &logs[k];
        sh[k].e.errnum = 0;
    }
    pthread_t helper;
    int threaded = 0;
    if (half < nw) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        threaded = pthread_create(&helper, NULL, write_share, &sh[1]) == 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    write_share(&sh[0]);
    if (threaded)
        pthread_join(helper, NULL);
    else if (half < nw && !sh[0].failed)
        write_share(&sh[1]);
    for (int k = 0; k < 2; k++)
        if (sh[k].failed) {
            *e = sh[k].e;
            return 1;
        }
    return 0;
}

/*
 * Commit nw whole-file writes and nm markers (small files created only if
 * absent: the store's index entries).  Returns the number of files placed;
 * on failure fills e (e->errnum != 0) and stops at the first file that
 * could not be placed: those before it are placed and durable, none after.
 * Markers are durable before any file is placed.  dirs: room for nw + nm
 * pointers.
 *
 * Small batches fsync file by file; from SYNCFS_MIN files on (or when asked)
 * one syncfs() flushes them all -- and every fd is closed as soon as it is
 * written, so a batch never holds more than one descriptor open.
 */
static size_t commit(entry *w, size_t nw, entry *m, size_t nm, int exclusive, int sync_mode,
                     const char **dirs, size_t tmpcap, syserr *e)
{
    size_t i, placed = 0, nd = 0;
    int failed = 0;
    int use_syncfs = sync_mode == 2 || (sync_mode == 0 && nw + nm >= SYNCFS_MIN);
    e->errnum = 0;

    for (i = 0; i < nw; i++)
        w[i].fd = -1, w[i].created = 0;
    for (i = 0; i < nm; i++)
        m[i].fd = -1, m[i].created = 0;

    /* 1. write every temp file and every new marker (on two threads for a
     * large batch) */
    dirlog logs[2] = {{NULL, 0, 0}, {NULL, 0, 0}};
    failed = write_phase(w, nw, m, nm, use_syncfs, tmpcap, logs, e);

    /* 2. one sync pass: file data, new markers and their directory entries */
    if (!failed && nw + nm > 0) {
        if (use_syncfs) {
            if (syncfs_at(nw ? w[0].path : m[0].path, e) != 0)
                failed = 1;
        } else {
            for (i = 0; i < nw && !failed; i++)
                if (fsync(w[i].fd) != 0) {
                    fail(e, "fsync", w[i].tmp);
                    failed = 1;
                }
            /* an empty marker has no data to flush: its directory entry
             * (fsynced below) is all there is */
            for (i = 0; i < nm && !failed; i++)
                if (m[i].fd >= 0 && m[i].len > 0 && fsync(m[i].fd) != 0) {
                    fail(e, "fsync", m[i].path);
                    failed = 1;
                }
            for (i = 0; i < nm; i++)
                if (m[i].created)
                    dirs[nd++] = m[i].path;
            if (!failed && nd > 0 && fsync_dirs(dirs, nd, e) != 0)
                failed = 1;
            /* the directories step 1 created: their parents */
            for (int k = 0; k < 2 && !failed; k++)
                if (logs[k].n > 0 && fsync_dirs((const char **)logs[k].dirs, logs[k].n, e) != 0)
                    failed = 1;
        }
    }
    log_free(&logs[0]);
    log_free(&logs[1]);
    for (i = 0; i < nw; i++)
        if (close_fd(&w[i], e, failed) != 0)
            failed = 1;
    for (i = 0; i < nm; i++)
        close_fd(&m[i], e, 1);

    /* 3. place the files, in order, stopping at the first that cannot be */
    for (i = 0; i < nw && !failed; i++) {
        if (place(w[i].tmp, w[i].path, exclusive || w[i].excl, e) != 0)
            failed = 1;
        else
            placed++;
    }
    for (i = placed; i < nw; i++)
        if (w[i].created)
            unlink(w[i].tmp);

    /* 4. one fsync per directory holding a placed file */
    if (placed > 0) {
        syserr de;
        int r;
        if (use_syncfs) {
            r = syncfs_at(w[0].path, &de);
        } else {
            for (i = 0, nd = 0; i < placed; i++)
                dirs[nd++] = w[i].path;
            r = fsync_dirs(dirs, nd, &de);
        }
        if (r != 0) {
            /* the names may not survive a crash: confirm none */
            if (!failed)
                *e = de;
            return 0;
        }
    }
    return placed;
}

/* ---- Lua: writes ------------------------------------------------------------ */

static int sync_mode_opt(lua_State *L, int idx)
{
    static const char *const modes[] = {"auto", "fsync", "syncfs", NULL};
    return luaL_checkoption(L, idx, "auto", modes);
}

/* Read { {path, data}, ... } at idx into a fresh entry array (a userdata
 * pushed on the stack, so a raise frees it); with_tmp, room for each temp
 * name follows the entries and *tmpcap is its size.  data may be omitted
 * (an empty file). */
static entry *check_entries(lua_State *L, int idx, size_t *n, size_t *tmpcap, int with_tmp,
                            size_t nfiles)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    size_t count = (size_t)lua_rawlen(L, idx), maxpath = 0;
    for (size_t i = 0; i < count; i++) {
        lua_rawgeti(L, idx, (int)(i + 1)); /* int: the 5.1 API */
        if (!lua_istable(L, -1))
            luaL_error(L, "sys: entry %d must be a table { path, data }", (int)(i + 1));
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, 2);
        if (lua_type(L, -2) != LUA_TSTRING ||
            (lua_type(L, -1) != LUA_TSTRING && (with_tmp || !lua_isnil(L, -1))))
            luaL_error(L, "sys: entry %d must be { path, data } (strings)", (int)(i + 1));
        size_t plen = lua_rawlen(L, -2);
        if (plen > maxpath)
            maxpath = plen;
        lua_pop(L, 3);
    }
    *tmpcap = with_tmp ? maxpath + 96 : 0;
    entry *es = lua_newuserdata(L, count ? count * (sizeof(entry) + *tmpcap) : 1);
    char *bufs = (char *)(es + count);
    for (size_t i = 0; i < count; i++) {
        lua_rawgeti(L, idx, (int)(i + 1));
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, 2);
        /* the strings stay referenced by the caller's table for the call */
        es[i].path = lua_tostring(L, -2);
        es[i].len = 0;
        es[i].data = lua_isnil(L, -1) ? "" : lua_tolstring(L, -1, &es[i].len);
        es[i].tmp = with_tmp ? bufs + i * *tmpcap : NULL;
        es[i].fd = -1;
        es[i].link = NULL;
        es[i].link_idx = 0;
        lua_rawgeti(L, -3, 3);
        es[i].excl = with_tmp && lua_toboolean(L, -1);
        if (!with_tmp && lua_type(L, -1) == LUA_TNUMBER) {
            lua_Integer j = lua_tointeger(L, -1);
            if (j < 1 || (size_t)j > nfiles)
                luaL_error(L, "sys: marker %d links to file %d of %d", (int)(i + 1), (int)j,
                           (int)nfiles);
            es[i].link_idx = (size_t)j;
        } else if (!with_tmp && lua_type(L, -1) == LUA_TSTRING) {
            es[i].link = lua_tostring(L, -1); /* referenced by the caller's table */
        } else if (!with_tmp && !lua_isnil(L, -1)) {
            luaL_error(L, "sys: marker %d: its third field links to a file (index or path)",
                       (int)(i + 1));
        }
        lua_pop(L, 4);
    }
    *n = count;
    return es;
}

static int write_one(lua_State *L, int exclusive)
{
    entry en;
    char tmp[4096];
    const char *dirs[1];
    syserr e;
    en.path = luaL_checkstring(L, 1);
    en.data = luaL_checklstring(L, 2, &en.len);
    en.tmp = tmp;
    en.excl = 0;
    int mode = sync_mode_opt(L, 3);
    if (commit(&en, 1, NULL, 0, exclusive, mode, dirs, sizeof tmp, &e) != 1)
        return push_fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

/* write_durable(path, data [, sync]) -> true | nil, msg, code */
static int l_write_durable(lua_State *L)
{
    return write_one(L, 0);
}

/* write_new(path, data [, sync]) -> true | nil, msg, "EEXIST" when path exists */
static int l_write_new(lua_State *L)
{
    return write_one(L, 1);
}

/*
 * write_durable_many({ {path, data [, new]}, ... } [, opts]) -> n | nil, msg, code, n_placed
 * new (or opts.exclusive for all): the path must not exist (EEXIST stops
 * the batch there);
 * opts.markers = { {path [, data [, link]]}, ... }: files created only if
 * absent, durable before any path is placed (the store's index entries);
 * with link (the index of one of the files above, or a path), the marker is
 * a hard link to that file instead, replacing whatever is at its path;
 * opts.sync = "auto" | "fsync" | "syncfs".  Missing directories are created.
 */
static int l_write_durable_many(lua_State *L)
{
    size_t nw, nm = 0, cap, mcap;
    int exclusive = 0, mode = 0;
    entry *m = NULL;
    lua_settop(L, 2); /* what check_entries pushes goes above the arguments */
    entry *w = check_entries(L, 1, &nw, &cap, 1, 0);
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_getfield(L, 2, "exclusive");
        exclusive = lua_toboolean(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, 2, "sync");
        if (!lua_isnil(L, -1))
            mode = sync_mode_opt(L, lua_gettop(L));
        lua_pop(L, 1);
        lua_getfield(L, 2, "markers"); /* stays on the stack: its strings are used */
        if (!lua_isnil(L, -1))
            m = check_entries(L, lua_gettop(L), &nm, &mcap, 0, nw);
    }
    const char **dirs = lua_newuserdata(L, (nw + nm + 1) * sizeof *dirs);
    syserr e;
    size_t placed = commit(w, nw, m, nm, exclusive, mode, dirs, cap, &e);
    if (e.errnum != 0) {
        push_fail(L, &e);
        lua_pushinteger(L, (lua_Integer)placed);
        return 4;
    }
    lua_pushinteger(L, (lua_Integer)placed);
    return 1;
}

/* ---- Lua: reads and the rest -------------------------------------------------- */

/* read(path [, offset [, len]]) -> data | nil, msg, code.  Past EOF: "". */
static int l_read(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lua_Integer off = luaL_optinteger(L, 2, 0);
    lua_Integer want = luaL_optinteger(L, 3, -1);
    luaL_argcheck(L, off >= 0, 2, "offset must be >= 0");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return push_errno(L, "open", path);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close_keep_errno(fd);
        return push_errno(L, "stat", path);
    }
    size_t size = st.st_size > off ? (size_t)(st.st_size - off) : 0;
    if (want >= 0 && (size_t)want < size)
        size = (size_t)want;
    /* The buffer is a userdata so a memory error cannot leak it; the fd is
     * closed before anything else that could raise. */
    char *buf = lua_newuserdata(L, size ? size : 1);
    size_t got = 0;
    while (got < size) {
        ssize_t r = pread(fd, buf + got, size - got, (off_t)off + (off_t)got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            close_keep_errno(fd);
            return push_errno(L, "read", path);
        }
        if (r == 0)
            break; /* the file shrank under us: return what is there */
        got += (size_t)r;
    }
    close(fd);
    lua_pushlstring(L, buf, got);
    return 1;
}

/* unlink(path [, durable]) -> true; with durable the directory is fsynced. */
static int l_unlink(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int durable = lua_toboolean(L, 2);
    if (unlink(path) != 0)
        return push_errno(L, "unlink", path);
    if (durable) {
        syserr e;
        if (fsync_parent(path, dir_len(path), &e) != 0)
            return push_fail(L, &e);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* rmdir(path) -> true | nil, msg, code */
static int l_rmdir(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    if (rmdir(path) != 0)
        return push_errno(L, "rmdir", path);
    lua_pushboolean(L, 1);
    return 1;
}

/* mkdir_p(path [, mode]) -> true; new directories are made durable. */
static int l_mkdir_p(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    mode_t mode = (mode_t)luaL_optinteger(L, 2, 0700);
    syserr e;
    if (mkdir_p(path, len, mode, 1, NULL, &e) != 0)
        return push_fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

/* The DIR of a listing lives in a userdata whose __gc closes it, so a
 * memory error while the names are pushed cannot leak it. */
typedef struct ldir {
    DIR *d;
} ldir;

static int dir_gc(lua_State *L)
{
    ldir *ld = luaL_checkudata(L, 1, DIR_MT);
    if (ld->d) {
        closedir(ld->d);
        ld->d = NULL;
    }
    return 0;
}

/* listdir(path [, prefix]) -> { name, ... } without "." and "..", in no
 * order; with prefix, only the names that start with it (the file store's
 * find by name: one match among a directory's entries, none of the others
 * made into a Lua string). */
static int l_listdir(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    size_t plen = 0;
    const char *prefix = luaL_optlstring(L, 2, NULL, &plen);
    ldir *ld = lua_newuserdata(L, sizeof *ld);
    ld->d = NULL;
    luaL_setmetatable(L, DIR_MT);
    lua_newtable(L);
    ld->d = opendir(path);
    if (!ld->d)
        return push_errno(L, "opendir", path);
    int n = 0;
    struct dirent *de;
    errno = 0;
    while ((de = readdir(ld->d)) != NULL) {
        const char *nm = de->d_name;
        if (nm[0] == '.' && (nm[1] == '\0' || (nm[1] == '.' && nm[2] == '\0')))
            continue;
        if (prefix && strncmp(nm, prefix, plen) != 0)
            continue;
        lua_pushstring(L, nm);
        lua_rawseti(L, -2, ++n);
        errno = 0;
    }
    int err = errno;
    closedir(ld->d);
    ld->d = NULL;
    if (err) {
        errno = err;
        return push_errno(L, "readdir", path);
    }
    return 1;
}

/* stat(path) -> { size =, mtime =, type = "file"|"dir"|"other" } | nil, msg, code */
static int l_stat(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    struct stat st;
    if (stat(path, &st) != 0)
        return push_errno(L, "stat", path);
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, (lua_Integer)st.st_size);
    lua_setfield(L, -2, "size");
    lua_pushinteger(L, (lua_Integer)st.st_mtime);
    lua_setfield(L, -2, "mtime");
    lua_pushstring(L, S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "dir" : "other");
    lua_setfield(L, -2, "type");
    return 1;
}

/* hash32(s) -> FNV-1a 32-bit of s (the store's fan-out bucket). */
static int l_hash32(lua_State *L)
{
    size_t len;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= s[i];
        h *= 16777619u;
    }
    lua_pushinteger(L, (lua_Integer)h);
    return 1;
}

/* monotonic() -> seconds (CLOCK_MONOTONIC, a float): wall time for the
 * benchmarks, where os.clock()'s CPU time misses the waits on the disk. */
static int l_monotonic(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

/* ---- clean stops ------------------------------------------------------- */

static volatile sig_atomic_t caught_signal;
static struct sigaction saved_int, saved_term;
static int trapped;

static void on_signal(int sig)
{
    caught_signal = sig;
}

/* trap_signals() -> true: from now on SIGINT and SIGTERM only set a flag
 * (interrupted() reads it) instead of stopping the process.  untrap_signals()
 * puts back the handlers that were there before. */
static int l_trap_signals(lua_State *L)
{
    if (!trapped) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGINT, &sa, &saved_int) != 0 || sigaction(SIGTERM, &sa, &saved_term) != 0)
            return push_errno(L, "sigaction", "SIGINT/SIGTERM");
        trapped = 1;
    }
    caught_signal = 0;
    lua_pushboolean(L, 1);
    return 1;
}

static int l_untrap_signals(lua_State *L)
{
    if (trapped) {
        sigaction(SIGINT, &saved_int, NULL);
        sigaction(SIGTERM, &saved_term, NULL);
        trapped = 0;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* interrupted() -> "SIGINT" | "SIGTERM" | false: the signal caught since
 * trap_signals(), if any. */
static int l_interrupted(lua_State *L)
{
    int sig = caught_signal;
    if (sig == SIGINT)
        lua_pushliteral(L, "SIGINT");
    else if (sig == SIGTERM)
        lua_pushliteral(L, "SIGTERM");
    else
        lua_pushboolean(L, 0);
    return 1;
}

/* isatty(fd) -> boolean */
static int l_isatty(lua_State *L)
{
    lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)) == 1);
    return 1;
}

/* ---- locks ---------------------------------------------------------------- */

typedef struct llock {
    int fd;     /* -1 once released */
    pid_t pid;  /* the process that took it */
    int ofd;    /* byte-range (open file description) locks, not flock */
} llock;

/* flock(path, "ex"|"sh" [, nowait]) -> lock | nil, msg, code ("EBUSY" with
 * nowait when another holder has it).  The lock file and its directories
 * are created if needed (not fsynced: a lock file holds nothing). */
static int l_flock(lua_State *L)
{
    static const char *const modes[] = {"ex", "sh", NULL};
    const char *path = luaL_checkstring(L, 1);
    int op = luaL_checkoption(L, 2, NULL, modes) == 0 ? LOCK_EX : LOCK_SH;
    if (lua_toboolean(L, 3))
        op |= LOCK_NB;
    llock *lk = lua_newuserdata(L, sizeof *lk);
    lk->fd = -1;
    lk->ofd = 0;
    luaL_setmetatable(L, LOCK_MT);
    syserr e;
    int fd = open_mkdir(path, O_RDWR | O_CREAT | O_CLOEXEC, 0, NULL, &e);
    if (fd == -2)
        return push_fail(L, &e);
    if (fd < 0)
        return push_errno(L, "open", path);
    while (flock(fd, op) != 0) {
        if (errno == EINTR)
            continue;
        close_keep_errno(fd);
        return push_errno(L, "flock", path);
    }
    lk->fd = fd;
    lk->pid = getpid();
    return 1;
}

/* One exclusive F_OFD_SETLK(W) lock on byte `slot` of fd (waits unless
 * nowait; EINTR retried). */
static int lock_slot(int fd, lua_Integer slot, int nowait)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)slot;
    fl.l_len = 1;
    while (fcntl(fd, nowait ? F_OFD_SETLK : F_OFD_SETLKW, &fl) != 0) {
        if (errno != EINTR) {
            if (errno == EAGAIN || errno == EACCES)
                errno = EWOULDBLOCK; /* "EBUSY", as flock's */
            return -1;
        }
    }
    return 0;
}

/*
 * lock_slots(path, { slot, ... } [, nowait]) -> lock | nil, msg, code ("EBUSY"
 * with nowait when another lock holds one of the slots: none is then held)
 * Exclusive locks on one byte per slot (0 <= slot < 2^31) of the file at
 * path, made if missing: any number of slots behind one descriptor, where
 * flock needs a file and a descriptor per lock (the file store locks the
 * buckets of a batch of thousands of ids this way).  The slots are locked
 * in increasing order, whatever the order given, so two callers never
 * deadlock; repeats are locked once.  Open file description locks
 * (F_OFD_SETLKW): owned by this lock object as flock's are, not by the
 * process as fcntl's classic locks (which any close of the file would drop).
 * :unlock() releases them all.
 */
static int cmp_slot(const void *a, const void *b)
{
    lua_Integer x = *(const lua_Integer *)a, y = *(const lua_Integer *)b;
    return x < y ? -1 : x > y;
}

static int l_lock_slots(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    int nowait = lua_toboolean(L, 3);
    size_t n = (size_t)lua_rawlen(L, 2);
    lua_Integer *slots = lua_newuserdata(L, (n ? n : 1) * sizeof *slots);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, 2, (int)(i + 1));
        int isnum = 0;
        lua_Integer v = lua_tointegerx(L, -1, &isnum);
        if (!isnum || v < 0 || v > 0x7fffffff)
            luaL_error(L, "sys.lock_slots: slot %d must be an integer in [0, 2^31)", (int)(i + 1));
        slots[i] = v;
        lua_pop(L, 1);
    }
    qsort(slots, n, sizeof *slots, cmp_slot);
    llock *lk = lua_newuserdata(L, sizeof *lk);
    lk->fd = -1;
    lk->ofd = 1;
    luaL_setmetatable(L, LOCK_MT);
    syserr e;
    int fd = open_mkdir(path, O_RDWR | O_CREAT | O_CLOEXEC, 0, NULL, &e);
    if (fd == -2)
        return push_fail(L, &e);
    if (fd < 0)
        return push_errno(L, "open", path);
    lk->fd = fd; /* from here a raise or a failure releases what is held */
    lk->pid = getpid();
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && slots[i] == slots[i - 1])
            continue;
        if (lock_slot(fd, slots[i], nowait) != 0) {
            int saved = errno;
            close(fd); /* drops the slots locked so far: this is their only descriptor */
            lk->fd = -1;
            errno = saved;
            return push_errno(L, "lock", path);
        }
    }
    return 1;
}

/* Release: LOCK_UN only in the process that locked (a forked child sharing
 * the descriptor must not drop its parent's lock), then close. */
static int lock_release(lua_State *L)
{
    llock *lk = luaL_checkudata(L, 1, LOCK_MT);
    if (lk->fd >= 0) {
        if (lk->pid == getpid()) {
            if (lk->ofd) {
                /* a forked child sharing the descriptor keeps the
                 * description open: unlock explicitly, as for flock */
                struct flock fl;
                memset(&fl, 0, sizeof fl);
                fl.l_type = F_UNLCK;
                fl.l_whence = SEEK_SET;
                fcntl(lk->fd, F_OFD_SETLK, &fl);
            } else {
                flock(lk->fd, LOCK_UN);
            }
        }
        close(lk->fd);
        lk->fd = -1;
    }
    return 0;
}

static int lock_unlock(lua_State *L)
{
    lock_release(L);
    lua_pushboolean(L, 1);
    return 1;
}

static int lock_tostring(lua_State *L)
{
    llock *lk = luaL_checkudata(L, 1, LOCK_MT);
    lua_pushstring(L, lk->fd >= 0 ? "softcxi.sys.lock (held)" : "softcxi.sys.lock (released)");
    return 1;
}

static const luaL_Reg lock_methods[] = {
    {"unlock", lock_unlock},
    {NULL, NULL},
};

static const luaL_Reg functions[] = {
    {"write_durable", l_write_durable},
    {"write_new", l_write_new},
    {"write_durable_many", l_write_durable_many},
    {"read", l_read},
    {"unlink", l_unlink},
    {"mkdir_p", l_mkdir_p},
    {"rmdir", l_rmdir},
    {"listdir", l_listdir},
    {"stat", l_stat},
    {"flock", l_flock},
    {"lock_slots", l_lock_slots},
    {"hash32", l_hash32},
    {"monotonic", l_monotonic},
    {"trap_signals", l_trap_signals},
    {"untrap_signals", l_untrap_signals},
    {"interrupted", l_interrupted},
    {"isatty", l_isatty},
    {NULL, NULL},
};

EXPORT int luaopen_softcxi_sys(lua_State *L);

EXPORT int luaopen_softcxi_sys(lua_State *L)
{
    luaL_newmetatable(L, LOCK_MT);
    lua_pushcfunction(L, lock_release);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, lock_release);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, lock_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, LOCK_MT);
    lua_setfield(L, -2, "__name");
    luaL_newlib(L, lock_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, DIR_MT);
    lua_pushcfunction(L, dir_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newlib(L, functions);
    return 1;
}
