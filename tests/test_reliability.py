"""Trustworthy run directories: bad data refused before any work, damaged artifacts noticed
and rebuilt, damaged training state restarted from scratch, a stage state machine that never
dead-ends, one writer per stage, system errors in one line, reproducible and shareable files.

Each test reproduces one way a run directory used to go wrong and asserts what happens now.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, error_line_within, tiny_config
from safetensors.torch import load_file, save_file

from specialists.cli import main
from specialists.engine.executors import Job, run_jobs
from specialists.errors import ConfigError, SpecialistsError
from specialists.inference import SpecialistEnsemble
from specialists.rundir import Run, load_config
from specialists.rundir.io import STATE_MAGIC, clean_stale_temp_files, save_state, save_weights, write_json
from specialists.stages.pipeline import run_stage

# No one_thread for the module: artifacts rebuilt by the ``run_copy`` tests must match the session's
# tiny run, which was trained with the suite's default threads. Tests that train only what they
# compare with (or compare nothing trained) take ``one_thread_here``: on a shared 2-core machine a
# second spinning thread only adds CPU time.

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _cli_error(capsys, argv) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _npz(path: Path, x_train, y_train, x_test, y_test, **extra) -> Path:
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


def _vectors(n_classes=4, per_class=12, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    x = (rng.normal(size=(len(y), d)) + y[:, None]).astype(np.float32)
    return x, y


NPZ = ["model.name=mlp", "model.width=8", "generalist.epochs=1", "generalist.batch_size=16"]


def _npz_argv(verb, path, run_dir, *extra):
    return [verb, QUICKSTART, "data.name=npz", f"data.path={path}", f"run_dir={run_dir}", "device=cpu", *NPZ,
            "subsets.num_specialists=2", *extra]


# --------------------------------------------------------------------- bad data, before any work


def test_non_finite_vectors_are_refused_before_training(tmp_path, capsys):
    x, y = _vectors()
    x[3, 2] = np.nan
    path = _npz(tmp_path / "nan.npz", x, y, x[:8], y[:8])
    line = _cli_error(capsys, _npz_argv("train-generalist", path, tmp_path / "run"))
    assert "x_train" in line and "row 3" in line and "feature 2" in line and "nan" in line
    assert not (tmp_path / "run" / "generalist").exists() and not (tmp_path / "run" / "manifest.json").exists()


def test_a_stray_label_is_refused_and_remap_labels_renumbers(tmp_path, capsys):
    x, y = _vectors(n_classes=10, per_class=6)
    y = y.copy()
    y[5] = 29999  # one typo among labels 0..9, no class names
    path = _npz(tmp_path / "typo.npz", x, y, x[:20], np.arange(20) % 10)
    line = _cli_error(capsys, _npz_argv("run", path, tmp_path / "run"))
    assert "29999" in line and "data.remap_labels=true" in line
    assert not (tmp_path / "run" / "generalist").exists()
    # opting in renumbers the 11 distinct labels 0..10, the original ids becoming the names
    ds = Run(load_config(QUICKSTART, ["data.name=npz", f"data.path={path}", "data.remap_labels=true",
                                      "model.name=mlp", f"run_dir={tmp_path / 'r2'}"])).data
    assert ds.num_classes == 11 and ds.class_names == [str(i) for i in range(10)] + ["29999"]
    y_all = torch.cat([ds.train.y, ds.val.y])
    assert int((y_all == 10).sum()) == 1 and int(y_all.max()) == 10


@pytest.mark.parametrize("where", ["absent", "test_only"])
def test_a_class_without_training_examples_is_refused(tmp_path, capsys, where):
    x, y = _vectors(n_classes=8, per_class=8)
    keep = y != 7
    x_test, y_test = x[:16], y[:16]
    if where == "test_only":
        x_test, y_test = np.concatenate([x_test, x[y == 7][:3]]), np.concatenate([y_test, [7, 7, 7]])
    names = np.array([f"c{i}" for i in range(8)])
    path = _npz(tmp_path / "gap.npz", x[keep], y[keep], x_test, y_test, class_names=names)
    line = _cli_error(capsys, _npz_argv("train-generalist", path, tmp_path / "run"))
    assert "class 7 (c7) has no training examples" in line
    assert ("only 3 test examples" in line) == (where == "test_only")
    assert not (tmp_path / "run" / "generalist").exists()


def test_class_count_checks_fire_before_the_generalist_trains(tmp_path, capsys):
    x, y = _vectors(n_classes=3)
    path = _npz(tmp_path / "three.npz", x, y, x[:6], y[:6])
    line = _cli_error(capsys, _npz_argv("train-generalist", path, tmp_path / "run", "subsets.num_specialists=5"))
    assert "subsets.num_specialists" in line and "3 classes" in line
    line = _cli_error(capsys, _npz_argv("run", path, tmp_path / "run", "subsets.mode=nearest",
                                        "subsets.classes_per_specialist=4"))
    assert "subsets.classes_per_specialist" in line
    one = _npz(tmp_path / "one.npz", x, np.zeros_like(y), x[:6], np.zeros(6, np.int64))
    line = _cli_error(capsys, _npz_argv("train-generalist", one, tmp_path / "run", "subsets.num_specialists=1"))
    assert "only one class" in line
    assert not (tmp_path / "run" / "generalist").exists()


def test_a_class_emptied_by_the_validation_split_keeps_its_only_row(tmp_path):
    """A class with one training row and data.val_fraction=0.6 used to end with no training row:
    the empty-class check ran before the split, which took the row to validation."""
    x, y = _vectors(n_classes=3, per_class=6)
    x, y = np.concatenate([x, x[:1] + 5]), np.concatenate([y, [3]])  # class 3: one row
    path = _npz(tmp_path / "one_row.npz", x, y, x[:8], np.arange(8) % 4)
    ds = Run(load_config(QUICKSTART, ["data.name=npz", f"data.path={path}", "data.val_fraction=0.6",
                                      "model.name=mlp", "subsets.num_specialists=2", f"run_dir={tmp_path / 'run'}"])).data
    assert int((ds.train.y == 3).sum()) == 1 and int((ds.val.y == 3).sum()) == 0
    assert int((ds.val.y == 0).sum()) == 4  # the other classes still give round(0.6 * 6) rows each


@pytest.mark.parametrize("case", ["null coarse label", "tokenizer without unknown token", "classes.txt not UTF-8"])
def test_bad_text_files_are_one_line(tmp_path, capsys, case):
    """A null coarse label used to invent a coarse class 'None'; a tokenizer without an unknown
    token, and a classes.txt in Latin-1, gave tracebacks."""
    rows = [{"text": f"word{i % 3} and more", "label": f"c{i % 3}", "group": "g"} for i in range(12)]
    extra = ["data.coarse_field=group"]
    if case == "null coarse label":
        rows[4]["group"] = None
        words = ["line 5", "coarse label ('group')", "None"]
    elif case == "tokenizer without unknown token":
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({"[PAD]": 0, "and": 1, "more": 2, "word0": 3, "word1": 4, "word2": 5}))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(tmp_path / "tokenizer.json"))
        extra = [f"data.tokenizer={tmp_path / 'tokenizer.json'}"]
        words = ["tokenizer.json", "outside its vocabulary", "unknown token"]
    else:
        (tmp_path / "classes.txt").write_bytes("c0\nc1\nc2 caf\xe9\n".encode("latin-1"))
        words = ["classes.txt", "UTF-8"]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = _cli_error(capsys, ["train-generalist", QUICKSTART, "data.name=text", f"data.path={tmp_path / 'all.jsonl'}",
                               "model.name=textcnn", f"run_dir={tmp_path / 'run'}", "device=cpu", *extra])
    assert all(w in line for w in words), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model,words", [
    ("cnn", "model 'cnn' needs image inputs"),
    ("resnet8", "model 'resnet8' needs image inputs"),
    ("python:user_code:raises", "raised RuntimeError when built for 4 classes and inputs (6,) (no GPU here)"),
    ("python:user_code:wrong_input", "does not fit the data's vectors of shape (6,) (mat1 and mat2"),
    ("python:broken_user_code:net", "SyntaxError"),
])
def test_a_model_that_cannot_take_the_data_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, model, words):
    """Used to be tracebacks: a built-in image model on vectors (a plain ValueError), a factory
    that raises, a module with a syntax error, and a first layer of another size (only once
    training began). Every model is now built once on a dummy input of the data's shape."""
    (tmp_path / "broken_user_code.py").write_text("def net(num_classes, input_shape:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y = _vectors()
    path = _npz(tmp_path / "v.npz", x, y, x[:8], y[:8])
    line = _cli_error(capsys, _npz_argv("train-generalist", path, tmp_path / "run", f"model.name={model}"))
    assert "'model.name'" in line and model in line and words in line, line
    assert not (tmp_path / "run").exists()
    line = _cli_error(capsys, _npz_argv("train-generalist", path, tmp_path / "run", "student.model.name=cnn"))
    assert "'student.model.name'" in line and "model 'cnn' needs image inputs" in line, line


@pytest.mark.parametrize("override", ["distill.temperature=inf", "distill.temperature=nan", "generalist.lr=inf",
                                      "combine.tol=nan"])
def test_non_finite_config_values_are_refused(override):
    with pytest.raises(ConfigError, match=f"'{override.split('=')[0]}'.*finite"):
        load_config(QUICKSTART, [override])


@pytest.mark.parametrize("override", ["seed=-1", f"seed={2**32}", f"seed={2**70}", "data.split_seed=-5",
                                      "ablate.seed=-3", "distill.temperature=1e30", "generalist.lr=1e9",
                                      "combine.tol=2", "data.difficulty=1e30"])
def test_config_values_out_of_range_are_refused_before_any_work(tmp_path, capsys, override):
    """Seeds used to reach torch, numpy or faiss (a traceback, some after earlier stages
    finished), and an absurd temperature to train a NaN student that exited 0."""
    x, y = _vectors()
    path = _npz(tmp_path / "v.npz", x, y, x[:8], y[:8])
    line = _cli_error(capsys, _npz_argv("run", path, tmp_path / "run", override))
    assert f"config key '{override.split('=')[0]}'" in line and " is not " in line
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_runs(tmp_path, one_thread_here):
    """The range is what every library takes: faiss's C int seed gets it reduced."""
    from specialists.core.kmeans import kmeans

    x, y = _vectors()
    path = _npz(tmp_path / "v.npz", x, y, x[:8], y[:8])
    top = 2**32 - 1
    cfg = load_config(QUICKSTART, _npz_argv("x", path, tmp_path / "run", f"seed={top}", f"data.split_seed={top}")[2:])
    assert len(Run(cfg).data.val) > 0  # the split, seeded by data.split_seed
    kmeans(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), 2, seed=cfg.seed)  # faiss: a C int


