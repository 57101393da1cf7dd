"""The inference API: a generalist plus routed specialists, combined by ``combine``.

    from specialists import SpecialistEnsemble
    ens = SpecialistEnsemble.from_run("runs/cifar100", device="cuda")
    q = ens.predict_proba(x)      # (N, C) on the ensemble's device
    ens.explain(x[:2])            # per example: generalist top classes, active specialists, q

Routing: the active set of an example is the specialists whose subset holds any of the
generalist's ``top_n`` classes. With ``routing="routed"`` each specialist runs only on the
examples that activate it; ``routing="all"`` runs every specialist on every example and makes
all of them active (the comparison the paper's routing saves). ``gate``: the specialists run
only on the examples whose generalist top probability is below it; a sure generalist answers
alone, at its own cost.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.checks import ParameterError
from ..core.combine import ROUTINGS, combine, membership, prepare_subsets, route
from ..device import autocast
from ..errors import SpecialistsError
from ..models.branch import rows_of, tail_input
from .predictor import Predictor, Tensor, open_run, top_classes

KEEP = object()  # the gate argument left out: the run's (from_run), the ensemble's own (with_routing, select)


class SpecialistEnsemble(Predictor):
    """Generalist + specialists, combined per example by minimizing the summed KL (``combine``).

    ``generalist``: a classifier over C classes; ``specialists[m]``: a classifier over
    ``len(subsets[m]) + 1`` outputs (the last is the dustbin); ``subsets[m]``: class ids.
    """

    def __init__(self, generalist, specialists: Sequence, subsets: Sequence, info: dict, device,
                 top_n: int = 1, solver: str = "em", routing: str = "routed", max_iter: int = 200,
                 tol: float = 1e-6, batch_size: int = 1024, ids: Sequence[int] | None = None,
                 trunk=None, generalist_part=None, gate: float | None = None):
        super().__init__(info, device, batch_size)
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self.generalist = generalist.to(self.device).eval()
        # shared trunk (specialists.branch): run once per batch; the generalist's part and each
        # specialist then take its output. Whole networks: no trunk, the parts take the inputs.
        self.trunk = trunk.to(self.device).eval() if trunk is not None else None
        self.generalist_part = generalist_part.to(self.device).eval() if trunk is not None else self.generalist
        self.specialists = [s.to(self.device).eval() for s in specialists]
        self.subsets = [torch.as_tensor(s, dtype=torch.long, device=self.device) for s in subsets]
        self.ids = list(ids) if ids is not None else list(range(len(subsets)))
        self.top_n, self.solver, self.routing, self.gate = top_n, solver, routing, gate
        self.max_iter, self.tol = max_iter, tol
        self.membership = membership(self.subsets, self.num_classes, self.device)  # (M, C)
        self.table = prepare_subsets(self.subsets, self.num_classes, device=self.device) if subsets else None

    @classmethod
    def from_run(cls, run, device: str | None = None, *, top_n: int | None = None, solver: str | None = None,
                 routing: str | None = None, gate=KEEP, specialists: Sequence[int] | None = None,
                 batch_size: int = 1024, verify: bool = True) -> "SpecialistEnsemble":
        """Load the generalist, the subsets and every trained specialist of a run.

        ``run``: a run directory (or an open :class:`~specialists.rundir.Run`);
        ``specialists``: ids to use (default all); the combination settings default to the
        run's ``combine`` config (``gate``: a threshold, or None for every example). A missing
        specialist or a class-count mismatch is one line.
        ``verify``: check every file loaded against the size and sha256 recorded when it was
        written, refusing a changed one in one line (False skips the check, for speed).
        """
        run = open_run(run, device, verify)
        info = run.data_info()
        C = info["num_classes"]
        generalist = run.load_generalist()
        if generalist.num_classes != C:
            raise SpecialistsError(f"{run.dir}: the generalist has {generalist.num_classes} outputs but the data has "
                                   f"{C} classes")
        if not run.subsets_json.exists():
            raise SpecialistsError(f"{run.dir} has no subsets: run `specialists find-subsets CONFIG` first")
        entries = run.load_subsets()
        if specialists is not None:
            bad = sorted(set(specialists) - {e["id"] for e in entries})
            if bad:
                raise SpecialistsError(f"{run.dir}: no specialist with id {bad[0]}")
            entries = [e for e in entries if e["id"] in set(specialists)]
        missing = [e["id"] for e in entries if not run.specialist(e["id"]).metrics.exists()]
        if missing:
            raise SpecialistsError(f"{run.dir}: specialist(s) {missing} are not trained: run "
                                   f"`specialists train-specialists CONFIG` first")
        models, subsets = [], []
        for e in entries:
            if max(e["classes"]) >= C:
                raise SpecialistsError(f"{run.dir}: subset {e['id']} names class {max(e['classes'])} but the run has "
                                       f"{C} classes")
            models.append(run.load_specialist(e["id"], len(e["classes"]) + 1))
            subsets.append(e["classes"])
        trunk, part = run.split_generalist(generalist) if run.branch is not None else (None, None)
        c = run.cfg.combine
        try:
            return cls(generalist, models, subsets, info, run.device, top_n=top_n or c.top_n,
                       solver=solver or c.solver, routing=routing or c.routing, max_iter=c.max_iter, tol=c.tol,
                       batch_size=batch_size, ids=[e["id"] for e in entries], trunk=trunk, generalist_part=part,
                       gate=c.gate if gate is KEEP else gate)
        except ParameterError as exc:  # e.g. a subset repeating a class id
            raise SpecialistsError(f"{run.subsets_json}: {exc}") from None

    def with_routing(self, routing: str, gate=KEEP) -> "SpecialistEnsemble":
        """The same models and settings with another routing (and ``gate``, when given; None:
        every example), no reload."""
        return self.select(range(len(self.specialists)), routing, gate)

    def select(self, positions: Sequence[int], routing: str | None = None,
               gate=KEEP) -> "SpecialistEnsemble":
        """The ensemble with only the specialists at ``positions`` (same models, no reload)."""
        sel = sorted(positions)
        return SpecialistEnsemble(self.generalist, [self.specialists[m] for m in sel], [self.subsets[m] for m in sel],
                                  self.info, self.device, top_n=self.top_n, solver=self.solver,
                                  routing=routing or self.routing, max_iter=self.max_iter, tol=self.tol,
                                  batch_size=self.batch_size, ids=[self.ids[m] for m in sel], trunk=self.trunk,
                                  generalist_part=self.generalist_part, gate=self.gate if gate is KEEP else gate)

    # --- the pieces ----------------------------------------------------------------------
    def route(self, p_general: Tensor) -> Tensor:
        """Active set (B, M) bool: specialists holding any of the generalist's top-n classes
        (every specialist with routing=all), on the rows the gate lets through."""
        return route(p_general, self.membership, self.top_n, self.routing, self.gate)

    def components(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Normalized inputs (B, ...) -> (p_general (B, C), [p_m (B, |S_m|+1)], active (B, M)).

        Each specialist runs only on the rows that activate it (all rows with routing=all);
        rows it did not run on hold zeros, which ``combine`` ignores. With a shared trunk, the
        trunk runs once on the batch and every part (the generalist's, each specialist's) on its
        output.
        """
        with autocast(self.device):
            h = self.trunk(x) if self.trunk is not None else x
            p_g = torch.softmax(tail_input(self.generalist_part, h).float(), 1)
        active = self.route(p_g)
        p_specs = []
        for m, model in enumerate(self.specialists):
            out = torch.zeros(len(x), len(self.subsets[m]) + 1, device=x.device)
            rows = torch.nonzero(active[:, m]).squeeze(1)
            if len(rows):
                hb = h if len(rows) == len(x) else rows_of(h, rows)
                with autocast(self.device):
                    out[rows] = torch.softmax(tail_input(model, hb).float(), 1)
            p_specs.append(out)
        return p_g, p_specs, active

    def combine(self, p_general: Tensor, p_specs: list[Tensor], active: Tensor) -> Tensor:
        """One batch of components -> q (B, C), with the ensemble's solver settings."""
        if not self.specialists:
            return p_general
        return combine(p_general, self.table, p_specs, active, self.solver, max_iter=self.max_iter, tol=self.tol)

    def proba(self, x: Tensor) -> Tensor:
        return self.combine(*self.components(x))

    @torch.inference_mode()
    def components_all(self, x, normalized: bool = False) -> tuple[Tensor, list[Tensor], Tensor]:
        """``components`` over a whole array, in chunks of ``batch_size``: p_general (N, C),
        [p_m (N, |S_m| + 1)], active (N, M), on the device."""
        x = [x] if isinstance(x, str) else x
        return self.components_over(self.preprocess(x[i:i + self.batch_size], normalized)
                                    for i in range(0, len(x), self.batch_size))

    @torch.inference_mode()
    def components_over(self, batches) -> tuple[Tensor, list[Tensor], Tensor]:
        """``components`` over an iterable of prepared batches (a batcher's, say), concatenated."""
        g, specs, act = [], [[] for _ in self.specialists], []
        for xb in batches:
            p_g, p_specs, active = self.components(xb)
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
        return self._predicted(*self.components_all(x, normalized))

    def predict_over(self, batches) -> dict:
        """:meth:`predict_all` over an iterable of prepared batches (a batcher's, say)."""
        return self._predicted(*self.components_over(batches))

    def _predicted(self, p_g: Tensor, p_specs: list[Tensor], active: Tensor) -> dict:
        return {"generalist": p_g, "ensemble": self.combine_all(p_g, p_specs, active), "active": active}

    @torch.inference_mode()
    def explain(self, x, normalized: bool = False, k: int = 5) -> list[dict]:
        """Per example: the generalist's top-k classes, each active specialist's distribution
        (its top classes and dustbin mass), and the combined top-k."""
        xb = self.preprocess(x, normalized)
        p_g, p_specs, active = self.components(xb)
        q = self.combine(p_g, p_specs, active)
        names = self.class_names

        def top(p, ids=None):
            return top_classes(p, names, k, ids)

        out = []
        for b in range(len(xb)):
            specs = []
            for m in torch.nonzero(active[b]).flatten().tolist():
                p = p_specs[m][b]
                specs.append({"id": self.ids[m], "size": len(self.subsets[m]),
                              "top": top(p[:-1], self.subsets[m].tolist()), "dustbin": float(p[-1])})
            out.append({"generalist": top(p_g[b]), "specialists": specs, "ensemble": top(q[b])})
        return out
