"""Standard pickle streams: what ``pickle.dump(obj, f, protocol=p)`` writes, any ``p``, one
pickle after another, read safely.

Theory of operation. A standard pickle has no length header: its end is the ``STOP`` opcode,
and finding it means walking the opcodes. :class:`PickleDecoder` walks them as bytes arrive,
from the offset the last walk stopped at, never again over bytes already walked: each opcode's
argument has a fixed size, a length prefix (read once the prefix is in), or runs to a newline
(searched only in bytes not yet searched). A ``FRAME`` announces its length, and the frame is
read whole. So the decoder always knows a *known extent*: how far the current pickle certainly
reaches (the end of the current opcode's argument, the end of the current frame, or one byte
more). :meth:`PickleDecoder.get_buffer` never hands out memory past it, so a reader that fills
it (``load_pickle``, ``streampickle.sync.load_pickle``) never reads a byte of the next pickle.

Bounds. A standard pickle is all in-band, so the bytes buffered for one pickle are bounded by
``Limits.max_pickle_size``: a frame or literal that declares more, or a pickle that grows past
it, raises :class:`LimitExceededError` before more is buffered (as the framed decoder's
pickle part is). The walk itself costs a bounded amount per input byte. What was fed and not
yet iterated stays one buffer (the walk keeps a count of complete pickles and the end of the
first, not an object per pickle), and a pickle is cut from it only when iteration asks: a
feed of millions of two-byte pickles holds about the bytes fed, not millions of objects.

Loading. Each complete pickle is loaded by the options' loader (``Loader.load_standard``):
``trusted=True`` is ``pickle.loads``; otherwise the typed verifier, extended to protocols 0-4,
proves it first, and numpy arrays and dtypes are built by streampickle's own validating
reconstructors, never by numpy's ``_reconstruct`` or ``__setstate__``. A pickle refused there
(:class:`MalformedPickleError`, :class:`ForbiddenGlobalError`) is dropped whole: its end was
found by the walk, so the next pickle decodes normally. An opcode the walk can't size (an
unknown one, a negative length) loses the framing: :class:`ProtocolError`, and the decoder
stays broken.
"""

from __future__ import annotations

import pickletools
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._errors import (
    IncompleteMessageError,
    LimitExceededError,
    ProtocolError,
    StreamPickleError,
    UsageError,
)
from ._limits import Limits
from ._options import Options, options_for

__all__ = ["PickleDecoder", "load_pickle"]

#: Most bytes one ``get_buffer`` hands out: a read of a large literal is done in pieces this
#: size, each copied once into the pickle's buffer.
MAX_READ = 4 << 20

# What follows each opcode, from pickletools' table: ("fixed", n), ("prefix", width, signed),
# ("lines", count), ("frame",) or ("stop",).
_FIXED, _PREFIX, _LINES, _FRAME, _STOP = range(5)


def _arg_formats() -> dict[int, tuple[int, int, bool]]:
    table: dict[int, tuple[int, int, bool]] = {}
    for info in pickletools.opcodes:
        code = info.code.encode("latin-1")[0]
        arg = info.arg
        if info.name == "STOP":
            table[code] = (_STOP, 0, False)
        elif info.name == "FRAME":
            table[code] = (_FRAME, 8, False)
        elif arg is None:
            table[code] = (_FIXED, 0, False)
        elif arg.n >= 0:
            table[code] = (_FIXED, arg.n, False)
        elif arg.n == pickletools.UP_TO_NEWLINE:
            table[code] = (_LINES, 2 if arg.name == "stringnl_noescape_pair" else 1, False)
        else:
            width = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                     pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}[arg.n]
            table[code] = (_PREFIX, width, arg.n == pickletools.TAKEN_FROM_ARGUMENT4)
    return table


_ARGS = _arg_formats()


