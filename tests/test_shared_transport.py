"""Shared-memory hand-off through real sockets: arrays made with ``shared_empty`` travel between
processes as descriptors (SCM_RIGHTS) beside a few bytes, over ``connect_unix`` /
``create_unix_listener``, ``ObjectStream.from_socket`` and ``sync``, on asyncio, uvloop and
trio.

What is checked: a child process gets a 64 MiB array intact, for a few hundred bytes on the
wire, as ordinary writable numpy memory shared with the sender (each side sees the other's
writes); views of one buffer share a descriptor; ordinary arrays still take the socket path; a
receiver that did not opt in refuses such a message; a hostile sender's descriptors (unclaimed,
of the wrong kind, too many) are refused and none is left open; cancellation loses nothing on
receive and breaks only the send side on send; and where the platform has no sealed memfd
(``AVAILABLE`` false) ``shared_empty`` says so while the stream still carries ordinary arrays.

Descriptor leaks are counted in ``/proc/self/fd`` after a garbage collection: a received
descriptor is closed once its range is mapped (or refused), so the count goes back to where it
was.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import mmap
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import numpy as np
import pytest

import streampickle
from _pairs import anyio_socket_pair
from _util import assert_same, sample_objects, smaps_kib
from streampickle import ObjectStream, ProtocolError, UsageError, _fdpass, _shm, sync
from streampickle._decoder import Decoder
from streampickle._encoder import Encoder

pytestmark = pytest.mark.skipif(not _shm.AVAILABLE, reason="no sealed memfd on this platform")

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shm_peer.py")
PAGE = mmap.PAGESIZE


def open_fds() -> int:
    """How many descriptors this process has open, after freeing what is garbage."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def backend_name(anyio_backend: Any) -> str:
    if isinstance(anyio_backend, tuple):
        return "uvloop" if anyio_backend[1].get("use_uvloop") else anyio_backend[0]
    return str(anyio_backend)


