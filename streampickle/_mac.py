"""Message authentication: a shared secret and the MAC that signs every message with it.

Three MACs, all 32-byte tags over every byte of the message before the tag
(docs/wire-format.md, *Tag*):

* ``hmac-sha256`` (the default; flag bit 0): the standard library's, about 1.5 GB/s per core
  with SHA extensions.
* ``blake3`` (flag bits 0 and 1): keyed BLAKE3, about 2.8-3.4 GB/s per core with AVX2, from
  the optional ``blake3`` package (``pip install 'streampickle[blake3]'``).
* ``poly1305`` (flag bits 0 and 2): Poly1305 under a per-secret ``r`` and a per-message pad
  drawn from a random nonce (the Poly1305-AES construction, with HMAC-SHA256 as the pad's
  PRF), about 6-7 GB/s per core, from the optional ``cryptography`` package
  (``pip install 'streampickle[poly1305]'``). About 10 us more per message on each end than
  HMAC-SHA256 (OpenSSL sets up a Poly1305 context per message): the MAC for large arrays.

Every byte is hashed on both ends, so for large arrays the MAC, not the socket, sets the
speed: BLAKE3 roughly halves what authentication costs, Poly1305 quarters it.

The choice travels with the key (``Key(secret, mac="blake3")``), and the decoder refuses a
tag of another kind: a peer can't downgrade the MAC, and a misconfiguration is loud.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING, Literal, NoReturn, Protocol, Self, TypeAlias

from . import _wire
from ._errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Callable

    from blake3 import blake3 as Blake3
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    # What the MACs hash and compare: the buffers the encoder and decoder hold.
    BytesLike: TypeAlias = bytes | bytearray | memoryview

__all__ = ["Key", "MacName", "as_key", "new_sender"]

MacName = Literal["hmac-sha256", "blake3", "poly1305"]

#: BLAKE3 ``derive_key`` context: turns a secret of any length into the 32-byte BLAKE3 key.
#: Part of the wire format; changing it changes every blake3 tag.
BLAKE3_CONTEXT = "streampickle 2026-11-27 message tag v1"

#: HMAC-SHA256 messages (under the secret) that derive Poly1305's two per-secret keys: ``r``
#: (the first 16 bytes of the first) and the pad key. Part of the wire format.
POLY1305_R_CONTEXT = b"streampickle 2026-11-28 poly1305 r"
POLY1305_PAD_CONTEXT = b"streampickle 2026-11-28 poly1305 pad"
NONCE_SIZE = 16  # a poly1305 tag is nonce || Poly1305 output
_MASK128 = (1 << 128) - 1


class Mac(Protocol):
    """One message's MAC state, from :meth:`Key.new`: fed piece by piece, then finished."""

    def update(self, data: BytesLike, /) -> object: ...

    def digest(self) -> bytes: ...


class _Template(Mac, Protocol):
    """A keyed hash that copies itself, so that keying is paid once: HMAC or BLAKE3."""

    def copy(self) -> Self: ...


