"""Typed ids shared by every role. Plain ints on the wire; NewType keeps them apart in code."""

from typing import NewType

InodeId = NewType("InodeId", int)
BlockId = NewType("BlockId", int)
ServerId = NewType("ServerId", int)
SessionId = NewType("SessionId", int)

ROOT_INODE = InodeId(1)
#: Environment variables a program that is not told where the cluster is reads: the
#: metaservers (`HOST:PORT[,HOST:PORT...]`) and the directory of a credential bundle.
META_ENV = "STRIPEFS_META"
CREDENTIALS_ENV = "STRIPEFS_CREDENTIALS"

#: Largest name of one directory entry, in bytes (Linux NAME_MAX).
NAME_MAX_BYTES = 255
#: Largest symlink target, in bytes (Linux PATH_MAX less the NUL).
SYMLINK_MAX_BYTES = 4095
#: Largest extended attribute name and value, in bytes (Linux XATTR_NAME_MAX / XATTR_SIZE_MAX).
XATTR_NAME_MAX_BYTES = 255
XATTR_SIZE_MAX_BYTES = 65536
#: Largest file size we accept (the same as ext4 with 4 KiB blocks: 16 TiB).
FILE_SIZE_MAX_BYTES = 16 * 1024**4

#: Defaults of the data layout, overridable per directory (inherited at create).
DEFAULT_BLOCK_SIZE_BYTES = 4 * 1024 * 1024
MIN_BLOCK_SIZE_BYTES = 64 * 1024
MAX_BLOCK_SIZE_BYTES = 64 * 1024 * 1024
#: Default replica count: min(DEFAULT_REPLICAS, live data servers). 0 on a directory means "default".
DEFAULT_REPLICAS = 2
MAX_REPLICAS = 8

#: Files whose first block holds at most this many bytes keep that block in the metadata
#: store instead of on data servers ("inline", as Lustre's data-on-MDT), so writing a small
#: file is a create and a commit and reading it is one open. Set per directory like the
#: layout above (0: never inline), inherited at create; never more than the block size.
DEFAULT_INLINE_MAX_BYTES = 64 * 1024
MAX_INLINE_BYTES = 1024 * 1024

#: Checksum granularity of a stored block: one CRC32C per this many bytes, so a read
#: touches (and verifies) about what it asks for. 4 KiB: cold random 4 KiB reads of a
#: 1 GiB file went from ~570-860 to ~650-1,190 a second against 64 KiB (the size of the
#: format's first version, still read).
SUB_BLOCK_BYTES = 4 * 1024

#: Streamed block transfers (a write chain, a whole-block read) move blocks in chunks of
#: this many bytes, so receiving, checking, forwarding and writing overlap.
TRANSFER_CHUNK_BYTES = 1024 * 1024
#: Each server of a write chain gives the next one this much less time than it has itself,
#: so that a hung server further down is reported by its predecessor (and placed around)
#: before the writer gives up on the whole chain.
CHAIN_HOP_MARGIN_S = 2.0

#: The last byte offset a lock range can name (the kernel's OFFSET_MAX): a lock "to the end
#: of the file" ends here, however the file grows.
OFFSET_MAX = (1 << 63) - 1
#: What a lock is: a POSIX record lock (fcntl F_SETLK and OFD locks; byte ranges, owned by
#: a process or an open file description) or a flock(2) lock (the whole file, owned by an
#: open file description). The two kinds never conflict with each other, as on Linux.
LOCK_RECORD, LOCK_FLOCK = 0, 1
#: relatime: a read moves an atime older than this even when it is newer than mtime and
#: ctime (the metaserver applies the rule; clients only spare it calls that cannot move it).
RELATIME_AGE_S = 24 * 3600
#: Longest a lock_wait call waits on the metaserver before answering "nothing changed":
#: a waiter asks again then, one round trip per this long, not one per wait step.
LOCK_WAIT_MAX_S = 20.0

#: Virtual xattrs of a directory that set the layout of files created under it.
#: They are not listed by listxattr, so copying tools do not carry them around.
LAYOUT_XATTR_BLOCK_SIZE = b"stripefs.block_size"
LAYOUT_XATTR_REPLICAS = b"stripefs.replicas"
LAYOUT_XATTR_INLINE_MAX = b"stripefs.inline_max"

#: Checkpoint directories (docs/client.md, "Checkpoints through tiers"): stored attributes.
#: A directory's mode, b"async" (files created in it are staged on the client's local disk
#: and uploaded in the background) or b"sync"; directories created in it inherit it.
CHECKPOINT_XATTR = b"stripefs.checkpoint"
CHECKPOINT_MODES = (b"async", b"sync")
#: A checkpoint directory's success marker name (inherited as the mode is).
CHECKPOINT_MARKER_XATTR = b"stripefs.checkpoint.marker"
CHECKPOINT_MARKER_DEFAULT = b"_COMMITTED"
#: On a parent of checkpoint directories: keep only the newest K committed ones.
CHECKPOINT_KEEP_XATTR = b"stripefs.checkpoint.keep"
#: On a file: its content is staged on a client and not yet uploaded (value: the bytes
#: staged, as that client last reported). Set by a create that asks to stage, cleared by
#: the commit that uploads it; never listed, never created by setxattr.
STAGED_XATTR = b"stripefs.staged"
CHECKPOINT_STORED_XATTRS = (CHECKPOINT_XATTR, CHECKPOINT_MARKER_XATTR, CHECKPOINT_KEEP_XATTR, STAGED_XATTR)
#: Directory attributes a new subdirectory inherits.
CHECKPOINT_INHERITED_XATTRS = (CHECKPOINT_XATTR, CHECKPOINT_MARKER_XATTR)
