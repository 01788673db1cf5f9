"""An exclusive lock on a run directory (or a shared activation store) for as long as a process works in it.

``<dir>/.lock`` is created exclusively (``O_CREAT | O_EXCL``) and holds the holder's PID, host and start time. A
second process fails at once with a message naming them; a lock whose holder is dead (same host, no such PID) is
taken over with a warning. A torchrun / srun job takes one lock, in its rank 0.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tnlit.pipeline.run_dir import RunDirError

__all__ = ["LockError", "hold"]

LOCK = ".lock"
_UNREADABLE_GRACE_S = 10.0  # a lock file still being written by its holder is empty for an instant


class LockError(RunDirError):
    """The directory is held by another live process."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stale(path: Path, holder: dict | None) -> str | None:
    """Why the lock at ``path`` may be taken over, or None while its holder may be alive."""
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        return f"unreadable and {age:.0f} s old" if age > _UNREADABLE_GRACE_S else None
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return f"its holder, PID {holder.get('pid')} on {holder.get('host')}, is dead"
    return None


def _take(path: Path, what: str) -> None:
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            reason = _stale(path, holder)
            if reason is None:
                who = (
                    f"PID {holder['pid']} on host {holder['host']} (since {holder.get('since')})"
                    if holder
                    else ("a process that is writing its lock")
                )
                raise LockError(
                    f"{what} {path.parent} is in use by {who}: wait for it to end, or use another directory. If that "
                    f"process is gone (another host cannot be checked from here), delete {path}"
                ) from None
            if reason != "gone":
                warnings.warn(f"taking over the stale lock {path} ({reason})", stacklevel=3)
                path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine) + "\n")
        return
    raise LockError(f"{what} {path.parent}: could not take its lock {path} (others keep taking it)")


@contextmanager
def hold(directory: str | Path, what: str = "run directory") -> Iterator[None]:
    """Hold ``directory``'s lock for the block (the directory is created; left behind empty, it is removed)."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    try:
        _take(path, what)
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES):
            raise
        # A read-only directory: nothing can be written to it, so nothing to guard (a finished run only reports).
        warnings.warn(f"{what} {directory} is read-only ({err.strerror}): not locked", stacklevel=3)
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        if created:
            try:
                directory.rmdir()  # only when empty: a run refused before it wrote anything leaves nothing
            except OSError:
                pass
