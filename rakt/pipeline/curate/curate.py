"""Candidates -> transfer manifest under a fixed budget: per-query k or class balance, dedup, filters, lineage."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from rakt.pipeline.config import ConfigError, CurateConfig, config_hash, to_dict
from rakt.pipeline.curate.similarity import empty_removed, load_eval_set
from rakt.pipeline.curate.rules import CurateContext, leakage_report, registered
from rakt.pipeline.curate.select import UNLABELLED, class_groups, select_filtered
from rakt.pipeline.manifest_rows import attach_metadata, summarize
from rakt.pipeline.curate.windows import CandidateWindows, Spill
from rakt.pipeline.formats import (CANDIDATES_JSON, CANDIDATES_PARQUET, MANIFEST_PARQUET, REMOVED_PARQUET,
                                   REMOVED_SCHEMA, read_scores, write_manifest)
from rakt.pipeline.progress import Progress
from rakt.pipeline.io import InputError, file_hash, json_hash, read_json, timed
from rakt.pipeline.prompts import TEXT_QUERY_PREFIX

log = logging.getLogger("rakt.curate")

SPILL = ".candidates-kept.parquet"  # the rows the candidate rules kept, while selection reads them


def run(cfg: CurateConfig) -> dict:
    """Select the transfer set from a candidates directory and write manifest.parquet/.json + removed.parquet."""
    from rakt.indexes.registry import open_index

    check(cfg)
    with timed("curate"):
        cand_dir, out = Path(cfg.candidates), Path(cfg.out)
        cmeta = read_json(cand_dir / CANDIDATES_JSON, "candidates metadata; run `rakt retrieve` first")
        cands = CandidateWindows(cand_dir / CANDIDATES_PARQUET)
        queries = cands.queries()
        if cmeta.get("n_queries") not in (None, len(queries)):
            log.warning("%s records %s queries but %s holds %d", CANDIDATES_JSON, cmeta["n_queries"],
                        CANDIDATES_PARQUET, len(queries))
        n_image = count_image_queries(queries, cmeta)
        quotas, k, shares = plan_quotas(queries, cfg, n_image)
        spec = cfg.index or cmeta.get("index")
        if not spec:
            raise InputError(f"{cand_dir / CANDIDATES_JSON}: no 'index' recorded; pass --index")
        index = open_index(spec)

        counts: dict = {"queries": len(queries), "image_queries": n_image, "text_queries": len(queries) - n_image}
        ev = load_eval_set(cfg.eval_embeddings, cfg.eval_split, cmeta.get("embeddings"), index.model, index.dim,
                           _model_of)
        if not ev.enabled and cfg.require_leakage_guard:
            raise InputError(f"rakt curate: the leakage guard is required but has no eval images: {ev.reason}; "
                             "embed the target's test images and pass them as --eval-embeddings")
        guard = (f"on: {len(ev.ids)} eval images, cosine > {cfg.leakage_threshold:g} dropped" if ev.enabled
                 else f"OFF: {ev.reason}; pool images may duplicate the target's test images")
        scores, classes = teacher_scores(cfg, cand_dir)
        ctx = CurateContext(cfg, index, ev, out / REMOVED_PARQUET, scores, classes, class_groups(queries, cfg))
        spill = Spill(out / SPILL)
        try:
            removed_parts = filter_candidates(cands, ctx, counts, spill)
            hits, dropped = select_filtered(spill.windows, quotas, ctx)
        finally:
            spill.remove()
        images = summarize(hits, cfg.dedup)
        for rule in registered("selected"):  # a rule that did not run counts 0
            counts[rule.count] = sum(len(part) for part in dropped.get(rule.name, []))
            removed_parts.extend(dropped.get(rule.name, []))
        counts["dedup_merged"] = int((~hits["took"]).sum()) if len(hits) else 0
        counts["selected"] = len(images)
        counts["empty_slots"] = int(quotas.sum()) - len(images)
        counts["per_class"] = per_class(images)
        if scores is not None:  # the selected set as the teacher sees it
            counts["teacher_predicted"] = predicted_per_class(images, scores, classes)
        if "deferred" in hits:  # images taken by a query whose class the teacher does not predict
            counts["teacher_disagree_selected"] = int(hits.loc[hits["took"] & hits["deferred"], "pool_id"].nunique())
        if counts["empty_slots"] > 0:
            fetched = cmeta.get("k", cands.ranks)
            log.warning("%d of %d slots stay empty: the candidates ran out after filtering (retrieve fetched "
                        "k=%s per query); rerun `rakt retrieve --k %d` (or --fill-per-class %d) for more candidates",
                        counts["empty_slots"], int(quotas.sum()), fetched, max(2 * int(fetched or 1), k + 1),
                        max(2 * int(quotas.sum()) // max(len(shares), 1), 2 * int(cmeta.get("fill_per_class") or 0)))

        manifest = attach_metadata(images, index)
        removed = add_pool_names(concat_removed(removed_parts), index)
        meta = {
            "counts": counts,
            "settings": to_dict(cfg),
            "per_query_k": k,
            "quota": {"total": int(quotas.sum()), "per_class": shares},
            "leakage_guard": {**ev.info(), "threshold": cfg.leakage_threshold, "status": guard},
            "lineage": {"candidates": str(cand_dir.resolve()), "candidates_json_hash": json_hash(cmeta),
                        "index": spec, "index_model": index.model, "embeddings": cmeta.get("embeddings"),
                        "eval_embeddings": ev.source or None, "config_hash": config_hash(cfg)},
            "config_hash": config_hash(cfg),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_manifest(out, manifest, meta, pa.Table.from_pandas(removed, schema=REMOVED_SCHEMA, preserve_index=False))
    log.info("curate: %d images selected for %d queries (k=%d), %d empty slots -> %s", len(images), len(queries),
             k, counts["empty_slots"], out / MANIFEST_PARQUET)
    return {"out": str(out), "per_query_k": k, "leakage_guard": guard,
            **{c: v for c, v in counts.items() if c != "per_class"}}


def check(cfg: CurateConfig) -> None:
    """Refuse settings outside their range (ConfigError naming the flag), before anything is read or written."""
    bad = []
    if cfg.budget < 1:
        bad.append(f"--budget must be >= 1 (got {cfg.budget})")
    if cfg.per_query_k < 0:
        bad.append(f"--per-query-k must be >= 0, 0 meaning the budget rule (got {cfg.per_query_k})")
    if not 0 <= cfg.near_dup <= 1:
        bad.append(f"--near-dup is a cosine in (0, 1], or 0 for off (got {cfg.near_dup})")
    if not -1 <= cfg.leakage_threshold <= 1:
        bad.append(f"--leakage-threshold is a cosine in [-1, 1] (got {cfg.leakage_threshold})")
    if not 0 <= cfg.teacher_min_prob <= 1:
        bad.append(f"--teacher-min-prob is a probability in [0, 1] (got {cfg.teacher_min_prob})")
    if (cfg.teacher_agree or cfg.teacher_min_prob > 0) and not cfg.teacher_scores:
        bad.append("--teacher-agree and --teacher-min-prob need --teacher-scores (a `rakt score` output folder)")
    if bad:
        raise ConfigError("rakt curate: " + "; ".join(bad))


def teacher_scores(cfg: CurateConfig, cand_dir: Path) -> tuple[pd.DataFrame | None, list[str] | None]:
    """The teacher's scores of these candidates (by pool_id) and its class names; (None, None) without
    --teacher-scores. Scores of other candidates are refused."""
    if not cfg.teacher_scores:
        return None, None
    scores, meta = read_scores(Path(cfg.teacher_scores))
    if meta.get("candidates_hash") not in (None, file_hash(cand_dir / CANDIDATES_PARQUET)):
        raise InputError(f"{cfg.teacher_scores}: these teacher scores were computed for other candidates "
                         f"({meta.get('candidates')}); rerun `rakt score {cand_dir} --out {cfg.teacher_scores}`")
    return scores, list(meta.get("classes") or [])


def predicted_per_class(images: pd.DataFrame, scores: pd.DataFrame, classes: list[str] | None) -> dict:
    """Selected images per teacher-predicted class name (classes in the teacher's order)."""
    preds = scores.reindex(images["pool_id"].to_numpy())["pred"].dropna().astype(int)
    counts = np.bincount(preds.to_numpy(), minlength=len(classes or []))
    names = classes or [str(i) for i in range(len(counts))]
    return {names[i] if i < len(names) else str(i): int(c) for i, c in enumerate(counts)}


def _model_of(meta: dict) -> str:
    """The model id of an embedding set, as indexes record it."""
    return str(meta.get("model", ""))


def count_image_queries(queries: pd.DataFrame, cmeta: dict) -> int:
    """Queries that are images (not `text:` prompts, which retrieve writes only with --query-mode text/both)."""
    if cmeta.get("query_mode", "image") == "image":
        return len(queries)
    return int((~queries["query_id"].str.startswith(TEXT_QUERY_PREFIX)).sum())


def plan_quotas(queries: pd.DataFrame, cfg: CurateConfig, n_image: int | None = None) -> tuple[pd.Series, int, dict]:
    """Pool images per query (Series by query_id), the per-query k, and the class shares (balance="class").

    The budget N counts the image queries themselves (the paper's public splits), text queries are not images:
    the pool share is N - n_image, and k = (N - n_image) // queries: N // Nq - 1 for image queries only,
    N // Nq for text queries only. `n_image` defaults to all queries."""
    nq = len(queries)
    n_image = nq if n_image is None else n_image
    if cfg.per_query_k > 0:
        k, total = cfg.per_query_k, cfg.per_query_k * nq
    else:
        k, total = (cfg.budget - n_image) // nq, cfg.budget - n_image
        if k < 1:
            what = (f"{nq} query images: the budget counts the queries themselves and k = budget // queries - 1"
                    if n_image == nq else f"{nq} queries ({n_image} images, counted in the budget, and "
                    f"{nq - n_image} text prompts): k = (budget - {n_image}) // {nq}")
            raise InputError(f"budget {cfg.budget} is too small for {what} = {k}; the minimum budget is "
                             f"{n_image + nq} (one pool image per query), or set --per-query-k")
    if cfg.balance == "query":
        return pd.Series(k, index=queries["query_id"], dtype="int64"), k, {}
    labels = queries["query_label"]
    keys = sorted(labels.dropna().astype(int).unique().tolist())
    groups = [queries[labels == lab] for lab in keys]
    names = [str(lab) for lab in keys]
    if labels.isna().any():
        groups.append(queries[labels.isna()])
        names.append(UNLABELLED)
    base, extra = divmod(total, len(groups))
    quota, shares = {}, {}
    for gi, (name, group) in enumerate(zip(names, groups)):
        share = base + (1 if gi < extra else 0)
        shares[name] = share
        qb, qr = divmod(share, len(group))
        for qi, qid in enumerate(group["query_id"]):
            quota[qid] = qb + (1 if qi < qr else 0)
    return pd.Series(quota, dtype="int64").reindex(queries["query_id"]), k, shares


def filter_candidates(cands: CandidateWindows, ctx: CurateContext, counts: dict, spill: Spill) -> list:
    """The "candidates" rules in registry order over every rank window; the rows they keep go to `spill`. Returns
    the removed.parquet rows, rule by rule (a pool image a rule removed in an earlier window is listed once), and
    sets the rules' counts (summed over windows) and `candidates` (rows with a pool image)."""
    active = [rule for rule in registered("candidates") if rule.when(ctx.cfg)]
    removed: dict[str, list] = {rule.name: [] for rule in active}
    listed = {rule.name: np.zeros(0, np.int64) for rule in active}
    counts["candidates"] = 0
    for rule in registered("candidates"):
        counts[rule.count] = 0
    bar = Progress(cands.rows, "curate: candidate rules", unit="row")
    for window in cands:
        bar.update(len(window))
        window = window[window["pool_id"] >= 0]
        counts["candidates"] += len(window)
        for rule in active:
            res = rule.fn(window, ctx)
            window = res.kept
            fresh = res.removed[~np.isin(res.removed["pool_id"].to_numpy(np.int64), listed[rule.name])]
            listed[rule.name] = np.union1d(listed[rule.name], fresh["pool_id"].to_numpy(np.int64))
            counts[rule.count] += len(fresh) if res.count is None else int(res.count)
            removed[rule.name].append(fresh)
        spill.write(window)
    bar.close()
    spill.close()
    leakage_report(ctx)
    return [pd.concat(removed[rule.name]).sort_values("pool_id", kind="mergesort").reset_index(drop=True)
            for rule in active if removed[rule.name]]


def concat_removed(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The rules' removed.parquet rows, in rule order."""
    parts = [part for part in parts if len(part)]
    if not parts:
        return empty_removed()
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def per_class(images: pd.DataFrame) -> dict:
    """Selected rows per query_label (of each image's best-scoring query); unlabelled under 'unlabelled'."""
    labels = images["query_label"].astype(object).where(images["query_label"].notna(), UNLABELLED)
    counts = labels.map(str).value_counts()
    keys = sorted(counts.index, key=lambda s: (s == UNLABELLED, int(s) if s != UNLABELLED else 0))
    return {key: int(counts[key]) for key in keys}


def add_pool_names(removed: pd.DataFrame, index) -> pd.DataFrame:
    """removed.parquet rows with the pool image's string `id` after pool_id."""
    ids = removed["pool_id"].to_numpy(np.int64)
    names = index.metadata(ids)["id"].to_pylist() if len(ids) else []
    removed = removed.copy()
    removed.insert(1, "id", np.asarray(names, dtype=object))
    return removed
