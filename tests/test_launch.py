"""Independent jobs fanned out: Ray tasks (``launch.executor=ray``) and Slurm-style ``--only``
processes sharing one run directory.

One Ray instance (2 CPUs) serves the module. Ray workers run one thread per job, so the local
references here train with one thread too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, error_line_within, tiny_config

from specialists.engine.executors import Job, run_jobs
from specialists.errors import SpecialistsError
from specialists.rundir import to_yaml
from specialists.stages.pipeline import run_stage
from specialists.stages.specialists import specialist_job

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _without_specialists(tiny_run, dst: Path, keep=()) -> Path:
    """The tiny run's generalist and subsets; of its specialists only those in ``keep``."""
    shutil.copytree(tiny_run.run_dir, dst, ignore=shutil.ignore_patterns("specialists", "*.lock", ".locks"))
    for sid in keep:
        shutil.copytree(Path(tiny_run.run_dir) / "specialists" / f"{sid:03d}", dst / "specialists" / f"{sid:03d}")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["stages"].pop("specialists", None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _metrics(run_dir: Path, sid: int) -> dict:
    m = json.loads((run_dir / "specialists" / f"{sid:03d}" / "metrics.json").read_text())
    m.pop("seconds")
    for h in m["history"]:
        h.pop("seconds")
    return m


def _close(a, b, tol=1e-6):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= tol
    return a == b


@pytest.fixture(scope="module")
def one_thread_reference(tiny_run, tmp_path_factory):
    """The specialists trained by the local executor with one thread (as each Ray task has)."""
    d = _without_specialists(tiny_run, tmp_path_factory.mktemp("local") / "run")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stage(tiny_config(d), "specialists")
    finally:
        torch.set_num_threads(before)
    return d


def test_ray_trains_every_specialist_as_the_local_executor_does(ray_cluster, tiny_run, one_thread_reference, tmp_path):
    d = _without_specialists(tiny_run, tmp_path / "run")
    result = run_stage(tiny_config(d, "launch.executor=ray"), "specialists")
    assert result["complete"] and result["trained"] == [0, 1, 2]
    for sid in range(3):
        assert _close(_metrics(d, sid), _metrics(one_thread_reference, sid)), sid
    assert json.loads((d / "manifest.json").read_text())["stages"]["specialists"]["status"] == "done"


def test_a_worker_opens_the_run_and_loads_the_generalist_once_for_all_its_jobs(tiny_run, tmp_path, monkeypatch):
    """What a Ray worker does with several tasks, in this process: the run's YAML text in, the
    same open run (its data loaded once) and the same generalist for every job; a generalist
    file that changed is loaded again."""
    from specialists.engine import executors
    from specialists.stages import specialists as stage

    d = _without_specialists(tiny_run, tmp_path / "run")
    cfg = tiny_config(d)
    opened, loads = [], []
    real_load = executors.Run.load_generalist

    class Counted(executors.Run):
        def __init__(self, *a, **k):
            opened.append(1)
            super().__init__(*a, **k)

        def load_generalist(self, *a, **k):
            loads.append(1)
            return real_load(self, *a, **k)

    monkeypatch.setattr(executors, "Run", Counted)
    monkeypatch.setattr(executors, "_WORKER_RUNS", {})
    monkeypatch.setattr(stage, "_WORKER_GENERALIST", {})
    text = to_yaml(cfg)
    subsets = json.loads((d / "subsets" / "subsets.json").read_text())["subsets"]
    for s in subsets[:2]:
        assert specialist_job(text, s["id"], s["classes"])
    assert len(opened) == 1 and len(loads) == 1
    assert executors.as_run(text) is executors.as_run(text)
    weights = d / "generalist" / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # a retrained generalist
    stage._generalist(executors.as_run(text))
    assert len(loads) == 2


def _ray_job_pids(name: str) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if any(name in c for c in (p.info["cmdline"] or []))]


def test_a_killed_task_is_retried_and_resumes_from_its_checkpoint(ray_cluster, tiny_run, tmp_path):
    d = _without_specialists(tiny_run, tmp_path / "run", keep=(1, 2))  # one job: specialist 000
    cfg = tiny_config(d, "launch.executor=ray", "specialists.epochs=4")
    state = d / "specialists" / "000" / "state.pt"
    writes, killed, error = [], [], []

    def watch():  # every new state.pt (one per finished epoch: each is a new file, renamed into place)
        while not killed or len(writes) < 4:
            try:
                st = state.stat()
            except FileNotFoundError:
                time.sleep(0.002)
                continue
            if not writes or writes[-1] != (st.st_ino, st.st_mtime_ns):
                writes.append((st.st_ino, st.st_mtime_ns))
            if len(writes) == 1 and not killed:  # epoch 1 is saved: kill the task's process
                pids = _ray_job_pids("ray::specialist")
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.append(pids)
            time.sleep(0.002)

    def train():
        try:
            run_stage(cfg, "specialists")
        except BaseException as exc:  # reported below
            error.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    trainer = threading.Thread(target=train)
    trainer.start()
    trainer.join(timeout=300)
    assert not error, error
    assert killed and killed[0], "no Ray worker was found to kill"
    # the retried task re-ran epochs 2..4 only: 4 checkpoints in all, not 1 + 4
    assert len(writes) == 4, writes
    history = json.loads((d / "specialists" / "000" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_a_missing_run_directory_on_a_worker_is_one_line(ray_cluster, tmp_path):
    cfg = tiny_config(tmp_path / "gone")
    launch = tiny_config(tmp_path / "x", "launch.executor=ray").launch
    with pytest.raises(SpecialistsError) as info:
        run_jobs([Job("specialist 000", specialist_job, (to_yaml(cfg), 0, [0, 1]))], launch)
    msg = str(info.value)
    assert "specialist 000" in msg and "on node" in msg and str(tmp_path / "gone") in msg and "\n" not in msg


def test_a_job_larger_than_every_node_is_refused_before_it_is_queued(ray_cluster, tmp_path):
    """``launch.gpus_per_job`` beyond any node's GPUs used to wait forever, Ray's autoscaler
    repeating that it cannot fulfil the request."""
    gpus = ray.cluster_resources().get("GPU", 0)
    launch = tiny_config(tmp_path, "launch.executor=ray", f"launch.gpus_per_job={gpus + 1}").launch
    msg = error_line_within(lambda: run_jobs([Job("specialist 000", specialist_job,
                                                  (to_yaml(tiny_config(tmp_path)), 0, [0]))], launch))
    assert msg is not None, "the job was queued, waiting for GPUs the cluster does not have"
    assert msg.startswith(f"launch.gpus_per_job={gpus + 1:g} but no node") and "GPUs" in msg and "\n" not in msg


def test_two_only_processes_share_one_run_directory(tiny_run, tmp_path):
    """The Slurm job-array recipe: one ``train-specialists --only ID`` process per specialist,
    started at once on one run directory."""
    d = _without_specialists(tiny_run, tmp_path / "run")
    argv = [sys.executable, "-m", "specialists.cli", "train-specialists", QUICKSTART, f"run_dir={d}", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*argv, "--only", only], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for only in ("0,2", "1")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    manifest = json.loads((d / "manifest.json").read_text())  # whole: valid JSON, every stage recorded
    assert manifest["stages"]["specialists"]["status"] == "done"
    assert {f"specialists/{i:03d}/model.safetensors" for i in range(3)} <= set(manifest["stages"]["specialists"]["artifacts"])
    both = "\n".join(outs)
    for i in range(3):
        assert both.count(f"specialist {i:03d}: subset test top-1") == 1, both
