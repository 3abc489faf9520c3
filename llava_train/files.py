"""File-system rules every writer follows: lock files are never followed through symlinks, a folder is
published whole (written under a temporary name, then renamed), and nothing is deleted to make room
(an existing folder in the way is moved aside under a new name)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any, Optional


class LockedError(RuntimeError):
    """Another live process holds the lock."""


def open_lock(path: Path) -> int:
    """Open (creating it) a lock file without following a symlink and without truncating anything; returns
    the descriptor. A symlink or a non-regular file at `path` raises OSError (nothing is written through it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link; refusing to use it as a lock file "
                                       "(remove the link)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file; refusing to use it as a lock file")
    return fd


class FolderLock:
    """An exclusive `flock` on `<folder>/<name>`, held while the process lives (the kernel drops it when the
    process dies, so a killed run leaves no stale lock). The holder's pid and host are written into the file
    for the error message of the next would-be holder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        fd = open_lock(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self.path.read_text(errors="replace").strip() or "unknown process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(f"{self.path.parent} is in use by another live run ({holder})") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def free_name(path: Path, tag: str) -> Path:
    """`<path>.<tag>`, or `<path>.<tag>-2`, ... : a sibling name nothing uses yet."""
    candidate, n = path.with_name(f"{path.name}.{tag}"), 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}.{tag}-{n}")
    return candidate


def move_aside(path: Path, tag: str) -> Path:
    """Rename `path` to a free sibling name `<path>.<tag>[-n]` (never deletes); returns the new name."""
    target = free_name(path, tag)
    os.rename(path, target)
    return target


def file_sizes(folder: Path) -> dict[str, int]:
    """Relative path -> size of every regular file under `folder` (symlinks are not followed)."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                sizes[str(p.relative_to(folder))] = p.stat().st_size
    return dict(sorted(sizes.items()))


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk (before a rename publishes it)."""
    for root, dirs, names in os.walk(folder):
        for name in names:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(staging: Path, target: Path, aside: Optional[Path] = None) -> Optional[Path]:
    """Flush `staging` to disk and rename it to `target`. A folder already at `target` is first renamed to a
    free name `<name>.<time>` (inside `aside` when given, else next to it) and that name is returned: a
    published folder is never rewritten in place, and nothing is deleted."""
    fsync_tree(staging)
    moved = None
    if target.exists() or target.is_symlink():
        where = Path(aside) if aside is not None else target.parent
        where.mkdir(parents=True, exist_ok=True)
        moved = free_name(where / target.name, time.strftime("%Y%m%d-%H%M%S"))
        os.rename(target, moved)
    os.rename(staging, target)
    return moved


def inside(a: Path, b: Path) -> bool:
    """Whether `a` is `b` or lies inside it (after resolving symlinks and `..`)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


def remove_staging(path: Path) -> None:
    """Remove a temporary folder of ours (a leftover of an interrupted write); never a published one."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
