"""The demo router: two models, ``small`` (wins writing) and ``big`` (wins maths and code),
built in memory from a few judged queries, with a keyword tagger (no model: for tests and the
tagging-excluded benchmark) or the embedded default tagger.

>>> router = demo_router("keyword")
>>> router.route("Solve the equation 2x + 3 = 4")
'big'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter

__all__ = ["DEMO_COSTS", "DEMO_QUERIES", "KeywordTagger", "demo_router"]

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
