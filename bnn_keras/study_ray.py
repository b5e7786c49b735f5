"""The study's Ray executor: each (cell, seed) run one Ray task, on this machine or a cluster.

`bnn_keras.study.run_study(..., executor="ray")` uses it; Ray is an optional extra
(``pip install "bnn-keras[ray]"``) and is imported only here, when that executor runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping

from bnn_keras import files, training
from bnn_keras.recipe import Recipe

RAY_INSTALL = 'pip install "bnn-keras[ray]"'
"""The command that installs what the ``ray`` executor needs."""

Train = Callable[[Recipe], Mapping[str, Any]]
"""What trains one run: a recipe in, its summary out (`training.run` by default)."""


def import_ray(local: bool = False) -> Any:
    """Ray, or one line naming the install command; `local`: its node address is the loopback one."""
    if local and "ray" not in sys.modules:  # read once, on import: Ray's default is the address others reach
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ValueError(f"executor 'ray' needs the ray package, which is not installed: install it with {RAY_INSTALL}") from None
    return ray


@contextlib.contextmanager
def session(address: str | None, log_to_driver: bool) -> Iterator[tuple[Any, bool]]:
    """Ray, initialised: the instance this process already holds, or one started here (and shut down)."""
    ray = import_ray(local=address is None)
    if ray.is_initialized():
        yield ray, False
        return
    options: dict[str, Any] = {"log_to_driver": log_to_driver, "logging_level": "warning"}
    if address is None:  # this machine only: nothing listens beyond the loopback interface
        options.update(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        ray.init(**({"address": address} if address is not None else {}), **options)
    except Exception as error:  # a wrong or unreachable address; Ray raises several kinds
        what = "start a local Ray instance" if address is None else f"join the Ray cluster at {address!r}"
        expected = "" if address is None else ": expected the address 'ray start --head' printed (HOST:6379)"
        raise ValueError(f"cannot {what} ({type(error).__name__}: {_one_line(error)[:300]}){expected}") from None
    try:
        yield ray, True
    finally:
        ray.shutdown()


_BUSY_WAIT_S = 60.0
"""How long a Ray task waits for its run folder's lock: a killed driver's workers take a moment to stop."""


def _run(recipe: dict[str, Any], train: Train | None) -> dict[str, Any]:
    """One run in a Ray worker: the recipe as plain data in; its summary (no history) and seconds out.

    A run folder locked by another process (a worker of a killed driver, still being stopped:
    a study folder has one driver) is waited for, up to `_BUSY_WAIT_S`.
    """
    started = time.perf_counter()
    while True:
        try:
            summary = dict((train if train is not None else training.run)(Recipe.from_dict(recipe)))
            break
        except files.BusyError:
            if time.perf_counter() - started > _BUSY_WAIT_S:
                raise
            time.sleep(1.0)
    summary.pop("history", None)
    return {"summary": summary, "seconds": time.perf_counter() - started}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _reason(error: BaseException) -> str:
    """Why a run failed, in one line: the exception's type and message."""
    return f"{type(error).__name__}: {_one_line(error)}"


def train_on_ray(
    grid: Any, ray: Any, started: bool, resources: dict[str, float], max_retries: int, train: Train | None
) -> None:
    """The Ray executor: one task per run to train, reported as they finish, copies after their source."""
    _check_resources(ray, started, resources)
    for entry in grid.entries:  # what needs no training first
        if entry.action == "skipped" or (entry.action == "copied" and grid.entries[entry.source].action == "skipped"):
            if entry.action == "copied":
                grid.copy(entry)
            grid.report(entry)
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), "TF_USE_LEGACY_KERAS": "1"}
    if 0 < resources["num_gpus"] < 1:  # runs share a GPU: none may take all its memory
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    task = ray.remote(_run).options(
        **resources,
        max_retries=max_retries,
        retry_exceptions=False,  # a run that raised raises again: bad data, a diverged loss
        runtime_env={"env_vars": env},
        **({"max_calls": 1} if resources["num_gpus"] else {}),
    )
    pending = {task.remote(e.recipe.to_dict(), train): e for e in grid.entries if e.action == "trained"}
    try:
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            _finished(grid, ray, pending.pop(ready), ready, max_retries)
    except BaseException:  # Ctrl-C, a full disk: stop the runs still going (they resume next time)
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _finished(grid: Any, ray: Any, entry: Any, ref: Any, max_retries: int) -> None:
    """A Ray task ended: its summary or its failure, then the runs that copy it."""
    try:
        result = ray.get(ref)
        entry.summary, entry.seconds = result["summary"], result["seconds"]
    except ray.exceptions.RayTaskError as error:  # the run raised
        entry.failure = _reason(error.cause if isinstance(error.cause, BaseException) else error)
    except ray.exceptions.RayError as error:  # its worker or node died once more than max_retries
        entry.failure = f"{type(error).__name__} after {max_retries} retries: {_one_line(error)[:200]}"
    grid.report(entry)
    for copy in grid.entries:
        if copy.source == entry.index:
            grid.copy(copy)
            grid.report(copy)


def _check_resources(ray: Any, started: bool, resources: dict[str, float]) -> None:
    """A run that asks for more than the cluster has never starts: refuse it (a started Ray) or warn."""
    total = ray.cluster_resources()
    for name, key, flag in (("CPU", "num_cpus", "--cpus-per-run"), ("GPU", "num_gpus", "--gpus-per-run")):
        have, need = total.get(name, 0.0), resources[key]
        if need > have:
            message = f"each run asks for {need:g} {name}(s) ({flag}) but the Ray cluster has {have:g}: expected at most {have:g}"
            if started:
                raise ValueError(message)
            print(f"study: warning: {message} (the runs wait until the cluster grows)", file=sys.stderr, flush=True)
