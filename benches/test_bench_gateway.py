"""Gateway overhead: (through the gateway) - (straight to the backend), measured side by side in
one run against the shipped fake backend, with LiteLLM's proxy beside it when it is installed.

Run with ``make bench-gateway`` (``make bench-gateway-litellm`` with LiteLLM), or
``pytest benches/test_bench_gateway.py --benchmark-enable -s`` (``-s`` shows the summary lines).
Every process is separate: the fake backends, the gateway (``tagrouter serve`` on the demo
router) and LiteLLM's proxy each run in their own process, the client in this one.

The added latency is measured on an equal baseline (`gateway_pairs`): one aiohttp client session
with kept-alive connections for both legs, the same backend process, the same query in the same
round, the first leg alternating, and no third server in those rounds (LiteLLM's proxy keeps a
core busy after each answer, which slowed whoever came next: it gets rounds of its own). Each
leg reports p50 and p99, and the gateway its CPU per request.

Scenarios: tagging excluded (a keyword tagger: microseconds) and included (the default tagger:
one encoder pass per request), streaming (time to first byte and to the last) and not, one
client, 512 concurrent paced streams (gaps between events), 64 concurrent (throughput), and
the CPU of a routed query's tagging with and without head pooling. Per client protocol (keyword
tagger): /v1/responses and /v1/messages against a direct call of the same protocol, an Anthropic
client translated to an OpenAI backend against one passed through to an Anthropic backend, and
the gateway's CPU per request in each protocol beside chat's. Goals (docs/serving.md): added
p99 <= 1 ms without tagging, streams without a gap > 100 ms that the backend did not make, zero
errors, translation's extra <= 0.3 ms p50, each protocol's CPU within 1.2x of chat's.

LiteLLM is the optional ``peers-litellm`` extra (``pip install -e '.[peers-litellm]'``); set
``TAGROUTER_LITELLM`` to a ``litellm`` executable of another environment to use that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_pairs import Target, cpu_seconds, pairs, pct, streams
from skip_policy import extra_missing, import_extra

httpx = import_extra("serve", "httpx")
import_extra("serve", "aiohttp")
import_extra("serve", "starlette")
import_extra("serve", "uvicorn")

from tagrouter_fast.demo.servers import BackendProcess, free_port  # noqa: E402

#: Interleaved (direct, gateway) pairs per one-client scenario: p99 needs 1,000+ samples.
N_PAIRS = 1500
#: Rounds per scenario of the per-protocol benchmarks (/v1/responses, /v1/messages, translation).
N_PROTOCOL_PAIRS = 1000
N_CONCURRENT = 2000
CONCURRENCY = 64
#: Concurrent streams, and the backend's pacing of their events.
N_STREAMS = 512
STREAM_EVENTS = 10
STREAM_PACE_S = 0.1
#: Queries of each kind per variant in the routed-query CPU scenario.
ROUTED_ROUNDS = 200
#: A gap between two events of a stream longer than the pacing plus this is a stall.
STALL_S = 0.1

#: Queries that carry their own input after an instruction: the default tagger scores the
#: instruction alone too (a second encoder run, or a pooled one with head_pooling).
HEADED = [f"{head}: {body}" for head in (
    "Summarize this abstract", "Translate into French", "Rewrite in a friendlier tone",
    "Find the grammar mistakes in this text", "Classify the sentiment of this review")
    for body in ("Deep networks need a lot of labelled data to generalise well.",
                 "The meeting was moved to Thursday because the room was booked.",
                 "I waited an hour for a cold pizza and the driver was rude to me.",
                 "Prices rose faster than wages for the third year in a row here.")]

#: Writing queries: the keyword tagger's demo router sends them all to ``small``, the backend
#: the direct leg calls (checked during the warm-up).
WRITING = [f"Write a short poem about the {w} at dawn, take {i}" for i, w in
           enumerate(["sea", "moon", "rain", "forest", "city", "snow"] * 20)]
QUERIES = WRITING + [f"Solve the equation {a}x + {a + 1} = {2 * a} step by step"
                     for a in range(1, 100)]

_GATEWAY = """
import sys
from tagrouter_fast.serve.edge.startup import serve
from tagrouter_fast.serve.config import load_config
from tagrouter_fast.demo.router import demo_router
serve(load_config(sys.argv[1]), router=demo_router(sys.argv[2]), port=int(sys.argv[3]))
"""


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready in {timeout_s} s")


@pytest.fixture(scope="module")
def backend() -> Iterator[BackendProcess]:
    with BackendProcess("small") as small, BackendProcess("big") as big:
        small.big = big  # type: ignore[attr-defined]
        yield small


def _gateway(
    backend: BackendProcess, tagger: str, tmp: Path, extra: str = "", name: str = ""
) -> Iterator[Target]:
    """A gateway process on ``backend`` (``small``) and its ``big``, both of the backends'
    protocol (``backend.protocol``)."""
    big: BackendProcess = backend.big  # type: ignore[attr-defined]
    cfg = tmp / f"gateway-{tagger}.toml"
    protocol = f'protocol = "{backend.protocol}"\n'
    cfg.write_text(
        "[server]\naccess_log = false\n[limits]\nmax_concurrency = 4096\nmax_connections = 1024\n"
        # Anonymous, as the figures in docs/serving.md were measured (no key to check).
        "[auth]\nallow_anonymous = true\nanonymous_feedback = true\n"
        f'[[backends]]\nname = "small"\nbase_url = "{backend.url}/v1"\nmodel = "small-model"\n'
        + protocol +
        f'[[backends]]\nname = "big"\nbase_url = "{big.url}/v1"\nmodel = "big-model"\n'
        + protocol + extra
    )
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _GATEWAY, str(cfg), tagger, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        yield Target(name or f"tagrouter ({tagger} tagger)", f"http://127.0.0.1:{port}/v1",
                     "tagrouter", proc.pid)
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def backend_anthropic() -> Iterator[BackendProcess]:
    """Fakes answering Anthropic Messages, named like the OpenAI ones (their answers read
    ``small answers: ...`` too, which `_from_small` checks)."""
    with BackendProcess("small", protocol="anthropic") as small, \
            BackendProcess("big", protocol="anthropic") as big:
        small.big = big  # type: ignore[attr-defined]
        yield small


@pytest.fixture(scope="module")
def gateway_anthropic(backend_anthropic: BackendProcess,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The keyword gateway on Anthropic backends: /v1/messages passes through untranslated."""
    yield from _gateway(backend_anthropic, "keyword", tmp_path_factory.mktemp("gw"),
                        name="tagrouter (keyword tagger, anthropic backends)")


