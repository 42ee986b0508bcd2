"""download_report.json: img2dataset's per-shard stats aggregated, failures counted by cause, guard refusals."""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from rakt.pipeline.io import InputError, read_json

log = logging.getLogger("rakt.download")

REPORT_JSON = "download_report.json"
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names have 5 digits
MAX_EXAMPLES = 3  # error messages kept per cause in the report
MAX_MESSAGES = 100  # distinct error messages kept (most frequent first)

# A refusal by rakt's filtering proxy (pipeline.download.proxy), as urllib reports it: "HTTP Error 403: rakt proxy
# refused: CAUSE (...)", or "<urlopen error Tunnel connection failed: 403 rakt proxy refused: CAUSE (...)>" (HTTPS)
PROXY_REFUSAL = re.compile(r"\b403:? rakt proxy refused: ([a-z_]+)")
# (cause, pattern over img2dataset's error message), first match wins. The messages are those of urllib
# (HTTPError, URLError, socket timeouts, http.client.IncompleteRead), of img2dataset's resizer (OpenCV) and of
# the proxy when it cannot connect ("HTTP Error 502: rakt proxy: cannot connect to HOST:PORT: ...").
# A failure of urllib to reach rakt's proxy itself (every request goes through it: a refused connection is the
# proxy's, e.g. a worker outliving a killed `rakt download`) or of the machine is no fault of the URL: a shard whose
# stats record one is fetched again by the next run (RETRY_CAUSES).
CAUSES: tuple[tuple[str, re.Pattern], ...] = tuple((c, re.compile(p, re.I)) for c, p in (
    ("timeout", r"\brakt proxy: cannot connect .*timed out|\brakt proxy: deadline"),
    ("connection_error", r"\brakt proxy: cannot connect"),
    ("too_large", r"\brakt proxy: response too large"),
    ("proxy_unreachable", r"\[Errno 111\]|Connection refused"),
    ("local_error", r"\[Errno (12|23|24|28)\]|Too many open files|Cannot allocate memory|No space left"),
    ("redirect_loop", r"redirect error that would lead to an infinite loop"),
    ("http_404", r"^HTTP Error 404\b"),
    ("http_4xx", r"^HTTP Error 4\d\d\b"),
    ("http_5xx", r"^HTTP Error 5\d\d\b"),
    ("http_other", r"^HTTP Error \d+"),
    ("timeout", r"timed out"),
    ("truncated", r"IncompleteRead|Premature end"),
    ("image_too_large", r"CV_IO_MAX_IMAGE_PIXELS|image area too large|DecompressionBomb"),
    ("undecodable", r"Image decoding error"),
    ("filtered", r"image too small|aspect ratio too large"),
    ("disallowed", r"disallowed by X-Robots-Tag"),
    ("connection_error", r"urlopen error|Connection (refused|reset|aborted)|Remote end closed|"
                         r"Name or service not known|certificate|SSL"),
))


RETRY_CAUSES = ("proxy_unreachable", "local_error")


def failure_cause(message: str) -> str:
    """Map one img2dataset error message to a cause name ('other' when no rule matches); a proxy refusal
    counts under the address guard's cause (blocked_address, unresolvable_host, bad_scheme, bad_url)."""
    refusal = PROXY_REFUSAL.search(message)
    if refusal:
        return refusal.group(1)
    for cause, pattern in CAUSES:
        if pattern.search(message):
            return cause
    return "other"


