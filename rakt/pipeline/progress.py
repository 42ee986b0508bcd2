"""Progress of long loops that a person can follow anywhere: a tqdm bar on a terminal; when output goes to a file
or a CI log, a log line every ~30 s (`RAKT_PROGRESS_SECONDS`) with done/total, the rate and the time left.

    with Progress(total, "embed", unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch), loss=0.12)
"""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger("rakt")

INTERVAL_ENV = "RAKT_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    try:
        return float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """update(n, **postfix) as work is done; close() (or leave the `with`) when it ends. `rate_unit` and
    `rate_scale` show the rate in another unit than the count (e.g. steps counted, images/s shown)."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0, disable: bool = False,
                 rate_unit: str = "", rate_scale: float = 1.0) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.rate_unit, self.rate_scale = rate_unit or unit, rate_scale
        self.done, self.start_done = initial, initial
        self.postfix: dict = {}
        self.disabled = disable
        self.start = self.last = time.perf_counter()
        self.interval = _interval()
        self.bar = None
        if not disable and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rate(self) -> float:
        """Work per second since this bar started, in rate_unit."""
        seconds = time.perf_counter() - self.start
        return (self.done - self.start_done) * self.rate_scale / seconds if seconds > 0 else 0.0

    def update(self, n: int = 1, **postfix) -> None:
        if self.disabled:
            return
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            log.info("%s", self.line())

    def line(self) -> str:
        """'distill: 120/300 step (40%), 402 img/s, 1m05s left, loss 0.31'."""
        rate = self.rate()
        parts = [f"{self.desc}: {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:,.1f} {self.rate_unit}/s")
        per_item = (time.perf_counter() - self.start) / max(self.done - self.start_done, 1)
        if self.total and self.done > self.start_done:
            parts.append(f"{_duration(per_item * max(self.total - self.done, 0))} left")
        parts += [f"{k} {_fmt(v)}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.disabled:
            return
        self.disabled = True
        if self.bar is not None:
            self.bar.close()
        elif self.done > self.start_done and time.perf_counter() - self.start >= self.interval:
            log.info("%s (done in %s)", self.line(), _duration(time.perf_counter() - self.start))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LazyProgress:
    """A Progress that starts counting (its clock too) at the first update: for a loop behind a long setup."""

    def __init__(self, total: int | None, desc: str, **kw) -> None:
        self.args, self.kw = (total, desc), kw
        self.bar: Progress | None = None

    def __enter__(self) -> "LazyProgress":
        return self

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is None:
            self.bar = Progress(*self.args, **self.kw)
        self.bar.update(n, **postfix)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
