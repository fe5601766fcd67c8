"""Per-key budgets that follow the routed model (policy.key_budgets, policy.spending): charges
at the backend that answered (fallbacks included), estimates flagged, cheaper candidates first
then 429, budgets that survive a restart and that two replicas share through Redis."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from skip_policy import import_extra

import_extra("serve", "starlette")

import httpx  # noqa: E402
from serve_helpers import (  # noqa: E402
    MATH,
    OPEN_AUTH,
    POEM,
    Fake,
    RunningGateway,
    fake_backends,
    gateway_config,
    running_gateway,
    wait_for,
)

from tagrouter_fast import journal  # noqa: E402
from tagrouter_fast.demo.router import demo_router  # noqa: E402
from tagrouter_fast.serve.config import Config, ConfigError  # noqa: E402
from tagrouter_fast.serve.edge.app import create_app  # noqa: E402
from tagrouter_fast.serve.edge.openai_usage import StreamMeter  # noqa: E402
from tagrouter_fast.serve.learn.keys import new_key  # noqa: E402
from tagrouter_fast.serve.policy.key_budgets import BudgetBook, BudgetsConfig  # noqa: E402

SMALL = {"input_per_1k": 0.001, "output_per_1k": 0.002}
BIG = {"input_per_1k": 0.01, "output_per_1k": 0.03}
PRICED = {"small": {"price": SMALL}, "big": {"price": BIG}}
SECRET_ENV = "TR_TEST_BUDGET_SECRET"


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Fake]]:
    with fake_backends("small", "big") as f:
        yield f


def config(fakes: dict[str, Fake], state_dir: Path, budgets: dict[str, Any] | None = None,
           **sections: Any) -> Config:
    if budgets is not None:
        sections["budgets"] = {"state_dir": str(state_dir), **budgets}
    sections.setdefault("fallback", {"order": ["small", "big"]})
    return gateway_config({n: f.url for n, f in fakes.items()}, backend_overrides=PRICED,
                          **sections)


def chat(g: RunningGateway, query: str, model: str = "tagrouter", **kw: Any) -> httpx.Response:
    return httpx.post(g.url + "/v1/chat/completions", timeout=10.0, json={
        "model": model, "messages": [{"role": "user", "content": query}], **kw})


def usd(price: dict[str, float], usage: dict[str, int]) -> float:
    return (usage["prompt_tokens"] * price["input_per_1k"]
            + usage["completion_tokens"] * price["output_per_1k"]) / 1000


def metric(g: RunningGateway, line_start: str) -> float:
    text = httpx.get(g.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line {line_start!r}")


# ==== Charging ====


def test_charged_at_the_model_that_answered_after_a_fallback(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    with running_gateway(config(fakes, tmp_path, {"default": {"usd_per_day": 100.0}})) as g:
        r = chat(g, MATH)
        assert r.status_code == 200 and r.headers["x-tagrouter-model"] == "big"
        cost_big = usd(BIG, r.json()["usage"])
        assert float(r.headers["x-tagrouter-cost-usd"]) == pytest.approx(cost_big, abs=1e-8)
        assert "x-tagrouter-cost-estimated" not in r.headers

        fakes["big"].backend.command(mode="error", status=503)
        r = chat(g, MATH)  # routed to big, answered by small: charged at small's price
        assert r.status_code == 200, r.text
        assert r.headers["x-tagrouter-reason"] == "failover"
        assert r.headers["x-tagrouter-model"] == "small"
        cost_small = usd(SMALL, r.json()["usage"])
        assert float(r.headers["x-tagrouter-cost-usd"]) == pytest.approx(cost_small, abs=1e-8)

        assert g.gw.spending.book is not None
        spent_usd, spent_tokens = g.gw.spending.book.spent("anonymous", "day")
        assert spent_usd == pytest.approx(cost_big + cost_small)
        assert metric(g, 'tagrouter_cost_usd_total{key="anonymous",model="small"}') == \
            pytest.approx(cost_small)
        assert metric(g, 'tagrouter_cost_usd_total{key="anonymous",model="big"}') == \
            pytest.approx(cost_big)


def test_a_stream_without_usage_is_estimated_and_flagged(
    fakes: dict[str, Fake], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tagrouter.access")
    with running_gateway(config(fakes, tmp_path, {"default": {"tokens_per_day": 10_000}})) as g:
        with httpx.stream("POST", g.url + "/v1/chat/completions", timeout=10.0, json={
            "model": "tagrouter", "stream": True,
            "messages": [{"role": "user", "content": POEM}],
        }) as r:
            assert r.status_code == 200 and r.headers["x-tagrouter-model"] == "small"
            raw = r.read()
        # The gateway asked for usage upstream; the client, who did not, gets no usage field.
        assert fakes["small"].state.bodies[-1]["stream_options"] == {"include_usage": True}
        assert b"usage" not in raw
        text = "".join(
            json.loads(line[5:])["choices"][0]["delta"].get("content", "")
            for line in raw.split(b"\n") if line.startswith(b"data: {")
        )
        assert text  # the fake streamed its answer
        want = math.ceil(len(POEM) / 4) + math.ceil(len(text) / 4)
        assert g.gw.spending.book is not None
        assert wait_for(lambda: g.gw.spending.book.spent("anonymous", "day")[1] == want)  # type: ignore[union-attr]
        assert metric(g, 'tagrouter_usage_estimated_total{key="anonymous",model="small"}') == 1
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tagrouter.access"]
    logged = [x for x in lines if x["path"] == "/v1/chat/completions"]
    assert logged[-1]["cost_estimated"] is True
    assert logged[-1]["cost_usd"] == pytest.approx(
        usd(SMALL, {"prompt_tokens": math.ceil(len(POEM) / 4),
                    "completion_tokens": math.ceil(len(text) / 4)}), abs=1e-8)


def test_stream_meter_gives_the_client_the_stream_it_asked_for() -> None:
    """With usage asked for by the gateway, the client's stream is the one it would have had
    without: ``"usage": null`` members cut out, the usage chunk dropped."""
    def chunk(content: str | None, usage: Any = None, with_usage: bool = True) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "choices": []}
        if content is not None:
            obj["choices"] = [{"index": 0, "delta": {"content": content}}]
        if with_usage:
            obj["usage"] = usage
        return obj

    def sse(objs: list[dict[str, Any]], sep: str = ", ") -> bytes:
        return b"".join(b"data: " + json.dumps(o, separators=(sep, ": ")).encode() + b"\n\n"
                        for o in objs) + b"data: [DONE]\n\n"

    usage = {"prompt_tokens": 7, "completion_tokens": 2}
    upstream = sse([chunk("Hel"), chunk("lo"), chunk(None, usage)])
    wanted = sse([chunk("Hel", with_usage=False), chunk("lo", with_usage=False)])
    m = StreamMeter(strip=True)
    # Fed one event at a time, as Forwarder.relay yields them.
    out = b"".join(m.feed(e + b"\n\n") for e in upstream.split(b"\n\n") if e)
    assert [e for e in out.split(b"\n\n") if e.strip()] == \
        [e for e in wanted.split(b"\n\n") if e.strip()]
    assert m.usage == usage and m.answer_chars == 5
    # The client asked for usage itself: its stream passes unchanged.
    keep = StreamMeter(strip=False)
    assert keep.feed(upstream) == upstream and keep.usage == usage


# ==== Over budget ====


def test_over_budget_goes_cheaper_then_429(fakes: dict[str, Fake], tmp_path: Path) -> None:
    # One answer of big (~0.00035 USD) takes the key past its limit, not past cheaper_until.
    budgets = {"over_budget": "cheaper", "cheaper_until": 2.0,
               "default": {"usd_per_day": 0.0003}}
    with running_gateway(config(fakes, tmp_path, budgets)) as g:
        book = g.gw.spending.book
        assert book is not None
        r = chat(g, MATH)
        assert r.headers["x-tagrouter-model"] == "big"  # under budget: routed as usual
        assert 0.0003 < book.spent("anonymous", "day")[0] < 0.0006

        # Over: a routed request goes to a candidate cheaper than the one it was routed to.
        r = chat(g, MATH)
        assert r.status_code == 200, r.text
        assert r.headers["x-tagrouter-model"] == "small"
        assert r.headers["x-tagrouter-reason"] == "over_budget"
        assert float(r.headers["x-tagrouter-cost-usd"]) == \
            pytest.approx(usd(SMALL, r.json()["usage"]), abs=1e-8)

        # Routed to the cheapest already: nothing cheaper, 429 in OpenAI's error shape.
        r = chat(g, POEM)
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["type"] == "insufficient_quota" and err["code"] == "budget_exceeded"
        assert "over its budget" in err["message"] and "cheaper than 'small'" in err["message"]
        assert 0 < int(r.headers["retry-after"]) <= 86400
        # A request naming its model cannot be moved: 429.
        assert chat(g, MATH, model="big").status_code == 429

        # Cheaper answers until cheaper_until times the budget, then 429 for every request.
        for _ in range(200):
            before = book.spent("anonymous", "day")[0]
            r = chat(g, MATH)
            if r.status_code == 429:
                break
            assert r.headers["x-tagrouter-model"] == "small"
        assert r.status_code == 429, "never refused"
        assert before >= 2.0 * 0.0003
        assert "refused until the period ends" in r.json()["error"]["message"]
        assert metric(g, 'tagrouter_rejected_total{reason="budget"}') >= 3


def test_reject_mode_refuses_a_key_at_its_limit_through_the_sdk(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    openai = import_extra("serve", "openai")
    secret, key = new_key("app1", ["route"])
    _, other = new_key("app2", ["route"])
    auth = {"keys": [json.loads(key.line()), json.loads(other.line())]}
    budgets = {"over_budget": "reject", "keys": {"app1": {"tokens_per_day": 1}}}
    with running_gateway(config(fakes, tmp_path, budgets, auth=auth)) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=secret, max_retries=0)
        msgs = [{"role": "user", "content": POEM}]
        first = client.chat.completions.create(model="tagrouter", messages=msgs)
        assert first.choices[0].message.content
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="tagrouter", messages=msgs)
        assert "app1" in str(e.value) and "tokens this UTC day" in str(e.value)


# ==== Restart and replicas ====


def test_a_budget_survives_a_restart(fakes: dict[str, Fake], tmp_path: Path) -> None:
    budgets = {"over_budget": "reject", "default": {"usd_per_month": 0.0001}}
    cfg = config(fakes, tmp_path, budgets)
    with running_gateway(cfg) as g:
        assert chat(g, MATH).status_code == 200
        assert chat(g, MATH).status_code == 429
        assert g.gw.spending.book is not None
        spent = g.gw.spending.book.spent("anonymous", "month")
    journals = list(tmp_path.glob("budgets-*.jsonl"))
    assert len(journals) == 1
    with running_gateway(cfg) as g:
        assert g.gw.spending.book is not None
        assert g.gw.spending.book.spent("anonymous", "month") == pytest.approx(spent)
        assert chat(g, MATH).status_code == 429


def test_budget_book_rolls_days_and_months_and_skips_damage(tmp_path: Path) -> None:
    now = [1_700_000_000.0]  # 2023-11-14 UTC
    cfg = BudgetsConfig.from_dict({"default": {"usd_per_day": 1.0, "usd_per_month": 2.0}},
                                  tmp_path, tmp_path, ())
    book = BudgetBook(cfg, clock=lambda: now[0])
    book.charge("k", "big", 0.6, 10, 5, False)
    assert book.status("k").level == "ok"
    book.charge("k", "big", 0.6, 10, 5, False)
    st = book.status("k")
    assert st.level == "over" and "1.2000 of 1.0000 USD this UTC day" in st.message
    now[0] += 86400  # the next day: the day starts over, the month does not
    assert book.spent("k", "day") == (0.0, 0.0)
    assert book.spent("k", "month") == pytest.approx((1.2, 30))
    book.charge("k", "small", 1.0, 1, 1, True)
    assert book.status("k").level == "over"  # 2.2 of 2.0 this month
    book.close()
    # A damaged line is skipped and counted, never read as a charge.
    path = next(tmp_path.glob("budgets-*.jsonl"))
    with path.open("ab") as f:
        f.write(b"deadbeef {\"key\": \"k\", \"usd\": 99}\n")
    again = BudgetBook(cfg, clock=lambda: now[0])
    assert again.damaged == 1
    assert again.spent("k", "month")[0] == pytest.approx(2.2)
    now[0] += 31 * 86400  # the next month: a new journal, nothing spent
    assert again.spent("k", "month") == (0.0, 0.0)
    again.charge("k", "small", 0.1, 1, 1, False)
    again.close()
    assert len(list(tmp_path.glob("budgets-*.jsonl"))) == 2
    assert all(line.payload is not None for line in journal.scan(path)[:3])


def test_two_replicas_share_one_budget_through_redis(
    fakes: dict[str, Fake], tmp_path: Path, redis_srv: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "replicas-share-this-decision-secret-0123456789")
    budgets = {"over_budget": "reject", "default": {"usd_per_day": 0.0001}}

    def replica(name: str) -> Config:
        d = tmp_path / name
        return config(fakes, d, budgets, feedback={"state_dir": str(d)},
                      shared={"redis_url": redis_srv.url, "key_prefix": "bt"},
                      auth={**OPEN_AUTH, "decision_secret_env": SECRET_ENV})

    with ExitStack() as stack:
        a, b = (stack.enter_context(running_gateway(replica(n))) for n in ("a", "b"))
        assert chat(b, POEM).status_code == 200  # b checks the key: it follows its totals
        r = chat(a, MATH)
        assert r.status_code == 200 and r.headers["x-tagrouter-model"] == "big"
        book_b = b.gw.spending.book
        assert book_b is not None
        # a's charge reaches b through Redis: b refuses the key without having charged it.
        assert wait_for(lambda: book_b.spent("anonymous", "day")[0] > 0.0001, timeout_s=5)
        assert chat(b, POEM).status_code == 429

        import redis

        red: Any = redis.Redis.from_url(redis_srv.url)
        try:
            keys = [k.decode() for k in red.keys("bt:budget:anonymous:*")]
            assert sorted(k.split(":")[3] for k in keys) == ["d", "m"]
            day = next(k for k in keys if ":d:" in k)
            assert float(red.hget(day, "usd")) == pytest.approx(
                book_b.spent("anonymous", "day")[0])
        finally:
            red.close()


# ==== Config ====


def test_budget_config_errors_name_the_key(fakes: dict[str, Fake], tmp_path: Path) -> None:
    urls = {n: f.url for n, f in fakes.items()}
    usd_budget = {"state_dir": str(tmp_path), "default": {"usd_per_day": 1.0}}
    with pytest.raises(ConfigError, match=r"backends\[1\]\.price: missing"):
        gateway_config(urls, backend_overrides={"small": {"price": SMALL}}, budgets=usd_budget)
    with pytest.raises(ConfigError, match=r"budgets\.state_dir: missing"):
        gateway_config(urls, budgets={"default": {"tokens_per_day": 5}})
    with pytest.raises(ConfigError, match=r"budgets\.over_budget"):
        gateway_config(urls, budgets={**usd_budget, "over_budget": "cheap"},
                       backend_overrides=PRICED)
    with pytest.raises(ConfigError, match=r"budgets\.keys\.app1\.usd_per_dya: unknown key"):
        gateway_config(urls, budgets={"state_dir": str(tmp_path),
                                      "keys": {"app1": {"usd_per_dya": 1}}})
    with pytest.raises(ConfigError, match=r"backends\[0\]\.price"):
        gateway_config(urls, backend_overrides={"small": {"price": {"input_per_1k": 1}}})
    # A budget for a key id no client key has would leave the real key unlimited.
    cfg = gateway_config(urls, backend_overrides=PRICED,
                         budgets={"state_dir": str(tmp_path), "keys": {"typo": {"usd_per_day": 1}}})
    with pytest.raises(ConfigError, match=r"budgets\.keys\.typo: no client key"):
        create_app(cfg, router=demo_router("keyword"))
