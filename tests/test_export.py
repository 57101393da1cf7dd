"""``specialists export`` and the torch-free ONNX runtime, against PyTorch eager and the torch solver.

One small run per module (a generalist, 2 specialists routed by the generalist's top 2 classes
so that some examples combine two of them by EM, and a copy distilled into a ``soft_tree``
student), each export done once through the command line. Every check compares
with an independent reference: the run's own PyTorch predictors on the same raw test inputs,
``Predictor.preprocess``, and ``specialists.core.combine`` in float64.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_config

from specialists.cli import main
from specialists.core import combine as torch_combine
from specialists.core import combine_numpy
from specialists.data import Preprocessing
from specialists.errors import SpecialistsError
from specialists.inference import SingleModel, SpecialistEnsemble, Student
from specialists.inference import export as export_mod
from specialists.inference.onnx_runtime import NumpyPreprocessing, OnnxEnsemble, OnnxModel
from specialists.models import is_soft_tree
from specialists.rundir import Run

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4
# Smaller than conftest's TINY (this module trains its own run in seconds): 90 test images, 2 specialists.
SMALL = ["data.train_per_class=20", "data.test_per_class=10", "model.width=4", "generalist.epochs=4",
         "subsets.num_specialists=2", "specialists.epochs=1", "combine.top_n=2", "student.epochs=1",
         "student.controls=false"]
# The student exported is a soft tree (the generalist's export covers a neural network).
STUDENTS = {"soft_tree": ["student.model.name=soft_tree", "student.model.depth=3"]}


def _distill(src: Path, dst: Path, extra: list[str]) -> None:
    from specialists.stages import student as student_mod

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("manifest.lock"))
    run = Run(tiny_config(dst, *SMALL, *extra))
    run.save_config()  # Student.from_run reads the student's model from it
    student_mod.distill(run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> dict[str, Path]:
    """``base`` (no student) and ``soft_tree`` (its student); read-only."""
    from specialists.stages.pipeline import run_stage

    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(root / "base", *SMALL)
    for stage in ("generalist", "subsets", "specialists"):
        run_stage(cfg, stage)
    out = {"base": Path(cfg.run_dir)}
    for name, extra in STUDENTS.items():
        _distill(out["base"], root / name, extra)
        out[name] = root / name
    return out


def _export(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _diffs(out: str) -> dict[str, float]:
    """The per-file lines the command prints after "verified on ...": ``  NAME  D [why]``."""
    assert "largest |onnxruntime - PyTorch|" in out
    return {m[1]: float(m[2]) for m in re.finditer(r"^  (\S+)\s+(\d\.\d+e[-+]\d+)", out, re.M)}


def _raw_test(run_dir: Path, n: int | None = None) -> np.ndarray:
    """The run's raw test images, uint8 (N, H, W, C) as a user would hand them over."""
    x = Run.open(run_dir, "cpu").data.test.x.numpy()
    return np.ascontiguousarray(x[:n].transpose(0, 2, 3, 1))


def _export_once(folder: Path, *argv) -> str:
    """``specialists export ... --out folder`` for a module fixture (no capsys there): its stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", *map(str, argv), "--out", str(folder)])
    assert rc == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def ensemble_export(runs, tmp_path_factory) -> Path:
    """The base run's ensemble exported once through the command line (read-only)."""
    folder = tmp_path_factory.mktemp("ensemble_export")
    _export_once(folder, runs["base"], "--model", "ensemble")
    return folder


@pytest.fixture(scope="module")
def generalist_export(runs, tmp_path_factory) -> tuple[Path, str]:
    """The base run exported with the default --model (it has no student), and what it printed."""
    folder = tmp_path_factory.mktemp("generalist_export")
    return folder, _export_once(folder, runs["base"])


