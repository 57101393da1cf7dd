"""Serving an exported run with onnxruntime and numpy: no torch at serving time.

``specialists export RUN_DIR`` (:mod:`specialists.inference.export`) writes ONNX graphs and,
beside them, the JSON that says how to feed them and read them::

    from specialists.inference.onnx_runtime import OnnxEnsemble, OnnxModel
    student = OnnxModel("RUN_DIR/export/student.json")   # or the .onnx, or the folder
    p = student.predict_proba(x)                         # (N, C) float32 numpy
    ens = OnnxEnsemble("RUN_DIR/export")                 # generalist + specialists + EM
    q = ens.predict_proba(x)                             # (N, C) float32, as SpecialistEnsemble

Inputs ``x`` are raw, as for :class:`~specialists.inference.Predictor`: uint8 images
(N, H, W, C) or (N, C, H, W) with the run's channel count (or one image, or (N, H, W) for one
channel), or float vectors (N, D); they are normalized in numpy with the JSON's numbers, the
same arithmetic as :class:`~specialists.data.Preprocessing` (float32 ``(x / (1 / scale) - mean)
/ std``). ``normalized=True`` takes already-normalized float32 (N, *input_shape).

Every graph takes ``input`` (N, *input_shape) float32 with a dynamic batch axis and returns
``probs`` (N, outputs) float32. The ensemble routes with the generalist's top-n classes, runs
each specialist on the rows that activate it, and combines with
:mod:`specialists.core.combine_numpy` (the same minimizer as the torch solver).

An ensemble whose specialists share the generalist's trunk (``specialists.branch``; format
version 2) has a ``trunk.onnx`` (``input`` -> ``features``), run once per batch; its
generalist's and specialists' graphs take those features instead of the inputs.

Each graph file is checked against the sha256 its JSON records before it is loaded, so a
folder whose files come from two different exports is refused in one line instead of served.
The JSON itself is checked against its schema (:func:`schema_problem`) as it is read: a missing
key, a wrong type or numbers that do not fit one another (a mean of 2 values for 3 channels)
are one line too.
This module imports numpy and onnxruntime only (and the project's torch-free modules).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..core.combine_numpy import ROUTINGS, combine, membership, route
from ..errors import SpecialistsError

__all__ = ["FEATURES", "FORMAT", "FORMAT_VERSION", "INPUT", "TRUNK_FORMAT_VERSION", "OUTPUT", "NumpyPreprocessing", "OnnxEnsemble", "OnnxGraph",
           "OnnxModel"]

FORMAT = "specialists-onnx"  # the "format" of every JSON an export writes
FORMAT_VERSION = 1
# an ensemble whose specialists share the generalist's trunk (``trunk.onnx``, run once per
# batch): a runtime that knows only version 1 would feed raw inputs to the parts, so it refuses
TRUNK_FORMAT_VERSION = 2
INPUT, OUTPUT = "input", "probs"  # every graph's input and output names
FEATURES = "features"  # a shared trunk's output name
ENSEMBLE_JSON = "ensemble.json"
SINGLE_MODELS = ("student", "generalist")  # <model>.json of a single-model export, the folder's choice in this order


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file (as :func:`specialists.rundir.io.file_sha256`, which imports torch)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def read_export_json(path: Path) -> dict:
    """An export's JSON, checked to be one (a missing or foreign file is one line)."""
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SpecialistsError(f"missing file: {path}") from None
    except (OSError, ValueError) as exc:
        raise SpecialistsError(f"{path}: not a readable export description ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SpecialistsError(f"{path}: not a `specialists export` description (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version") not in (FORMAT_VERSION, TRUNK_FORMAT_VERSION):
        raise SpecialistsError(f"{path}: export format version {meta.get('format_version')} is not "
                               f"{FORMAT_VERSION} or {TRUNK_FORMAT_VERSION}: export the run again with this version")
    why = schema_problem(meta)
    if why:
        raise SpecialistsError(f"{path}: not a valid export description ({why}): export the run again")
    return meta


def _int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _numbers(v, n: int | None = None) -> bool:
    """A list of finite numbers (of length ``n`` when given)."""
    return (isinstance(v, list) and (n is None or len(v) == n) and
            all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in v))


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _file_problem(entry, key: str) -> str | None:
    """Why ``entry`` is not ``{"file": a name in the export's folder, "sha256": hex}``, or None."""
    if not isinstance(entry, dict):
        return f"'{key}' must be an object"
    name = entry.get("file")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        return f"'{key}.file' must be a file name in the export's folder, got {name!r}"
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        return f"'{key}.sha256' must be a sha256 in hex"
    return None


def _graph_problem(entry, key: str, outputs: int | None) -> str | None:
    """Why ``entry`` is not a graph of ``outputs`` probabilities (None: a trunk's features; see
    the export's module doc), or None."""
    why = _file_problem(entry, key)
    if why:
        return why
    extra = entry.get("external_data")
    if not isinstance(extra, list):
        return f"'{key}.external_data' must be a list"
    for i, d in enumerate(extra):
        why = _file_problem(d, f"{key}.external_data[{i}]")
        if why:
            return why
    if outputs is not None and entry.get("outputs") != outputs:
        return f"'{key}.outputs' must be {outputs}, got {entry.get('outputs')!r}"
    return None


def schema_problem(meta: dict) -> str | None:
    """The first way an export's JSON departs from its schema (the keys serving reads, their
    types, and that their sizes agree: ``mean``/``std`` one value per channel or feature,
    ``class_names`` one per class, each graph's ``outputs``), or None when it follows it."""
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        return "no 'preprocessing' object"
    shape = pre.get("input_shape")
    if not isinstance(shape, list) or len(shape) not in (1, 3) or not all(_int(s, 1) for s in shape):
        return f"'preprocessing.input_shape' must be [C, H, W] or [D] of positive integers, got {shape!r}"
    unit = "channel" if len(shape) == 3 else "feature"
    if not _numbers([pre.get("scale")]) or pre["scale"] <= 0:
        return f"'preprocessing.scale' must be a positive number, got {pre.get('scale')!r}"
    for key in ("mean", "std"):
        if not _numbers(pre.get(key), shape[0]):
            return f"'preprocessing.{key}' must be {shape[0]} numbers (one per {unit}), got {pre.get(key)!r}"
    if min(pre["std"]) <= 0:
        return "'preprocessing.std' must be positive"
    num_classes, names = meta.get("num_classes"), meta.get("class_names")
    if not _int(num_classes, 2):
        return f"'num_classes' must be an integer >= 2, got {num_classes!r}"
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        return f"'class_names' must be {num_classes} strings"
    if meta.get("kind") == "model":
        return _graph_problem(meta.get("graph"), "graph", num_classes)
    if meta.get("kind") != "ensemble":
        return f"'kind' must be 'model' or 'ensemble', got {meta.get('kind')!r}"
    why = (meta.get("trunk") and _graph_problem(meta["trunk"], "trunk", None)) or \
        _graph_problem(meta.get("generalist"), "generalist", num_classes)
    if why:
        return why
    specs = meta.get("specialists")
    if not isinstance(specs, list):
        return "'specialists' must be a list"
    for i, e in enumerate(specs):
        key = f"specialists[{i}]"
        classes = e.get("classes") if isinstance(e, dict) else None
        if (not isinstance(classes, list) or not classes or not all(_int(c, 0) and c < num_classes for c in classes)
                or len(set(classes)) != len(classes)):
            return f"'{key}.classes' must be distinct class ids in 0..{num_classes - 1}"
        if not _int(e.get("id"), 0):
            return f"'{key}.id' must be an integer >= 0"
        why = _graph_problem(e, key, len(classes) + 1)
        if why:
            return why
    routing, comb = meta.get("routing"), meta.get("combine")
    if not isinstance(routing, dict) or routing.get("mode") not in ROUTINGS or not _int(routing.get("top_n"), 1):
        return f"'routing' must be {{\"mode\": one of {', '.join(ROUTINGS)}, \"top_n\": an integer >= 1}}"
    if not isinstance(comb, dict) or not _int(comb.get("max_iter"), 0) or not _numbers([comb.get("tol")]) \
            or comb["tol"] < 0:
        return "'combine' must be {\"max_iter\": an integer >= 0, \"tol\": a number >= 0}"
    return None


class NumpyPreprocessing:
    """Raw inputs -> normalized float32 (N, *input_shape), in numpy.

    ``info``: an export JSON's ``preprocessing`` (the run's ``data.json`` numbers). The same
    layouts and the same float32 operations, in the same order, as
    :class:`specialists.data.Preprocessing`, so the results are equal bit for bit.
    """

    def __init__(self, info: dict):
        self.input_shape = tuple(int(s) for s in info["input_shape"])
        self.is_image = len(self.input_shape) == 3
        self.divisor = 1.0 / float(info["scale"])  # divide, as training does (not multiply by scale)
        shape = (1, -1, 1, 1) if self.is_image else (1, -1)
        self.mean = np.asarray(info["mean"], dtype=np.float32).reshape(shape)
        self.std = np.asarray(info["std"], dtype=np.float32).reshape(shape)

    def to_batch(self, x) -> np.ndarray:
        """Raw input -> (N, C, H, W) or (N, D) in raw units (shapes as ``Preprocessing.to_batch``)."""
        x = np.asarray(x)
        if not self.is_image:
            x = x.reshape(len(x), -1)
            if x.shape[1] != self.input_shape[0]:
                raise SpecialistsError(f"expected vectors of {self.input_shape[0]} features, got {x.shape[1]}")
            return x
        c, h, w = self.input_shape
        if x.ndim == 3:
            x = x[None] if x.shape in ((c, h, w), (h, w, c)) else x[:, None]
        if x.ndim == 4 and x.shape[1:] == (h, w, c) and x.shape[1:] != (c, h, w):
            x = x.transpose(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[1:] != (c, h, w):
            raise SpecialistsError(f"expected images of shape (N, {h}, {w}, {c}) or (N, {c}, {h}, {w}), "
                                   f"got {tuple(x.shape)}")
        return x

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """A raw batch in the stored layout -> float32 ``(x / divisor - mean) / std``."""
        x = x.astype(np.float32)
        if self.divisor != 1.0:
            x = x / np.float32(self.divisor)
        return np.ascontiguousarray((x - self.mean) / self.std)

    def __call__(self, x) -> np.ndarray:
        return self.normalize(self.to_batch(x))


class OnnxGraph:
    """One graph of an export, described by ``entry`` (a JSON's ``graph``, ``trunk``,
    ``generalist`` or one of its ``specialists``): ``run(x)`` (B, *input_shape) float32 ->
    (B, outputs) float32 probabilities, or a trunk's (B, *features) float32 (``outputs`` None)."""

    def __init__(self, folder: Path, entry: dict, threads: int | None, providers: Sequence[str] | None,
                 check: bool):
        self.path = folder / entry["file"]
        self.output = entry.get("output", OUTPUT)
        self.outputs = int(entry["outputs"]) if self.output == OUTPUT else None
        files = [(self.path, entry["sha256"])] + [(folder / d["file"], d["sha256"]) for d in entry["external_data"]]
        for path, sha in files:
            if not path.is_file():
                raise SpecialistsError(f"missing file: {path} (listed by the export's JSON)")
            if check and file_sha256(path) != sha:
                raise SpecialistsError(f"{path} is not the file its export's JSON describes (sha256 differs): "
                                       "export the run again")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=list(providers or
                                                                                     ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime's own errors (a damaged graph, an unknown provider)
            raise SpecialistsError(f"{self.path}: onnxruntime cannot load it ({' '.join(str(exc).split())})") from None

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {INPUT: x})[0]


class _Served:
    """What every served export shares: the preprocessing, batching and class names."""

    def __init__(self, meta: dict, batch_size: int):
        self.meta = meta
        self.batch_size = batch_size
        self.class_names: list[str] = list(meta["class_names"])
        self.num_classes: int = int(meta["num_classes"])
        self.preprocessing = NumpyPreprocessing(meta["preprocessing"])
        self.input_shape = self.preprocessing.input_shape

    def preprocess(self, x, normalized: bool = False) -> np.ndarray:
        """Raw inputs (see the module doc) -> normalized float32 (N, *input_shape); with
        ``normalized``, ``x`` already is (only converted and checked)."""
        if not normalized:
            return self.preprocessing(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise SpecialistsError(f"expected normalized inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                                   f"got {x.shape}")
        return x

    def proba(self, x: np.ndarray) -> np.ndarray:
        """One normalized batch (B, *input_shape) float32 -> probabilities (B, C) float32."""
        raise NotImplementedError

    def predict_proba(self, x, normalized: bool = False) -> np.ndarray:
        """Probabilities (N, C) float32, in chunks of ``batch_size``."""
        out = [self.proba(self.preprocess(x[i:i + self.batch_size], normalized))
               for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def predict(self, x, normalized: bool = False) -> np.ndarray:
        """Class ids (N,) int64."""
        return self.predict_proba(x, normalized).argmax(1)


class OnnxModel(_Served):
    """One exported model (the student or the generalist) served by onnxruntime.

    ``path``: its ``<model>.json``, its ``.onnx`` (the JSON beside it), or an export folder
    (its ``student.json``, else its ``generalist.json``). ``threads``: onnxruntime's intra-op
    threads (None: its default); ``providers``: onnxruntime execution providers (default CPU);
    ``check``: refuse a graph whose sha256 differs from the JSON's.
    """

    def __init__(self, path, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 check: bool = True, batch_size: int = 1024):
        path = Path(path)
        if path.is_dir():
            found = [path / f"{m}.json" for m in SINGLE_MODELS if (path / f"{m}.json").is_file()]
            if not found:
                raise SpecialistsError(f"{path} holds no exported single model ({', '.join(SINGLE_MODELS)}.json): "
                                       "run `specialists export RUN_DIR` first")
            path = found[0]
        elif path.suffix == ".onnx":
            path = path.with_suffix(".json")
        meta = read_export_json(path)
        if meta.get("kind") != "model":
            raise SpecialistsError(f"{path}: describes an export of kind '{meta.get('kind')}', not one model "
                                   "(serve an ensemble with OnnxEnsemble)")
        super().__init__(meta, batch_size)
        self.model = meta["model"]
        self.graph = OnnxGraph(path.parent, meta["graph"], threads, providers, check)

    def proba(self, x: np.ndarray) -> np.ndarray:
        return self.graph.run(x)


class OnnxEnsemble(_Served):
    """An exported ensemble (``ensemble.json`` and its graphs) served by onnxruntime + numpy EM.

    ``predict_proba(x)`` computes what :meth:`SpecialistEnsemble.predict_proba` does: the
    generalist's probabilities, the active specialists of each example (``routing``/``top_n``
    of the JSON), each specialist on the rows it is active for, and the KL-minimizing
    combination (``combine.max_iter``, ``combine.tol``). ``path``: the export folder or its
    ``ensemble.json``; the other arguments as for :class:`OnnxModel`.
    """

    def __init__(self, path, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 check: bool = True, batch_size: int = 1024):
        path = Path(path)
        if path.is_dir():
            path = path / ENSEMBLE_JSON
        meta = read_export_json(path)
        if meta.get("kind") != "ensemble":
            raise SpecialistsError(f"{path}: describes an export of kind '{meta.get('kind')}', not an ensemble")
        super().__init__(meta, batch_size)
        folder = path.parent
        # shared trunk (specialists.branch): one pass per batch; the parts take its features
        self.trunk = OnnxGraph(folder, meta["trunk"], threads, providers, check) if meta.get("trunk") else None
        self.generalist = OnnxGraph(folder, meta["generalist"], threads, providers, check)
        entries = meta["specialists"]
        self.ids = [int(e["id"]) for e in entries]
        self.subsets = [np.asarray(e["classes"], dtype=np.int64) for e in entries]
        self.specialists = [OnnxGraph(folder, e, threads, providers, check) for e in entries]
        self.routing, self.top_n = meta["routing"]["mode"], int(meta["routing"]["top_n"])
        self.max_iter, self.tol = int(meta["combine"]["max_iter"]), float(meta["combine"]["tol"])
        self.membership = membership(self.subsets, self.num_classes)  # (M, C)

    def components(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Normalized batch (B, ...) -> (p_general (B, C), [p_m (B, |S_m| + 1)], active (B, M));
        rows a specialist did not run on hold zeros (ignored by the combination). With a shared
        trunk, the trunk runs once and the generalist and each specialist take its features."""
        if self.trunk is not None:
            x = self.trunk.run(x)
        p_g = self.generalist.run(x)
        active = route(p_g, self.membership, self.top_n, self.routing)
        p_specs = []
        for m, graph in enumerate(self.specialists):
            out = np.zeros((len(x), graph.outputs), np.float32)
            rows = np.flatnonzero(active[:, m])
            if rows.size:
                out[rows] = graph.run(x if rows.size == len(x) else np.ascontiguousarray(x[rows]))
            p_specs.append(out)
        return p_g, p_specs, active

    def proba(self, x: np.ndarray) -> np.ndarray:
        p_g, p_specs, active = self.components(x)
        if not self.specialists:
            return p_g
        return combine(p_g, self.subsets, p_specs, active, max_iter=self.max_iter, tol=self.tol)
