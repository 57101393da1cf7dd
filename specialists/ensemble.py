"""The inference API: a generalist plus routed specialists, combined by ``combine``.

    from specialists import SpecialistEnsemble, Student
    ens = SpecialistEnsemble.from_run("runs/cifar100", device="cuda")
    q = ens.predict_proba(x)      # (N, C) on the ensemble's device
    ens.explain(x[:2])            # per example: generalist top classes, active specialists, q

Inputs ``x`` are raw, as the data set stores them: uint8 images (N, H, W, C) or (N, C, H, W)
with the run's channel count, or float vectors (N, D). Normalization comes from the run's
``data.json``; pass ``normalized=True`` for tensors that are already normalized (as the
pipeline's batches are).

Routing: the active set of an example is the specialists whose subset holds any of the
generalist's ``top_n`` classes. With ``routing="routed"`` each specialist runs only on the
examples that activate it; ``routing="all"`` runs every specialist on every example and makes
all of them active (the comparison the paper's routing saves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .combine import combine, prepare_subsets
from .errors import SpecialistsError
from .io import load_weights, read_json
from .run import Run
from .train import autocast

Tensor = torch.Tensor


class Predictor:
    """Raw input -> probabilities, in chunks, in inference mode (bf16 autocast on CUDA)."""

    def __init__(self, info: dict, device: torch.device, batch_size: int = 1024):
        self.info = info
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.class_names: list[str] = info["class_names"]
        self.num_classes: int = info["num_classes"]
        self.input_shape = tuple(info["input_shape"])
        shape = (1, -1, 1, 1) if len(self.input_shape) == 3 else (1, -1)
        self._mean = torch.tensor(info["mean"], dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(info["std"], dtype=torch.float32, device=self.device).view(shape)

    def preprocess(self, x) -> Tensor:
        """Raw inputs (see the module doc) -> normalized float32 on the device."""
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        if len(self.input_shape) == 3:
            c, h, w = self.input_shape
            if x.ndim == 3:
                x = x[None] if x.shape in ((c, h, w), (h, w, c)) else x[:, None]
            if x.ndim != 4:
                raise SpecialistsError(f"expected images of shape (N, {h}, {w}, {c}) or (N, {c}, {h}, {w}), got {tuple(x.shape)}")
            if tuple(x.shape[1:]) == (h, w, c) and tuple(x.shape[1:]) != (c, h, w):
                x = x.permute(0, 3, 1, 2)
            if tuple(x.shape[1:]) != (c, h, w):
                raise SpecialistsError(f"expected images of shape (N, {h}, {w}, {c}) or (N, {c}, {h}, {w}), got {tuple(x.shape)}")
            x = x.to(self.device, torch.float32) * float(self.info["scale"])
        else:
            x = x.reshape(len(x), -1).to(self.device, torch.float32)
            if x.shape[1] != self.input_shape[0]:
                raise SpecialistsError(f"expected vectors of {self.input_shape[0]} features, got {x.shape[1]}")
        return (x - self._mean) / self._std

    def _prepare(self, x: Tensor) -> Tensor:
        if self.device.type == "cuda" and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _proba_normalized(self, x: Tensor) -> Tensor:  # (B, ...) normalized -> (B, C)
        raise NotImplementedError

    @torch.inference_mode()
    def predict_proba(self, x, normalized: bool = False) -> Tensor:
        """Probabilities (N, C) float32 on the device."""
        n = len(x)
        out = []
        for i in range(0, n, self.batch_size):
            xb = x[i:i + self.batch_size]
            xb = xb.to(self.device, torch.float32) if normalized else self.preprocess(xb)
            out.append(self._proba_normalized(self._prepare(xb)))
        if not out:
            return torch.zeros(0, self.num_classes, device=self.device)
        return torch.cat(out)

    def predict(self, x, normalized: bool = False) -> Tensor:
        """Class ids (N,) int64."""
        return self.predict_proba(x, normalized).argmax(1)


def _load_model(run: Run, path: Path, num_classes: int, model_cfg=None):
    model = run.new_model(num_classes, model_cfg)
    return load_weights(path, model).to(run.device).eval()


class SingleModel(Predictor):
    """One classifier of a run (the generalist or the student) behind the same API."""

    def __init__(self, model, info: dict, device, batch_size: int = 1024):
        super().__init__(info, device, batch_size)
        self.model = model.to(self.device).eval()

    def _proba_normalized(self, x: Tensor) -> Tensor:
        with autocast(self.device):
            return torch.softmax(self.model(x).float(), 1)

    @classmethod
    def generalist_from_run(cls, run_dir, device: str = "auto") -> "SingleModel":
        run = Run.open(run_dir, device)
        return cls(run.load_generalist(), run.data_info(), run.device)


class Student(SingleModel):
    """The distilled student of a run: ``Student.from_run(run_dir).predict_proba(x)``."""

    @classmethod
    def from_run(cls, run_dir, device: str = "auto") -> "Student":
        from .config import student_model_config

        run = Run.open(run_dir, device)
        path = run.dir / "student" / "model.safetensors"
        if not path.exists():
            raise SpecialistsError(f"no student in {run_dir}: run `specialists distill CONFIG` first")
        info = run.data_info()
        model = _load_model(run, path, info["num_classes"], student_model_config(run.cfg))
        return cls(model, info, run.device)


class SpecialistEnsemble(Predictor):
    """Generalist + specialists, combined per example by minimizing the summed KL (``combine``).

    ``generalist``: a classifier over C classes; ``specialists[m]``: a classifier over
    ``len(subsets[m]) + 1`` outputs (the last is the dustbin); ``subsets[m]``: class ids.
    """

    def __init__(self, generalist, specialists: Sequence, subsets: Sequence, info: dict, device,
                 top_n: int = 1, solver: str = "em", routing: str = "routed", max_iter: int = 200,
                 tol: float = 1e-6, batch_size: int = 1024, ids: Sequence[int] | None = None):
        super().__init__(info, device, batch_size)
        if routing not in ("routed", "all"):
            raise ValueError(f"routing must be 'routed' or 'all', got {routing!r}")
        self.generalist = generalist.to(self.device).eval()
        self.specialists = [s.to(self.device).eval() for s in specialists]
        self.subsets = [torch.as_tensor(s, dtype=torch.long, device=self.device) for s in subsets]
        self.ids = list(ids) if ids is not None else list(range(len(subsets)))
        self.top_n, self.solver, self.routing = top_n, solver, routing
        self.max_iter, self.tol = max_iter, tol
        C = self.num_classes
        self.membership = torch.zeros(len(subsets), C, dtype=torch.bool, device=self.device)  # (M, C)
        for m, s in enumerate(self.subsets):
            self.membership[m, s] = True
        self.table = prepare_subsets(self.subsets, C, device=self.device) if subsets else None

    @classmethod
    def from_run(cls, run_dir, device: str = "auto", *, top_n: int | None = None, solver: str | None = None,
                 routing: str | None = None, specialists: Sequence[int] | None = None,
                 batch_size: int = 1024) -> "SpecialistEnsemble":
        """Load the generalist, the subsets and every trained specialist of ``run_dir``.

        ``specialists``: ids to use (default all); the combination settings default to the
        run's ``combine`` config. A missing specialist or a class-count mismatch is one line.
        """
        run = Run.open(run_dir, device)
        info = run.data_info()
        C = info["num_classes"]
        generalist = run.load_generalist()
        if generalist.num_classes != C:
            raise SpecialistsError(f"{run_dir}: the generalist has {generalist.num_classes} outputs but the data has {C} classes")
        path = run.dir / "subsets" / "subsets.json"
        if not path.exists():
            raise SpecialistsError(f"{run_dir} has no subsets: run `specialists find-subsets CONFIG` first")
        entries = read_json(path)["subsets"]
        if specialists is not None:
            known = {e["id"] for e in entries}
            bad = sorted(set(specialists) - known)
            if bad:
                raise SpecialistsError(f"{run_dir}: no specialist with id {bad[0]}")
            entries = [e for e in entries if e["id"] in set(specialists)]
        missing = [e["id"] for e in entries if not (run.specialist_dir(e["id"]) / "metrics.json").exists()]
        if missing:
            raise SpecialistsError(f"{run_dir}: specialist(s) {missing} are not trained: run "
                                   f"`specialists train-specialists CONFIG` first")
        models, subsets = [], []
        for e in entries:
            if max(e["classes"]) >= C:
                raise SpecialistsError(f"{run_dir}: subset {e['id']} names class {max(e['classes'])} but the run has {C} classes")
            models.append(_load_model(run, run.specialist_dir(e["id"]) / "model.safetensors", len(e["classes"]) + 1))
            subsets.append(e["classes"])
        c = run.cfg.combine
        return cls(generalist, models, subsets, info, run.device, top_n=top_n or c.top_n, solver=solver or c.solver,
                   routing=routing or c.routing, max_iter=c.max_iter, tol=c.tol, batch_size=batch_size,
                   ids=[e["id"] for e in entries])

    # --- the pieces ----------------------------------------------------------------------
    def route(self, p_general: Tensor) -> Tensor:
        """Active set (B, M) bool: specialists holding any of the generalist's top-n classes."""
        B, M = len(p_general), len(self.subsets)
        if M == 0:
            return torch.zeros(B, 0, dtype=torch.bool, device=p_general.device)
        if self.routing == "all":
            return torch.ones(B, M, dtype=torch.bool, device=p_general.device)
        top = p_general.topk(min(self.top_n, p_general.shape[1]), dim=1).indices  # (B, n)
        return self.membership[:, top].any(-1).T  # (M, B, n) -> (B, M)

    def components(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Normalized inputs (B, ...) -> (p_general (B, C), [p_m (B, |S_m|+1)], active (B, M)).

        Each specialist runs only on the rows that activate it (all rows with routing=all);
        rows it did not run on hold zeros, which ``combine`` ignores.
        """
        with autocast(self.device):
            p_g = torch.softmax(self.generalist(x).float(), 1)
        active = self.route(p_g)
        p_specs = []
        for m, model in enumerate(self.specialists):
            out = torch.zeros(len(x), len(self.subsets[m]) + 1, device=x.device)
            rows = torch.nonzero(active[:, m]).squeeze(1)
            if len(rows):
                xb = x if len(rows) == len(x) else x[rows]
                with autocast(self.device):
                    out[rows] = torch.softmax(model(xb).float(), 1)
            p_specs.append(out)
        return p_g, p_specs, active

    def _combine(self, p_g: Tensor, p_specs: list[Tensor], active: Tensor) -> Tensor:
        if not self.specialists:
            return p_g
        return combine(p_g, self.table, p_specs, active, self.solver, max_iter=self.max_iter, tol=self.tol)

    def _proba_normalized(self, x: Tensor) -> Tensor:
        return self._combine(*self.components(x))

    @torch.inference_mode()
    def components_all(self, x, normalized: bool = False) -> tuple[Tensor, list[Tensor], Tensor]:
        """``components`` over a whole array, in chunks of ``batch_size``: p_general (N, C),
        [p_m (N, |S_m| + 1)], active (N, M), on the device."""
        g, specs, act = [], [[] for _ in self.specialists], []
        for i in range(0, len(x), self.batch_size):
            xb = x[i:i + self.batch_size]
            xb = xb.to(self.device, torch.float32) if normalized else self.preprocess(xb)
            p_g, p_specs, active = self.components(self._prepare(xb))
            g.append(p_g)
            act.append(active)
            for m, p in enumerate(p_specs):
                specs[m].append(p)
        if not g:
            return (torch.zeros(0, self.num_classes, device=self.device),
                    [torch.zeros(0, len(s) + 1, device=self.device) for s in self.subsets],
                    torch.zeros(0, len(self.subsets), dtype=torch.bool, device=self.device))
        return torch.cat(g), [torch.cat(p) for p in specs], torch.cat(act)

    @torch.inference_mode()
    def combine_all(self, p_general: Tensor, p_specs: list[Tensor], active: Tensor,
                    select: Sequence[int] | None = None) -> Tensor:
        """Combine precomputed components (N rows) in chunks of ``batch_size``.

        ``select``: positions of the specialists to use (the rest are left out, as if never
        trained); the ablation evaluates many such selections from one set of forward passes.
        A specialist's routed rows do not depend on which others are present, so this equals
        an ensemble built from the selected specialists alone.
        """
        sel = list(range(len(self.specialists))) if select is None else sorted(select)
        if not sel:
            return p_general.clone()
        table = self.table if len(sel) == len(self.specialists) else prepare_subsets(
            [self.subsets[m] for m in sel], self.num_classes, device=self.device)
        out = []
        for i in range(0, len(p_general), self.batch_size):
            rows = slice(i, i + self.batch_size)
            out.append(combine(p_general[rows], table, [p_specs[m][rows] for m in sel], active[rows][:, sel],
                               self.solver, max_iter=self.max_iter, tol=self.tol))
        return torch.cat(out)

    def predict_all(self, x, normalized: bool = False) -> dict:
        """Generalist and ensemble probabilities and the active sets, in one pass:
        ``{"generalist": (N, C), "ensemble": (N, C), "active": (N, M)}`` on the device."""
        p_g, p_specs, active = self.components_all(x, normalized)
        return {"generalist": p_g, "ensemble": self.combine_all(p_g, p_specs, active), "active": active}

    @torch.inference_mode()
    def explain(self, x, normalized: bool = False, k: int = 5) -> list[dict]:
        """Per example: the generalist's top-k classes, each active specialist's distribution
        (its top classes and dustbin mass), and the combined top-k."""
        xb = x.to(self.device, torch.float32) if normalized else self.preprocess(x)
        p_g, p_specs, active = self.components(self._prepare(xb))
        q = self._combine(p_g, p_specs, active)
        names = self.class_names

        def top(p, ids=None):
            kk = min(k, p.shape[0])
            v, i = p.topk(kk)
            return [{"class": int(ids[j]) if ids is not None else int(j),
                     "name": names[int(ids[j]) if ids is not None else int(j)], "prob": float(pv)}
                    for pv, j in zip(v.tolist(), i.tolist())]

        out = []
        for b in range(len(xb)):
            specs = []
            for m in torch.nonzero(active[b]).flatten().tolist():
                p = p_specs[m][b]
                specs.append({"id": self.ids[m], "size": len(self.subsets[m]),
                              "top": top(p[:-1], self.subsets[m].tolist()), "dustbin": float(p[-1])})
            out.append({"generalist": top(p_g[b]), "specialists": specs, "ensemble": top(q[b])})
        return out
