/*
 * lhiredis.c - softcxi.hiredis, a thin blocking binding of hiredis (0.14+)
 * for the Redis key stores (lua/softcxi/store/redis.lua, redis_cluster.lua).
 *
 * One source for Lua 5.4 and LuaJIT (5.1 API through compat-5.3), never
 * linked against liblua.  It only moves bytes: commands are argv arrays,
 * written as RESP with explicit lengths (binary safe, no format strings);
 * replies come back as Lua values.  Routing, AUTH, reconnects and retries
 * are the Lua side's business.
 *
 *   local hiredis = require "softcxi.hiredis"
 *   local conn, msg, code = hiredis.connect("127.0.0.1", 6379, 2.0)
 *   local conn, msg, code = hiredis.connect_unix("/run/redis/redis.sock", 2.0)
 *   local v, msg, code = conn:command({ "SET", key, blob })
 *   conn:append({ "GET", k1 }); conn:append({ "GET", k2 })   -- a pipeline
 *   conn:flush()                           -- optional: send now, read later
 *   local v1 = conn:get_reply(); local v2 = conn:get_reply()
 *   conn:close()                                              -- also __gc/__close
 *
 * Reply mapping (docs/stores-redis.md):
 *   bulk string, status   -> string            ("OK", "QUEUED" are strings)
 *   integer               -> integer
 *   nil bulk / nil array  -> hiredis.null      (a light userdata; also inside arrays)
 *   array                 -> table 1..n        (nested as needed)
 *   error, top level      -> nil, "<Redis error text>", "EREDIS"
 *   error inside an array -> { err = "<Redis error text>" }   (EXEC, scripts)
 *   I/O or protocol error -> nil, "host:port: <reason>", "ECONN"; the
 *                            connection is dead from then on (reconnect in Lua)
 * Misuse (a closed connection, get_reply with nothing pending, a bad argv)
 * raises.
 */
#define _POSIX_C_SOURCE 200809L
#include <lauxlib.h>
#include <lua.h>
#if LUA_VERSION_NUM < 502
#include "compat-5.3.h"
#endif

#include <hiredis/hiredis.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/un.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "softcxi.h" /* SOFTCXI_VERSION_STRING only */

#define CONN_MT "softcxi.hiredis.conn"

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

typedef struct lconn {
    redisContext *c;
    int pending; /* appended commands whose replies are not read yet */
    char *buf;   /* scratch for formatting one command, reused */
    size_t cap;
} lconn;

/* The nil reply.  A light userdata is the same value in every Lua state
 * and compares equal to itself, like ngx.null in OpenResty. */
#define NULL_REPLY ((void *)0)

/* ---- SIGPIPE ------------------------------------------------------------ */

/* hiredis writes with write(2): writing to a peer that went away raises
 * SIGPIPE, whose default action kills the whole interpreter (or nginx
 * worker).  Around our own writes we block it and swallow one that we
 * caused, leaving the process's signal disposition alone (libcurl's way).
 * Writes happen only when the output buffer holds something, so pipelined
 * reads after the first pay nothing. */
typedef struct sigpipe_guard {
    sigset_t old;
    int active;          /* we blocked SIGPIPE and must restore the mask */
    int pending_already; /* a SIGPIPE was pending before: not ours to take */
} sigpipe_guard;

static void sigpipe_block(sigpipe_guard *g)
{
    sigset_t set, pending;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    g->active = 0;
    g->pending_already = 0;
    if (pthread_sigmask(SIG_BLOCK, &set, &g->old) != 0)
        return;
    if (sigismember(&g->old, SIGPIPE)) /* the caller blocks it already */
        return;
    g->active = 1;
    if (sigpending(&pending) == 0)
        g->pending_already = sigismember(&pending, SIGPIPE);
}

static void sigpipe_restore(sigpipe_guard *g)
{
    if (!g->active)
        return;
    if (!g->pending_already) {
        sigset_t set, pending;
        sigemptyset(&set);
        sigaddset(&set, SIGPIPE);
        if (sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE)) {
            struct timespec zero = {0, 0};
            (void)sigtimedwait(&set, NULL, &zero);
        }
    }
    pthread_sigmask(SIG_SETMASK, &g->old, NULL);
}

/* ---- helpers ------------------------------------------------------------ */

