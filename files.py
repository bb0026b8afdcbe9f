"""Writing files so that nothing on disk is ever half-written or lost: every file goes to a
temporary name beside its target, is fsynced, renamed over the target, and the directory is
fsynced; a directory is built in a temporary sibling and swapped in whole. Readers see the old
version or the complete new one; a failure (disk full, a kill) leaves the old one and no temp.

    from tritongpt.files import atomic_write
    atomic_write(Path("out/config.json"), lambda fh: fh.write(b"{}"))
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def temp_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path`, to write to and then rename onto `path`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Rename the finished, fsynced `tmp` over `path` and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(binary file handle) on a temporary file beside `path`, fsync it, rename it to
    `path`, fsync the directory. On any failure the temporary file is removed and `path` is as
    it was."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # the permissions a plain open() would give
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a new temporary directory beside `target` to fill; when the block ends, its files are
    fsynced and it replaces `target` (an existing `target` is removed only after the swap). On an
    error it is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(target)
    staging.mkdir()
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(staging)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if target.exists():
            old = temp_sibling(target)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
