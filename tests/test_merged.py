"""Merged stores (the paper's enhanced TagScorer): `tagrouter_fast.eval.merged` and
``tagrouter eval --merged`` on a synthetic table whose queries come from several sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from routing_tables import write_table

from tagrouter_fast.data.table import load_table
from tagrouter_fast.eval.features import Features
from tagrouter_fast.eval.merged import POOLED, merged_report, run_merged
from tagrouter_fast.eval.protocol import PoolData

OUTCOMES = {  # kind -> (big, small, mid); the tags say who wins, the same in every source
    "hard": ("win", "loss", "loss"),
    "easy": ("tie", "win", "win"),
    "odd": ("loss", "win", "loss"),
    "mid": ("loss", "loss", "win"),
}
MODELS = ["big", "small", "mid"]


def _table(d: Path, sizes: dict[str, int], seed: int = 0) -> tuple[Path, Features]:
    rng = np.random.default_rng(seed)
    q: list[tuple[str, str, str]] = []
    o: list[tuple[str, str, str, float]] = []
    tags = []
    i = 0
    for src, k_n in sizes.items():
        for _ in range(k_n):
            k = rng.choice(list(OUTCOMES))
            q.append((f"q{i}", f"query {i} about {k}", src))
            tags.append([str(k).capitalize(), f"Topic {rng.integers(0, 4)}"])
            res = list(OUTCOMES[str(k)])
            if rng.random() < 0.1:
                rng.shuffle(res)
            for m, r, c in zip(MODELS, res, (0.01, 0.001, 0.003), strict=True):
                o.append((f"q{i}", m, r, c))
            i += 1
    write_table(d, q, o)
    emb = np.zeros((i, 4), np.float32)
    return d, Features(emb=emb, tags=tags, tag_emb=emb, encoder="test", tagger="test")


def _pool(d: Path, feats: Features) -> PoolData:
    return PoolData.build(load_table(d), MODELS, "big", feats)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # "small" has few queries (its own training folds are tiny), "large" many, "tiny" fewer
    # than 2 x folds (never a target, still another source's data).
    d, feats = _table(tmp_path_factory.mktemp("m"), {"small": 24, "large": 160, "tiny": 3})
    return run_merged(_pool(d, feats), folds=3, seeds=[0], n_boot=100)


def _res(result, scope, method, which):  # type: ignore[no-untyped-def]
    hits = [
        r
        for r in result["results"]
        if (r["scope"], r["method"], r["set"]) == (scope, method, which)
    ]
    assert len(hits) == 1
    return hits[0]


def test_targets_folds_and_store_sizes(result) -> None:  # type: ignore[no-untyped-def]
    assert result["targets"] == ["large", "small"]
    assert "tiny" in result["skipped"] and "< 2 x 3 folds" in result["skipped"]["tiny"]
    assert result["sources"] == {"large": 160, "small": 24, "tiny": 3}
    for f in result["fold_runs"]:
        n = f["n_train"]
        # The merged store is exactly A's training fold plus every other source's query.
        assert n["merged"] == n["alone"] + n["others"]
        size = result["sources"][f["target"]]
        assert n["others"] == sum(result["sources"].values()) - size
        assert n["alone"] == size - len(f["test_ids"])
    # Every query of a target is tested once per seed.
    tested = [q for f in result["fold_runs"] for q in f["test_ids"]]
    assert len(tested) == len(set(tested)) == 160 + 24
    for m in ("TagRouter", "TagRouter+"):
        for which in ("alone", "others", "merged"):
            r = _res(result, POOLED, m, which)
            assert r["n_test"] == 184 and r["runs"] == 6
            lo, hi = r["auc_ci95"]
            assert 0.0 <= lo <= hi <= 1.0
    json.dumps(result)


def test_other_sources_help_a_small_source(result) -> None:  # type: ignore[no-untyped-def]
    # The tags mean the same in every source: the small source's 16 training queries know
    # less than the 163 of the others, so other sources' judgments route it better.
    for m in ("TagRouter", "TagRouter+"):
        alone = _res(result, "small", m, "alone")["auc"]
        assert _res(result, "small", m, "merged")["auc"] >= alone
        assert _res(result, "small", m, "others")["auc"] >= alone
    pairs = {(c["scope"], c["a"], c["b"]) for c in result["comparisons"]}
    assert (POOLED, "TagRouter merged", "TagRouter alone") in pairs
    assert ("small", "TagRouter+ merged", "TagRouter+ others") in pairs
    assert (POOLED, "TagRouter+ merged", "TagRouter merged") in pairs


def test_report(result) -> None:  # type: ignore[no-untyped-def]
    text = merged_report({**result, "pool": "synthetic"})
    assert "### synthetic: merged stores" in text
    assert "| TagRouter | A alone |" in text and "| tiny | not a target" in text
    assert "P(ΔAUC <= 0)" in text


def test_bad_inputs(tmp_path: Path) -> None:
    d, feats = _table(tmp_path / "one", {"only": 40})
    with pytest.raises(ValueError, match="at least 2 sources"):
        run_merged(_pool(d, feats), folds=2)
    d, feats = _table(tmp_path / "small", {"a": 3, "b": 3})
    with pytest.raises(ValueError, match="no source has 2 x 5 queries"):
        run_merged(_pool(d, feats), folds=5)
    d, feats = _table(tmp_path / "ok", {"a": 20, "b": 20})
    with pytest.raises(ValueError, match="unknown recipe"):
        run_merged(_pool(d, feats), variants={"X": "no-such"})
    with pytest.raises(ValueError, match="at least 2 folds"):
        run_merged(_pool(d, feats), folds=1)


def test_cli_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import tagrouter_fast.eval.cli as ecli

    d, feats = _table(tmp_path / "t", {"a": 30, "b": 40})
    monkeypatch.setattr("tagrouter_fast.eval.features.compute_features", lambda texts, **kw: feats)
    out = tmp_path / "m.json"
    argv = ["--data", str(d), "--models", ",".join(MODELS), "--folds", "2", "--bootstrap", "50"]
    assert ecli.main([*argv, "--merged", "--json", str(out), "--no-progress"]) == 0
    assert "merged stores" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["targets"] == ["a", "b"] and r["folds"] == 2
    assert {x["set"] for x in r["results"]} == {"alone", "others", "merged"}


def test_cross_pool_summary(result) -> None:  # type: ignore[no-untyped-def]
    from tagrouter_fast.eval.merged import merged_summary

    text = merged_summary([{**result, "pool": "synthetic"}])
    assert "| synthetic | TagRouter |" in text and "| synthetic | TagRouter+ |" in text
    assert "merged - alone" in text
