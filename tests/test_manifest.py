"""The run manifest: changed inputs are refused (one line naming the stage and the key), --force
redoes the stage and wipes what depends on it, unrelated keys change nothing, and a stage
whose upstream is missing names the command to run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY, tiny_config

from specialists.cli import main
from specialists.errors import SpecialistsError
from specialists.rundir import Manifest, config_values
from specialists.stages import BY_KEY, depends
from specialists.stages.pipeline import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SHORT = ["generalist.epochs=1"]


@pytest.fixture(scope="module")
def done_generalist(tmp_path_factory) -> Path:
    """A run directory whose generalist stage (1 epoch) is complete; copy before changing it."""
    d = tmp_path_factory.mktemp("manifest") / "run"
    run_stage(tiny_config(d, *SHORT), "generalist")
    return d


@pytest.fixture
def run_dir(done_generalist, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(done_generalist, d)
    return d


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    return msg


def test_changed_generalist_key_is_refused(run_dir, capsys):
    before = snapshot(run_dir)
    with pytest.raises(SpecialistsError) as info:
        run_stage(tiny_config(run_dir, "generalist.epochs=2"), "generalist")
    msg = one_line(info.value)
    assert "'generalist'" in msg and "generalist.epochs=1" in msg and "generalist.epochs=2" in msg
    assert "--force" in msg
    # the same through the command line: status 2, one line; and nothing was touched
    capsys.readouterr()
    rc = main(["train-generalist", QUICKSTART, f"run_dir={run_dir}", *TINY, "generalist.epochs=2"])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "'generalist'" in lines[0] and "generalist.epochs" in lines[0]
    # any later stage is refused for the same reason (the generalist it would build on is stale)
    with pytest.raises(SpecialistsError, match="'generalist'.*generalist.epochs"):
        run_stage(tiny_config(run_dir, "generalist.epochs=2"), "subsets")
    # other inputs of the generalist: the seed, the data, the model
    for override, key in [("seed=3", "seed"), ("model.width=4", "model.width"), ("data.difficulty=2.0", "data.difficulty")]:
        with pytest.raises(SpecialistsError) as info:
            run_stage(tiny_config(run_dir, *SHORT, override), "generalist")
        assert "'generalist'" in str(info.value) and key in str(info.value)
    assert snapshot(run_dir) == before


def test_force_reruns_the_stage_and_wipes_downstream(run_dir):
    cfg = tiny_config(run_dir, *SHORT)
    m = Manifest(run_dir / "manifest.json")
    for stage in ("subsets", "specialists", "evaluate"):  # pretend the later stages ran
        folder = run_dir / BY_KEY[stage].folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "artifact.txt").write_text(stage)
        m.start(stage, config_values(cfg, depends(stage)), folder)
        m.finish(stage, 0.1, [folder / "artifact.txt"], [])
    (run_dir / "notes.txt").write_text("not a stage's")
    old_metrics = json.loads((run_dir / "generalist" / "metrics.json").read_text())
    assert len(old_metrics["history"]) == 1

    run_stage(tiny_config(run_dir, "generalist.epochs=2"), "generalist", force=True)

    metrics = json.loads((run_dir / "generalist" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["epochs"] == 2  # redone from scratch, 2 epochs
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    rec = manifest(run_dir)["stages"]
    assert set(rec) == {"generalist"}
    assert rec["generalist"]["status"] == "done" and rec["generalist"]["inputs"]["generalist.epochs"] == 2
    for stage in ("subsets", "specialists", "evaluate"):
        assert not (run_dir / BY_KEY[stage].folder).exists(), stage
    assert (run_dir / "notes.txt").read_text() == "not a stage's"
    # now the new value is the recorded one: rerunning with it is a no-op, the old one is refused
    assert run_stage(tiny_config(run_dir, "generalist.epochs=2"), "generalist") is None
    with pytest.raises(SpecialistsError, match="generalist.epochs"):
        run_stage(tiny_config(run_dir, *SHORT), "generalist")


def test_changing_only_later_keys_leaves_the_generalist_alone(run_dir):
    gen_before = snapshot(run_dir / "generalist")
    rec_before = manifest(run_dir)["stages"]["generalist"]
    # keys no recorded stage depends on: not refused, the finished generalist is just skipped
    cfg2 = tiny_config(run_dir, *SHORT, "subsets.num_specialists=2", "combine.top_n=2", "student.epochs=5")
    assert run_stage(cfg2, "generalist") is None
    # the subsets stage runs on the existing generalist with the new count
    run_stage(cfg2, "subsets")
    assert snapshot(run_dir / "generalist") == gen_before
    stages = manifest(run_dir)["stages"]
    assert stages["generalist"] == rec_before
    assert stages["subsets"]["status"] == "done" and stages["subsets"]["inputs"]["subsets.num_specialists"] == 2
    subsets = json.loads((run_dir / "subsets" / "subsets.json").read_text())["subsets"]
    assert 1 <= len(subsets) <= 2
    # a further change is now refused in the name of the subsets stage, not the generalist
    with pytest.raises(SpecialistsError) as info:
        run_stage(tiny_config(run_dir, *SHORT, "subsets.num_specialists=3"), "subsets")
    msg = one_line(info.value)
    assert "'subsets'" in msg and "subsets.num_specialists" in msg and "'generalist'" not in msg
    assert snapshot(run_dir / "generalist") == gen_before


@pytest.mark.parametrize("stage,upstream_command", [
    ("subsets", "train-generalist"), ("specialists", "find-subsets"), ("evaluate", "train-specialists"),
    ("ablate", "evaluate"), ("student", "evaluate"),
])
def test_missing_upstream_names_the_command(tmp_path, stage, upstream_command):
    d = tmp_path / "empty"
    with pytest.raises(SpecialistsError) as info:
        run_stage(tiny_config(d), stage)
    msg = one_line(info.value)
    assert f"specialists {upstream_command}" in msg, msg
    assert not d.exists()  # refused before anything was written


def test_missing_upstream_through_the_cli(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    capsys.readouterr()
    assert main(["find-subsets", QUICKSTART, f"run_dir={empty}", *TINY]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "specialists train-generalist" in err[0], err
    # with the generalist done, train-specialists asks for find-subsets
    assert main(["train-specialists", QUICKSTART, f"run_dir={run_dir}", *TINY, *SHORT]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "specialists find-subsets" in err[0], err


def test_a_key_added_after_a_stage_ran_counts_as_its_default(run_dir):
    """A manifest written before a config key existed lacks it: the stage ran as the key's default
    does, so the default changes nothing and any other value is refused like any change."""
    path = run_dir / "manifest.json"
    data = manifest(run_dir)
    inputs = data["stages"]["generalist"]["inputs"]
    assert inputs.pop("model.pretrained", "absent") is None  # as if model.pretrained were new
    path.write_text(json.dumps(data))
    before = snapshot(run_dir)
    run_stage(tiny_config(run_dir, *SHORT), "generalist")  # done: nothing to redo
    assert snapshot(run_dir) == before
    (run_dir / "w.safetensors").write_bytes(b"")
    with pytest.raises(SpecialistsError, match="model.pretrained"):
        run_stage(tiny_config(run_dir, *SHORT, f"model.pretrained={run_dir / 'w.safetensors'}"), "generalist")
