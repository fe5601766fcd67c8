"""End-to-end `route(query)` with the embedded defaults: default tagger -> aligner -> Rust core.

Target: p50 <= 10 ms on this 2-core CPU. The store is built from the public AlpacaEval
table (pool five-api); the benchmark skips when that table is absent.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from skip_policy import ALPACAEVAL, data_absent

from tagrouter_fast import TagRouter, build_router
from tagrouter_fast.data.pools import resolve_pool
from tagrouter_fast.data.table import load_table

DATA: Path | None = ALPACAEVAL
if not (ALPACAEVAL / "outcomes.csv").is_file():
    DATA = None
pytestmark = [
    pytest.mark.needs_release,
    pytest.mark.skipif(DATA is None, reason=data_absent(ALPACAEVAL)),
]


@pytest.fixture(scope="module")
def router_and_queries() -> tuple[TagRouter, list[str]]:
    table = load_table(DATA)
    models, llm = resolve_pool(table, pool="five-api")
    router = build_router(table, models, llm=llm)
    router.route(table.texts[0])  # builds the aligner and warms the encoder session
    return router, table.texts


def test_route_query_end_to_end(benchmark, router_and_queries) -> None:  # noqa: ANN001
    router, queries = router_and_queries
    # A new query each call: the tagger and encoder run every time (no query-level cache).
    cycle = itertools.cycle(queries)
    benchmark.group = "route(query) end to end, default tagger"
    model = benchmark(lambda: router.route(next(cycle)))
    assert model in router.decider.models


def test_route_tags_only(benchmark, router_and_queries) -> None:  # noqa: ANN001
    router, queries = router_and_queries
    tags = router.tags(queries[0])
    benchmark.group = "route(query) end to end, default tagger"
    benchmark.extra_info["tags"] = tags
    assert benchmark(router.route_tags, tags) == router.route(queries[0])
