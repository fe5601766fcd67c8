"""Bundles under concurrent saves and hand-edited router.json: all-or-nothing, never outside."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from routing_tables import write_table

from tagrouter_fast import TagDecider, TagRouter, TagScorer
from tagrouter_fast.router import META_FILE, BundleError


def _router(n_queries: int, theta: float = 0.0) -> TagRouter:
    recs = []
    for i in range(n_queries):
        tag = f"Tag {i % 7}"
        recs += [(f"q{i}", [tag], "big", "win"), (f"q{i}", [tag], "small", "loss")]
    decider = TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0}, theta=theta)
    return TagRouter(decider, align=False)


def test_loads_during_resaves_never_fail(tmp_path: Path) -> None:
    a, b = _router(10), _router(40)
    a.save(tmp_path)
    errors: list[BaseException] = []
    seen: set[int] = set()
    start = threading.Barrier(2)

    def writer() -> None:
        start.wait()
        for k in range(50):
            (a if k % 2 else b).save(tmp_path)

    def reader() -> None:
        start.wait()
        for _ in range(50):
            try:
                seen.add(TagRouter.load(tmp_path).scorer.n_queries)
            except BaseException as e:  # noqa: BLE001 - every failure is the finding
                errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert seen <= {10, 40} and seen


def test_concurrent_writers_leave_one_whole_bundle(tmp_path: Path) -> None:
    routers = [_router(10, theta=0.0), _router(40, theta=0.5)]
    start = threading.Barrier(2)

    def write(r: TagRouter) -> None:
        start.wait()
        for _ in range(20):
            r.save(tmp_path)

    threads = [threading.Thread(target=write, args=(r,)) for r in routers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    got = TagRouter.load(tmp_path)
    # Store and settings come from the same writer: never one's store with the other's theta.
    assert (got.scorer.n_queries, got.decider.theta) in {(10, 0.0), (40, 0.5)}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name", ["../store.trs", "/etc/passwd", "sub/store.trs", "..", 7])
def test_store_path_outside_the_bundle_is_refused(tmp_path: Path, name: object) -> None:
    _router(5).save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["store"] = name
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="not a file name inside the bundle"):
        TagRouter.load(tmp_path)


def test_save_onto_a_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        _router(5).save(target)


class _Tagger:
    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def tag(self, query: str) -> list[str]:
        return ["Tag 1"]

    def tag_batch(self, queries: list[str]) -> list[list[str]]:
        return [["Tag 1"] for _ in queries]


def test_tagger_fingerprint_is_checked_at_load(tmp_path: Path) -> None:
    r = _router(5)
    r.tagger = _Tagger("tagger-a")
    r.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["tagger"]["fingerprint"] == "tagger-a"
    assert TagRouter.load(tmp_path, tagger=_Tagger("tagger-a")).route("x") == "big"
    with pytest.raises(BundleError, match="built with tagger 'tagger-a'.*'tagger-b'"):
        TagRouter.load(tmp_path, tagger=_Tagger("tagger-b"))
    assert TagRouter.load(tmp_path, tagger=_Tagger("tagger-b"), check_tagger=False).route("x")


def _table(d: Path, winner: str) -> Path:
    d.mkdir()
    # Eight queries: enough for the default variant's out-of-fold tuning (3 inner folds).
    texts = ["write a poem", "solve 2+2", "sum a list", "a haiku", "plan a trip", "fix my code"]
    texts += ["translate this", "name a cat"]
    qs = [f"q{i}" for i in range(1, len(texts) + 1)]
    loser = "small" if winner == "big" else "big"
    cost = {"big": 2, "small": 1}
    outcomes = [(q, m, o, cost[m]) for q in qs for m, o in ((winner, "win"), (loser, "loss"))]
    return write_table(d, list(zip(qs, texts, strict=True)), outcomes)


def test_default_bundle_remembers_its_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tagrouter_fast.builder.bundle import build_bundle, data_source
    from tagrouter_fast.builder.default import default_router
    from tagrouter_fast.router import default_bundle_dir

    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TAGROUTER_ROUTER", raising=False)
    monkeypatch.setattr("tagrouter_fast.builder.default._default_router", None)
    first = _table(tmp_path / "first", "big")
    out = build_bundle(first, models=["big", "small"], show_progress=False)
    assert out == default_bundle_dir()
    assert TagRouter.load(out).source == data_source(first)
    monkeypatch.setenv("TAGROUTER_DATA", str(first))
    assert default_router().source == data_source(first)  # same data: the cache is used
    # Other judgments now: the cached bundle is not used; rebuilding the default pool from a
    # table without its models is an error naming them, not a silent route on old data.
    monkeypatch.setattr("tagrouter_fast.builder.default._default_router", None)
    monkeypatch.setenv("TAGROUTER_DATA", str(_table(tmp_path / "second", "small")))
    with pytest.raises(KeyError, match="claude-2"):
        default_router()


def test_tagrouter_data_that_is_not_a_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from tagrouter_fast.builder.bundle import data_dir_from_env

    monkeypatch.setenv("TAGROUTER_DATA", "/nonexistent")
    with pytest.raises(BundleError, match="TAGROUTER_DATA=/nonexistent: not a routing table"):
        data_dir_from_env()


def test_default_router_with_missing_data_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tagrouter_fast.builder.default import default_router
    from tagrouter_fast.router import default_bundle_dir

    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TAGROUTER_ROUTER", raising=False)
    monkeypatch.setattr("tagrouter_fast.builder.default._default_router", None)
    _router(5).save(default_bundle_dir())  # a cached default exists ...
    monkeypatch.setenv("TAGROUTER_DATA", "/nonexistent")  # ... but the data it names does not
    with pytest.raises(BundleError, match="TAGROUTER_DATA=/nonexistent"):
        default_router()


def test_files_of_earlier_saves_are_pruned_only_when_old(tmp_path: Path) -> None:
    import os
    import time

    _router(10).save(tmp_path)
    (old,) = tmp_path.glob("store-*.trs")
    _router(40).save(tmp_path)
    assert old.exists()  # a reader that opened the old router.json may still read it
    past = time.time() - 3600
    os.utime(old, (past, past))
    _router(40).save(tmp_path)
    assert not old.exists()
    (kept,) = tmp_path.glob("store-*.trs")
    assert json.loads((tmp_path / META_FILE).read_text())["store"] == kept.name
    assert TagRouter.load(tmp_path).scorer.n_queries == 40
