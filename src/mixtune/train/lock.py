"""One run per output folder: `.mixtune.lock` in output_dir, held with flock, naming its owner's pid and host.

The kernel drops a flock when its process dies however it dies (kill -9 included), so on one machine a lock
is never stale: a leftover file whose flock is free is taken over, with a message naming the dead owner. A
lock file written on another host cannot be checked from here; it is refused with how to clear it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from mixtune.errors import OutputDirError

log = logging.getLogger("mixtune")

LOCK_NAME = ".mixtune.lock"


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), so a reused pid is not mistaken for the owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or process_start(pid) in (None, start)


def describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started', '?')}"


class OutputLock:
    """`with OutputLock(output_dir):` holds the folder for this run; released on exit, also on an error."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            fd = self.open_locked()
        except OSError as e:
            raise OutputDirError(f"cannot use output_dir {self.output_dir}: {e.strerror or e} (while creating "
                                 f"its lock file {self.path})") from e
        previous = read_owner(fd)
        if previous and previous.get("pid") != os.getpid():
            self.take_over(fd, previous)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def open_locked(self) -> int:
        """Open the lock file and flock it; retry if another run deleted the file between our open and flock."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = read_owner(fd) or {}
                os.close(fd)
                raise OutputDirError(f"output_dir {self.output_dir} is in use by another mixtune run "
                                     f"({describe(owner)}); wait for it to end or choose another output_dir")
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("this filesystem does not support file locks; %s only checks the owner's pid", self.path)
                try:
                    self.refuse_if_owner_alive(read_owner(fd))
                except OutputDirError:
                    os.close(fd)
                    raise
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def refuse_if_owner_alive(self, owner: dict | None) -> None:
        if owner and owner.get("host") == socket.gethostname() and owner.get("pid") != os.getpid() and pid_alive(
                owner.get("pid", -1), owner.get("start")):
            raise OutputDirError(f"output_dir {self.output_dir} is in use by another mixtune run ({describe(owner)}); "
                                 "wait for it to end or choose another output_dir")

    def take_over(self, fd: int, previous: dict) -> None:
        """We hold the flock, so the previous owner on this host is gone; another host's owner we cannot check."""
        if previous.get("host") != socket.gethostname():
            os.close(fd)
            raise OutputDirError(f"output_dir {self.output_dir} has a lock left by {describe(previous)}, which this "
                                 f"machine cannot check; if no run is active there, delete {self.path}")
        state = "no longer running" if not pid_alive(previous.get("pid", -1), previous.get("start")) else \
            "no longer holding it"
        log.warning("taking over the stale lock %s left by %s (%s)", self.path, describe(previous), state)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the flock, so no other run can be between
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def read_owner(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data.decode()) if data.strip() else None
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
