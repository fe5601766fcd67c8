"""Benchmark configuration: timing a debug build of the Rust extension measures the wrong thing,
so benchmarks marked `needs_release` are skipped unless `_core` was built with
`maturin develop --release` (or installed from a wheel)."""

from __future__ import annotations

import pytest

from tagrouter_fast import _core


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_release: times the Rust extension; skipped on a debug build"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _core.build_profile == "release":
        return
    skip = pytest.mark.skip(
        reason=f"_core is a {_core.build_profile!r} build; run `maturin develop --release` "
        "(make dev-release) before timing"
    )
    for item in items:
        if item.get_closest_marker("needs_release") is not None:
            item.add_marker(skip)