# --------------------------------------------------------------------- documented options


def test_the_student_starts_from_student_model_pretrained(tmp_path, one_thread_here):
    """``student.model.pretrained`` was checked for existence and never loaded (the student
    started from its seeded initialization); other files are refused in one line naming the key."""
    from specialists.stages.student import new_student

    run = Run(tiny_config(tmp_path / "run"))
    donor = new_student(run, seed=5)
    save_weights(tmp_path / "donor.safetensors", donor)
    cfg = tiny_config(tmp_path / "run", f"student.model.pretrained={tmp_path / 'donor.safetensors'}")
    student = new_student(Run(cfg), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), donor.state_dict().values()))
    # refused: a pickle payload under a .safetensors name, another shape, another suffix
    torch.save(donor.state_dict(), tmp_path / "pickle.safetensors")
    wide = tiny_config(tmp_path / "run", "student.model.width=16")
    save_weights(tmp_path / "wide.safetensors", new_student(Run(wide), seed=0))
    for name, why in (("pickle.safetensors", "not a readable weights file"), ("wide.safetensors", "does not fit")):
        cfg = tiny_config(tmp_path / "run", f"student.model.pretrained={tmp_path / name}")
        with pytest.raises(SpecialistsError) as exc:
            new_student(Run(cfg), seed=0)
        msg = str(exc.value)
        assert msg.startswith(f"student.model.pretrained {tmp_path / name}: ") and why in msg and "\n" not in msg
    torch.save(donor.state_dict(), tmp_path / "donor.pt")
    with pytest.raises(ConfigError, match="'student.model.pretrained'.*donor.pt.*safetensors"):
        tiny_config(tmp_path / "run", f"student.model.pretrained={tmp_path / 'donor.pt'}")


