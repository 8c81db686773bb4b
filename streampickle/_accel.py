"""The one place the C extension is imported.

Every accelerated function has a pure-Python twin that gives the same answer on every input;
the extension only makes it faster. ``speedups`` is the extension module, or ``None`` when it
was not built (``setup.py`` allows that) or when ``STREAMPICKLE_PURE_PYTHON`` is set to
anything but ``""`` or ``"0"`` in the environment before ``streampickle`` is imported. The
pure-Python configuration is a tested one: the suite runs both ways.

Modules ask here, never import ``._speedups`` themselves::

    from ._accel import speedups
    scan = speedups.scan if speedups else scan_py
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["PURE_PYTHON_REQUESTED", "speedups"]

#: True when the environment asked for the pure-Python paths.
PURE_PYTHON_REQUESTED: bool = os.environ.get("STREAMPICKLE_PURE_PYTHON", "") not in ("", "0")


def _load() -> ModuleType | None:
    if PURE_PYTHON_REQUESTED:
        return None
    try:
        from . import _speedups
    except ImportError:  # built without a C compiler: the Python twins do it all
        return None
    return _speedups


if TYPE_CHECKING:
    # To a type checker, ``speedups`` is the extension as its stub (_speedups.pyi) types it,
    # so that ``speedups.scan(...)`` is checked; every use guards it with ``if speedups``.
    from . import _speedups as speedups
else:
    #: The C extension, or None: then every caller uses its Python twin.
    speedups = _load()
