"""The accept loop behind ``ObjectStreamListener.serve``: one connection's failure is its own.

A server open to the network meets peers that send garbage, hostile pickles or half a message
and vanish. None of that may end the server or touch other connections, so each connection's
task catches every ``Exception`` its handler lets out, logs it with the peer's address, and
closes that connection alone. ``BaseException``s that are not ``Exception`` (cancellation,
``KeyboardInterrupt``, ``SystemExit``) still propagate: they are how the program stops.

Records go to the ``"streampickle"`` logger, at a level that says whose fault it was:

* INFO: the connection was lost (reset, or closed mid-message); routine on any network;
* WARNING: the peer's bytes were refused (not the wire format, a forbidden global, a limit);
* ERROR, with the traceback: anything else, a bug in the handler.

Every record carries the peer as ``record.peer``, and in its text.

When the process runs out of descriptors or memory, ``accept`` fails (``EMFILE``, ``ENFILE``,
``ENOBUFS``, ``ENOMEM``) with the connection still waiting in the kernel's backlog. Those
errors are not the listener's end: the loop sleeps and tries again, as ``trio.serve_listeners``
does, and the peer is served once a connection closes. ``max_connections`` keeps the server
below that point: at the limit it stops accepting, and new peers wait in the backlog.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
from anyio.abc import SocketAttribute, TaskGroup

from ._errors import EncodeError, IncompleteMessageError, StreamPickleError, UsageError

__all__ = ["serve"]


class Accepting(Protocol):
    """A listener with ``accept()``, as streampickle's own have (anyio's ``Listener`` only
    promises ``serve``)."""

    async def accept(self) -> Any: ...

logger = logging.getLogger("streampickle")

#: Errors of accept(2) that mean the system is out of a resource, not that the listener is
#: broken: the pending connection stays in the backlog, and the call works once some is freed.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# What each of them means for the operator reading the log.
_CAPACITY_HINTS = {
    errno.EMFILE: "this process is at its open-file limit: raise it (ulimit -n), or accept fewer connections at once",
    errno.ENFILE: "the system is at its limit of open files",
    errno.ENOBUFS: "the system is short of memory for sockets",
    errno.ENOMEM: "the system is short of memory",
}

#: Seconds between accept attempts while one of those lasts. trio.serve_listeners waits 0.1 s
#: too: short enough that a freed descriptor is used almost at once, long enough that a server
#: at its limit does not spin (the backlog keeps the listening socket readable all along).
ACCEPT_RETRY_DELAY = 0.1


async def serve(
    listener: Accepting,
    handler: Callable[[Any], Awaitable[Any]],
    task_group: TaskGroup | None,
    max_connections: int | None,
) -> None:
    """Accept from ``listener`` until cancelled, running ``handler`` on each stream in its own
    task; see ``ObjectStreamListener.serve`` for the contract."""
    if max_connections is not None and (
        type(max_connections) is not int or max_connections < 1  # not a bool, not a float
    ):
        raise UsageError(f"max_connections must be a positive int or None, not {max_connections!r}")
    slots = anyio.Semaphore(max_connections) if max_connections is not None else None

    async def run(stream: Any) -> None:
        try:
            await _run_isolated(stream, handler)
        finally:
            if slots is not None:
                slots.release()

    async with anyio.create_task_group() as own:
        group = task_group or own
        while True:
            if slots is not None:
                await slots.acquire()  # at the limit: accept nothing, peers wait in the backlog
            try:
                stream = await accept_patiently(listener)
            except BaseException:
                if slots is not None:
                    slots.release()
                raise
            group.start_soon(run, stream)


async def _run_isolated(stream: Any, handler: Callable[[Any], Awaitable[Any]]) -> None:
    """Run ``handler(stream)`` and close the stream; an ``Exception`` from either is logged."""
    peer = describe_peer(stream)
    try:
        async with stream:
            try:
                await handler(stream)
            except Exception as exc:  # noqa: BLE001 - logged: one handler can't stop the server
                # logged before the close, which may wait to write replies the handler queued
                _log_failure(peer, exc)
    except Exception as exc:  # noqa: BLE001 - logged: closing failed; the socket is closed anyway
        _log_failure(peer, exc)


async def accept_patiently(listener: Accepting) -> Any:
    """``listener.accept()``, waiting out ``ACCEPT_CAPACITY_ERRNOS``.

    streampickle's listeners raise them as ``OSError``; anyio's listeners on trio (and its
    asyncio Unix listener) as ``BrokenResourceError`` from the ``OSError``: both are retried.
    The first failure of a run is logged as an error, the rest at DEBUG, and the recovery at
    INFO, so that a server at its limit doesn't write ten records a second.
    """
    failures = 0
    while True:
        try:
            stream = await listener.accept()
        except (OSError, anyio.BrokenResourceError) as exc:
            code = _capacity_errno(exc)
            if code is None:
                raise
            failures += 1
            logger.log(
                logging.ERROR if failures == 1 else logging.DEBUG,
                "accept failed with %s (%s): %s. Retrying every %s s; the peer waits in the backlog",
                errno.errorcode[code], os.strerror(code), _CAPACITY_HINTS[code], ACCEPT_RETRY_DELAY,
            )
            await anyio.sleep(ACCEPT_RETRY_DELAY)
            continue
        if failures:
            logger.info("accepting again after %d failed attempts", failures)
        return stream


def _capacity_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` (or of the ``OSError`` it wraps) if it is a capacity error."""
    if not isinstance(exc, OSError):
        exc = exc.__cause__  # type: ignore[assignment]
    if isinstance(exc, OSError) and exc.errno in ACCEPT_CAPACITY_ERRNOS:
        return exc.errno
    return None


