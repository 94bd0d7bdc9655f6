"""torch_compile=True: the decoder layers' dense halves through torch.compile (cluster.model.compile).

The compiled engine must give the eager engine's answers (logprobs within float tolerance; Inductor
reorders float ops, so exact bits are not promised) with early exit on and off, and must not
recompile per layer or per batch size (one graph per shape class, shared by every layer).
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
            # batch 1 (decode T == 1), then a batch of 4 (prefill and decode T >= 2), twice
            outs[compiled] = [_run(llm, PROMPTS[:1]), _run(llm, PROMPTS), _run(llm, PROMPTS[::-1])]
        finally:
            llm.shutdown()
    for eager_batch, compiled_batch in zip(outs[False], outs[True]):
        for e, c in zip(eager_batch, compiled_batch):
            # the first token is decided by one forward of the prompt: same argmax, logprob within tolerance
            assert e.token_ids[0] == c.token_ids[0]
            assert math.isclose(e.logprobs[0].logprob, c.logprobs[0].logprob, abs_tol=1e-2)
            assert e.exit_layers[0] == c.exit_layers[0]
    # graphs: attn_in and attn_out, each for T == 1, T >= 2 (and one more attention-output layout);
    # a per-layer or per-batch-size recompile would show up as dozens
    assert 2 <= counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])
