"""Theta selection (paper G.2) on hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest

from tagrouter_fast.core import (
    DecisionArrays,
    TagDecider,
    TagScorer,
    sweep_theta,
    theta_for_llm_share,
)


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


# ==== over decision columns (several deciders, one sweep) ====


def test_sweep_theta_over_columns_equals_select_theta(decider):
    accepted = np.array([[True, False], [False, True], [False, True], [True, False]])
    cost = np.array([[10.0, 1.0], [9.0, 2.0], [10.0, 1.0], [8.0, 3.0]])
    via_decider = decider.select_theta(QUERIES, accepted, cost)
    cols = decider.decide_batch(QUERIES)
    llm = decider.models.index(decider.llm)
    found = sweep_theta(cols, accepted, cost, llm)
    assert (found.theta, found.accept_rate, found.mean_cost, found.llm_share) == (
        via_decider.theta,
        via_decider.accept_rate,
        via_decider.mean_cost,
        via_decider.llm_share,
    )
    np.testing.assert_array_equal(found.mean_costs, via_decider.mean_costs)
    assert theta_for_llm_share(cols, llm, 0.5) == decider.theta_for_llm_share(QUERIES, 0.5)


def test_sweep_theta_over_columns_of_two_deciders(decider):
    # Out-of-fold style: each half routed by its own decider, the columns put together.
    other = TagDecider(
        TagScorer.from_records([("q", ["t1"], "big", "loss"), ("q", ["t1"], "small", "win")]),
        decider.costs,
    )
    a, b = decider.decide_batch(QUERIES[:2]), other.decide_batch([["t1"], ["zzz"]])
    cols = DecisionArrays(
        *(
            np.concatenate([x, y])
            for x, y in zip(
                (a.model, a.delta, a.slm, a.top, a.n_known),
                (b.model, b.delta, b.slm, b.top, b.n_known),
                strict=True,
            )
        )
    )
    assert np.isnan(cols.delta[3]) and cols.slm[3] == -1  # no known tag: stays on its model
    accepted = np.array([[True, False], [False, True], [False, True], [True, True]])
    found = sweep_theta(cols, accepted, np.array([10.0, 1.0]), 0)
    # Deltas -2, -1.15 (first decider), +2 (other's t1): theta between -2 and -1.15 routes
    # q0 to big and q1, q2 to small; q3 falls back to big.
    assert found.accept_rate == 1.0 and found.theta == pytest.approx(-1.575)
    assert found.llm_share == 0.5 and found.mean_cost == pytest.approx((10 + 1 + 1 + 10) / 4)


def test_sweep_theta_checks_the_columns(decider):
    cols = decider.decide_batch(QUERIES)
    ok = np.ones((4, 2), dtype=bool)
    c = np.array([10.0, 1.0])

    def with_(**kw):
        return DecisionArrays(**{**cols.__dict__, **kw})

    with pytest.raises(ValueError, match=r"model\[0\] = 2 is not a model column in 0..2"):
        sweep_theta(with_(model=np.array([2, 0, 1, 1])), ok, c, 0)
    with pytest.raises(ValueError, match="slm is -1 exactly when delta is NaN"):
        sweep_theta(with_(slm=np.array([-1, 1, 1, 1])), ok, c, 0)
    with pytest.raises(ValueError, match="slm is -1 exactly when delta is NaN"):
        sweep_theta(with_(delta=np.array([np.nan, 1.0, 1.0, 1.0])), ok, c, 0)
    with pytest.raises(ValueError, match=r"slm\[0\] = 1 is llm"):
        sweep_theta(cols, ok, c, 1)
    with pytest.raises(ValueError, match="mismatched lengths"):
        sweep_theta(with_(slm=np.array([1, 1, 1])), ok, c, 0)
    with pytest.raises(ValueError, match="mismatched lengths"):
        sweep_theta(cols, ok[:3], c, 0)
    with pytest.raises(ValueError, match="mismatched lengths: cost"):
        sweep_theta(cols, ok, np.ones(3), 0)
    with pytest.raises(ValueError, match="llm = 2 is not a model column"):
        sweep_theta(cols, ok, c, 2)
    with pytest.raises(TypeError, match="llm must be a column index"):
        sweep_theta(cols, ok, c, "big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="share must be in"):
        theta_for_llm_share(cols, 0, float("nan"))
