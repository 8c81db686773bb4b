"""Golden wire vectors: a change to the wire format must show up here as a deliberate diff.

The listing beside each vector is the spec's worked example (docs/wire-format.md)."""

from __future__ import annotations

import numpy as np

import streampickle

# {"x": np.arange(3, dtype="<i2")}
#
# 93 53 50 4b                      magic
# 01                               version 1
# 00                               flags: no tag
# 00 00                            reserved
# 01 00 00 00                      1 side chunk
# 49 00 00 00 00 00 00 00          pickle: 73 bytes
# 06 00 00 00 00 00 00 00          side chunk 0: 6 bytes
# 80 05 95 3e 00 00 00 00 00 00 00 PROTO 5, FRAME 62
# 7d 94                            EMPTY_DICT, MEMOIZE
# 8c 01 78 94                      'x'
# 8c 15 73 74 ... 64 94            'streampickle._rebuild'
# 8c 07 6e 64 61 72 72 61 79 94    'ndarray'
# 93 94                            STACK_GLOBAL, MEMOIZE
# 28 8c 03 3c 69 32 94             MARK '<i2'
# 5d 94 4b 03 61                   [3]
# 89                               False (C order)
# 97                               NEXT_BUFFER
# 74 94 52 94 73 2e                TUPLE, REDUCE, SETITEM, STOP
# 00 00 01 00 02 00                side chunk 0: int16 0, 1, 2
VECTOR = bytes.fromhex(
    "9353504b010000000100000049000000000000000600000000000000"
    "8005953e000000000000007d948c0178948c1573747265616d7069636b6c652e5f72656275696c64"
    "948c076e646172726179949394288c033c6932945d944b0361899774945294732e"
    "000001000200"
)
# The same message with key=b"k": flags bit 0 set, and an HMAC-SHA256 over every byte before it.
TAG = bytes.fromhex("264e564cc6d82d6681bc85dd0ed1263c8d3197dd09709412d002fd4939315e8c")
# With Key(b"k", mac="blake3"): flags 0x03, and keyed BLAKE3 under the key that BLAKE3's
# derive_key mode makes from b"k" with the spec's context string.
BLAKE3_KEY = bytes.fromhex("caaf5cd4cd2c2490d03be4e2e15ad667441324ad78fec904025aaefba4370027")
BLAKE3_TAG = bytes.fromhex("0b1c746f80298f6f942f722afde6b7e7e90483e322a862d22b82b12a1b3d0bda")
# With Key(b"k", mac="poly1305"): flags 0x05; r and the pad key are derived from b"k" with
# HMAC-SHA256 and the spec's context strings; with the nonce 00 01 .. 0f the pad is S, and the
# tag is the nonce followed by Poly1305 under r || S.
POLY1305_R = bytes.fromhex("39fb0fbe2530f99d94a285224d758312")
POLY1305_PAD_KEY = bytes.fromhex("4da0d58f8830192aa1d46a88275b8a1631c5ba4b4a91e16b9412de86c29da29e")
POLY1305_NONCE = bytes(range(16))
POLY1305_S = bytes.fromhex("5f0ee0a4da70e5b8fb782b5947cfc18a")
POLY1305_TAG = POLY1305_NONCE + bytes.fromhex("6df850e9064e15e4c38aafce575c0715")


def obj():
    return {"x": np.arange(3, dtype="<i2")}


def test_encoder_writes_the_golden_vector() -> None:
    assert streampickle.dumps(obj()) == VECTOR


def test_decoder_reads_the_golden_vector() -> None:
    out = streampickle.loads(VECTOR)
    assert list(out) == ["x"] and out["x"].dtype == np.dtype("<i2") and out["x"].tolist() == [0, 1, 2]


def test_keyed_golden_vector() -> None:
    keyed = VECTOR[:5] + b"\x01" + VECTOR[6:] + TAG
    assert streampickle.dumps(obj(), key=b"k") == keyed
    assert streampickle.loads(keyed, key=b"k")["x"].tolist() == [0, 1, 2]


def test_blake3_golden_vector() -> None:
    from blake3 import blake3  # the test extra installs it: this test never skips
    # the derivation as the spec words it, computed here without streampickle
    assert blake3(b"k", derive_key_context="streampickle 2026-11-27 message tag v1").digest() == BLAKE3_KEY
    unsigned = VECTOR[:5] + b"\x03" + VECTOR[6:]
    assert blake3(unsigned, key=BLAKE3_KEY).digest() == BLAKE3_TAG
    key = streampickle.Key(b"k", mac="blake3")
    assert streampickle.dumps(obj(), key=key) == unsigned + BLAKE3_TAG
    assert streampickle.loads(unsigned + BLAKE3_TAG, key=key)["x"].tolist() == [0, 1, 2]


def test_poly1305_golden_vector() -> None:
    import hmac

    # cryptography comes with the test extra (trustme needs it too): this test never skips
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    # the derivation as the spec words it, computed here without streampickle, and Poly1305
    # under the whole one-time key r || s (streampickle adds s to the bare polynomial instead)
    assert hmac.digest(b"k", b"streampickle 2026-11-28 poly1305 r", "sha256")[:16] == POLY1305_R
    assert hmac.digest(b"k", b"streampickle 2026-11-28 poly1305 pad", "sha256") == POLY1305_PAD_KEY
    assert hmac.digest(POLY1305_PAD_KEY, POLY1305_NONCE, "sha256")[:16] == POLY1305_S
    unsigned = VECTOR[:5] + b"\x05" + VECTOR[6:]
    assert POLY1305_NONCE + Poly1305.generate_tag(POLY1305_R + POLY1305_S, unsigned) == POLY1305_TAG
    key = streampickle.Key(b"k", mac="poly1305")
    assert streampickle.loads(unsigned + POLY1305_TAG, key=key)["x"].tolist() == [0, 1, 2]
    # the encoder's own tags (a random nonce each) check out against the independent computation
    signed = streampickle.dumps(obj(), key=key)
    assert signed[:-32] == unsigned
    nonce, tag = signed[-32:-16], signed[-16:]
    s = hmac.digest(POLY1305_PAD_KEY, nonce, "sha256")[:16]
    assert Poly1305.generate_tag(POLY1305_R + s, unsigned) == tag
