"""The gateway's edge under hostile or broken input:
every error in the documented JSON shape and without a client-caused traceback, bounded
answers, header timeouts and a bounded connection count, one-line start-up failures, and a
readiness that says when feedback cannot be recorded.

Real servers on loopback: fake backends and gateways under uvicorn in threads, and ``serve()``
itself in a child process where the listening side (protocol, limits, signals) is what is
tested."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_helpers import (  # noqa: E402
    MATH,
    OPEN_AUTH,
    POEM,
    Fake,
    fake_backends,
    gateway_config,
    running_gateway,
)

from tagrouter_fast.demo.router import demo_router  # noqa: E402
from tagrouter_fast.demo.servers import free_port, stop_process  # noqa: E402
from tagrouter_fast.serve.config import Config, ConfigError  # noqa: E402
from tagrouter_fast.serve.learn import state as state_mod  # noqa: E402

ADMIN_TOKEN = "edge-admin-token-for-tests"
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


# ==== Fixtures and helpers ====


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Fake]]:
    with fake_backends("small", "big") as f:
        yield f


@pytest.fixture(autouse=True)
def _admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_ADMIN_TOKEN", ADMIN_TOKEN)


def edge_config(fakes: dict[str, Fake], tmp_path: Path, **sections: Any) -> Config:
    urls = {"small": fakes["small"].url, "big": fakes["big"].url}
    base: dict[str, Any] = {
        "admin": {"token_env": "EDGE_ADMIN_TOKEN"},
        "feedback": {"state_dir": str(tmp_path / "state")},
        "fallback": {"order": ["small", "big"], "max_attempts": 2},
    }
    return gateway_config(urls, **{**base, **sections})


@pytest.fixture
def tracebacks() -> Iterator[list[logging.LogRecord]]:
    """Log records that carry a traceback, from any logger: caught where a logger handles a
    record, since every uvicorn server started replaces the handlers of uvicorn's loggers.
    (Its own MonkeyPatch: a test's ``monkeypatch.undo()`` must not end the watch.)"""
    seen: list[logging.LogRecord] = []
    handle = logging.Logger.handle

    def catching(self: logging.Logger, record: logging.LogRecord) -> Any:
        if record.exc_info or "Traceback" in record.getMessage():
            seen.append(record)
        return handle(self, record)

    mp = pytest.MonkeyPatch()
    mp.setattr(logging.Logger, "handle", catching)
    yield seen
    mp.undo()


def api_error(r: httpx.Response, status: int) -> dict[str, Any]:
    """The documented error shape: JSON ``{"error": {"message", "type", "param", "code"}}``."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return dict(err)


def chat_body(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "tagrouter", "messages": [{"role": "user", "content": text}], **kw}


# ==== JSON nested too deeply ====

#: ~2 KB bodies nested ~1,000 levels: deeper than Python's parser (and its encoder) recurse.
DEEP_BODIES = {
    "arrays": b"[" * 1000 + b"]" * 1000,
    "objects": b'{"a":' * 1000 + b"1" + b"}" * 1000,
}
JSON_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/route", "/v1/feedback",
                  "/admin/models", "/admin/theta", "/admin/snapshot", "/admin/reload"]


def test_deeply_nested_json_is_a_400_on_every_json_endpoint_without_a_traceback(
    fakes: dict[str, Fake], tmp_path: Path, tracebacks: list[logging.LogRecord]
) -> None:
    with running_gateway(edge_config(fakes, tmp_path)) as g:
        for path in JSON_ENDPOINTS:
            for kind, body in DEEP_BODIES.items():
                r = httpx.post(g.url + path, content=body, headers=AUTH, timeout=10)
                err = api_error(r, 400)
                assert err["param"] == "body" and "nested" in err["message"], (path, kind, err)
        # Nested just below what the parser refuses, inside a valid request: the field is
        # passed upstream, where the encoder would recurse deeper than the parser did.
        for depth in range(940, 1000):
            body = chat_body(POEM)
            raw = json.dumps(body)[:-1].encode() + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
            r = httpx.post(g.url + "/v1/chat/completions", content=raw, timeout=10)
            assert r.status_code in (200, 400), (depth, r.status_code, r.text)
            if r.status_code == 400:
                assert api_error(r, 400)["param"] == "body"
        assert httpx.get(g.url + "/healthz").status_code == 200
    assert tracebacks == []


# ==== Every error in the documented JSON shape ====


def test_unknown_path_and_wrong_method_answer_json(
    fakes: dict[str, Fake], tmp_path: Path, tracebacks: list[logging.LogRecord]
) -> None:
    with running_gateway(edge_config(fakes, tmp_path)) as g:
        err = api_error(httpx.get(g.url + "/v1/chat/complete"), 404)
        assert "/v1/chat/complete" in err["message"] and err["code"] == "not_found"
        r = httpx.get(g.url + "/v1/chat/completions")
        err = api_error(r, 405)
        assert r.headers["allow"] == "POST" and "POST" in err["message"]
        assert err["code"] == "method_not_allowed"
        api_error(httpx.put(g.url + "/readyz"), 405)
    assert tracebacks == []


def test_admin_file_errors_answer_json_without_a_traceback(
    fakes: dict[str, Fake], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    tracebacks: list[logging.LogRecord],
) -> None:
    import tagrouter_fast.data.table as table_mod
    from tagrouter_fast.demo.router import KeywordTagger
    from tagrouter_fast.router import TagRouter

    bundle = tmp_path / "bundle"
    demo_router().save(bundle)
    cfg = edge_config(fakes, tmp_path, router={"bundle": str(bundle)})
    with running_gateway(cfg, TagRouter.load(bundle, tagger=KeywordTagger())) as g:
        # A judgments directory the gateway cannot read (the test may run as root, for whom
        # file modes do not stop a read: the read fails as it would for anyone else).
        judgments = tmp_path / "judgments"
        judgments.mkdir()

        def unreadable(directory: Any, *a: Any, **kw: Any) -> Any:
            raise PermissionError(13, "Permission denied", str(Path(directory) / "queries.csv"))

        monkeypatch.setattr(table_mod, "load_table", unreadable)
        r = httpx.post(g.url + "/admin/models", headers=AUTH, timeout=10, json={
            "backend": {"name": "mid", "base_url": fakes["small"].url + "/v1"},
            "judgments": str(judgments), "cost": 1.0})
        err = api_error(r, 400)
        assert err["param"] == "judgments" and "queries.csv" in err["message"], err
        assert "Permission denied" in err["message"] and "mid" not in g.gw.backends
        monkeypatch.undo()

        # A bundle whose store file cannot be read: the reload is refused, the old router
        # keeps routing.
        meta = json.loads((bundle / "router.json").read_text())
        store = bundle / meta["store"]
        store.unlink()
        store.mkdir()
        before = g.gw.router
        err = api_error(httpx.post(g.url + "/admin/reload", headers=AUTH, timeout=10), 409)
        assert store.name in err["message"] and err["code"] == "reload_refused", err
        assert g.gw.router is before
        assert httpx.post(g.url + "/v1/route", json={"query": POEM}).status_code == 200

        # A snapshot that cannot be written (the disk fails under it).
        def broken(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(state_mod, "_fsync", broken)
        err = api_error(httpx.post(g.url + "/admin/snapshot", headers=AUTH, timeout=10), 500)
        assert "Input/output error" in err["message"] and err["type"] == "server_error"
        monkeypatch.undo()
    assert tracebacks == []


def test_an_unexpected_exception_is_a_json_500_without_internals(
    fakes: dict[str, Fake], tmp_path: Path, tracebacks: list[logging.LogRecord]
) -> None:
    with running_gateway(edge_config(fakes, tmp_path)) as g:
        def bug(*a: Any, **kw: Any) -> Any:
            raise RuntimeError("internal detail /srv/secret.py line 12")

        g.gw.route_request = bug  # type: ignore[method-assign]
        r = httpx.post(g.url + "/v1/chat/completions", json=chat_body(POEM), timeout=10)
        err = api_error(r, 500)
        assert err["type"] == "server_error" and "secret" not in r.text, r.text
        # The server keeps serving; the bug is logged once, with its traceback, for its fixer.
        assert httpx.post(g.url + "/v1/route", json={"query": MATH}).status_code == 200
    assert len(tracebacks) == 1 and "secret" in str(tracebacks[0].exc_info or tracebacks[0].msg)


# ==== Backend names ====

BAD_NAMES = ["evil\r\nx-injected: 1", "tab\tname", "nul\x00", "del\x7f", "c1\x85", " padded "]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_backend_name_with_control_characters_is_refused_in_the_config(name: str) -> None:
    raw = {"router": {}, "backends": [{"name": name, "base_url": "http://127.0.0.1:1/v1"}]}
    with pytest.raises(ConfigError, match=r"backends\[0\]\.name") as e:
        Config.from_dict(raw)
    assert e.value.key == "backends[0].name"


def test_a_backend_name_with_control_characters_is_refused_by_admin(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    with running_gateway(edge_config(fakes, tmp_path)) as g:
        for name in BAD_NAMES:
            r = httpx.post(g.url + "/admin/models", headers=AUTH, timeout=10, json={
                "backend": {"name": name, "base_url": fakes["small"].url + "/v1"},
                "like": "small", "cost": 1.0})
            err = api_error(r, 400)
            assert err["param"] == "backend.name", err
            assert name not in g.gw.backends and name not in g.gw.router.scorer.models
        # A name with letters beyond ASCII that a header can carry (latin-1) is fine.
        r = httpx.post(g.url + "/admin/models", headers=AUTH, timeout=10, json={
            "backend": {"name": "modèle-2", "base_url": fakes["small"].url + "/v1"},
            "like": "small", "cost": 1.0})
        assert r.status_code == 200, r.text


# ==== Size of a backend's answer ====


def test_an_answer_over_the_cap_is_a_502_naming_it_and_is_never_read_whole(
    fakes: dict[str, Fake], tmp_path: Path, tracebacks: list[logging.LogRecord]
) -> None:
    cap = 1 << 20
    cfg = edge_config(fakes, tmp_path, limits={"max_answer_bytes": cap},
                      fallback={"order": ["small"], "max_attempts": 1})
    with running_gateway(cfg) as g:
        small = fakes["small"]
        small.backend.command(mode="huge", size_bytes=cap - 4096)
        r = httpx.post(g.url + "/v1/chat/completions", json=chat_body(POEM), timeout=10)
        assert r.status_code == 200 and len(r.content) > cap - 8192  # under the cap: whole
        # 64 MiB, streamed by the fake: the gateway stops reading past the cap and hangs up.
        # The servers run in this process: the most memory held at once during the call
        # (traced) shows whether the answer was ever buffered whole.
        small.backend.command(mode="huge", size_bytes=64 << 20)
        tracemalloc.start()
        try:
            r = httpx.post(g.url + "/v1/chat/completions", json=chat_body(POEM), timeout=10)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        err = api_error(r, 502)
        assert str(cap) in err["message"] and "small" in err["message"], err
        assert "limits.max_answer_bytes" in err["message"] and err["code"] == "upstream_too_large"
        assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB held at once"
        m = httpx.get(g.url + "/metrics").text
        assert 'tagrouter_backend_errors_total{backend="small",kind="too_large"}' in m
    assert tracebacks == []


def test_an_answer_over_the_cap_falls_back_to_the_next_backend(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    cfg = edge_config(fakes, tmp_path, limits={"max_answer_bytes": 1 << 20})
    with running_gateway(cfg) as g:
        fakes["small"].backend.command(mode="huge", size_bytes=8 << 20)
        r = httpx.post(g.url + "/v1/chat/completions", json=chat_body(POEM), timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["x-tagrouter-reason"] == "failover"
        assert r.headers["x-tagrouter-attempts"] == "small,big"


def test_the_answer_cap_is_a_checked_config_key() -> None:
    raw: dict[str, Any] = {"router": {}, "backends": [{"name": "a", "base_url": "http://h/v1"}]}
    assert Config.from_dict(raw).limits.max_answer_bytes == 32 << 20
    with pytest.raises(ConfigError, match=r"limits\.max_answer_bytes"):
        Config.from_dict({**raw, "limits": {"max_answer_bytes": 0}})


# ==== Readiness when feedback cannot be recorded ====


def test_readyz_reports_degraded_while_the_outcome_journal_cannot_be_written(
    fakes: dict[str, Fake], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_gateway(edge_config(fakes, tmp_path)) as g:
        r = httpx.get(g.url + "/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        d1 = httpx.post(g.url + "/v1/route", json={"query": POEM}).json()["decision_id"]

        def broken(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(state_mod, "_fsync", broken)
        r = httpx.post(g.url + "/v1/feedback", json={"decision_id": d1, "outcome": "win"})
        assert r.status_code == 503
        monkeypatch.undo()  # the disk is back; the store still refuses until restarted
        r = httpx.get(g.url + "/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "degraded"
        assert "Input/output error" in body["reason"] and "feedback" in body["reason"]
        assert "Input/output error" in (g.gw.learner.failure or "")
        # Routing still works and liveness holds: only the learner is down.
        assert httpx.get(g.url + "/healthz").status_code == 200
        assert httpx.post(g.url + "/v1/chat/completions", json=chat_body(POEM)).status_code \
            == 200


# ==== `tagrouter serve` as a process: listening limits, start-up failures ====

_SERVE = """
import json, sys
from tagrouter_fast.serve.edge.startup import serve
from tagrouter_fast.serve.config import Config
from tagrouter_fast.demo.router import demo_router
serve(Config.from_dict(json.loads(sys.argv[1])), router=demo_router("keyword"),
      port=int(sys.argv[2]))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "python")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return env


