"""Live learning (`TagRouter.learn`, `TagDecider.learn`): counts are the state, scores derived.

The contract: a store that learned N outcomes one at a time routes every query with
bit-identical scores to a store built from the same outcomes at once (each outcome a query of its
own), under every weighting; no query row per outcome; store operations keep their meaning;
readers never see half a change.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagrouter_fast import TagDecider, TagRouter, TagScorer

OUTCOMES = ("win", "tie", "loss")
WEIGHTINGS = [("paper", 0.0), ("none", 0.0), ("shrunk", 3.0), ("difficulty", 2.0)]
TAGS = [f"tag {i}" for i in range(40)]
MODELS = ["big", "mid", "small"]


def base_records(seed: int = 0, n: int = 60) -> list[tuple[str, list[str], str, str]]:
    rng = random.Random(seed)
    recs = []
    for q in range(n):
        qt = rng.sample(TAGS[:30], 3)
        for m in MODELS:
            recs.append((f"q{q}", qt, m, rng.choice(OUTCOMES)))
    return recs


def random_outcomes(n: int, seed: int) -> list[tuple[list[str], str, str]]:
    rng = random.Random(seed)
    # Tags beyond the base's 30 and a model the base lacks: learning adds them.
    return [
        (rng.sample(TAGS, rng.randint(0, 4)), rng.choice([*MODELS, "newcomer"]),
         rng.choice(OUTCOMES))
        for _ in range(n)
    ]


def at_once(base: TagScorer, outcomes: list[tuple[list[str], str, str]]) -> TagScorer:
    """The same outcomes as records of fresh query ids, added in one go (the reference)."""
    return base.with_records(
        [(f"fb:{i}", tags, model, label) for i, (tags, model, label) in enumerate(outcomes)]
    )


def queries(seed: int = 1, n: int = 300) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(TAGS, rng.randint(1, 6)) for _ in range(n)]


COSTS = {"big": 10.0, "mid": 3.0, "small": 1.0}


@pytest.mark.parametrize(("weighting", "prior"), WEIGHTINGS)
def test_one_at_a_time_equals_at_once_to_the_bit(weighting: str, prior: float) -> None:
    base = TagScorer.from_records(base_records(), weighting=weighting, prior_strength=prior)
    outs = random_outcomes(2_000, seed=7)
    live = TagDecider(base, COSTS).to_live()
    for o in outs:
        live.learn([o])
    ref = TagDecider(at_once(base, outs), COSTS)
    qs = queries()
    # Exact equality: same counts, same operations, same bits.
    assert np.array_equal(live.scores_batch(qs), ref.scores_batch(qs))
    assert live.route_tags_batch(qs) == ref.route_tags_batch(qs)
    d_live, d_ref = live.decide(qs[0]), ref.decide(qs[0])
    assert d_live.scores == d_ref.scores and d_live.contributions == d_ref.contributions
    # No query row per outcome; the snapshot is the same store as the reference.
    snap = live.scorer
    assert snap.n_queries == base.n_queries and snap.n_learned == len(outs)
    for t in ref.scorer.tags:
        assert snap.tag_count(t) == ref.scorer.tag_count(t)
        for m in ref.scorer.models:
            assert snap.score(m, t) == ref.scorer.score(m, t)
    # And so is the value path (with_learned).
    once = TagDecider(base.with_learned(outs), COSTS)
    assert np.array_equal(once.scores_batch(qs), ref.scores_batch(qs))


def test_a_hundred_thousand_outcomes_one_at_a_time() -> None:
    for weighting, prior in (WEIGHTINGS[0], WEIGHTINGS[3]):
        base = TagScorer.from_records(base_records(), weighting=weighting, prior_strength=prior)
        outs = random_outcomes(100_000, seed=11)
        router = TagRouter(TagDecider(base, COSTS), align=False)
        for o in outs:
            router.learn([o])
        ref = TagDecider(at_once(base, outs), COSTS)
        qs = queries(seed=3, n=1000)
        assert np.array_equal(router.decider.scores_batch(qs), ref.scores_batch(qs)), weighting
        assert router.scorer.n_queries == base.n_queries
        assert router.decider.live_version == len(outs)


@settings(max_examples=40, deadline=None)
@given(
    w=st.sampled_from(WEIGHTINGS),
    seed=st.integers(0, 10_000),
    n=st.integers(0, 120),
    cuts=st.lists(st.integers(0, 120), max_size=6),
    order_seed=st.integers(0, 10_000),
)
def test_any_order_and_batching_gives_the_same_scores(w, seed, n, cuts, order_seed) -> None:
    weighting, prior = w
    base = TagScorer.from_records(base_records(seed % 5), weighting=weighting,
                                  prior_strength=prior)
    outs = random_outcomes(n, seed)
    shuffled = outs[:]
    random.Random(order_seed).shuffle(shuffled)
    live = TagDecider(base, COSTS).to_live()
    bounds = sorted({0, n, *(c for c in cuts if c <= n)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        live.learn(shuffled[a:b])
    ref = TagDecider(at_once(base, outs), COSTS)
    for q in queries(seed, n=40):
        # Compared by name: learning in another order interns new tags in another order.
        assert live.decide(q).scores == ref.decide(q).scores


def test_store_operations_keep_their_meaning(tmp_path) -> None:
    base = TagScorer.from_records(base_records())
    outs = random_outcomes(500, seed=5)
    router = TagRouter(TagDecider(base, COSTS), align=False)
    router.learn(outs)
    snap = router.scorer
    ref = at_once(base, outs)
    # without_model: the learned queries only that model was judged on leave count_t.
    for m in ("small", "newcomer"):
        a, b = snap.without_model(m), ref.without_model(m)
        assert sorted(a.tags) == sorted(b.tags)
        assert {t: a.tag_count(t) for t in a.tags} == {t: b.tag_count(t) for t in b.tags}
        assert {(x, t): a.score(x, t) for x in a.models for t in a.tags} == {
            (x, t): b.score(x, t) for x in b.models for t in b.tags
        }
    # merged: learned counts add.
    z = TagScorer.from_records([("z", ["tag 1"], "big", "win")])
    m1 = snap.merged(z.with_learned(outs[:10]))
    m2 = ref.merged(z.with_records([(f"other:{i}", t, m, o) for i, (t, m, o)
                                    in enumerate(outs[:10])]))
    assert m1.n_learned == 510
    assert {t: m1.tag_count(t) for t in m1.tags} == {t: m2.tag_count(t) for t in m2.tags}
    assert {(x, t): m1.score(x, t) for x in m1.models for t in m1.tags} == {
        (x, t): m2.score(x, t) for x in m2.models for t in m2.tags
    }
    # Snapshots: a learned store saves and loads as itself.
    path = tmp_path / "s.trs"
    snap.save(path)
    back = TagScorer.load(path)
    assert back.to_bytes() == snap.to_bytes() and back.n_learned == 500
    # reweighted keeps the learned counts.
    rw = snap.reweighted(weighting="shrunk", prior_strength=2.0)
    assert rw.n_learned == 500 and rw.counts("small", "tag 1") == snap.counts("small", "tag 1")


def test_learning_survives_store_swaps_and_theta_changes() -> None:
    base = TagScorer.from_records(base_records())
    router = TagRouter(TagDecider(base, COSTS), align=False)
    router.learn([(["tag 1"], "small", "win")])
    router.update_decider(lambda d: d.with_theta(0.5))
    assert router.decider.is_live and router.decider.theta == 0.5
    router.learn([(["tag 1"], "small", "win")])
    assert router.scorer.learned_counts("small", "tag 1") == (2, 0, 0)
    # A store swap (admin add/remove model) keeps the router learning, on the new store.
    router.update_store(lambda s: s.with_records([("new", ["tag 2"], "big", "win")]))
    assert router.decider.is_live
    router.learn([(["tag 1"], "small", "loss")])
    assert router.scorer.learned_counts("small", "tag 1") == (2, 0, 1)


def test_bad_outcomes_are_refused_and_change_nothing() -> None:
    d = TagDecider(TagScorer.from_records(base_records()), COSTS)
    with pytest.raises(ValueError, match="live decider"):
        d.learn([(["tag 1"], "small", "win")])
    live = d.to_live()
    for bad, msg in [
        ([(["tag 1"], "small", "great")], "unknown outcome 'great'"),
        ([(["tag 1"], "small")], "expected a"),
        ([("tag 1", "small", "win")], "not a str"),
        ([(["tag 1"], 3, "win")], "model must be a str"),
    ]:
        with pytest.raises((ValueError, TypeError), match=msg):
            live.learn(bad)
    # A batch with one bad outcome is refused whole.
    with pytest.raises(ValueError):
        live.learn([(["tag 1"], "small", "win"), (["tag 1"], "small", "nope")])
    assert live.live_version == 0 and live.scorer.n_learned == 0


def test_readers_never_see_half_a_batch() -> None:
    """Batches routed with the GIL released and snapshots taken while a writer learns pairs of
    outcomes (a win on "tag 1" and one on "tag 2", one call): a reader that saw one half of a
    pair would find the two counts apart."""
    base = TagScorer.from_records(base_records())
    d = TagDecider(base, COSTS).to_live()
    qs = queries(seed=9, n=2_000)
    w1, w2 = base.counts("small", "tag 1")[0], base.counts("small", "tag 2")[0]
    stop = threading.Event()
    seen: list[int] = []
    bad: list[tuple[int, int]] = []

    def reader() -> None:
        while not stop.is_set():
            d.scores_batch(qs)  # detached: runs beside the writer
            s = d.scorer
            a, b = s.counts("small", "tag 1")[0] - w1, s.counts("small", "tag 2")[0] - w2
            if a != b:
                bad.append((a, b))
            seen.append(a)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(3_000):
        d.learn([(["tag 1"], "small", "win"), (["tag 2"], "small", "win")])
    stop.set()
    for t in threads:
        t.join()
    assert not bad and seen
    ref = TagDecider(at_once(base, [([t], "small", "win") for _ in range(3_000)
                                    for t in ("tag 1", "tag 2")]), COSTS)
    assert np.array_equal(d.scores_batch(qs), ref.scores_batch(qs))
