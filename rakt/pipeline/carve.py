"""`rakt carve`: a labelled target task carved out of a pool of shards, e.g. Fashion-MNIST out of the data kit's
pool, whose KEY.json carries each image's evaluation-only {"source", "orig_label"}.

This is the one stage allowed to select pool images by `source` and `orig_label`: here they define the task, and
nothing downstream reads them to select. From the images of `--source` it draws, per class, `--test-per-class` test
images and then `--train-per-class` labelled training images, in one seeded order (the sha256 of "seed:key", as
the few-shot draw of `rakt labelled` ranks): changing the train count keeps the test set. It writes

    OUT/train/train-000000.tar + classes.txt   the labelled images (KEY.jpg as in the pool, KEY.cls, KEY.json)
    OUT/test/test-000000.tar + classes.txt     the test images
    OUT/pool/pool-NNNNNN.tar                   input shard N without those images, every other sample's members
                                               byte for byte (the source's other images stay, as unlabelled data)
    OUT/carve.json                             settings, inputs, counts; written last: a rerun with the same
                                               settings and inputs skips, other settings redo it

so the pool that gets indexed never holds a test or labelled image.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil
from pathlib import Path

from webdataset import TarWriter

from rakt.pipeline.config import CarveConfig, to_dict
from rakt.pipeline.formats import CARVE_JSON, CARVE_POOL, CARVE_TEST, CARVE_TRAIN, CLASSES_TXT, IMAGE_EXTS
from rakt.pipeline.io import InputError, atomic_path, json_hash, read_json, write_json
from rakt.pipeline.shard_records import shard_records
from rakt.pipeline.source_specs import detect_source
from rakt.pipeline.sources import draw_rank

log = logging.getLogger("rakt")

TAR_MTIME = 946684800  # fixed, so a shard's bytes depend on its content only (as `rakt labelled`'s)


def run(cfg: CarveConfig) -> dict:
    if cfg.train_per_class < 1 or cfg.test_per_class < 0:
        raise InputError(f"--train-per-class must be >= 1 and --test-per-class >= 0, got {cfg.train_per_class} "
                         f"and {cfg.test_per_class}")
    if not cfg.source:
        raise InputError("--source is required: the KEY.json 'source' whose images make the task")
    shards = pool_shards(cfg.pool)
    out = Path(cfg.out)
    identity = json_hash({"settings": {k: v for k, v in to_dict(cfg).items() if k not in ("pool", "out")},
                          "inputs": [[s, os.path.getsize(s)] for s in shards]})
    done = out / CARVE_JSON
    if done.exists():
        meta = read_json(done, "carve record")
        if meta.get("identity") == identity and all((out / f).exists() for f in meta.get("files", [])):
            log.info("%s: carved with the same settings and inputs; skipped", out)
            return {**meta["summary"], "skipped": True}
        log.info("%s: carved with other settings or inputs; carving again", out)
    _clear(out)

    stats: collections.Counter = collections.Counter()
    found = _source_samples(shards, cfg.source, stats)
    classes = list(cfg.classes) or sorted({str(label) for _, _, label, _ in found})
    by_class = _by_class(found, classes, cfg)
    test, train = _draw(by_class, classes, cfg)
    carved = {(s["shard"], s["key"]) for s in (*test, *train)}

    files = [CARVE_TRAIN, CARVE_TEST]
    for rel, split, samples in ((CARVE_TRAIN, "train", train), (CARVE_TEST, "test", test)):
        _write_split(out / rel, split, samples, classes)
    pool_counts = []
    for i, shard in enumerate(shards):
        rel = f"{CARVE_POOL}/pool-{i:06d}.tar"
        kept = _write_pool_shard(shard, out / rel, carved)
        pool_counts.append({"from": shard, "to": rel, "images": kept})
        files.append(rel)
    left = collections.Counter(classes[s["label"]] for samples in by_class.values() for s in samples
                               if (s["shard"], s["key"]) not in carved)
    summary = {"out": str(out), "source": cfg.source, "classes": classes,
               "train": _per_class(train, classes), "test": _per_class(test, classes),
               "pool_images": sum(p["images"] for p in pool_counts), "removed_from_pool": len(carved),
               "left_in_pool": {c: left[c] for c in classes}, "skipped_samples": dict(stats)}
    write_json(done, {"identity": identity, "config": to_dict(cfg), "pool_shards": pool_counts, "files": files,
                      "summary": summary})
    return {**summary, "skipped": False}


def pool_shards(specs: list[str]) -> list[str]:
    """The pool's shard files, in spec order; anything but shards is an InputError."""
    if not specs:
        raise InputError("no pool given: pool shards (files, brace patterns or a folder of .tar/.tar.gz)")
    shards: list[str] = []
    for spec in specs:
        kind, paths = detect_source(spec)
        if kind != "shards":
            raise InputError(f"{spec}: `rakt carve` reads WebDataset shards whose KEY.json names each image's "
                             f"source, not an image {kind}")
        shards += [p for p in paths if p not in shards]
    return shards


