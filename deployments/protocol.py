"""OpenAI-compatible request models (pydantic; with :mod:`deployments.responses` they are the served
``/openapi.json``).

Requests: ``/v1/completions`` and ``/v1/chat/completions`` with OpenAI's sampling fields, vLLM's
extras (``top_k``, ``min_tokens``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``) and
``early_exit`` (``false``: full model; absent or ``true``: the server's default; an object
``{"mode", "threshold", "draft_layer", "num_draft_tokens", "skip_layers", "skip_selection"}``, every key optional: this
request's mode (``paper`` / ``per_sequence`` lossy, ``verified`` / ``self_speculative`` /
``layer_skip`` lossless), threshold and draft settings). Unknown fields are rejected (400), never
silently ignored. Errors are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}`` raised as
:class:`~deployments.errors.OpenAIError`. The mapping to the engine (:class:`cluster.sampling.SamplingParams`) is here;
what the engine checks against the model (context length, vocabulary, schemas) is not repeated.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from cluster.engine.protocol import MAX_DRAFT_TOKENS
from cluster.request import EXIT_MODES, LOSSLESS_MODES, SKIP_SELECTIONS, ExitMode, SkipSelection
from cluster.sampling import GuidedDecodingParams, SamplingParams
from deployments.errors import OpenAIError, validation_error

MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop sequences (OpenAI's limit)


# ---------------------------------------------------------------------------------------- requests
class EarlyExitOption(BaseModel):
    """A request's early-exit settings (every key optional; absent: the server's default)."""

    # The Field constraints are the checks (and the OpenAPI schema); _early_exit words their errors.
    model_config = ConfigDict(extra="forbid")
    mode: Optional[ExitMode] = Field(
        None, description="paper / per_sequence: lossy exits; verified / self_speculative / layer_skip: lossless "
                          "(the full model's output, drafts only speed it up)")
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0, strict=True,
                                       description="confidence threshold of this request's exits")
    draft_layer: Optional[int] = Field(None, ge=1, strict=True,
                                       description="self_speculative: the layer whose exit head drafts")
    num_draft_tokens: Optional[int] = Field(None, ge=1, le=MAX_DRAFT_TOKENS, strict=True,
                                            description="lossless modes: drafts per verification")
    skip_layers: Optional[list[int]] = Field(
        None, strict=True, description="layer_skip: the decoder layers (1-based, each below the last) its drafts "
                                       "leave out; absent: the server's")
    skip_selection: Optional[SkipSelection] = Field(
        None, description="layer_skip: static keeps the skip set; online re-chooses one of the same size from the "
                          "verified tokens (CLaSp); absent: the server's")

    @field_validator("draft_layer", "num_draft_tokens")
    @classmethod
    def _lossless_only(cls, v, info: ValidationInfo):
        mode = info.data.get("mode")
        if v is not None and mode is not None and mode not in LOSSLESS_MODES:
            raise PydanticCustomError("early_exit", "only with mode " + " or ".join(repr(m) for m in LOSSLESS_MODES)
                                      + f", not {mode!r}")
        return v

    @field_validator("skip_layers", "skip_selection")
    @classmethod
    def _layer_skip_only(cls, v, info: ValidationInfo):
        mode = info.data.get("mode")
        if v is not None and mode is not None and mode != "layer_skip":
            raise PydanticCustomError("early_exit", f"only with mode 'layer_skip', not {mode!r}")
        return v


# mode, threshold, draft_layer, num_draft_tokens, skip_layers, skip_selection
EARLY_EXIT_KEYS = tuple(EarlyExitOption.model_fields)


def _bounds(key: str) -> str:
    """``in [lo, hi]`` or ``>= lo``: the declared range of an EarlyExitOption field."""
    meta = {type(m).__name__: m for m in EarlyExitOption.model_fields[key].metadata}
    lo = f"{meta['Ge'].ge:g}"
    return f"in [{lo}, {meta['Le'].le:g}]" if "Le" in meta else f">= {lo}"


def _early_exit(v):
    """``early_exit``: a bool or ``{"mode", "threshold", "draft_layer", "num_draft_tokens",
    "skip_layers", "skip_selection"}`` (all optional), validated by :class:`EarlyExitOption` with a message that names
    the bad key."""
    if v is None or isinstance(v, (bool, EarlyExitOption)):
        return v
    if not isinstance(v, dict):
        raise PydanticCustomError("early_exit", "early_exit: must be true, false or an object with keys "
                                                f"{', '.join(EARLY_EXIT_KEYS)}")
    unknown = sorted(set(v) - set(EARLY_EXIT_KEYS))
    if unknown:
        raise PydanticCustomError("early_exit", f"early_exit.{unknown[0]}: unknown key (allowed: "
                                                f"{', '.join(EARLY_EXIT_KEYS)})")
    try:
        return EarlyExitOption.model_validate(v)
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0])
        kind, got = err["type"], v.get(key)
        if key == "mode":
            why = f"must be one of {', '.join(EXIT_MODES)}, got {got!r}"
        elif key == "skip_selection" and kind == "literal_error":
            why = f"must be one of {', '.join(SKIP_SELECTIONS)}, got {got!r}"
        elif key == "skip_layers" and kind in ("list_type", "int_type"):
            why = f"must be a list of layer numbers (integers), got {got!r}"
        elif kind == "float_type":
            why = f"must be a number {_bounds(key)}"
        elif kind == "int_type":
            why = "must be an integer"
        elif kind in ("greater_than_equal", "less_than_equal"):
            why = f"must be {_bounds(key)}, got {got}"
        else:
            why = err["msg"]
        raise PydanticCustomError("early_exit", f"early_exit.{key}: {why}"[:300]) from None


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
                          "mode, threshold, draft_layer, num_draft_tokens, skip_layers, skip_selection (absent keys: the "
                          "server's)")
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
                "draft_layer": o.draft_layer if o else None, "num_draft_tokens": o.num_draft_tokens if o else None,
                "skip_layers": o.skip_layers if o else None, "skip_selection": o.skip_selection if o else None}

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
