/*
 * lpq.c - softcxi.pq, a thin blocking binding of libpq for the PostgreSQL
 * key store (lua/softcxi/store/sql.lua).
 *
 * One source for Lua 5.4 and LuaJIT (5.1 API through compat-5.3), never
 * linked against liblua.  It only moves values: SQL with $n parameters goes
 * out through PQexecParams, results come back in PostgreSQL's binary format
 * and are decoded by column type.  Schema, transactions, reconnects and error
 * policy are the Lua side's business.
 *
 *   local pq = require "softcxi.pq"
 *   local c, msg, code = pq.connect("postgresql://app@127.0.0.1:5432/keys")
 *   local rows, n = c:exec("SELECT blob FROM keys WHERE id = $1", { id })
 *   c:script("BEGIN; ...; COMMIT")         -- several statements, no parameters
 *   c:close()                              -- also __gc/__close
 *
 * Parameters (why binary: a key blob is arbitrary bytes, NUL included, and
 * binary bytea needs no escaping in either direction):
 *   string          -> binary format, sent with its length: bytea and text
 *                      columns take the bytes as they are
 *   integer, float  -> text format (decimal), for integer columns
 *   boolean         -> text format "true"/"false"
 *   nil             -> NULL (params.n gives the count when there are holes)
 *   { type = "text" | "bytea" | "int8", n =, ... }  -> a binary array of that type
 *                      (nil elements are NULL), for $1::text[] and unnest
 * Result columns, by type:
 *   bytea, text, varchar, name, char -> string      int2/4/8 -> integer
 *   float4/8 -> number    bool -> boolean    NULL -> nil    other -> raises
 * exec returns rows (an array of arrays; rows[i][j] is nil for NULL) and the
 * number of rows the command affected (PQcmdTuples) or returned.
 * Failures: nil, message, code where code is the SQLSTATE (five characters,
 * e.g. "23505") for an error the server reported, "ECONN" when the
 * connection is lost (then c:alive() is false: reconnect in Lua).
 */
#define _POSIX_C_SOURCE 200809L
#include <lauxlib.h>
#include <lua.h>
#if LUA_VERSION_NUM < 502
#include "compat-5.3.h"
#endif

#include <libpq-fe.h>

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "softcxi.h" /* SOFTCXI_VERSION_STRING only */

#define CONN_MT "softcxi.pq.conn"
#define RESULT_MT "softcxi.pq.result"

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

/* Type OIDs (pg_type.h; stable since PostgreSQL 7). */
enum {
    OID_BOOL = 16,
    OID_BYTEA = 17,
    OID_CHAR = 18,
    OID_NAME = 19,
    OID_INT8 = 20,
    OID_INT2 = 21,
    OID_INT4 = 23,
    OID_TEXT = 25,
    OID_FLOAT4 = 700,
    OID_FLOAT8 = 701,
    OID_BPCHAR = 1042,
    OID_VARCHAR = 1043,
};

typedef struct lconn {
    PGconn *c;
} lconn;

/* A PGresult owned by a userdata, so a Lua error raised while the rows are
 * converted (out of memory, an unsupported type) still frees it. */
typedef struct lresult {
    PGresult *r;
} lresult;

#define NUM_LEN 48

static lconn *check_conn(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, CONN_MT);
    if (!lc->c)
        luaL_error(L, "softcxi.pq: the connection is closed");
    return lc;
}

/* libpq's messages end in a newline; Lua messages do not. */
static void push_trimmed(lua_State *L, const char *s)
{
    size_t n = s ? strlen(s) : 0;
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' '))
        n--;
    if (n == 0)
        lua_pushliteral(L, "unknown error");
    else
        lua_pushlstring(L, s, n);
}

