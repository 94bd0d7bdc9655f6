"""Vocab-parallel embedding and LM head (Megatron-LM): each rank holds ``ceil(V / tp)`` rows.

The last shard is zero-padded when the vocabulary does not divide; padded logits are ``-inf``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_size
from cluster.model.layers.linear import narrow, shape_of
from cluster.model.layers.quant import QuantizableLinear


class VocabParallelEmbedding(nn.Module):
    """``[T] token ids -> [T, hidden]``; one all-reduce when ``tp > 1``."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.vocab_size = vocab_size
        self.vocab_local = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.vocab_local
        self.vocab_end = min(self.vocab_start + self.vocab_local, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.vocab_local, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = self.vocab_end - self.vocab_start
        if shape_of(loaded)[0] < self.vocab_end:
            raise ValueError(f"embedding has {shape_of(loaded)[0]} rows, expected {self.vocab_size}")
        param.data[:n].copy_(narrow(loaded, 0, self.vocab_start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(mask, input_ids - self.vocab_start, 0)
        y = F.embedding(local, self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding, QuantizableLinear):
    """``[n, hidden] -> [n, V / tp]`` vocab-parallel logits (``-inf`` on padding).

    With tied embeddings it shares the embedding's weight tensor (quantized, it adds its own
    quantized copy and the float weight stays for the embedding lookup).
    """

    is_lm_head = True

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab_size, hidden_size)
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight

    def quantize_(self, method: str, group_size: int, keep_float: bool = False) -> None:
        """Weight-only quantized logits; a head tied to the embedding keeps the shared float weight
        (the embedding lookup stays float)."""
        super().quantize_(method, group_size, keep_float or self.tied)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's logits, float32: ``[n, vocab_local]``."""
        logits = self.matmul(hidden).float()
        pad = self.vocab_local - (self.vocab_end - self.vocab_start)
        if pad:
            logits[:, -pad:] = float("-inf")
        return logits

    def full_logits(self, local: torch.Tensor) -> torch.Tensor:
        """Gather vocab shards: ``[n, vocab_local] -> [n, vocab_size]`` on every rank."""
        return all_gather_last_dim(local)[:, : self.vocab_size]
