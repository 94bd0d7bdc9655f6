"""Early exit: the layer-by-layer forward with exit tests and KV fill.

Rules from "An Efficient Inference Framework for Early-exit LLMs" (Miao et al., arXiv 2407.20272):

* The batch runs layer by layer. At each exit point, every sequence that may exit and has not yet
  exited is checked; a sequence exits at its *first* confident exit point and its token comes from
  that exit's logits.
* ``paper`` policy: the whole batch keeps computing until every sequence has exited (the batch stops
  at the first exit point where all are confident); ``per_sequence`` policy: confident sequences
  leave the computation at once.
* KV fill: for a sequence that exited after layer ``l``, the K/V of layers ``l+1..L`` are computed
  from its frozen exit hidden state before the iteration ends, so later tokens find a complete cache
  and a sequence's output never depends on its batch-mates.

The exit heads and the exit test (confidence measures, classifiers) are in
:mod:`cluster.model.exit_heads`; their names are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from cluster.model.compile import decode_graphs
from cluster.model.exit_heads import ExitClassifier, ExitHeads, TrainedExitHead, confidence_from_local_logits
from cluster.model.layers.attention import AttentionMetadata
from cluster.model.layers.sampler import host_to_device
from cluster.model.llama import LlamaForCausalLM

__all__ = ["ExitBatch", "ExitClassifier", "ExitHeads", "ExitResult", "Join", "TrainedExitHead",
           "confidence_from_local_logits", "forward_with_exits"]


@dataclass
class ExitBatch:
    """Per-iteration exit inputs (built by the model runner).

    ``sample_rows`` index the flattened tokens whose next token is sampled; ``eligible`` and
    ``thresholds`` are aligned with them. The tensors live on the model's device; the host copies
    (``host_rows``, ``host_eligible``, set by the model runner, which built them) let
    :func:`forward_with_exits` track rows without reading the device. Left None, they are read from
    the tensors once (one host sync each).
    """

    sample_rows: torch.Tensor  # [S] long
    eligible: torch.Tensor  # [S] bool: a decode token whose request allows early exit
    thresholds: torch.Tensor  # [S] float32 confidence threshold per row
    host_rows: Optional[list[int]] = None  # sample_rows as host ints
    host_eligible: Optional[list[bool]] = None  # eligible as host bools
    eligible_rows: Optional[torch.Tensor] = None  # [E] long on the device: indices j with eligible[j]
    # rows whose first layers ran in an earlier pass (drafts being verified, a stop token re-run from
    # its exit): see :class:`Join`; sorted by depth, one entry per depth
    joins: list["Join"] = field(default_factory=list)
    # [C] long token indices of rows that run every layer from layer 1 (``layer_skip`` drafts being
    # verified) whose hidden state after each layer is kept (:attr:`ExitResult.captured`)
    capture_rows: Optional[torch.Tensor] = None

    def rows(self) -> list[int]:
        if self.host_rows is None:
            self.host_rows = [int(r) for r in self.sample_rows.tolist()]
        return self.host_rows

    def eligible_list(self) -> list[bool]:
        if self.host_eligible is None:
            self.host_eligible = [bool(e) for e in self.eligible.tolist()]
        return self.host_eligible


@dataclass
class Join:
    """Token rows whose first ``depth`` layers already ran (their K/V of those layers are in the
    cache, ``states`` is their hidden state there): tokens ``start .. start + num_rows - 1`` of the
    batch, which join the forward at layer ``depth + 1``.

    Rows that join later come first in the batch (deepest first), so at every layer the rows that
    run are a suffix of the batch; until they join, rows neither compute nor write K/V.
    """

    depth: int
    start: int  # first token index (host)
    num_rows: int
    states: torch.Tensor  # [num_rows, hidden] hidden states after ``depth`` layers


@dataclass
class ExitResult:
    logits: torch.Tensor  # [S, vocab] float32 full-vocabulary logits at each row's exit
    exit_layers: torch.Tensor  # [S] long, 1-based number of decoder layers run (L = full model)
    num_checks: int = 0  # exit layers checked = device->host syncs made by the forward
    exited_rows: list[int] = field(default_factory=list)  # host: sample rows that exited early
    # [S, hidden] hidden state of each exited row at its exit (rows that did not exit: undefined)
    hidden: Optional[torch.Tensor] = None
    # [L + 1, C, hidden]: the embedding and the state after each layer of ``ExitBatch.capture_rows``
    captured: Optional[torch.Tensor] = None


def forward_with_exits(model: LlamaForCausalLM, heads: Optional[ExitHeads], input_ids: torch.Tensor,
                       positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[torch.Tensor], batch: ExitBatch) -> ExitResult:
    """Run one iteration of ``T`` flattened tokens through the decoder with early exit and KV fill.

    Args:
        input_ids, positions: ``[T]`` long.
        meta: paged-attention metadata (decode tokens first).
        kv_caches: per layer ``[2, num_blocks, block_size, KVH_local, d]`` (K, V).
        heads: exit heads, or None for the full model.

    Every tensor made here lives on ``input_ids``' device (the model's).

    Host syncs: exactly one device->host transfer per exit layer *checked*: the pass mask of the rows
    still pending there, read with one ``.tolist()`` (the "did any row exit, and which" decision).
    An exit layer is checked only while some eligible row is pending, which the host knows from the
    previous masks; so there is no sync at a non-exit layer, none for a prefill-only or full-model
    iteration, and no ``any()`` / ``nonzero()`` / boolean indexing: rows are selected with index
    tensors built on the host and copied to the device (at most one small host->device copy per exit
    layer where rows exit, plus one at the end). With the sampler's single transfer (tokens and exit
    layers together, :meth:`~cluster.model.layers.sampler.SamplerOutput.to_host`), one decode
    iteration makes at most ``len(exit_layers) + 1`` syncs (``num_checks + 1``), 1 for the full model.

    Returns:
        :class:`ExitResult` for ``batch.sample_rows``; ``num_checks`` is the number of exit checks made.
    """
    run = _ExitPass(model, heads, input_ids, positions, meta, kv_caches, batch)
    cap = batch.capture_rows
    kept = [] if cap is None else [run.h.index_select(0, cap)]
    graphs = decode_graphs(model) if not batch.joins else None
    decode_only = meta.num_decodes == run.T
    i = 0
    while graphs is not None and i < run.L and run.compiled_ok():  # compiled segments
        end = run.next_check(i)
        if decode_only and graphs.is_ready(i, end):
            run.h, states = graphs.run(run.h, positions, meta, kv_caches, i, end)
            if cap is not None:
                kept.extend(states.index_select(1, cap).unbind(0))
        elif not decode_only and cap is None and graphs.serves_prompts(i, end):  # prefill chunks
            run.h = graphs.run_prompts(run.h, positions, meta, kv_caches, i, end)
        else:
            break
        i = end
        if i in run.exit_at and run.pending:
            run.exit_test(i)
    for i, layer in enumerate(model.model.layers[i:], start=i):
        run.join_rows(i)
        if run.stopped:  # every token exited: the remaining layers only fill K/V
            layer.fill_kv(run.h, positions, meta.slot_mapping, kv_caches[i])
        elif run.waiting < run.T:  # else nothing runs at this layer: every row joins deeper
            run.run_layer(layer, kv_caches[i])
            if i + 1 in run.exit_at and run.pending:
                run.exit_test(i + 1)
        if cap is not None:
            kept.append(run.h.index_select(0, cap))
    result = run.result()
    if cap is not None:
        result.captured = torch.stack(kept)
    return result


@dataclass
class _Running:
    """Which rows a layer computes: every row (all None); the rows ``rows`` with their metadata
    (``per_sequence`` policy once rows exited; the exited rows' K/V are filled from their frozen
    states); or every row with the exited rows' states kept (``paper`` policy: ``exited``)."""

    rows: Optional[torch.Tensor] = None  # [C] long token indices computed
    meta: Optional[AttentionMetadata] = None  # the metadata of ``rows``
    exited: Optional[torch.Tensor] = None  # [T, 1] bool: token exited, its hidden state is frozen

    def suffix(self, start: int) -> "_Running":
        """The same for tokens ``start ..`` (the rows before ``start`` never exit: they lead ``rows``)."""
        if not start:
            return self
        return _Running(None if self.rows is None else self.rows[start:] - start,
                        None if self.meta is None else self.meta.suffix(start),
                        None if self.exited is None else self.exited[start:])

    def merge(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The hidden states after a layer: ``out`` where rows ran, ``h`` where they are frozen."""
        if self.rows is not None:
            return h.index_copy(0, self.rows, out)
        return torch.where(self.exited, h, out) if self.exited is not None else out


class _ExitPass:
    """The state of one :func:`forward_with_exits` call and its steps: rows joining, a layer's run,
    the exit test at an exit layer, the policy's bookkeeping, the exit outputs and the result.

    Host bookkeeping: ``pending`` (sample rows still allowed to exit, ascending; ``pending_dev`` their
    device index), ``exited_tokens`` (tokens whose hidden state is frozen at their exit), ``waiting``
    (rows ``[0, waiting)`` have not joined yet). Exit outputs (allocated at the first exit):
    ``row_exit [S]``, ``logits [S, V]``, ``states [S, hidden]`` (exit-head outputs whose logits wait
    for the one LM-head pass at the end: ``deferred``), ``hidden [S, hidden]`` (raw state at exit).
    """

    def __init__(self, model: LlamaForCausalLM, heads: Optional[ExitHeads], input_ids: torch.Tensor,
                 positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor], batch: ExitBatch):
        self.model, self.heads, self.positions, self.meta, self.batch = model, heads, positions, meta, batch
        self.L = len(model.model.layers)
        self.dev = input_ids.device
        self.T = input_ids.shape[0]
        self.rows = batch.rows()  # host: token index of each sample row
        self.S = len(self.rows)
        self.exit_at = set(heads.cfg.exit_layers) if heads is not None else set()
        self.per_sequence = heads is not None and heads.cfg.policy == "per_sequence"
        # rows joining later are never eligible (ExitBatch) and never exit, so ``stopped`` stays False
        self.h = model.model.embed_tokens(input_ids)
        self.pending = [j for j, e in enumerate(batch.eligible_list()) if e] if self.exit_at else []
        self.pending_dev = batch.eligible_rows if self.pending else None
        if self.pending and self.pending_dev is None:
            self.pending_dev = host_to_device(self.pending, torch.long, self.dev)
        self.exited_tokens: set[int] = set()
        self.exited_rows: list[int] = []  # sample rows that exited, in exit order
        self.running = _Running()
        self.row_exit = self.logits = self.states = self.hidden = None
        self.deferred: list[int] = []
        self.stopped = False
        self.num_checks = 0
        self.joins, self.stage = batch.joins, 0  # shallowest first
        self.waiting = sum(j.num_rows for j in self.joins)
        if self.joins and meta.num_decodes:  # the shared decode mask, built once before the suffix views
            meta.decode_mask(kv_caches[0].shape[2], kv_caches[0].dtype)

    def compiled_ok(self) -> bool:
        """Every row still runs every layer (no exit yet, nothing joining): the compiled decode
        segments apply (:class:`cluster.model.compile.DecodeGraphs`)."""
        return not self.stopped and self.running.rows is None and self.running.exited is None

    def next_check(self, i: int) -> int:
        """The first exit layer after layer ``i`` (0-based count of layers run) where some row may
        still exit, else the last layer: where a compiled segment starting at ``i`` must stop."""
        return min((e for e in self.exit_at if e > i), default=self.L) if self.pending else self.L

    def join_rows(self, i: int) -> None:
        """Rows whose first ``i`` layers ran join with their kept states before layer ``i + 1``."""
        while self.stage < len(self.joins) and self.joins[self.stage].depth == i:
            jn = self.joins[self.stage]
            self.h = torch.cat([self.h[:jn.start], jn.states, self.h[jn.start + jn.num_rows:]])
            self.waiting -= jn.num_rows
            self.stage += 1

    def run_layer(self, layer, kv_cache: torch.Tensor) -> None:
        """One decoder layer over the rows that have joined (a suffix of the batch: rows that never
        exit lead, so shifted indices stay valid), per :class:`_Running`."""
        u = self.waiting
        h, running = (self.h[u:], self.running.suffix(u)) if u else (self.h, self.running)
        out = layer(h, self.positions[u:] if u else self.positions, self.meta.suffix(u), kv_cache,
                    running.rows, running.meta)
        h = running.merge(h, out)
        self.h = torch.cat([self.h[:u], h]) if u else h

    def exit_test(self, depth: int) -> None:
        """The exit test of the pending rows at exit layer ``depth``: one device->host read of the
        pass mask; the rows that pass exit here (:meth:`_exit`)."""
        b = self.batch
        ok, local = self.heads.decide(depth, self.h.index_select(0, b.sample_rows.index_select(0, self.pending_dev)),
                                      b.thresholds.index_select(0, self.pending_dev))
        self.num_checks += 1
        passed = ok.tolist()  # the one device->host sync of this exit layer
        pos = [k for k, p in enumerate(passed) if p]
        if pos:
            self._exit(depth, pos, passed, local)

    def _exit(self, depth: int, pos: list[int], passed: list[bool], local: Optional[torch.Tensor]) -> None:
        """Rows at positions ``pos`` of the check exit at ``depth``: host bookkeeping, one
        host->device copy of the indices, the exit outputs, then the policy's (:meth:`_leave`)."""
        done = [self.pending[k] for k in pos]
        self.pending = [self.pending[k] for k, p in enumerate(passed) if not p]
        self.exited_tokens.update(self.rows[j] for j in done)
        self.stopped = len(self.exited_tokens) == self.T
        remaining = ([] if (self.stopped or not self.per_sequence)
                     else [t for t in range(self.T) if t not in self.exited_tokens])
        # one host->device copy: positions in the check, rows, their tokens, still pending, computing
        parts = (pos, done, [self.rows[j] for j in done], self.pending, remaining)
        idx = host_to_device([x for part in parts for x in part], torch.long, self.dev).split([len(p) for p in parts])
        pos_dev, done_dev, done_tok_dev, self.pending_dev, remaining_dev = idx
        self._record(depth, done, done_dev, done_tok_dev, None if local is None else local.index_select(0, pos_dev))
        if not self.stopped:
            self._leave(done_tok_dev, remaining, remaining_dev)

    def _record(self, depth: int, done: list[int], done_dev: torch.Tensor, done_tok_dev: torch.Tensor,
                local: Optional[torch.Tensor]) -> None:
        """The exit outputs of sample rows ``done`` (``local``: their local logits, None for the
        classifier measure, whose logits wait for the LM-head pass of :meth:`result`)."""
        h = self.h
        if self.row_exit is None:
            self.row_exit = torch.full((self.S,), self.L, dtype=torch.long, device=self.dev)
            self.logits = torch.empty(self.S, self.model.config.vocab_size, dtype=torch.float32, device=self.dev)
            self.states = h.new_empty(self.S, h.shape[1])
            self.hidden = h.new_empty(self.S, h.shape[1])
        exited_h = h.index_select(0, done_tok_dev)
        self.hidden.index_copy_(0, done_dev, exited_h)
        if local is None:
            self.states.index_copy_(0, done_dev, self.heads.exit_state(depth, exited_h))
            self.deferred += done
        else:
            self.logits.index_copy_(0, done_dev, self.model.lm_head.full_logits(local))
        self.row_exit.index_fill_(0, done_dev, depth)
        self.exited_rows += done

    def _leave(self, done_tok_dev: torch.Tensor, remaining: list[int], remaining_dev: torch.Tensor) -> None:
        """The policy: ``per_sequence`` computes only the ``remaining`` tokens from now on;
        ``paper`` computes every row but keeps the exited rows' states."""
        if self.per_sequence:
            num_dec = sum(1 for t in remaining if t < self.meta.num_decodes)
            self.running = _Running(rows=remaining_dev, meta=self.meta.select_decodes(remaining_dev, num_dec))
        else:
            if self.running.exited is None:
                self.running = _Running(exited=torch.zeros(self.T, 1, dtype=torch.bool, device=self.dev))
            self.running.exited.index_fill_(0, done_tok_dev, True)

    def result(self) -> ExitResult:
        """Logits of the rows that did not exit (and the deferred exits) in one LM-head pass."""
        model, S, dev, h = self.model, self.S, self.dev, self.h
        if self.row_exit is None:  # nobody exited: every row's logits from the last layer, in one pass
            if S == 0:  # a middle prefill chunk: nothing to sample
                return ExitResult(logits=h.new_empty(0, model.config.vocab_size, dtype=torch.float32),
                                  exit_layers=torch.empty(0, dtype=torch.long, device=dev))
            logits = model.lm_head.full_logits(model.final_local_logits(h.index_select(0, self.batch.sample_rows)))
            return ExitResult(logits=logits, exit_layers=torch.full((S,), self.L, dtype=torch.long, device=dev),
                              num_checks=self.num_checks)
        exited = set(self.exited_rows)
        final = [j for j in range(S) if j not in exited]
        deferred = sorted(self.deferred + final)
        if deferred:
            parts = (final, [self.rows[j] for j in final], deferred)
            final_dev, final_tok_dev, deferred_dev = host_to_device(
                [x for part in parts for x in part], torch.long, dev).split([len(p) for p in parts])
            if final:
                self.states.index_copy_(0, final_dev, h.index_select(0, final_tok_dev))
            self.logits.index_copy_(0, deferred_dev, model.lm_head.full_logits(
                model.final_local_logits(self.states.index_select(0, deferred_dev))))
        return ExitResult(logits=self.logits, exit_layers=self.row_exit, num_checks=self.num_checks,
                          exited_rows=sorted(exited), hidden=self.hidden)
