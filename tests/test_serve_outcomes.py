"""OutcomeStore: outcome feedback that is durable, idempotent and exact under threads and crashes.

Every test builds its router from a few records (no model download) and compares the learned
store with one built from scratch (`TagScorer.from_records`) from the base records plus exactly
the outcomes that were acknowledged: "counted exactly once" is checked count by count.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tagrouter_fast.core import TagDecider, TagScorer
from tagrouter_fast.router import TagRouter
from tagrouter_fast.serve.learn import state as state_mod
from tagrouter_fast.serve.learn.journal_reader import JournalReader
from tagrouter_fast.serve.learn.outcomes import (
    QUERY_ID_PREFIX,
    DuplicateOutcome,
    OutcomeStore,
    OutcomeStoreError,
    StateError,
    UnknownDecision,
)

BASE = [
    ("q1", ["Poem"], "big", "win"),
    ("q1", ["Poem"], "small", "loss"),
    ("q2", ["Math"], "big", "loss"),
    ("q2", ["Math"], "small", "win"),
    ("q3", ["Code", "Math"], "big", "win"),
    ("q3", ["Code", "Math"], "small", "tie"),
]
TAGSETS = [["Poem"], ["Math"], ["Code", "Poem"], ["Travel"], []]
LABELS = ["win", "tie", "loss"]
MODELS = ["big", "small"]


def make_router() -> TagRouter:
    scorer = TagScorer.from_records(BASE)
    return TagRouter(
        TagDecider(scorer, costs={"big": 10.0, "small": 1.0}, llm="big"), tagger=None, align=False
    )


def plan(i: int) -> tuple[str, list[str], str, str]:
    """Decision ``i``: id, tags, model, outcome label (deterministic, so a subprocess and the
    test agree without talking)."""
    return f"d{i}", TAGSETS[i % len(TAGSETS)], MODELS[i % 2], LABELS[i % 3]


def canon(s: TagScorer) -> dict[str, Any]:
    """Everything the counts determine, independent of tag/model order."""
    return {
        # Live outcomes are queries of their own kept as counts (n_learned), not as rows.
        "n_queries": s.n_queries + s.n_learned,
        "n_records": s.n_records,
        "tags": sorted(s.tags),
        "models": sorted(s.models),
        "tag_count": {t: s.tag_count(t) for t in s.tags},
        "totals": {m: s.model_totals(m) for m in s.models},
        "counts": {(m, t): s.counts(m, t) for m in s.models for t in s.tags},
    }


def expected(counted: list[tuple[str, list[str], str, str]]) -> dict[str, Any]:
    recs = [(QUERY_ID_PREFIX + d, tags, m, label) for d, tags, m, label in counted]
    return canon(TagScorer.from_records(BASE + recs))


def crash(store: OutcomeStore) -> None:
    """Leave a store the way kill -9 would: nothing flushed or snapshotted, files just closed."""
    store._stopping = True
    store._snap_wanted.set()
    store._worker.join()
    store._close_files()


# ==== Outcome labels ====


def test_labels_scores_and_thresholds(tmp_path: Path) -> None:
    with OutcomeStore(make_router(), tmp_path) as s:
        assert [s.outcome_label(x)[0] for x in ("win", "tie", "loss")] == LABELS
        got = [s.outcome_label(x)[0] for x in (1.0, 0.9, 2 / 3, 0.5, 0.34, 1 / 3, 0.1, 0, 1)]
        assert got == ["win", "win", "win", "tie", "tie", "loss", "loss", "loss", "win"]
        for bad in ("WIN", "draw", "", 1.5, -0.01, math.nan, True, None, [1]):
            with pytest.raises(ValueError, match="outcome must be") as e:
                s.outcome_label(bad)  # type: ignore[arg-type]
            assert repr(bad) in str(e.value)
    with OutcomeStore(make_router(), tmp_path / "b", win_at=0.8, tie_above=0.2) as s:
        assert [s.outcome_label(x)[0] for x in (0.8, 0.79, 0.2)] == ["win", "tie", "loss"]
    with pytest.raises(ValueError, match="tie_above < win_at"):
        OutcomeStore(make_router(), tmp_path / "c", win_at=0.3, tie_above=0.5)


# ==== Feedback semantics ====


def test_feedback_is_counted_and_visible_to_the_next_decision(tmp_path: Path) -> None:
    router = make_router()
    assert router.route_tags(["Travel"]) == "big"  # unknown tag: fallback
    with OutcomeStore(router, tmp_path) as s:
        assert s.version == 0
        for i in range(3):
            s.remember(f"t{i}", ["Travel"], "small")
        assert [s.feedback(f"t{i}", 0.9) for i in range(3)] == [1, 2, 3]
        assert s.version == 3
        assert router.scorer.counts("small", "Travel") == (3, 0, 0)
        # The learned tag now decides: the cheap model wins on it.
        assert router.route_tags(["Travel"]) == "small"
        assert router.decide_tags(["Travel"]).reason != "fallback"


def test_unknown_duplicate_and_bad_input(tmp_path: Path) -> None:
    router = make_router()
    with OutcomeStore(router, tmp_path) as s:
        with pytest.raises(UnknownDecision, match="unknown or expired decision id 'nope'"):
            s.feedback("nope", "win")
        s.remember("a", ["Poem"], "small")
        with pytest.raises(ValueError, match="already remembered"):
            s.remember("a", ["Math"], "big")
        with pytest.raises(ValueError, match="outcome must be"):
            s.feedback("a", "great")
        assert not s.has_outcome("a")  # a refused outcome leaves no trace
        s.feedback("a", "win")
        with pytest.raises(DuplicateOutcome, match="already has an outcome"):
            s.feedback("a", "loss")
        assert router.scorer.counts("small", "Poem") == (1, 0, 1)  # once, not twice
        with pytest.raises(ValueError, match="decision_id"):
            s.remember("", ["Poem"], "big")
        with pytest.raises(ValueError, match="decision_id"):
            s.remember("x" * 300, ["Poem"], "big")
        with pytest.raises(TypeError, match="tags"):
            s.remember("b", "Poem", "big")
        with pytest.raises(ValueError, match="model"):
            s.remember("c", ["Poem"], "")
        assert isinstance(UnknownDecision("m"), KeyError)
        assert isinstance(DuplicateOutcome("m"), ValueError)
    with pytest.raises(OutcomeStoreError, match="closed"):
        s.feedback("a", "win")


def test_ttl_and_size_bounds(tmp_path: Path) -> None:
    now = [1000.0]
    s = OutcomeStore(
        make_router(), tmp_path, decision_ttl_s=10.0, max_decisions=3, clock=lambda: now[0]
    )
    s.remember("old", ["Poem"], "big")
    now[0] += 11
    with pytest.raises(UnknownDecision, match="expired|unknown"):
        s.feedback("old", "win")
    for i in range(5):
        s.remember(f"n{i}", ["Poem"], "big")
    assert s.stats()["decisions"] == 3
    with pytest.raises(UnknownDecision):
        s.feedback("n0", "win")  # evicted: the oldest go first
    assert s.feedback("n4", "win") == 1
    s.close()
    # Expiry holds across a restart too (the decisions log carries the original times).
    now[0] += 11
    s = OutcomeStore(make_router(), tmp_path, decision_ttl_s=10.0, clock=lambda: now[0])
    with pytest.raises(UnknownDecision):
        s.feedback("n3", "win")
    assert s.stats()["decisions"] == 0
    s.close()


# ==== Restart ====


def test_restart_replays_journal_and_keeps_idempotency(tmp_path: Path) -> None:
    s = OutcomeStore(make_router(), tmp_path, snapshot_every=1000)
    counted = []
    for i in range(12):
        d, tags, m, label = plan(i)
        s.remember(d, tags, m)
        if i < 9:
            s.feedback(d, label)
            counted.append(plan(i))
    v = s.version
    crash(s)  # no snapshot: everything after generation 0 comes from the journal

    router = make_router()
    s = OutcomeStore(router, tmp_path)
    assert canon(router.scorer) == expected(counted)
    assert s.version == v == 9
    with pytest.raises(DuplicateOutcome):
        s.feedback("d3", "win")  # the replayed journal marked it
    # Decisions remembered before the restart still take their outcome.
    for i in range(9, 12):
        s.feedback(plan(i)[0], plan(i)[3])
        counted.append(plan(i))
    assert s.version == 12
    s.close()  # clean: final snapshot, nothing to replay next time
    router = make_router()
    s = OutcomeStore(router, tmp_path)
    assert canon(router.scorer) == expected(counted)
    assert s.version == 12
    assert s.stats()["snapshot_seq"] == 12
    with pytest.raises(DuplicateOutcome):
        s.feedback("d10", "loss")  # after compaction the snapshot's registry remembers it
    s.close()


def test_background_snapshots_compact_the_journal(tmp_path: Path) -> None:
    router = make_router()
    s = OutcomeStore(router, tmp_path, snapshot_every=5)
    counted = []
    for i in range(23):
        d, tags, m, label = plan(i)
        s.remember(d, tags, m)
        s.feedback(d, label)
        counted.append(plan(i))
    deadline = time.monotonic() + 60  # a hang guard only: it returns as soon as it is there
    # The worker snapshots whenever snapshot_every outcomes have come since the last one, so
    # it ends less than 5 behind the 23 applied.
    while s.stats()["snapshot_seq"] < 19 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.stats()["snapshot_seq"] >= 19
    with s._snapshot_lock:
        pass  # the snapshot that got there may still be compacting: let it finish
    segments = sorted(tmp_path.glob("journal-*.log"))
    assert len(segments) <= 2  # older segments were compacted away
    assert len(list(tmp_path.glob("store-*.trs"))) == 1
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert TagScorer.load(tmp_path / manifest["store"]).n_records == len(BASE) + manifest["seq"]
    crash(s)
    router = make_router()
    s = OutcomeStore(router, tmp_path)
    assert canon(router.scorer) == expected(counted)
    s.close()


STEPS = ["store-written", "registry-written", "manifest-written", "journal-compacted", "compacted"]


class _Crash(BaseException):
    pass


@pytest.mark.parametrize("step", STEPS)
def test_crash_between_snapshot_steps_recovers_exactly(tmp_path: Path, step: str) -> None:
    s = OutcomeStore(make_router(), tmp_path, snapshot_every=10_000)
    counted = []
    for i in range(8):
        d, tags, m, label = plan(i)
        s.remember(d, tags, m)
        s.feedback(d, label)
        counted.append(plan(i))
    s.snapshot()  # a complete earlier generation, so compaction has something to delete
    for i in range(8, 14):
        d, tags, m, label = plan(i)
        s.remember(d, tags, m)
        if i < 12:
            s.feedback(d, label)
            counted.append(plan(i))

    def fault(name: str) -> None:
        if name == step:
            raise _Crash(name)

    s._fault = fault
    with pytest.raises(_Crash):
        s.snapshot()
    crash(s)

    router = make_router()
    s = OutcomeStore(router, tmp_path)
    assert canon(router.scorer) == expected(counted), step
    for i in (3, 10):
        with pytest.raises(DuplicateOutcome):
            s.feedback(plan(i)[0], "win")
    for i in (12, 13):
        s.feedback(plan(i)[0], plan(i)[3])
        counted.append(plan(i))
    s.close()
    router = make_router()
    with OutcomeStore(router, tmp_path) as s:
        assert canon(router.scorer) == expected(counted), step
    assert not list(tmp_path.glob(".*.tmp"))


# ==== Damaged files ====


def _post(s: OutcomeStore, ids: range) -> list[tuple[str, list[str], str, str]]:
    out = []
    for i in ids:
        d, tags, m, label = plan(i)
        s.remember(d, tags, m)
        s.feedback(d, label)
        out.append(plan(i))
    return out


def test_torn_last_line_is_dropped_and_later_appends_stay_readable(tmp_path: Path) -> None:
    s = OutcomeStore(make_router(), tmp_path)
    counted = _post(s, range(4))
    crash(s)
    (seg,) = tmp_path.glob("journal-*.log")
    good = seg.read_bytes()
    with seg.open("ab") as f:
        f.write(good.splitlines(keepends=True)[-1][:25])  # a write cut short, no newline
    router = make_router()
    s = OutcomeStore(router, tmp_path)
    assert canon(router.scorer) == expected(counted)
    assert seg.read_bytes() == good  # truncated back to the last whole line
    counted += _post(s, range(4, 6))
    crash(s)
    router = make_router()
    with OutcomeStore(router, tmp_path):
        assert canon(router.scorer) == expected(counted)


def test_corrupt_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    s = OutcomeStore(make_router(), tmp_path)
    _post(s, range(3))
    crash(s)
    (seg,) = tmp_path.glob("journal-*.log")
    lines = seg.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"win"', b'"tie"').replace(b'"loss"', b'"tie"')
    lines[1] = lines[1].replace(b'"seq":2', b'"seq":7')  # any change at all fails the crc
    seg.write_bytes(b"".join(lines))
    with pytest.raises(StateError, match=rf"{seg.name}:2: corrupt line"):
        OutcomeStore(make_router(), tmp_path)


def test_missing_journal_segment_is_an_error(tmp_path: Path) -> None:
    s = OutcomeStore(make_router(), tmp_path, snapshot_every=10_000)
    _post(s, range(3))
    s._capture()  # rotate the journal without a snapshot: two segments, both needed
    _post(s, range(3, 5))
    crash(s)
    first = sorted(tmp_path.glob("journal-*.log"))[0]
    first.unlink()
    with pytest.raises(StateError, match="missing"):
        OutcomeStore(make_router(), tmp_path)


def test_changed_base_store_and_second_owner_are_refused(tmp_path: Path) -> None:
    s = OutcomeStore(make_router(), tmp_path)
    with pytest.raises(OutcomeStoreError, match="in use"):
        OutcomeStore(make_router(), tmp_path)
    _post(s, range(2))
    s.close()
    other = TagRouter(
        TagDecider(TagScorer.from_records(BASE[:4]), {"big": 10.0, "small": 1.0}, llm="big"),
        align=False,
    )
    with pytest.raises(StateError, match="another store"):
        OutcomeStore(other, tmp_path)
    with OutcomeStore(other, tmp_path, check_base=False) as s:
        assert s.version == 2  # the learned store replaced the other base, knowingly


def test_fsync_failure_refuses_further_outcomes_and_never_double_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = OutcomeStore(make_router(), tmp_path)
    counted = _post(s, range(2))
    for i in (2, 3):
        s.remember(plan(i)[0], plan(i)[1], plan(i)[2])

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(state_mod, "_fsync", broken)
    with pytest.raises(OutcomeStoreError, match="fsync failed"):
        s.feedback("d2", "tie")
    monkeypatch.undo()
    with pytest.raises(OutcomeStoreError, match="failed"):
        s.feedback("d3", "win")  # never retried on the same file after a failed fsync
    crash(s)
    router = make_router()
    with OutcomeStore(router, tmp_path) as s:
        # d2 was never acknowledged; its line reached the page cache, so it may count, but
        # only once: the retry is a duplicate, not a second count.
        assert s.has_outcome("d2")
        counted.append(("d2", plan(2)[1], plan(2)[2], "tie"))
        assert canon(router.scorer) == expected(counted)
        with pytest.raises(DuplicateOutcome):
            s.feedback("d2", "tie")
        s.feedback("d3", "win")


def test_update_store_is_durable_and_bumps_the_version(tmp_path: Path) -> None:
    router = make_router()
    s = OutcomeStore(router, tmp_path)
    _post(s, range(2))
    v = s.update_store(lambda st: st.with_model([("q9", ["Poem"], "mid", "win")]))
    assert v == 3 and "mid" in router.scorer.models
    crash(s)
    router = make_router()
    with OutcomeStore(router, tmp_path) as s:
        assert "mid" in router.scorer.models and s.version == 3


# ==== Threads ====


def test_concurrent_feedback_while_routing_loses_nothing(tmp_path: Path) -> None:
    router = make_router()
    s = OutcomeStore(router, tmp_path, snapshot_every=64)
    n_threads, per = 8, 40
    for i in range(n_threads * per):
        s.remember(*plan(i)[:3])
    barrier = threading.Barrier(2 * n_threads)
    done = threading.Event()
    versions: list[int] = []
    errors: list[BaseException] = []
    routed = [0] * n_threads
    lock = threading.Lock()

    def post(k: int) -> None:
        try:
            barrier.wait()
            mine = [
                s.feedback(plan(i)[0], plan(i)[3]) for i in range(k, n_threads * per, n_threads)
            ]
            # a retry from another thread's perspective: always a duplicate, never a count
            with pytest.raises(DuplicateOutcome):
                s.feedback(plan(k)[0], "win")
            with lock:
                versions.extend(mine)
        except BaseException as e:
            errors.append(e)

    def route(k: int) -> None:
        try:
            barrier.wait()
            while not done.is_set():
                assert router.route_tags(TAGSETS[routed[k] % len(TAGSETS)]) in MODELS
                routed[k] += 1
                if routed[k] % 20 == 0:
                    # A gateway thread does I/O between decisions. Eight threads spinning on
                    # route_tags alone would hold the GIL so that every GIL release in the
                    # writers (write, fsync) waits out a 5 ms switch interval: a convoy that
                    # makes this test take ~20 s without saying anything about correctness.
                    time.sleep(0)
        except BaseException as e:
            errors.append(e)

    writers = [threading.Thread(target=post, args=(k,)) for k in range(n_threads)]
    readers = [threading.Thread(target=route, args=(k,)) for k in range(n_threads)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(30)
    done.set()
    for t in readers:
        t.join(30)
    assert not errors, errors
    n = n_threads * per
    assert sorted(versions) == list(range(1, n + 1))  # each outcome applied exactly once
    assert all(r > 0 for r in routed)
    everything = [plan(i) for i in range(n)]
    assert canon(router.scorer) == expected(everything)
    s.close()
    router = make_router()
    with OutcomeStore(router, tmp_path) as s:
        assert canon(router.scorer) == expected(everything)
        assert s.version == n


# ==== kill -9 ====
# A child process posts outcomes and reports each step on stdout; the parent kills it with
# SIGKILL and checks that every outcome the child saw acknowledged is counted after recovery.
#
# The report is part of the evidence, so it must not lie when the kill lands in the middle of
# it. print("A", d) is one write() per piece when stdout is unbuffered (PYTHONUNBUFFERED=1, as
# in this CI): a kill between them left b"A" in the pipe, which the parent read as the ack of
# decision "" and reported as a lost outcome (it happened under load). So the child reports with
# `emit`, one write() per whole line (atomic on a pipe: < PIPE_BUF), and the parent reads only
# whole lines of a strict grammar (`_events`): torn or stray output fails as such, never as a
# durability verdict.

#: Generous hang guard per child (a hung child is killed then, and that moment is as good a kill
#: moment as any: nothing in the checks depends on timing).
CHILD_TIMEOUT_S = 120.0


def emit(*words: str) -> None:
    """One report line, written with a single write() whatever the stdout buffering."""
    line = (" ".join(words) + "\n").encode()
    assert len(line) < 512  # well under PIPE_BUF: the pipe takes it whole or not at all
    assert os.write(1, line) == len(line)


_EVENT = re.compile(rb"(?:(R|T|A) ([A-Za-z0-9-]+)|READY|END)")


def _events(out: bytes) -> list[tuple[str, str]]:
    """The child's report as ``(kind, id)`` pairs (id "" for READY/END); anything but whole
    lines of the grammar is a harness error."""
    lines = out.split(b"\n")
    assert lines[-1] == b"", f"torn report line from the child: {out[-200:]!r}"
    got = []
    for raw in lines[:-1]:
        m = _EVENT.fullmatch(raw)
        assert m, f"unexpected child output line {raw!r}"
        got.append(((m.group(1) or raw).decode(), (m.group(2) or b"").decode()))
    return got


def _spawn(source: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # stderr goes to a file: a chatty child must never block on a pipe nobody reads yet.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", source, *args], stdout=subprocess.PIPE, stderr=err, env=env
        )
        proc.stderr = os.fdopen(os.dup(err.fileno()), "rb")
    return proc


def _reap(proc: subprocess.Popen[bytes], out: bytes) -> list[tuple[str, str]]:
    """Reads the rest of a killed (or killing itself) child's report and waits for it."""
    assert proc.stdout is not None and proc.stderr is not None
    # Not communicate(): it reads the pipe's fd directly and would drop what readline()
    # already buffered.
    out += proc.stdout.read()
    proc.wait(timeout=CHILD_TIMEOUT_S)
    proc.stdout.close()
    with proc.stderr as f:
        f.seek(0)
        err = f.read().decode(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    return _events(out)


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [sys.argv[3]]
    from test_serve_outcomes import emit, make_router, plan
    from tagrouter_fast.serve.learn.outcomes import OutcomeStore

    state, start, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
    store = OutcomeStore(make_router(), state, snapshot_every=7)
    for k in range(3):  # decisions whose outcome arrives after a later restart
        store.remember(f"pre{rnd}-{k}", ["Poem"], "small")
        emit("R", f"pre{rnd}-{k}")
    emit("READY")
    for i in range(start, start + 400):
        d, tags, model, label = plan(i)
        store.remember(d, tags, model)
        emit("T", d)
        store.feedback(d, label if i % 4 else {"win": 0.9, "tie": 0.5, "loss": 0.1}[label])
        emit("A", d)
    emit("END")
    while True:  # a slow parent may see END first: the child is still killed, never exits
        time.sleep(60)
    """
)


def test_kill9_at_random_moments_loses_no_acknowledged_outcome(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # TAGROUTER_KILL9_SEED=<n> reruns it with other kill moments (a manual stress run).
    rng = random.Random(int(os.environ.get("TAGROUTER_KILL9_SEED", "1234")))
    attempted: list[str] = []
    acked: set[str] = set()
    remembered: list[str] = []
    start = 0
    tests_dir = str(Path(__file__).parent)
    for rnd in range(5):
        proc = _spawn(CHILD, str(state), str(start), tests_dir, str(rnd))
        assert proc.stdout is not None
        guard = threading.Timer(CHILD_TIMEOUT_S, proc.kill)
        guard.start()
        try:
            kill_after = rng.randint(1, 120)  # acknowledged outcomes before the kill
            seen, out = 0, b""
            while seen < kill_after:
                line = proc.stdout.readline()
                out += line
                if not line.endswith(b"\n"):
                    break  # EOF: the child died (or the guard killed it); _reap says which
                if line.startswith(b"A "):
                    seen += 1
            time.sleep(rng.random() * 0.01)  # land anywhere in the next iteration
            proc.send_signal(signal.SIGKILL)
            events = _reap(proc, out)
        finally:
            guard.cancel()
        kinds = [k for k, _ in events]
        assert "READY" in kinds, f"round {rnd}: the child never got going: {events[:5]}"
        tried = [d for k, d in events if k == "T"]
        done = {d for k, d in events if k == "A"}
        # The child is sequential: only its last attempt can be unacknowledged.
        assert set(tried[:-1]) <= done <= set(tried), (rnd, set(tried) ^ done)
        attempted += tried
        acked |= done
        remembered += [d for k, d in events if k == "R"]
        start += 400

    router = make_router()
    with OutcomeStore(router, state) as s:
        counted_ids = [d for d in attempted if s.has_outcome(d)]
        lost = acked - set(counted_ids)
        assert not lost, f"acknowledged outcomes lost: {sorted(lost)}"
        extra = set(counted_ids) - acked
        assert len(extra) <= 5  # at most the one in flight at each kill
        by_id = {plan(i)[0]: plan(i) for i in range(start)}
        assert canon(router.scorer) == expected([by_id[d] for d in counted_ids])
        assert s.version == len(counted_ids)
        # Decisions remembered by killed processes still take their outcome, once.
        for d in remembered:
            s.feedback(d, "win")
            with pytest.raises(DuplicateOutcome):
                s.feedback(d, "win")
    # No file is corrupt: every line of every log passes its check.
    for f in list(state.glob("journal-*.log")) + list(state.glob("registry-*.log")):
        lines_ok, end = state_mod._scan(f, strict=True, last=False)
        assert end == f.stat().st_size
    manifest = json.loads((state / "MANIFEST.json").read_text())
    TagScorer.load(state / manifest["store"])


# The failure above, replayed deterministically: the child's outcome is durable, then the kill
# lands between the pieces of its acknowledgement.
TORN_ACK_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [sys.argv[2]]
    from test_serve_outcomes import emit, make_router, plan
    from tagrouter_fast.serve.learn.outcomes import OutcomeStore

    store = OutcomeStore(make_router(), sys.argv[1])
    d, tags, model, label = plan(0)
    store.remember(d, tags, model)
    emit("T", d)
    store.feedback(d, label)
    if sys.argv[3] == "emit":
        emit("A", d)
        os.kill(os.getpid(), signal.SIGKILL)

    class KilledAfterOneWrite:  # the kill lands after print()'s first write() ("A")
        def write(self, s):
            os.write(1, s.encode())
            os.kill(os.getpid(), signal.SIGKILL)
        def flush(self):
            pass

    sys.stdout = KilledAfterOneWrite()
    print("A", d, flush=True)  # how the child used to acknowledge
    """
)


