"""The msgpack codec of the stripefs wire.

A frame is: 4-byte big-endian length of a msgpack header, the header, then the raw
payload. The payload is the message's `data` field when it has one (block bytes), so
bulk bytes are never packed into msgpack. A reply header is {"e": errno, "m": text,
"b": body}; errno 0 means success and then "b" is the reply message's map.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Iterator, Optional, TypeVar, Union

import crc32c
import msgpack

from .errors import FsError
from .integrity import LEAF_HASH_BYTES, Digester, leaf_count
from .messages import Message
from .types import TRANSFER_CHUNK_BYTES

M = TypeVar("M", bound=Message)
_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 16 * 1024 * 1024


def _pack(header: Any, payload: bytes) -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return b"".join((_LEN.pack(len(head)), head, payload))


def _unpack(frame: bytes) -> tuple[Any, memoryview]:
    if len(frame) < 4:
        raise ValueError("frame shorter than its length prefix")
    (n,) = _LEN.unpack_from(frame, 0)
    if n > MAX_HEADER_BYTES or 4 + n > len(frame):
        raise ValueError("frame header length out of range")
    header = msgpack.unpackb(memoryview(frame)[4 : 4 + n], raw=False, strict_map_key=False)
    return header, memoryview(frame)[4 + n :]


def _split_data(msg: Message) -> tuple[dict, bytes]:
    body = msg.to_wire()
    payload = body.pop("data", b"") if "data" in body else b""
    return body, payload


@functools.lru_cache(maxsize=None)
def _has_data(cls: type) -> bool:
    return "data" in getattr(cls, "__dataclass_fields__", {})


def _join_data(cls: type[M], body: Any, payload: memoryview) -> M:
    # (body is the map msgpack just built for this frame alone: filled in place)
    if isinstance(body, dict) and _has_data(cls):  # type: ignore[arg-type]  # (a class hashes)
        body["data"] = bytes(payload)
    return cls.from_wire(body)  # type: ignore[return-value]


def encode_request(msg: Message) -> bytes:
    body, payload = _split_data(msg)
    return _pack(body, payload)


def decode_request(cls: type[M], frame: bytes) -> M:
    """Decode a request; raises ValueError on anything malformed (never trusts the wire)."""
    try:
        body, payload = _unpack(frame)
        return _join_data(cls, body, payload)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise ValueError(f"malformed {cls.__name__}: {exc}") from exc


def encode_reply(msg: Optional[Message], errno: int = 0, text: str = "") -> bytes:
    if errno:
        return _pack({"e": errno, "m": text, "b": None}, b"")
    assert msg is not None
    body, payload = _split_data(msg)
    return _pack({"e": 0, "m": "", "b": body}, payload)


def decode_reply(cls: type[M], frame: bytes) -> M:
    """Decode a reply; raises FsError with the server's errno, or EIO if malformed."""
    import errno as _errno

    try:
        header, payload = _unpack(frame)
        code = header.get("e", _errno.EIO) if isinstance(header, dict) else _errno.EIO
        if code:
            raise FsError(code, str(header.get("m", "")))
        return _join_data(cls, header["b"], payload)
    except FsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed reply is an I/O error
        raise FsError(_errno.EIO, f"malformed {cls.__name__} reply: {exc}") from exc


# ------------------------------------------------------------------ streamed blocks
#
# A block written down a chain moves as a head message (WriteBlockHead, a request frame)
# and then its chunks, each as two messages: a chunk head,
# `<data length u32><CRC32C of the data u32><leaf hashes>` (little-endian, the writer's
# leaf hashes of the data: proto/integrity.py), and the data itself. Every server can check
# what it received and keep the hashes without hashing anything itself, and the data goes
# out as the writer's own buffer: gRPC copies each message it sends, and a chunk framed in
# one message would be copied once more to frame it (1 GiB written, 1 GiB more copied on
# the writer's upload threads, into fresh pages: docs/benchmark.md).

_CHUNK = struct.Struct("<II")


def encode_chunk_head(length: int, crc: int, leaves: bytes) -> bytes:
    """The first of a chunk's two messages (the data is the second)."""
    return _CHUNK.pack(length, crc) + leaves


def decode_chunk(head: bytes, data: bytes) -> tuple[memoryview, int, bytes]:
    """(data, its CRC32C as sent, leaf hashes) from a chunk's two messages; ValueError if
    they do not add up."""
    if len(head) < _CHUNK.size:
        raise ValueError("chunk head shorter than its prefix")
    length, crc = _CHUNK.unpack_from(head, 0)
    if len(head) != _CHUNK.size + leaf_count(length) * LEAF_HASH_BYTES:
        raise ValueError("chunk head's leaf hashes do not match its length")
    if len(data) != length:
        raise ValueError(f"chunk of {len(data)} bytes where its head says {length}")
    return memoryview(data), crc, bytes(memoryview(head)[_CHUNK.size :])


def _message_of(piece: bytes | memoryview) -> bytes:
    """A chunk's data as a message: the buffer itself when the piece is a whole immutable
    buffer (a sequential writer's 1 MiB writes are), else a copy."""
    if isinstance(piece, bytes):
        return piece
    whole = piece.obj
    if isinstance(whole, bytes) and piece.nbytes == len(whole):
        return whole
    return bytes(piece)


#: A block as one buffer, or as its pieces in order.
Buffers = Union[bytes, bytearray, memoryview, list]


