"""How partitioned work runs: an engine takes tasks and a picklable worker builder, returns what failed.

A stage hands its partitions to `get_engine(name).run(tasks, worker_builder, max_retries)`. The builder
is called where the work runs (in process for "local"; inside each actor for a cluster engine) so heavy
objects such as models are built there, once. Failed tasks are retried in rounds and, if they still
fail, returned to the stage, which reports them: a task is never dropped silently.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol, Sequence, TypeVar

from pipeline.config import ConfigError
from pipeline.io import InputError

log = logging.getLogger("rakt")

T = TypeVar("T")
Worker = Callable[[T], object]
WorkerBuilder = Callable[[], Worker]


class TasksFailedError(InputError):
    """Some tasks still failed after their retries; finished tasks are kept, a rerun retries the rest."""


class Engine(Protocol):
    """Runs `worker_builder()` on every task; returns the tasks that failed after `max_retries` retries."""

    def run(self, tasks: Sequence[T], worker_builder: WorkerBuilder, max_retries: int = 1) -> list[T]:
        ...


class LocalEngine:
    """In process, one task after another; failed tasks are retried in up to `max_retries` extra rounds."""

    def run(self, tasks: Sequence[T], worker_builder: WorkerBuilder, max_retries: int = 1) -> list[T]:
        pending = list(tasks)
        if not pending:
            return []
        worker = worker_builder()
        for attempt in range(1, max_retries + 2):
            failed = []
            for task in pending:
                try:
                    worker(task)
                except Exception as e:  # recorded, retried, and returned: never dropped
                    log.warning("task %s failed (attempt %d of %d): %s: %s", task, attempt, max_retries + 1,
                                type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
                    failed.append(task)
            if not failed:
                return []
            pending = failed
            if attempt <= max_retries:
                log.info("retrying %d failed tasks", len(pending))
        return pending


ENGINES: dict[str, Callable[[], Engine]] = {"local": LocalEngine}
PLANNED = {"ray": "the 'ray' engine (Ray Data on a cluster) comes in a later release; use 'local' for now"}


def get_engine(name: str) -> Engine:
    """The engine registered under `name`."""
    if name in ENGINES:
        return ENGINES[name]()
    if name in PLANNED:
        raise ConfigError(PLANNED[name])
    raise ConfigError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")


def raise_if_failed(failed: Sequence[object], what: str = "tasks") -> None:
    """Turn failed tasks into one error that lists them and says how to retry."""
    if failed:
        names = ", ".join(str(t) for t in list(failed)[:20]) + (" ..." if len(failed) > 20 else "")
        raise TasksFailedError(f"{len(failed)} {what} failed after retries: {names}; see the warnings above "
                               f"for the errors, fix them, and rerun the same command (finished {what} are kept)")
