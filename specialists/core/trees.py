"""The soft decision tree's math (Frosst & Hinton 2017, "Distilling a Neural Network Into a
Soft Decision Tree"): path probabilities, the training loss, the balance penalty and its
running averages.

A complete binary tree of depth ``d`` has ``N = 2^d - 1`` inner nodes and ``L = 2^d`` leaves.
Nodes are numbered breadth first (heap order): node 0 is the root, node i's children are
``2i + 1`` (left) and ``2i + 2`` (right); leaves are numbered 0..L-1 left to right. Inner node
i sends an example right with probability ``p_i(x) = sigmoid(beta * (x . w_i + b_i))``; the
*branch logits* below are ``beta * (x . w_i + b_i)`` (B, N). The probability of reaching a node
is the product of the branch probabilities on the way (``P^i(x)``; ``P_l(x)`` for a leaf), and
leaf l holds a distribution ``Q_l = softmax(phi_l)`` over the C classes.

Everything here works in log space (``logsigmoid``), so a deep path's tiny probability is
not rounded to zero before it is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TREE_LOSSES = ("expected", "mixture")


def num_inner(depth: int) -> int:
    """Inner nodes of a complete tree of ``depth`` levels of decisions: ``2^depth - 1``."""
    return 2 ** depth - 1


def node_depths(depth: int) -> torch.Tensor:
    """Each inner node's depth (N,) int64: 0 for the root, 1 for its children, ..."""
    return torch.cat([torch.full((2 ** d,), d, dtype=torch.long) for d in range(depth)]) if depth else \
        torch.zeros(0, dtype=torch.long)


