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
POLY1305_KEY = Key(KEY, mac="poly1305")
# the same tests for every MAC: bytes mean HMAC-SHA256
EVERY_MAC = pytest.mark.parametrize("key", [KEY, BLAKE3_KEY, POLY1305_KEY], ids=["hmac-sha256", "blake3", "poly1305"])
FLAGS = {KEY: 0x01, BLAKE3_KEY: 0x03, POLY1305_KEY: 0x05}  # the MAC flag, and the MAC's own bit


def message(key: bytes | Key = KEY) -> bytes:
    return streampickle.dumps({"a": np.arange(4, dtype=np.uint8), "s": "hi"}, key=key)


@EVERY_MAC
def test_keyed_roundtrip_and_tag_position(key: bytes | Key) -> None:
    data = message(key)
    assert data[5] == FLAGS[key]
    out = streampickle.loads(data, key=key)
    assert out["s"] == "hi" and out["a"].tolist() == [0, 1, 2, 3]


@EVERY_MAC
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


@EVERY_MAC
def test_swapped_side_chunks_are_detected(key: bytes | Key) -> None:
    a = streampickle.Encoder(key=key).encode([np.zeros(4, np.uint8), np.ones(4, np.uint8)])
    head, c1, c2, tag = a
    with pytest.raises(AuthenticationError):
        streampickle.loads(b"".join([head, c2, c1, tag]), key=key)
    assert streampickle.loads(b"".join(a), key=key)[1].tolist() == [1] * 4


def test_each_mac_refuses_the_others() -> None:
    """The MAC is chosen on both ends: a tag of another kind is refused, whatever the
    secret, so a peer can't downgrade the MAC, and the error names both."""
    names = {KEY: "an HMAC-SHA256", BLAKE3_KEY: "a blake3", POLY1305_KEY: "a poly1305"}
    for sender, got in names.items():
        for receiver, want in names.items():
            if sender is not receiver:
                expected = f"carries {got} tag but this decoder's key expects {want} tag"
                with pytest.raises(AuthenticationError, match=expected):
                    streampickle.loads(message(sender), key=receiver)
        with pytest.raises(AuthenticationError, match=f"carries {got} tag but this decoder has no key"):
            streampickle.loads(message(sender))
        with pytest.raises(AuthenticationError, match="carries no tag"):
            streampickle.loads(streampickle.dumps("x"), key=sender)
    # the same refusals on the incremental path, fed one byte at a time
    decoder = Decoder(key=KEY)
    with pytest.raises(AuthenticationError, match="blake3"):
        for i, byte in enumerate(message(BLAKE3_KEY)):  # noqa: B007 - i is read after the loop
            decoder.feed(bytes([byte]))
    assert i == 19  # refused with the header's last byte, before any table or pickle byte


@pytest.mark.parametrize("flags", [0x02, 0x04, 0x06, 0x07])
def test_a_mac_bit_without_a_tag_or_two_mac_bits_are_protocol_errors(flags: int) -> None:
    data = bytearray(streampickle.dumps("x", key=POLY1305_KEY if flags & 1 else None))
    data[5] = flags
    match = "names two MACs" if flags & 0x06 == 0x06 else "names a MAC but carries no tag"
    with pytest.raises(ProtocolError, match=match):
        streampickle.loads(bytes(data), key=POLY1305_KEY if flags & 1 else None)


@pytest.mark.parametrize("key", [BLAKE3_KEY, POLY1305_KEY], ids=["blake3", "poly1305"])
def test_large_message_verified_incrementally(key: Key) -> None:
    """A large keyed message: streamed MAC on the sending side, hashed piece by piece on the
    receiving side, fed in uneven pieces; one flipped byte deep inside is caught."""
    arr = np.random.default_rng(3).random(3_000_000)  # 24 MB
    chunks, mac = streampickle.Encoder(key=key, stream=False).encode_unsigned({"arr": arr})
    assert mac is not None
    for chunk in chunks:
        mac.update(chunk)
    data = b"".join(chunks) + mac.digest()
    one_shot = streampickle.dumps({"arr": arr}, key=key)
    if key.mac == "poly1305":  # a fresh nonce per message: only the tags differ
        header_tag = slice(44, 76)  # 36 bytes of header and stream fields, 8 of length table
        assert data[:44] == one_shot[:44] and data[76:-32] == one_shot[76:-32]
        assert data[header_tag] != one_shot[header_tag] and data[-32:] != one_shot[-32:]
    else:
        assert data == one_shot
    for corrupt in (False, True):
        wire = bytearray(data)
        if corrupt:
            wire[len(wire) // 2] ^= 0x10
        decoder = Decoder(key=key, stream=False)
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
    poly = Key(b"secret", mac="poly1305")
    assert poly.mac == "poly1305" and poly == Key(b"secret", mac="poly1305") != key
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
    with pytest.raises(UsageError, match=r"bytes or a streampickle\.Key"):
        streampickle.Encoder(key="secret")  # type: ignore[arg-type]


@pytest.mark.parametrize("mac, module", [("blake3", "blake3"), ("poly1305", "cryptography.hazmat.primitives.poly1305")])
def test_a_missing_mac_package_says_what_to_install(monkeypatch, mac: str, module: str) -> None:
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(UsageError, match=rf"pip install 'streampickle\[{mac}\]'"):
        Key(b"secret", mac=mac)  # type: ignore[arg-type]
    assert Key(b"secret").mac == "hmac-sha256"  # the default needs nothing


def test_poly1305_without_openssl_support_says_what_to_use(monkeypatch) -> None:
    """An OpenSSL without Poly1305 (a FIPS build) fails at Key(), not at the first message."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import poly1305

    def unsupported(key: bytes) -> None:
        raise UnsupportedAlgorithm("poly1305 is not supported by this backend")

    monkeypatch.setattr(poly1305, "Poly1305", unsupported)
    with pytest.raises(UsageError, match="has no Poly1305; use mac='blake3'"):
        Key(b"secret", mac="poly1305")


def test_poly1305_tags_carry_a_fresh_nonce_and_the_nonce_is_authenticated() -> None:
    """Poly1305's pad comes from a random nonce sent at the start of the tag: no two messages
    share one (a repeated pad would let an observer solve for r), and a tag moved onto another
    message, or a nonce swapped between two valid tags, fails."""
    data = [streampickle.dumps("same", key=POLY1305_KEY) for _ in range(200)]
    assert len({d[-32:-16] for d in data}) == 200
    assert all(streampickle.loads(d, key=POLY1305_KEY) == "same" for d in data)
    a, b = data[0], data[1]
    for forged in (a[:-16] + b[-16:], a[:-32] + b[-32:-16] + a[-16:]):
        with pytest.raises(AuthenticationError, match="mismatch"):
            streampickle.loads(forged, key=POLY1305_KEY)
    other = streampickle.dumps("diff", key=POLY1305_KEY)
    with pytest.raises(AuthenticationError, match="mismatch"):
        streampickle.loads(other[:-32] + a[-32:], key=POLY1305_KEY)
