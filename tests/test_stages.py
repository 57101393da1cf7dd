"""The stage table is the one description of a stage: the command line, the pipeline scripts,
the manifest's dependencies and the run directory's folders all follow from it."""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import tiny_config
from omegaconf import DictConfig, OmegaConf

from specialists.cli import main
from specialists.rundir import run as rundir_run
from specialists.stages import BY_KEY, BY_VERB, EXECUTION_KEYS, STAGES, covers, depends, downstream

REPO = Path(__file__).resolve().parent.parent


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


# ---------------------------------------------------- what a stage reads is what it depends on


def _frames():
    f = sys._getframe(2)
    while f is not None:
        yield f
        f = f.f_back


def _inside(name: str, file: str) -> bool:
    return any(f.f_code.co_name == name and f.f_code.co_filename.endswith(file) for f in _frames())


@contextmanager
def recorded_reads():
    """``{dotted key: 'where'}`` of every config setting read inside (by attribute, item,
    ``.get``, ``OmegaConf.select``; a section turned whole into a dict counts as its key), but
    those ``config_values`` reads to record the stage's declared inputs in the manifest."""
    reads: dict[str, str] = {}
    getattr_, getitem, get = DictConfig.__getattr__, DictConfig.__getitem__, DictConfig.get
    select, to_container = OmegaConf.select, OmegaConf.to_container

    def note(key: str) -> None:
        if key and not _inside("config_values", "rundir/config.py"):
            reads.setdefault(key, "Run.data" if _inside("data", "rundir/run.py") else "")

    def leaf(node, key, value):
        if isinstance(key, str) and not key.startswith("_") and not isinstance(value, DictConfig):
            note(node._get_full_key(key))
        return value

    def whole(cfg, *args, **kwargs):
        if isinstance(cfg, DictConfig):
            note(cfg._get_full_key(""))  # "" (the whole config: saved, logged) is no input
        return to_container(cfg, *args, **kwargs)

    def selected(cfg, key, *args, **kwargs):
        value = select(cfg, key, *args, **kwargs)
        if not isinstance(value, DictConfig):
            note(".".join(filter(None, (cfg._get_full_key(""), key))))
        return value

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DictConfig, "__getattr__", lambda self, key: leaf(self, key, getattr_(self, key)))
        mp.setattr(DictConfig, "__getitem__", lambda self, key: leaf(self, key, getitem(self, key)))
        mp.setattr(DictConfig, "get", lambda self, key, default=None: leaf(self, key, get(self, key, default)))
        mp.setattr(OmegaConf, "select", staticmethod(selected))
        mp.setattr(OmegaConf, "to_container", staticmethod(whole))
        yield reads


# Read by ``Run.data`` in every stage, to refuse before any training what cannot fit the data:
# the class count against the subsets' sizes, the student's model against the inputs. Checks of
# the subsets and student stages' settings (which depend on them), inputs of no other stage.
CHECKED_BY_RUN_DATA = ("subsets.num_specialists", "subsets.classes_per_specialist", "subsets.coverage",
                       "student.enabled", "student.model")


def test_every_key_a_stage_reads_is_one_it_depends_on_or_an_execution_key(tmp_path, monkeypatch, one_thread_here):
    """Every stage of a tiny run (reports included), reading the config through a recorder: a
    key read that is neither in the stage's dependencies (``depends``: a change to it
    invalidates the stage) nor execution-only would let a changed setting silently reuse stale
    artifacts (``train.sync_bn`` did). Covered: the ensemble teacher with its controls (the
    born-again student and the second generalist) and the ablation's compute-matched control,
    not the re-clustering sub-runs (``ablate.counts=[]``: the same stages again), a tree student
    or an API teacher. The plots are not drawn (no setting reaches matplotlib): seconds saved."""
    from specialists.reports import plots
    from specialists.rundir.io import atomic_write
    from specialists.stages.pipeline import run_stage

    monkeypatch.setattr(plots, "_save_png", lambda fig, path: atomic_write(path, lambda f: f.write(b"\x89PNG")))
    cfg = tiny_config(tmp_path / "run", "generalist.epochs=1", "specialists.epochs=1", "student.epochs=1",
                      "data.train_per_class=20", "data.test_per_class=10", "evaluate.bootstrap=10",
                      "ablate.counts=[]", "ablate.control=true", "student.controls=true")
    for stage in STAGES:
        with recorded_reads() as reads:
            run_stage(cfg, stage.key)
        stray = {k: where for k, where in reads.items() if not covers(depends(stage.key), k)
                 and not covers(EXECUTION_KEYS, k) and not (where == "Run.data" and covers(CHECKED_BY_RUN_DATA, k))}
        assert not stray, f"stage {stage.key} reads {sorted(stray)} but depends on none of them: add them to its keys"
        assert {"run_dir", "seed"} <= set(reads)  # the recorder sees reads (every stage seeds something)
    assert covers(depends("generalist"), "train.sync_bn") and "train.sync_bn" in reads  # the student read it last


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
