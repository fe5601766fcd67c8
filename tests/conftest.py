"""Shared fixtures and the skip policy of the test suite.

Fixtures: `make_table` (a routing table under the test's tmp_path; `routing_tables.write_table`
for other places), `keyword_tagger` and `counting_tagger` (`fake_taggers`), `redis_srv` (a real
redis-server, `redis_server`), and `reset_fakes` (every test of a module with a ``fakes``
fixture of fake backends starts with them answering normally). Serve code is imported inside
the fixtures that need it, so a checkout without the serve extra still collects the rest.

Skips: a skip is held to `skip_policy` (hardware, platform, absent shared data, optional extras);
any other reason is reported as a failure saying why, and so is, under CI, an extra that
`make test` installs. ``-rs`` prints every remaining skip's reason in the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_taggers import CountingTagger, KeywordTagger
from routing_tables import Rows, write_table
from skip_policy import (  # noqa: F401 (the hooks that hold every skip to the policy)
    import_extra,
    pytest_make_collect_report,
    pytest_runtest_makereport,
)

# `pytester` runs a scratch test session inside a test (tests/test_skip_policy.py).
pytest_plugins = ("pytester",)


# ==== Routing tables ====


@pytest.fixture
def make_table(tmp_path: Path) -> Callable[..., Path]:
    """``make_table(queries, outcomes, name="table", **columns)``: `write_table` into
    ``tmp_path / name``."""

    def make(
        queries: Rows | str | bytes, outcomes: Rows | str | bytes, name: str = "table",
        **columns: Any,
    ) -> Path:
        return write_table(tmp_path / name, queries, outcomes, **columns)

    return make


# ==== Fake taggers ====


@pytest.fixture
def keyword_tagger() -> KeywordTagger:
    return KeywordTagger()


@pytest.fixture
def counting_tagger() -> CountingTagger:
    return CountingTagger()


# ==== Servers ====


@pytest.fixture
def redis_srv(tmp_path: Path) -> Iterator[Any]:
    """A redis-server on a free loopback port with an fsynced AOF in ``tmp_path / "redis"``:
    `RedisServer.stop` and `RedisServer.start` restart it on the same data."""
    import_extra("serve", "redis")  # the client the gateway's shared mode talks through
    from redis_server import RedisServer

    with RedisServer(tmp_path / "redis", aof=True) as srv:
        yield srv


@pytest.fixture(autouse=True)
def reset_fakes(request: pytest.FixtureRequest) -> None:
    """Every test of a module with a ``fakes`` fixture (fake backends by name) starts with its
    fake backends answering normally: an earlier test may have told one to fail."""
    if "fakes" in request.fixturenames:
        for f in request.getfixturevalue("fakes").values():
            f.backend.command()
