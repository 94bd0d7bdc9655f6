"""One tensor-parallel rank: joins the process group, builds its model shard and KV cache."""
from __future__ import annotations

import os
from typing import Optional

import torch

from cluster.config import ExitConfig, ModelConfig, ParallelConfig
from cluster.core.outputs import ModelRunnerOutput, SchedulerOutput
from cluster.distributed import init_tensor_parallel
from cluster.model.loader import build_model
from cluster.worker.model_runner import ModelRunner


class Worker:
    """A rank of the tensor-parallel group. Plain class: used in-process or as a Ray actor.

    Args:
        rank: tensor-parallel rank (0 is the driver rank that samples).
        init_method: ``tcp://host:port`` of rank 0's rendezvous (found at run time).
        num_blocks, block_size: KV cache shape decided by the engine.
        num_threads: torch intra-op threads; None: :func:`default_num_threads`.
    """

    def __init__(self, model_dir: str, model_config: ModelConfig, parallel_config: ParallelConfig,
                 exit_config: Optional[ExitConfig], num_blocks: int, block_size: int, rank: int = 0,
                 init_method: Optional[str] = None, num_threads: Optional[int] = None):
        self.rank = rank
        tp = parallel_config.tensor_parallel_size
        num_threads = num_threads or default_num_threads(tp, parallel_config.device)
        if num_threads:
            torch.set_num_threads(num_threads)
        init_tensor_parallel(rank, tp, init_method or "", parallel_config.dist_backend)
        device = parallel_config.device
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", 0)) if tp == 1 else 0
            torch.cuda.set_device(local)
        model = build_model(model_dir, model_config, device=device)
        self.runner = ModelRunner(model, model_config, exit_config, num_blocks, block_size, is_driver=rank == 0)

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        return self.runner.execute_model(scheduler_output)

    def ping(self) -> int:
        """Health check: returns this worker's rank."""
        return self.rank

    def num_threads(self) -> int:
        return torch.get_num_threads()


def default_num_threads(tp: int, device: str) -> Optional[int]:
    """Intra-op threads for one rank: this host's usable cores split evenly over the ranks (CPU, tp > 1).

    Ray pins an actor with fractional ``num_cpus`` to one thread (``OMP_NUM_THREADS=1``), which wastes
    a many-core host; more threads than cores per rank makes the ranks, which wait for each other at
    every all-reduce, preempt one another. None (keep torch's default) in-process or on GPU.
    """
    if tp == 1 or not device.startswith("cpu"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // tp)
