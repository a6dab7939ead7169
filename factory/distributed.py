"""Data-parallel training across processes with PyTorch's own engine (`torchrun`, DistributedDataParallel).

`torchrun --nproc_per_node=N -m factory train RECIPE` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK
and the rendezvous address in their environment; `start` joins them into one process group (NCCL on GPUs,
gloo on CPUs). Without those variables (plain `python -m factory train`) it does nothing and training runs
in one process as always.

How the work is split (`factory.train`): `train.batch_size` is the global batch. Every rank draws the same
epoch order and augmentation for the whole global batch, from the same seed, and takes its own contiguous
slice of it, so N ranks together compute the single-process step; gradients are averaged by DDP. Only
rank 0 logs, scores, checkpoints and writes weights; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from factory.errors import FactoryError

# Rank 0 scores held-out pairs and writes checkpoints while the others wait in their next collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    restart: int = 0  # how many times torchrun restarted the group (after a rank died)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, global_batch: int) -> slice:
        """This rank's contiguous slice of a global batch of `global_batch` samples."""
        per_rank = global_batch // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def start(device: str) -> tuple[Ranks, str]:
    """Join the torchrun process group when launched by torchrun; returns the ranks and this rank's device.

    Args:
        device: "cpu", "cuda" or "auto" (a GPU when there is one).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise FactoryError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: start distributed training "
                           "with torchrun (`torchrun --nproc_per_node=N -m factory train RECIPE`), which sets them")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise FactoryError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                               "start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, backend,
                  int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    return ranks, device


def stop(ranks: Ranks) -> None:
    """Leave the process group (all ranks together)."""
    if ranks.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def sum_across(ranks: Ranks, values: dict[str, float], device: str) -> dict[str, float]:
    """Each value summed over the ranks (every rank gets the sums)."""
    if not ranks.distributed:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[key] for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def same_on_all(ranks: Ranks, value: object, what: str) -> None:
    """Fail on every rank when `value` differs between ranks (e.g. the epoch each resumed from)."""
    if not ranks.distributed:
        return
    values: list[object] = [None] * ranks.world
    dist.all_gather_object(values, value)
    if any(other != values[0] for other in values):
        raise FactoryError(f"the ranks disagree on {what}: {values}; they must start from the same checkpoint "
                           "(a shared folder every rank reads) — delete the checkpoint folder to start over")


def weights_spread(ranks: Ranks, module: nn.Module) -> float:
    """Largest difference of any trained parameter between ranks (0.0 in one process).

    Batch-norm running statistics are left out: each rank updates them from its own share of the batch, and
    DDP copies rank 0's to the others at every forward pass, so the weights written (rank 0's) hold rank 0's.
    """
    if not ranks.distributed:
        return 0.0
    spread = 0.0
    for tensor in module.parameters():
        high, low = tensor.detach().clone(), tensor.detach().clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        spread = max(spread, float((high - low).abs().max()))
    return spread
