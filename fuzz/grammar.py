"""A grammar-aware generator of protocol-5 pickles, framed as streampickle messages.

Why: the attacks that got past safe loaders before were sequences, not bytes: a reconstructor
call and then ``BUILD``/``SETITEM``/``APPEND`` on its result, one object memoized and fetched at
several places (up to exponential sharing), structures that contain themselves, dict keys whose
hashes all collide, ``FRAME``\\s that end inside an opcode. A byte-mutation fuzzer almost never
assembles those; this generator composes them from the opcodes a protocol-5 pickler uses,
tracking the stack and the memo as it goes, so most of what it makes is well formed and gets
past the pre-scan to the parts of the loader that matter.

It calls the reconstructors the safe loader admits (read from ``streampickle._rebuild.NAMES``
and ``streampickle._safe.DEFAULT_ALLOWED`` at run time, so new ones are picked up), usually
with arguments of the kinds each declares (``Rebuilder.args``) and sometimes not, plus
forbidden globals and lookalikes of allowed ones. A second mode takes real messages from
``streampickle.dumps`` and mutates them at opcode boundaries.

Every choice goes through a :class:`Source`: ``random.Random`` for the in-process engine and
the tests, or atheris's ``FuzzedDataProvider``, so that libFuzzer's coverage feedback steers
the choices. An exhausted provider answers the lowest option to every choice, and the lowest
option always ends a structure, so generation stops however few bytes there are.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import functools
import pickle
import random
import struct
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

import streampickle
from streampickle._kinds import (
    ANY,
    BOOL,
    BUFFER,
    BYTEARRAY,
    BYTES,
    DICT,
    FLOAT,
    FROZENSET,
    GLOBAL,
    INSTANCE,
    INT,
    LIST,
    NONE,
    OPAQUE,
    SET,
    STR,
    TUPLE,
    TZINFO,
    VALUE,
)

from . import wire

__all__ = ["Case", "Source", "generate_case", "generate_pickle", "mutate_message", "real_message", "seeds", "source"]


class Case(NamedTuple):
    """One input: a byte stream (one or more messages, or junk) and where a Decoder target
    cuts it into pieces (empty: fed whole)."""

    data: bytes
    cuts: tuple[int, ...] = ()


# -- where choices come from ---------------------------------------------------------------


class Source:
    """The generator's only source of choices. ``int`` is inclusive; the low end of every
    range is the option that ends a structure soonest."""

    def int(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def chance(self, p: float) -> bool:
        raise NotImplementedError

    def bytes(self, n: int) -> bytes:
        raise NotImplementedError

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.int(0, len(options) - 1)]

    def weighted(self, options: Sequence[tuple[int, Any]]) -> Any:
        """One of ``(weight, option)``; an exhausted source takes the first."""
        r = self.int(0, sum(w for w, _ in options) - 1)
        for weight, option in options:
            if r < weight:
                return option
            r -= weight
        raise AssertionError("unreachable")


class RandomSource(Source):
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def chance(self, p: float) -> bool:
        return self._rng.random() < p

    def bytes(self, n: int) -> bytes:
        return self._rng.randbytes(n)


class ProviderSource(Source):
    """Choices from atheris's ``FuzzedDataProvider``: libFuzzer mutates the choices."""

    def __init__(self, provider: Any) -> None:
        self._fdp = provider

    def int(self, lo: int, hi: int) -> int:
        return self._fdp.ConsumeIntInRange(lo, hi) if hi > lo else lo

    def chance(self, p: float) -> bool:
        # an exhausted provider gives 0, which must mean "no"
        return self._fdp.ConsumeIntInRange(0, 255) >= 256 * (1 - p)

    def bytes(self, n: int) -> bytes:
        got = self._fdp.ConsumeBytes(n)
        return got + bytes(n - len(got))


def source(obj: Any) -> Source:
    """A :class:`Source` from a ``Source``, a ``random.Random``, an int seed or a provider."""
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, random.Random):
        return RandomSource(obj)
    if isinstance(obj, int):
        return RandomSource(random.Random(obj))
    return ProviderSource(obj)


# -- opcodes and the values they carry -------------------------------------------------------

