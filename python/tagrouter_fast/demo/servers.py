"""Servers and processes of the demo: an ASGI app under uvicorn in a thread (`ServerThread`), a
fake backend in a child process (`BackendProcess`), and the two process helpers they share.

Standard library only for the readiness checks (`http_status`): the demo needs no HTTP client
library of its own.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = [
    "BackendProcess",
    "ServerThread",
    "free_port",
    "http_json",
    "http_status",
    "stop_process",
]


def http_status(url: str, *, timeout_s: float = 1.0) -> int | None:
    """The status of ``GET url``, or None when nothing answers (refused, reset, timed out): what
    a readiness poll needs to know."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:  # URLError is one; so are a reset and a timeout
        return None


def http_json(url: str, body: Any = None, *, timeout_s: float = 5.0) -> Any:
    """``GET url`` (``POST`` of ``body`` as JSON when given) and its JSON answer.

    Raises:
        RuntimeError: an answer other than 200, naming the URL and the status.
        OSError: nothing answered.
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - loopback
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read()[:200]!r}") from None


# ==== Running a server on loopback ====


def free_port() -> int:
    """A loopback port free at the time of asking (for a child server that binds it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """Stops a child server: SIGTERM, and SIGKILL if it has not exited within ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerThread:
    """An ASGI app under uvicorn in a daemon thread, on a loopback port bound before it starts
    (so the port is known and free; pass ``port=0`` for any). A context manager:
    ``with ServerThread(FakeBackend().app) as srv: http_json(srv.url + "/v1/models")``.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        lifespan: str = "auto",
        limit_concurrency: int | None = None,
        keepalive_s: int = 5,
    ) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(
            app,
            log_level=log_level,
            lifespan=lifespan,  # type: ignore[arg-type]
            access_log=False,
            timeout_graceful_shutdown=2,
            limit_concurrency=limit_concurrency,
            # uvicorn's default (5 s) for the fakes, like the servers they stand for; a gateway
            # passes its own (`[server] keepalive_s`).
            timeout_keep_alive=keepalive_s,
            backlog=4096,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
            name=f"uvicorn-{self.port}",
        )

    def start(self, timeout_s: float = 20.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on {self.url} did not start in {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ==== As a process ====


class BackendProcess:
    """A :class:`FakeBackend` in a child process (``python -m
    tagrouter_fast.demo.fake_backend``), so that load runs and benchmarks do not share the
    GIL with it. Commanded over HTTP (``POST /_fake/command``). ``protocol="anthropic"``: it
    answers Anthropic Messages (``POST /v1/messages``) instead of chat completions."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0,
                 protocol: str = "openai") -> None:
        import sys

        if protocol not in ("openai", "anthropic"):
            # Checked here too: the child would exit on it, seen only as "did not start".
            raise ValueError(f"protocol must be 'openai' or 'anthropic', got {protocol!r}")
        self.name = name
        self.protocol = protocol
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tagrouter_fast.demo.fake_backend", "--name", name,
             "--protocol", protocol, "--host", host, "--port", str(port)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "listening on URL", once the socket is bound
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"fake backend {name} did not start: {line!r}")
        self.url = line.split()[-1]
        # The server starts right after binding; wait until it answers.
        deadline = time.monotonic() + 20
        while http_status(self.url + "/_fake/state") is None:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake backend {name} on {self.url} does not answer")
            time.sleep(0.02)

    def command(self, **changes: Any) -> None:
        http_json(self.url + "/_fake/command", changes)

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = http_json(self.url + "/_fake/state")
        return out

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
