"""Published (clip-retrieval / LAION-5B style) index folders: FAISS parts + parquet metadata, no index.json.

Layout (docs/formats.md, "Published indexes"):

    DIR/image.index                       one FAISS file, or
    DIR/image.index/knn.index00, ...      a folder of parts, or
    DIR/knn.index00, DIR/*.index          parts beside the metadata (text.index is never taken)
    DIR/metadata/*.parquet                concatenated in natural file-name order, row i describes FAISS id i
    DIR/rakt.json                         optional sidecar: {"model", "parts", "metadata", "nprobe"}

This module only looks at the file system: `describe_published` synthesizes the same description index.json
gives (with dim / metric / count left to the FAISS parts), so `FaissIndex.open` searches it on one code path.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from urllib.parse import parse_qs

from rakt.indexes.base import IndexSpecError
from rakt.indexes.layout import INDEX_JSON

log = logging.getLogger("rakt.indexes")

SIDECAR = "rakt.json"
UNKNOWN_MODEL = "unknown"
IMAGE_INDEX = "image.index"
_PART_NAME = re.compile(r"^(knn\.index\d*|.+\.index)$")
_SIDECAR_KEYS = ("model", "parts", "metadata", "nprobe")


def natural_key(name: str) -> list:
    """Sort key that orders 'knn.index2' before 'knn.index10' and '2.parquet' before '10.parquet'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def split_spec(rest: str) -> tuple[str, dict[str, str]]:
    """'/dir?model=NAME' -> ('/dir', {'model': 'NAME'}); a path that exists as given is never split."""
    if "?" not in rest or Path(rest).exists():
        return rest, {}
    path, _, query = rest.rpartition("?")
    options = {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - {"model"})
    if unknown:
        raise IndexSpecError(f"faiss:{rest}: unknown option(s) {', '.join(unknown)}; the only option is ?model=NAME")
    return path, options


def is_published(path: Path) -> bool:
    """A folder without index.json that holds FAISS parts (or a rakt.json sidecar naming them)."""
    return path.is_dir() and not (path / INDEX_JSON).exists() and (
        (path / SIDECAR).exists() or bool(_find_parts(path)))


def _find_parts(path: Path) -> list[str]:
    """Part files relative to `path`: image.index (file or folder of parts), else *.index / knn.indexNN here."""
    image = path / IMAGE_INDEX
    if image.is_file():
        return [IMAGE_INDEX]
    folder = image if image.is_dir() else path
    names = [f.name for f in folder.iterdir() if f.is_file() and _PART_NAME.match(f.name) and f.name != "text.index"]
    prefix = f"{IMAGE_INDEX}/" if folder is image else ""
    return [prefix + name for name in sorted(names, key=natural_key)]


def _read_sidecar(path: Path) -> dict:
    file = path / SIDECAR
    if not file.exists():
        return {}
    try:
        sidecar = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise IndexSpecError(f"{file}: not valid JSON ({e}); write e.g. {{\"model\": "
                             f"\"open_clip:ViT-L-14:openai\"}}") from None
    if not isinstance(sidecar, dict):
        raise IndexSpecError(f"{file}: must be a JSON object such as {{\"model\": \"open_clip:ViT-L-14:openai\"}}")
    unknown = sorted(set(sidecar) - set(_SIDECAR_KEYS))
    if unknown:
        raise IndexSpecError(f"{file}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_SIDECAR_KEYS)}")
    if "parts" in sidecar and not (isinstance(sidecar["parts"], list) and sidecar["parts"]
                                   and all(isinstance(p, str) for p in sidecar["parts"])):
        raise IndexSpecError(f"{file}: 'parts' must be a non-empty list of FAISS file names relative to {path}")
    return sidecar


def metadata_files(path: Path, folder: str = "metadata") -> list[Path]:
    """The metadata parquet files of a published index, in natural name order."""
    meta_dir = path / folder
    files = sorted(meta_dir.glob("*.parquet"), key=lambda f: natural_key(f.name)) if meta_dir.is_dir() else []
    if not files:
        raise IndexSpecError(f"{meta_dir}: no *.parquet metadata; a published index needs a metadata folder whose "
                             f"concatenated rows describe the FAISS ids in order (set \"metadata\" in "
                             f"{path / SIDECAR} if it lives elsewhere)")
    return files


def describe_published(path: Path, model: str | None = None) -> tuple[dict, list[Path]]:
    """The index.json-like description of a published folder, and its metadata files.

    `dim`, `metric` and `count` are None: FaissIndex.open fills them from the parts and checks they agree.
    The model comes from `model` (spec option ?model=), else rakt.json, else "unknown".
    """
    sidecar = _read_sidecar(path)
    parts = sidecar.get("parts") or _find_parts(path)
    if not parts:
        raise IndexSpecError(f"{path}: no index.json and no FAISS parts (image.index, image.index/knn.indexNN, "
                             f"*.index); build an index with `rakt index build` or list the parts in {path / SIDECAR}")
    declared = model or sidecar.get("model")
    if not declared:
        log.warning("%s: published index with no declared embedding model; retrieve will refuse it unless "
                    "--force: write {\"model\": \"open_clip:NAME:PRETRAINED\"} to %s or open 'faiss:%s?model=NAME'",
                    path, path / SIDECAR, path)
    info = {"kind": "published", "model": declared or UNKNOWN_MODEL, "dim": None, "metric": None, "count": None,
            "parts": list(parts), "nprobe": int(sidecar.get("nprobe") or 0),
            "model_source": "spec" if model else SIDECAR if sidecar.get("model") else None}
    return info, metadata_files(path, str(sidecar.get("metadata") or "metadata"))
