"""The wire format, versions 1 and 2: constants and header packing/parsing. No state, no I/O.

docs/wire-format.md is the specification; this module is its executable half. A version-1
message (every message without a key) is::

    fixed header (20 bytes) | length table (8 bytes per side chunk) | pickle | side chunks | tag

A version-2 message (every message with a key) authenticates its header before its body, and
says where it stands in its stream::

    fixed header (20) | sender (8) | sequence (8) | length table | header tag (32) | pickle |
    side chunks | tag (32)

or, as the authenticated end of a stream (flag bit 3), only its first 36 bytes and a header tag.

A version-1 message with flag bit 4 hands some side chunks over as shared memory (descriptors that
travel beside the bytes, on a Unix socket); a shared table follows the length table, and only the
other side chunks' bytes follow the pickle::

    fixed header (20) | length table | shared table (8 + 16 per side chunk) | pickle | inline side chunks

All integers are unsigned little-endian. The fixed header is::

    offset  size  field
    0       4     magic            b"\\x93SPK"
    4       1     version          1, or 2 (keyed)
    5       1     flags            bit 0: a 32-byte tag ends the message (HMAC-SHA256)
                                   bit 1: with bit 0 only: the tag is keyed BLAKE3
                                   bit 2: with bit 0 only, not bit 1: nonce + Poly1305
                                   bit 3: version 2 only: the end of the stream
                                   bit 4: version 1 only, no tag: shared-memory side chunks
    6       2     reserved         must be 0
    8       4     side-chunk count
    12      8     pickle length    (bytes of the pickle part; at least 1, 0 in an end)

The magic's first byte is not ASCII and is neither 0x16 (TLS) nor 0x80 (a bare pickle), so a
peer speaking HTTP, TLS or raw pickle is refused on its first byte.
"""

from __future__ import annotations

import operator
import struct
from typing import NamedTuple

from ._errors import IncompleteMessageError, ProtocolError

MAGIC = b"\x93SPK"
VERSION = 1  # every message without a key; keyed messages from before version 2
VERSION_KEYED = 2  # every message with a key: header tag, sender and sequence number

FLAG_MAC = 0x01
FLAG_BLAKE3 = 0x02
FLAG_POLY1305 = 0x04
FLAG_END = 0x08  # version 2: the authenticated end of a stream, no pickle, no side chunks
FLAG_SHARED = 0x10  # version 1, no tag: a shared table follows the length table
_KNOWN_FLAGS = {
    1: FLAG_MAC | FLAG_BLAKE3 | FLAG_POLY1305 | FLAG_SHARED,
    2: FLAG_MAC | FLAG_BLAKE3 | FLAG_POLY1305 | FLAG_END,
}
_MAC_KINDS = FLAG_BLAKE3 | FLAG_POLY1305

# The fixed header, field by field. Every offset below is derived from these formats, and every
# reader and writer of headers takes them from here: the decoder and the encoder through
# ``parse_header`` and ``pack_header``, and the C extension, which reads HEADER_SIZE,
# FLAGS_OFFSET, PICKLE_LENGTH_OFFSET and PLAIN_PREFIX (MAGIC and VERSION in it) from this
# module when it is imported.
_UP_TO_FLAGS = "<4sB"  # magic, version
_UP_TO_PICKLE_LENGTH = _UP_TO_FLAGS + "BHI"  # flags, reserved, side-chunk count
_HEADER = HEADER_STRUCT = struct.Struct(_UP_TO_PICKLE_LENGTH + "Q")  # pickle length
HEADER_SIZE = _HEADER.size  # 20
FLAGS_OFFSET = struct.calcsize(_UP_TO_FLAGS)  # 5
PICKLE_LENGTH_OFFSET = struct.calcsize(_UP_TO_PICKLE_LENGTH)  # 12
#: The header of every *plain* message (version 1, no flags, no reserved bits, no side chunks:
#: what ``dumps`` makes of a small object) up to its pickle length. A fast path that finds these
#: bytes at a message's start only has the pickle length left to read and check.
PLAIN_PREFIX = _HEADER.pack(MAGIC, VERSION, 0, 0, 0, 0)[:PICKLE_LENGTH_OFFSET]
LENGTH_SIZE = 8  # one entry of the length table
TAG_SIZE = 32  # HMAC-SHA256, BLAKE3, or a 16-byte nonce and Poly1305

