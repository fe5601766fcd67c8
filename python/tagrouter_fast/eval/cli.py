"""`tagrouter eval`: cross-validated comparison of TagRouter and the baselines on a routing table.

Example::

    tagrouter eval --data ../shared/data/alpacaeval2 --pool pair-api --folds 5 \\
        --json pair.json --plot pair.png
    tagrouter eval --data DIR --pool five-api --ablation stie --json stie.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ABLATIONS", "add_eval_parser", "build_result", "run_eval"]

ABLATIONS = ("stie", "wt", "align", "norm", "trainsize", "head")
#: ``--tagger`` choices: DefaultTagger keyword arguments.
TAGGERS: dict[str, dict[str, Any]] = {
    "default": {},
    "default+shape": {"shape_tags": True},
    # The default tagger before 2026-12-07 (the instruction head from a run of its own): the
    # tables of docs/eval-results.md were measured with it.
    "default+ownhead": {"head_pooling": False},
    "default+shape+ownhead": {"shape_tags": True, "head_pooling": False},
}


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` sub-command on an ``argparse`` sub-parsers object."""
    e = subparsers.add_parser(
        "eval", help="cross-validated evaluation of routers on a routing table"
    )
    _add_args(e)
    e.set_defaults(func=run_eval)
    sg = subparsers.add_parser(
        "eval-signal",
        help="how much routing signal a pool holds, and the power to detect a better router",
    )
    _add_signal_args(sg)
    sg.set_defaults(func=run_signal_cmd)
    sm = subparsers.add_parser(
        "eval-summary",
        help="one table across pools (or newcomer cases, or merged-store runs) from "
        "`tagrouter eval --json` files",
    )
    sm.add_argument("json", nargs="+", metavar="RESULT.json", help="results of tagrouter eval")
    sm.add_argument(
        "--plot", metavar="OUT.png", help="newcomer results: every case's recovery curves"
    )
    sm.set_defaults(func=run_summary_cmd)
    return e


def run_summary_cmd(args: argparse.Namespace) -> int:
    """Entry point of ``tagrouter eval-summary``: the README's cross-pool table."""
    from tagrouter_fast.eval.report import summary_table

    results: list[dict[str, Any]] = []
    kinds = set()
    for path in args.json:
        try:
            res = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a tagrouter eval JSON result ({e})") from e
        if isinstance(res, dict) and "newcomers" in res:  # several newcomers in one run
            cases = list(res["newcomers"])
        else:
            cases = [res]
        for r in cases:
            if not isinstance(r, dict):
                raise ValueError(f"{path}: not a tagrouter eval JSON result")
            kind = (
                "newcomer"
                if "newcomer" in r
                else "merged"
                if "targets" in r
                else "pools"
                if "methods" in r
                else None
            )
            if kind is None:
                raise ValueError(
                    f"{path}: not a tagrouter eval JSON result (no 'methods', 'newcomer' or "
                    "'targets')"
                )
            kinds.add(kind)
            results.append(r)
    if len(kinds) > 1:
        raise ValueError(
            f"results of different experiments ({sorted(kinds)}): summarize each kind separately"
        )
    if kinds == {"newcomer"}:
        from tagrouter_fast.eval.newcomer import newcomer_summary, plot_recovery

        print(newcomer_summary(results))
        if args.plot:
            plot_recovery(results, args.plot)
    elif args.plot:
        raise ValueError("--plot draws newcomer (--add-model) results only")
    elif kinds == {"merged"}:
        from tagrouter_fast.eval.merged import merged_summary

        print(merged_summary(results))
    else:
        print(summary_table(results))
    return 0


def _add_pool_args(e: argparse.ArgumentParser) -> None:
    """The table, pool and fold arguments shared by ``eval`` and ``eval-signal``."""
    e.add_argument(
        "--data", required=True, metavar="DIR", help="routing-table dir (queries.csv, outcomes.csv)"
    )
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--pool", help="named pool (see tagrouter_fast.data.pools.POOLS)")
    g.add_argument("--models", help="comma-separated model names")
    e.add_argument("--llm", help="M_LLM (default: the pool's, else the most expensive model)")
    e.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")


def _pool_models(args: argparse.Namespace) -> list[str] | None:
    return [m.strip() for m in args.models.split(",")] if args.models else None


