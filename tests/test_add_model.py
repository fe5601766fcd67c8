"""Adding a model to a router from its judgments: `TagRouter.add_model`,
`tagrouter_fast.add_model`, ``tagrouter add-model``."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fake_taggers import MATH_TAGS, POEM_TAGS, KeywordTagger
from routing_tables import write_table

from tagrouter_fast import cli
from tagrouter_fast.add_model import (
    AddModelError,
    ModelExistsError,
    add_model,
    judgments_for_model,
    suggest_judgments,
)
from tagrouter_fast.core import TagDecider, TagScorer
from tagrouter_fast.data.table import DataError, load_table
from tagrouter_fast.router import TagRouter

POEMS = [f"Write a short poem about the {w}" for w in ["sea", "moon", "rain", "forest"]]
MATHS = [f"Solve the equation {a}x + {a + 1} = {2 * a}" for a in range(1, 5)]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))


def _router(tagger: KeywordTagger | None = None) -> TagRouter:
    """big wins maths and loses poems, small the reverse; big is M_LLM."""
    recs = []
    for i in range(len(POEMS) + len(MATHS)):
        poem = i < len(POEMS)
        tags = POEM_TAGS if poem else MATH_TAGS
        recs.append((f"q{i}", tags, "big", "loss" if poem else "win"))
        recs.append((f"q{i}", tags, "small", "win" if poem else "loss"))
    decider = TagDecider(TagScorer.from_records(recs), {"big": 10.0, "small": 1.0})
    return TagRouter(decider, tagger or KeywordTagger(), align=False)


def _table(d: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """A routing table from (query_id, text, model, outcome) rows (one queries.csv row per id)."""
    texts = dict((q, t) for q, t, _, _ in rows)
    return write_table(d, list(texts.items()), [(q, m, o) for q, _, m, o in rows])


def _mid_table(d: Path, model: str = "mid") -> Path:
    """mid wins new maths queries and loses new poems (query ids the store does not hold)."""
    rows = [(f"m{i}", t, model, "win") for i, t in enumerate(MATHS)]
    rows += [(f"p{i}", t, model, "loss") for i, t in enumerate(POEMS)]
    return _table(d, rows)


# ==== Adding makes the model routable at once ====


def test_added_model_is_routed_to_at_once(tmp_path: Path) -> None:
    router = _router()
    maths = "Solve the equation 9x + 1 = 3"
    assert router.route(maths) == "big"
    added = router.add_model(_mid_table(tmp_path / "j"), "mid", cost=2.0)
    assert added.model == "mid" and added.judgments == 8 and added.table_model == "mid"
    assert added.new_queries == 8 and added.new_tags == 0 and added.llm == "big"
    assert added.models == ["big", "small", "mid"]
    # mid ties big on the maths tags (both always win) and is cheaper: it is M_SLM with
    # Delta_q = 0 >= theta, so maths goes to mid; poems still go to small.
    assert router.route(maths) == "mid"
    assert router.route("Write a short poem about stars") == "small"
    assert router.decider.costs["mid"] == 2.0
    assert router.scorer.counts("mid", "Algebra") == (4, 0, 0)


def test_costs_are_respected(tmp_path: Path) -> None:
    for cost, argmax in [(5.0, "twin"), (50.0, "big")]:
        router = _router()
        # twin = big's counts exactly: the argmax tie on maths goes to the cheaper of the two.
        router.add_model(None, "twin", cost=cost, like="big")
        assert router.decider.costs["twin"] == cost
        assert router.decide_tags(MATH_TAGS).argmax == argmax
        assert router.decider.llm == "big"  # adding a model never moves M_LLM


def test_judgments_on_store_queries_use_the_stores_tags(tmp_path: Path) -> None:
    # Same query ids as the store, other texts: one tag set per query id, the store's.
    rows = [(f"q{i}", "no keyword here", "mid", "win") for i in range(8)]
    router = _router()
    tagger = router.tagger
    assert isinstance(tagger, KeywordTagger)
    added = router.add_model(_table(tmp_path / "j", rows), "mid", cost=1.0)
    assert added.new_queries == 0 and tagger.tagged == 0  # nothing to tag
    assert router.scorer.counts("mid", "Algebra") == (4, 0, 0)
    assert router.scorer.tag_count("Algebra") == 4  # count_t unchanged


def test_tags_come_from_the_cache_when_readding(tmp_path: Path) -> None:
    router = _router()
    tagger = router.tagger
    assert isinstance(tagger, KeywordTagger)
    table = _mid_table(tmp_path / "j")
    recs = judgments_for_model(router, table, "mid")
    assert tagger.tagged == 8
    assert {tuple(t) for _, t, _, _ in recs} == {tuple(POEM_TAGS), tuple(MATH_TAGS)}
    # The tags equal what routing sees for the same texts.
    texts = load_table(table).texts
    assert [list(t) for _, t, _, _ in recs] == router.tags_batch(texts)
    seen = tagger.tagged
    router.add_model(table, "mid", cost=1.0)
    assert tagger.tagged == seen  # served from the on-disk tag cache


# ==== like= (paper D.3 proxy) ====


def test_like_starts_from_the_other_models_scores(tmp_path: Path) -> None:
    router = _router()
    # Feedback gives small several outcomes on one query: copied exactly, count_t unchanged.
    router.add_records([("q0", POEM_TAGS, "small", "loss"), ("q0", POEM_TAGS, "small", "tie")])
    n_queries = router.scorer.n_queries
    router.add_model(None, "clone", cost=1.0, like="small")
    s = router.scorer
    assert s.n_queries == n_queries and s.model_totals("clone") == s.model_totals("small")
    for tag in s.tags:
        assert s.counts("clone", tag) == s.counts("small", tag)
        assert s.score("clone", tag) == s.score("small", tag)
    for tags in (POEM_TAGS, MATH_TAGS, POEM_TAGS + MATH_TAGS):
        scores = router.decide_tags(tags).scores
        assert scores["clone"] == scores["small"]
    # Own judgments go on top of the copied counts.
    router2 = _router()
    added = router2.add_model(_mid_table(tmp_path / "j"), "clone", cost=1.0, like="small")
    assert added.copied == 8 and added.judgments == 8
    assert router2.scorer.counts("clone", "Algebra") == (4, 0, 4)  # 4 copied losses + 4 wins


def test_like_with_a_table_holding_no_rows_of_the_model_is_a_cold_start(tmp_path: Path) -> None:
    table = _table(tmp_path / "j", [("m0", MATHS[0], "other", "win")])
    router = _router()
    added = router.add_model(table, "clone", cost=1.0, like="small", table_model="other")
    assert added.judgments == 1
    with pytest.raises(AddModelError, match="no outcome rows for model 'ghost'"):
        _router().add_model(table, "clone", cost=1.0, like="small", table_model="ghost")


# ==== Errors ====


def test_several_models_in_the_table_need_a_choice(tmp_path: Path) -> None:
    rows = [("m0", MATHS[0], "a", "win"), ("m0", MATHS[0], "b", "loss")]
    table = _table(tmp_path / "j", rows)
    router = _router()
    with pytest.raises(AddModelError, match=r"outcomes\.csv: the model column holds 2 models"):
        router.add_model(table, "new", cost=1.0)
    assert router.add_model(table, "new", cost=1.0, table_model="b").judgments == 1
    assert router.scorer.counts("new", "Algebra") == (0, 0, 1)
    # The model's own name in the column chooses it.
    assert _router().add_model(table, "a", cost=1.0).table_model == "a"


def test_model_already_present_is_refused(tmp_path: Path) -> None:
    table = _mid_table(tmp_path / "j", model="small")
    router = _router()
    for name in ("small", "big"):
        with pytest.raises(ModelExistsError, match=f"{name!r} is already in"):
            router.add_model(table, name, cost=1.0, table_model="small")
    # In the store but not a candidate counts too.
    store = router.scorer.with_records([("x", ["Algebra"], "shadow", "win")])
    router.swap_store(store)
    with pytest.raises(ModelExistsError):
        router.add_model(table, "shadow", cost=1.0, table_model="small")
    assert "shadow" not in router.decider.models


def test_duplicate_rows_and_unknown_queries_name_file_and_line(tmp_path: Path) -> None:
    dup = _table(tmp_path / "dup", [("m0", MATHS[0], "mid", "win")])
    with (dup / "outcomes.csv").open("a") as f:
        f.write("m0,mid,loss\n")
    router = _router()
    with pytest.raises(DataError, match=r"outcomes\.csv:3: duplicate row .*first at line 2"):
        router.add_model(dup, "mid", cost=1.0)
    unknown = _table(tmp_path / "unk", [("m0", MATHS[0], "mid", "win")])
    with (unknown / "outcomes.csv").open("a") as f:
        f.write("nope,mid,win\n")
    with pytest.raises(DataError, match=r"outcomes\.csv:3: outcome for unknown query_id 'nope'"):
        router.add_model(unknown, "mid", cost=1.0)
    assert router.scorer.models == ["big", "small"]  # unchanged


@pytest.mark.parametrize("cost", [-1.0, math.nan, math.inf, True, "1"])
def test_bad_costs_are_refused(tmp_path: Path, cost: object) -> None:
    router = _router()
    with pytest.raises(AddModelError, match="cost of 'mid' must be a finite number >= 0"):
        router.add_model(_mid_table(tmp_path / "j"), "mid", cost=cost)  # type: ignore[arg-type]
    assert router.scorer.models == ["big", "small"]


def test_other_errors(tmp_path: Path) -> None:
    router = _router()
    with pytest.raises(AddModelError, match="give a judgments table or like="):
        router.add_model(None, "mid", cost=1.0)
    with pytest.raises(AddModelError, match="like='ghost' is not in"):
        router.add_model(None, "mid", cost=1.0, like="ghost")
    notagger = TagRouter(router.decider, None, align=False)
    with pytest.raises(AddModelError, match="no tagger"):
        notagger.add_model(_mid_table(tmp_path / "j"), "mid", cost=1.0)
    assert issubclass(AddModelError, ValueError) and issubclass(ModelExistsError, AddModelError)
    assert router.scorer.models == ["big", "small"]


# ==== Concurrency ====


def test_concurrent_routing_and_feedback_during_add(tmp_path: Path) -> None:
    router = _router()
    tables = [_mid_table(tmp_path / f"j{k}", model=f"m{k}") for k in range(6)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def route() -> None:
        try:
            while not stop.is_set():
                router.route_batch(POEMS + MATHS)
                router.route_tags(MATH_TAGS)
        except BaseException as e:  # noqa: BLE001 - any error fails the test below
            errors.append(e)

    def feedback() -> None:
        try:
            for i in range(200):
                router.add_records([(f"f{i}", MATH_TAGS, "big", "win")])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    readers = [threading.Thread(target=route) for _ in range(3)]
    writer = threading.Thread(target=feedback)
    for t in [*readers, writer]:
        t.start()
    for k, table in enumerate(tables):
        router.add_model(table, f"m{k}", cost=1.0 + k)
    writer.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    assert router.decider.models == ["big", "small", *[f"m{k}" for k in range(6)]]
    assert router.scorer.model_totals("big")[0] == 4 + 200  # no feedback update was lost


# ==== CLI ====


def test_cli_round_trip_through_a_saved_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    keyword_tagger: KeywordTagger,
) -> None:
    import tagrouter_fast.router as router_mod

    tagger = keyword_tagger
    monkeypatch.setattr(router_mod, "_tagger_from_spec", lambda spec: tagger)
    bundle = _router(tagger).save(tmp_path / "bundle")
    table = _mid_table(tmp_path / "j")
    out = tmp_path / "out"
    argv = [
        "add-model",
        "--router",
        str(bundle),
        "--judgments",
        str(table),
        "--model",
        "mid",
        "--cost",
        "2",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert "added 'mid' at cost 2: 8 judgments" in said and str(out) in said
    assert "mid" not in TagRouter.load(bundle).decider.models  # --out: the original is kept
    loaded = TagRouter.load(out)
    assert loaded.decider.costs["mid"] == 2.0
    assert loaded.route("Solve the equation 9x + 1 = 3") == "mid"
    # In place, with --like and no judgments.
    assert (
        cli.main(
            [
                "add-model",
                "--router",
                str(out),
                "--model",
                "clone",
                "--cost",
                "1",
                "--like",
                "small",
            ]
        )
        == 0
    )
    assert "8 records copied from 'small'" in capsys.readouterr().out
    assert "clone" in TagRouter.load(out).decider.models
    # Errors: one line, exit 2.
    for bad in (
        ["--judgments", str(table), "--model", "mid", "--cost", "1"],
        ["--judgments", str(table), "--model", "x", "--cost", "-1"],
        ["--model", "y", "--cost", "1"],
    ):
        assert cli.main(["add-model", "--router", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tagrouter: error: ") and err.count("\n") == 1, err


def test_add_model_function_takes_a_directory_and_an_update_hook(tmp_path: Path) -> None:
    router = _router()
    calls: list[int] = []

    def hook(fn):  # type: ignore[no-untyped-def]
        calls.append(1)
        return router.update_store(fn)

    add_model(router, str(_mid_table(tmp_path / "j")), "mid", cost=1.0, update_store=hook)
    assert calls == [1] and "mid" in router.decider.models


def test_runtime_does_not_import_build_code() -> None:
    code = (
        "import sys, tagrouter_fast.router\n"
        "assert 'tagrouter_fast.add_model' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ==== like= several models, as_llm (the difficulty-aware and pool-prior starts) ====


def test_like_several_models_takes_each_query_from_one_of_them() -> None:
    router = _router()
    n_queries = router.scorer.n_queries
    added = router.add_model(None, "avg", cost=1.0, like=["big", "small"])
    s = router.scorer
    # Each store query lends the outcomes of one model in turn: the new model's counts are the
    # pool's average on one model's count scale, and count_t is unchanged.
    assert added.copied == 8 and added.like == "big,small"
    assert s.n_queries == n_queries and s.model_totals("avg") == (4, 0, 4)
    assert s.counts("avg", "Algebra") == (2, 0, 2) and s.counts("avg", "Poetry Writing") == (
        2,
        0,
        2,
    )
    with pytest.raises(AddModelError, match="not in the router's store"):
        router.add_model(None, "x", cost=1.0, like=["big", "ghost"])
    with pytest.raises(AddModelError, match="not in the router's store"):
        router.add_model(None, "x", cost=1.0, like=[])


def test_as_llm_makes_the_new_model_m_llm(tmp_path: Path) -> None:
    router = _router()
    before = router.decider
    added = router.add_model(_mid_table(tmp_path / "j"), "giant", cost=100.0, as_llm=True)
    assert added.llm == "giant" and router.decider.llm == "giant"
    assert router.decider.costs == {**before.costs, "giant": 100.0}
    assert router.decider.theta == before.theta
    # Cheaper than the current M_LLM: refused, nothing changed.
    other = _router()
    with pytest.raises(AddModelError, match="cheaper than the current M_LLM 'big'"):
        other.add_model(_mid_table(tmp_path / "k"), "giant", cost=5.0, as_llm=True)
    assert other.scorer.models == ["big", "small"] and other.decider.llm == "big"


# ==== suggest_judgments: which queries to judge first ====


def _kinds(ids: list[str]) -> list[str]:
    return ["poem" if int(q[1:]) < len(POEMS) else "maths" for q in ids]


@pytest.mark.parametrize("strategy", ["stratified", "uncertainty"])
def test_suggestions_spread_over_the_tags(strategy: str) -> None:
    router = _router()
    picks = suggest_judgments(router, 4, strategy=strategy, seed=1)
    assert len(picks) == len(set(picks)) == 4
    assert set(picks) <= {f"q{i}" for i in range(8)}
    # Two tag groups of equal size: half the picks from each, never all from one.
    assert sorted(_kinds(picks)) == ["maths", "maths", "poem", "poem"]
    assert suggest_judgments(router, 4, strategy=strategy, seed=1) == picks  # seeded
    two = suggest_judgments(router, 2, strategy=strategy, seed=3)
    assert sorted(_kinds(two)) == ["maths", "poem"]
    assert suggest_judgments(router, 100, strategy=strategy) != []  # capped at the candidates
    assert len(suggest_judgments(router, 100, strategy=strategy)) == 8
    assert suggest_judgments(router, 0, strategy=strategy) == []


def test_suggestions_from_a_table_of_new_queries(tmp_path: Path) -> None:
    router = _router()
    table = _mid_table(tmp_path / "j")
    picks = suggest_judgments(router, 2, table=table)
    ids = load_table(table).query_ids
    assert set(picks) <= set(ids) and len(picks) == 2
    assert sorted(_kinds_of_table(picks)) == ["maths", "poem"]
    sub = suggest_judgments(router, 3, query_ids=["q0", "q1", "q5"], strategy="uncertainty")
    assert sorted(sub) == ["q0", "q1", "q5"]


def _kinds_of_table(ids: list[str]) -> list[str]:
    return ["maths" if q.startswith("m") else "poem" for q in ids]


def test_suggestion_errors(tmp_path: Path) -> None:
    router = _router()
    for kw, msg in (
        ({"n": -1}, "n must be an integer >= 0"),
        ({"n": 2, "strategy": "clever"}, "unknown strategy 'clever'"),
        ({"n": 2, "query_ids": ["q0", "nope"]}, "not in the router's store"),
        ({"n": 2, "query_ids": ["q0", "q0"]}, "duplicate candidate query ids"),
        ({"n": 2, "query_ids": ["q0"], "table": _mid_table(tmp_path / "j")}, "not both"),
    ):
        with pytest.raises(AddModelError, match=msg):
            suggest_judgments(router, **kw)  # type: ignore[arg-type]


def test_cli_suggest_judgments_and_add_model_like_pool_as_llm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    keyword_tagger: KeywordTagger,
) -> None:
    import tagrouter_fast.router as router_mod

    tagger = keyword_tagger
    monkeypatch.setattr(router_mod, "_tagger_from_spec", lambda spec: tagger)
    bundle = _router(tagger).save(tmp_path / "bundle")
    base = ["suggest-judgments", "--router", str(bundle)]
    assert cli.main([*base, "--n", "4", "--strategy", "uncertainty"]) == 0
    picks = capsys.readouterr().out.split()
    assert len(picks) == 4 and sorted(_kinds(picks)) == ["maths", "maths", "poem", "poem"]
    table = _mid_table(tmp_path / "j")
    assert cli.main([*base, "--n", "3", "--queries", str(table)]) == 0
    assert set(capsys.readouterr().out.split()) <= set(load_table(table).query_ids)
    assert cli.main([*base, "--n", "-2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tagrouter: error: ") and err.count("\n") == 1, err
    argv = ["add-model", "--router", str(bundle), "--model", "giant", "--cost", "50"]
    assert cli.main([*argv, "--like", "pool", "--as-llm"]) == 0
    assert "records copied from 'big,small'" in capsys.readouterr().out
    loaded = TagRouter.load(bundle)
    assert loaded.decider.llm == "giant" and loaded.scorer.model_totals("giant") == (4, 0, 4)
