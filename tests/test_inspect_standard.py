"""``inspect --pickle`` judges standard pickles exactly as :class:`streampickle.PickleDecoder`
does: each real ``pickle.dumps(obj, protocol=p)`` (p = 0..5) of numpy arrays, dtypes and
scalars, bytes, sets, datetimes and containers is loaded by the real decoder, and what the
decoder refuses (found by allowing each name it refuses in turn) must be exactly what the
inspector lists as refused, and its whole-pickle verdict must agree. numpy 1 and numpy 2 name
their reducers differently (``numpy.core`` and ``numpy._core``): each pickle is judged as this
numpy writes it and respelled as the other writes it."""

from __future__ import annotations

import collections
import datetime
import io
import json
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streampickle
from streampickle._allow import denied_reason
from streampickle._inspect import PickleInfo, inspect_pickles

OBJECTS: dict[str, Any] = {
    "int array": np.arange(5),
    "fortran float32": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    "structured": np.zeros(2, dtype=[("x", "<i4"), ("y", ">f8")]),
    "datetime64": np.array(["2024-01-02"], dtype="datetime64[D]"),
    "text array": np.array(["ab", "c"]),
    "dtype": np.dtype("<f8"),
    "scalar": np.float64(1.5),
    "bytes": b"abc\x00\xff",
    "bytearray": bytearray(b"ab"),
    "datetime": datetime.datetime(2024, 1, 2, 3, 4, 5),
    "sets": [{1, 2}, frozenset({3})],
    "complex": 1 + 2j,
    "containers": {"a": [1, (2.5, "three")], "b": None, "c": True},
    "ordered dict": collections.OrderedDict(a=1),
    "arrays in a dict": {"x": np.ones(3), "y": [np.int32(7), b"z"]},
}

NUMPY_2 = int(np.__version__.split(".")[0]) >= 2
WRITTEN, OTHER = ("numpy._core.", "numpy.core.") if NUMPY_2 else ("numpy.core.", "numpy._core.")


def respelled(data: bytes, old: str, new: str) -> bytes:
    """``data`` with every module name starting ``old`` spelled ``new`` instead, as the other
    numpy major version writes it (frames are dropped: their lengths would change, and a
    standard pickle may have none)."""
    out = bytearray()
    ops = list(pickletools.genops(data))
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name == "GLOBAL" and arg.startswith(old):
            module, name = arg.split(" ", 1)
            out += b"c" + (new + module[len(old):]).encode() + b"\n" + name.encode() + b"\n"
        elif op.name == "SHORT_BINUNICODE" and arg.startswith(old):
            text = (new + arg[len(old):]).encode()
            out += b"\x8c" + bytes([len(text)]) + text
        else:
            out += data[pos:end]
    return bytes(out)


def decoder_verdict(data: bytes) -> tuple[list[str], bool, bool, Any]:
    """What a real PickleDecoder refuses in ``data``: the globals it refuses, in order (each
    allowed in turn to find the next, until one that can never be allowed), whether that list
    is complete, whether it loads ``data`` with nothing allowed, and what it loads."""
    refused: list[str] = []
    while True:
        decoder = streampickle.PickleDecoder(allow=refused)
        decoder.feed(data)
        try:
            obj = next(decoder)
        except streampickle.ForbiddenGlobalError as exc:
            name = f"{exc.module}.{exc.name}"
            assert name not in refused
            refused.append(name)
            if denied_reason(name) is not None:
                return refused, False, False, None
            continue
        except streampickle.MessageDroppedError:
            return refused, True, False, None
        return refused, True, not refused, obj


def inspected(data: bytes, allow: Any = ()) -> PickleInfo:
    (record,) = inspect_pickles(io.BytesIO(data), allow=allow)
    assert record.ok and record.info.size == len(data), record.info.error
    return record.info


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def cases() -> list[Any]:
    """Each object under each protocol as written, and respelled where it names numpy."""
    out = []
    for name, obj in OBJECTS.items():
        for protocol in range(6):
            data = pickle.dumps(obj, protocol=protocol)
            out.append(pytest.param(obj, data, id=f"{name}-{protocol}"))
            if respelled(data, WRITTEN, OTHER) != data:
                out.append(pytest.param(obj, respelled(data, WRITTEN, OTHER), id=f"{name}-{protocol}-{OTHER[:-1]}"))
    return out


@pytest.mark.parametrize(("obj", "data"), cases())
def test_refused_globals_are_what_the_pickle_decoder_refuses(obj: Any, data: bytes) -> None:
    refused, complete, accepted, loaded = decoder_verdict(data)
    info = inspected(data)
    listed = [g.full_name for g in info.refused]
    assert (info.verdict is None) == accepted, info.verdict
    if not complete:  # the decoder's last refusal can never be allowed: what follows it is unknown
        assert listed[: len(refused)] == refused and info.refused[len(refused) - 1].refused.startswith("never")
        return
    assert listed == refused
    if accepted:
        assert same(obj, loaded)
        assert all(g.admitted_as == "a streampickle reconstructor" for g in info.globals)
    if refused:
        # judged with those names allowed, as the decoder that finally took it was
        allowed = inspected(data, allow=refused)
        assert allowed.refused == [] and allowed.verdict is None


