"""Ray Serve application of eeserve: ``serve run deployments:app`` (defaults) or
``serve run deployments:build_app model=... tensor_parallel_size=2 num_replicas=2``.

The application is ``OpenAIIngress`` (HTTP, FastAPI) -> ``LLMServer`` replicas (one async engine each,
tensor-parallel ranks in the replica's placement group), with requests to LLMServer routed by
``deployments.router.PrefixAwareLoadRouter``. Arguments: :class:`deployments.config.ServeArgs`.
"""
from __future__ import annotations

from typing import Optional

from deployments.config import ServeArgs


def build_app(args: Optional[dict] = None):
    """Build the Serve application from ``args`` (see :class:`ServeArgs`; unknown keys raise).

    Deployment options given here (replicas, queue limits) are defaults: a Serve config file's
    ``deployments:`` entries override them (e.g. ``autoscaling_config`` in configs/serve.yaml).
    """
    from ray.serve.config import RequestRouterConfig

    from deployments.ingress import OpenAIIngress
    from deployments.llm_server import LLMServer
    from deployments.router import PrefixAwareLoadRouter

    cfg = ServeArgs.model_validate(dict(args or {}))
    device = cfg.resolved_device()
    opts: dict = dict(
        ray_actor_options={"num_cpus": cfg.replica_num_cpus, "resources": dict(cfg.replica_resources)},
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAwareLoadRouter,  # Serve stores it as its dotted path
            request_router_kwargs={"block_size": cfg.router_block_size,
                                   "imbalance_tokens": cfg.router_imbalance_tokens},
            request_routing_stats_period_s=cfg.routing_stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 10 * cfg.routing_stats_period_s)))
    bundles = cfg.placement_group_bundles(device)
    if bundles:
        opts.update(placement_group_bundles=bundles, placement_group_strategy=cfg.placement_strategy)
    if cfg.autoscaling_config is not None:
        opts["autoscaling_config"] = dict(cfg.autoscaling_config)
    elif cfg.num_replicas is not None:
        opts["num_replicas"] = cfg.num_replicas
    if cfg.graceful_shutdown_timeout_s is not None:
        opts["graceful_shutdown_timeout_s"] = cfg.graceful_shutdown_timeout_s
    if cfg.max_ongoing_requests is not None:
        opts["max_ongoing_requests"] = cfg.max_ongoing_requests
    if cfg.max_queued_requests is not None:
        opts["max_queued_requests"] = cfg.max_queued_requests
    args_dict = cfg.model_dump()
    llm = LLMServer.options(**opts).bind(args_dict, device)
    return OpenAIIngress.options(num_replicas=cfg.ingress_num_replicas,
                                 ray_actor_options={"num_cpus": cfg.ingress_num_cpus}).bind(llm, args_dict)


app = build_app({})

__all__ = ["app", "build_app", "ServeArgs"]
