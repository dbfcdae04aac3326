"""The problem: the data (clean labels, normalised), the network without BatchNorm with its optimiser (SGD, or SAM
around the same SGD), and the full-data loss that decides where a run stops."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatminima.data import load_dataset
from flatminima.data.dataset import to_float
from flatminima.data.splits import validation_split
from flatminima.data.transforms import normalize
from flatminima.experiments.hessian_spectrum.setting import DEFAULT_RECIPE, VALIDATION_FRACTION, WIDTH, Recipe
from flatminima.models import SmallCNN, build_model
from flatminima.optim import SAM
from flatminima.running_stats import norm_layers

__all__ = ["build", "digits_tensors", "loss_and_accuracy", "tuning_split"]


def digits_tensors(seed: int, recipe: Recipe = DEFAULT_RECIPE) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The recipe's data (digits: the split of ``seed``) with clean labels, normalised, on the recipe's device:
    train images, train labels, test images, test labels."""
    extra = {"seed": seed} if recipe.dataset == "digits" else {}
    data = load_dataset(recipe.dataset, recipe.data_root, **extra)
    device = torch.device(recipe.device)
    train = normalize(to_float(data.train_images), data.mean, data.std).to(device)
    test = normalize(to_float(data.test_images), data.mean, data.std).to(device)
    return train, data.train_labels.to(device), test, data.test_labels.to(device)


def tuning_split(
    images: Tensor, labels: Tensor, seed: int, fraction: float = VALIDATION_FRACTION
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The tuning runs' data: ``fraction`` of the training set held out as a validation split (stratified, the
    seed's draw; clean labels like the rest, the claim is not about noise): train images, train labels, validation
    images, validation labels. The measured runs train on the whole training set."""
    return validation_split(images, labels, fraction, seed)


def build(
    seed: int, rho: float | None, recipe: Recipe = DEFAULT_RECIPE, images: Tensor | None = None, classes: int = 10
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (the same initialisation for every optimiser of a seed, drawn without touching the global random
    state) and its optimiser: SGD, or SAM with radius ``rho`` around the same SGD."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if recipe.model == "small_cnn" and recipe.dataset == "digits":
            model = SmallCNN(width=WIDTH)
        else:
            assert images is not None
            model = build_model(recipe.model, classes, images.shape[1], tuple(images.shape[2:]))
    if norm_layers(model):
        raise ValueError(
            f"hessian-spectrum compares models without BatchNorm (as the paper): {recipe.model} has BatchNorm; "
            "use e.g. --model wrn40_10_nobn (the paper's: WideResNet-40-10 without BatchNorm), "
            "wrn16_8_nobn or small_cnn"
        )
    model = model.to(recipe.device)
    options = {"lr": recipe.lr, "momentum": recipe.momentum, "weight_decay": recipe.weight_decay}
    if rho is None:
        return model, torch.optim.SGD(model.parameters(), **options)
    return model, SAM(model.parameters(), torch.optim.SGD, rho=rho, **options)


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on all of ``images`` (in chunks; no BatchNorm or dropout, so the
    mode does not matter)."""
    total, correct = 0.0, 0
    for x, y in zip(images.split(1024), labels.split(1024)):
        logits = model(x)
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    return total / len(labels), correct / len(labels)
