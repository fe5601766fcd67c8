"""The shadow report against a scripted day whose truth the test knows (tests/shadow_fakes.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shadow_fakes import (
    BIG,
    SMALL,
    T0,
    TOPIC_TAGS,
    TRUTH,
    Sink,
    World,
    accept_truth,
    config,
    scripted_day,
    true_cost,
)

from tagrouter_fast import journal
from tagrouter_fast.cli import main
from tagrouter_fast.core import TagDecider, sweep_theta
from tagrouter_fast.serve.shadow.groups import OTHER, group_tags
from tagrouter_fast.serve.shadow.report import SCHEMA, build_report
from tagrouter_fast.serve.shadow.runner import DECISIONS_FILE, PAIRS_FILE, SPEND_FILE, ShadowRunner

TARGET = 0.95
TOP_KEYS = {"schema", "settings", "default_model", "models", "inputs", "traffic", "candidates",
            "tag_groups", "curve", "recommendation", "spend", "mode_history"}


def run_day(d: Path, n: int, seed: int, world: World | None = None, **kw: Any) -> TagDecider:
    world = world or World()
    now = [T0]

    async def go() -> TagDecider:
        r = ShadowRunner(config(**kw), d, call_backend=world.call_backend, judge=world.judge,
                         sink=Sink(), clock=lambda: now[0], theta=0.0)
        dec = await scripted_day(r, world, n, seed, now)
        while r.stats()["in_flight"]:
            await asyncio.sleep(0.005)
        await r.aclose()
        return dec

    return asyncio.run(go())


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, World, TagDecider]:
    d = tmp_path_factory.mktemp("day")
    world = World()
    # explore 0.5: about 100 judged pairs of the small model on maths and on code each.
    dec = run_day(d, 2000, seed=1, world=world, daily_cap_usd=50.0, explore=0.5)
    return d, world, dec


@pytest.fixture(scope="module")
def report(day: tuple[Path, World, TagDecider]) -> dict[str, Any]:
    return build_report(day[0], target=TARGET)


def topic_of(group: dict[str, Any]) -> str:
    (topic,) = [t for t, sets in TOPIC_TAGS.items() if sets[0][0] in group["tags"]]
    return topic


def logged(d: Path) -> list[dict[str, Any]]:
    return [ln.payload for ln in journal.scan(d / DECISIONS_FILE) if ln.payload]


def test_the_schema_a_dashboard_reads(report: dict[str, Any]) -> None:
    assert set(report) == TOP_KEYS and report["schema"] == SCHEMA
    json.dumps(report, allow_nan=False)  # finite numbers only
    assert report["default_model"] == BIG and report["models"] == [BIG, SMALL]
    assert report["traffic"]["decisions"] == 2000
    assert report["traffic"]["pairs"] == report["candidates"][SMALL]["judged"] > 300
    assert report["traffic"]["not_yet_learned"] == 0


def test_each_tag_group_names_its_winner_with_intervals_covering_the_truth(
    report: dict[str, Any],
) -> None:
    groups = report["tag_groups"]
    assert [topic_of(g) for g in groups][0] == "writing"  # the biggest first
    assert sorted(topic_of(g) for g in groups) == ["code", "maths", "writing"]
    for g in groups:
        topic = topic_of(g)
        assert g["winner"] == (SMALL if topic == "writing" else BIG), g["name"]
        small = g["models"][SMALL]
        for key, truth in (("win_rate", TRUTH[topic][0]), ("loss_rate", TRUTH[topic][2]),
                           ("accept_rate", accept_truth(topic))):
            iv = small[key]
            assert iv["lo"] <= truth <= iv["hi"], (g["name"], key, iv, truth)
            assert iv["hi"] - iv["lo"] < 0.3


def test_recommends_writing_to_small_and_maths_to_big(report: dict[str, Any]) -> None:
    rec = report["recommendation"]
    assert rec["status"] == "recommended", rec["message"]
    assert rec["accept_rel"]["lo"] >= TARGET
    for g in report["tag_groups"]:
        share = rec["routes_by_group"][g["name"]]
        want = SMALL if topic_of(g) == "writing" else BIG
        assert share[want] == 1.0, (g["name"], share)


def test_the_estimated_saving_covers_the_true_saving(
    day: tuple[Path, World, TagDecider], report: dict[str, Any],
) -> None:
    d, world, dec = day
    rec = report["recommendation"]
    at = dec.with_theta(rec["theta"])
    rows = logged(d)
    routed = [at.decide(r["tags"]).model for r in rows]
    cost = sum(true_cost(m, r["id"]) for m, r in zip(routed, rows, strict=True))
    saving = 1 - cost / sum(true_cost(BIG, r["id"]) for r in rows)
    assert rec["saving"]["lo"] <= saving <= rec["saving"]["hi"], (saving, rec["saving"])
    accepted = np.mean([m == BIG or world.outcome[r["id"]] != "loss"
                        for m, r in zip(routed, rows, strict=True)])
    assert rec["accept_rel"]["lo"] <= accepted <= rec["accept_rel"]["hi"]


def test_the_curve_re_decides_like_the_core(
    day: tuple[Path, World, TagDecider], report: dict[str, Any],
) -> None:
    d, _, dec = day
    rows = logged(d)
    thetas = [p["theta"] for p in report["curve"]]
    cols = dec.decide_batch([r["tags"] for r in rows])
    m = len(dec.models)
    found = sweep_theta(cols, np.ones((len(rows), m), dtype=bool), np.ones(m),
                        dec.models.index(BIG), grid=thetas)
    got = [p["share"][BIG]["est"] for p in report["curve"]]
    assert got == pytest.approx(found.llm_shares.tolist(), abs=1e-6)
    # Cheaper as theta falls, and all-default at the top costs exactly the default's.
    costs = [p["cost_rel"]["est"] for p in report["curve"]]
    assert costs == sorted(costs) and costs[-1] == 1.0
    assert report["curve"][-1]["accept_rel"] == {"est": 1.0, "lo": 1.0, "hi": 1.0}


def test_spend_and_mode_history(day: tuple[Path, World, TagDecider],
                                report: dict[str, Any]) -> None:
    spent = sum(ln.payload["usd"] for ln in journal.scan(day[0] / SPEND_FILE) if ln.payload)
    s = report["spend"]
    assert s["cap_usd_per_day"] == 50.0 and len(s["days"]) == 1
    assert s["total_usd"] == pytest.approx(spent, abs=1e-5)
    assert s["days"][0]["judge_usd"] > 0 and s["days"][0]["cap_used"] < 1
    (mode,) = report["mode_history"]
    assert (mode["mode"], mode["default"], mode["theta"]) == ("shadow", BIG, 0.0)


def test_the_same_state_dir_gives_byte_identical_json(
    day: tuple[Path, World, TagDecider], report: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = day[0]
    again = build_report(d, target=TARGET)
    dump = json.dumps(report, sort_keys=True, indent=2, allow_nan=False)
    assert json.dumps(again, sort_keys=True, indent=2, allow_nan=False) == dump
    assert main(["report", "--state", str(d), "--target", str(TARGET), "--json"]) == 0
    assert capsys.readouterr().out == dump + "\n"
    assert main(["report", "--state", str(d), "--target", str(TARGET)]) == 0
    out = capsys.readouterr().out
    assert "recommendation: theta" in out and "winner small" in out


def test_cli_names_a_missing_state_dir(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--state", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tagrouter: error:") and "nope" in err and "\n" not in err


def test_damaged_lines_are_counted_not_read(day: tuple[Path, World, TagDecider],
                                            tmp_path: Path) -> None:
    d = tmp_path / "copy"
    shutil.copytree(day[0], d)
    data = bytearray((d / PAIRS_FILE).read_bytes())
    data[20] ^= 1  # inside the first line's JSON: its checksum no longer matches
    (d / PAIRS_FILE).write_bytes(bytes(data))
    r = build_report(d, target=TARGET, n_boot=20)
    assert r["inputs"]["files"][PAIRS_FILE]["damaged"] == 1
    assert r["traffic"]["pairs"] == len(journal.scan(d / PAIRS_FILE)) - 1


def test_an_empty_state_dir(tmp_path: Path) -> None:
    r = build_report(tmp_path)
    assert set(r) == TOP_KEYS and r["recommendation"]["status"] == "no_data"
    assert r["curve"] == [] and r["traffic"]["decisions"] == 0
    json.dumps(r, allow_nan=False)


def test_a_short_day_is_not_enough_evidence(tmp_path: Path) -> None:
    run_day(tmp_path, 150, seed=3, sample=0.2)
    rec = build_report(tmp_path, target=TARGET)["recommendation"]
    assert rec["status"] == "not_enough_evidence", rec
    assert rec["more_pairs_needed"] > 0
    assert rec["message"] == (f"not enough evidence yet: about {rec['more_pairs_needed']} more "
                              "judged pairs needed")


def test_a_small_model_that_always_loses_keeps_the_default(tmp_path: Path) -> None:
    class Worse(World):
        async def judge(self, query: str, a: str, b: str) -> str:
            return "loss" if a.startswith(SMALL) else "win"

    run_day(tmp_path, 600, seed=4, world=Worse())
    rec = build_report(tmp_path, target=TARGET)["recommendation"]
    assert rec["status"] == "keep_default", rec


@pytest.mark.parametrize("kw, match", [
    ({"target": 1.0}, "target"), ({"target": 0}, "target"), ({"n_boot": 5}, "n_boot"),
    ({"thetas": [float("nan")]}, "thetas"), ({"thetas": []}, "thetas"),
])
def test_bad_arguments(tmp_path: Path, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_report(tmp_path, **kw)


def test_explicit_thetas(day: tuple[Path, World, TagDecider]) -> None:
    r = build_report(day[0], target=TARGET, thetas=[5.0, -5.0, 0.0], n_boot=20)
    assert [p["theta"] for p in r["curve"]] == [-5.0, 0.0, 5.0]
    assert r["curve"][0]["share"][SMALL]["est"] == 1.0


# ==== Tag groups ====


def test_tag_groups_fold_the_rest_into_other() -> None:
    lists = [[f"t{i}a", f"t{i}b"] for i in range(12) for _ in range(12 - i)] + [["lonely"]]
    g = group_tags(lists, max_groups=4)
    assert len(g.names) == 3  # and "other" for the rest
    assert g.names == ["t0a / t0b", "t1a / t1b", "t2a / t2b"]
    assert g.assign(["t11a"]) == -1 and g.assign(["lonely"]) == -1
    assert group_tags(list(reversed(lists)), max_groups=4) == g  # order of requests: no matter
    assert OTHER == "other"


def test_tag_groups_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_groups"):
        group_tags([["a"]], max_groups=1)
