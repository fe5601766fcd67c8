"""Add a model to a running router from (a few of) its judgments, without retraining.

The paper's evolvable pool (section 6, Appendix D.3): a new model's judged outcomes go into the
key-value store as its per-(tag, outcome) counts and it is routable at once. This module is the
one code path behind `TagRouter.add_model`, ``tagrouter add-model`` and the gateway's
``POST /admin/models``.

Everything is done through `TagRouter.update_store` and `TagRouter.update_decider` (or the
caller's equivalents, e.g. the gateway's durable outcome store), so it is safe while other
threads route and write feedback: routing never waits, and no concurrent store update is lost.

Tags: a judged query the store already holds keeps the store's tag set (the store requires one
tag set per query id, and those tags are what that query already counts towards ``count_t``);
a new query is tagged by the router's tagger through the on-disk tag cache and aligned with
`TagRouter.align_tags`, i.e. exactly what routing that query would see. Re-adding a model is
therefore cheap (cached tags), and tags mean the same as the store's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagrouter_fast.core import Record, TagDecider, TagScorer
from tagrouter_fast.data.table import OUTCOMES, RoutingTable, load_table

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter

__all__ = [
    "AddModelError",
    "AddedModel",
    "ModelExistsError",
    "add_model",
    "judgments_for_model",
    "suggest_judgments",
]


class AddModelError(ValueError):
    """A model cannot be added: the message names the judgments file or the model."""


class ModelExistsError(AddModelError):
    """The model is already in the router's store (the gateway answers 409)."""


@dataclass(frozen=True)
class AddedModel:
    """What `add_model` changed.

    Attributes:
        model: the name the new model routes under.
        table_model: the judgments' model column value that was read (None: no table).
        judgments: the new model's own outcome records added.
        like: the model whose counts the new one started from (paper D.3 proxy), if any.
        copied: outcome records copied from ``like``.
        cost: the new model's per-query cost.
        new_queries: queries the store did not hold before (they raise ``count_t``).
        new_tags: tags the store did not hold before.
        models: the candidate models after the change.
        llm: M_LLM after the change (unchanged: adding a model never moves it).
    """

    model: str
    table_model: str | None
    judgments: int
    like: str | None
    copied: int
    cost: float
    new_queries: int
    new_tags: int
    models: list[str]
    llm: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ==== What the store holds per query ====
# counts(model, tag) aggregate over queries, and copying them as records for new query ids would
# raise every tag's count_t (and so change w_t for every model): the per-query view
# (`TagScorer.queries`, from the Rust store) is what a model is copied from.


@dataclass(frozen=True)
class _StoreQuery:
    tags: list[str]
    judged: dict[str, tuple[int, int, int]]


def _store_queries(scorer: TagScorer) -> dict[str, _StoreQuery]:
    return {qid: _StoreQuery(tags, judged) for qid, tags, judged in scorer.queries()}


# ==== Judgments -> records ====


def _table_of(table: RoutingTable | str | os.PathLike[str]) -> RoutingTable:
    if isinstance(table, RoutingTable):
        return table
    # load_table already refuses duplicate (query_id, model) rows, outcomes for query ids that
    # queries.csv lacks and bad labels, naming file and line (tests/test_add_model.py checks it).
    return load_table(Path(table))


def _pick_table_model(table: RoutingTable, model: str, table_model: str | None) -> str:
    where = f"{table.source}/outcomes.csv"
    if table_model is not None:
        if table_model not in table.models:
            raise AddModelError(
                f"{where}: no outcome rows for model {table_model!r} (its models: {table.models})"
            )
        return table_model
    if len(table.models) == 1:
        return table.models[0]
    if model in table.models:
        return model
    raise AddModelError(
        f"{where}: the model column holds {len(table.models)} models {table.models}; "
        f"say which one is {model!r} (table_model= / --table-model)"
    )


def _tag_new(router: TagRouter, texts: Sequence[str]) -> list[list[str]]:
    """What routing would see for these texts: tagger (through the tag cache), then the
    router's normalization and alignment. Blank texts get no tags, as in `tags_batch`."""
    live = [i for i, t in enumerate(texts) if t.strip()]
    out: list[list[str]] = [[] for _ in texts]
    if not live:
        return out
    tagger = router.tagger
    if tagger is None:
        raise AddModelError(
            f"{len(live)} judged queries are new to the store and this router has no tagger to "
            "tag them; load the router with tagger="
        )
    part = [texts[i] for i in live]
    if isinstance(getattr(tagger, "fingerprint", None), str):
        from tagrouter_fast.tagging.cache import tag_cached

        raw = tag_cached(tagger, part)
    else:  # no fingerprint: nothing to key a cache on
        raw = tagger.tag_batch(part)
    for i, tags in zip(live, router.align_tags(raw), strict=True):
        out[i] = tags
    return out


