"""Anthropic Messages answers: a backend's message and SSE stream -> the internal response and
events (`parse_response`, `StreamParser`), and back for a client (`render_response`,
`StreamRenderer`: ``message_start``, ``content_block_start``, ``content_block_delta``
(``text_delta``, ``input_json_delta``), ``content_block_stop``, ``message_delta``,
``message_stop``), plus Anthropic's error shape (``{"type": "error", "error": {"type",
"message"}}``, `error_body`).

Stop reasons: end_turn and stop_sequence <-> "stop", max_tokens (and
model_context_window_exceeded) <-> "length", tool_use <-> "tool_use", refusal <->
"content_filter". Usage: ``input_tokens`` counts the whole prompt (Anthropic's cache-read and
cache-write tokens added in), as OpenAI's ``prompt_tokens`` does.

Blocks other than text and tool_use in an answer (thinking, server tool results) come only from
fields that only an Anthropic backend serves: such answers are relayed, not translated, and
reaching these functions they are a 502 naming the block.

>>> from tagrouter_fast.serve.edge.wire import Text
>>> render_response(Response((Text("Hi"),), "stop"), id="msg_1", model="m")["stop_reason"]
'end_turn'
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from tagrouter_fast.serve.edge.fields import dumps, int_field, list_field, obj, str_field
from tagrouter_fast.serve.edge.sse import DataParser, encode
from tagrouter_fast.serve.edge.wire import (
    BlockStop,
    Event,
    Finish,
    ProtocolError,
    Response,
    StopReason,
    Text,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    Usage,
)

__all__ = [
    "PROTOCOL", "StreamParser", "StreamRenderer", "error_body", "error_for", "error_event",
    "error_message", "parse_response", "render_response",
]

PROTOCOL = "anthropic"
TO_STOP: dict[str, StopReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_use",
    "refusal": "content_filter"}
FROM_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_use": "tool_use",
             "content_filter": "refusal"}
#: Anthropic's error types by HTTP status; other 4xx are invalid requests, other 5xx api errors.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


# ==== Anthropic backend's answer -> internal ====


def _stop(reason: Any, where: str) -> StopReason:
    stop = TO_STOP.get(reason) if isinstance(reason, str) else None
    if stop is None:
        raise ProtocolError(502, where, f"unknown stop reason {reason!r}")
    return stop


def _input_tokens(u: Mapping[str, Any], where: str) -> int | None:
    """The prompt's tokens: Anthropic counts cache reads and writes apart from input_tokens."""
    n = int_field(u, "input_tokens", f"{where}.input_tokens", lo=0, status=502)
    if n is None:
        return None
    for k in ("cache_creation_input_tokens", "cache_read_input_tokens"):
        n += int_field(u, k, f"{where}.{k}", lo=0, status=502) or 0
    return n


def _tool_call(b: Mapping[str, Any], where: str) -> ToolCall:
    return ToolCall(str_field(b, "id", f"{where}.id", required=True, status=502) or "",
                    str_field(b, "name", f"{where}.name", required=True, status=502) or "",
                    dumps(obj(b.get("input", {}), f"{where}.input", 502)))


def parse_response(body: Mapping[str, Any]) -> Response:
    """The internal response of a backend's message.

    Raises:
        ProtocolError: status 502, the answer is not a message the internal model carries.
    """
    parts: list[Text | ToolCall] = []
    for i, b in enumerate(list_field(body, "content", "content", required=True, status=502)):
        at = f"content[{i}]"
        b = obj(b, at, 502)
        kind = b.get("type")
        if kind == "text":
            parts.append(Text(str_field(b, "text", f"{at}.text", required=True, status=502)
                              or ""))
        elif kind == "tool_use":
            parts.append(_tool_call(b, at))
        else:
            raise ProtocolError(502, at, f"a {kind!r} block cannot be translated")
    u = obj(body.get("usage"), "usage", 502)
    usage = Usage(_input_tokens(u, "usage") or 0,
                  int_field(u, "output_tokens", "usage.output_tokens", lo=0, status=502) or 0)
    return Response(tuple(parts), _stop(body.get("stop_reason"), "stop_reason"), usage,
                    str(body.get("model") or ""), str(body.get("id") or ""),
                    str_field(body, "stop_sequence", "stop_sequence", status=502))