def test_kill9_in_the_middle_of_the_ack_line_is_not_a_lost_outcome(tmp_path: Path) -> None:
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The old report: the pipe holds b"A" without an id. Read as an ack of decision "", it made
    # the check report a lost outcome; `_events` refuses it as torn output instead.
    proc = _spawn(TORN_ACK_CHILD, str(tmp_path / "a"), tests_dir, "print", env=env)
    with pytest.raises(AssertionError, match="torn report line"):
        _reap(proc, b"")
    # ... while the outcome was not lost at all: it was durable before the ack began.
    router = make_router()
    with OutcomeStore(router, tmp_path / "a") as s:
        assert s.has_outcome("d0")
        assert canon(router.scorer) == expected([plan(0)])
    # The report as the child writes it now: whole lines even when killed right after.
    proc = _spawn(TORN_ACK_CHILD, str(tmp_path / "b"), tests_dir, "emit", env=env)
    assert _reap(proc, b"") == [("T", "d0"), ("A", "d0")]
    with OutcomeStore(make_router(), tmp_path / "b") as s:
        assert s.has_outcome("d0")


# The store's side of the same question, also deterministic: the snapshot thread is paused at
# each of its steps (the cut is taken, the journal rotated) while outcomes keep being
# acknowledged on the old and new segments, then the process is killed.
PAUSED_SNAPSHOT_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    sys.path[:0] = [sys.argv[3]]
    from test_serve_outcomes import emit, make_router, plan
    from tagrouter_fast.serve.learn.outcomes import OutcomeStore

    state, step = sys.argv[1], sys.argv[2]
    store = OutcomeStore(make_router(), state, snapshot_every=10**6)

    def post(ids):
        for i in ids:
            d, tags, model, label = plan(i)
            store.remember(d, tags, model)
            emit("T", d)
            store.feedback(d, label)
            emit("A", d)

    post(range(0, 8))
    store.snapshot()  # a complete generation, so compaction has files to delete
    post(range(8, 14))
    for k in range(2):
        store.remember(f"pre-{k}", ["Poem"], "small")
        emit("R", f"pre-{k}")
    paused = threading.Event()

    def fault(name):
        if name == step:
            paused.set()
            threading.Event().wait()  # the snapshot thread stops here until the kill

    store._fault = fault
    threading.Thread(target=store.snapshot, daemon=True).start()
    if not paused.wait(60):
        emit("END")  # never reached the step: the parent fails on the missing kill
        sys.exit(3)
    emit("READY")
    post(range(14, 24))  # acknowledged while the snapshot is stopped mid-way
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("step", STEPS)
def test_kill9_while_a_snapshot_is_paused_loses_no_acknowledged_outcome(
    tmp_path: Path, step: str
) -> None:
    proc = _spawn(PAUSED_SNAPSHOT_CHILD, str(tmp_path), step, str(Path(__file__).parent))
    events = _reap(proc, b"")
    assert ("READY", "") in events, events
    acked = [d for k, d in events if k == "A"]
    assert acked == [plan(i)[0] for i in range(24)]  # every attempt acknowledged, in order
    router = make_router()
    with OutcomeStore(router, tmp_path) as s:
        assert canon(router.scorer) == expected([plan(i) for i in range(24)]), step
        assert s.version == 24
        for i in (3, 10, 20):
            with pytest.raises(DuplicateOutcome):
                s.feedback(plan(i)[0], "win")
        for k in range(2):
            s.feedback(f"pre-{k}", "win")