def _check_new_name(scorer: TagScorer, model: str) -> None:
    if model in scorer.models:
        raise ModelExistsError(
            f"model {model!r} is already in the router's store (remove it first, or add its "
            "judgments as feedback records)"
        )


def judgments_for_model(
    router: TagRouter,
    table: RoutingTable | str | os.PathLike[str],
    model: str,
    *,
    table_model: str | None = None,
) -> list[Record]:
    """The outcome records of ``table``'s judgments of one model, named ``model``.

    Args:
        router: the router the model will join (its store, tagger, normalization, alignment).
        table: a routing table (or its directory) holding the new model's judgments.
        model: the name the model will route under.
        table_model: the value of the table's model column to read; by default the table's
            only model, or ``model`` when the table holds several.

    Raises:
        AddModelError: several models in the table and none chosen, ``table_model`` absent, no
            outcome rows for it, no tagger for queries new to the store.
        tagrouter_fast.data.table.DataError: a malformed table (duplicate rows, unknown query
            ids, bad labels: file and line named).
    """
    tab = _table_of(table)
    column = _pick_table_model(tab, model, table_model)
    codes = tab.outcomes([column])[:, 0]
    rows = [i for i in range(tab.n_queries) if codes[i] >= 0]
    if not rows:
        raise AddModelError(f"{tab.source}/outcomes.csv: no outcome rows for model {column!r}")
    known = _store_queries(router.scorer)
    fresh = [i for i in rows if tab.query_ids[i] not in known]
    fresh_tags = dict(zip(fresh, _tag_new(router, [tab.texts[i] for i in fresh]), strict=True))
    out: list[Record] = []
    for i in rows:
        qid = tab.query_ids[i]
        tags = known[qid].tags if qid in known else fresh_tags[i]
        out.append((qid, tags, model, OUTCOMES[int(codes[i])]))
    return out


def _like_records(known: dict[str, _StoreQuery], like: Sequence[str], model: str) -> list[Record]:
    """The start of ``model`` from the models in ``like``, on the store's own queries (so no
    ``count_t`` changes). One model: its per-query outcomes under ``model``'s name, so the new
    model's per-(tag, outcome) counts equal its counts (paper D.3). Several (the pool's prior):
    each query takes the outcomes of one of them in turn, so the new model's per-tag rates are
    the pool's average on the same count scale as one model's (summing every model's counts
    would multiply the paper's scores by the pool size)."""
    out: list[Record] = []
    turn = 0
    for qid, q in known.items():
        have = [m for m in like if m in q.judged]
        if not have:
            continue
        src = have[turn % len(have)]
        turn += 1
        for label, n in zip(OUTCOMES, q.judged[src], strict=True):
            out.extend((qid, q.tags, model, label) for _ in range(n))
    return out


def _check_cost(model: str, cost: object) -> float:
    if (
        isinstance(cost, bool)
        or not isinstance(cost, (int, float))
        or not math.isfinite(cost)
        or cost < 0
    ):
        raise AddModelError(f"cost of {model!r} must be a finite number >= 0, got {cost!r}")
    return float(cost)


