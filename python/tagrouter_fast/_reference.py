"""Pure-Python reference of the TagScorer and TagDecider: the test oracle and benchmark baseline.

Written for clarity, straight from the paper (3.3, 3.4, G.2), independently of the Rust core. It
performs the floating-point operations in the same order as the core (outcome sums as
``win * s_win + tie * s_tie + loss * s_loss``, S(M) summed over a query's distinct known tags in
the order first seen, then divided by their number for the mean), so the two agree to the last
bit, not merely approximately.

>>> scorer = ReferenceScorer([("q1", ["poem"], "big", "win"), ("q1", ["poem"], "small", "loss")])
>>> ReferenceDecider(scorer, {"big": 10.0, "small": 1.0}).route_tags(["poem"])
'big'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

OUTCOMES = ("win", "tie", "loss")

# ==== Scorer ====


class ReferenceScorer:
    """The tag-score store, kept as plain dicts."""

    def __init__(
        self,
        records: Iterable[tuple[Any, Sequence[str], str, str]],
        s_win: float = 1.0,
        s_tie: float = 0.15,
        s_loss: float = -1.0,
        weighting: str = "paper",
        prior_strength: float = 0.0,
    ) -> None:
        if weighting not in ("paper", "none", "shrunk", "difficulty"):
            raise ValueError(f"unknown weighting {weighting!r}")
        if weighting == "difficulty" and not s_win > s_loss:
            raise ValueError("weighting 'difficulty' needs s_win > s_loss")
        self.s = {"win": s_win, "tie": s_tie, "loss": s_loss}
        self.weighting = weighting
        self.prior_strength = prior_strength
        self.models: list[str] = []
        self.tags: list[str] = []
        self._tag_set: set[str] = set()
        self.query_tags: dict[str, frozenset[str]] = {}
        # (tag, model) -> {outcome: n}; model -> {outcome: n} over records.
        self.counts: dict[tuple[str, str], dict[str, int]] = {}
        self.model_totals: dict[str, dict[str, int]] = {}
        for qid, tags, model, outcome in records:
            self._add(str(qid), list(tags), model, outcome)
        self._count_t = {t: 0 for t in self.tags}
        for tag_set in self.query_tags.values():
            for t in tag_set:
                self._count_t[t] += 1
        self._total = float(sum(self._count_t.values()))

    def _add(self, qid: str, tags: list[str], model: str, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        tag_set = frozenset(tags)
        known = self.query_tags.setdefault(qid, tag_set)
        if known != tag_set:
            raise ValueError(f"query {qid!r} has two tag sets")
        for t in tags:
            if t not in self._tag_set:
                self._tag_set.add(t)
                self.tags.append(t)
        if model not in self.models:
            self.models.append(model)
        for t in tag_set:
            c = self.counts.setdefault((t, model), dict.fromkeys(OUTCOMES, 0))
            c[outcome] += 1
        self.model_totals.setdefault(model, dict.fromkeys(OUTCOMES, 0))[outcome] += 1

    def count(self, tag: str) -> int:
        """count_t: distinct training queries carrying ``tag``."""
        return self._count_t[tag]

    def outcome_sum(self, c: Mapping[str, int]) -> float:
        return (
            float(c["win"]) * self.s["win"]
            + float(c["tie"]) * self.s["tie"]
            + float(c["loss"]) * self.s["loss"]
        )

    def score(self, model: str, tag: str) -> float:
        if model not in self.models:
            raise KeyError(model)
        if tag not in self.tags:
            raise KeyError(tag)
        c = self.counts.get((tag, model), dict.fromkeys(OUTCOMES, 0))
        if self.weighting == "shrunk":
            k = self.prior_strength
            totals = self.model_totals[model]
            n_all = float(totals["win"]) + float(totals["tie"]) + float(totals["loss"])
            mu = self.outcome_sum(totals) / n_all if n_all > 0 else 0.0
            n = float(c["win"]) + float(c["tie"]) + float(c["loss"])
            return (self.outcome_sum(c) + k * mu) / (n + k) if n + k > 0 else mu
        if self.weighting == "difficulty":
            k = self.prior_strength
            prior = self.difficulty_prior(model, tag)
            n = _n(c)
            return (self.outcome_sum(c) + k * prior) / (n + k) if n + k > 0 else prior
        if self.weighting == "none":
            w = 1.0
        else:
            # The paper's denominator: count_t' summed over every tag of the store.
            w = (1.0 - math.exp(-float(self.count(tag)))) / self._total
        return w * self.outcome_sum(c)

    def difficulty_prior(self, model: str, tag: str) -> float:
        """The "difficulty" weighting's prior for (model, tag): one Rasch step on the logit of
        the [0, 1] rate ``(s - s_loss) / (s_win - s_loss)``, ability from the model's records,
        difficulty from every model's records on the tag (all sums in store model order)."""
        k = self.prior_strength
        s_loss, spread = self.s["loss"], self.s["win"] - self.s["loss"]

        def logit_rate(x: float) -> float:
            p = min(max((x - s_loss) / spread, 1e-3), 1.0 - 1e-3)
            return math.log(p / (1.0 - p))

        total, n_all = 0.0, 0.0
        for m in self.models:
            total += self.outcome_sum(self.model_totals[m])
            n_all += _n(self.model_totals[m])
        grand = total / n_all if n_all > 0 else 0.0
        own = self.model_totals.get(model, dict.fromkeys(OUTCOMES, 0))
        n_own = _n(own)
        ability = logit_rate(self.outcome_sum(own) / n_own if n_own > 0 else grand)
        a_t, n_t = 0.0, 0.0
        for m in self.models:
            c = self.counts.get((tag, m), dict.fromkeys(OUTCOMES, 0))
            a_t += self.outcome_sum(c)
            n_t += _n(c)
        g_t = (a_t + k * grand) / (n_t + k) if n_t + k > 0 else grand
        delta = logit_rate(g_t) - logit_rate(grand)
        return s_loss + spread * (1.0 / (1.0 + math.exp(-(ability + delta))))

    def score_table(self) -> dict[str, dict[str, float]]:
        """``{tag: {model: score}}`` for every tag and model."""
        return {t: {m: self.score(m, t) for m in self.models} for t in self.tags}


