"""Placement of a tensor_parallel_size 2 replica on a simulated 3-node cluster (tiny model, gloo).

Head (Serve) plus two worker nodes of 1 CPU each. With ``STRICT_PACK`` the replica's bundles (the
replica + one per rank) land on one node; with ``SPREAD`` its two ranks land on different nodes and
join one gloo group across them. Both answer the same greedy tokens as the in-process engine at
tensor_parallel_size 1.

Run alone: ``python tests/test_cluster_placement.py out.json <model dir>``.
"""
import os
import sys

import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

PROMPTS = ["Write one sentence about the sea.", "List three colors."]
MAX_TOKENS = 12


def reference(model_dir: str) -> list[str]:
    """Greedy texts of the in-process engine (tensor_parallel_size 1), chat template applied."""
    from cluster import LLM, SamplingParams

    llm = LLM(model_dir)
    try:
        sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        outs = llm.generate([llm.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS], sp)
        return [o.text for o in outs]
    finally:
        llm.shutdown()


def scenario(model_dir: str, workdir: str) -> dict:
    import httpx
    from ray import serve

    from cluster_common import SMALL, Scenario, compact_timeline
    from deployments.sim_cluster import SimCluster
    from deployments.testing import llm_handle

    want = reference(model_dir)
    sim = SimCluster(head_cpus=1)
    for _ in range(2):
        sim.add_node(num_cpus=1)
    sc = Scenario(sim)
    out = {"reference": want, "variants": {}}
    try:
        for strategy in ("STRICT_PACK", "SPREAD"):
            app = strategy.lower().replace("_", "")
            if strategy == "STRICT_PACK":
                sc.sample(app, 1.0)
            sc.app = app
            url = sc.deploy({**SMALL, "model": model_dir, "served_model_name": "tiny", "tensor_parallel_size": 2,
                             "placement_strategy": strategy, "num_replicas": 1}, app)
            where = llm_handle(app).placement.remote().result(timeout_s=30)
            texts = []
            for p in PROMPTS:
                r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                    "model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": MAX_TOKENS,
                    "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["message"]["content"])
            out["variants"][strategy] = {"placement": where, "texts": texts,
                                         "nodes_used": len(set(where["rank_nodes"] + [where["replica_node"]]))}
            sc.event("answered", strategy=strategy, rank_nodes=[n[:8] for n in where["rank_nodes"]],
                     replica_node=where["replica_node"][:8])
            serve.delete(app)
        out["timeline"] = compact_timeline(sc.timeline)
        out["events"] = sc.events
        return out
    finally:
        sc.close()


def test_strict_pack_one_node_and_spread_across_nodes(tmp_path, tiny_model_dir):
    from cluster_common import run_scenario

    res = run_scenario(__file__, tmp_path, tiny_model_dir, 290)
    pack, spread = res["variants"]["STRICT_PACK"], res["variants"]["SPREAD"]
    assert len(set(pack["placement"]["rank_nodes"])) == 1 and pack["nodes_used"] == 1, pack
    assert len(set(spread["placement"]["rank_nodes"])) == 2, spread  # gloo across two raylets
    assert pack["texts"] == spread["texts"] == res["reference"], res


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cluster_common import scenario_main

    scenario_main(scenario)
