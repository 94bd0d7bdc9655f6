"""Two LLMServer replicas behind deployments.router.PrefixAwareLoadRouter (Ray Serve request router):
concurrent requests spread over both; a conversation's next turn returns to the replica holding its
prefix. The replica that served a request is in the ``x-eeserve-replica`` response header."""
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

APP = "router"
WORDS = ("apple river stone cloud maple tiger violet copper lantern meadow harbor falcon velvet "
         "canyon ember glacier orchid pepper quartz saffron thistle walnut zephyr basil").split()


@pytest.fixture(scope="module")
def server(ray_session, tiny_model_dir):
    from ray import serve

    from deployments.testing import deploy

    url = deploy({"model": tiny_model_dir, "served_model_name": "tiny", "num_replicas": 2,
                  "routing_stats_period_s": 0.5, "replica_num_cpus": 0.05, "ingress_num_cpus": 0.05}, APP)
    yield url
    serve.delete(APP)


def complete(url: str, prompt: str, max_tokens: int = 8) -> tuple[str, str]:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.headers["x-eeserve-replica"], r.json()["choices"][0]["text"]


def conversation(i: int) -> str:
    """A prompt of distinct words (several KV blocks) that shares no prefix with the others."""
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] + str(i) for j in range(20))


def test_concurrent_requests_spread_over_both_replicas(server):
    with ThreadPoolExecutor(8) as pool:
        replicas = list(pool.map(lambda i: complete(server, conversation(100 + i), 24)[0], range(8)))
    assert len(set(replicas)) == 2, replicas
    assert min(replicas.count(r) for r in set(replicas)) >= 2, replicas


def test_conversation_returns_to_its_replica(server):
    # first turns sent together: the router spreads them over both replicas
    with ThreadPoolExecutor(6) as pool:
        first = list(pool.map(lambda i: complete(server, conversation(i)), range(6)))
    assert len({r for r, _ in first}) == 2, first
    # next turns, one at a time as soon as the previous answer arrived: history + reply + a new message
    for i, (replica, reply) in enumerate(first):
        turn2 = conversation(i) + reply + " Tell me more about that."
        assert complete(server, turn2)[0] == replica, f"conversation {i} left its replica"


def test_chat_turns_return_to_their_replica(server):
    msgs = [{"role": "user", "content": conversation(50)}]
    r = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": msgs, "max_tokens": 8, "temperature": 0})
    replica, reply = r.headers["x-eeserve-replica"], r.json()["choices"][0]["message"]["content"]
    for turn in range(3):
        msgs = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": f"And then? ({turn})"}]
        r = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": msgs, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-eeserve-replica"] == replica
        reply = r.json()["choices"][0]["message"]["content"]


def test_replicas_report_routing_stats(server):
    from deployments.testing import llm_handle

    stats = llm_handle(APP).stats.remote().result()
    assert stats["num_routing_stats_reports"] > 0  # polled by the controller for the router
    routed = llm_handle(APP).record_routing_stats.remote().result()  # what the router reads
    assert routed["num_layers"] == stats["num_layers"] == 6
    assert 1 <= routed["mean_exit_layer"] <= routed["num_layers"]  # exit-aware cost (deployments.router)
