"""Tensor-parallel worker group: one :class:`Worker` per rank.

``tensor_parallel_size == 1`` runs the worker in-process (no process group). With N > 1 every rank
is a Ray actor placed in a placement group (one bundle per rank: a GPU on GPU nodes, CPU otherwise;
STRICT_PACK by default); rank 0's node address and a free port, found at run time, form the
``torch.distributed`` rendezvous. Each iteration sends the same message to all ranks and returns
rank 0's result: the scheduler's diff (``SchedulerOutput.step``, :mod:`cluster.core.step_message`)
applied to the requests each rank holds, or a hand-built :class:`SchedulerOutput` as it is.

Ray APIs: ``ray.util.placement_group``, ``PlacementGroupSchedulingStrategy``
(https://docs.ray.io/en/latest/ray-core/scheduling/placement-group.html).
"""
from __future__ import annotations

import functools
import re
from typing import Optional

from cluster.config import ExitConfig, ModelConfig, ParallelConfig
from cluster.core.outputs import ModelRunnerOutput, SchedulerOutput
from cluster.worker.worker import Worker


class WorkerGroup:
    """Runs iterations on all tensor-parallel ranks.

    Args:
        placement_group: an existing placement group whose bundles ``bundle_offset ..
            bundle_offset + tp - 1`` host the ranks (e.g. a Serve replica's); None creates one.
        num_cpus_per_rank: CPUs reserved per rank actor on CPU nodes (fractional allowed; the
            default is a token amount so that ranks fit beside other actors on a small host; 0 means
            the same). With a given placement group it must fit the rank bundles.
        num_threads_per_rank: torch threads per rank; None: ``int(num_cpus_per_rank)`` when that is
            at least 1, else the host's cores divided by ``tp`` (see
            :func:`cluster.worker.worker.default_num_threads`).
        startup_timeout_s: limit for the placement group and every rank to come up.

    Raises:
        ValueError: head counts or MLP width not divisible by ``tp`` (before any actor starts).
        TimeoutError: the placement group could not be placed within ``startup_timeout_s``.
        RuntimeError: a rank failed to start (the original error is chained).
    """

    def __init__(self, model_dir: str, model_config: ModelConfig, parallel_config: ParallelConfig,
                 exit_config: Optional[ExitConfig], num_blocks: Optional[int], block_size: int,
                 placement_group=None, bundle_offset: int = 0, num_cpus_per_rank: float = 0.001,
                 num_threads_per_rank: Optional[int] = None, placement_strategy: str = "STRICT_PACK",
                 startup_timeout_s: float = 300.0):
        self.tp = parallel_config.tensor_parallel_size
        self._pg_owned = None
        self.actors = []
        self.local: Optional[Worker] = None
        check_divisible(model_config, self.tp)
        args = (model_dir, model_config, parallel_config, exit_config, num_blocks, block_size)
        if self.tp == 1 and placement_group is None:
            self.local = Worker(*args, num_threads=num_threads_per_rank)
            return
        import ray
        from ray.util.placement_group import placement_group as make_pg
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        use_gpu = parallel_config.device.startswith("cuda")
        cpus = 0 if use_gpu else (num_cpus_per_rank or 0.001)
        if num_threads_per_rank is None and cpus >= 1:
            num_threads_per_rank = int(cpus)
        try:
            if placement_group is None:
                bundle = {"GPU": 1} if use_gpu else {"CPU": cpus}
                placement_group = self._pg_owned = make_pg([bundle] * self.tp, strategy=placement_strategy)
                try:
                    ray.get(placement_group.ready(), timeout=startup_timeout_s)
                except ray.exceptions.GetTimeoutError:
                    raise TimeoutError(
                        f"tensor_parallel_size={self.tp}: no room for {self.tp} x {bundle} ({placement_strategy}) "
                        f"within {startup_timeout_s:.0f} s; cluster resources: {ray.cluster_resources()}") from None
            actor_cls = ray.remote(Worker)
            addr = ray.get(_rendezvous_task().options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=bundle_offset), num_cpus=0).remote(),
                timeout=startup_timeout_s)
            for rank in range(self.tp):
                strategy = PlacementGroupSchedulingStrategy(placement_group,
                                                            placement_group_bundle_index=bundle_offset + rank)
                opts = {"scheduling_strategy": strategy, "num_gpus": 1 if use_gpu else 0, "num_cpus": cpus}
                self.actors.append(actor_cls.options(**opts).remote(*args, rank=rank, init_method=addr,
                                                                    num_threads=num_threads_per_rank))
            refs = [a.ping.remote() for a in self.actors]
            try:
                ray.get(refs, timeout=startup_timeout_s)  # raises the first failure at once
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"tensor-parallel ranks (size {self.tp}) did not start within "
                                   f"{startup_timeout_s:.0f} s") from None
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"tensor-parallel rank {_failed_rank(refs)} of {self.tp} failed to start: "
                                   f"{_summary(e)}") from e
        except BaseException:
            self.shutdown()
            raise

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One iteration on every rank; rank 0's output.

        Raises:
            RuntimeError: a rank raised or died (its peers' collectives then fail too; the group
                is unusable afterwards).
        """
        method, arg = "execute_model", scheduler_output
        msg = scheduler_output.step
        if msg is not None:  # the guided masks the engine computed after scheduling travel with it
            method, arg = "execute_step", msg
            msg.guided_bitmasks = {i: sr.guided_bitmask for i, sr in enumerate(scheduler_output.scheduled)
                                   if sr.guided_bitmask is not None}
        if self.local is not None:
            return getattr(self.local, method)(arg)
        import ray

        arg = ray.put(arg)  # serialized once for every rank, not once per actor call
        refs = [getattr(a, method).remote(arg) for a in self.actors]
        try:
            return ray.get(refs)[0]  # raises the first rank's error without waiting for the others
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"tensor-parallel rank {_failed_rank(refs)} of {self.tp} failed in execute_model: "
                               f"{_summary(e)}") from e

    def _all(self, method: str, *args, timeout_s: Optional[float] = None) -> list:
        """``method(*args)`` on every rank at once (collectives inside stay in step); their results."""
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        import ray

        refs = [getattr(a, method).remote(*args) for a in self.actors]
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"tensor-parallel rank {_failed_rank(refs)} of {self.tp} failed in {method}: "
                               f"{_summary(e)}") from e

    def determine_num_blocks(self, gpu_memory_utilization: float, max_num_batched_tokens: int, max_num_seqs: int,
                             max_model_len: int):
        """The KV block count that fits on every rank's device (the smallest of the ranks'), as the
        driver rank's :class:`~cluster.worker.memory.MemoryReport` with that count.

        Raises:
            RuntimeError: a rank failed (a ValueError "no room for the KV cache" in its message).
        """
        import dataclasses

        reports = self._all("determine_num_blocks", gpu_memory_utilization, max_num_batched_tokens, max_num_seqs,
                            max_model_len)
        n = min(r.num_blocks for r in reports)
        return dataclasses.replace(reports[0], num_blocks=n, kv_cache_bytes=n * reports[0].block_bytes)

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate every rank's KV cache with ``num_blocks`` blocks."""
        self._all("initialize_cache", num_blocks)

    def memory_report(self):
        """The driver rank's :class:`~cluster.worker.memory.MemoryReport` (weights, KV bytes, blocks)."""
        return self._all("memory_report")[0]

    def check_health(self, timeout_s: float = 30.0) -> None:
        """Raises if any rank is dead or unresponsive (a Serve replica then fails its health check)."""
        if self.local is not None:
            return
        import ray

        ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Every rank leaves the process group (``destroy_process_group``) and frees its device memory;
        then the actors are killed (also those that did not answer within ``timeout_s``)."""
        if self.actors:
            import ray

            refs = [a.shutdown.remote() for a in self.actors]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a dead rank: kill the rest anyway
                pass
            for a in self.actors:
                ray.kill(a)
            self.actors = []
        if self._pg_owned is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg_owned)
            self._pg_owned = None
        if self.local is not None:
            self.local.shutdown()
        self.local = None


def check_divisible(model_config: ModelConfig, tp: int) -> None:
    """Raises ValueError unless every tensor-parallel split of the model is even."""
    for what, n in (("num_attention_heads", model_config.num_heads),
                    ("num_key_value_heads", model_config.num_kv_heads),
                    ("intermediate_size", model_config.intermediate_size)):
        if n % tp:
            raise ValueError(f"tensor_parallel_size: {what} ({n}) is not divisible by {tp}")


def _failed_rank(refs) -> str:
    """Index of the first finished ref that holds an error ("?" if none has finished yet)."""
    import ray

    for i, ref in enumerate(refs):
        if ray.wait([ref], timeout=0)[0]:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                return str(i)
    return "?"


def _summary(e: BaseException) -> str:
    """The last line of a Ray error (the remote exception's ``Type: message``), without colour codes."""
    lines = [l.strip() for l in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if l.strip()]
    return lines[-1] if lines else type(e).__name__


def _rendezvous_impl() -> str:
    import ray

    from cluster.distributed import free_tcp_address

    return free_tcp_address(ray.util.get_node_ip_address())


@functools.cache
def _rendezvous_task():
    """A Ray task (built on first use, so importing this module does not import Ray)."""
    import ray

    return ray.remote(_rendezvous_impl)
