"""Routing metrics: AR, Uplift, Cost, Rank, AUC, PAUC (paper section 4), APGR, CPT, AIQ.

Every router is reduced to two per-query outputs (see ``docs/eval.md``):

- ``slm``: the small model it would use (a column of the pool), and
- ``pref``: how much it prefers M_LLM over that small model.

Its knob is a threshold ``t``: a query goes to M_LLM iff ``pref > t``. Sweeping ``t`` from
``+inf`` (all small) to ``-inf`` (all M_LLM) traces the AR-vs-ratio curve. Queries with equal
``pref`` switch together (a threshold cannot separate them), so the curve has one point per
distinct ``pref`` value and is linear in between, which is also the expected curve of breaking
the tie at random. A router without information (all ``pref`` equal) is a straight line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tagrouter_fast.curve import sweep_curve, weighted_areas

__all__ = [
    "Curve",
    "aiq",
    "apgr",
    "areas",
    "batch_auc_pauc",
    "cpt",
    "operating_point",
    "rank_corr",
    "sweep",
]


@dataclass
class Curve:
    """Points of a threshold sweep, from all-small (ratio 0) to all-M_LLM (ratio 1).

    Attributes:
        ratio: Share of queries routed to M_LLM at each point (non-decreasing, 0 to 1).
        ar: Accept rate at each point.
        cost: Mean cost per query at each point.
        thresholds: A threshold realising each point (``+inf`` for all-small).
    """

    ratio: np.ndarray
    ar: np.ndarray
    cost: np.ndarray
    thresholds: np.ndarray


def sweep(
    pref: np.ndarray,
    acc_llm: np.ndarray,
    acc_slm: np.ndarray,
    cost_llm: np.ndarray | None = None,
    cost_slm: np.ndarray | None = None,
) -> Curve:
    """Trace the AR/cost curve of a router's threshold sweep.

    Args:
        pref: ``(n,)`` preference for M_LLM (higher goes to M_LLM first). ``+inf``/``-inf`` allowed.
        acc_llm: ``(n,)`` 1 if M_LLM's answer is accepted (win or tie).
        acc_slm: ``(n,)`` 1 if the router's small model's answer is accepted.
        cost_llm: ``(n,)`` cost of M_LLM per query (zeros if omitted).
        cost_slm: ``(n,)`` cost of the chosen small model per query.

    Returns:
        The curve; its first point is all-small, its last all-M_LLM.

    >>> c = sweep(np.array([2.0, 1.0]), np.array([1, 0]), np.array([0, 1]))
    >>> c.ratio.tolist(), c.ar.tolist()
    ([0.0, 0.5, 1.0], [0.5, 1.0, 0.5])
    """
    # One sweep, in Rust (shared with the theta search); _reference.sweep_curve is its oracle.
    ratio, ar, cost, thresholds = sweep_curve(pref, acc_llm, acc_slm, cost_llm, cost_slm)
    return Curve(ratio=ratio, ar=ar, cost=cost, thresholds=thresholds)


def areas(
    pref: np.ndarray, acc_llm: np.ndarray, acc_slm: np.ndarray, ar_llm: float | None = None
) -> tuple[float, float]:
    """AUC and PAUC of a router's threshold sweep (paper section 4), from the core's Rust sweep
    (`tagrouter_fast.curve.weighted_areas` under one unit weighting: the pass the paired
    bootstrap runs on every resample, so a point estimate and its resamples share one code).

    ``AUC = integral_0^1 AR(rho) d rho`` by the trapezoid rule over the sweep's points;
    ``PAUC = integral_0^1 max(AR(rho) - AR_LLM, 0) d rho``, exact for the piecewise-linear
    curve. The paper's prose says "area under the curve where AR > AR_LLM"; its reported values
    (e.g. 1.46% at an AR gain of about 5 points) only fit the area *between* the curve and the
    line ``AR_LLM``, which is what this is.

    Args:
        pref, acc_llm, acc_slm: as for :func:`sweep`.
        ar_llm: always-M_LLM's accept rate (default: the mean of ``acc_llm``).

    Returns:
        ``(auc, pauc)`` as fractions.

    >>> a, p = areas(np.array([2.0, 1.0]), np.array([1, 0]), np.array([0, 1]))
    >>> round(a, 6), round(p, 6)
    (0.75, 0.25)
    """
    a_llm = np.asarray(acc_llm, dtype=np.float64)
    level = float(a_llm.mean()) if ar_llm is None else float(ar_llm)
    ones = np.ones((1, len(a_llm)))
    auc, pauc = weighted_areas(pref, a_llm, acc_slm, ones, np.array([level]))
    return float(auc[0]), float(pauc[0])


def apgr(area: float, ar_weak: float, ar_strong: float) -> float:
    """RouteLLM's average performance gap recovered: mean over ratios of PGR(r).

    ``PGR(r) = (AR(r) - AR_weak) / (AR_strong - AR_weak)``, so its mean over ``[0, 1]`` is
    ``(AUC - AR_weak) / (AR_strong - AR_weak)``. NaN when the strong model is not better.

    >>> round(apgr(0.35, 0.2, 0.4), 6)
    0.75
    """
    gap = ar_strong - ar_weak
    if not gap > 0:
        return float("nan")
    return float((area - ar_weak) / gap)


def cpt(
    ratio: np.ndarray, ar: np.ndarray, ar_weak: float, ar_strong: float, level: float = 0.5
) -> float:
    """RouteLLM's call-performance threshold: least M_LLM share reaching PGR >= ``level``.

    Read off the linearly interpolated curve. 1.0 if never reached before all-M_LLM; NaN when
    the strong model is not better than the weak one.

    >>> round(cpt(np.array([0.0, 1.0]), np.array([0.2, 0.4]), 0.2, 0.4), 6)
    0.5
    """
    gap = ar_strong - ar_weak
    if not gap > 0:
        return float("nan")
    target = ar_weak + level * gap
    r = np.asarray(ratio, dtype=np.float64)
    y = np.asarray(ar, dtype=np.float64)
    if y[0] >= target:
        return 0.0
    for k in range(1, len(r)):
        if y[k] >= target:
            y0, y1 = y[k - 1], y[k]
            frac = (target - y0) / (y1 - y0) if y1 != y0 else 0.0
            return float(r[k - 1] + frac * (r[k] - r[k - 1]))
    return 1.0


def _upper_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing upper concave hull of points (RouterBench's R~ for AIQ)."""
    order = np.lexsort((-y, x))
    hx: list[float] = []
    hy: list[float] = []
    for xi, yi in zip(x[order], y[order], strict=False):
        # Non-decreasing: a point no better than the current best adds nothing.
        if hy and yi <= hy[-1]:
            continue
        while len(hx) >= 2:
            x1, y1, x2, y2 = hx[-2], hy[-2], hx[-1], hy[-1]
            if (y2 - y1) * (xi - x1) <= (yi - y1) * (x2 - x1):
                hx.pop()
                hy.pop()
            else:
                break
        if hx and xi == hx[-1]:
            hy[-1] = max(hy[-1], yi)
            continue
        hx.append(float(xi))
        hy.append(float(yi))
    return np.asarray(hx), np.asarray(hy)


