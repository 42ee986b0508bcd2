"""Small I/O helpers shared by the stages: atomic writes, hashes, L2 normalization, the data kit.

The data contracts (embedding set, candidates, manifest, ...) live in rakt/pipeline/formats.py.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from rakt.indexes.helpers import atomic_path, json_hash, l2_normalize  # noqa: F401  (one definition for both packages)

log = logging.getLogger("rakt")

class InputError(ValueError):
    """Input rakt cannot use; the message names the file/row and what to do."""


_FULL = "free space there (or write elsewhere) and run the same command again: finished work is kept"
_LOCKED = "make it writable or write elsewhere (--out, --run-dir), then run the same command again"
# OSErrors of the machine, not of rakt or its input (errno -> what to do): `rakt: error:`, never retried
MACHINE_ERRORS = {errno.ENOSPC: _FULL, errno.EDQUOT: _FULL, errno.EFBIG: _FULL, errno.EROFS: _LOCKED,
                  errno.EACCES: _LOCKED, errno.EPERM: _LOCKED}


def kit_dir() -> Path:
    """The offline data kit: $RAKT_DATA, else ../shared/data beside the project checkout."""
    env = os.environ.get("RAKT_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


T = TypeVar("T")


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items` produced by a background thread up to `depth` ahead, in order: reading and decoding (which release
    the GIL) overlap the consumer's compute. An exception of the producer is raised here, at its place in order."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put((item, None))
            slots.put((done, None))
        except BaseException as e:  # handed to the consumer
            slots.put((done, e))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it end
            with contextlib.suppress(queue.Empty):
                slots.get_nowait()
            thread.join(timeout=0.05)


def write_json(path: str | Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def special_file(path: str | Path) -> str | None:
    """What `path` is when it is a FIFO, a device or a socket ("a FIFO", ...): opening or reading it may block or
    never end. None for anything else (a regular file; a directory or nothing, which fail at once when opened).
    Decided by stat, which never blocks."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), None)


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` when it is a regular file (symlinks followed); else an InputError naming it and what it is."""
    kind = special_file(path) or ("a directory" if os.path.isdir(path) else None)
    if kind is not None:
        raise InputError(f"{path}: the {what} is {kind}, not a regular file; pass a regular file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: {what} not found")
    return Path(path)


def save_torch(obj: object, path: str | Path) -> None:
    """torch.save through a file rakt opened, atomically: a full disk is an OSError naming `path` (torch's own
    writer reports it as "unexpected pos ...")."""
    import torch

    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:  # torch's zip writer, closing after our write failed, hides that OSError
        cause = e.__context__
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        raise


def read_json(path: str | Path, what: str = "file") -> dict:
    path = regular_file(path, what)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); delete it and rerun the stage that wrote it") from None


def write_parquet(path: str | Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path, fix: str, columns: list[str] | None = None) -> pa.Table:
    """A parquet file as a table; a damaged (e.g. truncated) file is an InputError naming it and `fix`."""
    regular_file(path, "parquet file")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable parquet file ({e}); {fix}") from None


def parquet_rows(path: str | Path, fix: str) -> int:
    """Rows of a parquet file, from its footer; a damaged file is an InputError naming it and `fix`."""
    regular_file(path, "parquet file")
    try:
        return pq.read_metadata(path).num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable parquet file ({e}); {fix}") from None


# --- one writer per output: an OS lock that dies with its process -------------------------------------

_HELD: dict[str, int] = {}  # lock files this process holds -> depth (a stage inside `rakt run` re-takes none)


def lock_file(path: str | Path) -> Path:
    """The lock file of an output `path` (a directory or a file): a hidden `.NAME.lock` beside it, keyed by the real
    path (symlinks resolved), so that a symlink to an output cannot take a second lock on it."""
    path = Path(path).resolve()
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | Path, what: str = "output") -> Iterator[None]:
    """Hold an exclusive lock on the output `path` while writing it; another process gets an InputError
    naming the process that holds it. An flock: a killed holder (even kill -9) leaves no stale lock.
    Re-entrant within one process, so `rakt run` and the stages it runs in process do not refuse each other."""
    lock = lock_file(path)
    key = str(lock)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise InputError(f"{path}: this {what} is being written by {holder} (lock {lock}); wait for it to "
                         f"finish or stop it, or write elsewhere") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} ({' '.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500]})\n".encode())
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # releases the lock; the file stays (removing it would race the next writer)


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    regular_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    """Log how long a stage took."""
    start = time.perf_counter()
    yield
    log.info("%s took %.1f s", stage, time.perf_counter() - start)


def check_index_model(model: str | None, index_model: str, index_label: str, what: str, fix: str,
                      force: bool) -> None:
    """Refuse queries from an embedding model other than the index's (or an undeclared one) unless forced."""
    if index_model == "unknown":  # a published index (rakt/indexes/published.py) whose model nobody declared
        name = model if model not in (None, "unknown") else "open_clip:NAME:PRETRAINED"
        msg = f"the index {index_label} does not record its embedding model ('unknown'), so queries cannot be checked"
        fix = (f"declare it in the index folder's rakt.json as {{\"model\": \"{name}\"}} "
               f"or open the index as 'faiss:DIR?model={name}'")
    elif model != index_model:
        msg = (f"{what} '{model}' but the index {index_label} holds '{index_model}' vectors: "
               f"similarities across two embedding models are meaningless")
    else:
        return
    if not force:
        raise InputError(f"{msg}; {fix}, or pass --force to query anyway")
    log.warning("%s; querying anyway (--force)", msg)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
