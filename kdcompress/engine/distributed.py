"""DDP helpers: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; single-process runs need none of it."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group if launched by torchrun. Returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar logs across ranks (for the progress bar and metrics log)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (so all ranks stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BN running stats) to every rank so all ranks evaluate the saved model."""
    if dist.is_available() and dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str | torch.device) -> torch.device:
    """The one device check: ``auto`` picks this rank's GPU or the CPU; a CUDA request without a
    GPU is a MissingDependencyError (exit 4); anything but cpu/cuda[:N] is a one-line KdError."""
    from kdcompress.errors import KdError, MissingDependencyError

    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise KdError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise KdError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MissingDependencyError(f"device '{name}' requested but no CUDA GPU is available "
                                         f"(torch.cuda.is_available() is False). Use --device cpu.")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev
