"""MemoryBudget: the bytes that incomplete messages hold at once, shared by streams.

Unit tests drive a budget's charges directly; the rest run real TCP connections, on asyncio,
uvloop and trio, through the three receiving paths (streampickle's own sockets, an
ObjectStream over an anyio stream, ``load``). The headline test puts a server in a process of
its own and has a thousand peers trickle data into 1 GiB claims. Every wait is for a condition
(the budget's counters, a status reply), with timeouts only as hang guards.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np
import pytest

import streampickle
from streampickle import IncompleteMessageError, Limits, MemoryBudget, ObjectStream, UsageError
from streampickle._budget import ALLOWANCE, MAX_QUANTUM, QUANTUM, Charge, default_budget_bytes

GUARD = 60  # seconds: only ever a hang's failure, never an assertion
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def claim_prefix(size: int = GiB) -> bytes:
    """Everything of a message carrying one ``size``-byte side chunk up to that chunk's data:
    what a peer sends to claim it. The array behind it is never touched, so costs nothing."""
    chunks = streampickle.Encoder().encode(np.zeros(size, np.uint8))
    assert memoryview(chunks[-1]).cast("B").nbytes == size
    return b"".join(bytes(memoryview(c).cast("B")) for c in chunks[:-1])


PREFIX = claim_prefix()


async def until(check: Callable[[], bool]) -> None:
    """Wait for ``check()`` to hold (the caller's ``fail_after`` guards against a hang)."""
    while not check():  # noqa: ASYNC110 - polls state that no event signals
        await anyio.sleep(0.005)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write ``data`` to a non-blocking socket, waiting whenever the kernel has no room."""
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        view = view[n:]


# -- the budget alone ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "64", None])
def test_max_bytes_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(UsageError, match="max_bytes"):
        MemoryBudget(bad)


def test_a_new_budget_has_nothing_in_use() -> None:
    budget = MemoryBudget(5 * MiB)
    assert (budget.max_bytes, budget.in_use, budget.waiting) == (5 * MiB, 0, 0)
    assert "5242880" in repr(budget)
    assert default_budget_bytes() >= 1


def test_reads_inside_the_allowance_take_nothing() -> None:
    budget = MemoryBudget(MiB)
    charge = Charge(budget)

    async def main() -> None:
        assert await charge.grant(0, ALLOWANCE) is None
        assert await charge.grant(ALLOWANCE - 10, 10) is None

    anyio.run(main)
    assert budget.in_use == 0


def test_a_read_past_the_allowance_is_charged_a_quantum_and_trimmed_after() -> None:
    budget = MemoryBudget(10 * MiB)
    charge = Charge(budget)

    async def main() -> None:
        # room left in the allowance, plus one quantum
        assert await charge.grant(0, 5 * MiB) == ALLOWANCE + QUANTUM
        assert budget.in_use == QUANTUM
        charge.trim(ALLOWANCE + 100)  # the read brought 100 bytes past the allowance
        assert (budget.in_use, charge.held) == (100, 100)
        # never more than the read could bring
        assert await charge.grant(ALLOWANCE + 100, 50) == 50 and budget.in_use == 150
        charge.trim(0)  # the message completed

    anyio.run(main)
    assert budget.in_use == 0


@pytest.mark.parametrize(
    "max_bytes, quantum",
    [(100 * KiB, 100 * KiB), (64 * MiB, QUANTUM), (GiB, 4 * MiB), (64 * GiB, MAX_QUANTUM)],
)
def test_a_read_asks_for_a_256th_of_the_budget_within_bounds(max_bytes: int, quantum: int) -> None:
    budget = MemoryBudget(max_bytes)
    charge = Charge(budget)
    assert anyio.run(charge.grant, ALLOWANCE, 100 * GiB) == quantum
    assert budget.in_use == quantum


async def fill_up(budget: MemoryBudget, n: int) -> Charge:
    """A charge holding ``n`` bytes of ``budget`` (``n`` at most a quantum)."""
    holder = Charge(budget)
    assert await holder.grant(0, ALLOWANCE + n) == ALLOWANCE + n
    assert holder.held == n
    return holder


@pytest.mark.anyio
async def test_a_read_with_allowance_left_is_capped_not_held() -> None:
    budget = MemoryBudget(QUANTUM)
    await fill_up(budget, QUANTUM)
    charge = Charge(budget)
    with anyio.fail_after(GUARD):
        assert await charge.grant(100, MiB) == ALLOWANCE - 100
    assert (budget.in_use, budget.waiting) == (QUANTUM, 0)


@pytest.mark.anyio
async def test_a_waiter_is_woken_when_the_budget_has_room_again() -> None:
    budget = MemoryBudget(QUANTUM)
    holder = await fill_up(budget, QUANTUM)
    charge = Charge(budget)
    got: list[int | None] = []

    async def read() -> None:
        got.append(await charge.grant(ALLOWANCE, 1000))

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await until(lambda: budget.waiting == 1)
            assert not got  # held back while the budget is full
            holder.trim(0)
    assert got == [1000] and budget.in_use == 1000 and budget.waiting == 0


@pytest.mark.anyio
async def test_a_cancelled_waiter_takes_nothing() -> None:
    budget = MemoryBudget(QUANTUM)
    holder = await fill_up(budget, QUANTUM)
    charge = Charge(budget)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(charge.grant, ALLOWANCE, 1000)
            await until(lambda: budget.waiting == 1)
            tg.cancel_scope.cancel()
    assert (budget.in_use, budget.waiting, charge.held) == (QUANTUM, 0, 0)
    holder.trim(0)
    assert budget.in_use == 0


@pytest.mark.anyio
async def test_the_first_in_line_leaving_lets_the_next_through() -> None:
    budget = MemoryBudget(QUANTUM)
    holder = await fill_up(budget, QUANTUM // 2)
    big, small = Charge(budget), Charge(budget)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            big_scope = anyio.CancelScope()

            async def big_read() -> None:
                with big_scope:
                    await big.grant(ALLOWANCE, QUANTUM)  # needs all of it: waits

            tg.start_soon(big_read)
            await until(lambda: budget.waiting == 1)
            tg.start_soon(small.grant, ALLOWANCE, 1000)  # would fit, but doesn't pass big
            await until(lambda: budget.waiting == 2)
            assert small.held == 0
            big_scope.cancel()  # big gives up
    assert (small.held, big.held, budget.waiting) == (1000, 0, 0)
    holder.trim(0)
    small.trim(0)
    assert budget.in_use == 0


@pytest.mark.anyio
async def test_a_sole_holder_goes_past_the_budget_and_others_wait_for_it() -> None:
    budget = MemoryBudget(QUANTUM)
    holder = await fill_up(budget, QUANTUM)
    other = Charge(budget)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(other.grant, ALLOWANCE, 1000)
            await until(lambda: budget.waiting == 1)
            # the holder is the only one holding anything: its next read proceeds, past the budget
            assert await holder.grant(ALLOWANCE + QUANTUM, 5 * MiB) == QUANTUM
            assert budget.in_use == 2 * QUANTUM > budget.max_bytes
            holder.trim(0)  # its message is done: the other one goes on
    assert (budget.in_use, other.held, budget.waiting) == (1000, 1000, 0)


@pytest.mark.anyio
async def test_a_waiting_sole_holder_is_let_through_from_behind_in_the_queue() -> None:
    budget = MemoryBudget(QUANTUM + QUANTUM // 2)
    first = await fill_up(budget, QUANTUM)
    second = await fill_up(budget, QUANTUM // 2)
    head, behind = Charge(budget), Charge(budget)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(head.grant, ALLOWANCE, QUANTUM)
            await until(lambda: budget.waiting == 1)
            tg.start_soon(first.grant, ALLOWANCE + QUANTUM, QUANTUM)  # full: first waits too
            await until(lambda: budget.waiting == 2)
            second.trim(0)  # now first holds all there is: it goes, though head can't
            await until(lambda: budget.waiting == 1)
            assert first.held == 2 * QUANTUM and head.held == 0
            first.trim(0)
    assert (head.held, budget.in_use, behind.held) == (QUANTUM, QUANTUM, 0)


# -- where a budget is given --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_budget_arguments_take_a_memory_budget_or_none() -> None:
    with pytest.raises(UsageError, match="budget"):
        ObjectStream(None, budget=64 * MiB)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="budget"):
        await streampickle.load(object(), budget="all")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="budget"):
        await streampickle.create_tcp_listener(local_host="127.0.0.1", budget=5)  # type: ignore[arg-type]
    shared = MemoryBudget(MiB)
    one = await streampickle.create_tcp_listener(local_host="127.0.0.1")
    two = await streampickle.create_tcp_listener(local_host="127.0.0.1", budget=shared)
    three = await streampickle.create_tcp_listener(local_host="127.0.0.1", budget=None)
    four = await streampickle.create_tcp_listener(local_host="127.0.0.1")
    async with one, two, three, four:
        assert isinstance(one.budget, MemoryBudget) and one.budget.max_bytes == default_budget_bytes()
        assert four.budget is not one.budget  # each listener has its own by default
        assert two.budget is shared and three.budget is None


@pytest.mark.anyio
async def test_a_listeners_connections_share_its_budget() -> None:
    budget = MemoryBudget(MiB)
    listener = await streampickle.create_tcp_listener(local_host="127.0.0.1", budget=budget)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener:
        client = await streampickle.connect_tcp("127.0.0.1", port, budget=budget)
        server = await listener.accept()
        async with client, server:
            assert client._charge is not None and server._charge is not None
            assert client._charge.budget is server._charge.budget is budget


# -- real connections ---------------------------------------------------------------------------------

Receive = Callable[[], Awaitable[Any]]


@pytest.fixture(params=["from_socket", "anyio_stream", "load"])
def receiver_kind(request: pytest.FixtureRequest) -> str:
    """streampickle's zero-copy socket path, ObjectStream over an anyio TCP stream (a copying
    transport on asyncio), and ``load`` on an anyio TCP stream."""
    return request.param


async def tcp_pair(kind: str, budget: MemoryBudget, limits: Limits | None = None) -> tuple[Receive, socket.socket, Any]:
    """``(receive, peer, closer)``: ``receive()`` reads one object on our end of a TCP
    connection under ``budget``; ``peer`` is a non-blocking socket at the other end."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        if kind == "from_socket":
            ours = socket.create_connection(("127.0.0.1", port))
            peer, _ = server.accept()
            stream = ObjectStream.from_socket(ours, limits=limits, budget=budget)
            receive, closer = stream.receive, stream
        else:
            anyio_stream = await anyio.connect_tcp("127.0.0.1", port)
            peer, _ = server.accept()
            if kind == "anyio_stream":
                stream = ObjectStream(anyio_stream, limits=limits, budget=budget)
                receive, closer = stream.receive, stream
            else:
                async def receive() -> Any:
                    return await streampickle.load(anyio_stream, limits=limits, budget=budget)

                closer = anyio_stream
    finally:
        server.close()
    peer.setblocking(False)
    return receive, peer, closer


