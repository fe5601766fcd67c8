"""Helpers for the gateway tests: fake backends and gateways under real uvicorn servers on
loopback, configured from dicts."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from tagrouter_fast.demo.fake_backend import FakeBackend
from tagrouter_fast.demo.router import demo_router
from tagrouter_fast.demo.servers import ServerThread, free_port
from tagrouter_fast.router import TagRouter
from tagrouter_fast.serve.config import Config
from tagrouter_fast.serve.edge.app import create_app
from tagrouter_fast.serve.policy.gateway import Gateway


def wait_for(predicate: Any, timeout_s: float = 5.0, interval_s: float = 0.01) -> bool:
    """Polls ``predicate()`` until it is true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


#: ``[auth]`` of a gateway open to anonymous callers with every /v1 scope.
OPEN_AUTH = {"allow_anonymous": True, "anonymous_feedback": True, "anonymous_override": True}

POEM = "Write a short poem about the sea"
MATH = "Solve the equation 3x + 4 = 6"


@dataclass
class Fake:
    backend: FakeBackend
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def state(self) -> Any:
        return self.backend.state


@dataclass
class RunningGateway:
    server: ServerThread
    gw: Gateway

    @property
    def url(self) -> str:
        return self.server.url


@contextmanager
def fake_backends(*names: str, anthropic: Collection[str] = ()) -> Iterator[dict[str, Fake]]:
    """Fake backends by name under uvicorn; those named in ``anthropic`` speak Messages."""
    fakes: dict[str, Fake] = {}
    try:
        for name in names:
            b = FakeBackend(name, protocol="anthropic" if name in anthropic else "openai")
            # The fake's own errors (a reset is an exception on purpose) stay out of the output.
            srv = ServerThread(b.app, log_level="critical", lifespan="off").start()
            fakes[name] = Fake(b, srv)
        yield fakes
    finally:
        for f in fakes.values():
            f.server.stop()


def dead_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


def gateway_config(
    urls: Mapping[str, str], *, backend_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **sections: Any,
) -> Config:
    backends = []
    for name, url in urls.items():
        b: dict[str, Any] = {
            "name": name, "base_url": url + "/v1", "model": f"{name}-model",
            "timeout_s": 1.0, "stream_idle_timeout_s": 1.0,
        }
        b.update((backend_overrides or {}).get(name, {}))
        backends.append(b)
    raw: dict[str, Any] = {"backends": backends, "router": {}, "server": {"access_log": True}}
    if "auth" not in sections:
        # Tests of other things run as the gateway did before client keys: anyone may route,
        # override and teach. tests/test_serve_keys.py passes its own [auth].
        raw["auth"] = OPEN_AUTH
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **copy.deepcopy(v)}
    return Config.from_dict(raw)


@contextmanager
def running_gateway(
    config: Config, router: TagRouter | None = None
) -> Iterator[RunningGateway]:
    app = create_app(config, router=router or demo_router("keyword"))
    # The gateway's keep-alive as `tagrouter serve` sets it: above the test clients' 5 s idle
    # expiry, so that no client reuses a connection the gateway is closing.
    with ServerThread(app, log_level="warning", keepalive_s=config.server.keepalive_s) as srv:
        yield RunningGateway(srv, app.state.gateway)


@dataclass
class CliGateway:
    url: str
    proc: subprocess.Popen[str]
    output: str = ""  # stdout + stderr, once it has stopped


@contextmanager
def cli_gateway(*args: str, ready_timeout_s: float = 30) -> Iterator[CliGateway]:
    """``tagrouter serve ARGS`` in a child process on a free port, ready; stopped on exit with
    SIGINT (uvicorn's graceful stop), which must end it with exit code 0."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagrouter_fast.cli", "serve", *args, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    g = CliGateway(f"http://127.0.0.1:{port}", proc)
    try:
        def ready() -> bool:
            try:
                return httpx.get(g.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        assert wait_for(ready, timeout_s=ready_timeout_s) and proc.poll() is None
        yield g
    finally:
        proc.send_signal(signal.SIGINT)
        g.output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, g.output
