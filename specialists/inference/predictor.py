"""Raw inputs -> probabilities: the base every inference model of a run shares, and the
single-model predictors (the generalist, the distilled :class:`Student`).

Inputs ``x`` are raw, as the data set stores them: uint8 images (N, H, W, C) or (N, C, H, W)
with the run's channel count, float vectors (N, D), or for a text run strings (a list of them,
or one), tokenized by the run's own tokenizer. They are normalized by the run's
``data.json`` through the same :class:`~specialists.data.Preprocessing` the training batches
use; pass ``normalized=True`` for tensors that are already normalized (as the pipeline's
batches are).
"""

from __future__ import annotations

import torch

from ..data import Preprocessing
from ..device import autocast, channels_last
from ..errors import SpecialistsError
from ..models import is_soft_tree
from ..rundir import Run
from ..rundir.config import student_model_config

Tensor = torch.Tensor


def open_run(run, device: str | None, verify: bool = True) -> Run:
    """A :class:`Run` as given, or opened from its directory (``device``: None keeps the run's;
    ``verify``: check every file loaded against the manifest)."""
    if isinstance(run, Run):
        return run if device is None or torch.device(device) == run.device else Run(run.cfg, str(device), run.verify)
    return Run.open(run, device or "auto", verify=verify)


def top_classes(p: Tensor, names: list[str], k: int, ids=None) -> list[dict]:
    """The ``k`` most probable entries of one distribution ``p`` (C,) as
    ``[{"class", "name", "prob"}]``; ``ids`` maps positions to class ids (a specialist's subset)."""
    v, i = p.topk(min(k, p.shape[0]))
    cls = [int(ids[j]) if ids is not None else int(j) for j in i.tolist()]
    return [{"class": c, "name": names[c], "prob": float(pv)} for pv, c in zip(v.tolist(), cls)]


class Predictor:
    """Raw input -> probabilities, in chunks, in inference mode (bf16 autocast on CUDA).

    Subclasses implement :meth:`proba` for one normalized batch.
    """

    def __init__(self, info: dict, device: torch.device | str, batch_size: int = 1024):
        self.info = info
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.class_names: list[str] = info["class_names"]
        self.num_classes: int = info["num_classes"]
        self.input_shape = tuple(info["input_shape"])
        self.preprocessing = Preprocessing(info, self.device)

    def preprocess(self, x, normalized: bool = False) -> Tensor:
        """Raw inputs (see the module doc) -> normalized float32 on the device, channels-last
        on CUDA: what :meth:`proba` takes. ``normalized``: ``x`` already is (only moved)."""
        return channels_last(x.to(self.device, self.preprocessing.dtype) if normalized else self.preprocessing(x))

    def proba(self, x: Tensor) -> Tensor:
        """One prepared batch (B, ...) -> probabilities (B, C) float32 on the device."""
        raise NotImplementedError

    @torch.inference_mode()
    def predict_proba(self, x, normalized: bool = False) -> Tensor:
        """Probabilities (N, C) float32 on the device."""
        x = [x] if isinstance(x, str) else x
        out = [self.proba(self.preprocess(x[i:i + self.batch_size], normalized))
               for i in range(0, len(x), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.num_classes, device=self.device)

    def predict(self, x, normalized: bool = False) -> Tensor:
        """Class ids (N,) int64."""
        return self.predict_proba(x, normalized).argmax(1)


class SingleModel(Predictor):
    """One classifier of a run (the generalist or the student) behind the same API."""

    def __init__(self, model: torch.nn.Module, info: dict, device, batch_size: int = 1024):
        super().__init__(info, device, batch_size)
        self.model = model.to(self.device).eval()

    def proba(self, x: Tensor) -> Tensor:
        with autocast(self.device):
            return torch.softmax(self.model(x).float(), 1)

    @classmethod
    def generalist_from_run(cls, run, device: str | None = None, verify: bool = True) -> "SingleModel":
        run = open_run(run, device, verify)
        return cls(run.load_generalist(), run.data_info(), run.device)


class Student(SingleModel):
    """The distilled student of a run: ``Student.from_run(run_dir).predict_proba(x)``.

    A ``soft_tree`` student predicts with the leaf of its most probable path;
    :meth:`explain` reads that path, :meth:`predict_mixture` gives the whole tree's mixture.
    """

    @property
    def tree(self):
        """The soft decision tree itself (SpecialistsError for a neural student)."""
        if not is_soft_tree(self.model):
            raise SpecialistsError(f"this student is a {type(self.model).__name__}, not a soft decision tree "
                                   "(student.model.name=soft_tree): it has no path of decisions to read")
        return self.model

    @torch.inference_mode()
    def predict_mixture(self, x, normalized: bool = False) -> Tensor:
        """A soft tree's mixture ``sum_l P_l(x) Q_l`` (N, C) float32 on the device."""
        tree = self.tree
        out = [tree.mixture_proba(self.preprocess(x[i:i + self.batch_size], normalized))
               for i in range(0, len(x), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.num_classes, device=self.device)

    @torch.inference_mode()
    def explain(self, x, normalized: bool = False, k: int = 5) -> list[dict]:
        """Per example, a soft tree's decision as one readable path: ``{"leaf", "path_prob",
        "decisions": [{"node", "depth", "p_right", "turn", "prob"}], "leaf_top", "mixture_top"}``
        (``prob``: the probability of the turn taken; ``path_prob``: their product)."""
        tree = self.tree
        xb = self.preprocess(x, normalized)
        mixture = tree.mixture_proba(xb).cpu()
        out = []
        for path, mix in zip(tree.decision_paths(xb), mixture):
            q = path.pop("leaf_q")
            out.append({**path, "leaf_top": top_classes(q, self.class_names, k),
                        "mixture_top": top_classes(mix, self.class_names, k)})
        return out

    @classmethod
    def from_run(cls, run, device: str | None = None, verify: bool = True) -> "Student":
        """``verify``: refuse a file changed since it was written (False skips the check)."""
        run = open_run(run, device, verify)
        if not run.student.weights.exists():
            raise SpecialistsError(f"no student in {run.dir}: run `specialists distill CONFIG` first")
        info = run.data_info()
        return cls(run.load_model(run.student, info["num_classes"], student_model_config(run.cfg)), info, run.device)
