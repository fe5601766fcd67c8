"""Forwarding to OpenAI-compatible backends: pooled connections (httpx's types over aiohttp,
`serve.transport`), deadlines, the fallback chain and SSE passthrough.

A failure is one :class:`BackendError` with a ``kind``: ``timeout``, ``connect`` (refused or
unreachable), ``reset`` (the connection dropped), ``status`` (5xx, 408 or 429),
``malformed`` (a 200 whose body is not an API answer) or ``too_large`` (a body over
``limits.max_answer_bytes``, never read past it). Those are retried on the next backend of the
chain; any other 4xx is the client's own error and is passed back unchanged.

Streams are opened *up to their first complete event* before the client sees anything: a
backend that fails before that point is still retried, and after it nothing is retried (the
client already has bytes of one model's answer), the stream ends with an error event instead.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import httpx

from tagrouter_fast.serve.config import BackendConfig, ConfigError
from tagrouter_fast.serve.metrics import GatewayMetrics
from tagrouter_fast.serve.transport import AiohttpTransport

__all__ = [
    "AllBackendsFailed",
    "Answer",
    "Backend",
    "BackendError",
    "ClientPool",
    "Forwarder",
    "OpenStream",
]

T = TypeVar("T")

#: Upstream statuses worth another backend: server faults, overload, upstream timeouts.
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
#: How a stream's first event may start (SSE field names or a comment).
_SSE_STARTS = (b"data:", b"event:", b"id:", b"retry:", b":")
#: A first event longer than this without a boundary is not SSE.
_MAX_FIRST_EVENT = 1 << 20
#: Relay buffers an incomplete event only up to this size, then passes it on as it is.
_MAX_PENDING = 1 << 20


class BackendError(Exception):
    """One failed backend call."""

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


@dataclass(frozen=True)
class Backend:
    """A configured backend with its resolved credentials and URLs."""

    config: BackendConfig
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model(self) -> str:
        return self.config.model

    @classmethod
    def from_config(cls, cfg: BackendConfig, where: str = "backends") -> Backend:
        """Reads the API key from ``cfg.api_key_env``.

        Raises:
            ConfigError: the environment variable is named but not set.
        """
        headers = {"content-type": "application/json", "accept": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(
                    f"{where}.api_key_env",
                    f"environment variable {cfg.api_key_env} is not set",
                )
            headers["authorization"] = f"Bearer {key}"
        return cls(cfg, headers)

    def url(self, path: str) -> str:
        return self.config.base_url + path

    def timeout(self, *, stream: bool) -> httpx.Timeout:
        c = self.config
        # httpx's read timeout is per read, not per call: the call's deadline is enforced
        # around it (anyio.fail_after); for streams the read timeout is the idle limit.
        read = c.stream_idle_timeout_s if stream else c.timeout_s
        return httpx.Timeout(read, connect=c.connect_timeout_s, pool=c.timeout_s)


class ClientPool:
    """The app's pooled upstream connections (`AiohttpTransport`: at most ``max_connections``
    in all, idle ones closed after ``keepalive_s``, no cookies kept: they serve every user of
    the gateway) and a count of the calls holding one, so that a leaked response (a stream never
    closed) is visible.

    Requests go to the transport directly, as `httpx.Request` objects with their timeouts: the
    `httpx.AsyncClient` layer above it (URL and header merging, auth and redirect flows, cookie
    jar) does nothing a backend call needs and was a tenth of the gateway's CPU per request."""

    def __init__(self, max_connections: int, keepalive_s: float = 4.0) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.transport = AiohttpTransport(max_connections, keepalive_s,
                                          httpx.create_ssl_context())
        self.in_flight = 0

    def lease(self) -> Callable[[], None]:
        """Counts a call in; returns the callable that counts it out (idempotent)."""
        self.in_flight += 1
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.in_flight -= 1

        return release

    async def send(self, method: str, url: str, content: bytes, headers: dict[str, str],
                   timeout: httpx.Timeout) -> httpx.Response:
        """The response with its body still to read (``aread``, ``aiter_raw``; ``aclose``)."""
        request = httpx.Request(method, url, content=content, headers=headers,
                                extensions={"timeout": timeout.as_dict()})
        response = await self.transport.handle_async_request(request)
        response.request = request
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


@dataclass
class Answer:
    """A complete backend response (non-streaming), passed to the client as it came."""

    backend: Backend
    status: int
    body: bytes
    content_type: str


@dataclass
class OpenStream:
    """A stream opened up to its first complete event(s)."""

    backend: Backend
    response: httpx.Response
    chunks: AsyncIterator[bytes]
    first: bytes
    pending: bytes
    release: Callable[[], None]  # ends the call's lease (ClientPool.lease)

    async def close(self) -> None:
        """Closes the upstream response and ends its lease; idempotent."""
        try:
            await self.response.aclose()
        finally:
            self.release()