def run_on(backend: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``anyio.run`` on a backend named as ``backend_name`` names it."""
    if backend == "uvloop":
        return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(fn, *args, backend=backend)


def wire(chunks: list[Any]) -> bytes:
    """A message's bytes, joined."""
    return b"".join(chunks)


def sealed_memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def shared_pair() -> tuple[ObjectStream, ObjectStream]:
    a, b = socket.socketpair()
    return ObjectStream.from_socket(a, shared_memory=True), ObjectStream.from_socket(b, shared_memory=True)


# --- a child process receives ----------------------------------------------------------------

N = (64 << 20) // 8  # a 64 MiB int64 array
PLAIN = 1 << 18  # a 2 MiB ordinary one


@contextlib.asynccontextmanager
async def child_stream(channel: str, backend: str, tmp_path: Any) -> AsyncIterator[tuple[ObjectStream, Any]]:
    """A shared-memory stream to a child running _shm_peer.py, and the child's process."""
    if channel == "unix":
        path = str(tmp_path / "sock")
        async with await streampickle.create_unix_listener(path, shared_memory=True) as listener:
            proc = await anyio.open_process(
                [sys.executable, PEER, "unix", backend, path], stdin=None, stdout=None, stderr=None
            )
            try:
                stream = await listener.accept()
            except BaseException:
                proc.kill()
                await proc.aclose()
                raise
    else:
        mine, theirs = socket.socketpair()
        with theirs:
            proc = await anyio.open_process(
                [sys.executable, PEER, "fd", backend, str(theirs.fileno())],
                stdin=None, stdout=None, stderr=None, pass_fds=[theirs.fileno()],
            )
        stream = ObjectStream.from_socket(mine, shared_memory=True)
    try:
        async with stream:
            yield stream, proc
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("channel", ["unix", "fd"])
async def test_a_child_process_maps_a_64_mib_array_and_sees_the_writes(
    anyio_backend: Any, channel: str, tmp_path: Any
) -> None:
    shared = streampickle.shared_empty(N, np.int64)
    shared[:] = np.arange(N)
    plain = np.arange(PLAIN) * 3
    async with child_stream(channel, backend_name(anyio_backend), tmp_path) as (stream, _):
        transport = stream._t
        before = transport.sent
        await stream.send(shared)
        shared_bytes = transport.sent - before
        before = transport.sent
        await stream.send(plain)
        plain_bytes = transport.sent - before
        found = await stream.receive()
        assert found == {
            "intact": True,
            "plain_intact": True,
            "type": "ndarray",
            "writeable": True,
            "page_offset": shared.ctypes.data % PAGE,
            # the child maps the file's huge pages whole, where the sender got them
            "huge_kib": smaps_kib(shared.ctypes.data, "ShmemPmdMapped"),
        }
        shared[0] = -1  # after the send: the child sees it
        await stream.send("look")
        assert await stream.receive() == -1
        assert shared[1] == -2  # the child's write, after it received the array
        await stream.send("end")
    assert shared_bytes < 4096, shared_bytes  # a descriptor and a few numbers, not 64 MiB
    assert plain_bytes > plain.nbytes  # an ordinary array goes through the socket


@pytest.mark.anyio
async def test_a_listener_under_a_small_budget_takes_shared_arrays(anyio_backend: Any, tmp_path: Any) -> None:
    """A listener's connections share a MemoryBudget; a shared array's memory is not the
    receiver's to budget (it arrives mapped, not in bytes), so 8 MiB passes a 1 MiB budget."""
    path = str(tmp_path / "sock")
    budget = streampickle.MemoryBudget(1 << 20)
    big = streampickle.shared_empty(8 << 20, np.uint8)
    big[:] = 3
    small = np.arange(1000)
    async with await streampickle.create_unix_listener(path, shared_memory=True, budget=budget) as listener:
        client = await streampickle.connect_unix(path, shared_memory=True)
        server = await listener.accept()
    async with client, server:
        for _ in range(3):
            await client.send({"big": big, "small": small})
            got = await server.receive()
            assert_same(got, {"big": big, "small": small})
        got["big"][0] = 5
        assert big[0] == 5


class CountingSocket(socket.socket):
    """A socket that counts the bytes its ``sendmsg`` calls sent."""

    sent = 0

    def sendmsg(self, *args: Any) -> int:
        n = super().sendmsg(*args)
        self.sent += n
        return n


def test_a_child_process_maps_a_64_mib_array_with_sync() -> None:
    shared = streampickle.shared_empty(N, np.int64)
    shared[:] = np.arange(N)
    plain = np.arange(PLAIN) * 3
    first, theirs = socket.socketpair()
    sock = CountingSocket(fileno=first.detach())
    with sock, theirs:
        proc = subprocess.Popen([sys.executable, PEER, "sync", "-", str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        try:
            sync.dump(shared, sock, shared_memory=True)
            shared_bytes = sock.sent
            sync.dump(plain, sock, shared_memory=True)
            plain_bytes = sock.sent - shared_bytes
            found = sync.load(sock, shared_memory=True)
            assert found["intact"] and found["plain_intact"] and found["writeable"]
            assert found["type"] == "ndarray" and found["page_offset"] == shared.ctypes.data % PAGE
            assert found["huge_kib"] == smaps_kib(shared.ctypes.data, "ShmemPmdMapped")
            shared[0] = -1
            sync.dump("look", sock, shared_memory=True)
            assert sync.load(sock, shared_memory=True) == -1
            assert shared[1] == -2
            sync.dump("end", sock, shared_memory=True)
            assert proc.wait() == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert shared_bytes < 4096, shared_bytes
    assert plain_bytes > plain.nbytes


# --- what travels, and how --------------------------------------------------------------------


def test_views_of_one_buffer_share_one_descriptor() -> None:
    base = streampickle.shared_empty(1 << 16, np.float64)
    other = streampickle.shared_empty(100, np.int32)
    views = [base[:1000], base[1000:], base.reshape(256, 256)[10], other, base]
    chunks = Encoder(shared_memory=True).encode(views)
    fds = _shm.descriptors_of(chunks)
    assert sorted(fds) == sorted({_shm.find([memoryview(base)])[0][0], _shm.find([memoryview(other)])[0][0]})
    assert len(wire(chunks)) < 4096


@pytest.mark.anyio
async def test_views_arrive_as_views_of_the_same_memory(anyio_backend: Any) -> None:
    base = streampickle.shared_empty((64, 1024), np.float64)
    base[...] = np.arange(base.size).reshape(base.shape)
    a, b = shared_pair()
    async with a, b:
        await a.send([base[:10], base[10:], base[20], base])
        head, tail, row, whole = await b.receive()
        assert_same([head, tail, row, whole], [base[:10], base[10:], base[20], base])
        tail[0, 0] = -5.0  # one received view's write: the sender's array and the other views see it
        assert base[10, 0] == -5.0 and whole[10, 0] == -5.0
        base[20, 3] = -7.0
        assert row[3] == -7.0 and whole[20, 3] == -7.0


@pytest.mark.anyio
async def test_a_dict_of_64_separate_shared_arrays_arrives_intact(anyio_backend: Any) -> None:
    arrays = {f"a{i}": streampickle.shared_empty(1000 + i, np.int64) for i in range(64)}
    for i, arr in enumerate(arrays.values()):
        arr[:] = np.arange(len(arr)) * i
    assert len(_shm.descriptors_of(Encoder(shared_memory=True).encode(arrays))) == 64
    a, b = shared_pair()
    baseline = open_fds()
    async with a, b:
        await a.send(arrays)
        got = await b.receive()
        assert_same(got, arrays)
        assert open_fds() == baseline  # each received descriptor closed once mapped
        await a.send(arrays)  # again, on the same connection
        assert_same(await b.receive(), arrays)


@pytest.mark.anyio
async def test_ordinary_objects_on_a_shared_memory_connection_arrive_intact(anyio_backend: Any) -> None:
    objects = sample_objects()
    big = np.arange(3 << 20, dtype=np.uint8)  # larger than a read-ahead: read straight into place
    a, b = shared_pair()
    async with a, b:
        for obj in objects.values():
            await a.send(obj)
            assert_same(await b.receive(), obj)
        mixed = {"big": big, "shared": streampickle.shared_copy(big)}
        for obj in (big, mixed):
            before = a._t.sent
            await a.send(obj)
            # the ordinary array's bytes went through the socket, the shared one's didn't
            assert big.nbytes < a._t.sent - before < big.nbytes + 4096
            assert_same(await b.receive(), obj)


class ReadCountingSocket(socket.socket):
    """A socket that counts its reads of each kind."""

    plain_reads = 0
    ancillary_reads = 0

    def recv_into(self, *args: Any) -> int:
        self.plain_reads += 1
        return super().recv_into(*args)

    def recvmsg_into(self, *args: Any) -> Any:
        self.ancillary_reads += 1
        return super().recvmsg_into(*args)


@pytest.mark.anyio
async def test_only_reads_that_can_start_a_message_ask_for_descriptors(anyio_backend: Any) -> None:
    """A message's descriptors come with its first byte, so the many reads of a large
    ordinary array inside its message are plain reads, which cost less; the reads at message
    boundaries still take descriptors, so shared arrays that follow arrive mapped."""
    x, y = socket.socketpair()
    counting = ReadCountingSocket(fileno=y.detach())
    sender = ObjectStream.from_socket(x, shared_memory=True)
    receiver = ObjectStream.from_socket(counting, shared_memory=True)
    big = np.arange(8 << 20, dtype=np.uint8)  # many reads: larger than the socket's buffers
    shared = streampickle.shared_copy(np.arange(1000))
    async with sender, receiver, anyio.create_task_group() as tg:
        tg.start_soon(sender.send, big)
        assert np.array_equal(await receiver.receive(), big)
        plain, ancillary = counting.plain_reads, counting.ancillary_reads
        assert plain > ancillary and ancillary <= 2, (plain, ancillary)  # the header's reads
        tg.start_soon(sender.send, shared)
        got = await receiver.receive()
        assert np.array_equal(got, shared) and counting.ancillary_reads > ancillary
        got[0] = 7
        assert shared[0] == 7  # mapped: the descriptor came with the first byte's read


@pytest.mark.anyio
async def test_an_anyio_unix_stream_carries_shared_arrays(anyio_backend: Any) -> None:
    client, server = await anyio_socket_pair("unix")
    a = ObjectStream(client, shared_memory=True)
    b = ObjectStream(server, shared_memory=True)
    shared = streampickle.shared_copy(np.arange(1 << 16))
    async with a, b:
        before = a._t.sent
        await a.send(shared)
        assert a._t.sent - before < 4096
        got = await b.receive()
        got[5] = -1
        assert shared[5] == -1


@pytest.mark.anyio
async def test_shared_memory_needs_a_unix_socket_and_no_key(anyio_backend: Any, tmp_path: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, pytest.raises(UsageError, match="Unix socket"):
        ObjectStream.from_socket(tcp, shared_memory=True)
    client, server = await anyio_socket_pair("tcp")
    async with client, server:
        with pytest.raises(UsageError, match="Unix socket"):
            ObjectStream(client, shared_memory=True)
    a, b = streampickle.testing.memory_stream_pair()
    async with a, b:
        with pytest.raises(UsageError, match="Unix socket"):
            ObjectStream(a, shared_memory=True)
    x, y = socket.socketpair()
    with x, y, pytest.raises(UsageError, match="key"):
        ObjectStream.from_socket(x, key=b"k" * 32, shared_memory=True)
    path = str(tmp_path / "sock")
    with pytest.raises(UsageError, match="key"):
        await streampickle.create_unix_listener(path, key=b"k" * 32, shared_memory=True)
    with pytest.raises(UsageError, match="key"):
        await streampickle.connect_unix(path, key=b"k" * 32, shared_memory=True)
    assert not (tmp_path / "sock").exists()  # refused before anything was made


def test_sync_shared_memory_needs_a_unix_socket_and_no_key(tmp_path: Any) -> None:
    with open(tmp_path / "f", "w+b") as f:
        with pytest.raises(UsageError, match="Unix socket"):
            sync.dump(1, f, shared_memory=True)
        with pytest.raises(UsageError, match="Unix socket"):
            sync.load(f, shared_memory=True)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        with pytest.raises(UsageError, match="Unix socket"):
            sync.dump(1, tcp, shared_memory=True)
        with pytest.raises(UsageError, match="Unix socket"):
            sync.load(tcp, shared_memory=True)
    x, y = socket.socketpair()
    with x, y:
        with pytest.raises(UsageError, match="key"):
            sync.dump(1, x, key=b"k" * 32, shared_memory=True)
        with pytest.raises(UsageError, match="key"):
            sync.load(y, key=b"k" * 32, shared_memory=True)


# --- a receiver that did not opt in -----------------------------------------------------------


@pytest.mark.anyio
async def test_a_receiver_that_did_not_opt_in_refuses_and_holds_no_descriptor(anyio_backend: Any) -> None:
    shared = streampickle.shared_copy(np.arange(1 << 16))
    x, y = socket.socketpair()
    sender = ObjectStream.from_socket(x, shared_memory=True)
    receiver = ObjectStream.from_socket(y)
    baseline = open_fds()
    async with sender, receiver:
        await sender.send(shared)
        with pytest.raises(ProtocolError, match="shared_memory"):
            await receiver.receive()
        assert open_fds() == baseline


def test_a_sync_receiver_that_did_not_opt_in_refuses_and_holds_no_descriptor() -> None:
    shared = streampickle.shared_copy(np.arange(1 << 16))
    x, y = socket.socketpair()
    with x, y:
        baseline = open_fds()
        sync.dump(shared, x, shared_memory=True)
        with pytest.raises(ProtocolError, match="shared_memory"):
            sync.load(y)
        assert open_fds() == baseline


def test_a_sync_load_that_fails_inside_a_message_closes_its_descriptors() -> None:
    chunks = Encoder(shared_memory=True).encode(streampickle.shared_copy(np.arange(1 << 16)))
    data, fds = wire(chunks), _shm.descriptors_of(chunks)
    x, y = socket.socketpair()
    with x, y:
        baseline = open_fds()
        x.sendmsg([data[:3]], _fdpass.ancillary(fds))
        y.settimeout(0.05)  # ends the wait for the rest; nothing is asserted about time
        with pytest.raises(streampickle.IncompleteMessageError) as caught:
            sync.load(y, shared_memory=True)
        assert isinstance(caught.value.__cause__, TimeoutError)
        assert open_fds() == baseline  # while the error (and its traceback) lives


# --- a hostile sender -------------------------------------------------------------------------

RECEIVERS = ["sync", "asyncio", "uvloop", "trio"]


def receive_from(receiver: str, sock: socket.socket, count: int = 1) -> list[Any]:
    """``count`` messages from ``sock`` with shared memory on, by ``sync.load`` or an
    ObjectStream on an event loop; the socket is closed afterwards, whatever happens."""
    if receiver == "sync":
        with sock:
            return [sync.load(sock, shared_memory=True) for _ in range(count)]

    async def receive() -> list[Any]:
        async with ObjectStream.from_socket(sock, shared_memory=True) as stream:
            return [await stream.receive() for _ in range(count)]

    return run_on(receiver, receive)


def shared_message(pages: int = 4) -> tuple[bytes, int, Any]:
    """A message carrying one shared array of ``pages`` pages: its bytes, the descriptor it
    claims (to substitute) and the array (to keep alive)."""
    arr = streampickle.shared_empty(pages * PAGE, np.uint8)
    chunks = Encoder(shared_memory=True).encode(arr)
    (fd,) = _shm.descriptors_of(chunks)
    return wire(chunks), fd, arr


def refused_without_leak(receiver: str, data: bytes, fds: list[int], match: str | None = None) -> None:
    """Send ``data`` with ``fds`` on a fresh socket pair: the receiver refuses it with a
    ProtocolError and has no descriptor left open once both ends are closed."""
    baseline = open_fds()
    x, y = socket.socketpair()
    with x:
        socket.send_fds(x, [data], fds)
        with pytest.raises(ProtocolError, match=match):
            # An ObjectStream returns a message that completed before its decoder failed
            # first, then raises: a message's descriptors are unclaimed only once it is whole.
            receive_from(receiver, y, count=2)
    assert open_fds() == baseline


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_descriptors_with_a_message_that_claims_none_are_refused(receiver: str) -> None:
    memfd = sealed_memfd(PAGE)
    try:
        refused_without_leak(receiver, Encoder().encode({"a": 1})[0], [memfd, memfd], match="claimed")
    finally:
        os.close(memfd)


@pytest.mark.parametrize("receiver", RECEIVERS)
@pytest.mark.parametrize("kind", ["pipe", "regular file", "unsealed memfd", "too small", "write-sealed", "none"])
def test_a_descriptor_of_the_wrong_kind_is_refused(receiver: str, kind: str, tmp_path: Any) -> None:
    data, _, arr = shared_message(pages=4)
    mine: list[int] = []
    if kind == "pipe":
        r, w = os.pipe()
        mine += [r, w]
        fds = [r]
    elif kind == "regular file":
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 4 * PAGE)
        mine = fds = [fd]
    elif kind == "unsealed memfd":
        mine = fds = [sealed_memfd(4 * PAGE, seals=0)]
    elif kind == "too small":
        mine = fds = [sealed_memfd(PAGE)]
    elif kind == "write-sealed":
        mine = fds = [sealed_memfd(4 * PAGE, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)]
    else:
        fds = []  # the message claims a descriptor that never came
    try:
        refused_without_leak(receiver, data, fds)
    finally:
        _shm.close_all(mine)
    del arr


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_more_descriptors_than_the_ancillary_space_holds_are_refused(
    receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fdpass, "ANCILLARY_SPACE", socket.CMSG_SPACE(4 * array.array("i").itemsize))
    data, fd, arr = shared_message()
    extra = [os.dup(fd) for _ in range(_shm.MAX_DESCRIPTORS - 1)]
    try:
        refused_without_leak(receiver, data, [fd, *extra], match="descriptors")
    finally:
        _shm.close_all(extra)
    del arr


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_received_descriptors_are_close_on_exec(receiver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    flags: list[int] = []
    feed = Decoder.feed_descriptors

    def spy(self: Decoder, fds: Any, nbytes: int | None = None) -> None:
        fds = list(fds)
        flags.extend(fcntl.fcntl(fd, fcntl.F_GETFD) for fd in fds)
        feed(self, fds, nbytes)

    monkeypatch.setattr(Decoder, "feed_descriptors", spy)
    data, fd, arr = shared_message()
    arr[:] = 7
    inheritable = os.dup(fd)
    os.set_inheritable(inheritable, True)  # the sender's copy is not close-on-exec
    x, y = socket.socketpair()
    try:
        with x:
            socket.send_fds(x, [data], [inheritable])
            (got,) = receive_from(receiver, y)
    finally:
        os.close(inheritable)
    assert got.tobytes() == arr.tobytes()
    assert flags and all(f & fcntl.FD_CLOEXEC for f in flags), flags


@pytest.mark.anyio
async def test_descriptors_arriving_inside_a_message_never_reach_the_receiver(anyio_backend: Any) -> None:
    """Descriptors that come with a later byte of a message (here, while the receiver reads
    straight into a side chunk: a reader callback on asyncio and uvloop) meet a plain read,
    which doesn't take them: the kernel closes them. The message arrives intact, and the
    receiver holds no descriptor of the peer's, then or after."""
    # small enough for a socket's default send buffer (~200 KiB): our sends don't block
    arr = np.arange(192 << 10, dtype=np.uint8)
    data = wire(Encoder().encode(arr))
    memfd = sealed_memfd(PAGE)
    x, y = socket.socketpair()
    receiver = ObjectStream.from_socket(y, shared_memory=True)
    baseline = open_fds()
    outcome: list[Any] = []
    held: list[int] = []

    async def receive() -> None:
        try:
            while True:
                outcome.append(await receiver.receive())
                held.append(open_fds())
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            outcome.append(exc)

    try:
        async with receiver, anyio.create_task_group() as tg:
            x.sendall(data[: len(data) // 2])
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()  # waiting inside the side chunk
            socket.send_fds(x, [data[len(data) // 2 :]], [memfd])
            x.shutdown(socket.SHUT_WR)  # the receiver ends here
    finally:
        x.close()
        os.close(memfd)
    assert len(outcome) == 2 and np.array_equal(outcome[0], arr), outcome
    assert isinstance(outcome[1], anyio.EndOfStream), outcome
    assert held == [baseline]  # no descriptor came in with the message
    assert open_fds() == baseline - 3  # the receiver's socket, ours and the memfd are closed


# --- cancellation -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_cancelled_receive_loses_nothing(anyio_backend: Any) -> None:
    shared = streampickle.shared_copy(np.arange(1 << 16))
    plain = np.arange(1 << 14)  # 128 KiB: read straight into place, and our sends don't block
    obj = {"shared": shared, "plain": plain}
    chunks = Encoder(shared_memory=True).encode(obj)
    data, fds = wire(chunks), _shm.descriptors_of(chunks)
    x, y = socket.socketpair()
    receiver = ObjectStream.from_socket(y, shared_memory=True)
    baseline = open_fds()
    with x:
        async with receiver:
            # cut inside the header, inside the first chunk, inside the ordinary side chunk
            for cut in (3, len(wire(chunks[:1])) - 2, len(data) - 1000):
                x.sendmsg([data[:cut]], _fdpass.ancillary(fds))
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(receiver.receive)
                        await anyio.wait_all_tasks_blocked()
                        scope.cancel()
                assert scope.cancelled_caught
                x.sendall(data[cut:])
                got = await receiver.receive()
                assert_same(got, obj)
                got["shared"][0] = -cut
                assert shared[0] == -cut  # the same memory, not a copy
                del got
                assert open_fds() == baseline


@pytest.mark.anyio
async def test_closing_a_stream_closes_the_descriptors_no_message_claimed(anyio_backend: Any) -> None:
    """A message's descriptors arrive with its first byte; if the stream closes before the
    message is whole, closing it closes them."""
    chunks = Encoder(shared_memory=True).encode(streampickle.shared_copy(np.arange(1 << 16)))
    data, fds = wire(chunks), _shm.descriptors_of(chunks)
    x, y = socket.socketpair()
    receiver = ObjectStream.from_socket(y, shared_memory=True)
    baseline = open_fds()
    with x:
        x.sendmsg([data[:3]], _fdpass.ancillary(fds))
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(receiver.receive)
                await anyio.wait_all_tasks_blocked()  # the descriptors are in the decoder
                scope.cancel()
        assert open_fds() == baseline + 1
        await receiver.aclose()
        assert open_fds() == baseline - 1  # the receiver's socket and the descriptor


def fill_send_buffer(sock: socket.socket) -> int:
    """Write junk to a non-blocking socket until the kernel takes no more, not a byte:
    how many bytes it took."""
    total = 0
    for size in (1 << 16, 1 << 12, 1 << 8, 1):
        while True:
            try:
                total += sock.send(b"\0" * size)
            except BlockingIOError:
                break
    return total


def drain(sock: socket.socket, nbytes: int) -> None:
    """Read and drop ``nbytes`` that are already in a socket's receive queue."""
    buffer = bytearray(1 << 16)
    while nbytes:
        nbytes -= sock.recv_into(buffer, min(nbytes, len(buffer)))


@pytest.mark.anyio
async def test_a_send_cancelled_before_its_first_byte_leaves_the_stream_intact(anyio_backend: Any) -> None:
    """A message with descriptors whose first ``sendmsg`` finds no room sent nothing, its
    descriptors included: cancelled there, the stream is intact, and the next message's
    descriptors go with that message's first byte."""
    shared = streampickle.shared_copy(np.arange(1 << 16))
    x, y = socket.socketpair()
    sender = ObjectStream.from_socket(x, shared_memory=True)
    receiver = ObjectStream.from_socket(y, shared_memory=True)
    async with sender, receiver:
        junk = fill_send_buffer(x)  # read off y below, before the receiver reads anything
        before = sender._t.sent
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.send, {"first": shared})
            await anyio.wait_all_tasks_blocked()  # the send waits for room, nothing sent
            tg.cancel_scope.cancel()
        assert sender._t.sent == before
        drain(y, junk)
        await sender.send({"second": shared})
        got = await receiver.receive()
        assert list(got) == ["second"]
        got["second"][1] = -1
        assert shared[1] == -1


@pytest.mark.anyio
async def test_a_send_that_waits_for_room_sends_its_descriptors_when_it_goes(anyio_backend: Any) -> None:
    shared = streampickle.shared_copy(np.arange(1 << 16))
    x, y = socket.socketpair()
    sender = ObjectStream.from_socket(x, shared_memory=True)
    receiver = ObjectStream.from_socket(y, shared_memory=True)
    async with sender, receiver:
        junk = fill_send_buffer(x)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.send, {"first": shared})
            await anyio.wait_all_tasks_blocked()  # its first sendmsg found no room
            drain(y, junk)  # room: the send goes on, and takes its descriptors along
        got = await receiver.receive()
        got["first"][1] = -1
        assert shared[1] == -1


@pytest.mark.anyio
async def test_a_send_cancelled_midway_breaks_only_the_send_side(anyio_backend: Any) -> None:
    shared = streampickle.shared_copy(np.arange(1 << 16))
    big = np.ones(64 << 20, dtype=np.uint8)  # more than the socket buffers hold
    a, b = shared_pair()
    async with a, b:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send, {"shared": shared, "big": big})
                await anyio.wait_all_tasks_blocked()  # the kernel took part; nobody reads
                scope.cancel()
        assert scope.cancelled_caught
        with pytest.raises(anyio.BrokenResourceError):
            await a.send(1)
        await b.send(shared)  # the other direction is intact
        got = await a.receive()
        got[2] = -1
        assert shared[2] == -1


# --- no sealed memfd on this platform ---------------------------------------------------------


@pytest.mark.anyio
async def test_without_memfd_shared_empty_says_so_and_arrays_still_travel(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    made_before = streampickle.shared_copy(np.arange(1000))
    monkeypatch.setattr(_shm, "AVAILABLE", False)
    with pytest.raises(UsageError, match="memfd"):
        streampickle.shared_empty(10)
    with pytest.raises(UsageError, match="memfd"):
        streampickle.shared_copy(np.arange(3))
    a, b = shared_pair()
    async with a, b:
        plain = np.arange(1 << 16)
        await a.send({"plain": plain, "made before": made_before})
        got = await b.receive()
        assert_same(got, {"plain": plain, "made before": made_before})
        got["made before"][0] = -1  # it went as bytes: a copy
        assert made_before[0] == 0


# --- peers that hold what a receiver gives a message in flight --------------------------------


ASYNC_RECEIVERS = ["asyncio", "uvloop", "trio"]


@pytest.mark.parametrize("receiver", ASYNC_RECEIVERS)
def test_a_progress_callback_reading_ahead_takes_the_next_messages_descriptors(receiver: str) -> None:
    """A read ahead can bring the end of one message and the start of a shared one; the
    progress meter feeds it in pieces that end at the boundary. The descriptors wait for
    the piece they came with (once, they were refused there as claimed by no message)."""
    arrays = [streampickle.shared_copy(np.arange(1000) + i) for i in range(3)]
    x, y = socket.socketpair()
    with x:
        for array in arrays:  # all of it in the socket before the receiver reads
            chunks = Encoder(shared_memory=True).encode(array)
            x.sendall(streampickle.dumps(b"x" * 100))
            x.sendmsg([wire(chunks)], _fdpass.ancillary(_shm.descriptors_of(chunks)))

        async def receive() -> list[Any]:
            events: list[Any] = []
            async with ObjectStream.from_socket(y, shared_memory=True, progress=events.append) as stream:
                got = [await stream.receive() for _ in range(6)]
            assert len(events) >= 6
            return got

        got = run_on(receiver, receive)
    for i, array in enumerate(arrays):
        assert got[2 * i] == b"x" * 100 and np.array_equal(got[2 * i + 1], array)


@pytest.mark.parametrize("receiver", ASYNC_RECEIVERS)
def test_descriptors_sent_inside_a_message_are_refused_without_waiting_for_its_end(receiver: str) -> None:
    """A read ahead inside a message takes descriptors that come with one of its later bytes;
    they are refused as soon as that read is fed (a stalled peer once kept them until the
    message's deadline, ten minutes by default), and closed."""
    data = streampickle.dumps(list(range(2000)))
    memfd = sealed_memfd(PAGE)
    baseline = open_fds()
    x, y = socket.socketpair()
    try:
        with x:
            x.sendall(data[:100])

            async def receive() -> None:
                async with ObjectStream.from_socket(y, shared_memory=True) as stream, anyio.create_task_group() as tg:
                    tg.start_soon(send_inside)
                    # fail_after: a guard against a hang, never reached when the test passes
                    with anyio.fail_after(60), pytest.raises(ProtocolError, match="inside a message"):
                        await stream.receive()

            async def send_inside() -> None:
                await anyio.wait_all_tasks_blocked()  # the receiver holds the first 100 bytes
                socket.send_fds(x, [data[100:101]], [memfd])  # and then nothing: no end to wait for

            run_on(receiver, receive)
    finally:
        os.close(memfd)
    assert open_fds() == baseline - 1  # the receiver's socket; no descriptor of the peer's left


@pytest.mark.anyio
async def test_peers_that_send_descriptors_and_stall_leave_a_server_serving(
    anyio_backend: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stalled connection of a shared-memory listener may hold up to max_descriptors
    (253) of its peer's descriptors until its header deadline: fourteen such peers once
    filled a server's file table (1,024), and no listener accepted anyone for as long as they
    stalled. The process holds at most ``held_limit()`` (a quarter of its open-file limit;
    eight here): the peers past it are refused and closed, while good clients are served."""
    limit = _shm.HELD.count + 8
    monkeypatch.setattr(_shm, "held_limit", lambda: limit)
    path = str(tmp_path / "server")
    array = streampickle.shared_copy(np.arange(1000))
    head = wire(Encoder(shared_memory=True).encode(array))[:5]  # a shared message's first bytes
    memfd = sealed_memfd(PAGE)

    async def echo(stream: ObjectStream) -> None:
        while True:
            await stream.send(await stream.receive())

    def stalled_peer() -> socket.socket:
        peer = socket.socket(socket.AF_UNIX)
        peer.connect(path)
        socket.send_fds(peer, [head], [memfd] * 4)
        peer.settimeout(60)  # a guard against a hang, never reached when the test passes
        return peer

    async def held_reaches(count: int) -> None:
        for _ in range(2000):  # a generous bound for a busy machine
            if _shm.HELD.count == count:
                return
            await anyio.sleep(0.01)
        raise AssertionError(f"held {_shm.HELD.count} descriptors, expected {count}")

    baseline = open_fds()
    listener = await streampickle.create_unix_listener(path, shared_memory=True)
    try:
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            held = [stalled_peer(), stalled_peer()]  # 8 descriptors: the limit
            await held_reaches(limit)
            refused = [stalled_peer() for _ in range(3)]
            for peer in refused:  # closed by the server, which holds no more
                assert await anyio.to_thread.run_sync(peer.recv, 1) == b""
            assert _shm.HELD.count == limit
            async with await streampickle.connect_unix(path, shared_memory=True) as client:
                await client.send({"plain": 1})
                assert await client.receive() == {"plain": 1}  # served while they stall
                for peer in held + refused:
                    peer.close()
                await held_reaches(limit - 8)
                await client.send(array)  # descriptors again: room for them now
                assert np.array_equal(await client.receive(), array)
            tg.cancel_scope.cancel()
    finally:
        os.close(memfd)
    assert open_fds() == baseline - 1  # the memfd; every connection's descriptors are closed


@pytest.mark.anyio
async def test_a_message_holding_descriptors_has_the_headers_deadline(anyio_backend: Any) -> None:
    """A peer that sends a shared message's tables with its descriptors, then stalls in the
    pickle, held them for the message's deadline (ten minutes by default): a few such peers
    kept every other connection of the process from shared memory for that long. Such a
    message is held to the header's deadline whole, and its descriptors are closed then."""
    array = streampickle.shared_copy(np.arange(1000))
    chunks = Encoder(shared_memory=True).encode(array)
    data, fds = wire(chunks), _shm.descriptors_of(chunks)
    held = _shm.HELD.count
    baseline = open_fds()
    x, y = socket.socketpair()
    limits = streampickle.Limits(max_header_seconds=0.5, max_message_seconds=None)
    with x:
        socket.send_fds(x, [data[:-1]], fds)  # all but its last byte: the tables are complete
        async with ObjectStream.from_socket(y, shared_memory=True, limits=limits) as stream:
            with anyio.fail_after(60):  # a guard against a hang, never reached when the test passes
                with pytest.raises(streampickle.DeadlineExceededError, match="holds descriptors") as info:
                    await stream.receive()
            assert info.value.limit == "max_header_seconds"
            assert _shm.HELD.count == held  # closed when the deadline struck, not at the stream's close
    assert open_fds() == baseline  # the pair's two ends, and every descriptor the peer sent


def test_a_message_holding_descriptors_earns_time_as_its_inline_bytes_arrive() -> None:
    """Its ordinary arrays travel inline beside the shared ones, so a large honest message
    gets the header's time plus a second per SHARED_MIN_RATE bytes received; the same bytes
    without descriptors are held to the message's deadline only."""
    from streampickle import _stream

    shared = streampickle.shared_copy(np.arange(1000))
    ordinary = np.arange(1 << 20)  # 8 MiB, inline
    chunks = Encoder(shared_memory=True).encode((shared, ordinary))
    data, fds = wire(chunks), _shm.descriptors_of(chunks)
    limits = streampickle.Limits()
    decoder = Decoder(shared_memory=True, limits=limits)
    decoder.feed_descriptors([os.dup(fd) for fd in fds], len(data))
    decoder.feed(data[: len(data) - 4096])  # the header is whole; most of the array is there
    assert decoder.holds_descriptors and not decoder.in_header
    received = decoder.progress[0]
    assert _stream._deadline(decoder, 100.0) == (
        "max_header_seconds", 100.0 + limits.max_header_seconds + received / _stream.SHARED_MIN_RATE)
    decoder.feed(data[len(data) - 4096 :])
    assert not decoder.holds_descriptors
    got = next(decoder)
    assert np.array_equal(got[0], shared) and np.array_equal(got[1], ordinary)
    plain = Decoder(limits=limits)
    plain.feed(wire(Encoder().encode((np.arange(1000), ordinary)))[:-4096])
    assert _stream._deadline(plain, 100.0) == ("max_message_seconds", 100.0 + limits.max_message_seconds)


@pytest.mark.anyio
async def test_a_read_that_gets_no_memory_from_the_system_raises_a_typed_error(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory or of map entries (vm.max_map_count), the read-ahead memory can't be
    mapped: a LimitExceededError, which a server handles as a failed connection, not an
    OSError it would log as a bug in the handler."""
    from streampickle import _socket_transport

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(12, "Cannot allocate memory")

    a, b = shared_pair()
    async with a, b:
        await a.send(1)
        monkeypatch.setattr(_socket_transport.mmap, "mmap", refuse)
        with pytest.raises(streampickle.LimitExceededError, match="could not map"):
            await b.receive()
