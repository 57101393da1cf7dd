"""``specialists export RUN_DIR``: a run's models as ONNX graphs, verified, with what serving needs.

``--model student`` (default; the generalist when the run has no student), ``generalist``, or
``ensemble`` (the generalist and every specialist, each its own graph, plus the routing and
combination settings). Files written to ``--out`` (default ``RUN_DIR/export/``)::

    student.onnx, student.json          (or generalist.onnx, generalist.json)
    generalist.onnx, specialist_000.onnx, ..., ensemble.json
    trunk.onnx                          (an ensemble whose specialists share the generalist's trunk)
    tokenizer.json                      (a text run: its own tokenizer, byte for byte)

Every graph computes what :meth:`SingleModel.proba <specialists.inference.SingleModel.proba>`
computes on a normalized batch, ``softmax(model(x), 1)`` in float32 (a soft-tree student's
``model(x)`` is its max-path leaf's log-distribution, so this is that leaf's distribution):
input ``input`` (N, *input_shape) float32, output ``probs`` (N, outputs) float32, the batch
axis dynamic. A specialist's outputs are its subset's classes in ``classes`` order, then the
dustbin. A text run's graphs take int64 token ids (N, L') instead, the token axis dynamic too
(``min_width`` to ``max_length``): the models mask the padding themselves. An LSTM (``bilstm``)
is refused in one line: torch.export cannot trace its packed sequences.

The JSON (``<model>.json`` or ``ensemble.json``; :mod:`specialists.inference.onnx_runtime`
serves both)::

    format, format_version   "specialists-onnx", 1 (2: an ensemble with a shared trunk; 3: a
                             text run, with or without one)
    kind, model              "model" | "ensemble"; "student" | "generalist" | "ensemble"
    input, output            {"name", "shape" (null = the batch axis, a text's token axis), "dtype"}
    preprocessing            input_shape, layout ("NCHW" | "ND"), raw_dtype ("uint8" | "float32"),
                             channel_order ("RGB" | "L" | "features"), scale (1/255 for uint8
                             images), mean, std, formula: input = (raw / (1 / scale) - mean) / std;
                             a text run: input_shape [max_length], layout "NL", raw_dtype "str",
                             tokenizer {file, sha256}, max_length, vocab_size, add_special_tokens
                             (false), id_shift, unknown_id (a text without tokens), pad_id,
                             padding ("right"), width ("longest": each batch padded to its
                             longest row, as the training batcher cuts), min_width (the widest
                             Conv1d window: rows are padded to at least it), formula
    class_names, num_classes
    graph                    (kind "model") the graph: file, sha256, external_data [{file, sha256}],
                             outputs, architecture, weights (in the run), weights_sha256
    generalist, specialists  (kind "ensemble") the generalist's graph; per specialist the same
                             plus id, classes (class ids), names
    trunk                    (shared trunk only) the trunk's graph, output "features", outputs
                             null, input_shape, branch; the generalist's and specialists' entries
                             then carry input_shape: the trunk's feature shape. A text trunk
                             returns a pair (output ["features", "features_1"], no input_shape),
                             which the parts take in order (input ["input", "input_1"])
    routing, combine         (kind "ensemble") {"mode", "top_n", "gate" (null: every example)};
                             {"solver": "em", "max_iter", "tol"}
    source                   run_dir, data, seed: where the models came from
    exporter                 specialists, torch and onnx versions (and tokenizers'), opset
    verification             rows (test examples), tolerance, max_abs_diff per file

Every export is verified before it is put in place: onnxruntime on a seeded sample of up to
256 test examples of the run (as a batch, and its first row alone: the dynamic batch axis)
against PyTorch; a single model also from raw inputs through the JSON's preprocessing; the
ensemble through :class:`~specialists.inference.onnx_runtime.OnnxEnsemble` against
:meth:`SpecialistEnsemble.predict_proba` on the same raw inputs. A text run's raw inputs are its
sampled test texts as one batch, then texts of one word, a few words, far past ``max_length``
(cut) and none, each alone (every width of the token axis). A largest absolute difference
above 1e-4 is one error line and nothing is written. Files are written into a temporary folder
inside ``--out``, verified there, fsynced and renamed into place one by one, the JSON last:
the JSON's sha256 of each graph lets the runtime refuse a folder left half-replaced.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..data import PAD_ID, TEXT_LAYOUT, TextEncoder, batcher_for
from ..errors import SpecialistsError, one_line
from ..models.branch import tail_input
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
    TEXT_FORMAT_VERSION,
    TOKENIZER_JSON,
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

    def forward(self, *x: torch.Tensor) -> torch.Tensor:  # several inputs: a part on a text trunk
        return torch.softmax(self.model(*x).float(), 1)


class _Features(nn.Module):
    """``trunk(x).float()``: a shared trunk's output as one graph (no softmax); a text trunk's
    tuple (float states or embeddings, a bool mask or int64 lengths) as it is."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor):
        h = self.trunk(x)
        return tuple(h) if isinstance(h, tuple) else h.float()