def add_model(
    router: TagRouter,
    table: RoutingTable | str | os.PathLike[str] | None,
    model: str,
    *,
    cost: float,
    table_model: str | None = None,
    like: str | Sequence[str] | None = None,
    as_llm: bool = False,
    update_store: Callable[[Callable[[TagScorer], TagScorer]], object] | None = None,
) -> AddedModel:
    """Adds ``model`` to ``router``'s store from its judgments and makes it a candidate.

    Args:
        router: the router to change (in place, through its serialised update methods).
        table: a routing table (or its directory) with the model's judgments; may be None only
            with ``like`` (zero judgments).
        model: the new model's name.
        cost: its per-query cost (a finite number >= 0). M_LLM is not moved.
        table_model: which model column value of the table to read (see `judgments_for_model`).
        like: start from this store model's per-(tag, outcome) counts (paper D.3 proxy), or
            from several models' average (e.g. every candidate: the pool's prior, see
            `_like_records`); the new model's own judgments, if any, are added on top.
        as_llm: make the new model M_LLM (a stronger, dearer model joining the pool); by
            default M_LLM does not move. The fallback moves with it if it was M_LLM.
        update_store: how to replace the store (default `router.update_store`); the gateway
            passes its durable outcome store's.

    Returns:
        What changed (`AddedModel`).

    Raises:
        ModelExistsError: ``model`` is already in the store (so also if it is a candidate).
        AddModelError: see `judgments_for_model`; an unknown ``like``; a bad cost; no table
            and no ``like``; ``as_llm`` with a cost below the current M_LLM's.
        tagrouter_fast.data.table.DataError: a malformed judgments table.
    """
    if not isinstance(model, str) or not model.strip():
        raise AddModelError(f"model must be a non-empty name, got {model!r}")
    price = _check_cost(model, cost)
    _check_new_name(router.scorer, model)
    likes: list[str] | None = None
    if like is not None:
        likes = [like] if isinstance(like, str) else list(like)
        missing = [m for m in likes if m not in router.scorer.models]
        if missing or not likes:
            raise AddModelError(
                f"like={like!r} is not in the router's store: {missing or 'no model named'} "
                f"(models: {router.scorer.models})"
            )
    if as_llm and price < router.decider.costs[router.decider.llm]:
        raise AddModelError(
            f"as_llm: {model!r} at cost {price:g} would be cheaper than the current M_LLM "
            f"{router.decider.llm!r} ({router.decider.costs[router.decider.llm]:g}); M_LLM is the "
            "dearest model"
        )
    if table is None and like is None:
        raise AddModelError(f"no judgments for {model!r}: give a judgments table or like=")
    tab = None if table is None else _table_of(table)
    column: str | None = None
    own: list[Record] = []
    if tab is not None:
        column = _pick_table_model(tab, model, table_model)
        has_rows = bool((tab.outcomes([column]) >= 0).any())
        if has_rows or like is None:  # with like=, zero own judgments is the D.3 cold start
            own = judgments_for_model(router, tab, model, table_model=column)
    stats: dict[str, int] = {}

    def grow(s: TagScorer) -> TagScorer:
        # Re-checked under the writers' lock: another writer may have added the name since.
        _check_new_name(s, model)
        known = _store_queries(s)
        if likes is not None and any(m not in s.models for m in likes):
            raise AddModelError(f"like={like!r} was removed from the store meanwhile")
        copied = _like_records(known, likes, model) if likes is not None else []
        if not copied and not own:
            raise AddModelError(f"{like!r} has no outcome records to start {model!r} from")
        # Own records are tagged before the lock (tagging can be slow); a query that joined the
        # store meanwhile must use the store's tag set, one tag set per query id.
        mine = [(q, known[q].tags, m, o) if q in known else (q, t, m, o) for q, t, m, o in own]
        new = s.with_model(copied + mine)
        stats.update(
            copied=len(copied),
            new_queries=new.n_queries - s.n_queries,
            new_tags=len(new) - len(s),
        )
        return new

    (update_store or router.update_store)(grow)

    def join(d: TagDecider) -> TagDecider:
        if not as_llm:
            return d.with_store(d.scorer, costs={model: price})
        return TagDecider(
            d.scorer,
            costs={**d.costs, model: price},
            llm=model,
            theta=d.theta,
            fallback=model if d.fallback == d.llm else d.fallback,
            aggregation=d.aggregation,
        )

    try:
        dec = router.update_decider(join)
    except BaseException:
        # Not a candidate after all: take the store change back so a retry is not "exists".
        (update_store or router.update_store)(lambda s: s.without_model(model))
        raise
    return AddedModel(
        model=model,
        table_model=column,
        judgments=len(own),
        like=None if like is None else (like if isinstance(like, str) else ",".join(likes or [])),
        copied=stats["copied"],
        cost=price,
        new_queries=stats["new_queries"],
        new_tags=stats["new_tags"],
        models=dec.models,
        llm=dec.llm,
    )


# ==== Which queries to judge first ====


#: How `suggest_judgments` chooses: ``"stratified"`` or ``"uncertainty"``.
STRATEGIES = ("stratified", "uncertainty")


