/* streampickle's speed paths in C: the pickle pre-scan of streampickle/_scan.py, the
 * framing of plain messages for dumps() and loads() (see frame() and load_plain() below), and
 * the decoder's path for runs of plain messages (take_plain() and load_inband()). The header
 * layout comes from streampickle._wire, read once at import (read_layout()).
 *
 * Why C: the scan walks every opcode of a peer's pickle before the C unpickler runs; in Python
 * that costs more than unpickling itself (1.3 s for a 25 MB pickle of a million tuples, 7 us
 * for a small dict). The scan here is a line-by-line port of _scan.py, which stays the
 * reference: the test suite runs every scan case against both and fuzzes them against each
 * other. The framing functions exist because dumps()/loads() of a small object were half
 * Python glue; each has a Python equivalent that the tests hold it to. unshared() (see there)
 * lets the encoder pickle a large plain graph without the pickler's memo; without this
 * extension the memo is always on, which gives the same objects, more slowly.
 *
 * scan(data, chunk_count) -> the number of STACK_GLOBAL opcodes if the pickle is acceptable
 * (0 means no global can be looked up at all), else (position, reason).
 * No allocation proportional to the input: the only state is counters and a mark stack,
 * which grows with the number of open MARKs (each at least one byte of input).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* For each opcode: fixed argument bytes, width of a length prefix, items popped, pushed.
 * kind 0: not allowed; 1: table driven; 2..: handled in the switch. */
enum { K_NO = 0, K_TABLE, K_MEMOIZE, K_GET1, K_GET4, K_MARK, K_TOMARK_PUSH, K_TOMARK_INTO,
       K_POP_MARK, K_POP, K_NEXT_BUFFER, K_FRAME, K_STOP, K_PROTO, K_KNOWN_FORBIDDEN };

typedef struct { unsigned char kind, size, prefix, pops, pushes; const char *name; } OpSpec;

static OpSpec ops[256];

static void def(unsigned char op, unsigned char kind, unsigned char size, unsigned char prefix,
                unsigned char pops, unsigned char pushes, const char *name) {
    ops[op].kind = kind; ops[op].size = size; ops[op].prefix = prefix;
    ops[op].pops = pops; ops[op].pushes = pushes; ops[op].name = name;
}

static void init_ops(void) {
    memset(ops, 0, sizeof ops);
    def('N', K_TABLE, 0, 0, 0, 1, "NONE");
    def(0x88, K_TABLE, 0, 0, 0, 1, "NEWTRUE");
    def(0x89, K_TABLE, 0, 0, 0, 1, "NEWFALSE");
    def('J', K_TABLE, 4, 0, 0, 1, "BININT");
    def('K', K_TABLE, 1, 0, 0, 1, "BININT1");
    def('M', K_TABLE, 2, 0, 0, 1, "BININT2");
    def(0x8a, K_TABLE, 0, 1, 0, 1, "LONG1");
    def(0x8b, K_TABLE, 0, 4, 0, 1, "LONG4");
    def('G', K_TABLE, 8, 0, 0, 1, "BINFLOAT");
    def('C', K_TABLE, 0, 1, 0, 1, "SHORT_BINBYTES");
    def('B', K_TABLE, 0, 4, 0, 1, "BINBYTES");
    def(0x8e, K_TABLE, 0, 8, 0, 1, "BINBYTES8");
    def(0x96, K_TABLE, 0, 8, 0, 1, "BYTEARRAY8");
    def(0x8c, K_TABLE, 0, 1, 0, 1, "SHORT_BINUNICODE");
    def('X', K_TABLE, 0, 4, 0, 1, "BINUNICODE");
    def(0x8d, K_TABLE, 0, 8, 0, 1, "BINUNICODE8");
    def(')', K_TABLE, 0, 0, 0, 1, "EMPTY_TUPLE");
    def(']', K_TABLE, 0, 0, 0, 1, "EMPTY_LIST");
    def('}', K_TABLE, 0, 0, 0, 1, "EMPTY_DICT");
    def(0x8f, K_TABLE, 0, 0, 0, 1, "EMPTY_SET");
    def(0x85, K_TABLE, 0, 0, 1, 1, "TUPLE1");
    def(0x86, K_TABLE, 0, 0, 2, 1, "TUPLE2");
    def(0x87, K_TABLE, 0, 0, 3, 1, "TUPLE3");
    def('a', K_TABLE, 0, 0, 2, 1, "APPEND");
    def('s', K_TABLE, 0, 0, 3, 1, "SETITEM");
    def(0x93, K_TABLE, 0, 0, 2, 1, "STACK_GLOBAL");
    def('R', K_TABLE, 0, 0, 2, 1, "REDUCE");
    def(0x81, K_TABLE, 0, 0, 2, 1, "NEWOBJ");
    def(0x92, K_TABLE, 0, 0, 3, 1, "NEWOBJ_EX");
    def('b', K_TABLE, 0, 0, 2, 1, "BUILD");
    def(0x98, K_TABLE, 0, 0, 1, 1, "READONLY_BUFFER");
    def(0x94, K_MEMOIZE, 0, 0, 0, 0, "MEMOIZE");
    def('h', K_GET1, 0, 0, 0, 0, "BINGET");
    def('j', K_GET4, 0, 0, 0, 0, "LONG_BINGET");
    def('(', K_MARK, 0, 0, 0, 0, "MARK");
    def('t', K_TOMARK_PUSH, 0, 0, 0, 0, "TUPLE");
    def(0x91, K_TOMARK_PUSH, 0, 0, 0, 0, "FROZENSET");
    def('e', K_TOMARK_INTO, 0, 0, 0, 0, "APPENDS");
    def('u', K_TOMARK_INTO, 0, 0, 0, 0, "SETITEMS");
    def(0x90, K_TOMARK_INTO, 0, 0, 0, 0, "ADDITEMS");
    def('1', K_POP_MARK, 0, 0, 0, 0, "POP_MARK");
    def('0', K_POP, 0, 0, 0, 0, "POP");
    def(0x97, K_NEXT_BUFFER, 0, 0, 0, 0, "NEXT_BUFFER");
    def(0x95, K_FRAME, 0, 0, 0, 0, "FRAME");
    def('.', K_STOP, 0, 0, 0, 0, "STOP");
    def(0x80, K_PROTO, 0, 0, 0, 0, "PROTO");
    /* Real opcodes a protocol-5 pickler never writes: named in the refusal. */
    static const struct { unsigned char op; const char *name; } forbidden[] = {
        {'I', "INT"}, {'L', "LONG"}, {'F', "FLOAT"}, {'S', "STRING"}, {'T', "BINSTRING"},
        {'U', "SHORT_BINSTRING"}, {'V', "UNICODE"}, {'c', "GLOBAL"}, {'i', "INST"}, {'o', "OBJ"},
        {0x82, "EXT1"}, {0x83, "EXT2"}, {0x84, "EXT4"}, {'P', "PERSID"}, {'Q', "BINPERSID"},
        {'p', "PUT"}, {'q', "BINPUT"}, {'r', "LONG_BINPUT"}, {'g', "GET"}, {'l', "LIST"},
        {'d', "DICT"}, {'2', "DUP"},
    };
    for (size_t i = 0; i < sizeof forbidden / sizeof forbidden[0]; i++)
        def(forbidden[i].op, K_KNOWN_FORBIDDEN, 0, 0, 0, 0, forbidden[i].name);
}

