"""Data-parallel training under torchrun: the process group, each rank's slice, rank-0-only work.

`torchrun --nproc-per-node N -m pipeline.cli train ...` starts N copies of the same command; torchrun
sets RANK, LOCAL_RANK and WORLD_SIZE. Every rank draws the same global batch (batches are seeded by
step), keeps its own contiguous slice of rows, and DistributedDataParallel averages the gradients,
so N processes take the same steps as one process with the same global batch. Without torchrun
(WORLD_SIZE unset or 1) everything here is a no-op and the training loop runs as a single process.
"""
from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import UserError

T = TypeVar("T")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch: contiguous, equal shares."""
        if batch_size % self.size:
            raise UserError(f"--batch-size {batch_size}: must be divisible by the number of processes ({self.size})")
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over all ranks (float64, so the order of ranks hardly matters)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T | None:
        """Run fn on rank 0 alone (it writes files), the others waiting; a UserError there is raised
        on every rank, so no rank is left waiting for a partner that gave up."""
        if self.size == 1:
            return fn()
        error = result = None
        if self.is_main:
            try:
                result = fn()
            except UserError as e:
                error = str(e)
            except BaseException as e:  # a bug: still release the others before raising it here
                error = f"rank 0 failed: {type(e).__name__}: {e}"
                dist.broadcast_object_list([error])
                raise
        box = [error]
        dist.broadcast_object_list(box)
        if box[0] is not None:
            raise UserError(box[0])
        return result


_WORLD: World | None = None


def world() -> World:
    """The process group, started once per process from torchrun's environment variables.

    gloo on CPU, nccl when CUDA is present (one GPU per local rank)."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if size <= 1:
        _WORLD = World(device=torch.device("cuda" if cuda else "cpu"))
        return _WORLD
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    _WORLD = World(rank=rank, size=size, local_rank=local_rank,
                   device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"))
    if rank != 0:  # one copy of the log, from rank 0
        logging.getLogger("pipeline").setLevel(logging.WARNING)
    return _WORLD


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints (checked without starting a process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def wrap(model: torch.nn.Module, w: World) -> torch.nn.Module:
    """DistributedDataParallel around the model when there is more than one rank."""
    if w.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [w.local_rank] if w.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
