"""Router recipes: what `tagrouter build-store --variant` builds and `tagrouter eval` measures.

A :class:`Variant` is everything that turns judgments into a router besides the data: the
scorer's weighting, the decider's aggregation, alignment, normalization, and what is *tuned* on
the judgments themselves (a pseudo-count picked by inner cross-validation, theta* by the paper's
G.2 grid search on out-of-fold routes). The builder
(:func:`tagrouter_fast.builder.bundle.build_router`) does the tuning, so a bundle built from a
user's judgments sits at the operating point the evaluation measured for the same recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from tagrouter_fast.router import DEFAULT_VARIANT

__all__ = ["DEFAULT_VARIANT", "VARIANTS", "Variant", "resolve_variant"]


#: Weightings that shrink per-tag scores towards a prior with a pseudo-count.
_SHRINKING = ("shrunk", "difficulty")


@dataclass(frozen=True)
class Variant:
    """How a router is built from judgments.

    Attributes:
        aggregation: ``"sum"`` of a query's tag scores (paper 3.4) or ``"mean"``.
        weighting: ``"paper"`` (``w_t``), ``"none"`` (``w_t = 1``), ``"difficulty"`` (ours:
            like ``"shrunk"``, towards a per-tag prior from the model's ability and the tag's
            difficulty over every stored model) or ``"shrunk"`` (ours: per-tag
            rates shrunk towards the model's global rate).
        prior_strength: Pseudo-count of ``"shrunk"`` (ignored when ``prior_strengths`` is set).
        prior_strengths: Candidate pseudo-counts; the builder picks the one whose
            out-of-fold AR-vs-ratio AUC on the training judgments is highest.
        s_win, s_tie, s_loss: Outcome scores (paper: 1, 0.15, -1).
        theta: Fixed cost-awareness threshold, or ``None``: theta* by the paper's G.2 grid search
            (highest out-of-fold accept rate on the training judgments; ties: lower cost, then
            closest to 0).
        align: Map generated tags the store does not know onto its nearest store tag (3.3).
        align_floor: Cosine similarity below which a generated tag is dropped, not aligned
            (ours; ``None`` keeps every nearest match, as the paper does).
        normalize: Paper 3.2 normalization of the training tags; ``None``: on for open-vocabulary
            taggers, off for the embedded ``DefaultTagger`` (its vocabulary is already clean).
        min_count: Frequency filter of the normalization.
        inner_folds: Folds of the inner cross-validation that tuning uses.
        references: Also store the judgments of every other model of the table as reference
            models (never routed to): the ``"difficulty"`` weighting estimates each tag's
            difficulty from every model in the store, so more models give better estimates.
    """

    aggregation: str = "sum"
    weighting: str = "paper"
    prior_strength: float = 0.0
    prior_strengths: tuple[float, ...] = ()
    s_win: float = 1.0
    s_tie: float = 0.15
    s_loss: float = -1.0
    theta: float | None = 0.0
    align: bool = True
    align_floor: float | None = 0.5
    normalize: bool | None = None
    min_count: int = 5
    inner_folds: int = 3
    references: bool = False

    def __post_init__(self) -> None:
        if self.aggregation not in ("sum", "mean"):
            raise ValueError(f"aggregation must be 'sum' or 'mean', got {self.aggregation!r}")
        if self.weighting not in ("paper", "none", "shrunk", "difficulty"):
            raise ValueError(
                "weighting must be 'paper', 'none', 'shrunk' or 'difficulty', "
                f"got {self.weighting!r}"
            )
        if self.weighting not in _SHRINKING and (self.prior_strength or self.prior_strengths):
            raise ValueError("prior_strength only applies to the shrunk and difficulty weightings")
        if any(not k > 0 for k in self.prior_strengths):
            raise ValueError(f"prior_strengths must be > 0, got {self.prior_strengths}")
        if self.inner_folds < 2:
            raise ValueError(f"inner_folds must be >= 2, got {self.inner_folds}")

    @property
    def tunes(self) -> bool:
        """Whether building needs out-of-fold routes of the training judgments."""
        return self.theta is None or len(self.prior_strengths) > 1

    def with_options(self, **options: Any) -> Variant:
        """This variant with single settings replaced (``None`` values are ignored, except
        ``theta=None``, which asks for theta*; pass ``theta`` only to change it).

        Raises:
            TypeError: an unknown setting.
        """
        known = {f.name for f in fields(self)}
        bad = sorted(set(options) - known)
        if bad:
            raise TypeError(f"unknown variant setting(s) {bad}; known: {sorted(known)}")
        kept = {k: v for k, v in options.items() if v is not None or k == "theta"}
        if "prior_strength" in kept and "prior_strengths" not in kept:
            kept["prior_strengths"] = ()  # an explicit pseudo-count is not tuned
        if "weighting" in kept and kept["weighting"] not in _SHRINKING:
            kept.setdefault("prior_strength", 0.0)
            kept.setdefault("prior_strengths", ())
        return replace(self, **kept)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["prior_strengths"] = list(self.prior_strengths)
        return d


#: The recipes users build and the evaluation compares:
#:
#: - ``paper``: TagRouter exactly as the paper defines it (sum of ``w_t``-weighted scores,
#:   theta = 0), plus our alignment floor of 0.5.
#: - ``paper-theta``: the same with theta* from the paper's G.2 grid search on the judgments.
#: - ``plus`` (TagRouter+, ours): per-tag accept scores shrunk towards each model's global rate
#:   with a pseudo-count picked from {30, 100, 300} by inner cross-validation, averaged over the
#:   query's known tags, theta* by G.2 (averaged shrunk scores differ little between models, so
#:   its theta = 0 point sends nearly everything to M_LLM: it needs the tuned theta).
#: - ``plus-difficulty`` (TagRouter+D, ours): TagRouter+ with the per-tag scores shrunk towards
#:   a prior from the model's ability and the tag's difficulty (``weighting="difficulty"``),
#:   the difficulty estimated from every model of the table (stored as reference models, never
#:   routed to). Built for models with few judgments (a model that just joined).
VARIANTS: dict[str, Variant] = {
    "paper": Variant(),
    "paper-theta": Variant(theta=None),
    "plus": Variant(
        aggregation="mean",
        weighting="shrunk",
        prior_strength=100.0,
        prior_strengths=(30.0, 100.0, 300.0),
        theta=None,
    ),
    "plus-difficulty": Variant(
        aggregation="mean",
        weighting="difficulty",
        prior_strength=100.0,
        prior_strengths=(30.0, 100.0, 300.0),
        theta=None,
        references=True,
    ),
}


def resolve_variant(variant: str | Variant | Mapping[str, Any]) -> Variant:
    """A :class:`Variant` from its name, itself, or a mapping of its settings.

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(variant, Variant):
        return variant
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
        return VARIANTS[variant]
    d = dict(variant)
    if "prior_strengths" in d:
        d["prior_strengths"] = tuple(float(k) for k in d["prior_strengths"])
    return Variant(**d)
