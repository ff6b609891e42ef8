/*
 * lsqlite3.c - softcxi.sqlite3, a thin binding of SQLite 3 for the SQLite
 * key store (lua/softcxi/store/sql.lua).
 *
 * One source for Lua 5.4 and LuaJIT (5.1 API through compat-5.3), never
 * linked against liblua.  The same shape as softcxi.pq, so the store's SQL
 * layer drives both alike:
 *
 *   local sqlite3 = require "softcxi.sqlite3"
 *   local db, msg, code = sqlite3.open("./keys.db", 5000)   -- busy timeout, ms
 *   local rows, n = db:exec("SELECT blob FROM keys WHERE id = ?1", { id }, "t")
 *   db:script("CREATE TABLE ...; CREATE INDEX ...")        -- no parameters
 *   db:close()                                             -- also __gc/__close
 *
 * exec prepares sql once and keeps the statement in a small cache on the
 * connection (keyed by the SQL text), so a statement run for every key is
 * parsed once.  Parameters ?1..?n: nil -> NULL, integer -> INTEGER, float
 * -> REAL, boolean -> INTEGER 0/1, string -> TEXT, or BLOB when the optional
 * third argument has 'b' at its position ("tbb..."): a key blob is bytes,
 * an id is text a user can type in the sqlite3 shell.  Strings go with their
 * length, so NUL bytes are kept.  Columns: INTEGER -> integer, REAL ->
 * number, TEXT and BLOB -> string, NULL -> nil.  exec returns rows (an
 * array of arrays) and sqlite3_changes() for a statement without result
 * columns, else the number of rows.
 * Failures: nil, message, code with code "EBUSY" (locked past the busy
 * timeout), "ECONSTRAINT", "ECORRUPT" (not a database, malformed), "EIO"
 * (disk I/O, full), "EOPEN" (cannot open the file), "ESQLITE" (anything
 * else: SQL errors, misuse).
 */
#define _POSIX_C_SOURCE 200809L
#include <lauxlib.h>
#include <lua.h>
#if LUA_VERSION_NUM < 502
#include "compat-5.3.h"
#endif

#include <sqlite3.h>

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "softcxi.h" /* SOFTCXI_VERSION_STRING only */

#define DB_MT "softcxi.sqlite3.db"

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

/* Statements kept per connection.  A store uses a handful (one multi-row
 * insert per batch size, get, delete, ...); least recently used goes. */
#define CACHE 32

typedef struct cached {
    char *sql; /* malloc'd copy of the SQL text */
    sqlite3_stmt *stmt;
    unsigned long used; /* LRU clock */
} cached;

typedef struct ldb {
    sqlite3 *db;
    cached cache[CACHE];
    unsigned long clock;
} ldb;

static ldb *check_db(lua_State *L)
{
    ldb *d = luaL_checkudata(L, 1, DB_MT);
    if (!d->db)
        luaL_error(L, "softcxi.sqlite3: the database is closed");
    return d;
}

static const char *code_name(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return "EBUSY";
    case SQLITE_CONSTRAINT:
        return "ECONSTRAINT";
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        return "ECORRUPT";
    case SQLITE_IOERR:
    case SQLITE_FULL:
        return "EIO";
    case SQLITE_CANTOPEN:
    case SQLITE_PERM:
    case SQLITE_READONLY:
        return "EOPEN";
    default:
        return "ESQLITE";
    }
}

static int push_error(lua_State *L, sqlite3 *db, int rc)
{
    lua_pushnil(L);
    if (db)
        lua_pushstring(L, sqlite3_errmsg(db));
    else
        lua_pushstring(L, sqlite3_errstr(rc));
    lua_pushstring(L, code_name(rc));
    return 3;
}

static void clear_cache(ldb *d)
{
    for (int i = 0; i < CACHE; i++) {
        if (d->cache[i].stmt)
            sqlite3_finalize(d->cache[i].stmt);
        free(d->cache[i].sql);
        d->cache[i].stmt = NULL;
        d->cache[i].sql = NULL;
        d->cache[i].used = 0;
    }
}

/* The prepared statement for sql, from the cache or freshly prepared; NULL
 * with *rc set on failure. */
