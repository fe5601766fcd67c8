"""Benchmark configuration: timing a debug build of the Rust extension measures the wrong thing,
so a run that collects benchmarks marked `needs_release` stops with an error unless `_core` was
built with `maturin develop --release` (`make dev-release`; `make bench` does it) or installed
from a wheel. An error, not a skip: a skipped benchmark reads like a measured one in a summary.

Skip reasons here follow tests/skip_policy.py: hardware, platform, absent shared data, or an
optional extra named in README.md; a missing runtime dependency is never a skip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The tests' helpers (skip_policy, redis_server) serve the benches too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from skip_policy import (  # noqa: E402, F401 (the hooks that hold every skip to the policy)
    pytest_make_collect_report,
    pytest_runtest_makereport,
)

from tagrouter_fast import _core  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_release: times the Rust extension; a debug build is an error"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _core.build_profile == "release":
        return
    timed = [i.nodeid for i in items if i.get_closest_marker("needs_release") is not None]
    if timed:
        raise pytest.UsageError(
            f"_core is a {_core.build_profile!r} build and {len(timed)} benchmark(s) time it "
            f"(e.g. {timed[0]}): run `make dev-release` (maturin develop --release) first"
        )
