"""OpenAI chat completion answers: a backend's completion and SSE chunk stream -> the internal
response and events (`parse_response`, `StreamParser`), and back for a client
(`render_response`, `StreamRenderer`), plus OpenAI's error shape (``{"error": {"message",
"type", "param", "code"}}``). One choice: the gateway asks for one.

>>> from tagrouter_fast.serve.edge.wire import Text
>>> render_response(Response((Text("Hi"),), "length"), id="c1", created=0)["choices"][0]
{'index': 0, 'message': {'role': 'assistant', 'content': 'Hi', 'refusal': None}, \
'logprobs': None, 'finish_reason': 'length'}
"""

from __future__ import annotations

import json
import time
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
    Untranslatable,
    Usage,
)

__all__ = [
    "PROTOCOL", "StreamParser", "StreamRenderer", "error_body", "error_message", "parse_response",
    "render_response",
]

PROTOCOL = "openai_chat"
FINISH_TO_STOP: dict[str, StopReason] = {
    "stop": "stop", "length": "length", "tool_calls": "tool_use", "function_call": "tool_use",
    "content_filter": "content_filter"}
STOP_TO_FINISH = {"stop": "stop", "length": "length", "tool_use": "tool_calls",
                  "content_filter": "content_filter"}

# ==== OpenAI backend's answer -> internal ====


def _usage(u: Any) -> Usage | None:
    if u is None:
        return None
    u = obj(u, "usage", 502)
    return Usage(int_field(u, "prompt_tokens", "usage.prompt_tokens", lo=0, status=502) or 0,
                 int_field(u, "completion_tokens", "usage.completion_tokens", lo=0,
                           status=502) or 0)


def _stop(finish: Any) -> StopReason:
    stop = FINISH_TO_STOP.get(finish) if isinstance(finish, str) else None
    if stop is None:
        raise ProtocolError(502, "finish_reason", f"unknown finish reason {finish!r}")
    return stop


def parse_response(body: Mapping[str, Any]) -> Response:
    """The internal response of a backend's chat completion (one choice).

    Raises:
        ProtocolError: status 502, the answer is not a chat completion.
    """
    choices = list_field(body, "choices", "choices", required=True, status=502)
    if len(choices) != 1:
        raise ProtocolError(502, "choices", f"expected one choice, got {len(choices)}")
    c = obj(choices[0], "choices[0]", 502)
    msg = obj(c.get("message"), "choices[0].message", 502)
    parts: list[Text | ToolCall] = []
    content = str_field(msg, "content", "choices[0].message.content", status=502)
    if content:
        parts.append(Text(content))
    stop = _stop(c.get("finish_reason"))
    refusal = str_field(msg, "refusal", "choices[0].message.refusal", status=502)
    if refusal:
        parts.append(Text(refusal))
        stop = "content_filter"
    for j, tc in enumerate(list_field(msg, "tool_calls", "choices[0].message.tool_calls",
                                      status=502)):
        at = f"choices[0].message.tool_calls[{j}]"
        fn = obj(obj(tc, at, 502).get("function"), f"{at}.function", 502)
        parts.append(ToolCall(str_field(tc, "id", f"{at}.id", required=True, status=502) or "",
                              str_field(fn, "name", f"{at}.function.name", required=True,
                                        status=502) or "",
                              str_field(fn, "arguments", f"{at}.function.arguments",
                                        status=502) or ""))
    return Response(tuple(parts), stop, _usage(body.get("usage")),
                    str(body.get("model") or ""), str(body.get("id") or ""))


