"""Data from local files, all offline: ``digits``, ``npz`` and ``imagefolder``.

``digits``
    scikit-learn's bundled handwritten digits (1,797 images of 8x8, ten classes; shipped with
    the package, no download). Pixel values 0..16 are scaled to 0..255 uint8 (1x8x8) and a fixed
    stratified 20% (seed 0) is the test set, so the test set never moves with ``data.split_seed``.
    Default augmentation ``none``: the default 4-pixel crop padding would shift an 8x8 digit by
    half its width, and flips change digits' identity (``data.augment=crop
    data.crop_padding=1`` is a sensible opt-in).

``npz`` (``data.path``)
    Either one ``.npz`` file with ``x_train, y_train, x_test, y_test`` (optional
    ``y_train_coarse, y_test_coarse, class_names, coarse_names``), or a folder of shards with a
    ``meta.json``: shards ``train-*.npz`` / ``test-*.npz``
    (or the files listed in meta.json's ``train`` / ``test`` entries) each holding ``x, y`` and
    optionally ``y_coarse``; names from ``fine_names`` (or ``class_names``) and
    ``coarse_names``; ``fine_to_coarse`` supplies coarse labels when the shards have none.
    Images are uint8 (N, H, W, C) with C in {1, 3}, or (N, C, H, W) when that is unambiguous
    (a meta.json ``layout`` of ``NHWC``/``NCHW`` settles it); float arrays are vectors (N, D).
    Arrays are read with ``allow_pickle=False``: names must be stored as numpy unicode arrays.

``imagefolder`` (``data.path``)
    ``path/train/<class>/*`` and ``path/test/<class>/*`` (``val`` is accepted for ``test``), or
    one ``path/<class>/*`` tree, of which a fixed stratified 20% (seed 0) becomes the test set.
    Class names are the folder names, sorted. Images are read with PIL into memory as RGB, or
    as grayscale when every image is grayscale; ``data.resize`` resizes them all to a square,
    otherwise they must all have one size.

``npz`` and ``imagefolder`` default to ``crop_flip`` for 3-channel images and to ``crop`` for
1-channel ones (digits and characters: a flip changes what they are).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..core.layout import LayoutError, to_nchw
from ..errors import SpecialistsError, one_line
from .preprocess import WIDE_GREY_MODES, convert_image
from .registry import register
from .splits import stratified_split
from .types import RawData

TEST_FRACTION = 0.2  # digits and single-tree imagefolder: the held-out test share
TEST_SEED = 0  # fixed, so the test set does not depend on data.split_seed


def _augment_for(channels: int, height: int, width: int) -> str:
    """Default augmentation for images: crop + flip for colour, crop for grey (digits,
    characters); none below 16 pixels, where even a 1-pixel crop shifts a good share of the
    image (measured, an MLP on 8x8 digits: 97% test top-1 without, 90% with padding 1, 74% with 2)."""
    if min(height, width) < 16:
        return "none"
    return "crop_flip" if channels == 3 else "crop"


def _require_path(cfg, what: str) -> Path:
    if not cfg.path:
        raise SpecialistsError(f"data set '{cfg.name}' needs data.path ({what})")
    path = Path(os.path.expanduser(str(cfg.path)))
    if not path.exists():
        raise SpecialistsError(f"data.path '{path}' does not exist")
    return path


# --------------------------------------------------------------------------------------- digits


@register("digits", default_augment="none", description="scikit-learn's bundled 8x8 handwritten digits")
def load_digits(cfg) -> RawData:
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, TEST_FRACTION, TEST_SEED)
    return RawData(
        x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
        class_names=[str(i) for i in range(10)], num_classes=10,
    )


# ------------------------------------------------------------------------------------------ npz


def _open_npz(path: Path):
    """``np.load`` without pickles; anything that is not an .npz archive is a one-line error."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise SpecialistsError(f"{path}: cannot open ({one_line(e)})") from None
    if head.startswith(b"\x93NUMPY"):
        raise SpecialistsError(f"{path}: a single .npy array, not an .npz archive of named arrays")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise SpecialistsError(f"{path}: not an .npz file (not a zip archive of .npy arrays)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SpecialistsError(f"{path}: not a readable .npz file ({one_line(e)})") from None
    return z


def _get(z, key: str, path: Path) -> np.ndarray:
    try:
        return z[key]
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):  # object arrays need pickle: never allowed
            raise SpecialistsError(f"{path}: array '{key}' is an object array, which would need pickle; store "
                                   "strings as a numpy unicode array, e.g. np.array(names, dtype=str)") from None
        raise SpecialistsError(f"{path}: array '{key}' is corrupted ({one_line(e)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise SpecialistsError(f"{path}: array '{key}' is corrupted ({one_line(e)})") from None


def _names(a: Optional[np.ndarray], key: str, path) -> Optional[List[str]]:
    if a is None:
        return None
    a = np.asarray(a)
    if a.ndim != 1 or a.dtype.kind not in "US":
        raise SpecialistsError(f"{path}: '{key}' must be a 1-D array of strings, got {a.dtype} {a.shape}")
    return [s.decode() if isinstance(s, bytes) else str(s) for s in a.tolist()]


def _labels(y: np.ndarray, key: str, path, n: int) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise SpecialistsError(f"{path}: '{key}' must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != n:
        raise SpecialistsError(f"{path}: '{key}' has {len(y)} entries but the inputs have {n}")
    if len(y) and y.min() < 0:
        raise SpecialistsError(f"{path}: '{key}' has negative labels")
    return y.astype(np.int64, copy=False)


def _inputs(x: np.ndarray, key: str, path, layout: Optional[str] = None) -> np.ndarray:
    """uint8 images -> NCHW by the one layout rule (:func:`specialists.core.layout.to_nchw`;
    ``layout``: meta.json's, which settles an ambiguous shape); float -> (N, D)."""
    if x.dtype == np.uint8:
        try:
            return to_nchw(x, layout, settle="a folder of shards whose meta.json gives \"layout\": \"NHWC\" "
                                             "or \"NCHW\" settles it")
        except LayoutError as exc:
            raise SpecialistsError(f"{path}: '{key}': {exc}") from None
    if np.issubdtype(x.dtype, np.floating):
        if x.ndim != 2:
            raise SpecialistsError(f"{path}: '{key}' is a float array of shape {x.shape}; float inputs are "
                                   "vectors (N, D), images must be uint8")
        return x.astype(np.float32, copy=False)
    raise SpecialistsError(f"{path}: '{key}' has dtype {x.dtype}; inputs must be uint8 images or float vectors")


def _finish(x_tr, y_tr, x_te, y_te, yc_tr, yc_te, names, coarse_names, where) -> RawData:
    if x_tr.dtype != x_te.dtype or x_tr.shape[1:] != x_te.shape[1:]:
        raise SpecialistsError(f"{where}: train inputs {x_tr.dtype} {x_tr.shape[1:]} and test inputs "
                               f"{x_te.dtype} {x_te.shape[1:]} differ")
    if (yc_tr is None) != (yc_te is None):
        raise SpecialistsError(f"{where}: coarse labels are given for only one of train and test")
    num_classes = None
    if names is not None:
        num_classes = len(names)
        top = max(int(y_tr.max(initial=-1)), int(y_te.max(initial=-1)))
        if top >= num_classes:
            raise SpecialistsError(f"{where}: label {top} occurs but there are only {num_classes} class name(s)")
    if coarse_names is not None and yc_tr is not None:
        top = max(int(yc_tr.max(initial=-1)), int(yc_te.max(initial=-1)))
        if top >= len(coarse_names):
            raise SpecialistsError(f"{where}: coarse label {top} occurs but there are only {len(coarse_names)} coarse name(s)")
    image = x_tr.dtype == np.uint8
    channels = (1 if x_tr.ndim == 3 else x_tr.shape[1]) if image else 0
    return RawData(
        x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
        class_names=names, y_train_coarse=yc_tr, y_test_coarse=yc_te,
        coarse_names=coarse_names if yc_tr is not None else None,
        num_classes=num_classes,
        default_augment=_augment_for(channels, *x_tr.shape[-2:]) if image else None,
        layout="NCHW" if image else None,  # _inputs resolved it: build need not tell it again
    )


def _load_npz_file(path: Path) -> RawData:
    with _open_npz(path) as z:
        keys = set(z.files)
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in keys]
        if missing:
            raise SpecialistsError(f"{path}: missing {', '.join(missing)} (has: {', '.join(sorted(keys)) or 'nothing'})")
        x_tr = _inputs(_get(z, "x_train", path), "x_train", path)
        x_te = _inputs(_get(z, "x_test", path), "x_test", path)
        y_tr = _labels(_get(z, "y_train", path), "y_train", path, len(x_tr))
        y_te = _labels(_get(z, "y_test", path), "y_test", path, len(x_te))
        yc_tr = _labels(_get(z, "y_train_coarse", path), "y_train_coarse", path, len(x_tr)) if "y_train_coarse" in keys else None
        yc_te = _labels(_get(z, "y_test_coarse", path), "y_test_coarse", path, len(x_te)) if "y_test_coarse" in keys else None
        names = _names(_get(z, "class_names", path), "class_names", path) if "class_names" in keys else None
        coarse = _names(_get(z, "coarse_names", path), "coarse_names", path) if "coarse_names" in keys else None
    return _finish(x_tr, y_tr, x_te, y_te, yc_tr, yc_te, names, coarse, path)


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _shard_list(folder: Path, meta: dict, split: str) -> list[tuple[Path, Optional[int]]]:
    listed = meta.get(split)
    if listed is None:
        files = sorted(folder.glob(f"{split}-*.npz"), key=_natural_key)
        return [(f, None) for f in files]
    if not isinstance(listed, list):
        raise SpecialistsError(f"{folder / 'meta.json'}: '{split}' must be a list of shard files")
    out = []
    for item in listed:
        if isinstance(item, str):
            out.append((folder / item, None))
        elif isinstance(item, dict) and isinstance(item.get("file"), str):
            n = item.get("n")
            out.append((folder / item["file"], int(n) if n is not None else None))
        else:
            raise SpecialistsError(f"{folder / 'meta.json'}: each '{split}' entry must be a file name or "
                                   f"{{\"file\": ..., \"n\": ...}}, got {item!r}")
    return out


def _load_shards(folder: Path, meta: dict, split: str):
    shards = _shard_list(folder, meta, split)
    if not shards:
        raise SpecialistsError(f"{folder}: no {split} shards ({split}-*.npz files or a '{split}' list in meta.json)")
    layout = meta.get("layout")
    xs, ys, ycs = [], [], []
    for f, n in shards:
        if not f.is_file():
            raise SpecialistsError(f"{f}: shard listed in meta.json is missing")
        with _open_npz(f) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise SpecialistsError(f"{f}: missing {', '.join(missing)} (has: {', '.join(sorted(z.files)) or 'nothing'})")
            x = _inputs(_get(z, "x", f), "x", f, layout)
            y = _labels(_get(z, "y", f), "y", f, len(x))
            yc = _labels(_get(z, "y_coarse", f), "y_coarse", f, len(x)) if "y_coarse" in z.files else None
        if n is not None and n != len(x):
            raise SpecialistsError(f"{f}: holds {len(x)} examples but meta.json says {n}")
        if xs and (x.dtype != xs[0].dtype or x.shape[1:] != xs[0].shape[1:]):
            raise SpecialistsError(f"{f}: inputs {x.dtype} {x.shape[1:]} differ from the first shard's "
                                   f"{xs[0].dtype} {xs[0].shape[1:]}")
        if xs and (yc is None) != (ycs[0] is None):
            raise SpecialistsError(f"{f}: y_coarse is in some shards but not in others")
        xs.append(x), ys.append(y), ycs.append(yc)
    x = xs[0] if len(xs) == 1 else np.concatenate(xs)
    del xs
    y = np.concatenate(ys)
    yc = None if ycs[0] is None else np.concatenate(ycs)
    return x, y, yc


def _load_npz_folder(folder: Path) -> RawData:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise SpecialistsError(f"{folder}: a folder of npz shards needs a meta.json (or point data.path at one .npz file)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecialistsError(f"{meta_path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(meta, dict):
        raise SpecialistsError(f"{meta_path}: must hold a JSON object")
    x_tr, y_tr, yc_tr = _load_shards(folder, meta, "train")
    x_te, y_te, yc_te = _load_shards(folder, meta, "test")
    raw_names = meta.get("fine_names", meta.get("class_names"))
    names = _names(np.asarray(raw_names), "fine_names", meta_path) if raw_names is not None else None
    coarse = _names(np.asarray(meta["coarse_names"]), "coarse_names", meta_path) if meta.get("coarse_names") is not None else None
    f2c = meta.get("fine_to_coarse")
    if f2c is not None and yc_tr is None and yc_te is None:
        f2c = np.asarray(f2c)
        if f2c.ndim != 1 or not np.issubdtype(f2c.dtype, np.integer) or (len(f2c) and f2c.min() < 0):
            raise SpecialistsError(f"{meta_path}: 'fine_to_coarse' must be a list of non-negative integers")
        top = max(int(y_tr.max(initial=-1)), int(y_te.max(initial=-1)))
        if top >= len(f2c):
            raise SpecialistsError(f"{meta_path}: 'fine_to_coarse' has {len(f2c)} entries but label {top} occurs")
        yc_tr, yc_te = f2c[y_tr].astype(np.int64), f2c[y_te].astype(np.int64)
    return _finish(x_tr, y_tr, x_te, y_te, yc_tr, yc_te, names, coarse, folder)


@register("npz", needs_path=True, description="arrays from one .npz file or a folder of .npz shards with meta.json")
def load_npz(cfg) -> RawData:
    path = _require_path(cfg, "one .npz file or a folder of shards with meta.json")
    if path.is_dir():
        return _load_npz_folder(path)
    return _load_npz_file(path)


# ---------------------------------------------------------------------------------- imagefolder

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
GRAY_MODES = ("1", "L", "LA", *WIDE_GREY_MODES)


def _class_dirs(root: Path) -> List[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(d: Path) -> List[Path]:
    return sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                  and not f.name.startswith("."))


def _scan_tree(root: Path, classes: List[str], require_all: bool):
    files, labels = [], []
    for i, c in enumerate(classes):
        d = root / c
        found = _image_files(d) if d.is_dir() else []
        if not found and require_all:
            raise SpecialistsError(f"{d}: class folder has no images ({', '.join(IMG_EXTENSIONS)})")
        files += found
        labels += [i] * len(found)
    return files, np.asarray(labels, np.int64)


def _headers(files: List[Path]) -> tuple[list, list]:
    """Every image's colour mode and (W, H), from its header alone (nothing decoded)."""
    from PIL import Image, UnidentifiedImageError

    modes, sizes = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                modes.append(im.mode)
                sizes.append(im.size)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise SpecialistsError(f"{f}: cannot read image ({one_line(e)})") from None
    return modes, sizes


def open_image(path, mode: str):
    """One image file in ``mode`` (``RGB`` or ``L``), decoded as inference decodes it
    (:func:`~specialists.data.preprocess.convert_image`: wide grayscale scaled to 0..255)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return convert_image(im, mode)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise SpecialistsError(f"{path}: cannot read image ({one_line(e)})") from None


class FileSource:
    """Image files, read when asked (a streamed split): ``image(i)`` is a PIL image in ``mode``."""

    def __init__(self, files: list, mode: str):
        self.files, self.mode = [str(f) for f in files], mode

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int):
        return open_image(self.files[i], self.mode)


def _decode(files: List[Path], sizes: list, mode: str, channels: int, resize: Optional[int]) -> np.ndarray:
    """Every image decoded into one uint8 array (N, C, H, W), resized to a square when asked."""
    from PIL import Image

    if resize:
        w = h = int(resize)
    else:
        w, h = sizes[0]
        for f, size in zip(files, sizes):
            if size != (w, h):
                raise SpecialistsError(f"{f}: image is {size[0]}x{size[1]} but {files[0].name} is {w}x{h}; "
                                       "set data.resize=N to resize all images to NxN")
    out = np.empty((len(files), h, w, channels), np.uint8)
    for i, f in enumerate(files):
        im = open_image(f, mode)
        if resize and im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        out[i] = np.asarray(im, dtype=np.uint8).reshape(h, w, channels)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # NCHW


@register("imagefolder", needs_path=True, description="an ImageFolder tree: path/train/<class>/*, path/test/<class>/*")
def load_imagefolder(cfg) -> RawData:
    root = _require_path(cfg, "a folder: path/train/<class>/* and path/test/<class>/*, or path/<class>/*")
    if not root.is_dir():
        raise SpecialistsError(f"{root}: imagefolder data.path must be a folder of class folders")
    test_dir = next((root / t for t in ("test", "val") if (root / t).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = _class_dirs(root / "train")
        if not classes:
            raise SpecialistsError(f"{root / 'train'}: no class folders (expected train/<class>/<image>)")
        extra = sorted(set(_class_dirs(test_dir)) - set(classes))
        if extra:
            raise SpecialistsError(f"{test_dir}: class folder(s) {', '.join(extra)} are not in {root / 'train'}")
        f_tr, y_tr = _scan_tree(root / "train", classes, require_all=True)
        f_te, y_te = _scan_tree(test_dir, classes, require_all=False)
        if not f_te:
            raise SpecialistsError(f"{test_dir}: no test images")
    else:
        classes = _class_dirs(root)
        if not classes:
            raise SpecialistsError(f"{root}: no class folders (expected <class>/<image> or train/ and test/)")
        files, y = _scan_tree(root, classes, require_all=True)
        if min(np.bincount(y, minlength=len(classes))) < 2:
            c = classes[int(np.argmin(np.bincount(y, minlength=len(classes))))]
            raise SpecialistsError(f"{root / c}: needs at least 2 images to hold one out for testing")
        tr, te = stratified_split(y, TEST_FRACTION, TEST_SEED)
        f_tr, y_tr, f_te, y_te = [files[i] for i in tr], y[tr], [files[i] for i in te], y[te]
    modes, sizes = _headers(f_tr + f_te)
    mode, channels = ("L", 1) if all(m in GRAY_MODES for m in modes) else ("RGB", 3)
    side = int(cfg.resize) if cfg.resize else min(min(wh) for wh in sizes)

    def decode(resize):
        x = _decode(f_tr + f_te, sizes, mode, channels, resize)
        return x[: len(f_tr)], x[len(f_tr):]

    return RawData(
        x_train=None, y_train=y_tr, x_test=None, y_test=y_te,
        class_names=classes, num_classes=len(classes),
        default_augment=_augment_for(channels, side, side),
        train_source=FileSource(f_tr, mode), test_source=FileSource(f_te, mode),
        channels=channels, sizes=sizes, decode=decode, layout="NCHW",  # what decode returns
    )
