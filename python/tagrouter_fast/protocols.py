"""What the router is made of, as typed protocols: a query goes tagger -> aligner -> core.

Any object with these methods plugs in (`TagRouter(decider, tagger=...)`); the shipped ones are
`tagging.taggers.DefaultTagger` / `TagGeneratorTagger`, `tagging.encoder.OnnxEncoder` and
`tagging.align.TagAligner`. Each carries a ``fingerprint``: a stable id of its model files and
settings, used for cache keys and checked when a bundle is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from tagrouter_fast.tagging.align import AlignResult

__all__ = ["Aligner", "Encoder", "Tagger"]


@runtime_checkable
class Tagger(Protocol):
    """Turns queries into open-domain tags (paper 3.1, TagGenerator)."""

    @property
    def fingerprint(self) -> str: ...

    def tag(self, query: str) -> list[str]: ...

    def tag_batch(self, queries: Sequence[str]) -> list[list[str]]: ...


@runtime_checkable
class Encoder(Protocol):
    """Phrase encoder: texts -> unit-norm float32 rows (one per text)."""

    @property
    def fingerprint(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class Aligner(Protocol):
    """Maps generated tags to the store's tag set (paper 3.3, Tag Alignment)."""

    def align_batch(self, tag_lists: Sequence[Sequence[str]]) -> list[AlignResult]: ...
