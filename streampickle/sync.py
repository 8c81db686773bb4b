"""Blocking adapter: ``dump``/``load`` over binary files, pipes and sockets.

``load`` reads exactly one message and not one byte beyond it (it only ever reads into the
decoder's ``get_buffer``, which never extends past the current message), so several ``load``
calls on one file or socket each get their message, and whatever follows is left for the
caller. Side chunks are read straight into their final memory with ``recv_into``/``readinto``.
``dump`` hands the encoder's chunks to ``sendmsg`` (sockets) or ``write`` unjoined: the array
memory goes to the kernel without a userspace copy.

``progress=callback`` on ``dump``, ``load`` and ``iter_load`` gives the async API's events
(see ``_progress``): ``dump`` writes in groups of one reporting step, ``load`` stops each read
at the next step, and ``iter_load`` keeps its read-ahead, handing what a read brought to the
meter, which accounts it message by message.

With ``shared_memory=True`` on both ends (Unix sockets only), arrays made with
``shared_empty`` travel as descriptors beside the bytes: ``dump`` sends a message's
descriptors with its first byte, and ``load`` reads with ``recvmsg_into`` (a plain read would
make the kernel close them) and hands them to its decoder, which closes any left over before
``load`` returns or raises.
"""

from __future__ import annotations

import functools
import io
import pickle
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO

from . import _fdpass, _shm
from ._decoder import Decoder
from ._encoder import IOV_MAX, Chunk, Encoder, drop_sent, encode_once, sendable
from ._errors import IncompleteMessageError, StreamPickleError, UsageError
from ._files import FileReader, read_failure
from ._limits import Limits
from ._mac import Key
from ._options import options_for
from ._progress import ProgressCallback, ReceiveMeter, SendMeter, groups, step_for
from ._transports import NO_SIGNAL, not_unix

__all__ = ["dump", "iter_load", "load", "load_pickle"]


