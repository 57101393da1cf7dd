"""Tests for specialists.combine: the EM combiner against independent references (Hinton's
gradient descent on softmax logits, scipy's SLSQP on the simplex, a brute-force grid, the closed
form for one specialist written out here in float64, hand-computed numbers), plus the
invariants every solver must keep (simplex, no NaN, p_g bit for bit without active
specialists), and routing's tie rule, shared with the torch-free twin."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specialists.combine import (
    SOLVERS,
    CombineInputError,
    combine,
    membership,
    objective,
    prepare_subsets,
    route,
)
from specialists.core import combine_numpy

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread

F64 = torch.float64


# ----------------------------------------------------------------------------- problems


def make_problem(B, C, M, size, *, overlap, seed, dtype=F64, kmax=3, sharp=2.0):
    """Random problem: softmax probabilities, M subsets (disjoint chunks of a permutation, or
    random overlapping subsets of random sizes), and active sets cycling through 0, 1, 2, ...
    active specialists (at most kmax), so every problem mixes 0, 1 and 2+ active examples."""
    g = torch.Generator().manual_seed(seed)
    if overlap:
        subsets = [
            torch.randperm(C, generator=g)[: int(torch.randint(1, size + 1, (), generator=g))]
            for _ in range(M)
        ]
    else:
        perm = torch.randperm(C, generator=g)
        subsets = [perm[m * size : (m + 1) * size] for m in range(M)]
    pg = torch.softmax(sharp * torch.randn(B, C, generator=g, dtype=F64), 1)
    ps = [torch.softmax(sharp * torch.randn(B, len(s) + 1, generator=g, dtype=F64), 1) for s in subsets]
    active = torch.zeros(B, M, dtype=torch.bool)
    for b in range(B):
        k = b % (min(M, kmax) + 1)
        active[b, torch.randperm(M, generator=g)[:k]] = True
        # Inactive rows may hold anything: put garbage there to prove it is ignored.
        for m in range(M):
            if not active[b, m]:
                ps[m][b] = float("nan") if (b + m) % 2 else -3.0
    return pg.to(dtype), subsets, [p.to(dtype) for p in ps], active


# C = 5, 20, 60; M 1-6; disjoint and overlapping subsets.
SHAPES = [
    dict(C=5, M=1, size=2, overlap=False),
    dict(C=5, M=3, size=3, overlap=True),
    dict(C=20, M=4, size=5, overlap=False),
    dict(C=20, M=5, size=8, overlap=True),
    dict(C=60, M=6, size=10, overlap=False),
    dict(C=60, M=6, size=25, overlap=True),
]


def _ids(shape):
    return "C{C}-M{M}-{kind}".format(kind="overlap" if shape["overlap"] else "disjoint", **shape)


def _rows(p, sl):
    return [x[sl] for x in p]


def _assert_simplex(q, atol):
    assert torch.isfinite(q).all()
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(q.shape[0], dtype=q.dtype), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- vs gradient


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_em_matches_gradient_reference(shape):
    B = 6  # active counts 0, 1, 2, 3, 0, 1 (fewer with M < 3); the reference is slow
    pg, subsets, ps, act = make_problem(B, **shape, seed=shape["C"] + shape["M"])
    q_grad = combine(pg, subsets, ps, act, solver="gradient", tol=1e-7)
    L_grad = objective(q_grad, pg, subsets, ps, act)
    q = combine(pg, subsets, ps, act, solver="em", tol=1e-10, max_iter=2000)
    L = objective(q, pg, subsets, ps, act)
    # Same minimum: relative 1e-5 (absolute 1e-10 for L ~ 0), and EM is never worse.
    torch.testing.assert_close(L, L_grad, rtol=1e-5, atol=1e-10)
    assert (L <= L_grad + 1e-10).all()
    # Same argmax (robust to exact ties: the gradient's argmax is also maximal in q).
    top = q_grad.argmax(1)
    assert (q.gather(1, top[:, None]).squeeze(1) >= q.amax(1) - 1e-7).all()
    torch.testing.assert_close(q, q_grad, atol=1e-5, rtol=0)


def test_gradient_solver_works_under_inference_mode():
    """The ensemble predicts under ``torch.inference_mode()``: the gradient solver used to fail
    there (``element 0 of tensors does not require grad``); it must reach EM's objective."""
    pg, subsets, ps, act = make_problem(6, C=20, M=4, size=5, overlap=True, seed=3)
    with torch.inference_mode():
        table = prepare_subsets(subsets, 20)
        q_grad = combine(pg, table, ps, act, solver="gradient", tol=1e-7)
        q_em = combine(pg, table, ps, act, solver="em", tol=1e-10, max_iter=2000)
    L_grad, L_em = objective(q_grad, pg, subsets, ps, act), objective(q_em, pg, subsets, ps, act)
    torch.testing.assert_close(L_grad, L_em, rtol=1e-5, atol=1e-10)


