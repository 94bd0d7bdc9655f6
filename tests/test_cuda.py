"""GPU tests: ``python -m pytest -m cuda`` on a CUDA machine; skipped elsewhere.

Written without a GPU (none was available): they have not run on real hardware yet. The CPU guards
of the same code paths are in ``tests/test_device.py``.
"""
from __future__ import annotations

import collections
import warnings

import pytest
import torch

from cluster import LLM, ExitConfig, SamplingParams
from test_engine import EE, PROMPTS, greedy
from test_hf_equivalence import _ids

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(900),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = dict(device="cuda", dtype="float32")


def hf_greedy_cuda(model_dir: str, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda").eval()
    outs = []
    for ids in prompt_ids:
        x = torch.tensor([ids], device="cuda")
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    del model
    torch.cuda.empty_cache()
    return outs


def test_default_model_matches_hf_float32(default_model_dir):
    ids = _ids(default_model_dir)
    llm = LLM(default_model_dir, early_exit=None, num_blocks=256, **CUDA)
    try:
        assert llm.engine.workers.local.runner.kv_caches[0].device.type == "cuda"
        outs = llm.generate(ids, SamplingParams(max_tokens=32, ignore_eos=True))
        ours = [o.token_ids for o in outs]
        assert all(o.exit_layers == [llm.engine.model_config.num_layers] * 32 for o in outs)
    finally:
        llm.shutdown()
    assert ours == hf_greedy_cuda(default_model_dir, ids, 32)


@pytest.mark.parametrize("policy", ["paper", "per_sequence"])
def test_early_exit_batch_invariance(tiny_model_dir, policy):
    llm = LLM(tiny_model_dir, early_exit=ExitConfig(exit_layers=EE.exit_layers, threshold=EE.threshold,
                                                     policy=policy), block_size=4, num_blocks=1024, **CUDA)
    try:
        batched = llm.generate(PROMPTS, greedy())
        alone = [llm.generate(p, greedy())[0] for p in PROMPTS]
        for b, a in zip(batched, alone):
            assert b.token_ids == a.token_ids
            assert b.exit_layers == a.exit_layers
        counts = collections.Counter(l for o in batched for l in o.exit_layers)
        assert len(counts) >= 3, f"exits should happen at several layers, got {counts}"
        llm.engine.check_integrity()
    finally:
        llm.shutdown()


def test_seeded_sampling_reproducible(tiny_model_dir):
    p = SamplingParams(max_tokens=16, temperature=0.8, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(tiny_model_dir, early_exit=EE, block_size=4, num_blocks=1024, dtype="bfloat16", device="cuda")
        try:
            a, b, c = llm.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1]], [p, p, greedy(16)])
            assert a.token_ids == b.token_ids  # same seed, same tokens, even in one batch
            runs.append((a.token_ids, c.token_ids))
        finally:
            llm.shutdown()
    assert runs[0] == runs[1]  # and the same in a fresh engine


def test_kv_cache_sized_from_gpu_memory(tiny_model_dir):
    free, total = torch.cuda.mem_get_info()
    llm = LLM(tiny_model_dir, early_exit=EE, gpu_memory_utilization=0.3, device="cuda")
    try:
        rep = llm.engine.memory_report
        assert rep.total_bytes == total and rep.num_blocks == llm.engine.num_blocks > 0
        assert rep.weights_bytes + rep.activation_peak_bytes + rep.kv_cache_bytes <= 0.3 * total
        assert llm.engine.model_config.dtype == "bfloat16"  # dtype "auto" on CUDA
        assert len(llm.generate(PROMPTS[0], greedy(8))[0].token_ids) == 8
    finally:
        llm.shutdown()