# ==== Integrity at start-up: what is cut, what is refused ====
# A torn tail that was never acknowledged is cut with a warning; anything that may have held an
# acknowledged outcome stops the start with one line: the file, the byte offset, how to recover.
# The files are left as they were, so the operator can still restore them.


class _DiskFull:
    """`os.write` as a disk with ``room`` bytes left for the files under ``root``: the write
    that crosses it writes what fits (a torn line), the ones after it fail with ENOSPC. Other
    files (pytest's own, pipes) write as usual."""

    def __init__(self, root: Path, room: int) -> None:
        self.root, self.room = str(root), room
        self._write = os.write

    def __call__(self, fd: int, data: Any) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(self.root):
            return self._write(fd, data)
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        n = min(len(data), self.room)
        self.room -= n
        return self._write(fd, bytes(data[:n]))


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


@needs_proc
def test_disk_full_mid_append_then_snapshot_starts_once_space_is_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = OutcomeStore(make_router(), tmp_path)
    counted = _post(s, range(3))
    s.remember(*plan(3)[:3])
    monkeypatch.setattr(os, "write", _DiskFull(tmp_path, room=20))  # part of the next line
    with pytest.raises(OutcomeStoreError, match="append failed"):
        s.feedback("d3", "win")
    (seg,) = tmp_path.glob("journal-*.log")
    assert seg.read_bytes().endswith(b"\n")  # the torn part was cut off at once
    with pytest.raises(OSError, match="No space left"):
        s.snapshot()  # what POST /admin/snapshot does, on the same full disk
    crash(s)
    monkeypatch.undo()  # space freed

    router = make_router()
    with OutcomeStore(router, tmp_path) as s:  # used to refuse: "damaged before its end"
        assert canon(router.scorer) == expected(counted)
        assert not s.has_outcome("d3")  # never acknowledged, never counted
        s.feedback("d3", "win")
        counted.append(plan(3)[:3] + ("win",))
    router = make_router()
    with OutcomeStore(router, tmp_path):
        assert canon(router.scorer) == expected(counted)


