"""Decision columns and the curves over theta (paper G.2 and section 4's AR/cost curves).

`TagDecider.decide_batch` returns `DecisionArrays`; `sweep_theta` grid-searches theta over them,
`theta_for_llm_share` finds the theta that sends a given share to M_LLM, `sweep_curve` gives the
whole AR/cost curve of a threshold sweep, `weighted_areas` its AUC/PAUC under many weightings
(the paired bootstrap) and `sweep_auc` the AUC of one curve. The builder's tuning and the
evaluation read them; each is one Rust call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tagrouter_fast import _core

__all__ = [
    "DecisionArrays",
    "ThetaSearch",
    "sweep_auc",
    "sweep_curve",
    "sweep_theta",
    "theta_for_llm_share",
    "weighted_areas",
]


@dataclass(frozen=True)
class DecisionArrays:
    """Result of `TagDecider.decide_batch`: the batch's decisions as columns (one entry per
    query), for evaluation sweeps. Indices are into `TagDecider.models`.

    Attributes:
        model: int64, the routed model.
        delta: float64, ``Delta_q = S(M_SLM) - S(M_LLM)``; NaN when no tag is known (or there is
            no small model).
        slm: int64, ``M_SLM``, the best model other than M_LLM; -1 when no tag is known (or
            there is no small model).
        top: int64, ``M* = argmax S`` (the fallback model when no tag is known).
        n_known: int64, the number of distinct tags the store knows.
    """

    model: np.ndarray
    delta: np.ndarray
    slm: np.ndarray
    top: np.ndarray
    n_known: np.ndarray

    def __len__(self) -> int:
        return len(self.model)


@dataclass(frozen=True)
class ThetaSearch:
    """Result of `TagDecider.select_theta`: the best theta and the whole sweep.

    Attributes:
        theta: the selected threshold.
        accept_rate: its accept rate (share of queries whose routed answer is win or tie).
        mean_cost: its mean cost per query.
        llm_share: its share of queries routed to M_LLM.
        thetas, accept_rates, mean_costs, llm_shares: every grid point.
    """

    theta: float
    accept_rate: float
    mean_cost: float
    llm_share: float
    thetas: np.ndarray
    accept_rates: np.ndarray
    mean_costs: np.ndarray
    llm_shares: np.ndarray


def sweep_theta(
    decisions: DecisionArrays,
    accepted: np.ndarray,
    costs: np.ndarray,
    llm: int,
    grid: Sequence[float] | np.ndarray | None = None,
) -> ThetaSearch:
    """Grid search for the theta with the highest accept rate over decision columns.

    The columns may come from several deciders (say one per inner fold, each routing its
    held-out queries) as long as their model indices name the same ``m`` columns. Each query
    with a ``Delta_q`` goes to its ``M_SLM`` when ``Delta_q >= theta`` and to M_LLM otherwise;
    the others (no known tag, single candidate) keep their routed model. Ties in accept rate go
    to the lower mean cost, then to the theta closest to 0. Computed in Rust without the GIL.

    Args:
        decisions: the queries' decisions (`TagDecider.decide_batch`; only model, delta and slm
            are read).
        accepted: bool ``(n_queries, m)``: whether each model's answer is acceptable.
        costs: float ``(n_queries, m)`` per-query cost of each model, or ``(m,)`` per model.
        llm: the column of M_LLM.
        grid: thetas to try; by default one per distinct routing outcome (the midpoints
            between consecutive distinct Delta_q values, plus both ends).

    Returns:
        The best theta and the whole sweep.

    Raises:
        ValueError: mismatched lengths, an index outside the ``m`` columns, a slm that is -1
            where delta is not NaN (or the reverse), an empty set or grid, non-finite grid
            values or costs, negative costs.

    >>> cols = DecisionArrays(model=np.array([0, 1]), delta=np.array([-1.0, 1.0]),
    ...                       slm=np.array([1, 1]), top=np.array([0, 1]), n_known=np.array([1, 1]))
    >>> found = sweep_theta(cols, np.array([[True, False], [True, True]]), np.array([10.0, 1.0]), 0)
    >>> found.theta, found.accept_rate, found.mean_cost
    (0.0, 1.0, 5.5)
    """
    accept = np.asarray(accepted, dtype=np.bool_)
    if accept.ndim != 2:
        raise ValueError(
            f"mismatched lengths: accepted has shape {accept.shape}, expected "
            f"({len(decisions)}, m) = (queries, models)"
        )
    g = None if grid is None else np.ascontiguousarray(grid, dtype=np.float64).reshape(-1)
    best, thetas, ars, mean_costs, shares = _core.sweep_routes(
        *_route_columns(decisions),
        accept,
        np.asarray(costs, dtype=np.float64),
        _column(llm),
        g,
    )
    return ThetaSearch(
        theta=float(thetas[best]),
        accept_rate=float(ars[best]),
        mean_cost=float(mean_costs[best]),
        llm_share=float(shares[best]),
        thetas=thetas,
        accept_rates=ars,
        mean_costs=mean_costs,
        llm_shares=shares,
    )


def theta_for_llm_share(decisions: DecisionArrays, llm: int, share: float) -> float:
    """A theta sending the largest share of these decisions' queries to column ``llm`` (M_LLM)
    that is at most ``share``; queries without a ``Delta_q`` count with their routed model.

    Raises:
        ValueError: ``share`` outside [0, 1], no queries, or malformed columns (see
            `sweep_theta`).

    >>> cols = DecisionArrays(model=np.array([0, 1]), delta=np.array([-1.0, 1.0]),
    ...                       slm=np.array([1, 1]), top=np.array([0, 1]), n_known=np.array([1, 1]))
    >>> theta_for_llm_share(cols, 0, 0.5), theta_for_llm_share(cols, 0, 0.0)
    (0.0, -1.0)
    """
    if isinstance(share, bool) or not isinstance(share, (int, float, np.floating, np.integer)):
        raise TypeError(f"share must be a number, got {type(share).__name__}")
    if not math.isfinite(share):
        raise ValueError(f"share must be in [0, 1], got {share}")
    return _core.theta_for_share_routes(*_route_columns(decisions), _column(llm), float(share))


def sweep_curve(
    pref: np.ndarray,
    acc_llm: np.ndarray,
    acc_slm: np.ndarray,
    cost_llm: np.ndarray | None = None,
    cost_slm: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The AR / cost curve of a threshold sweep, computed in Rust (the sweep `sweep_theta`
    runs on too): a query goes to M_LLM iff ``pref > t``, and ``t`` goes from ``+inf`` (all
    small) to ``-inf`` (all M_LLM). Queries with equal ``pref`` switch together, so there is one
    point per distinct ``pref`` plus the all-small start.

    Args:
        pref: ``(n,)`` preference for M_LLM (higher goes first); ``+inf``/``-inf`` allowed.
        acc_llm, acc_slm: ``(n,)`` whether (or how much) M_LLM's and the small model's answers
            are accepted.
        cost_llm, cost_slm: ``(n,)`` their costs per query; zeros if omitted.

    Returns:
        ``(ratio, ar, cost, thresholds)``: per point, the share routed to M_LLM, the accept
        rate, the mean cost and a threshold realising it (``+inf`` first, ``-inf`` last,
        midpoints between consecutive distinct preferences in between).

    Raises:
        ValueError: an empty set, mismatched lengths, a NaN preference, arrays that are not 1-D.

    >>> ratio, ar, cost, t = sweep_curve(np.array([2.0, 1.0]), np.array([1, 0]), np.array([0, 1]))
    >>> ratio.tolist(), ar.tolist(), t.tolist()
    ([0.0, 0.5, 1.0], [0.5, 1.0, 0.5], [inf, 1.5, -inf])
    """
    names = ("pref", "acc_llm", "acc_slm", "cost_llm", "cost_slm")
    cols = [
        None if v is None else np.ascontiguousarray(v, dtype=np.float64)
        for v in (pref, acc_llm, acc_slm, cost_llm, cost_slm)
    ]
    for name, c in zip(names, cols, strict=True):
        if c is not None and c.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {c.shape}")
    p, a_llm, a_slm, c_llm, c_slm = cols
    assert p is not None and a_llm is not None and a_slm is not None
    return _core.sweep_curve(p, a_llm, a_slm, c_llm, c_slm)


