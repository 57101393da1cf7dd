"""Where the device, the precision and the process's place among many are decided, in one place.

``auto`` picks CUDA when there is one. On CUDA, models and image batches are channels-last and
forward passes run under bf16 autocast; on the CPU neither (bf16 matmuls are slow there and
channels-last buys nothing), so CPU runs are plain float32 and reproducible.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn

from .errors import SpecialistsError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. ``cuda`` without a GPU is a clear error.
    Under torchrun each rank gets its own GPU (``LOCAL_RANK``)."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecialistsError("device=cuda but no CUDA GPU is available (use device=cpu or auto)")
    if name == "cuda" and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
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


# --- many processes (torchrun + DDP) ---------------------------------------------------------
# Under torchrun every rank runs the same program on its own device, in lockstep: the ranks make
# the same decisions from the same files, rank 0 alone writes (``rundir.io``), and each write
# is a barrier before and after, so a file is never read while it is being replaced.


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a process group is running."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_distributed(device: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1):
    ``nccl`` on CUDA, ``gloo`` on the CPU. Returns whether this is a multi-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return True


def close_distributed() -> None:
    """Leave the process group once every rank is done: a rank that exits with it still open
    can abort in gloo's teardown ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def agree(value):
    """Rank 0's ``value`` on every rank (a decision made once, shared by all)."""
    if world()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (itself in one process)."""
    if world()[1] == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x / world()[1]
