"""One side of one benchmark measurement, run as its own OS process by run.py.

    python peers.py recv CONTENDER TRANSPORT WORKLOAD SCALE   -> prints {"address": ...}, then a result
    python peers.py send CONTENDER TRANSPORT WORKLOAD SCALE ADDRESS

The receiver listens and, once a sender is connected, moves the workload over that one
connection up to ``TRANSFERS`` times (see ``Transfers``); where a transfer takes milliseconds or
less, after ``WARM_TRANSFERS`` untimed ones. Each transfer starts at a barrier: the
receiver tells the sender to go, and times from then until every message of the workload is
reconstructed as a Python object; then (untimed) it verifies them and lets them go. Both sides
report the rise of their peak RSS (VmHWM): the sender's over the whole measurement, the
receiver's the largest over one transfer. Over a Unix socket the receiver also reads both
processes' PSS (``pss_mib``) around each transfer: what the transfer added to the physical memory
of each, with shared pages split between the processes that map them.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads

MiB = 1 << 20


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pss_mib(pid: int | str = "self") -> float | None:
    """A process's proportional set size: its resident memory, with each page shared with
    other processes counted as its share (1/n for n processes mapping it). RSS counts a
    shared page whole in every process that maps it, so two processes sharing an array both
    show it in full; their PSS adds up to it once. None where /proc has no smaps_rollup
    (not Linux, Linux before 4.14) or the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peer_pid(sock: socket.socket) -> int | None:
    """The process at the other end of a Unix socket (``SO_PEERCRED``); None over TCP."""
    if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def in_shared_file(array: np.ndarray[Any, Any]) -> bool:
    """Whether an array's memory is a mapping of a shared-memory file (``/proc/self/maps``
    names those ``/memfd:...``): a received array that the sender handed over as shared memory."""
    address = array.ctypes.data
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return len(fields) > 5 and fields[5].startswith("/memfd:")
    return False


def warm_bytes(workload: str, scale: float) -> int:
    """Twice the workload's array memory (0 for the in-band workloads)."""
    s = workloads.sizes(scale)
    return 2 * {"big-array": s["big_array_bytes"], "many-arrays": 64 * s["many_arrays_each"]}.get(workload, 0)


# Memory touched at start-up and freed just before the measurement (see ready()).
_WARM: list[Any] = []


def warm_up(nbytes: int) -> None:
    if nbytes:
        warm = np.empty(nbytes, dtype=np.uint8)
        warm.fill(1)
        _WARM.append(warm)


def ready() -> float:
    """Free the warm-up memory, reset the peak RSS, and return the baseline for the RSS rise.

    The machines this runs on are VMs that report free guest memory to the host (free page
    reporting), which discards it: touching such a page again costs a host fault. Whether a
    large receive buffer got such pages or recently used ones was chance, and it moved the same
    contender by up to 8x from one round to the next. So each side touches twice the workload's
    array memory when it starts (warm_up) and frees it here, just before the clock starts: the
    buffers it allocates next get recently used pages, for every contender alike, as in a
    long-running process. Peak RSS is then reset to the current RSS (``clear_refs`` 5), so the
    warm-up isn't counted in the RSS rise.
    """
    _WARM.clear()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the rise is then over the earlier peak
        pass
    return hwm_mib()


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def new_address(transport: str) -> Any:
    if transport == "unix":
        return os.path.join(tempfile.mkdtemp(prefix="spbench-"), "s")
    return ("127.0.0.1", 0)


def family(transport: str) -> int:
    return socket.AF_UNIX if transport == "unix" else socket.AF_INET


def parse_address(transport: str, text: str) -> Any:
    if transport == "unix":
        return text
    host, port = text.rsplit(":", 1)
    return (host, int(port))


def show_address(transport: str, address: Any) -> str:
    return address if transport == "unix" else f"{address[0]}:{address[1]}"


# -- blocking-socket contenders ------------------------------------------------------------


