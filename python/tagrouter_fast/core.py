"""TagScorer and TagDecider (paper 3.3-3.4): the routing core, a thin typed layer over the Rust
extension `tagrouter_fast._core`.

A `TagScorer` holds raw win/tie/loss counts per (tag, model) and the tag frequencies, and derives
``score(M, t) = w_t * sum_r count(t, M, r) * s_r``. A `TagDecider` routes a query's tags to the
model with the highest summed (or, optionally, averaged) score, then applies the paper's
cost-aware threshold theta.

>>> records = [
...     ("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss"),
...     ("q2", ["Math"], "big", "loss"), ("q2", ["Math"], "small", "win"),
... ]
>>> decider = TagDecider(TagScorer.from_records(records), costs={"big": 10.0, "small": 1.0})
>>> decider.route_tags(["Math"])
'small'

Tag generators answer ``"a, b, c"``; `split_tags` (the Rust splitter every raw-string path uses)
turns that into tags, trimming what Python's ``str.strip()`` trims:

>>> split_tags(" Poem, , Text Rewriting ")
['Poem', 'Text Rewriting']
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tagrouter_fast import _core
from tagrouter_fast._core import (
    Decision,
    InconsistentRecordsError,
    NoCandidateError,
    StoreFormatError,
    TagRouterError,
    UnknownModelError,
    UnknownTagError,
)
from tagrouter_fast._core import Store as _Store
from tagrouter_fast.curve import (
    DecisionArrays,
    ThetaSearch,
    sweep_auc,
    sweep_curve,
    sweep_theta,
    theta_for_llm_share,
    weighted_areas,
)
from tagrouter_fast.options import (
    AGGREGATIONS,
    DEFAULT_AGGREGATION,
    DEFAULT_WEIGHTING,
    S_LOSS,
    S_TIE,
    S_WIN,
    WEIGHTINGS,
)

__all__ = [
    # The option vocabularies live in `tagrouter_fast.options`; importable from here too.
    "AGGREGATIONS",
    "WEIGHTINGS",
    "Decision",
    "DecisionArrays",
    "finite_for_json",
    "InconsistentRecordsError",
    "NoCandidateError",
    "Record",
    "StoreFormatError",
    "TagDecider",
    "TagRouterError",
    "TagScorer",
    "ThetaSearch",
    "UnknownModelError",
    "UnknownTagError",
    "split_tags",
    "sweep_auc",
    "sweep_curve",
    "weighted_areas",
    "sweep_theta",
    "theta_for_llm_share",
]

Record = tuple[Any, Sequence[str], str, str]
"""One outcome record: ``(query_id, tags, model, outcome)`` with outcome "win", "tie" or "loss"."""

# ==== Scorer ====


class TagScorer:
    """The key-value store of tag capabilities: counts, tag frequencies and scores.

    Build one with `from_records` or `load`. A scorer is an immutable value: the updates
    (`with_records`, `with_model`, `without_model`, `merged`, `reweighted`) return a new scorer
    and leave this one as it was, so deciders and routers holding it are never changed under
    them. Route with an updated store through `TagDecider.with_store`, or swap it into a running
    router with `TagRouter.swap_store` / `TagRouter.update_store`.

    Weightings: "paper" (the paper's ``w_t = (1 - exp(-count_t)) / sum_t' count_t'``), "none"
    (``w_t = 1``, the w_t ablation), "shrunk" (per-tag mean outcome score shrunk towards the
    model's global mean ``mu_M`` with pseudo-count ``prior_strength``:
    ``(sum_r count(t, M, r) * s_r + k * mu_M) / (n(t, M) + k)``), "difficulty" (the same
    shrinkage towards a per-(tag, model) prior instead of ``mu_M``: on the logit of the rate
    ``u(x) = (x - s_loss) / (s_win - s_loss)``, the model's ability ``logit(u(mu_M))`` plus the
    tag's difficulty ``logit(u(g_t)) - logit(u(G))``, where ``G`` is the grand mean over all
    models and ``g_t`` every model's mean on ``t`` shrunk towards ``G`` with the same ``k``; so a
    model with no evidence on a tag that the other models find hard scores low on it. Needs
    ``s_win > s_loss``).

    >>> recs = [("q1", ["Poem"], "a", "win"), ("q1", ["Poem"], "b", "tie")]
    >>> scorer = TagScorer.from_records(recs)
    >>> round(scorer.score("a", "Poem"), 4), scorer.counts("b", "Poem")
    (0.6321, (0, 1, 0))
    """

    __slots__ = ("_core",)
    _core: _Store

    def __init__(self, core: _Store) -> None:
        """Wraps a core store; use `from_records` or `load` instead."""
        if not isinstance(core, _core.Store):
            raise TypeError("use TagScorer.from_records(...) or TagScorer.load(path)")
        object.__setattr__(self, "_core", core)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"TagScorer is immutable (cannot set {name!r}); with_records(), with_model(), "
            "without_model(), merged() and reweighted() return a new scorer"
        )

    @classmethod
    def from_records(
        cls,
        records: Iterable[Record],
        s_win: float = S_WIN,
        s_tie: float = S_TIE,
        s_loss: float = S_LOSS,
        weighting: str = DEFAULT_WEIGHTING,
        prior_strength: float = 0.0,
    ) -> TagScorer:
        """Builds a store from outcome records.

        Args:
            records: ``(query_id, tags, model, outcome)`` tuples; outcome is "win", "tie" or
                "loss" of the model's answer against the reference. A query id may repeat (one
                record per model) but always with the same tag set.
            s_win: score of a win (paper: 1).
            s_tie: score of a tie (paper F.2: 0.15).
            s_loss: score of a loss (paper: -1).
            weighting: one of `tagrouter_fast.options.WEIGHTINGS`: "paper", "none", "shrunk"
                or "difficulty".
            prior_strength: pseudo-count k of the "shrunk" and "difficulty" weightings (ignored
                by the others).

        Returns:
            The store.

        Raises:
            ValueError: an unknown outcome label or weighting, a malformed record, non-finite
                s_r, a negative prior_strength, ``s_win <= s_loss`` with "difficulty".
            TypeError: a tag or model that is not a str.
            InconsistentRecordsError: one query id with two different tag sets.

        >>> TagScorer.from_records([("q1", ["Poem"], "a", "win")]).models
        ['a']
        """
        return cls(
            _core.Store.from_records(records, s_win, s_tie, s_loss, weighting, prior_strength)
        )

    @classmethod
    def from_table(
        cls,
        table_dir: str | os.PathLike[str],
        tags: str | os.PathLike[str] | Mapping[str, Sequence[str] | str],
        models: Sequence[str] | None = None,
        *,
        missing: str = "error",
        unknown: str = "error",
        **score_params: Any,
    ) -> TagScorer:
        """Builds a store from a routing table (queries.csv + outcomes.csv) and a tags file.

        The routing-table format is read and validated by `tagrouter_fast.data.table.load_table`; a
        (query, model) pair with no outcome row gives no record (missing data, not a loss).

        Args:
            table_dir: folder holding ``queries.csv`` and ``outcomes.csv``.
            tags: a JSON file ``{query_id: [tag, ...]}``, or such a mapping. A value may also be
                a generator's raw ``"a, b, c"`` string (split like `split_tags`).
            models: models to include (default: every model of the table).
            missing: what to do with table queries that have no tags entry: "error" (default)
                or "skip" (leave them out of the store).
            unknown: what to do with tags entries for query ids the table lacks: "error"
                (default) or "ignore".
            **score_params: ``s_win``, ``s_tie``, ``s_loss``, ``weighting``,
                ``prior_strength``, as in `from_records`.

        Returns:
            The store.

        Raises:
            ValueError: queries without tags (``missing="error"``), tags for unknown queries
                (``unknown="error"``), a malformed tags file or entry, no query left, or a bad
                ``missing``/``unknown``/score parameter. The message names the query ids.
            tagrouter_fast.data.table.DataError: a malformed routing table (a ValueError too).
            KeyError: a model in ``models`` that the table lacks.
            OSError: a file cannot be read.

        >>> import json, pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "queries.csv").write_text("query_id,query_text\\nq1,Write a poem\\n")
        >>> _ = (d / "outcomes.csv").write_text("query_id,model,outcome\\nq1,a,win\\nq1,b,loss\\n")
        >>> TagScorer.from_table(d, {"q1": ["Poem"]}).counts("a", "Poem")
        (1, 0, 0)
        """
        from tagrouter_fast.data.tags import table_records

        bad = set(score_params) - {"s_win", "s_tie", "s_loss", "weighting", "prior_strength"}
        if bad:
            raise TypeError(f"from_table() got unexpected keyword arguments {sorted(bad)}")
        records = table_records(table_dir, tags, models, missing=missing, unknown=unknown)
        return cls.from_records(records, **score_params)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TagScorer:
        """Loads a store file written by `save` (format: docs/store-format.md).

        Raises:
            StoreFormatError: not a store, another format version, truncated or corrupt.
            OSError: the file cannot be read.
        """
        return cls(_core.Store.load(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the store file atomically (temporary file, fsync, rename).

        Raises:
            OSError: the file cannot be written; an existing file at ``path`` is left as it was.
        """
        self._core.save(path)

    def to_bytes(self) -> bytes:
        """The store file's contents."""
        return self._core.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> TagScorer:
        """Parses the contents of a store file."""
        return cls(_core.Store.from_bytes(data))

    # ---- reading ----

    def score(self, model: str, tag: str) -> float:
        """The paper's ``score(M, t)`` (or the chosen weighting's).

        Raises:
            UnknownModelError: ``model`` is not in the store.
            UnknownTagError: ``tag`` is not in the store.
        """
        return self._core.score(model, tag)

    def counts(self, model: str, tag: str) -> tuple[int, int, int]:
        """``(win, tie, loss)``: on how many training queries carrying ``tag`` ``model`` won,
        tied, lost."""
        return self._core.counts(model, tag)

    def tag_count(self, tag: str) -> int:
        """``count_t``: distinct training queries carrying ``tag``."""
        return self._core.tag_count(tag)

    def model_totals(self, model: str) -> tuple[int, int, int]:
        """``(win, tie, loss)`` of ``model`` over all its records."""
        return self._core.model_totals(model)

    def queries(self) -> list[tuple[str, list[str], dict[str, tuple[int, int, int]]]]:
        """Every stored query as ``(query_id, tags, {model: (win, tie, loss)})``, in store
        order (tags sorted by their store index, not alphabetically).

        >>> s = TagScorer.from_records([("q1", ["Poem"], "a", "win"), ("q1", ["Poem"], "b", "tie")])
        >>> s.queries()
        [('q1', ['Poem'], {'a': (1, 0, 0), 'b': (0, 1, 0)})]
        """
        return [(q, tags, dict(judged)) for q, tags, judged in self._core.queries()]

    def score_matrix(self) -> np.ndarray:
        """Scores as a ``(len(tags), len(models))`` float64 array."""
        return self._core.score_matrix()

    @property
    def models(self) -> list[str]:
        """Model names, in order of first appearance."""
        return self._core.models

    @property
    def tags(self) -> list[str]:
        """Tag names, in order of first appearance."""
        return self._core.tags

    @property
    def n_queries(self) -> int:
        return self._core.n_queries

    @property
    def n_records(self) -> int:
        return self._core.n_records

    @property
    def n_learned(self) -> int:
        """Live outcomes learned (`TagRouter.learn`): kept as counts attributed to their model,
        not as queries (each is a query of its own for ``count_t``)."""
        return self._core.n_learned

    def learned_counts(self, model: str, tag: str) -> tuple[int, int, int]:
        """``(win, tie, loss)`` live outcomes of ``model`` on ``tag`` (a part of `counts`)."""
        return self._core.learned_counts(model, tag)

    @property
    def s_win(self) -> float:
        return self._core.s_win

    @property
    def s_tie(self) -> float:
        return self._core.s_tie

    @property
    def s_loss(self) -> float:
        return self._core.s_loss

    @property
    def weighting(self) -> str:
        return self._core.weighting

    @property
    def prior_strength(self) -> float:
        return self._core.prior_strength

    def __contains__(self, tag: object) -> bool:
        return isinstance(tag, str) and tag in self._core

    def __len__(self) -> int:
        return len(self._core)

    def __repr__(self) -> str:
        return (
            f"TagScorer({len(self.models)} models, {len(self)} tags, {self.n_queries} queries, "
            f"weighting={self.weighting!r})"
        )

    # ---- updates without retraining: each returns a new scorer ----

    def with_learned(self, outcomes: Iterable[tuple[Sequence[str], str, str]]) -> TagScorer:
        """A new store: this one plus ``(tags, model, outcome)`` live outcomes, each a query of
        its own kept as counts (no query row), as `TagDecider.learn` adds them in place.

        >>> a = TagScorer.from_records([("q1", ["Poem"], "m", "win")])
        >>> b = a.with_learned([(["Poem"], "m", "loss")])
        >>> b.counts("m", "Poem"), b.tag_count("Poem"), b.n_queries, b.n_learned
        ((1, 0, 1), 2, 1, 1)
        """
        return TagScorer(self._core.with_learned(outcomes))

    def with_records(self, records: Iterable[Record]) -> TagScorer:
        """A new store with these outcome records added (for models already in the store or new
        ones); this one is unchanged.

        New query ids raise ``count_t`` of their tags, which changes ``w_t`` and so every
        model's score on those tags, exactly as the formula says.

        >>> a = TagScorer.from_records([("q1", ["Poem"], "m", "win")])
        >>> b = a.with_records([("q2", ["Poem"], "m", "loss")])
        >>> a.n_queries, b.n_queries
        (1, 2)
        """
        return TagScorer(self._core.with_records(records))

    def with_model(self, records: Iterable[Record]) -> TagScorer:
        """A new store with a new model added from (a small set of) its judgments.

        Raises:
            InconsistentRecordsError: the model is already in the store, or the records are
                about more than one model.
            ValueError: no records.
        """
        return TagScorer(self._core.with_model(records))

    def without_model(self, model: str) -> TagScorer:
        """A new store without ``model``, and without the queries and tags only it was judged on.

        Raises:
            UnknownModelError: ``model`` is not in the store.
            ValueError: it is the only model.
        """
        return TagScorer(self._core.without_model(model))

    def merged(self, other: TagScorer) -> TagScorer:
        """A new store holding the counts of this one and ``other`` (as if built from both
        record sets), with this store's scoring parameters."""
        return TagScorer(self._core.merged(other._core))

    def reweighted(
        self,
        *,
        s_win: float | None = None,
        s_tie: float | None = None,
        s_loss: float | None = None,
        weighting: str | None = None,
        prior_strength: float | None = None,
    ) -> TagScorer:
        """A new store with the same counts under other scoring parameters."""
        return TagScorer(
            self._core.reweighted(
                s_win=s_win,
                s_tie=s_tie,
                s_loss=s_loss,
                weighting=weighting,
                prior_strength=prior_strength,
            )
        )


