"""A model joins the pool with N judgments (research; ``tagrouter eval --add-model``).

The paper's evolvable pool (section 6, Appendix D.3): a new model needs only a few judged
samples, its tag capabilities go into the store, and it is routable at once. This measures how
fast that happens, under the protocol of `tagrouter_fast.eval.protocol` (same stratified folds,
same test-fold curves, paired bootstrap over queries):

- On every training fold, each TagRouter recipe is built by the product's builder from the
  *rest* of the pool (every model but the newcomer, all their training judgments), exactly as a
  user's bundle is; the newcomer then joins through the product's `add_model` with N of its
  judgments (as M_LLM when it is the pool's M_LLM), and the router routes the test fold.
- The baselines (MF, KNN, MLP, FORC-style) are retrained on the same fold with the newcomer's
  other labels hidden (`TrainSet.known`).
- The N judged queries are drawn at random from the training fold (``draws`` draws, nested:
  the first 10 of a draw are in its first 25), or chosen by
  `tagrouter_fast.add_model.suggest_judgments` on the rest-of-pool store (``stratified``:
  a systematic sample over the queries ordered by tags, ``draws`` random starts;
  ``uncertainty``: the queries whose tags are most uncertain for the newcomer), or drawn by the
  paper's Alg. 2 hybrid tag weights (``hybrid``: `tagrouter_fast.eval.sampling`, rare tags
  weigh more, so the judgments cover more of the store's tags; ``draws`` seeds, nested like
  the random draws). ``N = all`` gives the newcomer every training judgment: the full-data
  level the recovery is measured against.
- Zero judgments: the newcomer starts from another model's counts (paper D.3's proxy: the
  rest-of-pool model closest in price, which a user knows before judging anything; and, as an
  upper bound no user has, the model whose training outcomes agree most with the newcomer's),
  or from the pool's prior (every rest-of-pool model's outcomes in turn).

Operating points: a TagRouter keeps the theta its builder chose for the rest of the pool (what
a deployed router does when a model joins); the baselines route at ``pref > 0`` (the higher
predicted accept probability). AUC and PAUC need no operating point.

Intervals: which N queries were judged is, at small N, the main source of variance (one draw
of 10 judgments can hold one accept or four). The bootstrap therefore resamples both: in every
replicate the test queries are resampled (once for all folds, as the main evaluation does) and,
on every fold, the draws of judged queries are resampled with replacement; a method's AUC is
the mean over folds of the mean over the resampled draws. The draw resample of a fold is shared
by every method and N, so paired differences compare the same judged queries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tagrouter_fast.builder.folds import stratified_folds
from tagrouter_fast.eval import metrics as M
from tagrouter_fast.eval.methods import (
    TrainSet,
    _shared_encoder,
    fit_forc,
    fit_knn,
    fit_mf,
    fit_mlp,
    route_tagrouter,
)
from tagrouter_fast.eval.protocol import PoolData, _acc_cost, _reference, _score_fold
from tagrouter_fast.eval.sampling import hybrid_sample

__all__ = [
    "ALL",
    "BASELINES",
    "SELECTIONS",
    "VARIANTS",
    "best_baseline",
    "newcomer_report",
    "newcomer_summary",
    "plot_recovery",
    "run_newcomer",
]

#: ``N`` meaning "every training judgment of the newcomer".
ALL = -1
#: TagRouter recipes measured (`tagrouter_fast.builder.variants.VARIANTS`), by display name.
VARIANTS = {"TagRouter": "paper", "TagRouter+": "plus", "TagRouter+D": "plus-difficulty"}
#: Baselines retrained with the newcomer's N labels.
BASELINES: dict[str, Callable[[TrainSet, int], Any]] = {
    "RouteLLM-MF": fit_mf,
    "RouterBench-KNN": fit_knn,
    "RouterBench-MLP": fit_mlp,
    "FORC-style": fit_forc,
}
#: How the judged queries are chosen: at random, by `suggest_judgments`' strategies, or by the
#: paper's Alg. 2 hybrid tag weights (`tagrouter_fast.eval.sampling`).
SELECTIONS = ("random", "stratified", "uncertainty", "hybrid")
#: A full-data benefit below this (AUC, as a fraction: half a point) gets no recovered share:
#: the share divides by it, so a benefit this small turns the noise of a few judged queries
#: into shares of thousands of percent, even where its interval excludes 0 (two routers that
#: differ on a handful of test queries have a narrow interval around a tiny gap). Half a point
#: is also about the smallest difference these tables resolve between routers (`tagrouter
#: eval-signal`: a router of gain correlation 0.05 gains ~0.5 points and is detected in about
#: a third of evaluations).
MIN_GAP = 0.005
#: Zero-judgment starts of a TagRouter.
STARTS = ("prior", "proxy-cost", "proxy-best")


@dataclass
class _Run:
    """One method on one test fold under one draw of judged queries."""

    fold: int
    draw: int
    metrics: dict[str, float]
    pref: np.ndarray
    acc_slm: np.ndarray


@dataclass
class _Series:
    runs: list[_Run] = field(default_factory=list)


def _without(data: TrainSet, j: int) -> TrainSet:
    """The training set of the rest of the pool: column ``j`` removed."""
    keep = [k for k in range(len(data.models)) if k != j]
    cost = data.cost[:, keep]
    llm = data.llm
    if llm == j:
        # The newcomer was M_LLM: the rest's M_LLM is its dearest model, as the builder picks.
        llm_rest = int(np.argmax(cost.mean(axis=0)))
    else:
        llm_rest = keep.index(llm)
    return TrainSet(
        query_ids=data.query_ids,
        emb=data.emb,
        tag_emb=data.tag_emb,
        tags=data.tags,
        texts=data.texts,
        models=[data.models[k] for k in keep],
        llm=llm_rest,
        acc=data.acc[:, keep],
        codes=data.codes[:, keep],
        cost=cost,
        subsets=data.subsets,
        all_codes=data.all_codes,
        # The newcomer's column stays in the pool's index, so it never returns as a reference.
        all_index=data.all_index,
        tagger=data.tagger,
        all_models=data.all_models,
    )


def _judgments_table(train: TrainSet, j: int, rows: np.ndarray) -> Any:
    """The newcomer's judgments of ``rows`` as a one-model routing table."""
    from tagrouter_fast.data.table import RoutingTable

    n = len(rows)
    return RoutingTable(
        query_ids=[train.query_ids[i] for i in rows],
        texts=[train.texts[i] for i in rows] if train.texts else [""] * n,
        subsets=[train.subsets[i] for i in rows],
        models=[train.models[j]],
        outcome_codes=train.codes[rows, j : j + 1].astype(np.int8),
        costs=train.cost[rows, j : j + 1],
        raw_costs=train.cost[rows, j : j + 1],
        scores=np.full((n, 1), np.nan),
        source=f"{n} judgments of {train.models[j]}",
    )


