"""Sharded store building on Ray: `tagrouter build-store --ray ADDRESS` (docs/scaling.md).

Map: the training queries are cut into contiguous shards; a pool of Ray actors (each loads the
tagger once) tags each shard and builds its per-shard store (`TagScorer.from_records` over the
shard's `RoutingTable.records`), returning the tags and the store's bytes. Reduce: the driver
merges the per-shard stores in shard order (`TagScorer.merged`: counts add).

Equal to the single-process store byte for byte, without a canonicalisation step, because:

- shards are contiguous ranges of the training queries, merged in shard order: `merged` keeps
  ``self``'s models and tags first and appends ``other``'s new ones in their order of first
  appearance, so the merged store's model and tag orders are those of one store built from the
  concatenated records, which is what the single-process builder builds (the counts add; the
  per-query tag lists are sorted by tag index either way);
- shard boundaries fall on multiples of `tag_cached`'s chunk (256 queries), so each tagger call
  gets the queries the single-process builder's would (same tags even for a tagger that is not
  batch-invariant, and the same on-disk tag cache entries: either path reuses the other's);
- the recipe's tuning (out-of-fold pseudo-count and theta*) is not sharded: it runs once, in
  the driver, on the merged tags, through the same `build_router` with ``tags=`` given. Its
  final store is rebuilt there from the same records and compared with the merged one
  (re-weighted to the tuned pseudo-count, which changes parameters, not counts); a difference is
  a bug and raises, never a silently different bundle.

When the recipe normalises tags (open-vocabulary taggers; paper 3.2), normalisation needs every
query's tags (a frequency filter), so the map runs twice: tag the shards, normalise in the
driver, then count the shards on the normalised tags.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tagrouter_fast.batch import TaggerFactory, _ray, _worker_env, connect_ray
from tagrouter_fast.builder.bundle import _build_bundle, build_router, normalizes
from tagrouter_fast.core import TagScorer
from tagrouter_fast.data.table import RoutingTable
from tagrouter_fast.options import DEFAULT_VARIANT, PAPER_VARIANT, Variant, resolve_variant

if TYPE_CHECKING:
    from tagrouter_fast.protocols import Tagger
    from tagrouter_fast.router import TagRouter

__all__ = [
    "TAG_CHUNK",
    "build_bundle_ray",
    "build_router_sharded",
    "merge_stores",
    "shard_bounds",
]

#: `tag_cached`'s chunk: shard boundaries are multiples of it (see the module docstring).
TAG_CHUNK = 256


def shard_bounds(n: int, shards: int, align: int = TAG_CHUNK) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges covering ``0..n``, at most ``shards`` of them, every
    boundary but the last a multiple of ``align``; as even as the alignment allows.

    >>> shard_bounds(805, 2)
    [(0, 512), (512, 805)]
    >>> shard_bounds(10, 4, align=1)
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    if n <= 0:
        return []
    if shards < 1 or align < 1:
        raise ValueError(f"shards and align must be >= 1, got {shards} and {align}")
    units = math.ceil(n / align)
    k = min(shards, units)
    base, extra = divmod(units, k)
    out, unit = [], 0
    for i in range(k):
        nxt = unit + base + (1 if i < extra else 0)
        out.append((unit * align, min(nxt * align, n)))
        unit = nxt
    return out


def merge_stores(stores: Iterable[TagScorer]) -> TagScorer:
    """The stores' counts added, in the given order (the first store's parameters)."""
    return functools.reduce(lambda a, b: a.merged(b), stores)


class _ShardWorker:
    """One Ray actor: loads the tagger once, then tags and counts shards of the table."""

    def __init__(
        self,
        table: RoutingTable,
        rows: np.ndarray,
        models: Sequence[str],
        params: Mapping[str, Any],
        tagger_factory: TaggerFactory | None,
        env: Mapping[str, str],
    ) -> None:
        os.environ.update(env)  # before the encoder loads: it reads TAGROUTER_THREADS once
        self.table = table
        self.rows = rows
        self.models = list(models)
        self.params = dict(params)
        if tagger_factory is None:
            from tagrouter_fast.tagging.taggers import DefaultTagger

            self.tagger: Tagger = DefaultTagger()
        else:
            self.tagger = tagger_factory()

    def tag(self, start: int, stop: int) -> list[list[str]]:
        from tagrouter_fast.tagging.cache import tag_cached

        texts = [self.table.texts[i] for i in self.rows[start:stop]]
        return tag_cached(self.tagger, texts)

    def count(self, start: int, stop: int, tags: Sequence[Sequence[str]]) -> bytes | None:
        """The shard's store as bytes (None: no record, e.g. no outcome for these models)."""
        by_row: list[list[str]] = [[] for _ in range(self.table.n_queries)]
        shard = self.rows[start:stop]
        for i, t in zip(shard, tags, strict=True):
            by_row[i] = list(t)
        records = self.table.records(shard, self.models, by_row)
        if not records:
            return None
        return TagScorer.from_records(records, **self.params).to_bytes()

    def tag_and_count(self, start: int, stop: int) -> tuple[list[list[str]], bytes | None]:
        tags = self.tag(start, stop)
        return tags, self.count(start, stop, tags)