class Key:
    """A shared secret for ``key=``, and which MAC signs with it.

    ``key=b"secret"`` means ``Key(b"secret")``: HMAC-SHA256. ``Key(secret, mac="blake3")``
    signs with keyed BLAKE3, about twice as fast; ``Key(secret, mac="poly1305")`` with
    Poly1305, about four times as fast on large arrays. Each needs its package (``blake3``,
    ``cryptography``) on both ends, and both ends must choose the same MAC. Immutable; share
    one between encoders and decoders.
    """

    __slots__ = ("_secret", "_mac", "_flags", "_blake3_key", "_template", "_poly1305")

    _secret: bytes
    _mac: MacName
    _flags: int
    _blake3_key: bytes | None
    _template: _Template | None
    _poly1305: tuple[type[Poly1305], bytes, hmac.HMAC] | None  # (class, r || 0^16, pad PRF template)

    def __init__(self, secret: bytes | bytearray | memoryview, *, mac: MacName = "hmac-sha256") -> None:
        if not isinstance(secret, (bytes, bytearray, memoryview)):
            raise UsageError(f"key must be bytes, not {type(secret).__name__}")
        secret = bytes(secret)
        if not secret:
            raise UsageError("key must not be empty")
        set_ = object.__setattr__
        set_(self, "_secret", secret)
        set_(self, "_mac", mac)
        set_(self, "_poly1305", None)
        if mac == "hmac-sha256":
            set_(self, "_flags", _wire.FLAG_MAC)
            set_(self, "_blake3_key", None)
            set_(self, "_template", None)  # made on first use: one-shot digests don't need it
        elif mac == "blake3":
            blake3 = _import_blake3()
            derived = blake3(secret, derive_key_context=BLAKE3_CONTEXT).digest()
            set_(self, "_flags", _wire.FLAG_MAC | _wire.FLAG_BLAKE3)
            set_(self, "_blake3_key", derived)
            set_(self, "_template", blake3(key=derived))
        elif mac == "poly1305":
            poly1305 = _import_poly1305()
            r = hmac.digest(secret, POLY1305_R_CONTEXT, "sha256")[:16]
            pad_key = hmac.digest(secret, POLY1305_PAD_CONTEXT, "sha256")
            set_(self, "_flags", _wire.FLAG_MAC | _wire.FLAG_POLY1305)
            set_(self, "_blake3_key", None)
            set_(self, "_template", None)
            # The pad's HMAC keyed once and copied per message (half the cost of hmac.digest).
            set_(self, "_poly1305", (poly1305, r + bytes(16), hmac.new(pad_key, digestmod=hashlib.sha256)))
        else:
            raise UsageError(f"mac must be 'hmac-sha256', 'blake3' or 'poly1305', not {mac!r}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Key is immutable")

    @property
    def mac(self) -> MacName:
        """The MAC's name: ``"hmac-sha256"`` or ``"blake3"``."""
        return self._mac

    @property
    def flags(self) -> int:
        """The header flag bits a message signed with this key carries."""
        return self._flags

    def digest(self, data: BytesLike) -> bytes:
        """The tag over ``data`` (a bytes-like object), in one call. (For poly1305 it is
        different each time: each tag starts with a fresh random nonce.)"""
        if self._blake3_key is not None:
            assert self._template is not None  # made with the BLAKE3 key, in __init__
            h = self._template.copy()
            h.update(data)
            return h.digest()
        if self._poly1305 is not None:
            mac = self.new()
            mac.update(data)
            return mac.digest()
        return hmac.digest(self._secret, data, "sha256")

    def check(self, data: BytesLike, tag: BytesLike) -> bool:
        """Whether ``tag`` is this key's tag over ``data``, compared in constant time."""
        if self._poly1305 is not None:
            h = _Poly1305Mac(*self._poly1305)
            h.update(data)
            return h.verify(tag)
        return hmac.compare_digest(self.digest(data), tag)

    def verify(self, mac: Mac, tag: BytesLike) -> bool:
        """Whether ``tag`` is the tag of the bytes fed to ``mac`` (from :meth:`new`),
        compared in constant time. Ends ``mac``."""
        if isinstance(mac, _Poly1305Mac):  # what new() makes when self._poly1305 is set
            return mac.verify(tag)
        return hmac.compare_digest(mac.digest(), tag)

    def new(self) -> Mac:
        """A fresh hashing object (``update(data)``, ``digest()``) for a message sent or
        received piece by piece; on receipt, :meth:`verify` checks the tag against it."""
        if self._poly1305 is not None:
            return _Poly1305Mac(*self._poly1305)
        template = self._template
        if template is None:
            # Keyed once and copied per message: hmac.new costs twice as much as a copy.
            template = hmac.new(self._secret, digestmod=hashlib.sha256)
            object.__setattr__(self, "_template", template)
        return template.copy()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return self._mac == other._mac and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash((self._mac, self._secret))

    def __repr__(self) -> str:  # never the secret
        return f"Key(<{len(self._secret)} bytes>, mac={self._mac!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a streampickle.Key is not picklable: it holds a secret")


