"""Experiment trackers (``track.backends``): what each backend records, read back with the
backend's own reader; one tracker run across a killed and resumed stage; a ``--force`` rerun
starts a new one; ``summary.csv`` equals the models' own metrics; bad input is one line."""

import csv
import json
import logging
import shutil

import pytest
from conftest import tiny_config

from specialists.engine import fit as fit_module
from specialists.engine.executors import Job, run_jobs
from specialists.errors import ConfigError
from specialists.rundir import track
from specialists.stages.pipeline import run_stage

pytest.importorskip("tensorboard")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")

ALL = "track.backends=[csv,tensorboard,mlflow,wandb]"


def _forget_trackers():
    """What a new process sees: no tracker open."""
    for t in list(track._OPEN.values()):
        t.close()
    track._OPEN.clear()


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def _mlflow_runs(run_dir):
    client = mlflow.MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("specialists")
    return client, client.search_runs([exp.experiment_id])


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tracked_generalist(tmp_path, one_thread_here):
    """The tiny generalist, 3 epochs, with every backend on."""
    _forget_trackers()
    cfg = tiny_config(tmp_path / "run", ALL, "generalist.epochs=3", "track.log_every=3")
    run_stage(cfg, "generalist")
    _forget_trackers()
    yield cfg, tmp_path / "run"
    _forget_trackers()


def test_every_backend_records_the_generalists_history(tracked_generalist):
    cfg, d = tracked_generalist
    history = json.loads((d / "generalist" / "metrics.json").read_text())["history"]
    steps = history[0]["steps"]
    # csv: one row per epoch, the very figures of metrics.json
    rows = _csv(d / "generalist" / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for r, h in zip(rows, history):
        assert float(r["val_top1"]) == pytest.approx(h["val_top1"], rel=1e-6)
        assert float(r["train_loss"]) == pytest.approx(h["train_loss"], rel=1e-6)
        assert int(r["step"]) == h["epoch"] * steps
        assert float(r["samples_per_s"]) == pytest.approx(steps * cfg.generalist.batch_size / h["seconds"], rel=1e-6)
    # tensorboard: per epoch at the global step, and the per-step loss every log_every steps
    tb = d / "tensorboard" / "generalist"
    got = _scalars(tb, "val/top1")
    assert [s for s, _ in got] == [steps, 2 * steps, 3 * steps]
    assert [v for _, v in got] == pytest.approx([h["val_top1"] for h in history], rel=1e-6)
    assert [s for s, _ in _scalars(tb, "train/step_loss")] == list(range(3, 3 * steps + 1, 3))
    # mlflow: one run, the config as parameters, the same figures
    client, runs = _mlflow_runs(d)
    assert len(runs) == 1 and runs[0].info.run_id == json.loads((d / "track.json").read_text())["mlflow"]
    assert runs[0].data.params["generalist.lr"] == str(cfg.generalist.lr)
    assert runs[0].data.params["model.name"] == "cnn"
    hist = client.get_metric_history(runs[0].info.run_id, "generalist/val/top1")
    mf = sorted((m.step, m.value) for m in hist)
    assert [s for s, _ in mf] == [s for s, _ in got] and [v for _, v in mf] == pytest.approx([v for _, v in got])
    assert runs[0].data.metrics["report/generalist/test_top1"] == pytest.approx(history[-1]["test_top1"], rel=1e-6)
    # wandb offline: the run's file, under the kept id, holds the metrics and the final figures
    run_id = json.loads((d / "track.json").read_text())["id"]
    files = list((d / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, list((d / "wandb").iterdir())
    blob = b"".join(f.read_bytes() for f in files)
    assert b"generalist/val/top1" in blob and b"report/generalist/test_top1" in blob


def test_a_killed_and_resumed_stage_continues_one_tracker_run(tmp_path, one_thread_here, monkeypatch):
    _forget_trackers()
    cfg = tiny_config(tmp_path / "run", "track.backends=[csv,tensorboard,mlflow]", "generalist.epochs=4",
                      "track.log_every=1")
    real, saves = fit_module.save_state, []

    def killed_after_two(path, state):
        real(path, state)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed after the second epoch's checkpoint

    monkeypatch.setattr(fit_module, "save_state", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "generalist")
    monkeypatch.setattr(fit_module, "save_state", real)
    _forget_trackers()  # a new process resumes
    first_id = json.loads((tmp_path / "run" / "track.json").read_text())
    run_stage(cfg, "generalist")
    _forget_trackers()
    d = tmp_path / "run"
    steps = json.loads((d / "generalist" / "metrics.json").read_text())["history"][0]["steps"]
    assert json.loads((d / "track.json").read_text()) == first_id
    client, runs = _mlflow_runs(d)
    assert len(runs) == 1
    per_epoch = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "generalist/val/top1"))
    assert per_epoch == [steps, 2 * steps, 3 * steps, 4 * steps]
    tb = [s for s, _ in _scalars(d / "tensorboard" / "generalist", "train/step_loss")]
    assert tb == list(range(1, 4 * steps + 1))  # one continuous axis, no step twice
    assert [int(r["epoch"]) for r in _csv(d / "generalist" / "history.csv")] == [1, 2, 3, 4]

    # --force with another input: a new tracker run
    run_stage(tiny_config(d, "track.backends=[csv,tensorboard,mlflow]", "generalist.epochs=1"), "generalist",
              force=True)
    _forget_trackers()
    assert json.loads((d / "track.json").read_text())["id"] != first_id["id"]
    assert len(_mlflow_runs(d)[1]) == 2


def test_a_failing_tracker_is_one_warning_and_the_csv_goes_on(tmp_path, one_thread_here, monkeypatch, caplog):
    _forget_trackers()

    def broken(self, ns, values, step):
        raise OSError("disk full")

    monkeypatch.setattr(track._TensorBoard, "scalars", broken)
    cfg = tiny_config(tmp_path / "run", "track.backends=[csv,tensorboard]", "generalist.epochs=2")
    with caplog.at_level(logging.WARNING, logger="specialists"):
        run_stage(cfg, "generalist")
    _forget_trackers()
    warned = [r.getMessage() for r in caplog.records if "tracker tensorboard failed" in r.getMessage()]
    assert len(warned) == 1 and "disk full" in warned[0]
    assert [int(r["epoch"]) for r in _csv(tmp_path / "run" / "generalist" / "history.csv")] == [1, 2]


def test_summary_csv_holds_each_models_own_figures(tiny_run, tmp_path, one_thread_here):
    d = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, d)
    run_stage(tiny_config(d), "evaluate")
    rows = {r["model"]: r for r in _csv(d / "summary.csv")}
    gen = json.loads((d / "generalist" / "metrics.json").read_text())
    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    for col in ("test_top1", "test_top5", "test_nll", "train_samples"):
        assert float(rows["generalist"][col]) == pytest.approx(gen[col], rel=1e-9)
    assert float(rows["generalist"]["inference_flops"]) == ev["cost"]["generalist_flops"]
    assert float(rows["ensemble"]["test_top1"]) == pytest.approx(ev["ensemble"]["top1"], rel=1e-9)
    assert float(rows["ensemble"]["inference_flops"]) == ev["cost"]["ensemble_flops"]
    for i in range(3):
        m = json.loads((d / "specialists" / f"{i:03d}" / "metrics.json").read_text())
        r = rows[f"specialist/{i:03d}"]
        assert float(r["test_top1"]) == pytest.approx(m["subset_top1"], rel=1e-9) and r["scope"].startswith("its subset")
    assert "student" not in rows  # no row for a stage not run


