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
  ``data.path`` must be on storage every node sees.

A job's first argument is its :class:`Run`; a Ray task receives it as the run's config (YAML
text) and opens the run on its node (:func:`as_run`).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ..errors import SpecialistsError
from ..rundir import Run, config_from_yaml_text, to_yaml

log = logging.getLogger("specialists")


@dataclass
class Job:
    name: str  # for messages: "specialist 003"
    fn: Callable  # a module-level function: fn(run, *args) -> result
    args: tuple = ()


def as_run(run) -> Run:
    """The job's run: as given (local), or opened from its config's YAML text (a Ray task),
    checking that this node sees the run directory and the data."""
    if isinstance(run, Run):
        return run
    if not logging.getLogger().handlers:  # a Ray worker: its lines reach the driver's terminal
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    host, raw = socket.gethostname(), OmegaConf.create(run)
    for key, path in (("the run directory", raw.run_dir), ("data.path", raw.data.get("path"))):
        if path is not None and not Path(str(path)).expanduser().exists():
            raise SpecialistsError(f"on node {host}: {key} {path} does not exist there (it must be on storage every "
                                   "node sees)")
    try:
        return Run(config_from_yaml_text(run))
    except SpecialistsError as exc:
        raise SpecialistsError(f"on node {host}: {exc}") from None


def run_jobs(jobs: list[Job], launch) -> list:
    """Run ``jobs`` with the ``launch`` config's executor; their results, in order."""
    if not jobs:
        return []
    if launch.executor == "local":
        return [job.fn(*job.args) for job in jobs]
    return _ray_jobs(jobs, launch)


def _ray_jobs(jobs: list[Job], launch) -> list:
    try:
        import ray
    except ImportError:
        raise SpecialistsError("launch.executor=ray needs Ray: pip install 'specialists[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=launch.address or None, include_dashboard=False, logging_level=logging.WARNING)
    refs = {}
    for i, job in enumerate(jobs):
        args = tuple(to_yaml(a.cfg) if isinstance(a, Run) else a for a in job.args)
        task = ray.remote(job.fn).options(num_cpus=launch.cpus_per_job, num_gpus=launch.gpus_per_job,
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
            log.info("%s: finished (%d of %d jobs)", jobs[i].name, len(jobs) - len(pending), len(jobs))
    return results
