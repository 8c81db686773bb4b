"""The stream inspector behind ``python -m streampickle inspect``: what a captured stream holds,
message by message, without unpickling anything.

Why: when a peer's messages are refused, or a capture must be audited, the question is what
the bytes say (sizes, flags, tags, the globals each pickle names and whether the safe loader
would take them), and answering it must not run the peer's code or hold its arrays. So this
module reads only what the wire format's header and tables describe (``_wire`` parses them,
the one parser), walks each pickle's opcodes with pickletools' opcode table and argument
readers, and asks the safe loader's own resolver and verifier (``_safe.Loader``) for their
verdicts: neither calls anything a pickle names. Side chunks are seeked past or read and
discarded in pieces (fed to the MAC when a key is given), never held whole; a pickle part is
held only up to ``Limits.max_pickle_size``, as the decoder would.

Everything here takes bytes or binary file objects and returns records (``MessageRecord``,
``PickleRecord``); ``render_text`` and ``to_json`` turn them into output, and ``__main__``
only parses arguments.

A framing error (bad magic, a short file, a length over a limit) ends the listing, since the
next message's start is unknown; a pickle that breaks the spec's framing rules (no ``STOP``,
bytes after it, a ``NEXT_BUFFER`` count that differs from the length table) is reported with
its message and the listing goes on, as a decoder drops such a message and reads the next.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from . import _verify, _wire
from ._allow import denied_reason
from ._errors import ForbiddenGlobalError, ProtocolError, StreamPickleError
from ._limits import Limits
from ._mac import Key, MacName
from ._safe import Loader

__all__ = [
    "GlobalUse",
    "InspectError",
    "MessageRecord",
    "PickleInfo",
    "PickleRecord",
    "Summary",
    "analyze_pickle",
    "inspect_messages",
    "inspect_pickles",
    "render_text",
    "summarize",
    "to_json",
]

#: Bytes read from the input at a time when skipping or hashing a side chunk: what the
#: inspector holds of a chunk at once, however large the chunk.
PIECE = 1 << 20
#: Opcode arguments up to this size are read and decoded; longer ones (a big BYTES literal, a
#: long text line) are skipped in pieces and shown by their size.
ARG_CAP = 1 << 16
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
#: Characters of an argument's rendering in ``--dis`` and of a name in the listing.
SHOW_CAP = 80

_MARK = object()  # a MARK on the model stack
_FORBIDDEN_OPS = _verify._FORBIDDEN  # opcodes outside protocol 5's, which the safe loader refuses
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


class InspectError(Exception):
    """What is wrong with the input at ``offset`` (from the start of the input)."""

    def __init__(self, offset: int, what: str) -> None:
        super().__init__(f"at offset {offset}: {what}")
        self.offset = offset
        self.what = what


class _Truncated(Exception):
    """The input ended ``missing`` bytes short of what was being read."""

    def __init__(self, got: int, wanted: int) -> None:
        super().__init__(got, wanted)
        self.got, self.wanted = got, wanted


# -- reading ---------------------------------------------------------------------------------


class _Source:
    """A binary file read forwards, with the offset of the next byte. Skips seek when the file
    can, and read in pieces (discarded) when it can't or when a MAC must see the bytes."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.offset = 0
        self._start = 0
        self._end: int | None = None  # the input's size, if it can seek
        self._pushback = b""  # a byte ``at_end`` read from an input that can't seek
        try:
            if file.seekable():
                self._start = file.tell()
                self._end = file.seek(0, os.SEEK_END) - self._start
                file.seek(self._start)
        except (OSError, ValueError):
            self._end = None

    def at_end(self) -> bool:
        """Whether the input has no byte left (reading one ahead if it can't seek)."""
        if self._pushback:
            return False
        if self._end is not None:
            return self.offset >= self._end
        self._pushback = self._file.read(1)
        return not self._pushback

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end), read in pieces: a length the input claims
        is never allocated before the bytes arrive."""
        if self._end is not None:
            n = min(n, self._end - self.offset)
        if n <= PIECE:
            return self._read_some(n)
        pieces = []
        left = n
        while left:
            piece = self._read_some(min(left, PIECE))
            if not piece:
                break
            pieces.append(piece)
            left -= len(piece)
        return b"".join(pieces)

    def _read_some(self, n: int) -> bytes:
        out = b""
        if self._pushback and n:
            out, self._pushback = self._pushback, b""
            self.offset += 1
        while len(out) < n:
            piece = self._file.read(n - len(out))
            if not piece:
                break
            self.offset += len(piece)
            out = piece if not out else out + piece
        return out

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) < n:
            raise _Truncated(len(data), n)
        return data

    def skip(self, n: int, mac: Any = None) -> None:
        """Go past ``n`` bytes, feeding them to ``mac`` if one is given; ``_Truncated`` if the
        input ends first."""
        if mac is None and self._end is not None:
            if self.offset + n > self._end:
                got = self._end - self.offset
                self._file.seek(self._start + self._end)
                self.offset = self._end
                raise _Truncated(got, n)
            self._file.seek(self._start + self.offset + n)
            self.offset += n
            return
        left = n
        while left:
            piece = self._read_some(min(left, PIECE))
            if not piece:
                raise _Truncated(n - left, n)
            if mac is not None:
                mac.update(piece)
            left -= len(piece)

    def read_line(self) -> tuple[bytes, int]:
        """A line up to and with its newline: its first bytes (at most ``ARG_CAP + 1``) and its
        length (the rest is read past, not kept). At the end of the input, what there was."""
        head = b""
        length = 0
        if self._pushback:
            head = self._read_some(1)
            length = 1
            if head == b"\n":
                return head, length
        while True:
            piece = self._file.readline(PIECE)
            if not piece:
                return head, length
            self.offset += len(piece)
            length += len(piece)
            if len(head) <= ARG_CAP:
                head += piece[: ARG_CAP + 1 - len(head)]
            if piece.endswith(b"\n"):
                return head, length


# -- the pickle walk -------------------------------------------------------------------------


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
    accept it; only for a message's pickle part) and, for ``--dis``, its first opcodes."""

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


