"""Sampling parameters (validated with pydantic; torch-free so the scheduler can import them).

The batched sampler that applies them lives in :mod:`cluster.model.layers.sampler`.
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


SEED_MODULUS = 1 << 64  # torch.Generator.manual_seed takes seeds in [0, 2**64)
MAX_LOGPROBS = 20  # top logprobs per token (the OpenAI API's limit)


class GuidedDecodingParams(BaseModel):
    """Constrained decoding: the sampled token must keep the output a prefix of a valid document.

    Exactly one of ``json_object`` (any JSON object) or ``json_schema`` (a JSON Schema as a dict or
    its JSON text) is set. Enforced by :mod:`cluster.engine.guided` (xgrammar) with a per-step
    token mask; compatible with early exit (an exit's token is masked too).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    json_object: bool = False
    json_schema: Optional[str] = Field(None, description="JSON Schema text")

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_to_text(cls, v):
        import json

        return json.dumps(v) if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _exactly_one(self):
        if bool(self.json_object) == (self.json_schema is not None):
            raise ValueError("set exactly one of json_object or json_schema")
        return self


class SamplingParams(BaseModel):
    """Per-request sampling and stopping rules (names and meanings as in vLLM / the OpenAI API).

    Logits processing order (vLLM's): ``logit_bias`` and ``min_tokens`` (EOS and ``stop_token_ids``
    masked while fewer than ``min_tokens`` tokens were generated), the guided-decoding mask, then
    repetition penalty (CTRL, Keskar et al. 2019: positive logits of prompt and output tokens divided
    by it, negative ones multiplied), frequency and presence penalties (OpenAI: ``logit -= count *
    frequency_penalty + (count > 0) * presence_penalty`` over output tokens), then temperature,
    top-k, top-p and the draw. ``logprobs`` (None: off; k >= 0: the sampled token's log-probability
    plus the k most likely) are log-softmax of the model's raw logits at the row's exit layer
    (vLLM's default ``raw_logprobs``). ``seed`` may be any integer: it is reduced modulo 2**64.

    Raises:
        pydantic.ValidationError (a ``ValueError``): a field is out of range; the message names it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0.0)
    top_k: int = Field(-1, description="-1 or 0 disables top-k")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    guided_decoding: Optional[GuidedDecodingParams] = None
    skip_special_tokens: bool = True

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

    @field_validator("seed")
    @classmethod
    def _reduce_seed(cls, v):
        return None if v is None else int(v) % SEED_MODULUS

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v):
        for tok, bias in v.items():
            if tok < 0:
                raise ValueError(f"token id {tok} is negative")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias {bias} of token {tok} is outside [-100, 100]")
        return v

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v):
        if v < -1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _check_min_tokens(cls, v, info):
        # the one check of min_tokens <= max_tokens (max_tokens is validated first: declared first)
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and v > max_tokens:
            raise ValueError(f"min_tokens ({v}) must not exceed max_tokens ({max_tokens})")
        return v

    def with_max_tokens(self, max_tokens: int) -> "SamplingParams":
        """A copy with ``max_tokens`` replaced, validated again.

        Raises:
            pydantic.ValidationError: ``min_tokens`` exceeds the new ``max_tokens``, or it is < 1.
        """
        return SamplingParams.model_validate({**self.model_dump(), "max_tokens": max_tokens})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """True when the sampler needs the request's token history."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
