"""Data-parallel training as torchrun runs it: 2 processes on the CPU (gloo), spawned here with
the environment torchrun would give them.

A linear model (no BatchNorm, whose statistics are per rank) on the tiny data, with crop
augmentation drawn for the whole global batch: the two ranks together must train exactly what
one process trains.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from specialists.rundir.io import load_state

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
ARGS = ["train-generalist", QUICKSTART, *TINY, "model.name=linear", "generalist.epochs=3", "generalist.lr=0.1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(argv: list[str]):
    """Two ranks of one torchrun job running ``specialists ARGV``; rank 1 with umask 077, so a
    file it wrote would show."""
    port, procs = _free_port(), []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        umask = "0o22" if rank == 0 else "0o77"
        procs.append(subprocess.Popen([sys.executable, "-c", f"import os, sys; os.umask({umask}); "
                                       "from specialists.cli import main; sys.exit(main(sys.argv[1:]))", *argv],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.fixture(scope="module")
def single(tmp_path_factory, one_thread) -> Path:
    """The reference: the same ``train-generalist`` in this (one-process, one-thread) process,
    the ``run_stage`` call the command makes (a fresh interpreter would only add its start-up)."""
    from specialists.rundir import load_config
    from specialists.stages.pipeline import run_stage

    d = tmp_path_factory.mktemp("single") / "run"
    run_stage(load_config(QUICKSTART, [*ARGS[2:], f"run_dir={d}"]), "generalist")
    return d


def test_two_ranks_train_what_one_process_trains_and_resume_after_a_kill(single, tmp_path):
    d = tmp_path / "ddp"
    procs = _ranks([*ARGS, f"run_dir={d}"])
    state = d / "generalist" / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.005)
    for p in procs:  # killed after its first epoch's checkpoint
        p.send_signal(signal.SIGKILL)
    outs = [p.communicate()[0] for p in procs]
    assert state.exists() and not (d / "generalist" / "model.safetensors").exists(), outs
    epoch = load_state(state)["epoch"]
    assert 1 <= epoch < 3

    procs = _ranks([*ARGS, f"run_dir={d}"])  # every rank resumes from the same state
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert f"resuming after epoch {epoch}/3" in outs[0]
    a, b = load_file(str(single / "generalist" / "model.safetensors")), load_file(str(d / "generalist" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    ha = json.loads((single / "generalist" / "metrics.json").read_text())["history"]
    hb = json.loads((d / "generalist" / "metrics.json").read_text())["history"]
    assert [h["test_top1"] for h in ha] == [h["test_top1"] for h in hb]
    assert [h["train_loss"] for h in ha] == pytest.approx([h["train_loss"] for h in hb], abs=1e-5)
    # rank 0 alone wrote: every file has rank 0's umask (rank 1's would make it 0600)
    files = [p for p in d.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), [
        (str(p), oct(p.stat().st_mode & 0o777)) for p in files if p.stat().st_mode & 0o777 != 0o644]


def test_every_stage_runs_under_torchrun(tmp_path):
    """``specialists run`` on 2 ranks: every stage (the ablation's re-clustering sub-run and the
    student's controls included) completes on both, and rank 0 alone writes."""
    d = tmp_path / "run"
    # generalist.epochs=2 (TINY's 8 would also be the student stage's second generalist's): the
    # test is about every stage completing on both ranks, not accuracy, and every step is an all-reduce
    procs = _ranks(["run", QUICKSTART, *TINY, f"run_dir={d}", "generalist.epochs=2", "ablate.counts=[2]",
                    "ablate.control=false", "student.epochs=1"])
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "| top-1 |" in outs[0] and "| top-1 |" not in outs[1]  # the summary, from rank 0 only
    stages = json.loads((d / "manifest.json").read_text())["stages"]
    assert {k: v["status"] for k, v in stages.items()} == dict.fromkeys(
        ("generalist", "subsets", "specialists", "evaluate", "ablate", "student"), "done")
    assert (d / "ablation" / "recluster" / "M002" / "evaluation" / "evaluation.json").exists()
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in d.rglob("*") if p.is_file())


# --------------------------------------------------------------------- a broken torchrun environment
# In this process, through the command line: the environment is read before any work.


def _one_line_error(cap, env: dict, monkeypatch, run_dir: Path, *extra: str) -> tuple[str, list[str]]:
    """``specialists train-generalist`` under ``env``: its one error line and its log lines."""
    from specialists.cli import main

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cap.readouterr()
    rc = main(["train-generalist", QUICKSTART, *TINY, f"run_dir={run_dir}", *extra])
    err = cap.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not torch.distributed.is_initialized()
    return lines[0], [line for line in err.splitlines() if line.startswith("[")]


@pytest.mark.parametrize("env,says", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a non-negative integer"),
                                      ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29500"},
                                       "WORLD_SIZE=2 but MASTER_ADDR is not set")])
def test_a_malformed_torchrun_environment_is_one_line(tmp_path, capsys, monkeypatch, env, says):
    line, _ = _one_line_error(capsys, env, monkeypatch, tmp_path / "run")
    assert says in line and "torchrun sets" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_come_says_so_once_and_gives_up_after_dist_timeout(tmp_path, capfd, monkeypatch,
                                                                                     rank):
    """``WORLD_SIZE=2`` with one process: rank 0 waits for a rank 1 that never joins, rank 1 for
    a rank 0 that never listens. ``launch.dist_timeout=0.03`` minutes: 1.8 seconds."""
    port = _free_port()
    env = {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.monotonic()
    line, logged = _one_line_error(capfd, env, monkeypatch, tmp_path / "run", "launch.dist_timeout=0.03")
    assert time.monotonic() - t0 < 10
    assert f"rank {rank} of 2: gave up waiting for the other ranks at 127.0.0.1:{port} after 0.03 min" in line
    assert "launch.dist_timeout" in line
    waiting = [s for s in logged if "waiting for the other ranks" in s]
    assert len(waiting) == 1 and f"rank {rank} of 2" in waiting[0], logged
    assert not (tmp_path / "run").exists()
