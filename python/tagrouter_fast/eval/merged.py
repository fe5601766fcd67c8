"""Merged stores: one source's judgments, the others', or both (``tagrouter eval --merged``).

The paper's enhanced TagScorer (section 6, Appendix D.4) merges the tag-capability store built
from one dataset with the judgments of another. The table's queries come from several sources
(``subsets``; AlpacaEval 2.0: helpful_base, koala, oasst, selfinstruct, vicuna), so each source
in turn is the target A:

- A's queries are split into stratified folds (by M_LLM's outcome, seeded); on every fold each
  TagRouter recipe is built by the product's builder three times: from A's training queries
  (``alone``), from every query of the other sources (``others``), and from both (``merged``);
- each router routes A's test fold at the operating point its builder chose (``-theta``).

Every query of a target is tested once per seed, so the pooled test set is the union of the
targets' test folds. Means over folds are weighted by fold size; the 95% intervals resample the
tested queries (once for all seeds and, pooled, across targets) and recompute every fold's AUC,
PAUC and AR under each resample; paired differences use the same resamples for both sides.
A source with fewer than ``2 * folds`` queries is not a target (its queries still count as
another source's "others") and the result says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tagrouter_fast.builder.folds import stratified_folds
from tagrouter_fast.eval import metrics as M
from tagrouter_fast.eval.methods import TrainSet, _shared_encoder
from tagrouter_fast.eval.newcomer import _boot_weights, _ci, _route_router
from tagrouter_fast.eval.protocol import PoolData, _acc_cost, _reference, _score_fold

if TYPE_CHECKING:
    from tagrouter_fast.builder.variants import Variant

__all__ = ["POOLED", "SETS", "VARIANTS", "merged_report", "merged_summary", "run_merged"]

#: TagRouter recipes measured (`tagrouter_fast.builder.variants.VARIANTS`), by display name.
VARIANTS = {"TagRouter": "paper", "TagRouter+": "plus"}
#: The stores built for a target source A, and how the report names them.
SETS = {"alone": "A alone", "others": "others alone", "merged": "merged"}
#: Scope name of the summary over every target.
POOLED = "pooled"
#: Paired differences reported for every variant: (a, b) means a - b.
PAIRS = (("merged", "alone"), ("merged", "others"))


@dataclass
class _Run:
    """One router on one test fold."""

    fold: int
    metrics: dict[str, float]
    pref: np.ndarray
    acc_slm: np.ndarray
    accepted: np.ndarray  # accepted answer at the router's operating point


def _build(data: TrainSet, rows: np.ndarray, v: Variant, seed: int) -> Any:
    """The product's router of recipe ``v`` from ``rows`` (as `newcomer._run_fold` builds)."""
    from tagrouter_fast.builder.bundle import build_router

    train = data.subset_rows(rows)
    return build_router(
        train.as_table(references=v.references),
        train.models,
        variant=v,
        llm=train.models[train.llm],
        tagger=train.tagger,
        tags=train.tags,
        encoder=_shared_encoder(),
        seed=seed,
    )


def _resolve(variants: Mapping[str, str | Variant] | None) -> dict[str, Variant]:
    from tagrouter_fast.builder.variants import VARIANTS as RECIPES
    from tagrouter_fast.builder.variants import resolve_variant

    given = dict(VARIANTS if variants is None else variants)
    if not given:
        raise ValueError("no TagRouter recipe to measure")
    bad = [r for r in given.values() if isinstance(r, str) and r not in RECIPES]
    if bad:
        raise ValueError(f"unknown recipe(s) {bad}; known: {sorted(RECIPES)}")
    return {name: resolve_variant(r) for name, r in given.items()}


