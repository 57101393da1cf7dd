"""``specialists export RUN_DIR``: a run's models as ONNX graphs, verified, with what serving needs.

``--model student`` (default; the generalist when the run has no student), ``generalist``, or
``ensemble`` (the generalist and every specialist, each its own graph, plus the routing and
combination settings). Files written to ``--out`` (default ``RUN_DIR/export/``)::

    student.onnx, student.json          (or generalist.onnx, generalist.json)
    generalist.onnx, specialist_000.onnx, ..., ensemble.json
    trunk.onnx                          (an ensemble whose specialists share the generalist's trunk)

Every graph computes what :meth:`SingleModel.proba <specialists.inference.SingleModel.proba>`
computes on a normalized batch, ``softmax(model(x), 1)`` in float32 (a soft-tree student's
``model(x)`` is its max-path leaf's log-distribution, so this is that leaf's distribution):
input ``input`` (N, *input_shape) float32, output ``probs`` (N, outputs) float32, the batch
axis dynamic. A specialist's outputs are its subset's classes in ``classes`` order, then the
dustbin.

The JSON (``<model>.json`` or ``ensemble.json``; :mod:`specialists.inference.onnx_runtime`
serves both)::

    format, format_version   "specialists-onnx", 1 (2: an ensemble with a shared trunk)
    kind, model              "model" | "ensemble"; "student" | "generalist" | "ensemble"
    input, output            {"name", "shape" (null = the batch axis), "dtype"}
    preprocessing            input_shape, layout ("NCHW" | "ND"), raw_dtype ("uint8" | "float32"),
                             channel_order ("RGB" | "L" | "features"), scale (1/255 for uint8
                             images), mean, std, formula: input = (raw / (1 / scale) - mean) / std
    class_names, num_classes
    graph                    (kind "model") the graph: file, sha256, external_data [{file, sha256}],
                             outputs, architecture, weights (in the run), weights_sha256
    generalist, specialists  (kind "ensemble") the generalist's graph; per specialist the same
                             plus id, classes (class ids), names
    trunk                    (shared trunk only) the trunk's graph, output "features", outputs
                             null, input_shape, branch; the generalist's and specialists' entries
                             then carry input_shape: the trunk's feature shape
    routing, combine         (kind "ensemble") {"mode", "top_n"}; {"solver": "em", "max_iter", "tol"}
    source                   run_dir, data, seed: where the models came from
    exporter                 specialists, torch and onnx versions, opset
    verification             rows (test examples), tolerance, max_abs_diff per file

Every export is verified before it is put in place: onnxruntime on a seeded sample of up to
256 test examples of the run (as a batch, and its first row alone: the dynamic batch axis)
against PyTorch; a single model also from raw inputs through the JSON's preprocessing; the
ensemble through :class:`~specialists.inference.onnx_runtime.OnnxEnsemble` against
:meth:`SpecialistEnsemble.predict_proba` on the same raw inputs. A largest absolute difference
above 1e-4 is one error line and nothing is written. Files are written into a temporary folder
inside ``--out``, verified there, fsynced and renamed into place one by one, the JSON last:
the JSON's sha256 of each graph lets the runtime refuse a folder left half-replaced.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..data import TEXT_LAYOUT
from ..errors import SpecialistsError, one_line
from ..rundir import Run
from ..rundir.config import student_model_config
from ..rundir.io import file_sha256, write_json
from .ensemble import SpecialistEnsemble
from .onnx_runtime import (
    ENSEMBLE_JSON,
    FEATURES,
    FORMAT,
    FORMAT_VERSION,
    INPUT,
    OUTPUT,
    TRUNK_FORMAT_VERSION,
    OnnxEnsemble,
    OnnxGraph,
    OnnxModel,
)
from .predictor import SingleModel, Student, open_run

MODELS = ("student", "generalist", "ensemble")
FORMATS = ("onnx",)
TOLERANCE = 1e-4  # the largest |onnxruntime - PyTorch| accepted, in probability
VERIFY_ROWS = 256  # test examples the export is verified on
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


@dataclass
class Exported:
    """What :func:`export_run` wrote: ``model`` (the generalist when the student was asked for
    but the run has none), the final ``files``, the largest absolute difference per file (and
    ``ensemble`` for the runtime as a whole) on ``rows`` test examples, and the notes printed."""

    model: str
    folder: Path
    files: list[Path]
    max_diff: dict[str, float]
    rows: int
    notes: list[str] = field(default_factory=list)


class _Probs(nn.Module):
    """``softmax(model(x).float(), 1)``: :meth:`SingleModel.proba` as one graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float(), 1)