def _has_read(closer: Any, n: int) -> bool:
    """Whether an object stream's decoder has taken ``n`` bytes (``load()``'s decoder lives in
    the call: always true for it)."""
    stream = closer if isinstance(closer, ObjectStream) else None
    return stream is None or stream._decoder.progress[0] >= n


# What a peer that sent a 1 GiB claim and 2 MiB of it holds, once all of that has been read.
HOG = len(PREFIX) + 2 * MiB - ALLOWANCE


def holds(budget: MemoryBudget, n: int) -> bool:
    """Whether ``budget`` has ``n`` bytes in use, or up to what a pending read was granted
    more: a quantum, or the next 2 MiB page of a side chunk that large (a stream that finds
    others waiting takes budget only for bytes already there, but one alone doesn't wait)."""
    return n <= budget.in_use <= n + max(QUANTUM, 2 * MiB)


def an_array(nbytes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


@pytest.mark.anyio
async def test_one_message_larger_than_the_budget_is_received_alone(receiver_kind: str) -> None:
    budget = MemoryBudget(256 * KiB)
    array = an_array(4 * MiB)
    receive, peer, closer = await tcp_pair(receiver_kind, budget)
    with peer, anyio.fail_after(GUARD):
        async with closer, anyio.create_task_group() as tg:
            tg.start_soon(send_all, peer, streampickle.dumps(array))
            got = await receive()
    assert np.array_equal(got, array)
    assert budget.in_use == 0


@pytest.mark.anyio
async def test_a_held_connection_proceeds_intact_when_the_holder_goes(receiver_kind: str) -> None:
    """Backpressure, not failure: a stalled peer holds the whole budget; another connection's
    large message waits, while small messages on a third connection are still served. When
    the stalled peer's connection closes, the waiting message arrives bit-exact."""
    budget = MemoryBudget(MiB)
    array = an_array(3 * MiB // 2, seed=1)
    hog_receive, hog, hog_closer = await tcp_pair(receiver_kind, budget)
    held_receive, held, held_closer = await tcp_pair(receiver_kind, budget)
    small_receive, small, small_closer = await tcp_pair(receiver_kind, budget)
    results: dict[str, Any] = {}

    async def receive_into(name: str, receive: Receive) -> None:
        try:
            results[name] = await receive()
        except Exception as exc:  # noqa: BLE001 - recorded: the outcome is what is compared
            results[name] = exc

    with hog, held, small, anyio.fail_after(GUARD):
        async with hog_closer, held_closer, small_closer, anyio.create_task_group() as tg:
            # the hog is alone: it takes 2 MiB, past the budget, and stalls
            tg.start_soon(receive_into, "hog", hog_receive)
            await send_all(hog, PREFIX + bytes(2 * MiB))
            await until(lambda: holds(budget, HOG))
            # the held message gets its free allowance and then waits
            tg.start_soon(send_all, held, streampickle.dumps(array))
            tg.start_soon(receive_into, "held", held_receive)
            await until(lambda: budget.waiting == 1)
            for i in range(3):  # small messages are not held back
                await send_all(small, streampickle.dumps(("small", i)))
                assert await small_receive() == ("small", i)
            assert "held" not in results and budget.waiting == 1
            hog.shutdown(socket.SHUT_WR)  # the hog's peer goes: its message can't complete
            await until(lambda: "held" in results)
    assert isinstance(results["hog"], IncompleteMessageError)
    assert np.array_equal(results["held"], array)
    assert (budget.in_use, budget.waiting) == (0, 0)


# -- nothing leaks ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_cancelled_receive_keeps_what_its_stream_holds_until_closed(receiver_kind: str) -> None:
    budget = MemoryBudget(MiB)
    receive, peer, closer = await tcp_pair(receiver_kind, budget)
    held = len(PREFIX) + 100 * KiB - ALLOWANCE  # a side chunk's first 2 MiB: counted by the byte
    with peer, anyio.fail_after(GUARD):
        async with closer:
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive)
                await send_all(peer, PREFIX + bytes(100 * KiB))
                # cancelled once the stream's decoder holds every byte sent (a grant alone may
                # come before the bytes it is for)
                await until(lambda: holds(budget, held) and _has_read(closer, len(PREFIX) + 100 * KiB))
                tg.cancel_scope.cancel()
            # an object stream still holds the partial message (its next receive goes on with
            # it); load()'s charge ends with the call
            assert budget.in_use == (0 if receiver_kind == "load" else held)
    assert budget.in_use == 0


@pytest.mark.anyio
async def test_a_peer_closing_inside_a_message_returns_its_charge(receiver_kind: str) -> None:
    budget = MemoryBudget(MiB)
    receive, peer, closer = await tcp_pair(receiver_kind, budget)
    with peer, anyio.fail_after(GUARD):
        async with closer, anyio.create_task_group() as tg:

            async def send_and_stop() -> None:
                await send_all(peer, PREFIX + bytes(100 * KiB))
                peer.shutdown(socket.SHUT_WR)

            tg.start_soon(send_and_stop)
            with pytest.raises(IncompleteMessageError):
                await receive()
            assert budget.in_use == 0


@pytest.mark.anyio
async def test_a_deadline_while_waiting_for_budget_returns_everything(receiver_kind: str) -> None:
    """Messages that together need more than the budget wait for each other until their
    deadline; the one that hits it gives back all it held."""
    budget = MemoryBudget(MiB)
    short = Limits(max_message_seconds=0.5)
    hog_receive, hog, hog_closer = await tcp_pair(receiver_kind, budget)
    receive, peer, closer = await tcp_pair(receiver_kind, budget, limits=short)
    with hog, peer, anyio.fail_after(GUARD):
        async with hog_closer, closer, anyio.create_task_group() as tg:
            tg.start_soon(hog_receive)
            await send_all(hog, PREFIX + bytes(2 * MiB))
            await until(lambda: holds(budget, HOG))
            tg.start_soon(send_all, peer, PREFIX + bytes(2 * MiB))
            with pytest.raises(streampickle.DeadlineExceededError) as info:
                await receive()
            assert info.value.limit == "max_message_seconds"
            assert info.value.received >= ALLOWANCE  # it had its allowance, then waited
            assert holds(budget, HOG) and budget.waiting == 0
            tg.cancel_scope.cancel()
    assert budget.in_use == 0


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["from_socket", "anyio_stream"])
async def test_closing_a_stream_wakes_its_read_waiting_for_budget(kind: str) -> None:
    budget = MemoryBudget(MiB)
    hog_receive, hog, hog_closer = await tcp_pair(kind, budget)
    receive, peer, stream = await tcp_pair(kind, budget)
    errors: list[BaseException] = []

    async def receive_and_keep_error() -> None:
        try:
            await receive()
        except anyio.ClosedResourceError as exc:
            errors.append(exc)

    with hog, peer, anyio.fail_after(GUARD):
        async with hog_closer, anyio.create_task_group() as tg:
            tg.start_soon(hog_receive)
            await send_all(hog, PREFIX + bytes(2 * MiB))
            await until(lambda: holds(budget, HOG))
            tg.start_soon(send_all, peer, PREFIX + bytes(2 * MiB))
            async with anyio.create_task_group() as inner:
                inner.start_soon(receive_and_keep_error)
                await until(lambda: budget.waiting == 1)
                await stream.aclose()
            assert len(errors) == 1
            assert holds(budget, HOG) and budget.waiting == 0
            tg.cancel_scope.cancel()
    assert budget.in_use == 0


