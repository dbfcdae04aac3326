"""Full-batch SAM on a convex quadratic converges to the closed-form 2-cycle (docs/papers.md sec. 2)."""

from __future__ import annotations

import pytest
import torch

import flatminima
from flatminima.dynamics import simulate_sam_quadratic, two_cycle_amplitude

ETA, RHO = 0.1, 0.05
EIGENVALUES = torch.tensor([4.0, 1.0, 0.5, 0.2], dtype=torch.float64)


def _rotated_hessian(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    return q @ torch.diag(EIGENVALUES) @ q.T, q[:, 0]


def test_closed_form_amplitude_is_a_fixed_point_of_two_steps() -> None:
    hessian, u1 = _rotated_hessian()
    c = two_cycle_amplitude(ETA, RHO, EIGENVALUES[0].item())
    assert c == pytest.approx(ETA * RHO * 4.0 / (2 - ETA * 4.0))
    path = simulate_sam_quadratic(hessian, c * u1, ETA, RHO, steps=2)
    torch.testing.assert_close(path[1], -c * u1, rtol=0, atol=1e-15)
    torch.testing.assert_close(path[2], c * u1, rtol=0, atol=1e-15)


def test_sam_optimizer_converges_to_the_two_cycle() -> None:
    """Our SAM + SGD(lr=eta) on 1/2 w^T H w: |<w, u1>| -> c, alternating in sign; other directions die out."""
    hessian, u1 = _rotated_hessian()
    w = torch.tensor([1.0, -0.5, 0.3, 0.8], dtype=torch.float64, requires_grad=True)
    opt = flatminima.SAM([w], torch.optim.SGD, rho=RHO, lr=ETA)
    reference = simulate_sam_quadratic(hessian, w.detach().clone(), ETA, RHO, steps=100)

    def closure() -> torch.Tensor:
        loss = 0.5 * w @ hessian @ w
        loss.backward()
        return loss

    for step in range(1500):
        opt.step(closure)
        if step < 100:  # later the u1 component regrows from rounding noise, so trajectories part ways slightly
            torch.testing.assert_close(w.detach(), reference[step + 1], rtol=1e-10, atol=1e-13)
    c = two_cycle_amplitude(ETA, RHO, EIGENVALUES[0].item())
    along = (w.detach() @ u1).item()
    assert abs(along) == pytest.approx(c, rel=1e-8)
    residual = w.detach() - along * u1
    assert torch.linalg.vector_norm(residual).item() < 1e-9
    opt.step(closure)
    assert (w.detach() @ u1).item() == pytest.approx(-along, rel=1e-8)


def test_two_cycle_amplitude_rejects_unstable_step() -> None:
    with pytest.raises(ValueError, match="eta \\* lambda_max"):
        two_cycle_amplitude(0.6, 0.05, 4.0)
