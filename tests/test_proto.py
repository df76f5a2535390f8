"""Level 1: the wire contract as pure functions: validation, codec, errno mapping."""

import errno
import os

import msgpack
import pytest

from stripefs.proto import codec
from stripefs.proto import messages as m
from stripefs.proto.auth import check_read_token, check_write_token, write_token
from stripefs.proto.errors import FsError
from stripefs.proto.services import DATA_METHODS, META_METHODS


def test_name_rules():
    assert m.LookupReq(1, b"ok").valid() is None
    assert m.LookupReq(1, b"x" * 255).valid() is None
    assert "longer" in m.LookupReq(1, b"x" * 256).valid()
    assert m.LookupReq(1, b"a/b").valid()
    assert m.LookupReq(1, b"a\0b").valid()
    assert m.LookupReq(1, b"").valid()
    assert m.LookupReq(1, b"caf\xe9").valid() is None  # names are bytes, not UTF-8


def test_type_checks_reject_wrong_shapes():
    assert m.LookupReq(1, "str-not-bytes").valid()
    assert m.LookupReq(True, b"x").valid()  # bool is not an inode number
    assert m.LookupReq(1 << 70, b"x").valid()
    assert m.SetattrReq(1, m.Ctx(), size=-1).valid()
    assert m.RenameReq(1, b"a", 1, b"b", flags=3).valid()
    assert m.AllocReq(1, 1, []).valid()
    req = m.SetattrReq.from_wire({"ino": 1, "ctx": 5})
    assert "Ctx" in req.valid()


def test_every_method_has_message_types():
    for table in (META_METHODS, DATA_METHODS):
        for meth in table.values():
            assert issubclass(meth.request, m.Message) and issubclass(meth.reply, m.Message)


def test_request_round_trip_carries_data_raw():
    reply = m.BlockData(b"\x00\x01" * 1000, b"l" * 16)
    frame = codec.encode_reply(reply)
    assert frame.endswith(reply.data)  # bulk bytes travel after the header, not inside msgpack
    assert codec.decode_reply(m.BlockData, frame) == reply


