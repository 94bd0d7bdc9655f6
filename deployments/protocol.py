"""OpenAI-compatible request and response models (pydantic) and their mapping to the engine.

Requests: ``/v1/completions`` and ``/v1/chat/completions`` with the usual sampling fields plus the
extras ``top_k``, ``ignore_eos`` and ``early_exit`` (``false``: full model; ``{"threshold": x}``:
per-request threshold; absent or ``true``: the server's default). Errors are OpenAI error objects
``{"error": {"message", "type", "param", "code"}}`` raised as :class:`OpenAIError`.
"""
from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.sampling import SamplingParams

FULL_MODEL_THRESHOLD = float("inf")  # a per-request threshold above 1 disables early exit


# ------------------------------------------------------------------------------------------ errors
class OpenAIError(Exception):
    """An error the API returns as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> OpenAIError:
    """The first pydantic error as a 400 whose ``param`` is the top-level field."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if not str(x).startswith("function-")]
    param = loc[0] if loc else None
    where = ".".join(loc)
    return OpenAIError(400, f"{where}: {err.get('msg', 'invalid value')}" if where else str(err.get("msg")),
                       param=param, code="invalid_value" if param else "invalid_request")


# ---------------------------------------------------------------------------------------- requests
class EarlyExitOption(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(ge=0.0, le=1.0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    early_exit: Union[bool, EarlyExitOption, None] = None
    logprobs: Union[bool, int, None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    user: Optional[str] = None

    def check_supported(self) -> None:
        """Raises OpenAIError(400) for options this server does not implement."""
        if self.n != 1:
            raise OpenAIError(400, "n: only n=1 is supported", param="n", code="unsupported_value")
        if self.logprobs:
            raise OpenAIError(400, "logprobs: not supported", param="logprobs", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name}: not supported (must be 0)", param=name, code="unsupported_value")
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias: not supported", param="logit_bias", code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options: only allowed when stream is true", param="stream_options")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise OpenAIError(400, "stop: at most 4 stop sequences", param="stop")

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def exit_threshold(self) -> Optional[float]:
        """Per-request threshold: None = server default; ``inf`` = full model."""
        if self.early_exit is False:
            return FULL_MODEL_THRESHOLD
        if isinstance(self.early_exit, EarlyExitOption):
            return self.early_exit.threshold
        return None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Raises OpenAIError(400) when SamplingParams rejects a value."""
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k in (None, 0) else self.top_k, seed=self.seed, stop=self.stop,
                stop_token_ids=self.stop_token_ids or (), ignore_eos=self.ignore_eos)
        except ValidationError as e:
            raise validation_error(e) from None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise OpenAIError(400, f"messages: content part type {bad[0]!r} is not supported (text only)",
                              param="messages", code="unsupported_value")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise OpenAIError(400, "tools: not supported", param="tools", code="unsupported_value")

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise OpenAIError(400, "echo: not supported", param="echo", code="unsupported_value")
        if self.suffix:
            raise OpenAIError(400, "suffix: not supported", param="suffix", code="unsupported_value")
        if self.best_of not in (None, 1):
            raise OpenAIError(400, "best_of: only 1 is supported", param="best_of", code="unsupported_value")

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt(s) as a list: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise OpenAIError(400, "prompt: must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class GenerateRequest(BaseModel):
    """What the ingress sends to an LLMServer replica (the router reads ``prompt_token_ids``)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    exit_threshold: Optional[float] = None
    # max_tokens was not given: the replica may lower it to what its KV cache can hold
    max_tokens_is_default: bool = False


# --------------------------------------------------------------------------------------- responses
class EarlyExitStats(BaseModel):
    num_layers: int
    mean_exit_layer: float
    exit_layer_counts: dict[str, int]

    @classmethod
    def from_layers(cls, num_layers: int, layers: list[int]) -> "EarlyExitStats":
        counts = Counter(layers)
        mean = sum(layers) / len(layers) if layers else float(num_layers)
        return cls(num_layers=num_layers, mean_exit_layer=mean,
                   exit_layer_counts={str(k): counts[k] for k in sorted(counts)})


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class _Choice(BaseModel):
    index: int
    logprobs: None = None
    finish_reason: Optional[str] = None


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


class CompletionResponse(_Response):
    object: str = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


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


class ChatCompletionChunk(_Response):
    object: str = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(CompletionResponse):
    pass


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
