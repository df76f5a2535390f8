"""The msgpack codec of the stripefs wire.

A frame is: 4-byte big-endian length of a msgpack header, the header, then the raw
payload. The payload is the message's `data` field when it has one (block bytes), so
bulk bytes are never packed into msgpack. A reply header is {"e": errno, "m": text,
"b": body}; errno 0 means success and then "b" is the reply message's map.
"""

from __future__ import annotations

import struct
from typing import Any, Optional, TypeVar

import msgpack

from .errors import FsError
from .messages import Message

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


def _join_data(cls: type[M], body: Any, payload: memoryview) -> M:
    if isinstance(body, dict) and "data" in {f for f in getattr(cls, "__dataclass_fields__", {})}:
        body = dict(body)
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
    return _decode_batch(message, 3)  # type: ignore[return-value]


def decode_reply_batch(message: bytes) -> list[tuple[int, bytes]]:
    """[(id, frame)]; ValueError if the message is not a well-formed batch."""
    return _decode_batch(message, 2)  # type: ignore[return-value]


def _decode_batch(message: bytes, width: int) -> list[tuple]:
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
