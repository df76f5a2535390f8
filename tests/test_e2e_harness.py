"""The end-to-end harness itself: a traceback in a log fails the test that saw it, and
mount points are found in the kernel's table even when they cannot be stat'ed."""

from __future__ import annotations

from pathlib import Path

import pytest

import conftest
from cluster import LOGS, is_mounted


def test_a_traceback_in_a_harness_log_fails_the_check(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text("started\n")
    LOGS.append(log)
    try:
        conftest.check_logs()  # nothing new but "started"
        with log.open("a") as f:
            f.write("Traceback (most recent call last):\n  boom\nValueError: boom\n")
        with pytest.raises(pytest.fail.Exception, match="unexpected traceback"):
            conftest.check_logs()
        # Reported once: the next check starts after it.
        conftest.check_logs()
        with log.open("a") as f:
            f.write("Traceback (most recent call last):\n  expected\n")
        conftest.check_logs(allow=True)
        conftest.check_logs()
    finally:
        LOGS.remove(log)


def test_is_mounted_reads_the_mount_table(tmp_path: Path):
    assert is_mounted("/")
    assert not is_mounted(tmp_path)
    # A path through a symbolic link names the mount the table lists under its real path.
    (tmp_path / "root").symlink_to("/")
    assert is_mounted(tmp_path / "root" / "proc")
    assert not is_mounted(tmp_path / "root" / "nonexistent")
