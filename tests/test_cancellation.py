"""Cancelling a receive never loses, duplicates or corrupts a message: a randomized battery.

A sender writes numbered messages as raw bytes, cut at random places, yielding to the event
loop between the pieces, so the receiver often waits inside a message or inside a large side
chunk. The receiver calls ``receive()`` or ``load()`` under a randomly chosen cancellation
mechanism (anyio, asyncio or trio, with random short deadlines or a sibling task cancelling
after a random number of checkpoints). A call that returns must give the next number, intact;
a call that raises the cancellation is counted as an interruption. At the end the sender stops,
closes its direction, and the receiver must have every number exactly once and in order.

Only interruptions count: a call that completed under an expired deadline is not one (on trio
a ``load`` whose reads never block has no checkpoint). Each case runs until it has its share
of interruptions, and the last test checks that every backend got at least 10,000 of them.
Nothing here depends on how long anything takes: deadlines only decide *where* a call is
interrupted, and the pacing is by checkpoints.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import os
import random
import socket
import tempfile
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from anyio.abc import SocketAttribute

import streampickle
from _pairs import anyio_socket_pair
from _util import assert_same
from streampickle import ObjectStream, _stream
from streampickle.testing import memory_stream_pair

pytestmark = pytest.mark.anyio

#: Interruptions each backend must get, summed over its cases.
PER_BACKEND = 10_000
#: A case that can't get its share in this many times as many receives fails.
MAX_ROUNDS_PER_INTERRUPTION = 20

Call = Callable[[], Awaitable[Any]]


# --- the messages ------------------------------------------------------------------------


def message(n: int) -> Any:
    """Message number ``n``: its content follows from ``n`` alone, so a duplicate, a gap or a
    corrupted byte shows up in the comparison with a fresh copy."""
    rng = random.Random(n)
    kind = rng.random()
    if kind < 0.35:
        return n
    if kind < 0.6:
        return (n, f"msg-{n}", n * 3)
    if kind < 0.96:
        size = rng.randrange(1, 200)
        return {"n": n, "a": np.arange(size, dtype=np.int64) * 7 + n}
    # multi-chunk: a large side chunk (64 KiB - 1 MiB) and a small one
    words = rng.randrange(16 << 10, 256 << 10)
    big = np.arange(words, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(n)
    return {"n": n, "big": big, "small": np.full(3, n, dtype=np.int16)}


def pieces(data: bytes, rng: random.Random) -> list[memoryview]:
    """``data`` cut at random places: a few pieces (some of one byte) for a small message,
    16-256 KiB pieces for a large one."""
    view = memoryview(data)
    cuts = set()
    if len(data) > 64 << 10:
        at = 0
        while at < len(data):
            at += rng.randrange(16 << 10, 256 << 10)
            cuts.add(at)
    else:
        for _ in range(rng.randrange(0, 4)):
            at = rng.randrange(1, len(data))
            cuts.update((at, at + rng.choice((0, 1))))
    bounds = sorted({0, len(data)} | {c for c in cuts if 0 < c < len(data)})
    return [view[a:b] for a, b in itertools.pairwise(bounds)]


async def send_numbered(write: Callable[[memoryview], Awaitable[None]], stop: list[bool], seed: int) -> int:
    """Send messages 0, 1, ... in pieces until ``stop[0]``; yields 0-3 times between pieces.
    Returns how many were sent."""
    rng = random.Random(seed)
    n = 0
    while not stop[0]:
        for piece in pieces(streampickle.dumps(message(n)), rng):
            await write(piece)
            for _ in range(rng.randrange(4)):
                await anyio.lowlevel.checkpoint()
        n += 1
    return n


# --- the cancellation mechanisms ---------------------------------------------------------

DELAYS = (0.0, 0.0, 1e-6, 1e-5, 5e-5, 1e-4, 3e-4)
#: How many times a sibling yields before it cancels: mostly soon, sometimes later.
SIBLING_CHECKPOINTS = (0, 1, 1, 1, 2, 3, 5, 8, 13)


class Attempt:
    """One receive/load call, recording whether it started, returned, or raised."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.started = False
        self.returned = False
        self.value: Any = None
        self.raised: BaseException | None = None

    async def run(self) -> None:
        self.started = True
        try:
            self.value = await self.call()
        except BaseException as exc:
            self.raised = exc
            raise
        self.returned = True


