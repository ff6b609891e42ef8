/*
 * lsoftcxi.c - softcxi.core, the thin Lua binding of the softcxi core.
 *
 * One source for Lua 5.4 and LuaJIT (5.1 API through compat-5.3).  It only
 * converts arguments and results; names, defaults and conveniences live in
 * lua/softcxi/init.lua.  Misuse (wrong types, a closed session) raises;
 * runtime failures return nil, message, code.
 *
 * The module never links liblua, so the same .so loads into nginx.
 */
#define _POSIX_C_SOURCE 200809L
#include <lauxlib.h>
#include <lua.h>
#if LUA_VERSION_NUM < 502
#include "compat-5.3.h"
#endif

#include <stdio.h>
#include <string.h>

#include "softcxi.h"

#define SESSION_MT "softcxi.session"
#define JOB_MT "softcxi.bulk_job"

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

struct ljob;

/* jobs: the bulk_generate_start jobs that run on this session (a list,
 * oldest first), each until it is waited for, cancelled or collected.  Every
 * call but close and another bulk_generate_start (up to SESSION_JOBS) raises
 * meanwhile.  A job and its session point at each other, and each clears
 * the other's pointers when it goes first (close, wait, cancel, __gc). */
typedef struct lsession {
    softcxi_session *s;
    struct ljob *jobs;
    int njobs;
} lsession;

/* Jobs one session may run at once: two let a caller start the next batch
 * before the one being made is done, so the worker threads never wait for
 * the caller to collect (softcxi.provision); a few more cost nothing. */
#define SESSION_JOBS 4

typedef struct ljob {
    softcxi_bulk_job *job; /* NULL once waited for, cancelled or collected */
    lsession *owner;       /* the session it keeps busy, or NULL */
    struct ljob *next;     /* the owner's next job */
    size_t count;
    int state;             /* JOB_RUNNING, JOB_WAITED, JOB_CANCELLED */
} ljob;

enum { JOB_RUNNING, JOB_WAITED, JOB_CANCELLED };

/* ---- helpers ----------------------------------------------------------- */

static int push_error(lua_State *L, const softcxi_error *e)
{
    lua_pushnil(L);
    lua_pushstring(L, e->msg[0] ? e->msg : softcxi_code_name(e->code));
    lua_pushstring(L, softcxi_code_name(e->code));
    return 3;
}

static int push_einval(lua_State *L, const char *msg)
{
    lua_pushnil(L);
    lua_pushstring(L, msg);
    lua_pushstring(L, "EINVAL");
    return 3;
}

static int session_error(lua_State *L, lsession *ls)
{
    return push_error(L, softcxi_session_error(ls->s));
}

static void push_buf(lua_State *L, softcxi_buf *b)
{
    lua_pushlstring(L, b->data ? (const char *)b->data : "", b->len);
    softcxi_buf_free(b);
}

static lsession *check_session(lua_State *L)
{
    lsession *ls = luaL_checkudata(L, 1, SESSION_MT);
    if (!ls->s)
        luaL_error(L, "softcxi: the session is closed");
    if (ls->jobs)
        luaL_error(L, "softcxi: the session is busy: a bulk_generate_start job runs on it "
                      "(job:wait() or job:cancel() first)");
    return ls;
}

/* The session for another bulk_generate_start: it may run jobs, up to
 * SESSION_JOBS. */
static lsession *check_start_session(lua_State *L)
{
    lsession *ls = luaL_checkudata(L, 1, SESSION_MT);
    if (!ls->s)
        luaL_error(L, "softcxi: the session is closed");
    if (ls->njobs >= SESSION_JOBS)
        luaL_error(L, "softcxi: the session is busy: %d bulk_generate_start jobs run on it "
                      "(job:wait() or job:cancel() one first)", ls->njobs);
    return ls;
}

/* The job off its session's list; the session is free once its list is empty. */
static void job_release(struct ljob *j)
{
    lsession *ls = j->owner;
    if (!ls)
        return;
    for (struct ljob **p = &ls->jobs; *p; p = &(*p)->next)
        if (*p == j) {
            *p = j->next;
            ls->njobs--;
            break;
        }
    j->owner = NULL;
    j->next = NULL;
}

static const uint8_t *check_bytes(lua_State *L, int idx, size_t *len)
{
    return (const uint8_t *)luaL_checklstring(L, idx, len);
}

static const uint8_t *opt_bytes(lua_State *L, int idx, size_t *len)
{
    *len = 0;
    if (lua_isnoneornil(L, idx))
        return NULL;
    return (const uint8_t *)luaL_checklstring(L, idx, len);
}

/* Mechanism by name; returns -1 and pushes nil, msg, code when unknown. */
static int check_mech(lua_State *L, int idx, int *mech)
{
    const char *name = luaL_checkstring(L, idx);
    *mech = softcxi_mech_from_name(name);
    if (*mech < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "unknown mechanism '%s'", name);
        lua_pushstring(L, "EINVAL");
        return -1;
    }
    return 0;
}

/* ---- templates --------------------------------------------------------- */

/* An integral number in [lo, hi]: 2^8 and 3.0 count, 2.5 does not. */
static int get_int(lua_State *L, int idx, lua_Integer lo, lua_Integer hi, lua_Integer *out)
{
    int isnum = 0;
    lua_Integer v = lua_tointegerx(L, idx, &isnum);
    if (!isnum || lua_type(L, idx) != LUA_TNUMBER || v < lo || v > hi)
        return 0;
    *out = v;
    return 1;
}

/* A string with no NUL inside (names end up as C strings and in blobs). */
static const char *get_name(lua_State *L, int idx)
{
    size_t len;
    if (lua_type(L, idx) != LUA_TSTRING)
        return NULL;
    const char *s = lua_tolstring(L, idx, &len);
    return strlen(s) == len ? s : NULL;
}

/* Fill t from the table at idx.  Strings stay owned by the table.  On a bad
 * field writes a message naming it into msg and returns -1. */
