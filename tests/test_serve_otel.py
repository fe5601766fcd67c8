"""OpenTelemetry spans of the gateway (serve.telemetry): one span per request with the GenAI
attributes and the routing decision, one child span per upstream attempt, read back from the
SDK's in-memory exporter; off by default, without importing opentelemetry."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from skip_policy import import_extra

import_extra("serve", "starlette")
import_extra("serve", "opentelemetry.sdk")

import httpx  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402
from serve_helpers import (  # noqa: E402
    MATH,
    POEM,
    Fake,
    RunningGateway,
    fake_backends,
    gateway_config,
    running_gateway,
    wait_for,
)

from tagrouter_fast.serve.config import ConfigError  # noqa: E402
from tagrouter_fast.serve.telemetry import Tracing, tracing_from_env  # noqa: E402

PRICED = {"small": {"price": {"input_per_1k": 0.001, "output_per_1k": 0.002}},
          "big": {"price": {"input_per_1k": 0.01, "output_per_1k": 0.03}}}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Fake]]:
    with fake_backends("small", "big") as f:
        yield f


@pytest.fixture
def traced(fakes: dict[str, Fake], tmp_path: Path) -> Iterator[tuple[RunningGateway,
                                                                      InMemorySpanExporter]]:
    cfg = gateway_config(
        {n: f.url for n, f in fakes.items()}, backend_overrides=PRICED,
        fallback={"order": ["small", "big"]},
        budgets={"state_dir": str(tmp_path), "over_budget": "cheaper", "cheaper_until": 100.0,
                 "keys": {"anonymous": {"usd_per_day": 0.0003}}},
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with running_gateway(cfg) as g:
        g.gw.tracing = Tracing(provider)
        yield g, exporter


def chat(g: RunningGateway, query: str, **kw: Any) -> httpx.Response:
    return httpx.post(g.url + "/v1/chat/completions", timeout=10.0, json={
        "model": "tagrouter", "messages": [{"role": "user", "content": query}], **kw})


def by_kind(exporter: InMemorySpanExporter) -> tuple[Any, list[Any]]:
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 1, spans
    return servers[0], [s for s in spans if s.kind == SpanKind.CLIENT]


def test_a_request_span_with_the_decision_and_one_child_per_attempt(
    traced: tuple[RunningGateway, InMemorySpanExporter], fakes: dict[str, Fake]
) -> None:
    g, exporter = traced
    fakes["big"].backend.command(mode="error", status=503, times=1)
    r = chat(g, MATH)
    assert r.status_code == 200 and r.headers["x-tagrouter-model"] == "small"
    req, attempts = by_kind(exporter)
    a = req.attributes
    assert req.name == "chat tagrouter"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "tagrouter"
    assert a["gen_ai.response.model"] == "small-model"  # the upstream model that answered
    usage = r.json()["usage"]
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["tagrouter.decision.id"] == r.headers["x-tagrouter-decision-id"]
    assert a["tagrouter.decision.model"] == "big"
    assert list(a["tagrouter.decision.tags"]) == ["Algebra", "Mathematical Problem Solving"]
    d = g.gw.router.decider.decide(list(a["tagrouter.decision.tags"]))
    # The routing decision's reason (the answer's header says "failover").
    assert a["tagrouter.decision.reason"] == d.reason != r.headers["x-tagrouter-reason"]
    assert a["tagrouter.decision.delta"] == pytest.approx(d.delta)
    assert a["tagrouter.decision.theta"] == pytest.approx(d.theta)
    assert a["tagrouter.cost.usd"] == pytest.approx(float(r.headers["x-tagrouter-cost-usd"]))
    assert list(a["tagrouter.attempts"]) == ["big", "small"]
    # One child span per attempt, in order: big failed (a 503 is the "status" fault), small
    # answered.
    assert [s.attributes["tagrouter.backend"] for s in attempts] == ["big", "small"]
    assert all(s.parent is not None and s.parent.span_id == req.context.span_id
               for s in attempts)
    assert attempts[0].name == "chat big-model"
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[0].attributes["error.type"] == "status"
    assert attempts[1].status.status_code != StatusCode.ERROR
    assert attempts[1].attributes["server.port"] == int(fakes["small"].url.rsplit(":", 1)[1])


def test_a_stream_span_ends_with_the_stream_and_carries_its_usage(
    traced: tuple[RunningGateway, InMemorySpanExporter]
) -> None:
    g, exporter = traced
    with httpx.stream("POST", g.url + "/v1/chat/completions", timeout=10.0, json={
        "model": "tagrouter", "stream": True, "messages": [{"role": "user", "content": POEM}],
    }) as r:
        assert r.status_code == 200
        r.read()
    assert wait_for(lambda: len(exporter.get_finished_spans()) == 2)
    req, attempts = by_kind(exporter)
    assert req.attributes["gen_ai.response.model"] == "small-model"
    assert req.attributes["tagrouter.usage.estimated"] is True  # the fake reports no usage
    assert req.attributes["gen_ai.usage.output_tokens"] > 0
    # The answering attempt lasts as long as its stream.
    assert len(attempts) == 1 and attempts[0].end_time <= req.end_time


def test_over_budget_filtering_and_the_429_are_on_the_span(
    traced: tuple[RunningGateway, InMemorySpanExporter]
) -> None:
    g, exporter = traced
    assert chat(g, MATH).headers["x-tagrouter-model"] == "big"  # takes the key over
    exporter.clear()
    r = chat(g, MATH)
    assert r.headers["x-tagrouter-reason"] == "over_budget"
    req, _ = by_kind(exporter)
    assert list(req.attributes["tagrouter.candidates.filtered"]) == \
        ["big: over budget: not cheaper than big"]
    exporter.clear()
    r = chat(g, POEM)  # small is the cheapest: nothing cheaper left
    assert r.status_code == 429
    req, attempts = by_kind(exporter)
    assert attempts == []
    assert req.status.status_code == StatusCode.ERROR
    assert req.attributes["error.type"] == "budget_exceeded"
    assert req.attributes["http.response.status_code"] == 429


def test_off_by_default_and_configured_by_the_standard_variables() -> None:
    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "console",
                             "OTEL_SDK_DISABLED": "true"}) is None
    t = tracing_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "gw-test"})
    assert t is not None
    assert t.provider.resource.attributes["service.name"] == "gw-test"
    t.close()
    with pytest.raises(ConfigError, match="unsupported exporter 'zipkin'"):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    # An OTLP endpoint alone turns tracing on with the otlp exporter (or says what is missing).
    try:
        t = tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    except ConfigError as e:
        assert "opentelemetry-exporter-otlp-proto-http" in str(e)
    else:
        assert t is not None
        t.close()


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    code = (
        "import sys, json\n"
        "from tagrouter_fast.demo.router import demo_router\n"
        "from tagrouter_fast.serve.config import Config\n"
        "from tagrouter_fast.serve.edge.app import create_app\n"
        "cfg = Config.from_dict({'router': {}, 'auth': {'allow_anonymous': True},\n"
        "    'backends': [{'name': n, 'base_url': 'http://127.0.0.1:9/v1'}\n"
        "                 for n in ('small', 'big')]})\n"
        "app = create_app(cfg, router=demo_router('keyword'))\n"
        "print(json.dumps([app.state.gateway.tracing is None,\n"
        "                  any(m.startswith('opentelemetry') for m in sys.modules)]))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, False]
