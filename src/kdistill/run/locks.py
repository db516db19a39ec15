"""Exclusive locks on folders kdistill writes: one writer at a time, or a clear refusal.

A lock is ``fcntl.flock`` on a small file. The kernel releases a ``flock`` when the
process holding it dies (SIGKILL included), so the lock itself says whether it is held; a
lock file left behind by a dead process is simply taken over. The file's content only
describes the holder (pid, host, start time, command), for the message another process
gets. (The teacher cache's build, :mod:`kdistill.teacher.cache.build`, uses the same idea,
blocking, for cache builds.)

Where ``fcntl`` does not exist (Windows) no lock is taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class LockHeld(Exception):
    """The lock is held by another process; ``holder`` is what its lock file says (may be
    empty when the holder took it a moment ago and has not written it yet)."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        super().__init__(f"{path} is held by {describe_holder(holder)}")
        self.path = path
        self.holder = holder


def describe_holder(holder: dict[str, Any]) -> str:
    """``"pid 1234 on host gpu1, started 2024-05-01T10:00:00+0200 (kdistill run cfg.yaml)"``."""
    if not holder.get("pid"):
        return "another process (its pid is not written yet: it took the lock a moment ago)"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    if holder.get("started_at"):
        text += f", started {holder['started_at']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


def _read_holder(f) -> dict[str, Any]:
    f.seek(0)
    text = f.read().strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {"pid": None, "raw": text[:200]}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, on_stale: Callable[[dict[str, Any]], None] | None = None
                   ) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``path`` (created if missing) for the block.

    Writes this process's pid, host, start time and command into the file once it holds
    the lock, and empties it on release (so content found at the next acquisition means
    the holder died without releasing: ``on_stale(holder)`` is called with it).

    Raises:
        LockHeld: another live process holds the lock.
    """
    path = Path(path)
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = _read_holder(f)
            # the holder writes its details just after taking the lock: give it a moment
            deadline = time.monotonic() + 1.0
            while not holder.get("pid") and time.monotonic() < deadline:
                time.sleep(0.05)
                holder = _read_holder(f)
            raise LockHeld(path, holder) from None
        try:
            previous = _read_holder(f)
            if previous and on_stale is not None:
                on_stale(previous)
            f.seek(0)
            f.truncate()
            f.write(json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join([os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]])[:500],
            }) + "\n")
            f.flush()
            yield
        finally:
            try:
                f.seek(0)
                f.truncate()  # released cleanly: nothing stale to report next time
                f.flush()
            except OSError:
                pass
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