class _Name:
    """A global on the model stack (so that OBJ can name the class it calls)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str | None, name: str | None) -> None:
        self.module, self.name = module, name


class _Walk:
    """One pickle's opcodes, read from a ``_Source`` up to its STOP, with a model of the stack
    and memo that knows only strings and globals: enough to name what each STACK_GLOBAL takes
    wherever the pickle makes that statically possible (literals, directly or through the memo)."""

    def __init__(self, source: _Source, loader: Loader, dis_limit: int) -> None:
        self.source = source
        self.loader = loader
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
        """Walk to the STOP; a walk that can't go on sets ``info.error``. ``_Truncated`` if the
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
            except _Truncated:
                raise
            except Exception as exc:  # noqa: BLE001 - pickletools' readers raise ValueError and others
                raise ValueError(f"at pickle byte {pos}: {op.name}: {_cut(str(exc))}") from None
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
                    raise _Truncated(length, length + 1)
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
            if isinstance(arg, str):
                self._push(self._keep(arg))
            elif isinstance(arg, bytes):  # protocol 0-2 strings: str in Python 3 (ASCII)
                self._push(self._keep(arg.decode("latin-1")))
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
            found = _Name(module, qualname) if known else _Name(None, None)
            self._note(found, name, pos, None if known else self._unknown_why(module, qualname))
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
        use.refused, use.admitted_as = _judge(self.loader, use, unknown)
        self._found[key] = use
        self.info.globals.append(use)


def _split_global(arg: Any) -> _Name:
    """GLOBAL's and INST's argument, "module name" as pickletools reads it."""
    if isinstance(arg, str) and " " in arg:
        module, name = arg.split(" ", 1)
        return _Name(module, name)
    return _Name(None, None)


def _judge(loader: Loader, use: GlobalUse, unknown: str | None) -> tuple[str | None, str | None]:
    """Why the safe loader would refuse ``use`` (or None), and how it would admit it: the
    loader's own resolver decides about the name, the verifier's opcode table about the opcode."""
    if unknown is not None:
        return f"{unknown}: the safe loader refuses it", None
    assert use.module is not None and use.name is not None
    opcode = pickle.__dict__.get(use.opcode, b"")
    opcode_refused = (
        f"{use.opcode} is not a protocol-5 pickler's opcode, and the safe loader names globals only "
        f"with STACK_GLOBAL" if opcode and opcode[0] in _FORBIDDEN_OPS else None
    )
    try:
        found = loader.resolve(use.module, use.name, use.position)
    except ForbiddenGlobalError:
        why = denied_reason(use.full_name)
        name_refused = (
            f"never allowable: {why}" if why is not None
            else f"not allowed (allow=[{_cut(use.full_name)!r}] would admit it)"
        )
        return (f"{opcode_refused}; and it is {name_refused}" if opcode_refused else name_refused), None
    except StreamPickleError as exc:
        return _cut(str(exc), 300), None
    if found.rebuilder is not None:
        admitted = "a streampickle reconstructor"
    elif found.attribute_of:
        admitted = "only as getattr(allowed class, 'name') for an allowed 'module.Class.name'"
    else:
        admitted = "allowed by allow="
    return opcode_refused, admitted


