"""Measuring a gateway against its backend on equal terms (used by test_bench_gateway.py).

An added latency is (through the gateway) - (straight to the backend), and it is only as honest
as the baseline. Here both legs share everything but the hop: one aiohttp client session (one
kept-alive connection per server), one event loop (uvloop when installed, as under the
gateway), the same backend process, the same query in the same round. The two legs alternate
which goes first, and nothing else runs in the round (no third server whose leftover CPU would
slow whoever follows it). Streams are timed to the first body byte (time to first token) and
to the last. Each target speaks one client protocol (`APIS`: chat completions, Responses or
Anthropic Messages), so a gateway's protocols can be measured against a baseline of the same
one, or against each other.

Server CPU is read from ``/proc`` (user + system of the process and its descendants) around the
timed rounds: CPU milliseconds per request, which the other work on a shared machine does not
blur the way wall time is blurred.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")

_HEADERS = {"content-type": "application/json", "accept": "application/json"}


def chat_body(model: str, query: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": query}]}).encode()


def responses_body(model: str, query: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "stream": stream, "input": query}).encode()


def messages_body(model: str, query: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "stream": stream, "max_tokens": 256,
                       "messages": [{"role": "user", "content": query}]}).encode()


@dataclass(frozen=True)
class Api:
    """One client protocol: where its requests go, what they hold, and how a complete stream
    ends (every protocol's stream has a last event of its own; a stream cut before it is an
    error, not a fast answer)."""

    path: str
    body: Callable[[str, str, bool], bytes]
    last_event: bytes
    headers: dict[str, str]


#: The client protocols a target may speak (`Target.api`).
APIS = {
    "chat": Api("/chat/completions", chat_body, b"data: [DONE]", _HEADERS),
    "responses": Api("/responses", responses_body, b"event: response.completed", _HEADERS),
    # The header every Anthropic SDK sends: both legs carry it, as a real client's would.
    "messages": Api("/messages", messages_body, b"event: message_stop",
                    {**_HEADERS, "anthropic-version": "2023-06-01"}),
}


def stream_complete(api: Api, data: bytes) -> bool:
    """Whether ``data`` is a whole SSE stream of ``api``: it ends at an event boundary and its
    last event is the protocol's closing one."""
    if not data.endswith(b"\n\n"):
        return False
    return data[:-2].rsplit(b"\n\n", 1)[-1].startswith(api.last_event)


@dataclass
class Target:
    name: str
    url: str  # base URL ending in /v1
    model: str
    pid: int | None = None  # the server's process, for its CPU time per request
    api: str = "chat"  # the protocol spoken to it: a key of APIS

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"{self.name}: api must be one of {sorted(APIS)}, got {self.api!r}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (Linux ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces: split after its closing parenthesis.
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (pp, _) in stats.items() if pp == parent and p not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(stats[p][1] for p in tree if p in stats)


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (seconds) in milliseconds, nearest rank."""
    if not xs:
        raise ValueError("no samples")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e3


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Runs ``coro`` on uvloop when installed (the gateway's loop under uvicorn), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    # Not asyncio.Runner (Python 3.11+): the package supports older Pythons.
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def one_request(
    session: aiohttp.ClientSession, t: Target, query: str, stream: bool
) -> tuple[float, float, bytes]:
    """(seconds to the last body byte, seconds to the first, the body) of one request in the
    target's protocol; raises on anything but a complete 200 answer."""
    api = APIS[t.api]
    body = api.body(t.model, query, stream)
    t0 = time.perf_counter()
    first = 0.0
    parts: list[bytes] = []
    async with session.post(t.url + api.path, data=body, headers=api.headers) as r:
        while True:
            chunk = await r.content.readany()
            if not chunk:
                break
            if not parts:
                first = time.perf_counter() - t0
            parts.append(chunk)
        status = r.status
    total = time.perf_counter() - t0
    data = b"".join(parts)
    if status != 200 or (stream and not stream_complete(api, data)):
        raise RuntimeError(f"{t.name}: HTTP {status}: {data[-200:]!r}")
    return total, first, data


def session(limit: int = 16) -> aiohttp.ClientSession:
    # Idle connections dropped before the fake backend's 5 s keep-alive closes them.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=4.0),
        cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
        timeout=aiohttp.ClientTimeout(total=60),
    )


