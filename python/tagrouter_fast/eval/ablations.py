"""One-command TagRouter ablations (paper 5.2.4, F.1, F.2, D.6).

Each ablation is a list of methods evaluated by the same protocol; ``prior`` and
``RouterBench-KNN`` are included as fixed points of comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tagrouter_fast.build.folds import stratified_folds
from tagrouter_fast.eval.methods import (
    Fitted,
    Method,
    TrainSet,
    fit_knn,
    fit_prior,
    fit_variant,
)

__all__ = ["methods_for", "subsample"]


def _tr(name: str, **options: Any) -> Method:
    """The product's paper variant with single settings changed."""

    def fit(train: TrainSet, seed: int) -> Fitted:
        return fit_variant(train, seed, "paper", **options)

    return Method(name, "tagrouter", fit)


def subsample(train: TrainSet, size: int, seed: int) -> TrainSet:
    """A stratified random subset of ``size`` training queries (all of them if fewer)."""
    n = len(train.query_ids)
    if size >= n:
        return train
    # Deal the training rows into n // size folds and keep one of them: stratified by subset.
    k = max(2, n // size)
    rows = stratified_folds(train.subsets, k, seed + 104729)[0]
    if len(rows) > size:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))
    return train.subset_rows(rows)


def methods_for(ablation: str, train_sizes: Sequence[int] = (100, 300, 1000)) -> list[Method]:
    """The methods of one ablation: ``stie``, ``wt``, ``align``, ``norm`` or ``trainsize``."""
    base = [Method("prior", "baseline", fit_prior), Method("RouterBench-KNN", "baseline", fit_knn)]
    if ablation == "stie":
        return base + [
            _tr(f"TagRouter s_tie={v:g}", s_tie=v) for v in (0.0, 0.15, 0.5, 1.0)
        ]
    if ablation == "wt":
        return base + [
            _tr("TagRouter w_t=paper", weighting="paper"),
            _tr("TagRouter w_t=1", weighting="none"),
        ]
    if ablation == "align":
        return base + [
            _tr("TagRouter align=on", align=True),
            _tr("TagRouter align=off", align=False),
        ]
    if ablation == "norm":
        return base + [
            _tr("TagRouter norm=on", normalize=True),
            _tr("TagRouter norm=off", normalize=False),
        ]
    if ablation == "trainsize":
        out = list(base)
        for size in list(train_sizes) + [0]:
            label = "all" if size == 0 else str(size)
            for nm, fit in (
                ("TagRouter", lambda t, s: fit_variant(t, s, "paper")),
                ("RouterBench-KNN", fit_knn),
            ):

                def f(t, s, size=size, fit=fit):
                    return fit(subsample(t, size, s) if size else t, s)

                out.append(
                    Method(f"{nm} n={label}", "tagrouter" if nm == "TagRouter" else "baseline", f)
                )
        return out
    raise ValueError(f"unknown ablation {ablation!r}")
