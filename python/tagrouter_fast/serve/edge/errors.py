"""The gateway's errors as the client sees them: `ApiError`, answered as OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with an HTTP status, and the renderings of
an upstream failure (`forward.faults.ClientError`) as a JSON error or as the event that ends an
OpenAI stream. Every layer of the gateway raises `ApiError`; only the edge renders it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from tagrouter_fast.serve.forward.faults import ClientError

__all__ = ["ApiError", "bad", "openai_error_event", "too_deep", "upstream_error"]


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None,
        kind: str = "invalid_request_error", code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message, "type": self.kind, "param": self.param, "code": self.code
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad(param: str, problem: str) -> ApiError:
    """A 400 naming the field: ``"<param>: <problem>"``."""
    return ApiError(400, f"{param}: {problem}", param=param)


def too_deep() -> ApiError:
    return ApiError(400, "body: nested too deeply (JSON deeper than the parser recurses, about "
                    "900 levels)", param="body", code="json_too_deep")


def upstream_error(error: ClientError, headers: Mapping[str, str] | None = None) -> ApiError:
    """No backend answered (`forward.faults.client_error`): a JSON error."""
    return ApiError(error.status, error.message, kind=error.kind, code=error.code,
                    headers=headers)


def openai_error_event(error: ClientError) -> bytes:
    """The SSE event that ends an OpenAI stream a backend broke midway (the openai SDK raises it
    as APIError)."""
    body: dict[str, Any] = {
        "error": {"message": error.message, "type": error.kind, "code": error.code}
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"