def _import_blake3() -> type[Blake3]:
    try:
        from blake3 import blake3
    except ImportError:
        raise UsageError(
            "mac='blake3' needs the blake3 package, which isn't installed: "
            "pip install 'streampickle[blake3]' (on both ends), or use the default mac."
        ) from None
    return blake3


def _import_poly1305() -> type[Poly1305]:
    try:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.poly1305 import Poly1305
    except ImportError:
        raise UsageError(
            "mac='poly1305' needs the cryptography package, which isn't installed: "
            "pip install 'streampickle[poly1305]' (on both ends), or use the default mac."
        ) from None
    try:
        Poly1305(bytes(32))
    except UnsupportedAlgorithm:  # an OpenSSL built without it (a FIPS build, say)
        raise UsageError(
            "mac='poly1305': this cryptography package's OpenSSL has no Poly1305; "
            "use mac='blake3' or the default mac."
        ) from None
    return Poly1305


class _Poly1305Mac:
    """One message's Poly1305 state: the polynomial under the secret's ``r`` is computed as
    the bytes go by; the pad, which depends on the nonce, is added at the end. Adding it then
    gives exactly Poly1305 under the one-time key ``r || pad`` (RFC 8439 adds ``s`` last), so
    the sender can draw its nonce after the last byte, and the receiver, which only learns the
    nonce from the tag, can still hash each slice as it arrives."""

    __slots__ = ("update", "_poly", "_pad_prf")

    update: Callable[[BytesLike], None]

    def __init__(self, poly1305: type[Poly1305], r_zero: bytes, pad_prf: hmac.HMAC) -> None:
        self._poly = poly1305(r_zero)  # r || 16 zero bytes: the polynomial alone
        self.update = self._poly.update
        self._pad_prf = pad_prf  # HMAC-SHA256 keyed with the pad key; copied, never updated

    def _tag(self, nonce: bytes) -> bytes:
        prf = self._pad_prf.copy()
        prf.update(nonce)
        pad = prf.digest()[:16]
        total = int.from_bytes(self._poly.finalize(), "little") + int.from_bytes(pad, "little")
        return (total & _MASK128).to_bytes(16, "little")

    def digest(self) -> bytes:
        """The tag: a fresh random nonce, then Poly1305 under ``r || pad(nonce)``."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._tag(nonce)

    def verify(self, tag: BytesLike) -> bool:
        tag = bytes(tag)
        if len(tag) != 2 * NONCE_SIZE:
            return False
        return hmac.compare_digest(self._tag(tag[:NONCE_SIZE]), tag[NONCE_SIZE:])


def as_key(key: bytes | bytearray | Key | None) -> Key | None:
    """``key=`` as given to the public API, as a :class:`Key` (bytes mean HMAC-SHA256)."""
    if key is None or isinstance(key, Key):
        return key
    if not isinstance(key, (bytes, bytearray)):
        raise UsageError(f"key must be bytes or a streampickle.Key, not {type(key).__name__}")
    return Key(key)


def describe_flags(flags: int) -> str:
    """How a message with these header flags is signed, for error messages."""
    if not flags & _wire.FLAG_MAC:
        return "no tag"
    if flags & _wire.FLAG_BLAKE3:
        return "a blake3 tag"
    return "a poly1305 tag" if flags & _wire.FLAG_POLY1305 else "an HMAC-SHA256 tag"



def new_sender() -> bytes:
    """A fresh random 8-byte sender id for a stream encoder: never all zeros, the id of a
    message that stands alone. 64 random bits: two encoders draw the same one about once in
    2**32 pairs of streams that share a key."""
    while True:
        sender = os.urandom(8)
        if any(sender):
            return sender
