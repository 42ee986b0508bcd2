"""Transfer manifest with URLs -> WebDataset shards via img2dataset, behind an address guard; resumable per shard.

Layout of `--out` (img2dataset's): `00000.tar` (samples), `00000.parquet` (every row of the shard with its
`status` and `error_message`), `00000_stats.json` (the shard's done marker), `_input/urls.parquet` (what
img2dataset read), and `download_report.json` (written last). Sample keys are img2dataset's
(`shard * 10**digits + row`); each sample's `KEY.json` carries rakt's ids (`pool_id`, `id`, `query_id`,
`query_ids`, ...), so every image traces back to its pool image and queries.

Rows the address guard refuses (see `rakt.pipeline.download.guard`) keep their place in the shard split, but their
url is replaced by `rakt-refused:CAUSE:URL`, a scheme urllib has no handler for: img2dataset fails them at
once and no connection is made. The rows it lets through are fetched through rakt's filtering proxy
(`rakt.pipeline.download.proxy`), which checks every request again -- each redirect hop, with a fresh resolution --
connects only to the address it checked and only to the manifest's hosts (and relayed redirects' targets), and
holds every request to `--deadline` seconds and `--max-size-mb`; its refusals count as failures by cause.

img2dataset runs in a driver process whose whole process group dies with this one (`rakt.pipeline.download.driver`).
A shard whose stats record failures that were not the URL's fault (`RETRY_CAUSES`: rakt's proxy unreachable, a
local error) is not done: the next run fetches it again.
"""
from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from rakt.pipeline.config import ConfigError, DownloadConfig, config_hash, to_dict
from rakt.pipeline.download.guard import AddressGuard, parse_networks
from rakt.pipeline.download.proxy import filtering_proxy, proxy_environment
from rakt.pipeline.engines import import_ray
from rakt.pipeline.download.report import (OOM_SHARD_COUNT, REPORT_JSON, RETRY_CAUSES, build_report, failure_cause,
                                           log_summary)
from rakt.pipeline.formats import MANIFEST_PARQUET, read_manifest
from rakt.pipeline.io import InputError, file_hash, read_json, timed, write_json, write_parquet

log = logging.getLogger("rakt.download")

INPUT_DIR = "_input"
INPUT_PARQUET = "urls.parquet"
RUN_JSON = "run.json"
ARGS_JSON = "img2dataset.json"  # the driver's arguments
REFUSED_SCHEME = "rakt-refused"
ROW_COLUMNS = ("pool_id", "id", "query_id", "query_ids", "query_label", "score", "rank")
DISTRIBUTORS = {"local": "multiprocessing", "ray": "ray"}


