"""Tests for the soft decision tree student: a depth-2 tree with fixed weights against values
computed by hand (path probabilities, prediction, both losses, the balance penalty), the
running averages' update rule and the penalty's straight-through gradient against an
independent float64 recomputation, its config refusals, and the tree trained end to end on
``synthetic`` and ``digits`` through the stage, with its control, pictures and ``--explain``."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config

from specialists.cli import main as cli_main
from specialists.core import trees
from specialists.errors import ConfigError, SpecialistsError
from specialists.inference import Student
from specialists.models.soft_tree import SoftDecisionTree
from specialists.rundir import Run, load_config
from specialists.stages import BY_KEY
from specialists.stages import student as student_mod

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread

# --------------------------------------------------------------- a depth-2 tree, by hand
# Two features, three inner nodes (0 the root, 1 its left child, 2 its right child), four
# leaves over three classes; inverse temperature 2.
W = [[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]
B_ = [0.0, 0.5, -1.0]
BETA = 2.0
PHI = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]]
X = [[0.5, -1.0], [-2.0, 0.25]]


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _by_hand(x):
    """p(right) of the three nodes, the reach of each node, the four leaves' path probabilities."""
    p = [_sig(BETA * (W[i][0] * x[0] + W[i][1] * x[1] + B_[i])) for i in range(3)]
    reach = [1.0, 1 - p[0], p[0]]
    leaves = [(1 - p[0]) * (1 - p[1]), (1 - p[0]) * p[1], p[0] * (1 - p[2]), p[0] * p[2]]
    return p, reach, leaves


def _tree() -> SoftDecisionTree:
    t = SoftDecisionTree((2,), 3, depth=2).double()
    with torch.no_grad():
        t.inner.weight.copy_(torch.tensor(W))
        t.inner.bias.copy_(torch.tensor(B_))
        t.beta.fill_(BETA)
        t.leaves.copy_(torch.tensor(PHI))
    return t


def test_heap_order_helpers():
    assert trees.num_inner(3) == 7
    assert trees.node_depths(3).tolist() == [0, 1, 1, 2, 2, 2, 2]
    # leaf 5 of a depth-3 tree is 101 in binary: right, left, right through nodes 0, 2, 5
    nodes, right = trees.path_nodes(torch.tensor([5, 0]), 3)
    assert nodes.tolist() == [[0, 2, 5], [0, 1, 3]]
    assert right.tolist() == [[True, False, True], [False, False, False]]


def test_depth_two_tree_equals_hand_computation():
    t = _tree()
    x = torch.tensor(X, dtype=torch.float64)
    z, node_lp, leaf_lp = t.paths(x)
    q = [_softmax(r) for r in PHI]
    targets = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    expected, mixture = 0.0, 0.0
    for b, xb in enumerate(X):
        p, reach, leaves = _by_hand(xb)
        np.testing.assert_allclose(torch.sigmoid(z[b]).tolist(), p, rtol=1e-12)
        np.testing.assert_allclose(node_lp[b].exp().tolist(), reach, rtol=1e-12)
        np.testing.assert_allclose(leaf_lp[b].exp().tolist(), leaves, rtol=1e-12)
        best = max(range(4), key=lambda leaf: leaves[leaf])
        # the prediction: the most probable path's leaf, as it is (not the mixture)
        np.testing.assert_allclose(t(x[b:b + 1])[0].exp().tolist(), q[best], rtol=1e-12)
        mix = [sum(leaves[leaf] * q[leaf][k] for leaf in range(4)) for k in range(3)]
        np.testing.assert_allclose(t.mixture_proba(x[b:b + 1])[0].tolist(), mix, rtol=1e-6)
        tb = targets[b].tolist()
        expected += sum(leaves[leaf] * -sum(tb[k] * math.log(q[leaf][k]) for k in range(3)) for leaf in range(4))
        mixture += -sum(tb[k] * math.log(mix[k]) for k in range(3))
    assert t(x, targets, loss="expected").item() == pytest.approx(expected / 2, rel=1e-12)
    assert t(x, targets, loss="mixture").item() == pytest.approx(mixture / 2, rel=1e-6)
    with pytest.raises(ValueError, match="unknown tree loss"):
        t(x, targets, loss="nope")

    # the paper's example of a readable decision: the path, its turns and their probabilities
    (path,) = t.decision_paths(x[:1])
    p, _, leaves = _by_hand(X[0])
    best = max(range(4), key=lambda leaf: leaves[leaf])
    assert path["leaf"] == best and path["path_prob"] == pytest.approx(leaves[best], rel=1e-12)
    turns = [d["turn"] for d in path["decisions"]]
    assert turns == [("right" if best >= 2 else "left"), ("right" if best % 2 else "left")]
    assert path["decisions"][0]["prob"] == pytest.approx(p[0] if best >= 2 else 1 - p[0], rel=1e-12)


