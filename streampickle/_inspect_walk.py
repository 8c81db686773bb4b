"""The inspector's walk of one pickle: its opcodes read from a :class:`Source` up to its
``STOP``, without unpickling anything, and the globals it names found statically.

Why a walk of its own, beside the verifier: the verifier answers yes or no for a whole pickle
it holds; the inspector must also say *which* globals a pickle names, where, and how often,
even in a pickle the verifier refuses at its first opcode, and list opcodes for ``--dis``. So
this walk reads opcodes with pickletools' opcode table and argument readers, keeps a model of
the stack and memo that knows only strings, globals and marks (enough to name what each
``STACK_GLOBAL`` takes wherever the pickle makes that statically possible: literals, directly
or through the memo), and asks a :class:`Judge` about each global. Everything it keeps is
bounded (``*_CAP``): a long literal is read past and shown by its size.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass, field
from typing import Any

from ._inspect_judge import Judge
from ._inspect_source import ARG_CAP, SHOW_CAP, Source, Truncated, cut

__all__ = ["DIS_LIMIT", "GlobalUse", "PickleInfo", "Walk"]

#: Strings up to this many characters are kept on the inspector's model of the pickle stack
#: (to name what a STACK_GLOBAL takes); no real module or qualified name comes close.
NAME_CAP = 4096
#: Entries (stack items and memo slots) the model keeps; past this the rest of the pickle's
#: STACK_GLOBALs are reported as not statically known. A pickle of real data stays far below.
MODEL_CAP = 1 << 20
#: Characters of string literals the model holds at most (each also cost its bytes of input).
HELD_CAP = 1 << 24
#: Distinct globals listed per pickle; further ones are counted, not listed.
GLOBALS_CAP = 10_000
#: Opcodes ``--dis`` prints per pickle unless told otherwise.
DIS_LIMIT = 200

_MARK = object()  # a MARK on the model stack
_LENGTH_WIDTHS = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}
_STRING_OPS = frozenset({
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
})
_OPCODES = {ord(op.code): op for op in pickletools.opcodes}
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
#: The string opcodes whose literals the verifiers take as a STACK_GLOBAL's module and name.
_NAME_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})


@dataclass
class GlobalUse:
    """A global a pickle names: ``module`` and ``name`` (None where the walk can't tell them
    statically), the opcode and the pickle byte of its first use, how many times it is named,
    and ``refused``: why the safe loader would refuse it, or None if it would resolve it."""

    module: str | None
    name: str | None
    opcode: str
    position: int
    count: int = 1
    refused: str | None = None
    admitted_as: str | None = None

    @property
    def full_name(self) -> str:
        if self.module is None or self.name is None:
            return "<not statically known>"
        return f"{self.module}.{self.name}"


@dataclass
class PickleInfo:
    """What the walk of one pickle found: its size in bytes (to its ``STOP``) and protocol, the
    globals it names, its opcode and ``NEXT_BUFFER`` counts, what breaks the format's rules
    (``error``), the safe loader's refusal of the whole pickle (``verdict``: None if it would
    accept it, or if the pickle could not be judged whole) and, for ``--dis``, its first
    opcodes."""

    size: int = 0
    protocol: int | None = None
    globals: list[GlobalUse] = field(default_factory=list)
    more_globals: int = 0
    buffers: int = 0
    opcodes: int = 0
    stopped: bool = False
    error: str | None = None
    verdict: str | None = None
    dis: list[str] = field(default_factory=list)

    @property
    def refused(self) -> list[GlobalUse]:
        return [g for g in self.globals if g.refused is not None]


class _Long:
    """A string argument too long to keep on the model stack (shown by its length)."""

    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
        self.length = length


class _Skipped:
    """An opcode argument too long to read: its length and first bytes."""

    __slots__ = ("length", "head")

    def __init__(self, length: int, head: bytes) -> None:
        self.length, self.head = length, head


class _Quoted(str):
    """A string literal of a text opcode (``STRING``, ``UNICODE``...): known to the walk, but
    never a name part to the verifiers, which read a STACK_GLOBAL's name only from
    ``_NAME_OPS`` literals."""

    __slots__ = ()


class _Name:
    """A global on the model stack (so that OBJ can name the class it calls)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str | None, name: str | None) -> None:
        self.module, self.name = module, name


