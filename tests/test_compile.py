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


def _run(llm: LLM, prompts, n=6):
    params = SamplingParams(max_tokens=n, ignore_eos=True, logprobs=1)
    return llm.generate(prompts, params)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_compiled_layers_match_eager_and_do_not_recompile_per_layer(tiny_model_dir, quantization):
    import torch._dynamo
    from torch._dynamo.utils import counters

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
            assert e.token_ids[0] == c.token_ids[0]
            assert math.isclose(e.logprobs[0].logprob, c.logprobs[0].logprob, abs_tol=1e-2)
            assert e.exit_layers[0] == c.exit_layers[0]
    # graphs, all built at start-up: per segment (the whole decoder, and the segments between the exit
    # layers 1 and 2) D == 1 and D >= 2; a per-layer or per-batch-size recompile would show up as more
    assert len(segments) == 4
    assert counters["stats"]["unique_graphs"] == 2 * len(segments), dict(counters["stats"])


def _decode_graph_count(graphs) -> int:
    """Graphs Dynamo holds for the decode-segment function (one per guard set)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(graphs._segment._torchdynamo_orig_callable.__code__))


LONG = " ".join(["The history of bread goes back thousands of years, to the first farmers."] * 4)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_compiled_decode_graphs_serve_every_batch_and_context_without_recompiling(tiny_model_dir, quantization):
    """The full model's decode iterations run as compiled graphs (cluster.model.compile.DecodeGraphs),
    built at start-up for D == 1 and D >= 2: batches of 1, 3, 5 and 18
    rows whose contexts span one block (a short prompt) to many (a long one, growing across blocks
    while decoding) add no graph, and the
    answers match the eager engine's (first token equal, its logprob within float tolerance; later
    tokens may part at a near-tie, so the run must agree on most of them)."""
    import torch._dynamo

    from cluster.model.compile import decode_graphs

    torch._dynamo.reset()
    kw = dict(block_size=8, num_blocks=256, quantization=quantization, enable_prefix_caching=False, early_exit=None)
    prompts = ["Hi", LONG, "List three rivers:", LONG + " And then?", "Chess"]
    many = [f"{p} ({i})" for i, p in enumerate(prompts * 4)][:18]
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1)
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
    agree = total = 0
    for eager_batch, compiled_batch in zip(outs[False], outs[True]):
        for e, c in zip(eager_batch, compiled_batch):
            assert e.token_ids[0] == c.token_ids[0]
            assert math.isclose(e.logprobs[0].logprob, c.logprobs[0].logprob, abs_tol=1e-2)
            agree += sum(a == b for a, b in zip(e.token_ids, c.token_ids))
            total += len(e.token_ids)
    assert agree >= 0.8 * total, (agree, total)


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
