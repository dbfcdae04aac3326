"""The methods compared and the reproduction's own settings: SGD, m-SAM for each m that divides the batch, SAM
(m = the batch), n-SAM and RW-SAM, each as the TrainConfig fields it sets on the demo config."""

from __future__ import annotations

from typing import Any

__all__ = ["BATCH", "METHODS", "RHO", "SAMPLE", "Methods", "methods_for"]

BATCH = 32
SAMPLE = 256  # training examples tr(V) is measured on
RHO = 0.05  # the SAM paper's default; the demo's 0.3 (and 0.1) leave SAM near chance for the first epochs

Methods = dict[str, tuple[dict[str, Any], int | None]]


def methods_for(batch: int) -> Methods:
    """name -> (the TrainConfig fields it sets on the demo config, the m of its regulariser (rho / 2m) tr V, or
    None): SGD, m-SAM for each m of 4, 8, 16, 64 that divides the batch and is smaller, SAM (m = the batch), n-SAM
    and RW-SAM."""
    groups = [m for m in (4, 8, 16, 64) if m < batch and batch % m == 0]
    return {
        "sgd": ({"optimizer": "sgd"}, None),
        **{f"msam-{m}": ({"optimizer": "sam", "group_size": m}, m) for m in groups},
        "sam": ({"optimizer": "sam"}, batch),
        "nsam": ({"optimizer": "nsam", "nsam_sample_size": 128}, None),
        "rwsam": ({"optimizer": "rwsam", "rwsam_lambda": 1.0}, batch),
    }


#: the methods at the reproduction's own batch size, 32
METHODS: Methods = methods_for(BATCH)
