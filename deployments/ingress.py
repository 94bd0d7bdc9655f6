"""OpenAIIngress: the OpenAI-compatible HTTP API (FastAPI through ``@serve.ingress``).

The routes only: a thin adapter from HTTP to :class:`~cluster.engine.protocol.EngineRequest` and
back. It parses the body (the pydantic models of :mod:`deployments.protocol` and
:mod:`deployments.responses`, which are also the OpenAPI schema), checks what only it knows (API key,
model name, chat template, OpenAI-only fields), tokenizes, and fans out one engine request per prompt
and sample (``index = prompt_i * n + sample_j``) to LLMServer replicas through a DeploymentHandle
(:mod:`deployments.streams` starts and merges them, ``deployments.router`` picks the replica,
:mod:`deployments.sse` formats a streamed answer). The engine validates the request against the
model and the KV cache; its :class:`InvalidRequestError` becomes a 400 with the
same ``param``/``code``, a dead engine 503, a failed request 500 (or, once streaming, an SSE error
event followed by ``data: [DONE]``). A client that disconnects cancels the handle calls, which
aborts the requests in the engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``POST /tokenize``, ``POST /detokenize``, ``GET /version``, ``GET /health``, ``GET /metrics``.
"""

import asyncio
import logging
from typing import Optional, Union

from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.engine.protocol import EngineRequest, InvalidRequestError
from cluster.frontend.processor import Processor
from deployments import serve_compat, sse
from deployments.config import ServeArgs
from deployments.errors import OpenAIError, validation_error
from deployments.fastapi_app import AUTH, GENERATE_RESPONSES, State, app, error_response, errors, map_error, ok, version
from deployments.metrics import CONTENT_TYPE, IngressMetrics
from deployments.outputs import ChoiceState, TokenText, chat_logprobs, completion_logprobs, usage_and_stats
from deployments.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                  conversation)
from deployments.responses import (AssistantMessage, ChatChoice, ChatCompletionResponse, CompletionChoice,
                                   CompletionResponse, DetokenizeResponse, ModelCard, ModelList, TokenizeResponse,
                                   VersionResponse, new_id, now)
from deployments.streams import FanOut, Stream, replica_header

