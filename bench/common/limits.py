"""Machine-limit figures: the memory traffic of a decode step (weight bytes a token reads, from the
loaded model (quantization aware), from a Hugging Face model, or from a GGUF file's tensor table),
the machine's measured read bandwidth, the cost of the parts of a decode step, and the fixed
per-step overhead (decode-step time against the number of decoder layers run).

At batch 1 a decode step reads every weight it multiplies by once, so ``bytes per token x tokens/s``
against the machine's read bandwidth (:func:`read_bandwidth_gbps`) says how close a run is to the
memory-bound limit.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

from bench.common.timing import interleaved_best, time_ms
from cluster import LLM, SamplingParams
from cluster.model.layers.quant import QuantizableLinear, QuantizedWeight
from cluster.model.loader import resolve_model_dir


def read_bytes(module: nn.Module) -> int:
    """Bytes of the weights a decode forward through ``module`` reads.

    A quantized linear layer reads its :class:`QuantizedWeight` buffers (packed weight, scales, zeros;
    not the dense copy ``dense_prefill`` keeps for prompt tokens) and its bias, not the float weight
    it may keep for a tied embedding lookup; every other module reads its parameters. Shared tensors
    count once.
    """
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for m in module.modules():
        if isinstance(m, QuantizedWeight):
            for name, b in m.named_buffers(recurse=False):
                if name != "dense":
                    add(b)
        elif isinstance(m, QuantizableLinear) and m.quantized is not None:
            for name, p in m.named_parameters(recurse=False):
                if name != "weight":
                    add(p)
        else:
            for p in m.parameters(recurse=False):
                add(p)
    return total


def held_bytes(model: nn.Module) -> int:
    """Bytes of all weights ``model`` holds (parameters plus packed quantized weights, each once)."""
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), (b for n, b in model.named_buffers() if "qweight" in n)):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def weight_bytes_per_token(model, heads, mean_exit_layer: float) -> float:
    """Weight bytes one decode step reads from our ``model`` (:class:`LlamaForCausalLM`).

    Layers run (``mean_exit_layer`` of them) + the K/V part of ``qkv_proj`` and the input norm of
    each skipped layer (KV fill) + final norm and LM head + one embedding row + the exit checks made
    (every exit layer below the mean exit layer, plus the exit itself), sized from the loaded
    ``heads`` (:class:`~cluster.model.exits.ExitHeads`; None: the full model). Quantized layers
    count their packed weights and scales (:func:`read_bytes`).
    """
    cfg = model.config
    layers = model.model.layers
    L = len(layers)
    layer0 = layers[0]
    per_layer = read_bytes(layer0)
    qkv = layer0.self_attn.qkv_proj
    kv_share = 2 * cfg.num_kv_heads / (cfg.num_heads + 2 * cfg.num_kv_heads)
    kv_fill = read_bytes(qkv) * kv_share + read_bytes(layer0.input_layernorm)
    lm = read_bytes(model.lm_head) + read_bytes(model.model.norm)
    emb = model.model.embed_tokens.weight
    total = mean_exit_layer * per_layer + (L - mean_exit_layer) * kv_fill + lm + emb.shape[1] * emb.element_size()
    if heads is not None:
        checks = sum(1 for l in heads.cfg.exit_layers if l < mean_exit_layer) + 1
        adapter = read_bytes(next(iter(heads.heads.values()))) if len(heads.heads) else 0
        if len(heads.classifiers):  # cheap checks; the adapter and the LM head run once, for the exit
            total += checks * read_bytes(next(iter(heads.classifiers.values()))) + adapter
        else:  # every check computes the exit's full-vocabulary logits
            total += checks * (adapter + lm)
    return float(total)


def hf_bytes_per_token(model: nn.Module) -> float:
    """Weight bytes one token reads from a Hugging Face causal LM: every parameter once, less the
    input embedding matrix unless it is tied to the LM head (the lookup reads one row)."""
    total = held_bytes(model)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    if not tied:
        total -= emb.numel() * emb.element_size()
    return float(total + emb.shape[1] * emb.element_size())


def gguf_bytes_per_token(path: str) -> float:
    """Weight bytes one token reads from a GGUF model (llama.cpp): the stored size of every tensor,
    less the token embedding unless the file has no separate ``output.weight`` (tied LM head)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    emb = sizes.get("token_embd.weight", 0)
    if "output.weight" in sizes:
        total -= emb
    return float(total)


def read_bandwidth_gbps(gib: float = 1.0) -> float:
    """Best-of-5 ``torch.sum`` over a ``gib`` GiB float32 tensor: bytes read per second / 1e9."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def add_traffic(row: dict, step_bytes: Optional[float], bw_gbps: float) -> None:
    """``weight_MB_per_token``, ``weight_GBps`` and ``bw_fraction`` of a row (``batch``,
    ``tokens_per_s``) from its step's weight bytes (None: left as it is) and the read bandwidth."""
    if step_bytes is None:
        return
    b = row["batch"]
    gbps = step_bytes * row["tokens_per_s"] / b / 1e9
    row.update(weight_MB_per_token=round(step_bytes / b / 1e6, 2), weight_GBps=float(f"{gbps:.3g}"),
               bw_fraction=float(f"{gbps / bw_gbps:.3g}"))


