"""``specialists export`` of a text run, served from strings by the torch-free ONNX runtime.

One tiny text run: a TextCNN generalist whose specialists share its trunk (``specialists.branch=1``:
the trunk is the embedding, whose output is a pair (embeddings, lengths), and TextCNN pads rows
narrower than its widest window inside the model), and a transformer student. Each export is done
once through the command line. Every check compares with an independent reference: the run's own
PyTorch ``SpecialistEnsemble`` / ``Student`` on the same strings, the training batcher's ids, the
run's ``tokenizer.json`` hashed here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from specialists.cli import main
from specialists.data import PAD_ID, TEXT_LAYOUT, batcher_for
from specialists.errors import SpecialistsError
from specialists.inference import SpecialistEnsemble, Student
from specialists.inference.onnx_runtime import TEXT_LAYOUT as RUNTIME_TEXT_LAYOUT
from specialists.inference.onnx_runtime import OnnxEnsemble, OnnxModel
from specialists.rundir import Run
from specialists.rundir.config import load_config

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4
MAX_LENGTH = 16
TEXTCNN_WIDEST = 5  # TextCNN's windows are 3, 4 and 5 tokens wide
TEXT = [
    "device=cpu", "seed=0", "data.name=synthetic_text", "data.num_super=3", "data.classes_per_super=2",
    "data.train_per_class=20", "data.test_per_class=6", "data.vocab_size=300", f"data.max_length={MAX_LENGTH}",
    "model.name=textcnn", "model.width=8", "generalist.epochs=3", "generalist.batch_size=16",
    "generalist.optimizer=adamw", "generalist.lr=0.01", "subsets.num_specialists=2", "specialists.branch=1",
    "specialists.epochs=1", "specialists.batch_size=16", "specialists.optimizer=adamw", "combine.top_n=2",
    "student.model.name=transformer", "student.model.width=8", "student.model.depth=1", "student.epochs=1",
    "student.batch_size=16", "student.optimizer=adamw", "student.controls=false",
]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds synchronization


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, one_thread) -> Path:
    """The generalist, 2 specialists on its shared trunk, and the student (read-only)."""
    from specialists.stages import student as student_mod
    from specialists.stages.pipeline import run_stage

    cfg = load_config(None, [f"run_dir={tmp_path_factory.mktemp('text_export') / 'run'}", *TEXT])
    for stage in ("generalist", "subsets", "specialists"):
        run_stage(cfg, stage)
    run = Run(cfg)
    run.save_config()  # Student.from_run reads the student's model from it
    student_mod.distill(run)
    return Path(cfg.run_dir)


def _export_once(folder: Path, *argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", *map(str, argv), "--out", str(folder)]) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def ensemble_export(text_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text_ensemble_export")
    _export_once(folder, text_run, "--model", "ensemble")
    return folder


@pytest.fixture(scope="module")
def student_export(text_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text_student_export")
    _export_once(folder, text_run)
    return folder


def _texts(run_dir: Path) -> list[str]:
    """The run's test texts and texts of every length: one word, a few, far past max_length, none."""
    texts = list(Run.open(run_dir, "cpu").data.test.text)
    words = " ".join(texts).split()
    return texts + [words[0], " ".join(words[:3]), " ".join(words[:4 * MAX_LENGTH]), ""]


def test_text_ensemble_export_serves_strings_as_pytorch(text_run, ensemble_export):
    folder = ensemble_export
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["ensemble.json", "generalist.onnx", "specialist_000.onnx", "specialist_001.onnx",
                     "tokenizer.json", "trunk.onnx"]
    assert (folder / "tokenizer.json").read_bytes() == (text_run / "tokenizer.json").read_bytes()
    meta = json.loads((folder / "ensemble.json").read_text())
    pre = meta["preprocessing"]
    assert meta["format_version"] == 3 and meta["input"] == {"name": "input", "shape": [None, None], "dtype": "int64"}
    assert pre["tokenizer"] == {"file": "tokenizer.json",
                                "sha256": hashlib.sha256((text_run / "tokenizer.json").read_bytes()).hexdigest()}
    assert (pre["layout"], pre["max_length"], pre["pad_id"], pre["padding"], pre["width"], pre["min_width"]) == \
        (TEXT_LAYOUT, MAX_LENGTH, PAD_ID, "right", "longest", TEXTCNN_WIDEST)
    assert RUNTIME_TEXT_LAYOUT == TEXT_LAYOUT
    # the shared trunk's pair of outputs, fed to every part by position
    assert meta["trunk"]["output"] == ["features", "features_1"]
    assert all(e["input"] == ["input", "input_1"] for e in [meta["generalist"], *meta["specialists"]])
    verified = meta["verification"]["max_abs_diff"]
    assert set(verified) == {n for n in names if n.endswith(".onnx")} | {"ensemble"}
    assert all(d <= TOL for d in verified.values())

    texts = _texts(text_run)
    served = OnnxEnsemble(folder, threads=1)
    ens = SpecialistEnsemble.from_run(text_run, device="cpu")
    want = ens.predict_proba(texts).numpy()
    got = served.predict_proba(texts)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(texts), 6)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    for text in texts[-4:]:  # each length alone: a batch as wide as its one text (at least TextCNN's window)
        np.testing.assert_allclose(served.predict_proba(text), ens.predict_proba([text]).numpy(), atol=TOL, rtol=0)
    _, _, active = served.components(served.preprocess(texts))
    assert {1, 2} <= set(active.sum(1).tolist())  # rows with one and with two specialists (EM in numpy)

    # the ids are the training batcher's: the same tokens, padded on the right to the batch's longest row
    run = Run.open(text_run, "cpu")
    test = run.data.test
    ids = batcher_for(run.data, test, "cpu").batch(torch.arange(len(test)))[0].numpy()
    assert ids.shape[1] >= TEXTCNN_WIDEST
    np.testing.assert_array_equal(served.preprocess(list(test.text)), ids)
    # shorter batches: the training encoder's ids, padded up to TextCNN's widest window
    for batch in [texts[-4:], *([t] for t in texts[-4:])]:
        want = run.data.encoder.encode(batch)
        want = np.pad(want, ((0, 0), (0, max(0, TEXTCNN_WIDEST - want.shape[1]))), constant_values=PAD_ID)
        np.testing.assert_array_equal(served.preprocess(batch), want)
    both = served.preprocess(texts[-4:])  # one word, a few, past max_length (cut), none (the unknown token)
    assert both.shape == (4, MAX_LENGTH) and (both[3, 1:] == PAD_ID).all() and both[3, 0] != PAD_ID


