"""Generic helpers of the lowest layer: atomic file writes, L2 normalization, JSON hashes.

They live here because `indexes` imports nothing from `pipeline`; pipeline/io.py re-exports them, so both
packages use one definition.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
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


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """`x` scaled to unit L2 norm along `axis`; zero vectors stay zero. Same dtype as `x` for float input."""
    norms = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def json_hash(obj: dict) -> str:
    """sha256 (16 hex digits) of `obj` as sorted-key JSON: the hash rakt records for JSON descriptions."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