class _Cursor:
    """Where a walk of one pickle stands: the state :meth:`advance` goes on from.

    Offsets are into the decoder's buffer; ``rebase`` moves them when its front is cut off."""

    __slots__ = ("start", "pos", "frame_end", "searched", "lines", "need", "stop", "steps")

    def __init__(self, start: int) -> None:
        self.steps = 0  # loop turns of every advance, for tests of the work per byte
        self.reset(start)

    def reset(self, start: int) -> None:
        """A new pickle starting at ``start``."""
        self.start = start
        self.pos = start  # the next opcode not yet walked
        self.frame_end = 0  # the end of the current frame (0: none)
        self.searched = start  # where the newline search of a line argument goes on from
        self.lines = 0  # newlines found for the current opcode's line arguments
        self.need = start + 1  # the known extent: the pickle reaches at least this far
        self.stop = -1  # the offset after STOP, once walked

    def rebase(self, cut: int) -> None:
        """The buffer lost its first ``cut`` bytes (all before ``start``)."""
        self.start -= cut
        self.pos -= cut
        self.searched = max(0, self.searched - cut)
        self.need -= cut
        if self.frame_end:
            self.frame_end -= cut
        if self.stop >= 0:
            self.stop -= cut

    def advance(self, buf: bytearray, limit: int) -> int:
        """Walk every opcode of this pickle whose bytes have all arrived. Return the offset
        just past the pickle (its STOP, or the end of the frame around it) once it is
        complete, else -1 (``need`` says how far it reaches). Raises :class:`ProtocolError`
        for bytes that are not a pickle, :class:`LimitExceededError` past ``limit`` bytes."""
        have = len(buf)
        args = _ARGS
        while True:
            self.steps += 1
            if self.stop >= 0:  # STOP walked; a frame around it is read whole first
                end = max(self.stop, self.frame_end)
                if have < end:
                    self.need = end
                    return -1
                return end
            pos = self.pos
            if pos >= have:
                self.need = pos + 1
                return -1
            op = buf[pos]
            spec = args.get(op)
            if spec is None:
                raise ProtocolError(
                    f"byte {pos - self.start} of a pickle is not a pickle opcode ({op:#04x}): the stream is "
                    "not a sequence of pickles, or the producer is broken")
            form, width, signed = spec
            if form == _FIXED or form == _STOP:
                end = pos + 1 + width
            elif form == _LINES:
                found = self.lines
                search = max(self.searched, pos + 1)  # bytes before it were searched already
                while found < width:
                    nl = buf.find(b"\n", search)
                    if nl < 0:
                        break
                    found += 1
                    search = nl + 1
                if found < width:
                    self.lines, self.searched = found, have
                    self.need = have + 1
                    self._check_size(have + 1, limit)
                    return -1
                end = search
                self.lines, self.searched = 0, end
            else:  # PREFIX or FRAME: the length comes first
                if have < pos + 1 + width:
                    self.need = pos + 1 + width
                    return -1
                size = int.from_bytes(buf[pos + 1 : pos + 1 + width], "little", signed=signed)
                if size < 0:
                    raise ProtocolError(
                        f"byte {pos - self.start} of a pickle: an opcode declares a negative length ({size})")
                end = pos + 1 + width + (size if form == _PREFIX else 0)
                if form == _FRAME:
                    self._check_size(end + size, limit)
                    self.frame_end = end + size
            self._check_size(end, limit)
            if have < end:
                self.need = max(end, self.frame_end)
                return -1
            self.pos = end
            if form == _STOP:
                self.stop = end

    def _check_size(self, end: int, limit: int) -> None:
        """Refuse a pickle that would reach ``end`` in the buffer, if that is over the limit."""
        if end - self.start > limit:
            raise LimitExceededError(
                f"a pickle needs more than Limits.max_pickle_size={limit} bytes (at least "
                f"{end - self.start}); raise the limit with limits=Limits(max_pickle_size=...) if the "
                "producer legitimately sends pickles this large")


#: Consumed bytes kept at the front of the buffer before it is compacted: at most this many,
#: or as many as remain after them (so compacting costs at most a copy per byte consumed).
_COMPACT_AT = 1 << 16


