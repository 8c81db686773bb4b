"""Build configuration that pyproject.toml can't express: the optional C speed paths.

``optional=True``: without a C compiler the install still succeeds and streampickle uses its
pure-Python equivalents (chosen in streampickle/_accel.py): the verifier's scan and walk in
_verify.py, which accept and refuse exactly the same pickles, and the framing, loads and
decoder paths in _encoder.py, _api.py and _decoder.py. ``STREAMPICKLE_PURE_PYTHON=1`` gives
that configuration with the extension built; .ci/run runs the suite both ways, and
tests/test_pure_parity.py holds the two to the same bytes, objects and errors.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("streampickle._speedups", ["streampickle/_speedups.c"], optional=True)])
