"""streampickle demo: one process streams large numpy arrays to another over a Unix socket.

    python examples/demo.py                 # 4 GiB in 16 arrays of 256 MiB
    python examples/demo.py --total-gib 1 --array-mib 64 --backend trio

The consumer listens, the producer (a separate OS process) connects with
``streampickle.connect_unix`` and sends dicts holding arrays with ``ObjectStream.send``; the
consumer receives them with ``async for`` and checks every byte against what the producer was
known to send. Throughput counts only the time spent moving data.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import anyio
import numpy as np

import streampickle


def base_array(array_bytes: int) -> np.ndarray:
    # The same pseudo-random data on both sides, so the consumer can verify every byte.
    return np.random.default_rng(2026).integers(0, 2**63, size=array_bytes // 8, dtype=np.int64)


async def producer(path: str, count: int, array_bytes: int, backend: str) -> None:
    data = base_array(array_bytes)
    async with await streampickle.connect_unix(path) as stream:
        await stream.send("ready")  # start the clock only once the producer's data exists
        for i in range(count):
            data[0] = i  # the message number, checked by the consumer
            await stream.send({"index": i, "array": data, "note": f"array {i} of {count}"})
        await stream.send_eof()
        assert await stream.receive() == "verified"


def bar(done: int, total: int, width: int = 32) -> str:
    filled = width * done // total
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


async def consumer(count: int, array_bytes: int, backend: str) -> None:
    # The socket lives in a directory of its own, removed with everything in it at the end.
    with tempfile.TemporaryDirectory(prefix="streampickle-demo-") as tmp:
        await consume(os.path.join(tmp, "socket"), count, array_bytes, backend)


async def consume(path: str, count: int, array_bytes: int, backend: str) -> None:
    expected = base_array(array_bytes)
    async with await streampickle.create_unix_listener(path) as listener:
        child = subprocess.Popen(  # noqa: ASYNC220 - only starts the producer the accept waits for
            [sys.executable, __file__, "--producer", path, "--count", str(count),
             "--array-bytes", str(array_bytes), "--backend", backend]
        )
        stream = await listener.accept()
    moving = 0.0
    received = 0
    async with stream:
        print(f"streaming {count} arrays of {array_bytes / 2**20:.0f} MiB over a Unix socket ({backend})")
        assert await stream.receive() == "ready"
        while True:
            start = time.perf_counter()
            try:
                message = await stream.receive()
            except anyio.EndOfStream:
                break
            moving += time.perf_counter() - start
            array = message["array"]
            if message["index"] != received or array[0] != received or not np.array_equal(array[1:], expected[1:]):
                raise SystemExit(f"array {received} arrived corrupted")
            received += 1
            gbps = received * array_bytes / moving / 1e9
            print(f"\r{bar(received, count)} {gbps:5.2f} GB/s", end="", flush=True)
        await stream.send("verified")
    print()
    if child.wait() != 0 or received != count:
        raise SystemExit("the producer failed")
    total = count * array_bytes
    print(f"received {total / 2**30:.2f} GiB in {count} arrays, every byte verified: "
          f"{total / moving / 1e9:.2f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-gib", type=float, default=4.0)
    parser.add_argument("--array-mib", type=int, default=256)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--producer", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--array-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.producer:
        anyio.run(producer, args.producer, args.count, args.array_bytes, args.backend, backend=args.backend)
        return
    array_bytes = args.array_mib << 20
    count = max(1, round(args.total_gib * 2**30 / array_bytes))
    anyio.run(consumer, count, array_bytes, args.backend, backend=args.backend)


if __name__ == "__main__":
    main()
