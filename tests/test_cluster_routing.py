"""Exit-aware routing (deployments.router.PrefixLoadPolicy): the load of a replica counts the decoder
layers its tokens actually run, so a replica whose requests exit early is seen as less loaded."""
import random

import pytest

from deployments.router import PrefixLoadPolicy

pytestmark = pytest.mark.timeout(60)


def policy(**kw) -> PrefixLoadPolicy:
    return PrefixLoadPolicy(rng=random.Random(0), **kw)


def test_running_tokens_count_at_their_exit_depth():
    p = policy()
    deep = {"running_tokens": 600, "waiting_tokens": 100, "mean_exit_layer": 30, "num_layers": 30}
    shallow = {"running_tokens": 600, "waiting_tokens": 100, "mean_exit_layer": 10, "num_layers": 30}
    assert p.load("a", deep) == pytest.approx(700)
    assert p.load("b", shallow) == pytest.approx(600 / 3 + 100)  # prefill (waiting) stays full depth
    assert p.load("c", {"running_tokens": 600, "waiting_tokens": 100}) == pytest.approx(700)  # not reported
    assert p.depth({"mean_exit_layer": 0, "num_layers": 30}) == p.min_depth
    assert p.depth({"mean_exit_layer": 45, "num_layers": 30}) == 1.0


def test_early_exit_replica_gets_the_request():
    p = policy()
    stats = {"deep": {"running_tokens": 400, "mean_exit_layer": 30, "num_layers": 30},
             "early": {"running_tokens": 500, "mean_exit_layer": 12, "num_layers": 30}}
    # by tokens alone "deep" is less loaded; by layers run "early" is (500 * 0.4 = 200 < 400)
    assert all(p.choose(stats)[0][0] == "early" for _ in range(10))
    stats["early"]["mean_exit_layer"] = 30
    assert all(p.choose(stats)[0][0] == "deep" for _ in range(10))


def test_local_accounting_counts_expected_output_at_depth():
    p = policy(expected_output_tokens=100)
    stats = {"early": {"mean_exit_layer": 3, "num_layers": 30, "ts": 0.0}}
    p.choose(stats, list(range(50)), "r1", max_tokens=100)  # routed after the snapshot
    # 50 prompt tokens at full depth + 100 expected output tokens at depth 0.1
    assert p.load("early", stats["early"]) == pytest.approx(50 + 10)