def dump(
    obj: Any,
    file: BinaryIO | socket.socket,
    *,
    key: bytes | Key | None = None,
    shared_memory: bool = False,
    pickler_class: type[pickle.Pickler] | None = None,
    dispatch_table: Mapping[type, Any] | None = None,
    persistent_id: Callable[[Any], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> None:
    """Write one message carrying ``obj`` to a blocking binary file, pipe or socket.

    If ``obj`` can't be pickled, :class:`EncodeError` is raised and nothing is written.
    ``shared_memory``: on a Unix socket only (:class:`UsageError` elsewhere, and with a
    ``key``), arrays made with :func:`shared_empty` go as shared memory instead of bytes; the
    reader's ``load`` must pass it too. ``pickler_class``, ``dispatch_table`` and
    ``persistent_id`` are pickle's hooks, as :class:`Encoder` takes them.

    ``progress``: a function called with a :class:`Progress` as the async ``dump`` calls it
    (message 0): before the first byte (``done == 0``; not for a message of at most 64 KiB),
    after each step of 1% of the message (at most 64 MiB, at least 64 KiB) and once all of
    it was written (and the file flushed). It runs in the calling thread; what it raises
    comes out of ``dump``: from the first event, nothing was written; from the last, all of
    it was; from one in between, part of the message was, so the file or socket holds an
    incomplete message (close it, or truncate the file).
    """
    if shared_memory:
        _shared_socket(file, key)
    if key is None and pickler_class is None and dispatch_table is None and persistent_id is None:
        chunks = encode_once(obj, shared_memory=shared_memory)
    else:
        chunks = Encoder(
            key=key, stream=False, shared_memory=shared_memory,
            pickler_class=pickler_class, dispatch_table=dispatch_table, persistent_id=persistent_id,
        ).encode(obj)
    send = functools.partial(send_chunks, file) if isinstance(file, socket.socket) else functools.partial(_write, file)
    meter = SendMeter(progress) if progress is not None else None
    total = 0
    if meter is None:
        send(chunks)
    else:
        total = _send_reporting(send, chunks, meter)
    flush = getattr(file, "flush", None)
    if flush is not None:
        flush()
    if meter is not None:
        meter.end(total)  # written whole: a callback that raises here leaves the message intact


def _write(file: BinaryIO, chunks: list[Chunk]) -> None:
    """``dump`` to a file: each chunk written whole, unjoined."""
    write = file.write
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            n = write(view)  # raw files may write less than asked
            if n is None:
                raise BlockingIOError("streampickle.sync.dump needs a blocking file")
            view = view[n:]


def _send_reporting(send: Callable[[list[Chunk]], None], chunks: list[Chunk], meter: SendMeter) -> int:
    """``send(chunks)`` in groups of one reporting step, with the message's first event and
    one after each group but the last, as the async adapters send it; returns the message's
    size, for its last event. A message carrying descriptors goes whole: they must go with
    its first byte, and its bytes are few."""
    total = sum(memoryview(chunk).nbytes for chunk in chunks)
    meter.begin(total)
    done = 0
    for group in [chunks] if _shm.descriptors_of(chunks) else groups(chunks, step_for(total)):
        send(group)
        done += sum(memoryview(chunk).nbytes for chunk in group)
        if done < total:
            meter.step(done, total)
    return total


def send_chunks(sock: socket.socket, chunks: list[Chunk]) -> None:
    """``sendall`` for a list of buffers, with one ``sendmsg`` for as many as the kernel takes.
    A message's descriptors (``shared_memory``) go with the first call that sends a byte."""
    views = sendable(chunks)
    fds = _shm.descriptors_of(chunks)
    if fds:
        ancillary = _fdpass.ancillary(fds)
        while views:
            n = sock.sendmsg(views[:IOV_MAX], ancillary, NO_SIGNAL)
            if n:
                ancillary = []
            drop_sent(views, n)
        return
    while views:
        drop_sent(views, sock.sendmsg(views[:IOV_MAX], (), NO_SIGNAL))


def _shared_socket(file: Any, key: Any) -> socket.socket:
    """``file``, the Unix socket that ``shared_memory=True`` needs; UsageError with a key or
    for anything else."""
    _shm.check_no_key(key)
    if not isinstance(file, socket.socket):
        raise UsageError(
            f"shared_memory=True needs a Unix socket (descriptors travel beside its bytes), not "
            f"a {_name(file)}"
        )
    if file.family != socket.AF_UNIX:
        raise not_unix(file)
    return file


def load(
    file: BinaryIO | socket.socket,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
    shared_memory: bool = False,
    persistent_load: Callable[[Any], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> Any:
    """Read exactly one message from a blocking binary file, pipe or socket and return its
    object. Raises ``EOFError`` if the input ends cleanly before the message starts (or, with
    a key, at a keyed stream's authenticated end), and
    :class:`IncompleteMessageError` if it ends inside it.

    An ``OSError`` from the file or socket (a reset connection, a timeout) propagates as it is
    when it comes before the message's first byte, since nothing was lost; inside the message
    it raises :class:`IncompleteMessageError`, with the ``OSError`` as its cause, like an end
    of input there. A file that is not one (no ``readinto``/``read``, a text file, a
    ``read``/``readinto`` that returns something other than bytes or a count that fits, a
    closed file) or a non-blocking one raises :class:`UsageError`.

    Each call starts afresh and keeps nothing: after a :class:`StreamBrokenError` the file's
    position inside the broken message is unknown, so close it rather than calling ``load``
    again (a :class:`MessageDroppedError` consumed its whole message: the next call reads the
    next one).

    ``shared_memory``: on a Unix socket only (:class:`UsageError` elsewhere, and with a
    ``key``), take arrays the writer's ``dump(..., shared_memory=True)`` handed over as shared
    memory; without it such a message is refused (:class:`ProtocolError`). Descriptors that
    no message claimed are closed before ``load`` returns or raises. ``persistent_load``:
    pickle's hook, as :class:`Decoder` takes it.

    ``progress``: a function called with a :class:`Progress` as the async ``load`` calls it
    (message 0): once the header and length table arrived (not for a message of at most 64
    KiB), at least every 1% of the message (at most 64 MiB, at least 64 KiB: each read stops
    there) and once all of it arrived, before it is unpickled. It runs in the calling thread;
    what it raises comes out of ``load`` and the message is lost, with the file's position
    inside it or just after it, as after a :class:`StreamBrokenError`: close the file."""
    options = options_for(trusted, allow, key, limits, persistent_load)
    meter = ReceiveMeter(progress) if progress is not None else None
    if shared_memory:
        sock = _shared_socket(file, key)
        decoder = Decoder(options=options, stream=False, shared_memory=True)
        try:
            receive = functools.partial(_fdpass.receive_into, sock, decoder=decoder, bounded=True)
            return _load(sock, decoder, receive, meter)
        finally:
            decoder.close_descriptors()
    decoder = Decoder(options=options, stream=False)
    return _load(file, decoder, _readinto_for(file), meter)


def _load(file: Any, decoder: Decoder, readinto: Any, meter: ReceiveMeter | None = None) -> Any:
    """``load``'s loop: read into the decoder's buffer until a message is complete. With a
    meter, each read stops where the next event is due, and reports after it."""
    expected = 0
    while not decoder.pending:
        target = decoder.get_buffer()
        if meter is not None:
            expected = decoder.progress[1]
            target = target[: meter.limit(decoder)]
        n = _read(file, functools.partial(read_failure, decoder), readinto, target)
        try:
            decoder.buffer_updated(n)  # refuses a count that is not an int within target
        except UsageError as exc:
            if n is None:
                raise _non_blocking(file) from exc
            raise UsageError(
                f"{_name(file)}.readinto() returned {_describe(n)} for a buffer of {len(target)} "
                f"bytes; it must return how many bytes it wrote there"
            ) from exc
        if not n:  # an int now: buffer_updated took it
            decoder.feed_eof()  # raises IncompleteMessageError inside a message
            raise EOFError("the input ended before a message started")
        if meter is not None:
            meter.after(decoder, expected, decoder.pending > 0)
        if decoder.ended:
            raise EOFError("the peer ended the stream (its authenticated end of stream)")
    return next(decoder)


def iter_load(
    file: BinaryIO | socket.socket,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> Iterator[Any]:
    """Iterate over the objects of every message in a blocking binary file (or pipe, or
    socket), in order: ``for obj in sync.iter_load(f): ...`` reads back a file written by
    repeated :func:`dump` calls.

    The iteration ends at the end of the input between two messages (an empty file yields
    nothing), or at a keyed stream's authenticated end. An end inside a message raises
    :class:`IncompleteMessageError`, after the objects of the complete messages before it;
    so does an ``OSError`` inside a message (one between messages propagates as it is).
    Options are :func:`load`'s, and safe by default: a message with a global that isn't
    allowed raises :class:`ForbiddenGlobalError` at its place in the order, which ends the
    iteration. Broken bytes raise the decoder's error (:class:`ProtocolError`, ...).

    One decoder reads the whole file, with a bounded read-ahead between messages (a run of
    small messages costs one read) and each array read straight into its final memory; the
    file is never read whole. So the iterator owns the file while it runs: after a ``break``
    (or an error) the file's position is not at a message boundary. It closes nothing.

    ``key``: each message's tag is checked before it is unpickled. The messages of
    ``dump(obj, f, key=k)`` stand alone, and are read as such: as with repeated :func:`load`
    calls, their order and number are not authenticated (a message dropped, repeated or
    moved, or the file cut between messages, goes unnoticed). A file written by one keyed
    ``Encoder`` ends at its ``encode_end()``, but its sequence numbers are not checked here
    either: to check them, feed the file to a ``Decoder(key=k)``, which reads it as a stream.

    ``progress``: a function called with a :class:`Progress` for each message, as
    :func:`load` calls it, with ``message`` counting the file's messages from 0. The
    read-ahead stays: what one read brought is accounted message by message. What the
    callback raises comes out of the iteration, which ends there.

    Options and the file are checked by this call, before iterating (:class:`UsageError`).
    """
    options = options_for(trusted, allow, key, limits, persistent_load)
    given: Any = file  # typed binary, but a text file is a common mistake
    if isinstance(given, io.TextIOBase):
        raise UsageError(
            f"streampickle.sync.iter_load reads a file opened in binary mode (\"rb\"), not a {_name(file)}"
        )
    reader = FileReader(options, progress)
    readinto = getattr(file, "readinto1", None)  # one read: a pipe doesn't wait to fill the buffer
    if readinto is None or isinstance(file, socket.socket):
        readinto = _readinto_for(file)
    return _iter_load(file, reader, readinto)


def _iter_load(file: Any, reader: FileReader, readinto: Any) -> Iterator[Any]:
    """``iter_load``'s loop: read, hand the count to the reader, yield what it completed."""
    more = True
    while more:
        target = reader.buffer()
        n = _read(file, reader.read_failed, readinto, target)
        try:
            more = reader.took(n)
        except UsageError as exc:
            if n is None:
                raise _non_blocking(file) from exc
            raise UsageError(
                f"{_name(file)}.readinto() returned {_describe(n)} for a buffer of {len(target)} "
                f"bytes; it must return how many bytes it wrote there"
            ) from exc
        except StreamPickleError:
            yield from reader.objects()  # the messages completed before the broken one first
            raise
        yield from reader.objects()


def load_pickle(
    file: BinaryIO | socket.socket,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    limits: Limits | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Read exactly one standard pickle (what ``pickle.dump(obj, f, protocol=p)`` writes, any
    ``p``) from a blocking binary file, pipe or socket, and return its object, safely unless
    ``trusted`` (see :class:`streampickle.PickleDecoder`).

    Never reads a byte beyond the pickle. On a plain socket it peeks (``MSG_PEEK``) at what
    has arrived, walks it, and then takes exactly the pickle's bytes; on a buffered file it
    does the same with ``peek``; on anything else each read asks for at most what the opcode
    walk knows the pickle still needs (a frame whole; a line argument of protocols 0-1 a byte
    at a time). So the next ``load_pickle`` (or ``pickle.load``) on the same file gets what
    follows. ``EOFError`` if the input ends before the pickle starts,
    :class:`IncompleteMessageError` if it ends inside it. A refused pickle
    (:class:`MessageDroppedError`) was read whole: the next call reads the next one."""
    from ._pickle_stream import MAX_READ, PickleDecoder

    decoder = PickleDecoder(trusted=trusted, allow=allow, limits=limits, persistent_load=persistent_load)
    readinto: Callable[[memoryview], int | None]
    if type(file) is socket.socket and file.type == socket.SOCK_STREAM:
        peek = functools.partial(file.recv, MAX_READ, socket.MSG_PEEK)
        readinto = file.recv_into
    elif isinstance(file, io.BufferedReader):
        peek = functools.partial(file.peek, MAX_READ)
        readinto = file.readinto
    else:
        return _load_pickle_exactly(file, decoder, _readinto_for(file))
    decoder.stop_after_one = True
    take = _taker(readinto)
    while not decoder.pending:
        if decoder.wanted > 1:  # a literal's or a frame's known extent: read it, no peek needed
            _read_some(file, decoder, readinto)
            continue
        ahead = _read(file, functools.partial(_pickle_read_failure, decoder), peek)
        if not ahead:
            decoder.feed_eof()  # raises IncompleteMessageError inside a pickle
            raise EOFError("the input ended before a pickle started")
        decoder.feed(ahead)
        try:
            # exactly what the walk took: all of it inside the pickle, else up to its end
            take(len(ahead) - decoder.overshoot if decoder.pending else len(ahead))
        except OSError as exc:
            raise _read_failed(decoder, exc) from exc
    return next(decoder)


def _taker(readinto: Callable[[memoryview], int | None]) -> Callable[[int], None]:
    """A function that consumes ``n`` bytes already peeked at, with ``readinto``."""

    def take(n: int) -> None:
        sink = memoryview(bytearray(min(n, 1 << 16) or 1))
        while n > 0:
            got = readinto(sink[: min(n, len(sink))])
            if not got:
                raise OSError("the input ended inside bytes it had shown to a peek")
            n -= got

    return take


def _pickle_read_failure(decoder: Any, exc: OSError) -> BaseException:
    """``read_failure`` for a pickle stream: ``exc`` itself before the pickle's first byte."""
    return _read_failed(decoder, exc) if decoder.in_pickle else exc


def _read_failed(decoder: Any, exc: OSError) -> IncompleteMessageError:
    received, expected = decoder.progress
    return IncompleteMessageError(
        f"reading failed inside a pickle ({exc}): {received} of at least {expected} bytes had arrived",
        received=received, expected=expected,
    )


def _load_pickle_exactly(file: Any, decoder: Any, readinto: Callable[[memoryview], int | None]) -> Any:
    """``load_pickle`` without a peek: read at most what the walk knows the pickle needs."""
    while not decoder.pending:
        _read_some(file, decoder, readinto)
    return next(decoder)


def _read_some(file: Any, decoder: Any, readinto: Callable[[memoryview], int | None]) -> None:
    """One read into the decoder's buffer, which never reaches past the current pickle."""
    target = decoder.get_buffer()
    n = _read(file, functools.partial(_pickle_read_failure, decoder), readinto, target)
    if n is None:
        raise _non_blocking(file)
    decoder.buffer_updated(n)
    if not n:
        decoder.feed_eof()  # raises IncompleteMessageError inside a pickle
        raise EOFError("the input ended before a pickle started")


def _read(file: Any, failure: Callable[[OSError], BaseException], read: Any, *args: Any) -> Any:
    """``read(*args)`` (a ``readinto`` or a peek) with its errors made typed ones, for every read
    loop here: a non-blocking file with nothing ready, and a closed or unreadable one, are the
    caller's :class:`UsageError`; an ``OSError`` raises what ``failure`` makes of it (the error
    itself when nothing was lost, else :class:`IncompleteMessageError` caused by it). What it
    returns is not checked here: each loop's decoder judges the count."""
    try:
        return read(*args)
    except BlockingIOError as exc:  # a non-blocking socket with nothing to read
        raise _non_blocking(file) from exc
    except OSError as exc:
        failed = failure(exc)
        if failed is exc:
            raise
        raise failed from exc
    except (TypeError, ValueError) as exc:  # a closed file, or a readinto that is not callable
        raise UsageError(f"reading from the {_name(file)} failed: {exc!r}") from exc


def _readinto_for(file: Any) -> Any:
    """``file``'s ``readinto``: a socket's ``recv_into``, the file's own, or one made of its
    ``read``. UsageError for an object with neither."""
    if isinstance(file, socket.socket):
        return file.recv_into
    readinto = getattr(file, "readinto", None)
    if readinto is not None:
        return readinto
    read = getattr(file, "read", None)
    if read is None:
        raise UsageError(
            f"streampickle.sync.load reads a binary file, pipe or socket, not {_name(file)}"
        )

    def readinto_from_read(target: memoryview) -> int | None:
        data = read(len(target))
        if data is None:  # a non-blocking file with nothing to read
            return None
        try:
            n = len(data)
            target[:n] = data
        except Exception as exc:  # str (a text file), too many bytes, not bytes at all
            raise UsageError(
                f"{_name(file)}.read({len(target)}) returned {_describe(data)}; a binary file's "
                f"read(n) returns at most n bytes (is the file open in text mode?)"
            ) from exc
        return n

    return readinto_from_read


def _non_blocking(file: Any) -> UsageError:
    return UsageError(
        f"streampickle.sync.load needs a blocking file or socket; this {_name(file)} had no "
        f"data ready. Use the async API (streampickle.load) for non-blocking I/O."
    )


def _name(obj: Any) -> str:
    return type(obj).__name__


def _describe(value: Any) -> str:
    """A bounded description of what a file returned, for error messages."""
    if isinstance(value, int) and value.bit_length() <= 64:
        return repr(value)
    try:
        return f"a {_name(value)} of length {len(value)}"
    except Exception:  # noqa: BLE001 - a description must not fail, whatever len() raises
        return f"a {_name(value)}"