class PickleDecoder:
    """Decodes a byte stream of concatenated standard pickles (protocols 0-5, with or without
    ``FRAME``), fed in any split. No I/O; not thread-safe.

    Options as :class:`Decoder`'s: ``trusted`` (load anything, as ``pickle.load`` would; only
    for trusted producers), ``allow`` (exact global names or classes to admit in safe mode),
    ``limits`` (``max_pickle_size`` bounds each pickle), ``persistent_load`` (pickle's hook, for
    ``PERSID``/``BINPERSID``), or all made once as ``options=``. There is no ``key``: a
    standard pickle carries no tag.

    The interface is :class:`Decoder`'s: :meth:`feed`, iteration, :attr:`pending`,
    :meth:`get_buffer` / :meth:`buffer_updated`, :meth:`feed_eof`. A pickle refused in safe
    mode raises its :class:`MessageDroppedError` from ``next()``, and the next pickle follows.

    Memory: what was fed and not yet iterated is kept as one buffer, and a pickle is cut from
    it (one copy, the bytes the loader reads) only when iteration asks for it. So a feed of
    millions of tiny pickles holds about the bytes fed, not an object per pickle: the walk
    keeps only a count of complete pickles and where the first one ends, and finds the next
    one's end by walking it again (each byte is walked at most twice).
    """

    def __init__(
        self,
        *,
        trusted: bool = False,
        allow: Iterable[Any] = (),
        limits: Limits | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
        options: Options | None = None,
    ) -> None:
        if options is None:
            options = options_for(trusted, allow, None, limits, persistent_load)
        elif options.key is not None:
            raise UsageError("a PickleDecoder takes no key: standard pickles carry no tag")
        self.options = options
        self._loader = options.loader
        self._max = options.limits.max_pickle_size
        self._buf = bytearray()
        self._head = 0  # where the first pickle not yet iterated starts in the buffer
        self._ready = 0  # complete pickles from _head on
        self._first_end = 0  # where the first of them ends (when _ready)
        self._walk_at = _Cursor(0)  # the walk of the first incomplete pickle
        self._cut_at = _Cursor(0)  # the walk that finds the next complete pickle's end again
        self._failure: StreamPickleError | None = None
        self._scratch = bytearray()
        self._handed = 0  # the length of the last get_buffer view
        #: Stop walking once a pickle is complete (a reader that fed bytes it only peeked at, to
        #: consume exactly the pickle's bytes: see ``overshoot``).
        self.stop_after_one = False

    # -- public API -------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the stream: any size, any split, several pickles at once.
        Raises :class:`ProtocolError` (framing lost) or :class:`LimitExceededError` as soon as
        the bytes show it; ``b""`` is not the end (call :meth:`feed_eof`)."""
        self._check_usable()
        try:
            view = memoryview(data).cast("B")
        except TypeError as exc:
            raise UsageError(f"feed() takes a bytes-like object, not {type(data).__name__}") from exc
        if view:
            self._buf += view
            self._walk()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Writable memory for the next incoming bytes, at least one byte long, and never
        reaching past what the current pickle is known to need (so a reader that fills it
        never reads into the next pickle). Call :meth:`buffer_updated` after writing into it."""
        self._check_usable()
        size = max(1, min(self.wanted, MAX_READ))
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        self._handed = size
        return memoryview(self._scratch)[:size]

    def buffer_updated(self, nbytes: int) -> None:
        """Say that ``nbytes`` were written at the start of the last :meth:`get_buffer` view."""
        self._check_usable()
        if type(nbytes) is not int or not 0 <= nbytes <= self._handed:
            raise UsageError(f"buffer_updated({nbytes!r}) does not fit the buffer from get_buffer(), which had "
                             f"room for {self._handed} bytes")
        self._handed = 0
        if nbytes:
            self._buf += memoryview(self._scratch)[:nbytes]
            self._walk()

    @property
    def wanted(self) -> int:
        """Bytes the current pickle certainly still needs (at least 1): what a reader may
        read without reading past it. Without frames, an opcode's argument at a time; a line
        argument (protocols 0-1) a byte at a time; a frame whole."""
        return max(1, self._walk_at.need - len(self._buf))

    def feed_eof(self) -> None:
        """Say the input ended. Raises :class:`IncompleteMessageError` if it ended inside a
        pickle; pickles already complete can still be iterated."""
        self._check_usable()
        received, expected = self.progress
        if received:
            raise self._fail(IncompleteMessageError(
                f"the stream ended inside a pickle: {received} bytes of it had arrived and at least "
                f"{expected} were needed. The producer closed the connection or died mid-pickle.",
                received=received, expected=expected,
            ))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        """The next complete object. Stops when more input is needed; raises the error of a
        pickle that was refused (it is dropped, the next one follows)."""
        if self._ready:
            return self._loader.load_standard(self._cut())
        if self._failure is not None:
            raise self._failure
        raise StopIteration

    @property
    def pending(self) -> int:
        """How many complete pickles are waiting to be loaded by iteration."""
        return self._ready

    @property
    def overshoot(self) -> int:
        """Once a ``stop_after_one`` decoder has a complete pickle: the bytes fed beyond its
        end (unwalked). A reader that fed bytes it only peeked at consumes all but these."""
        return len(self._buf) - self._walk_at.start

    @property
    def progress(self) -> tuple[int, int]:
        """(bytes of the current pickle that arrived, bytes it is known to need so far)."""
        cursor = self._walk_at
        return len(self._buf) - cursor.start, max(cursor.need, len(self._buf)) - cursor.start

    @property
    def in_pickle(self) -> bool:
        """True if part of a pickle has arrived and the rest has not."""
        return len(self._buf) > self._walk_at.start

    @property
    def failed(self) -> bool:
        """True once a framing error has made the decoder unusable."""
        return self._failure is not None

    # -- the walk ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, error: StreamPickleError) -> StreamPickleError:
        self._failure = error
        return error

    def _walk(self) -> None:
        """Walk every opcode whose bytes have all arrived, from where the last walk stopped;
        count the pickles it completes."""
        cursor = self._walk_at
        buf = self._buf
        while not (self.stop_after_one and self._ready):
            try:
                end = cursor.advance(buf, self._max)
            except StreamPickleError as exc:
                raise self._fail(exc) from None
            if end < 0:
                break
            if not self._ready:
                self._first_end = end
            self._ready += 1
            cursor.reset(end)
        self._compact()

    def _in_line(self) -> bool:
        """Whether the walk waits inside a line argument (protocols 0-1), whose end is the
        next newline: a reader that can search its own buffer for it reads the line whole."""
        cursor, buf = self._walk_at, self._buf
        if cursor.stop >= 0 or cursor.pos >= len(buf) or cursor.need > len(buf) + 1:
            return False
        spec = _ARGS.get(buf[cursor.pos])
        return spec is not None and spec[0] == _LINES

    @property
    def _steps(self) -> int:
        """Turns of both walks' loops so far (tests bound the work per input byte with it)."""
        return self._walk_at.steps + self._cut_at.steps

    def _cut(self) -> bytes:
        """Take the first complete pickle out of the buffer (one copy, which the loader reads)
        and find where the next one ends, if one is complete."""
        head, end = self._head, self._first_end
        with memoryview(self._buf) as view:
            data = bytes(view[head:end])
        self._head = end
        self._ready -= 1
        if self._ready:
            cursor = self._cut_at
            cursor.reset(end)
            self._first_end = cursor.advance(self._buf, self._max)  # walked once already: complete
            assert self._first_end > end
        if not self.stop_after_one:
            self._compact()
        return data

    def _compact(self) -> None:
        """Drop the consumed front of the buffer once it is as large as the rest (or it is all
        there is): each byte is moved at most once per time the buffer halves, so the copies
        are linear in the input, and the buffer holds at most twice what is not yet
        consumed, plus ``_COMPACT_AT``."""
        head = self._head
        if self.stop_after_one or not head:
            return
        size = len(self._buf)
        if (head >= _COMPACT_AT or head == size) and head * 2 >= size:
            del self._buf[:head]  # every offset of the walks is rebased
            self._head = 0
            self._walk_at.rebase(head)
            if self._ready:
                self._first_end -= head