def listen_blocking(transport: str) -> tuple[socket.socket, str]:
    sock = socket.socket(family(transport), socket.SOCK_STREAM)
    sock.bind(new_address(transport))
    sock.listen(1)
    return sock, show_address(transport, sock.getsockname())


def connect_blocking(transport: str, address: str) -> socket.socket:
    sock = socket.socket(family(transport), socket.SOCK_STREAM)
    sock.connect(parse_address(transport, address))
    if transport == "tcp":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if not n:
            raise EOFError
        view = view[n:]


def raw_payload(messages: list[Any]) -> list[memoryview]:
    """What limit-socket moves: the arrays' memory, or the pickled bytes for other workloads."""
    views: list[memoryview] = []
    for m in messages:
        bufs: list[pickle.PickleBuffer] = []
        data = pickle.dumps(m, protocol=5, buffer_callback=bufs.append)
        views.append(memoryview(data))
        views.extend(b.raw() for b in bufs)
    return views


def _big_buffers(sock: socket.socket) -> None:
    # The limit gets the best socket settings, the ones streampickle's sockets use: 4 MiB
    # buffers on Unix sockets; on TCP the kernel's autotuning, which beat fixed 4 MiB buffers
    # over loopback here, for the limit and for streampickle alike.
    if sock.family != socket.AF_UNIX:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)


def limit_send(sock: socket.socket, prepared: list[memoryview | bytes]) -> None:
    for v in prepared:
        sock.sendall(v)


def limit_prepare(messages: list[Any]) -> list[memoryview | bytes]:
    """limit-socket moves bytes that exist before the clock starts: nothing to serialize."""
    views = raw_payload(messages)
    return [b"".join(v for v in views if v.nbytes < 1 << 16)] + [v for v in views if v.nbytes >= 1 << 16]


def limit_recv(sock: socket.socket, total: int) -> np.ndarray[Any, Any]:
    dest = np.empty(total, dtype=np.uint8)  # uninitialised, as streampickle's destinations
    recv_exactly_into(sock, memoryview(dest))
    return dest


def limit_check(messages: list[Any]) -> Callable[[np.ndarray[Any, Any]], None]:
    """What the limit's receiver verifies: the bytes it got are the payload's, in order."""
    views = raw_payload(messages)

    def check(dest: np.ndarray[Any, Any]) -> None:
        pos = 0
        for view in views:
            chunk = np.frombuffer(view, dtype=np.uint8)
            assert np.array_equal(dest[pos : pos + chunk.size], chunk), "limit-socket bytes differ"
            pos += chunk.size
        assert pos == dest.size

    return check


_HEAD = struct.Struct("<QI")


def p5_send(sock: socket.socket, messages: list[Any]) -> None:
    for m in messages:
        bufs: list[pickle.PickleBuffer] = []
        data = pickle.dumps(m, protocol=5, buffer_callback=bufs.append)
        raws = [b.raw() for b in bufs]
        head = _HEAD.pack(len(data), len(raws)) + struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
        sock.sendall(head + data)
        for r in raws:
            sock.sendall(r)


def p5_recv(sock: socket.socket, count: int) -> list[Any]:
    f = sock.makefile("rb", buffering=1 << 16)
    out = []
    for _ in range(count):
        n, nbuf = _HEAD.unpack(f.read(_HEAD.size))
        lens = struct.unpack(f"<{nbuf}Q", f.read(8 * nbuf)) if nbuf else ()
        data = f.read(n)
        buffers = []
        for length in lens:
            dest = np.empty(length, dtype=np.uint8)
            f.readinto(memoryview(dest))
            buffers.append(dest)
        out.append(pickle.loads(data, buffers=buffers))
    return out


def inband_send(sock: socket.socket, messages: list[Any]) -> None:
    for m in messages:
        data = pickle.dumps(m, protocol=5)
        sock.sendall(struct.pack("<Q", len(data)) + data)