def _route_router(router: Any, test: TrainSet) -> tuple[np.ndarray, np.ndarray, float]:
    """``(pref, slm, threshold)`` of a product router on the test fold (`route_tagrouter`),
    at the theta its builder chose."""
    mean_cost = test.cost.mean(axis=0)
    fallback = min(test.slms, key=lambda k: mean_cost[k]) if test.slms else test.llm
    return route_tagrouter(router, test.tags, test.models, test.llm, fallback)


def _proxies(train: TrainSet, rest: TrainSet, j: int) -> dict[str, str]:
    """The zero-judgment proxy models: closest price, and (hindsight) closest outcomes."""
    price = train.cost[:, j].mean()
    rest_cost = rest.cost.mean(axis=0)
    by_cost = rest.models[int(np.argmin(np.abs(rest_cost - price)))]
    agree = (rest.acc == train.acc[:, j : j + 1]).mean(axis=0)
    by_outcome = rest.models[int(np.argmax(agree))]
    return {"proxy-cost": by_cost, "proxy-best": by_outcome}


def run_newcomer(
    pool: PoolData,
    newcomer: str,
    ns: Sequence[int],
    *,
    folds: int = 5,
    seeds: Sequence[int] = (0,),
    draws: int = 3,
    variants: dict[str, str] | None = None,
    baselines: dict[str, Callable[[TrainSet, int], Any]] | None = None,
    selections: Sequence[str] = ("random", "stratified", "uncertainty"),
    n_boot: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the newcomer experiment on one pool; return the result dictionary.

    Args:
        pool: the pool's evaluation rows (the newcomer is one of its models).
        newcomer: the model that joins.
        ns: numbers of the newcomer's judgments (``ALL``: every training judgment; 0: the
            zero-judgment starts).
        folds, seeds: the outer cross-validation.
        draws: random draws of the judged queries per fold.
        variants: TagRouter recipes by display name (default :data:`VARIANTS`).
        baselines: baselines by display name (default :data:`BASELINES`).
        selections: how the judged queries are chosen (:data:`SELECTIONS`).
        n_boot: bootstrap resamples of the intervals.

    Raises:
        ValueError: the newcomer is not in the pool, an unknown recipe or selection, a pool
            of fewer than 3 models, ``draws`` < 1 or a negative N.
    """
    from tagrouter_fast.builder.variants import VARIANTS as RECIPES

    data = pool.train_all
    if newcomer not in data.models:
        raise ValueError(f"newcomer {newcomer!r} is not in the pool {data.models}")
    variants = dict(VARIANTS if variants is None else variants)
    unknown = sorted(v for v in variants.values() if v not in RECIPES)
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; known: {sorted(RECIPES)}")
    baselines = dict(BASELINES if baselines is None else baselines)
    bad = [s for s in selections if s not in SELECTIONS]
    if bad:
        raise ValueError(f"unknown selection(s) {bad}; known: {list(SELECTIONS)}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if any(k < 0 and k != ALL for k in ns) or not ns:
        raise ValueError(f"numbers of judgments must be >= 0 or ALL, got {list(ns)}")
    if len(data.models) < 3:
        raise ValueError(
            f"the pool has {len(data.models)} models: without the newcomer the rest must still "
            "be a router (M_LLM and a small model), so use a pool of 3 or more"
        )
    j = data.models.index(newcomer)
    as_llm = j == data.llm
    n, _ = data.acc.shape
    t0 = time.perf_counter()
    series: dict[tuple[str, str, int], _Series] = {}
    fold_info: list[dict[str, Any]] = []
    fi = 0
    for seed in seeds:
        for test_rows in stratified_folds(data.subsets, folds, seed):
            train_rows = np.setdiff1d(np.arange(n), test_rows)
            fold_info.append(
                {"rows": test_rows, "acc_llm": data.acc[test_rows, data.llm].astype(float)}
            )
            _run_fold(
                data,
                train_rows,
                test_rows,
                j=j,
                fi=fi,
                seed=seed,
                ns=ns,
                draws=draws,
                variants=variants,
                baselines=baselines,
                selections=selections,
                series=series,
                progress=progress,
            )
            fi += 1
    return _summarize(
        series,
        fold_info,
        n_boot=n_boot,
        meta={
            "newcomer": newcomer,
            "as_llm": as_llm,
            "models": data.models,
            "llm": data.models[data.llm],
            "folds": folds,
            "seeds": list(seeds),
            "draws": draws,
            "ns": [int(k) for k in ns],
            "selections": list(selections),
            "variants": variants,
            "baselines": list(baselines),
            "n_queries": n,
            "newcomer_accept_rate": float(data.acc[:, j].mean()),
            "accept_rates": dict(zip(data.models, map(float, data.acc.mean(axis=0)), strict=True)),
            "seconds": time.perf_counter() - t0,
        },
    )


def _run_fold(
    data: TrainSet,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    *,
    j: int,
    fi: int,
    seed: int,
    ns: Sequence[int],
    draws: int,
    variants: dict[str, str],
    baselines: dict[str, Callable[[TrainSet, int], Any]],
    selections: Sequence[str],
    series: dict[tuple[str, str, int], _Series],
    progress: Callable[[str], None] | None,
) -> None:
    """One outer fold: build the rest-of-pool routers, let the newcomer join each way, route."""
    from tagrouter_fast.add_model import add_model, suggest_judgments
    from tagrouter_fast.builder.bundle import build_router
    from tagrouter_fast.builder.variants import resolve_variant

    newcomer = data.models[j]
    as_llm = j == data.llm
    train, test = data.subset_rows(train_rows), data.subset_rows(test_rows)
    ref = _reference(train, test)
    rest = _without(train, j)
    n_train = len(train_rows)
    sizes = sorted({n_train if k == ALL else min(k, n_train) for k in ns})
    price = float(train.cost[:, j].mean())

    def record(key: tuple[str, str, int], draw: int, pref: Any, slm: Any, thr: float) -> None:
        pref = np.asarray(pref, float)
        slm = np.asarray(slm)
        met, _ = _score_fold(pref, slm, thr, test, ref)
        series.setdefault(key, _Series()).runs.append(
            _Run(fi, draw, met, pref, _acc_cost(test, slm)[0])
        )

    routers = {}
    for name, recipe in variants.items():
        v = resolve_variant(recipe)
        routers[name] = build_router(
            rest.as_table(references=v.references),
            rest.models,
            variant=v,
            llm=rest.models[rest.llm],
            tagger=rest.tagger,
            tags=rest.tags,
            encoder=_shared_encoder(),
            seed=seed,
        )
        if progress:
            progress(f"{name} base")
    bases = {name: r.decider for name, r in routers.items()}

    def join(name: str, rows: np.ndarray | None, like: Any = None) -> None:
        # Back to the rest-of-pool decider, then the newcomer joins afresh.
        r = routers[name]
        base = bases[name]
        r.update_decider(lambda _d: base)
        tab = None if rows is None else _judgments_table(train, j, rows)
        add_model(r, tab, newcomer, cost=price, like=like, as_llm=as_llm)

    if 0 in sizes:
        proxies = _proxies(train, rest, j)
        for name in routers:
            for start in STARTS:
                like = rest.models if start == "prior" else proxies[start]
                join(name, None, like=like)
                pref, slm, thr = _route_router(routers[name], test)
                record((name, start, 0), 0, pref, slm, thr)
        for bname, fit in baselines.items():
            masked = _masked(train, j, np.zeros(0, np.int64))
            pref, slm = fit(masked, seed).route(test.features())
            record((bname, "prior", 0), 0, pref, slm, 0.0)
    first = next(iter(routers.values()))  # the recipes share queries and tags
    pos = {q: i for i, q in enumerate(train.query_ids)}

    def chosen(sel: str, draw: int, size: int) -> np.ndarray:
        if sel == "random":
            # Nested within a draw: its first 10 are in its first 25.
            rng = np.random.default_rng([seed, fi, draw, 12])
            return rng.permutation(n_train)[:size]
        if sel == "hybrid":
            # Alg. 2's draw order over every training query (alpha = 1): nested like random.
            order = hybrid_sample(
                train.tags,
                alpha=1.0,
                seed=int(np.random.default_rng([seed, fi, draw, 14]).integers(2**31)),
            )
            return np.asarray(order[:size], dtype=np.int64)
        ids = suggest_judgments(
            first,
            size,
            query_ids=list(train.query_ids),
            strategy=sel,
            seed=int(np.random.default_rng([seed, fi, draw, 13]).integers(2**31)),
        )
        return np.asarray([pos[q] for q in ids], dtype=np.int64)

    for sel in selections:
        # The uncertainty choice is deterministic: one draw.
        for draw in range(1 if sel == "uncertainty" else draws):
            for size in sizes:
                if size == 0 or (size == n_train and (sel != "random" or draw > 0)):
                    continue  # N = all is one run: every draw and choice agree
                full = size == n_train
                rows = np.arange(n_train) if full else chosen(sel, draw, size)
                label = "all" if full else sel
                n_key = ALL if full else size
                for name in routers:
                    join(name, rows)
                    pref, slm, thr = _route_router(routers[name], test)
                    record((name, label, n_key), draw, pref, slm, thr)
                for bname, fit in baselines.items():
                    fitted = fit(_masked(train, j, rows), seed)
                    pref, slm = fitted.route(test.features())
                    record((bname, label, n_key), draw, pref, slm, 0.0)
                if progress:
                    progress(f"{sel} N={size}")


def _masked(train: TrainSet, j: int, rows: np.ndarray) -> TrainSet:
    """``train`` with only ``rows`` of the newcomer's labels readable."""
    known = np.ones(train.acc.shape, bool)
    known[:, j] = False
    known[rows, j] = True
    out = train.subset_rows(np.arange(len(train.query_ids)))
    out.known = known
    return out


