"""Request bodies of the OpenAI chat and completions paths (and of ``/v1/route``,
``/v1/feedback``, ``/admin``): read within the size limit, parsed, and the fields the gateway
reads checked, each error a 400 naming the field. The rest of a body passes to the backend as
the client sent it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request

from tagrouter_fast.serve.edge.errors import ApiError, bad, too_deep

__all__ = ["chat_turn", "number", "prompt_text", "read_json", "route_options"]


async def read_json(request: Request, limit: int, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON object, read with the size limit enforced twice: on the declared
    Content-Length (cheap, before reading) and while reading (a client may lie or stream)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "content-length: not an integer", param="content-length") from None
        if n > limit:
            raise ApiError(413, f"request body of {n} bytes is over the {limit}-byte limit",
                           kind="request_too_large")
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the {limit}-byte limit",
                               kind="request_too_large")
            parts.append(chunk)
    except ClientDisconnect:
        # Nobody will read the answer; a 400 keeps a client's hang-up out of the error log.
        raise ApiError(400, "body: the client went away before sending all of it",
                       param="body") from None
    raw = b"".join(parts)
    if allow_empty and not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body: not valid JSON ({e})", param="body") from None
    except RecursionError:
        # ~1,000 levels fit in a 2 KB body. Python recovers from the recursion limit, so the
        # interpreter's own bound is the check: no walk over every body to count its depth.
        raise too_deep() from None
    if not isinstance(body, dict):
        raise bad("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def content_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise bad(f"{where}[{i}]", "must be an object")
            if part.get("type") == "text":
                t = part.get("text")
                if not isinstance(t, str):
                    raise bad(f"{where}[{i}].text", "must be a string")
                texts.append(t)
        return "\n".join(texts)
    raise bad(where, f"must be a string, a list of content parts or null, got "
               f"{type(content).__name__}")


def chat_turn(body: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The latest user turn's text and the checked messages."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages", "missing")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty array")
    text: str | None = None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise bad(f"messages[{i}].role", "missing" if role is None else "must be a string")
        t = content_text(m.get("content"), f"messages[{i}].content")
        if role == "user":
            text = t
    return text or "", msgs


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text a completions request is routed on (token-id prompts have none)."""
    if "prompt" not in body:
        raise bad("prompt", "missing")
    p = body["prompt"]
    if isinstance(p, str):
        return p
    if isinstance(p, list):
        if all(isinstance(x, str) for x in p):
            return "\n".join(p)
        if all(isinstance(x, int) for x in p) or all(isinstance(x, list) for x in p):
            return ""  # token ids: nothing to tag, the decider's fallback takes it
    raise bad("prompt", "must be a string, an array of strings or token ids")


def number(value: Any, where: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(where, f"must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(where, f"must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def route_options(body: dict[str, Any], request: Request) -> tuple[float | None, float | None]:
    """The request's own operating point: ``(theta, llm_share)``, at most one of them set.

    From the body's ``"tagrouter": {"theta": x}`` / ``{"llm_share": s}`` (ours: never sent
    upstream) or the ``x-tagrouter-theta`` / ``x-tagrouter-llm-share`` headers (the headers
    win)."""
    opts = body.pop("tagrouter", None)
    got: dict[str, Any] = {}
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("tagrouter", "must be an object")
        extra = sorted(set(opts) - {"theta", "llm_share"})
        if extra:
            raise bad(f"tagrouter.{extra[0]}", "unknown option (known: theta, llm_share)")
        got = {k: (f"tagrouter.{k}", v) for k, v in opts.items() if v is not None}
    for key, header in (("theta", "x-tagrouter-theta"), ("llm_share", "x-tagrouter-llm-share")):
        raw = request.headers.get(header)
        if raw is not None:
            try:
                got[key] = (header, float(raw))
            except ValueError:
                raise bad(header, f"not a number: {raw!r}") from None
    if len(got) > 1:
        raise bad("tagrouter.llm_share", "give theta or llm_share, not both")
    theta = number(got["theta"][1], got["theta"][0]) if "theta" in got else None
    share = (
        number(got["llm_share"][1], got["llm_share"][0], 0.0, 1.0) if "llm_share" in got else None
    )
    return theta, share
