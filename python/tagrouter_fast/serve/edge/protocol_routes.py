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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tagrouter_fast.serve.edge import openai_responses
from tagrouter_fast.serve.edge.auth import authenticate, check_override
from tagrouter_fast.serve.edge.bodies import read_json, route_options
from tagrouter_fast.serve.edge.completions import Relay, decision_headers
from tagrouter_fast.serve.edge.conversations import ResponseStore
from tagrouter_fast.serve.edge.errors import ApiError, upstream_error
from tagrouter_fast.serve.edge.translate import (
    MESSAGES,
    RESPONSES,
    ClientProtocol,
    api_error,
    error_event,
    error_response,
    parse_answer,
    render_answer,
    stream_renderer,
    translate_stream,
    upstream_error_message,
    upstream_payload,
)
from tagrouter_fast.serve.edge.wire import ProtocolError, Untranslatable
from tagrouter_fast.serve.edge.wire import Request as WireRequest
from tagrouter_fast.serve.edge.wire import Response as WireResponse
from tagrouter_fast.serve.forward.backends import Backend
from tagrouter_fast.serve.forward.faults import AllBackendsFailed, client_error
from tagrouter_fast.serve.forward.forwarder import Answer, OpenStream
from tagrouter_fast.serve.learn.keys import ROUTE, ClientKey
from tagrouter_fast.serve.policy.capabilities import needs_of
from tagrouter_fast.serve.policy.routing import Routed

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
    try:
        return await _conversation(gw, request, proto, store)
    except ProtocolError as e:
        return error_response(proto, api_error(e))
    except ApiError as e:
        return error_response(proto, e)


async def _conversation(gw: Gateway, request: Request, proto: ClientProtocol,
                        store: ResponseStore | None) -> Response:
    key = authenticate(gw, request, ROUTE, f"POST {proto.path}")
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
    on_done = None
    if store is not None and response_id is not None and body.get("store") is not False:
        rid = response_id
        chained = session is None or session.startswith(_CHAINED)

        def on_done(resp: WireResponse, answered: str) -> None:
            store.put(rid, key.id, openai_responses.conversation(req, resp))
            if chained:  # the next turn names this response: its session is this id
                gw.sessions.put(_CHAINED + rid, answered, routed.tags, routed.used)

    return await forward(gw, request, proto, req, body, routed, key, response_id=response_id,
                         on_done=on_done)


async def forward(
    gw: Gateway, request: Request, proto: ClientProtocol, req: WireRequest,
    body: dict[str, Any], routed: Routed, key: ClientKey, *, response_id: str | None = None,
    on_done: Callable[[WireResponse, str], None] | None = None,
) -> Response:
    """Sends a routed conversation request down its fallback chain and answers in ``proto``.

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
    opened: OpenStream | Answer
    try:
        if req.stream:
            opened, errors = await forwarder.open_stream_chain(
                chain, Backend.chat_path, lambda b: payloads[b.name])
        else:
            opened, errors = await forwarder.complete_chain(
                chain, Backend.chat_path, lambda b: payloads[b.name])
    except AllBackendsFailed as e:
        raise upstream_error(client_error(e), {"x-tagrouter-decision-id": decision_id,
                                               "x-tagrouter-reason": routed.reason}) from None
    backend = opened.backend
    answered = backend.name
    native = backend.protocol == proto.native
    if isinstance(opened, Answer):
        if opened.status != 200:
            # The client's own error, as the backend said it.
            headers = decision_headers(request, decision_id, routed, answered, errors)
            if native:
                return Response(opened.body, status_code=opened.status, headers=headers,
                                media_type=opened.content_type)
            raise ApiError(opened.status, upstream_error_message(backend, opened.body),
                           headers=headers)
        resp = None if native else parse_answer(backend, opened.body)
        decision_id = gw.answered(decision_id, routed, answered, errors, key)
        headers = decision_headers(request, decision_id, routed, answered, errors)
        if resp is None:
            return Response(opened.body, headers=headers, media_type=opened.content_type)
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
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    if native:
        content = forwarder.relay(opened, lambda e: error_event(proto, e))
    else:
        renderer = stream_renderer(proto, req, model=backend.model, response_id=response_id)
        done = None if on_done is None else (lambda r: on_done(r, answered))
        content = translate_stream(forwarder, opened, proto, renderer, done)
    return Relay(content, opened, headers=headers, media_type="text/event-stream")
