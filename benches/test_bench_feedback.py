"""Feedback through the gateway at production history sizes: acknowledged outcomes per
second with 64 concurrent writers (journal fsynced, group commit, loopback), their latency, and
how long until an outcome is visible to the next decision, on a young store and after 10^6
outcomes of history, measured in one run. Run with `make bench-feedback` (or `pytest
benches/test_bench_feedback.py --benchmark-enable -s`).

Goals (this 2-core machine): >= 2,000 acknowledged outcomes/s with p99 <= 20 ms at 64 concurrent
writers, the same after 10^6 outcomes of history; outcome visible to the next decision p50 <= 5 ms
at any history size. Two loads, one after the other on the same gateway: saturation (closed
loop, each of the 64 writers posts as soon as its previous outcome is acknowledged: the most the
gateway acknowledges per second, and the latency of a saturated server, which is 64 / that rate
on average) and the goal's load (open loop: 2,000 outcomes/s offered over the 64 writers, each
latency counted from when the outcome was due, for 30 s: long enough to include a background
snapshot). The client's garbage collector is off while it times. The history is learned by the
gateway's router before it serves (the state a long-running gateway reaches; each outcome costs
the same O(its tags) however it arrived).
The client is aiohttp (httpx's pool rescans connections per request at high concurrency); its
CPU time is reported beside the gateway's.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from skip_policy import import_extra

aiohttp = import_extra("serve", "aiohttp")
httpx = import_extra("serve", "httpx")

from gateway_pairs import cpu_seconds, pct  # noqa: E402
from test_bench_gateway import QUERIES, _wait_ready  # noqa: E402

from tagrouter_fast.demo.servers import BackendProcess, free_port  # noqa: E402

pytestmark = pytest.mark.needs_release

WRITERS = 64
N_OUTCOMES = 6_000
#: The goal's rate: acknowledged outcomes per second, offered open-loop, for PACED_S seconds:
#: long enough to include a background snapshot (every SNAPSHOT_EVERY outcomes), whose cost is
#: part of the tail a long-running gateway shows.
RATE = 2_000.0
PACED_S = 30
#: The gateway default; TAGROUTER_BENCH_SNAPSHOT_EVERY overrides it (e.g. 1000000: no snapshot
#: inside the run, to see what snapshots add to the tail).
SNAPSHOT_EVERY = int(os.environ.get("TAGROUTER_BENCH_SNAPSHOT_EVERY", "50000"))
HISTORIES = (0, 10**6)
OUT = Path(".benchmarks") / "feedback.json"

# The demo router (keyword tagger), taught `history` outcomes on its own tags before serving.
_GATEWAY = """
import random, sys
from tagrouter_fast.serve.edge.startup import serve
from tagrouter_fast.serve.config import load_config
from tagrouter_fast.demo.router import demo_router
router = demo_router("keyword")
history = int(sys.argv[3])
tags, models = list(router.scorer.tags), list(router.decider.models)
rng = random.Random(0)
labels = ("win", "tie", "loss")
batch = [(rng.sample(tags, min(3, len(tags))), rng.choice(models), rng.choice(labels))
         for _ in range(50_000)]
done = 0
while done < history:
    k = min(len(batch), history - done)
    router.learn(batch[:k])
    done += k
