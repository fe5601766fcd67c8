"""Cross-validated evaluation protocol, paired comparisons and the result dictionary.

Protocol (``docs/eval.md``): stratified k-fold over the pool's complete queries, one split per
seed. For every fold each method is fitted on the training folds only; its operating point is
either its own (TagRouter: theta = 0) or the threshold of maximal accept rate on out-of-fold
predictions of an inner cross-validation of the training folds, then applied unchanged to the
test fold. Curves (AUC, PAUC, APGR, CPT, AIQ) are swept on the test fold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tagrouter_fast.builder.folds import stratified_folds
from tagrouter_fast.data.table import RoutingTable
from tagrouter_fast.eval import metrics as M
from tagrouter_fast.eval.features import Features
from tagrouter_fast.eval.methods import Fitted, Method, TrainSet, out_of_fold

__all__ = [
    "FoldResult",
    "PoolData",
    "evaluate",
    "stratified_folds",
    "summarize",
]

METRIC_KEYS = (
    "ar",
    "uplift",
    "cost",
    "relative_cost",
    "rank",
    "auc",
    "pauc",
    "apgr",
    "cpt50",
    "aiq",
    "gain_corr",
)


@dataclass
class PoolData:
    """The pool's evaluation rows: complete queries with labels and features.

    Attributes:
        train_all: Every evaluation row as a :class:`TrainSet` (labels included); the protocol
            hands methods only the training rows of it.
        dropped: Query ids dropped because a pool model has no outcome for them.
    """

    train_all: TrainSet
    dropped: list[str]

    @classmethod
    def build(
        cls,
        table: RoutingTable,
        models: Sequence[str],
        llm: str,
        feats: Features,
        tagger: Any = None,
    ) -> PoolData:
        """Select the pool's complete rows and assemble their arrays. ``tagger`` is the one
        that produced ``feats.tags`` (carried by the routers built from them)."""
        models = list(models)
        keep = np.flatnonzero(table.complete_rows(models))
        dropped = [table.query_ids[i] for i in np.flatnonzero(~table.complete_rows(models))]
        codes = table.outcomes(models)[keep]
        ts = TrainSet(
            query_ids=[table.query_ids[i] for i in keep],
            emb=feats.emb[keep],
            tag_emb=feats.tag_emb[keep],
            tags=[feats.tags[i] for i in keep],
            texts=[table.texts[i] for i in keep],
            models=models,
            llm=models.index(llm),
            acc=(codes == 0) | (codes == 1),
            codes=codes,
            cost=table.cost_matrix(models)[keep],
            subsets=[table.subsets[i] for i in keep],
            all_codes=table.outcome_codes[keep],
            all_index=table.model_index(models),
            tagger=tagger,
            all_models=list(table.models),
        )
        return cls(ts, dropped)


@dataclass
class FoldResult:
    """One method on one test fold."""

    metrics: dict[str, float]
    curve: M.Curve | None
    pref: np.ndarray | None = None
    acc_slm: np.ndarray | None = None
    fit_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _acc_cost(train: TrainSet, slm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(len(slm))
    return train.acc[r, slm].astype(np.float64), train.cost[r, slm]


def _choose_threshold(method: Method, train: TrainSet, seed: int, inner_folds: int) -> float:
    """Max-AR threshold on inner out-of-fold predictions (ties: the cheaper point)."""
    _, pref, slm = out_of_fold(method.fit, train, seed, inner_folds, 7919)
    a_slm, c_slm = _acc_cost(train, slm)
    llm = train.llm
    c = M.sweep(pref, train.acc[:, llm], a_slm, train.cost[:, llm], c_slm)
    best = np.lexsort((c.cost, -np.round(c.ar, 12)))[0]
    return float(c.thresholds[best])


def _score_fold(
    pref: np.ndarray,
    slm: np.ndarray,
    threshold: float,
    test: TrainSet,
    ref: dict[str, float],
) -> tuple[dict[str, float], M.Curve]:
    llm = test.llm
    a_llm, c_llm = test.acc[:, llm].astype(np.float64), test.cost[:, llm]
    a_slm, c_slm = _acc_cost(test, slm)
    curve = M.sweep(pref, a_llm, a_slm, c_llm, c_slm)
    op = M.operating_point(pref > threshold, a_llm, a_slm, c_llm, c_slm)
    area, parea = M.areas(pref, a_llm, a_slm, ref["ar_llm"])
    out = _point_metrics(op, ref)
    out.update(
        auc=area,
        pauc=parea,
        apgr=M.apgr(area, ref["ar_weak"], ref["ar_llm"]),
        cpt50=M.cpt(curve.ratio, curve.ar, ref["ar_weak"], ref["ar_llm"], 0.5),
        aiq=M.aiq(curve.cost, curve.ar, ref["c_lo"], ref["c_hi"]),
        gain_corr=M.rank_corr(pref, a_llm - a_slm),
    )
    return out, curve


def _point_metrics(op: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    ar_llm = ref["ar_llm"]
    return {
        "ar": op["ar"],
        "uplift": 100.0 * (op["ar"] - ar_llm) / ar_llm if ar_llm > 0 else float("nan"),
        "cost": op["cost"],
        "relative_cost": op["cost"] / ref["cost_llm"] if ref["cost_llm"] > 0 else float("nan"),
        "rank": op["rank"],
        "ratio": op["ratio"],
    }


def evaluate(
    pool: PoolData,
    methods: Sequence[Method],
    folds: int = 5,
    seeds: Sequence[int] = (0,),
    inner_folds: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[FoldResult]]:
    """Run every method on every (seed, fold) and return per-fold results by method name.

    Individual models and the oracle are added under their own names; the oracle routes each
    query to the cheapest accepting small model, else to M_LLM if it accepts (it reads the test
    labels and is only an upper bound).
    """
    data = pool.train_all
    n, m = data.acc.shape
    llm = data.llm
    results: dict[str, list[FoldResult]] = {}
    for seed in seeds:
        for _fi, test_rows in enumerate(stratified_folds(data.subsets, folds, seed)):
            train_rows = np.setdiff1d(np.arange(n), test_rows)
            train = data.subset_rows(train_rows)
            test = data.subset_rows(test_rows)
            ref = _reference(train, test)
            for j, name in enumerate(data.models):
                op = M.operating_point(
                    np.full(len(test_rows), j == llm),
                    test.acc[:, llm],
                    test.acc[:, j],
                    test.cost[:, llm],
                    test.cost[:, j],
                )
                results.setdefault(name, []).append(FoldResult(_point_metrics(op, ref), None))
            o_pref, o_slm = _oracle(test)
            met, curve = _score_fold(o_pref, o_slm, 0.0, test, ref)
            results.setdefault("oracle", []).append(
                FoldResult(met, curve, o_pref, _acc_cost(test, o_slm)[0])
            )
            for meth in methods:
                t0 = time.perf_counter()
                fitted: Fitted = meth.fit(train, seed)
                thr = fitted.fixed_threshold
                if thr is None:
                    thr = (
                        _choose_threshold(meth, train, seed, inner_folds)
                        if meth.select_on_train
                        else 0.0
                    )
                pref, slm = fitted.route(test.features())
                fit_s = time.perf_counter() - t0
                met, curve = _score_fold(np.asarray(pref, float), np.asarray(slm), thr, test, ref)
                met["threshold"] = float(thr)
                results.setdefault(meth.name, []).append(
                    FoldResult(
                        met,
                        curve,
                        np.asarray(pref, float),
                        _acc_cost(test, slm)[0],
                        fit_s,
                        extra=dict(fitted.info),
                    )
                )
                if progress:
                    progress(meth.name)
            # Remember the fold's test labels for the paired bootstrap.
            results.setdefault("__fold__", []).append(
                FoldResult(
                    {},
                    None,
                    None,
                    None,
                    extra={"acc_llm": test.acc[:, llm].astype(float), "rows": test_rows},
                )
            )
    return results


def _reference(train: TrainSet, test: TrainSet) -> dict[str, float]:
    """Reference levels of a test fold: always-M_LLM, the weak model (prior's choice, picked on
    the training fold), and the cost range of the pool's individual models."""
    llm = test.llm
    ar = train.acc.mean(axis=0)
    cost_tr = train.cost.mean(axis=0)
    weak = min(train.slms, key=lambda j: (-ar[j], cost_tr[j]))
    costs = test.cost.mean(axis=0)
    return {
        "ar_llm": float(test.acc[:, llm].mean()),
        "cost_llm": float(costs[llm]),
        "ar_weak": float(test.acc[:, weak].mean()),
        "c_lo": float(costs.min()),
        "c_hi": float(costs.max()),
    }