async def load_pickle(
    stream: Any,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    limits: Limits | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Read exactly one standard pickle (``pickle.dump``, any protocol) from an anyio byte
    stream or an ``asyncio.StreamReader`` and return its object, safely unless ``trusted``.

    Never reads a byte beyond the pickle, so what follows stays in the stream: it receives
    only as many bytes as the opcode walk knows the pickle still needs (an opcode's argument
    at a time, a frame whole). The line arguments of protocols 0-1 (``INT``, ``FLOAT``,
    ``STRING``, ``GLOBAL``, ``PUT``...) end at a newline the walk can't see coming: an
    ``asyncio.StreamReader`` reads each with ``readuntil``, and an anyio
    ``BufferedByteReceiveStream`` with ``receive_until``, both keeping what follows in their
    own buffer; any other anyio stream can't give bytes back, so there a line is received a
    byte at a time (wrap the stream in ``BufferedByteReceiveStream`` and pass that, and read
    what follows from it too). ``EOFError`` at a clean end before the pickle;
    :class:`IncompleteMessageError` inside it. A call cancelled inside a pickle loses nothing:
    what it received waits with the stream, and the next call with the same options goes on.
    """
    import anyio  # the async adapter only: the module's decoder imports no I/O machinery

    from ._stream import _parkable, _same

    options = options_for(trusted, allow, None, limits, persistent_load)
    receive = _receiver(stream)
    parked = _parked.pop(stream, None) if _parkable(stream) else None
    if parked is not None and _same(parked[0], options):
        decoder = parked[1]
    else:
        decoder = PickleDecoder(options=options)
    try:
        while not decoder.pending:
            try:
                data = await receive(decoder)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                data = b""
            except _IncompleteLine as exc:  # the stream ended inside a line argument
                decoder.feed(exc.partial)
                data = b""
            if not data:
                if not decoder.in_pickle:
                    raise EOFError("the stream ended before a pickle started") from None
                decoder.feed_eof()  # inside a pickle: raises IncompleteMessageError
            decoder.feed(data)
    except BaseException:
        # Cancelled (or interrupted) inside a pickle: its bytes, already taken from the stream,
        # wait with the stream for the next load_pickle, as load() parks a message's decoder.
        if (decoder.in_pickle or decoder.pending) and not decoder.failed and _parkable(stream):
            _parked[stream] = (options, decoder)
        raise
    return next(decoder)


#: Decoders of pickles whose load_pickle was interrupted, until the next load_pickle on the
#: same stream with the same options.
_parked: weakref.WeakKeyDictionary[Any, tuple[Options, PickleDecoder]] = weakref.WeakKeyDictionary()


class _IncompleteLine(Exception):
    def __init__(self, partial: bytes) -> None:
        super().__init__()
        self.partial = partial


def _receiver(stream: Any) -> Callable[[PickleDecoder], Any]:
    """An async function that receives the next bytes ``decoder`` certainly needs from
    ``stream``, never past its pickle (``b""`` or ``anyio.EndOfStream`` at the end)."""
    import asyncio

    import anyio
    from anyio.streams.buffered import BufferedByteReceiveStream

    if isinstance(stream, asyncio.StreamReader):
        async def from_reader(decoder: PickleDecoder) -> bytes:
            if not decoder._in_line():
                # At most MAX_READ: never ask a stream for a buffer the size a length field claims.
                return await stream.read(max(1, min(decoder.wanted, MAX_READ)))
            try:
                return await stream.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:  # a line longer than the reader's buffer: a piece
                return await stream.readexactly(max(1, exc.consumed))
            except asyncio.IncompleteReadError as exc:
                raise _IncompleteLine(exc.partial) from None
        return from_reader
    if isinstance(stream, BufferedByteReceiveStream):
        async def from_buffered(decoder: PickleDecoder) -> bytes:
            if not decoder._in_line():
                return await stream.receive(max(1, min(decoder.wanted, MAX_READ)))
            # A line past the limit is taken up to it, and the decoder refuses it.
            limit = max(1, decoder._max + 1 - decoder.progress[0])
            try:
                return await stream.receive_until(b"\n", limit) + b"\n"
            except anyio.DelimiterNotFound:
                return await stream.receive_exactly(len(stream.buffer))
        return from_buffered
    if callable(getattr(stream, "receive", None)):  # an anyio ByteReceiveStream, or one that acts as it
        async def from_stream(decoder: PickleDecoder) -> Any:
            return await stream.receive(max(1, min(decoder.wanted, MAX_READ)))
        return from_stream
    raise UsageError(f"load_pickle reads an anyio byte stream or an asyncio.StreamReader, not a "
                     f"{type(stream).__name__}")
