"""``torch.compile`` of the decode step (``torch_compile=True``): :class:`DecodeGraphs`.

A decode-only iteration (one token per sequence, no prefill chunk, no drafts joining) runs each
*segment* of consecutive decoder layers between two exit checks as one graph traced by Dynamo and
lowered by Inductor (C++ kernels on the CPU, Triton on CUDA; on CUDA the matmuls, int4/int8
kernels included, stay PyTorch's kernels): norm, fused qkv, RoPE, the KV write, the block-table gather,
SDPA, o_proj, residuals and the MLP of every layer of the segment. Exit checks stay between graphs
(:func:`cluster.model.exits.forward_with_exits` asks for the segment up to the next exit layer
where some row may still exit; with no exit pending, e.g. the ``full`` mode and verification, the
whole decoder is one graph; ``layer_skip`` drafts run their kept-layer runs,
:func:`cluster.model.speculative.skip_draft_forward`). The KV write mutates the layer's cache tensor
in place inside the graph, which is why every layer's cache is its own allocation (a view of one
shared tensor would be copied whole at each call).

On the CPU the graphs are compiled with Inductor's max-autotune GEMM templates and frozen weights
(:func:`inductor_options`): the int4 matmuls then run Inductor's C++ WoQ-int4 template, whose AMX
micro-kernel dequantizes a weight block once for all rows, where ``_weight_int4pack_mm_for_cpu``
costs about one weight read per few rows (the whole int4 decoder of SmolLM2-135M: 8.1 / 11 / 32 / 60
ms at 1 / 4 / 16 / 32 rows with the aten kernel, 5.3 / 10 / 11 / 13 ms with the template; 2 threads,
AVX-512 + AMX). Frozen weights are constants of the graph, so Dynamo guards the parameters by
identity: each engine (each set of weights) compiles its own graphs, and Inductor's on-disk cache
key carries a digest of the weights (:func:`weights_fingerprint`, :func:`frozen_weights`). The template's rows do not
depend on their batch-mates for ``D >= 2``; ``D == 1`` is its own graph (another micro-kernel), so a
sequence's result can differ in the last bits between batch 1 and larger batches.

An iteration with prompt tokens (prefill chunks, with or without decode rows beside them) runs the
same segments as *prompt graphs* (:meth:`DecodeGraphs.run_prompts`, ``T`` tokens, dynamic; one
token runs padded to two): the dense halves of every layer compiled, the KV write and paged
attention of the iteration as one operator opaque to the compiler (:func:`write_kv_and_attend`: its Python loop
over the chunks runs eagerly inside the graph, reading the iteration's metadata from a context
variable). Prompts are where the int4 template gains most: 16 chat prompts (1136 tokens) prefill
in 1.25-1.7 s instead of 3.6 s (SmolLM2-135M, 2 threads). The prompt graph's rows do not depend
on the row count, so a repeated request's answer is bitwise the same whether its prefill was
chunked or a prefix-cache tail (tests/test_compile.py). A model with ``dense_prefill``'s bfloat16 copies keeps its prompts eager.
Iterations with rows joining mid-decoder or leaving after an exit run eagerly.

Shapes: ``D`` (decode rows) and ``W`` (block-table width) are dynamic; Dynamo specializes sizes 0
and 1, so a decode graph exists for ``D == 1`` and for ``D >= 2`` (the block table is padded to
``W >= 2`` with masked columns so ``W`` never specializes). :meth:`DecodeGraphs.warm_up` compiles
both at start-up, and the prompt graphs (traced at ``T = 97``). Decode rows always use
the quantized kernels, never ``dense_prefill``'s copies. Tensor parallelism > 1 runs eager layers
(the all-reduce stays outside graphs).

The compiled artifacts are cached on disk (Inductor's FX graph and AOTAutograd caches) under
``$EESERVE_CACHE_DIR/inductor`` (:func:`use_cache_dir`, unless ``TORCHINDUCTOR_CACHE_DIR`` is set),
so a second start with the same model, PyTorch and machine skips code generation and autotuning.
It still traces, and frozen graphs are frozen again before the cache lookup (Dynamo, AOTAutograd
and the freezing passes over 30 layers): with the templates a cached start of SmolLM2-135M
measured 167 s (decode graphs 45 + 65 s, prompt graph 48 s) against 17 s for graphs without
frozen weights. Start-up and step times: ``bench/compile_step.py``.

Compiled kernels reorder floating-point operations, so outputs can differ from the eager model's in
the last bits (greedy tokens may diverge after a near-tie); tests that compare runs token for token
use the eager model.

Docs: https://pytorch.org/docs/stable/torch.compiler.html,
https://pytorch.org/tutorials/recipes/torch_compile_caching_tutorial.html
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from typing import Optional

import torch
import torch._inductor.config as inductor_config
import torch.compiler.config as compiler_config
import torch.nn.functional as F

from cluster.model.layers.attention import AttentionMetadata, PrefillChunk, decode_attention, paged_attention, write_kv
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


# the environment switch for the CPU's GEMM templates (``0`` turns them off: the graphs call PyTorch's
# matmul kernels, as on CUDA); for A/B benchmarks (bench/compile_step.py's aten-GEMMs variant)
TEMPLATES_ENV = "EESERVE_GEMM_TEMPLATES"


def inductor_options(device: torch.device) -> dict:
    """Inductor options of the decode graphs on ``device``: on the CPU max-autotune over Inductor's C++
    GEMM templates and PyTorch's kernels (the WoQ int4 template needs frozen weights, which
    :func:`frozen_weights` turns on while :class:`DecodeGraphs` calls its graphs); none on CUDA
    (Triton autotuning of the bfloat16 GEMMs is unmeasured) or when ``$EESERVE_GEMM_TEMPLATES`` is
    ``0``.

    Docs: https://pytorch.org/tutorials/prototype/max_autotune_on_CPU_tutorial.html
    """
    if device.type != "cpu" or os.environ.get(TEMPLATES_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return {}
    return {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "freezing": True}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hex digest of every parameter and buffer of ``model`` (names, shapes, dtypes and bytes).

    Frozen weights are constants inside the compiled code, but Inductor's on-disk FX graph cache keys
    a graph by its code and input shapes, not by the constants' values: without this digest in the
    key (``torch.compiler.config.cache_key_tag``) a second model of the same shapes (a fine-tune, a
    re-quantized checkpoint) would load the first one's graphs and compute with the first one's
    weights. Reads every byte once (about 0.1 s per 100 MB on the CPU)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        data = t.detach().to("cpu").contiguous()
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


@contextlib.contextmanager
def frozen_weights(cache_tag: str):
    """The context a graph with frozen weights is traced, compiled and called in: Inductor's
    ``freezing`` on and ``cache_key_tag`` set to ``cache_tag`` (:func:`weights_fingerprint` of the
    weights it freezes), so the on-disk cache never serves it to other weights."""
    with inductor_config.patch(freezing=True), compiler_config.patch(cache_key_tag=cache_tag):
        yield


# The attention metadata of the iteration a prompt graph is running (:meth:`DecodeGraphs.run_prompts`
# sets it around the call): prefill chunks are a host-side list, which a graph cannot take as input
_ITERATION_META: contextvars.ContextVar[AttentionMetadata] = contextvars.ContextVar("eeserve_iteration_meta")


@torch.library.custom_op("eeserve::write_kv_and_attend", mutates_args=("kv_cache",))
def write_kv_and_attend(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """One layer's KV write and paged attention of an iteration with prefill chunks, as one operator
    opaque to Dynamo and Inductor (its Python loop over the chunks stays eager between the compiled
    dense halves): ``q: [T, H, d]``, ``kv: [2, T, KVH, d]``, ``kv_cache: [2, num_blocks, block_size,
    KVH, d]`` (written in place) -> ``[T, H, d]`` contiguous. The slots, chunks and decode rows come
    from the metadata :meth:`DecodeGraphs.run_prompts` set (:func:`write_kv`,
    :func:`paged_attention`); rows past its ``n = len(slot_mapping)`` tokens are padding (not
    written, zero outputs).

    Raises:
        LookupError: called outside :meth:`DecodeGraphs.run_prompts`.
    """
    meta = _ITERATION_META.get()
    n = meta.slot_mapping.shape[0]
    write_kv(kv_cache, kv[:, :n], meta.slot_mapping)
    o = paged_attention(q[:n], kv_cache, meta)
    return o.contiguous() if n == q.shape[0] else torch.cat([o, o.new_zeros(q.shape[0] - n, *o.shape[1:])])


@write_kv_and_attend.register_fake
def _(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


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

        self.options = inductor_options(next(model.parameters()).device)
        self._segment = torch.compile(segment, dynamic=True, options=self.options)
        # Dynamo reads the freezing flag when it traces (frozen parameters get identity guards), so
        # it is set around every call, not only in the options Inductor sees; frozen graphs carry
        # the weights, so the cache key carries their digest (weights_fingerprint)
        self._cache_tag = weights_fingerprint(model) if self.options.get("freezing") else ""  # "": not frozen
        self.ready: set[tuple[int, int]] = set()  # segments compiled by warm_up

        def prompts(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[torch.Tensor],
                    start: int, end: int) -> torch.Tensor:
            for i in range(start, end):
                layer = layers[i]
                q, kv = layer.attn_in(h, cos, sin)
                h = layer.attn_out(h, write_kv_and_attend(q, kv, kv_caches[i - start]))
            return h

        # iterations with prompt tokens (prefill chunks, with or without decode rows): the same layers
        # with the attention as one opaque operator; their GEMMs have many rows, where the C++ int4
        # template beats the aten kernel most (prompts are multiplied by the quantized weights, as
        # eagerly; a model with dense_prefill's copies keeps running them eagerly)
        self._prompts = torch.compile(prompts, dynamic=True, options=self.options)
        self.prompts_ready: set[tuple[int, int]] = set()  # segments compiled by warm_up for prompts
        self._dense_prefill = model.config.dense_prefill

        norm, lm_head = model.model.norm, model.lm_head

        def head(h: torch.Tensor) -> torch.Tensor:
            return lm_head.local_logits(norm(h))

        # the final norm + LM head of every iteration's sampled rows (decode or not: the head is
        # row-wise); the int8 head's matmul is the largest of the step
        self._head = torch.compile(head, dynamic=True, options=self.options)
        self.head_ready = False  # compiled by warm_up

    def _call(self, fn, *args):
        if not self._cache_tag:
            return fn(*args)
        with frozen_weights(self._cache_tag):
            return fn(*args)

    def local_logits(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """The compiled :meth:`LlamaForCausalLM.final_local_logits`: ``h: [n, hidden]`` final-layer
        states -> ``[n, V_local]`` float32 logits, or None when no graph serves ``h`` (before
        :meth:`warm_up`, ``n == 0``, or with autograd on: callers then run the eager head)."""
        if not self.head_ready or h.shape[0] == 0 or torch.is_grad_enabled():
            return None
        return self._call(self._head, h)

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
        return self._call(self._segment, h, cos, sin, meta.slot_mapping, tables, mask, kv_caches[start:end], start, end)

    def serves_prompts(self, start: int, end: int) -> bool:
        """Whether :meth:`run_prompts` has a start-up graph for segment ``start .. end - 1``."""
        return (start, end) in self.prompts_ready

    def run_prompts(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    kv_caches: list[torch.Tensor], start: int, end: int) -> torch.Tensor:
        """Decoder layers ``start .. end - 1`` over an iteration with prefill chunks (and any decode
        rows before them): ``h: [T, hidden]``, ``positions: [T]``; writes the tokens' K/V of those
        layers and returns the state after layer ``end - 1``, ``[T, hidden]``. The attention runs
        eagerly inside the graph (:func:`write_kv_and_attend`). One token (a prefix-cache hit that
        leaves only the last prompt token) runs padded to two rows, so that it takes the same
        graph, and the same arithmetic, as the tokens of a longer prefill."""
        n = h.shape[0]
        if n == 1:  # Dynamo would specialize T == 1 into a graph of its own
            h, positions = h.repeat(2, 1), positions.repeat(2)
        cos, sin = self.rotary.tables(positions, h.dtype)
        token = _ITERATION_META.set(meta)
        try:
            return self._call(self._prompts, h, cos, sin, kv_caches[start:end], start, end)[:n]
        finally:
            _ITERATION_META.reset(token)

    # Shapes traced at warm-up: Dynamo unifies equal sizes ("duck sizing") and a size equal to a
    # constant of the code (K/V's 2, the block size, the head counts) gets specialized with it, so the
    # traced D and W are primes no model dimension takes
    WARM_ROWS, WARM_WIDTH, WARM_PROMPT = (1, 7), 5, 97

    @torch.inference_mode()
    def warm_up(self, kv_caches: list[torch.Tensor], segments: list[tuple[int, int]], dtype: torch.dtype) -> None:
        """Compile the graphs of ``segments`` and of the head for ``D == 1`` and ``D >= 2`` by running
        them on zero states that write block 0 of ``kv_caches`` (a block nothing reads before writing it)."""
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
            self._call(self._head, torch.zeros(d, hidden, dtype=dtype, device=dev))
        self.ready.update(segments)
        self.head_ready = True
        if self._dense_prefill:
            return
        # one prompt of WARM_PROMPT tokens at position 0 writing block 0
        n = self.WARM_PROMPT
        bs = kv_caches[0].shape[2]
        blocks = torch.zeros((n + bs - 1) // bs, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=dev) % bs, num_decodes=0,
            decode_block_tables=torch.zeros(0, 1, dtype=torch.long, device=dev),
            decode_context_lens=torch.zeros(0, dtype=torch.long, device=dev),
            prefills=[PrefillChunk(0, n, 0, blocks)])
        positions = torch.arange(n, device=dev)
        for start, end in segments:
            self.run_prompts(torch.zeros(n, hidden, dtype=dtype, device=dev), positions, meta, kv_caches, start, end)
        self.prompts_ready.update(segments)


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
