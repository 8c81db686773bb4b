"""Files of objects: every message of a file, in order, read with one decoder.

A file written by repeated ``sync.dump`` calls (an append-only log) is a stream of messages
with nothing between them, so reading it back is the decoder's ordinary job: one
:class:`Decoder` for the whole file, fed with ``get_buffer(read_ahead=True)`` /
``buffer_updated``. Between messages a read takes up to ``READ_AHEAD`` bytes at once (a run
of small messages costs one read, and the C fast path decodes them); inside a message the
decoder hands out the message's own memory, so a side chunk (an array's bytes) is read
straight into its final, aligned place. Memory is bounded by one message and one read-ahead
buffer, never the file.

*Keys.* ``sync.dump(obj, f, key=k)`` writes messages that stand alone (no sender, no sequence
number, as ``dumps``), so the decoder reads with ``stream=False``: every message's tag is
checked before it is unpickled, but, as with repeated ``sync.load`` calls, their order and
number are not authenticated (a message dropped, repeated or moved in the file, or the file
cut at a message boundary, goes unnoticed). A keyed stream's authenticated end
(``Encoder.encode_end``) ends the iteration like the end of the file, but the sequence numbers
of a file written by one keyed ``Encoder`` are not checked (a ``Decoder(key=k)`` fed the file
does that).

This module holds the reader both adapters share (:class:`FileReader`) and the async
iterator, :func:`iter_load`; ``streampickle.sync.iter_load`` is the blocking one.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.to_thread
from anyio.streams.file import FileReadStream, FileStreamAttribute

from ._decoder import Decoder
from ._errors import IncompleteMessageError, StreamPickleError, UsageError
from ._limits import Limits
from ._mac import Key
from ._options import Options, options_for
from ._progress import ProgressCallback, ReceiveMeter
from ._stream import _fill, _transport_for
from ._transport_api import READ_AHEAD

__all__ = ["FileReader", "iter_load", "read_failure"]


class FileReader:
    """The sans-IO half of reading a file of objects: one decoder for all of its messages.

    The caller's loop reads into :meth:`buffer`, reports the count with :meth:`took` (which
    says whether to read again) and takes the completed objects from :meth:`objects`, before
    it reads again and also when :meth:`took` raised (messages completed before a broken one
    come first).

    With a ``progress`` callback the reads are the same (read-ahead between messages, a side
    chunk's own memory inside one), but a read inside a message stops at the next reporting
    step, and what a read-ahead brought goes through the meter (``ReceiveMeter.feed``), which
    gives each message its own exact events."""

    __slots__ = ("decoder", "meter", "_ahead", "_staged")

    def __init__(self, options: Options, progress: ProgressCallback | None = None) -> None:
        self.decoder = Decoder(options=options, stream=False)
        self.meter = ReceiveMeter(progress) if progress is not None else None
        self._ahead: memoryview | None = None  # read-ahead memory of a reader with a meter
        self._staged = False  # the last buffer() was that memory

    def buffer(self) -> memoryview:
        """Where the next bytes go: read-ahead memory between messages, else the current
        part's own memory (a side chunk's final place)."""
        decoder = self.decoder
        meter = self.meter
        if meter is None:
            return decoder.get_buffer(read_ahead=True)
        self._staged = not decoder.in_message and not decoder.ended
        if self._staged:
            if self._ahead is None:
                self._ahead = memoryview(bytearray(READ_AHEAD))
            return self._ahead
        return decoder.get_buffer()[: meter.limit(decoder)]

    def took(self, nbytes: int) -> bool:
        """``nbytes`` were read into the last :meth:`buffer`; 0 is the end of the file. False
        when there is nothing more to read: the file ended between messages, or at a keyed
        stream's authenticated end. Raises :class:`IncompleteMessageError` for an end inside
        a message, and the decoder's errors for broken bytes; with a progress callback, what
        the callback raises (the bytes read are in the decoder by then)."""
        decoder = self.decoder
        meter = self.meter
        if meter is None:
            decoder.buffer_updated(nbytes)  # UsageError for a count that is not an int in the buffer
        elif self._staged:
            ahead = self._ahead
            nbytes = _count(nbytes, ahead)
            if nbytes and ahead is not None:
                try:
                    meter.feed(decoder, ahead[:nbytes])
                finally:
                    meter.deliver()
        else:
            expected, pending = decoder.progress[1], decoder.pending
            decoder.buffer_updated(nbytes)
            if nbytes:
                meter.after(decoder, expected, decoder.pending > pending)
        if not nbytes:
            decoder.feed_eof()  # raises inside a message
            return False
        return not decoder.ended

    def read_failed(self, exc: OSError) -> BaseException:
        """What to raise for a read that failed (see :func:`read_failure`)."""
        return read_failure(self.decoder, exc)

    def objects(self) -> Iterator[Any]:
        """The objects of the messages completed so far, in order. A message that fails to
        unpickle (a global that isn't allowed, say) raises here."""
        decoder = self.decoder
        while decoder.pending:
            yield next(decoder)


def _count(nbytes: Any, target: memoryview | None) -> int:
    """``nbytes`` as a count of bytes read into ``target``, or :class:`UsageError`, as
    ``Decoder.buffer_updated`` judges one."""
    try:
        n = operator.index(nbytes)
    except TypeError:
        n = -1
    size = 0 if target is None else len(target)
    if not 0 <= n <= size:
        raise UsageError(
            f"a read into {size} bytes of read-ahead memory returned a {type(nbytes).__name__} "
            f"out of 0..{size}; it must return how many bytes it wrote there"
        )
    return n


def read_failure(decoder: Decoder, exc: OSError) -> BaseException:
    """What to raise for a read from a file that failed: the ``OSError`` itself between
    messages (nothing was lost), :class:`IncompleteMessageError` inside one, since the rest of
    that message can't be read any more. The blocking adapters share it."""
    if not decoder.in_message:
        return exc
    received, expected = decoder.progress
    return IncompleteMessageError(
        f"reading failed inside a message ({exc}): {received} of {expected} bytes had "
        f"arrived, and the rest can't be read from this file any more.",
        received=received,
        expected=expected,
    )


def iter_load(
    source: Any,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> AsyncIterator[Any]:
    """Iterate asynchronously over the objects of a file of messages, in order:
    ``async for obj in streampickle.iter_load(f): ...``.

    ``source`` is an ``anyio.AsyncFile`` opened for binary reading (``anyio.open_file(path,
    "rb")``), an ``anyio.streams.file.FileReadStream``, or any other anyio byte receive
    stream (or an ``asyncio.StreamReader``). The files are read in anyio's worker threads
    straight into the decoder's memory (an array's bytes into the array, with no copy); other
    streams through their ``receive``, which copies each byte once, and under ``limits``'
    deadlines, as :func:`load` is.

    Iteration ends at the end of the input between two messages (an empty file yields
    nothing), or at a keyed stream's authenticated end; an end inside a message raises
    :class:`IncompleteMessageError` after the objects of the complete messages before it.
    Options are :func:`load`'s, and safe by default: a message with a global that isn't
    allowed raises :class:`ForbiddenGlobalError` at its place in the order. With a ``key``,
    each message's tag is checked, but not their order (see ``streampickle.sync.iter_load``).

    The iterator owns the source while it runs: it reads ahead, so after a ``break`` (or an
    error) the position in the source is not at a message boundary. Close the iterator
    (``contextlib.aclosing``) and the source when done; the iterator closes neither.
    ``progress``: a function called with a :class:`Progress` for each message, as
    ``streampickle.sync.iter_load`` calls it (``message`` counts the source's messages from
    0). A file keeps its read-ahead; another stream then reads one message at a time, each
    read stopping at the end of what the message declared and at the next step, as
    ``ObjectStream`` reads with a callback. What the callback raises ends the iteration.

    Options and the source's type are checked by this call, before iterating.
    """
    options = options_for(trusted, allow, key, limits, persistent_load)
    reader = FileReader(options, progress)
    readinto = _file_readinto(source)
    if readinto is not None:
        return _iterate_file(reader, readinto)
    transport = _transport_for(source)  # UsageError for what isn't a byte stream

    async def fill(started: float | None) -> tuple[bool, float | None]:
        decoder, meter = reader.decoder, reader.meter
        if meter is None:
            return await _fill(transport, decoder, started, exact=False)
        expected, pending = decoder.progress[1], decoder.pending
        done = await _fill(transport, decoder, started, exact=False, cap=meter.limit(decoder))
        meter.after(decoder, expected, decoder.pending > pending)
        return done

    return _iterate_stream(reader, fill)


def _file_readinto(source: Any) -> Callable[[memoryview], Awaitable[int]] | None:
    """A file's ``readinto1`` (one read of the file, what is there; a pipe doesn't wait to
    fill the buffer) or ``readinto``, run in a worker thread, for an ``AsyncFile`` or a
    ``FileReadStream``; None for anything else."""
    if isinstance(source, anyio.AsyncFile):
        file = source.wrapped
        limiter = source.limiter
    elif isinstance(source, FileReadStream):  # exactly: a wrapper may hold bytes it read ahead
        file = source.extra(FileStreamAttribute.file)
        limiter = None
    else:
        return None
    if hasattr(file, "encoding") or not hasattr(file, "readinto"):  # a text file, or no file at all
        raise UsageError(
            f"streampickle.iter_load reads a file opened in binary mode (\"rb\"), not a {_name(file)}"
        )
    read = getattr(file, "readinto1", None) or getattr(file, "readinto")  # noqa: B009 - IO[bytes] doesn't declare it

    async def readinto(target: memoryview) -> int:
        n: int = await anyio.to_thread.run_sync(read, target, limiter=limiter)
        return n

    return readinto


async def _iterate_file(reader: FileReader, readinto: Callable[[memoryview], Awaitable[int]]) -> AsyncIterator[Any]:
    more = True
    while more:
        target = reader.buffer()
        try:
            n = await readinto(target)
        except BlockingIOError as exc:
            raise UsageError("streampickle.iter_load needs a blocking file; this one had no data ready") from exc
        except OSError as exc:
            failure = reader.read_failed(exc)
            if failure is exc:
                raise
            raise failure from exc
        except (TypeError, ValueError) as exc:  # a closed file
            raise UsageError(f"reading the file failed: {exc!r}") from exc
        try:
            more = reader.took(n)
        except StreamPickleError:
            for obj in reader.objects():
                yield obj
            raise
        for obj in reader.objects():
            yield obj


async def _iterate_stream(
    reader: FileReader, fill: Callable[[float | None], Awaitable[tuple[bool, float | None]]]
) -> AsyncIterator[Any]:
    more, started = True, None
    while more:
        try:
            more, started = await fill(started)
        except StreamPickleError:
            for obj in reader.objects():
                yield obj
            raise
        more = more and not reader.decoder.ended
        for obj in reader.objects():
            yield obj


def _name(obj: Any) -> str:
    return type(obj).__name__
