"""Engine behaviour on a tiny random Llama: the paper's rules, paged KV cache, scheduler, errors."""
import collections

import pytest
import torch

from cluster import LLM, ExitConfig, SamplingParams
from cluster.engine.engine import LLMEngine

pytestmark = pytest.mark.timeout(300)

PROMPTS = [f"Once upon a time in city number {i}, a traveller" + " and then" * i for i in range(10)]
EE = ExitConfig(exit_layers=(1, 2, 3, 4, 5), threshold=0.6)


@pytest.fixture(scope="module")
def llm_ee(tiny_model_dir):
    llm = LLM(tiny_model_dir, early_exit=EE, block_size=4)
    yield llm
    llm.shutdown()


def greedy(n=20, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


@pytest.mark.parametrize("policy", ["paper", "per_sequence"])
def test_batched_equals_alone_with_early_exit(tiny_model_dir, policy):
    llm = LLM(tiny_model_dir, early_exit=ExitConfig(exit_layers=EE.exit_layers, threshold=EE.threshold,
                                                     policy=policy), block_size=4)
    batched = llm.generate(PROMPTS, greedy())
    alone = [llm.generate(p, greedy())[0] for p in PROMPTS]
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids
        assert b.exit_layers == a.exit_layers
    counts = collections.Counter(l for o in batched for l in o.exit_layers)
    assert len(counts) >= 3, f"exits should happen at several layers, got {counts}"
    assert counts[6] < sum(counts.values()), "some tokens must exit early"
    llm.engine.check_integrity()


def test_policies_agree(tiny_model_dir, llm_ee):
    per_seq = LLM(tiny_model_dir, early_exit=ExitConfig(exit_layers=EE.exit_layers, threshold=EE.threshold,
                                                         policy="per_sequence"), block_size=4)
    a = per_seq.generate(PROMPTS, greedy())
    b = llm_ee.generate(PROMPTS, greedy())
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_first_token_and_prefill_run_full_depth(llm_ee):
    out = llm_ee.generate(PROMPTS[0], greedy(8))[0]
    assert out.exit_layers[0] == 6  # sampled from the prompt's last token: full depth
    assert len(out.exit_layers) == len(out.token_ids) == 8


def test_kv_fill_matches_exit_hidden_state(tiny_model_dir):
    """After a token exits at layer l, cache entries of layers > l equal K/V of its exit hidden state."""
    llm = LLM(tiny_model_dir, early_exit=ExitConfig(exit_layers=(2,), threshold=0.0), block_size=4,
              enable_prefix_caching=False)
    eng: LLMEngine = llm.engine
    runner = eng.workers.local.runner
    model = runner.model
    captured = {}
    hook = model.model.layers[1].register_forward_hook(lambda m, args, out: captured.__setitem__("h", out.clone()))
    llm.add_request(PROMPTS[3], greedy(3), request_id="r")
    while True:  # run until the request has one decode token done (exits at layer 2 by threshold 0)
        outs = eng.step()
        if outs and outs[0].num_output_tokens == 2:
            break
    hook.remove()
    req = eng.scheduler.get_request("r")
    assert req.exit_layers[1] == 2
    pos = req.num_computed_tokens - 1  # the decode token just computed
    table = eng.scheduler.block_manager.get_block_table("r")
    slot = table[pos // 4] * 4 + pos % 4
    h_exit = captured["h"][0:1]  # decode rows come first: the single decode token
    positions = torch.tensor([pos])
    with torch.inference_mode():
        for i in range(2, 6):
            layer = model.model.layers[i]
            k, v = layer.self_attn.project_kv(layer.input_layernorm(h_exit), positions)
            kc, vc = runner.kv_caches[i]
            flat_k = kc.view(-1, *kc.shape[2:])[slot]
            flat_v = vc.view(-1, *vc.shape[2:])[slot]
            torch.testing.assert_close(flat_k, k[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(flat_v, v[0], rtol=1e-5, atol=1e-5)
        # and layers <= l hold the token's own (non-filled) K/V: layer 1 differs from a fill from h_exit
        layer = model.model.layers[0]
        k0, _ = layer.self_attn.project_kv(layer.input_layernorm(h_exit), positions)
        assert not torch.allclose(runner.kv_caches[0][0].view(-1, *k0.shape[1:])[slot], k0[0])
    eng.abort_request("r")
    eng.check_integrity()


def test_prefix_caching_reuses_blocks_and_keeps_output(tiny_model_dir):
    prefix = "You are a helpful assistant. " * 12
    prompts = [prefix + "Tell me about cats.", prefix + "Tell me about dogs."]
    results = {}
    for caching in (True, False):
        llm = LLM(tiny_model_dir, early_exit=EE, block_size=4, enable_prefix_caching=caching)
        first = llm.generate(prompts[0], greedy(12))[0]
        second = llm.generate(prompts[1], greedy(12))[0]
        bm = llm.engine.scheduler.block_manager
        results[caching] = (first.token_ids, second.token_ids, second.num_cached_tokens, bm.prefix_cache_hits)
        llm.engine.check_integrity()
    hits_on = results[True]
    assert hits_on[2] >= 40 and hits_on[3] >= 10, f"expected cached prefix blocks, got {hits_on[2:]}"
    assert results[False][2] == 0
    assert results[True][:2] == results[False][:2]


def test_continuous_batching_admits_midflight(tiny_model_dir):
    llm = LLM(tiny_model_dir, early_exit=EE, block_size=4)
    eng = llm.engine
    tokens = {"a": [], "b": []}

    def step():
        for o in eng.step():
            tokens[o.request_id] += o.new_token_ids

    llm.add_request(PROMPTS[0], greedy(30), request_id="a")
    for _ in range(5):
        step()
    assert eng.scheduler.num_running == 1
    llm.add_request(PROMPTS[1], greedy(5), request_id="b")
    step()
    assert eng.scheduler.num_running == 2  # joined between iterations while "a" is mid-decode
    while eng.has_unfinished_requests():
        for o in eng.step():
            tokens[o.request_id] += o.new_token_ids
    assert len(tokens["a"]) == 30 and len(tokens["b"]) == 5
    assert tokens["b"] == llm.generate(PROMPTS[1], greedy(5))[0].token_ids
    eng.check_integrity()


def test_preemption_completes_every_request_without_leaks(tiny_model_dir):
    # 24 blocks x 4 tokens cannot hold 8 sequences of ~40 tokens at once: preemption by recompute
    llm = LLM(tiny_model_dir, early_exit=EE, block_size=4, num_blocks=24)
    outs = llm.generate(PROMPTS[:8], greedy(24))
    assert all(len(o.token_ids) == 24 and o.finish_reason == "length" for o in outs)
    assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.scheduler.block_manager
    bm.check_integrity()
    assert bm.usage == 0.0


def test_abort_frees_blocks(llm_ee):
    eng = llm_ee.engine
    llm_ee.add_request(PROMPTS[2], greedy(50), request_id="x")
    llm_ee.add_request(PROMPTS[3], greedy(50), request_id="y")
    for _ in range(4):
        eng.step()
    eng.abort_request(["x", "y"])
    eng.step()
    assert not eng.has_unfinished_requests()
    eng.check_integrity()
    assert eng.scheduler.block_manager.usage == 0.0


def test_sampling_seed_stop_and_finish_reasons(llm_ee):
    p = SamplingParams(max_tokens=16, temperature=0.8, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    a, b = llm_ee.generate([PROMPTS[0], PROMPTS[0]], [p, p])
    assert a.token_ids == b.token_ids  # same seed, same tokens, even in one batch
    base = llm_ee.generate(PROMPTS[0], greedy(16))[0]
    # a token first produced at full depth (stop tokens only come from the full model, test_stop_tokens_only_at_full_depth)
    j = next(j for j, (t, l) in enumerate(zip(base.token_ids, base.exit_layers))
             if l == base.num_layers and base.token_ids.index(t) == j)
    stop_tok = base.token_ids[j]
    o = llm_ee.generate(PROMPTS[0], greedy(16, stop_token_ids=[stop_tok]))[0]
    assert o.finish_reason == "stop" and o.token_ids[-1] == stop_tok
    assert len(o.token_ids) == base.token_ids.index(stop_tok) + 1
    word = base.text[len(base.text) // 2:][:3]
    if word.strip():
        o = llm_ee.generate(PROMPTS[0], greedy(16, stop=[word]))[0]
        assert o.finish_reason == "stop" and word not in o.text
    assert base.finish_reason == "length"


@pytest.mark.parametrize("policy", ["paper", "per_sequence"])
def test_stop_tokens_only_at_full_depth(tiny_model_dir, policy):
    """Issue 9: a row whose exit argmax is EOS or a stop token keeps computing: every stop token the
    lossy policies emit comes from the last layer, and their other tokens are unchanged."""
    llm = LLM(tiny_model_dir, early_exit=ExitConfig(exit_layers=(1, 2, 3, 4, 5), threshold=0.0, policy=policy),
              block_size=4)
    try:
        base = llm.generate(PROMPTS[:4], greedy(12))
        for b, prompt in zip(base, PROMPTS):
            assert min(b.exit_layers) < b.num_layers  # threshold 0: exits happen
            stop_tok = b.token_ids[2]  # an early-exit token
            o = llm.generate(prompt, greedy(12, stop_token_ids=[stop_tok]))[0]
            for t, layer in zip(o.token_ids, o.exit_layers):
                if t == stop_tok:
                    assert layer == o.num_layers
            # up to the first place where the exit would have emitted the stop token, nothing changed
            k = b.token_ids.index(stop_tok)
            assert o.token_ids[:k] == b.token_ids[:k]
            assert b.exit_layers[k] < b.num_layers  # base: the stop token came from an exit ...
            assert o.exit_layers[k] == o.num_layers  # ... so this row was re-run to the last layer
        llm.engine.check_integrity()
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        SamplingParams(**kwargs)


def test_bad_prompts_leave_engine_intact(llm_ee, tmp_path):
    with pytest.raises(ValueError, match="prompt"):
        llm_ee.generate("", greedy())
    with pytest.raises(ValueError, match="prompt"):
        llm_ee.generate([PROMPTS[0], "word " * 600], greedy())  # second one is longer than the context (512)
    llm_ee.engine.check_integrity()
    assert not llm_ee.engine.has_unfinished_requests()
    assert len(llm_ee.generate(PROMPTS[0], greedy(4))[0].token_ids) == 4
    with pytest.raises(FileNotFoundError, match="model"):
        LLM(str(tmp_path / "nope"))


def test_gguf_of_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture"):
        LLM(str(path))
