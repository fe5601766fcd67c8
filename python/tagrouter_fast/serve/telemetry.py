"""OpenTelemetry traces of the gateway: one span per request, one child span per upstream
attempt. Off by default; on when the standard variables ask for an exporter.

On: ``OTEL_TRACES_EXPORTER`` names ``otlp`` or ``console`` (comma-separated; ``none`` is off),
or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``: the exporter is then ``otlp``); ``OTEL_SDK_DISABLED=true``
turns it off whatever else is set. The OTLP protocol comes from
``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` (``http/protobuf`` by default, or ``grpc``); endpoint,
headers, sampler (``OTEL_TRACES_SAMPLER``), batching (``OTEL_BSP_*``) and resource
(``OTEL_SERVICE_NAME``, default ``tagrouter-gateway``; ``OTEL_RESOURCE_ATTRIBUTES``) are read by
the SDK itself. When off, ``opentelemetry`` is never imported.

Spans follow the GenAI semantic conventions: the request span (kind SERVER) is named
``"{gen_ai.operation.name} {gen_ai.request.model}"`` (``chat tagrouter``) and carries
``gen_ai.operation.name``, ``gen_ai.request.model`` (the model the client asked for),
``gen_ai.response.model`` (the upstream model that answered) and ``gen_ai.usage.input_tokens`` /
``output_tokens``, with the routing decision as ``tagrouter.*`` attributes (decision id, reason,
tags, Delta_q, theta, the routed model, the candidates filtered out and why, the key id, the
cost). Each upstream attempt is a CLIENT child span ``"{operation} {upstream model}"`` with
``tagrouter.backend``, ``server.address``/``server.port`` and, when it failed, ``error.type``
(the fault kind: timeout, connect, reset, status, malformed, too_large). A stream's request
span and its answering attempt end when the stream does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tagrouter_fast.serve.config import ConfigError

if TYPE_CHECKING:
    from tagrouter_fast.serve.forward.backends import Backend
    from tagrouter_fast.serve.policy.routing import Routed
    from tagrouter_fast.serve.shadow.spend import Charge

__all__ = ["NO_SPAN", "RequestSpan", "Tracing", "tracing_from_env"]

_SCOPE = "tagrouter_fast.serve"


def _exporters(env: Mapping[str, str]) -> list[str]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = env.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    return [n.strip().lower() for n in names.split(",") if n.strip().lower() not in ("", "none")]


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError("OTEL_TRACES_EXPORTER", f"unsupported exporter {name!r} (the gateway "
                          "knows otlp, console and none)")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[no-redef]
                OTLPSpanExporter,
            )
    except ImportError:
        pkg = "grpc" if protocol == "grpc" else "http"
        raise ConfigError("OTEL_TRACES_EXPORTER", f"otlp over {protocol} needs "
                          f"opentelemetry-exporter-otlp-proto-{pkg}: pip install "
                          f"opentelemetry-exporter-otlp-proto-{pkg}") from None
    return OTLPSpanExporter()


def tracing_from_env(env: Mapping[str, str] | None = None) -> Tracing | None:
    """The gateway's tracing as the ``OTEL_*`` variables configure it; None when off.

    Raises:
        ConfigError: tracing asked for without the ``otel`` extra, or an exporter it lacks.
    """
    env = os.environ if env is None else env
    names = _exporters(env)
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError("OTEL_TRACES_EXPORTER", "tracing needs the OpenTelemetry SDK: pip "
                          "install 'tagrouter-fast[otel]'") from None
    # The SDK reads the resource variables from os.environ; ``env`` (a test's) is honoured
    # for the service name, which OTEL_SERVICE_NAME sets ahead of OTEL_RESOURCE_ATTRIBUTES.
    attrs: dict[str, str] = {}
    if env.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = env["OTEL_SERVICE_NAME"]
    elif "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs["service.name"] = "tagrouter-gateway"
    provider = TracerProvider(resource=Resource.create(attrs))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    return Tracing(provider)


class Tracing:
    """Spans of one gateway on ``provider`` (an SDK ``TracerProvider``; tests pass one with
    an ``InMemorySpanExporter``)."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(_SCOPE)

    def request(self, operation: str, request_model: str, key_id: str) -> RequestSpan:
        """Starts the span of one request."""
        from opentelemetry.trace import SpanKind

        span = self.tracer.start_span(
            f"{operation} {request_model}", kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation,
                        "gen_ai.request.model": request_model, "tagrouter.key.id": key_id},
        )
        return RequestSpan(self, span, operation)

    def close(self) -> None:
        """Flushes and stops the exporters."""
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _fail(span: Any, error: BaseException, kind: str | None = None) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", kind or type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, str(error)[:300]))


