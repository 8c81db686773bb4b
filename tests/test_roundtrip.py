"""Round trips through the sans-IO core: every sample fed whole, byte by byte, in random pieces,
through get_buffer, and followed by the next message's bytes."""

from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np
import pytest

import streampickle
from _util import SPLITTERS, assert_same, decode_all, sample_objects
from streampickle._accel import speedups

SAMPLES = sample_objects()


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("split", SPLITTERS)
def test_roundtrip_any_split(name: str, split: str) -> None:
    obj = SAMPLES[name]
    data = streampickle.dumps(obj)
    (out,) = decode_all(data, SPLITTERS[split])
    assert_same(obj, out)


@pytest.mark.parametrize("split", SPLITTERS)
def test_many_messages_in_one_stream_in_order(split: str) -> None:
    objs = list(SAMPLES.values())
    data = b"".join(streampickle.dumps(o) for o in objs)
    out = decode_all(data, SPLITTERS[split], seed=1)
    assert len(out) == len(objs)
    for a, b in zip(objs, out, strict=True):
        assert_same(a, b)


@pytest.mark.parametrize("name", SAMPLES)
def test_trailing_bytes_stay_for_the_next_message(name: str) -> None:
    first = streampickle.dumps(SAMPLES[name])
    second = streampickle.dumps("next")
    decoder = streampickle.Decoder()
    decoder.feed(first + second[:7])
    (out,) = list(decoder)
    assert_same(SAMPLES[name], out)
    assert decoder.in_message and decoder.progress == (7, 20)
    decoder.feed(second[7:])
    assert list(decoder) == ["next"]
    assert not decoder.in_message


@pytest.mark.parametrize("name", SAMPLES)
def test_get_buffer_path_never_reads_past_the_message(name: str) -> None:
    """A reader that only fills get_buffer() consumes exactly one message."""
    data = streampickle.dumps(SAMPLES[name]) + b"TRAILING"
    decoder = streampickle.Decoder()
    pos = 0
    while not decoder.pending:
        target = decoder.get_buffer(1 << 20)
        n = len(target)  # a transport fills as much as it can
        target[:n] = data[pos : pos + n]
        decoder.buffer_updated(n)
        pos += n
    assert data[pos:] == b"TRAILING"
    assert_same(SAMPLES[name], next(decoder))


def test_mixed_feed_and_get_buffer() -> None:
    arr = np.arange(100_000, dtype=np.float32)
    data = streampickle.dumps({"a": arr, "b": [arr, arr[::2]]}) * 2
    decoder = streampickle.Decoder()
    rng = random.Random(3)
    pos = 0
    while pos < len(data):
        if rng.random() < 0.5:
            n = rng.randint(1, 5000)
            decoder.feed(data[pos : pos + n])
        else:
            target = decoder.get_buffer()
            n = min(len(target), rng.randint(1, 5000), len(data) - pos)
            target[:n] = data[pos : pos + n]
            decoder.buffer_updated(n)
        pos += n
    out = list(decoder)
    assert len(out) == 2
    for o in out:
        np.testing.assert_array_equal(o["a"], arr)
        assert o["b"][0] is o["b"][0]


def test_trusted_roundtrips_what_pickle_handles_with_shared_and_recursive_refs() -> None:
    shared = [1, 2]
    rec: list = [shared, shared]
    rec.append(rec)
    out = streampickle.loads(streampickle.dumps(rec), trusted=True)
    assert out[0] is out[1] and out[0] == [1, 2]
    assert out[2] is out
    # also in safe mode: references are pickle's business, not the allowlist's
    out = streampickle.loads(streampickle.dumps(rec))
    assert out[0] is out[1] and out[2] is out


class Custom:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.x == self.x


def test_trusted_loads_custom_classes() -> None:
    obj = {"c": Custom(3), "t": int, "f": len}
    assert streampickle.loads(streampickle.dumps(obj), trusted=True) == obj


def test_same_array_twice_is_one_chunk_and_one_object() -> None:
    arr = np.arange(10)
    chunks = streampickle.Encoder().encode([arr, arr])
    assert len(chunks) == 2  # header+pickle, one side chunk
    out = streampickle.loads(b"".join(chunks))
    assert out[0] is out[1]