def test_the_frontier_goes_to_the_trackers_with_each_stage_that_renders_it(tiny_run, tmp_path, one_thread_here):
    _forget_trackers()
    d = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, d)
    run_stage(tiny_config(d, "track.backends=[csv,tensorboard]"), "evaluate")
    _forget_trackers()
    frontier = json.loads((d / "evaluation" / "frontier.json").read_text())
    want = track.flatten(frontier)
    assert want  # the frontier has figures to log
    key, value = next(iter(want.items()))
    assert _scalars(d / "tensorboard" / "report" / "frontier", key) == [(0, pytest.approx(value, rel=1e-6))]


def test_job_progress_is_one_line_per_job_with_an_eta(caplog):
    launch = tiny_config("unused").launch
    with caplog.at_level(logging.INFO, logger="specialists"):
        out = run_jobs([Job(f"j{i}", lambda i=i: i * i, ()) for i in range(3)], launch, "specialists")
    assert out == [0, 1, 4]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("specialists ")]
    assert [ln.split(" done")[0] for ln in lines] == ["specialists 1/3", "specialists 2/3", "specialists 3/3"]
    assert "left" in lines[0] and "left" not in lines[2]


def test_bad_tracker_settings_are_one_line_before_any_work(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"track\.backends"):
        tiny_config(tmp_path, "track.backends=[csv,neptune]")
    monkeypatch.setitem(track.PACKAGES, "tensorboard", "no_such_package_here")
    with pytest.raises(ConfigError, match=r"specialists\[track\]"):
        track.check_environment(tiny_config(tmp_path, "track.backends=[tensorboard]").track)
    with pytest.raises(ConfigError, match="no MLflow server answers at 127.0.0.1:9"):
        track.check_environment(tiny_config(tmp_path, "track.backends=[mlflow]",
                                            "track.mlflow_uri=http://127.0.0.1:9").track)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with pytest.raises(ConfigError, match="no W&B credentials"):
        track.check_environment(tiny_config(tmp_path, "track.backends=[wandb]", "track.wandb_mode=online").track)