# ----------------------------------------------------------------------------- single models
@pytest.mark.parametrize("kind", list(STUDENTS))
def test_student_export_reproduces_pytorch(runs, kind, capsys):
    rc, out, err = _export(capsys, runs[kind])
    assert rc == 0 and "error" not in err and "note:" not in out
    folder = runs[kind] / "export"  # the default --out
    assert sorted(p.name for p in folder.iterdir()) == ["student.json", "student.onnx"]  # no temp files left
    diffs = _diffs(out)
    assert list(diffs) == ["student.onnx"] and diffs["student.onnx"] <= TOL

    torch_student = Student.from_run(runs[kind], device="cpu")
    assert is_soft_tree(torch_student.model) == (kind == "soft_tree")
    served = OnnxModel(folder / "student.json", threads=1)
    raw = _raw_test(runs[kind])
    want = torch_student.predict_proba(raw).numpy()
    got = served.predict_proba(raw)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(raw), served.num_classes)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert (served.predict(raw) == want.argmax(1)).mean() > 0.95  # (a near-tie may flip at 1e-7)
    # the graph itself: named input/output, dynamic batch axis
    session = ort.InferenceSession(str(folder / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["probs"]
    x = torch_student.preprocess(raw[:7]).numpy()
    for n in (1, 7):
        p = session.run(["probs"], {"input": x[:n]})[0]
        np.testing.assert_allclose(p, want[:n], atol=TOL, rtol=0)

    meta = json.loads((folder / "student.json").read_text())
    assert meta["kind"] == "model" and meta["model"] == "student" and meta["num_classes"] == served.num_classes
    assert meta["graph"]["architecture"] == ("soft_tree" if kind == "soft_tree" else "cnn")
    assert meta["source"]["run_dir"] == str(runs[kind].resolve())
    assert meta["input"] == {"name": "input", "shape": [None, 3, 8, 8], "dtype": "float32"}
    assert meta["verification"]["max_abs_diff"]["student.onnx"] == pytest.approx(diffs["student.onnx"], rel=0.01)


def test_json_preprocessing_reproduces_predictor_preprocess(runs, ensemble_export):
    pre = json.loads((ensemble_export / "ensemble.json").read_text())["preprocessing"]
    assert pre["scale"] == pytest.approx(1 / 255) and pre["channel_order"] == "RGB" and pre["layout"] == "NCHW"
    assert pre["raw_dtype"] == "uint8" and len(pre["mean"]) == len(pre["std"]) == 3
    predictor = SingleModel.generalist_from_run(runs["base"], device="cpu")
    ours = NumpyPreprocessing(pre)
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    for x in (nhwc, np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)), nhwc[0]):  # NHWC, NCHW, one image
        want = predictor.preprocess(x).numpy()
        got = ours(x)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # the same float32 operations: equal bit for bit
    with pytest.raises(SpecialistsError, match="expected images"):
        ours(nhwc[:, :4])
    # vectors: scale 1, per-feature mean and std
    info = {"input_shape": [4], "scale": 1.0, "mean": [0.5, -1.0, 2.0, 0.0], "std": [2.0, 0.5, 1.0, 3.0]}
    v = rng.normal(size=(6, 4))
    np.testing.assert_array_equal(NumpyPreprocessing(info)(v), Preprocessing(info)(v).numpy())


def test_run_without_student_exports_the_generalist_and_says_why(runs, generalist_export):
    out_dir, out = generalist_export
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no student" in notes[0] and "exporting the generalist" in notes[0]
    assert sorted(p.name for p in out_dir.iterdir()) == ["generalist.json", "generalist.onnx"]
    assert _diffs(out)["generalist.onnx"] <= TOL
    raw = _raw_test(runs["base"])
    want = SingleModel.generalist_from_run(runs["base"], device="cpu").predict_proba(raw).numpy()
    served = OnnxModel(out_dir, threads=1)  # the folder: its one single model
    assert served.model == "generalist"
    np.testing.assert_allclose(served.predict_proba(raw), want, atol=TOL, rtol=0)


