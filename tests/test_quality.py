"""Free-running quality measures (cluster/training/quality.py) and the ROUGE-L threshold search."""
import math

import pytest
import torch

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("a,b,lcs", [
    ([1, 2, 3, 4], [1, 2, 3, 4], 4),
    ([1, 2, 3], [4, 5, 6], 0),
    ([1, 3, 4, 1, 2, 1, 3], [3, 4, 1, 2, 1, 3], 6),  # classic: drop the leading 1
    ([1, 2, 3, 2, 4, 1, 2], [2, 4, 3, 1, 2, 1], 4),  # CLRS ABCBDAB / BDCABA
    ([7, 7, 7], [7], 1),
    ([], [1, 2], 0),
])
def test_lcs_hand_computed(a, b, lcs):
    from cluster.training.quality import lcs_length

    assert lcs_length(a, b) == lcs and lcs_length(b, a) == lcs


def _lcs_reference(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_lcs_matches_plain_dp_on_random_sequences():
    import random

    from cluster.training.quality import lcs_length

    rng = random.Random(0)
    for _ in range(50):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 30))]
        b = [rng.randrange(5) for _ in range(rng.randrange(0, 30))]
        assert lcs_length(a, b) == _lcs_reference(a, b)


def test_rouge_l_and_friends():
    from cluster.training.quality import common_prefix_fraction, exact_match, rouge_l

    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2, 3], [4, 5]) == 0.0
    assert rouge_l([], []) == 1.0 and rouge_l([], [1]) == 0.0 and rouge_l([1], []) == 0.0
    # LCS 2 ([1, 3]): P = 2/3, R = 2/4, F = 2PR / (P + R) = 4/7
    assert rouge_l([1, 3, 9], [1, 2, 3, 4]) == pytest.approx(4 / 7)
    assert exact_match([1, 2], (1, 2)) and not exact_match([1, 2], [1, 2, 3])
    assert common_prefix_fraction([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    assert common_prefix_fraction([1, 2, 3, 4, 5], [1, 2]) == 1.0
    assert common_prefix_fraction([], []) == 1.0 and common_prefix_fraction([1], []) == 0.0


def test_quality_report_means():
    from cluster.training.quality import quality_report

    rep = quality_report([[1, 2, 3], [1, 9, 9]], [[1, 2, 3], [1, 2, 3]], nll=[1.0, 4.0])
    assert rep["exact_match_rate"] == 0.5 and rep["num_answers"] == 2
    assert rep["rouge_l"] == pytest.approx((1 + 1 / 3) / 2)
    assert rep["prefix_fraction"] == pytest.approx((1 + 1 / 3) / 2)
    assert rep["nll"] == pytest.approx(2.5)
    with pytest.raises(ValueError):
        quality_report([[1]], [])


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_dir):
    from cluster.training.quality import load_hf_causal_lm

    return load_hf_causal_lm(tiny_model_dir)


def test_answer_nll_matches_manual_computation_and_padding(hf_tiny):
    from cluster.training.quality import answer_nll, answers_nll

    prompt, answer = [1, 50, 60, 70], [80, 90, 100]
    with torch.no_grad():
        logp = torch.log_softmax(hf_tiny(torch.tensor([prompt + answer])).logits[0].float(), -1)
    manual = -sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(answer)) / len(answer)
    assert answer_nll(hf_tiny, prompt, answer) == pytest.approx(manual, rel=1e-4)
    # batched with right padding (a longer row beside it) gives the same value; empty answers: NaN
    got = answers_nll(hf_tiny, [prompt, [1, 2, 3, 4, 5, 6, 7, 8], prompt], [answer, [9] * 6, []], batch_size=3)
    assert got[0] == pytest.approx(manual, rel=1e-4) and math.isnan(got[2])


def test_full_models_greedy_answer_is_its_most_likely(hf_tiny):
    from cluster.training.quality import answer_nll

    prompt = [1, 200, 300, 400]
    with torch.no_grad():
        greedy = hf_tiny.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
    shuffled = greedy[::-1] if greedy[::-1] != greedy else greedy[1:] + greedy[:1]
    assert answer_nll(hf_tiny, prompt, greedy) <= answer_nll(hf_tiny, prompt, shuffled)
    assert answer_nll(hf_tiny, prompt, greedy) < answer_nll(hf_tiny, prompt, [5] * 8)


# ------------------------------------------------------------------------------ threshold search
def test_blend_search_finds_the_least_raise_meeting_the_target():
    from cluster.training.calibrate import blend_thresholds, search_blend

    calls = []

    def score(alpha):  # synthetic: quality rises with alpha, crossing 0.8 at alpha = 0.3
        calls.append(alpha)
        return min(1.0, 0.5 + alpha)

    res = search_blend(score, 0.8, steps=6)
    assert res.alpha is not None and 0.3 <= res.alpha <= 0.3 + 1 / 2 ** 6 + 1e-9
    assert res.value >= 0.8 and len(calls) == 2 + 6
    assert search_blend(lambda a: 0.9, 0.8).alpha == 0.0  # already met: no raise
    assert search_blend(lambda a: 0.5, 0.8).alpha is None  # never met: exits disabled
    assert blend_thresholds({2: 0.6, 4: 0.9}, 0.5) == {2: pytest.approx(0.8), 4: pytest.approx(0.95)}


@pytest.mark.timeout(240)
def test_calibrate_rouge_l_meets_its_target_free_running(train_tiny_exits, tmp_path):
    import argparse
    import json

    from cluster.llm import LLM, model_exit_config_path
    from cluster.sampling import SamplingParams
    from cluster.training.cli import add_calibrate_parser
    from cluster.training.pipeline import DataSettings, Workspace
    from cluster.training.quality import rouge_l
    from cluster.training.train import TrainSettings

    data = DataSettings(max_new_tokens=10, num_calib=3, num_test=1, max_train=3, num_agreement_eval=1)
    settings = TrainSettings(rank=8, epochs=1, batch_size=16, lr=1e-2, classifier_epochs=1, negatives=128)
    model_dir, work, _ = train_tiny_exits("quality", (2, 4), data, settings, calibrate=False)
    parser = argparse.ArgumentParser()
    add_calibrate_parser(parser.add_subparsers())
    target = 0.9
    args = parser.parse_args(["calibrate", "--model", model_dir, "--target", str(target), "--metric", "rouge_l",
                              "--z", "0", "--search-steps", "2", "--quiet", "--work-dir", work,
                              "--summary", str(tmp_path / "s.json")])
    assert args.func(args) == 0
    path = model_exit_config_path(model_dir)
    with open(path) as f:
        cal = json.load(f)["calibration"]
    assert cal["metric"] == "rouge_l" and cal["target"] == target
    assert cal["rouge_l"]["lower_bound"] >= target and cal["rouge_l"]["history"]
    # independent re-check: the written (default) exit config, free-running on the calibration prompts
    ws = Workspace.open(model_dir, data, work)
    seqs = ws.sequences(("calib",), progress=False)["calib"]
    llm = LLM(model_dir, max_num_seqs=data.max_num_seqs, max_num_batched_tokens=max(2048, data.max_num_seqs * 16),
              kv_cache_memory_bytes=32 << 20)
    try:
        outs = llm.generate([list(s.prompt_ids) for s in seqs], SamplingParams(max_tokens=10, temperature=0.0))
    finally:
        llm.shutdown()
    got = sum(rouge_l(o.token_ids, s.output_ids) for o, s in zip(outs, seqs)) / len(seqs)
    assert got == pytest.approx(cal["rouge_l"]["rouge_l"]) and got >= target
