"""A TCP server and several clients: each client sends arrays, the server answers with stats.

Two misbehaving clients show what the server does with bad input. A message the safe loader
refuses (here, a pickle asking for ``os.system``) is dropped alone: the handler answers with an
error and reads the next message. Bytes that are not streampickle's wire format at all (here,
an HTTP request) end that connection only; ``serve()`` logs it with the client's address and
the other clients never notice.

    python examples/tcp_server.py
"""

from __future__ import annotations

import functools
import logging
import os

import anyio
import numpy as np
from anyio.abc import SocketAttribute

import streampickle


async def handle(stream: streampickle.ObjectStream) -> None:
    # Safe by default: a client can only make this server build plain data and arrays.
    while True:
        try:
            request = await stream.receive()
        except anyio.EndOfStream:
            return  # the client is done
        except streampickle.MessageDroppedError as exc:
            # A whole message the safe loader refused (ForbiddenGlobalError) or could not
            # unpickle (MalformedPickleError) was dropped alone: answer in its place, go on.
            await stream.send({"error": type(exc).__name__})
            continue
        # A StreamBrokenError (not our wire format, a limit, cut off mid-message: message
        # boundaries are lost) goes out of the handler: serve() logs it with the client's
        # address and closes this connection. Any other exception (say, a request without
        # "array") also ends only this connection, logged with its traceback.
        array = request["array"]
        await stream.send({"client": request["client"], "mean": float(array.mean()), "shape": array.shape})


async def client(port: int, number: int) -> None:
    async with await streampickle.connect_tcp("127.0.0.1", port) as stream:
        for size in (10, 1_000, 1_000_000):
            await stream.send({"client": number, "array": np.full(size, float(number))})
            reply = await stream.receive()
            assert reply["mean"] == number
        print(f"client {number}: 3 round trips, last reply {reply}")


class Hostile:
    """Pickles as a call to ``os.system``, which a safe loader never makes."""

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, ("echo this never runs",))


async def hostile_client(port: int) -> None:
    async with await streampickle.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(Hostile())
        print(f"hostile client: {await stream.receive()}")  # {'error': 'ForbiddenGlobalError'}
        await stream.send({"client": "hostile", "array": np.arange(4.0)})
        print(f"hostile client: then {await stream.receive()}")  # served as usual


async def http_client(port: int) -> None:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):  # closed, or reset
            print("http client: connection closed by the server")


async def main() -> None:
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            # At most 100 clients are served at once; more wait in the kernel's backlog.
            tg.start_soon(functools.partial(listener.serve, handle, max_connections=100))
            async with anyio.create_task_group() as clients:
                for number in range(4):
                    clients.start_soon(client, port, number)
                clients.start_soon(hostile_client, port)
                clients.start_soon(http_client, port)
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    # serve() reports closed connections on the "streampickle" logger.
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    anyio.run(main)
