"""Sockets that streampickle owns: connect and listen helpers for the zero-copy path.

anyio's own socket streams on asyncio hand their socket to an asyncio transport, which copies
whatever the kernel does not take at once; these helpers make plain non-blocking sockets and
drive them with ``wait_readable``/``wait_writable`` (``_anyio_compat``) on any backend
(asyncio, uvloop, trio), so array memory goes to and from the kernel without a userspace copy.

Unix socket buffers are raised to 4 MiB where the system allows: with the default ~200 KiB a
multi-GiB transfer spends its time in wakeups (measured with benchmarks/run.py). TCP sockets
keep the kernel's buffer autotuning, which moved large arrays 10-25% faster than fixed 4 MiB
buffers over loopback here (setting a size switches autotuning off).
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import Listener, TaskGroup

from ._anyio_compat import notify_closing, wait_readable, wait_writable
from ._budget import MemoryBudget, check_budget, default_budget_bytes
from ._limits import Limits
from ._mac import Key
from ._progress import ProgressCallback
from ._serve import note_accepted
from ._serve import serve as _serve
from ._shm import check_no_key
from ._stream import ObjectStream
from ._transports import grow_socket_buffers, socket_attributes

__all__ = ["ObjectStreamListener", "connect_tcp", "connect_unix", "create_tcp_listener", "create_unix_listener"]


class _PerListener:
    """The default ``budget`` of a listener: a new :class:`MemoryBudget` of its own."""

    def __repr__(self) -> str:
        return "<a MemoryBudget of half the physical memory, per listener>"


PER_LISTENER: Any = _PerListener()


def _listener_budget(budget: Any) -> MemoryBudget | None:
    if budget is PER_LISTENER:
        return MemoryBudget(default_budget_bytes())
    return None if budget is None else check_budget(budget)


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family == socket.AF_UNIX:
        grow_socket_buffers(sock)
    elif sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _connect(sock: socket.socket, address: Any) -> None:
    try:
        sock.connect(address)
    except (BlockingIOError, InterruptedError):
        await wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {address!r}: {os.strerror(err)}") from None


async def connect_tcp(
    remote_host: str,
    remote_port: int,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
    budget: MemoryBudget | None = None,
    pickler_class: type[pickle.Pickler] | None = None,
    dispatch_table: Mapping[type, Callable[[Any], Any]] | None = None,
    persistent_id: Callable[[Any], Any] | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> ObjectStream:
    """Connect to a TCP server and return a zero-copy :class:`ObjectStream` over it
    (``budget``: see :class:`MemoryBudget`; none by default; pickle's hooks and ``progress``:
    see :class:`ObjectStream`)."""
    infos = await _addresses(remote_host, remote_port)
    errors: list[tuple[Any, OSError]] = []
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            _tune(sock)
            await _connect(sock, address)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            errors.append((address, exc))
            continue
        return ObjectStream.from_socket(
            sock, trusted=trusted, allow=allow, key=key, limits=limits, budget=budget,
            pickler_class=pickler_class, dispatch_table=dispatch_table, persistent_id=persistent_id,
            persistent_load=persistent_load, progress=progress,
        )
    raise _connect_error(remote_host, remote_port, errors)


async def _addresses(host: str, port: int) -> list[tuple[Any, ...]]:
    """``getaddrinfo``'s answer for a TCP connection to ``host``. A numeric address (what
    dask and most servers hand out) is answered at once, with no name lookup: anyio's
    ``getaddrinfo`` runs every lookup in a worker thread, so a process that only ever
    connected to numeric addresses kept a thread (and its memory arena) for nothing, and each
    connection waited for a thread's round trip. A name is looked up as before."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):  # a name (or no address at all): anyio looks it up
        return await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    await anyio.lowlevel.checkpoint()  # a checkpoint, as the lookup was
    return infos


def _connect_error(host: str, port: int, errors: list[tuple[Any, OSError]]) -> OSError:
    """The error of a failed ``connect_tcp``: the last address's, as the same ``OSError``
    subclass with the same errno (``ConnectionRefusedError``, ...), naming the host and port
    and what each address tried said; the last error is its cause."""
    if not errors:
        return OSError(f"could not connect to {host}:{port}: it has no address")
    tried = "; ".join(f"{address[0]}: {exc.strerror or exc}" for address, exc in errors)
    last = errors[-1][1]
    message = f"could not connect to {host}:{port} ({tried})"
    # OSError(errno, text) makes the errno's subclass, as the failed connect itself did
    error = OSError(last.errno, message) if last.errno is not None else OSError(message)
    error.__cause__ = last
    return error


