"""Pre-scan of a peer's pickle: one pass over the opcodes before the C unpickler sees them.

Why: the C unpickler is fast but trusts its input in ways that hurt on a socket. A
``LONG_BINPUT 0x3fffffff`` makes it grow its memo to 8 GiB and touch every page; bytes after
``STOP`` are silently ignored; extra out-of-band buffers are silently ignored; an opcode may
straddle a ``FRAME`` end (gh-154848); stack underflows surface as bare ``IndexError`` in the
pure-Python unpickler. Rather than chase each of those inside the unpickler, the safe loader
first walks the opcode stream here and refuses anything a protocol-5 ``Pickler`` would never
produce. Only then does the C unpickler run, at full speed, on input known to be well formed.

What is checked (each maps to an item of BAD-INPUTS.md, section D):

* ``PROTO 5`` first and nowhere else; the pickle ends with the ``STOP`` that ends it (nothing
  after it, not two pickles);
* only opcodes that ``pickle.Pickler(protocol=5)`` emits (no text opcodes, no ``INST``/``OBJ``,
  no ``EXT*``, no ``PERSID``, no ``PUT``: protocol 4+ memoizes with ``MEMOIZE``);
* every length prefix fits in the bytes that are left (so no claim is ever allocated);
* ``FRAME``\\s lie inside the pickle, are not nested, and no opcode straddles a frame's end;
* the stack and the marks never underflow, and ``STOP`` leaves exactly one object;
* ``BINGET`` only names memo slots that exist;
* ``NEXT_BUFFER`` appears exactly as often as the header declared side chunks.

It does not judge *which* globals are named; that is ``find_class``'s job at unpickling time,
where memo tricks can't hide the final ``(module, name)`` pair.
"""

from __future__ import annotations

import pickle


__all__ = ["scan", "scan_py", "scan_c"]

# For each allowed opcode: (fixed argument bytes, width of a length prefix, items popped,
# items pushed). Opcodes whose stack effect depends on marks or state are handled inline.
_FIXED: dict[int, tuple[int, int, int, int]] = {}


def _op(name: str) -> int:
    return getattr(pickle, name)[0]


for _name, _spec in {
    "NONE": (0, 0, 0, 1),
    "NEWTRUE": (0, 0, 0, 1),
    "NEWFALSE": (0, 0, 0, 1),
    "BININT": (4, 0, 0, 1),
    "BININT1": (1, 0, 0, 1),
    "BININT2": (2, 0, 0, 1),
    "LONG1": (0, 1, 0, 1),
    "LONG4": (0, 4, 0, 1),
    "BINFLOAT": (8, 0, 0, 1),
    "SHORT_BINBYTES": (0, 1, 0, 1),
    "BINBYTES": (0, 4, 0, 1),
    "BINBYTES8": (0, 8, 0, 1),
    "BYTEARRAY8": (0, 8, 0, 1),
    "SHORT_BINUNICODE": (0, 1, 0, 1),
    "BINUNICODE": (0, 4, 0, 1),
    "BINUNICODE8": (0, 8, 0, 1),
    "EMPTY_TUPLE": (0, 0, 0, 1),
    "EMPTY_LIST": (0, 0, 0, 1),
    "EMPTY_DICT": (0, 0, 0, 1),
    "EMPTY_SET": (0, 0, 0, 1),
    "TUPLE1": (0, 0, 1, 1),
    "TUPLE2": (0, 0, 2, 1),
    "TUPLE3": (0, 0, 3, 1),
    "APPEND": (0, 0, 2, 1),
    "SETITEM": (0, 0, 3, 1),
    "STACK_GLOBAL": (0, 0, 2, 1),
    "REDUCE": (0, 0, 2, 1),
    "NEWOBJ": (0, 0, 2, 1),
    "NEWOBJ_EX": (0, 0, 3, 1),
    "BUILD": (0, 0, 2, 1),
    "READONLY_BUFFER": (0, 0, 1, 1),
}.items():
    _FIXED[_op(_name)] = _spec

_PROTO = _op("PROTO")
_STACK_GLOBAL = _op("STACK_GLOBAL")
_LONG4 = _op("LONG4")  # its length prefix is signed
_STOP = _op("STOP")
_FRAME = _op("FRAME")
_MARK = _op("MARK")
_POP = _op("POP")
_POP_MARK = _op("POP_MARK")
_TUPLE = _op("TUPLE")
_FROZENSET = _op("FROZENSET")
_APPENDS = _op("APPENDS")
_SETITEMS = _op("SETITEMS")
_ADDITEMS = _op("ADDITEMS")
_MEMOIZE = _op("MEMOIZE")
_BINGET = _op("BINGET")
_LONG_BINGET = _op("LONG_BINGET")
_NEXT_BUFFER = _op("NEXT_BUFFER")
_TO_MARK_PUSH = {_TUPLE, _FROZENSET}  # pop to mark, push one
_TO_MARK_INTO = {_APPENDS, _SETITEMS, _ADDITEMS}  # pop to mark into the item below it
_NAMES = {code[0]: name for name, code in vars(pickle).items() if name.isupper() and type(code) is bytes and len(code) == 1}


