"""Model runner: the only piece that turns scheduler output into tensors and runs the model.

One runner per tensor-parallel rank. Every rank runs the same forward (collectives inside keep them
in step); rank 0 samples and returns the tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from cluster.config import ExitConfig, ModelConfig
from cluster.core.outputs import ModelRunnerOutput, SchedulerOutput
from cluster.model.exits import ExitBatch, ExitHeads, ExitResult, forward_with_exits
from cluster.model.layers.attention import AttentionMetadata, PrefillChunk
from cluster.model.llama import LlamaForCausalLM
from cluster.sampling import sample


class ModelRunner:
    """Owns the model, its exit heads, this rank's paged KV cache and per-request RNGs.

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
        self.generators: dict[str, Optional[torch.Generator]] = {}

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
        """Run one iteration; returns the sampled tokens on the driver rank, None elsewhere."""
        for rid in so.finished_req_ids:
            self.generators.pop(rid, None)
        if so.is_empty:
            return ModelRunnerOutput() if self.is_driver else None
        result = self.forward(so)
        if not self.is_driver:
            return None
        sampled = [sr for sr in so.scheduled if sr.sample]
        gens = []
        for sr in sampled:
            if sr.request_id not in self.generators:
                seed = sr.sampling_params.seed
                self.generators[sr.request_id] = None if seed is None else torch.Generator().manual_seed(seed)
            gens.append(self.generators[sr.request_id])
        tokens = sample(result.logits, [sr.sampling_params for sr in sampled], gens).tolist()
        layers = result.exit_layers.tolist()
        return ModelRunnerOutput(
            sampled_token_ids={sr.request_id: tok for sr, tok in zip(sampled, tokens)},
            exit_layers={sr.request_id: lay for sr, lay in zip(sampled, layers)},
        )
