"""Fan-out and merge of the engine streams of one HTTP request (the ingress's transport).

One HTTP request becomes several engine requests (``prompts x n``), each a streaming
``LLMServer.generate`` handle call. :class:`FanOut` starts them together and waits for each first
item (so a refusal becomes an HTTP error before any byte is sent), then yields their
:class:`RequestOutput` deltas as they come (those that arrived while the reader was busy merged into
one, :class:`~deployments.coalesce.Coalesced`, so a slow client gets fewer, larger chunks), accumulated into each request's
:class:`~deployments.outputs.ChoiceState` and counted in the ingress metrics. Closing the merged
iterator, or an error in one stream, cancels every handle call, which aborts the requests in the
engines.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable

from cluster.engine.protocol import EngineRequest, RequestOutput
from deployments.coalesce import Coalesced
from deployments.errors import OpenAIError
from deployments.fastapi_app import map_error
from deployments.metrics import IngressMetrics
from deployments.outputs import ChoiceState


def cancel(stream) -> None:
    """Cancel a handle call, best effort. Serve's ``cancel()`` re-raises the call's routing error
    (``BackPressureError``, no replicas) when it never reached a replica: that is not ours to raise."""
    try:
        stream.cancel()
    except Exception:  # noqa: BLE001
        pass


class Stream:
    """One engine request in flight: its choice, its first item and its replica stream."""

    def __init__(self, choice: ChoiceState, first, stream):
        self.choice, self.first, self.stream = choice, first, stream


def replica_header(streams: list[Stream]) -> dict:
    """``x-eeserve-replica``: the replica of each choice, comma-separated in choice order."""
    return {"x-eeserve-replica": ",".join(s.choice.replica for s in streams)}


class FanOut:
    """Starts, merges and cancels the engine streams of one ingress replica.

    Args:
        remote: starts one streaming ``generate`` call for an :class:`EngineRequest` and returns its
            handle response (an async iterator with ``cancel()``); may raise at once (back pressure,
            no replicas).
        metrics: the ingress's counters (requests started/ended, tokens, speculation).
    """

    def __init__(self, remote: Callable[[EngineRequest], Any], metrics: IngressMetrics):
        self.remote, self.metrics = remote, metrics
        self.num_items = 0  # coalesced deltas handed on (after the first of each stream)
        self.num_deltas = 0  # replica items they merged

    async def open(self, choice: ChoiceState, er: EngineRequest, prompt_param: str) -> Stream:
        """Start one engine request and wait for its first item (errors raise before any byte is sent).

        Raises:
            OpenAIError: the engine refused it (400, ``param`` as the engine's, ``prompt_param`` for
                prompt errors), no replica or back pressure (503), no output (500)."""
        try:
            stream = self.remote(er)  # may raise at once: BackPressureError (max_queued_requests), no replicas
        except Exception as e:  # noqa: BLE001 - mapped to the error object (503 + Retry-After)
            raise map_error(e, prompt_param) from None
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise OpenAIError(500, "the engine returned no output", type="server_error") from None
        except BaseException as e:
            cancel(stream)
            if isinstance(e, Exception):
                raise map_error(e, prompt_param) from None
            raise
        if isinstance(first, BaseException):
            cancel(stream)
            raise map_error(first, prompt_param)
        choice.replica, choice.exit_mode = first.replica, first.exit_mode
        return Stream(choice, first, stream)

    async def start(self, pairs: list[tuple[ChoiceState, EngineRequest]],
                    prompt_param: str = "prompt") -> list[Stream]:
        """:meth:`open` every pair concurrently; if one fails, the others are cancelled and its
        error raises."""
        tasks = [asyncio.ensure_future(self.open(c, er, prompt_param)) for c, er in pairs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is None:
                    cancel(t.result().stream)
                else:
                    t.cancel()
            raise

    async def deltas(self, s: Stream) -> AsyncIterator[RequestOutput]:
        """The deltas of one stream, accumulated into its choice and counted in the metrics; after
        the first, each is the merge of the replica's items that arrived since the last one.

        Raises OpenAIError: the engine failed this request (500) or died (503)."""
        c, item, reason = s.choice, s.first, "abort"
        reader, seen = Coalesced(s.stream), 0
        self.metrics.started(len(c.prompt_ids))
        try:
            while True:
                if isinstance(item, BaseException):
                    reason = "error"
                    raise map_error(item)
                before = c.spec_totals
                c.add(item)  # a delta may carry several (verified) tokens
                self.metrics.tokens(item.new_exit_layers)
                self.metrics.speculation(*(a - b for a, b in zip(c.spec_totals, before)))
                if item.finished:
                    reason = item.finish_reason or "stop"
                    if item.finish_reason == "error":
                        raise OpenAIError(500, f"generation failed: {item.error}", type="server_error")
                    if item.finish_reason == "abort":
                        raise OpenAIError(503, "the request was aborted by the server", type="server_error")
                yield item
                if item.finished:
                    return
                try:
                    item = await reader.__anext__()
                    self.num_items += 1
                    self.num_deltas += reader.num_deltas - seen
                    seen = reader.num_deltas
                except StopAsyncIteration:
                    item = OpenAIError(500, "the replica's stream ended early", type="server_error")
                except Exception as e:  # noqa: BLE001 - the replica or the route to it failed
                    item = e
        finally:
            cancel(s.stream)  # no-op after the end; aborts the request on disconnect
            reader.cancel()  # no await here: on a disconnect this task is being cancelled
            self.metrics.ended(reason, c.arrival, c.first_token, len(c.token_ids))

    async def merged(self, streams: list[Stream]) -> AsyncIterator[tuple[ChoiceState, RequestOutput]]:
        """Deltas of all streams as they come; closing it (or an error in one) cancels them all."""
        if len(streams) == 1:
            async with contextlib.aclosing(self.deltas(streams[0])) as it:
                async for d in it:
                    yield streams[0].choice, d
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(s: Stream):
            try:
                async for d in self.deltas(s):
                    await queue.put((s.choice, d))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                await queue.put((s.choice, e))

        tasks = [asyncio.ensure_future(pump(s)) for s in streams]
        try:
            remaining = len(streams)
            while remaining:
                c, d = await queue.get()
                if isinstance(d, BaseException):
                    raise d
                remaining -= int(d.finished)
                yield c, d
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, streams: list[Stream]) -> None:
        """Run every stream to its end (the choices hold the result). Raises as :meth:`deltas`."""
        async with contextlib.aclosing(self.merged(streams)) as it:
            async for _ in it:
                pass
