"""The one image-layout rule (specialists.core.layout) on hand-built arrays, and the resolvers
that call it: the data set builder, npz files, training/inference preprocessing and the
torch-free runtime's preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specialists.core.layout import LayoutError, raw_batch, to_nchw
from specialists.data.build import _to_images
from specialists.data.preprocess import Preprocessing
from specialists.errors import SpecialistsError
from specialists.inference.onnx_runtime import NumpyPreprocessing


def _numbered(*shape) -> np.ndarray:
    """An array whose every entry is distinct (its flat index), so a wrong transpose shows."""
    return np.arange(int(np.prod(shape))).reshape(shape)


def _nchw_by_hand(x_nhwc: np.ndarray) -> np.ndarray:
    """out[n, c, h, w] = x[n, h, w, c], element by element."""
    n, h, w, c = x_nhwc.shape
    out = np.empty((n, c, h, w), x_nhwc.dtype)
    for i in range(n):
        for k in range(c):
            for r in range(h):
                for s in range(w):
                    out[i, k, r, s] = x_nhwc[i, r, s, k]
    return out


def test_nhwc_is_moved_and_nchw_kept():
    x = _numbered(2, 4, 5, 3)  # last axis 3, axis 1 4: NHWC
    got = to_nchw(x)
    np.testing.assert_array_equal(got, _nchw_by_hand(x))
    assert got.flags.c_contiguous
    y = _numbered(2, 3, 4, 5)  # axis 1 3, last axis 5: NCHW, untouched
    np.testing.assert_array_equal(to_nchw(y), y)
    g = _numbered(2, 6, 7, 1)  # one channel, last
    np.testing.assert_array_equal(to_nchw(g), g.reshape(2, 1, 6, 7))


def test_nhw_gets_a_channel_axis():
    x = _numbered(4, 3, 3)  # any (N, H, W), even one whose sizes look like channels
    got = to_nchw(x)
    assert got.shape == (4, 1, 3, 3)
    np.testing.assert_array_equal(got[:, 0], x)


def test_ambiguous_shapes_are_refused_unless_a_layout_settles_them():
    x = _numbered(2, 3, 5, 3)  # axis 1 and the last axis both 3
    with pytest.raises(LayoutError, match=r"\(2, 3, 5, 3\) are ambiguous.*layout='NHWC' or 'NCHW'"):
        to_nchw(x)
    np.testing.assert_array_equal(to_nchw(x, "NCHW"), x)
    np.testing.assert_array_equal(to_nchw(x, "nhwc"), _nchw_by_hand(x))
    with pytest.raises(LayoutError, match="meta.json"):
        to_nchw(_numbered(2, 1, 4, 1), settle="meta.json settles it")  # the caller's remedy ends the line
    with pytest.raises(LayoutError, match="unknown layout 'NWHC'"):
        to_nchw(x, "NWHC")


def test_shapes_without_a_channel_axis_are_refused():
    with pytest.raises(LayoutError, match="no channel axis"):
        to_nchw(_numbered(2, 4, 5, 6))
    with pytest.raises(LayoutError, match="have 5 channels"):
        to_nchw(_numbered(2, 4, 6, 5), "NHWC")
    with pytest.raises(LayoutError, match=r"got shape \(2, 3\)"):
        to_nchw(_numbered(2, 3))


def test_a_known_image_shape_decides_and_checks():
    # (C, H, W) = (3, 4, 3): the channels are 3 and so is the width, yet only one layout gives it
    x = _numbered(2, 4, 3, 3)  # (N, H, W, C)
    np.testing.assert_array_equal(to_nchw(x, shape=(3, 4, 3)), _nchw_by_hand(x))
    y = _numbered(2, 3, 4, 3)  # (N, C, H, W)
    np.testing.assert_array_equal(to_nchw(y, shape=(3, 4, 3)), y)
    with pytest.raises(LayoutError, match=r"expected images of shape \(N, 4, 3, 3\) or \(N, 3, 4, 3\)"):
        to_nchw(_numbered(2, 3, 5, 5), shape=(3, 4, 3))
    # C == H == W: both layouts give it; refused unless a layout settles it
    z = _numbered(2, 3, 3, 3)
    with pytest.raises(LayoutError, match="ambiguous"):
        to_nchw(z, shape=(3, 3, 3))
    np.testing.assert_array_equal(to_nchw(z, "NHWC", shape=(3, 3, 3)), _nchw_by_hand(z))


def test_raw_batch_single_images_and_vectors():
    one = _numbered(4, 5, 3)  # one (H, W, C) image
    np.testing.assert_array_equal(raw_batch(one, (3, 4, 5)), _nchw_by_hand(one[None]))
    np.testing.assert_array_equal(raw_batch(one.transpose(2, 0, 1), (3, 4, 5)), _nchw_by_hand(one[None]))
    grey = _numbered(6, 4, 5)  # a batch of six one-channel images
    np.testing.assert_array_equal(raw_batch(grey, (1, 4, 5)), grey[:, None])
    with pytest.raises(LayoutError, match=r"expected images of shape \(N, 4, 5, 3\)"):
        raw_batch(grey, (3, 4, 5))
    np.testing.assert_array_equal(raw_batch(_numbered(2, 2, 3), (6,)), _numbered(2, 6))
    with pytest.raises(LayoutError, match="expected vectors of 5 features, got 6"):
        raw_batch(_numbered(2, 6), (5,))


def test_every_resolver_follows_the_rule():
    """The builder, torch preprocessing and numpy preprocessing give the same arrays and the
    same refusals (the builder once silently took an ambiguous array as NCHW)."""
    x = _numbered(2, 4, 5, 3).astype(np.uint8)
    np.testing.assert_array_equal(_to_images(x, "here"), _nchw_by_hand(x))
    amb = _numbered(2, 3, 5, 3).astype(np.uint8)
    with pytest.raises(SpecialistsError, match="here: images of shape .* ambiguous"):
        _to_images(amb, "here")
    np.testing.assert_array_equal(_to_images(amb, "here", "NCHW"), amb)

    info = {"input_shape": [3, 3, 3], "scale": 1 / 255, "mean": [0.0] * 3, "std": [1.0] * 3}
    cube = _numbered(2, 3, 3, 3).astype(np.uint8)  # C == H == W
    for pre in (Preprocessing(info), NumpyPreprocessing(info)):
        with pytest.raises(SpecialistsError, match="ambiguous"):
            pre.to_batch(cube)
        got = pre.to_batch(cube, layout="NHWC")
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        np.testing.assert_array_equal(got, _nchw_by_hand(cube))
