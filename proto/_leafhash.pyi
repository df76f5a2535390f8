# The compiled leaf hasher (proto/_leafhash.c).
def hashes(data: bytes | bytearray | memoryview, leaf_bytes: int, hash_bytes: int, nogil_above: int, /) -> bytes: ...

#: Leaves hashed at once: 16 where the CPU has AVX-512, else 1.
LANES: int
