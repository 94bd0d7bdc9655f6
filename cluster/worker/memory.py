"""KV cache sizing from device memory (CUDA), with vLLM's ``gpu_memory_utilization``.

On CUDA the engine may use ``gpu_memory_utilization * total`` bytes of the GPU (vLLM's meaning: a
per-engine budget; other processes' memory is not charged to it, but the KV cache never takes more
than the device has free). After the weights load, each rank measures the peak activation memory of
the largest iterations the scheduler can send (:meth:`ModelRunner.profile_run`); the KV cache gets
what remains:

    kv_bytes = min(utilization * total - weights - activation_peak,  free_now - activation_peak)

and the engine takes the smallest block count over the ranks. On the CPU nothing is measured: the
cache keeps ``CacheConfig.kv_cache_memory_bytes``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class MemoryReport:
    """One rank's memory plan (bytes), as the engine logs it at start."""

    num_blocks: int
    block_bytes: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_peak_bytes: int = 0  # measured on CUDA (0: not measured)
    total_bytes: int = 0  # device memory (0: CPU, not measured)
    free_bytes: int = 0  # free after the weights loaded (0: CPU)
    gpu_memory_utilization: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def sizes_from_device_memory(device: str) -> bool:
    """True where the KV cache is sized from the device's memory (CUDA) instead of a fixed budget."""
    return str(device).startswith("cuda")


def device_memory(device: torch.device) -> tuple[int, int]:
    """``(free, total)`` bytes of ``device`` (``torch.cuda.mem_get_info``)."""
    return torch.cuda.mem_get_info(device)


def measure_peak(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` beyond what was allocated before it (CUDA; 0 elsewhere).

    Cached blocks are released before and after, so ``device_memory`` then sees them as free."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    return max(0, peak)


def kv_cache_bytes(total: int, free: int, weights: int, activation_peak: int, utilization: float) -> int:
    """Bytes the KV cache may take (see the module docstring); never negative.

    Args:
        total, free: device memory; ``free`` measured after the weights loaded and the profile ran.
        weights: bytes of this rank's weights. activation_peak: peak bytes of one iteration.
        utilization: fraction of ``total`` this engine may use (0, 1].
    """
    budget = int(total * utilization) - weights - activation_peak
    room = free - activation_peak
    return max(0, min(budget, room))


def plan(total: int, free: int, weights: int, activation_peak: int, utilization: float,
         block_bytes: int) -> MemoryReport:
    """The block count for these measurements.

    Raises:
        ValueError: not even one KV block fits (names the numbers and what to change).
    """
    kv = kv_cache_bytes(total, free, weights, activation_peak, utilization)
    blocks = kv // block_bytes
    if blocks < 1:
        gib = 1 << 30
        raise ValueError(
            f"gpu_memory_utilization={utilization}: no room for the KV cache on this device "
            f"(total {total / gib:.2f} GiB, free {free / gib:.2f} GiB, weights {weights / gib:.2f} GiB, "
            f"activation peak {activation_peak / gib:.2f} GiB); raise gpu_memory_utilization, lower "
            f"max_num_batched_tokens / max_num_seqs / max_model_len, or use more tensor-parallel ranks")
    return MemoryReport(num_blocks=blocks, block_bytes=block_bytes, weights_bytes=weights,
                        kv_cache_bytes=blocks * block_bytes, activation_peak_bytes=activation_peak,
                        total_bytes=total, free_bytes=free, gpu_memory_utilization=utilization)
