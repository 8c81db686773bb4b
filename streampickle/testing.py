"""Test helpers for users and for streampickle itself.

* :func:`memory_stream_pair`: two connected in-memory anyio byte streams, bounded, for tests
  that need no sockets.
* :func:`check_object_stream`: a conformance battery for any pair of connected object streams
  (in the spirit of trio's ``check_two_way_stream``): round trips, ordering, end-of-stream and
  close semantics, cancellation, concurrency, large full-duplex transfers. streampickle runs it
  over memory streams, socket pairs, TCP, Unix sockets and process pipes, on asyncio and trio;
  run it over your own transport the same way.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
from anyio.abc import ByteStream, ObjectStream

from ._errors import IncompleteMessageError

__all__ = ["MemoryByteStream", "check_object_stream", "memory_stream_pair"]


class _Pipe:
    """One direction of a memory stream pair: the sends not yet received, in order.

    A receive waits for data to be there and then takes it in the same step, with no await in
    between; a send never hands bytes to a waiting receiver. So a receive interrupted by any
    cancellation (anyio's, or asyncio's ``task.cancel()``) has taken nothing, and the bytes
    stay for the next one. (anyio's memory object streams hand an item straight to a waiting
    receiver, which a native asyncio cancellation then loses.)
    """

    def __init__(self, max_buffered_sends: int) -> None:
        self.max = max_buffered_sends
        self.items: collections.deque[bytes] = collections.deque()
        self.leftover = b""  # the rest of a send that a receive took only part of
        self.send_closed = False  # no more sends: the receiving end sees the end of stream
        self.receive_closed = False  # nobody receives: a send is a broken pipe
        self._changed = anyio.Event()

    def changed(self) -> None:
        """Wake every task waiting on this pipe; each looks again at what it waits for."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait(self) -> None:
        await self._changed.wait()


class MemoryByteStream(ByteStream):
    """One end of an in-memory byte stream pair; see :func:`memory_stream_pair`."""

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming
        self._closed = False

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        pipe = self._out
        while True:
            if self._closed or pipe.send_closed:
                raise anyio.ClosedResourceError
            if pipe.receive_closed:
                raise anyio.BrokenResourceError("the receiving end was closed")
            if len(pipe.items) < pipe.max:
                break
            await pipe.wait()
        # bytes(): the caller may reuse its buffer as soon as send returns, like with a socket
        pipe.items.append(bytes(item))
        pipe.changed()
        await anyio.lowlevel.cancel_shielded_checkpoint()  # sent: a cancellation can't undo it

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint_if_cancelled()
        pipe = self._in
        while not pipe.leftover and not pipe.items:
            if self._closed:
                raise anyio.ClosedResourceError
            if pipe.send_closed:
                raise anyio.EndOfStream
            await pipe.wait()
        if self._closed:
            raise anyio.ClosedResourceError
        data = pipe.leftover or pipe.items.popleft()
        data, pipe.leftover = data[:max_bytes], data[max_bytes:]
        pipe.changed()  # room for a waiting send
        return data

    async def send_eof(self) -> None:
        self._out.send_closed = True
        self._out.changed()
        await anyio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        """Close both directions; done even when cancelled."""
        self._closed = True
        self._out.send_closed = True
        self._in.receive_closed = True
        self._out.changed()
        self._in.changed()
        await anyio.lowlevel.cancel_shielded_checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {}