def inband_recv(sock: socket.socket, count: int) -> list[Any]:
    f = sock.makefile("rb", buffering=1 << 16)
    out = []
    for _ in range(count):
        (n,) = struct.unpack("<Q", f.read(8))
        out.append(pickle.loads(f.read(n)))
    return out


# -- repeated transfers with a start barrier ---------------------------------------------------

# One measurement moves its workload over one connection at most this many times, and stops
# repeating once its timed transfers add up to TRANSFER_BUDGET_S. Single transfers of the same
# code spread by 30% and more here (run 10's big-array over Unix: 0.13-0.25 s), so a median of
# one transfer per round could not tell 0.9x of the limit from 1.0x; repeating the fast
# transfers gives each round up to five samples for little more time, while a contender that
# takes seconds per transfer (whose ratios are far from any target) still moves its workload once.
TRANSFERS = 5
TRANSFER_BUDGET_S = 1.0
# A transfer under WARM_UNDER_S (a shared-memory hand-off) is per-message code, not data
# movement: if the first transfer takes less, it and the next ones up to WARM_TRANSFERS in all
# are untimed. CPython specializes a function's bytecode only after about 8 calls, so a
# function called once per message (a decoder's, an event loop's) runs unspecialized through a
# process's first several messages: a hand-off decoded in 0.78 ms in a process's transfers 2-5
# and in 0.54 ms from its tenth on (benchmarks/handoff.py); a long-running process is past
# that. A transfer of tens of milliseconds moves data: every one is timed, the first included
# (its cold buffers are part of what is measured), as before.
WARM_TRANSFERS = 10
WARM_UNDER_S = 0.02
GO, STOP = b"g", b"s"


class Transfers:
    """The receiver's record of one measurement: each transfer's seconds and memory.

    The receiver's loop, in every contender::

        while t.more():
            t.prepare(); <send GO>; t.start()
            got = <receive the workload>
            t.stop(); check(got); del got
        <send STOP>; t.report()

    ``prepare`` comes before GO so that the sender starts no earlier than the clock. The peak
    RSS is reset before each transfer and read after it, before verification: the comparison's
    temporaries and the previous transfer's objects are not counted.

    If the first transfer is quick, it and the next few warm the code up and are not timed
    (``WARM_TRANSFERS``); their memory counts like any other transfer's.

    Given the sender's process id (``peer``, known over a Unix socket), ``prepare`` and
    ``stop`` also read both processes' PSS, outside the timed region; the report keeps the
    transfer that added the most to their sum: physical memory the transfer added, counted
    once however many processes map it.
    """

    def __init__(self, peer: int | None = None) -> None:
        self.seconds: list[float] = []
        self.warm = 0  # untimed transfers so far
        self.warm_target = WARM_TRANSFERS  # 0 once the first turns out slow
        self.rss_mib = 0.0
        self.peer = peer
        self.pss: tuple[float, float] | None = None  # the receiver's and the sender's PSS change
        self._base = 0.0
        self._pss_base: tuple[float | None, float | None] = (None, None)
        self._start = 0.0

    def more(self) -> bool:
        if self.warm < self.warm_target:
            return True
        return not self.seconds or (len(self.seconds) < TRANSFERS and sum(self.seconds) < TRANSFER_BUDGET_S)

    def prepare(self) -> None:
        self._base = ready()
        if self.peer is not None:
            self._pss_base = (pss_mib(), pss_mib(self.peer))

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        seconds = time.perf_counter() - self._start
        if self.warm == 0 and seconds >= WARM_UNDER_S:
            self.warm_target = 0  # data movement: timed from the first transfer on
        if self.warm < self.warm_target:
            self.warm += 1
        else:
            self.seconds.append(seconds)
        self.rss_mib = max(self.rss_mib, hwm_mib() - self._base)
        own, other = self._pss_base
        if self.peer is not None and own is not None and other is not None:
            now_own, now_other = pss_mib(), pss_mib(self.peer)
            if now_own is not None and now_other is not None:
                change = (now_own - own, now_other - other)
                if self.pss is None or sum(change) > sum(self.pss):
                    self.pss = change

    def report(self) -> None:
        pss = {"recv_pss_mib": self.pss[0], "send_pss_mib": self.pss[1]} if self.pss else {}
        emit(seconds=self.seconds, rss_mib=self.rss_mib, verified=True, **pss)


