"""Label queries in the metadata core (metaserver/labels.py), in-process on both engines:
`find` against an oracle that walks the whole tree and works out every file's effective
labels by the rule (own label, else the nearest directory above that sets the name), over
random trees, labels and queries, in pages of every size; long values; what a caller who
may not read or search finds; the index itself and the migration that adds it."""

from __future__ import annotations

import errno
import random
import stat

import pytest

from stripefs.metaserver.labels import KIND_INHERITED
from stripefs.metaserver.store import LABEL_INDEX, SCHEMA_VERSION
from stripefs.proto.errors import FsError
from stripefs.proto.messages import (Ctx, FindReq, InodeReq, Label, LinkReq, ReaddirReq, RemoveReq, RenameReq,
                                     SetattrReq, SymlinkReq, XattrReq)
from stripefs.proto.types import ROOT_INODE

from engines import meta_engine, open_meta_store  # noqa: F401 - fixtures
from test_meta_core import ROOT, USER, Env, downgrade, env  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(120)


def label(env: Env, ino: int, name: str, value: bytes | str, ctx: Ctx = ROOT) -> None:
    value = value.encode() if isinstance(value, str) else value
    env.core.setxattr(XattrReq(ino=ino, name=b"user." + name.encode(), value=value, ctx=ctx))


def find(env: Env, top: int, labels: dict, limit: int = 1000, ctx: Ctx = ROOT) -> list[bytes]:
    """Every path a find returns, following its cursor to the end (a page at a time)."""
    want = [Label(name=b"user." + k.encode(), value=v.encode() if isinstance(v, str) else v) for k, v in labels.items()]
    req = FindReq(ino=top, labels=want, limit=limit, ctx=ctx)
    assert req.valid() is None
    got: list[bytes] = []
    for _ in range(100_000):
        reply = env.core.find(req)
        assert reply.valid() is None
        assert len(reply.paths) <= limit + 4  # a file's other links may come with it
        got += reply.paths
        for ino, size in zip(reply.inos, reply.sizes):
            attr = env.getattr(ino)
            assert stat.S_ISREG(attr.mode) and attr.size == size
        if not reply.cursor:
            return got
        req = FindReq(ino=top, labels=want, limit=limit, ctx=ctx, cursor=reply.cursor)
    raise AssertionError("find did not end")


def oracle(env: Env, top_path: bytes, labels: dict) -> list[bytes]:
    """The files under `top_path` whose effective labels are `labels`, by a full walk."""
    want = {b"user." + k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in labels.items()}

    def own(ino: int) -> dict[bytes, bytes]:
        names = env.core.listxattr(InodeReq(ino=ino)).names
        return {n: env.core.getxattr(XattrReq(ino=ino, name=n, ctx=ROOT)).value for n in names if n.startswith(b"user.")}

    out = []

    def walk(ino: int, path: bytes, eff: dict[bytes, bytes]) -> None:
        for e in env.core.readdir(ReaddirReq(ino=ino, limit=100_000)).entries:
            p = path + e.name
            if stat.S_ISDIR(e.attr.mode):
                walk(e.attr.ino, p + b"/", {**eff, **own(e.attr.ino)})
            elif stat.S_ISREG(e.attr.mode):
                mine = {**eff, **own(e.attr.ino)}
                if all(mine.get(k) == v for k, v in want.items()) and p.startswith(top_path):
                    out.append(p[len(top_path):])

    walk(ROOT_INODE, b"/", own(ROOT_INODE))
    return sorted(out)


def test_directory_labels_apply_below_and_a_file_own_label_wins(env):
    data = env.mkdir(ROOT_INODE, b"data")
    ids = {}
    for split in ("train", "val"):
        s = env.mkdir(data.ino, split.encode())
        label(env, s.ino, "split", split)
        for cls in ("cat", "dog"):
            c = env.mkdir(s.ino, cls.encode())
            label(env, c.ino, "class", cls)
            for i in range(3):
                ids[f"{split}/{cls}/{i}"] = env.create(c.ino, f"{i}.jpg".encode()).ino
    label(env, ids["train/cat/1"], "class", "dog")  # mislabelled: its own label wins
    label(env, ids["train/dog/2"], "class", "cat")
    got = sorted(find(env, data.ino, {"split": "train", "class": "cat"}))
    assert got == [b"train/cat/0.jpg", b"train/cat/2.jpg", b"train/dog/2.jpg"]
    assert got == oracle(env, b"/data/", {"split": "train", "class": "cat"})
    # From inside: paths are relative to the searched directory; labels above it count.
    train = env.lookup(data.ino, b"train")
    assert sorted(find(env, train.ino, {"class": "dog"})) == [b"cat/1.jpg", b"dog/0.jpg", b"dog/1.jpg"]
    assert find(env, data.ino, {"split": "test"}) == []
    # The root's own label applies to everything.
    label(env, ROOT_INODE, "owner", "team-a")
    assert len(find(env, ROOT_INODE, {"owner": "team-a", "split": "val"})) == 6


