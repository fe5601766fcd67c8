"""TagRouter facade: tagger -> aligner -> Rust core, and the module-level `route()` drop-in.

A router is saved as a *bundle* directory: the tag-score store (counts, see
docs/store-format.md) and a small `router.json` with what the decider needs besides the store
(per-model costs, M_LLM, theta, fallback, aggregation) and which tagger produced the store's
tags, so that the same tagger is used at routing time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagrouter_fast.core import (
    Decision,
    Record,
    TagDecider,
    TagScorer,
    UnknownModelError,
)
from tagrouter_fast.options import (
    AGGREGATIONS,
    DEFAULT_TAGGER_ERROR_POLICY,
    DEFAULT_VARIANT,
    PAPER_AGGREGATION,
    TAGGER_ERROR_POLICIES,
    check_choice,
)
from tagrouter_fast.tagging.normalize import TagNormalization

if TYPE_CHECKING:
    from tagrouter_fast.add_model import AddedModel
    from tagrouter_fast.curve import DecisionArrays
    from tagrouter_fast.data.table import RoutingTable
    from tagrouter_fast.protocols import Aligner, Encoder, Tagger

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "tagrouter-bundle"
BUNDLE_VERSION = 1
META_FILE = "router.json"
# DEFAULT_VARIANT (the recipe of the default bundle `route()` builds and caches) and
# TAGGER_ERROR_POLICIES are `tagrouter_fast.options`'; imported above, importable from here too.


class BundleError(ValueError):
    """A router bundle is missing, of another version, or inconsistent with its store."""


# ==== Tagger specs ====
# A bundle records which tagger made its tags as a small spec, so loading it rebuilds that tagger.


def _tagger_spec(tagger: Tagger) -> dict[str, Any]:
    from tagrouter_fast.tagging.taggers import DefaultTagger

    if isinstance(tagger, DefaultTagger):
        return {"kind": "default", "fingerprint": tagger.fingerprint,
                "head_pooling": tagger.head_pooling}
    manifest = getattr(tagger, "manifest", None)
    if manifest is not None and manifest.get("kind") == "generator":
        return {
            "kind": "generator",
            "onnx_dir": str(manifest.directory),
            "fingerprint": tagger.fingerprint,
        }
    return {"kind": "custom", "fingerprint": getattr(tagger, "fingerprint", type(tagger).__name__)}


def _tagger_from_spec(spec: Mapping[str, Any]) -> Tagger:
    kind = spec.get("kind")
    if kind == "default":
        from tagrouter_fast.tagging.taggers import DefaultTagger

        # The instruction head's vector is pooled from the query's run by default since
        # 2026-12-07; a bundle saved before (no "head_pooling" in its spec) was tagged with the
        # head's own run and keeps that tagger, so its store and its routing tags agree.
        return DefaultTagger(head_pooling=spec.get("head_pooling") is True)
    if kind == "generator":
        from tagrouter_fast.tagging.taggers import TagGeneratorTagger

        return TagGeneratorTagger(spec["onnx_dir"])
    raise BundleError(
        f"this bundle was built with a custom tagger ({spec.get('fingerprint')!r}); "
        "pass it explicitly: TagRouter.load(path, tagger=...)"
    )


def _check_query(query: object) -> str:
    if not isinstance(query, str):
        raise TypeError(f"query must be str, got {type(query).__name__}")
    return query


def _check_queries(queries: object) -> list[str]:
    if isinstance(queries, (str, bytes)):
        raise TypeError(
            f"queries must be a sequence of str, not a {type(queries).__name__} "
            "(use route() for one query)"
        )
    if not isinstance(queries, Sequence):
        raise TypeError(f"queries must be a sequence of str, got {type(queries).__name__}")
    out = list(queries)
    for i, q in enumerate(out):
        if not isinstance(q, str):
            raise TypeError(f"queries[{i}] must be str, got {type(q).__name__}")
    return out


# ==== Bundle files ====

#: Files of earlier saves that a reader which opened the old router.json may still be about to
#: read are kept this long before a later save removes them.
_STALE_AFTER_S = 60.0


def _write_content_named(out: Path, stem: str, suffix: str, data: bytes) -> str:
    import hashlib

    from tagrouter_fast.tagging.cache import atomic_write_bytes

    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    if not (out / name).is_file():
        atomic_write_bytes(out / name, data, durable=True)
    return name


def _prune_unreferenced(out: Path, keep: set[str | None]) -> None:
    import time

    now = time.time()
    for pattern in ("store-*.trs", "normalization-*.json"):
        for f in out.glob(pattern):
            try:
                if f.name not in keep and now - f.stat().st_mtime > _STALE_AFTER_S:
                    f.unlink()
            except OSError:
                pass  # another writer pruned it first


def _bundle_member(root: Path, meta_path: Path, name: object) -> Path:
    """A file named by router.json: a plain file name inside the bundle, nothing else."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or Path(name).name != name
    ):
        raise BundleError(f"{meta_path}: {name!r} is not a file name inside the bundle")
    return root / name


