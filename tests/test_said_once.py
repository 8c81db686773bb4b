"""Each rule said once: the wire layout in ``_wire``, one decision for "a whole message here",
``loads`` as the decoder's one-buffer path, and the options validated in one place.

The parity tests run every input of a bad-input corpus through ``loads`` and through an
incremental decoder (fed whole and byte by byte), with the C fast paths and without them,
and require the same error class from all of them.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np
import pytest

import streampickle
from streampickle import (
    AuthenticationError,
    Decoder,
    ForbiddenGlobalError,
    IncompleteMessageError,
    LimitExceededError,
    Limits,
    MalformedPickleError,
    ProtocolError,
    UsageError,
    _decoder,
    _wire,
)
from streampickle._options import Options, options_for

KEY = b"parity key"
PACKAGE = pathlib.Path(streampickle.__file__).parent


def message(pickled: bytes, *, flags: int = 0, chunks: list[bytes] = (), version: int = 1) -> bytes:  # type: ignore[assignment]
    head = _wire.pack_header(flags, len(chunks), len(pickled), version)
    return head + _wire.pack_lengths([len(c) for c in chunks]) + pickled + b"".join(chunks)


GOOD = streampickle.dumps({"id": 1, "vals": [1.0, 2.0]})
GOOD_ARRAY = streampickle.dumps(np.arange(4, dtype=np.int32))
GOOD_KEYED = streampickle.dumps({"id": 1}, key=KEY)

#: (name, bytes, options, the error every path must raise)
CORPUS: list[tuple[str, bytes, dict[str, Any], type[Exception]]] = [
    ("empty", b"", {}, IncompleteMessageError),
    ("http", b"GET / HTTP/1.1\r\n\r\n" + bytes(20), {}, ProtocolError),
    ("tls", b"\x16\x03\x01\x02\x00" + bytes(30), {}, ProtocolError),
    ("bare pickle", b"\x80\x05N." + bytes(30), {}, ProtocolError),
    ("version 0", _wire.pack_header(0, 0, 3, 0) + b"\x80\x05N", {}, ProtocolError),
    ("version 3", _wire.pack_header(0, 0, 3, 3) + b"\x80\x05N", {}, ProtocolError),
    ("unknown flag", _wire.pack_header(0x80, 0, 3) + b"\x80\x05N", {}, ProtocolError),
    ("reserved", GOOD[:6] + b"\x01\x00" + GOOD[8:], {}, ProtocolError),
    ("empty pickle", _wire.pack_header(0, 0, 0), {}, ProtocolError),
    ("short header", GOOD[:11], {}, IncompleteMessageError),
    ("short pickle", GOOD[:-1], {}, IncompleteMessageError),
    ("short chunk", GOOD_ARRAY[:-1], {}, IncompleteMessageError),
    ("short table", GOOD_ARRAY[:24], {}, IncompleteMessageError),
    ("trailing garbage", GOOD + b"\x00", {}, ProtocolError),
    ("pickle over its limit", GOOD, {"limits": Limits(max_pickle_size=5)}, LimitExceededError),
    ("message over its limit", GOOD, {"limits": Limits(max_message_size=25)}, LimitExceededError),
    ("chunks over their limit", GOOD_ARRAY, {"limits": Limits(max_side_chunks=0)}, LimitExceededError),
    ("chunks summing over the limit", GOOD_ARRAY, {"limits": Limits(max_message_size=len(GOOD_ARRAY) - 1)},
     LimitExceededError),
    ("huge claim", _wire.pack_header(0, 0, 2**63) + b"\x80", {}, LimitExceededError),
    ("tag without a key", message(b"\x80\x05N.", flags=_wire.FLAG_MAC) + bytes(32), {}, AuthenticationError),
    ("no tag with a key", GOOD, {"key": KEY}, AuthenticationError),
    ("keyed, other key", GOOD_KEYED, {"key": b"another key"}, AuthenticationError),
    ("keyed, body altered", GOOD_KEYED[:-40] + bytes([GOOD_KEYED[-40] ^ 1]) + GOOD_KEYED[-39:], {"key": KEY},
     AuthenticationError),
    ("keyed, cut", GOOD_KEYED[:-1], {"key": KEY}, IncompleteMessageError),
    ("no STOP", message(b"\x80\x05N"), {}, MalformedPickleError),
    ("bytes after STOP", message(b"\x80\x05N.N"), {}, MalformedPickleError),
    ("unknown opcode", message(b"\x80\x05\xff."), {}, MalformedPickleError),
    ("forbidden global", message(b"\x80\x05\x8c\x02os\x8c\x06system\x93."), {}, ForbiddenGlobalError),
    ("unused side chunk", message(b"\x80\x05N.", chunks=[b"xy"]), {}, MalformedPickleError),
    ("trusted, no STOP", message(b"\x80\x05N"), {"trusted": True}, MalformedPickleError),
]


def _first_error(call: Any) -> type[Exception] | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - which class is what the test compares
        return type(exc)
    return None


def _incremental(data: bytes, options: dict[str, Any], bytewise: bool) -> None:
    decoder = Decoder(stream=False, **options)
    for piece in ([data[i : i + 1] for i in range(len(data))] if bytewise else [data]):
        decoder.feed(piece)
    decoder.feed_eof()
    if not decoder.pending:  # loads() takes exactly one message
        raise IncompleteMessageError("no message", received=0, expected=_wire.HEADER_SIZE)
    if decoder.pending > 1:
        raise ProtocolError("more than one message")
    next(decoder)


@pytest.fixture(params=["c", "python"])
def fast_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(_decoder, "_load_plain", None)
        monkeypatch.setattr(_decoder, "_take_plain", None)
    elif _decoder._load_plain is None:
        pytest.skip("the C extension is not in use")
    return str(request.param)


@pytest.mark.parametrize(("name", "data", "options", "error"), CORPUS, ids=[c[0] for c in CORPUS])
def test_loads_and_the_incremental_decoder_raise_the_same_error(
    name: str, data: bytes, options: dict[str, Any], error: type[Exception], fast_paths: str
) -> None:
    got = {
        "loads": _first_error(lambda: streampickle.loads(data, **options)),
        "loads(bytearray)": _first_error(lambda: streampickle.loads(bytearray(data), **options)),
        "decoder": _first_error(lambda: _incremental(data, options, bytewise=False)),
        "decoder, byte by byte": _first_error(lambda: _incremental(data, options, bytewise=True)),
    }
    assert got == dict.fromkeys(got, error)


@pytest.mark.parametrize(
    "data", [GOOD, GOOD_ARRAY, streampickle.dumps(np.float32(1.5))], ids=["plain", "array", "global"]
)
def test_loads_gives_what_the_incremental_decoder_gives(data: bytes, fast_paths: str) -> None:
    decoder = Decoder(stream=False)
    decoder.feed(data)
    decoder.feed_eof()
    expected = next(decoder)
    got = streampickle.loads(data)
    assert type(got) is type(expected)
    assert repr(got) == repr(expected)


def test_dumps_is_the_encoders_output_joined() -> None:
    for obj in [{"id": 1}, np.arange(10), b"x" * 100_000, list(range(30_000))]:
        assert streampickle.dumps(obj) == b"".join(streampickle.Encoder(stream=False).encode(obj))


def test_the_plain_prefix_is_the_start_of_what_dumps_makes() -> None:
    assert streampickle.dumps(None)[: _wire.PICKLE_LENGTH_OFFSET] == _wire.PLAIN_PREFIX
    header = _wire.parse_header(_wire.pack_header(_wire.FLAG_MAC, 2, 7))
    raw = _wire.pack_header(_wire.FLAG_MAC, 2, 7)
    assert raw[_wire.FLAGS_OFFSET] == header.flags == _wire.FLAG_MAC
    assert int.from_bytes(raw[_wire.PICKLE_LENGTH_OFFSET :], "little") == header.pickle_length == 7


def test_the_header_layout_is_written_down_only_in_wire() -> None:
    """No other module packs or unpacks a header with its own format or offsets, and the C
    extension has no layout literal: it reads _wire's constants when it is imported."""
    for path in PACKAGE.glob("*.py"):
        if path.name == "_wire.py":
            continue
        text = path.read_text()
        for needle in ("<4sBBHIQ", r"b\"\x93SPK\"", "unpack_header", "HEADER_STRUCT"):
            assert needle not in text, f"{path.name} has {needle}"
    source = (PACKAGE / "_speedups.c").read_text()
    assert not re.search(r"#define\s+HEADER_SIZE", source)
    assert "0x93, 'S'" not in source
    assert not re.search(r"buf \+ (pos \+ )?12\b|out\[5\]|out\[12", source)


