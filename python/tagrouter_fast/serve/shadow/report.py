"""The savings report of shadow mode: what routing would save, at what quality, with how much
certainty; every number from the state directory alone (`tagrouter report --state DIR`).

What it reads: the files of `tagrouter_fast.serve.shadow.runner` (decisions of all routed traffic,
judged pairs, the spend ledger, the mode log), through `tagrouter_fast.serve.shadow.records`.
The default model is the reference: a candidate's answer is accepted when the judge calls it a
win or a tie against the default's, and the default accepts itself.

- **candidates**: judged win/tie/loss per candidate, with 95% bootstrap intervals.
- **tag groups** (`tagrouter_fast.serve.shadow.groups`): the same per group, and its winner
  (the highest win rate minus loss rate; the default scores 0).
- **curve**: for each theta, every logged decision is decided again from its stored scores by
  the decider's rule (`TagDecider`: to M_SLM when ``S(M_SLM) - S(M_LLM) >= theta``, else to
  M_LLM; without M_SLM the logged model stays), then: the share per model, the cost relative to
  the default's, and the accept rate relative to the default. A request whose pair judged the
  model it is sent to counts its observed outcome and cost; any other counts the estimated
  accept rate of that model in its tag group (shrunk towards the model's overall rate by
  `PRIOR_PAIRS` pseudo-pairs; a model never judged counts as never accepted) and its served
  answer's cost times the model's cost ratio to the default (from the pairs, shrunk the same
  way). The shadow sample is partly the routed model's choice, so these are estimates under
  the assumption that within a tag group the judged requests are like the others.
- **recommendation**: see `recommend`.
- **spend** per UTC day against the daily cap, and the **mode history**.

Intervals: percentile bootstrap over requests (a request carries its decision and its pair
together), ``n_boot`` resamples from ``numpy.random.default_rng(seed)``: the same directory and
arguments give byte-identical JSON. Numbers are rounded to 6 decimals; an undefined one (no
data) is null, never NaN.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from tagrouter_fast.serve.shadow.activity import modes, rounded, spend, traffic
from tagrouter_fast.serve.shadow.groups import OTHER, group_tags
from tagrouter_fast.serve.shadow.records import OUTCOMES, ShadowRecords, load

__all__ = ["PRIOR_PAIRS", "SCHEMA", "build_report", "recommend", "summary_text"]

SCHEMA = "tagrouter.shadow-report/1"
#: Pseudo-pairs pulling a tag group's accept rate and cost ratio towards the model's overall.
PRIOR_PAIRS = 5.0
_Q = (2.5, 97.5)


_r = rounded


def _iv(est: Any, lo: Any, hi: Any) -> dict[str, float | None]:
    return {"est": _r(est), "lo": _r(lo), "hi": _r(hi)}


def _bounds(reps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if reps.size == 0:
        empty = np.full(reps.shape[1:], np.nan)
        return empty, empty
    with warnings.catch_warnings():  # an all-NaN cell (no data in any resample) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(reps, _Q, axis=0)
    return lo, hi


def _first_by_id(records: list[dict[str, Any]], default: str | None) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["default"] == default:
            out.setdefault(r["id"], r)
    return list(out.values())


class _Data:
    """The records as arrays: units are requests (decisions, then pairs without one)."""

    def __init__(self, rec: ShadowRecords, max_groups: int) -> None:
        stamped = [(r["t"], r["default"]) for r in rec.decisions + rec.pairs]
        self.default = max(stamped)[1] if stamped else None
        # One reference per report: records made while another model was the default (see
        # mode_history) are left out, and a request recorded twice counts once.
        mine = [r for r in rec.decisions + rec.pairs if r["default"] == self.default]
        self.other_default = len(rec.decisions) + len(rec.pairs) - len(mine)
        dec, pairs = _first_by_id(rec.decisions, self.default), _first_by_id(rec.pairs,
                                                                           self.default)
        self.duplicates = len(mine) - len(dec) - len(pairs)
        self.dec, self.pairs = dec, pairs
        names: set[str] = {self.default} if self.default else set()
        for r in dec + pairs:
            names.update(r["scores"])
            names.update(r[k] for k in ("routed", "served") if k in r)
        names.update(p[k] for p in pairs for k in ("candidate", "called"))
        self.models = sorted(names)
        mi = {m: i for i, m in enumerate(self.models)}
        self.M, self.D = len(self.models), mi.get(self.default or "", -1)
        by_id = {d["id"]: i for i, d in enumerate(dec)}
        orphans = [p for p in pairs if p["id"] not in by_id]
        self.n, self.U = len(dec), len(dec) + len(orphans)
        tag_lists = [d["tags"] for d in dec] + [p["tags"] for p in orphans]
        self.groups = group_tags(tag_lists, max_groups=max_groups)
        self.G = len(self.groups.names)  # row G is "other"
        ugrp = np.array([self.groups.assign(t) for t in tag_lists], dtype=np.int64)
        ugrp[ugrp < 0] = self.G
        self.ugrp = ugrp
        unit_of = {**by_id, **{p["id"]: self.n + k for k, p in enumerate(orphans)}}
        self.p_unit = np.array([unit_of[p["id"]] for p in pairs], dtype=np.int64)
        self.p_grp = ugrp[self.p_unit] if pairs else np.zeros(0, dtype=np.int64)
        self.p_cand = np.array([mi[p["candidate"]] for p in pairs], dtype=np.int64)
        self.p_out = np.array([OUTCOMES.index(p["outcome"]) for p in pairs], dtype=np.int64)
        self.p_cc = np.array([p["candidate_cost"] for p in pairs], dtype=np.float64)
        self.p_rc = np.array([p["reference_cost"] for p in pairs], dtype=np.float64)
        self.p_explored = np.array([bool(p.get("explored")) for p in pairs], dtype=bool)
        # Decision columns.
        n = self.n
        self.llm = np.array([mi[d["llm"]] for d in dec], dtype=np.int64)
        self.slm = np.array([mi[d["slm"]] if d["slm"] is not None else -1 for d in dec],
                            dtype=np.int64)
        self.delta = np.array([d["scores"][d["slm"]] - d["scores"][d["llm"]]
                               if d["slm"] is not None else np.nan for d in dec], dtype=np.float64)
        self.fixed = np.array([mi[d["routed"]] for d in dec], dtype=np.int64)
        self.served = np.array([mi[d["served"]] for d in dec], dtype=np.int64)
        self.base = np.array([np.nan if d["cost"] is None else d["cost"] for d in dec],
                             dtype=np.float64)
        self.pcand = np.full(n, -1, dtype=np.int64)
        self.pacc = np.zeros(n, dtype=np.float64)
        self.called = np.full(n, -1, dtype=np.int64)
        self.called_cost = np.zeros(n, dtype=np.float64)
        for k, p in enumerate(pairs):
            u = int(self.p_unit[k])
            if u < n:
                self.pcand[u] = self.p_cand[k]
                self.pacc[u] = float(p["outcome"] != "loss")
                self.called[u] = mi[p["called"]]
                self.called_cost[u] = (p["candidate_cost"] if p["called"] == p["candidate"]
                                       else p["reference_cost"])

    # ---- per resample ----

    def pair_counts(self, w: np.ndarray) -> np.ndarray:
        """Weighted win/tie/loss counts, ``(G + 1, M, 3)``."""
        size = (self.G + 1) * self.M * 3
        cell = (self.p_grp * self.M + self.p_cand) * 3 + self.p_out
        return np.bincount(cell, w[self.p_unit], size).reshape(self.G + 1, self.M, 3)

    def cost_ratio(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each model's cost relative to the default's on the same requests: overall ``(M,)``
        and per group ``(G + 1, M)`` (shrunk towards overall); NaN where never judged."""
        size, pw = (self.G + 1) * self.M, w[self.p_unit]
        cell = self.p_grp * self.M + self.p_cand
        cand = np.bincount(cell, pw * self.p_cc, size).reshape(self.G + 1, self.M)
        ref = np.bincount(cell, pw * self.p_rc, size).reshape(self.G + 1, self.M)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = cand.sum(0) / ref.sum(0)
            rbar = pw @ self.p_rc / pw.sum() if pw.sum() > 0 else np.nan
            fg = (cand + PRIOR_PAIRS * f * rbar) / (ref + PRIOR_PAIRS * rbar)
        if self.D >= 0:
            f[self.D], fg[:, self.D] = 1.0, 1.0
        return f, fg

    def accept(self, counts: np.ndarray) -> np.ndarray:
        """Estimated accept rate per group and model ``(G + 1, M)``, see the module doc."""
        n_gm = counts.sum(2)
        acc_gm = counts[..., 0] + counts[..., 1]
        n_m, acc_m = n_gm.sum(0), acc_gm.sum(0)
        a_m = np.where(n_m > 0, (acc_m + 0.5) / (n_m + 1.0), 0.0)
        a = (acc_gm + PRIOR_PAIRS * a_m) / (n_gm + PRIOR_PAIRS)
        if self.D >= 0:
            a[:, self.D] = 1.0
        return a