def _n(c: Mapping[str, int]) -> float:
    return float(c["win"]) + float(c["tie"]) + float(c["loss"])


# ==== Decider ====


class ReferenceDecider:
    """Cost-aware decider: argmax of summed (or averaged) tag scores, then Delta_q against theta.

    ``among`` (a set of candidate names) applies the rule to that subset: M_LLM stays if it is in
    the subset, else the subset's most expensive candidate (ties: the smaller name); the
    fallback stays if it is in the subset, else that M_LLM.
    """

    def __init__(
        self,
        scorer: ReferenceScorer,
        costs: Mapping[str, float],
        llm: str | None = None,
        theta: float = 0.0,
        fallback: str | None = None,
        aggregation: str = "sum",
    ) -> None:
        if aggregation not in ("sum", "mean"):
            raise ValueError(f"unknown aggregation {aggregation!r}")
        self.aggregation = aggregation
        self.scorer = scorer
        self.models = [m for m in scorer.models if m in costs]
        self.costs = {m: float(costs[m]) for m in self.models}
        if llm is None:
            top = max(self.costs.values())
            llm = min(m for m in self.models if self.costs[m] == top)
        self.llm = llm
        self.fallback = fallback if fallback is not None else llm
        self.theta = theta
        self.table = scorer.score_table()

    def _aggregate(self, sums: dict[str, float], n_known: int) -> dict[str, float]:
        """S(M) from the sums over ``n_known`` distinct known tags."""
        if self.aggregation == "mean" and n_known > 0:
            return {m: s / n_known for m, s in sums.items()}
        return sums

    def _argmax(self, sums: Mapping[str, float], among: Iterable[str]) -> str:
        # Highest S(M); ties to the cheaper model, then to the smaller name.
        return min(among, key=lambda m: (-sums[m], self.costs[m], m))

    def roles(self, among: Iterable[str] | None = None) -> tuple[list[str], str, str]:
        """(candidates, M_LLM, fallback) of a decision among ``among`` (None: every candidate).

        Raises:
            KeyError: a name that is not a candidate.
            ValueError: an empty subset.
        """
        if among is None:
            return self.models, self.llm, self.fallback
        allowed = set(among)
        for m in allowed:
            if m not in self.costs:
                raise KeyError(m)
        if not allowed:
            raise ValueError("no candidate")
        models = [m for m in self.models if m in allowed]
        top = max(self.costs[m] for m in models)
        llm = self.llm if self.llm in allowed else min(m for m in models if self.costs[m] == top)
        fallback = self.fallback if self.fallback in allowed else llm
        return models, llm, fallback

    def decide(self, tags: Sequence[str], among: Iterable[str] | None = None) -> dict[str, Any]:
        models, llm, fallback = self.roles(among)
        known: list[str] = []
        unknown: list[str] = []
        for t in tags:
            if t in self.table:
                if t not in known:
                    known.append(t)
            elif t not in unknown:
                unknown.append(t)
        sums = {m: 0.0 for m in models}
        for t in known:
            for m in models:
                sums[m] += self.table[t][m]
        sums = self._aggregate(sums, len(known))
        out: dict[str, Any] = {
            "scores": sums,
            "known_tags": known,
            "unknown_tags": unknown,
            "contributions": {t: {m: self.table[t][m] for m in models} for t in known},
            "llm": llm,
            "theta": self.theta,
        }
        if not known:
            return {
                **out,
                "model": fallback,
                "reason": "fallback",
                "delta": math.nan,
                "slm": None,
                "argmax": fallback,
            }
        best = self._argmax(sums, models)
        others = [m for m in models if m != llm]
        if not others:
            return {
                **out,
                "model": best,
                "reason": "argmax",
                "delta": math.nan,
                "slm": None,
                "argmax": best,
            }
        slm = self._argmax(sums, others)
        delta = sums[slm] - sums[llm]
        model = slm if delta >= self.theta else llm
        reason = "argmax" if model == best else "cost_threshold"
        return {**out, "model": model, "reason": reason, "delta": delta, "slm": slm, "argmax": best}

    def route_tags(self, tags: Sequence[str], among: Iterable[str] | None = None) -> str:
        """The model only: the same rule as `decide` without building the explanation."""
        models, llm, fallback = self.roles(among)
        table = self.table
        seen: list[str] = []
        sums = dict.fromkeys(models, 0.0)
        for t in tags:
            row = table.get(t)
            if row is not None and t not in seen:
                seen.append(t)
                for m in models:
                    sums[m] += row[m]
        if not seen:
            return fallback
        sums = self._aggregate(sums, len(seen))
        if len(models) == 1:
            return models[0]
        slm = self._argmax(sums, [m for m in models if m != llm])
        return slm if sums[slm] - sums[llm] >= self.theta else llm

    def route_tags_batch(
        self,
        list_of_tags: Sequence[Sequence[str]],
        among_each: Sequence[Iterable[str] | None] | None = None,
    ) -> list[str]:
        if among_each is None:
            return [self.route_tags(t) for t in list_of_tags]
        return [self.route_tags(t, a) for t, a in zip(list_of_tags, among_each, strict=True)]

    def scores_batch(self, list_of_tags: Sequence[Sequence[str]]) -> np.ndarray:
        rows = [self.decide(t)["scores"] for t in list_of_tags]
        return np.array([[r[m] for m in self.models] for r in rows], dtype=np.float64).reshape(
            len(rows), len(self.models)
        )

    def deltas_batch(self, list_of_tags: Sequence[Sequence[str]]) -> np.ndarray:
        return np.array([self.decide(t)["delta"] for t in list_of_tags], dtype=np.float64)


