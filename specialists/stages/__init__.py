"""The stages of the pipeline, and THE stage table: what a stage is, in one place.

A row says everything the rest of the code needs to know about a stage: its key (the name in
``manifest.json``, and its module here), its command-line verb, its folder in the run
directory, the stage whose artifacts it consumes, the config keys it depends on (besides its
upstream's: a change to any of them invalidates it), the function that runs it, and the
reports rendered after it. The pipeline (:mod:`specialists.stages.pipeline`) and the command
line (:mod:`specialists.cli`) are built from this table; adding a stage is a module and a row.

Every config key a stage reads is one it depends on (``depends``) or an execution-only key
(:data:`EXECUTION_KEYS`): tests/test_stages.py runs each stage recording its reads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from ..reports import render
from ..rundir.config import AblateConfig
from ..rundir.run import ABLATION, EVALUATION, GENERALIST, SPECIALISTS, STUDENT, SUBSETS
from . import ablate, evaluate, generalist, specialists, student, subsets


@dataclass(frozen=True)
class Stage:
    key: str  # manifest key and module name
    verb: str  # `specialists VERB CONFIG`, and pipelines/VERB.py
    folder: str  # its folder in the run directory (what --force wipes)
    upstream: str | None  # the stage whose artifacts it consumes
    keys: tuple[str, ...]  # config keys it depends on itself (its upstream's are added)
    run: Callable[..., dict]  # (run, **options) -> result; {"complete": False} leaves it open
    reports: tuple[Callable, ...]  # rendered (from disk) after it completes
    help: str
    options: tuple[str, ...] = ()  # command-line options it takes (passed to ``run``)
    # (run, **options): refuses bad options before the attempt is recorded in the manifest
    check: Callable[..., None] | None = None
    subrun: bool = False  # whether ``run`` takes ``subrun=``, to run stages in a sub-run
    jobs: bool = False  # ``run`` locks each of its independent jobs itself (no stage-wide lock)
    enabled: str | None = None  # a boolean config key; ``specialists run`` skips the stage when false


# Keys that say where and how a run executes, never what it computes: no stage depends on them
# (changing one redoes nothing). A key or a whole section, as in ``Stage.keys``.
EXECUTION_KEYS: tuple[str, ...] = ("run_dir", "device", "launch", "track")

# ``ablate.cascade`` is the student stage's (it trains the second generalist the cascade needs):
# the ablate stage depends on every other ``ablate`` key, so toggling the cascade redoes no ablation
ABLATE_KEYS = tuple(f"ablate.{f.name}" for f in fields(AblateConfig) if f.name != "cascade")


STAGES: tuple[Stage, ...] = (
    # train.sync_bn (BatchNorm statistics over all torchrun ranks) changes every trained model:
    # the generalist's, and through it every stage's
    Stage("generalist", "train-generalist", GENERALIST, None, ("seed", "data", "model", "generalist", "train.sync_bn"),
          generalist.train, (render.curves,), "train the C-way generalist"),
    Stage("subsets", "find-subsets", SUBSETS, "generalist", ("subsets",),
          subsets.find, (render.covariance,), "cluster the covariance of its probabilities into class subsets"),
    Stage("specialists", "train-specialists", SPECIALISTS, "subsets",
          ("specialists", "distill.temperature", "distill.loss"),
          specialists.train, (), "train one specialist per subset", options=("only",), jobs=True,
          check=specialists.check_only),
    # render.frontier first: the reports after it name the best control it finds
    Stage("evaluate", "evaluate", EVALUATION, "specialists", ("combine", "evaluate"),
          evaluate.evaluate, (render.evaluation_plots, render.frontier, render.evaluation_report),
          "generalist vs routed ensemble on the test split"),
    Stage("ablate", "ablate", ABLATION, "evaluate", ABLATE_KEYS,
          ablate.ablate, (render.ablation_plot, render.frontier, render.ablation_report, render.evaluation_report),
          "the ablation over the number of specialists, and the compute-matched control", subrun=True),
    Stage("student", "distill", STUDENT, "evaluate", ("student", "distill", "ablate.cascade"),
          student.distill, (render.frontier, render.student_report, render.tree_plots, render.evaluation_report,
                            render.ablation_report),
          "distil the ensemble into one student, beside the born-again control and the cascade",
          enabled="student.enabled"),
)

# rendered after every stage (and so after each stage's own): views of the whole run
RUN_REPORTS: tuple[Callable, ...] = (render.summary,)

BY_KEY = {s.key: s for s in STAGES}
BY_VERB = {s.verb: s for s in STAGES}


def depends(key: str) -> list[str]:
    """Every config key stage ``key`` depends on: its own and, recursively, its upstream's."""
    s = BY_KEY[key]
    return (depends(s.upstream) if s.upstream else []) + list(s.keys)


def upstream_chain(key: str) -> list[str]:
    """The stages whose artifacts stage ``key`` reads, first to last, then ``key`` itself."""
    up = BY_KEY[key].upstream
    return (upstream_chain(up) if up else []) + [key]


def downstream(key: str) -> list[str]:
    """``key`` and every stage that consumes its artifacts, in pipeline order."""
    out = [key]
    for s in STAGES:
        if s.upstream in out and s.key not in out:
            out.append(s.key)
    return out


def covers(keys, key: str) -> bool:
    """Whether ``key`` is one of ``keys`` or inside one of their sections (``generalist`` covers
    ``generalist.lr``)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


__all__ = ["BY_KEY", "BY_VERB", "EXECUTION_KEYS", "RUN_REPORTS", "STAGES", "Stage", "covers", "depends", "downstream",
           "upstream_chain"]