def test_pickle_segment_decodes_with_the_stdlib() -> None:
    obj = {"a": np.arange(5.0), "b": np.ones((2, 2), order="F"), "s": "x"}
    message = streampickle.dumps(obj)
    nchunks = int.from_bytes(message[8:12], "little")
    plen = int.from_bytes(message[12:20], "little")
    table = message[20 : 20 + 8 * nchunks]
    lengths = [int.from_bytes(table[i : i + 8], "little") for i in range(0, len(table), 8)]
    start = 20 + 8 * nchunks
    segment = message[start : start + plen]
    pos = start + plen
    buffers = []
    for n in lengths:
        buffers.append(bytearray(message[pos : pos + n]))
        pos += n
    assert pos == len(message)
    assert_same(obj, pickle.loads(segment, buffers=buffers))


def test_picklebuffer_arrives_as_aligned_writable_memoryview() -> None:
    payload = bytearray(b"abc" * 1000)
    out = streampickle.loads(streampickle.dumps(pickle.PickleBuffer(payload)))
    assert isinstance(out, memoryview) and not out.readonly
    assert bytes(out) == bytes(payload)
    assert np.frombuffer(out, np.uint8).ctypes.data % 64 == 0
    ro = streampickle.loads(streampickle.dumps(pickle.PickleBuffer(bytes(payload))))
    assert ro.readonly


_NO_C = "the C extension is not in use (not built, or STREAMPICKLE_PURE_PYTHON=1): no C twin to compare"


@pytest.mark.parametrize(
    "c_fast_path",
    [pytest.param(True, marks=pytest.mark.skipif(speedups is None, reason=_NO_C)), False],
    ids=["c", "python"],
)
def test_loads_fast_paths_agree(c_fast_path: bool, monkeypatch) -> None:
    """loads() takes one small in-band message through a C fast path when the extension is
    built and through the decoder otherwise; both must give the same objects and errors."""
    from streampickle import _decoder, _encoder

    if not c_fast_path:
        monkeypatch.setattr(_decoder, "_load_plain", None)
        monkeypatch.setattr(_encoder, "_frame", _encoder._frame_py)
        monkeypatch.setattr(_encoder, "_dump", _encoder._dump_py)
        monkeypatch.setattr(_encoder, "_dump_small", _encoder._dump_small_py)
    else:
        assert _decoder._load_plain is not None and _encoder._frame is _encoder._frame_c
        assert _encoder._dump is _encoder._dump_c and _encoder._dump_small is _encoder._dump_small_c
    for obj in SAMPLES.values():
        for trusted in (False, True):
            assert_same(obj, streampickle.loads(streampickle.dumps(obj), trusted=trusted))
    assert streampickle.loads(streampickle.dumps(NotImplemented), trusted=True) is NotImplemented
    from _util import make_message

    for bad, error in [
        (make_message(b"\x80\x05N.garbage"), streampickle.MalformedPickleError),
        (make_message(b"\x80\x05}]]s."), streampickle.MalformedPickleError),  # unhashable key
        (make_message(b"\x80\x05N"), streampickle.MalformedPickleError),
        (make_message(b"\x80\x05N.")[:-1], streampickle.IncompleteMessageError),
        (make_message(b"\x80\x05N.") + b"x", streampickle.ProtocolError),
    ]:
        for trusted in (False, True):
            with pytest.raises(error):
                streampickle.loads(bad, trusted=trusted)
    # options other than the defaults leave the fast paths, with the same result
    message = streampickle.dumps(SAMPLES["small-dict"])
    for options in [{"allow": []}, {"limits": streampickle.Limits()}]:
        assert_same(SAMPLES["small-dict"], streampickle.loads(message, **options))
    assert_same(SAMPLES["small-dict"], streampickle.loads(bytearray(message)))
    with pytest.raises(streampickle.UsageError):
        streampickle.loads(message, trusted=1)  # type: ignore[arg-type]


