"""OpenAI-compatible request and response models (pydantic; they are the served ``/openapi.json``).

Requests: ``/v1/completions`` and ``/v1/chat/completions`` with OpenAI's sampling fields, vLLM's
extras (``top_k``, ``min_tokens``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``) and
``early_exit`` (``false``: full model; absent or ``true``: the server's default; an object
``{"mode", "threshold", "draft_layer", "num_draft_tokens"}``, every key optional: this request's
mode (``paper`` / ``per_sequence`` lossy, ``verified`` / ``self_speculative`` lossless), threshold
and draft settings). Unknown fields are rejected (400), never silently ignored. Errors
are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}`` raised as
:class:`OpenAIError`. The mapping to the engine (:class:`cluster.sampling.SamplingParams`) is here;
what the engine checks against the model (context length, vocabulary, schemas) is not repeated.
"""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from cluster.request import EXIT_MODES, LOSSLESS_MODES, ExitMode
from cluster.engine.protocol import MAX_DRAFT_TOKENS, EngineRequest
from cluster.sampling import GuidedDecodingParams, SamplingParams

MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop sequences (OpenAI's limit)


# ------------------------------------------------------------------------------------------ errors
class OpenAIError(Exception):
    """An error the API returns as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def pydantic_error(err: dict, skip: int = 0) -> OpenAIError:
    """One pydantic error (``ValidationError.errors()`` item) as a 400 whose ``param`` is the
    top-level field; ``skip`` leading ``loc`` items are dropped (FastAPI's ``"body"``)."""
    loc = [str(x) for x in list(err.get("loc", ()))[skip:] if not str(x).startswith("function-")]
    param = loc[0] if loc else None
    where = ".".join(loc)
    msg = str(err.get("msg") or "invalid value").removeprefix("Value error, ")
    kind = err.get("type")
    if kind == "extra_forbidden":
        msg = "unknown field: this server does not support it"
    elif kind == "json_invalid":
        return OpenAIError(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}",
                           code="invalid_json")
    if where and msg.startswith(where):  # the validator named the field itself
        return OpenAIError(400, msg, param=param, code="invalid_value")
    return OpenAIError(400, f"{where}: {msg}" if where else msg, param=param,
                       code="invalid_value" if param else "invalid_request")


def validation_error(e: ValidationError) -> OpenAIError:
    return pydantic_error(e.errors()[0])


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------------------- requests
EARLY_EXIT_KEYS = ("mode", "threshold", "draft_layer", "num_draft_tokens")


class EarlyExitOption(BaseModel):
    """A request's early-exit settings (every key optional; absent: the server's default)."""

    model_config = ConfigDict(extra="forbid")
    mode: Optional[ExitMode] = Field(
        None, description="paper / per_sequence: lossy exits; verified / self_speculative: lossless (the full "
                          "model's output, exits only speed it up)")
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0, description="confidence threshold of this request's exits")
    draft_layer: Optional[int] = Field(None, ge=1, description="self_speculative: the layer whose exit head drafts")
    num_draft_tokens: Optional[int] = Field(None, ge=1, le=MAX_DRAFT_TOKENS,
                                            description="lossless modes: drafts per verification")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """``text`` (free text), ``json_object`` (a JSON object) or ``json_schema`` (JSON valid against
    ``json_schema.schema``); the JSON forms are enforced by guided decoding, ``strict`` or not."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaSpec] = None

    def guided(self) -> Optional[GuidedDecodingParams]:
        if self.json_schema is not None and self.type != "json_schema":
            raise OpenAIError(400, f"response_format.json_schema: only allowed with type json_schema, not {self.type}",
                              param="response_format")
        if self.type == "json_object":
            return GuidedDecodingParams(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise OpenAIError(400, "response_format.json_schema.schema: required when type is json_schema",
                                  param="response_format")
            return GuidedDecodingParams(json_schema=json.dumps(self.json_schema.schema_))
        return None


def _early_exit(v):
    """``early_exit``: a bool or ``{"mode", "threshold", "draft_layer", "num_draft_tokens"}`` (all
    optional), with a message that names the bad key."""
    if v is None or isinstance(v, (bool, EarlyExitOption)):
        return v
    if not isinstance(v, dict):
        raise PydanticCustomError("early_exit", "early_exit: must be true, false or an object with keys "
                                                f"{', '.join(EARLY_EXIT_KEYS)}")
    unknown = sorted(set(v) - set(EARLY_EXIT_KEYS))
    if unknown:
        raise PydanticCustomError("early_exit", f"early_exit.{unknown[0]}: unknown key (allowed: "
                                                f"{', '.join(EARLY_EXIT_KEYS)})")
    mode = v.get("mode")
    if mode is not None and mode not in EXIT_MODES:
        raise PydanticCustomError("early_exit", f"early_exit.mode: must be one of {', '.join(EXIT_MODES)}, "
                                                f"got {mode!r}"[:300])
    t = v.get("threshold")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise PydanticCustomError("early_exit", "early_exit.threshold: must be a number in [0, 1]")
        if not 0.0 <= t <= 1.0:
            raise PydanticCustomError("early_exit", f"early_exit.threshold: must be in [0, 1], got {t}")
    for key, hi in (("draft_layer", None), ("num_draft_tokens", MAX_DRAFT_TOKENS)):
        k = v.get(key)
        if k is None:
            continue
        if isinstance(k, bool) or not isinstance(k, int):
            raise PydanticCustomError("early_exit", f"early_exit.{key}: must be an integer")
        if k < 1 or (hi is not None and k > hi):
            rng = f"in [1, {hi}]" if hi is not None else ">= 1"
            raise PydanticCustomError("early_exit", f"early_exit.{key}: must be {rng}, got {k}")
        if mode is not None and mode not in LOSSLESS_MODES:
            raise PydanticCustomError("early_exit", f"early_exit.{key}: only with mode 'verified' or "
                                                    f"'self_speculative', not {mode!r}")
    return EarlyExitOption(mode=mode, threshold=t, draft_layer=v.get("draft_layer"),
                           num_draft_tokens=v.get("num_draft_tokens"))


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions (unknown fields: 400)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1, description="default: the server's default_max_tokens")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="default 1; 0 is greedy")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1, description="-1 or 0: off")
    min_tokens: int = Field(0, ge=0, description="EOS and stop_token_ids are masked until this many tokens")
    seed: Optional[int] = Field(None, description="any integer (reduced modulo 2**64); sample j of n uses seed + j")
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    logit_bias: Optional[dict[str, float]] = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    response_format: Optional[ResponseFormat] = None
    early_exit: Union[bool, EarlyExitOption, None] = Field(
        None, description="false: full model; true or absent: the server's default; an object: this request's "
                          "mode, threshold, draft_layer, num_draft_tokens (absent keys: the server's)")
    user: Optional[str] = None

    @field_validator("early_exit", mode="before")
    @classmethod
    def _check_early_exit(cls, v):
        return _early_exit(v)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        for k, b in v.items():
            try:
                int(k)
            except ValueError:
                raise PydanticCustomError("logit_bias", f"logit_bias: keys must be token ids, got {k!r}") from None
            if not -100.0 <= b <= 100.0:
                raise PydanticCustomError("logit_bias", f"logit_bias: bias of token {k} must be in [-100, 100]")
        return v

    def check_supported(self) -> None:
        """Cross-field checks (OpenAIError 400); single fields are checked by pydantic."""
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options: only allowed when stream is true", param="stream_options")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise OpenAIError(400, f"stop: at most {MAX_STOP} stop sequences", param="stop")

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def engine_exit_fields(self) -> dict:
        """The :class:`EngineRequest` early-exit fields of this request (None: the server's default;
        ``early_exit: false``: the full model)."""
        o = self.early_exit if isinstance(self.early_exit, EarlyExitOption) else None
        return {"early_exit": self.early_exit is not False, "exit_threshold": o.threshold if o else None,
                "exit_mode": o.mode if o else None,
                "draft_layer": o.draft_layer if o else None, "num_draft_tokens": o.num_draft_tokens if o else None}

    def num_logprobs(self) -> Optional[int]:
        """SamplingParams.logprobs: None (off) or the number of top alternatives."""
        return None

    def sampling_params(self, max_tokens: int, sample: int = 0) -> SamplingParams:
        """Engine sampling parameters of sample ``sample`` (seeded requests: ``seed + sample``).

        Raises:
            OpenAIError(400): a value SamplingParams rejects (the message names the field).
        """
        try:
            return SamplingParams(
                max_tokens=max_tokens, min_tokens=self.min_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k in (None, 0) else self.top_k,
                seed=None if self.seed is None else self.seed + sample, stop=self.stop,
                stop_token_ids=self.stop_token_ids or (), ignore_eos=self.ignore_eos,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                logit_bias={int(k): float(b) for k, b in (self.logit_bias or {}).items()},
                logprobs=self.num_logprobs(),
                guided_decoding=self.response_format.guided() if self.response_format else None)
        except ValidationError as e:
            raise validation_error(e) from None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="no 'tool' role: this server has no tool calling")
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


def conversation(messages: list[ChatMessage]) -> list[dict]:
    role = {"developer": "system"}
    return [{"role": role.get(m.role, m.role), "content": m.text()} for m in messages]


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise OpenAIError(400, "tools: tool calling is not supported by this server; for structured output use "
                                   "response_format {\"type\": \"json_schema\", ...}", param="tools",
                              code="unsupported_value")
        if self.tool_choice not in (None, "none"):
            raise OpenAIError(400, "tool_choice: tool calling is not supported by this server (only \"none\"); for "
                                   "structured output use response_format", param="tool_choice",
                              code="unsupported_value")
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="a string, token ids, or a list of either (one choice set per prompt)")
    echo: bool = Field(False, description="prepend the prompt to each choice's text")
    logprobs: Optional[int] = Field(None, ge=0, le=5, description="log-probabilities of the k most likely tokens")
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise OpenAIError(400, "suffix: not supported", param="suffix", code="unsupported_value")
        if self.best_of not in (None, self.n):
            raise OpenAIError(400, "best_of: only best_of == n is supported", param="best_of",
                              code="unsupported_value")

    def num_logprobs(self) -> Optional[int]:
        return self.logprobs

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


class TokenizeRequest(BaseModel):
    """``prompt`` (encoded as ``/v1/completions`` does) or ``messages`` (with the chat template)."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_special_tokens: bool = Field(False, description="prompt only; completions add none")
    add_generation_prompt: bool = Field(True, description="messages only")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    tokens: list[int]


# --------------------------------------------------------------------------------------- responses
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
