"""Shadow mode's runner: config, plans, background judging, faults, exactly-once learning."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from shadow_fakes import (
    BIG,
    JUDGE,
    PRICES,
    SMALL,
    T0,
    Sink,
    World,
    config,
    decider,
    one_request,
    scripted_day,
    usage,
)

from tagrouter_fast import journal
from tagrouter_fast.builder.judge import JudgeError
from tagrouter_fast.core import TagDecider, TagScorer
from tagrouter_fast.router import TagRouter
from tagrouter_fast.serve.config import ConfigError
from tagrouter_fast.serve.learn.outcomes import OutcomeStore, OutcomeStoreError
from tagrouter_fast.serve.shadow.judge import PairwiseJudge
from tagrouter_fast.serve.shadow.runner import (
    DECISIONS_FILE,
    LEARNED_FILE,
    PAIRS_FILE,
    SPEND_FILE,
    ShadowConfig,
    ShadowRunner,
)


def lines(d: Path, name: str) -> list[dict[str, Any]]:
    p = d / name
    return [ln.payload for ln in journal.scan(p) if ln.payload] if p.exists() else []


def runner(d: Path, world: World, sink: Sink | None, **kw: Any) -> ShadowRunner:
    now = kw.pop("now", None)
    clock = (lambda: now[0]) if now is not None else time.time
    return ShadowRunner(config(**kw), d, call_backend=world.call_backend, judge=world.judge,
                        sink=sink, clock=clock)


async def drain(r: ShadowRunner) -> None:
    for _ in range(2000):
        if not r.stats()["in_flight"]:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("shadow jobs still running")


def assert_once(d: Path, sink: Sink) -> None:
    """Every recorded pair was learned exactly once, and nothing else was."""
    pairs = [p["pair"] for p in lines(d, PAIRS_FILE)]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == set(sink.got)


# ==== Config ====


def test_config_from_toml_table() -> None:
    cfg = ShadowConfig.from_dict({
        "mode": "ab", "ab_share": 0.25, "default_model": BIG, "judge_url": "https://j/v1",
        "judge_model": JUDGE, "daily_cap_usd": 5, "max_concurrency": 3, "seed": 1,
        "prices": {m: {"input_per_1k": p.input_per_1k, "output_per_1k": p.output_per_1k}
                   for m, p in PRICES.items()}})
    assert (cfg.mode, cfg.ab_share, cfg.daily_cap_usd, cfg.max_concurrency) == ("ab", 0.25, 5, 3)
    assert cfg.prices[SMALL] == PRICES[SMALL]


@pytest.mark.parametrize("change, key", [
    ({"mode": "mirror"}, "shadow.mode"),
    ({"sample": 1.5}, "shadow.sample"),
    ({"explore": -0.1}, "shadow.explore"),
    ({"mode": "ab"}, "shadow.ab_share"),
    ({"ab_share": 0.5}, "shadow.ab_share"),
    ({"max_concurrency": 0}, "shadow.max_concurrency"),
    ({"daily_cap_usd": float("nan")}, "shadow.daily_cap_usd"),
    ({"timeout_s": 0}, "shadow.timeout_s"),
    ({"judge_url": "judge:80"}, "shadow.judge_url"),
    ({"prices": {BIG: {"input_per_1k": 1, "output_per_1k": 1}}}, "shadow.prices"),
    ({"prices": {BIG: {"input_per_1k": 1}}}, f"shadow.prices.{BIG}"),
    ({"prices": {BIG: {"input_per_1k": -1, "output_per_1k": 1}}}, f"shadow.prices.{BIG}"),
    ({"sampel": 0.1}, "shadow.sampel"),
])
def test_config_errors_name_the_key(change: dict[str, Any], key: str) -> None:
    raw: dict[str, Any] = {
        "default_model": BIG, "judge_url": "http://j/v1", "judge_model": JUDGE,
        "prices": {m: {"input_per_1k": 0.1, "output_per_1k": 0.1} for m in (BIG, JUDGE)}}
    raw.update(change)
    with pytest.raises(ConfigError) as e:
        ShadowConfig.from_dict(raw)
    assert e.value.key == key, str(e.value)


def test_config_missing_key() -> None:
    with pytest.raises(ConfigError, match="shadow.judge_model: missing"):
        ShadowConfig.from_dict({"default_model": BIG, "judge_url": "http://j/v1"})


# ==== Plans ====


def _plans(r: ShadowRunner, tags: list[str], n: int, seed: int, dec: TagDecider | None = None,
           served: str | None = None) -> list[Any]:
    d = (dec or decider()).decide(tags)
    rng = random.Random(seed)
    return [r.plan(d, rng, served=served) for _ in range(n)]


def test_plan_samples_and_is_seeded(tmp_path: Path) -> None:
    r = runner(tmp_path, World(), None, sample=0.25, explore=0.0)
    plans = _plans(r, ["Writing", "Poem"], 4000, seed=3)
    assert plans == _plans(r, ["Writing", "Poem"], 4000, seed=3)  # pure given the rng
    taken = [p for p in plans if p is not None]
    assert 0.22 < len(taken) / len(plans) < 0.28
    # Routed to small, served by the default: small is called and judged.
    assert {(p.candidate, p.call, p.served, p.explored) for p in taken} == {
        (SMALL, SMALL, BIG, False)}
    # Routed to the default without exploring: nothing to judge.
    assert set(_plans(r, ["Math", "Algebra"], 500, seed=4)) == {None}


def test_plan_explores_uniformly_among_other_candidates(tmp_path: Path) -> None:
    recs = [("q", ["Math"], m, o) for m, o in ((BIG, "win"), (SMALL, "loss"), ("mid", "tie"),
                                                ("tiny", "loss"))]
    dec = TagDecider(TagScorer.from_records(recs), {BIG: 10.0, SMALL: 1.0, "mid": 3.0,
                                                     "tiny": 0.5})
    assert dec.decide(["Math"]).model == BIG
    r = runner(tmp_path, World(), None, sample=1.0, explore=0.6)
    plans = _plans(r, ["Math"], 3000, seed=5, dec=dec)
    picked = Counter(p.candidate for p in plans if p is not None)
    assert set(picked) == {SMALL, "mid", "tiny"}  # never the default itself
    assert all(abs(c / 3000 - 0.2) < 0.03 for c in picked.values())
    assert [p.p for p in plans if p is not None] == pytest.approx([0.2] * sum(picked.values()))


def test_ab_serves_a_share_live_and_calls_the_default(tmp_path: Path) -> None:
    r = runner(tmp_path, World(), None, mode="ab", ab_share=0.3, sample=1.0)
    d = decider().decide(["Writing", "Poem"])
    rng = random.Random(1)
    served = Counter(r.serve_model(d, rng) for _ in range(4000))
    assert 0.27 < served[SMALL] / 4000 < 0.33
    plan = r.plan(d, rng, served=SMALL)
    assert plan is not None and (plan.candidate, plan.call) == (SMALL, BIG)
    shadow = runner(tmp_path / "s", World(), None)
    assert shadow.serve_model(d, rng) == BIG  # shadow mode: always the default


# ==== Background work ====


def test_a_judged_pair_is_recorded_and_learned_once(tmp_path: Path) -> None:
    world, sink = World(), Sink()

    async def go() -> ShadowRunner:
        r = runner(tmp_path, world, sink, sample=1.0, explore=0.0)
        dec = decider()
        world.outcome["r1"] = "tie"
        assert await one_request(r, world, dec, "r1", "writing", ["Writing", "Poem"],
                                 random.Random(0))
        await drain(r)
        await r.aclose()
        return r

    r = asyncio.run(go())
    assert world.calls == [(SMALL, "r1")]
    (pair,) = lines(tmp_path, PAIRS_FILE)
    assert pair["outcome"] == "tie" and pair["candidate"] == SMALL and pair["called"] == SMALL
    u = usage(SMALL, "r1")
    assert pair["candidate_usage"] == {"in": u["prompt_tokens"], "out": u["completion_tokens"]}
    assert pair["candidate_cost"] == pytest.approx(
        PRICES[SMALL].usd(u["prompt_tokens"], u["completion_tokens"]))
    assert pair["estimated"] is True  # the fake judge reports no usage
    assert set(pair["scores"]) == {BIG, SMALL} and pair["llm"] == BIG and pair["slm"] == SMALL
    assert sink.got == {"shadow:r1": ("tie", ("Writing", "Poem"), SMALL)}
    (dec_line,) = lines(tmp_path, DECISIONS_FILE)
    assert dec_line["shadow"] == "started" and dec_line["served"] == BIG
    assert [m["how"] for m in lines(tmp_path, LEARNED_FILE)] == ["learned"]
    kinds = Counter(s["kind"] for s in lines(tmp_path, SPEND_FILE))
    assert kinds == {"shadow": 1, "judge": 1}
    assert r.counters.judged == r.counters.learned == 1


def test_outcomes_reach_a_real_learner(tmp_path: Path) -> None:
    router = TagRouter(decider(), align=False)
    store = OutcomeStore(router, tmp_path / "state")
    before = router.scorer.counts(SMALL, "Poem")
    world = World()

    async def go() -> None:
        r = ShadowRunner(config(sample=1.0, explore=0.0), tmp_path / "state",
                         call_backend=world.call_backend, judge=world.judge, sink=store)
        world.outcome["r1"] = "win"
        await one_request(r, world, router.decider, "r1", "writing", ["Writing", "Poem"],
                          random.Random(0))
        await drain(r)
        await r.aclose()

    asyncio.run(go())
    store.close()
    win, tie, loss = before
    assert router.scorer.counts(SMALL, "Poem") == (win + 1, tie, loss)


def test_the_client_path_never_waits(tmp_path: Path) -> None:
    world = World()

    async def go() -> None:
        world.gate = asyncio.Event()  # the backend hangs until released
        r = runner(tmp_path, world, Sink(), sample=1.0, explore=0.0)
        t0 = time.perf_counter()
        for i in range(20):
            world.outcome[f"r{i}"] = "win"
            await one_request(r, world, decider(), f"r{i}", "writing", ["Writing"],
                              random.Random(i))
        assert time.perf_counter() - t0 < 1.0
        assert len(lines(tmp_path, DECISIONS_FILE)) == 20  # recorded at once
        await r.aclose()

    asyncio.run(go())


@pytest.mark.parametrize("fault", ["backend_down", "judge_down", "backend_slow", "judge_slow",
                                   "judge_nonsense"])
def test_faults_are_counted_and_never_raised(tmp_path: Path, fault: str) -> None:
    world, sink = World(), Sink()
    if fault == "backend_down":
        world.down = True
    elif fault == "backend_slow":
        world.delay_s = 1.0

    async def bad_judge(q: str, a: str, b: str) -> str:
        if fault == "judge_slow":
            await asyncio.sleep(1.0)
        if fault == "judge_down":
            raise JudgeError("judge down")
        return "maybe"

    async def go() -> ShadowRunner:
        r = runner(tmp_path, world, sink, sample=1.0, explore=0.0, timeout_s=0.05)
        if fault.startswith("judge"):
            r._judge = bad_judge
        for i in range(5):
            world.outcome[f"r{i}"] = "win"
            assert await one_request(r, world, decider(), f"r{i}", "writing", ["Writing"],
                                     random.Random(i))
        await drain(r)
        await r.aclose()
        return r

    r = asyncio.run(go())
    c = r.counters
    if fault.startswith("backend"):
        assert c.backend_errors == 5 and c.judge_errors == 0
    else:
        assert c.judge_errors == 5 and c.backend_errors == 0
        # The shadow calls were made and paid for; no judge was charged.
        assert Counter(s["kind"] for s in lines(tmp_path, SPEND_FILE)) == {"shadow": 5}
    assert c.judged == 0 and not lines(tmp_path, PAIRS_FILE) and not sink.got
    assert len(lines(tmp_path, DECISIONS_FILE)) == 5


def test_full_concurrency_drops_instead_of_queueing(tmp_path: Path) -> None:
    world, sink = World(), Sink()

    async def go() -> ShadowRunner:
        world.gate = asyncio.Event()
        r = runner(tmp_path, world, sink, sample=1.0, explore=0.0, max_concurrency=2)
        started = []
        for i in range(6):
            world.outcome[f"r{i}"] = "loss"
            started.append(await one_request(r, world, decider(), f"r{i}", "writing",
                                             ["Writing"], random.Random(i)))
        assert started == [True, True, False, False, False, False]
        assert r.stats()["in_flight"] == 2
        world.gate.set()
        await drain(r)
        await r.aclose()
        return r

    r = asyncio.run(go())
    assert r.counters.dropped_full == 4 and r.counters.judged == 2
    statuses = Counter(d["shadow"] for d in lines(tmp_path, DECISIONS_FILE))
    assert statuses == {"started": 2, "dropped_full": 4}
    assert_once(tmp_path, sink)


def test_over_the_daily_cap_nothing_is_called(tmp_path: Path) -> None:
    world, sink = World(), Sink()
    now = [T0]

    async def go(cap: float) -> ShadowRunner:
        r = runner(tmp_path, world, sink, sample=1.0, explore=0.0, daily_cap_usd=cap, now=now)
        for i in range(10):
            rid = f"r{now[0]:.0f}-{i}"
            world.outcome[rid] = "win"
            await one_request(r, world, decider(), rid, "writing", ["Writing"], random.Random(i))
            await drain(r)
        await r.aclose()
        return r

    r = asyncio.run(go(0.004))
    spent = sum(s["usd"] for s in lines(tmp_path, SPEND_FILE))
    # The cap holds up to what the calls in flight cost beyond their estimate: one pair here.
    one = max(p["candidate_cost"] + p["judge_cost"] for p in lines(tmp_path, PAIRS_FILE))
    assert 0 < spent <= 0.004 + one
    assert r.counters.over_cap > 0 and r.counters.judged + r.counters.over_cap == 10
    assert len(world.calls) == r.counters.shadow_calls
    # A restart on the same day remembers what was spent; the next day starts over.
    again = runner(tmp_path, world, sink, daily_cap_usd=0.004, now=now)
    assert again.ledger.spent_today() == pytest.approx(spent)
    now[0] += 86_400
    assert again.ledger.spent_today() == 0.0
    asyncio.run(again.aclose())
    assert asyncio.run(go(0.004)).counters.shadow_calls > 0
    assert_once(tmp_path, sink)


def test_unreported_usage_is_estimated_and_flagged(tmp_path: Path) -> None:
    world = World()

    async def no_usage(model: str, body: dict[str, Any]) -> tuple[str, None]:
        return "x" * 400, None

    async def go() -> None:
        r = runner(tmp_path, world, Sink(), sample=1.0, explore=0.0)
        r._call = no_usage
        r._judge = lambda q, a, b: _const("win", {"prompt_tokens": 100, "completion_tokens": 10})
        await one_request(r, world, decider(), "r1", "writing", ["Writing"], random.Random(0))
        await drain(r)
        await r.aclose()

    asyncio.run(go())
    (pair,) = lines(tmp_path, PAIRS_FILE)
    assert pair["estimated"] is True and pair["candidate_usage"]["out"] == 100  # 400 chars / 4
    judge_line = [s for s in lines(tmp_path, SPEND_FILE) if s["kind"] == "judge"][0]
    assert judge_line["estimated"] is False and judge_line["in"] == 100


async def _const(outcome: str, use: dict[str, int]) -> tuple[str, dict[str, int]]:
    return outcome, use


def test_aclose_cancels_calls_in_flight_without_half_counting(tmp_path: Path) -> None:
    world, sink = World(), Sink()

    async def go() -> ShadowRunner:
        world.gate = asyncio.Event()  # never released: every call hangs
        r = runner(tmp_path, world, sink, sample=1.0, explore=0.0)
        for i in range(4):
            world.outcome[f"r{i}"] = "win"
            await one_request(r, world, decider(), f"r{i}", "writing", ["Writing"],
                              random.Random(i))
        await asyncio.sleep(0.01)
        await r.aclose()
        assert not r.submit(None, None)  # type: ignore[arg-type]  # never raises, even now
        return r

    r = asyncio.run(go())
    assert r.counters.cancelled == 4 and r.stats()["in_flight"] == 0
    assert not lines(tmp_path, PAIRS_FILE) and not sink.got


def test_aclose_keeps_a_finished_judgment(tmp_path: Path) -> None:
    world, sink = World(), Sink()

    async def go() -> ShadowRunner:
        r = runner(tmp_path, world, sink, sample=1.0, explore=0.0)
        closing: list[asyncio.Task[None]] = []

        async def judge(q: str, a: str, b: str) -> str:
            # Shutdown starts right as the judgment comes back, before the job resumes.
            asyncio.get_running_loop().call_soon(
                lambda: closing.append(asyncio.ensure_future(r.aclose())))
            return "win"

        r._judge = judge
        world.outcome["r1"] = "win"
        await one_request(r, world, decider(), "r1", "writing", ["Writing"], random.Random(0))
        for _ in range(100):
            await asyncio.sleep(0.005)
            if closing and closing[0].done():
                break
        return r

    r = asyncio.run(go())
    assert [p["pair"] for p in lines(tmp_path, PAIRS_FILE)] == ["shadow:r1"]
    assert_once(tmp_path, sink)
    assert r.counters.judged == r.counters.learned == 1 and r.counters.cancelled == 0


def test_a_learner_outage_is_recovered_exactly_once(tmp_path: Path) -> None:
    world, sink = World(), Sink()
    sink.error = OutcomeStoreError("journal failed")

    async def go() -> tuple[int, int, int]:
        r = runner(tmp_path, world, sink, sample=1.0, explore=0.0)
        for i in range(3):
            world.outcome[f"r{i}"] = "tie"
            await one_request(r, world, decider(), f"r{i}", "writing", ["Writing"],
                              random.Random(i))
        await drain(r)
        assert r.counters.sink_errors == 3 and r.counters.judged == 3
        sink.error = None
        first = await r.recover()
        second = await r.recover()  # all marked now: nothing fed twice
        await r.aclose()
        # A restart after the marks were lost: the learner's idempotency keeps the count.
        (tmp_path / LEARNED_FILE).unlink()
        r2 = runner(tmp_path, world, sink)
        third = await r2.recover()
        await r2.aclose()
        return first, second, third

    assert asyncio.run(go()) == (3, 0, 3)
    assert_once(tmp_path, sink)
    assert Counter(m["how"] for m in lines(tmp_path, LEARNED_FILE)) == {"duplicate": 3}


def test_a_torn_pair_line_is_cut_on_start(tmp_path: Path) -> None:
    good = journal.encode_line({"pair": "shadow:a"})
    (tmp_path / PAIRS_FILE).write_bytes(good + journal.encode_line({"pair": "shadow:b"})[:20])
    r = runner(tmp_path, World(), None)
    asyncio.run(r.aclose())
    assert (tmp_path / PAIRS_FILE).read_bytes() == good


def test_a_scripted_day_counts_add_up(tmp_path: Path) -> None:
    world, sink = World(), Sink()

    async def go() -> ShadowRunner:
        r = runner(tmp_path, world, sink)
        await scripted_day(r, world, 300, seed=2)
        await drain(r)
        await r.aclose()
        return r

    r = asyncio.run(go())
    c = r.counters
    decisions = lines(tmp_path, DECISIONS_FILE)
    assert len(decisions) == 300
    assert c.shadow_calls == sum(d["shadow"] == "started" for d in decisions) == c.judged
    assert len(world.calls) == c.shadow_calls
    assert_once(tmp_path, sink)
    # Explored pairs are the small model on requests routed to the default.
    explored = [p for p in lines(tmp_path, PAIRS_FILE) if p["explored"]]
    assert explored and all(p["routed"] == BIG and p["candidate"] == SMALL for p in explored)


# ==== The judge adapter ====


def test_pairwise_judge_asks_both_orders() -> None:
    seen: list[str] = []
    mine, theirs = "ANSWER-MINE-7", "ANSWER-THEIRS-9"

    def ask_for(prefer: str | None) -> Any:
        async def ask(messages: list[dict[str, str]]) -> tuple[str, dict[str, int]]:
            user = messages[-1]["content"]
            seen.append(user)
            if prefer is None:  # always the answer shown first: pure position bias
                letter = "A"
            else:
                other = theirs if prefer == mine else mine
                letter = "A" if user.index(prefer) < user.index(other) else "B"
            return f'{{"compare result": "{letter}"}}', {"prompt_tokens": 7,
                                                        "completion_tokens": 2}
        return ask

    async def go() -> list[Any]:
        return [await PairwiseJudge(ask_for(p))("q?", mine, theirs)
                for p in (mine, theirs, None)]

    win, loss, biased = asyncio.run(go())
    assert win == ("win", {"prompt_tokens": 14, "completion_tokens": 4})
    assert loss[0] == "loss"
    assert biased[0] == "tie"  # a verdict that follows the position is no verdict
    assert len(seen) == 6 and sum(s.index(mine) < s.index(theirs) for s in seen) == 3


def test_pairwise_judge_without_a_verdict_raises() -> None:
    async def ask(messages: list[dict[str, str]]) -> tuple[str, None]:
        return "I cannot decide.", None

    with pytest.raises(JudgeError, match="no verdict"):
        asyncio.run(PairwiseJudge(ask)("q", "a", "b"))


def test_the_documented_config_parses() -> None:
    import re
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    text = (Path(__file__).parent.parent / "docs" / "shadow.md").read_text(encoding="utf-8")
    block = re.search(r"```toml\n(.*?)```", text, flags=re.S)
    assert block is not None
    cfg = ShadowConfig.from_dict(tomllib.loads(block.group(1))["shadow"])
    assert cfg.default_model in cfg.prices and cfg.judge_model in cfg.prices