static uint64_t le(const unsigned char *p, int width) {
    uint64_t v = 0;
    for (int i = width - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static PyObject *fail(Py_ssize_t pos, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    PyObject *reason = PyUnicode_FromFormatV(fmt, args);
    va_end(args);
    if (reason == NULL) return NULL;
    return Py_BuildValue("(nN)", pos, reason);
}

/* The verifier's plain mode (streampickle/_verify.py, scan_py), line for line: 0 if the pickle
 * is plain data every rule admits as it is, DEFER (1) at the first opcode that needs the full
 * verifier, a (position, reason) tuple if the pickle's shape is refused; NULL with an exception
 * set only on MemoryError.
 *
 * Each stack slot and memo entry holds what the Python walk's _V holds that plain mode reads:
 * the container kind (for the targets of APPEND, SETITEM, ADDITEMS, READONLY_BUFFER) and the
 * container's number, the hash class, exact hash, nesting depth and hashing cost of a would-be
 * key. Computed hashes are recorded per container and counted once the pickle is read. */
#define MAX_OPEN_MARKS 1024
#define MAX_KEY_DEPTH 64
#define MAX_TUPLE_DEPTH 1000
#define WORK_PER_BYTE 16
#define WORK_BASE (1 << 16)
#define DEFER 1
#define COST_CAP ((uint64_t)1 << 62)

enum { V_OTHER = 0, V_BUFFER, V_LIST, V_DICT, V_SET, V_STR, V_BYTES };
/* _verify's hash classes. H_TEXT: a str or bytes literal, salted as a key of its own; in a
 * tuple, hashed when the tuple is made (text_hash), and its memo slot, if it came from one,
 * then H_SALTED with that hash or H_UNSEEN (not hashed: opaque in a tuple). H_FLOAT (plain
 * mode only): a float other than a NaN, free as a key; in a tuple, hashed when it is made. */
enum { H_UNHASHABLE = 0, H_FREE, H_SALTED, H_COMPUTED, H_WEAK, H_TEXT, H_FLOAT, H_UNSEEN };

/* What both walks share: Python's hashes of what a pickle spells, without making the objects,
 * and the records of keys' equal hashes. */
#define HASH_P (((uint64_t)1 << 61) - 1) /* the modulus of Python's numeric hash */
#define XXPRIME_1 11400714785074694791ULL
#define XXPRIME_2 14029467366897019727ULL
#define XXPRIME_5 2870177450012600261ULL
#define MAX_EQUAL_HASHES 8
#define MAX_COMPARED 255 /* _verify: the compares charged to an opaque key, at most */
#define FREE_COMPARE 16  /* _verify: the units of a compare not charged */

/* A growable array that starts empty; elements are moved, never pointed to across a push. */
typedef struct { void *items; Py_ssize_t len, cap; } Vec;

static int vec_grow(Vec *v, size_t elsize) {
    const Py_ssize_t cap = v->cap ? v->cap * 2 : 16;
    void *grown = PyMem_Realloc(v->items, (size_t)cap * elsize);
    if (grown == NULL) { PyErr_NoMemory(); return -1; }
    v->items = grown;
    v->cap = cap;
    return 0;
}

#define AT(v, T) ((T *)(v).items)
#define VPUSH(v, T, x) ((v).len == (v).cap && vec_grow(&(v), sizeof(T)) < 0 ? -1 : (AT(v, T)[(v).len++] = (x), 0))

/* A key whose hash was computed, as a key of the container numbered box. */
typedef struct { Py_ssize_t box; int64_t hval; } Collision;

#if PY_VERSION_HEX >= 0x030E0000
#define HASH_BUFFER Py_HashBuffer
#else
#define HASH_BUFFER _Py_HashBytes
#endif

/* Whether more than MAX_EQUAL_HASHES records name one container and one hash: 1 if so, 0 if
 * not, -1 on MemoryError. Counted in an open-addressing table placed by the process's keyed
 * hash of each record: the peer picks the hashes, not where they land. */
static int flooded(const Vec *collisions) {
    const Collision *c = AT(*collisions, Collision);
    const Py_ssize_t n = collisions->len;
    size_t cap = 16;
    while (cap < 2 * (size_t)n) cap *= 2;
    Py_ssize_t *slots = PyMem_Calloc(cap, sizeof *slots); /* a record's index + 1; 0: empty */
    unsigned char *counts = PyMem_Calloc((size_t)n + 1, 1); /* of the first record of each key */
    int result = 0;
    if (slots == NULL || counts == NULL) {
        PyErr_NoMemory();
        result = -1;
    }
    for (Py_ssize_t i = 0; i < n && result == 0; i++) {
        for (size_t at = (size_t)HASH_BUFFER(&c[i], sizeof c[i]) & (cap - 1);; at = (at + 1) & (cap - 1)) {
            const Py_ssize_t j = slots[at] - 1;
            if (j < 0) {
                slots[at] = i + 1;
                counts[i] = 1;
                break;
            }
            if (c[j].box == c[i].box && c[j].hval == c[i].hval) {
                if (++counts[j] > MAX_EQUAL_HASHES) result = 1;
                break;
            }
        }
    }
    PyMem_Free(slots);
    PyMem_Free(counts);
    return result;
}

static Py_hash_t int64_hash(int64_t v) {
    const uint64_t mag = v < 0 ? (uint64_t)(-(v + 1)) + 1 : (uint64_t)v;
    int64_t h = (int64_t)(mag % HASH_P);
    if (v < 0) h = -h;
    return h == -1 ? -2 : (Py_hash_t)h;
}

typedef struct { unsigned char hkind; int64_t hval; } Hashed;

/* _verify._int_value of the little-endian two's complement integer at p (n bytes): the value's
 * hash class and Python's hash of it, without making the int. */
static Hashed int_hash(const unsigned char *p, uint64_t n) {
    Hashed v = {H_FREE, 0};
    if (n == 0) return v;
    const unsigned char ext = p[n - 1] & 0x80 ? 0xff : 0x00;
    int fits = 1;
    for (uint64_t i = 8; i < n; i++)
        if (p[i] != ext) { fits = 0; break; }
    if (fits && n > 8 && (p[7] & 0x80) != (ext & 0x80)) fits = 0;
    if (fits) {
        const int width = n < 8 ? (int)n : 8;
        uint64_t u = le(p, width);
        if (width < 8 && ext) u |= ~(uint64_t)0 << (8 * width);
        const int64_t x = (int64_t)u;
        v.hval = int64_hash(x);
        if (x <= -(int64_t)HASH_P || x >= (int64_t)HASH_P) v.hkind = H_COMPUTED;
        return v;
    }
    /* |value| >= 2**63: reduce the unsigned value mod P, most significant byte first */
    uint64_t r = 0;
    for (uint64_t i = n; i-- > 0;) {
        r = ((r << 8) & HASH_P) + (r >> 53) + p[i];
        if (r >= HASH_P) r -= HASH_P;
    }
    int64_t h;
    if (ext) { /* negative: |value| = 2**(8n) - unsigned, and 2**61 = 1 mod P */
        const uint64_t top = (uint64_t)1 << ((8 * (n % 61)) % 61);
        const uint64_t m = (top + HASH_P - r) % HASH_P;
        h = -(int64_t)m;
    } else {
        h = (int64_t)r;
    }
    v.hkind = H_COMPUTED;
    v.hval = h == -1 ? -2 : h;
    return v;
}

/* CPython's hash of a float other than a NaN (Python/pyhash.c, _Py_HashDouble), without
 * making the float: its value as a fraction reduced modulo 2**61 - 1. */
static int64_t double_hash(double v) {
    if (isinf(v)) return v > 0 ? 314159 : -314159;
    int e;
    double m = frexp(v, &e);
    int sign = 1;
    if (m < 0) {
        sign = -1;
        m = -m;
    }
    uint64_t x = 0;
    while (m) { /* 28 bits at a time, most significant first */
        x = ((x << 28) & HASH_P) | x >> (61 - 28);
        m *= 268435456.0;
        e -= 28;
        const uint64_t y = (uint64_t)m;
        m -= (double)y;
        x += y;
        if (x >= HASH_P) x -= HASH_P;
    }
    e = e >= 0 ? e % 61 : 61 - 1 - ((-1 - e) % 61);
    x = ((x << e) & HASH_P) | x >> (61 - e);
    x = x * (uint64_t)(int64_t)sign;
    return x == UINT64_MAX ? -2 : (int64_t)x;
}

/* Python's hash of the big-endian double at p (BINFLOAT's argument), into *h; -1 on error. */
static int float_hash(const unsigned char *p, int64_t *h) {
    const double d = PyFloat_Unpack8((const char *)p, 0);
    if (d == -1.0 && PyErr_Occurred()) return -1;
    *h = double_hash(d);
    return 0;
}

/* _verify._hash_text: 1 and *h Python's hash of the str (is_str) or bytes whose pickled bytes
 * are p[0..n); 0 if the verifier doesn't hash it (longer than TEXT_HASHED_BYTES, or not
 * UTF-8: loading it fails); -1 with an exception set. Strings hash in C without a Python
 * object while ASCII, where a str's own buffer is its UTF-8. */
#define TEXT_HASHED_BYTES 256
static int text_hash(const unsigned char *p, Py_ssize_t n, int is_str, int64_t *h) {
    if (n > TEXT_HASHED_BYTES) return 0;
    unsigned char high = 0;
    if (is_str)
        for (Py_ssize_t i = 0; i < n; i++) high |= p[i];
    if (high < 0x80) {
        *h = HASH_BUFFER(p, n);
        return 1;
    }
    PyObject *text = PyUnicode_DecodeUTF8((const char *)p, n, "surrogatepass");
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return -1;
        PyErr_Clear();
        return 0;
    }
    *h = PyObject_Hash(text);
    Py_DECREF(text);
    return *h == -1 ? -1 : 1;
}

/* A str or bytes item of a tuple being made (data[a..b)): text_hash, kept in the memo slot
 * it came from (*kept_hkind, *kept_hval; NULL for none) for every later copy to read. */
static int text_item_hash(const unsigned char *data, Py_ssize_t a, Py_ssize_t b, int is_str,
                          unsigned char *kept_hkind, int64_t *kept_hval, int64_t *h) {
    const int hashed = text_hash(data + a, b - a, is_str, h);
    if (hashed >= 0 && kept_hkind != NULL) {
        *kept_hkind = hashed ? H_SALTED : H_UNSEEN;
        *kept_hval = *h;
    }
    return hashed;
}

/* CPython's tuplehash (xxHash-based, 3.8 and later), one item at a time. */
static inline uint64_t tuple_step(uint64_t acc, int64_t hval) {
    acc += (uint64_t)hval * XXPRIME_2;
    acc = (acc << 31) | (acc >> 33);
    return acc * XXPRIME_1;
}

static inline int64_t tuple_finish(uint64_t acc, Py_ssize_t n) {
    acc += (uint64_t)n ^ (XXPRIME_5 ^ 3527539ULL);
    return acc == UINT64_MAX ? 1546275796 : (int64_t)acc;
}

/* hval: Python's hash (free ints, None, bools, computed keys) or a NaN's stand-in; a, b: a
 * str's or bytes' [a, b) in data, a float's offset a, a dict's, set's or frozenset's number a;
 * memo: a str or bytes fetched from the memo, its slot + 1. */
typedef struct {
    unsigned char kind, hkind;
    Py_ssize_t depth;
    uint64_t cost;
    int64_t hval;
    Py_ssize_t a, b, memo;
} Slot;

/* A growable array of slots that starts in place: a small pickle's scan allocates nothing. */
#define SLOTS_INLINE 32
typedef struct {
    Slot *items;
    Py_ssize_t len, cap;
    Slot inline_items[SLOTS_INLINE];
} Slots;

static void slots_init(Slots *s) {
    s->items = s->inline_items;
    s->len = 0;
    s->cap = SLOTS_INLINE;
}

static void slots_free(Slots *s) {
    if (s->items != s->inline_items) PyMem_Free(s->items);
}

static int slots_grow(Slots *s) {
    const Py_ssize_t cap = s->cap * 2;
    Slot *grown = PyMem_Malloc((size_t)cap * sizeof *grown);
    if (grown == NULL) { PyErr_NoMemory(); return -1; }
    memcpy(grown, s->items, (size_t)s->len * sizeof *grown);
    slots_free(s);
    s->items = grown;
    s->cap = cap;
    return 0;
}

static inline int slots_push(Slots *s, Slot v) {
    if (s->len == s->cap && slots_grow(s) < 0) return -1;
    s->items[s->len++] = v;
    return 0;
}

/* The argument size of the table-driven opcode at start (its fixed size, or the length its
 * prefix declares), checked to fit in the bytes left; *pos moves past the prefix. NULL if it
 * fits, else the refusal tuple (position, reason). Shared by both walks. */
static PyObject *literal_size(const unsigned char *data, Py_ssize_t end, Py_ssize_t start,
                              const OpSpec *spec, Py_ssize_t *pos, uint64_t *size) {
    *size = spec->size;
    if (spec->prefix) {
        if (end - *pos < spec->prefix) return fail(start, "%s: length prefix cut off", spec->name);
        if (data[start] == 0x8b) { /* LONG4: signed */
            const int32_t signed_size = (int32_t)(uint32_t)le(data + *pos, 4);
            if (signed_size < 0) return fail(start, "%s: negative length %d", spec->name, (int)signed_size);
            *size = (uint64_t)signed_size;
        } else {
            *size = le(data + *pos, spec->prefix);
        }
        *pos += spec->prefix;
    }
    if (*size > (uint64_t)(end - *pos))
        return fail(start, "%s declares %llu bytes, only %zd are left", spec->name,
                    (unsigned long long)*size, end - *pos);
    return NULL;
}

/* Whether the big-endian double at p is a NaN: all exponent bits set, a non-zero fraction. */
static int is_nan_be(const unsigned char *p) {
    if ((p[0] & 0x7f) != 0x7f || (p[1] & 0xf0) != 0xf0) return 0;
    return (p[1] & 0x0f) || p[2] || p[3] || p[4] || p[5] || p[6] || p[7];
}

/* A tuple of items[0..n): _verify._tuple_value's hash class, exact hash, depth and cost, into
 * *out; -1 with an exception set. A tuple is never salted: its other items can make tuples
 * holding one str collide, so its strings are hashed and its equal hashes counted. */
static int tuple_of(const unsigned char *data, Slot *memo, const Slot *items, Py_ssize_t n, Slot *out) {
    Slot t = {V_OTHER, H_COMPUTED, 0, 1, 0, 0, 0, 0};
    uint64_t acc = XXPRIME_5;
    for (Py_ssize_t i = 0; i < n; i++) {
        const Slot *item = items[i].memo ? &memo[items[i].memo - 1] : &items[i]; /* a text hashed once */
        const unsigned char h = item->hkind;
        int64_t hval = item->hval;
        if (h == H_UNHASHABLE) t.hkind = H_UNHASHABLE;
        else if ((h == H_WEAK || h == H_UNSEEN) && t.hkind != H_UNHASHABLE) t.hkind = H_WEAK;
        else if (h == H_TEXT && t.hkind == H_COMPUTED) {
            Slot *kept = items[i].memo ? &memo[items[i].memo - 1] : NULL;
            const int hashed = text_item_hash(data, items[i].a, items[i].b, items[i].kind == V_STR,
                                              kept ? &kept->hkind : NULL, kept ? &kept->hval : NULL, &hval);
            if (hashed < 0) return -1;
            if (!hashed) t.hkind = H_WEAK;
        } else if (h == H_FLOAT && t.hkind == H_COMPUTED && float_hash(data + items[i].a, &hval) < 0) {
            return -1;
        }
        if (t.hkind == H_COMPUTED) acc = tuple_step(acc, hval);
        t.cost = items[i].cost >= COST_CAP - t.cost ? COST_CAP : t.cost + items[i].cost;
        if (items[i].depth > t.depth) t.depth = items[i].depth;
    }
    if (t.hkind == H_COMPUTED) t.hval = tuple_finish(acc, n);
    t.depth += 1;
    *out = t;
    return 0;
}

/* _verify._key in plain mode: 0 the key of the container numbered box is admitted (a computed
 * hash recorded), 1 defer, -1 refused (*result set) or an error (*result NULL). */
static int admit_key(const unsigned char *data, const Slot *key, Py_ssize_t box, Py_ssize_t pos, const char *opname,
                     int64_t *budget, Vec *collisions, PyObject **result) {
    if (key->hkind == H_UNHASHABLE) return 1;
    if (key->depth > MAX_KEY_DEPTH) {
        *result = fail(pos, "%s: a key nested %zd deep (at most %d)", opname, key->depth, MAX_KEY_DEPTH);
        return -1;
    }
    if (key->cost > 1) {
        *budget -= (int64_t)key->cost;
        if (*budget < 0) {
            *result = fail(pos, "%s: hashing the keys would take work out of proportion to the pickle's size", opname);
            return -1;
        }
    }
    if (key->hkind == H_WEAK) return 1;
    if (key->hkind == H_COMPUTED) return VPUSH(*collisions, Collision, ((Collision){box, key->hval}));
    if (key->hkind == H_FLOAT) { /* a few hundred distinct floats can share a hash */
        int64_t h;
        if (float_hash(data + key->a, &h) < 0) return -1;
        return VPUSH(*collisions, Collision, ((Collision){box, h}));
    }
    return 0;
}

static PyObject *scan_impl(const unsigned char *data, const Py_ssize_t end, Py_ssize_t chunk_count) {
    PyObject *result = NULL;
    Slots stack, memo;
    slots_init(&stack);
    slots_init(&memo);
    Py_ssize_t *marks = NULL, marks_len = 0, marks_cap = 0;
    Py_ssize_t pos = 2, frame_end = 0, buffers = 0, boxes = 0;
    int64_t budget = (int64_t)WORK_PER_BYTE * end + WORK_BASE;
    int stopped = 0, k;
    Vec collisions = {NULL, 0, 0};
    const Py_hash_t none_hash = PyObject_Hash(Py_None);

    if (end < 3 || data[0] != 0x80 || data[1] != 5) {
        result = fail(0, "a pickle must start with PROTO 5 (bytes 80 05)");
        goto done;
    }
#define DEFER_NOW do { result = PyLong_FromLong(DEFER); goto done; } while (0)
#define BASE (marks_len ? marks[marks_len - 1] : 0)
#define PUSH(slot) do { if (slots_push(&stack, (slot)) < 0) goto done; } while (0)
    while (pos < end) {
        const unsigned char op = data[pos];
        const OpSpec *spec = &ops[op];
        const Py_ssize_t start = pos;
        pos += 1;
        switch (spec->kind) {
        case K_TABLE: {
            uint64_t size;
            if ((result = literal_size(data, end, start, spec, &pos, &size)) != NULL || PyErr_Occurred()) goto done;
            pos += (Py_ssize_t)size;
            if (stack.len - BASE < spec->pops) {
                result = fail(start, "%s needs %d items, the stack has %zd", spec->name, (int)spec->pops, stack.len - BASE);
                goto done;
            }
            Slot *top = stack.items + stack.len; /* one past the top */
            switch (op) {
            case 'N': PUSH(((Slot){V_OTHER, H_FREE, 0, 1, none_hash})); break;
            case 0x88: PUSH(((Slot){V_OTHER, H_FREE, 0, 1, 1})); break;
            case 0x89: PUSH(((Slot){V_OTHER, H_FREE, 0, 1, 0})); break;
            case 'J': { /* BININT: signed */
                const int64_t v = (int32_t)(uint32_t)le(data + pos - 4, 4);
                PUSH(((Slot){V_OTHER, H_FREE, 0, 1, v == -1 ? -2 : v}));
                break;
            }
            case 'K': case 'M': PUSH(((Slot){V_OTHER, H_FREE, 0, 1, (int64_t)le(data + pos - size, (int)size)})); break;
            case 'G': /* BINFLOAT: a NaN's hash is its address, which its opcode's offset stands in for
                       * (a memo copy is the same NaN); another float's is worked out in a tuple */
                if (is_nan_be(data + pos - 8)) PUSH(((Slot){V_OTHER, H_SALTED, 0, 1, (int64_t)start}));
                else PUSH(((Slot){V_OTHER, H_FLOAT, 0, 1, 0, pos - 8}));
                break;
            case 0x8a: case 0x8b: { /* LONG1, LONG4: hashing one visits its digits, charged to a key each time */
                const Hashed h = int_hash(data + pos - size, size);
                PUSH(((Slot){V_OTHER, h.hkind, 0, size >= 8 ? 1 + size / 8 : 1, h.hval}));
                break;
            }
            case 'C': case 'B': case 0x8e: /* bytes */
                PUSH(((Slot){V_BYTES, H_TEXT, 0, 1, 0, pos - (Py_ssize_t)size, pos}));
                break;
            case 0x8c: case 'X': case 0x8d: /* str */
                PUSH(((Slot){V_STR, H_TEXT, 0, 1, 0, pos - (Py_ssize_t)size, pos}));
                break;
            case 0x96: /* BYTEARRAY8 */
                PUSH(((Slot){V_OTHER, H_UNHASHABLE, 0, 1}));
                break;
            case ')': { /* depth 1: within any bound */
                Slot t;
                if (tuple_of(data, memo.items, NULL, 0, &t) < 0) goto done;
                PUSH(t);
                break;
            }
            case ']': PUSH(((Slot){V_LIST, H_UNHASHABLE, 0, 1})); break;
            case '}': PUSH(((Slot){V_DICT, H_UNHASHABLE, 0, 1, 0, boxes++})); break;
            case 0x8f: PUSH(((Slot){V_SET, H_UNHASHABLE, 0, 1, 0, boxes++})); break;
            case 0x85: case 0x86: case 0x87: { /* TUPLE1..3 */
                Slot t;
                if (tuple_of(data, memo.items, top - spec->pops, spec->pops, &t) < 0) goto done;
                if (t.depth > MAX_TUPLE_DEPTH) {
                    result = fail(start, "%s: a tuple nested more than %d deep", spec->name, MAX_TUPLE_DEPTH);
                    goto done;
                }
                stack.len -= spec->pops;
                PUSH(t);
                break;
            }
            case 'a': /* APPEND */
                if (top[-2].kind != V_LIST) DEFER_NOW;
                stack.len -= 1;
                break;
            case 's': /* SETITEM */
                if (top[-3].kind != V_DICT) DEFER_NOW;
                k = admit_key(data, &top[-2], top[-3].a, start, spec->name, &budget, &collisions, &result);
                if (k < 0) goto done;
                if (k > 0) DEFER_NOW;
                stack.len -= 2;
                break;
            case 0x98: /* READONLY_BUFFER */
                if (top[-1].kind != V_BUFFER) DEFER_NOW;
                break;
            default: /* STACK_GLOBAL, REDUCE, NEWOBJ, NEWOBJ_EX, BUILD: the full verifier's */
                DEFER_NOW;
            }
            break;
        }
        case K_MEMOIZE:
            if (stack.len == BASE) { result = fail(start, "MEMOIZE on an empty stack"); goto done; }
            if (slots_push(&memo, stack.items[stack.len - 1]) < 0) goto done;
            if (stack.items[stack.len - 1].hkind == H_TEXT && !stack.items[stack.len - 1].memo)
                stack.items[stack.len - 1].memo = memo.len; /* its hash is kept in that slot */
            break;
        case K_GET1:
        case K_GET4: {
            const int width = spec->kind == K_GET1 ? 1 : 4;
            if (end - pos < width) { result = fail(start, "%s: argument cut off", spec->name); goto done; }
            const uint64_t index = le(data + pos, width);
            pos += width;
            if (index >= (uint64_t)memo.len) {
                result = fail(start, "%s %llu names a memo slot never defined", spec->name,
                              (unsigned long long)index);
                goto done;
            }
            Slot v = memo.items[index];
            if (v.hkind == H_TEXT && !v.memo) v.memo = (Py_ssize_t)index + 1;
            PUSH(v);
            break;
        }
        case K_MARK:
            if (marks_len == MAX_OPEN_MARKS) {
                result = fail(start, "more than %d MARKs open at once", MAX_OPEN_MARKS);
                goto done;
            }
            if (marks_len == marks_cap) {
                Py_ssize_t cap = marks_cap ? marks_cap * 2 : 64;
                Py_ssize_t *grown = PyMem_Realloc(marks, (size_t)cap * sizeof *marks);
                if (grown == NULL) { PyErr_NoMemory(); goto done; }
                marks = grown;
                marks_cap = cap;
            }
            marks[marks_len++] = stack.len;
            break;
        case K_TOMARK_PUSH:
        case K_TOMARK_INTO:
        case K_POP_MARK: {
            if (marks_len == 0) { result = fail(start, "%s without a MARK", spec->name); goto done; }
            const Py_ssize_t base = marks[--marks_len];
            Slot *items = stack.items + base;
            const Py_ssize_t n = stack.len - base;
            if (op == 't') { /* TUPLE */
                Slot t;
                if (tuple_of(data, memo.items, items, n, &t) < 0) goto done;
                if (t.depth > MAX_TUPLE_DEPTH) {
                    result = fail(start, "%s: a tuple nested more than %d deep", spec->name, MAX_TUPLE_DEPTH);
                    goto done;
                }
                stack.len = base;
                PUSH(t);
            } else if (op == 0x91) { /* FROZENSET */
                Slot f = {V_OTHER, H_WEAK, 0, 1}; /* see _verify: a frozenset's hash is not computed */
                const Py_ssize_t box = boxes++;
                for (Py_ssize_t i = 0; i < n; i++) {
                    k = admit_key(data, &items[i], box, start, spec->name, &budget, &collisions, &result);
                    if (k < 0) goto done;
                    if (k > 0) DEFER_NOW;
                    if (items[i].depth > f.depth) f.depth = items[i].depth;
                }
                f.depth += 1;
                stack.len = base;
                PUSH(f);
            } else if (op != '1') { /* APPENDS, SETITEMS, ADDITEMS */
                if (base - BASE < 1) {
                    result = fail(start, "%s has no container below its MARK", spec->name);
                    goto done;
                }
                const Slot *target = &stack.items[base - 1];
                if (op == 'e') {
                    if (target->kind != V_LIST) DEFER_NOW;
                } else {
                    Py_ssize_t step = 1;
                    if (op == 'u') {
                        if (n % 2) { result = fail(start, "SETITEMS with an odd number of items"); goto done; }
                        if (target->kind != V_DICT) DEFER_NOW;
                        step = 2;
                    } else if (target->kind != V_SET) {
                        DEFER_NOW;
                    }
                    for (Py_ssize_t i = 0; i < n; i += step) {
                        k = admit_key(data, &items[i], target->a, start, spec->name, &budget, &collisions, &result);
                        if (k < 0) goto done;
                        if (k > 0) DEFER_NOW;
                    }
                }
                stack.len = base;
            } else {
                stack.len = base;
            }
            break;
        }
        case K_POP:
            if (stack.len > BASE) stack.len -= 1;
            else if (marks_len) marks_len -= 1;
            else { result = fail(start, "POP on an empty stack"); goto done; }
            break;
        case K_NEXT_BUFFER:
            buffers += 1;
            PUSH(((Slot){V_BUFFER, H_UNHASHABLE, 0, 1}));
            break;
        case K_FRAME: {
            if (start < frame_end) { result = fail(start, "FRAME opened inside another frame"); goto done; }
            if (end - pos < 8) { result = fail(start, "FRAME: length cut off"); goto done; }
            const uint64_t length = le(data + pos, 8);
            pos += 8;
            if (length > (uint64_t)(end - pos)) {
                result = fail(start, "FRAME extends past the end of the pickle");
                goto done;
            }
            frame_end = pos + (Py_ssize_t)length;
            continue; /* a FRAME can't straddle its own end */
        }
        case K_STOP:
            if (pos != end) {
                result = fail(start, "%zd bytes follow STOP inside the pickle part", end - pos);
                goto done;
            }
            if (marks_len || stack.len != 1) { result = fail(start, "STOP with an unbalanced stack"); goto done; }
            stopped = 1;
            break;
        case K_PROTO:
            result = fail(start, "PROTO may only be the first opcode");
            goto done;
        case K_KNOWN_FORBIDDEN:
            if (op == 'Q') {
                result = fail(start, "opcode BINPERSID is not allowed: persistent ids need a decoder with persistent_load");
                goto done;
            }
            result = fail(start, "opcode %s is not allowed: a protocol-5 pickler never emits it", spec->name);
            goto done;
        default: {
            char hex[8];
            snprintf(hex, sizeof hex, "0x%02x", (unsigned)op);
            result = fail(start, "unknown opcode %s", hex);
            goto done;
        }
        }
        if (stopped) break;
        if (start < frame_end && frame_end < pos) {
            result = fail(start, "%s straddles the end of its FRAME", spec->name);
            goto done;
        }
    }
#undef DEFER_NOW
#undef BASE
#undef PUSH
    if (!stopped) {
        result = fail(end, "the pickle part ends without STOP");
        goto done;
    }
    if (buffers != chunk_count) {
        result = fail(end, "the pickle takes %zd out-of-band buffers but the header declares %zd side chunks",
                      buffers, chunk_count);
        goto done;
    }
    if (collisions.len && (k = flooded(&collisions)) != 0) {
        if (k > 0) result = fail(end, "more than %d keys with the same hash in one container: a hash flood", MAX_EQUAL_HASHES);
        goto done;
    }
    result = PyLong_FromLong(0);
done:
    PyMem_Free(collisions.items);
    PyMem_Free(marks);
    slots_free(&stack);
    slots_free(&memo);
    return result;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t chunk_count;
    if (!PyArg_ParseTuple(args, "y*n", &view, &chunk_count)) return NULL;
    PyObject *result = scan_impl(view.buf, view.len, chunk_count);
    PyBuffer_Release(&view);
    return result;
}

/* ---- The full verifier: _verify.verify in C ------------------------------------------------
 *
 * verify(data, chunk_count, resolver, max_opaque_keys) -> the number of STACK_GLOBAL opcodes if
 * every rule of streampickle/_verify.py holds, else (position, reason) with the reason the
 * Python walk gives; the resolver's exceptions propagate as they are, and the resolver is
 * called at the same opcodes, in the same order. _verify.py stays the reference: the tests
 * run both on every pickle they have and on mutations of them, and compare.
 *
 * State. A stack or memo entry is a Val held by value: its kind bit, hash class, exact hash,
 * hashing cost and nesting depth, and what the rules read of it: a str's byte range, a
 * tuple's items (copied once into the items arena when the tuple is made; memo copies point
 * at the same items), a global's entry in the globals table. What the pickle can mutate
 * (lists, dicts, sets, frozensets, instances) lives in the boxes table, so that a memo copy
 * sees the same running size and a collision record names one container. A tuple's hash class
 * is worked out when the tuple is made, from its items, which were worked out when they were
 * made: the same values _verify._settle computes on first use, without a walk of the tree.
 * Every table grows with opcodes read, never with a length the pickle declares. */

/* streampickle/_kinds.py; a test holds these to it. */
#define KD_NONE (1 << 0)
#define KD_STR (1 << 4)
#define KD_BYTES (1 << 5)
#define KD_BYTEARRAY (1 << 6)
#define KD_BUFFER (1 << 7)
#define KD_TUPLE (1 << 8)
#define KD_LIST (1 << 9)
#define KD_DICT (1 << 10)
#define KD_SET (1 << 11)
#define KD_FROZENSET (1 << 12)
#define KD_GLOBAL (1 << 13)
#define KD_INSTANCE (1 << 16)
#define KD_OPAQUE (1 << 17)
#define KD_BOOL (1 << 1)
#define KD_INT (1 << 2)
#define KD_FLOAT (1 << 3)
#define KD_VALUE (1 << 14)
#define KD_TZINFO (1 << 15)
#define KD_ANY ((1 << 18) - 1)
#define KD_COUNT 18

static const char *const kind_names[KD_COUNT] = {
    "None", "bool", "int", "float", "str", "bytes", "bytearray", "out-of-band buffer", "tuple", "list",
    "dict", "set", "frozenset", "global", "reconstructed value", "time zone",
    "instance of an allowed class", "result of an allowed callable",
};

/* For the test that holds the bits above to _kinds' (module attribute KINDS). */
static const struct { const char *name; long bit; } kind_bits[] = {
    {"NONE", KD_NONE}, {"BOOL", KD_BOOL}, {"INT", KD_INT}, {"FLOAT", KD_FLOAT}, {"STR", KD_STR},
    {"BYTES", KD_BYTES}, {"BYTEARRAY", KD_BYTEARRAY}, {"BUFFER", KD_BUFFER}, {"TUPLE", KD_TUPLE},
    {"LIST", KD_LIST}, {"DICT", KD_DICT}, {"SET", KD_SET}, {"FROZENSET", KD_FROZENSET},
    {"GLOBAL", KD_GLOBAL}, {"VALUE", KD_VALUE}, {"TZINFO", KD_TZINFO}, {"INSTANCE", KD_INSTANCE},
    {"OPAQUE", KD_OPAQUE}, {"ANY", KD_ANY},
};

typedef struct { char s[512]; } KindName;

/* _kinds.name_of: "anything", or the names of the bits set, in bit order, joined by " or ". */
static const char *name_of(int64_t kinds, KindName *out) {
    if (kinds == KD_ANY) return "anything";
    size_t len = 0;
    out->s[0] = '\0';
    for (int bit = 0; bit < KD_COUNT; bit++) {
        if (!(kinds & ((int64_t)1 << bit))) continue;
        len += (size_t)snprintf(out->s + len, sizeof out->s - len, "%s%s", len ? " or " : "", kind_names[bit]);
    }
    return out->s;
}

typedef struct {
    int64_t kind;
    int64_t hval;          /* the exact hash: computed ints and tuples, and free scalars */
    uint64_t cost;         /* units of work to hash it */
    Py_ssize_t depth;      /* tuple (or frozenset) nesting */
    Py_ssize_t a, b;       /* str: [a, b) in data; tuple: items a.., b of them; container: box a;
                            * global, opaque: globals entry a */
    unsigned char hkind;
    unsigned char noinfo;  /* a reconstructor's result: the Python walk's info is None */
    unsigned char named;   /* a reconstructor named and not called, or a tuple holding one */
    Py_ssize_t memo;       /* a str or bytes fetched from the memo: its slot + 1 */
} Val;

/* A tuple's item as the rules read it later (a REDUCE's arguments): what its hash needs was
 * folded into the tuple's own Val when the tuple was made. */
typedef struct {
    int64_t kind;
    Py_ssize_t a, b;
    unsigned char noinfo, named;
} Item;

/* size: _V.size; global: -1 for none; the rest: _V.keys (_verify._Keys) */
typedef struct {
    int64_t size;
    Py_ssize_t global;
    int64_t opaque, numbers, opaque_numbers;
    uint64_t number_squares, opaque_number_squares; /* saturating at COST_CAP */
} Box;

typedef struct {
    PyObject *obj, *module, *qualname, *name; /* owned by Walk.keep */
    int has_rebuilder, is_class, dict_like, list_like, attribute_of, buildable;
    int64_t result;
    Py_ssize_t args, nargs; /* the declared argument kinds, in Walk.declared */
} GlobalInfo;

typedef struct {
    const unsigned char *data;
    Py_ssize_t end;
    PyObject *resolver, *max_opaque_obj, *keep;
    int64_t budget, opaque, max_opaque;
    int persistent; /* admit BINPERSID: the decoder has a persistent_load */
    Vec stack, memo, items, boxes, globals, declared, collisions;
    Py_ssize_t *seen; /* open addressing: a Global's address -> its globals index + 1 */
    Py_ssize_t seen_cap;
    PyObject *result; /* the refusal, once there is one */
} Walk;

static int refuse(Walk *w, Py_ssize_t pos, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    PyObject *reason = PyUnicode_FromFormatV(fmt, args);
    va_end(args);
    if (reason != NULL) w->result = Py_BuildValue("(nN)", pos, reason);
    return -1;
}

/* What the Python walk raises where it reads the info of a reconstructor's result (None). */
static int no_attribute(const char *attr) {
    PyErr_Format(PyExc_AttributeError, "'NoneType' object has no attribute '%s'", attr);
    return -1;
}

/* A tuple of items[0..n) (stack entries), whose items will be in the items arena from index
 * at: _verify._settle_one, into *out; -1 with an exception set. */
static int tuple_val(Walk *w, const Val *items, Py_ssize_t n, Py_ssize_t at, Val *out) {
    Val t = {KD_TUPLE, 0, 1, 0, at, n, H_COMPUTED, 0};
    uint64_t acc = XXPRIME_5;
    for (Py_ssize_t i = 0; i < n; i++) {
        const Val *item = items[i].memo ? &AT(w->memo, Val)[items[i].memo - 1] : &items[i]; /* a text hashed once */
        const unsigned char h = item->hkind;
        int64_t hval = item->hval;
        if (h == H_UNHASHABLE) t.hkind = H_UNHASHABLE;
        else if ((h == H_WEAK || h == H_UNSEEN) && t.hkind != H_UNHASHABLE) t.hkind = H_WEAK;
        else if (h == H_TEXT && t.hkind == H_COMPUTED) {
            Val *kept = items[i].memo ? &AT(w->memo, Val)[items[i].memo - 1] : NULL;
            const int hashed = text_item_hash(w->data, items[i].a, items[i].b, items[i].kind == KD_STR,
                                              kept ? &kept->hkind : NULL, kept ? &kept->hval : NULL, &hval);
            if (hashed < 0) return -1;
            if (!hashed) t.hkind = H_WEAK;
        }
        if (t.hkind == H_COMPUTED) acc = tuple_step(acc, hval);
        t.cost = items[i].cost >= COST_CAP - t.cost ? COST_CAP : t.cost + items[i].cost;
        t.named |= items[i].named;
        if (items[i].depth > t.depth) t.depth = items[i].depth;
    }
    if (t.hkind == H_COMPUTED) t.hval = tuple_finish(acc, n);
    t.depth += 1;
    *out = t;
    return 0;
}

static int new_box(Walk *w, Py_ssize_t global, Py_ssize_t *index) {
    *index = w->boxes.len;
    return VPUSH(w->boxes, Box, ((Box){0, global, 0, 0, 0, 0, 0}));
}

/* A container's running size: _V.size. Tuples: their length; scalars: 0. */
static int64_t size_of(const Walk *w, const Item *v) {
    if (v->kind == KD_TUPLE) return v->noinfo ? 0 : (int64_t)v->b;
    const int boxed = v->kind == KD_LIST || v->kind == KD_DICT || v->kind == KD_SET || v->kind == KD_FROZENSET
                      || v->kind == KD_INSTANCE;
    return boxed && v->a >= 0 ? AT(w->boxes, Box)[v->a].size : 0;
}

/* _verify._into: 0 if op may put items into target (a container of kind), else -1. like: 'd'
 * for dict_like, 'l' for list_like, 0 for none. */
static int into(Walk *w, const Val *target, int64_t kind, char like, Py_ssize_t pos, const char *opname) {
    if (target->kind == kind) return 0;
    if (target->kind == KD_INSTANCE && like) {
        const Py_ssize_t g = AT(w->boxes, Box)[target->a].global;
        if (g < 0) return no_attribute(like == 'd' ? "dict_like" : "list_like");
        const GlobalInfo *info = &AT(w->globals, GlobalInfo)[g];
        if (like == 'd' ? info->dict_like : info->list_like) return 0;
    }
    KindName a, b;
    return refuse(w, pos, "%s into a %s: only into a %s this pickle made", opname, name_of(target->kind, &a),
                  name_of(kind, &b));
}

/* _verify._NUMBERS */
#define NUMBERS (KD_INT | KD_FLOAT | KD_VALUE | KD_OPAQUE)

/* _verify._square, saturating at COST_CAP. */
static uint64_t square_of(uint64_t cost) {
    if (cost <= FREE_COMPARE) return 0;
    return cost >= ((uint64_t)1 << 31) ? COST_CAP : cost * cost - FREE_COMPARE * FREE_COMPARE;
}

static uint64_t add_capped(uint64_t a, uint64_t b) { return a >= COST_CAP - b ? COST_CAP : a + b; }

/* _verify._charge_conversions: charge the number item, a key of b, for the compares that may
 * convert it or another key to the other's type; 0, or -1 refused. */
static int charge_conversions(Walk *w, const Val *item, Box *b, Py_ssize_t pos, const char *opname) {
    const int opaque = item->hkind == H_WEAK;
    const uint64_t own = square_of(item->cost);
    const int64_t pairs = opaque ? b->numbers : b->opaque_numbers;
    const uint64_t others = opaque ? b->number_squares : b->opaque_number_squares;
    b->numbers += 1;
    b->number_squares = add_capped(b->number_squares, own);
    if (opaque) {
        b->opaque_numbers += 1;
        b->opaque_number_squares = add_capped(b->opaque_number_squares, own);
    }
    if (pairs) {
        const uint64_t n = (uint64_t)(pairs < MAX_COMPARED ? pairs : MAX_COMPARED);
        const uint64_t charge = add_capped(own >= COST_CAP / n ? COST_CAP : own * n, others);
        if (w->budget < 0 || charge > (uint64_t)w->budget)
            return refuse(w, pos, "%s: comparing keys that are numbers of different types would take work out of "
                          "proportion to the pickle's size", opname);
        w->budget -= (int64_t)charge;
        b->size += (int64_t)charge; /* a reconstructor copying the container redoes the compares */
    }
    return 0;
}

/* _verify._key: charge item as a key of the container in box; 0 admitted, -1 refused or error. */
static int key(Walk *w, const Val *item, Py_ssize_t box, Py_ssize_t pos, const char *opname) {
    if (item->hkind == H_UNHASHABLE) {
        KindName a;
        return refuse(w, pos, "%s: a %s can't be a dict key or set item", opname, name_of(item->kind, &a));
    }
    if (item->depth > MAX_KEY_DEPTH)
        return refuse(w, pos, "%s: a key nested %zd deep (at most %d)", opname, item->depth, MAX_KEY_DEPTH);
    if (item->cost > 1) { /* a tuple: hashing it visits its whole tree, shared parts at each place */
        w->budget -= (int64_t)item->cost;
        if (w->budget < 0)
            return refuse(w, pos, "%s: hashing the keys would take work out of proportion to the pickle's size", opname);
    }
    Box *b = &AT(w->boxes, Box)[box];
    b->size += (int64_t)item->cost;
    if ((item->kind & NUMBERS) && charge_conversions(w, item, b, pos, opname) < 0) return -1;
    /* a few hundred distinct floats can share a hash: theirs are counted as computed ones are */
    if (item->hkind == H_SALTED || item->hkind == H_TEXT || item->hkind == H_UNSEEN
        || (item->hkind == H_FREE && item->kind != KD_FLOAT))
        return 0;
    if (item->hkind == H_WEAK) {
        w->opaque += 1;
        if (w->opaque > w->max_opaque)
            return refuse(w, pos, "%s: more than Limits.max_opaque_keys=%S keys whose hash the verifier can't check "
                          "(raise the limit for peers you trust with the CPU)", opname, w->max_opaque_obj);
        /* _verify._key: all of them may share one hash, so each may be compared with every
         * one before it in the container, at up to its cost each time past a free allowance */
        const int64_t before = b->opaque < MAX_COMPARED ? b->opaque : MAX_COMPARED;
        b->opaque += 1;
        if (before && item->cost > FREE_COMPARE) {
            const uint64_t excess = item->cost - FREE_COMPARE;
            if (w->budget < 0 || excess > (uint64_t)w->budget / (uint64_t)before)
                return refuse(w, pos, "%s: comparing keys whose hash the verifier can't check would take work out of "
                              "proportion to the pickle's size", opname);
            w->budget -= (int64_t)excess * before;
            b->size += (int64_t)excess * before; /* a copy redoes the compares */
        }
        return 0;
    }
    return VPUSH(w->collisions, Collision, ((Collision){box, item->hval}));
}

/* The attribute of a Global as the Python walk would use it; a new reference, kept. */
static PyObject *kept_attr(Walk *w, PyObject *obj, const char *name) {
    PyObject *value = PyObject_GetAttrString(obj, name);
    if (value == NULL) return NULL;
    const int err = PyList_Append(w->keep, value);
    Py_DECREF(value);
    return err < 0 ? NULL : value;
}

static int truth(PyObject *obj, const char *name, int *out) {
    PyObject *value = PyObject_GetAttrString(obj, name);
    if (value == NULL) return -1;
    *out = PyObject_IsTrue(value);
    Py_DECREF(value);
    return *out < 0 ? -1 : 0;
}

static int as_kind(PyObject *value, int64_t *out) {
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (*out == -1 && PyErr_Occurred()) return -1;
    if (overflow) { PyErr_SetString(PyExc_OverflowError, "a kind mask does not fit in 64 bits"); return -1; }
    return 0;
}

/* The globals index of the resolver's answer found (a new reference, consumed): the same
 * Global object always gets the same entry, its attributes read once. */
static Py_ssize_t add_global(Walk *w, PyObject *found) {
    if (PyList_Append(w->keep, found) < 0) { Py_DECREF(found); return -1; }
    Py_DECREF(found); /* the list keeps it alive until the walk ends */
    if (w->globals.len * 2 >= w->seen_cap) { /* rehash into a table twice the size */
        const Py_ssize_t cap = w->seen_cap ? w->seen_cap * 2 : 64;
        Py_ssize_t *seen = PyMem_Calloc((size_t)cap, sizeof *seen);
        if (seen == NULL) { PyErr_NoMemory(); return -1; }
        for (Py_ssize_t i = 0; i < w->globals.len; i++) {
            size_t h = ((size_t)AT(w->globals, GlobalInfo)[i].obj >> 4) & (size_t)(cap - 1);
            while (seen[h]) h = (h + 1) & (size_t)(cap - 1);
            seen[h] = i + 1;
        }
        PyMem_Free(w->seen);
        w->seen = seen;
        w->seen_cap = cap;
    }
    size_t h = ((size_t)found >> 4) & (size_t)(w->seen_cap - 1);
    for (; w->seen[h]; h = (h + 1) & (size_t)(w->seen_cap - 1))
        if (AT(w->globals, GlobalInfo)[w->seen[h] - 1].obj == found) return w->seen[h] - 1;
    GlobalInfo g = {found, NULL, NULL, NULL, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    PyObject *rebuilder;
    if ((g.module = kept_attr(w, found, "module")) == NULL || (g.qualname = kept_attr(w, found, "qualname")) == NULL
        || (g.name = kept_attr(w, found, "name")) == NULL || (rebuilder = kept_attr(w, found, "rebuilder")) == NULL
        || truth(found, "is_class", &g.is_class) < 0 || truth(found, "dict_like", &g.dict_like) < 0
        || truth(found, "list_like", &g.list_like) < 0 || truth(found, "attribute_of", &g.attribute_of) < 0
        || truth(found, "buildable", &g.buildable) < 0)
        return -1;
    g.has_rebuilder = rebuilder != Py_None;
    if (g.has_rebuilder) {
        PyObject *result = PyObject_GetAttrString(rebuilder, "result");
        if (result == NULL) return -1;
        const int err = as_kind(result, &g.result);
        Py_DECREF(result);
        if (err < 0) return -1;
        PyObject *args = PyObject_GetAttrString(rebuilder, "args");
        if (args == NULL) return -1;
        PyObject *fast = PySequence_Fast(args, "a reconstructor's args must be a sequence of kinds");
        Py_DECREF(args);
        if (fast == NULL) return -1;
        g.args = w->declared.len;
        g.nargs = PySequence_Fast_GET_SIZE(fast);
        for (Py_ssize_t i = 0; i < g.nargs; i++) {
            int64_t kind;
            if (as_kind(PySequence_Fast_GET_ITEM(fast, i), &kind) < 0 || VPUSH(w->declared, int64_t, kind) < 0) {
                Py_DECREF(fast);
                return -1;
            }
        }
        Py_DECREF(fast);
    }
    const Py_ssize_t index = w->globals.len;
    if (VPUSH(w->globals, GlobalInfo, g) < 0) return -1;
    for (h = ((size_t)found >> 4) & (size_t)(w->seen_cap - 1); w->seen[h]; h = (h + 1) & (size_t)(w->seen_cap - 1)) {}
    w->seen[h] = index + 1;
    return index;
}

/* resolver(module, qualname, pos) -> a Val of kind GLOBAL; -1 with the resolver's exception. */
static int resolve(Walk *w, PyObject *module, PyObject *qualname, Py_ssize_t pos, Val *out) {
    PyObject *at = PyLong_FromSsize_t(pos);
    if (at == NULL) return -1;
    PyObject *found = PyObject_CallFunctionObjArgs(w->resolver, module, qualname, at, NULL);
    Py_DECREF(at);
    if (found == NULL) return -1;
    const Py_ssize_t g = add_global(w, found);
    if (g < 0) return -1;
    const GlobalInfo *info = &AT(w->globals, GlobalInfo)[g];
    *out = (Val){KD_GLOBAL, 0, 1, 0, g, 0, H_WEAK, 0, (unsigned char)(info->has_rebuilder || info->attribute_of)};
    return 0;
}

static PyObject *decode_name(const Walk *w, const Val *v) {
    return PyUnicode_DecodeUTF8((const char *)w->data + v->a, v->b - v->a, "surrogatepass");
}

/* _verify._NAMED: what a pickle must not do with a reconstructor it named. */
#define NAMED "takes a reconstructor named and not called: a pickle may only call streampickle's reconstructors " \
              "(REDUCE), never pass them on as values"

static int no_subscript(void) {
    PyErr_SetString(PyExc_TypeError, "'NoneType' object is not subscriptable");
    return -1;
}

static int no_len(void) {
    PyErr_SetString(PyExc_TypeError, "object of type 'NoneType' has no len()");
    return -1;
}

/* _verify._typed: the result of STACK_GLOBAL, REDUCE, NEWOBJ, NEWOBJ_EX or BUILD on args[0..n)
 * (on the stack), into *out; -1 refused or error. */
static int typed(Walk *w, unsigned char op, const char *opname, Py_ssize_t n, Py_ssize_t pos, Val *out) {
    const Val *args = AT(w->stack, Val) + w->stack.len - n;
    KindName ka, kb;
    if (op == 0x93) { /* STACK_GLOBAL */
        const Val module = args[0], name = args[1];
        if (module.kind != KD_STR || name.kind != KD_STR)
            return refuse(w, pos, "STACK_GLOBAL needs two str literals, not %s and %s", name_of(module.kind, &ka),
                          name_of(name.kind, &kb));
        if (module.noinfo) return no_subscript();
        PyObject *module_name = decode_name(w, &module);
        PyObject *qualname = NULL;
        if (module_name != NULL) {
            if (name.noinfo) { Py_DECREF(module_name); return no_subscript(); }
            qualname = decode_name(w, &name);
        }
        if (qualname == NULL) {
            Py_XDECREF(module_name);
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return -1;
            PyErr_Clear();
            return refuse(w, pos, "STACK_GLOBAL: a name that is not valid UTF-8");
        }
        const int err = resolve(w, module_name, qualname, pos, out);
        Py_DECREF(module_name);
        Py_DECREF(qualname);
        return err;
    }
    if (op == 'R') { /* REDUCE */
        const Val func = args[0], arguments = args[1];
        if (func.kind != KD_GLOBAL)
            return refuse(w, pos, "REDUCE calls a %s: only a resolved global can be called", name_of(func.kind, &ka));
        if (arguments.kind != KD_TUPLE)
            return refuse(w, pos, "REDUCE with a %s as arguments, not a tuple", name_of(arguments.kind, &ka));
        if (func.noinfo) return no_attribute("rebuilder");
        const GlobalInfo target = AT(w->globals, GlobalInfo)[func.a];
        if (target.has_rebuilder) {
            if (arguments.noinfo) return no_len();
            if (arguments.b != target.nargs)
                return refuse(w, pos, "REDUCE: %S takes %zd arguments, not %zd", target.name, target.nargs, arguments.b);
            for (Py_ssize_t i = 0; i < arguments.b; i++) {
                const Item *item = &AT(w->items, Item)[arguments.a + i];
                const int64_t allowed = AT(w->declared, int64_t)[target.args + i];
                if (!(item->kind & allowed))
                    return refuse(w, pos, "REDUCE: argument %zd of %S must be a %s, not a %s", i, target.name,
                                  name_of(allowed, &ka), name_of(item->kind, &kb));
                if (item->named && item->kind != KD_GLOBAL) /* a tuple holding one, where a tuple may go */
                    return refuse(w, pos, "REDUCE " NAMED);
                w->budget -= size_of(w, item);
            }
            w->budget -= 1;
            if (w->budget < 0)
                return refuse(w, pos, "REDUCE: %S would walk containers out of proportion to the pickle's size", target.name);
            /* Its cost as a key is its arguments' as a tuple: hashing it can take as long (a
             * Fraction's hash, not cached, visits both big ints' digits each time). */
            *out = (Val){target.result, 0, arguments.cost, 0, -1, 0, H_WEAK, 1};
            if (target.result == KD_LIST || target.result == KD_DICT || target.result == KD_SET
                || target.result == KD_INSTANCE)
                return new_box(w, -1, &out->a);
            return 0;
        }
        if (arguments.named) return refuse(w, pos, "REDUCE " NAMED); /* an allowed callable or class, or getattr */
        if (target.attribute_of) {
            if (arguments.noinfo) return no_len();
            const Item *items = AT(w->items, Item) + arguments.a;
            if (arguments.b != 2 || items[0].kind != KD_GLOBAL || items[1].kind != KD_STR)
                return refuse(w, pos, "REDUCE: builtins.getattr is only admitted as getattr(allowed global, 'name')");
            const Item owner = items[0], name = items[1];
            if (name.noinfo) return no_subscript();
            PyObject *attr = PyUnicode_DecodeUTF8((const char *)w->data + name.a, name.b - name.a, "surrogatepass");
            if (attr == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return -1;
                PyErr_Clear();
                return refuse(w, pos, "REDUCE: getattr with a name that is not valid UTF-8");
            }
            if (owner.noinfo) { Py_DECREF(attr); return no_attribute("module"); }
            const GlobalInfo g = AT(w->globals, GlobalInfo)[owner.a];
            PyObject *dotted = PyUnicode_FromFormat("%S.%U", g.qualname, attr);
            Py_DECREF(attr);
            if (dotted == NULL) return -1;
            const int err = resolve(w, g.module, dotted, pos, out);
            Py_DECREF(dotted);
            return err;
        }
        if (target.is_class) {
            *out = (Val){KD_INSTANCE, 0, 1, 0, 0, 0, H_WEAK, 0};
            return new_box(w, func.a, &out->a);
        }
        *out = (Val){KD_OPAQUE, 0, 1, 0, func.a, 0, H_WEAK, 0};
        return 0;
    }
    if (op == 0x81 || op == 0x92) { /* NEWOBJ, NEWOBJ_EX */
        const Val cls = args[0], arguments = args[1];
        if (cls.kind == KD_GLOBAL && cls.noinfo) return no_attribute("is_class");
        if (cls.kind != KD_GLOBAL || !AT(w->globals, GlobalInfo)[cls.a].is_class
            || AT(w->globals, GlobalInfo)[cls.a].has_rebuilder)
            return refuse(w, pos, "%s instantiates a %s: only a class the user allowed", opname, name_of(cls.kind, &ka));
        if (arguments.kind != KD_TUPLE)
            return refuse(w, pos, "%s with a %s as arguments, not a tuple", opname, name_of(arguments.kind, &ka));
        if (op == 0x92 && args[2].kind != KD_DICT)
            return refuse(w, pos, "NEWOBJ_EX with a %s as keyword arguments, not a dict", name_of(args[2].kind, &ka));
        if (arguments.named) return refuse(w, pos, "%s " NAMED, opname);
        *out = (Val){KD_INSTANCE, 0, 1, 0, 0, 0, H_WEAK, 0};
        return new_box(w, cls.a, &out->a);
    }
    /* BUILD */
    if (args[1].named) return refuse(w, pos, "BUILD " NAMED);
    if (args[0].kind != KD_INSTANCE)
        return refuse(w, pos, "BUILD on a %s: only on an instance of a class the user allowed", name_of(args[0].kind, &ka));
    /* _verify._instance's shut: made by calling or NEWOBJ of a class that takes no state (the
     * box remembers the class; copyreg._reconstructor's fresh instances have none). */
    const Py_ssize_t cls = AT(w->boxes, Box)[args[0].a].global;
    if (cls >= 0 && !AT(w->globals, GlobalInfo)[cls].buildable)
        return refuse(w, pos, "BUILD on an instance of %S, which pickles itself without a state (its own __reduce__, "
                      "no __setstate__): a BUILD could rewrite a shared instance, such as an enum's member, or "
                      "fields its own code keeps consistent", AT(w->globals, GlobalInfo)[cls].name);
    *out = args[0];
    return 0;
}

/* _verify._no_named: refuse op if one of the n stack entries from base is a reconstructor named
 * and not called, or a tuple holding one. */
static int no_named(Walk *w, Py_ssize_t base, Py_ssize_t n, Py_ssize_t pos, const char *opname) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (AT(w->stack, Val)[base + i].named) return refuse(w, pos, "%s " NAMED, opname);
    return 0;
}

/* Replace the stack entries from base up with the tuple of them. */
static int make_tuple(Walk *w, Py_ssize_t base, Py_ssize_t pos, const char *opname) {
    const Py_ssize_t n = w->stack.len - base;
    Val t;
    if (tuple_val(w, AT(w->stack, Val) + base, n, w->items.len, &t) < 0) return -1;
    if (t.depth > MAX_TUPLE_DEPTH)
        return refuse(w, pos, "%s: a tuple nested more than %d deep", opname, MAX_TUPLE_DEPTH);
    for (Py_ssize_t i = 0; i < n; i++) {
        const Val *v = &AT(w->stack, Val)[base + i];
        if (VPUSH(w->items, Item, ((Item){v->kind, v->a, v->b, v->noinfo, v->named})) < 0) return -1;
    }
    if (n == 0) return VPUSH(w->stack, Val, t);
    AT(w->stack, Val)[base] = t;
    w->stack.len = base + 1;
    return 0;
}

static PyObject *verify_impl(const unsigned char *data, const Py_ssize_t end, Py_ssize_t chunk_count,
                             PyObject *resolver, PyObject *max_opaque_obj, int persistent) {
    Walk w;
    memset(&w, 0, sizeof w);
    w.persistent = persistent;
    w.data = data;
    w.end = end;
    w.resolver = resolver;
    w.max_opaque_obj = max_opaque_obj;
    w.budget = (int64_t)WORK_PER_BYTE * end + WORK_BASE;
    PyObject *result = NULL;
    Py_ssize_t *marks = NULL, marks_len = 0, marks_cap = 0;
    Py_ssize_t pos = 2, frame_end = 0, buffers = 0, globals = 0;
    int stopped = 0;
    int overflow;
    w.max_opaque = PyLong_AsLongLongAndOverflow(max_opaque_obj, &overflow);
    if (w.max_opaque == -1 && PyErr_Occurred()) return NULL;
    if (overflow) w.max_opaque = overflow > 0 ? INT64_MAX : INT64_MIN;
    const Py_hash_t none_hash = PyObject_Hash(Py_None);
    if ((w.keep = PyList_New(0)) == NULL) return NULL;

    if (end < 3 || data[0] != 0x80 || data[1] != 5) {
        refuse(&w, 0, "a pickle must start with PROTO 5 (bytes 80 05)");
        goto done;
    }
#define REFUSE(at, ...) do { refuse(&w, (at), __VA_ARGS__); goto done; } while (0)
#define CHECK(call) do { if ((call) < 0) goto done; } while (0)
#define BASE (marks_len ? marks[marks_len - 1] : 0)
#define PUSH(val) CHECK(VPUSH(w.stack, Val, (val)))
#define TOP (AT(w.stack, Val) + w.stack.len) /* one past the top */
    while (pos < end) {
        const unsigned char op = data[pos];
        const OpSpec *spec = &ops[op];
        const Py_ssize_t start = pos;
        pos += 1;
        switch (spec->kind) {
        case K_TABLE: {
            uint64_t size;
            if ((w.result = literal_size(data, end, start, spec, &pos, &size)) != NULL || PyErr_Occurred()) goto done;
            const Py_ssize_t at = pos;
            pos += (Py_ssize_t)size;
            if (w.stack.len - BASE < spec->pops)
                REFUSE(start, "%s needs %d items, the stack has %zd", spec->name, (int)spec->pops, w.stack.len - BASE);
            switch (op) {
            case 'N': PUSH(((Val){KD_NONE, none_hash, 1, 0, 0, 0, H_FREE, 0})); break;
            case 0x88: PUSH(((Val){KD_BOOL, 1, 1, 0, 0, 0, H_FREE, 0})); break;
            case 0x89: PUSH(((Val){KD_BOOL, 0, 1, 0, 0, 0, H_FREE, 0})); break;
            case 'J': { /* BININT: signed */
                const int64_t v = (int32_t)(uint32_t)le(data + at, 4);
                PUSH(((Val){KD_INT, v == -1 ? -2 : v, 1, 0, 0, 0, H_FREE, 0}));
                break;
            }
            case 'K': case 'M':
                PUSH(((Val){KD_INT, (int64_t)le(data + at, (int)size), 1, 0, 0, 0, H_FREE, 0}));
                break;
            case 0x8a: case 0x8b: { /* LONG1, LONG4 */
                const Hashed h = int_hash(data + at, size);
                PUSH(((Val){KD_INT, h.hval, size >= 8 ? 1 + size / 8 : 1, 0, 0, 0, h.hkind, 0}));
                break;
            }
            case 'G': { /* BINFLOAT: Python's hash of the float; a NaN's is its address, which the walk
                         * stands for with its opcode's offset (a memo copy is the same NaN) */
                const double d = PyFloat_Unpack8((const char *)data + at, 0);
                if (d == -1.0 && PyErr_Occurred()) goto done;
                PUSH(((Val){KD_FLOAT, d != d ? (int64_t)start : double_hash(d), 1, 0, 0, 0, d != d ? H_SALTED : H_FREE, 0}));
                break;
            }
            case 'C': case 'B': case 0x8e: PUSH(((Val){KD_BYTES, 0, 1, 0, at, pos, H_TEXT, 0})); break;
            case 0x8c: case 'X': case 0x8d: PUSH(((Val){KD_STR, 0, 1, 0, at, pos, H_TEXT, 0})); break;
            case 0x96: PUSH(((Val){KD_BYTEARRAY, 0, 1, 0, 0, 0, H_UNHASHABLE, 0})); break;
            case ')': CHECK(make_tuple(&w, w.stack.len, start, spec->name)); break;
            case ']': case '}': case 0x8f: {
                Val v = {op == ']' ? KD_LIST : op == '}' ? KD_DICT : KD_SET, 0, 1, 0, 0, 0, H_UNHASHABLE, 0};
                CHECK(new_box(&w, -1, &v.a));
                PUSH(v);
                break;
            }
            case 0x85: case 0x86: case 0x87: /* TUPLE1..3 */
                CHECK(make_tuple(&w, w.stack.len - spec->pops, start, spec->name));
                break;
            case 'a': /* APPEND */
                CHECK(into(&w, &TOP[-2], KD_LIST, 'l', start, spec->name));
                if (TOP[-1].named) REFUSE(start, "APPEND " NAMED);
                AT(w.boxes, Box)[TOP[-2].a].size += 1;
                w.stack.len -= 1;
                break;
            case 's': /* SETITEM */
                CHECK(into(&w, &TOP[-3], KD_DICT, 'd', start, spec->name));
                if (TOP[-2].named || TOP[-1].named) REFUSE(start, "SETITEM " NAMED);
                CHECK(key(&w, &TOP[-2], TOP[-3].a, start, spec->name));
                w.stack.len -= 2;
                break;
            case 0x98: /* READONLY_BUFFER */
                if (TOP[-1].kind != KD_BUFFER) {
                    KindName a;
                    REFUSE(start, "READONLY_BUFFER on a %s, not an out-of-band buffer", name_of(TOP[-1].kind, &a));
                }
                break;
            default: { /* STACK_GLOBAL, REDUCE, NEWOBJ, NEWOBJ_EX, BUILD */
                Val v;
                CHECK(typed(&w, op, spec->name, spec->pops, start, &v));
                w.stack.len -= spec->pops;
                PUSH(v);
                if (op == 0x93) globals += 1;
            }
            }
            break;
        }
        case K_MEMOIZE:
            if (w.stack.len == BASE) REFUSE(start, "MEMOIZE on an empty stack");
            CHECK(VPUSH(w.memo, Val, TOP[-1]));
            if (TOP[-1].hkind == H_TEXT && !TOP[-1].memo) TOP[-1].memo = w.memo.len; /* its hash is kept there */
            break;
        case K_GET1:
        case K_GET4: {
            const int width = spec->kind == K_GET1 ? 1 : 4;
            if (end - pos < width) REFUSE(start, "%s: argument cut off", spec->name);
            const uint64_t index = le(data + pos, width);
            pos += width;
            if (index >= (uint64_t)w.memo.len)
                REFUSE(start, "%s %llu names a memo slot never defined", spec->name, (unsigned long long)index);
            Val v = AT(w.memo, Val)[index];
            if (v.hkind == H_TEXT && !v.memo) v.memo = (Py_ssize_t)index + 1;
            PUSH(v);
            break;
        }
        case K_MARK:
            if (marks_len == MAX_OPEN_MARKS) REFUSE(start, "more than %d MARKs open at once", MAX_OPEN_MARKS);
            if (marks_len == marks_cap) {
                const Py_ssize_t cap = marks_cap ? marks_cap * 2 : 64;
                Py_ssize_t *grown = PyMem_Realloc(marks, (size_t)cap * sizeof *marks);
                if (grown == NULL) { PyErr_NoMemory(); goto done; }
                marks = grown;
                marks_cap = cap;
            }
            marks[marks_len++] = w.stack.len;
            break;
        case K_TOMARK_PUSH:
        case K_TOMARK_INTO:
        case K_POP_MARK: {
            if (marks_len == 0) REFUSE(start, "%s without a MARK", spec->name);
            const Py_ssize_t base = marks[--marks_len];
            const Py_ssize_t n = w.stack.len - base;
            if (op == 't') { /* TUPLE */
                CHECK(make_tuple(&w, base, start, spec->name));
            } else if (op == 0x91) { /* FROZENSET */
                CHECK(no_named(&w, base, n, start, spec->name));
                Val f = {KD_FROZENSET, 0, 1, 0, 0, 0, H_WEAK, 0, 0}; /* see _verify: its hash is not computed */
                CHECK(new_box(&w, -1, &f.a));
                for (Py_ssize_t i = 0; i < n; i++) {
                    const Val *item = &AT(w.stack, Val)[base + i];
                    CHECK(key(&w, item, f.a, start, spec->name));
                    if (item->depth > f.depth) f.depth = item->depth;
                    /* comparing two frozensets hashes and compares their items */
                    f.cost = item->cost >= COST_CAP - f.cost ? COST_CAP : f.cost + item->cost;
                }
                f.depth += 1;
                w.stack.len = base;
                PUSH(f);
            } else if (op != '1') { /* APPENDS, SETITEMS, ADDITEMS */
                if (base - BASE < 1) REFUSE(start, "%s has no container below its MARK", spec->name);
                const Val target = AT(w.stack, Val)[base - 1];
                if (op == 'e') {
                    CHECK(into(&w, &target, KD_LIST, 'l', start, spec->name));
                    CHECK(no_named(&w, base, n, start, spec->name));
                    AT(w.boxes, Box)[target.a].size += n;
                } else {
                    Py_ssize_t step = 1;
                    if (op == 'u') {
                        if (n % 2) REFUSE(start, "SETITEMS with an odd number of items");
                        CHECK(into(&w, &target, KD_DICT, 'd', start, spec->name));
                        step = 2;
                    } else {
                        CHECK(into(&w, &target, KD_SET, 0, start, spec->name));
                    }
                    CHECK(no_named(&w, base, n, start, spec->name));
                    for (Py_ssize_t i = 0; i < n; i += step)
                        CHECK(key(&w, &AT(w.stack, Val)[base + i], target.a, start, spec->name));
                }
                w.stack.len = base;
            } else {
                w.stack.len = base;
            }
            break;
        }
        case K_POP:
            if (w.stack.len > BASE) w.stack.len -= 1;
            else if (marks_len) marks_len -= 1;
            else REFUSE(start, "POP on an empty stack");
            break;
        case K_NEXT_BUFFER:
            buffers += 1;
            PUSH(((Val){KD_BUFFER, 0, 1, 0, 0, 0, H_UNHASHABLE, 0}));
            break;
        case K_FRAME: {
            if (start < frame_end) REFUSE(start, "FRAME opened inside another frame");
            if (end - pos < 8) REFUSE(start, "FRAME: length cut off");
            const uint64_t length = le(data + pos, 8);
            pos += 8;
            if (length > (uint64_t)(end - pos)) REFUSE(start, "FRAME extends past the end of the pickle");
            frame_end = pos + (Py_ssize_t)length;
            continue; /* a FRAME can't straddle its own end */
        }
        case K_STOP:
            if (pos != end) REFUSE(start, "%zd bytes follow STOP inside the pickle part", end - pos);
            if (marks_len || w.stack.len != 1) REFUSE(start, "STOP with an unbalanced stack");
            if (TOP[-1].named) REFUSE(start, "STOP " NAMED);
            stopped = 1;
            break;
        case K_PROTO:
            REFUSE(start, "PROTO may only be the first opcode");
        case K_KNOWN_FORBIDDEN:
            if (op == 'Q') { /* BINPERSID: only for a decoder with persistent_load */
                if (!w.persistent)
                    REFUSE(start, "opcode BINPERSID is not allowed: persistent ids need a decoder with persistent_load");
                if (w.stack.len == BASE) REFUSE(start, "BINPERSID needs 1 items, the stack has 0");
                if (TOP[-1].cost > 1) { /* persistent_load hashes or walks the id: charged as a key's tree */
                    w.budget -= (int64_t)TOP[-1].cost;
                    if (w.budget < 0)
                        REFUSE(start, "BINPERSID: the persistent ids would take work out of proportion to the "
                               "pickle's size");
                }
                /* what the user's persistent_load makes of the id: opaque */
                TOP[-1] = (Val){KD_OPAQUE, 0, 1, 0, 0, 0, H_WEAK, 1};
                globals += 1;
                break;
            }
            REFUSE(start, "opcode %s is not allowed: a protocol-5 pickler never emits it", spec->name);
        default: {
            char hex[8];
            snprintf(hex, sizeof hex, "0x%02x", (unsigned)op);
            REFUSE(start, "unknown opcode %s", hex);
        }
        }
        if (stopped) break;
        if (start < frame_end && frame_end < pos) REFUSE(start, "%s straddles the end of its FRAME", spec->name);
    }
    if (!stopped) REFUSE(end, "the pickle part ends without STOP");
    if (buffers != chunk_count)
        REFUSE(end, "the pickle takes %zd out-of-band buffers but the header declares %zd side chunks", buffers, chunk_count);
    if (w.collisions.len) {
        const int flood = flooded(&w.collisions);
        CHECK(flood);
        if (flood) REFUSE(end, "more than %d keys with the same hash in one container: a hash flood", MAX_EQUAL_HASHES);
    }
    result = PyLong_FromSsize_t(globals);
#undef REFUSE
#undef CHECK
#undef BASE
#undef PUSH
#undef TOP
done:
    if (result == NULL && w.result != NULL && !PyErr_Occurred()) result = w.result;
    else Py_XDECREF(w.result);
    PyMem_Free(marks);
    PyMem_Free(w.stack.items);
    PyMem_Free(w.memo.items);
    PyMem_Free(w.items.items);
    PyMem_Free(w.boxes.items);
    PyMem_Free(w.globals.items);
    PyMem_Free(w.declared.items);
    PyMem_Free(w.collisions.items);
    PyMem_Free(w.seen);
    Py_DECREF(w.keep);
    return result;
}

static PyObject *verify(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"", "", "", "", "persistent", NULL};
    Py_buffer view;
    Py_ssize_t chunk_count;
    PyObject *resolver, *max_opaque_keys;
    int persistent = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nOO!|$p", kwlist, &view, &chunk_count, &resolver,
                                     &PyLong_Type, &max_opaque_keys, &persistent))
        return NULL;
    PyObject *result = verify_impl(view.buf, view.len, chunk_count, resolver, max_opaque_keys, persistent);
    PyBuffer_Release(&view);
    return result;
}

