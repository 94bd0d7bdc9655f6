"""Tensor-parallel worker group: one :class:`Worker` per rank.

``tensor_parallel_size == 1`` runs the worker in-process (no process group). With N > 1 every rank
is a Ray actor placed in a placement group (one bundle per rank: a GPU on GPU nodes, CPU otherwise;
STRICT_PACK by default); rank 0's node address and a free port, found at run time, form the
``torch.distributed`` rendezvous. Each iteration sends the same :class:`SchedulerOutput` to all
ranks and returns rank 0's result.

Ray APIs: ``ray.util.placement_group``, ``PlacementGroupSchedulingStrategy``
(https://docs.ray.io/en/latest/ray-core/scheduling/placement-group.html).
"""
from __future__ import annotations

import functools
from typing import Optional

from cluster.config import ExitConfig, ModelConfig, ParallelConfig
from cluster.core.outputs import ModelRunnerOutput, SchedulerOutput
from cluster.worker.worker import Worker


class WorkerGroup:
    """Runs iterations on all tensor-parallel ranks.

    Args:
        placement_group: an existing placement group whose bundles ``bundle_offset ..
            bundle_offset + tp - 1`` host the ranks (e.g. a Serve replica's); None creates one.
        num_cpus_per_rank: CPUs reserved per rank actor on CPU nodes (fractional allowed).

    Raises:
        RuntimeError: a rank failed to start (the original error is chained).
    """

    def __init__(self, model_dir: str, model_config: ModelConfig, parallel_config: ParallelConfig,
                 exit_config: Optional[ExitConfig], num_blocks: int, block_size: int,
                 placement_group=None, bundle_offset: int = 0, num_cpus_per_rank: float = 0.0,
                 placement_strategy: str = "STRICT_PACK"):
        self.tp = parallel_config.tensor_parallel_size
        self._pg_owned = None
        self.actors = []
        self.local: Optional[Worker] = None
        args = (model_dir, model_config, parallel_config, exit_config, num_blocks, block_size)
        if self.tp == 1 and placement_group is None:
            self.local = Worker(*args)
            return
        import ray
        from ray.util.placement_group import placement_group as make_pg
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        use_gpu = parallel_config.device.startswith("cuda")
        if placement_group is None:
            bundle = {"GPU": 1} if use_gpu else {"CPU": num_cpus_per_rank or 0.001}
            placement_group = self._pg_owned = make_pg([bundle] * self.tp, strategy=placement_strategy)
            ray.get(placement_group.ready())
        actor_cls = ray.remote(Worker)
        addr = ray.get(_rendezvous_task().options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=bundle_offset), num_cpus=0).remote())
        for rank in range(self.tp):
            strategy = PlacementGroupSchedulingStrategy(placement_group,
                                                        placement_group_bundle_index=bundle_offset + rank)
            opts = {"scheduling_strategy": strategy, "num_gpus": 1 if use_gpu else 0,
                    "num_cpus": 0 if use_gpu else (num_cpus_per_rank or 0.001)}
            self.actors.append(actor_cls.options(**opts).remote(*args, rank=rank, init_method=addr,
                                                                num_threads=None))
        try:
            ray.get([a.ping.remote() for a in self.actors])
        except Exception as e:  # a rank failed to build: tear down the rest
            self.shutdown()
            raise RuntimeError(f"tensor-parallel worker failed to start: {e}") from e

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self.local is not None:
            return self.local.execute_model(scheduler_output)
        import ray

        refs = [a.execute_model.remote(scheduler_output) for a in self.actors]
        return ray.get(refs)[0]

    def check_health(self, timeout_s: float = 30.0) -> None:
        """Raises if any rank is dead or unresponsive (a Serve replica then fails its health check)."""
        if self.local is not None:
            return
        import ray

        ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)

    def shutdown(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
            self.actors = []
        if self._pg_owned is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg_owned)
            self._pg_owned = None
        self.local = None


def _rendezvous_impl() -> str:
    import ray

    from cluster.distributed import free_tcp_address

    return free_tcp_address(ray.util.get_node_ip_address())


@functools.cache
def _rendezvous_task():
    """A Ray task (built on first use, so importing this module does not import Ray)."""
    import ray

    return ray.remote(_rendezvous_impl)
