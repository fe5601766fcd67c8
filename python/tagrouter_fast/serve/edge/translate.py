"""Between a client's protocol and a backend's: the body each backend gets, and the backend's
answer, stream or error in the client's protocol.

A backend that speaks the client's own protocol (`ClientProtocol.native`: OpenAI chat ->
``openai``, Anthropic Messages -> ``anthropic``) gets the client's body as sent, but for
``model``, and its answer goes back as it came. Any other pairing goes through the internal
request (`edge.wire`): ``to_upstream`` of the backend's protocol, then its answer parsed and
rendered in the client's protocol (a stream event by event). The Responses API has no native
backend: it is always translated. What cannot be translated is a 400 naming the field
(`edge.wire.Untranslatable`); an answer that cannot be read is a 502.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import JSONResponse

from tagrouter_fast.serve.edge import anthropic_messages as anthropic
from tagrouter_fast.serve.edge import openai_chat, openai_responses
from tagrouter_fast.serve.edge.errors import ApiError, openai_error_event
from tagrouter_fast.serve.edge.fields import dumps
from tagrouter_fast.serve.edge.sse import encode
from tagrouter_fast.serve.edge.wire import (
    BlockStop,
    Event,
    ProtocolError,
    Request,
    Response,
    StreamCollector,
    Untranslatable,
)
from tagrouter_fast.serve.forward.backends import Backend
from tagrouter_fast.serve.forward.faults import ClientError
from tagrouter_fast.serve.forward.forwarder import Forwarder, OpenStream
from tagrouter_fast.serve.policy.capabilities import Needs

__all__ = [
    "CHAT", "MESSAGES", "RESPONSES", "ClientProtocol", "api_error", "error_event",
    "error_response", "loose_chat_needs", "parse_answer", "render_answer", "stream_renderer",
    "translate_stream", "upstream_error_message", "upstream_payload",
]


class _Renderer(Protocol):
    def render(self, e: Event) -> bytes: ...


class _Parser(Protocol):
    def feed(self, chunk: bytes) -> list[Event]: ...

    def close(self) -> list[Event]: ...


@dataclass(frozen=True)
class ClientProtocol:
    """A protocol clients speak: its wire name, the backend protocol that takes its bodies as
    sent (None: none does), its parser, and the path its requests come in on."""

    name: str
    native: str | None
    parse: Callable[..., Request]
    path: str


CHAT = ClientProtocol(openai_chat.PROTOCOL, "openai", openai_chat.parse_request,
                      "/v1/chat/completions")
RESPONSES = ClientProtocol(openai_responses.PROTOCOL, None, openai_responses.parse_request,
                           "/v1/responses")
MESSAGES = ClientProtocol(anthropic.PROTOCOL, "anthropic", anthropic.parse_request,
                          "/v1/messages")


# ==== Errors in the client's protocol ====


def api_error(err: ProtocolError) -> ApiError:
    """A `ProtocolError` as the gateway's `ApiError` (OpenAI's shape), field and status kept."""
    return ApiError(err.status, err.message, param=err.field,
                    kind="invalid_request_error" if err.status < 500 else "upstream_error",
                    code="untranslatable" if isinstance(err, Untranslatable) else None)


def error_response(proto: ClientProtocol, e: ApiError) -> JSONResponse:
    """``e`` in ``proto``'s error shape (Anthropic's for Messages, else OpenAI's)."""
    if proto is MESSAGES:
        return JSONResponse(anthropic.error_for(e.status, e.message), status_code=e.status,
                            headers=e.headers)
    return e.response()


def error_event(proto: ClientProtocol, error: ClientError, renderer: Any = None) -> bytes:
    """The event that ends a stream which failed after its first bytes, in ``proto``'s form:
    chat's ``data: {"error": ...}``, Messages' ``error`` event, Responses' ``error`` event
    (numbered after ``renderer``'s last event)."""
    if proto is MESSAGES:
        return anthropic.error_event(error.status, error.message)
    if proto is RESPONSES:
        # A Responses stream starts with response.created, even one that fails at once.
        head = b"" if renderer is None or getattr(renderer, "_seq", None) else \
            renderer.render(BlockStop(-1))  # a stop of no block: the stream's head alone
        seq = getattr(renderer, "_seq", 0)  # the renderer numbers every event it wrote
        return head + encode(dumps({"type": "error", "code": error.code,
                                    "message": error.message, "param": None,
                                    "sequence_number": seq}), "error")
    return openai_error_event(error)


# ==== Client -> backend ====


def loose_chat_needs(body: Mapping[str, Any]) -> Needs:
    """The needs of a chat body the strict parser refused (it still goes as sent to an OpenAI
    backend, as before protocols were parsed): tools, images and structured output by a plain
    look at the body, and its messages' JSON length / 4 as the input tokens (an overcount)."""
    msgs = body.get("messages")
    features = set()
    if body.get("tools") or body.get("functions"):
        features.add("tools")
    if isinstance(body.get("response_format"), dict) and \
            body["response_format"].get("type") in ("json_object", "json_schema"):
        features.add("json_schema")
    for m in msgs if isinstance(msgs, list) else ():
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool" or m.get("tool_calls"):
            features.add("tools")
        content = m.get("content")
        if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            features.add("vision")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Needs(frozenset(features), math.ceil(len(dumps(msgs)) / 4),
                 max_tokens if isinstance(max_tokens, int) else None)


