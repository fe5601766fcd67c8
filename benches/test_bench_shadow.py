"""Shadow mode's cost to the client: latency p50/p99 through a gateway in ``shadow`` mode
(sample = 1.0: every request also gets a background call and a judgment) beside the same
gateway config in ``route`` mode and a direct call to the default model.

Run with ``make bench-shadow`` or ``pytest benches/test_bench_shadow.py --benchmark-enable -s``.
The backends and the judge (`tagrouter_fast.demo.shadow_world`: deterministic, no sleep) run
in one child process, each gateway in its own; the client is this process, one keep-alive
connection per target, and the three targets are called in turn for each query, so a load
change on the machine hits all alike. Reported: p50/p99 per target, and the ratios shadow /
route and route / direct. The bar: shadow's overhead stays within the gateway's (the
shadow/route ratio near 1; the background work shares the gateway's cores, so on a 2-core
machine it is not free).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from skip_policy import import_extra

httpx = import_extra("serve", "httpx")
import_extra("serve", "starlette")
import_extra("serve", "uvicorn")

from tagrouter_fast.demo.servers import free_port, stop_process  # noqa: E402
from tagrouter_fast.demo.shadow_world import demo_queries, shadow_table  # noqa: E402

N_ROUNDS = 600
WARMUP = 30

_WORLD = """
import sys, time
from tagrouter_fast.demo.servers import ServerThread
from tagrouter_fast.demo.shadow_world import FakeJudge, QualityBackend
apps = [QualityBackend("small").app, QualityBackend("big").app, FakeJudge("big").app]
servers = [ServerThread(a, log_level="critical", lifespan="off").start() for a in apps]
print(" ".join(s.url for s in servers), flush=True)
while True:
    time.sleep(3600)
"""

_GATEWAY = """
import sys
from tagrouter_fast.serve.edge.startup import serve
from tagrouter_fast.serve.config import load_config
from tagrouter_fast.demo.router import demo_router
serve(load_config(sys.argv[1]), router=demo_router("keyword"), port=int(sys.argv[2]))
"""


def _toml(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _config(tmp: Path, mode: str, small: str, big: str, judge: str) -> Path:
    table = shadow_table(judge + "/v1", mode=mode, sample=1.0, explore=0.0,
                         max_concurrency=256)
    prices = table.pop("prices")
    lines = ["[server]", "access_log = false", "[auth]", "allow_anonymous = true",
             "[feedback]", f'state_dir = "{tmp / mode}"', "fsync = true"]
    for name, url in (("small", small), ("big", big)):
        lines += ["[[backends]]", f'name = "{name}"', f'base_url = "{url}/v1"',
                  f'model = "{name}-model"']
    lines += ["[shadow]"] + [f"{k} = {_toml(v)}" for k, v in table.items()]
    for model, p in prices.items():
        lines += [f"[shadow.prices.{model}]"] + [f"{k} = {v}" for k, v in p.items()]
    path = tmp / f"{mode}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready in {timeout_s} s")


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, str]]]:
    tmp = tmp_path_factory.mktemp("shadow-bench")
    world = subprocess.Popen([sys.executable, "-c", _WORLD], stdout=subprocess.PIPE)
    procs: list[subprocess.Popen[Any]] = [world]
    try:
        assert world.stdout is not None
        small, big, judge = world.stdout.readline().decode().split()
        out = {"direct": (big + "/v1", "big-model")}
        for mode in ("route", "shadow"):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-c", _GATEWAY, str(_config(tmp, mode, small, big, judge)),
                 str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            _ready(f"http://127.0.0.1:{port}", proc)
            out[mode] = (f"http://127.0.0.1:{port}/v1", "tagrouter")
        yield out
    finally:
        for p in procs:
            stop_process(p)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def test_shadow_latency_beside_route_and_direct(benchmark: Any,
                                                targets: dict[str, tuple[str, str]]) -> None:
    queries = demo_queries(N_ROUNDS + WARMUP, seed=9)
    clients = {name: httpx.Client(timeout=30) for name in targets}
    times: dict[str, list[float]] = {name: [] for name in targets}

    def one(name: str, q: str) -> float:
        url, model = targets[name]
        body = {"model": model, "messages": [{"role": "user", "content": q}]}
        t0 = time.perf_counter()
        r = clients[name].post(url + "/chat/completions", json=body)
        dt = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        return dt

    def run() -> None:
        for i, q in enumerate(queries):
            for name in targets:  # interleaved: direct, route, shadow
                dt = one(name, q)
                if i >= WARMUP:
                    times[name].append(dt)

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        for c in clients.values():
            c.close()
    info: dict[str, Any] = {"requests_per_target": N_ROUNDS}
    for name, xs in times.items():
        info[f"{name}_p50_ms"] = round(_pct(xs, 0.5) * 1e3, 3)
        info[f"{name}_p99_ms"] = round(_pct(xs, 0.99) * 1e3, 3)
    for q in ("p50", "p99"):
        info[f"shadow_over_route_{q}"] = round(info[f"shadow_{q}_ms"] / info[f"route_{q}_ms"], 3)
        info[f"route_over_direct_{q}"] = round(info[f"route_{q}_ms"] / info[f"direct_{q}_ms"], 3)
    benchmark.group = "shadow mode, 1 client, json, sample 1.0"
    benchmark.extra_info.update(info)
    print("\nshadow mode latency: " + json.dumps(info))