@torch.inference_mode()
def part_costs(model, heads) -> list[dict]:
    """Milliseconds per call of the parts of a decode step at batch 1 and 16 (one decoder layer's MLP
    and QKV projection, a KV fill, the LM head, an exit adapter and classifier of ``heads`` if any).
    Weights are mostly cache-resident here, so these are lower bounds next to a real step, which
    streams every weight from memory."""
    mc = model.config
    layer = model.model.layers[mc.num_layers // 2]
    rows = []
    for n in (1, 16):
        h = torch.randn(n, mc.hidden_size, dtype=next(model.parameters()).dtype)
        pos = torch.arange(n)
        mlp = time_ms(lambda: layer.mlp(h))
        qkv = time_ms(lambda: layer.self_attn.qkv_proj(h))
        row = {"batch": n, "layer_mlp_ms": mlp, "layer_qkv_ms": qkv,
               "kv_fill_ms": time_ms(lambda: layer.self_attn.project_kv(layer.input_layernorm(h), pos)),
               "lm_head_ms": time_ms(lambda: model.final_local_logits(h), n=10)}
        if heads is not None and heads.heads:
            k = next(iter(heads.heads))
            row["exit_adapter_ms"] = time_ms(lambda: heads.heads[k](h))
        if heads is not None and heads.classifiers:
            k = next(iter(heads.classifiers))
            row["exit_classifier_ms"] = time_ms(lambda: heads.classifiers[k](h))
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return rows


def truncated_model_dir(model_dir: str, num_layers: int, root: str) -> str:
    """A copy of ``model_dir`` under ``root`` whose config keeps the first ``num_layers`` decoder
    layers (other files symlinked: the loader skips the weights of the dropped layers)."""
    out = os.path.join(root, f"layers-{num_layers}")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(model_dir):
        if name in ("config.json", "exit_config.json"):
            continue
        os.symlink(os.path.join(os.path.abspath(model_dir), name), os.path.join(out, name))
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = num_layers
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:num_layers]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def decode_step_ms(llm: LLM, prompt_ids: list[int], steps: int) -> float:
    """Median wall time (ms) of one engine step of a lone request's decode (the prefill step left
    out), over ``steps`` decode steps: scheduling, the forward, sampling and detokenizing."""
    eng = llm.engine
    llm.add_request(prompt_ids, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    times = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


def fit_overhead(points: dict[int, float]) -> dict:
    """Least squares ``t = fixed_ms + per_layer_ms * n`` over ``{n: ms}`` (two or more depths)."""
    n = np.array(sorted(points), dtype=float)
    t = np.array([points[k] for k in sorted(points)])
    (fixed, per_layer), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), t, rcond=None)
    resid = t - (fixed + per_layer * n)
    return {"fixed_ms": round(float(fixed), 3), "per_layer_ms": round(float(per_layer), 4),
            "max_residual_ms": round(float(np.abs(resid).max()), 3)}


def overhead_fits(model: Optional[str], full: dict, depths: list[int], prompt_ids: list[int], steps: int,
                  rounds: int, kw: dict) -> list[dict]:
    """Per-step overhead fit for every quantization: ``full`` maps quantization -> the full-depth
    :class:`LLM` (its depth is one point); the other ``depths`` load cut copies, timed interleaved."""
    model_dir = resolve_model_dir(model)
    L = next(iter(full.values())).engine.model_config.num_layers
    depths = sorted({min(max(1, d), L) for d in depths})
    root = tempfile.mkdtemp(prefix="eeserve-speed-layers-")
    llms = {}
    try:
        cut = {n: truncated_model_dir(model_dir, n, root) for n in depths if n != L}
        for q, llm in full.items():
            for n in depths:
                llms[(q, n)] = llm if n == L else LLM(cut[n], early_exit=None, quantization=q, **kw)
        for llm in llms.values():  # warm-up
            decode_step_ms(llm, prompt_ids, 2)
        best = interleaved_best({k: (lambda llm=llm: decode_step_ms(llm, prompt_ids, steps)) for k, llm in llms.items()},
                                rounds, score=lambda ms: -ms)
    finally:
        for (q, n), llm in llms.items():
            if n != L:
                llm.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for q in full:
        pts = {n: best[(q, n)] for n in depths}
        row = {"quantization": q, **{f"step_ms@{n}": round(v, 3) for n, v in pts.items()}}
        if len(pts) >= 2:
            row.update(fit_overhead(pts))
        rows.append(row)
        print(f"  overhead {q:5s} " + "  ".join(f"{n} layers {v:7.3f} ms" for n, v in pts.items())
              + (f"  -> fixed {row['fixed_ms']:.3f} ms + {row['per_layer_ms']:.4f} ms/layer" if "fixed_ms" in row
                 else ""), flush=True)
    return rows
