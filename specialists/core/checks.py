"""Argument checks and array conversions shared by the core functions.

Core functions are a library API: like scikit-learn's estimators they validate their own
arguments and raise :class:`ParameterError` (a ``ValueError``) with one line naming the
argument. The config layer validates user settings before they reach here; a stage that
forwards a core error to the user rewraps it as a one-line ``SpecialistsError``.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch


class ParameterError(ValueError):
    """An impossible argument to a core function, described in one line that names it."""


def as_2d_probs(probs, name: str = "probs"):
    """Accept a numpy array (memmaps included) or a torch tensor of shape (N, C)."""
    if isinstance(probs, torch.Tensor):
        if probs.ndim != 2:
            raise ParameterError(f"{name} must be 2-D (N, C), got shape {tuple(probs.shape)}")
        return probs
    arr = np.asarray(probs)  # no copy for float32 arrays and memmaps
    if arr.ndim != 2:
        raise ParameterError(f"{name} must be 2-D (N, C), got shape {arr.shape}")
    return arr


def rows_as_tensor(probs, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) as a fresh float32 tensor we may modify in place.

    Always a copy (one chunk, never the whole matrix), so the caller's array is untouched
    and read-only memmaps work.
    """
    if isinstance(probs, torch.Tensor):
        return probs[start:stop].detach().to(dtype=torch.float32, copy=True)
    return torch.tensor(np.asarray(probs[start:stop], dtype=np.float32))


def to_numpy_f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ParameterError(f"{name} must be {bound}, got {value}")
    return value


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ParameterError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value




def first_non_finite(named: Mapping) -> str | None:
    """The name of the first entry of ``named`` (names to floats or tensors, e.g. a state dict)
    that holds NaN or infinity; None when every entry is finite. Integer and bool tensors are
    always finite. A tensor on a GPU is read back (one synchronization per tensor)."""
    for name, value in named.items():
        if isinstance(value, torch.Tensor):
            if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                return name
        elif isinstance(value, float) and not math.isfinite(value):
            return name
    return None