class _Curve:
    """Routes of every decision at every theta, with decisions of the same shape collapsed
    into one key (a resample only reweights keys: O(requests) per resample, not O(T x n))."""

    def __init__(self, data: _Data, thetas: np.ndarray) -> None:
        self.data, self.thetas = data, thetas
        d, T = data, len(thetas)
        thr = ~np.isnan(d.delta)
        bins = np.where(thr, np.searchsorted(thetas, np.where(thr, d.delta, 0.0), "right"), -1)
        known = ~np.isnan(d.base)
        cols = np.stack([
            d.ugrp[: d.n], d.served, np.where(thr, d.llm, -1), np.where(thr, d.slm, -1),
            np.where(thr, -1, d.fixed), bins, known.astype(np.int64),
            np.where(d.pcand >= 0, np.arange(d.n), -1),
        ], axis=1)
        uniq, first, inv = np.unique(cols, axis=0, return_index=True, return_inverse=True)
        self.inv, self.K = inv.reshape(-1), len(uniq)
        g, srv, llm, slm, fixed, b = (uniq[:, i] for i in range(6))
        t = np.arange(T)[:, None]
        self.R = np.where(b[None, :] >= 0, np.where(t < b[None, :], slm, llm), fixed)
        self.grp, self.srv = g, srv
        self.pcand, self.pacc = d.pcand[first], d.pacc[first]
        self.called = np.where(known[first], d.called[first], -1)
        self.base0 = np.where(known, d.base, 0.0)
        self.called0 = np.where(known, d.called_cost, 0.0)

    def at(self, w: np.ndarray, a: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, ...]:
        """Accept rate ``(T,)``, cost relative to the default's ``(T,)`` and shares
        ``(T, M)`` under request weights ``w``."""
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN where undefined
            return self._at(w, a, fg)

    def _at(self, w: np.ndarray, a: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, ...]:
        d, R, K, M = self.data, self.R, self.K, self.data.M
        wd = w[: d.n]
        Wk = np.bincount(self.inv, wd, K)
        Bk = np.bincount(self.inv, wd * self.base0, K)
        Ck = np.bincount(self.inv, wd * self.called0, K)
        total = Wk.sum()
        A = np.where(R == d.D, 1.0, a[self.grp[None, :], R])
        A = np.where(R == self.pcand[None, :], self.pacc[None, :], A)
        ar = A @ Wk / total
        per_base = np.where(Bk > 0, Bk / fg[self.grp, self.srv], 0.0)
        cost = np.where(Bk[None, :] > 0, per_base[None, :] * fg[self.grp[None, :], R], 0.0)
        cost = np.where(R == self.srv[None, :], Bk[None, :], cost)
        cost = np.where(R == self.called[None, :], Ck[None, :], cost)
        cd = np.where(self.srv == d.D, Bk, np.where(self.called == d.D, Ck, per_base))
        rel = cost.sum(1) / cd.sum()
        T = len(self.thetas)
        idx = (R + M * np.arange(T)[:, None]).ravel()
        shares = np.bincount(idx, np.tile(Wk, T), T * M).reshape(T, M) / total
        return ar, rel, shares

    def group_shares(self, t: int) -> np.ndarray:
        """Share of each group's traffic per model at theta index ``t`` ``(G + 1, M)``."""
        d = self.data
        Wk = np.bincount(self.inv, minlength=self.K).astype(np.float64)
        cell = self.grp * d.M + self.R[t]
        s = np.bincount(cell, Wk, (d.G + 1) * d.M).reshape(d.G + 1, d.M)
        with np.errstate(invalid="ignore", divide="ignore"):
            return s / s.sum(1, keepdims=True)