def analyze_pickle(data: bytes, *, chunk_count: int | None = None, loader: Loader | None = None,
                   dis_limit: int = 0) -> PickleInfo:
    """Walk the pickle ``data`` (one message's pickle part) without unpickling it.

    ``info.error`` says what breaks the wire format's rules for a pickle part (no ``STOP``,
    bytes after it, ``NEXT_BUFFER``\\s other than ``chunk_count``); ``info.verdict`` is the
    safe loader's verifier's refusal (None if it would accept the pickle), which it decides
    without calling anything the pickle names."""
    loader = loader or Loader.shared(False)
    walk = _Walk(_Source(io.BytesIO(data)), loader, dis_limit)
    try:
        info = walk.run()
    except _Truncated:
        info = walk.info
        info.error = info.error or f"the pickle part ends without a STOP (after {info.opcodes} opcodes)"
    if info.error is None and info.size != len(data):
        info.error = f"{len(data) - info.size} bytes follow the pickle's STOP (at pickle byte {info.size - 1})"
    if info.error is None and chunk_count is not None and info.buffers != chunk_count:
        info.error = (
            f"the pickle takes {info.buffers} out-of-band buffers (NEXT_BUFFER) but the message "
            f"has {chunk_count} side chunks"
        )
    info.verdict = _verdict(loader, data, chunk_count if chunk_count is not None else info.buffers)
    return info


def _verdict(loader: Loader, data: bytes, chunk_count: int) -> str | None:
    """The safe loader's refusal of the pickle, from its verifier (which unpickles nothing)."""
    try:
        loader._verify(data, chunk_count)
    except StreamPickleError as exc:
        return _cut(str(exc), 400)
    except Exception as exc:  # noqa: BLE001 - the verifier's own failure is reported, not raised
        return f"the verifier failed: {type(exc).__name__}: {_cut(str(exc))}"
    return None


# -- messages ----------------------------------------------------------------------------------


@dataclass
class MessageRecord:
    """One message of a stream, or the error where the stream stopped making sense."""

    index: int
    offset: int
    size: int = 0
    version: int | None = None
    flags: int | None = None
    chunk_count: int = 0
    pickle_length: int = 0
    chunk_lengths: tuple[int, ...] = ()
    sender: str | None = None
    sequence: int | None = None
    end_of_stream: bool = False
    mac: str | None = None
    header_tag_ok: bool | None = None
    tag_ok: bool | None = None
    tag_note: str | None = None
    stream_note: str | None = None
    descriptor_count: int | None = None
    shared: list[tuple[int, int]] = field(default_factory=list)
    pickle: PickleInfo | None = None
    error: str | None = None
    fatal: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.header_tag_ok is not False and self.tag_ok is not False


def _mac_name(flags: int) -> MacName:
    if flags & _wire.FLAG_BLAKE3:
        return "blake3"
    return "poly1305" if flags & _wire.FLAG_POLY1305 else "hmac-sha256"