# ----------------------------------------------------------------------------- vs scipy / grid


def _grid_simplex(n):
    """All points (i, j, n - i - j) / n of the 3-class simplex."""
    pts = [(i, j, n - i - j) for i in range(n + 1) for j in range(n + 1 - i)]
    return torch.tensor(pts, dtype=F64) / n


def _three_class_cases():
    # (p_g, subsets, specialist rows): overlapping subsets {0,1} and {1,2}, both active; and the
    # boundary case where p_g rules class 2 out but both dustbins point at it.
    return [
        (
            [0.5, 0.3, 0.2],
            [[0, 1], [1, 2]],
            [[0.2, 0.5, 0.3], [0.1, 0.6, 0.3]],
        ),
        (
            [0.5, 0.5, 0.0],
            [[0], [1]],
            [[0.0, 1.0], [0.0, 1.0]],
        ),
        (
            [0.1, 0.7, 0.2],
            [[0], [1], [0, 2]],
            [[0.6, 0.4], [0.3, 0.7], [0.2, 0.1, 0.7]],
        ),
    ]


@pytest.mark.parametrize("case", range(3))
def test_three_classes_against_scipy_and_grid(case):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    pg_l, subsets_l, ps_l = _three_class_cases()[case]
    pg = torch.tensor([pg_l], dtype=F64)
    subsets = [torch.tensor(s) for s in subsets_l]
    ps = [torch.tensor([p], dtype=F64) for p in ps_l]
    act = torch.ones(1, len(subsets), dtype=torch.bool)
    q_em = combine(pg, subsets, ps, act, tol=1e-12, max_iter=5000)
    L_em = objective(q_em, pg, subsets, ps, act).item()

    def f(x):
        q = torch.as_tensor(x, dtype=F64).reshape(1, 3)
        return objective(q, pg, subsets, ps, act).item()

    res = scipy_optimize.minimize(
        f,
        x0=[1 / 3] * 3,
        method="SLSQP",
        bounds=[(1e-12, 1.0)] * 3,
        constraints=[{"type": "eq", "fun": lambda x: sum(x) - 1.0}],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert res.success, res.message
    assert L_em <= res.fun + 1e-9
    torch.testing.assert_close(q_em[0], torch.tensor(res.x, dtype=F64), atol=2e-4, rtol=0)

    # Brute force: no point of a fine grid does better than EM's q.
    grid = _grid_simplex(300)
    n = grid.shape[0]
    L_grid = objective(grid, pg.expand(n, 3), subsets, [p.expand(n, -1) for p in ps], act.expand(n, -1))
    assert L_em <= L_grid.min().item() + 1e-12
    torch.testing.assert_close(q_em[0], grid[L_grid.argmin()], atol=1 / 300 + 1e-9, rtol=0)


# ----------------------------------------------------------------------------- hand computed


def test_one_specialist_hand_computed():
    # S = {0, 1}; P_g(not S) = 0.3, dust = 0.2:
    # q_S = ((.4+.5)/2, (.3+.3)/2) = (.45, .3); off S: p_g,i (.3 + .2) / (2 * .3).
    pg = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=F64)
    subsets = [torch.tensor([0, 1])]
    ps = [torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)]
    act = torch.ones(1, 1, dtype=torch.bool)
    want = torch.tensor([[0.45, 0.3, 0.2 * 0.5 / 0.6, 0.1 * 0.5 / 0.6]], dtype=F64)
    q, info = combine(pg, subsets, ps, act, solver="em", return_info=True)
    torch.testing.assert_close(q, want, atol=1e-15, rtol=0)
    assert info["iterations"] == 0  # exact, no iterations
    # EM iterated from its start (not the closed form) reaches the same hand-computed point.
    q_it = combine(pg, subsets, ps, act, tol=1e-14, max_iter=5000, single_closed_form=False)
    torch.testing.assert_close(q_it, want, atol=1e-11, rtol=0)


