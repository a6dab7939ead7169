"""Atomic file writing: a half-finished write is never visible under the final name."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, else delete it.

    Works for files and for directories (e.g. `.mlpackage` bundles) written at the temporary path.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if tmp.is_file():
            # Some writers create files owner-only (0600); give the result the usual permissions.
            os.chmod(tmp, 0o666 & ~_umask())
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def display_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (for commands shown in reports)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def artifact_bytes(path: Path) -> int:
    """Size of an artifact: a file, or every file of a directory bundle (.mlpackage)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def array_buffer(array: np.ndarray) -> memoryview:
    """The bytes of `array` in C order, for hashing, without copying a contiguous array (a 1.2 GB face array
    hashed through `tobytes()` is copied first: 2.5x slower)."""
    return memoryview(np.ascontiguousarray(array)).cast("B")
