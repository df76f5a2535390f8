"""Query directories: `MNT/.stripefs/query/NAME=VALUE[,NAME=VALUE...]/` shows the files of
the mount that carry those labels (what `stripefs find MNT -l NAME=VALUE ...` prints), so
that a loader that takes a directory (torchvision's ImageFolder, say) reads a labelled
subset without code changes.

The directory mirrors where the files are: it holds the directories that lead to a match
and, for each matching file, a symbolic link to it with a relative target (so it works
wherever the mount is), e.g. `.stripefs/query/split=train/data/train/cat/0.jpg` ->
`../../../../../../data/train/cat/0.jpg`. Everything under `.stripefs` is read-only
(EROFS); `.stripefs` is not listed in the root and shadows a real entry of that name there
(which the library still reaches). Beside `query` it holds two files (control.py):
`prefetch`, the mount's prefetch plan, the one thing under `.stripefs` to write to, and
`cache`, the disk tier's counters.

What it shows while files change: the result of one find, made for the caller when the
query directory is first reached, and again when it is listed (opendir) and the last
result is older than QUERY_FRESH_S. A lookup or an open through it never runs a find, so
a training job opening files by their query paths costs no query. Between two finds, a
link to a file since moved or removed dangles (ENOENT), a file since labelled is not
there, and one since unlabelled still is. A listing in progress keeps the result it began
with. Results are per caller (uid, gid and groups: each finds what it could walk to) and
visible to that uid only (mode 0500).

Virtual nodes have inode numbers from VIRTUAL_BASE up, far above any the metaserver
gives, each stable for the life of the mount for one caller, query and path.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from dataclasses import dataclass, field
from typing import Optional

from stripefs.client import ENTRY_TTL_S, ROOT_INODE, Attr, Client, Ctx, FsError
from stripefs.client import paths as cpaths

from .control import CACHE_NAME, PREFETCH_NAME

log = logging.getLogger("stripefs.fuse")

#: Inode numbers of virtual nodes start here (the metaserver counts from 1).
VIRTUAL_BASE = 1 << 62
#: The control directory at the mount's root, and its query directory.
CONTROL_NAME = b".stripefs"
QUERY_NAME = b"query"
#: A query's result is reused by a listing for this long before it is asked again.
QUERY_FRESH_S = ENTRY_TTL_S
#: Files one query directory shows at most (the rest are left out, and logged).
QUERY_MAX_FILES = 1_000_000
#: Block size reported for virtual nodes.
_BLOCK_SIZE = 4096


@dataclass
class Node:
    """A virtual directory or symbolic link."""

    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    target: bytes = b""  # symbolic links
    children: dict[bytes, int] = field(default_factory=dict)  # directories: name -> inode
    query: Optional["Query"] = None  # the query directory a node belongs to
    made_ns: int = 0


@dataclass
class Query:
    """One query directory of one caller."""

    key: tuple
    labels: dict[str, bytes]
    ctx: Ctx
    node: Node
    found_at: float = 0.0  # monotonic time of the last find (0: never)


def parse_spec(name: bytes) -> Optional[dict[str, bytes]]:
    """`split=train,class=cat` as labels; None if it is not one."""
    labels: dict[str, bytes] = {}
    for part in name.split(b","):
        key, sep, value = part.partition(b"=")
        try:
            text = key.decode()
        except UnicodeDecodeError:
            return None
        if not sep or not text or text in labels:
            return None
        labels[text] = value
    return labels


class Queries:
    """The virtual tree under `.stripefs` of one mount."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._nodes: dict[int, Node] = {}
        self._ids: dict[tuple, int] = {}
        self._queries: dict[tuple, Query] = {}
        made = time.time_ns()
        self.control = self._node(("control",), stat.S_IFDIR | 0o555, made_ns=made)
        self.query_dir = self._node(("query",), stat.S_IFDIR | 0o555, made_ns=made)
        self.control.children[QUERY_NAME] = self.query_dir.ino
        #: the prefetch plan's control file (control.py): anyone may write their plan
        self.prefetch_file = self._node(("prefetch",), stat.S_IFREG | 0o666, made_ns=made)
        self.control.children[PREFETCH_NAME] = self.prefetch_file.ino
        #: what the local disk tier holds (control.py), read-only
        self.cache_file = self._node(("cache",), stat.S_IFREG | 0o444, made_ns=made)
        self.control.children[CACHE_NAME] = self.cache_file.ino

    @staticmethod
    def is_virtual(ino: int) -> bool:
        return ino >= VIRTUAL_BASE

    def _node(self, key: tuple, mode: int, **kw) -> Node:
        ino = self._ids.get(key)
        if ino is None:
            ino = self._ids[key] = VIRTUAL_BASE + len(self._ids)
        node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = Node(ino, mode, **kw)
        else:
            node.mode = mode
            for name, value in kw.items():
                setattr(node, name, value)
        return node

    def attr(self, node: Node) -> Attr:
        if stat.S_ISDIR(node.mode):
            # 2 + subdirectories, as find(1)'s leaf optimisation expects of a directory.
            size, nlink = _BLOCK_SIZE, 2 + sum(stat.S_ISDIR(self._nodes[i].mode) for i in node.children.values())
        else:
            size, nlink = len(node.target), 1
        return Attr(ino=node.ino, mode=node.mode, nlink=nlink, uid=node.uid, gid=node.gid, rdev=0, size=size,
                    atime_ns=node.made_ns, mtime_ns=node.made_ns, ctime_ns=node.made_ns, block_size=_BLOCK_SIZE,
                    replicas=0)

    def get(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise FsError(errno.ESTALE, f"virtual inode {ino} is gone")
        return node

    # ------------------------------------------------------------------ what FUSE asks

    async def lookup(self, parent: int, name: bytes, ctx: Ctx) -> Optional[Node]:
        """The node `name` of virtual directory `parent` (or `.stripefs` of the root); None
        if there is none."""
        if parent == ROOT_INODE:
            return self.control if name == CONTROL_NAME else None
        node = self.get(parent)
        if node is self.query_dir:
            labels = parse_spec(name)
            if labels is None:
                return None
            query = self._query(name, labels, ctx)
            if not query.found_at:
                await self._find(query)
            return query.node
        ino = node.children.get(name)
        return None if ino is None else self._nodes[ino]

    async def opendir(self, ino: int) -> Node:
        """A virtual directory about to be listed: a query directory's result is asked
        again if it is older than QUERY_FRESH_S."""
        node = self.get(ino)
        if not stat.S_ISDIR(node.mode):
            raise FsError(errno.ENOTDIR)
        query = node.query
        if query is not None and node is query.node and time.monotonic() - query.found_at >= QUERY_FRESH_S:
            await self._find(query)
        return node

    def listing(self, node: Node) -> list[tuple[bytes, Node]]:
        return [(name, self._nodes[ino]) for name, ino in node.children.items()]

    def readlink(self, ino: int) -> bytes:
        node = self.get(ino)
        if not stat.S_ISLNK(node.mode):
            raise FsError(errno.EINVAL)
        return node.target

    # ------------------------------------------------------------------ the result of a find

    def _query(self, spec: bytes, labels: dict[str, bytes], ctx: Ctx) -> Query:
        caller = (ctx.uid, ctx.gid, tuple(sorted(ctx.groups)))
        key = (caller, spec)
        query = self._queries.get(key)
        if query is None:
            node = self._node(("q", key), stat.S_IFDIR | 0o500, uid=ctx.uid, gid=ctx.gid)
            query = self._queries[key] = Query(key, labels, Ctx(ctx.uid, ctx.gid, ctx.pid, list(ctx.groups)), node)
            node.query = query
        return query

    async def _find(self, query: Query) -> None:
        """Runs the query's find over the whole mount, then rebuilds its tree at once (a
        find that fails leaves the last result in place)."""
        found: list[bytes] = []
        async for path, _, _ in cpaths.find(self.client, "/", query.labels, ctx=query.ctx):
            if len(found) >= QUERY_MAX_FILES:
                log.warning("query %r: more than %d files; the rest are not shown", query.key[1], QUERY_MAX_FILES)
                break
            found.append(path.lstrip("/").encode(errors="surrogateescape"))
        made = time.time_ns()
        top = query.node
        top.children = {}
        top.made_ns = made
        dirs: dict[bytes, Node] = {b"": top}
        for rel in found:
            where, _, name = rel.rpartition(b"/")
            # From the link's directory (.stripefs/query/SPEC/<its dirs>) back up to the root.
            depth = 3 + rel.count(b"/")
            link = self._node(("q", query.key, rel), stat.S_IFLNK | 0o777, uid=query.ctx.uid, gid=query.ctx.gid,
                              target=b"../" * depth + rel, query=query, made_ns=made)
            self._dir_of(query, dirs, where, made).children[name] = link.ino
        query.found_at = time.monotonic()

    def _dir_of(self, query: Query, dirs: dict[bytes, Node], rel: bytes, made: int) -> Node:
        """The mirrored directory `rel` of a query's tree (made with its parents)."""
        node = dirs.get(rel)
        if node is None:
            parent = self._dir_of(query, dirs, rel.rpartition(b"/")[0], made)
            node = self._node(("q", query.key, rel + b"/"), stat.S_IFDIR | 0o500, uid=query.ctx.uid,
                              gid=query.ctx.gid, query=query, made_ns=made, children={})
            parent.children[rel.rpartition(b"/")[2]] = node.ino
            dirs[rel] = node
        return node
