"""The three protocols through the real gateway (uvicorn on loopback, fake backends of both
protocols), called with the official SDKs: OpenAI Responses (``openai``'s
``client.responses``), Anthropic Messages (``anthropic``'s ``client.messages``) and chat
completions to an Anthropic backend; JSON and streamed, tools, images, errors; routing by
capability (a hypothesis property over random capability sets), the context boundary, a
tokenizer's count, agent loops and sessions that remember what they used."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from serve_helpers import (  # noqa: E402
    MATH,
    POEM,
    Fake,
    RunningGateway,
    fake_backends,
    gateway_config,
    running_gateway,
)

from tagrouter_fast.serve.config import BackendConfig, ConfigError  # noqa: E402
from tagrouter_fast.serve.edge.openai_chat import parse_request  # noqa: E402
from tagrouter_fast.serve.forward.backends import Backend  # noqa: E402

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image bytes").decode()
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


# ==== Fixtures ====


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Fake]]:
    # o*: OpenAI-compatible fakes; a*: Anthropic ones (their names show in their answers).
    with fake_backends("osmall", "obig", "asmall", "abig", anthropic=("asmall", "abig")) as f:
        yield f


@pytest.fixture(scope="module")
def openai_gw(fakes: dict[str, Fake]) -> Iterator[RunningGateway]:
    """Both routed models on OpenAI-compatible backends."""
    cfg = gateway_config({"small": fakes["osmall"].url, "big": fakes["obig"].url})
    with running_gateway(cfg) as g:
        yield g


@pytest.fixture(scope="module")
def mixed_gw(fakes: dict[str, Fake]) -> Iterator[RunningGateway]:
    """small on an Anthropic backend, big on an OpenAI-compatible one."""
    cfg = gateway_config({"small": fakes["asmall"].url, "big": fakes["obig"].url},
                         backend_overrides={"small": {"protocol": "anthropic"}},
                         sessions={"max_stored_responses": 2, "stored_response_ttl_s": 30.0})
    with running_gateway(cfg) as g:
        yield g


@pytest.fixture(scope="module")
def anthropic_gw(fakes: dict[str, Fake]) -> Iterator[RunningGateway]:
    """Both routed models on Anthropic backends."""
    cfg = gateway_config({"small": fakes["asmall"].url, "big": fakes["abig"].url},
                         backend_overrides={"small": {"protocol": "anthropic"},
                                            "big": {"protocol": "anthropic"}})
    with running_gateway(cfg) as g:
        yield g


def oai(g: RunningGateway) -> Any:
    return openai.OpenAI(base_url=g.url + "/v1", api_key="unused", max_retries=0, timeout=10)


def ant(g: RunningGateway, **kw: Any) -> Any:
    return anthropic.Anthropic(base_url=g.url, api_key=kw.pop("api_key", "unused"),
                               max_retries=0, timeout=10, **kw)


def last_body(f: Fake) -> dict[str, Any]:
    body = f.state.bodies[-1]
    assert isinstance(body, dict)
    return body


# ==== POST /v1/messages (the anthropic SDK) ====


@pytest.mark.parametrize("gw_name", ["openai_gw", "anthropic_gw"])
def test_messages_json_routes_and_reports_the_model(gw_name: str, fakes: dict[str, Fake],
                                                    request: pytest.FixtureRequest) -> None:
    g = request.getfixturevalue(gw_name)
    raw = ant(g).messages.with_raw_response.create(
        model="tagrouter", max_tokens=64, system="Be brief",
        messages=[{"role": "user", "content": MATH}])
    msg = raw.parse()
    assert raw.headers["x-tagrouter-model"] == "big"
    assert raw.headers["x-tagrouter-reason"] and raw.headers["x-tagrouter-decision-id"]
    assert msg.model == "big-model" and msg.stop_reason == "end_turn"
    fake = fakes["obig" if gw_name == "openai_gw" else "abig"]
    assert msg.content[0].text == f"{fake.backend.name} answers: {MATH}"
    sent = last_body(fake)
    assert sent["model"] == "big-model"
    if gw_name == "openai_gw":  # translated: the system prompt is chat's first message
        assert sent["messages"][0] == {"role": "system", "content": "Be brief"}
    else:  # same protocol: the client's body as sent (model aside)
        assert sent["system"] == "Be brief" and sent["max_tokens"] == 64


@pytest.mark.parametrize("gw_name", ["openai_gw", "anthropic_gw"])
def test_messages_stream(gw_name: str, request: pytest.FixtureRequest) -> None:
    g = request.getfixturevalue(gw_name)
    with ant(g).messages.stream(model="tagrouter", max_tokens=64,
                                messages=[{"role": "user", "content": POEM}]) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == final.content[0].text
    assert final.content[0].text.endswith(f"answers: {POEM}")
    assert final.model == "small-model" and final.stop_reason == "end_turn"


@pytest.mark.parametrize("gw_name", ["openai_gw", "anthropic_gw"])
@pytest.mark.parametrize("stream", [False, True])
def test_messages_tools_and_the_tool_loop(gw_name: str, stream: bool, fakes: dict[str, Fake],
                                          request: pytest.FixtureRequest) -> None:
    g = request.getfixturevalue(gw_name)
    for f in fakes.values():
        f.backend.command(tool_call=True)
    client = ant(g)
    tools = [{"name": "weather", "description": "Weather of a city", "input_schema": WEATHER}]
    first = [{"role": "user", "content": POEM}]
    meta = {"user_id": f"loop-{gw_name}-{stream}"}  # the session key
    if stream:
        with client.messages.stream(model="tagrouter", max_tokens=64, tools=tools,
                                    messages=first, metadata=meta) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(model="tagrouter", max_tokens=64, tools=tools,
                                     messages=first, metadata=meta)
    call = msg.content[-1]
    assert msg.stop_reason == "tool_use" and call.type == "tool_use"
    assert call.name == "weather" and call.input == {"query": POEM}
    # The tool's result goes back; a maths question would go to big, but the loop stays.
    turn = [*first, {"role": "assistant", "content": [c.model_dump(exclude_none=True)
                                                      for c in msg.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                          "content": "sunny; " + MATH}]}]
    raw = client.messages.with_raw_response.create(model="tagrouter", max_tokens=64,
                                                   tools=tools, messages=turn, metadata=meta)
    assert raw.headers["x-tagrouter-model"] == "small"
    assert raw.headers["x-tagrouter-reason"] == "tool_loop"
    assert "[tool result] sunny" in raw.parse().content[0].text


@pytest.mark.parametrize("gw_name", ["openai_gw", "anthropic_gw"])
def test_messages_images_reach_either_backend(gw_name: str, fakes: dict[str, Fake],
                                              request: pytest.FixtureRequest) -> None:
    g = request.getfixturevalue(gw_name)
    msg = ant(g).messages.create(model="tagrouter", max_tokens=64, messages=[{
        "role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG}},
            {"type": "text", "text": POEM}]}])
    assert msg.content[0].text.endswith(f"{POEM} [images: 1]")
    sent = last_body(fakes["osmall" if gw_name == "openai_gw" else "asmall"])
    part = sent["messages"][-1]["content"][0]
    if gw_name == "openai_gw":
        assert part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    else:
        assert part["source"]["data"] == PNG


def test_messages_errors_in_anthropics_shape(openai_gw: RunningGateway,
                                             fakes: dict[str, Fake]) -> None:
    client = ant(openai_gw)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="nope", max_tokens=8,
                               messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "unknown model 'nope'" in e.value.body["error"]["message"]
    # Anthropic requires max_tokens: the gateway says so, naming the field.
    r = httpx.post(openai_gw.url + "/v1/messages", json={
        "model": "tagrouter", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("max_tokens:")
    # A server tool cannot reach an OpenAI backend: a 400 naming it, nothing dropped.
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tagrouter", max_tokens=8,
                               tools=[{"type": "web_search_20250305", "name": "web_search"}],
                               messages=[{"role": "user", "content": POEM}])
    assert e.value.body["error"]["message"].startswith("tools[0]:")
    # A backend failing: a 5xx in Anthropic's shape, the decision id on it.
    fakes["osmall"].backend.command(mode="error", status=503)
    fakes["obig"].backend.command(mode="error", status=503)
    with pytest.raises(anthropic.APIStatusError) as e:
        client.messages.create(model="tagrouter", max_tokens=8,
                               messages=[{"role": "user", "content": POEM}])
    assert e.value.status_code == 502 and e.value.body["type"] == "error"
    assert e.value.response.headers["x-tagrouter-decision-id"]


def test_messages_stream_broken_midway_ends_with_an_error_event(
        openai_gw: RunningGateway, fakes: dict[str, Fake]) -> None:
    fakes["osmall"].backend.command(mode="reset", reset_after=2, chunks=6)
    with pytest.raises(anthropic.APIStatusError) as e, ant(openai_gw).messages.stream(
            model="tagrouter", max_tokens=64,
            messages=[{"role": "user", "content": POEM}]) as s:
        for _ in s.text_stream:
            pass
    assert "failed mid-stream" in str(e.value)


def test_count_tokens_is_the_gateways_estimate(openai_gw: RunningGateway) -> None:
    n = ant(openai_gw).messages.count_tokens(
        model="tagrouter", system="Be brief",
        messages=[{"role": "user", "content": "p" * 40}])
    assert n.input_tokens == 2 + 10  # "Be brief" and 40 characters, / 4 rounded up
    with pytest.raises(anthropic.BadRequestError) as e:
        ant(openai_gw).messages.count_tokens(model="tagrouter", messages=[])
    assert e.value.body["error"]["message"].startswith("messages:")


def test_x_api_key_carries_the_client_key(fakes: dict[str, Fake]) -> None:
    from tagrouter_fast.serve.learn.keys import new_key

    key, record = new_key("agent", ["route"])
    cfg = gateway_config({"small": fakes["osmall"].url, "big": fakes["obig"].url},
                         auth={"keys": [json.loads(record.line())]})
    with running_gateway(cfg) as g:
        msg = ant(g, api_key=key).messages.create(
            model="tagrouter", max_tokens=8, messages=[{"role": "user", "content": POEM}])
        assert msg.content[0].text.startswith("osmall answers")
        with pytest.raises(anthropic.AuthenticationError) as e:
            ant(g, api_key=key[:-2] + "xx").messages.create(
                model="tagrouter", max_tokens=8, messages=[{"role": "user", "content": POEM}])
        assert e.value.body["error"]["type"] == "authentication_error"


# ==== POST /v1/responses (the openai SDK) ====


@pytest.mark.parametrize("text,model,fake", [(POEM, "small", "asmall"), (MATH, "big", "obig")])
def test_responses_create_to_either_protocol(mixed_gw: RunningGateway, text: str, model: str,
                                             fake: str) -> None:
    raw = oai(mixed_gw).responses.with_raw_response.create(
        model="tagrouter", instructions="Be brief", input=text)
    resp = raw.parse()
    assert raw.headers["x-tagrouter-model"] == model
    assert resp.model == f"{model}-model" and resp.status == "completed"
    assert resp.output_text == f"{fake} answers: {text}"
    assert resp.id.startswith("resp_") and resp.usage is not None


def test_responses_stream_events(mixed_gw: RunningGateway) -> None:
    with oai(mixed_gw).responses.stream(model="tagrouter", input=POEM) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") > 1
    assert final.output_text == f"asmall answers: {POEM}" and final.model == "small-model"


def test_responses_previous_response_id_and_its_bounds(mixed_gw: RunningGateway,
                                                       fakes: dict[str, Fake]) -> None:
    client = oai(mixed_gw)
    first = client.responses.create(model="tagrouter", input=POEM)
    second = client.responses.create(model="tagrouter", input="Another poem about the moon",
                                     previous_response_id=first.id)
    assert second.output_text.endswith("Another poem about the moon")
    # The backend got the whole conversation: the first turn, its answer, the new turn.
    sent = last_body(fakes["asmall"])["messages"]
    texts = [b["text"] for m in sent for b in m["content"]]
    assert texts == [POEM, first.output_text, "Another poem about the moon"]
    # The store keeps 2 responses (this gateway's config): the first is pushed out by now.
    client.responses.create(model="tagrouter", input=POEM)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tagrouter", input="more", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
    assert "unknown or expired" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tagrouter", input="x", previous_response_id="resp_nope")


def test_responses_expire_after_their_ttl(fakes: dict[str, Fake]) -> None:
    cfg = gateway_config({"small": fakes["osmall"].url, "big": fakes["obig"].url},
                         sessions={"stored_response_ttl_s": 0.2})
    with running_gateway(cfg) as g:
        client = oai(g)
        first = client.responses.create(model="tagrouter", input=POEM)
        client.responses.create(model="tagrouter", input="x", previous_response_id=first.id)
        time.sleep(0.3)
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="tagrouter", input="x", previous_response_id=first.id)
        assert "unknown or expired" in e.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_responses_function_call_loop_stays_on_its_model(
        mixed_gw: RunningGateway, fakes: dict[str, Fake], stream: bool) -> None:
    for f in fakes.values():
        f.backend.command(tool_call=True)
    client = oai(mixed_gw)
    tools = [{"type": "function", "name": "weather", "description": "Weather of a city",
              "parameters": WEATHER}]
    if stream:
        with client.responses.stream(model="tagrouter", input=POEM, tools=tools) as s:
            for _ in s:
                pass
            first = s.get_final_response()
    else:
        first = client.responses.create(model="tagrouter", input=POEM, tools=tools)
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "weather"
    assert json.loads(call.arguments) == {"query": POEM}
    raw = client.responses.with_raw_response.create(
        model="tagrouter", tools=tools, previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": "sunny; " + MATH}])
    assert raw.headers["x-tagrouter-model"] == "small"
    assert raw.headers["x-tagrouter-reason"] == "tool_loop"


def test_responses_images_and_errors(mixed_gw: RunningGateway, fakes: dict[str, Fake]) -> None:
    client = oai(mixed_gw)
    resp = client.responses.create(model="tagrouter", input=[{"role": "user", "content": [
        {"type": "input_text", "text": MATH},
        {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}]}])
    assert resp.output_text.endswith(f"{MATH} [images: 1]")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tagrouter", input=POEM,
                                tools=[{"type": "web_search_preview"}])
    assert e.value.body["param"] == "tools[0]" and e.value.body["code"] == "untranslatable"
    # A backend broken midway (here before its first text): the stream ends in an error
    # event, after the head every Responses stream has.
    fakes["asmall"].backend.command(mode="reset", reset_after=1, chunks=6)
    with client.responses.stream(model="tagrouter", input=POEM) as s:
        events = list(s)
    assert events[0].type == "response.created" and events[-1].type == "error"
    assert events[-1].code == "upstream_reset" and "failed mid-stream" in events[-1].message


# ==== Chat completions to an Anthropic backend ====


def test_chat_to_an_anthropic_backend(mixed_gw: RunningGateway, fakes: dict[str, Fake]) -> None:
    client = oai(mixed_gw)
    raw = client.chat.completions.with_raw_response.create(
        model="tagrouter", messages=[{"role": "system", "content": "Be brief"},
                                     {"role": "user", "content": POEM}])
    done = raw.parse()
    assert raw.headers["x-tagrouter-model"] == "small" and done.model == "small-model"
    assert done.choices[0].message.content == f"asmall answers: {POEM}"
    sent = last_body(fakes["asmall"])
    assert sent["system"] == [{"type": "text", "text": "Be brief"}] and sent["max_tokens"] > 0
    chunks = list(client.chat.completions.create(
        model="tagrouter", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": POEM}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"asmall answers: {POEM}" and chunks[-1].usage is not None
    fakes["asmall"].backend.command(tool_call=True)
    done = client.chat.completions.create(
        model="tagrouter", messages=[{"role": "user", "content": POEM}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}])
    calls = done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "tool_calls" and calls and \
        calls[0].function.name == "weather"
    # Legacy completions never reach an Anthropic backend: routed to big instead.
    raw2 = client.completions.with_raw_response.create(model="tagrouter", prompt=POEM)
    assert raw2.headers["x-tagrouter-model"] == "big"


def test_every_protocol_is_charged_and_traced(fakes: dict[str, Fake], tmp_path: Path) -> None:
    """Each answer is charged at the backend that gave it, on the usage it reported (the fakes
    report 8 input tokens and one output token per word), and traced as one request span."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from tagrouter_fast.serve.telemetry import Tracing

    price = {"input_per_1k": 1.0, "output_per_1k": 2.0}
    cfg = gateway_config({"small": fakes["asmall"].url, "big": fakes["obig"].url},
                         backend_overrides={"small": {"protocol": "anthropic", "price": price},
                                            "big": {"price": price}},
                         budgets={"state_dir": str(tmp_path)})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with running_gateway(cfg) as g:
        g.gw.tracing = Tracing(provider)
        calls = [  # every protocol, native and translated
            ant(g).messages.with_raw_response.create(
                model="tagrouter", max_tokens=32, messages=[{"role": "user", "content": POEM}]),
            ant(g).messages.with_raw_response.create(
                model="tagrouter", max_tokens=32, messages=[{"role": "user", "content": MATH}]),
            oai(g).responses.with_raw_response.create(model="tagrouter", input=POEM),
            oai(g).chat.completions.with_raw_response.create(
                model="tagrouter", messages=[{"role": "user", "content": POEM}]),
        ]
        said = {"small": f"asmall answers: {POEM}", "big": f"obig answers: {MATH}"}
        for raw in calls:
            words = len(said[raw.headers["x-tagrouter-model"]].split())
            expected = (8 * 1.0 + words * 2.0) / 1000
            assert float(raw.headers["x-tagrouter-cost-usd"]) == pytest.approx(expected)
            assert "x-tagrouter-cost-estimated" not in raw.headers
        with ant(g).messages.stream(model="tagrouter", max_tokens=32,
                                    messages=[{"role": "user", "content": POEM}]) as st_:
            st_.get_final_message()
        spans = exporter.get_finished_spans()
        servers = [x for x in spans if x.kind == SpanKind.SERVER]
        assert len(servers) == len(calls) + 1
        assert all(x.attributes["gen_ai.usage.output_tokens"] > 0 for x in servers)
        assert {x.attributes["tagrouter.backend"] for x in servers} == {"small", "big"}
        assert len([x for x in spans if x.kind == SpanKind.CLIENT]) == len(servers)


