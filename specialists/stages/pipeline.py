"""Running stages: manifest checks, upstream requirements, skipping what is done, reports.

``run_stage(cfg, key)`` is what every command and pipeline script calls; ``run_all(cfg)``
chains the stages for ``specialists run``. A finished stage is skipped, a half-finished one
resumes from its own checkpoints, and a stage whose recorded inputs differ from the config is
refused (or, with ``force``, wiped and redone together with everything downstream). After a
stage completes, the reports its row names are rendered, then it is recorded as done.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Sequence

from omegaconf import OmegaConf

from ..errors import SpecialistsError
from ..rundir import Run, config_values
from . import BY_KEY, STAGES, depends, downstream

log = logging.getLogger("specialists")


def guard(run: Run, cfg, force: bool = False) -> None:
    """Refuse (or with ``force`` wipe and reopen) every recorded stage whose inputs changed."""
    for stage in STAGES:
        rec = run.manifest.record(stage.key)
        if not rec:
            continue
        now, then = config_values(cfg, depends(stage.key)), rec.get("inputs", {})
        changed = [k for k in sorted(set(now) | set(then)) if now.get(k, "<unset>") != then.get(k, "<unset>")]
        if not changed:
            continue
        k = changed[0]
        if not force:
            raise SpecialistsError(
                f"stage '{stage.key}' in {run.dir} was run with {k}={then.get(k, '<unset>')!r} but the config now "
                f"says {k}={now.get(k, '<unset>')!r}: rerun with --force to redo '{stage.key}' and the stages after "
                f"it, or choose another run_dir")
        invalidate(run, stage.key)


def invalidate(run: Run, key: str) -> None:
    """Delete stage ``key`` and everything downstream: records and their folders."""
    keys = downstream(key)
    run.manifest.drop(keys, [run.dir / BY_KEY[k].folder for k in keys])


def require(run: Run, key: str) -> None:
    """Stop with the command to run when stage ``key``'s upstream is not done."""
    up = BY_KEY[key].upstream
    if up and not run.manifest.is_done(up):
        raise SpecialistsError(
            f"stage '{key}' needs stage '{up}', which is not complete in {run.dir}: "
            f"run `specialists {BY_KEY[up].verb} CONFIG` (or `specialists run CONFIG`) first")


def run_stage(cfg, key: str, *, force: bool = False, **options) -> dict | None:
    """Run stage ``key`` on ``cfg.run_dir`` unless it is already complete. Returns its result."""
    stage = BY_KEY[key]
    run = Run(cfg)
    guard(run, cfg, force)
    require(run, key)
    if run.manifest.is_done(key) and not options:
        log.info("stage %s: already complete, skipping", key)
        return None
    run.save_config()
    run.manifest.start(key, config_values(cfg, depends(key)))
    t0 = time.perf_counter()
    log.info("stage %s: starting in %s", key, run.dir)
    if stage.subrun:
        options["subrun"] = lambda sub_cfg, keys: subrun(run, sub_cfg, keys)
    result = stage.run(run, **options) or {}
    seconds = time.perf_counter() - t0
    if result.get("complete", True):
        for report in stage.reports:
            report(run)
        folder = run.dir / stage.folder
        artifacts = [run.rel(p) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
        run.manifest.finish(key, artifacts, seconds=round(seconds, 2))
    log.info("stage %s: finished in %.1fs", key, seconds)
    return result


def run_all(cfg, *, force: bool = False) -> None:
    """Every stage in order (those with an ``enabled`` key only when it is true), skipping
    completed ones."""
    for stage in STAGES:
        if stage.enabled and not OmegaConf.select(cfg, stage.enabled):
            continue
        run_stage(cfg, stage.key, force=force)


def subrun(parent: Run, cfg, keys: Sequence[str]) -> Run:
    """Run stages ``keys`` in the sub-run ``cfg.run_dir`` (e.g. the ablation's re-clustering
    with another number of specialists), which shares ``parent``'s generalist: copied, so the
    sub-run stays a self-contained run directory."""
    sub = Run(cfg, device=str(parent.device))
    if not sub.manifest.is_done("generalist"):
        src, dst = parent.generalist, sub.generalist
        dst.dir.mkdir(parents=True, exist_ok=True)
        for name in ("weights", "metrics"):
            shutil.copy2(getattr(src, name), getattr(dst, name))
        shutil.copy2(parent.data_json, sub.data_json)
        sub.save_config()
        sub.manifest.start("generalist", config_values(cfg, depends("generalist")))
        sub.manifest.finish("generalist", [sub.rel(dst.weights), sub.rel(dst.metrics)],
                            shared_from=os.path.relpath(parent.dir, sub.dir))
    for key in keys:
        run_stage(cfg, key)
    return sub