def _two_segments(tmp_path: Path) -> tuple[Path, Path, list[tuple[str, list[str], str, str]]]:
    """Outcomes 1-3 in one journal segment, 4-5 in the next (a snapshot's rotation without the
    snapshot), the process killed."""
    s = OutcomeStore(make_router(), tmp_path, snapshot_every=10_000)
    counted = _post(s, range(3))
    s._capture()
    counted += _post(s, range(3, 5))
    crash(s)
    first, second = sorted(tmp_path.glob("journal-*.log"))
    return first, second, counted


def test_torn_tail_of_an_older_segment_was_never_acknowledged_and_is_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What a failed append followed by a rotation left behind before this was fixed: the torn
    # line's seq went to the next line, in the next segment, so it held nothing acknowledged.
    s = OutcomeStore(make_router(), tmp_path, snapshot_every=10_000)
    counted = _post(s, range(3))
    s._capture()
    crash(s)
    first, _ = sorted(tmp_path.glob("journal-*.log"))
    good = first.read_bytes()
    with first.open("ab") as f:
        f.write(good.splitlines(keepends=True)[-1][:30])
    router = make_router()
    with caplog.at_level("WARNING", "tagrouter.outcomes"), OutcomeStore(router, tmp_path) as s:
        assert canon(router.scorer) == expected(counted)
        assert first.read_bytes() == good  # cut back to its last whole line
        counted += _post(s, range(3, 5))
    assert "dropping a torn last line" in caplog.text
    router = make_router()
    with OutcomeStore(router, tmp_path):
        assert canon(router.scorer) == expected(counted)