# ==== Routing by capability ====


def _capable_gw(fakes: dict[str, Fake], small: dict[str, Any], big: dict[str, Any],
                **sections: Any) -> Any:
    cfg = gateway_config({"small": fakes["osmall"].url, "big": fakes["obig"].url},
                         backend_overrides={"small": small, "big": big}, **sections)
    return running_gateway(cfg)


def test_a_need_routes_among_the_capable_and_none_is_a_400(fakes: dict[str, Fake]) -> None:
    image = [{"role": "user", "content": [
        {"type": "text", "text": POEM},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with _capable_gw(fakes, {"vision": False}, {}) as g:
        client = oai(g)
        raw = client.chat.completions.with_raw_response.create(model="tagrouter",
                                                               messages=image)
        # A poem goes to small, but small has no vision: the decision among {big}.
        assert raw.headers["x-tagrouter-model"] == "big"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="small", messages=image)
        assert "vision (images)" in e.value.body["message"]
    with _capable_gw(fakes, {"vision": False}, {"vision": False}) as g:
        with pytest.raises(anthropic.BadRequestError) as e2:
            ant(g).messages.create(model="tagrouter", max_tokens=8, messages=[{
                "role": "user", "content": [{"type": "image", "source": {
                    "type": "url", "url": "https://example.com/a.png"}}]}])
        assert "needs vision (images)" in e2.value.body["error"]["message"]


def test_the_restricted_decision_explains_the_candidates_only(fakes: dict[str, Fake]) -> None:
    with _capable_gw(fakes, {"tools": False}, {}) as g:
        r = httpx.post(g.url + "/v1/chat/completions", headers={"x-tagrouter-explain": "1"},
                       json={"model": "tagrouter",
                             "messages": [{"role": "user", "content": POEM}],
                             "tools": [{"type": "function", "function": {"name": "f"}}]})
        assert r.status_code == 200 and r.headers["x-tagrouter-model"] == "big"
        explained = json.loads(r.headers["x-tagrouter-explanation"])
        assert explained["model"] == "big" and sorted(explained["scores"]) == ["big"]


def test_the_demo_runs_an_anthropic_backend() -> None:
    from tagrouter_fast.demo.start import start_demo

    with start_demo(tagger="keyword", anthropic_llm=True) as (cfg, router), \
            running_gateway(cfg, router) as g:
        assert {b.name: b.protocol for b in cfg.backends} == {"small": "openai",
                                                              "big": "anthropic"}
        msg = ant(g).messages.create(model="tagrouter", max_tokens=16,
                                     messages=[{"role": "user", "content": MATH}])
        assert msg.content[0].text == f"big answers: {MATH}" and msg.model == "big-demo"
        done = oai(g).chat.completions.create(model="tagrouter",
                                              messages=[{"role": "user", "content": MATH}])
        assert done.choices[0].message.content == f"big answers: {MATH}"


def test_context_boundary_exactly_fits_one_more_does_not(fakes: dict[str, Fake]) -> None:
    limit = 50
    with _capable_gw(fakes, {"max_context_tokens": limit}, {"max_context_tokens": limit}) as g:
        client = oai(g)

        def ask(tokens: int) -> Any:
            # chars / 4 rounded up: 4 * tokens characters are exactly ``tokens`` tokens.
            text = ("poem " * tokens)[: 4 * tokens]
            body = {"model": "tagrouter", "messages": [{"role": "user", "content": text}]}
            assert parse_request(body).input_tokens == tokens
            return httpx.post(g.url + "/v1/chat/completions", json=body)

        assert ask(limit).status_code == 200
        r = ask(limit + 1)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_capable_model"
        assert "max_context_tokens 50" in r.json()["error"]["message"]
        # The output asked for counts too.
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tagrouter", max_tokens=1, messages=[
                {"role": "user", "content": "p" * (4 * limit)}])


