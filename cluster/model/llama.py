"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2 q/k/v bias) from tensor-parallel layers.

Parameter names match Hugging Face checkpoints (``model.layers.N.self_attn.q_proj.weight`` ...);
fused projections map their HF parts through :data:`PACKED_MODULES`.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cluster.config import ModelConfig
from cluster.model.layers.attention import AttentionMetadata, paged_attention, write_kv
from cluster.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from cluster.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from cluster.model.layers.norm import RMSNorm
from cluster.model.layers.quant import dense_rows_from
from cluster.model.layers.rotary import RotaryEmbedding

# HF parameter name part -> (our fused module name part, shard id)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _prompt_rows(meta: AttentionMetadata, num_rows: int):
    """Rows ``meta.num_decodes ..`` of a layer input of ``num_rows`` rows are prompt tokens: quantized
    layers multiply them by their dense copies (:func:`~cluster.model.layers.quant.dense_rows_from`)."""
    return dense_rows_from(meta.num_decodes) if meta.num_decodes < num_rows else contextlib.nullcontext()


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.rotary = rotary
        self.head_dim = cfg.head_dim
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads

    def project_kv(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """K (rotated) and V of normed hidden states ``x: [T, hidden]`` -> ``[2, T, KVH_local, d]``
        (a view, K then V, as :func:`write_kv` takes it)."""
        kv = self.qkv_proj.kv_proj(x).view(-1, 2, self.num_kv_heads, self.head_dim)
        self.rotary.rotate_(kv[:, 0], *self.rotary.tables(positions, kv.dtype))
        return kv.transpose(0, 1)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated queries and this step's K/V of normed hidden states ``x: [T, hidden]`` (``cos, sin:
        [T, 1, d]`` from ``rotary.tables``): ``(q [T, H_local, d], kv [2, T, KVH_local, d])``, both
        views of one fused projection (q and k rotated in place together)."""
        qkv = self.qkv_proj(x)
        T, H, KVH, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        self.rotary.rotate_(qkv[:, : (H + KVH) * d].view(T, H + KVH, d), cos, sin)
        return qkv[:, : H * d].view(T, H, d), qkv[:, H * d:].view(T, 2, KVH, d).transpose(0, 1)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                                       bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """One pre-norm decoder layer with a separate KV-fill path (arXiv 2407.20272, Sec. 4)."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, compute_rows: Optional[torch.Tensor] = None,
                compute_meta: Optional[AttentionMetadata] = None) -> torch.Tensor:
        """Write K/V of all ``T`` rows of ``h: [T, hidden]``; run attention + MLP on ``compute_rows``.

        Rows outside ``compute_rows`` (tokens that already exited) only get their K/V written: that
        is the KV fill from their frozen exit hidden state. Returns the new hidden states of the
        computed rows: ``[T, hidden]`` if ``compute_rows`` is None, else ``[len(compute_rows), hidden]``.
        """
        cos, sin = self.self_attn.rotary.tables(positions, h.dtype)
        with _prompt_rows(meta, h.shape[0]):
            q, kv = self.attn_in(h, cos, sin)
        write_kv(kv_cache, kv, meta.slot_mapping)
        if compute_rows is not None:
            h, q, meta = h[compute_rows], q[compute_rows], compute_meta
        o = paged_attention(q, kv_cache, meta)
        with _prompt_rows(meta, h.shape[0]):
            return self.attn_out(h, o)

    # The two dense halves around the paged attention: pure tensor functions of ``T`` (the compiled
    # decode graphs of ``cluster.model.compile`` trace them with the attention between).
    def attn_in(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h: [T, hidden]``, RoPE tables ``cos, sin: [T, 1, d]`` -> ``(q [T, H_local, d],
        kv [2, T, KVH_local, d])``: norm, fused qkv, RoPE."""
        return self.self_attn.qkv(self.input_layernorm(h), cos, sin)

    def attn_out(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual stream ``h: [n, hidden]`` and attention output ``o: [n, H_local, d]`` -> the layer's
        output ``[n, hidden]``: o_proj (+ all-reduce), residual, norm, MLP, residual."""
        h = h + self.self_attn.o_proj(o.reshape(o.shape[0], -1))
        return h + self.mlp(self.post_attention_layernorm(h))

    def fill_kv(self, h: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                kv_cache: torch.Tensor) -> None:
        """KV fill only: K/V of this layer (``kv_cache: [2, num_blocks, block_size, KVH, d]``) from
        (exit) hidden states ``h: [T, hidden]``."""
        write_kv(kv_cache, self.self_attn.project_kv(self.input_layernorm(h), positions), slot_mapping)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rotary = RotaryEmbedding(cfg.hf_config, cfg.head_dim, cfg.max_model_len)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, rotary) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head. Early-exit execution lives in :mod:`cluster.model.exits`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tied_to=tied)

    def final_local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` last-layer hidden states -> ``[n, V_local]`` float32 logits (through the
        compiled head of :mod:`cluster.model.compile` when the model has one)."""
        graphs = self.__dict__.get("decode_graphs")
        logits = None if graphs is None else graphs.local_logits(h)
        return self.lm_head.local_logits(self.model.norm(h)) if logits is None else logits