def test_closed_form_when_generalist_is_sure_outside_nothing():
    # P_g(not S) = 0: the off-S mass dust/2 = 0.1 is spread uniformly over the 2 off-S classes
    # (every split is a minimizer; uniform is the eps -> 0 limit of p_g + eps * uniform).
    pg = torch.tensor([[0.6, 0.4, 0.0, 0.0]], dtype=F64)
    subsets = [torch.tensor([0, 1])]
    ps = [torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)]
    act = torch.ones(1, 1, dtype=torch.bool)
    q = combine(pg, subsets, ps, act, solver="em")
    torch.testing.assert_close(q, torch.tensor([[0.55, 0.35, 0.05, 0.05]], dtype=F64), atol=1e-15, rtol=0)
    # Any other split of the off-S mass has the same L, and moving mass across S does worse.
    L = objective(q, pg, subsets, ps, act)
    other = torch.tensor([[0.55, 0.35, 0.1, 0.0]], dtype=F64)
    torch.testing.assert_close(objective(other, pg, subsets, ps, act), L, atol=1e-15, rtol=0)
    worse = torch.tensor([[0.56, 0.34, 0.05, 0.05]], dtype=F64)
    assert objective(worse, pg, subsets, ps, act) > L
    # The gradient reference from log(p_g + tiny) agrees in objective.
    q_g = combine(pg, subsets, ps, act, solver="gradient", tol=1e-10)
    torch.testing.assert_close(objective(q_g, pg, subsets, ps, act), L, atol=1e-8, rtol=0)


def test_objective_hand_computed():
    q = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.5, 0.5, 0.0]], dtype=F64)
    pg = torch.tensor([[0.5, 0.5, 0.0]] * 3, dtype=F64)
    subsets = [torch.tensor([0])]
    ps = [torch.tensor([[0.25, 0.75], [float("nan"), 7.0], [0.25, 0.75]], dtype=F64)]
    act = torch.tensor([[True], [False], [True]])
    L = objective(q, pg, subsets, ps, act)
    kl_g = 0.5 * math.log(0.5 / 0.25)  # 0 log 0 = 0 for class 2
    kl_m = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # R q = (0.5, 0.5)
    torch.testing.assert_close(L[:2], torch.tensor([kl_g + kl_m, kl_g], dtype=F64), atol=1e-15, rtol=0)
    # q = (.5, .5, 0): KL(p_g || q) = 0 and R q = (.5, .5) still.
    torch.testing.assert_close(L[2], torch.tensor(kl_m, dtype=F64), atol=1e-15, rtol=0)
    # Mass where p > 0 and q = 0: +inf, not NaN.
    L_inf = objective(torch.tensor([[1.0, 0.0, 0.0]], dtype=F64), pg[:1], subsets, [ps[0][:1]], act[:1])
    assert torch.isinf(L_inf).all()


# ----------------------------------------------------------------------------- EM properties


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]], ids=_ids)
def test_em_never_raises_objective(shape):
    pg, subsets, ps, act = make_problem(12, **shape, seed=7, kmax=6)
    keep = act.sum(1) >= 1
    pg, ps, act = pg[keep], _rows(ps, keep), act[keep]
    prev = None
    for t in range(0, 40):
        q = combine(pg, subsets, ps, act, max_iter=t, tol=0.0, single_closed_form=False)
        L = objective(q, pg, subsets, ps, act)
        if prev is not None:
            assert (L <= prev + 1e-12).all(), (t, (L - prev).max().item())
        prev = L


def _one_specialist_reference(pg, subsets, ps, act):
    """The minimizer with at most one active specialist, written out row by row in float64
    (Hinton et al.'s closed form): q_S = (p_g,S + p_m,S) / 2, and off S the rest
    P_g(not S) + p_m,dust shared in proportion to p_g, all over 2; p_g itself with none."""
    want = pg.clone()
    for b in range(pg.shape[0]):
        on = torch.nonzero(act[b]).flatten().tolist()
        assert len(on) <= 1
        if not on:
            continue
        m = on[0]
        S = subsets[m].tolist()
        off = [i for i in range(pg.shape[1]) if i not in S]
        p_rest = sum(float(pg[b, i]) for i in off)
        dust = float(ps[m][b, -1])
        for j, c in enumerate(S):
            want[b, c] = (float(pg[b, c]) + float(ps[m][b, j])) / 2
        for i in off:
            want[b, i] = float(pg[b, i]) * (p_rest + dust) / (2 * p_rest)
    return want


