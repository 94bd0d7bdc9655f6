"""Attention over a paged KV cache (PagedAttention, Kwon et al. SOSP 2023), in plain PyTorch.

Layout of one iteration's flattened tokens: ``D`` decode tokens (one per sequence) first, then the
prefill chunks back to back. The cache of one layer is one tensor ``kv_cache: [2, num_blocks,
block_size, KVH_local, d]`` (K then V, so one index op writes or gathers both); a token at position
``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Decodes run as one batched SDPA call over one block-table gather of K and V (padded, masked by
context length; the mask is built once per iteration and shared by every layer);
each prefill chunk runs as one causal SDPA call over its gathered prefix. Both go through
``torch.nn.functional.scaled_dot_product_attention`` (CPU and CUDA kernels alike), every tensor made
here is created on the query's device, and nothing reads a device value on the host (the shapes
come from the metadata: no host sync).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    token_start: int  # index of the chunk's first token in the flattened batch
    num_tokens: int
    start_position: int  # sequence position of the chunk's first token
    block_table: torch.Tensor  # [num_blocks_of_seq] long, on the cache's device


@dataclass
class AttentionMetadata:
    """Where each token's K/V go and what each query attends to."""

    # every tensor lives on the KV cache's device (the model runner copies them there once per iteration)
    slot_mapping: torch.Tensor  # [T] long, flat cache slot of every token
    num_decodes: int  # D: tokens [0, D) are decode tokens
    decode_block_tables: torch.Tensor  # [D, max_blocks] long (padded with 0)
    decode_context_lens: torch.Tensor  # [D] long, tokens visible to each decode query (incl. itself)
    prefills: list[PrefillChunk] = field(default_factory=list)
    _decode_mask: Optional[torch.Tensor] = field(default=None, repr=False)

    def decode_mask(self, block_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[D, 1, 1, max_blocks * block_size]`` additive mask in ``dtype`` (the queries' dtype): 0 where
        the key slot is visible to the decode query, -inf elsewhere; built at the first layer's call
        and reused by the others (one iteration, one metadata). Additive, not bool: SDPA would
        convert a bool mask to this one (``where`` + ``scalar_tensor``) at every layer."""
        if self._decode_mask is None:
            S = self.decode_block_tables.shape[1] * block_size
            pos = torch.arange(S, device=self.decode_context_lens.device)
            visible = pos < self.decode_context_lens.unsqueeze(1)
            self._decode_mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
                ~visible, float("-inf")).view(-1, 1, 1, S)
        return self._decode_mask

    def suffix(self, start: int) -> "AttentionMetadata":
        """Metadata of tokens ``start .. T-1`` (``start <= num_decodes``: the first ``start`` decode
        rows dropped): views, no copy; the decode mask, if built, is sliced too."""
        if start == 0:
            return self
        prefills = [PrefillChunk(p.token_start - start, p.num_tokens, p.start_position, p.block_table)
                    for p in self.prefills]
        mask = None if self._decode_mask is None else self._decode_mask[start:]
        return AttentionMetadata(self.slot_mapping[start:], self.num_decodes - start, self.decode_block_tables[start:],
                                 self.decode_context_lens[start:], prefills, mask)

    def select_decodes(self, keep: torch.Tensor, num_decodes: int) -> "AttentionMetadata":
        """Metadata for a subset of the tokens: ``keep`` (long, on the metadata's device) holds the
        kept decode rows (indices into ``[0, D)``, ascending) followed by every prefill token
        (``D .. T-1``); ``num_decodes`` (a host int) is how many of ``keep`` are decode rows.

        The selected batch is ``[decode rows..., prefill tokens...]``; prefill token starts shift.
        No host sync (the count comes from the caller).
        """
        shift = self.num_decodes - num_decodes
        prefills = [PrefillChunk(p.token_start - shift, p.num_tokens, p.start_position, p.block_table)
                    for p in self.prefills]
        rows = keep[:num_decodes]
        return AttentionMetadata(self.slot_mapping.index_select(0, keep), num_decodes,
                                 self.decode_block_tables.index_select(0, rows),
                                 self.decode_context_lens.index_select(0, rows), prefills)


def write_kv(kv_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``kv: [2, T, KVH, d]`` (K and V of ``T`` tokens, any strides) at their slots of the
    layer's ``kv_cache: [2, num_blocks, block_size, KVH, d]`` (one ``index_copy_``)."""
    kvh, d = kv_cache.shape[-2:]
    kv_cache.view(2, -1, kvh, d).index_copy_(1, slot_mapping, kv if kv.dtype == kv_cache.dtype else kv.to(kv_cache.dtype))


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of ``q: [T, H, d]`` over the layer's ``kv_cache: [2, num_blocks, block_size,
    KVH, d]`` (which already holds this step's K/V).

    Returns ``[T, H, d]``. Grouped-query attention: ``H`` must be a multiple of ``KVH``.
    """
    _, _, bs, kvh, d = kv_cache.shape
    D = meta.num_decodes
    if D and not meta.prefills:  # decode-only iteration: SDPA's output is the result
        return _decode_attention(q, kv_cache, meta, scale)
    out = torch.empty_like(q)
    if D:
        out[:D] = _decode_attention(q[:D], kv_cache, meta, scale)
    for p in meta.prefills:
        n, ctx = p.num_tokens, p.start_position + p.num_tokens
        kv = kv_cache[:, p.block_table].view(2, 1, -1, kvh, d)[:, :, :ctx].transpose(2, 3)  # [2, 1, KVH, ctx, d]
        k, v = kv[0], kv[1]
        qc = q[p.token_start:p.token_start + n].transpose(0, 1).unsqueeze(0)
        if p.start_position == 0:
            o = F.scaled_dot_product_attention(qc, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            qpos = torch.arange(p.start_position, ctx, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= qpos
            o = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[p.token_start:p.token_start + n] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: Optional[float]) -> torch.Tensor:
    """One query per sequence, ``q: [D, H, d]`` -> ``[D, H, d]`` (:func:`decode_attention` with the
    metadata's block tables and shared decode mask)."""
    return decode_attention(q, kv_cache, meta.decode_block_tables, meta.decode_mask(kv_cache.shape[2], q.dtype), scale)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, mask: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """One query per sequence, ``q: [D, H, d]`` -> ``[D, H, d]``: one gather of K and V through
    ``block_tables: [D, W]`` (long), one SDPA call with the additive ``mask: [D, 1, 1, W * block_size]``
    (:meth:`AttentionMetadata.decode_mask`). A pure tensor function (no metadata object, no host
    read), so :mod:`cluster.model.compile` traces it inside the compiled decode graphs."""
    _, _, bs, kvh, d = kv_cache.shape
    D, width = block_tables.shape
    kv = kv_cache[:, block_tables].view(2, D, width * bs, kvh, d).transpose(2, 3)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kv[0], kv[1], attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(2)
