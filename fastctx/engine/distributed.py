"""Process-group setup for `torchrun` launches and small collective helpers.

`torchrun --nproc_per_node=N -m fastctx.cli train CONFIG` sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads
them and initialises the default group (nccl for CUDA, gloo for CPU). Without
them it is a single process and nothing is initialised.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "resolve_device", "all_reduce_mean", "barrier", "broadcast_object",
           "cleanup_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and the device it runs on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:local_rank when CUDA is available, else cpu; "cuda" -> cuda:local_rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available")
    return resolved


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group described by the torchrun environment (if any); pick this process's device.

    An already initialised default group (e.g. set up by a test harness) is
    used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        return DistInfo(rank, world_size, local_rank, resolve_device(device, local_rank))
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if world_size > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if backend == "auto":
            backend = "nccl" if resolved.type == "cuda" else "gloo"
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, resolved)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over processes (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from process `src` on every process (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
