"""A world for shadow mode whose truth is known: two models whose quality depends on the topic,
and a deterministic judge (``tagrouter serve --demo --shadow``, and the tests of the loop).

- `QualityBackend`: an OpenAI-compatible chat/completions backend answering ``[NAME] <the
  question>`` with a usage that is a fixed function of the question and the model (so the cost
  of any traffic is computable), byte-identical answers to identical requests (no clock in
  them), streaming or not.
- `FakeJudge`: an OpenAI-compatible judge for the paper's pairwise prompt: it finds the
  question and the two answers in the prompt, tells the strong model's answer by its ``[big]``
  mark (any other answer, a real model's too, is the weak one), and answers the verdict that
  `true_outcome` gives the weak model against the strong on that question.
- `true_outcome`: the small model's outcome against the big one per question, drawn once from
  its topic's probabilities (`TRUTH`) by a hash of the question: the small model wins writing,
  loses maths and code.

>>> topic_of("Solve the equation 3x + 4 = 6"), topic_of("Write a short poem about rain")
('maths', 'writing')
>>> true_outcome("Write a short poem about rain") == true_outcome("Write a short poem about rain")
True
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "PRICES", "TRUTH", "FakeJudge", "QualityBackend", "demo_queries", "drive_traffic",
    "shadow_table", "topic_of", "true_outcome", "usage_of",
]

#: P(win), P(tie), P(loss) of the small model's answer against the big one's, per topic.
TRUTH: dict[str, tuple[float, float, float]] = {
    "writing": (0.45, 0.5, 0.05), "maths": (0.05, 0.15, 0.8), "code": (0.05, 0.25, 0.7),
}
#: USD per 1k input/output tokens (the ``[shadow.prices]`` of the demo).
PRICES: dict[str, tuple[float, float]] = {
    "big": (0.01, 0.03), "small": (0.0005, 0.0015), "judge": (0.0002, 0.0006),
}
_TOPIC_WORDS = (("poem", "writing"), ("rewrite", "writing"), ("equation", "maths"),
                ("python", "code"), ("function", "code"))


def topic_of(question: str) -> str:
    """``writing``, ``maths`` or ``code`` by keyword (the demo router's keyword tagger's);
    ``writing`` when none matches."""
    q = question.lower()
    return next((topic for word, topic in _TOPIC_WORDS if word in q), "writing")


def _unit(question: str, salt: str) -> float:
    return zlib.crc32(f"{salt}:{question}".encode()) / 2**32


def true_outcome(question: str) -> str:
    """The small model's answer against the big one's on ``question``: ``win``, ``tie`` or
    ``loss``, the same every time."""
    win, tie, _ = TRUTH[topic_of(question)]
    u = _unit(question, "outcome")
    return "win" if u < win else ("tie" if u < win + tie else "loss")


def usage_of(model: str, question: str) -> dict[str, int]:
    """The tokens ``model``'s answer to ``question`` takes (deterministic)."""
    out = 120 + int(_unit(question, "len") * 100)
    if model != "big":
        out = int(out * (0.7 + 0.3 * _unit(question, model)))
    prompt = 8 + len(question) // 4
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}


def _question(body: Mapping[str, Any]) -> tuple[str, bool]:
    """The last user turn's text (chat) or the prompt (completions), and whether it is chat."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(
                    m.get("content"), str):
                return m["content"], True
        return "", True
    prompt = body.get("prompt")
    return (prompt if isinstance(prompt, str) else ""), False


class QualityBackend:
    """A backend named ``name``; ``status`` (200: answer) and ``delay_s`` can be changed by a
    test at any time; ``requests`` counts the calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.delay_s = 0.0
        self.requests = 0
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._answer, methods=["POST"]),
            Route("/v1/completions", self._answer, methods=["POST"]),
        ])

    async def _answer(self, request: Request) -> Response:
        self.requests += 1
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": {"message": "body is not JSON"}}, status_code=400)
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        if self.status != 200:
            return JSONResponse({"error": {"message": f"{self.name}: failing on command"}},
                                status_code=self.status)
        question, chat = _question(body)
        text = f"[{self.name}] {question}"
        model = str(body.get("model", self.name))
        rid = f"{zlib.crc32(question.encode()):08x}"
        if body.get("stream"):
            return StreamingResponse(_events(rid, model, text, chat),
                                     media_type="text/event-stream")
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "stop"} if chat else
            {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None})
        return JSONResponse({
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "object": "chat.completion" if chat else "text_completion", "created": 1_700_000_000,
            "model": model, "choices": [choice], "usage": usage_of(self.name, question)})


