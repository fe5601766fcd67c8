"""``POST /v1/messages`` (Anthropic Messages) and ``POST /v1/responses`` (OpenAI Responses),
and the forwarding every conversation protocol shares once it is routed (`forward`: chat
completions come here too when a backend of their chain speaks another protocol).

edge (the caller's key: a bearer token, or Anthropic's ``x-api-key``; the body parsed into the
internal request, `edge.wire`; a Responses ``previous_response_id`` resolved from the
`ResponseStore`) -> policy (`Gateway.route_request` with the request's needs and whether it is
mid tool-call loop) -> forward (each backend's body in its own protocol, `translate`) -> edge
(the answer in the client's protocol, the ``x-tagrouter-*`` headers; a Responses answer kept
for the next turn). Every error answers in the client's protocol's shape.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tagrouter_fast.serve.edge import openai_responses
from tagrouter_fast.serve.edge.auth import authenticate, check_override
from tagrouter_fast.serve.edge.bodies import read_json, route_options
from tagrouter_fast.serve.edge.completions import Relay, cost_log_fields, decision_headers
from tagrouter_fast.serve.edge.conversations import ResponseStore
from tagrouter_fast.serve.edge.errors import ApiError, upstream_error
from tagrouter_fast.serve.edge.middleware import LOG_FIELDS
from tagrouter_fast.serve.edge.translate import (
    MESSAGES,
    RESPONSES,
    ClientProtocol,
    api_error,
    error_event,
    error_response,
    parse_answer,
    render_answer,
    stream_parser,
    stream_renderer,
    translate_stream,
    upstream_error_message,
    upstream_payload,
)
from tagrouter_fast.serve.edge.wire import ProtocolError, StreamCollector, Untranslatable
from tagrouter_fast.serve.edge.wire import Request as WireRequest
from tagrouter_fast.serve.edge.wire import Response as WireResponse
from tagrouter_fast.serve.forward.backends import Backend
from tagrouter_fast.serve.forward.faults import AllBackendsFailed, client_error
from tagrouter_fast.serve.forward.forwarder import Answer, OpenStream
from tagrouter_fast.serve.learn.keys import ROUTE, ClientKey
from tagrouter_fast.serve.policy.capabilities import needs_of
from tagrouter_fast.serve.policy.routing import Routed
from tagrouter_fast.serve.policy.spending import cost_headers
from tagrouter_fast.serve.shadow.spend import CHARS_PER_TOKEN
from tagrouter_fast.serve.telemetry import NO_SPAN, RequestSpan

if TYPE_CHECKING:
    from tagrouter_fast.serve.policy.gateway import Gateway

__all__ = ["count_tokens_endpoint", "forward", "messages_endpoint", "responses_endpoint"]

#: Session keys of Responses conversations chained by previous_response_id (no session key of
#: their own): the response id, so that a tool-call loop stays on its model.
_CHAINED = "response:"

Endpoint = Callable[[Request], Any]


def messages_endpoint(gw: Gateway) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await _serve(gw, request, MESSAGES, None)

    return endpoint


def count_tokens_endpoint(gw: Gateway) -> Endpoint:
    """``POST /v1/messages/count_tokens`` (coding agents call it to size their context): the
    gateway's estimate of a Messages body's input tokens (`edge.wire.Request.input_tokens`),
    the count the context check uses for a backend without a tokenizer."""
    async def endpoint(request: Request) -> Response:
        try:
            authenticate(gw, request, ROUTE, "POST /v1/messages/count_tokens")
            body = await read_json(request, gw.config.limits.max_body_bytes)
            # The count takes no max_tokens; the parser of a Messages body requires one.
            req = MESSAGES.parse({"max_tokens": 1, **body})
        except ProtocolError as e:
            return error_response(MESSAGES, api_error(e))
        except ApiError as e:
            return error_response(MESSAGES, e)
        return JSONResponse({"input_tokens": req.input_tokens})

    return endpoint


def responses_endpoint(gw: Gateway, store: ResponseStore) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await _serve(gw, request, RESPONSES, store)

    return endpoint


async def _serve(gw: Gateway, request: Request, proto: ClientProtocol,
                 store: ResponseStore | None) -> Response:
    span = NO_SPAN
    try:
        key = authenticate(gw, request, ROUTE, f"POST {proto.path}")
        if gw.tracing is not None:
            span = gw.tracing.request("chat", "", key.id)
        return await _conversation(gw, request, proto, store, key, span)
    except (ProtocolError, ApiError) as e:
        err = api_error(e) if isinstance(e, ProtocolError) else e
        span.failed(err, err.status)
        span.end()
        return error_response(proto, err)
    except BaseException as e:
        span.failed(e)
        span.end()
        raise


async def _conversation(gw: Gateway, request: Request, proto: ClientProtocol,
                        store: ResponseStore | None, key: ClientKey, span: RequestSpan
                        ) -> Response:
    body = await read_json(request, gw.config.limits.max_body_bytes)
    theta, share = route_options(body, request)  # ours: never sent upstream
    check_override(gw, key, theta, share)
    req = proto.parse(body, session_id=request.headers.get("x-session-id"))
    session = req.session_id
    response_id = None
    if store is not None:
        response_id = f"resp_{uuid.uuid4().hex}"
        prev = req.previous_response_id
        if prev is not None:
            req = openai_responses.with_history(req, store.get(prev, key.id))
            session = session or _CHAINED + prev
    routed = await gw.route_request(req.model, req.route_text, None, key, theta=theta,
                                    share=share, session=session, needs=needs_of(req),
                                    tool_loop=req.in_tool_loop)
    if gw.shadow is not None and routed.decision is not None:
        # Who answers in the current mode (the default model in shadow mode); only chat
        # completions are recorded and judged.
        routed, _ = gw.shadow.steer(routed, stream=req.stream)
    span.routed(routed)
    on_done = None
    if store is not None and response_id is not None and body.get("store") is not False:
        rid = response_id
        chained = session is None or session.startswith(_CHAINED)

        def on_done(resp: WireResponse, answered: str) -> None:
            store.put(rid, key.id, openai_responses.conversation(req, resp))
            if chained:  # the next turn names this response: its session is this id
                gw.sessions.put(_CHAINED + rid, answered, routed.tags, routed.used)

    return await forward(gw, request, proto, req, body, routed, key, response_id=response_id,
                         on_done=on_done, span=span)


async def forward(
    gw: Gateway, request: Request, proto: ClientProtocol, req: WireRequest,
    body: dict[str, Any], routed: Routed, key: ClientKey, *, response_id: str | None = None,
    on_done: Callable[[WireResponse, str], None] | None = None, span: RequestSpan = NO_SPAN,
) -> Response:
    """Sends a routed conversation request down its fallback chain and answers in ``proto``;
    the answer is charged to ``key`` at the backend that gave it (`policy.spending`) and
    traced on ``span``.

    Backends of the chain that cannot take the request in their protocol drop out of it; the
    routed one's `Untranslatable` is the client's 400 (naming the field).

    Raises:
        ProtocolError: the routed backend cannot take the request (400), or its answer cannot
            be read (502).
        ApiError: no backend answered (502 / 504).
    """
    payloads: dict[str, bytes] = {}
    chain: list[Backend] = []
    for i, b in enumerate(routed.chain):
        try:
            payloads[b.name] = upstream_payload(proto, req, body, b)
        except Untranslatable:
            if i == 0:
                raise
            continue
        chain.append(b)
    decision_id = uuid.uuid4().hex
    forwarder = gw.forwarder
    assert forwarder is not None
    trace = None if gw.tracing is None else (lambda b: span.attempt(b, stream=req.stream))
    opened: OpenStream | Answer
    try:
        if req.stream:
            opened, errors = await forwarder.open_stream_chain(
                chain, Backend.chat_path, lambda b: payloads[b.name], trace)
        else:
            opened, errors = await forwarder.complete_chain(
                chain, Backend.chat_path, lambda b: payloads[b.name], trace)
    except AllBackendsFailed as e:
        raise upstream_error(client_error(e), {"x-tagrouter-decision-id": decision_id,
                                               "x-tagrouter-reason": routed.reason}) from None
    backend = opened.backend
    answered = backend.name
    attempts = [e.backend for e in errors] + [answered]
    native = backend.protocol == proto.native
    account = _Account(gw, key, backend, req, span, request.scope.get(LOG_FIELDS))
    if isinstance(opened, Answer):
        if opened.status != 200:
            # The client's own error, as the backend said it.
            headers = decision_headers(request, decision_id, routed, answered, errors)
            span.answered(backend, decision_id, attempts)
            if native:
                span.failed(RuntimeError(f"backend answered HTTP {opened.status}"),
                            opened.status)
                span.end()
                return Response(opened.body, status_code=opened.status, headers=headers,
                                media_type=opened.content_type)
            raise ApiError(opened.status, upstream_error_message(backend, opened.body),
                           headers=headers)
        if native:
            # Relayed as it came; read only for its usage (blocks the internal model does not
            # carry, such as thinking, are the client's to read).
            usage = (opened.parsed or {}).get("usage")
            resp = None
        else:
            resp = parse_answer(backend, opened.body)
        decision_id = gw.answered(decision_id, routed, answered, errors, key)
        span.answered(backend, decision_id, attempts)
        headers = decision_headers(request, decision_id, routed, answered, errors)
        if resp is None:
            headers.update(account.charge(usage if isinstance(usage, dict) else None,
                                          len(opened.body)))
            span.end()
            return Response(opened.body, headers=headers, media_type=opened.content_type)
        headers.update(account.charge_answer(resp))
        span.end()
        if on_done is not None:
            on_done(resp, answered)
        return JSONResponse(render_answer(proto, resp, req, model=resp.model or backend.model,
                                          response_id=response_id), headers=headers)
    try:
        decision_id = gw.answered(decision_id, routed, answered, errors, key)
        headers = decision_headers(request, decision_id, routed, answered, errors)
    except BaseException:
        with anyio.CancelScope(shield=True):  # nothing will relay this stream
            await opened.close()
        raise
    span.answered(backend, decision_id, attempts)
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    collect = StreamCollector()
    if native:
        content = _tallied(forwarder.relay(opened, lambda e: error_event(proto, e)),
                           stream_parser(backend), collect)
    else:
        renderer = stream_renderer(proto, req, model=backend.model, response_id=response_id)
        done = None if on_done is None else (lambda r: on_done(r, answered))
        content = translate_stream(forwarder, opened, proto, renderer, done, collect)
    return Relay(_charged(content, account, collect), opened, headers=headers,
                 media_type="text/event-stream")


class _Account:
    """Charges an answered request to its key (`policy.spending`), on the usage the backend
    reported, else estimated from the request's and the answer's sizes; logs and traces it."""

    def __init__(self, gw: Gateway, key: ClientKey, backend: Backend, req: WireRequest,
                 span: RequestSpan, log_fields: dict[str, Any] | None) -> None:
        self.gw, self.key, self.backend, self.req = gw, key, backend, req
        self.span, self.log_fields = span, log_fields

    def charge_answer(self, resp: WireResponse, finished: bool = True) -> dict[str, str]:
        """Charges ``resp`` (``finished``: its usage is the backend's last word); returns
        the cost headers."""
        u = resp.usage if finished else None
        usage = None if u is None else {"input_tokens": u.input_tokens,
                                        "output_tokens": u.output_tokens}
        said = len(resp.text) + sum(len(c.name) + len(c.arguments) for c in resp.tool_calls)
        return self.charge(usage, said)

    def charge(self, usage: dict[str, Any] | None, answer_chars: int) -> dict[str, str]:
        """Charges the reported ``usage`` (either protocol's names), else an estimate;
        returns the cost headers."""
        b = self.backend
        charge = self.gw.spending.charge(self.key, b, usage,
                                         self.req.input_tokens * CHARS_PER_TOKEN, answer_chars)
        priced = b.config.price is not None
        self.span.charged(charge, priced)
        if charge is not None and self.log_fields is not None:
            self.log_fields.update(cost_log_fields(charge, b))
        return cost_headers(charge, priced)


async def _tallied(events: AsyncIterator[bytes], parser: Any, collect: StreamCollector
                   ) -> AsyncIterator[bytes]:
    """A relayed stream as it came, read on the side for its usage and text (a stream the
    parser cannot read is passed on all the same: then the charge is an estimate)."""
    readable = True
    try:
        async for block in events:
            if readable:
                try:
                    collect.extend(parser.feed(block))
                except ProtocolError:
                    readable = False
            yield block
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def _charged(events: AsyncIterator[bytes], account: _Account, collect: StreamCollector
                   ) -> AsyncIterator[bytes]:
    """The stream, charged and its span ended however it ends (a client that leaves midway
    is charged for what was streamed, estimated)."""
    try:
        async for block in events:
            yield block
    finally:
        aclose = getattr(events, "aclose", None)
        with anyio.CancelScope(shield=True):
            if aclose is not None:
                await aclose()
        account.charge_answer(collect.response(), finished=collect.finish is not None)
        account.span.end()
