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

A text run's export (format version 3) serves strings: ``predict_proba(["a text", ...])``.
They are tokenized with the export's own ``tokenizer.json`` (the ``tokenizers`` library, no
torch) exactly as training encoded them: no special tokens, at most ``max_length`` tokens,
ids shifted by ``id_shift``, a text without tokens as ``[unknown_id]``; each batch is padded on
the right with ``pad_id`` to its longest row (at least ``min_width``), as the training batcher
cuts its batches, and the graphs take int64 ids (N, L') with a dynamic token axis: the models
mask the padding themselves. ``normalized=True`` takes such ids. A text trunk's output is
several tensors (``features``, ``features_1``, ...), which its parts take by the same names.

Each graph file is checked against the sha256 its JSON records before it is loaded, so a
folder whose files come from two different exports is refused in one line instead of served
(a text export's ``tokenizer.json`` too, always: a changed tokenizer would give other ids).
The JSON itself is checked against its schema (:func:`schema_problem`) as it is read: a missing
key, a wrong type or numbers that do not fit one another (a mean of 2 values for 3 channels)
are one line too.
This module imports numpy and onnxruntime only (and the project's torch-free modules; a text
export's ``tokenizers``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..core.combine_numpy import ROUTINGS, combine, membership, route
from ..core.digest import file_sha256
from ..core.layout import LayoutError, raw_batch
from ..errors import SpecialistsError

__all__ = ["FEATURES", "FORMAT", "FORMAT_VERSION", "INPUT", "TEXT_FORMAT_VERSION", "TEXT_LAYOUT", "TOKENIZER_JSON",
           "TRUNK_FORMAT_VERSION", "OUTPUT", "NumpyPreprocessing", "OnnxEnsemble", "OnnxGraph", "OnnxModel",
           "TextPreprocessing"]

FORMAT = "specialists-onnx"  # the "format" of every JSON an export writes
FORMAT_VERSION = 1
# an ensemble whose specialists share the generalist's trunk (``trunk.onnx``, run once per
# batch): a runtime that knows only version 1 would feed raw inputs to the parts, so it refuses
TRUNK_FORMAT_VERSION = 2
# a text run's export: token-id graphs and the run's tokenizer.json (a runtime that knows only
# versions 1 and 2 would feed them float arrays, so it refuses)
TEXT_FORMAT_VERSION = 3
VERSIONS = (FORMAT_VERSION, TRUNK_FORMAT_VERSION, TEXT_FORMAT_VERSION)
TEXT_LAYOUT = "NL"  # a text export's preprocessing.layout (specialists.data.TEXT_LAYOUT, which imports torch)
TOKENIZER_JSON = "tokenizer.json"  # a text export's tokenizer, beside its JSON
INPUT, OUTPUT = "input", "probs"  # every graph's input and output names
FEATURES = "features"  # a shared trunk's output name
ENSEMBLE_JSON = "ensemble.json"
SINGLE_MODELS = ("student", "generalist")  # <model>.json of a single-model export, the folder's choice in this order


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
    if meta.get("format_version") not in VERSIONS:
        raise SpecialistsError(f"{path}: export format version {meta.get('format_version')} is not one of "
                               f"{', '.join(map(str, VERSIONS))}: export the run again with this version")
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


def io_names(value, default: str) -> list[str] | None:
    """A graph entry's ``input`` or ``output`` (absent: ``default``; a name, or a list of names
    for a text trunk's several tensors) as a list of names, or None when it is neither."""
    value = default if value is None else value
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        return None
    return names


def _graph_problem(entry, key: str, outputs: int | None, inputs: int = 1) -> str | None:
    """Why ``entry`` is not a graph of ``inputs`` tensors (its ``input`` names) to ``outputs``
    probabilities (None: a trunk's features; see the export's module doc), or None."""
    why = _file_problem(entry, key)
    if why:
        return why
    names = io_names(entry.get("input"), INPUT)
    if names is None or len(names) != inputs:
        return f"'{key}.input' must be {inputs} distinct name{'s' if inputs > 1 else ''}, got {entry.get('input')!r}"
    if io_names(entry.get("output"), OUTPUT if outputs is not None else FEATURES) is None:
        return f"'{key}.output' must be a name or a list of distinct names, got {entry.get('output')!r}"
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
    ``class_names`` one per class, each graph's ``outputs``, the parts' inputs one per trunk
    output; a text export's tokenizer, ids and padding), or None when it follows it."""
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        return "no 'preprocessing' object"
    text = pre.get("layout") == TEXT_LAYOUT
    if text != (meta.get("format_version") == TEXT_FORMAT_VERSION):
        return (f"format version {meta.get('format_version')} with preprocessing.layout {pre.get('layout')!r} "
                f"(a text export, layout {TEXT_LAYOUT!r}, is version {TEXT_FORMAT_VERSION}, and only it)")
    why = _text_problem(pre) if text else _numeric_problem(pre)
    if why:
        return why
    num_classes, names = meta.get("num_classes"), meta.get("class_names")
    if not _int(num_classes, 2):
        return f"'num_classes' must be an integer >= 2, got {num_classes!r}"
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        return f"'class_names' must be {num_classes} strings"
    if meta.get("kind") == "model":
        return _graph_problem(meta.get("graph"), "graph", num_classes)
    if meta.get("kind") != "ensemble":
        return f"'kind' must be 'model' or 'ensemble', got {meta.get('kind')!r}"
    trunk = meta.get("trunk")
    why = trunk and _graph_problem(trunk, "trunk", None)
    if why:
        return why
    # the parts take the trunk's outputs, in order (the inputs themselves without a trunk)
    inputs = len(io_names(trunk.get("output"), FEATURES)) if trunk else 1
    why = _graph_problem(meta.get("generalist"), "generalist", num_classes, inputs)
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
        why = _graph_problem(e, key, len(classes) + 1, inputs)
        if why:
            return why
    routing, comb = meta.get("routing"), meta.get("combine")
    if not isinstance(routing, dict) or routing.get("mode") not in ROUTINGS or not _int(routing.get("top_n"), 1):
        return f"'routing' must be {{\"mode\": one of {', '.join(ROUTINGS)}, \"top_n\": an integer >= 1}}"
    gate = routing.get("gate")
    if gate is not None and not (_numbers([gate]) and 0 < gate <= 1):
        return "'routing.gate' must be null or a number in (0, 1]"
    if not isinstance(comb, dict) or not _int(comb.get("max_iter"), 0) or not _numbers([comb.get("tol")]) \
            or comb["tol"] < 0:
        return "'combine' must be {\"max_iter\": an integer >= 0, \"tol\": a number >= 0}"
    return None


def _numeric_problem(pre: dict) -> str | None:
    """Why an image or vector export's ``preprocessing`` is not its schema, or None."""
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
    return None


def _text_problem(pre: dict) -> str | None:
    """Why a text export's ``preprocessing`` is not its schema (the encoding and padding
    :class:`TextPreprocessing` applies, and nothing else), or None."""
    shape, length = pre.get("input_shape"), pre.get("max_length")
    if not isinstance(shape, list) or len(shape) != 1 or not _int(shape[0], 1) or length != shape[0]:
        return f"'preprocessing.input_shape' must be [max_length] and max_length a positive integer, got " \
               f"{shape!r} and {length!r}"
    why = _file_problem(pre.get("tokenizer"), "preprocessing.tokenizer")
    if why:
        return why
    vocab = pre.get("vocab_size")
    if not _int(vocab, 2):
        return f"'preprocessing.vocab_size' must be an integer >= 2, got {vocab!r}"
    for key, low, high in (("pad_id", 0, vocab - 1), ("id_shift", 0, 1), ("unknown_id", 0, vocab - 1),
                           ("min_width", 1, length)):
        if not _int(pre.get(key), low) or pre[key] > high:
            return f"'preprocessing.{key}' must be an integer in {low}..{high}, got {pre.get(key)!r}"
    if pre.get("padding") != "right" or pre.get("width") != "longest" or pre.get("add_special_tokens") is not False:
        return ("'preprocessing' must pad on the right (\"padding\": \"right\") to each batch's longest row "
                "(\"width\": \"longest\"), without special tokens (\"add_special_tokens\": false)")
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

    def to_batch(self, x, layout: str | None = None) -> np.ndarray:
        """Raw input -> (N, C, H, W) or (N, D) in raw units: :func:`specialists.core.layout.raw_batch`,
        which ``Preprocessing.to_batch`` calls too (so both accept the same shapes)."""
        try:
            return raw_batch(x, self.input_shape, layout)
        except LayoutError as exc:
            raise SpecialistsError(str(exc)) from None

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """A raw batch in the stored layout -> float32 ``(x / divisor - mean) / std``."""
        x = x.astype(np.float32)
        if self.divisor != 1.0:
            x = x / np.float32(self.divisor)
        return np.ascontiguousarray((x - self.mean) / self.std)

    def __call__(self, x) -> np.ndarray:
        return self.normalize(self.to_batch(x))


class TextPreprocessing:
    """Texts -> int64 token ids (N, L'), as the run's training batches held them, in numpy.

    ``info``: a text export JSON's ``preprocessing``; ``folder``: where its ``tokenizer.json``
    lies, checked against the recorded sha256 before it is loaded (a changed tokenizer gives
    other ids). The steps of :meth:`specialists.data.TextEncoder.encode` and of the training
    batcher: the ``tokenizers`` tokenizer without special tokens, truncated to ``max_length``
    tokens; ids + ``id_shift``; a text without tokens -> ``[unknown_id]``; every row padded on
    the right with ``pad_id`` to the batch's longest row, and to at least ``min_width``. (The
    models ignore padding: the width changes nothing, and ``min_width`` lets a graph traced on
    rows as wide as its widest convolution window take shorter texts.)
    """

    def __init__(self, info: dict, folder: Path):
        path = folder / info["tokenizer"]["file"]
        if not path.is_file():
            raise SpecialistsError(f"missing file: {path} (the tokenizer the export's JSON lists): copy it from the "
                                   "export, or export the run again")
        if file_sha256(path) != info["tokenizer"]["sha256"]:
            raise SpecialistsError(f"{path} is not the tokenizer its export's JSON describes (sha256 differs): "
                                   "export the run again")
        from tokenizers import Tokenizer  # the one dependency of a text export beyond onnxruntime (no torch)

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise SpecialistsError(f"{path}: not a tokenizer.json of the tokenizers library "
                                   f"({' '.join(str(exc).split())})") from None
        self.max_length, self.min_width = int(info["max_length"]), int(info["min_width"])
        self.input_shape = (self.max_length,)
        self.pad_id, self.shift, self.unknown_id = int(info["pad_id"]), int(info["id_shift"]), int(info["unknown_id"])
        self.vocab_size = int(info["vocab_size"])
        self.tokenizer.no_padding()  # padding is ours, per batch
        self.tokenizer.enable_truncation(self.max_length)

    @staticmethod
    def texts(x) -> list[str]:
        """A string or a sequence of strings -> a list of them; anything else is one line."""
        if isinstance(x, str):
            return [x]
        if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.ndim == 1):
            bad = next((i for i, t in enumerate(x) if not isinstance(t, str)), None)
            if bad is None:
                return [str(t) for t in x]
            raise SpecialistsError(f"a text model takes texts (a string or a list of strings): item {bad} is not a "
                                   f"string ({type(x[bad]).__name__})")
        what = f"an array of {x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise SpecialistsError(f"a text model takes texts (a string or a list of strings), got {what} (token ids: "
                               "predict_proba(ids, normalized=True))")

    def encode(self, texts: list[str]) -> np.ndarray:
        """Texts -> int64 (N, max(longest row, min_width)) ids, padded on the right."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        rows = [np.asarray(e.ids, np.int64) + self.shift if e.ids else np.asarray([self.unknown_id], np.int64)
                for e in encodings]
        out = np.full((len(rows), max([self.min_width, *map(len, rows)])), self.pad_id, np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    def ids(self, x) -> np.ndarray:
        """Token ids already encoded, int (N, L' <= max_length) -> int64, padded to ``min_width``."""
        x = np.asarray(x)
        if x.ndim != 2 or x.dtype.kind not in "iu" or x.shape[1] > self.max_length:
            raise SpecialistsError(f"expected token ids (N, L <= {self.max_length}) int, got {x.dtype} {x.shape}")
        if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise SpecialistsError(f"token ids must be in 0..{self.vocab_size - 1} ({self.pad_id} pads)")
        if x.shape[1] < self.min_width:
            x = np.pad(x, ((0, 0), (0, self.min_width - x.shape[1])), constant_values=self.pad_id)
        return np.ascontiguousarray(x, dtype=np.int64)

    def __call__(self, x) -> np.ndarray:
        return self.encode(self.texts(x))


def _rows(x, rows: np.ndarray):
    """Rows ``rows`` of a batch: an array, or a tuple of arrays batched on axis 0 (a text trunk's output)."""
    return tuple(np.ascontiguousarray(a[rows]) for a in x) if isinstance(x, tuple) else np.ascontiguousarray(x[rows])


class OnnxGraph:
    """One graph of an export, described by ``entry`` (a JSON's ``graph``, ``trunk``,
    ``generalist`` or one of its ``specialists``): ``run(x)`` (B, *input_shape) float32 (a text
    graph: int64 ids (B, L')) -> (B, outputs) float32 probabilities, or a trunk's (B, *features)
    float32 (``outputs`` None). A text trunk's output is a tuple of arrays (``output`` a list of
    names), and its parts take such a tuple, fed to their ``input`` names in order."""

    def __init__(self, folder: Path, entry: dict, threads: int | None, providers: Sequence[str] | None,
                 check: bool):
        self.path = folder / entry["file"]
        self.inputs = io_names(entry.get("input"), INPUT)
        self.output = io_names(entry.get("output"), OUTPUT)
        self.several = isinstance(entry.get("output"), list)  # a tuple out, even of one array
        self.outputs = int(entry["outputs"]) if self.output == [OUTPUT] else None
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

    def run(self, x):
        """An array (or a tuple of arrays, one per ``input``) -> an array (a tuple for several outputs)."""
        out = self.session.run(self.output, dict(zip(self.inputs, x if isinstance(x, tuple) else (x,))))
        return tuple(out) if self.several else out[0]


class _Served:
    """What every served export shares: the preprocessing, batching and class names."""

    def __init__(self, meta: dict, batch_size: int, folder: Path):
        self.meta = meta
        self.batch_size = batch_size
        self.class_names: list[str] = list(meta["class_names"])
        self.num_classes: int = int(meta["num_classes"])
        pre = meta["preprocessing"]
        self.text = TextPreprocessing(pre, folder) if pre.get("layout") == TEXT_LAYOUT else None
        self.preprocessing = self.text or NumpyPreprocessing(pre)
        self.input_shape = self.preprocessing.input_shape

    def preprocess(self, x, normalized: bool = False) -> np.ndarray:
        """Raw inputs (see the module doc) -> normalized float32 (N, *input_shape); with
        ``normalized``, ``x`` already is (only converted and checked). A text export: texts ->
        int64 ids (N, L'); with ``normalized``, ``x`` are such ids."""
        if self.text is not None:
            return self.text.ids(x) if normalized else self.text(x)
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
        if self.text is not None and not normalized:
            x = self.text.texts(x)  # one string is one text: chunks of texts, not of characters
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
        super().__init__(meta, batch_size, path.parent)
        self.model = meta["model"]
        self.graph = OnnxGraph(path.parent, meta["graph"], threads, providers, check)

    def proba(self, x: np.ndarray) -> np.ndarray:
        return self.graph.run(x)


class OnnxEnsemble(_Served):
    """An exported ensemble (``ensemble.json`` and its graphs) served by onnxruntime + numpy EM.

    ``predict_proba(x)`` computes what :meth:`SpecialistEnsemble.predict_proba` does: the
    generalist's probabilities, the active specialists of each example (``routing``'s ``mode``,
    ``top_n`` and ``gate`` in the JSON), each specialist on the rows it is active for, and the KL-minimizing
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
        super().__init__(meta, batch_size, path.parent)
        folder = path.parent
        # shared trunk (specialists.branch): one pass per batch; the parts take its features
        self.trunk = OnnxGraph(folder, meta["trunk"], threads, providers, check) if meta.get("trunk") else None
        self.generalist = OnnxGraph(folder, meta["generalist"], threads, providers, check)
        entries = meta["specialists"]
        self.ids = [int(e["id"]) for e in entries]
        self.subsets = [np.asarray(e["classes"], dtype=np.int64) for e in entries]
        self.specialists = [OnnxGraph(folder, e, threads, providers, check) for e in entries]
        self.routing, self.top_n = meta["routing"]["mode"], int(meta["routing"]["top_n"])
        self.gate = meta["routing"].get("gate")  # absent before the gate existed: every example
        self.max_iter, self.tol = int(meta["combine"]["max_iter"]), float(meta["combine"]["tol"])
        self.membership = membership(self.subsets, self.num_classes)  # (M, C)

    def components(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Normalized batch (B, ...) -> (p_general (B, C), [p_m (B, |S_m| + 1)], active (B, M));
        rows a specialist did not run on hold zeros (ignored by the combination). With a shared
        trunk, the trunk runs once and the generalist and each specialist take its features
        (a text trunk's: a tuple of arrays)."""
        n = len(x)
        if self.trunk is not None:
            x = self.trunk.run(x)
        p_g = self.generalist.run(x)
        active = route(p_g, self.membership, self.top_n, self.routing, self.gate)
        p_specs = []
        for m, graph in enumerate(self.specialists):
            out = np.zeros((n, graph.outputs), np.float32)
            rows = np.flatnonzero(active[:, m])
            if rows.size:
                out[rows] = graph.run(x if rows.size == n else _rows(x, rows))
            p_specs.append(out)
        return p_g, p_specs, active

    def proba(self, x: np.ndarray) -> np.ndarray:
        p_g, p_specs, active = self.components(x)
        if not self.specialists:
            return p_g
        return combine(p_g, self.subsets, p_specs, active, max_iter=self.max_iter, tol=self.tol)
