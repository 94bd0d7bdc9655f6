"""``torch.compile`` of the decode step (``torch_compile=True``): :class:`DecodeGraphs`.

A decode-only iteration (one token per sequence, no prefill chunk, no drafts joining) runs each
*segment* of consecutive decoder layers between two exit checks as one graph traced by Dynamo and
lowered by Inductor (C++ kernels on the CPU, Triton on CUDA; the matmuls, int4/int8 kernels
included, stay PyTorch's kernels): norm, fused qkv, RoPE, the KV write, the block-table gather,
SDPA, o_proj, residuals and the MLP of every layer of the segment. Exit checks stay between graphs
(:func:`cluster.model.exits.forward_with_exits` asks for the segment up to the next exit layer
where some row may still exit; with no exit pending, e.g. the ``full`` mode and verification, the
whole decoder is one graph; ``layer_skip`` drafts run their kept-layer runs,
:func:`cluster.model.speculative.skip_draft_forward`). The KV write mutates the layer's cache tensor
in place inside the graph, which is why every layer's cache is its own allocation (a view of one
shared tensor would be copied whole at each call).

Every other iteration (prefill chunks, mixed batches, rows leaving after an exit) runs eagerly: it
is bound by its matmuls (with ``dense_prefill``, bfloat16 GEMMs), not by Python.

Shapes: ``D`` (decode rows) and ``W`` (block-table width) are dynamic; Dynamo specializes sizes 0
and 1, so a decode graph exists for ``D == 1`` and for ``D >= 2`` (the block table is padded to
``W >= 2`` with masked columns so ``W`` never specializes). :meth:`DecodeGraphs.warm_up` compiles
both at start-up. Decode rows always use the quantized kernels, never ``dense_prefill``'s copies. Tensor parallelism > 1 runs eager decode layers (the all-reduce stays outside graphs).

The compiled artifacts are cached on disk (Inductor's FX graph and AOTAutograd caches) under
``$EESERVE_CACHE_DIR/inductor`` (:func:`use_cache_dir`, unless ``TORCHINDUCTOR_CACHE_DIR`` is set),
so a second start with the same model, PyTorch and machine skips code generation and only traces.
Start-up and step times: ``bench/compile_step.py``.

Compiled kernels reorder floating-point operations, so outputs can differ from the eager model's in
the last bits (greedy tokens may diverge after a near-tie); tests that compare runs token for token
use the eager model.

Docs: https://pytorch.org/docs/stable/torch.compiler.html,
https://pytorch.org/tutorials/recipes/torch_compile_caching_tutorial.html
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from cluster.model.layers.attention import AttentionMetadata, decode_attention, write_kv
from cluster.model.llama import LlamaForCausalLM

# graphs per compiled function: D == 1 / D >= 2, times the segments of a lossy exit config
RECOMPILE_LIMIT = 64


def use_cache_dir() -> str:
    """Point Inductor's on-disk caches at ``$EESERVE_CACHE_DIR/inductor`` unless
    ``TORCHINDUCTOR_CACHE_DIR`` is already set; returns the directory in use."""
    from cluster.model.loader import cache_dir

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        path = cache_dir() / "inductor"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)


def compile_decoder_layers(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Attach :class:`DecodeGraphs` as ``model.decode_graphs`` (tensor-parallel size 1 only; with
    more ranks the model stays eager); the graphs compile in :meth:`DecodeGraphs.warm_up`.

    Raises:
        RuntimeError: ``torch.compile`` is unavailable on this platform (raised by PyTorch).
    """
    from cluster.distributed import tp_size

    use_cache_dir()
    _raise_recompile_limit()
    model.decode_graphs = DecodeGraphs(model) if tp_size() == 1 else None
    return model


