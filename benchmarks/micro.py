"""In-process costs of the core against pickle, as ratios.

    python benchmarks/micro.py

Each contender runs in short batches, interleaved with the others, many times; the minimum
batch time estimates its cost free of machine noise (other load only ever adds time).
"""

from __future__ import annotations

import pickle
import sys
import time
from collections.abc import Callable
from typing import Any

import streampickle

SMALL = {"id": 1, "name": "x", "vals": [1.0, 2.0, 3.0]}


def contenders(obj: Any) -> dict[str, Callable[[], Any]]:
    return {
        "pickle": lambda: pickle.loads(pickle.dumps(obj, protocol=5)),
        "streampickle (safe)": lambda: streampickle.loads(streampickle.dumps(obj)),
        "streampickle (trusted)": lambda: streampickle.loads(streampickle.dumps(obj), trusted=True),
        "streampickle (key)": lambda: streampickle.loads(streampickle.dumps(obj, key=b"k"), key=b"k"),
    }


def measure(funcs: dict[str, Callable[[], Any]], batch: int = 2000, rounds: int = 200) -> dict[str, float]:
    best = {name: float("inf") for name in funcs}
    for _ in range(rounds):
        for name, f in funcs.items():  # interleaved
            start = time.perf_counter()
            for _ in range(batch):
                f()
            best[name] = min(best[name], (time.perf_counter() - start) / batch)
    return best


def main() -> None:
    results = measure(contenders(SMALL))
    base = results["pickle"]
    print("loads(dumps(x)) for x = " + repr(SMALL))
    print("| contender | µs per round trip | x pickle |")
    print("|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds * 1e6:.2f} | {seconds / base:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
