"""The stripefs client: `fs.client` (a FUSE-free trio library with the whole file system
API), `fs.fuse` (a thin pyfuse3 adapter over it) and `fs.cli` (the `stripefs` command)."""