serve(load_config(sys.argv[1]), router=router, port=int(sys.argv[2]))
"""


def _gateway(backend: BackendProcess, tmp: Path, history: int) -> Iterator[tuple[str, int]]:
    big: BackendProcess = backend.big  # type: ignore[attr-defined]
    cfg = tmp / "gateway.toml"
    cfg.write_text(
        "[server]\naccess_log = false\n[limits]\nmax_concurrency = 4096\n"
        "[auth]\nallow_anonymous = true\nanonymous_feedback = true\n"
        f'[[backends]]\nname = "small"\nbase_url = "{backend.url}/v1"\nmodel = "small-model"\n'
        f'[[backends]]\nname = "big"\nbase_url = "{big.url}/v1"\nmodel = "big-model"\n'
        f'[feedback]\nstate_dir = "{tmp / "state"}"\nsnapshot_every = {SNAPSHOT_EVERY}\n'
        + os.environ.get("TAGROUTER_BENCH_FEEDBACK_EXTRA", "")
    )
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _GATEWAY, str(cfg), str(port), str(history)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", proc, timeout_s=300)
        yield f"http://127.0.0.1:{port}/v1", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def backend() -> Iterator[BackendProcess]:
    with BackendProcess("small") as small, BackendProcess("big") as big:
        small.big = big  # type: ignore[attr-defined]
        yield small


async def _decisions(base: str, n: int) -> list[str]:
    conn = aiohttp.TCPConnector(limit=WRITERS)
    async with aiohttp.ClientSession(connector=conn) as s:
        sem = asyncio.Semaphore(WRITERS)

        async def one(i: int) -> str:
            async with sem, s.post(f"{base}/route",
                                   json={"query": QUERIES[i % len(QUERIES)]}) as r:
                r.raise_for_status()
                return str((await r.json())["decision_id"])

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _post_paced(base: str, ids: list[str], rate: float) -> tuple[list[float], int]:
    """Open loop: outcome i is due at ``i / rate`` seconds, posted by one of WRITERS writers;
    its latency counts from when it was due (a writer that falls behind its schedule adds its
    delay: no coordinated omission)."""
    conn = aiohttp.TCPConnector(limit=WRITERS)
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=conn) as s:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05

        async def writer(w: int) -> None:
            nonlocal errors
            for i in range(w, len(ids), WRITERS):
                due = t0 + i / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                async with s.post(f"{base}/feedback",
                                  json={"decision_id": ids[i], "outcome": "win"}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(loop.time() - due)

        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    return lat, errors


async def _post_all(base: str, ids: list[str]) -> tuple[list[float], float, int]:
    conn = aiohttp.TCPConnector(limit=WRITERS)
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=conn) as s:
        queue = list(ids)

        async def writer() -> None:
            nonlocal errors
            while queue:
                did = queue.pop()
                t0 = time.perf_counter()
                async with s.post(f"{base}/feedback",
                                  json={"decision_id": did, "outcome": "win"}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(WRITERS)))
        wall = time.perf_counter() - t0
    return lat, wall, errors


def _visible(base: str, rounds: int = 200) -> list[float]:
    client = httpx.Client(timeout=30)
    spans = []
    for i in range(rounds):
        q = QUERIES[i % len(QUERIES)]
        r = client.post(f"{base}/route", json={"query": q})
        r.raise_for_status()
        did, before = r.json()["decision_id"], r.json()["explanation"]["scores"]
        t0 = time.perf_counter()
        client.post(f"{base}/feedback", json={"decision_id": did, "outcome": "loss"}
                    ).raise_for_status()
        after = client.post(f"{base}/route", json={"query": q}).json()["explanation"]["scores"]
        spans.append(time.perf_counter() - t0)
        assert after != before, "the outcome did not change the next decision's scores"
    client.close()
    return spans


def test_feedback_throughput_by_history(benchmark: Any, backend: BackendProcess,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    benchmark.group = "gateway feedback: 64 concurrent writers, fsynced, by history"
    rows = []
    for history in HISTORIES:
        for base, pid in _gateway(backend, tmp_path_factory.mktemp("fb"), history):
            n_paced = int(RATE * PACED_S)
            ids = asyncio.run(_decisions(base, N_OUTCOMES + n_paced))
            # The client's own collector pauses are not the gateway's latency.
            gc.collect()
            gc.disable()
            # Saturation (closed loop: each writer posts as soon as its last one is answered).
            cpu0, me0 = cpu_seconds(pid), time.process_time()
            lat, wall, errors = asyncio.run(_post_all(base, ids[:N_OUTCOMES]))
            cpu1, me1 = cpu_seconds(pid), time.process_time()
            # The goal's load (open loop at RATE outcomes/s over the same 64 writers).
            paced, paced_errors = asyncio.run(_post_paced(base, ids[N_OUTCOMES:], RATE))
            errors += paced_errors
            gc.enable()
            spans = _visible(base)
            rows.append({
                "history": history, "outcomes/s": round(N_OUTCOMES / wall),
                "ack p50 ms": round(pct(lat, 0.5), 2),
                "ack p99 ms": round(pct(lat, 0.99), 2), "errors": errors,
                f"at {RATE:,.0f}/s p50 ms": round(pct(paced, 0.5), 2),
                f"at {RATE:,.0f}/s p99 ms": round(pct(paced, 0.99), 2),
                f"at {RATE:,.0f}/s p99.9 ms": round(pct(paced, 0.999), 2),
                f"at {RATE:,.0f}/s max ms": round(max(paced) * 1e3, 2),
                "gateway CPU ms/outcome": round((cpu1 - cpu0) / N_OUTCOMES * 1e3, 3),
                "client CPU ms/outcome": round((me1 - me0) / N_OUTCOMES * 1e3, 3),
                "visible p50 ms": round(pct(spans, 0.5), 2),
                "visible p99 ms": round(pct(spans, 0.99), 2),
            })  # fmt: skip
    print()
    for r in rows:
        print("  ".join(f"{k} {v}" for k, v in r.items()))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=2))
    benchmark.extra_info["by_history"] = rows
    for r in rows:
        assert r["errors"] == 0, r
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
