"""The data registry: ``build_dataset(cfg.data)`` for every entry in ``DATASETS``.

Entries (all offline; torchvision sets download only with ``data.download=true``):
``synthetic`` (embedded default), ``digits`` (scikit-learn's bundled digits), ``cifar10``,
``cifar100``, ``mnist``, ``fashion_mnist``, ``emnist``, ``imagefolder``, ``npz``.
"""

from .base import DATASETS, Dataset, DatasetEntry, RawData, Split, build_dataset, register, stratified_split
from .loader import Batcher, epoch_generator, num_batches
from . import synthetic  # noqa: F401  (registers itself)

try:  # the real-data loaders; kept in their own modules
    from . import files, torchvision_sets  # noqa: F401
except ImportError:  # pragma: no cover - during development only
    pass

__all__ = ["DATASETS", "Dataset", "DatasetEntry", "RawData", "Split", "build_dataset", "register",
           "stratified_split", "Batcher", "epoch_generator", "num_batches"]
