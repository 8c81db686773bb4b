"""Progress bars on both ends of a multi-GiB transfer, from ``progress=``.

    python examples/progress.py                    # 4 arrays of 512 MiB: 2 GiB
    python examples/progress.py --arrays 2 --mib 8 # a quick run
    python examples/progress.py --sync             # the same with streampickle.sync, no event loop

A producer process sends its arrays to a consumer process over a Unix socket. Each end passes
a callback as ``progress=``; it gets a ``streampickle.Progress`` (``direction``, ``done``,
``total``, ``message``) at each message's start and end and at least every 1% of it, and
draws a bar per message: tqdm's if tqdm is installed, else a plain-text one (``--plain``
forces it). tqdm is not a dependency of streampickle.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import tempfile
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

import streampickle
from streampickle import sync

if TYPE_CHECKING:
    from streampickle import Progress

MiB = 1 << 20


class TextBar:
    """A progress callback drawing one line per message: ``send    #1 [#####.....]  50%``.
    It redraws only when the whole percentage changes, and ends each message's line at 100%."""

    def __init__(self, label: str, out: Any = sys.stdout) -> None:
        self.label = label
        self.out = out
        self.shown: tuple[int, int] = (-1, -1)  # (message, percent) last drawn

    def __call__(self, event: Progress) -> None:
        percent = int(100 * event.fraction)
        if (event.message, percent) == self.shown:
            return
        self.shown = (event.message, percent)
        filled = percent // 5
        line = (
            f"{self.label:8} #{event.message} [{'#' * filled}{'.' * (20 - filled)}] {percent:3d}% "
            f"{event.done / MiB:8.1f} of {event.total / MiB:.1f} MiB"
        )
        if self.out.isatty():  # redraw in place; the finished line stays
            self.out.write("\r" + line + ("\n" if event.done == event.total else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


class TqdmBars:
    """A progress callback with a tqdm bar per message, closed when the message is done."""

    def __init__(self, label: str, tqdm: Any) -> None:
        self.label = label
        self.tqdm = tqdm
        self.bar: Any = None
        self.message = -1

    def __call__(self, event: Progress) -> None:
        if event.message != self.message:
            if self.bar is not None:
                self.bar.close()
            self.message = event.message
            self.bar = self.tqdm(
                total=event.total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"{self.label} #{event.message}",
            )
        self.bar.total = event.total
        self.bar.update(event.done - self.bar.n)
        if event.done == event.total:
            self.bar.close()
            self.bar = None


def progress_bar(label: str, plain: bool) -> Any:
    if not plain:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return TqdmBars(label, tqdm)
    return TextBar(label)


async def produce(path: str, arrays: int, nbytes: int, plain: bool) -> None:
    async with await streampickle.connect_unix(path, progress=progress_bar("send", plain)) as stream:
        for i in range(arrays):
            array = np.full(nbytes // 8, i, dtype=np.float64)
            await stream.send({"index": i, "array": array})


def producer(path: str, arrays: int, nbytes: int, plain: bool) -> None:
    anyio.run(produce, path, arrays, nbytes, plain)


async def consume(arrays: int, nbytes: int, plain: bool) -> None:
    path = os.path.join(tempfile.mkdtemp(), "progress.sock")
    async with await streampickle.create_unix_listener(path, progress=progress_bar("receive", plain)) as listener:
        child = multiprocessing.get_context("spawn").Process(target=producer, args=(path, arrays, nbytes, plain))
        child.start()
        try:
            async with await listener.accept() as stream:
                for i in range(arrays):
                    message = await stream.receive()
                    assert message["index"] == i and message["array"].nbytes == nbytes // 8 * 8
                    assert message["array"][-1] == i
        finally:
            await anyio.to_thread.run_sync(child.join)
    os.unlink(path)
    if child.exitcode != 0:
        raise SystemExit(f"the producer failed (exit status {child.exitcode})")
    print(f"received {arrays} arrays of {nbytes / MiB:.0f} MiB", flush=True)


def produce_sync(path: str, arrays: int, nbytes: int, plain: bool) -> None:
    """The producer with the blocking API: ``sync.dump`` takes the same ``progress=``. Each
    call sends message 0 of its own; the bar gets them numbered as one stream's."""
    bar = progress_bar("send", plain)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        for i in range(arrays):
            array = np.full(nbytes // 8, i, dtype=np.float64)
            sync.dump({"index": i, "array": array}, sock, progress=lambda event, i=i: bar(replace(event, message=i)))


def consume_sync(arrays: int, nbytes: int, plain: bool) -> None:
    """The consumer with the blocking API: ``sync.iter_load`` numbers the messages it reads."""
    path = os.path.join(tempfile.mkdtemp(), "progress.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        child = multiprocessing.get_context("spawn").Process(target=produce_sync, args=(path, arrays, nbytes, plain))
        child.start()
        try:
            conn, _ = listener.accept()
            received = 0
            with conn:
                for message in sync.iter_load(conn, progress=progress_bar("receive", plain)):
                    assert message["index"] == received and message["array"][-1] == received
                    received += 1
        finally:
            child.join()
    os.unlink(path)
    if child.exitcode != 0 or received != arrays:
        raise SystemExit(f"the producer failed (exit status {child.exitcode})")
    print(f"received {arrays} arrays of {nbytes / MiB:.0f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=4, help="how many arrays (default 4)")
    parser.add_argument("--mib", type=int, default=512, help="MiB per array (default 512)")
    parser.add_argument("--plain", action="store_true", help="the plain-text bar even if tqdm is installed")
    parser.add_argument("--sync", action="store_true", help="the blocking API (streampickle.sync) on both ends")
    args = parser.parse_args()
    if args.sync:
        consume_sync(args.arrays, args.mib * MiB, args.plain)
    else:
        anyio.run(consume, args.arrays, args.mib * MiB, args.plain)


if __name__ == "__main__":
    main()