def test_damaged_last_line_of_an_older_segment_held_an_acknowledged_outcome(
    tmp_path: Path,
) -> None:
    first, _, _ = _two_segments(tmp_path)
    lines = first.read_bytes().splitlines(keepends=True)
    offset = len(b"".join(lines[:-1]))
    lines[-1] = lines[-1].replace(b'"seq":3', b'"seq":8')  # outcome 3 unreadable
    first.write_bytes(b"".join(lines))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(StateError) as e:
        OutcomeStore(make_router(), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert first.name in msg and f"byte {offset}" in msg and "outcomes 3..3" in msg
    assert "To recover" in msg and "ACKED" in msg
    # A refused start changes nothing: the operator can still restore the files.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def _last_line(seg: Path) -> tuple[bytes, int]:
    data = seg.read_bytes()
    lines = data.splitlines(keepends=True)
    return lines[-1], len(data) - len(lines[-1])


@pytest.mark.parametrize("damage", ["corrupt-last-line", "cut-on-a-line", "emptied", "deleted"])
def test_lost_acknowledged_outcomes_at_the_journal_end_stop_the_start(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = OutcomeStore(make_router(), tmp_path)
    counted = _post(s, range(3))
    crash(s)
    (seg,) = tmp_path.glob("journal-*.log")
    last, offset = _last_line(seg)
    if damage == "corrupt-last-line":
        seg.write_bytes(seg.read_bytes()[:offset] + last.replace(b'"d2"', b'"x2"'))
        lost, kept, where = "3..3", counted[:2], [seg.name, f"byte {offset}"]
    elif damage == "cut-on-a-line":
        seg.write_bytes(seg.read_bytes()[:offset])
        lost, kept, where = "3..3", counted[:2], [seg.name, f"byte {offset}"]
    elif damage == "emptied":
        seg.write_bytes(b"")
        lost, kept, where = "1..3", [], [seg.name, "is empty"]
    else:
        seg.unlink()
        lost, kept, where = "1..3", [], [str(tmp_path), "no journal file"]
    with pytest.raises(StateError) as e:
        OutcomeStore(make_router(), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"outcomes {lost} are lost" in msg and all(w in msg for w in where), msg
    assert f"delete {tmp_path / 'ACKED'}" in msg
    # The documented way to accept the loss: delete ACKED. The start then warns, and counts
    # what the journal still holds.
    (tmp_path / "ACKED").unlink()
    router = make_router()
    with caplog.at_level("WARNING", "tagrouter.outcomes"), OutcomeStore(router, tmp_path) as s:
        assert canon(router.scorer) == expected(kept)
        kept += _post(s, range(3, 5))
    if damage != "deleted":
        assert "no ACKED watermark" in caplog.text
    router = make_router()
    with OutcomeStore(router, tmp_path):  # and from then on, checked again
        assert canon(router.scorer) == expected(kept)


def test_a_journal_the_snapshot_covers_may_go(tmp_path: Path) -> None:
    # Not every missing journal is a loss: after a clean close the snapshot covers everything.
    s = OutcomeStore(make_router(), tmp_path)
    counted = _post(s, range(3))
    s.close()
    for seg in tmp_path.glob("journal-*.log"):
        seg.unlink()
    router = make_router()
    with OutcomeStore(router, tmp_path) as s:
        assert canon(router.scorer) == expected(counted)
        assert s.stats()["acked_seq"] == 3


def test_acked_follows_each_group_commit_without_a_second_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    s = OutcomeStore(make_router(), tmp_path)
    monkeypatch.setattr(state_mod, "_fsync", counting)
    _post(s, range(3))
    assert len(synced) == 3  # one fsync per outcome (sequential: one per group commit)
    assert json.loads((tmp_path / "ACKED").read_bytes()[9:])["acked"] == 3
    crash(s)
    assert json.loads((tmp_path / "ACKED").read_bytes()[9:])["acked"] == 3


# ==== The local learner's seam ====


def test_failure_says_why_no_outcome_can_be_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = OutcomeStore(make_router(), tmp_path)
    assert s.writable and s.failure is None
    s.remember("d0", ["Poem"], "big")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(state_mod, "_fsync", broken)
    with pytest.raises(OutcomeStoreError):
        s.feedback("d0", "win")
    monkeypatch.undo()
    assert not s.writable and "Input/output error" in (s.failure or "")
    crash(s)
    s = OutcomeStore(make_router(), tmp_path)
    s.close()
    assert not s.writable and "closed" in (s.failure or "")


def test_journal_reader_follows_rotation_and_the_kept_journal(tmp_path: Path) -> None:
    s = OutcomeStore(make_router(), tmp_path, keep_journal=True, snapshot_every=10_000)
    reader = JournalReader(s, 0)
    _post(s, range(3))
    got = reader.read(s.applied_seq)
    assert [seq for seq, _ in got] == [1, 2, 3]
    d, tags, model, label = plan(0)
    assert got[0][1] == (QUERY_ID_PREFIX + d, tags, model, label)
    assert reader.read(2) == [] and reader.read(s.applied_seq) == []
    s.snapshot()  # covers 1-3 and rotates; the journal is kept: nothing was released
    _post(s, range(3, 5))
    assert len(list(tmp_path.glob("journal-*.log"))) == 2
    assert [seq for seq, _ in reader.read(s.applied_seq)] == [4, 5]
    s.release_journal(5)
    s.snapshot()
    assert len(list(tmp_path.glob("journal-*.log"))) == 1  # released, then compacted
    _post(s, range(5, 6))
    assert [seq for seq, _ in reader.read(s.applied_seq)] == [6]
    crash(s)
    # After a restart a reader starts after its own mark, whatever compaction left.
    s = OutcomeStore(make_router(), tmp_path, keep_journal=True)
    assert [seq for seq, _ in JournalReader(s, 5).read(s.applied_seq)] == [6]
    assert [seq for seq, _ in JournalReader(s, 0).read(s.applied_seq)] == [6]
    s.close()


# ==== feedback_async: the gateway's path (group commit without a thread per outcome) ====


@pytest.mark.parametrize("path", ["on-loop", "committer-thread"])
def test_feedback_async_commits_groups_durably_and_counts_each_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    import asyncio

    fsyncs = []

    def counting(fd: int) -> None:
        fsyncs.append(fd)
        os.fsync(fd)

    monkeypatch.setattr(state_mod, "_fsync", counting)
    router = make_router()
    n = 200
    with OutcomeStore(router, tmp_path) as s:
        if path == "committer-thread":
            s._fsync_s = 1.0  # a slow disk, as measured: the loop never waits on its fsync
        before = len(fsyncs)

        async def post_all() -> list[int]:
            return list(await asyncio.gather(*(
                s.feedback_async(f"a{i}", plan(i)[3], decision=(plan(i)[1], plan(i)[2], s._clock()))
                for i in range(n)
            )))

        versions = asyncio.run(post_all())
        # Every outcome acknowledged once, each with its own version; fewer fsyncs than
        # outcomes: they were committed in groups.
        assert sorted(versions) == list(range(1, n + 1))
        assert len(fsyncs) - before < n
        assert s.stats()["applied_seq"] == n
        # The same outcome again is a duplicate, on either path.
        with pytest.raises(DuplicateOutcome):
            asyncio.run(s.feedback_async("a0", "win", decision=(["Poem"], "small", s._clock())))
    # Acknowledged means durable: a restart counts exactly these.
    expected_counts = canon(make_router_with(
        [(f"a{i}", plan(i)[1], plan(i)[2], plan(i)[3]) for i in range(n)]))
    r2 = make_router()
    with OutcomeStore(r2, tmp_path):
        assert canon(r2.scorer) == expected_counts


def make_router_with(counted: list[tuple[str, list[str], str, str]]) -> TagScorer:
    router = make_router()
    router.learn([(tags, m, label) for _d, tags, m, label in counted])
    return router.scorer


def test_feedback_async_fsync_failure_fails_the_group_and_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    router = make_router()
    with OutcomeStore(router, tmp_path) as s:
        monkeypatch.setattr(state_mod, "_fsync", broken)

        async def post(i: int) -> int:
            return await s.feedback_async(f"b{i}", "win", decision=(["Poem"], "small",
                                                                     s._clock()))

        async def post_all() -> list[Any]:
            return list(await asyncio.gather(*(post(i) for i in range(5)),
                                             return_exceptions=True))

        results = asyncio.run(post_all())
        assert all(isinstance(r, OutcomeStoreError) for r in results), results
        assert s.failure is not None and router.scorer.n_learned == 0
        monkeypatch.undo()


def test_background_snapshots_take_a_bounded_share_of_the_time(tmp_path: Path) -> None:
    router = make_router()
    with OutcomeStore(router, tmp_path, snapshot_every=1) as s:
        s.remember("c0", ["Poem"], "small")
        s.feedback("c0", "win")
        assert wait_for_snapshot(s)
        # After a snapshot the next one waits SNAPSHOT_DUTY - 1 times its cost.
        assert s._next_snapshot_at > 0.0


def wait_for_snapshot(s: OutcomeStore, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if s.stats()["snapshot_seq"] >= 1:
            return True
        time.sleep(0.01)
    return False


def test_feedback_async_from_two_event_loops_at_once(tmp_path: Path) -> None:
    """Each loop commits and wakes only its own waiters (futures are not thread-safe)."""
    import asyncio

    router = make_router()
    n = 150
    results: dict[int, list[int]] = {}
    with OutcomeStore(router, tmp_path) as s:

        def run(k: int) -> None:
            async def post_all() -> list[int]:
                return list(await asyncio.gather(*(
                    s.feedback_async(f"l{k}-{i}", "win", decision=(["Poem"], "small", s._clock()))
                    for i in range(n)
                )))

            results[k] = asyncio.run(post_all())

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results[0] + results[1]) == list(range(1, 2 * n + 1))
        assert router.scorer.learned_counts("small", "Poem") == (2 * n, 0, 0)
