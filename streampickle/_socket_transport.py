"""The zero-copy transport: a connected non-blocking socket that streampickle drives itself
(see ``_transport_api.Transport`` for the contract).

On trio it waits with ``wait_readable``/``wait_writable`` (``_anyio_compat``). On asyncio and
uvloop every read that waits is done by one reader callback, registered for the wait, and a
send the kernel has no room for goes on from a writer callback. Side chunks go from the
caller's memory to the kernel with ``sendmsg`` and from the kernel into their final
destination with ``recv_into``: no userspace copy either way. Small parts are read ahead into
scratch memory and fed to the decoder, so a burst of small messages costs one read. On asyncio
and uvloop the small messages of a burst of sends are written together (``send_later``). It
counts exactly the bytes the kernel took (``exact_send_accounting = True``).

With ``shared_memory=True`` (a Unix socket whose both ends opted in, see ``_shm``) descriptors
travel beside the bytes. Every read that can return a message's first byte is a
``recvmsg_into`` with room for a message's worth of descriptors: a plain ``recv_into`` would
make the kernel close any that came (reads inside a message are plain: ``_fdpass.receive_into``).
What a read brings is handed to the decoder before its bytes (``Decoder.feed_descriptors``), in
the same synchronous step, so a cancelled fill still loses nothing. A message's descriptors go with the
first ``sendmsg`` that sends any of its bytes, which is where the receiver finds them. Without
``shared_memory`` none of this runs: reads and sends are the plain ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import socket
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import SocketAttribute

from . import _fdpass, _shm
from ._anyio_compat import notify_closing, trio_token, wait_readable, wait_writable
from ._decoder import Decoder
from ._encoder import IOV_MAX, Chunk, drop_sent, sendable
from ._errors import LimitExceededError
from ._transport_api import READ_AHEAD, Feed

__all__ = [
    "COALESCE_BYTES",
    "DIRECT_READ",
    "NO_SIGNAL",
    "SOCKET_BUFFER",
    "SocketTransport",
    "grow_socket_buffers",
    "socket_attributes",
]

# Parts at least this large are read straight into their destination on raw sockets.
DIRECT_READ = 64 * 1024
# Send flags: a write to a peer that is gone fails with EPIPE instead of raising SIGPIPE, which
# kills a process that set it back to its default (Python ignores it; many tools restore it).
# Where there is no MSG_NOSIGNAL (macOS), SO_NOSIGPIPE on the socket does the same.
NO_SIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
# At most this many bytes of small messages wait to be written together (see send_later); a
# send that finds this much waiting goes the ordinary way, behind it.
COALESCE_BYTES = 64 * 1024
# Unix socket buffers streampickle asks for (the kernel caps them at net.core.wmem_max and
# rmem_max). Larger ones mean fewer event-loop wake-ups per array: 4 MiB instead of the default
# ~200 KiB made big arrays move 2.5x as fast here. TCP sockets are left to the kernel's
# autotuning, which did better than any fixed size (see _sockets).
SOCKET_BUFFER = 4 << 20


def grow_socket_buffers(sock: socket.socket) -> None:
    """Ask for ``SOCKET_BUFFER``-sized send and receive buffers, never shrinking them."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, option) < SOCKET_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


