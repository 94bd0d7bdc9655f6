"""Weight-only int8 / int4 linear layers (cluster/model/layers/quant.py) and quantized engines.

Tolerances (relative max-abs error of ``y = x @ W.T``, bfloat16 activations inside the kernels):
* kernel vs ``dequantize(quantize(W)) @ x`` in float32: int8 <= 2e-2, int4 <= 2e-2 (bfloat16
  rounding of the activations and of the output only);
* kernel vs the float ``W @ x``: int8 <= 3e-2, int4 <= 0.25 (the quantization error itself; random
  Gaussian weights, int4 groups of 32-64).
"""
import pytest
import torch

from cluster import LLM, ExitConfig, SamplingParams
from cluster.config import ModelConfig
from cluster.model.layers.quant import (QuantizedWeight, dequantize_int4, dequantize_int8, int4_group_size,
                                        quantize_int4, quantize_int8, quantize_model)

pytestmark = pytest.mark.timeout(600)

PROMPTS = ["The history of the Roman Empire", "def fibonacci(n):", "Three tips for staying healthy are"]
EE = ExitConfig(exit_layers=(2, 4), threshold=0.8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("m", [1, 16])
def test_quantized_linear_matches_float_reference(method, group, m):
    torch.manual_seed(0)
    n, k = 200, 256
    w, x = torch.randn(n, k), torch.randn(m, k)
    qw = QuantizedWeight.from_float(w, method, group or 64)
    y = qw(x)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    if method == "int8":
        q, s = quantize_int8(w)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
        deq = dequantize_int8(q, s)
        tight, loose = 2e-2, 3e-2
    else:
        assert qw.group_size == group
        q, s, z = quantize_int4(w, group)
        assert int(q.min()) >= 0 and int(q.max()) <= 15
        deq = dequantize_int4(q, s, z, group)
        tight, loose = 2e-2, 0.25
    assert rel_err(deq, w) < (0.01 if method == "int8" else 0.2)
    assert rel_err(y, x @ deq.t()) < tight  # the kernel multiplies by exactly dequantize(quantize(W))
    assert rel_err(y, x @ w.t()) < loose
    assert rel_err(qw.dequantize(), deq) < 1e-2
    # leading dimensions and bfloat16 callers
    assert qw(x.view(m, 1, k)).shape == (m, 1, n)
    assert qw(x.bfloat16()).dtype == torch.bfloat16


def test_int4_group_size_choice_and_errors():
    assert int4_group_size(576, 128) == 64 and int4_group_size(1536, 128) == 128
    assert int4_group_size(1536, 64) == 64 and int4_group_size(96, 128) == 32
    with pytest.raises(ValueError, match="divisible by 32"):
        int4_group_size(48, 64)
    with pytest.raises(ValueError, match="quantization"):
        QuantizedWeight.from_float(torch.randn(4, 64), "int2")
    with pytest.raises(ValueError, match="quantization"):
        quantize_model(torch.nn.Linear(2, 2), "fp8")


def _build(model_dir: str, quantization: str):
    from cluster.model.loader import build_model, load_hf_config

    mc = ModelConfig.from_hf_config(load_hf_config(model_dir), quantization=quantization, quant_group_size=32)
    return build_model(model_dir, mc)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_every_linear_and_lm_head_quantized(tiny_model_dir, method):
    from cluster.model.layers.quant import QuantizableLinear

    ref, model = _build(tiny_model_dir, "none"), _build(tiny_model_dir, method)
    linears = [m for m in model.modules() if isinstance(m, QuantizableLinear)]
    assert len(linears) == 4 * model.config.num_layers + 1  # qkv, o, gate_up, down per layer + LM head
    for mod in linears:  # the LM head stays int8 under int4 (LM_HEAD_METHOD)
        assert mod.quantized is not None and mod.quantized.method == ("int8" if mod is model.lm_head else method)
    # tied LM head: the embedding keeps its float weight, the head has its own quantized copy
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].mlp.down_proj.weight is None  # float shard dropped
    h = torch.randn(5, model.config.hidden_size)
    tol = 3e-2 if method == "int8" else 0.3
    assert rel_err(model.final_local_logits(h), ref.final_local_logits(h)) < 3e-2  # int8 head either way
    layer, ref_layer = model.model.layers[0].self_attn.qkv_proj, ref.model.layers[0].self_attn.qkv_proj
    x = torch.randn(3, model.config.hidden_size)
    for a, b in zip(layer.kv_only(x), ref_layer.kv_only(x)):
        assert rel_err(a, b) < tol
    # kv_only equals the K/V columns of the full quantized projection
    full = layer(x)[:, layer.q_size:]
    assert rel_err(torch.cat(layer.kv_only(x), dim=-1), full) < 1e-2


