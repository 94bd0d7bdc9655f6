"""Model runner: the only piece that turns scheduler output into tensors and runs the model.

One runner per tensor-parallel rank. Every rank runs the same forward (collectives inside keep them
in step); rank 0 samples, keeps the per-request sampling state and returns the tokens.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from cluster.config import ExitConfig, ModelConfig
from cluster.request import LOSSY_MODES
from cluster.core.outputs import ModelRunnerOutput, SampledTokens, ScheduledRequest, SchedulerOutput
from cluster.model.compile import decode_graphs, kept_segments
from cluster.model.exit_heads import ExitHeads
from cluster.model.exits import ExitResult, forward_with_exits
from cluster.model.layers.quant import QuantizedWeight
from cluster.model.layers.sampler import host_to_device, sample
from cluster.model.llama import LlamaForCausalLM
from cluster.core.step_message import StepMessage
from cluster.worker.input_batch import InputPacker, RowState, build_step, sample_layout
from cluster.worker.persistent_batch import PersistentBatch
from cluster.worker.sampling_states import SamplingStates
from cluster.worker.spec_decode import SpecDecoder


class ModelRunner:
    """Owns the model, its exit heads, this rank's paged KV cache, the requests it holds between
    iterations (:class:`PersistentBatch`) and (driver rank) the per-request sampling state
    (:class:`SamplingStates`).

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
        # per layer [2, num_blocks, block_size, KVH, d], each its own tensor; one list, refilled by initialize_cache
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        if num_blocks is not None:
            self.initialize_cache(num_blocks)
        self.sampling_states = SamplingStates()
        self.batch = PersistentBatch()
        self.packer = InputPacker(block_size, self.device)
        self.spec_decoder = SpecDecoder(model, self.heads, self.kv_caches, self.packer, model_config.num_layers,
                                        self.sampling_states, is_driver)

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
        self.kv_caches.clear()  # in place: the drafter holds this list
        self.kv_caches.extend(self._allocate_caches(num_blocks))
        self.num_blocks = num_blocks
        graphs = decode_graphs(self.model)
        if graphs is not None:  # compile the decode graphs now, not at the first request
            graphs.warm_up(self.kv_caches, self._decode_segments(), self.dtype)

    def _allocate_caches(self, num_blocks: int) -> list[torch.Tensor]:
        """One zero tensor ``[2, num_blocks, block_size, KVH, d]`` per layer, each its own allocation
        (compiled decode graphs write a layer's cache in place: a view of one shared tensor would be
        copied whole, see :mod:`cluster.model.compile`)."""
        shape = self._cache_shape(num_blocks)[1:]
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.model_config.num_layers)]

    def _decode_segments(self) -> list[tuple[int, int]]:
        """The compiled decode segments to build at start-up, for the mode requests default to: the
        whole decoder (no exit pending: the full model, verification), the segments between exit
        layers (lossy exits), the runs of kept layers of the static skip set (``layer_skip``
        drafts). Requests of other modes run the layers of their other segments eagerly."""
        L = self.model_config.num_layers
        cfg = self.exit_config
        segments = [(0, L)]
        if cfg is not None and cfg.mode == "layer_skip" and cfg.skip_layers:
            segments += [s for s in kept_segments(cfg.skip_layers, L) if s not in segments]
        if self.heads is not None and cfg is not None and cfg.mode in (None,) + LOSSY_MODES:
            bounds = [0] + sorted(e for e in cfg.exit_layers if 0 < e < L) + [L]
            segments += list(zip(bounds[:-1], bounds[1:]))
        return list(dict.fromkeys(segments))

    @torch.inference_mode()
    def profile_run(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> None:
        """The largest iterations the scheduler can send, on a scratch cache, to measure peak activation
        memory before the KV cache is sized: one prefill chunk of ``max_num_batched_tokens`` tokens,
        then a decode step of ``max_num_seqs`` rows at ``max_model_len`` context (sharing the scratch
        blocks) sampled with top-k and top-p (the sampler's largest buffers). Every rank runs it (the
        collectives run too); nothing is read back."""
        from cluster.sampling import SamplingParams

        bs = self.block_size
        prefill = min(max_num_batched_tokens, max_model_len)  # a chunk never passes the context window
        nb = -(-max_model_len // bs)
        caches = self._allocate_caches(nb)
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
        del caches

    # ---------------------------------------------------------------------------------- one step
    def prepare(self, so: SchedulerOutput, rows_of: Optional[dict[str, RowState]] = None):
        """``(input_ids [T], positions [T], AttentionMetadata, ExitBatch)`` for one iteration, all views
        of one host->device copy (:func:`~cluster.worker.input_batch.build_step`: the layout, the
        ``rows_of`` rows); no device value is read."""
        return build_step(so, self.packer, self.heads is not None, rows_of)

    @torch.inference_mode()
    def forward(self, so: SchedulerOutput, rows_of: Optional[dict[str, RowState]] = None) -> ExitResult:
        """The iteration's forward (``rows_of``: see :meth:`prepare`), then the stop-token rule of the
        lossy exits: a row whose exit argmax is a stop token of its request (EOS unless
        ``ignore_eos``, ``stop_token_ids``) is run again from its exit layer to the last layer (its
        true K/V replace the KV fill), so stop tokens only come from the full model. Costs one
        device->host read of the exited rows' argmax when rows exited."""
        if not self.kv_caches:
            raise RuntimeError("the KV cache is not allocated yet (initialize_cache)")
        input_ids, positions, meta, batch = self.prepare(so, rows_of)
        if rows_of:  # online layer_skip requests keep their rows' per-layer states (no device read)
            batch.capture_rows = self.spec_decoder.capture_rows(so, rows_of, batch.rows())
        result = forward_with_exits(self.model, self.heads, input_ids, positions, meta, self.kv_caches, batch)
        if result.captured is not None:
            self.spec_decoder.reselect(result.captured)
        if result.exited_rows:
            self._rerun_stop_exits(so, rows_of, result)
        return result

    def _rerun_stop_exits(self, so: SchedulerOutput, rows_of, result: ExitResult) -> None:
        dev = result.logits.device
        plain = sample_layout(so, rows_of or {})[1]  # only plain rows take lossy exits
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

    def execute_step(self, msg: StepMessage) -> Optional[ModelRunnerOutput]:
        """Apply an iteration's diff to the requests this rank holds (:meth:`PersistentBatch.apply`,
        which raises RuntimeError when the rank diverged) and run it (:meth:`execute_model`)."""
        return self.execute_model(self.batch.apply(msg))

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """Run one iteration; returns the sampled tokens on the driver rank, None elsewhere.

        Requests scheduled with ``num_draft_tokens > 0`` draft first and are verified in the
        iteration's forward (:mod:`cluster.worker.spec_decode`); they report their verified tokens
        (and the drafts proposed) in ``ModelRunnerOutput.tokens``. A failure of the forward raises; a failure while
        sampling one request's row is reported in ``ModelRunnerOutput.failed`` (that request gets no
        token, the others do). The plain sampling step makes one device->host transfer (tokens, exit
        layers and logprobs together).
        """
        states = self.sampling_states
        for rid in so.finished_req_ids:
            states.drop(rid)
            self.spec_decoder.drop(rid)
        if so.is_empty:
            return ModelRunnerOutput() if self.is_driver else None
        spec = [sr for sr in so.scheduled if sr.num_draft_tokens]
        rows_of = self.spec_decoder.draft(spec) if spec else None
        result = self.forward(so, rows_of) if rows_of else self.forward(so)
        if not self.is_driver:
            return None
        logits, exit_layers = result.logits, result.exit_layers
        dev, vocab = logits.device, logits.shape[1]
        out = ModelRunnerOutput()
        if rows_of:
            first, plain = sample_layout(so, rows_of)
            verified, verified_layers, out.failed = self.spec_decoder.accept(spec, rows_of, logits, first)
            out.tokens = {rid: SampledTokens(toks, verified_layers[rid], len(rows_of[rid].drafts))
                          for rid, toks in verified.items()}
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
        for i in range(len(sampled)):
            if i not in res.failed:
                out.tokens[rids[i]] = SampledTokens([tokens[i]], [layers[i]], logprob=logprobs.get(i))
        out.failed.update({rids[i]: msg for i, msg in res.failed.items()})
        return out