def run_merged(
    pool: PoolData,
    *,
    folds: int = 5,
    seeds: Sequence[int] = (0,),
    variants: Mapping[str, str | Variant] | None = None,
    n_boot: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the merged-stores experiment on one pool; return the result dictionary.

    Args:
        pool: the pool's evaluation rows; their ``subsets`` are the sources.
        folds, seeds: the cross-validation of each target source's queries.
        variants: TagRouter recipes (names of `tagrouter_fast.builder.variants.VARIANTS` or
            `Variant` objects) by display name (default :data:`VARIANTS`).
        n_boot: bootstrap resamples of the intervals.
        progress: called with a short label after each fold.

    Raises:
        ValueError: fewer than two sources, no source with ``2 * folds`` queries, an unknown
            recipe, or fewer than 2 folds.
    """
    data = pool.train_all
    recipes = _resolve(variants)
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    if not seeds:
        raise ValueError("no seeds")
    subs = np.asarray(data.subsets, dtype=object)
    sources = sorted(set(data.subsets))
    if len(sources) < 2:
        raise ValueError(
            f"merging stores needs queries from at least 2 sources (the table's subset column); "
            f"this pool's {len(subs)} queries all come from {sources}"
        )
    counts = {s: int((subs == s).sum()) for s in sources}
    skipped = {s: f"{k} queries < 2 x {folds} folds" for s, k in counts.items() if k < 2 * folds}
    targets = [s for s in sources if s not in skipped]
    if not targets:
        raise ValueError(f"no source has 2 x {folds} queries to split into folds: {counts}")

    t0 = time.perf_counter()
    runs: dict[tuple[str, str], list[_Run]] = {}
    fold_info: list[dict[str, Any]] = []
    rows_info: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        for target in targets:
            rows_a = np.flatnonzero(subs == target)
            others = np.flatnonzero(subs != target)
            info = rows_info.setdefault(
                target,
                {"queries": len(rows_a), "others": len(others), "train_alone": [], "merged": []},
            )
            # The other sources' store does not depend on the target's fold: built once.
            other_routers = {name: _build(data, others, v, seed) for name, v in recipes.items()}
            strata = [str(c) for c in data.codes[rows_a, data.llm]]
            for k, local in enumerate(stratified_folds(strata, folds, seed)):
                test_rows = rows_a[local]
                train_a = np.setdiff1d(rows_a, test_rows)
                merged = np.sort(np.concatenate([train_a, others]))
                test = data.subset_rows(test_rows)
                ref = _reference(data.subset_rows(merged), test)
                fi = len(fold_info)
                fold_info.append(
                    {
                        "target": target,
                        "seed": int(seed),
                        "fold": k,
                        "rows": test_rows,
                        "acc_llm": test.acc[:, test.llm].astype(float),
                        "test_ids": [data.query_ids[i] for i in test_rows],
                        "n_train": {
                            "alone": len(train_a),
                            "others": len(others),
                            "merged": len(merged),
                        },
                    }
                )
                info["train_alone"].append(len(train_a))
                info["merged"].append(len(merged))
                for name, v in recipes.items():
                    routers = {
                        "alone": _build(data, train_a, v, seed),
                        "others": other_routers[name],
                        "merged": _build(data, merged, v, seed),
                    }
                    for which, router in routers.items():
                        pref, slm, thr = _route_router(router, test)
                        met, _ = _score_fold(pref, slm, thr, test, ref)
                        met["theta"] = -thr
                        acc_slm = _acc_cost(test, slm)[0]
                        accepted = np.where(pref > thr, test.acc[:, test.llm], acc_slm)
                        runs.setdefault((name, which), []).append(
                            _Run(fi, met, pref, acc_slm, accepted.astype(float))
                        )
                if progress:
                    progress(f"{target} fold {k}")
    return _summarize(
        runs,
        fold_info,
        n_boot=n_boot,
        meta={
            "models": list(data.models),
            "llm": data.models[data.llm],
            "folds": folds,
            "seeds": [int(s) for s in seeds],
            "variants": {
                name: (r if isinstance(r, str) else recipes[name].to_json())
                for name, r in dict(VARIANTS if variants is None else variants).items()
            },
            "n_queries": len(data.query_ids),
            "sources": counts,
            "targets": targets,
            "skipped": skipped,
            "rows": rows_info,
            "seconds": time.perf_counter() - t0,
        },
    )


# ==== Summary: size-weighted means over folds, intervals over query resamples ====


def _scope_weights(folds: list[dict[str, Any]], n_boot: int) -> list[np.ndarray]:
    """Bootstrap weights of these folds' queries: each tested query resampled once (for every
    seed it is tested under), the queries numbered compactly so only they are drawn."""
    ids = np.unique(np.concatenate([f["rows"] for f in folds]))
    compact = [{"rows": np.searchsorted(ids, f["rows"])} for f in folds]
    return _boot_weights(compact, n_boot)


def _boot_run(run: _Run, acc_llm: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(3, B)`` AUC, PAUC and AR of one fold's routes under each resample (0 where the
    resample drew none of the fold's queries; such a fold then has weight 0)."""
    size = w.sum(axis=1)
    ok = size > 0
    out = np.zeros((3, len(w)))
    if ok.any():
        wk = w[ok]
        ar_llm = (wk * acc_llm).sum(axis=1) / size[ok]
        a, p = M.batch_auc_pauc(run.pref, acc_llm, run.acc_slm, wk, ar_llm)
        out[0, ok], out[1, ok] = a, p
        out[2, ok] = (wk * run.accepted).sum(axis=1) / size[ok]
    return out


