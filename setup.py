"""Build configuration that pyproject.toml can't express: the optional C speed paths.

``optional=True``: without a C compiler the install still succeeds and streampickle uses its
pure-Python equivalents: the scan in streampickle/_scan.py, which accepts and refuses exactly
the same pickles, and the framing and loads paths in _encoder.py and _api.py.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("streampickle._speedups", ["streampickle/_speedups.c"], optional=True)])