static int read_template(lua_State *L, int idx, softcxi_template *t, char *msg, size_t cap,
                         int need_algo)
{
    memset(t, 0, sizeof *t);
    idx = lua_absindex(L, idx);
    const char *hash = NULL, *algo_name = NULL;
    lua_Integer iv;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        int vt = lua_type(L, -1);
        int bad = 0;
        if (!k) {
            snprintf(msg, cap, "template: field names must be strings");
            lua_pop(L, 2);
            return -1;
        }
#define WANT(type) \
    if (vt != (type)) { \
        bad = 1; \
    } else
        if (!strcmp(k, "algo")) {
            WANT(LUA_TSTRING)
            {
                algo_name = lua_tostring(L, -1);
                t->algo = softcxi_algo_from_name(algo_name);
                if (t->algo < 0) {
                    snprintf(msg, cap,
                             "template.algo: unknown algorithm '%s' (ec, ed25519, x25519, rsa, "
                             "aes, hmac-sha256, hmac-sha384, hmac-sha512)",
                             lua_tostring(L, -1));
                    lua_pop(L, 2);
                    return -1;
                }
            }
        } else if (!strcmp(k, "curve")) {
            WANT(LUA_TSTRING)
            {
                t->curve = softcxi_curve_from_name(lua_tostring(L, -1));
                if (t->curve < 0) {
                    snprintf(msg, cap,
                             "template.curve: unknown curve '%s' (P-256, P-384, P-521, "
                             "secp256k1)",
                             lua_tostring(L, -1));
                    lua_pop(L, 2);
                    return -1;
                }
            }
        } else if (!strcmp(k, "hash")) {
            WANT(LUA_TSTRING) hash = lua_tostring(L, -1);
        } else if (!strcmp(k, "size")) {
            if (!get_int(L, -1, 1, 65535, &iv))
                bad = 1;
            else
                t->size = (unsigned)iv;
        } else if (!strcmp(k, "name")) {
            bad = !(t->name = get_name(L, -1));
        } else if (!strcmp(k, "group")) {
            bad = !(t->group = get_name(L, -1));
        } else if (!strcmp(k, "label")) {
            bad = !(t->label = get_name(L, -1));
        } else if (!strcmp(k, "specifier")) {
            if (!get_int(L, -1, 0, 0xFFFFFFFF, &iv))
                bad = 1;
            else {
                t->specifier = (uint32_t)iv;
                t->has_specifier = 1;
            }
        } else if (!strcmp(k, "expiry")) {
            if (!get_int(L, -1, 0, INT64_MAX, &iv))
                bad = 1;
            else
                t->expiry = (int64_t)iv;
        } else if (!strcmp(k, "export")) {
            WANT(LUA_TSTRING)
            {
                t->export_policy = softcxi_export_from_name(lua_tostring(L, -1));
                if (t->export_policy < 0) {
                    snprintf(msg, cap,
                             "template.export: unknown policy '%s' (deny, allow, allow-plain, "
                             "deny-backup)",
                             lua_tostring(L, -1));
                    lua_pop(L, 2);
                    return -1;
                }
            }
        } else if (!strcmp(k, "usage")) {
            WANT(LUA_TTABLE)
            {
                size_t n = lua_rawlen(L, -1);
                for (size_t i = 1; i <= n; i++) {
                    lua_rawgeti(L, -1, (int)i);
                    const char *u = lua_tostring(L, -1);
                    int bit = u ? softcxi_usage_from_name(u) : -1;
                    if (bit < 0) {
                        snprintf(msg, cap,
                                 "template.usage: unknown usage '%s' (sign, verify, encrypt, "
                                 "decrypt, wrap, unwrap, derive)",
                                 u ? u : "?");
                        lua_pop(L, 3);
                        return -1;
                    }
                    t->usage |= (unsigned)bit;
                    lua_pop(L, 1);
                }
            }
        } else {
            snprintf(msg, cap, "template: unknown field '%s'", k);
            lua_pop(L, 2);
            return -1;
        }
#undef WANT
        if (bad) {
            snprintf(msg, cap, "template.%s: wrong type or range (%s%s)", k, lua_typename(L, vt),
                     vt == LUA_TSTRING ? " with an embedded NUL" : "");
            lua_pop(L, 2);
            return -1;
        }
        lua_pop(L, 1);
    }
    if (hash) { /* algo = "hmac", hash = "sha384" */
        int want = !strcmp(hash, "sha256")   ? SOFTCXI_ALGO_HMAC_SHA256
                   : !strcmp(hash, "sha384") ? SOFTCXI_ALGO_HMAC_SHA384
                   : !strcmp(hash, "sha512") ? SOFTCXI_ALGO_HMAC_SHA512
                                             : -1;
        if (want < 0) {
            snprintf(msg, cap, "template.hash: unknown hash '%s' (sha256, sha384, sha512)", hash);
            return -1;
        }
        if (algo_name && !strcmp(algo_name, "hmac")) {
            t->algo = want;
        } else if (t->algo != want) {
            snprintf(msg, cap, "template.hash: '%s' does not go with algo '%s'", hash,
                     algo_name ? algo_name : "(none)");
            return -1;
        }
    }
    if (need_algo && t->algo == SOFTCXI_ALGO_NONE) {
        snprintf(msg, cap, "template.algo: required");
        return -1;
    }
    return 0;
}

/* ---- key info ---------------------------------------------------------- */

static void set_str(lua_State *L, const char *k, const char *v, size_t n)
{
    if (v) {
        lua_pushlstring(L, v, n);
        lua_setfield(L, -2, k);
    }
}

/* A key check value as 16 hex digits (out: 17 bytes). */
static const char *kcv_hex(char out[17], const uint8_t kcv[8])
{
    static const char digits[] = "0123456789abcdef";
    for (int k = 0; k < 8; k++) {
        out[2 * k] = digits[kcv[k] >> 4];
        out[2 * k + 1] = digits[kcv[k] & 15];
    }
    out[16] = '\0';
    return out;
}

