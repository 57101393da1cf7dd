"""Running stages: the run directory's state machine.

``run_stage(cfg, key)`` is what every command and pipeline script calls; ``run_all(cfg)``
chains the stages for ``specialists run``. For one stage, in order:

1. **inputs**: a *finished* stage whose recorded config inputs differ from the config is
   refused (or, with ``force``, wiped and redone together with everything downstream); an
   *unfinished* attempt with other inputs never blocks: it is discarded with a warning.
2. **artifacts**: every artifact the stage reads (its upstream chain's) and, when it is done,
   its own is checked against the size and sha256 recorded when it was written; a missing or
   changed one reopens the stage that made it (its damaged files deleted, the stages after it
   wiped), with one line per file. A stage whose upstream is not done is refused, naming the
   command to run; its command-line options are checked (the row's ``check``); a done one is
   skipped.
3. **data**: the data set is loaded and checked (bad data is refused before any work).
4. **one writer**: the stage's lock is taken (a stage with independent jobs locks each job
   instead); a second process waits, then finds the stage done and skips it.
5. **run**: stale temporary files of dead writers are removed, the attempt is recorded, the
   stage runs (resuming from its own checkpoints), its row's reports are rendered, and it is
   recorded as done with the digests of what it wrote and the time of all its attempts.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from ..engine.executors import Job, as_run
from ..errors import SpecialistsError
from ..rundir import Config, Run, config_from_yaml_text, config_values, to_yaml
from ..rundir.io import clean_stale_temp_files, copy_file, read_json
from . import BY_KEY, RUN_REPORTS, STAGES, depends, downstream, upstream_chain

log = logging.getLogger("specialists")
_DEFAULTS = OmegaConf.structured(Config)  # every key at its default

REPORT_SUFFIXES = (".md", ".png")  # views re-rendered from the artifacts: listed, not verified
UNVERIFIED_NAMES = ("state.pt", "manifest.lock")  # resume state (carries its own checksum), locks

# (path, size, mtime_ns) of files verified by this process: a file is hashed once per process
_CHECKED: set = set()


def guard(run: Run, cfg, force: bool = False) -> bool:
    """Refuse (or with ``force`` wipe and reopen) every finished stage whose inputs changed;
    discard every unfinished attempt whose inputs changed. Returns whether ``force`` wiped one."""
    wiped = False
    for stage in STAGES:
        rec = run.manifest.record(stage.key)
        if not rec:
            continue
        now, then = config_values(cfg, depends(stage.key)), rec.get("inputs", {})
        # a key the record lacks was added to the config after the stage ran: it ran as the key's
        # default does (new keys default to the old behaviour), so only another value changes it
        then = {**config_values(_DEFAULTS, [k for k in now if k not in then]), **then}
        changed = [k for k in sorted(set(now) | set(then)) if now.get(k, "<unset>") != then.get(k, "<unset>")]
        if not changed:
            continue
        k = changed[0]
        was, says = then.get(k, "<unset>"), now.get(k, "<unset>")
        if rec.get("status") != "done":
            lock = run.lock(stage.key, f"stage {stage.key}")
            if not stage.jobs and not lock.acquire(blocking=False):
                raise SpecialistsError(f"stage '{stage.key}' in {run.dir} is being run by {lock.holder()} with "
                                       f"{k}={was!r}, but the config says {k}={says!r}: wait for it, or choose "
                                       "another run_dir")
            lock.release()
            log.warning("stage %s: discarding an unfinished attempt made with %s=%r (the config now says %r)",
                        stage.key, k, was, says)
        elif not force:
            raise SpecialistsError(
                f"stage '{stage.key}' in {run.dir} was run with {k}={was!r} but the config now says {k}={says!r}: "
                f"rerun with --force to redo '{stage.key}' and the stages after it, or choose another run_dir")
        else:
            wiped = True
        invalidate(run, stage.key)
    return wiped


def invalidate(run: Run, key: str) -> None:
    """Delete stage ``key`` and everything downstream: records and their folders."""
    keys = downstream(key)
    run.manifest.drop(keys, [run.dir / BY_KEY[k].folder for k in keys])


def repair(run: Run, key: str) -> None:
    """Check the artifacts stage ``key`` reads, and its own when it is done; reopen the first
    stage with a missing or changed one."""
    for k in upstream_chain(key):
        if not run.manifest.is_done(k):
            return  # nothing of it is trusted yet (and ``require`` says so when it is upstream)
        problems = run.manifest.problems(k, _CHECKED)
        if problems:
            for rel, why in problems:
                log.warning("stage %s: %s %s; rebuilding it and the stages after it", k, rel, why)
            later = downstream(k)[1:]
            run.manifest.drop([k, *later], [run.dir / BY_KEY[s].folder for s in later],
                              files=[run.dir / rel for rel, _ in problems])
            return


def require(run: Run, key: str) -> None:
    """Stop with the command to run when stage ``key``'s upstream is not done."""
    up = BY_KEY[key].upstream
    if up and not run.manifest.is_done(up):
        raise SpecialistsError(
            f"stage '{key}' needs stage '{up}', which is not complete in {run.dir}: "
            f"run `specialists {BY_KEY[up].verb} CONFIG` (or `specialists run CONFIG`) first")


