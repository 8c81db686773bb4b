"""Golden wire vectors: a change to the wire format must show up here as a deliberate diff.

The listing beside each vector is the spec's worked example (docs/wire-format.md)."""

from __future__ import annotations

import hmac

import numpy as np
import pytest

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
# Version 1 with key=b"k", as streampickle wrote it before version 2 (flags bit 0 set, an
# HMAC-SHA256 over every byte before it appended): decoders still read it.
TAG = bytes.fromhex("264e564cc6d82d6681bc85dd0ed1263c8d3197dd09709412d002fd4939315e8c")

# Version 2, the same object with key=b"k" (HMAC-SHA256), as dumps() writes it: a message that
# stands alone (sender all zeros, sequence number 0).
#
# 93 53 50 4b 02 01 00 00          magic, version 2, flags: tag, reserved
# 01 00 00 00                      1 side chunk
# 49 00 00 00 00 00 00 00          pickle: 73 bytes
# 00 00 00 00 00 00 00 00          sender: none, the message stands alone
# 00 00 00 00 00 00 00 00          sequence number 0
# 06 00 00 00 00 00 00 00          side chunk 0: 6 bytes
# 77 92 ... f0 ae                  header tag: HMAC-SHA256 of the 44 bytes above
# 80 05 ... 73 2e                  the pickle, as in version 1
# 00 00 01 00 02 00                side chunk 0
# e2 6e ... 82 9f                  tag: HMAC-SHA256 of every byte before it
V2_HEADER = bytes.fromhex(
    "9353504b02010000010000004900000000000000" "0000000000000000" "0000000000000000"
    "0600000000000000"
)
V2_HEADER_TAG = bytes.fromhex("77927ffd383e8704a338e39f50b2d77b9abb48a15ea29ba8aa53ad264509f0ae")
V2_TAG = bytes.fromhex("e26e6701141760a46e5d005122452662c2bfee4c8744773fb2ee9991d72f829f")
PICKLE_AND_CHUNK = VECTOR[28:]  # version 1's pickle part and side chunk, unchanged
# The same object as message number 5 of a stream from sender 01 02 .. 08, and that stream's
# end (flags 0x09, no pickle, no side chunks: the header, the stream fields and a header tag).
STREAM_HEADER = bytes.fromhex(
    "9353504b02010000010000004900000000000000" "0102030405060708" "0500000000000000"
    "0600000000000000"
)
STREAM_HEADER_TAG = bytes.fromhex("9ab80851e10a3d67e29635119c014412232d33fe343712980dd19b7fb5d039bc")
STREAM_TAG = bytes.fromhex("0f8e9cbd91966ec47ad44ac0e8b7caec8fa628f87c0678e09133045b3e5e289d")
STREAM_END = bytes.fromhex(
    "9353504b02090000000000000000000000000000" "0102030405060708" "0600000000000000"
    "ed7f6ca7870699c5b950ca44700fbb07ee063d71b1595c6d331dc06a991bc9d9"
)
# With Key(b"k", mac="blake3"): flags 0x03, and keyed BLAKE3 under the key that BLAKE3's
# derive_key mode makes from b"k" with the spec's context string.
BLAKE3_KEY = bytes.fromhex("caaf5cd4cd2c2490d03be4e2e15ad667441324ad78fec904025aaefba4370027")
# With Key(b"k", mac="poly1305"): flags 0x05; r and the pad key are derived from b"k" with
# HMAC-SHA256 and the spec's context strings; with the nonce 00 01 .. 0f the pad is S, and a
# tag is the nonce followed by Poly1305 under r || S.
POLY1305_R = bytes.fromhex("39fb0fbe2530f99d94a285224d758312")
POLY1305_PAD_KEY = bytes.fromhex("4da0d58f8830192aa1d46a88275b8a1631c5ba4b4a91e16b9412de86c29da29e")
POLY1305_NONCE = bytes(range(16))
POLY1305_S = bytes.fromhex("5f0ee0a4da70e5b8fb782b5947cfc18a")


def _hmac(data: bytes) -> bytes:
    return hmac.digest(b"k", data, "sha256")


def obj():
    return {"x": np.arange(3, dtype="<i2")}


def test_encoder_writes_the_golden_vector() -> None:
    assert streampickle.dumps(obj()) == VECTOR


