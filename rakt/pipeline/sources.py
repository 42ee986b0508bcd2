"""Readers of target/pool images: image folders, CSV/parquet manifests and WebDataset shards.

`open_source(specs)` lists what a source holds and splits it into partitions; `Source.read(partition,
stats)` yields `Sample`s with the encoded image bytes as stored. Decoding happens in the embed stage.
Records that cannot be read are skipped, counted in `stats` by cause and logged with their file/key.

Few-shot draw (`per_class` > 0): every labelled sample gets the rank key sha256(f"{seed}:{id}")
(ties broken by its file), and the N samples with the smallest keys in each class are kept. The draw
depends only on the ids, labels and seed — not on partitioning or reading order — and adding images to a
source changes it only where a new image ranks among the N. Unlabelled samples are left out.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd

from rakt.pipeline.formats import (IMAGE_EXTS, LOCATOR_COLUMNS, classes_beside, is_image_name,  # noqa: F401
                                   read_classes)  # (IMAGE_EXTS, is_image_name, read_classes: re-exported)
from rakt.pipeline.images import MAX_FILE_BYTES
from rakt.pipeline.io import InputError, special_file
from rakt.pipeline.shard_records import shard_records
from rakt.pipeline.source_specs import ACCEPTED, detect_source

log = logging.getLogger("rakt")



@dataclass
class Sample:
    """One image as stored: `id` is the WebDataset key, or the path relative to the folder / as in the manifest;
    `locator` finds it again: {"shard", "key"} or {"path"} (+ "url", "caption" from a manifest)."""
    id: str
    image: bytes
    label: int | None
    split: str | None
    locator: dict


@dataclass
class Partition:
    """A unit of work: one shard, or up to `partition_size` image files; `name` is stable across runs."""
    index: int
    name: str
    files: list[str]

    def __str__(self) -> str:
        more = f" and {len(self.files) - 1} more" if len(self.files) > 1 else ""
        return f"partition {self.name} ({self.files[0] if self.files else 'empty'}{more})"


@dataclass
class _FileEntry:
    """What a folder/manifest says about one image file."""
    id: str
    label: int | None
    split: str | None = None
    extra: dict = field(default_factory=dict)  # url / caption from a manifest
    bad_label: str | None = None               # a label value that names no class


@dataclass
class Source:
    """A set of images split into partitions; picklable, so workers can read it."""
    specs: list[str]
    classes: list[str] | None
    partitions: list[Partition]
    locator_columns: list[str]
    entries: dict[str, _FileEntry] = field(default_factory=dict)  # abs image path -> entry
    keep: set[tuple[str, str]] | None = None                      # per-class draw over shards: (shard, key)

    def read(self, partition: Partition, stats: collections.Counter) -> Iterator[Sample]:
        """Yield the partition's samples in source order; unreadable records are counted in `stats`."""
        for path in partition.files:
            if path not in self.entries:
                yield from self._read_shard(path, stats)
            elif (sample := self._read_file(path, stats)) is not None:
                yield sample

    def _read_file(self, path: str, stats: collections.Counter) -> Sample | None:
        entry = self.entries[path]
        if entry.bad_label is not None:
            stats["bad_label"] += 1
            log.warning("%s: label %r names no class; skipped", path, entry.bad_label)
            return None
        kind = special_file(path)
        if kind is not None:  # a FIFO or device would block the read or never end it
            stats["not_a_regular_file"] += 1
            log.warning("%s: %s, not a regular file; skipped", path, kind)
            return None
        try:
            if os.stat(path).st_size > MAX_FILE_BYTES:  # declared size: never read
                stats["file_too_large"] += 1
                log.warning("%s: larger than %d MiB; skipped", path, MAX_FILE_BYTES >> 20)
                return None
            data = Path(path).read_bytes()
        except OSError as e:
            stats["unreadable_file"] += 1
            log.warning("%s: unreadable (%s); skipped", path, e.strerror or e)
            return None
        return Sample(entry.id, data, entry.label, entry.split, {"path": path, **entry.extra})

    def _read_shard(self, shard: str, stats: collections.Counter) -> Iterator[Sample]:
        for record in shard_records(shard, stats):
            key = record["__key__"]
            if self.keep is not None and (shard, key) not in self.keep:
                continue
            ext = next((e for e in IMAGE_EXTS if e in record), None)
            if ext is None:
                stats["no_image"] += 1
                log.warning("%s: sample %s has no image (%s); skipped", shard, key, ", ".join(IMAGE_EXTS))
                continue
            label = None
            if "cls" in record:
                label = _parse_label(record["cls"], self.classes)
                if label is None:
                    stats["bad_label"] += 1
                    log.warning("%s: sample %s has label %r, not a class index; skipped",
                                shard, key, record["cls"][:40])
                    continue
            yield Sample(key, record[ext], label, _json_split(record, shard), {"shard": shard, "key": key})


def _parse_label(raw: bytes, classes: list[str] | None) -> int | None:
    try:
        label = int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if label < 0 or (classes is not None and label >= len(classes)):
        return None
    return label


