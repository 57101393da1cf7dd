"""specialists: generalist + specialist ensembles (Hinton, Vinyals & Dean 2015, sections 4-5).

    from specialists import SpecialistEnsemble, Student
    ens = SpecialistEnsemble.from_run("runs/quickstart")
    q = ens.predict_proba(x)

The public API, by name (each loaded on first use, so ``import specialists`` stays cheap):
``SpecialistEnsemble``, ``Student``, ``SingleModel`` (inference on a trained run);
``OnnxModel``, ``OnnxEnsemble`` (serving a ``specialists export`` folder without torch);
``find_subsets`` (confusable-class discovery); ``score`` (generalist vs ensemble);
``load_config``, ``Run``, ``run_stage``, ``run_all`` (running the pipeline from Python).
The combination has its own module: ``from specialists.combine import combine, objective``.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "SpecialistEnsemble": "specialists.inference",
    "Student": "specialists.inference",
    "SingleModel": "specialists.inference",
    "OnnxModel": "specialists.inference.onnx_runtime",
    "OnnxEnsemble": "specialists.inference.onnx_runtime",
    "find_subsets": "specialists.core.subsets",
    "score": "specialists.core.scoring",
    "load_config": "specialists.rundir",
    "Run": "specialists.rundir",
    "run_stage": "specialists.stages.pipeline",
    "run_all": "specialists.stages.pipeline",
}


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'specialists' has no attribute {name!r}")


__all__ = sorted(_PUBLIC)
