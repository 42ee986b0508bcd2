"""How partitioned work runs: an engine takes tasks and a picklable worker builder, returns what failed.

A stage hands its partitions to `get_engine(name, options).run(tasks, worker_builder, max_retries)`. The
builder is called where the work runs (in process for "local"; once inside each Ray actor for "ray") so heavy
objects such as models are built there, once. Failed tasks are retried in rounds and, if they still fail,
returned to the stage, which reports them: a task is never dropped silently. Workers write their outputs
themselves (to a filesystem every worker and the driver see); engines carry only task status.
"""
from __future__ import annotations

import logging
import os
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np

from rakt.pipeline.config import ConfigError
from rakt.pipeline.io import MACHINE_ERRORS, InputError
from rakt.registry import Registry

log = logging.getLogger("rakt")

T = TypeVar("T")
Worker = Callable[[T], object]
WorkerBuilder = Callable[[], Worker]
RAY_MISSING = "the 'ray' engine needs Ray, which is not installed: pip install 'rakt[ray]'"


class TasksFailedError(InputError):
    """Some tasks still failed after their retries; finished tasks are kept, a rerun retries the rest."""


@dataclass(frozen=True)
class EngineOptions:
    """Where and with what a stage's workers run; the local engine ignores them."""
    address: str = ""  # ray: "" = this process's Ray (started locally if none), "auto" or ray://host:port = a cluster
    num_cpus: float = 1.0  # CPUs reserved per worker (e.g. the encoder's DataLoader workers)
    use_gpu: bool = False  # one GPU per worker when the cluster has GPUs
    num_workers: int = 0  # 0 = as many as the cluster's CPUs/GPUs allow, at most one per task


class Engine(Protocol):
    """Runs `worker_builder()` on every task; returns the tasks that failed after `max_retries` retries."""

    def run(self, tasks: Sequence[T], worker_builder: WorkerBuilder, max_retries: int = 1) -> list[T]:
        ...


def _log_failure(task: object, attempt: int, max_retries: int, error: str, exc_info: bool = False) -> None:
    log.warning("task %s failed (attempt %d of %d): %s", task, attempt, max_retries + 1, error, exc_info=exc_info)


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
                except OSError as e:
                    if e.errno in MACHINE_ERRORS:  # a full disk fails every retry: stop, naming the file
                        raise
                    _log_failure(task, attempt, max_retries, f"{type(e).__name__}: {e}",
                                 exc_info=log.isEnabledFor(logging.DEBUG))
                    failed.append(task)
                except Exception as e:  # recorded, retried, and returned: never dropped
                    _log_failure(task, attempt, max_retries, f"{type(e).__name__}: {e}",
                                 exc_info=log.isEnabledFor(logging.DEBUG))
                    failed.append(task)
            if not failed:
                return []
            pending = failed
            if attempt <= max_retries:
                log.info("retrying %d failed tasks", len(pending))
        return pending


