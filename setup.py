"""Builds the package's one C extension, ``collective._stream`` (streaming copies); the rest is in pyproject.toml."""

from setuptools import Extension, setup

# optional: where no C compiler is at hand the package installs without it, and copies stay plain NumPy copies.
setup(ext_modules=[Extension("collective._stream", ["collective/_stream.c"], optional=True)])
