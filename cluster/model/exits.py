"""Early exit: exit heads, confidence measures, and the layer-by-layer forward with KV fill.

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

Confidence is computed from vocab-parallel logits with all-reduces (``max_prob``, ``top2_margin``),
or by a small exit classifier on the replicated hidden state (``classifier``: no logits unless the
row exits), so every tensor-parallel rank takes the same exit decision.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cluster.config import ExitConfig
from cluster.distributed import all_gather_last_dim, all_reduce, tp_size
from cluster.model.layers.attention import AttentionMetadata
from cluster.model.layers.norm import RMSNorm
from cluster.model.layers.sampler import host_to_device
from cluster.model.llama import LlamaForCausalLM


def confidence_from_local_logits(local: torch.Tensor, measure: str) -> torch.Tensor:
    """Confidence of vocab-parallel logits ``[n, V_local]`` -> ``[n]`` float32, same on all ranks.

    ``max_prob``: max softmax probability; ``top2_margin``: top-1 minus top-2 probability
    (both as in CALM, Schuster et al. 2022). Uses an all-reduce of the max and of the softmax
    denominator (and an all-gather of each rank's top-2 for the margin).
    """
    # Ranks agree bit for bit: max is exact, and gloo/NCCL all-reduce hand every rank the same
    # reduced bytes (each element is summed once, then broadcast), so ``conf >= threshold`` and with
    # it the sequence of later collectives is identical on all ranks.
    local = local.float()
    m = all_reduce(local.max(dim=-1).values, op="max")
    denom = all_reduce(torch.exp(local - m.unsqueeze(1)).sum(dim=-1))
    if measure == "max_prob":
        return 1.0 / denom
    top2 = all_gather_last_dim(local.topk(2, dim=-1).values) if tp_size() > 1 else local.topk(2, dim=-1).values
    t = top2.topk(2, dim=-1).values
    return (torch.exp(t[:, 0] - m) - torch.exp(t[:, 1] - m)) / denom


class TrainedExitHead(nn.Module):
    """RMSNorm + low-rank residual adapter in front of the (tied) LM head (EE-LLM / Kangaroo style).

    ``h: [n, hidden] -> h + up(down(norm(h)))`` then the shared final norm and LM head.
    """

    def __init__(self, hidden_size: int, rank: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.down(self.norm(h)))


class ExitClassifier(nn.Module):
    """Cheap exit confidence (CALM's "meta" measure): ``[n, hidden] -> [n]`` probability in [0, 1]
    that the exit head's argmax equals the final layer's, from the hidden state alone.

    RMSNorm -> Linear(hidden, width) -> SiLU -> Linear(width, 1) -> sigmoid: about ``hidden * width``
    multiply-adds per row, versus ``hidden * vocab`` for one LM head. It holds no vocab-parallel
    state: with tensor parallelism every rank computes it from the same (replicated) hidden state,
    and :meth:`ExitHeads.check` all-reduces the resulting exit mask so the decision is shared.
    """

    def __init__(self, hidden_size: int, width: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, 1)

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(self.norm(h)))).squeeze(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(h).float())


def _load_prefixed(module: nn.Module, state: dict, prefix: str) -> nn.Module:
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return module


class ExitHeads(nn.Module):
    """Maps an exit layer's hidden states to vocab-parallel logits and decides who exits.

    ``shared``: final norm + LM head (LayerSkip). ``trained``: a :class:`TrainedExitHead` per exit
    layer loaded from a safetensors file with keys ``exits.<layer>.{norm.weight,down.weight,up.weight}``;
    with ``confidence='classifier'`` also an :class:`ExitClassifier` per exit layer from keys
    ``exit_classifiers.<layer>.{norm.weight,fc1.weight,fc1.bias,fc2.weight,fc2.bias}``
    (written by ``eeserve train-exits``).
    """

    def __init__(self, model: LlamaForCausalLM, cfg: ExitConfig):
        super().__init__()
        self.model = [model]  # not a submodule: its parameters belong to the model
        self.cfg = cfg
        self.heads = nn.ModuleDict()
        self.classifiers = nn.ModuleDict()
        p = next(model.parameters())
        dtype, device = p.dtype, p.device  # heads live beside the model's weights
        if cfg.head == "trained":
            state = load_file(cfg.heads_path)
            mc = model.config
            for layer in cfg.exit_layers:
                key = f"exits.{layer}.down.weight"
                if key not in state:
                    raise ValueError(f"heads_path {cfg.heads_path} has no head for exit layer {layer}")
                with torch.device(device):
                    head = TrainedExitHead(mc.hidden_size, state[key].shape[0], mc.rms_norm_eps)
                self.heads[str(layer)] = _load_prefixed(head, state, f"exits.{layer}.").to(dtype)
                if cfg.confidence == "classifier":
                    key = f"exit_classifiers.{layer}.fc1.weight"
                    if key not in state:
                        raise ValueError(f"heads_path {cfg.heads_path} has no exit classifier for layer {layer}")
                    with torch.device(device):
                        clf = ExitClassifier(mc.hidden_size, state[key].shape[0], mc.rms_norm_eps)
                    self.classifiers[str(layer)] = _load_prefixed(clf, state, f"exit_classifiers.{layer}.").to(dtype)
        # per exit layer: the threshold that replaces the config's default threshold
        self.layer_thresholds = {l: cfg.threshold_for(l) for l in cfg.exit_layers}
        # FR-Spec reduced-vocabulary head for drafts (cluster.model.frspec), if the heads file has one
        self.draft_head = None
        if cfg.draft_vocab and cfg.heads_path:
            from cluster.model.frspec import ReducedLMHead, load_draft_vocab

            ids = load_draft_vocab(cfg.heads_path)
            if ids is not None:
                self.draft_head = ReducedLMHead.from_model(model, ids)

    def draft_logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` hidden states after ``layer`` layers -> ``[n, V]`` float32 logits of a draft:
        the exit head, then the FR-Spec reduced head (-inf outside its vocabulary) if there is one,
        else the full LM head."""
        model = self.model[0]
        if self.draft_head is None:
            return model.lm_head.full_logits(self.local_logits(layer, h))
        return self.draft_head.full_logits(model.model.norm(self.exit_state(layer, h)))

    def local_logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` hidden states after ``layer`` layers -> ``[n, V_local]`` float32 logits."""
        return self.model[0].final_local_logits(self.exit_state(layer, h))

    def resolve_thresholds(self, layer: int, thresholds: torch.Tensor) -> torch.Tensor:
        """``thresholds: [n]`` per-row thresholds, NaN meaning "the config's default" -> ``[n]`` with
        NaN rows replaced by ``layer``'s threshold (calibrated per layer if ``layer_thresholds``)."""
        return torch.where(torch.isnan(thresholds), self.layer_thresholds[layer], thresholds)

    def exit_state(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` hidden states after ``layer`` layers -> the exit head's output, the input of
        the shared final norm + LM head (``h`` itself for the shared head)."""
        return self.heads[str(layer)](h) if str(layer) in self.heads else h

    def check(self, layer: int, h: torch.Tensor,
              thresholds: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Exit test at ``layer`` for ``h: [n, hidden]`` with per-row ``thresholds: [n]`` (NaN: default).

        Returns ``(ok [n] bool, local logits [k, V_local] of the k rows that exit)`` for the softmax
        measures, which need every row's logits to decide. The ``classifier`` measure computes no
        logits at all and returns ``(ok, None)``: the caller keeps :meth:`exit_state` of the rows that
        exit and runs the shared LM head once per iteration for all of them (one pass over its
        ``vocab x hidden`` weights instead of one per exit layer). Its pass mask is all-reduced (min)
        across tensor-parallel ranks, so every rank takes the same decision even if floating-point
        results ever differed between ranks (one tiny collective per check).

        Selecting the passing rows (``local[ok]``) reads ``ok`` on the host; the engine's
        :func:`forward_with_exits` calls :meth:`decide` instead and selects with host-known indices.
        """
        ok, local = self.decide(layer, h, thresholds)
        return ok, (None if local is None else local[ok])

    def decide(self, layer: int, h: torch.Tensor,
               thresholds: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`check` without the selection: ``(ok [n] bool, local logits [n, V_local] of every row
        or None for the classifier)``, all on ``h``'s device; no host sync (collectives take device
        tensors, the exit-mask all-reduce included)."""
        thr = self.resolve_thresholds(layer, thresholds)
        if self.cfg.confidence == "classifier":
            ok = self.classifiers[str(layer)](h) >= thr
            if tp_size() > 1:
                ok = all_reduce(ok.to(torch.int32), op="min").bool()
            return ok, None
        local = self.local_logits(layer, h)
        return confidence_from_local_logits(local, self.cfg.confidence) >= thr, local


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
    layers = model.model.layers
    L = len(layers)
    dev = input_ids.device
    T = input_ids.shape[0]
    rows = batch.rows()  # host: token index of each sample row
    S = len(rows)
    exit_at = set(heads.cfg.exit_layers) if heads is not None else set()
    per_sequence = heads is not None and heads.cfg.policy == "per_sequence"
    # rows joining later are never eligible (ExitBatch) and never exit, so ``stopped`` stays False
    h = model.model.embed_tokens(input_ids)
    # host bookkeeping: sample rows still allowed to exit (ascending) and their device index
    pending = [j for j, e in enumerate(batch.eligible_list()) if e] if exit_at else []
    pending_dev = batch.eligible_rows if pending else None
    if pending and pending_dev is None:
        pending_dev = host_to_device(pending, torch.long, dev)
    exited_tokens: set[int] = set()  # tokens whose hidden state is frozen at their exit
    exited_mask = None  # [T, 1] bool on the device (paper policy: rows kept by torch.where)
    exits: list[tuple[int, list[int]]] = []  # (depth, rows) per exit layer where rows exited
    row_exit = logits = states = None  # allocated at the first exit
    deferred: list[int] = []  # rows whose logits wait for the one LM-head pass at the end
    compute_rows, compute_meta = None, None  # None: compute all rows
    stopped = False  # every token exited: the remaining layers only fill K/V
    num_checks = 0
    joins = batch.joins  # shallowest first
    waiting = sum(j.num_rows for j in joins)  # rows [0, waiting) have not joined yet
    if joins and meta.num_decodes:  # the shared decode mask, built once before the suffix views
        meta.decode_mask(kv_caches[0].shape[2])
    stage = 0
    hidden = None  # [S, hidden] raw hidden state at each exit
    for i, layer in enumerate(layers):
        while stage < len(joins) and joins[stage].depth == i:  # rows join with their kept states
            jn = joins[stage]
            h = torch.cat([h[:jn.start], jn.states, h[jn.start + jn.num_rows:]])
            waiting -= jn.num_rows
            stage += 1
        if stopped:
            layer.fill_kv(h, positions, meta.slot_mapping, kv_caches[i])
            continue
        if waiting == T:  # nothing runs at this layer: every row joins deeper
            continue
        if waiting:  # only the suffix runs; rows that never exit lead, so shifted indices stay valid
            u = waiting
            hs = h[u:]
            cr = None if compute_rows is None else compute_rows[u:] - u
            out = layer(hs, positions[u:], meta.suffix(u), kv_caches[i], cr,
                        None if compute_meta is None else compute_meta.suffix(u))
            if cr is not None:
                hs = hs.index_copy(0, cr, out)
            else:
                hs = torch.where(exited_mask[u:], hs, out) if exited_mask is not None else out
            h = torch.cat([h[:u], hs])
        else:
            out = layer(h, positions, meta, kv_caches[i], compute_rows, compute_meta)
            if compute_rows is not None:
                h = h.index_copy(0, compute_rows, out)
            else:
                h = torch.where(exited_mask, h, out) if exited_mask is not None else out
        depth = i + 1
        if depth not in exit_at or not pending:
            continue
        ok, local = heads.decide(depth, h.index_select(0, batch.sample_rows.index_select(0, pending_dev)),
                                 batch.thresholds.index_select(0, pending_dev))
        num_checks += 1
        passed = ok.tolist()  # the one device->host sync of this exit layer
        pos = [k for k, p in enumerate(passed) if p]
        if not pos:
            continue
        done = [pending[k] for k in pos]
        pending = [pending[k] for k, p in enumerate(passed) if not p]
        exited_tokens.update(rows[j] for j in done)
        stopped = len(exited_tokens) == T
        remaining = [] if (stopped or not per_sequence) else [t for t in range(T) if t not in exited_tokens]
        # one host->device copy: positions in the check, rows, their tokens, still pending, computing
        parts = (pos, done, [rows[j] for j in done], pending, remaining)
        idx = host_to_device([x for part in parts for x in part], torch.long, dev).split([len(p) for p in parts])
        pos_dev, done_dev, done_tok_dev, pending_dev, remaining_dev = idx
        if row_exit is None:
            row_exit = torch.full((S,), L, dtype=torch.long, device=dev)
            logits = torch.empty(S, model.config.vocab_size, dtype=torch.float32, device=dev)
            states = h.new_empty(S, h.shape[1])
            hidden = h.new_empty(S, h.shape[1])
        hidden.index_copy_(0, done_dev, h.index_select(0, done_tok_dev))
        if local is None:  # cheap measure: logits later, in one LM-head pass with the other rows
            states.index_copy_(0, done_dev, heads.exit_state(depth, h.index_select(0, done_tok_dev)))
            deferred += done
        else:
            logits.index_copy_(0, done_dev, heads.model[0].lm_head.full_logits(local.index_select(0, pos_dev)))
        row_exit.index_fill_(0, done_dev, depth)
        exits.append((depth, done))
        if stopped:
            continue
        if per_sequence:
            compute_rows = remaining_dev
            num_dec = sum(1 for t in remaining if t < meta.num_decodes)
            compute_meta = meta.select_decodes(compute_rows, num_dec)
        else:
            if exited_mask is None:
                exited_mask = torch.zeros(T, 1, dtype=torch.bool, device=dev)
            exited_mask.index_fill_(0, done_tok_dev, True)
    if row_exit is None:  # nobody exited: every row's logits from the last layer, in one pass
        if S == 0:  # a middle prefill chunk: nothing to sample
            return ExitResult(logits=h.new_empty(0, model.config.vocab_size, dtype=torch.float32),
                              exit_layers=torch.empty(0, dtype=torch.long, device=dev))
        sample_h = h.index_select(0, batch.sample_rows)
        logits = model.lm_head.full_logits(model.final_local_logits(sample_h))
        return ExitResult(logits=logits, exit_layers=torch.full((S,), L, dtype=torch.long, device=dev),
                          num_checks=num_checks)
    exited_rows = {j for _, done in exits for j in done}
    final = [j for j in range(S) if j not in exited_rows]
    deferred = sorted(deferred + final)
    if deferred:
        parts = (final, [rows[j] for j in final], deferred)
        final_dev, final_tok_dev, deferred_dev = host_to_device(
            [x for part in parts for x in part], torch.long, dev).split([len(p) for p in parts])
        if final:
            states.index_copy_(0, final_dev, h.index_select(0, final_tok_dev))
        logits.index_copy_(0, deferred_dev, model.lm_head.full_logits(
            model.final_local_logits(states.index_select(0, deferred_dev))))
    return ExitResult(logits=logits, exit_layers=row_exit, num_checks=num_checks, exited_rows=sorted(exited_rows),
                      hidden=hidden)
