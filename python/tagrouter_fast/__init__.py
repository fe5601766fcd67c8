"""tagrouter_fast: TagRouter (ACL 2025) routing with a Rust core."""

from tagrouter_fast._core import __version__

__all__ = ["__version__"]
