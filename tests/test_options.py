"""One place for the option vocabularies (`tagrouter_fast.options`): the Rust core accepts
exactly them, every reader takes them from there, and a `Variant` carries its recipe."""

from __future__ import annotations

import argparse

import pytest

from tagrouter_fast import options
from tagrouter_fast.core import TagDecider, TagScorer
from tagrouter_fast.options import (
    AGGREGATIONS,
    SHRINKING_WEIGHTINGS,
    TAGGER_ERROR_POLICIES,
    VARIANTS,
    WEIGHTINGS,
    Variant,
    resolve_variant,
)
from tagrouter_fast.router import TagRouter

RECORDS = [
    ("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss"),
    ("q2", ["Math"], "big", "loss"), ("q2", ["Math"], "small", "win"),
]


def test_rust_core_accepts_every_weighting_and_no_other() -> None:
    for w in WEIGHTINGS:
        k = 2.0 if w in SHRINKING_WEIGHTINGS else 0.0
        assert TagScorer.from_records(RECORDS, weighting=w, prior_strength=k).weighting == w
    with pytest.raises(ValueError):
        TagScorer.from_records(RECORDS, weighting="tf-idf")


def test_rust_core_accepts_every_aggregation_and_no_other() -> None:
    scorer = TagScorer.from_records(RECORDS)
    costs = {"big": 10.0, "small": 1.0}
    for a in AGGREGATIONS:
        assert TagDecider(scorer, costs, aggregation=a).aggregation == a
    with pytest.raises(ValueError):
        TagDecider(scorer, costs, aggregation="max")


def test_defaults_are_the_papers() -> None:
    scorer = TagScorer.from_records(RECORDS)
    assert scorer.weighting == options.DEFAULT_WEIGHTING == "paper"
    assert (scorer.s_win, scorer.s_tie, scorer.s_loss) == (1.0, 0.15, -1.0)
    assert TagDecider(scorer, {"big": 2.0, "small": 1.0}).aggregation == "sum"
    assert Variant() == VARIANTS[options.PAPER_VARIANT]


def test_decide_many_takes_exactly_the_policies() -> None:
    decider = TagDecider(TagScorer.from_records(RECORDS), {"big": 10.0, "small": 1.0})
    router = TagRouter(decider, align=False)
    for policy in TAGGER_ERROR_POLICIES:
        assert router.decide_many(raw_tags=[["Math"]], on_tagger_error=policy).models() == [
            "small"
        ]
    with pytest.raises(ValueError, match="on_tagger_error must be one of 'raise', 'untagged'"):
        router.decide_many(raw_tags=[["Math"]], on_tagger_error="ignore")


def test_readers_share_the_one_definition() -> None:
    import tagrouter_fast.builder.variants as variants
    import tagrouter_fast.core as core
    import tagrouter_fast.router as router

    assert core.WEIGHTINGS is WEIGHTINGS and core.AGGREGATIONS is AGGREGATIONS
    assert router.TAGGER_ERROR_POLICIES is TAGGER_ERROR_POLICIES
    assert router.DEFAULT_VARIANT == variants.DEFAULT_VARIANT == options.DEFAULT_VARIANT
    assert variants.VARIANTS is VARIANTS and variants.Variant is Variant


def _choices(parser: argparse.ArgumentParser, command: str, flag: str) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
    assert action.choices is not None
    return list(action.choices)


def test_cli_choices_are_the_vocabularies() -> None:
    from tagrouter_fast.add_model import STRATEGIES
    from tagrouter_fast.cli import build_parser

    p = build_parser()
    assert _choices(p, "build-store", "--variant") == list(VARIANTS)
    assert _choices(p, "build-store", "--aggregation") == list(AGGREGATIONS)
    assert _choices(p, "build-store", "--weighting") == list(WEIGHTINGS)
    assert _choices(p, "suggest-judgments", "--strategy") == list(STRATEGIES)


def test_variant_refuses_words_outside_the_vocabularies() -> None:
    with pytest.raises(ValueError, match="aggregation must be one of 'sum', 'mean'; got 'max'"):
        Variant(aggregation="max")
    with pytest.raises(ValueError, match="weighting must be one of 'paper', 'none'"):
        Variant(weighting="tf-idf")
    with pytest.raises(ValueError, match="shrunk and difficulty"):
        Variant(prior_strength=3.0)


def test_recipes_carry_their_name_through_overrides() -> None:
    for name, v in VARIANTS.items():
        assert v.recipe == v.label == name
        assert resolve_variant(name) is v
    tuned = resolve_variant("plus").with_options(theta=0.2, aggregation="sum")
    assert tuned.recipe == "plus" and tuned.theta == 0.2 and tuned.aggregation == "sum"
    assert tuned.prior_strengths == VARIANTS["plus"].prior_strengths  # still tuned
    with pytest.raises(TypeError, match="unknown variant setting"):
        VARIANTS["plus"].with_options(recipe="paper")  # a label, not a setting


def test_to_json_round_trips_the_settings_not_the_label() -> None:
    for v in VARIANTS.values():
        back = resolve_variant(v.to_json())
        assert back == v and back.to_json() == v.to_json()
        assert "recipe" not in v.to_json() and back.recipe is None and back.label == "custom"


def test_resolve_variant_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown variant 'best'"):
        resolve_variant("best")
    with pytest.raises(TypeError, match="unknown variant setting"):
        resolve_variant({"aggregation": "mean", "folds": 3})
    with pytest.raises(TypeError, match="recipe name, a Variant or a mapping"):
        resolve_variant(3)  # type: ignore[arg-type]


def test_score_params_feed_the_scorer() -> None:
    v = VARIANTS["plus"].with_options(s_tie=0.5)
    assert TagScorer.from_records(RECORDS, **v.score_params()).prior_strength == 100.0
    s = TagScorer.from_records(RECORDS, **v.score_params(30.0))
    assert (s.weighting, s.prior_strength, s.s_tie) == ("shrunk", 30.0, 0.5)