def test_a_tokenizer_counts_the_context(fakes: dict[str, Fake], tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "sea": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    # Ten words of 20 characters: 50 tokens estimated, 10 by the tokenizer.
    text = " ".join(["abcdefghijklmnopqrs"] * 10)
    with _capable_gw(fakes, {"max_context_tokens": 10, "tokenizer": str(path)},
                     {"max_context_tokens": 9, "tokenizer": str(path)}) as g:
        raw = oai(g).chat.completions.with_raw_response.create(
            model="tagrouter", messages=[{"role": "user", "content": text}])
        assert raw.headers["x-tagrouter-model"] == "small"
    with pytest.raises(ConfigError, match="tokenizer"):
        Backend.from_config(BackendConfig("x", "http://x/v1", tokenizer=tmp_path / "none.json"))


def test_a_session_keeps_needing_what_it_used(fakes: dict[str, Fake]) -> None:
    with _capable_gw(fakes, {"vision": False}, {}) as g:
        client = oai(g)
        head = {"x-session-id": "used-vision"}
        turn1 = [{"role": "user", "content": [
            {"type": "text", "text": POEM},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
        raw = client.chat.completions.with_raw_response.create(
            model="tagrouter", messages=turn1, extra_headers=head)
        assert raw.headers["x-tagrouter-model"] == "big"
        # The client drops the image from its history: the session still needs vision.
        raw = client.chat.completions.with_raw_response.create(
            model="tagrouter", messages=[{"role": "user", "content": POEM}],
            extra_headers=head, extra_body={"tagrouter": {"theta": -100.0}})
        assert raw.headers["x-tagrouter-model"] == "big"
        # Another session with the same poem goes to small.
        raw = client.chat.completions.with_raw_response.create(
            model="tagrouter", messages=[{"role": "user", "content": POEM}],
            extra_headers={"x-session-id": "text-only"})
        assert raw.headers["x-tagrouter-model"] == "small"


def test_shadow_mode_never_sends_a_request_to_a_default_that_cannot_serve(
        fakes: dict[str, Fake], tmp_path: Path) -> None:
    from tagrouter_fast.demo.shadow_world import shadow_table

    cfg = gateway_config({"small": fakes["osmall"].url, "big": fakes["obig"].url},
                         backend_overrides={"big": {"vision": False}},
                         feedback={"state_dir": str(tmp_path), "fsync": False},
                         shadow=shadow_table("http://127.0.0.1:9/v1", default_model="big",
                                             sample=0.0))
    image = [{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
             {"type": "text", "text": MATH}]
    with running_gateway(cfg) as g:
        client = ant(g)
        raw = client.messages.with_raw_response.create(
            model="tagrouter", max_tokens=8, messages=[{"role": "user", "content": POEM}])
        assert raw.headers["x-tagrouter-model"] == "big"  # the default answers a poem
        raw = client.messages.with_raw_response.create(
            model="tagrouter", max_tokens=8, messages=[{"role": "user", "content": image}])
        assert raw.headers["x-tagrouter-model"] == "small"  # it cannot read the image


CAPS = st.fixed_dictionaries({
    "tools": st.booleans(), "vision": st.booleans(), "json_schema": st.booleans(),
    "max_context_tokens": st.sampled_from([None, 20, 200]),
    "max_output_tokens": st.sampled_from([None, 16, 64]),
})


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(caps=st.fixed_dictionaries({"small": CAPS, "big": CAPS}),
       text=st.sampled_from([POEM, MATH, "hello " * 30]), tools=st.booleans(),
       image=st.booleans(), schema=st.booleans(),
       max_tokens=st.sampled_from([None, 8, 32, 100]))
def test_property_never_routed_to_a_backend_that_cannot_serve(
        openai_gw: RunningGateway, caps: dict[str, dict[str, Any]], text: str, tools: bool,
        image: bool, schema: bool, max_tokens: int | None) -> None:
    gw = openai_gw.gw
    before = gw.backends
    gw.backends = {name: Backend.from_config(BackendConfig(
        name, b.config.base_url, model=b.config.model, timeout_s=1.0, **caps[name]))
        for name, b in before.items()}
    try:
        _check_capable_routing(openai_gw, caps, text, tools, image, schema, max_tokens)
    finally:
        gw.backends = before


def _check_capable_routing(g: RunningGateway, caps: dict[str, dict[str, Any]], text: str,
                           tools: bool, image: bool, schema: bool,
                           max_tokens: int | None) -> None:
    content: Any = text if not image else [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    body: dict[str, Any] = {"model": "tagrouter",
                            "messages": [{"role": "user", "content": content}]}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    if schema:
        body["response_format"] = {"type": "json_object"}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    tokens = parse_request(body).input_tokens

    def can(c: dict[str, Any]) -> bool:
        ctx, out = c["max_context_tokens"], c["max_output_tokens"]
        return (c["tools"] or not tools) and (c["vision"] or not image) \
            and (c["json_schema"] or not schema) \
            and (out is None or max_tokens is None or max_tokens <= out) \
            and (ctx is None or tokens + (max_tokens or 0) <= ctx)

    capable = {name for name, c in caps.items() if can(c)}
    r = httpx.post(g.url + "/v1/chat/completions", json=body, timeout=10)
    if capable:
        assert r.status_code == 200, r.text
        assert r.headers["x-tagrouter-model"] in capable
    else:
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_capable_model"


def test_capabilities_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"backends\[0\].protocol"):
        gateway_config({"small": "http://x"}, backend_overrides={"small": {"protocol": "grpc"}})
    with pytest.raises(ConfigError, match=r"backends\[0\].max_context_tokens"):
        gateway_config({"small": "http://x"},
                       backend_overrides={"small": {"max_context_tokens": 0}})
    cfg = gateway_config({"small": "http://x"})
    b = cfg.backends[0]
    assert (b.protocol, b.tools, b.vision, b.json_schema, b.max_context_tokens,
            b.max_output_tokens, b.tokenizer) == ("openai", True, True, True, None, None, None)
