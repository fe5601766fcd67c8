"""`BackendProcess` in either protocol, and the per-protocol requests the gateway benchmarks
send to it (`benches/gateway_pairs.py`): a bench that took a cut stream for a complete one
would time an error as a fast answer."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
aiohttp = pytest.importorskip("aiohttp")

from tagrouter_fast.demo.servers import BackendProcess, http_json, http_status  # noqa: E402

# The benches are not a package: their helpers import by directory, as pytest does for them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
from gateway_pairs import (  # noqa: E402
    APIS,
    Target,
    one_request,
    run_loop,
    session,
    stream_complete,
)


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, BackendProcess]]:
    with BackendProcess("ofake") as o, BackendProcess("afake", protocol="anthropic") as a:
        yield {"openai": o, "anthropic": a}


def _request(t: Target, stream: bool) -> tuple[float, float, bytes]:
    async def go() -> tuple[float, float, bytes]:
        async with session() as s:
            return await one_request(s, t, "Write a haiku about rain", stream)

    return run_loop(go())


def test_an_anthropic_process_answers_messages_only(
    backends: dict[str, BackendProcess],
) -> None:
    a = backends["anthropic"]
    assert a.protocol == "anthropic"
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}
    msg = http_json(a.url + "/v1/messages", body)
    assert msg["type"] == "message" and msg["content"][0]["text"] == "afake answers: Hi"
    # Chat completions are the OpenAI process's: the Anthropic one has no such route.
    assert http_status(a.url + "/v1/chat/completions") == 404
    assert backends["openai"].protocol == "openai"


def test_an_unknown_protocol_is_refused_before_starting() -> None:
    with pytest.raises(ValueError, match="protocol must be"):
        BackendProcess("x", protocol="grpc")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("api", "protocol"), [("chat", "openai"), ("messages", "anthropic")])
def test_bench_requests_get_whole_answers(backends: dict[str, BackendProcess], api: str,
                                          protocol: str, stream: bool) -> None:
    b = backends[protocol]
    total, first, data = _request(Target(b.name, b.url + "/v1", "m", api=api), stream)
    assert 0 < first <= total
    if stream:
        assert stream_complete(APIS[api], data)
        # The answer arrives in pieces, the backend's name in the first of them.
        assert f"{b.name} answers:".encode() in data
    else:
        assert f"{b.name} answers: Write a haiku about rain".encode() in data


def test_a_stream_cut_midway_is_an_error_not_an_answer(
    backends: dict[str, BackendProcess],
) -> None:
    a = backends["anthropic"]
    a.command(mode="reset", reset_after=2, times=1)
    try:
        with pytest.raises((RuntimeError, aiohttp.ClientError)):
            _request(Target("afake", a.url + "/v1", "m", api="messages"), True)
    finally:
        a.command()


def test_stream_complete_wants_the_protocols_last_event() -> None:
    done = b'event: message_delta\ndata: {}\n\nevent: message_stop\ndata: {}\n\n'
    assert stream_complete(APIS["messages"], done)
    assert not stream_complete(APIS["messages"], done[:-1])  # no event boundary at the end
    assert not stream_complete(APIS["messages"], b"event: message_delta\ndata: {}\n\n")
    # Another protocol's ending does not count.
    assert not stream_complete(APIS["chat"], done)
    assert stream_complete(APIS["chat"], b'data: {"x": 1}\n\ndata: [DONE]\n\n')
    assert stream_complete(APIS["responses"],
                           b"event: response.completed\ndata: {}\n\n")


def test_a_target_with_an_unknown_api_is_refused() -> None:
    with pytest.raises(ValueError, match="api must be one of"):
        Target("x", "http://127.0.0.1:1/v1", "m", api="soap")
