"""Coalescing of a request's output deltas on the serving path (issue 18 part 4).

Every item that crosses a Ray Serve boundary (the replica's streaming ``generate`` to the ingress,
the ingress's SSE body to the HTTP proxy) costs a Ray object, a pickle and a message, whatever its
size. The engine produces at most one :class:`~cluster.engine.protocol.RequestOutput` per request
per engine step; :class:`Coalesced` reads a stream of them ahead into a buffer and hands its reader,
each time it asks, everything that arrived since the last time merged into one delta
(:func:`merge_outputs`). A reader that keeps up gets one item per engine step, never per token; a
reader slower than the engine (a busy event loop, a slow client) gets several steps' deltas in one
item, so the number of crossings follows the reader's pace, not the engine's. Exceptions in the
stream (a typed error yielded as an item, or raised) are never merged: they come after the deltas
buffered before them.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator, Union

from cluster.engine.protocol import RequestOutput

Item = Union[RequestOutput, BaseException]


def merge_outputs(outs: list[RequestOutput]) -> RequestOutput:
    """One delta equivalent to ``outs`` (consecutive deltas of one request, oldest first): the
    ``new_*`` lists and ``new_text`` concatenated, the totals, finish fields and times of the last,
    ``replica``/``exit_mode``/``first_token_time`` of the first that has them.

    Raises:
        ValueError: ``outs`` is empty or mixes request ids.
    """
    if not outs:
        raise ValueError("merge_outputs: no deltas")
    if len(outs) == 1:
        return outs[0]
    if any(o.request_id != outs[0].request_id for o in outs):
        raise ValueError("merge_outputs: deltas of different requests")
    last = outs[-1]
    lps = [o.new_logprobs for o in outs]
    return dataclasses.replace(
        last,
        new_token_ids=[t for o in outs for t in o.new_token_ids],
        new_text="".join(o.new_text for o in outs),
        new_exit_layers=[x for o in outs for x in o.new_exit_layers],
        new_logprobs=None if all(lp is None for lp in lps) else [e for lp in lps for e in (lp or ())],
        first_token_time=next((o.first_token_time for o in outs if o.first_token_time is not None), None),
        exit_mode=next((o.exit_mode for o in outs if o.exit_mode is not None), None),
        replica=next((o.replica for o in outs if o.replica), ""))


class Coalesced:
    """Async iterator over ``source`` (deltas of one request, or exceptions as items) that merges
    whatever is buffered when it is asked for the next item.

    A task reads ``source`` ahead (started on the first ``__anext__``); ``__anext__`` waits until at
    least one item is buffered, then returns the merge of the buffered deltas up to the first
    exception item (that one comes next, alone). An exception raised by ``source`` is raised after the
    buffered deltas; its end ends this iterator. :attr:`num_items` (items returned) and
    :attr:`num_deltas` (deltas read) count the coalescing. :meth:`aclose` stops the reader task and
    closes ``source`` (which, for the engine's stream, aborts the request); :meth:`cancel` only stops
    the reader task, without awaiting.
    """

    def __init__(self, source: AsyncIterator[Item]):
        self.source = source
        self._buf: list[Item] = []
        self._end: BaseException | None = None  # StopAsyncIteration or the source's error
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.num_items = 0
        self.num_deltas = 0

    def __aiter__(self) -> "Coalesced":
        return self

    async def _pump(self) -> None:
        try:
            async for item in self.source:
                self._buf.append(item)
                self._ready.set()
                if isinstance(item, RequestOutput) and item.finished:
                    break
            self._end = StopAsyncIteration()
        except asyncio.CancelledError:
            self._end = StopAsyncIteration()
            raise
        except BaseException as e:  # noqa: BLE001 - raised to the reader after the buffered deltas
            self._end = e
        finally:
            self._ready.set()

    async def __anext__(self) -> Item:
        if self._task is None:
            self._task = asyncio.ensure_future(self._pump())
        while not self._buf and self._end is None:
            self._ready.clear()
            await self._ready.wait()
        if not self._buf:
            raise self._end
        k = next((i for i, x in enumerate(self._buf) if not isinstance(x, RequestOutput)), len(self._buf))
        if k == 0:  # an exception item: alone
            self.num_items += 1
            return self._buf.pop(0)
        outs, self._buf = self._buf[:k], self._buf[k:]
        self.num_items += 1
        self.num_deltas += len(outs)
        return merge_outputs(outs)

    def cancel(self) -> None:
        """Stop reading ahead without waiting (for a ``finally`` that must not await: under anyio's
        cancel scopes every await of a cancelled task raises again). ``source`` is left to its owner."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def aclose(self) -> None:
        """Stop reading ahead and close ``source``."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        close = getattr(self.source, "aclose", None)
        if close is not None:
            await close()
