"""Build configuration that pyproject.toml can't express: the optional C pre-scan.

``optional=True``: without a C compiler the install still succeeds and streampickle uses the
pure-Python scan (streampickle/_scan.py), which accepts and refuses exactly the same pickles.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("streampickle._speedups", ["streampickle/_speedups.c"], optional=True)])
