"""Where `rakt materialize` may read: the pool's declared roots, and the mapping of manifest locators to files.

The roots are what the pool was declared to be when it was indexed or sampled, found through the manifest's
lineage (manifest.json -> index.json -> embeddings.json `sources`), plus `--pool-root`. A locator whose file,
resolved with its symlinks, lies outside them is never read (docs/formats.md section 5).
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pandas as pd

from rakt.indexes.registry import spec_location
from rakt.pipeline.formats import EMBEDDINGS_JSON, INDEX_JSON, MANIFEST_JSON, has_brace_pattern
from rakt.pipeline.images import DECODE_ERRORS, ImageRefused, open_image
from rakt.pipeline.io import InputError, read_json
from rakt.pipeline.source_specs import detect_source

log = logging.getLogger("rakt.materialize")


class PoolRoots:
    """Declared pool folders (anything below them) and declared pool files (those exact files), resolved."""

    def __init__(self, dirs: list[Path], files: list[Path], origin: str):
        self.dirs = sorted({d.resolve() for d in dirs})
        self.files = {f.resolve() for f in files}
        self.origin = origin

    def __bool__(self) -> bool:
        return bool(self.dirs or self.files)

    def contains(self, path: Path) -> bool:
        """Whether `path` (already resolved) is a declared file or lies below a declared folder."""
        return path in self.files or any(path == d or d in path.parents for d in self.dirs)

    def describe(self) -> dict:
        return {"origin": self.origin, "dirs": [str(d) for d in self.dirs], "files": len(self.files)}


def declared_roots(manifest_dir: Path, pool_root: str = "") -> PoolRoots:
    """The manifest's pool roots (from its lineage) plus `pool_root`; none at all is an InputError."""
    dirs, files, origin = [], [], []
    specs, why = lineage_sources(manifest_dir)
    for spec in specs:
        d, f = spec_roots(spec)
        dirs += d
        files += f
    if specs and (dirs or files):
        origin.append("lineage")
    if pool_root:
        dirs.append(Path(pool_root).expanduser())
        origin.append("--pool-root")
    roots = PoolRoots(dirs, files, " + ".join(origin))
    if not roots:
        raise InputError(f"{manifest_dir / MANIFEST_JSON}: cannot tell which files the pool is made of ({why}); "
                         "materialize copies only files inside the pool's folders: pass --pool-root DIR, the folder "
                         "holding the pool's images or shards")
    return roots


def lineage_sources(manifest_dir: Path) -> tuple[list[str], str]:
    """The source specs the manifest's pool was built from (empty, with the reason, when they cannot be found)."""
    path = manifest_dir / MANIFEST_JSON
    if not path.exists():
        return [], f"no {MANIFEST_JSON} with its lineage"
    meta = read_json(path, "transfer manifest description")
    lineage, sampling = meta.get("lineage") or {}, meta.get("sampling") or {}
    specs = [lineage["index"]] if lineage.get("index") else list(sampling.get("source") or [])
    if not specs:
        return [], "its lineage names no index or pool"
    out = []
    for spec in specs:
        location = Path(spec_location(str(spec)))
        if not (location / INDEX_JSON).exists():
            out.append(str(spec))
            continue
        emb = read_json(location / INDEX_JSON, "index description").get("embeddings")
        if not emb or not (Path(emb) / EMBEDDINGS_JSON).exists():
            return [], f"index {location} records no embedding set it was built from (a published index?)"
        sources = read_json(Path(emb) / EMBEDDINGS_JSON, "embedding set metadata").get("sources") or []
        if not sources:
            return [], f"embedding set {emb} records no sources"
        out += [str(s) for s in sources]
    return out, "its pool sources were not found"


def spec_roots(spec: str) -> tuple[list[Path], list[Path]]:
    """(folders, files) one pool source spec declares; ([], []) with a warning when it is gone."""
    try:
        if not has_brace_pattern(spec) and not Path(spec).exists():
            raise InputError(f"{spec}: not found")
        kind, paths = detect_source(spec)
    except InputError as e:
        log.warning("materialize: pool source %s cannot be used as a root (%s)", spec, e)
        return [], []
    if kind == "folder" or (kind == "shards" and Path(spec).is_dir()):
        return [Path(spec)], []
    if kind == "shards":
        return [], [Path(p) for p in paths]
    return [], manifest_files(Path(paths[0]))


def manifest_files(manifest: Path) -> list[Path]:
    """The image files a CSV/parquet pool manifest lists (relative paths are relative to its folder)."""
    try:
        if manifest.suffix.lower() == ".csv":
            given = pd.read_csv(manifest, dtype=str, usecols=["path"])["path"]
        else:
            given = pd.read_parquet(manifest, columns=["path"])["path"]
    except (OSError, ValueError, KeyError) as e:
        log.warning("materialize: pool manifest %s cannot be read (%s); not a root", manifest, e)
        return []
    return [Path(p) if os.path.isabs(p) else manifest.parent / p for p in given.dropna().astype(str)]


# PIL's format names -> the member extension materialize writes (all of them in IMAGE_EXTS)
FORMAT_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


def pool_file(path: Path, roots: PoolRoots, missing: str, unreadable: str) -> tuple[Path | None, str | None]:
    """(the resolved regular file, None), or (None, cause): outside_pool, `missing`, not_a_file or `unreadable`."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None, unreadable
    if not roots.contains(real):
        return None, "outside_pool"
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        return None, missing
    except OSError:
        return None, unreadable
    return (real, None) if stat.S_ISREG(mode) else (None, "not_a_file")


def image_ext(data: bytes) -> tuple[str | None, str]:
    """(the extension, "") when `data` decodes as one of IMAGE_EXTS' formats, else (None, the skip's cause):
    not_an_image, or the refusal of pipeline.images (extreme_aspect_ratio, image_too_large, ...)."""
    try:
        with open_image(data) as img:
            ext = FORMAT_EXTS.get(img.format or "")
            if ext is None:
                return None, "not_an_image"
            img.draft("RGB", (64, 64))  # JPEG: decoded at a reduced scale, still every block
            img.load()
            return ext, ""
    except ImageRefused as e:
        return None, e.cause
    except DECODE_ERRORS:
        return None, "not_an_image"


class PoolResolver:
    """Maps manifest locations to files: relative ones under pool_root; a moved absolute one to pool_root/SUFFIX,
    SUFFIX being the longest tail of its old directory that exists under pool_root (found once per directory)."""

    def __init__(self, pool_root: str = ""):
        self.root = Path(pool_root).expanduser() if pool_root else None
        self.dirs: dict[Path, Path] = {}

    def __call__(self, location: str) -> Path:
        path = Path(location)
        if self.root is None:
            return path
        if not path.is_absolute():
            return self.root / path
        parent = path.parent
        if parent not in self.dirs:
            tails = [Path(*parent.parts[i:]) for i in range(1, len(parent.parts))] + [Path()]
            found = next((self.root / t for t in tails if (self.root / t / path.name).exists()), None)
            if found is None:
                return self.root / path.name
            self.dirs[parent] = found
        return self.dirs[parent] / path.name

