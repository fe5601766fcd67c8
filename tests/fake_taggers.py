"""A model-free tagger shared by the tests: "poem" queries get ["Poem"], the rest ["Math"], and
every query it is asked to tag is remembered (to prove that refused input never reached it)."""

from __future__ import annotations


class CountingTagger:
    def __init__(self, fingerprint: str = "counting-tagger-v1") -> None:
        self.fingerprint = fingerprint
        self.seen: list[str] = []

    def tag(self, query: str) -> list[str]:
        return self.tag_batch([query])[0]

    def tag_batch(self, queries: list[str]) -> list[list[str]]:
        self.seen.extend(queries)
        return [["Poem"] if "poem" in q else ["Math"] for q in queries]
