"""Rotary position embedding (Su et al. 2021) with the config's theta and scaling.

Inverse frequencies come from transformers' ``ROPE_INIT_FUNCTIONS`` (linear, dynamic, yarn,
llama3, longrope), so scaled RoPE matches Hugging Face exactly; ``default`` is plain RoPE.
"""
from __future__ import annotations

import torch
from torch import nn


def _rope_parameters(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if not params:
        scaling = getattr(hf_config, "rope_scaling", None) or {}
        params = {"rope_theta": getattr(hf_config, "rope_theta", 10000.0), **scaling}
    return params


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Returns ``([head_dim / 2] float32 inverse frequencies on the CPU, attention scaling)``."""
    params = _rope_parameters(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = float(params.get("rope_theta", 10000.0))
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # float32 whatever the default dtype while the model is built (bfloat16 on GPUs)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    finally:
        torch.set_default_dtype(prev)
    return inv.to(device="cpu", dtype=torch.float32), scale


class RotaryEmbedding(nn.Module):
    """Applies RoPE to query/key heads: ``x [T, heads, d]`` (q, k, or q and k side by side),
    ``positions [T]``; Hugging Face's ``rotate_half`` convention.

    cos/sin tables are precomputed on the CPU for ``max_positions`` in float32 (the same bits on
    every device), then kept as buffers: ``model.to(device)`` moves them to the model's device, where
    each iteration gathers its rows (cast to the input dtype). The sin table carries the sign of
    ``rotate_half`` (``-sin`` on the first half), so ``rotate_half(x) * sin == roll(x, d/2) * sin_signed``
    bit for bit (a negation is exact): four ops per call instead of six.
    """

    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq, scale = rope_inv_freq(hf_config, head_dim)
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq.float())
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        half = emb.shape[-1] // 2
        sign = torch.cat([-torch.ones(half, device="cpu"), torch.ones(half, device="cpu")]).float()
        self.register_buffer("sin", emb.sin() * scale * sign, persistent=False)  # rotate_half's sign folded in
        self._last = None  # (positions, dtype, cos, sin) of the latest call

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin: [T, 1, d]`` for ``positions``; reused while the same ``positions`` tensor comes
        back (every layer of one iteration passes the same one), so each iteration gathers once."""
        key = self._last
        if key is None or key[0] is not positions or key[1] != dtype:
            cos = self.cos[positions].unsqueeze(1).to(dtype)
            sin = self.sin[positions].unsqueeze(1).to(dtype)
            self._last = key = (positions, dtype, cos, sin)
        return key[2], key[3]

    @staticmethod
    def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x: [T, heads, d]`` in place with this iteration's :meth:`tables` (``x`` may be a
        strided view, e.g. of a fused qkv output) and return it. Under ``torch.compile`` (which
        cannot trace ``out=`` into a strided view) the same values are copied in."""
        if torch.compiler.is_compiling():
            return x.copy_(x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin)
        return torch.add(x * cos, x.roll(x.shape[-1] // 2, dims=-1) * sin, out=x)
