"""Model runner: the only piece that turns scheduler output into tensors and runs the model.

One runner per tensor-parallel rank. Every rank runs the same forward (collectives inside keep them
in step); rank 0 samples, keeps the per-request sampling state and returns the tokens.
"""
from __future__ import annotations

import itertools
import math
from array import array
from typing import Optional

import torch

from cluster.config import ExitConfig, ModelConfig
from cluster.core.outputs import ModelRunnerOutput, SchedulerOutput
from cluster.model.exits import ExitBatch, ExitHeads, ExitResult, forward_with_exits
from cluster.model.layers.attention import AttentionMetadata, PrefillChunk
from cluster.model.llama import LlamaForCausalLM
from cluster.model.layers.quant import QuantizedWeight
from cluster.model.layers.sampler import TokenHistory, host_to_device, sample


class SamplingStates:
    """Per-request sampling state of the driver rank, kept until the request id shows up in
    ``SchedulerOutput.finished_req_ids`` (preemption keeps it).

    * a ``torch.Generator`` on the logits' device for each request with a seed;
    * for requests whose params ``uses_penalties``: one row of ``counts [capacity, V]`` int32 (how
      often each token was sampled so far; the runner adds each sampled token) and of
      ``prompt_mask [capacity, V]`` bool (token in the prompt), both on the logits' device. Rows are
      reused after a request finishes; capacity doubles when full.
    """

    def __init__(self):
        self.generators: dict[str, torch.Generator] = {}
        self.slots: dict[str, int] = {}
        self._free: list[int] = []
        self.counts: Optional[torch.Tensor] = None
        self.prompt_mask: Optional[torch.Tensor] = None

    def generator(self, request_id: str, seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
        if seed is None:
            return None
        g = self.generators.get(request_id)
        if g is None:
            g = self.generators[request_id] = torch.Generator(device=device).manual_seed(seed)
        return g

    def add_prompt(self, request_id: str, prompt_token_ids: list[int], vocab_size: int, device: torch.device) -> None:
        """Start the token history of a request with penalties (sent once, at its first scheduling)."""
        if request_id in self.slots:
            return
        if not self._free:
            self._grow(vocab_size, device)
        slot = self.slots[request_id] = self._free.pop()
        self.counts[slot].zero_()
        self.prompt_mask[slot].zero_()
        ids = [t for t in prompt_token_ids if 0 <= t < vocab_size]
        if ids:
            self.prompt_mask[slot, host_to_device(ids, torch.long, device)] = True

    def _grow(self, vocab_size: int, device: torch.device) -> None:
        old = 0 if self.counts is None else self.counts.shape[0]
        cap = max(8, 2 * old)
        counts = torch.zeros(cap, vocab_size, dtype=torch.int32, device=device)
        mask = torch.zeros(cap, vocab_size, dtype=torch.bool, device=device)
        if old:
            counts[:old] = self.counts
            mask[:old] = self.prompt_mask
        self.counts, self.prompt_mask = counts, mask
        self._free.extend(range(cap - 1, old - 1, -1))

    def history(self, request_ids: list[str]) -> tuple[Optional[TokenHistory], Optional[torch.Tensor]]:
        """The :class:`TokenHistory` of the batch rows that have one, and their slots ``[m]`` (device)."""
        rows = [i for i, rid in enumerate(request_ids) if rid in self.slots]
        if not rows:
            return None, None
        slots = host_to_device([self.slots[request_ids[i]] for i in rows], torch.long, self.counts.device)
        return TokenHistory(rows, self.counts.index_select(0, slots), self.prompt_mask.index_select(0, slots)), slots

    def append(self, history: Optional[TokenHistory], slots: Optional[torch.Tensor], token_ids: torch.Tensor,
               failed: dict[int, str]) -> None:
        """Count the sampled tokens ``token_ids [n]`` (device) of the history rows; failed rows got none."""
        if history is None:
            return
        keep = [j for j, r in enumerate(history.rows) if r not in failed]
        if not keep:
            return
        if len(keep) < len(history.rows):
            slots = slots.index_select(0, host_to_device(keep, torch.long, slots.device))
        toks = token_ids.index_select(0, host_to_device([history.rows[j] for j in keep], torch.long, token_ids.device))
        self.counts.index_put_((slots, toks), torch.ones_like(toks, dtype=torch.int32), accumulate=True)

    def drop(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)


class ModelRunner:
    """Owns the model, its exit heads, this rank's paged KV cache and (driver rank) the per-request
    sampling state (:class:`SamplingStates`).

    The device is the model's (its parameters'): the KV cache, every per-iteration tensor and every
    tensor of the forward and the sampler live there. The KV cache is one tensor ``[num_layers, 2,
    num_blocks, block_size, KVH_local, head_dim]``; with ``num_blocks=None`` it is allocated later by
    :meth:`initialize_cache` (after :meth:`profile_run` has measured what the device has left).
    """

    def __init__(self, model: LlamaForCausalLM, model_config: ModelConfig, exit_config: Optional[ExitConfig],
                 num_blocks: Optional[int], block_size: int, is_driver: bool = True):
        self.model = model
        self.model_config = model_config
        self.exit_config = exit_config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.heads = ExitHeads(model, exit_config) if exit_config is not None and exit_config.exit_layers else None
        self.block_size = block_size
        self.is_driver = is_driver
        self.kv_cache: Optional[torch.Tensor] = None
        self.kv_caches: list[torch.Tensor] = []  # per layer [2, num_blocks, block_size, KVH, d] views
        self.num_blocks = 0
        if num_blocks is not None:
            self.initialize_cache(num_blocks)
        self.sampling_states = SamplingStates()

    # ------------------------------------------------------------------------------------ memory
    def _cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        attn = self.model.model.layers[0].self_attn
        return (self.model_config.num_layers, 2, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block on this rank (all layers, K and V)."""
        return math.prod(self._cache_shape(1)) * self.dtype.itemsize

    @property
    def weights_bytes(self) -> int:
        """Bytes of this rank's weights (model and exit heads, quantized weights included; tied tensors once)."""
        seen, total = set(), 0
        mods = [self.model] + ([self.heads] if self.heads is not None else [])
        for m in mods:
            quant = (b for q in m.modules() if isinstance(q, QuantizedWeight) for b in q.buffers())
            for t in itertools.chain(m.parameters(), quant):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache (zeros: unused slots must hold finite values) on the model's device."""
        self.kv_cache = None
        self.kv_cache = torch.zeros(self._cache_shape(num_blocks), dtype=self.dtype, device=self.device)
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.num_blocks = num_blocks

    @torch.inference_mode()
    def profile_run(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> None:
        """The largest iterations the scheduler can send, on a scratch cache, to measure peak activation
        memory before the KV cache is sized: one prefill chunk of ``max_num_batched_tokens`` tokens,
        then a decode step of ``max_num_seqs`` rows at ``max_model_len`` context (sharing the scratch
        blocks) sampled with top-k and top-p (the sampler's largest buffers). Every rank runs it (the
        collectives run too); nothing is read back."""
        from cluster.core.outputs import ScheduledRequest
        from cluster.sampling import SamplingParams

        bs = self.block_size
        prefill = min(max_num_batched_tokens, max_model_len)  # a chunk never passes the context window
        nb = -(-max_model_len // bs)
        scratch = torch.zeros(self._cache_shape(nb), dtype=self.dtype, device=self.device)
        caches = list(scratch.unbind(0))
        table = list(range(nb))
        full = SamplingParams(max_tokens=1, temperature=1.0, top_k=50, top_p=0.9)
        steps = [
            [ScheduledRequest("profile-prefill", [0] * prefill, 0, table, True, False, full)],
            [ScheduledRequest(f"profile-decode-{i}", [0], max_model_len - 1, table, True, True, full,
                              exit_threshold=2.0) for i in range(min(max_num_seqs, max_num_batched_tokens))],
        ]
        for scheduled in steps:
            input_ids, positions, meta, batch = self.prepare(SchedulerOutput(scheduled=scheduled))
            result = forward_with_exits(self.model, self.heads, input_ids, positions, meta, caches, batch)
            if self.is_driver:
                sample(result.logits, [full] * result.logits.shape[0])
        del scratch, caches

    # ---------------------------------------------------------------------------------- one step
    def prepare(self, so: SchedulerOutput):
        """Build ``(input_ids [T], positions [T], AttentionMetadata, ExitBatch)`` for one iteration.

        Everything is gathered on the host into ONE int64 buffer (ids, positions, slot mapping, decode
        block tables and context lengths, prefill chunk tables, sample rows, eligibility, thresholds
        as float64 bits) and copied to the device once (pinned, non-blocking on CUDA); the tensors
        are views of that copy. No device value is read.
        """
        bs = self.block_size
        ids, pos, slots = [], [], []
        tables, lens, chunks = [], [], []
        rows, eligible, thresholds = [], [], []
        t = 0
        for sr in so.scheduled:
            n, s0, table = len(sr.token_ids), sr.start_position, sr.block_table
            ids += sr.token_ids
            if n == 1:
                pos.append(s0)
                slots.append(table[s0 // bs] * bs + s0 % bs)
            else:
                r = range(s0, s0 + n)
                pos += r
                slots += [table[p // bs] * bs + p % bs for p in r]
            if sr.exit_eligible:
                tables.append(table)
                lens.append(s0 + 1)
            else:
                chunks.append((t, n, s0, table))
            if sr.sample:
                # NaN: the exit config's default (per exit layer if calibrated); > 1: full model
                thr = float("nan") if sr.exit_threshold is None else float(sr.exit_threshold)
                rows.append(t + n - 1)
                eligible.append(sr.exit_eligible and self.heads is not None and not thr > 1.0)
                thresholds.append(thr)
            t += n
        D, S = len(tables), len(rows)
        width = max((len(b) for b in tables), default=1)
        eligible_rows = [j for j, e in enumerate(eligible) if e]
        buf = ids + pos + slots
        for b in tables:
            buf += b
            buf += [0] * (width - len(b))
        buf += lens
        for c in chunks:
            buf += c[3]
        buf += rows
        buf += [int(e) for e in eligible]
        buf += eligible_rows
        buf += array("q", array("d", thresholds).tobytes())  # float64 bits: NaN survives
        parts = [t, t, t, D * width, D] + [len(c[3]) for c in chunks] + [S, S, len(eligible_rows), S]
        views = host_to_device(buf, torch.long, self.device).split(parts)
        input_ids, positions, slot_mapping, bt, ctx_lens = views[:5]
        prefills = [PrefillChunk(c[0], c[1], c[2], v) for c, v in zip(chunks, views[5:5 + len(chunks)])]
        sample_rows, elig, elig_rows, thr_bits = views[5 + len(chunks):]
        meta = AttentionMetadata(slot_mapping, D, bt.view(D, width), ctx_lens, prefills)
        batch = ExitBatch(sample_rows, elig.bool(), thr_bits.view(torch.float64).to(torch.float32),
                          host_rows=rows, host_eligible=eligible, eligible_rows=elig_rows)
        return input_ids, positions, meta, batch

    @torch.inference_mode()
    def forward(self, so: SchedulerOutput) -> ExitResult:
        if self.kv_cache is None:
            raise RuntimeError("the KV cache is not allocated yet (initialize_cache)")
        input_ids, positions, meta, batch = self.prepare(so)
        return forward_with_exits(self.model, self.heads, input_ids, positions, meta, self.kv_caches, batch)

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """Run one iteration; returns the sampled tokens on the driver rank, None elsewhere.

        A failure of the forward raises; a failure while sampling one request's row is reported in
        ``ModelRunnerOutput.failed`` (that request gets no token, the others do). The sampling step
        makes one device->host transfer (tokens, exit layers and logprobs together).
        """
        states = self.sampling_states
        for rid in so.finished_req_ids:
            states.drop(rid)
        if so.is_empty:
            return ModelRunnerOutput() if self.is_driver else None
        result = self.forward(so)
        if not self.is_driver:
            return None
        logits = result.logits
        dev, vocab = logits.device, logits.shape[1]
        for sr in so.scheduled:
            if sr.prompt_token_ids is not None and sr.sampling_params.uses_penalties:
                states.add_prompt(sr.request_id, sr.prompt_token_ids, vocab, dev)
        sampled = [sr for sr in so.scheduled if sr.sample]
        rids = [sr.request_id for sr in sampled]
        params = [sr.sampling_params for sr in sampled]
        gens = [states.generator(sr.request_id, sr.sampling_params.seed, dev) for sr in sampled]
        history, slots = states.history(rids)
        out = sample(logits, params, gens, history=history,
                     num_output_tokens=[sr.num_output_tokens for sr in sampled],
                     eos_token_ids=[sr.eos_token_ids for sr in sampled],
                     guided_bitmasks=[sr.guided_bitmask for sr in sampled])
        states.append(history, slots, out.token_ids, out.failed)
        tokens, (layers,), logprobs = out.to_host(result.exit_layers)
        ok = [i for i in range(len(sampled)) if i not in out.failed]
        return ModelRunnerOutput(
            sampled_token_ids={rids[i]: tokens[i] for i in ok},
            exit_layers={rids[i]: layers[i] for i in ok},
            logprobs={rids[i]: lp for i, lp in logprobs.items()},
            failed={rids[i]: msg for i, msg in out.failed.items()},
        )