class _Keys:
    """The key file's secret as a :class:`Key` of each MAC a message names (made on first use;
    a MAC whose package is missing is reported, not raised)."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret
        self._made: dict[str, Key | str] = {}

    def get(self, mac: MacName) -> Key | str:
        if mac not in self._made:
            assert self.secret is not None
            try:
                self._made[mac] = Key(self.secret, mac=mac)
            except StreamPickleError as exc:
                self._made[mac] = f"can't check the tag: {exc}"
        return self._made[mac]


def inspect_messages(
    file: IO[bytes],
    *,
    key: bytes | None = None,
    limits: Limits | None = None,
    allow: Iterable[Any] = (),
    dis_limit: int = 0,
) -> Iterator[MessageRecord]:
    """The messages of the stream in ``file``, one record each, in order. ``key`` (a secret's
    raw bytes) checks each tag with the MAC its flags name. A record with ``fatal`` set is the
    last: the framing broke there. Nothing is unpickled; side chunks are never held whole."""
    limits = limits or Limits()
    loader = Loader(allow=allow) if allow else Loader.shared(False)
    keys = _Keys(key) if key is not None else None
    source = _Source(file)
    due: dict[str, int] = {}  # each stream sender's next sequence number
    index = 0
    while True:
        record = MessageRecord(index, source.offset)
        reader = _MessageReader(source, record, limits, keys)
        try:
            header = reader.header()
            if header is None:
                return
            inline = reader.tables(header)
            if inline is not None:
                reader.body(header, inline, loader, dis_limit)
        except InspectError as exc:
            record.error = str(exc)
            record.fatal = True
        record.size = source.offset - record.offset
        _follow(record, due)
        yield record
        if record.fatal:
            return
        index += 1


def _follow(record: MessageRecord, due: dict[str, int]) -> None:
    """Note a keyed stream message out of its sender's order (a stream decoder refuses it: a
    message dropped, replayed or reordered) or after its sender's end. A note, not an error:
    a capture may hold several streams, or start in the middle of one."""
    sender = record.sender
    if sender is None or record.sequence is None or sender == _wire.NO_SENDER.hex():
        return
    expected = due.get(sender)
    if expected is not None and expected < 0:
        record.stream_note = "after this sender's end of stream: a stream decoder refuses it"
    elif expected is not None and record.sequence != expected:
        record.stream_note = (
            f"sequence {record.sequence} where {expected} was due: a stream decoder refuses it "
            f"(messages dropped, replayed or reordered)"
        )
    if expected is not None or len(due) < 1024:  # senders are the input's to choose: bounded
        due[sender] = -1 if record.end_of_stream else max(expected or 0, record.sequence + 1)


class _MessageReader:
    """Reads one message into its record, part by part, feeding the MAC when a key is given.
    Each step raises :class:`InspectError` for what breaks the framing."""

    def __init__(self, source: _Source, record: MessageRecord, limits: Limits, keys: _Keys | None) -> None:
        self.source = source
        self.record = record
        self.limits = limits
        self.keys = keys
        self.key: Key | None = None
        self.mac: Any = None
        self.signed = b""  # what the header tag covers: header, stream fields, length table

    def need(self, part: str, n: int) -> bytes:
        try:
            return self.source.read_exact(n)
        except _Truncated as exc:
            raise self.truncated(part, exc) from None

    def truncated(self, part: str, exc: _Truncated) -> InspectError:
        return InspectError(
            self.record.offset, f"truncated: the input ends inside the message's {part} ({exc.got} of its "
            f"{exc.wanted} bytes, {self.source.offset - self.record.offset} bytes into the message)"
        )

    def check(self, what: str, value: int, limit_name: str) -> None:
        limit = getattr(self.limits, limit_name)
        if value > limit:
            raise InspectError(
                self.record.offset, f"the message declares {value} {what}, over Limits.{limit_name}={limit} "
                f"(raise it with --{limit_name.replace('_', '-')} if the sender legitimately sends that much)"
            )

    def header(self) -> _wire.Header | None:
        """The fixed header, parsed and checked against the limits; None at a clean end."""
        record = self.record
        head = self.source.read(_wire.HEADER_SIZE)
        if not head:
            return None
        try:
            _wire.check_magic_prefix(head)
            if len(head) < _wire.HEADER_SIZE:
                raise self.truncated("fixed header", _Truncated(len(head), _wire.HEADER_SIZE))
            header = _wire.parse_header(head)
        except ProtocolError as exc:
            raise InspectError(record.offset, str(exc)) from None
        flags, count, plen, version = header
        record.version, record.flags, record.chunk_count, record.pickle_length = version, flags, count, plen
        record.end_of_stream = header.is_end
        self.check("side chunks", count, "max_side_chunks")
        self.check("pickle bytes", plen, "max_pickle_size")
        self.check("bytes in all", header.size(), "max_message_size")
        self.signed = head
        if not header.has_mac:
            if self.keys is not None:
                record.tag_ok = False  # a decoder with the key refuses it: a tag could have been stripped
                record.tag_note = "the message carries no tag, and a decoder with this key refuses it"
            return header
        record.mac = _mac_name(flags)
        found = self.keys.get(record.mac) if self.keys is not None else "not checked (no --key-file)"
        if isinstance(found, str):
            record.tag_note = found
        else:
            self.key, self.mac = found, found.new()
        return header

    def tables(self, header: _wire.Header) -> list[int] | None:
        """Stream fields, length table, shared table and header tag, as the version has them:
        the lengths of the side chunks whose bytes follow the pickle (None for an end)."""
        record, count = self.record, header.chunk_count
        if header.version == _wire.VERSION_KEYED:
            fields = self.need("stream fields", _wire.STREAM_FIELDS_SIZE)
            sender, sequence = _wire.unpack_stream_fields(fields)
            record.sender, record.sequence = sender.hex(), sequence
            self.signed += fields
        table = self.need("length table", count * _wire.LENGTH_SIZE)
        lengths = _wire.unpack_lengths(table) if count else ()
        record.chunk_lengths = lengths
        self.signed += table
        self.check("bytes in all", header.size() + sum(lengths), "max_message_size")
        if self.mac is not None:
            self.mac.update(self.signed)
        inline = list(lengths)
        if header.is_shared:
            shared = self.need("shared table", _wire.shared_table_size(count))
            try:
                descriptors, entries = _wire.unpack_shared_table(shared, lengths)
            except ProtocolError as exc:
                raise InspectError(record.offset, str(exc)) from None
            record.descriptor_count, record.shared = descriptors, entries
            self.check("descriptors", descriptors, "max_descriptors")
            inline = [n for n, (index, _) in zip(lengths, entries, strict=True) if index == _wire.INLINE]
        if header.version == _wire.VERSION_KEYED:
            header_tag = self.need("header tag", _wire.TAG_SIZE)
            if self.key is not None:
                record.header_tag_ok = self.key.check(self.signed, header_tag)
                self.mac.update(header_tag)
            if header.is_end:
                return None
        return inline

    def body(self, header: _wire.Header, inline: list[int], loader: Loader, dis_limit: int) -> None:
        """The pickle part (walked), the side chunks (read past) and the tag (checked)."""
        record, mac = self.record, self.mac
        data = self.need("pickle part", header.pickle_length)
        if mac is not None:
            mac.update(data)
        record.pickle = analyze_pickle(data, chunk_count=header.chunk_count, loader=loader, dis_limit=dis_limit)
        for i, length in enumerate(inline):
            try:
                self.source.skip(length, mac)
            except _Truncated as exc:
                raise self.truncated("inline side chunks" if header.is_shared else f"side chunk {i}", exc) from None
        if header.has_mac:
            tag = self.need("tag", _wire.TAG_SIZE)
            if self.key is not None:
                record.tag_ok = self.key.verify(mac, tag)
        if record.pickle.error is not None:
            record.error = f"at offset {record.offset}: malformed message: {record.pickle.error}"


# -- standard pickles ----------------------------------------------------------------------------


@dataclass
class PickleRecord:
    """One pickle of a stream of standard pickles (as ``pickle.dump`` writes them)."""

    index: int
    offset: int
    info: PickleInfo

    @property
    def ok(self) -> bool:
        return self.info.error is None


def inspect_pickles(file: IO[bytes], *, allow: Iterable[Any] = (), dis_limit: int = 0) -> Iterator[PickleRecord]:
    """The concatenated standard pickles in ``file`` (protocols 0 to 5), one record each, each
    walked to its STOP. A pickle that doesn't stop before the input ends, or whose opcodes
    can't be read, is the last record, with its ``info.error`` set. Nothing is unpickled, and
    long literals are read past, not held."""
    loader = Loader(allow=allow) if allow else Loader.shared(False)
    source = _Source(file)
    index = 0
    while not source.at_end():
        offset = source.offset
        walk = _Walk(source, loader, dis_limit)
        try:
            info = walk.run()
        except _Truncated:
            info = walk.info
            info.error = f"truncated: the input ends inside the pickle, before its STOP ({info.opcodes} opcodes read)"
        if info.error is not None:
            info.error = f"at offset {offset}: {info.error}"
        yield PickleRecord(index, offset, info)
        if info.error is not None:
            return
        index += 1


# -- output ------------------------------------------------------------------------------------


def _cut(text: str, limit: int = SHOW_CAP) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text) - limit} more characters)"


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
    return _cut(repr(arg))


def _flag_names(flags: int, version: int) -> str:
    names = []
    if flags & _wire.FLAG_MAC:
        names.append({"blake3": "blake3 tag", "poly1305": "poly1305 tag"}.get(_mac_name(flags), "HMAC-SHA256 tag"))
    if version == _wire.VERSION_KEYED and flags & _wire.FLAG_END:
        names.append("end of stream")
    if version == _wire.VERSION and flags & _wire.FLAG_SHARED:
        names.append("shared memory")
    return ", ".join(names) or "no tag"


def _pickle_lines(info: PickleInfo, indent: str) -> list[str]:
    lines = []
    for use in info.globals:
        times = f", {use.count} times" if use.count > 1 else ""
        where = f"{use.opcode} at pickle byte {use.position}{times}"
        verdict = f"REFUSED: {use.refused}" if use.refused else f"admitted ({use.admitted_as})"
        lines.append(f"{indent}global {_cut(use.full_name)} ({where}): {verdict}")
    if info.more_globals:
        lines.append(f"{indent}... and {info.more_globals} more globals, not listed")
    return lines


def render_text(record: MessageRecord | PickleRecord) -> list[str]:
    """The listing's lines for one record."""
    if isinstance(record, PickleRecord):
        info = record.info
        lines = [
            f"pickle {record.index} at offset {record.offset}: {info.size} bytes, protocol {info.protocol}, "
            f"{info.opcodes} opcodes, {len(info.globals)} globals"
        ]
        lines += _pickle_lines(info, "  ")
        if info.error:
            lines.append(f"  ERROR {info.error}")
        lines += ["  " + line for line in info.dis]
        return lines
    r = record
    if r.version is None:
        return [f"message {r.index} at offset {r.offset}: ERROR {r.error}"]
    assert r.flags is not None
    lines = [
        f"message {r.index} at offset {r.offset}: version {r.version}, flags {r.flags:#04x} "
        f"({_flag_names(r.flags, r.version)}), {r.size} bytes"
    ]
    if r.sender is not None:
        lines.append(f"  stream: sender {r.sender}{' (stands alone)' if r.sender == '00' * 8 else ''}, "
                     f"sequence {r.sequence}" + (f"; NOTE: {r.stream_note}" if r.stream_note else ""))
    if not r.end_of_stream:
        shown = ", ".join(map(str, r.chunk_lengths[:16])) + (", ..." if r.chunk_count > 16 else "")
        lines.append(f"  pickle part: {r.pickle_length} bytes; side chunks: {r.chunk_count}"
                     + (f" ({shown})" if r.chunk_count else ""))
    if r.descriptor_count is not None:
        lines.append(
            f"  shared table: {r.descriptor_count} descriptor{'' if r.descriptor_count == 1 else 's'} (they travel "
            f"beside the bytes, not in this file; only a shared_memory=True decoder takes such a message)"
        )
        for i, (index, offset) in enumerate(r.shared[:16]):
            where = "inline" if index == _wire.INLINE else f"descriptor {index}, offset {offset}"
            lines.append(f"    side chunk {i}: {where}")
        if len(r.shared) > 16:
            lines.append(f"    ... {len(r.shared) - 16} more")
    if r.mac is not None or r.tag_note is not None:
        lines.append(f"  tag: {r.mac or 'none'}: {_tag_text(r)}")
    if r.pickle is not None:
        info = r.pickle
        lines.append(f"  pickle: protocol {info.protocol}, {info.opcodes} opcodes, {len(info.globals)} globals")
        lines += _pickle_lines(info, "    ")
        lines.append("  safe loader: " + ("accepts" if info.verdict is None else f"REFUSES: {info.verdict}"))
    if r.error:
        lines.append(f"  ERROR {r.error}")
    if r.pickle is not None:
        lines += ["    " + line for line in r.pickle.dis]
    return lines