async def _events(rid: str, model: str, text: str, chat: bool) -> Any:
    for i, piece in enumerate(text.split(" ")):
        part = piece if i == 0 else " " + piece
        choice = ({"index": 0, "delta": {"content": part}, "finish_reason": None} if chat
                  else {"index": 0, "text": part, "finish_reason": None})
        yield b"data: " + json.dumps({"id": rid, "model": model, "choices": [choice]}).encode() \
            + b"\n\n"
    yield b"data: [DONE]\n\n"


_PROMPT = re.compile(r"\[User Question\]\n(.*?)\n\n\[The Start of Assistant A's Answer\]\n(.*?)\n"
                     r"\[The End of Assistant A's Answer\]\n\n\[The Start of Assistant B's "
                     r"Answer\]\n(.*?)\n\[The End of Assistant B's Answer\]", re.S)


class FakeJudge:
    """A judge endpoint for the pairwise prompt of `tagrouter_fast.builder.judge`, deterministic
    by `true_outcome`. ``status``, ``delay_s`` and ``requests`` as for `QualityBackend`."""

    def __init__(self, strong: str = "big") -> None:
        self.strong = f"[{strong}]"
        self.status = 200
        self.delay_s = 0.0
        self.requests = 0
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._judge,
                                           methods=["POST"])])

    def verdict(self, question: str, a: str, b: str) -> str:
        """``A``, ``B`` or ``C`` for two answers to ``question``."""
        a_strong, b_strong = a.startswith(self.strong), b.startswith(self.strong)
        if a_strong == b_strong:
            return "C"
        weak_letter, strong_letter = ("B", "A") if a_strong else ("A", "B")
        outcome = true_outcome(question)
        return {"win": weak_letter, "loss": strong_letter, "tie": "C"}[outcome]

    async def _judge(self, request: Request) -> Response:
        self.requests += 1
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        if self.status != 200:
            return JSONResponse({"error": {"message": "judge failing on command"}},
                                status_code=self.status)
        body = json.loads(await request.body())
        user = next((m["content"] for m in body.get("messages", [])
                     if isinstance(m, dict) and m.get("role") == "user"), "")
        m = _PROMPT.search(user)
        verdict = self.verdict(*m.groups()) if m else "C"
        reply = json.dumps({"explanation": "deterministic demo judge", "compare result": verdict})
        return JSONResponse({
            "id": "judge", "object": "chat.completion", "created": 1_700_000_000,
            "model": str(body.get("model", "judge")),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 60 + len(user) // 4, "completion_tokens": 20,
                      "total_tokens": 80 + len(user) // 4}})


def shadow_table(judge_url: str, *, default_model: str = "big", judge_model: str = "judge",
                 **settings: Any) -> dict[str, Any]:
    """A ``[shadow]`` table for this world (prices of `PRICES`), ``settings`` on top."""
    return {
        "default_model": default_model, "judge_url": judge_url, "judge_model": judge_model,
        "prices": {m: {"input_per_1k": p[0], "output_per_1k": p[1]} for m, p in PRICES.items()},
        **settings,
    }


def demo_queries(n: int, seed: int = 0) -> list[str]:
    """``n`` requests of a day's mix: half writing, a quarter maths, a quarter code; each
    different (a numbered variant), so their true outcomes differ."""
    rng = random.Random(seed)
    things = ("sea", "moon", "rain", "forest", "city", "snow", "desert", "river", "night")
    out = []
    for i in range(n):
        u = rng.random()
        if u < 0.35:
            out.append(f"Write a short poem about the {rng.choice(things)} (#{i})")
        elif u < 0.5:
            out.append(f"Rewrite this sentence in a friendlier tone: note {i} is late.")
        elif u < 0.75:
            a = rng.randrange(2, 50)
            out.append(f"Solve the equation {a}x + {i} = {a * 3}")
        else:
            out.append(f"Write a Python function that returns {i} squared")
    return out


def drive_traffic(url: str, queries: Sequence[str], *, every_s: float = 0.2,
                  stop: threading.Event | None = None, ready_timeout_s: float = 120.0) -> int:
    """Sends each query to ``url``'s chat endpoint (model ``tagrouter``) once the gateway is
    ready, one every ``every_s`` seconds, until done or ``stop`` is set; returns how many were
    answered. For the demo: the dashboard fills without the user typing anything."""
    from tagrouter_fast.demo.servers import http_status

    stop = stop or threading.Event()
    deadline = time.monotonic() + ready_timeout_s
    while http_status(url + "/readyz") != 200:
        if stop.wait(0.2) or time.monotonic() > deadline:
            return 0
    answered = 0
    for q in queries:
        if stop.is_set():
            break
        data = json.dumps({"model": "tagrouter",
                           "messages": [{"role": "user", "content": q}]}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - loopback
                resp.read()
                answered += 1
        except (urllib.error.URLError, OSError):
            pass  # the gateway is stopping, or one request failed: the next one goes on
        stop.wait(every_s)
    return answered
