"""Stores are values and routers swap them atomically (ARCHITECTURE principle 4): an update
returns a new scorer and leaves the old one as it was, and a router's writers never lose an
update while its readers keep routing without waiting."""

from __future__ import annotations

import threading

import pytest

from tagrouter_fast import TagRouter
from tagrouter_fast.core import TagDecider, TagScorer, UnknownModelError

BASE = [
    ("q0", ["Poem"], "big", "win"),
    ("q0", ["Poem"], "small", "loss"),
    ("q1", ["Math"], "big", "loss"),
    ("q1", ["Math"], "small", "win"),
]
COSTS = {"big": 10.0, "small": 1.0}


def router() -> TagRouter:
    return TagRouter(TagDecider(TagScorer.from_records(BASE), COSTS), align=False)


def test_updates_return_new_scorers_and_leave_the_old_one_unchanged():
    a = TagScorer.from_records(BASE)
    before = a.to_bytes()
    b = a.with_records([("q2", ["Poem"], "small", "win")])
    c = b.with_model([("q2", ["Poem"], "new", "tie")])
    d = c.without_model("big")
    e = a.merged(TagScorer.from_records([("q9", ["Code"], "big", "win")]))
    assert (a.n_queries, a.n_records, a.tag_count("Poem")) == (2, 4, 1)
    assert a.to_bytes() == before
    assert (b.n_queries, b.n_records, b.tag_count("Poem")) == (3, 5, 2)
    assert c.models == ["big", "small", "new"] and b.models == ["big", "small"]
    assert d.models == ["small", "new"] and "big" in c.models
    assert "Code" in e and "Code" not in a
    with pytest.raises(AttributeError, match="immutable"):
        a._core = b._core  # type: ignore[misc]
    for gone in ("add_records", "add_model", "remove_model", "merge"):
        assert not hasattr(a, gone)


def test_decider_with_store_keeps_its_configuration():
    d = TagDecider(TagScorer.from_records(BASE), COSTS, theta=0.25, aggregation="mean")
    more = d.scorer.with_records([("q2", ["Poem"], "third", "win")])
    d2 = d.with_store(more)
    assert (d2.costs, d2.llm, d2.theta, d2.fallback, d2.aggregation) == (
        d.costs,
        d.llm,
        d.theta,
        d.fallback,
        d.aggregation,
    )
    # A model new to the store is a candidate only once it has a cost.
    assert d2.models == ["big", "small"]
    d3 = d.with_store(more, costs={"third": 0.5})
    assert d3.models == ["big", "small", "third"] and d3.llm == "big"
    assert d.scorer.n_queries == 2 and d2.scorer.n_queries == 3
    with pytest.raises(UnknownModelError):
        d.with_store(more.without_model("small"))


def test_router_scorer_reflects_swaps():
    r = router()
    old = r.scorer
    assert r.route_tags(["Math"]) == "small"
    flipped = old.with_records(
        [(f"m{i}", ["Math"], "big", "win") for i in range(5)]
        + [(f"m{i}", ["Math"], "small", "loss") for i in range(5)]
    )
    r.swap_store(flipped)
    assert r.scorer.to_bytes() == flipped.to_bytes()
    assert r.scorer.n_queries == 7 and old.n_queries == 2
    assert r.route_tags(["Math"]) == "big"
    new = r.add_records([("z", ["Code"], "small", "win")])
    assert r.scorer.to_bytes() == new.to_bytes() and "Code" in r.scorer
    # The router's store is the only way to change what it routes with: a scorer handed out
    # earlier stays what it was.
    assert "Code" not in flipped
    with pytest.raises(TypeError):
        r.swap_store(BASE)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must return a TagScorer"):
        r.update_store(lambda s: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError):
        r.add_records([("bad", ["Code"], "small", "meh")])
    assert r.scorer.to_bytes() == new.to_bytes()  # a failed update changes nothing


def test_concurrent_writers_lose_nothing_and_readers_never_fail():
    r = router()
    writers, readers, per_writer, reads = 8, 8, 100, 400
    barrier = threading.Barrier(writers + readers)
    errors: list[BaseException] = []
    routed: list[int] = []

    def write(w: int) -> None:
        try:
            barrier.wait()
            for i in range(per_writer):
                tag = "Poem" if i % 2 else "Math"
                r.add_records([(f"w{w}-{i}", [tag, f"t{w}"], "small", "win")])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def read() -> None:
        try:
            barrier.wait()
            n = 0
            for i in range(reads):
                tags = ["Poem", "Math", f"t{i % writers}"]
                assert r.route_tags(tags) in COSTS
                assert r.decide_tags(tags).model in COSTS
                assert len(r.route_tags_batch([tags, ["Poem"]])) == 2
                n += 1
            routed.append(n)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    threads += [threading.Thread(target=read) for _ in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert routed == [reads] * readers
    s = r.scorer
    assert s.n_queries == 2 + writers * per_writer
    assert s.n_records == len(BASE) + writers * per_writer
    assert all(s.tag_count(f"t{w}") == per_writer for w in range(writers))