# The address accept(2) returned for each stream a listener made. A peer that resets its
# connection before its handler starts can't be asked for it any more (getpeername fails with
# ENOTCONN), and that peer is exactly the one the log record is about.
_accepted_from: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def note_accepted(stream: Any, address: Any) -> None:
    """Remember the peer address that accept(2) gave for ``stream``, for ``describe_peer``."""
    _accepted_from[stream] = address


def describe_peer(stream: Any) -> str:
    """Who is at the other end of ``stream``, for log records: ``host:port`` for TCP; for a
    Unix socket its path and, where the system says, the peer's process and user ids (a Unix
    client's own address is nearly always empty)."""
    try:
        sock = stream.extra(SocketAttribute.raw_socket, None)
        address = _accepted_from.get(stream)
        if sock is None:
            if address is None:
                address = stream.extra(SocketAttribute.remote_address, None)
            return "unknown peer" if address is None else str(address)
        if address is None:
            address = sock.getpeername()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host, port = address[:2]
            return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
        if sock.family == socket.AF_UNIX:
            return _describe_unix_peer(sock, address)
        return repr(address)
    except OSError as exc:  # the peer left before we asked
        return f"unknown peer ({exc.strerror or exc})"


def _describe_unix_peer(sock: socket.socket, address: Any) -> str:
    text = f"unix:{address!r}" if address else f"unix:{sock.getsockname()!r}"
    if hasattr(socket, "SO_PEERCRED"):  # Linux: (pid, uid, gid) as three C ints
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return text
        pid, uid, _ = struct.unpack("3i", raw)
        text += f" (pid {pid}, uid {uid})"
    return text


# Errors that mean the peer went away, rather than that it sent something wrong.
_GONE = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    ConnectionError,
    IncompleteMessageError,
)


def _fault(exc: BaseException) -> str:
    """``"gone"``, ``"peer"`` or ``"handler"``: who ended the connection (see the module doc)."""
    if isinstance(exc, BaseExceptionGroup):  # from a task group inside the handler
        faults = {_fault(inner) for inner in exc.exceptions}
        return faults.pop() if len(faults) == 1 else "handler"
    if isinstance(exc, _GONE):
        return "gone"
    if isinstance(exc, StreamPickleError) and not isinstance(exc, (UsageError, EncodeError)):
        return "peer"
    return "handler"


def _log_failure(peer: str, exc: Exception) -> None:
    fault = _fault(exc)
    extra = {"peer": peer}
    if fault == "gone":
        logger.info("connection from %s lost (%s: %s)", peer, type(exc).__name__, exc, extra=extra)
    elif fault == "peer":
        logger.warning(
            "connection from %s closed: the peer's bytes were refused (%s: %s)",
            peer, type(exc).__name__, exc, extra=extra,
        )
    else:
        logger.error(
            "connection from %s closed: the handler raised %s: %s",
            peer, type(exc).__name__, exc, exc_info=exc, extra=extra,
        )
