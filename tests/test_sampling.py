"""Sampler (cluster.model.layers.sampler.sample) and the runner's per-request sampling state: small random logits,
no model. Each processing step is compared with a plain per-row reference written here."""
from collections import Counter

import numpy as np
import pytest
import torch

import cluster.model.layers.sampler as sampling
from cluster.model.layers.sampler import TokenHistory, process_logits, sample
from cluster.sampling import SamplingParams
from cluster.worker.model_runner import SamplingStates

pytestmark = pytest.mark.timeout(60)

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------ references
def ref_process(row, p: SamplingParams, counts=None, prompt=(), nout=0, eos=(), bitmask=None):
    """Per-row reference of the processing order in SamplingParams' docstring (plain loops)."""
    row = row.float().clone()
    V = row.shape[0]
    counts = counts or {}
    for t, b in p.logit_bias.items():
        row[t] += b
    if nout < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            row[t] = NEG_INF
    if bitmask is not None:
        for t in range(V):
            if t >= 32 * len(bitmask) or not (int(bitmask[t // 32]) >> (t % 32)) & 1:
                row[t] = NEG_INF
    for t in set(prompt) | {t for t, c in counts.items() if c > 0}:  # CTRL repetition penalty
        r = p.repetition_penalty
        row[t] = row[t] / r if row[t] > 0 else row[t] * r
    for t, c in counts.items():  # OpenAI frequency / presence penalties
        if c > 0:
            row[t] -= c * p.frequency_penalty + p.presence_penalty
    if p.greedy:
        return row
    row = row / p.temperature
    if 0 < p.top_k < V:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, NEG_INF)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
        row = torch.full_like(row, NEG_INF).scatter(0, order, sorted_logits)
    return row


def assert_same_logits(got, want):
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def history_for(rows, counts_list, prompts, V):
    counts = torch.zeros(len(rows), V, dtype=torch.int32)
    mask = torch.zeros(len(rows), V, dtype=torch.bool)
    for j, (c, pr) in enumerate(zip(counts_list, prompts)):
        for t, n in c.items():
            counts[j, t] = n
        mask[j, list(pr)] = True
    return TokenHistory(list(rows), counts, mask)


def pack_bits(allowed: np.ndarray) -> np.ndarray:
    """bool [V] -> int32 [ceil(V/32)] in xgrammar's layout (bit j of word i: token 32*i+j)."""
    W = (len(allowed) + 31) // 32
    padded = np.zeros(W * 32, dtype=bool)
    padded[: len(allowed)] = allowed
    return np.packbits(padded, bitorder="little").view("<i4").astype(np.int32)


def tokens_of(out):
    return out.to_host()[0]


# ------------------------------------------------------------------------------ draws
def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 300)
    params = [SamplingParams() if i % 2 == 0 else SamplingParams(temperature=1.0, top_k=3) for i in range(8)]
    toks = tokens_of(sample(logits, params))
    assert [toks[i] for i in range(0, 8, 2)] == logits.argmax(-1)[::2].tolist()
    assert tokens_of(sample(logits, [SamplingParams()] * 8)) == logits.argmax(-1).tolist()


def test_seeded_rows_reproducible_and_independent_of_batch():
    torch.manual_seed(1)
    V = 200
    row = torch.randn(V) * 2
    p = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    mates_a = [(torch.randn(V), SamplingParams(temperature=1.0))]
    mates_b = [(torch.randn(V), SamplingParams(temperature=0.5, seed=7, top_p=0.5)), (torch.randn(V), SamplingParams()),
               (torch.randn(V), SamplingParams(temperature=2.0, top_k=4))]

    def run(mates, position, steps=20):
        g = torch.Generator().manual_seed(p.seed)
        gens_m = [torch.Generator().manual_seed(m.seed) if m.seed is not None else None for _, m in mates]
        rows = [m for m, _ in mates]
        rows.insert(position, row)
        params = [m for _, m in mates]
        params.insert(position, p)
        gens = list(gens_m)
        gens.insert(position, g)
        logits = torch.stack(rows)
        return [tokens_of(sample(logits, params, gens))[position] for _ in range(steps)]

    alone = run([], 0)
    assert len(set(alone)) > 1  # really sampling
    assert run(mates_a, 1) == alone
    assert run(mates_b, 2) == alone
    assert run([], 0) == alone


def chi_square(tokens, probs):
    n = len(tokens)
    obs = Counter(tokens)
    return sum((obs.get(i, 0) - n * q) ** 2 / (n * q) for i, q in enumerate(probs))


def test_unseeded_and_seeded_rows_follow_the_distribution():
    torch.manual_seed(2024)
    base = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    temp = 0.8
    probs = (base / temp).softmax(-1).tolist()
    n = 20000
    logits = base.expand(n, 5).contiguous()
    p = SamplingParams(temperature=temp)
    toks = tokens_of(sample(logits, [p] * n))
    # chi-square, 4 degrees of freedom: 27.9 is the 1e-5 quantile (fixed seed: deterministic anyway)
    assert chi_square(toks, probs) < 27.9
    # seeded rows, one seed each, pooled
    m = 5000
    ps = [SamplingParams(temperature=temp, seed=s) for s in range(m)]
    gens = [torch.Generator().manual_seed(s) for s in range(m)]
    toks = tokens_of(sample(logits[:m], ps, gens))
    assert chi_square(toks, probs) < 27.9


def test_top_k_top_p_match_reference():
    torch.manual_seed(3)
    V = 64
    grid = [dict(temperature=t, top_k=k, top_p=q) for t in (0.5, 1.0, 1.7) for k in (-1, 1, 5, 63, 64, 100)
            for q in (1.0, 0.9, 0.3, 0.01)]
    params = [SamplingParams(**g) for g in grid]
    logits = torch.randn(len(params), V) * 3
    got = process_logits(logits, params)
    for i, p in enumerate(params):
        assert_same_logits(got[i], ref_process(logits[i], p))
    # draws stay inside the kept set
    toks = tokens_of(sample(logits, params))
    for i, t in enumerate(toks):
        assert torch.isfinite(got[i, t])


# ------------------------------------------------------------------------------ processing
def test_penalties_and_logit_bias_match_reference():
    torch.manual_seed(4)
    V = 40
    params = [
        SamplingParams(temperature=1.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.7, frequency_penalty=0.8, presence_penalty=-0.5),
        SamplingParams(repetition_penalty=0.6, presence_penalty=1.5, logit_bias={3: 5.0, 39: -100.0}),
        SamplingParams(temperature=1.0, logit_bias={0: 2.5}),  # no penalties: no history row
        SamplingParams(temperature=1.2, top_k=10, repetition_penalty=2.0, frequency_penalty=-1.0,
                       logit_bias={5: 1.0, 6: -1.0}),
    ]
    logits = torch.randn(len(params), V) * 2
    counts = [{1: 2, 7: 1}, {2: 3, 9: 1, 11: 2}, {3: 1}, {4: 4, 5: 1, 6: 2}]
    prompts = [{1, 5, 20}, {0}, {30, 31, 3}, {6, 7}]
    hist = history_for([0, 1, 2, 4], counts, prompts, V)
    got = process_logits(logits, params, history=hist)
    refs = {0: (counts[0], prompts[0]), 1: (counts[1], prompts[1]), 2: (counts[2], prompts[2]), 3: ({}, ()),
            4: (counts[3], prompts[3])}
    for i, p in enumerate(params):
        c, pr = refs[i]
        assert_same_logits(got[i], ref_process(logits[i], p, counts=c, prompt=pr))
    assert got[2].argmax() == tokens_of(sample(logits, params, history=hist))[2]  # greedy row with penalties


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    V, EOS, STOP = 30, 2, 17
    logits = torch.zeros(1, V)
    logits[0, EOS], logits[0, STOP], logits[0, 9] = 10.0, 9.0, 8.0
    p = SamplingParams(min_tokens=3, max_tokens=8, stop_token_ids=[STOP])
    for nout, want in [(0, 9), (2, 9), (3, EOS), (5, EOS)]:
        assert tokens_of(sample(logits, [p], num_output_tokens=[nout], eos_token_ids=[(EOS,)])) == [want]
    q = SamplingParams(min_tokens=3, max_tokens=8, stop_token_ids=[STOP], ignore_eos=True)
    assert tokens_of(sample(logits, [q], num_output_tokens=[0], eos_token_ids=[(EOS,)])) == [EOS]
    logits[0, EOS] = 0.0
    assert tokens_of(sample(logits, [q], num_output_tokens=[0], eos_token_ids=[(EOS,)])) == [9]
    # sampled rows never draw a masked stop, and processing matches the reference
    torch.manual_seed(5)
    big = torch.randn(500, V)
    big[:, EOS] += 4.0
    ps = [SamplingParams(temperature=1.0, min_tokens=2, max_tokens=4, stop_token_ids=[STOP, 25])] * 500
    toks = tokens_of(sample(big, ps, num_output_tokens=[1] * 500, eos_token_ids=[(EOS, 3)] * 500))
    assert not {EOS, 3, STOP, 25} & set(toks)
    got = process_logits(big[:3], ps[:3], num_output_tokens=[1] * 3, eos_token_ids=[(EOS, 3)] * 3)
    for i in range(3):
        assert_same_logits(got[i], ref_process(big[i], ps[i], nout=1, eos=(EOS, 3)))


def test_guided_bitmask_only_allowed_tokens():
    torch.manual_seed(6)
    V, n = 100, 2000  # V not a multiple of 32
    rng = np.random.default_rng(6)
    allowed = rng.random(V) < 0.15
    allowed[[0, 99]] = [True, True]
    mask = pack_bits(allowed)
    assert mask.shape == (4,) and mask.dtype == np.int32
    logits = torch.randn(n, V) * 3
    logits[:, ~torch.from_numpy(allowed)] += 5.0  # the disallowed tokens would win without the mask
    ps = [SamplingParams(temperature=1.0)] * (n // 2) + [SamplingParams()] * (n // 2)
    toks = tokens_of(sample(logits, ps, guided_bitmasks=[mask] * n))
    assert all(allowed[t] for t in toks)
    assert len(set(toks[: n // 2])) > 3  # temperature 1 really spreads over the allowed set
    got = process_logits(logits[:2], ps[:1] * 2, guided_bitmasks=[mask, None])
    assert_same_logits(got[0], ref_process(logits[0], ps[0], bitmask=mask))
    assert_same_logits(got[1], ref_process(logits[1], ps[0]))
    # a short bitmask disallows every token past it
    short = pack_bits(np.ones(64, dtype=bool))[:2]
    toks = tokens_of(sample(logits[:500], ps[:500], guided_bitmasks=[short] * 500))
    assert max(toks) < 64


def test_guided_wins_over_min_tokens_and_empty_mask_fails():
    V, EOS = 64, 5
    logits = torch.randn(3, V)
    only_eos = np.zeros(V, dtype=bool)
    only_eos[EOS] = True
    p = SamplingParams(temperature=1.0, min_tokens=4, max_tokens=8)
    out = sample(logits, [p, p, SamplingParams()], num_output_tokens=[0, 0, 0], eos_token_ids=[(EOS,)] * 3,
                 guided_bitmasks=[pack_bits(only_eos), np.zeros(2, dtype=np.int32), None])
    toks = tokens_of(out)
    assert toks[0] == EOS  # the grammar allows only EOS: min_tokens yields rather than leave no token
    assert list(out.failed) == [1] and "allows no token" in out.failed[1]
    assert toks[1] == -1 and toks[2] == logits[2].argmax().item()


def test_logprobs_are_raw_log_softmax_with_topk_order():
    torch.manual_seed(7)
    V = 50
    logits = torch.randn(4, V) * 2
    params = [SamplingParams(temperature=0.3, logprobs=5, logit_bias={1: 50.0}),
              SamplingParams(),
              SamplingParams(temperature=1.0, top_k=2, logprobs=0, repetition_penalty=1.5),
              SamplingParams(logprobs=20, presence_penalty=2.0)]
    hist = history_for([2, 3], [{0: 1}, {int(logits[3].argmax()): 1}], [{4}, set()], V)
    out = sample(logits, params, history=hist)
    toks, _, lps = out.to_host()
    ref = torch.log_softmax(logits.double(), -1)
    assert sorted(lps) == [0, 2, 3]
    for i, k in [(0, 5), (2, 0), (3, 20)]:
        lp, top = lps[i]
        assert lp == pytest.approx(ref[i, toks[i]].item(), abs=1e-5)
        assert len(top) == k
        want = torch.topk(ref[i], k)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert toks[0] == 1  # processing (the bias) changed the token but not the logprobs


# ------------------------------------------------------------------------------ devices, syncs
def full_featured_batch(V=96):
    torch.manual_seed(8)
    logits = torch.randn(6, V) * 2
    allowed = np.zeros(V, dtype=bool)
    allowed[::3] = True
    params = [SamplingParams(temperature=0.8, seed=11, top_k=20, top_p=0.9, logprobs=3, logit_bias={4: 3.0}),
              SamplingParams(repetition_penalty=1.4, min_tokens=2, max_tokens=5, stop_token_ids=[7]),
              SamplingParams(temperature=1.1, frequency_penalty=0.5, presence_penalty=0.5, logprobs=0),
              SamplingParams(temperature=1.0, seed=12),
              SamplingParams(temperature=0.6, top_p=0.5),
              SamplingParams(logprobs=2)]
    hist = history_for([1, 2], [{3: 2}, {5: 1, 6: 3}], [{8, 9}, {10}], V)
    kw = dict(history=hist, num_output_tokens=[0, 1, 0, 3, 0, 0], eos_token_ids=[(2,)] * 6,
              guided_bitmasks=[None, None, None, pack_bits(allowed), None, None])
    return logits, params, kw


def run_full_batch(logits, params, kw):
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    torch.manual_seed(99)  # unseeded rows draw from the default generator
    out = sample(logits, params, gens, **kw)
    return out.to_host(torch.arange(6, device="cpu"))  # the exit layers: real CPU data


def test_sample_under_meta_default_device_matches():
    batch = full_featured_batch()  # real CPU tensors
    want = run_full_batch(*batch)
    torch.set_default_device("meta")  # a tensor created without a device would be meta and fail
    try:
        got = run_full_batch(*batch)
    finally:
        torch.set_default_device(None)
    assert torch.empty(1).device.type == "cpu"
    assert got == want
    assert got[1] == [list(range(6))]


def test_sample_makes_no_host_sync_and_to_host_one():
    # on meta logits every value read would fail: the whole processing and draw are sync-free
    logits, params, kw = full_featured_batch()
    params = [p.model_copy(update={"seed": None}) for p in params]
    kw["history"] = TokenHistory(kw["history"].rows, kw["history"].output_counts.to("meta"),
                                 kw["history"].prompt_mask.to("meta"))
    out = sample(logits.to("meta"), params, **kw)
    assert out.failed == {} and out.token_ids.shape == (6,) and out.token_ids.device.type == "meta"
    assert out.top_ids.shape == (3, 3)

    logits, params, kw = full_featured_batch()
    out = sample(logits, params, **kw)  # no generators: seeded rows draw from the default RNG too
    calls = []
    orig = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return orig(self)

    torch.Tensor.tolist = counting
    try:
        out.to_host(torch.arange(6))
    finally:
        torch.Tensor.tolist = orig
    assert len(calls) == 1


# ------------------------------------------------------------------------------ fault isolation
def test_bad_row_fails_alone():
    torch.manual_seed(9)
    V = 32
    logits = torch.randn(4, V)
    good = [SamplingParams(temperature=1.0, seed=5), SamplingParams(), SamplingParams(temperature=0.7, seed=6)]
    bad = SamplingParams(temperature=1.0, logit_bias={V + 3: 1.0})  # id past the vocabulary

    def gens():
        return [torch.Generator().manual_seed(5), None, None, torch.Generator().manual_seed(6)]

    out = sample(logits, [good[0], good[1], bad, good[2]], gens(), history=None)
    toks = tokens_of(out)
    assert list(out.failed) == [2] and "logit_bias" in out.failed[2]
    clean = tokens_of(sample(logits, [good[0], good[1], SamplingParams(), good[2]], gens()))
    assert toks[:2] == clean[:2] and toks[3] == clean[3] and toks[2] == -1  # same draws on retry
    # penalties without history fail that row only
    out = sample(logits[:2], [SamplingParams(repetition_penalty=1.2), SamplingParams(logprobs=1)])
    assert list(out.failed) == [0] and tokens_of(out)[1] == logits[1].argmax().item()
    assert list(out.to_host()[2]) == [1]


def test_helper_raising_for_one_row_fails_only_that_row(monkeypatch):
    torch.manual_seed(10)
    V = 20
    logits = torch.randn(3, V)
    orig = sampling._apply_penalties

    def flaky(x, counts, prompt_mask, rep, freq, pres):
        if bool((rep == 7.0).any()):
            raise RuntimeError("boom")
        return orig(x, counts, prompt_mask, rep, freq, pres)

    monkeypatch.setattr(sampling, "_apply_penalties", flaky)
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(repetition_penalty=7.0, logprobs=1),
              SamplingParams(temperature=1.0, seed=3)]
    hist = history_for([0, 1], [{0: 1}, {1: 1}], [set(), set()], V)
    out = sample(logits, params, [None, None, torch.Generator().manual_seed(3)], history=hist)
    toks, _, lps = out.to_host()
    assert out.failed == {1: "sampling failed: RuntimeError: boom"}
    assert toks[1] == -1 and 1 not in lps
    want = ref_process(logits[0], params[0], counts={0: 1})
    assert toks[0] == want.argmax().item()
    assert toks[2] == tokens_of(sample(logits[2:], params[2:], [torch.Generator().manual_seed(3)]))[0]


# ------------------------------------------------------------------------------ runner state
def test_sampling_states_history_counts_and_reuse():
    V = 16
    st = SamplingStates()
    st.add_prompt("a", [1, 2, 2, 99], V, torch.device("cpu"))  # 99 >= V: ignored
    st.add_prompt("b", [3], V, torch.device("cpu"))
    h, slots = st.history(["x", "b", "a"])
    assert h.rows == [1, 2]
    assert h.prompt_mask[1].nonzero().flatten().tolist() == [1, 2] and h.prompt_mask[0].nonzero().tolist() == [[3]]
    st.append(h, slots, torch.tensor([7, 4, 5]), failed={})
    st.append(h, slots, torch.tensor([7, 4, 4]), failed={2: "x"})
    h, _ = st.history(["a", "b"])
    assert h.output_counts[0].nonzero().flatten().tolist() == [5] and h.output_counts[1, 4] == 2
    # growth keeps the rows; drop frees a slot that a new request reuses with a clean row
    for i in range(20):
        st.add_prompt(f"r{i}", [i % V], V, torch.device("cpu"))
    h, _ = st.history(["a", "b"])
    assert st.counts.shape[0] >= 22 and h.output_counts[1, 4] == 2
    slot = st.slots["b"]
    st.drop("b")
    st.add_prompt("c", [], V, torch.device("cpu"))
    assert st.slots["c"] == slot and not st.counts[slot].any() and not st.prompt_mask[slot].any()
    g = st.generator("s", 42, torch.device("cpu"))
    assert st.generator("s", 42, torch.device("cpu")) is g and st.generator("t", None, torch.device("cpu")) is None
    st.drop("s")
    assert "s" not in st.generators


def test_sampling_states_under_meta_default_device():
    torch.set_default_device("meta")
    try:
        st = SamplingStates()
        st.add_prompt("a", [1, 2], 8, torch.device("cpu"))
        h, slots = st.history(["a"])
        st.append(h, slots, torch.tensor([3], device="cpu"), failed={})
        assert st.counts.device.type == "cpu" and st.generator("a", 1, torch.device("cpu")).device.type == "cpu"
    finally:
        torch.set_default_device(None)
    assert st.counts[st.slots["a"], 3] == 1


def stub_runner(V, exit_layer=3):
    """A ModelRunner whose forward returns fixed logits (no model): tests only the sampling part."""
    from cluster.model.exits import ExitResult
    from cluster.worker.model_runner import ModelRunner
    from cluster.worker.spec_decode import SpecDecoder

    runner = ModelRunner.__new__(ModelRunner)
    runner.is_driver = True
    runner.sampling_states = SamplingStates()
    runner.spec_decoder = SpecDecoder(None, None, [], None, exit_layer, runner.sampling_states, True)  # no drafts here
    runner.logits = None

    def forward(so, rows_of=None):
        n = sum(sr.sample for sr in so.scheduled)
        logits = runner.logits if runner.logits is not None else torch.zeros(n, V)
        return ExitResult(logits=logits, exit_layers=torch.full((n,), exit_layer, dtype=torch.long, device="cpu"))

    runner.forward = forward
    return runner


def scheduled(rid, params, sample=True, prompt=None, nout=0, eos=(), bitmask=None):
    from cluster.core.outputs import ScheduledRequest

    return ScheduledRequest(rid, [1], 0, [0], sample, False, params, num_output_tokens=nout, eos_token_ids=eos,
                            prompt_token_ids=prompt, guided_bitmask=bitmask)


def test_runner_keeps_history_until_finished_and_reports_failures():
    from cluster.core.outputs import SchedulerOutput

    V = 12
    runner = stub_runner(V)
    pen = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, logprobs=2)
    # first chunk: prompt sent, nothing sampled yet
    ro = runner.execute_model(SchedulerOutput([scheduled("a", pen, sample=False, prompt=[4, 5])]))
    assert ro.tokens == {}
    logits = torch.zeros(1, V)
    logits[0, 4], logits[0, 5], logits[0, 6] = 1.8, 1.7, 1.0
    runner.logits = logits
    ro = runner.execute_model(SchedulerOutput([scheduled("a", pen)]))
    # prompt tokens 4, 5 get the repetition penalty: 1.8 / 2, 1.7 / 2 < 1.0 -> token 6
    assert {r: (t.token_ids, t.exit_layers) for r, t in ro.tokens.items()} == {"a": ([6], [3])} and ro.failed == {}
    lp, top = ro.tokens["a"].logprob
    ref = torch.log_softmax(logits[0].double(), -1)
    assert lp == pytest.approx(ref[6].item(), abs=1e-6) and [t for t, _ in top] == [4, 5]
    # the runner counted token 6: repetition 2 and frequency penalty 1 -> 1.0 / 2 - 1 < 0; token 4 (0.9) wins
    assert runner.execute_model(SchedulerOutput([scheduled("a", pen)])).tokens["a"].token_ids == [4]
    states = runner.sampling_states
    assert states.counts[states.slots["a"]].tolist()[4:7] == [1, 0, 1]
    # preemption keeps the state (no finished id); a penalty request without history fails alone
    runner.logits = torch.zeros(2, V)
    ro = runner.execute_model(SchedulerOutput([scheduled("a", pen), scheduled("b", pen)]))
    assert set(ro.tokens) == {"a"} and list(ro.failed) == ["b"] and "history" in ro.failed["b"]
    assert ro.tokens["a"].logprob is not None and ro.tokens["a"].exit_layers == [3]
    assert states.counts[states.slots["a"]].sum() == 3
    # finished: state dropped even on an empty iteration
    assert runner.execute_model(SchedulerOutput([], finished_req_ids=["a"])).tokens == {}
    assert "a" not in states.slots


def test_runner_seeded_generator_and_min_tokens():
    from cluster.core.outputs import SchedulerOutput

    V, EOS = 10, 1
    runner = stub_runner(V)
    logits = torch.zeros(1, V)
    logits[0, EOS] = 20.0
    runner.logits = logits
    p = SamplingParams(temperature=1.0, seed=2**64 + 5, min_tokens=2, max_tokens=5)
    ro = runner.execute_model(SchedulerOutput([scheduled("s", p, nout=1, eos=(EOS,))]))
    assert ro.tokens["s"].token_ids != [EOS]
    ro = runner.execute_model(SchedulerOutput([scheduled("s", p, nout=2, eos=(EOS,))]))
    assert ro.tokens["s"].token_ids == [EOS]
    assert runner.sampling_states.generators["s"].initial_seed() == 5
    runner.execute_model(SchedulerOutput([], finished_req_ids=["s"]))
    assert "s" not in runner.sampling_states.generators


# ------------------------------------------------------------------------------ scheduler plumbing
def test_scheduler_sends_prompt_once_and_min_tokens_blocks_stop():
    from cluster.config import CacheConfig, SchedulerConfig
    from cluster.core.outputs import ModelRunnerOutput, SampledTokens
    from cluster.core.scheduler import Scheduler
    from cluster.request import Request

    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4, max_model_len=64),
                  CacheConfig(block_size=4, num_blocks=32), 32)
    pen = SamplingParams(max_tokens=6, min_tokens=3, presence_penalty=0.5)
    s.add_request(Request("p", list(range(10, 20)), pen, eos_token_ids=(2,)))
    s.add_request(Request("q", [30, 31], SamplingParams(max_tokens=6), eos_token_ids=(2,)))
    sent, outputs = [], []
    while s.has_unfinished_requests():
        so = s.schedule()
        ro = ModelRunnerOutput()
        for sr in so.scheduled:
            sent.append((sr.request_id, sr.prompt_token_ids))
            assert sr.eos_token_ids == (2,)
            assert sr.num_output_tokens == s.get_request(sr.request_id).num_output_tokens
            if sr.sample:
                ro.tokens[sr.request_id] = SampledTokens([2], [0])  # always EOS
        for req in s.update(so, ro):
            outputs.append((req.request_id, req.num_output_tokens, req.finish_reason))
    assert [x for x in sent if x[1] is not None] == [("p", list(range(10, 20)))]  # once, penalties only
    assert ("q", 1, "stop") in outputs  # no min_tokens: EOS stops at once
    assert ("p", 2, None) in outputs and ("p", 3, "stop") in outputs  # EOS ignored below min_tokens
