"""Batch routing releases the GIL: Python bytecode in another thread makes progress during a
call, calls from several threads overlap, and every thread gets the single-threaded result.

No assertion here depends on how fast anything runs, so a loaded machine cannot fail them: the
proofs rest on who can hold the GIL when, not on durations.
"""

from __future__ import annotations

import itertools
import random
import sys
import threading
import time

import pytest

from tagrouter_fast.core import TagDecider, TagScorer

N_THREADS = 4
# Queries per call. The detached part of a call (the lookups) must outlast the few milliseconds
# the other thread needs to get the GIL and run its loop; ~1.5 M queries take well over 100 ms
# in a release build on this machine. Repeating the base list keeps the memory small.
REPEAT = 10
BASE = 150_000
# Iterations of the main thread's counter loop: about a millisecond of bytecode, a small part
# of the call, so the loop normally ends inside it and never holds up the worker afterwards.
SPINS = 20_000


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
    base = [rng.sample(tags, 5) + ["never-seen"] for _ in range(BASE)]
    batch = base * REPEAT
    return decider, batch, decider.route_tags_batch(batch)


def test_main_thread_runs_bytecode_during_a_batch(big):
    """While a worker is inside ``route_tags_batch``, the main thread executes Python bytecode.

    The switch interval is set far beyond the call's duration, so the interpreter never forces
    the worker to hand the GIL over: the main thread can only run while the worker has released
    it, which it does only inside the call. The worker reads the counter right before and right
    after the call (holding the GIL for both reads), so any increase happened during the call.
    """
    decider, batch, expected = big
    counter = [0]
    seen: dict[str, object] = {}
    ready = threading.Event()
    done = threading.Event()

    def worker() -> None:
        ready.set()
        before = counter[0]
        result = decider.route_tags_batch(batch)
        seen["during"] = counter[0] - before
        seen["before"] = before
        seen["equal"] = result == expected
        done.set()

    old = sys.getswitchinterval()
    # Long enough that a call holding the GIL throughout could never be interrupted; the test
    # does not wait for it in the passing case (see SPINS and the done.wait below).
    sys.setswitchinterval(30.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        ready.wait()
        # Pure bytecode: no call here releases the GIL, so this loop only runs while the worker
        # does not hold it.
        n = 0
        while n < SPINS:
            n += 1
            counter[0] = n
        # Blocks without the GIL, so the worker gets it back as soon as its call ends.
        done.wait()
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert seen["equal"], "the threaded call gave another result than the single-threaded one"
    assert seen["before"] == 0, "the main thread ran before the worker entered the call"
    assert seen["during"] > 0, (
        "the main thread executed no bytecode while the worker was inside route_tags_batch: "
        "the call did not release the GIL"
    )


def test_threads_overlap_and_agree(big):
    """N threads start together at a Barrier; their calls overlap and all agree."""
    decider, batch, expected = big
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
    for i, r in enumerate(results):
        assert r == expected, f"thread {i} disagrees with the single-threaded result"
    # Reading the input and building the output need the GIL, so calls cannot run fully in
    # parallel, and on a loaded machine one thread may be scheduled late; but while the first
    # call is in its detached part the others get the GIL and start theirs.
    overlapping = [
        (i, j)
        for (i, (s1, e1)), (j, (s2, e2)) in itertools.combinations(enumerate(windows), 2)
        if s1 < e2 and s2 < e1
    ]
    assert overlapping, f"no two calls overlapped in time: {windows}"
