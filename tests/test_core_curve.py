"""The one threshold sweep (Rust `curve.rs`): the curve equals the numpy oracle
(`_reference.sweep_curve`) to the last bit on random inputs with ties and infinities, and the theta
search over decision columns, which runs on the same sweep, equals brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tagrouter_fast import _reference as ref
from tagrouter_fast.core import (
    DecisionArrays,
    sweep_curve,
    sweep_theta,
    theta_for_llm_share,
    weighted_areas,
)
from tagrouter_fast.eval import metrics as M

PROFILE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Few distinct values, so that preferences tie; both zeros and both infinities.
# 5e-324 is the float next to 0: no midpoint between them.
PREFS = st.sampled_from(
    [-np.inf, -3.5, -1.0, -5e-324, -0.0, 0.0, 5e-324, 0.25, 1.0, 2.0, 1e300, 1.7e308, np.inf]
)
FLOATS = st.floats(0.0, 1e4, allow_nan=False, allow_infinity=False)


@st.composite
def curve_inputs(draw):
    n = draw(st.integers(1, 60))
    ints = draw(st.booleans())
    pref = np.array(draw(st.lists(PREFS | st.floats(-10, 10), min_size=n, max_size=n)))
    acc = st.sampled_from([0.0, 1.0]) if ints else st.floats(0, 1)
    a_llm = np.array(draw(st.lists(acc, min_size=n, max_size=n)))
    a_slm = np.array(draw(st.lists(acc, min_size=n, max_size=n)))
    costs = None
    if draw(st.booleans()):
        costs = (
            np.array(draw(st.lists(FLOATS, min_size=n, max_size=n))),
            np.array(draw(st.lists(FLOATS, min_size=n, max_size=n))),
        )
    return pref, a_llm, a_slm, costs


@PROFILE
@given(curve_inputs())
def test_curve_equals_numpy_reference_bit_for_bit(inputs):
    pref, a_llm, a_slm, costs = inputs
    args = (pref, a_llm, a_slm) if costs is None else (pref, a_llm, a_slm, *costs)
    got = sweep_curve(*args)
    want = ref.sweep_curve(*args)
    for name, g, w in zip(("ratio", "ar", "cost", "thresholds"), got, want, strict=True):
        assert g.dtype == np.float64 and g.shape == w.shape, name
        # Same operations in the same order (pairwise base means as np.mean does): same bits.
        np.testing.assert_array_equal(g, w, err_msg=name)
    # And metrics.sweep is that curve.
    c = M.sweep(*args)
    np.testing.assert_array_equal(c.thresholds, want[3])
    # Each threshold routes exactly its point's queries to M_LLM.
    clamped = np.maximum(pref, -1e300)
    for t, r in zip(c.thresholds, c.ratio, strict=True):
        assert (clamped > t).mean() == r


def test_curve_large_input_equals_reference():
    # Above numpy's pairwise block (128) and over several halvings.
    rng = np.random.default_rng(7)
    n = 50_000
    pref = rng.integers(0, 500, n).astype(float)
    pref[rng.integers(0, n, 100)] = np.inf
    args = (pref, rng.random(n) < 0.5, rng.random(n) < 0.6, rng.random(n) * 3, rng.random(n))
    for g, w in zip(sweep_curve(*args), ref.sweep_curve(*args), strict=True):
        np.testing.assert_array_equal(g, w)


def test_curve_errors():
    with pytest.raises(ValueError, match="empty test set"):
        sweep_curve(np.array([]), np.array([]), np.array([]))
    with pytest.raises(ValueError, match="mismatched lengths"):
        sweep_curve(np.zeros(2), np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match=r"pref\[1\] is NaN"):
        sweep_curve(np.array([0.0, np.nan]), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="must be 1-D"):
        sweep_curve(np.zeros((2, 2)), np.zeros(2), np.zeros(2))


def test_curve_takes_strided_and_integer_input():
    pref = np.arange(10.0)[::2]
    a = np.array([1, 0, 1, 0, 1])
    for g, w in zip(sweep_curve(pref, a, a[::-1]), ref.sweep_curve(pref, a, a[::-1]), strict=True):
        np.testing.assert_array_equal(g, w)


# ==== theta over decision columns ====


@st.composite
def labelled_columns(draw):
    """Decision columns as several deciders would give them: m models, column `llm` is M_LLM,
    some queries threshold-free (slm = -1, delta NaN), deltas with ties."""
    m = draw(st.integers(1, 4))
    llm = draw(st.integers(0, m - 1))
    n = draw(st.integers(1, 40))
    others = [j for j in range(m) if j != llm]
    model, delta, slm = [], [], []
    for _ in range(n):
        if others and draw(st.integers(0, 4)) > 0:
            s = draw(st.sampled_from(others))
            d = draw(st.sampled_from([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0]) | st.floats(-5, 5))
            model.append(s if d >= 0 else llm)
            delta.append(d)
            slm.append(s)
        else:
            model.append(draw(st.integers(0, m - 1)))
            delta.append(np.nan)
            slm.append(-1)
    cols = DecisionArrays(
        model=np.array(model),
        delta=np.array(delta),
        slm=np.array(slm),
        top=np.array(model),
        n_known=np.ones(n, dtype=np.int64),
    )
    accept = np.array(draw(st.lists(st.booleans(), min_size=n * m, max_size=n * m))).reshape(n, m)
    # Small integer costs: every sum is exact, so even the cost tie-break is checked exactly.
    cost = np.array(draw(st.lists(st.integers(0, 20), min_size=n * m, max_size=n * m)), float)
    return cols, accept, cost.reshape(n, m), llm


def brute_force(cols, accept, cost, llm, theta):
    n = len(cols)
    routed = np.array(
        [
            cols.model[q] if cols.slm[q] < 0 else (cols.slm[q] if cols.delta[q] >= theta else llm)
            for q in range(n)
        ]
    )
    r = np.arange(n)
    return accept[r, routed].mean(), cost[r, routed].sum() / n, (routed == llm).mean()


@PROFILE
@given(labelled_columns(), st.lists(st.floats(-6, 6), max_size=5))
def test_theta_sweep_equals_brute_force(labelled, extra):
    cols, accept, cost, llm = labelled
    default = sweep_theta(cols, accept, cost, llm)
    grid = np.r_[default.thetas, extra]
    found = sweep_theta(cols, accept, cost, llm, grid)
    want = np.array([brute_force(cols, accept, cost, llm, t) for t in grid])
    np.testing.assert_array_equal(found.thetas, grid)
    np.testing.assert_array_equal(found.accept_rates, want[:, 0])
    np.testing.assert_array_equal(found.mean_costs, want[:, 1])
    np.testing.assert_array_equal(found.llm_shares, want[:, 2])
    # The best: highest AR, then lowest cost, then |theta|, then theta.
    keys = [(-a, c, abs(t), t) for (a, c, _), t in zip(want, grid, strict=True)]
    assert found.theta == grid[min(range(len(grid)), key=keys.__getitem__)]
    # The default grid reaches every outcome a theta can give.
    assert default.accept_rate == found.accept_rate
    # Per-model costs are per-query costs broadcast.
    if (cost == cost[0]).all():
        per_model = sweep_theta(cols, accept, cost[0], llm, grid)
        np.testing.assert_array_equal(per_model.mean_costs, found.mean_costs)


@PROFILE
@given(labelled_columns(), st.floats(0, 1))
def test_theta_for_share_is_the_largest_share_within_budget(labelled, share):
    cols, accept, cost, llm = labelled
    theta = theta_for_llm_share(cols, llm, share)
    got = brute_force(cols, accept, cost, llm, theta)[2]
    shares = {brute_force(cols, accept, cost, llm, t)[2] for t in np.r_[cols.delta, np.inf]}
    fixed = np.mean((cols.slm < 0) & (cols.model == llm))
    if fixed > share + 1e-9:
        # The threshold-free queries alone exceed the budget: everything else to M_SLM.
        assert got == fixed
    else:
        assert got <= share + 1e-9
        assert got == max(s for s in shares if s <= share + 1e-9)


@PROFILE
@given(curve_inputs(), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_weighted_areas_equal_the_numpy_oracle(inputs, n_boot, seed):
    # The paired bootstrap's AUC/PAUC under many resamples: the Rust pass equals the vectorised
    # numpy oracle, and a unit weighting equals the area of the plain curve.
    pref, a_llm, a_slm, _ = inputs
    n = len(pref)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    w[0] = 1.0
    ar_llm = (w * a_llm).sum(axis=1) / w.sum(axis=1)
    got = weighted_areas(pref, a_llm, a_slm, w, ar_llm)
    want = ref.batch_auc_pauc(np.maximum(pref, -1e300), a_llm, a_slm, w, ar_llm)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
    ratio, ar, _, _ = sweep_curve(pref, a_llm, a_slm)
    trapezoid = float(np.sum(np.diff(ratio) * (ar[1:] + ar[:-1]) / 2))
    assert got[0][0] == pytest.approx(trapezoid, abs=1e-12)


def test_weighted_areas_refuse_bad_input():
    one = np.ones(3)
    with pytest.raises(ValueError, match="weights has shape"):
        weighted_areas(one, one, one, np.ones((2, 4)), np.ones(2))
    with pytest.raises(ValueError, match="sums to 0"):
        weighted_areas(one, one, one, np.zeros((1, 3)), np.ones(1))
    with pytest.raises(ValueError, match="NaN"):
        weighted_areas(np.array([1.0, np.nan, 0.0]), one, one, np.ones((1, 3)), np.ones(1))