# ==== The facade ====


class DecisionBatch:
    """The result of `TagRouter.decide_many`: each query's aligned tags and the decider (at the
    call's theta) that decides them, with the three shapes callers need computed on demand.

    `decisions()` gives explained `Decision` objects (the gateway, `tagrouter route --explain`),
    `arrays()` the columns a theta sweep reads (`DecisionArrays`), `models()` just the names
    (the fastest: one Rust pass without the GIL). All three decide the same tags on the same
    decider, so they always agree.
    """

    __slots__ = ("tags", "decider", "tagger_error")

    def __init__(
        self,
        tags: list[list[str]],
        decider: TagDecider,
        tagger_error: BaseException | None = None,
    ) -> None:
        #: The store tags each query was decided on (extra tags included).
        self.tags = tags
        #: The decider used: the router's at the time of the call, at the call's theta.
        self.decider = decider
        #: The tagger's exception when ``on_tagger_error="untagged"`` routed the batch untagged.
        self.tagger_error = tagger_error

    def __len__(self) -> int:
        return len(self.tags)

    def decisions(self) -> list[Decision]:
        """An explained `Decision` per query (tags, per-model scores, Delta_q, reason)."""
        decide = self.decider.decide
        return [decide(t) for t in self.tags]

    def arrays(self) -> DecisionArrays:
        """The batch as columns (`TagDecider.decide_batch`): model, Delta_q, M_SLM, argmax,
        known-tag count."""
        return self.decider.decide_batch(self.tags)

    def models(self) -> list[str]:
        """The routed model's name per query."""
        return self.decider.route_tags_batch(self.tags)


