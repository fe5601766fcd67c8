"""Routing by capability: what a request needs (`Needs`) and whether a backend offers it
(`lacks`).

A request needs features (``tools``, ``vision``, ``json_schema``, and ``completions`` for the
legacy text completions, which only OpenAI-compatible backends serve), room in the context
(its input tokens plus the output tokens it asks for, within ``max_context_tokens``) and an
output budget (its ``max_tokens`` within ``max_output_tokens``). Input tokens are counted with
the backend's tokenizer where it names one, else estimated (`edge.wire.Request.input_tokens`:
characters / 4, 1,600 per image). The policy routes among the backends that lack nothing;
when none is left the client gets a 400 naming the need (`Routing.candidates`).

>>> from tagrouter_fast.serve.config import BackendConfig
>>> from tagrouter_fast.serve.forward.backends import Backend
>>> text_only = Backend(BackendConfig("small", "http://x/v1", vision=False))
>>> lacks(text_only, Needs(frozenset({"vision"})))
'vision'
>>> lacks(text_only, Needs(frozenset({"tools"}), input_tokens=10)) is None
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tagrouter_fast.serve.forward.backends import Backend

if TYPE_CHECKING:
    from tagrouter_fast.serve.edge.wire import Request

__all__ = ["FEATURES", "NEED_WORDS", "Needs", "lacks", "needs_of"]

#: The features a backend declares (booleans of ``[[backends]]``), and ``completions``.
FEATURES = ("tools", "vision", "json_schema", "completions")
#: How a 400 says each need.
NEED_WORDS = {"tools": "tools (tool definitions or tool-call turns)", "vision": "vision (images)",
              "json_schema": "json_schema (structured output)",
              "completions": "completions (the legacy text completions API)"}


@dataclass(frozen=True)
class Needs:
    """What one request needs of the backend that serves it.

    ``recount`` gives the input tokens by another tokenizer's count (the request's texts
    counted again); None: the estimate stands for every backend."""

    features: frozenset[str] = frozenset()
    input_tokens: int = 0
    max_tokens: int | None = None
    recount: Callable[[Callable[[str], int]], int] | None = field(default=None, compare=False)

    def with_features(self, more: Iterable[str]) -> Needs:
        extra = frozenset(more) - self.features
        return dataclasses.replace(self, features=self.features | extra) if extra else self


def needs_of(req: Request, extra: Iterable[str] = ()) -> Needs:
    """The needs of a parsed request (``extra``: features it needs beyond its own, e.g. those
    its conversation used before)."""
    def recount(count: Callable[[str], int]) -> int:
        return dataclasses.replace(req, count_tokens=count).input_tokens

    return Needs(req.needs | frozenset(extra), req.input_tokens, req.max_tokens, recount)


def input_tokens(backend: Backend, needs: Needs) -> int:
    """The request's input tokens as ``backend`` counts them."""
    if backend.count_tokens is not None and needs.recount is not None:
        return needs.recount(backend.count_tokens)
    return needs.input_tokens


def lacks(backend: Backend, needs: Needs) -> str | None:
    """The first need ``backend`` cannot serve (a feature's name, ``max_output_tokens`` or
    ``context``, with the figures), or None when it can serve the request."""
    c = backend.config
    for f in sorted(needs.features):
        offered = c.protocol == "openai" if f == "completions" else getattr(c, f, False)
        if not offered:
            return f
    if needs.max_tokens is not None and c.max_output_tokens is not None \
            and needs.max_tokens > c.max_output_tokens:
        return f"max_output_tokens ({needs.max_tokens} asked, at most {c.max_output_tokens})"
    if c.max_context_tokens is not None:
        total = input_tokens(backend, needs) + (needs.max_tokens or 0)
        if total > c.max_context_tokens:
            return (f"context ({total} tokens with the output asked, over "
                    f"max_context_tokens {c.max_context_tokens})")
    return None