def test_a_mismatch_is_one_line_and_keeps_the_previous_export(runs, generalist_export, tmp_path, capsys,
                                                              monkeypatch):
    out_dir = tmp_path / "out"
    shutil.copytree(generalist_export[0], out_dir)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    # a graph that computes something else than the model: softmax(1.5 * logits)
    monkeypatch.setattr(export_mod._Probs, "forward", lambda self, x: torch.softmax(1.5 * self.model(x), 1))
    rc, out, err = _export(capsys, runs["base"], "--model", "generalist", "--out", out_dir)
    assert rc == 2 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (after the data's log line)
    assert len(errors) == 1 and errors[0].startswith("error: generalist.onnx") and "differs" in errors[0]
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # untouched, no temp folder left


# ----------------------------------------------------------------------------- the ensemble
def test_ensemble_export_matches_specialist_ensemble(runs, ensemble_export, tmp_path):
    folder = ensemble_export
    meta = json.loads((folder / "ensemble.json").read_text())
    run = Run.open(runs["base"], "cpu")
    subsets = run.load_subsets()
    assert len(subsets) == 2
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["ensemble.json", "generalist.onnx", *(f"specialist_{e['id']:03d}.onnx" for e in subsets)])
    assert [s["classes"] for s in meta["specialists"]] == [e["classes"] for e in subsets]
    assert meta["routing"] == {"mode": run.cfg.combine.routing, "top_n": 2, "gate": None}
    assert meta["combine"] == {"solver": "em", "max_iter": run.cfg.combine.max_iter, "tol": run.cfg.combine.tol}
    verified = meta["verification"]["max_abs_diff"]  # each graph, and the runtime as a whole
    assert set(verified) == {n for n in names if n.endswith(".onnx")} | {"ensemble"}
    assert all(d <= TOL for d in verified.values()) and meta["verification"]["rows"] == 90

    ens = SpecialistEnsemble.from_run(runs["base"], device="cpu")
    served = OnnxEnsemble(folder, threads=1)
    raw = _raw_test(runs["base"])
    want = ens.predict_proba(raw).numpy()
    got = served.predict_proba(raw)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # the comparison covered rows with no, one and two active specialists (EM in numpy)
    _, p_specs, active = served.components(served.preprocess(raw))
    k = set(active.sum(1).tolist())
    assert {1, 2} <= k
    assert [p.shape[1] for p in p_specs] == [len(e["classes"]) + 1 for e in subsets]
    for n in (1, 7):  # dynamic batch through the runtime
        np.testing.assert_allclose(served.predict_proba(raw[:n]), want[:n], atol=TOL, rtol=0)

    # combine.gate travels in the JSON: a sure generalist answers alone, as in PyTorch
    gate = float(np.median(served.components(served.preprocess(raw))[0].max(1)))
    gated_folder = tmp_path / "gated"
    shutil.copytree(folder, gated_folder)
    gated_meta = meta | {"routing": meta["routing"] | {"gate": gate}}
    (gated_folder / "ensemble.json").write_text(json.dumps(gated_meta))
    gated = OnnxEnsemble(gated_folder, threads=1)
    want_gated = ens.with_routing(ens.routing, gate=gate).predict_proba(raw).numpy()
    np.testing.assert_allclose(gated.predict_proba(raw), want_gated, atol=TOL, rtol=0)
    sure = served.components(served.preprocess(raw))[0].max(1) >= gate
    assert 0 < sure.sum() < len(raw) and not gated.components(gated.preprocess(raw))[2][sure].any()
    assert np.abs(want_gated - want)[~sure].max() < TOL < np.abs(want_gated - want)[sure].max()

    # a graph replaced by another export's is refused, not served
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    with open(mixed / "specialist_000.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SpecialistsError, match="sha256"):
        OnnxEnsemble(mixed)


def test_onnx_runtime_serves_without_torch(runs, ensemble_export, generalist_export, tmp_path):
    raw = _raw_test(runs["base"], 20)
    np.save(tmp_path / "x.npy", raw)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import numpy as np
        from specialists.inference import OnnxModel  # the package's lazy names, too
        from specialists.inference.onnx_runtime import OnnxEnsemble
        assert OnnxModel.__module__ == "specialists.inference.onnx_runtime"
        q = OnnxEnsemble({str(ensemble_export)!r}, threads=1).predict_proba(np.load({str(tmp_path / 'x.npy')!r}))
        np.save({str(tmp_path / 'q.npy')!r}, q)
        p = OnnxModel({str(generalist_export[0])!r}, threads=1).predict_proba(np.load({str(tmp_path / 'x.npy')!r}))
        np.save({str(tmp_path / 'p.npy')!r}, p)
        assert sys.modules["torch"] is None
        print("served", q.shape, p.shape)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "served (20, 9) (20, 9)" in proc.stdout
    want = SpecialistEnsemble.from_run(runs["base"], device="cpu").predict_proba(raw).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), want, atol=TOL, rtol=0)
    want = SingleModel.generalist_from_run(runs["base"], device="cpu").predict_proba(raw).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- bad input
