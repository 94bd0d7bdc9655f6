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

Confidence is computed from vocab-parallel logits with all-reduces, so every tensor-parallel rank
takes the same exit decision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
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


class ExitHeads(nn.Module):
    """Maps an exit layer's hidden states to vocab-parallel logits.

    ``shared``: final norm + LM head (LayerSkip). ``trained``: a :class:`TrainedExitHead` per exit
    layer loaded from a safetensors file with keys ``exits.<layer>.{norm.weight,down.weight,up.weight}``.
    """

    def __init__(self, model: LlamaForCausalLM, cfg: ExitConfig):
        super().__init__()
        self.model = [model]  # not a submodule: its parameters belong to the model
        self.cfg = cfg
        self.heads = nn.ModuleDict()
        if cfg.head == "trained":
            state = load_file(cfg.heads_path)
            mc = model.config
            for layer in cfg.exit_layers:
                key = f"exits.{layer}.down.weight"
                if key not in state:
                    raise ValueError(f"heads_path {cfg.heads_path} has no head for exit layer {layer}")
                head = TrainedExitHead(mc.hidden_size, state[key].shape[0], mc.rms_norm_eps)
                head.load_state_dict({k.split(".", 2)[2]: v for k, v in state.items()
                                      if k.startswith(f"exits.{layer}.")})
                self.heads[str(layer)] = head.to(next(model.parameters()).dtype)

    def local_logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` hidden states after ``layer`` layers -> ``[n, V_local]`` float32 logits."""
        if str(layer) in self.heads:
            h = self.heads[str(layer)](h)
        return self.model[0].final_local_logits(h)


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
        local = heads.local_logits(depth, h[batch.sample_rows[cand]])
        conf = confidence_from_local_logits(local, heads.cfg.confidence)
        ok = conf >= batch.thresholds[cand]
        if not ok.any():
            continue
        done = cand[ok]
        logits[done] = heads.model[0].lm_head.full_logits(local[ok])
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
        local = model.final_local_logits(h[batch.sample_rows[final]])
        logits[final] = model.lm_head.full_logits(local)
    return ExitResult(logits=logits, exit_layers=row_exit)
