"""The two-layer CNN analysed by Chen, Zhang, Kou, Chen, Hsieh & Gu, "Why does sharpness-aware minimization
generalize better than SGD?" (NeurIPS 2023), for studying signal learning versus noise memorisation.

An input ``x`` consists of ``P`` patches ``x_p`` of dimension ``d`` (tensor shape ``[N, P, d]``), and the
network is

    f(W, x) = F_{+1}(W_{+1}, x) - F_{-1}(W_{-1}, x),   F_j(W_j, x) = (1/m) sum_r sum_p sigma(<w_{j,r}, x_p>),

with ``m`` filters per output, ``sigma(z) = max(z, 0) ** power`` (ReLU for ``power=1``, the polynomial ReLU
of the related analyses for ``power > 1``) and a *fixed* second layer of ``+1 / -1``, so the first-layer
weights are the only parameter.  The forward pass returns the two logits ``[F_{-1}, F_{+1}]``: with class
index 0 for label ``y = -1`` and 1 for ``y = +1``, ``cross_entropy(logits, c) = log(1 + exp(-y f))``, the
logistic loss of the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TwoLayerCNN", "noise_memorisation"]


class TwoLayerCNN(nn.Module):
    """Two-layer patch CNN with fixed ``+1/-1`` second layer; ``weight[0]`` is ``W_{-1}``, ``weight[1]`` is ``W_{+1}``.

    Args:
        dim: patch dimension ``d``.
        width: number ``m`` of filters per output.
        init_std: standard deviation ``sigma_0`` of the Gaussian initialisation of the filters.
        power: exponent ``q`` of the activation ``max(z, 0) ** q``; must be >= 1 so the gradient at 0 is finite.
    """

    def __init__(self, dim: int, width: int = 10, init_std: float = 0.01, power: float = 1.0) -> None:
        super().__init__()
        if dim < 1 or width < 1:
            raise ValueError(f"dim and width must be >= 1, got dim={dim}, width={width}")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        if power < 1:
            raise ValueError(
                f"power must be >= 1 (max(z, 0) ** power has an infinite gradient at 0 otherwise), got {power}"
            )
        self.dim, self.width, self.init_std, self.power = dim, width, init_std, float(power)
        self.weight = nn.Parameter(torch.empty(2, width, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every filter entry from ``N(0, init_std**2)``, as in the paper."""
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def activation(self, z: Tensor) -> Tensor:
        """``sigma(z) = max(z, 0) ** power``."""
        out = torch.relu(z)
        return out if self.power == 1.0 else out.pow(self.power)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[F_{-1}(x), F_{+1}(x)]`` of shape ``[N, 2]`` for ``x`` of shape ``[N, P, d]``."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected input of shape [N, P, {self.dim}], got {tuple(x.shape)}")
        pre = torch.einsum("npd,jrd->njrp", x, self.weight)  # <w_{j,r}, x_p>
        return self.activation(pre).sum(dim=3).mean(dim=2)

    def margin(self, x: Tensor) -> Tensor:
        """The network output ``f(W, x) = F_{+1} - F_{-1}``, shape ``[N]``; the loss is ``log(1 + exp(-y f))``."""
        out = self(x)
        return out[:, 1] - out[:, 0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, width={self.width}, init_std={self.init_std}, power={self.power}"


def noise_memorisation(model: TwoLayerCNN, noise_patches: Tensor) -> Tensor:
    """Inner products ``<w_{j,r}, xi_i>`` of every filter with every noise patch, shape ``[2, m, n]``.

    ``noise_patches`` has shape ``[n, d]`` (one noise patch per training example).  The paper tracks these
    coefficients to show that SGD memorises the noise while SAM keeps it small; pass a signal vector ``mu``
    of shape ``[1, d]`` to get the signal-learning coefficients ``<w_{j,r}, mu>`` the same way.
    """
    if noise_patches.dim() != 2 or noise_patches.shape[-1] != model.dim:
        raise ValueError(f"expected noise patches of shape [n, {model.dim}], got {tuple(noise_patches.shape)}")
    with torch.no_grad():
        return torch.einsum("jrd,nd->jrn", model.weight, noise_patches.to(model.weight))