def _add_signal_args(e: argparse.ArgumentParser) -> None:
    _add_pool_args(e)
    e.add_argument("--seed", type=int, default=0, help="split and simulation seed (default 0)")
    e.add_argument(
        "--reps", type=int, default=100, help="simulated routers per correlation (default 100)"
    )
    e.add_argument(
        "--rho-rival",
        type=float,
        default=0.1,
        help="gain correlation of the rival router in the power curve (default 0.1)",
    )
    e.add_argument("--json", metavar="OUT", help="write every number as JSON")


def run_signal_cmd(args: argparse.Namespace) -> int:
    """Entry point of ``tagrouter eval-signal``."""
    from tagrouter_fast.eval.signal import run_signal, signal_report

    if not 0.0 <= args.rho_rival < 1.0:
        raise ValueError(f"--rho-rival must be in [0, 1), got {args.rho_rival}")
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    models = _pool_models(args)
    res = run_signal(
        args.data,
        pool=args.pool,
        models=models,
        llm=args.llm,
        folds=args.folds,
        seed=args.seed,
        reps=args.reps,
        rho_rival=args.rho_rival,
    )
    print(signal_report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(_clean(res), indent=1, allow_nan=False))
    return 0


def _add_args(e: argparse.ArgumentParser) -> None:
    _add_pool_args(e)
    e.add_argument("--seeds", default="0", help="comma-separated split seeds (default 0)")
    e.add_argument("--inner-folds", type=int, default=3, help="inner CV folds for operating points")
    e.add_argument("--methods", help="comma-separated method names (default: all)")
    e.add_argument(
        "--tagger",
        choices=list(TAGGERS),
        default="default",
        help="tagger of every tag-based method: the embedded DefaultTagger, or it plus "
        "query-shape tags (default: default)",
    )
    e.add_argument("--ablation", choices=ABLATIONS, help="run one TagRouter ablation instead")
    e.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    e.add_argument("--json", metavar="OUT", help="write every number as JSON")
    e.add_argument("--plot", metavar="OUT.png", help="write the AR-vs-ratio curves")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    n = e.add_argument_group("newcomer (a model joins with N judgments; docs/eval.md)")
    n.add_argument(
        "--add-model",
        metavar="MODEL[,MODEL]",
        help="measure how the pool absorbs each of these pool models when it joins last",
    )
    n.add_argument(
        "--judgments",
        default="0,10,25,50,100,200,all",
        help="numbers of the newcomer's judgments, 'all' = every training judgment "
        "(default 0,10,25,50,100,200,all)",
    )
    n.add_argument(
        "--draws",
        type=int,
        default=3,
        help="draws of the judged queries per fold (default 3); the intervals resample them",
    )
    n.add_argument(
        "--selection",
        default="random,stratified,uncertainty",
        help="how judged queries are chosen: random, stratified, uncertainty "
        "(suggest_judgments strategies), hybrid (the paper's Alg. 2 hybrid tag weights) "
        "(default random,stratified,uncertainty)",
    )
    mg = e.add_argument_group(
        "merged stores (per source of the table's subsets: its own judgments, the other "
        "sources', or both)"
    )
    mg.add_argument(
        "--merged",
        action="store_true",
        help="compare, per target source, TagRouter stores built from it alone, from the other "
        "sources alone, and merged",
    )


def _methods(
    names: str | None, ablation: str | None, train_sizes: Sequence[int] = (100, 300, 1000)
):
    from tagrouter_fast.eval import ablations
    from tagrouter_fast.eval.methods import default_methods

    if ablation:
        return ablations.methods_for(ablation, train_sizes)
    ms = default_methods()
    if names:
        want = [n.strip() for n in names.split(",") if n.strip()]
        known = {m.name: m for m in ms}
        bad = [n for n in want if n not in known]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {list(known)}")
        ms = [known[n] for n in want]
    return ms


