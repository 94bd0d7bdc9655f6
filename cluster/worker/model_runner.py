"""Model runner: the only piece that turns scheduler output into tensors and runs the model.

One runner per tensor-parallel rank. Every rank runs the same forward (collectives inside keep them
in step); rank 0 samples, keeps the per-request sampling state and returns the tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from cluster.config import ExitConfig, ModelConfig
from cluster.core.outputs import ModelRunnerOutput, SchedulerOutput
from cluster.model.exits import ExitBatch, ExitHeads, ExitResult, forward_with_exits
from cluster.model.layers.attention import AttentionMetadata, PrefillChunk
from cluster.model.llama import LlamaForCausalLM
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

    The KV cache is one tensor ``[num_layers, 2, num_blocks, block_size, KVH_local, head_dim]``.
    """

    def __init__(self, model: LlamaForCausalLM, model_config: ModelConfig, exit_config: Optional[ExitConfig],
                 num_blocks: int, block_size: int, is_driver: bool = True):
        self.model = model
        self.model_config = model_config
        self.exit_config = exit_config
        self.heads = ExitHeads(model, exit_config) if exit_config is not None and exit_config.exit_layers else None
        self.block_size = block_size
        self.is_driver = is_driver
        attn = model.model.layers[0].self_attn
        dtype = next(model.parameters()).dtype
        self.kv_cache = torch.zeros(model_config.num_layers, 2, num_blocks, block_size, attn.num_kv_heads,
                                    attn.head_dim, dtype=dtype)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(model_config.num_layers)]
        self.sampling_states = SamplingStates()

    def _slots(self, block_table: list[int], start: int, n: int) -> torch.Tensor:
        bt = torch.tensor(block_table, dtype=torch.long)
        pos = torch.arange(start, start + n)
        return bt[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, so: SchedulerOutput):
        """Build ``(input_ids [T], positions [T], AttentionMetadata, ExitBatch)`` for one iteration."""
        ids, positions, slots, sample_rows, eligible, thresholds = [], [], [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        t = 0
        for sr in so.scheduled:
            n = len(sr.token_ids)
            ids.extend(sr.token_ids)
            positions.append(torch.arange(sr.start_position, sr.start_position + n))
            slots.append(self._slots(sr.block_table, sr.start_position, n))
            if sr.exit_eligible:
                decode_tables.append(sr.block_table)
                decode_lens.append(sr.start_position + 1)
            else:
                prefills.append(PrefillChunk(t, n, sr.start_position, torch.tensor(sr.block_table, dtype=torch.long)))
            if sr.sample:
                # NaN: the exit config's default (per exit layer if calibrated); > 1: full model
                thr = float("nan") if sr.exit_threshold is None else float(sr.exit_threshold)
                sample_rows.append(t + n - 1)
                eligible.append(sr.exit_eligible and self.heads is not None and not thr > 1.0)
                thresholds.append(thr)
            t += n
        D = len(decode_tables)
        width = max((len(b) for b in decode_tables), default=1)
        bt = torch.zeros(D, width, dtype=torch.long)
        for i, b in enumerate(decode_tables):
            bt[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        meta = AttentionMetadata(torch.cat(slots), D, bt, torch.tensor(decode_lens, dtype=torch.long), prefills)
        batch = ExitBatch(torch.tensor(sample_rows, dtype=torch.long), torch.tensor(eligible, dtype=torch.bool),
                          torch.tensor(thresholds, dtype=torch.float32))
        return torch.tensor(ids, dtype=torch.long), torch.cat(positions), meta, batch

    @torch.inference_mode()
    def forward(self, so: SchedulerOutput) -> ExitResult:
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