class NumpyDecider:
    """Vectorised numpy baseline of `ReferenceDecider.route_tags_batch` (same rule, same result).

    Tags are looked up in a dict (no way around Python for strings), then the score rows of all
    queries are gathered and summed with one ``np.add.reduceat``.
    """

    def __init__(self, ref: ReferenceDecider) -> None:
        self.ref = ref
        # Columns in preference order (cheaper first, then name), so argmax's first maximum is
        # the tie-break.
        self.pref = sorted(ref.models, key=lambda m: (ref.costs[m], m))
        self.tag_id = {t: i for i, t in enumerate(ref.table)}
        self.rows = np.array(
            [[ref.table[t][m] for m in self.pref] for t in ref.table], dtype=np.float64
        ).reshape(len(ref.table), len(self.pref))
        self.llm = self.pref.index(ref.llm)
        self.fallback = self.pref.index(ref.fallback)
        self.names = np.array(self.pref, dtype=object)

    def route_tags_batch(self, list_of_tags: Sequence[Sequence[str]]) -> list[str]:
        tag_id = self.tag_id
        # Distinct ids in first-seen order (a set would change the summation order), padded
        # with the index of an all-zero row so that every query has the same width.
        per_query = [
            list(dict.fromkeys(tag_id[t] for t in tags if t in tag_id)) for tags in list_of_tags
        ]
        n = len(per_query)
        width = max((len(q) for q in per_query), default=0)
        zero = len(self.rows)
        ids = np.full((n, max(width, 1)), zero, dtype=np.int64)
        for i, q in enumerate(per_query):
            ids[i, : len(q)] = q
        rows = np.vstack([self.rows, np.zeros((1, self.rows.shape[1]))])
        gathered = rows[ids]  # (n, width, models)
        # Column by column, left to right: the same additions in the same order as the core,
        # so sums (and ties) agree to the bit.
        sums = np.zeros((n, rows.shape[1]))
        for k in range(gathered.shape[1]):
            sums = sums + gathered[:, k, :]
        has = np.array([len(q) > 0 for q in per_query], dtype=bool)
        if self.ref.aggregation == "mean":
            counts = np.array([max(len(q), 1) for q in per_query], dtype=np.float64)
            sums = sums / counts[:, None]
        if len(self.pref) == 1:
            chosen = np.zeros(n, dtype=np.int64)
        else:
            masked = sums.copy()
            masked[:, self.llm] = -np.inf
            slm = masked.argmax(axis=1)  # first maximum: the preference-order tie-break
            delta = sums[np.arange(n), slm] - sums[:, self.llm]
            chosen = np.where(delta >= self.ref.theta, slm, self.llm)
        out = np.where(has, chosen, self.fallback)
        return list(self.names[out])


