"""Small I/O helpers shared by the stages: atomic writes, hashes, L2 normalization, the data kit.

The data contracts (embedding set, candidates, manifest, ...) live in pipeline/formats.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from indexes.helpers import atomic_path, json_hash, l2_normalize  # noqa: F401  (one definition for both packages)

log = logging.getLogger("rakt")

class InputError(ValueError):
    """Input rakt cannot use; the message names the file/row and what to do."""


def kit_dir() -> Path:
    """The offline data kit: $RAKT_DATA, else ../shared/data beside the project checkout."""
    env = os.environ.get("RAKT_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def write_json(path: str | Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); delete it and rerun the stage that wrote it") from None


def write_parquet(path: str | Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
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
    if index_model == "unknown":  # a published index (indexes/published.py) whose model nobody declared
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