@pytest.fixture(scope="module")
def gateway_twins(backend: BackendProcess, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[list[Target]]:
    """Two more processes of `gateway_fast`'s configuration: a protocol each, so that each
    protocol's CPU per request is its own process's, in the same rounds as chat's."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(contextlib.contextmanager(_gateway)(
            backend, "keyword", tmp_path_factory.mktemp("gw"),
            name=f"tagrouter (keyword tagger, process {k})")) for k in (2, 3)]


@pytest.fixture(scope="module")
def gateway_fast(backend: BackendProcess, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Target]:
    yield from _gateway(backend, "keyword", tmp_path_factory.mktemp("gw"))


@pytest.fixture(scope="module")
def gateway_tagged(backend: BackendProcess, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Target]:
    yield from _gateway(backend, "default", tmp_path_factory.mktemp("gw"))


@pytest.fixture(scope="module")
def gateway_feedback(backend: BackendProcess, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("gw")
    # Durable feedback (journal fsynced before the acknowledgement), as in production.
    extra = f'[feedback]\nstate_dir = "{tmp / "state"}"\n'
    yield from _gateway(backend, "keyword", tmp, extra)


@pytest.fixture(scope="module")
def litellm(backend: BackendProcess) -> Iterator[Target]:
    exe = os.environ.get("TAGROUTER_LITELLM") or shutil.which("litellm")
    if not exe:
        pytest.skip(extra_missing(
            "peers-litellm", "no litellm on PATH (make bench-gateway-litellm, or set "
            "TAGROUTER_LITELLM to a litellm executable)"))
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "litellm.yaml"
        # JSON is YAML: no YAML writer needed.
        cfg.write_text(json.dumps({
            "model_list": [{"model_name": "small", "litellm_params": {
                "model": "openai/small-model", "api_base": backend.url + "/v1",
                "api_key": "unused"}}],
            "litellm_settings": {"drop_params": True, "telemetry": False},
        }))
        # Loopback only, no network: the bundled cost map, and no master key (LiteLLM >= 1.108
        # refuses to start without one unless told this is local development).
        env = {**os.environ, "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
               "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
        proc = subprocess.Popen(
            [exe, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        try:
            _wait_ready(f"http://127.0.0.1:{port}/health/readiness", proc, timeout_s=180)
            yield Target("litellm proxy", f"http://127.0.0.1:{port}/v1", "small", proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)


# ==== Measuring ====


def _body(model: str, query: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": query}], "stream": stream}


def _from_small(t: Target, data: bytes) -> None:
    """The direct leg calls ``small``: a gateway answer from another backend would compare two
    backends, not the hop."""
    if t.pid is not None and b"small answers" not in data:
        raise AssertionError(f"{t.name} answered from another backend than small: {data[:200]!r}")


def _direct(backend: BackendProcess) -> Target:
    return Target("direct", backend.url + "/v1", "small-model")


def concurrent(t: Target, stream: bool, n: int = N_CONCURRENT,
               concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """Requests/s, p50/p99 and errors of ``n`` requests at ``concurrency`` in flight; for a
    server with a known process, its CPU milliseconds per request and requests per CPU-second
    (what one dedicated core would sustain)."""

    async def run() -> tuple[float, list[float], int, list[str]]:
        counter = iter(range(n))
        lat: list[float] = []
        errors = 0
        examples: list[str] = []
        # Idle connections dropped before the fake backend's 5 s keep-alive closes them (else
        # a reuse can race the close: a ReadError that is the client's, not the server's).
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                              keepalive_expiry=4.0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:

            async def worker() -> None:
                nonlocal errors
                for i in counter:
                    body = _body(t.model, QUERIES[i % len(QUERIES)], stream)
                    t0 = time.perf_counter()
                    try:
                        if stream:
                            async with client.stream("POST", t.url + "/chat/completions",
                                                     json=body) as r:
                                data = await r.aread()
                            ok = r.status_code == 200 and data.endswith(b"[DONE]\n\n")
                        else:
                            r = await client.post(t.url + "/chat/completions", json=body)
                            ok = r.status_code == 200
                        if not ok:
                            tail = data[-200:] if stream else r.content[-200:]
                            what = f"{r.status_code}: {tail!r}"
                    except httpx.HTTPError as e:
                        ok, what = False, f"{type(e).__name__}: {e}"
                    lat.append(time.perf_counter() - t0)
                    errors += not ok
                    if not ok and len(examples) < 3:
                        examples.append(what)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - t0, lat, errors, examples

    cpu0 = cpu_seconds(t.pid) if t.pid else 0.0
    elapsed, lat, errors, examples = asyncio.run(run())
    out: dict[str, Any] = {"requests/s": round(n / elapsed, 1), "p50 ms": round(pct(lat, 0.5), 3),
                           "p99 ms": round(pct(lat, 0.99), 3), "errors": errors}
    if t.pid:
        cpu = cpu_seconds(t.pid) - cpu0
        out["CPU ms/request"] = round(cpu / n * 1e3, 3)
        out["requests per CPU-second"] = round(n / max(cpu, 1e-9), 1)
    if examples:
        out["error examples"] = examples
    return out


def _report(benchmark: Any, title: str, info: dict[str, Any]) -> None:
    benchmark.extra_info.update(info)
    print(f"\n{title}: " + json.dumps(info))


def _peer(request: pytest.FixtureRequest) -> list[Target]:
    try:
        return [request.getfixturevalue("litellm")]
    except pytest.skip.Exception as e:
        print(f"\n(LiteLLM not measured: {e})")
        return []


# ==== Scenarios ====


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_added_latency_tagging_excluded(
    benchmark: Any, backend: BackendProcess, gateway_fast: Target, stream: bool
) -> None:
    """Direct and through the gateway (keyword tagger), interleaved pairs on one client."""
    info: dict[str, Any] = {}

    def run() -> None:
        info.update(pairs([_direct(backend), gateway_fast], WRITING, stream, N_PAIRS,
                          check=_from_small))

    benchmark.group = f"gateway, 1 client, {'stream' if stream else 'json'}, no tagging"
    benchmark.pedantic(run, rounds=1, iterations=1)
    _report(benchmark, benchmark.group, info)


def _direct_anthropic(backend_anthropic: BackendProcess) -> Target:
    return Target("direct (anthropic)", backend_anthropic.url + "/v1", "small-model",
                  api="messages")


def _speaking(t: Target, api: str, name: str) -> Target:
    """``t`` spoken to in another client protocol, under a name that says which."""
    return dataclasses.replace(t, name=name, api=api)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", ["responses", "messages"])
def test_protocol_added_latency(
    benchmark: Any, request: pytest.FixtureRequest, backend: BackendProcess,
    gateway_fast: Target, api: str, stream: bool,
) -> None:
    """/v1/responses and /v1/messages through the gateway (keyword tagger), against a direct
    call of the same protocol in interleaved pairs: Messages straight to the Anthropic fake
    (the gateway on Anthropic backends, nothing translated). No backend speaks Responses: its
    baseline is a chat completion straight to the OpenAI fake, the backend the gateway
    translates it to."""
    if api == "messages":
        direct = _direct_anthropic(request.getfixturevalue("backend_anthropic"))
        gw = request.getfixturevalue("gateway_anthropic")
    else:
        direct, gw = _direct(backend), gateway_fast
    gw = _speaking(gw, api, f"tagrouter /v1/{api}")
    info: dict[str, Any] = {"baseline": f"{direct.name}, {direct.api}"}

    def run() -> None:
        info.update(pairs([direct, gw], WRITING, stream, N_PROTOCOL_PAIRS, check=_from_small))

    benchmark.group = f"gateway /v1/{api}, 1 client, {'stream' if stream else 'json'}, no tagging"
    benchmark.pedantic(run, rounds=1, iterations=1)
    _report(benchmark, benchmark.group, info)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_translation_extra(
    benchmark: Any, backend: BackendProcess, backend_anthropic: BackendProcess,
    gateway_fast: Target, gateway_anthropic: Target, stream: bool,
) -> None:
    """An Anthropic client through the gateway to an OpenAI backend (translated both ways)
    against the same client through a gateway to an Anthropic backend (passed through),
    interleaved in one run: the difference is what translating costs (goal: <= 0.3 ms p50).
    Both backends are also called directly in the same rounds: were the two fakes unequal, the
    difference of the hops' added times (each over its own backend) shows it."""
    same = _speaking(gateway_anthropic, "messages", "messages -> anthropic backend")
    translated = _speaking(gateway_fast, "messages", "messages -> openai backend")
    direct_a = _direct_anthropic(backend_anthropic)
    direct_o = _direct(backend)
    info: dict[str, Any] = {}

    def run() -> None:
        # The passed-through leg is the baseline: "added" is translation's extra.
        out = pairs([same, translated, direct_a, direct_o], WRITING, stream, N_PROTOCOL_PAIRS,
                    check=_from_small)
        info["rounds"] = out["rounds"]
        kinds = ["", "first byte "] if stream else [""]
        for kind in kinds:
            for p in ("p50", "p99"):
                info[f"translation extra, {kind}{p} ms"] = out[
                    f"{translated.name} added {kind}{p} ms"]
        info["translation extra, median of paired differences ms"] = out[
            f"{translated.name} added, median of paired differences ms"]
        for gw, d in ((same, direct_a), (translated, direct_o)):
            for kind in kinds:
                for p in ("p50", "p99"):
                    info[f"{gw.name}: {kind}{p} ms"] = out[f"{gw.name} {kind}{p} ms"]
                    info[f"{gw.name}: added over {d.name}, {kind}{p} ms"] = round(
                        out[f"{gw.name} {kind}{p} ms"] - out[f"{d.name} {kind}{p} ms"], 3)
            info[f"{gw.name}: gateway CPU ms/request"] = out[f"{gw.name} CPU ms/request"]
        for d in (direct_a, direct_o):
            info[f"{d.name} p50 ms"] = out[f"{d.name} p50 ms"]
            info[f"{d.name} p99 ms"] = out[f"{d.name} p99 ms"]
        info["translation extra p50 <= 0.3 ms"] = info["translation extra, p50 ms"] <= 0.3

    benchmark.group = f"gateway translation, anthropic client, {'stream' if stream else 'json'}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    _report(benchmark, benchmark.group, info)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_cpu_by_protocol(
    benchmark: Any, backend: BackendProcess, gateway_fast: Target, gateway_twins: list[Target],
    gateway_anthropic: Target, stream: bool,
) -> None:
    """The gateway's CPU per request in each client protocol, one gateway process per protocol
    (the same configuration), all in the same interleaved rounds beside a direct chat call:
    chat completions, Responses and Messages translated to the OpenAI backend, and Messages
    passed through to an Anthropic backend (goal: each within 1.2x of chat's)."""
    chat = _speaking(gateway_fast, "chat", "chat")
    others = [_speaking(gateway_twins[0], "responses", "responses -> openai backend"),
              _speaking(gateway_twins[1], "messages", "messages -> openai backend"),
              _speaking(gateway_anthropic, "messages", "messages -> anthropic backend")]
    info: dict[str, Any] = {}

    def run() -> None:
        info.update(pairs([_direct(backend), chat, *others], WRITING, stream, N_PROTOCOL_PAIRS,
                          check=_from_small))
        base = info[f"{chat.name} CPU ms/request"]
        for t in others:
            ratio = info[f"{t.name} CPU ms/request"] / base
            info[f"{t.name} CPU / chat's"] = round(ratio, 2)
            info[f"{t.name} within 1.2x"] = ratio <= 1.2

    benchmark.group = f"gateway CPU by protocol, 1 client, {'stream' if stream else 'json'}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    _report(benchmark, benchmark.group, info)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_litellm_beside(
    benchmark: Any, request: pytest.FixtureRequest, backend: BackendProcess,
    gateway_fast: Target, stream: bool,
) -> None:
    """LiteLLM's proxy and the gateway, each in rounds of its own against the same direct leg,
    one after the other in one run: the ratio of the added times."""
    peers = _peer(request)
    if not peers:
        pytest.skip(extra_missing("peers-litellm", "no litellm to compare with"))
    n = N_PAIRS // 5  # LiteLLM's ~10 ms per request: fewer rounds keep the run short
    info: dict[str, Any] = {}

    def run() -> None:
        ours = pairs([_direct(backend), gateway_fast], WRITING, stream, n)
        theirs = pairs([_direct(backend), peers[0]], WRITING, stream, n)
        info.update({f"[tagrouter rounds] {k}": v for k, v in ours.items()})
        info.update({f"[litellm rounds] {k}": v for k, v in theirs.items()})
        for p in ("p50", "p99"):
            info[f"litellm added / tagrouter added {p}"] = round(
                theirs[f"{peers[0].name} added {p} ms"]
                / max(ours[f"{gateway_fast.name} added {p} ms"], 1e-3), 1)

    benchmark.group = f"gateway vs litellm, 1 client, {'stream' if stream else 'json'}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    _report(benchmark, benchmark.group, info)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_overhead_one_client_default_tagger(
    benchmark: Any, backend: BackendProcess, gateway_tagged: Target, stream: bool
) -> None:
    from tagrouter_fast.tagging.taggers import DefaultTagger

    tagger = DefaultTagger()
    for q in QUERIES[:10]:
        tagger.tag(q)
    # The tagger pass is timed in the same rounds as the requests, on the same query. The
    # default tagger may send a query to ``big``, a fake backend identical to ``small``.
    name = "default tagger, one pass in-process"
    info: dict[str, Any] = {}

    def run() -> None:
        info.update(pairs([_direct(backend), gateway_tagged], QUERIES, stream, N_PAIRS // 5,
                          warmup=20, in_process={name: tagger.tag}))
        info["added minus one tagger pass, p50 ms"] = round(
            info[f"{gateway_tagged.name} added p50 ms"] - info[f"{name} p50 ms"], 3)

    benchmark.group = f"gateway, 1 client, {'stream' if stream else 'json'}, default tagger"
    benchmark.pedantic(run, rounds=1, iterations=1)
    _report(benchmark, benchmark.group, info)


