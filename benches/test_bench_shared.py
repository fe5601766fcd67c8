"""Two gateway replicas sharing their counts through Redis: every valid cross-replica
feedback is accepted, and both replicas end on byte-identical stores.

Run with `make bench-shared` (or `pytest benches/test_bench_shared.py --benchmark-enable -s`).

Set-up, all on loopback, each in its own process: a redis-server (no persistence), two fake
backends, and two `tagrouter serve` gateways (replicas A and B) on the demo router, each with its
own state directory (journal fsynced), the same `[shared] redis_url` and the same decision
secret, open to anonymous callers with feedback. Then 10,000 decisions: each is routed on one
replica (alternating A and B) and its outcome posted to the *other* replica the moment the
decision is answered, 64 decisions in flight (the race it guards: feedback arriving before the
decision reached Redis was refused, about 25% in the first seconds under load).

Goals: 0 of 10,000 refused (any status but 200 counts as refused); once both replicas have
every outcome (`/readyz`: shared version 10,000, nothing pending), their store snapshots
(`POST /admin/snapshot`) are byte-identical. Reported beside them: outcomes/s over the run, the
feedback acknowledgement's p50/p99, seconds from the last acknowledgement until both replicas
converged, and the CPU of the client, each gateway and Redis (2 shared cores: a saturated
client is not a slow gateway). Timings are reported, never asserted. Also asserted: the stores
equal an oracle computed here, the bundle's store taught every accepted outcome at once in the
client's order (counts are the state: neither order nor batching may change a byte).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from skip_policy import import_extra

aiohttp = import_extra("serve", "aiohttp")
httpx = import_extra("serve", "httpx")
import_extra("serve", "redis")

from gateway_pairs import cpu_seconds, pct  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from test_bench_gateway import QUERIES, _wait_ready  # noqa: E402

from tagrouter_fast.demo.router import demo_router  # noqa: E402
from tagrouter_fast.demo.servers import BackendProcess, free_port  # noqa: E402

pytestmark = pytest.mark.needs_release

N_DECISIONS = 10_000
IN_FLIGHT = 64
CONVERGE_TIMEOUT_S = 120.0
OUT = Path(".benchmarks") / "shared.json"

SECRET_ENV = "TAGROUTER_BENCH_DECISION_SECRET"
ADMIN_ENV = "TAGROUTER_BENCH_ADMIN_TOKEN"
ADMIN_TOKEN = "bench-shared-admin-token"
OUTCOMES = ("win", "loss", "tie")

_GATEWAY = """
import sys
from tagrouter_fast.serve.edge.startup import serve
from tagrouter_fast.serve.config import load_config
from tagrouter_fast.demo.router import demo_router
serve(load_config(sys.argv[1]), router=demo_router("keyword"), port=int(sys.argv[2]))
"""


@dataclass
class Replica:
    name: str
    url: str  # http://host:port, no path
    pid: int
    state_dir: Path
    log: Path


@contextmanager
def _replica(name: str, tmp: Path, redis_url: str, small: str, big: str) -> Iterator[Replica]:
    state = tmp / f"state-{name}"
    cfg = tmp / f"replica-{name}.toml"
    cfg.write_text(
        "[server]\naccess_log = false\n[limits]\nmax_concurrency = 4096\n"
        "[auth]\nallow_anonymous = true\nanonymous_feedback = true\n"
        f'decision_secret_env = "{SECRET_ENV}"\n'
        f'[admin]\ntoken_env = "{ADMIN_ENV}"\n'
        f'[[backends]]\nname = "small"\nbase_url = "{small}/v1"\nmodel = "small-model"\n'
        f'[[backends]]\nname = "big"\nbase_url = "{big}/v1"\nmodel = "big-model"\n'
        f'[feedback]\nstate_dir = "{state}"\n'
        f'[shared]\nredis_url = "{redis_url}"\nkey_prefix = "bench"\n'
    )
    env = {**os.environ, SECRET_ENV: "bench-replicas-share-this-secret-0123456789abcdef",
           ADMIN_ENV: ADMIN_TOKEN}
    port = free_port()
    log = tmp / f"replica-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _GATEWAY, str(cfg), str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        yield Replica(name, f"http://127.0.0.1:{port}", proc.pid, state, log)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Replica, Replica, int]]:
    """Replicas A and B on one redis-server; the third item is redis-server's pid."""
    tmp = tmp_path_factory.mktemp("shared")
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp / "redis"))
        small = stack.enter_context(BackendProcess("small"))
        big = stack.enter_context(BackendProcess("big"))
        a = stack.enter_context(_replica("a", tmp, redis.url, small.url, big.url))
        b = stack.enter_context(_replica("b", tmp, redis.url, small.url, big.url))
        assert redis.proc is not None
        yield a, b, redis.proc.pid


@dataclass
class Run:
    acks: list[float]  # seconds per feedback request (posted to the other replica)
    wall_s: float
    refused: collections.Counter[str]  # "status code" -> how many
    accepted: list[tuple[list[str], str, str]]  # (tags, model, outcome) of each accepted one


