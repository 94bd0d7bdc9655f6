"""Request state shared by the scheduler and the engine (pure Python, no torch)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

from cluster.config import SpecParams
from cluster.sampling import SamplingParams


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
    # early-exit threshold override for this request (None: engine default; > 1.0: full model)
    exit_threshold: Optional[float] = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first scheduling
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: Optional[object] = None  # the stop string or token id that finished it
    # lossless early exit (verified / self_speculative); None: lossy exits or the full model
    spec: Optional[SpecParams] = None
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
        """``stop``, ``length``, ``abort`` or ``None`` while unfinished."""
        return _FINISH_REASONS.get(self.status)