def test_numpy_reducers_and_codecs_are_admitted_under_every_protocol() -> None:
    """The names the bug listed as refused: numpy's reducers in both spellings and
    ``_codecs.encode``, which protocols 0-2 write for bytes."""
    seen: set[str] = set()
    for protocol in range(6):
        for obj in (np.arange(3), np.float32(2), b"xy"):
            data = pickle.dumps(obj, protocol=protocol)
            for variant in (data, respelled(data, WRITTEN, OTHER)):
                info = inspected(variant)
                assert info.refused == [] and info.verdict is None
                seen |= {g.full_name for g in info.globals}
    for name in ("multiarray._reconstruct", "numeric._frombuffer", "multiarray.scalar"):
        assert {WRITTEN + name, OTHER + name} <= seen
    assert {"numpy.ndarray", "numpy.dtype", "_codecs.encode"} <= seen


@pytest.mark.parametrize(
    "data",
    [
        b"}}b.",  # BUILD on a dict
        b"(i__main__\nX\n.",  # INST
        b"\x80\x02c__builtin__\nset\n]\x85R]b.",  # BUILD on a reconstructed set
        b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01K\x02.",  # two objects at STOP
        b"P1\n.",  # PERSID without persistent_load
    ],
    ids=["build on dict", "inst", "build on set", "two objects", "persid"],
)
def test_a_pickle_the_decoder_refuses_for_its_shape_is_refused_whole(data: bytes) -> None:
    refused, _, accepted, _ = decoder_verdict(data)
    (record,) = inspect_pickles(io.BytesIO(data))
    info = record.info
    assert not accepted
    if record.ok:
        assert info.verdict is not None
        assert set(refused) <= {g.full_name for g in info.refused}  # INST's name is refused with its opcode
    else:
        assert info.error is not None  # the walk itself can't go on (two objects at STOP still stop)


CHILD = """
import pickle, sys
import numpy as np
with open(sys.argv[1], "wb") as f:
    for protocol in range(6):
        pickle.dump({"a": np.arange(4.0), "b": b"bytes", "s": {1}, "p": protocol}, f, protocol=protocol)
"""


def test_the_command_line_on_numpy_pickles_from_another_process(tmp_path: Path) -> None:
    path = tmp_path / "numpy.pkl"
    subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, timeout=60)
    result = subprocess.run([sys.executable, "-m", "streampickle", "inspect", "--pickle", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "6 pickles, 0 with errors, 0 the safe loader would refuse" in result.stdout
    assert result.stdout.count("safe loader: accepts") == 6 and "REFUSED" not in result.stdout
    doc = json.loads(subprocess.run([sys.executable, "-m", "streampickle", "inspect", "--pickle", "--json", str(path)],
                                    capture_output=True, text=True, timeout=60, check=True).stdout)
    assert [p["safe_loader_refuses"] for p in doc["pickles"]] == [None] * 6
    decoder = streampickle.PickleDecoder()
    decoder.feed(path.read_bytes())
    assert len(list(decoder)) == 6  # what the inspector says, the decoder does


def test_a_pickle_over_max_pickle_size_is_an_error_where_the_decoder_stops(tmp_path: Path) -> None:
    small, large = pickle.dumps([1, 2], protocol=5), pickle.dumps(b"x" * 1000, protocol=5)
    data = small + large + small
    decoder = streampickle.PickleDecoder(limits=streampickle.Limits(max_pickle_size=500))
    with pytest.raises(streampickle.LimitExceededError):
        decoder.feed(data)
    records = list(inspect_pickles(io.BytesIO(data), limits=streampickle.Limits(max_pickle_size=500)))
    assert [r.ok for r in records] == [True, False]
    assert records[1].info.error is not None and "max_pickle_size=500" in records[1].info.error
    assert f"at offset {len(small)}" in records[1].info.error
    path = tmp_path / "big.pkl"
    path.write_bytes(data)
    result = subprocess.run([sys.executable, "-m", "streampickle", "inspect", "--pickle", "--max-pickle-size", "500",
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "--max-pickle-size" in result.stderr
    assert all(r.ok for r in inspect_pickles(io.BytesIO(data)))  # under the default limit


def test_a_stack_global_spelled_with_text_literals_is_refused_as_the_verifier_refuses_it() -> None:
    """STACK_GLOBAL's name from UNICODE lines: pickle loads it, the safe loaders never do (even
    with the name allowed), and the inspector says so for the global, not only for the pickle."""
    data = b"\x80\x04Vcollections\nVOrderedDict\n\x93)R."
    assert type(pickle.loads(data)) is collections.OrderedDict  # our own bytes: the premise
    for allow in ((), ["collections.OrderedDict"]):
        decoder = streampickle.PickleDecoder(allow=allow)
        decoder.feed(data)
        with pytest.raises(streampickle.MalformedPickleError, match="STACK_GLOBAL"):
            next(decoder)
        info = inspected(data, allow=allow)
        (use,) = info.globals
        assert use.full_name == "collections.OrderedDict"
        assert use.refused is not None and "SHORT_BINUNICODE" in use.refused
        assert info.verdict is not None and "STACK_GLOBAL" in info.verdict