def send_transfers(wait_go: Callable[[], bool], send: Callable[[], None]) -> None:
    """The sender's loop (blocking contenders): send the workload each time the receiver says go."""
    before = ready()
    while wait_go():
        send()
    emit(rss_mib=hwm_mib() - before)


def receive_transfers(go: Callable[[bytes], Any], receive: Callable[[], Any], check: Callable[[Any], None],
                      peer: int | None = None) -> None:
    """The receiver's loop (blocking contenders); see ``Transfers``."""
    t = Transfers(peer)
    while t.more():
        t.prepare()
        go(GO)
        t.start()
        got = receive()
        t.stop()
        check(got)
        del got
    go(STOP)
    t.report()


# -- the contenders --------------------------------------------------------------------------


def run_blocking(role: str, transport: str, messages: list[Any], address: str | None,
                 send: Callable[..., None], recv: Callable[..., Any], total: int) -> None:
    limit = send is limit_send
    if role == "recv":
        lsock, addr = listen_blocking(transport)
        emit(address=addr)
        conn, _ = lsock.accept()
        if limit:
            _big_buffers(conn)
            receive_transfers(conn.sendall, lambda: limit_recv(conn, total), limit_check(messages), peer_pid(conn))
        else:
            receive_transfers(conn.sendall, lambda: recv(conn, len(messages)), workloads.checker(messages),
                              peer_pid(conn))
    else:
        payload = limit_prepare(messages) if limit else messages
        sock = connect_blocking(transport, address or "")
        if limit:
            _big_buffers(sock)
        send_transfers(lambda: sock.recv(1) == GO, lambda: send(sock, payload))


def run_mp(role: str, transport: str, messages: list[Any], address: str | None) -> None:
    from multiprocessing.connection import Client, Listener

    fam = "AF_UNIX" if transport == "unix" else "AF_INET"
    if role == "recv":
        listener = Listener(new_address(transport), family=fam)
        emit(address=show_address(transport, listener.address))
        conn = listener.accept()
        receive_transfers(conn.send_bytes, lambda: [conn.recv() for _ in messages], workloads.checker(messages))
    else:
        client = Client(parse_address(transport, address or ""), family=fam)

        def send() -> None:
            for m in messages:
                client.send(m)

        send_transfers(lambda: client.recv_bytes() == GO, send)


def run_zmq(role: str, transport: str, messages: list[Any], address: str | None) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    if role == "recv":
        if transport == "unix":
            sock.bind("ipc://" + new_address("unix"))
        else:
            sock.bind("tcp://127.0.0.1:*")
        emit(address=sock.getsockopt_string(zmq.LAST_ENDPOINT))
        sock.recv()  # hello: the sender is connected

        def receive() -> list[Any]:
            got = []
            for _ in messages:
                frames = sock.recv_multipart(copy=False)
                got.append(pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]]))
            return got

        receive_transfers(sock.send, receive, workloads.checker(messages))
    else:
        sock.connect(address or "")
        sock.send(b"hello")

        def send() -> None:
            for m in messages:
                bufs: list[pickle.PickleBuffer] = []
                data = pickle.dumps(m, protocol=5, buffer_callback=bufs.append)
                sock.send_multipart([data, *(b.raw() for b in bufs)], copy=False)

        send_transfers(lambda: sock.recv() == GO, send)


