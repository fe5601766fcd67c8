"""Where the gateway's CPU goes per request: the gateway under cProfile, grouped by layer.

    python benches/gateway_profile.py              # 2,000 JSON requests, one at a time
    python benches/gateway_profile.py --stream     # streamed answers
    python benches/gateway_profile.py --top 25     # and the 25 costliest functions

The gateway (demo router, keyword tagger: no encoder) runs in its own process under cProfile,
in front of the shipped fake backend (another process); this process sends the requests one at
a time on one kept-alive aiohttp connection. Printed: the gateway's CPU per request from
``/proc`` without the profiler (a first pass) and, from the profiled pass, each layer's share
of the Python-visible time (the functions' own CPU time, ``time.thread_time``; builtins
attributed to the module that called them). Time the profiler cannot see (uvloop's C loop and
its system calls) is the difference between the profiled process's CPU and the profiled time.
cProfile slows small Python calls more than C calls, so the shares lean towards the
pure-Python layers; they rank, they do not time.
Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

from tagrouter_fast.demo.servers import BackendProcess, free_port, http_status

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_pairs import Target, cpu_seconds, one_request, run_loop  # noqa: E402

_GATEWAY = """
import cProfile, signal, sys, time
from tagrouter_fast.serve.edge.startup import serve
from tagrouter_fast.serve.config import load_config
from tagrouter_fast.demo.router import demo_router
cfg, port, out = load_config(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
prof = cProfile.Profile(time.thread_time)  # CPU, not wall: the machine is shared
def stop(*_):
    prof.disable()
    prof.dump_stats(out)
# The event loop runs on the main thread, where Python runs signal handlers: the profile covers
# the requests between the two signals, not the start-up.
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
signal.signal(signal.SIGUSR2, stop)
serve(cfg, router=demo_router("keyword"), port=port)
"""

#: (layer, path fragment) in the order they are tried; the first match wins.
LAYERS = (
    ("tagrouter edge (parse, check, render)", "/serve/edge/"),
    ("tagrouter policy (decide, budgets)", "/serve/policy/"),
    ("tagrouter forward (upstream call, relay)", "/serve/forward/"),
    ("tagrouter learn/other serve", "/serve/"),
    ("router + Rust decider glue", "/tagrouter_fast/"),
    ("uvicorn (HTTP server, httptools)", "/uvicorn/"),
    ("starlette (routing, request, response)", "/starlette/"),
    ("aiohttp (upstream HTTP client)", "/aiohttp/"),
    ("yarl/multidict (URLs, headers)", "/yarl/"),
    ("yarl/multidict (URLs, headers)", "/multidict/"),
    ("asyncio / anyio (tasks, streams)", "/asyncio/"),
    ("asyncio / anyio (tasks, streams)", "/anyio/"),
    ("json", "/json/"),
)


def _layer(filename: str) -> str:
    for name, frag in LAYERS:
        if frag in filename:
            return name
    return "other Python (stdlib, logging, ...)"


def _by_layer(path: str) -> tuple[dict[str, float], dict[str, float]]:
    """Own time per layer, and per function ("file:line name"); a builtin (C) call is put in
    the layer of its caller, in proportion to the calls."""
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    out: dict[str, float] = defaultdict(float)
    funcs: dict[str, float] = {}
    for (filename, line, name), (_, _, tottime, _, callers) in stats.items():
        funcs[f"{filename}:{line} {name}"] = tottime
        if filename != "~":
            out[_layer(filename)] += tottime
            continue
        total_calls = sum(c[0] for c in callers.values()) or 1
        for (cfile, _, _), c in callers.items():
            out[_layer(cfile)] += tottime * c[0] / total_calls
    return out, funcs


def _start(cfg: Path, out: str) -> tuple[subprocess.Popen[bytes], Target]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _GATEWAY, str(cfg), str(port), out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while http_status(f"http://127.0.0.1:{port}/readyz") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.1)
    return proc, Target("gateway", f"http://127.0.0.1:{port}/v1", "tagrouter", proc.pid)


def _drive(t: Target, n: int, stream: bool, profile_to: Path | None = None) -> float:
    """Sends ``n`` requests (after 100 untimed); the gateway's CPU seconds during the ``n``,
    profiled when ``profile_to`` is given (written there once the ``n`` are done)."""

    async def run() -> float:
        connector = aiohttp.TCPConnector(limit=4, keepalive_timeout=4.0)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as s:
            for i in range(100):
                await one_request(s, t, f"Write a short poem about the sea, take {i}", stream)
            assert t.pid is not None
            if profile_to is not None:
                os.kill(t.pid, signal.SIGUSR1)
                await asyncio.sleep(0.2)  # the handler runs between two of the loop's callbacks
            c0 = cpu_seconds(t.pid)
            for i in range(n):
                await one_request(s, t, f"Write a short poem about the sea, take {i}", stream)
            used = cpu_seconds(t.pid) - c0
            if profile_to is not None:
                os.kill(t.pid, signal.SIGUSR2)
                deadline = time.monotonic() + 30
                while not profile_to.exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError("the gateway wrote no profile")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # the file appears before it is fully written
            return used

    return run_loop(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="requests per pass (default 2000)")
    p.add_argument("--stream", action="store_true", help="streamed answers (SSE)")
    p.add_argument("--top", type=int, default=0, help="also list the N costliest functions")
    args = p.parse_args()
    with BackendProcess("small") as small, BackendProcess("big") as big, \
            tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "gateway.toml"
        cfg.write_text(
            "[server]\naccess_log = false\n[auth]\nallow_anonymous = true\n"
            f'[[backends]]\nname = "small"\nbase_url = "{small.url}/v1"\nmodel = "small-model"\n'
            f'[[backends]]\nname = "big"\nbase_url = "{big.url}/v1"\nmodel = "big-model"\n')
        proc, t = _start(cfg, "-")
        try:
            plain_cpu = _drive(t, args.n, args.stream)
        finally:
            proc.terminate()
            proc.wait(20)
        prof_path = Path(d) / "gateway.prof"
        proc, t = _start(cfg, str(prof_path))
        try:
            prof_cpu = _drive(t, args.n, args.stream, prof_path)
        finally:
            proc.terminate()
            proc.wait(20)
        layers, funcs = _by_layer(str(prof_path))
    total = sum(layers.values())
    kind = "streamed" if args.stream else "JSON"
    print(f"{kind} answers, {args.n} requests one at a time, pid {os.getpid()} client")
    print(f"gateway CPU per request without the profiler: {plain_cpu / args.n * 1e3:.3f} ms")
    print(f"under the profiler: {prof_cpu / args.n * 1e3:.3f} ms CPU per request, of which "
          f"{total / args.n * 1e3:.3f} ms in Python-visible calls (the rest: uvloop's C loop "
          "and its system calls, other threads)")
    for name, secs in sorted(layers.items(), key=lambda kv: -kv[1]):
        print(f"{secs / total:6.1%}  {name}")
    for name, secs in sorted(funcs.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{secs / total:6.1%}  {name[-110:]}")


if __name__ == "__main__":
    main()
