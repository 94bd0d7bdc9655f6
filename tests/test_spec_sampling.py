"""Speculative sampling keeps the full model's distribution (issue 9): the lossless modes at
temperature > 0 on the damped tiny model (see tests/test_spec_decode.py), against the exact
next-token distribution computed with transformers."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from cluster import SamplingParams
from cluster.engine.protocol import EngineRequest
from tests.test_spec_decode import (NUM_LAYERS, _restore_threads, assert_idle, exits, make_llm, run,  # noqa: F401
                                    spec_totals)

pytestmark = pytest.mark.timeout(300)


SAMPLING_PROMPT = "def fibonacci(n):"
NUM_SAMPLES = 512


@dataclass
class SecondToken:
    """Exact 2nd-token distributions at temperature 1 (transformers, same checkpoint), for the most
    likely first tokens ``first`` (their probabilities ``w``; ``left_out`` = 1 - sum w)."""

    first: list[int]
    w: torch.Tensor  # [M] p(t)
    p: torch.Tensor  # [M, V] full model p(y | t)
    q: torch.Tensor  # [M, V] the draft's q(y | t): the shared head at the draft layer

    @property
    def left_out(self) -> float:
        return 1.0 - float(self.w.sum())

    @property
    def p2(self) -> torch.Tensor:  # the full model's marginal sum_t p(t) p(y | t)
        return self.w @ self.p

    @property
    def q2(self) -> torch.Tensor:  # the marginal had every first draft been accepted
        return self.w @ self.q

    @property
    def accept1(self) -> float:  # P(the first draft is accepted) = sum_t p(t) sum_y min(p, q)
        return float(self.w @ torch.minimum(self.p, self.q).sum(-1))


def exact_second_token(model_dir: str, prompt_ids: list[int], draft_layer: int) -> SecondToken:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1].double(), -1)
        top = p1.topk(512)
        m = int((top.values.cumsum(0) < 0.9995).sum()) + 1
        first = top.indices[:m].tolist()
        out = model(torch.tensor([prompt_ids + [t] for t in first]), output_hidden_states=True)
        p = torch.softmax(out.logits[:, -1].double(), -1)
        q = torch.softmax(model.lm_head(model.model.norm(out.hidden_states[draft_layer][:, -1])).double(), -1)
    return SecondToken(first, top.values[:m], p, q)


def sample_second_tokens(model_dir: str, ec, num_samples: int) -> tuple[list[int], list]:
    """``num_samples`` seeded requests at temperature 1 (4 tokens each: the prefill's token, 2 drafts
    and the full model's token) under exit config ``ec``; returns ``(prompt ids, outputs)`` after
    checking that nothing leaked and every request verified drafts. (With max_tokens 2 there would
    be no draft at all: drafts never pass max_tokens.)"""
    llm = make_llm(model_dir, ec, max_num_seqs=64, num_blocks=1024)
    try:
        prompt = llm.processor.tokenize(SAMPLING_PROMPT)
        reqs = [EngineRequest(request_id=f"s{i}", prompt_token_ids=prompt,
                              sampling_params=SamplingParams(max_tokens=4, temperature=1.0, seed=i, ignore_eos=True))
                for i in range(num_samples)]
        outs = run(llm, reqs)
        assert_idle(llm)
    finally:
        llm.shutdown()
    assert all(len(o.token_ids) == 4 and o.num_verify_steps >= 1 for o in outs)
    return prompt, outs


@dataclass
class BinnedTV:
    """The 2nd token's empirical distribution against the exact ``p2``, binned (tokens with exact
    probability >= 0.01, plus one bin for the rest), with the bound of the tests' docstrings."""

    bins: list[int]
    p: list[float]  # exact, binned
    emp: list[float]  # empirical, binned
    tv: float
    bound: float

    def binned(self, dist: torch.Tensor) -> list[float]:
        x = [float(dist[b]) for b in self.bins]
        return x + [max(0.0, 1.0 - sum(x))]