def test_concurrent_streams_no_stall(
    benchmark: Any, backend: BackendProcess, gateway_fast: Target
) -> None:
    """512 streams at once, the backend pacing each stream's events STREAM_PACE_S apart: a gap
    longer than the pacing + STALL_S is a stall the backend did not make. The same load
    straight to the backend first, as the control (a stall there is the machine's)."""
    big: BackendProcess = backend.big  # type: ignore[attr-defined]
    for b in (backend, big):
        b.command(chunks=STREAM_EVENTS, chunk_delay_s=STREAM_PACE_S)
    info: dict[str, Any] = {"streams": N_STREAMS, "events paced ms": STREAM_PACE_S * 1e3}
    loads = {}

    def run() -> None:
        for t in (_direct(backend), gateway_fast):
            loads[t.name] = load = streams(t, WRITING, N_STREAMS)
            info[f"{t.name} errors"] = len(load.errors)
            if load.errors:
                info[f"{t.name} error examples"] = load.errors[:3]
            if load.ttft:
                info[f"{t.name} first event p50 ms"] = round(pct(load.ttft, 0.5), 1)
                info[f"{t.name} first event p99 ms"] = round(pct(load.ttft, 0.99), 1)
            if load.gaps:
                info[f"{t.name} gap p50 ms"] = round(pct(load.gaps, 0.5), 1)
                info[f"{t.name} gap p99 ms"] = round(pct(load.gaps, 0.99), 1)
                info[f"{t.name} gap max ms"] = round(max(load.gaps) * 1e3, 1)
            stalls = [e for g, e in zip(load.gaps, load.gap_ends, strict=True)
                      if g > STREAM_PACE_S + STALL_S]
            info[f"{t.name} stalls"] = len(stalls)
            # Before the last stream has its first event, new requests are still being
            # answered beside the open streams; after it, the streams are all that is relayed.
            info[f"{t.name} all streams open at s"] = round(load.all_open_s, 3)
            info[f"{t.name} stalls once all streams are open"] = sum(
                e > load.all_open_s for e in stalls)
            info[f"{t.name} wall s"] = round(load.wall_s, 2)

    try:
        benchmark.group = f"gateway, {N_STREAMS} concurrent paced streams"
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        for b in (backend, big):
            b.command()
    _report(benchmark, benchmark.group, info)
    gw = gateway_fast.name
    assert info[f"{gw} errors"] == 0, info
    assert len(loads[gw].gaps) == N_STREAMS * STREAM_EVENTS, info  # every paced gap seen
    assert info[f"{gw} stalls"] == 0, info


