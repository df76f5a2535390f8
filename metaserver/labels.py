"""Label queries (`find`): the regular files under a directory that carry every label
asked for, found through an index of the extended attributes, not a walk of the files.

A label is a user.* attribute. A directory's label applies to what is under it, down to
anything that sets the same name itself: the *effective* label of a file for a name is its
own, else that of the nearest directory above it that sets the name. A file matches when
its effective label is the one asked for, for every name asked.

How a page is found. One name of the query drives it: of those asked, the one that leads
to the fewest files (the files carrying it themselves and the entries of the directories
carrying it, from their usage counters, found through the index). The files that carry it
effectively are of two disjoint kinds:
  OWN: files that carry it themselves, in a directory whose effective label is not the one
       asked. The index lists the inodes carrying it in inode order.
  INHERITED: the regular files of a directory whose effective label is the one asked (a
       file there that sets the name to another value does not match). The directories
       under the searched one are walked (directories only, through their parent links, a
       query per level), and those with the label are listed in inode order, each in
       cookie order.
The other names are checked against each file's own labels and its directory's effective
ones. The cursor `[driver, kind, inode, cookie]` says where a page ended, so a page costs
what it looks at (at most SCAN_PER_ENTRY rows per entry it may return, plus the directory
walk of the INHERITED kind), never the whole result.

What a caller finds is what it could find walking the tree itself: entries of directories
it may read and search, all the way down from the searched one, and a file that carries a
label asked for itself only if the caller may read that file's attributes (getfattr's
rule). Labels of the directories above the searched one count as they are.

Each page is one transaction and was true at its moment; a file renamed, relabelled or
removed between two pages may be missed or listed twice, as with find(1) over a changing
tree.
"""

from __future__ import annotations

import errno
import stat
from typing import Any, Optional

from stripefs.proto.errors import FsError
from stripefs.proto.messages import FindReply, FindReq, Label

from . import perm
from .base import CoreBase, acl_column, id_list
from .store import LABEL_INDEX_VALUE_BYTES, Row, Tx

#: Rows a page may look at per entry it may return; past that it stops, with its cursor
#: (a page of a sparse match is short, or empty, rather than long in time).
SCAN_PER_ENTRY = 8
#: Rows fetched by one query of a page, at most.
FETCH_ROWS = 2000
#: The two kinds of matching files, in the order a search goes through them.
KIND_OWN, KIND_INHERITED = 0, 1


def label_where(label: Label, table: str = "xattrs") -> tuple[str, list[Any]]:
    """SQL over xattrs (named `table` in the query) for "carries this label", in the shape
    that uses the label index."""
    sql = f"{table}.name = ? AND substr({table}.value, 1, {LABEL_INDEX_VALUE_BYTES}) = ?"
    args: list[Any] = [label.name, label.value[:LABEL_INDEX_VALUE_BYTES]]
    if len(label.value) >= LABEL_INDEX_VALUE_BYTES:
        # A shorter value equal to its first 256 bytes is the whole value; a longer one is not.
        sql += f" AND {table}.value = ?"
        args.append(label.value)
    return sql, args


class LabelOps(CoreBase):
    def find(self, req: FindReq) -> FindReply:
        with self.store.transaction() as tx:
            top = self._dir(tx, req.ino)
            perm.check(top, req.ctx, perm.READ | perm.EXEC, " (find)")
            return _Search(self, tx, req, top).page()