def _default_thetas(delta: np.ndarray) -> np.ndarray:
    """0, and each 5% quantile of the logged Delta_q (floored to 6 decimals, so the quantile's
    own request still goes to M_SLM), and one above the largest (all to M_LLM)."""
    fin = delta[np.isfinite(delta)]
    grid = {0.0}
    if fin.size:
        grid.update(math.floor(q * 1e6) / 1e6 for q in np.quantile(fin, np.linspace(0, 1, 21)))
        grid.add(math.floor(float(fin.max()) * 1e6) / 1e6 + 1e-6)
    return np.array(sorted(grid), dtype=np.float64)


def _rates(counts: np.ndarray, reps: np.ndarray, raw: np.ndarray) -> dict[str, Any]:
    """One table row: raw counts, and win/tie/loss/accept/net rates with intervals, from
    weighted counts ``(..., 3)`` of the point estimate and of every resample."""
    def rate(c: np.ndarray) -> np.ndarray:
        n = c.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = c / n[..., None]
        return np.concatenate([r, r[..., :1] + r[..., 1:2], r[..., :1] - r[..., 2:3]], -1)

    est, (lo, hi) = rate(counts), _bounds(rate(reps))
    names = ("win_rate", "tie_rate", "loss_rate", "accept_rate", "net")
    row: dict[str, Any] = {"judged": int(raw.sum()), "win": int(raw[0]), "tie": int(raw[1]),
                           "loss": int(raw[2])}
    row.update({k: _iv(est[i], lo[i], hi[i]) for i, k in enumerate(names)})
    return row