# Version 2: the stream fields after the fixed header. ``sender`` is 8 random bytes an encoder
# of a stream draws once (so each direction of each connection has its own), or zeros for a
# message that stands alone (``dumps``); ``sequence`` counts that sender's messages from 0.
_STREAM_FIELDS = struct.Struct("<8sQ")
pack_stream_fields = _STREAM_FIELDS.pack
unpack_stream_fields = _STREAM_FIELDS.unpack_from
STREAM_FIELDS_SIZE = _STREAM_FIELDS.size  # 16
PREFIX_SIZE = HEADER_SIZE + STREAM_FIELDS_SIZE  # 36: what a version-2 header tag starts with
NO_SENDER = bytes(8)  # the sender of a message that stands alone

# The shared table (flag bit 4): how many descriptors travel with the message and a reserved
# word, then one entry per side chunk: the index of the descriptor its bytes lie in (INLINE: its
# bytes follow the pickle, as without the flag), a reserved word, and its offset in that file.
# Its length is the length table's.
_SHARED_HEAD = struct.Struct("<II")
_SHARED_ENTRY = struct.Struct("<IIQ")
SHARED_HEAD_SIZE = _SHARED_HEAD.size  # 8
SHARED_ENTRY_SIZE = _SHARED_ENTRY.size  # 16
INLINE = 0xFFFFFFFF


def shared_table_size(chunk_count: int) -> int:
    return SHARED_HEAD_SIZE + chunk_count * SHARED_ENTRY_SIZE


def pack_shared_table(descriptor_count: int, entries: list[tuple[int, int]]) -> bytes:
    """A shared table: ``entries`` holds each side chunk's (descriptor index or ``INLINE``,
    offset)."""
    if not entries:
        return _SHARED_HEAD.pack(descriptor_count, 0)
    # An entry's index and reserved word, little-endian, are one 64-bit word whose value is
    # the index: the table is the head and then 2 words per entry, in one pack.
    words: list[int] = [0] * (2 * len(entries))
    words[0::2], words[1::2] = zip(*entries, strict=True)
    return struct.pack(f"<II{len(words)}Q", descriptor_count, 0, *words)


def unpack_shared_table(
    table: bytes | bytearray | memoryview, lengths: tuple[int, ...]
) -> tuple[int, list[tuple[int, int]]]:
    """Parse and check a shared table against the side chunks' ``lengths``: the descriptor
    count, and each side chunk's (descriptor index or ``INLINE``, offset). Every index is below
    the count, every descriptor holds at least one chunk, reserved words are 0, and no range
    ends past 2**63: else :class:`ProtocolError`."""
    count, reserved = _SHARED_HEAD.unpack_from(table)
    if reserved:
        raise ProtocolError(
            f"the shared table's reserved word is {reserved:#x}, not 0: the peer uses a newer wire format"
        )
    table_end = SHARED_HEAD_SIZE + len(lengths) * SHARED_ENTRY_SIZE
    if lengths and len(table) >= table_end:
        # Every check at once, in C-level passes over the columns (a message of many arrays
        # has as many entries); a table they refuse is checked again entry by entry, which
        # names the first fault. Read as 64-bit words, an entry's index and reserved word are
        # one word whose value is the index if and only if the reserved word is 0.
        words = struct.unpack_from(f"<{2 * len(lengths)}Q", table, SHARED_HEAD_SIZE)
        indices = words[0::2]
        offsets = words[1::2]
        used = set(indices)
        inline = INLINE in used
        used.discard(INLINE)
        ends = (
            [offset + length for index, offset, length in zip(indices, offsets, lengths, strict=True)
             if index != INLINE]
            if inline else list(map(operator.add, offsets, lengths))
        )
        if ((not used or max(used) < count)  # a reserved word set makes an index >= 2**32
                and (not ends or max(ends) <= 1 << 63) and len(used) == count):
            return count, list(zip(indices, offsets, strict=True))
    unpacked = list(_SHARED_ENTRY.iter_unpack(memoryview(table)[SHARED_HEAD_SIZE:table_end]))
    _check_shared_entries(count, unpacked, lengths)
    return count, [(index, offset) for index, _, offset in unpacked]


