"""The gateway's protocol edge (serve/edge): OpenAI chat completions, OpenAI Responses and
Anthropic Messages parsed into one internal request and rendered back, within a protocol and
across, streams included.

Rendered output is checked with the official SDKs' own types and stream parsers (``openai``,
``anthropic``) over an ``httpx.MockTransport``: the wire format is proven without a server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagrouter_fast.serve.edge import anthropic_messages as am
from tagrouter_fast.serve.edge import openai_chat as oc
from tagrouter_fast.serve.edge import openai_responses as orr
from tagrouter_fast.serve.edge.sse import SSEDecoder, SSEEvent, encode
from tagrouter_fast.serve.edge.wire import (
    IMAGE_TOKENS,
    BlockStop,
    Event,
    Finish,
    Image,
    Message,
    ProtocolError,
    Request,
    Response,
    StreamCollector,
    Text,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolResult,
    Untranslatable,
    Usage,
    to_events,
)

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"]}
PNG = "iVBORw0KGgo="


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated, in range)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def parse_stream(parser: Any, chunks: Sequence[bytes]) -> list[Event]:
    events: list[Event] = []
    for c in chunks:
        events += parser.feed(c)
    return events + parser.close()


def render_stream(renderer: Any, events: Sequence[Event]) -> bytes:
    return b"".join(renderer.render(e) for e in events)


def sse_names(data: bytes) -> list[str | None]:
    return [e.event for e in SSEDecoder().feed(data)]


def mock_client(sdk: Any, body: bytes | dict[str, Any], seen: list[dict[str, Any]],
                stream: bool = False) -> Any:
    """An SDK client whose every call is answered with ``body`` (and whose request bodies
    land in ``seen``)."""

    def client(http: Any) -> Any:
        def handler(request: Any) -> Any:
            seen.append(json.loads(request.content))
            if stream:
                return http.Response(200, content=body,
                                     headers={"content-type": "text/event-stream"})
            return http.Response(200, json=body)

        c = http.Client(transport=http.MockTransport(handler))
        if sdk is openai:
            return openai.OpenAI(api_key="k", base_url="http://gw.test/v1", max_retries=0,
                                 http_client=c)
        return anthropic.Anthropic(api_key="k", base_url="http://gw.test", max_retries=0,
                                   http_client=c)

    try:
        return client(httpx)
    except TypeError:  # anthropic >= 2.17 runs on httpx2 (the same API) and refuses httpx's
        return client(pytest.importorskip("httpx2"))


# ==== The internal model ====


def test_route_text_is_the_latest_user_turn_and_tool_results_do_not_count() -> None:
    req = Request((
        Message("user", (Text("first"),)),
        Message("assistant", (ToolCall("c1", "f", "{}"),)),
        Message("user", (Text("second"), Text("part"))),
        Message("assistant", (ToolCall("c2", "f", "{}"),)),
        Message("user", (ToolResult("c2", (Text("42"),)),)),
    ))
    assert req.route_text == "second\npart"
    assert req.in_tool_loop
    assert not Request((Message("user", (Text("x"),)),)).in_tool_loop
    # An image-only turn is something the user said: there is no text to route on.
    assert Request((Message("user", (Text("a"),)),
                    Message("user", (Image(url="http://x/i.png"),)))).route_text == ""


def test_needs_and_the_token_estimate() -> None:
    text = "x" * 10
    req = Request((Message("user", (Text(text), Image(data=PNG, media_type="image/png"))),),
                  system=(Text("abc"),))
    assert req.needs == {"vision"}
    assert req.input_tokens == math.ceil(13 / 4) + IMAGE_TOKENS
    counted = Request((Message("user", (Text("one two three"),)),),
                      count_tokens=lambda s: len(s.split()))
    assert counted.input_tokens == 3
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_object"}}
    assert oc.parse_request(body).needs == {"tools", "json_schema"}


def test_image_needs_one_source() -> None:
    with pytest.raises(ValueError):
        Image()
    with pytest.raises(ValueError):
        Image(data=PNG)  # no media type


# ==== SSE framing ====


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([None, "a", "message_delta"]),
                          st.text(st.characters(blacklist_categories=["Cs"],
                                                blacklist_characters="\r\n"), min_size=1)),
                max_size=6),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_sse_decoder_gives_the_same_events_however_the_bytes_are_cut(
        events: list[tuple[str | None, str]], cuts: list[int]) -> None:
    data = b"".join(encode(d, e) for e, d in events)
    d = SSEDecoder()
    got: list[SSEEvent] = []
    for c in split(data, cuts):
        got += d.feed(c)
    got += d.close()
    assert got == [SSEEvent(e, d) for e, d in events]


def test_sse_decoder_crlf_comments_unterminated_tail_and_bound() -> None:
    d = SSEDecoder()
    assert d.feed(b": keep-alive\r\nevent: x\r\ndata: 1\r\ndata: 2\r\n\r\ndata: tail") == [
        SSEEvent("x", "1\n2")]
    assert d.close() == [SSEEvent(None, "tail")]
    with pytest.raises(ProtocolError) as e:
        SSEDecoder(max_event_bytes=16).feed(b"data: " + b"x" * 64)
    assert e.value.status == 502


# ==== OpenAI chat completions ====


CHAT_BODY: dict[str, Any] = {
    "model": "auto",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather in this city?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}",
                                                "detail": "auto"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather",
                                                "parameters": WEATHER, "strict": True}}],
    "tool_choice": "auto", "parallel_tool_calls": False, "max_tokens": 200,
    "temperature": 0.5, "top_p": 0.9, "stop": ["END"], "stream": True,
    "stream_options": {"include_usage": True}, "user": "u-1",
    "response_format": {"type": "json_schema", "json_schema": {
        "name": "w", "schema": WEATHER, "strict": True}},
    "seed": 7, "store": True,
}


def test_chat_request_round_trips_every_feature() -> None:
    req = oc.parse_request(CHAT_BODY, session_id="s-9")
    assert req.route_text == "And tomorrow?"
    assert req.session_id == "s-9" and req.user == "u-1"
    assert req.needs == {"tools", "vision", "json_schema"}
    assert req.messages[2].parts == (ToolResult("call_1", (Text("18C, sunny"),)),)
    assert oc.to_upstream(req, "gpt-4o") == {**CHAT_BODY, "model": "gpt-4o"}


def test_chat_request_as_the_openai_sdk_sends_it() -> None:
    seen: list[dict[str, Any]] = []
    client = mock_client(openai, {"id": "c", "object": "chat.completion", "created": 0,
                                  "model": "m", "choices": []}, seen)
    client.chat.completions.create(model="auto", messages=CHAT_BODY["messages"],
                                   tools=CHAT_BODY["tools"], max_completion_tokens=50)
    req = oc.parse_request(seen[0])
    assert req.max_tokens == 50 and req.tools[0].name == "weather"  # type: ignore[union-attr]
    assert oc.to_upstream(req, "m", max_tokens_field="max_completion_tokens")["messages"] \
        == CHAT_BODY["messages"]


CHAT_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
        "role": "assistant", "content": "Let me look.", "refusal": None, "tool_calls": [
            {"id": "call_2", "type": "function",
             "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
}


@pytest.mark.parametrize("finish,stop", [("stop", "stop"), ("length", "length"),
                                         ("tool_calls", "tool_use"),
                                         ("content_filter", "content_filter")])
def test_chat_answer_round_trips_with_each_stop_reason(finish: str, stop: str) -> None:
    body = json.loads(json.dumps(CHAT_ANSWER))
    body["choices"][0]["finish_reason"] = finish
    resp = oc.parse_response(body)
    assert resp.stop_reason == stop
    assert resp.usage == Usage(30, 9)
    assert resp.parts == (Text("Let me look."), ToolCall("call_2", "weather", '{"city":"Oslo"}'))
    out = oc.render_response(resp, created=1)
    assert out == body
    openai.types.chat.ChatCompletion.model_validate(out)


def test_chat_stream_parses_and_renders_through_the_sdk() -> None:
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1",
         "type": "function", "function": {"name": "weather", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "{\"city\":"}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "\"Rome\"}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                                  "total_tokens": 12}},
    ]
    head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 3, "model": "m"}
    upstream = b"".join(encode(json.dumps({**head, **c})) for c in chunks) + b"data: [DONE]\n\n"
    events = parse_stream(oc.StreamParser(), split(upstream, [7, 100, 333]))
    assert events == [
        TextDelta(0, "Hel"), TextDelta(0, "lo"), BlockStop(0),
        ToolCallStart(1, "call_1", "weather"), ToolCallDelta(1, '{"city":'),
        ToolCallDelta(1, '"Rome"}'), BlockStop(1),
        Finish("tool_use", Usage(5, 7))]
    sse = render_stream(oc.StreamRenderer(model="m", id="chatcmpl-9", created=3,
                                          include_usage=True), events)
    seen: list[dict[str, Any]] = []
    client = mock_client(openai, sse, seen, stream=True)
    with client.chat.completions.stream(model="m", messages=[{"role": "user", "content": "x"}]
                                        ) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    msg = final.choices[0].message
    assert msg.content == "Hello" and final.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls[0].function.arguments == '{"city":"Rome"}'
    assert final.usage.prompt_tokens == 5 and final.usage.completion_tokens == 7


def test_chat_stream_that_never_finishes_is_a_502() -> None:
    p = oc.StreamParser()
    p.feed(encode(json.dumps({"choices": [{"index": 0, "delta": {"content": "x"}}]})))
    with pytest.raises(ProtocolError) as e:
        p.close()
    assert e.value.status == 502


# ==== Anthropic Messages ====


ANTHROPIC_BODY: dict[str, Any] = {
    "model": "claude", "max_tokens": 300,
    "system": [{"type": "text", "text": "Be brief."}],
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "Weather here?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
             "content": [{"type": "text", "text": "service down"}]},
            {"type": "text", "text": "Try again"}]},
    ],
    "tools": [{"name": "weather", "description": "Weather", "input_schema": WEATHER}],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "stop_sequences": ["END"], "temperature": 0.3, "top_p": 0.8, "stream": True,
    "metadata": {"user_id": "u-2"}, "top_k": 5,
    "output_config": {"format": {"type": "json_schema", "schema": WEATHER}},
}


def test_anthropic_request_round_trips_every_feature() -> None:
    req = am.parse_request(ANTHROPIC_BODY)
    assert req.route_text == "Try again" and req.session_id == "u-2"
    assert req.parallel_tool_calls is False
    assert req.needs == {"tools", "vision", "json_schema"}
    assert am.to_upstream(req, "claude-x") == {**ANTHROPIC_BODY, "model": "claude-x"}


def test_anthropic_request_as_the_sdk_sends_it_and_max_tokens_is_required() -> None:
    seen: list[dict[str, Any]] = []
    client = mock_client(anthropic, am.render_response(Response((Text("ok"),), "stop")), seen)
    client.messages.create(model="claude", max_tokens=64, system="Be brief.",
                           messages=ANTHROPIC_BODY["messages"], tools=ANTHROPIC_BODY["tools"])
    req = am.parse_request(seen[0])
    assert req.system == (Text("Be brief."),) and req.max_tokens == 64
    assert am.to_upstream(req, "claude")["messages"] == ANTHROPIC_BODY["messages"]
    with pytest.raises(ProtocolError) as e:
        am.parse_request({k: v for k, v in seen[0].items() if k != "max_tokens"})
    assert (e.value.status, e.value.field) == (400, "max_tokens")
    assert am.error_body(e.value) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": e.value.message}}


@pytest.mark.parametrize("reason,stop,seq", [
    ("end_turn", "stop", None), ("stop_sequence", "stop", "END"), ("max_tokens", "length", None),
    ("tool_use", "tool_use", None), ("refusal", "content_filter", None)])
def test_anthropic_answer_round_trips_with_each_stop_reason(
        reason: str, stop: str, seq: str | None) -> None:
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [{"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_2", "name": "weather",
                         "input": {"city": "Oslo"}}],
            "stop_reason": reason, "stop_sequence": seq,
            "usage": {"input_tokens": 20, "output_tokens": 8}}
    resp = am.parse_response(body)
    assert (resp.stop_reason, resp.stop_sequence, resp.usage) == (stop, seq, Usage(20, 8))
    out = am.render_response(resp)
    assert out == body
    anthropic.types.Message.model_validate(out)


def test_anthropic_usage_counts_cached_prompt_tokens() -> None:
    body = {"content": [], "stop_reason": "end_turn", "usage": {
        "input_tokens": 3, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20,
        "output_tokens": 1}}
    assert am.parse_response(body).usage == Usage(123, 1)


def anthropic_upstream_sse() -> bytes:
    evs: list[dict[str, Any]] = [
        {"type": "message_start", "message": {
            "id": "msg_7", "type": "message", "role": "assistant", "content": [],
            "model": "claude", "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 11, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                                                              "text": "Sun"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                                                              "text": "ny"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_3", "name": "weather", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                              "partial_json": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                              "partial_json": "{\"city\": "}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                              "partial_json": "\"Rome\"}"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
    ]
    return b"".join(encode(json.dumps(e), e["type"]) for e in evs)


ANTHROPIC_EVENTS: list[Event] = [
    TextDelta(0, ""), TextDelta(0, "Sun"), TextDelta(0, "ny"), BlockStop(0),
    ToolCallStart(1, "toolu_3", "weather"), ToolCallDelta(1, '{"city": '),
    ToolCallDelta(1, '"Rome"}'), BlockStop(1), Finish("tool_use", Usage(11, 15))]

ANTHROPIC_SEQUENCE = [
    "message_start", "content_block_start", "content_block_delta", "content_block_delta",
    "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
    "content_block_stop", "message_delta", "message_stop"]


def anthropic_sdk_final(sse: bytes) -> Any:
    client = mock_client(anthropic, sse, [], stream=True)
    with client.messages.stream(model="claude", max_tokens=10,
                                messages=[{"role": "user", "content": "x"}]) as s:
        for _ in s:
            pass
        return s.get_final_message()


def test_anthropic_stream_parses_and_renders_through_the_sdk() -> None:
    events = parse_stream(am.StreamParser(), split(anthropic_upstream_sse(), [5, 90, 400, 401]))
    assert events == ANTHROPIC_EVENTS
    sse = render_stream(am.StreamRenderer(model="claude", id="msg_7", input_tokens=11), events)
    assert sse_names(sse) == ANTHROPIC_SEQUENCE
    final = anthropic_sdk_final(sse)
    assert final.content[0].text == "Sunny"
    assert final.content[1].input == {"city": "Rome"} and final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 15)


def test_anthropic_stream_error_event_is_a_502() -> None:
    with pytest.raises(ProtocolError) as e:
        am.StreamParser().feed(am.error_event(529, "busy"))
    assert e.value.status == 502 and "busy" in e.value.message
    assert am.error_for(529, "busy")["error"]["type"] == "overloaded_error"
    assert am.error_for(503, "x")["error"]["type"] == "api_error"
    assert am.error_for(429, "x")["error"]["type"] == "rate_limit_error"
    h = am.upstream_headers("sk-ant")
    assert h["x-api-key"] == "sk-ant" and h["anthropic-version"] == am.ANTHROPIC_VERSION


# ==== Across protocols ====


def test_anthropic_client_through_an_openai_backend() -> None:
    req = am.parse_request({**ANTHROPIC_BODY, "stream": False, "top_k": None,
                            "output_config": None})
    up = oc.to_upstream(req, "gpt-4o")
    assert up == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1",
             "content": oc.TOOL_ERROR_PREFIX + "service down"},
            {"role": "user", "content": "Try again"}],
        "tools": [{"type": "function", "function": {
            "name": "weather", "description": "Weather", "parameters": WEATHER}}],
        "tool_choice": "auto", "parallel_tool_calls": False, "max_tokens": 300,
        "temperature": 0.3, "top_p": 0.8, "stop": ["END"], "user": "u-2"}
    resp = oc.parse_response(CHAT_ANSWER)
    out = am.render_response(resp, model="claude")
    msg = anthropic.types.Message.model_validate(out)
    assert msg.content[0].text == "Let me look." and msg.content[1].input == {"city": "Oslo"}
    assert msg.stop_reason == "tool_use" and msg.usage.output_tokens == 9


def test_openai_client_through_an_anthropic_backend() -> None:
    body = {k: v for k, v in CHAT_BODY.items()
            if k not in ("seed", "response_format", "stream", "stream_options")}
    body["messages"] = [*CHAT_BODY["messages"][:1],
                        {**CHAT_BODY["messages"][1], "content": [
                            CHAT_BODY["messages"][1]["content"][0],
                            {"type": "image_url", "image_url": {
                                "url": f"data:image/png;base64,{PNG}"}}]},
                        *CHAT_BODY["messages"][2:]]
    up = am.to_upstream(oc.parse_request(body), "claude")
    assert up == {
        "model": "claude", "max_tokens": 200,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in this city?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG}}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [  # the tool message and the next user turn, merged
                {"type": "tool_result", "tool_use_id": "call_1",
                 "content": [{"type": "text", "text": "18C, sunny"}]},
                {"type": "text", "text": "And tomorrow?"}]}],
        "tools": [{"name": "weather", "description": "Weather", "input_schema": WEATHER,
                   "strict": True}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "temperature": 0.5, "top_p": 0.9, "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"}}  # store (bookkeeping) is dropped, nothing else
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
              "content": [{"type": "text", "text": "Tomorrow: rain."}],
              "stop_reason": "max_tokens", "stop_sequence": None,
              "usage": {"input_tokens": 40, "output_tokens": 200}}
    out = oc.render_response(am.parse_response(answer), model="claude")
    done = openai.types.chat.ChatCompletion.model_validate(out)
    assert done.choices[0].message.content == "Tomorrow: rain."
    assert done.choices[0].finish_reason == "length" and done.usage.total_tokens == 240


def test_openai_upstream_stream_to_an_anthropic_client() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt"}
    chunks: list[dict[str, Any]] = [
              {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "It is "}}]},
              {"choices": [{"index": 0, "delta": {"content": "warm."}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "id": "call_5", "type": "function",
                   "function": {"name": "weather", "arguments": "{\"ci"}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": "ty\":\"Nice\"}"}}]}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 6,
                                        "total_tokens": 18}}]
    upstream = b"".join(encode(json.dumps({**head, **c})) for c in chunks) + b"data: [DONE]\n\n"
    events = parse_stream(oc.StreamParser(), split(upstream, range(0, len(upstream), 17)))
    sse = render_stream(am.StreamRenderer(model="claude", input_tokens=10), events)
    assert sse_names(sse) == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    final = anthropic_sdk_final(sse)
    assert final.content[0].text == "It is warm." and final.content[1].id == "call_5"
    assert final.content[1].input == {"city": "Nice"} and final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 6)


def test_anthropic_upstream_stream_to_an_openai_client() -> None:
    events = parse_stream(am.StreamParser(), [anthropic_upstream_sse()])
    sse = render_stream(oc.StreamRenderer(model="claude", include_usage=True), events)
    client = mock_client(openai, sse, [], stream=True)
    with client.chat.completions.stream(model="m", messages=[{"role": "user", "content": "x"}]
                                        ) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert final.choices[0].message.content == "Sunny"
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"city": "Rome"}'
    assert final.choices[0].finish_reason == "tool_calls" and final.usage.total_tokens == 26


# ==== OpenAI Responses ====


RESPONSES_BODY: dict[str, Any] = {
    "model": "auto", "instructions": "Be brief.",
    "input": [
        {"role": "user", "content": [
            {"type": "input_text", "text": "Weather here?"},
            {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "auto"}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather",
         "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"role": "user", "content": "Tomorrow?"},
    ],
    "tools": [{"type": "function", "name": "weather", "description": "Weather",
               "parameters": WEATHER, "strict": True}],
    "max_output_tokens": 100, "temperature": 0.2, "store": True,
    "text": {"format": {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True}},
}


def test_responses_request_to_a_chat_backend() -> None:
    req = orr.parse_request(RESPONSES_BODY)
    assert req.route_text == "Tomorrow?" and req.needs == {"tools", "vision", "json_schema"}
    up = oc.to_upstream(req, "gpt-4o")
    assert up["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather here?"},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "auto"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "user", "content": "Tomorrow?"}]
    assert up["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "w", "schema": WEATHER, "strict": True}}
    assert (up["max_tokens"], up["temperature"]) == (100, 0.2) and "store" not in up


def test_responses_request_as_the_sdk_sends_it() -> None:
    seen: list[dict[str, Any]] = []
    resp = Response((Text("ok"),), "stop", Usage(1, 1))
    client = mock_client(openai, orr.render_response(resp, id="resp_1"), seen)
    out = client.responses.create(model="auto", input=RESPONSES_BODY["input"],
                                  instructions="Be brief.", tools=RESPONSES_BODY["tools"])
    assert out.output_text == "ok"
    req = orr.parse_request(seen[0])
    assert len(req.messages) == 4 and req.system == (Text("Be brief."),)


def test_responses_object_validates_and_carries_everything() -> None:
    req = orr.parse_request({**RESPONSES_BODY, "previous_response_id": "resp_0"})
    resp = oc.parse_response(CHAT_ANSWER)
    out = orr.render_response(resp, id="resp_9", req=req, created_at=5)
    r = openai.types.responses.Response.model_validate(out)
    assert r.output_text == "Let me look." and r.status == "completed"
    assert [o.type for o in r.output] == ["message", "function_call"]
    call = r.output[1]
    assert (call.call_id, call.name, call.arguments) == ("call_2", "weather", '{"city":"Oslo"}')
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (30, 9, 39)
    assert r.previous_response_id == "resp_0" and r.tools[0].name == "weather"
    cut = orr.render_response(Response((Text("par"),), "length"), id="resp_8")
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}


def test_responses_stream_from_an_anthropic_backend_through_the_sdk() -> None:
    events = parse_stream(am.StreamParser(), [anthropic_upstream_sse()])
    req = orr.parse_request({"model": "auto", "input": "Weather?", "stream": True})
    sse = render_stream(orr.StreamRenderer(id="resp_3", model="claude", req=req), events)
    decoded = SSEDecoder().feed(sse)
    assert [e.event for e in decoded] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [json.loads(e.data)["sequence_number"] for e in decoded] == list(range(len(decoded)))
    client = mock_client(openai, sse, [], stream=True)
    with client.responses.stream(model="auto", input="Weather?") as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == "Sunny" == final.output_text
    assert final.output[1].arguments == '{"city": "Rome"}' and final.usage.total_tokens == 26


def test_previous_response_id_prepends_the_stored_conversation() -> None:
    first = orr.parse_request({"model": "auto", "input": "Name a city"})
    answer = Response((Text("Paris"),), "stop")
    stored = orr.conversation(first, answer)
    follow = orr.parse_request({"model": "auto", "input": "Its weather?",
                                "previous_response_id": "resp_1", "instructions": "Short"})
    assert follow.previous_response_id == "resp_1"
    full = orr.with_history(follow, stored)
    assert [m.parts for m in full.messages] == [
        (Text("Name a city"),), (Text("Paris"),), (Text("Its weather?"),)]
    assert full.route_text == "Its weather?" and full.input_tokens > follow.input_tokens
    assert full.system == (Text("Short"),)


# ==== What cannot be translated, and bad input ====


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


@pytest.mark.parametrize("parse,body,field", [
    (orr.parse_request, {"model": "m", "input": "x", "tools": [{"type": "web_search"}]},
     "tools[0]"),
    (orr.parse_request, {"model": "m", "input": "x", "reasoning": {"effort": "high"}},
     "reasoning"),
    (orr.parse_request, {"model": "m", "input": [{"type": "item_reference", "id": "x"}]},
     "input[0]"),
    (orr.parse_request, {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
])
def test_responses_features_no_backend_has_are_named(
        parse: Callable[..., Request], body: dict[str, Any], field: str) -> None:
    with pytest.raises(Untranslatable) as e:
        parse(body)
    assert e.value.field == field and e.value.status == 400
    assert oc.error_body(e.value)["error"]["param"] == field


@pytest.mark.parametrize("body,field", [
    (_chat(n=2), "n"),
    (_chat(seed=1), "seed"),
    (_chat(temperature=1.5), "temperature"),
    (_chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}]}]),
     "messages[0].content[0]"),
    (_chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/i.png", "detail": "low"}}]}]),
     "messages[0].content[0]"),
    (_chat(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]),
     "messages[1]"),
    (_chat(messages=[{"role": "user", "content": "a", "name": "bob"}]), "messages[0].name"),
    (_chat(response_format={"type": "json_object"}), "response_format"),
])
def test_openai_fields_an_anthropic_backend_cannot_take_are_named(
        body: dict[str, Any], field: str) -> None:
    req = oc.parse_request(body)
    oc.to_upstream(req, "m")  # an OpenAI backend takes all of them
    with pytest.raises(Untranslatable) as e:
        am.to_upstream(req, "claude")
    assert e.value.field == field


@pytest.mark.parametrize("body,field", [
    ({"messages": [{"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "s"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
      "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                               "data": PNG}}]}]}]}, "messages[0]"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
])
def test_anthropic_fields_an_openai_backend_cannot_take_are_named(
        body: dict[str, Any], field: str) -> None:
    full = {"model": "c", "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], **body}
    req = am.parse_request(full)
    assert am.to_upstream(req, "c") == {**full, "model": "c"}  # an Anthropic backend: as sent
    with pytest.raises(Untranslatable) as e:
        oc.to_upstream(req, "gpt")
    assert e.value.field == field


@pytest.mark.parametrize("parse,body,field", [
    (oc.parse_request, {"messages": []}, "model"),
    (oc.parse_request, {"model": "m", "messages": []}, "messages"),
    (oc.parse_request, _chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (oc.parse_request, _chat(temperature=3), "temperature"),
    (oc.parse_request, _chat(max_tokens=5, max_completion_tokens=6), "max_tokens"),
    (oc.parse_request, _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]),
     "messages[0].content[0].image_url.url"),
    (oc.parse_request, _chat(messages=[{"role": "tool", "content": "x"}]),
     "messages[0].tool_call_id"),
    (am.parse_request, {"model": "c", "max_tokens": 0, "messages": []}, "max_tokens"),
    (am.parse_request, {"model": "c", "max_tokens": 5, "messages": [
        {"role": "system", "content": "x"}]}, "messages[0].role"),
    (am.parse_request, {"model": "c", "max_tokens": 5, "temperature": 1.5, "messages": [
        {"role": "user", "content": "x"}]}, "temperature"),
    (orr.parse_request, {"model": "m"}, "input"),
    (orr.parse_request, {"model": "m", "input": "x", "max_output_tokens": "9"},
     "max_output_tokens"),
])
def test_bad_input_is_a_400_naming_the_field(
        parse: Callable[..., Request], body: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as e:
        parse(body)
    assert (e.value.status, e.value.field) == (400, field)
    assert not isinstance(e.value, Untranslatable)


def test_a_bad_backend_answer_is_a_502() -> None:
    for parse, body in [(oc.parse_response, {"choices": []}),
                        (oc.parse_response, {**CHAT_ANSWER, "choices": [
                            {**CHAT_ANSWER["choices"][0], "finish_reason": "odd"}]}),
                        (am.parse_response, {"content": [{"type": "thinking"}],
                                             "stop_reason": "end_turn", "usage": {}})]:
        with pytest.raises(ProtocolError) as e:
            parse(body)
        assert e.value.status == 502
    with pytest.raises(ProtocolError):  # tool arguments an Anthropic client cannot read
        am.render_response(Response((ToolCall("c", "f", "[1]"),), "tool_use"))


# ==== Properties: any conversation and any answer survive both protocols ====


_text = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20)
_ident = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True)
_args = st.dictionaries(_ident, st.integers() | _text, max_size=3).map(
    lambda d: json.dumps(d, separators=(",", ":"), ensure_ascii=False))
_call = st.builds(ToolCall, _ident, _ident, _args)
_user = st.lists(st.builds(Text, _text), min_size=1, max_size=2) | st.lists(
    st.builds(ToolResult, _ident, st.tuples(st.builds(Text, _text))), min_size=1, max_size=2)
_assistant = st.tuples(st.none() | st.builds(Text, _text), st.lists(_call, max_size=2)).filter(
    lambda t: t[0] is not None or t[1]).map(lambda t: [p for p in (t[0], *t[1]) if p])


@st.composite
def conversations(draw: Any) -> tuple[Message, ...]:
    turns = []
    for i in range(draw(st.integers(1, 5))):
        if i % 2 == 0:
            turns.append(Message("user", tuple(draw(_user))))
        else:
            turns.append(Message("assistant", tuple(draw(_assistant))))
    return tuple(turns)


@settings(max_examples=80, deadline=None)
@given(conversations(), st.lists(_text.map(Text), max_size=2))
def test_any_conversation_survives_both_protocols(
        msgs: tuple[Message, ...], system: list[Text]) -> None:
    req = Request(msgs, model="m", system=tuple(system))
    via_chat = oc.parse_request(oc.to_upstream(req, "m"))
    via_anthropic = am.parse_request(am.to_upstream(req, "m"))
    via_both = am.parse_request(am.to_upstream(via_chat, "m"))
    for got in (via_chat, via_anthropic, via_both):
        assert got.messages == msgs and got.system == tuple(system)
        assert got.route_text == req.route_text and got.needs == req.needs


_answer = st.builds(
    Response,
    st.lists(st.builds(Text, _text) | _call, max_size=4).filter(
        lambda ps: all(not (isinstance(a, Text) and isinstance(b, Text))
                       for a, b in zip(ps, ps[1:], strict=False))).map(tuple),
    st.sampled_from(["stop", "length", "tool_use", "content_filter"]),
    st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**6)))


@settings(max_examples=60, deadline=None)
@given(_answer, st.lists(st.integers(0, 10**5), max_size=6))
def test_any_answer_survives_streaming_in_both_protocols(
        resp: Response, cuts: list[int]) -> None:
    assert resp.usage is not None
    chat = render_stream(oc.StreamRenderer(model="m", include_usage=True), to_events(resp))
    anth = render_stream(am.StreamRenderer(model="m", input_tokens=resp.usage.input_tokens),
                         to_events(resp))
    for parser, data in ((oc.StreamParser(), chat), (am.StreamParser(), anth)):
        c = StreamCollector()
        c.extend(parse_stream(parser, split(data, cuts)))
        assert c.response() == resp
    whole = am.parse_response(am.render_response(resp, id="msg_1", model="m"))
    assert whole == Response(resp.parts, resp.stop_reason, resp.usage, "m", "msg_1")
    # A chat completion holds one text: the answer's texts come back joined, calls after.
    back = oc.parse_response(oc.render_response(resp))
    assert back.parts == ((Text(resp.text),) if resp.text else ()) + tuple(resp.tool_calls)
    assert (back.stop_reason, back.usage) == (resp.stop_reason, resp.usage)


def test_responses_stream_cut_by_max_output_tokens_ends_incomplete() -> None:
    events = [TextDelta(0, "par"), Finish("length", Usage(3, 1))]
    sse = render_stream(orr.StreamRenderer(id="resp_4", model="m"), events)
    last = SSEDecoder().feed(sse)[-1]
    assert last.event == "response.incomplete"
    r = openai.types.responses.ResponseIncompleteEvent.model_validate(json.loads(last.data))
    assert r.response.incomplete_details.reason == "max_output_tokens"
    assert r.response.output_text == "par"
