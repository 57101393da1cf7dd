"""The soft decision tree student (Frosst & Hinton 2017), ``student.model.name=soft_tree``.

A complete binary tree of ``depth`` levels of decisions (``student.model.depth``, default 8:
255 inner nodes, 256 leaves) on the flattened, normalized input. Every inner node is one
learned filter ``w_i`` (in the input's shape, so it can be drawn) and bias ``b_i``, sharing one
learned inverse temperature ``beta`` that lets the tree make its decisions sharper than the
filters' scale alone would; every leaf is a learned distribution over the classes. The math
is in :mod:`specialists.core.trees`.

``forward(x)`` returns the log-distribution of the leaf on the single most probable path
(B, C): softmax of it is that leaf's ``Q``, so the tree's prediction is one readable path of
decisions, and every evaluation that takes logits takes the tree as it is. ``mixture_proba``
gives the whole tree's distribution (every leaf weighted by its path probability).
``forward(x, targets, ...)`` returns the training loss instead: under DDP the gradients are
only synchronized through ``forward``, so the loss must be computed inside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.trees import (
    balance_penalty,
    max_path_leaf,
    mixture_log_proba,
    node_depths,
    num_inner,
    path_log_probs,
    path_nodes,
    right_shares,
    running_shares,
    straight_through,
    tree_loss,
    window_decays,
)
from ..errors import ModelError
from .registry import register

DEFAULT_DEPTH = 8


def _widened(t: torch.Tensor) -> torch.Tensor:
    """float32 under bf16/fp16 autocast: the products of deep paths need the range (float64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class SoftDecisionTree(nn.Module):
    """``input_shape``: (C, H, W) or (D,); inputs are flattened to D features.

    Parameters: ``inner`` (an ``nn.Linear`` D -> N: row i is node i's filter), ``beta`` (a
    scalar), ``leaves`` (L, C) logits ``phi``. Buffer ``shares`` (N,): the running averages
    ``a_i`` of the share of each node's inputs sent right (saved with the weights, so a resumed
    training continues them).
    """

    def __init__(self, input_shape: tuple, num_classes: int, depth: int = DEFAULT_DEPTH):
        super().__init__()
        if depth < 1:
            raise ModelError(f"a soft tree needs depth >= 1, got {depth}")
        self.input_shape, self.depth = tuple(int(s) for s in input_shape), int(depth)
        features = 1
        for s in self.input_shape:
            features *= s
        self.inner = nn.Linear(features, num_inner(depth))
        self.beta = nn.Parameter(torch.ones(()))
        self.leaves = nn.Parameter(torch.zeros(2 ** depth, num_classes))  # every leaf starts uniform
        self.register_buffer("shares", torch.full((num_inner(depth),), 0.5))
        self.register_buffer("depths", node_depths(depth), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.leaves.shape[1]

    def branch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``beta * (x . w_i + b_i)`` (B, N), float32 at least; ``sigmoid`` of it is each node's p(right)."""
        z = _widened(self.inner(x.flatten(1)))
        return self.beta.to(z.dtype) * z

    def paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(branch logits (B, N), log P^i of reaching each inner node (B, N), log P_l (B, L))."""
        z = self.branch_logits(x)
        return (z, *path_log_probs(z, self.depth))

    def leaf_log_q(self) -> torch.Tensor:
        """``log Q_l`` (L, C), float32 at least."""
        return F.log_softmax(_widened(self.leaves), 1)

    def mixture_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_l P_l(x) Q_l`` (B, C): the whole tree's distribution."""
        return mixture_log_proba(self.paths(x)[2], self.leaf_log_q()).exp()

    @torch.no_grad()
    def decision_paths(self, x: torch.Tensor) -> list[dict]:
        """The prediction as one path of decisions, per example: ``{"leaf", "path_prob",
        "decisions": [{"node", "depth", "p_right", "turn", "prob"}], "leaf_q"}`` (``prob``: the
        probability of the turn taken, ``path_prob`` their product, ``leaf_q`` (C,) the leaf's
        distribution, on the CPU)."""
        z, _, leaf_lp = self.paths(x)
        leaf = max_path_leaf(leaf_lp)
        nodes, right = path_nodes(leaf, self.depth)
        p_right = torch.sigmoid(z).gather(1, nodes).cpu()
        path_prob = leaf_lp.gather(1, leaf[:, None]).squeeze(1).exp().cpu()
        leaf_q = self.leaf_log_q().exp()[leaf].cpu()
        out = []
        for b in range(len(x)):
            turns = zip(nodes[b].tolist(), right[b].tolist(), p_right[b].tolist())
            out.append({"leaf": int(leaf[b]), "path_prob": float(path_prob[b]), "leaf_q": leaf_q[b],
                        "decisions": [{"node": n, "depth": d, "p_right": p, "turn": "right" if r else "left",
                                       "prob": p if r else 1 - p} for d, (n, r, p) in enumerate(turns)]})
        return out

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, loss: str = "expected",
                penalty: float = 0.0, window: float = 1.0) -> torch.Tensor:
        """Without ``targets``: the max-path leaf's ``log Q`` (B, C). With ``targets`` (B, C), a
        distribution per example: the scalar training loss, ``tree_loss`` (``loss``) plus the
        balance penalty of strength ``penalty`` at the running averages (``window``: the
        root's averaging window in steps, doubling per level), which it updates in training mode.
        """
        z, node_lp, leaf_lp = self.paths(x)
        log_q = self.leaf_log_q()
        if targets is None:
            return log_q[max_path_leaf(leaf_lp)]
        data = tree_loss(leaf_lp, log_q, targets.to(log_q.dtype), loss)
        if not penalty:
            return data
        alpha, reached = right_shares(node_lp, z)
        average = running_shares(self.shares, alpha, reached, window_decays(self.depths, window).to(alpha))
        if self.training:
            self.shares.copy_(average.detach())
        shares = straight_through(average, torch.where(reached, alpha, average.detach()))
        return data + balance_penalty(shares, self.depths, penalty)


def is_soft_tree(model: nn.Module) -> bool:
    """Whether ``model`` (or the module a DDP wrapper holds) is a :class:`SoftDecisionTree`."""
    return isinstance(getattr(model, "module", model), SoftDecisionTree)


@register("soft_tree")
def soft_tree(cfg, num_classes: int, input_shape: tuple) -> SoftDecisionTree:
    return SoftDecisionTree(input_shape, num_classes, cfg.depth if cfg.depth is not None else DEFAULT_DEPTH)
