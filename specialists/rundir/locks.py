"""One writer per stage: advisory file locks in ``RUN_DIR/.locks/``.

A :class:`FileLock` is an exclusive ``flock`` on a file, held while a stage (or one specialist
job) runs. The kernel releases it when its process dies, however it dies, so a lock left by a
killed process is simply taken over by the next one; the file keeps the holder's host and pid
for the "waiting for" message. (``flock`` is per machine: processes on several machines
sharing a run directory need the job scheduler to keep them off each other's stages.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from ..device import agree, is_main
from ..errors import SpecialistsError

log = logging.getLogger("specialists")


class FileLock:
    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self.what = what  # for messages: "stage evaluate", "specialist 002"
        self._f = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; ``blocking=False`` returns False at once when another process has it.
        In a multi-process (torchrun) run, rank 0 takes it for all the ranks, which learn the
        outcome from it."""
        return agree(self._acquire(blocking) if is_main() else None)

    def _acquire(self, blocking: bool) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as exc:
            raise SpecialistsError(f"{self.path}: cannot create a lock ({exc.strerror})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                f.close()
                return False
            log.info("%s: %s holds it; waiting", self.what, self.holder())
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._f = f
        return True

    def release(self) -> None:
        if self._f is not None:
            self._f.truncate(0)
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