# ==== Decider ====


class TagDecider:
    """Routes a query's tags to a model (paper 3.4).

    ``S(M)`` sums ``score(M, t)`` over the query's distinct known tags (with
    ``aggregation="mean"``: averages them); ``M* = argmax S`` (ties go to the cheaper model, then
    the smaller name). ``M_SLM`` is the argmax over the models
    other than ``M_LLM``; the query goes to ``M_SLM`` when
    ``Delta_q = S(M_SLM) - S(M_LLM) >= theta`` and to ``M_LLM`` otherwise. So theta = 0 is the
    argmax, a lower theta saves cost, a higher one (paper G.1) favours ``M_LLM``. Tags unknown to
    the store are ignored; a query with no known tag goes to ``fallback``.

    Candidate subsets (capability routing): `route_tags`, `decide`, `route_tags_batch` and
    `decide_batch` take ``among=``, the names of the candidates a query may go to (e.g. those
    that support tools or vision), and apply the same rule to that subset, on the same scores,
    without building another decider: ``M*`` and ``M_SLM`` are argmaxes over the subset;
    ``M_LLM`` stays the decider's if it is in the subset, else it is the subset's most expensive
    candidate (ties: the smaller name, as for ``llm=None``); a query with no known tag goes to
    ``fallback`` if it is in the subset, else to that ``M_LLM``. A subset of one candidate takes
    every query. So the decision equals that of a decider built over the subset with those
    roles, and with every candidate listed it is the unrestricted decision exactly. A name that
    is not a candidate raises `UnknownModelError`, an empty subset `NoCandidateError`: a query
    never goes to a model outside its subset.

    Args:
        scorer: the store; the decider keeps a snapshot of its current scores.
        costs: per-model cost of a query; its keys are the candidate models (a subset of the
            store's).
        llm: M_LLM; by default the most expensive candidate (ties: the smaller name).
        theta: the cost-awareness threshold.
        fallback: the model for queries with no known tag; by default M_LLM.
        aggregation: how a query's tag scores combine into ``S(M)``: "sum" (the paper) or
            "mean" (the sum divided by the number of distinct known tags). The mean keeps the
            argmax but puts ``Delta_q`` on a per-tag scale, so a theta means the same for
            queries with few or many tags (TagRouter+ in docs/eval.md pairs it with
            ``weighting="shrunk"``). Choose theta with the aggregation you route with.

    Raises:
        ValueError: empty costs, a NaN, infinite or negative cost, a non-finite theta, an
            aggregation other than "sum" or "mean".
        TypeError: a cost or theta that is not a number, an aggregation that is not a str.
        UnknownModelError: a model in costs, llm or fallback that the store (or costs) lacks.

    >>> recs = [("q", ["Poem"], "big", "win"), ("q", ["Poem"], "small", "tie")]
    >>> scorer = TagScorer.from_records(recs)
    >>> d = TagDecider(scorer, costs={"big": 10.0, "small": 1.0}, theta=-1.0)
    >>> d.decide(["Poem", "Haiku"]).model, d.decide(["Poem", "Haiku"]).unknown_tags
    ('small', ['Haiku'])
    >>> TagDecider(scorer, costs={"big": 10.0, "small": 1.0}, aggregation="mean").aggregation
    'mean'
    """

    def __init__(
        self,
        scorer: TagScorer | _core.Store,
        costs: Mapping[str, float],
        llm: str | None = None,
        theta: float = 0.0,
        fallback: str | None = None,
        aggregation: str = DEFAULT_AGGREGATION,
    ) -> None:
        store = scorer._core if isinstance(scorer, TagScorer) else scorer
        if not isinstance(costs, Mapping):
            raise TypeError(
                f"costs must be a mapping of model name to cost, got {type(costs).__name__}"
            )
        clean: dict[str, float] = {}
        for model, cost in costs.items():
            if isinstance(cost, bool) or not isinstance(
                cost, (int, float, np.floating, np.integer)
            ):
                raise TypeError(f"cost of {model!r} must be a number, got {type(cost).__name__}")
            clean[model] = float(cost)
        if isinstance(theta, bool) or not isinstance(theta, (int, float, np.floating, np.integer)):
            raise TypeError(f"theta must be a number, got {type(theta).__name__}")
        if not isinstance(aggregation, str):
            known = " or ".join(repr(a) for a in AGGREGATIONS)
            raise TypeError(
                f"aggregation must be a str ({known}), got {type(aggregation).__name__}"
            )
        self._bind(_core.Decider(store, clean, llm, float(theta), fallback, aggregation))

    def _bind(self, core: _core.Decider) -> None:
        self._core = core
        # The hot paths go straight to the extension: an instance attribute holding the bound
        # builtin method skips a Python-level call frame (~50 ns, a fifth of route_tags).
        self.route_tags = core.route_tags  # type: ignore[method-assign]
        self.route_tag_string = core.route_tag_string  # type: ignore[method-assign]
        self.route_tags_batch = core.route_tags_batch  # type: ignore[method-assign]
        self.decide = core.decide  # type: ignore[method-assign]

    @classmethod
    def _from_core(cls, core: _core.Decider) -> TagDecider:
        self = cls.__new__(cls)
        self._bind(core)
        return self

    # ---- configuration ----

    @property
    def scorer(self) -> TagScorer:
        """The store snapshot this decider routes with; for a live decider, a value copy of the
        live store's current state (O(store) per call)."""
        return TagScorer(self._core.store)

    @property
    def store_models(self) -> list[str]:
        """Every model of the store, candidates or not, in store order (O(models): no
        snapshot, unlike ``scorer.models`` on a live decider)."""
        return self._core.store_models

    # ---- live learning ----

    def to_live(self) -> TagDecider:
        """The same decider over a live store started from this one's store (a copy; this
        decider is unchanged), or sharing the live store when this decider already has one.
        A live decider learns outcomes in place (`learn`) and routes on its counts as they are
        at each decision; `with_theta` copies share its live store."""
        return TagDecider._from_core(self._core.to_live())

    @property
    def is_live(self) -> bool:
        """Whether this decider routes on a live store (`to_live`)."""
        return self._core.is_live

    @property
    def live_version(self) -> int | None:
        """Changes the live store has applied (None for a snapshot decider)."""
        return self._core.live_version

    def learn(self, outcomes: Iterable[tuple[Sequence[str], str, str]]) -> int:
        """Adds ``(tags, model, outcome)`` outcomes to the live store, in place and together
        (readers see all of them or none). Each is a query of its own judged once for
        ``model``: ``count_t`` of its tags grows by one and the counts by its outcome, so the
        store equals one built with each outcome as a record of a fresh query id (to the last
        bit of every score). O(its tags), whatever the history; mutates the live store every
        decider sharing it routes on. Returns the live store's version.

        Raises:
            ValueError: not a live decider; a malformed outcome or a label other than "win",
                "tie", "loss".

        >>> recs = [("q", ["Poem"], "big", "win"), ("q", ["Poem"], "small", "loss")]
        >>> d = TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0}).to_live()
        >>> d.route_tags(["Poem"])
        'big'
        >>> d.learn([(["Poem"], "small", "win"), (["Poem"], "small", "win")])
        1
        >>> d.route_tags(["Poem"]), d.scorer.counts("small", "Poem"), d.scorer.n_queries
        ('small', (2, 0, 1), 1)
        """
        return self._core.learn(outcomes)

    @property
    def models(self) -> list[str]:
        """Candidate models, in store order (the column order of `scores_batch`)."""
        return self._core.models

    @property
    def costs(self) -> dict[str, float]:
        return self._core.costs

    @property
    def llm(self) -> str:
        return self._core.llm

    @property
    def fallback(self) -> str:
        return self._core.fallback

    @property
    def theta(self) -> float:
        return self._core.theta

    @property
    def aggregation(self) -> str:
        """How tag scores combine into ``S(M)``: "sum" (the paper) or "mean"."""
        return self._core.aggregation

    def with_theta(self, theta: float) -> TagDecider:
        """The same decider with another theta (and the same aggregation)."""
        return TagDecider._from_core(self._core.with_theta(float(theta)))

    def with_store(self, scorer: TagScorer, costs: Mapping[str, float] | None = None) -> TagDecider:
        """The same decider (costs, llm, theta, fallback, aggregation) over another store, e.g.
        an updated one (`TagScorer.with_records`); this decider is unchanged.

        The candidates stay this decider's: a model that is new in ``scorer`` is not routed to
        unless ``costs`` gives its cost. ``costs`` extends (and may override) the current
        costs; M_LLM and the fallback stay as they are.

        Raises:
            UnknownModelError: a candidate (or M_LLM, the fallback) is not in ``scorer``, e.g.
                after `TagScorer.without_model`: build a new `TagDecider` then.
            ValueError, TypeError: a bad cost in ``costs``.

        >>> recs = [("q", ["Poem"], "big", "win"), ("q", ["Poem"], "small", "loss")]
        >>> d = TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0})
        >>> more = d.scorer.with_records([("q2", ["Math"], "small", "win"),
        ...                               ("q2", ["Math"], "big", "loss")])
        >>> d.with_store(more).route_tags(["Math"]), d.route_tags(["Math"])
        ('small', 'big')
        """
        if not isinstance(scorer, TagScorer):
            raise TypeError(f"scorer must be a TagScorer, got {type(scorer).__name__}")
        merged = self.costs
        if costs is not None:
            if not isinstance(costs, Mapping):
                raise TypeError(
                    f"costs must be a mapping of model name to cost, got {type(costs).__name__}"
                )
            merged.update(costs)
        return TagDecider(
            scorer,
            costs=merged,
            llm=self.llm,
            theta=self.theta,
            fallback=self.fallback,
            aggregation=self.aggregation,
        )

    def __repr__(self) -> str:
        return (
            f"TagDecider(models={self.models!r}, llm={self.llm!r}, theta={self.theta!r}, "
            f"aggregation={self.aggregation!r})"
        )

    # ---- routing ----

    def route_tags(self, tags: Sequence[str], *, among: Iterable[str] | None = None) -> str:
        """The model for one query's tags.

        Args:
            tags: the query's tags; those the store does not know are ignored.
            among: names of the candidates the query may go to (class docs); None: all.

        Raises:
            UnknownModelError: a name in ``among`` that is not a candidate.
            NoCandidateError: ``among`` is empty.
            TypeError: ``tags`` or ``among`` is a str, or holds a non-str.

        >>> recs = [("q", ["Poem"], "big", "win"), ("q", ["Poem"], "small", "loss")]
        >>> d = TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0})
        >>> d.route_tags(["Poem"]), d.route_tags(["Poem"], among=["small"])
        ('big', 'small')
        """
        return self._core.route_tags(tags, among=among)

    def route_tag_string(self, raw: str) -> str:
        """The model for a tag generator's raw output ``"a, b, c"`` (split and trimmed in Rust)."""
        return self._core.route_tag_string(raw)

    def route_tags_batch(
        self,
        list_of_tags: Sequence[Sequence[str]],
        *,
        among: Iterable[str] | None = None,
        among_each: Iterable[Iterable[str] | None] | None = None,
    ) -> list[str]:
        """The model for each query; runs without the GIL after reading the input.

        ``among`` restricts every query to the same candidates, ``among_each`` each query to
        its own (an entry per query; None: all candidates), as in `route_tags`. At most one of
        the two; every subset is checked before any query is routed.

        Raises:
            ValueError: both ``among`` and ``among_each``; ``among_each`` of another length.
            UnknownModelError, NoCandidateError, TypeError: as in `route_tags`.
        """
        return self._core.route_tags_batch(list_of_tags, among=among, among_each=among_each)

    def route_tag_strings_batch(self, raws: Sequence[str]) -> list[str]:
        """`route_tag_string` for many raw generator outputs."""
        return self._core.route_tag_strings_batch(raws)

    def route_indices_batch(self, list_of_tags: Sequence[Sequence[str]]) -> np.ndarray:
        """Index into `models` of each query's model, as an int64 array."""
        return self._core.route_indices_batch(list_of_tags)

    def decide(self, tags: Sequence[str], *, among: Iterable[str] | None = None) -> Decision:
        """The decision for one query with its explanation (`Decision`).

        With ``among`` (as in `route_tags`), the decision and its explanation cover those
        candidates only: scores, contributions, ``llm`` (the subset's ``M_LLM``), ``slm`` and
        ``argmax`` are what a decider over just that subset reports.

        >>> recs = [("q", ["Poem"], "big", "win"), ("q", ["Poem"], "mid", "tie"),
        ...         ("q", ["Poem"], "small", "loss")]
        >>> d = TagDecider(TagScorer.from_records(recs), {"big": 3.0, "mid": 2.0, "small": 1.0})
        >>> x = d.decide(["Poem"], among=["small", "mid"])
        >>> x.model, x.llm, sorted(x.scores)
        ('mid', 'mid', ['mid', 'small'])
        """
        return self._core.decide(tags, among=among)

    def decide_tag_string(self, raw: str) -> Decision:
        """`decide` for a tag generator's raw output ``"a, b, c"``."""
        return self._core.decide_tag_string(raw)

    def scores_batch(self, list_of_tags: Sequence[Sequence[str]]) -> np.ndarray:
        """``S(M)`` as a ``(n_queries, len(models))`` float64 array, in `models` order: the known
        tags' scores summed or averaged, per `aggregation`."""
        return self._core.scores_batch(list_of_tags)

    def deltas_batch(self, list_of_tags: Sequence[Sequence[str]]) -> np.ndarray:
        """``Delta_q = S(M_SLM) - S(M_LLM)`` per query; NaN when no tag is known."""
        return self._core.deltas_batch(list_of_tags)

    def decide_batch(
        self,
        list_of_tags: Sequence[Sequence[str]],
        *,
        among: Iterable[str] | None = None,
        among_each: Iterable[Iterable[str] | None] | None = None,
    ) -> DecisionArrays:
        """`decide` for many queries, as arrays (`DecisionArrays`: model, delta, slm, top,
        n_known), computed by the Rust decider in one pass without the GIL. Indices are into
        `models` (all candidates) also when ``among``/``among_each`` (as in `route_tags_batch`)
        restrict queries to subsets.

        >>> recs = [("q", ["Poem"], "big", "win"), ("q", ["Poem"], "small", "loss")]
        >>> d = TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0})
        >>> b = d.decide_batch([["Poem", "Poem"], ["Haiku"]])
        >>> b.model.tolist(), b.slm.tolist(), b.top.tolist(), b.n_known.tolist()
        ([0, 0], [1, -1], [0, 0], [1, 0])
        """
        model, delta, slm, top, n_known = self._core.decide_batch(
            list_of_tags, among=among, among_each=among_each
        )
        return DecisionArrays(model=model, delta=delta, slm=slm, top=top, n_known=n_known)

    # ---- theta (paper G.2) ----

    def select_theta(
        self,
        list_of_tags: Sequence[Sequence[str]],
        accepted: np.ndarray | Sequence[Mapping[str, str]],
        query_costs: np.ndarray | None = None,
        grid: Sequence[float] | np.ndarray | None = None,
    ) -> ThetaSearch:
        """Grid search for the theta with the highest accept rate on a labelled set.

        Ties go to the lower mean cost, then to the theta closest to 0.

        Args:
            list_of_tags: each query's tags.
            accepted: whether each model's answer is acceptable on each query: a bool array of
                shape ``(n_queries, len(models))`` in `models` order, or per query a mapping of
                model to outcome label (win and tie are acceptable; a missing model is not).
            query_costs: per-query cost of each model, same shape; by default the decider's
                per-model costs.
            grid: thetas to try; by default one per distinct routing outcome of the set (the
                midpoints between consecutive distinct Delta_q values, plus both ends).

        Returns:
            The best theta and the whole sweep.

        Raises:
            ValueError: mismatched lengths, an unknown outcome label, an empty set or grid,
                non-finite grid values or costs.

        >>> recs = [("q1", ["a"], "big", "win"), ("q1", ["a"], "small", "tie")]
        >>> d = TagDecider(TagScorer.from_records(recs), {"big": 10.0, "small": 1.0})
        >>> d.select_theta([["a"]], [{"big": "win", "small": "tie"}]).mean_cost
        1.0
        """
        decisions = self.decide_batch(list_of_tags)
        accept = self._accept_matrix(accepted, len(decisions))
        models = self.models
        cost = (
            np.array([self.costs[m] for m in models], dtype=np.float64)
            if query_costs is None
            else query_costs
        )
        return sweep_theta(decisions, accept, cost, models.index(self.llm), grid)

    def theta_for_llm_share(self, list_of_tags: Sequence[Sequence[str]], share: float) -> float:
        """A theta sending the largest share of these queries to M_LLM that is at most ``share``.

        For budgets: "at most 30% of traffic on the big model" is ``share=0.3``.

        Raises:
            ValueError: ``share`` outside [0, 1] or no queries.
        """
        return theta_for_llm_share(
            self.decide_batch(list_of_tags), self.models.index(self.llm), share
        )

    def _accept_matrix(self, accepted: Any, n: int) -> np.ndarray:
        models = self.models
        if isinstance(accepted, np.ndarray):
            if accepted.shape != (n, len(models)):
                raise ValueError(
                    f"mismatched lengths: accepted has shape {accepted.shape}, expected "
                    f"({n}, {len(models)}) = (queries, models)"
                )
            return np.ascontiguousarray(accepted, dtype=np.bool_)
        rows = list(accepted)
        if len(rows) != n:
            raise ValueError(f"mismatched lengths: {n} queries but {len(rows)} outcome rows")
        out = np.zeros((n, len(models)), dtype=np.bool_)
        col = {m: i for i, m in enumerate(models)}
        for q, row in enumerate(rows):
            for model, label in row.items():
                if label not in ("win", "tie", "loss"):
                    raise ValueError(
                        f"query {q}: unknown outcome {label!r} for {model!r}; "
                        "expected 'win', 'tie' or 'loss'"
                    )
                if model in col:
                    out[q, col[model]] = label != "loss"
        return out


def finite_for_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf; e.g. the Delta_q of a query with no
    known tag) replaced by None, through dicts, lists and tuples: JSON has no NaN.

    >>> finite_for_json({"delta": float("nan"), "scores": [1.5, float("inf")]})
    {'delta': None, 'scores': [1.5, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_for_json(v) for v in value]
    return value


split_tags = _core.split_tags
"""A tag generator's raw ``"a, b, c"`` output as a list of trimmed, non-empty tags (Rust):
``[t.strip() for t in raw.split(",") if t.strip()]``, whitespace being ``str.isspace()``'s."""
