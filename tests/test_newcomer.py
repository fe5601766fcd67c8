"""A model joins the pool with N judgments: `tagrouter_fast.eval.newcomer`
and ``tagrouter eval --add-model`` on a synthetic pool where the tags say which model wins."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from routing_tables import write_table
from skip_policy import ALPACAEVAL, requires_alpacaeval

from tagrouter_fast.data.table import load_table
from tagrouter_fast.eval.features import Features
from tagrouter_fast.eval.methods import fit_knn
from tagrouter_fast.eval.newcomer import ALL, _masked, newcomer_report, plot_recovery, run_newcomer
from tagrouter_fast.eval.protocol import PoolData

DATA = ALPACAEVAL
#: kind -> outcomes of (big, small, mid); "mid" queries only the newcomer mid answers well.
OUTCOMES = {
    "hard": ("win", "loss", "loss"),
    "easy": ("tie", "win", "win"),
    "odd": ("loss", "win", "loss"),
    "mid": ("loss", "loss", "win"),
}
MODELS = ["big", "small", "mid"]


def _pool(tmp_path: Path, n: int = 160, seed: int = 0) -> tuple[Path, Features, PoolData]:
    rng = np.random.default_rng(seed)
    kinds = rng.choice(list(OUTCOMES), size=n)
    q: list[tuple[str, str, str]] = []
    o: list[tuple[str, str, str, float]] = []
    tags = []
    for i, k in enumerate(kinds):
        q.append((f"q{i}", f"query {i} about {k}", f"s{i % 2}"))
        tags.append([k.capitalize(), f"Topic {rng.integers(0, 4)}"])
        res = list(OUTCOMES[k])
        if rng.random() < 0.1:
            rng.shuffle(res)
        for m, r, c in zip(MODELS, res, (0.01, 0.001, 0.003), strict=True):
            o.append((f"q{i}", m, r, c))
    write_table(tmp_path, q, o)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    feats = Features(emb=emb, tags=tags, tag_emb=emb, encoder="test", tagger="test")
    pool = PoolData.build(load_table(tmp_path), MODELS, "big", feats)
    return tmp_path, feats, pool


def _run(pool: PoolData, newcomer: str = "mid", **kw):  # type: ignore[no-untyped-def]
    opts = dict(
        folds=2,
        draws=2,
        variants={"TagRouter": "paper", "TagRouter+": "plus"},
        baselines={"RouterBench-KNN": fit_knn},
        n_boot=100,
    )
    opts.update(kw)
    return run_newcomer(pool, newcomer, [0, 5, 20, ALL], **opts)


@pytest.fixture(scope="module")
def mid_result(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    _, _, pool = _pool(tmp_path_factory.mktemp("pool"))
    return _run(pool)


def _row(res, method, sel, n):  # type: ignore[no-untyped-def]
    hits = [r for r in res["results"] if (r["method"], r["selection"], r["n"]) == (method, sel, n)]
    assert len(hits) == 1, (method, sel, n)
    return hits[0]


def test_every_method_choice_and_n_is_measured(mid_result) -> None:  # type: ignore[no-untyped-def]
    res = mid_result
    assert res["newcomer"] == "mid" and not res["as_llm"] and res["llm"] == "big"
    assert res["folds"] == 2 and res["draws"] == 2 and res["n_queries"] == 160
    for m in ("TagRouter", "TagRouter+", "RouterBench-KNN"):
        # Random and stratified choices: every fold x draw; the uncertainty choice is
        # deterministic (one draw); N = all is one run per fold.
        for n in (5, 20):
            assert _row(res, m, "random", n)["runs"] == 4
            assert _row(res, m, "stratified", n)["runs"] == 4
            assert _row(res, m, "uncertainty", n)["runs"] == 2
        assert _row(res, m, "all", ALL)["runs"] == 2
        assert _row(res, m, "prior", 0)["runs"] == 2
        for r in res["results"]:
            lo, hi = r["auc_ci95"]
            assert 0.0 <= lo <= hi <= 1.0
    # Zero judgments: the proxies start only TagRouters (a baseline has no counts to copy).
    for start in ("proxy-cost", "proxy-best"):
        assert _row(res, "TagRouter", start, 0)["runs"] == 2
        assert not [
            r
            for r in res["results"]
            if r["method"] == "RouterBench-KNN" and r["selection"] == start
        ]


def test_judgments_recover_the_newcomers_benefit(mid_result) -> None:  # type: ignore[no-untyped-def]
    # Only mid answers the "mid" queries: knowing its counts there is worth AUC, and a TagRouter
    # with all of mid's judgments is clearly above the pool's prior start.
    res = mid_result
    for m in ("TagRouter", "TagRouter+"):
        zero, full = _row(res, m, "prior", 0)["auc"], _row(res, m, "all", ALL)["auc"]
        assert full > zero + 0.02, (m, zero, full)
        assert _row(res, m, "random", 20)["auc"] > zero
    comp = [
        c for c in res["comparisons"] if c["a"] == "TagRouter all" and c["b"] == "TagRouter prior"
    ]
    assert len(comp) == 1 and comp[0]["ci95"][0] > 0
    rec = {(r["method"], r["n"]): r for r in res["recovery"]}
    assert rec[("TagRouter", 20)]["gap_auc"] > 0
    assert rec[("TagRouter", 20)]["share"] is not None
    # Paired comparisons of each TagRouter against the baseline, per choice and N.
    assert any(
        c["a"] == "TagRouter" and c["b"] == "RouterBench-KNN" and c["n"] == 5
        for c in res["comparisons"]
    )
    json.dumps(res)  # JSON-able as written by --json


def test_report_and_plot(mid_result, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = newcomer_report({**mid_result, "pool": "synthetic"})
    assert "mid joins (as a small model" in text and "| TagRouter |" in text
    assert "suggest_judgments(strategy='uncertainty')" in text and "Zero judgments" in text
    png = tmp_path / "r.png"
    plot_recovery([mid_result], str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_newcomer_as_llm(tmp_path: Path) -> None:
    _, _, pool = _pool(tmp_path)
    res = _run(pool, "big", draws=1, selections=["random"], baselines={})
    assert res["as_llm"] and res["newcomer"] == "big"
    # big wins the "hard" queries no one else answers: the full store routes them to it.
    assert _row(res, "TagRouter", "all", ALL)["auc"] > _row(res, "TagRouter", "prior", 0)["auc"]


def test_masked_baselines_never_read_hidden_labels(tmp_path: Path) -> None:
    _, _, pool = _pool(tmp_path)
    train = pool.train_all
    rows = np.arange(10)
    a = _masked(train, 2, rows)
    flipped = train.subset_rows(np.arange(len(train.query_ids)))
    flipped.acc[10:, 2] = ~flipped.acc[10:, 2]
    b = _masked(flipped, 2, rows)
    x = train.features()
    pa, sa = fit_knn(a, 0).route(x)
    pb, sb = fit_knn(b, 0).route(x)
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(sa, sb)
    # Not a vacuous check: the labels it may read change the routes.
    c = train.subset_rows(np.arange(len(train.query_ids)))
    c.acc[:10, 2] = ~c.acc[:10, 2]
    pc, _ = fit_knn(_masked(c, 2, rows), 0).route(x)
    assert not np.array_equal(pa, pc)


def test_bad_arguments(tmp_path: Path) -> None:
    _, feats, pool = _pool(tmp_path)
    with pytest.raises(ValueError, match="newcomer 'ghost' is not in the pool"):
        run_newcomer(pool, "ghost", [5])
    with pytest.raises(ValueError, match="unknown selection"):
        run_newcomer(pool, "mid", [5], selections=["clever"])
    with pytest.raises(ValueError, match="unknown recipe"):
        run_newcomer(pool, "mid", [5], variants={"X": "no-such-recipe"})
    with pytest.raises(ValueError, match="draws must be >= 1"):
        run_newcomer(pool, "mid", [5], draws=0)
    with pytest.raises(ValueError, match="numbers of judgments"):
        run_newcomer(pool, "mid", [-3])
    two = PoolData.build(load_table(tmp_path), ["big", "mid"], "big", feats)
    with pytest.raises(ValueError, match="use a pool of 3 or more"):
        run_newcomer(two, "mid", [5])


def test_cli_add_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import tagrouter_fast.eval.cli as ecli
    import tagrouter_fast.eval.newcomer as newcomer

    (tmp_path / "t").mkdir()
    d, feats, _ = _pool(tmp_path / "t")
    monkeypatch.setattr("tagrouter_fast.eval.features.compute_features", lambda texts, **kw: feats)
    monkeypatch.setattr(newcomer, "BASELINES", {"RouterBench-KNN": fit_knn})
    monkeypatch.setattr(newcomer, "VARIANTS", {"TagRouter": "paper"})
    out, png = tmp_path / "n.json", tmp_path / "n.png"
    argv = ["--data", str(d), "--models", ",".join(MODELS), "--folds", "2", "--bootstrap", "50"]
    argv += ["--add-model", "mid", "--judgments", "0,5,all", "--draws", "1"]
    argv += ["--selection", "random", "--json", str(out), "--plot", str(png), "--no-progress"]
    assert ecli.main(argv) == 0
    said = capsys.readouterr().out
    assert "mid joins" in said
    r = json.loads(out.read_text())
    assert r["newcomer"] == "mid" and r["ns"] == [0, 5, ALL] and r["selections"] == ["random"]
    assert {x["method"] for x in r["results"]} == {"TagRouter", "RouterBench-KNN"}
    assert png.stat().st_size > 1000
    for bad, msg in (
        (["--add-model", "ghost"], "not in the pool"),
        (["--add-model", "mid", "--judgments", "ten"], "not a count"),
        (["--add-model", "mid", "--draws", "0"], "--draws must be >= 1"),
        (["--add-model", "mid", "--merged"], "separate experiments"),
    ):
        base = ["--data", str(d), "--models", ",".join(MODELS), "--no-progress"]
        parser = argparse.ArgumentParser()
        ecli._add_args(parser)
        with pytest.raises(ValueError, match=msg):
            ecli.run_eval(parser.parse_args(base + bad))


@pytest.mark.data
@pytest.mark.slow
@requires_alpacaeval
def test_real_pool_newcomer() -> None:
    from tagrouter_fast.data.pools import resolve_pool
    from tagrouter_fast.eval.features import compute_features
    from tagrouter_fast.tagging.taggers import DefaultTagger

    table = load_table(DATA)
    models, llm = resolve_pool(table, "five-api", None, None)
    tagger = DefaultTagger()
    pool = PoolData.build(
        table, models, llm, compute_features(table.texts, tagger=tagger), tagger=tagger
    )
    res = run_newcomer(
        pool,
        "claude-instant-1.2",
        [0, 25, ALL],
        folds=2,
        draws=1,
        selections=["random"],
        baselines={"RouterBench-KNN": fit_knn},
        n_boot=50,
    )
    assert res["n_queries"] == len(pool.train_all.query_ids) > 800 and not res["as_llm"]
    for r in res["results"]:
        assert 0.0 < r["auc"] < 1.0


def test_baselines_fit_a_newcomer_with_one_accept(tmp_path: Path) -> None:
    # 25 judgments with a single accept: too few of a class for an early-stopping split.
    from tagrouter_fast.eval.methods import fit_forc, fit_mf, fit_mlp

    _, _, pool = _pool(tmp_path)
    train = pool.train_all
    acc = train.acc[:, 2]
    rows = np.concatenate([np.flatnonzero(acc)[:1], np.flatnonzero(~acc)[:24]])
    masked = _masked(train, 2, rows)
    for fit in (fit_mlp, fit_forc, fit_mf, fit_knn):
        pref, slm = fit(masked, 0).route(train.features())
        assert len(pref) == len(slm) == len(train.query_ids) and np.isfinite(pref).all()


def test_cross_case_summary_and_eval_summary_cli(mid_result, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tagrouter_fast.cli import main as tagrouter
    from tagrouter_fast.eval.newcomer import best_baseline, newcomer_summary

    res = {**mid_result, "pool": "synthetic"}
    assert best_baseline(res) == "RouterBench-KNN"
    text = newcomer_summary([res])
    for part in (
        "RouterBench-KNN (best baseline)",
        "TagRouter+ - RouterBench-KNN",
        "| synthetic: mid (small, AR ",
        "| TagRouter+ | stratified |",
        "proxy-cost - prior",
        "Share of the full-data benefit",
    ):
        assert part in text, part
    # A share is given only where the full data measurably helps; here it does for TagRouter.
    rec = [r for r in res["recovery"] if r["method"] == "TagRouter"]
    assert rec and all(r["gap_ci95"][0] > 0 and r["share"] is not None for r in rec)
    one = tmp_path / "one.json"
    one.write_text(json.dumps(res))
    several = tmp_path / "several.json"
    several.write_text(json.dumps({"newcomers": [res, res]}))
    png = tmp_path / "all.png"
    assert tagrouter(["eval-summary", str(one), str(several), "--plot", str(png)]) == 0
    assert capsys.readouterr().out.count("| synthetic: mid (small") >= 3 * 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps({"targets": ["a"], "results": [], "comparisons": []}))
    assert tagrouter(["eval-summary", str(one), str(merged)]) == 2
    assert "different experiments" in capsys.readouterr().err


def _fold(n: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    acc_llm = (rng.random(n) < 0.5).astype(float)
    acc_slm = (rng.random(n) < 0.3).astype(float)
    return {"rows": np.arange(n), "acc_llm": acc_llm}, acc_llm, acc_slm


def test_intervals_resample_the_draws_of_judged_queries() -> None:
    # Three draws of one fold route very differently (one orders queries by their gain, one
    # against it, one not at all). With the queries held fixed, the replicates are exactly the
    # resamples of the draws: from the worst draw alone to the best alone, centred on their mean.
    from tagrouter_fast.eval import metrics as M
    from tagrouter_fast.eval.newcomer import _boot_series, _draw_weights, _Run, _Series

    info, acc_llm, acc_slm = _fold(200, 0)
    gain = acc_llm - acc_slm
    prefs = [gain, -gain, np.zeros(200)]
    s = _Series([_Run(0, d, {}, p, acc_slm) for d, p in enumerate(prefs)])
    aucs = [M.areas(p, acc_llm, acc_slm)[0] for p in prefs]
    boot, _ = _boot_series(s, [info], [np.ones((4000, 200))], _draw_weights(1, [3], 4000))
    assert boot.min() == pytest.approx(min(aucs)) and boot.max() == pytest.approx(max(aucs))
    assert boot.mean() == pytest.approx(np.mean(aucs), abs=0.005)
    # One draw per fold (N = all, the zero-judgment starts): nothing to resample.
    one = _Series([_Run(0, 0, {}, prefs[0], acc_slm)])
    boot1, _ = _boot_series(one, [info], [np.ones((50, 200))], _draw_weights(1, [1], 50))
    np.testing.assert_allclose(boot1, aucs[0])


def test_no_recovered_share_of_a_tiny_full_data_benefit() -> None:
    # The full data helps by a hair on every resample (graded accepts that differ by 0.001), so
    # the gap's interval lies above 0; the judged-query run picked a worse small model and lost
    # 3 points. Its "share" would be thousands of percent below 0: not given.
    from tagrouter_fast.eval import metrics as M
    from tagrouter_fast.eval.newcomer import MIN_GAP, _Run, _Series, _summarize

    n, rng = 300, np.random.default_rng(1)
    sign = rng.choice([-1.0, 1.0], n)
    acc_slm = np.full(n, 0.5)

    def summarize(benefit: float) -> dict:  # type: ignore[type-arg]
        info = {"rows": np.arange(n), "acc_llm": 0.5 + benefit * sign}
        series = {}
        for key, pref, slm_acc in (
            (("T", "prior", 0), np.zeros(n), acc_slm),
            (("T", "all", ALL), sign, acc_slm),
            (("T", "random", 10), np.zeros(n), acc_slm - 0.06),
        ):
            auc, pauc = M.areas(pref, info["acc_llm"], slm_acc)
            met = {"auc": auc, "pauc": pauc, "ar": 0.5, "cost": 1.0, "ratio": 0.5}
            series[key] = _Series([_Run(0, 0, met, pref, slm_acc)])
        (rec,) = _summarize(series, [info], 200, {"variants": {"T": "plus"}})["recovery"]
        return rec  # type: ignore[no-any-return]

    rec = summarize(0.001)
    assert rec["gap_ci95"][0] > 0 and 0 < rec["gap_auc"] < MIN_GAP
    assert rec["share"] is None and rec["share_ci95"] is None
    # The same runs with a benefit of a few points do get a share. A constant preference is
    # the straight line: 0.06 off its all-small end is 0.03 of AUC.
    rec = summarize(0.1)
    assert rec["gap_auc"] > MIN_GAP and rec["share"] == pytest.approx(-0.03 / rec["gap_auc"])
    lo, hi = rec["share_ci95"]
    assert lo <= rec["share"] <= hi


def test_hybrid_choice_of_judged_queries(tmp_path: Path) -> None:
    # The paper's Alg. 2 picks the judged queries: measured like the other choices, paired
    # against a random choice of the same N.
    _, _, pool = _pool(tmp_path)
    res = _run(pool, selections=["random", "hybrid"], variants={"TagRouter+": "plus"})
    for n in (5, 20):
        assert _row(res, "TagRouter+", "hybrid", n)["runs"] == 4
        assert any(
            c["a"] == "TagRouter+"
            and c["b"] == "TagRouter+ (random)"
            and c["selection"] == "hybrid"
            and c["n"] == n
            for c in res["comparisons"]
        )
    assert "Alg. 2 hybrid tag weights" in newcomer_report({**res, "pool": "synthetic"})