class _Refused(Exception):
    def __init__(self, pos: int, reason: str) -> None:
        self.pos, self.reason = pos, reason


def _fail(pos: int, what: str) -> _Refused:
    return _Refused(pos, what)


def scan_py(data: bytes | bytearray | memoryview, chunk_count: int) -> int | tuple[int, str]:
    """The reference scan: the number of ``STACK_GLOBAL`` opcodes if the pickle is acceptable
    (0 means no global can be looked up at all), else ``(position, reason)``."""
    try:
        return _scan(data, chunk_count)
    except _Refused as refused:
        return refused.pos, refused.reason


def _scan(data: bytes | bytearray | memoryview, chunk_count: int) -> int:
    end = len(data)
    if end < 3 or data[0] != _PROTO or data[1] != 5:
        raise _fail(0, "a pickle must start with PROTO 5 (bytes 80 05)")
    pos = 2
    frame_end = 0  # end of the current FRAME, or 0 outside frames
    depth = 0  # items on the stack above the innermost mark
    marks: list[int] = []  # the depth saved by each open MARK
    memo = 0  # memo slots defined so far
    buffers = 0
    globals_ = 0
    fixed = _FIXED
    while pos < end:
        op = data[pos]
        start = pos
        pos += 1
        spec = fixed.get(op)
        if spec is not None:
            size, prefix, pops, pushes = spec
            if prefix:
                if pos + prefix > end:
                    raise _fail(start, f"{_NAMES[op]}: length prefix cut off")
                size = int.from_bytes(data[pos : pos + prefix], "little", signed=op == _LONG4)
                if size < 0:
                    raise _fail(start, f"{_NAMES[op]}: negative length {size}")
                pos += prefix
            pos += size
            if pos > end:
                raise _fail(start, f"{_NAMES[op]} declares {size} bytes, only {end - pos + size} are left")
            if depth < pops:
                raise _fail(start, f"{_NAMES[op]} needs {pops} items, the stack has {depth}")
            depth += pushes - pops
            if op == _STACK_GLOBAL:
                globals_ += 1
        elif op == _MEMOIZE:
            if depth < 1:
                raise _fail(start, "MEMOIZE on an empty stack")
            memo += 1
        elif op == _BINGET or op == _LONG_BINGET:
            width = 1 if op == _BINGET else 4
            if pos + width > end:
                raise _fail(start, f"{_NAMES[op]}: argument cut off")
            index = int.from_bytes(data[pos : pos + width], "little")
            pos += width
            if index >= memo:
                raise _fail(start, f"{_NAMES[op]} {index} names a memo slot never defined")
            depth += 1
        elif op == _MARK:
            marks.append(depth)
            depth = 0
        elif op in _TO_MARK_PUSH or op in _TO_MARK_INTO or op == _POP_MARK:
            if not marks:
                raise _fail(start, f"{_NAMES[op]} without a MARK")
            depth = marks.pop()
            if op in _TO_MARK_PUSH:
                depth += 1
            elif op in _TO_MARK_INTO and depth < 1:
                raise _fail(start, f"{_NAMES[op]} has no container below its MARK")
        elif op == _POP:
            if depth:
                depth -= 1
            elif marks:
                depth = marks.pop()
            else:
                raise _fail(start, "POP on an empty stack")
        elif op == _NEXT_BUFFER:
            buffers += 1
            depth += 1
        elif op == _FRAME:
            if start < frame_end:
                raise _fail(start, "FRAME opened inside another frame")
            if pos + 8 > end:
                raise _fail(start, "FRAME: length cut off")
            frame_end = pos + 8 + int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
            if frame_end > end:
                raise _fail(start, "FRAME extends past the end of the pickle")
            continue
        elif op == _STOP:
            if pos != end:
                raise _fail(start, f"{end - pos} bytes follow STOP inside the pickle part")
            if marks or depth != 1:
                raise _fail(start, "STOP with an unbalanced stack")
            break
        elif op == _PROTO:
            raise _fail(start, "PROTO may only be the first opcode")
        else:
            name = _NAMES.get(op)
            raise _fail(
                start,
                f"opcode {name or hex(op)} is not allowed: a protocol-5 pickler never emits it"
                if name
                else f"unknown opcode {op:#04x}",
            )
        if start < frame_end < pos:
            raise _fail(start, f"{_NAMES[op]} straddles the end of its FRAME")
    else:
        raise _fail(end, "the pickle part ends without STOP")
    if buffers != chunk_count:
        raise _fail(
            end,
            f"the pickle takes {buffers} out-of-band buffers but the header declares "
            f"{chunk_count} side chunks",
        )
    return globals_



try:
    from ._speedups import scan as scan_c
except ImportError:  # built without a C compiler: the reference scan, slower but identical
    scan_c = None

#: The scan to use: the C one when it was built, the reference otherwise (they agree).
scan = scan_c or scan_py
