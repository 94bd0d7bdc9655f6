"""One accumulator of engine deltas, used by the offline :class:`cluster.llm.LLM` and (as the base of
each HTTP choice, ``deployments.outputs.ChoiceState``) by the ingress."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cluster.engine.protocol import RequestOutput, TokenLogprob


@dataclass
class CompletionOutput:
    """A request's output so far, accumulated from its :class:`RequestOutput` deltas (what offline
    :class:`cluster.llm.LLM` returns once ``finished``).

    ``exit_layers[i]`` is the number of decoder layers run for ``token_ids[i]``; the draft counters
    are totals of the lossless modes (drafts proposed, accepted, verification iterations); times are
    the engine's ``time.monotonic()`` seconds; ``exit_mode`` is the mode the request ran (None: the
    full model) and ``replica`` the Serve replica that ran it (empty offline).
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    logprobs: Optional[list[TokenLogprob]] = None
    finished: bool = False
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    error: Optional[str] = None
    num_prompt_tokens: int = 0
    num_layers: int = 0
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_draft_tokens: int = 0  # lossless modes: drafts proposed
    num_accepted_tokens: int = 0  # drafts the full model confirmed
    num_verify_steps: int = 0  # iterations that verified drafts
    exit_mode: Optional[str] = None
    replica: str = ""

    def __post_init__(self):
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.prompt_token_ids)

    @property
    def acceptance_rate(self) -> Optional[float]:
        """Accepted / proposed drafts (None without drafts)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def tokens_per_verify(self) -> Optional[float]:
        """Verified tokens per verification iteration (accepted drafts + the full model's token)."""
        if not self.num_verify_steps:
            return None
        return (self.num_accepted_tokens + self.num_verify_steps) / self.num_verify_steps

    @property
    def spec_totals(self) -> tuple[int, int, int]:
        """(drafts proposed, drafts accepted, verification iterations) so far."""
        return self.num_draft_tokens, self.num_accepted_tokens, self.num_verify_steps

    def add(self, delta: RequestOutput) -> "CompletionOutput":
        """Append one delta (returns self). Counters and times are the delta's running totals; a
        replica and an exit mode, once known, are kept."""
        self.text += delta.new_text
        self.token_ids += delta.new_token_ids
        self.exit_layers += delta.new_exit_layers
        if delta.new_logprobs:
            self.logprobs = (self.logprobs or []) + delta.new_logprobs
        self.finished, self.finish_reason = delta.finished, delta.finish_reason
        self.stop_reason, self.error = delta.stop_reason, delta.error
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_layers = delta.num_layers or self.num_layers
        self.num_cached_tokens = delta.num_cached_tokens
        self.arrival_time, self.first_token_time = delta.arrival_time, delta.first_token_time
        self.finished_time = delta.finished_time
        self.num_draft_tokens = max(self.num_draft_tokens, delta.num_draft_tokens)
        self.num_accepted_tokens = max(self.num_accepted_tokens, delta.num_accepted_tokens)
        self.num_verify_steps = max(self.num_verify_steps, delta.num_verify_steps)
        self.exit_mode = delta.exit_mode or self.exit_mode
        self.replica = delta.replica or self.replica
        return self
