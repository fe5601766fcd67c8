"""What the fake backend (`fake_backend`) says, per protocol: the prompt it echoes, its tool
call (when told to make one), and its answers as an OpenAI chat completion or an Anthropic
message, whole or as stream events.

The answer text is ``"<name> answers: <last user text>"``, with ``" [images: N]"`` when the
last user turn held images, so a test can tell which backend answered and what reached it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

__all__ = ["anthropic_error", "anthropic_events", "anthropic_message", "prompt_of",
           "tool_call_of"]


def _parts_text(content: Any) -> tuple[str, int]:
    """Text of a content (a string or parts of either protocol) and its image count."""
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    images = 0
    for p in content if isinstance(content, list) else []:
        if not isinstance(p, dict):
            continue
        if p.get("type") in ("text", "input_text"):
            texts.append(str(p.get("text", "")))
        elif p.get("type") in ("image", "image_url"):
            images += 1
        elif p.get("type") == "tool_result":
            texts.append("[tool result] " + _parts_text(p.get("content") or "")[0])
    return " ".join(texts), images


def prompt_of(body: dict[str, Any]) -> str:
    """The last user turn's text (``[images: N]`` appended when it held images), or the last
    tool result's, of a chat completions or Messages body."""
    msgs = body.get("messages") or []
    for m in reversed(msgs if isinstance(msgs, list) else []):
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool":
            return "[tool result] " + _parts_text(m.get("content"))[0]
        if m.get("role") == "user":
            text, images = _parts_text(m.get("content"))
            return text + (f" [images: {images}]" if images else "")
    return ""


def tool_call_of(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The call the fake makes when told to (``tool_call``): the first tool, with the prompt
    as its ``query`` argument; None when the request offers no tool."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    t: dict[str, Any] = tools[0]
    fn = t["function"] if isinstance(t.get("function"), dict) else t
    return str(fn.get("name", "tool")), {"query": prompt_of(body)[:80]}


# ==== Anthropic Messages ====


def _usage(text: str) -> dict[str, int]:
    return {"input_tokens": 8, "output_tokens": len(text.split())}


def anthropic_message(mid: str, model: str, text: str,
                      call: tuple[str, dict[str, Any]] | None) -> dict[str, Any]:
    """A whole Messages answer: the text, then the tool call when there is one."""
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if call is not None:
        content.append({"type": "tool_use", "id": f"toolu_{mid}", "name": call[0],
                        "input": call[1]})
    return {"id": mid, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": "tool_use" if call else "end_turn",
            "stop_sequence": None, "usage": _usage(text)}


def _sse(kind: str, body: dict[str, Any]) -> bytes:
    data = json.dumps({"type": kind, **body}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def anthropic_events(mid: str, model: str, pieces: list[str],
                     call: tuple[str, dict[str, Any]] | None) -> Iterator[bytes]:
    """The Messages stream of the same answer, the text in ``pieces``."""
    yield _sse("message_start", {"message": {
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 8, "output_tokens": 0}}})
    yield _sse("content_block_start", {"index": 0,
                                       "content_block": {"type": "text", "text": ""}})
    for piece in pieces:
        yield _sse("content_block_delta", {"index": 0,
                                           "delta": {"type": "text_delta", "text": piece}})
    yield _sse("content_block_stop", {"index": 0})
    if call is not None:
        yield _sse("content_block_start", {"index": 1, "content_block": {
            "type": "tool_use", "id": f"toolu_{mid}", "name": call[0], "input": {}}})
        yield _sse("content_block_delta", {"index": 1, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(call[1])}})
        yield _sse("content_block_stop", {"index": 1})
    yield _sse("message_delta", {
        "delta": {"stop_reason": "tool_use" if call else "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": len("".join(pieces).split())}})
    yield _sse("message_stop", {})


def anthropic_error(message: str, status: int) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 429: "rate_limit_error",
            529: "overloaded_error"}.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}
