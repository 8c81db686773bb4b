"""The pure-Python configuration against the C one: the same bytes out, the same objects or
errors in.

Every module picks a C function or its Python twin once, when streampickle is imported
(``streampickle._accel``), so each configuration runs in a fresh interpreter: one with
``STREAMPICKLE_PURE_PYTHON=1``, one without. Both get the same corpus: numpy arrays of many
dtypes and memory orders, nested containers, shared and cyclic graphs, objects that can't be
pickled, with and without a key, through ``dumps`` and a reused ``Encoder``; and, to decode,
the messages of that corpus, the fuzzers' seeds, the grammar's inputs for a fixed seed, the
malformed pickles of the scan tests, and corruptions and truncations of all of them, through
``loads`` (safe, and trusted for the corpus's own messages) and a ``Decoder`` fed whole and
in pieces. Every outcome (the bytes, the objects, or the error's class and message) must be
the same.

A graph of plain data in which no object can appear twice is pickled without the pickler's
memo in both configurations (C ``unshared`` and its twin ``_encoder._unshared_py``), so even
those pickles are byte for byte the same; the corpus holds such graphs, and others.
"""

from __future__ import annotations

import itertools
import os
import pickle
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
KEY = b"parity key"
# Two interpreters each encode and decode the whole corpus (seconds; a minute on a busy
# machine): each may take CHILD_S, and pytest's own timeout is above both.
CHILD_S = 240
pytestmark = pytest.mark.timeout(2 * CHILD_S + 60)


# -- the corpus (built the same way in both interpreters) ----------------------------------


def _arrays() -> dict[str, Any]:
    out: dict[str, Any] = {}
    dtypes = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16",
              ">i4", ">f8", "<U5", "S3", "M8[ns]", "m8[s]", [("a", "<i4"), ("b", "<f8")]]
    for dt in dtypes:
        dtype = np.dtype(dt)
        base = np.arange(24).astype(dtype) if dtype.fields is None else np.zeros(24, dtype)
        name = str(dtype)
        out[f"{name} C"] = base.reshape(4, 6)
        out[f"{name} F"] = np.asfortranarray(base.reshape(4, 6))
        out[f"{name} strided"] = base[::3]
    out["0-d"] = np.array(3.5)
    out["empty"] = np.zeros((0, 3))
    out["3-d transposed"] = np.arange(60.0).reshape(3, 4, 5).transpose(2, 0, 1)
    out["read-only"] = np.frombuffer(b"12345678", dtype="u1")
    out["1 MiB"] = np.ones(1 << 20, dtype="u1")
    return out


def objects() -> dict[str, Any]:
    shared = [1, 2, 3]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    deep: list[Any] = []
    for _ in range(250):
        deep = [deep]
    out: dict[str, Any] = {
        "None": None,
        "small dict": {"id": 1, "vals": [1.0, 2.0], "ok": True},
        "rows": [(i, i * 0.5, str(i)) for i in range(2000)],
        "strings": ["x" * 70_000, "", "é", b"\x00" * 100, bytearray(b"abc")],
        "numbers": [0, -1, 2**100, -(2**70), 1.5, float("inf"), float("nan"), 1 + 2j],
        "sets": [{1, 2, 3}, frozenset({"a"}), set()],
        "shared": [shared, shared, {"again": shared}],
        "cycle": cyclic,
        "deep": deep,
        "arrays in a dict": {"a": np.arange(10), "b": [np.ones((2, 2)), np.zeros(3, "f4")]},
        "a shared array": [np.arange(5)] * 2,
        "a lock (unpicklable)": [threading.Lock()],
    }
    out.update(_arrays())
    return out


def _encode(make: Any) -> Any:
    try:
        return ("ok", make())
    except Exception as exc:  # noqa: BLE001 - the error is the outcome
        return ("error", type(exc).__name__, str(exc))


