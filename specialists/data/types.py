"""The data types every data module shares: what a loader returns (:class:`RawData`), a split
(:class:`Split`) and a built data set (:class:`Dataset`), and the split and layout names.

A data set is held in memory as tensors (images uint8 ``(N, C, H, W)``, vectors float32
``(N, D)``, texts as int64 token ids ``(N, L)``: :mod:`specialists.data.tokenize`) or streamed
(each split an image source and its labels, read by DataLoader workers:
:mod:`specialists.data.stream`), by ``data.storage``. :func:`specialists.data.build.build_dataset`
makes a :class:`Dataset` from a registry entry's :class:`RawData`
(:mod:`specialists.data.registry`). This module imports no other data module: every one of them
may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch

from ..core.tokens import PAD_ID

SPLITS = ("train", "val", "test")
HELD_IN_SPLITS = ("val", "train")  # what a model may be fitted or clustered on: never test
TEXT_LAYOUT = "NL"  # data.json's layout of token ids (N, L): how every reader tells a text run


@dataclass
class RawData:
    """What a registry loader returns: arrays (images uint8 NCHW, vectors float32 (N, D)), or,
    for data read lazily, the labels and a source of each split's images (``x_*`` None).

    A lazy loader also gives the images' ``channels`` and ``sizes`` ((W, H) of each image, when
    known without decoding), and ``decode(resize) -> (x_train, x_test)`` when its images can be
    decoded into arrays (``data.storage=memory``).
    """

    x_train: Optional[np.ndarray]
    y_train: np.ndarray
    x_test: Optional[np.ndarray]
    y_test: np.ndarray
    class_names: Optional[List[str]] = None
    y_train_coarse: Optional[np.ndarray] = None
    y_test_coarse: Optional[np.ndarray] = None
    coarse_names: Optional[List[str]] = None
    num_classes: Optional[int] = None  # default: max label + 1
    default_augment: Optional[str] = None  # overrides the entry's default (e.g. by channel count)
    train_source: object = None  # lazy: an image source (see specialists.data.stream)
    test_source: object = None
    channels: Optional[int] = None
    sizes: Optional[List[tuple]] = None  # lazy: (W, H) of every train and test image, in order
    decode: Optional[Callable] = None  # lazy: resize -> (x_train, x_test) uint8 NCHW
    kind: Optional[str] = None  # "text": x_train / x_test are lists of strings (tokenized by build_dataset)
    val_rows: Optional[np.ndarray] = None  # rows of train that are the validation split (else a seeded share)
    layout: Optional[str] = None  # images' layout when the loader knows it ("NHWC"/"NCHW"); None: told from the shape


@dataclass
class Split:
    """One split. ``x``: uint8 (N, C, H, W), float32 (N, D) or int64 token ids (N, L) (None
    when streamed: ``source`` reads the examples); ``y``: int64 (N,); ``text``: a text data
    set's raw strings (what an API teacher is asked about)."""

    x: Optional[torch.Tensor]
    y: torch.Tensor
    y_coarse: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None  # position of each example in the source's training order
    source: object = None  # streamed: example i of the split is source.image(i)
    text: Optional[List[str]] = None
    # this split's batchers by device (specialists.data.batches.batcher_for): kept on the split itself, so
    # they live and die with it (a cache keyed by id(split) hands a new split a freed one's batcher)
    batchers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: List[str]
    input_shape: tuple  # (C, H, W) for images, (D,) for vectors, (max_length,) for token ids
    mean: List[float]  # per channel (images, in [0,1] units) or per feature (vectors)
    std: List[float]
    augment: str  # none | crop | flip | crop_flip
    crop_padding: int = 4
    coarse_names: Optional[List[str]] = None
    fine_to_coarse: Optional[List[int]] = None
    storage: str = "memory"  # memory | stream
    workers: int = 0  # stream: DataLoader workers
    encoder: object = None  # text: the TextEncoder (its tokenizer and id conventions)
    tokenizer_source: Optional[dict] = None  # text: what the tokenizer was made from (reused when unchanged)

    @property
    def resolution(self) -> int:
        """The side of a streamed image (C, R, R)."""
        return int(self.input_shape[-1])

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def is_text(self) -> bool:
        return self.encoder is not None

    @property
    def has_coarse(self) -> bool:
        return self.fine_to_coarse is not None

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)

    def preprocessing(self) -> dict:
        """What inference needs to take raw inputs (saved in the run directory; a text data
        set's tokenizer is saved beside it: ``tokenizer`` holds its JSON here)."""
        if self.is_text:
            return {
                "input_shape": list(self.input_shape), "layout": TEXT_LAYOUT, "dtype": "int64", "channel_order": None,
                "scale": 1.0, "mean": [], "std": [], "class_names": list(self.class_names),
                "num_classes": self.num_classes, "vocab_size": self.encoder.vocab_size,
                "max_length": self.encoder.max_length, "pad_id": PAD_ID, "tokenizer_source": self.tokenizer_source,
                "tokenizer": self.encoder.to_json(),
            }
        return {
            "input_shape": list(self.input_shape),
            "layout": "NCHW" if self.is_image else "ND",
            "dtype": "uint8" if self.is_image else "float32",
            "channel_order": ("RGB" if self.input_shape[0] == 3 else "L") if self.is_image else None,
            "scale": 1 / 255 if self.is_image else 1.0,
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
        }
