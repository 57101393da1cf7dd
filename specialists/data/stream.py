"""Data that does not fit in memory: examples read lazily, by DataLoader worker processes.

``data.storage``: ``memory`` decodes every split into one array (on the GPU when it fits there,
see :class:`~specialists.data.batches.Batcher`); ``stream`` keeps only each example's address (a
file, an index into the user's data set) and its label, and :class:`StreamBatcher` reads the
examples of each batch through a ``DataLoader`` with ``data.workers`` processes, pinned memory
and persistent workers, so memory stays bounded whatever the data set's size. ``auto`` takes
``memory`` when the decoded splits fit ``data.memory_budget_gb``, else ``stream``.

Streamed images go through the torchvision ``transforms.v2`` presets of
``references/classification``, at one resolution R: random-resized crop (``crop``) and
horizontal flip (``flip``) for training, resize (shorter side to R) and centre crop for
evaluation (an image already R x R is left as it is). Every random transform of an example is
seeded by a number drawn from the batch's seeded generator, so batches are the same whichever
worker reads them, and a resumed run draws what an uninterrupted one drew.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..device import channels_last

STORAGES = ("auto", "memory", "stream")
STAT_SAMPLE = 2048  # training images whose pixels give a streamed data set's mean and std


class ArraySource:
    """Images already in an array, uint8 (N, C, H, W) (streamed to resize them on the fly)."""

    def __init__(self, x: np.ndarray):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.x[i]))


class DatasetSource:
    """A user's map-style data set whose ``[i]`` is ``(image, label)`` (PIL image or tensor)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, i: int):
        return self.dataset[i][0]


class Subset:
    """Positions ``index`` of a source (a split of it)."""

    def __init__(self, source, index: np.ndarray):
        self.source, self.index = source, np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int):
        return self.source.image(int(self.index[i]))


def presets(resolution: int, augment: str, mean=None, std=None):
    """(train, eval) transforms at ``resolution``: uint8 images, or normalized float32 when
    ``mean``/``std`` are given."""
    from torchvision.transforms import v2

    def finish(steps):
        steps = [v2.ToImage(), *steps]
        if mean is not None:
            steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        return v2.Compose(steps)

    evaluate = [v2.Resize(resolution, antialias=True), v2.CenterCrop(resolution)]
    train = [v2.RandomResizedCrop(resolution, antialias=True)] if "crop" in augment else list(evaluate)
    if "flip" in augment:
        train.append(v2.RandomHorizontalFlip())
    return finish(train), finish(evaluate)


class StreamItems(TorchDataset):
    """What the loader's workers index: ``(position, seed, augment)`` -> a normalized (C, R, R)."""

    def __init__(self, source, train_tf, eval_tf):
        self.source, self.train_tf, self.eval_tf = source, train_tf, eval_tf

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item) -> torch.Tensor:
        i, seed, augment = item
        image = self.source.image(int(i))
        if not augment:
            return self.eval_tf(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.train_tf(image)


class _Plan:
    """The batch sampler of a persistent loader: this pass's batches, set before each pass."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamBatcher:
    """Batches of one streamed split: the interface of the in-memory ``Batcher``.

    ``x`` comes out as normalized float32 (B, C, R, R) on ``device`` (channels-last on CUDA),
    ``y`` int64 (B,).
    """

    def __init__(self, ds, split, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.is_image = True
        self.y = split.y.to(self.device)
        self.n = len(split)
        train_tf, eval_tf = presets(ds.resolution, ds.augment, ds.mean, ds.std)
        self.items = StreamItems(split.source, train_tf, eval_tf)
        self.workers = ds.workers
        self._plan = _Plan()
        self._loader: Optional[DataLoader] = None

    def _load(self, plan: list) -> Iterator[torch.Tensor]:
        if self.workers == 0:
            for batch in plan:
                yield torch.stack([self.items[item] for item in batch])
            return
        if self._loader is None:
            self._loader = DataLoader(self.items, batch_sampler=self._plan, num_workers=self.workers,
                                      pin_memory=self.device.type == "cuda", persistent_workers=True)
        self._plan.batches = plan
        yield from self._loader

    def _plan_for(self, idx: torch.Tensor, augment: bool, g, shard) -> tuple[list, torch.Tensor]:
        seeds = torch.randint(0, 2**62, (len(idx),), generator=g) if augment else torch.zeros(len(idx), dtype=torch.long)
        rank, ranks = shard
        rows = slice(rank * len(idx) // ranks, (rank + 1) * len(idx) // ranks)
        idx, seeds = idx[rows].cpu(), seeds[rows]
        return [(int(i), int(s), augment) for i, s in zip(idx, seeds)], idx

    def _out(self, x: torch.Tensor, idx: torch.Tensor):
        return channels_last(x.to(self.device, non_blocking=True)), self.y[idx.to(self.device)]

    def batch(self, idx: torch.Tensor, augment: bool = False, generator=None, shard: tuple[int, int] = (0, 1)):
        """Examples ``idx`` read now (in this process) -> (x, y) on the device."""
        plan, idx = self._plan_for(idx, augment, generator, shard)
        return self._out(torch.stack([self.items[item] for item in plan]), idx)

    def stream(self, index_batches, augment: bool, generator, shard: tuple[int, int]):
        """Yield (x, y, idx) for each index batch, read ahead by the workers. The seeds of every
        batch are drawn first, in order, from ``generator``."""
        plans = [self._plan_for(idx, augment, generator, shard) for idx in index_batches]
        for x, (_, idx) in zip(self._load([p for p, _ in plans]), plans):
            yield (*self._out(x, idx), idx)

    def iterate(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole split once, in order, un-augmented: (x, y) batches (for evaluation)."""
        index = [torch.arange(s, min(s + batch_size, self.n)) for s in range(0, self.n, batch_size)]
        for x, idx in zip(self._load([[(int(i), 0, False) for i in b] for b in index]), index):
            yield self._out(x, idx)
