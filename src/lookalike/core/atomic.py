"""Atomic file and folder writes: write beside the target, then rename, so a crash never leaves half a file.

A temporary is named `.{target name}.{pid}-{8 random characters}{suffix}` and held with `fcntl.flock` while it is
written; every later write of the same target first removes the temporaries whose process is gone (kill -9, power
loss). Files and folders get the permissions of the umask, as any other output would. Replacing a folder holds
`.{target name}.lock` beside it (removed afterwards), so concurrent writers of one folder take turns. Locking needs
fcntl (POSIX); without it writes stay atomic but unlocked, and only temporaries of dead processes are removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

_STARTED = time.time()  # temporaries without a pid (older versions) are stale only when older than this process
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read from /proc without touching it, else by setting and restoring it (process-global)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto the target (mode 0666 & ~umask) on success."""
    target = Path(target)
    suffix = suffix or target.suffix
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target, suffix)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target), suffix=suffix, dir=target.parent)
    tmp_path = Path(tmp)
    try:
        _lock(fd)
        yield tmp_path
        tmp_path.chmod(0o666 & ~current_umask())  # mkstemp makes it 0600: nobody else could read the output
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)
        os.close(fd)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling folder that replaces `target` when the block succeeds, and is removed when it fails."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _lock(fd)
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; an index is shared like any output folder
        yield tmp
        _swap_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold the lock that replacing the folder `target` takes (`.{name}.lock` beside it): an in-place update of the
    folder's files and a rebuild of the whole folder take turns."""
    target = Path(target)
    with _held(target.with_name(f".{target.name}.lock")):
        yield


def remove_stale(target: str | os.PathLike, suffix: str = "") -> list[Path]:
    """Remove the temporaries of `target` that no live process writes (left by a killed run); return their paths."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:(\d+)-)?[a-z0-9_]{{8}}{re.escape(suffix)}")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and _is_stale(Path(entry.path), match.group(1)):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def _prefix(target: Path) -> str:
    """The temporary-name prefix of `target`: hidden, the target's name and this process's id."""
    return f".{target.name}.{os.getpid()}-"


def _lock(fd: int) -> None:
    """Hold an exclusive flock on `fd` until it is closed: the mark of a temporary that is still being written."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks at most while another run's clean-up looks at it


def _is_stale(path: Path, pid: str | None) -> bool:
    """Whether a temporary was left behind: its process is dead (or, without a pid, it predates this process) and
    nobody holds its lock (a writer on another host sharing the folder does)."""
    try:
        if pid is not None and _alive(int(pid)):
            return False
        if pid is None and path.lstat().st_mtime >= _STARTED:
            return False
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def _swap_folder(tmp: Path, target: Path) -> None:
    """Replace the folder `target` by `tmp` while holding `.{name}.lock`: concurrent swaps into one folder take turns
    instead of moving each other's folders away."""
    old = target.with_name(f".{target.name}.old")
    with _held(target.with_name(f".{target.name}.lock")):
        shutil.rmtree(old, ignore_errors=True)  # also a swap's leftover from a killed run
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _held(lock_file: Path) -> Iterator[None]:
    """An exclusive flock on `lock_file`, which is removed on release: a waiter that then gets the lock of the removed
    file sees that the name no longer leads to it and locks the new one instead."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:
            break
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock_file)):
                break
        os.close(fd)
    try:
        yield
    finally:
        if fcntl is not None:
            lock_file.unlink(missing_ok=True)  # still held: nobody else can be inside
        os.close(fd)
