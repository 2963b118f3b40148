"""Process-group setup and the few collectives the loop needs (engine-free).

Every launcher (torchrun, TorchDistributor, Horovod) starts ranks with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; a process started without them is a
single-rank run on a free local port. NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dollyflow.core.training.rendezvous import free_port

_SINGLE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool      # this module created the process group (and destroys it)
    own_env: bool = False  # this module set the rendezvous environment (single-rank run)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(timeout_minutes: int = 30) -> DistContext:
    """Join (or create) the process group; set the CUDA device of this rank."""
    own_env = "RANK" not in os.environ or "WORLD_SIZE" not in os.environ
    if own_env:
        os.environ.update({k: v for k, v in _SINGLE.items()}, MASTER_PORT=str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = "nccl" if cuda else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), rank=rank, world_size=world)
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return DistContext(rank, world, local_rank, device, backend, owns, own_env)


def shutdown(ctx: DistContext) -> None:
    """Barrier, then destroy the group (gloo sometimes aborts at exit otherwise)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            if ctx.owns_group:
                dist.destroy_process_group()
                _forget_deepspeed_groups()
            if ctx.own_env:
                for k in (*_SINGLE, "MASTER_PORT"):
                    os.environ.pop(k, None)


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches sub-groups of the world group in module globals; once that group is
    destroyed they are dangling, and a second run in the same process (a notebook, a test)
    would use them. Reset them to their initial empty values."""
    try:
        from deepspeed.utils import groups
    except ImportError:  # pragma: no cover
        return
    for name in dir(groups):
        if name.isupper() and name.startswith("_") and "GROUP" in name:
            value = getattr(groups, name)
            if isinstance(value, dict):
                value.clear()
            elif value is not None and not isinstance(value, (str, int)):
                setattr(groups, name, None)


def abort(ctx: DistContext) -> None:
    """After a failure of a single-rank run: drop the group without a barrier."""
    if dist.is_initialized() and ctx.owns_group:
        dist.destroy_process_group()
        _forget_deepspeed_groups()
    if ctx.own_env:
        for k in (*_SINGLE, "MASTER_PORT"):
            os.environ.pop(k, None)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce(values, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Element-wise reduction of a list/array/tensor of numbers over ranks (float64 on CPU for
    gloo, the rank's device for NCCL); returns a CPU tensor."""
    t = torch.as_tensor(values, dtype=torch.float64).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.cpu()