/* t[k] = v for the table on top of the stack. */
static void set_cstr(lua_State *L, const char *k, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void set_int(lua_State *L, const char *k, lua_Integer v)
{
    lua_pushinteger(L, v);
    lua_setfield(L, -2, k);
}

/* Append the table on top of the stack to the array below it. */
static void append(lua_State *L)
{
    lua_rawseti(L, -2, (int)lua_rawlen(L, -2) + 1);
}

static void push_info(lua_State *L, const softcxi_key_info *i)
{
    char kcv[17];
    lua_createtable(L, 0, 16);
    if (softcxi_algo_name(i->algo)) {
        lua_pushstring(L, softcxi_algo_name(i->algo));
        lua_setfield(L, -2, "algo");
    }
    if (i->curve && softcxi_curve_name(i->curve)) {
        lua_pushstring(L, softcxi_curve_name(i->curve));
        lua_setfield(L, -2, "curve");
    }
    if (i->size) {
        lua_pushinteger(L, (lua_Integer)i->size);
        lua_setfield(L, -2, "size");
    }
    set_str(L, "name", i->name, i->name_len);
    set_str(L, "group", i->group, i->group_len);
    set_str(L, "label", i->label, i->label_len);
    if (i->has_specifier) {
        lua_pushinteger(L, (lua_Integer)i->specifier);
        lua_setfield(L, -2, "specifier");
    }
    lua_createtable(L, 7, 0);
    int n = 0;
    for (unsigned bit = 1; bit <= SOFTCXI_USAGE_UNWRAP; bit <<= 1)
        if (i->usage & bit) {
            lua_pushstring(L, softcxi_usage_name(bit));
            lua_rawseti(L, -2, ++n);
        }
    lua_setfield(L, -2, "usage");
    if (softcxi_export_name(i->export_policy)) {
        lua_pushstring(L, softcxi_export_name(i->export_policy));
        lua_setfield(L, -2, "export");
    }
    if (i->gen_date) {
        lua_pushinteger(L, (lua_Integer)i->gen_date);
        lua_setfield(L, -2, "gen_date");
    }
    if (i->expiry) {
        lua_pushinteger(L, (lua_Integer)i->expiry);
        lua_setfield(L, -2, "expiry");
    }
    if (i->pub_len) {
        lua_pushlstring(L, (const char *)i->pub, i->pub_len);
        lua_setfield(L, -2, "public_key");
    }
    set_cstr(L, "kcv", kcv_hex(kcv, i->kcv));
    lua_pushinteger(L, i->version);
    lua_setfield(L, -2, "version");
    lua_pushstring(L, i->type == 2 ? "key-backup" : "key");
    lua_setfield(L, -2, "type");
    lua_pushinteger(L, (lua_Integer)i->blob_len);
    lua_setfield(L, -2, "blob_size");
    lua_pushboolean(L, i->verified);
    lua_setfield(L, -2, "verified");
}

static int check_pubfmt(lua_State *L, int idx)
{
    const char *f = luaL_optstring(L, idx, "pem");
    int fmt = softcxi_pubfmt_from_name(f);
    if (fmt < 0)
        luaL_argerror(L, idx, "format must be der, pem, jwk or raw");
    return fmt;
}

/* ---- module functions -------------------------------------------------- */

static int l_open(lua_State *L)
{
    softcxi_open_req req = {0};
    softcxi_error err = {0, ""};
    softcxi_device *dev = NULL;
    req.path = luaL_checkstring(L, 1);
    req.keyfile = luaL_optstring(L, 2, NULL);
    req.cache_entries = (long)luaL_optinteger(L, 3, -1);
    lua_Integer limit = luaL_optinteger(L, 4, 0);
    luaL_argcheck(L, limit >= 0, 4, "keydb_limit must be >= 0");
    req.keydb_limit = (size_t)limit;
    /* The userdata first, so a raised error cannot strand the device. */
    lsession *ls = lua_newuserdata(L, sizeof *ls);
    ls->s = NULL;
    ls->jobs = NULL;
    ls->njobs = 0;
    luaL_setmetatable(L, SESSION_MT);
    if (softcxi_device_open(&dev, &req, &err) != 0)
        return push_error(L, &err);
    ls->s = softcxi_session_new(dev);
    softcxi_device_free(dev); /* the session holds the reference now */
    if (!ls->s)
        return luaL_error(L, "softcxi.open: out of memory");
    return 1;
}

/* init(path, keyfile|nil, admin, password, kdf_cost|nil) -> true */
static int l_init(lua_State *L)
{
    softcxi_init_req req = {0};
    softcxi_error err = {0, ""};
    req.path = luaL_checkstring(L, 1);
    req.keyfile = luaL_optstring(L, 2, NULL);
    req.admin = luaL_checkstring(L, 3);
    req.password = luaL_checkstring(L, 4);
    lua_Integer cost = luaL_optinteger(L, 5, 0);
    luaL_argcheck(L, cost >= 0 && cost <= 30, 5, "kdf_cost out of range");
    req.kdf_cost = (unsigned)cost;
    if (softcxi_device_init(&req, &err) != 0)
        return push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_key_info(lua_State *L)
{
    size_t len;
    const uint8_t *blob = check_bytes(L, 1, &len);
    softcxi_key_info info;
    softcxi_error err;
    if (softcxi_key_info_read(&info, blob, len, &err) != 0)
        return push_error(L, &err);
    push_info(L, &info);
    return 1;
}

/* key_attrs(blob) -> { algo =, name =, group =, specifier =, name_h31 = }: the clear
 * attributes the stores index, parsed and checked as key_info does, without the rest of
 * its table.  The stores check every blob they read or write with it (rewrap: two per
 * blob).  name_h31 is the sum over the name's bytes of h = h * 31 + byte, mod 2^32: where
 * the Redis store's name index puts the name starts from it (store/redis.lua,
 * name_bucket), and here, with the bytes at hand, it costs nothing, against ~1 us per
 * key in Lua 5.4. */
static int l_key_attrs(lua_State *L)
{
    size_t len;
    const uint8_t *blob = check_bytes(L, 1, &len);
    softcxi_key_info info;
    softcxi_error err;
    if (softcxi_key_info_read(&info, blob, len, &err) != 0)
        return push_error(L, &err);
    lua_createtable(L, 0, 5);
    if (softcxi_algo_name(info.algo)) {
        lua_pushstring(L, softcxi_algo_name(info.algo));
        lua_setfield(L, -2, "algo");
    }
    set_str(L, "name", info.name, info.name_len);
    if (info.name) {
        uint32_t h = 0;
        for (size_t i = 0; i < info.name_len; i++)
            h = h * 31u + (uint8_t)info.name[i];
        lua_pushinteger(L, (lua_Integer)h);
        lua_setfield(L, -2, "name_h31");
    }
    set_str(L, "group", info.group, info.group_len);
    if (info.has_specifier) {
        lua_pushinteger(L, (lua_Integer)info.specifier);
        lua_setfield(L, -2, "specifier");
    }
    return 1;
}

/* key_check(blob) -> true | nil, msg, code: a key blob whose clear attributes parse
 * (as key_info), without building key_info's table.  A store checks every blob a
 * rewrap scans with it. */
static int l_key_check(lua_State *L)
{
    size_t len;
    const uint8_t *blob = check_bytes(L, 1, &len);
    softcxi_key_info info;
    softcxi_error err;
    if (softcxi_key_info_read(&info, blob, len, &err) != 0)
        return push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int same_bytes(const char *a, size_t alen, const char *b, size_t blen)
{
    return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}

/* same_index(a, b) -> true | false, what differs | nil, msg, code: whether two blobs
 * carry the same indexed attributes (algo, name, group, specifier), so a store can
 * replace a by b without touching its index (rewrap's compare-and-set).  nil when b
 * (or a) is not a key blob: the store checks the blob it is about to write here. */
static int l_same_index(lua_State *L)
{
    size_t alen, blen;
    const uint8_t *a = check_bytes(L, 1, &alen), *b = check_bytes(L, 2, &blen);
    softcxi_key_info ia, ib;
    softcxi_error err;
    if (softcxi_key_info_read(&ib, b, blen, &err) != 0 ||
        softcxi_key_info_read(&ia, a, alen, &err) != 0)
        return push_error(L, &err);
    const char *what = ia.algo != ib.algo ? "algo"
                       : !same_bytes(ia.name, ia.name_len, ib.name, ib.name_len) ? "name"
                       : !same_bytes(ia.group, ia.group_len, ib.group, ib.group_len) ? "group"
                       : ia.has_specifier != ib.has_specifier || ia.specifier != ib.specifier
                           ? "specifier"
                           : NULL;
    lua_pushboolean(L, what == NULL);
    if (!what)
        return 1;
    lua_pushfstring(L, "the %s differs", what);
    return 2;
}

static int l_public_key(lua_State *L)
{
    size_t len;
    const uint8_t *blob = check_bytes(L, 1, &len);
    int fmt = check_pubfmt(L, 2);
    softcxi_buf out = {0};
    softcxi_error err;
    if (softcxi_public_key_read(&out, blob, len, fmt, &err) != 0)
        return push_error(L, &err);
    push_buf(L, &out);
    return 1;
}

static int l_hash_compute(lua_State *L)
{
    int mech;
    size_t len, dlen = 0;
    uint8_t d[64];
    softcxi_error err;
    if (check_mech(L, 1, &mech) != 0)
        return 3;
    const uint8_t *in = check_bytes(L, 2, &len);
    if (softcxi_hash_compute(d, &dlen, mech, in, len, &err) != 0)
        return push_error(L, &err);
    lua_pushlstring(L, (const char *)d, dlen);
    return 1;
}

/* ---- session methods --------------------------------------------------- */

/* Closing a busy session is allowed: a job needs nothing of it (the core
 * job holds copies of all it uses) and still delivers its keys. */
static int m_close(lua_State *L)
{
    lsession *ls = luaL_checkudata(L, 1, SESSION_MT);
    while (ls->jobs)
        job_release(ls->jobs);
    softcxi_session_free(ls->s);
    ls->s = NULL;
    return 0;
}

static int m_tostring(lua_State *L)
{
    lsession *ls = luaL_checkudata(L, 1, SESSION_MT);
    if (ls->s)
        lua_pushfstring(L, "softcxi.session (%p)", (void *)ls);
    else
        lua_pushliteral(L, "softcxi.session (closed)");
    return 1;
}

static int m_device_info(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_device *dev = softcxi_session_device(ls->s);
    softcxi_cache_stats st;
    uint8_t kcv[8];
    char hex[17];
    softcxi_cache_stats_get(ls->s, &st);
    softcxi_device_kcv(dev, kcv);
    kcv_hex(hex, kcv);
    lua_createtable(L, 0, 8);
    set_cstr(L, "id", softcxi_device_id(dev));
    set_cstr(L, "kcv", hex);
    set_cstr(L, "keyfile", softcxi_device_keyfile(dev));
    set_int(L, "cache_hits", (lua_Integer)st.hits);
    set_int(L, "cache_misses", (lua_Integer)st.misses);
    set_int(L, "cache_evictions", (lua_Integer)st.evictions);
    set_int(L, "cache_entries", (lua_Integer)st.entries);
    set_int(L, "cache_capacity", (lua_Integer)st.capacity);
    return 1;
}

static int m_key_generate(lua_State *L)
{
    lsession *ls = check_session(L);
    lua_Integer flags = luaL_checkinteger(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    softcxi_template t;
    char msg[200];
    if (read_template(L, 3, &t, msg, sizeof msg, 1) != 0)
        return push_einval(L, msg);
    softcxi_buf blob = {0};
    if (softcxi_key_generate(ls->s, &blob, (unsigned)flags, &t) != 0)
        return session_error(L, ls);
    push_buf(L, &blob);
    return 1;
}

/* The arguments of bulk_generate and bulk_generate_start: (flags, template,
 * n [, names [, threads]]) at 2..6.  Returns 0, or -1 with nil, msg, code
 * pushed.  *names is a userdata-held array (collected even if something
 * raises) of strings the names table keeps alive. */
typedef struct bulk_args {
    unsigned flags, threads;
    size_t count;
    softcxi_template t;
    const char **names;
} bulk_args;

static int check_bulk_args(lua_State *L, const char *fn, bulk_args *a)
{
    lua_Integer flags = luaL_checkinteger(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_Integer n = luaL_checkinteger(L, 4);
    luaL_argcheck(L, n >= 0 && n <= (1 << 24), 4, "0 to 16M keys per call");
    int has_names = !lua_isnoneornil(L, 5);
    if (has_names)
        luaL_checktype(L, 5, LUA_TTABLE);
    lua_Integer threads = luaL_optinteger(L, 6, 0);
    luaL_argcheck(L, threads >= 0 && threads <= SOFTCXI_BULK_MAX_THREADS, 6, "0 to 16 threads");
    char msg[200];
    if (read_template(L, 3, &a->t, msg, sizeof msg, 1) != 0) {
        push_einval(L, msg);
        return -1;
    }
    a->flags = (unsigned)flags;
    a->threads = (unsigned)threads;
    a->count = (size_t)n;
    a->names = has_names ? lua_newuserdata(L, (a->count ? a->count : 1) * sizeof *a->names)
                         : NULL;
    for (size_t i = 0; has_names && i < a->count; i++) {
        lua_rawgeti(L, 5, (int)(i + 1));
        a->names[i] = get_name(L, -1);
        if (!a->names[i])
            luaL_error(L, "%s: name %d is not a string without NUL", fn, (int)(i + 1));
        lua_pop(L, 1); /* the table keeps the string alive */
    }
    return 0;
}

/* bulk_generate(flags, template, n [, names [, threads]]) -> { blob, ... } */
static int m_bulk_generate(lua_State *L)
{
    lsession *ls = check_session(L);
    bulk_args a;
    if (check_bulk_args(L, "bulk_generate", &a) != 0)
        return 3;
    /* Scratch array as userdata: collected even if a later call raises. */
    softcxi_buf *blobs = lua_newuserdata(L, (a.count ? a.count : 1) * sizeof *blobs);
    if (softcxi_bulk_generate(ls->s, blobs, a.flags, &a.t, a.names, a.count, a.threads) != 0)
        return session_error(L, ls);
    lua_createtable(L, (int)a.count, 0);
    for (size_t i = 0; i < a.count; i++) {
        push_buf(L, &blobs[i]);
        lua_rawseti(L, -2, (int)(i + 1));
    }
    return 1;
}

/* ---- bulk generation jobs ------------------------------------------------ */

/* Stop (if running), join, free; the job no longer keeps its session busy. */
static void job_end(ljob *j, int state)
{
    softcxi_bulk_job_free(j->job); /* joins the workers: they never call Lua */
    j->job = NULL;
    job_release(j);
    if (j->state == JOB_RUNNING)
        j->state = state;
}

/* bulk_generate_start(flags, template, n [, names [, threads]]) -> job.
 * The checks of the call fail here (nil, msg, code); the keys are made on
 * C threads while Lua goes on, and job:wait() collects them. */
static int m_bulk_generate_start(lua_State *L)
{
    lsession *ls = check_start_session(L);
    bulk_args a;
    if (check_bulk_args(L, "bulk_generate_start", &a) != 0)
        return 3;
    /* The userdata first, so that a raised error cannot strand a job. */
    ljob *j = lua_newuserdata(L, sizeof *j);
    j->job = NULL;
    j->owner = NULL;
    j->next = NULL;
    j->count = a.count;
    j->state = JOB_RUNNING;
    luaL_setmetatable(L, JOB_MT);
    softcxi_bulk_job *job = NULL;
    if (softcxi_bulk_generate_start(ls->s, &job, a.flags, &a.t, a.names, a.count, a.threads) !=
        0) {
        j->state = JOB_CANCELLED;
        return session_error(L, ls);
    }
    j->job = job;
    j->owner = ls; /* last on the session's list */
    ljob **p = &ls->jobs;
    while (*p)
        p = &(*p)->next;
    *p = j;
    ls->njobs++;
    return 1;
}

static ljob *check_job(lua_State *L)
{
    return luaL_checkudata(L, 1, JOB_MT);
}

/* job:wait() -> { blob, ... } or nil, msg, code: blocks until the keys are
 * made; all or nothing, as bulk_generate.  Once per job. */
static int j_wait(lua_State *L)
{
    ljob *j = check_job(L);
    if (j->state != JOB_RUNNING || !j->job)
        return luaL_error(L, "softcxi: bulk_generate job: %s already",
                          j->state == JOB_WAITED ? "waited for" : "cancelled");
    softcxi_buf *blobs = NULL;
    softcxi_error err = {0, ""};
    int rc = softcxi_bulk_job_wait(j->job, &blobs, &err);
    j->state = JOB_WAITED;
    job_release(j); /* off the session's list, whatever comes next */
    if (rc != 0) {
        job_end(j, JOB_WAITED);
        return push_error(L, &err);
    }
    /* If a push raises (out of memory), __gc frees the blobs not taken. */
    lua_createtable(L, (int)j->count, 0);
    for (size_t i = 0; i < j->count; i++) {
        push_buf(L, &blobs[i]);
        lua_rawseti(L, -2, (int)(i + 1));
    }
    job_end(j, JOB_WAITED);
    return 1;
}

/* job:ready() -> true when wait() would not block (or the job is over). */
static int j_ready(lua_State *L)
{
    ljob *j = check_job(L);
    lua_pushboolean(L, !j->job || softcxi_bulk_job_ready(j->job));
    return 1;
}

/* job:cancel(): stop the workers after their current key, wait for them,
 * drop what they made; the session is free again.  A no-op once over. */
static int j_cancel(lua_State *L)
{
    job_end(check_job(L), JOB_CANCELLED);
    return 0;
}

static int j_gc(lua_State *L)
{
    job_end(check_job(L), JOB_CANCELLED);
    return 0;
}

static int j_tostring(lua_State *L)
{
    ljob *j = check_job(L);
    const char *st = j->state == JOB_WAITED      ? "waited for"
                     : j->state == JOB_CANCELLED ? "cancelled"
                     : softcxi_bulk_job_ready(j->job) ? "ready"
                                                      : "running";
    lua_pushfstring(L, "softcxi.bulk_job (%d keys, %s)", (int)j->count, st);
    return 1;
}

static const luaL_Reg job_methods[] = {
    {"wait", j_wait},
    {"ready", j_ready},
    {"cancel", j_cancel},
    {NULL, NULL},
};

/* key_import(flags, template, data, format [, unwrap_key]) -> blob */
static int m_key_import(lua_State *L)
{
    static const char *const formats[] = {"pkcs8", "spki", "raw", "jwk", "aes-kwp",
                                          "rsa-aes-kwp", NULL};
    static const int values[] = {SOFTCXI_IMPORT_PKCS8, SOFTCXI_IMPORT_SPKI, SOFTCXI_IMPORT_RAW,
                                 SOFTCXI_IMPORT_JWK, -SOFTCXI_WRAP_AES_KWP,
                                 -SOFTCXI_WRAP_RSA_AES_KWP};
    lsession *ls = check_session(L);
    lua_Integer flags = luaL_checkinteger(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    size_t len, ulen = 0;
    const uint8_t *data = check_bytes(L, 4, &len);
    int format = values[luaL_checkoption(L, 5, NULL, formats)];
    /* negative: a wrapping mechanism, and the unwrapping key comes next */
    const uint8_t *unwrap = format < 0 ? check_bytes(L, 6, &ulen) : NULL;
    softcxi_template t;
    char msg[200];
    if (read_template(L, 3, &t, msg, sizeof msg, 0) != 0)
        return push_einval(L, msg);
    softcxi_buf blob = {0};
    int rc = format < 0 ? softcxi_key_unwrap(ls->s, &blob, (unsigned)flags, &t, data, len,
                                             -format, unwrap, ulen)
                        : softcxi_key_import(ls->s, &blob, (unsigned)flags, &t, data, len,
                                             format);
    if (rc != 0)
        return session_error(L, ls);
    push_buf(L, &blob);
    return 1;
}

/* key_export(blob, wrap_key|nil [, mech]) -> wrapped (or plain) key */
static int m_key_export(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t len, wlen = 0;
    const uint8_t *blob = check_bytes(L, 2, &len);
    const uint8_t *wrap = opt_bytes(L, 3, &wlen);
    int mech = SOFTCXI_WRAP_AUTO;
    if (!lua_isnoneornil(L, 4)) {
        const char *name = luaL_checkstring(L, 4);
        if ((mech = softcxi_wrap_from_name(name)) < 0) {
            lua_pushnil(L);
            lua_pushfstring(L, "key_export: unknown wrapping mechanism '%s' (aes-kwp, "
                               "rsa-aes-kwp)",
                            name);
            lua_pushstring(L, "EINVAL");
            return 3;
        }
    }
    softcxi_buf out = {0};
    if (softcxi_key_export(ls->s, &out, blob, len, mech, wrap, wlen) != 0)
        return session_error(L, ls);
    push_buf(L, &out); /* wiped once Lua has its copy */
    return 1;
}

static int m_sign(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_sign_req req = {0};
    softcxi_buf sig = {0};
    req.blob = check_bytes(L, 2, &req.blob_len);
    if (check_mech(L, 3, &req.mech) != 0)
        return 3;
    req.msg = check_bytes(L, 4, &req.msg_len);
    req.flags = lua_toboolean(L, 5) ? SOFTCXI_SIG_RAW : 0;
    if (softcxi_sign(ls->s, &sig, &req) != 0)
        return session_error(L, ls);
    push_buf(L, &sig);
    return 1;
}

static int m_verify(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_sign_req req = {0};
    size_t sig_len;
    req.blob = check_bytes(L, 2, &req.blob_len);
    if (check_mech(L, 3, &req.mech) != 0)
        return 3;
    req.msg = check_bytes(L, 4, &req.msg_len);
    const uint8_t *sig = check_bytes(L, 5, &sig_len);
    req.flags = lua_toboolean(L, 6) ? SOFTCXI_SIG_RAW : 0;
    int rc = softcxi_verify(ls->s, &req, sig, sig_len);
    if (rc < 0)
        return session_error(L, ls);
    lua_pushboolean(L, rc == 1);
    return 1;
}

static int m_bulk_sign(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_sign_req req = {0};
    req.blob = check_bytes(L, 2, &req.blob_len);
    if (check_mech(L, 3, &req.mech) != 0)
        return 3;
    luaL_checktype(L, 4, LUA_TTABLE);
    req.flags = lua_toboolean(L, 5) ? SOFTCXI_SIG_RAW : 0;
    size_t n = lua_rawlen(L, 4);
    /* Scratch arrays as userdata: collected even if a later call raises. */
    const uint8_t **msgs = lua_newuserdata(L, (n ? n : 1) * sizeof *msgs);
    size_t *lens = lua_newuserdata(L, (n ? n : 1) * sizeof *lens);
    softcxi_buf *sigs = lua_newuserdata(L, (n ? n : 1) * sizeof *sigs);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, 4, (int)(i + 1));
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "bulk_sign: message %d is not a string", (int)(i + 1));
        msgs[i] = (const uint8_t *)lua_tolstring(L, -1, &lens[i]);
        lua_pop(L, 1); /* the table keeps the string alive */
    }
    if (softcxi_bulk_sign(ls->s, sigs, &req, msgs, lens, n) != 0)
        return session_error(L, ls);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        push_buf(L, &sigs[i]);
        lua_rawseti(L, -2, (int)(i + 1));
    }
    return 1;
}

static int m_mac(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_sign_req req = {0};
    softcxi_buf mac = {0};
    req.blob = check_bytes(L, 2, &req.blob_len);
    if (check_mech(L, 3, &req.mech) != 0)
        return 3;
    req.msg = check_bytes(L, 4, &req.msg_len);
    if (softcxi_mac(ls->s, &mac, &req) != 0)
        return session_error(L, ls);
    push_buf(L, &mac);
    return 1;
}

static int m_mac_verify(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_sign_req req = {0};
    size_t tag_len;
    req.blob = check_bytes(L, 2, &req.blob_len);
    if (check_mech(L, 3, &req.mech) != 0)
        return 3;
    req.msg = check_bytes(L, 4, &req.msg_len);
    const uint8_t *tag = check_bytes(L, 5, &tag_len);
    int rc = softcxi_mac_verify(ls->s, &req, tag, tag_len);
    if (rc < 0)
        return session_error(L, ls);
    lua_pushboolean(L, rc == 1);
    return 1;
}

/* encrypt(blob, mech, data [, aad [, iv]]) -> ciphertext, iv, tag */
static int m_encrypt(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_crypt_req req = {0};
    softcxi_buf out = {0};
    uint8_t iv[SOFTCXI_GCM_IV_LEN], tag[SOFTCXI_GCM_TAG_LEN];
    req.blob = check_bytes(L, 2, &req.blob_len);
    if (check_mech(L, 3, &req.mech) != 0)
        return 3;
    req.in = check_bytes(L, 4, &req.in_len);
    req.aad = opt_bytes(L, 5, &req.aad_len);
    req.iv = opt_bytes(L, 6, &req.iv_len);
    if (softcxi_encrypt(ls->s, &out, iv, tag, &req) != 0)
        return session_error(L, ls);
    push_buf(L, &out);
    if (req.mech != SOFTCXI_MECH_AES_GCM)
        return 1;
    lua_pushlstring(L, (const char *)iv, sizeof iv);
    lua_pushlstring(L, (const char *)tag, sizeof tag);
    return 3;
}

/* decrypt(blob, mech, data [, aad [, iv [, tag]]]) -> plaintext */
static int m_decrypt(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_crypt_req req = {0};
    softcxi_buf out = {0};
    req.blob = check_bytes(L, 2, &req.blob_len);
    if (check_mech(L, 3, &req.mech) != 0)
        return 3;
    req.in = check_bytes(L, 4, &req.in_len);
    req.aad = opt_bytes(L, 5, &req.aad_len);
    req.iv = opt_bytes(L, 6, &req.iv_len);
    req.tag = opt_bytes(L, 7, &req.tag_len);
    if (softcxi_decrypt(ls->s, &out, &req) != 0)
        return session_error(L, ls);
    push_buf(L, &out);
    return 1;
}

/* secret_agree(blob, mech, peer, raw, template|nil, salt|nil, info|nil) */
static int m_secret_agree(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_agree_req req = {0};
    softcxi_template t;
    softcxi_buf out = {0};
    char msg[200];
    req.blob = check_bytes(L, 2, &req.blob_len);
    if (check_mech(L, 3, &req.mech) != 0)
        return 3;
    req.peer = check_bytes(L, 4, &req.peer_len);
    req.flags = lua_toboolean(L, 5) ? SOFTCXI_AGREE_RAW : 0;
    if (!lua_isnoneornil(L, 6)) {
        luaL_checktype(L, 6, LUA_TTABLE);
        if (read_template(L, 6, &t, msg, sizeof msg, 0) != 0)
            return push_einval(L, msg);
        req.derived = &t;
    }
    req.salt = opt_bytes(L, 7, &req.salt_len);
    req.info = opt_bytes(L, 8, &req.info_len);
    if (softcxi_secret_agree(ls->s, &out, &req) != 0)
        return session_error(L, ls);
    push_buf(L, &out); /* a raw secret is wiped once Lua has its copy */
    return 1;
}

static int m_rnd_gen(lua_State *L)
{
    lsession *ls = check_session(L);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_argcheck(L, n >= 0 && n <= (1 << 24), 2, "0 to 16 MiB");
    luaL_Buffer b;
    uint8_t *p = (uint8_t *)luaL_buffinitsize(L, &b, (size_t)n);
    if (softcxi_rnd_gen(ls->s, p, (size_t)n) != 0)
        return session_error(L, ls);
    luaL_pushresultsize(&b, (size_t)n);
    return 1;
}

static int m_key_info(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t len;
    const uint8_t *blob = check_bytes(L, 2, &len);
    softcxi_key_info info;
    if (softcxi_key_info_check(ls->s, &info, blob, len) != 0)
        return session_error(L, ls);
    push_info(L, &info);
    return 1;
}

static int m_public_key(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t len;
    const uint8_t *blob = check_bytes(L, 2, &len);
    int fmt = check_pubfmt(L, 3);
    softcxi_buf out = {0};
    if (softcxi_public_key(ls->s, &out, blob, len, fmt) != 0)
        return session_error(L, ls);
    push_buf(L, &out);
    return 1;
}

static int m_hash_compute(lua_State *L)
{
    check_session(L);
    lua_remove(L, 1);
    return l_hash_compute(L);
}

/* Raises if the session is closed or busy; the facade calls it on its own
 * paths.  _check(s, "bulk_generate_start") raises as that call would: only
 * when the session runs SESSION_JOBS jobs already. */
static int m_check(lua_State *L)
{
    if (lua_isstring(L, 2) && strcmp(lua_tostring(L, 2), "bulk_generate_start") == 0)
        check_start_session(L);
    else
        check_session(L);
    return 0;
}

static int m_logon_pass(lua_State *L)
{
    lsession *ls = check_session(L);
    const char *name = luaL_checkstring(L, 2), *password = luaL_checkstring(L, 3);
    if (softcxi_logon_pass(ls->s, name, password) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

/* logon_sign(name, key) -> true: challenge, signature and check in one
 * call; key is the user's private key (PEM or DER), his credential. */
static int m_logon_sign(lua_State *L)
{
    lsession *ls = check_session(L);
    const char *name = luaL_checkstring(L, 2);
    size_t len;
    const uint8_t *key = check_bytes(L, 3, &len);
    if (softcxi_logon_sign(ls->s, name, key, len) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

/* logon_challenge(name) -> message to sign */
static int m_logon_challenge(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_buf msg = {0};
    if (softcxi_logon_challenge(ls->s, &msg, luaL_checkstring(L, 2)) != 0)
        return session_error(L, ls);
    push_buf(L, &msg);
    return 1;
}

/* logon_response(name, signature) -> true */
static int m_logon_response(lua_State *L)
{
    lsession *ls = check_session(L);
    const char *name = luaL_checkstring(L, 2);
    size_t len;
    const uint8_t *sig = check_bytes(L, 3, &len);
    if (softcxi_logon_response(ls->s, name, sig, len) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

/* softcxi.core.logon_answer(message, key) -> signature (the user's side) */
static int l_logon_answer(lua_State *L)
{
    size_t mlen, klen;
    const uint8_t *msg = check_bytes(L, 1, &mlen), *key = check_bytes(L, 2, &klen);
    softcxi_buf sig = {0};
    softcxi_error err;
    if (softcxi_logon_answer(&sig, msg, mlen, key, klen, &err) != 0)
        return push_error(L, &err);
    push_buf(L, &sig);
    return 1;
}

static int m_logoff(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_logoff(ls->s);
    return 0;
}

/* user_add(name, password|nil, role, level, groups, kdf_cost|nil, pubkey|nil) -> true */
static int m_user_add(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_user_req req = {0};
    static const char *const roles[] = {"admin", "user", NULL};
    req.name = luaL_checkstring(L, 2);
    req.password = luaL_optstring(L, 3, NULL);
    req.pubkey = opt_bytes(L, 8, &req.pubkey_len);
    req.role = luaL_checkoption(L, 4, "user", roles) == 0 ? SOFTCXI_ROLE_ADMIN : SOFTCXI_ROLE_USER;
    lua_Integer level = luaL_optinteger(L, 5, 1);
    luaL_argcheck(L, level >= 0 && level <= 2, 5, "level is 0, 1 or 2");
    req.level = (unsigned)level;
    req.groups = luaL_optstring(L, 6, "");
    lua_Integer cost = luaL_optinteger(L, 7, 0);
    luaL_argcheck(L, cost >= 0 && cost <= 30, 7, "kdf_cost out of range");
    req.kdf_cost = (unsigned)cost;
    if (softcxi_user_add(ls->s, &req) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

/* user_set(name, password|nil, pubkey|nil, groups|nil, level|nil, unlock, kdf_cost|nil) */
static int m_user_set(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_user_set_req req = {0};
    req.name = luaL_checkstring(L, 2);
    req.password = luaL_optstring(L, 3, NULL);
    req.pubkey = opt_bytes(L, 4, &req.pubkey_len);
    req.groups = luaL_optstring(L, 5, NULL);
    lua_Integer level = luaL_optinteger(L, 6, -1);
    luaL_argcheck(L, level >= -1 && level <= 2, 6, "level is 0, 1 or 2");
    req.level = (int)level;
    req.unlock = lua_toboolean(L, 7);
    lua_Integer cost = luaL_optinteger(L, 8, 0);
    luaL_argcheck(L, cost >= 0 && cost <= 30, 8, "kdf_cost out of range");
    req.kdf_cost = (unsigned)cost;
    if (softcxi_user_set(ls->s, &req) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

static int m_user_delete(lua_State *L)
{
    lsession *ls = check_session(L);
    if (softcxi_user_delete(ls->s, luaL_checkstring(L, 2)) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

static int push_user(void *ctx, const softcxi_user_info *u)
{
    lua_State *L = ctx;
    lua_createtable(L, 0, 6);
    set_cstr(L, "name", u->name);
    set_cstr(L, "role", u->role);
    set_int(L, "level", (lua_Integer)u->level);
    set_cstr(L, "groups", u->groups);
    set_int(L, "failures", (lua_Integer)u->failures);
    set_int(L, "locked_until", (lua_Integer)u->locked_until);
    lua_pushboolean(L, u->has_password);
    lua_setfield(L, -2, "password");
    lua_pushboolean(L, u->has_pubkey);
    lua_setfield(L, -2, "pubkey");
    append(L);
    return 0;
}

static int m_user_list(lua_State *L)
{
    lsession *ls = check_session(L);
    lua_newtable(L);
    if (softcxi_user_list(ls->s, push_user, L) != 0)
        return session_error(L, ls);
    return 1;
}

/* Strings of the array at idx into a userdata-held array (collected even if
 * something raises); n receives the count. */
static const char **string_array(lua_State *L, int idx, size_t *n, const char *what)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    *n = lua_rawlen(L, idx);
    const char **a = lua_newuserdata(L, (*n ? *n : 1) * sizeof *a);
    for (size_t i = 0; i < *n; i++) {
        lua_rawgeti(L, idx, (int)(i + 1));
        a[i] = get_name(L, -1);
        if (!a[i])
            luaL_error(L, "%s %d is not a string", what, (int)(i + 1));
        lua_pop(L, 1); /* the table keeps it alive */
    }
    return a;
}

/* mbk_generate(m, n, paths, passwords, scheme, kdf_cost) -> true */
static int m_mbk_generate(lua_State *L)
{
    lsession *ls = check_session(L);
    static const char *const schemes[] = {"shamir", "xor", NULL};
    softcxi_mbk_req req = {0};
    size_t np, npw;
    lua_Integer m = luaL_checkinteger(L, 2), n = luaL_checkinteger(L, 3);
    luaL_argcheck(L, m >= 1 && m <= 255 && n >= 1 && n <= 255, 2, "1 <= m <= n <= 255");
    req.m = (unsigned)m, req.n = (unsigned)n;
    req.paths = string_array(L, 4, &np, "share file");
    req.passwords = string_array(L, 5, &npw, "password");
    luaL_argcheck(L, np == req.n && npw == req.n, 4, "n share files and n passwords");
    req.scheme = luaL_checkoption(L, 6, "shamir", schemes) == 0 ? SOFTCXI_SHARES_SHAMIR
                                                                : SOFTCXI_SHARES_XOR;
    lua_Integer cost = luaL_optinteger(L, 7, 0);
    luaL_argcheck(L, cost >= 0 && cost <= 30, 7, "kdf_cost out of range");
    req.kdf_cost = (unsigned)cost;
    if (softcxi_mbk_generate(ls->s, &req) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

/* mbk_import(paths, passwords) -> true */
static int m_mbk_import(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t np, npw;
    const char **paths = string_array(L, 2, &np, "share file");
    const char **pws = string_array(L, 3, &npw, "password");
    luaL_argcheck(L, np == npw, 3, "one password per share file");
    if (softcxi_mbk_import(ls->s, paths, pws, np) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

static int hex_kcv(lua_State *L, int idx, uint8_t kcv[8])
{
    size_t len;
    const char *h = luaL_checklstring(L, idx, &len);
    if (len != 16)
        return -1;
    for (int i = 0; i < 8; i++) {
        unsigned v;
        if (sscanf(h + 2 * i, "%2x", &v) != 1)
            return -1;
        kcv[i] = (uint8_t)v;
    }
    return 0;
}

static int m_mbk_retire(lua_State *L)
{
    lsession *ls = check_session(L);
    uint8_t kcv[8];
    if (hex_kcv(L, 2, kcv) != 0)
        return push_einval(L, "mbk_retire: the MBK's check value is 16 hex digits");
    if (softcxi_mbk_retire(ls->s, kcv) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

/* mbk_info() -> { current = kcv, older = { kcv, ... } } */
static int m_mbk_info(lua_State *L)
{
    lsession *ls = check_session(L);
    uint8_t kcvs[16][8];
    size_t n = 0;
    char hex[17];
    if (softcxi_mbk_info(ls->s, kcvs, 16, &n) != 0)
        return session_error(L, ls);
    lua_createtable(L, 0, 2);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushstring(L, kcv_hex(hex, kcvs[i]));
        if (i == 0) {
            lua_pushvalue(L, -1);
            lua_setfield(L, -4, "current");
        }
        if (i > 0)
            lua_rawseti(L, -2, (int)i);
        else
            lua_pop(L, 1);
    }
    lua_setfield(L, -2, "older");
    return 1;
}

/* key_rewrap(blob) -> new_blob, changed */
static int m_key_rewrap(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t len;
    const uint8_t *blob = check_bytes(L, 2, &len);
    softcxi_buf out = {0};
    int changed = 0;
    if (softcxi_key_rewrap(ls->s, &out, blob, len, &changed) != 0)
        return session_error(L, ls);
    push_buf(L, &out);
    lua_pushboolean(L, changed);
    return 2;
}

/* key_rewrap_many(blobs [, n [, threads]]) -> results, rewrapped: blobs[1..n]
 * (n: #blobs) re-sealed as key_rewrap would one by one, on up to `threads`
 * worker threads (default 0: one per online CPU).  results[i] is the new
 * blob, "current" (already under the current MBK: keep blobs[i]) or the
 * error code of that blob alone ("EMBK", "ETAMPER", "EFORMAT", "EACCESS",
 * ...; key_rewrap(blobs[i]) gives its message); rewrapped counts the new
 * blobs.  nil, msg, code when the call as a whole failed.  No key reaches
 * Lua: only blobs go in and out. */
/* The arrays of one key_rewrap_many call, in a userdata whose __gc frees the new blobs
 * not yet handed to Lua: a push that raises (out of memory) leaks none of them. */
#define REWRAP_MT "softcxi.rewrap_arrays"
typedef struct rewrap_arrays {
    size_t cnt;
    softcxi_buf *outs;
} rewrap_arrays;

static int rewrap_arrays_gc(lua_State *L)
{
    rewrap_arrays *ra = lua_touserdata(L, 1);
    for (size_t i = 0; ra->outs && i < ra->cnt; i++)
        softcxi_buf_free(&ra->outs[i]);
    ra->outs = NULL;
    return 0;
}

static int m_key_rewrap_many(lua_State *L)
{
    lsession *ls = check_session(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer n = luaL_optinteger(L, 3, (lua_Integer)lua_rawlen(L, 2));
    lua_Integer threads = luaL_optinteger(L, 4, 0);
    if (n < 0 || n > 1000000)
        return luaL_error(L, "key_rewrap_many: n must be in 0..1000000");
    if (threads < 0 || threads > SOFTCXI_BULK_MAX_THREADS)
        return luaL_error(L, "key_rewrap_many: threads must be in 0..%d",
                          SOFTCXI_BULK_MAX_THREADS);
    /* What may raise on bad arguments comes before the core allocates the
     * new blobs: the arrays (one userdata, collected on a raise), the
     * argument checks and the results table.  After the call only running
     * out of memory while pushing a result could raise; the userdata's
     * __gc then frees the blobs not pushed yet (none holds a secret). */
    size_t cnt = n ? (size_t)n : 1;
    size_t ptrs_off = (sizeof(rewrap_arrays) + sizeof(void *) - 1) / sizeof(void *) * sizeof(void *);
    size_t lens_off = ptrs_off + cnt * sizeof(const uint8_t *);
    size_t outs_off = lens_off + cnt * sizeof(size_t);
    size_t status_off = outs_off + cnt * sizeof(softcxi_buf);
    char *mem = lua_newuserdata(L, status_off + cnt * sizeof(int));
    rewrap_arrays *ra = (rewrap_arrays *)(void *)mem;
    const uint8_t **ptrs = (const uint8_t **)(void *)(mem + ptrs_off);
    size_t *lens = (size_t *)(void *)(mem + lens_off);
    softcxi_buf *outs = (softcxi_buf *)(void *)(mem + outs_off);
    int *status = (int *)(void *)(mem + status_off);
    memset(outs, 0, cnt * sizeof *outs);
    ra->cnt = cnt;
    ra->outs = outs;
    luaL_setmetatable(L, REWRAP_MT);
    int count = (int)n;
    for (int i = 0; i < count; i++) {
        lua_rawgeti(L, 2, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "key_rewrap_many: blobs[%d] is not a string", i + 1);
        ptrs[i] = (const uint8_t *)lua_tolstring(L, -1, &lens[i]);
        lua_pop(L, 1); /* the table still holds it */
    }
    lua_createtable(L, count, 0);
    if (softcxi_key_rewrap_many(ls->s, outs, status, ptrs, lens, (size_t)n, (unsigned)threads) !=
        0)
        return session_error(L, ls);
    lua_Integer changed = 0;
    for (int i = 0; i < count; i++) {
        int st = status[i];
        if (st == 1) {
            push_buf(L, &outs[i]); /* frees outs[i] */
            changed++;
        } else if (st == 0) {
            lua_pushliteral(L, "current");
        } else {
            lua_pushstring(L, softcxi_code_name(st));
        }
        lua_rawseti(L, -2, i + 1);
    }
    lua_pushinteger(L, changed);
    return 2;
}

/* key_open(group, name [, specifier]) -> handle */
static int m_key_open(lua_State *L)
{
    lsession *ls = check_session(L);
    const char *group = luaL_checkstring(L, 2), *name = luaL_checkstring(L, 3);
    int has_spec = !lua_isnoneornil(L, 4);
    lua_Integer spec = luaL_optinteger(L, 4, 0);
    luaL_argcheck(L, spec >= 0 && spec <= 0xFFFFFFFF, 4, "specifier out of range");
    softcxi_buf h = {0};
    if (softcxi_key_open(ls->s, &h, group, name, (uint32_t)spec, has_spec) != 0)
        return session_error(L, ls);
    push_buf(L, &h);
    return 1;
}

static int m_key_delete(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t len;
    const uint8_t *h = check_bytes(L, 2, &len);
    if (softcxi_key_delete(ls->s, h, len) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

static int push_key(void *ctx, const char *group, const char *name, uint32_t spec, int has_spec)
{
    lua_State *L = ctx;
    lua_createtable(L, 0, 3);
    set_cstr(L, "group", group);
    set_cstr(L, "name", name);
    if (has_spec) {
        set_int(L, "specifier", (lua_Integer)spec);
    }
    append(L);
    return 0;
}

static int m_key_list(lua_State *L)
{
    lsession *ls = check_session(L);
    lua_newtable(L);
    if (softcxi_key_list(ls->s, push_key, L) != 0)
        return session_error(L, ls);
    return 1;
}

static int m_keydb_usage(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t used = 0, limit = 0;
    if (softcxi_keydb_usage(ls->s, &used, &limit) != 0)
        return session_error(L, ls);
    lua_pushinteger(L, (lua_Integer)used);
    lua_pushinteger(L, (lua_Integer)limit);
    return 2;
}

static int push_record(void *ctx, uint64_t seq, int64_t t, const char *event,
                       const char *subject, const char *detail)
{
    lua_State *L = ctx;
    lua_createtable(L, 0, 5);
    set_int(L, "seq", (lua_Integer)seq);
    set_int(L, "time", (lua_Integer)t);
    set_cstr(L, "event", event);
    set_cstr(L, "subject", subject);
    set_cstr(L, "detail", detail);
    append(L);
    return 0;
}

static int m_audit_log(lua_State *L)
{
    lsession *ls = check_session(L);
    lua_newtable(L);
    if (softcxi_audit_log(ls->s, push_record, L) != 0)
        return session_error(L, ls);
    return 1;
}

static int m_audit_verify(lua_State *L)
{
    lsession *ls = check_session(L);
    uint64_t n = 0;
    if (softcxi_audit_verify(ls->s, &n) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    lua_pushinteger(L, (lua_Integer)n);
    return 2;
}

static int m_key_revoke(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t len;
    const uint8_t *blob = check_bytes(L, 2, &len);
    const char *reason = luaL_optstring(L, 3, "");
    if (softcxi_key_revoke(ls->s, blob, len, reason) != 0)
        return session_error(L, ls);
    lua_pushboolean(L, 1);
    return 1;
}

static int push_revoked(void *ctx, const char *id, int64_t t, const char *group, const char *name,
                        const char *reason)
{
    lua_State *L = ctx;
    lua_createtable(L, 0, 5);
    set_cstr(L, "id", id);
    set_int(L, "time", (lua_Integer)t);
    set_cstr(L, "group", group);
    set_cstr(L, "name", name);
    set_cstr(L, "reason", reason);
    append(L);
    return 0;
}

static int m_key_revoked(lua_State *L)
{
    lsession *ls = check_session(L);
    lua_newtable(L);
    if (softcxi_key_revoked(ls->s, push_revoked, L) != 0)
        return session_error(L, ls);
    return 1;
}

static int m_key_backup(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t len;
    const uint8_t *h = check_bytes(L, 2, &len);
    softcxi_buf out = {0};
    if (softcxi_key_backup(ls->s, &out, h, len) != 0)
        return session_error(L, ls);
    push_buf(L, &out);
    return 1;
}

/* key_restore(flags, backup) -> handle */
static int m_key_restore(lua_State *L)
{
    lsession *ls = check_session(L);
    lua_Integer flags = luaL_checkinteger(L, 2);
    size_t len;
    const uint8_t *b = check_bytes(L, 3, &len);
    softcxi_buf h = {0};
    if (softcxi_key_restore(ls->s, &h, (unsigned)flags, b, len) != 0)
        return session_error(L, ls);
    push_buf(L, &h);
    return 1;
}

/* backup_database() -> image, keys, skipped */
static int m_backup_database(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_buf image = {0};
    size_t keys = 0, skipped = 0;
    if (softcxi_backup_database(ls->s, &image, &keys, &skipped) != 0)
        return session_error(L, ls);
    push_buf(L, &image);
    lua_pushinteger(L, (lua_Integer)keys);
    lua_pushinteger(L, (lua_Integer)skipped);
    return 3;
}

/* restore_database(image [, flags]) -> keys */
static int m_restore_database(lua_State *L)
{
    lsession *ls = check_session(L);
    size_t len, keys = 0;
    const uint8_t *image = check_bytes(L, 2, &len);
    lua_Integer flags = luaL_optinteger(L, 3, 0);
    luaL_argcheck(L, flags >= 0 && flags <= 0xFFFF, 3, "flags out of range");
    if (softcxi_restore_database(ls->s, image, len, (unsigned)flags, &keys) != 0)
        return session_error(L, ls);
    lua_pushinteger(L, (lua_Integer)keys);
    return 1;
}

/* get_state() -> table */
static int m_get_state(lua_State *L)
{
    lsession *ls = check_session(L);
    softcxi_state st;
    char hex[17];
    if (softcxi_get_state(ls->s, &st) != 0)
        return session_error(L, ls);
    kcv_hex(hex, st.kcv);
    lua_createtable(L, 0, 12);
    lua_pushboolean(L, st.initialised);
    lua_setfield(L, -2, "initialised");
    lua_pushboolean(L, st.mbk_loaded);
    lua_setfield(L, -2, "mbk_loaded");
    set_cstr(L, "version", st.version);
    set_cstr(L, "id", st.id);
    set_cstr(L, "mbk", hex);
    set_int(L, "older_mbks", (lua_Integer)st.older_mbks);
    set_int(L, "generation", (lua_Integer)st.generation);
    set_int(L, "users", (lua_Integer)st.users);
    set_int(L, "revoked", (lua_Integer)st.revoked);
    set_int(L, "keydb_used", (lua_Integer)st.keydb_used);
    set_int(L, "keydb_limit", (lua_Integer)st.keydb_limit);
    set_int(L, "logged_on", (lua_Integer)st.logged_on);
    return 1;
}

static int push_file(void *ctx, const char *name, uint64_t size, int64_t mtime)
{
    lua_State *L = ctx;
    lua_createtable(L, 0, 3);
    set_cstr(L, "name", name);
    set_int(L, "size", (lua_Integer)size);
    set_int(L, "mtime", (lua_Integer)mtime);
    append(L);
    return 0;
}

/* list_files() -> { { name =, size =, mtime = }, ... } */
static int m_list_files(lua_State *L)
{
    lsession *ls = check_session(L);
    lua_newtable(L);
    if (softcxi_list_files(ls->s, push_file, L) != 0)
        return session_error(L, ls);
    return 1;
}

static const luaL_Reg session_methods[] = {
    {"key_export", m_key_export},
    {"backup_database", m_backup_database},
    {"restore_database", m_restore_database},
    {"list_files", m_list_files},
    {"logon_sign", m_logon_sign},
    {"logon_challenge", m_logon_challenge},
    {"logon_response", m_logon_response},
    {"user_set", m_user_set},
    {"get_state", m_get_state},
    {"key_backup", m_key_backup},
    {"key_restore", m_key_restore},
    {"key_revoke", m_key_revoke},
    {"key_revoked", m_key_revoked},
    {"key_open", m_key_open},
    {"key_delete", m_key_delete},
    {"key_list", m_key_list},
    {"keydb_usage", m_keydb_usage},
    {"audit_log", m_audit_log},
    {"audit_verify", m_audit_verify},
    {"mbk_generate", m_mbk_generate},
    {"mbk_import", m_mbk_import},
    {"mbk_retire", m_mbk_retire},
    {"mbk_info", m_mbk_info},
    {"key_rewrap", m_key_rewrap},
    {"key_rewrap_many", m_key_rewrap_many},
    {"logon_pass", m_logon_pass},
    {"logoff", m_logoff},
    {"user_add", m_user_add},
    {"user_delete", m_user_delete},
    {"user_list", m_user_list},
    {"hash_compute", m_hash_compute},
    {"_check", m_check},
    {"close", m_close},
    {"device_info", m_device_info},
    {"key_generate", m_key_generate},
    {"bulk_generate", m_bulk_generate},
    {"bulk_generate_start", m_bulk_generate_start},
    {"key_import", m_key_import},
    {"sign", m_sign},
    {"verify", m_verify},
    {"bulk_sign", m_bulk_sign},
    {"mac", m_mac},
    {"mac_verify", m_mac_verify},
    {"encrypt", m_encrypt},
    {"decrypt", m_decrypt},
    {"secret_agree", m_secret_agree},
    {"rnd_gen", m_rnd_gen},
    {"key_info", m_key_info},
    {"public_key", m_public_key},
    {NULL, NULL},
};

static const luaL_Reg module_functions[] = {
    {"open", l_open},
    {"init", l_init},
    {"logon_answer", l_logon_answer},
    {"key_info", l_key_info},
    {"key_attrs", l_key_attrs},
    {"key_check", l_key_check},
    {"same_index", l_same_index},
    {"public_key", l_public_key},
    {"hash_compute", l_hash_compute},
    {NULL, NULL},
};

EXPORT int luaopen_softcxi_core(lua_State *L);

EXPORT int luaopen_softcxi_core(lua_State *L)
{
    /* Every load installs a fresh method table of C functions, so loading
     * the module again (a hot reload, lua_code_cache off) never sees the
     * facade's wrappers from the last load.  Live sessions share the
     * metatable and pick up the new table. */
    luaL_newmetatable(L, JOB_MT);
    lua_pushcfunction(L, j_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, j_gc);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, j_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, JOB_MT);
    lua_setfield(L, -2, "__name");
    luaL_newlib(L, job_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, REWRAP_MT);
    lua_pushcfunction(L, rewrap_arrays_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, SESSION_MT);
    lua_pushcfunction(L, m_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, m_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, m_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, SESSION_MT);
    lua_setfield(L, -2, "__name");
    luaL_newlib(L, session_methods);
    lua_setfield(L, -2, "__index");
    lua_getfield(L, -1, "__index");
    luaL_newlib(L, module_functions);
    lua_insert(L, -2);
    lua_setfield(L, -2, "methods"); /* the facade adds Lua methods here */
    lua_remove(L, -2);
    lua_pushliteral(L, SOFTCXI_VERSION_STRING);
    lua_setfield(L, -2, "_VERSION");
    lua_pushinteger(L, SOFTCXI_FLAG_OVERWRITE);
    lua_setfield(L, -2, "FLAG_OVERWRITE");
    lua_pushinteger(L, SOFTCXI_FLAG_EXTERNAL);
    lua_setfield(L, -2, "FLAG_EXTERNAL");
    lua_pushinteger(L, SOFTCXI_RESTORE_MERGE);
    lua_setfield(L, -2, "RESTORE_MERGE");
    return 1;
}
