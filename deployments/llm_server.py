"""LLMServer: one Serve replica = one :class:`~cluster.engine.async_engine.AsyncEngine`.

Placement: the replica's placement group has bundle 0 for the replica itself and one bundle per
tensor-parallel rank (a GPU each on GPU nodes, CPUs otherwise; strategy STRICT_PACK by default);
the engine's :class:`~cluster.worker.worker_group.WorkerGroup` puts rank ``i`` in bundle ``1 + i``
(``placement_group=ray.util.get_current_placement_group(), bundle_offset=1``). On CPU with
``tensor_parallel_size == 1`` the single rank runs inside the replica process.

Serve hooks: ``check_health`` (a dead engine loop or rank fails it, so Serve replaces the replica)
and ``record_routing_stats`` (running/waiting tokens and KV usage for ``cluster.router``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from ray import serve

from deployments.config import ServeArgs
from deployments.protocol import GenerateRequest

logger = logging.getLogger("ray.serve")


@dataclass
class _Active:
    num_prompt_tokens: int
    num_output_tokens: int = 0


class _Metrics:
    """Replica metrics through ``ray.serve.metrics`` (Serve adds deployment/replica/app tags)."""

    def __init__(self, model: str, num_layers: int):
        from ray.serve import metrics

        tags = {"model": model}
        latency = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
        self.exit_layer = metrics.Histogram(
            "eeserve_exit_layer", description="Decoder layers run per generated token (num_layers = full).",
            boundaries=[float(l) + 0.5 for l in range(1, num_layers)], tag_keys=("model",))
        self.generated_tokens = metrics.Counter(
            "eeserve_generated_tokens", description="Generated tokens.", tag_keys=("model",))
        self.finished_requests = metrics.Counter(
            "eeserve_finished_requests", description="Finished requests by finish reason.",
            tag_keys=("model", "finish_reason"))
        self.ttft = metrics.Histogram("eeserve_time_to_first_token_s", description="Time to first token (s).",
                                      boundaries=latency, tag_keys=("model",))
        self.tpot = metrics.Histogram("eeserve_time_per_output_token_s",
                                      description="Mean time per output token after the first (s).",
                                      boundaries=latency, tag_keys=("model",))
        self.running = metrics.Gauge("eeserve_running_requests", description="Requests running.",
                                     tag_keys=("model",))
        self.waiting = metrics.Gauge("eeserve_waiting_requests", description="Requests waiting.",
                                     tag_keys=("model",))
        self.kv_usage = metrics.Gauge("eeserve_kv_block_usage", description="Fraction of KV blocks in use.",
                                      tag_keys=("model",))
        for m in (self.exit_layer, self.generated_tokens, self.finished_requests, self.ttft, self.tpot,
                  self.running, self.waiting, self.kv_usage):
            m.set_default_tags(dict(tags))

    def tokens(self, exit_layers: list[int]) -> None:
        if exit_layers:
            self.generated_tokens.inc(len(exit_layers))
            for layer in exit_layers:
                self.exit_layer.observe(layer)

    def finished(self, out) -> None:
        self.finished_requests.inc(tags={"finish_reason": str(out.finish_reason)})
        if out.first_token_time is not None:
            self.ttft.observe(max(0.0, out.first_token_time - out.arrival_time))
            n = len(out.token_ids)
            if n > 1 and out.finished_time is not None:
                self.tpot.observe(max(0.0, (out.finished_time - out.first_token_time) / (n - 1)))

    def gauges(self, stats: dict) -> None:
        self.running.set(stats.get("num_running", 0))
        self.waiting.set(stats.get("num_waiting", 0))
        self.kv_usage.set(stats.get("kv_usage", 0.0))


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
        self.default_threshold = self.args.exit_threshold  # None: the engine's (model's) threshold
        bm = self.engine.engine.scheduler.block_manager
        self.kv_capacity_tokens = bm.num_blocks * bm.block_size
        self._active: dict[str, _Active] = {}
        self.num_routing_stats_reports = 0
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests)
            self.replica_id = "local"
        self.metrics = _Metrics(self.args.model_name, self.num_layers)
        logger.info("LLMServer %s ready: %d layers, tp=%d, device=%s, exit=%s, %d KV blocks",
                    self.replica_id, mc.num_layers, self.args.tensor_parallel_size, device,
                    self.engine.engine.exit_config, bm.num_blocks)

    # --------------------------------------------------------------------------------- requests
    async def generate(self, req: GenerateRequest) -> AsyncIterator[dict]:
        """Stream deltas: ``{"text", "token_ids", "exit_layers", "finished", "finish_reason", ...}``.

        Invalid requests yield one ``{"error": message}`` instead. Cancelling the call (client
        disconnect) closes the engine stream, which aborts the request and frees its KV blocks.
        """
        thr = req.exit_threshold if req.exit_threshold is not None else self.default_threshold
        sp = req.sampling_params
        room = self.kv_capacity_tokens + 1 - len(req.prompt_token_ids)  # the last token needs no KV
        if req.max_tokens_is_default and 1 <= room < sp.max_tokens:
            sp = sp.model_copy(update={"max_tokens": room})
        self._active[req.request_id] = act = _Active(len(req.prompt_token_ids))
        stream = self.engine.generate(req.prompt_token_ids, sp, req.request_id, thr)
        try:
            async with contextlib.aclosing(stream):
                emitted = 0
                async for out in stream:
                    new_layers = out.exit_layers[emitted:]
                    emitted = len(out.exit_layers)
                    act.num_output_tokens = emitted
                    self.metrics.tokens(new_layers)
                    delta = {"text": out.new_text, "token_ids": out.new_token_ids, "exit_layers": new_layers,
                             "finished": out.finished, "finish_reason": out.finish_reason,
                             "replica": self.replica_id}
                    if out.finished:
                        self.metrics.finished(out)
                        delta.update(num_prompt_tokens=len(out.prompt_token_ids),
                                     num_cached_tokens=out.num_cached_tokens,
                                     num_output_tokens=len(out.token_ids), num_layers=out.num_layers)
                    yield delta
        except ValueError as e:
            yield {"error": str(e), "replica": self.replica_id}
        finally:
            self._active.pop(req.request_id, None)

    async def model_info(self) -> dict:
        mc = self.engine.model_config
        ec = self.engine.engine.exit_config
        return {"num_layers": mc.num_layers, "max_model_len": mc.max_model_len, "vocab_size": mc.vocab_size,
                "exit_layers": list(ec.exit_layers) if ec else [], "exit_threshold":
                    (self.default_threshold if self.default_threshold is not None else (ec.threshold if ec else None)),
                "replica": self.replica_id}

    # ------------------------------------------------------------------------------ introspection
    def _routing_stats(self) -> dict:
        s = self.engine.stats()
        running = [a for a in self._active.values() if a.num_output_tokens > 0]
        waiting = [a for a in self._active.values() if a.num_output_tokens == 0]
        return {"running_tokens": sum(a.num_prompt_tokens + a.num_output_tokens for a in running),
                "waiting_tokens": sum(a.num_prompt_tokens for a in waiting),
                "num_running": s.get("num_running", 0), "num_waiting": s.get("num_waiting", 0),
                "kv_usage": round(float(s.get("kv_usage", 0.0)), 3), "kv_capacity_tokens": self.kv_capacity_tokens,
                "ts": time.time()}

    async def stats(self) -> dict:
        """Engine statistics plus this replica's id and in-flight request count."""
        return {**self.engine.stats(), "replica": self.replica_id, "num_active": len(self._active),
                "num_blocks": self.engine.engine.num_blocks,
                "num_routing_stats_reports": self.num_routing_stats_reports}

    async def check_integrity(self) -> dict:
        """Run the block manager's integrity check on the engine thread; returns :meth:`stats`."""
        await self.engine.check_integrity()
        return await self.stats()

    async def rank_actors(self) -> list:
        """Handles of the tensor-parallel rank actors (empty when the rank runs in-process)."""
        return list(self.engine.engine.workers.actors)

    def record_routing_stats(self) -> dict:
        """Serve hook (polled by the controller): outstanding work for the request router."""
        stats = self._routing_stats()
        self.metrics.gauges(stats)
        self.num_routing_stats_reports += 1
        return stats

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
