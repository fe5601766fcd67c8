"""Theta selection (paper G.2) on hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest

from tagrouter_fast.core import TagDecider, TagScorer


@pytest.fixture
def decider() -> TagDecider:
    # Tags whose Delta (small - big) is clearly ordered: t1 < t2 < 0 < t3 < t4.
    records = []
    for tag, (big, small) in {
        "t1": ("win", "loss"),
        "t2": ("tie", "loss"),
        "t3": ("loss", "tie"),
        "t4": ("loss", "win"),
    }.items():
        records += [(tag, [tag], "big", big), (tag, [tag], "small", small)]
    return TagDecider(
        TagScorer.from_records(records, weighting="none"), {"big": 10.0, "small": 1.0}
    )


QUERIES = [["t1"], ["t2"], ["t3"], ["t4"]]


def test_deltas(decider):
    # weighting="none": Delta = sum of outcome scores, small minus big.
    np.testing.assert_allclose(decider.deltas_batch(QUERIES), [-2.0, -1.15, 1.15, 2.0])
    assert decider.route_tags_batch(QUERIES) == ["big", "big", "small", "small"]


def test_grid_search_maximises_accept_rate(decider):
    # The small model is acceptable on t2, t3, t4 (say); the big one on t1 only.
    accepted = [
        {"big": "win", "small": "loss"},
        {"big": "loss", "small": "tie"},
        {"big": "loss", "small": "win"},
        {"big": "loss", "small": "win"},
    ]
    found = decider.select_theta(QUERIES, accepted)
    # Default grid: the lowest delta, midpoints, just above the highest.
    np.testing.assert_allclose(found.thetas[:4], [-2.0, -1.575, 0.0, 1.575])
    assert found.thetas[4] > 2.0
    np.testing.assert_allclose(found.accept_rates, [0.75, 1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(found.llm_shares, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert found.theta == pytest.approx(-1.575)
    assert (found.accept_rate, found.llm_share) == (1.0, 0.25)
    assert found.mean_cost == pytest.approx((10 + 1 + 1 + 1) / 4)


def test_ties_in_accept_rate_go_to_the_cheaper_theta(decider):
    everyone_fine = np.ones((4, 2), dtype=bool)
    found = decider.select_theta(QUERIES, everyone_fine)
    assert found.accept_rate == 1.0
    assert found.llm_share == 0.0  # all on the cheap model
    assert found.mean_cost == 1.0


def test_per_query_costs_and_explicit_grid(decider):
    accepted = np.ones((4, 2), dtype=bool)
    # Here the "small" model is dearer on every query: the search keeps everything on big.
    cost = np.array([[1.0, 5.0]] * 4)
    found = decider.select_theta(QUERIES, accepted, cost, grid=[-3.0, 0.0, 3.0])
    assert found.theta == 3.0 and found.mean_cost == 1.0
    np.testing.assert_allclose(found.mean_costs, [5.0, 3.0, 1.0])


def test_theta_for_target_share(decider):
    for share, routed_big in [(0.0, 0), (0.25, 1), (0.5, 2), (0.6, 2), (0.75, 3), (1.0, 4)]:
        theta = decider.theta_for_llm_share(QUERIES, share)
        routed = decider.with_theta(theta).route_tags_batch(QUERIES)
        assert routed.count("big") == routed_big, (share, theta)


def test_target_share_counts_fallback_queries(decider):
    # Two of five queries have no known tag and fall back to big: a 40% share is already spent.
    queries = [*QUERIES[:3], ["zzz"], []]
    theta = decider.theta_for_llm_share(queries, 0.5)
    routed = decider.with_theta(theta).route_tags_batch(queries)
    assert routed.count("big") == 2
    assert (
        decider.with_theta(decider.theta_for_llm_share(queries, 0.8))
        .route_tags_batch(queries)
        .count("big")
        == 4
    )


def test_mean_aggregation_puts_theta_on_the_per_tag_scale(decider):
    mean = TagDecider(decider.scorer, decider.costs, aggregation="mean")
    # Each query doubled up with another tag of the same sign: the sums double, the means not.
    pairs = [["t1", "t2"], ["t3", "t4"], ["t1", "t4"]]
    np.testing.assert_allclose(decider.deltas_batch(pairs), [-3.15, 3.15, 0.0])
    np.testing.assert_allclose(mean.deltas_batch(pairs), [-1.575, 1.575, 0.0])
    found = mean.select_theta(pairs, np.array([[True, False], [False, True], [True, False]]))
    # The grid comes from the mean deltas; the best keeps the mixed query on big.
    np.testing.assert_allclose(found.thetas[:3], [-1.575, -0.7875, 0.7875])
    assert found.accept_rate == 1.0 and found.theta == pytest.approx(0.7875)
    theta = mean.theta_for_llm_share(pairs, 1 / 3)
    assert mean.with_theta(theta).route_tags_batch(pairs) == ["big", "small", "small"]