async def _cancel_after(cancel: Callable[[], None], checkpoints: int) -> None:
    for _ in range(checkpoints):
        await anyio.lowlevel.checkpoint()
    cancel()


async def anyio_move_on_after(attempt: Attempt, tg: Any, rng: random.Random) -> None:
    with anyio.move_on_after(rng.choice(DELAYS)):
        await attempt.run()


async def anyio_fail_after(attempt: Attempt, tg: Any, rng: random.Random) -> None:
    try:
        with anyio.fail_after(rng.choice(DELAYS)):
            await attempt.run()
    except TimeoutError:
        pass


async def anyio_scope_cancel_from_sibling(attempt: Attempt, tg: Any, rng: random.Random) -> None:
    with anyio.CancelScope() as scope:  # cancelling it after it exited does nothing
        tg.start_soon(_cancel_after, scope.cancel, rng.choice(SIBLING_CHECKPOINTS))
        await attempt.run()


async def asyncio_task_cancel(attempt: Attempt, tg: Any, rng: random.Random) -> None:
    task = asyncio.get_running_loop().create_task(attempt.run())
    for _ in range(rng.choice(SIBLING_CHECKPOINTS)):
        await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # this task was cancelled, not the receive


async def asyncio_timeout(attempt: Attempt, tg: Any, rng: random.Random) -> None:
    try:
        async with asyncio.timeout(rng.choice(DELAYS)):
            await attempt.run()
    except TimeoutError:
        pass


async def asyncio_wait_for(attempt: Attempt, tg: Any, rng: random.Random) -> None:
    try:
        await asyncio.wait_for(attempt.run(), rng.choice(DELAYS))
    except TimeoutError:
        pass


async def trio_scope_cancel_from_sibling(attempt: Attempt, tg: Any, rng: random.Random) -> None:
    import trio

    with trio.CancelScope() as scope:
        tg.start_soon(_cancel_after, scope.cancel, rng.choice(SIBLING_CHECKPOINTS))
        await attempt.run()


async def trio_move_on_after(attempt: Attempt, tg: Any, rng: random.Random) -> None:
    import trio

    with trio.move_on_after(rng.choice(DELAYS)):
        await attempt.run()


async def trio_fail_after(attempt: Attempt, tg: Any, rng: random.Random) -> None:
    import trio

    try:
        with trio.fail_after(rng.choice(DELAYS)):
            await attempt.run()
    except trio.TooSlowError:
        pass


Mechanism = Callable[[Attempt, Any, random.Random], Awaitable[None]]
ANYIO_MECHANISMS: list[Mechanism] = [anyio_move_on_after, anyio_fail_after, anyio_scope_cancel_from_sibling]
NATIVE_MECHANISMS: dict[str, list[Mechanism]] = {
    "asyncio": [asyncio_task_cancel, asyncio_timeout, asyncio_wait_for],
    "trio": [trio_scope_cancel_from_sibling, trio_move_on_after, trio_fail_after],
}


def backend_name(anyio_backend: Any) -> str:
    if anyio_backend == "trio":
        return "trio"
    return "uvloop" if isinstance(anyio_backend, tuple) else "asyncio"


def cancellation_types() -> tuple[type[BaseException], ...]:
    return (anyio.get_cancelled_exc_class(), asyncio.CancelledError)


# --- the transports: (receive or load call, raw writer, end of sending, closer) -----------


class Link:
    """A receiving call (``receive`` or ``load``) and a raw byte writer feeding it."""

    def __init__(
        self,
        call: Call,
        write: Callable[[memoryview], Awaitable[None]],
        send_eof: Callable[[], Awaitable[None]],
        close: Callable[[], Awaitable[None]],
        mid_message: Callable[[], bool],
        end: type[BaseException],
    ) -> None:
        self.call, self.write, self.send_eof, self.close = call, write, send_eof, close
        self.mid_message = mid_message  # whether an interrupted call left a message half-read
        self.end = end  # what the call raises at the end of the stream


def _socket_writer(
    sock: socket.socket,
) -> tuple[Callable[[memoryview], Awaitable[None]], Callable[[], Awaitable[None]]]:
    sock.setblocking(False)

    async def write(piece: memoryview) -> None:
        while piece:
            try:
                piece = piece[sock.send(piece) :]
            except BlockingIOError:
                await anyio.wait_writable(sock)

    async def send_eof() -> None:
        sock.shutdown(socket.SHUT_WR)

    return write, send_eof


