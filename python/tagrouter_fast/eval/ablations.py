"""One-command TagRouter ablations (paper 5.2.4, F.1, F.2, D.6).

Each ablation is a list of methods evaluated by the same protocol; ``prior`` and
``RouterBench-KNN`` are included as fixed points of comparison.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tagrouter_fast.builder.folds import stratified_folds
from tagrouter_fast.eval.methods import (
    Fitted,
    Method,
    TrainSet,
    fit_knn,
    fit_prior,
    fit_variant,
)

__all__ = ["methods_for", "retagged", "subsample"]


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


#: Tags of each text under a tagger (by fingerprint), computed once per process.
_TAGS: dict[str, dict[str, list[str]]] = {}


def _tags_of(tagger: Any, texts: Sequence[str]) -> list[list[str]]:
    memo = _TAGS.setdefault(tagger.fingerprint, {})
    todo = list(dict.fromkeys(t for t in texts if t not in memo))
    if todo:
        memo.update(zip(todo, tagger.tag_batch(todo), strict=True))
    return [list(memo[t]) for t in texts]


class _Retagged(Fitted):
    """A fitted router whose queries are tagged by another tagger before routing."""

    def __init__(self, inner: Fitted, tagger: Any) -> None:
        self.inner = inner
        self.tagger = tagger
        self.fixed_threshold = getattr(inner, "fixed_threshold", None)
        self.info = getattr(inner, "info", {})

    def route(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.route(dataclasses.replace(x, tags=_tags_of(self.tagger, x.texts)))


def retagged(
    fit: Callable[[TrainSet, int], Fitted], make_tagger: Callable[[], Any]
) -> Callable[[TrainSet, int], Fitted]:
    """``fit`` on the same folds with every query (training and routed) tagged by another
    tagger: the paired comparison of two taggers under one protocol."""
    made: list[Any] = []

    def refit(train: TrainSet, seed: int) -> Fitted:
        if not made:
            made.append(make_tagger())
        tg = made[0]
        t2 = dataclasses.replace(train, tags=_tags_of(tg, train.texts), tagger=tg)
        return _Retagged(fit(t2, seed), tg)

    return refit


def _pooled_head_tagger() -> Any:
    from tagrouter_fast.tagging.taggers import DefaultTagger

    return DefaultTagger(head_pooling=True)


def methods_for(ablation: str, train_sizes: Sequence[int] = (100, 300, 1000)) -> list[Method]:
    """The methods of one ablation: ``stie``, ``wt``, ``align``, ``norm``, ``trainsize`` or
    ``head`` (the instruction head from a run of its own against pooled from the query's run,
    ``DefaultTagger(head_pooling=True)``, the default since 2026-12-07; run it with
    ``--tagger default+ownhead`` so the run's own tagger is the other arm)."""
    base = [Method("prior", "baseline", fit_prior), Method("RouterBench-KNN", "baseline", fit_knn)]
    if ablation == "stie":
        return base + [_tr(f"TagRouter s_tie={v:g}", s_tie=v) for v in (0.0, 0.15, 0.5, 1.0)]
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
    if ablation == "head":
        out = list(base)
        for name, recipe in (("TagRouter", "paper"), ("TagRouter+", "plus")):

            def fit_r(t: TrainSet, s: int, recipe: str = recipe) -> Fitted:
                return fit_variant(t, s, recipe)

            out.append(Method(name, "tagrouter", fit_r))
            out.append(
                Method(
                    f"{name} pooled head",
                    "tagrouter",
                    retagged(fit_r, _pooled_head_tagger),
                    reference=name,
                )
            )
        return out
    raise ValueError(f"unknown ablation {ablation!r}")
