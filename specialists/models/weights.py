"""Weights from the user's files: a pretrained backbone (``model.pretrained``) or a trained
classifier (``generalist.init``). Nothing executes code on load and nothing is downloaded.

A file is safetensors, or a ``.pt``/``.pth``/``.bin`` state dict read with
``torch.load(weights_only=True)`` (a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
unwrapped). Its keys may be this project's (``features.*``, ``head.*``) or those the model's own
library writes (``torch.save(torchvision.models.resnet50(num_classes=C).state_dict(), PATH)``
works as it is): a library's head keys (``fc``, ``classifier.1``, ...) map to ``head``, the
rest to ``features``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.checks import first_non_finite
from ..errors import SpecialistsError, one_line
from .classifier import Classifier

log = logging.getLogger("specialists")


def read_state_dict(path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; anything else is one line naming ``what`` and the file."""
    path = Path(path).expanduser()
    where = f"{what} {path}"
    if not path.is_file():
        raise SpecialistsError(f"{where}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a weights file, truncated, or carrying code
        raise SpecialistsError(f"{where}: not a readable weights file ({one_line(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecialistsError(f"{where}: not a state dict (a mapping of parameter names to tensors)")
    bad = first_non_finite(state)
    if bad is not None:  # a model started from it trains to NaN, or is NaN outright with epochs=0
        raise SpecialistsError(f"{where}: tensor '{bad}' holds NaN or infinity (weights must be finite numbers)")
    return state


def _ours(model: Classifier, state: dict) -> dict:
    """``state`` with the keys of ``model`` (this project's already, or the model library's)."""
    own = model.state_dict()
    if any(k in own for k in state):
        return state
    out = {}
    for k, v in state.items():
        if model.head_name and (k == model.head_name or k.startswith(model.head_name + ".")):
            out["head" + k[len(model.head_name):]] = v
        else:
            out["features." + k] = v
    return out


def load_pretrained(model: Classifier, path) -> dict:
    """Load a backbone's weights into ``model``: every tensor whose name and shape fit; the head
    is re-initialized when its shape differs from the data set's classes. Returns the report
    (loaded / missing / unexpected keys, the head). A file that fits nothing is one line."""
    state = _ours(model, read_state_dict(path, "model.pretrained"))
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise SpecialistsError(f"model.pretrained {path}: none of its {len(state)} tensors fits the model")
    model.load_state_dict(fits, strict=False)
    head = [k for k in own if k.startswith("head.")]
    report = {
        "path": str(path),
        "loaded": len(fits), "missing": sorted(k for k in own if k not in fits),
        "unexpected": sorted(k for k in state if k not in own),
        "mismatched": sorted(k for k in state if k in own and own[k].shape != state[k].shape),
        "head": "loaded" if all(k in fits for k in head) else "re-initialized",
    }
    log.info("model.pretrained: %d tensors loaded, %d missing, %d unexpected, %d of another shape; head %s",
             report["loaded"], len(report["missing"]), len(report["unexpected"]), len(report["mismatched"]),
             report["head"])
    return report


def load_classifier(model: Classifier, path) -> dict:
    """Load a trained classifier's weights into ``model``, head included: every tensor must fit."""
    state = _ours(model, read_state_dict(path, "generalist.init"))
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    wrong = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or wrong:
        shown = wrong[0] + f" has shape {tuple(state[wrong[0]].shape)}, the model's {tuple(own[wrong[0]].shape)}" \
            if wrong else f"{len(missing)} tensors missing, e.g. {missing[0]}"
        raise SpecialistsError(f"generalist.init {path}: does not fit the model ({shown})")
    model.load_state_dict({k: state[k] for k in own})
    return {"path": str(path), "unexpected": sorted(k for k in state if k not in own)}


def load_student(model: Classifier, path) -> dict:
    """Start a student from ``student.model.pretrained``: a safetensors file (the config refuses
    other suffixes): a trained student's ``model.safetensors``, or a backbone under this
    project's or the model library's names. Every tensor of the file that the model has must
    have the model's shape (one line otherwise); the model's tensors the file lacks keep their
    initialization. Returns the report (path, loaded / missing / unexpected keys)."""
    state = _ours(model, read_state_dict(path, "student.model.pretrained"))
    own = model.state_dict()
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if wrong:
        raise SpecialistsError(f"student.model.pretrained {path}: does not fit the student ({wrong[0]} has shape "
                               f"{tuple(state[wrong[0]].shape)}, the student's {tuple(own[wrong[0]].shape)})")
    fits = {k: v for k, v in state.items() if k in own}
    if not fits:
        raise SpecialistsError(f"student.model.pretrained {path}: none of its {len(state)} tensors is the student's")
    model.load_state_dict(fits, strict=False)
    report = {"path": str(path), "loaded": len(fits), "missing": sorted(k for k in own if k not in fits),
              "unexpected": sorted(k for k in state if k not in own)}
    log.info("student.model.pretrained: %d tensors loaded, %d missing, %d unexpected", report["loaded"],
             len(report["missing"]), len(report["unexpected"]))
    return report