@pytest.mark.skipif(speedups is None, reason=_NO_C)
def test_framing_in_c_gives_the_same_bytes_as_python() -> None:
    from streampickle import _encoder

    assert _encoder._frame_c is not None
    for size in (1, 100, 70_000):
        pickled = bytes(range(256)) * (size // 256) + b"." * (size % 256)
        for flags in (0, 1, 255):
            assert _encoder._frame_c(pickled, flags) == _encoder._frame_py(pickled, flags)
    with pytest.raises(ValueError):
        _encoder._frame_c(b".", 256)


@pytest.mark.parametrize("trusted", [False, True])
def test_large_loads_pause_the_gc_and_restore_its_state(trusted: bool, monkeypatch) -> None:
    """Pickle parts from 1 MiB up are unpickled with the cyclic GC paused: the collections an
    unpickler triggers free nothing. Whatever happens, the GC ends as it was."""
    import gc

    from streampickle import _safe

    seen = []
    real_loads = pickle.loads
    monkeypatch.setattr(_safe.pickle, "loads", lambda *a, **k: (seen.append(gc.isenabled()), real_loads(*a, **k))[1])
    big = [(i, str(i)) for i in range(200_000)]  # about 2.4 MB of pickle
    message = streampickle.dumps(big)
    assert gc.isenabled()
    assert streampickle.loads(message, trusted=trusted) == big
    assert streampickle.loads(streampickle.dumps(big[:10]), trusted=trusted) == big[:10]
    # paused for the large one only (the small one may not reach pickle.loads in _safe: C path)
    assert seen[0] is False and all(seen[1:]) and gc.isenabled()
    gc.disable()
    try:
        assert streampickle.loads(message, trusted=trusted) == big
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()
    broken = message[:-1] + b"\x00"  # no STOP at the end: the load raises
    with pytest.raises(streampickle.MalformedPickleError):
        streampickle.loads(broken, trusted=trusted)
    assert gc.isenabled()


def _identity_shape(obj: Any) -> list[Any]:
    """obj's values in depth-first order, with each str, bytes and container numbered by its
    first appearance: two graphs have the same shape only if they share the same objects."""
    seen: dict[int, int] = {}
    shape: list[Any] = []

    def walk(o: Any) -> None:
        if isinstance(o, (list, dict)) or (isinstance(o, tuple) and o) or (isinstance(o, (str, bytes)) and len(o) > 1):
            if id(o) in seen:
                shape.append(("again", seen[id(o)]))
                return
            seen[id(o)] = len(seen)
        if isinstance(o, (list, tuple)):
            shape.append((type(o).__name__, len(o)))
            for item in o:
                walk(item)
        elif isinstance(o, dict):
            shape.append(("dict", len(o)))
            for k, v in o.items():
                walk(k)
                walk(v)
        else:
            shape.append(o)

    walk(obj)
    return shape


@pytest.mark.parametrize("seed", range(40))
def test_sharing_and_identity_survive_with_or_without_the_memo(seed: int) -> None:
    """The encoder drops the pickler's memo for graphs where no object can appear twice; a
    graph with any sharing must come back with the same sharing."""

    rng = random.Random(seed)
    sharing = seed % 2 == 1
    pool: list[Any] = []  # what later nodes may share (a reference here would count too)

    def build(depth: int) -> Any:
        roll = rng.random()
        if pool and roll < 0.15:
            return rng.choice(pool)
        if depth > 3 or roll < 0.4:
            made = rng.choice([lambda: str(rng.random()), lambda: rng.random(), lambda: rng.randrange(10**30),
                               lambda: bytes(rng.randrange(256) for _ in range(5)), lambda: None, lambda: "a"])()
        elif roll < 0.6:
            made = tuple(build(depth + 1) for _ in range(rng.randrange(4)))
        elif roll < 0.8:
            made = {str(rng.random()): build(depth + 1) for _ in range(rng.randrange(4))}
        else:
            made = [build(depth + 1) for _ in range(rng.randrange(5))]
        if sharing:
            pool.append(made)
        return made

    obj = [build(0) for _ in range(30)]
    pool.clear()
    # before _identity_shape, whose list refers to the values; without the C extension the
    # memo is always on, and the sharing must survive all the same
    memo_free = speedups.unshared(obj) if speedups else None
    shape = _identity_shape(obj)
    shares = any(isinstance(x, tuple) and x[0] == "again" for x in shape)
    assert shares == sharing  # every odd seed does share something
    if speedups:
        assert memo_free == (not shares)
    out = streampickle.loads(streampickle.dumps(obj))
    assert out == obj and _identity_shape(out) == shape
