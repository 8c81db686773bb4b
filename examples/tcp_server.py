"""A TCP server and several clients: each client sends arrays, the server answers with stats.

    python examples/tcp_server.py
"""

from __future__ import annotations

import anyio
import numpy as np
from anyio.abc import SocketAttribute

import streampickle


async def handle(stream: streampickle.ObjectStream) -> None:
    # Safe by default: a client can only make this server build plain data and arrays.
    async for request in stream:
        array = request["array"]
        await stream.send({"client": request["client"], "mean": float(array.mean()), "shape": array.shape})


async def client(port: int, number: int) -> None:
    async with await streampickle.connect_tcp("127.0.0.1", port) as stream:
        for size in (10, 1_000, 1_000_000):
            await stream.send({"client": number, "array": np.full(size, float(number))})
            reply = await stream.receive()
            assert reply["mean"] == number
        print(f"client {number}: 3 round trips, last reply {reply}")


async def main() -> None:
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            async with anyio.create_task_group() as clients:
                for number in range(4):
                    clients.start_soon(client, port, number)
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main)