/* The layout of the fixed header, read from streampickle._wire (the one place that knows it)
 * when this module is imported: see read_layout(). No offset or constant of the wire format
 * is written down in this file. */
static Py_ssize_t header_size;           /* _wire.HEADER_SIZE */
static Py_ssize_t flags_offset;          /* _wire.FLAGS_OFFSET */
static Py_ssize_t pickle_length_offset;  /* _wire.PICKLE_LENGTH_OFFSET; the field runs to the
                                          * end of the header, 8 bytes (checked at import) */
static unsigned char *plain_prefix;      /* _wire.PLAIN_PREFIX, pickle_length_offset bytes */

/* plain_at(buf, pos, end, max_pickle, max_message) -> the pickle length P of the plain message
 * (_wire.PLAIN_PREFIX, then 1 <= P <= max_pickle, header and pickle at most max_message) that
 * lies whole in buf[pos:end], or 0 for anything else: another kind of message, a bad or
 * over-limit header, or not all of it there yet. 0 is never a refusal: the caller leaves such
 * bytes to the Python path (Decoder.whole_message_at), which decides, and raises the precise
 * error. The one C answer to "is there a whole plain message here", for take_plain and
 * load_plain alike. */
static uint64_t plain_at(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end,
                         unsigned long long max_pickle, unsigned long long max_message) {
    if (end - pos < header_size || memcmp(buf + pos, plain_prefix, (size_t)pickle_length_offset) != 0) return 0;
    const uint64_t plen = le(buf + pos + pickle_length_offset, 8);
    if (plen == 0 || plen > max_pickle || max_message < (uint64_t)header_size
        || plen > max_message - (uint64_t)header_size || plen > (uint64_t)(end - pos - header_size))
        return 0;
    return plen;
}

