"""Tests for the specialist stage as a pipeline stage: ``--only`` fan-out, per-specialist
completion markers, resuming after a kill (bit-identical to an uninterrupted run), and
one-line errors for impossible subset configurations.

The tiny run (conftest.py) provides the generalist and subsets; every test that trains works on
its own copy. Runs go through the real CLI entry point (``specialists.cli.main``) or a
``python -m pipelines.run`` subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from specialists.cli import main
from specialists.errors import SpecialistsError
from specialists.rundir import Run
from specialists.rundir.config import to_yaml
from specialists.rundir.io import read_json

REPO = Path(__file__).resolve().parents[1]


def _config_file(cfg, path: Path) -> Path:
    path.write_text(to_yaml(cfg))
    return path


def _copy_without_specialists(tiny_run, dst: Path) -> Path:
    """The tiny run's generalist and subsets, with the specialist stage never started."""
    shutil.copytree(tiny_run.run_dir, dst, ignore=shutil.ignore_patterns("specialists", "manifest.lock"))
    manifest = read_json(dst / "manifest.json")
    manifest["stages"].pop("specialists", None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    assert {"generalist", "subsets"} <= set(manifest["stages"])
    return dst


def _stage_record(run_dir: Path, stage: str = "specialists"):
    return read_json(run_dir / "manifest.json")["stages"].get(stage)


def _stamp(path: Path):
    st = path.stat()
    return st.st_mtime_ns, st.st_ino, st.st_size


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# ----------------------------------------------------------------------------- --only


def test_only_trains_exactly_the_named_specialists(tiny_run, tmp_path, capsys, one_thread_here):
    # (one thread: the specialists trained here are compared with nothing but their own files)
    dst = _copy_without_specialists(tiny_run, tmp_path / "run")
    cfg_file = _config_file(tiny_run, tmp_path / "tiny.yaml")
    args = ["train-specialists", str(cfg_file), f"run_dir={dst}", "specialists.epochs=1"]
    spec = dst / "specialists"

    # an id the run does not have: one line, nothing trained
    assert main([*args, "--only", "0,7"]) == 2
    err = capsys.readouterr().err  # the stage's "starting" log line may precede the error
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    line = errors[0]
    assert "[7]" in line and "--only" in line
    assert not any(spec.glob("*/metrics.json"))

    assert main([*args, "--only", "0,2"]) == 0
    assert sorted(p.parent.name for p in spec.glob("*/metrics.json")) == ["000", "002"]
    assert not (spec / "001").exists()
    rec = _stage_record(dst)
    assert rec is not None and rec["status"] != "done"  # open until every specialist is trained
    for sid in ("000", "002"):
        m = read_json(spec / sid / "metrics.json")
        assert m["id"] == int(sid) and (spec / sid / "model.safetensors").is_file()
    before = {name: _stamp(spec / "000" / name) for name in ("metrics.json", "model.safetensors")}
    before_2 = _stamp(spec / "002" / "metrics.json")

    # the default run trains only the rest and closes the stage
    assert main(args) == 0
    assert sorted(p.parent.name for p in spec.glob("*/metrics.json")) == ["000", "001", "002"]
    assert {name: _stamp(spec / "000" / name) for name in before} == before
    assert _stamp(spec / "002" / "metrics.json") == before_2
    rec = _stage_record(dst)
    assert rec["status"] == "done"
    assert {f"specialists/{i:03d}/metrics.json" for i in range(3)} <= set(rec["artifacts"])

    # a finished stage is skipped as a whole
    assert main(args) == 0
    assert {name: _stamp(spec / "000" / name) for name in before} == before


# ----------------------------------------------------------------------------- kill and rerun


def _state(run_dir: Path, sid: int, name: str) -> bool:
    return (run_dir / "specialists" / f"{sid:03d}" / name).exists()


def test_killed_pipeline_resumes_without_redoing_finished_specialists(tiny_run, tmp_path, capsys):
    """SIGKILL ``python -m pipelines.run`` once specialist 000 is finished (ideally while 001
    is between its epochs), rerun the stage, and compare with the fixture's uninterrupted
    specialists (same config and seed): equal weights, bit for bit, and equal metrics.

    The rerun uses the ``train-specialists`` verb (the same ``run_stage`` call ``run`` makes
    for this stage), so the test does not also time the evaluation, ablation and student stages.
    """
    dst = _copy_without_specialists(tiny_run, tmp_path / "run")
    cfg_file = _config_file(tiny_run, tmp_path / "tiny.yaml")
    overrides = [f"run_dir={dst}", "student.enabled=false"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
               MKL_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.run", str(cfg_file), *overrides],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if _state(dst, 0, "metrics.json") and (_state(dst, 1, "state.pt") or _state(dst, 1, "metrics.json")):
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, log_path.read_text()[-2000:]  # killed, not finished
    assert _state(dst, 0, "metrics.json")
    assert not _state(dst, 2, "metrics.json")
    assert _stage_record(dst)["status"] != "done"
    mid_specialist = _state(dst, 1, "state.pt") and not _state(dst, 1, "metrics.json")
    with capsys.disabled():
        print(f"\nkilled while specialist 001 was {'half trained' if mid_specialist else 'finished'}")
    spec = dst / "specialists"
    before = {name: _stamp(spec / "000" / name) for name in ("metrics.json", "model.safetensors")}

    assert main(["train-specialists", str(cfg_file), *overrides]) == 0
    capsys.readouterr()
    assert {name: _stamp(spec / "000" / name) for name in before} == before  # not redone
    assert _stage_record(dst)["status"] == "done"

    ref = Path(tiny_run.run_dir) / "specialists"
    for sid in ("000", "001", "002"):
        got, want = load_file(spec / sid / "model.safetensors"), load_file(ref / sid / "model.safetensors")
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (sid, k)
        m_got, m_want = read_json(spec / sid / "metrics.json"), read_json(ref / sid / "metrics.json")
        for m in (m_got, m_want):
            m.pop("seconds")
            for h in m["history"]:
                h.pop("seconds")
        assert m_got == m_want, sid


# ----------------------------------------------------------------------------- bad subset configurations


BAD_SUBSETS = [
    (["subsets.num_specialists=10"], "subsets.num_specialists"),  # the tiny data set has 9 classes
    (["subsets.num_specialists=0"], "subsets.num_specialists"),
    (["subsets.mode=nearest", "subsets.classes_per_specialist=10"], "subsets.classes_per_specialist"),
    (["subsets.mode=nearest", "subsets.classes_per_specialist=0"], "subsets.classes_per_specialist"),
]


@pytest.mark.parametrize("overrides,key", BAD_SUBSETS)
@pytest.mark.parametrize("verb", ["find-subsets", "run"])
def test_bad_subset_configuration_is_one_line_error(tmp_path, capsys, verb, overrides, key):
    run_dir = tmp_path / "run"
    cfg_file = _config_file(tiny_config(run_dir), tmp_path / "tiny.yaml")
    assert main([verb, str(cfg_file), *overrides]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert key in line
    assert not run_dir.exists()  # refused before any work


def test_bad_subset_configuration_from_the_shell(tmp_path):
    """The installed command path: a fresh interpreter, return code 2, exactly one stderr line."""
    cfg_file = _config_file(tiny_config(tmp_path / "run"), tmp_path / "tiny.yaml")
    proc = subprocess.run([sys.executable, "-m", "specialists.cli", "find-subsets", str(cfg_file),
                           "subsets.num_specialists=12"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "subsets.num_specialists" in line and "12" in line and "9 classes" in line


@pytest.mark.parametrize("attr,value", [("num_specialists", 12), ("classes_per_specialist", 10)])
def test_subset_stage_checks_the_loaded_class_count(tmp_path, attr, value):
    """For data sets whose class count is only known once loaded, the stage itself refuses
    (here the config is changed after validation to reach that check)."""
    from specialists.stages.subsets import find

    cfg = tiny_config(tmp_path / "run")
    setattr(cfg.subsets, attr, value)
    with pytest.raises(SpecialistsError) as info:
        find(Run(cfg))
    msg = str(info.value)
    assert f"subsets.{attr}" in msg and "\n" not in msg
    assert not (tmp_path / "run" / "subsets").exists()


def test_train_specialists_before_subsets_names_the_missing_stage(tmp_path, capsys):
    cfg_file = _config_file(tiny_config(tmp_path / "run"), tmp_path / "tiny.yaml")
    assert main(["train-specialists", str(cfg_file), "--only", "0"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "subsets" in line and "find-subsets" in line
