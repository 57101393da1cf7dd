"""Batches on the device: the batcher (and :func:`batcher_for`, each split's own), the two
samplers, and the one seeded batch builder.

The airbench idea: no CPU loader in the loop. A :class:`Batcher` moves one split's uint8
images (or float vectors) to the device once and builds every batch by indexing there;
normalization (:class:`~specialists.data.preprocess.Preprocessing`, the same as inference),
random crop with padding and horizontal flip are tensor ops on the device, and image batches
are channels-last on CUDA.

Which examples form a batch is a *sampler*'s job: :class:`EpochBatches` (one shuffled pass
over the split: the generalist, the students, the controls) or :class:`MixedBatches` (a
specialist's half-subset batches). :func:`seeded_batches` joins a batcher and a sampler into
the ``batches(epoch)`` the training loop takes. All randomness comes from a CPU
``torch.Generator`` seeded by ``(seed, epoch, stream)``, so a resumed run draws the same
batches and crops as an uninterrupted one, on any device.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
from torch.nn import functional as F

from ..core.tokens import PAD_ID
from ..device import channels_last, world
from ..errors import SpecialistsError
from .preprocess import Preprocessing
from .stream import StreamBatcher
from .types import Dataset, Split

AUGMENTATIONS = ("none", "crop", "flip", "crop_flip")  # data.augment (plus "auto": by data set)

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one epoch: the same (seed, epoch, stream) always draws the same."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 9_973 + stream * 101) % (2**63 - 1))
    return g


class Batcher:
    """Batches of one split, normalized and (optionally) augmented on ``device``.

    ``x`` of the split: uint8 (N, C, H, W) images or float32 (N, D) vectors. Batches come out
    as float32 (B, C, H, W) / (B, D) in normalized units and int64 labels (B,). Token ids
    (N, L) come out as int64 (B, L_b), cut to the batch's longest text (the rest is padding).
    """

    def __init__(self, ds: Dataset, split: Split, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.is_image = ds.is_image
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)
        self.n = len(split)
        self.augment = ds.augment
        self.padding = ds.crop_padding
        self.preprocessing = Preprocessing(ds.preprocessing(), self.device)
        # text: each row's length on the CPU, so cutting a batch to its longest needs no device sync
        self.lengths = (split.x != PAD_ID).sum(1) if ds.is_text else None

    def batch(self, idx: torch.Tensor, augment: bool = False, generator: Optional[torch.Generator] = None,
              shard: tuple[int, int] = (0, 1)):
        """Examples ``idx`` (LongTensor, CPU or device) -> (x float32, y int64) on the device.

        ``shard=(rank, ranks)``: only rank's contiguous share of the rows, with the augmentation
        drawn for the whole batch first, so the ranks of a multi-process run together see
        exactly the batch one process would.
        """
        aug = augment and self.is_image and self.augment != "none"
        params = self._draw(len(idx), generator) if aug else {}
        rank, ranks = shard
        if ranks > 1:
            rows = slice(rank * len(idx) // ranks, (rank + 1) * len(idx) // ranks)
            idx, params = idx[rows], {k: v[rows] for k, v in params.items()}
        rows = idx.to(self.device)
        if self.lengths is not None and len(idx):
            x = self.x[rows, :int(self.lengths[idx.cpu()].max())]
        else:
            x = self.x[rows]
        x = self.preprocessing.normalize(x)
        if aug:
            x = self._augment(x, params)
        return channels_last(x), self.y[rows]

    def _draw(self, b: int, g: Optional[torch.Generator]) -> dict:
        """The random crop offsets and flips of a batch of ``b`` (CPU tensors)."""
        params = {}
        if "crop" in self.augment and self.padding > 0:
            p = self.padding
            params["oy"] = torch.randint(0, 2 * p + 1, (b,), generator=g)
            params["ox"] = torch.randint(0, 2 * p + 1, (b,), generator=g)
        if "flip" in self.augment:
            params["flip"] = torch.rand(b, generator=g) < 0.5
        return params

    def _augment(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        b, _, h, w = x.shape
        if "oy" in params:
            p = self.padding
            # zero padding in normalized units = the mean colour, as in most CIFAR recipes
            xp = F.pad(x, (p, p, p, p))
            oy, ox = params["oy"].to(self.device), params["ox"].to(self.device)
            rows = (oy[:, None] + torch.arange(h, device=self.device))[:, None, :, None]  # (B,1,H,1)
            cols = (ox[:, None] + torch.arange(w, device=self.device))[:, None, None, :]  # (B,1,1,W)
            bi = torch.arange(b, device=self.device)[:, None, None, None]
            ci = torch.arange(x.shape[1], device=self.device)[None, :, None, None]
            x = xp[bi, ci, rows, cols]
        if "flip" in params:
            flip = params["flip"].to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def stream(self, index_batches, augment: bool, generator, shard: tuple[int, int]):
        """Yield (x, y, idx) for each index batch (this rank's share of it), drawing from
        ``generator`` batch by batch."""
        rank, ranks = shard
        for idx in index_batches:
            x, y = self.batch(idx, augment, generator, shard)
            yield x, y, idx[rank * len(idx) // ranks:(rank + 1) * len(idx) // ranks]

    def iterate(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole split once, in order, un-augmented: (x, y) batches (for evaluation)."""
        for start in range(0, self.n, batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, self.n)))


