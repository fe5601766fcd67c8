"""The option vocabularies, in one place: weightings, aggregations, tagger-fault policies, the
router recipes (`Variant`, `VARIANTS`) and their defaults.

Every reader takes them from here: the core (`TagScorer`, `TagDecider`), the router
(`TagRouter.decide_many`, `TagRouter.load`), the builder (`build_router`, `build_bundle`, the
Ray builder) and the CLI's ``choices``. The Rust core checks weightings and aggregations again
on its own side; ``tests/test_options.py`` keeps the two lists equal.

A :class:`Variant` is everything that turns judgments into a router besides the data: the
scorer's weighting, the decider's aggregation, alignment, normalization, and what is *tuned* on
the judgments themselves (a pseudo-count picked by inner cross-validation, theta* by the paper's
G.2 grid search on out-of-fold routes). The builder
(:func:`tagrouter_fast.builder.bundle.build_router`) does the tuning, so a bundle built from a
user's judgments sits at the operating point the evaluation measured for the same recipe.

>>> resolve_variant("plus").aggregation, resolve_variant("plus").recipe
('mean', 'plus')
>>> resolve_variant("plus").with_options(theta=0.25).recipe  # still derived from "plus"
'plus'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_AGGREGATION",
    "DEFAULT_TAGGER_ERROR_POLICY",
    "DEFAULT_VARIANT",
    "DEFAULT_WEIGHTING",
    "PAPER_AGGREGATION",
    "PAPER_VARIANT",
    "PAPER_WEIGHTING",
    "S_LOSS",
    "S_TIE",
    "S_WIN",
    "SHRINKING_WEIGHTINGS",
    "TAGGER_ERROR_POLICIES",
    "VARIANTS",
    "WEIGHTINGS",
    "Variant",
    "check_choice",
    "resolve_variant",
]

# ==== Scorer and decider ====

#: How `TagScorer` weights per-tag scores: the paper's ``w_t``, ``w_t = 1`` (ablation), and
#: our two shrinking weightings (see `TagScorer`).
WEIGHTINGS = ("paper", "none", "shrunk", "difficulty")
#: The weightings that shrink per-tag scores towards a prior with a pseudo-count
#: (``prior_strength``); the others ignore it.
SHRINKING_WEIGHTINGS = ("shrunk", "difficulty")
PAPER_WEIGHTING = "paper"
DEFAULT_WEIGHTING = PAPER_WEIGHTING

#: How `TagDecider` combines a query's tag scores into ``S(M)``.
AGGREGATIONS = ("sum", "mean")
#: The paper's aggregation; also what a bundle written before the option existed used.
PAPER_AGGREGATION = "sum"
DEFAULT_AGGREGATION = PAPER_AGGREGATION

#: Outcome scores ``s_r`` of a win, a tie and a loss (paper: 1, F.2's 0.15, -1).
S_WIN = 1.0
S_TIE = 0.15
S_LOSS = -1.0

# ==== Router ====

#: What `TagRouter.decide_many` does when the tagger raises: re-raise, or route the batch
#: untagged (every query to the fallback model, reason "fallback"), as a gateway must.
TAGGER_ERROR_POLICIES = ("raise", "untagged")
DEFAULT_TAGGER_ERROR_POLICY = "raise"


def check_choice(what: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``what`` and the choices.

    >>> check_choice("aggregation", "mean", AGGREGATIONS)
    'mean'
    >>> check_choice("aggregation", "max", AGGREGATIONS)
    Traceback (most recent call last):
    ...
    ValueError: aggregation must be one of 'sum', 'mean'; got 'max'
    """
    if not isinstance(value, str) or value not in choices:
        known = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{what} must be one of {known}; got {value!r}")
    return value


# ==== Recipes ====


