"""Taggers: turn a query into tags.

:class:`DefaultTagger` is embedded and works offline; :class:`TagGeneratorTagger` runs the
TagGenerator LLM exported to ONNX. Both have ``.tag(query) -> list[str]``,
``.tag_batch(queries) -> list[list[str]]`` and ``.fingerprint``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tagrouter_fast.tagging.taggers.default import DefaultTagger

if TYPE_CHECKING:
    # The type checker sees the class itself, not whatever __getattr__ returns: through
    # __getattr__ mypy typed it "Any?" (not callable) once tagging/ imports tagrouter_fast.journal.
    from tagrouter_fast.tagging.taggers.generator import TagGeneratorTagger

__all__ = ["DefaultTagger", "TagGeneratorTagger"]


def __getattr__(name: str) -> Any:
    # The generator module pulls in its own runtime pieces; import it only when asked for, and
    # keep this package importable while it is absent.
    if name == "TagGeneratorTagger":
        try:
            from tagrouter_fast.tagging.taggers.generator import TagGeneratorTagger
        except ImportError as e:
            raise AttributeError(
                f"TagGeneratorTagger is unavailable: tagrouter_fast.tagging.taggers.generator "
                f"failed to "
                f"import ({e})"
            ) from e
        return TagGeneratorTagger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
