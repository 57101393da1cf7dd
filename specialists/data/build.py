"""``build_dataset``: a registry entry's :class:`~specialists.data.types.RawData` -> a
:class:`~specialists.data.types.Dataset`.

It chooses the storage (memory or stream, ``data.storage``), carves the seeded, stratified
validation split, applies ``data.max_train``, builds a text data set's tokenizer, and computes
the normalization that :meth:`Dataset.preprocessing` records for inference.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core.layout import LayoutError, to_nchw
from ..device import agree, is_main
from ..errors import SpecialistsError
from .registry import DATASETS, DatasetEntry
from .splits import stratified_split
from .types import Dataset, RawData, Split

log = logging.getLogger("specialists")


def _to_images(x: np.ndarray, where: str, layout: Optional[str] = None) -> np.ndarray:
    """uint8 images to NCHW by the one layout rule (:func:`specialists.core.layout.to_nchw`):
    ``layout`` (the loader's ``RawData.layout``) when known, else NHWC or NCHW when the shape
    tells which, or NHW; an ambiguous shape is one line."""
    try:
        return to_nchw(x, layout, settle="the loader must give RawData.layout (NHWC or NCHW)")
    except LayoutError as exc:
        raise SpecialistsError(f"{where}: {exc}") from None


def _check_labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise SpecialistsError(f"{where}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise SpecialistsError(f"{where}: negative labels")
    return y.astype(np.int64)


def _sparse_labels(y_train: np.ndarray, y_test: np.ndarray, remap: bool, where: str):
    """Labels without class names must be the ids 0..C-1. One far above the distinct labels is
    likely a typo and is refused; ``remap`` renumbers the distinct labels 0..K-1 instead (in
    order), the original ids becoming the class names. Returns (y_train, y_test, names|None)."""
    distinct = np.unique(np.concatenate([y_train, y_test]))
    top = int(distinct[-1]) + 1
    if remap:
        lookup = {int(v): i for i, v in enumerate(distinct)}
        renumber = np.vectorize(lookup.__getitem__, otypes=[np.int64])
        return renumber(y_train), renumber(y_test), [str(int(v)) for v in distinct]
    if top > 2 * len(distinct):
        raise SpecialistsError(
            f"{where}: label {top - 1} is far above the {len(distinct)} distinct labels (a typo?): without class "
            f"names, labels are the class ids 0..C-1, so it would make {top} classes; set data.remap_labels=true "
            "to renumber the distinct labels 0..K-1 (the original ids become the class names)")
    return y_train, y_test, None


def _check_finite(x: np.ndarray, where: str, chunk: int = 65536) -> None:
    for start in range(0, len(x), chunk):
        bad = ~np.isfinite(x[start:start + chunk])
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise SpecialistsError(f"{where}: row {start + row}, feature {col} is {x[start + row, col]} "
                                   "(inputs must be finite numbers)")


def _check_every_class_trains(y_train: np.ndarray, y_test: np.ndarray, num_classes: int, names, where: str) -> None:
    """Every class needs training examples: a class the generalist never sees cannot be learnt
    (and its specialist would report nonsense)."""
    empty = np.flatnonzero(np.bincount(y_train, minlength=num_classes) == 0)
    if len(empty):
        c = int(empty[0])
        in_test = int((y_test == c).sum())
        name = f" ({names[c]})" if names is not None else ""
        more = f"; so have {len(empty) - 1} other classes" if len(empty) > 1 else ""
        only_test = f", only {in_test} test examples" if in_test else ""
        raise SpecialistsError(f"{where}: class {c}{name} has no training examples{only_test}{more} "
                               "(every class needs some; check the labels, or data.max_train)")


def image_stats(x: torch.Tensor) -> tuple[list, list]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units: the normalization
    of both storages."""
    xf = x.float().div_(255)
    return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


# Loading into memory peaks at about this many times the decoded bytes: the decoded, transposed
# and split copies of the uint8 array, and the float32 copy the normalization statistics take.
MEMORY_PEAK = 6


def _storage(data_cfg, raw: RawData, is_image: bool, where: str) -> str:
    """``data.storage`` resolved: memory when loading the decoded splits fits the budget (and
    they can be decoded at one size), else stream."""
    want = data_cfg.storage
    if not is_image:
        if want == "stream":
            raise SpecialistsError(f"{where}: vectors are always held in memory (data.storage=stream is for images)")
        return "memory"
    if raw.x_train is not None:
        nbytes = raw.x_train.nbytes + raw.x_test.nbytes
        one_size = True
    else:
        sizes = raw.sizes or []
        one_size = bool(sizes) and (data_cfg.resize is not None or len(set(sizes)) == 1) and raw.decode is not None
        side = data_cfg.resize
        pixels = sum((side * side) if side else w * h for w, h in sizes) if sizes else float("inf")
        nbytes = pixels * (raw.channels or 3)
    fits = one_size and nbytes * MEMORY_PEAK <= data_cfg.memory_budget_gb * 2**30
    if want == "memory" and raw.decode is None and raw.x_train is None:
        raise SpecialistsError(f"{where}: its images are read one by one; use data.storage=stream (or auto)")
    if want == "auto":
        want = "memory" if fits else "stream"
        log.info("data: %s storage (the decoded splits take %.2f GB, %.2f GB at the peak of loading; "
                 "data.memory_budget_gb=%g)", want, nbytes / 2**30, nbytes * MEMORY_PEAK / 2**30,
                 data_cfg.memory_budget_gb)
    return want


def _resolution(data_cfg, raw: RawData, hint: Optional[int], where: str) -> int:
    """A streamed image's side: data.resize, else the model's declared size, else the images'."""
    if data_cfg.resize:
        return int(data_cfg.resize)
    if hint:
        return int(hint)
    if raw.sizes:
        sizes = raw.sizes
    elif raw.x_train is not None:
        sizes = [tuple(raw.x_train.shape[-1:-3:-1])]
    else:  # a user's data set: its first image speaks for all (set data.resize when they differ)
        from .stream import presets

        sizes = [tuple(presets(1, "none")[1].transforms[0](raw.train_source.image(0)).shape[-1:-3:-1])]
    if len(set(sizes)) == 1 and sizes[0][0] == sizes[0][1]:
        return int(sizes[0][0])
    raise SpecialistsError(f"{where}: the images are not all one square size; set data.resize=N")


def build_dataset(data_cfg, resolution_hint: Optional[int] = None, saved_tokenizer: Optional[tuple] = None) -> Dataset:
    """Load ``data_cfg.name`` through the registry and return train/val/test splits, held in
    memory or streamed (``data.storage``). ``resolution_hint``: the input size a model declares
    (a streamed data set's resolution when ``data.resize`` is not set). ``saved_tokenizer``:
    ``(tokenizer_source, tokenizer JSON)`` a run saved: reused when the source is unchanged."""
    entry = _entry(data_cfg)
    raw: RawData = entry.loader(data_cfg)
    where = f"data set '{data_cfg.name}'"
    lazy = raw.x_train is None
    y_train, y_test, names, num_classes = _classes(data_cfg, raw, where)
    if raw.kind == "text":
        return _text_dataset(data_cfg, raw, where, y_train, y_test, names, num_classes, saved_tokenizer)

    is_image = lazy or raw.x_train.dtype == np.uint8
    storage = _storage(data_cfg, raw, is_image, where)
    if storage == "memory" and lazy:
        raw.x_train, raw.x_test = raw.decode(data_cfg.resize)
    if storage == "memory":
        if is_image:
            x_train, x_test = _to_images(raw.x_train, where, raw.layout), _to_images(raw.x_test, where, raw.layout)
        else:
            x_train = np.asarray(raw.x_train, np.float32).reshape(len(y_train), -1)
            x_test = np.asarray(raw.x_test, np.float32).reshape(len(y_test), -1)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise SpecialistsError(f"{where}: train and test inputs differ in shape ({x_train.shape[1:]} vs "
                                   f"{x_test.shape[1:]})")
        if not is_image:
            for split, x in (("x_train", x_train), ("x_test", x_test)):
                _check_finite(x, f"{where} {split}")
    else:
        from .stream import ArraySource

        train_source = raw.train_source or ArraySource(_to_images(raw.x_train, where, raw.layout))
        test_source = raw.test_source or ArraySource(_to_images(raw.x_test, where, raw.layout))

    tr_idx, va_idx = _train_val(data_cfg, raw, y_train, y_test, names, num_classes, where)
    fine_to_coarse = _fine_to_coarse(raw, y_train, y_test, num_classes, where)

    streamed = storage == "stream"
    xs = (None, None) if streamed else (x_train, x_test)
    srcs = (train_source, test_source) if streamed else (None, None)
    train = _split(xs[0], srcs[0], y_train, tr_idx, raw.y_train_coarse)
    val = _split(xs[0], srcs[0], y_train, va_idx, raw.y_train_coarse)
    test = _split(xs[1], srcs[1], y_test, np.arange(len(y_test)), raw.y_test_coarse)

    augment = data_cfg.augment
    if augment == "auto":
        augment = (raw.default_augment or entry.default_augment) if is_image else "none"
    # Normalization from the training split only (never from test).
    if streamed:
        side = _resolution(data_cfg, raw, resolution_hint, where)
        mean, std = _stream_stats(train, side, augment, data_cfg.split_seed)
        input_shape = (int(_channels(raw, train)), side, side)
    elif is_image:
        mean, std = image_stats(train.x)
        input_shape = tuple(x_train.shape[1:])
    else:
        # float64: a float32 variance overflows for features above ~1e19 (std inf, inputs NaN)
        mean = train.x.double().mean(0).tolist()
        std = train.x.double().std(0).clamp_min(1e-6).tolist()
        input_shape = tuple(x_train.shape[1:])
    names = names if names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise SpecialistsError(f"{where}: {len(names)} class names for {num_classes} classes")
    return Dataset(
        name=data_cfg.name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        class_names=names,
        input_shape=input_shape,
        mean=mean,
        std=std,
        augment=augment,
        crop_padding=data_cfg.crop_padding,
        coarse_names=list(raw.coarse_names) if raw.coarse_names is not None else None,
        fine_to_coarse=fine_to_coarse,
        storage=storage,
        workers=int(data_cfg.workers) if streamed else 0,
    )


def _classes(data_cfg, raw: RawData, where: str) -> tuple:
    """The checked labels and classes: ``(y_train, y_test, names or None, num_classes)``."""
    y_train = _check_labels(raw.y_train, where + " y_train")
    y_test = _check_labels(raw.y_test, where + " y_test")
    lazy = raw.x_train is None
    n_train = len(raw.train_source) if lazy else len(raw.x_train)
    n_test = len(raw.test_source) if lazy else len(raw.x_test)
    if n_train != len(y_train) or n_test != len(y_test):
        raise SpecialistsError(f"{where}: x and y have different lengths")
    if len(y_train) < 2 or len(y_test) < 1:
        raise SpecialistsError(f"{where}: too few examples (train {len(y_train)}, test {len(y_test)})")
    names = list(raw.class_names) if raw.class_names is not None else None
    if raw.num_classes is None and names is None:
        y_train, y_test, names = _sparse_labels(y_train, y_test, bool(getattr(data_cfg, "remap_labels", False)), where)
    num_classes = raw.num_classes or (len(names) if names is not None else int(max(y_train.max(), y_test.max())) + 1)
    if max(y_train.max(), y_test.max()) >= num_classes:
        raise SpecialistsError(f"{where}: a label is >= the number of classes ({num_classes})")
    if num_classes < 2:
        raise SpecialistsError(f"{where}: only one class; a classifier needs at least two")
    return y_train, y_test, names, num_classes


def _train_val(data_cfg, raw: RawData, y_train, y_test, names, num_classes: int, where: str) -> tuple:
    """Rows of the source training set that are the train and the val split: ``raw.val_rows``
    when the loader names them, else a seeded stratified ``data.val_fraction``; after
    ``data.max_train``'s seeded subsample (which keeps the source order)."""
    order = np.arange(len(y_train))
    if data_cfg.max_train is not None and data_cfg.max_train < len(y_train):
        # a seeded, class-balanced-in-expectation subsample that keeps the source order
        rng = np.random.default_rng(data_cfg.split_seed + 1)
        order = np.sort(rng.choice(len(y_train), data_cfg.max_train, replace=False))
    if raw.val_rows is not None:
        is_val = np.zeros(len(y_train), bool)
        is_val[raw.val_rows] = True
        tr_idx, va_idx = order[~is_val[order]], order[is_val[order]]
    else:
        tr_idx, va_idx = stratified_split(y_train[order], data_cfg.val_fraction, data_cfg.split_seed)
        tr_idx, va_idx = order[tr_idx], order[va_idx]
    # checked on the final training split: every subsample and split above can empty a class
    _check_every_class_trains(y_train[tr_idx], y_test, num_classes, names, where)
    return tr_idx, va_idx


def _fine_to_coarse(raw: RawData, y_train, y_test, num_classes: int, where: str) -> Optional[list]:
    if raw.y_train_coarse is None:
        return None
    mapping = np.full(num_classes, -1, np.int64)
    mapping[y_train] = _check_labels(raw.y_train_coarse, where + " y_train_coarse")
    if raw.y_test_coarse is not None:
        mapping[y_test] = _check_labels(raw.y_test_coarse, where + " y_test_coarse")
    return mapping.tolist()


def _split(x, source, y, idx, coarse, text=None) -> Split:
    from .stream import Subset

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return Split(
        x=t(x[idx]) if x is not None else None,
        y=t(y[idx]),
        y_coarse=None if coarse is None else t(np.asarray(coarse, np.int64)[idx]),
        index=t(np.asarray(idx, np.int64)),
        source=Subset(source, idx) if source is not None else None,
        text=[text[i] for i in idx.tolist()] if text is not None else None,
    )


def _text_dataset(data_cfg, raw: RawData, where: str, y_train, y_test, names, num_classes: int,
                  saved_tokenizer: Optional[tuple]) -> Dataset:
    """A text data set: the tokenizer from the training split (or the user's file, or the one
    the run saved when it was made from the same), and every split as int64 ids (N, max_length)."""
    from .tokenize import TextEncoder, texts_sha256

    if data_cfg.storage == "stream":
        raise SpecialistsError(f"{where}: texts are always held in memory (data.storage=stream is for images)")
    tr_idx, va_idx = _train_val(data_cfg, raw, y_train, y_test, names, num_classes, where)
    kind, L = str(data_cfg.tokenizer), int(data_cfg.max_length)
    if kind in ("wordpiece", "bpe"):
        train_texts = [raw.x_train[i] for i in tr_idx.tolist()]
        source = {"kind": kind, "vocab_size": int(data_cfg.vocab_size), "texts_sha256": texts_sha256(train_texts)}
    else:  # the user's tokenizer.json: reused while the file is unchanged
        path = Path(kind).expanduser()
        sha = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        source = {"kind": "file", "path": str(path), "sha256": sha}
    if saved_tokenizer is not None and saved_tokenizer[0] == source:
        encoder = TextEncoder.from_json(saved_tokenizer[1], L, "the run's tokenizer.json")
    elif source["kind"] == "file":
        encoder = TextEncoder.from_file(kind, L)
    else:  # trained once, on rank 0 (WordPiece training is not reproducible: every rank takes rank 0's)
        trained = TextEncoder.train(kind, int(data_cfg.vocab_size), train_texts, L).to_json() if is_main() else None
        encoder = TextEncoder.from_json(agree(trained), L)
    x_train, x_test = encoder.encode(raw.x_train, pad_to=L), encoder.encode(raw.x_test, pad_to=L)
    return Dataset(
        name=data_cfg.name,
        train=_split(x_train, None, y_train, tr_idx, raw.y_train_coarse, raw.x_train),
        val=_split(x_train, None, y_train, va_idx, raw.y_train_coarse, raw.x_train),
        test=_split(x_test, None, y_test, np.arange(len(y_test)), raw.y_test_coarse, raw.x_test),
        num_classes=num_classes, class_names=names if names is not None else [str(i) for i in range(num_classes)],
        input_shape=(L,), mean=[], std=[], augment="none",
        coarse_names=list(raw.coarse_names) if raw.coarse_names is not None else None,
        fine_to_coarse=_fine_to_coarse(raw, y_train, y_test, num_classes, where),
        encoder=encoder, tokenizer_source=source,
    )


def _channels(raw: RawData, train: Split) -> int:
    if raw.channels:
        return raw.channels
    from .stream import presets

    return int(presets(8, "none")[1](train.source.image(0)).shape[0])


def _stream_stats(train: Split, side: int, augment: str, seed: int, chunk: int = 256) -> tuple[list, list]:
    """Mean and std of the training images at ``side`` (a seeded sample of STAT_SAMPLE of them),
    from float64 sums over chunks: memory stays bounded."""
    from .stream import STAT_SAMPLE, presets

    n = len(train)
    rows = np.arange(n) if n <= STAT_SAMPLE else np.sort(np.random.default_rng(seed).choice(n, STAT_SAMPLE, False))
    evaluate = presets(side, augment)[1]
    s1 = s2 = 0.0
    count = 0
    for start in range(0, len(rows), chunk):
        x = torch.stack([evaluate(train.source.image(int(i))) for i in rows[start:start + chunk]]).double() / 255
        s1, s2 = s1 + x.sum(dim=(0, 2, 3)), s2 + (x * x).sum(dim=(0, 2, 3))
        count += x.numel() // x.shape[1]
    mean = s1 / count
    std = ((s2 - count * mean * mean) / (count - 1)).clamp_min(0).sqrt().clamp_min(1e-3)
    return mean.float().tolist(), std.float().tolist()


def _entry(data_cfg) -> DatasetEntry:
    name = str(data_cfg.name)
    if name.startswith("python:"):
        from .user import python_entry

        return python_entry(name)
    if name not in DATASETS:
        raise SpecialistsError(f"unknown data set '{name}' (known: {', '.join(sorted(DATASETS))}, or "
                               "python:module:function)")
    return DATASETS[name]
