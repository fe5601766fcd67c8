"""The shadow judge: the paper's pairwise comparison (Appendix H) of two answers, both orders.

`PairwiseJudge` is the ``judge(query, answer_a, answer_b)`` callable that
`tagrouter_fast.serve.shadow.ShadowRunner` takes. It asks the judge twice, with ``answer_a``
shown first and then second, through the prompt, verdict parser and order combination of
`tagrouter_fast.builder.judge` (one judge, offline and live): ``win`` only when both orders prefer
``answer_a``, ``loss`` only when both prefer ``answer_b``, ``tie`` otherwise. The transport is a
separate ``ask(messages) -> (reply text, usage)`` callable, so tests judge without HTTP;
`http_ask` is the OpenAI-compatible one, on the gateway's one upstream client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from tagrouter_fast.builder.judge import (
    JudgeConfig,
    JudgeError,
    PromptTemplate,
    combine,
    load_prompt,
    parse_verdict,
)
from tagrouter_fast.serve.forward.client import ClientPool, Timeouts
from tagrouter_fast.serve.forward.faults import classify
from tagrouter_fast.serve.shadow.spend import usage_tokens

__all__ = ["Ask", "PairwiseJudge", "http_ask"]

#: One judge call: chat messages in, ``(reply text, reported usage or None)`` out.
Ask = Callable[[list[dict[str, str]]], Awaitable[tuple[str, Mapping[str, Any] | None]]]


def _cut(text: str, limit: int) -> str:
    # Bounded prompts: a huge answer must not make a huge (and costly) judge call.
    return text if len(text) <= limit else text[:limit] + " [cut]"


class PairwiseJudge:
    """``await judge(query, answer_a, answer_b) -> (outcome of answer_a, usage)``.

    Args:
        ask: the transport (`http_ask`, or a fake in tests).
        prompt: the judge prompt (default: `tagrouter_fast.builder.judge.load_prompt()`).
        max_chars: the question and each answer are cut to this many characters.

    Raises (from a call):
        JudgeError: a reply holds no verdict (the pair is counted as a judge error).
    """

    def __init__(self, ask: Ask, prompt: PromptTemplate | None = None,
                 max_chars: int = 16_000) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self._ask = ask
        self._prompt = prompt or load_prompt()
        self._max = max_chars

    async def __call__(
        self, query: str, answer_a: str, answer_b: str
    ) -> tuple[str, dict[str, int] | None]:
        q, a, b = (_cut(x, self._max) for x in (query, answer_a, answer_b))
        (first, u1), (second, u2) = await asyncio.gather(
            self._ask(self._prompt.messages(q, a, b)), self._ask(self._prompt.messages(q, b, a))
        )
        v_first, v_second = parse_verdict(first), parse_verdict(second)
        if v_first is None or v_second is None:
            bad = first if v_first is None else second
            raise JudgeError(f"no verdict in the judge's reply: {bad[:200]!r}")
        outcome, _ = combine(v_first, v_second)
        t1, t2 = usage_tokens(u1), usage_tokens(u2)
        usage = None if t1 is None or t2 is None else {
            "prompt_tokens": t1[0] + t2[0], "completion_tokens": t1[1] + t2[1]}
        return outcome, usage


def http_ask(client: ClientPool, config: JudgeConfig, *,
             max_answer_bytes: int = 1 << 20) -> Ask:
    """An `Ask` posting to an OpenAI-compatible chat-completions endpoint (``config.url``,
    ``config.model``, its key, timeout, ``max_tokens`` and temperature) on the gateway's one
    upstream client. No retries: a shadow judgment that fails is counted and dropped, the
    traffic brings more.

    Raises (from a call):
        JudgeError: an HTTP error status, a reply that is not a chat completion, or one over
            ``max_answer_bytes``.
        BackendError: the request failed (timeout, connection; `forward.faults`).
    """
    headers = {"content-type": "application/json", "accept": "application/json"}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    t = config.timeout_s
    timeouts = Timeouts(connect_s=t, read_s=t, pool_s=t)

    async def ask(messages: list[dict[str, str]]) -> tuple[str, Mapping[str, Any] | None]:
        body = json.dumps({"model": config.model, "messages": messages,
                           "temperature": config.temperature,
                           "max_tokens": config.max_tokens}).encode()
        parts: list[bytes] = []
        try:
            with anyio.fail_after(t):
                resp = await client.send("POST", config.endpoint, body, headers, timeouts,
                                         backend="judge")
                try:
                    size = 0
                    async for chunk in resp.chunks():
                        size += len(chunk)
                        if size > max_answer_bytes:
                            raise JudgeError(f"{config.endpoint}: reply over "
                                             f"{max_answer_bytes} bytes")
                        parts.append(chunk)
                finally:
                    await resp.close()
        except TimeoutError as e:  # the call's deadline
            raise classify("judge", e) from e
        raw = b"".join(parts)
        text = raw[:200].decode("utf-8", "replace")
        if resp.status != 200:
            raise JudgeError(f"{config.endpoint}: HTTP {resp.status}: {text!r}")
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{config.endpoint}: not a chat completion: {text!r}") from None
        usage = data.get("usage") if isinstance(data, dict) else None
        return (content if isinstance(content, str) else ""), usage

    return ask
