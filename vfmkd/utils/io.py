"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

from vfmkd.errors import UserError


class WriteError(UserError, OSError):
    """A file could not be written (disk full, read-only folder, permissions); the message
    names the file, the bytes needed and free, and what on disk is intact."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], size: int | None = None) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it.

    Args:
        path: final destination; its folder is created when missing.
        write: writes the content to the binary file object it is given.
        size: the bytes it will write, when known (for the error message).

    Raises:
        WriteError: the operating system refused (no space, read-only, permissions);
            ``path`` is as it was before the call.
    """
    path = Path(path)
    existed = path.exists()
    temp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except OSError as error:
        written = _size_of(temp_name)
        _remove(temp_name)
        raise WriteError(_write_failure(path, error, size, written, existed)) from error
    except BaseException:
        _remove(temp_name)
        raise
    _fsync_dir(path.parent)
    return path


def _size_of(name: str | None) -> int:
    try:
        return os.path.getsize(name) if name else 0
    except OSError:
        return 0


def _remove(name: str | None) -> None:
    if name:
        try:
            Path(name).unlink(missing_ok=True)
        except OSError:
            pass


def _write_failure(path: Path, error: OSError, size: int | None, written: int, existed: bool) -> str:
    """The one-paragraph story of a failed write: file, cause, bytes needed and free, what is intact."""
    cause = errno.errorcode.get(error.errno or 0, "error")
    needed = f"{size:,} bytes needed" if size is not None else f"at least {written:,} bytes needed ({written:,} written)"
    folder = next((parent for parent in [path.parent, *path.parent.parents] if parent.exists()), Path("/"))
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes free on {folder}"
    except OSError:
        free = f"free space on {folder} unknown"
    intact = f"{path} is unchanged (its previous version is intact)" if existed else f"{path} was not created"
    fix = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some of your quota or write elsewhere",
        errno.EROFS: "the file system is read-only: write elsewhere",
        errno.EACCES: "no permission: write elsewhere or fix the folder's permissions",
        errno.EPERM: "no permission: write elsewhere or fix the folder's permissions",
    }.get(error.errno or 0, "check the folder")
    return f"could not write {path}: {error.strerror or error} ({cause}); {needed}, {free}. {intact}; {fix}."


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda file: file.write(data), size=len(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` that never leaves a half-written checkpoint behind."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
