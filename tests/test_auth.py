"""key=: every byte of every message is authenticated before anything is unpickled."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import streampickle
from _util import make_message
from streampickle import AuthenticationError, Decoder, Key, ProtocolError, UsageError

KEY = b"sixteen byte key"
BLAKE3_KEY = Key(KEY, mac="blake3")
# the same tests for both MACs: bytes mean HMAC-SHA256
BOTH = pytest.mark.parametrize("key", [KEY, BLAKE3_KEY], ids=["hmac-sha256", "blake3"])


def message(key: bytes | Key = KEY) -> bytes:
    return streampickle.dumps({"a": np.arange(4, dtype=np.uint8), "s": "hi"}, key=key)


@BOTH
def test_keyed_roundtrip_and_tag_position(key: bytes | Key) -> None:
    data = message(key)
    assert data[5] == (1 if key == KEY else 3)  # the MAC flag, and the BLAKE3 bit
    out = streampickle.loads(data, key=key)
    assert out["s"] == "hi" and out["a"].tolist() == [0, 1, 2, 3]


@BOTH
def test_every_single_bit_flip_is_detected(key: bytes | Key) -> None:
    data = message(key)
    for i in range(len(data)):
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            with pytest.raises(streampickle.StreamPickleError) as info:
                streampickle.loads(bytes(flipped), key=key)
            # header bit flips may be caught earlier as framing errors; never an object
            assert not isinstance(info.value, streampickle.MalformedPickleError) or i < 20


def test_wrong_key_missing_key_and_unexpected_tag() -> None:
    with pytest.raises(AuthenticationError, match="mismatch"):
        streampickle.loads(message(), key=b"another key")
    with pytest.raises(AuthenticationError, match="no key"):
        streampickle.loads(message())  # tagged message, decoder without a key: loud
    with pytest.raises(AuthenticationError, match="carries no tag"):
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


@BOTH
def test_swapped_side_chunks_are_detected(key: bytes | Key) -> None:
    a = streampickle.Encoder(key=key).encode([np.zeros(4, np.uint8), np.ones(4, np.uint8)])
    head, c1, c2, tag = a
    with pytest.raises(AuthenticationError):
        streampickle.loads(b"".join([head, c2, c1, tag]), key=key)
    assert streampickle.loads(b"".join(a), key=key)[1].tolist() == [1] * 4


def test_each_mac_refuses_the_other() -> None:
    """The MAC is chosen on both ends: a tag of the other kind is refused, whatever the
    secret, so a peer can't downgrade the MAC, and the error names both."""
    with pytest.raises(AuthenticationError, match="carries a blake3 tag but this decoder's key expects an HMAC"):
        streampickle.loads(message(BLAKE3_KEY), key=KEY)
    with pytest.raises(AuthenticationError, match="carries an HMAC-SHA256 tag but this decoder's key expects a blake3"):
        streampickle.loads(message(KEY), key=BLAKE3_KEY)
    with pytest.raises(AuthenticationError, match="carries a blake3 tag but this decoder has no key"):
        streampickle.loads(message(BLAKE3_KEY))
    with pytest.raises(AuthenticationError, match="carries no tag"):
        streampickle.loads(streampickle.dumps("x"), key=BLAKE3_KEY)
    # the same refusals on the incremental path, fed one byte at a time
    decoder = Decoder(key=KEY)
    with pytest.raises(AuthenticationError, match="blake3"):
        for i, byte in enumerate(message(BLAKE3_KEY)):
            decoder.feed(bytes([byte]))
    assert i == 19  # refused with the header's last byte, before any table or pickle byte


def test_blake3_flag_without_a_tag_is_a_protocol_error() -> None:
    data = bytearray(streampickle.dumps("x"))
    data[5] = 0x02
    with pytest.raises(ProtocolError, match="names a MAC but carries no tag"):
        streampickle.loads(bytes(data))


def test_large_blake3_message_verified_incrementally() -> None:
    """A large keyed message: streamed MAC on the sending side, hashed piece by piece on the
    receiving side, fed in uneven pieces; one flipped byte deep inside is caught."""
    arr = np.random.default_rng(3).random(3_000_000)  # 24 MB
    chunks, mac = streampickle.Encoder(key=BLAKE3_KEY).encode_unsigned({"arr": arr})
    assert mac is not None
    for chunk in chunks:
        mac.update(chunk)
    data = b"".join(chunks) + mac.digest()
    assert data == streampickle.dumps({"arr": arr}, key=BLAKE3_KEY)
    for corrupt in (False, True):
        wire = bytearray(data)
        if corrupt:
            wire[len(wire) // 2] ^= 0x10
        decoder = Decoder(key=BLAKE3_KEY)
        view = memoryview(wire)
        try:
            for start in range(0, len(view), 1_000_003):
                decoder.feed(view[start : start + 1_000_003])
        except AuthenticationError:
            assert corrupt
            continue
        assert not corrupt and np.array_equal(next(decoder)["arr"], arr)


def test_key_object() -> None:
    key = Key(b"secret", mac="blake3")
    assert key.mac == "blake3" and Key(b"secret").mac == "hmac-sha256"
    assert "secret" not in repr(key) and "blake3" in repr(key)
    assert key == Key(bytearray(b"secret"), mac="blake3") != Key(b"secret")
    assert len({key, Key(b"secret", mac="blake3")}) == 1
    with pytest.raises(AttributeError):
        key._secret = b"other"  # type: ignore[misc]
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(key, protocol=5)
    with pytest.raises(streampickle.EncodeError, match="not picklable"):
        streampickle.dumps(key)
    with pytest.raises(UsageError, match="mac must be"):
        Key(b"secret", mac="md5")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="must not be empty"):
        Key(b"", mac="blake3")
    with pytest.raises(UsageError, match="bytes or a streampickle.Key"):
        streampickle.Encoder(key="secret")  # type: ignore[arg-type]


def test_blake3_missing_says_what_to_install(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "blake3", None)  # makes `import blake3` fail
    with pytest.raises(UsageError, match=r"pip install 'streampickle\[blake3\]'"):
        Key(b"secret", mac="blake3")
    assert Key(b"secret").mac == "hmac-sha256"  # the default needs nothing