class _Features(nn.Module):
    """``trunk(x).float()``: a shared trunk's output as one graph (no softmax)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).float()


def export_run(run_dir, model: str = "student", fmt: str = "onnx", out=None, *, rows: int = VERIFY_ROWS,
               echo: Callable[[str], None] | None = None) -> Exported:
    """Export ``model`` of the run at ``run_dir`` to ``out`` (default ``RUN_DIR/export``),
    verified; ``echo`` receives the lines to show (the fallback note, one per file, the summary).
    Bad input (no run, no generalist, an unknown model or format, an ensemble without trained
    specialists, ``out`` a file, a verification failure) is one :class:`SpecialistsError` line."""
    say = echo or (lambda line: None)
    if model not in MODELS:
        raise SpecialistsError(f"unknown --model '{model}' (one of: {', '.join(MODELS)})")
    if fmt not in FORMATS:
        raise SpecialistsError(f"unknown --format '{fmt}' (one of: {', '.join(FORMATS)})")
    run = open_run(run_dir, "cpu")
    folder = Path(out) if out is not None else run.export_dir
    if folder.exists() and not folder.is_dir():
        raise SpecialistsError(f"--out {folder} is a file, not a folder")
    if not run.generalist.weights.exists():
        raise SpecialistsError(f"no trained generalist in {run.dir}: run `specialists train-generalist CONFIG` first")
    if run.data_info().get("layout") == TEXT_LAYOUT:
        raise SpecialistsError(f"{run.dir} is a text run: its models take token ids from the run's tokenizer, which "
                               "the ONNX runtime here does not apply yet; serve it with SpecialistEnsemble / Student")
    notes = []
    if model == "student" and not run.student.weights.exists():
        notes.append(f"note: {run.dir} has no student (student.enabled=false or `specialists distill` not run): "
                     "exporting the generalist")
        model = "generalist"
    if model == "ensemble" and run.cfg.combine.solver == "gradient":
        notes.append("note: combine.solver=gradient: the export combines with EM (the same minimizer, to its "
                     "tolerance), and is verified against the EM solver")
    for line in notes:
        say(line)
    # Load (and check) the models before anything is written: a missing student or an untrained
    # specialist is refused here.
    if model == "ensemble":
        ens = SpecialistEnsemble.from_run(run, solver="em")
        if not ens.specialists:
            raise SpecialistsError(f"{run.dir} has no specialists (subsets.json lists none): nothing to combine; "
                                   "export --model generalist")
        single = None
    else:
        single = Student.from_run(run) if model == "student" else SingleModel.generalist_from_run(run)
    raw, x = _test_inputs(run, rows)

    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model}-export-", dir=folder))
    except OSError as exc:
        raise SpecialistsError(f"{folder}: cannot write ({exc.strerror or one_line(exc)})") from None
    try:
        if single is not None:
            json_name, diffs = _export_single(run, model, single, tmp, raw, x)
        else:
            json_name, diffs = _export_ensemble(run, ens, tmp, raw, x)
        worst = max(diffs, key=diffs.get)
        if diffs[worst] > TOLERANCE:
            raise SpecialistsError(f"{worst}: onnxruntime differs from PyTorch by {diffs[worst]:.2e} > {TOLERANCE:g} "
                                   f"on {len(x)} test examples of {run.dir}; nothing was written")
        files = _put_in_place(tmp, folder, json_name, stale="specialist_*.onnx*" if model == "ensemble" else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"verified on {len(x)} test examples: the largest |onnxruntime - PyTorch| (at most {TOLERANCE:g})")
    for name, d in diffs.items():
        what = "   (OnnxEnsemble vs SpecialistEnsemble.predict_proba)" if name == "ensemble" else ""
        say(f"  {name:<22} {d:.2e}{what}")
    say(f"exported the {model} of {run.dir} to {folder}: {', '.join(p.name for p in files)}")
    return Exported(model, folder, files, diffs, len(x), notes)


# --------------------------------------------------------------------------- the pieces
def _test_inputs(run: Run, rows: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A seeded sample of up to ``rows`` test examples (test sets are often stored class by
    class, and their first rows would all route to one specialist): (raw inputs as stored,
    or None for a streamed data set; the normalized batch (n, *input_shape) float32)."""
    test = run.data.test
    n = min(rows, len(test))
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n].sort().values
    x = run.data.batcher(test, torch.device("cpu")).batch(idx)[0]
    return (test.x[idx] if test.x is not None else None), x.contiguous()