def second_token_tv(outs, p2: torch.Tensor, left_out: float) -> BinnedTV:
    n = len(outs)
    bins = (p2 >= 0.01).nonzero().flatten().tolist()
    assert len(bins) >= 3
    b = BinnedTV(bins, [], [], 0.0, 0.0)
    b.p = b.binned(p2)
    counts = [0] * (len(bins) + 1)
    where = {t: i for i, t in enumerate(bins)}
    for o in outs:
        counts[where.get(o.token_ids[1], len(bins))] += 1
    b.emp = [c / n for c in counts]
    b.tv = 0.5 * sum(abs(a - x) for a, x in zip(b.emp, b.p))
    b.bound = (0.5 * sum(math.sqrt(x * (1 - x) / n) for x in b.p) + math.sqrt(math.log(1000) / (2 * n)) + left_out)
    return b


def test_speculative_sampling_matches_full_model(damped_model_dir):
    """The 2nd generated token (the first one speculation produces: drafted at layer 1, accepted with
    probability min(1, p/q), else redrawn from norm(max(0, p - q))) of ``NUM_SAMPLES`` seeded requests at
    temperature 1 vs the full model's exact marginal (transformers, same checkpoint).

    Bound: bins = tokens with exact probability >= 0.01, plus one bin for the rest. For the empirical
    distribution of N independent draws, E[TV_binned] <= 1/2 sum_b sqrt(p_b (1 - p_b) / N) (Jensen), and
    TV changes by at most 1/N per draw, so (McDiarmid) P(TV > E + t) <= exp(-2 N t^2): with
    t = sqrt(ln(1000) / 2N) a correct sampler fails with probability <= 0.001. The first-token mass
    the exact sum leaves out (< 0.0005) is added. For N = 512 on this prompt the bound is 0.16 (measured:
    0.065), while accepting every draft (naive speculation) would give the draft's marginal, 0.49 away;
    the test asserts that gap. The rate at which the first draft is accepted must match its exact value
    ``E[sum min(p, q)]`` within 4 standard deviations."""
    draft_layer = 1  # accepts ~1/3 of the first drafts here: naive acceptance would be far off
    ec = exits(mode="self_speculative", draft_layer=draft_layer, num_draft_tokens=2, spec_max_batch=64)
    prompt, outs = sample_second_tokens(damped_model_dir, ec, NUM_SAMPLES)
    acc, _ = spec_totals(outs)
    assert 0.1 < acc < 0.9, acc  # drafting happened, and drafts were both accepted and rejected

    ex = exact_second_token(damped_model_dir, prompt, draft_layer)
    p2, q2, accept1, left_out = ex.p2, ex.q2, ex.accept1, ex.left_out
    # accepted drafts keep their draft's exit layer; a redrawn token has the full depth
    assert {o.exit_layers[1] for o in outs} == {draft_layer, NUM_LAYERS}
    rate = sum(o.exit_layers[1] == draft_layer for o in outs) / NUM_SAMPLES
    assert abs(rate - accept1) <= 4 * math.sqrt(accept1 * (1 - accept1) / NUM_SAMPLES) + left_out, (rate, accept1)
    # a rejected draft's replacement comes from norm(max(0, p - q)): never a token where q >= p (given
    # the sampled first token); a bug redrawing from p instead put 5 of 324 there (the check catches it)
    row = {t: i for i, t in enumerate(ex.first)}
    redrawn = [(row[o.token_ids[0]], o.token_ids[1]) for o in outs
               if o.exit_layers[1] == NUM_LAYERS and o.token_ids[0] in row]
    assert len(redrawn) > NUM_SAMPLES // 4
    outside = [(i, y) for i, y in redrawn if float(ex.q[i, y] - ex.p[i, y]) > 1e-4]
    assert not outside, f"{len(outside)} of {len(redrawn)} replacements outside the residual's support"

    b = second_token_tv(outs, p2, left_out)
    p, emp, tv, bound = b.p, b.emp, b.tv, b.bound
    naive = 0.5 * sum(abs(a - x) for a, x in zip(b.binned(q2), p))
    assert bound < 0.2, bound
    assert naive > 2 * bound, (naive, bound)  # the test has the power to see naive acceptance
    assert tv <= bound, (tv, bound, emp, p)