def build_result(
    data: str | Path,
    pool: str | None = None,
    models: Sequence[str] | None = None,
    llm: str | None = None,
    folds: int = 5,
    seeds: Sequence[int] = (0,),
    methods: Any = None,
    inner_folds: int = 3,
    n_boot: int = 1000,
    progress: bool = True,
    table: Any = None,
    features: Any = None,
    tagger: str = "default",
) -> dict[str, Any]:
    """Load, featurise, cross-validate and summarise; return the result dictionary (JSON schema
    of ``docs/eval.md``). ``tagger`` names a :data:`TAGGERS` entry."""
    from tagrouter_fast.data.pools import resolve_pool
    from tagrouter_fast.data.table import load_table
    from tagrouter_fast.eval.features import compute_features
    from tagrouter_fast.eval.methods import default_methods
    from tagrouter_fast.eval.protocol import PoolData, evaluate, summarize

    t0 = time.perf_counter()
    table = table if table is not None else load_table(data)
    models, llm = resolve_pool(table, pool, models, llm)
    if tagger not in TAGGERS:
        raise ValueError(f"unknown tagger {tagger!r}; known: {list(TAGGERS)}")
    tg = None
    if features is None:
        from tagrouter_fast.tagging.taggers import DefaultTagger

        tg = DefaultTagger(**TAGGERS[tagger])
        features = compute_features(table.texts, tagger=tg)
    feats = features
    t_feat = time.perf_counter() - t0
    pd = PoolData.build(table, models, llm, feats, tagger=tg)
    methods = list(methods) if methods is not None else default_methods()
    n_steps = folds * len(seeds) * len(methods)
    bar = None
    cb = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_steps, desc=f"eval {pool or 'pool'}", unit="fit", file=sys.stderr)

        def cb(name: str) -> None:
            bar.set_postfix_str(name[:24])
            bar.update(1)

    res = evaluate(pd, methods, folds=folds, seeds=seeds, inner_folds=inner_folds, progress=cb)
    if bar is not None:
        bar.close()
    kinds = {m.name: m.kind for m in methods}
    kinds["oracle"] = "oracle"
    for m in models:
        kinds[m] = "model"
    refs = {m.name: m.reference for m in methods if m.reference}
    summary, best = summarize(res, kinds, n_boot=n_boot, references=refs)
    order = models + ["random", "prior", "oracle"] + [m.name for m in methods]
    ordered = {n: summary[n] for n in dict.fromkeys(order) if n in summary}
    return {
        "data": str(data),
        "pool": pool,
        "models": models,
        "llm": llm,
        "folds": folds,
        "seeds": list(seeds),
        "inner_folds": inner_folds,
        "n_queries": len(pd.train_all.query_ids),
        "dropped_incomplete": pd.dropped,
        "encoder": feats.encoder,
        "tagger": feats.tagger,
        "tagger_option": tagger,
        "scorer_impl": "tagrouter_fast.builder.bundle.build_router",
        "best_baseline": best,
        "seconds": {"features": t_feat, "total": time.perf_counter() - t0},
        "methods": ordered,
    }