def aiq(cost: np.ndarray, ar: np.ndarray, c_lo: float, c_hi: float) -> float:
    """RouterBench's average improvement in quality over the cost range ``[c_lo, c_hi]``.

    The router's (cost, AR) points are replaced by their non-decreasing upper convex hull
    (mixing two operating points at random realises any point between them), held flat beyond
    its last point and at its first AR before its first point, and averaged over the range.

    >>> round(aiq(np.array([0.0, 1.0]), np.array([0.2, 0.4]), 0.0, 1.0), 6)
    0.3
    """
    if not c_hi > c_lo:
        return float("nan")
    hx, hy = _upper_hull(np.asarray(cost, dtype=np.float64), np.asarray(ar, dtype=np.float64))
    grid = np.unique(np.r_[c_lo, c_hi, hx[(hx > c_lo) & (hx < c_hi)]])
    vals = np.interp(grid, hx, hy)
    return float(np.sum(np.diff(grid) * (vals[1:] + vals[:-1]) / 2) / (c_hi - c_lo))


def batch_auc_pauc(
    pref: np.ndarray,
    acc_llm: np.ndarray,
    acc_slm: np.ndarray,
    weights: np.ndarray,
    ar_llm: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """AUC and PAUC of one router under many query weightings (bootstrap resamples), computed
    by the Rust sweep (`tagrouter_fast.curve.weighted_areas`; the numpy version is the oracle in
    `tagrouter_fast._reference.batch_auc_pauc`).

    Args:
        pref: ``(n,)`` router preference.
        acc_llm: ``(n,)`` M_LLM accepted.
        acc_slm: ``(n,)`` chosen small model accepted.
        weights: ``(B, n)`` non-negative weights (multinomial counts of a resample).
        ar_llm: ``(B,)`` always-M_LLM AR under each weighting.

    Returns:
        ``(B,)`` AUCs and ``(B,)`` PAUCs, equal to :func:`areas` of the resampled set.
    """
    return weighted_areas(pref, acc_llm, acc_slm, weights, ar_llm)


def rank_corr(pref: np.ndarray, gain: np.ndarray) -> float:
    """Spearman correlation of a router's preference with the realized gain of M_LLM over its
    small model: what AUC rewards (its excess over the random line is about Cov(gain, rank)),
    and the x-axis of ``tagrouter eval-signal``'s power curve. 0 for a constant preference;
    ``+-inf`` preferences rank first / last.

    >>> rank_corr(np.array([3.0, np.inf, 1.0]), np.array([0.0, 1.0, -1.0]))
    1.0
    """
    from scipy.stats import rankdata

    rp = rankdata(np.maximum(np.asarray(pref, dtype=np.float64), -1e300))
    rg = rankdata(gain)
    if rp.std() == 0 or rg.std() == 0:
        return 0.0
    return float(np.corrcoef(rp, rg)[0, 1])


def operating_point(
    to_llm: np.ndarray,
    acc_llm: np.ndarray,
    acc_slm: np.ndarray,
    cost_llm: np.ndarray,
    cost_slm: np.ndarray,
) -> dict[str, float]:
    """AR, Rank, cost and M_LLM share of one routing decision per query.

    Rank is the paper's GPT-Rank against the table's reference answer: the routed answer ranks
    1 when it wins or ties (a tie shares first place) and 2 when it loses, averaged over queries,
    so ``rank = 2 - AR`` (paper Table 2: AR 78.76% -> 1.212).
    """
    to_llm = np.asarray(to_llm, dtype=bool)
    acc = np.where(to_llm, acc_llm, acc_slm).astype(np.float64)
    cost = np.where(to_llm, cost_llm, cost_slm).astype(np.float64)
    ar = float(acc.mean())
    return {"ar": ar, "rank": 2.0 - ar, "cost": float(cost.mean()), "ratio": float(to_llm.mean())}