def suggest_judgments(
    router: TagRouter,
    n: int,
    *,
    table: RoutingTable | str | os.PathLike[str] | None = None,
    query_ids: Sequence[str] | None = None,
    strategy: str = "stratified",
    seed: int = 0,
) -> list[str]:
    """The ``n`` queries to judge first for a model about to join ``router``.

    Strategies:

    - ``"stratified"`` (default): a systematic sample of the candidates ordered by their tags
      (most frequent store tag first, then the next): every query has the same chance ``n/Q``
      of being picked, so the new model's measured rates are unbiased, and the picks spread
      over the tags in proportion to how often they occur (survey sampling's implicit
      stratification) instead of clumping as a random draw does.
    - ``"uncertainty"``: queries whose tags carry the most uncertainty for the new model. Each
      tag ``t`` is worth ``count_t * p_t * (1 - p_t) / (j_t + 1)`` after ``j_t`` picked queries
      carry it (``count_t``: how often it is routed; ``p_t``: the pool's accept rate on it, the
      variance of an outcome there), and queries are picked greedily by the value their tags
      gain. It picks queries with many tags and where models win most, so the new model's
      measured rates are not a random sample. Measured on AlpacaEval (docs/eval-results.md,
      7 newcomer cases): against a random choice of the same N it is better in one case,
      worse in one and level in the rest, so it is not the default.

    Args:
        router: the router the model will join.
        n: how many queries to suggest (at most the number of candidates).
        table: candidates from a routing table (or its directory); queries the store does not
            hold are tagged as routing would tag them.
        query_ids: candidates among the store's queries (default: all of them, when no table).
        strategy: one of :data:`STRATEGIES`.
        seed: the sample's random start (stratified) or tie-breaking seed (uncertainty).

    Raises:
        AddModelError: ``n`` < 0, unknown ``query_ids``, both ``table`` and ``query_ids``, an
            unknown strategy.
    """
    import numpy as np

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise AddModelError(f"n must be an integer >= 0, got {n!r}")
    if strategy not in STRATEGIES:
        raise AddModelError(f"unknown strategy {strategy!r}; known: {list(STRATEGIES)}")
    if table is not None and query_ids is not None:
        raise AddModelError("give candidates as a table or as query_ids, not both")
    known = _store_queries(router.scorer)
    if table is not None:
        tab = _table_of(table)
        fresh = [i for i, q in enumerate(tab.query_ids) if q not in known]
        tagged = dict(zip(fresh, _tag_new(router, [tab.texts[i] for i in fresh]), strict=True))
        ids = list(tab.query_ids)
        tag_sets = [known[q].tags if q in known else tagged[i] for i, q in enumerate(ids)]
    else:
        ids = list(known) if query_ids is None else list(query_ids)
        bad = [q for q in ids if q not in known]
        if bad:
            raise AddModelError(
                f"{len(bad)} query ids are not in the router's store, e.g. {bad[:3]}"
            )
        tag_sets = [known[q].tags for q in ids]
    if len(set(ids)) != len(ids):
        raise AddModelError("duplicate candidate query ids")
    n = min(n, len(ids))
    if n == 0:
        return []
    count: dict[str, int] = {}
    for q in known.values():
        for tag in q.tags:
            count[tag] = count.get(tag, 0) + 1
    rng = np.random.default_rng(seed)
    if strategy == "stratified":
        # Tags ranked by frequency (ties by name); a query's key is its tags' ranks, ascending.
        rank = {t: i for i, t in enumerate(sorted(count, key=lambda t: (-count[t], t)))}
        far = len(rank)
        keys = [sorted(rank.get(t, far) for t in set(ts)) for ts in tag_sets]
        noise = rng.random(len(ids))  # random order inside a stratum
        order = sorted(range(len(ids)), key=lambda i: (keys[i] or [far + 1], noise[i]))
        step = len(ids) / n
        start = rng.random() * step
        return [ids[order[int(start + k * step)]] for k in range(n)]
    cands = set(router.decider.models)
    # The pool's accept rate per store tag, from the store's per-query outcomes.
    acc: dict[str, float] = {}
    seen: dict[str, float] = {}
    for q in known.values():
        w = tot = 0
        for m, (win, tie, loss) in q.judged.items():
            if m in cands:
                w += win + tie
                tot += win + tie + loss
        if tot:
            for tag in q.tags:
                acc[tag] = acc.get(tag, 0.0) + w / tot
                seen[tag] = seen.get(tag, 0.0) + 1.0
    vocab = sorted({t for ts in tag_sets for t in ts})
    col = {t: j for j, t in enumerate(vocab)}
    value = np.zeros(len(vocab))
    for t, j in col.items():
        p = (acc.get(t, 0.0) + 0.5) / (seen.get(t, 0.0) + 1.0)  # a half-count prior keeps 0/1 off
        value[j] = max(count.get(t, 0), 1) * p * (1.0 - p)
    rows = [sorted({col[t] for t in ts}) for ts in tag_sets]
    flat = np.asarray([j for r in rows for j in r], dtype=np.int64)
    owner = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    judged = np.zeros(len(vocab))
    jitter = rng.random(len(ids)) * 1e-9  # random tie-breaks, far below any real gain
    taken = np.zeros(len(ids), dtype=bool)
    out: list[str] = []
    for _ in range(n):
        gain_t = value * (1.0 / (judged + 1.0) - 1.0 / (judged + 2.0))
        gain = np.bincount(owner, weights=gain_t[flat], minlength=len(ids)) + jitter
        gain[taken] = -np.inf
        i = int(np.argmax(gain))
        taken[i] = True
        judged[rows[i]] += 1.0
        out.append(ids[i])
    return out
