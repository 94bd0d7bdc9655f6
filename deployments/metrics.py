"""Prometheus metrics of the serving port (``GET /metrics``), kept by the ingress.

The ingress sees every request and every delta, so it counts them itself (its own
``CollectorRegistry``; names below, counters get Prometheus' ``_total`` suffix). One generation
request is one choice (``n`` choices of ``p`` prompts count ``n * p``). A choice that ends without
a finished delta (the client disconnected, a sibling choice failed) counts as ``finish_reason="abort"``.
Times are measured in the ingress, so they include routing and the hop to the replica: what a client
sees. The engine gauges (running / waiting requests, KV usage) are fetched from every LLMServer
replica at scrape time (``DeploymentHandle.broadcast("stats")``) and labelled with the replica id.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineGauges:
    """Custom collector: the replicas' latest engine statistics (set by :meth:`IngressMetrics.set_replica_stats`)."""

    def __init__(self, model: str):
        self.model = model
        self.stats: list[dict] = []

    def collect(self):
        specs = (("eeserve_running_requests", "Requests running in the engine.", "num_running"),
                 ("eeserve_waiting_requests", "Requests waiting in the engine's queue.", "num_waiting"),
                 ("eeserve_kv_block_usage", "Fraction of KV-cache blocks in use.", "kv_usage"))
        for name, doc, key in specs:
            g = GaugeMetricFamily(name, doc, labels=["model", "replica"])
            for s in self.stats:
                g.add_metric([self.model, str(s.get("replica", ""))], float(s.get(key, 0) or 0))
            yield g
        g = GaugeMetricFamily("eeserve_replicas", "LLMServer replicas that answered the last scrape.", labels=["model"])
        g.add_metric([self.model], float(len(self.stats)))
        yield g


class IngressMetrics:
    """The ``eeserve_`` metrics of one ingress replica."""

    def __init__(self, model: str, num_layers: int):
        self.model = model
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model"]
        self.http_requests = Counter("eeserve_http_requests", "HTTP requests by route and status code.",
                                     m + ["route", "status"], registry=r)
        self.requests_in_flight = Gauge("eeserve_requests_in_flight", "Generation requests (choices) in flight.",
                                        m, registry=r)
        self.finished_requests = Counter("eeserve_finished_requests",
                                         "Finished generation requests (choices) by finish reason "
                                         "(stop, length, abort, error).", m + ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("eeserve_prompt_tokens", "Prompt tokens of started requests.", m, registry=r)
        self.generated_tokens = Counter("eeserve_generated_tokens", "Generated tokens.", m, registry=r)
        self.spec_draft_tokens = Counter("eeserve_spec_draft_tokens", "Lossless early exit (verified, "
                                         "self_speculative): draft tokens proposed.", m, registry=r)
        self.spec_accepted_tokens = Counter("eeserve_spec_accepted_tokens", "Lossless early exit: draft tokens "
                                            "the full model confirmed.", m, registry=r)
        self.spec_verify_steps = Counter("eeserve_spec_verify_steps", "Lossless early exit: verification "
                                         "iterations (each verifies drafts and adds the full model's token).", m,
                                         registry=r)
        for c in (self.spec_draft_tokens, self.spec_accepted_tokens, self.spec_verify_steps):
            c.labels(model)  # exported at 0 before the first lossless request
        self.exit_layer = Histogram("eeserve_exit_layer", "Decoder layers run per generated token "
                                    f"({num_layers} = full model).", m, registry=r,
                                    buckets=[l + 0.5 for l in range(1, num_layers)] + [math.inf])
        self.ttft = Histogram("eeserve_time_to_first_token_s", "Time to first token (s).", m, registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("eeserve_time_per_output_token_s", "Mean time per output token after the first (s).",
                              m, registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("eeserve_e2e_request_latency_s", "Time from arrival to the last token (s).", m,
                             registry=r, buckets=LATENCY_BUCKETS)
        self.engine = _EngineGauges(model)
        r.register(self.engine)

    # ---------------------------------------------------------------------------------- requests
    def http(self, route: str, status: int) -> None:
        self.http_requests.labels(self.model, route, str(status)).inc()

    def started(self, num_prompt_tokens: int) -> None:
        self.requests_in_flight.labels(self.model).inc()
        self.prompt_tokens.labels(self.model).inc(num_prompt_tokens)

    def tokens(self, exit_layers: Iterable[int]) -> None:
        layers = list(exit_layers)
        if layers:
            self.generated_tokens.labels(self.model).inc(len(layers))
            h = self.exit_layer.labels(self.model)
            for layer in layers:
                h.observe(layer)

    def speculation(self, num_draft_tokens: int, num_accepted_tokens: int, num_verify_steps: int) -> None:
        """Increments of one choice's lossless-mode totals (from one delta)."""
        for counter, n in ((self.spec_draft_tokens, num_draft_tokens),
                           (self.spec_accepted_tokens, num_accepted_tokens),
                           (self.spec_verify_steps, num_verify_steps)):
            if n > 0:
                counter.labels(self.model).inc(n)

    def ended(self, finish_reason: str, arrival: float, first_token: Optional[float], num_tokens: int) -> None:
        """One choice ended (``arrival``/``first_token``: ``time.monotonic()`` in the ingress)."""
        end = time.monotonic()
        self.requests_in_flight.labels(self.model).dec()
        self.finished_requests.labels(self.model, finish_reason).inc()
        self.e2e.labels(self.model).observe(max(0.0, end - arrival))
        if first_token is not None:
            self.ttft.labels(self.model).observe(max(0.0, first_token - arrival))
            if num_tokens > 1:
                self.tpot.labels(self.model).observe(max(0.0, (end - first_token) / (num_tokens - 1)))

    # ------------------------------------------------------------------------------------ scrape
    def set_replica_stats(self, stats: list[dict]) -> None:
        self.engine.stats = [s for s in stats if isinstance(s, dict)]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
