"""POSIX ACLs without a mount: the xattr format and its checks, the access algorithm, and
the metaserver keeping ACLs and modes in step (setfacl, chmod, inheritance, umask)."""

from __future__ import annotations

import errno
import stat

import pytest

from stripefs.metaserver import acl
from stripefs.metaserver.acl import GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ, Entry
from stripefs.proto.errors import FsError
from stripefs.proto.messages import Ctx, MkdirReq, MknodReq, SetattrReq, XattrReq
from stripefs.proto.types import ROOT_INODE
from engines import meta_engine, open_meta_store  # noqa: F401 - fixtures
from test_meta_core import Env, fails

pytestmark = pytest.mark.timeout(60)

ALICE, BOB = Ctx(uid=1000, gid=1000), Ctx(uid=2000, gid=2000)


@pytest.fixture
def env(open_meta_store):
    e = Env(open_meta_store)
    yield e
    e.core.close()


def make(*entries: tuple) -> bytes:
    return acl.encode(tuple(Entry(*e) for e in entries))


BASE = ((USER_OBJ, 6), (GROUP_OBJ, 4), (OTHER, 0))
WITH_BOB = ((USER_OBJ, 6), (USER, 6, 2000), (GROUP_OBJ, 4), (MASK, 6), (OTHER, 0))


def test_format_round_trips_and_bad_acls_are_einval():
    value = make(*WITH_BOB)
    assert acl.encode(acl.parse(value)) == value
    bad = [
        b"",
        value[:-1],
        b"\x01\x00\x00\x00" + value[4:],  # version 1
        make((USER_OBJ, 6), (GROUP_OBJ, 4)),  # no other
        make((USER_OBJ, 6), (USER, 6, 2000), (GROUP_OBJ, 4), (OTHER, 0)),  # named, no mask
        make((USER_OBJ, 6), (USER, 6, 2000), (USER, 4, 2000), (GROUP_OBJ, 4), (MASK, 6), (OTHER, 0)),
        make((GROUP_OBJ, 4), (USER_OBJ, 6), (OTHER, 0)),  # out of order
        make((USER_OBJ, 8), (GROUP_OBJ, 4), (OTHER, 0)),  # not rwx
    ]
    for value in bad:
        with pytest.raises(FsError) as info:
            acl.parse(value)
        assert info.value.errno == errno.EINVAL


def test_access_algorithm():
    entries = acl.parse(make((USER_OBJ, 6), (USER, 7, 2000), (GROUP_OBJ, 4), (GROUP, 2, 3000),
                             (MASK, 6), (OTHER, 1)))
    allows = lambda uid, gids, want: acl.allows(entries, 1000, 1000, uid, set(gids), want)  # noqa: E731
    assert allows(1000, [1000], 6) and not allows(1000, [1000], 1)  # owner: its entry, no mask
    assert allows(2000, [9], 6) and not allows(2000, [9], 1)  # named user, masked (rwx & rw-)
    assert allows(5, [1000], 4) and not allows(5, [1000], 2)  # owning group
    assert allows(5, [1000, 3000], 2)  # one matching group entry that grants is enough
    assert not allows(5, [1000, 3000], 1)  # groups matched, none grants: other is not asked
    assert allows(5, [7], 1) and not allows(5, [7], 4)  # other


def test_new_inodes_take_the_default_masked_by_the_mode():
    default = acl.parse(make((USER_OBJ, 7), (USER, 7, 2000), (GROUP_OBJ, 5), (MASK, 7), (OTHER, 0)))
    access, mode = acl.for_new_inode(default, stat.S_IFREG | 0o666)
    assert mode == stat.S_IFREG | 0o660
    assert (USER, 7, 2000) in [(e.tag, e.perm, e.id) for e in access] and (MASK, 6) in [(e.tag, e.perm) for e in access]
    minimal, mode = acl.for_new_inode(acl.parse(make((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 5))), 0o644)
    assert minimal is None and mode == 0o644


def test_setting_an_access_acl_sets_the_mode_and_a_minimal_one_is_not_kept(env):
    env.open_root()
    f = env.create(ROOT_INODE, b"f", ctx=ALICE, mode=stat.S_IFREG | 0o600)
    env.core.setxattr(XattrReq(ino=f.ino, name=acl.ACCESS, value=make(*WITH_BOB), ctx=ALICE))
    assert stat.S_IMODE(env.getattr(f.ino).mode) == 0o660  # group bits: the mask
    assert env.getattr(f.ino).xattrs == 1
    env.core.setattr(SetattrReq(ino=f.ino, ctx=ALICE, mode=0o640))
    stored = acl.parse(env.core.getxattr(XattrReq(ino=f.ino, name=acl.ACCESS, ctx=BOB)).value)
    assert [e.perm for e in stored if e.tag == MASK] == [4]  # chmod moved the mask
    env.core.setxattr(XattrReq(ino=f.ino, name=acl.ACCESS, value=make(*BASE), ctx=ALICE))
    fails(errno.ENODATA, env.core.getxattr, XattrReq(ino=f.ino, name=acl.ACCESS, ctx=ALICE))
    assert env.getattr(f.ino).xattrs == 0 and stat.S_IMODE(env.getattr(f.ino).mode) == 0o640
    fails(errno.EPERM, env.core.setxattr, XattrReq(ino=f.ino, name=acl.ACCESS, value=make(*WITH_BOB), ctx=BOB))
    fails(errno.EACCES, env.core.setxattr, XattrReq(ino=f.ino, name=acl.DEFAULT, value=make(*BASE), ctx=ALICE))
    fails(errno.EINVAL, env.core.setxattr, XattrReq(ino=f.ino, name=acl.ACCESS, value=b"junk", ctx=ALICE))


def test_umask_applies_only_without_a_default_acl(env):
    env.open_root()
    plain = env.core.mkdir(MkdirReq(ROOT_INODE, b"plain", 0o777, ROOT_CTX, umask=0o022)).attr
    assert stat.S_IMODE(plain.mode) == 0o755
    d = env.core.mkdir(MkdirReq(ROOT_INODE, b"d", 0o777, ROOT_CTX, umask=0o022)).attr
    default = make((USER_OBJ, 7), (USER, 7, 2000), (GROUP_OBJ, 7), (MASK, 7), (OTHER, 0))
    env.core.setxattr(XattrReq(ino=d.ino, name=acl.DEFAULT, value=default, ctx=ROOT_CTX))
    f = env.core.mknod(MknodReq(d.ino, b"f", stat.S_IFREG | 0o666, ROOT_CTX, umask=0o077)).attr
    assert stat.S_IMODE(f.mode) == 0o660  # the default ACL decided, not the umask
    sub = env.core.mkdir(MkdirReq(d.ino, b"sub", 0o777, ROOT_CTX, umask=0o077)).attr
    assert env.core.getxattr(XattrReq(ino=sub.ino, name=acl.DEFAULT, ctx=ROOT_CTX)).value == default
    # Bob, named in the inherited ACL, may create in the subdirectory; Alice may not.
    env.core.mknod(MknodReq(sub.ino, b"bobs", stat.S_IFREG | 0o644, BOB))
    fails(errno.EACCES, env.core.mknod, MknodReq(sub.ino, b"alices", stat.S_IFREG | 0o644, ALICE))


ROOT_CTX = Ctx(uid=0, gid=0)