class _Search:
    """One page of one find, with what it learnt about directories on the way."""

    def __init__(self, core: CoreBase, tx: Tx, req: FindReq, top: Row) -> None:
        self.core, self.tx, self.req, self.ctx = core, tx, req, req.ctx
        self.want = {label.name: label.value for label in req.labels}
        self.name_list = "(" + ",".join("?" * len(self.want)) + ")"
        self.names = list(self.want)
        self.budget = req.limit * SCAN_PER_ENTRY
        self.paths: list[bytes] = []  # what the page found: path, inode, size
        self.inos: list[int] = []
        self.sizes: list[int] = []
        self.top = top["ino"]
        self._rows: dict[int, Row] = {self.top: top}  # directory rows
        self._rel: dict[int, Optional[bytes]] = {self.top: b""}  # directory -> its path from top + "/"
        self._eff: dict[int, dict[bytes, bytes]] = {}  # directory -> its effective labels asked for

    # ------------------------------------------------------------------ the page

    def page(self) -> FindReply:
        if self.req.cursor:
            driver, kind, ino, cookie = self.req.cursor
            if not (0 <= driver < len(self.req.labels) and kind in (KIND_OWN, KIND_INHERITED)):
                raise FsError(errno.EINVAL, "find: not a cursor this server gave")
        else:
            driver, kind, ino, cookie = self._driver(), KIND_OWN, 0, 0
        self.driver = self.req.labels[driver]
        if kind == KIND_OWN:
            more, ino = self._own(ino)
            if more:
                return self._reply([driver, KIND_OWN, ino, 0])
            ino, cookie = 0, 0
        more, ino, cookie = self._inherited(ino, cookie)
        return self._reply([driver, KIND_INHERITED, ino, cookie] if more else [])

    def _reply(self, cursor: list[int]) -> FindReply:
        return FindReply(paths=self.paths, inos=self.inos, sizes=self.sizes, cursor=cursor)

    def _found(self, path: bytes, row: Row) -> None:
        self.paths.append(path)
        self.inos.append(row["ino"])
        self.sizes.append(row["size"])

    def _driver(self) -> int:
        """The label that leads to the fewest files: those carrying it themselves, plus the
        entries of the directories carrying it (their usage counters)."""
        if len(self.req.labels) == 1:
            return 0
        counts = []
        for label in self.req.labels:
            where, args = label_where(label)
            counts.append(self.tx.scalar(
                "SELECT COALESCE(SUM(CASE WHEN i.parent IS NULL THEN 1 ELSE i.used_files END), 0)"
                f" FROM xattrs JOIN inodes i ON i.ino = xattrs.ino WHERE {where}", args))
        return counts.index(min(counts))

    def _full(self) -> bool:
        return len(self.paths) >= self.req.limit or self.budget <= 0

    def _fetch(self) -> int:
        return max(1, min(FETCH_ROWS, self.req.limit - len(self.paths), self.budget))

    # ------------------------------------------------------------------ the two kinds

    def _own(self, after: int) -> tuple[bool, int]:
        """Files carrying the driving label themselves, after inode `after`; (more, last
        inode looked at)."""
        where, args = label_where(self.driver)
        while not self._full():
            n = self._fetch()
            inos = [r[0] for r in self.tx.all(
                f"SELECT ino FROM xattrs WHERE {where} AND ino > ? ORDER BY ino LIMIT ?", [*args, after, n])]
            self.budget -= len(inos)
            if not inos:
                return False, after
            files = {r["ino"]: r for r in self.core._inode_rows(self.tx, f"ino IN {id_list(inos)}")}
            links: dict[int, list[tuple[int, bytes]]] = {}
            for r in self.tx.all(f"SELECT ino, parent, name FROM dentries WHERE ino IN {id_list(inos)}"
                                 " ORDER BY cookie"):
                links.setdefault(r["ino"], []).append((r["parent"], bytes(r["name"])))
            own = self._own_labels(inos)
            for ino in inos:
                f = files.get(ino)
                if f is None or not stat.S_ISREG(f["mode"]) or not perm.allowed(f, self.ctx, perm.READ):
                    continue
                for parent, name in links.get(ino, []):
                    rel = self._rel_of(parent)
                    if rel is None:
                        continue
                    eff = self._eff_of(parent)
                    if eff.get(self.driver.name) == self.driver.value:
                        continue  # the INHERITED kind lists it
                    if self._matches(own.get(ino, {}), eff):
                        self._found(rel + name, f)
            after = inos[-1]
            if len(inos) < n:
                return False, after
        return True, after

    def _inherited(self, after_dir: int, after_cookie: int) -> tuple[bool, int, int]:
        """Files of the directories whose effective driving label is the one asked, from
        directory `after_dir` after cookie `after_cookie`; (more, directory, cookie)."""
        dirs = [d for d in self._walk() if d >= after_dir]
        for d in dirs:
            cookie = after_cookie if d == after_dir else 0
            rel = self._rel[d]
            assert rel is not None
            eff = self._eff[d]
            while True:
                if self._full():
                    return True, d, cookie
                n = self._fetch()
                rows = self.tx.all(
                    f"SELECT d.cookie, d.name, i.*, {acl_column('i')} FROM dentries d JOIN inodes i ON i.ino = d.ino"
                    " WHERE d.parent = ? AND d.cookie > ? ORDER BY d.cookie LIMIT ?", (d, cookie, n))
                self.budget -= len(rows)
                files = [r for r in rows if stat.S_ISREG(r["mode"])]
                own = self._own_labels([r["ino"] for r in files if r["xattrs"]])
                for r in files:
                    labels = own.get(r["ino"], {})
                    if not self._matches(labels, eff):
                        continue
                    if labels and not perm.allowed(r, self.ctx, perm.READ):
                        continue  # matched by labels of its own the caller may not read
                    self._found(rel + bytes(r["name"]), r)
                if rows:
                    cookie = rows[-1]["cookie"]
                if len(rows) < n:
                    break
        return False, 0, 0

    # ------------------------------------------------------------------ labels and paths

    def _matches(self, own: dict[bytes, bytes], eff: dict[bytes, bytes]) -> bool:
        for name, value in self.want.items():
            if own.get(name, eff.get(name)) != value:
                return False
        return True

    def _own_labels(self, inos: list[int]) -> dict[int, dict[bytes, bytes]]:
        """inode -> {name: value} of the names asked that it sets itself."""
        got: dict[int, dict[bytes, bytes]] = {}
        if inos:
            for r in self.tx.all(f"SELECT ino, name, value FROM xattrs WHERE ino IN {id_list(inos)}"
                                 f" AND name IN {self.name_list}", self.names):
                got.setdefault(r["ino"], {})[bytes(r["name"])] = bytes(r["value"])
        return got

    def _dir_row(self, ino: int) -> Row:
        row = self._rows.get(ino)
        if row is None:
            row = self._rows[ino] = self.core._inode(self.tx, ino)
        return row

    def _chain(self, ino: int, memo: dict) -> list[int]:
        """`ino` and its ancestors up to (not including) the first `memo` knows, or the root."""
        chain = []
        while ino not in memo:
            chain.append(ino)
            parent = self._dir_row(ino)["parent"]
            if parent is None or parent == ino:
                break
            ino = parent
        return chain

    def _eff_of(self, ino: int) -> dict[bytes, bytes]:
        """The effective labels of directory `ino` for the names asked."""
        chain = self._chain(ino, self._eff)
        for d in reversed(chain):
            parent = self._dir_row(d)["parent"]
            base = self._eff.get(parent, {}) if parent != d else {}
            self._eff[d] = {**base, **self._own_labels([d]).get(d, {})} if self._dir_row(d)["xattrs"] else base
        return self._eff[ino]

    def _rel_of(self, ino: int) -> Optional[bytes]:
        """Directory `ino`'s path from the searched one, with a trailing "/"; None if it is
        not under it or the caller could not walk down to it."""
        chain = self._chain(ino, self._rel)
        if chain:
            last = chain[-1]
            if self._dir_row(last)["parent"] in (None, last):
                self._rel[chain.pop()] = None  # the root: the search began below it
        for d in reversed(chain):
            row = self._dir_row(d)
            base = self._rel.get(row["parent"])
            if base is None or row["nlink"] == 0 or not perm.allowed(row, self.ctx, perm.READ | perm.EXEC):
                self._rel[d] = None
                continue
            name = self.tx.scalar("SELECT name FROM dentries WHERE ino = ?", (d,))
            self._rel[d] = None if name is None else base + bytes(name) + b"/"
        return self._rel[ino]

    def _walk(self) -> list[int]:
        """The directories under the searched one (itself included) the caller may walk
        down to whose effective driving label is the one asked, in inode order; their paths
        and effective labels are remembered on the way."""
        self._eff_of(self.top)
        found, level = [], [self.top]
        while level:
            found += [d for d in level if self._eff[d].get(self.driver.name) == self.driver.value]
            children: list[Row] = []
            for i in range(0, len(level), FETCH_ROWS):
                part = id_list(level[i:i + FETCH_ROWS])
                children += self.core._inode_rows(self.tx, f"parent IN {part} AND ino <> parent AND nlink > 0")
            visible = [c for c in children if perm.allowed(c, self.ctx, perm.READ | perm.EXEC)]
            names: dict[int, bytes] = {}
            labels: dict[int, dict[bytes, bytes]] = {}
            for i in range(0, len(visible), FETCH_ROWS):
                part_inos = [c["ino"] for c in visible[i:i + FETCH_ROWS]]
                names.update((r["ino"], bytes(r["name"])) for r in self.tx.all(
                    f"SELECT ino, name FROM dentries WHERE ino IN {id_list(part_inos)}"))
                labels.update(self._own_labels([c["ino"] for c in visible[i:i + FETCH_ROWS] if c["xattrs"]]))
            level = []
            for c in visible:
                ino, parent = c["ino"], c["parent"]
                base = self._rel.get(parent)
                if base is None or ino not in names:
                    continue
                self._rows[ino] = c
                self._rel[ino] = base + names[ino] + b"/"
                self._eff[ino] = {**self._eff[parent], **labels.get(ino, {})}
                level.append(ino)
        return sorted(found)
