"""Optional ``torch.compile`` of the decoder layers' dense halves (``torch_compile=True``).

Each :class:`~cluster.model.llama.LlamaDecoderLayer` runs ``attn_in`` (RMSNorm, fused qkv, RoPE)
and ``attn_out`` (o_proj, residual, RMSNorm, MLP, residual) around the eager paged attention. Both
are pure tensor functions of a dynamic token count ``T``, so Inductor fuses their elementwise ops
(norms, RoPE, SiLU * up, residual adds, the casts around the weight-only kernels) into a few C++/
Triton kernels; the matmuls stay PyTorch's kernels. One compiled function serves every layer (the
layer is an argument, its parameters graph inputs), with one graph for ``T == 1`` (decode at batch
1), one for ``T >= 2`` and one per output layout of the attention.

Cost and effect are measured by ``bench/speed.py --compile`` (compile time at start-up, step time
after). Compiled kernels reorder floating-point operations, so outputs can differ from the eager
model's in the last bits (greedy tokens may diverge after a near-tie); tests that compare runs token
for token use the eager model.

Docs: https://pytorch.org/docs/stable/torch.compiler.html
"""
from __future__ import annotations

import types

import torch

from cluster.model.llama import LlamaDecoderLayer, LlamaForCausalLM


def compile_decoder_layers(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Route every decoder layer's ``attn_in`` / ``attn_out`` through one ``torch.compile``'d
    function each (``dynamic=True``); compilation happens at the first call of each shape class.

    Raises:
        RuntimeError: ``torch.compile`` is unavailable on this platform (raised by PyTorch).
    """
    attn_in = torch.compile(LlamaDecoderLayer.attn_in, dynamic=True)
    attn_out = torch.compile(LlamaDecoderLayer.attn_out, dynamic=True)
    for layer in model.model.layers:
        layer.attn_in = types.MethodType(attn_in, layer)
        layer.attn_out = types.MethodType(attn_out, layer)
    return model