class ServeProcess:
    """``serve()`` in a child process (its own file descriptor limit, its own signals)."""

    def __init__(self, raw: dict[str, Any], *, nofile: int | None = None) -> None:
        def limit() -> None:
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, json.dumps(raw), str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
            preexec_fn=limit,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"gateway did not start:\n{self.output}")
            time.sleep(0.05)

    output = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.output, _ = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
                self.output, _ = self.proc.communicate()
        elif self.proc.stdout is not None:
            self.output = self.proc.stdout.read()


def _serve_raw(fakes: dict[str, Fake], tmp_path: Path, **server: Any) -> dict[str, Any]:
    return {
        "router": {},
        "backends": [{"name": n, "base_url": fakes[n].url + "/v1", "model": f"{n}-model"}
                     for n in ("small", "big")],
        "server": {"access_log": False, **server},
        "feedback": {"state_dir": str(tmp_path / "state")},
        "auth": OPEN_AUTH,
    }


#: The start of a request whose headers never end.
_PARTIAL = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: "


def _slow_clients(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(_PARTIAL)
        s.setblocking(False)
        out.append(s)
    return out


def _closed_by_server(s: socket.socket, got: dict[int, bytes]) -> bool:
    """Whether the server closed ``s`` (EOF or reset); what it sent before is kept in ``got``."""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
            got[s.fileno()] = got.get(s.fileno(), b"") + data
    except BlockingIOError:
        return False
    except OSError:
        return True


def _drip(socks: list[socket.socket]) -> None:
    """One more header byte on each socket still open: a slow client, never a silent one."""
    for s in socks:
        try:
            s.send(b"a")
        except OSError:
            pass


def test_slow_header_clients_are_timed_out_while_normal_requests_go_through(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    raw = _serve_raw(fakes, tmp_path, header_timeout_s=1.0)
    gw = ServeProcess(raw)
    socks: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        socks = _slow_clients(gw.port, 20)
        got: dict[int, bytes] = {}
        closed: dict[int, float] = {}
        served = None
        while len(closed) < len(socks) and time.monotonic() - t0 < 8:
            _drip([s for s in socks if s.fileno() not in closed])
            if served is None and time.monotonic() - t0 > 0.3:
                # The slow clients hold their connections: a normal request is served at once.
                t1 = time.monotonic()
                r = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(POEM), timeout=5)
                served = (r.status_code, time.monotonic() - t1)
            for s in socks:
                if s.fileno() not in closed and _closed_by_server(s, got):
                    closed[s.fileno()] = time.monotonic() - t0
            time.sleep(0.1)
        assert served is not None and served[0] == 200 and served[1] < 1.0, served
        assert len(closed) == len(socks), f"{len(socks) - len(closed)} slow clients still open"
        # Dripping bytes does not reset the clock: each went at the timeout (+ scheduling).
        assert all(0.9 <= t < 3.0 for t in closed.values()), sorted(closed.values())
        answers = list(got.values())
        assert len(answers) == len(socks)
        for a in answers:
            head, _, body = a.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), a[:200]
            assert json.loads(body)["error"]["code"] == "header_timeout"
    finally:
        for s in socks:
            s.close()
        gw.stop()
    assert gw.proc.returncode == 0, gw.output


