"""Perturbation rules against an independent float64 NumPy reference of the SAM paper's eq. 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flatminima
from flatminima.optim.perturb import Adaptive, DualNorm, Unnormalized

SHAPES = [(3, 4), (5,), (2, 2, 3)]


def _tensors(seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for shape in SHAPES]


def reference_dual_norm(grads: list[np.ndarray], rho: float, p: float) -> list[np.ndarray]:
    """e = rho sign(g) |g|^(q-1) / (||g||_q^q)^(1/p), over the concatenation of all tensors."""
    flat = np.concatenate([g.ravel() for g in grads]).astype(np.float64)
    if math.isinf(p):
        e = rho * np.sign(flat)
    elif p == 1.0:
        e = np.zeros_like(flat)
        i = np.argmax(np.abs(flat))
        e[i] = rho * np.sign(flat[i])
    else:
        q = p / (p - 1.0)
        e = rho * np.sign(flat) * np.abs(flat) ** (q - 1.0) / (np.sum(np.abs(flat) ** q)) ** (1.0 / p)
    out, start = [], 0
    for g in grads:
        out.append(e[start : start + g.size].reshape(g.shape))
        start += g.size
    return out


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, math.inf])
def test_dual_norm_matches_float64_reference(p: float) -> None:
    grads = _tensors(0)
    expected = reference_dual_norm([g.numpy() for g in grads], rho=0.07, p=p)
    params = _tensors(1)
    work = [g.clone() for g in grads]
    DualNorm(p).perturb_(params, work, 0.07)
    for got, want in zip(work, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    flat = torch.cat([w.ravel() for w in work])
    assert torch.linalg.vector_norm(flat, ord=p).item() == pytest.approx(0.07, rel=1e-12)


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, math.inf])
def test_sam_first_step_moves_weights_by_reference_e(p: float) -> None:
    """End to end through SAM: from w = 0 the weights after first_step are exactly e (several tensors, one norm)."""
    params = [torch.zeros(shape, dtype=torch.float64, requires_grad=True) for shape in SHAPES]
    grads = _tensors(2)
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    opt = flatminima.SAM(params, torch.optim.SGD, rho=0.05, p=p, lr=0.1)
    opt.first_step(zero_grad=False)
    expected = reference_dual_norm([g.numpy() for g in grads], rho=0.05, p=p)
    for param, want, grad in zip(params, expected, grads):
        np.testing.assert_allclose(param.detach().numpy(), want, rtol=1e-12, atol=1e-15)
        assert torch.equal(param.grad, grad)  # zero_grad=False leaves the caller's gradient intact
    opt.second_step()


def test_general_p_survives_huge_gradients() -> None:
    """|g|^q would overflow float64 for g ~ 1e200 and q = 3 (p = 1.5); the rule is scale-invariant, so it must not."""
    grads = [g * 1e200 for g in _tensors(3)]
    work = [g.clone() for g in grads]
    DualNorm(1.5).perturb_([torch.zeros_like(g) for g in grads], work, 0.1)
    expected = reference_dual_norm([g.numpy() / 1e200 for g in grads], rho=0.1, p=1.5)
    for got, want in zip(work, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)


def test_p1_splits_rho_between_exact_ties() -> None:
    grads = [torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 0.5], dtype=torch.float64)]
    DualNorm(1.0).perturb_([torch.zeros(3), torch.zeros(2)], grads, 0.2)
    # exact by construction: sign(g) (+-1) times a 0/1 mask times rho / 2 (a division by a power of two)
    assert grads[0].tolist() == [0.0, -0.1, 0.0]
    assert grads[1].tolist() == [0.1, 0.0]


@pytest.mark.parametrize("rule", [DualNorm(1.0), DualNorm(1.5), DualNorm(2.0), DualNorm(math.inf), Adaptive()])
def test_zero_gradient_gives_zero_perturbation(rule) -> None:
    grads = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    rule.perturb_(_tensors(4), grads, 0.5)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_adaptive_matches_asam_formula() -> None:
    """ASAM, p = 2: e = rho T^2 g / ||T g|| with T = |w| + eta."""
    params, grads = _tensors(5), _tensors(6)
    eta, rho = 0.01, 0.5
    t = [np.abs(w.numpy()) + eta for w in params]
    tg_norm = np.sqrt(sum(np.sum((ti * g.numpy()) ** 2) for ti, g in zip(t, grads)))
    work = [g.clone() for g in grads]
    Adaptive(DualNorm(2.0), eta=eta).perturb_(params, work, rho)
    for got, ti, g in zip(work, t, grads):
        np.testing.assert_allclose(got.numpy(), rho * ti**2 * g.numpy() / tg_norm, rtol=1e-12)


def test_adaptive_composes_with_any_inner_rule() -> None:
    """Adaptive(DualNorm(inf)): e = T * rho sign(T g) = rho T sign(g)."""
    params, grads = _tensors(7), _tensors(8)
    work = [g.clone() for g in grads]
    Adaptive(DualNorm(math.inf), eta=0.1).perturb_(params, work, 0.3)
    for got, w, g in zip(work, params, grads):
        torch.testing.assert_close(got, 0.3 * (w.abs() + 0.1) * torch.sign(g), rtol=1e-14, atol=0)


def test_unnormalized_is_rho_times_gradient() -> None:
    grads = _tensors(9)
    work = [g.clone() for g in grads]
    Unnormalized().perturb_(_tensors(10), work, 0.25)
    for got, g in zip(work, grads):  # exact by construction: multiplying by 0.25, a power of two, never rounds
        torch.testing.assert_close(got, 0.25 * g, rtol=0, atol=0)


def test_sam_options_select_rules() -> None:
    """adaptive=True and normalize=False reach the ASAM and USAM rules through SAM's per-group options."""
    w0 = _tensors(11)
    grads = _tensors(12)
    for options, rule in [({"adaptive": True}, Adaptive(DualNorm(2.0))), ({"normalize": False}, Unnormalized())]:
        params = [w.clone().requires_grad_() for w in w0]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        opt = flatminima.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, **options)
        opt.first_step(zero_grad=False)
        expected = [g.clone() for g in grads]
        rule.perturb_(w0, expected, 0.1)
        for param, w, e in zip(params, w0, expected):
            torch.testing.assert_close(param.detach() - w, e, rtol=1e-12, atol=1e-15)
        opt.second_step()


