"""The "difficulty" weighting: shrinkage towards a tag-specific prior (model ability plus tag
difficulty on the logit scale, from every model of the store). The Rust core agrees with the
pure-Python reference to the last bit; the store round-trips; bad parameters are refused."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routing_tables import write_table

from tagrouter_fast import _reference as ref
from tagrouter_fast.core import WEIGHTINGS, StoreFormatError, TagDecider, TagScorer

MODELS = ["alpha", "beta", "gamma", "delta", "eps"]
TAGS = ["Poem", "Math", "Code", "Text Rewriting", "Humor", "Ünïcode tag", "x", "Q&A"]
OUTCOMES = ["win", "tie", "loss"]

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def record_sets(draw, min_queries: int = 1, max_queries: int = 12):
    """Records for random queries, each judged by a random non-empty subset of the models; a
    skewed outcome mix makes some tags hard and some easy, and pushes rates into the clip."""
    n_q = draw(st.integers(min_queries, max_queries))
    pool = MODELS[: draw(st.integers(1, len(MODELS)))]
    records = []
    for q in range(n_q):
        tags = draw(st.lists(st.sampled_from(TAGS), max_size=4))
        judged = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool), unique=True))
        for m in judged:
            records.append((f"q{q}", tags, m, draw(st.sampled_from(OUTCOMES))))
    if draw(st.booleans()):
        records.append(draw(st.sampled_from(records)))
    return draw(st.permutations(records))


params = st.fixed_dictionaries(
    {
        "s_win": st.sampled_from([1.0, 0.7, 2.5]),
        # Ties outside [s_loss, s_win] map to rates outside [0, 1]: the clip must hold them.
        "s_tie": st.sampled_from([0.15, 0.0, 1.0, 0.3333, -2.0, 3.0]),
        "s_loss": st.sampled_from([-1.0, -0.5, 0.0]),
        "weighting": st.just("difficulty"),
        "prior_strength": st.sampled_from([0.0, 0.5, 3.0, 30.0]),
    }
)


def score_table(s: TagScorer) -> dict[tuple[str, str], float]:
    return {(m, t): s.score(m, t) for m in s.models for t in s.tags}


# ==== Against the reference ====


@PROFILE
@given(records=record_sets(), p=params)
def test_scores_equal_reference_exactly(records, p):
    scorer = TagScorer.from_records(records, **p)
    r = ref.ReferenceScorer(records, **p)
    assert scorer.weighting == "difficulty"
    assert (scorer.models, scorer.tags) == (r.models, r.tags)
    for t in r.tags:
        for m in r.models:
            assert scorer.score(m, t) == r.score(m, t), (m, t)
    want = np.array([[r.score(m, t) for m in r.models] for t in r.tags])
    np.testing.assert_array_equal(scorer.score_matrix(), want.reshape(len(r.tags), len(r.models)))
    # A convex mix of in-range means and an in-range prior stays in range.
    s_r = (p["s_win"], p["s_tie"], p["s_loss"])
    lo, hi = min(s_r), max(s_r)
    assert np.all(scorer.score_matrix() >= lo - 1e-12)
    assert np.all(scorer.score_matrix() <= hi + 1e-12)


@PROFILE
@given(records=record_sets(), p=params)
def test_reweighted_equals_fresh_build(records, p):
    s = TagScorer.from_records(records, weighting="shrunk").reweighted(**p)
    fresh = TagScorer.from_records(records, **p)
    assert s.to_bytes() == fresh.to_bytes()
    np.testing.assert_array_equal(s.score_matrix(), fresh.score_matrix())


@PROFILE
@given(records=record_sets(min_queries=2), p=params, pick=st.integers(0, 4))
def test_without_model_equals_rebuild(records, p, pick):
    # The prior depends on every model, so removing one changes the others' scores: exactly as
    # if the store had been built without it.
    s = TagScorer.from_records(records, **p)
    if len(s.models) < 2:
        return
    gone = s.models[pick % len(s.models)]
    rebuilt = TagScorer.from_records([r for r in records if r[2] != gone], **p)
    assert score_table(s.without_model(gone)) == score_table(rebuilt)


@PROFILE
@given(a=record_sets(), b=record_sets(), p=params)
def test_with_records_equals_rebuild(a, b, p):
    b = [(f"b{q}", t, m, o) for q, t, m, o in b]
    s = TagScorer.from_records(a, **p).with_records(b)
    rebuilt = TagScorer.from_records(a + b, **p)
    assert s.to_bytes() == rebuilt.to_bytes()
    np.testing.assert_array_equal(s.score_matrix(), rebuilt.score_matrix())


# ==== Behaviour ====

# "hard" is lost by every model judged on it, "easy" won; "newcomer" is judged on "mid" only.
HARD_EASY = [
    *((f"h{i}", ["hard"], m, "loss") for i in range(4) for m in ("a", "b", "c")),
    *((f"e{i}", ["easy"], m, "win") for i in range(4) for m in ("a", "b", "c")),
    *((f"m{i}", ["mid"], m, o) for i, o in enumerate(("win", "loss")) for m in ("a", "newcomer")),
]


def test_no_evidence_on_a_hard_tag_scores_lower_than_on_an_easy_one():
    d = TagScorer.from_records(HARD_EASY, weighting="difficulty", prior_strength=5.0)
    assert d.counts("newcomer", "hard") == d.counts("newcomer", "easy") == (0, 0, 0)
    assert d.score("newcomer", "hard") < d.score("newcomer", "mid") < d.score("newcomer", "easy")
    # Shrunk can only fall back to the newcomer's global mean on both.
    s = d.reweighted(weighting="shrunk")
    assert s.score("newcomer", "hard") == s.score("newcomer", "easy") == 0.0
    # The decider routes on the same scores.
    costs = {"a": 10.0, "newcomer": 1.0}
    assert TagDecider(d, costs).decide(["hard"]).scores["newcomer"] == d.score("newcomer", "hard")


def test_reference_models_set_the_difficulty():
    # A candidate's prior comes from every model of the store, not only the candidates: the
    # reference models "b" and "c" are what make "hard" hard for the newcomer.
    d = TagScorer.from_records(HARD_EASY, weighting="difficulty", prior_strength=5.0)
    without = d.without_model("b").without_model("c")
    assert without.score("newcomer", "hard") > d.score("newcomer", "hard")
    r = ref.ReferenceScorer(HARD_EASY, weighting="difficulty", prior_strength=5.0)
    assert d.score("newcomer", "hard") == r.score("newcomer", "hard")


def test_zero_prior_strength_is_the_plain_mean_where_there_is_evidence():
    d = TagScorer.from_records(HARD_EASY, weighting="difficulty", prior_strength=0.0)
    assert d.score("a", "hard") == -1.0 and d.score("a", "easy") == 1.0
    # With no evidence and no pseudo-count the prior alone is left, and it still knows the tag.
    assert d.score("newcomer", "hard") < d.score("newcomer", "easy")


# ==== Store file and updates ====


def test_round_trip_through_bytes_and_file(tmp_path):
    s = TagScorer.from_records(HARD_EASY, s_tie=0.2, weighting="difficulty", prior_strength=2.5)
    data = s.to_bytes()
    assert data[24 + 32] == 3  # the weighting code (docs/store-format.md)
    path = tmp_path / "store.trs"
    s.save(path)
    for back in (TagScorer.from_bytes(data), TagScorer.load(path)):
        assert back.to_bytes() == data == path.read_bytes()
        assert (back.weighting, back.prior_strength, back.s_tie) == ("difficulty", 2.5, 0.2)
        np.testing.assert_array_equal(back.score_matrix(), s.score_matrix())
    # A file written before "difficulty" existed (code 2) still loads as "shrunk".
    shrunk = s.reweighted(weighting="shrunk").to_bytes()
    assert shrunk[24 + 32] == 2 and TagScorer.from_bytes(shrunk).weighting == "shrunk"


def test_reweighted_to_and_from_difficulty():
    plain = TagScorer.from_records(HARD_EASY)
    d = plain.reweighted(weighting="difficulty", prior_strength=4.0)
    assert (d.weighting, d.prior_strength) == ("difficulty", 4.0)
    assert plain.weighting == "paper"  # the original is untouched
    assert score_table(d) == score_table(
        TagScorer.from_records(HARD_EASY, weighting="difficulty", prior_strength=4.0)
    )
    assert (
        d.reweighted(weighting="paper").to_bytes()
        == plain.reweighted(prior_strength=4.0).to_bytes()
    )


def test_from_table_accepts_difficulty(tmp_path):
    write_table(
        tmp_path, [("q1", "Write a poem"), ("q2", "Add 2+2")],
        [("q1", "a", "win"), ("q1", "b", "loss"), ("q2", "a", "loss"), ("q2", "b", "loss")],
    )
    tags = {"q1": ["Poem"], "q2": ["Math"]}
    s = TagScorer.from_table(tmp_path, tags, weighting="difficulty", prior_strength=1.0)
    assert s.weighting == "difficulty"
    records = [
        ("q1", ["Poem"], "a", "win"),
        ("q1", ["Poem"], "b", "loss"),
        ("q2", ["Math"], "a", "loss"),
        ("q2", ["Math"], "b", "loss"),
    ]
    r = ref.ReferenceScorer(records, weighting="difficulty", prior_strength=1.0)
    assert score_table(s) == {(m, t): r.score(m, t) for m in r.models for t in r.tags}


def test_listed_among_the_weightings():
    assert "difficulty" in WEIGHTINGS


# ==== Errors ====


@pytest.mark.parametrize("s_win, s_loss", [(1.0, 1.0), (-1.0, 1.0), (0.0, 0.5)])
def test_s_win_not_above_s_loss_is_a_value_error(s_win, s_loss):
    match = r"weighting 'difficulty' needs s_win > s_loss"
    with pytest.raises(ValueError, match=match):
        TagScorer.from_records(HARD_EASY, s_win=s_win, s_loss=s_loss, weighting="difficulty")
    ok = TagScorer.from_records(HARD_EASY, s_win=s_win, s_loss=s_loss, weighting="shrunk")
    with pytest.raises(ValueError, match=match):
        ok.reweighted(weighting="difficulty")
    d = TagScorer.from_records(HARD_EASY, weighting="difficulty")
    with pytest.raises(ValueError, match=match):
        d.reweighted(s_win=s_win, s_loss=s_loss)
    with pytest.raises(ValueError, match="needs s_win > s_loss"):
        ref.ReferenceScorer(HARD_EASY, s_win=s_win, s_loss=s_loss, weighting="difficulty")


def test_unknown_weighting_lists_difficulty():
    with pytest.raises(ValueError, match="'shrunk' or 'difficulty'"):
        TagScorer.from_records(HARD_EASY, weighting="rasch")


def test_crafted_file_with_difficulty_and_bad_scores_is_corrupt():
    data = bytearray(TagScorer.from_records(HARD_EASY, weighting="difficulty").to_bytes())
    struct.pack_into("<d", data, 24, -1.0)  # s_win = s_loss
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    with pytest.raises(StoreFormatError, match="corrupt: .*needs s_win > s_loss"):
        TagScorer.from_bytes(bytes(data))


# ==== The plus-difficulty recipe: reference models in the store, never routed to ====


class _KindTagger:
    fingerprint = "kind-tagger-difficulty-v1"

    def tag(self, query: str) -> list[str]:
        return [query.split()[-1].capitalize()]

    def tag_batch(self, queries):  # type: ignore[no-untyped-def]
        return [self.tag(q) for q in queries]


def test_plus_difficulty_stores_every_model_but_routes_only_the_pool(tmp_path):
    from tagrouter_fast.builder.bundle import build_router
    from tagrouter_fast.data.table import load_table

    rng = np.random.default_rng(0)
    q: list[tuple[str, str]] = []
    o: list[tuple[str, str, str, float]] = []
    for i in range(120):
        kind = ["poem", "math", "code"][i % 3]
        q.append((f"q{i}", f"write about {kind}"))
        for m, c in (("big", 0.01), ("small", 0.001), ("ref1", 0.002), ("ref2", 0.005)):
            p = {"poem": 0.8, "math": 0.3, "code": 0.5}[kind] + (0.15 if m == "big" else 0)
            o.append((f"q{i}", m, "win" if rng.random() < p else "loss", c))
    write_table(tmp_path, q, o)
    table = load_table(tmp_path)
    tagger = _KindTagger()
    r = build_router(table, ["big", "small"], variant="plus-difficulty", tagger=tagger, align=False)
    assert r.scorer.weighting == "difficulty"
    assert sorted(r.scorer.models) == ["big", "ref1", "ref2", "small"]
    assert r.decider.models == ["big", "small"] and r.build_info["reference_models"] == 2
    routed = set(r.route_batch([f"write about {k}" for k in ("poem", "math", "code")]))
    assert routed <= {"big", "small"}
    # Without references the store holds the pool only.
    plain = build_router(table, ["big", "small"], variant="plus", tagger=tagger, align=False)
    assert sorted(plain.scorer.models) == ["big", "small"]
    assert "reference_models" not in plain.build_info