async def connect_unix(
    path: str | os.PathLike[str],
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
    """Connect to a Unix socket and return a zero-copy :class:`ObjectStream` over it
    (``budget``: see :class:`MemoryBudget`; none by default). ``shared_memory``: arrays made
    with :func:`shared_empty` travel as shared memory, not bytes; the listener must opt in
    too (see :class:`ObjectStream`). Pickle's hooks and ``progress``: see :class:`ObjectStream`."""
    if shared_memory:
        check_no_key(key)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _tune(sock)
        await _connect(sock, os.fspath(path))
        return ObjectStream.from_socket(
            sock, trusted=trusted, allow=allow, key=key, limits=limits, budget=budget, shared_memory=shared_memory,
            pickler_class=pickler_class, dispatch_table=dispatch_table, persistent_id=persistent_id,
            persistent_load=persistent_load, progress=progress,
        )
    except BaseException:
        sock.close()
        raise


class ObjectStreamListener(Listener[ObjectStream]):
    """An anyio ``Listener`` of zero-copy :class:`ObjectStream` objects; use ``serve`` or ``accept``.

    Its connections share ``budget`` (a :class:`MemoryBudget`, or None for none): by
    default one of its own, of half the machine's physical memory.
    """

    def __init__(self, sock: socket.socket, options: dict[str, Any]) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._options = options
        self._closed = False

    @property
    def budget(self) -> MemoryBudget | None:
        """The :class:`MemoryBudget` its connections' incomplete messages share, if any."""
        return self._options.get("budget")

    async def accept(self) -> ObjectStream:
        """Wait for the next connection."""
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                conn, address = self._sock.accept()
            except BlockingIOError:
                await wait_readable(self._sock)
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up before we accepted; wait for the next one
                raise
            try:
                _tune(conn)
                stream = ObjectStream.from_socket(conn, **self._options)
            except OSError:  # this connection's fault (reset before it was set up): the next one
                conn.close()
                continue
            except BaseException:
                conn.close()  # never left for the garbage collector
                raise
            note_accepted(stream, address)
            return stream

    async def serve(
        self,
        handler: Callable[[ObjectStream], Awaitable[Any]],
        task_group: TaskGroup | None = None,
        *,
        max_connections: int | None = None,
    ) -> None:
        """Accept until cancelled, running ``handler(stream)`` in a task per connection (in
        ``task_group`` if given); the stream is closed when the handler returns.

        Connections are isolated: an ``Exception`` the handler lets out (a peer's bad bytes as
        a :class:`StreamPickleError`, ``anyio.BrokenResourceError`` from a peer that vanished,
        a bug in the handler) closes that connection only, and is logged on the
        ``"streampickle"`` logger with the peer's address: INFO for a lost connection, WARNING
        for refused bytes, ERROR with the traceback for anything else. Cancellation and other
        ``BaseException``s propagate as usual.

        ``accept`` failing for lack of descriptors or memory (``EMFILE``, ``ENFILE``,
        ``ENOBUFS``, ``ENOMEM``) is logged and retried every 0.1 s; the peer waits in the
        backlog meanwhile. Any other accept error ends ``serve``.

        ``max_connections``: at most this many handlers run at once; at the limit nothing is
        accepted, so further peers wait in the kernel's backlog (while it has room, their
        connects succeed and their messages wait unread) until a connection closes. ``None``,
        the default, sets no limit, as anyio's and trio's ``serve`` do: what a connection may
        cost (a descriptor, and up to ``Limits.max_message_size`` of memory while a message
        arrives) is the application's to weigh. Set it on servers open to peers you don't
        control, below the process's open-file limit. On a ``shared_memory=True`` listener a
        connection also holds the descriptors its peer sent with a message in flight (up to
        ``Limits.max_descriptors``); the whole process holds at most a quarter of its open-file
        limit of those, and refuses a peer past it, so three quarters stay for connections.
        """
        await _serve(self, handler, task_group, max_connections)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return socket_attributes(self._sock)


async def create_tcp_listener(
    *,
    local_host: str | None = None,
    local_port: int = 0,
    backlog: int = 65536,
    reuse_port: bool = False,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
    budget: MemoryBudget | None = PER_LISTENER,
    pickler_class: type[pickle.Pickler] | None = None,
    dispatch_table: Mapping[type, Callable[[Any], Any]] | None = None,
    persistent_id: Callable[[Any], Any] | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> ObjectStreamListener:
    """Listen on TCP (like ``anyio.create_tcp_listener``, default all interfaces, port chosen by
    the system: read it from ``listener.extra(SocketAttribute.local_port)``).

    ``budget``: the :class:`MemoryBudget` that the connections' incomplete messages share. By
    default a new one for this listener, of half the machine's physical memory; pass one to
    size it or to share it with other listeners, or None for none. Pickle's hooks and
    ``progress``: every connection accepted gets them (see :class:`ObjectStream`); one
    ``progress`` callback then hears every connection, and its events don't say which."""
    budget = _listener_budget(budget)
    host = local_host or ""
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.create_server(
        (host, local_port), family=family, backlog=min(backlog, socket.SOMAXCONN), reuse_port=reuse_port
    )
    await anyio.lowlevel.checkpoint()
    options = dict(
        trusted=trusted, allow=allow, key=key, limits=limits, budget=budget,
        pickler_class=pickler_class, dispatch_table=dispatch_table, persistent_id=persistent_id,
        persistent_load=persistent_load, progress=progress,
    )
    return ObjectStreamListener(sock, options)


async def create_unix_listener(
    path: str | os.PathLike[str],
    *,
    mode: int | None = None,
    backlog: int = 65536,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
    budget: MemoryBudget | None = PER_LISTENER,
    shared_memory: bool = False,
    pickler_class: type[pickle.Pickler] | None = None,
    dispatch_table: Mapping[type, Callable[[Any], Any]] | None = None,
    persistent_id: Callable[[Any], Any] | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
    progress: ProgressCallback | None = None,
) -> ObjectStreamListener:
    """Listen on a Unix socket at ``path`` (``mode``: its permission bits, e.g. ``0o600``).
    ``budget``: as for :func:`create_tcp_listener`. ``shared_memory``: every connection
    accepted hands arrays made with :func:`shared_empty` over as shared memory, and takes
    them so (the clients must opt in too; see :class:`ObjectStream`). Pickle's hooks and
    ``progress``: every connection accepted gets them, as for :func:`create_tcp_listener`.

    A socket file at ``path`` that no server listens on any more (left by one that crashed) is
    replaced; a live server's socket, or a file that is not a socket, is left alone and
    ``OSError`` (``errno.EADDRINUSE``) names the path."""
    if shared_memory:
        check_no_key(key)
    budget = _listener_budget(budget)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(os.fspath(path))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            _remove_stale_socket(os.fspath(path), exc)
            sock.bind(os.fspath(path))
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(min(backlog, socket.SOMAXCONN))
    except BaseException:
        sock.close()
        raise
    await anyio.lowlevel.checkpoint()
    options = dict(
        trusted=trusted, allow=allow, key=key, limits=limits, budget=budget, shared_memory=shared_memory,
        pickler_class=pickler_class, dispatch_table=dispatch_table, persistent_id=persistent_id,
        persistent_load=persistent_load, progress=progress,
    )
    return ObjectStreamListener(sock, options)


def _remove_stale_socket(path: str, in_use: OSError) -> None:
    """Remove the socket file at ``path`` if no server listens on it: the one a server left
    behind when it crashed (a closed listener doesn't remove its file either). A connection
    refused means nobody listens; a live server's socket, or a path that is not a socket at
    all, is left alone, and ``EADDRINUSE`` names the path.

    The probe is a non-blocking connect, so a live server whose backlog is full (the connect
    would wait) counts as live too; a live server accepts the probe as a connection that ends
    at once, without a byte."""
    if path.startswith("\0"):  # Linux's abstract namespace: no file, and the name is taken
        raise in_use
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return  # gone meanwhile: bind again
    if not is_socket:
        raise OSError(errno.EADDRINUSE, f"{path} exists and is not a socket: not removing it") from in_use
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: its server is gone
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # live, with its backlog full
    finally:
        probe.close()
    raise OSError(
        errno.EADDRINUSE, f"a server is listening on {path}: close it, or listen on another path"
    ) from in_use