def _classify(backend: str, e: BaseException) -> BackendError:
    if isinstance(e, (TimeoutError, httpx.TimeoutException)):
        return BackendError(backend, "timeout", str(e) or "deadline exceeded")
    if isinstance(e, httpx.ConnectError):
        return BackendError(backend, "connect", str(e) or "connection failed")
    if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return BackendError(backend, "reset", str(e) or "connection reset")
    return BackendError(backend, "transport", f"{type(e).__name__}: {e}")


def _last_boundary(buf: bytes) -> int:
    """End of the last complete SSE event in ``buf`` (0: none)."""
    a = buf.rfind(b"\n\n")
    b = buf.rfind(b"\r\n\r\n")
    return max(a + 2 if a >= 0 else 0, b + 4 if b >= 0 else 0)


def _check_first_events(name: str, first: bytes) -> None:
    """The first events of a stream must be SSE whose data is a JSON object without an
    ``error`` (some servers answer 200 and put the failure in the stream). Only these are
    parsed: they decide whether another backend is tried; later events pass through as they
    are."""
    if not first.lstrip(b"\r\n").startswith(_SSE_STARTS):
        raise BackendError(name, "malformed", f"not an event stream: {first[:80]!r}")
    for line in first.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            raise BackendError(name, "malformed", f"event data is not JSON: {data[:80]!r}") \
                from None
        if not isinstance(obj, dict):
            raise BackendError(name, "malformed", f"event data is not an object: {data[:80]!r}")
        if obj.get("error"):
            raise BackendError(name, "status", f"error event: {data[:200]!r}")


