"""From stored images to the float batches a step trains on, and the evaluation over a split."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flatminima.data.dataset import ImageDataset, to_float
from flatminima.data.transforms import Augmentation, normalize
from flatminima.train.config import TrainConfig
from flatminima.train.distributed import Distributed

__all__ = ["BatchPipeline", "evaluate"]


class BatchPipeline:
    """Turns stored images into normalised, augmented float batches on the device: ``pipeline(images, gen)``.

    ``generator=None`` means no augmentation (evaluation); patch data ([N, P, d]) is used as it is.
    """

    def __init__(self, dataset: ImageDataset, config: TrainConfig, device: torch.device) -> None:
        self.mean, self.std, self.device = dataset.mean, dataset.std, device
        image = dataset.train_images
        is_image = image.ndim == 4
        padding = (1 if image.shape[-1] <= 8 else 4) if config.augment and is_image else 0
        self.augmentation = Augmentation(crop_padding=padding, flip=config.augment and is_image, cutout=config.cutout)

    def __call__(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        batch = to_float(images)
        if batch.ndim != 4:  # generated patch data: used as it is
            return batch.to(self.device, non_blocking=True)
        batch = normalize(batch, self.mean, self.std)
        if generator is not None:
            batch = self.augmentation(batch, generator)
        return batch.to(self.device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    pipeline: BatchPipeline,
    ctx: Distributed | None = None,
    batch_size: int = 512,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split (in eval mode, left in train mode), sharded across ranks."""
    rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    model.eval()
    share = torch.arange(rank, images.shape[0], world_size)
    totals = torch.zeros(3, dtype=torch.float64, device=pipeline.device)
    for start in range(0, share.numel(), batch_size):
        index = share[start : start + batch_size]
        outputs = model(pipeline(images[index], None)).float()
        targets = labels[index].to(pipeline.device)
        totals[0] += torch.nn.functional.cross_entropy(outputs, targets, reduction="sum").double()
        totals[1] += (outputs.argmax(dim=1) == targets).sum()
        totals[2] += index.numel()
    model.train()
    if ctx is not None:
        totals = ctx.sum(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / count, correct / count
