"""Model-free taggers shared by the tests, deterministic so that the expected routes are known.

`CountingTagger`: "poem" queries get ["Poem"], the rest ["Math"], and every query it is asked to
tag is remembered (to prove that refused input never reached it).

`KeywordTagger`: poems get poetry tags, equations maths tags, anything else none; it counts the
queries it tagged, so a tag cache's effect is visible.
"""

from __future__ import annotations

from collections.abc import Sequence

POEM_TAGS = ["Poetry Writing", "Creative Writing"]
MATH_TAGS = ["Algebra", "Mathematical Problem Solving"]


class CountingTagger:
    def __init__(self, fingerprint: str = "counting-tagger-v1") -> None:
        self.fingerprint = fingerprint
        self.seen: list[str] = []

    def tag(self, query: str) -> list[str]:
        return self.tag_batch([query])[0]

    def tag_batch(self, queries: list[str]) -> list[list[str]]:
        self.seen.extend(queries)
        return [["Poem"] if "poem" in q else ["Math"] for q in queries]


class KeywordTagger:
    # A class attribute, so that a subclass's own fingerprint (another tagger, other cached
    # tags) is not shadowed by the instance's.
    fingerprint = "keyword-tagger-v1"

    def __init__(self) -> None:
        self.tagged = 0

    def tag(self, query: str) -> list[str]:
        return self.tag_batch([query])[0]

    def tag_batch(self, queries: Sequence[str]) -> list[list[str]]:
        self.tagged += len(queries)
        out = []
        for q in queries:
            tags: list[str] = []
            if "poem" in q.lower():
                tags += POEM_TAGS
            if "equation" in q.lower():
                tags += MATH_TAGS
            out.append(tags)
        return out
