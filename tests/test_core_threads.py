"""Batch routing releases the GIL: calls from several threads overlap, other Python threads run
meanwhile, and every thread gets the single-threaded result."""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest

from tagrouter_fast.scoring import TagDecider, TagScorer

N_THREADS = 4


@pytest.fixture(scope="module")
def big():
    rng = random.Random(7)
    tags = [f"tag-{i}" for i in range(500)]
    models = ["m0", "m1", "m2", "m3", "m4"]
    records = []
    for q in range(3000):
        qt = rng.sample(tags, 4)
        for m in models:
            records.append((f"q{q}", qt, m, rng.choice(["win", "tie", "loss"])))
    decider = TagDecider(
        TagScorer.from_records(records), {m: i + 1.0 for i, m in enumerate(models)}
    )
    batch = [rng.sample(tags, 5) + ["never-seen"] for _ in range(150_000)]
    return decider, batch


def test_threads_overlap_and_agree(big):
    decider, batch = big
    expected = decider.route_tags_batch(batch)
    barrier = threading.Barrier(N_THREADS)
    windows: list[tuple[float, float]] = [(0.0, 0.0)] * N_THREADS
    results: list[list[str] | None] = [None] * N_THREADS

    def work(i: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        results[i] = decider.route_tags_batch(batch)
        windows[i] = (t0, time.perf_counter())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)
    # Reading the input and building the output list need the GIL, so calls do not run fully in
    # parallel; but every call overlaps another one in time.
    for i, (start, end) in enumerate(windows):
        others = [w for j, w in enumerate(windows) if j != i]
        assert any(s < end and start < e for s, e in others), windows


def test_other_python_threads_run_during_a_batch(big):
    decider, batch = big
    stamps: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.0005)

    # A long switch interval: the only way the ticker gets the GIL while the main thread is in
    # the call is that the call releases it.
    old = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    try:
        t = threading.Thread(target=ticker)
        t.start()
        time.sleep(0.01)
        t0 = time.perf_counter()
        decider.route_tags_batch(batch)
        t1 = time.perf_counter()
        stop.set()
        t.join()
    finally:
        sys.setswitchinterval(old)
    inside = [s for s in stamps if t0 < s < t1]
    assert len(inside) >= 3, f"{len(inside)} ticks during a {1e3 * (t1 - t0):.1f} ms call"
