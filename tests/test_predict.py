"""``specialists predict RUN_DIR FILE ...``: good files answered, bad ones one line each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specialists.cli import main
from specialists.data import Preprocessing
from specialists.data.files import open_image
from specialists.inference.predict import read_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread


@pytest.fixture(scope="module")
def info(tiny_run) -> dict:
    return json.loads((Path(tiny_run.run_dir) / "data.json").read_text())


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_predict_answers_good_files_and_reports_the_bad_one(tiny_run, info, tmp_path, capsys):
    c, h, w = info["input_shape"]
    rng = np.random.default_rng(0)
    a = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (h, w, c), dtype=np.uint8)).save(a)
    b = tmp_path / "b.npy"
    np.save(b, rng.integers(0, 256, (2, h, w, c), dtype=np.uint8))  # a batch of two
    bad = tmp_path / "bad.txt"
    bad.write_text("not an image")
    rc = main(["predict", tiny_run.run_dir, str(a), str(bad), str(b), "--top-k", "3"])
    out, err = capsys.readouterr()
    assert rc == 2  # bad input, as everywhere
    errors = _errors(err)
    assert len(errors) == 1 and "bad.txt" in errors[0]
    assert "Traceback" not in err
    assert f"{a}:" in out and f"{b}[0]:" in out and f"{b}[1]:" in out
    names = info["class_names"]
    answers = [blk for blk in out.split(f"{tmp_path}/") if blk.strip()]
    assert len(answers) == 3
    for blk in answers:
        ranked = [line for line in blk.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
        assert len(ranked) == 3 and all(any(n in line for n in names) for line in ranked)
        probs = [float(line.rsplit(":", 1)[1]) for line in ranked]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert "specialist" in blk  # which specialists spoke (or that none did)


def test_predict_resizes_images_and_all_good_returns_0(tiny_run, info, tmp_path, capsys):
    c, h, w = info["input_shape"]
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((2 * h, 3 * w, 3), np.uint8)).save(big)  # RGB even for a 1-channel run
    rc = main(["predict", tiny_run.run_dir, str(big), "--model", "generalist"])
    out, err = capsys.readouterr()
    assert rc == 0 and not _errors(err)
    assert "resized" in out and f"{big}:" in out


def test_predict_wrong_shape_npy_and_missing_file(tiny_run, tmp_path, capsys):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 5)))
    rc = main(["predict", tiny_run.run_dir, str(wrong), str(tmp_path / "missing.png")])
    _, err = capsys.readouterr()
    assert rc == 2  # bad input, as everywhere
    errors = _errors(err)
    assert len(errors) == 2 and "wrong.npy" in errors[0] and "shape" in errors[0] and "missing.png" in errors[1]


def test_predict_bad_run_dir_is_one_line_and_status_2(tmp_path, capsys):
    f = tmp_path / "a.npy"
    np.save(f, np.zeros((8, 8, 3), np.uint8))
    rc = main(["predict", str(tmp_path / "no_run"), str(f)])
    _, err = capsys.readouterr()
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and "run directory" in err


def test_a_16_bit_png_reads_as_its_8_bit_twin_in_training_and_in_predict(tmp_path):
    """Training scaled a 16-bit grey by 255/65535 while predict clipped it at 255: the same
    image got another class from its 16-bit file. One decoding serves both now."""
    a8 = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    p8, p16 = tmp_path / "grey8.png", tmp_path / "grey16.png"
    Image.fromarray(a8).save(p8)
    Image.fromarray(a8.astype(np.uint16) * 257).save(p16)
    assert Image.open(p16).mode == "I;16"
    assert np.array_equal(np.asarray(open_image(p16, "L")), a8)  # how training decodes it
    for shape in ((1, 8, 8), (3, 8, 8)):
        x8, x16 = read_inputs(p8, shape)[0], read_inputs(p16, shape)[0]
        assert x16.shape == (1, 8, 8, shape[0]) and np.array_equal(x16, x8) and np.array_equal(x16[0, :, :, 0], a8)


def test_inputs_far_outside_the_training_range_are_answered_with_one_warning(tiny_run, info, tmp_path, capsys):
    c, h, w = info["input_shape"]
    rng = np.random.default_rng(0)
    good, far, far2 = tmp_path / "good.npy", tmp_path / "far.npy", tmp_path / "far2.npy"
    np.save(good, rng.integers(0, 256, (h, w, c)).astype(np.float32))
    np.save(far, rng.uniform(-50, 1000, (h, w, c)).astype(np.float32))
    np.save(far2, rng.uniform(-50, 1000, (2, h, w, c)).astype(np.float32))
    assert main(["predict", tiny_run.run_dir, str(good), "--model", "generalist"]) == 0
    out, err = capsys.readouterr()
    assert f"{good}:" in out and err == ""
    assert main(["predict", tiny_run.run_dir, str(far), str(far2), "--model", "generalist"]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "outside" in line or "range" in line]
    assert len(err.splitlines()) == len(warnings) == 1 and "0..255" in warnings[0] and "Traceback" not in err
    assert f"{far}:" in out and f"{far2}[1]:" in out  # still answered
    # vectors: far from the training mean, in training standard deviations
    vec = Preprocessing({"input_shape": [2], "scale": 1.0, "mean": [0.0, 10.0], "std": [1.0, 2.0]})
    assert vec.outside_range(vec.to_batch(np.array([[3.0, 30.0]]))) is None
    assert "standard deviations" in vec.outside_range(vec.to_batch(np.array([[3.0, 60.0]])))