def test_text_student_export_serves_strings_as_pytorch(text_run, student_export):
    folder = student_export
    assert sorted(p.name for p in folder.iterdir()) == ["student.json", "student.onnx", "tokenizer.json"]
    meta = json.loads((folder / "student.json").read_text())
    assert meta["graph"]["architecture"] == "transformer" and meta["preprocessing"]["min_width"] == 1
    assert meta["verification"]["max_abs_diff"]["student.onnx"] <= TOL
    session = ort.InferenceSession(str(folder / "student.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.type == "tensor(int64)" and not any(isinstance(d, int) for d in inp.shape)

    texts = _texts(text_run)
    served = OnnxModel(folder, threads=1)
    student = Student.from_run(text_run, device="cpu")
    np.testing.assert_allclose(served.predict_proba(texts), student.predict_proba(texts).numpy(), atol=TOL, rtol=0)
    for text in texts[-4:]:  # one string is one text; widths 1 .. max_length
        np.testing.assert_allclose(served.predict_proba(text), student.predict_proba([text]).numpy(), atol=TOL, rtol=0)
    for text in texts[-4:]:  # no floor for a transformer: the encoder's ids as they are
        np.testing.assert_array_equal(served.preprocess(text), student.preprocess([text]).numpy())
    ids = student.preprocess(texts).numpy()  # token ids in, as normalized inputs
    np.testing.assert_allclose(served.predict_proba(ids, normalized=True), student.predict_proba(texts).numpy(),
                               atol=TOL, rtol=0)


def test_text_export_serves_without_torch(text_run, ensemble_export, student_export, tmp_path):
    texts = _texts(text_run)[-10:]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import numpy as np
        from specialists.inference.onnx_runtime import OnnxEnsemble, OnnxModel
        texts = json.loads(open({str(tmp_path / 'texts.json')!r}).read())
        np.save({str(tmp_path / 'q.npy')!r}, OnnxEnsemble({str(ensemble_export)!r}, threads=1).predict_proba(texts))
        np.save({str(tmp_path / 'p.npy')!r}, OnnxModel({str(student_export)!r}, threads=1).predict_proba(texts))
        assert sys.modules["torch"] is None
        print("served")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "served" in proc.stdout, proc.stderr
    want = SpecialistEnsemble.from_run(text_run, device="cpu").predict_proba(texts).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), want, atol=TOL, rtol=0)
    want = Student.from_run(text_run, device="cpu").predict_proba(texts).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want, atol=TOL, rtol=0)


def _one_line(fn) -> str:
    with pytest.raises(SpecialistsError) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_text_export_bad_input_is_one_line(student_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(student_export, folder)
    served = OnnxModel(folder, threads=1)
    for bad, words in [(np.zeros((2, 5), np.float32), "takes texts (a string or a list of strings), got an array"),
                       (["a text", 3], "item 1 is not a string (int)"), (7, "got int"),
                       (np.array([[1.5, 2.0]]), "got an array")]:
        assert words in _one_line(lambda: served.predict_proba(bad)), bad
    assert "token ids" in _one_line(lambda: served.predict_proba(np.full((1, MAX_LENGTH + 1), 2), normalized=True))

    with open(folder / "tokenizer.json", "a") as f:  # changed: other ids, so refused
        f.write(" ")
    assert "tokenizer.json is not the tokenizer its export's JSON describes (sha256 differs)" in \
        _one_line(lambda: OnnxModel(folder, threads=1))
    (folder / "tokenizer.json").unlink()
    assert "missing file" in _one_line(lambda: OnnxModel(folder, threads=1))

    shutil.copy(student_export / "tokenizer.json", folder)
    meta = json.loads((folder / "student.json").read_text())
    del meta["preprocessing"]["min_width"]
    (folder / "student.json").write_text(json.dumps(meta))
    msg = _one_line(lambda: OnnxModel(folder, threads=1))
    assert "'preprocessing.min_width' must be an integer" in msg and "export the run again" in msg
    meta["preprocessing"]["min_width"], meta["format_version"] = 1, 1  # a text export as a version-1 one
    (folder / "student.json").write_text(json.dumps(meta))
    assert "format version 1 with preprocessing.layout 'NL'" in _one_line(lambda: OnnxModel(folder, threads=1))


def test_an_lstm_model_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    """torch.export cannot trace the bilstm's packed sequences: refused up front, not after a
    long traceback from the exporter."""
    from specialists.stages.pipeline import run_stage

    small = [o for o in TEXT if not o.startswith(("model.", "data.train_per_class"))]
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *small, "data.train_per_class=4", "model.name=bilstm",
                             "model.width=4", "generalist.epochs=1"])
    run_stage(cfg, "generalist")
    assert main(["export", cfg.run_dir, "--model", "generalist"]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert out == "" and len(errors) == 1 and "LSTM" in errors[0] and "SpecialistEnsemble / Student" in errors[0]
    assert not (tmp_path / "run" / "export").exists()
