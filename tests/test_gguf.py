"""GGUF models read in place (cluster/model/gguf.py, cluster/model/loader.py).

Tiny random Llamas are written as GGUF files here (``gguf.GGUFWriter``; linear layers Q4_0, Q4_1 or
Q8_0 via ``gguf.quants.quantize``, q/k rows permuted as llama.cpp stores them, embedding Q8_0, norms
F32). The reference ("old path") is transformers' ``load_gguf_checkpoint`` dequantizing the whole
file, saved as a float32 safetensors directory, then loaded and quantized. What is equal:

* float (quantization none): every parameter, bit for bit;
* int4 from Q4_1: every packed weight, scale and zero, bit for bit (llama.cpp's Q4_1 blocks span the
  codes 0..15, so requantizing the dequantized block finds the same scale, zero and codes);
* int4 from Q4_0: not requantized; the matrix the kernel multiplies by equals the GGUF's dequantized
  weight to bfloat16 rounding (of the scale, and of the kernel's output when read back: <= 2**-7 of
  the layer's largest weight), closer than the requantized one (Q4_0 is symmetric, the kernel's
  requantization asymmetric: other codes);
* int8 (any type), int4 from Q8_0 and the LM head: requantized per layer, bit for bit the old path's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import ModelConfig

pytestmark = pytest.mark.timeout(300)

Q4_0, Q4_1, Q8_0 = "Q4_0", "Q4_1", "Q8_0"
HEADS, KV_HEADS = 4, 2


def _byte_level_tokens() -> list[str]:
    """GPT-2's 256 byte symbols (``bytes_to_unicode``)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row order for attn_q / attn_k."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, linear_type: str, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 64, MLP 128, 4 heads / 2 KV heads, 260-token byte-level BPE
    vocabulary, tied embedding) as a GGUF with its linear layers in ``linear_type``."""
    import gguf
    from gguf.quants import quantize
    from transformers import LlamaConfig, LlamaForCausalLM

    T = gguf.GGMLQuantizationType
    tokens = _byte_level_tokens() + ["Ġt", "he", "in", "<|endoftext|>"]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                      initializer_range=0.5, rms_norm_eps=1e-5, max_position_embeddings=256)
    torch.manual_seed(seed)
    sd = {k: v.detach().float().numpy() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(256), w.add_embedding_length(64), w.add_feed_forward_length(128)
    w.add_head_count(HEADS), w.add_head_count_kv(KV_HEADS), w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0), w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3]), w.add_token_merges(["Ġ t", "h e", "i n"])
    w.add_bos_token_id(len(tokens) - 1), w.add_eos_token_id(len(tokens) - 1)

    def put(name: str, arr: np.ndarray, qtype) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype == T.F32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)

    lin = T[linear_type]
    put("token_embd.weight", sd["model.embed_tokens.weight"], T.Q8_0)
    put("output_norm.weight", sd["model.norm.weight"], T.F32)
    for i in range(2):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], T.F32)
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], T.F32)
        put(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], HEADS), lin)
        put(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS), lin)
        for gguf_name, hf in [("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                              ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            put(f"blk.{i}.{gguf_name}.weight", sd[p + hf + ".weight"], lin)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_old_path_dir(gguf_path: Path, out: Path) -> str:
    """The reference: the whole GGUF dequantized by transformers into a float32 safetensors directory
    (what eeserve cached before reading GGUFs in place)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=meta)["tensors"]
    out.mkdir(parents=True)
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(out / "model.safetensors"))
    cfg.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory) -> str:
    """The ``EESERVE_CACHE_DIR`` of this module's GGUFs (not the user's cache)."""
    return str(tmp_path_factory.mktemp("gguf-cache"))


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory, gguf_cache):
    """``get(linear_type) -> (gguf_path, gguf_dir, old_path_dir)``."""
    from cluster.model.loader import resolve_model_dir

    root = tmp_path_factory.mktemp("tiny-gguf")
    made = {}

    def get(linear_type: str):
        if linear_type not in made:
            path = write_tiny_gguf(root / f"tiny-{linear_type}.gguf", linear_type)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("EESERVE_CACHE_DIR", gguf_cache)
                gguf_dir = resolve_model_dir(str(path))
            made[linear_type] = (path, gguf_dir, write_old_path_dir(path, root / f"old-{linear_type}"))
        return made[linear_type]

    return get