def _route_columns(d: DecisionArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The columns the theta functions read, as the 1-D arrays the extension takes."""
    cols = (
        np.asarray(d.model, dtype=np.int64),
        np.asarray(d.delta, dtype=np.float64),
        np.asarray(d.slm, dtype=np.int64),
    )
    for name, c in zip(("model", "delta", "slm"), cols, strict=True):
        if c.ndim != 1:
            raise ValueError(f"decisions.{name} must be 1-D, got shape {c.shape}")
    return cols


def _column(llm: object) -> int:
    if isinstance(llm, bool) or not isinstance(llm, (int, np.integer)):
        raise TypeError(f"llm must be a column index (int), got {type(llm).__name__}")
    return int(llm)


def weighted_areas(
    pref: np.ndarray,
    acc_llm: np.ndarray,
    acc_slm: np.ndarray,
    weights: np.ndarray,
    ar_llm: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """AUC and PAUC of one router's `sweep_curve` under many weightings of its queries (the
    paired bootstrap's resamples), in Rust: the queries are sorted and grouped once, each
    weighting is one pass of running sums.

    Args:
        pref, acc_llm, acc_slm: as for `sweep_curve` (``(n,)``).
        weights: ``(B, n)`` non-negative weights, each row with a positive sum.
        ar_llm: ``(B,)`` always-M_LLM accept rate under each weighting (PAUC's reference).

    Returns:
        ``(auc, pauc)``, each ``(B,)``.

    >>> a, p = weighted_areas(np.array([2.0, 1.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0]),
    ...                       np.ones((1, 2)), np.array([0.5]))
    >>> a.tolist(), p.tolist()
    ([0.75], [0.25])
    """
    cols = [np.ascontiguousarray(v, dtype=np.float64) for v in (pref, acc_llm, acc_slm, ar_llm)]
    for name, c in zip(("pref", "acc_llm", "acc_slm", "ar_llm"), cols, strict=True):
        if c.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {c.shape}")
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D (weightings, queries), got shape {w.shape}")
    return _core.weighted_areas(cols[0], cols[1], cols[2], w, cols[3])


def sweep_auc(pref: np.ndarray, acc_llm: np.ndarray, acc_slm: np.ndarray) -> float:
    """AUC of the accept rate over the M_LLM share along `sweep_curve`'s curve (the trapezoid
    area over ``[0, 1]``, paper section 4): `weighted_areas` with every query weighted 1, so
    there is one AUC in the package, the Rust one.

    Args:
        pref, acc_llm, acc_slm: as for `sweep_curve` (``(n,)``, ``n >= 1``).

    Raises:
        ValueError: an empty set, mismatched lengths, a NaN preference, arrays that are not 1-D.

    >>> sweep_auc(np.array([2.0, 1.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    0.75
    """
    acc = np.ascontiguousarray(acc_llm, dtype=np.float64)
    if acc.ndim != 1:
        raise ValueError(f"acc_llm must be 1-D, got shape {acc.shape}")
    if len(acc) == 0:
        raise ValueError("empty test set")
    # PAUC's reference does not change the AUC; always-M_LLM's accept rate is the natural one.
    area, _ = weighted_areas(
        pref, acc, acc_slm, np.ones((1, len(acc))), np.array([float(acc.mean())])
    )
    return float(area[0])
