"""Server-sent events for streamed completions and chat completions: one chunk generator for both.

The two APIs stream the same way (one chunk per non-empty delta, ``early_exit`` statistics on the
chunk that finishes the last choice, a final ``usage`` chunk when ``stream_options.include_usage``)
and differ only in what :class:`ChunkFormat` holds: the chunk model, the choice model, the fields a
delta puts in its choice, and the chat API's opening ``role`` chunk per choice.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from cluster.engine.protocol import RequestOutput
from deployments.errors import OpenAIError
from deployments.fastapi_app import map_error
from deployments.outputs import ChoiceState, TokenText, chat_logprobs, completion_logprobs, usage_and_stats
from deployments.responses import ChatChunkChoice, ChatCompletionChunk, CompletionChoice, CompletionChunk, Delta
from deployments.streams import Stream, cancel, replica_header

# (choice, delta, first delta of this choice?) -> the choice model's fields, or None: nothing to send
DeltaFields = Callable[[ChoiceState, RequestOutput, bool], Optional[dict]]


@dataclass(frozen=True)
class ChunkFormat:
    """What differs between the chat and the completions stream.

    Attributes:
        chunk: the chunk model (``id``, ``created``, ``model``, ``choices`` and optional ``usage``,
            ``early_exit``).
        choice: the choice model (``index``, ``finish_reason``, ``stop_reason`` and ``fields``).
        fields: a delta's choice-specific fields (text, logprobs), or None to skip an empty delta.
        opening: a choice's first chunk, sent for every choice before any delta (None: none).
    """

    chunk: type
    choice: type
    fields: DeltaFields
    opening: Optional[Callable[[ChoiceState], object]] = None


def chat_format(tt: TokenText, logprobs: bool) -> ChunkFormat:
    """``chat.completion.chunk``: an opening ``{"role": "assistant"}`` delta, then content deltas."""
    def fields(c: ChoiceState, d: RequestOutput, first: bool) -> Optional[dict]:
        lp = chat_logprobs(tt, d.new_logprobs or []) if logprobs else None
        if not (d.finished or d.new_text or (lp and lp.content)):
            return None
        return {"delta": Delta(content=d.new_text), "logprobs": lp}

    return ChunkFormat(ChatCompletionChunk, ChatChunkChoice, fields,
                       opening=lambda c: ChatChunkChoice(index=c.index, delta=Delta(role="assistant", content="")))


def completion_format(tt: TokenText, logprobs: Optional[int], echo: bool) -> ChunkFormat:
    """``text_completion``: text deltas, the echoed prompt (and its log-probabilities) on a choice's first."""
    def fields(c: ChoiceState, d: RequestOutput, first: bool) -> Optional[dict]:
        text = (c.prefix if first else "") + d.new_text
        lp = None
        if logprobs is not None:
            lp = completion_logprobs(tt, c, d.new_logprobs or [], c.prompt_ids if (first and echo) else None)
        if not (d.finished or text or (lp and lp.tokens)):
            return None
        return {"text": text, "logprobs": lp}

    return ChunkFormat(CompletionChunk, CompletionChoice, fields)


async def chunks(fmt: ChunkFormat, merged: AsyncIterator[tuple[ChoiceState, RequestOutput]],
                 choices: list[ChoiceState], *, rid: str, created: int, model: str, num_layers: int,
                 include_usage: bool) -> AsyncIterator[str]:
    """The JSON chunks of one streamed response, from the merged deltas of its ``choices``.

    Args:
        merged: (choice, delta) pairs as they come (``FanOut.merged``); closed when this generator is.
        created: Unix time (seconds) of the response; ``num_layers``: the model's decoder layers.

    Raises:
        OpenAIError: as the merged deltas do (the SSE body turns it into an error event)."""
    def chunk(items: list, **kw) -> str:
        return fmt.chunk(id=rid, created=created, model=model, choices=items, **kw).model_dump_json()

    if fmt.opening is not None:
        for c in choices:
            yield chunk([fmt.opening(c)])
    started: set[int] = set()
    remaining = len(choices)
    async with contextlib.aclosing(merged) as it:
        async for c, d in it:
            first = c.index not in started
            started.add(c.index)
            fields = fmt.fields(c, d, first)
            if fields is None:
                continue
            kw = {}
            if d.finished:
                remaining -= 1
                if remaining == 0:
                    kw["early_exit"] = usage_and_stats(choices, num_layers)[1]
            yield chunk([fmt.choice(index=c.index, finish_reason=d.finish_reason if d.finished else None,
                                    stop_reason=c.stop_reason_json if d.finished else None, **fields)], **kw)
    if include_usage:
        usage, ee = usage_and_stats(choices, num_layers)
        yield chunk([], usage=usage, early_exit=ee)


def sse_response(body_chunks: AsyncIterator[str], streams: list[Stream]) -> StreamingResponse:
    """``text/event-stream`` of ``data: <chunk>`` events ending with ``data: [DONE]``.

    An error mid-stream becomes an error event (the OpenAI error object) before ``[DONE]``, never a
    cut stream; a client that disconnects closes the chunks, which cancels the engine streams (also
    when it leaves before the body started)."""
    async def body():
        async with contextlib.aclosing(body_chunks):  # a disconnect closes the chain down to the replicas
            try:
                async for c in body_chunks:
                    yield f"data: {c}\n\n"
            except OpenAIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            except Exception as e:  # noqa: BLE001 - the client gets an error event, never a cut stream
                yield f"data: {json.dumps(map_error(e).body())}\n\n"
        yield "data: [DONE]\n\n"

    def cancel_all():  # a client gone before the body started: abort what it asked for
        for s in streams:
            cancel(s.stream)

    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(cancel_all),
                             headers={"Cache-Control": "no-cache", **replica_header(streams)})
