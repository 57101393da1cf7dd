"""Where the device, the precision and the process's place among many are decided, in one place.

``auto`` picks CUDA when there is one. On CUDA, models and image batches are channels-last and
forward passes run under bf16 autocast; on the CPU neither (bf16 matmuls are slow there and
channels-last buys nothing), so CPU runs are plain float32 and reproducible.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
from torch import nn

from .errors import SpecialistsError, one_line

log = logging.getLogger("specialists")

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


_TORCHRUN = "torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; unset WORLD_SIZE for one process"


def _env_int(name: str, default: str | None = None) -> int:
    """The non-negative integer in environment variable ``name`` (``default`` when unset); one
    line when it is unset without a default, or not such an integer."""
    text = os.environ.get(name, "").strip() or default
    if text is None:
        raise SpecialistsError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {name} is not set ({_TORCHRUN})")
    if not text.isdigit():
        raise SpecialistsError(f"{name}={text!r} is not a non-negative integer ({_TORCHRUN})")
    return int(text)


def _wait_for_master(addr: str, port: int, deadline: float) -> None:
    """Wait until rank 0's store at ``addr:port`` accepts connections, or ``deadline``
    (``time.monotonic()``). Polled here because torch's own client, once it times out, prints
    C++ stack frames before raising."""
    while True:
        try:
            socket.create_connection((addr, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise torch.distributed.DistError(f"no answer at {addr}:{port} ({exc.strerror or one_line(exc)})") from None
            time.sleep(0.2)


def init_distributed(device: str = "auto", timeout_min: float = 10.0) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1):
    ``nccl`` on CUDA, ``gloo`` on the CPU. Returns whether this is a multi-process run.

    A missing or malformed variable is one line. A rank waits ``timeout_min`` minutes for its
    peers (``launch.dist_timeout``: to join, and later at every collective), then gives up in
    one line; a rank still waiting after a few seconds says once what it waits for."""
    size = _env_int("WORLD_SIZE", "1")
    if size <= 1:
        return False
    if torch.distributed.is_initialized():
        return True
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", "0")
    if rank >= size:
        raise SpecialistsError(f"RANK={rank} but WORLD_SIZE={size}: ranks are 0..{size - 1} ({_TORCHRUN})")
    addr = os.environ.get("MASTER_ADDR", "").strip()
    if not addr:
        raise SpecialistsError(f"WORLD_SIZE={size} but MASTER_ADDR is not set ({_TORCHRUN})")
    port = _env_int("MASTER_PORT")
    if not 1 <= port <= 65535:
        raise SpecialistsError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    seconds = timeout_min * 60
    me, peers = f"rank {rank} of {size}", f"the other ranks at {addr}:{port}"
    # said only when joining is slow: a healthy start of many ranks stays quiet
    notice = threading.Timer(min(5.0, seconds / 4), log.info, ("%s: waiting for %s (giving up after %g min: "
                                                              "launch.dist_timeout)", me, peers, timeout_min))
    notice.daemon = True
    notice.start()
    try:
        if rank > 0:
            _wait_for_master(addr, port, time.monotonic() + seconds)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=seconds))
    except torch.distributed.DistError as exc:  # the store timed out, or no rank 0 answered in time
        raise SpecialistsError(f"{me}: gave up waiting for {peers} after {timeout_min:g} min (launch.dist_timeout): "
                               f"{one_line(exc).rstrip('.')}; start all {size} ranks, or raise launch.dist_timeout") from None
    finally:
        notice.cancel()
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
