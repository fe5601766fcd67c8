"""The gateway's CPU per streamed event, and its loop's lag, under N paced streams.

    python benches/stream_cpu.py                  # 512 streams of 10 events, then of 1 event
    python benches/stream_cpu.py --n 256 --rounds 2

The gateway (demo router, keyword tagger, the config of ``test_bench_gateway``) runs in its own
process in front of two fake backends pacing events 100 ms apart; this process opens the
streams at once (``gateway_pairs.streams``). Per pass: the gateway's, the backend's and this
process's CPU (``/proc``), stalls (gaps over 200 ms), and inside the gateway the lag of a 5 ms
timer on its event loop (a long loop iteration, or the process not scheduled) and its garbage
collections. CPU per event = (CPU with 10 events - CPU with 1) / (9 x N). Not part of the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tagrouter_fast.demo.servers import BackendProcess, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_pairs import Target, cpu_seconds, pct, streams  # noqa: E402

WRITING = [f"Write a short poem about the {w} at dawn, take {i}" for i, w in
           enumerate(["sea", "moon", "rain", "forest", "city", "snow"] * 20)]

#: The gateway with a loop-lag probe and GC timing: SIGUSR1 starts a pass, SIGUSR2 prints it.
_GATEWAY = """
import asyncio, gc, signal, sys, time
import uvicorn
from tagrouter_fast.serve.edge.startup import serve
from tagrouter_fast.serve.config import load_config
from tagrouter_fast.demo.router import demo_router
lags, gcs, t = [], [], {}
def timed(phase, info):
    if phase == "start":
        t["gc"] = time.perf_counter()
    else:
        gcs.append(time.perf_counter() - t["gc"])
gc.callbacks.append(timed)
async def probe():
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - t0 - 0.005)
def report(*_):
    print("GATEWAY " + repr({"loop lag max ms": round(max(lags, default=0) * 1e3, 1),
          "lags over 50 ms": sum(x > 0.05 for x in lags), "gc runs": len(gcs),
          "gc max ms": round(max(gcs, default=0) * 1e3, 1)}), flush=True)
signal.signal(signal.SIGUSR1, lambda *_: (lags.clear(), gcs.clear()))
signal.signal(signal.SIGUSR2, report)
plain = uvicorn.Server.serve
async def with_probe(self, sockets=None):
    asyncio.get_running_loop().create_task(probe())
    await plain(self, sockets)
uvicorn.Server.serve = with_probe
serve(load_config(sys.argv[1]), router=demo_router("keyword"), port=int(sys.argv[2]))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512, help="streams at once (default 512)")
    p.add_argument("--rounds", type=int, default=1, help="passes of each length (default 1)")
    a = p.parse_args()
    with (BackendProcess("small") as small, BackendProcess("big") as big,
          tempfile.TemporaryDirectory() as d):
        cfg = Path(d) / "gateway.toml"
        cfg.write_text(
            "[server]\naccess_log = false\n[limits]\nmax_concurrency = 4096\n"
            "max_connections = 1024\n[auth]\nallow_anonymous = true\n"
            f'[[backends]]\nname = "small"\nbase_url = "{small.url}/v1"\nmodel = "small-model"\n'
            f'[[backends]]\nname = "big"\nbase_url = "{big.url}/v1"\nmodel = "big-model"\n')
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", _GATEWAY, str(cfg), str(port)],
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).is_success:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            gw = Target("gateway", f"http://127.0.0.1:{port}/v1", "tagrouter", proc.pid)
            for _ in range(a.rounds):
                for events in (10, 1):
                    for b in (small, big):
                        b.command(chunks=events, chunk_delay_s=0.1)
                    streams(gw, WRITING, 16)  # connections and code paths warm
                    os.kill(proc.pid, signal.SIGUSR1)
                    c_gw, c_be = cpu_seconds(proc.pid), cpu_seconds(small.proc.pid)
                    c_me = time.process_time()
                    load = streams(gw, WRITING, a.n)
                    os.kill(proc.pid, signal.SIGUSR2)
                    stalls = [e for g, e in zip(load.gaps, load.gap_ends, strict=True)
                              if g > 0.2]
                    print(json.dumps({
                        "events": events, "errors": len(load.errors),
                        "first event p50 ms": round(pct(load.ttft, 0.5), 1),
                        "gap max ms": round(max(load.gaps, default=0) * 1e3, 1),
                        "stalls": len(stalls),
                        "stalls once open": sum(e > load.all_open_s for e in stalls),
                        "wall s": round(load.wall_s, 2),
                        "gateway CPU s": round(cpu_seconds(proc.pid) - c_gw, 3),
                        "backend CPU s": round(cpu_seconds(small.proc.pid) - c_be, 3),
                        "client CPU s": round(time.process_time() - c_me, 3),
                        "load average": os.getloadavg()[0],
                    }), flush=True)
                    time.sleep(0.5)  # the gateway prints its line (just before or after)
        finally:
            for b in (small, big):
                b.command()
            proc.terminate()
            proc.wait(20)


if __name__ == "__main__":
    main()
