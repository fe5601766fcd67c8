"""The outermost middleware: the concurrency limit of ``/v1`` (429 at once, no queue), the
in-flight gauge, and one JSON access-log line per request (``tagrouter.access``) with the
decision id, model and reason from the answer's ``x-tagrouter-*`` headers."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tagrouter_fast.serve.edge.errors import ApiError
from tagrouter_fast.serve.edge.translate import CHAT, MESSAGES, error_response

if TYPE_CHECKING:
    from tagrouter_fast.serve.policy.gateway import Gateway

__all__ = ["LOG_FIELDS", "Guard", "access_log"]

#: The scope key of a dict of extra access-log fields a handler may fill in (the cost of a
#: stream is known only once it ends, after its headers went out).
LOG_FIELDS = "tagrouter.log_fields"

access_log = logging.getLogger("tagrouter.access")


class Guard:
    """Outermost middleware: the concurrency limit (429 at once, no queue), the in-flight
    gauge and one JSON access-log line per request."""

    def __init__(self, app: ASGIApp, gw: Gateway) -> None:
        self.app = app
        self.gw = gw
        self.limit = gw.config.limits.max_concurrency
        self.log = gw.config.server.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gw = self.gw
        path: str = scope["path"]
        limited = path.startswith("/v1/")
        logging_on = self.log and access_log.isEnabledFor(logging.INFO)
        if limited and gw.inflight >= self.limit:
            gw.metrics.rejected.labels("concurrency").inc()
            busy = ApiError(429, f"over the concurrency limit of {self.limit} requests",
                            kind="rate_limit_error", code="concurrency_limit",
                            headers={"retry-after": "1"})
            # Each protocol's clients read their own error shape (Anthropic's on /v1/messages).
            await error_response(MESSAGES if path == MESSAGES.path else CHAT,
                                 busy)(scope, receive, send)
            if logging_on:
                self._log(scope, 429, 0.0, {})
            return
        t0 = time.perf_counter()
        status = 500
        seen: dict[str, str] = {}
        extra: dict[str, object] = {}
        if logging_on:
            scope[LOG_FIELDS] = extra

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if logging_on:
                    for k, v in message.get("headers", ()):
                        if k.startswith(b"x-tagrouter-") and k != b"x-tagrouter-explanation":
                            seen[k[12:].decode()] = v.decode("latin-1")
            await send(message)

        if limited:
            gw.inflight += 1
            gw.metrics.inflight.inc()
        try:
            # The wrapper only feeds the access line: without one, every message of a stream
            # (thousands a second at 512 streams) goes straight to the server.
            await self.app(scope, receive, send_wrapper if logging_on else send)
        finally:
            if limited:
                gw.inflight -= 1
                gw.metrics.inflight.dec()
            if logging_on:
                self._log(scope, status, time.perf_counter() - t0, seen, extra)

    @staticmethod
    def _log(scope: Scope, status: int, seconds: float, seen: dict[str, str],
             extra: dict[str, object] | None = None) -> None:
        client = scope.get("client")
        access_log.info(json.dumps({
            "ts": round(time.time(), 3),
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "ms": round(seconds * 1e3, 3),
            "decision_id": seen.get("decision-id"),
            "model": seen.get("model"),
            "reason": seen.get("reason"),
            "client": client[0] if client else None,
            **(extra or {}),
        }, separators=(",", ":")))