def _check_shared_entries(count: int, unpacked: list[tuple[int, int, int]], lengths: tuple[int, ...]) -> None:
    """Check a shared table's entries one by one and raise the first fault's
    :class:`ProtocolError`, in entry order: ``unpack_shared_table``'s path for a table its
    column checks refused (or an empty one)."""
    used = set()
    for i, ((index, reserved, offset), length) in enumerate(zip(unpacked, lengths, strict=True)):
        if reserved:
            raise ProtocolError(f"side chunk {i}'s shared-table entry has reserved bits set ({reserved:#x})")
        if index != INLINE:
            if index >= count:
                raise ProtocolError(
                    f"side chunk {i} lies in descriptor {index}, but the message carries {count}"
                )
            if offset + length > 1 << 63:
                raise ProtocolError(f"side chunk {i} claims {length} bytes at offset {offset}: past any file's end")
            used.add(index)
    if len(used) != count:
        raise ProtocolError(
            f"the message carries {count} descriptors but its side chunks lie in {len(used)} of "
            f"them: the peer is broken or hostile"
        )


# Messages whose header, table and pickle together are at most this many bytes are sent as one
# chunk (one write); larger pickles are handed to the transport as their own chunk, unjoined.
COALESCE_LIMIT = 64 * 1024


class Header(NamedTuple):
    flags: int
    chunk_count: int
    pickle_length: int
    version: int = VERSION

    @property
    def has_mac(self) -> bool:
        return bool(self.flags & FLAG_MAC)

    @property
    def is_end(self) -> bool:
        return bool(self.flags & FLAG_END)

    @property
    def is_shared(self) -> bool:
        return bool(self.flags & FLAG_SHARED)

    @property
    def table_offset(self) -> int:
        """Where the length table starts, from the message's first byte."""
        return HEADER_SIZE if self.version == VERSION else PREFIX_SIZE

    @property
    def pickle_offset(self) -> int:
        """Where the pickle part starts, from the message's first byte."""
        table_end = self.table_offset + self.chunk_count * LENGTH_SIZE
        if self.version == VERSION:
            return table_end + shared_table_size(self.chunk_count) if self.flags & FLAG_SHARED else table_end
        return table_end + TAG_SIZE

    def size(self) -> int:
        """The bytes of the whole message but its side chunks, whose sizes the table holds."""
        if self.version == VERSION:
            return self.pickle_offset + self.pickle_length + (TAG_SIZE if self.has_mac else 0)
        if self.is_end:
            return PREFIX_SIZE + TAG_SIZE
        return PREFIX_SIZE + self.chunk_count * LENGTH_SIZE + TAG_SIZE + self.pickle_length + TAG_SIZE


_new_header = tuple.__new__


def pack_header(flags: int, chunk_count: int, pickle_length: int, version: int = VERSION) -> bytes:
    """A fixed header; its fields are checked only as far as ``struct`` does (a header the
    decoder refuses can be packed, for tests)."""
    return _HEADER.pack(MAGIC, version, flags, 0, chunk_count, pickle_length)


def pack_lengths(lengths: list[int]) -> bytes:
    return struct.pack(f"<{len(lengths)}Q", *lengths)


def unpack_lengths(table: bytes | bytearray | memoryview) -> tuple[int, ...]:
    try:
        return struct.unpack(f"<{len(table) // LENGTH_SIZE}Q", table)
    except struct.error as exc:
        raise ProtocolError(
            f"a length table is a whole number of {LENGTH_SIZE}-byte entries, got {len(table)} bytes"
        ) from exc


