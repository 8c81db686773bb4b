"""The encoder: chunks are views of the original memory, and failures write nothing."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

import streampickle
from streampickle import EncodeError, Encoder
from streampickle._accel import speedups

needs_c = pytest.mark.skipif(
    speedups is None, reason="the C extension is not in use (not built, or STREAMPICKLE_PURE_PYTHON=1): no C twin"
)


def test_side_chunks_are_views_of_the_original_memory() -> None:
    arrays = [np.arange(1 << 20, dtype=np.float64), np.asfortranarray(np.ones((300, 200), np.int32))]
    raw = bytearray(b"x" * 100_000)
    chunks = Encoder().encode({"arrays": arrays, "raw": pickle.PickleBuffer(raw)})
    oob = [c for c in chunks if isinstance(c, memoryview)]
    assert len(oob) == 3
    for arr, chunk in zip(arrays, oob[:2], strict=True):
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
    assert len(chunks[0]) == 20 and len(chunks) > 2 and pickle.loads(b"".join(chunks[1:])) == obj


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
    chunks, mac = Encoder(key=key, stream=False).encode_unsigned(obj)
    assert mac is not None and len(chunks) > 1
    for chunk in chunks:
        mac.update(chunk)
    streamed = b"".join(chunks) + mac.digest()
    assert streamed == b"".join(Encoder(key=key, stream=False).encode(obj))
    small, none = Encoder(key=key, stream=False).encode_unsigned({"id": 1})
    assert none is None and small == Encoder(key=key, stream=False).encode({"id": 1})


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


def _fresh(text: str) -> str:
    return "".join(list(text))  # a new str object, referenced only by the caller


@needs_c
def test_the_memo_is_skipped_only_where_no_object_can_appear_twice() -> None:
    """``unshared`` decides when the pickler may run without its memo (for a large graph the
    memo is most of pickling's cost): never where an object could appear twice or in a
    cycle, or where anything but plain data sits in the graph."""
    unshared = speedups.unshared

    shared_list = [1]
    shared_str = _fresh("shared")
    cyclic: list = []
    cyclic.append(cyclic)
    deep: list = []
    for _ in range(300):
        deep = [deep]

    yes = {
        "tuples": [(i, i * 0.5, str(i)) for i in range(100)],
        "fresh dict keys": {str(i) + "k": [float(i), None, True] for i in range(10)},
        "bytes": [bytes([i]) * 10 for i in range(10)],
        "shared atoms": [10**20, 10**20, 1.5, "", "a", b"", b"b", (), ()],
        "a root referenced from outside": shared_list,
    }
    no = {
        "a shared list": [shared_list, shared_list],
        "a shared str": [shared_str, shared_str],
        "a str referenced from outside the graph": [shared_str],
        "a cycle": cyclic,
        "literal dict keys (interned)": {"id": 1},
        "an array": [np.arange(3)],
        "an arbitrary object": [object()],
        "a set": [{1, 2}],
        "a list subclass": [type("L", (list,), {})()],
        "nesting deeper than 200": deep,
    }
    for name, obj in yes.items():
        assert unshared(obj), name
    for name, obj in no.items():
        assert not unshared(obj), name


@needs_c  # without it the memo is always on: the same objects, more slowly
def test_unshared_graphs_are_pickled_without_memo_and_the_pickler_is_reset() -> None:
    import pickletools

    encoder = Encoder()
    rows = [(i, i * 0.5, str(i)) for i in range(10_000)]
    pickled = b"".join(encoder.encode(rows)[1:])
    ops = {op.name for op, _, _ in pickletools.genops(pickled)}
    assert "MEMOIZE" not in ops and streampickle.loads(streampickle.dumps(rows)) == rows
    assert not encoder._pickler.fast  # back to normal for the next message
    # a shared object keeps its identity: the memo is on
    shared = [1, 2]
    out = streampickle.loads(b"".join(encoder.encode([shared, shared])))
    assert out[0] is out[1]


@needs_c
def test_a_failed_memo_less_dump_leaves_the_pickler_in_normal_mode() -> None:
    dump = speedups.dump

    class FailingPickler:
        fast = False
        seen_fast = None

        def dump(self, obj):
            FailingPickler.seen_fast = self.fast
            raise ValueError("boom")

    pickler = FailingPickler()
    with pytest.raises(ValueError, match="boom"):
        dump(pickler, [(1, 2.0, str(3))])
    assert FailingPickler.seen_fast is True and pickler.fast is False


@needs_c
def test_dump_small_in_c_matches_python() -> None:
    from streampickle import _encoder

    assert _encoder._dump_small_c is not None
    for obj in [{"id": 1, "vals": [1.0]}, [str(i) for i in range(2000)], np.arange(4), "x" * 5000]:
        results = []
        for dump_small in (_encoder._dump_small_c, _encoder._dump_small_py):
            enc = Encoder()
            framed = dump_small(enc._pickler, enc._out, enc._buffers, obj, _encoder._MEMO_CHECK_BYTES)
            results.append((framed, list(enc._out), len(enc._buffers)))
        assert results[0] == results[1]


def test_an_encoder_is_no_reference_cycle() -> None:
    """dumps(key=...) makes an encoder per call: it must be freed when dropped, not left for
    the cyclic GC (which made each one cost 5.6 us instead of 1.8)."""
    import gc
    import weakref

    was = gc.isenabled()
    gc.disable()
    try:
        encoder = Encoder(key=b"k")
        encoder.encode({"arrays": [np.arange(10)], "rows": [(1, "a")]})
        ref = weakref.ref(encoder)
        del encoder
        assert ref() is None
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("key", [None, b"k"], ids=["plain", "keyed"])
@pytest.mark.parametrize(
    "field, value, obj",
    [
        ("max_message_size", 1 << 16, np.ones(1 << 16, np.uint8)),
        ("max_pickle_size", 1000, "x" * 2000),
        ("max_side_chunks", 2, [np.ones(1), np.ones(2), np.ones(3)]),
    ],
)
def test_an_encoder_with_limits_refuses_what_a_decoder_with_them_would(key, field, value, obj) -> None:
    """Encoder(limits=...) refuses, before any chunk exists, exactly the messages a Decoder with
    the same limits refuses; a keyed stream encoder's refused message takes no sequence number."""
    limits = streampickle.Limits(**{field: value})
    encoder = Encoder(key=key, limits=limits)
    with pytest.raises(streampickle.EncodeError, match=f"Limits.{field}={value}"):
        encoder.encode(obj)
    with pytest.raises(streampickle.EncodeError, match=f"Limits.{field}={value}"):
        encoder.encode_unsigned(obj)
    with pytest.raises(streampickle.LimitExceededError):
        streampickle.Decoder(key=key, limits=limits).feed(b"".join(bytes(c) for c in Encoder(key=key).encode(obj)))
    decoder = streampickle.Decoder(key=key, limits=limits)
    decoder.feed(b"".join(bytes(c) for c in encoder.encode("small")))  # number 0: none was taken
    assert next(decoder) == "small"


# -- what pickle.dumps raises, still raised as that type ---------------------------------------


class CodeError(Exception):
    """An application's own error, with an ``__init__`` of its own and an attribute."""

    def __init__(self, code: int) -> None:
        super().__init__(f"failed with code {code}")
        self.code = code


class Raises:
    """Its ``__reduce__`` raises what it was given."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self):
        raise self.exc


class GrowsItsDict:
    """Adds a key to the dict being pickled, as pickletester's ``Bad`` does."""

    def __init__(self, owner: dict) -> None:
        self.owner = owner

    def __reduce__(self):
        self.owner[len(self.owner)] = None
        return int, ()


def _dict_growing_while_pickled() -> dict:
    owner: dict = {}
    owner["a"] = GrowsItsDict(owner)
    owner["b"] = 1
    return owner


def _too_deep() -> list:
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    return deep


UNPICKLABLE = {
    "staticmethod": lambda: staticmethod(len),  # TypeError
    "lock": threading.Lock,  # TypeError
    "generator": lambda: (x for x in ()),  # TypeError
    "lambda": lambda: (lambda: 0),  # pickle.PicklingError
    "runtime-error": lambda: Raises(RuntimeError("boom")),
    "dict-changed-size": _dict_growing_while_pickled,  # RuntimeError from the pickler itself
    "too-deep": _too_deep,  # RecursionError
    "attribute-error": lambda: Raises(AttributeError("no such attribute")),
    "key-error": lambda: Raises(KeyError("k")),
    "file-not-found": lambda: Raises(FileNotFoundError(2, "gone", "/nowhere")),
    "own-error-class": lambda: Raises(CodeError(7)),
}


def _what_pickle_raises(obj: object) -> Exception:
    try:
        pickle.dumps(obj, protocol=5)
    except Exception as exc:  # noqa: BLE001 - the exception is the result
        return exc
    raise AssertionError("pickle.dumps accepted it")


@pytest.mark.parametrize("make", UNPICKLABLE.values(), ids=UNPICKLABLE)
@pytest.mark.parametrize("how", ["dumps", "encode", "encode-keyed"])
def test_an_encode_error_is_also_what_pickle_raises(make, how) -> None:
    """``except TypeError`` (or RuntimeError, RecursionError, the application's own class...)
    around pickle.dumps keeps working around streampickle, and ``except EncodeError`` catches
    every encoding failure; the message names the object and the original is the cause."""
    expected = _what_pickle_raises(make())
    encode = {
        "dumps": streampickle.dumps,
        "encode": Encoder().encode,
        "encode-keyed": Encoder(key=b"k").encode,
    }[how]
    with pytest.raises(type(expected)) as info:
        encode(make())
    err = info.value
    assert isinstance(err, EncodeError) and isinstance(err, pickle.PicklingError)
    assert type(err.__cause__) is type(expected)
    assert err.args == (str(err),) and str(err).startswith("could not pickle ")
    assert str(expected)[:40] in str(err)


def test_an_encode_error_keeps_the_original_for_its_attributes() -> None:
    with pytest.raises(CodeError) as info:
        streampickle.dumps(Raises(CodeError(7)))
    assert info.value.__cause__.code == 7 and str(info.value) == "could not pickle Raises object: failed with code 7"
    with pytest.raises(OSError) as os_info:  # OSError's own C layout
        streampickle.dumps(Raises(FileNotFoundError(2, "gone")))
    assert isinstance(os_info.value, FileNotFoundError) and os_info.value.__cause__.errno == 2


def test_one_class_per_original_type() -> None:
    first = _encode_error_of(staticmethod(len))
    second = _encode_error_of(threading.Lock())
    assert type(first) is type(second) and type(first).__name__ == "EncodeError[TypeError]"
    assert repr(first) == f"EncodeError[TypeError]({str(first)!r})"
    # a PicklingError needs no new class: EncodeError is one
    assert type(_encode_error_of(Raises(pickle.PicklingError("no")))) is EncodeError


def test_an_encode_error_pickles_and_copies() -> None:
    import copy

    err = _encode_error_of(staticmethod(len))
    for again in (pickle.loads(pickle.dumps(err, protocol=5)), copy.copy(err)):
        assert type(again) is type(err) and str(again) == str(err)
        assert isinstance(again, TypeError) and isinstance(again, EncodeError)


class Final(Exception):
    """An exception type that refuses subclasses."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("Final can't be subclassed")


class PicklingFirst(pickle.PicklingError, streampickle.StreamPickleError):
    """Bases in the order EncodeError's clash with: no class can derive from both."""


class NeedsTwo(Exception):
    def __new__(cls, first: str, second: str) -> NeedsTwo:
        return super().__new__(cls, first, second)


@pytest.mark.parametrize(
    "cause",
    [Final("no"), PicklingFirst("clash"), NeedsTwo("a", "b"), ExceptionGroup("several", [ValueError("v")])],
    ids=["refuses-subclasses", "clashing-bases", "other-constructor", "exception-group"],
)
def test_a_type_that_cant_be_combined_gives_a_plain_encode_error(cause) -> None:
    with pytest.raises(EncodeError) as info:
        streampickle.dumps(Raises(cause))
    assert type(info.value) is EncodeError and info.value.__cause__ is cause
    assert str(info.value) == f"could not pickle Raises object: {cause}"


def test_a_base_exception_is_not_wrapped() -> None:
    with pytest.raises(KeyboardInterrupt):
        streampickle.dumps(Raises(KeyboardInterrupt()))


def _encode_error_of(obj: object) -> EncodeError:
    with pytest.raises(EncodeError) as info:
        streampickle.dumps(obj)
    return info.value
