"""PrefixLoadPolicy (deployments.router) on fake replicas: power of two choices, prefix affinity, accounting."""
import random

import pytest

from deployments.router import PrefixLoadPolicy, _request_fields

pytestmark = pytest.mark.timeout(60)


def policy(**kw) -> PrefixLoadPolicy:
    return PrefixLoadPolicy(rng=random.Random(0), **kw)


def first(ranks):
    return ranks[0][0]


def test_power_of_two_prefers_less_loaded():
    p = policy()
    stats = {"a": {"running_tokens": 500}, "b": {"running_tokens": 10}}
    for _ in range(20):
        assert first(p.choose(stats)) == "b"


def test_power_of_two_samples_two_of_many():
    p = policy()
    stats = {f"r{i}": {"waiting_tokens": i} for i in range(10)}
    ranks = p.choose(stats)
    assert len(ranks) == 2 and all(len(r) == 1 for r in ranks)
    a, b = first(ranks), ranks[1][0]
    assert stats[a]["waiting_tokens"] <= stats[b]["waiting_tokens"]


def test_kv_usage_counts_as_load():
    p = policy()
    stats = {"a": {"kv_usage": 0.5, "kv_capacity_tokens": 1000}, "b": {"kv_usage": 0.0, "kv_capacity_tokens": 1000}}
    assert p.load("a", stats["a"]) == pytest.approx(250)
    assert first(p.choose(stats)) == "b"


def test_local_accounting_spreads_a_burst_before_stats_arrive():
    p = policy()
    stats = {"a": {}, "b": {}}
    chosen = [first(p.choose(stats, list(range(100 * i, 100 * i + 40)), f"req{i}", 16)) for i in range(6)]
    assert chosen.count("a") == 3 and chosen.count("b") == 3
    for i in range(6):
        p.on_completed(f"req{i}")
    assert p.local_tokens("a") == p.local_tokens("b") == 0


def test_prefix_affinity_when_idle():
    p = policy()
    stats = {"a": {}, "b": {}}
    convs = [[1000 * c + t for t in range(48)] for c in range(8)]
    owner = {}
    for c, ids in enumerate(convs):
        owner[c] = first(p.choose(stats, ids, f"t1-{c}", 16))
        p.on_routed(f"t1-{c}", owner[c], ids)
        p.on_completed(f"t1-{c}")
    assert set(owner.values()) == {"a", "b"}  # distinct prompts spread by p2c
    for c, ids in enumerate(convs):  # second turn: history + reply + new message
        turn2 = ids + [7, 8, 9] * 10
        assert first(p.choose(stats, turn2, f"t2-{c}", 16)) == owner[c]
        p.on_completed(f"t2-{c}")
    assert p.num_affinity_routes == len(convs)


def test_affinity_yields_to_load():
    p = policy(imbalance_tokens=1024)
    ids = list(range(64))  # 4 blocks = 64 matched tokens
    p.on_routed("x", "a", ids)
    p.on_completed("x")
    assert first(p.choose({"a": {"running_tokens": 60}, "b": {}}, ids + [1, 2])) == "a"  # within 64 tokens
    assert first(p.choose({"a": {"running_tokens": 5000}, "b": {}}, ids + [1, 2])) == "b"
    # imbalance cap below the matched length
    q = policy(imbalance_tokens=10)
    q.on_routed("x", "a", ids)
    assert first(q.choose({"a": {"running_tokens": 60}, "b": {}}, ids)) == "b"
    # a nearly full KV cache gets no affinity traffic
    assert first(p.choose({"a": {"kv_usage": 0.99, "kv_capacity_tokens": 10}, "b": {}}, ids)) == "b"


def test_longest_prefix_wins_and_short_prompts_have_no_affinity():
    p = policy()
    shared = list(range(32))
    p.on_routed("1", "a", shared + list(range(100, 132)))
    p.on_routed("2", "b", shared + list(range(200, 232)))
    stats = {"a": {}, "b": {}}
    assert first(p.choose(stats, shared + list(range(100, 140)))) == "a"
    assert first(p.choose(stats, shared + list(range(200, 240)))) == "b"
    assert p.match(p.block_hashes(list(range(10))), stats) == (None, 0)  # under one block


def test_routed_replica_overrides_tentative_choice_and_dead_replicas_are_forgotten():
    p = policy()
    ids = list(range(40))
    assert first(p.choose({"a": {}, "b": {"running_tokens": 99}}, ids, "k", 8)) == "a"
    p.on_routed("k", "b", ids)  # the first rank rejected it; "b" accepted
    assert p.local_tokens("b") == 48 and p.local_tokens("a") == 0
    assert p.match(p.block_hashes(ids), {"a", "b"})[0] == "b"
    p.forget_replica("b")
    assert p.local_tokens("b") == 0 and p.match(p.block_hashes(ids), {"a", "b"}) == (None, 0)


def test_unconfirmed_entries_expire():
    now = [0.0]
    p = PrefixLoadPolicy(rng=random.Random(0), unconfirmed_ttl_s=5, clock=lambda: now[0])
    p.choose({"a": {}, "b": {}}, list(range(20)), "k", 4)
    assert p.local_tokens("a") + p.local_tokens("b") == 24
    now[0] = 10.0
    p.choose({"a": {}, "b": {}})
    assert p.local_tokens("a") + p.local_tokens("b") == 0


def test_single_and_no_replicas():
    p = policy()
    assert p.choose({}) == []
    assert p.choose({"a": {}}, list(range(40)), "k") == [["a"]]


def test_request_fields_reads_generate_request():
    from types import SimpleNamespace

    from cluster.sampling import SamplingParams
    from cluster.engine.protocol import EngineRequest

    req = EngineRequest(request_id="r", prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=7))
    pr = SimpleNamespace(args=[req], kwargs={})
    assert _request_fields(pr) == ([1, 2, 3], 7)
    assert _request_fields(SimpleNamespace(args=["text"], kwargs={})) == (None, None)
    assert _request_fields(None) == (None, None)


def test_stale_snapshot_is_corrected_by_local_knowledge():
    now = [100.0]
    p = PrefixLoadPolicy(rng=random.Random(0), clock=lambda: now[0])
    ids = list(range(64))
    p.choose({"a": {}, "b": {}}, ids, "k", 16)
    p.on_routed("k", "a", ids)  # routed at t=100: 64 + 16 tokens
    snap = {"running_tokens": 80, "kv_usage": 0.1, "kv_capacity_tokens": 800, "ts": 101.0}  # taken while running
    assert p.load("a", snap) == pytest.approx(80 + 0.5 * 80)
    now[0] = 102.0
    p.on_completed("k")  # finished after the snapshot: the snapshot's load is gone
    assert p.load("a", snap) == 0
    # the conversation's next turn, sent at once, returns to "a" although the snapshot shows it busy
    turn2 = ids + [5] * 20
    assert first(p.choose({"a": snap, "b": {"ts": 101.0}}, turn2, "k2", 16)) == "a"
    p.on_routed("k2", "a", turn2)  # routed after the snapshot: counted in full
    assert p.load("a", snap) == 84 + 16
    # in flight before a newer snapshot: the larger of its estimate and the report
    assert p.load("a", {"running_tokens": 30, "ts": 103.0}) == 100
    p.on_completed("k2")  # finished at t=102, before the snapshot: the report is trusted as is
    assert p.load("a", {"running_tokens": 30, "ts": 103.0}) == 30
