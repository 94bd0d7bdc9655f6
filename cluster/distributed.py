"""Tensor-parallel process-group state and collectives.

With ``tensor_parallel_size == 1`` no process group exists and every collective is the identity.
With N > 1, ranks join a ``torch.distributed`` group (NCCL on CUDA, gloo on CPU) through
:func:`init_tensor_parallel`; the address and port come from the caller (found at run time).
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPState:
    rank: int = 0
    size: int = 1


_STATE = TPState()

# Rendezvous and per-collective timeout: a rank that died mid-step makes its peers' collectives fail
# after this long instead of torch's 30-minute default.
DEFAULT_TIMEOUT_S = 300.0


def tp_rank() -> int:
    return _STATE.rank


def tp_size() -> int:
    return _STATE.size


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str,
                         timeout_s: float = DEFAULT_TIMEOUT_S, device: Optional[torch.device] = None) -> None:
    """Join the tensor-parallel group (one process per rank).

    Args:
        init_method: ``tcp://host:port`` of rank 0, e.g. from :func:`free_tcp_address`.
        backend: ``nccl`` (CUDA) or ``gloo`` (CPU).
        timeout_s: limit for the rendezvous and for every collective.
        device: this rank's device; with NCCL it is passed as ``device_id`` (the communicator is bound
            to it at once; call ``torch.cuda.set_device`` first). Collectives then take tensors on it.
    """
    global _STATE
    if world_size > 1 and not dist.is_initialized():
        kw = {}
        if backend == "nccl":
            kw["device_id"] = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    _STATE = TPState(rank=rank, size=world_size)


def destroy_tensor_parallel() -> None:
    """Leave the group (``destroy_process_group``; a no-op at size 1, where no group was made)."""
    global _STATE
    if _STATE.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _STATE = TPState()


def free_tcp_address(host: str | None = None) -> str:
    """A ``tcp://ip:port`` on this host with a port the OS reports free (never hard-coded)."""
    host = host or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"tcp://{host}:{port}"


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``op``: ``sum``, ``max`` or ``min``) over the tensor-parallel group
    (identity at size 1). ``x`` lives on the rank's device (CUDA with NCCL): no host copy, no sync.
    Raises KeyError for another ``op``."""
    if _STATE.size > 1:
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension: ``[..., d] -> [..., d * size]``."""
    if _STATE.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_from_driver(x: torch.Tensor) -> torch.Tensor:
    """In place: every rank's ``x`` becomes rank 0's (identity at size 1); ``x`` on the rank's device."""
    if _STATE.size > 1:
        dist.broadcast(x, src=0)
    return x
