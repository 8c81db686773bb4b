"""The async adapters: ``await dump/load`` on byte streams, and ``ObjectStream``.

Both are thin: the encoder makes the chunks, the decoder finds the messages, and a transport
(``_transports``) moves the bytes. What lives here is the stream semantics users rely on:

* *Cancellation loses nothing on receive.* The decoder holds every byte received so far, and a
  transport read either completes (its bytes are in the decoder) or does not happen. A
  cancelled ``receive`` leaves the partial message in the decoder, and the next ``receive``
  carries on and returns it whole. ``load`` on a bare stream does the same by parking the
  decoder of an interrupted message with the stream until the next ``load`` on it.
* *A cancelled send is either harmless or fatal, never silent.* If no byte of the message
  reached the transport, the stream is untouched; otherwise (or where the transport can't tell)
  the send direction is broken: later sends raise ``anyio.BrokenResourceError``, and the peer
  sees an incomplete message, never a wrong object.
* *A started message has deadlines* (``Limits.max_header_seconds``, ``max_message_seconds``),
  counted on anyio's clock from the read that brought its first byte: a peer that sends part
  of a message and stalls, or dribbles it a byte at a time, gets
  :class:`DeadlineExceededError` and a poisoned stream instead of holding the connection and
  what arrived for ever. Reads inside a message run under a cancel scope with that deadline;
  reads between messages have none, since waiting for the next message is normal.
* *Sends are serialized, in order* (a FIFO lock); concurrent receives raise
  ``anyio.BusyResourceError``.
* *A burst of small messages is one write* where the transport can (``send_later``: asyncio
  and uvloop on streampickle's sockets). The first send since the stream last yielded goes out
  at once, so a reply isn't held back; the rest of the burst is taken, counts as sent, and is
  written when the task next yields. Closing writes it first. A message carrying descriptors
  (``shared_memory``) is never taken: its descriptors must go with its first byte.
* *Progress* (``progress=callback``, see ``_progress``): a send cuts its message into groups
  of one reporting step and reports after each; a receive caps each read at the end of what
  the message has declared and at the next reporting step, and reports after the read. The
  callback runs in the sending or receiving task; what it raises comes out of ``send`` or
  ``receive``. Receiving, the read's bytes are in the decoder by then, so nothing is lost: the
  next ``receive`` carries on. Sending, an exception from the first event leaves the message
  unsent, from the last one leaves it sent whole, and from one in between (a way to abort a
  long send) breaks the send direction as a cancellation there would.
* *Shared memory* (``shared_memory=True``, Unix sockets on both ends): arrays made with
  ``shared_empty`` travel as descriptors (see ``_shm``); the transport hands what arrives to
  the decoder, which owns it until a message claims it, and closing the stream closes what no
  message claimed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import pickle
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import ObjectStream as _AnyioObjectStream

from . import _shm
from ._anyio_compat import checkpoint_if_cancelled
from ._budget import ALLOWANCE, Charge, MemoryBudget
from ._decoder import Decoder
from ._encoder import Encoder
from ._errors import (
    AuthenticationError,
    DeadlineExceededError,
    ProtocolError,
    StreamPickleError,
    UsageError,
)
from ._limits import Limits
from ._mac import Key
from ._options import Options, options_for
from ._progress import ProgressCallback, ReceiveMeter, SendMeter, groups, step_for
from ._stream_transports import slices
from ._transport_api import Feed
from ._transports import (
    READ_AHEAD,
    SocketTransport,
    Transport,
    fastest_transport,
    grow_socket_buffers,
    send_message,
    shared_transport,
)
from ._wire import TAG_SIZE

#: The running asyncio loop, or None (no loop, or trio): which backend's checkpoint applies.
_running_loop = asyncio.events._get_running_loop
_NO_LOOP = object()

__all__ = ["ObjectStream", "dump", "load"]

# A send or receive that needed no waiting still yields to the event loop once in this many
# calls, so a fast stream of small messages can't starve other tasks; a full yield per message
# would cost more than the message (measured with benchmarks/run.py, small-msgs).
_YIELD_EVERY = 64
# How long closing a keyed stream waits for its end-of-stream message to go out: it is 68
# bytes, so only a peer that stopped reading makes it wait.
_END_SECONDS = 5.0
# ObjectStream.handshake: each end's first message is (_HELLO, its role, a random challenge of
# _CHALLENGE bytes), its second (_ANSWER, its role, the peer's challenge) (docs/wire-format.md).
_HELLO = "streampickle-handshake-1"
_ANSWER = "streampickle-handshake-1-answer"
_CHALLENGE = 16
_ROLES = ("initiator", "responder")


class _FifoLock:
    """Serializes sends in arrival order. Unlike ``anyio.Lock`` it does not yield when it is
    free: the send that follows reaches the event loop anyway whenever it has to wait."""

    def __init__(self) -> None:
        self._locked = False
        self._waiters: collections.deque[anyio.Event] = collections.deque()

    async def acquire(self) -> None:
        if not self._locked:
            self._locked = True
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # ownership was handed to us as we were cancelled: pass it on
            else:
                self._waiters.remove(event)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # hand over: stays locked for the next sender
        else:
            self._locked = False

    def locked(self) -> bool:
        """Whether a send holds the lock (or it is being handed to the next one)."""
        return self._locked


class ObjectStream(_AnyioObjectStream[Any]):
    """An anyio object stream carrying Python objects over a bidirectional byte stream.

    ``transport_stream`` is any anyio ``ByteStream`` (TCP, Unix, TLS, a process's pipes
    stapled together, ...) or an asyncio ``(StreamReader, StreamWriter)`` pair, as
    ``asyncio.open_connection`` returns it; it stays available as the ``transport_stream``
    attribute (for :meth:`from_socket`, the socket). anyio socket streams are driven
    zero-copy on trio, and anyio Unix streams on asyncio too; :meth:`from_socket` and
    streampickle's own ``connect_*``/listeners are zero-copy on every backend. Options are
    the core's:
    ``trusted``, ``allow``, ``key``, ``limits``. ``budget``: a :class:`MemoryBudget` that this
    stream's incomplete messages share with other streams (none by default).

    ``limits`` bound both directions: a message over them is refused by ``receive``, and by
    ``send`` (:class:`EncodeError`, before any byte), since a peer configured alike would
    refuse it.

    ``shared_memory``: hand arrays made with :func:`shared_empty` to the peer as shared memory
    (a descriptor beside the bytes) instead of sending their bytes, and accept them from it.
    Both ends must opt in, and the channel must be a Unix socket on one host: an anyio Unix
    socket stream here, or a socket given to :meth:`from_socket`; anything else is a
    :class:`UsageError`, and so is a ``key`` with it (a key's tag can't cover memory that
    doesn't travel in the message). Ordinary arrays still go through the socket.

    Pickle's hooks: ``pickler_class``, ``dispatch_table`` and ``persistent_id`` shape what this
    end sends (see :class:`Encoder`), ``persistent_load`` turns the peer's persistent ids back
    into objects (see :class:`Decoder`); the helpers that make streams (``connect_*``, the
    listeners, :meth:`from_socket`) take the same keywords and pass them here.

    ``progress``: a function called with a :class:`Progress` (direction, bytes done, total,
    message index) at each message's start and end and at least every 1% of it (at most
    every 64 MiB, at least every 64 KiB) in both directions; a message of at most 64 KiB gets
    only its last event. It runs in the sending or receiving task, and what it raises comes
    out of ``send`` or ``receive`` (see the module docstring for what that leaves). With a
    callback a receive reads one message at a time, never ahead into the next. Also on
    ``connect_*``, the listeners, :meth:`from_socket`, :func:`dump` and :func:`load`.

    ``receive`` raises ``anyio.EndOfStream`` at a clean end between messages,
    :class:`IncompleteMessageError` if the peer stopped inside one, and
    :class:`DeadlineExceededError` if a started message outlasts ``limits``' deadlines;
    ``async for`` ends cleanly.
    Typed attributes of the transport (``SocketAttribute.remote_address``, ...) are forwarded.
    """

    def __init__(
        self,
        transport_stream: Any,
        *,
        trusted: bool = False,
        allow: Iterable[Any] = (),
        key: bytes | Key | None = None,
        limits: Limits | None = None,
        budget: MemoryBudget | None = None,
        shared_memory: bool = False,
        pickler_class: type[pickle.Pickler] | None = None,
        dispatch_table: Mapping[type, Callable[[Any], Any]] | None = None,
        persistent_id: Callable[[Any], Any] | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        options = options_for(trusted, allow, key, limits, persistent_load)  # checked once, for both directions
        self._transport: Transport | None = None
        if shared_memory:
            _shm.check_no_key(key)
            self._transport = shared_transport(transport_stream)
        self._shared_memory = bool(shared_memory)
        self._charge = Charge(budget) if budget is not None else None
        # a message the peer would refuse isn't sent
        self._encoder = Encoder(
            key=options.key, limits=limits, shared_memory=self._shared_memory,
            pickler_class=pickler_class, dispatch_table=dispatch_table, persistent_id=persistent_id,
        )
        self._decoder = Decoder(options=options, shared_memory=self._shared_memory)
        # With a key: our own messages reflected back are refused, and the stream has an end.
        self._decoder.pair_with(self._encoder)
        self._decoder.budgeted = budget is not None
        self._keyed = key is not None
        self._end_sent = False
        self._send_lock = _FifoLock()
        self._send_broken: BaseException | None = None
        self._receiving = False
        self._started: float | None = None  # anyio.current_time() of the message in progress
        self._eof = False
        self._refused = False  # a handshake refused the peer
        self._closed = False
        self._quick_receives = 0
        self._quick_sends = 0
        # The backend's checkpoint_if_cancelled, looked up under the asyncio loop _cic_loop
        # (None: trio); until the first lookup, anyio's, which works everywhere.
        self._cic: Callable[[], Awaitable[None]] = anyio.lowlevel.checkpoint_if_cancelled
        self._cic_loop: object = _NO_LOOP
        # None without a progress callback: then nothing of the progress machinery runs.
        self._send_meter = SendMeter(progress) if progress is not None else None
        self._receive_meter = ReceiveMeter(progress) if progress is not None else None

    @classmethod
    def from_socket(
        cls,
        sock: socket.socket,
        *,
        trusted: bool = False,
        allow: Iterable[Any] = (),
        key: bytes | Key | None = None,
        limits: Limits | None = None,
        budget: MemoryBudget | None = None,
        shared_memory: bool = False,
        pickler_class: type[pickle.Pickler] | None = None,
        dispatch_table: Mapping[type, Callable[[Any], Any]] | None = None,
        persistent_id: Callable[[Any], Any] | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectStream:
        """Wrap a connected stream socket (TCP or Unix), which the object stream then owns:
        side chunks go from memory to the kernel and back with no userspace copy.

        For example one end of ``socket.socketpair()`` handed to a child process. A Unix socket
        gets the buffer sizes of streampickle's own (``connect_unix``): with ``socketpair``'s
        default ~200 KiB, a large array costs many more event-loop wake-ups.
        ``shared_memory``: see the class; a Unix socket only. Pickle's hooks and ``progress``:
        see the class.
        """
        if sock.family == socket.AF_UNIX:
            grow_socket_buffers(sock)
        stream = cls(
            sock, trusted=trusted, allow=allow, key=key, limits=limits, budget=budget, shared_memory=shared_memory,
            pickler_class=pickler_class, dispatch_table=dispatch_table, persistent_id=persistent_id,
            persistent_load=persistent_load, progress=progress,
        )
        if stream._transport is None:
            stream._transport = SocketTransport(sock)
        return stream

    @property
    def _t(self) -> Transport:
        if self._transport is None:
            self._transport = _transport_for(self.transport_stream)
        return self._transport

    async def send(self, item: Any) -> None:
        """Send one object. Pickling happens first: if it fails, :class:`EncodeError` is raised
        and nothing was sent. Concurrent sends are queued in order. A small message sent in a
        burst may be written, with the rest of the burst, only when this task next yields to
        the event loop (see the module docstring)."""
        if self._keyed:
            await self._send_keyed(item)
            return
        chunks, mac = self._encoder.encode_unsigned(item)
        await (self._cic if _running_loop() is self._cic_loop else self._set_cic())()
        # A small message in a burst (not the first send since this stream last yielded) is
        # written with the rest of the burst where the transport can (SocketTransport.send_later);
        # never one carrying descriptors, which must go with its first byte.
        small = (
            self._quick_sends
            and len(chunks) == 1
            and mac is None
            and not (self._shared_memory and _shm.descriptors_of(chunks))
            and not self._send_lock.locked()
            and self._send_broken is None
            and not self._closed
        )
        if not small:
            await self._send_chunks(chunks, mac)
        elif self._send_meter is None:
            if not (self._transport or self._t).send_later(chunks[0]):
                await self._send_chunks(chunks, mac)
        else:
            # The first event before the message may be taken: if it raises, nothing is sent.
            # Declined, the message takes the lock at once (it is free: no await between).
            total = _message_size(chunks, None)
            self._send_meter.begin(total)
            if (self._transport or self._t).send_later(chunks[0]):
                self._send_meter.end(total)
            else:
                await self._send_chunks(chunks, mac, begun=True)
        await self._sent_one()

    async def _sent_one(self) -> None:
        """After a send: every ``_YIELD_EVERY`` sends, a real yield to the event loop."""
        self._quick_sends += 1
        if self._quick_sends >= _YIELD_EVERY:
            self._quick_sends = 0
            # the message is out: a cancellation delivered here must not look like a failed send
            await anyio.lowlevel.cancel_shielded_checkpoint()

    async def _send_chunks(self, chunks: list[Any], mac: Any, *, begun: bool = False) -> None:
        await self._send_lock.acquire()
        try:
            self._check_send()
            await self._write(chunks, mac, begun=begun)
        finally:
            self._send_lock.release()

    async def _send_keyed(self, item: Any) -> None:
        """``send`` with a key. Each message takes the next sequence number of the stream when
        it is encoded, so it is encoded holding the send lock, in the order messages go out: a
        send cancelled while it waits for its turn takes no number."""
        await (self._cic if _running_loop() is self._cic_loop else self._set_cic())()
        await self._send_lock.acquire()
        try:
            self._check_send()
            chunks, mac = self._encoder.encode_unsigned(item)
            transport = self._transport or self._t
            meter = self._send_meter
            if meter is not None:
                self._begin(meter, chunks, mac)
            if self._quick_sends and len(chunks) == 1 and mac is None and transport.send_later(chunks[0]):
                if meter is not None:
                    meter.end(_message_size(chunks, None))
            else:
                await self._write(chunks, mac, begun=True)
        finally:
            self._send_lock.release()
        await self._sent_one()

    def _begin(self, meter: SendMeter, chunks: list[Any], mac: Any) -> int:
        """Report a message's first event; if the callback raises, the message is not sent
        and its sequence number (with a key) is taken back. Returns its size."""
        total = _message_size(chunks, mac)
        try:
            meter.begin(total)
        except BaseException:
            self._encoder.unsend()
            raise
        return total

    async def _write(self, chunks: list[Any], mac: Any, *, begun: bool = False, report: bool = True) -> None:
        """Send one message's chunks, holding the send lock. Interrupted after a byte went out
        (or where the transport can't tell, or by anything but a cancellation), the send
        direction is broken; cancelled before, the message was never sent, and its sequence
        number (with a key) is taken back. With a progress callback, its events go around and
        between the writes (``begun``: the first one was reported already)."""
        transport = self._transport or self._t
        meter = self._send_meter if report else None
        total = 0
        if meter is not None:
            total = _message_size(chunks, mac) if begun else self._begin(meter, chunks, mac)
        before = transport.sent
        try:
            if meter is None:
                await send_message(transport, chunks, mac)
            else:
                await _send_reporting(transport, chunks, mac, meter, total)
        except BaseException as exc:
            # Only a cancellation comes at a point where the count of bytes sent is exact (an
            # await); anything else, a KeyboardInterrupt say, may have come between the kernel
            # taking bytes and the count.
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            if transport.sent != before or not transport.exact_send_accounting or not cancelled:
                self._send_broken = exc
            else:
                self._encoder.unsend()
            raise
        if meter is not None:
            meter.end(total)  # the message is out whole: if this raises, the stream is intact

    async def receive(self) -> Any:
        """The next object. Cancelling this loses nothing: the next call returns it whole."""
        if self._receiving:
            raise anyio.BusyResourceError("receiving from")
        decoder = self._decoder
        if decoder.pending and not self._closed:  # already decoded: the small-message path
            self._quick_receives += 1
            if self._quick_receives < _YIELD_EVERY:
                await (self._cic if _running_loop() is self._cic_loop else self._set_cic())()
                return next(decoder)
        self._receiving = True
        try:
            while True:
                if self._closed:
                    raise anyio.ClosedResourceError
                if decoder.pending:
                    self._quick_receives = 0
                    await anyio.lowlevel.checkpoint()  # a real yield now and then
                    return next(decoder)
                if self._eof:
                    if self._refused:
                        next(decoder)  # raises the refusal again
                    raise anyio.EndOfStream
                self._quick_receives = 0
                self._quick_sends = 0  # the next send, likely a reply, goes out at once
                meter = self._receive_meter
                # With a callback, a read between messages still reads ahead (a run of small
                # messages in one read) and hands what it brought to the meter, which feeds
                # the decoder in the pieces exact reads would have brought; inside a message,
                # each read stops where the next report is due.
                ahead = meter is not None and not decoder.in_message
                expected = 0 if meter is None else decoder.progress[1]
                try:
                    more, self._started = await _fill(
                        self._t, decoder, self._started, exact=False, charge=self._charge,
                        cap=None if meter is None or ahead else meter.limit(decoder),
                        feed=functools.partial(meter.feed, decoder) if ahead and meter is not None else None,
                    )
                except StreamPickleError:
                    if ahead and meter is not None:
                        meter.deliver()  # the events of the messages before the bad one
                    if decoder.failed and decoder.pending > 0:
                        continue  # messages completed before the failure come first; then it
                    raise
                if not more or decoder.ended:
                    self._eof = True
                if meter is not None:  # after the state above: a callback that raises loses nothing
                    if ahead:
                        meter.deliver()
                    else:
                        meter.after(decoder, expected, decoder.pending > 0)
        finally:
            self._receiving = False

    async def handshake(self, *, initiator: bool) -> None:
        """On a keyed stream, prove that the peer holds the key now, on this connection.

        Each end sends a random challenge and answers the peer's, inside the stream's
        authenticated order. A keyed stream already refuses a message replayed, reordered or
        spliced in from another stream, but not a whole session recorded from its first
        message and replayed on a new connection: after a handshake that session's answer is
        to an old challenge, and it is refused with :class:`AuthenticationError`. So is a
        handshake in this end's own role, such as one this process sent on another of its
        connections and an attacker relayed back, and a peer that answers anything else.

        Both ends call it before anything else on the stream, one with ``initiator=True``
        (by convention the end that connected) and the other with ``initiator=False``. It
        costs two small messages each way, one round trip. The peer's two messages are loaded
        as plain data whatever the stream's ``trusted``, ``allow`` or ``persistent_load``: they
        come from a peer not yet proven. It waits for the peer as ``receive`` does, so give it
        a deadline (``anyio.fail_after``). However it fails (refused, cut, cancelled, timed
        out), nothing more from the peer is delivered: every later ``receive`` raises, so
        close the stream. Without a key, or after a message was sent or received on the
        stream, it raises :class:`UsageError`."""
        if not self._keyed:
            raise UsageError("handshake() proves that the peer holds the stream's key: it needs ObjectStream(key=...)")
        if self._encoder.sequence or self._decoder.peer is not None or self._decoder.pending:
            raise UsageError(
                "handshake() must be the first thing on a stream: this one already sent or received a "
                "message, which a replayed session could have supplied"
            )
        if self._receiving:  # that receive would load the unproven peer's messages: fail the stream
            raise self._refuse(UsageError(
                "handshake() reads the peer's answers itself, but another task is receiving on this "
                "stream: the stream is failed, close it"
            ))
        try:
            with self._decoder.loading_plain():
                await self._exchange_challenges(initiator)
        except BaseException as exc:
            if not self._refused:
                self._refuse(exc if isinstance(exc, StreamPickleError) else AuthenticationError(
                    f"the handshake did not complete ({type(exc).__name__}), so the peer proved "
                    f"nothing: this stream delivers nothing more. Close it."
                ))
            raise

    async def _exchange_challenges(self, initiator: bool) -> None:
        role, other = _ROLES if initiator else _ROLES[::-1]
        mine = os.urandom(_CHALLENGE)
        await self.send((_HELLO, role, mine))
        hello = await self.receive()
        if (
            type(hello) is not tuple or tuple(map(type, hello)) != (str, str, bytes)
            or hello[0] != _HELLO or hello[1] not in _ROLES or len(hello[2]) != _CHALLENGE
        ):
            raise self._refuse(ProtocolError(
                f"the peer's first message is not a handshake: expected ({_HELLO!r}, a role, "
                f"{_CHALLENGE} bytes), got {_shape(hello)}. Both ends must call handshake() first "
                f"(a peer on a streampickle without it doesn't)"
            ))
        if hello[1] != other:
            raise self._refuse(AuthenticationError(
                f"the peer's handshake claims the role {hello[1]!r}, as this end does: either both ends "
                f"passed the same initiator=, or a handshake this process sent in that role on another "
                f"connection was relayed back to it"
            ))
        await self.send((_ANSWER, role, hello[2]))
        answer = await self.receive()
        expected = (_ANSWER, other, mine)
        if type(answer) is not tuple or tuple(map(type, answer)) != (str, str, bytes) or answer != expected:
            raise self._refuse(AuthenticationError(
                "the peer did not answer this connection's challenge: the session was recorded "
                "earlier and is being replayed, or relayed from another connection. Close the stream."
            ))

    @property
    def peer_sender(self) -> bytes | None:
        """With a key, the peer's 8-byte sender id, taken from its first authentic message and
        required of every later one; None before that message (and without a key). Once it
        is set, the peer has shown it holds the key (though not, before a
        :meth:`handshake`, that it is not replaying)."""
        return self._decoder.peer

    def _refuse(self, exc: StreamPickleError) -> StreamPickleError:
        """Fail the stream's receiving side with ``exc``: what the peer sent after is dropped,
        and every later ``receive`` raises it again, even once the peer has closed."""
        self._decoder.fail(exc, discard=True)
        self._refused = True
        return exc

    async def send_eof(self) -> None:
        """Close the sending direction (after queued sends); the peer's ``receive`` ends.
        With a key, the authenticated end of the stream goes first, so that the peer can tell
        this clean end from a cut connection."""
        await self._send_lock.acquire()
        try:
            self._check_send()
            await self._send_end()
            await self._t.send_eof()
        finally:
            self._send_lock.release()

    async def _send_end(self) -> None:
        if self._keyed and not self._end_sent:
            await self._write([self._encoder.encode_end()], None, report=False)  # no object: no progress
            self._end_sent = True

    async def aclose(self) -> None:
        """Close the stream and its transport. Blocked calls wake with
        ``anyio.ClosedResourceError``; closing twice is a no-op.

        With a key, a stream whose sending direction is idle and intact sends its
        authenticated end first (waiting at most ``_END_SECONDS`` for the peer to take it,
        even when cancelled), so that the peer sees a clean end rather than a cut."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        if self._keyed and not self._end_sent and self._send_broken is None and not self._send_lock.locked():
            with anyio.CancelScope(shield=True, deadline=anyio.current_time() + _END_SECONDS):
                await self._send_lock.acquire()
                try:
                    await self._send_end()
                except Exception:  # noqa: BLE001 - the peer is gone or the transport closed: close anyway
                    pass
                finally:
                    self._send_lock.release()
        self._closed = True
        if self._charge is not None:
            self._charge.close()  # before the transport: a read waiting for budget wakes too
        try:
            await self._t.aclose()
        finally:
            if self._shared_memory:
                self._decoder.close_descriptors()  # no message can claim them any more

    def abort(self) -> None:
        """Close the stream and its channel at once, without waiting and without a goodbye:
        for a ``Comm.abort`` or a ``finally`` that can't await. Blocked calls wake with
        ``anyio.ClosedResourceError``; the peer sees the connection end (inside a message,
        :class:`IncompleteMessageError`), and with a key it sees no authenticated end, as for
        a cut connection. Small messages a burst of sends left to be written with the next
        yield are dropped. Aborting a closed stream does nothing.

        Synchronous, so it needs a channel that can be closed without awaiting:
        streampickle's own sockets (``connect_*``, the listeners, :meth:`from_socket`),
        anyio Unix streams on asyncio and anyio socket streams on trio, and asyncio stream
        pairs. Other anyio streams (TLS, pipes, memory streams, anyio TCP on asyncio) raise
        :class:`UsageError`, and are left open: close them with :meth:`aclose`."""
        if self._closed:
            return
        try:
            if not self._t.abort():
                raise UsageError(
                    f"abort() closes a channel without awaiting, which a {type(self.transport_stream).__name__} "
                    f"can't do: use 'await stream.aclose()' (or streampickle's own sockets: connect_tcp, "
                    f"connect_unix, the listeners, ObjectStream.from_socket)"
                )
            self._closed = True
            if self._charge is not None:
                self._charge.close()
        finally:
            if self._closed and self._shared_memory:
                self._decoder.close_descriptors()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._t.extra_attributes

    def _set_cic(self) -> Callable[[], Awaitable[None]]:
        """The running backend's ``checkpoint_if_cancelled``, looked up once per event loop:
        a stream used under trio and then under asyncio (two ``anyio.run`` calls) would
        otherwise call trio's in asyncio. The check that the loop is the same one costs a C
        call per use; the lookup, several Python calls."""
        self._cic_loop = _running_loop()
        self._cic = checkpoint_if_cancelled()
        return self._cic

    def _check_send(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._send_broken is not None:
            raise anyio.BrokenResourceError(
                "an earlier send was interrupted after part of its message was written, so "
                "the peer can't find the next message boundary: close this stream"
            ) from self._send_broken


def _shape(obj: Any) -> str:
    """A short description of a peer's object for an error (no repr: the peer chose it)."""
    if type(obj) is not tuple:
        return f"a {type(obj).__name__}"
    types = ", ".join(type(item).__name__ for item in obj[:4])
    return f"a tuple of {len(obj)} ({types}{', ...' if len(obj) > 4 else ''})"


async def dump(
    obj: Any,
    stream: Any,
    *,
    key: bytes | Key | None = None,
    pickler_class: type[pickle.Pickler] | None = None,
    dispatch_table: Mapping[type, Callable[[Any], Any]] | None = None,
    persistent_id: Callable[[Any], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> None:
    """Send one message carrying ``obj`` on an anyio byte stream or ``asyncio.StreamWriter``
    (pickle's hooks ``pickler_class``, ``dispatch_table``, ``persistent_id``: see :class:`Encoder`;
    ``progress``: see :class:`ObjectStream`, this is message 0).

    If pickling fails, :class:`EncodeError` is raised and nothing is written. If the call is
    cancelled after its first byte went out, the stream holds part of a message: close it.
    With a key, the message stands alone (as from ``dumps``): for replay protection, use an
    :class:`ObjectStream` on both ends.
    """
    encoder = Encoder(key=key, stream=False, pickler_class=pickler_class, dispatch_table=dispatch_table,
                      persistent_id=persistent_id)
    chunks, mac = encoder.encode_unsigned(obj)
    await anyio.lowlevel.checkpoint_if_cancelled()
    if progress is None:
        await send_message(fastest_transport(stream), chunks, mac)
        return
    meter = SendMeter(progress)
    total = _message_size(chunks, mac)
    meter.begin(total)
    await _send_reporting(fastest_transport(stream), chunks, mac, meter, total)
    meter.end(total)


def _message_size(chunks: list[Any], mac: Any) -> int:
    """The bytes of a message on the wire: its chunks, and the tag sent after them."""
    size = sum(c.nbytes if isinstance(c, memoryview) else len(c) for c in chunks)
    return size + TAG_SIZE if mac is not None else size


async def _send_reporting(transport: Transport, chunks: list[Any], mac: Any, meter: SendMeter, total: int) -> None:
    """``send_message`` in groups of one reporting step, reporting after each but the last
    (the caller reports the end). A message carrying descriptors goes whole: they must go
    with its first byte, and its bytes on the wire are few."""
    if _shm.descriptors_of(chunks):
        await send_message(transport, chunks, mac)
        return
    done = 0
    for group in groups(chunks, step_for(total)):
        if mac is None:
            await transport.send_chunks(group)
        else:
            for piece in slices(group):
                mac.update(piece)
                await transport.send_chunks([piece])
        done += _message_size(group, None)
        if done < total:
            meter.step(done, total)
    if mac is not None:
        await transport.send_chunks([mac.digest()])


async def _fill(
    transport: Transport,
    decoder: Decoder,
    started: float | None,
    *,
    exact: bool,
    charge: Charge | None = None,
    cap: int | None = None,
    feed: Feed | None = None,
) -> tuple[bool, float | None]:
    """``transport.fill(decoder)`` under the deadlines of the message in progress, if one is.
    ``cap``: read at most that many bytes (a progress report is due there); ``feed``: see
    ``Transport.fill``.

    ``started`` is when that message's first byte arrived (None between messages); returns
    ``fill``'s result and the new ``started``. A read that passes a deadline is cancelled (it
    took no bytes), the decoder is failed, which frees what arrived and poisons it, and
    :class:`DeadlineExceededError` is raised. With a ``charge`` (the stream has a budget), see
    ``_fill_charged``.
    """
    if charge is not None:
        if charge.held or decoder.in_message:
            return await _fill_charged(transport, decoder, started, exact, charge, cap, feed)
        # Between messages, holding nothing: a read of at most the free allowance needs no
        # budget and leaves nothing to charge (a burst of small messages stays this cheap).
        allowed = ALLOWANCE if cap is None else min(cap, ALLOWANCE)
        return await transport.fill(decoder, exact=exact, limit=allowed, feed=feed), _started(decoder, started)
    limit, deadline = _deadline(decoder, started)
    if deadline is None:
        more = await transport.fill(decoder, exact=exact, limit=cap, feed=feed)
    else:
        with anyio.CancelScope(deadline=deadline) as scope:
            more = await transport.fill(decoder, exact=exact, limit=cap, feed=feed)
        if scope.cancelled_caught:
            raise _late(decoder, limit)
    return more, _started(decoder, started)


def _started(decoder: Decoder, started: float | None) -> float | None:
    """When the message in progress after a read started: None between messages."""
    if not decoder.in_message:
        return None
    if started is None or decoder.pending:  # this read began the message (maybe after others)
        return anyio.current_time()
    return started


async def _fill_charged(
    transport: Transport,
    decoder: Decoder,
    started: float | None,
    exact: bool,
    charge: Charge,
    cap: int | None = None,
    feed: Feed | None = None,
) -> tuple[bool, float | None]:
    """``_fill`` for a stream under a :class:`MemoryBudget`: the read first gets budget for
    what it could bring (waiting for it, under the same deadlines, if the message is past its
    free allowance) and is capped to what it got; afterwards, and however it ends, the charge
    is trimmed to what the decoder still holds of an incomplete message."""
    limit, deadline = _deadline(decoder, started)
    try:
        with anyio.CancelScope() if deadline is None else anyio.CancelScope(deadline=deadline) as scope:
            want = len(decoder.get_buffer())
            if not exact:
                want = max(want, READ_AHEAD)
            if cap is not None:
                want = min(want, cap)
            # in memory committed, not bytes: a huge page counts whole from its first byte
            received = decoder.committed
            commit = decoder.commit_for(want)
            if (
                commit > ALLOWANCE - received + charge.held
                and charge.budget.waiting
            ):
                await transport.wait_readable()  # budget is short: take it only for bytes that are there
            grant = await charge.grant(received, commit, decoder.commit_for(1))
            within = None if grant is None else decoder.readable_within(grant)
            if cap is not None:
                within = cap if within is None else min(within, cap)
            more = await transport.fill(decoder, exact=exact, limit=within, feed=feed)
        if scope.cancelled_caught:
            raise _late(decoder, limit)
    finally:
        charge.trim(0 if decoder.failed else decoder.committed)
    return more, _started(decoder, started)


def _deadline(decoder: Decoder, started: float | None) -> tuple[str, float | None]:
    """The limit that ends first for the message in progress, and when (None: no deadline)."""
    if started is None or not decoder.in_message:
        return "", None
    limits = decoder.options.limits
    limit, deadline = "", None
    if decoder.in_header and limits.max_header_seconds is not None:
        limit, deadline = "max_header_seconds", started + limits.max_header_seconds
    elif decoder.holds_descriptors and limits.max_header_seconds is not None:
        # A message holding a peer's descriptors holds a share of a process-wide cap: a peer
        # that stalls there would keep every other connection from shared memory. It gets
        # the header's time, and more as its bytes arrive (its ordinary arrays travel inline).
        received = decoder.progress[0]
        limit, deadline = "max_header_seconds", started + limits.max_header_seconds + received / SHARED_MIN_RATE
    if limits.max_message_seconds is not None:
        end = started + limits.max_message_seconds
        if deadline is None or end < deadline:
            limit, deadline = "max_message_seconds", end
    return limit, deadline


#: Bytes per second a message holding a peer's descriptors must average, after the header's
#: time, to keep them: 64 MiB/s, a small fraction of what a Unix socket carries on one host,
#: so only a peer that stalls (or trickles) with descriptors held is cut before its end.
SHARED_MIN_RATE = 64 << 20


def _late(decoder: Decoder, limit: str) -> DeadlineExceededError:
    seconds = getattr(decoder.options.limits, limit)
    received, expected = decoder.progress
    part, more = "message", ""
    if limit == "max_header_seconds":
        if decoder.in_header:
            part = "header"
        else:
            part = "message, which holds descriptors it sent,"
            more = f" and a second per {SHARED_MIN_RATE >> 20} MiB of it that arrived"
    exc = DeadlineExceededError(
        f"the peer's {part} did not arrive within Limits.{limit}={seconds} s of its first "
        f"byte{more} ({received} of the {expected} bytes known so far had arrived); the message "
        f"was dropped and the stream can't be used again. A stalled or hostile peer does "
        f"this; if the link is just slow, raise it with limits=Limits({limit}=...).",
        limit=limit, seconds=seconds, received=received, expected=expected,
    )
    decoder.fail(exc)
    return exc


# Decoders of messages whose load() was interrupted, parked until the next load() on the
# same stream, with when their message started, so that cancelling a load loses nothing.
_parked: weakref.WeakKeyDictionary[Any, tuple[Options, Decoder, float | None]] = (
    weakref.WeakKeyDictionary()
)


async def load(
    stream: Any,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
    budget: MemoryBudget | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> Any:
    """Receive exactly one message from an anyio byte stream or ``asyncio.StreamReader``
    (``persistent_load``: see :class:`Decoder`; ``progress``: see :class:`ObjectStream`, this
    is message 0; a message resumed after an interrupted ``load`` reports its first event again).

    Never reads a byte beyond the message, so consecutive calls each get theirs and what
    follows stays in the stream. ``EOFError`` at a clean end between messages;
    :class:`IncompleteMessageError` if the stream ends inside one;
    :class:`DeadlineExceededError` if a started message outlasts ``limits``' deadlines (its
    bytes are lost, so close the stream). ``budget``: a :class:`MemoryBudget` shared with other
    streams; this call's charge goes back when it returns or raises.
    """
    options = options_for(trusted, allow, key, limits, persistent_load)  # a generator given as allow is read here, once
    charge = Charge(budget) if budget is not None else None
    parked = _parked.pop(stream, None) if _parkable(stream) else None
    started: float | None = None
    if parked is not None and _same(parked[0], options):
        decoder, started = parked[1], parked[2]
    else:
        decoder = Decoder(options=options, stream=False)
    decoder.budgeted = charge is not None
    transport = _transport_for(stream)
    meter = ReceiveMeter(progress) if progress is not None else None
    try:
        while not decoder.pending:
            if meter is None:
                more, started = await _fill(transport, decoder, started, exact=True, charge=charge)
            else:
                expected = decoder.progress[1]
                more, started = await _fill(
                    transport, decoder, started, exact=True, charge=charge, cap=meter.limit(decoder)
                )
                meter.after(decoder, expected, decoder.pending > 0)
            if not more:
                raise EOFError("the stream ended before a message started")
            if decoder.ended and not decoder.pending:
                raise EOFError("the peer ended the stream (its authenticated end of stream)")
    except BaseException:
        # A cancellation can land after the read that completed the message: park that one
        # too, or its bytes, already taken from the stream, would be lost.
        if (decoder.in_message or decoder.pending) and not decoder.failed and _parkable(stream):
            _parked[stream] = (options, decoder, started)
        raise
    finally:
        if charge is not None:
            charge.trim(0)  # a parked message is not charged until a load resumes it
    return next(decoder)


def _transport_for(stream: Any) -> Transport:
    """``fastest_transport``, with a stream of the wrong type refused as the caller's mistake."""
    try:
        return fastest_transport(stream)
    except TypeError as exc:
        raise UsageError(str(exc)) from exc


def _parkable(obj: Any) -> bool:
    """Whether ``obj`` can key ``_parked``: weakly referenced and hashable."""
    try:
        weakref.ref(obj)
        hash(obj)
    except Exception:  # noqa: BLE001 - TypeError: no weak references, or unhashable; or a failing __hash__
        return False
    return True


def _same(parked: Options, options: Options) -> bool:
    """Whether a parked decoder's options are ``options``. Options whose ``==`` raises (a
    numpy array as key) are not the same: the new decoder then judges them."""
    try:
        return bool(parked == options)
    except Exception:  # noqa: BLE001 - whatever a key's == raises, the new decoder judges it
        return False
