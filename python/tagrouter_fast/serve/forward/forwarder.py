"""Forwarding to backends (OpenAI-compatible or Anthropic Messages) on the pooled client:
deadlines, the fallback chain and SSE passthrough, with each failure one `BackendError` of
`faults.FAULT_KINDS`.

Streams are opened *up to their first complete event* before the client sees anything: a
backend that fails before that point is still retried, and after it nothing is retried (the
client already has bytes of one model's answer), the stream ends with an error instead, in the
client's protocol (the edge renders it).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio

from tagrouter_fast.serve.forward.backends import Backend
from tagrouter_fast.serve.forward.client import ClientPool, Upstream
from tagrouter_fast.serve.forward.faults import (
    CLASSIFIED,
    AllBackendsFailed,
    BackendError,
    ClientError,
    classify,
    retryable_status,
    stream_error,
)
from tagrouter_fast.serve.metrics import GatewayMetrics

__all__ = ["Answer", "AttemptTrace", "Forwarder", "OpenStream"]

T = TypeVar("T")

#: How a stream's first event may start (SSE field names or a comment).
_SSE_STARTS = (b"data:", b"event:", b"id:", b"retry:", b":")
#: A first event longer than this without a boundary is not SSE.
_MAX_FIRST_EVENT = 1 << 20
#: Relay buffers an incomplete event only up to this size, then passes it on as it is.
_MAX_PENDING = 1 << 20


@dataclass
class Answer:
    """A complete backend response (non-streaming), passed to the client as it came."""

    backend: Backend
    status: int
    body: bytes
    content_type: str
    #: The body parsed (a 200 answer, which is checked as JSON): read for its usage.
    parsed: dict[str, Any] | None = None


@dataclass
class OpenStream:
    """A stream opened up to its first complete event(s)."""

    backend: Backend
    response: Upstream
    chunks: AsyncIterator[bytes]
    first: bytes
    pending: bytes
    release: Callable[[], None]  # ends the call's lease (ClientPool.lease)

    async def close(self) -> None:
        """Closes the upstream response and ends its lease; idempotent."""
        try:
            await self.response.close()
        finally:
            self.release()


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


class AttemptTrace(Protocol):
    """What follows one attempt of a fallback chain (a tracing span, `serve.telemetry`)."""

    def failed(self, error: BaseException) -> None: ...

    def done(self, status: int) -> None: ...


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

    async def _read(self, backend: Backend, resp: Upstream) -> bytes:
        """The whole body, counted as it arrives (after decompression: a small compressed body
        cannot expand past the cap either).

        Raises:
            BackendError: ``too_large`` (the caller closes the response, which drops the
                connection instead of reading on), or the read failed.
        """
        limit = self.max_answer_bytes
        parts: list[bytes] = []
        size = 0
        async for chunk in resp.chunks():
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
        resp: Upstream | None = None
        try:
            with anyio.fail_after(backend.config.timeout_s):
                resp = await self.client.send(
                    "POST", backend.url(path), payload, backend.headers,
                    backend.timeouts(stream=False), backend=backend.name,
                )
                content = await self._read(backend, resp)
        except BackendError as e:
            raise self._fail(e) from None
        except TimeoutError as e:  # the call's deadline
            raise self._fail(classify(backend.name, e)) from e
        finally:
            # Read to its end the connection is kept alive, else (a timeout, a cancelled
            # client, a cut body) closed; closing does not wait, so no shield is needed.
            if resp is not None:
                await resp.close()
            release()
        self.metrics.backend_seconds.labels(backend.name).observe(time.perf_counter() - t0)
        status = resp.status
        ctype = resp.header("content-type", "application/json")
        if retryable_status(status):
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
        # What every answer of the backend's protocol has: chat ``choices``, a message's
        # ``content``.
        key = "content" if backend.protocol == "anthropic" else "choices"
        if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
            raise self._fail(BackendError(
                backend.name, "malformed", f"not an API answer: {content[:80]!r}"
            ))
        return Answer(backend, status, content, "application/json", obj)

    async def complete_chain(
        self, chain: Sequence[Backend], path: str | Callable[[Backend], str],
        payload_for: Callable[[Backend], bytes],
        trace: Callable[[Backend], AttemptTrace | None] | None = None,
    ) -> tuple[Answer, list[BackendError]]:
        """The first backend of ``chain`` that answers; the failures before it. ``path``: the
        same for every backend, or each backend's (its protocol's); ``trace``: follows each
        attempt.

        Raises:
            AllBackendsFailed: every backend failed.
        """
        return await _first_answer(
            chain, lambda b: self.complete(b, _path(path, b), payload_for(b)), trace)

    # ---- streaming ----

    async def open_stream(self, backend: Backend, path: str, payload: bytes) -> OpenStream | Answer:
        """Opens a stream and reads it up to its first complete event, within the deadline.

        Returns an `Answer` instead when the backend refuses the request with a client error.

        Raises:
            BackendError: a retryable failure before the first event.
        """
        t0 = time.perf_counter()
        release = self.client.lease()
        resp: Upstream | None = None
        try:
            with anyio.fail_after(backend.config.timeout_s):
                resp = await self.client.send(
                    "POST", backend.url(path), payload,
                    {**backend.headers, "accept": "text/event-stream"},
                    backend.timeouts(stream=True), backend=backend.name,
                )
                status = resp.status
                if status != 200:
                    body = await self._read(backend, resp)
                    if retryable_status(status):
                        raise BackendError(backend.name, "status", f"HTTP {status}", status)
                    await resp.close()
                    release()
                    return Answer(backend, status, body,
                                  resp.header("content-type", "application/json"))
                ctype = resp.header("content-type", "")
                if not ctype.startswith("text/event-stream"):
                    raise BackendError(
                        backend.name, "malformed", f"stream with content-type {ctype!r}"
                    )
                chunks = resp.chunks()
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
                        await resp.close()
            finally:
                release()
            if isinstance(e, BackendError):
                raise self._fail(e) from None
            if isinstance(e, CLASSIFIED):  # the call's deadline
                raise self._fail(classify(backend.name, e)) from e
            raise
        self.metrics.backend_seconds.labels(backend.name).observe(time.perf_counter() - t0)
        return OpenStream(backend, resp, chunks, first, buf[cut:], release)

    async def open_stream_chain(
        self, chain: Sequence[Backend], path: str | Callable[[Backend], str],
        payload_for: Callable[[Backend], bytes],
        trace: Callable[[Backend], AttemptTrace | None] | None = None,
    ) -> tuple[OpenStream | Answer, list[BackendError]]:
        """`open_stream` on each backend of ``chain`` until one opens (``path`` and ``trace``:
        as in `complete_chain`).

        Raises:
            AllBackendsFailed: every backend failed.
        """
        return await _first_answer(
            chain, lambda b: self.open_stream(b, _path(path, b), payload_for(b)), trace)

    async def relay(
        self, stream: OpenStream, render_error: Callable[[ClientError], bytes]
    ) -> AsyncIterator[bytes]:
        """The stream's events as they arrive, whole events at a time; a failure midway ends
        it with ``render_error(stream_error(fault))`` (the client's protocol's error event).

        Holding back an incomplete event (until its end arrives) costs one ``rfind`` per chunk
        and means that when the backend drops midway, the error event that ends the stream
        follows a complete event, so clients parse it instead of a torn JSON line.
        """
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
        except BackendError as e:
            yield render_error(stream_error(self._fail(e)))
        finally:
            with anyio.CancelScope(shield=True):
                await stream.close()


async def _first_answer(
    chain: Sequence[Backend], attempt: Callable[[Backend], Awaitable[T]],
    trace: Callable[[Backend], AttemptTrace | None] | None = None,
) -> tuple[T, list[BackendError]]:
    """``attempt`` on each backend of ``chain`` in order; the first result and the failures
    before it (the fallback chain of both the JSON and the streaming path).

    Raises:
        AllBackendsFailed: every backend failed.
    """
    errors: list[BackendError] = []
    for b in chain:
        span = trace(b) if trace is not None else None
        try:
            out = await attempt(b)
        except BackendError as e:
            errors.append(e)
            if span is not None:
                span.failed(e)
            continue
        except BaseException as e:
            if span is not None:
                span.failed(e)
            raise
        if span is not None:
            span.done(getattr(out, "status", 200))
        return out, errors
    raise AllBackendsFailed(errors)



def _path(path: str | Callable[[Backend], str], backend: Backend) -> str:
    return path if isinstance(path, str) else path(backend)