class RayEngine:
    """Ray Data: the tasks become a dataset of one row per block, mapped by a pool of actors.

    Why Ray Data (map_batches with a callable-class actor pool) rather than hand-made Ray tasks/actors: the
    actor pool builds the worker once per actor (the encoder is loaded once per GPU, not per partition),
    Ray Data schedules GPU actors (`num_gpus=1`) and streams tasks to them as they free up, restarts actors
    lost with their node and retries their task, and needs no pool or queue code here. A worker's Python
    exception is caught in the actor and reported as that task's result, so one bad partition never stops
    the run; a task whose actor process dies `max_retries` times has no result and counts as failed. Failed
    tasks are retried in rounds, as by the local engine, and the rest are returned.
    """

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        import_ray()  # fail before any work when Ray is missing

    def run(self, tasks: Sequence[T], worker_builder: WorkerBuilder, max_retries: int = 1) -> list[T]:
        pending = list(tasks)
        if not pending:
            return []
        connect_ray(self.options.address)
        for attempt in range(1, max_retries + 2):
            errors = self._round(pending, worker_builder, max_retries)
            for i, error in sorted(errors.items()):
                _log_failure(pending[i], attempt, max_retries, error)
            pending = [pending[i] for i in sorted(errors)]
            if not pending:
                return []
            if attempt <= max_retries:
                log.info("retrying %d failed tasks", len(pending))
        return pending

    def _round(self, tasks: list, worker_builder: WorkerBuilder, max_retries: int) -> dict[int, str]:
        """Run every task once on an actor pool; {task position: error} for those that failed."""
        ray = import_ray()
        from ray import cloudpickle

        items = [{"index": i, "task": cloudpickle.dumps(t)} for i, t in enumerate(tasks)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ctx = ds.context
        ctx.enable_progress_bars = False
        ctx.max_errored_blocks = -1  # a task whose actor died counts as failed below; the others go on
        gpus = self.options.use_gpu and ray.cluster_resources().get("GPU", 0) >= 1
        size = self._pool_size(ray, len(tasks), gpus)
        log.info("ray: %d tasks on %d actors (%s CPU%s each)", len(tasks), size, self.options.num_cpus,
                 " + 1 GPU" if gpus else "")
        with warnings.catch_warnings():  # Ray 2.60 deprecates ray_remote_args, with no named max_task_retries yet
            warnings.simplefilter("ignore", DeprecationWarning)
            results = ds.map_batches(
                _RayWorker, fn_constructor_args=(worker_builder,), batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=size), num_cpus=self.options.num_cpus,
                num_gpus=1 if gpus else None,
                max_task_retries=max_retries)  # bounds reruns of a task that kills its actor (Ray Data: forever)
        errors = {i: "no result: its worker process died (see the Ray logs)" for i in range(len(tasks))}
        try:
            for row in results.iter_rows():
                if row["fatal"]:  # the worker builder itself failed: as in the local engine, the stage stops
                    raise cloudpickle.loads(row["fatal"])
                if row["error"]:
                    errors[int(row["index"])] = row["error"]
                else:
                    errors.pop(int(row["index"]))
        except ray.exceptions.RayError as e:  # the run itself broke; unfinished tasks stay failed
            log.warning("ray: the run stopped early (%s); %d tasks unfinished", str(e).splitlines()[0], len(errors))
        return errors

    def _pool_size(self, ray, n_tasks: int, gpus: bool) -> int:
        res = ray.cluster_resources()
        slots = int(res.get("CPU", 1) // max(self.options.num_cpus, 0.01))
        if gpus:
            slots = min(slots, int(res.get("GPU", 0)))
        return max(1, min(n_tasks, self.options.num_workers or slots))


class _RayWorker:
    """The Ray Data callable class: builds the worker once per actor; one task per batch; errors as results."""

    def __init__(self, worker_builder: WorkerBuilder) -> None:
        if not logging.getLogger().handlers:
            from rakt.pipeline.io import setup_logging
            setup_logging()
        self.worker, self.fatal = None, b""
        try:
            self.worker = worker_builder()
        except Exception as e:
            log.error("building the worker failed: %s: %s", type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            self.fatal = _pickled_error(e)

    def __call__(self, batch: dict) -> dict:
        from ray import cloudpickle

        errors = []
        for blob in batch["task"]:
            task, error = cloudpickle.loads(blob), "the worker could not be built"
            if self.worker is not None:
                try:
                    self.worker(task)
                    error = ""
                except Exception as e:  # reported to the driver, which retries and returns it
                    log.debug("task %s failed:\n%s", task, traceback.format_exc())
                    error = f"{type(e).__name__}: {e}"
            errors.append(error)
        return {"index": batch["index"], "error": np.array(errors, dtype=object),
                "fatal": np.array([self.fatal] * len(errors), dtype=object)}


def _pickled_error(e: Exception) -> bytes:
    from ray import cloudpickle

    try:
        blob = cloudpickle.dumps(e)
        cloudpickle.loads(blob)
        return blob
    except Exception:  # an exception that cannot travel: its text does
        return cloudpickle.dumps(RuntimeError(f"building the worker failed: {type(e).__name__}: {e}"))


def import_ray():
    """The `ray` module (with Ray Data), or a ConfigError saying how to install it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.52 would otherwise write ~/.ray/auth_token
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def connect_ray(address: str = "", num_cpus: int | None = None):
    """Attach to Ray: this process's if running, else the cluster at `address`, else a new local one."""
    ray = import_ray()
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        ray.init(**kwargs, include_dashboard=False, ignore_reinit_error=True)
        res = ray.cluster_resources()
        log.info("ray: %s, %d nodes; cluster resources: %s CPU, %s GPU, %.1f GB memory, %.1f GB object store",
                 f"cluster at {address}" if address else "local instance", len(ray.nodes()), res.get("CPU", 0),
                 res.get("GPU", 0), res.get("memory", 0) / 1e9, res.get("object_store_memory", 0) / 1e9)
    return ray


ENGINES: Registry[Callable[[EngineOptions], Engine]] = Registry("engine", {
    "local": lambda options: LocalEngine(),
    "ray": RayEngine,
}, error=ConfigError)


def get_engine(name: str, options: EngineOptions | None = None) -> Engine:
    """The engine registered under `name`, set up with `options`."""
    return ENGINES.lookup(name)(options or EngineOptions())


def raise_if_failed(failed: Sequence[object], what: str = "tasks") -> None:
    """Turn failed tasks into one error that lists them and says how to retry."""
    if failed:
        names = ", ".join(str(t) for t in list(failed)[:20]) + (" ..." if len(failed) > 20 else "")
        raise TasksFailedError(f"{len(failed)} {what} failed after retries: {names}; see the warnings above "
                               f"for the errors, fix them, and rerun the same command (finished {what} are kept)")