def _generate(llm, n=3, max_tokens=16):
    outs = llm.generate(PROMPTS[:n], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return [o.token_ids for o in outs], [o.exit_layers for o in outs]


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("early_exit", [None, EE], ids=["full", "early_exit"])
def test_engine_end_to_end_deterministic(tiny_model_dir, method, early_exit):
    llm = LLM(tiny_model_dir, early_exit=early_exit, quantization=method, block_size=8, num_blocks=128)
    try:
        assert llm.engine.model_config.quantization == method
        tokens, exits = _generate(llm)
        assert all(len(t) == 16 for t in tokens)
        vocab = llm.engine.model_config.vocab_size
        assert all(0 <= t < vocab for ts in tokens for t in ts)
        assert all(1 <= e <= 6 for es in exits for e in es)
        assert _generate(llm) == (tokens, exits)  # same tokens twice
    finally:
        llm.shutdown()


def test_bad_quantization_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="quantization"):
        LLM(tiny_model_dir, quantization="int3")


def test_serve_args_and_cli_pass_quantization():
    from cluster.cli import build_parser
    from deployments.config import ServeArgs

    assert ServeArgs().engine_kwargs("cpu")["quantization"] == "auto"
    assert ServeArgs(quantization="int4").engine_kwargs("cpu")["quantization"] == "int4"
    with pytest.raises(ValueError):
        ServeArgs(quantization="int3")
    assert build_parser().parse_args(["generate", "hi", "--quantization", "int8"]).quantization == "int8"
    assert build_parser().parse_args(["generate", "hi"]).quantization == "auto"


def test_auto_quantization_keeps_the_checkpoints_precision(default_model_dir, tiny_model_dir):
    """auto: the Q4_1 default model runs int4 on the CPU (its own 4-bit weights), a float checkpoint
    runs none, CUDA runs none; explicit values pass through."""
    from cluster.engine.factory import resolve_quantization

    assert resolve_quantization("auto", default_model_dir, "cpu") == "int4"
    assert resolve_quantization("auto", default_model_dir, "cuda") == "none"
    assert resolve_quantization("auto", tiny_model_dir, "cpu") == "none"
    assert resolve_quantization("int8", default_model_dir, "cpu") == "int8"
    llm = LLM(tiny_model_dir, early_exit=None, num_blocks=64)
    try:
        assert llm.engine.model_config.quantization == "none"
    finally:
        llm.shutdown()


def _rank_model(monkeypatch, model_dir: str, rank: int, size: int):
    import cluster.distributed as dist

    monkeypatch.setattr(dist, "_STATE", dist.TPState(rank=rank, size=size))
    return _build(model_dir, "int4")


@pytest.mark.timeout(300)
def test_int4_tp2_shards_equal_slices_of_tp1(tiny_model_dir, monkeypatch):
    """Each TP-2 rank quantizes its own shard; with groups of 32 (dividing every shard's input width)
    that is exactly the matching slice of the TP-1 quantized weight, for every layer and the LM head."""
    assert_int4_tp2_shards_are_slices(tiny_model_dir, monkeypatch)