def batcher_for(ds: Dataset, split: Split, device: torch.device | str) -> Batcher | StreamBatcher:
    """The batcher of ``split`` (one of ``ds``'s) on ``device``: a :class:`Batcher`, or a
    :class:`~specialists.data.stream.StreamBatcher` for a streamed data set. Made once per split
    and device and kept on the split (``split.batchers``): a streamed split's loader keeps its
    worker processes between passes, and a split's batchers go when the split goes."""
    key = str(device)
    if key not in split.batchers:
        split.batchers[key] = (StreamBatcher if ds.storage == "stream" else Batcher)(ds, split, device)
    return split.batchers[key]


class EpochBatches:
    """One shuffled pass over ``n`` examples per epoch, in batches of ``batch_size``.

    ``drop_last`` (default: when there is more than one batch) drops the final short batch:
    BatchNorm dislikes a batch of one.
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool | None = None):
        self.n, self.batch_size = n, batch_size
        self.drop_last = n > batch_size if drop_last is None else drop_last
        full = self.drop_last and n >= batch_size
        self.steps = n // batch_size if full else math.ceil(n / batch_size)

    def epoch(self, g: torch.Generator) -> Iterator[torch.Tensor]:
        """Yield index tensors (B,) for one epoch."""
        order = torch.randperm(self.n, generator=g)
        for i in range(self.steps):
            yield order[i * self.batch_size:(i + 1) * self.batch_size]


class MixedBatches:
    """Batches with ``round(B * subset_fraction)`` examples of S and the rest from other classes.

    One epoch is one pass over the subset's training examples in shuffled order; the other
    examples are drawn as a shuffled stream that carries on across batches (reshuffled each
    pass), so over training the specialist sees as many "others" as the mix prescribes.
    """

    def __init__(self, y: torch.Tensor, subset: torch.Tensor, num_classes: int, batch_size: int, fraction: float):
        in_s = torch.zeros(num_classes, dtype=torch.bool)
        in_s[subset] = True
        mask = in_s[y]
        self.pos = torch.nonzero(mask).squeeze(1)
        self.neg = torch.nonzero(~mask).squeeze(1)
        if len(self.pos) == 0:
            raise SpecialistsError("a specialist's subset has no training examples")
        self.n_pos = max(1, min(batch_size - 1, round(batch_size * fraction))) if len(self.neg) else batch_size
        self.n_neg = batch_size - self.n_pos if len(self.neg) else 0
        self.steps = math.ceil(len(self.pos) / self.n_pos)
        # the last batch holds the remaining subset examples plus a full share of others
        self.samples_per_epoch = len(self.pos) + self.steps * self.n_neg

    def epoch(self, g: torch.Generator):
        """Yield index tensors (B,) for one epoch."""
        pos = self.pos[torch.randperm(len(self.pos), generator=g)]
        need = self.steps * self.n_neg
        reps = math.ceil(need / max(1, len(self.neg))) if self.n_neg else 0
        neg = torch.cat([self.neg[torch.randperm(len(self.neg), generator=g)] for _ in range(reps)]) if reps else self.neg[:0]
        for i in range(self.steps):
            p = pos[i * self.n_pos:(i + 1) * self.n_pos]
            n = neg[i * self.n_neg:(i + 1) * self.n_neg]
            yield torch.cat([p, n])



def seeded_batches(batcher: Batcher, sampler, *, seed: int, stream: int = 0, augment: bool = True,
                   epoch_offset: int = 0, shard: tuple[int, int] | None = None) -> Batches:
    """``batches(epoch)`` yielding (x, y, idx) on the device: ``sampler``'s index batches of
    ``batcher``'s split, augmented unless ``augment`` is False, every draw (order and
    augmentation) from :func:`epoch_generator` ``(seed, epoch + epoch_offset, stream)``.

    ``epoch_offset`` shifts the streams: a fine-tuning control continues the generalist's
    epochs rather than replaying them. ``shard=(rank, ranks)``: this rank's share of every
    batch (the batch size stays the global one); by default this process's place in a
    torchrun run, which in one process is the whole batch.
    """
    shard = shard or world()

    def batches(epoch: int):
        g = epoch_generator(seed, epoch + epoch_offset, stream)
        yield from batcher.stream(sampler.epoch(g), augment, g, shard)

    return batches