def test_decoder_reads_the_golden_vector() -> None:
    out = streampickle.loads(VECTOR)
    assert list(out) == ["x"] and out["x"].dtype == np.dtype("<i2") and out["x"].tolist() == [0, 1, 2]


def test_keyed_golden_vector() -> None:
    """dumps() with a key writes version 2, every tag as the spec computes it here."""
    assert _hmac(V2_HEADER) == V2_HEADER_TAG
    signed = V2_HEADER + V2_HEADER_TAG + PICKLE_AND_CHUNK
    assert _hmac(signed) == V2_TAG
    assert streampickle.dumps(obj(), key=b"k") == signed + V2_TAG
    assert streampickle.loads(signed + V2_TAG, key=b"k")["x"].tolist() == [0, 1, 2]


def test_version_1_keyed_messages_are_refused() -> None:
    # Version 1 tagged a keyed message only at its end: its header took memory before
    # anything was authenticated (a peer without the key streamed gigabytes into the side
    # chunks of a message it could never finish), and it had no sequence numbers.
    keyed = VECTOR[:5] + b"\x01" + VECTOR[6:]
    assert _hmac(keyed) == TAG  # authentic: refused for its version, not its tag
    with pytest.raises(streampickle.AuthenticationError, match="version 1"):
        streampickle.loads(keyed + TAG, key=b"k")
    decoder = streampickle.Decoder(key=b"k")
    with pytest.raises(streampickle.AuthenticationError, match="version 1"):
        decoder.feed(keyed[:20])  # at its header: before any memory for its sizes


def test_stream_golden_vectors() -> None:
    """Message number 5 of a stream and its end, computed here; a decoder that has read
    messages 0 to 4 of that stream takes them."""
    assert _hmac(STREAM_HEADER) == STREAM_HEADER_TAG
    signed = STREAM_HEADER + STREAM_HEADER_TAG + PICKLE_AND_CHUNK
    assert _hmac(signed) == STREAM_TAG
    assert _hmac(STREAM_END[:36]) == STREAM_END[36:]
    encoder = streampickle.Encoder(key=b"k")
    encoder._sender, encoder._sequence = bytes(range(1, 9)), 5
    assert b"".join(bytes(c) for c in encoder.encode(obj())) == signed + STREAM_TAG
    assert encoder.encode_end() == STREAM_END
    encoder._sequence = 0
    decoder = streampickle.Decoder(key=b"k")
    for i in range(5):
        decoder.feed(b"".join(bytes(c) for c in encoder.encode(i)))
    decoder.feed(signed + STREAM_TAG + STREAM_END)
    assert list(decoder)[-1]["x"].tolist() == [0, 1, 2] and decoder.ended
    decoder.feed_eof()


def test_blake3_golden_vector() -> None:
    from blake3 import blake3  # the test extra installs it: this test never skips
    # the derivation as the spec words it, computed here without streampickle
    assert blake3(b"k", derive_key_context="streampickle 2026-11-27 message tag v1").digest() == BLAKE3_KEY
    header = V2_HEADER[:5] + b"\x03" + V2_HEADER[6:]
    signed = header + blake3(header, key=BLAKE3_KEY).digest() + PICKLE_AND_CHUNK
    message = signed + blake3(signed, key=BLAKE3_KEY).digest()
    assert message[44:76].hex() == "93356a24ac50d6247f1ce7790b925ccfa5ba58ff3fd6da31c28bcd35efedc5db"
    assert message[-32:].hex() == "a155c2a474d63364b93d0a5bbf03c6e61a72bfdf777ce6ef9dd09735ed6d8228"
    key = streampickle.Key(b"k", mac="blake3")
    assert streampickle.dumps(obj(), key=key) == message
    assert streampickle.loads(message, key=key)["x"].tolist() == [0, 1, 2]


