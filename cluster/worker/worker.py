"""One tensor-parallel rank: joins the process group, builds its model shard and KV cache."""
from __future__ import annotations

import os
from typing import Optional

import torch

from cluster.config import ExitConfig, ModelConfig, ParallelConfig
from cluster.core.outputs import ModelRunnerOutput, SchedulerOutput
from cluster.core.step_message import StepMessage
from cluster.distributed import destroy_tensor_parallel, init_tensor_parallel
from cluster.model.loader import build_model
from cluster.worker import memory
from cluster.worker.model_runner import ModelRunner


class Worker:
    """A rank of the tensor-parallel group. Plain class: used in-process or as a Ray actor.

    Args:
        rank: tensor-parallel rank (0 is the driver rank that samples).
        init_method: ``tcp://host:port`` of rank 0's rendezvous (found at run time); given to rank
            actors only (a rank actor holds one GPU, ``cuda:0`` under Ray's ``CUDA_VISIBLE_DEVICES``).
        num_blocks, block_size: KV cache shape decided by the engine; ``num_blocks=None`` leaves the
            cache unallocated until :meth:`initialize_cache` (CUDA: after :meth:`determine_num_blocks`).
        num_threads: torch intra-op threads; None: :func:`default_num_threads`.

    ``parallel_config.debug_default_device`` (e.g. ``"meta"``) runs every step inside
    ``with torch.device(...)``: a tensor created without an explicit device lands there and fails when
    mixed with the model's, as a CPU tensor would beside a CUDA model (tests; off: no cost).
    """

    def __init__(self, model_dir: str, model_config: ModelConfig, parallel_config: ParallelConfig,
                 exit_config: Optional[ExitConfig], num_blocks: Optional[int], block_size: int, rank: int = 0,
                 init_method: Optional[str] = None, num_threads: Optional[int] = None):
        self.rank = rank
        tp = parallel_config.tensor_parallel_size
        num_threads = num_threads or default_num_threads(tp, parallel_config.device)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = local_device(parallel_config.device, in_actor=init_method is not None)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # before NCCL binds its communicator to the device
        init_tensor_parallel(rank, tp, init_method or "", parallel_config.dist_backend, device=self.device)
        self.debug_default_device = parallel_config.debug_default_device
        model = build_model(model_dir, model_config, device=self.device)
        if model_config.torch_compile:
            from cluster.model.compile import compile_decoder_layers

            compile_decoder_layers(model)
        self.runner = ModelRunner(model, model_config, exit_config, num_blocks, block_size, is_driver=rank == 0)

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """Run an iteration given whole (a hand-built output; the engine sends :meth:`execute_step`)."""
        if self.debug_default_device is None:
            return self.runner.execute_model(scheduler_output)
        with torch.device(self.debug_default_device):
            return self.runner.execute_model(scheduler_output)

    def execute_step(self, msg: StepMessage) -> Optional[ModelRunnerOutput]:
        """Run an iteration sent as a diff (:meth:`ModelRunner.execute_step`)."""
        if self.debug_default_device is None:
            return self.runner.execute_step(msg)
        with torch.device(self.debug_default_device):
            return self.runner.execute_step(msg)

    def determine_num_blocks(self, gpu_memory_utilization: float, max_num_batched_tokens: int, max_num_seqs: int,
                             max_model_len: int) -> memory.MemoryReport:
        """KV blocks that fit on this rank's device after the weights and the activation peak of the
        largest iterations (:meth:`ModelRunner.profile_run`); see :mod:`cluster.worker.memory`.

        Raises:
            ValueError: not one block fits.
        """
        r = self.runner

        def profile():
            if self.debug_default_device is None:
                return r.profile_run(max_num_batched_tokens, max_num_seqs, max_model_len)
            with torch.device(self.debug_default_device):
                return r.profile_run(max_num_batched_tokens, max_num_seqs, max_model_len)

        peak = memory.measure_peak(profile, self.device)
        free, total = memory.device_memory(self.device)
        return memory.plan(total, free, r.weights_bytes, peak, gpu_memory_utilization, r.block_bytes)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_cache(num_blocks)

    def memory_report(self) -> memory.MemoryReport:
        """This rank's weights and KV cache (bytes) and block count."""
        r = self.runner
        return memory.MemoryReport(num_blocks=r.num_blocks, block_bytes=r.block_bytes, weights_bytes=r.weights_bytes,
                                   kv_cache_bytes=r.num_blocks * r.block_bytes)

    def ping(self) -> int:
        """Health check: returns this worker's rank."""
        return self.rank

    def num_threads(self) -> int:
        return torch.get_num_threads()

    def shutdown(self) -> None:
        """Free the model and KV cache and leave the process group (``destroy_process_group``)."""
        self.runner = None
        destroy_tensor_parallel()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def local_device(device: str, in_actor: bool) -> torch.device:
    """The torch device of this rank. CUDA: a rank actor sees only its own GPU (Ray sets
    ``CUDA_VISIBLE_DEVICES``), so ``cuda:0``; in-process, the index in ``device`` (``cuda:1``), else
    ``$LOCAL_RANK``, else 0."""
    d = torch.device(device)
    if d.type != "cuda":
        return d
    if in_actor:
        return torch.device("cuda", 0)
    return torch.device("cuda", d.index if d.index is not None else int(os.environ.get("LOCAL_RANK", 0)))


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
