"""The engine step loop: schedule -> run on all ranks -> update -> detokenize (nano-vllm shape)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from cluster.config import CacheConfig, ExitConfig, ModelConfig, ParallelConfig, SchedulerConfig
from cluster.core.scheduler import Scheduler
from cluster.request import Request, RequestStatus
from cluster.sampling import SamplingParams


@dataclass
class GenerationOutput:
    """State of one request after a step (the final one when ``finished``).

    ``exit_layers[i]`` is the number of decoder layers run for ``token_ids[i]`` (num_layers = full).
    Times are ``time.monotonic()`` seconds.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    exit_layers: list[int]
    finished: bool
    finish_reason: Optional[str]
    num_layers: int
    num_cached_tokens: int = 0
    new_token_ids: list[int] = field(default_factory=list)  # tokens added by this step
    new_text: str = ""  # text added by this step
    arrival_time: float = 0.0
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class _Tracked:
    request: Request
    text: str = ""
    num_emitted: int = 0
    first_token_time: Optional[float] = None


class LLMEngine:
    """Synchronous early-exit engine over one tensor-parallel worker group.

    Args:
        model_dir: safetensors model directory (see :func:`cluster.model.loader.resolve_model_dir`).
        exit_config: None runs the full model.
        worker_kwargs: passed to :class:`~cluster.worker.worker_group.WorkerGroup` (placement group).
    """

    def __init__(self, model_dir: str, tokenizer, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, parallel_config: ParallelConfig,
                 exit_config: Optional[ExitConfig], **worker_kwargs):
        from cluster.worker.worker_group import WorkerGroup

        if exit_config is not None:
            exit_config.validate_for(model_config.num_layers)
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.exit_config = exit_config
        self.num_blocks = cache_config.resolve_num_blocks(model_config, parallel_config.tensor_parallel_size)
        self.scheduler = Scheduler(scheduler_config, cache_config, self.num_blocks)
        self.workers = WorkerGroup(model_dir, model_config, parallel_config, exit_config, self.num_blocks,
                                   cache_config.block_size, **worker_kwargs)
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self.eos_token_ids = tuple(model_config.eos_token_ids) or (
            (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())

    # ----------------------------------------------------------------------------------- requests
    def tokenize(self, prompt: Union[str, list[int]]) -> list[int]:
        """Token ids of a prompt (a string is encoded with the tokenizer; ids pass through).

        Raises:
            ValueError: the prompt is empty or holds ids outside the vocabulary.
        """
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        if min(ids) < 0 or max(ids) >= self.model_config.vocab_size:
            raise ValueError(f"prompt: token ids must lie in [0, {self.model_config.vocab_size})")
        return ids

    def add_request(self, prompt: Union[str, list[int]], params: SamplingParams,
                    request_id: Optional[str] = None, exit_threshold: Optional[float] = None) -> str:
        """Queue a request; returns its id.

        Args:
            exit_threshold: per-request confidence threshold; ``> 1.0`` (e.g. ``float('inf')``) runs
                the full model; None uses the engine's exit config.

        Raises:
            ValueError: empty prompt, prompt not shorter than ``max_model_len``, duplicate id.
        """
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._tracked:
            raise ValueError(f"request_id: {rid!r} is already in use")
        req = Request(rid, self.tokenize(prompt), params, eos_token_ids=self.eos_token_ids,
                      exit_threshold=exit_threshold)
        self.scheduler.add_request(req)
        self._tracked[rid] = _Tracked(req)
        return rid

    def abort_request(self, request_ids) -> None:
        """Abort queued or running requests (unknown ids are ignored); frees their KV blocks."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for rid in ids:
            self._tracked.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ----------------------------------------------------------------------------------- the loop
    def step(self) -> list[GenerationOutput]:
        """Run one iteration; returns an output for every request that got a token."""
        so = self.scheduler.schedule()
        if so.is_empty and not so.finished_req_ids:
            return []
        runner_out = self.workers.execute_model(so)
        if so.is_empty:
            return []
        updated = self.scheduler.update(so, runner_out)
        now = time.monotonic()
        return [self._process(req, now) for req in updated if req.request_id in self._tracked]

    def _process(self, req: Request, now: float) -> GenerationOutput:
        t = self._tracked[req.request_id]
        if t.first_token_time is None:
            t.first_token_time = now
        text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        stop = req.sampling_params.stop
        if stop and not req.is_finished:
            hits = [(text.find(s, max(0, len(t.text) - len(s))), s) for s in stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                text = text[:i]
                req.stop_reason = s
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
        new_text = text[len(t.text):] if text.startswith(t.text) else text
        new_ids = req.output_token_ids[t.num_emitted:]
        t.text, t.num_emitted = text, len(req.output_token_ids)
        if req.is_finished:
            self._tracked.pop(req.request_id, None)
        return GenerationOutput(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, text=text,
            token_ids=list(req.output_token_ids), exit_layers=list(req.exit_layers),
            finished=req.is_finished, finish_reason=req.finish_reason,
            num_layers=self.model_config.num_layers, num_cached_tokens=req.num_cached_tokens,
            new_token_ids=new_ids, new_text=new_text, arrival_time=req.arrival_time,
            first_token_time=t.first_token_time, finished_time=now if req.is_finished else None)

    def check_integrity(self) -> None:
        """Raises AssertionError on leaked or double-owned KV blocks."""
        self.scheduler.block_manager.check_integrity()

    def shutdown(self) -> None:
        self.workers.shutdown()
