"""OpenAIIngress: the OpenAI-compatible HTTP API (FastAPI through ``@serve.ingress``).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /health``. The ingress tokenizes (chat template for chat),
checks the prompt against ``max_model_len`` and calls an LLMServer replica through a
DeploymentHandle, whose request router (``cluster.router``) picks the replica. A client that
disconnects cancels the handle call, which aborts the request in the engine.
"""

import asyncio
import contextlib
import hmac
import json
import logging
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import ServeArgs
from deployments.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                  ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
                                  CompletionChunk, CompletionRequest, CompletionResponse, Delta,
                                  EarlyExitStats, GenerateRequest, ModelCard, ModelList, OpenAIError,
                                  PromptTokensDetails, Usage, new_id, now, validation_error)

logger = logging.getLogger("ray.serve")
app = FastAPI(title="eeserve", description="OpenAI-compatible API of an early-exit LLM server")


def _error_response(e: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, e: OpenAIError):
    return _error_response(e)


@app.exception_handler(RequestValidationError)
async def _request_validation(_: Request, e: RequestValidationError):
    return _error_response(OpenAIError(400, str(e.errors()[:1]), code="invalid_request"))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    return _error_response(OpenAIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}",
                                       code="not_found" if e.status_code == 404 else None))


@app.exception_handler(Exception)
async def _internal_error(_: Request, e: Exception):
    logger.exception("internal error")
    return _error_response(OpenAIError(500, f"internal error: {e!r}"[:1000], type="server_error"))


