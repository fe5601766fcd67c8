"""The dashboard (GET /dashboard) in a real browser: Debian's chromium driven by Playwright (no
browser download), against a gateway in shadow mode that has judged a scripted morning.

Without chromium the test skips (an OS package, not ours to install) except under CI
(``TAGROUTER_REQUIRE_SERVERS=1``, .ci/run installs it), where it fails; Playwright is in the
``test`` extra, so its absence always fails (tests/skip_policy.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from serve_helpers import gateway_config, wait_for  # noqa: E402
from skip_policy import platform_lacks  # noqa: E402

from tagrouter_fast.demo.router import demo_router  # noqa: E402
from tagrouter_fast.demo.servers import ServerThread  # noqa: E402
from tagrouter_fast.demo.shadow_world import (  # noqa: E402
    FakeJudge,
    QualityBackend,
    demo_queries,
    shadow_table,
)
from tagrouter_fast.serve.config import Config  # noqa: E402
from tagrouter_fast.serve.edge.app import create_app  # noqa: E402
from tagrouter_fast.serve.shadow.records import load  # noqa: E402

TOKEN, NEW_TOKEN = "dashboard-token-1", "dashboard-token-2"


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        why = platform_lacks("no chromium on PATH (apt-get install -y chromium; .ci/run "
                             "installs it)")
        if os.environ.get("TAGROUTER_REQUIRE_SERVERS"):
            pytest.fail(why + "; TAGROUTER_REQUIRE_SERVERS is set, so this is a failure")
        pytest.skip(why)
    return exe


@pytest.fixture
def backends() -> Iterator[tuple[dict[str, str], str]]:
    apps = [QualityBackend("small").app, QualityBackend("big").app, FakeJudge("big").app]
    servers = [ServerThread(a, log_level="critical", lifespan="off").start() for a in apps]
    try:
        yield {"small": servers[0].url, "big": servers[1].url}, servers[2].url + "/v1"
    finally:
        for s in servers:
            s.stop()


def gateway(cfg: Config, port: int = 0) -> ServerThread:
    app = create_app(cfg, router=demo_router("keyword"))
    srv = ServerThread(app, port=port, log_level="warning")
    srv.gw = app.state.gateway  # type: ignore[attr-defined]
    return srv.start()


def values(page: Any, selector: str, *attrs: str) -> list[tuple[str, ...]]:
    return [tuple(e.get_attribute(a) for a in attrs) for e in page.query_selector_all(selector)]


def num(v: Any) -> str:
    """A JSON number as the page's ``setAttribute`` writes it (JavaScript's String(x))."""
    if v is None:
        return "null"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def test_dashboard_renders_the_report_and_asks_again_for_a_refused_token(
    backends: tuple[dict[str, str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    exe = chromium()
    urls, judge_url = backends
    monkeypatch.setenv("TR_DASH_TOKEN", TOKEN)
    cfg = gateway_config(urls, feedback={"state_dir": str(tmp_path), "fsync": False},
                         admin={"token_env": "TR_DASH_TOKEN"},
                         shadow=shadow_table(judge_url, sample=1.0, explore=0.5, seed=1,
                                             daily_cap_usd=2.0))
    queries = demo_queries(60, seed=2)
    srv = gateway(cfg)
    port = srv.port
    try:
        with httpx.Client(timeout=10) as c:
            for q in queries:
                r = c.post(srv.url + "/v1/chat/completions", json={
                    "model": "tagrouter", "messages": [{"role": "user", "content": q}]})
                assert r.status_code == 200
            runner = srv.gw.shadow.runner  # type: ignore[attr-defined]
            assert wait_for(lambda: len(load(tmp_path).decisions) == len(queries)
                            and runner.stats()["in_flight"] == 0, timeout_s=30)
            admin = {"authorization": f"Bearer {TOKEN}"}
            report = c.get(srv.url + "/admin/report", headers=admin).json()
            traffic = c.get(srv.url + "/admin/traffic", headers=admin).json()
        assert report["curve"] and report["tag_groups"] and report["spend"]["days"]

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                        else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(srv.url + "/dashboard?refresh=400")
                page.wait_for_selector("#login:not(.hidden)")
                assert page.is_hidden("#app")
                page.fill("#token", TOKEN)
                page.click("button[type=submit]")
                page.wait_for_selector("circle.point")
                page.wait_for_selector("tr.group-row")
                assert page.is_hidden("#login") and errors == []

                curve = report["curve"]
                for series, key in (("accept", "accept_rel"), ("cost", "cost_rel")):
                    got = values(page, f"#curve circle.point[data-series={series}]",
                                 "data-x", "data-value")
                    assert got == [(num(pt["theta"]), num(pt[key]["est"])) for pt in curve]
                assert page.query_selector_all("#curve path.band")  # the interval band
                groups = [(g["name"], m, num(r["win_rate"]["est"]))
                          for g in report["tag_groups"] for m, r in g["models"].items()]
                assert values(page, "tr.group-row", "data-group", "data-model",
                              "data-value") == groups
                assert values(page, "tr.spend-row", "data-day", "data-value") == [
                    (d["day"], num(d["total_usd"])) for d in report["spend"]["days"]]
                assert page.get_attribute("#spend-cap", "data-value") == "2"
                assert values(page, "tr.traffic-row", "data-model", "data-reason",
                              "data-value") == [(d["model"], d["reason"], str(d["count"]))
                                                for d in traffic["decisions"]]
                progress = report["traffic"]["progress"]
                assert values(page, "#progress circle.point", "data-value") == [
                    (num(pt["pairs"]),) for pt in progress]
                rec = report["recommendation"]
                assert page.get_attribute("#rec-status", "data-status") == rec["status"]
                assert page.text_content("#mode") == "shadow"
                assert errors == []

                # The gateway restarts with another admin token: the page's next refresh is
                # refused and it shows the login form again.
                srv.stop()
                monkeypatch.setenv("TR_DASH_TOKEN", NEW_TOKEN)
                srv = gateway(cfg, port=port)
                page.wait_for_selector("#login:not(.hidden)", timeout=15_000)
                assert "refused" in (page.text_content("#login-error") or "")
                assert page.is_hidden("#app")
                page.fill("#token", NEW_TOKEN)
                page.click("button[type=submit]")
                page.wait_for_selector("#app:not(.hidden)")
                assert page.is_hidden("#login")
            finally:
                browser.close()
    finally:
        srv.stop()