def _artifacts(run: Run, key: str) -> tuple[list[Path], list[Path]]:
    """(verified artifacts, reports) in stage ``key``'s folder."""
    folder = run.dir / BY_KEY[key].folder
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(run.dir).parts)]
    # a report's JSON (frontier.json) is a view too: later stages re-render it into this folder
    reports = [p for p in files if p.suffix in REPORT_SUFFIXES or p in run.report_json_files]
    verified = [p for p in files if p not in reports and p.name not in UNVERIFIED_NAMES]
    return verified, reports


def run_stage(cfg, key: str, *, force: bool = False, **options) -> dict | None:
    """Run stage ``key`` on ``cfg.run_dir`` unless it is already complete. Returns its result."""
    stage = BY_KEY[key]
    run = Run(cfg)
    if guard(run, cfg, force):  # a --force rerun: new tracker runs, not the old ones continued
        run.tracker.restart()
    repair(run, key)
    require(run, key)
    if stage.check is not None:
        stage.check(run, **options)
    if run.manifest.is_done(key) and not options:
        log.info("stage %s: already complete, skipping", key)
        return None
    run.load_data()  # before any work: bad data is refused here; data.json is written or repaired
    with nullcontext() if stage.jobs else run.lock(key, f"stage {key}"):
        if run.manifest.is_done(key) and not options:  # another process finished it meanwhile
            log.info("stage %s: completed by another process, skipping", key)
            return None
        for p in clean_stale_temp_files(run.dir):
            log.info("removed %s, left by a killed process", p)
        run.save_config()
        folder = run.dir / stage.folder
        run.manifest.start(key, config_values(cfg, depends(key)), folder)
        t0 = time.perf_counter()
        log.info("stage %s: starting in %s", key, run.dir)
        if stage.subrun:
            options["subrun"] = lambda sub_cfg, keys: Job(f"sub-run {sub_cfg.run_dir}", subrun_job,
                                                          (run, to_yaml(sub_cfg), tuple(keys)))
        result = stage.run(run, **options) or {}
        seconds = time.perf_counter() - t0
        if result.get("complete", True):
            for report in (*stage.reports, *RUN_REPORTS):
                report(run)
            verified, reports = _artifacts(run, key)
            run.manifest.finish(key, seconds, verified, reports, checked=_CHECKED)
            run.tracker.figures(key, result)
            for view in (p for p in reports if p in run.report_json_files):  # frontier.json, as re-rendered
                run.tracker.figures(view.stem, read_json(view))
            run.tracker.images(p for p in reports if p.suffix == ".png")
            run.tracker.flush()
        log.info("stage %s: finished in %.1fs", key, seconds)
    return result


def run_all(cfg, *, force: bool = False) -> None:
    """Every stage in order (those with an ``enabled`` key only when it is true), skipping
    completed ones."""
    for stage in STAGES:
        if stage.enabled and not OmegaConf.select(cfg, stage.enabled):
            continue
        run_stage(cfg, stage.key, force=force)


def subrun_job(parent, sub_config: str, keys: Sequence[str]) -> str:
    """:func:`subrun` as an independent job (here, or as a Ray task): ``sub_config`` is the
    sub-run's config as YAML text. Returns the sub-run's directory."""
    return str(subrun(as_run(parent), config_from_yaml_text(sub_config), keys).dir)


def subrun(parent: Run, cfg, keys: Sequence[str]) -> Run:
    """Run stages ``keys`` in the sub-run ``cfg.run_dir`` (e.g. the ablation's re-clustering
    with another number of specialists), which shares ``parent``'s generalist: copied, so the
    sub-run stays a self-contained run directory."""
    sub = Run(cfg, device=str(parent.device))
    if not sub.manifest.is_done("generalist"):
        src, dst = parent.generalist, sub.generalist
        dst.dir.mkdir(parents=True, exist_ok=True)
        for name in ("weights", "metrics"):
            copy_file(getattr(src, name), getattr(dst, name))
        copy_file(parent.data_json, sub.data_json)
        shared = [sub.data_json]
        if parent.tokenizer_json.exists():  # a text run: the generalist's very token ids
            copy_file(parent.tokenizer_json, sub.tokenizer_json)
            shared.append(sub.tokenizer_json)
        sub.save_config()
        sub.manifest.start("generalist", config_values(cfg, depends("generalist")), dst.dir)
        for path in shared:
            sub.manifest.record_file(path)
        sub.manifest.finish("generalist", 0.0, [dst.weights, dst.metrics], [],
                            shared_from=os.path.relpath(parent.dir, sub.dir))
    for key in keys:
        run_stage(cfg, key)
    return sub