def test_block_chunks_round_trip():
    """A block cut into write-chain chunks, each a head and its data: each decodes to its
    piece, CRC and leaf hashes; the digest is the block's; a head and data that do not add
    up are refused."""
    import crc32c

    from stripefs.proto.integrity import block_digest, leaf_hashes
    from stripefs.proto.types import TRANSFER_CHUNK_BYTES

    data = os.urandom(2 * TRANSFER_CHUNK_BYTES + 5000)
    chunks = codec.BlockChunks(bytearray(data))
    messages = list(chunks.messages())
    assert len(messages) == 6 and chunks.digest() == block_digest(data)
    got = b""
    for head, body in zip(messages[::2], messages[1::2]):
        piece, crc, leaves = codec.decode_chunk(head, body)
        # (each piece's leaves are hashed where they are in the block: version 4 digests)
        assert crc == crc32c.crc32c(piece) and leaves == leaf_hashes(piece, first_leaf=len(got) // 4096)
        got += piece
    assert got == data
    head, body = messages[4], messages[5]
    for bad_head, bad_body in ((b"", body), (head, body[:-1]), (head, body + b"x"), (head[:-1], body),
                               (head + b"x", body), (b"\xff\xff\xff\xff" + head[4:], body), (body, head)):
        with pytest.raises(ValueError):
            codec.decode_chunk(bad_head, bad_body)


def test_a_whole_written_buffer_is_sent_as_itself():
    """A chunk that is one whole immutable buffer of the writer (a sequential writer's
    1 MiB writes, kept as views of them) goes out as that buffer, not a copy; one cut
    from a larger buffer, or from a bytearray, is copied (no view outlives its message)."""
    from stripefs.proto.types import TRANSFER_CHUNK_BYTES

    writes = [os.urandom(TRANSFER_CHUNK_BYTES) for _ in range(2)]
    messages = list(codec.BlockChunks([memoryview(w) for w in writes]).messages())
    assert messages[1] is writes[0] and messages[3] is writes[1]
    whole = os.urandom(2 * TRANSFER_CHUNK_BYTES)
    messages = list(codec.BlockChunks(whole).messages())
    assert messages[1] == whole[:TRANSFER_CHUNK_BYTES] and type(messages[1]) is bytes
    buf = bytearray(whole[:TRANSFER_CHUNK_BYTES])
    messages = list(codec.BlockChunks(buf).messages())
    assert messages[1] == buf and type(messages[1]) is bytes
    buf.extend(b"more")  # no export of it is left behind


def test_a_block_kept_as_pieces_reads_as_its_bytes():
    """codec.Pieces (a streamed read's chunks, never gathered): every slice, the views of
    every range and the whole read as they would from the one buffer; the views are into
    the pieces themselves, one a piece the range falls in, none a copy."""
    data = os.urandom(3000)
    sizes = [1024, 1024, 952]
    pieces = [data[:1024], data[1024:2048], data[2048:]]
    block = codec.joined(pieces)
    assert isinstance(block, codec.Pieces) and len(block) == len(data) == sum(sizes)
    assert bytes(block) == data and codec.buffers_of(block) == pieces
    for start, end in [(0, 3000), (0, 1024), (1000, 1100), (1024, 2048), (5, 2999), (2047, 2049),
                       (2990, 4000), (3000, 3001), (100, 50), (0, 0)]:
        assert block[start:end] == data[start:end], (start, end)
        assert b"".join(codec.views_of(block, start, end)) == data[start:end], (start, end)
        assert codec.span(pieces, start, end) == data[start:end], (start, end)
    assert block[:] == data and block[-10:] == data[-10:]
    [view] = codec.views_of(block, 1024, 2048)
    assert isinstance(view, memoryview) and view.obj is pieces[1]
    views = codec.views_of(block, 1000, 2100)
    assert [v.obj for v in views] == pieces and [len(v) for v in views] == [24, 1024, 52]
    assert codec.joined([data]) is data and codec.joined([]) == b""
    [view] = codec.views_of(data, 10, 20)
    assert bytes(view) == data[10:20] and view.obj is data and codec.buffers_of(data) == [data]


def test_nested_round_trip():
    attr = m.Attr(5, 0o100644, 1, 0, 0, 0, 10, 1, 2, 3, 4096, 0, 7)
    rep = m.OpenReply(attr, [m.BlockRef(0, 9, 10, ["127.0.0.1:1"])])
    assert codec.decode_reply(m.OpenReply, codec.encode_reply(rep)) == rep


@pytest.mark.parametrize("frame", [b"", b"\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x02\xc1\xc1",
                                   b"\x00\x00\x00\x01\x05", msgpack.packb([1, 2])])
def test_malformed_requests_are_value_errors(frame):
    with pytest.raises(ValueError):
        codec.decode_request(m.LookupReq, frame)


def test_error_reply_carries_errno():
    with pytest.raises(FsError) as exc:
        codec.decode_reply(m.AttrReply, codec.encode_reply(None, errno.ENOTEMPTY, "not empty"))
    assert exc.value.errno == errno.ENOTEMPTY


def test_malformed_reply_is_eio():
    with pytest.raises(FsError) as exc:
        codec.decode_reply(m.AttrReply, b"junk")
    assert exc.value.errno == errno.EIO


def test_tokens():
    key = b"s" * 32
    now = 1_800_000_000
    token = write_token(key, 42, "client:a", "d1:7", now + 60)
    assert check_write_token(key, 42, "client:a", "d1:7", token, now)
    assert not check_write_token(key, 43, "client:a", "d1:7", token, now)  # another block
    assert not check_write_token(key, 42, "client:b", "d1:7", token, now)  # another holder
    assert not check_write_token(key, 42, "client:a", "d2:7", token, now)  # another data server
    assert not check_write_token(b"t" * 32, 42, "client:a", "d1:7", token, now)  # another key
    assert not check_write_token(key, 42, "client:a", "d1:7", token, now + 3600)  # expired
    assert not check_read_token(key, 42, "client:a", token, now)  # another operation
    assert not check_write_token(b"", 42, "client:a", "d1:7", write_token(b"", 42, "client:a", "d1:7", now + 60), now)


def test_credentials_carry_role_and_name(tmp_path):
    from stripefs.proto.credentials import init_ca, issue, load_credentials, parse_common_name

    ca = init_ca(tmp_path / "ca")
    creds = load_credentials(issue(ca, "data", "node-7", tmp_path / "b"))
    assert (creds.role, creds.name) == ("data", "node-7")
    assert (tmp_path / "b" / "key.pem").stat().st_mode & 0o077 == 0
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    for bad in ("client", "root:x", "client:", "client:a:b", "data:a/b"):
        assert parse_common_name(bad) is None
    with pytest.raises(ValueError):
        issue(ca, "god", "x", tmp_path / "c")
    with pytest.raises(ValueError):
        issue(ca, "client", "a:b", tmp_path / "c")


def test_ids_beyond_their_width_are_invalid():
    assert m.Ctx(uid=(1 << 32) - 1, gid=0).valid() is None
    assert m.Ctx(uid=1 << 32, gid=0).valid() is not None
    assert m.SetattrReq(1, m.Ctx(), gid=-1).valid() is not None
    assert m.InodeReq((1 << 63) - 1).valid() is None
    assert m.InodeReq(1 << 63).valid() is not None


def test_digests_of_every_version_are_checked():
    """Version 4 digests (BLAKE3 of the block, SHA-256 of its leaf hashes from the block's
    BLAKE3 tree), the version 3 ones of blocks written before (SHA-256 leaves), version 2
    (SHA-256 of the block) and version 1 (SHA-256 of the SHA-256 leaf hashes alone) are all
    checked, for whole blocks, leaf hashes and ranges, and refuse other bytes; a digest of an
    unknown version matches nothing."""
    import hashlib

    from blake3 import blake3

    from stripefs.proto.integrity import (DIGEST_V3, DIGEST_VERSION, Digester, block_hasher, hash_matches,
                                          leaf_hashes, leaves_match, matches, range_matches, root_of)

    data = os.urandom(300_000)
    other = data[:-1] + bytes([data[-1] ^ 1])
    sha_leaves = leaf_hashes(data, DIGEST_V3 + bytes(64))
    tree_leaves = leaf_hashes(data, DIGEST_VERSION + bytes(64))
    v1 = root_of(sha_leaves)
    v3 = DIGEST_V3 + blake3(data).digest() + root_of(sha_leaves)
    v2 = b"\x02" + hashlib.sha256(data).digest() + root_of(sha_leaves)
    v4 = b"\x04" + blake3(data).digest() + root_of(tree_leaves)
    for version, digest in ((DIGEST_VERSION, v4), (DIGEST_V3, v3)):  # what writers make, in pieces
        d = Digester(version)
        assert d.leaves(data[:65536]) + d.leaves(data[65536:]) == leaf_hashes(data, digest)
        assert d.digest() == digest
    assert tree_leaves != sha_leaves
    assert len(v4) == len(v3) == len(v2) == 65 and len(v1) == 32
    for digest in (v4, v3, v2, v1):
        leaves = leaf_hashes(data, digest)
        assert leaves == (sha_leaves if digest is not v4 else tree_leaves)
        assert matches(digest, data) and not matches(digest, other)
        assert leaves_match(digest, len(data), leaves) and not leaves_match(digest, len(data), leaf_hashes(other, digest))
        assert not leaves_match(digest, len(data), leaf_hashes(data, v4 if digest is not v4 else v3))
        assert not leaves_match(digest, len(data) + 4096, leaves)
        assert m.BlockRef(0, 1, len(data), digest=digest).valid() is None
        for offset in (0, 4096, 40 * 4096, 73 * 4096):  # (the last leaf is short)
            piece = data[offset : offset + 8192]
            assert range_matches(leaves, offset, piece, digest)
            assert not range_matches(leaves, offset, piece[:-1] + bytes([piece[-1] ^ 1]), digest)
            if offset:  # (a leaf's hash is not another's)
                assert not range_matches(leaves, offset - 4096, piece, digest)
    for digest, hash_of in ((v4, lambda d: blake3(d).digest()), (v3, lambda d: blake3(d).digest()),
                            (v2, lambda d: hashlib.sha256(d).digest())):
        assert hash_matches(digest, hash_of(data)) and not hash_matches(digest, hash_of(other))
        h = block_hasher(digest)  # (as a streamed read hashes it)
        h.update(data[:100_000])
        h.update(data[100_000:])
        assert hash_matches(digest, h.digest())
    assert not hash_matches(v4, hashlib.sha256(data).digest())  # a version's own hash only
    assert hash_matches(v1, hashlib.sha256(data).digest()) is None  # needs the leaves
    unknown = b"\x09" + v4[1:]
    assert not matches(unknown, data) and not hash_matches(unknown, blake3(data).digest())
    assert m.BlockRef(0, 1, len(data), digest=unknown).valid()
    assert matches(b"", other)  # nothing recorded: nothing to check
    assert m.BlockRef(0, 1, 1, digest=b"x" * 40).valid()


@pytest.mark.parametrize("size", [0, 1, 1024, 1025, 4095, 4096, 4097, 8192, 3 * 4096 + 2048, 16 * 4096,
                                  16 * 4096 + 1, 17 * 4096 - 3, 31 * 4096, 33 * 4096, 256 * 1024 + 1,
                                  4 * 1024 * 1024, 4 * 1024 * 1024 - 4095])
def test_tree_leaf_hashes_merge_into_the_blocks_blake3(size):
    """Version 4 leaf hashes are each leaf's chaining value in the block's BLAKE3 tree
    (proto/_leafhash.c, written from the specification): merged up the tree they give the
    blake3 package's hash of the block (the digest's block hash), at sizes that end after
    whole groups of sixteen leaves (hashed together where the CPU has AVX-512), partway
    through one, with a short last leaf and a short last chunk; any run of leaves hashed
    from its place in the block (a range reader's) is the same as in the whole; every kind
    of buffer a writer holds hashes alike, and a block hashed in pieces (a writer's 1 MiB
    chunks) gets the digest of the whole."""
    import hashlib

    from blake3 import blake3

    from stripefs.proto.integrity import (DIGEST_VERSION, LEAF_BYTES, LEAF_HASH_BYTES, Digester, block_digest,
                                          leaf_hashes)

    v4 = DIGEST_VERSION + bytes(64)
    data = os.urandom(size)
    leaves = leaf_hashes(data, v4)
    assert len(leaves) == -(-size // LEAF_BYTES) * LEAF_HASH_BYTES
    assert block_digest(data)[1:33] == blake3(data).digest()  # (whichever version this CPU writes)
    assert leaf_hashes(bytearray(data), v4) == leaf_hashes(memoryview(data), v4) == leaves
    for first in {1, 5, 16, 17, size // LEAF_BYTES - 1}:
        if 0 < first < -(-size // LEAF_BYTES):
            assert leaf_hashes(data[first * LEAF_BYTES :], v4, first) == leaves[first * LEAF_HASH_BYTES :]
            assert leaf_hashes(data[first * LEAF_BYTES :], v4) != leaves[first * LEAF_HASH_BYTES :]  # (where they are)
    # Each leaf alone takes the one-lane path: the sixteen-lane one must agree with it.
    assert b"".join(leaf_hashes(data[i : i + LEAF_BYTES], v4, i // LEAF_BYTES)
                    for i in range(0, size, LEAF_BYTES)) == leaves
    d = Digester(DIGEST_VERSION)
    pieces = [data[i : i + 65536] for i in range(0, size, 65536)] or [b""]
    assert b"".join(d.leaves(p) for p in pieces) == leaves
    assert d.digest() == DIGEST_VERSION + blake3(data).digest() + hashlib.sha256(leaves).digest()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 16 * 4096, 17 * 4096 - 3, 31 * 4096, 256 * 1024,
                                  256 * 1024 + 1, 4 * 1024 * 1024 + 123])
def test_leaf_hashes_are_each_leafs_sha256(size):
    """Version 3's leaf hashes (blocks written before version 4): the C leaf loop
    (proto/_leafhash.c) against hashlib, leaf by leaf, on both sides of the size above which
    it lets go of the GIL, from every kind of buffer a writer holds, and at sizes that end
    after whole groups of sixteen leaves (hashed together where the CPU has AVX-512),
    partway through one, and with a short last leaf."""
    import hashlib

    from stripefs.proto.integrity import DIGEST_V3, LEAF_BYTES, LEAF_HASH_BYTES, leaf_hashes

    v3 = DIGEST_V3 + bytes(64)
    data = os.urandom(size)
    want = b"".join(hashlib.sha256(data[i : i + LEAF_BYTES]).digest()[:LEAF_HASH_BYTES]
                    for i in range(0, size, LEAF_BYTES))
    assert leaf_hashes(data, v3) == leaf_hashes(bytearray(data), v3) == leaf_hashes(memoryview(data), v3) == want
    assert leaf_hashes(memoryview(data)[1:], v3) == leaf_hashes(data[1:], v3)


@pytest.mark.parametrize("leaf_bytes", [64, 100, 8192])
def test_leaf_hashes_of_other_leaf_sizes(leaf_bytes):
    """Leaves of other sizes, whole hashes: sixteen at a time when the size is a multiple of
    the hash's 64-byte block (the padding block then differs from a 4 KiB leaf's), one at a
    time otherwise."""
    import hashlib

    from stripefs.proto import _leafhash

    assert _leafhash.LANES in (1, 16)
    data = os.urandom(37 * leaf_bytes + 11)
    want = b"".join(hashlib.sha256(data[i : i + leaf_bytes]).digest() for i in range(0, len(data), leaf_bytes))
    assert _leafhash.hashes(data, leaf_bytes, 32, 0) == _leafhash.hashes(data, leaf_bytes, 32, 1 << 30) == want


def test_leaf_hashes_refuse_what_is_not_one_buffer():
    from stripefs.proto.integrity import leaf_hashes

    with pytest.raises(TypeError):
        leaf_hashes("text")  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        leaf_hashes(memoryview(bytes(8192))[::2])  # not contiguous
