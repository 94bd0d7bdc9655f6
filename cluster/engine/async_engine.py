"""Asynchronous front of the engine: per-request output streams and abort.

The synchronous :class:`LLMEngine` runs in one background thread (its steps are CPU/GPU-bound
torch work that must not block the asyncio event loop of a Serve replica). Requests and aborts are
handed to that thread as commands and applied between iterations, so only the engine thread touches
the scheduler; outputs flow back into per-request ``asyncio.Queue`` s.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import queue
import threading
from typing import AsyncIterator, Callable, Optional, Union

from cluster.engine.engine import LLMEngine
from cluster.engine.protocol import EngineRequest, InvalidRequestError, RequestOutput


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; the replica must be replaced."""


class EngineCommand(enum.Enum):
    """What the event loop asks of the engine thread (applied between iterations; after vLLM v1's
    ``EngineCoreRequestType``)."""

    ADD = "add"  # args: (EngineRequest, its output stream)
    ABORT = "abort"  # args: (request id,)
    CHECK_INTEGRITY = "check_integrity"  # args: ()


class AsyncEngine:
    """Wraps an :class:`LLMEngine` with ``async generate(...)`` streams.

    Counters (for metrics): ``num_generated_tokens``, ``num_finished_requests``,
    ``num_failed_requests`` (finished with ``finish_reason="error"``).
    """

    def __init__(self, engine: Union[LLMEngine, Callable[[], LLMEngine]], idle_integrity_check: bool = True):
        """``engine``: the engine, or a function that builds it, called in the engine thread (what
        :meth:`from_args` passes): then every torch operation of the engine, from loading and the
        compiled graphs' warm-up to the steps, runs in that one thread.

        Why it matters on the CPU: PyTorch's OpenMP runtime (libgomp) keeps one pool of worker
        threads per thread that starts parallel work. Once two threads have started some, the pools'
        workers outnumber the cores and libgomp stops letting idle workers spin; every parallel op
        then waits for sleeping workers to wake. Measured on 2 cores: an int4 matmul 86 -> 163 us and
        the compiled decode step 16 -> 31 ms in a thread other than the one that loaded the model;
        15.8 ms when one thread does both.

        Raises:
            Whatever building the engine raised (re-raised here).
        """
        self.idle_integrity_check = idle_integrity_check
        self._commands: "queue.Queue" = queue.Queue()
        # request id -> (its event loop, its output queue); only the engine thread touches it
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self.error: Optional[BaseException] = None
        self.num_generated_tokens = 0
        self.num_finished_requests = 0
        self.num_failed_requests = 0
        self._built = concurrent.futures.Future()
        build = engine if callable(engine) and not isinstance(engine, LLMEngine) else (lambda: engine)
        self._thread = threading.Thread(target=self._loop, args=(build,), name="eeserve-engine", daemon=True)
        self._thread.start()
        self.engine: LLMEngine = self._built.result()  # raises what building raised
        self._stats: dict = dict(self.engine.scheduler.stats)

    @classmethod
    def from_args(cls, **kwargs) -> "AsyncEngine":
        """Build with :func:`cluster.engine.factory.create_engine` keyword arguments, in the engine
        thread (see :meth:`__init__`)."""
        from cluster.engine.factory import create_engine

        return cls(lambda: create_engine(**kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    # ------------------------------------------------------------------------------ public API
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream :class:`RequestOutput` deltas of one request until it finishes.

        The engine's checks (:meth:`LLMEngine.add_request`) happen before the first yield. Closing or
        cancelling the iterator before the end aborts the request and frees its KV blocks. A failure
        of this request alone ends the stream with a delta whose ``finish_reason`` is ``error``.

        Raises:
            InvalidRequestError: the engine refused the request. EngineDeadError: the engine died.
        """
        request_id = request.request_id
        self._check_alive()
        q: asyncio.Queue = asyncio.Queue()
        try:  # the engine thread registers the stream once the engine took the request
            await asyncio.wrap_future(self._submit(EngineCommand.ADD, request, (asyncio.get_running_loop(), q)))
        except BaseException as e:
            if not isinstance(e, InvalidRequestError):  # e.g. cancelled while the add was in flight
                self._submit(EngineCommand.ABORT, request_id)
            raise
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine failed: {item!r}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._submit(EngineCommand.ABORT, request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished)."""
        await asyncio.wrap_future(self._submit(EngineCommand.ABORT, request_id))

    def stats(self) -> dict:
        """Latest scheduler statistics (running, waiting, KV usage, prefix cache) plus counters."""
        return {**self._stats, "num_active": len(self._streams), "num_generated_tokens": self.num_generated_tokens,
                "num_finished_requests": self.num_finished_requests,
                "num_failed_requests": self.num_failed_requests}

    def check_health(self) -> None:
        """Raises EngineDeadError if the loop died, or the error of a dead tensor-parallel rank."""
        self._check_alive()
        self.engine.workers.check_health()

    async def check_integrity(self) -> None:
        """Run the block manager's integrity check on the engine thread (raises AssertionError)."""
        await asyncio.wrap_future(self._submit(EngineCommand.CHECK_INTEGRITY))

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ----------------------------------------------------------------------------- engine thread
    def _check_alive(self) -> None:
        if self.error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")

    def _submit(self, kind: EngineCommand, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((kind, args, fut))
        self._wake.set()
        return fut

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, args, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                if kind is EngineCommand.ADD:
                    request, stream = args
                    fut.set_result(self.engine.add_request(request))  # raises on a duplicate id
                    self._streams[request.request_id] = stream
                elif kind is EngineCommand.ABORT:
                    self._streams.pop(args[0], None)
                    fut.set_result(self.engine.abort_request(args[0]))
                elif kind is EngineCommand.CHECK_INTEGRITY:
                    fut.set_result(self.engine.check_integrity())
            except BaseException as e:  # delivered to the caller, the loop goes on
                fut.set_exception(e)

    def _deliver(self, out) -> None:
        stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _loop(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()
        except BaseException as e:
            self.error = e
            self._built.set_exception(e)
            return
        self._built.set_result(self.engine)
        was_busy = False
        try:
            while not self._stop:
                self._wake.clear()
                self._apply_commands()
                if self.engine.has_unfinished_requests():
                    was_busy = True
                    for out in self.engine.step():
                        self.num_generated_tokens += len(out.new_token_ids)
                        self.num_finished_requests += int(out.finished)
                        self.num_failed_requests += int(out.error is not None)
                        self._deliver(out)
                    self._stats = dict(self.engine.scheduler.stats)
                    continue
                if was_busy:
                    self.engine.step()  # flush finished ids to the workers
                    self._stats = dict(self.engine.scheduler.stats)
                    if self.idle_integrity_check:
                        self.engine.check_integrity()
                    was_busy = False
                self._wake.wait(timeout=0.5)
        except BaseException as e:
            self.error = e
            for loop, q in list(self._streams.values()):
                loop.call_soon_threadsafe(q.put_nowait, e)
            # fail the commands still queued
            while not self._commands.empty():
                _, _, fut = self._commands.get_nowait()
                fut.set_exception(EngineDeadError(repr(e)))


