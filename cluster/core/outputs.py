"""Typed messages between the scheduler (driver) and the model runner (every tensor-parallel rank).

Pure Python so they pickle cheaply to Ray actors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from cluster.request import ExitPlan
from cluster.sampling import SamplingParams

if TYPE_CHECKING:
    import numpy

    from cluster.core.step_message import StepMessage


@dataclass
class ScheduledRequest:
    """One request's share of an iteration."""

    request_id: str
    # token ids whose KV is computed this iteration: all_token_ids[start_position:start_position+len]
    token_ids: list[int]
    # position of token_ids[0] in the sequence (= num_computed_tokens before this iteration)
    start_position: int
    # physical KV block ids covering positions [0, start_position + len(token_ids)), in order
    block_table: list[int]
    # True when this chunk reaches the end of the request's tokens, so one new token is sampled
    sample: bool
    # True for a decode step (one token, past the prompt, sampled): a decode row, which may exit
    # early unless ``full_depth``. Prefill chunks (including recompute after preemption) always run
    # at full depth.
    exit_eligible: bool
    sampling_params: SamplingParams
    # the request's exit threshold in [0, 1] (None: the exit config's, per exit layer if calibrated)
    exit_threshold: Optional[float] = None
    # the row runs every layer with no exit test: the full model, or a lossless request that makes
    # no drafts this iteration
    full_depth: bool = False
    # output tokens generated before this iteration (the sampler masks stops below min_tokens)
    num_output_tokens: int = 0
    # the request's EOS ids (masked with stop_token_ids while num_output_tokens < min_tokens)
    eos_token_ids: tuple[int, ...] = ()
    # the prompt, sent only at the request's first scheduling and only if its sampling params
    # use penalties: the driver's runner keeps it (repetition penalty) until the request finishes
    prompt_token_ids: Optional[list[int]] = None
    # guided decoding (filled by the ENGINE each step for guided requests with sample=True):
    # int32 [ceil(V / 32)], bit j of word i set <=> token 32*i+j allowed (xgrammar's layout)
    guided_bitmask: Optional["numpy.ndarray"] = None
    # lossless early exit: the request's mode, and how many drafts to make this iteration (0: none;
    # the block table then also covers the drafts' positions start_position+1 .. +num_draft_tokens)
    spec: Optional[ExitPlan] = None
    num_draft_tokens: int = 0


@dataclass
class SchedulerOutput:
    """What the next iteration computes. Decode requests come first, then prefill chunks."""

    # requests of this iteration, decodes (exit_eligible) first, then prefill chunks
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # total tokens of this iteration (<= max_num_batched_tokens)
    num_batched_tokens: int = 0
    # requests preempted (blocks freed, recompute later) while building this iteration
    preempted_req_ids: list[str] = field(default_factory=list)
    # requests finished or aborted since the previous schedule(): workers drop their per-request state
    finished_req_ids: list[str] = field(default_factory=list)
    # the same iteration as a diff for the ranks (cluster.core.step_message), set by the Scheduler;
    # None: a hand-built output, which the runner takes as it is
    step: Optional["StepMessage"] = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SampledTokens:
    """One request's new tokens of an iteration: the one sampled token, or a lossless mode's verified
    tokens (its accepted drafts, then the full model's own token)."""

    token_ids: list[int]
    # per token: the exit layer (1-based count of decoder layers run; num_layers for the full model)
    exit_layers: list[int]
    # lossless modes: drafts proposed this iteration (0 otherwise)
    num_drafts: int = 0
    # requests with sampling_params.logprobs = k: (the sampled token's logprob, [(token id, logprob)] k
    # most likely first), the log-softmax of the raw logits at the exit layer
    logprob: Optional[tuple[float, list[tuple[int, float]]]] = None


@dataclass
class ModelRunnerOutput:
    """Rank 0's result of one iteration: new tokens for every request with ``sample=True``, except
    the requests in ``failed``."""

    # request_id -> its new tokens
    tokens: dict[str, SampledTokens] = field(default_factory=dict)
    # request_id -> error message: sampling failed for this request alone; it got no token (the
    # scheduler finishes it with an error)
    failed: dict[str, str] = field(default_factory=dict)
