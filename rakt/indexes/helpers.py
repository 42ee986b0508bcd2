"""Generic helpers of the lowest layer: atomic file writes, L2 normalization, JSON hashes, mapped pages.

They live here because `indexes` imports nothing from `pipeline`; rakt/pipeline/io.py re-exports them, so both
packages use one definition.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator

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


MADV_DONTNEED = 4  # Linux


def release_mapped(files: Iterable[str | Path]) -> int:
    """Take the pages of these memory-mapped files (or of every file under these folders) out of this process's
    resident set: madvise MADV_DONTNEED on each shared or read-only mapping of them that /proc/self/maps lists.
    Returns the bytes of mapping covered.

    The pages stay in the page cache (written pages stay dirty there and reach the file), so touching them again
    costs a minor fault, not a read: what an index search or merge reads of a mapped file then no longer counts
    as the process's memory, however large the file. Private writable mappings are left alone (madvise would
    drop their changes). A no-op where /proc/self/maps does not exist. Call it only while the mappings cannot
    be unmapped by another thread."""
    wanted = {os.path.realpath(f) for f in files}
    folders = tuple(w + os.sep for w in wanted)
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return 0
    libc, covered = _libc(), 0
    for line in lines:
        fields = line.split(maxsplit=5)
        name = fields[5].rstrip("\n") if len(fields) == 6 else ""
        if name not in wanted and not name.startswith(folders):
            continue
        perms = fields[1]
        if perms[3] != "s" and "w" in perms:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            covered += end - start
    return covered


@contextlib.contextmanager
def releasing_mapped(files: Iterable[str | Path], every: float = 0.5) -> Iterator[None]:
    """release_mapped(files) every `every` seconds in a thread while the block runs (e.g. a long faiss merge that
    writes a memory-mapped file and releases the GIL), and once at the end. The block must keep the files'
    mappings in place until it ends: the thread is joined before the block's caller can unmap them."""
    files, done = list(files), threading.Event()

    def loop() -> None:
        while not done.wait(every):
            release_mapped(files)

    thread = threading.Thread(target=loop, name="release-mapped", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        release_mapped(files)


def trim_heap() -> None:
    """Give the memory freed so far back to the system (glibc's malloc_trim, Arrow's pool release_unused), so a
    step that follows (e.g. merging an index's parts in RAM) starts from what is live, not from earlier peaks."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        _libc().malloc_trim(0)
    except AttributeError:  # not glibc
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
