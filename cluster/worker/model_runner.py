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
from cluster.core.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from cluster.model.exits import ExitBatch, ExitHeads, ExitResult, Join, forward_with_exits
from cluster.model.layers.attention import AttentionMetadata, PrefillChunk
from cluster.model.llama import LlamaForCausalLM
from cluster.model.layers.quant import QuantizedWeight
from cluster.model.layers.sampler import TokenHistory, host_to_device, sample
from cluster.worker.spec_decode import SpecDecoder, RowState


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
        self.spec_decoder = SpecDecoder(self)

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
                              full_depth=True) for i in range(min(max_num_seqs, max_num_batched_tokens))],
        ]
        for scheduled in steps:
            input_ids, positions, meta, batch = self.prepare(SchedulerOutput(scheduled=scheduled))
            result = forward_with_exits(self.model, self.heads, input_ids, positions, meta, caches, batch)
            if self.is_driver:
                sample(result.logits, [full] * result.logits.shape[0])
        del scratch, caches

    # ---------------------------------------------------------------------------------- one step
    def prepare(self, so: SchedulerOutput, rows_of: Optional[dict[str, RowState]] = None):
        """Build ``(input_ids [T], positions [T], AttentionMetadata, ExitBatch)`` for one iteration.

        Everything is gathered on the host into ONE int64 buffer (ids, positions, slot mapping, decode
        block tables and context lengths, prefill chunk tables, sample rows, eligibility, thresholds
        as float64 bits, the slot mappings of joining rows) and copied to the device once (pinned,
        non-blocking on CUDA); the tensors are views of that copy. No device value is read.

        ``rows_of``: requests whose rows are given by a :class:`RowState` (drafts to verify, a row
        re-run from its exit): each row is a decode row of its own (its context: every position up to
        it), sampled, never exit-eligible; rows with ``depth > 0`` join at that depth (:class:`Join`).
        Layout of the ``T`` tokens: joining rows first, deepest first (so the rows that run at a
        layer are always a suffix of the batch), then the other decode rows, then prefill chunks.
        Sample rows follow ``so.scheduled``' order (a ``rows_of`` request: its rows in order).
        """
        bs = self.block_size
        ids, pos, slots = [], [], []
        tables, lens, chunks = [], [], []
        rows, eligible, thresholds = [], [], []
        joining: list[tuple[int, int, int, int, list[int], torch.Tensor]] = []  # (depth, order, tok, pos, table, state)
        fresh_rows: dict[tuple[str, int], int] = {}  # (request, row) -> its token index when not joining
        t = 0
        if rows_of:
            for sr in so.scheduled:
                rs = rows_of.get(sr.request_id)
                if rs is None:
                    continue
                for j, tok in enumerate(rs.tokens(sr)):
                    if rs.depths[j]:
                        joining.append((rs.depths[j], len(joining), tok, sr.start_position + j, sr.block_table,
                                        rs.hidden[j]))
            joining.sort(key=lambda e: (-e[0], e[1]))
            for _, _, tok, p, table, _ in joining:
                ids.append(tok)
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                tables.append(table)
                lens.append(p + 1)
            t = len(joining)
            for sr in so.scheduled:  # the joining rows' non-joining siblings: plain decode rows
                rs = rows_of.get(sr.request_id)
                if rs is None:
                    continue
                for j, tok in enumerate(rs.tokens(sr)):
                    if not rs.depths[j]:
                        p = sr.start_position + j
                        ids.append(tok)
                        pos.append(p)
                        slots.append(sr.block_table[p // bs] * bs + p % bs)
                        tables.append(sr.block_table)
                        lens.append(p + 1)
                        fresh_rows[(sr.request_id, j)] = t
                        t += 1
        join_tok = iter(range(len(joining)))  # joining rows in their order of appearance
        order_to_tok = {e[1]: k for k, e in enumerate(joining)}
        for sr in so.scheduled:
            n, s0, table = len(sr.token_ids), sr.start_position, sr.block_table
            rs = rows_of.get(sr.request_id) if rows_of else None
            if rs is not None:
                for j in range(len(rs.depths)):
                    if rs.depths[j]:
                        tok_index = order_to_tok[next(join_tok)]
                    else:
                        tok_index = fresh_rows[(sr.request_id, j)]
                    rows.append(tok_index)
                    eligible.append(False)
                    thresholds.append(float("nan"))
                continue
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
                # NaN: the exit config's default (per exit layer if calibrated)
                thr = float("nan") if sr.exit_threshold is None else float(sr.exit_threshold)
                rows.append(t + n - 1)
                eligible.append(sr.exit_eligible and self.heads is not None and not sr.full_depth)
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
        joins = []
        k = len(joining)
        while k:  # shallowest first; the rows of one depth are consecutive tokens
            d = joining[k - 1][0]
            j = k
            while j and joining[j - 1][0] == d:
                j -= 1
            joins.append(Join(d, j, k - j, torch.stack([e[5] for e in joining[j:k]])))
            k = j
        meta = AttentionMetadata(slot_mapping, D, bt.view(D, width), ctx_lens, prefills)
        batch = ExitBatch(sample_rows, elig.bool(), thr_bits.view(torch.float64).to(torch.float32),
                          host_rows=rows, host_eligible=eligible, eligible_rows=elig_rows, joins=joins)
        return input_ids, positions, meta, batch

    @torch.inference_mode()
    def forward(self, so: SchedulerOutput, rows_of: Optional[dict[str, RowState]] = None) -> ExitResult:
        """The iteration's forward (``rows_of``: see :meth:`prepare`), then the stop-token rule of the
        lossy exits: a row whose exit argmax is a stop token of its request (EOS unless
        ``ignore_eos``, ``stop_token_ids``) is run again from its exit layer to the last layer (its
        true K/V replace the KV fill), so stop tokens only come from the full model. Costs one
        device->host read of the exited rows' argmax when rows exited."""
        if self.kv_cache is None:
            raise RuntimeError("the KV cache is not allocated yet (initialize_cache)")
        input_ids, positions, meta, batch = self.prepare(so, rows_of)
        result = forward_with_exits(self.model, self.heads, input_ids, positions, meta, self.kv_caches, batch)
        if result.exited_rows:
            self._rerun_stop_exits(so, rows_of, result)
        return result

    def _rerun_stop_exits(self, so: SchedulerOutput, rows_of, result: ExitResult) -> None:
        dev = result.logits.device
        plain = self._sample_layout(so, rows_of or {})[1]  # only plain rows take lossy exits
        exited = result.exited_rows
        idx = host_to_device(exited, torch.long, dev)
        top, depth = torch.stack([result.logits.index_select(0, idx).argmax(dim=-1),
                                  result.exit_layers.index_select(0, idx)]).tolist()
        again = []
        for j, tok, d in zip(exited, top, depth):
            sr = plain[j]
            p = sr.sampling_params
            if tok in p.stop_token_ids or (tok in sr.eos_token_ids and not p.ignore_eos):
                again.append((j, sr, d))
        if not again:
            return
        sub = SchedulerOutput(scheduled=[sr for _, sr, _ in again])
        rows = {sr.request_id: RowState(depths=[d], hidden=[result.hidden[j]]) for j, sr, d in again}
        input_ids, positions, meta, batch = self.prepare(sub, rows)
        full = forward_with_exits(self.model, self.heads, input_ids, positions, meta, self.kv_caches, batch)
        idx = host_to_device([j for j, _, _ in again], torch.long, dev)
        result.logits.index_copy_(0, idx, full.logits)
        result.exit_layers.index_fill_(0, idx, self.model_config.num_layers)

    @staticmethod
    def _sample_layout(so: SchedulerOutput,
                       rows_of: dict[str, RowState]) -> tuple[dict[str, int], dict[int, "ScheduledRequest"]]:
        """Where each request's rows sit among the sample rows (:meth:`prepare`'s order): ``({request
        with rows_of: its first sample row}, {sample row: request sampled the plain way})``."""
        first, plain, j = {}, {}, 0
        for sr in so.scheduled:
            if sr.request_id in rows_of:
                first[sr.request_id] = j
                j += len(rows_of[sr.request_id].depths)
            elif sr.sample:
                plain[j] = sr
                j += 1
        return first, plain

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """Run one iteration; returns the sampled tokens on the driver rank, None elsewhere.

        Requests scheduled with ``num_draft_tokens > 0`` draft first and are verified in the
        iteration's forward (:mod:`cluster.worker.spec_decode`); they report their verified tokens in
        ``ModelRunnerOutput.spec_token_ids``. A failure of the forward raises; a failure while
        sampling one request's row is reported in ``ModelRunnerOutput.failed`` (that request gets no
        token, the others do). The plain sampling step makes one device->host transfer (tokens, exit
        layers and logprobs together).
        """
        states = self.sampling_states
        for rid in so.finished_req_ids:
            states.drop(rid)
        if so.is_empty:
            return ModelRunnerOutput() if self.is_driver else None
        spec = [sr for sr in so.scheduled if sr.num_draft_tokens]
        rows_of = self.spec_decoder.draft(spec) if spec else None
        result = self.forward(so, rows_of)
        if not self.is_driver:
            return None
        logits, exit_layers = result.logits, result.exit_layers
        dev, vocab = logits.device, logits.shape[1]
        out = ModelRunnerOutput()
        if rows_of:
            first, plain = self._sample_layout(so, rows_of)
            out.spec_token_ids, out.spec_exit_layers, out.failed = self.spec_decoder.accept(
                spec, rows_of, logits, first)
            out.num_drafts = {rid: len(rs.drafts) for rid, rs in rows_of.items()}
            if not plain:
                return out
            idx = host_to_device(list(plain), torch.long, dev)
            logits, exit_layers = logits.index_select(0, idx), exit_layers.index_select(0, idx)
        for sr in so.scheduled:
            if sr.prompt_token_ids is not None and sr.sampling_params.uses_penalties:
                states.add_prompt(sr.request_id, sr.prompt_token_ids, vocab, dev)
        sampled = [sr for sr in so.scheduled if sr.sample and not (rows_of and sr.request_id in rows_of)]
        rids = [sr.request_id for sr in sampled]
        params = [sr.sampling_params for sr in sampled]
        gens = [states.generator(sr.request_id, sr.sampling_params.seed, dev) for sr in sampled]
        history, slots = states.history(rids)
        res = sample(logits, params, gens, history=history,
                     num_output_tokens=[sr.num_output_tokens for sr in sampled],
                     eos_token_ids=[sr.eos_token_ids for sr in sampled],
                     guided_bitmasks=[sr.guided_bitmask for sr in sampled])
        states.append(history, slots, res.token_ids, res.failed)
        tokens, (layers,), logprobs = res.to_host(exit_layers)
        ok = [i for i in range(len(sampled)) if i not in res.failed]
        out.sampled_token_ids = {rids[i]: tokens[i] for i in ok}
        out.exit_layers = {rids[i]: layers[i] for i in ok}
        out.logprobs = {rids[i]: lp for i, lp in logprobs.items()}
        out.failed.update({rids[i]: msg for i, msg in res.failed.items()})
        return out
