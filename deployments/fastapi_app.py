"""The FastAPI application of the ingress: OpenAPI document, error objects, API-key check, HTTP counters.

Everything here is module-level because ``@serve.ingress`` needs the app when the ingress class is
defined; the per-process settings it reads (API key, metrics) are set by ``OpenAIIngress.__init__``
in :class:`State` (one ingress replica per process).
"""
import hmac
import importlib.metadata
import logging
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.engine.protocol import InvalidRequestError
from deployments.errors import ErrorResponse, OpenAIError, pydantic_error
from deployments.metrics import IngressMetrics

logger = logging.getLogger("ray.serve")


def version() -> str:
    try:
        return importlib.metadata.version("eeserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class _App(FastAPI):
    """FastAPI whose OpenAPI document shows the 400 error objects this API returns, not FastAPI's 422."""

    def openapi(self) -> dict:
        if self.openapi_schema is None:
            schema = super().openapi()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            self.openapi_schema = schema
        return self.openapi_schema


app = _App(title="eeserve", version=version(),
           description="OpenAI-compatible API of an early-exit LLM server")


class JSONBodyByDefault:
    """ASGI middleware: a POST body sent without a JSON content type (``curl -d '{...}'`` sends
    ``application/x-www-form-urlencoded``, some clients send none) is read as JSON, as OpenAI's API
    and this server before typed bodies did; an invalid body still gets a 400 error object."""

    FORM = (b"application/x-www-form-urlencoded", b"")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if ctype.split(b";")[0].strip().lower() in self.FORM:
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


app.add_middleware(JSONBodyByDefault)


class State:
    """Per-process state the module-level handlers need (one ingress replica per process)."""

    api_key: Optional[str] = None
    metrics: Optional[IngressMetrics] = None
    retry_after_s: int = 1  # Retry-After of 503 answers (the openai SDK waits that long, then retries)


def errors(*codes: int) -> dict:
    what = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
            500: "the generation failed", 503: "overloaded, or no healthy engine"}
    return {c: {"model": ErrorResponse, "description": what[c]} for c in codes}


def ok(model, stream: bool = False) -> dict:
    r = {"model": model, "description": "the result" + (" (SSE chunks when stream is true)" if stream else "")}
    if stream:
        r["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    return {200: r}


# One server-sent event of a stream. Before OpenAPI 3.2 (``itemSchema``), the ``schema`` of an event-stream
# media type describes each event, parsed into its fields (https://spec.openapis.org/oas/v3.2.0#sequential-media-types).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk object, a JSON error object, or [DONE]"},
    "event": {"type": "string"}, "id": {"type": "string"}}}


GENERATE_RESPONSES = errors(400, 401, 404, 500, 503)


def error_response(e: OpenAIError) -> JSONResponse:
    """The error object with its status; 401 adds ``WWW-Authenticate``, 503 (overloaded, no healthy
    engine: worth retrying) adds ``Retry-After`` in seconds."""
    headers = None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif e.status == 503:
        headers = {"Retry-After": str(State.retry_after_s)}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, e: OpenAIError):
    return error_response(e)


@app.exception_handler(RequestValidationError)
async def _request_validation(_: Request, e: RequestValidationError):
    errs = e.errors()
    if not errs:
        return error_response(OpenAIError(400, "invalid request", code="invalid_request"))
    err = errs[0]
    skip = 1 if list(err.get("loc", ()))[:1] == ["body"] else 0
    if skip and len(err.get("loc", ())) == 1 and err.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return error_response(OpenAIError(400, "request body must be a JSON object", code="invalid_json"))
    return error_response(pydantic_error(err, skip=skip))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    return error_response(OpenAIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}",
                                       code="not_found" if e.status_code == 404 else None))


@app.exception_handler(Exception)
async def _internal_error(_: Request, e: Exception):
    logger.exception("internal error")
    return error_response(OpenAIError(500, f"internal error: {e!r}"[:1000], type="server_error"))


@app.middleware("http")
async def _count(request: Request, call_next):
    response = await call_next(request)
    if State.metrics is not None:
        route = request.scope.get("route")
        State.metrics.http(getattr(route, "path", "unmatched"), response.status_code)
    return response


def _authorize(request: Request) -> None:
    """Route dependency: resolved before the body is validated, so a bad key is a 401 first."""
    key = State.api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    if not auth:
        raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(auth.encode(), f"Bearer {key}".encode()):
        raise OpenAIError(401, "Incorrect API key provided", code="invalid_api_key")


AUTH = [Depends(_authorize)]


def map_error(e: BaseException, prompt_param: str = "prompt") -> OpenAIError:
    """An exception from a replica stream as the error object the client gets (the engine's
    ``prompt`` is the chat request's ``messages``)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from cluster.engine.async_engine import EngineDeadError

    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, InvalidRequestError):
        if e.param == "prompt" and prompt_param != "prompt":
            return OpenAIError(400, e.message.replace("prompt", prompt_param), param=prompt_param, code=e.code)
        return OpenAIError(400, e.message, param=e.param, code=e.code)
    if isinstance(e, BackPressureError):
        return OpenAIError(503, f"server overloaded, retry later: {e}", type="server_error", code="overloaded")
    if isinstance(e, (EngineDeadError, ActorDiedError, ActorUnavailableError, RayActorError,
                      DeploymentUnavailableError)):
        return OpenAIError(503, f"no healthy engine, retry later: {e}"[:1000], type="server_error",
                           code="engine_unavailable")
    logger.error("generation failed: %r", e)
    return OpenAIError(500, f"internal error: {e!r}"[:1000], type="server_error")
