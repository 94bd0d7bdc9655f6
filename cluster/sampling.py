"""Sampling parameters (validated with pydantic) and the batched sampler.

The sampler follows the usual order of Hugging Face / vLLM logits processing: temperature, then
top-k, then top-p (nucleus, Holtzman et al. 2020), then a draw from the remaining distribution.
``temperature == 0`` means greedy (argmax).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # torch stays out of the torch-free scheduler's imports
    import torch


class SamplingParams(BaseModel):
    """Per-request sampling and stopping rules (names as in vLLM / the OpenAI API).

    Raises:
        pydantic.ValidationError (a ``ValueError``): a field is out of range; the message names it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_k: int = Field(-1, description="-1 or 0 disables top-k")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_to_tuple(cls, v):
        if v is None:
            return ()
        if isinstance(v, str):
            return (v,)
        return tuple(v)

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _ids_to_tuple(cls, v):
        return () if v is None else tuple(v)

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v):
        if v < -1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(
    logits: "torch.Tensor",
    params: Sequence[SamplingParams],
    generators: Sequence[Optional["torch.Generator"]],
) -> "torch.Tensor":
    """Draw one token per row.

    Args:
        logits: ``[n, vocab]`` float logits (full vocabulary).
        params: ``n`` sampling parameter sets, one per row.
        generators: ``n`` generators (``None`` uses the global RNG); seeded requests pass their own.

    Returns:
        ``[n]`` int64 token ids.
    """
    import torch

    n = logits.shape[0]
    out = torch.empty(n, dtype=torch.long)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        idx = torch.tensor(greedy_rows)
        out[idx] = logits[idx].argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].float() / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop tokens whose preceding cumulative mass already reaches top_p (keep at least one)
            drop = probs.cumsum(-1) - probs >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
        probs = row.softmax(-1)
        out[i] = torch.multinomial(probs, 1, generator=generators[i]).item()
    return out
