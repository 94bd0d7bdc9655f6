"""The per-iteration message from the scheduler to every tensor-parallel rank, as a diff (no torch).

After vLLM v1's ``NewRequestData`` / ``CachedRequestData`` (``vllm/v1/core/sched/output.py``): a
rank keeps each request's tokens, block table, sampling params and exit plan between iterations
(:class:`cluster.worker.persistent_batch.PersistentBatch`), so an iteration sends

* once per request (:class:`NewRequestData`): its prompt ids, sampling params (plain values, not the
  pydantic model), exit plan and EOS ids, under a small integer handle used from then on;
* per scheduled request: the tokens appended since the rank last heard of it (the tokens the
  scheduler accepted: a decode's last sampled token, a verification's accepted drafts; every rank
  gets them because only rank 0 samples), the blocks appended to its table, its
  ``num_computed_tokens`` (a verification's rollback is decided by rank 0, so the scheduler says
  where the request stands), its scheduled token count and draft count;
* the handles preempted (their table is dropped; on resume the whole new table comes again) and
  finished (the rank forgets them).

:class:`StepEncoder` (the scheduler's) remembers what the ranks were told. Its optional checksum
(``checksum=True`` or ``EESERVE_STEP_CHECKSUM=1``) lets a rank verify, every iteration, that its
tokens and block tables are the scheduler's (a debug check; it costs a hash over every scheduled
request's tokens and table).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from cluster.request import ExitPlan, Request
from cluster.sampling import SamplingParams

if TYPE_CHECKING:
    from cluster.core.outputs import SchedulerOutput


@dataclass(slots=True)
class NewRequestData:
    """A request the ranks have not seen: sent once, at its first scheduling."""

    handle: int
    request_id: str
    prompt_token_ids: list[int]
    # SamplingParams fields that differ from their defaults, as plain values (sampling_from_plain)
    sampling: dict[str, Any]
    exit_plan: ExitPlan
    eos_token_ids: tuple[int, ...]


@dataclass(slots=True)
class StepMessage:
    """One iteration for a rank. Lists indexed like ``handles`` (the batch order of
    ``SchedulerOutput.scheduled``); dicts are sparse, keyed by handle unless noted."""

    new_reqs: list[NewRequestData] = field(default_factory=list)
    handles: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)
    new_block_ids: dict[int, list[int]] = field(default_factory=dict)
    num_draft_tokens: dict[int, int] = field(default_factory=dict)
    # scheduled again after a preemption: new_block_ids holds the whole new table
    resumed: list[int] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    # batch index -> guided decoding bitmask (int32 [ceil(V / 32)]), filled just before sending
    guided_bitmasks: dict[int, Any] = field(default_factory=dict)
    # debug: state_checksum() of the scheduled requests as the scheduler sees them
    checksum: Optional[int] = None


def sampling_to_plain(sp: SamplingParams) -> dict[str, Any]:
    """The fields of ``sp`` that differ from the defaults, as plain Python values."""
    return sp.model_dump(exclude_defaults=True)


def sampling_from_plain(d: dict[str, Any]) -> SamplingParams:
    """The :class:`SamplingParams` of :func:`sampling_to_plain`'s dict (validated again, once per request)."""
    return SamplingParams.model_validate(d)


def state_checksum(rows) -> int:
    """Hash of ``(handle, token ids, block table)`` rows (ints only: equal in every process)."""
    return hash(tuple((h, tuple(tokens), tuple(table)) for h, tokens, table in rows))


class StepEncoder:
    """Turns the scheduler's iteration into a :class:`StepMessage`, remembering per request what the
    ranks hold: ``[handle, tokens sent, blocks sent, preempted since]``.

    Args:
        checksum: attach :func:`state_checksum` of the scheduled requests to every message; None:
            on when the environment variable ``EESERVE_STEP_CHECKSUM`` is ``1``.
    """

    def __init__(self, checksum: Optional[bool] = None):
        self.checksum = os.environ.get("EESERVE_STEP_CHECKSUM") == "1" if checksum is None else checksum
        self._next_handle = 0
        self._sent: dict[str, list] = {}

    def encode(self, so: "SchedulerOutput", requests: dict[str, Request],
               table_of: Callable[[str], list[int]]) -> StepMessage:
        """The diff of ``so`` against what the ranks hold (then recorded as held). ``requests``: the
        scheduler's unfinished requests (every scheduled one among them); ``table_of``: a request's
        live block table. Finished ids are applied first, so an id reused after finishing is new."""
        msg = StepMessage()
        sent = self._sent
        for rid in so.finished_req_ids:
            st = sent.pop(rid, None)
            if st is not None:
                msg.finished.append(st[0])
        for rid in so.preempted_req_ids:
            st = sent.get(rid)
            if st is not None:
                st[2], st[3] = 0, True
                msg.preempted.append(st[0])
        rows = []
        for sr in so.scheduled:
            rid = sr.request_id
            req = requests[rid]
            st = sent.get(rid)
            if st is None:
                st = sent[rid] = [self._next_handle, req.num_prompt_tokens, 0, False]
                self._next_handle += 1
                msg.new_reqs.append(NewRequestData(st[0], rid, req.prompt_token_ids,
                                                   sampling_to_plain(req.sampling_params), req.exit_plan,
                                                   tuple(req.eos_token_ids)))
            h = st[0]
            if st[3]:
                msg.resumed.append(h)
                st[3] = False
            msg.handles.append(h)
            msg.num_computed_tokens.append(sr.start_position)
            msg.num_scheduled_tokens.append(len(sr.token_ids))
            msg.new_token_ids.append(req.output_token_ids[st[1] - req.num_prompt_tokens:])
            st[1] = req.num_tokens
            table = table_of(rid)
            if len(table) > st[2]:
                msg.new_block_ids[h] = table[st[2]:]
                st[2] = len(table)
            if sr.num_draft_tokens:
                msg.num_draft_tokens[h] = sr.num_draft_tokens
            if self.checksum:
                rows.append((h, req.all_token_ids, table))
        if self.checksum:
            msg.checksum = state_checksum(rows)
        return msg
