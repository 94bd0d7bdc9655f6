"""The API's error objects: :class:`OpenAIError` (``{"error": {"message", "type", "param", "code"}}``
with an HTTP status) and the mapping of pydantic validation errors onto it (a 400 naming the field).
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ValidationError


class OpenAIError(Exception):
    """An error the API returns as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def pydantic_error(err: dict, skip: int = 0) -> OpenAIError:
    """One pydantic error (``ValidationError.errors()`` item) as a 400 whose ``param`` is the
    top-level field; ``skip`` leading ``loc`` items are dropped (FastAPI's ``"body"``)."""
    loc = [str(x) for x in list(err.get("loc", ()))[skip:] if not str(x).startswith("function-")]
    param = loc[0] if loc else None
    where = ".".join(loc)
    msg = str(err.get("msg") or "invalid value").removeprefix("Value error, ")
    kind = err.get("type")
    if kind == "extra_forbidden":
        msg = "unknown field: this server does not support it"
    elif kind == "json_invalid":
        return OpenAIError(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}",
                           code="invalid_json")
    if where and msg.startswith(where):  # the validator named the field itself
        return OpenAIError(400, msg, param=param, code="invalid_value")
    return OpenAIError(400, f"{where}: {msg}" if where else msg, param=param,
                       code="invalid_value" if param else "invalid_request")


def validation_error(e: ValidationError) -> OpenAIError:
    return pydantic_error(e.errors()[0])


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
