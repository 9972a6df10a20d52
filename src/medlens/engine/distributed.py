"""Data-parallel training across processes launched by ``torchrun``.

When ``WORLD_SIZE`` > 1 in the environment (``torchrun`` / ``python -m torch.distributed.run`` set it, with
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``), :meth:`DistContext.from_env` joins the process
group (gloo on CPU, nccl on CUDA, one GPU per local rank). The trainer then wraps the model in
DistributedDataParallel, gives each rank its own batch stream (``seed + rank``), and lets rank 0 alone
validate, log and write files; the ranks meet at barriers around those moments and share rank 0's
decisions (stop, checkpoint now) by broadcast. In a single process every method is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) training job.

    Attributes:
        device: the device this rank trains on.
        rank: global rank (0 in a single process).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        owns_group: whether this context initialised the process group (and so tears it down).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        """Join the process group described by the environment, if there is one.

        Args:
            device: the device chosen for training; on CUDA the rank takes ``cuda:LOCAL_RANK``.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns = True
        ctx = cls(device, dist.get_rank(), dist.get_world_size(), local, owns)
        log.info("rank %d of %d on %s", ctx.rank, ctx.world_size, device)
        return ctx

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that validates, logs and writes files."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` (already on this rank's device) in DistributedDataParallel when distributed."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable value produced by our own code)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self) -> None:
        """Leave the process group if this context created it."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed job (safe before the group is joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank when a process group is joined; a no-op otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
