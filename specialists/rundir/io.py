"""Atomic, reproducible artifact writes and safe, verified loads.

Every artifact is written to a temporary file in the same folder and then ``os.replace``d into
place, so a killed process leaves either the old file or the new one, never half of one. The
temporary file's name carries its writer's host and pid (``.NAME.HOST-PID.XXXX.tmp``), so one
left by a killed writer is recognized and removed by :func:`clean_stale_temp_files`. Files get
the process's umask like any other program's (not ``mkstemp``'s 0600), and a write that fails
(a read-only folder, a full disk) is one :class:`SpecialistsError` line naming the file.

Checkpoints load with ``torch.load(weights_only=True)`` (tensors, numbers, strings and plain
containers only) and final weights as safetensors: loading never executes pickled code.
``state.pt`` files carry their own sha256, so a damaged one is refused instead of resumed;
safetensors headers are written with sorted keys, so equal weights give equal bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file as _st_load
from safetensors.torch import save as _st_save

from ..core.digest import file_sha256  # noqa: F401  (re-exported: the run's modules import it from here)
from ..device import agree, barrier, is_main, world
from ..errors import SpecialistsError, one_line

STATE_MAGIC = b"SPECIALISTS-STATE-1\n"  # then the payload's sha256 (32 bytes), then torch.save's bytes


def _host() -> str:
    return socket.gethostname().replace(".", "_")  # no dots: the tag is found by splitting on them


def _writer_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cannot_write(path: Path, exc: OSError) -> SpecialistsError:
    return SpecialistsError(f"{path}: cannot write ({exc.strerror or one_line(exc)})")


def rank0(action: Callable[[], Any]) -> Any:
    """Do ``action`` (a change to the run directory) on rank 0 alone, between two barriers: every
    rank has made its decisions from the files as they were, and all see the change after. When
    it fails, every rank raises (rank 0 its own error, the others one line quoting it). In one
    process, just ``action()``."""
    if world()[1] == 1:
        return action()
    barrier()
    result, error = None, None
    if is_main():
        try:
            result = action()
        except BaseException as exc:  # shared below, then raised
            error = exc
    failed = agree(None if error is None else one_line(error))
    if error is not None:
        raise error
    if failed is not None:
        raise SpecialistsError(f"rank 0 failed: {failed}")
    return result


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, rename it into place
    (rank 0 alone, in a multi-process run: see :func:`rank0`)."""
    rank0(lambda: _atomic_write(Path(path), write, mode))
    return Path(path)


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` with its times (rank 0 alone)."""
    rank0(lambda: shutil.copy2(src, dst))


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise


def clean_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files under ``folder`` whose writer (a process on this host) is gone.

    Returns what was deleted (rank 0 alone deletes). Another live process's files, and other
    hosts', are left alone.
    """
    return rank0(lambda: _clean_stale(folder)) or []


def _clean_stale(folder: Path) -> list[Path]:
    host, removed = _host(), []
    for p in Path(folder).rglob(".*.tmp"):
        tag = p.name[:-len(".tmp")].rsplit(".", 2)
        who = tag[-2] if len(tag) == 3 else ""
        h, _, pid = who.rpartition("-")
        if h != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def read_json(path, damaged: str = "") -> Any:
    """The JSON in ``path``; a missing, unreadable or invalid file is one line (``damaged``: how
    to recover from an invalid one, added to that line)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecialistsError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecialistsError(f"{path}: not valid JSON ({one_line(exc)})" + (f"; {damaged}" if damaged else "")) from None
    except OSError as exc:
        raise SpecialistsError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None


def write_npy(path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def read_npy(path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise SpecialistsError(f"missing file: {path}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise SpecialistsError(f"{path}: not a readable .npy array ({one_line(exc)})") from None


def save_state(path, state: dict) -> Path:
    """A training-state checkpoint (model, optimizer, scheduler, epoch, ...) for resuming,
    with the sha256 of its payload in a header."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return write_bytes(path, STATE_MAGIC + hashlib.sha256(payload).digest() + payload)


def load_state(path, map_location="cpu") -> dict:
    """Load a training-state checkpoint without executing pickled code; a damaged file (its
    checksum does not match, it is truncated, it carries code) is one line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SpecialistsError(f"missing checkpoint: {path}") from None
    except OSError as exc:
        raise SpecialistsError(f"{path}: unreadable checkpoint ({exc.strerror or one_line(exc)})") from None
    if data.startswith(STATE_MAGIC):
        n = len(STATE_MAGIC)
        digest, data = data[n:n + 32], data[n + 32:]
        if hashlib.sha256(data).digest() != digest:
            raise SpecialistsError(f"{path}: damaged checkpoint (its sha256 does not match its contents)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, corrupt or code-carrying pickles
        raise SpecialistsError(f"{path}: unreadable checkpoint ({one_line(exc)})") from None


def _canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted (the library writes its
    metadata map in an order that varies between processes)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def save_weights(path, model: torch.nn.Module, metadata: dict | None = None) -> Path:
    """Final weights as safetensors; ``metadata`` (str -> JSON-able) goes in the header.
    Equal weights and metadata give byte-identical files."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v, default=_jsonable, sort_keys=True) for k, v in (metadata or {}).items()}
    return write_bytes(path, _canonical_safetensors(_st_save(tensors, metadata=meta)))


def weights_metadata(path) -> dict:
    """The metadata a safetensors file was saved with (:func:`save_weights`), JSON-decoded."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return {k: json.loads(v) for k, v in meta.items()}
    except FileNotFoundError:
        raise SpecialistsError(f"missing weights: {path}") from None
    except Exception as exc:
        raise SpecialistsError(f"{path}: unreadable weights ({one_line(exc)})") from None


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

