"""POSIX ACLs through a real mount, against a local ext4 directory as the twin (the way
test_e2e_perms.py checks modes): setfacl and getfacl give the same ACLs and modes on both
sides, access and default ACLs decide for other uids, chmod and the ACL mask agree, and new
entries inherit a directory's default ACL (and the umask applies only without one)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from test_e2e_perms import OTHER, USER, Sides, _file, public_mount, run_as, sides  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.mount]


def setfacl(*args: str) -> None:
    subprocess.run(["setfacl", *args], check=True, capture_output=True, timeout=30)


def getfacl(path: Path) -> str:
    """The ACL as getfacl prints it, numeric ids, without the file name header."""
    return subprocess.run(["getfacl", "-n", "-c", "-p", str(path)], check=True, capture_output=True,
                          text=True, timeout=30).stdout


def facts(sides: Sides, name: str) -> tuple[str, int]:
    """getfacl and the mode of d/name, the same on both sides."""
    return sides.as_root(lambda d: (getfacl(d / name), stat.S_IMODE(os.stat(d / name).st_mode)))


def test_a_named_user_entry_grants_what_the_mode_does_not(sides: Sides):
    def prepare(d: Path) -> None:
        _file(d / "f", b"shared with one user", 0o600)
        setfacl("-m", f"u:{USER}:r", str(d / "f"))

    sides.setup(prepare)
    acl, mode = facts(sides, "f")
    assert f"user:{USER}:r--" in acl and mode == 0o640  # the group bits show the mask
    assert sides.as_user(USER, lambda d: (d / "f").read_bytes()) == ("ok", b"shared with one user")
    assert sides.as_user(USER, lambda d: open(d / "f", "r+b").close()) == ("err", "EACCES")
    assert sides.as_user(OTHER, lambda d: (d / "f").read_bytes()) == ("err", "EACCES")
    assert sides.as_user(USER, lambda d: os.getxattr(d / "f", "system.posix_acl_access") != b"") == ("ok", True)


def test_chmod_sets_the_mask_and_the_mask_limits_named_entries(sides: Sides):
    def prepare(d: Path) -> None:
        _file(d / "f", b"data", 0o600)
        setfacl("-m", f"u:{USER}:rw", str(d / "f"))
        os.chmod(d / "f", 0o640)  # the mask becomes r--

    sides.setup(prepare)
    acl, mode = facts(sides, "f")
    assert "mask::r--" in acl and mode == 0o640
    assert sides.as_user(USER, lambda d: open(d / "f", "r+b").close()) == ("err", "EACCES")
    assert sides.as_user(USER, lambda d: (d / "f").read_bytes()) == ("ok", b"data")
    sides.setup(lambda d: os.chmod(d / "f", 0o660))
    assert "mask::rw-" in facts(sides, "f")[0]
    assert sides.as_user(USER, lambda d: (d / "f").write_bytes(b"written")) == ("ok", 7)


def test_named_group_entries_and_group_matching(sides: Sides):
    def prepare(d: Path) -> None:
        (d / "dir").mkdir()
        os.chmod(d / "dir", 0o700)
        _file(d / "dir" / "inside", b"x", 0o644)
        setfacl("-m", f"g:{OTHER}:rx", str(d / "dir"))

    sides.setup(prepare)
    assert facts(sides, "dir") is not None
    # A member of the named group (as its primary group) may list; others may not.
    assert sides.as_user(USER, lambda d: os.listdir(d / "dir"), gid=OTHER) == ("ok", ["inside"])
    assert sides.as_user(USER, lambda d: os.listdir(d / "dir")) == ("err", "EACCES")
    # The group grants r-x only: no creating inside.
    assert sides.as_user(USER, lambda d: (d / "dir" / "new").write_bytes(b"n"), gid=OTHER) == ("err", "EACCES")


def test_default_acl_is_inherited_and_replaces_the_umask(sides: Sides):
    def prepare(d: Path) -> None:
        (d / "proj").mkdir()
        os.chmod(d / "proj", 0o750)
        setfacl("-m", f"u:{USER}:rwx", str(d / "proj"))
        setfacl("-d", "-m", f"u:{USER}:rwx,g::rx,o::-", str(d / "proj"))

    sides.setup(prepare)

    def create_as_root_with_umask(d: Path) -> None:
        old = os.umask(0o022)
        try:
            os.close(os.open(d / "proj" / "file", os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(d / "proj" / "sub", 0o777)
            os.close(os.open(d / "plain", os.O_CREAT | os.O_WRONLY, 0o666))  # no default ACL here
        finally:
            os.umask(old)

    sides.setup(create_as_root_with_umask)
    for name in ("proj", "proj/file", "proj/sub", "plain"):
        facts(sides, name)  # the same ACL and mode on both sides
    acl, mode = facts(sides, "proj/file")
    assert f"user:{USER}:rwx" in acl and "mask::rw-" in acl and mode == 0o660  # no umask: the ACL decides
    assert "default:" in facts(sides, "proj/sub")[0]  # a subdirectory carries the default on
    assert facts(sides, "plain")[1] == 0o644  # the umask, where no default ACL decides
    # The inherited entry works for the named user, in the new subdirectory too.
    assert sides.as_user(USER, lambda d: (d / "proj" / "file").write_bytes(b"mine too")) == ("ok", 8)
    assert sides.as_user(USER, lambda d: (d / "proj" / "sub" / "deeper").write_bytes(b"d")) == ("ok", 1)
    assert sides.as_user(OTHER, lambda d: os.listdir(d / "proj")) == ("err", "EACCES")


def test_only_the_owner_sets_acls_and_removing_them_keeps_the_mode(sides: Sides):
    def prepare(d: Path) -> None:
        _file(d / "roots", b"r", 0o644)
        _file(d / "users", b"u", 0o640, USER, USER)
        setfacl("-m", f"u:{OTHER}:rw", str(d / "users"))

    sides.setup(prepare)
    set_acl = lambda d: os.setxattr(d / "roots", "system.posix_acl_access",  # noqa: E731
                                    os.getxattr(d / "users", "system.posix_acl_access"))
    assert sides.as_user(USER, set_acl) == ("err", "EPERM")
    assert sides.as_user(OTHER, lambda d: (d / "users").write_bytes(b"other")) == ("ok", 5)
    sides.setup(lambda d: setfacl("-b", str(d / "users")))
    acl, mode = facts(sides, "users")
    assert "mask" not in acl and mode == 0o640  # the group bits are the group entry's again
    assert sides.as_user(OTHER, lambda d: (d / "users").write_bytes(b"no")) == ("err", "EACCES")
    assert sides.as_user(USER, lambda d: os.listxattr(d / "users")) == ("ok", [])


def test_the_metaserver_honours_what_an_acl_grants(sides: Sides):
    """The metaserver checks permissions after the kernel (and alone for library clients):
    what an ACL grants against the mode bits (a 0700 directory of root's) it must grant
    too, or the mount would answer EACCES where ext4 does not."""
    def prepare(d: Path) -> None:
        (d / "box").mkdir()
        os.chmod(d / "box", 0o700)
        setfacl("-m", f"u:{USER}:rwx", str(d / "box"))

    sides.setup(prepare)
    assert sides.as_user(USER, lambda d: (d / "box" / "made").write_bytes(b"ok")) == ("ok", 2)
    assert sides.as_user(USER, lambda d: sorted(os.listdir(d / "box"))) == ("ok", ["made"])
    assert sides.as_user(OTHER, lambda d: os.listdir(d / "box")) == ("err", "EACCES")
