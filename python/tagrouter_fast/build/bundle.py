"""Judgments -> router bundle: what `tagrouter build-store` and `TagRouter.build` run.

One road from a routing table to a router: every training query is tagged (cached on disk by
tagger fingerprint and text hash), the table's outcomes become store records
(`RoutingTable.records`), the store is built by the Rust core, and per-model costs are the mean
`cost_usd` over the training queries.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tagrouter_fast.build.table import RoutingTable, load_table
from tagrouter_fast.core import TagDecider, TagScorer
from tagrouter_fast.eval.pools import DEFAULT_POOL, resolve_pool
from tagrouter_fast.router import (
    DEFAULT_VARIANT,
    VARIANTS,
    BundleError,
    TagRouter,
    default_bundle_dir,
)

if TYPE_CHECKING:
    from tagrouter_fast.protocols import Tagger

__all__ = ["DATA_ENV", "build_bundle", "build_router", "data_dir_from_env", "data_source"]

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
    router_cls: type[TagRouter],
    table: RoutingTable,
    models: Sequence[str],
    *,
    llm: str | None = None,
    tagger: Tagger | None = None,
    query_ids: Iterable[str] | None = None,
    theta: float = 0.0,
    aggregation: str = "sum",
    s_win: float = 1.0,
    s_tie: float = 0.15,
    s_loss: float = -1.0,
    weighting: str = "paper",
    prior_strength: float = 0.0,
    normalize: bool | None = None,
    min_count: int = 5,
    show_progress: bool = False,
) -> TagRouter:
    """`TagRouter.build` (its docstring says what each argument does)."""
    from tagrouter_fast.tagging.cache import tag_cached

    if tagger is None:
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
    # Mean cost over the training queries: the decider only needs the models' cost order
    # and the per-query average for cost reports. Asked before tagging, so an unpriced model
    # fails in a second, not after tagging the table.
    cost = table.cost_matrix(models)[rows]
    costs = {m: float(cost[:, j].mean()) for j, m in enumerate(models)}
    # Tag only the training queries; records() indexes tags by table row.
    texts = [table.texts[i] for i in rows]
    row_tags = tag_cached(tagger, texts, show_progress=show_progress)
    normalization = None
    if normalize is None:
        from tagrouter_fast.tagging.taggers import DefaultTagger

        normalize = not isinstance(tagger, DefaultTagger)
    if normalize:
        from tagrouter_fast.tagging.encoder import default_encoder
        from tagrouter_fast.tagging.normalize import normalize_tags

        normalization, row_tags = normalize_tags(
            row_tags, default_encoder(), min_count=min_count
        )
    tags: list[list[str]] = [[] for _ in range(table.n_queries)]
    for i, t in zip(rows, row_tags, strict=True):
        tags[i] = list(t)
    records = table.records(rows, models, tags)
    scorer = TagScorer.from_records(
        records,
        s_win=s_win,
        s_tie=s_tie,
        s_loss=s_loss,
        weighting=weighting,
        prior_strength=prior_strength,
    )
    decider = TagDecider(scorer, costs=costs, llm=llm, theta=theta, aggregation=aggregation)
    return router_cls(decider, tagger, normalization=normalization)


def build_bundle(
    data_dir: str | os.PathLike[str] | None = None,
    pool: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    models: Sequence[str] | None = None,
    llm: str | None = None,
    variant: str = DEFAULT_VARIANT,
    aggregation: str | None = None,
    weighting: str | None = None,
    prior_strength: float | None = None,
    theta: float = 0.0,
    llm_share: float | None = None,
    show_progress: bool = True,
) -> Path:
    """Convert judgments in the routing-table format into a router bundle (one command:
    `tagrouter build-store`). With no arguments: the public AlpacaEval table, pool `five-api`,
    the default variant, written to the cache (outside the repository) where `route()` finds
    it. `variant` names a :data:`VARIANTS` preset; `aggregation`, `weighting` and
    `prior_strength` (:meth:`TagRouter.build`'s) override single settings of it.

    `llm_share` replaces `theta` by a budget: the theta that sends at most that share of the
    table's queries to M_LLM (:meth:`TagDecider.theta_for_llm_share` on their routing tags). It
    reads no outcome, so it cannot overfit them; it is how to give TagRouter+ (whose theta = 0
    sends nearly everything to M_LLM) an operating point."""

    src = Path(data_dir) if data_dir is not None else data_dir_from_env()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    opts = dict(VARIANTS[variant])
    for key, value in (
        ("aggregation", aggregation),
        ("weighting", weighting),
        ("prior_strength", prior_strength),
    ):
        if value is not None:
            opts[key] = value
    if opts["weighting"] != "shrunk" and opts["prior_strength"]:
        raise ValueError("prior_strength only applies to the shrunk weighting")
    if llm_share is not None:
        if not 0.0 <= llm_share <= 1.0:
            raise ValueError(f"llm_share must be in [0, 1], got {llm_share}")
        if theta != 0.0:
            raise ValueError("give theta or llm_share, not both")
    table = load_table(src)
    if pool is None and models is None:
        pool = DEFAULT_POOL
    models, llm = resolve_pool(table, pool=pool, models=models, llm=llm)
    dest = Path(out) if out is not None else default_bundle_dir(variant)
    # Checked before tagging the table: minutes of work must not end in these errors.
    _check_writable_dir(dest)
    if show_progress:
        print(
            f"tagrouter: building a {variant!r} router from {src} ({len(models)} models, "
            f"M_LLM {llm}) into {dest}",
            file=sys.stderr,
        )
    router = TagRouter.build(
        table,
        models,
        llm=llm,
        theta=theta,
        show_progress=show_progress,
        **opts,
    )
    if llm_share is not None:
        tags = router.tags_batch(table.texts)
        router.decider = router.decider.with_theta(
            router.decider.theta_for_llm_share(tags, llm_share)
        )
        if show_progress:
            print(
                f"tagrouter: theta = {router.decider.theta:.6g} sends at most "
                f"{100 * llm_share:.0f}% of the table's queries to {llm}",
                file=sys.stderr,
            )
    router.source = data_source(src)
    return router.save(dest)


