"""The one data registry: ``DATASETS``, its entries and the ``@register(name)`` decorator.

A loader (``synthetic.py``, ``files.py``, ``text.py``, ``torchvision_sets.py``, ...) registers
itself with ``@register(name)`` and only has to produce a :class:`~specialists.data.types.RawData`;
``data.name=python:module:function`` makes an entry on the fly (``user.py``).
:func:`specialists.data.build.build_dataset` looks the entry up and builds the splits. Only the
loaders (``user.py`` among them) and the builder import this module; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict


@dataclass
class DatasetEntry:
    loader: Callable  # (DataConfig) -> RawData
    needs_path: bool = False
    default_augment: str = "crop_flip"  # natural images; "crop" for digits/characters; "none" for vectors
    description: str = ""
    text: bool = False  # its examples are texts (read by text models: specialists.models.text)


DATASETS: Dict[str, DatasetEntry] = {}


def register(name: str, *, needs_path: bool = False, default_augment: str = "crop_flip", description: str = "",
             text: bool = False):
    """Decorator adding a loader ``(DataConfig) -> RawData`` to the registry."""

    def wrap(fn):
        DATASETS[name] = DatasetEntry(fn, needs_path, default_augment, description, text)
        return fn

    return wrap
