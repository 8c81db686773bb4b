"""The encoder: chunks are views of the original memory, and failures write nothing."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

import streampickle
from streampickle import EncodeError, Encoder


def test_side_chunks_are_views_of_the_original_memory() -> None:
    arrays = [np.arange(1 << 20, dtype=np.float64), np.asfortranarray(np.ones((300, 200), np.int32))]
    raw = bytearray(b"x" * 100_000)
    chunks = Encoder().encode({"arrays": arrays, "raw": pickle.PickleBuffer(raw)})
    oob = [c for c in chunks if isinstance(c, memoryview)]
    assert len(oob) == 3
    for arr, chunk in zip(arrays, oob):
        assert np.shares_memory(np.frombuffer(chunk, np.uint8), arr)
    assert np.shares_memory(np.frombuffer(oob[2], np.uint8), np.frombuffer(raw, np.uint8))


def test_chunks_stay_valid_after_the_objects_are_dropped() -> None:
    chunks = Encoder().encode(np.full(1000, 7, dtype=np.int64))  # no other reference to the array
    out = streampickle.loads(b"".join(chunks))
    assert (out == 7).all()


def test_small_message_is_one_chunk() -> None:
    chunks = Encoder().encode({"id": 1, "name": "x", "vals": [1.0, 2.0, 3.0]})
    assert len(chunks) == 1 and isinstance(chunks[0], bytes)
    chunks = Encoder(key=b"k").encode({"id": 1})
    assert len(chunks) == 1


def test_large_pickle_part_is_not_joined_with_the_header() -> None:
    obj = [str(i) for i in range(20_000)]
    chunks = Encoder().encode(obj)
    assert len(chunks[0]) == 20 and b"".join(chunks[1:]) == pickle.dumps(obj, protocol=5)


def test_a_large_inband_bytes_payload_is_passed_on_uncopied() -> None:
    """The pickler writes a large bytes payload straight to its file; the encoder hands that
    very object on as a chunk, so a big bytes value is never copied on the way out."""
    payload = bytes(1 << 20)
    chunks = Encoder().encode({"blob": payload})
    assert any(chunk is payload for chunk in chunks)
    assert streampickle.loads(b"".join(chunks)) == {"blob": payload}


class Bomb:
    def __reduce__(self):
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    "obj",
    [
        [np.arange(10), Bomb()],  # an array already went to buffer_callback
        lambda: 0,
        threading.Lock(),
        (x for x in ()),
    ],
)
def test_pickling_failures_raise_before_any_chunk_exists(obj) -> None:
    encoder = Encoder()
    with pytest.raises(EncodeError) as info:
        encoder.encode(obj)
    assert isinstance(info.value, pickle.PicklingError)  # code written for pickle still works
    assert info.value.__cause__ is not None
    assert streampickle.loads(b"".join(encoder.encode("still usable"))) == "still usable"


def test_too_deep_graph_is_an_encode_error() -> None:
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(EncodeError):
        Encoder().encode(deep)


def test_noncontiguous_array_is_copied_once_and_keeps_readonly() -> None:
    base = np.arange(100, dtype=np.int32)
    view = base[::3]
    view.flags.writeable = False
    out = streampickle.loads(streampickle.dumps(view))
    assert out.tolist() == view.tolist() and not out.flags.writeable


def test_key_must_be_bytes() -> None:
    with pytest.raises(streampickle.UsageError):
        Encoder(key="text")  # type: ignore[arg-type]
    with pytest.raises(streampickle.UsageError):
        Encoder(key=b"")


def test_streamed_mac_gives_the_same_bytes_as_encode() -> None:
    """Transports MAC large keyed messages slice by slice as they send (encode_unsigned); the
    bytes on the wire must be exactly what encode() would have produced."""
    key = b"k" * 16
    obj = {"a": np.arange(300_000, dtype=np.float64), "b": [np.ones(5), "x"]}
    chunks, mac = Encoder(key=key).encode_unsigned(obj)
    assert mac is not None and len(chunks) > 1
    for chunk in chunks:
        mac.update(chunk)
    streamed = b"".join(chunks) + mac.digest()
    assert streamed == b"".join(Encoder(key=key).encode(obj))
    small, none = Encoder(key=key).encode_unsigned({"id": 1})
    assert none is None and small == Encoder(key=key).encode({"id": 1})


def test_a_large_object_graph_leaves_no_large_memo_behind() -> None:
    """The C pickler's memo table never shrinks and clear_memo() walks all of it: a reused
    encoder that once pickled a million objects made every later small message cost 7 ms.
    The encoder replaces a pickler whose memo grew."""
    encoder = Encoder()
    small = {"id": 1, "name": "x"}
    before = b"".join(encoder.encode(small))
    graph = [(i, float(i), str(i)) for i in range(200_000)]
    assert streampickle.loads(b"".join(encoder.encode(graph))) == graph
    assert encoder._pickler.__sizeof__() < 64 * 1024  # sizeof counts the memo table
    assert b"".join(encoder.encode(small)) == before


def test_a_large_inband_bytearray_is_copied_when_encoded() -> None:
    """The pickler hands large payloads to its file uncopied; the encoder must copy mutable
    ones, so that changing the bytearray after encode() doesn't change the message."""
    data = bytearray(b"a" * 200_000)
    chunks = Encoder().encode([data])
    data[:] = b"b" * 200_000
    assert streampickle.loads(b"".join(chunks)) == [bytearray(b"a" * 200_000)]
