"""Label-free features of every query: sentence embeddings, tags and tag-text embeddings.

Both are pure functions of (model files, texts) and are cached on disk by
:mod:`tagrouter_fast.cache`. The default tagger of the package is used when it is importable;
otherwise a small zero-shot stand-in (cosine of the query embedding against a built-in list of
coarse tags) keeps the harness usable, and the result records which tagger produced the tags.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Features", "StandInTagger", "compute_features", "default_tagger", "join_tags"]

# Coarse intent tags in the style of the paper's examples (Tables 11-13); only used when
# tagrouter_fast.taggers.DefaultTagger is not available.
_STANDIN_VOCAB = (
    "Text Generation|Creative Writing|Poetry|Story Writing|Question Answering|Fact Retrieval|"
    "Explanation|Advice|Recommendation|Brainstorming|Summarization|Text Rewriting|Translation|"
    "Grammar Correction|Classification|Information Extraction|Coding|Debugging|Programming "
    "Concepts|Mathematics|Arithmetic|Logical Reasoning|Puzzle|Science|Physics|Chemistry|Biology|"
    "Medicine|Health|Fitness|Nutrition|Cooking|Recipe|Travel|Geography|History|Politics|Law|"
    "Finance|Business|Marketing|Career|Education|Language Learning|Linguistics|Philosophy|"
    "Psychology|Relationships|Parenting|Entertainment|Movies|Music|Gaming|Sports|Technology|"
    "Computer Hardware|Software Usage|Home Improvement|Gardening|Pets|Shopping|Email Writing|"
    "Role Play|Humor|Opinion|Comparison|Definition|List Generation|Planning|How-To Instructions|"
    "Formatting|Data Analysis|Ethics|Religion|Art|Literature|Trivia|Safety"
).split("|")


class StandInTagger:
    """Zero-shot tagger: the ``k`` built-in tags closest to the query embedding.

    Args:
        encoder: Object with ``.encode`` and ``.fingerprint``.
        k: Tags per query.
        vocab: Candidate tags.
    """

    def __init__(self, encoder: Any, k: int = 3, vocab: Sequence[str] = _STANDIN_VOCAB) -> None:
        from tagrouter_fast.cache import embed_cached

        self.encoder = encoder
        self.k = k
        self.vocab = list(vocab)
        self._emb = embed_cached(encoder, self.vocab)
        self.fingerprint = f"standin-{encoder.fingerprint}-k{k}-v{len(self.vocab)}"

    def tag_batch(self, queries: Sequence[str]) -> list[list[str]]:
        """Tag many queries."""
        q = self.encoder.encode(list(queries))
        top = np.argsort(-(q @ self._emb.T), axis=1)[:, : self.k]
        return [[self.vocab[j] for j in row] for row in top]

    def tag(self, query: str) -> list[str]:
        """Tag one query."""
        return self.tag_batch([query])[0]


def default_tagger(encoder: Any) -> Any:
    """The package's :class:`DefaultTagger`, or the stand-in (with a warning) if absent."""
    try:
        from tagrouter_fast.taggers import DefaultTagger  # type: ignore[attr-defined]
    except ImportError:
        warnings.warn(
            "tagrouter_fast.taggers.DefaultTagger is not available; using the eval stand-in tagger",
            stacklevel=2,
        )
        return StandInTagger(encoder)
    return DefaultTagger()


def join_tags(tags: Sequence[str]) -> str:
    """The text embedded for the "w/ tags" baselines: the tags joined by commas."""
    return ", ".join(tags) if tags else "(no tags)"


@dataclass
class Features:
    """Per-query features aligned with the table's rows.

    Attributes:
        emb: ``(n, d)`` query embeddings (unit rows).
        tags: Tags of each query (raw tagger output).
        tag_emb: ``(n, d)`` embeddings of :func:`join_tags` of each query's tags.
        encoder: Encoder fingerprint.
        tagger: Tagger fingerprint.
    """

    emb: np.ndarray
    tags: list[list[str]]
    tag_emb: np.ndarray
    encoder: str
    tagger: str


def compute_features(
    texts: Sequence[str], encoder: Any = None, tagger: Any = None, tags: Sequence[Sequence[str]] | None = None
) -> Features:
    """Embed and tag ``texts`` through the on-disk cache.

    Args:
        texts: Query texts.
        encoder: Defaults to :func:`tagrouter_fast.encoder.default_encoder`.
        tagger: Defaults to :func:`default_tagger`.
        tags: Precomputed tags (skips the tagger).

    Returns:
        The features.
    """
    from tagrouter_fast.cache import embed_cached, tag_cached

    if encoder is None:
        from tagrouter_fast.encoder import default_encoder

        encoder = default_encoder()
    emb = embed_cached(encoder, list(texts))
    if tags is None:
        tagger = tagger if tagger is not None else default_tagger(encoder)
        tags = tag_cached(tagger, list(texts))
        tagger_id = str(getattr(tagger, "fingerprint", type(tagger).__name__))
    else:
        tagger_id = "given"
    tag_lists = [list(t) for t in tags]
    tag_emb = embed_cached(encoder, [join_tags(t) for t in tag_lists])
    return Features(
        emb=np.asarray(emb, dtype=np.float32),
        tags=tag_lists,
        tag_emb=np.asarray(tag_emb, dtype=np.float32),
        encoder=str(encoder.fingerprint),
        tagger=tagger_id,
    )
