"""Request state shared by the scheduler and the engine (pure Python, no torch)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol, get_args

from cluster.sampling import SamplingParams

# Early-exit modes, defined here once: the lossy policies (a token's exit-head prediction is final)
# and the lossless speculative modes (exit-head tokens, or the tokens of the model with a set of layers
# skipped, are drafts that the full model verifies; cluster.model.speculative). Every other module
# imports these names.
LossyMode = Literal["paper", "per_sequence"]
LosslessMode = Literal["verified", "self_speculative", "layer_skip"]
ExitMode = Literal[LossyMode, LosslessMode]
LOSSY_MODES: tuple[str, ...] = get_args(LossyMode)
LOSSLESS_MODES: tuple[str, ...] = get_args(LosslessMode)
EXIT_MODES: tuple[str, ...] = get_args(ExitMode)
# What a request that names no mode gets, set by an exit config or a server: an exit mode, or "full" (the
# full model; requests may still ask for a mode). The default model ships "full" where no mode measured
# faster than it (README, "Which early-exit mode by default").
DefaultMode = Literal[ExitMode, "full"]
DEFAULT_MODES: tuple[str, ...] = get_args(DefaultMode)
# ``layer_skip``'s skip set: fixed (the request's, the exit config's or the default rule) or re-chosen
# during decoding from the full model's hidden states (CLaSp; cluster.model.skip_select)
SkipSelection = Literal["static", "online"]
SKIP_SELECTIONS: tuple[str, ...] = get_args(SkipSelection)


def default_skip_layers(num_layers: int) -> tuple[int, ...]:
    """``layer_skip``'s skip set when neither the request nor the exit config gives one: every other
    layer of the middle half, ``L//4 + 1, L//4 + 3, ... <= 3L//4`` (1-based; SWIFT, Xia et al. 2024,
    finds the middle layers the most redundant). E.g. 30 layers -> 8, 10, ..., 22 (8 layers); 6 -> 2, 4.
    Never the last layer; empty only for a 1-layer model."""
    hi = min((3 * num_layers) // 4, num_layers - 1)
    return tuple(range(num_layers // 4 + 1, hi + 1, 2))


@dataclass(frozen=True)
class ExitPlan:
    """How one request uses early exit, resolved once by the engine (what the scheduler and the
    model runner see; no sentinel values).

    Attributes:
        mode: None runs the full model (no exit test); ``paper`` / ``per_sequence``: lossy exits at
            ``threshold`` (the batch's compute policy is the engine's); ``verified`` /
            ``self_speculative`` / ``layer_skip``: lossless drafts verified by the full model.
        draft_layer: ``self_speculative``: the exit layer whose head drafts (None otherwise).
        skip_layers: ``layer_skip``: the decoder layers (1-based) the drafts leave out, sorted, unique,
            non-empty (the engine checks that each is below the last layer); ``()`` otherwise.
        num_draft_tokens: lossless modes: drafts per verification (at most; with ``adaptive`` the
            draft control may choose fewer or none: :mod:`cluster.core.draft_control`); 0 otherwise.
        draft_cost: lossless modes: one draft's cost as a fraction of a full decode step.
        adaptive: lossless modes: the draft control picks the draft length.
        threshold: the confidence threshold of this request's exit tests, in ``[0, 1]``; None: the
            exit config's (per exit layer if calibrated).
        skip_selection: ``layer_skip``: ``static`` drafts with ``skip_layers`` throughout; ``online``
            starts from them and re-chooses a set of the same size from the verified tokens (CLaSp,
            :mod:`cluster.model.skip_select`; never the first or last layer).

    Raises:
        ValueError: an unknown mode; a lossless mode with ``num_draft_tokens < 1``;
            ``self_speculative`` without ``draft_layer``; ``layer_skip`` without ``skip_layers``, or
            with ``skip_layers`` not sorted and unique or below 1, or with a ``draft_layer``;
            ``skip_layers`` with another mode; draft settings with a lossy mode or the full model; a
            threshold outside ``[0, 1]``; an unknown ``skip_selection``, or ``online`` without
            ``layer_skip``.
    """

    mode: Optional[ExitMode] = None
    draft_layer: Optional[int] = None
    num_draft_tokens: int = 0
    draft_cost: float = 0.0
    adaptive: bool = True
    threshold: Optional[float] = None
    skip_layers: tuple[int, ...] = ()
    skip_selection: SkipSelection = "static"

    def __post_init__(self):
        if self.skip_selection not in SKIP_SELECTIONS:
            raise ValueError(f"skip_selection must be one of {SKIP_SELECTIONS}, got {self.skip_selection!r}")
        if self.skip_selection == "online" and self.mode != "layer_skip":
            raise ValueError(f"skip_selection 'online' needs mode 'layer_skip', not {self.mode!r}")
        if self.mode is not None and self.mode not in EXIT_MODES:
            raise ValueError(f"mode must be one of {EXIT_MODES} or None, got {self.mode!r}")
        if self.mode in LOSSLESS_MODES:
            if self.num_draft_tokens < 1:
                raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
            if self.mode == "self_speculative" and self.draft_layer is None:
                raise ValueError("self_speculative needs a draft_layer")
            if self.mode == "layer_skip":
                skip = self.skip_layers
                if not skip:
                    raise ValueError("layer_skip needs a non-empty skip_layers")
                if list(skip) != sorted(set(skip)) or skip[0] < 1:
                    raise ValueError(f"skip_layers must be sorted, unique layer numbers >= 1, got {skip}")
                if self.draft_layer is not None:
                    raise ValueError("layer_skip drafts with the whole model minus skip_layers, not a draft_layer")
        elif self.draft_layer is not None or self.num_draft_tokens:
            raise ValueError(f"draft_layer and num_draft_tokens need a lossless mode, not {self.mode!r}")
        if self.skip_layers and self.mode != "layer_skip":
            raise ValueError(f"skip_layers need mode 'layer_skip', not {self.mode!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @property
    def is_lossless(self) -> bool:
        return self.mode in LOSSLESS_MODES

    @property
    def is_full_model(self) -> bool:
        """No exit test at all: every token runs every layer."""
        return self.mode is None


FULL_MODEL = ExitPlan()


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request; every status above PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status > RequestStatus.PREEMPTED


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class TokenObserver(Protocol):
    """What the engine hangs on a request to see each generated token as the scheduler appends it
    (text detokenization, guided-decoding grammar): the scheduler's :meth:`update` is the one place
    that decides a request stops, and it asks the observer about stop strings and grammar ends."""

    def observe(self, token_id: int, final: bool) -> tuple[bool, Optional[str]]:
        """Take one generated token (``final``: the scheduler already finished the request with it:
        EOS, a stop token, ``max_tokens``). Returns ``(stop, stop_string)``: ``stop`` when the text
        now holds a stop string (``stop_string`` is it) or the grammar is complete (``None``).

        Raises:
            Exception: the token cannot be taken (e.g. the grammar rejects it): the request fails.
        """


@dataclass
class Request:
    """One generation request.

    ``num_computed_tokens`` counts the tokens of ``all_token_ids`` whose KV is in the cache; the
    scheduler makes it catch up with ``num_tokens`` (vLLM v1's single rule for prefill and decode).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    # how this request uses early exit (resolved once by the engine); default: the full model
    exit_plan: ExitPlan = FULL_MODEL
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first scheduling
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: Optional[object] = None  # the stop string or token id that finished it
    error: Optional[str] = None  # why it failed (then status is FINISHED_ABORTED); only this request
    observer: Optional[TokenObserver] = None  # sees each appended token; may stop the request
    num_draft_tokens: int = 0  # drafts proposed so far
    num_accepted_tokens: int = 0  # drafts the full model confirmed
    num_verify_steps: int = 0  # iterations that verified drafts
    num_spec_rejections: int = 0  # verifications that rejected a draft

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    @property
    def finish_reason(self) -> Optional[str]:
        """``stop``, ``length``, ``abort``, ``error`` (:attr:`error` is set) or ``None`` while unfinished."""
        return "error" if self.error is not None else _FINISH_REASONS.get(self.status)
