"""Data: the registry and its sources, the one preprocessing, samplers, black-box tables.

Entries of ``DATASETS`` (all offline; torchvision sets download only with
``data.download=true``): ``synthetic`` (embedded default), ``digits`` (scikit-learn's bundled
digits), ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``emnist``, ``imagefolder``,
``npz``, and the text sets ``synthetic_text`` (embedded) and ``text`` (CSV, TSV or JSONL files).
"""

from . import files, synthetic, synthetic_text, text, torchvision_sets  # noqa: F401  (each registers its entries)
from .batches import AUGMENTATIONS, Batcher, EpochBatches, MixedBatches, epoch_generator, seeded_batches
from .preprocess import Preprocessing
from .registry import (
    DATASETS,
    HELD_IN_SPLITS,
    TEXT_LAYOUT,
    Dataset,
    DatasetEntry,
    RawData,
    Split,
    build_dataset,
    register,
    stratified_split,
)
from .stream import STORAGES, StreamBatcher
from .tokenize import PAD_ID, TOKENIZERS, TextEncoder

__all__ = ["AUGMENTATIONS", "DATASETS", "STORAGES", "StreamBatcher", "HELD_IN_SPLITS", "TEXT_LAYOUT", "PAD_ID", "TOKENIZERS", "TextEncoder", "Batcher", "Dataset", "DatasetEntry", "EpochBatches",
           "MixedBatches", "Preprocessing", "RawData", "Split", "build_dataset", "epoch_generator", "register",
           "seeded_batches", "stratified_split"]
