# pyproject.toml has no key for cffi's build step; everything else lives there.
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
