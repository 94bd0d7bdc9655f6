"""Tensor parallelism inside a Serve replica (CPU, gloo): ranks are Ray actors in the replica's
placement group; greedy text equals tensor_parallel_size 1; a dead rank fails the health check and
Serve replaces the replica."""
import time

import httpx
import pytest

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

MESSAGES = [[{"role": "user", "content": "Write one sentence about the sea."}],
            [{"role": "user", "content": "List three colors."}]]
SMALL = {"replica_num_cpus": 0.05, "num_cpus_per_rank": 0.05, "ingress_num_cpus": 0.05}


def reference(model_dir, max_tokens: int, quantization: str = "auto") -> dict[bool, list[str]]:
    """Greedy replies of the in-process engine at tensor_parallel_size 1, early exit off and on."""
    from cluster import LLM, SamplingParams

    llm = LLM(model_dir, quantization=quantization)
    try:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        out = {}
        for early_exit in (False, True):
            outs = llm.generate([llm.apply_chat_template(m) for m in MESSAGES], sp,
                                exit_threshold=None if early_exit else float("inf"))
            out[early_exit] = [o.text for o in outs]
        return out
    finally:
        llm.shutdown()


def served(url: str, max_tokens: int, early_exit: bool, model: str) -> tuple[list[str], list[dict]]:
    texts, stats = [], []
    for m in MESSAGES:
        body = {"model": model, "messages": m, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if not early_exit:
            body["early_exit"] = False
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["message"]["content"])
        stats.append(r.json()["early_exit"])
    return texts, stats


def test_tp2_tiny_equals_tp1_and_dead_rank_is_replaced(ray_session, tiny_model_dir):
    from ray import serve

    from deployments.testing import deploy, llm_handle, wait_healthy

    url = deploy({"model": tiny_model_dir, "served_model_name": "tiny", "tensor_parallel_size": 2,
                  "health_check_period_s": 1.0, "health_check_timeout_s": 20.0, **SMALL}, "tp2")
    try:
        handle = llm_handle("tp2")
        actors = handle.rank_actors.remote().result()
        assert len(actors) == 2
        want = reference(tiny_model_dir, 12)
        for early_exit in (False, True):
            got, stats = served(url, 12, early_exit, "tiny")
            assert got == want[early_exit], f"early_exit={early_exit}"
            if not early_exit:
                assert all(s["exit_layer_counts"] == {"6": 12} for s in stats)
        # kill rank 1: the engine or the health check notices, Serve starts a new replica
        old = handle.stats.remote().result()["replica"]
        ray_session.kill(actors[1])
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, "the replica with a dead rank was not replaced"
            try:
                st = handle.stats.remote().result(timeout_s=10)
                if st["replica"] != old:
                    break
            except Exception:
                pass
            time.sleep(1.0)
        wait_healthy(url, 300)
        got, _ = served(url, 12, False, "tiny")
        assert got == want[False]
    finally:
        serve.delete("tp2")


def test_tp3_default_model_equals_tp1(ray_session, default_model_dir):
    from ray import serve

    from deployments.testing import deploy, llm_handle

    # float weights: the int4 / int8 kernels round each rank's partial sums to bfloat16 before the
    # all-reduce, so quantized TP 3 is close to TP 1 but not bit-equal (tests/test_quant.py bounds it)
    url = deploy({"tensor_parallel_size": 3, "quantization": "none", **SMALL}, "tp3")
    try:
        assert len(llm_handle("tp3").rank_actors.remote().result()) == 3
        want = reference(default_model_dir, 8, quantization="none")
        for early_exit in (False, True):
            got, _ = served(url, 8, early_exit, "SmolLM2-135M-Instruct")
            assert got == want[early_exit], f"early_exit={early_exit}"
    finally:
        serve.delete("tp3")
