"""Distillation losses against independent float64 numpy references (values and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from specialists.core.losses import distillation_loss, hard_loss, log_probs, soft_loss, soft_targets

B, C = 5, 7


def np_softmax(z: np.ndarray, T: float = 1.0) -> np.ndarray:
    a = z / T
    a = a - a.max(-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(z: np.ndarray, T: float = 1.0) -> np.ndarray:
    a = z / T
    m = a.max(-1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(-1, keepdims=True))


def ref_kd(zs, zt, T):
    """T^2 * mean_b KL(softmax(zt/T) || softmax(zs/T)) and its gradient w.r.t. zs, float64."""
    p, log_q = np_softmax(zt, T), np_log_softmax(zs, T)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    kl = (plogp - p * log_q).sum(-1)
    value = T * T * kl.mean()
    # d/dzs [T^2 KL] = T^2 * (q - p) / T = T * (q - p); the batch mean divides by B
    grad = T * (np_softmax(zs, T) - p) / zs.shape[0]
    return value, grad


def ref_ce(zs, y):
    log_q = np_log_softmax(zs)
    value = -log_q[np.arange(len(y)), y].mean()
    onehot = np.eye(zs.shape[1])[y]
    return value, (np_softmax(zs) - onehot) / zs.shape[0]


def value_and_grad(fn, zs: np.ndarray):
    x = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    loss = fn(x)
    loss.backward()
    return float(loss.detach()), x.grad.numpy()


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    zs = rng.normal(0, 2.0, (B, C))
    zt = rng.normal(0, 3.0, (B, C))
    y = rng.integers(0, C, B)
    return zs, zt, y


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
def test_kl_soft_loss_value_and_gradient(logits, T):
    zs, zt, _ = logits
    ref_v, ref_g = ref_kd(zs, zt, T)
    v, g = value_and_grad(lambda x: soft_loss(x, torch.tensor(zt), T, "kl"), zs)
    assert v == pytest.approx(ref_v, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-6)
    # a loss between identical distributions is zero, and the KL is never negative
    assert float(soft_loss(torch.tensor(zt), torch.tensor(zt), T)) == pytest.approx(0.0, abs=1e-5)
    assert v > 0


def test_kl_hand_computed_two_classes():
    # student logits (0, 0): q = (1/2, 1/2); teacher logits (log 3, 0) at T=1: p = (3/4, 1/4)
    # KL = 3/4 log(3/2) + 1/4 log(1/2); with T = 2 the teacher (log 3 / 2, 0) gives p = (s, 1 - s),
    # s = sqrt(3) / (1 + sqrt(3)), and the loss is 4 * KL
    zs = torch.zeros(1, 2)
    kl1 = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    assert float(soft_loss(zs, torch.tensor([[np.log(3.0), 0.0]]), 1.0)) == pytest.approx(kl1, rel=1e-5)
    s = np.sqrt(3) / (1 + np.sqrt(3))
    kl2 = s * np.log(2 * s) + (1 - s) * np.log(2 * (1 - s))
    assert float(soft_loss(zs, torch.tensor([[np.log(3.0), 0.0]]), 2.0)) == pytest.approx(4 * kl2, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_combined_loss_value_and_gradient(logits, alpha):
    zs, zt, y = logits
    T = 3.0
    kd_v, kd_g = ref_kd(zs, zt, T)
    ce_v, ce_g = ref_ce(zs, y)
    v, g = value_and_grad(lambda x: distillation_loss(x, torch.tensor(zt), torch.tensor(y), T, alpha, "kl"), zs)
    assert v == pytest.approx(alpha * kd_v + (1 - alpha) * ce_v, rel=1e-5)
    np.testing.assert_allclose(g, alpha * kd_g + (1 - alpha) * ce_g, rtol=1e-4, atol=1e-6)


def test_hard_loss_and_label_smoothing(logits):
    zs, _, y = logits
    ce_v, ce_g = ref_ce(zs, y)
    v, g = value_and_grad(lambda x: hard_loss(x, torch.tensor(y)), zs)
    assert v == pytest.approx(ce_v, rel=1e-5)
    np.testing.assert_allclose(g, ce_g, rtol=1e-4, atol=1e-7)
    # label smoothing eps: target (1 - eps) onehot + eps / C
    eps = 0.1
    target = (1 - eps) * np.eye(C)[y] + eps / C
    ref = -(target * np_log_softmax(zs)).sum(-1).mean()
    assert float(hard_loss(torch.tensor(zs), torch.tensor(y), eps)) == pytest.approx(ref, rel=1e-5)


def test_combined_loss_needs_labels_unless_alpha_is_one(logits):
    zs, zt, _ = logits
    with pytest.raises(ValueError):
        distillation_loss(torch.tensor(zs), torch.tensor(zt), None, 2.0, 0.5)
    only_soft = distillation_loss(torch.tensor(zs), torch.tensor(zt), None, 2.0, 1.0)
    assert float(only_soft) == pytest.approx(ref_kd(zs, zt, 2.0)[0], rel=1e-5)


def test_mse_on_logits_value_and_gradient(logits):
    zs, zt, _ = logits
    cs = zs - zs.mean(-1, keepdims=True)
    ct = zt - zt.mean(-1, keepdims=True)
    ref = ((cs - ct) ** 2).mean()
    # gradient of mean((P zs - ct)^2) with P the centering projection: 2 P (P zs - ct) / (B C)
    ref_g = 2 * ((cs - ct) - (cs - ct).mean(-1, keepdims=True)) / (B * C)
    for T in (1.0, 5.0):  # T does not enter
        v, g = value_and_grad(lambda x: soft_loss(x, torch.tensor(zt), T, "mse_logits"), zs)
        assert v == pytest.approx(ref, rel=1e-5)
        np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-7)
    # adding a constant to a row of logits changes no softmax, so it must not change the loss
    assert float(soft_loss(torch.tensor(zs + 5.0), torch.tensor(zt - 2.0), 1.0, "mse_logits")) == pytest.approx(ref, rel=1e-5)


def test_mse_on_probs_value(logits):
    zs, zt, _ = logits
    for T in (1.0, 4.0):
        ref = T * T * ((np_softmax(zs, T) - np_softmax(zt, T)) ** 2).sum(-1).mean()
        assert float(soft_loss(torch.tensor(zs), torch.tensor(zt), T, "mse_probs")) == pytest.approx(ref, rel=1e-5)


def test_kl_gradient_tends_to_matching_logits_at_high_temperature(logits):
    """Hinton sec. 2.1: for zero-mean logits and T >> |z|, the T^2-scaled KL gradient tends to
    (z_s - z_t) / (C B), i.e. the direction of the MSE-on-logits gradient."""
    zs, zt, _ = logits
    zs, zt = zs - zs.mean(-1, keepdims=True), zt - zt.mean(-1, keepdims=True)
    _, g = value_and_grad(lambda x: soft_loss(x, torch.tensor(zt), 200.0, "kl"), zs)
    ref = (zs - zt) / (C * B)
    np.testing.assert_allclose(g, ref, rtol=0, atol=0.02 * np.abs(ref).max())
    _, g_mse = value_and_grad(lambda x: soft_loss(x, torch.tensor(zt), 1.0, "mse_logits"), zs)
    cos = (g * g_mse).sum() / np.linalg.norm(g) / np.linalg.norm(g_mse)
    assert cos > 0.999


def test_t_squared_keeps_gradient_magnitude_across_temperatures():
    """With T^2 the soft-loss gradient norm stays within a factor 1.5 for T = 2..16; without it
    (a plain KL between tempered distributions, computed independently here) the same check
    fails: the norm falls like 1/T^2."""
    rng = np.random.default_rng(1)
    zs = rng.normal(0, 2.0, (64, 10))
    zt = rng.normal(0, 2.0, (64, 10))
    zs, zt = zs - zs.mean(-1, keepdims=True), zt - zt.mean(-1, keepdims=True)
    temps = [2.0, 4.0, 8.0, 16.0]
    with_t2, without = [], []
    for T in temps:
        _, g = value_and_grad(lambda x: soft_loss(x, torch.tensor(zt), T, "kl"), zs)
        with_t2.append(np.linalg.norm(g))
        _, g0 = value_and_grad(lambda x: F.kl_div(F.log_softmax(x / T, -1), torch.softmax(torch.tensor(zt) / T, -1),
                                                   reduction="batchmean"), zs)
        without.append(np.linalg.norm(g0))
    with_t2, without = np.array(with_t2), np.array(without)
    assert with_t2.max() / with_t2.min() < 1.5, with_t2
    assert without.max() / without.min() > 1.5, without  # the same assertion fails without T^2
    # without the factor the gradient shrinks ~ 1 / T^2: from T=2 to T=16 by roughly 64x
    assert 30 < without[0] / without[-1] < 100, without
    np.testing.assert_allclose(with_t2, without * np.array(temps) ** 2, rtol=1e-4)


def test_black_box_soft_targets_equal_tempered_softmax():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3.0, (6, 9))
    p = torch.tensor(np_softmax(z))
    for T in (1.0, 2.0, 5.0):
        got = soft_targets(log_probs(p), T).double().numpy()
        np.testing.assert_allclose(got, np_softmax(z, T), rtol=1e-5, atol=1e-7)
    # and the loss against a probability teacher equals the loss against its logits
    zs = torch.tensor(rng.normal(0, 1.0, (6, 9)))
    a = soft_loss(zs, log_probs(p), 3.0)
    b = soft_loss(zs, torch.tensor(z), 3.0)
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_teacher_probabilities_with_exact_zeros_are_safe():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.2, 0.0, 0.3, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 0, 3])
    t = log_probs(p)
    for T in (1.0, 4.0):
        target = soft_targets(t, T)
        assert torch.isfinite(target).all()
        assert (target[p == 0] == 0).all()  # a zero probability stays exactly zero at every T
        assert torch.allclose(target.sum(-1), torch.ones(3, dtype=target.dtype))
        # e.g. row 2 at T: p^(1/T) normalized
        r = p[2].numpy() ** (1 / T)
        np.testing.assert_allclose(target[2].double().numpy(), r / r.sum(), rtol=1e-5)
    zs = np.random.default_rng(3).normal(0, 1.0, (3, 4))
    for kind in ("kl", "mse_logits", "mse_probs"):
        for T in (1.0, 4.0):
            v, g = value_and_grad(lambda x: distillation_loss(x, t, y, T, 0.7, kind), zs)
            assert np.isfinite(v) and np.isfinite(g).all(), (kind, T, v, g)
    # the KL value: zero-probability classes contribute nothing
    v, g = value_and_grad(lambda x: soft_loss(x, t, 2.0, "kl"), zs)
    pT = np.stack([np.where(row > 0, row ** 0.5, 0.0) for row in p.numpy()])
    pT /= pT.sum(-1, keepdims=True)
    log_q = np_log_softmax(zs, 2.0)
    with np.errstate(divide="ignore"):
        plogp = np.where(pT > 0, pT * np.log(np.where(pT > 0, pT, 1.0)), 0.0)
    assert v == pytest.approx(4 * (plogp - pT * log_q).sum(-1).mean(), rel=1e-5)
    np.testing.assert_allclose(g, 2.0 * (np_softmax(zs, 2.0) - pT) / 3, rtol=1e-4, atol=1e-7)


def test_unknown_loss_kind_raises(logits):
    zs, zt, _ = logits
    with pytest.raises(ValueError, match="unknown"):
        soft_loss(torch.tensor(zs), torch.tensor(zt), 2.0, "hinge")