@pytest.mark.parametrize("early_exit", [None, EE], ids=["full", "early_exit"])
def test_decode_host_syncs(tiny_model_dir, early_exit):
    """CUDA's own sync detector (``torch.cuda.set_sync_debug_mode``) over one decode iteration's
    ``execute_model``: at most one sync per exit layer checked plus one for the sampled tokens."""
    llm = LLM(tiny_model_dir, early_exit=early_exit, block_size=4, num_blocks=1024, **CUDA)
    runner = llm.engine.workers.local.runner
    execute, forward, seen, checks = runner.execute_model, runner.forward, [], []

    def fwd(so):
        r = forward(so)
        checks.append(r.num_checks)
        return r

    def counted(so):
        if not (so.scheduled and all(sr.exit_eligible for sr in so.scheduled)):
            return execute(so)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = execute(so)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        seen.append((sum("synchroniz" in str(x.message) for x in w), checks[-1]))
        return out

    runner.execute_model, runner.forward = counted, fwd
    try:
        llm.generate(PROMPTS[:4], greedy(10))
    finally:
        llm.shutdown()
    assert seen
    for syncs, n in seen:
        assert syncs <= n + 1, seen


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("early_exit", [None, ExitConfig(exit_layers=(2, 4), threshold=0.6, confidence="top2_margin",
                                                         policy="per_sequence")], ids=["full", "early_exit"])
def test_tensor_parallel_2_nccl_matches_1(ray_session, tiny_model_dir, early_exit):
    def run(tp):
        llm = LLM(tiny_model_dir, tensor_parallel_size=tp, early_exit=early_exit, block_size=4, num_blocks=512, **CUDA)
        try:
            outs = llm.generate(PROMPTS[:4], greedy(24))
            return [(o.token_ids, o.exit_layers) for o in outs]
        finally:
            llm.shutdown()

    assert run(2) == run(1)


@pytest.mark.parametrize("mode", ["verified", "self_speculative", "layer_skip"])
def test_lossless_modes_equal_full_model(damped_model_dir, mode):
    """Every lossless mode on CUDA, alone and in one batch with the other modes, a lossy request and a
    full-model request: greedy tokens equal the full model's on CUDA, drafts are accepted, and every
    KV block comes back (the drafting passes, rollback and the packer on the device)."""
    from cluster.engine.protocol import EngineRequest
    from test_spec_decode import PROMPTS as SPEC_PROMPTS, exits, run, spec_totals

    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    full = LLM(damped_model_dir, early_exit=None, block_size=4, num_blocks=512, **CUDA)
    try:
        ref = [o.token_ids for o in full.generate(SPEC_PROMPTS[:5], sp)]
    finally:
        full.shutdown()
    llm = LLM(damped_model_dir, early_exit=exits(mode=mode, skip_layers=(3, 4, 5)), block_size=4, num_blocks=512,
              **CUDA)
    try:
        ids = [llm.processor.tokenize(p) for p in SPEC_PROMPTS[:5]]
        alone = run(llm, [EngineRequest(request_id=f"{mode}-alone", prompt_token_ids=ids[0], sampling_params=sp)])
        assert alone[0].token_ids == ref[0]
        kinds = [dict(exit_mode=mode), dict(early_exit=False), dict(exit_mode="paper", exit_threshold=1.0),
                 dict(exit_mode="verified"), dict(exit_mode="layer_skip")]
        mixed = run(llm, [EngineRequest(request_id=f"{mode}-mixed-{i}", prompt_token_ids=ids[i], sampling_params=sp,
                                        **kw) for i, kw in enumerate(kinds)])
        assert [o.token_ids for o in mixed] == ref
        acc, tpv = spec_totals(alone + [mixed[0]])
        assert acc > 0.3 and tpv > 1.5, (acc, tpv)
        llm.engine.check_integrity()
        assert llm.engine.scheduler.block_manager.usage == 0.0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_compiled_layers_match_eager(tiny_model_dir, quantization):
    """``torch_compile=True`` on CUDA (Inductor's Triton kernels): the same greedy tokens as eager with
    early exit on, logprobs within float tolerance."""
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=1)
    outs = {}
    for compiled in (False, True):
        llm = LLM(tiny_model_dir, early_exit=EE, block_size=4, num_blocks=512, torch_compile=compiled,
                  quantization=quantization, device="cuda", dtype="bfloat16" if quantization == "int4" else "float32")
        try:
            outs[compiled] = llm.generate(PROMPTS[:4], params)
        finally:
            llm.shutdown()
    for e, c in zip(outs[False], outs[True]):
        assert e.token_ids == c.token_ids
        assert e.exit_layers == c.exit_layers
