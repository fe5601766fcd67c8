"""Router recipes, as the builder and the evaluation name them.

The recipes (:class:`Variant`, :data:`VARIANTS`, :func:`resolve_variant`) live with the other
option vocabularies in `tagrouter_fast.options`; this module re-exports them for the code that
imports them from here (the evaluation's runners).
"""

from __future__ import annotations

from tagrouter_fast.options import DEFAULT_VARIANT, VARIANTS, Variant, resolve_variant

__all__ = ["DEFAULT_VARIANT", "VARIANTS", "Variant", "resolve_variant"]
