"""The typed verifier: proves what every opcode of a peer's pickle acts on, before unpickling.

Why: the C unpickler is fast but does whatever the opcodes say. An allowlist of globals alone
is no proof of safety: ``BUILD`` on a dtype a reconstructor returned reached numpy's
``__setstate__``, ``SETITEM`` on an array wrote through a forged pointer, a memoized list
shared 40 levels deep made an error message walk 2**40 nodes. So this module runs the pickle
machine on *kinds* (``_kinds``) instead of objects, and refuses a pickle unless every opcode
acts on what it may act on. Only then does the C unpickler run, at full speed.

The rules (each refusal names the opcode and its byte offset):

* **Shape.** ``PROTO 5`` first and nowhere else; only opcodes ``pickle.Pickler(protocol=5)``
  writes; every length fits in the bytes left; ``FRAME``\\s lie inside the pickle, don't nest,
  and no opcode straddles a frame's end; no stack or mark underflow, at most
  ``MAX_OPEN_MARKS`` open marks; ``BINGET`` names defined memo slots; ``STOP`` ends the
  pickle with one object; ``NEXT_BUFFER`` appears exactly once per side chunk.
* **Globals.** ``STACK_GLOBAL`` takes two ``str`` literals, and the name they make must be a
  streampickle reconstructor or a name the user allowed (``ForbiddenGlobalError`` otherwise).
* **Calls.** ``REDUCE`` calls only a resolved global, with a tuple; a reconstructor gets
  exactly as many arguments as it declares, each of a declared kind (an array's data is an
  out-of-band buffer or a bytes literal, never an object). ``NEWOBJ``/``NEWOBJ_EX`` only
  instantiate a class the user allowed.
* **Reconstructors are called, never passed on.** A streampickle reconstructor (or
  ``getattr``) the pickle names is one of the loader's own objects, not a value: it may be
  called by ``REDUCE``, memoized and copied, or given to a reconstructor whose declaration
  types that argument as a global (numpy's ``_reconstruct(ndarray, ...)`` in standard
  pickles); a tuple holding one may only be such a call's arguments. Anything else that takes
  one (a container, an allowed callable or class, ``BUILD``, ``STOP``) is refused, so the
  caller never receives one.
* **Mutation.** ``SETITEM(S)`` only into a dict this pickle made, ``APPEND(S)`` only into a
  list, ``ADDITEMS`` only into a set (or into an instance of an allowed ``dict``/``list``
  subclass); ``BUILD`` only on an instance of a class the user allowed;
  ``READONLY_BUFFER`` only on an out-of-band buffer.
* **Persistent ids.** ``BINPERSID`` only when the decoder has a ``persistent_load`` (full mode
  with ``persistent=True``): its id may be any value the pickle made (a tuple's tree is
  charged to the work budget, as a key's is: the callable may hash it), and what the user's
  callable returns is opaque (no container to fill, no instance to ``BUILD``). ``PERSID``, its
  protocol-0 form, stays refused: a protocol-5 pickler never writes it. (The safe unpickler
  also checks each id before the callable sees it: one holding a reconstructor the pickle
  named without calling it is refused, at any depth; ``_safe``.)
* **Work.** Every dict key and set item is hashable, and its hash can't be steered: a
  ``str`` or ``bytes`` key's hash is salted per process (only its few twins, the str and
  bytes with the same buffer, share it); small ints, floats, ``None`` and bools can't collide
  much; for big ints and tuples the verifier computes the exact hash Python will compute,
  hashing the strings a tuple holds (their salt is the same in every tuple, so other items
  can make such tuples collide) and standing a NaN's address in with its opcode's offset,
  and refuses more than ``MAX_EQUAL_HASHES`` equal hashes in one container; keys whose hash
  it can't compute (reconstructed values, instances, frozensets, and tuples holding a string
  longer than ``TEXT_HASHED_BYTES`` or one spelled as protocol 0 writes it) are counted
  against ``Limits.max_opaque_keys``. Hashing a nested tuple costs its whole tree, so key
  trees are charged to a work budget linear in the pickle's size, as are the containers a
  reconstructor is given (a memoized dict passed to a thousand calls is charged a thousand
  times) and tuple nesting is bounded (hashing recurses in C). What a call does beyond that
  walk depends on its arguments' values (bits, bytes, descriptor nodes, colliding keys), so
  the safe unpickler charges it, call by call before each runs (``Rebuilder.cost``).

Two modes share this one walk. *Plain* mode (``resolver=None``) is the fast path's contract:
it accepts a pickle that names no global and needs no typed judgement, refuses what breaks
the shape rules (more than ``MAX_EQUAL_HASHES`` equal computed hashes in a container among
them), and returns ``DEFER`` at the first opcode that needs more (a key whose hash it can't
compute among them). ``_speedups.scan`` is its C twin (same results on every input; the
tests fuzz them against each other). *Full* mode goes on from there with every rule above.

*Standard* pickles (``verify_standard``: any protocol, 0 to 5, as ``pickle.dump`` writes
them, for :class:`streampickle.PickleDecoder`) take the full mode with the opcodes of
protocols 0-4 admitted and typed as their binary twins are: ``INT``/``LONG``/``FLOAT`` are
numbers (``I00``/``I01`` bools), the ``STRING`` family and ``UNICODE`` are ``str`` (pickle's
default ``encoding="ASCII"``), ``PUT``/``GET`` name memo slots, ``LIST``/``DICT`` are the
mark forms of the empty containers filled at once, ``DUP`` copies the top, ``GLOBAL`` resolves
through the same resolver as ``STACK_GLOBAL``, ``PERSID`` is ``BINPERSID``'s line form;
``EXT1``/``EXT2``/``EXT4``, ``INST`` and ``OBJ`` stay refused (the first name the copyreg
registry, the others instantiate by name; Python 3's pickler writes none of them for data).
``copyreg._reconstructor(cls, object, None)``, protocols 0-1's reduction of a plain class's
instance, is typed as ``NEWOBJ`` of ``cls`` is: ``cls`` must be a class the user allowed
(``ForbiddenGlobalError`` naming it otherwise), the base exactly ``object``, the state ``None``.
One narrow exception to the ``BUILD`` rule: a reconstructor declared with ``build`` (numpy's
``dtype`` and ``_reconstruct`` as pickle writes them) returns a *pending* value that no rule
accepts until exactly one ``BUILD`` with a tuple state turns it into a reconstructed value.
Until then it may be memoized or popped and nothing else: no container, tuple, call,
``BUILD`` state, persistent id or ``STOP`` takes it, no ``GET`` or ``DUP`` copies it, and a
pickle that leaves one unbuilt is refused at its ``STOP``. So neither a user's
``persistent_load`` nor an allowed callable ever sees one (the unpickler runs after this walk).
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _kinds as K
from ._errors import ForbiddenGlobalError, MalformedPickleError

if TYPE_CHECKING:
    from ._rebuild import Rebuilder

__all__ = ["DEFER", "MAX_EQUAL_HASHES", "MAX_OPEN_MARKS", "Global", "scan_py", "verify", "verify_standard"]

#: Plain mode's answer for a pickle it can't judge alone: run the full verifier.
DEFER = 1
#: Open MARKs at once. A pickler nests one mark per container level it is inside, and CPython's
#: pickler stops near 1,000 levels (its recursion limit), so no real pickle comes close.
MAX_OPEN_MARKS = 1024
#: Keys of one dict or set whose computed hashes are equal. Distinct real keys collide on all
#: 64 bits by chance about never; a pickle that needs more is a hash flood.
MAX_EQUAL_HASHES = 8
#: Tuples nested in tuples (or frozensets) inside a dict key or set item: hashing recurses in
#: C without a depth guard, so a deep enough key would overflow the C stack.
MAX_KEY_DEPTH = 64
#: Tuples nested in tuples anywhere: CPython's pickler stops near 1,000 levels (its recursion
#: limit), and hashing a tuple recurses in C without a depth guard.
MAX_TUPLE_DEPTH = 1000
#: The work budget: this many units (one unit is about one element visited) per pickle byte,
#: plus a constant. Linear work that every pickle does is not counted; what is counted is what
#: memo sharing could multiply: hashing key trees and reconstructors walking their containers.
WORK_PER_BYTE = 16
WORK_BASE = 1 << 16

_P = (1 << 61) - 1  # the modulus of Python's numeric hash
_M64 = (1 << 64) - 1
_XXPRIME_1 = 11400714785074694791
_XXPRIME_2 = 14029467366897019727
_XXPRIME_5 = 2870177450012600261


def _op(name: str) -> int:
    code: bytes = getattr(pickle, name)
    return code[0]


_NAMES = {
    code[0]: name
    for name, code in vars(pickle).items()
    if name.isupper() and type(code) is bytes and len(code) == 1
}
_FORBIDDEN = {_op(n) for n in (
    "INT", "LONG", "FLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "GLOBAL", "INST", "OBJ",
    "EXT1", "EXT2", "EXT4", "PERSID", "PUT", "BINPUT", "LONG_BINPUT", "GET", "LIST", "DICT",
    "DUP",
)}
_unpack_float = struct.Struct(">d").unpack_from


class Refused(Exception):
    """A pickle the verifier refuses: ``pos`` is the offending opcode's offset."""

    def __init__(self, pos: int, reason: str) -> None:
        super().__init__(pos, reason)
        self.pos, self.reason = pos, reason


