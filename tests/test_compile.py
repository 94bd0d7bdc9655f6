"""torch_compile=True: decode iterations as compiled graphs, one per segment between exit checks
(cluster.model.compile.DecodeGraphs).

The compiled engine must give the eager engine's answers (logprobs within float tolerance; Inductor
reorders float ops, so exact bits are not promised) with early exit on and off, build its graphs at
start-up, and never recompile while serving (per batch size, context length or layer).
"""
from __future__ import annotations

import math

import pytest

from cluster import LLM, ExitConfig, SamplingParams

pytestmark = pytest.mark.timeout(600)

PROMPTS = ["The moon is", "Bread is made from", "List three rivers:", "Chess is a game"]


def _tol(quantization: str) -> float:
    """Logprob tolerance between the compiled and the eager engine. The quantized LM head's kernels
    (eager: ``_weight_int8pack_mm``; compiled: Inductor's int8 GEMM template) return bfloat16 logits
    summed in different orders, so a logit may land on the neighbouring bfloat16 value: the tiny
    random model's logits reach |32-64|, where one bfloat16 step is 1/4."""
    return 1e-2 if quantization == "none" else 1 / 4


def _assert_same_token(e, c, tol: float, i: int = 0) -> None:
    """Token ``i`` (by default the first: one forward of the prompt) is the same in the eager run ``e``
    and the compiled run ``c``, or the two runs met a near-tie their rounding decided: the compiled
    token is among the eager run's top tokens, within ``tol`` of the eager pick. The chosen logprobs
    agree within ``tol``. Both runs must share the tokens before ``i``."""
    assert e.token_ids[:i] == c.token_ids[:i]
    if e.token_ids[i] != c.token_ids[i]:
        eager_top = dict(e.logprobs[i].top)
        assert c.token_ids[i] in eager_top, (e.logprobs[i], c.logprobs[i])
        assert e.logprobs[i].logprob - eager_top[c.token_ids[i]] <= tol, (e.logprobs[i], c.logprobs[i])
    assert math.isclose(e.logprobs[i].logprob, c.logprobs[i].logprob, abs_tol=tol), (e.logprobs[i], c.logprobs[i])


def _run(llm: LLM, prompts, n=6):
    params = SamplingParams(max_tokens=n, ignore_eos=True, logprobs=2)
    return llm.generate(prompts, params)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_compiled_layers_match_eager_and_do_not_recompile_per_layer(tiny_model_dir, quantization, monkeypatch):
    """Compiled segments between exit checks give the eager engine's first tokens and exit layers.
    int4 runs with the GEMM templates off (the graphs call the eager kernels): the tiny random model
    amplifies the template's other rounding past any tolerance from the first token on (the prompt
    graph runs the template too); the real-model test below pins the templates' answers."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from cluster.model.compile import TEMPLATES_ENV

    monkeypatch.setenv(TEMPLATES_ENV, "0" if quantization == "int4" else "1")
    torch._dynamo.reset()
    counters.clear()
    ec = ExitConfig(exit_layers=(1, 2), threshold=0.5, confidence="max_prob", head="shared")
    kw = dict(block_size=8, num_blocks=128, quantization=quantization, enable_prefix_caching=False)
    outs = {}
    for compiled in (False, True):
        llm = LLM(tiny_model_dir, early_exit=ec, torch_compile=compiled, **kw)
        try:
            # batch 1 (decode D == 1), then a batch of 4 (prefill, then decode D >= 2), twice
            outs[compiled] = [_run(llm, PROMPTS[:1]), _run(llm, PROMPTS), _run(llm, PROMPTS[::-1])]
            segments = llm.engine.workers.local.runner._decode_segments()
        finally:
            llm.shutdown()
    for eager_batch, compiled_batch in zip(outs[False], outs[True]):
        for e, c in zip(eager_batch, compiled_batch):
            # the first token is decided by one forward of the prompt: same argmax, logprob within tolerance
            _assert_same_token(e, c, _tol(quantization))
            assert e.exit_layers[0] == c.exit_layers[0]
    # graphs, all built at start-up: per segment (the whole decoder, and the segments between the exit
    # layers 1 and 2) and the head (final norm + LM head) D == 1 and D >= 2, and per segment one
    # prompt graph (any T); a per-layer or per-batch-size recompile would show up as more
    assert len(segments) == 4
    assert counters["stats"]["unique_graphs"] == 2 * (len(segments) + 1) + len(segments), dict(counters["stats"])


def _decode_graph_count(graphs, fn: str = "_segment") -> int:
    """Graphs Dynamo holds for a compiled function of ``graphs`` (one per guard set): the decode
    segments (``_segment``) or the prompt segments (``_prompts``)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(getattr(graphs, fn)._torchdynamo_orig_callable.__code__))