def run(cfg: DownloadConfig) -> dict:
    """Download the manifest's URLs into `{out}` and write `{out}/download_report.json`; returns its summary."""
    check(cfg)
    mpath = Path(cfg.manifest) / MANIFEST_PARQUET
    out = Path(cfg.out)
    with timed("download"):
        rows = url_rows(mpath)
        mhash = file_hash(mpath)
        out.mkdir(parents=True, exist_ok=True)
        n_shards = math.ceil(len(rows) / cfg.shard_size)
        done, again = check_previous(out, mhash, cfg.shard_size)
        pending = rows_of_pending_shards(len(rows), cfg.shard_size, done)
        guard = AddressGuard(cfg.allow_private, cfg.allow_network)
        urls = rows["url"].cast(pa.string()).to_pylist()
        verdicts = guard.check_all([urls[i] for i in pending])
        for i, cause in zip(pending, verdicts):
            if cause is not None:
                urls[i] = f"{REFUSED_SCHEME}:{cause}:{urls[i] or ''}"
        refused_now = Counter(c for c in verdicts if c is not None)
        if refused_now:
            log.warning("address guard refused %d of %d URLs (not fetched): %s", sum(refused_now.values()),
                        len(verdicts), dict(sorted(refused_now.items())))
        table = input_table(rows, urls)
        input_path = out / INPUT_DIR / INPUT_PARQUET
        write_parquet(input_path, table)
        write_json(out / INPUT_DIR / RUN_JSON, {"manifest": str(mpath.resolve()), "manifest_hash": mhash,
                                                "shard_size": cfg.shard_size, "rows": len(rows)})
        # img2dataset takes every *.json in the output folder for a shard's stats file: the old report must go
        (out / REPORT_JSON).unlink(missing_ok=True)
        cuts: dict = {}
        if len(done) < n_shards:
            hosts = {h for i, cause in zip(pending, verdicts) if cause is None and (h := urlsplit(urls[i]).hostname)}
            cuts = fetch(cfg, guard, input_path, out, hosts, caption="caption" in table.column_names,
                         columns=[c for c in table.column_names if c not in ("url", "caption")])
        else:
            log.info("download: all %d shards done already", n_shards)
        report = build_report(out, n_shards, len(rows), REFUSED_SCHEME)
        report.update(cut_by_proxy=cuts, fetched_again=again)
        report.update(shard_size=cfg.shard_size, manifest=str(mpath.resolve()), manifest_hash=mhash,
                      settings=to_dict(cfg), config_hash=config_hash(cfg),
                      created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        write_json(out / REPORT_JSON, report)
    log_summary(report, out)
    keys = ("rows", "samples", "failed", "failed_by_cause", "refused", "refused_by_cause", "incomplete_shards",
            "fetched_again")
    return {"out": str(out), **{k: report[k] for k in keys}, "shards": n_shards}


def check(cfg: DownloadConfig) -> None:
    """Reject values img2dataset would fail on late, or that would make it do nothing."""
    where = "rakt download"
    for name in ("shard_size", "threads", "image_size", "timeout"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{where}: '{name}' must be >= 1, got {getattr(cfg, name)}")
    if cfg.deadline and cfg.deadline < cfg.timeout:
        raise ConfigError(f"{where}: 'deadline' ({cfg.deadline} s for a whole request) must be at least 'timeout' "
                          f"({cfg.timeout} s for one connect or read), or 0 for none")
    if cfg.processes < 0 or cfg.retries < 0 or cfg.max_image_area < 0:
        raise ConfigError(f"{where}: 'processes', 'retries' and 'max_image_area' must be >= 0")
    if cfg.encode_format == "png" and not 0 <= cfg.encode_quality <= 9:
        raise ConfigError(f"{where}: for png, 'encode_quality' is the compression level 0-9, "
                          f"got {cfg.encode_quality}")
    if cfg.encode_format != "png" and not 0 <= cfg.encode_quality <= 100:
        raise ConfigError(f"{where}: 'encode_quality' must be 0-100, got {cfg.encode_quality}")
    try:
        parse_networks(cfg.allow_network)
    except ValueError as e:
        raise ConfigError(f"{where}: 'allow_network': {e}") from None
    if importlib.util.find_spec("img2dataset") is None:
        raise ConfigError(f"{where}: img2dataset is not installed; pip install 'rakt[download]'")
    if cfg.engine == "ray":
        import_ray()  # img2dataset's ray distributor silently does nothing without Ray: say how to install it


def url_rows(path: Path) -> pa.Table:
    """Manifest rows sorted by (pool_id, query_id) (formats.read_manifest); a manifest without URLs is refused."""
    table = read_manifest(path)
    if "url" not in table.column_names or table["url"].null_count == len(table):
        raise InputError(f"{path}: the manifest has no image URLs: it points at a local pool (shard+key or path); "
                         f"write it as shards with `rakt materialize {path.parent} --out DIR` instead")
    return table


def check_previous(out: Path, mhash: str, shard_size: int) -> tuple[set[int], list[str]]:
    """Ids of shards done by an earlier run (their stats file exists), and the shards to fetch again: those whose
    stats record failures that were not the URL's fault (RETRY_CAUSES), whose files are removed here. Refuses an
    out made from another manifest."""
    stats = sorted(out.glob("*_stats.json"))
    stray = [p.name for p in out.glob("*.json") if not p.name.endswith("_stats.json") and p.name != REPORT_JSON]
    if stray:
        raise InputError(f"{out}: unexpected JSON file(s) {', '.join(sorted(stray))}; img2dataset would take them "
                         "for shard stats. Download into an empty --out")
    if not stats:
        return set(), []
    prev = out / INPUT_DIR / RUN_JSON
    meta = read_json(prev, "record of the previous download (delete --out to start over)")
    if meta.get("manifest_hash") != mhash or meta.get("shard_size") != shard_size:
        raise InputError(f"{out}: holds shards downloaded from another manifest or with another --shard-size "
                         f"(see {prev}); download into a new --out or delete {out}")
    done, again = set(), []
    for p in stats:
        stem = p.name.split("_", 1)[0]
        if not stem.isdigit():
            raise InputError(f"{p}: not an img2dataset stats file name (NNNNN_stats.json)")
        status = read_json(p, "img2dataset shard stats").get("status_dict") or {}
        local = Counter({c: n for m, n in status.items() if (c := failure_cause(m)) in RETRY_CAUSES})
        if local:
            log.warning("%s: %d URL(s) failed for a reason that was not theirs (%s); fetching the shard again",
                        p.name, sum(local.values()), ", ".join(f"{c} {n}" for c, n in sorted(local.items())))
            for name in (p.name, f"{stem}.tar", f"{stem}.parquet"):  # the marker first
                (out / name).unlink(missing_ok=True)
            again.append(f"{stem}.tar")
        else:
            done.add(int(stem))
    return done, again


def rows_of_pending_shards(n_rows: int, shard_size: int, done: set[int]) -> list[int]:
    """Row positions in shards without a stats file: only these are checked by the guard and fetched."""
    return [i for i in range(n_rows) if i // shard_size not in done]


def input_table(rows: pa.Table, urls: list[str | None]) -> pa.Table:
    """img2dataset's input: url (refused rows rewritten), caption when known, and rakt's row columns."""
    cols: dict[str, pa.Array | pa.ChunkedArray] = {"url": pa.array(urls, pa.string())}
    if "caption" in rows.column_names:
        cols["caption"] = rows["caption"].cast(pa.string())
    for name in ROW_COLUMNS:
        if name in rows.column_names:
            cols[name] = rows[name]
    return pa.table(cols)


def fetch(cfg: DownloadConfig, guard: AddressGuard, input_path: Path, out: Path, hosts: set[str], caption: bool,
          columns: list[str]) -> dict:
    """Run img2dataset over the input parquet in the driver process, its workers behind the filtering proxy;
    shards with a stats file are skipped (incremental mode). Returns the responses the proxy cut off."""
    processes = cfg.processes or os.cpu_count() or 1
    log.info("img2dataset: %d process(es) x %d threads, engine %s", processes, cfg.threads, cfg.engine)
    if cfg.engine == "ray":
        log.warning("download: with --engine ray only workers that inherit this process's environment and reach "
                    "its loopback (a local Ray started by this run) use the filtering proxy; workers on other "
                    "nodes follow redirects unchecked and without --deadline, --max-size-mb or the host list (the "
                    "address guard still checks every manifest URL)")
    args = dict(url_list=str(input_path), input_format="parquet", url_col="url",
                caption_col="caption" if caption else None, save_additional_columns=columns,
                output_format="webdataset", output_folder=str(out), number_sample_per_shard=cfg.shard_size,
                image_size=cfg.image_size, resize_mode=cfg.resize_mode, encode_format=cfg.encode_format,
                encode_quality=cfg.encode_quality, processes_count=processes, thread_count=cfg.threads,
                timeout=cfg.timeout, retries=cfg.retries, incremental_mode="incremental",
                distributor=DISTRIBUTORS[cfg.engine], enable_wandb=False, extract_exif=False,
                max_image_area=cfg.max_image_area, oom_shard_count=OOM_SHARD_COUNT,
                engine=cfg.engine, ray_address=cfg.ray_address)
    write_json(out / INPUT_DIR / ARGS_JSON, args)
    with filtering_proxy(guard, cfg.timeout, deadline=cfg.deadline, max_bytes=cfg.max_size_mb << 20,
                         hosts=None if cfg.any_host else hosts) as proxy:
        env = {**os.environ, **proxy_environment(proxy.url), "NO_ALBUMENTATIONS_UPDATE": "1"}
        if cfg.max_image_area:  # OpenCV refuses larger images before allocating them (decompression bombs)
            env["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(cfg.max_image_area)
        run_driver(out / INPUT_DIR / ARGS_JSON, env, out)
        return {"by_cause": dict(sorted(proxy.cuts.items())), "examples": proxy.cut_examples}


def run_driver(args_path: Path, env: dict, out: Path) -> None:
    """The driver (pipeline.download.driver) in its own session, tied to this process by its stdin: closing it
    -- at the end, on an error, or by this process dying -- kills the driver's whole process group."""
    driver = subprocess.Popen([sys.executable, "-m", "rakt.pipeline.download.driver", str(args_path)],
                              stdin=subprocess.PIPE, env=env, start_new_session=True)
    try:
        code = driver.wait()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"download interrupted; rerun to finish the missing shards of {out}") from None
    finally:
        driver.stdin.close()  # the lifeline: the driver kills its group if it still runs
        driver.wait()
    if code != 0:
        raise InputError(f"{out}: img2dataset stopped with exit status {code} (its error is above); finished "
                         f"shards are kept: run the same command again to finish the rest")
