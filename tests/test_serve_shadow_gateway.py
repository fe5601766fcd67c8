"""Shadow mode in the gateway, through real HTTP: fake backends whose quality depends on the
topic and a deterministic fake judge (`tagrouter_fast.demo.shadow_world`), gateways under uvicorn
on loopback (tests/serve_helpers.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_helpers import (  # noqa: E402
    cli_gateway,
    dead_url,
    gateway_config,
    running_gateway,
    wait_for,
)

from tagrouter_fast.demo.router import demo_router  # noqa: E402
from tagrouter_fast.demo.servers import ServerThread  # noqa: E402
from tagrouter_fast.demo.shadow_world import (  # noqa: E402
    PRICES,
    FakeJudge,
    QualityBackend,
    demo_queries,
    shadow_table,
    topic_of,
    true_outcome,
    usage_of,
)
from tagrouter_fast.serve.config import Config, ConfigError  # noqa: E402
from tagrouter_fast.serve.shadow.records import load  # noqa: E402
from tagrouter_fast.serve.shadow.report import build_report  # noqa: E402

TOKEN = "shadow-admin-secret"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@dataclass
class World:
    small: QualityBackend
    big: QualityBackend
    judge: FakeJudge
    urls: dict[str, str]
    judge_url: str

    def reset(self) -> None:
        for x in (self.small, self.big, self.judge):
            x.status, x.delay_s, x.requests = 200, 0.0, 0


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    small, big, judge = QualityBackend("small"), QualityBackend("big"), FakeJudge("big")
    servers = [ServerThread(x.app, log_level="critical", lifespan="off").start()
               for x in (small, big, judge)]
    try:
        yield World(small, big, judge, {"small": servers[0].url, "big": servers[1].url},
                    servers[2].url + "/v1")
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def w(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    world.reset()
    monkeypatch.setenv("TR_SHADOW_ADMIN", TOKEN)
    return world


def config(w: World, state: Path, **shadow: Any) -> Config:
    settings = {"sample": 1.0, "explore": 0.0, "seed": 3, "timeout_s": 5.0, **shadow}
    return gateway_config(
        w.urls, feedback={"state_dir": str(state), "fsync": False},
        admin={"token_env": "TR_SHADOW_ADMIN"},
        shadow=shadow_table(settings.pop("judge_url", w.judge_url), **settings))


def chat(client: Any, url: str, q: str, model: str = "tagrouter") -> Any:
    r = client.post(url + "/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": q}]})
    assert r.status_code == 200, r.text
    return r


def settle(gw: Any, state: Path, decisions: int, timeout_s: float = 30.0) -> None:
    """Until ``decisions`` are recorded and no shadow call or judgment is in flight."""
    runner = gw.shadow.runner

    def done() -> bool:
        return (len(load(state).decisions) >= decisions
                and runner.stats()["in_flight"] == 0)

    assert wait_for(done, timeout_s=timeout_s), (len(load(state).decisions), runner.stats())


def cost(model: str, q: str) -> float:
    u = usage_of(model, q)
    p_in, p_out = PRICES[model]
    return (u["prompt_tokens"] * p_in + u["completion_tokens"] * p_out) / 1000


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {line_start} in /metrics")


# ==== Config ====


def test_shadow_config_is_checked(w: World, tmp_path: Path) -> None:
    table = shadow_table(w.judge_url)
    with pytest.raises(ConfigError, match="shadow.default_model: 'huge' is not a backend"):
        gateway_config(w.urls, feedback={"state_dir": str(tmp_path)},
                       shadow={**table, "default_model": "huge",
                               "prices": {**table["prices"], "huge": table["prices"]["big"]}})
    with pytest.raises(ConfigError, match=r"shadow: needs \[feedback\] state_dir"):
        gateway_config(w.urls, shadow=table)
    with pytest.raises(ConfigError, match="shadow.sampel: unknown key"):
        gateway_config(w.urls, feedback={"state_dir": str(tmp_path)},
                       shadow={**table, "sampel": 0.5})
    cfg = config(w, tmp_path, mode="ab", ab_share=0.25)
    assert cfg.shadow is not None and (cfg.shadow.mode, cfg.shadow.ab_share) == ("ab", 0.25)


# ==== The client's answer ====


def test_shadow_answer_is_byte_identical_to_a_direct_call(w: World, tmp_path: Path) -> None:
    queries = ["Write a short poem about the sea", "Solve the equation 3x + 4 = 6",
               "Write a Python function that sorts a list"]
    with running_gateway(config(w, tmp_path)) as g, httpx.Client(timeout=10) as c:
        for q in queries:
            routed = chat(c, g.url, q)
            through = chat(c, g.url, q, model="big")  # passthrough to the default
            direct = c.post(w.urls["big"] + "/v1/chat/completions", json={
                "model": "big-model", "messages": [{"role": "user", "content": q}]})
            assert routed.content == through.content == direct.content
            assert routed.headers["x-tagrouter-model"] == "big"
            assert routed.headers["x-tagrouter-reason"] == "shadow"
        settle(g.gw, tmp_path, len(queries))
        # The router still decided: the poem went to small in the background, and was judged.
        assert w.small.requests == 1
        recs = load(tmp_path)
        assert [d["routed"] for d in recs.decisions] == ["small", "big", "big"]
        assert [d["served"] for d in recs.decisions] == ["big"] * 3
        assert [(p["candidate"], p["outcome"]) for p in recs.pairs] == [
            ("small", true_outcome(queries[0]))]
        assert g.gw.learner is not None and g.gw.learner.version == 1  # learned once


def test_streamed_answers_are_relayed_unchanged_and_judged(w: World, tmp_path: Path) -> None:
    # Coding agents stream: in shadow mode a streamed request is answered by the default as a
    # direct stream would be, and its relayed text is what the judge compares.
    poem = "Write a short poem about the rain"
    body = {"messages": [{"role": "user", "content": poem}], "stream": True}
    with running_gateway(config(w, tmp_path)) as g, httpx.Client(timeout=10) as c:
        routed = c.post(g.url + "/v1/chat/completions", json={**body, "model": "tagrouter"})
        direct = c.post(w.urls["big"] + "/v1/chat/completions", json={**body, "model": "big-model"})
        assert routed.status_code == 200 and routed.headers["x-tagrouter-reason"] == "shadow"
        assert routed.content == direct.content  # byte for byte, [DONE] included
        settle(g.gw, tmp_path, 1)
        recs = load(tmp_path)
        assert [d["served"] for d in recs.decisions] == ["big"]
        # The poem went to small in the background and was judged against the streamed answer.
        assert [(p["candidate"], p["outcome"]) for p in recs.pairs] == [
            ("small", true_outcome(poem))]
        assert w.judge.requests == 2  # both orders


def test_stream_meter_collects_text_and_knows_a_finished_stream() -> None:
    from tagrouter_fast.serve.edge.openai_usage import StreamMeter

    def event(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    meter = StreamMeter(strip=False, collect=True)
    blocks = [event({"choices": [{"index": 0, "delta": {"content": "Rain "}}]}),
              event({"choices": [{"index": 1, "delta": {"content": "other choice"}},
                                 {"index": 0, "delta": {"content": "falls"}}]}),
              event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})]
    assert [meter.feed(b) for b in blocks] == blocks  # nothing stripped: the client's bytes
    assert meter.text == "Rain falls" and not meter.done  # cut short: not judged
    meter.feed(b"data: [DONE]\n\n")
    assert meter.done and meter.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert StreamMeter(strip=False).text is None  # collects only when asked


# ==== A scripted day: the report against the truth ====


def _group_topic(tags: list[str]) -> str:
    return topic_of(" ".join(tags).replace("Text Rewriting", "rewrite")
                    .replace("Poetry Writing", "poem").replace("Algebra", "equation")
                    .replace("Programming", "function"))


@pytest.mark.slow
def test_scripted_day_report_and_true_saving(w: World, tmp_path: Path) -> None:
    queries = demo_queries(240, seed=5)
    shadow_dir, route_dir = tmp_path / "shadow", tmp_path / "route"
    served_cost = {"shadow": 0.0, "route": 0.0}
    for mode, state in (("shadow", shadow_dir), ("route", route_dir)):
        cfg = config(w, state, mode=mode, sample=0.6, explore=0.5)
        with running_gateway(cfg) as g, httpx.Client(timeout=10) as c:
            for q in queries:
                r = chat(c, g.url, q)
                served_cost[mode] += cost(r.headers["x-tagrouter-model"], q)
            settle(g.gw, state, len(queries))
            if mode == "shadow":
                report = c.get(g.url + "/admin/report", params={"target": 0.9},
                               headers=ADMIN).json()
                theta = g.gw.router.decider.theta
    assert report["traffic"]["decisions"] == len(queries)
    assert report["traffic"]["not_yet_learned"] == 0
    # The winner per tag group: small on writing, the default (big) on maths and code; and
    # small's win-rate interval in each group covers the truth of that group's whole traffic
    # (judged or not; 0.05 of slack: a percentile bootstrap over 10 to 60 pairs runs narrow).
    router = demo_router("keyword")
    seen = set()
    for group in report["tag_groups"]:
        if not group["judged"]:
            continue
        topic = _group_topic(group["tags"])
        seen.add(topic)
        assert group["winner"] == ("small" if topic == "writing" else "big"), group
        mine = [q for q in queries if set(router.tags(q)) <= set(group["tags"])]
        truth = sum(true_outcome(q) == "win" for q in mine) / len(mine)
        wr = group["models"]["small"]["win_rate"]
        assert wr["lo"] - 0.05 <= truth <= wr["hi"] + 0.05, (group["name"], truth, wr)
    assert seen == {"writing", "maths", "code"}
    rec = report["recommendation"]
    assert rec["status"] == "recommended", rec
    for name, shares in rec["routes_by_group"].items():
        group = next(g for g in report["tag_groups"] if g["name"] == name)
        best = max(shares, key=lambda m: shares[m] or 0.0)
        assert best == ("small" if _group_topic(group["tags"]) == "writing" else "big"), shares
    # The estimated saving at the gateway's theta against the true saving of routing the same
    # traffic live: every shadow-mode answer came from the default.
    assert served_cost["shadow"] == pytest.approx(sum(cost("big", q) for q in queries))
    true_saving = 1 - served_cost["route"] / served_cost["shadow"]
    point = build_report(shadow_dir, thetas=[theta], target=0.9)["curve"][0]
    saving = point["saving"]
    assert saving["lo"] <= true_saving <= saving["hi"], (true_saving, saving)
    # Reproducible offline: the same JSON as the endpoint's.
    assert build_report(shadow_dir, target=0.9) == report


# ==== Faults: the client never notices ====


FAULTS = {
    "shadow backend down": ({}, lambda w: setattr(w.small, "status", 503), "backend_errors"),
    "shadow backend slow": ({"timeout_s": 0.3}, lambda w: setattr(w.small, "delay_s", 1.5),
                            "backend_errors"),
    "judge down": ({"judge_url": dead_url() + "/v1"}, lambda w: None, "judge_errors"),
    "judge slow": ({"timeout_s": 0.3}, lambda w: setattr(w.judge, "delay_s", 1.5),
                   "judge_errors"),
    "judge errors": ({}, lambda w: setattr(w.judge, "status", 500), "judge_errors"),
    "over the spend cap": ({"daily_cap_usd": 0.0}, lambda w: None, "over_cap"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_shadow_faults_never_reach_the_client(w: World, tmp_path: Path, fault: str) -> None:
    settings, break_it, counter = FAULTS[fault]
    break_it(w)
    poems = [f"Write a short poem about the sea (#{i})" for i in range(4)]
    with running_gateway(config(w, tmp_path, **settings)) as g, httpx.Client(timeout=10) as c:
        for q in poems:
            t0 = time.perf_counter()
            r = chat(c, g.url, q)
            assert time.perf_counter() - t0 < 1.0  # never waits for the shadow call
            assert json.loads(r.content)["choices"][0]["message"]["content"] == f"[big] {q}"
        settle(g.gw, tmp_path, len(poems))
        text = c.get(g.url + "/metrics").text
        assert metric(text, f'tagrouter_shadow_events_total{{event="{counter}"}}') == len(poems)
        assert metric(text, 'tagrouter_shadow_events_total{event="judged"}') == 0
        assert metric(text, 'tagrouter_shadow_events_total{event="learned"}') == 0
        assert g.gw.learner is not None and g.gw.learner.version == 0
    recs = load(tmp_path)
    # Recorded whole or not at all: every decision, no pair, no learned mark, no judge charge.
    assert len(recs.decisions) == len(poems) and not recs.pairs and not recs.learned
    assert all(s["kind"] == "shadow" for s in recs.spend)
    assert all(v["damaged"] == v["invalid"] == 0 for v in recs.files.values())


# ==== The mode switch ====


def test_mode_switch_takes_effect_at_once_and_survives_a_restart(w: World,
                                                                 tmp_path: Path) -> None:
    cfg = config(w, tmp_path)
    poem = "Write a short poem about the moon"
    with running_gateway(cfg) as g, httpx.Client(timeout=10) as c:
        assert c.post(g.url + "/admin/mode", json={"mode": "route"}).status_code == 401
        r = c.post(g.url + "/admin/mode", json={"mode": "ab"}, headers=ADMIN)
        assert r.status_code == 400 and "ab_share" in r.text  # ab needs a share
        r = c.post(g.url + "/admin/mode", json={"mode": "shadow", "share": 0.5}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "share"
        assert chat(c, g.url, poem).headers["x-tagrouter-model"] == "big"
        r = c.post(g.url + "/admin/mode", json={"mode": "route", "theta": 0.25}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["mode"] == "route"
        assert r.json()["theta"] == 0.25
        assert chat(c, g.url, poem).headers["x-tagrouter-model"] == "small"
        settle(g.gw, tmp_path, 2)
    with running_gateway(cfg) as g, httpx.Client(timeout=10) as c:
        t = c.get(g.url + "/admin/traffic", headers=ADMIN).json()
        assert (t["mode"], t["theta"]) == ("route", 0.25)
        assert chat(c, g.url, poem).headers["x-tagrouter-model"] == "small"
        history = c.get(g.url + "/admin/report", headers=ADMIN).json()["mode_history"]
    # start (shadow), the switch (route at 0.25), the restart (route at 0.25), each timed.
    assert [(h["mode"], h["theta"]) for h in history] == [
        ("shadow", 0.0), ("route", 0.25), ("route", 0.25)]
    assert history[0]["t"] <= history[1]["t"] <= history[2]["t"]
    # An edited config (another initial mode) wins over a switch made under the old one.
    edited = config(w, tmp_path, mode="ab", ab_share=0.5)
    with running_gateway(edited) as g, httpx.Client(timeout=10) as c:
        t = c.get(g.url + "/admin/traffic", headers=ADMIN).json()
        assert (t["mode"], t["share"]) == ("ab", 0.5)
        # ab: a share routed live (small, the router's choice), the rest served by the default.
        got = {(r.headers["x-tagrouter-model"], r.headers["x-tagrouter-reason"])
               for r in (chat(c, g.url, f"{poem} (#{i})") for i in range(24))}
        assert {m for m, _ in got} == {"small", "big"}
        assert ("big", "ab_default") in got


# ==== Endpoints ====


def test_admin_endpoints_need_the_token_and_the_page_holds_no_data(w: World,
                                                                    tmp_path: Path) -> None:
    with running_gateway(config(w, tmp_path)) as g, httpx.Client(timeout=10) as c:
        chat(c, g.url, "Solve the equation 2x + 1 = 5")
        settle(g.gw, tmp_path, 1)
        for path in ("/admin/report", "/admin/traffic"):
            assert c.get(g.url + path).status_code == 401
            assert c.get(g.url + path, headers={"authorization": "Bearer nope"}).status_code \
                == 401
        page = c.get(g.url + "/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert b"/admin/report" in page.content and b"Solve" not in page.content
        t = c.get(g.url + "/admin/traffic", headers=ADMIN).json()
        assert t["mode"] == "shadow" and t["decisions"] == [
            {"model": "big", "reason": "shadow", "count": 1}]
        assert c.get(g.url + "/admin/report", params={"target": 2},
                     headers=ADMIN).status_code == 400
        text = c.get(g.url + "/metrics").text
        assert metric(text, 'tagrouter_shadow_mode{mode="shadow"}') == 1
        assert metric(text, 'tagrouter_shadow_mode{mode="route"}') == 0


# ==== The one-command demo ====


@pytest.mark.slow
def test_demo_shadow_runs_the_whole_loop(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("TAGROUTER_ADMIN_TOKEN", TOKEN)
    with cli_gateway("--demo", "--shadow", "--demo-tagger", "keyword", "--state-dir",
                     str(tmp_path)) as g:
        def judged() -> bool:
            r = httpx.get(g.url + "/admin/traffic", headers=ADMIN, timeout=5)
            return r.status_code == 200 and sum(d["count"] for d in r.json()["decisions"]) >= 8
        assert wait_for(judged, timeout_s=60, interval_s=0.5)
        assert httpx.get(g.url + "/dashboard", timeout=5).status_code == 200
    recs = load(tmp_path)
    assert len(recs.decisions) >= 8 and recs.pairs and recs.learned
    report = build_report(tmp_path)
    assert report["traffic"]["pairs"] == len(recs.pairs) and report["spend"]["days"]


def test_demo_router_agrees_with_the_world() -> None:
    router = demo_router("keyword")
    for q in demo_queries(40):
        assert router.route(q) == ("small" if topic_of(q) == "writing" else "big"), q
