-- stripefs metadata store: the single source of truth for the namespace, the block maps,
-- client sessions and the data server registry.
--
-- Conventions: times are integer nanoseconds since the epoch (*_ns); sizes are bytes;
-- names are BLOBs (file names are bytes, not text, and compare with memcmp).
-- Ids that leave this database (inode numbers, block ids, server ids, session ids) are
-- never reused: AUTOINCREMENT for rows, the `counters` table for block ids. A reused
-- inode number would let a client's stale cache alias a new file; a reused block id would
-- let an old write token or a delayed garbage deletion hit new data.
--
-- The store applies this file once to an empty database and records SCHEMA_VERSION
-- (store.py) in PRAGMA user_version. Change the schema only together with that number.

-- One row per inode (file, directory, symlink, FIFO, socket, device node).
CREATE TABLE inodes (
    ino         INTEGER PRIMARY KEY AUTOINCREMENT,  -- inode number; the root is 1
    mode        INTEGER NOT NULL,   -- S_IFMT type bits | permission bits (07777)
    uid         INTEGER NOT NULL,   -- owner
    gid         INTEGER NOT NULL,   -- group
    rdev        INTEGER NOT NULL DEFAULT 0,  -- device number of S_IFCHR/S_IFBLK nodes
    nlink       INTEGER NOT NULL,   -- hard links; directories: 2 + subdirectories; 0 while an
                                    -- unlinked inode is still open by some session
    size        INTEGER NOT NULL DEFAULT 0,  -- regular files: logical length; symlinks:
                                             -- length of the target; directories: 4096
    atime_ns    INTEGER NOT NULL,   -- last access
    mtime_ns    INTEGER NOT NULL,   -- last content change
    ctime_ns    INTEGER NOT NULL,   -- last inode change
    block_size  INTEGER NOT NULL,   -- bytes per block of this file; on a directory, the
                                    -- block size that files created in it inherit
    replicas    INTEGER NOT NULL DEFAULT 0,  -- replica count (0 = the cluster default); on a
                                             -- directory, inherited by new entries
    generation  INTEGER NOT NULL DEFAULT 0,  -- files: bumped on every content change
                                             -- (commit, truncate); directories: on every
                                             -- entry change (add, remove, rename). Clients
                                             -- revalidate page caches and listings by it
    xattrs      INTEGER NOT NULL DEFAULT 0,  -- rows in xattrs for this inode: a client that
                                             -- sees 0 answers getxattr without a round trip
                                             -- (ls -l asks for ACLs and SELinux labels)
    inline_max  INTEGER NOT NULL DEFAULT 65536,  -- files: block 0 is kept in inline_data when
                                                 -- it holds at most this many bytes (0: never);
                                                 -- directories: inherited by new entries
    used_files  INTEGER NOT NULL DEFAULT 0,  -- directories: entries in it that are not
                                             -- directories (a file with two links here: 2)
    used_bytes  INTEGER NOT NULL DEFAULT 0,  -- directories: the sizes of those entries, summed;
                                             -- `du` adds these up over a subtree's directories
                                             -- (base.py _touch_dir / _resized keep them)
    parent      INTEGER REFERENCES inodes(ino),  -- directories only: the directory holding
                                                 -- it (root: itself); walked to refuse
                                                 -- rename cycles and to answer ".."
    target      BLOB                -- symlinks only: the link target, uninterpreted
);
-- Deleting an inode makes SQLite check that no directory names it as `parent`: without an
-- index that check scanned every inode (an unlink cost 2.2 ms with 30,000 inodes, 0.1 ms
-- with it). Partial: only directories have a parent, files add nothing to it.
CREATE INDEX inodes_by_parent ON inodes(parent) WHERE parent IS NOT NULL;
-- Files unlinked and not yet purged (base.py `_purge_if_free`: a file with blocks is kept
-- for a while after its last link goes, for readers whose opens were not recorded), by
-- when they lost it (ctime_ns); the sweep purges them. (store.py UNLINKED_INDEX)
CREATE INDEX inodes_unlinked ON inodes(ctime_ns) WHERE nlink = 0;