def build_router_sharded(
    table: RoutingTable,
    models: Sequence[str],
    *,
    variant: str | Variant | Mapping[str, Any] = PAPER_VARIANT,
    llm: str | None = None,
    tagger_factory: TaggerFactory | None = None,
    query_ids: Iterable[str] | None = None,
    seed: int = 0,
    ray_address: str = "local",
    workers: int | None = None,
    cpus_per_worker: int = 1,
    shards: int | None = None,
    align: int = TAG_CHUNK,
    show_progress: bool = False,
    **options: Any,
) -> TagRouter:
    """`build_router` with the tagging and the store's counting sharded over Ray actors and
    the per-shard stores merged; the result equals `build_router(table, models, ...)` with
    ``tagger=tagger_factory()`` (store bytes included; see the module docstring).

    Args:
        tagger_factory: builds the tagger, once per worker and once in the driver (default:
            the `DefaultTagger`); it must be picklable (cloudpickle).
        ray_address: a Ray address or ``"local"``; an initialised Ray is used as it is.
        workers: actors (default: the cluster's CPUs / ``cpus_per_worker``).
        shards: shards (default: 2 per worker, for balance), at most one per ``align`` queries.
        align: shard boundaries are multiples of it (keep `TAG_CHUNK` unless the tagger is
            batch-invariant and the table small).
        Others: as `build_router`.

    Raises:
        RuntimeError: the merged store differs from the single-process one (a bug).
        BatchError: Ray is not installed. Else as `build_router`.
    """
    return _build_sharded(
        table, models, resolve_variant(variant).with_options(**options), llm=llm,
        tagger_factory=tagger_factory, query_ids=query_ids, seed=seed, ray_address=ray_address,
        workers=workers, cpus_per_worker=cpus_per_worker, shards=shards, align=align,
        show_progress=show_progress,
    )[0]


def _build_sharded(
    table: RoutingTable,
    models: Sequence[str],
    v: Variant,
    *,
    llm: str | None,
    tagger_factory: TaggerFactory | None,
    query_ids: Iterable[str] | None,
    seed: int,
    ray_address: str,
    workers: int | None,
    cpus_per_worker: int,
    shards: int | None,
    align: int,
    show_progress: bool,
) -> tuple[TagRouter, list[list[str]]]:
    """`build_router_sharded` of the resolved variant ``v``, also returning the training
    queries' raw tags."""
    models = list(models)
    table.model_index(models)  # unknown models fail before Ray starts
    rows = (
        table.query_index(list(query_ids)) if query_ids is not None else np.arange(table.n_queries)
    )
    if tagger_factory is None:
        from tagrouter_fast.tagging.taggers import DefaultTagger

        tagger: Tagger = DefaultTagger()
    else:
        tagger = tagger_factory()
    ray = _ray()
    started = connect_ray(ray_address)
    try:
        n_workers = workers or max(
            1, int(ray.cluster_resources().get("CPU", 1)) // max(1, cpus_per_worker)
        )
        bounds = shard_bounds(len(rows), shards or 2 * n_workers, align)
        # The variant's own pseudo-count: a tuned one changes parameters, not counts (below).
        params = v.score_params()
        if show_progress:
            print(
                f"tagrouter: tagging {len(rows)} queries in {len(bounds)} shards on "
                f"{n_workers} Ray workers",
                file=sys.stderr,
            )
        raw_tags, blobs = _map_shards(
            ray, table, rows, models, params, tagger_factory, bounds, n_workers,
            cpus_per_worker, normalize=normalizes(v, tagger), v=v,
        )
    finally:
        if started:
            ray.shutdown()
    stores = [TagScorer.from_bytes(b) for b in blobs if b is not None]
    if not stores:
        raise ValueError("no training query has an outcome for these models")
    merged = merge_stores(stores)
    router = build_router(
        table, models, variant=v, llm=llm, tagger=tagger, query_ids=None if query_ids is None
        else [table.query_ids[i] for i in rows], tags=raw_tags, seed=seed,
        show_progress=show_progress,
    )
    final = router.scorer
    if merged.prior_strength != final.prior_strength:
        merged = merged.reweighted(prior_strength=final.prior_strength)  # tuned k: same counts
    if merged.to_bytes() != final.to_bytes():
        raise RuntimeError(
            "the merged per-shard store differs from the single-process store; this is a bug "
            "in tagrouter_fast.builder.shard (please report it)"
        )
    router.swap_store(merged)
    return router, raw_tags


