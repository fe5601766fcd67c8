"""Metrics of the evaluation on hand-computable cases."""

from __future__ import annotations

import numpy as np
import pytest

from tagrouter_fast.eval import metrics as M


def test_auc_of_straight_line_is_mean_of_endpoints():
    assert M.auc(np.array([0.0, 1.0]), np.array([0.2, 0.6])) == pytest.approx(0.4)


def test_auc_of_tent_curve():
    # Triangle on top of a 0.2 floor: 0.2 + 0.5 * 1 * 0.4
    assert M.auc(np.array([0.0, 0.5, 1.0]), np.array([0.2, 0.6, 0.2])) == pytest.approx(0.4)


def test_auc_requires_full_span():
    with pytest.raises(ValueError):
        M.auc(np.array([0.0, 0.5]), np.array([0.1, 0.2]))


def test_pauc_counts_only_area_above_llm_line():
    r = np.array([0.0, 0.5, 1.0])
    # Entirely below the line: nothing.
    assert M.pauc(r, np.array([0.1, 0.2, 0.4]), 0.4) == 0.0
    # Tent reaching 0.2 above the line at 0.5, crossing it at 0.25 and ending on it:
    # left triangle 0.25 * 0.2 / 2, right triangle 0.5 * 0.2 / 2.
    assert M.pauc(r, np.array([0.2, 0.6, 0.4]), 0.4) == pytest.approx(0.025 + 0.05)


def test_apgr_and_cpt_on_linear_curve():
    r, y = np.array([0.0, 1.0]), np.array([0.2, 0.4])
    area = M.auc(r, y)
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
    assert M.auc(c.ratio, c.ar) == pytest.approx((a.mean() + b.mean()) / 2)


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
        assert a[b] == pytest.approx(M.auc(c.ratio, c.ar))
        assert p[b] == pytest.approx(M.pauc(c.ratio, c.ar, acc_llm[idx].mean()))


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