class StreamParser(DataParser[Event]):
    """A backend's message stream (SSE bytes) -> internal events; `Finish` at
    ``message_stop`` with the usage of ``message_start`` and ``message_delta``."""

    def __init__(self) -> None:
        super().__init__()
        self.id = ""
        self.model = ""
        self._blocks: dict[int, int] = {}  # Anthropic's index -> ours (in order of start)
        self._input: int | None = None
        self._output = 0
        self._stop: StopReason | None = None
        self._stop_sequence: str | None = None
        self.done = False

    def close(self) -> list[Event]:
        """Events left at the stream's end. Raises ProtocolError (502) if it never finished."""
        out = self._drain()
        if not self.done:
            raise ProtocolError(502, "stream", "ended before message_stop")
        return out

    def _index(self, e: Mapping[str, Any]) -> int:
        i = e.get("index")
        if i not in self._blocks:
            raise ProtocolError(502, "stream", f"an event for block {i!r}, which never started")
        return self._blocks[i]

    def _event(self, data: str, out: list[Event]) -> None:
        if self.done:
            return
        try:
            e = obj(json.loads(data), "stream event", 502)
        except ValueError:
            raise ProtocolError(502, "stream", "an event is not JSON") from None
        kind = e.get("type")
        if kind == "content_block_delta":
            d = obj(e.get("delta"), "delta", 502)
            if d.get("type") == "text_delta":
                out.append(TextDelta(self._index(e), str(d.get("text") or "")))
            elif d.get("type") == "input_json_delta":
                if d.get("partial_json"):
                    out.append(ToolCallDelta(self._index(e), str(d["partial_json"])))
            else:
                raise ProtocolError(502, "stream", f"a {d.get('type')!r} cannot be translated")
        elif kind == "content_block_start":
            b = obj(e.get("content_block"), "content_block", 502)
            i = e.get("index")
            if not isinstance(i, int) or i in self._blocks:
                raise ProtocolError(502, "stream", f"block {i!r} started twice or unnumbered")
            n = self._blocks[i] = len(self._blocks)
            if b.get("type") == "text":
                out.append(TextDelta(n, str(b.get("text") or "")))
            elif b.get("type") == "tool_use":
                c = _tool_call({**b, "input": {}}, "content_block")
                out.append(ToolCallStart(n, c.id, c.name))
            else:
                raise ProtocolError(502, "stream", f"a {b.get('type')!r} block cannot be "
                                    "translated")
        elif kind == "content_block_stop":
            out.append(BlockStop(self._index(e)))
        elif kind == "message_start":
            m = obj(e.get("message"), "message", 502)
            self.id, self.model = str(m.get("id") or ""), str(m.get("model") or "")
            self._input = _input_tokens(obj(m.get("usage", {}), "message.usage", 502),
                                        "message.usage")
        elif kind == "message_delta":
            d = obj(e.get("delta"), "delta", 502)
            if d.get("stop_reason") is not None:
                self._stop = _stop(d["stop_reason"], "delta.stop_reason")
                self._stop_sequence = str_field(d, "stop_sequence", "delta.stop_sequence",
                                                status=502)
            u = obj(e.get("usage", {}), "usage", 502)
            self._input = _input_tokens(u, "usage") or self._input
            self._output = int_field(u, "output_tokens", "usage.output_tokens", lo=0,
                                     status=502) or self._output
        elif kind == "message_stop":
            if self._stop is None:
                raise ProtocolError(502, "stream", "message_stop before a stop_reason")
            usage = Usage(self._input or 0, self._output)
            out.append(Finish(self._stop, usage, self._stop_sequence))
            self.done = True
        elif kind == "error":
            raise ProtocolError(502, "stream", f"the backend failed: {error_message(e)}")
        # ping and event types added later carry nothing to translate


# ==== Internal -> client ====


def _new_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _tool_input(c: ToolCall) -> Any:
    try:
        value = json.loads(c.arguments) if c.arguments.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ProtocolError(502, "tool_calls", f"the arguments of tool call {c.id!r} are not a "
                            "JSON object")
    return value