async def _cross_feedback(a: Replica, b: Replica, n: int) -> Run:
    """``n`` decisions, routed on A and B in turn, each outcome posted to the other replica as
    soon as the decision is answered; ``IN_FLIGHT`` decisions at once."""
    acks: list[float] = []
    refused: collections.Counter[str] = collections.Counter()
    accepted: list[tuple[list[str], str, str]] = []
    conn = aiohttp.TCPConnector(limit=2 * IN_FLIGHT)
    async with aiohttp.ClientSession(connector=conn) as s:
        next_i = 0

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i, next_i = next_i, next_i + 1
                router, teller = (a, b) if i % 2 == 0 else (b, a)
                async with s.post(f"{router.url}/v1/route",
                                  json={"query": QUERIES[i % len(QUERIES)]}) as r:
                    r.raise_for_status()
                    d = await r.json()
                outcome = OUTCOMES[i % len(OUTCOMES)]
                t0 = time.perf_counter()
                async with s.post(f"{teller.url}/v1/feedback",
                                  json={"decision_id": d["decision_id"], "outcome": outcome}
                                  ) as r:
                    body = await r.read()
                    status = r.status
                acks.append(time.perf_counter() - t0)
                if status == 200:
                    accepted.append((d["tags"], d["model"], outcome))
                else:
                    try:
                        code = json.loads(body)["error"].get("code")
                    except (ValueError, KeyError, TypeError, AttributeError):
                        code = None
                    refused[f"{status} {code}"] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        wall = time.perf_counter() - t0
    return Run(acks, wall, refused, accepted)


def _shared_state(r: Replica) -> dict[str, Any]:
    got = httpx.get(f"{r.url}/readyz", timeout=10)
    got.raise_for_status()
    return dict(got.json()["shared"])


def _converge(replicas: tuple[Replica, ...], version: int) -> tuple[float, list[dict[str, Any]]]:
    """Seconds until every replica routes on ``version`` shared log entries with nothing
    pending, and their last `shared` stats."""
    t0 = time.perf_counter()
    deadline = t0 + CONVERGE_TIMEOUT_S
    while True:
        states = [_shared_state(r) for r in replicas]
        if all(s["version"] == version and s["pending"] == 0 for s in states):
            return time.perf_counter() - t0, states
        if time.perf_counter() > deadline:
            raise AssertionError(f"not converged in {CONVERGE_TIMEOUT_S:g} s: {states}")
        time.sleep(0.02)


def _store_bytes(r: Replica) -> bytes:
    """The replica's routed store as it writes it to disk: a snapshot taken now."""
    got = httpx.post(f"{r.url}/admin/snapshot", timeout=60,
                     headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    got.raise_for_status()
    data = Path(got.json()["snapshot"]).read_bytes()
    manifest = json.loads((r.state_dir / "MANIFEST.json").read_text())
    assert manifest["store_sha256"] == hashlib.sha256(data).hexdigest(), manifest
    return data


def test_two_replicas_cross_feedback(
    benchmark: Any, cluster: tuple[Replica, Replica, int]
) -> None:
    benchmark.group = "two replicas on Redis: outcome posted to the other replica"
    a, b, redis_pid = cluster
    pids = {"client": None, "a": a.pid, "b": b.pid, "redis": redis_pid}
    cpu0 = {k: cpu_seconds(p) if p else time.process_time() for k, p in pids.items()}
    run = asyncio.run(_cross_feedback(a, b, N_DECISIONS))
    converge_s, states = _converge((a, b), len(run.accepted))
    cpu1 = {k: cpu_seconds(p) if p else time.process_time() for k, p in pids.items()}
    stores = [_store_bytes(r) for r in (a, b)]
    identical = stores[0] == stores[1]
    # The oracle: the bundle's store taught every accepted outcome at once, in the client's
    # order (counts are the state, so the order and the batching must not matter).
    oracle = demo_router("keyword").scorer.with_learned(run.accepted).to_bytes()
    row = {
        "decisions": N_DECISIONS, "in flight": IN_FLIGHT,
        "refused": sum(run.refused.values()), "refused by status": dict(run.refused),
        "outcomes/s": round(N_DECISIONS / run.wall_s),
        "ack p50 ms": round(pct(run.acks, 0.5), 2), "ack p99 ms": round(pct(run.acks, 0.99), 2),
        "converged s": round(converge_s, 3),
        "shared version": [s["version"] for s in states],
        "store bytes": [len(s) for s in stores],
        "store sha256": [hashlib.sha256(s).hexdigest()[:16] for s in stores],
        "byte-identical": identical, "equal to the oracle": stores[0] == oracle,
        **{f"{k} CPU ms/decision": round((cpu1[k] - cpu0[k]) / N_DECISIONS * 1e3, 3)
           for k in pids},
    }  # fmt: skip
    print()
    print("  ".join(f"{k} {v}" for k, v in row.items()))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(row, indent=2))
    benchmark.extra_info.update(row)
    assert row["refused"] == 0, (row, a.log.read_text()[-3000:], b.log.read_text()[-3000:])
    assert identical, row
    assert stores[0] == oracle, row
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
