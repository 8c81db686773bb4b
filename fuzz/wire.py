"""Lenient readers and writers of pickles and messages, for generating and minimizing inputs.

Lenient because they work on hostile and half-broken bytes: nothing here raises on bad input
(a tokenizer that stopped at the first bad byte could not cut a broken pickle into pieces for
the minimizer), and nothing allocates from a size the bytes merely declare. They are the
fuzzers' own reading of docs/wire-format.md, independent of the decoder they test; only the
header layout and the magic come from ``streampickle._wire``.
"""

from __future__ import annotations

import pickletools
import struct
from collections.abc import Sequence
from typing import NamedTuple

from streampickle import _wire

__all__ = ["Message", "declared_chunk_bytes", "pack_message", "parse_stream", "strip_frames", "tokenize"]

HEADER = _wire.HEADER_STRUCT
HEADER_SIZE = HEADER.size
MAGIC = _wire.MAGIC
FRAME = 0x95
_LENGTH = struct.Struct("<Q")


def _layouts() -> dict[int, tuple[int, int, int]]:
    """For each known opcode: (fixed argument bytes, width of a length prefix, text lines)."""
    out: dict[int, tuple[int, int, int]] = {}
    prefix = {
        pickletools.TAKEN_FROM_ARGUMENT1: 1,
        pickletools.TAKEN_FROM_ARGUMENT4: 4,
        pickletools.TAKEN_FROM_ARGUMENT4U: 4,
        pickletools.TAKEN_FROM_ARGUMENT8U: 8,
    }
    for info in pickletools.opcodes:
        code, arg = ord(info.code), info.arg
        if arg is None:
            out[code] = (0, 0, 0)
        elif arg.n >= 0:
            out[code] = (arg.n, 0, 0)
        elif arg.n == pickletools.UP_TO_NEWLINE:
            out[code] = (0, 0, 2 if arg.name == "stringnl_noescape_pair" else 1)
        else:
            out[code] = (0, prefix[arg.n], 0)
    return out


_LAYOUTS = _layouts()
_LONG4 = 0x8B


def tokenize(data: bytes) -> list[bytes]:
    """Cut a pickle into opcodes with their arguments. Unknown bytes become one-byte tokens and
    an opcode cut off by the end takes the rest, so ``b"".join(tokenize(x)) == x`` always."""
    out: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        layout = _LAYOUTS.get(data[pos])
        if layout is None:
            stop = pos + 1
        else:
            fixed, width, lines = layout
            stop = pos + 1
            if lines:
                for _ in range(lines):
                    newline = data.find(b"\n", stop)
                    stop = end if newline < 0 else newline + 1
            elif width:
                if stop + width > end:
                    stop = end
                else:
                    size = int.from_bytes(data[stop : stop + width], "little", signed=data[pos] == _LONG4)
                    stop = min(end, stop + width + max(size, 0))
            else:
                stop = min(end, stop + fixed)
        out.append(data[pos:stop])
        pos = stop
    return out


def strip_frames(tokens: Sequence[bytes]) -> list[bytes]:
    """The tokens without their FRAME opcodes (framing is redone after a mutation)."""
    return [t for t in tokens if t[0] != FRAME or len(t) != 9]


def pack_message(
    pickle: bytes,
    chunks: Sequence[bytes] = (),
    *,
    flags: int = 0,
    version: int = _wire.VERSION,
    reserved: int = 0,
    count: int | None = None,
    pickle_length: int | None = None,
    lengths: Sequence[int] | None = None,
    magic: bytes = MAGIC,
) -> bytes:
    """A message; every field defaults to the truth and any may be overridden with a lie."""
    if lengths is None:
        lengths = [len(c) for c in chunks]
    head = HEADER.pack(
        magic, version, flags, reserved,
        len(lengths) if count is None else count,
        len(pickle) if pickle_length is None else pickle_length,
    )
    return b"".join([head, *(_LENGTH.pack(n) for n in lengths), pickle, *chunks])


class Message(NamedTuple):
    """One message as read from a stream, with what it declared and what was really there."""

    start: int
    end: int  # where the next message would start (may lie past the data)
    flags: int
    count: int
    pickle_length: int
    lengths: tuple[int, ...]  # the entries of the length table that arrived
    pickle: bytes  # at most pickle_length bytes: fewer if the data ends first
    chunks: tuple[bytes, ...]  # the side chunks that arrived, the last one possibly short

    @property
    def complete(self) -> bool:
        return len(self.lengths) == self.count and len(self.pickle) == self.pickle_length and (
            len(self.chunks) == self.count and all(len(c) == n for c, n in zip(self.chunks, self.lengths, strict=True))
        )


def parse_stream(data: bytes, limit: int = 16) -> tuple[list[Message], bytes]:
    """The messages at the start of ``data`` (at most ``limit``), and the bytes after them
    that don't start a message."""
    out: list[Message] = []
    pos, end = 0, len(data)
    while len(out) < limit and end - pos >= HEADER_SIZE and data[pos : pos + 4] == MAGIC:
        _, _, flags, _, count, plen = HEADER.unpack_from(data, pos)
        table = pos + HEADER_SIZE
        entries = min(count, (end - table) // 8)
        lengths = struct.unpack_from(f"<{entries}Q", data, table)
        pickle_start = table + 8 * count
        pickle = data[pickle_start : pickle_start + plen] if pickle_start < end else b""
        chunks = []
        at = pickle_start + plen
        for n in lengths:
            if at >= end:
                break
            chunks.append(data[at : at + n])
            at += n
        stop = pickle_start + plen + sum(lengths) + (_wire.TAG_SIZE if flags & _wire.FLAG_MAC else 0)
        out.append(Message(pos, stop, flags, count, plen, lengths, pickle, tuple(chunks)))
        pos = stop
    return out, data[pos:] if pos < end else b""


def declared_chunk_bytes(data: bytes) -> int:
    """What the messages in ``data`` declare their side chunks to hold, in all."""
    messages, _ = parse_stream(data)
    return sum(sum(m.lengths) for m in messages)
