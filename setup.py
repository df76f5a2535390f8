"""The one compiled part of stripefs: everything else is in pyproject.toml (setuptools
before 74 reads extension modules only from here)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # proto/integrity.py leaf_hashes and Digester: each 4 KiB leaf's BLAKE3 chaining value
        # (version 4 digests) or SHA-256 (before), in C, without the GIL (OpenSSL's libcrypto:
        # libssl-dev, scripts/_common.sh).
        Extension("stripefs.proto._leafhash", ["proto/_leafhash.c"], libraries=["crypto"]),
    ],
)
