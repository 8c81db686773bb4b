"""One side of one benchmark measurement, run as its own OS process by run.py.

    python peers.py recv CONTENDER TRANSPORT WORKLOAD SCALE   -> prints {"address": ...}, then a result
    python peers.py send CONTENDER TRANSPORT WORKLOAD SCALE ADDRESS

The receiver listens and, once a sender is connected, times from its first receive call until
every message of the workload is reconstructed as a Python object; then (untimed) it verifies
them. Both sides report the rise of their peak RSS (VmHWM) over the measurement.
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
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads  # noqa: E402

MiB = 1 << 20


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


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
    _big_buffers(sock)
    for v in prepared:
        sock.sendall(v)


def limit_prepare(messages: list[Any]) -> list[memoryview | bytes]:
    """limit-socket moves bytes that exist before the clock starts: nothing to serialize."""
    views = raw_payload(messages)
    return [b"".join(v for v in views if v.nbytes < 1 << 16)] + [v for v in views if v.nbytes >= 1 << 16]


def limit_recv(sock: socket.socket, total: int) -> list[Any]:
    _big_buffers(sock)
    dest = np.empty(total, dtype=np.uint8)  # preallocated, uninitialised
    start = time.perf_counter()
    recv_exactly_into(sock, memoryview(dest))
    return [time.perf_counter() - start, dest]


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


# -- the contenders --------------------------------------------------------------------------


def run_blocking(role: str, transport: str, messages: list[Any], address: str | None,
                 send: Callable[..., None], recv: Callable[..., list[Any]], total: int) -> None:
    if role == "recv":
        lsock, addr = listen_blocking(transport)
        emit(address=addr)
        conn, _ = lsock.accept()
        before = ready()
        start = time.perf_counter()
        got = recv(conn, total if recv is limit_recv else len(messages))
        seconds = time.perf_counter() - start
        if recv is limit_recv:
            seconds, dest = got
            _RESULT["dest"] = dest
            got = []
        rss = hwm_mib() - before
        conn.sendall(b"k")
        finish_recv(seconds, rss, got)
    else:
        if send is limit_send:
            messages = limit_prepare(messages)
        sock = connect_blocking(transport, address or "")
        before = ready()
        send(sock, messages)
        sock.recv(1)
        emit(rss_mib=hwm_mib() - before)


def run_mp(role: str, transport: str, messages: list[Any], address: str | None) -> None:
    from multiprocessing.connection import Client, Listener

    fam = "AF_UNIX" if transport == "unix" else "AF_INET"
    if role == "recv":
        listener = Listener(new_address(transport), family=fam)
        emit(address=show_address(transport, listener.address))
        conn = listener.accept()
        before = ready()
        start = time.perf_counter()
        got = [conn.recv() for _ in messages]
        seconds = time.perf_counter() - start
        rss = hwm_mib() - before
        conn.send_bytes(b"k")
        finish_recv(seconds, rss, got)
    else:
        conn = Client(parse_address(transport, address or ""), family=fam)
        before = ready()
        for m in messages:
            conn.send(m)
        conn.recv_bytes()
        emit(rss_mib=hwm_mib() - before)


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
        before = ready()
        start = time.perf_counter()
        got = []
        for _ in messages:
            frames = sock.recv_multipart(copy=False)
            got.append(pickle.loads(frames[0].buffer, buffers=[f.buffer for f in frames[1:]]))
        seconds = time.perf_counter() - start
        rss = hwm_mib() - before
        sock.send(b"k")
        finish_recv(seconds, rss, got)
    else:
        sock.connect(address or "")
        sock.send(b"hello")
        before = ready()
        for m in messages:
            bufs: list[pickle.PickleBuffer] = []
            data = pickle.dumps(m, protocol=5, buffer_callback=bufs.append)
            sock.send_multipart([data, *(b.raw() for b in bufs)], copy=False)
        sock.recv()
        emit(rss_mib=hwm_mib() - before)


def run_dask(role: str, transport: str, messages: list[Any], address: str | None) -> None:
    import asyncio

    from distributed.comm import connect, listen

    async def main() -> None:
        if role == "recv":
            done = asyncio.Event()
            result: dict[str, Any] = {}

            async def handler(comm: Any) -> None:
                before = ready()
                start = time.perf_counter()
                got = [await comm.read() for _ in messages]
                result.update(seconds=time.perf_counter() - start, rss=hwm_mib() - before, got=got)
                await comm.write("k")
                done.set()

            listener = listen("tcp://127.0.0.1:0", handler, deserialize=True)
            await listener.start()
            emit(address=listener.contact_address)
            await done.wait()
            listener.stop()
            finish_recv(result["seconds"], result["rss"], result["got"])
        else:
            comm = await connect(address or "", deserialize=True)
            before = ready()
            for m in messages:
                await comm.write(m)
            await comm.read()
            emit(rss_mib=hwm_mib() - before)
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
                    before = ready()
                    start = time.perf_counter()
                    got = []
                    for _ in messages:
                        (n,) = struct.unpack("<Q", await buffered.receive_exactly(8))
                        got.append(pickle.loads(await buffered.receive_exactly(n)))
                    seconds = time.perf_counter() - start
                    rss = hwm_mib() - before
                    await stream.send(b"k")
                    finish_recv(seconds, rss, got)
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
                before = ready()
                for m in messages:
                    data = pickle.dumps(m, protocol=5)
                    await stream.send(struct.pack("<Q", len(data)) + data)
                await stream.receive(1)
                emit(rss_mib=hwm_mib() - before)

    anyio.run(main)


def run_streampickle(role: str, transport: str, messages: list[Any], address: str | None,
                     backend: str, uvloop: bool, own_sockets: bool, key: bytes | None) -> None:
    import anyio
    from anyio.abc import SocketAttribute

    import streampickle

    async def receive_all(stream: Any) -> None:
        before = ready()
        start = time.perf_counter()
        got = [await stream.receive() for _ in messages]
        seconds = time.perf_counter() - start
        rss = hwm_mib() - before
        await stream.send("k")
        finish_recv(seconds, rss, got)

    async def main() -> None:
        if role == "recv":
            if own_sockets:
                if transport == "unix":
                    path = new_address("unix")
                    listener = await streampickle.create_unix_listener(path, key=key)
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
            if own_sockets:
                if transport == "unix":
                    stream = await streampickle.connect_unix(address or "", key=key)
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
                before = ready()
                for m in messages:
                    await stream.send(m)
                await stream.receive()
                emit(rss_mib=hwm_mib() - before)

    options = {"use_uvloop": True} if uvloop else {}
    anyio.run(main, backend=backend, backend_options=options)


def finish_recv(seconds: float, rss: float, got: list[Any]) -> None:
    emit(seconds=seconds, rss_mib=rss, _verify_pending=True)
    _RESULT["got"] = got


_RESULT: dict[str, Any] = {}

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
    if role == "recv":
        got = _RESULT.get("got", [])
        if contender == "limit-socket":
            dest, pos = _RESULT["dest"], 0
            for view in raw_payload(messages):
                chunk = np.frombuffer(view, dtype=np.uint8)
                assert np.array_equal(dest[pos : pos + chunk.size], chunk), "limit-socket bytes differ"
                pos += chunk.size
            assert pos == dest.size
        else:
            workloads.verify(workload, float(scale), got)
        emit(verified=True)


if __name__ == "__main__":
    main()