class DecodeGraphs:
    """Compiled decode segments of one model (see the module docstring)."""

    MIN_WIDTH = 2  # block-table width the graphs see (a width of 1 would specialize)

    def __init__(self, model: LlamaForCausalLM):
        self.layers = model.model.layers
        self.rotary = self.layers[0].self_attn.rotary
        layers = self.layers

        def segment(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                    block_tables: torch.Tensor, mask: torch.Tensor, kv_caches: list[torch.Tensor],
                    start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            states = []
            for i in range(start, end):
                layer = layers[i]
                q, kv = layer.attn_in(h, cos, sin)
                write_kv(kv_caches[i - start], kv, slot_mapping)
                h = layer.attn_out(h, decode_attention(q, kv_caches[i - start], block_tables, mask))
                states.append(h)
            return h, torch.stack(states)

        self._segment = torch.compile(segment, dynamic=True)
        self.ready: set[tuple[int, int]] = set()  # segments compiled by warm_up

    def is_ready(self, start: int, end: int) -> bool:
        """Whether the segment ``start .. end - 1`` was compiled at start-up. Callers run other
        segments eagerly: compiling one while serving would stall every request for a minute."""
        return (start, end) in self.ready

    def run(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            kv_caches: list[torch.Tensor], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layers ``start .. end - 1`` (0-based) over a decode-only batch: ``h: [D, hidden]``
        (the state entering layer ``start``), ``positions: [D]``, ``meta`` with ``num_decodes == D``
        and no prefill chunk, ``kv_caches`` every layer's cache. Writes the rows' K/V of those layers
        and returns the state after layer ``end - 1``, ``[D, hidden]``, and the state after each
        layer, ``[end - start, D, hidden]`` (what online skip selection reads from a verification,
        :mod:`cluster.worker.spec_decode`: one graph serves iterations with and without it, so a
        verification that keeps its states computes exactly what the full model does). No host read.
        """
        bs = kv_caches[0].shape[2]
        cos, sin = self.rotary.tables(positions, h.dtype)
        tables, mask = meta.decode_block_tables, meta.decode_mask(bs, h.dtype)
        pad = self.MIN_WIDTH - tables.shape[1]
        if pad > 0:  # masked extra columns (block 0, never visible): the graphs keep W symbolic
            tables = F.pad(tables, (0, pad))
            mask = F.pad(mask, (0, pad * bs), value=float("-inf"))
        return self._segment(h, cos, sin, meta.slot_mapping, tables, mask, kv_caches[start:end], start, end)

    # Shapes traced at warm-up: Dynamo unifies equal sizes ("duck sizing") and a size equal to a
    # constant of the code (K/V's 2, the block size, the head counts) gets specialized with it, so the
    # traced D and W are primes no model dimension takes
    WARM_ROWS, WARM_WIDTH = (1, 7), 5

    @torch.inference_mode()
    def warm_up(self, kv_caches: list[torch.Tensor], segments: list[tuple[int, int]], dtype: torch.dtype) -> None:
        """Compile the graphs of ``segments`` for ``D == 1`` and ``D >= 2`` by running them on zero
        states that write block 0 of ``kv_caches`` (a block nothing reads before writing it)."""
        dev = kv_caches[0].device
        hidden = self.layers[0].input_layernorm.weight.shape[0]
        for d in self.WARM_ROWS:
            meta = AttentionMetadata(
                slot_mapping=torch.zeros(d, dtype=torch.long, device=dev), num_decodes=d,
                decode_block_tables=torch.zeros(d, self.WARM_WIDTH, dtype=torch.long, device=dev),
                decode_context_lens=torch.ones(d, dtype=torch.long, device=dev))
            positions = torch.zeros(d, dtype=torch.long, device=dev)
            for start, end in segments:
                self.run(torch.zeros(d, hidden, dtype=dtype, device=dev), positions, meta, kv_caches, start, end)
        self.ready.update(segments)


def kept_segments(skip, num_layers: int) -> list[tuple[int, int]]:
    """The runs of consecutive decoder layers a ``layer_skip`` draft keeps: ``(start, end)`` 0-based,
    end exclusive, for the 1-based layer numbers ``skip`` left out of ``num_layers``."""
    segments, start = [], 0
    for i in range(num_layers + 1):
        if i == num_layers or i + 1 in skip:
            if i > start:
                segments.append((start, i))
            start = i + 1
    return segments


def decode_graphs(model: LlamaForCausalLM) -> Optional[DecodeGraphs]:
    """The model's :class:`DecodeGraphs`, or None (not compiled, or tensor parallel)."""
    return getattr(model, "decode_graphs", None)
