"""Where independent jobs run: in this process one after another, or as Ray tasks.

A :class:`Job` is a module-level function and its arguments: one specialist, one re-clustering
sub-run, one control. Every job writes only its own folder of the run directory and resumes
from its own checkpoint, so jobs can run anywhere, in any order, and be retried.

``launch.executor``:

- ``local`` (default): each job runs here, in order, as it always did.
- ``ray``: each job is a Ray task (``launch.cpus_per_job``, ``launch.gpus_per_job``, fractions
  allowed), on the local Ray instance (``launch.address`` empty: one sized to this machine) or a
  cluster (``auto``, ``ray://host:port``). A task whose process dies is retried up to
  ``launch.max_retries`` times and resumes from its checkpoint; an error in a task (a user
  error: a missing path on a worker) is raised here as the same one line. The run directory and
  ``data.path`` must be on storage every node sees. An address nothing answers at, or a job
  larger than every node (``launch.gpus_per_job=1`` on a cluster without GPUs), is refused in
  one line before any task is submitted.

A job's first argument is its :class:`Run`; a Ray task receives it as the run's config (YAML
text) and opens the run on its node (:func:`as_run`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ..errors import SpecialistsError, one_line
from ..rundir import Run, config_from_yaml_text, to_yaml

log = logging.getLogger("specialists")

# seconds a Ray cluster's address may take to accept a connection: ray.init itself retries an
# unreachable address for minutes, deaf to Ctrl-C
CONNECT_TIMEOUT_S = 10.0


@dataclass
class Job:
    name: str  # for messages: "specialist 003"
    fn: Callable  # a module-level function: fn(run, *args) -> result
    args: tuple = ()


_WORKER_RUNS: dict[str, Run] = {}  # a Ray worker's open runs, by config text: its later jobs reuse them


def as_run(run) -> Run:
    """The job's run: as given (local), or opened from its config's YAML text (a Ray task),
    checking that this node sees the run directory and the data. A Ray worker runs many jobs
    in one process: it opens each run once, so its data is loaded once per worker, not per job."""
    if isinstance(run, Run):
        return run
    if run in _WORKER_RUNS:
        return _WORKER_RUNS[run]
    if not logging.getLogger().handlers:  # a Ray worker: its lines reach the driver's terminal
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    host, raw = socket.gethostname(), OmegaConf.create(run)
    for key, path in (("the run directory", raw.run_dir), ("data.path", raw.data.get("path"))):
        if path is not None and not Path(str(path)).expanduser().exists():
            raise SpecialistsError(f"on node {host}: {key} {path} does not exist there (it must be on storage every "
                                   "node sees)")
    try:
        opened = Run(config_from_yaml_text(run))
    except SpecialistsError as exc:
        raise SpecialistsError(f"on node {host}: {exc}") from None
    _WORKER_RUNS.clear()  # one run held at a time: its data can be large
    _WORKER_RUNS[run] = opened
    return opened


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return ("under a minute" if minutes < 1 else f"about {minutes} min" if minutes < 60
            else f"about {minutes // 60} h {minutes % 60} min")


class Progress:
    """One line per finished job, with an ETA from the jobs finished so far ("specialists 4/10
    done, about 6 min left"), and the same two figures to the run's trackers."""

    def __init__(self, label: str, total: int, tracker=None):
        self.label, self.total, self.tracker = label, total, tracker
        self.done, self.t0 = 0, time.perf_counter()

    def finished(self, name: str) -> None:
        self.done += 1
        left = (time.perf_counter() - self.t0) / self.done * (self.total - self.done)
        eta = f", {_duration(left)} left" if self.done < self.total else ""
        log.info("%s %d/%d done%s (%s finished)", self.label, self.done, self.total, eta, name)
        if self.tracker is not None:
            self.tracker.scalars(f"progress/{self.label}", {"done": self.done, "total": self.total,
                                                            "seconds_left": left}, self.done)


def run_jobs(jobs: list[Job], launch, label: str = "jobs", tracker=None) -> list:
    """Run ``jobs`` with the ``launch`` config's executor; their results, in order. ``label``
    names them in the progress lines (and ``tracker`` receives the progress)."""
    if not jobs:
        return []
    progress = Progress(label, len(jobs), tracker)
    if launch.executor == "local":
        results = []
        for job in jobs:
            results.append(job.fn(*job.args))
            progress.finished(job.name)
        return results
    return _ray_jobs(jobs, launch, progress)


def _check_reachable(address: str) -> None:
    """Refuse, within ``CONNECT_TIMEOUT_S`` seconds, a cluster address (``launch.address``, or
    ``RAY_ADDRESS``, which Ray prefers when the key is empty or ``auto``) that nothing answers
    at. Empty and ``auto`` alone are Ray's to resolve (it says at once when it finds none)."""
    if address in ("", "auto"):
        address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise SpecialistsError(f"launch.address={address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SpecialistsError(f"launch.address={address!r}: no Ray cluster answers at {host}:{port} "
                               f"({exc.strerror or one_line(exc)}); start one there (ray start --head), or leave "
                               "launch.address empty for a local one") from None


def _check_fits(ray, launch) -> None:
    """Refuse jobs that no node of the cluster can run: Ray would queue them forever (its
    autoscaler repeating that it cannot fulfil the request). A job runs on one node, so each
    request is compared with the largest node's resources."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for key, name in (("GPU", "gpus_per_job"), ("CPU", "cpus_per_job")):
        want, most = getattr(launch, name), max((r.get(key, 0.0) for r in nodes), default=0.0)
        if want > most:
            raise SpecialistsError(f"launch.{name}={want:g} but no node of the Ray cluster has that many {key}s "
                                   f"(the most on one node: {most:g}): no job could start; lower launch.{name} "
                                   f"or add nodes with more {key}s")


def _ray_jobs(jobs: list[Job], launch, progress: Progress) -> list:
    try:
        import ray
    except ImportError:
        raise SpecialistsError("launch.executor=ray needs Ray: pip install 'specialists[ray]'") from None
    if not ray.is_initialized():
        _check_reachable(launch.address)
        try:
            ray.init(address=launch.address or None, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:  # no cluster there, ray[client] missing
            raise SpecialistsError(f"launch.address={launch.address!r}: Ray could not start or join a cluster "
                                   f"({one_line(exc)})") from None
    _check_fits(ray, launch)
    refs, remote = {}, {}
    for i, job in enumerate(jobs):
        args = tuple(to_yaml(a.cfg) if isinstance(a, Run) else a for a in job.args)
        if job.fn not in remote:  # one remote function per job function: exported to the workers once
            remote[job.fn] = ray.remote(job.fn)
        task = remote[job.fn].options(num_cpus=launch.cpus_per_job, num_gpus=launch.gpus_per_job,
                                      max_retries=launch.max_retries, retry_exceptions=False, name=job.name)
        refs[task.remote(*args)] = i
    results: list = [None] * len(jobs)
    pending = list(refs)
    with tqdm(total=len(jobs), desc="jobs", leave=False, dynamic_ncols=True, disable=None) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = refs[done[0]]
            try:
                results[i] = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
                if isinstance(cause, SpecialistsError):
                    raise SpecialistsError(f"{jobs[i].name}: {cause}") from None
                raise
            bar.update()
            progress.finished(jobs[i].name)
    return results