static sqlite3_stmt *statement(ldb *d, const char *sql, size_t len, int *rc)
{
    int victim = 0;
    for (int i = 0; i < CACHE; i++) {
        if (d->cache[i].sql && !strcmp(d->cache[i].sql, sql)) {
            d->cache[i].used = ++d->clock;
            return d->cache[i].stmt;
        }
        if (d->cache[i].used < d->cache[victim].used)
            victim = i;
    }
    sqlite3_stmt *st = NULL;
    const char *tail = NULL;
    if (len > INT_MAX) {
        *rc = SQLITE_TOOBIG;
        return NULL;
    }
    *rc = sqlite3_prepare_v3(d->db, sql, (int)len, SQLITE_PREPARE_PERSISTENT, &st, &tail);
    if (*rc != SQLITE_OK)
        return NULL;
    if (!st) { /* only a comment or white space */
        *rc = SQLITE_MISUSE;
        return NULL;
    }
    char *copy = malloc(len + 1);
    if (!copy) { /* run it uncached */
        sqlite3_finalize(st);
        *rc = SQLITE_NOMEM;
        return NULL;
    }
    memcpy(copy, sql, len + 1);
    cached *c = &d->cache[victim];
    if (c->stmt)
        sqlite3_finalize(c->stmt);
    free(c->sql);
    c->sql = copy;
    c->stmt = st;
    c->used = ++d->clock;
    return st;
}

static int bind_params(lua_State *L, sqlite3_stmt *st, int np, const char *types, size_t ntypes)
{
    for (int i = 0; i < np; i++) {
        int t = lua_rawgeti(L, 3, i + 1), rc;
        switch (t) {
        case LUA_TNIL:
            rc = sqlite3_bind_null(st, i + 1);
            break;
        case LUA_TNUMBER:
            if (lua_isinteger(L, -1))
                rc = sqlite3_bind_int64(st, i + 1, (sqlite3_int64)lua_tointeger(L, -1));
            else
                rc = sqlite3_bind_double(st, i + 1, (double)lua_tonumber(L, -1));
            break;
        case LUA_TBOOLEAN:
            rc = sqlite3_bind_int(st, i + 1, lua_toboolean(L, -1));
            break;
        case LUA_TSTRING: {
            size_t len;
            const char *s = lua_tolstring(L, -1, &len);
            /* SQLITE_TRANSIENT: SQLite copies; the string may be collected after the pop */
            if ((size_t)i < ntypes && types[i] == 'b')
                rc = sqlite3_bind_blob64(st, i + 1, s, len, SQLITE_TRANSIENT);
            else
                rc = sqlite3_bind_text64(st, i + 1, s, len, SQLITE_TRANSIENT, SQLITE_UTF8);
            break;
        }
        default:
            sqlite3_clear_bindings(st);
            return luaL_error(L, "softcxi.sqlite3: parameter %d must be a string, number, "
                                 "boolean or nil, not %s",
                              i + 1, luaL_typename(L, -1));
        }
        lua_pop(L, 1);
        if (rc != SQLITE_OK)
            return rc;
    }
    return SQLITE_OK;
}

static void push_column(lua_State *L, sqlite3_stmt *st, int j)
{
    switch (sqlite3_column_type(st, j)) {
    case SQLITE_INTEGER:
        lua_pushinteger(L, (lua_Integer)sqlite3_column_int64(st, j));
        break;
    case SQLITE_FLOAT:
        lua_pushnumber(L, (lua_Number)sqlite3_column_double(st, j));
        break;
    case SQLITE_TEXT:
        lua_pushlstring(L, (const char *)sqlite3_column_text(st, j),
                        (size_t)sqlite3_column_bytes(st, j));
        break;
    case SQLITE_BLOB: {
        const void *b = sqlite3_column_blob(st, j);
        lua_pushlstring(L, b ? (const char *)b : "", (size_t)sqlite3_column_bytes(st, j));
        break;
    }
    default:
        lua_pushnil(L);
        break;
    }
}

