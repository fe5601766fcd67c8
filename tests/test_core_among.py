"""Decisions among a subset of the candidates (``among=``, capability routing): the Rust decider
agrees with the reference's rule on random stores, tags and subsets, a subset decides as a
decider built over it would, every candidate listed is the unrestricted decision, and a query
never goes outside its subset."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_core_reference import (
    PROFILE,
    aggregations,
    build_pair,
    cost_values,
    params,
    query_tags,
    record_sets,
    same_float,
    thetas,
)

from tagrouter_fast import NoCandidateError, TagRouterError
from tagrouter_fast.core import TagDecider, TagScorer, UnknownModelError


def same_decision(d, want) -> None:
    """A `Decision` against a reference decision dict, field by field, to the bit."""
    assert d.model == want["model"]
    assert d.reason == want["reason"]
    assert same_float(d.delta, want["delta"])
    assert (d.slm, d.argmax, d.llm, d.theta) == (
        want["slm"],
        want["argmax"],
        want["llm"],
        want["theta"],
    )
    assert d.scores == want["scores"]
    assert list(d.scores) == list(want["scores"])  # models order, subset only
    assert d.known_tags == want["known_tags"]
    assert d.unknown_tags == want["unknown_tags"]
    assert d.contributions == want["contributions"]


@st.composite
def subsets(draw, models: list[str]) -> list[str]:
    """A non-empty subset of ``models``, as a list that may repeat names, in any order."""
    picked = draw(st.lists(st.sampled_from(models), min_size=1, max_size=len(models) + 1))
    return draw(st.permutations(picked))


def same_dict(d: Any, w: Any) -> None:
    """Two `Decision`s field for field (Delta_q compared NaN-aware)."""
    got, want = d.to_dict(), w.to_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert same_float(d.delta, w.delta) if key == "delta" else got[key] == value


@PROFILE
@given(
    records=record_sets(),
    p=params,
    costs=st.lists(cost_values, min_size=1, max_size=5),
    llm_pick=st.one_of(st.none(), st.integers(0, 4)),
    fallback_pick=st.one_of(st.none(), st.integers(0, 4)),
    theta=thetas,
    agg=aggregations,
    queries=st.lists(query_tags, min_size=1, max_size=6),
    live=st.booleans(),
    data=st.data(),
)
def test_decisions_among_a_subset_equal_reference(
    records, p, costs, llm_pick, fallback_pick, theta, agg, queries, live, data
):
    _, decider, _, r_decider = build_pair(records, p, costs, llm_pick, theta, fallback_pick, agg)
    if live:
        decider = decider.to_live()
    each = [data.draw(subsets(decider.models)) for _ in queries]
    for tags, among in zip(queries, each, strict=True):
        want = r_decider.decide(tags, among)
        d = decider.decide(tags, among=among)
        same_decision(d, want)
        assert d.model in among
        assert decider.route_tags(tags, among=among) == want["model"]
        assert r_decider.route_tags(tags, among) == want["model"]
    want_models = r_decider.route_tags_batch(queries, each)
    assert decider.route_tags_batch(queries, among_each=each) == want_models
    cols = decider.decide_batch(queries, among_each=each)
    index = {m: i for i, m in enumerate(decider.models)}
    for q, (tags, among) in enumerate(zip(queries, each, strict=True)):
        d = decider.decide(tags, among=among)
        assert cols.model[q] == index[d.model]
        assert same_float(float(cols.delta[q]), d.delta)
        assert cols.slm[q] == (-1 if d.slm is None else index[d.slm])
        assert cols.top[q] == index[d.argmax]
        assert cols.n_known[q] == len(d.known_tags)
    # One subset for the whole batch.
    one = each[0]
    assert decider.route_tags_batch(queries, among=one) == [
        r_decider.route_tags(t, one) for t in queries
    ]
    np.testing.assert_array_equal(
        decider.decide_batch(queries, among=one).model,
        decider.decide_batch(queries, among_each=[one] * len(queries)).model,
    )


@PROFILE
@given(
    records=record_sets(),
    p=params,
    costs=st.lists(cost_values, min_size=1, max_size=5),
    llm_pick=st.one_of(st.none(), st.integers(0, 4)),
    fallback_pick=st.one_of(st.none(), st.integers(0, 4)),
    theta=thetas,
    agg=aggregations,
    queries=st.lists(query_tags, min_size=1, max_size=6),
    data=st.data(),
)
def test_a_subset_decides_like_a_decider_built_over_it(
    records, p, costs, llm_pick, fallback_pick, theta, agg, queries, data
):
    scorer, decider, _, r_decider = build_pair(
        records, p, costs, llm_pick, theta, fallback_pick, agg
    )
    among = data.draw(subsets(decider.models))
    _, llm, fallback = r_decider.roles(among)
    sub = TagDecider(
        scorer,
        {m: decider.costs[m] for m in among},
        llm=llm,
        theta=theta,
        fallback=fallback,
        aggregation=agg,
    )
    for tags in queries:
        d, w = decider.decide(tags, among=among), sub.decide(tags)
        same_dict(d, w)


@PROFILE
@given(
    records=record_sets(),
    p=params,
    costs=st.lists(cost_values, min_size=1, max_size=5),
    llm_pick=st.one_of(st.none(), st.integers(0, 4)),
    fallback_pick=st.one_of(st.none(), st.integers(0, 4)),
    theta=thetas,
    agg=aggregations,
    queries=st.lists(query_tags, min_size=1, max_size=6),
)
def test_every_candidate_listed_is_the_unrestricted_decision(
    records, p, costs, llm_pick, fallback_pick, theta, agg, queries
):
    _, decider, _, _ = build_pair(records, p, costs, llm_pick, theta, fallback_pick, agg)
    everyone = list(reversed(decider.models))
    for tags in queries:
        d, w = decider.decide(tags, among=everyone), decider.decide(tags)
        same_dict(d, w)
        assert d.explain() == w.explain()
    assert decider.route_tags_batch(queries, among=everyone) == decider.route_tags_batch(queries)
    a, b = decider.decide_batch(queries, among=everyone), decider.decide_batch(queries)
    for col in ("model", "delta", "slm", "top", "n_known"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))


def three_models() -> TagDecider:
    # Poem: big wins, mid ties, small loses; Math: small wins, the others lose.
    records = [
        ("q1", ["Poem"], "big", "win"),
        ("q1", ["Poem"], "mid", "tie"),
        ("q1", ["Poem"], "small", "loss"),
        ("q2", ["Math"], "big", "loss"),
        ("q2", ["Math"], "mid", "loss"),
        ("q2", ["Math"], "small", "win"),
    ]
    scorer = TagScorer.from_records(records)
    return TagDecider(scorer, {"big": 10.0, "mid": 3.0, "small": 1.0}, fallback="small")


def test_roles_move_to_the_subset():
    d = three_models()
    # M_LLM (big) excluded: the most expensive allowed (mid) takes its role.
    x = d.decide(["Poem"], among={"mid", "small"})
    assert (x.model, x.llm, x.slm, x.argmax) == ("mid", "mid", "small", "mid")
    assert x.scores.keys() == {"mid", "small"}
    assert all(row.keys() == {"mid", "small"} for row in x.contributions.values())
    # The fallback (small) allowed stays the fallback; excluded, M_LLM of the subset takes it.
    assert d.route_tags(["Haiku"], among=["small", "big"]) == "small"
    fb = d.decide(["Haiku"], among=("big", "mid"))
    assert (fb.model, fb.reason, fb.llm) == ("big", "fallback", "big")
    # One candidate takes every query.
    one = d.decide(["Poem"], among=["small"])
    assert (one.model, one.reason, one.slm) == ("small", "argmax", None)
    assert "restricted to 1 of 3 candidates" in one.explain()
    assert "restricted" not in d.decide(["Poem"]).explain()


def test_live_decider_decides_among_its_current_counts():
    d = three_models().to_live()
    assert d.route_tags(["Poem"], among=["mid", "small"]) == "mid"
    d.learn([(["Poem"], "small", "win")] * 3)
    assert d.route_tags(["Poem"], among=["mid", "small"]) == "small"
    assert d.decide(["Poem"], among=["mid", "small"]).model == "small"


def test_bad_subsets_are_refused():
    d = three_models()
    with pytest.raises(UnknownModelError, match=r"unknown model 'huge'; known models: \['big'"):
        d.route_tags(["Poem"], among=["mid", "huge"])
    # A model of the store that is not a candidate is not allowed either.
    scorer = TagScorer.from_records([("q", ["t"], m, "win") for m in ("a", "b", "c")])
    with pytest.raises(UnknownModelError, match="'c'"):
        TagDecider(scorer, {"a": 1.0, "b": 2.0}).decide(["t"], among=["c"])
    for call in (
        lambda: d.route_tags(["Poem"], among=[]),
        lambda: d.decide(["Poem"], among=set()),
        lambda: d.route_tags_batch([["Poem"]], among=()),
        lambda: d.decide_batch([["Poem"], ["Math"]], among_each=[None, []]),
    ):
        with pytest.raises(NoCandidateError, match="allowed set is empty"):
            call()
    assert issubclass(NoCandidateError, TagRouterError)
    with pytest.raises(TypeError, match="not a str"):
        d.route_tags(["Poem"], among="mid")
    with pytest.raises(TypeError, match="must be str, got int"):
        d.decide(["Poem"], among=["mid", 3])
    with pytest.raises(TypeError, match="not a str"):
        d.decide_batch([["Poem"]], among_each="mid")
    with pytest.raises(ValueError, match="at most one of among"):
        d.route_tags_batch([["Poem"]], among=["mid"], among_each=[["mid"]])
    with pytest.raises(ValueError, match="among_each has 1 entries for 2 queries"):
        d.decide_batch([["Poem"], ["Math"]], among_each=[["mid"]])


def test_among_each_mixes_subsets_and_none():
    d = three_models()
    queries = [["Poem"], ["Poem"], ["Math"], ["Haiku"]]
    shared = ["mid", "small"]
    each = [shared, shared, None, iter(["big", "mid"])]  # any iterable of names
    assert d.route_tags_batch(queries, among_each=each) == [
        "mid",
        "mid",
        d.route_tags(["Math"]),
        "big",
    ]
    assert d.route_tags_batch(queries, among_each=(None for _ in queries)) == (
        d.route_tags_batch(queries)
    )
