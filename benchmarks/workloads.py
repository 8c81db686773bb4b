"""The benchmark workloads: how to build each, how big it is, and how to check what arrived.

Every workload is deterministic, so the receiver can build the expected value itself and verify
what it received, outside the timed region."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

MiB = 1 << 20


def sizes(scale: float) -> dict[str, int]:
    """Workload parameters; ``scale`` shrinks them (the smoke test uses a tiny scale)."""
    return {
        "big_array_bytes": max(8, int(512 * MiB * scale)) // 8 * 8,
        "many_arrays_each": max(8, int(4 * MiB * scale)) // 8 * 8,
        "small_msgs": max(10, int(100_000 * scale)),
        "graph_items": max(10, int(1_000_000 * scale)),
    }


def build(workload: str, scale: float) -> list[Any]:
    """The messages of a workload, in order (one message, or many for small-msgs)."""
    s = sizes(scale)
    if workload == "big-array":
        return [np.arange(s["big_array_bytes"] // 8, dtype=np.float64)]
    if workload == "many-arrays":
        n = s["many_arrays_each"] // 8
        return [{
            "meta": {"name": "many-arrays", "count": 64, "step": 7},
            **{f"array-{i}": np.arange(i, i + n, dtype=np.float64) for i in range(64)},
        }]
    if workload == "small-msgs":
        return [{"id": i, "name": "x", "vals": [1.0, 2.0, 3.0]} for i in range(s["small_msgs"])]
    if workload == "object-graph":
        return [[(i, i * 0.5, str(i)) for i in range(s["graph_items"])]]
    raise ValueError(f"unknown workload {workload!r}")


def payload_bytes(workload: str, scale: float) -> int:
    """Bytes of data the workload moves (for GB/s): array bytes, or pickled size otherwise."""
    import pickle

    messages = build(workload, scale)
    total = 0
    for m in messages:
        bufs: list[Any] = []
        total += len(pickle.dumps(m, protocol=5, buffer_callback=bufs.append))
        total += sum(b.raw().nbytes for b in bufs)
    return total


def checker(expected: list[Any]) -> Callable[[list[Any]], None]:
    """A check that messages received equal ``expected`` (the receiver's own build of them).

    The receiver builds the workload once and checks every transfer against it, so a check
    costs a comparison, not a rebuild."""

    def check(received: list[Any]) -> None:
        assert len(received) == len(expected), f"{len(received)} messages, expected {len(expected)}"
        for got, want in zip(received, expected, strict=True):
            _same(got, want)

    return check


def _same(got: Any, want: Any) -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and np.array_equal(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _same(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        # list and tuple compare alike: dask's msgpack turns lists into tuples
        assert isinstance(got, (list, tuple)) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _same(g, w)
    else:
        assert got == want


# -- same host: the shared-memory contenders' helpers ----------------------------------------


def arrays(obj: Any) -> list[np.ndarray[Any, Any]]:
    """The numpy arrays in a message (or a list of messages), in order."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [a for item in obj for a in arrays(item)]
    return []


def _replace_arrays(obj: Any, new: Callable[[np.ndarray[Any, Any]], Any]) -> Any:
    if isinstance(obj, np.ndarray):
        return new(obj)
    if isinstance(obj, dict):
        return {k: _replace_arrays(v, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_arrays(v, new) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_replace_arrays(v, new) for v in obj)
    return obj


def shared(messages: list[Any]) -> list[Any]:
    """The messages with every array copied into shared memory (``streampickle.shared_copy``):
    what a producer that makes its arrays with ``shared_empty`` would send."""
    import streampickle

    return _replace_arrays(messages, streampickle.shared_copy)  # type: ignore[no-any-return]


def packed(messages: list[Any]) -> list[Any]:
    """The messages with each message's arrays copied into one shared buffer (one
    ``streampickle.shared_empty`` per message, each array a view of it at a 64-byte aligned
    offset): what a producer that builds a message's arrays in one buffer sends. Its arrays
    travel with one descriptor, and the receiver maps them with one ``mmap``."""
    import streampickle

    out = []
    for message in messages:
        sizes = [-(-a.nbytes // 64) * 64 for a in arrays(message)]
        buffer = streampickle.shared_empty(max(1, sum(sizes)), np.uint8)
        offsets = iter(np.cumsum([0, *sizes[:-1]]).tolist())

        def carve(a: np.ndarray[Any, Any], buffer: Any = buffer, offsets: Any = offsets) -> np.ndarray[Any, Any]:
            start = next(offsets)
            view = buffer[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
            view[...] = a
            return view  # type: ignore[no-any-return]

        out.append(_replace_arrays(message, carve))
    return out


def refill(pooled: Any, ordinary: Any) -> None:
    """Copy each array of ``ordinary`` into its twin in ``pooled`` (``shared(ordinary)``)."""
    for dest, source in zip(arrays(pooled), arrays(ordinary), strict=True):
        np.copyto(dest, source)


def checksums(messages: Any) -> list[int]:
    """One number per array: the wrapping sum of its bytes read as 64-bit words (and the last
    few bytes one by one). Every byte is read once, about as fast as numpy reads memory: the
    receiver's full read of what it got, which a descriptor hand-off otherwise skips."""
    out = []
    for a in arrays(messages):
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        whole = raw.size - raw.size % 8
        out.append(int(np.add.reduce(raw[:whole].view(np.uint64))) + int(raw[whole:].sum()))
    return out