/* nil, message, code for a failed command. */
static int push_error(lua_State *L, PGconn *c, const PGresult *r)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    lua_pushnil(L);
    if (r && state) {
        const char *primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
        const char *detail = PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL);
        if (detail)
            lua_pushfstring(L, "%s (%s)", primary ? primary : "error", detail);
        else
            lua_pushstring(L, primary ? primary : "error");
        /* the server closing our session (shutdown, terminate) is a lost connection */
        if (PQstatus(c) == CONNECTION_BAD)
            lua_pushliteral(L, "ECONN");
        else
            lua_pushstring(L, state);
        return 3;
    }
    if (r && PQresultStatus(r) != PGRES_FATAL_ERROR && PQstatus(c) != CONNECTION_BAD) {
        lua_pushfstring(L, "unexpected result %s", PQresStatus(PQresultStatus(r)));
        lua_pushliteral(L, "EIO");
        return 3;
    }
    push_trimmed(L, r ? PQresultErrorMessage(r) : PQerrorMessage(c));
    lua_pushliteral(L, "ECONN");
    return 3;
}

static uint64_t be_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static uint32_t be_u32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/* Push the value of one binary-format field. */
static void push_field(lua_State *L, const PGresult *r, int row, int col, Oid type)
{
    const unsigned char *v = (const unsigned char *)PQgetvalue(r, row, col);
    int len = PQgetlength(r, row, col);
    switch (type) {
    case OID_BYTEA:
    case OID_TEXT:
    case OID_VARCHAR:
    case OID_BPCHAR:
    case OID_NAME:
    case OID_CHAR:
        lua_pushlstring(L, (const char *)v, (size_t)len);
        return;
    case OID_BOOL:
        if (len == 1) {
            lua_pushboolean(L, v[0] != 0);
            return;
        }
        break;
    case OID_INT2:
        if (len == 2) {
            lua_pushinteger(L, (lua_Integer)(int16_t)(uint16_t)(v[0] << 8 | v[1]));
            return;
        }
        break;
    case OID_INT4:
        if (len == 4) {
            lua_pushinteger(L, (lua_Integer)(int32_t)be_u32(v));
            return;
        }
        break;
    case OID_INT8:
        if (len == 8) {
            /* LuaJIT's lua_Integer is ptrdiff_t: 64 bits on every platform we build for */
            lua_pushinteger(L, (lua_Integer)(int64_t)be_u64(v));
            return;
        }
        break;
    case OID_FLOAT4:
        if (len == 4) {
            uint32_t u = be_u32(v);
            float f;
            memcpy(&f, &u, sizeof f);
            lua_pushnumber(L, (lua_Number)f);
            return;
        }
        break;
    case OID_FLOAT8:
        if (len == 8) {
            uint64_t u = be_u64(v);
            double d;
            memcpy(&d, &u, sizeof d);
            lua_pushnumber(L, (lua_Number)d);
            return;
        }
        break;
    default:
        luaL_error(L, "softcxi.pq: column %d has type oid %d, which this binding does not read "
                      "(cast it to text or bigint in the query)",
                   col + 1, (int)type);
        return;
    }
    luaL_error(L, "softcxi.pq: column %d: bad binary value of %d bytes for type oid %d", col + 1,
               len, (int)type);
}

/* rows, n for a successful result. */
static int push_rows(lua_State *L, const PGresult *r)
{
    int nrows = PQntuples(r), ncols = PQnfields(r);
    Oid types[64];
    if (ncols > 64)
        return luaL_error(L, "softcxi.pq: more than 64 result columns");
    for (int j = 0; j < ncols; j++) {
        if (PQfformat(r, j) != 1)
            return luaL_error(L, "softcxi.pq: column %d is not in binary format", j + 1);
        types[j] = PQftype(r, j);
    }
    lua_createtable(L, nrows, 0);
    for (int i = 0; i < nrows; i++) {
        lua_createtable(L, ncols, 0);
        for (int j = 0; j < ncols; j++) {
            if (PQgetisnull(r, i, j))
                continue;
            push_field(L, r, i, j, types[j]);
            lua_rawseti(L, -2, j + 1);
        }
        lua_rawseti(L, -2, i + 1);
    }
    const char *affected = PQcmdTuples((PGresult *)r);
    if (affected && affected[0])
        lua_pushinteger(L, (lua_Integer)strtoll(affected, NULL, 10));
    else
        lua_pushinteger(L, nrows);
    return 2;
}

