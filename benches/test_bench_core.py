"""Latency and throughput of the routing core, each next to the pure-Python reference
(`_reference.py`) in the same run. Run with `make bench` (or `pytest benches/test_bench_core.py
--benchmark-enable`).

Targets (2-core CPU, release build): route_tags (5 tags, 5 models, 2,000-tag store) p50 <= 0.5 us
and decide() p50 <= 2 us, both >= 5x the reference; route_tags_batch >= 2M queries/s on one
core; building a store from 100k records < 0.2 s; loading a 10,000-tag x 50-model store < 50 ms.
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from tagrouter_fast import _reference as ref
from tagrouter_fast.core import TagDecider, TagScorer

pytestmark = pytest.mark.needs_release

OUTCOMES = ("win", "tie", "loss")


def make_records(
    n_tags: int, n_models: int, n_queries: int, per_query: int, seed: int, cover: bool = False
):
    rng = random.Random(seed)
    tags = [f"Tag number {i}" for i in range(n_tags)]
    models = [f"model-{i}" for i in range(n_models)]
    records = []
    for q in range(n_queries):
        if cover:  # round-robin, so that every tag is used
            qt = [tags[(q * per_query + j) % n_tags] for j in range(per_query)]
        else:
            qt = rng.sample(tags, per_query)
        for m in models:
            records.append((f"q{q}", qt, m, rng.choice(OUTCOMES)))
    return tags, models, records


@pytest.fixture(scope="module")
def small():
    """The issue's routing scenario: 2,000-tag store, 5 models, queries of 5 tags."""
    tags, models, records = make_records(2000, 5, 20_000, 4, seed=1)
    costs = {m: float(i + 1) for i, m in enumerate(models)}
    decider = TagDecider(TagScorer.from_records(records), costs)
    r_decider = ref.ReferenceDecider(ref.ReferenceScorer(records), costs)
    rng = random.Random(2)
    queries = [rng.sample(tags, 5) for _ in range(100_000)]
    return decider, r_decider, queries, records


# ==== One query ====


@pytest.mark.parametrize("impl", ["rust", "rust-mean", "reference"])
def test_route_tags(benchmark, small, impl):
    decider, r_decider, queries, _ = small
    benchmark.group = "route_tags: 5 tags, 5 models, 2,000-tag store"
    if impl == "rust-mean":
        # What aggregation="mean" adds to the hot path: one division per model.
        decider = TagDecider(decider.scorer, decider.costs, aggregation="mean")
        r_decider = ref.ReferenceDecider(r_decider.scorer, r_decider.costs, aggregation="mean")
    fn = r_decider.route_tags if impl == "reference" else decider.route_tags
    q = queries[0]
    got = benchmark(fn, q)
    benchmark.extra_info["correct"] = got == r_decider.route_tags(q)
    assert benchmark.extra_info["correct"]


@pytest.mark.parametrize("impl", ["rust", "reference"])
def test_route_tag_string(benchmark, small, impl):
    decider, r_decider, queries, _ = small
    benchmark.group = "route from the generator's raw 'a, b, c' string"
    raw = ", ".join(queries[0])
    if impl == "rust":
        fn = decider.route_tag_string
    else:

        def fn(s: str) -> str:
            return r_decider.route_tags(ref.split_tags(s))

    got = benchmark(fn, raw)
    benchmark.extra_info["correct"] = got == r_decider.route_tags(queries[0])
    assert benchmark.extra_info["correct"]


@pytest.mark.parametrize("impl", ["rust", "reference"])
def test_decide(benchmark, small, impl):
    decider, r_decider, queries, _ = small
    benchmark.group = "decide() with full explanation"
    q = [*queries[0][:4], "not in the store"]
    fn = decider.decide if impl == "rust" else r_decider.decide
    got = benchmark(fn, q)
    want = r_decider.decide(q)
    if impl == "rust":
        ok = (got.model, got.scores, got.contributions, got.unknown_tags) == (
            want["model"],
            want["scores"],
            want["contributions"],
            want["unknown_tags"],
        )
    else:
        ok = got == want
    benchmark.extra_info["correct"] = ok
    assert ok


def test_decide_and_read_every_field(benchmark, small):
    """decide() plus materialising every explanation field as Python objects."""
    decider, _, queries, _ = small
    benchmark.group = "decide() with full explanation"
    q = [*queries[0][:4], "not in the store"]
    benchmark(lambda: decider.decide(q).to_dict())


# ==== Batches ====