logger = logging.getLogger("ray.serve")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
MAX_CHOICES = 256  # engine requests of one HTTP request (prompts x n)


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=1000)
@serve.ingress(app)
class OpenAIIngress:
    """HTTP front: parsing, tokenization, fan-out, response formats; one LLMServer handle behind it."""

    def __init__(self, llm: DeploymentHandle, args: dict):
        from cluster.config import ModelConfig
        from cluster.engine.factory import load_tokenizer
        from cluster.model.loader import load_hf_config, resolve_model_dir

        serve_compat.check_ingress_internals()  # fail at start-up, not on the first generation
        self.args = ServeArgs.model_validate(args)
        self.llm = llm
        self.llm_stream = llm.options(stream=True)
        model_dir = resolve_model_dir(self.args.model)
        self.tokenizer = load_tokenizer(model_dir)
        self.token_text = TokenText(self.tokenizer)
        mc = ModelConfig.from_hf_config(load_hf_config(model_dir), max_model_len=self.args.max_model_len)
        self.max_model_len, self.vocab_size, self.num_layers = mc.max_model_len, mc.vocab_size, mc.num_layers
        self.processor = Processor(self.tokenizer, mc)  # every model-level check, before any replica is asked
        self.model_name = self.args.model_name
        self.created = now()
        self.metrics = IngressMetrics(self.model_name, mc.num_layers)
        self.fanout = FanOut(self._remote, self.metrics)
        State.api_key, State.metrics = self.args.resolved_api_key, self.metrics
        State.retry_after_s = self.args.retry_after_s

    # ------------------------------------------------------------------------------ helpers
    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                              param="model", code="model_not_found")

    def _encode(self, prompt: Union[str, list[int]], param: str) -> list[int]:
        return self.processor.tokenize(prompt)

    def _chat_ids(self, req: Union[ChatCompletionRequest, TokenizeRequest], add_generation_prompt=True) -> list[int]:
        try:
            return self.processor.chat_ids(conversation(req.messages), add_generation_prompt)
        except InvalidRequestError as e:
            raise map_error(e) from None

    def _engine_requests(self, req, prompts: list[list[int]], rid: str, default_max: Optional[int],
                         prefixes: Optional[list[str]] = None) -> list[tuple[ChoiceState, EngineRequest]]:
        if len(prompts) * req.n > MAX_CHOICES:
            raise OpenAIError(400, f"prompt: {len(prompts)} prompts x n={req.n} exceeds {MAX_CHOICES} choices per "
                                   "request", param="prompt")
        asked = req.requested_max_tokens
        max_tokens = asked or max(self.args.default_max_tokens or default_max or self.max_model_len, req.min_tokens)
        exit_fields = req.engine_exit_fields()
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        out = []
        for i, ids in enumerate(prompts):
            for j in range(req.n):
                index = i * req.n + j
                try:
                    er = self.processor.process(f"{rid}-{index}", ids, req.sampling_params(max_tokens, sample=j),
                                                prompt_param=param, max_tokens_is_default=asked is None, **exit_fields)
                except ValidationError as e:  # the sampling fields' own declarations
                    raise validation_error(e) from None
                except InvalidRequestError as e:
                    raise map_error(e, param) from None
                out.append((ChoiceState(index, i, ids, prefixes[i] if prefixes else ""), er))
        return out

    def _remote(self, er: EngineRequest):
        """``generate.remote`` with its own internal request id (a Serve routing bug: see
        :mod:`deployments.serve_compat`)."""
        with serve_compat.own_request_id():
            return self.llm_stream.generate.remote(er)

    # ------------------------------------------------------------------------------- routes
    @app.get("/health", responses=errors(503))
    async def health(self):
        """200 when at least one LLMServer replica's engine (and its ranks) answers within
        ``health_timeout_s``; else 503 at once: never waits for a replica to start or come back.

        It asks every running replica directly (``broadcast``: no queue, no ``max_ongoing_requests``),
        so a busy server stays healthy; the answer counts healthy and failing replicas."""
        timeout = self.args.health_timeout_s
        try:
            results = await asyncio.wait_for(
                self.llm.broadcast("health").results_async(timeout_s=timeout, return_exceptions=True), timeout)
        except Exception as e:  # noqa: BLE001 - no replica yet (DeploymentUnavailableError), or none answered
            why = "no replica answered in time" if isinstance(e, asyncio.TimeoutError) else repr(e)
            return error_response(OpenAIError(503, f"unhealthy: {why}"[:500], type="server_error",
                                              code="engine_unavailable"))
        ok_ = [r for r in results if isinstance(r, dict)]
        if not ok_:
            why = repr(results[0]) if results else "no running replica"
            return error_response(OpenAIError(503, f"unhealthy: {why}"[:500], type="server_error",
                                              code="engine_unavailable"))
        return {"status": "ok", "replicas": len(ok_), "unhealthy_replicas": len(results) - len(ok_)}

    @app.get("/version", responses=ok(VersionResponse))
    async def version(self):
        return VersionResponse(version=version()).model_dump()

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics(self):
        try:
            stats = await self.llm.broadcast("stats").results_async(timeout_s=5, return_exceptions=True)
        except Exception as e:  # noqa: BLE001 - serve the counters even if no replica answers
            logger.warning("metrics: replica stats unavailable: %r", e)
            stats = []
        self.metrics.set_replica_stats(list(stats))
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=AUTH, responses={**ok(ModelList), **errors(401)})
    async def models(self):
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created,
                                         max_model_len=self.max_model_len)]).model_dump()

    @app.post("/tokenize", dependencies=AUTH, responses={**ok(TokenizeResponse), **errors(400, 401, 404)})
    async def tokenize(self, body: TokenizeRequest):
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "tokenize: give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            ids = self._chat_ids(body, body.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len).model_dump()

    @app.post("/detokenize", dependencies=AUTH, responses={**ok(DetokenizeResponse), **errors(400, 401, 404)})
    async def detokenize(self, body: DetokenizeRequest):
        self._check_model(body.model)
        limit = min(self.vocab_size, len(self.tokenizer))
        if any(not 0 <= t < limit for t in body.tokens):
            raise OpenAIError(400, f"tokens: token ids must lie in [0, {limit})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens)).model_dump()

    @app.post("/v1/completions", dependencies=AUTH,
              responses={**ok(CompletionResponse, stream=True), **GENERATE_RESPONSES})
    async def completions(self, body: CompletionRequest):
        req = body
        self._check_model(req.model)
        req.check_supported()
        raw = req.prompts()
        prompts = [self._encode(p, "prompt") for p in raw]
        prefixes = None
        if req.echo:
            prefixes = [p if isinstance(p, str) else self.tokenizer.decode(ids) for p, ids in zip(raw, prompts)]
        rid = new_id("cmpl")
        pairs = self._engine_requests(req, prompts, rid, COMPLETIONS_DEFAULT_MAX_TOKENS, prefixes)
        streams = await self.fanout.start(pairs)
        created = now()
        if req.stream:
            fmt = sse.completion_format(self.token_text, req.logprobs, req.echo)
            return self._sse(fmt, req, rid, created, streams)
        await self.fanout.collect(streams)
        choices = [s.choice for s in streams]
        usage, ee = usage_and_stats(choices, self.num_layers)
        out = []
        for c in choices:
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(self.token_text, c, c.logprobs or [], c.prompt_ids if req.echo else None)
            out.append(CompletionChoice(index=c.index, text=c.prefix + c.text, logprobs=lp,
                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason_json))
        body_out = CompletionResponse(id=rid, created=created, model=self.model_name, usage=usage, early_exit=ee,
                                      choices=out)
        return JSONResponse(body_out.model_dump(), headers=replica_header(streams))

    @app.post("/v1/chat/completions", dependencies=AUTH,
              responses={**ok(ChatCompletionResponse, stream=True), **GENERATE_RESPONSES})
    async def chat_completions(self, body: ChatCompletionRequest):
        req = body
        self._check_model(req.model)
        req.check_supported()
        ids = self._chat_ids(req)
        rid = new_id("chatcmpl")
        streams = await self.fanout.start(self._engine_requests(req, [ids], rid, None), "messages")
        created = now()
        if req.stream:
            return self._sse(sse.chat_format(self.token_text, req.logprobs), req, rid, created, streams)
        await self.fanout.collect(streams)
        choices = [s.choice for s in streams]
        usage, ee = usage_and_stats(choices, self.num_layers)
        out = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                          stop_reason=c.stop_reason_json,
                          logprobs=chat_logprobs(self.token_text, c.logprobs or []) if req.logprobs else None)
               for c in choices]
        body_out = ChatCompletionResponse(id=rid, created=created, model=self.model_name, usage=usage, early_exit=ee,
                                          choices=out)
        return JSONResponse(body_out.model_dump(), headers=replica_header(streams))

    def _sse(self, fmt: sse.ChunkFormat, req, rid: str, created: int, streams: list[Stream]):
        chunks = sse.chunks(fmt, self.fanout.merged(streams), [s.choice for s in streams], rid=rid, created=created,
                            model=self.model_name, num_layers=self.num_layers, include_usage=req.include_usage)
        return sse.sse_response(chunks, streams)