static struct timeval seconds_to_tv(double s)
{
    struct timeval tv;
    if (!(s > 0) || s > 86400.0 * 365)
        s = 86400.0 * 365; /* "no timeout" (NaN too): a year */
    double whole = floor(s);
    tv.tv_sec = (time_t)whole;
    tv.tv_usec = (suseconds_t)((s - whole) * 1e6);
    return tv;
}

static lconn *check_conn(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, CONN_MT);
    if (!lc->c)
        luaL_error(L, "softcxi.hiredis: the connection is closed");
    return lc;
}

/* nil, "host:port: reason", "ECONN" for a dead context. */
static int push_conn_error(lua_State *L, const redisContext *c)
{
    const char *why = c->errstr[0] ? c->errstr : "connection lost";
    /* hiredis reports a read or write timeout as strerror(EAGAIN) */
    if (c->err == REDIS_ERR_IO &&
        (!strcmp(why, strerror(EAGAIN)) || !strcmp(why, strerror(EWOULDBLOCK))))
        why = "timed out"; /* and the context is dead: a late reply would be misread */
    lua_pushnil(L);
    if (c->connection_type == REDIS_CONN_TCP && c->tcp.host)
        lua_pushfstring(L, "%s:%d: %s", c->tcp.host, c->tcp.port, why);
    else if (c->connection_type == REDIS_CONN_UNIX && c->unix_sock.path)
        lua_pushfstring(L, "unix:%s: %s", c->unix_sock.path, why);
    else
        lua_pushstring(L, why);
    lua_pushliteral(L, "ECONN");
    return 3;
}

/* Decimal digits of v, written backwards ending at end; returns the start. */
static char *put_uint(char *end, size_t v)
{
    do {
        *--end = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return end;
}

/* "*<argc>\r\n" then "$<len>\r\n<bytes>\r\n" per argument, as
 * redisAppendCommandArgv does, but into a buffer the connection keeps: hiredis
 * 0.14 formats through sdscatfmt and a fresh sds per command, which costs
 * more than the rest of a pipelined write. */
static int append_formatted(lconn *lc, int argc, const char **argv, const size_t *lens)
{
    size_t need = 1 + 20 + 2;
    for (int i = 0; i < argc; i++) {
        if (lens[i] > SIZE_MAX / 2 - need)
            return REDIS_ERR;
        need += 1 + 20 + 2 + lens[i] + 2;
    }
    if (need > lc->cap) {
        size_t cap = need < 4096 ? 4096 : need;
        char *nb = realloc(lc->buf, cap);
        if (!nb)
            return REDIS_ERR;
        lc->buf = nb;
        lc->cap = cap;
    }
    char num[24], *p = lc->buf, *d;
    *p++ = '*';
    d = put_uint(num + sizeof num, (size_t)argc);
    memcpy(p, d, (size_t)(num + sizeof num - d));
    p += num + sizeof num - d;
    *p++ = '\r';
    *p++ = '\n';
    for (int i = 0; i < argc; i++) {
        *p++ = '$';
        d = put_uint(num + sizeof num, lens[i]);
        memcpy(p, d, (size_t)(num + sizeof num - d));
        p += num + sizeof num - d;
        *p++ = '\r';
        *p++ = '\n';
        if (lens[i])
            memcpy(p, argv[i], lens[i]);
        p += lens[i];
        *p++ = '\r';
        *p++ = '\n';
    }
    return redisAppendFormattedCommand(lc->c, lc->buf, (size_t)(p - lc->buf));
}

/* Append the command in the argv table at idx to the output buffer.
 * Strings are passed by pointer and length: the table anchors them for the
 * duration of this call and Lua never moves a string.  Numbers are formatted
 * as tostring would, into a buffer of our own.  Commands of up to SMALL_ARGC
 * arguments (every command the stores send) use the C stack only, so a
 * pipeline of thousands of commands leaves no garbage behind. */
#define SMALL_ARGC 24
#define NUM_LEN 64 /* > LUAI_MAXNUMBER2STR (44) */

static int append_argv(lua_State *L, lconn *lc, int idx)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    size_t n = lua_rawlen(L, idx);
    const size_t per_arg = sizeof(char *) + sizeof(size_t) + NUM_LEN;
    if (n < 1 || n > (size_t)INT_MAX / per_arg)
        return luaL_error(L, "softcxi.hiredis: argv must be a non-empty array");
    const char *small_argv[SMALL_ARGC];
    size_t small_lens[SMALL_ARGC];
    char small_nums[SMALL_ARGC][NUM_LEN];
    const char **argv = small_argv;
    size_t *lens = small_lens;
    char(*nums)[NUM_LEN] = small_nums;
    int extra = 0;
    if (n > SMALL_ARGC) {
        /* a userdata: collected even when a bad element below raises */
        char *mem = lua_newuserdata(L, n * per_arg);
        argv = (const char **)(void *)mem;
        lens = (size_t *)(void *)(mem + n * sizeof(char *));
        nums = (char(*)[NUM_LEN])(void *)(mem + n * (sizeof(char *) + sizeof(size_t)));
        extra = 1;
    }
    for (int i = 0; i < (int)n; i++) {
        int t = lua_rawgeti(L, idx, i + 1);
        if (t == LUA_TSTRING) {
            argv[i] = lua_tolstring(L, -1, &lens[i]);
        } else if (t == LUA_TNUMBER) {
            size_t len;
            const char *str = lua_tolstring(L, -1, &len); /* converts the copy */
            if (len >= NUM_LEN)
                len = NUM_LEN - 1;
            memcpy(nums[i], str, len);
            nums[i][len] = '\0';
            argv[i] = nums[i];
            lens[i] = len;
        } else {
            return luaL_error(L, "softcxi.hiredis: argv[%d] must be a string or a number, not %s",
                              i + 1, luaL_typename(L, -1));
        }
        lua_pop(L, 1);
    }
    int rc = append_formatted(lc, (int)n, argv, lens);
    if (extra)
        lua_pop(L, 1);
    if (rc != REDIS_OK)
        return -1;
    lc->pending++;
    return 0;
}

