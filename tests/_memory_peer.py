"""One side of a 1 GiB transfer between two processes; prints its peak-RSS increase as JSON.

    python _memory_peer.py recv TRANSPORT BACKEND ADDRESS SIZE
    python _memory_peer.py send TRANSPORT BACKEND ADDRESS SIZE

TRANSPORT: unix-owned, tcp-owned (streampickle's sockets), tcp-anyio (ObjectStream over an
anyio socket stream), tls (over anyio TLS), pipe (the sender starts the receiver as a child and
writes to its stdin; the child reads it with an asyncio StreamReader).
"""

from __future__ import annotations

import json
import os
import resource
import ssl
import sys

import anyio
import numpy as np
from anyio.abc import SocketAttribute

import streampickle

role, transport, backend, address, size = sys.argv[1:6]
SIZE = int(size)
CERTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_certs")


def peak_mib() -> float:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: the latter survives exec, so a
    child started by a parent holding 1 GiB would start with a 1 GiB "peak"."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def tls_context(server: bool) -> ssl.SSLContext:
    if server:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(os.path.join(CERTS, "server.pem"))
    else:
        ctx = ssl.create_default_context(cafile=os.path.join(CERTS, "ca.pem"))
    return ctx


async def receive_one(stream: streampickle.ObjectStream) -> None:
    before = peak_mib()
    obj = await stream.receive()
    after = peak_mib()
    ok = obj.shape == (SIZE // 8,) and obj[0] == 1.0 and obj[-1] == 1.0
    report(role="recv", increase_mib=after - before, ok=bool(ok))
    await stream.send("done")


async def recv_main() -> None:
    if transport == "pipe":
        loop = __import__("asyncio").get_running_loop()
        reader = __import__("asyncio").StreamReader(limit=1 << 16)
        await loop.connect_read_pipe(lambda: __import__("asyncio").StreamReaderProtocol(reader), sys.stdin.buffer)
        before = peak_mib()
        obj = await streampickle.load(reader)
        report(role="recv", increase_mib=peak_mib() - before, ok=bool(obj.shape == (SIZE // 8,) and obj[-1] == 1.0))
        return
    if transport == "unix-owned":
        listener = await streampickle.create_unix_listener(address)
    elif transport == "tcp-owned":
        listener = await streampickle.create_tcp_listener(local_host="127.0.0.1")
    else:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port, None)
    print(json.dumps({"ready": port}), flush=True)
    if transport.endswith("owned"):
        stream = await listener.accept()
        async with stream:
            await receive_one(stream)
        return

    async def handle(raw: object) -> None:
        if transport == "tls":
            from anyio.streams.tls import TLSStream

            raw = await TLSStream.wrap(raw, server_side=True, ssl_context=tls_context(True), standard_compatible=False)
        async with streampickle.ObjectStream(raw) as stream:
            await receive_one(stream)
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        await listener.serve(handle, task_group=tg)


async def send_main() -> None:
    arr = np.ones(SIZE // 8)  # touched: its pages count in the baseline
    if transport == "pipe":
        proc = await anyio.open_process(
            [sys.executable, __file__, "recv", "pipe", "asyncio", "-", size], stderr=None  # reads with asyncio streams
        )
        before = peak_mib()
        await streampickle.dump(arr, proc.stdin)
        after = peak_mib()
        await proc.stdin.aclose()
        # All of the receiver's output, to its end: one receive() may return part of a line,
        # and the report would then run into this side's own (a CI failure, once).
        out = b"".join([chunk async for chunk in proc.stdout])
        await proc.wait()
        sys.stdout.write(out.decode())
        report(role="send", increase_mib=after - before, ok=True)
        return
    if transport == "unix-owned":
        stream = await streampickle.connect_unix(address)
    elif transport == "tcp-owned":
        stream = await streampickle.connect_tcp("127.0.0.1", int(address))
    else:
        raw = await anyio.connect_tcp("127.0.0.1", int(address))
        if transport == "tls":
            from anyio.streams.tls import TLSStream

            raw = await TLSStream.wrap(
                raw, hostname="localhost", ssl_context=tls_context(False), standard_compatible=False
            )
        stream = streampickle.ObjectStream(raw)
    async with stream:
        before = peak_mib()
        await stream.send(arr)
        after = peak_mib()
        assert await stream.receive() == "done"
    report(role="send", increase_mib=after - before, ok=True)


anyio.run(recv_main if role == "recv" else send_main, backend=backend)
