"""OpenAI Chat Completions (``POST /v1/chat/completions``) <-> the internal request/response.

Request fields read: ``model``, ``messages`` (roles system and developer (one meaning: leading
ones are the system prompt, later ones system turns), user, assistant, tool;
content as a string or parts: ``text``, ``image_url`` (an https or ``data:`` URL, ``detail``);
``name``, ``tool_calls``, ``tool_call_id``, ``refusal``), ``tools`` (function tools),
``tool_choice`` (auto/none/required/a function), ``parallel_tool_calls``,
``max_completion_tokens``/``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``stream``,
``stream_options.include_usage`` (its other options pad the wire only; an upstream stream
always asks for usage), ``response_format`` (text, json_object, json_schema),
``user``. Every other field with a non-default value (``n`` > 1, ``logprobs``, ``seed``,
penalties, ``logit_bias``, ``audio``, ``reasoning_effort``, legacy ``functions``...) goes to
``Request.extra``, and other content parts (``input_audio``, ``file``) and tool types to
`Opaque`: an OpenAI backend gets them back as sent, another backend refuses them by name.
A tool result marked as an error (Anthropic's ``is_error``) reaches an OpenAI backend as text
starting with `TOOL_ERROR_PREFIX`.

Answers and errors live in `openai_chat_answers` (re-exported here): a chat completion and its
SSE stream, read from an OpenAI backend and written for a client.

>>> req = parse_request({"model": "auto", "messages": [{"role": "user", "content": "Hi"}]})
>>> to_upstream(req, "gpt-4o-mini")["messages"]
[{'role': 'user', 'content': 'Hi'}]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tagrouter_fast.serve.edge.fields import (
    bool_field,
    int_field,
    list_field,
    number_field,
    obj,
    obj_field,
    str_field,
    str_list,
)
from tagrouter_fast.serve.edge.openai_chat_answers import (
    PROTOCOL,
    StreamParser,
    StreamRenderer,
    error_body,
    error_message,
    parse_response,
    render_response,
)
from tagrouter_fast.serve.edge.wire import (
    Image,
    Message,
    Opaque,
    Part,
    ProtocolError,
    Request,
    ResponseFormat,
    Text,
    Tool,
    ToolCall,
    ToolChoice,
    ToolResult,
    Untranslatable,
    check_extras,
)

__all__ = [
    "PROTOCOL", "StreamParser", "StreamRenderer", "error_body", "error_message",
    "image_from_url", "parse_request", "parse_response", "render_response", "to_upstream",
]

#: Fields about OpenAI's bookkeeping of a call, not its answer: another backend goes without.
BOOKKEEPING = frozenset(
    ("store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"))
#: Values that ask for nothing beyond the default: not kept, so any backend can serve them.
NEUTRAL: dict[str, Any] = {"n": 1, "logprobs": False, "frequency_penalty": 0,
                           "presence_penalty": 0, "modalities": ["text"]}
_NO_NEUTRAL = object()
_READ = frozenset(("model", "messages", "tools", "tool_choice", "parallel_tool_calls",
                   "max_completion_tokens", "max_tokens", "temperature", "top_p", "stop",
                   "stream", "stream_options", "response_format", "user"))
_MESSAGE_KEYS = frozenset(("role", "content", "name", "tool_calls", "tool_call_id", "refusal"))
#: A tool result marked as an error (Anthropic's is_error) has no flag in a tool message: the
#: mark travels in its text instead.
TOOL_ERROR_PREFIX = "Error: "


# ==== Client request -> internal ====


def parse_request(body: Mapping[str, Any], *, session_id: str | None = None,
                  count_tokens: Callable[[str], int] | None = None) -> Request:
    """The internal request of a chat completions body.

    Args:
        body: the parsed JSON body.
        session_id: the caller's session key (the ``x-session-id`` header); else ``user``.
        count_tokens: a tokenizer's count for ``Request.input_tokens`` (else chars / 4).

    Raises:
        ProtocolError: a field is missing or malformed (status 400, the field named).
    """
    model = str_field(body, "model", "model", required=True)
    msgs = list_field(body, "messages", "messages", required=True)
    if not msgs:
        raise ProtocolError(400, "messages", "must be a non-empty array")
    system, messages = _messages(msgs)
    extra = {k: v for k, v in body.items()
             if k not in _READ and v is not None and NEUTRAL.get(k, _NO_NEUTRAL) != v}
    tools = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(list_field(body, "tools", "tools")))
    choice = _tool_choice(body.get("tool_choice"), extra)
    fmt = _response_format(obj_field(body, "response_format", "response_format"), extra)
    max_tokens = int_field(body, "max_completion_tokens", "max_completion_tokens", lo=1)
    legacy = int_field(body, "max_tokens", "max_tokens", lo=1)
    if max_tokens is not None and legacy is not None and legacy != max_tokens:
        raise ProtocolError(400, "max_tokens", "differs from max_completion_tokens: give one")
    max_tokens = legacy if max_tokens is None else max_tokens
    opts = obj_field(body, "stream_options", "stream_options") or {}
    user = str_field(body, "user", "user")
    return Request(
        messages, model=model or "", system=system, tools=tools, tool_choice=choice,
        parallel_tool_calls=bool_field(body, "parallel_tool_calls", "parallel_tool_calls"),
        max_tokens=max_tokens,
        temperature=number_field(body, "temperature", "temperature", 0.0, 2.0),
        top_p=number_field(body, "top_p", "top_p", 0.0, 1.0), stop=str_list(body, "stop", "stop"),
        stream=bool(bool_field(body, "stream", "stream")),
        stream_usage=bool(bool_field(opts, "include_usage", "stream_options.include_usage")),
        response_format=fmt, session_id=session_id or user, user=user, protocol=PROTOCOL,
        extra=extra, droppable=frozenset(BOOKKEEPING & extra.keys()), count_tokens=count_tokens,
    )


def _messages(msgs: list[Any]) -> tuple[tuple[Text, ...], tuple[Message, ...]]:
    system: list[Text] = []
    out: list[Message] = []
    results: list[Part] = []  # consecutive tool messages: one user turn, as Anthropic has it
    for i, raw in enumerate(msgs):
        where = f"messages[{i}]"
        m = obj(raw, where)
        role = str_field(m, "role", f"{where}.role", required=True)
        if role != "tool" and results:
            out.append(Message("user", tuple(results)))
            results = []
        for k, v in m.items():
            # Echoed answers carry null audio/function_call and empty annotations: nothing.
            if k not in _MESSAGE_KEYS and v not in (None, []):
                raise Untranslatable(f"{where}.{k}", "not supported by the gateway")
        name = str_field(m, "name", f"{where}.name")
        content = m.get("content")
        if role in ("system", "developer"):
            parts = _texts(content, f"{where}.content")
            if out or name is not None:
                out.append(Message("system", parts, name))
            else:
                system.extend(parts)
        elif role == "user":
            out.append(Message("user", _user_parts(content, f"{where}.content"), name))
        elif role == "assistant":
            out.append(_assistant(m, where, name))
        elif role == "tool":
            cid = str_field(m, "tool_call_id", f"{where}.tool_call_id", required=True)
            results.append(ToolResult(cid or "", _texts(content, f"{where}.content")))
        else:
            raise ProtocolError(400, f"{where}.role", f"unsupported role {role!r}")
    if results:
        out.append(Message("user", tuple(results)))
    return tuple(system), tuple(out)


def _texts(content: Any, where: str) -> tuple[Text, ...]:
    if isinstance(content, str):
        return (Text(content),)
    if not isinstance(content, list):
        raise ProtocolError(400, where, "must be a string or an array of text parts")
    out = []
    for j, p in enumerate(content):
        p = obj(p, f"{where}[{j}]")
        if p.get("type") != "text":
            raise ProtocolError(400, f"{where}[{j}].type", "must be \"text\" here")
        out.append(Text(str_field(p, "text", f"{where}[{j}].text", required=True) or ""))
    return tuple(out)


def _user_parts(content: Any, where: str) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (Text(content),)
    if not isinstance(content, list):
        raise ProtocolError(400, where, "must be a string or an array of content parts")
    out: list[Part] = []
    for j, p in enumerate(content):
        at = f"{where}[{j}]"
        p = obj(p, at)
        kind = p.get("type")
        if kind == "text":
            out.append(Text(str_field(p, "text", f"{at}.text", required=True) or ""))
        elif kind == "image_url":
            img = obj(p.get("image_url"), f"{at}.image_url")
            url = str_field(img, "url", f"{at}.image_url.url", required=True) or ""
            out.append(image_from_url(url, str_field(img, "detail", f"{at}.image_url.detail"),
                                      f"{at}.image_url.url"))
        else:
            out.append(Opaque(PROTOCOL, at, p))
    return tuple(out)


def image_from_url(url: str, detail: str | None, where: str) -> Image:
    """An image from a URL; a ``data:<type>;base64,<data>`` URL becomes base64 data."""
    if not url.startswith("data:"):
        return Image(url=url, detail=detail)
    head, sep, data = url[5:].partition(",")
    media_type, _, enc = head.partition(";")
    if not sep or enc != "base64" or not media_type:
        raise ProtocolError(400, where, "a data URL must read data:<media type>;base64,<data>")
    return Image(data=data, media_type=media_type, detail=detail)


def _assistant(m: Mapping[str, Any], where: str, name: str | None) -> Message:
    content = m.get("content")
    parts: list[Part] = []
    if content is not None:
        if isinstance(content, list):  # text and refusal parts
            for j, p in enumerate(content):
                p = obj(p, f"{where}.content[{j}]")
                key = "refusal" if p.get("type") == "refusal" else "text"
                parts.append(Text(str_field(p, key, f"{where}.content[{j}].{key}",
                                            required=True) or ""))
        else:
            parts.extend(_texts(content, f"{where}.content"))
    refusal = str_field(m, "refusal", f"{where}.refusal")
    if refusal:
        parts.append(Text(refusal))
    for j, tc in enumerate(list_field(m, "tool_calls", f"{where}.tool_calls")):
        at = f"{where}.tool_calls[{j}]"
        tc = obj(tc, at)
        if tc.get("type", "function") != "function":
            parts.append(Opaque(PROTOCOL, at, tc))
            continue
        fn = obj(tc.get("function"), f"{at}.function")
        parts.append(ToolCall(
            str_field(tc, "id", f"{at}.id", required=True) or "",
            str_field(fn, "name", f"{at}.function.name", required=True) or "",
            str_field(fn, "arguments", f"{at}.function.arguments") or ""))
    return Message("assistant", tuple(parts), name)


def _tool(t: Any, where: str) -> Tool | Opaque:
    t = obj(t, where)
    if t.get("type") != "function":
        return Opaque(PROTOCOL, where, t)
    fn = obj(t.get("function"), f"{where}.function")
    return Tool(str_field(fn, "name", f"{where}.function.name", required=True) or "",
                str_field(fn, "description", f"{where}.function.description"),
                obj_field(fn, "parameters", f"{where}.function.parameters")
                or {"type": "object", "properties": {}},
                bool_field(fn, "strict", f"{where}.function.strict"))


def _tool_choice(v: Any, extra: dict[str, Any]) -> ToolChoice | None:
    if v is None:
        return None
    if v in ("auto", "none", "required"):
        return ToolChoice(v)
    if isinstance(v, dict) and v.get("type") == "function":
        fn = obj(v.get("function"), "tool_choice.function")
        return ToolChoice("tool", str_field(fn, "name", "tool_choice.function.name",
                                            required=True))
    extra["tool_choice"] = v  # allowed_tools, custom: an OpenAI backend's to judge
    return None


def _response_format(v: Mapping[str, Any] | None, extra: dict[str, Any]
                     ) -> ResponseFormat | None:
    if v is None or v.get("type") == "text":
        return None
    if v.get("type") == "json_object":
        return ResponseFormat("json_object")
    if v.get("type") == "json_schema":
        s = obj(v.get("json_schema"), "response_format.json_schema")
        w = "response_format.json_schema"
        return ResponseFormat("json_schema", str_field(s, "name", f"{w}.name", required=True),
                              obj_field(s, "schema", f"{w}.schema"),
                              bool_field(s, "strict", f"{w}.strict"),
                              str_field(s, "description", f"{w}.description"))
    extra["response_format"] = v
    return None


# ==== Internal -> OpenAI backend ====


def to_upstream(req: Request, model: str, *, max_tokens_field: str = "max_tokens"
                ) -> dict[str, Any]:
    """The chat completions body for an OpenAI backend serving ``model``. A stream asks for
    usage (``stream_options.include_usage``) so the answer's usage is never lost.

    Args:
        max_tokens_field: "max_tokens" (what OpenAI-compatible servers read) or
            "max_completion_tokens" (what OpenAI's reasoning models require).

    Raises:
        Untranslatable: a part, tool or field that chat completions cannot carry.
    """
    same = req.protocol == PROTOCOL
    msgs: list[dict[str, Any]] = [{"role": "system", "content": t.text} for t in req.system]
    for i, m in enumerate(req.messages):
        _render_message(m, f"messages[{i}]", msgs, same)
    body: dict[str, Any] = {"model": model, "messages": msgs}
    if req.tools:
        body["tools"] = [_tool_body(t, same) for t in req.tools]
    if req.tool_choice is not None:
        tc = req.tool_choice
        body["tool_choice"] = tc.mode if tc.mode != "tool" else {
            "type": "function", "function": {"name": tc.name}}
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.max_tokens is not None:
        body[max_tokens_field] = req.max_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.stop:
        body["stop"] = list(req.stop)
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if req.response_format is not None:
        f = req.response_format
        body["response_format"] = {"type": "json_object"} if f.kind == "json_object" else {
            "type": "json_schema", "json_schema": {k: v for k, v in (
                ("name", f.name), ("schema", f.schema), ("strict", f.strict),
                ("description", f.description)) if v is not None}}
    if req.user is not None:
        body["user"] = req.user
    body.update(check_extras(req, PROTOCOL))
    return body


def _foreign(p: Opaque, same: bool) -> Mapping[str, Any]:
    if same:
        return p.raw
    raise Untranslatable(p.field, f"{p.raw.get('type')!r} has no equivalent in OpenAI chat "
                         "completions")


def _content(parts: list[Part], where: str, same: bool) -> str | list[dict[str, Any]]:
    if len(parts) == 1 and isinstance(parts[0], Text):
        return parts[0].text
    out: list[dict[str, Any]] = []
    for p in parts:
        if isinstance(p, Text):
            out.append({"type": "text", "text": p.text})
        elif isinstance(p, Image):
            url = p.url if p.url is not None else f"data:{p.media_type};base64,{p.data}"
            img = {"url": url} if p.detail is None else {"url": url, "detail": p.detail}
            out.append({"type": "image_url", "image_url": img})
        elif isinstance(p, Opaque):
            out.append(dict(_foreign(p, same)))
        else:
            raise Untranslatable(where, f"a {type(p).__name__} cannot stand in this message")
    return out


def _render_message(m: Message, where: str, out: list[dict[str, Any]], same: bool) -> None:
    if m.role == "assistant":
        d: dict[str, Any] = {"role": "assistant"}
        texts = [p.text for p in m.parts if isinstance(p, Text)]
        calls: list[Mapping[str, Any]] = []
        for p in m.parts:
            if isinstance(p, ToolCall):
                calls.append({"id": p.id, "type": "function",
                              "function": {"name": p.name, "arguments": p.arguments}})
            elif isinstance(p, Opaque):
                calls.append(_foreign(p, same))
            elif not isinstance(p, Text):
                raise Untranslatable(where, "an assistant turn in chat completions holds only "
                                     f"text and tool calls, not a {type(p).__name__}")
        d["content"] = "".join(texts) if texts else None
        if calls:
            d["tool_calls"] = calls
    else:
        rest: list[Part] = []
        for p in m.parts:
            if isinstance(p, ToolResult):
                out.append({"role": "tool", "tool_call_id": p.call_id,
                            "content": _result_text(p, where)})
            else:
                rest.append(p)
        if not rest and m.parts:
            return
        d = {"role": m.role, "content": _content(rest, where, same)}
    if m.name is not None:
        d["name"] = m.name
    out.append(d)


def _result_text(r: ToolResult, where: str) -> str:
    texts = []
    for c in r.content:
        if not isinstance(c, Text):
            raise Untranslatable(where, f"the result of tool call {r.call_id!r} holds a "
                                 f"{type(c).__name__}: chat tool messages carry text only")
        texts.append(c.text)
    text = "\n".join(texts)
    return TOOL_ERROR_PREFIX + text if r.is_error else text


def _tool_body(t: Tool | Opaque, same: bool) -> dict[str, Any]:
    if isinstance(t, Opaque):
        return dict(_foreign(t, same))
    fn: dict[str, Any] = {"name": t.name, "parameters": t.parameters}
    if t.description is not None:
        fn["description"] = t.description
    if t.strict is not None:
        fn["strict"] = t.strict
    return {"type": "function", "function": fn}