def _paired(
    points: dict[tuple[str, str], np.ndarray],
    boots: dict[tuple[str, str], np.ndarray],
    a: tuple[str, str],
    b: tuple[str, str],
) -> dict[str, Any]:
    """Paired a - b: point difference and the interval over the shared resamples."""
    d = boots[a] - boots[b]
    pt = points[a] - points[b]
    return {
        "delta_auc": float(pt[0]),
        "ci95": _ci(d[0]),
        "delta_pauc": float(pt[1]),
        "delta_pauc_ci95": _ci(d[1]),
        "delta_ar": float(pt[2]),
        "delta_ar_ci95": _ci(d[2]),
        "p_le_0": float(np.mean(d[0] <= 0)),
    }


def _summarize(
    runs: dict[tuple[str, str], list[_Run]],
    fold_info: list[dict[str, Any]],
    n_boot: int,
    meta: dict[str, Any],
) -> dict[str, Any]:
    scopes = [POOLED] + list(meta["targets"])
    names = list(dict.fromkeys(k[0] for k in runs))
    results: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    for scope in scopes:
        in_scope = [i for i, f in enumerate(fold_info) if scope in (POOLED, f["target"])]
        pos = {fi: j for j, fi in enumerate(in_scope)}
        weights = _scope_weights([fold_info[i] for i in in_scope], n_boot)
        points: dict[tuple[str, str], np.ndarray] = {}
        boots: dict[tuple[str, str], np.ndarray] = {}
        for key, rs in runs.items():
            mine = [r for r in rs if r.fold in pos]
            sizes = np.asarray([len(fold_info[r.fold]["rows"]) for r in mine], float)
            vals = np.asarray(
                [[r.metrics[m] for m in ("auc", "pauc", "ar", "ratio", "cost")] for r in mine]
            )
            points[key] = sizes @ vals / sizes.sum()
            num = np.zeros((3, n_boot))
            den = np.zeros(n_boot)
            for r in mine:
                w = weights[pos[r.fold]]
                size = w.sum(axis=1)
                num += _boot_run(r, fold_info[r.fold]["acc_llm"], w) * size
                den += size
            boots[key] = num / den
            auc, pauc, ar, ratio, cost = (float(x) for x in points[key])
            results.append(
                {
                    "scope": scope,
                    "method": key[0],
                    "set": key[1],
                    "auc": auc,
                    "auc_ci95": _ci(boots[key][0]),
                    "pauc": pauc,
                    "pauc_ci95": _ci(boots[key][1]),
                    "ar": ar,
                    "ar_ci95": _ci(boots[key][2]),
                    "llm_share": ratio,
                    "cost": cost,
                    "runs": len(mine),
                    "n_test": int(sizes.sum()),
                }
            )

        for name in names:
            for a, b in PAIRS:
                comparisons.append(
                    {
                        "scope": scope,
                        "a": f"{name} {a}",
                        "b": f"{name} {b}",
                        **_paired(points, boots, (name, a), (name, b)),
                    }
                )
        for other in names[1:]:
            # Each recipe against the first, on the same store.
            for which in SETS:
                comparisons.append(
                    {
                        "scope": scope,
                        "a": f"{other} {which}",
                        "b": f"{names[0]} {which}",
                        **_paired(points, boots, (other, which), (names[0], which)),
                    }
                )
    folds_out = [
        {k: f[k] for k in ("target", "seed", "fold", "test_ids", "n_train")} for f in fold_info
    ]
    return {**meta, "results": results, "comparisons": comparisons, "fold_runs": folds_out}


