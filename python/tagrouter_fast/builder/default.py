"""The default router: the bundle `route()` and `tagrouter route` use, built from judgments on
first use.

This is builder code on purpose: the first `route()` of a fresh install converts
``$TAGROUTER_DATA`` (the public AlpacaEval table by default) into the default bundle, and
converting judgments is the builder's job. The runtime (`tagrouter_fast.router`) only loads
bundles; it never imports this module.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from tagrouter_fast.builder.bundle import build_bundle, data_source
from tagrouter_fast.router import META_FILE, BundleError, TagRouter, default_bundle_dir

_default_router: TagRouter | None = None
_default_lock = threading.Lock()


def default_router() -> TagRouter:
    """The router `route()` uses: the default bundle, built on first use from the public table
    when it is present; loaded once per process."""
    global _default_router
    if _default_router is None:
        with _default_lock:
            if _default_router is None:
                path = Path(os.environ.get("TAGROUTER_ROUTER", default_bundle_dir()))
                explicit = "TAGROUTER_ROUTER" in os.environ
                stale = not (path / META_FILE).is_file()
                if not stale and not explicit and os.environ.get("TAGROUTER_DATA"):
                    # A cached default built from other judgments than $TAGROUTER_DATA names
                    # now is rebuilt, never silently used.
                    try:
                        built_from = json.loads((path / META_FILE).read_text()).get("source")
                    except (OSError, ValueError, AttributeError):
                        built_from = None  # unreadable: rebuilt below
                    stale = built_from != data_source()
                if stale:
                    if explicit:
                        raise BundleError(f"TAGROUTER_ROUTER={path}: not a router bundle")
                    build_bundle(out=path)
                _default_router = TagRouter.load(path)
    return _default_router


def route(query: str) -> str:
    """Drop-in: the model to send `query` to, using the default router (loaded once).

    >>> from tagrouter_fast import route
    >>> route("Write a haiku about autumn")  # doctest: +SKIP
    'claude-instant-1.2'
    """
    return default_router().route(query)


def default_bundle() -> Path:
    """The default bundle's directory, built first when absent (what `tagrouter batch-route`
    uses without --router)."""
    default_router()  # builds it from $TAGROUTER_DATA when absent, else checks it loads
    return Path(os.environ.get("TAGROUTER_ROUTER") or default_bundle_dir())
