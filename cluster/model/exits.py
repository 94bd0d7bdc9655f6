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

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cluster.config import ExitConfig
from cluster.distributed import all_gather_last_dim, all_reduce, tp_size
from cluster.model.layers.attention import AttentionMetadata
from cluster.model.layers.norm import RMSNorm
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
        dtype = next(model.parameters()).dtype
        if cfg.head == "trained":
            state = load_file(cfg.heads_path)
            mc = model.config
            for layer in cfg.exit_layers:
                key = f"exits.{layer}.down.weight"
                if key not in state:
                    raise ValueError(f"heads_path {cfg.heads_path} has no head for exit layer {layer}")
                head = TrainedExitHead(mc.hidden_size, state[key].shape[0], mc.rms_norm_eps)
                self.heads[str(layer)] = _load_prefixed(head, state, f"exits.{layer}.").to(dtype)
                if cfg.confidence == "classifier":
                    key = f"exit_classifiers.{layer}.fc1.weight"
                    if key not in state:
                        raise ValueError(f"heads_path {cfg.heads_path} has no exit classifier for layer {layer}")
                    clf = ExitClassifier(mc.hidden_size, state[key].shape[0], mc.rms_norm_eps)
                    self.classifiers[str(layer)] = _load_prefixed(clf, state, f"exit_classifiers.{layer}.").to(dtype)
        # per exit layer: the threshold that replaces the config's default threshold
        self.layer_thresholds = {l: cfg.threshold_for(l) for l in cfg.exit_layers}

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
        """
        thr = self.resolve_thresholds(layer, thresholds)
        if self.cfg.confidence == "classifier":
            ok = self.classifiers[str(layer)](h) >= thr
            if tp_size() > 1:
                ok = all_reduce(ok.to(torch.int32), op="min").bool()
            return ok, None
        local = self.local_logits(layer, h)
        ok = confidence_from_local_logits(local, self.cfg.confidence) >= thr
        return ok, local[ok]


@dataclass
class ExitBatch:
    """Per-iteration exit inputs (built by the model runner).

    ``sample_rows`` index the flattened tokens whose next token is sampled; ``eligible`` and
    ``thresholds`` are aligned with them.
    """

    sample_rows: torch.Tensor  # [S] long
    eligible: torch.Tensor  # [S] bool: a decode token whose request allows early exit
    thresholds: torch.Tensor  # [S] float32 confidence threshold per row


@dataclass
class ExitResult:
    logits: torch.Tensor  # [S, vocab] float32 full-vocabulary logits at each row's exit
    exit_layers: torch.Tensor  # [S] long, 1-based number of decoder layers run (L = full model)


def forward_with_exits(model: LlamaForCausalLM, heads: Optional[ExitHeads], input_ids: torch.Tensor,
                       positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], batch: ExitBatch) -> ExitResult:
    """Run one iteration of ``T`` flattened tokens through the decoder with early exit and KV fill.

    Args:
        input_ids, positions: ``[T]`` long.
        meta: paged-attention metadata (decode tokens first).
        kv_caches: per layer ``(k_cache, v_cache)``, each ``[num_blocks, block_size, KVH_local, d]``.
        heads: exit heads, or None for the full model.

    Returns:
        :class:`ExitResult` for ``batch.sample_rows``.
    """
    layers = model.model.layers
    L = len(layers)
    T, S = input_ids.shape[0], batch.sample_rows.shape[0]
    exit_layers_cfg = heads.cfg.exit_layers if heads is not None else ()
    per_sequence = heads is not None and heads.cfg.policy == "per_sequence"
    h = model.model.embed_tokens(input_ids)
    exited = torch.zeros(T, dtype=torch.bool)  # rows whose hidden state is frozen at their exit
    row_exit = torch.full((S,), L, dtype=torch.long)
    logits = torch.empty(S, model.config.vocab_size, dtype=torch.float32)
    pending = batch.eligible.clone()  # sample rows still allowed to exit early
    # rows whose logits wait for the single LM-head pass at the end: their final-norm inputs
    deferred = torch.zeros(S, dtype=torch.bool)
    states = h.new_empty(S, h.shape[1])
    compute_rows, compute_meta = None, None  # None: compute all rows
    for i, layer in enumerate(layers):
        if compute_rows is not None and compute_rows.numel() == 0:
            layer.fill_kv(h, positions, meta.slot_mapping, kv_caches[i])
            continue
        out = layer(h, positions, meta, kv_caches[i], compute_rows, compute_meta)
        if compute_rows is None:
            h = torch.where(exited.unsqueeze(1), h, out) if exited.any() else out
        else:
            h = h.index_copy(0, compute_rows, out)
        depth = i + 1
        if depth not in exit_layers_cfg or not pending.any():
            continue
        cand = pending.nonzero().squeeze(1)
        ok, local = heads.check(depth, h[batch.sample_rows[cand]], batch.thresholds[cand])
        if not ok.any():
            continue
        done = cand[ok]
        if local is None:  # cheap measure: logits later, in one LM-head pass with the other rows
            states[done] = heads.exit_state(depth, h[batch.sample_rows[done]])
            deferred[done] = True
        else:
            logits[done] = heads.model[0].lm_head.full_logits(local)
        row_exit[done] = depth
        pending[done] = False
        exited[batch.sample_rows[done]] = True
        if exited.all():
            compute_rows = exited.new_empty(0, dtype=torch.long)  # the batch stops: KV fill only
        elif per_sequence:
            compute_rows = (~exited).nonzero().squeeze(1)
            num_dec = int((~exited[: meta.num_decodes]).sum())
            compute_meta = meta.select_decodes(compute_rows[:num_dec])
    final = (row_exit == L).nonzero().squeeze(1)
    if final.numel():
        states[final] = h[batch.sample_rows[final]]
        deferred[final] = True
    rows = deferred.nonzero().squeeze(1)
    if rows.numel():
        logits[rows] = model.lm_head.full_logits(model.final_local_logits(states[rows]))
    return ExitResult(logits=logits, exit_layers=row_exit)