# -- options -----------------------------------------------------------------------------------


def test_default_options_are_cached_and_immutable() -> None:
    assert options_for() is options_for(False, (), None, None)
    assert options_for(True) is options_for(trusted=True)
    assert options_for().plain and options_for(True).plain
    with pytest.raises(AttributeError):
        options_for().trusted = True  # type: ignore[misc]
    assert not options_for(key=KEY).plain and not options_for(allow=["decimal.Decimal"]).plain
    assert Options(limits=Limits()).plain and not Options(limits=Limits(max_pickle_size=10)).plain


def test_the_last_key_given_alone_is_prepared_once_unless_it_can_change() -> None:
    key = b"a key object used for every call"
    assert options_for(key=key) is options_for(key=key)
    assert options_for(key=key).key == streampickle.Key(key)
    mutable = bytearray(key)  # may change between calls: prepared each time
    first = options_for(key=mutable)
    mutable[0] ^= 1
    assert options_for(key=mutable).key != first.key
    assert options_for(trusted=True, key=key) is not options_for(trusted=True, key=key)


@pytest.mark.parametrize(
    "options",
    [{"trusted": 1}, {"trusted": None}, {"allow": 5}, {"allow": "decimal.Decimal"}, {"key": 5}, {"key": "secret"},
     {"limits": 5}, {"limits": Limits}],
    ids=["trusted=1", "trusted=None", "allow=5", "allow=str", "key=5", "key=str", "limits=5", "limits=class"],
)
def test_a_bad_option_is_a_usage_error_everywhere(options: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        Options(**options)
    with pytest.raises(UsageError):
        Decoder(**options)
    with pytest.raises(UsageError):
        streampickle.loads(GOOD, **options)


def test_options_and_keywords_are_one_or_the_other() -> None:
    options = Options(allow=["decimal.Decimal"])
    with pytest.raises(UsageError):
        Decoder(options=options, trusted=True)
    with pytest.raises(UsageError):
        Decoder(options={"trusted": True})  # type: ignore[arg-type]
    decoder = Decoder(options=options)
    decoder.feed(streampickle.dumps(__import__("decimal").Decimal("1.5")))
    assert str(next(decoder)) == "1.5"


def test_an_allowlist_given_as_a_generator_is_read_once() -> None:
    import decimal

    options = Options(allow=(name for name in ["decimal.Decimal"]))
    assert options.allow == ("decimal.Decimal",)
    assert streampickle.loads(streampickle.dumps(decimal.Decimal("2")), allow=(n for n in ["decimal.Decimal"])) == 2