# ==== Summary: intervals over query resamples, paired comparisons ====


def _boot_weights(fold_info: list[dict[str, Any]], n_boot: int, seed: int = 0) -> list[np.ndarray]:
    """Per-fold bootstrap weights; with several seeds each query is resampled once for all
    of its folds (as `tagrouter_fast.eval.protocol.summarize` does)."""
    rng = np.random.default_rng(seed)
    rows = [np.asarray(f["rows"]) for f in fold_info]
    n_all = int(max(r.max() for r in rows)) + 1
    glob = rng.multinomial(n_all, np.full(n_all, 1.0 / n_all), size=n_boot)
    return [glob[:, r].astype(np.float64) for r in rows]


def _ci(x: np.ndarray) -> list[float]:
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]


def _mean_auc(s: _Series) -> float:
    return float(np.mean([r.metrics["auc"] for r in s.runs]))


def _draw_weights(
    n_folds: int, draws: Sequence[int], n_boot: int, seed: int = 0
) -> dict[tuple[int, int], np.ndarray]:
    """Per (fold, number of draws ``k``): ``(n_boot, k)`` weights of a resample of the ``k``
    draws with replacement (multinomial counts / k). One resample per fold and ``k``, shared by
    every series with ``k`` draws there, so paired differences resample the same draws."""
    rng = np.random.default_rng([seed, 1])
    out = {}
    for f in range(n_folds):
        for k in sorted(set(draws)):
            out[(f, k)] = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot) / k
    return out


