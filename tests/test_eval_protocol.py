"""Cross-validation protocol: folds, no leakage, end-to-end on a synthetic table, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from routing_tables import write_table
from skip_policy import ALPACAEVAL, requires_alpacaeval

from tagrouter_fast.data.table import load_table
from tagrouter_fast.eval.cli import build_result, main
from tagrouter_fast.eval.features import Features
from tagrouter_fast.eval.methods import (
    Fitted,
    Method,
    QueryFeatures,
    default_methods,
    fit_knn,
    fit_knn_difficulty,
    fit_prior,
    fit_random,
    fit_tag_difficulty,
    fit_variant,
)
from tagrouter_fast.eval.protocol import METRIC_KEYS, PoolData, evaluate, stratified_folds

DATA = ALPACAEVAL


def test_folds_partition_and_stratify():
    strata = ["a"] * 50 + ["b"] * 23 + ["c"] * 7
    folds = stratified_folds(strata, 5, seed=3)
    allrows = np.concatenate(folds)
    assert sorted(allrows.tolist()) == list(range(80))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for s in "abc":
        per = [sum(strata[i] == s for i in f) for f in folds]
        assert max(per) - min(per) <= 1
    assert [f.tolist() for f in folds] == [f.tolist() for f in stratified_folds(strata, 5, seed=3)]
    assert [f.tolist() for f in folds] != [f.tolist() for f in stratified_folds(strata, 5, seed=4)]


def _synthetic(tmp_path: Path, n: int = 300, seed: int = 0) -> tuple[Path, Features]:
    """A table where the tag says which model to use.

    "hard" queries: only big is accepted; "easy": both; "odd": only small; "none": neither.
    Embeddings carry the same information (one direction per kind) plus noise.
    """
    rng = np.random.default_rng(seed)
    kinds = rng.choice(["hard", "easy", "odd", "none"], size=n, p=[0.3, 0.3, 0.1, 0.3])
    q: list[tuple[str, str, str]] = []
    o: list[tuple[str, str, str, float]] = []
    table = {
        "hard": ("win", "loss"),
        "easy": ("tie", "win"),
        "odd": ("loss", "win"),
        "none": ("loss", "loss"),
    }
    for i, k in enumerate(kinds):
        q.append((f"q{i}", f"text {i}", f"s{i % 3}"))
        big, small = table[k]
        # Label noise so that nothing is perfectly separable.
        if rng.random() < 0.1:
            big, small = small, big
        o.append((f"q{i}", "big", big, 0.01))
        if i != 5:  # one missing pair: q5 has no outcome for small
            o.append((f"q{i}", "small", small, 0.001))
    write_table(tmp_path, q, o)
    dirs = {k: rng.normal(size=16) for k in table}
    emb = np.stack([dirs[k] + 0.5 * rng.normal(size=16) for k in kinds]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    tags = [[k.capitalize(), f"Topic {rng.integers(0, 5)}"] for k in kinds]
    return tmp_path, Features(emb=emb, tags=tags, tag_emb=emb.copy(), encoder="test", tagger="test")


def _light_methods():
    # The product's variants, without alignment (the synthetic tags are all in the store).
    return [
        Method("random", "reference", fit_random),
        Method("prior", "baseline", fit_prior),
        Method("RouterBench-KNN", "baseline", fit_knn),
        Method("TagRouter", "tagrouter", lambda t, s: fit_variant(t, s, "paper", align=False)),
        Method(
            "TagRouter+",
            "tagrouter",
            lambda t, s: fit_variant(t, s, "plus", align=False, prior_strengths=(2.0, 20.0)),
        ),
    ]


def test_fit_sees_only_training_queries(tmp_path):
    d, feats = _synthetic(tmp_path, n=120)
    table = load_table(d)
    pool = PoolData.build(table, ["big", "small"], "big", feats)
    seen: list[tuple[set, set]] = []

    class Spy(Fitted):
        def __init__(self, train_ids):
            self.train_ids = train_ids

        def route(self, x: QueryFeatures):
            # The routed queries arrive without labels, by type.
            assert not hasattr(x, "acc") and not hasattr(x, "codes")
            seen.append((self.train_ids, set(x.query_ids)))
            return np.zeros(len(x.query_ids)), np.ones(len(x.query_ids), dtype=int)

    res = evaluate(
        pool,
        [Method("spy", "baseline", lambda t, s: Spy(set(t.query_ids)))],
        folds=4,
        inner_folds=2,
    )
    assert len(res["spy"]) == 4
    # Every route call (outer test folds and inner operating-point folds) is disjoint from the
    # queries its router was fitted on.
    assert seen and all(not (tr & te) for tr, te in seen)
    outer = [te for tr, te in seen if len(te) >= 25]
    assert set().union(*outer) == set(pool.train_all.query_ids)
    # The query with a missing pair is dropped, not scored as a loss.
    assert pool.dropped == ["q5"]


def test_end_to_end_synthetic_tagrouter_learns(tmp_path):
    d, feats = _synthetic(tmp_path)
    res = build_result(
        d,
        models=["big", "small"],
        folds=3,
        seeds=[0, 1],
        methods=_light_methods(),
        n_boot=200,
        progress=False,
        features=feats,
    )
    m = res["methods"]
    assert res["llm"] == "big" and res["n_queries"] == 299 and res["folds"] == 3
    for name in ("TagRouter", "TagRouter+", "prior", "oracle", "big", "small"):
        assert name in m
    for key in (
        "ar",
        "uplift",
        "cost",
        "relative_cost",
        "rank",
        "auc",
        "pauc",
        "apgr",
        "cpt50",
        "aiq",
    ):
        assert key in m["TagRouter"] and f"{key}_std" in m["TagRouter"]
    # Tags determine the best model here: TagRouter clearly beats the no-information router.
    assert m["TagRouter"]["auc"] > m["prior"]["auc"] + 0.05
    d_auc = m["TagRouter+"]["delta_auc_vs_best_baseline"]
    assert d_auc["ci95"][0] <= d_auc["mean"] <= d_auc["ci95"][1]
    # Our variants are also compared, paired, with the paper's TagRouter (and it with nothing).
    vs = m["TagRouter+"]["delta_auc_vs_paper"]
    assert vs["baseline"] == "TagRouter" and vs["ci95"][0] <= vs["ci95"][1]
    assert "delta_auc_vs_paper" not in m["TagRouter"] and "delta_auc_vs_paper" not in m["prior"]
    assert m["oracle"]["auc"] >= max(v["auc"] or 0 for v in m.values())
    # Its operating point beats always-big at a lower cost.
    assert m["TagRouter"]["ar"] > m["big"]["ar"] and m["TagRouter"]["relative_cost"] < 1


def test_cli_writes_json_and_plot(tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    d, feats = _synthetic(tmp_path / "x")
    import tagrouter_fast.eval.cli as cli

    monkeypatch.setattr(cli, "_methods", lambda names, ablation: _light_methods())
    monkeypatch.setattr("tagrouter_fast.eval.features.compute_features", lambda texts, **kw: feats)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(
        [
            "--data",
            str(d),
            "--models",
            "big,small",
            "--folds",
            "3",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--no-progress",
            "--bootstrap",
            "50",
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r) >= {"data", "models", "llm", "folds", "methods", "best_baseline", "seeds"}
    assert r["models"] == ["big", "small"] and r["llm"] == "big" and r["folds"] == 3
    for name in ("big", "small", "random", "prior", "oracle", "TagRouter", "TagRouter+"):
        assert name in r["methods"]
    for name in ("TagRouter", "TagRouter+", "RouterBench-KNN"):
        e = r["methods"][name]
        for key in METRIC_KEYS:
            assert key in e and f"{key}_std" in e
        d = e["delta_auc_vs_best_baseline"]
        assert d["baseline"] == r["best_baseline"] and d["ci95"][0] <= d["ci95"][1]
        assert len(e["curve"]["ratio"]) == len(e["curve"]["ar"])
    # A real PNG, not an empty file.
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_eval_summary_table_from_json(tmp_path, monkeypatch, capsys):
    (tmp_path / "x").mkdir()
    d, feats = _synthetic(tmp_path / "x")
    import tagrouter_fast.eval.cli as cli
    from tagrouter_fast.cli import main as tagrouter

    monkeypatch.setattr(cli, "_methods", lambda names, ablation: _light_methods())
    monkeypatch.setattr("tagrouter_fast.eval.features.compute_features", lambda texts, **kw: feats)
    out = tmp_path / "r.json"
    args = ["--data", str(d), "--models", "big,small", "--folds", "3", "--json", str(out)]
    assert main([*args, "--no-progress", "--bootstrap", "50"]) == 0
    r = json.loads(out.read_text())
    capsys.readouterr()
    assert tagrouter(["eval-summary", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[0].startswith("| pool")
    row = table[2]
    d_plus = r["methods"]["TagRouter+"]["delta_auc_vs_paper"]
    assert f"{100 * d_plus['mean']:+.2f}" in row and r["best_baseline"] in row
    # Not an eval result: one-line error.
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert tagrouter(["eval-summary", str(tmp_path / "bad.json")]) == 2
    assert "not a tagrouter eval JSON result" in capsys.readouterr().err


def _with_bystanders(d: Path, n_others: int = 6, seed: int = 1) -> None:
    """Add models outside the pool whose judgments follow each query's kind, like the 56
    models of AlpacaEval that judge every query but are not pool members."""
    rng = np.random.default_rng(seed)
    rows = (d / "outcomes.csv").read_text().splitlines()
    big = {r.split(",")[0]: r.split(",")[2] for r in rows[1:] if r.split(",")[1] == "big"}
    extra = []
    for q, out in big.items():
        for j in range(n_others):
            o = out if rng.random() < 0.8 else "loss"
            extra.append(f"{q},other{j},{o},0.005")
    (d / "outcomes.csv").write_text("\n".join(rows + extra) + "\n")


def test_pool_maps_to_all_model_columns(tmp_path):
    d, feats = _synthetic(tmp_path, n=60)
    _with_bystanders(d)
    table = load_table(d)
    pool = PoolData.build(table, ["small", "big"], "big", feats)
    ts = pool.train_all
    # all_index points each pool column at the same model's column of the whole table.
    assert ts.all_codes.shape[1] == len(table.models) == 8
    for j in range(2):
        assert np.array_equal(ts.all_codes[:, ts.all_index[j]], ts.codes[:, j])


def test_difficulty_variants_learn_on_synthetic(tmp_path):
    d, feats = _synthetic(tmp_path)
    _with_bystanders(d)
    methods = [
        Method("prior", "baseline", fit_prior),
        Method("TagDifficulty", "research", lambda t, s: fit_tag_difficulty(t, s, k=5.0)),
        Method("KNN+D (control)", "baseline", fit_knn_difficulty),
    ]
    res = build_result(
        d,
        models=["big", "small"],
        folds=3,
        methods=methods,
        n_boot=100,
        progress=False,
        features=feats,
    )
    m = res["methods"]
    # Tags and embeddings both say which model to use: both clearly beat no information.
    assert m["TagDifficulty"]["auc"] > m["prior"]["auc"] + 0.05
    assert m["KNN+D (control)"]["auc"] > m["prior"]["auc"] + 0.05
    assert m["TagDifficulty"]["auc"] <= m["oracle"]["auc"]


def test_default_registry_names():
    names = [m.name for m in default_methods()]
    for n in (
        "TagRouter",
        "TagRouter-theta*",
        "TagRouter+",
        "RouteLLM-MF",
        "RouterBench-KNN",
        "RouterBench-MLP",
        "FORC-style",
        "RouteLLM-MF w/ tags",
        "prior",
        "random",
        "TagDifficulty",
        "Blend(TagRouter+, MF)",
        "KNN+D (control)",
    ):
        assert n in names
    assert len(set(names)) == len(names)


@pytest.mark.data
@pytest.mark.slow
@requires_alpacaeval
def test_real_pool_end_to_end():
    want = {"prior", "RouterBench-KNN", "TagRouter", "TagRouter+", "TagDifficulty"}
    methods = [m for m in default_methods() if m.name in want]
    res = build_result(DATA, pool="pair-api", folds=2, methods=methods, n_boot=50, progress=False)
    m = res["methods"]
    assert res["models"] == ["claude-2", "gpt-3.5-turbo-1106"] and res["llm"] == "claude-2"
    assert res["scorer_impl"] == "tagrouter_fast.builder.bundle.build_router"
    json.dumps(res["methods"]["TagRouter"]["delta_auc_vs_best_baseline"])
    assert res["n_queries"] == 805
    assert abs(m["claude-2"]["ar"] - 0.183) < 0.01
    for name in want:
        assert 0.0 < m[name]["auc"] < 1.0
    # The oracle bounds every router.
    assert all(m["oracle"]["auc"] >= m[n]["auc"] for n in want)
    assert Counter(k for k in m)["TagRouter"] == 1


def test_repeated_splits_do_not_narrow_the_bootstrap_interval(tmp_path):
    # Repeating the same split adds no information about new queries: the paired interval must
    # not shrink, which it would if each seed's folds were resampled independently.
    d, feats = _synthetic(tmp_path, n=150)
    methods = [m for m in _light_methods() if m.name in ("prior", "RouterBench-KNN", "TagRouter")]

    def ci(seeds: list[int]) -> list[float]:
        res = build_result(
            d,
            models=["big", "small"],
            folds=3,
            seeds=seeds,
            methods=methods,
            n_boot=200,
            progress=False,
            features=feats,
        )
        return res["methods"]["TagRouter"]["delta_auc_vs_best_baseline"]["ci95"]

    assert ci([0, 0]) == pytest.approx(ci([0, 0, 0]))


def test_unknown_tagger_option_is_an_error(tmp_path):
    d, _ = _synthetic(tmp_path, n=40)
    with pytest.raises(ValueError, match="unknown tagger 'bogus'"):
        build_result(d, models=["big", "small"], folds=2, tagger="bogus", progress=False)


def test_retagged_method_is_compared_paired_with_its_reference(tmp_path):
    # The same router on the same folds with a tagger that says nothing: the paired comparison
    # with its reference (the ablation `head` uses this for two default-tagger variants).
    from tagrouter_fast.eval.ablations import methods_for, retagged
    from tagrouter_fast.eval.report import markdown_table

    class Blind:
        fingerprint = "blind-tagger-v1"

        def tag_batch(self, texts):
            return [["Anything"] for _ in texts]

    d, feats = _synthetic(tmp_path)

    def fit(t, s):
        return fit_variant(t, s, "paper", align=False)

    methods = [
        Method("prior", "baseline", fit_prior),
        Method("TagRouter", "tagrouter", fit),
        Method("TagRouter blind", "tagrouter", retagged(fit, Blind), reference="TagRouter"),
    ]
    res = build_result(
        d,
        models=["big", "small"],
        folds=3,
        methods=methods,
        n_boot=200,
        progress=False,
        features=feats,
    )
    m = res["methods"]
    d_ref = m["TagRouter blind"]["delta_auc_vs_reference"]
    assert d_ref["baseline"] == "TagRouter"
    assert d_ref["ci95"][1] < 0 and d_ref["mean"] < -0.05  # the tags carried the signal
    assert "delta_auc_vs_reference" not in m["TagRouter"]
    assert "| TagRouter blind | TagRouter |" in markdown_table(res)
    names = [x.name for x in methods_for("head")]
    assert "TagRouter+ pooled head" in names and "TagRouter pooled head" in names
    refs = {x.name: x.reference for x in methods_for("head") if x.reference}
    assert refs == {"TagRouter pooled head": "TagRouter", "TagRouter+ pooled head": "TagRouter+"}