def _clear(out: Path) -> None:
    """Remove what an earlier carve wrote (only its own names): a changed carve starts from nothing."""
    (out / CARVE_JSON).unlink(missing_ok=True)
    for sub in {Path(CARVE_TRAIN).parent, Path(CARVE_TEST).parent, Path(CARVE_POOL)}:
        shutil.rmtree(out / sub, ignore_errors=True)


def _meta(record: dict) -> dict | None:
    try:
        meta = json.loads(record["json"]) if "json" in record else None
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _image_ext(record: dict) -> str | None:
    return next((e for e in IMAGE_EXTS if e in record), None)


def _source_samples(shards: list[str], source: str, stats: collections.Counter) -> list[tuple]:
    """(shard, key, orig_label, image member) of every sample whose KEY.json names `source`, in pool order."""
    found, sources = [], collections.Counter()
    for shard in shards:
        for record in shard_records(shard, stats):
            meta = _meta(record)
            if meta is None:
                stats["no_json"] += 1
                continue
            sources[str(meta.get("source"))] += 1
            ext = _image_ext(record)
            if meta.get("source") == source and ext:
                found.append((shard, record["__key__"], meta.get("orig_label"), (ext, record[ext])))
    if not found:
        seen = ", ".join(f"{s} ({n})" for s, n in sources.most_common()) or "none: no KEY.json"
        raise InputError(f"{', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''}: no image of source "
                         f"{source!r} in the pool; the sources found: {seen}")
    return found


def _label(value, classes: list[str]) -> int | None:
    if str(value) in classes:
        return classes.index(str(value))
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(classes):
        return value
    return None


def _by_class(found: list[tuple], classes: list[str], cfg: CarveConfig) -> dict[int, list[dict]]:
    by_class: dict[int, list[dict]] = {i: [] for i in range(len(classes))}
    for shard, key, value, image in found:
        label = _label(value, classes)
        if label is None:
            raise InputError(f"{shard}: sample {key} of source {cfg.source!r} has orig_label {value!r}, not one of "
                             f"--classes ({', '.join(classes)})")
        rank = draw_rank(cfg.seed, key)
        by_class[label].append({"rank": rank, "shard": shard, "key": key, "label": label, "image": image})
    need = cfg.train_per_class + cfg.test_per_class
    short = {classes[c]: len(s) for c, s in by_class.items() if len(s) < need}
    if short:
        raise InputError(f"source {cfg.source!r}: too few images for {cfg.test_per_class} test + "
                         f"{cfg.train_per_class} train per class: " + ", ".join(f"{c} has {n}" for c, n in
                                                                               short.items())
                         + "; lower --test-per-class/--train-per-class or give more pool shards")
    return by_class


def _draw(by_class: dict[int, list[dict]], classes: list[str], cfg: CarveConfig) -> tuple[list, list]:
    """Per class, in seeded rank order: the first test_per_class are test, the next train_per_class train."""
    test, train = [], []
    for label in range(len(classes)):
        ranked = sorted(by_class[label], key=lambda s: (s["rank"], s["shard"], s["key"]))
        test += ranked[:cfg.test_per_class]
        train += ranked[cfg.test_per_class:cfg.test_per_class + cfg.train_per_class]
    log.info("carved %d test and %d train images of %d classes (seed %d)", len(test), len(train), len(classes),
             cfg.seed)
    return test, train


def _write_split(dest: Path, split: str, samples: list[dict], classes: list[str]) -> None:
    """One shard in pool order (its own key, deduplicated) + classes.txt beside it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest.parent / CLASSES_TXT) as tmp:
        tmp.write_text("".join(f"{c}\n" for c in classes))
    keys: set[str] = set()
    with atomic_path(dest) as tmp, TarWriter(str(tmp), encoder=False, mtime=TAR_MTIME) as sink:
        for i, s in enumerate(sorted(samples, key=lambda s: (s["shard"], s["key"]))):
            key = s["key"] if s["key"] not in keys else f"{s['key']}_{i}"
            keys.add(key)
            meta = {"class": classes[s["label"]], "split": split, "pool_shard": s["shard"], "pool_key": s["key"]}
            ext, data = s["image"]
            sink.write({"__key__": key, ext: data, "cls": str(s["label"]).encode(),
                        "json": json.dumps(meta, sort_keys=True).encode()})


def _write_pool_shard(shard: str, dest: Path, carved: set[tuple[str, str]]) -> int:
    """`shard` without the carved samples, as a plain tar; returns the samples kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    with atomic_path(dest) as tmp, TarWriter(str(tmp), encoder=False, mtime=TAR_MTIME) as sink:
        for record in shard_records(shard, collections.Counter()):  # counted once, by the first pass
            if (shard, record["__key__"]) in carved:
                continue
            sink.write({k: v for k, v in record.items() if k == "__key__" or not k.startswith("_")})
            kept += 1
    return kept


def _per_class(samples: list[dict], classes: list[str]) -> dict[str, int]:
    counts = collections.Counter(classes[s["label"]] for s in samples)
    return {c: counts[c] for c in classes}