def test_poly1305_golden_vector() -> None:
    # cryptography comes with the test extra (trustme needs it too): this test never skips
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    # the derivation as the spec words it, computed here without streampickle, and Poly1305
    # under the whole one-time key r || s (streampickle adds s to the bare polynomial instead)
    assert hmac.digest(b"k", b"streampickle 2026-11-28 poly1305 r", "sha256")[:16] == POLY1305_R
    assert hmac.digest(b"k", b"streampickle 2026-11-28 poly1305 pad", "sha256") == POLY1305_PAD_KEY
    assert hmac.digest(POLY1305_PAD_KEY, POLY1305_NONCE, "sha256")[:16] == POLY1305_S

    def tag(data: bytes, nonce: bytes = POLY1305_NONCE) -> bytes:
        s = hmac.digest(POLY1305_PAD_KEY, nonce, "sha256")[:16]
        return nonce + Poly1305.generate_tag(POLY1305_R + s, data)

    header = V2_HEADER[:5] + b"\x05" + V2_HEADER[6:]
    signed = header + tag(header) + PICKLE_AND_CHUNK
    assert tag(header)[16:].hex() == "185eb60df999d5618c74fea757c9d3aa"  # the spec's listing
    assert tag(signed)[16:].hex() == "af8e9c726bc7ebec0c85c3fd378c0169"
    key = streampickle.Key(b"k", mac="poly1305")
    assert streampickle.loads(signed + tag(signed), key=key)["x"].tolist() == [0, 1, 2]
    # the encoder's own tags (a random nonce each) check out against the independent computation
    message = streampickle.dumps(obj(), key=key)
    assert message[:44] == header and message[76:-32] == PICKLE_AND_CHUNK
    assert message[44:76] == tag(header, message[44:60])
    assert message[-32:] == tag(message[:-32], message[-32:-16])


# The numpy vectors of the spec's "More examples": U item sizes in characters (4 bytes each),
# timedelta64 with the generic unit and with a multiplier, an object array's items in memory
# (column-major) order, and scalars' in-band data.
NUMPY_VECTORS = [
    (np.array(["ab", "c"]), bytes.fromhex(
        "9353504b01000000010000004200000000000000100000000000000080059537000000000000008c15737472"
        "65616d7069636b6c652e5f72656275696c64948c076e646172726179949394288c033c5532945d944b026189"
        "97749452942e61000000620000006300000000000000"
    )),
    (np.array([1, -2], dtype="<m8"), bytes.fromhex(
        "9353504b01000000010000004200000000000000100000000000000080059537000000000000008c15737472"
        "65616d7069636b6c652e5f72656275696c64948c076e646172726179949394288c033c6d38945d944b026189"
        "97749452942e0100000000000000feffffffffffffff"
    )),
    (np.array([3], dtype="<m8[25ms]"), bytes.fromhex(
        "9353504b0100000001000000480000000000000008000000000000008005953d000000000000008c15737472"
        "65616d7069636b6c652e5f72656275696c64948c076e646172726179949394288c093c6d385b32356d735d94"
        "5d944b01618997749452942e0300000000000000"
    )),
    (np.asfortranarray(np.array([[1, 2], [3, 4]], dtype=object)), bytes.fromhex(
        "9353504b0100000000000000520000000000000080059547000000000000008c1573747265616d7069636b6c"
        "652e5f72656275696c64948c0e6f626a6563745f6e646172726179949394285d94284b024b026588885d9428"
        "4b014b034b024b0465749452942e"
    )),
    (np.float32(1.5), bytes.fromhex(
        "9353504b0100000000000000400000000000000080059535000000000000008c1573747265616d7069636b6c"
        "652e5f72656275696c64948c067363616c61729493948c033c66349443040000c03f94869452942e"
    )),
    (np.str_("\u00e9"), bytes.fromhex(
        "9353504b0100000000000000400000000000000080059535000000000000008c1573747265616d7069636b6c"
        "652e5f72656275696c64948c067363616c61729493948c033c5531944304e900000094869452942e"
    )),
]


def test_numpy_golden_vectors() -> None:
    for value, vector in NUMPY_VECTORS:
        assert streampickle.dumps(value) == vector, value
        back = streampickle.loads(vector)
        assert type(back) is type(value) and back.dtype == value.dtype
        if isinstance(value, np.ndarray):
            assert back.shape == value.shape and back.tolist() == value.tolist()
            assert back.flags.f_contiguous == value.flags.f_contiguous
        else:
            assert back == value
    u = streampickle.loads(NUMPY_VECTORS[0][1])
    assert u.dtype.itemsize == 8 and u.nbytes == 16  # "<U2": 2 characters of 4 bytes