class Walk:
    """One pickle's opcodes, read from a :class:`Source` up to its STOP, with a model of the
    stack and memo that knows only strings and globals: enough to name what each STACK_GLOBAL
    takes wherever the pickle makes that statically possible (literals, directly or through
    the memo). Each global is judged by ``judge`` when first met."""

    def __init__(self, source: Source, judge: Judge, dis_limit: int) -> None:
        self.source = source
        self.judge = judge
        self.dis_limit = dis_limit
        self.start = source.offset
        self.info = PickleInfo()
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}
        self.lost = False  # the model stopped tracking (over MODEL_CAP, or an underflow)
        self.held = 0  # characters of the strings the model holds
        self.highest = 0  # the highest protocol of an opcode seen (a pickle without PROTO's)
        self._found: dict[tuple[str | None, str | None, str], GlobalUse] = {}

    def run(self) -> PickleInfo:
        """Walk to the STOP; a walk that can't go on sets ``info.error``. ``Truncated`` if the
        input ends first (the caller says where; ``info`` holds what was read)."""
        info = self.info
        try:
            self._walk()
        except ValueError as exc:
            info.error = str(exc)
        finally:
            if info.protocol is None:
                info.protocol = self.highest
            info.size = self.source.offset - self.start
            if self.dis_limit and info.opcodes > self.dis_limit:
                info.dis.append(f"... {info.opcodes - self.dis_limit} more opcodes")
        return info

    def _walk(self) -> None:
        info = self.info
        while True:
            pos = self.source.offset - self.start
            code = self.source.read_exact(1)
            op = _OPCODES.get(code[0])
            if op is None:
                raise ValueError(f"at pickle byte {pos}: {code[0]:#04x} is not a pickle opcode")
            try:
                arg = self._argument(op)
            except Truncated:
                raise
            except Exception as exc:  # noqa: BLE001 - pickletools' readers raise ValueError and others
                raise ValueError(f"at pickle byte {pos}: {op.name}: {cut(str(exc))}") from None
            info.opcodes += 1
            self.highest = max(self.highest, op.proto)
            if op.name == "PROTO" and pos == 0:
                info.protocol = arg
            if len(info.dis) < self.dis_limit:
                info.dis.append(f"{pos:8d}: {op.name:<16} {_show(arg)}".rstrip())
            self._model(op, arg, pos)
            if op.name == "STOP":
                info.stopped = True
                return

    def _argument(self, op: pickletools.OpcodeInfo) -> Any:
        desc = op.arg
        if desc is None:
            return None
        source = self.source
        if desc.n >= 0:
            return desc.reader(io.BytesIO(source.read_exact(desc.n)))
        if desc.n == pickletools.UP_TO_NEWLINE:
            lines = [source.read_line() for _ in range(2 if desc.name == "stringnl_noescape_pair" else 1)]
            for line, length in lines:
                if length > ARG_CAP:
                    return _Skipped(length, line[:SHOW_CAP])
                if not line.endswith(b"\n"):
                    raise Truncated(length, length + 1)
            return desc.reader(io.BytesIO(b"".join(line for line, _ in lines)))
        width, signed = _LENGTH_WIDTHS[desc.n]
        prefix = source.read_exact(width)
        length = int.from_bytes(prefix, "little", signed=signed)
        if length < 0:
            raise ValueError(f"negative length {length}")
        if length <= ARG_CAP:
            return desc.reader(io.BytesIO(prefix + source.read_exact(length)))
        head = source.read_exact(SHOW_CAP)
        source.skip(length - SHOW_CAP)
        return _Skipped(length, head)

    # the model: strings, globals and marks; anything else is None

    def _push(self, value: Any) -> None:
        if len(self.stack) >= MODEL_CAP:
            self.lost = True
        if not self.lost:
            self.stack.append(value)

    def _keep(self, text: str) -> Any:
        """A string literal as the model holds it: itself, while the model holds few enough."""
        if len(text) > NAME_CAP:
            return _Long(len(text))
        if self.held > HELD_CAP:
            return None
        self.held += len(text)
        return text

    def _pop(self) -> Any:
        if self.lost:
            return None
        if not self.stack or self.stack[-1] is _MARK:
            self.lost = True  # an underflow: the pickle is broken, and the verdict will say so
            return None
        return self.stack.pop()

    def _pop_mark(self) -> list[Any]:
        if self.lost:
            return []
        items: list[Any] = []
        while self.stack and self.stack[-1] is not _MARK:
            items.append(self.stack.pop())
        if not self.stack:
            self.lost = True
            return []
        self.stack.pop()
        items.reverse()
        return items

    def _model(self, op: pickletools.OpcodeInfo, arg: Any, pos: int) -> None:
        name = op.name
        if name in _STRING_OPS:
            if isinstance(arg, (str, bytes)):  # protocol 0-2 strings are bytes: str in Python 3 (ASCII)
                kept = self._keep(arg if isinstance(arg, str) else arg.decode("latin-1"))
                self._push(_Quoted(kept) if isinstance(kept, str) and name not in _NAME_OPS else kept)
            else:
                self._push(None)
        elif name == "MEMOIZE" or name in _PUT_OPS:
            top = self.stack[-1] if self.stack and not self.lost else None
            if len(self.memo) >= MODEL_CAP:
                self.lost = True  # MEMOIZE's slot numbers would no longer match the unpickler's
            else:
                self.memo[len(self.memo) if name == "MEMOIZE" else arg] = None if top is _MARK else top
        elif name in _GET_OPS:
            self._push(self.memo.get(arg))
        elif name == "POP" and self.stack and self.stack[-1] is _MARK and not self.lost:
            self.stack.pop()  # as the unpickler does: POP on an empty frame drops the MARK
        elif name == "DUP":
            self._push(self.stack[-1] if self.stack and not self.lost else None)
        elif name == "STACK_GLOBAL":
            qualname, module = self._pop(), self._pop()
            known = isinstance(module, str) and isinstance(qualname, str)
            quoted = isinstance(module, _Quoted) or isinstance(qualname, _Quoted)
            found = _Name(module, qualname) if known else _Name(None, None)
            self._note(found, name, pos, None if known and not quoted else self._unknown_why(module, qualname))
            self._push(found)
        elif name in ("GLOBAL", "INST"):
            found = _split_global(arg)
            self._note(found, name, pos, None)
            if name == "INST":
                self._pop_mark()
                self._push(None)
            else:
                self._push(found)
        elif name == "OBJ":
            items = self._pop_mark()
            cls = items[0] if items else None
            found = cls if isinstance(cls, _Name) else _Name(None, None)
            self._note(found, name, pos, None)
            self._push(None)
        else:
            if name == "NEXT_BUFFER":
                self.info.buffers += 1
            self._generic(op)

    def _generic(self, op: pickletools.OpcodeInfo) -> None:
        before, after = op.stack_before, op.stack_after
        if pickletools.markobject in before:
            self._pop_mark()
            before = before[: before.index(pickletools.markobject)]
        for _ in before:
            self._pop()
        for item in after:
            self._push(_MARK if item is pickletools.markobject else None)

    @staticmethod
    def _unknown_why(module: Any, qualname: Any) -> str:
        if isinstance(module, _Long) or isinstance(qualname, _Long):
            return f"a name part over {NAME_CAP} characters, which no allowlist holds"
        if isinstance(module, _Quoted) or isinstance(qualname, _Quoted):
            return ("its module and name are spelled with STRING or UNICODE literals, and the safe loader "
                    "reads a STACK_GLOBAL's name only from SHORT_BINUNICODE, BINUNICODE or BINUNICODE8 ones")
        return "its module and name are not two str literals (directly or through the memo)"

    def _note(self, found: _Name, opcode: str, pos: int, unknown: str | None) -> None:
        if unknown is None and (found.module is None or found.name is None):
            unknown = "the walk can't tell its name statically"
        key = (found.module, found.name, opcode)
        known = self._found.get(key)
        if known is not None:
            known.count += 1
            return
        if len(self._found) >= GLOBALS_CAP:
            self.info.more_globals += 1
            return
        use = GlobalUse(found.module, found.name, opcode, pos)
        use.refused, use.admitted_as = self.judge.name(found.module, found.name, opcode, pos, unknown)
        self._found[key] = use
        self.info.globals.append(use)


def _split_global(arg: Any) -> _Name:
    """GLOBAL's and INST's argument, "module name" as pickletools reads it."""
    if isinstance(arg, str) and " " in arg:
        module, name = arg.split(" ", 1)
        return _Name(module, name)
    return _Name(None, None)




def _show(arg: Any) -> str:
    """A bounded rendering of an opcode's argument."""
    if arg is None:
        return ""
    if isinstance(arg, _Skipped):
        return f"<{arg.length} bytes, not read: {arg.head[:16]!r}...>"
    if isinstance(arg, bool):
        return repr(arg)
    if isinstance(arg, int):
        return repr(arg) if arg.bit_length() <= 256 else f"<int of {arg.bit_length()} bits>"
    if isinstance(arg, (str, bytes, bytearray)):
        if len(arg) <= SHOW_CAP:
            return repr(arg)
        return f"{arg[:SHOW_CAP]!r}...({len(arg) - SHOW_CAP} more)"
    return cut(repr(arg))