@pytest.mark.parametrize("bad", [0.5, 0.0, -1.0, float("nan")])
def test_dual_norm_rejects_p_below_one(bad: float) -> None:
    with pytest.raises(ValueError, match="p >= 1"):
        DualNorm(bad)


def test_adaptive_rejects_negative_eta() -> None:
    with pytest.raises(ValueError, match="eta"):
        Adaptive(eta=-0.1)


def test_adaptive_refuses_a_rule_with_optimizer_state() -> None:
    """Momentum-SAM's and Friendly SAM's rules read their own state, which T_w would not scale: refused up front
    (before, SAM saw no ``needs_state`` on the wrapper and the inner rule failed at the first step)."""
    from flatminima.variants.friendly_sam import FriendlyAscent
    from flatminima.variants.momentum_sam import MomentumAscent

    for inner in (MomentumAscent(), FriendlyAscent()):
        with pytest.raises(ValueError, match=r"Adaptive cannot wrap .*optimiser state"):
            Adaptive(inner)


def _davda54_asam_steps(model: torch.nn.Module, batches, rho: float, lr: float, momentum: float) -> None:
    """An independent float64 re-implementation of davda54/sam's ASAM step (``adaptive=True``), with SGD:
    ``e_w = rho * |w|^2 * g / (||(|w| * g)|| + 1e-12)``, i.e. ``T_w^2 g / ||T_w g||`` with ``T_w = |w|``."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=lr, momentum=momentum)
    for x, y in batches:
        base.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            grad_norm = torch.norm(torch.stack([(torch.abs(p) * p.grad).norm(p=2) for p in params]), p=2)
            scale = rho / (grad_norm + 1e-12)
            old = [p.data.clone() for p in params]
            for p in params:
                p.add_(torch.pow(p, 2) * p.grad * scale)
        base.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, w in zip(params, old):
                p.data = w
        base.step()


def test_asam_with_eta_zero_matches_the_reference_implementation() -> None:
    """``adaptive=True, adaptive_eta=0`` is davda54/sam's (and pytorch_optimizer's) ASAM: T_w = |w|. Over 6 steps
    the weights agree to 3e-13, the effect of davda54's ``+ 1e-12`` in the denominator (1e-16 without it). The
    default ``adaptive_eta=0.01`` (the ASAM paper's eta) is a different step, far outside the tolerance."""
    from tests.conftest import make_mlp

    gen = torch.Generator().manual_seed(21)
    batches = [
        (torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(6)
    ]
    rho, lr, momentum = 0.5, 0.1, 0.9
    reference = make_mlp(seed=5, dtype=torch.float64)
    _davda54_asam_steps(reference, batches, rho, lr, momentum)
    results = {}
    for eta in (0.0, 0.01):
        model = make_mlp(seed=5, dtype=torch.float64)
        opt = flatminima.SAM(
            model.parameters(), torch.optim.SGD, rho=rho, adaptive=True, adaptive_eta=eta, lr=lr, momentum=momentum
        )
        for x, y in batches:
            opt.step(lambda x=x, y=y, m=model: (torch.nn.functional.cross_entropy(m(x), y).backward(), 0.0)[1])
        results[eta] = model
    for p, q in zip(results[0.0].parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    apart = max((p - q).abs().max().item() for p, q in zip(results[0.01].parameters(), reference.parameters()))
    assert apart > 1e-6
