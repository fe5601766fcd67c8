"""What an OpenAI-shaped exchange used, for charging it (`policy.spending`): the usage a
backend reported, else the sizes of the prompt's and the answer's text for an estimate.

Streams: OpenAI-compatible servers report usage in a stream only when asked
(``stream_options.include_usage``), in a last chunk with no choices; with it asked, every other
chunk carries ``"usage": null``. The gateway asks (`ask_for_usage`) when the client did not, and
`StreamMeter` then gives the client the stream it would have had: the usage chunk is dropped and
the ``"usage": null`` members are cut out of the event's bytes (a regular expression that cannot
match inside a JSON string: quotes in strings are escaped, so ``,"usage"`` only occurs as a
member). A server that reports no usage even when asked is charged on the streamed text
(estimated, flagged).

>>> m = StreamMeter(strip=True)
>>> m.feed(b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\\n\\n')
b'data: {"choices":[{"delta":{"content":"hi"}}]}\\n\\n'
>>> m.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\\n\\n')
b'\\n\\n'
>>> m.usage, m.answer_chars
({'prompt_tokens': 3, 'completion_tokens': 1}, 2)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["StreamMeter", "answer_chars", "ask_for_usage", "prompt_chars"]

# `"usage": null` as a member: after a comma, or first with a comma after it.
_NULL_AFTER = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])')
_NULL_FIRST = re.compile(rb'(?<=\{)\s*"usage"\s*:\s*null\s*,')


def ask_for_usage(body: dict[str, Any]) -> bool:
    """Sets ``stream_options.include_usage`` on a streamed request ``body`` that does not ask
    for usage; True when it did (the answer's usage chunk is then the gateway's to remove)."""
    opts = body.get("stream_options")
    if isinstance(opts, Mapping) and opts.get("include_usage") is True:
        return False
    if opts is not None and not isinstance(opts, Mapping):
        return False  # the client's own mistake: the backend answers it, unchanged
    body["stream_options"] = {**(opts or {}), "include_usage": True}
    return True


def _content_chars(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content
                   if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def prompt_chars(body: Mapping[str, Any]) -> int:
    """Characters of a chat or completions request's text (messages, or ``prompt``)."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        return sum(_content_chars(m.get("content")) for m in msgs if isinstance(m, dict))
    p = body.get("prompt")
    if isinstance(p, str):
        return len(p)
    if isinstance(p, list):
        return sum(len(x) for x in p if isinstance(x, str))
    return 0


def _choice_chars(choice: object, key: str) -> int:
    if not isinstance(choice, dict):
        return 0
    n = len(choice["text"]) if isinstance(choice.get("text"), str) else 0
    part = choice.get(key)
    if isinstance(part, dict):
        n += _content_chars(part.get("content"))
        for call in part.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                n += len(fn.get("arguments") or "") + len(fn.get("name") or "")
    return n


def answer_chars(obj: Mapping[str, Any]) -> int:
    """Characters of a JSON answer's text (message content, tool calls, or ``text``)."""
    choices = obj.get("choices")
    return sum(_choice_chars(c, "message") for c in choices) if isinstance(choices, list) else 0


class StreamMeter:
    """Reads the usage and the text size of an OpenAI stream as it is relayed.

    ``strip``: the gateway asked for the usage (`ask_for_usage`), so the client gets the stream
    without it. ``collect``: keep the answer's text too (shadow mode judges streamed answers).
    `feed` takes whole events (`Forwarder.relay` yields them) and returns the bytes for the
    client.
    """

    def __init__(self, *, strip: bool, collect: bool = False) -> None:
        self.strip = strip
        self.usage: dict[str, Any] | None = None
        self.answer_chars = 0
        #: The streamed text of choice 0, when ``collect``.
        self.parts: list[str] | None = [] if collect else None
        #: The stream ended with ``data: [DONE]``: the answer is whole.
        self.done = False

    def feed(self, block: bytes) -> bytes:
        if b"data:" not in block:
            return block
        lines = block.split(b"\n")
        changed = False
        for i, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                continue  # not ours to judge: passed on as it came
            if not isinstance(obj, dict):
                continue
            choices = obj.get("choices")
            if isinstance(choices, list):
                self.answer_chars += sum(_choice_chars(c, "delta") for c in choices)
                if self.parts is not None:
                    self._collect(choices)
            if "usage" not in obj:
                continue
            usage = obj["usage"]
            if isinstance(usage, dict):
                self.usage = usage
            if not self.strip:
                continue
            if isinstance(usage, dict) and choices == []:
                lines[i] = b""  # the usage chunk the client did not ask for
            elif usage is None:
                lines[i] = _NULL_FIRST.sub(b"", _NULL_AFTER.sub(b"", line, count=1), count=1)
            else:  # usage on a chunk with choices (some servers): the member goes
                del obj["usage"]
                lines[i] = b"data: " + json.dumps(obj, separators=(",", ":")).encode()
            changed = True
        if not changed:
            return block
        # A dropped event leaves blank lines: no event (SSE dispatches none on empty data);
        # runs of them are squeezed so no stray separators pile up.
        out = b"\n".join(lines)
        while b"\n\n\n" in out:
            out = out.replace(b"\n\n\n", b"\n\n")
        return out

    def _collect(self, choices: list[Any]) -> None:
        for c in choices:
            if not isinstance(c, dict) or c.get("index", 0) != 0:
                continue
            delta = c.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                assert self.parts is not None
                self.parts.append(content)

    @property
    def text(self) -> str | None:
        """The collected answer text (None unless ``collect``)."""
        return None if self.parts is None else "".join(self.parts)
