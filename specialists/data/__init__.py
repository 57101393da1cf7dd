"""Data: the types, the registry and its sources, the builder, the one preprocessing, samplers,
black-box tables.

Entries of ``DATASETS`` (all offline; torchvision sets download only with
``data.download=true``): ``synthetic`` (embedded default), ``digits`` (scikit-learn's bundled
digits), ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``emnist``, ``imagefolder``,
``npz``, and the text sets ``synthetic_text`` (embedded) and ``text`` (CSV, TSV or JSONL files).
"""

from ..core.tokens import PAD_ID
from . import files, synthetic, synthetic_text, text, torchvision_sets  # noqa: F401  (each registers its entries)
from .batches import AUGMENTATIONS, Batcher, EpochBatches, MixedBatches, batcher_for, epoch_generator, seeded_batches
from .build import build_dataset
from .preprocess import Preprocessing
from .registry import DATASETS, DatasetEntry, register
from .splits import stratified_split
from .stream import STORAGES, StreamBatcher
from .tokenize import TOKENIZERS, TextEncoder
from .types import HELD_IN_SPLITS, TEXT_LAYOUT, Dataset, RawData, Split

__all__ = ["AUGMENTATIONS", "DATASETS", "STORAGES", "StreamBatcher", "HELD_IN_SPLITS", "TEXT_LAYOUT", "PAD_ID", "TOKENIZERS", "TextEncoder", "Batcher", "Dataset", "DatasetEntry", "EpochBatches",
           "MixedBatches", "Preprocessing", "RawData", "Split", "batcher_for", "build_dataset", "epoch_generator", "register",
           "seeded_batches", "stratified_split"]