def recommend(curve: list[dict[str, Any]], *, target: float, pairs: int,
              pairs_per_model: dict[str, int], default: str) -> dict[str, Any]:
    """The operating point for ``target`` from the curve.

    A theta qualifies when its accept-rate interval's lower bound is at least ``target`` and
    every model other than the default that it sends traffic to has at least ``n_min =
    ceil(3 / (1 - target))`` judged pairs (the rule of three: with no rejection among n pairs
    the 95% upper bound of the reject rate is about 3/n, so fewer pairs cannot show a reject
    rate under ``1 - target``, and a bootstrap of all-accepted pairs would claim it). The
    cheapest qualifying theta that saves anything is ``recommended``.

    Otherwise, among the cheaper thetas whose accept-rate estimate is above ``target`` but
    whose lower bound is not, the one needing the fewest pairs gives ``not_enough_evidence``
    with ``more_pairs_needed = max(N_width, N_floor)``: the interval's half-width ``h = est -
    lo`` shrinks like ``1/sqrt(pairs)``, so it reaches ``est - target`` after ``pairs * (h /
    (est - target))**2`` pairs in all (assuming the estimate holds and new pairs come like the
    old); ``N_floor`` is what the models it uses lack of ``n_min``. With fewer than ``n_min``
    pairs in all and no such theta: ``not_enough_evidence`` with ``n_min - pairs``. Else
    ``keep_default``: on the evidence so far no theta reaches the target.
    """
    n_min = math.ceil(3.0 / (1.0 - target))

    def used(p: dict[str, Any]) -> list[str]:
        return [m for m, s in p["share"].items() if m != default and (s["est"] or 0.0) > 0]

    def floor_gap(p: dict[str, Any]) -> int:
        return max([0] + [n_min - pairs_per_model.get(m, 0) for m in used(p)])

    priced = [p for p in curve if p["cost_rel"]["est"] is not None and p["accept_rel"]["est"]
              is not None and p["accept_rel"]["lo"] is not None]
    ok = [p for p in priced if p["accept_rel"]["lo"] >= target and floor_gap(p) == 0]
    best = min(ok, key=lambda p: (p["cost_rel"]["est"], -p["accept_rel"]["est"], -p["theta"]),
               default=None)
    out: dict[str, Any] = {"target": target, "min_pairs_per_model": n_min, "theta": None,
                           "accept_rel": None, "cost_rel": None, "saving": None,
                           "more_pairs_needed": None}

    def at(p: dict[str, Any]) -> None:
        out.update(theta=p["theta"], accept_rel=p["accept_rel"], cost_rel=p["cost_rel"],
                   saving=p["saving"])

    if best is not None and best["cost_rel"]["est"] < 1.0 - 1e-9:
        at(best)
        a, s = best["accept_rel"], best["saving"]
        out["status"] = "recommended"
        out["message"] = (
            f"theta {best['theta']:g}: saves {s['est']:.1%} of the default's cost (95% CI "
            f"{s['lo']:.1%} to {s['hi']:.1%}) at an accept rate of {a['est']:.1%} vs the "
            f"default (95% CI {a['lo']:.1%} to {a['hi']:.1%}; target {target:.1%})")
        return out
    ceiling = best["cost_rel"]["est"] if best is not None else math.inf
    need = []
    for p in priced:
        est, lo = p["accept_rel"]["est"], p["accept_rel"]["lo"]
        if est > target and p["cost_rel"]["est"] < ceiling - 1e-9:
            h, room = est - lo, est - target
            width = math.ceil(pairs * ((h / room) ** 2 - 1.0)) if h > room else 0
            need.append((max(width, floor_gap(p), 1), p["cost_rel"]["est"], p))
    if need:
        n_more, _, p = min(need, key=lambda x: (x[0], x[1], -x[2]["theta"]))
        at(p)
        out["more_pairs_needed"] = n_more
    elif pairs < n_min:
        out["more_pairs_needed"] = n_min - pairs
    if out["more_pairs_needed"] is not None:
        out["status"] = "not_enough_evidence"
        out["message"] = (f"not enough evidence yet: about {out['more_pairs_needed']} more "
                          "judged pairs needed")
        return out
    out["status"] = "keep_default"
    out["message"] = (f"keep the default model: on {pairs} judged pairs no theta reaches an "
                      f"accept rate of {target:.1%} vs the default at a lower cost")
    return out