def test_one_active_specialist_against_the_closed_form_reference():
    pg, subsets, ps, act = make_problem(24, C=20, M=5, size=8, overlap=True, seed=3, kmax=1)
    assert set(act.sum(1).tolist()) == {0, 1}
    want = _one_specialist_reference(pg, subsets, ps, act)
    q_em, info = combine(pg, subsets, ps, act, solver="em", return_info=True)
    torch.testing.assert_close(q_em, want, atol=1e-15, rtol=0)  # exact: no iterations
    assert (info["iterations_per_example"] == 0).all()
    # EM iterated from its start reaches the same point.
    q_it, info = combine(pg, subsets, ps, act, tol=1e-13, max_iter=5000, single_closed_form=False, return_info=True)
    assert info["converged"].all()
    torch.testing.assert_close(q_it, want, atol=1e-10, rtol=0)


def test_info_reports_iterations():
    pg, subsets, ps, act = make_problem(12, C=20, M=4, size=5, overlap=False, seed=1)
    q, info = combine(pg, subsets, ps, act, return_info=True)
    n = act.sum(1)
    it = info["iterations_per_example"]
    assert isinstance(info["iterations"], int) and info["iterations"] == int(it.max()) > 0
    assert it.shape == (12,) and (it[n <= 1] == 0).all() and (it[n >= 2] > 0).all()
    assert info["converged"].all()
    assert torch.equal(info["num_active"], n)
    # A cap is a cap.
    _, capped = combine(pg, subsets, ps, act, return_info=True, max_iter=2, tol=0.0)
    assert capped["iterations"] == 2 and not capped["converged"][n >= 2].any()


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_simplex_and_no_active_bit_for_bit(solver, dtype):
    pg, subsets, ps, act = make_problem(9, C=20, M=5, size=8, overlap=True, seed=11, dtype=dtype)
    # (The gradient reference need not converge for these invariants: cap it to stay fast.)
    q = combine(pg, subsets, ps, act, solver=solver, max_iter=100)
    assert q.dtype == dtype and q.shape == pg.shape
    _assert_simplex(q, 1e-5 if dtype == torch.float32 else 1e-12)
    none = act.sum(1) == 0
    assert none.any() and torch.equal(q[none], pg[none])


def test_float32_agrees_with_float64():
    for shape in SHAPES:
        pg, subsets, ps, act = make_problem(16, **shape, seed=5)
        q64 = combine(pg, subsets, ps, act, tol=1e-9, max_iter=1000)
        q32 = combine(pg.float(), subsets, [p.float() for p in ps], act, tol=1e-7, max_iter=1000)
        torch.testing.assert_close(q32.double(), q64, atol=1e-5, rtol=0)
        L64 = objective(q64, pg, subsets, ps, act)
        L32 = objective(q32.double(), pg, subsets, ps, act)
        torch.testing.assert_close(L32, L64, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_exact_zeros_and_confident_batches(dtype):
    g = torch.Generator().manual_seed(0)
    B, C, M = 8, 30, 4
    subsets = [torch.arange(m * 8, m * 8 + 10) % C for m in range(M)]  # overlapping
    # One-hot generalist (exact zeros everywhere else), sometimes inside, sometimes outside S.
    one_hot = torch.zeros(B, C, dtype=dtype)
    one_hot[torch.arange(B), torch.randint(0, C, (B,), generator=g)] = 1.0
    # Near one-hot in the working dtype: float32 softmax underflows to exact zeros.
    confident = torch.softmax(80 * torch.randn(B, C, generator=g, dtype=F64), 1).to(dtype)
    act = torch.rand(B, M, generator=g) < 0.6
    act[0] = True
    for pg in (one_hot, confident):
        ps = []
        for m in range(M):
            p = torch.softmax(80 * torch.randn(B, len(subsets[m]) + 1, generator=g, dtype=F64), 1).to(dtype)
            p[::3] = 0.0
            p[::3, -1] = 1.0  # all mass on the dustbin, exact zeros in S
            p[1::3] = 0.0
            p[1::3, 0] = 1.0  # all mass on one class of S, dustbin exactly 0
            ps.append(p)
        for solver in SOLVERS:
            q = combine(pg, subsets, ps, act, solver=solver, max_iter=300)
            _assert_simplex(q, 1e-5 if dtype == torch.float32 else 1e-12)
            L = objective(q, pg, subsets, ps, act)
            assert torch.isfinite(L).all(), solver
        # EM does at least as well as the gradient reference here (in float64). It can do
        # strictly better: a class with p_g = 0 starts the reference at z = log(tiny), where its
        # gradient vanishes, so it may never receive the dustbin mass it should get.
        if dtype == F64:
            L_em = objective(combine(pg, subsets, ps, act, tol=1e-12, max_iter=3000), pg, subsets, ps, act)
            L_gr = objective(combine(pg, subsets, ps, act, solver="gradient", max_iter=300), pg, subsets, ps, act)
            assert (L_em <= L_gr + 1e-7).all()


def test_subset_covering_every_class_gives_no_nan():
    pg = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]], dtype=F64)
    subsets = [torch.tensor([0, 1, 2]), torch.tensor([2])]
    ps = [torch.tensor([[0.3, 0.3, 0.3, 0.1]] * 2, dtype=F64), torch.tensor([[0.5, 0.5]] * 2, dtype=F64)]
    for act in (torch.tensor([[True, False]] * 2), torch.ones(2, 2, dtype=torch.bool)):
        for solver in SOLVERS:
            _assert_simplex(combine(pg, subsets, ps, act, solver=solver), 1e-12)


