"""A process that takes locks when told to, for the lock tests (tests/test_e2e_locks.py):
two of them on two mounts play two nodes. Reads one command a line on stdin, answers one
line on stdout: "ok [details]" or "err ERRNO".

Commands (fd: a small number naming one of the files this process opened):
  open FD PATH MODE        os.open with "r", "w" or "rw" (creating it)
  close FD
  flock FD sh|ex|un [nb]   flock(2)
  setlk FD rd|wr|un START LEN [wait]    fcntl F_SETLK / F_SETLKW (LEN 0: to the end)
  ofd FD rd|wr|un START LEN [wait]      fcntl F_OFD_SETLK / F_OFD_SETLKW
  getlk FD rd|wr START LEN [ofd]        F_GETLK (F_OFD_GETLK): "ok TYPE START LEN PID"
  write FD OFFSET TEXT     pwrite
  read FD OFFSET N         pread: "ok TEXT"
  pid                      "ok PID"
  alarm SECONDS            the next command is interrupted by SIGALRM after SECONDS
                           (its handler raises: "err EINTR")
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import sys

F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
TYPES = {"rd": fcntl.F_RDLCK, "wr": fcntl.F_WRLCK, "un": fcntl.F_UNLCK}
NAMES = {v: k for k, v in TYPES.items()}
FLOCK = {"sh": fcntl.LOCK_SH, "ex": fcntl.LOCK_EX, "un": fcntl.LOCK_UN}
MODES = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT, "rw": os.O_RDWR | os.O_CREAT}
# struct flock on x86_64: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
FLOCK_STRUCT = "hhqqi4x"


def flock_struct(type: int, start: int, length: int) -> bytes:
    return struct.pack(FLOCK_STRUCT, type, os.SEEK_SET, start, length, 0)


def run(cmd: list[str], fds: dict[str, int]) -> str:
    op = cmd[0]
    if op == "pid":
        return f"ok {os.getpid()}"
    if op == "alarm":
        signal.setitimer(signal.ITIMER_REAL, float(cmd[1]))
        return "ok"
    if op == "open":
        fds[cmd[1]] = os.open(cmd[2], MODES[cmd[3]], 0o666)
        return "ok"
    fd = fds[cmd[1]]
    if op == "close":
        os.close(fds.pop(cmd[1]))
    elif op == "flock":
        fcntl.flock(fd, FLOCK[cmd[2]] | (fcntl.LOCK_NB if "nb" in cmd[3:] else 0))
    elif op in ("setlk", "ofd"):
        wait = "wait" in cmd[5:]
        if op == "setlk":
            how = fcntl.F_SETLKW if wait else fcntl.F_SETLK
        else:
            how = F_OFD_SETLKW if wait else F_OFD_SETLK
        fcntl.fcntl(fd, how, flock_struct(TYPES[cmd[2]], int(cmd[3]), int(cmd[4])))
    elif op == "getlk":
        how = F_OFD_GETLK if "ofd" in cmd[5:] else fcntl.F_GETLK
        out = fcntl.fcntl(fd, how, flock_struct(TYPES[cmd[2]], int(cmd[3]), int(cmd[4])))
        type, _, start, length, pid = struct.unpack(FLOCK_STRUCT, out)
        return f"ok {NAMES[type]} {start} {length} {pid}"
    elif op == "write":
        os.pwrite(fd, cmd[3].encode(), int(cmd[2]))
    elif op == "read":
        return "ok " + os.pread(fd, int(cmd[3]), int(cmd[2])).decode()
    else:
        raise ValueError(op)
    return "ok"


def _interrupted(signum, frame) -> None:
    raise InterruptedError(errno.EINTR, "interrupted by SIGALRM")


def main() -> None:
    signal.signal(signal.SIGALRM, _interrupted)
    fds: dict[str, int] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            answer = run(line.split(), fds)
        except OSError as exc:
            answer = f"err {exc.errno}"
        print(answer, flush=True)


if __name__ == "__main__":
    main()
