"""`rakt score`: the adapted teacher's view of every retrieved candidate, for teacher-aware curation.

The candidates' pool images are collected once into shards (`rakt materialize` over a manifest of the distinct
candidates; a local pool only), decoded, and the teacher's logits on each whole image are computed (the teacher
cache of `rakt distill`, teacher view "clean"). Writes `scores.parquet` (pool_id, id, pred: the teacher's class,
prob: its softmax probability, logits) and `scores.json` (lineage, counts per predicted class). `rakt curate
--teacher-scores` reads them (see rakt/pipeline/curate/rules.py).
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rakt.distill.image_bank import open_bank
from rakt.distill.config import ScoreConfig
from rakt.distill.batches import ViewSpec
from rakt.distill.teacher.checkpoint import load_teacher, read_teacher_meta
from rakt.distill.teacher_cache import build_cache
from rakt.pipeline.config import ConfigError, MaterializeConfig, config_hash, to_dict
from rakt.pipeline.manifest_rows import attach_metadata, summarize
from rakt.pipeline.device import resolve_device, set_threads
from rakt.pipeline.formats import (CANDIDATES_JSON, CANDIDATES_PARQUET, SCORES_JSON, SCORES_PARQUET, read_candidates,
                                   write_manifest)
from rakt.pipeline.io import InputError, file_hash, read_json, timed, write_json, write_parquet

log = logging.getLogger("rakt")


def check(cfg: ScoreConfig) -> None:
    """The settings' own checks (also run by `rakt run` before its first step)."""
    if not cfg.candidates or not cfg.teacher or not cfg.out:
        raise ConfigError("rakt score: give the candidates directory, --teacher and --out")
    if cfg.max_rank < 0 or cfg.batch_size < 1:
        raise ConfigError("rakt score: --max-rank must be >= 0 and --batch-size >= 1")


def run(cfg: ScoreConfig) -> dict:
    """Score the distinct candidates of `cfg.candidates` with the teacher; write OUT/scores.parquet + scores.json."""
    from rakt.indexes.registry import open_index
    from rakt.pipeline import materialize

    check(cfg)
    set_threads(cfg.threads)
    cand_dir, out = Path(cfg.candidates), Path(cfg.out)
    cmeta = read_json(cand_dir / CANDIDATES_JSON, "candidates metadata; run `rakt retrieve` first")
    cands = read_candidates(cand_dir / CANDIDATES_PARQUET)
    cands = cands[(cands["pool_id"] >= 0) & ((cands["rank"] < cfg.max_rank) if cfg.max_rank else True)]
    if cands.empty:
        raise InputError(f"{cand_dir / CANDIDATES_PARQUET}: no candidates to score")
    classes = list(read_teacher_meta(cfg.teacher).get("classes") or [])
    with timed("score"):
        index = open_index(cmeta["index"])
        pool = out / "pool"  # a manifest of the distinct candidates: what materialize collects
        manifest = attach_metadata(summarize(cands, dedup=True), index)
        if not ({"shard", "key"} <= set(manifest.column_names) or "path" in manifest.column_names):
            raise InputError(f"index {cmeta['index']}: its pool images are located by URL only, and `rakt score` "
                             "reads the candidates' images from a local pool (shard+key or path); teacher-aware "
                             "curation needs a local pool (or an index with local copies)")
        write_manifest(pool, manifest, {"lineage": {"index": cmeta["index"], "candidates": str(cand_dir.resolve())}})
        collected = materialize.run(MaterializeConfig(manifest=str(pool), out=str(out / "shards"),
                                                      pool_root=cfg.pool_root))
        device = resolve_device(cfg.device)
        teacher = load_teacher(cfg.teacher, device=str(device), precision=cfg.precision)
        bank = open_bank([str(out / "shards")], teacher.pixels.resize or teacher.pixels.crop)
        cache = build_cache(teacher, bank, cfg.teacher, kind="clean", views=1, spec=ViewSpec("none"), seed=0,
                            features=False, device=device, batch_size=cfg.batch_size, folder=bank.folder)
    logits = torch.from_numpy(cache.logits[0]).float()
    probs = logits.softmax(-1)
    prob, pred = probs.max(-1)
    pool_ids = np.array([materialize.pool_id_of(k) for k in bank.keys], np.int64)
    table = pa.table({"pool_id": pool_ids, "id": index.metadata(pool_ids)["id"].cast(pa.string()),
                      "pred": pa.array(pred.numpy().astype(np.int32)), "prob": pa.array(prob.numpy()),
                      "logits": pa.array(list(logits.numpy()), pa.list_(pa.float32()))})
    write_parquet(out / SCORES_PARQUET, table)
    per_class = np.bincount(pred.numpy(), minlength=len(classes)).tolist()
    meta = {"candidates": str(cand_dir.resolve()), "candidates_hash": file_hash(cand_dir / CANDIDATES_PARQUET),
            "teacher": str(Path(cfg.teacher).resolve()), "teacher_hash": file_hash(cfg.teacher), "classes": classes,
            "scored": len(bank), "candidates_distinct": int(cands["pool_id"].nunique()),
            "not_collected": collected.get("missing", 0), "predicted_per_class": per_class,
            "mean_prob": round(float(prob.mean()), 4), "settings": to_dict(cfg), "config_hash": config_hash(cfg),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json(out / SCORES_JSON, meta)
    log.info("score: %d candidates scored by %s (mean top probability %.3f) -> %s", len(bank), cfg.teacher,
             meta["mean_prob"], out / SCORES_PARQUET)
    return {"out": str(out), "scored": len(bank), "not_collected": meta["not_collected"],
            "mean_prob": meta["mean_prob"]}
