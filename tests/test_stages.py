"""The stage table is the one description of a stage: the command line, the pipeline scripts,
the manifest's dependencies and the run directory's folders all follow from it."""

from __future__ import annotations

import importlib
from pathlib import Path

from specialists.cli import main
from specialists.rundir import run as rundir_run
from specialists.stages import BY_KEY, BY_VERB, STAGES, depends, downstream

REPO = Path(__file__).resolve().parent.parent

# What each stage depends on, written out by hand: a changed value of any of these must
# invalidate the stage (the manifest records exactly these keys).
EXPECTED_DEPENDS = {
    "generalist": ["seed", "data", "model", "generalist"],
    "subsets": ["seed", "data", "model", "generalist", "subsets"],
    "specialists": ["seed", "data", "model", "generalist", "subsets", "specialists", "distill.temperature",
                    "distill.loss"],
    "evaluate": ["seed", "data", "model", "generalist", "subsets", "specialists", "distill.temperature",
                 "distill.loss", "combine", "evaluate"],
}
# every ablate key but ablate.cascade, which the student stage (where the cascade is computed) owns
EXPECTED_DEPENDS["ablate"] = EXPECTED_DEPENDS["evaluate"] + ["ablate.counts", "ablate.order", "ablate.seed",
                                                             "ablate.control"]
EXPECTED_DEPENDS["student"] = EXPECTED_DEPENDS["evaluate"] + ["student", "distill", "ablate.cascade"]


def test_rows_agree_with_the_contract():
    # verbs and folders are the command-line and run-directory contracts
    assert [(s.key, s.verb, s.folder) for s in STAGES] == [
        ("generalist", "train-generalist", "generalist"), ("subsets", "find-subsets", "subsets"),
        ("specialists", "train-specialists", "specialists"), ("evaluate", "evaluate", "evaluation"),
        ("ablate", "ablate", "ablation"), ("student", "distill", "student")]
    folders = {getattr(rundir_run, n) for n in ("GENERALIST", "SUBSETS", "SPECIALISTS", "EVALUATION", "ABLATION",
                                                "STUDENT")}
    assert {s.folder for s in STAGES} == folders
    for s in STAGES:
        assert s.upstream is None or s.upstream in BY_KEY
        # the stage's module is named by its key
        assert s.run.__module__ == f"specialists.stages.{s.key}", s.run.__module__


def test_dependencies_and_downstream():
    assert {k: depends(k) for k in BY_KEY} == EXPECTED_DEPENDS


def test_ablate_records_what_its_whole_section_did_but_the_cascade():
    """The ablate stage names its keys one by one (to leave ``ablate.cascade`` to the student
    stage): the manifest records the same flat inputs as the whole section did, so run
    directories made before stay valid."""
    from specialists.rundir.config import config_values, load_config

    cfg = load_config(None, ["run_dir=/tmp/unused", "ablate.counts=[2,4]", "ablate.control=false"])
    whole = config_values(cfg, ["ablate"])
    assert whole.pop("ablate.cascade") is True
    assert config_values(cfg, BY_KEY["ablate"].keys) == whole
    assert downstream("generalist") == [s.key for s in STAGES]
    assert downstream("evaluate") == ["evaluate", "ablate", "student"]
    assert downstream("ablate") == ["ablate"]


def test_every_verb_is_a_command_and_a_pipeline_script(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().err
    for verb in BY_VERB:
        assert f"specialists {verb} CONFIG" in usage, verb
        script = importlib.import_module(f"pipelines.{verb.replace('-', '_')}")
        assert callable(script.main)
    assert "--only" in usage  # from the train-specialists row's options
    assert main(["no-such-verb"]) == 2
    assert "unknown command 'no-such-verb'" in capsys.readouterr().err
