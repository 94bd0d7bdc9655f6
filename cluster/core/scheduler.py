"""Iteration-level scheduler with continuous batching, chunked prefill and preemption (no torch).

After vLLM v1's ``Scheduler`` and nano-vllm's ``Scheduler``. One rule covers prefill and decode:
each iteration a request's ``num_computed_tokens`` catches up with its ``num_tokens`` (prompt +
output), limited by the token budget ``max_num_batched_tokens``. Requests join and leave between
iterations. The engine loop is ``schedule() -> run the model -> update()``.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Optional, Union

from cluster.config import CacheConfig, SchedulerConfig
from cluster.core.block_manager import BlockManager
from cluster.core.draft_control import DraftLengthController
from cluster.core.outputs import ModelRunnerOutput, SampledTokens, ScheduledRequest, SchedulerOutput
from cluster.core.step_message import StepEncoder
from cluster.request import Request, RequestStatus


class Scheduler:
    """Chooses each iteration's batch and applies its results.

    Args:
        scheduler_config: limits ``max_num_seqs``, ``max_num_batched_tokens`` (tokens per iteration)
            and ``max_model_len`` (prompt + output tokens per request).
        cache_config: ``block_size`` and ``enable_prefix_caching`` of the paged KV cache.
        num_blocks: number of physical KV blocks (resolved by the engine).
        spec_max_batch: requests with a lossless mode (``Request.exit_plan``) draft only while at most
            this many requests decode in the iteration; above it they decode at full depth.
        step_diff: encode each iteration as a diff for the ranks (``SchedulerOutput.step``,
            :class:`~cluster.core.step_message.StepEncoder`); False: the ranks get the whole
            output (an in-process rank shares the scheduler's memory: nothing to send).
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 spec_max_batch: int = 8, step_diff: bool = True):
        self.config = scheduler_config
        self.spec_max_batch = spec_max_batch
        self.draft_control = DraftLengthController()
        self.block_manager = BlockManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        # requests whose prompt ids went to the runner (penalties need them once)
        self._prompt_sent: set[str] = set()
        # what the ranks hold: each iteration goes to them as a diff (SchedulerOutput.step); None
        # sends the whole SchedulerOutput instead (bench/step_protocol.py measures both)
        self.encoder: Optional[StepEncoder] = StepEncoder() if step_diff else None

    # ------------------------------------------------------------------ requests in
    def add_request(self, request: Request) -> None:
        """Queue a request (FIFO) for scheduling. The scheduler trusts the engine's checks (the
        processor's against the model, the engine's KV fit) and owns the one registry of unfinished
        requests.

        Raises:
            ValueError: a ``request_id`` already in use by an unfinished request.
        """
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    # ------------------------------------------------------------------ one iteration
    def schedule(self) -> SchedulerOutput:
        """Build the next iteration (does not advance ``num_computed_tokens``; :meth:`update` does).

        Running requests go first, in order, each getting ``min(num_tokens - num_computed_tokens,
        remaining budget)`` tokens. When their blocks do not fit, the last running request is
        preempted (blocks freed, recomputed later from the front of the waiting queue) and the
        allocation is retried. Then, if nothing was preempted, waiting requests are admitted FIFO
        while ``len(running) < max_num_seqs`` and budget remains, skipping prompt tokens found in the
        prefix cache; long prompts are prefilled in chunks over several iterations. A waiting
        request that does not fit stops admission (no preemption for admission).

        Returns:
            A :class:`SchedulerOutput`: decodes first, then prefill chunks; ``num_batched_tokens`` <=
            ``max_num_batched_tokens``; the ids preempted now and finished since the last call; and
            ``step``, the same iteration as a diff against what the ranks hold
            (:class:`~cluster.core.step_message.StepEncoder`), which is what the ranks receive.
        """
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Request, int, int]] = []
        preempted: list[str] = []
        num_decodes = sum(1 for r in self.running if r.num_output_tokens and r.num_tokens - r.num_computed_tokens == 1)
        spec_on = num_decodes <= self.spec_max_batch

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            k = self._num_drafts(req, n, budget, num_decodes) if spec_on else 0
            while bm.allocate_slots(req, n + k) is None:
                if k:  # no room for the drafts' slots: decode without drafts before preempting anyone
                    k = 0
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # it preempted itself: lower-priority requests are already gone
            chosen.append((req, n, k))
            budget -= n + k
            i += 1

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            blocks, num_cached = bm.get_computed_blocks(req) if req.num_computed_tokens == 0 else ([], 0)
            n = min(req.num_tokens - num_cached, budget)
            req.num_computed_tokens = num_cached
            if bm.allocate_slots(req, n, blocks) is None:
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:  # first scheduling (not a resumed preemption)
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chosen.append((req, n, 0))
            budget -= n

        scheduled = [self._make_scheduled(req, n, k) for req, n, k in chosen]
        scheduled.sort(key=lambda s: not s.exit_eligible)  # stable: decodes first
        finished, self._finished_ids = self._finished_ids, []
        so = SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            preempted_req_ids=preempted,
            finished_req_ids=finished,
        )
        if self.encoder is not None:
            so.step = self.encoder.encode(so, self.requests, self.block_manager.get_block_table)
        return so

    def _num_drafts(self, req: Request, n: int, budget: int, batch: int = 1) -> int:
        """Drafts a lossless request makes this iteration: its mode's ``num_draft_tokens``, limited so
        that the verified tokens (drafts + 1) never pass ``max_tokens`` or ``max_model_len`` and the
        drafts' rows fit the token budget, then chosen by the draft control at this iteration's
        decode batch ``batch``; 0 for requests without a lossless mode or not decoding."""
        spec = req.exit_plan
        if not spec.is_lossless or n != 1 or req.num_computed_tokens < req.num_prompt_tokens or not req.num_output_tokens:
            return 0
        room = min(req.sampling_params.max_tokens - req.num_output_tokens, self.config.max_model_len - req.num_tokens)
        return self.draft_control.num_drafts(req, max(0, min(spec.num_draft_tokens, room - 1, budget - n)), batch)

    def _make_scheduled(self, req: Request, n: int, k: int = 0) -> ScheduledRequest:
        start = req.num_computed_tokens
        sample = start + n == req.num_tokens
        prompt = None
        if req.sampling_params.uses_penalties and req.request_id not in self._prompt_sent:
            self._prompt_sent.add(req.request_id)
            prompt = list(req.prompt_token_ids)
        p = req.num_prompt_tokens  # slices, not all_token_ids: that copies the whole sequence
        token_ids = req.output_token_ids[start - p:start - p + n] if start >= p else req.all_token_ids[start:start + n]
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=token_ids,
            start_position=start,
            block_table=list(self.block_manager.get_block_table(req.request_id)),
            sample=sample,
            # a 1-token chunk past the prompt that is not the last token is recompute: full depth
            exit_eligible=n == 1 and start >= req.num_prompt_tokens and sample,
            sampling_params=req.sampling_params,
            exit_threshold=req.exit_plan.threshold,
            # a lossless request never takes a lossy exit: without drafts it decodes at full depth
            full_depth=req.exit_plan.is_full_model or (req.exit_plan.is_lossless and not k),
            num_output_tokens=req.num_output_tokens,
            eos_token_ids=tuple(req.eos_token_ids),
            prompt_token_ids=prompt,
            spec=req.exit_plan if k else None,
            num_draft_tokens=k,
        )

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ results in
    def update(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[Request]:
        """Apply one iteration's results.

        This is the one place where a request's stopping is decided. Advances
        ``num_computed_tokens`` of each scheduled request still running, registers newly full prompt
        blocks in the prefix cache, appends sampled tokens (and exit layers; 0 when the runner
        reported none) and, token by token, checks the stop conditions in order: EOS (unless
        ``ignore_eos``), ``stop_token_ids`` (``stop_reason`` = the token), both only once
        ``num_output_tokens >= min_tokens``, then ``max_tokens``, ``max_model_len``; then the
        request's :class:`~cluster.request.TokenObserver` (a stop string in the text:
        ``stop_reason`` = the string; a completed grammar). Tokens after a stop are dropped. A
        request in ``runner_output.failed``, or whose observer raised, finishes with ``error`` set.
        Finished requests free their blocks and leave the scheduler.

        Returns:
            The requests that received a new token or failed this iteration, finished or not.
        """
        out: list[Request] = []
        any_finished = False
        for sr in scheduler_output.scheduled:
            req = self.requests.get(sr.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted (or finished) between schedule() and update()
            rid = req.request_id
            if rid in runner_output.failed:  # sampling this request's row failed: it alone ends
                req.error = runner_output.failed[rid]
                self._finish(req, RequestStatus.FINISHED_ABORTED)
                any_finished = True
                out.append(req)
                continue
            new = runner_output.tokens.get(rid) if sr.sample else None
            if new is not None and sr.num_draft_tokens:  # drafts verified: rows up to the last accepted one are complete
                self._update_spec(req, sr, new)
            else:
                req.num_computed_tokens += len(sr.token_ids)
            self.block_manager.cache_full_blocks(req)
            if new is None:
                continue
            for token, layer in zip(new.token_ids, new.exit_layers or [0] * len(new.token_ids)):
                req.output_token_ids.append(int(token))
                req.exit_layers.append(int(layer))
                status = self._check_stop(req, int(token))
                if req.observer is not None:
                    status = self._observe(req, int(token), status)
                if status is not None:  # tokens after a stop are dropped
                    self._finish(req, status)
                    any_finished = True
                    break
            out.append(req)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return out

    def _update_spec(self, req: Request, sr: ScheduledRequest, new: SampledTokens) -> None:
        """Bookkeeping of a verification: the rows of the last sampled token and of the accepted drafts
        have their KV complete at every layer (``len(tokens)`` rows: accepted drafts + 1); the slots
        of rejected drafts stay reserved in the block table and are overwritten by later tokens."""
        accepted, drafts = len(new.token_ids) - 1, new.num_drafts
        req.num_computed_tokens += len(new.token_ids)
        req.num_draft_tokens += drafts
        req.num_accepted_tokens += accepted
        req.num_verify_steps += 1
        req.num_spec_rejections += accepted < drafts
        self.draft_control.observe(sr.spec, drafts, accepted)

    def _check_stop(self, req: Request, token: int) -> Optional[RequestStatus]:
        params = req.sampling_params
        # no EOS / stop-token stop below min_tokens (as vLLM's stop checker; the sampler masks them too)
        stops_allowed = req.num_output_tokens >= params.min_tokens
        if stops_allowed and token in req.eos_token_ids and not params.ignore_eos:
            req.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if stops_allowed and token in params.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _observe(req: Request, token: int, status: Optional[RequestStatus]) -> Optional[RequestStatus]:
        """The request's observer takes ``token``; its stop (a stop string, a finished grammar) or its
        failure decides when the token checks did not."""
        try:
            stop, stop_string = req.observer.observe(token, final=status is not None)
        except Exception as e:  # noqa: BLE001 - one request's failure finishes only that request
            req.error = f"{type(e).__name__}: {e}"
            return RequestStatus.FINISHED_ABORTED
        if status is None and stop:
            req.stop_reason = stop_string
            return RequestStatus.FINISHED_STOPPED
        if stop_string is not None:  # the text's stop string came with the final token
            req.stop_reason = stop_string
        return status

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Mark finished, free blocks, forget the request (caller removes it from running/waiting)."""
        req.status = status
        self.block_manager.free(req)
        self.requests.pop(req.request_id, None)
        self._prompt_sent.discard(req.request_id)
        self._finished_ids.append(req.request_id)

    def finish_requests(self, request_ids: Union[str, Iterable[str]], status: RequestStatus,
                        error: Optional[str] = None) -> list[Request]:
        """Finish running or waiting requests from outside the iteration's results: an abort
        (``FINISHED_ABORTED``; with ``error``: the request failed). Frees their blocks; unknown or
        already finished ids are ignored. Returns the requests finished now.

        Raises:
            ValueError: ``status`` is not a finished status.
        """
        if not RequestStatus.is_finished(status):
            raise ValueError(f"status must be a finished status, got {status!r}")
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        gone: list[Request] = []
        for rid in ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status != RequestStatus.RUNNING:
                self.waiting.remove(req)
            req.error = error
            gone.append(req)
            self._finish(req, status)
        if gone:
            self.running = [r for r in self.running if not r.is_finished]
        return gone

    # ------------------------------------------------------------------ state
    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_request(self, request_id: str) -> Optional[Request]:
        """The unfinished request with this id, or ``None`` (finished requests are forgotten)."""
        return self.requests.get(request_id)

    @property
    def stats(self) -> dict:
        """Counters for metrics: queue lengths, KV usage (0..1), free blocks, prefix cache blocks
        hit / queried, preemptions since start, and the routed load: ``running_tokens`` (prompt +
        output tokens of requests that have output) and ``waiting_tokens`` (prompt tokens of those
        still waiting for their first token)."""
        bm = self.block_manager
        started = [r.num_tokens for r in self.requests.values() if r.output_token_ids]
        return {
            "running_tokens": sum(started),
            "waiting_tokens": sum(r.num_prompt_tokens for r in self.requests.values() if not r.output_token_ids),
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_usage": bm.usage,
            "num_free_blocks": bm.num_free_blocks,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "num_preemptions": self.num_preemptions,
        }