def run_eval(args: argparse.Namespace) -> int:
    """Entry point of ``tagrouter eval``: print the table, write JSON and PNG if asked."""
    from tagrouter_fast.eval.report import markdown_table, plot_curves

    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    models = _pool_models(args)
    if args.merged:
        if args.add_model:
            raise ValueError("--merged and --add-model are separate experiments: give one")
        return _run_merged_cmd(args, seeds, models)
    if args.add_model:
        return _run_newcomer_cmd(args, seeds, models)
    methods = _methods(args.methods, args.ablation)
    result = build_result(
        args.data,
        pool=args.pool,
        models=models,
        llm=args.llm,
        folds=args.folds,
        seeds=seeds,
        methods=methods,
        inner_folds=args.inner_folds,
        n_boot=args.bootstrap,
        progress=not args.no_progress,
        tagger=args.tagger,
    )
    if args.ablation:
        result["ablation"] = args.ablation
    print(markdown_table(result))
    print(
        f"\n({result['seconds']['total']:.1f} s; tagger {result['tagger']}, "
        f"scorer {result['scorer_impl']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(_clean(result), indent=1, allow_nan=False))
    if args.plot:
        plot_curves(result, args.plot)
    return 0


def _parse_ns(text: str) -> list[int]:
    from tagrouter_fast.eval.newcomer import ALL

    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part == "all":
            out.append(ALL)
            continue
        try:
            k = int(part)
        except ValueError:
            raise ValueError(f"--judgments: {part!r} is not a count or 'all'") from None
        if k < 0:
            raise ValueError(f"--judgments: {k} < 0")
        out.append(k)
    if not out:
        raise ValueError("--judgments: no counts given")
    return out


def _run_newcomer_cmd(
    args: argparse.Namespace, seeds: Sequence[int], models: list[str] | None
) -> int:
    """``tagrouter eval --add-model M``: the newcomer experiment on one pool."""
    from tagrouter_fast.data.pools import resolve_pool
    from tagrouter_fast.data.table import load_table
    from tagrouter_fast.eval.features import compute_features
    from tagrouter_fast.eval.newcomer import newcomer_report, plot_recovery, run_newcomer
    from tagrouter_fast.eval.protocol import PoolData
    from tagrouter_fast.tagging.taggers import DefaultTagger

    if args.draws < 1:
        raise ValueError(f"--draws must be >= 1, got {args.draws}")
    ns = _parse_ns(args.judgments)
    selections = [s.strip() for s in args.selection.split(",") if s.strip()]
    table = load_table(args.data)
    pool_models, llm = resolve_pool(table, args.pool, models, args.llm)
    newcomers = [m.strip() for m in args.add_model.split(",") if m.strip()]
    bad = [m for m in newcomers if m not in pool_models]
    if bad:
        raise ValueError(f"--add-model: {bad} not in the pool {pool_models}")
    tg = DefaultTagger(**TAGGERS[args.tagger])
    feats = compute_features(table.texts, tagger=tg)
    pd = PoolData.build(table, pool_models, llm, feats, tagger=tg)
    results = []
    for m in newcomers:
        bar = None
        cb = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"newcomer {m}", unit="step", file=sys.stderr)

            def cb(name: str, bar: Any = bar) -> None:
                bar.set_postfix_str(name[:24])
                bar.update(1)

        res = run_newcomer(
            pd,
            m,
            ns,
            folds=args.folds,
            seeds=seeds,
            draws=args.draws,
            selections=selections,
            n_boot=args.bootstrap,
            progress=cb,
        )
        if bar is not None:
            bar.close()
        res.update(data=str(args.data), pool=args.pool, tagger=feats.tagger)
        print(newcomer_report(res))
        print()
        results.append(res)
    if args.json:
        out = results[0] if len(results) == 1 else {"newcomers": results}
        Path(args.json).write_text(json.dumps(_clean(out), indent=1, allow_nan=False))
    if args.plot:
        plot_recovery(results, args.plot)
    return 0


def _run_merged_cmd(
    args: argparse.Namespace, seeds: Sequence[int], models: list[str] | None
) -> int:
    """``tagrouter eval --merged``: the merged-stores experiment on one pool."""
    from tagrouter_fast.data.pools import resolve_pool
    from tagrouter_fast.data.table import load_table
    from tagrouter_fast.eval.features import compute_features
    from tagrouter_fast.eval.merged import merged_report, run_merged
    from tagrouter_fast.eval.protocol import PoolData
    from tagrouter_fast.tagging.taggers import DefaultTagger

    table = load_table(args.data)
    pool_models, llm = resolve_pool(table, args.pool, models, args.llm)
    tg = DefaultTagger(**TAGGERS[args.tagger])
    feats = compute_features(table.texts, tagger=tg)
    pd = PoolData.build(table, pool_models, llm, feats, tagger=tg)
    bar = None
    cb = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="merged stores", unit="fold", file=sys.stderr)

        def cb(name: str) -> None:
            bar.set_postfix_str(name[:24])
            bar.update(1)

    res = run_merged(pd, folds=args.folds, seeds=seeds, n_boot=args.bootstrap, progress=cb)
    if bar is not None:
        bar.close()
    res.update(data=str(args.data), pool=args.pool, tagger=feats.tagger)
    print(merged_report(res))
    print(f"\n({res['seconds']:.1f} s; tagger {res['tagger']})")
    if args.json:
        Path(args.json).write_text(json.dumps(_clean(res), indent=1, allow_nan=False))
    return 0


def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to ``null``."""
    import math

    import numpy as np

    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m tagrouter_fast.eval.cli``)."""
    p = argparse.ArgumentParser(prog="tagrouter eval", description=__doc__)
    _add_args(p)
    args = p.parse_args(argv)
    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