# --------------------------------------------------------------------- non-finite results


def test_non_finite_weights_never_make_a_finished_generalist(tmp_path, capsys, one_thread_here):
    """All-NaN weights as generalist.init with epochs=0 (or as model.pretrained) used to be
    recorded as a finished generalist; find-subsets then failed in faiss."""
    x, y = _vectors()
    path = _npz(tmp_path / "v.npz", x, y, x[:8], y[:8])
    assert main(_npz_argv("train-generalist", path, tmp_path / "good")) == 0
    state = load_file(str(tmp_path / "good" / "generalist" / "model.safetensors"))
    nan = tmp_path / "nan.safetensors"
    save_file({k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}, str(nan))
    for key in ("generalist.init", "model.pretrained"):
        run_dir = tmp_path / key
        line = _cli_error(capsys, _npz_argv("train-generalist", path, run_dir, f"{key}={nan}", "generalist.epochs=0"))
        assert key in line and "nan.safetensors" in line and "NaN or infinity" in line
        assert not Run(load_config(QUICKSTART, _npz_argv("x", path, run_dir)[2:])).manifest.is_done("generalist")


def test_huge_but_finite_inputs_train_a_finite_generalist(tmp_path, one_thread_here):
    """Features around 3e37 overflowed the float32 variance of the normalization: NaN inputs,
    a NaN loss, and a generalist recorded as finished."""
    x, y = _vectors()
    path = _npz(tmp_path / "big.npz", x * 3e37, y, x[:8] * 3e37, y[:8])
    assert main(_npz_argv("train-generalist", path, tmp_path / "run")) == 0
    metrics = json.loads((tmp_path / "run" / "generalist" / "metrics.json").read_text())
    assert np.isfinite(metrics["test_nll"]) and np.isfinite(metrics["history"][0]["train_loss"])


