"""Exit heads and the exit test: the confidence measures, the trained heads and exit classifiers,
and :class:`ExitHeads`, which maps an exit layer's hidden states to logits and decides who exits.

Confidence is computed from vocab-parallel logits with all-reduces (``max_prob``, ``top2_margin``),
or by a small exit classifier on the replicated hidden state (``classifier``: no logits unless the
row exits), so every tensor-parallel rank takes the same exit decision. The layer-by-layer forward
that uses them is :func:`cluster.model.exits.forward_with_exits`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cluster.config import ExitConfig
from cluster.distributed import all_gather_last_dim, all_reduce, tp_size
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
        p = next(model.parameters())
        dtype, device = p.dtype, p.device  # heads live beside the model's weights
        if cfg.head == "trained":
            state = load_file(cfg.heads_path)
            mc = model.config

            def part(cls, prefix: str, first: str, what: str, layer: int) -> nn.Module:
                """Module ``cls`` of exit layer ``layer`` from ``state[prefix + ...]`` on the model's
                device and dtype; its width is read from the tensor ``prefix + first``."""
                if prefix + first not in state:
                    raise ValueError(f"heads_path {cfg.heads_path} has no {what} for exit layer {layer}")
                with torch.device(device):
                    module = cls(mc.hidden_size, state[prefix + first].shape[0], mc.rms_norm_eps)
                return _load_prefixed(module, state, prefix).to(dtype)

            for layer in cfg.exit_layers:
                self.heads[str(layer)] = part(TrainedExitHead, f"exits.{layer}.", "down.weight", "head", layer)
                if cfg.confidence == "classifier":
                    self.classifiers[str(layer)] = part(ExitClassifier, f"exit_classifiers.{layer}.", "fc1.weight",
                                                        "exit classifier", layer)
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
        :func:`~cluster.model.exits.forward_with_exits` calls :meth:`decide` instead and selects with
        host-known indices.
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
