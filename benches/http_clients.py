"""httpx against aiohttp as the gateway's upstream client, on the shipped fake backend.

The gateway keeps one HTTP client library for its backend calls (`tagrouter_fast.serve.forward`);
this script is how the choice was made, and how to check it again:

    python benches/http_clients.py                # JSON answers, 2,000 requests per client
    python benches/http_clients.py --stream       # streamed answers (SSE), read to the end

Both clients call the same fake backend (`tagrouter_fast.demo.fake_backend`, in its own process
so it does not share the GIL with them), one request at a time on one kept-alive connection
(each client's pool holds it between requests), on one event loop (uvloop when installed, as
under uvicorn). The rounds interleave: a round of ``--round`` requests per client, the first
client alternating, so a drift of the machine falls on both. Per request: wall time from the
send to the last body byte (p50 and p99) and the client process's CPU time per request (the
backend's is in its own process). Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx

from tagrouter_fast.demo.servers import BackendProcess

Call = Callable[[], Awaitable[int]]


def _body(stream: bool) -> bytes:
    return json.dumps({
        "model": "small", "stream": stream,
        "messages": [{"role": "user", "content": "Write a short poem about the sea"}],
    }).encode()


async def _httpx_client(url: str, body: bytes) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16,
                            keepalive_expiry=4.0),
        timeout=httpx.Timeout(10.0), trust_env=False,
    )
    headers = {"content-type": "application/json", "accept": "application/json"}

    async def call() -> int:
        async with client.stream("POST", url, content=body, headers=headers) as r:
            n = 0
            async for chunk in r.aiter_raw():
                n += len(chunk)
            if r.status_code != 200:
                raise RuntimeError(f"httpx: HTTP {r.status_code}")
            return n

    return call, client.aclose


async def _aiohttp_client(url: str, body: bytes) -> tuple[Call, Callable[[], Awaitable[None]]]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=16, keepalive_timeout=4.0),
        cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_read=10.0, sock_connect=10.0),
    )
    headers = {"content-type": "application/json", "accept": "application/json"}

    async def call() -> int:
        async with session.post(url, data=body, headers=headers) as r:
            n = 0
            while True:
                chunk = await r.content.readany()
                if not chunk:
                    break
                n += len(chunk)
            if r.status != 200:
                raise RuntimeError(f"aiohttp: HTTP {r.status}")
            return n

    return call, session.close


async def _run(url: str, n: int, per_round: int, stream: bool, warmup: int) -> dict[str, Any]:
    body = _body(stream)
    clients = {
        "httpx": await _httpx_client(url, body),
        "aiohttp": await _aiohttp_client(url, body),
    }
    times: dict[str, list[float]] = {name: [] for name in clients}
    cpu: dict[str, float] = dict.fromkeys(clients, 0.0)
    sizes: dict[str, int] = {}
    for name, (call, _) in clients.items():  # connections open, code paths warm
        for _ in range(warmup):
            sizes[name] = await call()
    order = list(clients)
    for r in range(0, n, per_round):
        for name in order if (r // per_round) % 2 == 0 else order[::-1]:
            call = clients[name][0]
            c0 = time.process_time()
            for _ in range(min(per_round, n - r)):
                t0 = time.perf_counter()
                await call()
                times[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0
    for _, close in clients.values():
        await close()
    out: dict[str, Any] = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=100, method="inclusive")
        out[name] = {"n": len(ts), "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3,
                     "mean_ms": statistics.fmean(ts) * 1e3,
                     "cpu_us_per_request": cpu[name] / len(ts) * 1e6, "body_bytes": sizes[name]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="requests per client (default 2000)")
    p.add_argument("--round", type=int, default=50, help="requests per client per round")
    p.add_argument("--warmup", type=int, default=50, help="untimed requests per client first")
    p.add_argument("--stream", action="store_true", help="streamed answers (SSE)")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    with BackendProcess("small") as backend:
        url = backend.url + "/v1/chat/completions"
        result = asyncio.run(_run(url, args.n, args.round, args.stream, args.warmup))
    print(f"{'streamed' if args.stream else 'JSON'} answers, {args.n} requests per client, "
          f"one at a time, interleaved rounds of {args.round}, {loop}, httpx "
          f"{httpx.__version__}, aiohttp {aiohttp.__version__}")
    print(f"{'client':8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'CPU us/req':>11}")
    for name, r in result.items():
        print(f"{name:8} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['mean_ms']:8.3f} "
              f"{r['cpu_us_per_request']:11.0f}")


if __name__ == "__main__":
    main()
