"""Message authentication: a shared secret and the MAC that signs every message with it.

Two MACs, both 32-byte tags over every byte of the message before the tag
(docs/wire-format.md, *Tag*):

* ``hmac-sha256`` (the default; flag bit 0): the standard library's, about 1.5 GB/s per core
  with SHA extensions.
* ``blake3`` (flag bits 0 and 1): keyed BLAKE3, about 3.4 GB/s per core with AVX2, from the
  optional ``blake3`` package (``pip install 'streampickle[blake3]'``). Every byte is hashed
  on both ends, so for large arrays the MAC, not the socket, sets the speed: BLAKE3 roughly
  halves what authentication costs.

The choice travels with the key (``Key(secret, mac="blake3")``), and the decoder refuses a
tag of the other kind: a peer can't downgrade the MAC, and a misconfiguration is loud.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Literal

from . import _wire
from ._errors import UsageError

__all__ = ["Key", "MacName", "as_key"]

MacName = Literal["hmac-sha256", "blake3"]

#: BLAKE3 ``derive_key`` context: turns a secret of any length into the 32-byte BLAKE3 key.
#: Part of the wire format; changing it changes every blake3 tag.
BLAKE3_CONTEXT = "streampickle 2026-11-27 message tag v1"


class Key:
    """A shared secret for ``key=``, and which MAC signs with it.

    ``key=b"secret"`` means ``Key(b"secret")``: HMAC-SHA256. ``Key(secret, mac="blake3")``
    signs with keyed BLAKE3, about twice as fast; it needs the ``blake3`` package on both
    ends, and both ends must choose it. Immutable; share one between encoders and decoders.
    """

    __slots__ = ("_secret", "_mac", "_flags", "_blake3_key", "_template")

    _secret: bytes
    _mac: MacName
    _flags: int
    _blake3_key: bytes | None
    _template: Any

    def __init__(self, secret: bytes, *, mac: MacName = "hmac-sha256") -> None:
        if not isinstance(secret, (bytes, bytearray, memoryview)):
            raise UsageError(f"key must be bytes, not {type(secret).__name__}")
        secret = bytes(secret)
        if not secret:
            raise UsageError("key must not be empty")
        set_ = object.__setattr__
        set_(self, "_secret", secret)
        set_(self, "_mac", mac)
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
        else:
            raise UsageError(f"mac must be 'hmac-sha256' or 'blake3', not {mac!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Key is immutable")

    @property
    def mac(self) -> MacName:
        """The MAC's name: ``"hmac-sha256"`` or ``"blake3"``."""
        return self._mac

    @property
    def flags(self) -> int:
        """The header flag bits a message signed with this key carries."""
        return self._flags

    def digest(self, data: Any) -> bytes:
        """The tag over ``data`` (a bytes-like object), in one call."""
        if self._blake3_key is None:
            return hmac.digest(self._secret, data, "sha256")
        h = self._template.copy()
        h.update(data)
        return h.digest()

    def new(self) -> Any:
        """A fresh hashing object (``update(data)``, ``digest()``) for a message sent or
        received piece by piece."""
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

    def __reduce__(self) -> Any:
        raise TypeError("a streampickle.Key is not picklable: it holds a secret")


def _import_blake3() -> Any:
    try:
        from blake3 import blake3
    except ImportError:
        raise UsageError(
            "mac='blake3' needs the blake3 package, which isn't installed: "
            "pip install 'streampickle[blake3]' (on both ends), or use the default mac."
        ) from None
    return blake3


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
    return "a blake3 tag" if flags & _wire.FLAG_BLAKE3 else "an HMAC-SHA256 tag"
