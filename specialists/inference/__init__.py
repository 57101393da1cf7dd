"""Inference on a trained run: the routed ensemble, the student, the generalist, ``predict``,
``export`` (ONNX) and the torch-free ONNX runtime.

Names load on first use (PEP 562), so ``from specialists.inference.onnx_runtime import
OnnxEnsemble`` serves an export in a process without torch: only ``ensemble`` and
``predictor`` (and what imports them) need it.
"""

import importlib

_PUBLIC = {
    "Predictor": ".predictor",
    "SingleModel": ".predictor",
    "Student": ".predictor",
    "SpecialistEnsemble": ".ensemble",
    "OnnxModel": ".onnx_runtime",
    "OnnxEnsemble": ".onnx_runtime",
}


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_PUBLIC)
