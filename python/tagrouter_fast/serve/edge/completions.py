"""``POST /v1/chat/completions`` and ``POST /v1/completions``: the OpenAI paths, from the body
read to the answer relayed.

edge (read and check the body, the caller's key and operating point) -> policy
(`Gateway.route_request`: the backends to try) -> forward (`Forwarder`: the fallback chain, a
stream opened up to its first event) -> edge (the answer as it came, with the ``x-tagrouter-*``
headers; a stream relayed event by event). The body goes upstream as the client sent it, but
for ``model`` (the chosen backend's) and ``tagrouter`` (ours, never sent); a chat request whose
chain holds an Anthropic backend is translated instead (`protocol_routes.forward`).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tagrouter_fast.core import finite_for_json
from tagrouter_fast.serve.edge.auth import authenticate, check_override
from tagrouter_fast.serve.edge.bodies import chat_turn, prompt_text, read_json, route_options
from tagrouter_fast.serve.edge.errors import bad, openai_error_event, too_deep, upstream_error
from tagrouter_fast.serve.edge.middleware import LOG_FIELDS
from tagrouter_fast.serve.edge.openai_usage import (
    StreamMeter,
    answer_chars,
    ask_for_usage,
    prompt_chars,
)
from tagrouter_fast.serve.edge.translate import CHAT, api_error, loose_chat_needs
from tagrouter_fast.serve.edge.wire import ProtocolError
from tagrouter_fast.serve.forward.backends import Backend
from tagrouter_fast.serve.forward.faults import AllBackendsFailed, client_error
from tagrouter_fast.serve.forward.forwarder import Answer, OpenStream
from tagrouter_fast.serve.learn.keys import ROUTE, ClientKey
from tagrouter_fast.serve.policy.capabilities import Needs, needs_of
from tagrouter_fast.serve.policy.routing import Routed
from tagrouter_fast.serve.policy.spending import cost_headers
from tagrouter_fast.serve.telemetry import NO_SPAN, AttemptSpan, RequestSpan

if TYPE_CHECKING:
    from tagrouter_fast.serve.policy.gateway import Gateway
    from tagrouter_fast.serve.shadow.spend import Charge

__all__ = ["completion", "cost_log_fields", "decision_headers"]


def session_key(request: Request, body: dict[str, Any]) -> str | None:
    """A conversation's key: the ``x-session-id`` header, else the body's ``user``."""
    key = request.headers.get("x-session-id")
    if key is None:
        user = body.get("user")
        key = user if isinstance(user, str) and user else None
    return key


def decision_headers(
    request: Request, decision_id: str, routed: Routed, answered: str, errors: Sequence[Any],
) -> dict[str, str]:
    """The ``x-tagrouter-*`` headers of an answer: the model that answered, the decision id,
    why (or ``failover`` and the attempts), and on ``x-tagrouter-explain`` the explanation."""
    h = {
        "x-tagrouter-model": answered,
        "x-tagrouter-decision-id": decision_id,
        "x-tagrouter-reason": "failover" if errors else routed.reason,
    }
    if errors:
        h["x-tagrouter-attempts"] = ",".join([e.backend for e in errors] + [answered])
    if routed.decision is not None and request.headers.get("x-tagrouter-explain", "") in (
        "1", "true", "yes"
    ):
        d = routed.decision
        # Compact and ASCII (header values are latin-1): tags, per-model scores, Delta_q
        # and each tag's contribution per model.
        h["x-tagrouter-explanation"] = json.dumps(
            finite_for_json({
                "model": d.model, "reason": d.reason, "tags": routed.tags,
                "scores": d.scores, "delta": d.delta, "theta": d.theta,
                "contributions": d.contributions,
            }),
            separators=(",", ":"), ensure_ascii=True,
        )
    return h


async def completion(gw: Gateway, request: Request, *, chat: bool) -> Response:
    key = authenticate(gw, request, ROUTE, f"POST /v1/{'chat/' if chat else ''}completions")
    body = await read_json(request, gw.config.limits.max_body_bytes)
    if chat:
        text, messages = chat_turn(body)
    else:
        text, messages = prompt_text(body), None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be a boolean")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", "missing" if model is None else "must be a string")
    span = NO_SPAN if gw.tracing is None else \
        gw.tracing.request("chat" if chat else "text_completion", model, key.id)
    try:
        return await _forward(gw, request, key, body, text, messages, model, stream, chat,
                              span)
    except BaseException as e:
        span.failed(e, getattr(e, "status", None))
        span.end()
        raise


async def _forward(
    gw: Gateway, request: Request, key: ClientKey, body: dict[str, Any], text: str,
    messages: list[dict[str, Any]] | None, model: str, stream: bool, chat: bool,
    span: RequestSpan,
) -> Response:
    theta, share = route_options(body, request)
    check_override(gw, key, theta, share)
    session = session_key(request, body)
    req = refused = None
    if chat:
        # Parsed for what it needs of a backend (and its translation, should the routed
        # backend speak Anthropic Messages); an OpenAI backend still gets the body as sent,
        # even one the strict parser refuses (read loosely for its needs, then).
        try:
            req = CHAT.parse(body, session_id=session)
            needs = needs_of(req)
        except ProtocolError as e:
            refused, needs = e, loose_chat_needs(body)
    else:
        max_tokens = body.get("max_tokens")
        needs = Needs(frozenset({"completions"}), math.ceil(len(text) / 4),
                      max_tokens if isinstance(max_tokens, int) else None)
    routed = await gw.route_request(model, text, messages, key, theta=theta, share=share,
                                    session=session, needs=needs)
    shadow, plan = gw.shadow, None
    if shadow is not None and routed.decision is not None:
        routed, plan = shadow.steer(routed, stream=stream)  # who answers in the current mode
    span.routed(routed)
    if chat and any(b.protocol != "openai" for b in routed.chain):
        # Imported here: protocol_routes builds on this module's Relay and headers.
        from tagrouter_fast.serve.edge.protocol_routes import forward

        if req is None:  # to be translated, it must parse
            assert refused is not None
            raise api_error(refused)
        try:
            return await forward(gw, request, CHAT, req, body, routed, key, span=span)
        except ProtocolError as e:
            raise api_error(e) from None
    # A plain id until the answer is in: only an answered decision gets a token to score.
    decision_id = request_id = uuid.uuid4().hex
    path = "/chat/completions" if chat else "/completions"
    spending = gw.spending
    # Charged on the usage the backend reports: a stream reports it only when asked.
    strip_usage = stream and spending.enabled and ask_for_usage(body)

    def payload_for(b: Backend) -> bytes:
        body["model"] = b.model
        try:
            return json.dumps(body, separators=(",", ":")).encode()
        except RecursionError:
            # Parsed a few frames up the stack, encoded deeper: a body just under the
            # parser's limit can be over the encoder's.
            raise too_deep() from None

    def trace(b: Backend) -> AttemptSpan | None:
        return span.attempt(b, stream=stream)

    forwarder = gw.forwarder
    assert forwarder is not None
    opened: OpenStream | Answer
    tracing = trace if gw.tracing is not None else None
    try:
        if stream:
            opened, errors = await forwarder.open_stream_chain(routed.chain, path, payload_for,
                                                               tracing)
        else:
            opened, errors = await forwarder.complete_chain(routed.chain, path, payload_for,
                                                            tracing)
    except AllBackendsFailed as e:
        raise upstream_error(client_error(e), {"x-tagrouter-decision-id": decision_id,
                                               "x-tagrouter-reason": routed.reason}) from None
    backend = opened.backend
    answered = backend.name
    attempts = [e.backend for e in errors] + [answered]
    log_fields = request.scope.get(LOG_FIELDS)
    if isinstance(opened, Answer):
        charged: dict[str, str] = {}
        if opened.status == 200:
            decision_id = gw.answered(decision_id, routed, answered, errors, key)
            parsed = opened.parsed or {}
            charge = spending.charge(key, backend, parsed.get("usage"), prompt_chars(body),
                                     answer_chars(parsed))
            charged = cost_headers(charge, backend.config.price is not None)
            span.charged(charge, backend.config.price is not None)
            if log_fields is not None and charge is not None:
                log_fields.update(cost_log_fields(charge, backend))
        span.answered(backend, decision_id, attempts)
        if opened.status != 200:
            span.failed(RuntimeError(f"backend answered HTTP {opened.status}"), opened.status)
        span.end()
        headers = decision_headers(request, decision_id, routed, answered, errors)
        headers.update(charged)
        # Recorded (and shadowed) once the client has the answer, never before.
        after = shadow.after(request_id, text, body, routed, answered, opened.body, plan) \
            if shadow is not None and opened.status == 200 else None
        return Response(opened.body, status_code=opened.status, headers=headers,
                        media_type=opened.content_type, background=after)
    try:
        decision_id = gw.answered(decision_id, routed, answered, errors, key)
        headers = decision_headers(request, decision_id, routed, answered, errors)
    except BaseException:
        # Nothing will relay this stream: its connection goes back now.
        with anyio.CancelScope(shield=True):
            await opened.close()
        raise
    span.answered(backend, decision_id, attempts)
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"  # proxies in front must not buffer the stream
    events = forwarder.relay(opened, openai_error_event)
    # Shadow mode judges a streamed answer too: its text is collected as it passes.
    shadowed = shadow is not None and routed.decision is not None and chat
    if spending.enabled or gw.tracing is not None or shadowed:
        meter = StreamMeter(strip=strip_usage, collect=shadowed)
        events = _metered(events, meter, gw, key, backend, prompt_chars(body), span, log_fields)
        if shadowed:
            assert shadow is not None
            query = text

            def record(answer: str | None) -> None:
                shadow.after_stream(request_id, query, body, routed, answered, answer,
                                    meter.usage, plan)

            events = _shadowed(events, meter, record)
    return Relay(events, opened, headers=headers, media_type="text/event-stream")


def cost_log_fields(charge: Charge, backend: Backend) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens_in": charge.tokens_in, "tokens_out": charge.tokens_out}
    if backend.config.price is not None:
        out["cost_usd"] = round(charge.usd, 8)
    if charge.estimated:
        out["cost_estimated"] = True
    return out


async def _metered(
    events: AsyncIterator[bytes], meter: StreamMeter, gw: Gateway, key: ClientKey,
    backend: Backend, prompt: int, span: RequestSpan, log_fields: dict[str, Any] | None,
) -> AsyncIterator[bytes]:
    """The relayed stream through ``meter``; charged, logged and its span ended however it
    ends (a client that leaves midway is charged for what was streamed, estimated when the
    usage chunk never came)."""
    try:
        async for block in events:
            out = meter.feed(block)
            if out:
                yield out
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()
        charge = gw.spending.charge(key, backend, meter.usage, prompt, meter.answer_chars)
        if charge is not None and log_fields is not None:
            log_fields.update(cost_log_fields(charge, backend))
        span.charged(charge, backend.config.price is not None)
        span.end()


async def _shadowed(events: AsyncIterator[bytes], meter: StreamMeter,
                    record: Callable[[str | None], None]) -> AsyncIterator[bytes]:
    """The relayed stream, then its record for shadow mode however it ends: the collected text
    when the stream finished (``[DONE]``), None (the decision only) when it did not."""
    try:
        async for block in events:
            yield block
    finally:
        record(meter.text if meter.done else None)


class Relay(StreamingResponse):
    """A streaming response that closes its upstream however it ends: finished, failed, or
    cancelled because the client went away (which is what cancels the backend's work)."""

    def __init__(self, content: AsyncIterator[bytes], stream: OpenStream, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._upstream = stream
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._upstream.close()