def _max_diff(a, b) -> float:
    """The largest |a - b| (inf for different shapes or any NaN: both fail the check)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a - b)
    return float("inf") if np.isnan(d).any() else float(d.max(initial=0.0))


@contextmanager
def _quiet_exporter():
    """The exporter's passes log every rewrite at INFO (dozens of lines per graph): show their
    warnings only, for as long as the export runs."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_graph(net: nn.Module, input_shape: tuple, path: Path, what: str, output: str = OUTPUT) -> None:
    """``softmax(net(x))`` (``output`` ``probs``) or a trunk's ``net(x)`` (``output``
    ``features``) -> ``path`` (weights inside the file, or in data files beside it past
    protobuf's 2 GB limit), float32, eval mode, on the CPU, batch axis dynamic."""
    wrapper = (_Probs(net.eval()) if output == OUTPUT else _Features(net.eval())).eval()
    sample = torch.zeros(2, *input_shape)  # batch 2: torch.export would specialize a batch of 1
    try:
        with _quiet_exporter():
            program = torch.onnx.export(wrapper, (sample,), None, dynamo=True, input_names=[INPUT],
                                        output_names=[output], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verbose=False)
            program.save(str(path))
    except Exception as exc:  # the exporter's own errors: an operator it cannot translate, say
        raise SpecialistsError(f"cannot export the {what} to ONNX ({one_line(exc)})") from None


def _graph_entry(run: Run, net: nn.Module, files, name: str, tmp: Path, what: str, arch: str,
                 input_shape: tuple | None = None, output: str = OUTPUT) -> dict:
    """Export ``net`` to ``tmp/name`` and describe it (see the module doc's ``graph``);
    ``input_shape`` (default the data's) without the batch axis; ``output``: ``probs``, or
    ``features`` for a shared trunk (then ``outputs`` is its feature shape)."""
    before = set(tmp.iterdir())
    path = tmp / name
    shape = tuple(input_shape or run.data_info()["input_shape"])
    _export_graph(net, shape, path, what, output)
    data = sorted(set(tmp.iterdir()) - before - {path})  # external data files, if any
    entry = {"file": name, "sha256": file_sha256(path),
             "external_data": [{"file": p.name, "sha256": file_sha256(p)} for p in data],
             "outputs": int(net.num_classes) if output == OUTPUT else None, "architecture": arch,
             "weights": run.rel(files.weights), "weights_sha256": file_sha256(files.weights)}
    if input_shape is not None:  # a part on the trunk's features, or the trunk itself
        entry["input_shape"] = list(shape)
    if output != OUTPUT:
        entry["output"] = output
    return entry


def _common(run: Run, kind: str, model: str, num_outputs: int) -> dict:
    info = run.data_info()
    image = len(info["input_shape"]) == 3
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "model": model,
        "input": {"name": INPUT, "shape": [None, *info["input_shape"]], "dtype": "float32"},
        "output": {"name": OUTPUT, "shape": [None, num_outputs], "dtype": "float32"},
        "preprocessing": {
            "input_shape": list(info["input_shape"]), "layout": "NCHW" if image else "ND",
            "raw_dtype": "uint8" if image else "float32",
            "channel_order": info.get("channel_order") or "features",
            "scale": info["scale"], "mean": list(info["mean"]), "std": list(info["std"]),
            "formula": "input = (raw / (1 / scale) - mean) / std, per " + ("channel" if image else "feature"),
        },
        "class_names": list(info["class_names"]), "num_classes": int(info["num_classes"]),
        "source": {"run_dir": str(run.dir.resolve()), "data": run.cfg.data.name, "seed": run.cfg.seed},
        "exporter": {"specialists": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
    }


