"""OpenAI Responses (``POST /v1/responses``) <-> the internal request/response. Backends speak
chat completions or Anthropic Messages, so a Responses request is always translated.

Request fields read: ``model``, ``input`` (a string, or items: ``message`` with a string or
``input_text``/``output_text``/``refusal``/``input_image`` (URL or ``data:`` URL) parts,
roles user/assistant/system/developer; ``function_call``; ``function_call_output`` with a
string or text/image parts), ``instructions``, ``tools`` (function tools), ``tool_choice``,
``parallel_tool_calls``, ``max_output_tokens``, ``temperature``, ``top_p``, ``stream``,
``previous_response_id`` (parsed only: the caller resolves it, `with_history`),
``text.format`` (text, json_object, json_schema), ``user``. Accepted and left to the gateway:
``store`` (the gateway keeps conversations itself, bounded), ``metadata``, ``service_tier``,
``prompt_cache_key``, ``safety_identifier``, ``stream_options``. Anything else with a
non-default value (built-in tools such as web_search, ``reasoning``, ``include``,
``background``, file inputs, reasoning items...) is `Untranslatable`, by name.

Answers: a ``response`` object (`render_response`) and its SSE stream (`StreamRenderer`):
``response.created``, ``response.in_progress``, per output item ``response.output_item.added``,
(text) ``response.content_part.added``, ``response.output_text.delta``...,
``response.output_text.done``, ``response.content_part.done``, (tool call)
``response.function_call_arguments.delta``..., ``response.function_call_arguments.done``,
then ``response.output_item.done``; last ``response.completed`` (``response.incomplete`` when
the answer hit max_output_tokens or a content filter). Every event has a ``sequence_number``.
Errors take OpenAI's shape (`error_body`).

>>> req = parse_request({"model": "auto", "instructions": "Be brief", "input": "Hi"})
>>> req.system, req.route_text
((Text(text='Be brief'),), 'Hi')
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tagrouter_fast.serve.edge.fields import (
    bool_field,
    dumps,
    int_field,
    list_field,
    number_field,
    obj,
    obj_field,
    str_field,
)
from tagrouter_fast.serve.edge.openai_chat import image_from_url
from tagrouter_fast.serve.edge.openai_chat_answers import error_body, error_message
from tagrouter_fast.serve.edge.sse import encode
from tagrouter_fast.serve.edge.wire import (
    Event,
    Finish,
    Message,
    Part,
    ProtocolError,
    Request,
    Response,
    ResponseFormat,
    StopReason,
    Text,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolChoice,
    ToolResult,
    Untranslatable,
    Usage,
)

__all__ = [
    "PROTOCOL", "StreamRenderer", "conversation", "error_body", "error_message",
    "parse_request", "render_response", "with_history",
]

PROTOCOL = "openai_responses"
_READ = frozenset(("model", "input", "instructions", "tools", "tool_choice",
                   "parallel_tool_calls", "max_output_tokens", "temperature", "top_p", "stream",
                   "previous_response_id", "text", "user"))
#: Fields about the provider's bookkeeping, not the answer: accepted, left to the gateway.
_LEFT_TO_GATEWAY = frozenset(("store", "metadata", "service_tier", "prompt_cache_key",
                              "safety_identifier", "stream_options"))
#: Values that ask for nothing beyond what the gateway does anyway.
_NEUTRAL: dict[str, Any] = {"truncation": "disabled", "background": False, "include": []}
_NO_NEUTRAL = object()
_WHY = "the gateway serves Responses through chat completions and Anthropic backends"


# ==== Client request -> internal ====


def parse_request(body: Mapping[str, Any], *, session_id: str | None = None,
                  count_tokens: Callable[[str], int] | None = None) -> Request:
    """The internal request of a Responses body.

    Args:
        body: the parsed JSON body.
        session_id: the caller's session key (the ``x-session-id`` header); else ``user``.
        count_tokens: a tokenizer's count for ``Request.input_tokens`` (else chars / 4).

    Raises:
        ProtocolError: a field is missing or malformed (status 400, the field named).
        Untranslatable: a field or item no backend protocol can carry.
    """
    for k, v in body.items():
        if k not in _READ and k not in _LEFT_TO_GATEWAY and v is not None \
                and _NEUTRAL.get(k, _NO_NEUTRAL) != v:
            raise Untranslatable(k, f"not supported: {_WHY}")
    model = str_field(body, "model", "model", required=True)
    instructions = str_field(body, "instructions", "instructions")
    system = [Text(instructions)] if instructions else []
    inp = body.get("input")
    if isinstance(inp, str):
        messages: tuple[Message, ...] = (Message("user", (Text(inp),)),)
    elif isinstance(inp, list):
        messages = _items(inp, system)
    else:
        raise ProtocolError(400, "input", "must be a string or an array of input items")
    tools = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(list_field(body, "tools", "tools")))
    user = str_field(body, "user", "user")
    return Request(
        messages, model=model or "", system=tuple(system), tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=bool_field(body, "parallel_tool_calls", "parallel_tool_calls"),
        max_tokens=int_field(body, "max_output_tokens", "max_output_tokens", lo=1),
        temperature=number_field(body, "temperature", "temperature", 0.0, 2.0),
        top_p=number_field(body, "top_p", "top_p", 0.0, 1.0),
        # Responses streams always end with the usage (in response.completed).
        stream=bool(bool_field(body, "stream", "stream")), stream_usage=True,
        response_format=_text_format(body), session_id=session_id or user, user=user,
        previous_response_id=str_field(body, "previous_response_id", "previous_response_id"),
        protocol=PROTOCOL, count_tokens=count_tokens,
    )


def _items(items: list[Any], system: list[Text]) -> tuple[Message, ...]:
    out: list[Message] = []
    for i, raw in enumerate(items):
        where = f"input[{i}]"
        it = obj(raw, where)
        kind = it.get("type", "message")
        if kind == "message":
            role = str_field(it, "role", f"{where}.role", required=True)
            parts = _content(it.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                if any(not isinstance(p, Text) for p in parts):
                    raise ProtocolError(400, f"{where}.content", "system text only")
                if out:
                    out.append(Message("system", parts))
                else:
                    system.extend(p for p in parts if isinstance(p, Text))
            elif role in ("user", "assistant"):
                out.append(Message(role, parts))  # type: ignore[arg-type]
            else:
                raise ProtocolError(400, f"{where}.role", f"unsupported role {role!r}")
        elif kind == "function_call":
            call = ToolCall(str_field(it, "call_id", f"{where}.call_id", required=True) or "",
                            str_field(it, "name", f"{where}.name", required=True) or "",
                            str_field(it, "arguments", f"{where}.arguments") or "")
            _append(out, "assistant", call)
        elif kind == "function_call_output":
            cid = str_field(it, "call_id", f"{where}.call_id", required=True) or ""
            output = it.get("output")
            content: tuple[Part, ...] = (Text(output),) if isinstance(output, str) else \
                _content(output, f"{where}.output")
            _append(out, "user", ToolResult(cid, content))  # type: ignore[arg-type]
        else:
            raise Untranslatable(where, f"input item type {kind!r} is not supported: {_WHY}")
    return tuple(out)


def _append(out: list[Message], role: str, part: ToolCall | ToolResult) -> None:
    """A call joins the assistant turn before it; a result joins the results before it."""
    last = out[-1] if out else None
    if last is not None and last.role == role and (
            role == "assistant" or all(isinstance(p, ToolResult) for p in last.parts)):
        out[-1] = Message(last.role, (*last.parts, part))
    else:
        out.append(Message(role, (part,)))  # type: ignore[arg-type]


def _content(content: Any, where: str) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (Text(content),)
    if not isinstance(content, list):
        raise ProtocolError(400, where, "must be a string or an array of content parts")
    out: list[Part] = []
    for j, raw in enumerate(content):
        at = f"{where}[{j}]"
        p = obj(raw, at)
        kind = p.get("type")
        if kind in ("input_text", "output_text", "refusal"):
            key = "refusal" if kind == "refusal" else "text"
            out.append(Text(str_field(p, key, f"{at}.{key}", required=True) or ""))
        elif kind == "input_image" and p.get("image_url") is not None:
            url = str_field(p, "image_url", f"{at}.image_url") or ""
            out.append(image_from_url(url, str_field(p, "detail", f"{at}.detail"),
                                      f"{at}.image_url"))
        else:  # file ids, input_file, input_audio
            raise Untranslatable(at, f"content part {kind!r} is not supported: {_WHY}")
    return tuple(out)


def _tool(raw: Any, where: str) -> Tool:
    t = obj(raw, where)
    if t.get("type") != "function":
        raise Untranslatable(where, f"built-in tool {t.get('type')!r} is not supported: {_WHY}")
    return Tool(str_field(t, "name", f"{where}.name", required=True) or "",
                str_field(t, "description", f"{where}.description"),
                obj_field(t, "parameters", f"{where}.parameters")
                or {"type": "object", "properties": {}},
                bool_field(t, "strict", f"{where}.strict"))


def _tool_choice(v: Any) -> ToolChoice | None:
    if v is None:
        return None
    if v in ("auto", "none", "required"):
        return ToolChoice(v)
    if isinstance(v, dict) and v.get("type") == "function":
        return ToolChoice("tool", str_field(v, "name", "tool_choice.name", required=True))
    raise Untranslatable("tool_choice", f"{v!r} is not supported: {_WHY}")


def _text_format(body: Mapping[str, Any]) -> ResponseFormat | None:
    text = obj_field(body, "text", "text") or {}
    for k, v in text.items():
        if k not in ("format", "verbosity") or (k == "verbosity" and v not in (None, "medium")):
            raise Untranslatable(f"text.{k}", f"not supported: {_WHY}")
    f = obj_field(text, "format", "text.format")
    if f is None or f.get("type") == "text":
        return None
    if f.get("type") == "json_object":
        return ResponseFormat("json_object")
    if f.get("type") != "json_schema":
        raise ProtocolError(400, "text.format.type", "must be text, json_object or json_schema")
    w = "text.format"
    return ResponseFormat("json_schema", str_field(f, "name", f"{w}.name", required=True),
                          obj_field(f, "schema", f"{w}.schema"),
                          bool_field(f, "strict", f"{w}.strict"),
                          str_field(f, "description", f"{w}.description"))


# ==== Stored conversations (previous_response_id) ====


def with_history(req: Request, history: Sequence[Message], *,
                 count_tokens: Callable[[str], int] | None = None) -> Request:
    """``req`` with a stored conversation (what `conversation` returned for the response that
    ``previous_response_id`` names) before its input. The instructions stay the new request's
    own, as the Responses API has it. Routing fields are derived again."""
    return dataclasses.replace(req, messages=(*history, *req.messages),
                               count_tokens=count_tokens)


def conversation(req: Request, resp: Response) -> tuple[Message, ...]:
    """What to store under a response's id: its request's turns (history included) and the
    answer."""
    return (*req.messages, resp.as_message())


# ==== Internal -> client ====


def _item(p: Text | ToolCall, item_id: str, done: bool = True) -> dict[str, Any]:
    status = "completed" if done else "in_progress"
    if isinstance(p, Text):
        return {"id": item_id, "type": "message", "status": status, "role": "assistant",
                "content": [_text_part(p.text)] if done else []}
    return {"id": item_id, "type": "function_call", "status": status, "call_id": p.id,
            "name": p.name, "arguments": p.arguments if done else ""}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _envelope(id: str, model: str, req: Request | None, created_at: int, status: str,
              output: list[dict[str, Any]], stop: StopReason | None, usage: Usage | None
              ) -> dict[str, Any]:
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(stop or "")
    tc = req.tool_choice if req is not None else None
    fmt = req.response_format if req is not None else None
    out: dict[str, Any] = {
        "id": id, "object": "response", "created_at": created_at,
        "status": "incomplete" if reason else status, "error": None,
        "incomplete_details": {"reason": reason} if reason else None,
        "model": model, "output": output,
        "parallel_tool_calls": req is None or req.parallel_tool_calls is not False,
        "tool_choice": "auto" if tc is None else tc.mode if tc.mode != "tool" else {
            "type": "function", "name": tc.name},
        "tools": [] if req is None else [
            {"type": "function", "name": t.name, "description": t.description,
             "parameters": t.parameters, "strict": t.strict}
            for t in req.tools if isinstance(t, Tool)],
        "previous_response_id": req.previous_response_id if req is not None else None,
        "max_output_tokens": req.max_tokens if req is not None else None,
        "temperature": req.temperature if req is not None else None,
        "top_p": req.top_p if req is not None else None,
        "text": {"format": {"type": "text"} if fmt is None else {"type": fmt.kind} if
                 fmt.kind == "json_object" else {"type": "json_schema", "name": fmt.name,
                                                 "schema": fmt.schema, "strict": fmt.strict}},
        "metadata": {},
    }
    if usage is not None:
        out["usage"] = {
            "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}
    return out


def render_response(resp: Response, *, id: str, req: Request | None = None,
                    model: str | None = None, created_at: int | None = None) -> dict[str, Any]:
    """A ``response`` object for a client, from any backend's answer: one message item per
    text part, one function_call item per tool call. ``id`` is the gateway's (``resp_...``):
    the key a later ``previous_response_id`` gives."""
    output = [_item(p, f"{'msg' if isinstance(p, Text) else 'fc'}_{id}_{i}")
              for i, p in enumerate(resp.parts)]
    return _envelope(id, model or resp.model, req,
                     int(time.time()) if created_at is None else created_at, "completed",
                     output, resp.stop_reason, resp.usage)


class StreamRenderer:
    """Internal events -> the Responses SSE stream for a client (see the module docstring)."""

    def __init__(self, *, id: str, model: str, req: Request | None = None,
                 created_at: int | None = None) -> None:
        self._head = (id, model, req, int(time.time()) if created_at is None else created_at)
        self._seq = 0
        self._blocks: dict[int, tuple[int, str, Text | ToolCall, list[str]]] = {}
        self._open: int | None = None
        self._output: list[dict[str, Any]] = []

    def _ev(self, kind: str, body: dict[str, Any]) -> bytes:
        data = dumps({"type": kind, **body, "sequence_number": self._seq})
        self._seq += 1
        return encode(data, kind)

    def _response(self, status: str, finish: Finish | None = None) -> dict[str, Any]:
        id, model, req, created = self._head
        return _envelope(id, model, req, created, status, self._output,
                         finish.stop_reason if finish else None, finish.usage if finish else None)

    def _add(self, index: int, part: Text | ToolCall) -> bytes:
        out = self._close()
        n = len(self._output)  # blocks come one at a time: the items so far are done
        item_id = f"{'msg' if isinstance(part, Text) else 'fc'}_{self._head[0]}_{n}"
        self._blocks[index] = (n, item_id, part, [])
        self._open = index
        out += self._ev("response.output_item.added",
                        {"output_index": n, "item": _item(part, item_id, done=False)})
        if isinstance(part, Text):
            out += self._ev("response.content_part.added", {
                "item_id": item_id, "output_index": n, "content_index": 0,
                "part": _text_part("")})
        return out

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        n, item_id, part, chunks = self._blocks[self._open]
        self._open = None
        whole = "".join(chunks)
        at = {"item_id": item_id, "output_index": n}
        if isinstance(part, Text):
            done: Text | ToolCall = Text(whole)
            out = self._ev("response.output_text.done",
                           {**at, "content_index": 0, "text": whole, "logprobs": []})
            out += self._ev("response.content_part.done",
                            {**at, "content_index": 0, "part": _text_part(whole)})
        else:
            done = ToolCall(part.id, part.name, whole)
            out = self._ev("response.function_call_arguments.done",
                           {**at, "name": part.name, "arguments": whole})
        item = _item(done, item_id)
        self._output.append(item)
        return out + self._ev("response.output_item.done", {"output_index": n, "item": item})

    def render(self, e: Event) -> bytes:
        out = b""
        if self._seq == 0:
            out = self._ev("response.created", {"response": self._response("in_progress")})
            out += self._ev("response.in_progress", {"response": self._response("in_progress")})
        if isinstance(e, TextDelta):
            if e.index not in self._blocks:
                out += self._add(e.index, Text(""))
            n, item_id, _, chunks = self._blocks[e.index]
            if e.text:
                chunks.append(e.text)
                out += self._ev("response.output_text.delta", {
                    "item_id": item_id, "output_index": n, "content_index": 0,
                    "delta": e.text, "logprobs": []})
        elif isinstance(e, ToolCallStart):
            out += self._add(e.index, ToolCall(e.id, e.name, ""))
        elif isinstance(e, ToolCallDelta):
            n, item_id, _, chunks = self._blocks[e.index]
            chunks.append(e.arguments)
            out += self._ev("response.function_call_arguments.delta",
                            {"item_id": item_id, "output_index": n, "delta": e.arguments})
        elif isinstance(e, Finish):
            out += self._close()
            final = self._response("completed", e)
            out += self._ev(f"response.{final['status']}", {"response": final})
        elif e.index == self._open:  # BlockStop
            out += self._close()
        return out
