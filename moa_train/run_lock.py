"""One writer per run directory: an OS lock on `<run_dir>/.lock`, held by rank 0 for the whole run.

The lock is an OS file lock (flock: Linux maps it onto NFS locks across hosts; Lustre needs its
`flock` mount option), so the OS releases it when the holding process dies, however it dies: a killed
run never leaves a stale lock. Each open of the file is its own holder, so two runs in one process
exclude each other too. The file itself stays; it names the last holder (host, pid, start time).

A forked child (a DataLoader worker decoding images) would share the lock and keep it after its
parent is killed, until it noticed; so each child closes its copy of the descriptor at once (closing a
copy releases nothing while the parent holds its own).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLocked(UserError):
    """Another process holds the run directory: nothing of this process may touch it."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            raise RunLocked(f"the run directory {self.path.parent} is in use by another moa-train process "
                            f"({_describe(holder)}); two runs in one directory would write over each other. Wait for "
                            f"it to end (rerunning then resumes), stop it, or choose another hydra.run.dir.") from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}))
        file.flush()
        self.file = file
        _HELD.add(file.fileno())

    def release(self) -> None:
        if self.file is not None:
            _HELD.discard(self.file.fileno())
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
