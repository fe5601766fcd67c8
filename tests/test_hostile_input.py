"""Hostile input at the router's edge: wrong types fail with a message naming the problem, blank
queries go to the fallback model without reaching the tagger, and JSON output is valid JSON."""

from __future__ import annotations

import json

import pytest
from fake_taggers import CountingTagger

from tagrouter_fast import TagDecider, TagRouter, TagScorer
from tagrouter_fast.core import finite_for_json


@pytest.fixture
def router(counting_tagger: CountingTagger) -> TagRouter:
    recs = [
        ("q1", ["Poem"], "big", "loss"),
        ("q1", ["Poem"], "small", "win"),
        ("q2", ["Math"], "big", "win"),
        ("q2", ["Math"], "small", "loss"),
    ]
    decider = TagDecider(TagScorer.from_records(recs), costs={"big": 10.0, "small": 1.0})
    return TagRouter(decider, counting_tagger, align=False)


@pytest.mark.parametrize("bad", [None, b"x", ["a"], 3])
def test_route_rejects_non_str(router: TagRouter, bad: object) -> None:
    with pytest.raises(TypeError, match="query must be str"):
        router.route(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="query must be str"):
        router.decide(bad)  # type: ignore[arg-type]


def test_route_batch_rejects_a_bare_string(router: TagRouter) -> None:
    with pytest.raises(TypeError, match="sequence of str, not a str"):
        router.route_batch("write a poem")
    with pytest.raises(TypeError, match=r"queries\[1\] must be str, got bytes"):
        router.route_batch(["write a poem", b"x"])  # type: ignore[list-item]


@pytest.mark.parametrize("blank", ["", "   ", "\n\t "])
def test_blank_query_goes_to_fallback_without_tagging(
    router: TagRouter, counting_tagger: CountingTagger, blank: str
) -> None:
    assert router.tagger is counting_tagger
    d = router.decide(blank)
    assert d.reason == "fallback"
    assert d.model == router.decider.fallback
    assert router.route_batch([blank, "write a poem"]) == [router.decider.fallback, "small"]
    assert counting_tagger.seen == ["write a poem"]


def test_decision_json_is_valid_json(router: TagRouter) -> None:
    d = router.decide("")  # fallback: Delta_q is NaN
    assert "NaN" in json.dumps(d.to_dict())  # what `route --json` used to print
    text = json.dumps(finite_for_json({"query": "", **d.to_dict()}), allow_nan=False)
    assert "NaN" not in text
    assert json.loads(text)["reason"] == "fallback"


def test_tags_rejects_non_str(router: TagRouter) -> None:
    with pytest.raises(TypeError, match="query must be str, got bytes"):
        router.tags(b"x")  # type: ignore[arg-type]


def test_blank_query_needs_no_tagger_nor_encoder() -> None:
    recs = [("q1", ["Poem"], "big", "loss"), ("q1", ["Poem"], "small", "win")]
    decider = TagDecider(TagScorer.from_records(recs), costs={"big": 10.0, "small": 1.0})
    bare = TagRouter(decider)  # align=True: an aligner would load the encoder
    assert bare.decide("  ").reason == "fallback"
    assert bare.route_batch(["", "\n"]) == [decider.fallback] * 2
    assert bare._aligner is None
    with pytest.raises(ValueError, match="no tagger"):
        bare.route("write a poem")