class StreamParser(DataParser[Event]):
    """A backend's chat completion stream (SSE bytes) -> internal events.

    Text and tool calls become numbered blocks, one open at a time; the `Finish` comes at
    ``[DONE]`` (or the stream's end), after the usage chunk that follows the finish reason.
    """

    def __init__(self) -> None:
        super().__init__()
        self.id = ""
        self.model = ""
        self._open: int | None = None
        self._text_open = False
        self._next = 0
        self._calls: dict[int, int] = {}  # the chunk's tool call index -> block index
        self._finish: Any = None
        self._refused = False
        self._usage: Usage | None = None
        self.done = False

    def close(self) -> list[Event]:
        """Events left at the stream's end. Raises ProtocolError (502) if it never finished."""
        out = self._drain()
        if not self.done:
            self._end(out)
        return out

    def _block(self, text: bool, out: list[Event]) -> int:
        if self._open is not None:
            out.append(BlockStop(self._open))
        self._open, self._text_open = self._next, text
        self._next += 1
        return self._open

    def _end(self, out: list[Event]) -> None:
        if self._finish is None:
            raise ProtocolError(502, "stream", "ended before a finish_reason")
        if self._open is not None:
            out.append(BlockStop(self._open))
            self._open = None
        out.append(Finish("content_filter" if self._refused else _stop(self._finish),
                          self._usage))
        self.done = True

    def _event(self, data: str, out: list[Event]) -> None:
        if self.done:
            return
        if data == "[DONE]":
            self._end(out)
            return
        try:
            chunk = obj(json.loads(data), "stream chunk", 502)
        except ValueError:
            raise ProtocolError(502, "stream", "a chunk is not JSON") from None
        if "error" in chunk:
            raise ProtocolError(502, "stream", f"the backend failed: {error_message(chunk)}")
        self.id = self.id or str(chunk.get("id") or "")
        self.model = self.model or str(chunk.get("model") or "")
        if chunk.get("usage") is not None:
            self._usage = _usage(chunk["usage"])
        for c in list_field(chunk, "choices", "choices", status=502):
            c = obj(c, "choices[0]", 502)
            if c.get("index", 0) != 0:
                raise ProtocolError(502, "choices", "expected one choice")
            delta = c.get("delta") or {}
            for key in ("content", "refusal"):
                text = delta.get(key)
                if text:
                    self._refused |= key == "refusal"
                    block = self._open if self._text_open else None
                    out.append(TextDelta(self._block(True, out) if block is None else block,
                                         text))
            for tc in delta.get("tool_calls") or ():
                self._tool_delta(obj(tc, "delta.tool_calls[]", 502), out)
            if c.get("finish_reason") is not None:
                self._finish = c["finish_reason"]

    def _tool_delta(self, tc: Mapping[str, Any], out: list[Event]) -> None:
        k = tc.get("index", 0)
        fn = tc.get("function") or {}
        if k not in self._calls:
            self._calls[k] = self._block(False, out)
            out.append(ToolCallStart(self._calls[k], str(tc.get("id") or ""),
                                     str(fn.get("name") or "")))
        elif self._calls[k] != self._open:
            raise ProtocolError(502, "stream", "tool call deltas interleave")
        if fn.get("arguments"):
            out.append(ToolCallDelta(self._calls[k], fn["arguments"]))


# ==== Internal -> client ====


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def render_response(resp: Response, *, id: str | None = None, model: str | None = None,
                    created: int | None = None) -> dict[str, Any]:
    """A chat completion for a client, from any backend's answer."""
    msg: dict[str, Any] = {"role": "assistant", "content": resp.text or None, "refusal": None}
    calls = resp.tool_calls
    if calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in calls]
    out: dict[str, Any] = {
        "id": id or resp.id or _new_id(), "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model or resp.model,
        "choices": [{"index": 0, "message": msg, "logprobs": None,
                     "finish_reason": STOP_TO_FINISH[resp.stop_reason]}],
    }
    if resp.usage is not None:
        u = resp.usage
        out["usage"] = {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                        "total_tokens": u.input_tokens + u.output_tokens}
    return out


class StreamRenderer:
    """Internal events -> a chat completion chunk stream for a client (SSE bytes), ending in
    ``data: [DONE]``. Usage comes in a last chunk with no choices when ``include_usage``."""

    def __init__(self, *, model: str, id: str | None = None, created: int | None = None,
                 include_usage: bool = False) -> None:
        self._head = {"id": id or _new_id(), "object": "chat.completion.chunk",
                      "created": int(time.time()) if created is None else created,
                      "model": model}
        self._include_usage = include_usage
        self._started = False
        self._tools: dict[int, int] = {}  # block index -> the chunk's tool call index

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        c = {**self._head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return encode(dumps(c))

    def render(self, e: Event) -> bytes:
        out = b""
        if not self._started:
            self._started = True
            out = self._chunk({"role": "assistant", "content": ""})
        if isinstance(e, TextDelta):
            return out + self._chunk({"content": e.text})
        if isinstance(e, ToolCallStart):
            k = self._tools[e.index] = len(self._tools)
            return out + self._chunk({"tool_calls": [{
                "index": k, "id": e.id, "type": "function",
                "function": {"name": e.name, "arguments": ""}}]})
        if isinstance(e, ToolCallDelta):
            return out + self._chunk({"tool_calls": [{
                "index": self._tools[e.index], "function": {"arguments": e.arguments}}]})
        if isinstance(e, Finish):
            out += self._chunk({}, STOP_TO_FINISH[e.stop_reason])
            if self._include_usage and e.usage is not None:
                u = e.usage
                out += encode(dumps({**self._head, "choices": [], "usage": {
                    "prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                    "total_tokens": u.input_tokens + u.output_tokens}}))
            return out + b"data: [DONE]\n\n"
        return out  # BlockStop: chat chunks do not close blocks


# ==== Errors ====


def error_body(err: ProtocolError) -> dict[str, Any]:
    """OpenAI's error shape for a `ProtocolError` (answer it with ``err.status``)."""
    return {"error": {
        "message": err.message,
        "type": "invalid_request_error" if err.status < 500 else "upstream_error",
        "param": err.field,
        "code": "untranslatable" if isinstance(err, Untranslatable) else None}}


def error_message(body: Any) -> str:
    """The message of an OpenAI-shaped error body (a backend's), or the body as text."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"])
    return str(body)[:500]
