"""Atomic artifact writes and safe checkpoint loading.

Every artifact is written to a temporary file in the same folder and then ``os.replace``d into
place, so a killed process leaves either the old file or the new one, never half of one.
Checkpoints load with ``torch.load(weights_only=True)`` (tensors, numbers, strings and plain
containers only) and final weights as safetensors: loading never executes pickled code.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file as _st_load
from safetensors.torch import save as _st_save

from ..errors import SpecialistsError, one_line


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def read_json(path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecialistsError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise SpecialistsError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def write_npy(path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def read_npy(path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise SpecialistsError(f"missing file: {path}") from None
    except ValueError as exc:
        raise SpecialistsError(f"{path}: not a readable .npy array ({exc})") from None


def save_state(path, state: dict) -> Path:
    """A training-state checkpoint (model, optimizer, scheduler, epoch, ...) for resuming."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return write_bytes(path, buf.getvalue())


def load_state(path, map_location="cpu") -> dict:
    """Load a training-state checkpoint without executing pickled code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise SpecialistsError(f"missing checkpoint: {path}") from None
    except Exception as exc:  # truncated, corrupt or code-carrying pickles
        raise SpecialistsError(f"{path}: unreadable checkpoint ({one_line(exc)})") from None


def save_weights(path, model: torch.nn.Module, metadata: dict | None = None) -> Path:
    """Final weights as safetensors; ``metadata`` (str -> JSON-able) goes in the header."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v, default=_jsonable) for k, v in (metadata or {}).items()}
    return write_bytes(path, _st_save(tensors, metadata=meta))


def load_weights(path, model: torch.nn.Module) -> torch.nn.Module:
    """Load safetensors weights into ``model``; a mismatch is one clear line."""
    try:
        tensors = _st_load(str(path))
    except FileNotFoundError:
        raise SpecialistsError(f"missing weights: {path}") from None
    except Exception as exc:
        raise SpecialistsError(f"{path}: unreadable weights ({one_line(exc)})") from None
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise SpecialistsError(f"{path}: weights do not fit the model ({one_line(exc, 300)})") from None
    return model

