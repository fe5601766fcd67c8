"""The protocol-neutral request, response and stream events that every client protocol is
parsed into and rendered from (`openai_chat`, `openai_responses`, `anthropic_messages`).

Frozen dataclasses of plain values, built and read without pydantic, so one translation costs
microseconds. A request keeps what its protocol said that has no internal field in two places,
so nothing is lost on the way: `Opaque` parts and tools (a block kept as the client sent it) and
``Request.extra`` (top-level fields). Both go back out only to a backend of the same protocol;
a backend of another protocol gets `Untranslatable`, naming the field.

>>> r = Request((Message("user", (Text("Write a haiku"),)),), model="auto")
>>> r.route_text, r.input_tokens, sorted(r.needs)
('Write a haiku', 4, [])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

__all__ = [
    "IMAGE_TOKENS", "BlockStop", "Event", "Finish", "Image", "Message", "Opaque", "Part",
    "ProtocolError", "Request", "Response", "ResponseFormat", "StopReason", "StreamCollector",
    "Text", "Tool", "ToolCall", "ToolCallDelta", "ToolCallStart", "ToolChoice", "ToolResult",
    "TextDelta", "Untranslatable", "Usage", "check_extras", "to_events",
]

StopReason = Literal["stop", "length", "tool_use", "content_filter"]
STOP_REASONS: frozenset[str] = frozenset(("stop", "length", "tool_use", "content_filter"))

#: Tokens counted per image in the input estimate: about what Anthropic and OpenAI charge for
#: an image near their recommended size (~1.15 megapixels), so a context check errs safe.
IMAGE_TOKENS = 1600


# ==== Errors ====


class ProtocolError(ValueError):
    """A body that cannot be used: ``status`` is the HTTP status to answer (400 for a client's
    body, 502 for a backend's answer), ``field`` the path of the offending field. Each protocol
    module renders it in its own error shape (``error_body``)."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = f"{field}: {message}"


class Untranslatable(ProtocolError):
    """A field that the target protocol (or the internal model) cannot carry: a 400 naming the
    field, never a silent drop."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(400, field, why)
        self.why = why


# ==== Request ====


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Image:
    """An image by ``url`` or by base64 ``data`` with its ``media_type`` (exactly one of the
    two). ``detail`` is OpenAI's resolution hint ("low", "high", "auto") or None."""

    url: str | None = None
    data: str | None = None
    media_type: str | None = None
    detail: str | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.data is None):
            raise ValueError("Image needs exactly one of url and data")
        if self.data is not None and not self.media_type:
            raise ValueError("Image given as data needs its media_type")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call by the model: ``arguments`` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Opaque:
    """A part or tool with no internal equivalent, kept as ``raw`` from ``protocol``: only a
    backend of that protocol can take it; ``field`` names it in the error for any other."""

    protocol: str
    field: str
    raw: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    content: tuple[Text | Image | Opaque, ...]
    is_error: bool = False


Part = Text | Image | ToolCall | ToolResult | Opaque