def test_balance_penalty_equals_hand_computation():
    """The penalty at the running averages after one step from 0.5: with window 1 the root's
    average is the batch's own share, its children's half that, half the previous 0.5 (eval
    mode: the averages are read, not stored)."""
    t = _tree().eval()
    x = torch.tensor(X, dtype=torch.float64)
    targets = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    lam = 0.3
    alpha = []
    hand = [_by_hand(xb) for xb in X]
    for i in range(3):
        num = sum(reach[i] * p[i] for p, reach, _ in hand)
        den = sum(reach[i] for _, reach, _ in hand)
        alpha.append(num / den)
    depth = [0, 1, 1]
    a = [alpha[0], 0.5 * 0.5 + 0.5 * alpha[1], 0.5 * 0.5 + 0.5 * alpha[2]]
    penalty = -sum(lam * 2 ** -depth[i] * (0.5 * math.log(a[i]) + 0.5 * math.log(1 - a[i])) for i in range(3))
    data = t(x, targets).item()
    assert t(x, targets, penalty=lam, window=1.0).item() - data == pytest.approx(penalty, rel=1e-10)
    assert t.shares.tolist() == [0.5, 0.5, 0.5]  # eval: the running averages do not move
    # the minimum: every node splitting evenly costs lambda 2^-d log 2 each
    even = trees.balance_penalty(torch.full((3,), 0.5, dtype=torch.float64), torch.tensor(depth), lam)
    assert float(even) == pytest.approx(lam * (1 + 0.5 + 0.5) * math.log(2), rel=1e-12)