class TagRouter:
    """Routes raw queries (or pre-computed tags) to the best candidate model.

    Args:
        decider: the cost-aware decider over a tag-score store.
        tagger: turns a query into tags (`DefaultTagger`, `TagGeneratorTagger`, or any object with
            `tag(query) -> list[str]` and `tag_batch(queries)`); needed only by `route`/`decide`.
        align: map generated tags that the store does not know to their nearest store tag
            (paper 3.3 "Tag Alignment"), using the default phrase encoder and an HNSW index.
        align_floor: cosine similarity below which a generated tag is dropped instead of aligned
            (``None``: every nearest match is kept, as in the paper).
        normalization: the raw -> canonical tag mapping of paper 3.2 that the store was built
            with; generated tags go through it before alignment.
        encoder: the phrase encoder alignment uses. By default the default encoder, with the
            store tags' embeddings cached on disk; an encoder given here is called directly
            (the builder passes one that memoises per tag, for its many inner-fold stores).

    >>> recs = [("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss")]
    >>> scorer = TagScorer.from_records(recs)
    >>> router = TagRouter(TagDecider(scorer, costs={"big": 10.0, "small": 1.0}))
    >>> router.route_tags(["Poem"])
    'big'
    """

    def __init__(
        self,
        decider: TagDecider,
        tagger: Tagger | None = None,
        *,
        align: bool = True,
        align_floor: float | None = 0.5,
        normalization: TagNormalization | None = None,
        encoder: Encoder | None = None,
    ) -> None:
        self._decider = decider
        self.tagger = tagger
        self.normalization = normalization
        self._align = align
        self._align_floor = align_floor
        self._encoder = encoder
        self._aligner: Aligner | None = None
        self._aligner_lock = threading.Lock()
        #: Where the store's judgments came from ({"path", "fingerprint"}), if known: lets the
        #: default router notice that $TAGROUTER_DATA now names other data.
        self.source: dict[str, str] | None = None
        #: How the builder made this router (variant settings, what tuning chose), if known.
        self.build_info: dict[str, Any] | None = None
        # Taken only by store writers (swap_store / update_store), never by routing.
        self._store_lock = threading.Lock()

    @property
    def decider(self) -> TagDecider:
        """The current decider (read once per routing call). Read-only: changes go through
        `update_decider`, `update_store`, `swap_store` or `learn`, which serialise writers and
        keep a learning router learning."""
        return self._decider

    @property
    def scorer(self) -> TagScorer:
        return self.decider.scorer

    # ---- store updates: readers never block, writers never lose ----
    # `self.decider` is one reference to an immutable decider over an immutable store. Readers
    # (route, route_tags, decide, ...) read it once per call and take no lock; writers build a
    # new decider and swap the reference, serialised by a lock only writers take, so no update
    # is lost and no reader waits.

    def _swap_locked(self, scorer: TagScorer) -> None:
        self._set_decider_locked(self.decider.with_store(scorer))

    def _set_decider_locked(self, new: TagDecider) -> None:
        old = self._decider
        if old.is_live and not new.is_live:
            # A router that learns keeps learning across store swaps (admin add/remove model,
            # reloads): the new store becomes the live one (one O(store) copy per swap).
            new = new.to_live()
        self._decider = new  # the atomic swap readers see
        if self._aligner is not None and list(old.scorer.tags) != list(new.scorer.tags):
            # The aligner indexes the store's tags; rebuild it lazily over the new tag set.
            with self._aligner_lock:
                self._aligner = None

    def swap_store(self, scorer: TagScorer) -> None:
        """Route with ``scorer`` from now on: atomically replaces the decider by one over the
        new store with the same costs, M_LLM, theta, fallback and aggregation (see
        `TagDecider.with_store`: models new in the store are not candidates). Calls routing
        at the same time finish on the store they started with.

        Raises:
            UnknownModelError: a candidate model is not in ``scorer``; the router is unchanged.
        """
        if not isinstance(scorer, TagScorer):
            raise TypeError(f"scorer must be a TagScorer, got {type(scorer).__name__}")
        with self._store_lock:
            self._swap_locked(scorer)

    def update_store(self, fn: Callable[[TagScorer], TagScorer]) -> TagScorer:
        """Replaces the store by ``fn(current store)`` and returns the new store.

        Writers are serialised (``fn`` runs under a lock only writers take), so concurrent
        updates are never lost; routing never waits for them. If ``fn`` raises, the router is
        unchanged.

        >>> recs = [("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss")]
        >>> r = TagRouter(TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0}))
        >>> r.update_store(lambda s: s.with_records([("q2", ["Math"], "big", "win")])).n_queries
        2
        """
        with self._store_lock:
            new = fn(self.decider.scorer)
            if not isinstance(new, TagScorer):
                raise TypeError(
                    f"update_store: fn must return a TagScorer, got {type(new).__name__}"
                )
            self._swap_locked(new)
            return new

    def update_decider(self, fn: Callable[[TagDecider], TagDecider]) -> TagDecider:
        """Replaces the decider by ``fn(current decider)`` (a new theta, costs or candidates)
        and returns it, serialised with store writers (so it never undoes a concurrent
        `update_store`); routing never waits. If ``fn`` raises, the router is unchanged.

        >>> recs = [("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss")]
        >>> r = TagRouter(TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0}))
        >>> r.update_decider(lambda d: d.with_theta(0.5)).theta
        0.5
        """
        with self._store_lock:
            new = fn(self.decider)
            if not isinstance(new, TagDecider):
                raise TypeError(
                    f"update_decider: fn must return a TagDecider, got {type(new).__name__}"
                )
            self._set_decider_locked(new)
            return new

    def learn(self, outcomes: Iterable[tuple[Sequence[str], str, str]]) -> int:
        """Learns live ``(tags, model, outcome)`` outcomes in place (`TagDecider.learn`): each
        is a query of its own, judged once for ``model``. O(their tags) whatever the history
        (no per-outcome query row, no store copy); the next decision sees them; readers never
        block and see all of a call's outcomes or none. The first call turns the router's
        decider into a live one (one O(store) copy). Returns the live store's version.

        >>> recs = [("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss")]
        >>> r = TagRouter(TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0}))
        >>> r.learn([(["Poem"], "small", "win"), (["Poem"], "small", "win")])
        1
        >>> r.route_tags(["Poem"]), r.scorer.n_queries, r.scorer.n_learned
        ('small', 1, 2)
        """
        batch = list(outcomes)
        # Under the writers' lock: an outcome learned on a store that a concurrent swap is
        # replacing would be lost with it.
        with self._store_lock:
            if not self.decider.is_live:
                self._set_decider_locked(self.decider.to_live())
            return self.decider.learn(batch)

    def add_records(self, records: Iterable[Record]) -> TagScorer:
        """Adds outcome records to the router's store (`TagScorer.with_records` through
        `update_store`) and returns the new store."""
        batch = list(records)
        return self.update_store(lambda s: s.with_records(batch))

    def add_model(
        self,
        table_or_dir: RoutingTable | str | os.PathLike[str] | None,
        model: str,
        *,
        cost: float,
        table_model: str | None = None,
        like: str | Sequence[str] | None = None,
        as_llm: bool = False,
    ) -> AddedModel:
        """Adds ``model`` from its judgments (a routing table or its directory) and makes it a
        candidate with per-query ``cost``, without retraining; routable at once, safe with
        concurrent routing and feedback. ``like=MODEL`` starts it from MODEL's counts (paper
        D.3; ``table_or_dir`` may then be None), ``like=[M1, M2, ...]`` from their average;
        ``as_llm=True`` makes it M_LLM. See `tagrouter_fast.add_model.add_model` for the
        errors."""
        # Imported here: the runtime does not import build code until it is used.
        from tagrouter_fast.add_model import add_model

        return add_model(
            self,
            table_or_dir,
            model,
            cost=cost,
            table_model=table_model,
            like=like,
            as_llm=as_llm,
        )

    # ---- tags -> model (no tagger needed) ----

    def route_tags(self, tags: Sequence[str]) -> str:
        """Model name for a query's pre-computed tags (tags unknown to the store are ignored)."""
        return self.decider.route_tags(tags)

    def route_tags_batch(self, list_of_tags: Sequence[Sequence[str]]) -> list[str]:
        """`route_tags` for many queries in one call (releases the GIL)."""
        return self.decider.route_tags_batch(list_of_tags)

    def decide_tags(self, tags: Sequence[str]) -> Decision:
        """Full, explained decision for pre-computed tags."""
        return self.decider.decide(tags)

    # ---- query -> tags -> model ----

    def tags(self, query: str) -> list[str]:
        """The store tags a query maps to: tagger output, aligned to the store's tag set."""
        return self.tags_batch([_check_query(query)])[0]

    def tags_batch(self, queries: Sequence[str]) -> list[list[str]]:
        """`tags` for many queries. An empty or whitespace-only query gets no tags (so the
        decider sends it to the fallback model, reason ``"fallback"``) and never reaches the
        tagger.

        Raises:
            TypeError: ``queries`` is a str (not a sequence of them) or holds a non-str.
        """
        queries = _check_queries(queries)
        live = [i for i, q in enumerate(queries) if q.strip()]
        raw: list[list[str]] = [[] for _ in queries]
        if not live:
            return raw  # nothing to tag, normalize or align (no encoder is loaded for this)
        if self.tagger is None:
            raise ValueError("this TagRouter has no tagger; use route_tags() or pass tagger=")
        tagged = self.tagger.tag_batch([queries[i] for i in live])
        for i, tags in zip(live, tagged, strict=True):
            raw[i] = list(tags)
        return self.align_tags(raw)

    def align_tags(self, list_of_tags: Sequence[Sequence[str]]) -> list[list[str]]:
        """The store tags that tagger outputs map to: the second half of `tags_batch`
        (normalization, then alignment onto the store's tag set), for tags computed earlier
        (e.g. cached by the evaluation). ``tags_batch(qs) == align_tags(tagger.tag_batch(qs))``."""
        raw = [list(t) for t in list_of_tags]
        if self.normalization is not None:
            norm = self.normalization
            raw = [[norm.map_tag(t) or t for t in tags] for tags in raw]
        if not any(raw):
            return raw
        aligner = self._get_aligner()
        if aligner is None:
            return raw
        return [list(r.tags) for r in aligner.align_batch(raw)]

    def decide_many(
        self,
        queries: Sequence[str] | None = None,
        *,
        raw_tags: Sequence[Sequence[str]] | None = None,
        theta: float | None = None,
        extra_tags: Sequence[Sequence[str]] | None = None,
        max_query_chars: int | None = None,
        on_tagger_error: str = DEFAULT_TAGGER_ERROR_POLICY,
    ) -> DecisionBatch:
        """The one composition every caller uses: text (or a tagger's raw tags) -> aligned store
        tags -> decisions at a theta, batch-first.

        Args:
            queries: the query texts. An empty or whitespace-only query gets no tags (the
                fallback model) and never reaches the tagger.
            raw_tags: instead of ``queries``, tagger outputs computed earlier (e.g. cached by the
                evaluation): they are normalized and aligned exactly as fresh ones.
            theta: the cost-awareness threshold for this call (default: the decider's).
            extra_tags: per query, store tags added after alignment (a request's own tags);
                a tag already present is not added twice.
            max_query_chars: each query is cut to this many characters before tagging (the
                gateway's bound on tagging cost; None: no cut).
            on_tagger_error: one of `tagrouter_fast.options.TAGGER_ERROR_POLICIES`:
                ``"raise"`` (default) or ``"untagged"``: a tagger fault routes
                the whole batch untagged and is kept in `DecisionBatch.tagger_error`, so a
                server never fails a request because tagging did.

        Raises:
            TypeError: bad ``queries`` (a str, or a non-str item).
            ValueError: neither or both of ``queries``/``raw_tags``; ``extra_tags`` of another
                length; a bad policy, theta or ``max_query_chars``; no tagger for ``queries``.
        """
        check_choice("on_tagger_error", on_tagger_error, TAGGER_ERROR_POLICIES)
        if (queries is None) == (raw_tags is None):
            raise ValueError("pass exactly one of queries= and raw_tags=")
        decider = self.decider  # read once: one store snapshot for the whole batch
        if theta is not None:
            decider = decider.with_theta(theta)
        error: BaseException | None = None
        if queries is not None:
            texts = _check_queries(queries)
            if max_query_chars is not None:
                if isinstance(max_query_chars, bool) or max_query_chars < 0:
                    raise ValueError(f"max_query_chars must be >= 0, got {max_query_chars!r}")
                texts = [q[:max_query_chars] for q in texts]
            try:
                tags = self.tags_batch(texts)
            except Exception as e:
                if on_tagger_error == "raise" or self.tagger is None:
                    raise
                log.exception("tagging failed; routing %d query(ies) untagged", len(texts))
                tags, error = [[] for _ in texts], e
        else:
            assert raw_tags is not None
            tags = self.align_tags(raw_tags)
        if extra_tags is not None:
            if len(extra_tags) != len(tags):
                raise ValueError(
                    f"extra_tags has {len(extra_tags)} entries for {len(tags)} queries"
                )
            tags = [t + [x for x in extra if x not in t] if extra else t
                    for t, extra in zip(tags, extra_tags, strict=True)]
        return DecisionBatch(tags, decider, error)

    def route(self, query: str) -> str:
        """Model name for a raw query.

        >>> router.route("Rewrite this sentence in the present tense: ...")  # doctest: +SKIP
        'gpt-3.5-turbo-1106'
        """
        return self.decide_many([_check_query(query)]).models()[0]

    def route_batch(self, queries: Sequence[str]) -> list[str]:
        """`route` for many queries (one tagger batch, one decider pass without the GIL)."""
        return self.decide_many(queries).models()

    def decide_batch(self, queries: Sequence[str]) -> DecisionArrays:
        """What a theta sweep needs for many queries, as arrays (`TagDecider.decide_batch`:
        routed model, Delta_q, M_SLM, argmax, known-tag count), computed by the Rust decider."""
        return self.decide_many(queries).arrays()

    def decide(self, query: str) -> Decision:
        """Explained decision for a raw query (tags, per-model scores, Delta_q, reason)."""
        return self.decide_many([_check_query(query)]).decisions()[0]

    def _get_aligner(self) -> Aligner | None:
        if not self._align:
            return None
        # Built lazily: it encodes every store tag once, which only route()/decide() need.
        with self._aligner_lock:
            if self._aligner is None:
                from tagrouter_fast.tagging.align import TagAligner

                tags = list(self.scorer.tags)
                if self._encoder is None:
                    from tagrouter_fast.tagging.encoder import default_encoder

                    self._aligner = TagAligner(tags, default_encoder(), floor=self._align_floor)
                else:
                    enc = self._encoder
                    emb = enc.encode(tags)
                    self._aligner = TagAligner(tags, enc, floor=self._align_floor, embeddings=emb)
            return self._aligner

    # ---- building and persistence ----

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle directory, all-or-nothing for readers and concurrent writers.

        The store (and normalization) go to content-named files (``store-<sha256>.trs``) first;
        then ``router.json``, which names them, is replaced atomically (unique temp file, fsync,
        rename). A reader opens ``router.json`` once and then the files it names, so it sees the
        old bundle or the new one whole; of two concurrent writers, the last rename wins whole.
        """
        from tagrouter_fast.tagging.cache import atomic_write_bytes

        out = Path(path)
        if out.exists() and not out.is_dir():
            raise BundleError(f"{out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        store_file = _write_content_named(out, "store", ".trs", self.scorer.to_bytes())
        norm_file = None
        if self.normalization is not None:
            data = json.dumps(
                self.normalization.to_json(), ensure_ascii=False, indent=1, sort_keys=True
            ).encode("utf-8")
            norm_file = _write_content_named(out, "normalization", ".json", data)
        meta = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "store": store_file,
            "costs": self.decider.costs,
            "llm": self.decider.llm,
            "theta": self.decider.theta,
            "fallback": self.decider.fallback,
            "aggregation": self.decider.aggregation,
            "tagger": _tagger_spec(self.tagger) if self.tagger is not None else None,
            "align": self._align,
            "align_floor": self._align_floor,
            "normalization": norm_file,
            "source": self.source,
            "build": self.build_info,
        }
        data = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
        atomic_write_bytes(out / META_FILE, data, durable=True)
        _prune_unreferenced(out, {store_file, norm_file})
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        tagger: Tagger | None = None,
        theta: float | None = None,
        align: bool | None = None,
        check_tagger: bool = True,
    ) -> TagRouter:
        """Load a bundle written by `save` (or `tagrouter build-store`)."""
        root = Path(path)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise BundleError(f"{root} is not a router bundle (no {META_FILE})")
        try:
            meta = json.loads(meta_path.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{meta_path}: not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
        if meta.get("format") != BUNDLE_FORMAT or meta.get("version") != BUNDLE_VERSION:
            raise BundleError(
                f"{meta_path}: bundle format {meta.get('format')!r} v{meta.get('version')!r}, "
                f"this version reads {BUNDLE_FORMAT!r} v{BUNDLE_VERSION}"
            )
        # Bundles written before the option existed summed, as the paper does.
        aggregation = meta.get("aggregation", PAPER_AGGREGATION)
        if aggregation not in AGGREGATIONS:
            raise BundleError(
                f"{meta_path}: unknown aggregation {aggregation!r}; expected one of "
                f"{', '.join(repr(a) for a in AGGREGATIONS)}"
            )
        missing = [k for k in ("store", "costs", "llm", "theta") if k not in meta]
        if missing:
            raise BundleError(f"{meta_path}: missing key(s) {missing}")
        scorer = TagScorer.load(_bundle_member(root, meta_path, meta.get("store")))
        try:
            decider = TagDecider(
                scorer,
                costs=meta["costs"],
                llm=meta["llm"],
                theta=meta["theta"] if theta is None else theta,
                fallback=meta.get("fallback"),
                aggregation=aggregation,
            )
        except (TypeError, ValueError, KeyError, UnknownModelError) as e:
            # A hand-edited router.json: name the file, not just the bad value.
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise BundleError(f"{meta_path}: {msg}") from e
        spec = meta.get("tagger")
        if spec is not None and not isinstance(spec, dict):
            raise BundleError(f"{meta_path}: 'tagger' must be an object or null, got {spec!r}")
        floor = meta.get("align_floor", 0.5)
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float))):
            raise BundleError(
                f"{meta_path}: 'align_floor' must be a number or null, got {floor!r}"
            )
        if tagger is None and spec is not None:
            tagger = _tagger_from_spec(spec)
        want = spec.get("fingerprint") if isinstance(spec, dict) else None
        got = getattr(tagger, "fingerprint", None)
        if check_tagger and want is not None and tagger is not None and got != want:
            # Tags of another tagger (or another vocabulary/encoder) do not mean the store's.
            raise BundleError(
                f"{meta_path}: the store was built with tagger {want!r}, this tagger is "
                f"{got!r}; rebuild the bundle or pass check_tagger=False"
            )
        norm_file = meta.get("normalization")
        router = cls(
            decider,
            tagger,
            align=meta.get("align", True) if align is None else align,
            align_floor=None if floor is None else float(floor),
            normalization=(
                TagNormalization.load(_bundle_member(root, meta_path, norm_file))
                if norm_file
                else None
            ),
        )
        src = meta.get("source")
        router.source = src if isinstance(src, dict) else None
        info = meta.get("build")
        router.build_info = info if isinstance(info, dict) else None
        return router


# ==== The drop-in route() ====


def default_bundle_dir(variant: str = DEFAULT_VARIANT) -> Path:
    """Where the default bundle of ``variant`` is cached; ``route()`` uses
    :data:`DEFAULT_VARIANT`'s. The variant is in the name, so a bundle cached under another
    default is never mistaken for this one."""
    from tagrouter_fast.tagging.cache import cache_dir

    return cache_dir() / "routers" / f"default-{variant}"

