/* streampickle's speed paths in C: the pickle pre-scan of streampickle/_scan.py, the
 * framing of plain messages for dumps() and loads() (see frame() and loads_plain() below), and
 * the decoder's path for runs of plain messages (take_plain() and load_inband()).
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
 * the container kind (for the targets of APPEND, SETITEM, ADDITEMS, READONLY_BUFFER), the hash
 * class and the nesting depth and hashing cost of a would-be key. */
#define MAX_OPEN_MARKS 1024
#define MAX_KEY_DEPTH 64
#define WORK_PER_BYTE 16
#define WORK_BASE (1 << 16)
#define DEFER 1
#define COST_CAP ((uint64_t)1 << 62)

enum { V_OTHER = 0, V_BUFFER, V_LIST, V_DICT, V_SET };
enum { H_UNHASHABLE = 0, H_FREE, H_SALTED, H_COMPUTED, H_WEAK };

typedef struct { unsigned char kind, hkind; Py_ssize_t depth; uint64_t cost; } Slot;

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

/* A tuple of items[0..n): _verify._tuple_value's hash class, depth and cost. */
static Slot tuple_of(const Slot *items, Py_ssize_t n) {
    Slot t = {V_OTHER, H_COMPUTED, 0, 1};
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char h = items[i].hkind;
        if (h == H_UNHASHABLE) t.hkind = H_UNHASHABLE;
        else if (t.hkind != H_UNHASHABLE) {
            if (h == H_WEAK) t.hkind = H_WEAK;
            else if (h == H_SALTED && t.hkind != H_WEAK) t.hkind = H_SALTED;
        }
        t.cost = items[i].cost >= COST_CAP - t.cost ? COST_CAP : t.cost + items[i].cost;
        if (items[i].depth > t.depth) t.depth = items[i].depth;
    }
    t.depth += 1;
    return t;
}

/* _verify._key in plain mode: 0 the key is admitted, 1 defer, -1 refused (*result set). */
static int admit_key(const Slot *key, Py_ssize_t pos, const char *opname, int64_t *budget, PyObject **result) {
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
    return key->hkind == H_FREE || key->hkind == H_SALTED ? 0 : 1;
}