def _receiving(stream: ObjectStream, write: Any, send_eof: Any, close_sender: Any) -> Link:
    async def close() -> None:
        await stream.aclose()
        await close_sender()

    return Link(stream.receive, write, send_eof, close, lambda: stream._decoder.in_message, anyio.EndOfStream)


def _loading(stream: Any, write: Any, send_eof: Any, close: Any) -> Link:
    return Link(lambda: streampickle.load(stream), write, send_eof, close, lambda: stream in _stream._parked, EOFError)


def _anyio_sender(stream: Any) -> tuple[Any, Any, Any]:
    async def write(piece: memoryview) -> None:
        await stream.send(bytes(piece))

    return write, stream.send_eof, stream.aclose


async def receive_memory() -> Link:
    a, b = memory_stream_pair(max_buffered_sends=2)
    return _receiving(ObjectStream(b), *_anyio_sender(a))


async def receive_tcp_anyio() -> Link:
    a, b = await anyio_socket_pair("tcp")
    return _receiving(ObjectStream(b), *_anyio_sender(a))


async def receive_unix_anyio() -> Link:
    a, b = await anyio_socket_pair("unix")
    return _receiving(ObjectStream(b), *_anyio_sender(a))


async def receive_from_socket() -> Link:
    a, b = socket.socketpair()

    async def close_a() -> None:
        a.close()

    return _receiving(ObjectStream.from_socket(b), *_socket_writer(a), close_a)


async def receive_tcp_owned() -> Link:
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        a = await streampickle.connect_tcp("127.0.0.1", port)
        b = await listener.accept()
    # the sending end's socket is written raw, to cut messages anywhere; its stream only closes it
    return _receiving(b, *_socket_writer(a.extra(SocketAttribute.raw_socket)), a.aclose)


async def receive_unix_owned() -> Link:
    path = os.path.join(tempfile.mkdtemp(), "sock")
    async with await streampickle.create_unix_listener(path) as listener:
        a = await streampickle.connect_unix(path)
        b = await listener.accept()
    return _receiving(b, *_socket_writer(a.extra(SocketAttribute.raw_socket)), a.aclose)


async def load_memory() -> Link:
    a, b = memory_stream_pair(max_buffered_sends=2)
    write, send_eof, close_a = _anyio_sender(a)

    async def close() -> None:
        await b.aclose()
        await close_a()

    return _loading(b, write, send_eof, close)


async def _load_anyio(family: str) -> Link:
    a, b = await anyio_socket_pair(family)
    write, send_eof, close_a = _anyio_sender(a)

    async def close() -> None:
        await b.aclose()
        await close_a()

    return _loading(b, write, send_eof, close)


async def load_tcp_anyio() -> Link:
    return await _load_anyio("tcp")


async def load_unix_anyio() -> Link:
    return await _load_anyio("unix")


async def load_asyncio_stream_reader() -> Link:
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    reader, server_writer = await accepted
    server.close()

    async def write(piece: memoryview) -> None:
        writer.write(piece)
        await writer.drain()

    async def send_eof() -> None:
        writer.write_eof()

    async def close() -> None:
        for w in (writer, server_writer):
            w.close()
            await w.wait_closed()

    return _loading(reader, write, send_eof, close)


TRANSPORTS: dict[str, Callable[[], Awaitable[Link]]] = {
    "receive-memory": receive_memory,
    "receive-tcp-anyio": receive_tcp_anyio,
    "receive-unix-anyio": receive_unix_anyio,
    "receive-from_socket": receive_from_socket,
    "receive-connect_tcp": receive_tcp_owned,
    "receive-connect_unix": receive_unix_owned,
    "load-memory": load_memory,
    "load-tcp-anyio": load_tcp_anyio,
    "load-unix-anyio": load_unix_anyio,
    "load-asyncio-StreamReader": load_asyncio_stream_reader,
}
ASYNCIO_ONLY = {"load-asyncio-StreamReader"}


def transports_for(backend: str) -> list[str]:
    return [name for name in TRANSPORTS if backend != "trio" or name not in ASYNCIO_ONLY]


# --- the battery -------------------------------------------------------------------------

#: backend -> transport -> mechanism -> Counter(interrupted=..., mid_message=..., returned=...)
RESULTS: dict[str, dict[str, dict[str, collections.Counter[str]]]] = collections.defaultdict(dict)