def upstream_payload(proto: ClientProtocol, req: Request, body: dict[str, Any],
                     backend: Backend) -> bytes:
    """The body ``backend`` gets for the client's request (``body`` as parsed, ``req`` its
    internal form).

    Raises:
        Untranslatable: a field the backend's protocol cannot carry (400 naming it).
    """
    if backend.protocol == proto.native:
        out: dict[str, Any] = {**body, "model": backend.model}
    elif backend.protocol == "anthropic":
        cap = backend.config.max_output_tokens
        default = anthropic.DEFAULT_MAX_TOKENS if cap is None else \
            min(cap, anthropic.DEFAULT_MAX_TOKENS)
        out = anthropic.to_upstream(req, backend.model, default_max_tokens=default)
    else:
        out = openai_chat.to_upstream(req, backend.model)
    try:
        return json.dumps(out, separators=(",", ":")).encode()
    except RecursionError:
        # Parsed a few frames up the stack, encoded deeper: a body just under the parser's
        # limit can be over the encoder's.
        raise ProtocolError(400, "body", "nested too deeply") from None


# ==== Backend -> client ====


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def parse_answer(backend: Backend, raw: bytes) -> Response:
    """A backend's complete answer in internal form.

    Raises:
        ProtocolError: 502, the answer is not one the internal model carries.
    """
    body = _json(raw)
    if not isinstance(body, dict):
        raise ProtocolError(502, "body", "the backend's answer is not a JSON object")
    if backend.protocol == "anthropic":
        return anthropic.parse_response(body)
    return openai_chat.parse_response(body)


def upstream_error_message(backend: Backend, raw: bytes) -> str:
    """The message of a backend's error answer (its own error shape), or its text."""
    body = _json(raw)
    if body is None:
        return raw[:500].decode("utf-8", "replace")
    if backend.protocol == "anthropic":
        return anthropic.error_message(body)
    return openai_chat.error_message(body)


def render_answer(proto: ClientProtocol, resp: Response, req: Request, *, model: str,
                  response_id: str | None) -> dict[str, Any]:
    """The client's answer body (``model``: the model that answered)."""
    if proto is MESSAGES:
        return anthropic.render_response(resp, model=model)
    if proto is RESPONSES:
        assert response_id is not None
        return openai_responses.render_response(resp, id=response_id, req=req, model=model)
    return openai_chat.render_response(resp, model=model)


def stream_renderer(proto: ClientProtocol, req: Request, *, model: str,
                    response_id: str | None) -> _Renderer:
    if proto is MESSAGES:
        return anthropic.StreamRenderer(model=model, input_tokens=req.input_tokens)
    if proto is RESPONSES:
        assert response_id is not None
        return openai_responses.StreamRenderer(id=response_id, model=model, req=req)
    return openai_chat.StreamRenderer(model=model, include_usage=req.stream_usage)


def stream_parser(backend: Backend) -> _Parser:
    if backend.protocol == "anthropic":
        return anthropic.StreamParser()
    return openai_chat.StreamParser()


async def translate_stream(
    forwarder: Forwarder, stream: OpenStream, proto: ClientProtocol, renderer: _Renderer,
    on_done: Callable[[Response], None] | None = None, collect: StreamCollector | None = None,
) -> AsyncIterator[bytes]:
    """A backend's stream, event by event, as ``proto``'s stream; ``collect`` gathers the
    answer as it goes, ``on_done`` gets it whole once it finished. A backend failing midway, or
    sending what cannot be translated, ends the stream with ``proto``'s error event."""
    parser = stream_parser(stream.backend)
    collect = collect if collect is not None else StreamCollector()
    failed: list[ClientError] = []

    def note(error: ClientError) -> bytes:
        failed.append(error)
        return b""

    def render(events: list[Event]) -> bytes:
        out = b""
        for e in events:
            collect.add(e)
            out += renderer.render(e)
        return out

    relay = forwarder.relay(stream, note)
    try:
        async for chunk in relay:
            if chunk:
                out = render(parser.feed(chunk))
                if out:
                    yield out
        if failed:
            yield error_event(proto, failed[0], renderer)
            return
        yield render(parser.close())
    except ProtocolError as e:
        yield error_event(proto, ClientError(502, "upstream_malformed",
                                             f"backend {stream.backend.name}: {e.message}"),
                          renderer)
        return
    finally:
        aclose = getattr(relay, "aclose", None)  # an async generator: closes its upstream
        if aclose is not None:
            await aclose()
    if on_done is not None:
        on_done(collect.response())