def _tag_text(r: MessageRecord) -> str:
    if r.tag_note is not None:
        return r.tag_note if r.tag_ok is not False else f"REFUSED: {r.tag_note}"
    parts = []
    if r.header_tag_ok is not None:
        parts.append("header tag " + ("verifies" if r.header_tag_ok else "DOES NOT VERIFY"))
    if r.tag_ok is not None:
        parts.append("tag " + ("verifies" if r.tag_ok else "DOES NOT VERIFY"))
    return ", ".join(parts) or "not checked"


def _pickle_json(info: PickleInfo) -> dict[str, Any]:
    return {
        "size": info.size,
        "protocol": info.protocol,
        "opcodes": info.opcodes,
        "buffers": info.buffers,
        "globals": [
            {"module": g.module, "name": g.name, "opcode": g.opcode, "position": g.position, "count": g.count,
             "refused": g.refused, "admitted_as": g.admitted_as}
            for g in info.globals
        ],
        "more_globals": info.more_globals,
        "error": info.error,
        "dis": info.dis,
    }


def to_json(record: MessageRecord | PickleRecord) -> dict[str, Any]:
    """One record as JSON-ready data."""
    if isinstance(record, PickleRecord):
        return {"index": record.index, "offset": record.offset, "ok": record.ok, **_pickle_json(record.info)}
    r = record
    out: dict[str, Any] = {
        "index": r.index, "offset": r.offset, "size": r.size, "ok": r.ok, "error": r.error,
        "version": r.version, "flags": r.flags, "chunk_count": r.chunk_count, "pickle_length": r.pickle_length,
        "chunk_lengths": list(r.chunk_lengths), "end_of_stream": r.end_of_stream,
        "sender": r.sender, "sequence": r.sequence, "stream_note": r.stream_note,
        "tag": None if r.mac is None and r.tag_note is None else {
            "mac": r.mac, "header_tag_ok": r.header_tag_ok, "tag_ok": r.tag_ok, "note": r.tag_note,
        },
        "shared": None if r.descriptor_count is None else {
            "descriptors": r.descriptor_count,
            "chunks": [None if i == _wire.INLINE else {"descriptor": i, "offset": o} for i, o in r.shared],
        },
        "pickle": None,
    }
    if r.pickle is not None:
        out["pickle"] = {**_pickle_json(r.pickle), "safe_loader_refuses": r.pickle.verdict}
    return out