/* ---- array parameters ------------------------------------------------------ */

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* The array parameter { type = "text" | "bytea" | "int8", n = count, v1, v2, ... } at
 * stack index idx, in PostgreSQL's binary array format (array_recv): a userdata pushed
 * on the stack, which anchors it until the command has been sent.  Elements may be nil
 * (NULL).  One parameter carries a whole column of a batch -- INSERT ... SELECT * FROM
 * unnest($1::text[], ...) -- so the server parses one short statement, not a VALUES
 * list of thousands of parameters (which costs it ten times the inserts themselves). */
static const unsigned char *push_array(lua_State *L, int idx, int param, size_t *len)
{
    lua_getfield(L, idx, "type");
    const char *type = lua_tostring(L, -1);
    Oid oid;
    if (type && !strcmp(type, "text"))
        oid = OID_TEXT;
    else if (type && !strcmp(type, "bytea"))
        oid = OID_BYTEA;
    else if (type && !strcmp(type, "int8"))
        oid = OID_INT8;
    else {
        luaL_error(L, "softcxi.pq: parameter %d: an array needs type = \"text\", \"bytea\" or "
                      "\"int8\"",
                   param);
        return NULL; /* not reached */
    }
    lua_pop(L, 1);
    lua_getfield(L, idx, "n");
    lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : (lua_Integer)lua_rawlen(L, idx);
    lua_pop(L, 1);
    if (n < 0 || n > INT_MAX / 16)
        luaL_error(L, "softcxi.pq: parameter %d: bad array length", param);
    /* pass 1: the size, and a check of every element */
    size_t total = 20, hasnull = 0;
    for (int k = 1; k <= (int)n; k++) {
        int t = lua_rawgeti(L, idx, k);
        if (t == LUA_TNIL) {
            hasnull = 1;
            total += 4;
        } else if (oid == OID_INT8) {
            if (!lua_isinteger(L, -1))
                luaL_error(L, "softcxi.pq: parameter %d[%d] must be an integer", param, k);
            total += 12;
        } else {
            if (t != LUA_TSTRING)
                luaL_error(L, "softcxi.pq: parameter %d[%d] must be a string, not %s", param,
                           (int)k, luaL_typename(L, -1));
            size_t l = lua_rawlen(L, -1);
            if (l > INT_MAX || total > (size_t)INT_MAX - 4 - l)
                luaL_error(L, "softcxi.pq: parameter %d is too long", param);
            total += 4 + l;
        }
        lua_pop(L, 1);
    }
    if (total > INT_MAX)
        luaL_error(L, "softcxi.pq: parameter %d is too long", param);
    /* pass 2: header (ndim 1, null flag, element type, size, lower bound 1), elements */
    unsigned char *buf = lua_newuserdata(L, total), *p = buf;
    put_be32(p, 1);
    put_be32(p + 4, (uint32_t)hasnull);
    put_be32(p + 8, (uint32_t)oid);
    put_be32(p + 12, (uint32_t)n);
    put_be32(p + 16, 1);
    p += 20;
    for (int k = 1; k <= (int)n; k++) {
        int t = lua_rawgeti(L, idx, k);
        if (t == LUA_TNIL) {
            put_be32(p, 0xffffffffu);
            p += 4;
        } else if (oid == OID_INT8) {
            uint64_t v = (uint64_t)(int64_t)lua_tointeger(L, -1);
            put_be32(p, 8);
            put_be32(p + 4, (uint32_t)(v >> 32));
            put_be32(p + 8, (uint32_t)v);
            p += 12;
        } else {
            size_t l;
            const char *str = lua_tolstring(L, -1, &l);
            put_be32(p, (uint32_t)l);
            memcpy(p + 4, str, l);
            p += 4 + l;
        }
        lua_pop(L, 1);
    }
    *len = total;
    return buf;
}