def memory_stream_pair(max_buffered_sends: int = 4) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected in-memory byte streams. Each direction buffers at most
    ``max_buffered_sends`` sends, so a sender waits for a slow receiver like on a socket. A
    cancelled receive takes nothing, whatever cancelled it."""
    a_to_b, b_to_a = _Pipe(max_buffered_sends), _Pipe(max_buffered_sends)
    return MemoryByteStream(a_to_b, b_to_a), MemoryByteStream(b_to_a, a_to_b)


StreamMaker = Callable[[], Awaitable[tuple[ObjectStream[Any], ObjectStream[Any]]]]


def _same(a: Any, b: Any) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, (a, b)
        assert np.array_equal(a, b), "array values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b, (a, b)


async def _round_trips(make: StreamMaker) -> None:
    a, b = await make()
    async with a, b:
        rng = np.random.default_rng(0)
        objects = [
            None,
            {"id": 1, "name": "x", "vals": [1.0, 2.0, 3.0]},
            rng.random((100, 100)),
            [np.arange(10, dtype=np.int16), np.zeros(0), "text" * 1000],
        ]
        for obj in objects:
            await a.send(obj)
            _same(obj, await b.receive())
            await b.send(obj)
            _same(obj, await a.receive())


async def _ordering(make: StreamMaker) -> None:
    a, b = await make()
    async with a, b, anyio.create_task_group() as tg:

        async def producer() -> None:
            for i in range(500):
                await a.send({"i": i, "a": np.full(i % 7, i)})

        tg.start_soon(producer)
        for i in range(500):
            got = await b.receive()
            assert got["i"] == i and (got["a"] == i).all() and len(got["a"]) == i % 7


async def _expect_end(stream: ObjectStream[Any], *ends: type[BaseException]) -> None:
    for _ in range(2):  # EndOfStream, and again
        try:
            got = await stream.receive()
        except anyio.EndOfStream:
            pass
        except ends:
            pass
        else:
            raise AssertionError(f"receive at the peer's end of stream returned {got!r}")


async def _eof_and_close(make: StreamMaker) -> None:
    a, b = await make()
    async with a, b:
        await a.send("last")
        try:
            await a.send_eof()
        except NotImplementedError:  # a transport without half-close (anyio's TLS streams)
            await a.aclose()
            # Closing may reset the connection (unread TLS session tickets make the kernel
            # send RST), which can take queued data with it: the peer gets "last" or an end.
            try:
                assert await b.receive() == "last"
                await _expect_end(b)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
        else:
            assert await b.receive() == "last"
            await _expect_end(b)
            # the other direction still works after a half-close
            await b.send("reply")
            assert await a.receive() == "reply"
            # async for ends cleanly at end of stream
            await b.send_eof()
            assert [x async for x in a] == []
    # closed streams refuse use; closing again is a no-op
    await a.aclose()
    for call in (lambda: a.send(1), a.receive):
        try:
            await call()
        except anyio.ClosedResourceError:
            pass
        else:
            raise AssertionError("a closed stream accepted a call")


async def _close_while_blocked(
    stream: ObjectStream[Any],
    call: Callable[[], Awaitable[Any]],
    *,
    check: Callable[[], None] | None = None,
    after: float = 0.05,
) -> list[BaseException]:
    """Close ``stream`` ``after`` seconds into a task blocked in ``call()`` (calling ``check``,
    if given, at that point); return what woke that call."""
    woke: list[BaseException] = []

    async def blocked() -> None:
        try:
            await call()
        except BaseException as exc:  # noqa: BLE001 - we record what woke it
            woke.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(blocked)
        await anyio.sleep(after)
        if check is not None:
            check()
        await stream.aclose()
    return woke


async def _close_wakes_blocked_receive(make: StreamMaker) -> None:
    a, b = await make()
    async with a, b:
        woke = await _close_while_blocked(b, b.receive)
        assert woke and isinstance(woke[0], anyio.ClosedResourceError), woke


async def _close_wakes_blocked_send(make: StreamMaker) -> None:
    """A send blocked on a peer that doesn't read wakes when its stream is closed."""
    a, b = await make()
    async with a, b:
        await a.send("warm-up")  # see _backpressure
        assert await b.receive() == "warm-up"
        big = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB: more than any socket buffers
        with anyio.fail_after(2):  # a local channel's send wakes within milliseconds
            woke = await _close_while_blocked(a, lambda: a.send(big), after=0.1)
        assert woke and isinstance(woke[0], anyio.ClosedResourceError), woke


async def _cancelled_receive_loses_nothing(make: StreamMaker) -> None:
    a, b = await make()
    async with a, b:
        big = np.random.default_rng(1).random(4_000_000)  # 32 MB: many reads
        async with anyio.create_task_group() as tg:

            async def producer() -> None:
                await a.send({"big": big})
                await a.send("next")

            tg.start_soon(producer)
            cancelled_mid_message = 0
            got: Any = None
            for _ in range(10_000):
                with anyio.move_on_after(0.0005) as scope:
                    got = await b.receive()
                if not scope.cancelled_caught:
                    break
                decoder = getattr(b, "_decoder", None)
                if decoder is not None and decoder.in_message:
                    cancelled_mid_message += 1
            assert got is not None and np.array_equal(got["big"], big)
            assert await b.receive() == "next"
        if getattr(b, "_decoder", None) is not None:
            assert cancelled_mid_message, "the test never cancelled a receive mid-message"


async def _cancelled_send_before_first_byte_keeps_stream(make: StreamMaker) -> None:
    a, b = await make()
    async with a, b:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await a.send("never sent")
        await a.send("sent")
        assert await b.receive() == "sent"