@dataclass
class Summary:
    """Counts over the records of one run."""

    records: int = 0
    errors: int = 0
    refused: int = 0
    tags_verified: int = 0
    tags_failed: int = 0
    tags_unchecked: int = 0
    first_error: str | None = None

    def add(self, record: MessageRecord | PickleRecord) -> None:
        self.records += 1
        info = record.info if isinstance(record, PickleRecord) else record.pickle
        if info is not None and (info.refused or (isinstance(record, MessageRecord) and info.verdict)):
            self.refused += 1
        if isinstance(record, MessageRecord) and (record.mac is not None or record.tag_ok is not None):
            if record.tag_ok is None and record.header_tag_ok is None:
                self.tags_unchecked += 1
            elif record.header_tag_ok is False or record.tag_ok is False:
                self.tags_failed += 1
            else:
                self.tags_verified += 1
        if not record.ok:
            self.errors += 1
            if self.first_error is None:
                self.first_error = _error_of(record)

    def as_json(self, kind: str) -> dict[str, Any]:
        return {
            kind: self.records, "errors": self.errors, "refused_by_safe_loader": self.refused,
            "tags_verified": self.tags_verified, "tags_failed": self.tags_failed,
            "tags_unchecked": self.tags_unchecked, "first_error": self.first_error,
        }

    def text(self, kind: str) -> str:
        tags = (f", tags: {self.tags_verified} verified, {self.tags_failed} failed, {self.tags_unchecked} unchecked"
                if self.tags_verified + self.tags_failed + self.tags_unchecked else "")
        return (f"{self.records} {kind}, {self.errors} with errors, {self.refused} the safe loader would refuse"
                f"{tags}")


def _error_of(record: MessageRecord | PickleRecord) -> str:
    if isinstance(record, PickleRecord):
        return record.info.error or ""
    if record.error:
        return record.error
    if record.tag_note is not None:
        return f"at offset {record.offset}: {record.tag_note}"
    return f"at offset {record.offset}: the message's tag does not verify under the key (wrong key, or altered bytes)"


def summarize(records: Iterable[MessageRecord | PickleRecord]) -> Summary:
    summary = Summary()
    for record in records:
        summary.add(record)
    return summary