/* db:exec(sql [, params [, types]]) -> rows, n | nil, msg, code */
static int d_exec(lua_State *L)
{
    ldb *d = check_db(L);
    size_t len, ntypes = 0;
    const char *sql = luaL_checklstring(L, 2, &len);
    const char *types = luaL_optlstring(L, 4, "", &ntypes);
    int np = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_getfield(L, 3, "n");
        lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : (lua_Integer)lua_rawlen(L, 3);
        lua_pop(L, 1);
        if (n < 0 || n > 32766)
            return luaL_error(L, "softcxi.sqlite3: %d parameters (at most 32766)", (int)n);
        np = (int)n;
    }
    int rc;
    sqlite3_stmt *st = statement(d, sql, len, &rc);
    if (!st)
        return push_error(L, d->db, rc);
    if (np != sqlite3_bind_parameter_count(st))
        return luaL_error(L, "softcxi.sqlite3: %d parameters given, the statement has %d", np,
                          sqlite3_bind_parameter_count(st));
    rc = bind_params(L, st, np, types, ntypes);
    if (rc != SQLITE_OK) {
        sqlite3_clear_bindings(st);
        return push_error(L, d->db, rc);
    }
    int ncols = sqlite3_column_count(st), nrows = 0;
    lua_newtable(L);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        lua_createtable(L, ncols, 0);
        for (int j = 0; j < ncols; j++) {
            if (sqlite3_column_type(st, j) == SQLITE_NULL)
                continue;
            push_column(L, st, j);
            lua_rawseti(L, -2, j + 1);
        }
        lua_rawseti(L, -2, ++nrows);
    }
    /* reset releases the statement's read lock; clear drops copies of big blobs */
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE)
        return push_error(L, d->db, rc);
    lua_pushinteger(L, ncols == 0 ? (lua_Integer)sqlite3_changes(d->db) : nrows);
    return 2;
}

/* db:script(sql) -> true | nil, msg, code: statements without parameters. */
static int d_script(lua_State *L)
{
    ldb *d = check_db(L);
    const char *sql = luaL_checkstring(L, 2);
    char *err = NULL;
    int rc = sqlite3_exec(d->db, sql, NULL, NULL, &err);
    if (rc != SQLITE_OK) {
        lua_pushnil(L);
        lua_pushstring(L, err ? err : sqlite3_errstr(rc));
        lua_pushstring(L, code_name(rc));
        sqlite3_free(err);
        return 3;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* db:in_transaction() */
static int d_in_transaction(lua_State *L)
{
    ldb *d = check_db(L);
    lua_pushboolean(L, !sqlite3_get_autocommit(d->db));
    return 1;
}

/* db:alive() -> not closed (a file has no connection to lose) */
static int d_alive(lua_State *L)
{
    ldb *d = luaL_checkudata(L, 1, DB_MT);
    lua_pushboolean(L, d->db != NULL);
    return 1;
}

/* db:close(); also __gc and __close.  Closing twice is fine. */
static int d_close(lua_State *L)
{
    ldb *d = luaL_checkudata(L, 1, DB_MT);
    if (d->db) {
        clear_cache(d);
        sqlite3_close_v2(d->db);
        d->db = NULL;
    }
    return 0;
}

static int d_tostring(lua_State *L)
{
    ldb *d = luaL_checkudata(L, 1, DB_MT);
    if (!d->db)
        lua_pushliteral(L, "softcxi.sqlite3.db (closed)");
    else
        lua_pushfstring(L, "softcxi.sqlite3.db (%s)", sqlite3_db_filename(d->db, "main"));
    return 1;
}

/* sqlite3.open(path [, busy_timeout_ms = 5000]) -> db | nil, msg, code.
 * Creates the file when it is missing. */
static int l_open(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lua_Integer busy = luaL_optinteger(L, 2, 5000);
    luaL_argcheck(L, busy >= 0 && busy <= INT_MAX, 2, "busy timeout out of range");
    ldb *d = lua_newuserdata(L, sizeof *d);
    memset(d, 0, sizeof *d);
    luaL_setmetatable(L, DB_MT);
    sqlite3 *db = NULL;
    int rc = sqlite3_open_v2(path, &db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             NULL);
    if (rc != SQLITE_OK) {
        int n = push_error(L, db, rc);
        sqlite3_close_v2(db);
        return n;
    }
    d->db = db;
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, (int)busy);
    return 1;
}

static const luaL_Reg db_methods[] = {
    {"exec", d_exec},   {"script", d_script}, {"in_transaction", d_in_transaction},
    {"alive", d_alive}, {"close", d_close},   {NULL, NULL},
};

static const luaL_Reg module_functions[] = {
    {"open", l_open},
    {NULL, NULL},
};

EXPORT int luaopen_softcxi_sqlite3(lua_State *L);

EXPORT int luaopen_softcxi_sqlite3(lua_State *L)
{
    luaL_newmetatable(L, DB_MT);
    lua_pushcfunction(L, d_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, d_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, d_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, DB_MT);
    lua_setfield(L, -2, "__name");
    luaL_newlib(L, db_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    luaL_newlib(L, module_functions);
    lua_pushliteral(L, SOFTCXI_VERSION_STRING);
    lua_setfield(L, -2, "_VERSION");
    lua_pushstring(L, sqlite3_libversion());
    lua_setfield(L, -2, "sqlite_version");
    return 1;
}