class Forwarder:
    """Sends requests to backends on the app's pooled connections and records their metrics.

    A body read whole (a non-streaming answer, an error's body) stops at ``max_answer_bytes``:
    a runaway or hostile backend costs the gateway that much memory per call at most."""

    def __init__(self, client: ClientPool, metrics: GatewayMetrics,
                 max_answer_bytes: int = 32 << 20) -> None:
        self.client = client
        self.metrics = metrics
        self.max_answer_bytes = max_answer_bytes

    def _fail(self, err: BackendError) -> BackendError:
        self.metrics.backend_errors.labels(err.backend, err.kind).inc()
        return err

    async def _read(self, backend: Backend, resp: httpx.Response) -> bytes:
        """The whole body, counted as it arrives (after decompression: a small compressed body
        cannot expand past the cap either).

        Raises:
            BackendError: ``too_large``; the caller closes the response, which drops the
                connection instead of reading on.
        """
        limit = self.max_answer_bytes
        parts: list[bytes] = []
        size = 0
        async for chunk in resp.aiter_raw():
            size += len(chunk)
            if size > limit:
                raise BackendError(backend.name, "too_large",
                                   f"answer over the {limit}-byte cap (limits.max_answer_bytes)")
            parts.append(chunk)
        return b"".join(parts)

    # ---- non-streaming ----

    async def complete(self, backend: Backend, path: str, payload: bytes) -> Answer:
        """One call with its deadline.

        Raises:
            BackendError: a retryable failure.
        """
        t0 = time.perf_counter()
        release = self.client.lease()
        resp: httpx.Response | None = None
        try:
            with anyio.fail_after(backend.config.timeout_s):
                resp = await self.client.send(
                    "POST", backend.url(path), payload, backend.headers,
                    backend.timeout(stream=False),
                )
                content = await self._read(backend, resp)
        except BackendError as e:
            raise self._fail(e) from None
        except (TimeoutError, httpx.HTTPError) as e:
            raise self._fail(_classify(backend.name, e)) from e
        finally:
            # Read to its end the connection is kept alive, else (a timeout, a cancelled
            # client, a cut body) closed; closing does not wait, so no shield is needed.
            if resp is not None:
                await resp.aclose()
            release()
        self.metrics.backend_seconds.labels(backend.name).observe(time.perf_counter() - t0)
        status = resp.status_code
        ctype = resp.headers.get("content-type", "application/json")
        if status >= 500 or status in _RETRYABLE_STATUS:
            text = content[:200].decode("utf-8", "replace")
            raise self._fail(BackendError(backend.name, "status", f"HTTP {status}: {text}",
                                          status))
        if status != 200:
            # The client's own error (bad parameters, context too long): theirs to see.
            return Answer(backend, status, content, ctype)
        try:
            obj = json.loads(content)
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            raise self._fail(BackendError(
                backend.name, "malformed", f"not an API answer: {content[:80]!r}"
            ))
        return Answer(backend, status, content, "application/json")

    async def complete_chain(
        self, chain: Sequence[Backend], path: str, payload_for: Callable[[Backend], bytes]
    ) -> tuple[Answer, list[BackendError]]:
        """The first backend of ``chain`` that answers; the failures before it.

        Raises:
            AllBackendsFailed: every backend failed.
        """
        return await _first_answer(chain, lambda b: self.complete(b, path, payload_for(b)))

    # ---- streaming ----

    async def open_stream(self, backend: Backend, path: str, payload: bytes) -> OpenStream | Answer:
        """Opens a stream and reads it up to its first complete event, within the deadline.

        Returns an `Answer` instead when the backend refuses the request with a client error.

        Raises:
            BackendError: a retryable failure before the first event.
        """
        t0 = time.perf_counter()
        release = self.client.lease()
        resp: httpx.Response | None = None
        try:
            with anyio.fail_after(backend.config.timeout_s):
                resp = await self.client.send(
                    "POST", backend.url(path), payload,
                    {**backend.headers, "accept": "text/event-stream"},
                    backend.timeout(stream=True),
                )
                status = resp.status_code
                if status != 200:
                    body = await self._read(backend, resp)
                    if status >= 500 or status in _RETRYABLE_STATUS:
                        raise BackendError(backend.name, "status", f"HTTP {status}", status)
                    await resp.aclose()
                    release()
                    return Answer(
                        backend, status, body, resp.headers.get("content-type", "application/json")
                    )
                ctype = resp.headers.get("content-type", "")
                if not ctype.startswith("text/event-stream"):
                    raise BackendError(
                        backend.name, "malformed", f"stream with content-type {ctype!r}"
                    )
                chunks = resp.aiter_raw()
                buf = b""
                cut = 0
                while not cut:
                    try:
                        buf += await chunks.__anext__()
                    except StopAsyncIteration:
                        raise BackendError(
                            backend.name, "malformed", "stream ended before its first event"
                        ) from None
                    cut = _last_boundary(buf)
                    if not cut and len(buf) > _MAX_FIRST_EVENT:
                        raise BackendError(backend.name, "malformed", "first event too long")
                first = buf[:cut]
                _check_first_events(backend.name, first)
        except BaseException as e:
            try:
                if resp is not None:
                    with anyio.CancelScope(shield=True):
                        await resp.aclose()
            finally:
                release()
            if isinstance(e, BackendError):
                raise self._fail(e) from None
            if isinstance(e, (TimeoutError, httpx.HTTPError)):
                raise self._fail(_classify(backend.name, e)) from e
            raise
        self.metrics.backend_seconds.labels(backend.name).observe(time.perf_counter() - t0)
        return OpenStream(backend, resp, chunks, first, buf[cut:], release)

    async def open_stream_chain(
        self, chain: Sequence[Backend], path: str, payload_for: Callable[[Backend], bytes]
    ) -> tuple[OpenStream | Answer, list[BackendError]]:
        """`open_stream` on each backend of ``chain`` until one opens.

        Raises:
            AllBackendsFailed: every backend failed.
        """
        return await _first_answer(chain, lambda b: self.open_stream(b, path, payload_for(b)))

    async def relay(self, stream: OpenStream) -> AsyncIterator[bytes]:
        """The stream's events as they arrive, whole events at a time.

        Holding back an incomplete event (until its end arrives) costs one ``rfind`` per chunk
        and means that when the backend drops midway, the error event that ends the stream
        follows a complete event, so clients parse it instead of a torn JSON line.
        """
        name = stream.backend.name
        try:
            yield stream.first
            pending = stream.pending
            async for chunk in stream.chunks:
                pending += chunk
                cut = _last_boundary(pending)
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
                elif len(pending) > _MAX_PENDING:
                    yield pending
                    pending = b""
            if pending:
                yield pending
        except httpx.HTTPError as e:
            err = self._fail(_classify(name, e))
            yield error_event(
                f"backend {name} failed mid-stream ({err.kind}); the answer is incomplete",
                code=f"upstream_{err.kind}",
            )
        finally:
            with anyio.CancelScope(shield=True):
                await stream.close()


def error_event(message: str, *, code: str, kind: str = "upstream_error") -> bytes:
    """An SSE event carrying an OpenAI-style error (the openai SDK raises it as APIError)."""
    body: dict[str, Any] = {"error": {"message": message, "type": kind, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _first_answer(
    chain: Sequence[Backend], attempt: Callable[[Backend], Awaitable[T]]
) -> tuple[T, list[BackendError]]:
    """``attempt`` on each backend of ``chain`` in order; the first result and the failures
    before it (the fallback chain of both the JSON and the streaming path).

    Raises:
        AllBackendsFailed: every backend failed.
    """
    errors: list[BackendError] = []
    for b in chain:
        try:
            return await attempt(b), errors
        except BackendError as e:
            errors.append(e)
    raise AllBackendsFailed(errors)

