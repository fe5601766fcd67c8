"""Tuning a variant on the judgments it is built from: pseudo-count and theta* (paper G.2).

Everything here reads *out-of-fold* routes: each training query is routed by a router built from
the other inner folds, through the public path (`TagRouter.decide_many` on its raw tags), so a
choice is judged on queries its router did not see. The pseudo-count is the candidate with the
highest mean AR-vs-ratio AUC over the inner folds (a curve-wide criterion, steadier than one
point; the core's AUC, `tagrouter_fast.curve.sweep_auc`); theta* is the grid point with the
highest out-of-fold accept rate (ties: lower cost, then closest to 0), found by the Rust sweep.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tagrouter_fast.builder.folds import stratified_folds
from tagrouter_fast.curve import DecisionArrays, sweep_auc, sweep_theta

if TYPE_CHECKING:
    from tagrouter_fast.options import Variant
    from tagrouter_fast.router import TagRouter

__all__ = ["Tuned", "curve_auc", "decisions_in_pool_order", "preferences", "tune"]

#: Added to the seed of the inner split, so it differs from a caller's outer split of one seed.
_SALT = 7919


@dataclass(frozen=True)
class Tuned:
    """What tuning chose, and what it saw.

    Attributes:
        prior_strength: the chosen pseudo-count (the variant's own when it has one candidate).
        theta: theta* (or the variant's fixed theta).
        inner_auc: mean out-of-fold AUC of each candidate pseudo-count.
        accept_rate, llm_share: out-of-fold accept rate and M_LLM share at theta*.
    """

    prior_strength: float
    theta: float
    inner_auc: dict[str, float] = field(default_factory=dict)
    accept_rate: float = float("nan")
    llm_share: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "prior_strength": self.prior_strength,
            "theta": self.theta,
            "inner_auc": dict(self.inner_auc),
            "oof_accept_rate": self.accept_rate,
            "oof_llm_share": self.llm_share,
        }


def decisions_in_pool_order(
    d: DecisionArrays, decider_models: Sequence[str], models: Sequence[str]
) -> DecisionArrays:
    """``d`` with its model indices (decider order) mapped to columns of ``models``."""
    col = {m: j for j, m in enumerate(models)}
    pos = np.asarray([col[m] for m in decider_models] + [-1], dtype=np.int64)
    # Index -1 (no M_SLM) maps through the appended -1.
    return DecisionArrays(
        model=pos[d.model], delta=d.delta, slm=pos[d.slm], top=pos[d.top], n_known=d.n_known
    )


def preferences(d: DecisionArrays, llm: int, fallback_slm: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pref, slm)`` of decisions in the evaluation's convention (``docs/eval.md``): M_LLM iff
    ``pref > t``, so ``pref = -Delta_q`` and the decider's rule at theta is ``t = -theta``.
    Queries routed without a threshold (no known tag) get ``pref = +inf`` when they went to
    M_LLM (they switch to a small model last) and ``-inf`` otherwise; their small model is the
    one they went to, else ``fallback_slm``."""
    free = np.isnan(d.delta) | (d.slm < 0)
    pref = np.where(free, np.where(d.model == llm, np.inf, -np.inf), -d.delta)
    slm = np.where(d.slm >= 0, d.slm, np.where(d.model != llm, d.model, fallback_slm))
    return pref.astype(np.float64), slm.astype(np.int64)


def curve_auc(d: DecisionArrays, accept: np.ndarray, cost: np.ndarray, llm: int) -> float:
    """AUC of the accept rate against the M_LLM share over the whole [0, 1] range, for
    decisions in pool order: queries without a threshold go to the ends of the curve (as
    `preferences` puts them) and the area is the core's (`tagrouter_fast.curve.sweep_auc`).

    Args:
        d: decisions, model indices in ``accept``'s columns (`decisions_in_pool_order`).
        accept: ``(n, m)`` bool: each model's answer acceptable.
        cost: ``(n, m)`` (or ``(m,)``) costs: they pick the small model of queries routed
            without a threshold (the cheapest on average), nothing else.
        llm: the column of M_LLM.
    """
    pref, slm = preferences(d, llm, _cheapest_slm(cost, llm))
    acc = np.asarray(accept, dtype=np.float64)
    return sweep_auc(pref, acc[:, llm], acc[np.arange(len(slm)), slm])


def _cheapest_slm(cost: np.ndarray, llm: int) -> int:
    c = np.asarray(cost, dtype=np.float64)
    mean = c if c.ndim == 1 else c.mean(axis=0)
    slms = [j for j in range(len(mean)) if j != llm]
    return min(slms, key=lambda j: mean[j]) if slms else llm


def tune(
    make: Callable[[np.ndarray, float, float], TagRouter],
    v: Variant,
    *,
    raw_tags: Sequence[Sequence[str]],
    strata: Sequence[str],
    accept: np.ndarray,
    cost: np.ndarray,
    models: Sequence[str],
    seed: int = 0,
    show_progress: bool = False,
) -> Tuned:
    """Choose ``v``'s pseudo-count and theta* on out-of-fold routes of the training queries.

    Args:
        make: ``make(positions, prior_strength, theta) -> TagRouter`` built from those training
            queries (positions into the training set).
        v: the variant.
        raw_tags: tagger output of each training query.
        strata: subset of each training query (the inner split is stratified by it).
        accept: ``(n, len(models))`` bool: win or tie (a missing judgment is not acceptable).
        cost: ``(n, len(models))`` cost of each model on each query.
        models: candidate models (columns).
        seed: seed of the inner split.

    Raises:
        ValueError: fewer training queries than inner folds.
    """
    n = len(raw_tags)
    if n < 2 * v.inner_folds:
        raise ValueError(
            f"{n} training queries are too few to tune on {v.inner_folds} inner folds "
            "(give a fixed theta and prior_strength, or more judgments)"
        )
    cands = list(v.prior_strengths) or [v.prior_strength]
    splits = stratified_folds(list(strata), v.inner_folds, seed + _SALT)
    # M_LLM as the final router will have it (named, or the most expensive candidate); built
    # on every training query, so each candidate has its outcomes in the store.
    llm_name = make(np.arange(n), cands[0], 0.0).decider.llm
    llm = list(models).index(llm_name)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(cands) * len(splits), desc="tuning", unit="fold", file=sys.stderr
        )
    best_k, best_auc, best_oof = cands[0], -np.inf, None
    aucs: dict[str, float] = {}
    for k in cands:
        model = np.zeros(n, dtype=np.int64)
        delta = np.full(n, np.nan)
        slm = np.full(n, -1, dtype=np.int64)
        top = np.zeros(n, dtype=np.int64)
        known = np.zeros(n, dtype=np.int64)
        fold_auc = []
        for test in splits:
            train = np.setdiff1d(np.arange(n), test)
            batch = make(train, k, 0.0).decide_many(raw_tags=[raw_tags[i] for i in test])
            d = decisions_in_pool_order(batch.arrays(), batch.decider.models, models)
            model[test], delta[test], slm[test] = d.model, d.delta, d.slm
            top[test], known[test] = d.top, d.n_known
            fold_auc.append(curve_auc(d, accept[test], cost[test], llm))
            if bar is not None:
                bar.update(1)
        aucs[f"{k:g}"] = float(np.mean(fold_auc))
        if aucs[f"{k:g}"] > best_auc:
            best_k, best_auc = k, aucs[f"{k:g}"]
            best_oof = DecisionArrays(model=model, delta=delta, slm=slm, top=top, n_known=known)
    if bar is not None:
        bar.close()
    assert best_oof is not None
    if v.theta is not None:
        theta = float(v.theta)
        point = sweep_theta(best_oof, accept, cost, llm, grid=[theta])
    else:
        point = sweep_theta(best_oof, accept, cost, llm)
        theta = point.theta
    return Tuned(
        prior_strength=float(best_k),
        theta=theta,
        inner_auc=aucs if len(cands) > 1 else {},
        accept_rate=point.accept_rate,
        llm_share=point.llm_share,
    )