def test_connection_count_is_bounded_so_slow_clients_cannot_take_every_descriptor(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    # The failure it guards: 256 descriptors, a few hundred clients sending headers slowly,
    # and no request got through. Now connections beyond the bound push out the longest
    # waiting one, and the gateway keeps descriptors for its backends and its journal.
    raw = _serve_raw(fakes, tmp_path, header_timeout_s=60.0, max_client_connections=64)
    gw = ServeProcess(raw, nofile=256)
    socks: list[socket.socket] = []
    try:
        socks = _slow_clients(gw.port, 300)
        got: dict[int, bytes] = {}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            open_ = [s for s in socks if not _closed_by_server(s, got)]
            if len(open_) <= 64:
                break
            time.sleep(0.05)
        assert len(open_) <= 64, f"{len(open_)} connections held open, over the bound of 64"
        for _ in range(3):
            t1 = time.monotonic()
            r = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(POEM), timeout=5)
            assert r.status_code == 200 and time.monotonic() - t1 < 2.0
            did = r.headers["x-tagrouter-decision-id"]
            f = httpx.post(gw.url + "/v1/feedback", json={"decision_id": did, "outcome": "win"},
                           timeout=5)
            assert f.status_code == 200, f.text  # the journal still gets its descriptors
    finally:
        for s in socks:
            s.close()
        gw.stop()
    assert gw.proc.returncode == 0, gw.output