static PyObject *pickle_loads = NULL;

/* Whether a message's pickle part (len >= 1 bytes at buf) can go straight to pickle.loads: in
 * safe mode, if the scan accepts it and it names no global (then only builtin containers and
 * scalars can come out); trusted, if it ends with its STOP. 1 yes, 0 no, -1 error. */
static int plain_pickle(const unsigned char *buf, Py_ssize_t len, int trusted) {
    if (trusted) return buf[len - 1] == '.';
    PyObject *scanned = scan_impl(buf, len, 0);
    if (scanned == NULL) return -1;
    const int plain = PyLong_Check(scanned) && PyLong_AsSsize_t(scanned) == 0;
    Py_DECREF(scanned);
    return plain; /* refused, or the full verifier's to judge: 0, for the Python path */
}

/* load_plain(data, trusted, max_pickle, max_message) -> the object, or NotImplemented.
 *
 * Decoder.load_one (what streampickle.loads() does) for its commonest call in one C call:
 * default options, and a buffer holding exactly one plain message (see plain_at) whose
 * pickle, in safe mode, passes the scan and names no global. Anything else returns
 * NotImplemented and the Python path takes over (and raises its precise error): this function
 * never refuses a message itself. An error from pickle.loads propagates for the caller to
 * wrap, as on the Python path. The pickle is copied into a bytes object (pickle.loads reads
 * those fastest); the caller keeps max_pickle below the size from which the Python path
 * unpickles with the GC paused and lends the pickle instead (_decoder.PICKLE_COPY_LIMIT). */