def views(pieces: list, start: int, end: int) -> list[memoryview]:
    """Bytes [start, end) of the buffers `pieces` laid end to end, as a view into each
    piece they fall in."""
    out, pos = [], 0
    for piece in pieces:
        if pos + len(piece) > start and pos < end:
            out.append(memoryview(piece)[max(0, start - pos) : end - pos])
        pos += len(piece)
        if pos >= end:
            break
    return out


def span(pieces: list, start: int, end: int) -> bytes | memoryview:
    """Bytes [start, end) of the buffers `pieces` laid end to end: a view into the one piece
    holding them, or gathered from several."""
    out = views(pieces, start, end)
    return out[0] if len(out) == 1 else b"".join(out)


class Pieces:
    """Bytes kept as the buffers they arrived in, in order (a streamed block's chunks),
    read through views into them rather than gathered into one buffer first: gathering a
    4 MiB block copies every byte once more and touches 4 MiB of new pages, on the
    reading client's CPU (docs/client.md, "Reads"). Immutable like bytes (its pieces are
    bytes); `block[a:b]` is bytes, as a slice of bytes is; `views_of` gives views."""

    __slots__ = ("pieces", "length")

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.length = sum(map(len, pieces))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> bytes:
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise ValueError("Pieces take slices of step 1 only")
        return bytes(span(self.pieces, start, stop))

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)


#: What a block read arrives as: one buffer, or its chunks (Pieces).
Block = Union[bytes, Pieces]


def joined(pieces: list[bytes]) -> Block:
    """Buffers that arrived in order, as one Block (no copy)."""
    return pieces[0] if len(pieces) == 1 else Pieces(pieces) if pieces else b""


def views_of(block: Block, start: int, end: int) -> list[memoryview]:
    """block[start:end] as views into the buffers holding it, none copied, for a caller
    that writes them out at once (a FUSE reply: one writev)."""
    if isinstance(block, Pieces):
        return views(block.pieces, start, end)
    return [memoryview(block)[start:end]]


def buffers_of(block: Block) -> list[bytes]:
    """The buffers that hold a Block, in order."""
    return block.pieces if isinstance(block, Pieces) else [block]


class BlockChunks:
    """A block cut into the chunk messages of a write chain (a head with its CRC32C and
    leaf hashes, then the data), made as gRPC's thread sends them; the sums are kept for
    a retry (a block placed again is not hashed again). The block may come as pieces (a
    writer's buffers as they were written): a chunk that is one whole immutable piece is
    sent as that piece, any other is copied out (gathered, if it spans pieces)."""

    def __init__(self, data: Buffers) -> None:
        self.pieces = data if isinstance(data, list) else [data]
        self.length = sum(len(p) for p in self.pieces)
        self.sums: dict[int, tuple[int, bytes]] = {}
        # The block's digest, fed each chunk the first time it is made (always in order).
        self._digester = Digester()

    def messages(self) -> Iterator[bytes]:
        for start in range(0, self.length, TRANSFER_CHUNK_BYTES):
            # No view of a buffer outlives a message: the writer may grow a bytearray once
            # the upload is over, which an export would forbid (BufferError).
            piece = span(self.pieces, start, min(start + TRANSFER_CHUNK_BYTES, self.length))
            try:
                sums = self.sums.get(start)
                if sums is None:
                    sums = self.sums[start] = (crc32c.crc32c(piece), self._digester.leaves(piece))
                head, data = encode_chunk_head(len(piece), *sums), _message_of(piece)
            finally:
                if isinstance(piece, memoryview):
                    piece.release()
                del piece
            yield head
            yield data

    def digest(self) -> bytes:
        """The block's digest (proto/integrity.py), once every chunk has been made."""
        return self._digester.digest()


# ------------------------------------------------------------------ multiplexed streams
#
# A stream message carries a batch: the client packs every request queued at the time
# into one message, `[[id, method, request frame], ...]`, and the server answers with
# `[[id, reply frame], ...]` (a reply batch may hold any subset of the requests in flight,
# in any order). Ids are the caller's own; the frames are the unary frames above, so one
# request means the same thing on a unary call and in a batch.

#: Most requests (or replies) in one stream message.
MAX_BATCH = 1024


def encode_batch(entries: list) -> bytes:
    return msgpack.packb(entries, use_bin_type=True)


def decode_request_batch(message: bytes) -> list[tuple[int, str, bytes]]:
    """[(id, method, frame)]; ValueError if the message is not a well-formed batch."""
    return _decode_batch(message, 3)


def decode_reply_batch(message: bytes | bytearray) -> list[tuple[int, bytes]]:
    """[(id, frame)]; ValueError if the message is not a well-formed batch."""
    return _decode_batch(message, 2)


def _decode_batch(message: bytes | bytearray, width: int) -> list[tuple]:
    try:
        entries = msgpack.unpackb(message, raw=False, strict_map_key=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise ValueError(f"malformed batch: {exc}") from exc
    if not isinstance(entries, list) or len(entries) > MAX_BATCH:
        raise ValueError("malformed batch: not a list of at most %d entries" % MAX_BATCH)
    out = []
    for entry in entries:
        if (
            not isinstance(entry, list) or len(entry) != width or type(entry[0]) is not int
            or not isinstance(entry[-1], bytes) or (width == 3 and not isinstance(entry[1], str))
        ):
            raise ValueError("malformed batch entry")
        out.append(tuple(entry))
    return out