def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_bad_input_is_one_line_and_status_2(runs, tmp_path, capsys):
    no_generalist = tmp_path / "no_generalist"
    no_generalist.mkdir()
    shutil.copy(runs["base"] / "config.yaml", no_generalist)
    no_specialists = tmp_path / "no_specialists"
    shutil.copytree(runs["base"], no_specialists, ignore=shutil.ignore_patterns("manifest.lock", "specialists"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ([tmp_path / "missing"], "not a run directory"),
        ([no_generalist], "no trained generalist"),
        ([runs["base"], "--model", "teacher"], "unknown --model 'teacher'"),
        ([runs["base"], "--format", "tflite"], "unknown --format 'tflite'"),
        ([no_specialists, "--model", "ensemble"], "not trained"),
        ([runs["base"], "--out", a_file], "is a file"),
    ]
    for argv, words in cases:
        rc, out, err = _export(capsys, *argv)
        assert rc == 2 and out == "", (argv, out)
        assert words in _one_error(err), (argv, err)
    assert not (no_specialists / "export").exists() and not (runs["base"] / "export").exists()


@pytest.mark.parametrize("damage", ["no preprocessing", "a mean short of a channel", "a class id past the end"])
def test_a_damaged_export_json_is_one_line(generalist_export, ensemble_export, tmp_path, damage):
    """The graph's sha256 was checked but not the JSON beside it: a JSON without
    ``preprocessing`` gave a KeyError, a mean of 2 values for 3 channels a broadcasting error."""
    src, name, serve = ((ensemble_export, "ensemble.json", OnnxEnsemble) if damage == "a class id past the end"
                        else (generalist_export[0], "generalist.json", OnnxModel))
    folder = tmp_path / "export"
    shutil.copytree(src, folder)
    meta = json.loads((folder / name).read_text())
    if damage == "no preprocessing":
        del meta["preprocessing"]
        words = "no 'preprocessing'"
    elif damage == "a mean short of a channel":
        c = meta["preprocessing"]["input_shape"][0]
        meta["preprocessing"]["mean"] = meta["preprocessing"]["mean"][:-1]
        words = f"'preprocessing.mean' must be {c} numbers (one per channel)"
    else:
        meta["specialists"][0]["classes"][0] = meta["num_classes"]
        words = "'specialists[0].classes' must be distinct class ids"
    (folder / name).write_text(json.dumps(meta))
    with pytest.raises(SpecialistsError) as info:
        serve(folder, threads=1)
    msg = str(info.value)
    assert "\n" not in msg and name in msg and words in msg and "export the run again" in msg, msg


# ----------------------------------------------------------------------------- combine_numpy
def _probs(rng, rows: int, k: int, sharp: float) -> np.ndarray:
    z = rng.normal(size=(rows, k)) * sharp
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _torch_q(pg, subsets, specs, active, **kw) -> np.ndarray:
    return torch_combine.combine(torch.tensor(pg), [torch.as_tensor(np.asarray(s, np.int64)) for s in subsets],
                                 [torch.tensor(p) for p in specs], torch.tensor(active), **kw).numpy()


@pytest.mark.parametrize("num_active", ["none", "one", "several", "mixed"])
def test_combine_numpy_matches_the_torch_solver(num_active):
    rng = np.random.default_rng({"none": 0, "one": 1, "several": 2, "mixed": 3}[num_active])
    for _ in range(40):
        C, M, B = int(rng.integers(3, 25)), int(rng.integers(1, 5)), int(rng.integers(1, 12))
        subsets = [np.sort(rng.choice(C, size=int(rng.integers(1, C)), replace=False)) for _ in range(M)]  # overlap
        sharp = float(rng.choice([0.5, 3.0, 20.0]))
        pg = _probs(rng, B, C, sharp)
        specs = [_probs(rng, B, len(s) + 1, sharp) for s in subsets]
        if num_active == "none":
            active = np.zeros((B, M), bool)
        elif num_active == "one":
            active = np.eye(M, dtype=bool)[rng.integers(0, M, B)]
        elif num_active == "several":
            active = np.ones((B, M), bool) if M > 1 else np.ones((B, 1), bool)
        else:
            active = rng.random((B, M)) < 0.5
        got = combine_numpy.combine(pg, subsets, specs, active)
        want = _torch_q(pg, subsets, specs, active)
        np.testing.assert_allclose(got, want, atol=1e-10, rtol=0)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-12)
        if num_active == "none":
            assert np.array_equal(got, pg)  # bit for bit


