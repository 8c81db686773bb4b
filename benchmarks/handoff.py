"""Where a shared-memory hand-off's time goes: one timeline across two processes.

    python benchmarks/handoff.py                # streampickle.sync, many-arrays packed
    python benchmarks/handoff.py --floor        # the floor: pickle and SCM_RIGHTS, no checks
    python benchmarks/handoff.py --transfers 60 --warm

run.py times a transfer from the receiver's "go" to the last object built, as one figure. This
splits the same transfer (many-arrays packed in one ``shared_empty`` buffer, a forked sender
over a Unix socket pair) into what each process does, by timestamps from one monotonic clock
that both processes read:

* ``wake``: from the receiver's one-byte "go" to the sender running (the kernel and, on a VM,
  the host waking an idle CPU);
* ``encode+send``: the sender's ``sync.dump`` of the message, descriptors included;
* ``wake'``: from the sender's last byte to the receiver's first receive returning;
* ``decode``: from there to the objects built: reading, checking the descriptor, mapping,
  the safe loader.

As in run.py, the receiver reads every byte it received (the check) between transfers, so
each transfer starts with caches as cold as the benchmark's; ``--warm`` skips the check.
``--floor`` replaces streampickle on both ends by the least a hand-off can do: plain
``pickle.dumps`` with ``buffer_callback``, ``socket.send_fds``, ``mmap`` of the whole file and
``pickle.loads(buffers=...)``, with no wire format, no limits and no verification: what the
same machine costs without any of streampickle's work. The first ``--skip`` transfers (10:
first calls, and bytecode CPython has yet to specialize, as run.py's untimed transfers) are
left out of the medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import pickle
import socket
import statistics
import struct
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import workloads  # noqa: E402
from peers import GO, STOP, recv_exactly_into  # noqa: E402

from streampickle import _fdpass, _shm, sync  # noqa: E402


def send_floor(sock: socket.socket, message: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    pickled = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    found = _shm.find(views)
    places = [f for f in found if f is not None]
    assert len(places) == len(views) and len({fd for fd, _, _ in places}) == 1, "packed: one file"
    table = b"".join(struct.pack("<QQ", offset, v.nbytes) for (_, offset, _), v in zip(places, views, strict=True))
    socket.send_fds(sock, [struct.pack("<QQ", len(pickled), len(views)) + table + pickled], [places[0][0]])


def receive_floor(sock: socket.socket, first: list[float]) -> Any:
    head, fds, _, _ = socket.recv_fds(sock, 16, 1)
    first.append(time.perf_counter())
    size, count = struct.unpack("<QQ", head)
    rest = bytearray(16 * count + size)
    recv_exactly_into(sock, memoryview(rest))
    whole = memoryview(mmap.mmap(fds[0], os.fstat(fds[0]).st_size))
    os.close(fds[0])
    ranges = [struct.unpack_from("<QQ", rest, 16 * i) for i in range(count)]
    return pickle.loads(bytes(rest[16 * count :]), buffers=[whole[o : o + n] for o, n in ranges])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transfers", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10, help="untimed transfers first")
    parser.add_argument("--floor", action="store_true", help="pickle and SCM_RIGHTS alone, no streampickle")
    parser.add_argument("--warm", action="store_true", help="no read of the data between transfers")
    args = parser.parse_args()
    messages = workloads.build("many-arrays", 1.0)
    check = workloads.checker(messages)
    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    report_r, report_w = os.pipe()
    if os.fork() == 0:  # the sender
        receiver.close()
        os.close(report_r)
        payload = workloads.packed(messages)
        stamps = []
        while sender.recv(1) == GO:
            start = time.perf_counter()
            for message in payload:
                if args.floor:
                    send_floor(sender, message)
                else:
                    sync.dump(message, sender, shared_memory=True)
            stamps.append((start, time.perf_counter()))
        os.write(report_w, json.dumps(stamps).encode())
        os._exit(0)
    sender.close()
    os.close(report_w)
    first: list[float] = []
    original = _fdpass.receive_into

    def receive_into(*a: Any, **k: Any) -> Any:  # notes when the first receive of a transfer returns
        result = original(*a, **k)
        first.append(time.perf_counter())
        return result

    _fdpass.receive_into = receive_into  # sync.load looks it up on each call
    rows = []
    for _ in range(args.transfers):
        gc.collect()
        first.clear()
        go = time.perf_counter()
        receiver.sendall(GO)
        if args.floor:
            got = [receive_floor(receiver, first) for _ in messages]
        else:
            got = [sync.load(receiver, shared_memory=True) for _ in messages]
        rows.append((go, first[0], time.perf_counter()))
        if not args.warm:
            check(got)
        del got
    receiver.sendall(STOP)
    with os.fdopen(report_r, "rb") as report:
        sent = json.loads(report.read())
    os.wait()
    columns: dict[str, list[float]] = {"wake": [], "encode+send": [], "wake'": [], "decode": [], "total": []}
    for (go, arrived, done), (start, end) in list(zip(rows, sent, strict=True))[args.skip :]:
        for name, seconds in zip(columns, (start - go, end - start, arrived - end, done - arrived, done - go),
                                 strict=True):
            columns[name].append(seconds * 1e6)
    what = "floor (pickle + SCM_RIGHTS)" if args.floor else "streampickle.sync"
    print(f"{what}, many-arrays packed, {'warm' if args.warm else 'cold'}: medians of "
          f"{len(columns['total'])} transfers, us")
    print("  " + "  ".join(f"{name} {statistics.median(values):.0f}" for name, values in columns.items()))


if __name__ == "__main__":
    main()