static PyObject *load_plain(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "load_plain(data, trusted, max_pickle, max_message) takes 4 arguments");
        return NULL;
    }
    const int trusted = args[1] == Py_True;
    const unsigned long long max_pickle = PyLong_AsUnsignedLongLong(args[2]);
    if (max_pickle == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    const unsigned long long max_message = PyLong_AsUnsignedLongLong(args[3]);
    if (max_message == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    PyObject *data = args[0];
    const unsigned char *buf;
    Py_ssize_t len;
    Py_buffer view = {0};
    if (PyBytes_CheckExact(data)) {
        buf = (const unsigned char *)PyBytes_AS_STRING(data);
        len = PyBytes_GET_SIZE(data);
    } else {
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear(); /* not bytes-like, or not contiguous: the Python path says which */
            Py_RETURN_NOTIMPLEMENTED;
        }
        buf = (const unsigned char *)view.buf;
        len = view.len;
    }
    PyObject *obj = Py_NotImplemented, *pickled = NULL;
    const uint64_t plen = plain_at(buf, 0, len, max_pickle, max_message);
    if (plen == 0 || plen != (uint64_t)(len - header_size)) goto done; /* not one whole plain message */
    const int plain = plain_pickle(buf + header_size, (Py_ssize_t)plen, trusted);
    if (plain < 0) { obj = NULL; goto done; }
    if (!plain) goto done;
    pickled = PyBytes_FromStringAndSize((const char *)buf + header_size, (Py_ssize_t)plen);
    /* an unpickling error propagates: the caller wraps it, as its Python path does */
    obj = pickled == NULL ? NULL : PyObject_CallOneArg(pickle_loads, pickled);
    Py_XDECREF(pickled);
    if (view.obj != NULL) PyBuffer_Release(&view);
    return obj;
done:
    if (view.obj != NULL) PyBuffer_Release(&view);
    Py_XINCREF(obj);
    return obj;
}

