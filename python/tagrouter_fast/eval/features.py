"""Label-free features of every query: sentence embeddings, tags and tag-text embeddings.

Both are pure functions of (model files, texts) and are cached on disk by
:mod:`tagrouter_fast.tagging.cache`; tags come from the package's embedded ``DefaultTagger``
unless a
tagger or precomputed tags are given, and the result records which tagger produced them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Features", "compute_features", "join_tags"]


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
    texts: Sequence[str],
    encoder: Any = None,
    tagger: Any = None,
    tags: Sequence[Sequence[str]] | None = None,
) -> Features:
    """Embed and tag ``texts`` through the on-disk cache.

    Args:
        texts: Query texts.
        encoder: Defaults to :func:`tagrouter_fast.tagging.encoder.default_encoder`.
        tagger: Defaults to the embedded ``DefaultTagger``.
        tags: Precomputed tags (skips the tagger).

    Returns:
        The features.
    """
    from tagrouter_fast.tagging.cache import embed_cached, tag_cached

    if encoder is None:
        from tagrouter_fast.tagging.encoder import default_encoder

        encoder = default_encoder()
    emb = embed_cached(encoder, list(texts))
    if tags is None:
        if tagger is None:
            from tagrouter_fast.tagging.taggers import DefaultTagger

            tagger = DefaultTagger()
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
