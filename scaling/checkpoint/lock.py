"""One job per ``checkpoint.dir``: an advisory ``flock`` on a lock file, held by rank 0 for the job's life.

Two jobs on one folder (a double submit, a rerun over a live run) would overwrite and prune each
other's checkpoints and report the other's as their own. The lock file also holds an owner record
(host, pid, start time, job id) so that the refusal can name the job holding it. The kernel drops a
``flock`` when its process dies, however it dies, so the file a killed job leaves behind is stale and
does not block: only a live holder does.

The holder unlinks the file when it lets go. A job that opened the old file just before that would
then hold a lock on a file no longer in the folder; :func:`_open_locked` sees that (the path's inode
is no longer the one it locked) and tries again, so two jobs never both believe they hold it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from scaling.checkpoint import layout
from scaling.checkpoint.safe import CheckpointError

log = logging.getLogger("scaling.checkpoint")

# flock unsupported here (some NFS and Lustre mounts): the folder is then not protected.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def owner_record() -> dict:
    """Who this job is, as another job's refusal names it."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def describe(owner: dict | None) -> str:
    if not owner:
        return "owner not recorded yet"
    job = f", job {owner['job_id']}" if owner.get("job_id") else ""
    return f"host {owner.get('host')}, pid {owner.get('pid')}{job}, since {owner.get('started')}"


def _read_record(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _open_locked(path: Path, *, blocking: bool) -> int | None:
    """A descriptor of ``path`` holding its exclusive flock; None when another process holds it
    (``blocking=False``). OSError with an errno of :data:`_NO_LOCKS` where flock is unsupported."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder unlinked it after we opened it: lock the current file


def _unlock(fd: int, path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # while still held: see the module docstring
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def exclusive(path: str | Path):
    """Hold an exclusive flock on ``path`` (created, and removed afterwards) for the block, waiting for
    other holders; where the file system has no flock, the block runs unlocked."""
    path = Path(path)
    try:
        fd = _open_locked(path, blocking=True)
    except OSError as exn:
        if exn.errno not in _NO_LOCKS:
            raise
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            _unlock(fd, path)


class FolderLock:
    """The lock of one ``checkpoint.dir`` (rank 0 holds it; :meth:`release` when the job ends)."""

    def __init__(self, directory: Path, fd: int | None):
        self.directory = Path(directory)
        self.path = self.directory / layout.LOCK
        self._fd = fd

    @classmethod
    def acquire(cls, directory: str | Path) -> "FolderLock":
        """Take the folder, or CheckpointError naming the live job that holds it."""
        directory = Path(directory)
        path = directory / layout.LOCK
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = _open_locked(path, blocking=False)
        except OSError as exn:
            if exn.errno not in _NO_LOCKS:  # read-only, no permission, no space: no checkpoint could be saved
                raise CheckpointError(f"{directory}: checkpoint.dir cannot be written ({exn.strerror}): no checkpoint "
                                      "could be saved there; choose another checkpoint.dir") from None
            log.warning("%s: this file system does not support file locks (%s): nothing stops a second job from "
                        "using this checkpoint.dir at the same time", directory, os.strerror(exn.errno))
            return cls(directory, None)
        if fd is None:
            try:
                with open(path, "rb") as f:
                    other = _read_record(f.fileno())
            except FileNotFoundError:  # it ended just now
                other = None
            raise CheckpointError(
                f"{directory}: checkpoint.dir is in use by another live job ({describe(other)}); two jobs on one "
                f"folder would overwrite and prune each other's checkpoints. Wait for it to end or stop it, or use "
                f"another checkpoint.dir")
        previous = _read_record(fd)
        if previous:
            log.info("%s: taking over from a job that is no longer running (%s)", directory, describe(previous))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner_record()).encode(), 0)
        except OSError as exn:  # held all the same; a refused job then cannot say whose it is
            log.warning("%s: owner record not written (%s)", path, exn.strerror)
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _unlock(fd, self.path)