@dataclass(frozen=True, slots=True)
class Message:
    """One turn. Roles: "user" (tool results travel in user turns, as Anthropic sends them),
    "assistant", and "system" for a system message in mid-conversation (leading ones are
    ``Request.system``). ``name`` is OpenAI's participant name."""

    role: Literal["user", "assistant", "system"]
    parts: tuple[Part, ...]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str | None
    parameters: Mapping[str, Any]
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """"auto", "none", "required" (some tool), or "tool" (the tool ``name``)."""

    mode: Literal["auto", "none", "required", "tool"]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: "json_object" (any JSON) or "json_schema" (``schema`` by ``name``)."""

    kind: Literal["json_object", "json_schema"]
    name: str | None = None
    schema: Mapping[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """One client request in protocol-neutral form.

    ``route_text`` (the latest user turn's text: what the router tags, as the chat endpoint
    does), ``needs`` (capabilities used: "tools", "vision", "json_schema") and
    ``input_tokens`` (an estimate: all text characters / 4 rounded up plus `IMAGE_TOKENS` per
    image, or the sum of ``count_tokens`` over the texts when given; `Opaque` blocks are not
    counted) are derived on construction. ``extra`` holds top-level fields of ``protocol``
    with no internal field; ``droppable`` names those of them that only concern the
    provider's bookkeeping (``store``, ``service_tier``), which another backend may go without.
    """

    messages: tuple[Message, ...]
    model: str = ""
    system: tuple[Text, ...] = ()
    tools: tuple[Tool | Opaque, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    #: The client wants token usage in the stream (OpenAI's stream_options.include_usage).
    stream_usage: bool = False
    response_format: ResponseFormat | None = None
    session_id: str | None = None
    user: str | None = None
    #: A stored conversation the caller must prepend (Responses' previous_response_id).
    previous_response_id: str | None = None
    protocol: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    droppable: frozenset[str] = frozenset()
    count_tokens: InitVar[Callable[[str], int] | None] = None
    route_text: str = field(init=False)
    needs: frozenset[str] = field(init=False)
    input_tokens: int = field(init=False)

    def __post_init__(self, count_tokens: Callable[[str], int] | None) -> None:
        texts: list[str] = [t.text for t in self.system]
        images = 0
        needs: set[str] = set()
        route = ""
        for m in self.messages:
            said: list[str] | None = None
            for p in m.parts:
                if isinstance(p, Text):
                    texts.append(p.text)
                    if m.role == "user":
                        said = [*(said or ()), p.text]
                elif isinstance(p, Image):
                    images += 1
                    said = said if said is not None else []
                elif isinstance(p, ToolCall):
                    needs.add("tools")
                    texts += (p.name, p.arguments)
                elif isinstance(p, ToolResult):
                    needs.add("tools")
                    for c in p.content:
                        if isinstance(c, Text):
                            texts.append(c.text)
                        elif isinstance(c, Image):
                            images += 1
                elif m.role == "user":  # an Opaque part of a user turn: a turn all the same
                    said = said if said is not None else []
            # A user turn of only tool results is the answer to a call, not something the
            # user said (OpenAI sends it as "tool" messages, which the router skips).
            if m.role == "user" and said is not None:
                route = "\n".join(said)
        for t in self.tools:
            needs.add("tools")
            if isinstance(t, Tool):
                texts += (t.name, t.description or "", str(t.parameters))
        if images:
            needs.add("vision")
        if self.response_format is not None:
            needs.add("json_schema")
        if count_tokens is None:
            tokens = math.ceil(sum(map(len, texts)) / 4)
        else:
            tokens = sum(count_tokens(t) for t in texts)
        object.__setattr__(self, "route_text", route)
        object.__setattr__(self, "needs", frozenset(needs))
        object.__setattr__(self, "input_tokens", tokens + images * IMAGE_TOKENS)

    @property
    def in_tool_loop(self) -> bool:
        """True while the conversation waits on tool results or the model's answer to them:
        the last turn carries tool results, or is an assistant turn that called tools (the
        gateway keeps such a turn on the model that made the calls)."""
        if not self.messages:
            return False
        last = self.messages[-1]
        kind = ToolCall if last.role == "assistant" else ToolResult
        return any(isinstance(p, kind) for p in last.parts)


def check_extras(req: Request, target: str) -> dict[str, Any]:
    """The extra fields to send to a ``target``-protocol backend: all of them when the request
    came in that protocol; else none, after checking that each may be dropped.

    Raises:
        Untranslatable: an extra field that changes the answer and ``target`` cannot carry.
    """
    if req.protocol == target:
        return dict(req.extra)
    for k in req.extra:
        if k not in req.droppable:
            raise Untranslatable(k, f"a {req.protocol} field with no equivalent for a backend "
                                 f"speaking {target}")
    return {}


# ==== Response and stream events ====


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Response:
    """A backend's answer: text and tool calls in order, the stop reason in the internal
    vocabulary ("stop", "length", "tool_use", "content_filter") and the usage when known."""

    parts: tuple[Text | ToolCall, ...]
    stop_reason: StopReason
    usage: Usage | None = None
    model: str = ""
    id: str = ""
    #: The stop sequence that ended the answer, when the backend says which.
    stop_sequence: str | None = None

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, Text))

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [p for p in self.parts if isinstance(p, ToolCall)]

    def as_message(self) -> Message:
        """The answer as the assistant turn a later request carries."""
        return Message("assistant", self.parts)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Text for content block ``index`` (a block starts with its first delta)."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """More of the arguments JSON text of the tool call in block ``index``."""

    index: int
    arguments: str


@dataclass(frozen=True, slots=True)
class BlockStop:
    index: int


@dataclass(frozen=True, slots=True)
class Finish:
    stop_reason: StopReason
    usage: Usage | None = None
    stop_sequence: str | None = None


Event = TextDelta | ToolCallStart | ToolCallDelta | BlockStop | Finish


class StreamCollector:
    """Assembles stream events into the `Response` they add up to (for a stored conversation,
    a final event that repeats the whole answer, or a test).

    Blocks are numbered by their order of appearance, each one text or one tool call; the
    parsers emit them one at a time (a block stops before the next starts).
    """

    def __init__(self, model: str = "", id: str = "") -> None:
        self.model = model
        self.id = id
        self._texts: dict[int, list[str]] = {}
        self._calls: dict[int, tuple[str, str, list[str]]] = {}
        self._order: list[int] = []
        self.finish: Finish | None = None

    def add(self, e: Event) -> None:
        if isinstance(e, TextDelta):
            if e.index not in self._texts:
                self._order.append(e.index)
                self._texts[e.index] = []
            self._texts[e.index].append(e.text)
        elif isinstance(e, ToolCallStart):
            self._order.append(e.index)
            self._calls[e.index] = (e.id, e.name, [])
        elif isinstance(e, ToolCallDelta):
            self._calls[e.index][2].append(e.arguments)
        elif isinstance(e, Finish):
            self.finish = e

    def extend(self, events: Iterable[Event]) -> None:
        for e in events:
            self.add(e)

    def response(self) -> Response:
        """The answer so far (stop reason "stop" until a `Finish` came)."""
        parts: list[Text | ToolCall] = []
        for i in self._order:
            if i in self._texts:
                parts.append(Text("".join(self._texts[i])))
            else:
                cid, name, args = self._calls[i]
                parts.append(ToolCall(cid, name, "".join(args)))
        f = self.finish or Finish("stop")
        return Response(tuple(parts), f.stop_reason, f.usage, self.model, self.id,
                        f.stop_sequence)


def to_events(resp: Response) -> list[Event]:
    """The stream events that add up to ``resp``: to stream an answer that came whole."""
    out: list[Event] = []
    for i, p in enumerate(resp.parts):
        if isinstance(p, Text):
            out.append(TextDelta(i, p.text))
        else:
            out.append(ToolCallStart(i, p.id, p.name))
            if p.arguments:
                out.append(ToolCallDelta(i, p.arguments))
        out.append(BlockStop(i))
    out.append(Finish(resp.stop_reason, resp.usage, resp.stop_sequence))
    return out
