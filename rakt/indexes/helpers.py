"""Generic helpers of the lowest layer: atomic file writes, L2 normalization, JSON hashes.

They live here because `indexes` imports nothing from `pipeline`; rakt/pipeline/io.py re-exports them, so both
packages use one definition.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it to `path` only if the block succeeds. An OSError while writing
    (a full disk, a read-only folder) names `path`, not the temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, str(tmp), tmp) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except RuntimeError as e:  # a library's own writer (faiss, TorchScript) reports a failed write so
        cause = unwritable(path.parent)
        if cause is not None:
            raise OSError(cause, os.strerror(cause), str(path)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints to stdout (faiss's on-disk lists do) to stderr meanwhile: rakt's stdout is its JSON
    summary."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def unwritable(folder: Path) -> int | None:
    """Why nothing can be written in `folder` now, as an errno (EROFS, ENOSPC, EACCES), or None."""
    try:
        fs = os.statvfs(folder)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if fs.f_bavail * fs.f_frsize < (1 << 20):
        return errno.ENOSPC
    return None if os.access(folder, os.W_OK) else errno.EACCES


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """`x` scaled to unit L2 norm along `axis`; zero vectors stay zero. Same dtype as `x` for float input."""
    norms = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def json_hash(obj: dict) -> str:
    """sha256 (16 hex digits) of `obj` as sorted-key JSON: the hash rakt records for JSON descriptions."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