class Global:
    """A name the pickle may resolve: what calling it makes, and how it is called."""

    __slots__ = ("module", "qualname", "name", "rebuilder", "is_class", "dict_like", "list_like", "attribute_of",
                 "buildable")

    def __init__(self, module: str, qualname: str, *, rebuilder: Rebuilder | None = None, is_class: bool = False,
                 dict_like: bool = False, list_like: bool = False, attribute_of: bool = False,
                 buildable: bool = True) -> None:
        self.module = module
        self.qualname = qualname
        self.name = f"{module}.{qualname}"
        self.rebuilder = rebuilder  # None for a user-allowed name
        self.is_class = is_class
        self.dict_like = dict_like  # an allowed dict subclass: SETITEMS may fill its instances
        self.list_like = list_like
        self.attribute_of = attribute_of  # builtins.getattr, only as getattr(allowed, "name")
        # An allowed class whose instances may take a BUILD when made by calling it or NEWOBJ:
        # one that keeps object's own pickling or has __setstate__. One that pickles itself by
        # its own __reduce__ never sets state, and a BUILD could rewrite a shared instance (an
        # enum's member, which calling the class returns) or fields its own code keeps consistent.
        self.buildable = buildable


#: A resolver: (module, qualname) -> Global; raises ForbiddenGlobalError for a name it refuses.
Resolver = Callable[[str, str, int], Global]

# Hash classes of a value used as a key: computed ints are exact Python hashes.
_SALTED = "salted"  # a NaN, a hashed str or bytes: unpredictable alone; in a tuple, hval stands in
_TEXT = "text"  # a str or bytes literal not yet hashed: salted; hashed once it is in a tuple
_UNSEEN = "unseen"  # a str or bytes the verifier doesn't hash: salted alone, opaque in a tuple
_FREE = "free"  # small ints, floats, None, bools: few distinct values share a hash
_WEAK = "weak"  # hashable, but the verifier can't compute the hash
_UNHASHABLE = None

#: The longest str or bytes (as pickled) a tuple key's hash is computed over: hashing it is
#: bounded work each time a tuple is made, however often the pickle reuses the string.
TEXT_HASHED_BYTES = 256

#: Keys whose hash the verifier can't compute may all share one, so each may be compared with
#: every one before it in its container: up to ``MAX_COMPARED`` compares are charged to the
#: work budget, each at the key's cost past ``FREE_COMPARE`` units (about 160 ns: 256 keys
#: that cheap compare in well under 10 ms however they collide).
MAX_COMPARED = 255
FREE_COMPARE = 16


class _V:
    """One abstract value: its kind and what the rules need to know about it."""

    __slots__ = ("kind", "info", "hkind", "hval", "cost", "depth", "size", "keys", "named", "shut")

    def __init__(self, kind: int, info: Any = None, hkind: str | None = _UNHASHABLE, hval: int = 0,
                 cost: int = 1, depth: int = 0) -> None:
        self.kind = kind
        self.info = info  # STR, BYTES: (start, end) in data; GLOBAL, INSTANCE: Global; TUPLE: items
        self.hkind = hkind  # a hash class above, "computed", or None (unhashable)
        self.hval = hval  # the exact hash, for "computed" and for tuple hashing of _FREE and _SALTED
        self.cost = cost  # units of work to hash it (tree size of a tuple)
        self.depth = depth  # tuple nesting
        self.size = 0  # containers: work units of what was put in (walked by a reconstructor)
        self.keys: _Keys | None = None  # dicts and sets: what the compares of their keys may cost
        self.named = False  # a reconstructor named and not called, or a tuple holding one
        self.shut = False  # an instance that takes no BUILD (see Global.buildable)


class _Keys:
    """What a container's keys may cost to compare, so far (see ``_key``)."""

    __slots__ = ("opaque", "numbers", "opaque_numbers", "number_squares", "opaque_number_squares")

    def __init__(self) -> None:
        self.opaque = 0  # keys whose hash the verifier can't compute
        self.numbers = self.opaque_numbers = 0  # keys of the _NUMBERS kinds, and the opaque ones
        self.number_squares = self.opaque_number_squares = 0  # the sum of _square() of each


#: Kinds whose compare may convert the other key to its type (an int to a Decimal or a str, a
#: Fraction's parts to a Decimal's), in time that grows as the square of its size.
_NUMBERS = K.INT | K.FLOAT | K.VALUE | K.OPAQUE


def _global_value(found: Global) -> _V:
    """A resolved global: one of the loader's own objects (``named``) unless the user allowed it."""
    value = _V(K.GLOBAL, found, _WEAK)
    value.named = found.rebuilder is not None or found.attribute_of
    return value


#: What a pickle must not do with a reconstructor it named: see the rules above.
_NAMED = ("takes a reconstructor named and not called: a pickle may only call streampickle's reconstructors "
          "(REDUCE), never pass them on as values")


def _no_named(op: int, items: list[_V], pos: int) -> None:
    for item in items:
        if item.named:
            raise Refused(pos, f"{_NAMES[op]} {_NAMED}")


_NONE = _V(K.NONE, hkind=_FREE, hval=hash(None))
_TRUE = _V(K.BOOL, hkind=_FREE, hval=1)
_FALSE = _V(K.BOOL, hkind=_FREE, hval=0)
_BUFFER = _V(K.BUFFER)


def _int_value(value: int) -> _V:
    if 0 <= value < 256:
        return _SMALL_INTS[value]
    return _V(K.INT, hkind=_FREE if -_P < value < _P else "computed", hval=hash(value))


_SMALL_INTS = [_V(K.INT, hkind=_FREE, hval=i) for i in range(256)]  # never mutated: not containers


def _float_value(number: float, pos: int) -> _V:
    """A float made at offset ``pos``. A NaN's hash is its address: unpredictable to the peer,
    as a salted hash is, but one NaN (a memo copy) hashes alike in every tuple it is put in;
    its opcode's offset stands in for that address."""
    if number != number:
        return _V(K.FLOAT, hkind=_SALTED, hval=pos)
    return _V(K.FLOAT, hkind=_FREE, hval=hash(number))