class SocketTransport:
    """A connected stream socket that streampickle drives itself, zero-copy both ways."""

    exact_send_accounting = True

    def __init__(self, sock: socket.socket, *, owner: Any = None, shared_memory: bool = False) -> None:
        sock.setblocking(False)
        if not NO_SIGNAL and hasattr(socket, "SO_NOSIGPIPE"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_NOSIGPIPE, 1)
        self.sock = sock
        self.sent = 0
        self._closed = False
        self._owner = owner  # an anyio stream whose socket this is: closed through it
        # Descriptors travel with the bytes (see the module docstring); the caller checked
        # that this is a Unix socket and that the decoder fed takes descriptors.
        self._shared = shared_memory
        # Read-ahead space, made on first use: dump() and load(), which build a transport per
        # call, never read ahead.
        self._scratch: memoryview | None = None
        # Whether the running loop takes reader and writer callbacks (asyncio, uvloop; not
        # trio), known after the first use.
        self._loop_callbacks: bool | None = None
        # The reader callback's registration (loop, descriptor) and the current wait's step
        # and future (see _await_reader).
        self._armed: tuple[asyncio.AbstractEventLoop, int] | None = None
        self._read_step: Callable[[], None] | None = None
        self._read_done: asyncio.Future[bool] | None = None
        # On trio: how many tasks wait on the socket, and the token of the run they wait in.
        self._trio_waiting = 0
        self._trio: Any = None
        self._writer: tuple[asyncio.AbstractEventLoop, int, asyncio.Future[None]] | None = None  # a send's
        # Small messages that send_later took and the kernel doesn't have yet, in order; the
        # loop whose writer callback is writing them (set while the kernel has no room); tasks
        # waiting for them to be written; and the error that writing them ended with.
        self._later: list[Chunk] = []
        self._later_size = 0
        self._later_writer: asyncio.AbstractEventLoop | None = None
        self._later_waiters: list[asyncio.Future[None]] = []
        self._later_error: OSError | None = None

    def send_later(self, chunk: Chunk) -> bool:
        """Take one small whole message to write together with the others that the sending
        task sends before it next yields to the event loop, in one system call, as soon as it
        does. False (nothing taken) where the message must go the ordinary way: on a loop
        without callbacks (trio), behind ``COALESCE_BYTES`` already waiting, or after such a
        write failed.

        Why: a burst of small messages costs one ``send()`` each, and the system call is most
        of a small message's cost on both ends (it also wakes the receiver each time). uvloop
        coalesces its transports' writes per loop iteration the same way.

        The message counts as sent: it goes out before any later one, and closing the stream
        writes it first (``aclose``). If writing it fails, the next send raises.
        """
        later = self._later
        if later:  # a write is already scheduled, or waiting for room in the kernel
            if self._later_size >= COALESCE_BYTES:
                return False
        else:
            if self._later_error is not None or self._closed:
                return False
            loop = self._loop_taking_callbacks()
            if loop is None:
                return False
            loop.call_soon(self._write_later, loop)
        later.append(chunk)
        self._later_size += len(chunk)
        return True

    def _write_later(self, loop: asyncio.AbstractEventLoop) -> None:
        """Loop callback: write what ``send_later`` took, as far as the kernel takes it, and the
        rest each time the socket is writable again."""
        later = self._later
        if not later:  # closed meanwhile
            return
        try:
            n = self.sock.sendmsg(later[:IOV_MAX], (), NO_SIGNAL)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._later_error = exc
            self._drop_later(closed=False)
            return
        self._later_size -= n
        drop_sent(later, n)
        if not later:
            self._drop_later(closed=False)
        elif self._later_writer is None:
            loop.add_writer(self.sock.fileno(), self._write_later, loop)
            self._later_writer = loop

    def _drop_later(self, *, closed: bool) -> None:
        """Forget what ``send_later`` took (all of it is written, or it never will be) and
        wake the tasks waiting for it (see ``_wake_later_waiters``)."""
        self._later.clear()
        self._later_size = 0
        if self._later_writer is not None:
            self._later_writer.remove_writer(self.sock.fileno())
            self._later_writer = None
        self._wake_later_waiters(closed=closed)

    def _wake_later_waiters(self, *, closed: bool) -> None:
        """Wake the tasks waiting in ``_written_later``: with ``ClosedResourceError`` if the
        stream is closing, else to look again."""
        waiters, self._later_waiters = self._later_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if closed:
                    waiter.set_exception(anyio.ClosedResourceError())
                else:
                    waiter.set_result(None)

    async def _written_later(self) -> None:
        """Wait until every message ``send_later`` took is written; ``BrokenResourceError`` if
        that failed. Cancelling the wait loses nothing: the loop callback goes on writing."""
        while self._later:
            waiter = asyncio.get_running_loop().create_future()
            self._later_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._later_waiters:
                    self._later_waiters.remove(waiter)
        if self._later_error is not None:
            raise anyio.BrokenResourceError(f"sending failed: {self._later_error}") from self._later_error

    async def send_chunks(self, chunks: list[Chunk]) -> None:
        self._check_open()
        if self._later or self._later_error is not None:
            await self._written_later()  # the messages ahead of this one go first
        if self._shared:
            fds = _shm.descriptors_of(chunks)
            if fds:
                await self._send_sharing(chunks, fds)
                return
        sock = self.sock
        if len(chunks) == 1:  # a small message: one send() and, usually, done
            chunk = chunks[0]
            try:
                n = sock.send(chunk, NO_SIGNAL)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise anyio.BrokenResourceError(f"sending failed: {exc}") from exc
            self.sent += n
            if n == len(chunk):
                return
            chunks = [memoryview(chunk)[n:]]
        await self._send_views(sendable(chunks), [])

    async def _send_sharing(self, chunks: list[Chunk], fds: tuple[int, ...]) -> None:
        """``send_chunks`` for a message carrying descriptors: they go with the first
        ``sendmsg`` that sends any of its bytes, since the receiver takes a message's
        descriptors from the read that brings its first byte. A ``sendmsg`` that raises
        ``BlockingIOError`` sent nothing, descriptors included, so the next try carries them
        again."""
        await self._send_views(sendable(chunks), _fdpass.ancillary(fds))

    async def _send_views(self, views: list[Any], ancillary: list[tuple[int, int, bytes]]) -> None:
        """Send ``views`` whole (``ancillary`` with the first ``sendmsg`` that sends a byte).
        When the kernel has no room, the rest goes from a writer callback on loops that take
        one (see ``_send_from_writer``), else after each wait for room."""
        sock = self.sock
        while views:
            try:
                n = sock.sendmsg(views[:IOV_MAX], ancillary, NO_SIGNAL)
            except BlockingIOError:
                loop = self._loop_taking_callbacks()
                if loop is not None:
                    await self._send_from_writer(loop, views, ancillary)
                    return
                await self._wait_elsewhere(wait_writable)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError(f"sending failed: {exc}") from exc
            if n:
                ancillary = []
            self.sent += n
            drop_sent(views, n)

    async def _send_from_writer(
        self, loop: asyncio.AbstractEventLoop, views: list[Any], ancillary: list[tuple[int, int, bytes]]
    ) -> None:
        """The rest of ``_send_views`` from a writer callback: the send side's
        ``_fill_from_reader``. One registration serves the whole message; each time the
        kernel has room, the callback writes as much as it takes, and the sending task runs
        again only when all of it is written. A wait per write, as ``anyio.wait_writable``
        does it, costs a writer registration, a removal and a task switch each time: a 256 MiB
        array over TCP took about 140 of them. ``sent`` counts every byte as it goes, so a
        cancelled send knows how much of its message left (the stream's send side breaks)."""
        sock = self.sock
        fd = sock.fileno()
        done: asyncio.Future[None] = loop.create_future()

        def on_writable() -> None:
            nonlocal ancillary
            if done.done():  # cancelled; the waiter removes the writer when it runs
                return
            try:
                while views:
                    n = sock.sendmsg(views[:IOV_MAX], ancillary, NO_SIGNAL)
                    if n:
                        ancillary = []
                    self.sent += n
                    drop_sent(views, n)
            except BlockingIOError:
                return  # no room left: the next wake-up goes on
            except OSError as exc:
                self._drop_writer()
                broken = anyio.BrokenResourceError(f"sending failed: {exc}")
                broken.__cause__ = exc
                done.set_exception(broken)
                return
            self._drop_writer()
            done.set_result(None)

        loop.add_writer(fd, on_writable)
        self._writer = (loop, fd, done)
        try:
            await done
        finally:
            if self._writer is not None and self._writer[2] is done:  # cancelled: stop writing
                self._drop_writer()

    def _drop_writer(self) -> None:
        if self._writer is not None:
            loop, fd, _ = self._writer
            self._writer = None
            loop.remove_writer(fd)


    async def fill(
        self, decoder: Decoder, *, exact: bool, limit: int | None = None, feed: Feed | None = None
    ) -> bool:
        self._check_open()
        view = decoder.get_buffer()
        if limit is not None:
            view = view[:limit]
        direct = feed is None and (exact or len(view) >= DIRECT_READ)  # a feed takes bytes read ahead
        if direct:
            target = view
        else:
            if self._scratch is None:
                # An anonymous mapping, not a bytearray (which zero-fills every page): only the
                # pages reads actually reach become memory, so a server's thousand idle
                # connections don't hold 256 KiB each.
                try:
                    self._scratch = memoryview(mmap.mmap(-1, READ_AHEAD))
                except OSError as exc:  # ENOMEM: out of memory, or of map entries (vm.max_map_count)
                    raise LimitExceededError(
                        f"could not map {READ_AHEAD} bytes to read into: the system refused ({exc}). "
                        f"The process is out of memory or of memory mappings; the connection can't "
                        f"be read until some are freed."
                    ) from exc
            target = self._scratch if limit is None else self._scratch[:limit]
        while True:
            try:
                if self._shared:
                    n = _fdpass.receive_into(self.sock, target, decoder, bounded=direct)
                else:
                    n = self.sock.recv_into(target)
                break
            except BlockingIOError:
                loop = self._loop_taking_callbacks()
                if loop is not None and feed is None:
                    return await self._fill_from_reader(loop, decoder, target, whole=direct)
                if loop is not None:  # the feed runs in the task: wait, then read there
                    await self._wait_from_reader(loop)
                else:
                    await self._wait_elsewhere(wait_readable)
            except OSError as exc:
                raise anyio.BrokenResourceError(f"receiving failed: {exc}") from exc
        if n == 0:
            decoder.feed_eof()
            return False
        if direct:
            decoder.buffer_updated(n)
        else:
            (decoder.feed if feed is None else feed)(target[:n])
        return True

    async def wait_readable(self) -> None:
        """Wait until the socket has bytes to read (or its end, or an error)."""
        self._check_open()
        loop = self._loop_taking_callbacks()
        if loop is not None:
            await self._wait_from_reader(loop)
        else:
            await self._wait_elsewhere(wait_readable)

    async def _wait_elsewhere(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        """``wait`` for the socket on a loop without callbacks (trio), noting trio's token
        meanwhile, so that an ``abort`` from another thread can hand the close to trio.
        ``ClosedResourceError`` if the transport was closed meanwhile."""
        token = trio_token()
        self._trio_waiting += token is not None
        try:
            if token is not None:
                self._trio = token
            await wait(self.sock)
        finally:
            self._trio_waiting -= token is not None
        self._check_open()  # aborted from another thread: the shutdown ended the wait

    def _loop_taking_callbacks(self) -> asyncio.AbstractEventLoop | None:
        """The running asyncio loop if it takes reader and writer callbacks: the selector loop
        and uvloop do; trio and the Windows proactor loop don't."""
        if self._loop_callbacks is False:
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio
            self._loop_callbacks = False
            return None
        if self._loop_callbacks is None:
            self._loop_callbacks = type(loop).add_reader is not asyncio.AbstractEventLoop.add_reader
        return loop if self._loop_callbacks else None

    async def _fill_from_reader(
        self, loop: asyncio.AbstractEventLoop, decoder: Decoder, target: memoryview, *, whole: bool
    ) -> bool:
        """Fill ``target`` from the reader callback: with ``whole``, all of it (the rest of
        the current part, read straight into its destination); else one read's worth (read
        ahead into scratch memory, then fed to the decoder).

        The callback reads what each wake-up brings and hands it to the decoder at once; the
        waiting task runs again only when the fill is done. A wait per read, as
        ``anyio.wait_readable`` does it, costs a reader registration, a removal and a task
        switch each time: a 512 MiB array over TCP takes about 450 of them. The decoder counts
        every byte as it lands, so a cancelled fill loses nothing.
        """
        sock = self.sock
        shared = self._shared
        done: asyncio.Future[bool] = loop.create_future()
        pos = 0

        def step() -> None:
            nonlocal pos
            try:
                if shared:
                    n = _fdpass.receive_into(sock, target[pos:], decoder, bounded=whole)
                else:
                    n = sock.recv_into(target[pos:])
            except BlockingIOError:
                return
            except OSError as exc:
                self._read_ends(done, anyio.BrokenResourceError(f"receiving failed: {exc}"))
                return
            except Exception as exc:  # noqa: BLE001 - the decoder refused descriptors: handed to the waiting task
                self._read_ends(done, exc)
                return
            try:
                if n == 0:
                    self._read_ends(done, False)
                elif whole:
                    pos += n
                    decoder.buffer_updated(n)
                    if pos == len(target):
                        self._read_ends(done, True)
                else:
                    decoder.feed(target[:n])
                    self._read_ends(done, True)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting task, which raises it
                self._read_ends(done, exc)

        if not await self._await_reader(loop, step, done):
            decoder.feed_eof()
            return False
        return True

    async def _wait_from_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for the socket to be readable on the reader callback, reading nothing.
        ``ClosedResourceError`` if the transport was closed meanwhile."""
        done: asyncio.Future[bool] = loop.create_future()
        await self._await_reader(loop, lambda: self._read_ends(done, True), done)
        self._check_open()

    async def _await_reader(
        self, loop: asyncio.AbstractEventLoop, step: Callable[[], None], done: asyncio.Future[bool]
    ) -> bool:
        """Run ``step`` on each wake-up of the reader callback until it completes ``done``
        (through ``_read_ends``), and return its result.

        The reader is registered for the wait and removed as it ends. Keeping it registered
        between receives saved two ``epoll_ctl`` calls a message, but a registration that
        outlives the wait is one the transport can't keep true: the socket may be closed, or
        read, or its registration replaced by someone else (anyio's own waits, another stream
        on the socket, a forked child closing its copy), and a loop keeps a registration for
        a closed descriptor and gives it to the next socket with the same number."""
        self._arm(loop)
        self._read_step = step
        self._read_done = done
        try:
            return await done
        finally:
            if self._read_done is done:  # cancelled
                self._read_step = self._read_done = None
            self._disarm()

    def _read_ends(self, done: asyncio.Future[bool], result: bool | BaseException) -> None:
        """The reader callback's step completes the current wait with ``result``."""
        self._read_step = self._read_done = None
        if done.done():
            return
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)

    def _on_readable(self) -> None:
        step = self._read_step
        if step is None or self._read_done is None or self._read_done.done():
            self._read_step = self._read_done = None
            self._disarm()
            return
        step()

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register the reader callback on ``loop`` for a wait. The loop holds the transport
        weakly, so a stream dropped while it waits can still go.

        A loop keeps one reader per descriptor, and registering another replaces it. So a
        second transport waiting on the same socket (two streams over one socket) is refused
        with ``anyio.BusyResourceError``, as anyio refuses a second waiter, instead of
        leaving the first waiting for a callback that no longer comes."""
        self._disarm()
        fd = self.sock.fileno()
        key = (id(loop), fd)
        other = _readers.get(key)
        if other is not None and other._armed == (loop, fd):
            if other._read_done is not None and not other._read_done.done():
                raise anyio.BusyResourceError("reading from")
            other._armed = None  # its registration is about to be replaced by ours
        loop.add_reader(fd, _readable, weakref.ref(self))
        _readers[key] = self
        self._armed = (loop, fd)

    def _disarm(self) -> None:
        if self._armed is not None:
            loop, fd = self._armed
            self._armed = None
            if _readers.get((id(loop), fd)) is self:
                del _readers[(id(loop), fd)]
            loop.remove_reader(fd)

    def __del__(self) -> None:
        # A stream dropped without closing: its socket is about to close, and a registration
        # the loop keeps for a closed descriptor would be taken by the next socket given the
        # same number.
        if getattr(self, "_armed", None) is not None:
            with contextlib.suppress(Exception):
                self._disarm()

    def _wake_reader(self) -> None:
        """Fail a fill waiting on the reader callback, and a send waiting on a writer callback,
        with ``ClosedResourceError`` (the stream is being closed), as ``anyio.notify_closing``
        does for anyio's own waits, and remove the reader."""
        waiting = self._read_done
        self._read_step = self._read_done = None
        self._disarm()
        if waiting is not None and not waiting.done():
            waiting.set_exception(anyio.ClosedResourceError())
        if self._writer is not None:
            sending = self._writer[2]
            self._drop_writer()
            if not sending.done():
                sending.set_exception(anyio.ClosedResourceError())

    async def send_eof(self) -> None:
        self._check_open()
        if self._later:
            await self._written_later()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already: its reads have ended
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Wake every blocked call with ``ClosedResourceError``, write the messages that
        ``send_later`` took (waiting for the peer to make room, if it must: cancel the close to
        drop them), and close. Closing again does nothing."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        self._wake_later_waiters(closed=True)  # sends waiting behind them never started
        self._wake_reader()
        try:
            if self._later:
                await self._written_later()
        except anyio.BrokenResourceError:
            pass  # the peer is gone: nothing left to write to
        finally:
            self._drop_later(closed=True)
            await self._close()

    def abort(self) -> bool:
        """``aclose`` without writing what ``send_later`` took, and without awaiting: a socket
        under an anyio stream is closed directly (its stream is never awaited again).

        Called from another thread than the one whose asyncio loop has a task waiting on the
        socket (or a callback writing to it), it shuts the socket down at once, so the peer
        sees the end, and leaves the rest to that loop: its futures and registrations are
        only its own to touch, and closing the socket under its registrations would leave
        them to the next socket given the number."""
        loop = self._loop_waiting()
        if loop is not None:
            try:
                here = asyncio.get_running_loop() is loop
            except RuntimeError:
                here = False
            if not here and loop.is_running():
                self._shut_down()
                with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing waits any more
                    loop.call_soon_threadsafe(self._abort_here)
                    return True
        elif self._trio_waiting and self._trio is not None and trio_token() is not self._trio:
            self._shut_down()
            with contextlib.suppress(RuntimeError):  # trio's run ended meanwhile
                self._trio.run_sync_soon(self._abort_here)
                return True
        self._abort_here()
        return True

    def _shut_down(self) -> None:
        """Refuse new calls, and end the connection for the peer now."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _loop_waiting(self) -> asyncio.AbstractEventLoop | None:
        """The asyncio loop with a task waiting on the socket or a callback registered for it."""
        if self._armed is not None:
            return self._armed[0]
        if self._writer is not None:
            return self._writer[0]
        if self._later_writer is not None:
            return self._later_writer
        if self._later_waiters:
            return self._later_waiters[0].get_loop()
        return None

    def _abort_here(self) -> None:
        self._closed = True
        self._wake_later_waiters(closed=True)
        self._wake_reader()
        self._drop_later(closed=True)
        if self.sock.fileno() >= 0:
            notify_closing(self.sock)
            self.sock.close()

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError

    async def _close(self) -> None:
        if self._owner is not None:
            # Wake our own waiters first: anyio's asyncio Unix stream only wakes its own.
            if self.sock.fileno() >= 0:
                notify_closing(self.sock)
            await self._owner.aclose()
            return
        if self.sock.fileno() >= 0:
            notify_closing(self.sock)
            self.sock.close()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        if self._owner is not None:
            attributes: Mapping[Any, Callable[[], Any]] = self._owner.extra_attributes
            return attributes
        return socket_attributes(self.sock)


# The transport whose reader callback each (loop, descriptor) holds: see SocketTransport._arm.
_readers: weakref.WeakValueDictionary[tuple[int, int], SocketTransport] = weakref.WeakValueDictionary()


def _readable(ref: weakref.ref[SocketTransport]) -> None:
    """The reader callback: the loop holds the transport through ``ref`` only."""
    transport = ref()
    if transport is not None:
        transport._on_readable()


def socket_attributes(sock: socket.socket) -> dict[Any, Callable[[], Any]]:
    """anyio's ``SocketAttribute``s of a socket (the remote ones only if it is connected)."""
    attrs: dict[Any, Callable[[], Any]] = {
        SocketAttribute.raw_socket: lambda: sock,
        SocketAttribute.family: lambda: sock.family,
        SocketAttribute.local_address: lambda: sock.getsockname(),
    }
    try:
        sock.getpeername()
    except OSError:
        connected = False
    else:
        connected = True
        attrs[SocketAttribute.remote_address] = lambda: sock.getpeername()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        attrs[SocketAttribute.local_port] = lambda: sock.getsockname()[1]
        if connected:
            attrs[SocketAttribute.remote_port] = lambda: sock.getpeername()[1]
    return attrs
