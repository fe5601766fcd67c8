"""The builder's tuning reads the core's AUC (`tagrouter_fast.curve.sweep_auc`).

Tuning used to integrate its own trapezoid over a theta sweep (`_oof_trapezoid_auc` below, kept
as the oracle): the core's AUC must give the same numbers, so the pseudo-count it picks is the
one it picked before.
"""

from __future__ import annotations

import numpy as np
import pytest

from tagrouter_fast.builder.tune import curve_auc, preferences
from tagrouter_fast.curve import DecisionArrays, sweep_auc, sweep_curve, sweep_theta


def _oof_trapezoid_auc(
    d: DecisionArrays, accept: np.ndarray, cost: np.ndarray, llm: int
) -> float:
    """The tuning's former AUC: queries without a Delta_q moved to +-1e300 on the Delta_q
    axis, one theta sweep over the distinct thresholds, trapezoid of accept rate over share."""
    mean = cost.mean(axis=0)
    slms = [j for j in range(cost.shape[1]) if j != llm]
    fallback = min(slms, key=lambda j: mean[j]) if slms else llm
    pref, slm = preferences(d, llm, fallback)
    delta = np.clip(-pref, -1e300, 1e300)
    ext = DecisionArrays(
        model=np.where(delta < 0, llm, slm).astype(np.int64),
        delta=delta,
        slm=slm,
        top=d.top,
        n_known=d.n_known,
    )
    s = sweep_theta(ext, accept, cost, llm)
    order = np.argsort(s.llm_shares, kind="stable")
    x, y = s.llm_shares[order], s.accept_rates[order]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _random_decisions(
    rng: np.random.Generator, ties: bool
) -> tuple[DecisionArrays, np.ndarray, np.ndarray, int]:
    n, m = int(rng.integers(1, 80)), int(rng.integers(2, 5))
    llm = int(rng.integers(0, m))
    values = (
        rng.choice([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0], size=n) if ties else rng.normal(size=n)
    )
    free = rng.random(n) < 0.2  # no known tag: no Delta_q, routed to the fallback
    delta = np.where(free, np.nan, values)
    slm = np.where(free, -1, rng.choice([j for j in range(m) if j != llm], size=n))
    model = np.where(free, rng.integers(0, m, size=n), np.where(delta >= 0, slm, llm))
    d = DecisionArrays(
        model=model.astype(np.int64),
        delta=delta,
        slm=slm.astype(np.int64),
        top=model.astype(np.int64),
        n_known=(~free).astype(np.int64),
    )
    return d, rng.random((n, m)) < 0.6, rng.random((n, m)) * 10, llm


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
def test_core_auc_equals_the_former_trapezoid(ties: bool) -> None:
    rng = np.random.default_rng(11 + ties)
    gaps = []
    for _ in range(400):
        d, accept, cost, llm = _random_decisions(rng, ties)
        gaps.append(abs(curve_auc(d, accept, cost, llm) - _oof_trapezoid_auc(d, accept, cost, llm)))
    # The same area summed in another order: a few ulps apart, never more. Two different
    # curves' AUCs on n queries differ by a multiple of 1 / (2 n^2), far above this.
    assert max(gaps) < 1e-14


def test_sweep_auc_is_the_trapezoid_under_sweep_curve() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 50))
        pref = rng.choice([-np.inf, -1.0, 0.0, 0.5, 2.0, np.inf], size=n)
        acc_llm, acc_slm = rng.random(n) < 0.7, rng.random(n) < 0.5
        ratio, ar, _, _ = sweep_curve(pref, acc_llm, acc_slm)
        assert ratio[0] == 0.0 and ratio[-1] == 1.0
        trapezoid = float(np.sum(np.diff(ratio) * (ar[1:] + ar[:-1]) / 2))
        assert sweep_auc(pref, acc_llm, acc_slm) == pytest.approx(trapezoid, abs=1e-14)


def test_sweep_auc_by_hand() -> None:
    # All small: AR 1/3; the first query to M_LLM: 2/3; both others (tied) too: 2/3.
    pref = np.array([5.0, 1.0, 1.0])
    acc_llm, acc_slm = np.array([1.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
    area = (1 / 3) * (1 / 3 + 2 / 3) / 2 + (2 / 3) * (2 / 3 + 2 / 3) / 2
    assert sweep_auc(pref, acc_llm, acc_slm) == pytest.approx(area)


def test_sweep_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        sweep_auc(np.array([]), np.array([]), np.array([]))
    with pytest.raises(ValueError, match="1-D"):
        sweep_auc(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        sweep_auc(np.array([np.nan]), np.array([1.0]), np.array([0.0]))
    with pytest.raises(ValueError, match="mismatched lengths"):
        sweep_auc(np.array([1.0, 2.0]), np.array([1.0]), np.array([0.0, 1.0]))
