"""Tag alignment (paper 3.3): map generated tags onto the canonical tag set.

A generated tag is matched, in order of cost, by (1) a per-aligner cache keyed by the raw string,
(2) exact membership in the canonical set, (3) equality after rule normalisation
(:func:`tagrouter_fast.tagging.normalize.rule_normalize`, case-folded), (4) nearest canonical
tag by cosine
similarity of encoder embeddings through an hnswlib index. Matches below ``floor`` are dropped and
reported. Generated tags repeat heavily across queries, so after warm-up almost every lookup is a
dict hit (about a microsecond); a miss costs one encoder call, shared by all misses of a batch.

At the paper's scale (~1,600 canonical tags) exact numpy search is as fast as HNSW; the index is
kept because it scales to 100k+ tags, and exact search stays available as its verifier
(``exact=True``, :meth:`TagAligner.verify`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, NamedTuple

import numpy as np

from tagrouter_fast.tagging.normalize import rule_key
from tagrouter_fast.tagging.vectors import l2_normalize

__all__ = ["AlignResult", "TagAligner"]


class AlignResult(NamedTuple):
    """Outcome of aligning one query's generated tags.

    Attributes:
        tags: Canonical tags, deduplicated, in order of first appearance.
        dropped: Generated tags whose best match was below the floor (or empty after cleaning).
        similarities: For each entry of ``tags``, the best cosine similarity that produced it
            (1.0 for exact and rule matches).
    """

    tags: list[str]
    dropped: list[str]
    similarities: list[float]


_DROP = ("", -1.0)  # cache value for a dropped tag: no canonical tag


class TagAligner:
    """Nearest-canonical-tag mapping with a similarity floor and a raw-string cache.

    Args:
        canonical_tags: The canonical tag set (duplicates are removed, order kept).
        encoder: Object with ``.encode(list[str]) -> (n, d)`` unit rows and ``.fingerprint``;
            ``None`` only when ``embeddings`` are given and every query brings its own vectors
            (see :meth:`nearest`) or hits the cache/rules.
        floor: Minimum cosine similarity for a match; lower matches are dropped. ``None`` keeps
            every nearest match (the paper's behaviour).
        ef: hnswlib query breadth (higher: better recall, slower).
        exact: Use exact numpy search instead of HNSW for every lookup.
        embeddings: Precomputed ``(len(canonical_tags), d)`` embeddings (skips encoding).
        M: hnswlib graph degree.
        ef_construction: hnswlib build breadth.
        cache_size: Maximum cached raw tags; the oldest half is evicted when full.

    >>> from tagrouter_fast.tagging.encoder import default_encoder
    >>> al = TagAligner(["Text Rewriting", "Geometry"], default_encoder())
    >>> al.align(["text-rewriting", "triangle geometry", "zzzz"]).tags
    ['Text Rewriting', 'Geometry']
    """

    def __init__(
        self,
        canonical_tags: Iterable[str],
        encoder: Any = None,
        *,
        floor: float | None = 0.5,
        ef: int = 64,
        exact: bool = False,
        embeddings: np.ndarray | None = None,
        M: int = 16,
        ef_construction: int = 200,
        cache_size: int = 200_000,
    ) -> None:
        tags = list(dict.fromkeys(str(t) for t in canonical_tags))
        if not tags:
            raise ValueError("canonical_tags is empty")
        self.tags: list[str] = tags
        self.encoder = encoder
        self.floor = floor
        self.exact = exact
        self.cache_size = int(cache_size)
        if embeddings is None:
            if encoder is None:
                raise ValueError("give an encoder or precomputed embeddings")
            from tagrouter_fast.tagging.cache import embed_cached

            embeddings = embed_cached(encoder, tags)
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.shape[0] != len(tags) or emb.ndim != 2:
            raise ValueError(f"embeddings shape {emb.shape} does not match {len(tags)} tags")
        self.embeddings = l2_normalize(emb)
        self.dim = int(emb.shape[1])

        self._rule: dict[str, str] = {}
        for t in tags:
            self._rule.setdefault(rule_key(t), t)
        # Raw tag -> (canonical or "", similarity). Plain dict: a hit is one hash lookup, and
        # single dict operations are atomic under the GIL, so readers need no lock.
        self._cache: dict[str, tuple[str, float]] = {t: (t, 1.0) for t in tags}
        self._lock = threading.Lock()  # serialises index queries that insert into the cache

        import hnswlib

        self._index = hnswlib.Index(space="cosine", dim=self.dim)
        self._index.init_index(max_elements=len(tags), ef_construction=ef_construction, M=M)
        # Small sets build in milliseconds single-threaded (and deterministically); large ones
        # use every core.
        threads = 1 if len(tags) < 5000 else -1
        self._index.add_items(self.embeddings, np.arange(len(tags)), num_threads=threads)
        self.ef = ef
        self._index.set_ef(max(ef, 1))

    # ==== Search ====

    def nearest(
        self, vectors: np.ndarray, *, exact: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest canonical tag for each row of ``vectors`` (unit rows).

        Args:
            vectors: ``(n, d)`` float32 query embeddings.
            exact: Override the aligner's search mode for this call.

        Returns:
            ``(indices, similarities)``: int64 ``(n,)`` into :attr:`tags`, float32 ``(n,)`` cosine.
        """
        q = np.ascontiguousarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if len(q) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        use_exact = self.exact if exact is None else exact
        if use_exact:
            qn = l2_normalize(q)
            sims = qn @ self.embeddings.T
            idx = sims.argmax(axis=1)
            return idx.astype(np.int64), sims[np.arange(len(q)), idx].astype(np.float32)
        labels, dist = self._index.knn_query(q, k=1, num_threads=1)
        return labels[:, 0].astype(np.int64), (1.0 - dist[:, 0]).astype(np.float32)

    def verify(self, sample: int | np.ndarray | Sequence[str] = 1000, *, seed: int = 0) -> float:
        """Recall@1 of the HNSW index against exact search.

        Args:
            sample: Query vectors ``(n, d)``, tag strings (encoded with the encoder), or a count
                of canonical embeddings to perturb with noise (a proxy for generated tags that are
                near, but not equal to, canonical ones).
            seed: RNG seed for the perturbation sample.

        Returns:
            Fraction of queries whose HNSW top-1 equals the exact top-1.
        """
        if isinstance(sample, (int, np.integer)):
            rng = np.random.default_rng(seed)
            pick = rng.integers(0, len(self.tags), size=int(sample))
            noise = rng.normal(size=(int(sample), self.dim)).astype(np.float32)
            noise /= np.linalg.norm(noise, axis=1, keepdims=True)
            q = self.embeddings[pick] + 0.5 * noise
        elif isinstance(sample, np.ndarray):
            q = sample
        else:
            q = self._encode(list(sample))
        hn, _ = self.nearest(q, exact=False)
        ex, _ = self.nearest(q, exact=True)
        return float(np.mean(hn == ex))

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self.encoder is None:
            raise ValueError("this aligner has no encoder; pass vectors to nearest()")
        return np.asarray(self.encoder.encode(texts), dtype=np.float32)

    # ==== Alignment ====

    def _resolve_misses(self, misses: list[str]) -> None:
        """Fill the cache for tags that missed it: rule match first, then one encoder call."""
        to_encode: list[str] = []
        new: dict[str, tuple[str, float]] = {}
        for raw in misses:
            key = rule_key(raw)
            if not key:
                new[raw] = _DROP
                continue
            hit = self._rule.get(key)
            if hit is not None:
                new[raw] = (hit, 1.0)
            else:
                to_encode.append(raw)
        if to_encode:
            vecs = self._encode(to_encode)
            with self._lock:
                idx, sims = self.nearest(vecs)
            floor = self.floor
            for raw, i, s in zip(to_encode, idx.tolist(), sims.tolist(), strict=True):
                new[raw] = _DROP if floor is not None and s < floor else (self.tags[i], s)
        cache = self._cache
        if len(cache) + len(new) > self.cache_size:
            # Approximate LRU at dict cost: drop the oldest-inserted half.
            for k in list(islice(cache, max(len(cache) // 2, len(new)))):
                cache.pop(k, None)
        cache.update(new)

    def lookup(self, tag: str) -> tuple[str | None, float]:
        """Map one generated tag.

        Args:
            tag: A raw generated tag.

        Returns:
            ``(canonical tag or None if dropped, similarity)``.
        """
        hit = self._cache.get(tag)
        if hit is None:
            self._resolve_misses([tag])
            hit = self._cache.get(tag, _DROP)
        return (hit[0] or None), hit[1]

    def align(self, tags: Sequence[str]) -> AlignResult:
        """Align one query's generated tags.

        Args:
            tags: Raw generated tags.

        Returns:
            An :class:`AlignResult`.
        """
        cache = self._cache
        got = [cache.get(t) for t in tags]
        if None in got:
            self._resolve_misses([t for t, g in zip(tags, got, strict=True) if g is None])
            got = [cache.get(t, _DROP) for t in tags]
        return _assemble(tags, got)  # type: ignore[arg-type]

    def align_batch(self, tag_lists: Sequence[Sequence[str]]) -> list[AlignResult]:
        """Align many queries' tags, encoding all cache misses in one encoder call.

        Args:
            tag_lists: One list of raw tags per query.

        Returns:
            One :class:`AlignResult` per query.
        """
        cache = self._cache
        misses = list(dict.fromkeys(t for tags in tag_lists for t in tags if t not in cache))
        if misses:
            self._resolve_misses(misses)
        return [_assemble(tags, [cache.get(t, _DROP) for t in tags]) for tags in tag_lists]

    def cache_info(self) -> dict[str, int]:
        """Number of cached raw tags and the cache capacity."""
        return {"size": len(self._cache), "capacity": self.cache_size}


def _assemble(tags: Sequence[str], got: list[tuple[str, float]]) -> AlignResult:
    out: list[str] = []
    sims: list[float] = []
    dropped: list[str] = []
    pos: dict[str, int] = {}
    for raw, (canon, sim) in zip(tags, got, strict=True):
        if not canon:
            dropped.append(raw)
            continue
        i = pos.get(canon)
        if i is None:
            pos[canon] = len(out)
            out.append(canon)
            sims.append(sim)
        elif sim > sims[i]:
            sims[i] = sim
    return AlignResult(out, dropped, sims)
