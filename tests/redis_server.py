"""A real ``redis-server`` for tests: started on a free loopback port in its own directory,
stopped (and restarted on the same data) by the test (conftest.py's ``redis_srv`` fixture).
Without redis-server the tests skip, saying why (the serve extra's shared mode needs it); under
CI (``TAGROUTER_REQUIRE_SERVERS=1``, set by .ci/run) they fail instead: a server CI must have
never turns into skips. This module does that itself, so benches that import it fail too."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tagrouter_fast.demo.servers import free_port, stop_process


def redis_server_binary() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        why = (
            "optional extra 'serve' (shared mode): redis-server is not on PATH "
            "(apt-get install -y redis-server; .ci/run installs it)"
        )
        if os.environ.get("TAGROUTER_REQUIRE_SERVERS"):
            pytest.fail(why + "; TAGROUTER_REQUIRE_SERVERS is set, so this is a failure")
        pytest.skip(why)
    return exe


class RedisServer:
    """One redis-server process. ``aof=True`` keeps the data across `stop`/`start` (an
    append-only file fsynced on every write, in ``data_dir``); else nothing is persisted."""

    def __init__(self, data_dir: Path, *, aof: bool = False) -> None:
        self.exe = redis_server_binary()
        self.data_dir = data_dir
        self.aof = aof
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.data_dir), "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited: {tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