def render_response(resp: Response, *, id: str | None = None, model: str | None = None
                    ) -> dict[str, Any]:
    """An Anthropic message for a client, from any backend's answer (usage 0/0 when the
    backend gave none: the field is required).

    Raises:
        ProtocolError: status 502, a tool call's arguments are not a JSON object.
    """
    content = [{"type": "text", "text": p.text} if isinstance(p, Text) else
               {"type": "tool_use", "id": p.id, "name": p.name, "input": _tool_input(p)}
               for p in resp.parts]
    u = resp.usage or Usage(0, 0)
    return {"id": id or resp.id or _new_id(), "type": "message", "role": "assistant",
            "model": model or resp.model, "content": content,
            "stop_reason": _stop_reason(resp.stop_reason, resp.stop_sequence),
            "stop_sequence": resp.stop_sequence,
            "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens}}


def _stop_reason(stop: StopReason, sequence: str | None) -> str:
    return "stop_sequence" if stop == "stop" and sequence is not None else FROM_STOP[stop]


class StreamRenderer:
    """Internal events -> an Anthropic message stream for a client (SSE bytes).

    ``input_tokens`` goes in ``message_start`` (an OpenAI backend counts only at the end:
    the request's estimate); ``message_delta`` carries the final usage.
    """

    def __init__(self, *, model: str, id: str | None = None, input_tokens: int = 0) -> None:
        self._id = id or _new_id()
        self._model = model
        self._input = input_tokens
        self._started = False
        self._blocks: dict[int, int] = {}  # our index -> the client's
        self._open: int | None = None

    @staticmethod
    def _ev(kind: str, body: dict[str, Any]) -> bytes:
        return encode(dumps({"type": kind, **body}), kind)

    def _start_block(self, index: int, block: dict[str, Any]) -> bytes:
        out = self._stop_block()
        n = self._blocks[index] = len(self._blocks)
        self._open = index
        return out + self._ev("content_block_start", {"index": n, "content_block": block})

    def _stop_block(self) -> bytes:
        if self._open is None:
            return b""
        n, self._open = self._blocks[self._open], None
        return self._ev("content_block_stop", {"index": n})

    def render(self, e: Event) -> bytes:
        out = b""
        if not self._started:
            self._started = True
            out = self._ev("message_start", {"message": {
                "id": self._id, "type": "message", "role": "assistant", "content": [],
                "model": self._model, "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": self._input, "output_tokens": 0}}})
        if isinstance(e, TextDelta):
            if e.index not in self._blocks:
                out += self._start_block(e.index, {"type": "text", "text": ""})
            if e.text:
                out += self._ev("content_block_delta", {"index": self._blocks[e.index],
                                "delta": {"type": "text_delta", "text": e.text}})
        elif isinstance(e, ToolCallStart):
            out += self._start_block(e.index, {"type": "tool_use", "id": e.id,
                                               "name": e.name, "input": {}})
        elif isinstance(e, ToolCallDelta):
            out += self._ev("content_block_delta", {"index": self._blocks[e.index], "delta": {
                "type": "input_json_delta", "partial_json": e.arguments}})
        elif isinstance(e, BlockStop):
            if e.index == self._open:
                out += self._stop_block()
        else:
            u = e.usage or Usage(self._input, 0)
            out += self._stop_block() + self._ev("message_delta", {
                "delta": {"stop_reason": _stop_reason(e.stop_reason, e.stop_sequence),
                          "stop_sequence": e.stop_sequence},
                "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens}})
            out += self._ev("message_stop", {})
        return out


# ==== Errors ====


def error_for(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body for an HTTP status."""
    kind = ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_body(err: ProtocolError) -> dict[str, Any]:
    """Anthropic's error shape for a `ProtocolError` (answer it with ``err.status``)."""
    return error_for(err.status, err.message)


def error_event(status: int, message: str) -> bytes:
    """An ``error`` event, for a stream that fails after its headers were sent."""
    return encode(dumps(error_for(status, message)), "error")


def error_message(body: Any) -> str:
    """The message of an Anthropic-shaped error body (a backend's), or the body as text."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"])
    return str(body)[:500]