def _json_split(record: dict, shard: str) -> str | None:
    if "json" not in record:
        return None
    try:
        meta = json.loads(record["json"])
    except ValueError:
        log.warning("%s: sample %s has an unparsable .json; its split is unknown", shard, record["__key__"])
        return None
    split = meta.get("split") if isinstance(meta, dict) else None
    return None if split is None else str(split)


def count_hint(source: "Source", partitions: list[Partition] | None = None, max_shards: int = 256) -> int | None:
    """How many samples the partitions hold, for progress lines: files counted, shards from their tar headers;
    None when there are more than `max_shards` shards to list (too slow to count up front)."""
    import tarfile

    partitions = source.partitions if partitions is None else partitions
    shards = [f for p in partitions for f in p.files if f not in source.entries]
    if len(shards) > max_shards:
        return None
    total = sum(1 for p in partitions for f in p.files if f in source.entries)
    for shard in shards:
        try:
            with tarfile.open(shard, "r:*") as tar:
                names = [m.name for m in tar if m.isfile()]
        except (tarfile.TarError, OSError, EOFError):
            continue
        keys = {n.rsplit("/", 1)[-1].split(".", 1)[0] for n in names
                if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS}
        total += len(keys) if source.keep is None else len({k for s, k in source.keep if s == shard})
    return total


# --- opening a source ----------------------------------------------------------------------------

def open_source(specs: list[str], *, classes_file: str = "", per_class: int = 0, seed: int = 0,
                partition_size: int = 10000) -> Source:
    """List the images of one or more source specs and split them into partitions (in spec order)."""
    if not specs:
        raise InputError(f"no source given; {ACCEPTED}")
    if partition_size < 1:
        raise InputError(f"partition_size must be at least 1, got {partition_size}")
    classes = read_classes(Path(classes_file)) if classes_file else None
    found = [(spec, *detect_source(spec)) for spec in specs]
    if not classes_file:
        for spec, kind, paths in found:
            here = (_class_dirs(Path(paths[0])) or None) if kind == "folder" else classes_beside(paths[0])
            classes = _merge_classes(classes, here, spec)
    entries: dict[str, _FileEntry] = {}
    columns: set[str] = set()
    groups: list[tuple[str, list[str]]] = []  # ("shard", [path]) or ("files", paths of one spec)
    for spec, kind, paths in found:
        if kind == "shards":
            groups += [("shard", [p]) for p in paths]
            columns |= {"shard", "key"}
            continue
        if kind == "manifest":
            new = _manifest_entries(Path(paths[0]), classes)
            columns |= {c for e in new.values() for c in e.extra}
        else:
            new = _folder_entries(Path(paths[0]), _class_dirs(Path(paths[0])), classes)
        columns.add("path")
        groups.append(("files", _add_entries(entries, new, spec)))
    shards = [g[1][0] for g in groups if g[0] == "shard"]
    if not shards and not entries:
        raise InputError(f"{', '.join(specs)}: no images found; {ACCEPTED}")

    keep = None
    if per_class > 0:
        labelled = [(e.id, p, e.label) for p, e in entries.items() if e.label is not None and e.bad_label is None]
        for shard in shards:
            labelled += [(key, shard, label) for key, label in _shard_labels(shard, classes)]
        chosen = _draw_per_class(labelled, per_class, seed, classes, specs)
        groups = [(k, [p for p in ps if (p, entries[p].id) in chosen]) if k == "files" else (k, ps)
                  for k, ps in groups]
        keep = {c for c in chosen if c[0] not in entries}
    parts: list[list[str]] = []
    for kind, paths in groups:
        step = len(paths) if kind == "shard" else partition_size
        parts += [paths[i:i + step] for i in range(0, len(paths), step)]
    used = {p: entries[p] for files in parts for p in files if p in entries}
    partitions = [Partition(i, f"{i:05d}", files) for i, files in enumerate(parts)]
    return Source([str(s) for s in specs], classes, partitions,
                  [c for c in LOCATOR_COLUMNS if c in columns], used, keep)


def _merge_classes(current: list[str] | None, new: list[str] | None, spec: str) -> list[str] | None:
    if current is None or new is None or current == new:
        return current if current is not None else new
    raise InputError(f"{spec}: its classes ({', '.join(new[:5])}, ...) differ from an earlier source's "
                     f"({', '.join(current[:5])}, ...); pass --classes classes.txt to name them once")


def _add_entries(entries: dict[str, _FileEntry], new: dict[str, _FileEntry], spec: str) -> list[str]:
    """Add a spec's entries; returns its paths not listed by an earlier spec, in order."""
    twice = [p for p in new if p in entries]
    if twice:
        log.warning("%s: %d images were already listed by an earlier source (e.g. %s); kept once",
                    spec, len(twice), twice[0])
    fresh = [p for p in new if p not in entries]
    entries.update((p, new[p]) for p in fresh)
    return fresh


def _class_dirs(root: Path) -> list[str]:
    """Subfolders that hold images, sorted: their names are the classes of a folder source."""
    names = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not is_image_name(d.name) and any(is_image_name(f.name) for f in d.rglob("*")):
            names.append(d.name)
    return names


