"""The verifier's fast path: the C scan, or its Python twin.

``scan(data, chunk_count)`` is the verifier's *plain mode* (see ``_verify``): 0 if the pickle
is plain data that every rule admits as it is, ``_verify.DEFER`` if it names a global or
needs a typed judgement (then the full verifier runs), ``(position, reason)`` if its shape is
refused. ``_speedups.scan`` is the C twin of ``_verify.scan_py``: same answer on every input.
"""

from __future__ import annotations

from ._accel import speedups
from ._verify import DEFER, scan_py

__all__ = ["DEFER", "scan", "scan_c", "scan_py"]

# Without the C extension (or with STREAMPICKLE_PURE_PYTHON=1): the reference scan.
scan_c = speedups.scan if speedups else None

#: The scan to use: the C one when it was built, the reference otherwise (they agree).
scan = scan_c or scan_py
