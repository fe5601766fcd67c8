"""Judgments -> router bundle: what `tagrouter build-store` and `tagrouter_fast.build_router` run.

One road from a routing table to a router: every training query is tagged (cached on disk by
tagger fingerprint and text hash), the table's outcomes become store records
(`RoutingTable.records`), the store is built by the Rust core, and per-model costs are the mean
`cost_usd` over the training queries.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tagrouter_fast.core import TagDecider, TagScorer
from tagrouter_fast.curve import theta_for_llm_share
from tagrouter_fast.data.pools import DEFAULT_POOL, resolve_pool
from tagrouter_fast.data.table import RoutingTable, load_table
from tagrouter_fast.options import (
    DEFAULT_VARIANT,
    PAPER_VARIANT,
    VARIANTS,
    Variant,
    resolve_variant,
)
from tagrouter_fast.router import BundleError, TagRouter, default_bundle_dir

if TYPE_CHECKING:
    from tagrouter_fast.protocols import Encoder, Tagger

__all__ = [
    "DATA_ENV",
    "build_bundle",
    "build_router",
    "data_dir_from_env",
    "data_source",
    "normalizes",
]

#: The environment variable naming the judgments the default bundle is built from.
DATA_ENV = "TAGROUTER_DATA"


def data_dir_from_env() -> Path:
    """The routing table named by ``$TAGROUTER_DATA``, checked.

    Raises:
        BundleError: the variable is unset, or names no routing table (the message says which
            path and what is missing). Nothing else is searched: a wrong path is never replaced
            by another table.
    """
    env = os.environ.get(DATA_ENV)
    if not env:
        raise BundleError(
            "no judgments to build a store from: pass --data DIR (routing-table format: "
            f"queries.csv + outcomes.csv) or set {DATA_ENV}"
        )
    src = Path(env)
    missing = [f for f in ("queries.csv", "outcomes.csv") if not (src / f).is_file()]
    if missing:
        raise BundleError(f"{DATA_ENV}={env}: not a routing table (no {', '.join(missing)})")
    return src


def data_source(src: Path | None = None) -> dict[str, str]:
    """Identity of a routing table (default: ``$TAGROUTER_DATA``'s): its resolved path and a
    fingerprint of its two files (size and modification time, cheap enough to check on every
    start), recorded in the bundles built from it."""
    src = data_dir_from_env() if src is None else src
    parts = []
    for f in ("queries.csv", "outcomes.csv"):
        st = (src / f).stat()
        parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return {"path": str(src.resolve()), "fingerprint": ";".join(parts)}


def _check_writable_dir(dest: Path) -> None:
    """Create ``dest`` and probe it with a temp file; BundleError naming it when that fails."""
    import tempfile

    if dest.exists() and not dest.is_dir():
        raise BundleError(f"--out {dest}: exists and is not a directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=dest)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BundleError(f"--out {dest}: not a writable directory ({e.strerror or e})") from e


def build_router(
    table: RoutingTable,
    models: Sequence[str],
    *,
    variant: str | Variant | Mapping[str, Any] = PAPER_VARIANT,
    llm: str | None = None,
    tagger: Tagger | None = None,
    query_ids: Iterable[str] | None = None,
    tags: Sequence[Sequence[str]] | None = None,
    encoder: Encoder | None = None,
    seed: int = 0,
    router_cls: type[TagRouter] = TagRouter,
    show_progress: bool = False,
    **options: Any,
) -> TagRouter:
    """Judgments -> router: the one builder behind `tagrouter_fast.build_router`,
    `tagrouter build-store` and every TagRouter variant of `tagrouter eval`.

    Every training query is tagged (cached on disk by tagger fingerprint and text hash), its
    win/tie/loss outcome per candidate model becomes a store record (`RoutingTable.records`), the
    store is built by the Rust core, and per-model cost is the mean `cost_usd` over the training
    queries. A variant that tunes (`Variant.tunes`) then routes every training query with a router
    built from the other inner folds (stratified by subset, seeded by ``seed``) through the same
    public path (`TagRouter.decide_many` on the raw tags), picks its pseudo-count by the
    out-of-fold AR-vs-ratio AUC (`tagrouter_fast.curve.sweep_auc`) and theta* by the paper's G.2
    grid search on the out-of-fold routes (`tagrouter_fast.curve.sweep_theta`), and builds the
    final router on all of them.

    Args:
        table: judgments in the routing-table format.
        models: candidate models.
        variant: a recipe name (`tagrouter_fast.options.VARIANTS`), a `Variant`, or a
            mapping of its settings; ``options`` replace single settings (``theta``,
            ``aggregation``, ``weighting``, ``prior_strength``, ``s_tie``, ``normalize``,
            ``align``, ``align_floor``, ``min_count``, ...).
        llm: M_LLM (default: the most expensive candidate).
        tagger: default: the embedded `DefaultTagger` (none when ``tags`` are given: the
            router then routes pre-tagged queries only).
        query_ids: the training queries (default: every query of the table).
        tags: the tagger's output for each training query, in ``query_ids`` order, when it is
            already known (the evaluation's cached features); the tagger is not called.
        encoder: phrase encoder for alignment and normalization (default: the default encoder).
        seed: seed of the inner folds of tuning.
        router_cls: the class built (a `TagRouter` subclass).
        show_progress: progress bars on stderr.

    Raises:
        KeyError: an unknown model; ValueError: bad settings or too few queries to tune on;
        DataError: a candidate without costs.
    """
    from tagrouter_fast.builder.tune import tune
    from tagrouter_fast.tagging.cache import tag_cached

    v = resolve_variant(variant).with_options(**options)
    if tagger is None and tags is None:
        from tagrouter_fast.tagging.taggers import DefaultTagger

        tagger = DefaultTagger()
    models = list(models)
    if not models:
        raise ValueError("empty model set")
    table.model_index(models)  # raises, naming close matches, on an unknown model
    rows = (
        table.query_index(list(query_ids))
        if query_ids is not None
        else np.arange(table.n_queries)
    )
    if len(rows) == 0:
        raise ValueError("no training queries")
    # Mean cost over the training queries: the decider only needs the models' cost order
    # and the per-query average for cost reports. Asked before tagging, so an unpriced model
    # fails in a second, not after tagging the table.
    cost = table.cost_matrix(models)[rows]
    costs = {m: float(cost[:, j].mean()) for j, m in enumerate(models)}
    if tags is not None:
        raw_tags = [list(t) for t in tags]
        if len(raw_tags) != len(rows):
            raise ValueError(f"tags has {len(raw_tags)} entries for {len(rows)} training queries")
    else:
        assert tagger is not None
        raw_tags = tag_cached(tagger, [table.texts[i] for i in rows], show_progress=show_progress)
    normalization = None
    store_tags = raw_tags
    if normalizes(v, tagger):
        from tagrouter_fast.tagging.normalize import normalize_tags

        normalization, store_tags = normalize_tags(
            raw_tags, encoder if encoder is not None else _default_encoder(), min_count=v.min_count
        )
    by_row: list[list[str]] = [[] for _ in range(table.n_queries)]
    for i, t in zip(rows, store_tags, strict=True):
        by_row[i] = list(t)
    # Reference models: in the store (their judgments inform tag difficulty), never candidates.
    stored = models + (
        [m for m in table.models if m not in models and (table.outcomes([m])[rows] >= 0).any()]
        if v.references
        else []
    )

    def make(sub: np.ndarray, prior_strength: float, theta: float) -> TagRouter:
        """A router from the training queries at positions ``sub`` of ``rows``."""
        scorer = TagScorer.from_records(
            table.records(rows[sub], stored, by_row), **v.score_params(prior_strength)
        )
        decider = TagDecider(
            scorer, costs=costs, llm=llm, theta=theta, aggregation=v.aggregation
        )
        return router_cls(
            decider,
            tagger,
            align=v.align,
            align_floor=v.align_floor,
            normalization=normalization,
            encoder=encoder,
        )

    if v.tunes and v.align and encoder is None:
        from tagrouter_fast.tagging.cache import MemoEncoder

        # Each inner-fold store has its own tag set: encode every tag once, in memory, instead
        # of one disk-cache entry per tag list.
        encoder = MemoEncoder(_default_encoder())
    info: dict[str, Any] = {"variant": v.to_json(), "n_train": len(rows)}
    if len(stored) > len(models):
        info["reference_models"] = len(stored) - len(models)
    k, theta = v.prior_strength, (v.theta if v.theta is not None else 0.0)
    if v.tunes:
        chosen = tune(
            make,
            v,
            raw_tags=raw_tags,
            strata=[table.subsets[i] for i in rows],
            accept=table.accept(models)[rows],
            cost=cost,
            models=models,
            seed=seed,
            show_progress=show_progress,
        )
        k, theta = chosen.prior_strength, chosen.theta
        info["tuned"] = chosen.to_json()
    router = make(np.arange(len(rows)), k, theta)
    router.build_info = info
    return router


def normalizes(v: Variant, tagger: Tagger | None) -> bool:
    """Whether building ``v`` with ``tagger`` normalises the training tags (paper 3.2): as the
    variant says, else for open-vocabulary taggers and not for the embedded `DefaultTagger`
    (its vocabulary is already clean). Tags given without a tagger (a router of pre-tagged
    queries) are used as they are."""
    if v.normalize is not None:
        return v.normalize
    if tagger is None:
        return False
    from tagrouter_fast.tagging.taggers import DefaultTagger

    return not isinstance(tagger, DefaultTagger)


def _default_encoder() -> Encoder:
    from tagrouter_fast.tagging.encoder import default_encoder

    return default_encoder()


def build_bundle(
    data_dir: str | os.PathLike[str] | None = None,
    pool: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    models: Sequence[str] | None = None,
    llm: str | None = None,
    variant: str | Variant = DEFAULT_VARIANT,
    llm_share: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Convert judgments in the routing-table format into a router bundle (one command:
    `tagrouter build-store`). With no arguments: the public AlpacaEval table, pool `five-api`,
    the default variant, written to the cache (outside the repository) where `route()` finds
    it. What the variant tunes (TagRouter+: pseudo-count and theta*) is tuned on these
    judgments, out-of-fold (`build_router`).

    Args:
        data_dir: the routing table (default: ``$TAGROUTER_DATA``).
        pool: a candidate pool of the table's README (default: `five-api` unless ``models``).
        out: the bundle directory (default: the cache's ``default-<recipe>``).
        models: candidate models, instead of ``pool``.
        llm: M_LLM (default: the pool's, else the most expensive model).
        variant: a :data:`~tagrouter_fast.options.VARIANTS` recipe name or a `Variant` (e.g.
            ``resolve_variant("plus").with_options(theta=0.2)``: an explicit ``prior_strength``
            or ``theta`` is used as given, not tuned).
        llm_share: instead of the variant's theta, a budget: the theta that sends at most that
            share of the table's queries to M_LLM (`tagrouter_fast.curve.theta_for_llm_share`
            on their routing tags). It reads no outcome, so it cannot overfit them. The variant
            must keep its recipe's theta (a theta set on it would be lost).
        seed: seed of the tuning's inner folds.
        show_progress: progress bars and lines on stderr.

    Raises:
        ValueError: an unknown recipe, ``llm_share`` outside [0, 1] or with a theta set on the
            variant, too few queries to tune on.
        BundleError: no table, or ``out`` is not a writable directory.
    """

    def build(
        table: RoutingTable, models: list[str], v: Variant, llm: str
    ) -> tuple[TagRouter, None]:
        return build_router(
            table, models, variant=v, llm=llm, seed=seed, show_progress=show_progress
        ), None

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
    )


#: ``build(table, models, variant, llm) -> (router, raw tags of the table's queries or None)``:
#: the step `_build_bundle` runs between its checks and the save (one process, or sharded on Ray).
BundleBuilder = Callable[
    [RoutingTable, list[str], Variant, str], tuple[TagRouter, "list[list[str]] | None"]
]


def _build_bundle(
    build: BundleBuilder,
    data_dir: str | os.PathLike[str] | None,
    pool: str | None,
    out: str | os.PathLike[str] | None,
    *,
    models: Sequence[str] | None,
    llm: str | None,
    variant: Variant,
    llm_share: float | None,
    show_progress: bool,
    where: str = "",
) -> Path:
    """Everything `build_bundle` does around its builder: argument checks, the table and pool,
    the writable-directory check before any tagging, progress lines, the ``llm_share`` budget
    (on the builder's raw tags when it returns them, else the tag cache's) and the save."""

    src = Path(data_dir) if data_dir is not None else data_dir_from_env()
    v = variant
    if llm_share is not None:
        if not 0.0 <= llm_share <= 1.0:
            raise ValueError(f"llm_share must be in [0, 1], got {llm_share}")
        recipe = VARIANTS.get(v.label, Variant())
        if v.theta != recipe.theta:
            raise ValueError(
                f"give theta or llm_share, not both (the variant's theta is {v.theta}, its "
                f"recipe's {recipe.theta})"
            )
        v = v.with_options(theta=0.0)  # replaced by the budget's theta below: nothing to tune
    table = load_table(src)
    if pool is None and models is None:
        pool = DEFAULT_POOL
    models, llm = resolve_pool(table, pool=pool, models=models, llm=llm)
    dest = Path(out) if out is not None else default_bundle_dir(v.label)
    # Checked before tagging the table: minutes of work must not end in these errors.
    _check_writable_dir(dest)
    if show_progress:
        print(
            f"tagrouter: building a {v.label!r} router from {src} ({len(models)} models, "
            f"M_LLM {llm}) into {dest}{where}",
            file=sys.stderr,
        )
    router, raw_tags = build(table, list(models), v, llm)
    tuned = (router.build_info or {}).get("tuned")
    if show_progress and tuned:
        print(
            f"tagrouter: tuned on the judgments (out-of-fold): prior_strength = "
            f"{tuned['prior_strength']:g}, theta = {tuned['theta']:.6g} (accept rate "
            f"{tuned['oof_accept_rate']:.3f}, {100 * tuned['oof_llm_share']:.0f}% to {llm})",
            file=sys.stderr,
        )
    if llm_share is not None:
        if raw_tags is None:
            from tagrouter_fast.tagging.cache import tag_cached

            assert router.tagger is not None
            raw_tags = tag_cached(router.tagger, table.texts)
        # The table's queries through the router's own path (aligned, decided at its theta).
        batch = router.decide_many(raw_tags=raw_tags)
        share_theta = theta_for_llm_share(
            batch.arrays(), batch.decider.models.index(batch.decider.llm), llm_share
        )
        router.update_decider(lambda d: d.with_theta(share_theta))
        if show_progress:
            print(
                f"tagrouter: theta = {router.decider.theta:.6g} sends at most "
                f"{100 * llm_share:.0f}% of the table's queries to {llm}",
                file=sys.stderr,
            )
    router.source = data_source(src)
    return router.save(dest)
