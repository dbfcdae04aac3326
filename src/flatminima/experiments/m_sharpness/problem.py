"""The task the m effect is measured on: Chen et al.'s signal/noise patch data and their two-layer CNN, trained with
mini-batches, where a model can fit its (partly flipped) training labels by memorising each example's noise patch.

Why this task: a group's ascent direction is dominated by the noise patches of its own examples when the group is
small (each example's noise part has norm ``sigma_p sqrt(d)``, the shared signal part only ``||mu||``), so m-SAM with
a small ``m`` pushes the weights away from memorising each example's noise, where SAM's batch-wide ascent mostly
moves the signal filters. On the embedded digits (the former setting) every method ended within one or two test
images of the others, flat in m; here SGD overfits harmfully and there is a gap for the perturbation to close.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flatminima.data.dataset import ImageDataset
from flatminima.data.patches import make_signal_noise_patches
from flatminima.train import TrainConfig

__all__ = ["BASE", "OTHER_DEFAULTS", "OTHER_VALIDATION_FRACTION", "VALIDATION_FRACTION", "SignalNoise", "problem_for"]

#: the fraction of the generated training draw held out for validation (its labels carry the same flips)
VALIDATION_FRACTION = 0.5
#: the fraction held out of a dataset given on the command line (CIFAR-10's 50,000 images: 5,000)
OTHER_VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class SignalNoise:
    """One draw of the patch data per seed: ``n`` training examples (half of them then held out for validation),
    ``n_test`` clean test examples, patch dimension ``dim``, signal ``||mu||``, noise ``sigma_p`` and label flips."""

    n: int = 320
    n_test: int = 1000
    dim: int = 2000
    signal_norm: float = 2.0
    noise_std: float = 1.0
    flip_prob: float = 0.1

    def draw(self, seed: int) -> ImageDataset:
        """The seed's draw (the training set, its flips and the test set all follow from ``seed``)."""
        return make_signal_noise_patches(
            self.n,
            self.n_test,
            dim=self.dim,
            signal_norm=self.signal_norm,
            noise_std=self.noise_std,
            flip_prob=self.flip_prob,
            seed=seed,
        )

    @property
    def train_size(self) -> int:
        """The examples left to train on once the validation split is held out."""
        return self.n - round(VALIDATION_FRACTION * self.n)

    def describe(self) -> str:
        return (
            f"signal/noise patches (n = {self.n}, half held out for validation; d = {self.dim}, ||mu|| = "
            f"{self.signal_norm:g}, sigma_p = {self.noise_std:g}, {100 * self.flip_prob:g} % of the labels flipped, "
            f"{self.n_test} clean test points)"
        )


#: the shared training settings: batch 16, SGD momentum 0.9 with a cosine learning rate, 30 epochs (300 steps);
#: ``lr`` and ``weight_decay`` are the centre of SGD's grid and ``rho`` the centre of SAM's (m = the batch)
BASE = TrainConfig(
    dataset="signal_noise",
    model="two_layer_cnn",
    batch_size=16,
    epochs=30,
    lr=0.1,
    momentum=0.9,
    weight_decay=0.01,
    lr_schedule="cosine",
    rho=0.4,
    validation_fraction=VALIDATION_FRACTION,
    threads=1,
)


#: the settings that replace ``BASE``'s for another dataset, unless given too: the SAM paper's CIFAR weight
#: decay and radius, and the small CNN (the two-layer CNN reads patches only)
OTHER_DEFAULTS = {"model": "small_cnn", "weight_decay": 5e-4, "rho": 0.05}


def problem_for(overrides: dict[str, Any]) -> tuple[TrainConfig, SignalNoise | None]:
    """The base config with the command line's ``overrides``, and the patch problem it trains on: ``None`` when
    they name another dataset (then ``prepare_data`` loads it, clean labels,
    ``OTHER_VALIDATION_FRACTION`` held out, and ``OTHER_DEFAULTS`` for what is not given)."""
    if overrides.get("dataset", BASE.dataset) == "signal_noise":
        return dataclasses.replace(BASE, **overrides), SignalNoise()
    given = {**OTHER_DEFAULTS, "validation_fraction": OTHER_VALIDATION_FRACTION, **overrides}
    return dataclasses.replace(BASE, **given), None
