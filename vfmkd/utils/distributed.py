"""Distributed data parallel helpers for runs under ``torchrun``.

``torchrun --nproc_per_node=N -m vfmkd train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` reads them and joins the process group (NCCL on
GPUs, Gloo on CPU). Without those variables every helper answers for a single process,
so the same code runs with and without ``torchrun``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedInfo",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_min",
    "barrier",
    "cleanup",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "resolve_device",
    "unwrap_model",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0


def init_distributed(timeout_minutes: float = 30.0) -> DistributedInfo:
    """Join the process group described by ``torchrun``'s environment, if any.

    Uses NCCL when CUDA is available (and selects ``cuda:LOCAL_RANK``), Gloo otherwise.
    Calling it again, or without ``WORLD_SIZE > 1``, does nothing.

    Args:
        timeout_minutes: collective timeout. Rank 0 evaluates while the others wait at a
            barrier, so this must cover one evaluation.

    Returns:
        The rank, world size, local rank and backend of this process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    if world_size <= 1:
        return DistributedInfo(0, 1, 0, None)
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={world_size} asks for a distributed run, but this torch build has no "
            "torch.distributed; run a single process instead"
        )
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(local_rank)
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    logger.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return DistributedInfo(rank, world_size, local_rank, backend)


def resolve_device(name: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The device to run on: ``auto`` (or None) is this process's GPU when one is visible, else the CPU.

    Args:
        name: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ...
        local_rank: this process's GPU index on its node (default: ``LOCAL_RANK``, 0
            without ``torchrun``); ``cuda`` without an index gets it.

    Raises:
        RuntimeError: a CUDA device is asked for and no GPU is visible.
    """
    if local_rank is None:
        local_rank = get_local_rank()
    if name is None or str(name) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}' asked for, but no GPU is visible; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    """Rank of this process on its node (selects its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process() -> bool:
    """Whether this process logs, evaluates and writes checkpoints (rank 0)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _all_reduce(tensor: torch.Tensor, op: Any) -> torch.Tensor:
    if not is_distributed():
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=op)
    return reduced


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a copy; the input is untouched).

    Args:
        tensor: any shape; must be on the backend's device (CUDA for NCCL).

    Returns:
        Same shape as ``tensor``; ``tensor`` itself in a single process.
    """
    if not is_distributed():
        return tensor
    return _all_reduce(tensor, dist.ReduceOp.SUM) / get_world_size()


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum over ranks (e.g. "every rank's loss is finite")."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (e.g. "some rank was asked to stop")."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def cleanup() -> None:
    """Leave the process group (no-op when none is active)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