def test_routed_query_cpu_head_pooling(benchmark: Any) -> None:
    """CPU (this process, every thread: the helper thread's head run included) and wall time of
    ``route(query)`` with the default tagger, head_pooling off and on, beside one encoder pass,
    interleaved in rotating order on the same query."""
    from tagrouter_fast.demo.router import demo_router
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.tagging.taggers import DefaultTagger

    demo = demo_router("default")
    pooled_tagger = DefaultTagger(head_pooling=True)  # the default since 2026-12-07
    if not pooled_tagger.head_pooling:
        raise AssertionError("the default encoder does not pool prefixes: nothing to compare")
    two_runs = TagRouter(demo.decider, tagger=DefaultTagger(head_pooling=False), align=False)
    one_run = TagRouter(demo.decider, tagger=pooled_tagger, align=False)
    encoder = pooled_tagger.encoder
    calls = {
        "route, head_pooling=False": two_runs.route,
        "route, head_pooling=True": one_run.route,
        "one encoder pass": lambda q: encoder.encode([q]),
    }
    names = list(calls)

    kinds = {"headed": HEADED, "plain": WRITING[:len(HEADED)]}
    wall: dict[tuple[str, str], list[float]] = {(n, k): [] for n in calls for k in kinds}
    cpu: dict[tuple[str, str], list[float]] = {(n, k): [] for n in calls for k in kinds}

    def run() -> None:
        for k in range(ROUTED_ROUNDS):
            for kind, qs in kinds.items():
                q = qs[k % len(qs)]
                r = k % len(names)
                for name in names[r:] + names[:r]:
                    c0, t0 = time.process_time(), time.perf_counter()
                    calls[name](q)
                    wall[name, kind].append(time.perf_counter() - t0)
                    cpu[name, kind].append(time.process_time() - c0)

    for q in HEADED[:5] + WRITING[:5]:  # sessions warm
        for f in calls.values():
            f(q)
    benchmark.group = "routed query: default tagger, head pooling"
    benchmark.pedantic(run, rounds=1, iterations=1)
    info: dict[str, Any] = {"queries per variant and kind": ROUTED_ROUNDS}
    for kind in kinds:
        for name in names:
            info[f"{kind}: {name} wall p50 ms"] = round(pct(wall[name, kind], 0.5), 3)
            # process_time ticks coarsely on some kernels: the mean, not a median.
            xs = cpu[name, kind]
            info[f"{kind}: {name} CPU mean ms"] = round(sum(xs) / len(xs) * 1e3, 3)
        enc = names[2]
        for name in names[:2]:
            for what, unit in (("CPU", "CPU mean ms"), ("wall p50", "wall p50 ms")):
                info[f"{kind}: {name} / one encoder pass, {what}"] = round(
                    info[f"{kind}: {name} {unit}"] / info[f"{kind}: {enc} {unit}"], 2)
    _report(benchmark, benchmark.group, info)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_throughput_64_concurrent(
    benchmark: Any, request: pytest.FixtureRequest, backend: BackendProcess,
    gateway_fast: Target, gateway_tagged: Target, stream: bool,
) -> None:
    direct = Target("direct", backend.url + "/v1", "small-model", backend.proc.pid)
    targets = [direct, gateway_fast, gateway_tagged, *_peer(request)]
    info: dict[str, Any] = {}

    def run_all() -> None:
        for t in targets:
            # An encoder pass per request: fewer requests keep the run's length bounded.
            n = N_CONCURRENT // 4 if t is gateway_tagged else N_CONCURRENT
            for k, v in concurrent(t, stream, n=n).items():
                info[f"{t.name} {k}"] = v

    benchmark.group = f"gateway, {CONCURRENCY} concurrent, {'stream' if stream else 'json'}"
    benchmark.pedantic(run_all, rounds=1, iterations=1)
    if len(targets) > 3:
        for k in ("requests/s", "requests per CPU-second"):
            info[f"tagrouter / litellm {k}"] = round(
                info[f"{gateway_fast.name} {k}"] / info[f"litellm proxy {k}"], 1)
    _report(benchmark, benchmark.group, info)
    for t in targets[1:3]:
        assert info[f"{t.name} errors"] == 0, info


