"""Multi-process training through torchrun: process-group set-up from the environment, rank queries, and the
few collectives the trainer needs.

One process per GPU (or per CPU share with gloo). Every rank runs the same program on the same data; the
trainer gives each rank its shard of every global batch and averages gradients (DDP). Only rank 0 writes
files and logs; the others read what it wrote after a barrier, so the run directory must be on a file system
every rank sees (one machine, or a shared disk across nodes).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import weakref
from collections.abc import Callable, Iterator
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


# ----------------------------------------------------------------------------------------------
# FSDP (train.parallel: fsdp): parameters, gradients and optimiser state sharded across ranks

# Roots whose own parameters are gathered for use outside the training forward (evaluation, prediction after
# training); gathering a state dict reshards them, so `full_state_dict` gathers them again afterwards.
_open_roots: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
# The FSDP root each sharded model was wrapped in, so that a later training stage reuses it.
_roots: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one, outermost first: a Hugging Face model's `_no_split_modules` (its
    decoder and vision blocks), otherwise the modules held in a ModuleList or ModuleDict (transformer blocks).
    A block must be called through its forward, which is where FSDP gathers its parameters."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    containers = (torch.nn.ModuleList, torch.nn.ModuleDict)

    def units(module: torch.nn.Module) -> list[torch.nn.Module]:
        found: list[torch.nn.Module] = []
        for child in module.children():
            if names:
                is_unit = type(child).__name__ in names
            else:
                is_unit = isinstance(module, containers) and not isinstance(child, containers)
            if is_unit and any(True for _ in child.parameters()):
                found.append(child)
            else:
                found += units(child)
        return found

    return units(model)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def fsdp_root(model: torch.nn.Module) -> torch.nn.Module | None:
    """The FSDP root `shard` wrapped `model` in (None if it was never sharded)."""
    return _roots.get(model)


def shard(root: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` (a submodule of `root`) with FSDP2: each block of `shard_units`, then `root`, whose
    forward must be the whole training step so that FSDP gathers the parameters outside the blocks. Parameters
    stay fp32 (autocast does the low-precision compute, as under DDP)."""
    from torch.distributed.fsdp import fully_shard

    units = shard_units(model)
    for unit in units:
        fully_shard(unit)
    fully_shard(root)
    _roots[model] = root
    log.info("FSDP: %d blocks sharded across %d processes", len(units), world_size())
    return root


@contextlib.contextmanager
def unsharded(root: torch.nn.Module) -> Iterator[None]:
    """`open_for_use` for the length of a `with` block (evaluation during training)."""
    open_for_use(root)
    try:
        yield
    finally:
        close_after_use(root)


def open_for_use(root: torch.nn.Module) -> None:
    """Gather the root's own parameters on every rank, so the model can be called through any method (blocks
    gather theirs in their forward). Every rank must then call the model the same way (same batches)."""
    root.unshard()  # type: ignore[operator]
    _open_roots.add(root)


def close_after_use(root: torch.nn.Module) -> None:
    if root in _open_roots:
        _open_roots.discard(root)
        root.reshard()  # type: ignore[operator]


def full_state_dict(module: torch.nn.Module, *, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with full tensors. For a sharded module every rank must call this (it gathers);
    rank 0 gets the tensors on the CPU and the other ranks an empty dict, or with `every_rank` every rank
    gets them on the model's device (to copy into another model)."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    state = get_model_state_dict(module, options=options)
    for root in list(_open_roots):
        root.unshard()  # type: ignore[operator]
    return state


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors into `module`; for a sharded one every rank calls this and only rank 0's `state` is
    read (the others may pass an empty dict): each rank keeps its shard."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's state dict; for a sharded model gathered to rank 0 and keyed by parameter name."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The inverse of `optimizer_state` (for a sharded model, rank 0's `state` is broadcast and sharded)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # not strict: a parameter no step has reached yet (a variant's unused part) has no AdamW state
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