async def _cancelled_send_mid_message_breaks_stream(make: StreamMaker) -> None:
    """Sends cancelled at an arbitrary point: the stream is either still whole (cancelled
    before the message's first byte) or broken for sending, and the peer never gets a wrong
    object either way."""
    a, b = await make()
    async with a, b:
        big = np.arange(2_000_000, dtype=np.float64)  # 16 MB, more than a socket buffers
        complete = 0
        with anyio.move_on_after(0.2) as scope:
            while True:  # nobody reads yet: sooner or later a send is cut mid-message
                await a.send(big)
                complete += 1
        assert scope.cancelled_caught
        try:
            await a.send("after")
            broken = False
        except anyio.BrokenResourceError:
            broken = True
        await a.aclose()
        for _ in range(complete):
            assert np.array_equal(await b.receive(), big)
        try:
            got = await b.receive()
        except (IncompleteMessageError, anyio.EndOfStream, anyio.BrokenResourceError):
            assert broken, "the stream was usable, yet the peer did not get the next message"
        else:
            assert not broken and got == "after", f"the peer received {type(got)} from a partial message"


async def _concurrent_sends_and_receives(make: StreamMaker) -> None:
    a, b = await make()
    async with a, b:
        senders = 50

        async def sender(i: int) -> None:
            await a.send({"i": i, "data": np.full(20_000, i, dtype=np.int64)})

        async with anyio.create_task_group() as tg:
            for i in range(senders):
                tg.start_soon(sender, i)
            seen = set()
            for _ in range(senders):
                got = await b.receive()
                assert (got["data"] == got["i"]).all(), "interleaved frames"
                seen.add(got["i"])
        assert seen == set(range(senders))

        errors: list[BaseException] = []

        async def receiver() -> None:
            try:
                await b.receive()
            except anyio.BusyResourceError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            tg.start_soon(receiver)
            await anyio.sleep(0.05)
            await a.send("one")
            await anyio.sleep(0.05)
            if not errors:
                await a.send("two")
        assert len(errors) == 1, errors


async def _full_duplex_large(make: StreamMaker) -> None:
    a, b = await make()
    async with a, b:
        arrays = [np.random.default_rng(i).random(2_000_000) for i in range(2)]  # 16 MB each

        async def pump(stream: ObjectStream[Any], arr: np.ndarray[Any, Any], peer_arr: np.ndarray[Any, Any]) -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(stream.send, arr)
                for _ in range(3):
                    got = await stream.receive()
                    assert np.array_equal(got, peer_arr)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, a, arrays[0], arrays[1])
                tg.start_soon(pump, b, arrays[1], arrays[0])


async def _backpressure(make: StreamMaker) -> None:
    a, b = await make()
    async with a, b:
        # One exchange first: anyio's asyncio socket streams read eagerly until their first
        # receive() (asyncio can't pause reading from connection_made: CPython gh-76002).
        await a.send("warm-up")
        assert await b.receive() == "warm-up"
        chunk = np.ones(1 << 20, dtype=np.uint8)  # 1 MiB
        sent = 0
        with anyio.move_on_after(1.0):
            while True:
                await a.send(chunk)
                sent += 1
                if sent > 256:
                    break
        assert sent <= 256, "256 MiB went out with nobody reading: no backpressure"
        await a.aclose()


CHECKS: dict[str, Callable[[StreamMaker], Awaitable[None]]] = {
    "round_trips": _round_trips,
    "ordering": _ordering,
    "eof_and_close": _eof_and_close,
    "close_wakes_blocked_receive": _close_wakes_blocked_receive,
    "close_wakes_blocked_send": _close_wakes_blocked_send,
    "cancelled_receive_loses_nothing": _cancelled_receive_loses_nothing,
    "cancelled_send_before_first_byte_keeps_stream": _cancelled_send_before_first_byte_keeps_stream,
    "cancelled_send_mid_message_breaks_stream": _cancelled_send_mid_message_breaks_stream,
    "concurrent_sends_and_receives": _concurrent_sends_and_receives,
    "full_duplex_large": _full_duplex_large,
    "backpressure": _backpressure,
}


async def check_object_stream(make: StreamMaker, *, only: list[str] | None = None) -> None:
    """Run the conformance battery. ``make`` is an async callable returning a fresh pair of
    connected object streams ``(a, b)`` (each check closes its pair). ``only`` limits the run
    to the named checks (see ``CHECKS``). Raises ``AssertionError`` on the first failure."""
    for name, check in CHECKS.items():
        if only is not None and name not in only:
            continue
        try:
            with anyio.fail_after(180):
                await check(make)
        except AssertionError as exc:
            raise AssertionError(f"check_object_stream: {name}: {exc}") from exc