def assert_int4_tp2_shards_are_slices(model_dir: str, monkeypatch) -> None:
    """Every layer's int4 (LM head: int8) weight on each rank of TP 2 equals, bit for bit (dequantized
    through the kernel), the matching rows / input columns of TP 1's."""
    full = _rank_model(monkeypatch, model_dir, 0, 1)
    ranks = [_rank_model(monkeypatch, model_dir, r, 2) for r in range(2)]
    monkeypatch.undo()
    deq = {name: m.quantized.dequantize() for name, m in full.named_modules() if getattr(m, "quantized", None)}
    assert len(deq) == 4 * full.config.num_layers + 1
    cfg = full.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for r, model in enumerate(ranks):
        for name, m in model.named_modules():
            if not getattr(m, "quantized", None):
                continue
            w, mine = deq[name], m.quantized.dequantize()

            def rows(parts):  # rank r's rows of each fused part [(offset, size)]
                return torch.cat([w[o + r * (s // 2): o + (r + 1) * (s // 2)] for o, s in parts])

            if name.endswith("qkv_proj"):
                expect = rows([(0, q), (q, kv), (q + kv, kv)])
            elif name.endswith("gate_up_proj"):
                expect = rows([(0, cfg.intermediate_size), (cfg.intermediate_size, cfg.intermediate_size)])
            elif name.endswith(("o_proj", "down_proj")):
                k = w.shape[1] // 2
                expect = w[:, r * k:(r + 1) * k]
            else:
                assert name == "lm_head"
                expect = rows([(0, cfg.vocab_size)])
            assert torch.equal(mine, expect), name


@pytest.mark.timeout(300)
def test_int4_tp2_end_to_end(ray_session, tiny_model_dir):
    from tests.test_tensor_parallel import generate

    tokens, exits = generate(tiny_model_dir, 2, EE, 2, 12, block_size=8, quantization="int4", quant_group_size=32)
    assert all(len(t) == 12 and all(0 <= x < 49152 for x in t) for t in tokens)
    assert all(1 <= e <= 6 for es in exits for e in es)


def _greedy_with_margins(model_dir: str, tp: int, prompts: list[str], max_tokens: int):
    llm = LLM(model_dir, tensor_parallel_size=tp, early_exit=None, quantization="int4", num_blocks=256)
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=2))
        return [(o.token_ids, [lp.top[0][1] - lp.top[1][1] for lp in o.logprobs]) for o in outs]
    finally:
        llm.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_model_int4_tp3_matches_tp1(ray_session, default_model_dir):
    """TP 3 with int4 gives TP 1's greedy tokens on the default model (groups of 32 divide every
    shard, so every rank's quantized shard is the exact slice of TP 1's), up to near-ties.

    Not bitwise: the kernels return bfloat16, so row-parallel partial sums are rounded per rank before
    the all-reduce (TP 1 rounds the whole sum once), and the logits come out of the LM head's kernel in
    bfloat16 too (steps of 0.125 for logits in [16, 32)). So a sequence must equal TP 1's token for
    token, or first differ where TP 1's top-2 log-probability margin is within two such steps (0.25)."""
    prompts = ["The history of the Roman Empire", "def fibonacci(n):", "Three tips for staying healthy are",
               "Once upon a time, in a small village"]
    ref = _greedy_with_margins(default_model_dir, 1, prompts, 16)
    got = _greedy_with_margins(default_model_dir, 3, prompts, 16)
    same = 0
    for (ref_ids, margins), (ids, _) in zip(ref, got):
        diff = next((i for i, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), None)
        if diff is None:
            same += 1
        else:
            assert margins[diff] <= 0.25, (diff, margins[diff], ref_ids, ids)
    assert same >= len(prompts) // 2


@pytest.mark.timeout(300)
def test_quant_bench_writes_rows(tiny_model_dir, tmp_path, monkeypatch):
    import importlib
    import json

    monkeypatch.setenv("EESERVE_BENCH_RESULTS", str(tmp_path))
    import bench.common
    import bench.quant

    importlib.reload(bench.common)
    importlib.reload(bench.quant)
    bench.quant.main(["--model", tiny_model_dir, "--batch-sizes", "1", "2", "--max-tokens", "4",
                      "--quality-prompts", "2", "--batch1-prompts", "1", "--repeats", "1", "--name", "tiny-quant"])
    data = json.loads((tmp_path / "tiny-quant.json").read_text())
    assert [r["quantization"] for r in data["quality"]] == ["none", "int8", "int4"]
    assert data["quality"][0]["agreement_tf"] == 1.0
    assert {(r["quantization"], r["mode"], r["batch"]) for r in data["rows"]} == {
        (q, m, b) for q in ("none", "int8", "int4") for m in ("full", "ee") for b in (1, 2)}
    assert all(r["tokens_per_s"] > 0 for r in data["rows"])


@pytest.mark.timeout(300)
def test_dense_prefill_routes_prompt_rows_to_the_dense_copies_and_decode_rows_to_int4(tiny_model_dir):
    """``dense_prefill=True``: every quantized layer keeps a dense bfloat16 copy; prompt tokens (rows
    after the decode rows of a layer call) multiply by it, decode tokens never (so decode outputs do
    not depend on batch size through it), also when a long prompt is prefilled beside decoding
    requests. The copies change the prompt's numerics (bfloat16-rounded weights): the first token's
    logprob differs from the int4 engine's, its argmax does not here. (Not promised: the same prompt rows give the same bits whatever
    the dense GEMM's row count; hence off by default.)"""
    from cluster.model.layers import quant

    prompt = "The history of bread goes back thousands of years, to the first farmers who ground grain into"
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(quantization="int4", early_exit=None, block_size=4, num_blocks=1024, torch_compile=False,
              enable_prefix_caching=False)
    calls = []  # (rows, first prompt row) of every quantized call that used a dense copy
    mm = quant.QuantizedWeight._mm
    llm = LLM(tiny_model_dir, dense_prefill=True, **kw)
    try:
        model = llm.engine.workers.local.runner.model
        qws = [q for q in model.modules() if isinstance(q, quant.QuantizedWeight)]
        assert qws and all("dense" in q._buffers for q in qws)
        orig = quant.QuantizedWeight.forward

        def forward(self, x):
            k = quant._DENSE_FROM.get()
            if "dense" in self._buffers and k is not None and k < x.shape[0]:
                calls.append((x.shape[0], k))
            return orig(self, x)

        quant.QuantizedWeight.forward = forward
        try:
            n_prompt = len(llm.processor.tokenize(prompt))
            dense = llm.generate([prompt], params)[0]
            assert {k for _, k in calls} == {0} and sum(r for r, _ in calls) == n_prompt * 4 * len(model.model.layers)
            calls.clear()
            # a prompt prefilled while 3 requests decode: their rows come first and stay on int4
            eng = llm.engine
            for i in range(3):
                llm.add_request(f"{prompt} ({i})", SamplingParams(max_tokens=30, ignore_eos=True))
            for _ in range(3):
                eng.step()
            calls.clear()
            llm.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
            eng.step()
            while eng.has_unfinished_requests():
                eng.step()
            assert calls and all(k == 3 and r == 3 + n_prompt for r, k in calls), calls[:4]
        finally:
            quant.QuantizedWeight.forward = orig
    finally:
        llm.shutdown()
    assert quant.QuantizedWeight._mm is mm
    llm = LLM(tiny_model_dir, dense_prefill=False, **kw)
    try:
        plain = llm.generate([prompt], params)[0]
    finally:
        llm.shutdown()
    assert plain.logprobs[0].logprob != dense.logprobs[0].logprob
    assert plain.token_ids[0] == dense.token_ids[0]
