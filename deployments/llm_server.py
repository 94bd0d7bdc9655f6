"""LLMServer: one Serve replica = one :class:`~cluster.engine.async_engine.AsyncEngine`.

A thin adapter: :meth:`LLMServer.generate` takes an :class:`~cluster.engine.protocol.EngineRequest`
and streams the engine's :class:`~cluster.engine.protocol.RequestOutput` deltas back through Serve,
at most one item per engine step, and fewer when Serve's side reads slower than the engine steps:
the deltas buffered since the last item are merged into one (:class:`~deployments.coalesce.Coalesced`),
since every item costs a Ray object whatever its size.
A refused request (:class:`InvalidRequestError`) or a dead engine (``EngineDeadError``) is yielded
as the stream's item instead of raised, so the typed error (param, code) reaches the ingress intact
through Serve's streaming handle.

Placement: the replica's placement group has bundle 0 for the replica itself and one bundle per
tensor-parallel rank (a GPU each on GPU nodes, CPUs otherwise; strategy STRICT_PACK by default);
the engine's :class:`~cluster.worker.worker_group.WorkerGroup` puts rank ``i`` in bundle ``1 + i``
(``placement_group=ray.util.get_current_placement_group(), bundle_offset=1``). On CPU with
``tensor_parallel_size == 1`` the single rank runs inside the replica process.

Serve hooks: ``check_health`` (a dead engine loop or rank fails it, so Serve replaces the replica)
and ``record_routing_stats`` (a :class:`~deployments.replica_stats.ReplicaStats`: running/waiting
tokens, KV usage and the recent mean exit layer, for ``deployments.router``). The mean exit layer is
that of the last :data:`EXIT_WINDOW_TOKENS` generated tokens (decoder layers run per token; the
model's layer count before any token).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from typing import AsyncIterator, Union

from ray import serve

from cluster.engine.protocol import EngineRequest, InvalidRequestError, RequestOutput
from deployments.coalesce import Coalesced
from deployments.config import ServeArgs
from deployments.replica_stats import ReplicaStats

logger = logging.getLogger("ray.serve")
EXIT_WINDOW_TOKENS = 512  # generated tokens whose exit layers make the routed "recent mean exit layer"


@serve.deployment(name="LLMServer", health_check_period_s=5.0, health_check_timeout_s=60.0,
                  max_ongoing_requests=64)
class LLMServer:
    """Serve replica owning one async engine.

    Args:
        args: :class:`~deployments.config.ServeArgs` as a dict.
        device: ``cpu`` or ``cuda`` (resolved by ``build_app``, matching the placement group).
    """

    def __init__(self, args: dict, device: str = "cpu"):
        import ray

        from cluster.engine.async_engine import AsyncEngine

        self.args = ServeArgs.model_validate(args)
        kwargs = self.args.engine_kwargs(device)
        if self.args.torch_threads:
            kwargs["num_threads_per_rank"] = self.args.torch_threads
        if self.args.uses_rank_actors(device):
            pg = ray.util.get_current_placement_group()
            kwargs.update(placement_group=pg, bundle_offset=1 if pg is not None else 0,
                          num_cpus_per_rank=self.args.num_cpus_per_rank,
                          placement_strategy=self.args.placement_strategy)
        self.engine = AsyncEngine.from_args(**kwargs)
        mc = self.engine.model_config
        self.num_layers = mc.num_layers
        eng = self.engine.engine
        self.kv_capacity_tokens = eng.num_blocks * eng.block_size
        self._recent_exits: collections.deque[int] = collections.deque(maxlen=EXIT_WINDOW_TOKENS)
        self.num_routing_stats_reports = 0
        self.num_stream_items = 0  # items yielded by generate (each one crosses to the ingress)
        self.num_stream_deltas = 0  # engine deltas they carried
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests)
            self.replica_id = "local"
        logger.info("LLMServer %s ready: %d layers, tp=%d, device=%s, exit=%s, %d KV blocks",
                    self.replica_id, mc.num_layers, self.args.tensor_parallel_size, device,
                    eng.exit_config, eng.num_blocks)

    # --------------------------------------------------------------------------------- requests
    async def generate(self, req: EngineRequest) -> AsyncIterator[Union[RequestOutput, BaseException]]:
        """Stream the engine's deltas for ``req``; the first carries ``replica`` (this replica's id).
        Deltas that queue up while Serve has not taken the last item are merged into one.

        A refused request yields its :class:`InvalidRequestError` as the only item; a dead engine
        yields ``EngineDeadError`` (then ends). Cancelling the call (client disconnect) closes the
        engine stream, which aborts the request and frees its KV blocks.
        """
        from cluster.engine.async_engine import EngineDeadError

        first, seen = True, 0
        items = Coalesced(self.engine.generate(req))
        try:
            async with contextlib.aclosing(items):  # closing it aborts the request
                async for out in items:
                    self.num_stream_items += 1
                    self.num_stream_deltas += items.num_deltas - seen
                    seen = items.num_deltas
                    self._recent_exits.extend(out.new_exit_layers)
                    if first:
                        first = False
                        out.replica = self.replica_id  # read by the ingress (x-eeserve-replica header)
                    yield out
        except (InvalidRequestError, EngineDeadError) as e:
            yield e

    async def model_info(self) -> dict:
        mc = self.engine.model_config
        ec = self.engine.engine.exit_config
        return {"num_layers": mc.num_layers, "max_model_len": mc.max_model_len, "vocab_size": mc.vocab_size,
                "exit_layers": list(ec.exit_layers) if ec else [], "exit_threshold": ec.threshold if ec else None,
                "exit_mode": (ec.mode or ec.policy) if ec else None,
                "draft_layer": ec.default_draft_layer if ec else None,
                "num_draft_tokens": ec.num_draft_tokens if ec else None,
                "skip_layers": list(ec.skip_layers) if ec else [],
                "replica": self.replica_id}

    # ------------------------------------------------------------------------------ introspection
    @property
    def mean_exit_layer(self) -> float:
        """Mean decoder layers run per token over the last ``EXIT_WINDOW_TOKENS`` tokens (all layers
        before the first token)."""
        ex = self._recent_exits
        return sum(ex) / len(ex) if ex else float(self.num_layers)

    def _routing_stats(self) -> ReplicaStats:
        s = self.engine.stats()
        return ReplicaStats(
            running_tokens=s.get("running_tokens", 0), waiting_tokens=s.get("waiting_tokens", 0),
            num_running=s.get("num_running", 0), num_waiting=s.get("num_waiting", 0),
            kv_usage=round(float(s.get("kv_usage", 0.0)), 3), kv_capacity_tokens=self.kv_capacity_tokens,
            mean_exit_layer=round(self.mean_exit_layer, 3), num_layers=self.num_layers, ts=time.time())

    async def stats(self) -> dict:
        """Engine statistics plus this replica's id, in-flight request count, recent mean exit layer,
        process id, resident memory (``rss_bytes``), Ray node id and actor name (``/metrics`` and the benchmarks read it)."""
        import psutil
        import ray

        return {**self.engine.stats(), "replica": self.replica_id,
                "num_blocks": self.engine.engine.num_blocks,
                "num_routing_stats_reports": self.num_routing_stats_reports,
                "num_stream_items": self.num_stream_items, "num_stream_deltas": self.num_stream_deltas,
                "mean_exit_layer": round(self.mean_exit_layer, 3), "num_layers": self.num_layers,
                "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss,
                "node_id": ray.get_runtime_context().get_node_id(),
                "actor_name": ray.get_runtime_context().get_actor_name()}

    async def placement(self) -> dict:
        """Where this replica runs: its Ray node id and, with rank actors, the node id of each rank's
        bundle (``rank_nodes[i]``: rank i, bundle 1 + i of the replica's placement group)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        pg = ray.util.get_current_placement_group()
        if pg is None:  # the single rank runs in this process
            return {"replica_node": node, "rank_nodes": [node] * self.args.tensor_parallel_size}
        table = ray.util.placement_group_table(pg)
        b2n = table.get("bundles_to_node_id", {})
        return {"replica_node": node, "strategy": table.get("strategy"),
                "rank_nodes": [b2n.get(1 + i) for i in range(self.args.tensor_parallel_size)]}

    async def check_integrity(self) -> dict:
        """Run the block manager's integrity check on the engine thread; returns :meth:`stats`."""
        await self.engine.check_integrity()
        return await self.stats()

    async def rank_actors(self) -> list:
        """Handles of the tensor-parallel rank actors (empty when the rank runs in-process)."""
        return list(self.engine.engine.workers.actors)

    def record_routing_stats(self) -> dict:
        """Serve hook (polled by the controller): outstanding work for the request router, a
        :class:`~deployments.replica_stats.ReplicaStats` as the dict Serve carries."""
        self.num_routing_stats_reports += 1
        return self._routing_stats().as_dict()

    async def check_health(self) -> None:
        """Serve hook: raises if the engine loop died or a tensor-parallel rank is unreachable."""
        await asyncio.to_thread(self.engine.check_health)

    async def health(self) -> dict:
        await self.check_health()
        return {"status": "ok", "replica": self.replica_id, "time": time.time()}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:
                pass