PROTO5 = pickle.PROTO + b"\x05"
_M61 = (1 << 61) - 1  # CPython hashes ints modulo this prime: its multiples all hash to 0
_INTS = (
    0, 1, -1, 2, 3, 4, 8, 16, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**31, 2**32, 2**40,
    2**62, 2**63 - 1, 2**63, -2**63, 2**64, 2**128 - 1, 2**128, _M61, -_M61, 2 * _M61, 10**30,
    2**1000, -2,
)
_FLOATS = (0.0, -0.0, 1.0, 0.5, float("nan"), float("inf"), -float("inf"), 1e308, 5e-324, 2.0**61, 2.0**122, 3.0)
_DESCRS = (
    "<f8", ">i4", "|b1", "|u1", "<i2", "<u8", "<c16", "<f2", ">f4", "<M8[ns]", "<m8[s]", ">M8[D]",
    "<M8[2s]", "<M8[\u03bcs]", "<M8[]", "<m8[as]", "|S3", "|S1", "<U5", "<U1", "|V16", "|V8", "|V1",
    "|O", "O", "<f0", "|V0", "<U0", "|S0", "f8", "<U99999999", "|V2147483647", "<S4294967296",
    "|V9999999999", "<i16", "<f8 ", "<F8", "|b2",
)
_WORDS = (
    "", "a", "x", "ab", "shape", "int", "__setstate__", "__dict__", "__class__", "__reduce__",
    "__init__", "_func", "_name", "args", "result", "flags", "real", "numerator", "\u00e9",
    "\u03bc", "\U0001f600", "a" * 40,
)
_BAD_UTF8 = (b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b")
_LENGTHS = (0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 24, 32, 48, 64, 100, 255, 256, 1000)

# Globals no peer may name (code execution, system access), and names next to allowed ones.
FORBIDDEN = (
    "os.system", "posix.system", "nt.system", "subprocess.Popen", "subprocess.check_output",
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.__import__", "builtins.getattr",
    "builtins.setattr", "builtins.open", "builtins.bytearray", "builtins.type", "builtins.list",
    "builtins.dict", "builtins.set", "builtins.memoryview", "builtins.object.__subclasses__",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
    "numpy.dtype", "numpy.empty", "numpy.frombuffer", "numpy.f2py.diagnose.run_command",
    "importlib.import_module", "pkgutil.resolve_name", "marshal.loads", "pickle.loads",
    "runpy._run_code", "operator.attrgetter", "operator.methodcaller", "functools.partial",
    "types.FunctionType", "types.CodeType", "ctypes.CDLL", "io.FileIO", "copyreg._reconstructor",
    "copyreg.__newobj__", "collections.Counter", "uuid.UUID", "fractions.Fraction",
    "collections.OrderedDict.__init__.__globals__", "streampickle._rebuild._ndarray",
    "streampickle._rebuild.Rebuilder", "streampickle._rebuild.NAMES", "streampickle._rebuild.np",
    "streampickle._rebuild.ndarray._func", "streampickle._rebuild.dtype_of", "streampickle._safe.Loader",
    "streampickle.loads",
)

# Arguments of the allowed globals that are not reconstructors (they declare none).
_OTHER_ARGS: dict[str, tuple[int, ...]] = {
    "builtins.complex": (FLOAT | INT, FLOAT | INT),
    "builtins.slice": (INT | NONE, INT | NONE, INT | NONE),
    "builtins.range": (INT, INT, INT),
    "datetime.date": (BYTES,),
    "datetime.time": (BYTES, TZINFO | NONE),
    "datetime.datetime": (BYTES, TZINFO | NONE),
    "datetime.timedelta": (INT, INT, INT),
    "datetime.timezone": (VALUE, STR),
    "decimal.Decimal": (STR,),
    "collections.OrderedDict": (),
    "collections.deque": (LIST, INT | NONE),
}


@functools.cache
def _globals() -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
    """(declared argument kinds of each reconstructor, the other allowed names), read from the
    library now rather than written down here, so that new reconstructors are fuzzed too."""
    from streampickle import _rebuild, _safe

    rebuilders = {name: tuple(getattr(r, "args", ())) for name, r in _rebuild.NAMES.items()}
    others = tuple(sorted(set(getattr(_safe, "DEFAULT_ALLOWED", ())) - set(rebuilders)))
    return rebuilders, others


def _lookalike(src: Source, name: str) -> tuple[str, str]:
    """A (module, name) pair close to an allowed ``name``."""
    module, _, attr = name.rpartition(".")
    edits: list[Callable[[], tuple[str, str]]] = [
        lambda: (module + " ", attr),
        lambda: (module, attr + "\x00"),
        lambda: (module.replace("o", "\u043e", 1), attr),
        lambda: (module, attr.upper()),
        lambda: (module, attr + ".__call__"),
        lambda: (module, attr + ".__reduce__"),
        lambda: (module, "_" + attr),
        lambda: (module.split(".")[0], name[len(module.split(".")[0]) + 1 :]),  # another split of the same dotted name
        lambda: (module + "." + attr, "__init__"),
        lambda: ("", name),
    ]
    return src.pick(edits)()


# -- one pickle -----------------------------------------------------------------------------

_MAX_DEPTH = 8
_SCALAR_KINDS = (NONE, BOOL, INT, FLOAT, STR, BYTES)
_KIND_WEIGHTS = {
    NONE: 2, BOOL: 2, INT: 8, FLOAT: 3, STR: 8, BYTES: 4, BYTEARRAY: 1, BUFFER: 3, TUPLE: 5,
    LIST: 6, DICT: 5, SET: 2, FROZENSET: 2, GLOBAL: 2, VALUE: 10, TZINFO: 1, INSTANCE: 1, OPAQUE: 1,
}


class _Builder:
    """Writes the opcodes of one pickle, knowing the kind of every memo slot it made."""

    def __init__(self, src: Source) -> None:
        self.src = src
        self.ops: list[bytes] = []
        self.memo: list[int] = []
        self.chunks: list[bytes] = []
        self.left = src.pick((6, 24, 80, 300))  # values to make before only scalars are made

    # values ---------------------------------------------------------------------------------

    def value(self, mask: int = ANY, depth: int = 0) -> int:
        """Push one value of a kind in ``mask`` (usually); return the kind made."""
        src = self.src
        self.left -= 1
        if self.memo and src.chance(0.12):
            return self.get(mask)
        kinds = [k for k in _KIND_WEIGHTS if k & mask] or [NONE]
        if self.left <= 0 or depth >= _MAX_DEPTH:
            kinds = [k for k in kinds if k in _SCALAR_KINDS] or [NONE]
        kind = src.weighted([(_KIND_WEIGHTS[k], k) for k in kinds])
        made = self._MAKERS[kind](self, depth)
        if src.chance(0.1):
            self.memoize(made)
        return made

    def op(self, *ops: bytes) -> None:
        self.ops.extend(ops)

    def memoize(self, kind: int) -> int:
        self.op(pickle.MEMOIZE)
        self.memo.append(kind)
        return len(self.memo) - 1

    def get(self, mask: int = ANY, index: int | None = None) -> int:
        src = self.src
        if index is None:
            fits = [i for i, k in enumerate(self.memo) if k & mask] or range(len(self.memo))
            index = src.pick(fits)
            if src.chance(0.02):
                index = len(self.memo) + src.pick((0, 1, 255, 2**32 - 1))  # a slot never made
        if index < 256 and not src.chance(0.1):
            self.op(pickle.BINGET + bytes([index]))
        else:
            self.op(pickle.LONG_BINGET + struct.pack("<I", index & 0xFFFFFFFF))
        return self.memo[index] if index < len(self.memo) else ANY

    def make_none(self, depth: int) -> int:
        self.op(pickle.NONE)
        return NONE

    def make_bool(self, depth: int) -> int:
        self.op(pickle.NEWTRUE if self.src.chance(0.5) else pickle.NEWFALSE)
        return BOOL

    def make_int(self, depth: int, n: int | None = None) -> int:
        src = self.src
        if n is None:
            n = src.weighted([
                (5, lambda: src.int(0, 8)),
                (4, lambda: src.pick(_INTS)),
                (1, lambda: src.int(1, 1 << 16) * _M61),
                (1, lambda: int.from_bytes(src.bytes(src.int(1, 40)), "little", signed=True)),
            ])()
        self.op(_int_op(n, src.int(0, 9)))
        return INT

    def make_float(self, depth: int) -> int:
        src = self.src
        x = src.pick(_FLOATS) if src.chance(0.7) else struct.unpack(">d", src.bytes(8))[0]
        self.op(pickle.BINFLOAT + struct.pack(">d", x))
        return FLOAT

    def make_str(self, depth: int, text: str | None = None) -> int:
        src = self.src
        if text is None:
            text = src.weighted([
                (4, lambda: src.pick(_DESCRS)),
                (3, lambda: src.pick(_WORDS)),
                (2, lambda: src.pick(FORBIDDEN + tuple(_globals()[0]))),
                (1, lambda: src.bytes(src.pick(_LENGTHS)).decode("latin-1")),
                (1, lambda: "\ud800" + src.pick(_WORDS)),
            ])()
        raw = text.encode("utf-8", "surrogatepass")
        if src.chance(0.03):
            raw = src.pick(_BAD_UTF8)
        self.op(_sized(raw, (pickle.SHORT_BINUNICODE, pickle.BINUNICODE, pickle.BINUNICODE8), src.int(0, 9)))
        return STR

    def make_bytes(self, depth: int) -> int:
        src = self.src
        raw = src.bytes(src.pick(_LENGTHS))
        self.op(_sized(raw, (pickle.SHORT_BINBYTES, pickle.BINBYTES, pickle.BINBYTES8), src.int(0, 9)))
        return BYTES

    def make_bytearray(self, depth: int) -> int:
        raw = self.src.bytes(self.src.pick(_LENGTHS))
        self.op(pickle.BYTEARRAY8 + struct.pack("<Q", len(raw)) + raw)
        return BYTEARRAY

    def make_buffer(self, depth: int) -> int:
        src = self.src
        n = src.pick(_LENGTHS)
        self.chunks.append(bytes(n) if src.chance(0.5) else src.bytes(n))
        self.op(pickle.NEXT_BUFFER)
        if src.chance(0.3):
            self.op(pickle.READONLY_BUFFER)
        return BUFFER

    # containers -----------------------------------------------------------------------------

    def items(self, n: int, mask: int, depth: int) -> None:
        for _ in range(n):
            self.value(mask, depth + 1)

    def count(self) -> int:
        return self.src.weighted([(3, 0), (6, 1), (5, 2), (4, 3), (2, 5), (1, 12), (1, 40)])

    def make_tuple(self, depth: int, masks: Sequence[int] | None = None) -> int:
        src = self.src
        if masks is None:
            if src.chance(0.05):
                return self.bomb(depth)
            masks = [ANY] * self.count()
        if not masks and src.chance(0.8):
            self.op(pickle.EMPTY_TUPLE)
        elif len(masks) <= 3 and src.chance(0.7):
            for m in masks:
                self.value(m, depth + 1)
            self.op((pickle.EMPTY_TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(masks)])
        else:
            self.op(pickle.MARK)
            for m in masks:
                self.value(m, depth + 1)
            self.op(pickle.TUPLE)
        return TUPLE

    def make_list(self, depth: int) -> int:
        src = self.src
        shape = src.weighted([(6, "any"), (2, "shape"), (2, "fields"), (1, "self")])
        self.op(pickle.EMPTY_LIST)
        slot = self.memoize(LIST) if shape == "self" or src.chance(0.2) else None
        if shape == "shape":
            for _ in range(src.pick((0, 1, 2, 3, 1, 2, 33, 65))):
                self.make_int(depth, src.pick((0, 1, 2, 3, 4, 5, 7, 8, 16, 2**31, 2**40, -1)))
                self.op(pickle.APPEND)
        elif shape == "fields":
            self.fields(depth)
        else:
            self.fill(pickle.APPEND, pickle.APPENDS, 1, depth)
            if shape == "self" and slot is not None:
                self.get(index=slot)
                self.op(pickle.APPEND)
        return LIST

    def fields(self, depth: int) -> None:
        """Items of a structured dtype descriptor: [name, descr, shape] and ["", padding]."""
        src = self.src
        self.op(pickle.MARK)
        for _ in range(src.pick((1, 2, 3, 1, 0, 5))):
            self.op(pickle.EMPTY_LIST, pickle.MARK)
            if src.chance(0.2):
                self.make_str(depth, "")
                self.make_int(depth, src.pick((1, 3, 8, 0, -1, 2**40)))
            else:
                self.make_str(depth, src.pick(("a", "b", "c", "a", "")))
                if src.chance(0.2) and depth < _MAX_DEPTH:
                    self.make_list(depth + 1)
                else:
                    self.make_str(depth, src.pick(_DESCRS))
                self.op(pickle.EMPTY_LIST)
                for _ in range(src.pick((0, 0, 1, 2))):
                    self.make_int(depth, src.pick((1, 2, 3, 0)))
                    self.op(pickle.APPEND)
            self.op(pickle.APPENDS)
        self.op(pickle.APPENDS)

    def fill(self, one: bytes, many: bytes, per_item: int, depth: int, keys: int = ANY) -> None:
        """Add items to the container on top: one opcode per item or a batch under MARK."""
        src = self.src
        n = self.count()
        batched = src.chance(0.6)
        if batched:
            self.op(pickle.MARK)
        for _ in range(n):
            if per_item == 2:
                self.value(keys, depth + 1)
            self.value(ANY, depth + 1)
            if not batched:
                self.op(one)
        if batched:
            self.op(many)

    def make_dict(self, depth: int) -> int:
        src = self.src
        if src.chance(0.04):
            return self.flood(depth)
        self.op(pickle.EMPTY_DICT)
        slot = self.memoize(DICT) if src.chance(0.2) else None
        keys = src.weighted([(6, INT | STR | BYTES | NONE | BOOL | FLOAT), (2, TUPLE | FROZENSET), (1, ANY)])
        self.fill(pickle.SETITEM, pickle.SETITEMS, 2, depth, keys)
        if slot is not None and src.chance(0.3):  # a dict that contains itself
            self.make_str(depth, "self")
            self.get(index=slot)
            self.op(pickle.SETITEM)
        return DICT

    def make_set(self, depth: int) -> int:
        self.op(pickle.EMPTY_SET)
        if self.src.chance(0.2):
            self.memoize(SET)
        self.op(pickle.MARK)
        self.items(self.count(), INT | STR | BYTES | TUPLE | FROZENSET | NONE | FLOAT, depth)
        self.op(pickle.ADDITEMS)
        return SET

    def make_frozenset(self, depth: int) -> int:
        self.op(pickle.MARK)
        self.items(self.count(), INT | STR | BYTES | TUPLE | FROZENSET | NONE, depth)
        self.op(pickle.FROZENSET)
        return FROZENSET

    def bomb(self, depth: int, rounds: int = 0) -> int:
        """Exponential sharing: each level holds the previous one twice, via the memo."""
        src = self.src
        self.value(NONE | INT | STR | TUPLE, _MAX_DEPTH)
        slot = self.memoize(TUPLE)
        self.op(pickle.POP)
        style = src.pick(("tuple", "list", "dict"))
        rounds = rounds or (src.int(1, 12) if not src.chance(0.1) else src.int(13, 24))
        kind = {"tuple": TUPLE, "list": LIST, "dict": DICT}[style]
        for _ in range(rounds):
            if style == "tuple":
                self.get(index=slot)
                self.get(index=slot)
                self.op(pickle.TUPLE2)
            elif style == "list":
                self.op(pickle.EMPTY_LIST, pickle.MARK)
                self.get(index=slot)
                self.get(index=slot)
                self.op(pickle.APPENDS)
            else:
                self.op(pickle.EMPTY_DICT, pickle.MARK)
                self.make_str(depth, "a")
                self.get(index=slot)
                self.make_str(depth, "b")
                self.get(index=slot)
                self.op(pickle.SETITEMS)
            slot = self.memoize(kind)
            self.op(pickle.POP)
        self.get(index=slot)
        return kind

    def flood(self, depth: int, n: int = 0) -> int:
        """A dict, set or frozenset whose keys all have one hash (CPython's ints modulo 2**61-1)."""
        src = self.src
        key = src.pick(("int", "tuple", "frozenset", "float", "minus") if not n else ("int", "tuple", "frozenset"))
        n = n or src.pick((2, 16, 200, 2000))
        container = src.pick(("dict", "set", "frozenset"))
        kind = {"dict": DICT, "set": SET, "frozenset": FROZENSET}[container]
        if container == "dict":
            self.op(pickle.EMPTY_DICT)
        elif container == "set":
            self.op(pickle.EMPTY_SET)
        self.op(pickle.MARK)
        for k in range(n):
            if key == "float":
                self.op(pickle.BINFLOAT + struct.pack(">d", float(k % 7 + 1) * 2.0 ** (61 * (k % 16))))
            elif key == "minus":
                self.op(_int_op(-1 - k % 2, 0))
            else:
                if key == "frozenset":
                    self.op(pickle.MARK)
                self.op(_int_op(k * _M61, 0))
                if key == "tuple":
                    self.op(pickle.TUPLE1)
                elif key == "frozenset":
                    self.op(pickle.FROZENSET)
            if container == "dict":
                self.op(pickle.NONE)
            if container != "frozenset" and k % 1000 == 999:  # batches, as the pickler writes
                self.op(pickle.SETITEMS if container == "dict" else pickle.ADDITEMS, pickle.MARK)
        self.op({"dict": pickle.SETITEMS, "set": pickle.ADDITEMS, "frozenset": pickle.FROZENSET}[container])
        return kind

    # globals and calls ----------------------------------------------------------------------

    def pick_global(self) -> tuple[str, str, tuple[int, ...] | None]:
        """(module, name, declared argument kinds or None) of a global to name."""
        src = self.src
        rebuilders, others = _globals()
        which = src.weighted([(10, "rebuilder"), (4, "allowed"), (4, "forbidden"), (2, "lookalike")])
        if which == "rebuilder" or (which == "allowed" and not others):
            name = src.pick(sorted(rebuilders))
            module, _, attr = name.rpartition(".")
            return module, attr, rebuilders[name]
        if which == "allowed":
            name = src.pick(others)
            module, _, attr = name.rpartition(".")
            return module, attr, _OTHER_ARGS.get(name)
        if which == "forbidden":
            module, _, attr = src.pick(FORBIDDEN).rpartition(".")
            return module, attr, None
        module, attr = _lookalike(src, src.pick(sorted(rebuilders) + list(others)))
        return module, attr, None

    def name_part(self, text: str) -> None:
        """Push one operand of STACK_GLOBAL: usually the str, sometimes via the memo, sometimes
        not a str at all."""
        src = self.src
        r = src.int(0, 19)
        if r == 0:
            self.value(BYTES | INT | NONE, _MAX_DEPTH)
            return
        self.make_str(0, text)
        if r <= 3:  # fetched back from the memo, as the pickler does for repeated names
            slot = self.memoize(STR)
            self.op(pickle.POP)
            self.get(index=slot)

    def make_global(self, depth: int) -> int:
        module, attr, _ = self.pick_global()
        self.name_part(module)
        self.name_part(attr)
        self.op(pickle.STACK_GLOBAL)
        if self.src.chance(0.3):
            self.after(depth)
        return GLOBAL

    def make_call(self, depth: int) -> int:
        """A call of a global: REDUCE (or NEWOBJ/NEWOBJ_EX) with an argument tuple that usually
        matches what the callee declares, then maybe opcodes aimed at the result."""
        src = self.src
        module, attr, declared = self.pick_global()
        self.name_part(module)
        self.name_part(attr)
        self.op(pickle.STACK_GLOBAL)
        if src.chance(0.15):
            self.memoize(GLOBAL)
        if declared is not None and src.chance(0.75):
            masks = list(declared)
        else:
            masks = list(declared or ()) or [ANY] * self.count()
            edit = src.int(0, 3)
            if edit == 0 and masks:
                masks[src.int(0, len(masks) - 1)] = ANY  # one argument of any kind
            elif edit == 1:
                masks.append(ANY)  # one too many
            elif edit == 2 and masks:
                masks.pop()  # one too few
            else:
                masks = [ANY] * self.count()
        how = src.weighted([(20, "reduce"), (1, "list"), (1, "memo"), (1, "newobj"), (1, "newobj_ex")])
        if how == "list":  # REDUCE with a list where the tuple goes
            self.op(pickle.EMPTY_LIST, pickle.MARK)
            for m in masks:
                self.value(m, depth + 1)
            self.op(pickle.APPENDS, pickle.REDUCE)
        elif how == "memo" and any(k & TUPLE for k in self.memo):
            self.get(TUPLE)
            self.op(pickle.REDUCE)
        else:
            self.make_tuple(depth, masks)
            if how == "newobj_ex":
                self.value(DICT, depth + 1)
                self.op(pickle.NEWOBJ_EX)
            else:
                self.op(pickle.NEWOBJ if how == "newobj" else pickle.REDUCE)
        if src.chance(0.35):
            self.after(depth)
        return VALUE

    def after(self, depth: int) -> None:
        """Opcodes applied to the value on top: BUILD, SETITEM(S), APPEND(S), ADDITEMS."""
        src = self.src
        what = src.pick(("build", "setitem", "setitems", "append", "appends", "additems", "readonly"))
        if what == "build":
            state = src.pick(("dict", "slots", "any", "none"))
            if state == "dict":
                self.make_dict(depth + 1)
            elif state == "slots":  # (instance dict, slot values)
                self.value(DICT | NONE, depth + 1)
                self.value(DICT, depth + 1)
                self.op(pickle.TUPLE2)
            elif state == "none":
                self.op(pickle.NONE)
            else:
                self.value(ANY, depth + 1)
            self.op(pickle.BUILD)
        elif what == "setitem":
            self.value(ANY, depth + 1)
            self.value(ANY, depth + 1)
            self.op(pickle.SETITEM)
        elif what == "append":
            self.value(ANY, depth + 1)
            self.op(pickle.APPEND)
        elif what == "readonly":
            self.op(pickle.READONLY_BUFFER)
        else:
            self.op(pickle.MARK)
            for _ in range(self.count()):
                if what == "setitems":
                    self.value(ANY, depth + 1)
                self.value(ANY, depth + 1)
            self.op({"setitems": pickle.SETITEMS, "appends": pickle.APPENDS, "additems": pickle.ADDITEMS}[what])

    def make_tzinfo(self, depth: int) -> int:
        """A call of datetime.timezone, if the loader allows it, else any allowed call."""
        self.make_call(depth)
        return TZINFO

    _MAKERS: ClassVar[dict[int, Callable[[_Builder, int], int]]] = {
        NONE: make_none, BOOL: make_bool, INT: make_int, FLOAT: make_float, STR: make_str,
        BYTES: make_bytes, BYTEARRAY: make_bytearray, BUFFER: make_buffer, TUPLE: make_tuple,
        LIST: make_list, DICT: make_dict, SET: make_set, FROZENSET: make_frozenset,
        GLOBAL: make_global, VALUE: make_call, TZINFO: make_tzinfo, INSTANCE: make_call, OPAQUE: make_call,
    }


def _int_op(n: int, style: int) -> bytes:
    """``n`` as the opcode a pickler would use (style > 0), or as LONG1/LONG4 (style 0 is
    canonical too; 8 and 9 pick the long forms)."""
    if style < 8:
        if 0 <= n < 256:
            return pickle.BININT1 + bytes([n])
        if 0 <= n < 65536:
            return pickle.BININT2 + struct.pack("<H", n)
        if -(2**31) <= n < 2**31:
            return pickle.BININT + struct.pack("<i", n)
    raw = pickle.encode_long(n)
    if len(raw) < 256 and style != 9:
        return pickle.LONG1 + bytes([len(raw)]) + raw
    return pickle.LONG4 + struct.pack("<i", len(raw)) + raw


def _sized(raw: bytes, opcodes: tuple[bytes, bytes, bytes], style: int) -> bytes:
    """``raw`` behind the shortest length prefix that fits it, or sometimes a wider one."""
    if len(raw) < 256 and style < 7:
        return opcodes[0] + bytes([len(raw)]) + raw
    if len(raw) < 2**32 and style < 9:
        return opcodes[1] + struct.pack("<I", len(raw)) + raw
    return opcodes[2] + struct.pack("<Q", len(raw)) + raw


# Opcodes the pre-scan refuses: text forms, PUT, EXT, INST/OBJ, persistent ids, a second PROTO.
_ILLEGAL = (
    b"cos\nsystem\n", b"ios\nsystem\n", b"o", b"\x82\x01", b"\x83\x01\x00", b"Q", b"P0\n",
    pickle.BINPUT + b"\x00", pickle.LONG_BINPUT + b"\xff\xff\xff\xff", b"I1\n", b"L1L\n", b"S'a'\n",
    b"Vx\n", b"2", b"g0\n", b"p0\n", b"d", b"l", b"\xff", PROTO5, pickle.PROTO + b"\x06", b"F1.5\n",
    b"T\x01\x00\x00\x00a", b"U\x01a",
)


def _big(b: _Builder) -> None:
    """One value that costs the loader a lot if it is not refused: a hash flood big enough to
    take seconds, sharing 25-40 levels deep handed to a reconstructor, nesting 100,000 deep,
    a million tiny containers, a long string."""
    src = b.src
    what = src.pick(("flood", "bomb", "nest", "amplify", "string"))
    if what == "flood":
        b.flood(0, src.pick((30_000, 45_000, 60_000)))
    elif what == "bomb":
        module, attr, declared = b.pick_global()
        b.name_part(module)
        b.name_part(attr)
        b.op(pickle.STACK_GLOBAL, pickle.MARK)
        masks = list(declared or (ANY,))
        bomb_at = src.int(0, len(masks) - 1)
        for i, mask in enumerate(masks):
            if i == bomb_at:
                b.bomb(1, src.int(25, 40))
            else:
                b.value(mask, 1)
        b.op(pickle.TUPLE, pickle.REDUCE)
    elif what == "nest":
        n = src.pick((10_000, 100_000, 300_000))
        b.op(*[pickle.EMPTY_LIST] * n, *[pickle.APPEND] * (n - 1))
    elif what == "amplify":
        empty = src.pick((pickle.EMPTY_SET, pickle.EMPTY_DICT, pickle.EMPTY_LIST))
        b.op(pickle.MARK, *[empty] * src.pick((100_000, 1_000_000)), pickle.TUPLE)
    else:
        b.make_str(0, "y" * src.pick((70_000, 1 << 20, 8 << 20)))


# Opcodes to drop in anywhere: each acts on whatever happens to be on the stack.
_STRAY = (
    pickle.BUILD, pickle.APPEND, pickle.SETITEM, pickle.REDUCE, pickle.POP, pickle.MARK, pickle.TUPLE,
    pickle.ADDITEMS, pickle.READONLY_BUFFER,
)


def generate_pickle(src: Source, big: bool = False) -> tuple[bytes, list[bytes]]:
    """One pickle (framed in some way) and the side chunks its NEXT_BUFFERs take. ``big``
    makes one expensive value instead (see ``_big``): seconds of work if it isn't refused."""
    b = _Builder(src)
    for _ in range(src.weighted([(6, 0), (2, 1), (1, 3)])):  # values made, memoized and dropped
        b.value(ANY)
        b.memoize(ANY)
        b.op(pickle.POP)
    if big:  # otherwise well formed, so that nothing but the big value can be refused
        _big(b)
        return PROTO5 + b"".join(b.ops) + pickle.STOP, b.chunks
    b.value(ANY)
    ops = [PROTO5, *b.ops, pickle.STOP]
    if src.chance(0.03):
        ops.insert(src.int(0, len(ops)), src.pick(_ILLEGAL))
    if src.chance(0.02):
        del ops[src.int(0, len(ops) - 1)]
    return frame(src, ops), b.chunks


# -- frames and messages ---------------------------------------------------------------------


def frame(src: Source, ops: Sequence[bytes]) -> bytes:
    """Join opcodes, laying FRAMEs over them: none, well formed, or wrong in one of the ways
    a FRAME can be wrong (straddling an opcode, past the end, nested, cut off)."""
    style = src.weighted(
        [
            (4, "none"),
            (4, "one"),
            (3, "several"),
            (2, "straddle"),
            (1, "past"),
            (1, "nested"),
            (1, "cut"),
        ]
    )
    if style == "none" or len(ops) < 2:
        return b"".join(ops)
    head, body = ops[0], list(ops[1:])
    if style == "cut":
        return head + pickle.FRAME + b"\x05\x00\x00" + b"".join(body)
    if style == "one":
        inner = b"".join(body)
        return head + pickle.FRAME + struct.pack("<Q", len(inner)) + inner
    # frames over runs of whole opcodes, with opcodes between them
    out = [head]
    i = 0
    while i < len(body):
        j = src.int(i + 1, len(body))
        run = b"".join(body[i:j])
        if src.chance(0.7):
            length = len(run)
            if style == "straddle" and src.chance(0.5):
                length = max(0, length + src.pick((-1, 1, -2, 2, -8, 3)))
            elif style == "past" and src.chance(0.5):
                length = src.pick((length + 1, length + 100, 2**63, 2**64 - 1))
            out.append(pickle.FRAME + struct.pack("<Q", length))
            if style == "nested" and src.chance(0.5) and j - i > 1:
                k = src.int(i + 1, j - 1)
                inner = b"".join(body[k:j])
                run = b"".join(body[i:k]) + pickle.FRAME + struct.pack("<Q", len(inner)) + inner
        out.append(run)
        i = j
    return b"".join(out)


def wrap(src: Source, pickle_bytes: bytes, chunks: Sequence[bytes]) -> bytes:
    """A message around a pickle: right, or with one header field or length wrong."""
    lies = ("count", "plen", "length", "flags", "version", "magic", "huge")
    lie = src.weighted([(30, "none"), *((1, name) for name in lies)])
    if lie == "none":
        return wire.pack_message(pickle_bytes, chunks)
    if lie == "count":
        return wire.pack_message(pickle_bytes, chunks, count=len(chunks) + src.pick((1, -1, 2**32 - 1)) & 0xFFFFFFFF)
    if lie == "plen":
        return wire.pack_message(
            pickle_bytes, chunks, pickle_length=max(0, len(pickle_bytes) + src.pick((1, -1, -2, 8)))
        )
    if lie == "length" and chunks:
        lengths = [len(c) for c in chunks]
        lengths[src.int(0, len(lengths) - 1)] += src.pick((1, -1))
        return wire.pack_message(pickle_bytes, chunks, lengths=[max(0, n) for n in lengths])
    if lie == "flags":
        return wire.pack_message(pickle_bytes, chunks, flags=src.pick((1, 2, 3, 4, 5, 8, 0x80)))
    if lie == "version":
        return wire.pack_message(pickle_bytes, chunks, version=src.pick((0, 2, 255)))
    if lie == "magic":
        return wire.pack_message(pickle_bytes, chunks, magic=src.pick((b"\x93SPL", b"\x80\x05\x95\x00", b"GET ")))
    return wire.pack_message(pickle_bytes, chunks, lengths=[2**63] * max(1, len(chunks)), count=max(1, len(chunks)))


# -- real objects, and mutations of their messages -------------------------------------------

_REAL_DTYPES = (
    "<f8", "<f4", ">i4", "<i2", "|u1", "|b1", "<c16", "<M8[ns]", "<m8[s]", "|S3", "<U4", "|V8",
    [("a", "<i4"), ("b", "<f8", (2,))], [("x", "|u1"), ("y", "<U2")],
)


def real_object(src: Source, depth: int = 0) -> Any:
    """An object the encoder sends by the safe path (or, sometimes, one it does not)."""
    leaf = depth >= 3 or src.chance(0.4)
    kind = src.int(0, 9 if leaf else 14)
    if kind == 0:
        return src.pick((
            None, True, False, 0, -1, 2**70, 1.5, float("nan"), 1 + 2j, "h\u00e9", b"\x00\xff", bytearray(b"ba"),
            Ellipsis,
        ))
    if kind == 1:
        return _real_array(src)
    if kind == 2:
        return src.pick((
            np.float32(7), np.int8(-3), np.uint64(2**64 - 1), np.complex128(1j), np.bool_(True), np.datetime64(1, "ns"),
        ))
    if kind == 3:
        return np.dtype(src.pick(_REAL_DTYPES))
    if kind == 4:
        return uuid.UUID(int=src.int(0, 2**128 - 1))
    if kind == 5:
        return fractions.Fraction(src.int(-100, 100), src.int(1, 100))
    if kind == 6:
        return collections.Counter(src.pick(("hello", "", "ab")))
    if kind == 7:
        return src.pick((
            datetime.datetime(2026, 11, 27, 15, 0, tzinfo=datetime.UTC), datetime.date(2000, 1, 1),
            datetime.timedelta(seconds=3), datetime.time(1, 2), decimal.Decimal("1.25"), range(3, 9, 2),
            slice(1, None, 2),
        ))
    if kind == 8:
        return np.array([1, "two", None, [3]], dtype=object)
    if kind == 9:
        return src.bytes(src.pick(_LENGTHS)).decode("latin-1")
    n = src.int(0, 4)
    items = [real_object(src, depth + 1) for _ in range(n)]
    if kind == 10:
        return items
    if kind == 11:
        return tuple(items)
    if kind == 12:
        return {f"k{i}": v for i, v in enumerate(items)}
    if kind == 13:  # one object at two places, and a list that contains itself
        shared = [items]
        out: list[Any] = [shared, shared]
        if src.chance(0.5):
            out.append(out)
        return out
    if src.chance(0.5):
        return collections.OrderedDict((str(i), v) for i, v in enumerate(items))
    return collections.deque(items, maxlen=5)


def _real_array(src: Source) -> np.ndarray[Any, Any]:
    dt = np.dtype(src.pick(_REAL_DTYPES))
    shape = src.pick(((), (0,), (1,), (3,), (2, 3), (0, 3), (4, 1, 2)))
    arr = np.frombuffer(src.bytes(int(np.prod(shape)) * dt.itemsize), dtype=dt).reshape(shape).copy()
    style = src.int(0, 3)
    if style == 1 and arr.ndim >= 2:
        arr = np.asfortranarray(arr)
    elif style == 2:
        arr.flags.writeable = False
    elif style == 3 and arr.ndim == 1:
        arr = arr[::2]
    return arr


def real_message(src: Source) -> bytes:
    """``streampickle.dumps`` of a random real object."""
    try:
        return streampickle.dumps(real_object(src))
    except streampickle.StreamPickleError:
        return streampickle.dumps(None)


def mutate_message(src: Source, data: bytes) -> bytes:
    """A real message mutated at opcode boundaries: opcodes dropped, repeated, moved, new
    values or memo references inserted, names and ints replaced, the FRAMEs redone."""
    messages, _ = wire.parse_stream(data, 1)
    if not messages:
        return data
    msg = messages[0]
    ops = wire.strip_frames(wire.tokenize(msg.pickle))
    chunks = list(msg.chunks)
    for _ in range(src.weighted([(4, 1), (3, 2), (2, 3), (1, 6)])):
        ops = _mutate_ops(src, ops, chunks)
    return wrap(src, frame(src, ops), chunks)


def _mutate_ops(src: Source, ops: list[bytes], chunks: list[bytes]) -> list[bytes]:
    ops = list(ops)
    n = len(ops)
    i = src.int(1, max(1, n - 1))  # keep PROTO first, usually
    what = src.int(0, 9)
    if what == 0 and n > 2:
        del ops[i : i + src.pick((1, 1, 2, 4))]
    elif what == 1:
        ops[i:i] = ops[i : i + src.pick((1, 2, 5))]
    elif what == 2 and n > 3:
        j = src.int(1, n - 1)
        ops[i], ops[j] = ops[j], ops[i]
    elif what in (3, 4):  # a new value (with the opcodes it takes), then maybe something aimed at it
        b = _Builder(src)
        b.memo = [ANY] * sum(op == pickle.MEMOIZE for op in ops[:i])
        if what == 3:
            b.value(ANY)
        else:
            b.make_call(0)
        if src.chance(0.3):
            b.after(0)
        if src.chance(0.5):
            b.op(pickle.POP)
        ops[i:i] = b.ops
        chunks.extend(b.chunks)
    elif what == 5:
        memo = sum(op == pickle.MEMOIZE for op in ops[:i])
        if not memo or src.chance(0.3):
            ops.insert(i, pickle.MEMOIZE)
        else:
            ops.insert(i, pickle.BINGET + bytes([src.int(0, min(memo, 256) - 1)]))
    elif what == 6:  # a different name where the pickle names a global
        strs = [k for k, op in enumerate(ops) if op[:1] == pickle.SHORT_BINUNICODE]
        if strs:
            k = src.pick(strs)
            text = src.pick(FORBIDDEN + tuple(_globals()[0]) + _DESCRS).rpartition(".")[src.pick((0, 2))]
            raw = text.encode("utf-8", "surrogatepass")[:255]
            ops[k] = pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
    elif what == 7:  # another int: a shape entry, an item count, a padding
        ints = [k for k, op in enumerate(ops) if op[:1] in (pickle.BININT1, pickle.BININT2, pickle.BININT)]
        if ints:
            ops[src.pick(ints)] = _int_op(src.pick(_INTS), src.int(0, 9))
    elif what == 8:  # one side chunk more or less, or a different size
        if chunks and src.chance(0.5):
            k = src.int(0, len(chunks) - 1)
            chunks[k] = (
                chunks[k][: src.int(0, len(chunks[k]))]
                if src.chance(0.5)
                else chunks[k] + bytes(src.pick((1, 8)))
            )
        elif src.chance(0.5):
            ops.insert(i, pickle.NEXT_BUFFER)
            chunks.append(bytes(src.pick(_LENGTHS)))
        else:
            ops = [op for op in ops if op != pickle.READONLY_BUFFER]
    else:
        ops.insert(i, src.pick(_ILLEGAL) if src.chance(0.3) else src.pick(_STRAY))
    return ops


# -- cases ----------------------------------------------------------------------------------


def generate_message(src: Source, big: bool = False) -> bytes:
    if big:
        return wire.pack_message(*generate_pickle(src, big))
    kind = src.weighted([(6, "grammar"), (4, "mutated"), (1, "real")])
    if kind == "grammar":
        return wrap(src, *generate_pickle(src))
    real = real_message(src)
    return real if kind == "real" else mutate_message(src, real)


def choose_cuts(src: Source, data: bytes) -> tuple[int, ...]:
    """Where a Decoder target cuts ``data``: nowhere, at random, near the parts' boundaries, or
    (for small inputs) at every byte."""
    n = len(data)
    style = src.weighted([(3, "none"), (4, "random"), (3, "boundaries"), (1, "every")])
    if n < 2 or style == "none":
        return ()
    if style == "every" and n <= 4096:
        return tuple(range(1, n))
    if style == "boundaries":
        marks = {1, 4, 5, 12, wire.HEADER_SIZE - 1, wire.HEADER_SIZE, wire.HEADER_SIZE + 1}
        for m in wire.parse_stream(data)[0]:
            table = m.start + wire.HEADER_SIZE + 8 * m.count
            marks.update((m.start, m.start + wire.HEADER_SIZE, table, table + 2, table + m.pickle_length, m.end))
            at = table + m.pickle_length
            for length in m.lengths[:64]:
                at += length
                marks.update((at - 1, at, at + 1))
        points = sorted(p + src.pick((0, 0, -1, 1)) for p in marks)
        return tuple(sorted({p for p in points if 0 < p < n and src.chance(0.7)}))
    return tuple(sorted({src.int(1, n - 1) for _ in range(src.pick((1, 2, 3, 8, 16)))}))


def generate_case(src: Any, big: bool = False) -> Case:
    """One input for the targets: a stream of one message (mostly), several, or a message
    and the start of another, with the cuts a Decoder target feeds it at."""
    src = source(src)
    data = generate_message(src, big)
    extra = src.weighted([(12, "none"), (2, "more"), (1, "partial")]) if not big else "none"
    if extra == "more":
        for _ in range(src.int(1, 2)):
            data += generate_message(src, False)
    elif extra == "partial":
        tail = generate_message(src, False)
        data += tail[: src.int(0, len(tail) - 1)]
    return Case(data, choose_cuts(src, data))


def seeds(count: int = 48, seed: int = 0) -> list[bytes]:
    """Seed inputs for coverage-guided fuzzing: real messages, mutated ones and grammar ones."""
    src = RandomSource(random.Random(seed))
    out = [streampickle.dumps(obj) for obj in (None, {"x": np.arange(3, dtype="<i2")}, [1.5, "a", b"b"])]
    while len(out) < count:
        out.append(generate_message(src))
    return out
