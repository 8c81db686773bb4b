"""key=: every byte of every message is authenticated before anything is unpickled."""

from __future__ import annotations

import numpy as np
import pytest

import streampickle
from _util import make_message
from streampickle import AuthenticationError, Decoder

KEY = b"sixteen byte key"


def message() -> bytes:
    return streampickle.dumps({"a": np.arange(4, dtype=np.uint8), "s": "hi"}, key=KEY)


def test_keyed_roundtrip_and_tag_position() -> None:
    data = message()
    assert data[5] == 1  # the MAC flag
    out = streampickle.loads(data, key=KEY)
    assert out["s"] == "hi" and out["a"].tolist() == [0, 1, 2, 3]


def test_every_single_bit_flip_is_detected() -> None:
    data = message()
    for i in range(len(data)):
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            with pytest.raises(streampickle.StreamPickleError) as info:
                streampickle.loads(bytes(flipped), key=KEY)
            # header bit flips may be caught earlier as framing errors; never an object
            assert not isinstance(info.value, streampickle.MalformedPickleError) or i < 20


def test_wrong_key_missing_key_and_unexpected_tag() -> None:
    with pytest.raises(AuthenticationError, match="mismatch"):
        streampickle.loads(message(), key=b"another key")
    with pytest.raises(AuthenticationError, match="no key"):
        streampickle.loads(message())  # tagged message, decoder without a key: loud
    with pytest.raises(AuthenticationError, match="no HMAC tag"):
        streampickle.loads(streampickle.dumps("x"), key=KEY)


def test_nothing_is_unpickled_before_the_tag_verifies(monkeypatch) -> None:
    from streampickle import _safe

    calls = []
    real = _safe.Loader.load
    monkeypatch.setattr(_safe.Loader, "load", lambda self, *a: calls.append(a) or real(self, *a))
    evil = b"\x80\x05\x8c\x02os\x8c\x06system\x93."
    data = bytearray(make_message(evil, key=b"attacker key"))
    with pytest.raises(AuthenticationError):
        streampickle.loads(bytes(data), key=KEY)
    assert calls == []
    streampickle.loads(message(), key=KEY)  # control: the patched loader is on the path
    assert len(calls) == 1


def test_authentication_failure_poisons_the_decoder() -> None:
    decoder = Decoder(key=KEY)
    bad = bytearray(message())
    bad[-1] ^= 1
    with pytest.raises(AuthenticationError):
        decoder.feed(bytes(bad))
    with pytest.raises(AuthenticationError, match="failed earlier"):
        decoder.feed(message())


def test_swapped_side_chunks_are_detected() -> None:
    a = streampickle.Encoder(key=KEY).encode([np.zeros(4, np.uint8), np.ones(4, np.uint8)])
    head, c1, c2, tag = a
    with pytest.raises(AuthenticationError):
        streampickle.loads(b"".join([head, c2, c1, tag]), key=KEY)
    assert streampickle.loads(b"".join(a), key=KEY)[1].tolist() == [1] * 4
