"""The engine step loop: schedule -> run on all ranks -> update -> one delta per request (nano-vllm shape).

Its boundary is typed: :class:`~cluster.engine.protocol.EngineRequest` in (built and checked against
the model by :class:`cluster.frontend.processor.Processor`), :class:`RequestOutput` deltas out. The
engine makes the checks that need its own state, once, as it queues a request: the KV cache fit
(:meth:`LLMEngine.fit_kv_cache`) and the request's :class:`~cluster.request.ExitPlan`
(:meth:`LLMEngine.resolve_exit_plan`); it hangs a :class:`~cluster.engine.token_stream.TokenStream`
(detokenizer, grammar) on each request, which the scheduler consults when it decides stops.

Fault isolation: a failure while handling one request (detokenizing, grammar matching, sampling its
row) finishes only that request, with ``finish_reason="error"``; a failure of the scheduler or of
the model step itself propagates (the engine is then dead).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from cluster.config import CacheConfig, ExitConfig, ModelConfig, ParallelConfig, SchedulerConfig
from cluster.core.scheduler import Scheduler
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.token_stream import TokenStream
from cluster.engine.protocol import EngineRequest, InvalidRequestError, RequestOutput, TokenLogprob, lower_max_tokens
from cluster.request import FULL_MODEL, LOSSLESS_MODES, ExitPlan, Request, RequestStatus, default_skip_layers

logger = logging.getLogger(__name__)


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
        from cluster.worker.memory import sizes_from_device_memory
        from cluster.worker.worker_group import WorkerGroup

        if exit_config is not None:
            exit_config.validate_for(model_config.num_layers)
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.exit_config = exit_config
        self.block_size = cache_config.block_size
        if cache_config.num_blocks is None and sizes_from_device_memory(parallel_config.device):
            # CUDA: the ranks load their weights, measure an iteration's peak and report what is left
            self.workers = WorkerGroup(model_dir, model_config, parallel_config, exit_config, None,
                                       cache_config.block_size, **worker_kwargs)
            try:
                report = self.workers.determine_num_blocks(
                    cache_config.gpu_memory_utilization, scheduler_config.max_num_batched_tokens,
                    scheduler_config.max_num_seqs, model_config.max_model_len)
                self.workers.initialize_cache(report.num_blocks)
            except BaseException:
                self.workers.shutdown()
                raise
            self.num_blocks = report.num_blocks
        else:  # CPU (or a given num_blocks): a fixed budget, decided before the workers start
            self.num_blocks = cache_config.resolve_num_blocks(model_config, parallel_config.tensor_parallel_size)
            self.workers = WorkerGroup(model_dir, model_config, parallel_config, exit_config, self.num_blocks,
                                       cache_config.block_size, **worker_kwargs)
            report = self.workers.memory_report()
        self.memory_report = report
        # remote ranks get each iteration as a diff against the requests they hold (cluster.core.step_message);
        # an in-process rank reads the scheduler's output as it is (bench/step_protocol.py: the diff's
        # encode + apply cost more than nothing; EESERVE_STEP_DIFF=1 uses the diff in process too)
        self.scheduler = Scheduler(scheduler_config, cache_config, self.num_blocks,
                                   spec_max_batch=exit_config.spec_max_batch if exit_config is not None else 1,
                                   step_diff=self.workers.local is None or os.environ.get("EESERVE_STEP_DIFF") == "1")
        gib = 1 << 30
        logger.info("engine on %s (%s, tensor_parallel_size=%d): weights %.3f GiB, KV cache %.3f GiB = %d blocks "
                    "x %d tokens per rank%s", parallel_config.device, model_config.dtype,
                    parallel_config.tensor_parallel_size, report.weights_bytes / gib, report.kv_cache_bytes / gib,
                    report.num_blocks, cache_config.block_size,
                    f" (gpu_memory_utilization {report.gpu_memory_utilization}, activation peak "
                    f"{report.activation_peak_bytes / gib:.3f} GiB, device total {report.total_bytes / gib:.2f} GiB)"
                    if report.total_bytes else "")
        self._guided_factory = None
        self._draft_rows: Optional[int] = None  # rows of the drafts' LM head (FR-Spec), read once
        self.eos_token_ids = model_config.stop_ids_with(tokenizer)

    # ----------------------------------------------------------------------------------- requests
    @property
    def kv_capacity_tokens(self) -> int:
        """KV slots of the whole cache (``num_blocks * block_size``)."""
        return self.num_blocks * self.block_size

    def guided_factory(self):
        """The guided-decoding grammar compiler of this engine's tokenizer (built at first use)."""
        if self._guided_factory is None:
            from cluster.engine.guided import GuidedDecoderFactory

            self._guided_factory = GuidedDecoderFactory(self.tokenizer, self.model_config.vocab_size,
                                                        stop_token_ids=list(self.eos_token_ids))
        return self._guided_factory

    def room_for(self, num_prompt_tokens: int) -> int:
        """Output tokens that the whole KV cache holds beside this prompt (the last sampled token's
        KV is never computed, hence the +1); the context window is the processor's check."""
        return self.kv_capacity_tokens + 1 - num_prompt_tokens

    def validate(self, req: EngineRequest) -> EngineRequest:
        """The engine's checks of a request, without queueing it (:meth:`add_request` makes them
        once as it queues): the KV cache fit (:meth:`fit_kv_cache`) and the exit plan
        (:meth:`resolve_exit_plan`). Returns the request as :meth:`fit_kv_cache` does.

        Raises:
            InvalidRequestError: see those two.
        """
        req = self.fit_kv_cache(req)
        self.resolve_exit_plan(req)
        return req

    def fit_kv_cache(self, req: EngineRequest) -> EngineRequest:
        """The one KV cache fit check of a request built by :class:`cluster.frontend.processor.Processor`
        (which did every check that needs only the model: ids, context window, sampling).

        Returns the request, with ``max_tokens`` lowered to what the KV cache holds when
        ``req.max_tokens_is_default``.

        Raises:
            InvalidRequestError: a prompt that does not fit in the KV cache (``prompt``) or a
                sequence that could not fit in it (``max_tokens``), both ``context_length_exceeded``;
                ``min_tokens`` above a lowered default ``max_tokens``.
        """
        n, sp = len(req.prompt_token_ids), req.sampling_params
        room = self.room_for(n)
        if room < 1:
            raise InvalidRequestError("prompt", f"prompt: {n} tokens do not fit in the KV cache "
                                      f"({self.kv_capacity_tokens} slots)", code="context_length_exceeded")
        if sp.max_tokens > room:
            if not req.max_tokens_is_default:
                raise InvalidRequestError("max_tokens", f"max_tokens: {n} prompt tokens + {sp.max_tokens} need "
                                          f"{n + sp.max_tokens - 1} KV slots but the KV cache holds "
                                          f"{self.kv_capacity_tokens}; lower max_tokens or the prompt length",
                                          code="context_length_exceeded")
            req = req.model_copy(update={"sampling_params": lower_max_tokens(sp, room)})
        return req

    # fixed cost of one extra forward pass (metadata, embedding, syncs), as a fraction of a decode step;
    # bench/speed.py measured the fixed step cost at about 0.15 of an int4 batch-1 step on our CPUs
    DRAFT_PASS_OVERHEAD = 0.1

    def draft_cost(self, draft_layer: Optional[int], skip_layers: tuple[int, ...] = ()) -> float:
        """A draft's cost as a fraction of a full decode step (memory-bound decode: weight bytes read):
        the layers the draft runs (``1..draft_layer``; with ``skip_layers``, ``layer_skip``: every
        layer but those) plus the draft's LM head (the FR-Spec reduced head if the exit heads have
        one), over all layers plus the LM head, plus :attr:`DRAFT_PASS_OVERHEAD`."""
        mc = self.model_config
        if draft_layer is None and not skip_layers:  # verified: drafts are the exit computation itself
            return self.DRAFT_PASS_OVERHEAD
        bpp = {"none": mc.dtype_bytes, "int8": 1.0, "int4": 0.5 + 4.0 / mc.quant_group_size}[mc.quantization]
        head_bpp = mc.dtype_bytes if mc.quantization == "none" else 1.0
        h, d = mc.hidden_size, mc.head_dim
        layer = bpp * (2 * h * mc.num_heads * d + 2 * h * mc.num_kv_heads * d + 3 * h * mc.intermediate_size)
        rows = mc.vocab_size
        ec = self.exit_config
        if ec is not None and ec.draft_vocab and ec.heads_path:
            if self._draft_rows is None:
                from cluster.model.frspec import load_draft_vocab

                ids = load_draft_vocab(ec.heads_path)
                self._draft_rows = mc.vocab_size if ids is None else int(ids.numel())
            rows = self._draft_rows
        full = mc.num_layers * layer + mc.vocab_size * h * head_bpp
        ran = mc.num_layers - len(skip_layers) if skip_layers else draft_layer
        return (ran * layer + rows * h * head_bpp) / full + self.DRAFT_PASS_OVERHEAD

    def resolve_exit_plan(self, req: EngineRequest) -> ExitPlan:
        """The request's :class:`~cluster.request.ExitPlan`, resolved once from the request and the
        exit config: the full model without an exit config or with ``early_exit=False``; else the
        request's mode or the config's (its lossy ``policy`` when it names no mode).

        A lossless request whose sampling uses penalties, guided decoding or logprobs (which
        speculation does not handle) runs the full model instead: still the full model's output.

        Raises:
            InvalidRequestError: ``verified`` without exit layers; a ``draft_layer`` outside ``[1,
                num_layers)`` or, with trained exit heads, not one of the exit layers; draft
                settings given with a lossy mode; ``skip_layers`` without mode ``layer_skip``, or
                empty, or with a layer outside ``[1, num_layers - 1]`` (the last layer is never
                skipped); a ``draft_layer`` with ``layer_skip``; ``skip_selection`` without ``layer_skip``,
                or ``online`` with more than ``num_layers - 2`` skipped layers.
        """
        ec, L = self.exit_config, self.model_config.num_layers
        mode = req.exit_mode or (ec.mode if ec is not None else None)
        lossless = mode in LOSSLESS_MODES
        if not lossless and (req.draft_layer is not None or req.num_draft_tokens is not None):
            raise InvalidRequestError("early_exit", "early_exit: draft_layer and num_draft_tokens need mode "
                                      + " or ".join(repr(m) for m in LOSSLESS_MODES))
        for name in ("skip_layers", "skip_selection"):  # layer_skip's own settings
            if mode != "layer_skip" and getattr(req, name) is not None:
                raise InvalidRequestError("early_exit", f"early_exit.{name}: only with mode 'layer_skip'"
                                          + (f", not {mode!r}" if mode else " (the request names no mode)"))
        if mode == "layer_skip" and req.draft_layer is not None:
            raise InvalidRequestError("early_exit", "early_exit.draft_layer: only with mode 'self_speculative' "
                                      "(layer_skip drafts with every layer but skip_layers)")
        thr = req.exit_threshold
        if not req.early_exit or mode == "full":
            return FULL_MODEL
        if not lossless:
            return FULL_MODEL if ec is None else ExitPlan(mode or ec.policy, threshold=thr)
        sp = req.sampling_params
        k = req.num_draft_tokens or (ec.num_draft_tokens if ec is not None else 4)
        if mode == "verified":
            if ec is None or not ec.exit_layers:
                raise InvalidRequestError("early_exit", "early_exit.mode: 'verified' needs exit layers; this "
                                          "engine runs the full model")
            plan = ExitPlan("verified", None, k, self.draft_cost(None), adaptive=ec.adaptive_drafts, threshold=thr)
        elif mode == "layer_skip":
            skip = self._skip_layers(req)
            sel = req.skip_selection or (ec.skip_selection if ec is not None else "static")
            if sel == "online" and len(skip) > L - 2:
                raise InvalidRequestError("early_exit", f"early_exit.skip_selection: 'online' never skips the first or "
                                          f"the last layer: at most {L - 2} skipped layers, got {len(skip)}")
            plan = ExitPlan("layer_skip", None, k, self.draft_cost(None, skip), threshold=thr, skip_layers=skip,
                            skip_selection=sel,
                            # a draft length the request asks for is kept, as for self_speculative
                            adaptive=(ec.adaptive_drafts if ec is not None else True) and req.num_draft_tokens is None)
        else:
            e = req.draft_layer or (ec.default_draft_layer if ec is not None else None) or max(1, L // 4)
            if not 1 <= e < L:
                raise InvalidRequestError("early_exit", f"early_exit.draft_layer: must be in [1, {L - 1}], got {e}")
            if ec is not None and ec.head == "trained" and e not in ec.exit_layers:
                raise InvalidRequestError("early_exit", f"early_exit.draft_layer: {e} has no trained exit head; "
                                          f"choose one of {list(ec.exit_layers)}")
            plan = ExitPlan("self_speculative", e, k, self.draft_cost(e),
                            # a draft length the request asks for is kept (LayerSkip's fixed setting)
                            adaptive=(ec.adaptive_drafts if ec is not None else True) and req.num_draft_tokens is None,
                            threshold=thr)
        if sp.uses_penalties or sp.guided_decoding is not None or sp.logprobs is not None:
            return FULL_MODEL
        return plan

    def _skip_layers(self, req: EngineRequest) -> tuple[int, ...]:
        """``layer_skip``'s skip set: the request's (sorted, duplicates dropped), else the exit
        config's, else :func:`~cluster.request.default_skip_layers`; raises InvalidRequestError
        (``early_exit``) when it is empty or a layer is outside ``[1, num_layers - 1]``."""
        L, ec = self.model_config.num_layers, self.exit_config
        skip = req.skip_layers if req.skip_layers is not None else (
            (ec.skip_layers if ec is not None else ()) or default_skip_layers(L))
        if not skip:
            raise InvalidRequestError("early_exit", f"early_exit.skip_layers: must name at least one layer in "
                                      f"[1, {L - 1}], got none")
        bad = [l for l in skip if not 1 <= l < L]
        if bad:
            raise InvalidRequestError("early_exit", f"early_exit.skip_layers: each must be in [1, {L - 1}] (the last "
                                      f"layer, {L}, is never skipped), got {bad[0]}")
        return tuple(sorted(set(skip)))

    def add_request(self, request: EngineRequest) -> str:
        """Validate (:meth:`validate`) and queue a request; returns its id.

        The request comes from :class:`cluster.frontend.processor.Processor` (which checked it
        against the model); the scheduler refuses an id already in use.

        Raises:
            InvalidRequestError: see :meth:`validate`; a ``request_id`` already in use. Nothing is
                queued then.
        """
        request = self.fit_kv_cache(request)
        plan = self.resolve_exit_plan(request)
        sp = request.sampling_params
        guided = self.guided_factory().create(sp.guided_decoding) if sp.guided_decoding is not None else None
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, stop=sp.stop,
                                       skip_special_tokens=sp.skip_special_tokens)
        req = Request(request.request_id, list(request.prompt_token_ids), sp, eos_token_ids=self.eos_token_ids,
                      exit_plan=plan, observer=TokenStream(detok, guided))
        try:
            self.scheduler.add_request(req)
        except ValueError as e:  # the scheduler owns the registry of unfinished requests
            raise InvalidRequestError("request_id", str(e)) from None
        return req.request_id

    def abort_request(self, request_ids) -> None:
        """Abort queued or running requests (unknown ids are ignored); frees their KV blocks."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_running + self.scheduler.num_waiting

    # ----------------------------------------------------------------------------------- the loop
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns a delta for every request that got a token or failed."""
        so = self.scheduler.schedule()
        if so.is_empty and not so.finished_req_ids and not so.preempted_req_ids:
            return []  # (the ranks hear of every finish and preemption: their state follows the scheduler's)
        failed: list[Request] = []
        for sr in so.scheduled:
            req = self.scheduler.get_request(sr.request_id)
            guided = req.observer.guided if req is not None else None
            if sr.sample and guided is not None:
                try:
                    sr.guided_bitmask = guided.bitmask()
                except Exception as e:  # noqa: BLE001 - isolate the request
                    failed += self.scheduler.finish_requests(sr.request_id, RequestStatus.FINISHED_ABORTED,
                                                             error=f"guided decoding failed: {e!r}")
        runner_out = self.workers.execute_model(so)
        if so.is_empty:
            return []
        now = time.monotonic()
        updated = self.scheduler.update(so, runner_out)
        return [self._output(req, runner_out, now) for req in failed + updated]

    def _output(self, req: Request, runner_out, now: float) -> RequestOutput:
        """The delta of ``req`` since its last one: tokens, their exit layers and text, logprobs."""
        t: TokenStream = req.observer
        tokens = req.output_token_ids[t.num_sent:]  # one, or a lossless mode's verified tokens
        layers = req.exit_layers[t.num_sent:]
        t.num_sent = req.num_output_tokens
        if t.first_token_time is None and tokens:
            t.first_token_time = now
        lp = None
        new = runner_out.tokens.get(req.request_id)
        if new is not None and new.logprob is not None and tokens:
            lp = [TokenLogprob(tokens[-1], float(new.logprob[0]), [(int(i), float(v)) for i, v in new.logprob[1]])]
        finished = req.is_finished
        failed = req.error is not None
        if failed:
            logger.warning("request %s failed: %s", req.request_id, req.error)
        return RequestOutput(
            request_id=req.request_id, new_token_ids=[] if failed else tokens,
            new_text="" if failed else t.take_text(), new_exit_layers=[] if failed else layers,
            new_logprobs=None if failed else lp, finished=finished, finish_reason=req.finish_reason,
            stop_reason=req.stop_reason, error=req.error, num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens, num_cached_tokens=req.num_cached_tokens,
            num_layers=self.model_config.num_layers, arrival_time=req.arrival_time,
            first_token_time=t.first_token_time, finished_time=now if finished else None,
            num_draft_tokens=req.num_draft_tokens, num_accepted_tokens=req.num_accepted_tokens,
            num_verify_steps=req.num_verify_steps, exit_mode=req.exit_plan.mode)

    def check_integrity(self) -> None:
        """Raises AssertionError on leaked or double-owned KV blocks."""
        self.scheduler.block_manager.check_integrity()

    def shutdown(self) -> None:
        self.workers.shutdown()
