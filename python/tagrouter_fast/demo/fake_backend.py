"""A small OpenAI-compatible (or Anthropic Messages) backend whose behaviour is commanded (the
demo's backends).

Shipped so that ``tagrouter serve --demo`` runs with one command and so that tests and
benchmarks can make a backend slow, fail, reset a stream midway or answer garbage on purpose:
:class:`FakeBackend` answers ``POST /v1/chat/completions`` and ``/v1/completions`` (streaming or
not), or with ``protocol="anthropic"`` ``POST /v1/messages`` (Anthropic's answers, events and
error shape: `fake_answers`); told to (``tool_call``), it calls the request's first tool.
Its behaviour is set from Python (:meth:`FakeBackend.command`) or over HTTP
(``POST /_fake/command`` with the same fields), and ``GET /_fake/state`` reports counters, among
them ``cancelled``: streams the client (the gateway) hung up on. ``python -m
tagrouter_fast.demo.fake_backend`` runs one in its own process (`BackendProcess`).

>>> backend = FakeBackend("small")
>>> backend.command(mode="error", status=503, times=1).mode
'error'
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tagrouter_fast.demo.fake_answers import (
    anthropic_error,
    anthropic_events,
    anthropic_message,
    prompt_of,
    tool_call_of,
)

__all__ = ["MODES", "FakeBackend", "FakeBehaviour", "main"]

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
    #: Answer a request that offers tools with a call to its first tool (after the text).
    tool_call: bool = False

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

    def __init__(self, name: str = "fake", behaviour: FakeBehaviour | None = None,
                 protocol: str = "openai") -> None:
        if protocol not in ("openai", "anthropic"):
            raise ValueError(f"protocol must be 'openai' or 'anthropic', got {protocol!r}")
        self.name = name
        self.protocol = protocol
        self.behaviour = behaviour or FakeBehaviour()
        self.state = FakeState()
        self._lock = threading.Lock()  # commands come from test threads and the server loop
        answers = [Route("/v1/messages", self._messages, methods=["POST"])] \
            if protocol == "anthropic" else [
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"])]
        self.app = Starlette(
            routes=[
                *answers,
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

    async def _messages(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    async def _answer(self, request: Request, *, chat: bool) -> Response:
        anthropic = self.protocol == "anthropic"
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
            message = f"{self.name}: failing on command"
            return JSONResponse(
                anthropic_error(message, b.status) if anthropic else
                {"error": {"message": message, "type": "server_error"}},
                status_code=b.status,
            )
        if b.mode == "garbage":
            return Response(b"<html>\x00\xff\xfe not an API</html>", media_type="text/html")
        model = str(body.get("model", self.name))
        text = f"{self.name} answers: {_prompt_text(body, chat)[:80]}"
        call = tool_call_of(body) if b.tool_call else None
        if anthropic and b.mode != "malformed":  # malformed: the same garbage as below
            mid = f"msg_fake{self.state.requests}"
            if not body.get("stream"):
                if b.mode == "reset":
                    return _ResetAfterStart()  # type: ignore[return-value]
                self.state.completed += 1
                return JSONResponse(anthropic_message(mid, model, text, call))
            return StreamingResponse(
                self._anthropic_events(b, anthropic_events(mid, model, _pieces(text, b.chunks),
                                                           call)),
                media_type="text/event-stream", headers={"cache-control": "no-cache"})
        if body.get("stream"):
            return StreamingResponse(
                self._events(b, model, text, chat=chat, call=call),
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
        out = _completion(model, text, chat=chat)
        if call is not None and chat:
            choice = out["choices"][0]
            choice["message"]["tool_calls"] = [{
                "id": f"call_{self.state.requests}", "type": "function",
                "function": {"name": call[0], "arguments": json.dumps(call[1])}}]
            choice["finish_reason"] = "tool_calls"
        return JSONResponse(out)

    async def _anthropic_events(self, b: FakeBehaviour, events: Iterator[bytes]
                                ) -> AsyncIterator[bytes]:
        try:
            for sent, ev in enumerate(events):
                if b.mode == "reset" and sent >= b.reset_after:
                    raise ConnectionResetError("fake backend: stream reset on command")
                if b.chunk_delay_s:
                    await anyio.sleep(b.chunk_delay_s)
                yield ev
            self.state.completed += 1
        except (anyio.get_cancelled_exc_class(), GeneratorExit):
            self.state.cancelled += 1
            raise

    async def _events(
        self, b: FakeBehaviour, model: str, text: str, *, chat: bool,
        call: tuple[str, dict[str, Any]] | None = None,
    ) -> AsyncIterator[bytes]:
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{self.state.requests}"
        sent = 0
        try:
            if b.mode == "malformed":
                yield b"data: {this is not json\n\n"
                sent += 1
            for i, piece in enumerate(_pieces(text, b.chunks)):
                if b.mode == "reset" and sent >= b.reset_after:
                    raise ConnectionResetError("fake backend: stream reset on command")
                if b.chunk_delay_s:
                    await anyio.sleep(b.chunk_delay_s)
                yield _sse(_chunk(cid, model, piece, None, chat, first=i == 0))
                sent += 1
            if call is not None and chat:
                c = _chunk(cid, model, "", None, chat, first=False)
                c["choices"][0]["delta"] = {"tool_calls": [{
                    "index": 0, "id": f"call_{cid}", "type": "function",
                    "function": {"name": call[0], "arguments": json.dumps(call[1])}}]}
                yield _sse(c)
            finish = "tool_calls" if call is not None and chat else "stop"
            yield _sse(_chunk(cid, model, "", finish, chat, first=False))
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
    return prompt_of(body)


def _pieces(text: str, chunks: int) -> list[str]:
    """``text`` in ``chunks`` stream pieces (words kept whole; empty ones pad)."""
    words = text.split(" ")
    per = max(1, -(-len(words) // max(1, chunks)))  # rounded up: every word in some piece
    pieces = [" ".join(words[i : i + per]) for i in range(0, len(words), per)]
    pieces = (pieces + [""] * chunks)[: max(1, chunks)]
    return [(" " if i and p else "") + p for i, p in enumerate(pieces)]


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


def main(argv: Sequence[str] | None = None) -> int:
    """One fake backend on a port, until interrupted; prints ``listening on URL`` once bound
    (what `BackendProcess` waits for)."""
    import argparse

    from tagrouter_fast.demo.servers import ServerThread

    p = argparse.ArgumentParser(description="a commanded fake OpenAI-compatible backend")
    p.add_argument("--name", default="fake")
    p.add_argument("--protocol", choices=("openai", "anthropic"), default="openai")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    srv = ServerThread(FakeBackend(args.name, protocol=args.protocol).app, args.host, args.port,
                       log_level="critical", lifespan="off")
    print(f"listening on {srv.url}", flush=True)
    srv.server.run(sockets=[srv.sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