async def receive_transfers_async(go: Callable[[bytes], Any], receive: Callable[[], Any],
                                  check: Callable[[Any], None], peer: int | None = None) -> None:
    """``receive_transfers`` for the async contenders: ``go`` and ``receive`` are awaited."""
    t = Transfers(peer)
    while t.more():
        t.prepare()
        await go(GO)
        t.start()
        got = await receive()
        t.stop()
        check(got)
        del got
    await go(STOP)
    t.report()


async def send_transfers_async(receive: Callable[[], Any], send_one: Callable[[Any], Any],
                               messages: list[Any]) -> None:
    """``send_transfers`` for the async contenders: ``await receive()`` gets the receiver's
    word, ``await send_one(m)`` sends one message of the workload."""
    before = ready()
    while await receive() == GO:
        for m in messages:
            await send_one(m)
    emit(rss_mib=hwm_mib() - before)


def barrier_send(stream: Any) -> Callable[[bytes], Any]:
    """The receiver's half of the barrier for an async contender on a socket: one raw byte
    on the stream's socket, as the raw-socket limit and the blocking contenders send it, so
    that the transfer's clock holds the workload's messages and not a message of the
    barrier's own (the sender's decoding of a "go" message, a cold small-message decode,
    was about a sixth of a many-array shared-memory hand-off). Nothing else travels towards the sender, so
    the byte can't land inside a message. A stream without a socket sends the byte as a
    message."""
    from anyio.abc import SocketAttribute

    raw = stream.extra(SocketAttribute.raw_socket, None)
    if raw is None:
        return stream.send  # type: ignore[no-any-return]

    async def send(word: bytes) -> None:
        raw.send(word)  # one byte into an idle socket's empty buffer: never would block

    return send


def barrier_receive(stream: Any) -> Callable[[], Any]:
    """The sender's half of ``barrier_send``: wait for the raw byte on the stream's socket
    (the stream itself isn't receiving, so nothing else reads the socket meanwhile)."""
    import anyio
    from anyio.abc import SocketAttribute

    raw = stream.extra(SocketAttribute.raw_socket, None)
    if raw is None:
        return stream.receive  # type: ignore[no-any-return]

    async def receive() -> bytes:
        while True:
            await anyio.wait_readable(raw)
            try:
                return raw.recv(1)  # type: ignore[no-any-return]
            except BlockingIOError:
                continue

    return receive


def run_dask(role: str, transport: str, messages: list[Any], address: str | None) -> None:
    import asyncio

    from distributed.comm import connect, listen

    async def main() -> None:
        if role == "recv":
            done = asyncio.Event()

            async def handler(comm: Any) -> None:
                async def receive() -> list[Any]:
                    return [await comm.read() for _ in messages]

                await receive_transfers_async(comm.write, receive, workloads.checker(messages))
                done.set()

            listener = listen("tcp://127.0.0.1:0", handler, deserialize=True)
            await listener.start()
            emit(address=listener.contact_address)
            await done.wait()
            listener.stop()
        else:
            comm = await connect(address or "", deserialize=True)
            await send_transfers_async(comm.read, comm.write, messages)
            await comm.close()

    asyncio.run(main())


def run_anyio_naive(role: str, transport: str, messages: list[Any], address: str | None) -> None:
    import anyio
    from anyio.abc import SocketAttribute
    from anyio.streams.buffered import BufferedByteReceiveStream

    async def main() -> None:
        if role == "recv":
            if transport == "unix":
                listener = await anyio.create_unix_listener(new_address("unix"))
                addr = listener.extra(SocketAttribute.local_address)
            else:
                listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
                addr = f"127.0.0.1:{listener.extra(SocketAttribute.local_port)}"
            emit(address=addr)
            async with listener:
                async def handler(stream: Any) -> None:
                    buffered = BufferedByteReceiveStream(stream)

                    async def receive() -> list[Any]:
                        got = []
                        for _ in messages:
                            (n,) = struct.unpack("<Q", await buffered.receive_exactly(8))
                            got.append(pickle.loads(await buffered.receive_exactly(n)))
                        return got

                    await receive_transfers_async(stream.send, receive, workloads.checker(messages))
                    tg.cancel_scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(listener.serve, handler)
        else:
            if transport == "unix":
                stream = await anyio.connect_unix(address or "")
            else:
                host, port = (address or "").rsplit(":", 1)
                stream = await anyio.connect_tcp(host, int(port))
            async with stream:
                async def send_one(m: Any) -> None:
                    data = pickle.dumps(m, protocol=5)
                    await stream.send(struct.pack("<Q", len(data)) + data)

                await send_transfers_async(lambda: stream.receive(1), send_one, messages)

    anyio.run(main)