def test_a_non_finite_loss_or_model_is_never_recorded_as_done(tmp_path, one_thread_here):
    """The shared checks every stage goes through: the training loop stops on a non-finite loss
    before checkpointing the epoch, and a model holding NaN is never saved (the completion step)."""
    from types import SimpleNamespace

    from specialists.engine.fit import fit, predict_logits

    model = torch.nn.Linear(3, 2)
    tcfg = SimpleNamespace(epochs=2, optimizer="sgd", lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                           schedule="constant", warmup_epochs=0.0)
    batches = lambda epoch: [(torch.ones(4, 3), torch.zeros(4, dtype=torch.long), None)]  # noqa: E731
    step = lambda m, epoch, i, b: (m(b[0]).sum() * float("nan"), {})  # noqa: E731
    state = tmp_path / "state.pt"
    with pytest.raises(SpecialistsError, match=r"^student: the training loss became nan in epoch 1 "):
        fit(model, tcfg, device=torch.device("cpu"), state_path=state, batches=batches, steps_per_epoch=1,
            step=step, desc="student")
    assert not state.exists()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    batcher = SimpleNamespace(iterate=lambda bs: [(torch.ones(5, 3), None)], device=torch.device("cpu"))
    with pytest.raises(SpecialistsError, match="outputs are NaN or infinity on 5 of 5 examples"):
        predict_logits(model, batcher)  # what every stage's metrics and find-subsets read
    run = Run(tiny_config(tmp_path / "run"))
    with pytest.raises(SpecialistsError, match="model.safetensors: not saved, its tensor 'weight' holds NaN"):
        run.save_model(tmp_path / "run" / "model.safetensors", model)
    assert not (tmp_path / "run" / "model.safetensors").exists()


