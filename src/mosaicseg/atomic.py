"""Atomic file writing: every output goes to a temporary file next to its target, then is renamed.

A reader (or a run resumed after SIGKILL or a full disk) therefore sees either the previous complete file
or the new complete file, never a partial one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mosaicseg.errors import MosaicSegError

# failures of the storage, not of MosaicSeg: reported as user errors that say what to do
_STORAGE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
}


def storage_error(path: Path, exc: OSError) -> MosaicSegError | None:
    """A :class:`MosaicSegError` naming ``path`` for a storage failure ``exc``; ``None`` for other errors."""
    reason = _STORAGE_ERRORS.get(exc.errno or 0)
    if reason is None:
        return None
    return MosaicSegError(
        f"{path}: cannot write: {reason} ({exc.strerror or exc}); nothing was written there and any previous "
        "version of the file is intact. Fix: free space, fix the permissions or choose another output folder."
    )


def _disk_nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def _prepare(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (storage_error(path, exc) or exc) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes files private (0600)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write through ``write(file_object)`` into a temporary file next to ``path``, fsync, then rename it."""
    path = Path(path)
    _prepare(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise (storage_error(path, exc) or exc) from exc
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise (storage_error(path, exc) or exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, atomically."""
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text), mode="w")


def save_npy_atomic(path: str | Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def save_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    return atomic_write(path, lambda f: np.savez(f, **arrays))


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (ending in ``suffix`` so writers that dispatch on the file
    ending still work); on normal exit it is renamed onto ``path``, on error it is removed."""
    path = Path(path)
    _prepare(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as exc:
        raise (storage_error(path, exc) or exc) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        fd = os.open(tmp, os.O_RDONLY)
        try:  # the data must be on disk before the rename makes it the file (power loss)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise (storage_error(path, exc) or exc) from exc
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        # third-party writers (ITK, PIL) report a full disk as their own error types
        if _disk_nearly_full(path.parent):
            raise storage_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from exc  # type: ignore[misc]
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
