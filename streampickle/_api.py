"""One-shot helpers over the sans-IO core: a whole message as one ``bytes``.

``loads`` is the :class:`Decoder`'s one-buffer path (:meth:`Decoder.loads`, the same
function) and ``dumps`` the :class:`Encoder`'s output joined: neither has a decoding or
framing rule of its own.
"""

from __future__ import annotations

from ._decoder import Decoder
from ._encoder import dumps

__all__ = ["dumps", "loads"]

#: Decode exactly one whole message: see :meth:`Decoder.loads`.
loads = Decoder.loads
