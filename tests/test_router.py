"""TagRouter facade, bundles and the `tagrouter` CLI, on a small synthetic routing table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_taggers import KeywordTagger

from tagrouter_fast import TagDecider, TagRouter, TagScorer, build_router
from tagrouter_fast.cli import main
from tagrouter_fast.data.table import load_table
from tagrouter_fast.router import BundleError

# Two query kinds with opposite winners: the small model wins poems, the big one wins maths.
POEMS = [
    f"Write a short poem about the {w}" for w in ["sea", "moon", "rain", "forest", "city", "snow"]
]
MATHS = [f"Solve the equation {a}x + {a + 1} = {2 * a}" for a in range(1, 7)]


@pytest.fixture()
def table_dir(make_table: Callable[..., Path]) -> Path:
    queries, outcomes = [], []
    for i, q in enumerate(POEMS + MATHS):
        qid, poem = f"q{i:02d}", i < len(POEMS)
        queries.append((qid, q, "poems" if poem else "maths"))
        outcomes.append((qid, "big", "loss" if poem else "win", "", 10, 100, "0.010"))
        outcomes.append((qid, "small", "win" if poem else "loss", "", 10, 100, "0.001"))
    return make_table(queries, outcomes, outcome_columns=(
        "query_id", "model", "outcome", "score", "in_chars", "out_chars", "cost_usd"))


def test_build_routes_by_tags_and_costs(table_dir: Path) -> None:
    table = load_table(table_dir)
    router = build_router(table, ["big", "small"], tagger=KeywordTagger(), normalize=False)
    assert router.decider.llm == "big"  # the most expensive model by mean cost
    assert router.decider.costs == pytest.approx({"big": 0.010, "small": 0.001})
    assert router.route_tags(["Poetry Writing"]) == "small"
    assert router.route_tags(["Algebra"]) == "big"
    # Raw queries go through the tagger (alignment off: the keyword tags are store tags).
    router = TagRouter(router.decider, KeywordTagger(), align=False)
    assert router.route("Write a poem about spring") == "small"
    assert router.route_batch(["Solve the equation x = 1", "A poem please"]) == ["big", "small"]
    d = router.decide("Solve the equation 2x = 4")
    assert d.model == "big" and d.reason == "argmax"


def test_no_known_tag_falls_back_to_llm(table_dir: Path) -> None:
    router = build_router(
        load_table(table_dir), ["big", "small"], tagger=KeywordTagger(), normalize=False
    )
    d = router.decide_tags(["Cooking"])
    assert d.model == "big" and d.reason == "fallback" and d.unknown_tags == ["Cooking"]


def test_build_on_training_ids_only(table_dir: Path) -> None:
    table = load_table(table_dir)
    train = table.query_ids[:3] + table.query_ids[-3:]
    router = build_router(
        table, ["big", "small"], tagger=KeywordTagger(), query_ids=train, normalize=False
    )
    assert router.scorer.n_queries == len(train)


def test_bundle_round_trip(table_dir: Path, tmp_path: Path) -> None:
    router = build_router(
        load_table(table_dir),
        ["big", "small"],
        tagger=KeywordTagger(),
        theta=-0.01,
        normalize=False,
    )
    path = router.save(tmp_path / "bundle")
    with pytest.raises(BundleError, match="custom tagger"):
        TagRouter.load(path)
    loaded = TagRouter.load(path, tagger=KeywordTagger())
    assert loaded.decider.theta == -0.01
    assert loaded.decider.costs == router.decider.costs
    for tags in (["Poetry Writing"], ["Algebra", "Creative Writing"], ["Unknown"]):
        # JSON text compares NaN deltas (no SLM/LLM comparison made) as equal.
        got, want = loaded.decide_tags(tags).to_dict(), router.decide_tags(tags).to_dict()
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert TagRouter.load(path, tagger=KeywordTagger(), theta=0.5).decider.theta == 0.5


def test_bundle_keeps_the_aggregation(table_dir: Path, tmp_path: Path) -> None:
    router = build_router(
        load_table(table_dir),
        ["big", "small"],
        tagger=KeywordTagger(),
        aggregation="mean",
        normalize=False,
    )
    assert router.decider.aggregation == "mean"
    path = router.save(tmp_path / "bundle")
    meta = json.loads((path / "router.json").read_text())
    assert meta["aggregation"] == "mean"
    loaded = TagRouter.load(path, tagger=KeywordTagger(), theta=0.3)
    assert loaded.decider.aggregation == "mean"
    tags = ["Algebra", "Creative Writing", "Poetry Writing"]
    assert loaded.decide_tags(tags).scores == router.decide_tags(tags).scores
    # Bundles from before the option have no key: they summed, and still do.
    del meta["aggregation"]
    (path / "router.json").write_text(json.dumps(meta))
    assert TagRouter.load(path, tagger=KeywordTagger()).decider.aggregation == "sum"
    meta["aggregation"] = "median"
    (path / "router.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="unknown aggregation 'median'"):
        TagRouter.load(path, tagger=KeywordTagger())


def test_bundle_errors(tmp_path: Path, table_dir: Path) -> None:
    with pytest.raises(BundleError, match="not a router bundle"):
        TagRouter.load(tmp_path)
    router = build_router(
        load_table(table_dir), ["big", "small"], tagger=KeywordTagger(), normalize=False
    )
    path = router.save(tmp_path / "b")
    meta = json.loads((path / "router.json").read_text())
    meta["version"] = 99
    (path / "router.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="v99"):
        TagRouter.load(path, tagger=KeywordTagger())
    (path / "router.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        TagRouter.load(path, tagger=KeywordTagger())


def test_build_rejects_unknown_and_empty_models(table_dir: Path) -> None:
    table = load_table(table_dir)
    with pytest.raises(KeyError, match="nope"):
        build_router(table, ["big", "nope"], tagger=KeywordTagger(), normalize=False)
    with pytest.raises(ValueError, match="empty model set"):
        build_router(table, [], tagger=KeywordTagger(), normalize=False)


def test_router_without_tagger_says_so(table_dir: Path) -> None:
    router = build_router(
        load_table(table_dir), ["big", "small"], tagger=KeywordTagger(), normalize=False
    )
    bare = TagRouter(router.decider)
    with pytest.raises(ValueError, match="no tagger"):
        bare.route("Write a poem")


def test_cli_build_and_route_with_default_tagger(
    table_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    # A table whose models are not a named pool is built with --models.
    assert (
        main(
            ["build-store", "--data", str(table_dir), "--models", "big,small", "--out", str(bundle)]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["route", "--router", str(bundle), "--json", "Write a poem about the stars"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["query"] == "Write a poem about the stars"
    assert d["model"] in {"big", "small"}
    assert set(d["scores"]) == {"big", "small"}
    # The poem tags of the default tagger were learnt from the poem queries, where small wins.
    assert d["model"] == "small", d
    assert main(["route", "--router", str(bundle), "Solve the equation 3x + 4 = 6"]) == 0
    assert capsys.readouterr().out.strip() == "big"
    # The default recipe is TagRouter+ (mean of shrunk scores, tuned on the judgments).
    assert json.loads((bundle / "router.json").read_text())["aggregation"] == "mean"


def test_cli_build_store_aggregation(
    table_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    args = ["build-store", "--data", str(table_dir), "--models", "big,small", "--out", str(bundle)]
    assert main([*args, "--aggregation", "mean"]) == 0
    assert json.loads((bundle / "router.json").read_text())["aggregation"] == "mean"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--aggregation", "median"])
    assert "invalid choice: 'median'" in capsys.readouterr().err


def test_cli_build_store_variants(
    table_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    args = ["build-store", "--data", str(table_dir), "--models", "big,small", "--out", str(bundle)]
    assert main([*args, "--variant", "plus"]) == 0
    r = TagRouter.load(bundle)
    assert r.decider.aggregation == "mean"
    # The pseudo-count and theta* are tuned on the judgments, out-of-fold, and recorded.
    tuned = r.build_info["tuned"]
    assert r.decider.scorer.weighting == "shrunk"
    assert r.decider.scorer.prior_strength == tuned["prior_strength"] in (30.0, 100.0, 300.0)
    assert r.decider.theta == tuned["theta"] and set(tuned["inner_auc"]) == {"30", "100", "300"}
    # Explicit flags override the preset (and are not tuned).
    assert main([*args, "--variant", "plus", "--prior-strength", "7", "--theta", "0.25"]) == 0
    r = TagRouter.load(bundle)
    assert r.decider.scorer.prior_strength == 7.0 and r.decider.theta == 0.25
    assert "tuned" not in r.build_info
    # The paper's TagRouter, exactly.
    assert main([*args, "--variant", "paper"]) == 0
    r = TagRouter.load(bundle)
    assert r.decider.aggregation == "sum" and r.decider.scorer.weighting == "paper"
    assert r.decider.theta == 0.0
    capsys.readouterr()
    # A pseudo-count without the shrunk weighting would be silently ignored: refuse it.
    assert main([*args, "--variant", "paper", "--prior-strength", "5"]) == 2
    assert "prior_strength only applies" in capsys.readouterr().err


def test_cli_build_store_llm_share(
    table_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    args = ["build-store", "--data", str(table_dir), "--models", "big,small", "--out", str(bundle)]
    table = load_table(table_dir)
    for share in (0.0, 0.5, 1.0):
        assert main([*args, "--variant", "plus", "--llm-share", str(share)]) == 0
        r = TagRouter.load(bundle)
        routed = r.route_batch(table.texts)
        # At most the budgeted share of the table goes to M_LLM.
        assert sum(m == "big" for m in routed) <= share * len(routed) + 1e-9
    assert sum(m == "big" for m in routed) == len(routed)  # share 1.0: everything may
    capsys.readouterr()
    with pytest.raises(SystemExit):  # --theta and --llm-share exclude each other
        main([*args, "--theta", "0.1", "--llm-share", "0.5"])
    capsys.readouterr()
    assert main([*args, "--llm-share", "1.5"]) == 2
    assert "llm_share must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_default_bundle_dirs_name_their_variant(
    table_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tagrouter_fast.builder.bundle import build_bundle
    from tagrouter_fast.router import DEFAULT_VARIANT, default_bundle_dir

    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))
    assert default_bundle_dir().name == f"default-{DEFAULT_VARIANT}"
    out = build_bundle(table_dir, models=["big", "small"], variant="paper", show_progress=False)
    assert out == default_bundle_dir("paper") != default_bundle_dir()
    assert TagRouter.load(out).decider.scorer.weighting == "paper"
    with pytest.raises(ValueError, match="unknown variant"):
        build_bundle(table_dir, models=["big", "small"], variant="best", show_progress=False)


def test_cli_errors_are_messages_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["route", "--router", str(tmp_path), "hello"]) == 2
    assert "not a router bundle" in capsys.readouterr().err


def test_cli_tag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tag", "--json", "Translate 'good morning' into French"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tags"] and all(isinstance(t, str) for t in d["tags"])
    assert "Translation" in d["tags"]


class MessyTagger(KeywordTagger):
    """Emits the spelling variants an LLM tagger produces for the same tag."""

    fingerprint = "messy-tagger-v1"

    def tag_batch(self, queries: list[str]) -> list[list[str]]:
        out = []
        for i, tags in enumerate(super().tag_batch(queries)):
            variants = [t.lower().replace(" ", "-") if i % 2 else t for t in tags]
            out.append(variants)
        return out


def test_build_normalizes_open_vocabulary_tags(table_dir: Path, tmp_path: Path) -> None:
    router = build_router(load_table(table_dir), ["big", "small"], tagger=MessyTagger())
    assert router.normalization is not None
    # "poetry-writing" and "Poetry Writing" are one canonical tag after rule aggregation.
    assert "Poetry Writing" in router.scorer.tags
    assert not any("-" in t for t in router.scorer.tags)
    assert router.scorer.tag_count("Poetry Writing") == len(POEMS)
    assert router.route("write a poem") == "small"
    path = router.save(tmp_path / "bundle")
    loaded = TagRouter.load(path, tagger=MessyTagger(), align=False)
    assert loaded.normalization is not None
    assert loaded.normalization.map_tag("poetry_writing") == "Poetry Writing"
    assert loaded.route_batch(["a poem", "b poem", "Solve the equation"]) == [
        "small",
        "small",
        "big",
    ]


def test_decider_is_read_only_and_updates_go_through_the_locked_path() -> None:
    recs = [("q1", ["Poem"], "big", "win"), ("q1", ["Poem"], "small", "loss")]
    r = TagRouter(TagDecider(TagScorer.from_records(recs), {"big": 2.0, "small": 1.0}),
                  align=False)
    with pytest.raises(AttributeError):
        r.decider = r.decider.with_theta(1.0)  # type: ignore[misc]
    r.learn([(["Poem"], "small", "win")])
    # A theta change through the locked path keeps the learning store.
    r.update_decider(lambda d: d.with_theta(0.5))
    assert r.decider.theta == 0.5 and r.decider.is_live and r.scorer.n_learned == 1


class _BrokenTagger(KeywordTagger):
    def tag_batch(self, queries: list[str]) -> list[list[str]]:
        raise RuntimeError("tagger down")


def test_decide_many_is_the_one_composition(table_dir: Path) -> None:
    built = build_router(load_table(table_dir), ["big", "small"], tagger=KeywordTagger(),
                         normalize=False)
    router = TagRouter(built.decider, KeywordTagger(), align=False)
    qs = ["Write a poem about spring", "Solve the equation x = 1", "   ", "hello"]
    batch = router.decide_many(qs)
    assert batch.tags == [["Poetry Writing", "Creative Writing"],
                          ["Algebra", "Mathematical Problem Solving"], [], []]
    # The three shapes decide the same tags on the same decider: they agree query by query.
    names = batch.models()
    assert names == [d.model for d in batch.decisions()] == ["small", "big", "big", "big"]
    arr = batch.arrays()
    assert [router.decider.models[i] for i in arr.model] == names
    # The single-query entry points are this composition.
    assert [router.route(q) for q in qs] == names == router.route_batch(qs)
    assert router.decide(qs[0]).to_dict() == batch.decisions()[0].to_dict()
    # Raw tags (e.g. cached tagger output) go through the same alignment as fresh ones.
    again = router.decide_many(raw_tags=KeywordTagger().tag_batch(qs))
    assert again.tags == batch.tags and again.models() == names


def test_decide_many_options(table_dir: Path) -> None:
    built = build_router(load_table(table_dir), ["big", "small"], tagger=KeywordTagger(),
                         normalize=False)
    router = TagRouter(built.decider, KeywordTagger(), align=False)
    # theta for this call only: a huge theta never leaves M_LLM; the router's is unchanged.
    hi = router.decide_many(["Write a poem about spring"], theta=1e9)
    assert hi.models() == ["big"] and hi.decider.theta == 1e9
    assert router.decider.theta != 1e9
    # Truncation happens before tagging: the keyword falls outside the first 5 characters.
    cut = router.decide_many(["Solve the equation x = 1"], max_query_chars=5)
    assert cut.tags == [[]]
    # Extra tags join after alignment, without duplicates.
    extra = router.decide_many(["Write a poem"], extra_tags=[["Algebra", "Poetry Writing"]])
    assert extra.tags == [["Poetry Writing", "Creative Writing", "Algebra"]]
    # A tagger fault: raised by default, routed untagged (fallback) when asked to survive it.
    broken = TagRouter(built.decider, _BrokenTagger(), align=False)
    with pytest.raises(RuntimeError, match="tagger down"):
        broken.decide_many(["Write a poem"])
    survived = broken.decide_many(["Write a poem", "x"], on_tagger_error="untagged")
    assert survived.tags == [[], []]
    assert isinstance(survived.tagger_error, RuntimeError)
    assert [d.reason for d in survived.decisions()] == ["fallback", "fallback"]
    # Bad calls name the problem.
    with pytest.raises(ValueError, match="exactly one"):
        router.decide_many()
    with pytest.raises(ValueError, match="exactly one"):
        router.decide_many(["a"], raw_tags=[["b"]])
    with pytest.raises(ValueError, match="on_tagger_error"):
        router.decide_many(["a"], on_tagger_error="ignore")
    with pytest.raises(ValueError, match="extra_tags has 2 entries for 1"):
        router.decide_many(["a"], extra_tags=[[], []])
    with pytest.raises(TypeError, match="sequence of str"):
        router.decide_many("a single string")


def test_default_tagger_spec_keeps_the_head_mode_a_bundle_was_built_with() -> None:
    from tagrouter_fast.router import _tagger_from_spec, _tagger_spec
    from tagrouter_fast.tagging.taggers import DefaultTagger

    pooled = DefaultTagger()  # the default since 2026-12-07: the head pooled from the query's run
    assert pooled.head_pooling
    spec = _tagger_spec(pooled)
    assert spec["head_pooling"] is True
    assert _tagger_from_spec(spec).fingerprint == pooled.fingerprint
    # A bundle saved before the change has no "head_pooling": its tags came from the head's own
    # run, and it gets that tagger back (the loader's fingerprint check then passes).
    old = {k: v for k, v in _tagger_spec(DefaultTagger(head_pooling=False)).items()
           if k != "head_pooling"}
    restored = _tagger_from_spec(old)
    assert not restored.head_pooling and restored.fingerprint == old["fingerprint"]
