"""Cost and the accuracy-cost frontier: FLOPs counted against hand counts, the cascade's
threshold meeting its FLOPs target, the Pareto flags against brute force, and the frontier
built from hand-made stage JSON (no model, no data: the whole file runs in a few seconds)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from specialists.core import metrics
from specialists.core.cost import (
    cascade_proba,
    cascade_threshold,
    count_flops,
    fit_cascade,
    flops_per_example,
    routed_flops,
    training_flops_per_example,
)
from specialists.core.frontier import best_within, pareto_flags
from specialists.reports import frontier as frontier_report

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- FLOPs


class LinearThenConv(nn.Module):
    """x (B, 8) -> Linear(8, 16) -> (B, 1, 4, 4) -> Conv2d(1, 2, 3) -> (B, 2, 2, 2)."""

    def __init__(self):
        super().__init__()
        self.lin, self.conv = nn.Linear(8, 16), nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.conv(self.lin(x).view(-1, 1, 4, 4))


# hand counts per example (a multiply-add is 2 FLOPs; biases and element-wise ops count 0)
LINEAR = 2 * 8 * 16                   # 256
CONV = 2 * (2 * 2 * 2) * (1 * 3 * 3)  # 2 x output elements x (in channels x kernel) = 144
# backward: the linear layer's weight gradient (its input needs none) 256, the convolution's
# input gradient 144 and weight gradient 144
TRAIN = LINEAR + CONV + LINEAR + 2 * CONV  # 944


def test_flops_of_a_known_layer_stack_equal_the_hand_count():
    torch.manual_seed(0)
    net, x = LinearThenConv(), torch.randn(5, 8)
    assert count_flops(net, x) == 5 * (LINEAR + CONV)
    assert flops_per_example(net, x) == LINEAR + CONV == 400
    assert flops_per_example(net, x, batch_size=2) == 400  # in chunks: the same per example
    assert flops_per_example(net, x[:0]) == 0.0


def test_an_eval_mode_transformer_layer_is_counted_in_full():
    # by hand, per token of one layer (d = 64, feed-forward 128, L = 32 tokens): q, k, v and out
    # projections 4 d^2, scores and weighted values 2 L d, feed-forward 2 d ff; times 2 for
    # multiply-add. Its fused eval fast path and CPU attention kernel counted 0 before.
    d, ff, L, B = 64, 128, 32, 8
    layer = torch.nn.TransformerEncoderLayer(d, 4, ff, batch_first=True).eval()
    with torch.no_grad():
        got = count_flops(layer, torch.randn(B, L, d))
    assert got == 2 * B * L * (4 * d * d + 2 * L * d + 2 * d * ff)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_training_flops_are_forward_loss_and_backward_and_change_nothing():
    torch.manual_seed(0)
    net = LinearThenConv().eval()
    x = torch.randn(4, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.inference_mode():  # as the stages call it: gradients are switched back on inside
        got = training_flops_per_example(net, x, lambda m, xb: m(xb).square().mean())
    assert got == TRAIN == 944
    assert not net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_routed_flops_is_the_generalist_plus_each_specialist_on_its_share():
    assert routed_flops(100.0, [80.0, 40.0], [0.25, 0.5]) == 100 + 20 + 20
    assert routed_flops(100.0, [], []) == 100.0
    with pytest.raises(ValueError, match="one entry per specialist"):
        routed_flops(100.0, [1.0], [])


# ----------------------------------------------------------------------------- the cascade

VAL_MAX = [0.9, 0.3, 0.6, 0.45, 0.8, 0.55, 0.7, 0.35, 0.95, 0.5]  # 10 validation examples


def test_cascade_threshold_meets_its_flops_target_on_validation():
    # generalist 100 FLOPs, second generalist 200: a target of 160 asks the second on 30%
    fit = fit_cascade(torch.tensor(VAL_MAX), 100.0, 200.0, 160.0)
    assert fit["target_fraction"] == pytest.approx(0.3)
    assert fit["val_fraction"] == pytest.approx(0.3) and fit["val_flops"] == pytest.approx(160.0)
    assert fit["threshold"] == pytest.approx((0.45 + 0.5) / 2)  # between the 3rd and 4th lowest
    consulted = [v for v in VAL_MAX if v < fit["threshold"]]
    assert sorted(consulted) == [0.3, 0.35, 0.45]
    # clipped: never cheaper than the first model alone, never dearer than both on every example
    low, high = fit_cascade(VAL_MAX, 100.0, 200.0, 50.0), fit_cascade(VAL_MAX, 100.0, 200.0, 900.0)
    assert (low["target_fraction"], low["val_fraction"], low["threshold"]) == (0.0, 0.0, 0.0)
    assert (high["target_fraction"], high["val_fraction"]) == (1.0, 1.0) and high["threshold"] > 1.0
    assert high["val_flops"] == 300.0
    with pytest.raises(ValueError, match="second_flops"):
        fit_cascade(VAL_MAX, 100.0, 0.0, 160.0)


def test_cascade_threshold_with_ties_takes_the_nearest_reachable_share():
    v = [0.5, 0.5, 0.5, 0.9]
    t = cascade_threshold(v, 0.5)  # 2 wanted; 0, 3 or 4 reachable: 3 is nearest
    assert sum(x < t for x in v) == 3
    t = cascade_threshold(v, 0.375)  # 1.5 wanted: 0 and 3 equally near, the cheaper wins
    assert sum(x < t for x in v) == 0
    with pytest.raises(ValueError, match="fraction"):
        cascade_threshold(v, 1.5)


def test_cascade_runs_the_second_model_only_where_the_first_is_unsure():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)

    def first(x):
        return torch.softmax(a(x), 1)

    def second(x):
        return torch.softmax(b(x), 1)

    x = torch.randn(12, 8)
    p1, p2 = first(x).detach(), second(x).detach()
    t = float(p1.max(1).values.median())
    with torch.no_grad():
        n_flops = count_flops(lambda: cascade_proba(first, second, x, t))
        q, asked = cascade_proba(first, second, x, t)
    assert torch.equal(asked, p1.max(1).values.double() < t) and 0 < int(asked.sum()) < 12
    assert torch.allclose(q[asked], (p1[asked] + p2[asked]) / 2) and torch.equal(q[~asked], p1[~asked])
    assert n_flops == 12 * 2 * 8 * 4 + int(asked.sum()) * 2 * 8 * 4  # the second only on its rows


# ----------------------------------------------------------------------------- the Pareto front


def _brute_force(top1, cost):
    def dominates(j, i):
        return top1[j] >= top1[i] and cost[j] <= cost[i] and (top1[j] > top1[i] or cost[j] < cost[i])

    ok = [t is not None and c is not None for t, c in zip(top1, cost)]
    return [ok[i] and not any(ok[j] and dominates(j, i) for j in range(len(top1)) if j != i)
            for i in range(len(top1))]


def test_pareto_flags_match_brute_force_with_ties():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 12)
        # few distinct values: ties in accuracy, in cost and whole duplicate points
        top1 = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(n)]
        cost = [rng.choice([1.0, 2.0, 3.0]) for _ in range(n)]
        for i in range(n):
            if rng.random() < 0.1:
                (top1 if rng.random() < 0.5 else cost)[i] = None
        assert pareto_flags(top1, cost) == _brute_force(top1, cost), (top1, cost)
    # by hand: the same point twice is on the front twice; a cheaper equal one knocks out the dearer
    assert pareto_flags([0.5, 0.5, 0.5, 0.6], [1.0, 1.0, 2.0, 3.0]) == [True, True, False, True]
    with pytest.raises(ValueError):
        pareto_flags([0.5], [])


def test_best_within_the_budget():
    top1, cost = [0.5, 0.7, 0.7, 0.9, None], [1.0, 2.0, 1.5, 9.0, 1.0]
    assert best_within(top1, cost, 2.0) == 2  # 0.7 at 1.5 beats 0.7 at 2.0; 0.9 is over budget
    assert best_within(top1, cost, 2.0, [True, True, False, True, True]) == 1
    assert best_within(top1, cost, 0.5) is None


# ----------------------------------------------------------------------------- the frontier from JSON


def _run_json():
    """A run's JSON by hand: generalist 100 FLOPs, two specialists of 80 FLOPs routed on 25% and
    50% of the test examples (ensemble 100 + 20 + 40 = 160), and every control."""
    ev = {"n": 8, "num_specialists": 2, "generalist": {"top1": 0.5}, "ensemble": {"top1": 0.75},
          "significance": {"bootstrap": {"ci95": [0.0, 0.5]}},
          "timing": {"generalist_s_per_example": 0.001, "routed_s_per_example": 0.002},
          "per_specialist": [{"id": 3, "flops_per_example": 80.0, "routed_fraction": 0.25, "train_compute": 10.0},
                             {"id": 5, "flops_per_example": 80.0, "routed_fraction": 0.5, "train_compute": 30.0}],
          "cost": {"generalist_flops": 100.0, "ensemble_flops": 160.0,
                   "train_compute": {"generalist": 1000.0, "specialists": 40.0, "ensemble": 1040.0}}}
    ablation = {"subset_ablation": {"rows": [{"k": 0, "ids": [], "top1": 0.5, "ci95": [0, 0]},
                                             {"k": 1, "ids": [5], "top1": 0.625, "ci95": [0.0, 0.25]},
                                             {"k": 2, "ids": [3, 5], "top1": 0.75, "ci95": [0.0, 0.5]}]}}
    control = {"test_top1": 0.625, "inference_flops": 100.0, "train_compute": 40.0, "train_samples": 40}
    student = {"teacher": "ensemble", "inference_flops": 50.0, "train_compute": 300.0,
               "comparisons": {k: {"name": k, "test_top1": t, "seconds_per_example": 0.001}
                               for k, t in (("generalist", 0.5), ("ensemble", 0.75), ("student", 0.625),
                                            ("born_again", 0.5), ("two_generalists", 0.875), ("cascade", 0.75))},
               "control": {"born_again": {"inference_flops": 50.0, "train_compute": 200.0},
                           "second_generalist": {"train_compute": 1000.0, "inference_flops": 100.0},
                           "two_generalist_average": {"inference_flops": 200.0},
                           "cascade": {"inference_flops": 164.0, "ci95_vs_generalist": [0.1, 0.2]}}}
    y = np.arange(8) % 4
    right = {"generalist": [1, 1, 1, 1, 0, 0, 0, 0], "ensemble": [1, 1, 1, 1, 1, 1, 0, 0],
             "longer_generalist": [1, 1, 1, 1, 1, 0, 0, 0], "student": [1, 1, 1, 0, 1, 1, 0, 0],
             "born_again": [0, 1, 1, 1, 1, 0, 0, 0], "two_generalists": [1, 1, 1, 1, 1, 1, 1, 0],
             "cascade": [1, 1, 1, 1, 1, 0, 1, 0]}
    preds = {k: np.where(np.array(r, dtype=bool), y, (y + 1) % 4) for k, r in right.items()}
    return ev, ablation, control, student, preds, y


def test_frontier_entries_costs_and_best_control_from_the_json():
    ev, ablation, control, student, preds, y = _run_json()
    fr = frontier_report.build(ev, ablation, control, student, preds, y, bootstrap=200, seed=0)
    by = {m["key"]: m for m in fr["models"]}
    assert set(by) == {"generalist", "ensemble", "ensemble_k1", "longer_generalist", "student", "born_again",
                       "two_generalists", "cascade"}  # k = 0 and k = all are the generalist and the ensemble
    assert by["ensemble_k1"]["inference_flops"] == 100.0 + 80.0 * 0.5  # specialist 5 alone
    assert by["ensemble_k1"]["train_compute"] == 1000.0 + 30.0
    assert by["ensemble"]["inference_flops"] == 160.0 and by["ensemble"]["inference_ms"] == pytest.approx(1.0)
    # everything it took: generalist + specialists + the student's own; the generalist + its extra epochs; ...
    assert by["student"]["train_compute"] == 1000.0 + 40.0 + 300.0
    assert by["longer_generalist"]["train_compute"] == 1040.0
    assert by["born_again"]["train_compute"] == 1200.0
    assert by["two_generalists"]["train_compute"] == by["cascade"]["train_compute"] == 2000.0
    # recorded intervals are kept, the rest come from the predictions
    assert by["cascade"]["ci95_vs_generalist"] == [0.1, 0.2]
    want = metrics.paired_bootstrap(torch.from_numpy(preds["generalist"] == y), torch.from_numpy(preds["student"] == y),
                                    200, 0)["ci95"]
    assert by["student"]["ci95_vs_generalist"] == want
    flags = pareto_flags([m["top1"] for m in fr["models"]], [m["inference_flops"] for m in fr["models"]])
    assert [m["pareto"] for m in fr["models"]] == flags
    # the student (0.625 at 50) dominates the longer generalist and k = 1; the ensemble the cascade
    assert {k for k, m in by.items() if m["pareto"]} == {"student", "ensemble", "two_generalists"}
    # the best control at no more than 160 FLOPs (+5%): the cascade at 164 (0.75), not the
    # two-generalist average (0.875 at 200); the ensemble minus it, paired
    b = fr["best_control"]
    assert b["key"] == "cascade" and b["ensemble_minus_control"] == 0.0
    assert b["ci95"] == metrics.paired_bootstrap(torch.from_numpy(preds["cascade"] == y),
                                                 torch.from_numpy(preds["ensemble"] == y), 200, 0)["ci95"]
    sentence = frontier_report.best_control_sentence(fr)
    assert "cascade" in sentence and "+0.00 points" in sentence and "cannot tell" in sentence
    md = "\n".join(frontier_report.markdown(fr))
    assert "| cascade | 75.00% |" in md and "frontier.png" in md


def test_frontier_with_the_evaluation_alone():
    ev, *_ = _run_json()
    fr = frontier_report.build(ev)
    assert [m["key"] for m in fr["models"]] == ["generalist", "ensemble"]
    assert [m["pareto"] for m in fr["models"]] == [True, True]
    assert fr["best_control"] is None and "No control" in frontier_report.best_control_sentence(fr)


def test_frontier_plot(tmp_path):
    from specialists.reports.plots import plot_frontier

    ev, ablation, control, student, preds, y = _run_json()
    fr = frontier_report.build(ev, ablation, control, student, preds, y, bootstrap=50)
    path = plot_frontier(fr["models"], tmp_path / "frontier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_brute_force_itself_on_a_known_case():
    # the reference the flags are checked against, checked once by hand
    assert _brute_force([0.3, 0.5, 0.4], [1.0, 2.0, 3.0]) == [True, True, False]
    assert _brute_force([None, 0.2], [1.0, None]) == [False, False]