LONG = " ".join(["The history of bread goes back thousands of years, to the first farmers."] * 4)


@pytest.mark.parametrize("quantization,templates", [("none", True), ("int4", True), ("int4", False)],
                         ids=["none", "int4", "int4-aten-gemms"])
def test_compiled_decode_graphs_serve_every_batch_and_context_without_recompiling(tiny_model_dir, quantization,
                                                                                 templates, monkeypatch):
    """The full model's decode iterations run as compiled graphs (cluster.model.compile.DecodeGraphs),
    built at start-up for D == 1 and D >= 2: batches of 1, 3, 5 and 18
    rows whose contexts span one block (a short prompt) to many (a long one, growing across blocks
    while decoding) add no graph, and the
    answers match the eager engine's (first token equal or a near-tie, its logprob within the kernels'
    tolerance, :func:`_tol`; later
    tokens may part at a near-tie, so the run must agree on most of them).

    With the CPU's int4 GEMM templates (the default, ``int4``) the graphs' matmuls (the prompt
    graph's too) round differently from the eager kernel's, and the tiny random model (weights ~
    N(0, 1)) amplifies any difference past any tolerance from the first token on: there the graphs
    must still be built once and serve every batch; ``int4-aten-gemms`` (templates off: the graphs
    call the eager kernels) must agree, and the real model's test below pins the templates' answers."""
    import torch._dynamo

    from cluster.model.compile import TEMPLATES_ENV, decode_graphs

    monkeypatch.setenv(TEMPLATES_ENV, "1" if templates else "0")

    torch._dynamo.reset()
    kw = dict(block_size=8, num_blocks=256, quantization=quantization, enable_prefix_caching=False, early_exit=None)
    prompts = ["Hi", LONG, "List three rivers:", LONG + " And then?", "Chess"]
    many = [f"{p} ({i})" for i, p in enumerate(prompts * 4)][:18]
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
    outs = {}
    for compiled in (False, True):
        llm = LLM(tiny_model_dir, torch_compile=compiled, **kw)
        try:
            runner = llm.engine.workers.local.runner
            graphs = decode_graphs(runner.model)
            assert (graphs is not None) == compiled
            built = 2  # the whole decoder: D == 1 and D >= 2
            if compiled:
                assert _decode_graph_count(graphs) == built
                calls = []
                run = graphs.run
                graphs.run = lambda *a: calls.append(a[0].shape[0]) or run(*a)
            outs[compiled] = [llm.generate(prompts[:1], params), llm.generate(prompts[:3], params),
                              llm.generate(prompts, params), llm.generate(many, params)]
            if compiled:
                assert _decode_graph_count(graphs) == built
                assert {1, 3, 5, 18} <= set(calls), sorted(set(calls))
        finally:
            llm.shutdown()
    if quantization == "int4" and templates:  # rounding amplified from the first token on (docstring)
        return
    agree = total = 0
    for eager_batch, compiled_batch in zip(outs[False], outs[True]):
        for e, c in zip(eager_batch, compiled_batch):
            _assert_same_token(e, c, _tol(quantization))
            agree += sum(a == b for a, b in zip(e.token_ids, c.token_ids))
            total += len(e.token_ids)
    assert agree >= 0.8 * total, (agree, total)