class AttemptSpan:
    """One upstream attempt (`forward.forwarder.AttemptTrace`)."""

    def __init__(self, owner: RequestSpan, span: Any, keep_open: bool) -> None:
        self._owner = owner
        self._span = span
        self._keep_open = keep_open

    def failed(self, error: BaseException) -> None:
        _fail(self._span, error, getattr(error, "kind", None))
        self._span.end()

    def done(self, status: int) -> None:
        self._span.set_attribute("http.response.status_code", status)
        if self._keep_open and status == 200:  # a stream: the call lasts until it ends
            self._owner._open.append(self._span)
        else:
            self._span.end()


class RequestSpan:
    """The span of one request; `NO_SPAN` when tracing is off (every method a no-op)."""

    def __init__(self, tracing: Tracing | None, span: Any, operation: str) -> None:
        self._tracing = tracing
        self.span = span
        self._operation = operation
        self._open: list[Any] = []
        self._ended = False

    def attempt(self, backend: Backend, *, stream: bool = False) -> AttemptSpan | None:
        """A child span for a call to ``backend`` (``stream``: kept open until `end`)."""
        if self._tracing is None:
            return None
        from opentelemetry.trace import SpanKind, set_span_in_context

        parts = urlsplit(backend.config.base_url)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": self._operation, "gen_ai.request.model": backend.model,
            "tagrouter.backend": backend.name, "server.address": parts.hostname or "",
        }
        if parts.port is not None:
            attrs["server.port"] = parts.port
        span = self._tracing.tracer.start_span(
            f"{self._operation} {backend.model}", kind=SpanKind.CLIENT,
            context=set_span_in_context(self.span), attributes=attrs,
        )
        return AttemptSpan(self, span, stream)

    def routed(self, routed: Routed) -> None:
        """The routing decision as attributes."""
        if self._tracing is None:
            return
        s = self.span
        s.set_attribute("tagrouter.decision.reason", routed.reason)
        s.set_attribute("tagrouter.decision.tags", list(routed.tags))
        if routed.chain:
            s.set_attribute("tagrouter.decision.model", routed.chain[0].name)
        d = routed.decision
        if d is not None:
            s.set_attribute("tagrouter.decision.delta", float(d.delta))
            s.set_attribute("tagrouter.decision.theta", float(d.theta))
        if routed.filtered:
            s.set_attribute("tagrouter.candidates.filtered",
                            [f"{m}: {why}" for m, why in sorted(routed.filtered.items())])

    def answered(self, backend: Backend, decision_id: str, attempts: Sequence[str]) -> None:
        if self._tracing is None:
            return
        s = self.span
        s.set_attribute("gen_ai.response.model", backend.model)
        s.set_attribute("tagrouter.backend", backend.name)
        s.set_attribute("tagrouter.decision.id", decision_id)
        if len(attempts) > 1:
            s.set_attribute("tagrouter.attempts", list(attempts))

    def charged(self, charge: Charge | None, priced: bool) -> None:
        if self._tracing is None or charge is None:
            return
        s = self.span
        s.set_attribute("gen_ai.usage.input_tokens", charge.tokens_in)
        s.set_attribute("gen_ai.usage.output_tokens", charge.tokens_out)
        s.set_attribute("tagrouter.usage.estimated", charge.estimated)
        if priced:
            s.set_attribute("tagrouter.cost.usd", charge.usd)

    def failed(self, error: BaseException, status: int | None = None) -> None:
        """The request failed (an `ApiError`, no backend answered, a cut stream)."""
        if self._tracing is None:
            return
        if status is not None:
            self.span.set_attribute("http.response.status_code", status)
        _fail(self.span, error, getattr(error, "code", None) or None)

    def end(self) -> None:
        """Ends the request span and a stream's attempt span. Idempotent."""
        if self._tracing is None or self._ended:
            return
        self._ended = True
        for span in self._open:
            span.end()
        self.span.end()


#: The span of a request when tracing is off.
NO_SPAN = RequestSpan(None, None, "")