def test_outcome_visible_to_the_next_decision(benchmark: Any, gateway_feedback: Target) -> None:
    """Time from posting an outcome until the next decision for the same query reflects it
    (goal: <= 10 ms): a decision, its outcome (fsynced), then the same query routed again; the
    timed span is the outcome's round trip plus the next decision's. Every round checks that the
    scores did change."""
    client = httpx.Client(timeout=30)
    base = gateway_feedback.url
    spans: list[float] = []

    def scores(query: str) -> tuple[str, dict[str, float]]:
        r = client.post(f"{base}/route", json={"query": query})
        r.raise_for_status()
        body = r.json()
        return body["decision_id"], body["explanation"]["scores"]

    def one_round() -> None:
        query = QUERIES[len(spans) % len(QUERIES)]
        did, before = scores(query)
        t0 = time.perf_counter()
        f = client.post(f"{base}/feedback", json={"decision_id": did, "outcome": "loss"})
        f.raise_for_status()
        _, after = scores(query)
        spans.append(time.perf_counter() - t0)
        assert after != before, "the outcome did not change the next decision's scores"

    benchmark.pedantic(one_round, rounds=200, iterations=1, warmup_rounds=5)
    info = {"outcome -> next decision p50 ms": round(pct(spans, 0.5), 3),
            "p99 ms": round(pct(spans, 0.99), 3), "rounds": len(spans)}
    benchmark.group = "gateway, outcome visible to the next decision"
    _report(benchmark, benchmark.group, info)

