"""tagrouter_fast: TagRouter (ACL 2025) LLM routing through tags, with a Rust core.

>>> from tagrouter_fast import TagScorer, TagDecider
>>> recs = [("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss")]
>>> scorer = TagScorer.from_records(recs)
>>> TagDecider(scorer, costs={"big": 10.0, "small": 1.0}).route_tags(["Poem"])
'big'
"""

from tagrouter_fast._core import __version__
from tagrouter_fast.builder.bundle import build_router
from tagrouter_fast.builder.default import default_router, route
from tagrouter_fast.core import (
    Decision,
    InconsistentRecordsError,
    NoCandidateError,
    StoreFormatError,
    TagDecider,
    TagRouterError,
    TagScorer,
    ThetaSearch,
    UnknownModelError,
    UnknownTagError,
    split_tags,
    sweep_curve,
    sweep_theta,
)
from tagrouter_fast.router import TagRouter

__all__ = [
    "Decision",
    "InconsistentRecordsError",
    "NoCandidateError",
    "StoreFormatError",
    "TagDecider",
    "TagRouter",
    "TagRouterError",
    "TagScorer",
    "ThetaSearch",
    "UnknownModelError",
    "UnknownTagError",
    "__version__",
    "build_router",
    "default_router",
    "route",
    "split_tags",
    "sweep_curve",
    "sweep_theta",
]
