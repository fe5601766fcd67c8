"""Upstream faults, classified once, and their one translation to what the client sees.

A failed backend call is one :class:`BackendError` whose ``kind`` is one of `FAULT_KINDS`:

- ``timeout``: no connection in time (connect, or a free one from the pool), a backend silent
  past its read timeout, or the call's deadline spent;
- ``connect``: refused or unreachable (never a timeout: a 502, not a 504);
- ``status``: an answer of 5xx, 408, 409, 425 or 429 (worth another backend), or a stream whose
  first event is an error; any other 4xx is the client's own error, passed back unchanged and
  no fault at all (`retryable_status`);
- protocol faults: ``reset`` (the connection dropped, the answer is not HTTP, the body was cut
  short) and ``malformed`` (a 200 that is not an API answer: bad JSON, HTML, a stream whose
  first event is not JSON);
- ``too_large``: a body over ``limits.max_answer_bytes``, never read past it;
- ``transport``: any other failure of the HTTP client (none is known; the message names it).

`classify` maps the client library's exceptions (aiohttp's, and the deadline's `TimeoutError`)
to a kind where they are caught; the forwarder sets ``status``, ``malformed`` and
``too_large`` from what it reads. `client_error` and `stream_error` are the only translations
to the client: a JSON error (502, or 504 when the last try timed out) before any byte was
sent, an error ending a stream after (each rendered by the edge, in the client's protocol).
The kinds are the label of
``tagrouter_backend_errors_total{backend, kind}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

__all__ = [
    "FAULT_KINDS",
    "AllBackendsFailed",
    "BackendError",
    "ClientError",
    "classify",
    "client_error",
    "retryable_status",
    "stream_error",
]

FAULT_KINDS = ("timeout", "connect", "status", "reset", "malformed", "too_large", "transport")
#: Upstream statuses below 500 worth another backend: overload, upstream timeouts, conflicts.
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


class BackendError(Exception):
    """One failed backend call: which backend, the fault's kind, what happened."""

    def __init__(self, backend: str, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"{backend}: {kind}: {detail}")
        self.backend = backend
        self.kind = kind
        self.detail = detail
        self.status = status


class AllBackendsFailed(Exception):
    """Every backend of the chain failed; ``errors`` in the order tried."""

    def __init__(self, errors: Sequence[BackendError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = list(errors)

    @property
    def http_status(self) -> int:
        # 504 when the last try ran out of time (the client's wait was spent waiting), else 502.
        return 504 if self.errors and self.errors[-1].kind == "timeout" else 502


def retryable_status(status: int) -> bool:
    """Whether an upstream status is a fault worth another backend (else, below 500, the
    client's own error: theirs to see)."""
    return status >= 500 or status in _RETRYABLE_STATUS


def classify(backend: str, e: BaseException) -> BackendError:
    """The fault of an exception raised by a backend call: the HTTP client's, or the call's
    deadline (`TimeoutError`). Subclasses first: aiohttp's timeouts are `OSError`\\ s, its
    refused connection a `ClientOSError`."""
    if isinstance(e, BackendError):
        return e
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        # aiohttp's pool, connect and read timeouts, and anyio.fail_after's deadline.
        return BackendError(backend, "timeout", str(e) or "deadline exceeded")
    if isinstance(e, aiohttp.ClientConnectorError):
        return BackendError(backend, "connect", str(e) or "connection failed")
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return BackendError(backend, "reset",
                            str(e) or "server disconnected without a complete response")
    if isinstance(e, aiohttp.ClientResponseError):
        # What aiohttp raises for an answer that does not parse as HTTP.
        return BackendError(backend, "reset", f"invalid HTTP response: {e.message}")
    if isinstance(e, aiohttp.ClientPayloadError):
        return BackendError(backend, "reset", f"incomplete body: {e}")
    if isinstance(e, (aiohttp.ClientOSError, ConnectionError)):
        return BackendError(backend, "reset", str(e) or "connection reset")
    return BackendError(backend, "transport", f"{type(e).__name__}: {e}")


#: The exceptions `classify` knows: what a backend call catches (anything else is a bug).
CLASSIFIED: tuple[type[BaseException], ...] = (
    TimeoutError, asyncio.TimeoutError, aiohttp.ClientError, ConnectionError,
)


@dataclass(frozen=True)
class ClientError:
    """What the client is told about an upstream failure (the edge renders it)."""

    status: int
    code: str
    message: str
    kind: str = "upstream_error"


def client_error(e: AllBackendsFailed) -> ClientError:
    """The answer when no backend of the chain answered: 504 when the last try timed out, else
    502; ``upstream_too_large`` when the last answer was over the cap."""
    last = e.errors[-1].kind if e.errors else None
    status = e.http_status
    code = ("upstream_timeout" if status == 504
            else "upstream_too_large" if last == "too_large" else "upstream_error")
    return ClientError(status, code, f"no backend answered: {e}")


def stream_error(err: BackendError) -> ClientError:
    """The error that ends a stream a backend broke after its first event (no retry: the
    client has part of one model's answer)."""
    return ClientError(502, f"upstream_{err.kind}", f"backend {err.backend} failed mid-stream "
                       f"({err.kind}); the answer is incomplete")