/* c:exec(sql [, params]) -> rows, n | nil, msg, code */
static int c_exec(lua_State *L)
{
    lconn *lc = check_conn(L);
    const char *sql = luaL_checkstring(L, 2);
    int np = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_getfield(L, 3, "n");
        lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : (lua_Integer)lua_rawlen(L, 3);
        lua_pop(L, 1);
        if (n < 0 || n > 65535)
            return luaL_error(L, "softcxi.pq: %d parameters (at most 65535)", (int)n);
        np = (int)n;
    }
    /* scratch as a userdata: collected even when a bad parameter raises */
    const size_t per = sizeof(char *) + 2 * sizeof(int) + NUM_LEN;
    char *mem = lua_newuserdata(L, (size_t)np * per + 1);
    const char **values = (const char **)(void *)mem;
    int *lengths = (int *)(void *)(mem + (size_t)np * sizeof(char *));
    int *formats = lengths + np;
    char *nums = (char *)(formats + np);
    for (int i = 0; i < np; i++) {
        int t = lua_rawgeti(L, 3, i + 1);
        char *num = nums + (size_t)i * NUM_LEN;
        switch (t) {
        case LUA_TNIL:
            values[i] = NULL;
            lengths[i] = 0;
            formats[i] = 0;
            break;
        case LUA_TSTRING: {
            size_t len;
            values[i] = lua_tolstring(L, -1, &len); /* anchored by the params table */
            if (len > INT_MAX)
                return luaL_error(L, "softcxi.pq: parameter %d is too long", i + 1);
            lengths[i] = (int)len;
            formats[i] = 1;
            break;
        }
        case LUA_TNUMBER:
            if (lua_isinteger(L, -1))
                snprintf(num, NUM_LEN, "%lld", (long long)lua_tointeger(L, -1));
            else
                snprintf(num, NUM_LEN, "%.17g", (double)lua_tonumber(L, -1));
            values[i] = num;
            lengths[i] = 0;
            formats[i] = 0;
            break;
        case LUA_TBOOLEAN:
            values[i] = lua_toboolean(L, -1) ? "true" : "false";
            lengths[i] = 0;
            formats[i] = 0;
            break;
        case LUA_TTABLE: {
            size_t len = 0;
            luaL_checkstack(L, 4, "softcxi.pq: too many array parameters");
            values[i] = (const char *)push_array(L, lua_gettop(L), i + 1, &len);
            lengths[i] = (int)len;
            formats[i] = 1;
            lua_remove(L, -2); /* the table; the encoded array stays on the stack */
            continue;
        }
        default:
            return luaL_error(L, "softcxi.pq: parameter %d must be a string, number, boolean, "
                                 "array table or nil, not %s",
                              i + 1, luaL_typename(L, -1));
        }
        lua_pop(L, 1);
    }
    lresult *lr = lua_newuserdata(L, sizeof *lr);
    lr->r = NULL;
    luaL_setmetatable(L, RESULT_MT);
    lr->r = PQexecParams(lc->c, sql, np, NULL, values, lengths, formats, 1);
    ExecStatusType st = lr->r ? PQresultStatus(lr->r) : PGRES_FATAL_ERROR;
    int n;
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
        n = push_rows(L, lr->r);
    else
        n = push_error(L, lc->c, lr->r);
    PQclear(lr->r);
    lr->r = NULL;
    return n;
}

/* c:script(sql) -> true | nil, msg, code: one or more statements without
 * parameters (schema changes), results discarded. */
static int c_script(lua_State *L)
{
    lconn *lc = check_conn(L);
    const char *sql = luaL_checkstring(L, 2);
    lresult *lr = lua_newuserdata(L, sizeof *lr);
    lr->r = NULL;
    luaL_setmetatable(L, RESULT_MT);
    lr->r = PQexec(lc->c, sql);
    ExecStatusType st = lr->r ? PQresultStatus(lr->r) : PGRES_FATAL_ERROR;
    int n;
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
        lua_pushboolean(L, 1);
        n = 1;
    } else {
        n = push_error(L, lc->c, lr->r);
    }
    PQclear(lr->r);
    lr->r = NULL;
    return n;
}