def _opset(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _finish_json(meta: dict, path: Path, graph_file: Path, diffs: dict, rows: int) -> None:
    meta["exporter"]["opset"] = _opset(graph_file)
    meta["verification"] = {"rows": rows, "tolerance": TOLERANCE, "max_abs_diff": diffs}
    write_json(path, meta)


def _threads() -> int:
    return torch.get_num_threads()  # onnxruntime as many intra-op threads as torch here


def _export_single(run: Run, model: str, pred: SingleModel, tmp: Path, raw, x) -> tuple[str, dict]:
    """``<model>.onnx`` + ``<model>.json`` in ``tmp``, verified: (the JSON's name, diffs)."""
    files = run.student if model == "student" else run.generalist
    arch = (student_model_config(run.cfg) if model == "student" else run.cfg.model).name
    name = f"{model}.onnx"
    meta = _common(run, "model", model, pred.num_classes)
    meta["graph"] = _graph_entry(run, pred.model, files, name, tmp, model, arch)
    json_path = tmp / f"{model}.json"
    write_json(json_path, meta)

    served = OnnxModel(json_path, threads=_threads())
    want = pred.predict_proba(x, normalized=True).numpy()
    diff = max(_max_diff(served.predict_proba(x.numpy(), normalized=True), want),
               _max_diff(served.predict_proba(x[:1].numpy(), normalized=True), want[:1]))
    if raw is not None:  # the JSON's preprocessing, from the raw inputs, against Predictor.preprocess
        diff = max(diff, _max_diff(served.predict_proba(raw.numpy()), pred.predict_proba(raw).numpy()))
    diffs = {name: diff}
    _finish_json(meta, json_path, tmp / name, diffs, len(x))
    return json_path.name, diffs


def _export_ensemble(run: Run, ens: SpecialistEnsemble, tmp: Path, raw, x) -> tuple[str, dict]:
    """``generalist.onnx``, ``specialist_NNN.onnx``, ``ensemble.json`` in ``tmp``, verified."""
    arch = run.cfg.model.name
    meta = _common(run, "ensemble", "ensemble", ens.num_classes)
    xn = x.numpy()
    h, part_shape = x, None  # what the generalist's and the specialists' graphs take
    if ens.trunk is not None:  # shared trunk: its own graph, run once per batch by the runtime
        meta["format_version"] = TRUNK_FORMAT_VERSION
        with torch.no_grad():
            h = ens.trunk(x).float()
        part_shape = tuple(h.shape[1:])
        meta["trunk"] = _graph_entry(run, ens.trunk, run.generalist, "trunk.onnx", tmp, "shared trunk", arch,
                                     tuple(x.shape[1:]), FEATURES)
        meta["trunk"]["branch"] = run.cfg.specialists.branch
    meta["generalist"] = _graph_entry(run, ens.generalist_part, run.generalist, "generalist.onnx", tmp,
                                      "generalist", arch, part_shape)
    names = ens.class_names
    meta["specialists"] = []
    for sid, net, subset in zip(ens.ids, ens.specialists, ens.subsets):
        classes = subset.tolist()
        entry = _graph_entry(run, net, run.specialist(sid), f"specialist_{sid:03d}.onnx", tmp,
                             f"specialist {sid}", arch, part_shape)
        meta["specialists"].append({"id": sid, "classes": classes, "names": [names[c] for c in classes], **entry})
    meta["routing"] = {"mode": ens.routing, "top_n": ens.top_n}
    meta["combine"] = {"solver": "em", "max_iter": ens.max_iter, "tol": ens.tol}
    json_path = tmp / ENSEMBLE_JSON
    write_json(json_path, meta)

    # Each graph on its own, on every row (as routing=all would run it), batch and first row.
    diffs = {}
    hn = h.numpy()
    if ens.trunk is not None:
        graph = OnnxGraph(tmp, meta["trunk"], _threads(), None, check=True)
        diffs["trunk.onnx"] = max(_max_diff(graph.run(xn), hn), _max_diff(graph.run(xn[:1]), hn[:1]))
    for entry, net in zip([meta["generalist"], *meta["specialists"]], [ens.generalist_part, *ens.specialists]):
        graph = OnnxGraph(tmp, entry, _threads(), None, check=True)
        with torch.no_grad():
            want = torch.softmax(net(h).float(), 1).numpy()
        diffs[entry["file"]] = max(_max_diff(graph.run(hn), want), _max_diff(graph.run(hn[:1]), want[:1]))
    # The runtime as a whole: routing, the specialists on their rows, the numpy combination.
    served = OnnxEnsemble(tmp, threads=_threads())
    if raw is not None:
        got, want = served.predict_proba(raw.numpy()), ens.predict_proba(raw)
    else:  # a streamed data set keeps no raw test inputs: both from the normalized batch
        got, want = served.predict_proba(xn, normalized=True), ens.predict_proba(x, normalized=True)
    diffs["ensemble"] = _max_diff(got, want.numpy())
    _finish_json(meta, json_path, tmp / "generalist.onnx", diffs, len(x))
    return json_path.name, diffs


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_in_place(tmp: Path, folder: Path, json_name: str, stale: str | None) -> list[Path]:
    """Rename every file of ``tmp`` into ``folder`` (same file system: each rename is atomic),
    the JSON last; then remove the files matching ``stale`` that the new export does not have
    (an earlier ensemble's extra specialists). Returns the final paths, the JSON last."""
    names = sorted(p.name for p in tmp.iterdir() if p.name != json_name) + [json_name]
    try:
        for name in names:
            _fsync(tmp / name)
            os.replace(tmp / name, folder / name)
        if stale:
            for p in folder.glob(stale):
                if p.name not in names:
                    p.unlink()
    except OSError as exc:
        raise SpecialistsError(f"{folder}: cannot write ({exc.strerror or one_line(exc)})") from None
    return [folder / n for n in names]