def _boot_series(
    s: _Series,
    fold_info: list[dict[str, Any]],
    weights: list[np.ndarray],
    draw_w: dict[tuple[int, int], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """A series' AUC and PAUC under every replicate: queries resampled (``weights``) and, per
    fold, its draws resampled (``draw_w``); the mean over folds of the mean over draws."""
    by_fold: dict[int, list[_Run]] = {}
    for r in s.runs:
        by_fold.setdefault(r.fold, []).append(r)
    aucs, paucs = [], []
    for fold, runs in sorted(by_fold.items()):
        runs.sort(key=lambda r: r.draw)
        f, w = fold_info[fold], weights[fold]
        ar_llm = (w * f["acc_llm"]).sum(axis=1) / w.sum(axis=1)
        per = [M.batch_auc_pauc(r.pref, f["acc_llm"], r.acc_slm, w, ar_llm) for r in runs]
        a = np.stack([x[0] for x in per], axis=1)  # (n_boot, draws)
        p = np.stack([x[1] for x in per], axis=1)
        dw = draw_w[(fold, len(runs))]
        aucs.append((a * dw).sum(axis=1))
        paucs.append((p * dw).sum(axis=1))
    return np.mean(aucs, axis=0), np.mean(paucs, axis=0)


def _summarize(
    series: dict[tuple[str, str, int], _Series],
    fold_info: list[dict[str, Any]],
    n_boot: int,
    meta: dict[str, Any],
) -> dict[str, Any]:
    weights = _boot_weights(fold_info, n_boot)
    counts = {
        len([r for r in s.runs if r.fold == f])
        for s in series.values()
        for f in {r.fold for r in s.runs}
    }
    draw_w = _draw_weights(len(fold_info), sorted(counts), n_boot)
    boots = {key: _boot_series(s, fold_info, weights, draw_w) for key, s in series.items()}

    rows: list[dict[str, Any]] = []
    for key, s in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        name, sel, size = key
        entry: dict[str, Any] = {"method": name, "selection": sel, "n": size}
        for k in ("auc", "pauc", "ar", "cost", "ratio"):
            vals = np.asarray([r.metrics.get(k, np.nan) for r in s.runs], float)
            entry[k] = float(np.nanmean(vals))
        a, p = boots[key]
        entry["auc_ci95"], entry["pauc_ci95"] = _ci(a), _ci(p)
        entry["runs"] = len(s.runs)
        rows.append(entry)

    def paired(a: tuple[str, str, int], b: tuple[str, str, int]) -> dict[str, Any] | None:
        if a not in boots or b not in boots:
            return None
        d_auc = boots[a][0] - boots[b][0]
        d_pauc = boots[a][1] - boots[b][1]
        point = np.mean([r.metrics["auc"] for r in series[a].runs]) - np.mean(
            [r.metrics["auc"] for r in series[b].runs]
        )
        return {
            "delta_auc": float(point),
            "ci95": _ci(d_auc),
            "delta_pauc_ci95": _ci(d_pauc),
            "p_le_0": float(np.mean(d_auc <= 0)),
        }

    tag_names = sorted({k[0] for k in series if k[0] in meta["variants"]})
    base_names = sorted({k[0] for k in series if k[0] not in meta["variants"]})
    sizes = sorted({k[2] for k in series if k[2] > 0})
    comparisons: list[dict[str, Any]] = []
    for t in tag_names:
        for size in sizes:
            for sel in SELECTIONS:
                key = (t, sel, size)
                if key not in series:
                    continue
                for b in base_names:
                    c = paired(key, (b, sel, size))
                    if c:
                        comparisons.append({"a": t, "b": b, "selection": sel, "n": size, **c})
                if sel != "random":
                    c = paired(key, (t, "random", size))
                    if c:
                        comparisons.append(
                            {"a": t, "b": t + " (random)", "selection": sel, "n": size, **c}
                        )
            for other in tag_names:
                if other != t and other > t:
                    c = paired((t, "random", size), (other, "random", size))
                    if c:
                        comparisons.append(
                            {"a": t, "b": other, "selection": "random", "n": size, **c}
                        )
        # Zero judgments: each start against the pool's prior.
        for start in STARTS[1:]:
            c = paired((t, start, 0), (t, "prior", 0))
            if c:
                comparisons.append({"a": f"{t} {start}", "b": f"{t} prior", "n": 0, **c})
        c = paired((t, "all", ALL), (t, "prior", 0))
        if c:
            comparisons.append({"a": f"{t} all", "b": f"{t} prior", "n": ALL, **c})
    # Share of the full-data benefit recovered at each N: (AUC_N - AUC_0) / (AUC_all - AUC_0)
    # from the pool's prior start (ratio of the means; interval over the resamples, queries and
    # draws). A share is only meaningful where the full data measurably helps: None unless the
    # gap's interval lies above 0 and the gap is at least MIN_GAP (a tiny gap makes the ratio
    # explode, however narrow its interval).
    recovery: list[dict[str, Any]] = []
    for name in tag_names + base_names:
        zero = (name, "prior", 0)
        full = (name, "all", ALL)
        if zero not in boots or full not in boots:
            continue
        gap = boots[full][0] - boots[zero][0]
        gap_ci = _ci(gap)
        gap_point = _mean_auc(series[full]) - _mean_auc(series[zero])
        for size in sizes:
            key = (name, "random", size)
            if key not in boots:
                continue
            entry = {
                "method": name,
                "n": size,
                "gap_auc": gap_point,
                "gap_ci95": gap_ci,
                "share": None,
                "share_ci95": None,
            }
            if gap_ci[0] > 0 and gap_point >= MIN_GAP:
                gain = _mean_auc(series[key]) - _mean_auc(series[zero])
                with np.errstate(divide="ignore", invalid="ignore"):
                    share = (boots[key][0] - boots[zero][0]) / gap
                entry["share"] = float(gain / gap_point)
                entry["share_ci95"] = _ci(share[np.isfinite(share)])
            recovery.append(entry)
    meta = {**meta, "bootstrap": "queries and draws", "min_gap_auc": MIN_GAP}
    return {**meta, "results": rows, "comparisons": comparisons, "recovery": recovery}


# ==== Report ====


def newcomer_report(result: dict[str, Any]) -> str:
    """Markdown tables: the recovery curve (AUC by N), zero-judgment starts, comparisons."""
    lines = [
        f"### {result.get('pool') or 'pool'}: {result['newcomer']} joins "
        f"({'as M_LLM' if result['as_llm'] else 'as a small model'}; accept rate "
        f"{100 * result['newcomer_accept_rate']:.1f}%, M_LLM {result['llm']})",
        "",
    ]
    rows = result["results"]
    sizes = sorted({r["n"] for r in rows if r["n"] > 0})
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def cell(m: str, sel: str, n: int) -> str:
        for r in rows:
            if r["method"] == m and r["selection"] == sel and r["n"] == n:
                lo, hi = r["auc_ci95"]
                return f"{100 * r['auc']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
        return ""

    head = ["method", "N=0 (prior)"] + [f"N={n}" for n in sizes] + ["all"]
    lines.append("AUC (%) of AR vs share to M_LLM, random judged queries, [95% bootstrap]:")
    lines.append("")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for m in methods:
        vals = [cell(m, "prior", 0)] + [cell(m, "random", n) for n in sizes] + [cell(m, "all", ALL)]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    for sel in SELECTIONS[1:]:
        if not any(r["selection"] == sel for r in rows):
            continue
        how = (
            "Alg. 2 hybrid tag weights (`eval.sampling.hybrid_sample`)"
            if sel == "hybrid"
            else f"`suggest_judgments(strategy={sel!r})`"
        )
        lines += ["", f"Judged queries chosen by {how}:", ""]
        lines.append("| method | " + " | ".join(f"N={n}" for n in sizes) + " |")
        lines.append("|---|" + "---|" * len(sizes))
        for m in methods:
            if any(r["method"] == m and r["selection"] == sel for r in rows):
                lines.append(f"| {m} | " + " | ".join(cell(m, sel, n) for n in sizes) + " |")
    starts = [r for r in rows if r["n"] == 0]
    if starts:
        lines += [
            "",
            "Zero judgments: AUC by start (proxy-best reads the newcomer's labels: an "
            "upper bound no user has):",
            "",
        ]
        lines.append("| method | start | AUC | AR at its operating point |")
        lines.append("|---|---|---|---|")
        for r in starts:
            lo, hi = r["auc_ci95"]
            lines.append(
                f"| {r['method']} | {r['selection']} | {100 * r['auc']:.2f} "
                f"[{100 * lo:.2f}, {100 * hi:.2f}] | "
                f"{100 * r['ar']:.1f} |"
            )
    comps = result["comparisons"]
    if comps:
        lines += ["", "Paired differences of AUC (a - b, points), [95% bootstrap]:", ""]
        lines.append("| a | b | choice | N | ΔAUC | 95% |")
        lines.append("|---|---|---|---|---|---|")
        for c in comps:
            n = "all" if c["n"] == ALL else str(c["n"])
            lines.append(
                f"| {c['a']} | {c['b']} | {c.get('selection', '')} | {n} | "
                f"{100 * c['delta_auc']:+.2f} | "
                f"[{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}] |"
            )
    return "\n".join(lines)


def plot_recovery(results: Sequence[dict[str, Any]], path: str) -> None:
    """One panel per newcomer case: AUC against N with the 95% interval, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(results)
    cols = min(k, 3)
    fig, axes = plt.subplots(
        (k + cols - 1) // cols,
        cols,
        figsize=(5 * cols, 3.8 * ((k + cols - 1) // cols)),
        squeeze=False,
    )
    for ax, res in zip(axes.flat, results, strict=False):
        rows = res["results"]
        sizes = sorted({r["n"] for r in rows if r["n"] > 0})
        x_all = (sizes[-1] if sizes else 10) * 2
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = []
            for r in rows:
                if r["method"] != m:
                    continue
                if r["selection"] == "prior" and r["n"] == 0:
                    pts.append((1, r))
                elif r["selection"] == "random":
                    pts.append((r["n"], r))
                elif r["selection"] == "all":
                    pts.append((x_all, r))
            pts.sort(key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [100 * p[1]["auc"] for p in pts]
            lo = [100 * p[1]["auc_ci95"][0] for p in pts]
            hi = [100 * p[1]["auc_ci95"][1] for p in pts]
            style = "-" if m.startswith("TagRouter") else "--"
            (line,) = ax.plot(xs, ys, style, marker="o", ms=3, label=m)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        # The other choices of judged queries, for the default recipe: thin black lines beside
        # its random-choice curve, so the comparison is visible.
        choices: tuple[tuple[str, Any], ...] = (
            ("stratified", ":"),
            ("uncertainty", "-."),
            ("hybrid", (0, (5, 1))),
        )
        for sel, style in choices:
            pts2 = sorted(
                (r["n"], 100 * r["auc"])
                for r in rows
                if r["method"] == "TagRouter+" and r["selection"] == sel
            )
            if pts2:
                ax.plot(
                    [p[0] for p in pts2],
                    [p[1] for p in pts2],
                    linestyle=style,
                    color="black",
                    lw=1,
                    label=f"TagRouter+ ({sel} choice)",
                )
        ax.set_xscale("log")
        ax.set_xlabel("newcomer's judgments N (1 = none, right end = all)")
        ax.set_ylabel("AUC (%)")
        ax.set_title(f"{res.get('pool')}: + {res['newcomer']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80 if k > 3 else 110)  # many panels: keep the file small
    plt.close(fig)


# ==== Summary across newcomer cases (``tagrouter eval-summary``) ====

#: The judgment counts the cross-case summary shows.
SUMMARY_NS = (10, 25, 50, 100)
_TAGROUTERS = ("TagRouter", "TagRouter+", "TagRouter+D")


def _case(res: dict[str, Any]) -> str:
    role = "M_LLM" if res["as_llm"] else "small"
    ar = 100 * res["newcomer_accept_rate"]
    return f"{res.get('pool') or 'pool'}: {res['newcomer']} ({role}, AR {ar:.0f}%)"


def _auc_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    lo, hi = r["auc_ci95"]
    return f"{100 * r['auc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _find_comp(res: dict[str, Any], a: str, b: str, sel: str | None, n: int) -> str:
    """``a - b`` from the stored comparisons (either orientation), as "+x.xx [lo, hi]"."""
    for c in res["comparisons"]:
        if c["n"] != n or (sel is not None and c.get("selection") != sel):
            continue
        if (c["a"], c["b"]) == (a, b):
            d, (lo, hi) = c["delta_auc"], c["ci95"]
        elif (c["a"], c["b"]) == (b, a):
            d, (lo, hi) = -c["delta_auc"], (-c["ci95"][1], -c["ci95"][0])
        else:
            continue
        mark = "**" if lo > 0 or hi < 0 else ""
        return f"{mark}{100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{mark}"
    return ""


def _summary_ns(results: Sequence[dict[str, Any]]) -> list[int]:
    """The N the summary shows: those of :data:`SUMMARY_NS` measured, else every N > 0."""
    have = sorted({r["n"] for res in results for r in res["results"] if r["n"] > 0})
    return [n for n in have if n in SUMMARY_NS] or have


def best_baseline(res: dict[str, Any]) -> str | None:
    """The retrained baseline with the highest mean AUC over the summary's N (random choice):
    the strongest reference a TagRouter is compared with (picked on the test folds, so it
    flatters the baseline, never a TagRouter)."""
    names = list(res.get("baselines", []))
    by = {(r["method"], r["selection"], r["n"]): r["auc"] for r in res["results"]}

    def mean_auc(b: str) -> float:
        vals = [by[(b, "random", n)] for n in _summary_ns([res]) if (b, "random", n) in by]
        return float(np.mean(vals)) if vals else -np.inf

    return max(names, key=mean_auc) if names else None


def newcomer_summary(results: Sequence[dict[str, Any]]) -> str:
    """Cross-case Markdown tables of ``tagrouter eval --add-model`` results: the recovery
    curve, paired differences against the best retrained baseline and between recipes, the
    choice of judged queries, zero-judgment starts and the recovered share."""
    ns = _summary_ns(results)

    def row(res: dict[str, Any], m: str, sel: str, n: int) -> dict[str, Any] | None:
        for r in res["results"]:
            if (r["method"], r["selection"], r["n"]) == (m, sel, n):
                return r
        return None

    out = [
        "AUC (%) [95% bootstrap over test queries and draws of judged queries] against the "
        "newcomer's judgments N (random choice); best baseline: the retrained baseline with the "
        "highest mean AUC over these N:",
        "",
        "| case | method | N=0 (prior) | " + " | ".join(f"N={n}" for n in ns) + " | all |",
        "|---|---|---|" + "---|" * len(ns) + "---|",
    ]
    for res in results:
        bb = best_baseline(res)
        for m in [*_TAGROUTERS, *([bb] if bb else [])]:
            label = m if m != bb else f"{m} (best baseline)"
            cells = [_auc_cell(row(res, m, "prior", 0))]
            cells += [_auc_cell(row(res, m, "random", n)) for n in ns]
            cells.append(_auc_cell(row(res, m, "all", ALL)))
            out.append(f"| {_case(res)} | {label} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Paired ΔAUC (points) [95% bootstrap], random choice; bold: the interval excludes 0:",
        "",
        "| case | comparison | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|---|" + "---|" * len(ns),
    ]
    for res in results:
        bb = best_baseline(res)
        pairs = [
            ("TagRouter+D", bb),
            ("TagRouter+", bb),
            ("TagRouter+D", "TagRouter+"),
            ("TagRouter+", "TagRouter"),
        ]
        for a, b in pairs:
            if b is None:
                continue
            cells = [_find_comp(res, a, b, "random", n) for n in ns]
            out.append(f"| {_case(res)} | {a} - {b} | " + " | ".join(cells) + " |")
    mid = 25 if 25 in ns else (ns[len(ns) // 2] if ns else None)
    bases = list(dict.fromkeys(b for res in results for b in res.get("baselines", [])))
    if mid is not None and bases:
        out += [
            "",
            f"Paired ΔAUC (points) at N={mid} (random choice) against each retrained baseline:",
            "",
            "| case | recipe | " + " | ".join(bases) + " |",
            "|---|---|" + "---|" * len(bases),
        ]
        for res in results:
            for m in [t for t in _TAGROUTERS if t in res["variants"]]:
                cells = [_find_comp(res, m, b, "random", mid) for b in bases]
                out.append(f"| {_case(res)} | {m} | " + " | ".join(cells) + " |")
    choice_rows = []
    for res in results:
        for m in [t for t in _TAGROUTERS if t in res["variants"]][-2:]:
            for sel in SELECTIONS[1:]:
                cells = [_find_comp(res, m, f"{m} (random)", sel, n) for n in ns]
                if any(cells):
                    choice_rows.append(
                        f"| {_case(res)} | {m} | {sel} | " + " | ".join(cells) + " |"
                    )
    if choice_rows:  # runs with the random choice only have nothing to compare
        out += [
            "",
            "Choosing the judged queries: ΔAUC against a random choice of the same N:",
            "",
            "| case | recipe | choice | " + " | ".join(f"N={n}" for n in ns) + " |",
            "|---|---|---|" + "---|" * len(ns),
            *choice_rows,
        ]
    out += [
        "",
        "Zero judgments: AUC (%) by start, and the paper's proxy (closest price) against the "
        "pool's prior (paired ΔAUC); proxy-best reads the newcomer's labels (an upper bound):",
        "",
        "| case | recipe | prior | proxy-cost | proxy-best | proxy-cost - prior |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        for m in _TAGROUTERS:
            cells = [_auc_cell(row(res, m, s, 0)) for s in STARTS]
            d = _find_comp(res, f"{m} proxy-cost", f"{m} prior", None, 0)
            out.append(f"| {_case(res)} | {m} | " + " | ".join(cells) + f" | {d} |")
    out += [
        "",
        "Share of the full-data benefit recovered, (AUC_N - AUC_0) / (AUC_all - AUC_0) from the "
        "prior start [95% bootstrap], every recipe and retrained baseline; blank where the gap's "
        f"interval does not lie above 0 or the gap is under {100 * MIN_GAP:g} AUC points:",
        "",
        "| case | method | gap AUC_all - AUC_0 | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|---|---|" + "---|" * len(ns),
    ]
    for res in results:
        rec = {(r["method"], r["n"]): r for r in res.get("recovery", [])}
        # Every baseline, not only the best: a share means something beside the baselines'.
        for m in [*_TAGROUTERS, *res.get("baselines", [])]:
            got = [rec.get((m, n)) for n in ns]
            if not any(got):
                continue
            first = next(r for r in got if r)
            lo, hi = first["gap_ci95"]
            gap = f"{100 * first['gap_auc']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            cells = []
            for r in got:
                if r is None or r["share"] is None:
                    cells.append("")
                    continue
                slo, shi = r["share_ci95"]
                cells.append(f"{100 * r['share']:.0f}% [{100 * slo:.0f}, {100 * shi:.0f}]")
            out.append(f"| {_case(res)} | {m} | {gap} | " + " | ".join(cells) + " |")
    return "\n".join(out)