-- Directory entries. The rowid is the readdir cookie: entries are listed in cookie order
-- and a listing resumes after a cookie, so it stays correct while the directory changes
-- (a new entry gets a larger cookie; a removed one simply is not there any more).
CREATE TABLE dentries (
    cookie  INTEGER PRIMARY KEY AUTOINCREMENT,  -- readdir offset; never reused
    parent  INTEGER NOT NULL REFERENCES inodes(ino),  -- the directory
    name    BLOB NOT NULL,                            -- entry name, 1..255 bytes
    ino     INTEGER NOT NULL REFERENCES inodes(ino),  -- the inode it names
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_ino ON dentries(ino);
-- (parent, cookie) order: a readdir page is a range scan from the cookie it resumes after.
-- Without it each page sorted the whole directory (a listing of N entries cost N^2 / page).
CREATE INDEX dentries_by_parent ON dentries(parent);

-- Block 0 of small files, kept here instead of on data servers (Lustre's data-on-MDT):
-- writing a small file is a create and a commit, reading it one open. A file has either
-- a row here or a block 0 in `blocks`, never both; its other blocks (if it was extended
-- past block 0 without rewriting it) are ordinary blocks. Like a stored block, bytes
-- past `data` up to the file size read as zeros.
CREATE TABLE inline_data (
    ino     INTEGER PRIMARY KEY REFERENCES inodes(ino) ON DELETE CASCADE,  -- the file
    data    BLOB NOT NULL,       -- block 0's bytes, at most the file's inline_max (and never
                                 -- more than its block size); never empty (no row instead)
    crc32c  INTEGER NOT NULL     -- CRC32C of data, checked on every open and by fsck
);

-- Extended attributes (user.*, trusted.*, security.*). The virtual layout attributes
-- (stripefs.block_size, stripefs.replicas) are columns of inodes, not rows here.
CREATE TABLE xattrs (
    ino    INTEGER NOT NULL REFERENCES inodes(ino) ON DELETE CASCADE,  -- owner inode
    name   BLOB NOT NULL,   -- full name with its namespace prefix
    value  BLOB NOT NULL,   -- value, up to 64 KiB
    PRIMARY KEY (ino, name)
);
-- Label queries (labels.py): the attributes with a given name and value, in inode order.
-- A value is indexed by its first 256 bytes (a longer one is compared in full after), so
-- that a 64 KiB value still fits an index entry.
CREATE INDEX xattrs_by_value ON xattrs(name, substr(value, 1, 256), ino);

-- The data server registry. A server keeps its id across restarts (matched by node_id,
-- the stable id of its data directory) while its address may change.
CREATE TABLE servers (
    server_id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- id handed out by register
    node_id            TEXT NOT NULL UNIQUE,  -- stable id of the server's data directory
    address            TEXT NOT NULL,         -- host:port clients reach it at (latest)
    capacity_bytes     INTEGER NOT NULL DEFAULT 0,  -- size of its file system
    free_bytes         INTEGER NOT NULL DEFAULT 0,  -- free there
    used_bytes         INTEGER NOT NULL DEFAULT 0,  -- taken by stored blocks
    blocks             INTEGER NOT NULL DEFAULT 0,  -- blocks stored
    last_heartbeat_ns  INTEGER NOT NULL,            -- when we last heard from it
    report_wanted_ns   INTEGER,                     -- set at (re)register: a full block report
                                                    -- is wanted; the time it was first asked
                                                    -- for (NULL: none wanted)
    identity           TEXT                         -- the credential (role:name) that registered
                                                    -- it first: only that one may act as it
);

-- Block maps: which stored block holds each block-sized piece of a file. A stored block
-- is immutable; rewriting a piece commits a new block id and sends the old one to garbage.
CREATE TABLE blocks (
    ino       INTEGER NOT NULL REFERENCES inodes(ino) ON DELETE CASCADE,  -- the file
    idx       INTEGER NOT NULL,  -- position in the file, in blocks
    block_id  INTEGER NOT NULL UNIQUE,  -- id of the stored block
    length    INTEGER NOT NULL,  -- valid bytes in it; bytes past it (up to the file size)
                                 -- read as zeros, which is how truncate+extend reads clean
    digest    BLOB,              -- digest of the block as written, from the writer
                                 -- (proto/integrity.py): readers check what data servers send
                                 -- against it; NULL for blocks committed before digests were
    stored    INTEGER,           -- bytes of the block as written (what the digest describes)
                                 -- once a truncate clamped `length` below it; NULL: `length`
    PRIMARY KEY (ino, idx)
);

-- Where the replicas of each committed block live.
CREATE TABLE replicas (
    block_id   INTEGER NOT NULL REFERENCES blocks(block_id) ON DELETE CASCADE,
    server_id  INTEGER NOT NULL REFERENCES servers(server_id),
    rank       INTEGER NOT NULL,  -- placement order from the allocation: 0 is the primary,
                                  -- which readers try first, so consecutive blocks read from
                                  -- different servers (striping)
    created_ns INTEGER NOT NULL DEFAULT 0,  -- when the row was added; a block report only
                                            -- drops rows older than its request, so a copy
                                            -- stored while the server was listing is kept
    PRIMARY KEY (block_id, server_id)
);

-- Client sessions (one per mount or library client). Open files hang off a session, so
-- a client that dies without closing releases them when its lease runs out.
CREATE TABLE sessions (
    session_id     INTEGER PRIMARY KEY AUTOINCREMENT,  -- id handed out by open_session
    host           TEXT NOT NULL,     -- client host name (status, logs)
    mountpoint     TEXT NOT NULL,     -- mount point or label
    created_ns     INTEGER NOT NULL,  -- when it was opened
    last_renew_ns  INTEGER NOT NULL,  -- last renew; expired after 3 leases of silence
    owner          TEXT               -- the credential (role:name) that opened it: only it
                                      -- (or an admin) may use, renew or close it
);

-- Open files per session. An inode whose nlink dropped to 0 lives on while any row here
-- names it, and is purged by the last release (or the close of the last session).
CREATE TABLE opens (
    session_id  INTEGER NOT NULL REFERENCES sessions(session_id),
    ino         INTEGER NOT NULL REFERENCES inodes(ino),
    count       INTEGER NOT NULL,  -- open handles of this session on this inode (> 0)
    writable    INTEGER NOT NULL DEFAULT 0,  -- 1 once one of them was opened for writing (or
                                             -- created): only then may the session allocate
                                             -- and commit the file's data or ftruncate it
    PRIMARY KEY (session_id, ino)
);
CREATE INDEX opens_by_ino ON opens(ino);

-- Locks (metaserver/locks.py), each range of an owner one row, merged and split as Linux
-- does. They belong to a session: its close or expiry drops them. Granted and released
-- durably, so a metaserver restart forgets none that a client was told it holds.
CREATE TABLE locks (
    ino         INTEGER NOT NULL,
    session_id  INTEGER NOT NULL REFERENCES sessions(session_id),
    owner       INTEGER NOT NULL,  -- lock owner within the session (signed 64-bit)
    kind        INTEGER NOT NULL,  -- 0: a record lock (fcntl, OFD), 1: a flock lock
    exclusive   INTEGER NOT NULL,  -- 1: F_WRLCK / LOCK_EX, 0: F_RDLCK / LOCK_SH
    start       INTEGER NOT NULL,  -- first byte
    end_        INTEGER NOT NULL,  -- last byte, inclusive (2^63-1: to the end of the file)
    pid         INTEGER NOT NULL   -- the locking process, as F_GETLK reports it
);
CREATE INDEX locks_by_ino ON locks(ino);
CREATE INDEX locks_by_session ON locks(session_id);

-- Replies of the calls that must not run twice (proto/services.py `once`), recorded in the
-- call's own transaction: a client that retries after a transport failure (its reply lost,
-- the metaserver restarted) gets the first reply, not a second run.
-- Rows are appended in the order they are made (seq, the rowid) and expire from the front;
-- only the index on rid is written at random places. With rid as the table's key (schema 9)
-- every record (~370 bytes) went to a random page of a table that grows to one row per
-- create in the last REQUEST_RECORD_TTL_S: after 300,000 creates it was 137 MB of the
-- database, a create cost 490 us instead of 340 and a lookup 101 us instead of 40 (the
-- namespace's pages pushed out of the page cache).
CREATE TABLE requests (
    seq         INTEGER PRIMARY KEY,  -- insertion order
    rid         INTEGER NOT NULL UNIQUE,  -- the client's request id (random, 63 bits)
    reply       BLOB NOT NULL,        -- the reply frame it got (codec.encode_reply)
    created_ns  INTEGER NOT NULL      -- when; the sweep forgets it after REQUEST_RECORD_TTL_S
);
CREATE INDEX requests_by_age ON requests(created_ns);

-- Blocks allocated to a writer and not committed yet. Deliberately no foreign key to
-- inodes: a file may be purged while its writer is still writing, and then these rows
-- are how its blocks reach garbage (at commit, when the writer's session ends, or by the
-- sweep after the pending timeout).
CREATE TABLE pending (
    block_id    INTEGER PRIMARY KEY,  -- the allocated id
    ino         INTEGER NOT NULL,     -- file it was allocated for
    idx         INTEGER NOT NULL,     -- position it was allocated for
    session_id  INTEGER NOT NULL,     -- writer's session (for logs; not a lease)
    created_ns  INTEGER NOT NULL      -- allocation time; stale after the pending timeout
);
CREATE INDEX pending_by_session ON pending(session_id);

-- The data servers chosen for each pending block (the writer may write any of them).
CREATE TABLE pending_servers (
    block_id   INTEGER NOT NULL REFERENCES pending(block_id) ON DELETE CASCADE,
    server_id  INTEGER NOT NULL REFERENCES servers(server_id),
    rank       INTEGER NOT NULL,  -- placement order chosen by alloc_blocks (0 = primary);
                                  -- carried over to replicas at commit
    PRIMARY KEY (block_id, server_id)
);

-- Block replicas to delete: returned to their data server in heartbeat replies once
-- not_before has passed (a grace period, so readers holding an older block map can
-- finish), and removed when the server reports them deleted.
CREATE TABLE garbage (
    block_id       INTEGER NOT NULL,
    server_id      INTEGER NOT NULL REFERENCES servers(server_id),
    not_before_ns  INTEGER NOT NULL,  -- do not hand it out for deletion before this time
    PRIMARY KEY (server_id, block_id)
);

-- Re-replication tasks: a copy of a block being made on a target server. A row is
-- queued by the planner (sweep), handed to the target in a heartbeat reply (sent_ns),
-- and removed when the target reports it done or failed, or after the task timeout.
-- While a row exists the same (block, target) is not planned again.
CREATE TABLE replication (
    block_id    INTEGER NOT NULL,  -- block to copy (no foreign key: the block may be
                                   -- deleted meanwhile; the copy then becomes garbage)
    server_id   INTEGER NOT NULL REFERENCES servers(server_id),  -- the target
    created_ns  INTEGER NOT NULL,  -- when it was planned
    sent_ns     INTEGER,           -- when it was handed to the target (NULL: queued)
    PRIMARY KEY (block_id, server_id)
);
CREATE INDEX replication_by_server ON replication(server_id);

-- Copies a client reported bad (corrupt or missing), to be checked by the server that holds
-- them: a client's word never deletes a copy. Handed out in heartbeat replies; the server
-- reports a copy that fails as corrupt (and moves it aside), which drops the replica.
CREATE TABLE verify (
    server_id  INTEGER NOT NULL REFERENCES servers(server_id),
    block_id   INTEGER NOT NULL,
    sent_ns    INTEGER,  -- when it was handed out (NULL: not yet)
    PRIMARY KEY (server_id, block_id)
);

-- One data server's block report in progress: the ids it listed, chunk by chunk; the
-- last chunk reconciles them against the block maps and clears the rows.
CREATE TABLE reported (
    server_id  INTEGER NOT NULL REFERENCES servers(server_id),
    block_id   INTEGER NOT NULL,
    PRIMARY KEY (server_id, block_id)
);

-- Monotonic counters. next_block_id: the next block id to hand out (never reused).
CREATE TABLE counters (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('next_block_id', 1);
