"""Device-resident batching and augmentation (the airbench idea: no CPU loader in the loop).

A :class:`Batcher` moves one split's uint8 images (or float vectors) to the device once and
builds every batch by indexing there: normalization, random crop with padding and horizontal
flip are tensor ops on the device. Randomness comes from a CPU ``torch.Generator`` seeded by
the caller (e.g. ``seed`` and epoch), so a resumed run draws the same batches and crops as an
uninterrupted one, on any device.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .base import Dataset, Split


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one epoch: the same (seed, epoch, stream) always draws the same."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 9_973 + stream * 101) % (2**63 - 1))
    return g


class Batcher:
    """Batches of one split, normalized and (optionally) augmented on ``device``.

    ``x`` of the split: uint8 (N, C, H, W) images or float32 (N, D) vectors. Batches come out
    as float32 (B, C, H, W) / (B, D) in normalized units and int64 labels (B,).
    """

    def __init__(self, ds: Dataset, split: Split, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.is_image = ds.is_image
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)
        self.n = len(split)
        self.augment = ds.augment
        self.padding = ds.crop_padding
        shape = (1, -1, 1, 1) if self.is_image else (1, -1)
        self.mean = torch.tensor(ds.mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(ds.std, dtype=torch.float32, device=self.device).view(shape)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.is_image:
            x = x / 255.0
        return (x - self.mean) / self.std

    def batch(self, idx: torch.Tensor, augment: bool = False, generator: Optional[torch.Generator] = None):
        """Examples ``idx`` (LongTensor, CPU or device) -> (x float32, y int64) on the device."""
        idx = idx.to(self.device)
        x = self.normalize(self.x[idx])
        if augment and self.is_image and self.augment != "none":
            x = self._augment(x, generator)
        return x, self.y[idx]

    def _augment(self, x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
        b, _, h, w = x.shape
        if "crop" in self.augment and self.padding > 0:
            p = self.padding
            # zero padding in normalized units = the mean colour, as in most CIFAR recipes
            xp = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(self.device)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=g).to(self.device)
            rows = (oy[:, None] + torch.arange(h, device=self.device))[:, None, :, None]  # (B,1,H,1)
            cols = (ox[:, None] + torch.arange(w, device=self.device))[:, None, None, :]  # (B,1,1,W)
            bi = torch.arange(b, device=self.device)[:, None, None, None]
            ci = torch.arange(x.shape[1], device=self.device)[None, :, None, None]
            x = xp[bi, ci, rows, cols]
        if "flip" in self.augment:
            flip = (torch.rand(b, generator=g) < 0.5).to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def epoch(self, batch_size: int, *, shuffle: bool, augment: bool, generator: Optional[torch.Generator] = None,
              drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x, y, idx) batches covering the split once."""
        order = torch.randperm(self.n, generator=generator) if shuffle else torch.arange(self.n)
        stop = self.n - (self.n % batch_size if drop_last and self.n >= batch_size else 0)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            x, y = self.batch(idx, augment, generator)
            yield x, y, idx


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    if drop_last and n >= batch_size:
        return n // batch_size
    return (n + batch_size - 1) // batch_size