def test_half_precision_round_trips():
    pg, subsets, ps, act = make_problem(6, C=20, M=3, size=5, overlap=False, seed=2)
    q = combine(pg.half(), subsets, [p.half() for p in ps], act)
    assert q.dtype == torch.float16
    _assert_simplex(q.double(), 2e-3)
    none = act.sum(1) == 0
    assert torch.equal(q[none], pg.half()[none])


def test_prepared_subset_table_gives_the_same_result():
    pg, subsets, ps, act = make_problem(10, C=20, M=5, size=8, overlap=True, seed=4)
    table = prepare_subsets(subsets, 20)
    assert torch.equal(combine(pg, table, ps, act), combine(pg, subsets, ps, act))
    assert torch.equal(objective(pg, pg, table, ps, act), objective(pg, pg, subsets, ps, act))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pg, subsets, ps, act = make_problem(32, C=60, M=6, size=25, overlap=True, seed=9)
    q_cpu = combine(pg, subsets, ps, act, solver="em", tol=1e-10)
    q_gpu = combine(pg.cuda(), [s.cuda() for s in subsets], [p.cuda() for p in ps], act.cuda(), solver="em", tol=1e-10)
    assert q_gpu.device.type == "cuda"
    torch.testing.assert_close(q_gpu.cpu(), q_cpu, atol=1e-9, rtol=0)
    # and both reach the float64 reference's minimum
    L_ref = objective(combine(pg, subsets, ps, act, solver="gradient", tol=1e-7), pg, subsets, ps, act)
    torch.testing.assert_close(objective(q_gpu.cpu(), pg, subsets, ps, act), L_ref, rtol=1e-5, atol=1e-10)


# ----------------------------------------------------------------------------- validation


