"""Symmetric and asymmetric label noise, the standard corruptions for testing robustness of SAM-style training.

Symmetric convention: a fraction ``rate`` of the labels is chosen and each chosen label is replaced by one drawn
uniformly from the *other* ``num_classes - 1`` classes, so every chosen label really changes and "40 % noise"
means exactly 40 % wrong labels.  (The alternative convention draws from all classes, so about
``rate / num_classes`` of the chosen labels stay correct and the true noise rate is lower than stated.)

Asymmetric (class-dependent) noise flips a fraction ``rate`` of each class ``c`` to one fixed class
``mapping[c]``, mimicking confusions between similar classes (Patrini et al., "Making Deep Neural Networks Robust
to Label Noise: a Loss Correction Approach", CVPR 2017).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor

__all__ = ["CIFAR10_ASYMMETRIC_MAPPING", "asymmetric_label_noise", "symmetric_label_noise"]

CIFAR10_ASYMMETRIC_MAPPING: Mapping[int, int] = MappingProxyType({9: 1, 2: 0, 4: 7, 3: 5, 5: 3})
"""Patrini et al. (2017)'s CIFAR-10 flips: truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog."""


def symmetric_label_noise(labels: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    """Return a copy of ``labels`` in which exactly ``round(rate * N)`` entries are changed to another class.

    The positions and the new classes are drawn with a ``torch.Generator`` seeded with ``seed``, so the
    result is reproducible.  The input tensor is never modified.
    """
    _check_args(labels, rate, num_classes)
    n = labels.numel()

    noisy = labels.clone()
    num_noisy = round(rate * n)
    if num_noisy == 0:
        return noisy
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:num_noisy].to(labels.device)
    # an offset in 1..C-1 added modulo C gives a uniform draw over the other C-1 classes
    offset = torch.randint(1, num_classes, (num_noisy,), generator=gen).to(device=labels.device, dtype=labels.dtype)
    noisy[idx] = (labels[idx] + offset) % num_classes
    return noisy


def asymmetric_label_noise(
    labels: Tensor,
    rate: float,
    num_classes: int,
    seed: int,
    mapping: Mapping[int, int] | Sequence[int] | None = None,
) -> Tensor:
    """Return a copy of ``labels`` in which exactly ``round(rate * n_c)`` of the ``n_c`` examples of each class
    ``c`` are changed to ``mapping[c]``.

    ``mapping`` is a dict (classes not in it stay unchanged) or a sequence with one target per class; a class
    mapped to itself is never changed.  The default is ``CIFAR10_ASYMMETRIC_MAPPING`` for 10 classes and
    ``c -> (c + 1) % num_classes`` otherwise (the usual CIFAR-100-style cyclic flip).  Positions are drawn with a
    ``torch.Generator`` seeded with ``seed``; the input tensor is never modified.
    """
    _check_args(labels, rate, num_classes)
    targets = _mapping_table(mapping, num_classes)
    noisy = labels.clone()
    gen = torch.Generator().manual_seed(seed)
    cpu_labels = labels.cpu()
    for c in range(num_classes):  # a loop over classes, not examples
        if targets[c] == c:
            continue
        members = torch.nonzero(cpu_labels == c, as_tuple=True)[0]
        num_noisy = round(rate * members.numel())
        if num_noisy == 0:
            continue
        chosen = members[torch.randperm(members.numel(), generator=gen)[:num_noisy]].to(labels.device)
        noisy[chosen] = targets[c]
    return noisy


def _mapping_table(mapping: Mapping[int, int] | Sequence[int] | None, num_classes: int) -> list[int]:
    """Turn ``mapping`` (or the default) into a list ``targets`` with ``targets[c]`` the class ``c`` flips to."""
    if mapping is None:
        if num_classes == 10:
            mapping = CIFAR10_ASYMMETRIC_MAPPING
        else:
            return [(c + 1) % num_classes for c in range(num_classes)]
    if isinstance(mapping, Mapping):
        bad_keys = [k for k in mapping if not 0 <= int(k) < num_classes]
        if bad_keys:
            raise ValueError(f"mapping has source classes {bad_keys} outside [0, {num_classes - 1}]")
        targets = list(range(num_classes))
        for source, target in mapping.items():
            targets[int(source)] = int(target)
    else:
        targets = [int(t) for t in mapping]
        if len(targets) != num_classes:
            raise ValueError(
                f"mapping as a sequence needs one target per class ({num_classes}), got {len(targets)} entries"
            )
    bad = [t for t in targets if not 0 <= t < num_classes]
    if bad:
        raise ValueError(f"mapping has target classes {bad} outside [0, {num_classes - 1}]")
    return targets


def _check_args(labels: Tensor, rate: float, num_classes: int) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be a fraction in [0, 1] (e.g. 0.4 for 40 % noise), got {rate}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 so that a label can be changed, got {num_classes}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes - 1}], found range [{lo}, {hi}]; "
                "pass the correct num_classes or remap the labels"
            )