class _Result:
    """One choice's accumulated output."""

    def __init__(self):
        self.text, self.exit_layers, self.finish_reason, self.final = "", [], None, {}


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=1000)
@serve.ingress(app)
class OpenAIIngress:
    """HTTP front: validation, tokenization, streaming; one LLMServer handle behind it."""

    def __init__(self, llm: DeploymentHandle, args: dict):
        from cluster.llm import load_tokenizer
        from cluster.model.loader import load_hf_config, resolve_model_dir
        from cluster.config import ModelConfig

        self.args = ServeArgs.model_validate(args)
        self.llm = llm
        self.llm_stream = llm.options(stream=True)
        model_dir = resolve_model_dir(self.args.model)
        self.tokenizer = load_tokenizer(model_dir)
        mc = ModelConfig.from_hf_config(load_hf_config(model_dir), max_model_len=self.args.max_model_len)
        self.max_model_len, self.vocab_size = mc.max_model_len, mc.vocab_size
        self.model_name = self.args.model_name
        self.api_key = self.args.resolved_api_key
        self.created = now()

    # ------------------------------------------------------------------------------ helpers
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth:
            raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
            raise OpenAIError(401, "Incorrect API key provided", code="invalid_api_key")

    async def _parse(self, request: Request, cls):
        self._authorize(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OpenAIError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != self.model_name:
            raise OpenAIError(404, f"The model '{req.model}' does not exist; this server serves "
                                   f"'{self.model_name}'", param="model", code="model_not_found")
        req.check_supported()
        return req

    def _tokenize(self, prompt: Union[str, list[int]], param: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise OpenAIError(400, f"{param}: the prompt is empty", param=param)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise OpenAIError(400, f"{param}: token ids must lie in [0, {self.vocab_size})", param=param)
        if len(ids) >= self.max_model_len:
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                   f"your {param} has {len(ids)} tokens; no room is left for the completion.",
                              param=param, code="context_length_exceeded")
        return ids

    def _max_tokens(self, req, n_prompt: int, default: Optional[int]) -> int:
        room = self.max_model_len - n_prompt
        asked = req.requested_max_tokens
        if asked is None:
            return max(1, min(default, room) if default else room)
        if n_prompt + asked > self.max_model_len:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                   f"you requested {n_prompt + asked} tokens ({n_prompt} in the prompt, {asked} in "
                                   f"the completion).", param=name, code="context_length_exceeded")
        return asked

    def _generate_requests(self, req, prompts: list[list[int]], prefix: str, default_max: Optional[int]):
        rid = new_id(prefix)
        out = []
        for i, ids in enumerate(prompts):
            sp = req.sampling_params(self._max_tokens(req, len(ids), default_max))
            out.append(GenerateRequest(request_id=f"{rid}-{i}", prompt_token_ids=ids, sampling_params=sp,
                                       exit_threshold=req.exit_threshold(),
                                       max_tokens_is_default=req.requested_max_tokens is None))
        return rid, out

    async def _first(self, gen_req: GenerateRequest):
        """Start the replica stream and wait for its first delta (errors become 400 before any byte)."""
        stream = self.llm_stream.generate.remote(gen_req)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise OpenAIError(500, "the engine returned no output", type="server_error") from None
        except BackPressureError as e:
            raise OpenAIError(503, f"server overloaded, retry later: {e}", type="server_error",
                              code="overloaded") from None
        except BaseException:
            stream.cancel()
            raise
        if "error" in first:
            stream.cancel()
            raise OpenAIError(400, first["error"], param="max_tokens" if "max_tokens" in first["error"] else None)
        return first, stream

    @staticmethod
    async def _rest(first: dict, stream) -> AsyncIterator[dict]:
        try:
            yield first
            if first.get("finished"):
                return
            async for delta in stream:
                if "error" in delta:
                    raise OpenAIError(500, delta["error"], type="server_error")
                yield delta
        finally:
            stream.cancel()  # no-op after the end; aborts the request on disconnect

    async def _start_all(self, gen_reqs: list[GenerateRequest]):
        starts = [asyncio.ensure_future(self._first(g)) for g in gen_reqs]
        try:
            return await asyncio.gather(*starts)
        except BaseException:
            for t in starts:
                if t.done() and not t.cancelled() and t.exception() is None:
                    t.result()[1].cancel()
                else:
                    t.cancel()
            raise

    async def _collect(self, first: dict, stream, result: _Result) -> None:
        async with contextlib.aclosing(self._rest(first, stream)) as rest:
            async for d in rest:
                result.text += d["text"]
                result.exit_layers += d["exit_layers"]
                if d["finished"]:
                    result.finish_reason, result.final = d["finish_reason"], d

    def _usage(self, results: list[_Result]) -> tuple[Usage, EarlyExitStats]:
        p = sum(r.final.get("num_prompt_tokens", 0) for r in results)
        c = sum(r.final.get("num_output_tokens", len(r.exit_layers)) for r in results)
        cached = sum(r.final.get("num_cached_tokens", 0) for r in results)
        layers = [l for r in results for l in r.exit_layers]
        num_layers = next((r.final["num_layers"] for r in results if "num_layers" in r.final), 0)
        return (Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)),
                EarlyExitStats.from_layers(num_layers, layers))

    @staticmethod
    def _headers(firsts) -> dict:
        return {"x-eeserve-replica": ",".join(f[0].get("replica", "") for f in firsts)}

    # ------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health(self):
        try:
            await asyncio.wait_for(self.llm.health.remote(), timeout=30)
        except Exception as e:
            return _error_response(OpenAIError(503, f"unhealthy: {e!r}"[:500], type="server_error"))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created,
                                         max_model_len=self.max_model_len)]).model_dump()

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        prompts = [self._tokenize(p, "prompt") for p in req.prompts()]
        rid, gen_reqs = self._generate_requests(req, prompts, "cmpl", default_max=16)
        firsts = await self._start_all(gen_reqs)
        created = now()
        if req.stream:
            return self._sse(self._completion_chunks(req, rid, created, firsts), firsts)
        results = [_Result() for _ in firsts]
        await asyncio.gather(*(self._collect(f, s, r) for (f, s), r in zip(firsts, results)))
        usage, ee = self._usage(results)
        body = CompletionResponse(id=rid, created=created, model=self.model_name, usage=usage, early_exit=ee,
                                  choices=[CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
                                           for i, r in enumerate(results)])
        return JSONResponse(body.model_dump(), headers=self._headers(firsts))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        try:
            text = self.tokenizer.apply_chat_template(req.conversation(), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors: bad role order, unsupported content
            raise OpenAIError(400, f"messages: cannot apply the chat template: {e}", param="messages") from None
        rid, gen_reqs = self._generate_requests(req, [self._tokenize(text, "messages")], "chatcmpl", None)
        firsts = await self._start_all(gen_reqs)
        created = now()
        if req.stream:
            return self._sse(self._chat_chunks(req, rid, created, firsts[0]), firsts)
        result = _Result()
        await self._collect(*firsts[0], result)
        usage, ee = self._usage([result])
        body = ChatCompletionResponse(id=rid, created=created, model=self.model_name, usage=usage, early_exit=ee,
                                      choices=[ChatChoice(index=0, message=AssistantMessage(content=result.text),
                                                          finish_reason=result.finish_reason)])
        return JSONResponse(body.model_dump(), headers=self._headers(firsts))

    # ----------------------------------------------------------------------------- streaming
    def _sse(self, chunks: AsyncIterator[str], firsts) -> StreamingResponse:
        async def body():
            async with contextlib.aclosing(chunks):  # a disconnect closes the chain down to the replica
                try:
                    async for c in chunks:
                        yield f"data: {c}\n\n"
                except OpenAIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **self._headers(firsts)})

    async def _chat_chunks(self, req, rid: str, created: int, first) -> AsyncIterator[str]:
        def chunk(delta: Delta, finish=None, **kw) -> str:
            return ChatCompletionChunk(id=rid, created=created, model=self.model_name,
                                       choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish)],
                                       **kw).model_dump_json()

        result = _Result()
        yield chunk(Delta(role="assistant", content=""))
        async with contextlib.aclosing(self._rest(*first)) as rest:
            async for d in rest:
                result.exit_layers += d["exit_layers"]
                if d["finished"]:
                    result.finish_reason, result.final = d["finish_reason"], d
                    if d["text"]:
                        yield chunk(Delta(content=d["text"]))
                    usage, ee = self._usage([result])
                    yield chunk(Delta(), d["finish_reason"], early_exit=ee)
                    if req.include_usage:
                        yield ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=[],
                                                  usage=usage, early_exit=ee).model_dump_json()
                elif d["text"]:
                    yield chunk(Delta(content=d["text"]))

    async def _completion_chunks(self, req, rid: str, created: int, firsts) -> AsyncIterator[str]:
        def chunk(i: int, text: str, finish=None, **kw) -> str:
            return CompletionChunk(id=rid, created=created, model=self.model_name, **kw, choices=[
                CompletionChoice(index=i, text=text, finish_reason=finish)]).model_dump_json()

        results = [_Result() for _ in firsts]
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, first, stream):
            try:
                async for d in self._rest(first, stream):
                    await queue.put((i, d))
            except BaseException as e:
                await queue.put((i, e))
                raise

        tasks = [asyncio.ensure_future(pump(i, f, s)) for i, (f, s) in enumerate(firsts)]
        try:
            remaining = len(tasks)
            while remaining:
                i, d = await queue.get()
                if isinstance(d, BaseException):
                    raise d if isinstance(d, OpenAIError) else OpenAIError(500, repr(d), type="server_error")
                results[i].exit_layers += d["exit_layers"]
                if d["finished"]:
                    remaining -= 1
                    results[i].finish_reason, results[i].final = d["finish_reason"], d
                    last = remaining == 0
                    usage, ee = self._usage(results)
                    yield chunk(i, d["text"], d["finish_reason"], early_exit=ee if last else None)
                    if last and req.include_usage:
                        yield CompletionChunk(id=rid, created=created, model=self.model_name, choices=[],
                                              usage=usage, early_exit=ee).model_dump_json()
                elif d["text"]:
                    yield chunk(i, d["text"])
        finally:
            for t in tasks:
                t.cancel()
