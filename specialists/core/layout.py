"""Where the channels are: the one rule that turns image arrays into (N, C, H, W), and the raw
batch that training, inference and the torch-free ONNX runtime all build from a user's input.

The rule (:func:`to_nchw`), for uint8 or float image arrays:

* (N, H, W): one channel; a channel axis is added -> (N, 1, H, W).
* (N, A, B, D) with an explicit ``layout`` (``"NHWC"`` or ``"NCHW"``): that layout.
* Otherwise the channel axis is the last one (NHWC) or axis 1 (NCHW), whichever alone can hold
  the channels: 1 or 3 of them, or, when the expected image ``shape`` (C, H, W) is known,
  whichever gives exactly that shape. When both can (a (N, 3, 8, 3) array; or C == H == W),
  the array is ambiguous and nothing is guessed: one line names the shape and how to settle
  it. When neither can, one line says so.

:func:`raw_batch` is what ``Preprocessing.to_batch`` (torch) and ``NumpyPreprocessing.to_batch``
(numpy, for serving without torch) both call, so their accepted shapes cannot drift apart.

numpy only (no torch): the ONNX runtime imports this module. Errors are :class:`LayoutError`
(a ``ValueError``); callers that answer a user rewrap it as a one-line ``SpecialistsError``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["CHANNELS", "LAYOUTS", "LayoutError", "raw_batch", "to_nchw"]

LAYOUTS = ("NHWC", "NCHW")
CHANNELS = (1, 3)  # grey or RGB: the channel counts an image may have


class LayoutError(ValueError):
    """An image array whose channel axis cannot be told, or a batch of the wrong shape."""


def to_nchw(x, layout: Optional[str] = None, *, shape: Optional[Sequence[int]] = None,
            settle: str = "pass layout='NHWC' or 'NCHW'") -> np.ndarray:
    """Images (N, H, W), (N, H, W, C) or (N, C, H, W) -> a C-contiguous (N, C, H, W) array
    (no copy when ``x`` already is one), by the rule of the module doc.

    Args:
        x: the array (any dtype; numpy or anything ``np.asarray`` takes).
        layout: ``"NHWC"`` or ``"NCHW"`` (any case) settles a 4-D array's layout; None: told
            from the shape.
        shape: the expected (C, H, W), when known: a layout fits only if it gives exactly it,
            and an array of another shape is refused.
        settle: how the caller's user settles an ambiguous array (ends the error line).
    """
    x = np.asarray(x)
    want = tuple(int(s) for s in shape) if shape is not None else None
    if x.ndim == 3:
        out = x[:, None]
    elif x.ndim == 4:
        if layout is not None:
            chosen = str(layout).upper()
            if chosen not in LAYOUTS:
                raise LayoutError(f"unknown layout '{layout}' (NHWC or NCHW)")
            channels = x.shape[1] if chosen == "NCHW" else x.shape[-1]
            if want is None and channels not in CHANNELS:
                raise LayoutError(f"images of shape {x.shape} in layout {chosen} have {channels} channels; "
                                  "images need 1 or 3")
        else:
            if want is not None:
                nchw, nhwc = x.shape[1:] == want, x.shape[1:] == (want[1], want[2], want[0])
            else:
                nchw, nhwc = x.shape[1] in CHANNELS, x.shape[-1] in CHANNELS
            if nchw and nhwc:
                raise LayoutError(f"images of shape {x.shape} are ambiguous: the channels could be axis 1 "
                                  f"(NCHW) or the last axis (NHWC); {settle}")
            if not (nchw or nhwc):
                raise _wrong_shape(x.shape, want) if want is not None else LayoutError(
                    f"images of shape {x.shape} have no channel axis: neither axis 1 nor the last axis holds "
                    "1 or 3 channels")
            chosen = "NCHW" if nchw else "NHWC"
        out = x if chosen == "NCHW" else x.transpose(0, 3, 1, 2)
    else:
        raise _wrong_shape(x.shape, want) if want is not None else LayoutError(
            f"images must be (N, H, W, C), (N, C, H, W) or (N, H, W) for one channel, got shape {x.shape}")
    if want is not None and out.shape[1:] != want:
        raise _wrong_shape(x.shape, want)
    return np.ascontiguousarray(out)


def _wrong_shape(got: tuple, want: tuple) -> LayoutError:
    c, h, w = want
    return LayoutError(f"expected images of shape (N, {h}, {w}, {c}) or (N, {c}, {h}, {w}), got {tuple(got)}")


def raw_batch(x, input_shape: Sequence[int], layout: Optional[str] = None) -> np.ndarray:
    """A user's raw input -> a batch in the stored layout, raw units (no normalization).

    ``input_shape``: the run's (C, H, W) for images or (D,) for vectors. Images: (N, H, W, C)
    or (N, C, H, W) (by :func:`to_nchw`, the expected shape known), one image (H, W, C) /
    (C, H, W), or (N, H, W) for one channel -> (N, C, H, W). Vectors: anything of N rows of D
    numbers -> (N, D). A shape that fits none is one :class:`LayoutError` line.
    """
    x = np.asarray(x)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        x = x.reshape(len(x), -1)
        if x.shape[1] != shape[0]:
            raise LayoutError(f"expected vectors of {shape[0]} features, got {x.shape[1]}")
        return x
    c, h, w = shape
    if x.ndim == 3 and x.shape in ((c, h, w), (h, w, c)):
        x = x[None]  # one image (a 3-D array of any other shape is a batch of grey images)
    return to_nchw(x, layout, shape=shape, settle="pass layout='NHWC' or 'NCHW'")
