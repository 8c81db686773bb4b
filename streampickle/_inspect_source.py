"""The inspector's input: a binary file read forwards, in bounded pieces, with the offset of
every byte, and the bounds on what the inspector holds and shows of it.

Why a class of its own: the input is a capture a peer wrote, so every length in it is a
claim. Reading here never allocates a claimed length before the bytes arrive (reads go in
``PIECE``-sized pieces), skips seek when the file can and read in discarded pieces when it
can't (a pipe) or when a MAC must see the bytes, and the one part the inspector must hold
whole (a message's pickle part, or a standard pickle, for the verifier) is collected into one
buffer that becomes the ``bytes`` handed on, without a second copy (``read_whole``,
``record``).
"""

from __future__ import annotations

import io
import os
from typing import IO, Any

__all__ = ["ARG_CAP", "PIECE", "SHOW_CAP", "InspectError", "Source", "Truncated", "cut"]

#: Bytes read from the input at a time when skipping, hashing or collecting: what the inspector
#: holds of a side chunk at once, however large the chunk.
PIECE = 1 << 20
#: Opcode arguments up to this size are read and decoded; longer ones (a big BYTES literal, a
#: long text line) are skipped in pieces and shown by their size.
ARG_CAP = 1 << 16
#: Characters of an argument's rendering in ``--dis`` and of a name in the listing.
SHOW_CAP = 80


class InspectError(Exception):
    """What is wrong with the input at ``offset`` (from the start of the input)."""

    def __init__(self, offset: int, what: str) -> None:
        super().__init__(f"at offset {offset}: {what}")
        self.offset = offset
        self.what = what


class Truncated(Exception):
    """The input ended: ``got`` of the ``wanted`` bytes being read were there."""

    def __init__(self, got: int, wanted: int) -> None:
        super().__init__(got, wanted)
        self.got, self.wanted = got, wanted


def cut(text: str, limit: int = SHOW_CAP) -> str:
    """``text`` shortened to ``limit`` characters, saying how many were left off: names and
    messages that come from the input are shown bounded."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text) - limit} more characters)"


class Source:
    """A binary file read forwards, with the offset of the next byte. Skips seek when the file
    can, and read in pieces (discarded) when it can't or when a MAC must see the bytes.

    While :meth:`record` is on, every byte read or skipped is also kept, up to a limit, and
    :meth:`recorded` hands them over as one ``bytes``."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.offset = 0
        self._start = 0
        self._end: int | None = None  # the input's size, if it can seek
        self._pushback = b""  # a byte ``at_end`` read from an input that can't seek
        self._tape: io.BytesIO | None = None  # what ``record`` keeps
        self._tape_left = 0  # bytes the tape may still take
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
        is never allocated before the bytes arrive. For small reads (``n`` of at most
        ``PIECE``); :meth:`read_whole` collects a long part."""
        if self._end is not None:
            n = min(n, self._end - self.offset)
        if n <= PIECE:
            return self._read_some(n)
        return self.read_whole(n, None, exact=False)

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) < n:
            raise Truncated(len(data), n)
        return data

    def read_whole(self, n: int, mac: Any = None, *, exact: bool = True) -> bytes:
        """``n`` bytes, collected piece by piece into one buffer as they arrive (each piece fed
        to ``mac`` if one is given) and returned as that buffer: ``BytesIO.getvalue`` hands over
        its own ``bytes`` without a copy, so a part of ``n`` bytes costs ``n`` bytes (and the
        buffer's growth margin, at most an eighth), not the pieces and their join. ``Truncated``
        if the input ends first (unless ``exact`` is false: then what there was)."""
        buffer = io.BytesIO()
        left = n
        while left:
            piece = self._read_some(min(left, PIECE))
            if not piece:
                if exact:
                    raise Truncated(n - left, n)
                break
            if mac is not None:
                mac.update(piece)
            buffer.write(piece)
            left -= len(piece)
        return buffer.getvalue()

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
        if self._tape is not None:
            self._keep(out)
        return out

    def skip(self, n: int, mac: Any = None) -> None:
        """Go past ``n`` bytes, feeding them to ``mac`` if one is given; ``Truncated`` if the
        input ends first."""
        if mac is None and self._end is not None and self._tape is None:
            if self.offset + n > self._end:
                got = self._end - self.offset
                self._file.seek(self._start + self._end)
                self.offset = self._end
                raise Truncated(got, n)
            self._file.seek(self._start + self.offset + n)
            self.offset += n
            return
        left = n
        while left:
            piece = self._read_some(min(left, PIECE))
            if not piece:
                raise Truncated(n - left, n)
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
            if self._tape is not None:
                self._keep(piece)
            length += len(piece)
            if len(head) <= ARG_CAP:
                head += piece[: ARG_CAP + 1 - len(head)]
            if piece.endswith(b"\n"):
                return head, length

    # -- recording -----------------------------------------------------------------------

    def record(self, limit: int) -> None:
        """Keep every byte read or skipped from here on, up to ``limit`` bytes; past that,
        keep none (:meth:`recorded` says so) and go on reading."""
        self._tape = io.BytesIO()
        self._tape_left = limit

    def recorded(self) -> bytes | None:
        """The bytes kept since :meth:`record` (None if they went over its limit), and stop
        recording. One buffer, handed over without a copy."""
        tape, self._tape = self._tape, None
        return None if tape is None else tape.getvalue()

    def _keep(self, data: bytes) -> None:
        assert self._tape is not None
        if len(data) > self._tape_left:
            self._tape = None  # over the limit: what was kept is dropped, nothing more is kept
            return
        self._tape.write(data)
        self._tape_left -= len(data)
