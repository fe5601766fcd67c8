"""Tag normalization (paper 3.2): frequency filtering, rule aggregation, semantic aggregation.

:func:`normalize_tags` turns the raw tags of a tagged training set into a canonical tag set and a
raw -> canonical mapping (:class:`TagNormalization`, saved as JSON beside the scorer store):

1. Rule aggregation (:func:`rule_normalize`): special characters become spaces, each word gets a
   capital first letter, spaces collapse. "question-answering" and "Question  answering" both
   become "Question Answering".
2. Frequency filtering: tags seen fewer than ``min_count`` times (default 5) are discarded.
   Counting happens *after* rule aggregation so that spelling variants pool their counts; the
   paper lists filtering first, but filtering first would throw away variants of a frequent tag.
3. Semantic aggregation, Alg. 1 of the paper (appendix E.1): for every query, its tags are
   embedded, clustered with DBSCAN on cosine distance, and each cluster is reduced to at most two
   tags by repeatedly removing the tag with the least cumulative similarity to the rest.

DBSCAN is a small numpy implementation (:func:`dbscan`) so that the runtime needs no scikit-learn.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tagrouter_fast.tagging.vectors import l2_normalize

__all__ = [
    "TagNormalization",
    "dbscan",
    "frequency_filter",
    "normalize_tags",
    "reduce_cluster",
    "iterative_reduction",
    "rule_key",
    "rule_normalize",
]

# ==== Rule aggregation ====

# A word is a run of letters/digits, optionally followed by "+"/"#" ("C++", "C#", "F#"): turning
# those into spaces would merge "C++ Programming" with "C Programming", which the paper's rule
# was not meant to do. Everything else (punctuation, "_", symbols) separates words.
_WORD = re.compile(r"[^\W_]+[+#]*")


def rule_normalize(tag: str) -> str:
    """Paper rule aggregation: special characters to spaces, capitalised words, single spaces.

    Only the first letter of each word is upper-cased; the rest is kept ("JSON Output" stays,
    "iOS" becomes "IOS"), so acronyms survive.

    Args:
        tag: A raw tag.

    Returns:
        The normalised tag ("" if nothing but symbols).

    >>> rule_normalize("  question-answering / FAQ__style!! ")
    'Question Answering FAQ Style'
    >>> rule_normalize("c++ programming")
    'C++ Programming'
    """
    words = _WORD.findall(unicodedata.normalize("NFKC", tag))
    return " ".join(w[:1].upper() + w[1:] for w in words)


def rule_key(tag: str) -> str:
    """Case-folded :func:`rule_normalize`: the key under which spelling variants coincide.

    >>> rule_key("JSON-output") == rule_key("Json Output")
    True
    """
    return rule_normalize(tag).casefold()


def frequency_filter(counts: Mapping[str, int], min_count: int = 5) -> set[str]:
    """Tags seen at least ``min_count`` times.

    Args:
        counts: Tag -> number of occurrences.
        min_count: Threshold (paper: 5).

    Returns:
        The kept tags.
    """
    return {t for t, c in counts.items() if c >= min_count}


# ==== DBSCAN (cosine) ====


_unit = l2_normalize


def dbscan(
    embeddings: np.ndarray, eps: float = 0.25, min_samples: int = 2, *, chunk: int = 2048
) -> np.ndarray:
    """DBSCAN on cosine distance (``1 - cos``), same semantics as scikit-learn's.

    A point is a core point when at least ``min_samples`` points (itself included) lie within
    ``eps``; clusters are the connected components of core points plus the border points they
    reach; the rest is noise (label -1). Border points go to the first cluster that reaches them,
    in index order, as in scikit-learn.

    Args:
        embeddings: ``(n, d)`` vectors (normalised here).
        eps: Maximum cosine distance between neighbours.
        min_samples: Neighbourhood size (self included) that makes a core point.
        chunk: Rows per block when building neighbour lists (bounds memory at ``chunk * n``).

    Returns:
        ``(n,)`` int64 labels, clusters numbered 0.. in order of discovery, noise -1.

    >>> x = np.array([[1, 0], [0.99, 0.1], [0, 1]], dtype=np.float32)
    >>> dbscan(x, eps=0.05, min_samples=2).tolist()
    [0, 0, -1]
    """
    x = _unit(embeddings)
    n = len(x)
    labels = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return labels
    neighbours: list[np.ndarray] = []
    for s in range(0, n, chunk):
        d = 1.0 - x[s : s + chunk] @ x.T
        for row in d:
            neighbours.append(np.flatnonzero(row <= eps))
    core = np.array([len(nb) >= min_samples for nb in neighbours])
    cluster = 0
    for i in range(n):
        if labels[i] != -1 or not core[i]:
            continue
        labels[i] = cluster
        stack = [i]
        while stack:
            p = stack.pop()
            if not core[p]:
                continue
            for q in neighbours[p]:
                if labels[q] == -1:
                    labels[q] = cluster
                    if core[q]:
                        stack.append(int(q))
        cluster += 1
    return labels


# ==== Alg. 1: iterative reduction ====


def reduce_cluster(
    members: Sequence[int],
    sim: np.ndarray,
    *,
    keep: int = 2,
    tiebreak: Sequence[float] | None = None,
) -> list[int]:
    """Alg. 1 ``ReduceTags``: drop the least central member until ``keep`` remain.

    "Cumulative similarity" is read as the sum of cosine similarities to the *remaining* members,
    recomputed after every removal (the pseudo-code's while loop re-evaluates C each time).

    Args:
        members: Indices into ``sim``.
        sim: Square cosine-similarity matrix.
        keep: Cluster size to stop at (the pseudo-code's ``while |C| > 2``).
        tiebreak: Optional per-index priority (e.g. global frequency); on equal cumulative
            similarity the member with the lower priority is removed, then the later one.

    Returns:
        The kept indices, in their original order.
    """
    cur = list(members)
    while len(cur) > keep:
        sub = sim[np.ix_(cur, cur)]
        cum = sub.sum(axis=1) - np.diag(sub)
        prio = [tiebreak[i] if tiebreak is not None else 0.0 for i in cur]
        # Least cumulative similarity; ties: lowest priority, then latest position.
        worst = min(range(len(cur)), key=lambda j: (round(float(cum[j]), 6), prio[j], -j))
        del cur[worst]
    return cur


def iterative_reduction(
    query_tags: Sequence[Sequence[str]],
    embed: Mapping[str, np.ndarray],
    *,
    eps: float = 0.25,
    min_samples: int = 2,
    keep: int = 2,
    frequency: Mapping[str, int] | None = None,
) -> tuple[list[list[str]], dict[str, Counter[str]]]:
    """Alg. 1 over a set of queries: per-query DBSCAN of its tags, then ``ReduceTags`` per cluster.

    Ambiguities in the pseudo-code and the choices made here:

    * DBSCAN noise points (tags not within ``eps`` of any other tag of the same query) are not
      "clusters" in the pseudo-code; dropping them would delete every distinct intent of a query,
      against the paper's "preserving essential semantic information", so each is kept as its own
      singleton cluster.
    * ``ReducedTags <- ReducedTags ∪ ReducedC`` is kept per query (the reduced tags of each query)
      and its union over queries is the canonical set.
    * A removed tag is recorded as merged into the kept member of its cluster most similar to it;
      :func:`normalize_tags` turns those votes into the global raw -> canonical mapping.

    Args:
        query_tags: Tags of each query (already rule-normalised and frequency-filtered).
        embed: Tag -> unit embedding.
        eps: DBSCAN cosine-distance radius.
        min_samples: DBSCAN neighbourhood size (2: any close pair forms a cluster, matching the
            paper's "each cluster contains at least two tags").
        keep: Tags kept per cluster (the paper's 2).
        frequency: Global tag counts, used only to break ties.

    Returns:
        ``(reduced tags per query, merges)`` where ``merges[removed][kept]`` counts how often
        ``removed`` was folded into ``kept``.
    """
    reduced: list[list[str]] = []
    merges: dict[str, Counter[str]] = {}
    for tags in query_tags:
        uniq = list(dict.fromkeys(tags))
        if len(uniq) <= keep:
            reduced.append(uniq)
            continue
        e = np.stack([embed[t] for t in uniq])
        sim = e @ e.T
        labels = dbscan(e, eps=eps, min_samples=min_samples)
        kept_idx: set[int] = set()
        for lab in np.unique(labels):
            members = np.flatnonzero(labels == lab).tolist()
            if lab == -1:
                kept_idx.update(members)
                continue
            prio = [float(frequency.get(t, 0)) if frequency else 0.0 for t in uniq]
            kept = reduce_cluster(members, sim, keep=keep, tiebreak=prio)
            kept_idx.update(kept)
            for m in members:
                if m not in kept:
                    target = kept[int(np.argmax(sim[m, kept]))]
                    merges.setdefault(uniq[m], Counter())[uniq[target]] += 1
        reduced.append([t for i, t in enumerate(uniq) if i in kept_idx])
    return reduced, merges


# ==== The normalization object ====


@dataclass
class TagNormalization:
    """A canonical tag set and the raw -> canonical mapping that produced it.

    Attributes:
        canonical: Canonical tags, most frequent first.
        mapping: Raw tag (as seen, and its rule-normalised form) -> canonical tag.
        counts: Canonical tag -> number of queries it survives in.
        params: The parameters used (for provenance).
    """

    canonical: list[str]
    mapping: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_key = {rule_key(k): v for k, v in self.mapping.items()}
        for t in self.canonical:
            self._by_key.setdefault(rule_key(t), t)

    def map_tag(self, tag: str) -> str | None:
        """Canonical tag for a raw tag (exact, then rule-normalised lookup), or ``None``."""
        hit = self.mapping.get(tag)
        if hit is not None:
            return hit
        return self._by_key.get(rule_key(tag))

    def apply(self, tags: Iterable[str]) -> list[str]:
        """Map a query's tags, dropping unknown ones and duplicates (order kept)."""
        out = (self.map_tag(t) for t in tags)
        return list(dict.fromkeys(t for t in out if t is not None))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "tagrouter_fast.tag_normalization",
            "version": 1,
            "canonical": self.canonical,
            "counts": self.counts,
            "mapping": self.mapping,
            "params": self.params,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as JSON (atomically)."""
        from tagrouter_fast.tagging.cache import atomic_write_bytes

        data = json.dumps(self.to_json(), ensure_ascii=False, indent=1, sort_keys=True)
        atomic_write_bytes(Path(path), data.encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TagNormalization:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: Not a tag-normalization file or an unknown version.
        """
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if d.get("format") != "tagrouter_fast.tag_normalization" or d.get("version") != 1:
            raise ValueError(f"{path} is not a version-1 tagrouter_fast tag normalization file")
        return cls(
            canonical=list(d["canonical"]),
            mapping=dict(d["mapping"]),
            counts={k: int(v) for k, v in d.get("counts", {}).items()},
            params=dict(d.get("params", {})),
        )


def normalize_tags(
    query_tags: Sequence[Sequence[str]],
    encoder: Any = None,
    *,
    min_count: int = 5,
    semantic: bool = True,
    eps: float = 0.25,
    min_samples: int = 2,
    keep: int = 2,
    embeddings: Mapping[str, np.ndarray] | None = None,
) -> tuple[TagNormalization, list[list[str]]]:
    """Paper 3.2 normalization of a tagged dataset.

    Args:
        query_tags: Raw generated tags of each training query.
        encoder: Encoder for semantic aggregation (``.encode``; embeddings are disk-cached).
        min_count: Frequency filter threshold (paper: 5).
        semantic: Run Alg. 1 (needs ``encoder`` or ``embeddings``).
        eps: DBSCAN cosine-distance radius for Alg. 1.
        min_samples: DBSCAN core-point neighbourhood size.
        keep: Tags kept per DBSCAN cluster (paper: 2).
        embeddings: Precomputed rule-normalised tag -> vector (skips the encoder).

    Returns:
        ``(normalization, normalized tags per query)``; the second is what the scorer should be
        built from.

    >>> norm, per_query = normalize_tags([["q-a", "Q A"]] * 5, semantic=False)
    >>> norm.canonical, per_query[0]
    (['Q A'], ['Q A'])
    """
    # Rule aggregation; the display form of a key is its most common rule-normalised spelling.
    spellings: dict[str, Counter[str]] = {}
    ruled: list[list[str]] = []
    for tags in query_tags:
        row = []
        for raw in tags:
            norm = rule_normalize(raw)
            if not norm:
                continue
            spellings.setdefault(norm.casefold(), Counter())[norm] += 1
            row.append(norm.casefold())
        ruled.append(list(dict.fromkeys(row)))
    display = {k: c.most_common(1)[0][0] for k, c in spellings.items()}

    counts = Counter(k for row in ruled for k in row)
    kept = frequency_filter(counts, min_count)
    filtered = [[display[k] for k in row if k in kept] for row in ruled]
    freq = {display[k]: c for k, c in counts.items() if k in kept}

    merges: dict[str, Counter[str]] = {}
    if semantic and kept:
        if embeddings is None:
            if encoder is None:
                raise ValueError("semantic aggregation needs an encoder or embeddings")
            from tagrouter_fast.tagging.cache import embed_cached

            names = sorted(freq)
            vecs = _unit(embed_cached(encoder, names))
            embeddings = dict(zip(names, vecs, strict=True))
        reduced, merges = iterative_reduction(
            filtered, embeddings, eps=eps, min_samples=min_samples, keep=keep, frequency=freq
        )
    else:
        reduced = filtered

    survive = Counter(t for row in reduced for t in row)
    canonical = sorted(survive, key=lambda t: (-survive[t], t))
    canon_set = set(canonical)
    target: dict[str, str] = {t: t for t in canonical}
    for removed, votes in merges.items():
        if removed in canon_set:
            continue  # survived in some query: it is canonical in its own right
        # Follow merge chains (a -> b where b itself never survives) to a canonical tag.
        best = votes.most_common(1)[0][0]
        seen = {removed}
        while best not in canon_set and best in merges and best not in seen:
            seen.add(best)
            best = merges[best].most_common(1)[0][0]
        if best in canon_set:
            target[removed] = best

    mapping: dict[str, str] = {}
    for tags in query_tags:
        for raw in tags:
            k = rule_key(raw)
            t = target.get(display.get(k, ""))
            if t is not None:
                mapping[raw] = t
    mapping.update(target)
    params = {
        "min_count": min_count,
        "semantic": semantic,
        "eps": eps,
        "min_samples": min_samples,
        "keep": keep,
        "encoder": getattr(encoder, "fingerprint", None),
    }
    result = TagNormalization(canonical, mapping, {t: survive[t] for t in canonical}, params)
    per_query = [list(dict.fromkeys(target[t] for t in row if t in target)) for row in reduced]
    return result, per_query
