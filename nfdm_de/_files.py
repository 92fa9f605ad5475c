"""Atomic file writes: every file nfdm-de writes goes through `atomic_write`.

The content is written to a temporary file in the target's own directory (named
`.<target name>.<random>.tmp`), flushed and fsync'ed, given the permissions a plain `open` would
give (0666 minus the umask), then `os.replace`d onto exactly the path asked for, whatever its
extension, and the directory is fsync'ed. A reader, or a process resumed after SIGKILL, sees the
old file or the complete new one, never a partial one; a failed write (disk full, permission
denied) leaves the target as it was and removes the temporary file. Temporaries of killed
writes are removed by `remove_stale_temporaries` at the next start.
"""

import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Call `write` on a binary file that becomes `path` only once `write` has returned and the
    data are on disk. `path`'s directory must exist."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "cannot replace a directory by a file", path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete, never partial."""
    atomic_write(path, lambda f: f.write(data))


def remove_stale_temporaries(directory: str, names: Iterable[str]) -> list[str]:
    """Remove the temporary files that killed `atomic_write`s of files called `names` (regular
    expressions over file names) left in `directory`; returns the removed paths. Only regular
    files are touched, never links or directories."""
    patterns = [re.compile(rf"^\.{name}\.[^/]+\.tmp$") for name in names]
    removed = []
    if not os.path.isdir(directory):
        return removed
    for entry in os.scandir(directory):
        if not any(p.match(entry.name) for p in patterns):
            continue
        if entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except FileNotFoundError:
                pass
    return removed


def existing_directory_above(path: str, action: str) -> str:
    """The nearest existing directory at or above the folder of `path`, so that `path` can be
    created below it; a ValueError (`cannot {action} path: ...`) when that is a file."""
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"cannot {action} {path!r}: {existing!r} is a file, not a directory.")
    return existing


def check_numpy_file(path: str, what: str) -> None:
    """A ValueError unless `path` starts as a NumPy file does: `.npy` (b"\\x93NUMPY") or `.npz`
    (a zip archive). Called before `np.load`, whose error for other bytes is about pickles."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as error:
        raise ValueError(f"cannot read {what} {path!r}: {error.strerror or error}.") from None
    if head != b"\x93NUMPY" and not head.startswith(b"PK"):
        raise ValueError(
            f"{what} {path!r} is not a NumPy file (.npy or .npz): it does not start with the "
            "NumPy or zip signature."
        )
