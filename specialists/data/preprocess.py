"""THE input preprocessing, shared by training batches and inference, so they cannot drift.

A run's ``data.json`` (:meth:`Dataset.preprocessing`) records the input shape, the raw units
(uint8 images scaled by ``scale`` = 1/255, float vectors by 1) and the per-channel (images) or
per-feature (vectors) mean and std of the training split. :class:`Preprocessing` turns raw
inputs into the model's normalized float32 input with exactly those numbers: the device batcher
calls :meth:`Preprocessing.normalize` on every batch, and the inference API calls
:meth:`Preprocessing.__call__` on whatever a user passes.

A text run's inputs are token ids (``layout`` ``NL``): nothing to normalize; raw strings are
tokenized by the run's own tokenizer (``info["tokenizer"]``, its JSON), padded to the longest.

Image files become raw uint8 pixels through :func:`convert_image`, both when a data set is
decoded for training and when ``specialists predict`` reads a file.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..core.layout import LayoutError, raw_batch
from ..errors import SpecialistsError
from .types import TEXT_LAYOUT

log = logging.getLogger("specialists")

WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PIL's greys of more than 8 bits
FAR_SDS = 20.0  # a vector feature this many training stds from the training mean is far outside the training data
RAW_IMAGE_RANGE = (0.0, 255.0)  # what uint8 training images hold


def convert_image(im, mode: str):
    """A PIL image -> a new PIL image in ``mode`` (``RGB`` or ``L``), 8 bits per channel: the
    raw pixels of training and of inference alike. A wide grey is scaled to 0..255 first (16-bit
    by 1/65535 * 255, 32-bit integers and floats by their own maximum), where PIL's conversion
    would clip it at 255."""
    from PIL import Image

    if im.mode in WIDE_GREY_MODES:
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        im = Image.fromarray(np.rint(a / top * 255).clip(0, 255).astype(np.uint8))
    return im.convert(mode)  # a copy even in the same mode: the caller may close the file


class Preprocessing:
    """Raw inputs -> normalized float32 model inputs on ``device``.

    ``info``: the dict of :meth:`Dataset.preprocessing` (a run's ``data.json``).
    """

    def __init__(self, info: dict, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.input_shape = tuple(info["input_shape"])
        self.is_text = info.get("layout") == TEXT_LAYOUT
        self.is_image = len(self.input_shape) == 3
        self.dtype = torch.int64 if self.is_text else torch.float32  # of the model's input
        self._tokenizer, self._encoder = info.get("tokenizer"), None
        self.vocab_size = info.get("vocab_size")
        # divide by 1/scale (255 for uint8 images): the division is what training always did
        self.divisor = 1.0 / float(info["scale"])
        shape = (1, -1, 1, 1) if self.is_image else (1, -1)
        self.mean = torch.tensor(info["mean"], dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(info["std"], dtype=torch.float32, device=self.device).view(shape)
        self._warned = False  # about inputs far outside the training data: once

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the stored layout and raw units ((B, C, H, W) or (B, D), on the device)
        -> float32 ``(x / divisor - mean) / std`` (token ids: as they are)."""
        if self.is_text:
            return x
        x = x.float()
        if self.divisor != 1.0:
            x = x / self.divisor
        return (x - self.mean) / self.std

    def to_batch(self, x, layout: str | None = None) -> torch.Tensor:
        """Raw user input -> a batch in the stored layout on the device, raw units.

        Images: (N, H, W, C) or (N, C, H, W) with the run's channel count, or one image
        (H, W, C) / (C, H, W), or (N, H, W) for one channel (``layout`` ``"NHWC"``/``"NCHW"``
        settles an array that fits both). Vectors: (N, D) (flattened). Text: a string or a list
        of strings (tokenized), or token ids (N, L) int. A shape that fits none of these is one
        :class:`SpecialistsError` line. The shapes are resolved in numpy by
        :func:`specialists.core.layout.raw_batch`, the torch-free runtime's resolver too.
        """
        if self.is_text:
            return self._ids(x)
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        try:
            x = raw_batch(x, self.input_shape, layout)
        except LayoutError as exc:
            raise SpecialistsError(str(exc)) from None
        return torch.as_tensor(x).to(self.device)

    @property
    def encoder(self):
        """A text run's :class:`~specialists.data.tokenize.TextEncoder` (built on first use)."""
        if self._encoder is None:
            from .tokenize import TextEncoder

            self._encoder = TextEncoder.from_json(self._tokenizer, self.input_shape[0], "the run's tokenizer")
        return self._encoder

    def _ids(self, x) -> torch.Tensor:
        if isinstance(x, str):
            x = [x]
        if isinstance(x, (list, tuple)) and all(isinstance(t, str) for t in x):
            return torch.from_numpy(self.encoder.encode(x)).to(self.device)
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if x.ndim != 2 or x.dtype.is_floating_point or x.dtype == torch.bool or x.shape[1] > self.input_shape[0]:
            raise SpecialistsError(f"expected texts (a string or a list of strings) or token ids (N, L <= "
                                   f"{self.input_shape[0]}) int, got {x.dtype} {tuple(x.shape)}")
        if len(x) and (x.min() < 0 or x.max() >= self.vocab_size):
            raise SpecialistsError(f"token ids must be in 0..{self.vocab_size - 1} (0 pads)")
        return x.long().to(self.device)

    def outside_range(self, x: torch.Tensor) -> str | None:
        """How a raw batch (the stored layout and units) lies far outside the training data, or
        None: images below 0 or above 255 (by more than rounding), vectors more than ``FAR_SDS``
        training standard deviations from the training mean."""
        if self.is_text or not len(x):
            return None
        x = x.float()
        lo, hi = float(x.min()), float(x.max())
        if self.is_image:
            if lo < RAW_IMAGE_RANGE[0] - 0.5 or hi > RAW_IMAGE_RANGE[1] + 0.5:
                return f"inputs range from {lo:g} to {hi:g}, but the training images hold raw pixels 0..255"
            return None
        z = ((x - self.mean) / self.std).abs().max()
        if z > FAR_SDS:
            return (f"inputs range from {lo:g} to {hi:g}, up to {float(z):.3g} standard deviations from the training "
                    f"data's mean (more than {FAR_SDS:g})")
        return None

    def __call__(self, x) -> torch.Tensor:
        """Raw user input -> normalized float32 model input on the device. Inputs far outside the
        training data (:meth:`outside_range`) are answered with one warning, the first time."""
        x = self.to_batch(x)
        if not self._warned:
            why = self.outside_range(x)
            if why:
                log.warning("%s: the answers for them mean little (this warning is given once)", why)
                self._warned = True
        return self.normalize(x)
