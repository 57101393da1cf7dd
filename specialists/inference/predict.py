"""``specialists predict RUN_DIR FILE [FILE ...] [--text TEXT ...]``: classify image files,
``.npy`` arrays, and for a text run texts (``--text``, ``.txt`` files of one text per line,
``.jsonl`` files of ``{"text": ...}`` objects or JSON strings).

Every file is answered on its own: a file that cannot be read, is not an image, or has the
wrong shape gets one ``error: FILE: reason`` line on stderr and the other files are still
answered. The exit status is 0 when every file was answered, 2 otherwise (as for any bad
input; a bad run directory stops before any file, also with 2). Image files larger than
PIL's ``Image.MAX_IMAGE_PIXELS`` (89 million pixels) are refused without being decoded.

Inputs, for a run on images of shape (C, H, W):

- image files PIL reads (PNG, JPEG, BMP, GIF, TIFF, WebP, ...), decoded as training decodes
  them (16-bit greys scaled to 0..255), converted to the run's channels (RGB or L) and resized
  (bilinear) to H x W when they differ, with a note;
- ``.npy`` arrays (loaded with ``allow_pickle=False``) in the data set's raw units (0..255 for
  images): one example (H, W, C), (C, H, W), or (H, W) for one channel, or a batch (N, ...)
  of them; for a run on vectors of D features, (D,) or (N, D).

Inputs far outside the training data (pixels outside 0..255, features far from the training
mean) are still answered, with one warning on stderr the first time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..data.preprocess import convert_image
from ..errors import SpecialistsError, one_line
from .ensemble import SpecialistEnsemble
from .predictor import SingleModel, Student

MODELS = ("ensemble", "student", "generalist")


class FileError(Exception):
    """One file could not be answered (reported as one line; the others go on)."""


def load_predictor(run_dir, model: str = "ensemble", device: str = "auto", verify: bool = True):
    """The run's ensemble, student or generalist (raises SpecialistsError for a bad run, or
    for a file changed since it was written unless ``verify`` is False)."""
    if model == "ensemble":
        return SpecialistEnsemble.from_run(run_dir, device=device, verify=verify)
    if model == "student":
        return Student.from_run(run_dir, device=device, verify=verify)
    if model == "generalist":
        return SingleModel.generalist_from_run(run_dir, device=device, verify=verify)
    raise SpecialistsError(f"--model must be one of {', '.join(MODELS)}, got '{model}'")


def _read_image(path: Path, input_shape: tuple) -> tuple[np.ndarray, list[str]]:
    """An image file -> uint8 (1, H, W, C) at the run's size and channels, and notes."""
    from PIL import Image, UnidentifiedImageError

    if len(input_shape) != 3:
        raise FileError(f"this run classifies vectors of {input_shape[0]} features; give a .npy array")
    c, h, w = input_shape
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{im.size[0]}x{im.size[1]} pixels")
            im.load()
            img = convert_image(im, "RGB" if c == 3 else "L")  # as training decodes image files
    except UnidentifiedImageError:
        raise FileError("not an image PIL can read, nor a .npy array") from None
    except Image.DecompressionBombError as exc:
        raise FileError(f"image too large to read ({one_line(exc)}; the limit is {Image.MAX_IMAGE_PIXELS:,} "
                        "pixels)") from None
    except (OSError, ValueError) as exc:  # truncated or corrupt image data
        raise FileError(f"unreadable image ({one_line(exc)})") from None
    notes = []
    if img.size != (w, h):
        notes.append(f"resized from {img.size[0]}x{img.size[1]} to {w}x{h} (the run's input size)")
        img = img.resize((w, h), Image.BILINEAR)
    a = np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    return (a[None, :, :, None] if a.ndim == 2 else a[None]), notes


def _read_npy(path: Path, input_shape: tuple) -> np.ndarray:
    """A ``.npy`` array -> a batch (N, ...) of raw inputs in a shape the predictor takes."""
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays (would need pickle), or not a .npy file
        raise FileError(f"not a readable .npy array ({one_line(exc)})") from None
    except OSError as exc:
        raise FileError(f"unreadable ({one_line(exc)})") from None
    if not isinstance(a, np.ndarray) or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise FileError(f"expected a numeric array, got dtype {getattr(a, 'dtype', type(a).__name__)}")
    if a.size and not np.isfinite(a).all():
        raise FileError("the array holds NaN or infinite values")
    if len(input_shape) == 3:
        c, h, w = input_shape
        single = {(h, w, c), (c, h, w)} | ({(h, w)} if c == 1 else set())
        if a.shape in single:
            a = a[None]
        elif a.ndim == 3 and c == 1 and a.shape[1:] == (h, w):
            a = a[:, None]  # a batch of single-channel (H, W) images
        if a.ndim != 4 or a.shape[1:] not in ((h, w, c), (c, h, w)):
            raise FileError(f"shape {a.shape} is not an image of shape ({h}, {w}, {c}) or ({c}, {h}, {w}), "
                            "nor a batch of them")
    else:
        (d,) = input_shape
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[1] != d:
            raise FileError(f"shape {a.shape} is not a vector of {d} features, nor a batch (N, {d})")
    if len(a) == 0:
        raise FileError("the array holds no examples")
    return a


TEXT_SUFFIXES = (".txt", ".jsonl")