# --------------------------------------------------------------------- damaged artifacts


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny run (generalist, subsets, 3 specialists) and its config."""
    d = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, d, ignore=shutil.ignore_patterns("*.lock", ".locks"))
    return d, tiny_config(d)


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def _flip_bias_exponent(path: Path) -> None:
    """Flip one exponent bit of the last float of the head's bias, in place."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    start, end = header["head.bias"]["data_offsets"]
    data[8 + n + end - 1] ^= 0x20  # the high byte of the last float32: an exponent bit
    path.write_bytes(bytes(data))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_truncated_generalist_is_noticed_and_rebuilt(run_copy, caplog):
    d, cfg = run_copy
    weights = d / "generalist" / "model.safetensors"
    original = _bytes(weights)
    weights.write_bytes(original[: len(original) // 2])
    with caplog.at_level(logging.WARNING, logger="specialists"):
        run_stage(cfg, "generalist")
    warned = [w for w in _warnings(caplog) if "generalist/model.safetensors" in w]
    assert len(warned) == 1 and "changed" in warned[0]
    assert _bytes(weights) == original  # rebuilt from its final training state, bit for bit
    # what depended on it was reopened: later stages are no longer recorded, their folders gone
    manifest = json.loads((d / "manifest.json").read_text())["stages"]
    assert set(manifest) == {"generalist"} and not (d / "specialists").exists()


def test_a_deleted_specialist_is_retrained_alone(run_copy, caplog):
    d, cfg = run_copy
    before = {i: _bytes(d / "specialists" / f"{i:03d}" / "model.safetensors") for i in range(3)}
    stamps = {i: (d / "specialists" / f"{i:03d}" / "metrics.json").stat().st_mtime_ns for i in (0, 1)}
    shutil.rmtree(d / "specialists" / "002")
    with caplog.at_level(logging.INFO, logger="specialists"):
        run_stage(cfg, "specialists")
    assert any("specialists/002/" in w and "missing" in w for w in _warnings(caplog))
    assert {i: (d / "specialists" / f"{i:03d}" / "metrics.json").stat().st_mtime_ns for i in (0, 1)} == stamps
    assert {i: _bytes(d / "specialists" / f"{i:03d}" / "model.safetensors") for i in range(3)} == before
    assert json.loads((d / "manifest.json").read_text())["stages"]["specialists"]["status"] == "done"


def test_a_flipped_bit_is_refused_by_inference_and_rebuilt_by_the_pipeline(run_copy, tmp_path, capsys):
    d, cfg = run_copy
    path = d / "specialists" / "001" / "model.safetensors"
    original = _bytes(path)
    x = Run(cfg).data.test.x
    q = SpecialistEnsemble.from_run(d, device="cpu").predict_proba(x)
    _flip_bias_exponent(path)
    with pytest.raises(SpecialistsError) as info:
        SpecialistEnsemble.from_run(d, device="cpu")
    msg = str(info.value)
    assert "specialists/001/model.safetensors" in msg and "sha256" in msg and "\n" not in msg
    # unchecked, the damaged weights load and change the answers (the check is what catches it)
    assert not torch.equal(SpecialistEnsemble.from_run(d, device="cpu", verify=False).predict_proba(x), q)
    npy = tmp_path / "x.npy"
    np.save(npy, x[:2].permute(0, 2, 3, 1).numpy())
    line = _cli_error(capsys, ["predict", str(d), str(npy)])
    assert "specialists/001/model.safetensors" in line
    run_stage(cfg, "specialists")
    assert _bytes(path) == original
    assert torch.equal(SpecialistEnsemble.from_run(d, device="cpu").predict_proba(x), q)


def test_a_deleted_subsets_json_reopens_find_subsets(run_copy, caplog, capsys):
    d, cfg = run_copy
    original = _bytes(d / "subsets" / "subsets.json")
    (d / "subsets" / "subsets.json").unlink()
    # evaluate reads subsets.json: it says which file is gone, and what to run
    with caplog.at_level(logging.WARNING, logger="specialists"):
        with pytest.raises(SpecialistsError, match="specialists run CONFIG"):
            run_stage(cfg, "evaluate")
    assert any("subsets/subsets.json is missing" in w for w in _warnings(caplog))
    run_stage(cfg, "subsets")  # no longer "already complete"
    assert _bytes(d / "subsets" / "subsets.json") == original


# --------------------------------------------------------------------- damaged training state


@pytest.fixture(scope="module")
def short_generalist(tmp_path_factory):
    """A 2-epoch generalist trained with one thread, as the tests that retrain it (``one_thread_here``)."""
    d = tmp_path_factory.mktemp("short") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stage(tiny_config(d, "generalist.epochs=2"), "generalist")
    finally:
        torch.set_num_threads(before)
    return d


def _corrupt_state(kind: str, good: Path, bad: Path) -> None:
    if kind == "flipped byte":
        data = bytearray(good.read_bytes())
        data[len(data) // 2] ^= 0x01
        bad.write_bytes(bytes(data))
        return
    state = torch.load(io.BytesIO(good.read_bytes()[len(STATE_MAGIC) + 32:]), weights_only=True)
    if kind == "wrong shapes":
        state["model"] = {k: torch.zeros(3) if v.ndim else v for k, v in state["model"].items()}
    else:  # a missing key
        del state["scheduler"]
    save_state(bad, state)  # a valid checksum: the content is what is wrong


@pytest.mark.parametrize("kind", ["flipped byte", "wrong shapes", "missing key"])
def test_a_damaged_state_restarts_that_model_from_scratch(short_generalist, tmp_path, caplog, kind,
                                                          one_thread_here):
    d = tmp_path / "run"
    (d / "generalist").mkdir(parents=True)
    _corrupt_state(kind, short_generalist / "generalist" / "state.pt", d / "generalist" / "state.pt")
    with caplog.at_level(logging.WARNING, logger="specialists"):
        run_stage(tiny_config(d, "generalist.epochs=2"), "generalist")
    warned = [w for w in _warnings(caplog) if "state.pt" in w]
    assert len(warned) == 1 and "from scratch" in warned[0] and "\n" not in warned[0]
    assert _bytes(d / "generalist" / "model.safetensors") == _bytes(short_generalist / "generalist" / "model.safetensors")


# --------------------------------------------------------------------- the state machine


def test_a_failed_attempt_never_blocks_the_corrected_rerun(tmp_path, capsys, one_thread_here):
    x, y = _vectors()
    good = _npz(tmp_path / "good.npz", x, y, x[:8], y[:8])
    wrong = tmp_path / "wrong.npz"
    wrong.write_text("not an npz")
    run_dir = tmp_path / "run"
    line = _cli_error(capsys, _npz_argv("train-generalist", wrong, run_dir))
    assert "wrong.npz" in line
    assert main(_npz_argv("train-generalist", good, run_dir)) == 0  # not "was run with data.path=..."
    # an attempt killed with other inputs (here: its record and its state) is discarded
    cfg = load_config(QUICKSTART, _npz_argv("x", good, run_dir)[2:] + ["generalist.epochs=2"])
    stale = json.loads((run_dir / "manifest.json").read_text())
    stale["stages"]["generalist"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(stale))
    (run_dir / "generalist" / "model.safetensors").unlink()
    capsys.readouterr()
    run_stage(cfg, "generalist")  # (logs go to the CLI's handler, set up by main above)
    err = capsys.readouterr().err
    assert "discarding an unfinished attempt made with generalist.epochs=1" in err
    assert "resuming" not in err  # not from the other config's state
    metrics = json.loads((run_dir / "generalist" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and metrics["epochs"] == 2


def test_resumed_stage_records_the_time_of_every_attempt(short_generalist, tmp_path, one_thread_here):
    d = tmp_path / "run"
    shutil.copytree(short_generalist, d)
    manifest = json.loads((d / "manifest.json").read_text())
    rec = manifest["stages"]["generalist"]
    # pretend a first attempt started 100 s ago and was killed 60 s later, after its last write
    now = rec["finished"]
    rec.update(status="running", attempts=[{"started": now - 100}])
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "generalist" / "model.safetensors").unlink()
    for p in (d / "generalist").iterdir():
        os.utime(p, (now - 40, now - 40))
    run_stage(tiny_config(d, "generalist.epochs=2"), "generalist")
    rec = json.loads((d / "manifest.json").read_text())["stages"]["generalist"]
    assert len(rec["attempts"]) == 2 and rec["attempts"][0]["seconds"] == pytest.approx(60, abs=0.05)
    assert rec["seconds"] == pytest.approx(60 + rec["attempts"][1]["seconds"], abs=0.05)


def test_two_runs_at_once_do_each_stage_once(tmp_path):
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "specialists.cli", "run", QUICKSTART, f"run_dir={run_dir}", *TINY,
            "generalist.epochs=12", "student.enabled=false", "ablate.control=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    both = "\n".join(outs)
    assert both.count("generalist epoch 1/12") == 1, both
    for i in range(3):
        assert both.count(f"specialist {i:03d}: subset test top-1") == 1, both
    assert both.count("stage evaluate: starting") == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {k: v["status"] for k, v in manifest.items()} == {k: "done" for k in ("generalist", "subsets",
                                                                                   "specialists", "evaluate",
                                                                                   "ablate")}


# --------------------------------------------------------------------- system errors, one line


@pytest.mark.parametrize("errno_name", ["EROFS", "ENOSPC"])
def test_an_unwritable_run_directory_is_one_line_and_leaves_nothing_behind(run_copy, capsys, monkeypatch, errno_name,
                                                                            one_thread_here):
    import errno

    d, cfg = run_copy
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    real = os.fsync

    def failing_fsync(fd):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    line = _cli_error(capsys, ["evaluate", QUICKSTART, f"run_dir={d}", *TINY])
    monkeypatch.setattr(os, "fsync", real)
    assert "cannot write" in line and os.strerror(getattr(errno, errno_name)) in line
    assert not list(d.rglob("*.tmp"))
    assert all(p.read_bytes() == b for p, b in before.items() if p.name not in ("manifest.json", "config.yaml"))


def test_an_unusable_run_dir_path_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    line = _cli_error(capsys, ["train-generalist", QUICKSTART, f"run_dir={blocker / 'run'}", *TINY])
    assert str(blocker) in line


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG file that declares width x height pixels (and holds almost nothing)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_predict_refuses_a_huge_image_and_a_malformed_run_config(tiny_run, tmp_path, capsys, one_thread_here):
    huge = tmp_path / "huge.png"
    _png_header(huge, 14000, 14000)
    good = tmp_path / "good.npy"
    c, h, w = json.loads((Path(tiny_run.run_dir) / "data.json").read_text())["input_shape"]
    np.save(good, np.zeros((h, w, c), np.uint8))
    capsys.readouterr()
    rc = main(["predict", tiny_run.run_dir, str(huge), str(good), "--model", "generalist"])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "huge.png" in errors[0] and "too large" in errors[0]
    assert f"{good}:" in out  # the file after it is still answered
    d = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, d)
    (d / "config.yaml").write_text("seed: [unclosed\n")
    line = _cli_error(capsys, ["predict", str(d), str(good)])
    assert "config.yaml" in line and "not a valid run config" in line


# --------------------------------------------------------------------- reproducible, shareable files


def test_weights_are_byte_identical(tiny_run, tmp_path):
    from safetensors.torch import save

    tensors = load_file(str(Path(tiny_run.run_dir) / "specialists" / "000" / "model.safetensors"))
    meta = {"z": 1, "classes": [0, 1], "a": "x", "model": {"b": 2, "a": 1}}
    # the library alone writes its metadata map in a different order from one save to the next
    assert len({save(tensors, metadata={k: str(v) for k, v in meta.items()}) for _ in range(8)}) > 1
    model = torch.nn.Module()
    for k, v in tensors.items():
        model.register_buffer(k.replace(".", "_"), v)
    outs = [tmp_path / f"{i}.safetensors" for i in range(8)]
    for out in outs:
        save_weights(out, model, meta)
    assert len({out.read_bytes() for out in outs}) == 1
    assert {k: v.tolist() for k, v in load_file(str(outs[0])).items()} == {
        k.replace(".", "_"): v.tolist() for k, v in tensors.items()}


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o077)
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_stale_temp_files_of_dead_writers_are_removed(run_copy, one_thread_here):
    from specialists.rundir.io import _writer_tag

    d, cfg = run_copy
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = _writer_tag().rsplit("-", 1)[0]
    stale = d / "subsets" / f".subsets.json.{host}-{dead}.abc123.tmp"
    live = d / "subsets" / f".subsets.json.{_writer_tag()}.def456.tmp"
    other = d / "subsets" / f".subsets.json.otherhost-{dead}.ghi789.tmp"
    for p in (stale, live, other):
        p.write_text("half a file")
    assert clean_stale_temp_files(d) == [stale]
    assert live.exists() and other.exists() and not stale.exists()
    stale.write_text("half a file")
    run_stage(cfg, "subsets")  # complete already: still cleans nothing it should not, and nothing blocks
    run_stage(cfg, "evaluate")  # a stage that runs removes what dead writers left
    assert not stale.exists() and live.exists()


# --------------------------------------------------------------------- scale-out and run-directory details


def test_an_unreachable_ray_address_is_one_line_at_once(tmp_path):
    """``ray.init`` retried an address nothing answers at for minutes, deaf to Ctrl-C."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = tiny_config(tmp_path, "launch.executor=ray", f"launch.address=127.0.0.1:{port}").launch
    msg = error_line_within(lambda: run_jobs([Job("job", print)], launch))
    assert msg is not None, "still trying to join the cluster"
    assert msg.startswith(f"launch.address='127.0.0.1:{port}': no Ray cluster answers") and "\n" not in msg
    assert not ray.is_initialized()


def test_only_with_an_unknown_id_is_refused_before_the_attempt_is_recorded(run_copy, capsys):
    d, _ = run_copy
    before = (d / "manifest.json").read_bytes()
    line = _cli_error(capsys, ["train-specialists", QUICKSTART, f"run_dir={d}", *TINY, "--only", "99"])
    assert "--only names specialist(s) [99]" in line
    assert (d / "manifest.json").read_bytes() == before  # no attempt recorded


def test_a_truncated_manifest_is_one_line_that_says_how_to_recover(run_copy, capsys, caplog):
    d, cfg = run_copy
    manifest = d / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])
    line = _cli_error(capsys, ["train-specialists", QUICKSTART, f"run_dir={d}", *TINY])
    assert str(manifest) in line and "not valid JSON" in line and "remove it" in line
    weights = d / "generalist" / "model.safetensors"
    original = _bytes(weights)
    manifest.unlink()  # the recovery the line names: the trained model is reused, not retrained
    with caplog.at_level(logging.INFO, logger="specialists"):
        run_stage(cfg, "generalist")
    assert not any("epoch" in r.getMessage() and "train_loss" in r.getMessage() for r in caplog.records)
    assert _bytes(weights) == original
    assert json.loads(manifest.read_text())["stages"]["generalist"]["status"] == "done"


# --------------------------------------------------------------------- killed at random points


def test_killed_at_random_points_across_the_stages_a_run_ends_bit_identical(tmp_path):
    """``benchmarks/crash_resume.py`` on the tiny run: an uninterrupted run, then the same run
    SIGKILLed in two stages (at seeded random moments, one in the training stages, one in the
    evaluation's or later) and resumed each time. ``make crash-test`` kills it 24 times."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "crash_resume.py"), "--kills", "2",
                           "--keep", str(tmp_path), *TINY, "student.controls=false", "ablate.control=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["identical"] and summary["kills"] == 2 and len(summary["per_stage"]) == 2, summary
    # the comparison is not vacuous: it sees a one-bit change in any model
    import importlib.util

    spec = importlib.util.spec_from_file_location("crash_resume", REPO / "benchmarks" / "crash_resume.py")
    crash_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crash_resume)
    _flip_bias_exponent(tmp_path / "killed" / "student" / "model.safetensors")
    assert crash_resume.compare(tmp_path / "uninterrupted", tmp_path / "killed") == [
        "student/model.safetensors: differs"]
