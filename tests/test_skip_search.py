"""``eeserve calibrate-skip`` (issue 17 part 2, SWIFT's offline skip-set search) on the tiny damped model.

``damped_model_dir`` (conftest): layers 3..6 of the 6-layer tiny Llama barely change the hidden state,
so a draft without some of layers 3, 4, 5 (the last layer is never skipped) mostly equals the full
model's token, and a draft without layer 2 (undamped, kept out of the search's range only for layer 1)
mostly does not. The search must find a planted set, rate it above an undamped one, and the exit
config it writes must give ``layer_skip`` requests that name no skip set of their own that set.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from cluster.config import ExitConfig
from tests.conftest import TOPICS, copy_dir

pytestmark = pytest.mark.timeout(300)

PLANTED = {3, 4, 5}


def _scorer(model_dir: str):
    """A :class:`SkipScorer` of the damped model over a few short texts (every position after the
    first four scored against the full model's argmax there)."""
    from cluster.config import ModelConfig
    from cluster.engine.factory import load_tokenizer
    from cluster.model.loader import build_model, load_hf_config
    from cluster.training.skip_search import SkipScorer

    tok = load_tokenizer(model_dir)
    mc = ModelConfig.from_hf_config(load_hf_config(model_dir), dtype="float32")
    model = build_model(model_dir, mc)
    seqs = [tok.encode(f"Tell me about {t}. " * 3) for t in TOPICS[:4]]
    return SkipScorer(model, None, seqs, [torch.arange(4, len(s) - 1) for s in seqs], max_tokens=64)


def test_scorer_and_search_find_the_planted_set(damped_model_dir):
    from cluster.training.skip_search import best_per_size, modelled, search_skip_sets

    scorer = _scorer(damped_model_dir)
    assert len(scorer.batches) > 1  # several packed groups (max_tokens) are scored
    assert scorer.acceptance(()) == 1.0
    planted, undamped = scorer.acceptance((3, 4, 5)), scorer.acceptance((2,))
    assert planted > 0.5 > undamped + 0.2, (planted, undamped)
    with pytest.raises(ValueError):
        scorer.acceptance((7,))
    cost = lambda skip: 1.0 - 0.1 * len(skip)  # noqa: E731  a cost falling with the layers skipped
    runs = [search_skip_sets(scorer.acceptance, cost, 6, 4, trials=9, seed=3, progress=False) for _ in range(2)]
    assert runs[0] == runs[1]  # seeded: the same sets, scores and order
    cands = runs[0]
    assert len(cands) == 9 and len({c.skip for c in cands}) == 9  # the budget, no set scored twice
    assert all(2 <= l <= 5 for c in cands for l in c.skip)  # the first and last layers are kept
    assert [c.speedup for c in cands] == sorted((c.speedup for c in cands), reverse=True)
    best = cands[0]
    assert set(best.skip) <= PLANTED, best
    for c in cands:
        assert modelled(c.acceptance, 4, c.draft_cost) == (c.tokens_per_verification, c.speedup)
        if 2 in c.skip:
            assert c.speedup < best.speedup and c.acceptance < best.acceptance - 0.2, (c, best)
    sizes = best_per_size(cands, (1, 2, 4))
    assert sizes[1] is not None and len(sizes[1].skip) == 1 and sizes[4] is not None


@pytest.mark.timeout(600)
def test_cli_writes_the_exit_config_and_llm_uses_it(damped_model_dir, tmp_path, capsys):
    """The CLI end to end on a copy of the damped model (it has no exit config): the winner is a
    planted set, the engine's measured acceptance is near the estimate, and the written
    ``exit_config.json`` keeps the model's default exits and gives ``layer_skip`` requests its set."""
    from cluster.cli import main
    from cluster.llm import LLM

    model = copy_dir(damped_model_dir, tmp_path / "model")
    rc = main(["calibrate-skip", "--model", model, "--num-calib", "8", "--num-test", "8", "--num-prompts", "4",
               "--max-new-tokens", "24", "--trials", "8", "--confirm-prompts", "2", "--quiet",
               "--work-dir", str(tmp_path / "work"), "--summary", str(tmp_path / "summary.json")])
    assert rc == 0
    assert "winner" in capsys.readouterr().err
    with open(os.path.join(model, "exit_config.json")) as f:
        raw = json.load(f)
    rec = raw["skip_calibration"]
    skip = tuple(raw["skip_layers"])
    assert skip and set(skip) <= PLANTED and rec["skip_layers"] == list(skip)
    assert rec["trials"] <= 8 and rec["split"]["name"] == "calib" and rec["quantization"] == "none"
    assert rec["skip_acceptance"] > 0.5 and 0 < rec["skip_draft_cost"] and rec["modelled_speedup"] > 0
    assert rec["default_rule"]["skip"] == [2, 4] and rec["default_rule"]["acceptance"] < rec["skip_acceptance"] - 0.2
    e = rec["engine"]
    assert e["num_draft_tokens"] > 0 and abs(e["implied_acceptance"] - rec["skip_acceptance"]) < 0.25, e
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["skip_layers"] == list(skip)
    default = ExitConfig.default_for(6)
    llm = LLM(model, kv_cache_memory_bytes=16 << 20)
    try:
        ec = llm.engine.exit_config
        assert ec.skip_layers == skip and ec.exit_layers == default.exit_layers and ec.policy == default.policy
        req = llm.processor.process("r", "Tell me about bees.", None, exit_mode="layer_skip")
        assert llm.engine.resolve_exit_plan(req).skip_layers == skip
        req = llm.processor.process("r", "Tell me about bees.", None, exit_mode="layer_skip", skip_layers=(2,))
        assert llm.engine.resolve_exit_plan(req).skip_layers == (2,)  # a request's own set wins
    finally:
        llm.shutdown()