/* load_inband(pickled, trusted) -> the object, or NotImplemented.
 *
 * Loader.load_inband in one C call, for a message without side chunks whose pickle part is a
 * bytes object: pickle.loads(pickled) if plain_pickle() says it may, else NotImplemented, and
 * the Python path takes over (with the restricted unpickler, or to raise its precise error).
 * An error from pickle.loads propagates for the caller to wrap. trusted is a Loader's, which
 * checked it: true is Py_True, anything else false. */
static PyObject *load_inband(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "load_inband(pickled: bytes, trusted: bool)");
        return NULL;
    }
    const Py_ssize_t len = PyBytes_GET_SIZE(args[0]);
    if (len == 0) Py_RETURN_NOTIMPLEMENTED;
    const int plain = plain_pickle((const unsigned char *)PyBytes_AS_STRING(args[0]), len, args[1] == Py_True);
    if (plain < 0) return NULL;
    if (!plain) Py_RETURN_NOTIMPLEMENTED;
    return PyObject_CallOneArg(pickle_loads, args[0]);
}

/* take_plain(data, pos, max_pickle, max_message, append, no_chunks) -> the new position.
 *
 * The decoder's whole-message fast path (Decoder.take_whole) for its commonest message in C:
 * starting at offset pos of the buffer data, for each whole plain message (see plain_at) call
 * append((pickle as bytes, no_chunks)) and move on. Stop at the first message that plain_at
 * leaves to Python and return its offset: the Python loop takes it from there (and raises the
 * precise error if it is bad), so this function never refuses a message itself. The caller
 * uses it only when the decoder has no key. Same as the Python loop on these messages; the
 * tests hold the two together.
 *
 * Why: a stream of small messages arrives many to a read, and the Python loop spent 2.5 us on
 * each (more than unpickling it). */
static PyObject *take_plain(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "take_plain(data, pos, max_pickle, max_message, append, no_chunks) takes 6 arguments");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) return NULL;
    const unsigned long long max_pickle = PyLong_AsUnsignedLongLong(args[2]);
    if (max_pickle == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    const unsigned long long max_message = PyLong_AsUnsignedLongLong(args[3]);
    if (max_message == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    PyObject *append = args[4], *no_chunks = args[5];
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    const Py_ssize_t end = view.len;
    if (pos < 0 || pos > end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos is outside data");
        return NULL;
    }
    uint64_t plen;
    while ((plen = plain_at(buf, pos, end, max_pickle, max_message)) != 0) {
        PyObject *pickled = PyBytes_FromStringAndSize((const char *)buf + pos + header_size, (Py_ssize_t)plen);
        if (pickled == NULL) goto error;
        PyObject *entry = PyTuple_Pack(2, pickled, no_chunks);
        Py_DECREF(pickled);
        if (entry == NULL) goto error;
        PyObject *result = PyObject_CallOneArg(append, entry);
        Py_DECREF(entry);
        if (result == NULL) goto error;
        Py_DECREF(result);
        pos += header_size + (Py_ssize_t)plen;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(pos);
error:
    PyBuffer_Release(&view);
    return NULL;
}

/* frame(pickled, flags) -> bytes: the header of a message without side chunks, followed by
 * the pickle, in one allocation (a MAC tag, if flags asks for one, is the caller's to append).
 * The same bytes as _wire.pack_header(flags, 0, len(pickled)) + pickled, for a third of the
 * cost: dumps() of a small object is mostly this kind of glue. frame_bytes does the work for
 * frame() and dump_small(). */
static PyObject *frame_bytes(PyObject *pickled, long flags) {
    const Py_ssize_t n = PyBytes_GET_SIZE(pickled);
    PyObject *message = PyBytes_FromStringAndSize(NULL, header_size + n);
    if (message == NULL) return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(message);
    memcpy(out, plain_prefix, (size_t)pickle_length_offset);
    out[flags_offset] = (unsigned char)flags;
    for (int i = 0; i < 8; i++) out[pickle_length_offset + i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(out + header_size, PyBytes_AS_STRING(pickled), n);
    return message;
}

static PyObject *frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "frame(pickled: bytes, flags: int)");
        return NULL;
    }
    const long flags = PyLong_AsLong(args[1]);
    if (flags == -1 && PyErr_Occurred()) return NULL;
    if (flags < 0 || flags > 255) {
        PyErr_SetString(PyExc_ValueError, "flags must fit in one byte");
        return NULL;
    }
    return frame_bytes(args[0], flags);
}