def check_magic_prefix(data: bytes | bytearray | memoryview) -> None:
    """Refuse a header as soon as its first bytes can't be the magic: a TLS ClientHello or an
    HTTP request is refused on its first byte, without waiting for a whole header."""
    n = min(len(data), len(MAGIC))
    if data[:n] != MAGIC[:n]:
        raise ProtocolError(
            f"not a streampickle stream: a message must start with {MAGIC!r}, got "
            f"{bytes(data[:n])!r}. The peer speaks another protocol (HTTP? TLS? a raw "
            f"pickle?) or the stream lost its framing."
        )


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and validate a fixed header (exactly ``HEADER_SIZE`` bytes). Limits are the
    decoder's business, not this. A short header raises :class:`IncompleteMessageError`."""
    try:
        magic, version, flags, reserved, chunk_count, pickle_length = _HEADER.unpack(data)
    except struct.error as exc:
        if len(data) < HEADER_SIZE:
            raise IncompleteMessageError(
                f"the fixed header is cut off: {len(data)} of its {HEADER_SIZE} bytes",
                received=len(data),
                expected=HEADER_SIZE,
            ) from exc
        raise ProtocolError(f"a fixed header is {HEADER_SIZE} bytes, got {len(data)}") from exc
    if magic == MAGIC and not reserved and pickle_length and (version, flags) in _MESSAGE_KINDS:
        # every message's header, at once (tuple.__new__: a NamedTuple's own __new__ is Python)
        return _new_header(Header, (flags, chunk_count, pickle_length, version))
    return _checked_header(magic, version, flags, reserved, chunk_count, pickle_length)


def _checked_header(
    magic: bytes, version: int, flags: int, reserved: int, chunk_count: int, pickle_length: int
) -> Header:
    """``parse_header``'s rules, one by one, each refusal with its own reason."""
    check_magic_prefix(magic)
    known = _KNOWN_FLAGS.get(version)
    if known is None:
        raise ProtocolError(
            f"the peer speaks wire format version {version}; this streampickle speaks "
            f"versions {VERSION} and {VERSION_KEYED}. Upgrade the older side."
        )
    if flags & ~known or reserved:
        raise ProtocolError(
            f"reserved header bits are set (flags={flags:#04x}, reserved={reserved:#06x}): "
            f"the peer uses a newer wire format or the stream is corrupt."
        )
    if flags & _MAC_KINDS == _MAC_KINDS:
        raise ProtocolError(
            f"the header names two MACs (flags={flags:#04x}): the peer is broken or the "
            f"stream is corrupt."
        )
    if flags & _MAC_KINDS and not flags & FLAG_MAC:
        raise ProtocolError(
            f"the header names a MAC but carries no tag (flags={flags:#04x}): the peer is "
            f"broken or the stream is corrupt."
        )
    if flags & FLAG_SHARED and (flags & FLAG_MAC or not chunk_count):
        raise ProtocolError(
            f"a message with shared-memory side chunks carries no tag and at least one side "
            f"chunk (flags={flags:#04x}, {chunk_count} side chunks): the peer is broken or the "
            f"stream is corrupt."
        )
    if version == VERSION_KEYED and not flags & FLAG_MAC:
        raise ProtocolError(
            f"a version-{VERSION_KEYED} message must carry a tag (flags={flags:#04x}): the peer "
            f"is broken or the stream is corrupt."
        )
    if flags & FLAG_END:
        if chunk_count or pickle_length:
            raise ProtocolError(
                f"an end-of-stream message declares {chunk_count} side chunks and "
                f"{pickle_length} pickle bytes; it has neither"
            )
    elif pickle_length == 0:
        raise ProtocolError("the header declares an empty pickle part; every message has one")
    return Header(flags, chunk_count, pickle_length, version)


def _admitted(version: int, flags: int) -> bool:
    try:
        _checked_header(MAGIC, version, flags, 0, 0, 1)
    except ProtocolError:
        return False
    return True


#: The (version, flags) pairs of every header ``_checked_header`` admits with a pickle part: a
#: header with one of them, the magic, no reserved bits and a pickle length is admitted at once.
_MESSAGE_KINDS = frozenset((v, f) for v in _KNOWN_FLAGS for f in range(256) if _admitted(v, f))