async def run_case(
    link: Link, mechanisms: list[Mechanism], quota: int, seed: int
) -> dict[str, collections.Counter[str]]:
    """Receive under random cancellations until ``quota`` calls were interrupted, then drain
    to the end of the stream; check every message arrived once, in order, intact."""
    rng = random.Random(seed)
    counts = {m.__name__: collections.Counter[str]() for m in mechanisms}
    interrupted = 0
    rounds = 0
    got: list[int] = []
    stop = [False]
    sent: list[int] = []
    cancelled = cancellation_types()

    def check(value: Any) -> None:
        n = len(got)
        assert_same(value, message(n), f"message {n}")
        got.append(n)

    async def sender() -> None:
        sent.append(await send_numbered(link.write, stop, seed))
        await link.send_eof()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        while interrupted < quota:
            rounds += 1
            assert rounds <= quota * MAX_ROUNDS_PER_INTERRUPTION, (
                f"only {interrupted} of {quota} calls were interrupted in {rounds} rounds: {counts}"
            )
            mechanism = rng.choice(mechanisms)
            attempt = Attempt(link.call)
            await mechanism(attempt, tg, rng)
            count = counts[mechanism.__name__]
            if attempt.returned:
                count["returned"] += 1
                check(attempt.value)
            elif attempt.started:
                # it raised: the cancellation, and nothing else, or the battery fails here
                assert isinstance(attempt.raised, cancelled), repr(attempt.raised)
                count["interrupted"] += 1
                count["mid_message"] += link.mid_message()
                interrupted += 1
        stop[0] = True
        while True:  # the rest, uncancelled, to the end of the stream
            try:
                value = await link.call()
            except link.end:
                break
            check(value)
    await link.close()
    assert sent and got == list(range(sent[0])), "messages lost or duplicated"
    return counts


@pytest.mark.heavy
@pytest.mark.parametrize("transport", list(TRANSPORTS))
async def test_cancelled_receives_lose_nothing(anyio_backend: Any, transport: str) -> None:
    backend = backend_name(anyio_backend)
    if transport not in transports_for(backend):
        pytest.skip("an asyncio stream")
    native = NATIVE_MECHANISMS["trio" if backend == "trio" else "asyncio"]
    quota = math.ceil(PER_BACKEND / len(transports_for(backend)))
    seed = zlib.crc32(f"{backend} {transport}".encode())
    counts = await run_case(await TRANSPORTS[transport](), ANYIO_MECHANISMS + native, quota, seed)
    RESULTS[backend][transport] = counts
    mid = sum(c["mid_message"] for c in counts.values())
    assert mid, f"no call was interrupted with a message half-read: {counts}"
    print(f"\n{backend} {transport}: " + ", ".join(f"{m} {dict(c)}" for m, c in counts.items()))


@pytest.mark.heavy  # sums up the battery above
@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_every_backend_had_enough_interruptions(backend: str) -> None:
    missing = [t for t in transports_for(backend) if t not in RESULTS[backend]]
    assert not missing, f"cases that did not run or failed on {backend}: {missing}"
    by_mechanism: collections.Counter[str] = collections.Counter()
    for counts in RESULTS[backend].values():
        for mechanism, count in counts.items():
            by_mechanism[mechanism] += count["interrupted"]
    by_transport = {t: sum(c["interrupted"] for c in counts.values()) for t, counts in RESULTS[backend].items()}
    total = sum(by_mechanism.values())
    print(f"\n{backend}: {total} interruptions; by mechanism {dict(by_mechanism)}; by transport {by_transport}")
    assert total >= PER_BACKEND
    assert all(by_mechanism.values()), f"a mechanism never interrupted a call: {dict(by_mechanism)}"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_memory_stream_keeps_a_message_under_native_asyncio_cancellation() -> None:
    """The bytes sent to a waiting receive that a native asyncio cancellation reaches before it
    runs again stay for the next receive (anyio's memory object streams would drop them)."""
    a, b = memory_stream_pair()
    receiver = ObjectStream(b)
    task = asyncio.get_running_loop().create_task(receiver.receive())
    await asyncio.sleep(0)  # the receive waits for bytes
    await a.send(streampickle.dumps("first"))  # handed to the waiting receive...
    task.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await task
    await a.send(streampickle.dumps("second"))
    assert await receiver.receive() == "first"
