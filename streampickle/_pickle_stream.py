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
pickle part is). The walk itself costs a bounded amount per input byte.

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

import collections
import pickletools
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
        self._ready: collections.deque[bytes] = collections.deque()
        self._failure: StreamPickleError | None = None
        self._scratch = bytearray()
        self._handed = 0  # the length of the last get_buffer view
        #: Stop walking once a pickle is complete (a reader that fed bytes it only peeked at, to
        #: consume exactly the pickle's bytes: see ``overshoot``).
        self.stop_after_one = False
        self._new_pickle(0)

    def _new_pickle(self, start: int) -> None:
        """The walk's state for a pickle starting at ``start`` in the buffer."""
        self._start = start
        self._pos = start  # the next opcode not yet walked
        self._frame_end = 0  # the end of the current frame (0: none)
        self._searched = start  # where the newline search of a line argument goes on from
        self._lines = 0  # newlines found for the current opcode's line arguments
        self._need = start + 1  # the known extent: the pickle reaches at least this far
        self._stop = -1  # the offset after STOP, once walked

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
        return max(1, self._need - len(self._buf))

    def feed_eof(self) -> None:
        """Say the input ended. Raises :class:`IncompleteMessageError` if it ended inside a
        pickle; pickles already complete can still be iterated."""
        self._check_usable()
        received = len(self._buf) - self._start
        if received:
            expected = max(self._need, len(self._buf)) - self._start
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
            return self._loader.load_standard(self._ready.popleft())
        if self._failure is not None:
            raise self._failure
        raise StopIteration

    @property
    def pending(self) -> int:
        """How many complete pickles are waiting to be loaded by iteration."""
        return len(self._ready)

    @property
    def overshoot(self) -> int:
        """Once a ``stop_after_one`` decoder has a complete pickle: the bytes fed beyond its
        end (unwalked). A reader that fed bytes it only peeked at consumes all but these."""
        return len(self._buf) - self._start

    @property
    def progress(self) -> tuple[int, int]:
        """(bytes of the current pickle that arrived, bytes it is known to need so far)."""
        start = self._start
        return len(self._buf) - start, max(self._need, len(self._buf)) - start

    @property
    def in_pickle(self) -> bool:
        """True if part of a pickle has arrived and the rest has not."""
        return len(self._buf) > self._start

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
        """Walk every opcode whose bytes have all arrived, from where the last walk stopped."""
        buf = self._buf
        have = len(buf)
        args = _ARGS
        while not (self.stop_after_one and self._ready):
            if self._stop >= 0:  # STOP walked; a frame around it is read whole first
                end = max(self._stop, self._frame_end)
                if have < end:
                    self._need = end
                    break
                with memoryview(buf) as view:  # one copy, into the bytes the loader keeps
                    self._ready.append(bytes(view[self._start : end]))
                self._new_pickle(end)
                continue
            pos = self._pos
            if pos >= have:
                self._need = pos + 1
                break
            op = buf[pos]
            spec = args.get(op)
            if spec is None:
                raise self._fail(ProtocolError(
                    f"byte {pos - self._start} of a pickle is not a pickle opcode ({op:#04x}): the stream is "
                    "not a sequence of pickles, or the producer is broken"))
            form, width, signed = spec
            if form == _FIXED or form == _STOP:
                end = pos + 1 + width
            elif form == _LINES:
                found = self._lines
                search = max(self._searched, pos + 1)  # bytes before it were searched already
                while found < width:
                    nl = buf.find(b"\n", search)
                    if nl < 0:
                        break
                    found += 1
                    search = nl + 1
                if found < width:
                    self._lines, self._searched = found, have
                    self._need = have + 1
                    self._check_size(have + 1)
                    break
                end = search
                self._lines, self._searched = 0, end
            else:  # PREFIX or FRAME: the length comes first
                if have < pos + 1 + width:
                    self._need = pos + 1 + width
                    break
                size = int.from_bytes(buf[pos + 1 : pos + 1 + width], "little", signed=signed)
                if size < 0:
                    raise self._fail(ProtocolError(
                        f"byte {pos - self._start} of a pickle: an opcode declares a negative length ({size})"))
                end = pos + 1 + width + (size if form == _PREFIX else 0)
                if form == _FRAME:
                    self._check_size(end + size)
                    self._frame_end = end + size
            self._check_size(end)
            if have < end:
                self._need = max(end, self._frame_end)
                break
            self._pos = end
            if form == _STOP:
                self._stop = end
        start = self._start
        if self.stop_after_one:
            return  # the reader reads the offsets (overshoot) and drops the decoder
        if start and (start >= 1 << 16 or start == have) and start * 2 >= have:
            del buf[:start]  # at a pickle boundary: every offset of the walk is rebased
            self._start = 0
            self._pos -= start
            self._searched = max(0, self._searched - start)
            self._need -= start
            if self._frame_end:
                self._frame_end -= start
            if self._stop >= 0:
                self._stop -= start

    def _check_size(self, end: int) -> None:
        """Refuse a pickle that would reach ``end`` in the buffer, if that is over the limit."""
        if end - self._start > self._max:
            raise self._fail(LimitExceededError(
                f"a pickle needs more than Limits.max_pickle_size={self._max} bytes (at least "
                f"{end - self._start}); raise the limit with limits=Limits(max_pickle_size=...) if the "
                "producer legitimately sends pickles this large"))


async def load_pickle(
    stream: Any,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    limits: Limits | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Read exactly one standard pickle (``pickle.dump``, any protocol) from an anyio byte
    stream and return its object, safely unless ``trusted``.

    Never reads a byte beyond the pickle: it receives only as many bytes as the opcode walk
    knows the pickle still needs (an opcode's argument at a time, a frame whole; protocols 0-1
    write line arguments, read a byte at a time), so what follows stays in the stream.
    ``EOFError`` at a clean end before the pickle; :class:`IncompleteMessageError` inside it.
    """
    import anyio  # the async adapter only: the module's decoder imports no I/O machinery

    decoder = PickleDecoder(trusted=trusted, allow=allow, limits=limits, persistent_load=persistent_load)
    while not decoder.pending:
        try:
            # At most MAX_READ: never ask a stream for a buffer the size a length field claims.
            data = await stream.receive(max(1, min(decoder.wanted, MAX_READ)))
        except anyio.EndOfStream:
            if not decoder.in_pickle:
                raise EOFError("the stream ended before a pickle started") from None
            decoder.feed_eof()  # inside a pickle: raises IncompleteMessageError
            raise
        decoder.feed(data)
    return next(decoder)
