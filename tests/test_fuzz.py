"""Fuzzing every method's decoder and handler, with valid credentials, in process: the
metaserver core and a data service behind the servers' own dispatch (stripefs.proto.rpc.Dispatch:
decoding, role checks, valid(), the method), fed messages built from each request type's
fields with values at and past every edge, and raw garbage frames. Bounded in time.

What must hold: nothing raises out of the dispatch, no answer is an internal error (every
refusal is a clear errno), and what was there is undamaged (fsck finds nothing, the file
written before reads back the same)."""

from __future__ import annotations

import dataclasses
import errno
import types
import typing
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stripefs.dataserver.service import DataService
from stripefs.dataserver.store import BlockStore
from stripefs.metaserver.core import MetaCore
from stripefs.proto import codec
from stripefs.proto import messages as m
from stripefs.proto.credentials import ADMIN, CLIENT, DATA, Caller
from stripefs.proto.errors import FsError
from stripefs.proto.rpc import Dispatch
from stripefs.proto.services import DATA_METHODS, META_METHODS

pytestmark = pytest.mark.timeout(300)

KEY = b"fuzz-token-key-0123456789abcdef0"
#: Integers that sit on the edges of every check: ids, sizes, offsets, uids, flags.
EDGES = [-(1 << 63), -1, 0, 1, 2, 3, 255, 256, 4095, 4096, 65535, 65536, (1 << 31) - 1, 1 << 31,
         (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
CALLERS = [Caller(CLIENT, "fuzz"), Caller(ADMIN, "fuzz-admin"), Caller(DATA, "fuzz-data")]


def values(tp):
    """A strategy for a field annotated `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([values(a) for a in typing.get_args(tp)])
    if tp is type(None):
        return st.none()
    if origin is list:
        return st.lists(values(typing.get_args(tp)[0]), max_size=4)
    if isinstance(tp, type) and issubclass(tp, m.Message):
        return messages(tp)
    if tp is int:
        # Mostly small: inode numbers, sessions, server ids and indexes that exist.
        return st.one_of(st.integers(0, 12), st.integers(0, 12), st.sampled_from(EDGES),
                         st.integers(-(1 << 63), (1 << 64) - 1))
    if tp is bytes:
        # Mostly names that are valid and collide (so creates, renames and unlinks meet).
        names = st.text(alphabet="abc", min_size=1, max_size=2).map(str.encode)
        return st.one_of(names, names, st.binary(max_size=40),
                         st.sampled_from([b"", b".", b"..", b"a/b", b"x\0y", b"n" * 256, b"kept", b"file",
                                          b"user.x", b"trusted.x", b"system.posix_acl_access",
                                          b"stripefs.replicas", b"stripefs.inline_max"]))
    if tp is str:
        return st.one_of(st.text(max_size=20), st.sampled_from(["corrupt", "missing", "unreachable", "127.0.0.1:1"]))
    if tp is bool:
        return st.booleans()
    if tp is float:
        return st.floats(allow_nan=True, allow_infinity=True)
    return st.nothing()


def messages(cls):
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: values(hints[f.name]) for f in dataclasses.fields(cls)})


def calls(methods):
    def one(name):
        method = methods[name]
        framed = messages(method.request).map(lambda msg: _encode(msg))
        garbage = st.binary(max_size=64)
        # Mostly a caller the method is for, so the handlers run, not only the refusals.
        allowed = [c for c in CALLERS if c.role in method.roles] or CALLERS
        callers = st.one_of(st.sampled_from(allowed), st.sampled_from(allowed), st.sampled_from(CALLERS))
        return st.tuples(st.just(name), st.one_of(framed, framed, framed, garbage), callers)

    return st.sampled_from(sorted(methods)).flatmap(one)


def _encode(msg: m.Message) -> bytes:
    try:
        return codec.encode_request(msg)
    except (OverflowError, TypeError, ValueError):
        return b"\x00\x00\x00\x01\xc1"  # what msgpack cannot carry never reaches a server


def check_reply(method, frame: bytes) -> None:
    try:
        codec.decode_reply(method.reply, frame)
    except FsError as exc:
        assert not exc.message.startswith("internal error"), exc
        assert exc.errno != errno.EIO or "malformed" not in exc.message, exc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    core = MetaCore(str(base / "meta.db"), KEY)
    for i in range(3):
        core.register(m.RegisterReq(f"127.0.0.1:{7000 + i}", uuid.uuid4().hex, 1 << 40, 1 << 40, 0),
                      caller=Caller(DATA, "fuzz-data") if i == 0 else Caller(DATA, f"d{i}"))
    session = core.open_session(m.SessionOpenReq("h", "m"), caller=CALLERS[0]).session
    d = core.mkdir(m.MkdirReq(1, b"kept", 0o755, m.Ctx())).attr
    f = core.mknod(m.MknodReq(d.ino, b"file", 0o100644, m.Ctx(), 0, session), caller=CALLERS[0]).attr
    import crc32c

    core.commit_inline(m.InlineCommitReq(f.ino, session, 5, 1, crc32c.crc32c(b"hello"), b"hello"),
                       caller=CALLERS[0])
    store = BlockStore(base / "data")
    service = DataService(store)
    service.token_key = KEY
    yield core, Dispatch(META_METHODS, core), Dispatch(DATA_METHODS, service), d.ino, f.ino
    core.close()


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=calls(META_METHODS))
def test_metaserver_methods(world, call):
    _, meta, _, _, _ = world
    name, frame, caller = call
    check_reply(META_METHODS[name], meta.run(name, frame, caller))


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=calls(DATA_METHODS))
def test_data_server_methods(world, call):
    _, _, data, _, _ = world
    name, frame, caller = call
    check_reply(DATA_METHODS[name], data.run(name, frame, caller))


def test_nothing_was_damaged(world):
    """Runs after the fuzzing above (pytest keeps file order): the store's invariants
    hold and what was written before is intact unless a valid call changed it."""
    core, _, _, d_ino, f_ino = world
    report = core.fsck(m.FsckReq())
    assert report.problems == [], report.problems
    try:
        # What a valid fuzzed call may leave: all of it, a truncated prefix, or nothing
        # (a truncate to 0, a punched hole).
        assert b"hello".startswith(core.block_map(m.BlockMapReq(f_ino)).data)
    except FsError as exc:
        assert exc.errno == errno.ENOENT  # a fuzzed unlink or rename-over is a valid call