def build(model_dir: str, quantization: str):
    from cluster.model.loader import build_model, load_hf_config

    mc = ModelConfig.from_hf_config(load_hf_config(model_dir), quantization=quantization, quant_group_size=32)
    return build_model(model_dir, mc)


def quantized_layers(model) -> dict:
    """name -> QuantizedWeight for every quantized layer (K/V copies of the fused qkv included)."""
    from cluster.model.layers.quant import QuantizedWeight

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}


def assert_bitwise_equal_quantized(a, b) -> None:
    qa, qb = quantized_layers(a), quantized_layers(b)
    assert qa.keys() == qb.keys() and len(qa) == 2 * 5 + 1  # per layer qkv, its K/V copy, o, gate_up, down; head
    for name in qa:
        ba, bb = dict(qa[name].named_buffers()), dict(qb[name].named_buffers())
        assert ba.keys() == bb.keys() and qa[name].method == qb[name].method, name
        for k in ba:
            assert torch.equal(ba[k], bb[k]), (name, k)


@pytest.mark.parametrize("linear_type", [Q4_0, Q4_1, Q8_0])
def test_float_load_equals_transformers_dequantization(tiny_ggufs, linear_type):
    """quantization none: every parameter equals transformers' dequantization (names, q/k row order);
    the GGUF's directory holds config, tokenizer and tensor table only; fingerprints agree."""
    from transformers import AutoTokenizer

    from cluster.engine.factory import model_fingerprint
    from cluster.model.gguf import TABLE_FILE

    path, gguf_dir, old_dir = tiny_ggufs(linear_type)
    ours, ref = build(gguf_dir, "none").state_dict(), build(old_dir, "none").state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    files = sorted(os.listdir(gguf_dir))
    assert TABLE_FILE in files and "config.json" in files and not any(f.endswith(".safetensors") for f in files)
    assert sum(os.path.getsize(os.path.join(gguf_dir, f)) for f in files) < 100_000
    assert json.loads(Path(gguf_dir, TABLE_FILE).read_text())["gguf"] == str(path.resolve())
    tok = AutoTokenizer.from_pretrained(gguf_dir)
    assert tok.decode(tok.encode("the hint")) == "the hint" and tok.eos_token == "<|endoftext|>"
    assert model_fingerprint(gguf_dir) == model_fingerprint(old_dir)


@pytest.mark.parametrize("linear_type", [Q4_0, Q4_1])
def test_int4_packs_gguf_blocks_as_they_are(tiny_ggufs, linear_type):
    from cluster.model.layers.quant import QuantizedWeight

    _, gguf_dir, old_dir = tiny_ggufs(linear_type)
    float_model, direct, old = build(gguf_dir, "none"), build(gguf_dir, "int4"), build(old_dir, "int4")
    if linear_type == Q4_1:
        assert_bitwise_equal_quantized(direct, old)
        return
    worst_direct = worst_requant = 0.0
    floats = dict(float_model.named_modules())
    for name, layer in direct.named_modules():
        qw = getattr(layer, "quantized", None)
        if qw is None or name == "lm_head":
            continue
        assert qw.method == "int4" and qw.group_size == 32 and layer.weight is None
        w = floats[name].weight.float()
        err = (qw.dequantize() - w).abs().max().item() / w.abs().max().item()
        assert err <= 2 ** -7, (name, err)
        worst_direct = max(worst_direct, err)
        requant = QuantizedWeight.from_float(w, "int4", 32).dequantize()
        worst_requant = max(worst_requant, (requant - w).abs().max().item() / w.abs().max().item())
    assert worst_direct < worst_requant / 4, (worst_direct, worst_requant)
    # the LM head (int8 under int4) is requantized from the Q8_0 embedding, as before
    assert torch.equal(direct.lm_head.quantized.qweight, old.lm_head.quantized.qweight)
    assert torch.equal(direct.lm_head.quantized.scales, old.lm_head.quantized.scales)


@pytest.mark.parametrize("linear_type,method", [(Q8_0, "int8"), (Q8_0, "int4"), (Q4_1, "int8")])
def test_requantized_layers_equal_quantize_after_dequantize(tiny_ggufs, linear_type, method):
    """Types the kernels cannot take as they are go through one layer's float weight at a time, and
    come out bit for bit the old path's (whole model dequantized, then quantized)."""
    _, gguf_dir, old_dir = tiny_ggufs(linear_type)
    assert_bitwise_equal_quantized(build(gguf_dir, method), build(old_dir, method))


