"""Property tests: the Rust core agrees with the pure-Python reference (`_reference.py`) to the
last bit on random stores, tag lists, thetas, weightings and aggregations; updates equal
rebuilding from scratch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tagrouter_fast import _reference as ref
from tagrouter_fast.core import TagDecider, TagScorer

MODELS = ["alpha", "beta", "gamma", "delta", "eps"]
# Few tags per store, so that queries share tags, scores tie and counts grow past 1.
TAGS = ["Poem", "Math", "Code", "Text Rewriting", "Humor", "Ünïcode tag", "x", "Q&A"]
OUTCOMES = ["win", "tie", "loss"]

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def record_sets(draw, min_queries: int = 1, max_queries: int = 12, models=MODELS):
    """Records for random queries: each has a tag set (possibly empty) and outcomes for a random
    non-empty subset of models; some records repeat."""
    n_q = draw(st.integers(min_queries, max_queries))
    n_models = draw(st.integers(1, len(models)))
    pool = models[:n_models]
    records = []
    for q in range(n_q):
        tags = draw(st.lists(st.sampled_from(TAGS), max_size=4))
        judged = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=n_models, unique=True))
        for m in judged:
            records.append((f"q{q}", tags, m, draw(st.sampled_from(OUTCOMES))))
    if records and draw(st.booleans()):
        records.append(draw(st.sampled_from(records)))
    return draw(st.permutations(records))


params = st.fixed_dictionaries(
    {
        "s_win": st.sampled_from([1.0, 0.7, 2.5]),
        "s_tie": st.sampled_from([0.15, 0.0, 1.0, 0.3333]),
        "s_loss": st.sampled_from([-1.0, -0.5, 0.0]),
        "weighting": st.sampled_from(["paper", "none", "shrunk"]),
        "prior_strength": st.sampled_from([0.0, 0.5, 3.0]),
    }
)
query_tags = st.lists(st.sampled_from([*TAGS, "unknown-1", "unknown-2"]), max_size=6)
# Costs from a small set, so that ties in cost (and so the tie-break by name) happen.
cost_values = st.sampled_from([0.0, 1.0, 2.0, 10.0])
thetas = st.one_of(st.just(0.0), st.floats(-2.0, 2.0, allow_nan=False))
aggregations = st.sampled_from(["sum", "mean"])


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def build_pair(records, p, costs, llm_pick, theta, fallback_pick, aggregation="sum"):
    scorer = TagScorer.from_records(records, **p)
    models = scorer.models
    cost = {m: costs[i % len(costs)] for i, m in enumerate(models)}
    llm = None if llm_pick is None else models[llm_pick % len(models)]
    fallback = None if fallback_pick is None else models[fallback_pick % len(models)]
    kw = {"llm": llm, "theta": theta, "fallback": fallback, "aggregation": aggregation}
    decider = TagDecider(scorer, cost, **kw)
    r_scorer = ref.ReferenceScorer(records, **p)
    r_decider = ref.ReferenceDecider(r_scorer, cost, **kw)
    return scorer, decider, r_scorer, r_decider


# ==== Scorer ====


@PROFILE
@given(records=record_sets(), p=params)
def test_scores_equal_reference_exactly(records, p):
    scorer = TagScorer.from_records(records, **p)
    r = ref.ReferenceScorer(records, **p)
    assert scorer.models == r.models
    assert scorer.tags == r.tags
    assert scorer.n_queries == len(r.query_tags)
    assert scorer.n_records == len(records)
    for t in r.tags:
        assert scorer.tag_count(t) == r.count(t)
        for m in r.models:
            assert scorer.score(m, t) == r.score(m, t), (m, t)
            c = r.counts.get((t, m), dict.fromkeys(OUTCOMES, 0))
            assert scorer.counts(m, t) == (c["win"], c["tie"], c["loss"])
    matrix = scorer.score_matrix()
    assert matrix.shape == (len(r.tags), len(r.models))
    want = np.array([[r.score(m, t) for m in r.models] for t in r.tags]).reshape(matrix.shape)
    np.testing.assert_array_equal(matrix, want)


def test_paper_weight_denominator_runs_over_all_tags():
    # Two queries: q1 carries a and b, q2 carries b. count_a = 1, count_b = 2, sum = 3.
    records = [("q1", ["a", "b"], "m", "win"), ("q2", ["b"], "m", "loss")]
    s = TagScorer.from_records(records)
    assert s.score("m", "a") == pytest.approx((1 - math.exp(-1)) / 3 * 1.0)
    assert s.score("m", "b") == pytest.approx((1 - math.exp(-2)) / 3 * (1.0 - 1.0))
    # count_t counts distinct queries, not query x model rows.
    s2 = TagScorer.from_records([*records, ("q1", ["a", "b"], "n", "tie")])
    assert s2.tag_count("a") == 1
    assert s2.score("n", "a") == pytest.approx((1 - math.exp(-1)) / 3 * 0.15)


# ==== Decider ====


@PROFILE
@given(
    records=record_sets(),
    p=params,
    costs=st.lists(cost_values, min_size=1, max_size=5),
    llm_pick=st.one_of(st.none(), st.integers(0, 4)),
    fallback_pick=st.one_of(st.none(), st.integers(0, 4)),
    theta=thetas,
    agg=aggregations,
    queries=st.lists(query_tags, min_size=1, max_size=8),
)
def test_decisions_equal_reference(records, p, costs, llm_pick, fallback_pick, theta, agg, queries):
    _, decider, _, r_decider = build_pair(records, p, costs, llm_pick, theta, fallback_pick, agg)
    assert decider.aggregation == agg
    assert decider.models == r_decider.models
    assert decider.llm == r_decider.llm
    assert decider.fallback == r_decider.fallback
    for tags in queries:
        d = decider.decide(tags)
        want = r_decider.decide(tags)
        assert d.model == want["model"], tags
        assert decider.route_tags(tags) == want["model"]
        assert d.reason == want["reason"]
        assert same_float(d.delta, want["delta"])
        assert d.slm == want["slm"]
        assert d.argmax == want["argmax"]
        assert d.llm == want["llm"] and d.theta == want["theta"]
        assert d.scores == want["scores"]
        assert d.known_tags == want["known_tags"]
        assert d.unknown_tags == want["unknown_tags"]
        assert d.contributions == want["contributions"]
    assert decider.route_tags_batch(queries) == [r_decider.route_tags(t) for t in queries]
    assert decider.route_tags_batch(queries) == ref.NumpyDecider(r_decider).route_tags_batch(
        queries
    )
    np.testing.assert_array_equal(decider.scores_batch(queries), r_decider.scores_batch(queries))
    np.testing.assert_array_equal(decider.deltas_batch(queries), r_decider.deltas_batch(queries))
    idx = decider.route_indices_batch(queries)
    assert [decider.models[i] for i in idx] == decider.route_tags_batch(queries)
    # Another theta, the same aggregation.
    moved = decider.with_theta(-theta)
    assert moved.aggregation == agg
    r_moved = ref.ReferenceDecider(
        r_decider.scorer,
        r_decider.costs,
        llm=r_decider.llm,
        theta=-theta,
        fallback=r_decider.fallback,
        aggregation=agg,
    )
    assert moved.route_tags_batch(queries) == r_moved.route_tags_batch(queries)


@PROFILE
@given(
    records=record_sets(),
    costs=st.lists(cost_values, min_size=1, max_size=5),
    raw=st.lists(
        st.tuples(st.sampled_from([*TAGS, "nope"]), st.sampled_from(["", " ", "  "])), max_size=5
    ),
    agg=aggregations,
)
def test_raw_generator_string_equals_split_list(records, costs, raw, agg):
    _, decider, _, r_decider = build_pair(records, {}, costs, None, 0.0, None, agg)
    text = ",".join(pad + t + pad for t, pad in raw) + (", " if raw else "")
    tags = ref.split_tags(text)
    assert decider.route_tag_string(text) == r_decider.route_tags(tags)
    assert decider.decide_tag_string(text).scores == decider.decide(tags).scores
    assert decider.route_tag_strings_batch([text, ""]) == [
        r_decider.route_tags(tags),
        r_decider.fallback,
    ]


# Pieces a generator's output is made of: tags, separators, and whitespace of every kind Python
# knows (str.isspace), including U+001C..U+001F that Rust's char::is_whitespace does not.
_SPLIT_PIECES = st.sampled_from(
    [
        "Poem",
        "Q&A",
        "Ünïcode",
        ",",
        ", ",
        " ",
        "\t",
        "\n",
        "\x1c",
        "\x1f",
        "\x85",
        "\u3000",
        "\u200b",
        "\xa0",
        "\u2028",
        "x y",
    ]
)


@PROFILE
@given(s=st.one_of(st.text(), st.lists(_SPLIT_PIECES, max_size=12).map("".join)))
def test_split_tags_is_pythons_strip_and_split(s):
    from tagrouter_fast.core import split_tags

    assert split_tags(s) == [t.strip() for t in s.split(",") if t.strip()]
    assert split_tags(s) == ref.split_tags(s)


def test_split_tags_is_the_core_function_and_trims_like_python():
    from tagrouter_fast import _core, split_tags

    assert split_tags is _core.split_tags
    assert split_tags("Poem, \x1c") == ["Poem"]
    assert split_tags("\x1dMath\x1e,\x1f") == ["Math"]
    with pytest.raises(TypeError):
        split_tags(["Poem"])  # type: ignore[arg-type]


def test_split_tags_whitespace_is_str_isspace_for_every_code_point():
    import sys

    from tagrouter_fast import split_tags

    differ = [
        hex(i)
        for i in range(sys.maxunicode + 1)
        if not 0xD800 <= i < 0xE000
        and i != ord(",")
        and split_tags(f"{chr(i)}a{chr(i)}") != [f"{chr(i)}a{chr(i)}".strip()]
    ]
    assert differ == []


@PROFILE
@given(
    records=record_sets(),
    p=params,
    costs=st.lists(cost_values, min_size=1, max_size=5),
    llm_pick=st.one_of(st.none(), st.integers(0, 4)),
    theta=thetas,
    batch=st.lists(query_tags, max_size=8),
    agg=aggregations,
)
def test_decide_batch_equals_decide_per_query(records, p, costs, llm_pick, theta, batch, agg):
    _, decider, _, _ = build_pair(records, p, costs, llm_pick, theta, None, agg)
    cols = decider.decide_batch(batch)
    assert len(cols) == len(batch)
    for arr, dtype in [
        (cols.model, np.int64),
        (cols.delta, np.float64),
        (cols.slm, np.int64),
        (cols.top, np.int64),
        (cols.n_known, np.int64),
    ]:
        assert arr.dtype == dtype and arr.shape == (len(batch),)
    index = {m: i for i, m in enumerate(decider.models)}
    for q, tags in enumerate(batch):
        d = decider.decide(tags)
        assert cols.model[q] == index[d.model]
        assert same_float(float(cols.delta[q]), d.delta)
        assert cols.slm[q] == (-1 if d.slm is None else index[d.slm])
        assert cols.top[q] == index[d.argmax]
        assert cols.n_known[q] == len(d.known_tags)
    np.testing.assert_array_equal(cols.delta, decider.deltas_batch(batch))
    np.testing.assert_array_equal(cols.model, decider.route_indices_batch(batch))


def test_ties_break_towards_cheaper_then_by_name():
    records = [("q", ["t"], m, "win") for m in ("c", "b", "a")]
    s = TagScorer.from_records(records)
    assert TagDecider(s, {"a": 1.0, "b": 0.5, "c": 0.5}).route_tags(["t"]) == "b"
    assert TagDecider(s, {"a": 1.0, "b": 1.0, "c": 2.0}).route_tags(["t"]) == "a"
    # An exact tie between M_SLM and M_LLM: Delta = 0 >= theta = 0 sends it to M_SLM (paper 3.4),
    # even when M_LLM comes first in the argmax tie-break.
    equal = TagDecider(s, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert equal.llm == "a"
    assert (equal.decide(["t"]).argmax, equal.route_tags(["t"])) == ("a", "b")
    # M_LLM by default: most expensive, ties to the smaller name.
    assert TagDecider(s, {"a": 3.0, "b": 3.0, "c": 1.0}).llm == "a"


def test_fallback_and_cost_threshold_reasons():
    records = [
        ("q1", ["poem"], "big", "win"),
        ("q1", ["poem"], "small", "loss"),
        ("q2", ["math"], "big", "loss"),
        ("q2", ["math"], "small", "win"),
    ]
    s = TagScorer.from_records(records)
    d = TagDecider(s, {"big": 10.0, "small": 1.0})
    fb = d.decide(["haiku"])
    assert (fb.model, fb.reason, fb.slm, fb.unknown_tags) == ("big", "fallback", None, ["haiku"])
    assert math.isnan(fb.delta)
    assert TagDecider(s, {"big": 10.0, "small": 1.0}, fallback="small").route_tags([]) == "small"
    poem = d.decide(["poem"])
    assert (poem.model, poem.reason) == ("big", "argmax")
    assert poem.delta == pytest.approx(s.score("small", "poem") - s.score("big", "poem"))
    cheap = d.with_theta(poem.delta)  # Delta >= theta: the small model
    assert (cheap.decide(["poem"]).model, cheap.decide(["poem"]).reason) == (
        "small",
        "cost_threshold",
    )
    strict = d.with_theta(1.0)  # Math prefers small, but not by a margin of 1
    assert (strict.decide(["math"]).model, strict.decide(["math"]).reason) == (
        "big",
        "cost_threshold",
    )
    assert "fallback" in fb.explain() and "poem" in poem.explain()
    assert poem.to_dict()["scores"] == poem.scores


def test_mean_averages_over_distinct_known_tags():
    records = [
        ("q1", ["poem"], "big", "win"),
        ("q1", ["poem"], "small", "loss"),
        ("q2", ["math"], "big", "loss"),
        ("q2", ["math"], "small", "win"),
        ("q3", ["code"], "big", "loss"),
        ("q3", ["code"], "small", "win"),
    ]
    s = TagScorer.from_records(records, weighting="none")
    total = TagDecider(s, {"big": 10.0, "small": 1.0})
    mean = TagDecider(s, {"big": 10.0, "small": 1.0}, aggregation="mean")
    assert (total.aggregation, mean.aggregation) == ("sum", "mean")
    tags = ["math", "code", "math", "haiku"]  # a repeat and an unknown tag do not count
    assert total.decide(tags).scores == {"big": -2.0, "small": 2.0}
    d = mean.decide(tags)
    assert d.scores == {"big": -1.0, "small": 1.0}
    assert (d.delta, total.decide(tags).delta) == (2.0, 4.0)
    np.testing.assert_array_equal(mean.scores_batch([tags, []]), [[-1.0, 1.0], [0.0, 0.0]])
    # The argmax is the same; a theta between the two deltas separates them.
    assert total.route_tags(tags) == mean.route_tags(tags) == "small"
    assert total.with_theta(3.0).route_tags(tags) == "small"
    strict = mean.with_theta(3.0)
    assert strict.aggregation == "mean"
    assert (strict.decide(tags).model, strict.decide(tags).reason) == ("big", "cost_threshold")
    assert "mean score over the 2 known tags" in d.explain()
    assert "mean" not in total.decide(tags).explain()
    assert "aggregation='mean'" in repr(mean)


def test_candidates_can_be_a_subset_of_the_store():
    records = [("q", ["t"], m, o) for m, o in (("a", "win"), ("b", "tie"), ("c", "loss"))]
    d = TagDecider(TagScorer.from_records(records), {"b": 1.0, "c": 2.0})
    assert d.models == ["b", "c"]
    assert d.route_tags(["t"]) == "b"
    assert d.scores_batch([["t"]]).shape == (1, 2)


def test_decider_is_a_snapshot_of_the_scorer():
    s = TagScorer.from_records([("q1", ["t"], "a", "win"), ("q1", ["t"], "b", "loss")])
    d = TagDecider(s, {"a": 2.0, "b": 1.0})
    s = s.with_records(
        [(f"n{i}", ["t"], "b", "win") for i in range(5)] + [("n9", ["t"], "a", "loss")]
    )
    assert d.route_tags(["t"]) == "a"
    assert TagDecider(s, {"a": 2.0, "b": 1.0}).route_tags(["t"]) == "b"
    assert d.with_store(s).route_tags(["t"]) == "b"
    assert d.scorer.n_queries == 1


# ==== Updates equal rebuilding ====


def score_table(s: TagScorer) -> dict[tuple[str, str], float]:
    return {(m, t): s.score(m, t) for m in s.models for t in s.tags}


@PROFILE
@given(a=record_sets(), b=record_sets())
def test_with_records_equals_rebuild(a, b):
    # Distinct query ids between the halves unless they share a tag set is not guaranteed:
    # rename b's queries so both halves are consistent.
    b = [(f"b{q}", t, m, o) for q, t, m, o in b]
    s = TagScorer.from_records(a).with_records(b)
    assert s.to_bytes() == TagScorer.from_records(a + b).to_bytes()


@PROFILE
@given(a=record_sets(models=MODELS[:3]), new=st.data())
def test_with_model_equals_rebuild_and_keeps_others(a, new):
    base = TagScorer.from_records(a)
    qtags = {q: t for q, t, _, _ in a}
    qs = new.draw(st.lists(st.sampled_from(sorted(qtags)), min_size=1, unique=True))
    added = [(q, qtags[q], "newcomer", new.draw(st.sampled_from(OUTCOMES))) for q in qs]
    s = TagScorer.from_records(a).with_model(added)
    assert s.to_bytes() == TagScorer.from_records(a + added).to_bytes()
    # Judgments on known queries leave count_t, hence every other model's score, unchanged.
    before = score_table(base)
    after = score_table(s)
    assert {k: v for k, v in after.items() if k[0] != "newcomer"} == before


@PROFILE
@given(records=record_sets(min_queries=2), p=params, pick=st.integers(0, 4))
def test_without_model_equals_rebuild(records, p, pick):
    s = TagScorer.from_records(records, **p)
    if len(s.models) < 2:
        return
    gone = s.models[pick % len(s.models)]
    s = s.without_model(gone)
    rebuilt = TagScorer.from_records([r for r in records if r[2] != gone], **p)
    assert s.models == rebuilt.models
    assert sorted(s.tags) == sorted(rebuilt.tags)
    assert s.n_queries == rebuilt.n_queries
    assert score_table(s) == score_table(rebuilt)


@PROFILE
@given(a=record_sets(), b=record_sets(), shared=st.booleans())
def test_merge_equals_rebuild(a, b, shared):
    if not shared:
        b = [(f"b{q}", t, m, o) for q, t, m, o in b]
    else:
        # Same query ids must carry the same tag sets across stores.
        qtags = {q: t for q, t, _, _ in a}
        b = [(q, qtags.get(q, t), m, o) for q, t, m, o in b]
    s = TagScorer.from_records(a).merged(TagScorer.from_records(b))
    assert s.to_bytes() == TagScorer.from_records(a + b).to_bytes()


@PROFILE
@given(records=record_sets(), p=params)
def test_reweighted_equals_fresh_build(records, p):
    s = TagScorer.from_records(records).reweighted(**p)
    assert s.to_bytes() == TagScorer.from_records(records, **p).to_bytes()


# ==== Theta ====


@PROFILE
@given(
    records=record_sets(min_queries=2),
    costs=st.lists(cost_values, min_size=2, max_size=5),
    queries=st.lists(query_tags, min_size=1, max_size=10),
    agg=aggregations,
    data=st.data(),
)
def test_select_theta_equals_reference(records, costs, queries, agg, data):
    _, decider, _, r_decider = build_pair(records, {}, costs, None, 0.0, None, agg)
    n, m = len(queries), len(decider.models)
    accept = np.array(
        data.draw(st.lists(st.booleans(), min_size=n * m, max_size=n * m)), dtype=bool
    ).reshape(n, m)
    qcost = np.array(
        data.draw(st.lists(cost_values, min_size=n * m, max_size=n * m)), dtype=float
    ).reshape(n, m)
    found = decider.select_theta(queries, accept, qcost)
    for theta, ar, c, share in zip(
        found.thetas, found.accept_rates, found.mean_costs, found.llm_shares, strict=True
    ):
        want = ref.evaluate_theta(r_decider, queries, accept, qcost, float(theta))
        assert ar == pytest.approx(want[0]) and c == pytest.approx(want[1])
        assert share == pytest.approx(want[2])
    best = ref.select_theta(r_decider, queries, accept, qcost, [float(t) for t in found.thetas])
    assert found.accept_rate == pytest.approx(best[1])
    assert found.mean_cost == pytest.approx(best[2])
    # The default grid reaches every outcome of the rule: no theta does better.
    for theta in [-5.0, 0.0, 5.0, *r_decider.deltas_batch(queries)]:
        if not math.isnan(theta):
            assert (
                ref.evaluate_theta(r_decider, queries, accept, qcost, theta)[0] <= found.accept_rate
            )


@PROFILE
@given(
    records=record_sets(min_queries=2),
    costs=st.lists(cost_values, min_size=2, max_size=5),
    queries=st.lists(query_tags, min_size=1, max_size=12),
    share=st.floats(0.0, 1.0),
    agg=aggregations,
)
def test_theta_for_share_is_the_largest_share_within_budget(records, costs, queries, share, agg):
    _, decider, _, r_decider = build_pair(records, {}, costs, None, 0.0, None, agg)
    theta = decider.theta_for_llm_share(queries, share)
    n = len(queries)

    def llm_share(t: float) -> float:
        routed = decider.with_theta(t).route_tags_batch(queries)
        return sum(m == decider.llm for m in routed) / n

    got = llm_share(theta)
    # Every achievable share: one per cut between sorted deltas, plus both ends.
    deltas = sorted(d for d in r_decider.deltas_batch(queries) if not math.isnan(d))
    candidates = {llm_share(-1e9), llm_share(1e9), *(llm_share(d) for d in deltas)}
    feasible = [c for c in candidates if c <= share + 1e-9]
    if feasible:
        assert got == max(feasible)
    else:
        assert got == min(candidates)