def test_validation_errors():
    pg, subsets, ps, act = make_problem(4, C=5, M=2, size=2, overlap=False, seed=0)
    with pytest.raises(ValueError, match="unknown solver"):
        combine(pg, subsets, ps, act, solver="newton")
    with pytest.raises(ValueError, match="unknown solver 'closed_form'; choose one of em"):
        combine(pg, subsets, ps, act, solver="closed_form")  # removed: it ran EM's code path
    with pytest.raises(ValueError, match="len\\(p_specialists\\)"):
        combine(pg, subsets, ps[:1], act)
    with pytest.raises(ValueError, match="active must be a \\(B, M\\)"):
        combine(pg, subsets, ps, act[:, :1])
    with pytest.raises(ValueError, match="active must be a \\(B, M\\)"):
        combine(pg, subsets, ps, act[:3])
    with pytest.raises(ValueError, match="bool"):
        combine(pg, subsets, ps, act.double())
    with pytest.raises(ValueError, match=r"p_specialists\[1\] must have shape"):
        combine(pg, subsets, [ps[0], ps[1][:, :-1]], act)
    with pytest.raises(ValueError, match=r"p_specialists\[0\] must have shape"):
        combine(pg, subsets, [ps[0][:3], ps[1]], act)
    with pytest.raises(ValueError, match="p_general must be a \\(B, C\\)"):
        combine(pg[0], subsets, ps, act)
    with pytest.raises(ValueError, match="outside"):
        combine(pg, [torch.tensor([0, 5]), subsets[1]], ps, act)
    with pytest.raises(ValueError, match="repeats"):
        combine(pg, [torch.tensor([1, 1]), subsets[1]], ps, act)
    with pytest.raises(ValueError, match="integer"):
        combine(pg, [torch.tensor([0.0, 1.0]), subsets[1]], ps, act)
    with pytest.raises(ValueError, match="max_iter"):
        combine(pg, subsets, ps, act, max_iter=-1)
    with pytest.raises(ValueError, match="q must have"):
        objective(pg[:, :3], pg, subsets, ps, act)
    with pytest.raises(CombineInputError):
        combine(pg, subsets, ps, act, tol=float("nan"))


def test_row_chunks_give_the_same_result(monkeypatch):
    import specialists.core.combine as combine_module

    pg, subsets, ps, act = make_problem(20, C=20, M=5, size=8, overlap=True, seed=8)
    whole, info = combine(pg, subsets, ps, act, return_info=True)
    monkeypatch.setattr(combine_module, "_CHUNK_ELEMENTS", 50)  # a few rows per chunk
    chunked, info_c = combine(pg, subsets, ps, act, return_info=True)
    torch.testing.assert_close(chunked, whole, atol=1e-15, rtol=0)
    assert torch.equal(info["iterations_per_example"], info_c["iterations_per_example"])


def test_config_refuses_the_removed_closed_form_solver_naming_em(tmp_path):
    from specialists.errors import ConfigError
    from specialists.rundir.config import load_config

    with pytest.raises(ConfigError, match="combine.solver.*closed_form.*em") as info:
        load_config(None, [f"run_dir={tmp_path}", "combine.solver=closed_form"])
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- routing ties


def test_routing_breaks_exact_ties_by_class_id_in_torch_and_numpy():
    """A saturated generalist gives exact ties; with top_n = 2 the torch route (the PyTorch
    ensemble) and the numpy route (the ONNX runtime) must pick the same specialists: the
    lowest class ids among equal probabilities."""
    subsets = [[0], [1], [2], [3], [4, 5]]
    pg = np.array([
        [0.25, 0.25, 0.25, 0.25, 0.0, 0.0],  # four-way tie: classes 0, 1
        [0.1, 0.3, 0.3, 0.3, 0.0, 0.0],  # tie after the top: classes 1, 2
        [0.0, 0.0, 0.0, 0.5, 0.25, 0.25],  # 3 first, then the 4/5 tie: 4
        [0.0, 0.0, 0.0, 0.0, 0.5, 0.5],  # both top classes are in subset 4, the zeros' tie never reached
    ])
    # By hand: row r's specialists are those holding its two lowest-id most probable classes.
    want = np.array([
        [True, True, False, False, False],
        [False, True, True, False, False],
        [False, False, False, True, True],
        [False, False, False, False, True],
    ])
    for dtype in (torch.float32, torch.float64):
        got_torch = route(torch.tensor(pg, dtype=dtype), membership(subsets, 6), top_n=2).numpy()
        np.testing.assert_array_equal(got_torch, want)
    got_numpy = combine_numpy.route(pg, combine_numpy.membership(subsets, 6), top_n=2)
    np.testing.assert_array_equal(got_numpy, want)
    # a wide tie (200 classes, as a saturated generalist over many classes gives): the first ids
    wide = np.full((3, 200), 1 / 200)
    single = [[c] for c in range(200)]
    want_wide = np.zeros((3, 200), dtype=bool)
    want_wide[:, :3] = True
    np.testing.assert_array_equal(route(torch.tensor(wide), membership(single, 200), top_n=3).numpy(), want_wide)
    np.testing.assert_array_equal(combine_numpy.route(wide, combine_numpy.membership(single, 200), top_n=3), want_wide)