def build_report(
    state_dir: str | os.PathLike[str], *, target: float = 0.98,
    thetas: Sequence[float] | None = None, seed: int = 0, n_boot: int = 200,
    max_groups: int = 8,
) -> dict[str, Any]:
    """The report of a state directory, as a JSON-ready dict (see the module docstring).

    Top-level keys: ``schema``, ``settings``, ``default_model``, ``models``, ``inputs``
    (files, lines damaged or invalid), ``traffic``, ``candidates``, ``tag_groups``,
    ``curve``, ``recommendation``, ``spend``, ``mode_history``.

    Args:
        state_dir: the gateway's state directory.
        target: the accept rate relative to the default to reach, in (0, 1).
        thetas: the curve's thetas (default: 0, the 5% quantiles of the logged Delta_q, and
            one above the largest).
        seed, n_boot: the bootstrap's seed and resamples (>= 20).
        max_groups: at most this many tag groups.

    Raises:
        ValueError: a bad argument, or ``state_dir`` is not a directory.
        OSError: a file cannot be read (naming it).
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ValueError(f"target must be a number in (0, 1), got {target!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 20:
        raise ValueError(f"n_boot must be an integer >= 20, got {n_boot!r}")
    if thetas is not None:
        grid = np.array(sorted({float(t) for t in thetas}), dtype=np.float64)
        if grid.size == 0 or not np.isfinite(grid).all():
            raise ValueError(f"thetas must be finite numbers, at least one, got {thetas!r}")
    rec = load(state_dir)
    data = _Data(rec, max_groups)
    grid = _default_thetas(data.delta) if thetas is None else grid
    names = data.groups.names + [OTHER]
    ones = np.ones(data.U)
    counts = data.pair_counts(ones)
    f, fg = data.cost_ratio(ones)
    curve = _Curve(data, grid) if data.n else None
    rng = np.random.default_rng(seed)
    reps_counts, reps_f, reps_curve = [], [], []
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, data.U, data.U), minlength=data.U).astype(np.float64) \
            if data.U else ones
        c = data.pair_counts(w)
        fb, fgb = data.cost_ratio(w)
        reps_counts.append(c)
        reps_f.append(fb)
        if curve is not None:
            reps_curve.append(curve.at(w, data.accept(c), fgb))
    rc = np.stack(reps_counts) if reps_counts else np.zeros((0, data.G + 1, data.M, 3))
    raw = data.pair_counts(ones)
    f_lo, f_hi = _bounds(np.stack(reps_f))
    candidates: dict[str, Any] = {}
    for m, model in enumerate(data.models):
        if m == data.D:
            continue
        row = _rates(counts[:, m].sum(0), rc[:, :, m].sum(1), raw[:, m].sum(0))
        row["explored"] = int(data.p_explored[data.p_cand == m].sum())
        row["cost_ratio"] = _iv(f[m], f_lo[m], f_hi[m])
        candidates[model] = row
    groups = []
    in_group = np.bincount(data.ugrp[: data.n], minlength=data.G + 1)
    for g, name in enumerate(names):
        tags = data.groups.tags[g][:10] if g < data.G else []
        if g == data.G and not (in_group[g] or (data.p_grp == g).any()):
            continue
        models = {model: _rates(counts[g, m], rc[:, g, m], raw[g, m])
                  for m, model in enumerate(data.models) if m != data.D and raw[g, m].sum()}
        net = {m: r["net"]["est"] for m, r in models.items() if r["net"]["est"] is not None}
        winner = max(net, key=lambda m: (net[m], m), default=None)
        groups.append({"name": name, "tags": tags, "requests": int(in_group[g]),
                       "judged": int(raw[g].sum()), "models": models,
                       "winner": winner if winner and net[winner] > 0 else data.default})
    points: list[dict[str, Any]] = []
    if curve is not None:
        ar, rel, sh = curve.at(ones[: data.U], data.accept(counts), fg)
        b_ar, b_rel, b_sh = (np.stack([r[i] for r in reps_curve]) for i in range(3))
        (ar_lo, ar_hi), (rel_lo, rel_hi), (sh_lo, sh_hi) = map(_bounds, (b_ar, b_rel, b_sh))
        for t, theta in enumerate(grid):
            points.append({
                "theta": _r(theta), "accept_rel": _iv(ar[t], ar_lo[t], ar_hi[t]),
                "cost_rel": _iv(rel[t], rel_lo[t], rel_hi[t]),
                "saving": _iv(1 - rel[t], 1 - rel_hi[t], 1 - rel_lo[t]),
                "share": {model: _iv(sh[t, m], sh_lo[t, m], sh_hi[t, m])
                          for m, model in enumerate(data.models)},
            })
    per_model = {model: int((data.p_cand == m).sum()) for m, model in enumerate(data.models)}
    rec_out = ({"status": "no_data", "message": "no routed decisions recorded yet",
                "target": target} if curve is None else
               recommend(points, target=target, pairs=len(data.pairs),
                         pairs_per_model=per_model, default=str(data.default)))
    if curve is not None and rec_out.get("theta") is not None:
        t = int(np.flatnonzero(np.array([p["theta"] for p in points]) == rec_out["theta"])[0])
        gs = curve.group_shares(t)
        rec_out["routes_by_group"] = {
            names[g]: {model: _r(gs[g, m]) for m, model in enumerate(data.models)}
            for g in range(data.G + 1) if in_group[g]}
    return {
        "schema": SCHEMA,
        "settings": {"target": target, "seed": seed, "n_boot": n_boot, "confidence": 0.95,
                     "max_groups": max_groups, "prior_pairs": PRIOR_PAIRS},
        "default_model": data.default, "models": data.models,
        "inputs": {"files": rec.files, "other_default": data.other_default,
                   "duplicates": data.duplicates},
        "traffic": traffic(rec, data.dec, data.pairs, data.U - data.n),
        "candidates": candidates, "tag_groups": groups, "curve": points,
        "recommendation": rec_out, "spend": spend(rec), "mode_history": modes(rec),
    }


def summary_text(report: dict[str, Any]) -> str:
    """A short human summary of `build_report`'s result."""
    t = report["traffic"]
    lines = [f"default model {report['default_model']}: {t['decisions']} routed decisions, "
             f"{t['pairs']} judged pairs"]
    for model, c in report["candidates"].items():
        a = c["accept_rate"]
        acc = "-" if a["est"] is None else f"{a['est']:.1%} [{a['lo']:.1%}, {a['hi']:.1%}]"
        lines.append(f"  {model}: {c['judged']} judged (win {c['win']}, tie {c['tie']}, "
                     f"loss {c['loss']}), accepted {acc}")
    for g in report["tag_groups"]:
        lines.append(f"  group {g['name']}: {g['requests']} requests, {g['judged']} judged, "
                     f"winner {g['winner']}")
    lines.append(f"recommendation: {report['recommendation']['message']}")
    s = report["spend"]
    if s["days"]:
        last = s["days"][-1]
        cap = s["cap_usd_per_day"]
        lines.append(f"spend {last['day']}: ${last['total_usd']:.4f}"
                     + (f" of a ${cap:.2f} cap" if cap is not None else " (no cap)"))
    return "\n".join(lines)
