"""Anthropic Messages (``POST /v1/messages``) <-> the internal request.

Request fields read: ``model``, ``max_tokens`` (required, as Anthropic requires it),
``messages`` (user and assistant; content a string or blocks: ``text``, ``image`` with a
``base64`` or ``url`` source, ``tool_use``, ``tool_result`` with string or text/image content
and ``is_error``), ``system`` (a string or text blocks), ``tools`` (custom tools:
``name``, ``description``, ``input_schema``, ``strict``), ``tool_choice`` (auto, any, tool,
none; ``disable_parallel_tool_use``), ``stop_sequences``, ``temperature``, ``top_p``,
``stream``, ``metadata.user_id``, ``output_config.format`` (a JSON schema: OpenAI's
json_schema response format). Other fields (``top_k``, ``thinking``, ...) go to
``Request.extra``, other blocks (document, thinking, server tool blocks) and server tools to
`Opaque`: an Anthropic backend gets them back as sent, another backend refuses them by name.
``cache_control`` marks and text ``citations`` are dropped: a caching hint and the model's own
annotations, neither part of what is asked.

Answers and errors live in `anthropic_answers` (re-exported here).

>>> req = parse_request({"model": "claude", "max_tokens": 64, "system": "Be brief",
...                      "messages": [{"role": "user", "content": "Hi"}]})
>>> req.system, req.route_text
((Text(text='Be brief'),), 'Hi')
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

from tagrouter_fast.serve.edge.anthropic_answers import (
    PROTOCOL,
    StreamParser,
    StreamRenderer,
    error_body,
    error_event,
    error_for,
    error_message,
    parse_response,
    render_response,
)
from tagrouter_fast.serve.edge.fields import (
    bool_field,
    int_field,
    list_field,
    number_field,
    obj,
    obj_field,
    str_field,
)
from tagrouter_fast.serve.edge.fields import dumps as _dumps
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
    "MEDIA_TYPES", "PROTOCOL", "StreamParser", "StreamRenderer", "error_body", "error_event",
    "error_for", "error_message", "parse_request", "parse_response", "render_response",
    "to_upstream", "upstream_headers",
]

#: Fields about the provider's handling of a call, not its answer: another backend goes without.
BOOKKEEPING = frozenset(("service_tier",))
#: The image types Anthropic accepts (base64 sources).
MEDIA_TYPES = frozenset(("image/jpeg", "image/png", "image/gif", "image/webp"))
_READ = frozenset(("model", "max_tokens", "messages", "system", "tools", "tool_choice",
                   "stop_sequences", "temperature", "top_p", "stream", "metadata",
                   "output_config"))
#: The API version the upstream bodies are written for (the ``anthropic-version`` header).
ANTHROPIC_VERSION = "2023-06-01"
#: With no max_tokens (an OpenAI client may leave it out) an Anthropic backend still needs one.
DEFAULT_MAX_TOKENS = 4096


# ==== Client request -> internal ====


def parse_request(body: Mapping[str, Any], *, session_id: str | None = None,
                  count_tokens: Callable[[str], int] | None = None) -> Request:
    """The internal request of a Messages body.

    Args:
        body: the parsed JSON body.
        session_id: the caller's session key (a header); else ``metadata.user_id``.
        count_tokens: a tokenizer's count for ``Request.input_tokens`` (else chars / 4).

    Raises:
        ProtocolError: a field is missing or malformed (status 400, the field named).
    """
    model = str_field(body, "model", "model", required=True)
    max_tokens = int_field(body, "max_tokens", "max_tokens", lo=1)
    if max_tokens is None:
        raise ProtocolError(400, "max_tokens", "missing (Anthropic requires it)")
    msgs = list_field(body, "messages", "messages", required=True)
    if not msgs:
        raise ProtocolError(400, "messages", "must be a non-empty array")
    messages = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(msgs))
    tools = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(list_field(body, "tools", "tools")))
    choice, parallel = _tool_choice(obj_field(body, "tool_choice", "tool_choice"))
    meta = obj_field(body, "metadata", "metadata") or {}
    for k in meta:
        if k != "user_id":
            raise ProtocolError(400, f"metadata.{k}", "unknown field (known: user_id)")
    user = str_field(meta, "user_id", "metadata.user_id")
    stops = list_field(body, "stop_sequences", "stop_sequences")
    if not all(isinstance(s, str) for s in stops):
        raise ProtocolError(400, "stop_sequences", "must be an array of strings")
    extra = {k: v for k, v in body.items() if k not in _READ and v is not None}
    fmt = _output_format(body, extra)
    return Request(
        messages, model=model or "", system=_system(body.get("system")), tools=tools,
        tool_choice=choice, parallel_tool_calls=parallel, max_tokens=max_tokens,
        temperature=number_field(body, "temperature", "temperature", 0.0, 1.0),
        top_p=number_field(body, "top_p", "top_p", 0.0, 1.0), stop=tuple(stops),
        stream=bool(bool_field(body, "stream", "stream")), response_format=fmt,
        session_id=session_id or user, user=user, protocol=PROTOCOL, extra=extra,
        droppable=frozenset(BOOKKEEPING & extra.keys()), count_tokens=count_tokens,
    )


def _output_format(body: Mapping[str, Any], extra: dict[str, Any]) -> ResponseFormat | None:
    oc = obj_field(body, "output_config", "output_config")
    if oc is None:
        return None
    if any(v is not None for k, v in oc.items() if k != "format"):
        extra["output_config"] = oc  # effort: for an Anthropic backend only
    f = obj_field(oc, "format", "output_config.format")
    if f is None:
        return None
    if f.get("type") != "json_schema":
        raise ProtocolError(400, "output_config.format.type", "must be \"json_schema\"")
    return ResponseFormat("json_schema", None,
                          obj(f.get("schema"), "output_config.format.schema"), True)


def _system(v: Any) -> tuple[Text, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (Text(v),) if v else ()
    if not isinstance(v, list):
        raise ProtocolError(400, "system", "must be a string or an array of text blocks")
    out = []
    for i, b in enumerate(v):
        b = obj(b, f"system[{i}]")
        if b.get("type") != "text":
            raise ProtocolError(400, f"system[{i}].type", "must be \"text\"")
        out.append(Text(str_field(b, "text", f"system[{i}].text", required=True) or ""))
    return tuple(out)


def _message(raw: Any, where: str) -> Message:
    m = obj(raw, where)
    given = str_field(m, "role", f"{where}.role", required=True)
    if given not in ("user", "assistant"):
        raise ProtocolError(400, f"{where}.role", f"must be user or assistant, got {given!r}")
    role: Literal["user", "assistant"] = "user" if given == "user" else "assistant"
    content = m.get("content")
    if isinstance(content, str):
        return Message(role, (Text(content),))
    if not isinstance(content, list):
        raise ProtocolError(400, f"{where}.content", "must be a string or an array of blocks")
    return Message(role, tuple(_block(b, f"{where}.content[{j}]")
                               for j, b in enumerate(content)))


def _image(b: Mapping[str, Any], where: str) -> Image | Opaque:
    src = obj(b.get("source"), f"{where}.source")
    kind = src.get("type")
    if kind == "base64":
        return Image(data=str_field(src, "data", f"{where}.source.data", required=True),
                     media_type=str_field(src, "media_type", f"{where}.source.media_type",
                                          required=True))
    if kind == "url":
        return Image(url=str_field(src, "url", f"{where}.source.url", required=True))
    return Opaque(PROTOCOL, where, b)  # a file id: only Anthropic can resolve it


def _block(raw: Any, where: str) -> Part:
    b = obj(raw, where)
    kind = b.get("type")
    if kind == "text":
        return Text(str_field(b, "text", f"{where}.text", required=True) or "")
    if kind == "image":
        return _image(b, where)
    if kind == "tool_use":
        args = obj(b.get("input", {}), f"{where}.input")
        return ToolCall(str_field(b, "id", f"{where}.id", required=True) or "",
                        str_field(b, "name", f"{where}.name", required=True) or "",
                        _dumps(args))
    if kind == "tool_result":
        content = b.get("content")
        parts: tuple[Text | Image | Opaque, ...]
        if content is None or isinstance(content, str):
            parts = (Text(content),) if content else ()
        else:
            items = list_field(b, "content", f"{where}.content")
            parts = tuple(_result_part(c, f"{where}.content[{k}]") for k, c in enumerate(items))
        return ToolResult(str_field(b, "tool_use_id", f"{where}.tool_use_id", required=True)
                          or "", parts, bool(bool_field(b, "is_error", f"{where}.is_error")))
    return Opaque(PROTOCOL, where, b)


def _result_part(raw: Any, where: str) -> Text | Image | Opaque:
    p = _block(raw, where)
    if isinstance(p, (ToolCall, ToolResult)):
        raise ProtocolError(400, f"{where}.type", "a tool result holds text and images")
    return p


def _tool(raw: Any, where: str) -> Tool | Opaque:
    t = obj(raw, where)
    if t.get("type", "custom") != "custom":
        return Opaque(PROTOCOL, where, t)  # a server tool (web search, code execution...)
    return Tool(str_field(t, "name", f"{where}.name", required=True) or "",
                str_field(t, "description", f"{where}.description"),
                obj(t.get("input_schema"), f"{where}.input_schema"),
                bool_field(t, "strict", f"{where}.strict"))


_MODES = {"auto": "auto", "any": "required", "tool": "tool", "none": "none"}


def _tool_choice(v: Mapping[str, Any] | None) -> tuple[ToolChoice | None, bool | None]:
    if v is None:
        return None, None
    mode = _MODES.get(v.get("type"))  # type: ignore[arg-type]
    if mode is None:
        raise ProtocolError(400, "tool_choice.type", "must be auto, any, tool or none")
    name = str_field(v, "name", "tool_choice.name", required=mode == "tool")
    off = bool_field(v, "disable_parallel_tool_use", "tool_choice.disable_parallel_tool_use")
    return ToolChoice(mode, name), (False if off else None)  # type: ignore[arg-type]


# ==== Internal -> Anthropic backend ====


def to_upstream(req: Request, model: str, *, default_max_tokens: int = DEFAULT_MAX_TOKENS
                ) -> dict[str, Any]:
    """The Messages body for an Anthropic backend serving ``model``.

    Consecutive turns of one role merge into one (OpenAI's tool messages and the user message
    after them become one user turn, results first, as Anthropic requires).

    Raises:
        Untranslatable: a part, tool or field that Anthropic Messages cannot carry.
    """
    same = req.protocol == PROTOCOL
    msgs: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role == "system":
            raise Untranslatable(where, "a system message inside the conversation: Anthropic "
                                 "takes system text only before it")
        if m.name is not None:
            raise Untranslatable(f"{where}.name", "Anthropic has no participant names")
        blocks = [_render_block(p, f"{where}.content[{j}]", same) for j, p in enumerate(m.parts)
                  if not (isinstance(p, Text) and not p.text)]  # Anthropic refuses empty text
        if msgs and msgs[-1]["role"] == m.role:
            msgs[-1]["content"].extend(blocks)
        else:
            msgs.append({"role": m.role, "content": blocks})
    body: dict[str, Any] = {"model": model, "messages": msgs,
                            "max_tokens": req.max_tokens or default_max_tokens}
    if req.system:
        body["system"] = [{"type": "text", "text": t.text} for t in req.system if t.text]
    if req.tools:
        body["tools"] = [_render_tool(t, same) for t in req.tools]
    choice = _render_choice(req)
    if choice is not None:
        body["tool_choice"] = choice
    if req.temperature is not None:
        if req.temperature > 1.0:
            raise Untranslatable("temperature", f"{req.temperature:g} is over Anthropic's "
                                 "maximum of 1")
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.stop:
        body["stop_sequences"] = list(req.stop)
    if req.stream:
        body["stream"] = True
    if req.response_format is not None:
        body["output_config"] = {"format": _render_format(req.response_format)}
    if req.user is not None:
        body["metadata"] = {"user_id": req.user}
    body.update(check_extras(req, PROTOCOL))
    return body


def upstream_headers(api_key: str | None) -> dict[str, str]:
    """The headers an Anthropic backend needs beside the body (its key in ``x-api-key``)."""
    h = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
    if api_key is not None:
        h["x-api-key"] = api_key
    return h


def _foreign(p: Opaque, same: bool) -> dict[str, Any]:
    if same:
        return dict(p.raw)
    raise Untranslatable(p.field, f"{p.raw.get('type')!r} has no equivalent in Anthropic "
                         "Messages")


def _render_image(p: Image, where: str) -> dict[str, Any]:
    if p.detail not in (None, "auto"):
        raise Untranslatable(where, f"image detail {p.detail!r}: Anthropic has no resolution "
                             "setting")
    if p.url is not None:
        return {"type": "image", "source": {"type": "url", "url": p.url}}
    if p.media_type not in MEDIA_TYPES:
        raise Untranslatable(where, f"image type {p.media_type!r}: Anthropic takes "
                             f"{', '.join(sorted(MEDIA_TYPES))}")
    return {"type": "image", "source": {"type": "base64", "media_type": p.media_type,
                                        "data": p.data}}


def _render_block(p: Part, where: str, same: bool) -> dict[str, Any]:
    if isinstance(p, Text):
        return {"type": "text", "text": p.text}
    if isinstance(p, Image):
        return _render_image(p, where)
    if isinstance(p, ToolCall):
        try:
            args = json.loads(p.arguments) if p.arguments.strip() else {}
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise Untranslatable(where, f"the arguments of tool call {p.id!r} are not a JSON "
                                 "object (Anthropic's tool_use input is one)")
        return {"type": "tool_use", "id": p.id, "name": p.name, "input": args}
    if isinstance(p, ToolResult):
        content: list[dict[str, Any]] = [_render_block(c, where, same) for c in p.content]
        out: dict[str, Any] = {"type": "tool_result", "tool_use_id": p.call_id,
                               "content": content}
        if p.is_error:
            out["is_error"] = True
        return out
    return _foreign(p, same)


def _render_tool(t: Tool | Opaque, same: bool) -> dict[str, Any]:
    if isinstance(t, Opaque):
        return _foreign(t, same)
    out: dict[str, Any] = {"name": t.name, "input_schema": t.parameters}
    if t.description is not None:
        out["description"] = t.description
    if t.strict is not None:
        out["strict"] = t.strict
    return out


def _render_format(f: ResponseFormat) -> dict[str, Any]:
    """Anthropic's output format is a JSON schema, always enforced; a schema's name is only
    OpenAI's label for it, but a description guides the model and has no place to go."""
    if f.kind != "json_schema" or f.schema is None:
        raise Untranslatable("response_format", f"{f.kind} without a schema: Anthropic's output "
                             "format is a JSON schema")
    if f.description is not None:
        raise Untranslatable("response_format.json_schema.description", "Anthropic's output "
                             "format has no description")
    return {"type": "json_schema", "schema": f.schema}


def _render_choice(req: Request) -> dict[str, Any] | None:
    tc = req.tool_choice
    if tc is None and req.parallel_tool_calls is not False:
        return None
    kind = {"auto": "auto", "required": "any", "tool": "tool", "none": "none"}[
        tc.mode if tc is not None else "auto"]
    out: dict[str, Any] = {"type": kind}
    if tc is not None and tc.mode == "tool":
        out["name"] = tc.name
    if req.parallel_tool_calls is False and kind != "none":
        out["disable_parallel_tool_use"] = True
    return out