/* unshared(obj) -> bool: whether pickling obj without the pickler's memo ("fast" mode) gives
 * back the same objects. True when obj's graph holds only exact None, bool, int, float, str,
 * bytes, list, tuple and dict objects, and every object in it but the root that the pickler
 * would memoize (a str, bytes or container) has a reference count of 1: its one reference is
 * from its parent in the graph, so it appears once, and there is no cycle. Strings and bytes
 * of at most one ASCII character are exempt: unpickling makes them from CPython's cached
 * singletons anyway.
 *
 * Why: for a large graph the memo is most of pickling's cost. A million (int, float, str)
 * tuples pickle in 580 ms with it and 63 ms without it, and the pickle without MEMOIZE
 * opcodes also unpickles 10% faster. The walk costs about 7 ns per object, borrows every
 * reference (so the counts it reads are the real ones), calls no Python code, and stops at
 * the first object that fails. A graph nested deeper than MAX_DEPTH is left to the memo. */
#define MAX_DEPTH 200

static int unshared_impl(PyObject *obj, int depth, int root) {
    PyTypeObject *t = Py_TYPE(obj);
    if (obj == Py_None || t == &PyBool_Type || t == &PyLong_Type || t == &PyFloat_Type)
        return 1; /* never memoized */
    if (t == &PyUnicode_Type) {
        if (root || Py_REFCNT(obj) == 1) return 1;
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(obj) < 0) { PyErr_Clear(); return 0; } /* a legacy string */
#endif
        const Py_ssize_t n = PyUnicode_GET_LENGTH(obj);
        return n == 0 || (n == 1 && PyUnicode_IS_ASCII(obj));
    }
    if (t == &PyBytes_Type)
        return root || Py_REFCNT(obj) == 1 || PyBytes_GET_SIZE(obj) <= 1;
    if (t == &PyTuple_Type && PyTuple_GET_SIZE(obj) == 0)
        return 1; /* written as EMPTY_TUPLE, not memoized */
    if (t != &PyList_Type && t != &PyTuple_Type && t != &PyDict_Type)
        return 0;
    if ((!root && Py_REFCNT(obj) != 1) || depth >= MAX_DEPTH)
        return 0;
    if (t == &PyDict_Type) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(obj, &pos, &key, &value))
            if (!unshared_impl(key, depth + 1, 0) || !unshared_impl(value, depth + 1, 0)) return 0;
        return 1;
    }
    const Py_ssize_t n = Py_SIZE(obj);
    PyObject **items = t == &PyList_Type ? ((PyListObject *)obj)->ob_item : ((PyTupleObject *)obj)->ob_item;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!unshared_impl(items[i], depth + 1, 0)) return 0;
    return 1;
}

static int skip_memo(PyObject *obj) {
#ifdef Py_GIL_DISABLED
    return 0; /* reference counts are split between threads there: never skip the memo */
#else
    return unshared_impl(obj, 0, 1);
#endif
}

static PyObject *unshared(PyObject *self, PyObject *obj) {
    return PyBool_FromLong(skip_memo(obj));
}

/* dump(pickler, obj): pickler.dump(obj), in fast mode (no memo) when unshared(obj), and the
 * pickler left in normal mode after. */
static PyObject *str_dump = NULL, *str_fast = NULL, *str_clear_memo = NULL;

/* *used_fast (if not NULL) says whether the dump ran without the memo, which it then left as
 * it was: the C pickler memoizes nothing in fast mode. */
static PyObject *dump_impl(PyObject *pickler, PyObject *obj, int *used_fast) {
    const int fast = skip_memo(obj);
    if (used_fast != NULL) *used_fast = fast;
    if (fast && PyObject_SetAttr(pickler, str_fast, Py_True) < 0) return NULL;
    PyObject *result = PyObject_CallMethodOneArg(pickler, str_dump, obj);
    if (fast) {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        if (PyObject_SetAttr(pickler, str_fast, Py_False) < 0) {
            Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(traceback);
            Py_XDECREF(result);
            return NULL;
        }
        PyErr_Restore(type, value, traceback);
    }
    return result;
}

static PyObject *dump(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "dump(pickler, obj) takes 2 arguments");
        return NULL;
    }
    return dump_impl(args[0], args[1], NULL);
}

/* dump_small(pickler, out, buffers, obj, limit) -> the framed message, or None.
 *
 * dumps() for its commonest case in one C call (each line of Python glue showed in the cost of
 * a small message): dump(pickler, obj); then, if the pickler wrote one bytes object of at most
 * limit bytes into the list out and no out-of-band buffer into the list buffers, empty out,
 * clear the memo and return the message without side chunks (as frame(pickled, 0)). Otherwise
 * return None and leave out and buffers for the caller to finish. Errors from dump propagate.
 * Same as _encoder._dump_small_py. */
static PyObject *dump_small(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyList_Check(args[1]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "dump_small(pickler, out: list, buffers: list, obj, limit: int)");
        return NULL;
    }
    PyObject *pickler = args[0], *out = args[1], *buffers = args[2];
    const Py_ssize_t limit = PyLong_AsSsize_t(args[4]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    int fast;
    PyObject *result = dump_impl(pickler, args[3], &fast);
    if (result == NULL) return NULL;
    Py_DECREF(result);
    if (PyList_GET_SIZE(out) != 1 || PyList_GET_SIZE(buffers) != 0) Py_RETURN_NONE;
    PyObject *pickled = PyList_GET_ITEM(out, 0);
    if (!PyBytes_CheckExact(pickled) || PyBytes_GET_SIZE(pickled) > limit) Py_RETURN_NONE;
    PyObject *message = frame_bytes(pickled, 0);
    if (message == NULL) return NULL;
    if (PyList_SetSlice(out, 0, 1, NULL) < 0) goto error;
    if (!fast) { /* a dump in fast mode left the memo empty, as the last message's reset did */
        result = PyObject_CallMethodNoArgs(pickler, str_clear_memo);
        if (result == NULL) goto error;
        Py_DECREF(result);
    }
    return message;
error:
    Py_DECREF(message);
    return NULL;
}

/* address(buffer): where a contiguous buffer's first byte lies in memory (the shared-memory
 * encoder looks it up among this process's shared files). Readonly buffers too. */
static PyObject *address(PyObject *self, PyObject *obj) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return result;
}

#ifndef _WIN32
#include <sys/mman.h>
#include <stddef.h>
#include <limits.h>
#include <errno.h>

/* Mapping: shared memory a file descriptor was mapped to (map_shared), as a writable buffer of
 * unsigned bytes. It unmaps itself when the last reference goes: numpy arrays and memoryviews
 * over it hold one, so the memory stays mapped exactly as long as something can reach it.
 * _shm's Python twin gets the same from a ctypes array and weakref.finalize; this one costs
 * no new ctypes type per size (about 60 us each, cold) and no finalizer per mapping. */
typedef struct {
    PyObject_HEAD
    void *start;
    Py_ssize_t size;
    PyObject *on_free;  /* called with the address before the memory is unmapped; or NULL */
    PyObject *weakrefs;
} Mapping;

static int mapping_getbuffer(PyObject *self, Py_buffer *view, int flags) {
    Mapping *m = (Mapping *)self;
    return PyBuffer_FillInfo(view, self, m->start, m->size, 0, flags);
}

static void mapping_dealloc(PyObject *self) {
    Mapping *m = (Mapping *)self;
    if (m->weakrefs != NULL) PyObject_ClearWeakRefs(self);
    PyObject *on_free = m->on_free;
    m->on_free = NULL;
    if (on_free != NULL) {
        /* as a finalizer runs: an error is reported, never raised, and one already being
         * raised where the last reference went is kept */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyObject *where = PyLong_FromVoidPtr(m->start);
        PyObject *result = where == NULL ? NULL : PyObject_CallOneArg(on_free, where);
        Py_XDECREF(where);
        if (result == NULL) PyErr_WriteUnraisable(on_free);
        Py_XDECREF(result);
        Py_DECREF(on_free);
        PyErr_Restore(type, value, traceback);
    }
    if (m->start != NULL) {
        void *start = m->start;
        size_t size = (size_t)m->size;
        Py_BEGIN_ALLOW_THREADS  /* a large populated mapping takes a while to tear down */
        munmap(start, size);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free(self);
}

static PyObject *mapping_address(PyObject *self, void *closure) {
    (void)closure;
    return PyLong_FromVoidPtr(((Mapping *)self)->start);
}

static PyBufferProcs mapping_as_buffer = {mapping_getbuffer, NULL};

static PyGetSetDef mapping_getset[] = {
    {"address", mapping_address, NULL, "Where the mapping starts.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "streampickle._speedups.Mapping",
    .tp_basicsize = sizeof(Mapping),
    .tp_dealloc = mapping_dealloc,
    .tp_as_buffer = &mapping_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Shared memory mapped by map_shared, unmapped when the last reference goes.",
    .tp_weaklistoffset = offsetof(Mapping, weakrefs),
    .tp_getset = mapping_getset,
};

/* map_shared(fd, offset, size, huge_page, on_free) -> a Mapping of ``size`` bytes of ``fd`` from
 * ``offset`` (a multiple of the page size), shared and writable; OSError if the kernel refuses.
 *
 * _shm._map_py in C, step for step: a mapping of ``huge_page`` bytes or more starts as far past
 * a ``huge_page`` boundary as ``offset`` does (see _shm._map for why). The kernel's own choice
 * often does (Linux 6.7 and later place large mappings on such a boundary): only otherwise is
 * the place found by reserving ``size + huge_page`` bytes of address space and releasing them.
 * ``on_free`` (or None) is called with the address when the mapping is about to be unmapped. */
static PyObject *map_shared(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "map_shared(fd, offset, size, huge_page, on_free)");
        return NULL;
    }
    const long fd = PyLong_AsLong(args[0]);
    const long long offset = PyLong_AsLongLong(args[1]);
    const Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    const Py_ssize_t huge = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (fd < 0 || fd > INT_MAX || offset < 0 || size <= 0 || huge <= 0) {
        PyErr_SetString(PyExc_ValueError, "map_shared: a negative descriptor, offset or size");
        return NULL;
    }
    PyObject *on_free = args[4] == Py_None ? NULL : args[4];
    Mapping *m = PyObject_New(Mapping, &MappingType);
    if (m == NULL) return NULL;
    m->start = NULL;
    m->size = size;
    m->on_free = NULL;
    m->weakrefs = NULL;
    const int prot = PROT_READ | PROT_WRITE;
    const uintptr_t want = (uintptr_t)offset % (uintptr_t)huge;
    void *start = mmap(NULL, (size_t)size, prot, MAP_SHARED, (int)fd, (off_t)offset);
    if (start != MAP_FAILED && size >= huge && (uintptr_t)start % (uintptr_t)huge != want) {
        munmap(start, (size_t)size);
        void *hint = NULL;
        void *reserved = mmap(NULL, (size_t)size + (size_t)huge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (reserved != MAP_FAILED) {
            munmap(reserved, (size_t)size + (size_t)huge);
            uintptr_t at = (uintptr_t)reserved;
            hint = (void *)(at + (want + (uintptr_t)huge - at % (uintptr_t)huge) % (uintptr_t)huge);
        }
        start = mmap(hint, (size_t)size, prot, MAP_SHARED, (int)fd, (off_t)offset);
    }
    if (start == MAP_FAILED) {
        int err = errno;
        Py_DECREF(m);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    m->start = start;
    Py_XINCREF(on_free);
    m->on_free = on_free;
    return (PyObject *)m;
}
#endif

/* plain_ndarray(dtypes, descr, shape, fortran, buffer) -> an array, or None.
 *
 * _rebuild.plain_ndarray_py in C, check for check (its docstring says what the common case
 * is): a message of many arrays spends most of its decoding building them. ``dtypes`` is
 * _rebuild's cache of checked plain descriptors. Any case it doesn't check fully returns None,
 * for _rebuild.ndarray to check and build or refuse; numpy's own errors propagate, as from
 * the twin. */
static PyObject *np_frombuffer = NULL, *str_kind = NULL, *str_itemsize = NULL, *str_reshape = NULL;
static PyObject *kw_dtype = NULL, *kw_order = NULL, *str_C = NULL, *str_F = NULL, *str_c_contiguous = NULL;

static int numpy_ready(void) {
    if (np_frombuffer != NULL) return 0;
    PyObject *numpy = PyImport_ImportModule("numpy");
    if (numpy == NULL) return -1;
    np_frombuffer = PyObject_GetAttrString(numpy, "frombuffer");
    Py_DECREF(numpy);
    return np_frombuffer == NULL ? -1 : 0;
}

static PyObject *plain_ndarray(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "plain_ndarray(dtypes, descr, shape, fortran, buffer) takes 5 arguments");
        return NULL;
    }
    PyObject *dtypes = args[0], *descr = args[1], *shape = args[2], *fortran = args[3], *buffer = args[4];
    if (!PyDict_CheckExact(dtypes)) {
        PyErr_SetString(PyExc_TypeError, "plain_ndarray: dtypes must be a dict");
        return NULL;
    }
    /* Exact types, as the twin's ``type(x) is not T`` (bool and memoryview have no subclasses). */
    if (!PyUnicode_CheckExact(descr) || !PyList_CheckExact(shape) || !PyBool_Check(fortran)
        || !PyMemoryView_Check(buffer))
        Py_RETURN_NONE;
    PyObject *dt = PyDict_GetItemWithError(dtypes, descr); /* borrowed; an exact str hashes safely */
    if (dt == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    Py_INCREF(dt);
    PyObject *result = NULL;
    PyObject *kind = PyObject_GetAttr(dt, str_kind);
    if (kind == NULL) goto done;
    const int text = PyUnicode_Check(kind) && PyUnicode_CompareWithASCIIString(kind, "U") == 0;
    Py_DECREF(kind);
    const Py_ssize_t ndim = PyList_GET_SIZE(shape);
    if (text || ndim > 32) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *itemsize_obj = PyObject_GetAttr(dt, str_itemsize);
    if (itemsize_obj == NULL) goto done;
    const long long itemsize = PyLong_AsLongLong(itemsize_obj);
    Py_DECREF(itemsize_obj);
    if (itemsize == -1 && PyErr_Occurred()) goto done;
    /* The product in 64 bits: past 2**63 it can only equal a buffer's size if a later entry
     * is 0 (Python's ints don't overflow, so the twin sees that too). */
    unsigned long long expected = (unsigned long long)itemsize;
    int overflow = 0, zero = 0;
    for (Py_ssize_t i = 0; i < ndim; i++) {
        PyObject *n = PyList_GET_ITEM(shape, i);
        if (!PyLong_CheckExact(n)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        int over = 0;
        const long long v = PyLong_AsLongLongAndOverflow(n, &over);
        if (over || v < 0) { /* past INT64_MAX or negative: the twin's range check */
            result = Py_NewRef(Py_None);
            goto done;
        }
        if (v == 0) zero = 1;
        else if (!overflow && __builtin_mul_overflow(expected, (unsigned long long)v, &expected)) overflow = 1;
    }
    if (zero) expected = 0;
    else if (overflow || expected > (unsigned long long)PY_SSIZE_T_MAX) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_buffer view; /* a released memoryview raises ValueError here, as its nbytes does in the twin */
    if (PyObject_GetBuffer(buffer, &view, PyBUF_FULL_RO) < 0) goto done;
    int fits = (unsigned long long)view.len == expected && view.format != NULL && strcmp(view.format, "B") == 0;
    PyBuffer_Release(&view);
    if (fits) {
        /* memoryview's own flag, not PyBuffer_IsContiguous: the two differ on an empty view
         * with a stride (memoryview(b"")[::2] is not c_contiguous, and numpy refuses it). */
        PyObject *contiguous = PyObject_GetAttr(buffer, str_c_contiguous);
        if (contiguous == NULL) goto done;
        fits = contiguous == Py_True;
        Py_DECREF(contiguous);
    }
    if (!fits) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (numpy_ready() < 0) goto done;
    PyObject *call[2] = {buffer, dt};
    PyObject *flat = PyObject_Vectorcall(np_frombuffer, call, 1, kw_dtype);
    if (flat == NULL || ndim == 1) { /* a 1-D array is already the shape the size check proved */
        result = flat;
        goto done;
    }
    PyObject *reshape_args[3] = {flat, shape, fortran == Py_True ? str_F : str_C};
    result = PyObject_VectorcallMethod(str_reshape, reshape_args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kw_order);
    Py_DECREF(flat);
done:
    Py_DECREF(dt);
    return result;
}

/* reduce_ndarray(descrs, rebuilder, fallback, array) -> the reduction of a plain array.
 *
 * _encoder._reduce_ndarray's common case in C: a dtype whose wire descriptor is remembered
 * (descrs: id(dtype) -> (dtype, descriptor)), and memory contiguous in C or Fortran order
 * that exports through the buffer protocol. It returns what the Python reducer returns,
 * (rebuilder, (descriptor, list(shape), fortran, PickleBuffer(array))); every other array
 * goes to fallback(array), the Python reducer itself. */
static PyObject *str_dtype = NULL;

static PyObject *reduce_ndarray(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "reduce_ndarray(descrs, rebuilder, fallback, array) takes 4 arguments");
        return NULL;
    }
    PyObject *descrs = args[0], *rebuilder = args[1], *fallback = args[2], *array = args[3];
    if (!PyDict_CheckExact(descrs)) {
        PyErr_SetString(PyExc_TypeError, "reduce_ndarray: descrs must be a dict");
        return NULL;
    }
    PyObject *dt = PyObject_GetAttr(array, str_dtype);
    if (dt == NULL) return NULL;
    PyObject *key = PyLong_FromVoidPtr(dt);
    if (key == NULL) { Py_DECREF(dt); return NULL; }
    PyObject *known = PyDict_GetItemWithError(descrs, key); /* borrowed */
    Py_DECREF(key);
    if (known == NULL && PyErr_Occurred()) { Py_DECREF(dt); return NULL; }
    const int remembered = known != NULL && PyTuple_CheckExact(known) && PyTuple_GET_SIZE(known) == 2
        && PyTuple_GET_ITEM(known, 0) == dt;
    Py_DECREF(dt);
    if (!remembered) return PyObject_CallOneArg(fallback, array);
    PyObject *descr = Py_NewRef(PyTuple_GET_ITEM(known, 1)); /* ours: allocations below may run Python */
    Py_buffer view;
    if (PyObject_GetBuffer(array, &view, PyBUF_RECORDS_RO) < 0) { /* no buffer format: the Python path */
        PyErr_Clear();
        Py_DECREF(descr);
        return PyObject_CallOneArg(fallback, array);
    }
    const int c_order = PyBuffer_IsContiguous(&view, 'C'), f_order = PyBuffer_IsContiguous(&view, 'F');
    PyObject *shape = (c_order || f_order) ? PyList_New(view.ndim) : NULL;
    if (shape != NULL) {
        for (int i = 0; i < view.ndim; i++) {
            PyObject *n = PyLong_FromSsize_t(view.shape[i]);
            if (n == NULL) { Py_CLEAR(shape); break; }
            PyList_SET_ITEM(shape, i, n);
        }
    }
    PyBuffer_Release(&view);
    if (!c_order && !f_order) { /* strided: copied there */
        Py_DECREF(descr);
        return PyObject_CallOneArg(fallback, array);
    }
    PyObject *buffer = shape == NULL ? NULL : PyPickleBuffer_FromObject(array);
    PyObject *call = NULL;
    if (buffer != NULL)
        call = Py_BuildValue("(O(OOON))", rebuilder, descr, shape, c_order ? Py_False : Py_True, buffer);
    Py_XDECREF(shape);
    Py_DECREF(descr);
    return call;
}

