"""OpenAI-compatible response and streamed-chunk models (pydantic; part of ``/openapi.json``).

Completions and chat completions share :class:`_Response` (``id``, ``object``, ``created``,
``model``, ``usage``, ``early_exit``) and :class:`_Choice` (``index``, ``finish_reason``,
``stop_reason``); a streamed chunk has its response's shape with one choice per delta.
"""
from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Optional, Union

from pydantic import BaseModel, Field


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class EarlyExitStats(BaseModel):
    """Exit statistics of a response's generated tokens (all choices together)."""

    num_layers: int
    mean_exit_layer: float
    exit_layer_counts: dict[str, int]
    mode: Optional[str] = Field(None, description="the early-exit mode used (null: the full model)")
    num_draft_tokens: int = Field(0, description="lossless modes: drafts proposed")
    num_accepted_tokens: int = Field(0, description="lossless modes: drafts the full model confirmed")
    acceptance_rate: Optional[float] = Field(None, description="accepted / proposed drafts (null without drafts)")
    tokens_per_verify: Optional[float] = Field(
        None, description="verified tokens per verification iteration, (accepted + iterations) / iterations "
                          "(null without verification)")

    @classmethod
    def from_layers(cls, num_layers: int, layers: list[int], mode: Optional[str] = None, num_draft_tokens: int = 0,
                    num_accepted_tokens: int = 0, num_verify_steps: int = 0) -> "EarlyExitStats":
        counts = Counter(layers)
        mean = sum(layers) / len(layers) if layers else float(num_layers)
        return cls(num_layers=num_layers, mean_exit_layer=mean,
                   exit_layer_counts={str(k): counts[k] for k in sorted(counts)}, mode=mode,
                   num_draft_tokens=num_draft_tokens, num_accepted_tokens=num_accepted_tokens,
                   acceptance_rate=num_accepted_tokens / num_draft_tokens if num_draft_tokens else None,
                   tokens_per_verify=((num_accepted_tokens + num_verify_steps) / num_verify_steps
                                      if num_verify_steps else None))


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; the echoed prompt's tokens have ``null`` log-probabilities."""

    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class _Choice(BaseModel):
    index: int
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = Field(None, description="the stop string or token id that ended it")


class _Response(BaseModel):
    """Fields every completion / chat response and streamed chunk shares (``object`` set by each)."""

    id: str
    object: str
    created: int
    model: str
    usage: Optional[Usage] = None
    early_exit: Optional[EarlyExitStats] = None


class CompletionChoice(_Choice):
    text: str
    logprobs: Optional[CompletionLogprobs] = None


class CompletionResponse(_Response):
    object: str = "text_completion"
    choices: list[CompletionChoice]


class CompletionChunk(CompletionResponse):
    pass


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str
    refusal: Optional[str] = None


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionResponse(_Response):
    object: str = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    early_exit: EarlyExitStats


class Delta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatChunkChoice(_Choice):
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionChunk(_Response):
    object: str = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "eeserve"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