_LAZY = "lazy"  # a tuple's hash class, until it is first used as a key


def _tuple_value(items: list[_V], pos: int, op: int, data: bytes | bytearray | memoryview) -> _V:
    """A tuple of ``items``. What hashing it would cost is settled when it is first used as a
    key (most tuples are only ever arguments); its depth is bounded now: hashing and comparing
    a tuple recurse in C, so a million-deep one would crash whoever hashes it later. Its
    strings are hashed now, while the pickle is at hand (each literal once)."""
    depth = 0
    for item in items:
        if item.depth > depth:
            depth = item.depth
        if item.hkind is _TEXT:
            _hash_text(item, data)
    if depth >= MAX_TUPLE_DEPTH:
        raise Refused(pos, f"{_NAMES[op]}: a tuple nested more than {MAX_TUPLE_DEPTH} deep")
    value = _V(K.TUPLE, items, _LAZY, depth=depth + 1)
    value.size = len(items)
    value.named = any(item.named for item in items)
    return value


def _hash_text(value: _V, data: bytes | bytearray | memoryview) -> None:
    """Settle the str or bytes literal ``value``: ``_SALTED`` with Python's hash of it (a str's
    is its own buffer's, so a str and its bytes twin agree), or ``_UNSEEN`` if it is longer
    than ``TEXT_HASHED_BYTES`` or not UTF-8 (loading it fails)."""
    start, end = value.info
    if end - start > TEXT_HASHED_BYTES:
        value.hkind = _UNSEEN
        return
    raw = bytes(data[start:end])
    if value.kind == K.STR:
        try:
            value.hval = hash(str(raw, "utf-8", "surrogatepass"))  # as the unpickler decodes it
        except UnicodeDecodeError:
            value.hkind = _UNSEEN
            return
    else:
        value.hval = hash(raw)
    value.hkind = _SALTED


def _bytes_hash(result: _V, items: list[_V], data: bytes | bytearray | memoryview) -> None:
    """The hash class of the bytes ``bytes()`` or ``_codecs.encode(text, "latin1")`` makes, as
    protocols 0-2 write bytes: a bytes hashes as its buffer does, which is the latin-1 text's
    own (a text beyond latin-1 fails to load), so it is as salted as the text is."""
    if not items:
        result.hkind, result.hval = _SALTED, hash(b"")
        return
    text = items[0]
    if text.hkind is _TEXT:
        _hash_text(text, data)
    if text.hkind is _SALTED or text.hkind is _UNSEEN:
        result.hkind, result.hval = text.hkind, text.hval


def _settle(root: _V) -> None:
    """Work out the hash class, exact hash where computable, hashing cost and nesting depth of
    the tuple ``root`` and of every tuple in it not yet settled: each once, without recursion
    (a tuple may be nested a million deep)."""
    todo = [root]
    while todo:
        value = todo[-1]
        if value.hkind is not _LAZY:
            todo.pop()
            continue
        pending = [item for item in value.info if item.hkind is _LAZY]
        if pending:
            todo.extend(pending)
            continue
        todo.pop()
        _settle_one(value)


def _settle_one(value: _V) -> None:
    items: list[_V] = value.info
    hkind: str | None = "computed"
    acc = _XXPRIME_5
    cost = 1
    depth = 0
    for item in items:
        kind = item.hkind
        if kind is _UNHASHABLE:
            hkind = _UNHASHABLE
        elif (kind is _WEAK or kind is _UNSEEN) and hkind is not _UNHASHABLE:
            hkind = _WEAK
        if hkind == "computed":  # CPython's tuplehash (xxHash-based, 3.8 and later)
            acc = (acc + (item.hval & _M64) * _XXPRIME_2) & _M64
            acc = ((acc << 31) | (acc >> 33)) & _M64
            acc = (acc * _XXPRIME_1) & _M64
        cost += item.cost
        if item.depth > depth:
            depth = item.depth
    if hkind == "computed":
        acc = (acc + (len(items) ^ (_XXPRIME_5 ^ 3527539))) & _M64
        value.hval = 1546275796 if acc == _M64 else (acc - (1 << 64) if acc >= 1 << 63 else acc)
    value.hkind = hkind
    value.cost = cost if cost < 1 << 62 else 1 << 62
    value.depth = depth + 1


class _Defer(Exception):
    """Plain mode met something only the full verifier can judge."""


def scan_py(data: bytes | bytearray | memoryview, chunk_count: int) -> int | tuple[int, str]:
    """Plain mode, the twin of the C ``scan``: 0 if the pickle is accepted as it is (no global,
    nothing to judge), ``DEFER`` if it needs the full verifier, ``(position, reason)`` if its
    shape is refused."""
    try:
        return _walk(data, chunk_count, None, 0, 0)
    except _Defer:
        return DEFER
    except Refused as refused:
        return refused.pos, refused.reason


def verify(data: bytes | bytearray | memoryview, chunk_count: int, resolver: Resolver,
           max_opaque_keys: int, calls: list[int] | None = None, *, persistent: bool = False) -> int:
    """Full mode: return the number of ``STACK_GLOBAL`` and ``BINPERSID`` opcodes (0: the plain
    unpickler may load it) if every rule holds, else raise :class:`Refused` (or the resolver's
    ``ForbiddenGlobalError``). ``calls``, if given, gets the offset of each reconstructor's
    ``REDUCE``, in the order the unpickler will make the calls. ``persistent``: admit
    ``BINPERSID`` (the decoder has a ``persistent_load``)."""
    return _walk(data, chunk_count, resolver, max_opaque_keys, 1, calls, persistent)


def verify_standard(data: bytes, resolver: Resolver, max_opaque_keys: int, calls: list[int] | None = None, *,
                    persistent: bool = False) -> int:
    """Full mode for a standard pickle of any protocol (0 to 5) and no out-of-band buffers:
    the same rules, with the opcodes of protocols 0-4 typed (see the module's docstring)."""
    return _walk(data, 0, resolver, max_opaque_keys, 1, calls, persistent, standard=True)


def refusal(refused: Refused) -> MalformedPickleError:
    """The error for a refused pickle, naming the offset and the rule."""
    return MalformedPickleError(f"malformed pickle at byte {refused.pos}: {refused.reason}")


