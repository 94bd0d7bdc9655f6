"""A rank's persistent per-request state, kept between iterations and updated by each
:class:`~cluster.core.step_message.StepMessage` (vLLM v1's ``InputBatch``,
``vllm/v1/worker/gpu_input_batch.py``, on the host: the device tensors are still packed per
iteration by :class:`~cluster.worker.input_batch.InputPacker`).

:meth:`PersistentBatch.apply` turns a message into the iteration's
:class:`~cluster.core.outputs.SchedulerOutput` as the model runner reads it, each
:class:`~cluster.core.outputs.ScheduledRequest` derived from the rank's state with the scheduler's
rules (``cluster/core/scheduler.py`` ``_make_scheduled``): ``sample`` when the chunk reaches the last
token, ``exit_eligible`` for a sampled one-token chunk past the prompt, ``full_depth`` for the full
model or a lossless request without drafts this iteration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cluster.core.outputs import ScheduledRequest, SchedulerOutput
from cluster.core.step_message import NewRequestData, StepMessage, sampling_from_plain, state_checksum
from cluster.request import ExitPlan
from cluster.sampling import SamplingParams


@dataclass
class RequestState:
    """What a rank holds of one request: every token id the scheduler accepted (prompt first), its
    KV block table (empty while preempted), what it was sent once, and flags derived from those."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    block_table: list[int]
    sampling_params: SamplingParams
    exit_plan: ExitPlan
    eos_token_ids: tuple[int, ...]
    num_prompt_tokens: int = 0
    # the prompt as the runner's penalty history wants it (None: no penalties)
    penalty_prompt: Optional[list[int]] = None
    full_model: bool = False
    lossless: bool = False

    @classmethod
    def new(cls, nr: NewRequestData) -> "RequestState":
        sp, plan = sampling_from_plain(nr.sampling), nr.exit_plan
        return cls(nr.request_id, nr.prompt_token_ids, list(nr.prompt_token_ids), [], sp, plan, nr.eos_token_ids,
                   len(nr.prompt_token_ids), nr.prompt_token_ids if sp.uses_penalties else None,
                   plan.is_full_model, plan.is_lossless)


class PersistentBatch:
    """The requests a rank knows, by handle; dropped when the scheduler reports them finished."""

    def __init__(self):
        self.requests: dict[int, RequestState] = {}

    def apply(self, msg: StepMessage) -> SchedulerOutput:
        """Update the state with ``msg`` (finished, then preempted, new, scheduled) and return the
        iteration as the model runner reads it (``finished_req_ids`` / ``preempted_req_ids`` by id).

        Raises:
            RuntimeError: the message names a handle this rank does not hold, or its checksum
                differs from this rank's state (the rank diverged from the scheduler).
        """
        reqs = self.requests
        finished = [reqs.pop(h).request_id for h in msg.finished if h in reqs]
        preempted = []
        for h in msg.preempted:
            st = reqs.get(h)
            if st is not None:
                st.block_table = []  # a new list: an earlier iteration's view keeps its own
                preempted.append(st.request_id)
        for nr in msg.new_reqs:
            reqs[nr.handle] = RequestState.new(nr)
        resumed, new_blocks, drafts, masks = msg.resumed, msg.new_block_ids, msg.num_draft_tokens, msg.guided_bitmasks
        scheduled = []
        for i, (h, start, n, new) in enumerate(zip(msg.handles, msg.num_computed_tokens, msg.num_scheduled_tokens,
                                                   msg.new_token_ids)):
            st = reqs.get(h)
            if st is None:
                raise RuntimeError(f"step message names request handle {h}, which this rank does not hold")
            if resumed and h in resumed:
                st.block_table = []
            tokens = st.token_ids
            if new:
                tokens += new
            if new_blocks:
                blocks = new_blocks.get(h)
                if blocks:
                    st.block_table += blocks
            k = drafts.get(h, 0) if drafts else 0
            num_prompt, plan = st.num_prompt_tokens, st.exit_plan
            sample = start + n == len(tokens)
            # the scheduler's rules (cluster/core/scheduler.py, _make_scheduled), positional for speed
            scheduled.append(ScheduledRequest(
                st.request_id, tokens[start:start + n], start, st.block_table, sample,
                n == 1 and start >= num_prompt and sample,  # exit_eligible
                st.sampling_params, plan.threshold,
                st.full_model or (st.lossless and not k),  # full_depth
                len(tokens) - num_prompt, st.eos_token_ids,
                st.penalty_prompt,  # the runner starts the history the first time (idempotent)
                masks.get(i) if masks else None, plan if k else None, k))
        if msg.checksum is not None:
            mine = state_checksum((h, reqs[h].token_ids, reqs[h].block_table) for h in msg.handles)
            if mine != msg.checksum:
                raise RuntimeError("this rank's request state diverged from the scheduler's (step checksum)")
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=sum(msg.num_scheduled_tokens),
                               preempted_req_ids=preempted, finished_req_ids=finished)

    def get(self, request_id: str) -> Optional[RequestState]:
        """The state of the request with this id (tests, debugging; a linear scan)."""
        return next((st for st in self.requests.values() if st.request_id == request_id), None)