def _folder_entries(root: Path, subdirs: list[str], classes: list[str] | None) -> dict[str, _FileEntry]:
    """Every image-named path under root (also unreadable ones: they become counted skips)."""
    index = {name: i for i, name in enumerate(classes or [])}
    missing = [d for d in subdirs if d not in index]
    if missing:
        raise InputError(f"{root}: class folder '{missing[0]}' is not in the classes list; add it to the "
                         f"classes file or remove the folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = [n for n in filenames + [d for d in dirnames if is_image_name(d)] if is_image_name(n)]
        found += [os.path.join(dirpath, n) for n in names]
    entries = {}
    for path in sorted(found, key=lambda p: Path(p).relative_to(root).as_posix()):
        rel = Path(path).relative_to(root).as_posix()
        top = rel.split("/", 1)[0] if "/" in rel else None
        entries[path] = _FileEntry(rel, index.get(top) if top else None)
    return entries


def _manifest_entries(manifest: Path, classes: list[str] | None) -> dict[str, _FileEntry]:
    """Rows of a CSV/parquet manifest; a row naming a missing file is an InputError."""
    try:
        if manifest.suffix.lower() == ".csv":
            df = pd.read_csv(manifest, dtype=str, keep_default_na=True)
        else:
            df = pd.read_parquet(manifest)
    except (OSError, ValueError) as e:
        raise InputError(f"manifest {manifest}: cannot read it ({e})") from None
    if "path" not in df.columns:
        raise InputError(f"manifest {manifest}: no 'path' column (columns: {', '.join(map(str, df.columns))})")
    extras = [c for c in ("url", "caption") if c in df.columns]
    entries = {}
    for row, rec in enumerate(df.to_dict("records"), start=1):
        given = str(rec["path"])
        path = given if os.path.isabs(given) else os.path.normpath(manifest.parent / given)
        if not os.path.lexists(path):
            raise InputError(f"manifest {manifest}, row {row}: file not found: {given} (resolved to {path}); "
                             f"remove the row or fix the path")
        label, bad = _manifest_label(rec.get("label"), classes, manifest)
        split = rec.get("split")
        extra = {c: (None if _missing(rec[c]) else str(rec[c])) for c in extras}
        if path in entries:
            log.warning("manifest %s, row %d: %s listed twice; kept the first row", manifest, row, given)
            continue
        entries[path] = _FileEntry(given, label, None if _missing(split) else str(split), extra, bad)
    return entries


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _manifest_label(value, classes: list[str] | None, manifest: Path) -> tuple[int | None, str | None]:
    """(label, bad value) of a manifest cell: an int index, or a class name mapped via classes."""
    if _missing(value):
        return None, None
    if isinstance(value, (int, float)) and float(value).is_integer():
        label = int(value)
    else:
        text = str(value).strip()
        try:
            label = int(text)
        except ValueError:
            if classes is None:
                raise InputError(f"manifest {manifest}: label {text!r} is a class name but no classes list is "
                                 f"known; pass --classes classes.txt or put classes.txt beside the manifest") from None
            return (classes.index(text), None) if text in classes else (None, text)
    if label < 0 or (classes is not None and label >= len(classes)):
        return None, str(value)
    return label, None


def _shard_labels(shard: str, classes: list[str] | None) -> list[tuple[str, int]]:
    """(key, label) of a shard's samples with a valid .cls, reading only the .cls members."""
    pairs = []
    for record in shard_records(shard, collections.Counter(), select_files=lambda f: f.endswith(".cls")):
        label = _parse_label(record["cls"], classes) if "cls" in record else None
        if label is not None:
            pairs.append((record["__key__"], label))
    return pairs


def draw_rank(seed: int, sample_id: str) -> str:
    """A sample's place in a seeded per-class draw (sha256 of "seed:id"); `rakt labelled` and `rakt carve` share it."""
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def _draw_per_class(labelled: list[tuple[str, str, int]], n: int, seed: int,
                    classes: list[str] | None, specs: list[str]) -> set[tuple[str, str]]:
    """The n lowest-ranked (sha256 of seed:id) samples of each class, as (file or shard, id) pairs."""
    if not labelled:
        raise InputError(f"{', '.join(specs)}: --per-class {n} needs labelled images, but none have a label")
    by_class: dict[int, list] = collections.defaultdict(list)
    for sid, where, label in labelled:
        rank = draw_rank(seed, sid)
        by_class[label].append((rank, where, sid))
    chosen: set[tuple[str, str]] = set()
    for label in sorted(by_class):
        picked = sorted(by_class[label])[:n]
        if len(picked) < n:
            name = classes[label] if classes and label < len(classes) else label
            log.warning("class %s has only %d images; --per-class %d keeps all of them", name, len(picked), n)
        chosen.update((where, sid) for _, where, sid in picked)
    log.info("per-class draw: %d images from %d classes (seed %d)", len(chosen), len(by_class), seed)
    return chosen