static PyObject *float_hash_py(PyObject *self, PyObject *arg) {
    const double v = PyFloat_AsDouble(arg);
    if (v == -1.0 && PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(double_hash(v));
}

static PyMethodDef methods[] = {
    {"float_hash", float_hash_py, METH_O, "float_hash(x) -> hash(x), for a float other than a NaN, as the verifier takes it."},
    {"scan", scan, METH_VARARGS,
     "scan(data, chunk_count) -> 0 (plain, admitted), 1 (defer to the full verifier), or\n"
     "(position, reason) if refused: the verifier's plain mode."},
    {"verify", (PyCFunction)(void (*)(void))verify, METH_VARARGS | METH_KEYWORDS,
     "verify(data, chunk_count, resolver, max_opaque_keys, *, persistent=False) -> the number of\n"
     "STACK_GLOBAL and BINPERSID opcodes, or (position, reason) if refused: the verifier's full mode\n"
     "(_verify.verify)."},
    {"load_plain", (PyCFunction)(void (*)(void))load_plain, METH_FASTCALL,
     "load_plain(data, trusted, max_pickle, max_message) -> the object of the one plain message\n"
     "that is all of data, or NotImplemented to take the Python path."},
    {"load_inband", (PyCFunction)(void (*)(void))load_inband, METH_FASTCALL,
     "load_inband(pickled, trusted) -> pickle.loads(pickled) if it is plain, else NotImplemented."},
    {"take_plain", (PyCFunction)(void (*)(void))take_plain, METH_FASTCALL,
     "take_plain(data, pos, max_pickle, max_message, append, no_chunks) -> the offset of the\n"
     "first message that isn't a complete plain one; each one before it appended."},
    {"frame", (PyCFunction)(void (*)(void))frame, METH_FASTCALL,
     "frame(pickled, flags) -> header + pickled, a message without side chunks."},
    {"unshared", unshared, METH_O,
     "unshared(obj) -> whether obj pickles to the same objects without the pickler's memo."},
    {"dump", (PyCFunction)(void (*)(void))dump, METH_FASTCALL,
     "dump(pickler, obj) -> pickler.dump(obj), without the memo if unshared(obj)."},
    {"dump_small", (PyCFunction)(void (*)(void))dump_small, METH_FASTCALL,
     "dump_small(pickler, out, buffers, obj, limit) -> a small plain message, or None."},
    {"address", address, METH_O,
     "address(buffer) -> the address of a contiguous buffer's first byte."},
    {"reduce_ndarray", (PyCFunction)(void (*)(void))reduce_ndarray, METH_FASTCALL,
     "reduce_ndarray(descrs, rebuilder, fallback, array) -> _encoder._reduce_ndarray(array) for\n"
     "its common case; fallback(array) for every other."},
#ifndef _WIN32
    {"map_shared", (PyCFunction)(void (*)(void))map_shared, METH_FASTCALL,
     "map_shared(fd, offset, size, huge_page, on_free) -> a Mapping of the file's range, shared and\n"
     "writable, unmapped when the last reference goes (_shm._map_py)."},
#endif
    {"plain_ndarray", (PyCFunction)(void (*)(void))plain_ndarray, METH_FASTCALL,
     "plain_ndarray(dtypes, descr, shape, fortran, buffer) -> an array of the common case, or None\n"
     "(_rebuild.plain_ndarray_py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "streampickle._speedups",
    "Speed paths in C: the pre-scan of a peer's pickle (a port of _scan.py), and the framing and decoding of plain messages.", -1, methods,
};

/* Read the header layout from streampickle._wire into the statics above. 0, or -1 with an
 * ImportError set if it is not one this file can read (then the package runs on its Python
 * twins: _accel treats this module as not built). */
static Py_ssize_t layout_int(PyObject *wire, const char *name) {
    PyObject *value = PyObject_GetAttrString(wire, name);
    if (value == NULL) return -1;
    const Py_ssize_t n = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return n;
}

static int read_layout(void) {
    PyObject *wire = PyImport_ImportModule("streampickle._wire");
    if (wire == NULL) return -1;
    header_size = layout_int(wire, "HEADER_SIZE");
    flags_offset = layout_int(wire, "FLAGS_OFFSET");
    pickle_length_offset = layout_int(wire, "PICKLE_LENGTH_OFFSET");
    PyObject *prefix = PyErr_Occurred() ? NULL : PyObject_GetAttrString(wire, "PLAIN_PREFIX");
    Py_DECREF(wire);
    if (prefix == NULL) return -1;
    int ok = PyBytes_Check(prefix) && PyBytes_GET_SIZE(prefix) == pickle_length_offset
        && header_size - pickle_length_offset == 8 && 0 <= flags_offset && flags_offset < pickle_length_offset;
    if (ok) {
        plain_prefix = PyMem_Malloc((size_t)pickle_length_offset);
        if (plain_prefix == NULL) {
            Py_DECREF(prefix);
            PyErr_NoMemory();
            return -1;
        }
        memcpy(plain_prefix, PyBytes_AS_STRING(prefix), (size_t)pickle_length_offset);
    }
    Py_DECREF(prefix);
    if (!ok) {
        PyErr_SetString(PyExc_ImportError,
                        "streampickle._wire's header layout is not one _speedups can read "
                        "(a pickle length of 8 bytes ending the header, after PLAIN_PREFIX)");
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__speedups(void) {
    init_ops();
    if (read_layout() < 0) return NULL;
    PyObject *pickle_module = PyImport_ImportModule("_pickle");
    if (pickle_module == NULL) return NULL;
    pickle_loads = PyObject_GetAttrString(pickle_module, "loads");
    Py_DECREF(pickle_module);
    if (pickle_loads == NULL) return NULL;
    str_dump = PyUnicode_InternFromString("dump");
    str_fast = PyUnicode_InternFromString("fast");
    str_clear_memo = PyUnicode_InternFromString("clear_memo");
    if (str_dump == NULL || str_fast == NULL || str_clear_memo == NULL) return NULL;
    str_kind = PyUnicode_InternFromString("kind");
    str_itemsize = PyUnicode_InternFromString("itemsize");
    str_reshape = PyUnicode_InternFromString("reshape");
    str_C = PyUnicode_InternFromString("C");
    str_F = PyUnicode_InternFromString("F");
    str_c_contiguous = PyUnicode_InternFromString("c_contiguous");
    str_dtype = PyUnicode_InternFromString("dtype");
    kw_dtype = Py_BuildValue("(s)", "dtype");
    kw_order = Py_BuildValue("(s)", "order");
    if (str_kind == NULL || str_itemsize == NULL || str_reshape == NULL || str_C == NULL || str_F == NULL
        || str_c_contiguous == NULL || str_dtype == NULL || kw_dtype == NULL || kw_order == NULL)
        return NULL;
#ifndef _WIN32
    if (PyType_Ready(&MappingType) < 0) return NULL;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
#ifndef _WIN32
    Py_INCREF(&MappingType);
    if (PyModule_AddObject(m, "Mapping", (PyObject *)&MappingType) < 0) {
        Py_DECREF(&MappingType);
        Py_DECREF(m);
        return NULL;
    }
#endif
    /* The verifier's bounds, for the test that holds them to _verify's. */
    if (PyModule_AddIntConstant(m, "MAX_OPEN_MARKS", MAX_OPEN_MARKS) < 0
        || PyModule_AddIntConstant(m, "MAX_KEY_DEPTH", MAX_KEY_DEPTH) < 0
        || PyModule_AddIntConstant(m, "MAX_TUPLE_DEPTH", MAX_TUPLE_DEPTH) < 0
        || PyModule_AddIntConstant(m, "WORK_PER_BYTE", WORK_PER_BYTE) < 0
        || PyModule_AddIntConstant(m, "WORK_BASE", WORK_BASE) < 0
        || PyModule_AddIntConstant(m, "MAX_EQUAL_HASHES", MAX_EQUAL_HASHES) < 0
        || PyModule_AddIntConstant(m, "MAX_COMPARED", MAX_COMPARED) < 0
        || PyModule_AddIntConstant(m, "FREE_COMPARE", FREE_COMPARE) < 0
        || PyModule_AddIntConstant(m, "TEXT_HASHED_BYTES", TEXT_HASHED_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *kinds = PyDict_New();
    if (kinds == NULL || PyModule_AddObject(m, "KINDS", kinds) < 0) {
        Py_XDECREF(kinds);
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < sizeof kind_bits / sizeof kind_bits[0]; i++) {
        PyObject *bit = PyLong_FromLong(kind_bits[i].bit);
        if (bit == NULL || PyDict_SetItemString(kinds, kind_bits[i].name, bit) < 0) {
            Py_XDECREF(bit);
            Py_DECREF(m);
            return NULL;
        }
        Py_DECREF(bit);
    }
    return m;
}