static void push_reply(lua_State *L, const redisReply *r);

static void push_array(lua_State *L, const redisReply *r)
{
    luaL_checkstack(L, 4, "softcxi.hiredis: reply nested too deeply");
    int n = r->elements > (size_t)INT_MAX ? INT_MAX : (int)r->elements;
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        const redisReply *e = r->element[i];
        if (e->type == REDIS_REPLY_ERROR) {
            lua_createtable(L, 0, 1);
            lua_pushlstring(L, e->str, e->len);
            lua_setfield(L, -2, "err");
        } else {
            push_reply(L, e);
        }
        lua_rawseti(L, -2, i + 1);
    }
}

static void push_reply(lua_State *L, const redisReply *r)
{
    switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR:
        lua_pushlstring(L, r->str, r->len);
        break;
    case REDIS_REPLY_INTEGER:
        lua_pushinteger(L, (lua_Integer)r->integer);
        break;
    case REDIS_REPLY_ARRAY:
        push_array(L, r);
        break;
    case REDIS_REPLY_NIL:
    default:
        lua_pushlightuserdata(L, NULL_REPLY);
        break;
    }
}

/* Runs under lua_pcall so that a memory error while building the Lua value
 * cannot leak the hiredis reply. */
static int push_reply_protected(lua_State *L)
{
    push_reply(L, lua_touserdata(L, 1));
    return 1;
}

/* Read one reply and push it as described at the top of the file. */
static int read_reply(lua_State *L, lconn *lc)
{
    redisContext *c = lc->c;
    void *raw = NULL;
    if (c->err) {
        lc->pending = 0;
        return push_conn_error(L, c);
    }
    sigpipe_guard g;
    int writing = c->obuf && sdslen(c->obuf) > 0;
    if (writing)
        sigpipe_block(&g);
    int rc = redisGetReply(c, &raw);
    if (writing)
        sigpipe_restore(&g);
    if (rc != REDIS_OK || !raw) {
        lc->pending = 0; /* the context is dead: no reply will ever come */
        if (raw)
            freeReplyObject(raw);
        return push_conn_error(L, c);
    }
    lc->pending--;
    redisReply *r = raw;
    lua_pushcfunction(L, push_reply_protected);
    lua_pushlightuserdata(L, r);
    int st = lua_pcall(L, 1, 1, 0);
    int is_error = r->type == REDIS_REPLY_ERROR;
    freeReplyObject(r);
    if (st != LUA_OK)
        return lua_error(L);
    if (is_error) {
        lua_pushnil(L);
        lua_insert(L, -2);
        lua_pushliteral(L, "EREDIS");
        return 3;
    }
    return 1;
}

/* ---- connection methods --------------------------------------------------- */

/* conn:command(argv) -> reply | nil, msg, code */
static int c_command(lua_State *L)
{
    lconn *lc = check_conn(L);
    if (lc->pending)
        return luaL_error(L, "softcxi.hiredis: command with %d pipelined replies unread",
                          lc->pending);
    if (lc->c->err)
        return push_conn_error(L, lc->c);
    if (append_argv(L, lc, 2) != 0)
        return push_conn_error(L, lc->c);
    return read_reply(L, lc);
}

