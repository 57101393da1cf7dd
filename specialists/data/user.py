"""``data.name=python:package.module:function``: the user's own data set, streamed.

``function(data_cfg)`` returns ``{"train": ds, "test": ds}`` (optionally ``"class_names"``):
map-style data sets whose ``ds[i]`` is ``(image, label)`` (a PIL image or a uint8 (C, H, W)
tensor) and whose labels are available without decoding an image, as ``ds.targets`` or
``ds.labels`` (the specialists' mixed batches sample examples by label).
"""

from __future__ import annotations

import numpy as np

from ..errors import SpecialistsError, one_line
from .registry import DatasetEntry
from .stream import DatasetSource
from .types import RawData


def _labels(ds, name: str, split: str) -> np.ndarray:
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    raise SpecialistsError(f"data set {name}: its '{split}' data set has no 'targets' or 'labels' (the labels "
                           "must be known without decoding the images)")


def python_entry(name: str) -> DatasetEntry:
    import importlib

    module, _, fn = name[len("python:"):].partition(":")
    try:
        factory = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SpecialistsError(f"data set {name}: cannot import it ({one_line(exc)})") from None

    def load(data_cfg) -> RawData:
        splits = factory(data_cfg)
        if not isinstance(splits, dict) or not {"train", "test"} <= set(splits):
            raise SpecialistsError(f"data set {name}: must return {{'train': dataset, 'test': dataset}}")
        names = splits.get("class_names")
        return RawData(x_train=None, y_train=_labels(splits["train"], name, "train"), x_test=None,
                       y_test=_labels(splits["test"], name, "test"),
                       class_names=list(names) if names is not None else None,
                       num_classes=len(names) if names is not None else None,
                       train_source=DatasetSource(splits["train"]), test_source=DatasetSource(splits["test"]))

    return DatasetEntry(load, needs_path=False, default_augment="crop_flip", description="the user's own data set")