def _map_shards(
    ray: Any,
    table: RoutingTable,
    rows: np.ndarray,
    models: list[str],
    params: dict[str, Any],
    tagger_factory: TaggerFactory | None,
    bounds: list[tuple[int, int]],
    n_workers: int,
    cpus_per_worker: int,
    *,
    normalize: bool,
    v: Variant,
) -> tuple[list[list[str]], list[bytes | None]]:
    from ray.util import ActorPool

    # The table goes to the object store once; every actor reads that one copy.
    table_ref = ray.put(table)
    rows_ref = ray.put(rows)
    actor_cls = ray.remote(num_cpus=cpus_per_worker)(_ShardWorker)
    env = _worker_env(cpus_per_worker)
    actors = [
        actor_cls.remote(table_ref, rows_ref, models, params, tagger_factory, env)
        for _ in range(min(n_workers, len(bounds)))
    ]
    pool = ActorPool(actors)
    try:
        # ActorPool.map returns results in submission (= shard) order.
        if not normalize:
            out = list(pool.map(lambda a, b: a.tag_and_count.remote(*b), bounds))
            tags = [t for shard_tags, _ in out for t in shard_tags]
            return tags, [blob for _, blob in out]
        tags = [
            t for shard in pool.map(lambda a, b: a.tag.remote(*b), bounds) for t in shard
        ]
        from tagrouter_fast.tagging.encoder import default_encoder
        from tagrouter_fast.tagging.normalize import normalize_tags

        _, store_tags = normalize_tags(tags, default_encoder(), min_count=v.min_count)
        jobs = [(s, e, store_tags[s:e]) for s, e in bounds]
        return tags, list(pool.map(lambda a, j: a.count.remote(*j), jobs))
    finally:
        for a in actors:
            ray.kill(a)


def build_bundle_ray(
    data_dir: str | os.PathLike[str] | None = None,
    pool: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    ray_address: str = "local",
    workers: int | None = None,
    models: Sequence[str] | None = None,
    llm: str | None = None,
    variant: str | Variant = DEFAULT_VARIANT,
    llm_share: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """`build_bundle` (`tagrouter build-store`) with the store built by `build_router_sharded`:
    the same arguments, the same bundle (router.json and store bytes), tagging spread over a
    Ray cluster.

    The steps around the builder are `build_bundle`'s own (`bundle._build_bundle`).
    """
    _ray()  # fail before reading anything when Ray is missing

    def build(
        table: RoutingTable, models: list[str], v: Variant, llm: str
    ) -> tuple[TagRouter, list[list[str]]]:
        # Every query of the table trains, in table order: the raw tags returned are the
        # table's, so the llm_share budget re-tags nothing (the tag cache may be elsewhere).
        return _build_sharded(
            table, models, v, llm=llm, tagger_factory=None, query_ids=None, seed=seed,
            ray_address=ray_address, workers=workers, cpus_per_worker=1, shards=None,
            align=TAG_CHUNK, show_progress=show_progress,
        )

    return _build_bundle(
        build,
        data_dir,
        pool,
        out,
        models=models,
        llm=llm,
        variant=resolve_variant(variant),
        llm_share=llm_share,
        show_progress=show_progress,
        where=f", tagging on Ray ({ray_address})",
    )

