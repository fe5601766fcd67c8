"""The gateway end to end: real uvicorn servers on loopback (the gateway and fake OpenAI-compatible
backends), called with the official openai SDK and with httpx."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from serve_helpers import (  # noqa: E402
    MATH,
    POEM,
    Fake,
    RunningGateway,
    cli_gateway,
    dead_url,
    fake_backends,
    gateway_config,
    running_gateway,
    wait_for,
)

from tagrouter_fast.demo.router import demo_router  # noqa: E402
from tagrouter_fast.serve.config import ConfigError, load_config  # noqa: E402
from tagrouter_fast.serve.forward.client import ClientPool  # noqa: E402
from tagrouter_fast.serve.policy.sessions import (  # noqa: E402
    SessionTable,
    in_tool_loop,
    keep_or_switch,
)

ADMIN_TOKEN = "s3cret-admin-token-for-tests"


# ==== Fixtures ====


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Fake]]:
    with fake_backends("small", "big", "mid") as f:
        yield f


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-state")


@pytest.fixture(scope="module")
def gateway(
    fakes: dict[str, Fake], state_dir: Path, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[RunningGateway]:
    """The shared gateway: small and big routed, big as fallback of small and vice versa, a
    dead backend for connection-refused passthrough, feedback and admin on."""
    monkeypatch_module.setenv("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    urls = {"small": fakes["small"].url, "big": fakes["big"].url, "dead": dead_url()}
    # Short deadlines keep the timeout tests quick.
    fast = {"timeout_s": 0.5, "stream_idle_timeout_s": 0.5}
    cfg = gateway_config(
        urls,
        backend_overrides={"small": fast, "big": fast, "dead": fast},
        fallback={"order": ["small", "big"], "max_attempts": 2},
        feedback={"state_dir": str(state_dir), "fsync": True},
        admin={"token_env": "TEST_ADMIN_TOKEN"},
        limits={"max_body_bytes": 64 * 1024, "max_concurrency": 256},
        sessions={"switch_margin": 0.5},
    )
    with running_gateway(cfg) as g:
        yield g


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def sdk(g: RunningGateway, **kw: Any) -> Any:
    return openai.OpenAI(base_url=g.url + "/v1", api_key="unused", max_retries=0, **kw)


def chat_body(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "tagrouter", "messages": [{"role": "user", "content": text}], **kw}


def post(g: RunningGateway, path: str, body: Any = None, **kw: Any) -> httpx.Response:
    return httpx.post(g.url + path, json=body, timeout=10.0, **kw)


# ==== Routed completions, non-streaming ====


def test_routed_chat_completion_with_the_openai_sdk(gateway: RunningGateway,
                                                    fakes: dict[str, Fake]) -> None:
    client = sdk(gateway)
    raw = client.chat.completions.with_raw_response.create(
        model="tagrouter", messages=[{"role": "user", "content": POEM}]
    )
    resp = raw.parse()
    assert raw.headers["x-tagrouter-model"] == "small"
    assert raw.headers["x-tagrouter-reason"] == "argmax"
    assert raw.headers["x-tagrouter-decision-id"].startswith("trd_")  # a decision token
    # The response names the model that answered (the upstream id of the small backend).
    assert resp.model == "small-model"
    assert resp.choices[0].message.content.startswith("small answers: Write a short poem")
    sent = fakes["small"].state.bodies[-1]
    assert sent["model"] == "small-model" and "tagrouter" not in sent

    raw = client.chat.completions.with_raw_response.create(
        model="tagrouter", messages=[{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": MATH}],
    )
    assert raw.headers["x-tagrouter-model"] == "big"
    assert raw.parse().model == "big-model"


def test_routes_on_the_last_user_turn_and_text_parts(gateway: RunningGateway) -> None:
    msgs = [
        {"role": "user", "content": MATH},
        {"role": "assistant", "content": "x = 2/3"},
        {"role": "user", "content": [{"type": "text", "text": POEM},
                                     {"type": "image_url", "image_url": {"url": "data:,"}}]},
    ]
    r = post(gateway, "/v1/chat/completions", {"model": "tagrouter", "messages": msgs})
    assert r.status_code == 200, r.text
    assert r.headers["x-tagrouter-model"] == "small"


def test_completions_endpoint(gateway: RunningGateway) -> None:
    client = sdk(gateway)
    raw = client.completions.with_raw_response.create(model="tagrouter", prompt=MATH)
    assert raw.headers["x-tagrouter-model"] == "big"
    assert raw.parse().choices[0].text.startswith("big answers")


def test_passthrough_by_name_or_upstream_id(gateway: RunningGateway) -> None:
    for name in ("big", "big-model"):
        r = post(gateway, "/v1/chat/completions", {**chat_body(POEM), "model": name})
        assert r.status_code == 200
        assert r.headers["x-tagrouter-model"] == "big"
        assert r.headers["x-tagrouter-reason"] == "passthrough"


def test_passthrough_outcomes_are_learned_only_when_asked(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    for learn in (False, True):
        cfg = gateway_config(urls, router={"learn_passthrough": learn},
                             feedback={"state_dir": str(tmp_path / f"state-{learn}")})
        with running_gateway(cfg) as g:
            before = g.gw.router.scorer.counts("big", "Poetry Writing")
            r = post(g, "/v1/chat/completions", {**chat_body(POEM), "model": "big"})
            assert r.status_code == 200 and r.headers["x-tagrouter-reason"] == "passthrough"
            did = r.headers["x-tagrouter-decision-id"]
            f = post(g, "/v1/feedback", {"decision_id": did, "outcome": "win"})
            if not learn:
                assert f.status_code == 404  # an unrouted request is not remembered
                assert g.gw.router.scorer.counts("big", "Poetry Writing") == before
            else:
                assert f.status_code == 200, f.text
                after = g.gw.router.scorer.counts("big", "Poetry Writing")
                assert after == (before[0] + 1, before[1], before[2])


def test_unknown_model_is_400_naming_it(gateway: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sdk(gateway).chat.completions.create(
            model="gpt-17", messages=[{"role": "user", "content": POEM}]
        )
    assert "gpt-17" in str(e.value)
    assert e.value.body["param"] == "model"


def test_explanation_header_on_request(gateway: RunningGateway) -> None:
    r = post(gateway, "/v1/chat/completions", chat_body(POEM))
    assert "x-tagrouter-explanation" not in r.headers
    r = post(gateway, "/v1/chat/completions", chat_body(POEM),
             headers={"x-tagrouter-explain": "1"})
    ex = json.loads(r.headers["x-tagrouter-explanation"])
    assert ex["model"] == "small"
    assert ex["tags"] == ["Poetry Writing", "Creative Writing"]
    assert ex["scores"]["small"] > ex["scores"]["big"]
    assert set(ex["contributions"]) == {"Poetry Writing", "Creative Writing"}


def test_per_request_theta(gateway: RunningGateway) -> None:
    # A theta above the poem's Delta_q sends it to M_LLM (big).
    r = post(gateway, "/v1/chat/completions", chat_body(POEM, tagrouter={"theta": 5.0}))
    assert r.headers["x-tagrouter-model"] == "big"
    r = post(gateway, "/v1/chat/completions", chat_body(POEM),
             headers={"x-tagrouter-theta": "5"})
    assert r.headers["x-tagrouter-model"] == "big"
    r = post(gateway, "/v1/chat/completions", chat_body(POEM, tagrouter={"thetaa": 1}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "tagrouter.thetaa"


def test_per_request_llm_share_budget(fakes: dict[str, Fake]) -> None:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    with running_gateway(gateway_config(urls)) as g:
        # No traffic yet: nothing to calibrate a share on.
        r = post(g, "/v1/route", {"query": POEM, "tagrouter": {"llm_share": 0.5}})
        assert r.status_code == 400 and "no traffic seen yet" in r.json()["error"]["message"]
        for q in [POEM, MATH] * 5:
            assert post(g, "/v1/route", {"query": q}).status_code == 200
        assert post(g, "/v1/route", {"query": POEM}).json()["model"] == "small"
        # All traffic to M_LLM: the poem goes to big; none: maths goes to small.
        r = post(g, "/v1/route", {"query": POEM, "tagrouter": {"llm_share": 1.0}})
        assert r.status_code == 200 and r.json()["model"] == "big", r.text
        r = post(g, "/v1/chat/completions", chat_body(MATH),
                 headers={"x-tagrouter-llm-share": "0"})
        assert r.status_code == 200 and r.headers["x-tagrouter-model"] == "small"
        r = post(g, "/v1/route", {"queries": [POEM, MATH], "tagrouter": {"llm_share": 1.0}})
        assert [d["model"] for d in r.json()["decisions"]] == ["big", "big"]
        # The budget of a share is cached per decider: the same answer without recomputing.
        assert len(g.gw.budget._share_cache) == 2
        for body, param in (
            ({"query": POEM, "tagrouter": {"llm_share": 1.5}}, "tagrouter.llm_share"),
            ({"query": POEM, "tagrouter": {"llm_share": "half"}}, "tagrouter.llm_share"),
            ({"query": POEM, "tagrouter": {"llm_share": 0.5, "theta": 1}}, "tagrouter.llm_share"),
        ):
            r = post(g, "/v1/route", body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = post(g, "/v1/route", {"query": POEM}, headers={"x-tagrouter-llm-share": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-tagrouter-llm-share"


# ==== Streaming ====


def test_streamed_chat_with_the_openai_sdk(gateway: RunningGateway) -> None:
    client = sdk(gateway)
    raw = client.chat.completions.with_raw_response.create(
        model="tagrouter", messages=[{"role": "user", "content": POEM}], stream=True
    )
    # The routed model is in the headers, known before the first byte of the body.
    assert raw.headers["x-tagrouter-model"] == "small"
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert len(chunks) >= 4
    assert all(c.model == "small-model" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("small answers: Write a short poem")


def test_streamed_completions_passed_through_chunk_by_chunk(
    gateway: RunningGateway, fakes: dict[str, Fake]
) -> None:
    big = fakes["big"]
    big.backend.command(chunks=5, chunk_delay_s=0.1)
    done_before = big.state.completed
    events = []
    done_at_first_event = None
    with httpx.stream("POST", gateway.url + "/v1/completions", timeout=10,
                      json={"model": "tagrouter", "prompt": MATH, "stream": True}) as r:
        assert r.headers["x-tagrouter-model"] == "big"
        for line in r.iter_lines():
            if line.startswith("data: "):
                if done_at_first_event is None:
                    done_at_first_event = big.state.completed
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    objs = [json.loads(d) for d in events[:-1]]
    assert objs[0]["object"] == "text_completion"
    assert objs[-1]["choices"][0]["finish_reason"] == "stop"
    # The first event reached the client while the backend was still writing the rest: the
    # stream is relayed as it comes, not buffered to the end.
    assert done_at_first_event == done_before
    assert big.state.completed == done_before + 1


def test_client_disconnect_cancels_the_upstream_stream(
    gateway: RunningGateway, fakes: dict[str, Fake]
) -> None:
    small = fakes["small"]
    small.backend.command(chunks=50, chunk_delay_s=0.05)
    before = small.state.cancelled
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=10,
                      json=chat_body(POEM, stream=True)) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # The client hung up after one event: the gateway must hang up on the backend, whose
    # generator is then cancelled long before its 50 events (2.5 s) are through.
    assert wait_for(lambda: small.state.cancelled > before, timeout_s=2.0)
    assert leases_returned(gateway)


def leases_returned(g: RunningGateway) -> bool:
    """Every upstream call ended its lease (streams close a moment after the client's last
    byte)."""
    assert g.gw.forwarder is not None
    pool = g.gw.forwarder.client
    return wait_for(lambda: pool.in_flight == 0, timeout_s=2.0)


def test_client_pool_leases() -> None:
    pool = ClientPool(100)
    release_a = pool.lease()
    release_b = pool.lease()
    assert pool.in_flight == 2
    release_a()
    release_a()  # idempotent: a second release does not end someone else's lease
    assert pool.in_flight == 1
    release_b()
    assert pool.in_flight == 0
    with pytest.raises(ValueError, match="max_connections"):
        ClientPool(0)
    asyncio.run(pool.aclose())


# ==== Faults ====

FAULTS = ["hang", "error", "malformed", "garbage", "reset"]


@pytest.mark.parametrize("mode", FAULTS)
def test_fault_falls_back_to_the_next_backend(
    gateway: RunningGateway, fakes: dict[str, Fake], mode: str
) -> None:
    fakes["small"].backend.command(mode=mode, status=503)
    t0 = time.monotonic()
    r = post(gateway, "/v1/chat/completions", chat_body(POEM))
    assert r.status_code == 200, r.text
    assert r.headers["x-tagrouter-model"] == "big"
    assert r.headers["x-tagrouter-reason"] == "failover"
    assert r.headers["x-tagrouter-attempts"] == "small,big"
    assert r.json()["model"] == "big-model"
    assert time.monotonic() - t0 < 3.0  # a hung backend costs its deadline, not forever
    assert leases_returned(gateway)


@pytest.mark.parametrize("mode", FAULTS)
def test_stream_fault_before_the_first_event_falls_back(
    gateway: RunningGateway, fakes: dict[str, Fake], mode: str
) -> None:
    # reset_after=0: the stream drops before its first event.
    fakes["small"].backend.command(mode=mode, status=500, reset_after=0)
    client = sdk(gateway)
    raw = client.chat.completions.with_raw_response.create(
        model="tagrouter", messages=[{"role": "user", "content": POEM}], stream=True
    )
    assert raw.headers["x-tagrouter-model"] == "big"
    assert raw.headers["x-tagrouter-reason"] == "failover"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text.startswith("big answers")
    assert leases_returned(gateway)


@pytest.mark.parametrize(("mode", "status"), [("error", 502), ("hang", 504), ("reset", 502),
                                               ("malformed", 502), ("garbage", 502)])
@pytest.mark.parametrize("stream", [False, True])
def test_no_fallback_left_is_a_json_502_or_504(
    gateway: RunningGateway, fakes: dict[str, Fake], mode: str, status: int, stream: bool
) -> None:
    # A passthrough request names its model: it is not sent to another one.
    fakes["small"].backend.command(mode=mode, reset_after=0)
    r = post(gateway, "/v1/chat/completions", {**chat_body(POEM, stream=stream),
                                                "model": "small"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "upstream_error" and "small" in err["message"]
    assert r.headers["x-tagrouter-decision-id"]
    assert leases_returned(gateway)


def test_every_backend_failing_is_502(gateway: RunningGateway, fakes: dict[str, Fake]) -> None:
    fakes["small"].backend.command(mode="error")
    fakes["big"].backend.command(mode="error", status=500)
    with pytest.raises(openai.InternalServerError) as e:
        sdk(gateway).chat.completions.create(
            model="tagrouter", messages=[{"role": "user", "content": POEM}]
        )
    assert e.value.status_code == 502
    assert "small" in str(e.value) and "big" in str(e.value)


def test_connection_refused(gateway: RunningGateway, fakes: dict[str, Fake]) -> None:
    before = backend_errors(gateway, "dead", "connect")
    r = post(gateway, "/v1/chat/completions", {**chat_body(POEM), "model": "dead"})
    assert r.status_code == 502 and "connect" in r.json()["error"]["message"]
    assert backend_errors(gateway, "dead", "connect") == before + 1
    # Routed to a backend that refuses: the fallback answers.
    urls = {"small": dead_url(), "big": fakes["big"].url}
    with running_gateway(gateway_config(urls, fallback={"order": ["big"]})) as g:
        r = post(g, "/v1/chat/completions", chat_body(POEM))
        assert r.status_code == 200
        assert r.headers["x-tagrouter-model"] == "big"
        assert r.headers["x-tagrouter-attempts"] == "small,big"


def backend_errors(g: RunningGateway, backend: str, kind: str) -> float:
    """The gateway's count of ``backend``'s failures of ``kind`` (its /metrics)."""
    key = f'tagrouter_backend_errors_total{{backend="{backend}",kind="{kind}"}} '
    lines = [ln for ln in httpx.get(g.url + "/metrics").text.splitlines() if ln.startswith(key)]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.mark.parametrize(("mode", "kind"), [
    ("hang", "timeout"), ("error", "status"), ("reset", "reset"), ("malformed", "malformed"),
    ("garbage", "malformed"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_each_fault_is_told_apart(
    gateway: RunningGateway, fakes: dict[str, Fake], mode: str, kind: str, stream: bool
) -> None:
    # The kind is what the metrics, the logs and the 502/504 choice go by.
    before = backend_errors(gateway, "small", kind)
    fakes["small"].backend.command(mode=mode, reset_after=0, times=1)
    r = post(gateway, "/v1/chat/completions", {**chat_body(POEM, stream=stream),
                                                "model": "small"})
    assert r.status_code == (504 if kind == "timeout" else 502), r.text
    assert backend_errors(gateway, "small", kind) == before + 1
    assert leases_returned(gateway)


def test_stream_reset_midway_ends_with_an_error_event(
    gateway: RunningGateway, fakes: dict[str, Fake]
) -> None:
    fakes["small"].backend.command(mode="reset", reset_after=2, chunks=6)
    before = fakes["big"].state.requests
    stream = sdk(gateway).chat.completions.create(
        model="tagrouter", messages=[{"role": "user", "content": POEM}], stream=True
    )
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk)
    # The two events sent before the reset reached the client whole; nothing was retried
    # after them (the client already had part of small's answer).
    assert len(got) == 2
    assert "mid-stream" in str(e.value)
    assert fakes["big"].state.requests == before
    assert leases_returned(gateway)


def test_backend_client_errors_pass_through_unchanged(
    gateway: RunningGateway, fakes: dict[str, Fake]
) -> None:
    fakes["small"].backend.command(mode="error", status=400)
    before = fakes["big"].state.requests
    r = post(gateway, "/v1/chat/completions", chat_body(POEM))
    assert r.status_code == 400 and "failing on command" in r.json()["error"]["message"]
    assert fakes["big"].state.requests == before  # the client's error, not a backend fault
    r = post(gateway, "/v1/chat/completions", chat_body(POEM, stream=True))
    assert r.status_code == 400  # the same refusal of a stream, passed back as it came
    assert leases_returned(gateway)


# ==== Limits and bad bodies ====


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        ({"model": "tagrouter"}, "messages"),
        ({"model": "tagrouter", "messages": []}, "messages"),
        ({"model": "tagrouter", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "tagrouter", "messages": [{"role": "user", "content": 3}]},
         "messages[0].content"),
        ({"model": "tagrouter", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": 7, "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({**chat_body("hi"), "stream": "yes"}, "stream"),
        ({**chat_body("hi"), "tagrouter": {"theta": "high"}}, "tagrouter.theta"),
    ],
)
def test_bad_body_is_400_naming_the_field(
    gateway: RunningGateway, body: Any, param: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(gateway.url + "/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param)


def test_completions_without_prompt_is_400(gateway: RunningGateway) -> None:
    r = post(gateway, "/v1/completions", {"model": "tagrouter"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_oversize_body_is_413_by_header_and_while_reading(gateway: RunningGateway) -> None:
    big = chat_body("x" * 100_000)
    r = post(gateway, "/v1/chat/completions", big)
    assert r.status_code == 413
    data = json.dumps(big).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    r = httpx.post(gateway.url + "/v1/chat/completions", content=chunked(),
                   headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413


def test_over_the_concurrency_limit_is_429_at_once(fakes: dict[str, Fake]) -> None:
    fakes["big"].backend.command(mode="slow", delay_s=1.0)
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    slow_ok = {"big": {"timeout_s": 5.0}}
    cfg = gateway_config(urls, backend_overrides=slow_ok, limits={"max_concurrency": 2})
    with running_gateway(cfg) as g:
        results: list[tuple[int, float]] = []

        def one() -> None:
            t0 = time.monotonic()
            r = post(g, "/v1/chat/completions", chat_body(MATH))
            results.append((r.status_code, time.monotonic() - t0))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(c for c, _ in results)
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
        assert set(codes) <= {200, 429}
        # Refused at once, not queued behind the slow requests.
        assert all(dt < 0.6 for c, dt in results if c == 429), results
        assert g.gw.inflight == 0


# ==== Sessions ====


def _turns(*user_texts: str) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    for t in user_texts:
        if msgs:
            msgs.append({"role": "assistant", "content": "ok"})
        msgs.append({"role": "user", "content": t})
    return msgs


def _session_models(g: RunningGateway, conversation: list[list[dict[str, Any]]], sid: str,
                    via: str = "header") -> list[tuple[str, str]]:
    out = []
    for msgs in conversation:
        body: dict[str, Any] = {"model": "tagrouter", "messages": msgs}
        headers = {}
        if via == "header":
            headers["x-session-id"] = sid
        else:
            body["user"] = sid
        r = post(g, "/v1/chat/completions", body, headers=headers)
        assert r.status_code == 200, r.text
        out.append((r.headers["x-tagrouter-model"], r.headers["x-tagrouter-reason"]))
    return out


@pytest.mark.parametrize("via", ["header", "user"])
def test_session_stays_unless_the_turn_passes_the_switch_margin(
    fakes: dict[str, Fake], via: str
) -> None:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    conversation = [_turns(POEM), _turns(POEM, MATH), _turns(POEM, MATH, POEM)]
    # The maths turn's Delta_q is -0.67: a margin of 1 keeps the poem's model all along ...
    with running_gateway(gateway_config(urls, sessions={"switch_margin": 1.0})) as g:
        assert _session_models(g, conversation, "conv-1", via) == [
            ("small", "argmax"), ("small", "session"), ("small", "argmax")]
        # ... while another session (and a request with none) is routed on its own.
        assert _session_models(g, [_turns(MATH)], "conv-2", via) == [("big", "argmax")]
    # A margin of 0.5 lets the maths turn move the session, and the poem move it back.
    with running_gateway(gateway_config(urls, sessions={"switch_margin": 0.5})) as g:
        assert _session_models(g, conversation, "conv-1", via) == [
            ("small", "argmax"), ("big", "argmax"), ("small", "argmax")]


def test_session_never_switches_mid_tool_call_loop(fakes: dict[str, Fake]) -> None:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    call = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{}"}}
    start = _turns(POEM)
    # Each request ends in a tool result or a tool-calling assistant turn; the last user turn
    # is maths, which alone would move the session with a margin of 0.
    loop1 = start + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": MATH},
                     {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    loop2 = loop1 + [{"role": "assistant", "content": None, "tool_calls": [call]}]
    done = loop2 + [{"role": "tool", "tool_call_id": "c1", "content": "43"},
                    {"role": "assistant", "content": "x = 2/3"},
                    {"role": "user", "content": MATH}]
    with running_gateway(gateway_config(urls, sessions={"switch_margin": 0.0})) as g:
        assert _session_models(g, [start, loop1, loop2, done], "tools") == [
            ("small", "argmax"), ("small", "tool_loop"), ("small", "tool_loop"),
            ("big", "argmax")]


def test_session_table_is_bounded_lru_with_ttl() -> None:
    now = [0.0]
    t = SessionTable(max_sessions=2, ttl_s=10.0, clock=lambda: now[0])
    t.put("a", "small", ["x"])
    t.put("b", "big", [])
    assert t.get("a") is not None  # a is now the most recent
    t.put("c", "big", [])
    assert t.get("b") is None and len(t) == 2  # b was least recently used
    now[0] = 11.0
    assert t.get("a") is None  # expired
    t.put("d", "small", [])
    assert len(t) == 1


def test_tool_loop_detection_and_switch_rule() -> None:
    assert in_tool_loop([{"role": "tool", "content": "1"}])
    assert in_tool_loop([{"role": "assistant", "tool_calls": [{"id": "x"}]}])
    assert not in_tool_loop([{"role": "assistant", "content": "done"}])
    assert not in_tool_loop([{"role": "user", "content": "hi"}])
    r = demo_router()
    poem, maths, none = (r.decide(q) for q in (POEM, MATH, "hello"))
    models = r.decider.models
    assert keep_or_switch("big", poem, 0.5, models) == ("small", True)
    assert keep_or_switch("big", poem, 1.0, models) == ("big", False)
    assert keep_or_switch("small", maths, 1.0, models) == ("small", False)
    assert keep_or_switch("small", none, 0.0, models) == ("small", False)  # no known tag
    assert keep_or_switch("gone", poem, 9.0, models) == ("small", True)


# ==== /v1/route ====


def test_route_endpoint_decides_without_calling_a_backend(
    gateway: RunningGateway, fakes: dict[str, Fake]
) -> None:
    before = {n: f.state.requests for n, f in fakes.items()}
    r = post(gateway, "/v1/route", {"query": POEM})
    assert r.status_code == 200
    d = r.json()
    assert d["model"] == "small" and d["reason"] == "argmax"
    assert d["tags"] == ["Poetry Writing", "Creative Writing"]
    assert d["explanation"]["scores"]["small"] > 0 and d["decision_id"].startswith("trd_")
    r = post(gateway, "/v1/route", {"queries": [POEM, MATH, "hello"]})
    got = [(x["model"], x["reason"]) for x in r.json()["decisions"]]
    assert got == [("small", "argmax"), ("big", "argmax"), ("big", "fallback")]
    assert r.json()["decisions"][2]["explanation"]["delta"] is None  # NaN is not JSON
    assert {n: f.state.requests for n, f in fakes.items()} == before


@pytest.mark.parametrize(
    ("body", "param"),
    [({}, "query"), ({"query": 3}, "query"), ({"queries": []}, "queries"),
     ({"queries": ["a", 2]}, "queries[1]"), ({"queries": ["a"] * 257}, "queries"),
     ({"query": "a", "queries": ["b"]}, "query"), ({"query": "a", "x": 1}, "x")],
)
def test_route_endpoint_bad_bodies(gateway: RunningGateway, body: Any, param: str) -> None:
    r = post(gateway, "/v1/route", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ==== Feedback ====


def test_feedback_is_counted_once_and_seen_by_the_next_decision(
    gateway: RunningGateway,
) -> None:
    router = gateway.gw.router
    r = post(gateway, "/v1/chat/completions", chat_body(POEM))
    did = r.headers["x-tagrouter-decision-id"]
    before = router.scorer.counts("small", "Poetry Writing")
    version = gateway.gw.learner.version
    t0 = time.perf_counter()
    f = post(gateway, "/v1/feedback", {"decision_id": did, "outcome": "loss"})
    assert f.status_code == 200, f.text
    assert f.json()["version"] == version + 1
    # Visible to the very next decision once the answer is back.
    after = router.scorer.counts("small", "Poetry Writing")
    assert time.perf_counter() - t0 < 1.0
    assert after == (before[0], before[1], before[2] + 1)
    again = post(gateway, "/v1/feedback", {"decision_id": did, "outcome": "win"})
    assert again.status_code == 409 and "already" in again.json()["error"]["message"]
    assert router.scorer.counts("small", "Poetry Writing") == after
    # A score maps to an outcome; /v1/route decisions can be scored too.
    rid = post(gateway, "/v1/route", {"query": MATH}).json()["decision_id"]
    assert post(gateway, "/v1/feedback", {"decision_id": rid, "outcome": 0.9}).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [({"decision_id": "nope", "outcome": "win"}, 404, "decision_id"),
     ({"outcome": "win"}, 400, "decision_id"),
     ({"decision_id": "x"}, 400, "outcome"),
     ({"decision_id": "x", "outcome": True}, 400, "outcome"),
     ({"decision_id": "x", "outcome": "win", "extra": 1}, 400, "extra")],
)
def test_feedback_errors(gateway: RunningGateway, body: Any, status: int, param: str) -> None:
    r = post(gateway, "/v1/feedback", body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_feedback_bad_outcome_for_a_known_decision(gateway: RunningGateway) -> None:
    did = post(gateway, "/v1/route", {"query": POEM}).json()["decision_id"]
    for bad in ("great", 1.5, -0.1):
        r = post(gateway, "/v1/feedback", {"decision_id": did, "outcome": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "outcome"
    assert post(gateway, "/v1/feedback", {"decision_id": did, "outcome": "tie"}).status_code == 200


def test_feedback_survives_a_restart(fakes: dict[str, Fake], tmp_path: Path) -> None:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    cfg = gateway_config(urls, feedback={"state_dir": str(tmp_path / "state")})
    with running_gateway(cfg) as g:
        ids = [post(g, "/v1/route", {"query": POEM}).json()["decision_id"] for _ in range(3)]
        for did in ids:
            assert post(g, "/v1/feedback", {"decision_id": did, "outcome": "loss"}).status_code \
                == 200
        counts = g.gw.router.scorer.counts("small", "Poetry Writing")
    with running_gateway(cfg) as g:
        assert g.gw.router.scorer.counts("small", "Poetry Writing") == counts
        assert post(g, "/v1/feedback", {"decision_id": ids[0], "outcome": "win"}).status_code \
            == 409


def test_feedback_off_without_a_state_dir(fakes: dict[str, Fake]) -> None:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    with running_gateway(gateway_config(urls)) as g:
        did = post(g, "/v1/route", {"query": POEM}).json()["decision_id"]
        r = post(g, "/v1/feedback", {"decision_id": did, "outcome": "win"})
        assert r.status_code == 503 and "state_dir" in r.json()["error"]["message"]


# ==== Admin ====


def admin(g: RunningGateway, path: str, body: Any = None, method: str = "POST",
          token: str | None = ADMIN_TOKEN) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.request(method, g.url + path, json=body, headers=headers, timeout=30)


def _judgments(d: Path, model: str, n: int) -> Path:
    d.mkdir()
    q = ["query_id,query_text"] + [f"j{i},Write a short poem about thing {i}" for i in range(n)]
    o = ["query_id,model,outcome"] + [f"j{i},{model},win" for i in range(n)]
    (d / "queries.csv").write_text("\n".join(q) + "\n")
    (d / "outcomes.csv").write_text("\n".join(o) + "\n")
    return d


def test_admin_refuses_without_the_right_token(
    gateway: RunningGateway, fakes: dict[str, Fake], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tagrouter.access")
    assert admin(gateway, "/admin/theta", {"theta": 1}, token=None).status_code == 401
    r = admin(gateway, "/admin/theta", {"theta": 1}, token="wrong")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert gateway.gw.router.decider.theta == 0.0
    assert admin(gateway, "/admin/snapshot").status_code == 200
    assert ADMIN_TOKEN not in caplog.text  # logged requests never carry the token
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    with running_gateway(gateway_config(urls)) as g:  # no [admin] token_env: off
        r = admin(g, "/admin/theta", {"theta": 1})
        assert r.status_code == 403 and "token_env" in r.json()["error"]["message"]


def test_admin_add_and_remove_a_model(
    fakes: dict[str, Fake], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    cfg = gateway_config(urls, admin={"token_env": "TEST_ADMIN_TOKEN"},
                         feedback={"state_dir": str(tmp_path / "state")})
    table = _judgments(tmp_path / "mid-judgments", "mid-v1", 10)
    with running_gateway(cfg) as g:
        v0 = g.gw.learner.version
        body = {"backend": {"name": "mid", "base_url": fakes["mid"].url + "/v1",
                            "model": "mid-model"},
                "judgments": str(table), "table_model": "mid-v1", "cost": 0.5}
        r = admin(g, "/admin/models", body)
        assert r.status_code == 200, r.text
        assert r.json()["judgments"] == 10 and "mid" in r.json()["models"]
        assert g.gw.learner.version > v0  # the store change went through the durable store
        # Routable at once: the poems now go to mid (more wins than small, and cheaper).
        r = post(g, "/v1/chat/completions", chat_body(POEM))
        assert r.headers["x-tagrouter-model"] == "mid"
        assert r.json()["model"] == "mid-model"
        assert admin(g, "/admin/models", body).status_code == 409  # exists already
        r = admin(g, "/admin/models/mid", method="DELETE")
        assert r.status_code == 200 and "mid" not in r.json()["models"]
        assert post(g, "/v1/chat/completions", chat_body(POEM)).headers[
            "x-tagrouter-model"] == "small"
        r = post(g, "/v1/chat/completions", {**chat_body(POEM), "model": "mid"})
        assert r.status_code == 400
        assert admin(g, "/admin/models/mid", method="DELETE").status_code == 404


def test_admin_add_model_like_and_as_llm(
    fakes: dict[str, Fake], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    cfg = gateway_config(urls, admin={"token_env": "TEST_ADMIN_TOKEN"},
                         feedback={"state_dir": str(tmp_path / "state")})
    with running_gateway(cfg) as g:
        backend = {"name": "twin", "base_url": fakes["mid"].url + "/v1", "model": "mid-model"}
        # Zero judgments: a copy of small's counts, routable at once.
        r = admin(g, "/admin/models", {"backend": backend, "like": "small", "cost": 0.5})
        assert r.status_code == 200, r.text
        assert r.json()["judgments"] == 0 and r.json()["copied"] > 0
        s = g.gw.router.scorer
        assert s.model_totals("twin") == s.model_totals("small")
        # A new M_LLM from the pool's average.
        giant = {**backend, "name": "giant"}
        r = admin(g, "/admin/models", {"backend": giant, "like": "pool", "as_llm": True,
                                       "cost": 1000})
        assert r.status_code == 200, r.text
        assert r.json()["llm"] == "giant" and g.gw.router.decider.llm == "giant"
        # Refusals name the problem; the backend is not left behind.
        bad = {**backend, "name": "nope"}
        for body, needle in (
            ({"backend": bad, "like": "ghost", "cost": 1}, "not in the router's store"),
            ({"backend": bad, "like": 3, "cost": 1}, "like"),
            ({"backend": bad, "like": "small", "as_llm": "yes", "cost": 1}, "as_llm"),
            ({"backend": bad, "like": "small", "as_llm": True, "cost": 0.1}, "cheaper"),
        ):
            r = admin(g, "/admin/models", body)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
            assert "nope" not in g.gw.backends


@pytest.mark.parametrize(
    ("body", "needle"),
    [({"judgments": "x", "cost": 1}, "backend"),
     ({"backend": {"name": "n"}, "judgments": "x", "cost": 1}, "backend.base_url"),
     ({"backend": {"name": "n", "base_url": "http://h"}, "cost": 1}, "judgments"),
     ({"backend": {"name": "n", "base_url": "http://h"}, "judgments": "/nonexistent"}, "cost"),
     ({"backend": {"name": "n", "base_url": "http://h"}, "judgments": "/nonexistent",
       "cost": 1}, "nonexistent")],
)
def test_admin_add_model_bad_requests(gateway: RunningGateway, body: Any, needle: str) -> None:
    r = admin(gateway, "/admin/models", body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert "n" not in gateway.gw.backends


def test_admin_theta_and_llm_share_budget(
    fakes: dict[str, Fake], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    with running_gateway(gateway_config(urls, admin={"token_env": "TEST_ADMIN_TOKEN"})) as g:
        assert admin(g, "/admin/theta", {"theta": 5.0}).json() == {"theta": 5.0}
        assert post(g, "/v1/route", {"query": POEM}).json()["model"] == "big"
        # A budget of no M_LLM traffic on these queries: the maths goes to small too.
        r = admin(g, "/admin/theta", {"llm_share": 0.0, "queries": [POEM, MATH]})
        assert r.status_code == 200 and r.json()["queries"] == 2
        assert post(g, "/v1/route", {"query": MATH}).json()["model"] == "small"
        # Without queries, the budget is set on the traffic seen so far.
        r = admin(g, "/admin/theta", {"llm_share": 1.0})
        assert r.status_code == 200 and r.json()["queries"] >= 2
        assert post(g, "/v1/route", {"query": POEM}).json()["model"] == "big"
        for bad in ({}, {"theta": "x"}, {"llm_share": 2}, {"theta": 1, "llm_share": 0.5}):
            assert admin(g, "/admin/theta", bad).status_code == 400
        assert admin(g, "/admin/snapshot").status_code == 503  # no feedback store here


def test_admin_snapshot_and_reload(
    fakes: dict[str, Fake], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tagrouter_fast.demo.router import KeywordTagger
    from tagrouter_fast.router import TagRouter

    monkeypatch.setenv("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    bundle = tmp_path / "bundle"
    demo_router().save(bundle)
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    cfg = gateway_config(urls, admin={"token_env": "TEST_ADMIN_TOKEN"},
                         router={"bundle": str(bundle)},
                         feedback={"state_dir": str(tmp_path / "state")})
    router = TagRouter.load(bundle, tagger=KeywordTagger())
    with running_gateway(cfg, router=router) as g:
        did = post(g, "/v1/route", {"query": POEM}).json()["decision_id"]
        assert post(g, "/v1/feedback", {"decision_id": did, "outcome": "loss"}).status_code \
            == 200
        r = admin(g, "/admin/snapshot")
        assert r.status_code == 200 and Path(r.json()["snapshot"]).is_file()
        counts = g.gw.router.scorer.counts("small", "Poetry Writing")
        # A new bundle on disk (same store, another theta): reloaded, with the learned counts.
        demo_router().save(bundle)
        meta = json.loads((bundle / "router.json").read_text())
        (bundle / "router.json").write_text(json.dumps({**meta, "theta": 5.0}))
        r = admin(g, "/admin/reload")
        assert r.status_code == 200 and r.json()["theta"] == 5.0
        assert post(g, "/v1/route", {"query": POEM}).json()["model"] == "big"
        assert g.gw.router.scorer.counts("small", "Poetry Writing") == counts
        assert post(g, "/v1/feedback", {"decision_id": did, "outcome": "win"}).status_code \
            == 409


# ==== Observability ====


def test_metrics_health_and_readiness(gateway: RunningGateway, fakes: dict[str, Fake]) -> None:
    post(gateway, "/v1/chat/completions", chat_body(POEM))
    fakes["small"].backend.command(mode="error", times=1)
    post(gateway, "/v1/chat/completions", chat_body(POEM))
    did = post(gateway, "/v1/route", {"query": MATH}).json()["decision_id"]
    post(gateway, "/v1/feedback", {"decision_id": did, "outcome": "win"})
    post(gateway, "/v1/feedback", {"decision_id": "nope", "outcome": "win"})
    m = httpx.get(gateway.url + "/metrics").text
    assert "tagrouter_decision_seconds_bucket" in m
    assert 'tagrouter_routed_total{model="small",reason="argmax"}' in m
    assert 'tagrouter_routed_total{model="big",reason="failover"}' in m
    assert 'tagrouter_backend_seconds_count{backend="small"}' in m
    assert 'tagrouter_backend_errors_total{backend="small",kind="status"}' in m
    assert 'tagrouter_feedback_total{result="accepted"}' in m
    assert 'tagrouter_feedback_total{result="unknown"}' in m
    version = [ln for ln in m.splitlines() if ln.startswith("tagrouter_store_version ")]
    assert float(version[0].split()[1]) == gateway.gw.learner.version >= 1
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200 and sorted(ready.json()["models"]) == ["big", "small"]


def test_one_json_access_log_line_per_request(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tagrouter.access")
    r = post(gateway, "/v1/chat/completions", chat_body(POEM))
    post(gateway, "/v1/chat/completions", {"model": "nope", "messages": []})
    assert wait_for(lambda: len([x for x in caplog.records if x.name == "tagrouter.access"]) >= 2)
    lines = [json.loads(x.getMessage()) for x in caplog.records if x.name == "tagrouter.access"]
    first = lines[0]
    assert first["decision_id"] == r.headers["x-tagrouter-decision-id"]
    assert (first["path"], first["status"], first["model"], first["reason"]) == (
        "/v1/chat/completions", 200, "small", "argmax")
    assert first["ms"] > 0
    assert lines[1]["status"] == 400 and lines[1]["decision_id"] is None


# ==== Config ====


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[backends]]\nname = "a"\nbase_url = "http://h/v1"\n[[backends]]\nname = "b"\n',
         "config error: backends[1].base_url: missing"),
        ('[[backends]]\nname = "a"\nbase_url = "http://h/v1"\ntimout_s = 3\n',
         "config error: backends[0].timout_s: unknown key"),
        ('[[backends]]\nname = "a"\nbase_url = "ftp://h"\n', "backends[0].base_url: must be"),
        ('[[backends]]\nname = "a"\nbase_url = "http://h"\ntimeout_s = -1\n',
         "backends[0].timeout_s: must be >= 0"),
        ('[[backends]]\nname = "a"\nbase_url = "http://h"\n[[backends]]\nname = "a"\n'
         'base_url = "http://h"\n', "backends[1].name: 'a' is already backends[0]"),
        ('[[backends]]\nname = "a"\nbase_url = "http://h"\n[fallback]\norder = ["z"]\n',
         "fallback.order[0]: 'z' is not a backend name"),
        ('[[backends]]\nname = "a"\nbase_url = "http://h"\n[limits]\nmax_concurrency = 0\n',
         "limits.max_concurrency: must be between 1"),
        ('[[backends]]\nname = "a"\nbase_url = "http://h"\n[limits]\nkeepalive_s = 0\n',
         "limits.keepalive_s: must be > 0"),
        ('[[backends]]\nname = "a"\nbase_url = "http://h"\n[server]\nkeepalive_s = 2.5\n',
         "server.keepalive_s: must be an integer"),
        ('[server]\nport = 80\n', "config error: backends: missing"),
        ('[[backends]]\nname = "a"\nbase_url = "http://h"\n[serverr]\n',
         "config error: serverr: unknown key"),
        ("[[backends]\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, toml))
    assert message in str(e.value)


def test_config_checks_against_the_router_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tagrouter_fast.serve.edge.app import create_app

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    cfg = load_config(_write(tmp_path, '[router]\nbundle = "b"\n[[backends]]\nname = "small"\n'
                             'base_url = "http://127.0.0.1:1/v1"\n'))
    assert cfg.router.bundle == tmp_path / "b"  # relative to the config file
    with pytest.raises(ConfigError, match=r"backends: no backend for routed model\(s\) \['big'\]"):
        create_app(cfg, router=demo_router())
    cfg = load_config(_write(tmp_path, '[[backends]]\nname = "small"\nbase_url = "http://h"\n'
                             'api_key_env = "NO_SUCH_KEY_VAR"\n'))
    with pytest.raises(ConfigError, match="backends\\[0\\].api_key_env: environment variable "
                       "NO_SUCH_KEY_VAR is not set"):
        create_app(cfg, router=demo_router())
    cfg = load_config(_write(tmp_path, '[[backends]]\nname = "small"\nbase_url = "http://h"\n'))
    with pytest.raises(ConfigError, match="router.bundle: missing"):
        create_app(cfg)


# ==== Load ====


@pytest.fixture(scope="module")
def backend_processes() -> Iterator[dict[str, Any]]:
    """Fake backends in child processes: a load run in one process would mostly measure the
    GIL shared by client, gateway and backends."""
    from tagrouter_fast.demo.servers import BackendProcess

    procs = {}
    try:
        for name in ("small", "big"):
            procs[name] = BackendProcess(name)
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def test_load_zero_errors_and_no_lost_feedback(
    backend_processes: dict[str, Any], tmp_path: Path
) -> None:
    """2000 requests at 64 concurrent (a quarter streamed) with zero errors, while 8 writers
    post an outcome for every answered decision: each one is counted, none twice."""
    n_requests, concurrency, writers = 2000, 64, 8
    urls = {name: p.url for name, p in backend_processes.items()}
    # Deadlines far above the queueing a loaded 2-core machine can add: this test is about
    # errors and lost outcomes, not latency.
    patient = {"timeout_s": 30.0, "stream_idle_timeout_s": 30.0}
    cfg = gateway_config(urls, backend_overrides={"small": patient, "big": patient},
                         feedback={"state_dir": str(tmp_path / "state")},
                         server={"access_log": False})

    async def run(g: RunningGateway) -> tuple[list[str], int, int]:
        errors: list[str] = []
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        counter = iter(range(n_requests))
        accepted = 0
        limits = httpx.Limits(max_connections=concurrency + writers)
        async with httpx.AsyncClient(base_url=g.url, limits=limits, timeout=30) as client:

            async def worker() -> None:
                for i in counter:
                    body = chat_body(POEM if i % 2 else MATH, stream=i % 4 == 0)
                    try:
                        if body["stream"]:
                            async with client.stream("POST", "/v1/chat/completions",
                                                     json=body) as r:
                                text = b"".join([c async for c in r.aiter_bytes()])
                                ok = r.status_code == 200 and text.endswith(b"data: [DONE]\n\n")
                        else:
                            r = await client.post("/v1/chat/completions", json=body)
                            ok = r.status_code == 200 and r.json()["choices"]
                    except httpx.HTTPError as e:
                        errors.append(repr(e))
                        continue
                    if not ok:
                        errors.append(f"{r.status_code}")
                    else:
                        await queue.put(r.headers["x-tagrouter-decision-id"])

            async def writer() -> None:
                nonlocal accepted
                while (did := await queue.get()) is not None:
                    outcome = random.choice(["win", "tie", "loss"])
                    r = await client.post("/v1/feedback",
                                          json={"decision_id": did, "outcome": outcome})
                    if r.status_code == 200:
                        accepted += 1
                    else:
                        errors.append(f"feedback {r.status_code} {r.text}")

            writer_tasks = [asyncio.create_task(writer()) for _ in range(writers)]
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            for _ in writer_tasks:
                await queue.put(None)
            await asyncio.gather(*writer_tasks)
        return errors, accepted, queue.qsize()

    with running_gateway(cfg) as g:
        v0, q0 = g.gw.learner.version, g.gw.router.scorer.n_learned
        t0 = time.perf_counter()
        errors, accepted, left = asyncio.run(run(g))
        elapsed = time.perf_counter() - t0
        assert errors == [] and left == 0
        assert accepted == n_requests
        # Every acknowledged outcome is in the store, once: one new query per decision.
        assert g.gw.learner.version - v0 == accepted
        assert g.gw.router.scorer.n_learned - q0 == accepted
        assert g.gw.inflight == 0
        assert leases_returned(g)
    print(f"load: {n_requests} requests + {accepted} outcomes in {elapsed:.1f} s")


# ==== The command line ====


def test_serve_app_keeps_its_public_names() -> None:
    # `tagrouter_fast.serve.app` is where embedders found the gateway before it took the shape
    # of its flows (edge -> policy -> forward): the same objects, re-exported.
    from tagrouter_fast.serve import app
    from tagrouter_fast.serve.edge import app as edge_app
    from tagrouter_fast.serve.edge import startup
    from tagrouter_fast.serve.policy import gateway

    assert app.create_app is edge_app.create_app and app.serve is startup.serve
    assert app.Gateway is gateway.Gateway and app.StartupError is startup.StartupError


def test_tagrouter_serve_demo_runs_with_one_command(tmp_path: Path) -> None:
    with cli_gateway("--demo", "--demo-tagger", "keyword",
                     "--state-dir", str(tmp_path / "state")) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="tagrouter", messages=[{"role": "user", "content": MATH}])
        assert raw.headers["x-tagrouter-model"] == "big"
        did = raw.headers["x-tagrouter-decision-id"]
        r = httpx.post(g.url + "/v1/feedback", json={"decision_id": did, "outcome": "win"})
        assert r.status_code == 200
    # The access log is one JSON line per request, carrying the decision id.
    lines = [json.loads(x) for x in g.output.splitlines() if x.startswith("{")]
    assert any(x.get("decision_id") == did for x in lines)


def test_tagrouter_serve_bad_config_is_one_line(tmp_path: Path) -> None:
    cfg = _write(tmp_path, '[[backends]]\nname = "a"\n')
    r = subprocess.run([sys.executable, "-m", "tagrouter_fast.cli", "serve", "--config",
                        str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "tagrouter serve: error: config error: backends[0].base_url: missing"


@pytest.mark.parametrize("name", ["tagrouter_fast.serve.config",
                                  "tagrouter_fast.serve.policy.sessions",
                                  "tagrouter_fast.demo.fake_backend"])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