@dataclass(frozen=True)
class Variant:
    """How a router is built from judgments.

    Attributes:
        aggregation: one of :data:`AGGREGATIONS`: ``"sum"`` of a query's tag scores (paper 3.4)
            or ``"mean"``.
        weighting: one of :data:`WEIGHTINGS`: ``"paper"`` (``w_t``), ``"none"`` (``w_t = 1``),
            ``"difficulty"`` (ours: like ``"shrunk"``, towards a per-tag prior from the model's
            ability and the tag's difficulty over every stored model) or ``"shrunk"`` (ours:
            per-tag rates shrunk towards the model's global rate).
        prior_strength: Pseudo-count of the shrinking weightings (ignored when
            ``prior_strengths`` is set).
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
        recipe: The :data:`VARIANTS` name this variant is (or was derived from by
            `with_options`), or None. A label, not a setting: it names the default bundle
            directory and progress lines, and is neither compared nor in `to_json`.
    """

    aggregation: str = DEFAULT_AGGREGATION
    weighting: str = DEFAULT_WEIGHTING
    prior_strength: float = 0.0
    prior_strengths: tuple[float, ...] = ()
    s_win: float = S_WIN
    s_tie: float = S_TIE
    s_loss: float = S_LOSS
    theta: float | None = 0.0
    align: bool = True
    align_floor: float | None = 0.5
    normalize: bool | None = None
    min_count: int = 5
    inner_folds: int = 3
    references: bool = False
    recipe: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        if self.weighting not in SHRINKING_WEIGHTINGS and (
            self.prior_strength or self.prior_strengths
        ):
            raise ValueError(
                "prior_strength only applies to the "
                f"{' and '.join(SHRINKING_WEIGHTINGS)} weightings"
            )
        if any(not k > 0 for k in self.prior_strengths):
            raise ValueError(f"prior_strengths must be > 0, got {self.prior_strengths}")
        if self.inner_folds < 2:
            raise ValueError(f"inner_folds must be >= 2, got {self.inner_folds}")

    @property
    def tunes(self) -> bool:
        """Whether building needs out-of-fold routes of the training judgments."""
        return self.theta is None or len(self.prior_strengths) > 1

    @property
    def label(self) -> str:
        """The recipe name, or ``"custom"`` for a variant made from settings alone."""
        return self.recipe or "custom"

    def score_params(self, prior_strength: float | None = None) -> dict[str, Any]:
        """The `TagScorer.from_records` keyword arguments of this variant (with another
        pseudo-count, e.g. a tuned one, when ``prior_strength`` is given)."""
        return {
            "s_win": self.s_win,
            "s_tie": self.s_tie,
            "s_loss": self.s_loss,
            "weighting": self.weighting,
            "prior_strength": self.prior_strength if prior_strength is None else prior_strength,
        }

    def with_options(self, **options: Any) -> Variant:
        """This variant with single settings replaced (``None`` values are ignored, except
        ``theta=None``, which asks for theta*; pass ``theta`` only to change it). The result
        keeps this variant's `recipe` label.

        Raises:
            TypeError: an unknown setting.
        """
        known = {f.name for f in fields(self)} - {"recipe"}
        bad = sorted(set(options) - known)
        if bad:
            raise TypeError(f"unknown variant setting(s) {bad}; known: {sorted(known)}")
        kept = {k: v for k, v in options.items() if v is not None or k == "theta"}
        if "prior_strength" in kept and "prior_strengths" not in kept:
            kept["prior_strengths"] = ()  # an explicit pseudo-count is not tuned
        if "weighting" in kept and kept["weighting"] not in SHRINKING_WEIGHTINGS:
            kept.setdefault("prior_strength", 0.0)
            kept.setdefault("prior_strengths", ())
        return replace(self, **kept)

    def to_json(self) -> dict[str, Any]:
        """The settings (not the `recipe` label), as `resolve_variant` reads them back."""
        d = asdict(self)
        del d["recipe"]
        d["prior_strengths"] = list(self.prior_strengths)
        return d


def _recipe(name: str, **settings: Any) -> Variant:
    return Variant(recipe=name, **settings)


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
    "paper": _recipe("paper"),
    "paper-theta": _recipe("paper-theta", theta=None),
    "plus": _recipe(
        "plus",
        aggregation="mean",
        weighting="shrunk",
        prior_strength=100.0,
        prior_strengths=(30.0, 100.0, 300.0),
        theta=None,
    ),
    "plus-difficulty": _recipe(
        "plus-difficulty",
        aggregation="mean",
        weighting="difficulty",
        prior_strength=100.0,
        prior_strengths=(30.0, 100.0, 300.0),
        theta=None,
        references=True,
    ),
}

#: The recipe of the default bundle that `route()` builds and caches, and `tagrouter
#: build-store`'s default: TagRouter+, whose AUC is above the paper's TagRouter in paired
#: comparisons on all four AlpacaEval pools (docs/eval-results.md).
DEFAULT_VARIANT = "plus"
#: `build_router`'s (and the Ray builder's) default: the paper's TagRouter.
PAPER_VARIANT = "paper"


def resolve_variant(variant: str | Variant | Mapping[str, Any]) -> Variant:
    """A :class:`Variant` from its recipe name, itself, or a mapping of its settings (as
    `Variant.to_json` writes them).

    Raises:
        ValueError: an unknown name or a bad setting.
        TypeError: an unknown setting in a mapping, or another type.
    """
    if isinstance(variant, Variant):
        return variant
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
        return VARIANTS[variant]
    if not isinstance(variant, Mapping):
        raise TypeError(
            "variant must be a recipe name, a Variant or a mapping of its settings, "
            f"got {type(variant).__name__}"
        )
    d = dict(variant)
    known = {f.name for f in fields(Variant)}
    bad = sorted(set(d) - known)
    if bad:
        raise TypeError(f"unknown variant setting(s) {bad}; known: {sorted(known)}")
    if "prior_strengths" in d:
        d["prior_strengths"] = tuple(float(k) for k in d["prior_strengths"])
    return Variant(**d)
