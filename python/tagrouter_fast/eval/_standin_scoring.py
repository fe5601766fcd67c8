"""Minimal numpy TagScorer/TagDecider with the agreed interface, used only when
``tagrouter_fast.scoring`` is not importable (the evaluated TagRouter is the product's code path
whenever it exists; :func:`scoring_impl` says which one ran).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

_R = {"win": 0, "tie": 1, "loss": 2}


class TagScorer:
    """score(M, t) per paper 3.3 ("paper"), w_t = 1 ("none"), or shrunk per-tag means."""

    def __init__(self, models, tags, table):
        self.models = models
        self.tags = tags
        self._idx = {t: i for i, t in enumerate(tags)}
        self._table = table  # (n_tags, n_models)

    @classmethod
    def from_records(
        cls,
        records: Iterable[tuple[str, Sequence[str], str, str]],
        s_win: float = 1.0,
        s_tie: float = 0.15,
        s_loss: float = -1.0,
        weighting: str = "paper",
        prior_strength: float = 0.0,
    ) -> TagScorer:
        counts: dict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros(3))
        tag_queries: dict[str, set] = defaultdict(set)
        models: dict[str, None] = {}
        mtot: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
        for qid, tags, model, outcome in records:
            models.setdefault(model)
            r = _R[outcome]
            mtot[model][r] += 1
            for t in dict.fromkeys(tags):
                counts[(t, model)][r] += 1
                tag_queries[t].add(qid)
        tags = list(tag_queries)
        mlist = list(models)
        s = np.array([s_win, s_tie, s_loss])
        count_t = np.array([len(tag_queries[t]) for t in tags], dtype=float)
        total = count_t.sum()
        table = np.zeros((len(tags), len(mlist)))
        for i, t in enumerate(tags):
            for j, m in enumerate(mlist):
                c = counts.get((t, m))
                if c is None:
                    c = np.zeros(3)
                if weighting == "paper":
                    table[i, j] = (1 - np.exp(-count_t[i])) / total * (c @ s)
                elif weighting == "none":
                    table[i, j] = c @ s
                elif weighting == "shrunk":
                    mu = (mtot[m] @ s) / max(mtot[m].sum(), 1)
                    table[i, j] = (c @ s + prior_strength * mu) / (c.sum() + prior_strength) if (
                        c.sum() + prior_strength
                    ) > 0 else mu
                else:
                    raise ValueError(f"unknown weighting {weighting!r}")
        return cls(mlist, tags, table)

    def score(self, model: str, tag: str) -> float:
        i = self._idx.get(tag)
        return 0.0 if i is None else float(self._table[i, self.models.index(model)])


class TagDecider:
    def __init__(self, scorer, costs, llm=None, theta=0.0, fallback=None):
        self.scorer = scorer
        self.costs = dict(costs)
        self.llm = llm or max(scorer.models, key=lambda m: self.costs[m])
        self.theta = theta
        self.fallback = fallback or self.llm

    def scores_batch(self, tag_lists):
        sc = self.scorer
        out = np.zeros((len(tag_lists), len(sc.models)))
        for q, tags in enumerate(tag_lists):
            ids = [sc._idx[t] for t in dict.fromkeys(tags) if t in sc._idx]
            if ids:
                out[q] = sc._table[ids].sum(axis=0)
        return out

    def deltas_batch(self, tag_lists):
        sc = self.scorer
        s = self.scores_batch(tag_lists)
        j = sc.models.index(self.llm)
        slm = [k for k in range(len(sc.models)) if k != j]
        d = s[:, slm].max(axis=1) - s[:, j]
        known = np.array([any(t in sc._idx for t in tags) for tags in tag_lists], dtype=bool)
        return np.where(known, d, np.nan)
