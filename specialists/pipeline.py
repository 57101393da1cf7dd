"""Running stages: manifest checks, upstream requirements, skipping what is done.

``run_stage(cfg, stage)`` is what every pipeline script calls; ``run_all(cfg)`` chains them for
``specialists run``. A finished stage is skipped, a half-finished one resumes from its own
checkpoints, and a stage whose recorded inputs differ from the config is refused (or, with
``force``, wiped and redone together with everything downstream).
"""

from __future__ import annotations

import importlib
import logging
import time

from .manifest import STAGE_DIRS, STAGES
from .run import Run

log = logging.getLogger("specialists")

# stage -> "module:function"; each function takes (run, **options) and returns a result dict
# (a result with "complete": False leaves the stage open, e.g. train-specialists --only).
STAGE_FUNCS = {
    "generalist": "specialists.generalist:train_generalist",
    "subsets": "specialists.subset_stage:find_subsets_stage",
    "specialists": "specialists.specialist:train_specialists",
    "evaluate": "specialists.evaluation:evaluate_stage",
    "ablate": "specialists.ablation:ablate_stage",
    "student": "specialists.student:distill_stage",
}


def _func(stage: str):
    module, name = STAGE_FUNCS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def run_stage(cfg, stage: str, *, force: bool = False, **options) -> dict | None:
    """Run one stage on ``cfg.run_dir`` unless it is already complete. Returns its result."""
    run = Run(cfg)
    run.manifest.guard(cfg, force)
    run.manifest.require(stage)
    if run.manifest.is_done(stage) and not options:
        log.info("stage %s: already complete, skipping", stage)
        return None
    run.save_config()
    run.manifest.start(stage, cfg)
    t0 = time.perf_counter()
    log.info("stage %s: starting in %s", stage, run.dir)
    result = _func(stage)(run, **options) or {}
    seconds = time.perf_counter() - t0
    if result.get("complete", True):
        folder = run.dir / STAGE_DIRS[stage]
        artifacts = [str(p.relative_to(run.dir)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
        run.manifest.finish(stage, artifacts, seconds=round(seconds, 2))
    log.info("stage %s: finished in %.1fs", stage, seconds)
    return result


def run_all(cfg, *, force: bool = False) -> None:
    """Every stage in order (ablate and student when enabled), skipping completed ones."""
    for stage in STAGES:
        if stage == "student" and not cfg.student.enabled:
            continue
        run_stage(cfg, stage, force=force)