# Opcodes, as ints, for the walk.
_NONE_OP, _NEWTRUE, _NEWFALSE = _op("NONE"), _op("NEWTRUE"), _op("NEWFALSE")
_BININT, _BININT1, _BININT2, _LONG1, _LONG4 = (_op(n) for n in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4"))
_BINFLOAT = _op("BINFLOAT")
_SHORT_BINBYTES, _BINBYTES, _BINBYTES8, _BYTEARRAY8 = (
    _op(n) for n in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8")
)
_SHORT_BINUNICODE, _BINUNICODE, _BINUNICODE8 = (_op(n) for n in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"))
_EMPTY_TUPLE, _EMPTY_LIST, _EMPTY_DICT, _EMPTY_SET = (
    _op(n) for n in ("EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET")
)
_TUPLE1, _TUPLE2, _TUPLE3, _TUPLE = (_op(n) for n in ("TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"))
_APPEND, _APPENDS, _SETITEM, _SETITEMS, _ADDITEMS, _FROZENSET = (
    _op(n) for n in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "FROZENSET")
)
_STACK_GLOBAL, _REDUCE, _NEWOBJ, _NEWOBJ_EX, _BUILD = (
    _op(n) for n in ("STACK_GLOBAL", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD")
)
_MARK, _POP, _POP_MARK, _MEMOIZE, _BINGET, _LONG_BINGET = (
    _op(n) for n in ("MARK", "POP", "POP_MARK", "MEMOIZE", "BINGET", "LONG_BINGET")
)
_NEXT_BUFFER, _READONLY_BUFFER, _FRAME, _STOP, _PROTO = (
    _op(n) for n in ("NEXT_BUFFER", "READONLY_BUFFER", "FRAME", "STOP", "PROTO")
)
_BINPERSID = _op("BINPERSID")
#: What persistent_load returns: the user's object, of no kind the rules can say more of.
_PERSISTENT = _V(K.OPAQUE, None, _WEAK)

# Literal opcodes: (width of a length prefix, or 0 for a fixed size; fixed size).
_LENGTHS = {
    _BININT: (0, 4), _BININT1: (0, 1), _BININT2: (0, 2), _BINFLOAT: (0, 8), _LONG1: (1, 0), _LONG4: (4, 0),
    _SHORT_BINBYTES: (1, 0), _BINBYTES: (4, 0), _BINBYTES8: (8, 0), _BYTEARRAY8: (8, 0),
    _SHORT_BINUNICODE: (1, 0), _BINUNICODE: (4, 0), _BINUNICODE8: (8, 0),
}
_POPS = {_APPEND: 2, _SETITEM: 3, _STACK_GLOBAL: 2, _REDUCE: 2,
         _NEWOBJ: 2, _NEWOBJ_EX: 3, _BUILD: 2, _READONLY_BUFFER: 1}
_TYPED = {_STACK_GLOBAL, _REDUCE, _NEWOBJ, _NEWOBJ_EX, _BUILD}


def _walk(data: bytes | bytearray | memoryview, chunk_count: int, resolver: Resolver | None, max_opaque: int, full: int,
          calls: list[int] | None = None, persistent: bool = False, standard: bool = False) -> int:
    end = len(data)
    if standard:
        if end and data[0] == _PROTO:
            if end < 2 or data[1] > pickle.HIGHEST_PROTOCOL:
                raise Refused(0, f"PROTO {data[1] if end > 1 else '(cut off)'}: protocols 0 to "
                                 f"{pickle.HIGHEST_PROTOCOL} are known")
            pos = 2
        else:
            pos = 0  # protocols 0 and 1 start with their first opcode
    elif end < 3 or data[0] != _PROTO or data[1] != 5:
        raise Refused(0, "a pickle must start with PROTO 5 (bytes 80 05)")
    else:
        pos = 2
    frame_end = 0
    stack: list[_V] = []
    marks: list[int] = []  # the stack length at each open MARK
    memo: dict[int, _V] = {}  # slot -> value: MEMOIZE fills slot len(memo), as the unpickler does
    buffers = 0
    globals_ = 0
    budget = WORK_PER_BYTE * end + WORK_BASE
    opaque = 0
    collisions = _Collisions()  # (id of the container, computed hash) of each key
    lengths = _LENGTHS
    pops = _POPS
    live = 0  # pending values made and not yet built (standard pickles only)
    # Standard pickles only: each list this pickle built, with the items it was given, for a
    # set(list) or frozenset(list) to charge them as set items (see _hashed_items).
    listed: dict[_V, list[_V]] | None = {} if standard else None
    charged: dict[_V, _Charged] = {}  # what set(list) charged for each list's items so far
    while pos < end:
        op = data[pos]
        start = pos
        pos += 1
        if live and op in _CONSUMERS:
            _no_pending(op, stack, marks, start)
        spec = lengths.get(op)
        if spec is not None:
            prefix, size = spec
            if prefix:
                if pos + prefix > end:
                    raise Refused(start, f"{_NAMES[op]}: length prefix cut off")
                size = int.from_bytes(data[pos : pos + prefix], "little", signed=op == _LONG4)
                if size < 0:
                    raise Refused(start, f"{_NAMES[op]}: negative length {size}")
                pos += prefix
            if size > end - pos:
                raise Refused(start, f"{_NAMES[op]} declares {size} bytes, only {end - pos} are left")
            if op == _SHORT_BINUNICODE or op == _BINUNICODE or op == _BINUNICODE8:
                value = _V(K.STR, (pos, pos + size), _TEXT)
            elif op == _BINFLOAT:
                value = _float_value(_unpack_float(data, pos)[0], start)
            elif op == _BYTEARRAY8:
                value = _V(K.BYTEARRAY)
            elif op == _SHORT_BINBYTES or op == _BINBYTES or op == _BINBYTES8:
                value = _V(K.BYTES, (pos, pos + size), _TEXT)
            elif op == _LONG1 or op == _LONG4:
                value = _int_value(int.from_bytes(data[pos : pos + size], "little", signed=True))
                if size >= 8:  # hashing an int visits its digits: a key is charged them each time
                    value = _V(K.INT, hkind=value.hkind, hval=value.hval, cost=1 + size // 8)
            else:
                value = _int_value(int.from_bytes(data[pos : pos + size], "little", signed=op == _BININT))
            pos += size
            stack.append(value)
        elif op == _TUPLE1 or op == _TUPLE2 or op == _TUPLE3:  # 1 byte each: kept cheap
            n = op - _TUPLE1 + 1
            if len(stack) - (marks[-1] if marks else 0) < n:
                have = len(stack) - (marks[-1] if marks else 0)
                raise Refused(start, f"{_NAMES[op]} needs {n} items, the stack has {have}")
            items = stack[-n:]
            del stack[-n:]
            stack.append(_tuple_value(items, start, op, data))
        elif op == _NONE_OP:
            stack.append(_NONE)
        elif op == _NEWTRUE:
            stack.append(_TRUE)
        elif op == _NEWFALSE:
            stack.append(_FALSE)
        elif op == _EMPTY_TUPLE:
            stack.append(_tuple_value([], start, op, data))
        elif op == _EMPTY_LIST or op == _EMPTY_DICT or op == _EMPTY_SET:
            kind = K.LIST if op == _EMPTY_LIST else K.DICT if op == _EMPTY_DICT else K.SET
            stack.append(_V(kind, start))
            if listed is not None and kind == K.LIST:
                listed[stack[-1]] = []
        elif op == _MEMOIZE:
            if len(stack) == (marks[-1] if marks else 0):
                raise Refused(start, "MEMOIZE on an empty stack")
            memo[len(memo)] = stack[-1]
        elif op == _BINGET or op == _LONG_BINGET:
            width = 1 if op == _BINGET else 4
            if pos + width > end:
                raise Refused(start, f"{_NAMES[op]}: argument cut off")
            index = int.from_bytes(data[pos : pos + width], "little")
            pos += width
            got = memo.get(index)
            if got is None:
                raise Refused(start, f"{_NAMES[op]} {index} names a memo slot never defined")
            stack.append(got)
        elif op == _MARK:
            if len(marks) == MAX_OPEN_MARKS:
                raise Refused(start, f"more than {MAX_OPEN_MARKS} MARKs open at once")
            marks.append(len(stack))
        elif op in pops:
            n = pops[op]
            if len(stack) - (marks[-1] if marks else 0) < n:
                have = len(stack) - (marks[-1] if marks else 0)
                raise Refused(start, f"{_NAMES[op]} needs {n} items, the stack has {have}")
            if op == _APPEND:
                _into(stack[-2], K.LIST, "list_like", start, op, full)
                _no_named(op, stack[-1:], start)
                stack[-2].size += 1
                if listed is not None:
                    given = listed.get(stack[-2])
                    if given is not None:
                        given.append(stack[-1])
                del stack[-1]
            elif op == _SETITEM:
                target = stack[-3]
                _into(target, K.DICT, "dict_like", start, op, full)
                _no_named(op, stack[-2:], start)
                budget, opaque = _key(stack[-2], target, start, op, full, budget, opaque, max_opaque, collisions)
                del stack[-2:]
            elif op == _READONLY_BUFFER:
                if stack[-1].kind != K.BUFFER:
                    if not full:
                        raise _Defer
                    raise Refused(start, f"READONLY_BUFFER on a {K.name_of(stack[-1].kind)}, not an out-of-band buffer")
            else:  # STACK_GLOBAL, REDUCE, NEWOBJ, NEWOBJ_EX, BUILD
                if resolver is None:  # plain mode
                    raise _Defer
                if op == _BUILD and _is_pending(stack[-2]):
                    live -= 1
                result, budget = _typed(op, stack[-n:], start, data, resolver, budget, calls)
                if listed is not None and op == _REDUCE:
                    budget, opaque = _hashed_items(stack[-2], stack[-1], listed, charged, start, budget, opaque,
                                                   max_opaque, collisions)
                del stack[-n:]
                stack.append(result)
                if op == _STACK_GLOBAL:
                    globals_ += 1
                elif op == _REDUCE and _is_pending(result):
                    live += 1
        elif (op == _TUPLE or op == _FROZENSET or op == _APPENDS or op == _SETITEMS or op == _ADDITEMS
              or op == _POP_MARK):
            if not marks:
                raise Refused(start, f"{_NAMES[op]} without a MARK")
            base = marks.pop()
            items = stack[base:]
            del stack[base:]
            if op == _TUPLE:
                stack.append(_tuple_value(items, start, op, data))
            elif op == _FROZENSET:
                _no_named(op, items, start)
                # Its hash is not computed: equal items count once and a str and its bytes twin
                # cancel, which would take the items' values, not their hashes, to follow.
                frozen = _V(K.FROZENSET, start, _WEAK)
                for item in items:
                    budget, opaque = _key(item, frozen, start, op, full, budget, opaque, max_opaque, collisions)
                frozen.depth = 1 + max((item.depth for item in items), default=0)
                # comparing two frozensets hashes and compares their items
                frozen.cost = min(1 + sum(item.cost for item in items), 1 << 62)
                stack.append(frozen)
            elif op != _POP_MARK:
                if base - (marks[-1] if marks else 0) < 1:
                    raise Refused(start, f"{_NAMES[op]} has no container below its MARK")
                target = stack[-1]
                if op == _APPENDS:
                    _into(target, K.LIST, "list_like", start, op, full)
                    _no_named(op, items, start)
                    target.size += len(items)
                    if listed is not None:
                        given = listed.get(target)
                        if given is not None:
                            given.extend(items)
                elif op == _ADDITEMS:
                    _into(target, K.SET, None, start, op, full)
                    _no_named(op, items, start)
                    for item in items:
                        budget, opaque = _key(item, target, start, op, full, budget, opaque, max_opaque, collisions)
                else:
                    if len(items) % 2:
                        raise Refused(start, "SETITEMS with an odd number of items")
                    _into(target, K.DICT, "dict_like", start, op, full)
                    _no_named(op, items, start)
                    for item in items[::2]:
                        budget, opaque = _key(item, target, start, op, full, budget, opaque, max_opaque, collisions)
        elif op == _POP:
            if len(stack) > (marks[-1] if marks else 0):
                del stack[-1]
            elif marks:
                marks.pop()
            else:
                raise Refused(start, "POP on an empty stack")
        elif op == _NEXT_BUFFER:
            buffers += 1
            stack.append(_BUFFER)
        elif op == _FRAME:
            if start < frame_end:
                raise Refused(start, "FRAME opened inside another frame")
            if pos + 8 > end:
                raise Refused(start, "FRAME: length cut off")
            frame_end = pos + 8 + int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
            if frame_end > end:
                raise Refused(start, "FRAME extends past the end of the pickle")
            continue
        elif op == _STOP:
            if pos != end:
                raise Refused(start, f"{end - pos} bytes follow STOP inside the pickle part")
            if marks or len(stack) != 1:
                raise Refused(start, "STOP with an unbalanced stack")
            if live:
                raise Refused(start, f"{live} numpy value(s) never completed by the BUILD that gives their state")
            if stack[0].named:
                raise Refused(start, f"STOP {_NAMED}")
            break
        elif op == _PROTO:
            raise Refused(start, "PROTO may only be the first opcode")
        elif op == _BINPERSID:
            if not persistent:
                raise Refused(start, "opcode BINPERSID is not allowed: persistent ids need a decoder with "
                                     "persistent_load")
            if len(stack) == (marks[-1] if marks else 0):
                raise Refused(start, "BINPERSID needs 1 items, the stack has 0")
            pid = stack[-1]
            if pid.hkind is _LAZY:
                _settle(pid)
            if pid.cost > 1:  # persistent_load hashes or walks the id (a tuple): charged as a key's tree
                budget -= pid.cost
                if budget < 0:
                    raise Refused(start, "BINPERSID: the persistent ids would take work out of proportion to the "
                                         "pickle's size")
            stack[-1] = _PERSISTENT  # the user's persistent_load makes it from the id
            globals_ += 1
        elif standard and op in _STANDARD:
            assert listed is not None
            pos, budget, opaque = _standard_op(op, start, pos, data, end, stack, marks, memo, resolver, persistent,
                                               budget, opaque, max_opaque, collisions, listed)
            if op == _GLOBAL or op == _PERSID:
                globals_ += 1
        elif op in _FORBIDDEN:
            raise Refused(start, f"opcode {_NAMES[op]} is not allowed: a protocol-5 pickler never emits it")
        else:
            raise Refused(start, f"unknown opcode {op:#04x}")
        if start < frame_end < pos:
            raise Refused(start, f"{_NAMES[op]} straddles the end of its FRAME")
        if live and op in _COPIES and _is_pending(stack[-1]):
            raise Refused(start, f"{_NAMES[op]} of a numpy value before the BUILD that completes it: a pending "
                                 "value has one place, the stack slot its BUILD completes")
    else:
        raise Refused(end, "the pickle part ends without STOP")
    if buffers != chunk_count:
        raise Refused(end, f"the pickle takes {buffers} out-of-band buffers but the header declares "
                           f"{chunk_count} side chunks")
    if collisions:
        _check_collisions(collisions, end)
    return globals_


def _into(target: _V, kind: int, like: str | None, pos: int, op: int, full: int) -> None:
    """Check that ``op`` may put items into ``target`` (a container of ``kind``)."""
    if target.kind == kind:
        return
    if not full:
        raise _Defer
    if target.kind == K.INSTANCE and like is not None and getattr(target.info, like):
        return
    raise Refused(pos, f"{_NAMES[op]} into a {K.name_of(target.kind)}: only into a {K.name_of(kind)} this pickle made")


def _key(item: _V, container: _V, pos: int, op: int, full: int, budget: int, opaque: int,
         max_opaque: int, collisions: _Collisions) -> tuple[int, int]:
    """Charge ``item`` as a key of ``container``; return the budget and opaque count left."""
    if item.hkind is _LAZY:
        _settle(item)
    kind = item.hkind
    if kind is _UNHASHABLE:
        if not full:
            raise _Defer
        raise Refused(pos, f"{_NAMES[op]}: a {K.name_of(item.kind)} can't be a dict key or set item")
    if item.depth > MAX_KEY_DEPTH:
        raise Refused(pos, f"{_NAMES[op]}: a key nested {item.depth} deep (at most {MAX_KEY_DEPTH})")
    if item.cost > 1:  # a tuple: hashing it visits its whole tree, shared parts at each place
        budget -= item.cost
        if budget < 0:
            raise _too_much_hashing(pos, op)
    container.size += item.cost
    if full and item.kind & _NUMBERS:
        budget = _charge_conversions(item, kind is _WEAK, container, pos, op, budget)
    # A few hundred distinct floats can share a hash: theirs are counted as computed ones are.
    if kind is _SALTED or kind is _TEXT or kind is _UNSEEN or (kind is _FREE and item.kind != K.FLOAT):
        return budget, opaque
    if kind is _WEAK:
        if not full:
            raise _Defer
        opaque += 1
        if opaque > max_opaque:
            raise _too_many_opaque(pos, op, max_opaque)
        # All of them may share one hash, so each may be compared with every one before it in
        # the container, at up to its cost each time: charged past a free allowance.
        keys = container.keys = container.keys or _Keys()
        before = min(keys.opaque, MAX_COMPARED)
        keys.opaque += 1
        if before and item.cost > FREE_COMPARE:
            container.size += before * (item.cost - FREE_COMPARE)  # a copy redoes the compares
            budget -= before * (item.cost - FREE_COMPARE)
            if budget < 0:
                raise Refused(pos, f"{_NAMES[op]}: comparing keys whose hash the verifier can't check would take "
                                   "work out of proportion to the pickle's size")
    else:
        collisions.append((id(container), item.hval))
        collisions.alive.append(container)  # so that no id is reused while the walk runs
    return budget, opaque


def _square(cost: int) -> int:
    """What converting a number of ``cost`` units to another type may take, past the free part."""
    return max(0, cost * cost - FREE_COMPARE * FREE_COMPARE)


def _charge_conversions(item: _V, opaque: bool, container: _V, pos: int, op: int, budget: int) -> int:
    """Charge the number ``item`` (a key of a ``_NUMBERS`` kind; ``opaque``: its hash is not
    computed) for the compares that may convert it or another key to the other's type: an
    opaque one may share its hash with every number before it in ``container``, any number
    with every opaque one before it. A pair's compare is charged the square of the larger
    cost, at most the sum of both squares: this key's for each pair (at most
    ``MAX_COMPARED``), and each other key's once. Return the budget left."""
    keys = container.keys = container.keys or _Keys()
    own = _square(item.cost)
    if opaque:
        pairs, others = keys.numbers, keys.number_squares
    else:
        pairs, others = keys.opaque_numbers, keys.opaque_number_squares
    keys.numbers += 1
    keys.number_squares += own
    if opaque:
        keys.opaque_numbers += 1
        keys.opaque_number_squares += own
    if pairs:
        charge = min(pairs, MAX_COMPARED) * own + others
        container.size += charge  # a reconstructor copying the container redoes the compares
        budget -= charge
        if budget < 0:
            raise Refused(pos, f"{_NAMES[op]}: comparing keys that are numbers of different types would take work "
                               "out of proportion to the pickle's size")
    return budget


def _too_much_hashing(pos: int, op: int) -> Refused:
    return Refused(pos, f"{_NAMES[op]}: hashing the keys would take work out of proportion to the pickle's size")


def _too_many_opaque(pos: int, op: int, max_opaque: int) -> Refused:
    return Refused(pos, f"{_NAMES[op]}: more than Limits.max_opaque_keys={max_opaque} keys whose hash the "
                        "verifier can't check (raise the limit for peers you trust with the CPU)")


class _Collisions(list[tuple[int, int]]):
    """The (container id, hash) records, and the containers they name, kept alive."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: list[_V] = []


class _Charged:
    """What set(list) calls charged for one list's items: how many of its items were checked
    as set items (their equal hashes recorded once, under ``records``), their hashing work
    and how many were opaque, which each later call on the same items charges again."""

    __slots__ = ("count", "cost", "opaque", "records")

    def __init__(self, pos: int) -> None:
        self.count = self.cost = self.opaque = 0
        self.records = _V(K.SET, pos)


def _hashed_items(func: _V, arguments: _V, listed: dict[_V, list[_V]], charged: dict[_V, _Charged], pos: int,
                  budget: int, opaque: int, max_opaque: int, collisions: _Collisions) -> tuple[int, int]:
    """After a standard pickle's ``REDUCE`` of ``func`` on ``arguments``: if the call hashes
    the items of its list (``set(list)``, ``frozenset(list)``), charge each item the list was
    given as a set item, as ``ADDITEMS`` would. Without this, a list of one tuple shared at
    every level (two bytes a level) or of ints with equal hashes passed as a plain list and
    the call hashed it for exponential or quadratic time. Each item is checked once; a list
    passed again is charged its items' hashing and opaque count in one step (the walk of its
    items is charged by the ``REDUCE`` itself, as for any container argument)."""
    rebuilder = func.info.rebuilder if func.kind == K.GLOBAL else None
    if rebuilder is None or not rebuilder.hashes_items:
        return budget, opaque
    the_list = arguments.info[0]
    items = listed.get(the_list)
    if items is None:
        raise Refused(pos, f"REDUCE: {func.info.name} of a list this pickle did not build")
    done = charged.get(the_list)
    if done is None:
        done = charged[the_list] = _Charged(pos)
        collisions.alive.append(done.records)
    elif done.count:
        budget -= done.cost
        if budget < 0:
            raise _too_much_hashing(pos, _REDUCE)
        opaque += done.opaque
        if opaque > max_opaque:
            raise _too_many_opaque(pos, _REDUCE, max_opaque)
    for item in items[done.count :]:
        before, opaque_before = budget, opaque
        budget, opaque = _key(item, done.records, pos, _REDUCE, 1, budget, opaque, max_opaque, collisions)
        done.cost += before - budget
        done.opaque += opaque - opaque_before
    done.count = len(items)
    return budget, opaque


def _check_collisions(collisions: list[tuple[int, int]], end: int) -> None:
    collisions.sort()  # sorting, not a dict: a dict keyed by the peer's hashes would be flooded
    run = 1
    for i in range(1, len(collisions)):
        if collisions[i] == collisions[i - 1]:
            run += 1
            if run > MAX_EQUAL_HASHES:
                raise Refused(end, f"more than {MAX_EQUAL_HASHES} keys with the same hash in one container: "
                                   "a hash flood")
        else:
            run = 1


def _typed(op: int, args: list[_V], pos: int, data: bytes | bytearray | memoryview, resolver: Resolver, budget: int,
           calls: list[int] | None) -> tuple[_V, int]:
    """The result of a STACK_GLOBAL, REDUCE, NEWOBJ, NEWOBJ_EX or BUILD on ``args``, if allowed."""
    if op == _STACK_GLOBAL:
        module, name = args
        if module.kind != K.STR or name.kind != K.STR or module.info is None or name.info is None:
            raise Refused(pos, f"STACK_GLOBAL needs two str literals, not {K.name_of(module.kind)} and "
                               f"{K.name_of(name.kind)}")
        try:
            module_name = bytes(data[module.info[0] : module.info[1]]).decode("utf-8", "surrogatepass")
            qualname = bytes(data[name.info[0] : name.info[1]]).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise Refused(pos, "STACK_GLOBAL: a name that is not valid UTF-8") from None
        return _global_value(resolver(module_name, qualname, pos)), budget
    if op == _REDUCE:
        func, arguments = args
        if func.kind != K.GLOBAL:
            raise Refused(pos, f"REDUCE calls a {K.name_of(func.kind)}: only a resolved global can be called")
        if arguments.kind != K.TUPLE:
            raise Refused(pos, f"REDUCE with a {K.name_of(arguments.kind)} as arguments, not a tuple")
        target: Global = func.info
        items: list[_V] = arguments.info
        rebuilder = target.rebuilder
        if rebuilder is not None:
            declared = rebuilder.args
            if not len(declared) - rebuilder.optional <= len(items) <= len(declared):
                raise Refused(pos, f"REDUCE: {target.name} takes {len(declared)} arguments, not {len(items)}")
            for i, (item, allowed) in enumerate(zip(items, declared[: len(items)], strict=True)):
                if not item.kind & allowed:
                    raise Refused(pos, f"REDUCE: argument {i} of {target.name} must be a {K.name_of(allowed)}, "
                                       f"not a {K.name_of(item.kind)}")
                if item.named and item.kind != K.GLOBAL:  # a tuple holding one, where a tuple may go
                    raise Refused(pos, f"REDUCE {_NAMED}")
                budget -= item.size
            budget -= 1
            if budget < 0:
                raise Refused(pos, f"REDUCE: {target.name} would walk containers out of proportion to the "
                                   "pickle's size")
            if calls is not None:  # where each reconstructor call is, to name it in a later error
                calls.append(pos)
            if rebuilder.build:  # numpy's dtype and _reconstruct: a value only once BUILD gives its state
                return _V(K.OPAQUE, (_PENDING, rebuilder), _WEAK), budget
            if rebuilder.result == K.INSTANCE:  # copyreg._reconstructor(cls, object, None)
                return _reconstructed(items, pos), budget
            # Hashing what a reconstructor made can take as long as its arguments' own hashing
            # (a Fraction's hash, not cached, visits both big ints' digits each time): its cost
            # as a key is theirs, as a tuple of them.
            _settle(arguments)
            result = _V(rebuilder.result, None, _WEAK, cost=arguments.cost)
            if rebuilder.result == K.BYTES:  # protocols 0-2's bytes: bytes(), _codecs.encode(text, "latin1")
                _bytes_hash(result, items, data)
            return result, budget
        if arguments.named:  # an allowed callable or class, or getattr
            raise Refused(pos, f"REDUCE {_NAMED}")
        if target.attribute_of:
            if len(items) != 2 or items[0].kind != K.GLOBAL or items[1].kind != K.STR or items[1].info is None:
                raise Refused(pos, "REDUCE: builtins.getattr is only admitted as getattr(allowed global, 'name')")
            owner: Global = items[0].info
            try:
                attr = bytes(data[items[1].info[0] : items[1].info[1]]).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise Refused(pos, "REDUCE: getattr with a name that is not valid UTF-8") from None
            return _global_value(resolver(owner.module, f"{owner.qualname}.{attr}", pos)), budget
        return _instance(target) if target.is_class else _V(K.OPAQUE, target, _WEAK), budget
    if op == _NEWOBJ or op == _NEWOBJ_EX:
        cls, arguments = args[0], args[1]
        op_name = _NAMES[op]
        if cls.kind != K.GLOBAL or not cls.info.is_class or cls.info.rebuilder is not None:
            raise Refused(pos, f"{op_name} instantiates a {K.name_of(cls.kind)}: only a class the user allowed")
        if arguments.kind != K.TUPLE:
            raise Refused(pos, f"{op_name} with a {K.name_of(arguments.kind)} as arguments, not a tuple")
        if op == _NEWOBJ_EX and args[2].kind != K.DICT:
            raise Refused(pos, f"NEWOBJ_EX with a {K.name_of(args[2].kind)} as keyword arguments, not a dict")
        if arguments.named:
            raise Refused(pos, f"{op_name} {_NAMED}")
        return _instance(cls.info), budget
    # BUILD
    instance = args[0]
    if args[1].named:
        raise Refused(pos, f"BUILD {_NAMED}")
    pending = instance.info
    if instance.kind == K.OPAQUE and type(pending) is tuple and pending[0] is _PENDING:
        state = args[1]
        if state.kind != K.TUPLE:
            raise Refused(pos, f"BUILD of {pending[1].name} with a {K.name_of(state.kind)} as state, not a tuple")
        budget -= state.size + 1
        if budget < 0:
            raise Refused(pos, "BUILD: the states would take work out of proportion to the pickle's size")
        instance.kind = pending[1].result  # in place: memo slots holding it see it built
        instance.info = None
        return instance, budget
    if instance.kind != K.INSTANCE:
        raise Refused(pos, f"BUILD on a {K.name_of(instance.kind)}: only on an instance of a class the user allowed")
    if instance.shut:
        raise Refused(pos, f"BUILD on an instance of {instance.info.name}, which pickles itself without a state "
                           "(its own __reduce__, no __setstate__): a BUILD could rewrite a shared instance, such as "
                           "an enum's member, or fields its own code keeps consistent")
    return instance, budget


def _instance(cls: Global) -> _V:
    """An instance made by calling or NEWOBJ of the allowed class ``cls``."""
    value = _V(K.INSTANCE, cls, _WEAK)
    value.shut = not cls.buildable
    return value


def _reconstructed(items: list[_V], pos: int) -> _V:
    """``copyreg._reconstructor(cls, object, None)`` of a standard pickle: an instance of
    ``cls``, which must be a class the user allowed (a ``BUILD`` may then give its state, as
    for ``NEWOBJ``), with ``object`` as its base."""
    cls: Global = items[0].info
    base: Global = items[1].info
    if not cls.is_class or cls.rebuilder is not None or cls.attribute_of:
        raise ForbiddenGlobalError(cls.module, cls.qualname, position=pos, opcode="REDUCE")
    if base.rebuilder is None or base.rebuilder.name != "object_class":
        raise Refused(pos, f"REDUCE: copyreg._reconstructor of {cls.name} with base {base.name}: only object "
                           "is admitted as the base")
    return _V(K.INSTANCE, cls, _WEAK)


# -- pending values: inert until their BUILD ---------------------------------------------------


def _is_pending(value: _V) -> bool:
    return value.kind == K.OPAQUE and type(value.info) is tuple


def _no_pending(op: int, stack: list[_V], marks: list[int], pos: int) -> None:
    """Refuse ``op`` if it would take a pending value anywhere but into its ``BUILD``: into a
    container or tuple, as a call's argument, as a BUILD's state, as a persistent id (the
    user's ``persistent_load`` would see it), or as the pickle's result. Checked only while a
    pending value is alive, so a pickle without one pays nothing."""
    if op in _POPS:
        items = stack[-_POPS[op]:]
        if op == _BUILD:
            items = items[1:]  # the target: what BUILD completes
    elif op == _TUPLE1 or op == _TUPLE2 or op == _TUPLE3:
        items = stack[-(op - _TUPLE1 + 1):]
    elif op == _BINPERSID or op == _STOP:
        items = stack[-1:]
    else:  # the mark forms: what lies above the last MARK
        items = stack[marks[-1]:] if marks else []
    for item in items:
        if _is_pending(item):
            raise Refused(pos, f"{_NAMES[op]} takes a numpy value before the BUILD that completes it")


# -- protocols 0-4: the opcodes a standard pickle adds ------------------------------------------

_INT, _LONG, _FLOAT, _STRING, _BINSTRING, _SHORT_BINSTRING, _UNICODE = (
    _op(n) for n in ("INT", "LONG", "FLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE")
)
_PUT, _BINPUT, _LONG_BINPUT, _GET, _LIST, _DICT, _DUP, _GLOBAL, _PERSID = (
    _op(n) for n in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "LIST", "DICT", "DUP", "GLOBAL", "PERSID")
)
_STANDARD = frozenset({_INT, _LONG, _FLOAT, _STRING, _BINSTRING, _SHORT_BINSTRING, _UNICODE, _PUT, _BINPUT,
                       _LONG_BINPUT, _GET, _LIST, _DICT, _DUP, _GLOBAL, _PERSID})
#: Opcodes that take items off the stack while a pending value may be among them.
_CONSUMERS = frozenset({_APPEND, _SETITEM, _STACK_GLOBAL, _REDUCE, _NEWOBJ, _NEWOBJ_EX, _BUILD, _READONLY_BUFFER,
                        _TUPLE1, _TUPLE2, _TUPLE3, _TUPLE, _FROZENSET, _APPENDS, _SETITEMS, _ADDITEMS, _LIST, _DICT,
                        _BINPERSID, _STOP})
#: Opcodes that put a second reference to a value on the stack.
_COPIES = frozenset({_GET, _BINGET, _LONG_BINGET, _DUP})
#: Marks a pending value's ``info``: (``_PENDING``, the reconstructor whose BUILD completes it).
_PENDING = object()
#: Digits of an INT or LONG line: CPython refuses to parse more (``sys.int_info``), and parsing
#: decimal digits costs time quadratic in their number.
MAX_DECIMAL_DIGITS = 4300


def _line(data: bytes, pos: int, end: int, start: int, op: int) -> tuple[bytes, int]:
    """The line argument at ``pos`` (without its newline), and the offset after the newline."""
    nl = data.find(b"\n", pos, end)
    if nl < 0:
        raise Refused(start, f"{_NAMES[op]}: its line has no newline before the pickle ends")
    return data[pos:nl], nl + 1


def _decimal(line: bytes, start: int, op: int) -> int:
    """The int of an ``INT`` or ``LONG`` line, written as pickle writes one (``%d``). A leading
    zero is refused: the C unpickler reads ``I010`` as octal 8 (``strtol`` base 0), pickle's
    Python one refuses it, and read here as decimal 10 it would not be the value loaded."""
    text = line[:-1] if op == _LONG and line.endswith(b"L") else line
    digits = text[1:] if text[:1] == b"-" else text
    # bytes.isdigit: ASCII digits only
    if len(digits) <= MAX_DECIMAL_DIGITS and digits.isdigit() and (digits[:1] != b"0" or text == b"0"):
        return int(text)
    raise Refused(start, f"{_NAMES[op]}: not a decimal integer as pickle writes one (at most "
                         f"{MAX_DECIMAL_DIGITS} digits, no leading zero)")


def _standard_op(op: int, start: int, pos: int, data: bytes | bytearray | memoryview, end: int, stack: list[_V],
                 marks: list[int], memo: dict[int, _V], resolver: Resolver | None, persistent: bool, budget: int,
                 opaque: int, max_opaque: int, collisions: _Collisions,
                 listed: dict[_V, list[_V]]) -> tuple[int, int, int]:
    """One opcode of protocols 0-4 (``_STANDARD``): apply it to the stack; return the offset
    after it, and the work budget and opaque-key count left."""
    assert isinstance(data, bytes)  # verify_standard's callers pass bytes: lines are searched
    base = marks[-1] if marks else 0
    if op == _INT or op == _LONG:
        line, pos = _line(data, pos, end, start, op)
        if op == _INT and line in (b"00", b"01"):
            stack.append(_TRUE if line == b"01" else _FALSE)
        else:
            value = _int_value(_decimal(line, start, op))
            if len(line) > 18:  # hashing an int visits its digits, as for LONG1
                value = _V(K.INT, hkind=value.hkind, hval=value.hval, cost=1 + len(line) // 18)
            stack.append(value)
    elif op == _FLOAT:
        line, pos = _line(data, pos, end, start, op)
        try:
            number = float(line)
        except ValueError:
            raise Refused(start, "FLOAT: not a decimal number") from None
        stack.append(_float_value(number, start))
    elif op == _UNICODE:  # what Python 3 writes for a str in protocols 0 and 1
        line, pos = _line(data, pos, end, start, op)
        text = _V(K.STR, None, _UNSEEN)  # info None: not a name STACK_GLOBAL may read
        if len(line) <= TEXT_HASHED_BYTES:
            try:
                text = _V(K.STR, None, _SALTED, hval=hash(str(line, "raw-unicode-escape")))  # as load_unicode
            except UnicodeDecodeError:
                pass  # loading it fails
        stack.append(text)
    elif op == _STRING:  # Python 2's str: escaped, then decoded as the loader's encoding says
        pos = _line(data, pos, end, start, op)[1]
        stack.append(_V(K.STR, None, _UNSEEN))
    elif op == _BINSTRING or op == _SHORT_BINSTRING:
        width = 4 if op == _BINSTRING else 1
        if pos + width > end:
            raise Refused(start, f"{_NAMES[op]}: length prefix cut off")
        size = int.from_bytes(data[pos : pos + width], "little", signed=True) if width == 4 else data[pos]
        pos += width
        if size < 0 or size > end - pos:
            raise Refused(start, f"{_NAMES[op]} declares {size} bytes, only {end - pos} are left")
        pos += size
        stack.append(_V(K.STR, None, _UNSEEN))
    elif op == _PUT or op == _BINPUT or op == _LONG_BINPUT:
        if op == _PUT:
            line, pos = _line(data, pos, end, start, op)
            index = _decimal(line, start, op)
        else:
            width = 1 if op == _BINPUT else 4
            if pos + width > end:
                raise Refused(start, f"{_NAMES[op]}: argument cut off")
            index = int.from_bytes(data[pos : pos + width], "little")
            pos += width
        if len(stack) == base:
            raise Refused(start, f"{_NAMES[op]} on an empty stack")
        if index < 0:
            raise Refused(start, f"{_NAMES[op]}: a negative memo slot")
        if index > len(memo):
            # pickle's pickler numbers its memo slots densely, from 0; the C unpickler's memo is
            # an array, which a sparse slot (2**28 in a 9-byte pickle) would grow to gigabytes.
            raise Refused(start, f"{_NAMES[op]}: memo slot {index} skips slots never defined "
                                 f"(the next one is {len(memo)})")
        memo[index] = stack[-1]
    elif op == _GET:
        line, pos = _line(data, pos, end, start, op)
        got = memo.get(_decimal(line, start, op))
        if got is None:
            raise Refused(start, "GET names a memo slot never defined")
        stack.append(got)
    elif op == _DUP:
        if len(stack) == base:
            raise Refused(start, "DUP on an empty stack")
        stack.append(stack[-1])
    elif op == _LIST or op == _DICT:
        if not marks:
            raise Refused(start, f"{_NAMES[op]} without a MARK")
        items = stack[marks.pop():]
        del stack[len(stack) - len(items):]
        _no_named(op, items, start)
        if op == _LIST:
            made = _V(K.LIST, start)
            made.size = len(items)
            listed[made] = items
        else:
            if len(items) % 2:
                raise Refused(start, "DICT with an odd number of items")
            made = _V(K.DICT, start)
            for item in items[::2]:
                budget, opaque = _key(item, made, start, op, 1, budget, opaque, max_opaque, collisions)
        stack.append(made)
    elif op == _GLOBAL:
        assert resolver is not None
        module_line, pos = _line(data, pos, end, start, op)
        name_line, pos = _line(data, pos, end, start, op)
        try:
            module, qualname = module_line.decode("utf-8"), name_line.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(start, "GLOBAL: a name that is not valid UTF-8") from None
        try:
            resolved = resolver(module, qualname, start)
        except ForbiddenGlobalError as exc:  # the resolver names STACK_GLOBAL: say which opcode it was
            raise ForbiddenGlobalError(exc.module, exc.name, position=start, opcode="GLOBAL") from None
        stack.append(_global_value(resolved))
    else:  # PERSID
        pos = _line(data, pos, end, start, op)[1]
        if not persistent:
            raise Refused(start, "opcode PERSID is not allowed: persistent ids need a decoder with persistent_load")
        stack.append(_PERSISTENT)
    return pos, budget, opaque
