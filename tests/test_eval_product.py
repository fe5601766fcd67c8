"""The router the evaluation measures is the router users run.

A TagRouter variant of `tagrouter eval` is built from the training fold by the product's builder;
saved as a bundle, reloaded and asked through `route_batch`, it routes every test query to the
model the harness scored at the chosen theta.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from routing_tables import write_table
from skip_policy import ALPACAEVAL, requires_alpacaeval

from tagrouter_fast import TagRouter
from tagrouter_fast.builder.bundle import build_router
from tagrouter_fast.builder.folds import stratified_folds
from tagrouter_fast.data.table import load_table
from tagrouter_fast.eval.features import Features
from tagrouter_fast.eval.methods import fit_variant
from tagrouter_fast.eval.protocol import PoolData

DATA = ALPACAEVAL


class TableTagger:
    """Deterministic tagger: the tags a synthetic table assigns to each text."""

    fingerprint = "table-tagger-v1"

    def __init__(self, by_text: dict[str, list[str]]) -> None:
        self.by_text = by_text

    def tag(self, query: str) -> list[str]:
        return list(self.by_text.get(query, []))

    def tag_batch(self, queries):
        return [self.tag(q) for q in queries]


def _synthetic(tmp_path: Path, n: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    outcomes = {  # kind -> (big, small, mid)
        "hard": ("win", "loss", "loss"),
        "easy": ("tie", "win", "win"),
        "odd": ("loss", "win", "loss"),
        "mid": ("loss", "loss", "win"),
    }
    kinds = rng.choice(list(outcomes), size=n)
    q: list[tuple[str, str, str]] = []
    o: list[tuple[str, str, str, float]] = []
    tags: dict[str, list[str]] = {}
    for i, k in enumerate(kinds):
        text = f"query {i} about {k}"
        q.append((f"q{i}", text, f"s{i % 2}"))
        tags[text] = [k.capitalize(), f"Topic {rng.integers(0, 6)}"]
        res = list(outcomes[k])
        if rng.random() < 0.15:
            rng.shuffle(res)
        for m, r, c in zip(("big", "small", "mid"), res, (0.01, 0.001, 0.003), strict=True):
            o.append((f"q{i}", m, r, c))
    write_table(tmp_path, q, o)
    return tmp_path, TableTagger(tags)


def _harness_vs_bundle(pool: PoolData, variant: str, tmp_path: Path, tagger, **options):
    data = pool.train_all
    test_rows = stratified_folds(data.subsets, 4, 0)[0]
    train_rows = np.setdiff1d(np.arange(len(data.query_ids)), test_rows)
    train, test = data.subset_rows(train_rows), data.subset_rows(test_rows)
    fitted = fit_variant(train, 0, variant, **options)
    pref, slm = fitted.route(test.features())
    assert fitted.fixed_threshold is not None
    harness = [
        data.models[data.llm] if p > fitted.fixed_threshold else data.models[s]
        for p, s in zip(pref, slm, strict=True)
    ]
    router = fitted.router  # type: ignore[attr-defined]
    router.save(tmp_path / "bundle")
    loaded = TagRouter.load(tmp_path / "bundle", tagger=tagger)
    routed = loaded.route_batch(test.texts)
    return harness, routed, router, loaded


@pytest.mark.parametrize("variant", ["paper", "paper-theta", "plus"])
def test_bundle_routes_like_the_harness_synthetic(tmp_path, variant):
    d, tagger = _synthetic(tmp_path)
    table = load_table(d)
    tags = [tagger.tag(t) for t in table.texts]
    emb = np.zeros((table.n_queries, 4), np.float32)
    feats = Features(emb=emb, tags=tags, tag_emb=emb, encoder="none", tagger=tagger.fingerprint)
    pool = PoolData.build(table, ["big", "small", "mid"], "big", feats, tagger=tagger)
    opts = {"prior_strengths": (2.0, 20.0)} if variant == "plus" else {}
    harness, routed, router, loaded = _harness_vs_bundle(
        pool, variant, tmp_path, tagger, align=False, **opts
    )
    assert routed == harness
    # Not a trivial agreement: the routes use more than one model.
    assert len(set(routed)) >= 2
    assert loaded.decider.theta == router.decider.theta
    if variant != "paper":
        tuned = loaded.build_info["tuned"]
        assert tuned["theta"] == loaded.decider.theta
        if variant == "plus":
            assert set(tuned["inner_auc"]) == {"2", "20"}


def test_builder_tuning_is_out_of_fold_and_seeded(tmp_path):
    d, tagger = _synthetic(tmp_path)
    table = load_table(d)
    models = ["big", "small", "mid"]
    a = build_router(table, models, variant="plus", tagger=tagger, align=False, seed=0)
    b = build_router(table, models, variant="plus", tagger=tagger, align=False, seed=0)
    assert a.build_info == b.build_info
    tuned = a.build_info["tuned"]
    assert tuned["prior_strength"] in (30.0, 100.0, 300.0)
    assert 0.0 <= tuned["oof_llm_share"] <= 1.0 and 0.0 < tuned["oof_accept_rate"] <= 1.0
    # Explicit settings are used as given, not tuned.
    c = build_router(
        table, models, variant="plus", tagger=tagger, align=False, theta=0.25, prior_strength=7.0
    )
    assert c.decider.theta == 0.25 and "tuned" not in c.build_info


def test_tuning_needs_enough_queries(tmp_path):
    d, tagger = _synthetic(tmp_path, n=5)
    table = load_table(d)
    with pytest.raises(ValueError, match="too few to tune"):
        build_router(table, ["big", "small"], variant="plus", tagger=tagger, align=False)


@pytest.mark.data
@pytest.mark.slow
@requires_alpacaeval
def test_bundle_routes_like_the_harness_alpacaeval(tmp_path):
    from tagrouter_fast.data.pools import resolve_pool
    from tagrouter_fast.eval.features import compute_features
    from tagrouter_fast.tagging.taggers import DefaultTagger

    table = load_table(DATA)
    models, llm = resolve_pool(table, "five-api")
    tagger = DefaultTagger()
    feats = compute_features(table.texts, tagger=tagger)
    pool = PoolData.build(table, models, llm, feats, tagger=tagger)
    harness, routed, _, _ = _harness_vs_bundle(pool, "plus", tmp_path, tagger)
    # Same tagger, same alignment (HNSW, floor 0.5), same Rust decider: query by query.
    assert routed == harness
    assert len(set(routed)) >= 2