@pytest.mark.parametrize("impl", ["rust", "numpy", "reference"])
def test_route_tags_batch_100k(benchmark, small, impl):
    decider, r_decider, queries, _ = small
    benchmark.group = "route_tags_batch: 100,000 queries"
    fn = {
        "rust": decider.route_tags_batch,
        "numpy": ref.NumpyDecider(r_decider).route_tags_batch,
        "reference": r_decider.route_tags_batch,
    }[impl]
    rounds = 10 if impl == "rust" else 2
    got = benchmark.pedantic(fn, args=(queries,), rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["queries_per_s"] = len(queries) / benchmark.stats.stats.median
    benchmark.extra_info["correct"] = (
        got
        == decider.route_tags_batch(queries)
        == (r_decider.route_tags_batch(queries[:2000]) + got[2000:])
    )
    assert benchmark.extra_info["correct"]


# ==== Among a candidate subset (capability routing) ====

# 3 of the 5 candidates, M_LLM (the most expensive, model-4) excluded: the subset's roles are
# worked out on every call, from names, as a gateway request's are.
AMONG = ["model-0", "model-1", "model-3"]


@pytest.mark.parametrize("impl", ["rust", "rust-among", "rust-among-all", "reference-among"])
def test_route_tags_among(benchmark, small, impl):
    decider, r_decider, queries, _ = small
    benchmark.group = "route_tags among a subset: 5 tags, 3 of 5 models"
    q = queries[0]
    if impl == "rust":
        got = benchmark(decider.route_tags, q)
        want = r_decider.route_tags(q)
    elif impl == "reference-among":
        got = benchmark(r_decider.route_tags, q, AMONG)
        want = r_decider.route_tags(q, AMONG)
    else:
        among = AMONG if impl == "rust-among" else decider.models
        got = benchmark(decider.route_tags, q, among=among)
        want = r_decider.route_tags(q, among)
    benchmark.extra_info["correct"] = got == want
    assert benchmark.extra_info["correct"]


@pytest.mark.parametrize("impl", ["rust", "rust-among", "rust-among-each"])
def test_decide_batch_among_100k(benchmark, small, impl):
    decider, r_decider, queries, _ = small
    benchmark.group = "decide_batch among a subset: 100,000 queries"
    kw = {
        "rust": {},
        "rust-among": {"among": AMONG},
        # One list object per query, as a gateway batch of requests passes them.
        "rust-among-each": {"among_each": [list(AMONG) for _ in queries]},
    }[impl]
    got = benchmark.pedantic(
        lambda: decider.decide_batch(queries, **kw), rounds=10, iterations=1, warmup_rounds=1
    )
    benchmark.extra_info["queries_per_s"] = len(queries) / benchmark.stats.stats.median
    among = None if impl == "rust" else AMONG
    want = [r_decider.route_tags(t, among) for t in queries[:2000]]
    ok = [decider.models[i] for i in got.model[:2000]] == want
    benchmark.extra_info["correct"] = ok
    assert ok


# ==== Building and loading ====


@pytest.mark.parametrize("impl", ["rust", "reference"])
def test_build_from_100k_records(benchmark, small, impl):
    _, _, _, records = small
    assert len(records) == 100_000
    benchmark.group = "build a store from 100,000 records"
    fn = TagScorer.from_records if impl == "rust" else ref.ReferenceScorer
    got = benchmark.pedantic(fn, args=(records,), rounds=5 if impl == "rust" else 1, iterations=1)
    r = ref.ReferenceScorer(records) if impl == "rust" else got
    if impl == "rust":
        want = np.array([[r.score(m, t) for m in r.models] for t in r.tags])
        ok = got.tags == r.tags and bool(np.array_equal(got.score_matrix(), want))
    else:
        ok = got.models == TagScorer.from_records(records).models
    benchmark.extra_info["correct"] = ok
    assert ok


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A 10,000-tag x 50-model store (2,000 queries x 5 tags x 50 models = 100k records)."""
    _, _, records = make_records(10_000, 50, 2000, 5, seed=3, cover=True)
    scorer = TagScorer.from_records(records)
    assert (len(scorer.tags), len(scorer.models)) == (10_000, 50)
    d = tmp_path_factory.mktemp("store")
    scorer.save(d / "big.trs")
    with open(d / "big.pickle", "wb") as f:
        pickle.dump(ref.ReferenceScorer(records), f, protocol=pickle.HIGHEST_PROTOCOL)
    return scorer, d


@pytest.mark.parametrize("impl", ["rust", "reference-pickle"])
def test_load_10k_tags_x_50_models(benchmark, big_store, impl):
    scorer, d = big_store
    benchmark.group = "load a 10,000-tag x 50-model store"
    if impl == "rust":
        got = benchmark.pedantic(TagScorer.load, args=(d / "big.trs",), rounds=10, iterations=1)
        ok = got.to_bytes() == scorer.to_bytes()
    else:

        def load():
            with open(d / "big.pickle", "rb") as f:
                return pickle.load(f)

        got = benchmark.pedantic(load, rounds=3, iterations=1)
        ok = got.tags == scorer.tags
    benchmark.extra_info["correct"] = ok
    assert ok
