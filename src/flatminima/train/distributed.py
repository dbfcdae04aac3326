"""torchrun support: process-group setup from the environment, batch sharding and metric reduction."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

__all__ = ["Distributed"]


@dataclass
class Distributed:
    """This process's place in the run (world size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device_type: str) -> Distributed:
        """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a no-op otherwise."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_indices: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch (rank order, as DistributedSampler's blocks)."""
        if not self.enabled:
            return batch_indices
        per_rank = batch_indices.numel() // self.world_size
        return batch_indices[self.rank * per_rank : (self.rank + 1) * per_rank]

    def sum(self, values: Tensor) -> Tensor:
        """Sum across ranks (in place on a copy)."""
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