def path_log_probs(branch_logits: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch logits (B, N) -> (log P^i of reaching each inner node (B, N), log P_l of each leaf (B, L)).

    Level by level: the children of a level's nodes get ``log P + log(1 - p)`` (left) and
    ``log P + log p`` (right), interleaved so that node j's children are 2j and 2j + 1 of the
    next level (heap order).
    """
    b = branch_logits.shape[0]
    log_right, log_left = F.logsigmoid(branch_logits), F.logsigmoid(-branch_logits)
    level = branch_logits.new_zeros(b, 1)  # log P of the root: log 1
    reach = []
    for d in range(depth):
        lo, hi = 2 ** d - 1, 2 ** (d + 1) - 1
        reach.append(level)
        level = torch.stack((level + log_left[:, lo:hi], level + log_right[:, lo:hi]), dim=2).flatten(1)
    inner = torch.cat(reach, 1) if reach else branch_logits.new_zeros(b, 0)
    return inner, level


def max_path_leaf(leaf_log_probs: torch.Tensor) -> torch.Tensor:
    """The leaf of the single most probable path, per example (B,) int64: the tree's decision."""
    return leaf_log_probs.argmax(1)


def path_nodes(leaf: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inner nodes on the way to each leaf and the turns taken there.

    ``leaf`` (B,) int64 -> (nodes (B, depth) int64, right (B, depth) bool): leaf l's binary
    digits, most significant first, are its turns (1 = right); from node n a turn r leads to
    node ``2n + 1 + r``.
    """
    shifts = torch.arange(depth - 1, -1, -1, device=leaf.device)
    right = (leaf[:, None] >> shifts) & 1
    nodes = torch.zeros_like(right)
    for d in range(1, depth):
        nodes[:, d] = 2 * nodes[:, d - 1] + 1 + right[:, d - 1]
    return nodes, right.bool()


def mixture_log_proba(leaf_log_probs: torch.Tensor, leaf_log_q: torch.Tensor) -> torch.Tensor:
    """``log sum_l P_l(x) Q_l`` (B, C): the whole tree's distribution (every leaf, weighted)."""
    return torch.logsumexp(leaf_log_probs[:, :, None] + leaf_log_q[None], dim=1)


def tree_loss(leaf_log_probs: torch.Tensor, leaf_log_q: torch.Tensor, targets: torch.Tensor,
              kind: str = "expected") -> torch.Tensor:
    """The tree's data loss toward target distributions ``targets`` (B, C), mean over the batch.

    - ``expected``: ``sum_l P_l(x) * (-sum_k T_k log Q_l,k)``, each leaf's cross-entropy with
      the targets weighted by its path probability (the paper's description: "the cross
      entropy between each leaf, weighted by its path probability, and the target
      distribution"). Every leaf on a probable path must answer well on its own, which is what
      the max-path prediction needs.
    - ``mixture``: ``-sum_k T_k log sum_l P_l Q_l,k``, the cross-entropy of the mixture (a
      mixture of experts' likelihood; a lower bound of ``expected`` by Jensen's inequality).

    (The paper's printed formula, ``-log sum_l P_l sum_k T_k log Q_l,k``, takes the log of a
    negative number; these are its two well-defined readings.)
    """
    if kind == "expected":
        leaf_ce = -(targets @ leaf_log_q.T)  # (B, L)
        return (leaf_log_probs.exp() * leaf_ce).sum(1).mean()
    if kind == "mixture":
        return -(targets * mixture_log_proba(leaf_log_probs, leaf_log_q)).sum(1).mean()
    raise ValueError(f"unknown tree loss '{kind}' (known: {', '.join(TREE_LOSSES)})")


def right_shares(node_log_probs: torch.Tensor, branch_logits: torch.Tensor, eps: float = 1e-12):
    """``alpha_i``: the path-weighted share of node i's inputs sent right, over a batch.

    ``alpha_i = sum_x P^i(x) p_i(x) / sum_x P^i(x)``; returns (alpha (N,), reached (N,) bool),
    ``reached`` False where the batch's path mass at the node is below ``eps`` (no estimate).
    """
    reach = node_log_probs.exp()  # (B, N)
    mass = reach.sum(0)
    alpha = (reach * torch.sigmoid(branch_logits)).sum(0) / mass.clamp_min(eps)
    return alpha, mass > eps


def window_decays(depths: torch.Tensor, window: float) -> torch.Tensor:
    """Decay ``gamma_d = 1 - 1 / (window * 2^d)`` of each inner node's running average (N,),
    from the nodes' depths (N,) (:func:`node_depths`), on their device.

    The window (in steps) doubles with each level: a node d levels down sees about 2^-d of the
    batch, so its share needs about 2^d batches for the same number of examples (the paper's
    remedy for the vanishing sample at deep nodes). ``window = 1``: the root uses the batch alone.
    """
    return 1.0 - 1.0 / (window * torch.pow(2.0, depths.double()))


def running_shares(previous: torch.Tensor, alpha: torch.Tensor, reached: torch.Tensor,
                   decays: torch.Tensor) -> torch.Tensor:
    """One update of the running averages: ``a <- gamma a + (1 - gamma) alpha`` where the batch
    reached the node, ``a`` unchanged where it did not. Differentiable in ``alpha``."""
    updated = decays * previous + (1 - decays) * alpha
    return torch.where(reached, updated, previous)


def balance_penalty(shares: torch.Tensor, depths: torch.Tensor, strength: float, eps: float = 1e-6) -> torch.Tensor:
    """``-sum_i lambda 2^-d(i) [0.5 log a_i + 0.5 log(1 - a_i)]``, with ``a_i`` clamped to
    ``[eps, 1 - eps]``: smallest (``lambda 2^-d log 2`` per node) when every node splits its
    inputs evenly, growing without bound as a node sends everything one way.
    ``shares`` (N,), ``depths`` (N,) int64."""
    a = shares.clamp(eps, 1 - eps)
    weight = strength * torch.pow(2.0, -depths.to(a.dtype))
    return -(weight * (0.5 * torch.log(a) + 0.5 * torch.log1p(-a))).sum()


def straight_through(value: torch.Tensor, gradient_of: torch.Tensor) -> torch.Tensor:
    """``value`` forward, the gradient of ``gradient_of`` backward.

    The penalty is evaluated at the running average (a stable estimate at deep nodes) but
    differentiated through the batch's share: the average's own gradient carries a factor
    ``1 - gamma_d = 2^-d / window``, which on top of ``lambda 2^-d`` would leave the deep
    nodes with no balancing force at all.
    """
    return value.detach() + gradient_of - gradient_of.detach()

