"""Metrics of the evaluation on hand-computable cases."""

from __future__ import annotations

import numpy as np
import pytest

from tagrouter_fast.eval import metrics as M


def _curve_areas(ratio: np.ndarray, ar: np.ndarray, ar_llm: float) -> tuple[float, float]:
    """The numpy areas the evaluation used before it read the core's: the trapezoid under
    the curve, and the exact area of the curve above ``ar_llm`` (the oracle of the check)."""
    dx, y = np.diff(ratio), ar - ar_llm
    auc = float(np.sum(dx * (ar[1:] + ar[:-1]) / 2))
    pauc = 0.0
    for w, y0, y1 in zip(dx, y[:-1], y[1:], strict=True):
        if y0 >= 0 and y1 >= 0:
            pauc += w * (y0 + y1) / 2
        elif (y0 > 0) != (y1 > 0):
            top = max(y0, y1)
            pauc += w * top * top / (2 * (abs(y0) + abs(y1)))
    return auc, pauc


def test_areas_of_straight_line_is_mean_of_endpoints():
    # Constant preference: one step from all-small (AR 0.2) to all-M_LLM (AR 0.6).
    acc_llm = np.array([1.0, 1, 1, 0, 0])
    acc_slm = np.array([1.0, 0, 0, 0, 0])
    auc, pauc = M.areas(np.zeros(5), acc_llm, acc_slm)
    assert auc == pytest.approx(0.4)
    assert pauc == pytest.approx(0.0, abs=1e-12)  # never above always-M_LLM


def test_areas_of_a_tent_above_the_llm_line():
    # AR 0.2 -> 0.6 -> 0.4 at ratios 0, 0.5, 1 (accept may be fractional, e.g. a graded score).
    pref = np.array([2.0, 1.0])
    auc, pauc = M.areas(pref, np.array([0.8, 0.0]), np.array([0.0, 0.4]))
    assert auc == pytest.approx(0.5 * (0.2 + 0.6) / 2 + 0.5 * (0.6 + 0.4) / 2)
    # Crossing AR_LLM = 0.4 at 0.25, ending on it: 0.25 * 0.2 / 2 + 0.5 * 0.2 / 2.
    assert pauc == pytest.approx(0.025 + 0.05)
    # Below the line everywhere: no PAUC.
    assert M.areas(pref, np.array([0.8, 0.0]), np.array([0.0, 0.4]), ar_llm=0.9)[1] == 0.0


def test_areas_equal_the_numpy_trapezoid_of_the_curve():
    # The equality check of the switch to the core's areas: on random routers with tied and
    # infinite preferences, the Rust areas equal the numpy areas of the same sweep's curve.
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        pref = rng.choice([-np.inf, -1.0, 0.0, 0.5, 2.0, np.inf], n) + (
            rng.normal(size=n) if rng.random() < 0.5 else 0.0
        )
        acc_llm = (rng.random(n) < rng.random()).astype(float)
        acc_slm = (rng.random(n) < rng.random()).astype(float)
        c = M.sweep(pref, acc_llm, acc_slm)
        want = _curve_areas(c.ratio, c.ar, float(acc_llm.mean()))
        got = M.areas(pref, acc_llm, acc_slm)
        assert got == pytest.approx(want, abs=1e-12)


def test_apgr_and_cpt_on_linear_curve():
    r, y = np.array([0.0, 1.0]), np.array([0.2, 0.4])
    area, _ = _curve_areas(r, y, 0.4)
    # A straight line from weak to strong recovers half the gap on average.
    assert M.apgr(area, 0.2, 0.4) == pytest.approx(0.5)
    assert M.cpt(r, y, 0.2, 0.4, 0.5) == pytest.approx(0.5)
    assert M.cpt(r, y, 0.2, 0.4, 0.25) == pytest.approx(0.25)


def test_apgr_cpt_nan_when_strong_not_better():
    assert np.isnan(M.apgr(0.3, 0.4, 0.4))
    assert np.isnan(M.cpt(np.array([0.0, 1.0]), np.array([0.4, 0.3]), 0.4, 0.3))


def test_cpt_concave_curve_reaches_target_early():
    r = np.array([0.0, 0.2, 1.0])
    y = np.array([0.2, 0.4, 0.4])
    assert M.cpt(r, y, 0.2, 0.4, 0.5) == pytest.approx(0.1)


def test_aiq_uses_upper_hull_and_flat_extension():
    cost = np.array([1.0, 2.0, 3.0])
    ar = np.array([0.2, 0.1, 0.5])  # the middle point lies under the hull
    # Hull: (1, 0.2) -> (3, 0.5); average over [1, 3] = (0.2 + 0.5) / 2.
    assert M.aiq(cost, ar, 1.0, 3.0) == pytest.approx(0.35)
    # Beyond the last point the hull is held flat: over [1, 5] add 2 * 0.5.
    assert M.aiq(cost, ar, 1.0, 5.0) == pytest.approx((0.7 + 1.0) / 4)


def test_sweep_orders_by_preference_and_groups_ties():
    pref = np.array([3.0, 1.0, 1.0, -2.0])
    acc_llm = np.array([1, 0, 1, 0])
    acc_slm = np.array([0, 0, 0, 1])
    c = M.sweep(pref, acc_llm, acc_slm, np.full(4, 10.0), np.ones(4))
    # Groups: {0}, {1, 2}, {3}: four points, all-small to all-large.
    assert c.ratio.tolist() == [0.0, 0.25, 0.75, 1.0]
    assert c.ar.tolist() == pytest.approx([0.25, 0.5, 0.75, 0.5])
    assert c.cost.tolist() == pytest.approx([1.0, 3.25, 7.75, 10.0])
    # Each threshold reproduces its point: pref > t routes exactly the first groups.
    for k, t in enumerate(c.thresholds):
        assert (pref > t).mean() == pytest.approx(c.ratio[k])


def test_constant_preference_is_the_straight_line():
    rng = np.random.default_rng(0)
    a, b = rng.random(50) < 0.3, rng.random(50) < 0.6
    c = M.sweep(np.zeros(50), a, b)
    assert len(c.ratio) == 2
    assert M.areas(np.zeros(50), a, b)[0] == pytest.approx((a.mean() + b.mean()) / 2)


def test_batch_auc_matches_explicit_resample():
    rng = np.random.default_rng(1)
    n = 40
    pref = rng.integers(0, 8, n).astype(float)
    acc_llm = rng.random(n) < 0.5
    acc_slm = rng.random(n) < 0.3
    w = rng.multinomial(n, np.full(n, 1 / n), size=5).astype(float)
    ar_llm = (w * acc_llm).sum(1) / w.sum(1)
    a, p = M.batch_auc_pauc(pref, acc_llm, acc_slm, w, ar_llm)
    for b in range(5):
        idx = np.repeat(np.arange(n), w[b].astype(int))
        c = M.sweep(pref[idx], acc_llm[idx], acc_slm[idx])
        auc, pauc = _curve_areas(c.ratio, c.ar, acc_llm[idx].mean())
        assert a[b] == pytest.approx(auc)
        assert p[b] == pytest.approx(pauc)


def test_operating_point_rank_is_two_minus_ar():
    op = M.operating_point(
        np.array([True, False, False, True]),
        np.array([1, 1, 0, 0]),
        np.array([0, 1, 1, 1]),
        np.full(4, 4.0),
        np.ones(4),
    )
    assert op["ar"] == pytest.approx(0.75)
    assert op["rank"] == pytest.approx(1.25)
    assert op["cost"] == pytest.approx(2.5)
    assert op["ratio"] == pytest.approx(0.5)
