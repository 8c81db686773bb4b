"""What streampickle needs from anyio beyond the public API of every release it supports, in
one place, each with its fallback.

* ``notify_closing`` (wake the tasks waiting on a socket before closing it) appeared in
  anyio 4.10. Where anyio has it, :func:`wait_readable`, :func:`wait_writable` and
  :func:`notify_closing` are anyio's own. Where it doesn't, streampickle waits on its sockets
  itself on asyncio (a future per wait, made ready by the loop's reader or writer callback,
  which :func:`notify_closing` fails with ``anyio.ClosedResourceError``) and uses trio's
  ``notify_closing`` on trio, where anyio's waits are trio's.
* :func:`is_asyncio_unix_stream` recognises anyio's asyncio ``UNIXSocketStream`` (which
  drives its raw socket itself, so streampickle may too) by its module, class name and the
  method it waits with. A release that changed any of them gets the copying path, which is
  slower but correct.
* :func:`checkpoint_if_cancelled` is the backend's own, looked up once: the module-level
  function finds the backend anew on every call, which costs as much as a small message.
* :func:`running_trio` and :func:`trio_token` ask trio, only where it is imported, whether
  this runs inside it and which run that is.

``tests/test_anyio_compat.py`` fails when an anyio release changes what this module probes,
so that a fallback is never chosen by accident.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

__all__ = [
    "ANYIO_NOTIFY_CLOSING",
    "checkpoint_if_cancelled",
    "is_asyncio_unix_stream",
    "notify_closing",
    "running_trio",
    "trio_token",
    "wait_readable",
    "wait_writable",
]

#: Whether the installed anyio has ``notify_closing`` (4.10 and later): then its socket waits
#: are used as they are. A test may set it False to run the fallback on a newer anyio.
ANYIO_NOTIFY_CLOSING = hasattr(anyio, "notify_closing")

# The fallback's waits on asyncio: (fd, "r" or "w") -> the future its callback completes.
_waits: dict[tuple[int, str], asyncio.Future[bool]] = {}


async def wait_readable(sock: socket.socket) -> None:
    """Wait until ``sock`` is readable; ``anyio.ClosedResourceError`` if it is closed
    meanwhile through :func:`notify_closing`."""
    if ANYIO_NOTIFY_CLOSING:
        await anyio.wait_readable(sock)
    else:
        await _wait(sock, "r")


async def wait_writable(sock: socket.socket) -> None:
    """Wait until ``sock`` is writable; as :func:`wait_readable`."""
    if ANYIO_NOTIFY_CLOSING:
        await anyio.wait_writable(sock)
    else:
        await _wait(sock, "w")


def notify_closing(sock: socket.socket) -> None:
    """Wake every task waiting on ``sock`` (which the caller closes next) with
    ``anyio.ClosedResourceError``."""
    if ANYIO_NOTIFY_CLOSING:
        try:
            anyio.notify_closing(sock)  # type: ignore[attr-defined,unused-ignore]
        except RuntimeError:
            # No event loop runs in this thread (an abort() from a finalizer, from another
            # thread, or after the loop ended), so no task of it waits on the socket: the
            # close goes ahead rather than leaving the socket open.
            pass
        return
    fd = sock.fileno()
    for direction in ("r", "w"):
        fut = _waits.pop((fd, direction), None)
        if fut is not None:
            _remove(fut.get_loop(), fd, direction)
            if not fut.done():
                fut.set_result(False)
    if running_trio():
        sys.modules["trio"].lowlevel.notify_closing(sock)


async def _wait(sock: socket.socket, direction: str) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio: anyio's wait is trio's, which trio's notify_closing wakes
        await (anyio.wait_readable if direction == "r" else anyio.wait_writable)(sock)
        return
    fd = sock.fileno()
    key = (fd, direction)
    if key in _waits:
        raise anyio.BusyResourceError("reading from" if direction == "r" else "writing to")
    fut: asyncio.Future[bool] = loop.create_future()

    def ready() -> None:
        if not fut.done():  # a cancelled wait's future: its task removes the callback
            fut.set_result(True)

    try:
        (loop.add_reader if direction == "r" else loop.add_writer)(fd, ready)
    except NotImplementedError:  # a loop without callbacks (Windows' proactor)
        await (anyio.wait_readable if direction == "r" else anyio.wait_writable)(sock)
        return
    _waits[key] = fut
    try:
        woken = await fut
    finally:
        if _waits.get(key) is fut:
            del _waits[key]
            _remove(loop, fd, direction)
    if not woken:
        raise anyio.ClosedResourceError


def _remove(loop: asyncio.AbstractEventLoop, fd: int, direction: str) -> None:
    (loop.remove_reader if direction == "r" else loop.remove_writer)(fd)


def running_trio() -> bool:
    """Whether this runs inside trio (a task, or a callback of its run loop)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def trio_token() -> Any:
    """The running trio's token, or None outside trio."""
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        return trio.lowlevel.current_trio_token()
    except RuntimeError:
        return None


def is_asyncio_unix_stream(stream: Any) -> bool:
    """Whether ``stream`` is anyio's asyncio ``UNIXSocketStream``, which drives its raw socket
    itself (a reader callback per wait, no asyncio transport), so nothing else reads from it.

    Checked by exact class and by the raw-socket method it waits with: an anyio release that
    put a transport under Unix streams would fail the check and get the copying path.
    """
    cls = type(stream)
    return (
        cls.__name__ == "UNIXSocketStream"
        and cls.__module__ == "anyio._backends._asyncio"
        and hasattr(cls, "_wait_until_readable")
    )


def checkpoint_if_cancelled() -> Callable[[], Awaitable[None]]:
    """The running backend's ``checkpoint_if_cancelled``, or anyio's public function (the
    same, slower) where ``anyio.lowlevel`` doesn't offer ``get_async_backend``."""
    get_backend = getattr(anyio.lowlevel, "get_async_backend", None)
    if get_backend is None:
        return anyio.lowlevel.checkpoint_if_cancelled
    return get_backend().checkpoint_if_cancelled  # type: ignore[no-any-return]
