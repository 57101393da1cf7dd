"""Where the device and the precision are decided, in one place.

``auto`` picks CUDA when there is one. On CUDA, models and image batches are channels-last and
forward passes run under bf16 autocast; on the CPU neither (bf16 matmuls are slow there and
channels-last buys nothing), so CPU runs are plain float32 and reproducible.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .errors import SpecialistsError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecialistsError("device=cuda but no CUDA GPU is available (use device=cpu or auto)")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """An image batch (B, C, H, W) on CUDA in channels-last memory format; anything else as is."""
    if x.is_cuda and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_model(model: nn.Module, device: torch.device, image: bool) -> nn.Module:
    """``model`` on ``device``, channels-last for images on CUDA."""
    model = model.to(device)
    if device.type == "cuda" and image:
        model = model.to(memory_format=torch.channels_last)
    return model


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for honest wall-clock timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
