"""The data registry: ``build_dataset(cfg.data)`` for every entry in ``DATASETS``.

Entries (all offline; torchvision sets download only with ``data.download=true``):
``synthetic`` (embedded default), ``digits`` (scikit-learn's bundled digits), ``cifar10``,
``cifar100``, ``mnist``, ``fashion_mnist``, ``emnist``, ``imagefolder``, ``npz``.
"""

from .base import DATASETS, Dataset, DatasetEntry, RawData, Split, build_dataset, register, stratified_split
from .loader import Batcher, epoch_generator, num_batches
from . import files, synthetic, torchvision_sets  # noqa: F401  (each registers its entries)

__all__ = ["DATASETS", "Dataset", "DatasetEntry", "RawData", "Split", "build_dataset", "register",
           "stratified_split", "Batcher", "epoch_generator", "num_batches"]