def _array_flags(obj: Any, out: list[Any], seen: set[int]) -> list[Any]:
    """What pickling an outcome would lose: each array's writeability and memory order."""
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        out.append((obj.flags.writeable, obj.flags.c_contiguous, obj.flags.f_contiguous))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _array_flags(k, out, seen)
            _array_flags(v, out, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _array_flags(v, out, seen)
    return out


def _decoded(func: Any) -> Any:
    try:
        obj = func()
    except Exception as exc:  # noqa: BLE001 - the error is the outcome
        return ("error", type(exc).__name__, str(exc))
    try:
        return ("ok", pickle.dumps(obj, protocol=5), _array_flags(obj, [], set()))
    except Exception:  # noqa: BLE001 - trusted mode may build anything: its type and bytes
        try:
            raw = bytes(memoryview(obj))
        except TypeError:
            raw = b""
        return ("ok, unpicklable", type(obj).__name__, raw)


def _decoder_outcomes(data: bytes, cuts: list[int], **options: Any) -> list[Any]:
    import streampickle

    decoder = streampickle.Decoder(**options)
    out: list[Any] = []
    bounds = [0, *cuts, len(data)]

    def drain() -> None:
        while True:
            got = _decoded(lambda: next(decoder))
            if got[:2] == ("error", "StopIteration"):
                return
            out.append(got)
            if got[0] == "error" and decoder.failed:
                return

    for a, b in itertools.pairwise(bounds):
        try:
            decoder.feed(data[a:b])
        except Exception as exc:  # noqa: BLE001
            out.append(("feed error", type(exc).__name__, str(exc)))
            return out
        drain()
    try:
        decoder.feed_eof()
    except Exception as exc:  # noqa: BLE001
        out.append(("eof error", type(exc).__name__, str(exc)))
    drain()
    return out


def child(inputs_path: str, out_path: str) -> None:
    """Run in each interpreter: encode the corpus, decode the inputs, write every outcome."""
    import streampickle
    from streampickle._accel import speedups

    results: dict[str, Any] = {"c": speedups is not None}
    for name, obj in objects().items():
        unshared = speedups.unshared if speedups else streampickle._encoder._unshared_py
        results[f"unshared {name}"] = unshared(obj)
        results[f"dumps {name}"] = _encode(lambda obj=obj: streampickle.dumps(obj))
        results[f"dumps key {name}"] = _encode(lambda obj=obj: streampickle.dumps(obj, key=KEY))
        for label, options in (("encoder", {}), ("encoder key", {"key": KEY, "stream": False})):
            encoder = streampickle.Encoder(**options)  # type: ignore[arg-type]
            results[f"{label} {name}"] = _encode(
                lambda e=encoder, obj=obj: b"".join(bytes(c) for _ in range(2) for c in e.encode(obj))
            )
    with open(inputs_path, "rb") as f:
        inputs: list[tuple[str, bytes, dict[str, Any]]] = pickle.load(f)
    for name, data, options in inputs:
        results[f"loads {name}"] = _decoded(lambda data=data, options=options: streampickle.loads(data, **options))
        if "message " in name and not name.startswith(("mutated", "truncated")):
            # trusted mode runs whatever a pickle names: only on the corpus's own messages
            results[f"loads trusted {name}"] = _decoded(
                lambda data=data, options=options: streampickle.loads(data, trusted=True, **options)
            )
        rng = random.Random(len(data))
        cuts = sorted({rng.randrange(1, len(data)) for _ in range(4)}) if len(data) > 1 else []
        if len(data) <= 256:
            results[f"decoder bytewise {name}"] = _decoder_outcomes(data, list(range(1, len(data))), **options)
        results[f"decoder {name}"] = _decoder_outcomes(data, [], **options)
        results[f"decoder cut {name}"] = _decoder_outcomes(data, cuts, **options)
    with open(out_path, "wb") as f:
        pickle.dump(results, f, protocol=5)


# -- the inputs to decode (made once, here) -------------------------------------------------


def _inputs() -> list[tuple[str, bytes, dict[str, Any]]]:
    import streampickle
    from _util import make_message
    from test_scan import MALFORMED

    sys.path.insert(0, str(ROOT))
    try:
        from fuzz import grammar
    finally:
        sys.path.remove(str(ROOT))
    out: list[tuple[str, bytes, dict[str, Any]]] = []
    for name, obj in objects().items():
        try:
            message = streampickle.dumps(obj)
        except streampickle.EncodeError:
            continue
        if len(message) <= 64 * 1024:  # the big ones are encoded above; decoding them teaches little
            out.append((f"message {name}", message, {}))
            out.append((f"keyed message {name}", streampickle.dumps(obj, key=KEY), {"key": KEY}))
    for path in sorted((ROOT / "fuzz" / "seeds").glob("*.bin")):
        if path.stat().st_size <= 64 * 1024:
            out.append((f"seed {path.name}", path.read_bytes(), {}))
    src = grammar.RandomSource(random.Random(20261206))
    for i in range(200):
        out.append((f"grammar {i}", grammar.generate_case(src).data, {}))
    for name, payload in MALFORMED:
        out.append((f"malformed {name}", make_message(payload), {}))
    rng = random.Random(5)
    valid = [(n, d, o) for n, d, o in out if n.startswith("message ") and len(d) < 100_000]
    for i in range(200):
        name, data, options = rng.choice(valid)
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        out.append((f"mutated {i} of {name}", bytes(mutated), options))
        out.append((f"truncated {i} of {name}", data[: rng.randrange(len(data))], options))
    return out


# -- comparing -----------------------------------------------------------------------------


def _run(tmp_path: Path, inputs: Path, pure: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("STREAMPICKLE_PURE_PYTHON", None)
    env["PYTHONHASHSEED"] = "0"  # a set pickles in iteration order, which follows str hashes
    if pure:
        env["STREAMPICKLE_PURE_PYTHON"] = "1"
    out = tmp_path / ("pure.pickle" if pure else "c.pickle")
    code = (
        f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]; "
        "import test_pure_parity; test_pure_parity.child(sys.argv[1], sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(inputs), str(out)], env=env, check=True, timeout=CHILD_S)
    with open(out, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("parity")
    inputs = tmp_path / "inputs.pickle"
    with open(inputs, "wb") as f:
        pickle.dump(_inputs(), f, protocol=5)
    c, pure = _run(tmp_path, inputs, pure=False), _run(tmp_path, inputs, pure=True)
    if not c["c"]:
        pytest.skip("the C extension is not built here: nothing to compare the pure-Python twins with")
    assert not pure["c"], "STREAMPICKLE_PURE_PYTHON=1 left the C extension in use"
    return c, pure


def test_encoding_gives_the_same_bytes(runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    c, pure = runs
    kinds = ("dumps ", "dumps key ", "encoder ", "encoder key ")
    names = [k for k in c if k.startswith(kinds)]
    assert len(names) == 4 * len(objects())
    differ = [name for name in names if c[name] != pure[name]]
    assert not differ, f"{len(differ)} differ, e.g. {differ[0]}:\nC:    {c[differ[0]]}\npure: {pure[differ[0]]}"
    unshared = [k for k in c if k.startswith("unshared ")]
    # both kinds of graph are in the corpus: pickled without the memo, and with it
    assert any(c[k] for k in unshared) and not all(c[k] for k in unshared)
    assert all(c[k] == pure[k] for k in unshared), "the twins disagree on which graphs need the memo"
    assert c["dumps a lock (unpicklable)"][0] == "error"  # errors are compared too


def test_decoding_gives_the_same_objects_and_errors(runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    c, pure = runs
    names = [k for k in c if k.startswith(("loads ", "decoder "))]
    assert len(names) > 1000
    differ = [name for name in names if c[name] != pure[name]]
    assert not differ, f"{len(differ)} differ, e.g. {differ[0]}:\nC:    {c[differ[0]]}\npure: {pure[differ[0]]}"
    # the corpus reaches both outcomes
    outcomes = {c[name][0] for name in names if name.startswith("loads ")}
    assert {"ok", "error"} <= outcomes