# -- a thousand stalled peers against a server in its own process --------------------------------------

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_budget_server.py")
CONNECTIONS = 1000
SERVER_BUDGET = 64 * MiB
PIECE, PIECES = 16 * KiB, 16  # each peer offers 256 KiB of its claimed 1 GiB: 250 MiB in all
SLACK = 64 * MiB  # for what the budget doesn't count: allowances, connections' objects


def raise_open_file_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files, and the hard limit (ulimit -Hn) is {hard}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def attack(port: int) -> dict[str, Any]:
    """Open the peers, have each send its claim, then trickle data into it until the server's
    budget is full and every peer has had its allowance read; a good client asks for the
    server's status all along, and is answered."""
    good = await streampickle.connect_tcp("127.0.0.1", port, budget=None)
    async with good:

        async def status() -> dict[str, Any]:
            await good.send("status")
            reply: dict[str, Any] = await good.receive()
            return reply

        async def wait_for(check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
            while not check(reply := await status()):  # noqa: ASYNC110 - polls the other process
                await anyio.sleep(0.02)
            return reply

        socks: list[socket.socket] = []
        try:
            for _ in range(CONNECTIONS):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setblocking(False)
                socks.append(sock)
                await send_all(sock, PREFIX)
            # every claim has been read: from here the peers' bytes all go to side chunks
            await wait_for(lambda s: s["started"] == CONNECTIONS)
            piece = bytes(PIECE)

            async def trickle(sock: socket.socket) -> None:
                for _ in range(PIECES):
                    await send_all(sock, piece)

            async with anyio.create_task_group() as tg:
                for sock in socks:
                    tg.start_soon(trickle, sock)
                full = await wait_for(
                    lambda s: s["in_use"] is None
                    or (s["in_use"] > SERVER_BUDGET - QUANTUM and s["past_allowance"] == CONNECTIONS)
                )
                tg.cancel_scope.cancel()
            full["served"] = [await good.send(i) or await good.receive() for i in range(3)]
            return full
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.parametrize("server_backend", ["asyncio", "uvloop", "trio"])
def test_a_thousand_stalled_peers_hold_the_server_to_its_budget(server_backend: str) -> None:
    if server_backend == "uvloop":
        pytest.importorskip("uvloop")
    raise_open_file_limit(CONNECTIONS + 100)  # the server raises its own soft limit the same way
    server = subprocess.Popen(
        [sys.executable, SERVER, server_backend, str(SERVER_BUDGET), str(len(PREFIX)), "thp"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        port = json.loads(server.stdout.readline())["port"]

        async def guarded() -> dict[str, Any]:
            with anyio.fail_after(GUARD):
                return await attack(port)

        full = anyio.run(guarded)
        server.stdin.close()
        final = json.loads(server.stdout.readline())
        assert server.wait(timeout=GUARD) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for pipe in (server.stdin, server.stdout):  # an unclosed one warns (ResourceWarning)
            if pipe is not None:
                pipe.close()
    # the budget is full and every peer had its allowance read: the most the server holds
    assert full["in_use"] <= SERVER_BUDGET and full["waiting"] > 0
    assert full["rss_growth"] < SERVER_BUDGET + SLACK, full
    assert full["served"] == [0, 1, 2]  # the good client was answered all along
    assert final["in_use"] == 0  # closing every connection gave everything back


def test_a_decoder_counts_a_huge_page_whole_from_its_first_byte() -> None:
    """What a budget charges: bytes that arrived, except that a side chunk of 2 MiB or more
    (memory aligned for transparent huge pages) counts each 2 MiB page it touched whole."""
    from streampickle import Decoder, Encoder

    page = 2 * MiB
    message = b"".join(bytes(c) for c in Encoder().encode(np.ones(3 * page, np.uint8)))
    chunk_at = len(message) - 3 * page
    decoder = Decoder()
    decoder.feed(message[:chunk_at])
    decoder.get_buffer()
    assert decoder.committed == chunk_at
    assert decoder.commit_for(1) == page and decoder.commit_for(page + 1) == 2 * page
    assert decoder.readable_within(page - 1) == 0 and decoder.readable_within(page) == page
    decoder.feed(message[chunk_at : chunk_at + 10])
    assert decoder.committed == chunk_at + page
    assert decoder.commit_for(page - 10) == 0 and decoder.readable_within(0) == page - 10
    decoder.feed(message[chunk_at + 10 : -1])
    assert decoder.committed == chunk_at + 3 * page  # the last byte's page is already counted
    decoder.feed(message[-1:])
    assert next(decoder).nbytes == 3 * page and decoder.committed == 0


def test_under_a_budget_a_large_side_chunk_starts_with_ordinary_pages() -> None:
    """A stream under a budget reads ahead of a message's header into its side chunk unasked;
    those first bytes must commit memory by the byte, not a 2 MiB huge page each (a thousand
    peers would make that 2 GiB). So the first 2 MiB are counted, and backed, by the byte."""
    from streampickle import Decoder, Encoder

    page = 2 * MiB
    message = b"".join(bytes(c) for c in Encoder().encode(np.ones(3 * page, np.uint8)))
    chunk_at = len(message) - 3 * page
    decoder = Decoder()
    decoder.budgeted = True  # what a stream with a budget sets
    decoder.feed(message[: chunk_at + 10])
    assert decoder.committed == chunk_at + 10
    assert decoder.commit_for(100) == 100 and decoder.readable_within(100) == 100
    assert decoder.commit_for(page) == 2 * page - 10 and decoder.readable_within(page) == page - 10
    decoder.feed(message[chunk_at + 10 : chunk_at + page + 1])
    assert decoder.committed == chunk_at + 2 * page  # past the head: whole pages again
    decoder.feed(message[chunk_at + page + 1 :])
    assert next(decoder).nbytes == 3 * page and decoder.committed == 0
