"""Autoscaling on a simulated multi-node cluster (Ray's fake multi-node autoscaler, tiny model).

The head node has room for one LLMServer replica (custom resource ``llm_slot: 1``); every further
replica needs a worker node of type ``llm_node`` (1 CPU, ``llm_slot: 1``), which Ray's autoscaler
starts when the replica's resource request is pending. Serve autoscales LLMServer between 1 and 3
replicas on ongoing requests. Sustained load (8 concurrent clients) makes Serve add replicas and the
autoscaler add nodes; when the load drops to one client, replicas and then nodes go away. Every
request of both phases must succeed: streams on a replica being removed finish (Serve's graceful
shutdown) instead of being cut.

Run alone: ``python tests/test_cluster_autoscale.py out.json <model dir>``.
"""
import os
import sys
import time

import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

APP = "auto"
SLOT = "llm_slot"


def scenario(model_dir: str, workdir: str) -> dict:
    from bench.loadgen import LoadGenerator, summarize
    from cluster_common import SMALL, Scenario, compact_timeline
    from deployments.sim_cluster import SimCluster
    from deployments.testing import llm_handle

    sim = SimCluster(head_cpus=2, head_resources={SLOT: 1}, idle_timeout_s=8,
                     autoscale_node_types={"llm_node": {"resources": {"CPU": 1, SLOT: 1}, "max_workers": 2}})
    sc = Scenario(sim)
    try:
        sc.sample(APP, 1.0)
        url = sc.deploy({**SMALL, "model": model_dir, "served_model_name": "tiny", "replica_resources": {SLOT: 1},
                         "max_ongoing_requests": 8, "graceful_shutdown_timeout_s": 60,
                         "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                                                "upscale_delay_s": 2, "downscale_delay_s": 6,
                                                "metrics_interval_s": 0.5, "look_back_period_s": 2}}, APP)
        gen = LoadGenerator(url, "tiny", concurrency=8, max_tokens=48, stream_share=0.5, timeout_s=90).start()
        sc.event("load", clients=8)
        deadline = time.monotonic() + 150
        while sc.replicas(APP).get("RUNNING", 0) < 3 and time.monotonic() < deadline:
            time.sleep(1)
        sc.event("scaled_up", replicas=sc.replicas(APP), nodes=len(sim.alive_nodes()))
        time.sleep(5)  # all three serve for a while
        gen.set_concurrency(1)
        t_low = time.monotonic()
        sc.event("load", clients=1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sc.replicas(APP) == {"RUNNING": 1} and len(sim.alive_nodes()) == 1:
                break
            time.sleep(1)
        sc.event("scaled_down", replicas=sc.replicas(APP), nodes=len(sim.alive_nodes()))
        results = gen.stop()
        sc.timeline.append({"t": sc.now(), "replicas": sc.replicas(APP), "nodes": len(sim.alive_nodes())})
        survivor = llm_handle(APP).stats.remote().result(timeout_s=30)["replica"]
        sc.event("stopped", survivor=survivor)
        t0 = sc.t0
        # requests in flight while replicas were stopping (from the load drop to the end)
        during_down = [r for r in results if r.end > t_low]
        per_replica: dict[str, list] = {}
        for r in results:
            for rep in filter(None, r.replica.split(",")):
                per_replica.setdefault(rep, []).append(r)
        stopping = [s["t"] for s in sc.timeline if s["replicas"].get("STOPPING")]
        on_removed = []
        if stopping:  # requests of the replicas being removed that were in flight while they stopped
            lo, hi = min(stopping) - 1.0, max(stopping) + 1.0
            on_removed = [r for r in results if r.replica and r.replica != survivor
                          and r.start - t0 < hi and r.end - t0 > lo]
        return {"timeline": compact_timeline(sc.timeline), "in_flight_on_stopping_replicas": summarize(on_removed), "events": sc.events, "summary": summarize(results),
                "during_scale_down": summarize(during_down),
                "replicas_served": {k: len(v) for k, v in per_replica.items()},
                "max_running": max((s["replicas"].get("RUNNING", 0) for s in sc.timeline), default=0),
                "max_nodes": max((s["nodes"] for s in sc.timeline), default=0),
                "final": sc.timeline[-1] if sc.timeline else None,
                "bad": [r.as_dict() for r in results if r.outcome != "ok"][:20],
                "t_load_drop": round(t_low - t0, 2)}
    finally:
        sc.close()


def test_autoscale_up_and_down_without_failed_requests(tmp_path, tiny_model_dir):
    from cluster_common import run_scenario

    res = run_scenario(__file__, tmp_path, tiny_model_dir, 290)
    s = res["summary"]
    assert s["total"] > 20 and s["ok"] == s["total"], (s, res["bad"])
    assert res["max_running"] == 3 and res["max_nodes"] == 3, res["timeline"]  # 2 fake nodes started
    assert len(res["replicas_served"]) == 3, res["replicas_served"]  # all three replicas answered
    final = res["final"]
    assert final["replicas"] == {"RUNNING": 1} and final["nodes"] == 1, res["timeline"]
    assert res["during_scale_down"]["ok"] == res["during_scale_down"]["total"] > 0
    removed = res["in_flight_on_stopping_replicas"]
    assert removed["ok"] == removed["total"], removed  # graceful shutdown: they finished


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cluster_common import scenario_main

    scenario_main(scenario)
