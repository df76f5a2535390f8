"""The one compiled part of stripefs: everything else is in pyproject.toml (setuptools
before 74 reads extension modules only from here)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # proto/integrity.py leaf_hashes: SHA-256 of each 4 KiB leaf in C, without the GIL
        # (OpenSSL's libcrypto: libssl-dev, scripts/_common.sh).
        Extension("stripefs.proto._leafhash", ["proto/_leafhash.c"], libraries=["crypto"]),
    ],
)