@pytest.mark.parametrize("linear_type", [Q4_0, Q4_1])
def test_int4_tp2_shards_from_gguf_blocks(tiny_ggufs, linear_type, monkeypatch):
    """Each TP-2 rank copies only its own blocks (column-parallel: rows; row-parallel: the input
    columns, 32 per block, so each rank's 32 columns are one block), bit for bit TP 1's slices."""
    from tests.test_quant import assert_int4_tp2_shards_are_slices

    assert_int4_tp2_shards_are_slices(tiny_ggufs(linear_type)[1], monkeypatch)


def test_gguf_engine_generates_as_the_old_path(tiny_ggufs, gguf_cache, monkeypatch):
    """LLM(model=<file>.gguf): the tokenizer and config come from the GGUF; greedy tokens and the
    first token's top log-probabilities equal the old path's, float and int4 (Q4_1: same weights)."""
    from cluster import LLM, SamplingParams

    monkeypatch.setenv("EESERVE_CACHE_DIR", gguf_cache)
    path, _, old_dir = tiny_ggufs(Q4_1)
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0, logprobs=3)
    prompts = ["the cat", "in the hint"]
    runs = {}
    for name, model in [("gguf", str(path)), ("old", old_dir)]:
        for quant in ("none", "int4"):
            llm = LLM(model, quantization=quant, early_exit=None, num_blocks=64, block_size=8)
            try:
                outs = llm.generate(prompts, params)
            finally:
                llm.shutdown()
            runs[name, quant] = [(o.token_ids, o.logprobs[0].top) for o in outs]
    assert runs["gguf", "none"] == runs["old", "none"]
    assert runs["gguf", "int4"] == runs["old", "int4"]
    assert all(len(ids) == 8 for ids, _ in runs["gguf", "int4"])


def test_corrupt_or_moved_gguf_is_reported(tiny_ggufs, tmp_path):
    import shutil

    from cluster.model.loader import build_model, load_hf_config

    path, gguf_dir, _ = tiny_ggufs(Q4_0)
    moved_dir = shutil.copytree(gguf_dir, tmp_path / "dir")
    table = json.loads(Path(moved_dir, "gguf_tensors.json").read_text())
    table["size"] += 1
    Path(moved_dir, "gguf_tensors.json").write_text(json.dumps(table))
    mc = ModelConfig.from_hf_config(load_hf_config(str(moved_dir)))
    with pytest.raises(FileNotFoundError, match="missing or changed"):
        build_model(str(moved_dir), mc)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_model_direct_int4_is_the_old_path(default_model_dir):
    """SmolLM2-135M-Instruct (Q4_1, Q8_0 embedding): int4 and int8 loaded from the GGUF are bit for bit
    the old path's (float32 model dequantized, then quantized: ``quantize_model``), so greedy tokens
    are the same; the GGUF-backed directory holds a few MB and matches the shipped exit heads."""
    from cluster.engine.factory import model_exit_config_path
    from cluster.model.layers.quant import quantize_model

    assert is_small_gguf_dir(default_model_dir)
    assert model_exit_config_path(default_model_dir) is not None  # fingerprint unchanged
    for method in ("int4", "int8"):
        old = quantize_model(build(default_model_dir, "none"), method, 32)
        direct = build(default_model_dir, method)
        qa, qb = quantized_layers(direct), quantized_layers(old)
        assert qa.keys() == qb.keys() and len(qa) == 30 * 5 + 1
        for name in qa:
            for (k, a), (_, b) in zip(qa[name].named_buffers(), qb[name].named_buffers()):
                assert torch.equal(a, b), (method, name, k)
        del old, direct


def is_small_gguf_dir(model_dir: str) -> bool:
    from cluster.model.gguf import is_gguf_dir

    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
    return is_gguf_dir(model_dir) and size < 10_000_000


def test_auto_quantization_follows_the_gguf_type(tiny_ggufs):
    """quantization=auto keeps a GGUF's precision on the CPU: Q4_0 / Q4_1 -> int4, Q8_0 -> int8."""
    from cluster.engine.factory import resolve_quantization

    for linear_type, want in ((Q4_0, "int4"), (Q4_1, "int4"), (Q8_0, "int8")):
        _, gguf_dir, old_dir = tiny_ggufs(linear_type)
        assert resolve_quantization("auto", gguf_dir, "cpu") == want
        assert resolve_quantization("auto", old_dir, "cpu") == "none"  # a float safetensors copy