def shard_stem(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def refused_rows(parquet: Path, scheme: str) -> list[dict]:
    """Rows of one shard that the address guard refused, read from img2dataset's per-shard parquet."""
    table = pq.read_table(parquet)
    keep = [c for c in ("pool_id", "id", "url") if c in table.column_names]
    rows = []
    for row in table.select(keep).to_pylist():
        url = row.get("url") or ""
        if url.startswith(scheme + ":"):
            _, cause, original = url.split(":", 2)
            rows.append({**row, "url": original or None, "cause": cause})
    return rows


def build_report(out: Path, n_shards: int, n_rows: int, refused_scheme: str) -> dict:
    """Aggregate `{out}/NNNNN_stats.json` (+ refused rows from `NNNNN.parquet`) over the manifest's shards."""
    marker = f"unknown url type: {refused_scheme}"
    failed, messages, examples = Counter(), Counter(), {}
    refused, shards, incomplete = [], [], []
    totals = Counter()
    for j in range(n_shards):
        stem = shard_stem(j)
        stats_path = out / f"{stem}_stats.json"
        if not stats_path.exists():
            incomplete.append(f"{stem}.tar")
            continue
        stats = read_json(stats_path, "img2dataset shard stats")
        try:
            status = dict(stats["status_dict"])
            counts = {k: int(stats[k]) for k in ("count", "successes", "failed_to_download", "failed_to_resize")}
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{stats_path}: not an img2dataset stats file; delete it and rerun") from None
        shard_refused = []
        if (out / f"{stem}.parquet").exists():
            shard_refused = refused_rows(out / f"{stem}.parquet", refused_scheme)
        elif any(marker in m for m in status):
            log.warning("%s.parquet is missing: the guard's refused rows of that shard cannot be listed", stem)
        refused += shard_refused
        for message, n in status.items():
            if message == "success" or marker in message:
                continue
            cause = failure_cause(message)
            failed[cause] += n
            messages[message] += n
            examples.setdefault(cause, [])
            if len(examples[cause]) < MAX_EXAMPLES and message not in examples[cause]:
                examples[cause].append(message)
        n_refused = sum(n for m, n in status.items() if marker in m)
        totals.update(counts)
        totals["refused"] += n_refused
        shards.append({"shard": f"{stem}.tar", **counts, "refused": n_refused,
                       "seconds": round(float(stats.get("duration", 0.0)), 3)})
    refused_by_cause = Counter(r["cause"] for r in refused)
    return {
        "rows": n_rows,
        "samples": totals["successes"],
        "failed": sum(failed.values()),
        "failed_by_cause": dict(sorted(failed.items())),
        "failed_examples": {c: examples[c] for c in sorted(examples)},
        "messages": dict(messages.most_common(MAX_MESSAGES)),
        "refused": totals["refused"],
        "refused_by_cause": dict(sorted(refused_by_cause.items())),
        "refused_rows": refused,
        "shards": shards,
        "incomplete_shards": incomplete,
    }


def log_summary(report: dict, out: Path) -> None:
    """A readable summary of the report."""
    log.info("download: %d of %d manifest rows downloaded into %d shards -> %s", report["samples"], report["rows"],
             len(report["shards"]), out)
    if report["failed"]:
        log.warning("download: %d URLs failed: %s (error messages in %s)", report["failed"],
                    ", ".join(f"{c} {n}" for c, n in report["failed_by_cause"].items()), out / REPORT_JSON)
    if report["refused"]:
        log.warning("download: %d URLs refused by the address guard and never fetched: %s", report["refused"],
                    ", ".join(f"{c} {n}" for c, n in report["refused_by_cause"].items()))
    local = {c: n for c, n in report["failed_by_cause"].items() if c in RETRY_CAUSES}
    if local:
        log.warning("download: %d URLs failed for a reason that was not theirs (%s); run the same command again "
                    "to fetch their shards again", sum(local.values()), ", ".join(f"{c} {n}" for c, n in local.items()))
    if report.get("cut_by_proxy", {}).get("by_cause"):
        log.warning("download: the proxy cut off %s (--deadline, --max-size-mb); they count as failures under "
                    "the error the downloader saw", report["cut_by_proxy"]["by_cause"])
    if report["incomplete_shards"]:
        log.warning("download: %d shard(s) not finished (%s); run the same command again to finish them",
                    len(report["incomplete_shards"]), ", ".join(report["incomplete_shards"][:5]))