def export_run(run_dir, model: str = "student", fmt: str = "onnx", out=None, *, rows: int = VERIFY_ROWS,
               echo: Callable[[str], None] | None = None) -> Exported:
    """Export ``model`` of the run at ``run_dir`` to ``out`` (default ``RUN_DIR/export``),
    verified; ``echo`` receives the lines to show (the fallback note, one per file, the summary).
    Bad input (no run, no generalist, an unknown model or format, an ensemble without trained
    specialists, ``out`` a file, an LSTM model, a verification failure) is one
    :class:`SpecialistsError` line."""
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
    nets = [single.model] if single is not None else [n for n in (ens.trunk, ens.generalist_part, *ens.specialists)
                                                        if n is not None]
    if any(isinstance(m, nn.LSTM) for net in nets for m in net.modules()):
        # torch.export cannot trace pack_padded_sequence (the LSTM runs on the real tokens only)
        raise SpecialistsError(f"the {model} of {run.dir} runs an LSTM on packed sequences (bilstm), which the ONNX "
                               "exporter cannot trace yet; serve it with SpecialistEnsemble / Student")
    raw, x = _test_inputs(run, rows)
    info = run.data_info()
    length = int(info["input_shape"][0]) if info.get("layout") == TEXT_LAYOUT else None  # a text run's max_length
    axes = _Axes(length, _min_width(nets, length) if length else 1)

    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model}-export-", dir=folder))
    except OSError as exc:
        raise SpecialistsError(f"{folder}: cannot write ({exc.strerror or one_line(exc)})") from None
    try:
        with _one_registry():
            if single is not None:
                json_name, diffs = _export_single(run, model, single, tmp, raw, x, axes)
            else:
                json_name, diffs = _export_ensemble(run, ens, tmp, raw, x, axes)
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
def _test_inputs(run: Run, rows: int) -> tuple[torch.Tensor | list[str] | None, torch.Tensor]:
    """A seeded sample of up to ``rows`` test examples (test sets are often stored class by
    class, and their first rows would all route to one specialist): (raw inputs as stored,
    or None for a streamed data set; the normalized batch (n, *input_shape) float32). A text
    run: (the sample's texts, then :func:`_text_probes`; the sample's ids (n, L') int64, cut
    to its longest row as the training batcher cuts a batch)."""
    test = run.data.test
    n = min(rows, len(test))
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n].sort().values
    x = batcher_for(run.data, test, torch.device("cpu")).batch(idx)[0]
    if test.text is not None:
        texts = [test.text[i] for i in idx.tolist()]
        return texts + _text_probes(texts, run.data.encoder.max_length), x.contiguous()
    return (test.x[idx] if test.x is not None else None), x.contiguous()


def _text_probes(texts: list[str], max_length: int) -> list[str]:
    """Texts of every length class, from the sample's words: one word, four, far more words
    than ``max_length`` tokens (cut), and the empty text (no tokens: the unknown token)."""
    words = " ".join(texts).split()
    return [words[0], " ".join(words[:4]), " ".join((words * 2 * max_length)[:2 * max_length]), ""]