def read_inputs(path, input_shape: tuple, text: bool = False) -> tuple:
    """One file -> (raw batch (N, ...) or a list of texts, notes). Raises FileError with a
    one-line reason."""
    from ..data.text import read_texts

    path = Path(path)
    if not path.exists():
        raise FileError("no such file")
    if path.is_dir():
        raise FileError("is a folder, not a file")
    if text != (path.suffix.lower() in TEXT_SUFFIXES):
        raise FileError("this run classifies texts: give --text, .txt or .jsonl files" if text else
                        f"a text file, but this run classifies {'images' if len(input_shape) == 3 else 'vectors'}")
    if text:
        try:
            return read_texts(path), []
        except SpecialistsError as exc:
            raise FileError(str(exc).removeprefix(f"{path}: ")) from None
    with open(path, "rb") as f:
        magic = f.read(6)
    if path.suffix.lower() == ".npy" or magic == b"\x93NUMPY":
        return _read_npy(path, input_shape), []
    return _read_image(path, input_shape)


def _top_lines(probs: list[tuple[int, str, float]]) -> list[str]:
    return [f"  {i + 1}. {name} (class {c}): {p:.4f}" for i, (c, name, p) in enumerate(probs)]


def _path_lines(ex: dict) -> list[str]:
    """A soft tree's answer for one example (:meth:`Student.explain`): its leaf's top classes,
    then each decision on the most probable path."""
    lines = _top_lines([(t["class"], t["name"], t["prob"]) for t in ex["leaf_top"]])
    lines.append(f"  path to leaf {ex['leaf']} (path probability {ex['path_prob']:.4f}):")
    lines += [f"    depth {d['depth']}, node {d['node']}: p(right) = {d['p_right']:.4f} -> {d['turn']}"
              for d in ex["decisions"]]
    m = ex["mixture_top"][0]
    lines.append(f"  whole tree's mixture: {m['name']} {m['prob']:.4f}")
    return lines


def describe(predictor, x: np.ndarray, top_k: int, explain: bool = False) -> list[list[str]]:
    """Per example of the raw batch ``x``: the lines that answer it (top-k classes with names
    and probabilities; for the ensemble, which specialists spoke; ``explain`` with a soft-tree
    student: the path of decisions)."""
    k = max(1, min(top_k, predictor.num_classes))
    if len(x) > predictor.batch_size:  # a large .npy batch: answer it in chunks
        return [a for i in range(0, len(x), predictor.batch_size)
                for a in describe(predictor, x[i:i + predictor.batch_size], top_k, explain)]
    if explain:
        return [_path_lines(ex) for ex in predictor.explain(x, k=k)]
    out = []
    if isinstance(predictor, SpecialistEnsemble):
        for ex in predictor.explain(x, k=k):
            lines = _top_lines([(t["class"], t["name"], t["prob"]) for t in ex["ensemble"]])
            if ex["specialists"]:
                for s in ex["specialists"]:
                    best = s["top"][0]
                    lines.append(f"  specialist {s['id']} spoke (|S|={s['size']}): top {best['name']} {best['prob']:.4f}, "
                                 f"dustbin {s['dustbin']:.4f}")
            else:
                lines.append("  no specialist spoke: the generalist's answer")
            g = ex["generalist"][0]
            lines.append(f"  generalist alone: {g['name']} {g['prob']:.4f}")
            out.append(lines)
        return out
    probs = predictor.predict_proba(x).float().cpu()
    v, i = probs.topk(k, dim=1)
    names = predictor.class_names
    for pv, iv in zip(v.tolist(), i.tolist()):
        out.append(_top_lines([(c, names[c], p) for p, c in zip(pv, iv)]))
    return out


def predict_files(run_dir, files, model: str = "ensemble", top_k: int = 5, device: str = "auto",
                  verify: bool = True, explain: bool = False, texts=()) -> int:
    """Answer every file and every text of ``texts`` (stdout), one ``error: FILE: reason`` line
    per bad file (stderr).

    Returns 0 when every file was answered, else 2. A bad run directory raises
    SpecialistsError (status 2 from the CLI).
    """
    if top_k < 1:
        raise SpecialistsError(f"--top-k must be >= 1, got {top_k}")
    if explain and model != "student":
        raise SpecialistsError("--explain reads a soft-tree student's path: use it with --model student")
    predictor = load_predictor(run_dir, model, device, verify)  # once, for all files
    if explain:
        _ = predictor.tree  # a neural student has no path: say so once, before any file
    shape, is_text = tuple(predictor.input_shape), predictor.preprocessing.is_text
    failed = 0
    if texts and not is_text:
        print(f"error: --text: this run classifies {'images' if len(shape) == 3 else 'vectors'}, not texts",
              file=sys.stderr)
        failed, texts = 1, ()
    for j, t in enumerate(texts):
        if not t.strip():
            print(f"error: --text {j + 1}: the text is empty", file=sys.stderr)
            failed += 1
            continue
        with torch.inference_mode():
            (lines,) = describe(predictor, [t], top_k, explain)
        print(f"--text {j + 1} ({t if len(t) <= 60 else t[:57] + '...'}):")
        print("\n".join(lines))
    for f in files:
        try:
            x, notes = read_inputs(f, shape, is_text)
            with torch.inference_mode():
                answers = describe(predictor, x, top_k, explain)
        except (FileError, SpecialistsError) as exc:
            print(f"error: {f}: {exc}", file=sys.stderr)
            failed += 1
            continue
        except OSError as exc:  # e.g. a file we may not read
            print(f"error: {f}: cannot read ({exc.strerror or one_line(exc)})", file=sys.stderr)
            failed += 1
            continue
        for n in notes:
            print(f"note: {f}: {n}")
        for j, lines in enumerate(answers):
            print(f"{f}:" if len(answers) == 1 else f"{f}[{j}]:")
            print("\n".join(lines))
        sys.stdout.flush()
    return 2 if failed else 0