def test_prompt_graph_serves_every_prefill_and_a_prompts_answer_does_not_depend_on_how_it_was_split(tiny_model_dir):
    """Iterations with prompt tokens (whole prompts, chunks of a long one beside decode rows) run as
    the compiled prompt graph (``DecodeGraphs.run_prompts``: the int4 GEMMs as Inductor's template,
    the paged attention as one opaque operator), built once at start-up for any token count (one
    token padded to two).
    The same request twice gives the same greedy tokens although the second one's prefill is split
    differently (the first chunked by ``max_num_batched_tokens``, the second only a tail after a
    prefix-cache hit): the template's rows do not depend on the row count (``dense_prefill``'s dense
    GEMMs did, and changed the answer to a repeated request). Requests run alone here: decode rows
    of ``D == 1`` and ``D >= 2`` use different micro-kernels (module docstring of
    :mod:`cluster.model.compile`)."""
    import torch._dynamo

    from cluster.model.compile import decode_graphs

    torch._dynamo.reset()
    llm = LLM(tiny_model_dir, torch_compile=True, quantization="int4", block_size=8, num_blocks=256,
              early_exit=None, enable_prefix_caching=True, max_num_batched_tokens=48)
    try:
        graphs = decode_graphs(llm.engine.workers.local.runner.model)
        assert _decode_graph_count(graphs, "_prompts") == 1  # the whole decoder, any T
        calls = []
        run = graphs.run_prompts
        graphs.run_prompts = lambda *a: calls.append((a[0].shape[0], a[2].num_decodes)) or run(*a)
        prompts = ["Hi there", LONG, "List three rivers:", LONG + " And then?", "Chess 🎲 and 象棋"]
        params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=1)
        llm.generate(prompts[::-1], params)  # batched: chunks of the long prompts beside decode rows
        assert any(d for _, d in calls), calls
        for i, p in enumerate(prompts):  # a new first token: the first request finds nothing cached
            first, second = (llm.generate([f"{i}. {p}"], params)[0] for _ in range(2))
            if len(first.prompt_token_ids) > 8:  # a full block (8 tokens) to cache
                assert second.num_cached_tokens > first.num_cached_tokens, p
            assert second.token_ids == first.token_ids, p
            assert [t.logprob for t in second.logprobs] == [t.logprob for t in first.logprobs], p  # bitwise
        assert _decode_graph_count(graphs, "_prompts") == 1
        assert len({t for t, _ in calls}) >= 6, calls  # token counts served by the one graph
    finally:
        llm.shutdown()


REAL_PROMPTS = ["What is the capital of France?", "Écris une phrase sur la mer.", "用一句话介绍长城。",
                "Give me three emoji for a birthday 🎂 and say why.", "Explain what a KV cache is.",
                "List two rivers in Africa.", "Write a haiku about bread.", "What is 12 times 7?"]