def checker_of(check: Callable[[Any], None], shared: str | None,
               expected_sums: list[int] | None) -> Callable[[Any], None]:
    """The receiver's check of one transfer of a streampickle contender: the full read's sums
    (``shared == "read"``: the receiver returns them beside what it got), how the arrays came
    (mapped from the sender's files, or as bytes for ``"ordinary"``), then the values."""
    def check_all(result: Any) -> None:
        got = result
        if expected_sums is not None:
            got, sums = result
            assert sums == expected_sums, "the arrays read inside the timed region held other bytes"
        if shared:
            mapped = [in_shared_file(a) for a in workloads.arrays(got)]
            assert all(mapped) if shared != "ordinary" else not any(mapped), f"{shared}: mapped {mapped}"
        check(got)

    return check_all


def run_streampickle(role: str, transport: str, messages: list[Any], address: str | None,
                     backend: str, uvloop: bool, own_sockets: bool, key: bytes | None,
                     shared: str | None = None) -> None:
    """streampickle's contenders. ``shared`` opts both ends in to ``shared_memory=True`` (Unix
    sockets, own sockets only) and says what the sender sends and the receiver times:

    * ``"ordinary"``: the workload's ordinary arrays, which still go through the socket;
    * ``"shared"``: the arrays copied into ``shared_copy`` memory before the clock starts
      (allocating and filling them is the producer's work, not the transfer's): the
      transfer is the hand-off of descriptors and the receiver's mapping;
    * ``"packed"``: the same, but each message's arrays are views of one shared buffer
      (``workloads.packed``): one descriptor and one mapping per message;
    * ``"read"``: as ``"shared"``, and the receiver reads every byte of every array (a
      checksum, checked afterwards) before the clock stops;
    * ``"pool"``: ordinary arrays, each copied into its shared buffer (allocated and faulted
      in once, before the first transfer) inside the timed region, then sent: what a
      producer that recycles shared buffers gets for arrays it did not make in them.
    """
    import anyio
    from anyio.abc import SocketAttribute

    import streampickle

    # Passed only when opted in: a --baseline checkout from before shared memory takes no such argument.
    opt_in: dict[str, Any] = {"shared_memory": True} if shared else {}
    check = workloads.checker(messages)
    expected_sums = workloads.checksums(messages) if shared == "read" and role == "recv" else None

    async def receive_all(stream: Any) -> None:
        raw = stream.extra(SocketAttribute.raw_socket, None)
        peer = peer_pid(raw) if raw is not None else None

        async def receive() -> Any:
            got = [await stream.receive() for _ in messages]
            if expected_sums is not None:
                return got, workloads.checksums(got)  # the full read, inside the timed region
            return got

        await receive_transfers_async(barrier_send(stream), receive, checker_of(check, shared, expected_sums), peer)

    async def main() -> None:
        if role == "recv":
            if own_sockets:
                if transport == "unix":
                    path = new_address("unix")
                    listener = await streampickle.create_unix_listener(path, key=key, **opt_in)
                    emit(address=path)
                else:
                    listener = await streampickle.create_tcp_listener(local_host="127.0.0.1", key=key)
                    emit(address=f"127.0.0.1:{listener.extra(SocketAttribute.local_port)}")
                async with listener, await listener.accept() as stream:
                    await receive_all(stream)
                return
            if transport == "unix":
                path = new_address("unix")
                raw_listener = await anyio.create_unix_listener(path)
                emit(address=path)
            else:
                raw_listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
                emit(address=f"127.0.0.1:{raw_listener.extra(SocketAttribute.local_port)}")

            async def handler(raw: Any) -> None:
                async with streampickle.ObjectStream(raw, key=key) as stream:
                    await receive_all(stream)
                tg.cancel_scope.cancel()

            async with raw_listener, anyio.create_task_group() as tg:
                tg.start_soon(raw_listener.serve, handler)
        else:
            # Shared arrays are made before connecting: the receiver starts its clock as soon
            # as it has accepted, and making them is the producer's work, not the transfer's.
            payload: list[Any] = messages
            if shared in ("shared", "read"):
                payload = workloads.shared(messages)
            elif shared == "packed":
                payload = workloads.packed(messages)
            elif shared == "pool":
                payload = list(zip(messages, workloads.shared(messages), strict=True))
            if own_sockets:
                if transport == "unix":
                    stream = await streampickle.connect_unix(address or "", key=key, **opt_in)
                else:
                    host, port = (address or "").rsplit(":", 1)
                    stream = await streampickle.connect_tcp(host, int(port), key=key)
            else:
                if transport == "unix":
                    raw = await anyio.connect_unix(address or "")
                else:
                    host, port = (address or "").rsplit(":", 1)
                    raw = await anyio.connect_tcp(host, int(port))
                stream = streampickle.ObjectStream(raw, key=key)
            async with stream:
                if shared == "pool":
                    async def send_pooled(pair: tuple[Any, Any]) -> None:
                        ordinary, pooled = pair
                        workloads.refill(pooled, ordinary)
                        await stream.send(pooled)

                    await send_transfers_async(barrier_receive(stream), send_pooled, payload)
                else:
                    await send_transfers_async(barrier_receive(stream), stream.send, payload)

    options = {"use_uvloop": True} if uvloop else {}
    anyio.run(main, backend=backend, backend_options=options)