def _answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (5 s at most)."""
    s.settimeout(5)
    got = b""
    while True:
        try:
            data = s.recv(65536)
        except OSError:
            return got
        if not data:
            return got
        got += data


def _error_code(answer: bytes, status: int) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    assert b"content-type: application/json" in head.lower()
    return str(json.loads(body)["error"]["code"])


def test_oversized_headers_and_non_http_get_json_errors_and_are_closed(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    gw = ServeProcess(_serve_raw(fakes, tmp_path, max_header_bytes=16384))
    try:
        # uvicorn's parser buffers a header of any length: 200 MiB took a server to 440 MB.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(_PARTIAL + b"a" * (64 << 10))
            assert _error_code(_answer(s), 431) == "headers_too_large"
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert _error_code(_answer(s), 400) == "invalid_http"
        # Headers under the bound with a body far over it in the same reads: served.
        big = chat_body(POEM + " " + "x" * (512 << 10))
        r = httpx.post(gw.url + "/v1/chat/completions", json=big, timeout=10,
                       headers={"x-note": "n" * 8000})
        assert r.status_code == 200, r.text[:300]
    finally:
        gw.stop()
    assert gw.proc.returncode == 0, gw.output


def test_listening_limits_are_checked_config_keys() -> None:
    raw: dict[str, Any] = {"router": {}, "backends": [{"name": "a", "base_url": "http://h/v1"}]}
    cfg = Config.from_dict(raw)
    assert cfg.server.header_timeout_s == 10.0 and cfg.server.max_client_connections == 1024
    assert cfg.server.max_header_bytes == 65536
    for key, value in (("header_timeout_s", 0), ("max_client_connections", 0),
                       ("max_header_bytes", 100)):
        with pytest.raises(ConfigError, match=rf"server\.{key}"):
            Config.from_dict({**raw, "server": {key: value}})


def _cli_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tagrouter_fast.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120, env=_env())


def _one_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tagrouter serve: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_start_up_failure_bad_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[server]\nprot = 1\n[[backends]]\nname = "a"\nbase_url = "http://h/v1"\n')
    _one_line(_cli_serve("--config", str(cfg)), "server.prot", "unknown key")


def test_start_up_failure_state_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    _one_line(_cli_serve("--demo", "--demo-tagger", "keyword", "--state-dir", str(state),
                         "--port", str(free_port())), "feedback.state_dir", str(state))


def test_start_up_failure_damaged_state_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / state_mod.MANIFEST).write_text("{garbage")
    _one_line(_cli_serve("--demo", "--demo-tagger", "keyword", "--state-dir", str(state),
                         "--port", str(free_port())), state_mod.MANIFEST)


def test_start_up_failure_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _cli_serve("--demo", "--demo-tagger", "keyword", "--state-dir",
                       str(tmp_path / "state"), "--port", str(port))
    _one_line(r, f"127.0.0.1:{port}", "in use")