def pairs(
    targets: list[Target],
    queries: list[str],
    stream: bool,
    n: int,
    *,
    warmup: int = 50,
    in_process: dict[str, Callable[[str], Any]] | None = None,
    check: Callable[[Target, bytes], None] | None = None,
) -> dict[str, Any]:
    """``n`` rounds, each one request per target on the same query in rotating order (and each
    ``in_process`` callable on it); ``targets[0]`` is the baseline. Per target: p50/p99 of the
    whole request (and of the first byte when streaming), the added p50/p99 over the baseline,
    the median of the per-round differences, and the server's CPU ms per request."""
    calls = in_process or {}
    pids = [t.pid for t in targets if t.pid]
    if len(pids) != len(set(pids)):
        # A process's CPU cannot be split between the targets it serves: one process each.
        raise ValueError("two targets share a server process: its CPU per request would be "
                         "the sum of both")

    async def run() -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
        whole: dict[str, list[float]] = {t.name: [] for t in targets}
        first: dict[str, list[float]] = {t.name: [] for t in targets}
        whole.update({name: [] for name in calls})
        cpu: dict[str, float] = {}
        async with session() as s:
            for k in range(warmup):  # connections open, code paths and caches warm
                for t in targets:
                    _, _, data = await one_request(s, t, queries[k % len(queries)], stream)
                    if check is not None:
                        check(t, data)
            cpu0 = {t.name: cpu_seconds(t.pid) for t in targets if t.pid}
            for k in range(n):
                q = queries[k % len(queries)]
                r = k % len(targets)
                for t in targets[r:] + targets[:r]:
                    total, ttfb, _ = await one_request(s, t, q, stream)
                    whole[t.name].append(total)
                    first[t.name].append(ttfb)
                for name, f in calls.items():
                    t0 = time.perf_counter()
                    f(q)
                    whole[name].append(time.perf_counter() - t0)
            for t in targets:
                if t.pid:
                    cpu[t.name] = cpu_seconds(t.pid) - cpu0[t.name]
        return whole, first, cpu

    whole, first, cpu = run_loop(run())
    base = targets[0].name
    out: dict[str, Any] = {"rounds": n}
    for name, xs in whole.items():
        out[f"{name} p50 ms"] = round(pct(xs, 0.5), 3)
        out[f"{name} p99 ms"] = round(pct(xs, 0.99), 3)
    if stream:
        for t in targets:
            out[f"{t.name} first byte p50 ms"] = round(pct(first[t.name], 0.5), 3)
            out[f"{t.name} first byte p99 ms"] = round(pct(first[t.name], 0.99), 3)
    for t in targets[1:]:
        for p in ("p50", "p99"):
            out[f"{t.name} added {p} ms"] = round(out[f"{t.name} {p} ms"] - out[f"{base} {p} ms"],
                                                  3)
            if stream:
                out[f"{t.name} added first byte {p} ms"] = round(
                    out[f"{t.name} first byte {p} ms"] - out[f"{base} first byte {p} ms"], 3)
        diffs = [a - b for a, b in zip(whole[t.name], whole[base], strict=True)]
        out[f"{t.name} added, median of paired differences ms"] = round(pct(diffs, 0.5), 3)
    for name, c in cpu.items():
        out[f"{name} CPU ms/request"] = round(c / n * 1e3, 3)
    return out


@dataclass
class StreamLoad:
    """What ``streams`` saw: per stream its first-event time and the gaps between events, each
    gap with the time its end arrived (seconds since the load started)."""

    ttft: list[float]
    gaps: list[float]
    gap_ends: list[float]
    errors: list[str]
    wall_s: float
    #: When the last stream got its first event: after it, every stream is open and relaying.
    all_open_s: float


def streams(t: Target, queries: list[str], n: int) -> StreamLoad:
    """``n`` streamed chat requests at once on one client session (a connection each). The
    arrival time of every read holding an event boundary is recorded; a gap is the time between
    two such reads of one stream."""
    if t.api != "chat":
        raise ValueError(f"{t.name}: concurrent streams are chat completions, not {t.api}")

    async def run() -> StreamLoad:
        ttft: list[float] = []
        gaps: list[float] = []
        gap_ends: list[float] = []
        firsts: list[float] = []
        errors: list[str] = []

        async def one(i: int, s: aiohttp.ClientSession) -> None:
            body = chat_body(t.model, queries[i % len(queries)], True)
            t0 = time.perf_counter()
            last: float | None = None  # t0 is this stream's start, start the load's
            tail = b""
            try:
                async with s.post(t.url + "/chat/completions", data=body,
                                  headers=_HEADERS) as r:
                    while True:
                        chunk = await r.content.readany()
                        if not chunk:
                            break
                        now = time.perf_counter()
                        # An event ends at a blank line, which may straddle two reads.
                        if b"\n\n" in tail[-1:] + chunk:
                            if last is None:
                                ttft.append(now - t0)
                                firsts.append(now - start)
                            else:
                                gaps.append(now - last)
                                gap_ends.append(now - start)
                            last = now
                        tail = (tail + chunk)[-64:]
                    if r.status != 200 or not tail.endswith(b"data: [DONE]\n\n"):
                        errors.append(f"HTTP {r.status}: {tail!r}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                errors.append(f"{type(e).__name__}: {e}")

        async with session(limit=0) as s:
            start = time.perf_counter()
            await asyncio.gather(*(one(i, s) for i in range(n)))
            wall = time.perf_counter() - start
        return StreamLoad(ttft, gaps, gap_ends, errors, wall, max(firsts, default=0.0))

    return run_loop(run())