def split_tags(raw: str) -> list[str]:
    """A tag generator's raw ``"a, b, c"`` output as a list of tags."""
    return [t.strip() for t in raw.split(",") if t.strip()]


# ==== Theta (paper G.2) ====


def evaluate_theta(
    decider: ReferenceDecider,
    list_of_tags: Sequence[Sequence[str]],
    accept: np.ndarray,
    cost: np.ndarray,
    theta: float,
) -> tuple[float, float, float]:
    """(accept rate, mean cost, share routed to M_LLM) of routing the set at ``theta``."""
    d = ReferenceDecider(
        decider.scorer,
        decider.costs,
        llm=decider.llm,
        theta=theta,
        fallback=decider.fallback,
        aggregation=decider.aggregation,
    )
    col = {m: i for i, m in enumerate(d.models)}
    acc = tot = llm = 0.0
    for q, tags in enumerate(list_of_tags):
        m = col[d.route_tags(tags)]
        acc += bool(accept[q, m])
        tot += float(cost[q, m])
        llm += d.models[m] == d.llm
    n = len(list_of_tags)
    return acc / n, tot / n, llm / n


def select_theta(
    decider: ReferenceDecider,
    list_of_tags: Sequence[Sequence[str]],
    accept: np.ndarray,
    cost: np.ndarray,
    grid: Sequence[float],
) -> tuple[float, float, float]:
    """Best theta on ``grid``: highest accept rate, then lowest cost, then |theta|, then theta.

    Returns (theta, accept rate, mean cost).
    """
    best: tuple[float, float, float, float] | None = None
    for theta in grid:
        ar, c, _ = evaluate_theta(decider, list_of_tags, accept, cost, theta)
        key = (-ar, c, abs(theta), theta)
        if best is None or key < (-best[1], best[2], abs(best[0]), best[0]):
            best = (theta, ar, c, 0.0)
    assert best is not None
    return best[0], best[1], best[2]


# ==== Curves ====