def _oracle(test: TrainSet) -> tuple[np.ndarray, np.ndarray]:
    slms = np.asarray(test.slms)
    cost = test.cost[:, slms]
    acc = test.acc[:, slms]
    # Cheapest accepting small model, else the cheapest small model.
    key = np.where(acc, cost, cost + 1e9)
    slm = slms[np.argmin(key, axis=1)]
    a_slm = test.acc[np.arange(len(slm)), slm].astype(float)
    gain = test.acc[:, test.llm].astype(float) - a_slm
    return gain, slm


#: The paper-exact method that ``delta_*_vs_paper`` compares the other TagRouter variants with.
PAPER = "TagRouter"


def _ci(x: np.ndarray) -> list[float]:
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]


def summarize(
    results: dict[str, list[FoldResult]],
    kinds: dict[str, str],
    n_boot: int = 1000,
    seed: int = 0,
    references: dict[str, str] | None = None,
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Mean/std of every metric over folds, mean curves, and paired comparisons.

    The best baseline is the ``"baseline"`` method with the highest mean AUC. For every method
    with a curve, ``delta_auc_vs_best_baseline`` holds the mean and std of the per-fold AUC
    difference and a 95% percentile interval of the paired bootstrap: each fold's test queries
    are resampled with replacement (the same resample for both methods), the AUC difference is
    recomputed on every fold and averaged over folds. With several seeds each query is in one
    test fold per seed, so the queries are resampled once and every fold takes its queries'
    weights (a resample that drops all of a fold's queries does not occur at these sizes).
    Same for PAUC. Every other ``"tagrouter"``-kind method also gets ``delta_auc_vs_paper`` /
    ``delta_pauc_vs_paper``: the same paired comparison against the paper-exact ``TagRouter``.
    ``references`` (method -> another method) adds ``delta_auc_vs_reference`` /
    ``delta_pauc_vs_reference`` the same way.

    Returns:
        ``(methods, best_baseline_name)``.
    """
    folds = results.get("__fold__", [])
    out: dict[str, dict[str, Any]] = {}
    grid = np.linspace(0, 1, 101)
    for name, rs in results.items():
        if name == "__fold__":
            continue
        entry: dict[str, Any] = {}
        keys = list(METRIC_KEYS) + ["ratio"]
        for k in keys:
            vals = np.asarray([r.metrics.get(k, np.nan) for r in rs], dtype=np.float64)
            if np.all(np.isnan(vals)):
                entry[k] = None
                entry[f"{k}_std"] = None
            else:
                entry[k] = float(np.nanmean(vals))
                entry[f"{k}_std"] = (
                    float(np.nanstd(vals, ddof=1)) if np.sum(~np.isnan(vals)) > 1 else 0.0
                )
        entry["per_fold"] = {
            k: [r.metrics.get(k) for r in rs] for k in ("ar", "auc", "pauc", "cost", "threshold")
        }
        if any("chosen" in r.extra for r in rs):
            entry["per_fold"]["chosen"] = [r.extra.get("chosen") for r in rs]
        if rs[0].curve is not None:
            ys = [np.interp(grid, r.curve.ratio, r.curve.ar) for r in rs if r.curve is not None]
            cs = [np.interp(grid, r.curve.ratio, r.curve.cost) for r in rs if r.curve is not None]
            entry["curve"] = {
                "ratio": grid.round(4).tolist(),
                "ar": np.mean(ys, axis=0).round(6).tolist(),
                "cost": np.mean(cs, axis=0).tolist(),
            }
        entry["kind"] = kinds.get(name, "model")
        entry["fit_seconds"] = float(sum(r.fit_s for r in rs))
        out[name] = entry

    baselines = [n for n, k in kinds.items() if k == "baseline" and n in out]
    if not baselines:
        return out, None
    best = max(baselines, key=lambda n: out[n]["auc"])
    rng = np.random.default_rng(seed)
    weights = []
    rows = [np.asarray(f.extra.get("rows", np.arange(len(f.extra["acc_llm"])))) for f in folds]
    n_all = int(max(r.max() for r in rows)) + 1 if rows else 0
    if sum(len(r) for r in rows) > n_all:
        # Several seeds: every query sits in one test fold per seed. Resampling each fold on
        # its own would treat the seeds as independent samples of queries and shrink the
        # interval; resample the queries once and give each fold its queries' weights.
        glob = rng.multinomial(n_all, np.full(n_all, 1.0 / n_all), size=n_boot)
        weights = [glob[:, r].astype(np.float64) for r in rows]
    else:
        for f in folds:
            nf = len(f.extra["acc_llm"])
            weights.append(
                rng.multinomial(nf, np.full(nf, 1.0 / nf), size=n_boot).astype(np.float64)
            )

    boots: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def boot(name: str) -> tuple[np.ndarray, np.ndarray]:
        # Each method's resampled AUCs serve every comparison it is in (vs the best baseline,
        # vs the paper): computed once.
        if name in boots:
            return boots[name]
        aucs, paucs = [], []
        for f, r, w in zip(folds, results[name], weights, strict=True):
            a_llm = f.extra["acc_llm"]
            ar_llm = (w * a_llm).sum(axis=1) / w.sum(axis=1)
            assert r.pref is not None and r.acc_slm is not None, name
            a, p = M.batch_auc_pauc(r.pref, a_llm, r.acc_slm, w, ar_llm)
            aucs.append(a)
            paucs.append(p)
        boots[name] = (np.mean(aucs, axis=0), np.mean(paucs, axis=0))
        return boots[name]

    def paired(name: str, ref: str, suffix: str) -> None:
        rs = results[name]
        a, p = boot(name)
        ref_a, ref_p = boot(ref)
        for key, mine, theirs, metric in (
            (f"delta_auc_{suffix}", a, ref_a, "auc"),
            (f"delta_pauc_{suffix}", p, ref_p, "pauc"),
        ):
            per_fold = np.asarray([r.metrics[metric] for r in rs]) - np.asarray(
                [r.metrics[metric] for r in results[ref]]
            )
            d = mine - theirs
            out[name][key] = {
                "baseline": ref,
                "mean": float(per_fold.mean()),
                "std": float(per_fold.std(ddof=1)) if len(per_fold) > 1 else 0.0,
                "ci95": _ci(d),
                "p_le_0": float(np.mean(d <= 0)),
            }

    for name, rs in results.items():
        if name == "__fold__" or rs[0].curve is None:
            continue
        paired(name, best, "vs_best_baseline")
    # Our variants against the paper's TagRouter, on the same resamples: "better than the
    # paper" is a paired claim too.
    if PAPER in results and results[PAPER][0].curve is not None:
        for name in results:
            if kinds.get(name) == "tagrouter" and name != PAPER:
                paired(name, PAPER, "vs_paper")
    for name, ref in (references or {}).items():
        if name not in results or ref not in results:
            raise ValueError(f"paired reference {ref!r} of {name!r}: not both evaluated")
        paired(name, ref, "vs_reference")
    return out, best
