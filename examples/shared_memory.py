"""Hand arrays to another process on the same host as shared memory, not bytes (Linux).

    python examples/shared_memory.py            # 8 arrays of 256 MiB
    python examples/shared_memory.py --small    # 8 arrays of 1 MiB: runs in a second

A producer process makes its arrays with ``streampickle.shared_empty`` (an ordinary numpy
array whose memory is an anonymous shared-memory file) and fills them. Sent with
``shared_memory=True`` over a Unix socket, each one travels as a descriptor beside a few dozen
bytes, and the consumer's array maps the producer's memory: the hand-off costs about the same
at any size, and no byte is copied. Arrays made any other way still work; they go through the
socket as bytes.

The array the consumer gets is the same memory, not a snapshot: writes on either side are seen
by the other (here the consumer marks each array and the producer sees the marks; send
``array.copy()`` for a snapshot, which goes as bytes). It outlives the producer: the consumer
checks the arrays after the producer has exited. It is freed when the last process holding it
lets go.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import tempfile
import time

import numpy as np

import streampickle
from streampickle import sync

MiB = 1 << 20


def producer(path: str, count: int, array_bytes: int) -> None:
    # Making and filling the arrays is the producer's work, done before the clock starts.
    arrays = []
    for i in range(count):
        array = streampickle.shared_empty(array_bytes // 8, dtype=np.float64)
        array.fill(i)
        arrays.append(array)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sync.dump("ready", sock, shared_memory=True)
        for i, array in enumerate(arrays):
            sync.dump({"index": i, "array": array}, sock, shared_memory=True)
        # The consumer marks each array's last element; the marks show up here.
        assert sync.load(sock) == "marked"
        marked = sum(array[-1] == -1 for array in arrays)
        print(f"producer: the consumer's marks are in {marked} of my {count} arrays: the same memory", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--array-mib", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="8 arrays of 1 MiB")
    args = parser.parse_args()
    count, array_bytes = (8, MiB) if args.small else (args.count, args.array_mib * MiB)

    with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX) as listener:
        path = os.path.join(tmp, "socket")
        listener.bind(path)
        listener.listen(1)
        process = multiprocessing.get_context("spawn").Process(target=producer, args=(path, count, array_bytes))
        process.start()
        conn, _ = listener.accept()
        with conn:
            assert sync.load(conn, shared_memory=True) == "ready"
            start = time.perf_counter()
            received = [sync.load(conn, shared_memory=True) for _ in range(count)]
            seconds = time.perf_counter() - start
            for message in received:
                message["array"][-1] = -1
            sync.dump("marked", conn)
        process.join()
    assert process.exitcode == 0, f"the producer failed (exit code {process.exitcode})"

    # The producer is gone; its arrays live on in this process, every byte as it wrote them.
    for i, message in enumerate(received):
        array = message["array"]
        assert message["index"] == i and (array[:-1] == i).all() and array[-1] == -1
    total = count * array_bytes
    print(f"handed off {count} arrays of {array_bytes / MiB:g} MiB ({total / 2**30:.2f} GiB) in "
          f"{seconds * 1e3:.2f} ms: {total / seconds / 1e9:.1f} GB/s, "
          f"{seconds * 1e3 / count:.3f} ms per array")
    print(f"verified every byte after the producer exited (exit code {process.exitcode})")


if __name__ == "__main__":
    main()