def test_changes_are_seen_by_the_next_find(env):
    d = env.mkdir(ROOT_INODE, b"d")
    e = env.mkdir(ROOT_INODE, b"e")
    label(env, d.ino, "split", "train")
    f = env.create(d.ino, b"f")
    env.create(d.ino, b"g")
    assert sorted(find(env, ROOT_INODE, {"split": "train"})) == [b"d/f", b"d/g"]
    env.core.rename(RenameReq(parent=d.ino, name=b"f", new_parent=e.ino, new_name=b"f", ctx=ROOT))
    assert find(env, ROOT_INODE, {"split": "train"}) == [b"d/g"]
    label(env, f.ino, "split", "train")  # its own now
    env.core.link(LinkReq(ino=f.ino, new_parent=d.ino, new_name=b"f2", ctx=ROOT))  # and a second name
    assert sorted(find(env, ROOT_INODE, {"split": "train"})) == [b"d/f2", b"d/g", b"e/f"]
    env.core.removexattr(XattrReq(ino=d.ino, name=b"user.split", ctx=ROOT))
    assert sorted(find(env, ROOT_INODE, {"split": "train"})) == [b"d/f2", b"e/f"]
    env.core.unlink(RemoveReq(parent=e.ino, name=b"f", ctx=ROOT))
    env.core.unlink(RemoveReq(parent=d.ino, name=b"f2", ctx=ROOT))
    assert find(env, ROOT_INODE, {"split": "train"}) == []
    # A directory moved under a labelled one inherits from its new place.
    label(env, e.ino, "split", "val")
    sub = env.mkdir(d.ino, b"sub")
    env.create(sub.ino, b"x")
    assert find(env, ROOT_INODE, {"split": "val"}) == []
    env.core.rename(RenameReq(parent=d.ino, name=b"sub", new_parent=e.ino, new_name=b"sub", ctx=ROOT))
    assert find(env, ROOT_INODE, {"split": "val"}) == [b"e/sub/x"]


def test_only_regular_files_and_no_symlink_is_followed(env):
    d = env.mkdir(ROOT_INODE, b"d")
    label(env, d.ino, "k", "v")
    env.create(d.ino, b"f")
    env.create(d.ino, b"fifo", mode=stat.S_IFIFO | 0o644)
    env.core.symlink(SymlinkReq(parent=ROOT_INODE, name=b"link", target=b"d", ctx=ROOT))
    env.mkdir(d.ino, b"empty")
    assert find(env, ROOT_INODE, {"k": "v"}) == [b"d/f"]


@pytest.mark.parametrize("length", [255, 256, 257, 4000])
def test_long_values_are_compared_whole(env, length):
    a, b = b"a" * length, b"a" * (length - 1) + b"b"
    d = env.mkdir(ROOT_INODE, b"d")
    label(env, env.create(d.ino, b"x").ino, "blob", a)
    label(env, env.create(d.ino, b"y").ino, "blob", b)
    label(env, env.create(d.ino, b"z").ino, "blob", a + b"more")
    assert find(env, ROOT_INODE, {"blob": a}) == [b"d/x"]
    assert find(env, ROOT_INODE, {"blob": b}) == [b"d/y"]


def test_random_trees_against_the_oracle_in_pages_of_every_size(env):
    rng = random.Random(1234)
    dirs = [(ROOT_INODE, b"/")]
    keys = {"a": ["1", "2"], "b": ["x", "y", "z"], "c": ["on"]}
    files = []
    for i in range(40):
        parent, path = rng.choice(dirs)
        d = env.mkdir(parent, f"d{i}".encode())
        dirs.append((d.ino, path + f"d{i}/".encode()))
        if rng.random() < 0.5:
            k = rng.choice(list(keys))
            label(env, d.ino, k, rng.choice(keys[k]))
    for i in range(200):
        parent, path = rng.choice(dirs)
        f = env.create(parent, f"f{i}".encode())
        files.append(f.ino)
        for k in keys:
            if rng.random() < 0.3:
                label(env, f.ino, k, rng.choice(keys[k]))
    for i in range(10):  # a few second names
        parent, _ = rng.choice(dirs)
        env.core.link(LinkReq(ino=rng.choice(files), new_parent=parent, new_name=f"h{i}".encode(), ctx=ROOT))
    queries = [{"a": "1"}, {"b": "y"}, {"a": "2", "b": "x"}, {"a": "1", "b": "z", "c": "on"}, {"c": "on"}]
    for q in queries:
        for top, top_path in [dirs[0], *rng.sample(dirs[1:], 3)]:
            want = oracle(env, top_path, q)
            for limit in (1, 2, 7, 1000):
                got = find(env, top, q, limit=limit)
                assert len(got) == len(set(got)), (q, top_path, limit)
                assert sorted(got) == want, (q, top_path, limit)