/* conn:append(argv) -> true | nil, msg, "ECONN"  (queues, sends nothing yet) */
static int c_append(lua_State *L)
{
    lconn *lc = check_conn(L);
    if (lc->c->err)
        return push_conn_error(L, lc->c);
    if (append_argv(L, lc, 2) != 0)
        return push_conn_error(L, lc->c);
    lua_pushboolean(L, 1);
    return 1;
}

/* conn:flush() -> true | nil, msg, "ECONN": write every queued command now, without
 * waiting for a reply, so the server works on them while the caller does something
 * else; get_reply reads the replies later, in order. */
static int c_flush(lua_State *L)
{
    lconn *lc = check_conn(L);
    redisContext *c = lc->c;
    if (c->err) {
        lc->pending = 0;
        return push_conn_error(L, c);
    }
    if (c->obuf && sdslen(c->obuf) > 0) {
        sigpipe_guard g;
        int done = 0;
        sigpipe_block(&g);
        while (!done && redisBufferWrite(c, &done) == REDIS_OK)
            ;
        sigpipe_restore(&g);
        if (c->err) {
            lc->pending = 0; /* the context is dead: no reply will come */
            return push_conn_error(L, c);
        }
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* conn:get_reply() -> reply | nil, msg, code  (flushes the queue first) */
static int c_get_reply(lua_State *L)
{
    lconn *lc = check_conn(L);
    if (lc->pending <= 0)
        return luaL_error(L, "softcxi.hiredis: get_reply with no command pending");
    return read_reply(L, lc);
}

/* conn:pending() -> number of replies not read yet */
static int c_pending(lua_State *L)
{
    lconn *lc = check_conn(L);
    lua_pushinteger(L, lc->pending);
    return 1;
}

/* conn:alive() -> false once an I/O or protocol error killed the context */
static int c_alive(lua_State *L)
{
    lconn *lc = check_conn(L);
    lua_pushboolean(L, lc->c->err == 0);
    return 1;
}

/* conn:set_timeout(seconds) -> true | nil, msg, "ECONN" */
static int c_set_timeout(lua_State *L)
{
    lconn *lc = check_conn(L);
    struct timeval tv = seconds_to_tv(luaL_checknumber(L, 2));
    if (redisSetTimeout(lc->c, tv) != REDIS_OK)
        return push_conn_error(L, lc->c);
    lua_pushboolean(L, 1);
    return 1;
}

/* conn:close(); also __gc and __close.  Closing twice is fine. */
static int c_close(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, CONN_MT);
    if (lc->c) {
        redisFree(lc->c);
        lc->c = NULL;
    }
    lc->pending = 0;
    free(lc->buf);
    lc->buf = NULL;
    lc->cap = 0;
    return 0;
}

static int c_tostring(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, CONN_MT);
    if (!lc->c)
        lua_pushliteral(L, "softcxi.hiredis.conn (closed)");
    else if (lc->c->connection_type == REDIS_CONN_TCP && lc->c->tcp.host)
        lua_pushfstring(L, "softcxi.hiredis.conn (%s:%d%s)", lc->c->tcp.host, lc->c->tcp.port,
                        lc->c->err ? ", dead" : "");
    else if (lc->c->connection_type == REDIS_CONN_UNIX && lc->c->unix_sock.path)
        lua_pushfstring(L, "softcxi.hiredis.conn (unix:%s%s)", lc->c->unix_sock.path,
                        lc->c->err ? ", dead" : "");
    else
        lua_pushfstring(L, "softcxi.hiredis.conn (%p)", (void *)lc);
    return 1;
}

/* ---- module functions ----------------------------------------------------- */

/* A new connection's userdata (conn) on the stack, with no context yet: if
 * anything later raises, __gc still frees what was attached. */
static lconn *new_conn(lua_State *L)
{
    lconn *lc = lua_newuserdata(L, sizeof *lc);
    lc->c = NULL;
    lc->pending = 0;
    lc->buf = NULL;
    lc->cap = 0;
    luaL_setmetatable(L, CONN_MT);
    return lc;
}

