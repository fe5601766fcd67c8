"""A `Variant` end to end: the CLI resolves `--variant` and its override flags once into one
`Variant`, `build_bundle` / `build_bundle_ray` take it whole, and the bundle records it; and the
CLI's routing goes through `TagRouter.decide_many` at the call's theta."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from fake_taggers import CountingTagger

from tagrouter_fast.cli import main
from tagrouter_fast.core import TagDecider, TagScorer
from tagrouter_fast.options import VARIANTS, Variant, resolve_variant
from tagrouter_fast.router import TagRouter, default_bundle_dir


@pytest.fixture()
def table_dir(make_table: Callable[..., Path]) -> Path:
    # Poems: the small model wins; maths: the big one.
    queries, outcomes = [], []
    for i in range(12):
        poem = i % 2 == 0
        text = "Write a poem" if poem else "Solve x + 1 = 2"
        queries.append((f"q{i:02d}", f"{text} no {i}", "s"))
        outcomes.append((f"q{i:02d}", "big", "loss" if poem else "win", "0.010"))
        outcomes.append((f"q{i:02d}", "small", "win" if poem else "loss", "0.001"))
    return make_table(queries, outcomes)


def _capture(monkeypatch: pytest.MonkeyPatch, target: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def fake(data_dir: Any, **kwargs: Any) -> Path:
        seen.update(kwargs, data_dir=data_dir)
        return Path("nowhere")

    monkeypatch.setattr(target, fake)
    return seen


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        ("tagrouter_fast.builder.bundle.build_bundle", []),
        ("tagrouter_fast.builder.shard.build_bundle_ray", ["--ray", "local"]),
    ],
    ids=["one-process", "ray"],
)
def test_cli_resolves_the_flags_into_one_variant(
    monkeypatch: pytest.MonkeyPatch, table_dir: Path, target: str, extra: list[str]
) -> None:
    seen = _capture(monkeypatch, target)
    base = ["build-store", "--data", str(table_dir), "--models", "big,small", *extra]
    assert main([*base, "--variant", "plus", "--aggregation", "sum", "--theta", "0.2"]) == 0
    v = seen["variant"]
    assert isinstance(v, Variant) and v.recipe == "plus"
    assert v == VARIANTS["plus"].with_options(aggregation="sum", theta=0.2)
    assert v.prior_strengths == (30.0, 100.0, 300.0)  # not overridden: still tuned
    assert not {"aggregation", "weighting", "prior_strength", "theta"} & set(seen)
    # No --theta: the recipe's own (None: theta* is tuned), not an override to "no theta".
    assert main([*base, "--variant", "paper-theta", "--weighting", "none"]) == 0
    assert seen["variant"].theta is None and seen["variant"].weighting == "none"
    assert main([*base, "--variant", "paper", "--prior-strength", "30"]) == 2  # not shrinking


def test_build_bundle_takes_a_variant_whole(
    table_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tagrouter_fast.builder.bundle import build_bundle

    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))
    v = resolve_variant("paper").with_options(s_tie=0.5, aggregation="mean", align=False)
    out = build_bundle(table_dir, models=["big", "small"], variant=v, show_progress=False)
    assert out == default_bundle_dir("paper")  # derived from "paper": its directory
    r = TagRouter.load(out)
    assert r.scorer.s_tie == 0.5 and r.decider.aggregation == "mean"
    assert r.build_info is not None and r.build_info["variant"] == v.to_json()
    # A variant made from settings alone has no recipe: its own directory, never a recipe's.
    custom = Variant(theta=0.25, align=False)
    out = build_bundle(table_dir, models=["big", "small"], variant=custom, show_progress=False)
    assert out == default_bundle_dir("custom") and TagRouter.load(out).decider.theta == 0.25


class BatchCountingTagger(CountingTagger):
    """Also remembers the size of each tagger call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def tag_batch(self, queries: Sequence[str]) -> list[list[str]]:
        self.calls.append(len(queries))
        return super().tag_batch(list(queries))


def _router(tagger: BatchCountingTagger) -> TagRouter:
    recs = [("q1", ["Poem"], "big", "loss"), ("q1", ["Poem"], "small", "win"),
            ("q2", ["Math"], "big", "win"), ("q2", ["Math"], "small", "loss")]
    decider = TagDecider(TagScorer.from_records(recs), {"big": 10.0, "small": 1.0})
    return TagRouter(decider, tagger, align=False)


def test_cli_route_decides_at_its_theta_without_changing_the_router(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tagger = BatchCountingTagger()
    router = _router(tagger)
    monkeypatch.setattr("tagrouter_fast.builder.default.default_router", lambda: router)
    monkeypatch.setattr("tagrouter_fast.batch.DEFAULT_BATCH_SIZE", 2)  # several chunks
    queries = ["a poem", "x + 1", "a poem again", "", "y - 2"]
    assert main(["route", *queries]) == 0
    # One tagger call per chunk of 2 (the blank query never reaches the tagger).
    assert tagger.calls == [2, 1, 1]
    assert capsys.readouterr().out.split("\n")[:-1] == [router.route(q) for q in queries]
    # Theta 5: nothing clears it, every tagged query goes to M_LLM; the router keeps theta 0.
    assert main(["route", "--theta", "5", "--json", *queries]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in rows] == queries
    assert [r["model"] for r in rows] == ["big"] * len(queries)
    assert all(r["theta"] == 5.0 for r in rows) and router.decider.theta == 0.0
    assert rows[3]["reason"] == "fallback"
    # Each non-blank query was tagged once per command and once per route() above.
    assert tagger.seen == [q for q in queries if q.strip()] * 3


def test_a_budget_does_not_silently_drop_a_set_theta(table_dir: Path, tmp_path: Path) -> None:
    from tagrouter_fast.builder.bundle import build_bundle

    for v in (resolve_variant("plus").with_options(theta=0.1), Variant(theta=None)):
        with pytest.raises(ValueError, match="give theta or llm_share, not both"):
            build_bundle(table_dir, models=["big", "small"], out=tmp_path / "b", variant=v,
                         llm_share=0.5, show_progress=False)
    assert not (tmp_path / "b").exists()  # refused before anything was built
