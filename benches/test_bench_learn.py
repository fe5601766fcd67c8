"""Live learning at production scale: the cost of one outcome and of one decision as history
grows, and the memory it takes. Run with `make bench-learn` (or `pytest
benches/test_bench_learn.py --benchmark-enable -s`).

Goals: applying one outcome (`TagRouter.learn`, one call per outcome) p50 <= 20 us at 0, 10^5,
10^6 and 10^7 outcomes of history, flat (within 2x of the empty store); a decision on the
learning store within 1.2x of one on a static store of the same counts (measured interleaved, in
the same run); RSS after 10^6 outcomes through the library within 20 MB of the start.
The figures go to docs/feedback.md; each run also writes them to .benchmarks/learn.json.
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest

from tagrouter_fast import TagDecider, TagRouter, TagScorer

pytestmark = pytest.mark.needs_release

OUTCOMES = ("win", "tie", "loss")
N_TAGS, N_MODELS = 2_000, 5
SIZES = (0, 10**5, 10**6, 10**7)
SAMPLES = 3_000
OUT = Path(".benchmarks") / "learn.json"


def _store() -> tuple[TagScorer, list[str], list[str]]:
    rng = random.Random(1)
    tags = [f"Tag number {i}" for i in range(N_TAGS)]
    models = [f"model-{i}" for i in range(N_MODELS)]
    recs = []
    for q in range(5_000):
        qt = rng.sample(tags, 4)
        for m in models:
            recs.append((f"q{q}", qt, m, rng.choice(OUTCOMES)))
    return TagScorer.from_records(recs), tags, models


def _outcomes(tags: list[str], models: list[str], n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [(rng.sample(tags, 4), rng.choice(models), rng.choice(OUTCOMES)) for _ in range(n)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pct(ns: list[int]) -> tuple[float, float]:
    a = np.asarray(ns, dtype=np.float64) / 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _save(key: str, value: object) -> None:
    OUT.parent.mkdir(exist_ok=True)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[key] = value
    OUT.write_text(json.dumps(data, indent=2))


def test_apply_and_decide_as_history_grows(benchmark) -> None:
    benchmark.group = "live learning: one outcome, one decision, by history size"
    base, tags, models = _store()
    costs = {m: float(i + 1) for i, m in enumerate(models)}
    router = TagRouter(TagDecider(base, costs), align=False)
    router.learn([])  # becomes live: the one O(store) copy, before any timing
    probe = _outcomes(tags, models, SAMPLES, seed=2)
    filler = _outcomes(tags, models, 50_000, seed=3)
    rng = random.Random(4)
    queries = [rng.sample(tags, 5) for _ in range(SAMPLES)]
    rows = []
    history = 0
    timer = time.perf_counter_ns
    for size in SIZES:
        while history < size:
            k = min(len(filler), size - history)
            router.learn(filler[:k])
            history += k
        gc.collect()
        # Apply one outcome per call, the live path's unit.
        learn = router.learn
        apply_ns = []
        for o in probe:
            batch = [o]
            t0 = timer()
            learn(batch)
            apply_ns.append(timer() - t0)
        history += len(probe)
        # Decisions: the live decider and a static one over the same counts, interleaved.
        live = router.decider
        static = TagDecider(live.scorer, costs)
        assert live.route_tags_batch(queries) == static.route_tags_batch(queries)
        live_ns, static_ns = [], []
        for q in queries:
            t0 = timer()
            live.route_tags(q)
            t1 = timer()
            static.route_tags(q)
            t2 = timer()
            live_ns.append(t1 - t0)
            static_ns.append(t2 - t1)
        a50, a99 = _pct(apply_ns)
        l50, l99 = _pct(live_ns)
        s50, s99 = _pct(static_ns)
        rows.append({
            "history": size, "apply_p50_us": a50, "apply_p99_us": a99,
            "decide_live_p50_us": l50, "decide_live_p99_us": l99,
            "decide_static_p50_us": s50, "decide_static_p99_us": s99,
            "decide_ratio_p50": l50 / s50,
        })  # fmt: skip
    empty = rows[0]["apply_p50_us"]
    for r in rows:
        r["apply_vs_empty_p50"] = r["apply_p50_us"] / empty
    print("\nhistory    apply p50/p99 us   vs empty   decide live p50/p99   static p50/p99   ratio")
    for r in rows:
        print(f"{r['history']:>9,}  {r['apply_p50_us']:6.2f} / {r['apply_p99_us']:6.2f}"
              f"      {r['apply_vs_empty_p50']:4.2f}x     {r['decide_live_p50_us']:5.2f} / "
              f"{r['decide_live_p99_us']:5.2f}      {r['decide_static_p50_us']:5.2f} / "
              f"{r['decide_static_p99_us']:5.2f}   {r['decide_ratio_p50']:4.2f}x")
    _save("by_history", rows)
    benchmark.extra_info["by_history"] = rows
    # Store size does not grow with history: no row per outcome.
    assert router.scorer.n_queries == base.n_queries
    benchmark.pedantic(router.learn, args=([probe[0]],), rounds=1000, iterations=1)


def test_rss_after_a_million_outcomes(benchmark) -> None:
    benchmark.group = "live learning: memory"
    base, tags, models = _store()
    costs = {m: float(i + 1) for i, m in enumerate(models)}
    router = TagRouter(TagDecider(base, costs), align=False)
    outs = _outcomes(tags, models, 10_000, seed=5)
    router.learn(outs[:1])  # live, and every tag interned
    gc.collect()
    start = _rss_mb()
    learn = router.learn
    for i in range(10**6):
        learn([outs[i % len(outs)]])
    gc.collect()
    grown = _rss_mb() - start
    print(f"\nRSS after 10^6 outcomes, one call each: {grown:+.1f} MB (start {start:.0f} MB)")
    _save("rss_after_1e6_mb", grown)
    benchmark.extra_info["rss_growth_mb"] = grown
    assert router.scorer.n_learned == 10**6 + 1
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
