"""Multi-process training through torchrun: process-group set-up from the environment, rank queries, and the
few collectives the trainer needs.

One process per GPU (or per CPU share with gloo). Every rank runs the same program on the same data; the
trainer gives each rank its shard of every global batch and averages gradients (DDP). Only rank 0 writes
files and logs; the others read what it wrote after a barrier, so the run directory must be on a file system
every rank sees (one machine, or a shared disk across nodes).
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), valid before and after the process group."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device_type: str) -> bool:
    """Join the process group torchrun describes in the environment (env:// initialisation): NCCL for GPUs,
    gloo for CPUs. Returns False (and does nothing) in a plain single-process run."""
    if not launched_by_torchrun() or initialized():
        return initialized()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=30))
    log.info("process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def teardown() -> None:
    if initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if initialized() and world_size() > 1:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not initialized() or world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a non-finite loss somewhere)."""
    if not initialized() or world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not initialized() or world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def main_only(function: F) -> F:
    """Run `function` on rank 0 only (file writers); other ranks get None. Anything that reads what it wrote
    on another rank must pass a `barrier()` first."""

    @functools.wraps(function)
    def on_rank_zero(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs) if is_main() else None

    return on_rank_zero  # type: ignore[return-value]