def run_streampickle_sync(role: str, transport: str, messages: list[Any], address: str | None,
                          shared: str) -> None:
    """streampickle's blocking adapter (``streampickle.sync``) on blocking Unix sockets, opted in
    to shared memory: the same-host contenders of ``run_streampickle`` (``shared`` as there:
    ``"shared"``, ``"packed"`` or ``"read"``) without an event loop, as the raw-socket limit
    runs. A hand-off is a few system calls each way, so a loop's wake-ups (a quarter of a
    millisecond per round trip through asyncio here) are a large part of what the async
    contenders measure for it."""
    from streampickle import sync

    check = workloads.checker(messages)
    if role == "recv":
        lsock, addr = listen_blocking(transport)
        emit(address=addr)
        conn, _ = lsock.accept()
        expected_sums = workloads.checksums(messages) if shared == "read" else None

        def receive() -> Any:
            got = [sync.load(conn, shared_memory=True) for _ in messages]
            if expected_sums is not None:
                return got, workloads.checksums(got)  # the full read, inside the timed region
            return got

        receive_transfers(conn.sendall, receive, checker_of(check, shared, expected_sums), peer_pid(conn))
    else:
        payload = workloads.packed(messages) if shared == "packed" else workloads.shared(messages)
        sock = connect_blocking(transport, address or "")

        def send() -> None:
            for m in payload:
                sync.dump(m, sock, shared_memory=True)

        send_transfers(lambda: sock.recv(1) == GO, send)


KEY = b"benchmark key"

CONTENDERS: dict[str, Callable[..., None]] = {
    "limit-socket": lambda r, t, m, a, total: run_blocking(r, t, m, a, limit_send, limit_recv, total),
    "pickle5-oob-sync": lambda r, t, m, a, total: run_blocking(r, t, m, a, p5_send, p5_recv, total),
    "pickle-inband-sync": lambda r, t, m, a, total: run_blocking(r, t, m, a, inband_send, inband_recv, total),
    "mp-connection": lambda r, t, m, a, total: run_mp(r, t, m, a),
    "anyio-naive": lambda r, t, m, a, total: run_anyio_naive(r, t, m, a),
    "dask-comm": lambda r, t, m, a, total: run_dask(r, t, m, a),
    "zmq-zerocopy": lambda r, t, m, a, total: run_zmq(r, t, m, a),
    "streampickle-asyncio": lambda r, t, m, a, total: run_streampickle(r, t, m, a, "asyncio", False, True, None),
    "streampickle-uvloop": lambda r, t, m, a, total: run_streampickle(r, t, m, a, "asyncio", True, True, None),
    "streampickle-trio": lambda r, t, m, a, total: run_streampickle(r, t, m, a, "trio", False, True, None),
    "streampickle-anyio-stream": lambda r, t, m, a, total: run_streampickle(r, t, m, a, "asyncio", False, False, None),
    "streampickle-asyncio-key": lambda r, t, m, a, total: run_streampickle(r, t, m, a, "asyncio", False, True, KEY),
    "streampickle-asyncio-blake3": lambda r, t, m, a, total: run_streampickle(
        r, t, m, a, "asyncio", False, True, mac_key("blake3")),
    "streampickle-asyncio-poly1305": lambda r, t, m, a, total: run_streampickle(
        r, t, m, a, "asyncio", False, True, mac_key("poly1305")),
    # Same host, shared memory (Unix sockets; see run_streampickle for what each one times)
    "streampickle-asyncio-shm": lambda r, t, m, a, total: run_streampickle(
        r, t, m, a, "asyncio", False, True, None, "shared"),
    "streampickle-asyncio-shm-packed": lambda r, t, m, a, total: run_streampickle(
        r, t, m, a, "asyncio", False, True, None, "packed"),
    "streampickle-asyncio-shm-read": lambda r, t, m, a, total: run_streampickle(
        r, t, m, a, "asyncio", False, True, None, "read"),
    "streampickle-asyncio-shm-ordinary": lambda r, t, m, a, total: run_streampickle(
        r, t, m, a, "asyncio", False, True, None, "ordinary"),
    "streampickle-asyncio-shm-pool": lambda r, t, m, a, total: run_streampickle(
        r, t, m, a, "asyncio", False, True, None, "pool"),
    "streampickle-uvloop-shm-packed": lambda r, t, m, a, total: run_streampickle(
        r, t, m, a, "asyncio", True, True, None, "packed"),
    "streampickle-trio-shm-packed": lambda r, t, m, a, total: run_streampickle(
        r, t, m, a, "trio", False, True, None, "packed"),
    "streampickle-sync-shm": lambda r, t, m, a, total: run_streampickle_sync(r, t, m, a, "shared"),
    "streampickle-sync-shm-packed": lambda r, t, m, a, total: run_streampickle_sync(r, t, m, a, "packed"),
    "streampickle-sync-shm-read": lambda r, t, m, a, total: run_streampickle_sync(r, t, m, a, "read"),
}


def mac_key(mac: str) -> Any:
    import streampickle

    return streampickle.Key(KEY, mac=mac)


def main() -> None:
    role, contender, transport, workload, scale = sys.argv[1:6]
    address = sys.argv[6] if len(sys.argv) > 6 else None
    messages = workloads.build(workload, float(scale))
    warm_up(warm_bytes(workload, float(scale)))
    total = sum(v.nbytes for v in raw_payload(messages)) if contender == "limit-socket" else 0
    CONTENDERS[contender](role, transport, messages, address, total)


if __name__ == "__main__":
    main()