@pytest.mark.timeout(900)
def test_default_int4_compiled_engine_keeps_the_eager_engines_choices_on_the_real_model(default_model_dir):
    """The default engine on the CPU (int4 GGUF, compiled decode graphs with Inductor's int4 / int8
    GEMM templates) against the eager engine on SmolLM2-135M, greedy, teacher-forced: the eager
    engine scores every prefix of the compiled run's answers (one prefill each), and each token the
    compiled run chose must be among the eager engine's top 5 there, within two bfloat16 steps at
    |logit| 8-16 (1/4) of the eager pick; most free-running tokens agree too (a near-tie may part a
    continuation: measured 184 of 216 tokens over 18 chat prompts, with 2 picks one bfloat16 step
    from the eager pick, against 3 for the eager engine scoring its own answers)."""
    kw = dict(quantization="int4", early_exit=None, enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
    compiled = LLM(default_model_dir, torch_compile=True, **kw)
    try:
        chat = [compiled.apply_chat_template([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
        outs = compiled.generate(chat, params)
    finally:
        compiled.shutdown()
    eager = LLM(default_model_dir, torch_compile=False, **kw)
    try:
        eager_outs = eager.generate(chat, params)
        prefixes = [o.prompt_token_ids + o.token_ids[:i] for o in outs for i in range(len(o.token_ids))]
        scores = eager.generate(prefixes, SamplingParams(max_tokens=1, logprobs=5))
    finally:
        eager.shutdown()
    chosen = [t for o in outs for t in o.token_ids]
    for prefix, score, token in zip(prefixes, scores, chosen):
        top = dict(score.logprobs[0].top)
        assert token in top, (prefix[-8:], token, score.logprobs[0])
        assert score.logprobs[0].top[0][1] - top[token] <= 0.25, (prefix[-8:], token, score.logprobs[0])
    agree = sum(a == b for o, e in zip(outs, eager_outs) for a, b in zip(o.token_ids, e.token_ids))
    assert agree >= 0.7 * len(chosen), (agree, len(chosen))


def test_compiled_layer_skip_drafts_and_verifies_in_graphs(damped_model_dir):
    """A ``layer_skip`` default mode compiles its kept-layer runs at start-up: drafts run them as
    compiled segments (layers 1-2 and 6 of the damped model, skipping 3-5), the verification the whole
    decoder; the answers stay the full model's under the same compiled graphs (most tokens equal:
    graphs of different batch shapes may part at a near-tie) and most drafts are accepted."""
    import torch._dynamo

    from cluster.model.compile import decode_graphs
    from tests.test_spec_decode import PROMPTS, exits, make_llm, request, run, spec_totals

    torch._dynamo.reset()
    ec = exits(mode="layer_skip", skip_layers=(3, 4, 5))
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    outs = {}
    for mode in ("full", "layer_skip"):
        llm = make_llm(damped_model_dir, ec if mode == "layer_skip" else None, torch_compile=True)
        try:
            graphs = decode_graphs(llm.engine.workers.local.runner.model)
            if mode == "layer_skip":
                assert graphs.ready == {(0, 6), (0, 2), (5, 6)}, graphs.ready
            segments = []
            run_ = graphs.run
            graphs.run = lambda *a: segments.append(a[-2:]) or run_(*a)
            outs[mode] = [run(llm, [request(llm, p, params)])[0] for p in PROMPTS[:3]]
            assert (0, 6) in segments
            if mode == "layer_skip":
                assert {(0, 2), (5, 6)} <= set(segments), set(segments)
                acc, _ = spec_totals(outs[mode])
                assert acc > 0.5, acc
                # online skip selection reads every layer's state from its verifications: they run the
                # same whole-decoder graph as the full model (an eager verification would part from
                # the full model's answer at near-ties), the states coming out of the graph
                events = []
                graphs.run = lambda *a: events.append(a[-2:]) or run_(*a)
                spec = llm.engine.workers.local.runner.spec_decoder
                reselect = spec.reselect
                spec.reselect = lambda captured: events.append(("reselect", captured.shape[0])) or reselect(captured)
                online = [run(llm, [request(llm, p, params, exit_mode="layer_skip", skip_selection="online")])[0]
                          for p in PROMPTS[:3]]
                picks = [i for i, e in enumerate(events) if e[0] == "reselect"]
                assert picks and all(events[i - 1] == (0, 6) and events[i] == ("reselect", 7) for i in picks), events
                pairs = [(a, b) for f, o in zip(outs["full"], online) for a, b in zip(f.token_ids, o.token_ids)]
                assert sum(a == b for a, b in pairs) >= 0.8 * len(pairs)
        finally:
            llm.shutdown()
    pairs = [(a, b) for f, s in zip(outs["full"], outs["layer_skip"]) for a, b in zip(f.token_ids, s.token_ids)]
    assert sum(a == b for a, b in pairs) >= 0.8 * len(pairs)


_CHILD = """
import sys, torch
from cluster.model.compile import frozen_weights, inductor_options, weights_fingerprint
from cluster.model.layers.quant import QuantizedWeight
torch.manual_seed(int(sys.argv[1]))
head = QuantizedWeight.from_float(torch.randn(4096, 64), "int8", 32).eval()
graph = torch.compile(lambda x: head(x).float(), dynamic=True, options=inductor_options(torch.device("cpu")))
with torch.inference_mode(), frozen_weights(weights_fingerprint(head)):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    print((graph(x) - head(x).float()).abs().max().item() / head(x).float().abs().max().item())
"""


def test_frozen_graphs_of_two_weight_sets_with_the_same_shapes_keep_their_own_weights(tmp_path):
    """Two processes compile the same int8 matmul over different weights (seeds 1, then 2 twice) with
    the decode graphs' options and one shared Inductor cache: each one's graph computes with its own
    weights. The CPU's graphs freeze the weights into the compiled code and Inductor's FX graph cache
    does not key on them: without the weights' digest in the key (``frozen_weights`` /
    ``weights_fingerprint``, as ``DecodeGraphs`` calls its graphs) the second process loaded the
    first one's graph (relative error 1.43 measured) - a fine-tune of the same shapes would have
    answered with the base model's weights."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    for seed in (1, 2, 2):
        res = subprocess.run([sys.executable, "-c", _CHILD, str(seed)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert float(res.stdout.strip().splitlines()[-1]) < 0.02, (seed, res.stdout[-500:])
