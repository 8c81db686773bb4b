"""The inspector's reading of streampickle messages: each message of a captured stream, part
by part, as the wire format's header and tables describe it, into a :class:`MessageRecord`.

Why here and not in the decoder: the decoder must refuse at the first wrong byte, and keeps
nothing it refused; the inspector must say what each message holds (sizes, flags, tags, the
globals its pickle names and the safe loader's verdicts) and go on where a decoder would go on.
So it reads with the one header parser (``_wire``), checks the same limits, checks tags with
``_mac``'s keys, and leaves every judgement to :class:`Judge` (the loader's own rules). Side
chunks are seeked past or read and discarded in pieces (fed to the MAC when a key is given),
never held; the pickle part is held once, in one buffer, up to ``Limits.max_pickle_size``, as
the decoder would.

A framing error (bad magic, a short file, a length over a limit) ends the listing, since the
next message's start is unknown; a pickle that breaks the spec's framing rules (no ``STOP``,
bytes after it, a ``NEXT_BUFFER`` count that differs from the length table) is reported with
its message and the listing goes on, as a decoder drops such a message and reads the next.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from . import _wire
from ._errors import ProtocolError, StreamPickleError
from ._inspect_judge import Judge
from ._inspect_source import InspectError, Source, Truncated
from ._inspect_walk import PickleInfo, Walk
from ._limits import Limits
from ._mac import Key, MacName
from ._safe import Loader

__all__ = ["MessageRecord", "analyze_pickle", "inspect_messages", "mac_name"]


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


def mac_name(flags: int) -> MacName:
    """The MAC a keyed message's flags name."""
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
    judge = Judge(Loader(allow=allow) if allow else Loader.shared(False), standard=False)
    keys = _Keys(key) if key is not None else None
    source = Source(file)
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
                reader.body(header, inline, judge, dis_limit)
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

    def __init__(self, source: Source, record: MessageRecord, limits: Limits, keys: _Keys | None) -> None:
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
        except Truncated as exc:
            raise self.truncated(part, exc) from None

    def truncated(self, part: str, exc: Truncated) -> InspectError:
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
                raise self.truncated("fixed header", Truncated(len(head), _wire.HEADER_SIZE))
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
        record.mac = mac_name(flags)
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

    def body(self, header: _wire.Header, inline: list[int], judge: Judge, dis_limit: int) -> None:
        """The pickle part (held once, walked and judged), the side chunks (read past) and the
        tag (checked)."""
        record, mac = self.record, self.mac
        try:
            data = self.source.read_whole(header.pickle_length, mac)
        except Truncated as exc:
            raise self.truncated("pickle part", exc) from None
        record.pickle = _analyze(data, header.chunk_count, judge, dis_limit)
        del data  # the side chunks are read past with nothing of the pickle part held
        for i, length in enumerate(inline):
            try:
                self.source.skip(length, mac)
            except Truncated as exc:
                raise self.truncated("inline side chunks" if header.is_shared else f"side chunk {i}", exc) from None
        if header.has_mac:
            tag = self.need("tag", _wire.TAG_SIZE)
            if self.key is not None:
                record.tag_ok = self.key.verify(mac, tag)
        if record.pickle.error is not None:
            record.error = f"at offset {record.offset}: malformed message: {record.pickle.error}"


def analyze_pickle(data: bytes, *, chunk_count: int | None = None, loader: Loader | None = None,
                   dis_limit: int = 0) -> PickleInfo:
    """Walk the pickle ``data`` (one message's pickle part) without unpickling it.

    ``info.error`` says what breaks the wire format's rules for a pickle part (no ``STOP``,
    bytes after it, ``NEXT_BUFFER``\\s other than ``chunk_count``); ``info.verdict`` is the
    safe loader's verifier's refusal (None if it would accept the pickle), which it decides
    without calling anything the pickle names."""
    judge = Judge(loader or Loader.shared(False), standard=False)
    return _analyze(data, chunk_count, judge, dis_limit)


def _analyze(data: bytes, chunk_count: int | None, judge: Judge, dis_limit: int) -> PickleInfo:
    walk = Walk(Source(io.BytesIO(data)), judge, dis_limit)  # BytesIO shares the bytes: no copy
    try:
        info = walk.run()
    except Truncated:
        info = walk.info
        info.error = info.error or f"the pickle part ends without a STOP (after {info.opcodes} opcodes)"
    if info.error is None and info.size != len(data):
        info.error = f"{len(data) - info.size} bytes follow the pickle's STOP (at pickle byte {info.size - 1})"
    if info.error is None and chunk_count is not None and info.buffers != chunk_count:
        info.error = (
            f"the pickle takes {info.buffers} out-of-band buffers (NEXT_BUFFER) but the message "
            f"has {chunk_count} side chunks"
        )
    info.verdict = judge.pickle(data, chunk_count if chunk_count is not None else info.buffers)
    return info