/* c:alive() -> the connection is usable (not lost, not closed) */
static int c_alive(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, CONN_MT);
    lua_pushboolean(L, lc->c && PQstatus(lc->c) == CONNECTION_OK);
    return 1;
}

/* c:in_transaction() -> a transaction block is open (or failed and not yet ended) */
static int c_in_transaction(lua_State *L)
{
    lconn *lc = check_conn(L);
    PGTransactionStatusType t = PQtransactionStatus(lc->c);
    lua_pushboolean(L, t == PQTRANS_INTRANS || t == PQTRANS_INERROR);
    return 1;
}

/* c:server_version() -> e.g. 150018 */
static int c_server_version(lua_State *L)
{
    lconn *lc = check_conn(L);
    lua_pushinteger(L, PQserverVersion(lc->c));
    return 1;
}

/* c:close(); also __gc and __close.  Closing twice is fine. */
static int c_close(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, CONN_MT);
    if (lc->c) {
        PQfinish(lc->c);
        lc->c = NULL;
    }
    return 0;
}

static int c_tostring(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, CONN_MT);
    if (!lc->c)
        lua_pushliteral(L, "softcxi.pq.conn (closed)");
    else
        lua_pushfstring(L, "softcxi.pq.conn (%s:%s/%s%s)", PQhost(lc->c), PQport(lc->c),
                        PQdb(lc->c), PQstatus(lc->c) == CONNECTION_OK ? "" : ", dead");
    return 1;
}

static int r_gc(lua_State *L)
{
    lresult *lr = luaL_checkudata(L, 1, RESULT_MT);
    PQclear(lr->r);
    lr->r = NULL;
    return 0;
}

/* Server notices (e.g. "relation already exists, skipping") are not errors
 * and must not go to the application's stderr. */
static void quiet_notices(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

/* pq.connect(conninfo) -> conn | nil, msg, "ECONN".  conninfo is a libpq
 * connection string or URI (postgresql://...), passed as it is. */
static int l_connect(lua_State *L)
{
    const char *info = luaL_checkstring(L, 1);
    lconn *lc = lua_newuserdata(L, sizeof *lc);
    lc->c = NULL;
    luaL_setmetatable(L, CONN_MT);
    lc->c = PQconnectdb(info);
    if (!lc->c) {
        lua_pushnil(L);
        lua_pushliteral(L, "out of memory");
        lua_pushliteral(L, "ECONN");
        return 3;
    }
    if (PQstatus(lc->c) != CONNECTION_OK) {
        lua_pushnil(L);
        push_trimmed(L, PQerrorMessage(lc->c));
        lua_pushliteral(L, "ECONN");
        PQfinish(lc->c);
        lc->c = NULL;
        return 3;
    }
    PQsetNoticeProcessor(lc->c, quiet_notices, NULL);
    return 1;
}

static const luaL_Reg conn_methods[] = {
    {"exec", c_exec},
    {"script", c_script},
    {"alive", c_alive},
    {"in_transaction", c_in_transaction},
    {"server_version", c_server_version},
    {"close", c_close},
    {NULL, NULL},
};

static const luaL_Reg module_functions[] = {
    {"connect", l_connect},
    {NULL, NULL},
};

EXPORT int luaopen_softcxi_pq(lua_State *L);

EXPORT int luaopen_softcxi_pq(lua_State *L)
{
    luaL_newmetatable(L, RESULT_MT);
    lua_pushcfunction(L, r_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

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
    lua_pushliteral(L, SOFTCXI_VERSION_STRING);
    lua_setfield(L, -2, "_VERSION");
    lua_pushinteger(L, PQlibVersion());
    lua_setfield(L, -2, "libpq_version");
    return 1;
}
