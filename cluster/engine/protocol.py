"""The engine's typed boundary (after vLLM v1's ``EngineCoreRequest`` / ``RequestOutput``).

One :class:`EngineRequest` goes in, built once and checked against the model by
:class:`cluster.frontend.processor.Processor`; the engine checks its KV cache fit (raising
:class:`InvalidRequestError`) and answers with a stream of :class:`RequestOutput` deltas. Every front end (offline :class:`cluster.llm.LLM`, the Serve replica, the HTTP ingress) uses
these types and nothing else: pure Python, pickled cheaply between Ray processes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.request import ExitMode, SkipSelection
from cluster.sampling import SamplingParams

MAX_DRAFT_TOKENS = 16  # drafts per verification a request may ask for


class InvalidRequestError(ValueError):
    """A request the engine refuses; the HTTP layer maps it to a 400 OpenAI error object.

    Attributes:
        param: the request field at fault (OpenAI's ``param``), e.g. ``"prompt"``, ``"max_tokens"``.
        code: a short machine-readable code, e.g. ``"context_length_exceeded"``, ``"invalid_value"``.
        message: human-readable text naming the field and the limit.
    """

    def __init__(self, param: Optional[str], message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code, self.message = param, code, message

    def __reduce__(self):  # keep param/code through pickling (Ray)
        return (InvalidRequestError, (self.param, self.message, self.code))

    @classmethod
    def from_validation(cls, e: ValidationError) -> "InvalidRequestError":
        """The first error of a pydantic ``ValidationError``, its top-level field as ``param``."""
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        msg = str(err.get("msg") or "invalid value").removeprefix("Value error, ")
        return cls(loc[0] if loc else None, f"{'.'.join(loc)}: {msg}" if loc else msg)


def lower_max_tokens(sp: SamplingParams, room: int) -> SamplingParams:
    """``sp`` with a default ``max_tokens`` lowered to the ``room`` left (context window or KV cache).

    Raises:
        InvalidRequestError: (``min_tokens``) ``min_tokens`` exceeds ``room``.
    """
    try:
        return sp.with_max_tokens(room)
    except ValidationError:
        raise InvalidRequestError("min_tokens", f"min_tokens: {sp.min_tokens} exceeds the room left for the "
                                  f"completion ({room} tokens)") from None


class EngineRequest(BaseModel):
    """One generation request as the engine receives it.

    Attributes:
        request_id: unique among the engine's unfinished requests.
        prompt_token_ids: ``[P]`` token ids, ``1 <= P < max_model_len``, each in ``[0, vocab_size)``.
        sampling_params: sampling, stopping, penalties, logprobs and guided decoding.
        early_exit: False runs the full model (no exit test, no drafts); True: the fields below and
            the engine's exit config decide (:meth:`cluster.engine.engine.LLMEngine.resolve_exit_plan`).
        exit_threshold: per-request early-exit confidence threshold in ``[0, 1]``; None: the
            engine's exit config (per exit layer if calibrated).
        max_tokens_is_default: the client gave no ``max_tokens``: the engine lowers it to what the
            context window and the KV cache can hold instead of refusing the request.
        exit_mode: None (the exit config's mode), ``paper`` / ``per_sequence`` (lossy exits; the
            batch's compute policy stays the engine's), ``verified``, ``self_speculative`` or
            ``layer_skip`` (lossless: the output is the full model's; see :class:`cluster.config.ExitConfig`).
        draft_layer, num_draft_tokens: override the exit config's for ``self_speculative`` /
            ``verified`` / ``layer_skip`` (None: the config's; ``draft_layer``: ``self_speculative``
            only). A ``num_draft_tokens`` given here is used as is by ``self_speculative`` and
            ``layer_skip`` (no adaptive draft length: LayerSkip's fixed setting).
        skip_layers: ``layer_skip``: the decoder layers (1-based, any order) its drafts leave out,
            each in ``[1, num_layers - 1]`` (checked by the engine); None: the exit config's, else
            :func:`cluster.request.default_skip_layers`.
        skip_selection: ``layer_skip``: ``static`` or ``online`` (re-chosen from the verified tokens,
            CLaSp); None: the exit config's.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    prompt_token_ids: list[int] = Field(min_length=1)
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    early_exit: bool = True
    exit_threshold: Optional[float] = Field(None, ge=0.0, le=1.0)
    max_tokens_is_default: bool = False
    exit_mode: Optional[ExitMode] = None
    draft_layer: Optional[int] = Field(None, ge=1)
    num_draft_tokens: Optional[int] = Field(None, ge=1, le=MAX_DRAFT_TOKENS)
    skip_layers: Optional[tuple[int, ...]] = None
    skip_selection: Optional[SkipSelection] = None


@dataclass
class TokenLogprob:
    """Log-probability of one generated token and the ``k`` most likely alternatives.

    ``top`` holds ``(token_id, logprob)`` pairs, most likely first (empty when ``logprobs == 0``).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One request's delta after an engine step (the last one has ``finished=True``).

    ``new_*`` fields hold only what this step added; ``new_text`` is safe to show (incomplete UTF-8
    characters and a possible partial stop string are held back until resolved), so the
    concatenated ``new_text`` of all deltas is the final text. ``new_exit_layers[i]`` is the number
    of decoder layers run for ``new_token_ids[i]`` (``num_layers`` = full model). ``finish_reason``
    is ``stop``, ``length``, ``abort`` or ``error`` (then ``error`` holds the message; only this
    request failed). Times are ``time.monotonic()`` seconds.
    """

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_exit_layers: list[int] = field(default_factory=list)
    new_logprobs: Optional[list[TokenLogprob]] = None
    finished: bool = False
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None  # the stop string or stop token id that finished it
    error: Optional[str] = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total so far
    num_cached_tokens: int = 0
    num_layers: int = 0
    arrival_time: float = 0.0
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    # lossless early exit, totals so far: drafts proposed, drafts accepted, verification iterations
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_steps: int = 0
    # the early-exit mode the request runs (None: the full model) and the replica that serves it
    # (set by a Serve replica; empty offline)
    exit_mode: Optional[str] = None
    replica: str = ""


def now() -> float:
    return time.monotonic()
