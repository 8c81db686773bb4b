"""The receiving process of the shared-memory tests (tests/test_shared_transport.py).

    python _shm_peer.py unix BACKEND PATH    connect_unix(PATH, shared_memory=True)
    python _shm_peer.py fd BACKEND FD        ObjectStream.from_socket(socket FD, shared_memory=True)
    python _shm_peer.py sync - FD            sync.load / sync.dump on socket FD, shared_memory=True

The conversation, driven by the parent; every step is a message, so nothing waits on time:

1. receive a shared array (int64, filled with arange) and then an ordinary one (arange * 3);
   reply with what was found: whether each is intact, the shared one's type, whether it is
   writable, its address modulo the page size (the parent compares alignment), and how much
   of it is mapped in huge pages once read (the parent compares with its own mapping).
2. receive "look": write -2 at index 1 of the shared array, then reply with what is at index
   0 (the parent wrote -1 there after step 1).
3. receive "end" and exit 0.
"""

from __future__ import annotations

import mmap
import socket
import sys
from typing import Any

import anyio
import numpy as np

import streampickle
from _util import smaps_kib
from streampickle import sync


def report(shared: Any, plain: Any) -> dict[str, Any]:
    return {
        "intact": bool(np.array_equal(shared, np.arange(len(shared)))),
        "plain_intact": bool(np.array_equal(plain, np.arange(len(plain)) * 3)),
        "type": type(shared).__name__,
        "writeable": bool(shared.flags.writeable),
        "page_offset": shared.ctypes.data % mmap.PAGESIZE,
        "huge_kib": smaps_kib(shared.ctypes.data, "ShmemPmdMapped"),  # after the reads above
    }


def look(shared: Any) -> int:
    shared[1] = -2
    return int(shared[0])


async def run_async(channel: str, address: str) -> None:
    if channel == "unix":
        stream = await streampickle.connect_unix(address, shared_memory=True)
    else:
        sock = socket.socket(fileno=int(address))
        stream = streampickle.ObjectStream.from_socket(sock, shared_memory=True)
    async with stream:
        shared = await stream.receive()
        plain = await stream.receive()
        await stream.send(report(shared, plain))
        assert await stream.receive() == "look"
        await stream.send(look(shared))
        assert await stream.receive() == "end"


def run_sync(address: str) -> None:
    with socket.socket(fileno=int(address)) as sock:
        shared = sync.load(sock, shared_memory=True)
        plain = sync.load(sock, shared_memory=True)
        sync.dump(report(shared, plain), sock, shared_memory=True)
        assert sync.load(sock, shared_memory=True) == "look"
        sync.dump(look(shared), sock, shared_memory=True)
        assert sync.load(sock, shared_memory=True) == "end"


def main() -> None:
    channel, backend, address = sys.argv[1:4]
    if channel == "sync":
        run_sync(address)
    elif backend == "uvloop":
        anyio.run(run_async, channel, address, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(run_async, channel, address, backend=backend)


if __name__ == "__main__":
    main()