static PyObject *scan_impl(const unsigned char *data, const Py_ssize_t end, Py_ssize_t chunk_count) {
    PyObject *result = NULL;
    Slots stack, memo;
    slots_init(&stack);
    slots_init(&memo);
    Py_ssize_t *marks = NULL, marks_len = 0, marks_cap = 0;
    Py_ssize_t pos = 2, frame_end = 0, buffers = 0;
    int64_t budget = (int64_t)WORK_PER_BYTE * end + WORK_BASE;
    int stopped = 0, k;

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
            uint64_t size = spec->size;
            if (spec->prefix) {
                if (end - pos < spec->prefix) {
                    result = fail(start, "%s: length prefix cut off", spec->name);
                    goto done;
                }
                if (op == 0x8b) { /* LONG4: signed */
                    int32_t signed_size = (int32_t)(uint32_t)le(data + pos, 4);
                    if (signed_size < 0) {
                        result = fail(start, "%s: negative length %d", spec->name, (int)signed_size);
                        goto done;
                    }
                    size = (uint64_t)signed_size;
                } else {
                    size = le(data + pos, spec->prefix);
                }
                pos += spec->prefix;
            }
            if (size > (uint64_t)(end - pos)) {
                result = fail(start, "%s declares %llu bytes, only %zd are left", spec->name,
                              (unsigned long long)size, end - pos);
                goto done;
            }
            pos += (Py_ssize_t)size;
            if (stack.len - BASE < spec->pops) {
                result = fail(start, "%s needs %d items, the stack has %zd", spec->name, (int)spec->pops, stack.len - BASE);
                goto done;
            }
            Slot *top = stack.items + stack.len; /* one past the top */
            switch (op) {
            case 'N': case 0x88: case 0x89: case 'J': case 'K': case 'M': case 'G': /* NONE, bools, ints, float */
                PUSH(((Slot){V_OTHER, H_FREE, 0, 1}));
                break;
            case 0x8a: case 0x8b: /* LONG1, LONG4: plain mode judges only ints of at most 7 bytes */
                PUSH(((Slot){V_OTHER, size >= 8 ? H_COMPUTED : H_FREE, 0, 1}));
                break;
            case 'C': case 'B': case 0x8e: case 0x8c: case 'X': case 0x8d: /* bytes and str */
                PUSH(((Slot){V_OTHER, H_SALTED, 0, 1}));
                break;
            case 0x96: /* BYTEARRAY8 */
                PUSH(((Slot){V_OTHER, H_UNHASHABLE, 0, 1}));
                break;
            case ')': PUSH(tuple_of(NULL, 0)); break;
            case ']': PUSH(((Slot){V_LIST, H_UNHASHABLE, 0, 1})); break;
            case '}': PUSH(((Slot){V_DICT, H_UNHASHABLE, 0, 1})); break;
            case 0x8f: PUSH(((Slot){V_SET, H_UNHASHABLE, 0, 1})); break;
            case 0x85: case 0x86: case 0x87: { /* TUPLE1..3 */
                Slot t = tuple_of(top - spec->pops, spec->pops);
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
                k = admit_key(&top[-2], start, spec->name, &budget, &result);
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
            PUSH(memo.items[index]);
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
                Slot t = tuple_of(items, n);
                stack.len = base;
                PUSH(t);
            } else if (op == 0x91) { /* FROZENSET */
                Slot f = {V_OTHER, n ? H_SALTED : H_WEAK, 0, 1};
                for (Py_ssize_t i = 0; i < n; i++) {
                    k = admit_key(&items[i], start, spec->name, &budget, &result);
                    if (k < 0) goto done;
                    if (k > 0) DEFER_NOW;
                    if (items[i].hkind != H_SALTED) f.hkind = H_WEAK;
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
                        k = admit_key(&items[i], start, spec->name, &budget, &result);
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
    result = PyLong_FromLong(0);
done:
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

/* The first 12 bytes of a version-1 message without flags, reserved bits or side chunks. */
static const unsigned char plain_prefix[12] = {0x93, 'S', 'P', 'K', 1, 0, 0, 0, 0, 0, 0, 0};
#define HEADER_SIZE 20

/* Pickles up to this size are copied into a bytes object for pickle.loads; larger ones are
 * lent as a memoryview. A memoryview costs about 200 ns to make and free (it and its managed
 * buffer are two garbage-collected objects), which is the cost of copying some 16 KiB. */
#define COPY_LIMIT (16 * 1024)

/* loads_plain(data, trusted, allow, key, limits, max_pickle) -> the object, or NotImplemented.
 *
 * The commonest streampickle.loads() call in one C call: default options (trusted exactly
 * True or False, allow the empty tuple, key and limits None) and a bytes object holding
 * exactly one version-1 message with no tag and no side chunks, whose pickle (safe mode)
 * passes the scan and names no global. Anything else returns NotImplemented and the Python
 * path takes over (and raises its precise error): this function never refuses a message
 * itself. An error from pickle.loads propagates for the caller to wrap, as on the Python path.
 * The options are checked here rather than in Python because there they cost as much as
 * the rest of this function. */
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

static PyObject *loads_plain(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "loads_plain(data, trusted, allow, key, limits, max_pickle) takes 6 arguments");
        return NULL;
    }
    PyObject *data = args[0], *allow = args[2];
    if ((args[1] != Py_True && args[1] != Py_False) || args[3] != Py_None || args[4] != Py_None
        || !PyTuple_CheckExact(allow) || PyTuple_GET_SIZE(allow) != 0)
        Py_RETURN_NOTIMPLEMENTED;
    const int trusted = args[1] == Py_True;
    unsigned long long max_pickle = PyLong_AsUnsignedLongLong(args[5]);
    if (max_pickle == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (!PyBytes_CheckExact(data)) Py_RETURN_NOTIMPLEMENTED;
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    const Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (len <= HEADER_SIZE || memcmp(buf, plain_prefix, sizeof plain_prefix) != 0) Py_RETURN_NOTIMPLEMENTED;
    const uint64_t plen = le(buf + 12, 8);
    if (plen == 0 || plen > max_pickle || plen != (uint64_t)(len - HEADER_SIZE)) Py_RETURN_NOTIMPLEMENTED;
    const int plain = plain_pickle(buf + HEADER_SIZE, len - HEADER_SIZE, trusted);
    if (plain < 0) return NULL;
    if (!plain) Py_RETURN_NOTIMPLEMENTED;
    PyObject *pickled = plen <= COPY_LIMIT
        ? PyBytes_FromStringAndSize((const char *)buf + HEADER_SIZE, len - HEADER_SIZE)
        : PyMemoryView_FromMemory((char *)buf + HEADER_SIZE, len - HEADER_SIZE, PyBUF_READ);
    if (pickled == NULL) return NULL;
    PyObject *obj = PyObject_CallOneArg(pickle_loads, pickled);
    Py_DECREF(pickled);
    return obj; /* an unpickling error propagates: the caller wraps it, as its Python path does */
}

/* load_inband(pickled, trusted) -> the object, or NotImplemented.
 *
 * Loader.load_inband in one C call, for a message without side chunks whose pickle part is a
 * bytes object: pickle.loads(pickled) if plain_pickle() says it may, else NotImplemented, and
 * the Python path takes over (with the restricted unpickler, or to raise its precise error).
 * An error from pickle.loads propagates for the caller to wrap. */
static PyObject *load_inband(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_CheckExact(args[0]) || (args[1] != Py_True && args[1] != Py_False)) {
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
 * The decoder's whole-message fast path (Decoder._take_whole) for its commonest message in C:
 * starting at offset pos of the buffer data, for each complete version-1 message without flags,
 * reserved bits or side chunks whose pickle length is at least 1, at most max_pickle, and whose
 * total length is at most max_message, call append((pickle as bytes, no_chunks)) and move on.
 * Stop at the first message that is incomplete or anything else, and return its offset: the
 * Python loop takes it from there (and raises the precise error if it is bad), so this function
 * never refuses a message itself. The caller uses it only when the decoder has no key.
 * Same as the Python loop of _take_whole on these messages; the tests hold the two together.
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
    while (end - pos >= HEADER_SIZE && memcmp(buf + pos, plain_prefix, sizeof plain_prefix) == 0) {
        const uint64_t plen = le(buf + pos + 12, 8);
        if (plen == 0 || plen > max_pickle || max_message < HEADER_SIZE || plen > max_message - HEADER_SIZE
            || plen > (uint64_t)(end - pos - HEADER_SIZE))
            break; /* bad, over a limit, or incomplete: the Python loop decides */
        PyObject *pickled = PyBytes_FromStringAndSize((const char *)buf + pos + HEADER_SIZE, (Py_ssize_t)plen);
        if (pickled == NULL) goto error;
        PyObject *entry = PyTuple_Pack(2, pickled, no_chunks);
        Py_DECREF(pickled);
        if (entry == NULL) goto error;
        PyObject *result = PyObject_CallOneArg(append, entry);
        Py_DECREF(entry);
        if (result == NULL) goto error;
        Py_DECREF(result);
        pos += HEADER_SIZE + (Py_ssize_t)plen;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(pos);
error:
    PyBuffer_Release(&view);
    return NULL;
}

/* frame(pickled, flags) -> bytes: the header of a message without side chunks, followed by
 * the pickle, in one allocation (a MAC tag, if flags asks for one, is the caller's to append).
 * The same bytes as HEADER_STRUCT.pack(MAGIC, 1, flags, 0, 0, len(pickled)) + pickled, for
 * a third of the cost: dumps() of a small object is mostly this kind of glue. frame_bytes
 * does the work for frame() and dump_small(). */
static PyObject *frame_bytes(PyObject *pickled, long flags) {
    const Py_ssize_t n = PyBytes_GET_SIZE(pickled);
    PyObject *message = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + n);
    if (message == NULL) return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(message);
    memcpy(out, plain_prefix, sizeof plain_prefix);
    out[5] = (unsigned char)flags;
    for (int i = 0; i < 8; i++) out[12 + i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(out + HEADER_SIZE, PyBytes_AS_STRING(pickled), n);
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

static PyObject *dump_impl(PyObject *pickler, PyObject *obj) {
    const int fast = skip_memo(obj);
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
    return dump_impl(args[0], args[1]);
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
    PyObject *result = dump_impl(pickler, args[3]);
    if (result == NULL) return NULL;
    Py_DECREF(result);
    if (PyList_GET_SIZE(out) != 1 || PyList_GET_SIZE(buffers) != 0) Py_RETURN_NONE;
    PyObject *pickled = PyList_GET_ITEM(out, 0);
    if (!PyBytes_CheckExact(pickled) || PyBytes_GET_SIZE(pickled) > limit) Py_RETURN_NONE;
    PyObject *message = frame_bytes(pickled, 0);
    if (message == NULL) return NULL;
    if (PyList_SetSlice(out, 0, 1, NULL) < 0) goto error;
    result = PyObject_CallMethodNoArgs(pickler, str_clear_memo);
    if (result == NULL) goto error;
    Py_DECREF(result);
    return message;
error:
    Py_DECREF(message);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(data, chunk_count) -> 0 (plain, admitted), 1 (defer to the full verifier), or\n"
     "(position, reason) if refused: the verifier's plain mode."},
    {"loads_plain", (PyCFunction)(void (*)(void))loads_plain, METH_FASTCALL,
     "loads_plain(data, trusted, allow, key, limits, max_pickle) -> object, or NotImplemented\n"
     "to take the Python path."},
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "streampickle._speedups",
    "Speed paths in C: the pre-scan of a peer's pickle (a port of _scan.py), and the framing and decoding of plain messages.", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    init_ops();
    PyObject *pickle_module = PyImport_ImportModule("_pickle");
    if (pickle_module == NULL) return NULL;
    pickle_loads = PyObject_GetAttrString(pickle_module, "loads");
    Py_DECREF(pickle_module);
    if (pickle_loads == NULL) return NULL;
    str_dump = PyUnicode_InternFromString("dump");
    str_fast = PyUnicode_InternFromString("fast");
    str_clear_memo = PyUnicode_InternFromString("clear_memo");
    if (str_dump == NULL || str_fast == NULL || str_clear_memo == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    /* The verifier's bounds, for the test that holds them to _verify's. */
    if (PyModule_AddIntConstant(m, "MAX_OPEN_MARKS", MAX_OPEN_MARKS) < 0
        || PyModule_AddIntConstant(m, "MAX_KEY_DEPTH", MAX_KEY_DEPTH) < 0
        || PyModule_AddIntConstant(m, "WORK_PER_BYTE", WORK_PER_BYTE) < 0
        || PyModule_AddIntConstant(m, "WORK_BASE", WORK_BASE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