def sweep_curve(
    pref: np.ndarray,
    acc_llm: np.ndarray,
    acc_slm: np.ndarray,
    cost_llm: np.ndarray | None = None,
    cost_slm: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ratio, ar, cost, thresholds)`` of a threshold sweep (``pref > t`` goes to M_LLM), in
    numpy: the oracle of `tagrouter_fast.core.sweep_curve` (`eval.metrics.sweep`).

    Queries with equal ``pref`` switch together; the first point is all-small (threshold
    ``+inf``), the last all-M_LLM (``-inf``), the others sit midway between consecutive distinct
    preferences.

    >>> ratio, ar, _, t = sweep_curve(np.array([2.0, 1.0]), np.array([1, 0]), np.array([0, 1]))
    >>> ratio.tolist(), ar.tolist(), t.tolist()
    ([0.0, 0.5, 1.0], [0.5, 1.0, 0.5], [inf, 1.5, -inf])
    """
    # -inf would never pass any threshold; clamp it so "all to M_LLM" stays reachable.
    pref = np.maximum(np.asarray(pref, dtype=np.float64), -1e300)
    n = pref.shape[0]
    if n == 0:
        raise ValueError("empty test set")
    acc_llm = np.asarray(acc_llm, dtype=np.float64)
    acc_slm = np.asarray(acc_slm, dtype=np.float64)
    cost_llm = np.zeros(n) if cost_llm is None else np.asarray(cost_llm, dtype=np.float64)
    cost_slm = np.zeros(n) if cost_slm is None else np.asarray(cost_slm, dtype=np.float64)
    # Order by pref descending; a group ends where the next pref differs.
    order = np.argsort(-pref, kind="stable")
    p = pref[order]
    ends = np.flatnonzero(np.r_[p[1:] != p[:-1], True]) + 1
    gain = np.cumsum((acc_llm - acc_slm)[order])
    dcost = np.cumsum((cost_llm - cost_slm)[order])
    ratio = np.r_[0.0, ends / n]
    ar = acc_slm.mean() + np.r_[0.0, gain[ends - 1]] / n
    cost = cost_slm.mean() + np.r_[0.0, dcost[ends - 1]] / n
    # Point k routes the first k groups, i.e. pref > threshold: a threshold between group k and
    # group k+1 (their midpoint, so it transfers to unseen queries without favouring either).
    cur = p[ends - 1]
    nxt = np.r_[p[ends[:-1]], -np.inf]
    # Unless the midpoint does not separate them: rounded onto cur (adjacent floats) or
    # overflowed (cur = +inf, or near the largest float); nxt then does.
    with np.errstate(over="ignore", invalid="ignore"):
        mid = (cur + nxt) / 2
    mid = np.where(mid < cur, mid, nxt)
    mid[-1] = -np.inf
    thresholds = np.r_[np.inf, mid]
    return ratio, ar, cost, thresholds


def _positive_area(dx: np.ndarray, y0: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Exact area of max(y, 0) over segments where y is linear from y0 to y1."""
    both = (y0 >= 0) & (y1 >= 0)
    cross = (y0 > 0) != (y1 > 0)
    pos = np.maximum(y0, y1)
    span = np.abs(y0) + np.abs(y1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tri = np.where(span > 0, dx * pos * pos / (2 * span), 0.0)
    return np.where(both, dx * (y0 + y1) / 2, np.where(cross & ~both, tri, 0.0))


def batch_auc_pauc(
    pref: np.ndarray,
    acc_llm: np.ndarray,
    acc_slm: np.ndarray,
    weights: np.ndarray,
    ar_llm: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Oracle of `eval.metrics.batch_auc_pauc` (vectorised numpy over the weightings)."""
    pref = np.asarray(pref, dtype=np.float64)
    order = np.argsort(-pref, kind="stable")
    p = pref[order]
    ends = np.flatnonzero(np.r_[p[1:] != p[:-1], True]) + 1
    w = np.asarray(weights, dtype=np.float64)[:, order]
    tot = w.sum(axis=1, keepdims=True)
    a_llm = np.asarray(acc_llm, dtype=np.float64)[order]
    a_slm = np.asarray(acc_slm, dtype=np.float64)[order]
    base = (w * a_slm).sum(axis=1, keepdims=True) / tot
    cw = np.cumsum(w, axis=1)[:, ends - 1] / tot
    cg = np.cumsum(w * (a_llm - a_slm), axis=1)[:, ends - 1] / tot
    ratio = np.concatenate([np.zeros_like(base), cw], axis=1)
    ar = base + np.concatenate([np.zeros_like(base), cg], axis=1)
    dx = np.diff(ratio, axis=1)
    area = np.sum(dx * (ar[:, 1:] + ar[:, :-1]) / 2, axis=1)
    y = ar - np.asarray(ar_llm, dtype=np.float64)[:, None]
    parea = np.sum(_positive_area(dx, y[:, :-1], y[:, 1:]), axis=1)
    return area, parea

