"""Hand arrays to a child process over its stdin/stdout pipes with ``anyio.open_process``.

    python examples/child_pipe.py
"""

from __future__ import annotations

import sys

import anyio
import numpy as np
from anyio.streams.stapled import StapledByteStream

import streampickle

CHILD = """
import sys
import numpy as np
from streampickle import sync
while True:
    try:
        array = sync.load(sys.stdin.buffer)
    except EOFError:
        break
    sync.dump(np.sort(array), sys.stdout.buffer)
"""


async def main() -> None:
    async with await anyio.open_process([sys.executable, "-c", CHILD], stderr=None) as process:
        stream = streampickle.ObjectStream(StapledByteStream(process.stdin, process.stdout))
        for n in (5, 1_000_000):
            await stream.send(np.random.default_rng(n).random(n))
            result = await stream.receive()
            assert (np.diff(result) >= 0).all()
            print(f"the child sorted {n} numbers")
        await stream.send_eof()


if __name__ == "__main__":
    anyio.run(main)
