"""What a source spec names: WebDataset shards (a file, a brace pattern, a folder of shards), a CSV/parquet
manifest of image files, or an image folder."""
from __future__ import annotations

import os
from pathlib import Path

from rakt.pipeline.formats import SHARD_SUFFIXES, expand_shards, has_brace_pattern
from rakt.pipeline.io import InputError

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
ACCEPTED = ("accepted sources: an image folder (class subfolders), a CSV/parquet manifest with a 'path' "
            "column, WebDataset shards (a .tar/.tar.gz/.tgz file, a brace pattern like "
            "'shards-{000000..000009}.tar', or a folder of shards)")


def detect_source(spec: str) -> tuple[str, list[str]]:
    """(kind, absolute files) of one spec: "shards", "manifest" or "folder"; a missing file is an InputError."""
    if has_brace_pattern(spec):
        paths = expand_shards(spec)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise InputError(f"{spec}: {len(missing)} of {len(paths)} shards not found (first: {missing[0]}); "
                             f"{ACCEPTED}")
        return "shards", paths
    path = Path(spec)
    if not path.exists():
        raise InputError(f"source not found: {spec}; {ACCEPTED}")
    if path.is_file() and spec.endswith(SHARD_SUFFIXES):
        return "shards", [str(path.resolve())]
    if path.is_file() and spec.lower().endswith(MANIFEST_SUFFIXES):
        return "manifest", [str(path.resolve())]
    if path.is_dir():
        tars = sorted(str(p.resolve()) for p in path.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
        return ("shards", tars) if tars else ("folder", [str(path.resolve())])
    raise InputError(f"source {spec}: not an image folder, manifest or shard; {ACCEPTED}")