/* The end of a connect: the conn on the stack, or nil, msg, "ECONN". */
static int connected(lua_State *L, lconn *lc, struct timeval tv, const char *addr)
{
    if (!lc->c) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: out of memory", addr);
        lua_pushliteral(L, "ECONN");
        return 3;
    }
    if (lc->c->err || redisSetTimeout(lc->c, tv) != REDIS_OK) {
        int n = push_conn_error(L, lc->c);
        redisFree(lc->c);
        lc->c = NULL;
        return n;
    }
    return 1;
}

/* hiredis.connect(host, port [, timeout_s]) -> conn | nil, msg, "ECONN".
 * timeout_s (default 2) bounds the connect and every later read or write. */
static int l_connect(lua_State *L)
{
    const char *host = luaL_checkstring(L, 1);
    lua_Integer port = luaL_checkinteger(L, 2);
    double timeout = luaL_optnumber(L, 3, 2.0);
    luaL_argcheck(L, port > 0 && port < 65536, 2, "port out of range");
    struct timeval tv = seconds_to_tv(timeout);

    lconn *lc = new_conn(L);
    lc->c = redisConnectWithTimeout(host, (int)port, tv);
    lua_pushfstring(L, "%s:%d", host, (int)port);
    int n = connected(L, lc, tv, lua_tostring(L, -1));
    if (n == 1) {
        lua_pop(L, 1); /* the address */
        (void)redisEnableKeepAlive(lc->c); /* best effort: notices half-dead peers */
    }
    return n;
}

/* hiredis.connect_unix(path [, timeout_s]) -> conn | nil, msg, "ECONN" | "EINVAL": the
 * same over a Unix domain socket (no TCP, no keep-alive: the peer is local).
 * A path too long for sun_path is nil, msg, "EINVAL": hiredis 0.14 would cut it
 * short without a word and could reach another server's socket. */
static int l_connect_unix(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    double timeout = luaL_optnumber(L, 2, 2.0);
    luaL_argcheck(L, len > 0 && strlen(path) == len, 1, "a socket path without NUL bytes");
    if (len >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        lua_pushnil(L);
        lua_pushfstring(L, "unix:%s: the socket path is too long (%d bytes at most)", path,
                        (int)sizeof(((struct sockaddr_un *)0)->sun_path) - 1);
        lua_pushliteral(L, "EINVAL");
        return 3;
    }
    struct timeval tv = seconds_to_tv(timeout);

    lconn *lc = new_conn(L);
    lc->c = redisConnectUnixWithTimeout(path, tv);
    lua_pushfstring(L, "unix:%s", path);
    int n = connected(L, lc, tv, lua_tostring(L, -1));
    if (n == 1)
        lua_pop(L, 1);
    return n;
}

static const luaL_Reg conn_methods[] = {
    {"command", c_command},   {"append", c_append}, {"get_reply", c_get_reply},
    {"flush", c_flush},
    {"pending", c_pending},   {"alive", c_alive},   {"set_timeout", c_set_timeout},
    {"close", c_close},       {NULL, NULL},
};

/* hiredis.sleep(seconds): the cluster router's back-off on TRYAGAIN and
 * CLUSTERDOWN (blocking, like everything in this module). */
static int l_sleep(lua_State *L)
{
    double s = luaL_checknumber(L, 1);
    if (s > 0 && s < 3600) {
        double whole = floor(s);
        struct timespec ts = {(time_t)whole, (long)((s - whole) * 1e9)};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
    return 0;
}

static const luaL_Reg module_functions[] = {
    {"connect", l_connect},
    {"connect_unix", l_connect_unix},
    {"sleep", l_sleep},
    {NULL, NULL},
};

#define STR_(x) #x
#define STR(x) STR_(x)

EXPORT int luaopen_softcxi_hiredis(lua_State *L);

EXPORT int luaopen_softcxi_hiredis(lua_State *L)
{
    luaL_newmetatable(L, CONN_MT);
    lua_pushcfunction(L, c_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, c_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, c_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, CONN_MT);
    lua_setfield(L, -2, "__name");
    luaL_newlib(L, conn_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    luaL_newlib(L, module_functions);
    lua_pushlightuserdata(L, NULL_REPLY);
    lua_setfield(L, -2, "null");
    lua_pushliteral(L, SOFTCXI_VERSION_STRING);
    lua_setfield(L, -2, "_VERSION");
    lua_pushliteral(L, STR(HIREDIS_MAJOR) "." STR(HIREDIS_MINOR) "." STR(HIREDIS_PATCH));
    lua_setfield(L, -2, "hiredis_version");
    return 1;
}