def test_combine_numpy_degenerate_cases_match_the_torch_solver():
    C = 6
    pg = np.array([[0.5, 0.5, 0, 0, 0, 0],  # P_g(not S) = 0 for S = {0, 1}: the rest uniform
                   [1e-310, 1 - 1e-310, 0, 0, 0, 0],  # subnormal mass
                   [0, 0, 0, 1.0, 0, 0],  # one-hot outside every subset but the last
                   [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])
    subsets = [np.array([0, 1]), np.array([1, 2, 3]), np.arange(C), np.array([], np.int64)]  # all classes; empty
    specs = [np.tile([0.1, 0.2, 0.7], (4, 1)), np.tile([0.0, 0.0, 0.0, 1.0], (4, 1)),  # all mass in the dustbin
             np.full((4, C + 1), 1 / (C + 1)), np.ones((4, 1))]
    for act in ([1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 1, 0]):
        active = np.tile(np.array(act, bool), (4, 1))
        for kw in ({}, {"max_iter": 0}, {"max_iter": 3}, {"tol": 0.0}):
            got = combine_numpy.combine(pg, subsets, specs, active, **kw)
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, _torch_q(pg, subsets, specs, active, **kw), atol=1e-12, rtol=0)
    # rows where a specialist is inactive may hold anything; float32 in, float32 out; empty inputs
    garbage = [s.copy() for s in specs]
    garbage[1][:] = np.nan
    active = np.tile(np.array([1, 0, 1, 0], bool), (4, 1))
    np.testing.assert_allclose(combine_numpy.combine(pg, subsets, garbage, active),
                               _torch_q(pg, subsets, specs, active), atol=1e-12, rtol=0)
    assert combine_numpy.combine(pg.astype(np.float32), subsets, specs, active).dtype == np.float32
    empty = combine_numpy.combine(np.zeros((0, C)), subsets, [np.zeros((0, len(s) + 1)) for s in subsets],
                                  np.zeros((0, 4), bool))
    assert empty.shape == (0, C)
    assert np.array_equal(combine_numpy.combine(pg, [], [], np.zeros((4, 0), bool)), pg)
    for bad, words in [(dict(subsets=[np.array([0, 0])]), "repeats"), (dict(max_iter=-1), "max_iter"),
                       (dict(specs=[np.ones((4, 2))]), "shape")]:
        args = dict(subsets=[np.array([0, 1])], specs=[specs[0]], max_iter=200) | bad
        with pytest.raises(ValueError, match=words):
            combine_numpy.combine(pg, args["subsets"], args["specs"], np.ones((4, 1), bool), max_iter=args["max_iter"])


@pytest.mark.parametrize("routing,top_n,gate", [("routed", 1, None), ("routed", 3, None), ("all", 1, None),
                                                ("routed", 2, 0.4), ("all", 1, 0.4)])
def test_route_numpy_matches_torch(routing, top_n, gate):
    rng = np.random.default_rng(top_n)
    C, subsets = 10, [np.array([0, 1, 2]), np.array([2, 5]), np.array([7, 8, 9])]
    pg = _probs(rng, 50, C, 2.0)  # continuous: no exact ties
    got = combine_numpy.route(pg, combine_numpy.membership(subsets, C), top_n, routing, gate)
    want = torch_combine.route(torch.tensor(pg), torch_combine.membership(subsets, C), top_n, routing, gate).numpy()
    assert np.array_equal(got, want) and got.any()
    if gate is not None:  # by hand: no specialist where the generalist's top probability reaches the gate
        ungated = combine_numpy.route(pg, combine_numpy.membership(subsets, C), top_n, routing)
        sure = pg.max(1) >= gate
        assert 0 < sure.sum() < len(pg) and not got[sure].any() and np.array_equal(got[~sure], ungated[~sure])