def _text_groups(raw: list[str], probes: int = 4) -> list[list[str]]:  # the 4 of _text_probes
    """The batches a text export is verified on: all texts (the widest batch), then each probe
    alone (a batch as narrow as its one text: the dynamic token axis)."""
    return [raw] + [[t] for t in raw[-probes:]]


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
    warnings only, for as long as the export runs. (It also warns that the inputs of a part on
    a text trunk share one batch axis, which they do by design: not shown.)"""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="# The axis name: .* shares the same shape constraints")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def _one_registry():
    """Build the exporter's operator registry once for all the graphs of one export: torch's
    dynamo exporter rebuilds it from torchlib for every graph (about 1.5 s, most of a small
    graph's export). It reaches into ``torch.onnx``'s private ``ONNXRegistry.from_torchlib``
    (torch <= 2.14.1, as pinned); where that is not there, nothing changes. Every graph is still
    verified against PyTorch, so a registry that did not suit a later graph could not go unseen."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:
        ONNXRegistry = None
    original = vars(ONNXRegistry).get("from_torchlib") if ONNXRegistry is not None else None
    if not isinstance(original, classmethod):
        yield
        return
    built: dict = {}

    def cached(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = original.__func__(cls, *args, **kwargs)
        return built[key]

    ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original


class _Axes:
    """The dynamic axes of one export's graphs: the batch, and a text export's token axis
    (``min_width`` to ``max_length`` tokens; fixed when the two are equal)."""

    def __init__(self, max_length: int | None = None, min_width: int = 1):
        self.max_length, self.min_width = max_length, min_width
        self.batch = torch.export.Dim("batch")
        self.tokens = (torch.export.Dim("tokens", min=min_width, max=max_length)
                       if max_length is not None and min_width < max_length else None)


@dataclass
class _Signature:
    """What a graph takes: example tensors (batch 2: torch.export would specialize a batch of
    1), each one's dynamic axes ({axis: Dim}), and the graph's input names."""

    sample: tuple
    axes: tuple
    names: list[str]


def _min_width(nets: list[nn.Module], max_length: int) -> int:
    """The fewest tokens a text export's graphs take: the widest ``Conv1d`` window (TextCNN pads
    a narrower batch up to it inside the model, a branch torch.export fixes when it traces), at
    most ``max_length``. The runtime pads every batch to at least this: the models ignore padding."""
    widest = max((m.kernel_size[0] for net in nets for m in net.modules() if isinstance(m, nn.Conv1d)), default=1)
    return min(int(widest), max_length)


def _input_signature(run: Run, axes: _Axes) -> _Signature:
    """The run's model input: float32 (2, *input_shape), or a text run's int64 ids (2, max_length)."""
    if axes.max_length is not None:
        ids = torch.ones(2, axes.max_length, dtype=torch.int64)  # id 1: a real token (0 pads)
        return _Signature((ids,), ({0: axes.batch, **({1: axes.tokens} if axes.tokens else {})},), [INPUT])
    return _Signature((torch.zeros(2, *run.data_info()["input_shape"]),), ({0: axes.batch},), [INPUT])


def _trunk_signature(trunk: nn.Module, sig: _Signature, axes: _Axes) -> tuple[_Signature, list[str]]:
    """What the parts on a shared trunk take (the trunk's output on ``sig``'s sample), and the
    trunk graph's output names: ``features``, or for a tuple (a text trunk: states and mask, or
    embeddings and lengths) ``features``, ``features_1``, ... fed to the parts' ``input``,
    ``input_1``, ... An axis of a trunk output that follows the row width is a token axis."""
    with torch.no_grad():
        h = trunk(*sig.sample)
        if not isinstance(h, tuple):
            return _Signature((h.float(),), ({0: axes.batch},), [INPUT]), [FEATURES]
        narrower = trunk(sig.sample[0][:, :-1]) if axes.tokens is not None else h
    dims = tuple({0: axes.batch, **{d: axes.tokens for d in range(1, t.ndim) if t.shape[d] != u.shape[d]}}
                 for t, u in zip(h, narrower))
    suffixes = [""] + [f"_{i}" for i in range(1, len(h))]
    return _Signature(tuple(h), dims, [INPUT + s for s in suffixes]), [FEATURES + s for s in suffixes]


def _export_graph(wrapper: nn.Module, sig: _Signature, path: Path, what: str, outputs: list[str]) -> None:
    """``wrapper`` (``softmax(net(x))``, or a trunk's output) on ``sig`` -> ``path`` (weights
    inside the file, or in data files beside it past protobuf's 2 GB limit), eval mode, on the
    CPU, the batch axis (and a text graph's token axes) dynamic."""
    shapes = torch.export.ShapesCollection()  # by tensor: whatever the structure of wrapper's forward
    for t, dims in zip(sig.sample, sig.axes):
        shapes[t] = dims
    try:
        with _quiet_exporter():
            program = torch.onnx.export(wrapper.eval(), sig.sample, None, dynamo=True, input_names=sig.names,
                                        output_names=outputs, dynamic_shapes=shapes.dynamic_shapes(wrapper, sig.sample),
                                        verbose=False)
            program.save(str(path))
    except Exception as exc:  # the exporter's own errors: an operator it cannot translate, say
        raise SpecialistsError(f"cannot export the {what} to ONNX ({one_line(exc)})") from None


def _graph_entry(run: Run, net: nn.Module, files, name: str, tmp: Path, what: str, arch: str, sig: _Signature,
                 output: str | list[str] = OUTPUT, input_shape: tuple | None = None) -> dict:
    """Export ``net`` to ``tmp/name`` and describe it (see the module doc's ``graph``): it takes
    ``sig``; ``output``: ``probs``, or a shared trunk's ``features`` (a list of names for a text
    trunk; then ``outputs`` is null); ``input_shape`` (an image or vector trunk and the parts on
    it) is recorded without the batch axis."""
    before = set(tmp.iterdir())
    path = tmp / name
    probs = output == OUTPUT
    wrapper = _Probs(net.eval()) if probs else _Features(net.eval())
    _export_graph(wrapper, sig, path, what, [output] if isinstance(output, str) else output)
    data = sorted(set(tmp.iterdir()) - before - {path})  # external data files, if any
    entry = {"file": name, "sha256": file_sha256(path),
             "external_data": [{"file": p.name, "sha256": file_sha256(p)} for p in data],
             "outputs": int(net.num_classes) if probs else None, "architecture": arch,
             "weights": run.rel(files.weights), "weights_sha256": file_sha256(files.weights)}
    if input_shape is not None:
        entry["input_shape"] = list(input_shape)
    if sig.names != [INPUT]:  # the parts on a text trunk: its outputs, in order
        entry["input"] = sig.names
    if not probs:
        entry["output"] = output
    return entry


def _common(run: Run, kind: str, model: str, num_outputs: int, tmp: Path, axes: _Axes) -> dict:
    info = run.data_info()
    text = info.get("layout") == TEXT_LAYOUT
    if text:
        pre = _text_preprocessing(run, info, tmp, axes.min_width)
    else:
        image = len(info["input_shape"]) == 3
        pre = {
            "input_shape": list(info["input_shape"]), "layout": "NCHW" if image else "ND",
            "raw_dtype": "uint8" if image else "float32",
            "channel_order": info.get("channel_order") or "features",
            "scale": info["scale"], "mean": list(info["mean"]), "std": list(info["std"]),
            "formula": "input = (raw / (1 / scale) - mean) / std, per " + ("channel" if image else "feature"),
        }
    exporter = {"specialists": __version__, "torch": torch.__version__, "onnx": onnx.__version__}
    if text:
        import tokenizers

        exporter["tokenizers"] = tokenizers.__version__
    return {
        "format": FORMAT, "format_version": TEXT_FORMAT_VERSION if text else FORMAT_VERSION,
        "kind": kind, "model": model,
        "input": ({"name": INPUT, "shape": [None, None], "dtype": "int64"} if text else
                  {"name": INPUT, "shape": [None, *info["input_shape"]], "dtype": "float32"}),
        "output": {"name": OUTPUT, "shape": [None, num_outputs], "dtype": "float32"},
        "preprocessing": pre,
        "class_names": list(info["class_names"]), "num_classes": int(info["num_classes"]),
        "source": {"run_dir": str(run.dir.resolve()), "data": run.cfg.data.name, "seed": run.cfg.seed},
        "exporter": exporter,
    }


def _text_preprocessing(run: Run, info: dict, tmp: Path, min_width: int) -> dict:
    """A text export's ``preprocessing`` (the run's encoding and the training batcher's padding,
    see :class:`~specialists.inference.onnx_runtime.TextPreprocessing`), with the run's
    ``tokenizer.json`` copied byte for byte into ``tmp`` and its sha256."""
    length = int(info["input_shape"][0])
    encoder = TextEncoder.from_json(info["tokenizer"], length, "the run's tokenizer.json")
    path = tmp / TOKENIZER_JSON
    try:
        shutil.copyfile(run.tokenizer_json, path)
    except OSError as exc:
        raise SpecialistsError(f"{run.tokenizer_json}: cannot copy the run's tokenizer "
                               f"({exc.strerror or one_line(exc)})") from None
    return {
        "input_shape": [length], "layout": TEXT_LAYOUT, "raw_dtype": "str",
        "tokenizer": {"file": TOKENIZER_JSON, "sha256": file_sha256(path)},
        "max_length": length, "vocab_size": int(encoder.vocab_size), "add_special_tokens": False,
        "id_shift": int(encoder.shift), "unknown_id": int(encoder.fallback),
        "pad_id": PAD_ID, "padding": "right", "width": "longest", "min_width": int(min_width),
        "formula": "ids = tokenizer.encode(text, add_special_tokens=False).ids[:max_length] + id_shift ([unknown_id] "
                   "for a text without tokens); a batch's rows padded on the right with pad_id to its longest "
                   "(at least min_width tokens)",
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


def _numpy(h):
    """A tensor, or a tuple of them (a text trunk's output), as numpy."""
    return tuple(t.numpy() for t in h) if isinstance(h, tuple) else h.numpy()


def _first(h):
    """The first row of a batch: an array, or a tuple of them."""
    return tuple(t[:1] for t in h) if isinstance(h, tuple) else h[:1]


def _diff(a, b) -> float:
    """:func:`_max_diff`, over the arrays of two tuples (a text trunk's outputs) too."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        ok = isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
        return max((_max_diff(u, v) for u, v in zip(a, b)), default=0.0) if ok else float("inf")
    return _max_diff(a, b)


def _raw_diff(served, torch_model, raw) -> float:
    """The largest |served - PyTorch| from raw inputs: images or vectors as one batch; texts as
    one batch and each probe text alone (:func:`_text_groups`: every row width)."""
    if isinstance(raw, list):
        return max(_max_diff(served.predict_proba(g), torch_model.predict_proba(g).numpy()) for g in _text_groups(raw))
    return _max_diff(served.predict_proba(raw.numpy()), torch_model.predict_proba(raw).numpy())


def _export_single(run: Run, model: str, pred: SingleModel, tmp: Path, raw, x, axes: _Axes) -> tuple[str, dict]:
    """``<model>.onnx`` + ``<model>.json`` in ``tmp``, verified: (the JSON's name, diffs)."""
    files = run.student if model == "student" else run.generalist
    arch = (student_model_config(run.cfg) if model == "student" else run.cfg.model).name
    name = f"{model}.onnx"
    meta = _common(run, "model", model, pred.num_classes, tmp, axes)
    meta["graph"] = _graph_entry(run, pred.model, files, name, tmp, model, arch, _input_signature(run, axes))
    json_path = tmp / f"{model}.json"
    write_json(json_path, meta)

    served = OnnxModel(json_path, threads=_threads())
    want = pred.predict_proba(x, normalized=True).numpy()
    diff = max(_max_diff(served.predict_proba(x.numpy(), normalized=True), want),
               _max_diff(served.predict_proba(x[:1].numpy(), normalized=True), want[:1]))
    if raw is not None:  # the JSON's preprocessing, from the raw inputs, against Predictor.preprocess
        diff = max(diff, _raw_diff(served, pred, raw))
    diffs = {name: diff}
    _finish_json(meta, json_path, tmp / name, diffs, len(x))
    return json_path.name, diffs


def _export_ensemble(run: Run, ens: SpecialistEnsemble, tmp: Path, raw, x, axes: _Axes) -> tuple[str, dict]:
    """``generalist.onnx``, ``specialist_NNN.onnx``, ``ensemble.json`` in ``tmp``, verified."""
    arch = run.cfg.model.name
    meta = _common(run, "ensemble", "ensemble", ens.num_classes, tmp, axes)
    xn = x.numpy()
    sig = _input_signature(run, axes)
    h, part_shape = x, None  # what the generalist's and the specialists' graphs take
    if ens.trunk is not None:  # shared trunk: its own graph, run once per batch by the runtime
        if meta["format_version"] == FORMAT_VERSION:
            meta["format_version"] = TRUNK_FORMAT_VERSION  # (a text export's version covers its trunk)
        with torch.no_grad():
            h = ens.trunk(x)
            h = h if isinstance(h, tuple) else h.float()
        trunk_sig, features = _trunk_signature(ens.trunk, sig, axes)
        text = axes.max_length is not None
        part_shape = None if text else tuple(h.shape[1:])
        meta["trunk"] = _graph_entry(run, ens.trunk, run.generalist, "trunk.onnx", tmp, "shared trunk", arch, sig,
                                     features if len(features) > 1 else features[0],
                                     None if text else tuple(x.shape[1:]))
        meta["trunk"]["branch"] = run.cfg.specialists.branch
        sig = trunk_sig
    meta["generalist"] = _graph_entry(run, ens.generalist_part, run.generalist, "generalist.onnx", tmp,
                                      "generalist", arch, sig, input_shape=part_shape)
    names = ens.class_names
    meta["specialists"] = []
    for sid, net, subset in zip(ens.ids, ens.specialists, ens.subsets):
        classes = subset.tolist()
        entry = _graph_entry(run, net, run.specialist(sid), f"specialist_{sid:03d}.onnx", tmp,
                             f"specialist {sid}", arch, sig, input_shape=part_shape)
        meta["specialists"].append({"id": sid, "classes": classes, "names": [names[c] for c in classes], **entry})
    meta["routing"] = {"mode": ens.routing, "top_n": ens.top_n, "gate": ens.gate}
    meta["combine"] = {"solver": "em", "max_iter": ens.max_iter, "tol": ens.tol}
    json_path = tmp / ENSEMBLE_JSON
    write_json(json_path, meta)

    # Each graph on its own, on every row (as routing=all would run it), batch and first row.
    diffs = {}
    hn = _numpy(h)
    if ens.trunk is not None:
        graph = OnnxGraph(tmp, meta["trunk"], _threads(), None, check=True)
        diffs["trunk.onnx"] = max(_diff(graph.run(xn), hn), _diff(graph.run(xn[:1]), _first(hn)))
    for entry, net in zip([meta["generalist"], *meta["specialists"]], [ens.generalist_part, *ens.specialists]):
        graph = OnnxGraph(tmp, entry, _threads(), None, check=True)
        with torch.no_grad():
            want = torch.softmax(tail_input(net, h).float(), 1).numpy()
        diffs[entry["file"]] = max(_max_diff(graph.run(hn), want), _max_diff(graph.run(_first(hn)), want[:1]))
    # The runtime as a whole: routing, the specialists on their rows, the numpy combination.
    served = OnnxEnsemble(tmp, threads=_threads())
    if raw is not None:
        diffs["ensemble"] = _raw_diff(served, ens, raw)
    else:  # a streamed data set keeps no raw test inputs: both from the normalized batch
        diffs["ensemble"] = _max_diff(served.predict_proba(xn, normalized=True),
                                      ens.predict_proba(x, normalized=True).numpy())
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