# ==== Report ====


def _cell(r: dict[str, Any], key: str = "auc") -> str:
    lo, hi = r[f"{key}_ci95"]
    return f"{100 * r[key]:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"


def _delta(c: dict[str, Any], key: str, ci: str) -> str:
    lo, hi = c[ci]
    return f"{100 * c[key]:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def merged_report(result: dict[str, Any]) -> str:
    """Markdown tables: pooled, per target source, row counts, paired differences."""
    rows = result["results"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["scope"], r["method"], r["set"]): r for r in rows}
    n_pooled = next((r["n_test"] for r in rows if r["scope"] == POOLED), 0)
    lines = [
        f"### {result.get('pool') or 'pool'}: merged stores (target source A's training folds "
        f"+ every query of the other sources), M_LLM {result['llm']}",
        "",
        f"Pooled over {len(result['targets'])} target sources ({n_pooled} tested queries, "
        f"{result['folds']} folds, seeds {result['seeds']}); AUC, PAUC and AR (%) at the "
        "builder's operating point, [95% bootstrap]:",
        "",
        "| method | store | AUC | PAUC | AR | M_LLM share |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        for which, label in SETS.items():
            r = by.get((POOLED, m, which))
            if r:
                lines.append(
                    f"| {m} | {label} | {_cell(r)} | {_cell(r, 'pauc')} | {_cell(r, 'ar')} | "
                    f"{100 * r['llm_share']:.1f} |"
                )
    lines += [
        "",
        "Per target source: AUC (%) [95% bootstrap]:",
        "",
        "| source | method | " + " | ".join(SETS.values()) + " |",
        "|---|---|" + "---|" * len(SETS),
    ]
    for s in result["targets"]:
        for m in methods:
            cells = [_cell(by[(s, m, w)]) if (s, m, w) in by else "" for w in SETS]
            lines.append(f"| {s} | {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training queries per store (A alone and merged: mean over folds):",
        "",
        "| source | queries | A alone | others alone | merged |",
        "|---|---|---|---|---|",
    ]
    for s in result["targets"]:
        info = result["rows"][s]
        lines.append(
            f"| {s} | {info['queries']} | {np.mean(info['train_alone']):.0f} | "
            f"{info['others']} | {np.mean(info['merged']):.0f} |"
        )
    for s, why in result.get("skipped", {}).items():
        lines.append(f"| {s} | not a target: {why} | | | |")
    lines += [
        "",
        "Paired differences (a - b, points), [95% bootstrap on the same resamples]:",
        "",
        "| scope | a | b | ΔAUC | ΔPAUC | ΔAR | P(ΔAUC <= 0) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["comparisons"]:
        lines.append(
            f"| {c['scope']} | {c['a']} | {c['b']} | {_delta(c, 'delta_auc', 'ci95')} | "
            f"{_delta(c, 'delta_pauc', 'delta_pauc_ci95')} | "
            f"{_delta(c, 'delta_ar', 'delta_ar_ci95')} | {c['p_le_0']:.3f} |"
        )
    return "\n".join(lines)


def merged_summary(results: Sequence[dict[str, Any]]) -> str:
    """Cross-pool Markdown table of ``tagrouter eval --merged`` results (pooled scope)."""
    out = [
        "AUC (%) [95% bootstrap], pooled over target sources; paired ΔAUC (points), bold where "
        "the interval excludes 0:",
        "",
        "| pool | recipe | A alone | others alone | merged | merged - alone | merged - others |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        rows = {(r["method"], r["set"]): r for r in res["results"] if r["scope"] == POOLED}
        comps = {(c["a"], c["b"]): c for c in res["comparisons"] if c["scope"] == POOLED}
        for m in dict.fromkeys(k[0] for k in rows):
            cells = [_cell(rows[(m, w)]) if (m, w) in rows else "" for w in SETS]
            for b in ("alone", "others"):
                c = comps.get((f"{m} merged", f"{m} {b}"))
                if c is None:
                    cells.append("")
                    continue
                lo, hi = c["ci95"]
                mark = "**" if lo > 0 or hi < 0 else ""
                cells.append(f"{mark}{_delta(c, 'delta_auc', 'ci95')}{mark}")
            out.append(f"| {res.get('pool') or 'pool'} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)
