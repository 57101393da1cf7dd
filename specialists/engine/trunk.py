"""A shared trunk's outputs over a whole split, computed once: the batches of a shared-trunk specialist.

With ``specialists.branch=k`` the trunk is the generalist's, frozen. When the specialist's
batches are not augmented (``data.augment`` none, text, vectors) or ``specialists.cache_trunk``
asks for it, the trunk's output for each training example is the same at every step, so
:class:`TrunkCache` computes it once (in chunks, on the device) and then serves batches of it
exactly as a :class:`~specialists.data.Batcher` serves inputs: a specialist epoch then costs
only its tail and head. The cache holds ``N x`` the trunk's output per example (a CIFAR CNN
cut before its last block: 3,072 floats, 0.55 GB for 45,000 images).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..models import PAD_ID
from ..models.branch import rows_of

CHUNK = 512  # examples the trunk runs on at a time while filling the cache


class TrunkCache:
    """``trunk``'s outputs (a tensor or a tuple of tensors, rows = examples) over ``batcher``'s
    split, un-augmented; text rows are run padded to the split's full width, so every chunk's
    outputs have one shape. Serves ``(h, y, idx)`` batches through ``stream`` like a batcher."""

    def __init__(self, trunk: torch.nn.Module, batcher, chunk: int = CHUNK):
        # no reference to the trunk kept: a process reuses the cache for as long as the trunk lives
        # (a weak map keyed by the trunk), which a reference from here would make forever
        self.device, self.n, self.y = batcher.device, batcher.n, batcher.y
        width = batcher.x.shape[1] if getattr(batcher, "lengths", None) is not None else None
        parts = []
        trunk.eval()
        with torch.no_grad():
            for s in range(0, self.n, chunk):
                x = batcher.batch(torch.arange(s, min(s + chunk, self.n)))[0]
                if width is not None and x.shape[1] < width:
                    x = F.pad(x, (0, width - x.shape[1]), value=PAD_ID)
                h = trunk(x)
                parts.append(h if isinstance(h, tuple) else (h,))
        self.h = tuple(torch.cat(p) for p in zip(*parts))
        self.single = len(self.h) == 1

    def batch(self, idx: torch.Tensor):
        rows = idx.to(self.device)
        h = rows_of(self.h, rows)
        return (h[0] if self.single else h), self.y[rows]

    def stream(self, index_batches, augment: bool, generator, shard: tuple[int, int]):
        """Yield (h, y, idx) for each index batch, this rank's share of it (no augmentation)."""
        rank, ranks = shard
        for idx in index_batches:
            idx = idx[rank * len(idx) // ranks:(rank + 1) * len(idx) // ranks]
            h, y = self.batch(idx)
            yield h, y, idx

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.h)


__all__ = ["TrunkCache"]