def test_what_a_caller_may_not_read_or_search_is_not_found(env):
    env.open_root()
    pub = env.mkdir(ROOT_INODE, b"pub", ctx=USER)
    label(env, pub.ino, "k", "v", ctx=USER)
    env.create(pub.ino, b"mine", ctx=USER)
    secret = env.mkdir(pub.ino, b"secret", mode=0o700)  # root's, closed
    env.create(secret.ino, b"hidden")
    # Files of root's that others may not read: found through the directory's label (their
    # names are in a listing USER may read), not through a label of their own it asks for.
    env.create(pub.ino, b"closed", mode=stat.S_IFREG | 0o600)
    extra = env.create(pub.ino, b"closed-extra", mode=stat.S_IFREG | 0o600)
    label(env, extra.ino, "extra", "1")
    own = env.create(pub.ino, b"closed-own", mode=stat.S_IFREG | 0o600)
    label(env, own.ino, "k", "v")
    assert sorted(find(env, pub.ino, {"k": "v"}, ctx=USER)) == [b"closed", b"closed-extra", b"mine"]
    assert sorted(find(env, pub.ino, {"k": "v"})) == [b"closed", b"closed-extra", b"closed-own", b"mine",
                                                      b"secret/hidden"]
    assert find(env, pub.ino, {"extra": "1"}, ctx=USER) == []
    assert find(env, pub.ino, {"extra": "1"}) == [b"closed-extra"]
    with pytest.raises(FsError) as e:
        env.core.find(FindReq(ino=secret.ino, labels=[Label(name=b"user.k", value=b"v")], ctx=USER))
    assert e.value.errno == errno.EACCES
    env.core.setattr(SetattrReq(ino=pub.ino, ctx=USER, mode=0o311))  # search, no read: not listed
    assert find(env, ROOT_INODE, {"k": "v"}, ctx=USER) == []


def test_requests_are_checked():
    def valid(**kw):
        return FindReq(**{"ino": 1, "labels": [Label(name=b"user.k", value=b"v")], **kw}).valid()

    assert valid() is None
    assert valid(labels=[]) is not None
    assert valid(labels=[Label(name=b"trusted.k", value=b"v")]) is not None
    assert valid(labels=[Label(name=b"user.", value=b"v")]) is not None
    assert valid(labels=[Label(name=b"user.k", value=b"v"), Label(name=b"user.k", value=b"w")]) is not None
    assert valid(labels=[Label(name=b"user.k%d" % i, value=b"v") for i in range(17)]) is not None
    assert valid(cursor=[1, 2]) is not None
    assert valid(limit=0) is not None


def test_a_forged_cursor_is_refused(env):
    label(env, ROOT_INODE, "k", "v")
    for cursor in ([5, 0, 0, 0], [0, 7, 0, 0]):
        with pytest.raises(FsError) as e:
            env.core.find(FindReq(ino=ROOT_INODE, labels=[Label(name=b"user.k", value=b"v")], cursor=cursor))
        assert e.value.errno == errno.EINVAL
    # A cursor pointing anywhere else is only a place to resume from.
    reply = env.core.find(FindReq(ino=ROOT_INODE, labels=[Label(name=b"user.k", value=b"v")],
                                  cursor=[0, KIND_INHERITED, 10**12, 10**12]))
    assert reply.paths == [] and reply.cursor == []


def test_the_label_index_is_in_both_schemas_and_used(env):
    from stripefs.metaserver import store_pg, store_sqlite

    for schema in (store_sqlite.SCHEMA_PATH, store_pg.SCHEMA_PATH):
        assert LABEL_INDEX in " ".join(schema.read_text().split()), schema
    if env.core.store.engine == "sqlite":
        from stripefs.metaserver.labels import label_where

        where, args = label_where(Label(name=b"user.k", value=b"v"))
        with env.core.store.transaction() as tx:
            plan = " ".join(str(tuple(r)) for r in tx.all(
                f"EXPLAIN QUERY PLAN SELECT ino FROM xattrs WHERE {where} AND ino > ? ORDER BY ino LIMIT 10", [*args, 0]))
        assert "xattrs_by_value" in plan and "TEMP B-TREE" not in plan, plan


def test_version_11_database_gets_the_label_index(env):
    d = env.mkdir(ROOT_INODE, b"d")
    label(env, env.create(d.ino, b"f").ino, "k", "v")
    downgrade(env, 11)
    assert env.core.store.schema_version() == SCHEMA_VERSION
    assert find(env, ROOT_INODE, {"k": "v"}) == [b"d/f"]


def test_the_label_leading_to_fewest_files_drives(env):
    """One directory labelled a=1 holds 30 files, three of which carry b=1 themselves: b
    leads to 3 files, a to 30 (though a is carried by one inode only), so b drives."""
    d = env.mkdir(ROOT_INODE, b"d")
    label(env, d.ino, "a", "1")
    for i in range(30):
        f = env.create(d.ino, f"f{i}".encode())
        if i % 10 == 0:
            label(env, f.ino, "b", "1")
    want = [Label(name=b"user.a", value=b"1"), Label(name=b"user.b", value=b"1")]
    reply = env.core.find(FindReq(ino=ROOT_INODE, labels=want, limit=1))
    assert reply.cursor[0] == 1, reply.cursor
    assert sorted(find(env, ROOT_INODE, {"a": "1", "b": "1"})) == [b"d/f0", b"d/f10", b"d/f20"]
