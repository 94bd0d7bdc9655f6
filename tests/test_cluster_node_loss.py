"""Losing the node that hosts the only LLMServer replica, mid-stream, on a simulated 3-node cluster.

Head (Serve controller, proxy, ingress) plus two worker nodes with one ``llm_slot`` each; one
replica. While streaming and non-streaming requests run on it, its node is removed
(``cluster.remove_node``, processes killed, as when a machine is lost). Every in-flight stream must
end with an SSE error event followed by ``data: [DONE]``, every in-flight non-streaming request with
a 503 OpenAI error object (with ``Retry-After``); ``/health`` answers 503 within a second while no
replica is ready; Serve starts the replacement on the surviving worker node; requests succeed
again. The time from the node's loss to the first successful request is measured.

Run alone: ``python tests/test_cluster_node_loss.py out.json <model dir>``.
"""
import os
import sys
import threading
import time

import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

APP = "loss"
MAX_TOKENS = 460  # the tiny model's context is 512 tokens: long, yet a valid request
SLOT = "llm_slot"


def scenario(model_dir: str, workdir: str) -> dict:
    import httpx

    from bench.loadgen import chat, summarize
    from cluster_common import SMALL, Scenario, compact_timeline
    from deployments.sim_cluster import SimCluster
    from deployments.testing import llm_handle

    sim = SimCluster(head_cpus=1)
    nodes = [sim.add_node(num_cpus=1, resources={SLOT: 1}) for _ in range(2)]
    sc = Scenario(sim)
    try:
        sc.sample(APP, 0.5)
        url = sc.deploy({**SMALL, "model": model_dir, "served_model_name": "tiny", "replica_resources": {SLOT: 1},
                         "num_replicas": 1}, APP)
        before = llm_handle(APP).placement.remote().result(timeout_s=30)
        victim = sim.node_of(before["replica_node"])
        assert victim is not None, "the replica is not on a worker node"
        # long requests in flight: 3 streams + 2 non-streaming
        results, threads = [], []

        def one(stream: bool):
            with httpx.Client() as c:
                results.append(chat(c, url, "tiny", stream=stream, max_tokens=MAX_TOKENS, timeout_s=120))

        for stream in (True, True, True, False, False):
            threads.append(threading.Thread(target=one, args=(stream,)))
            threads[-1].start()
        in_flight, deadline = 0, time.monotonic() + 30
        while in_flight < 5 and time.monotonic() < deadline:  # all five running on the replica
            in_flight = llm_handle(APP).stats.remote().result(timeout_s=30)["num_active"]
        time.sleep(0.5)
        sc.event("remove_node", node=before["replica_node"][:8], in_flight=in_flight)
        t_loss = time.monotonic()
        sim.remove_node(victim, allow_graceful=False)
        health = []
        recovered_at = None
        with httpx.Client() as c:
            while time.monotonic() - t_loss < 150:
                t = time.monotonic()
                try:
                    h = c.get(f"{url}/health", timeout=10)
                    health.append({"t": round(t - t_loss, 2), "status": h.status_code,
                                   "seconds": round(time.monotonic() - t, 3),
                                   "retry_after": h.headers.get("retry-after")})
                except httpx.HTTPError as e:
                    health.append({"t": round(t - t_loss, 2), "status": repr(e),
                                   "seconds": round(time.monotonic() - t, 3)})
                # the node's processes die a moment after remove_node: recovery counts once the
                # requests in flight on the lost replica have ended
                if health[-1]["status"] == 200 and not any(t.is_alive() for t in threads):
                    r = chat(c, url, "tiny", stream=False, max_tokens=8, timeout_s=60)
                    if r.outcome == "ok":
                        recovered_at = time.monotonic() - t_loss
                        break
                time.sleep(0.25)
        sc.event("recovered", seconds=recovered_at)
        for t in threads:
            t.join(130)
        after = llm_handle(APP).placement.remote().result(timeout_s=30)
        with httpx.Client() as c:
            new = [chat(c, url, "tiny", stream=s, max_tokens=16, timeout_s=60) for s in (True, False, True, False)]
        sc.event("new_requests", outcomes=[r.outcome for r in new])
        survivor = next(n.node_id for n in nodes if n is not victim)
        return {"timeline": compact_timeline(sc.timeline), "events": sc.events,
                "in_flight": [r.as_dict() for r in results], "in_flight_summary": summarize(results),
                "health": health, "recovery_s": round(recovered_at, 2) if recovered_at else None,
                "new": summarize(new), "moved_to_survivor": after["replica_node"] == survivor,
                "victim": before["replica_node"], "replacement": after["replica_node"]}
    finally:
        sc.close()


def test_node_loss_mid_stream(tmp_path, tiny_model_dir):
    from cluster_common import run_scenario

    res = run_scenario(__file__, tmp_path, tiny_model_dir, 290)
    fl = res["in_flight"]
    streams = [r for r in fl if r["kind"] == "stream"]
    plain = [r for r in fl if r["kind"] == "plain"]
    # streams: an SSE error event then [DONE] (loadgen's "error" for a 200 stream); nothing cut or hung
    assert len(streams) == 3 and all(r["outcome"] == "error" and r["status"] == 200 for r in streams), fl
    assert all(r["code"] == "engine_unavailable" for r in fl), fl
    assert len(plain) == 2 and all(r["outcome"] == "error" and r["status"] == 503 for r in plain), fl
    assert all(r["retry_after"] for r in plain), fl
    down = [h for h in res["health"] if h["status"] != 200]
    assert down and all(h["status"] == 503 and h["seconds"] < 1.0 for h in down), res["health"]
    assert res["recovery_s"] is not None and res["moved_to_survivor"], res
    assert res["new"]["ok"] == res["new"]["total"] == 4, res["new"]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cluster_common import scenario_main

    scenario_main(scenario)