def test_running_averages_follow_their_update_rule():
    """a <- gamma_d a + (1 - gamma_d) alpha with gamma_d = 1 - 1 / (window 2^d), per training
    step; a node the batch does not reach keeps its average."""
    t = _tree().train()
    window = 2.0
    gamma = [1 - 1 / (window * 2 ** d) for d in (0, 1, 1)]
    a = [0.5, 0.5, 0.5]
    targets = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    batches = [X, [[3.0, 1.0], [0.25, 0.5]], [[-0.3, 0.7]]]
    for xs in batches:
        hand = [_by_hand(xb) for xb in xs]
        for i in range(3):
            alpha = sum(r[i] * p[i] for p, r, _ in hand) / sum(r[i] for _, r, _ in hand)
            a[i] = gamma[i] * a[i] + (1 - gamma[i]) * alpha
        t(torch.tensor(xs, dtype=torch.float64), targets[: len(xs)], penalty=0.1, window=window)
        np.testing.assert_allclose(t.shares.tolist(), a, rtol=1e-12)

    # an inverse temperature of 200 sends both examples left at the root with probability
    # 1 - e^-200: node 2 (right) is not reached, its average stays; nodes 0 and 1 move
    with torch.no_grad():
        t.beta.fill_(200.0)
    before = t.shares.clone()
    far_left = torch.tensor([[-1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    t(far_left, targets, penalty=0.1, window=window)
    assert t.shares[2] == before[2]
    assert t.shares[0] != before[0] and t.shares[1] != before[1]


def test_penalty_gradient_flows_through_the_batch_share():
    """The penalty's value is taken at the running average, its gradient through the batch's
    share (straight through): d/dtheta = sum_i dP/da(a_i) * d alpha_i/dtheta, recomputed here
    from alpha written out by hand."""
    lam, window = 0.5, 4.0
    t = _tree().train()
    with torch.no_grad():
        t.shares.copy_(torch.tensor([0.3, 0.6, 0.45], dtype=torch.float64))
    x = torch.tensor(X, dtype=torch.float64)
    targets = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    pen = t(x, targets, penalty=lam, window=window) - t(x, targets)
    t.zero_grad()
    pen.backward()
    got = t.inner.weight.grad.clone()

    # the reference: alpha_i(theta) by hand from the parameters, the average's value fixed
    ref = _tree()
    w = ref.inner.weight
    p = torch.sigmoid(BETA * (x @ w.T + ref.inner.bias))  # (2, 3)
    reach = torch.stack([torch.ones(2, dtype=torch.float64), 1 - p[:, 0], p[:, 0]], 1)
    alpha = (reach * p).sum(0) / reach.sum(0)
    gamma = torch.tensor([1 - 1 / window, 1 - 1 / (2 * window), 1 - 1 / (2 * window)], dtype=torch.float64)
    avg = (gamma * torch.tensor([0.3, 0.6, 0.45], dtype=torch.float64) + (1 - gamma) * alpha).detach()
    dpen_da = -lam * torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64) * (0.5 / avg - 0.5 / (1 - avg))
    (dpen_da * alpha).sum().backward()
    torch.testing.assert_close(got, w.grad, rtol=1e-10, atol=1e-12)
    assert got.abs().sum() > 0


def test_tree_targets_mix_the_teacher_and_the_labels_by_hand():
    """alpha softmax(z / T) + (1 - alpha) (one-hot smoothed by s); no teacher: the labels alone."""
    from types import SimpleNamespace

    from specialists.engine.steps import TreeTargets

    z = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]
    y = torch.tensor([0, 1])
    T, alpha, s = 2.0, 0.7, 0.1
    teacher = lambda x, idx: torch.tensor(z)  # noqa: E731  (logits; a probs teacher hands log p)
    cfg = SimpleNamespace(loss="expected", penalty=0.0, window=1.0)
    got = TreeTargets(teacher, T, alpha, cfg, label_smoothing=s).targets(None, y, None, 3)
    for b in range(2):
        soft = _softmax([v / T for v in z[b]])
        hard = [(1 - s) * (k == int(y[b])) + s / 3 for k in range(3)]
        np.testing.assert_allclose(got[b].tolist(), [alpha * a + (1 - alpha) * h for a, h in zip(soft, hard)],
                                   rtol=1e-6)
    labels_only = TreeTargets(None, T, alpha, cfg).targets(None, y, None, 3)
    assert labels_only.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_a_tree_on_vectors_flattens_them_and_draws_its_filters_as_strips(tmp_path):
    from specialists.reports.plots import plot_tree, plot_tree_path

    torch.manual_seed(0)
    t = SoftDecisionTree((12,), 4, depth=3)
    x = torch.randn(5, 12)
    z, _, leaf_lp = t.paths(x)
    torch.testing.assert_close(z, t.beta * (x @ t.inner.weight.T + t.inner.bias))
    assert t(x).shape == (5, 4) and torch.allclose(leaf_lp.exp().sum(1), torch.ones(5))
    names = ["a", "b", "c", "d"]
    plot_tree(t.inner.weight.detach().numpy(), t.leaf_log_q().exp().detach().numpy(), names, (12,), tmp_path / "t.png")
    (path,) = t.decision_paths(x[:1])
    filters = t.inner.weight.detach().numpy()[[d["node"] for d in path["decisions"]]]
    plot_tree_path(x[0].numpy(), filters, path["decisions"], path["leaf_q"].numpy(), names, (12,), tmp_path / "p.png")
    for f in ("t.png", "p.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ config refusals
@pytest.mark.parametrize("override, message", [
    (["model.name=soft_tree"], "model.name"),
    (["student.model.name=soft_tree", "student.model.depth=0"], "student.model.depth"),
    (["student.model.name=soft_tree", "student.model.depth=17"], "student.model.depth"),
    (["student.model.name=soft_tree", "student.model.width=8"], "student.model.width"),
    (["student.model.name=soft_tree", "student.tree.loss=nll"], "student.tree.loss"),
    (["student.tree.penalty=-1"], "student.tree.penalty"),
    (["student.tree.window=0.5"], "student.tree.window"),
])
def test_bad_tree_configs_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(None, ["data.name=synthetic", *override])
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ end to end
TREE_STUDENT = ["student.model.name=soft_tree", "student.model.depth=4", "student.optimizer=adamw",
                "student.lr=0.02", "student.weight_decay=0", "student.controls=false"]


def _distill(cfg):
    run = Run(cfg)
    run.save_config()
    result = student_mod.distill(run)
    for report in BY_KEY["student"].reports:
        report(run)
    return run, result


def test_tree_student_trains_on_synthetic_with_its_control_and_pictures(tiny_run, tmp_path, capsys):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, dst, ignore=shutil.ignore_patterns("manifest.lock"))
    cfg = tiny_config(dst, *TREE_STUDENT, "student.epochs=20", "student.lr=0.05")
    run, result = _distill(cfg)
    tree = result["tree"]
    chance = 1 / 9  # (the generalist it learns from: about 0.42)
    distilled, hard = tree["test_top1"]["distilled"], tree["test_top1"]["hard_labels"]
    assert distilled["max_path"] > 2.5 * chance and hard["max_path"] > 2.5 * chance
    assert tree["depth"] == 4 and tree["inner_nodes"] == 15 and tree["leaves"] == 16
    assert set(result["control"]) >= {"hard_labels"} and result["control"]["hard_labels"]["teacher"] == "labels"
    for f in (run.student.weights, run.hard_labels.weights, run.tree_png, run.tree_path_png):
        assert f.exists(), f
    assert "## The soft decision tree" in run.student_md.read_text()

    # the reported top-1 is the max-path prediction the inference API makes
    st = Student.from_run(dst)
    data = run.data
    pred = st.predict(data.test.x).cpu()
    assert float((pred == data.test.y).float().mean()) == pytest.approx(distilled["max_path"])
    mix = st.predict_mixture(data.test.x).cpu().argmax(1)
    assert float((mix == data.test.y).float().mean()) == pytest.approx(distilled["mixture"])
    # explain: the path taken leads to the leaf whose top class is the prediction
    (ex,) = st.explain(data.test.x[:1])
    assert len(ex["decisions"]) == 4 and ex["leaf_top"][0]["class"] == int(pred[0])
    nodes, _ = trees.path_nodes(torch.tensor([ex["leaf"]]), 4)
    assert [d["node"] for d in ex["decisions"]] == nodes[0].tolist()

    # the CLI prints the same path
    npy = tmp_path / "one.npy"
    np.save(npy, data.test.x[:1].numpy())
    capsys.readouterr()
    assert cli_main(["predict", str(dst), str(npy), "--model", "student", "--explain"]) == 0
    out = capsys.readouterr().out
    assert f"path to leaf {ex['leaf']}" in out and out.count("-> ") == 4
    assert cli_main(["predict", str(dst), str(npy), "--model", "ensemble", "--explain"]) == 2
    assert "--model student" in capsys.readouterr().err


def test_explain_refuses_a_neural_student():
    info = {"num_classes": 3, "input_shape": [4], "class_names": ["a", "b", "c"], "scale": 1.0,
            "mean": [0.0] * 4, "std": [1.0] * 4}
    st = Student(torch.nn.Linear(4, 3), info, "cpu")
    with pytest.raises(SpecialistsError, match="not a soft decision tree"):
        st.explain(torch.zeros(1, 4))


def test_tree_student_trains_end_to_end_on_digits_through_the_cli(tmp_path, capsys):
    """The whole pipeline on real (tiny) images, scikit-learn's 8x8 digits, through the CLI, a
    soft tree distilled from the routed ensemble beside the same tree on hard labels: both
    learn, and the report sets them beside the generalist and the ensemble."""
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", "device=cpu", "seed=0", "data.name=digits", "model.name=mlp", "model.width=64",
            "generalist.epochs=6", "generalist.batch_size=64", "subsets.num_specialists=2", "specialists.epochs=1",
            "specialists.batch_size=64", "ablate.counts=[]", "ablate.control=false", "evaluate.bootstrap=100",
            "evaluate.timing_batches=1", *TREE_STUDENT, "student.epochs=10", "student.batch_size=64"]
    assert cli_main(["run", "configs/quickstart.yaml", *args]) == 0
    result = json.loads((run_dir / "student" / "metrics.json").read_text())
    tree = result["tree"]
    assert tree["depth"] == 4 and result["teacher"] == "ensemble"
    assert tree["test_top1"]["distilled"]["max_path"] > 0.75
    assert tree["test_top1"]["hard_labels"]["max_path"] > 0.75
    report = (run_dir / "student" / "student.md").read_text()
    for row in ("| generalist |", "| routed ensemble", "| soft tree distilled from the ensemble |",
                "| the same tree on hard labels |"):
        assert row in report
    assert (run_dir / "student" / "tree.png").stat().st_size > 0


def test_a_tree_student_gets_its_own_optimizer_defaults_unless_set(tmp_path):
    """A tree trained with the network's SGD at lr 0.05 barely learns (its leaves' gradients are
    scaled by path probabilities of about 2^-depth): unless the user sets them, a tree takes
    AdamW at lr 0.01 without weight decay; a network student keeps the student defaults."""
    yaml = tmp_path / "c.yaml"
    yaml.write_text("student:\n  lr: 0.2\n")

    def student(*overrides, path=None):
        s = load_config(path, ["student.model.name=soft_tree", *overrides]).student
        return s.optimizer, s.lr, s.weight_decay

    assert student() == ("adamw", 0.01, 0.0)
    assert student("student.optimizer=sgd", "student.weight_decay=1e-4") == ("sgd", 0.01, 1e-4)
    assert student(path=yaml) == ("adamw", 0.2, 0.0)
    net = load_config(None, []).student
    assert (net.optimizer, net.lr, net.weight_decay) == ("sgd", 0.05, 5e-4)
