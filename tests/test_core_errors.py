"""Bad input gets a clear Python exception naming the problem."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tagrouter_fast.core import (
    InconsistentRecordsError,
    TagDecider,
    TagRouterError,
    TagScorer,
    UnknownModelError,
    UnknownTagError,
)

RECORDS = [("q1", ["a"], "big", "win"), ("q1", ["a"], "small", "loss")]


@pytest.fixture
def scorer() -> TagScorer:
    return TagScorer.from_records(RECORDS)


def test_unknown_outcome_label_names_it_and_the_record():
    with pytest.raises(ValueError, match=r"record 1: unknown outcome 'won'"):
        TagScorer.from_records([RECORDS[0], ("q1", ["a"], "x", "won")])


@pytest.mark.parametrize(
    "record, error, match",
    [
        (("q1", ["a"], "m"), ValueError, "expected a \\(query_id, tags, model, outcome\\)"),
        (("q1", "a, b", "m", "win"), TypeError, "not a str"),
        (("q1", ["a", 3], "m", "win"), TypeError, "tags must be str, got int"),
        (("q1", ["a"], 5, "win"), TypeError, "model must be str"),
        (("q1", ["a"], "m", None), TypeError, "outcome must be str"),
    ],
)
def test_malformed_records(record, error, match):
    with pytest.raises(error, match=match):
        TagScorer.from_records([record])


def test_integer_query_ids_are_accepted():
    s = TagScorer.from_records([(1, ["a"], "m", "win"), (1, ["a"], "n", "tie")])
    assert s.n_queries == 1


def test_one_query_with_two_tag_sets():
    with pytest.raises(InconsistentRecordsError, match="q1"):
        TagScorer.from_records([*RECORDS, ("q1", ["b"], "third", "tie")])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weighting": "fancy"}, "unknown weighting 'fancy'"),
        ({"prior_strength": -1.0}, "prior_strength"),
        ({"s_win": math.nan}, "s_win must be finite"),
        ({"s_tie": math.inf}, "s_tie must be finite"),
    ],
)
def test_bad_scoring_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TagScorer.from_records(RECORDS, **kwargs)


def test_unknown_model_and_tag(scorer):
    with pytest.raises(
        UnknownModelError, match=r"unknown model 'nope'; known models: \['big', 'small'\]"
    ):
        scorer.score("nope", "a")
    with pytest.raises(UnknownTagError, match="zzz"):
        scorer.score("big", "zzz")
    with pytest.raises(UnknownModelError):
        scorer.without_model("nope")
    assert issubclass(UnknownModelError, TagRouterError)


@pytest.mark.parametrize("cost", [math.nan, -1.0, math.inf])
def test_bad_costs(scorer, cost):
    with pytest.raises(ValueError, match="cost of 'small' must be finite and >= 0"):
        TagDecider(scorer, {"big": 1.0, "small": cost})


def test_costs_must_be_numbers(scorer):
    with pytest.raises(TypeError, match="must be a number"):
        TagDecider(scorer, {"big": "1", "small": 1.0})
    with pytest.raises(TypeError, match="mapping"):
        TagDecider(scorer, [("big", 1.0)])  # type: ignore[arg-type]


@pytest.mark.parametrize("theta", [math.nan, math.inf, -math.inf])
def test_non_finite_theta(scorer, theta):
    with pytest.raises(ValueError, match="theta must be finite"):
        TagDecider(scorer, {"big": 2.0, "small": 1.0}, theta=theta)
    with pytest.raises(ValueError, match="theta must be finite"):
        TagDecider(scorer, {"big": 2.0, "small": 1.0}).with_theta(theta)


def test_bad_aggregation(scorer):
    costs = {"big": 2.0, "small": 1.0}
    with pytest.raises(ValueError, match=r"unknown aggregation 'avg'; expected 'sum' or 'mean'"):
        TagDecider(scorer, costs, aggregation="avg")
    with pytest.raises(TypeError, match="aggregation must be a str"):
        TagDecider(scorer, costs, aggregation=None)  # type: ignore[arg-type]


def test_empty_model_set(scorer):
    with pytest.raises(ValueError, match="empty model set"):
        TagDecider(scorer, {})


def test_unknown_models_in_decider(scorer):
    with pytest.raises(UnknownModelError, match="huge"):
        TagDecider(scorer, {"big": 2.0, "huge": 9.0})
    with pytest.raises(UnknownModelError, match="other"):
        TagDecider(scorer, {"big": 2.0, "small": 1.0}, llm="other")
    # llm must be a candidate, not merely in the store.
    with pytest.raises(UnknownModelError, match="small"):
        TagDecider(scorer, {"big": 2.0}, fallback="small")


def test_tags_argument_types(scorer):
    d = TagDecider(scorer, {"big": 2.0, "small": 1.0})
    with pytest.raises(TypeError, match="route_tag_string"):
        d.route_tags("a, b")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tags must be str, got NoneType"):
        d.route_tags(["a", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="tags must be str"):
        d.route_tags_batch([["a"], [1]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single str"):
        d.route_tags_batch("a")  # type: ignore[arg-type]
    # Any iterable of str works: tuples, generators.
    assert d.route_tags(("a",)) == d.route_tags(t for t in ["a"]) == "big"


def test_mismatched_lengths_in_theta_search(scorer):
    d = TagDecider(scorer, {"big": 2.0, "small": 1.0})
    with pytest.raises(ValueError, match="mismatched lengths"):
        d.select_theta([["a"], ["a"]], np.ones((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="mismatched lengths"):
        d.select_theta([["a"]], [{"big": "win"}, {"big": "win"}])
    with pytest.raises(ValueError, match="mismatched lengths"):
        d.select_theta([["a"]], np.ones((1, 2), dtype=bool), np.ones((1, 3)))
    with pytest.raises(ValueError, match="unknown outcome 'good'"):
        d.select_theta([["a"]], [{"big": "good"}])
    with pytest.raises(ValueError, match="grid is empty"):
        d.select_theta([["a"]], np.ones((1, 2), dtype=bool), grid=[])
    with pytest.raises(ValueError, match="share must be in"):
        d.theta_for_llm_share([["a"]], 1.5)


def test_update_errors(scorer):
    with pytest.raises(InconsistentRecordsError, match="already in the store"):
        scorer.with_model([("q2", ["a"], "big", "win")])
    with pytest.raises(InconsistentRecordsError, match="one model"):
        scorer.with_model([("q2", ["a"], "n1", "win"), ("q3", ["a"], "n2", "win")])
    with pytest.raises(ValueError, match="at least one record"):
        scorer.with_model([])
    only = TagScorer.from_records([("q", ["a"], "m", "win")])
    with pytest.raises(ValueError, match="only model"):
        only.without_model("m")
    # A failed update leaves the store as it was.
    before = scorer.to_bytes()
    with pytest.raises(ValueError):
        scorer.with_records([("q5", ["a"], "big", "win"), ("q6", ["a"], "big", "meh")])
    assert scorer.to_bytes() == before
