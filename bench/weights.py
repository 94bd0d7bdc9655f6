"""Memory traffic of a decode step: weight bytes a token reads, from the loaded model (quantization
aware), from a Hugging Face model, or from a GGUF file's tensor table.

At batch 1 a decode step reads every weight it multiplies by once, so ``bytes per token x tokens/s``
against the machine's read bandwidth (:func:`bench.offline.read_bandwidth_gbps`) says how close a
run is to the memory-bound limit.
"""
from __future__ import annotations

import itertools

from torch import nn

from cluster.model.layers.quant import QuantizableLinear, QuantizedWeight


def read_bytes(module: nn.Module) -> int:
    """Bytes of the weights a forward through ``module`` reads.

    A quantized linear layer reads its :class:`QuantizedWeight` buffers (packed weight, scales, zeros)
    and its bias, not the float weight it may keep for a tied embedding lookup; every other module
    reads its parameters. Shared tensors count once.
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
            for b in m.buffers(recurse=False):
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
    """Weight bytes one batch-1 token reads from our ``model`` (:class:`LlamaForCausalLM`).

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
