"""Fakes for the shadow-mode tests: a two-model world whose truth the tests know.

The small model is as good as the big one on writing and worse on maths and code; every
request's true outcome (small vs big) is drawn up front from its topic's probabilities, the
fake judge reads it back from the answers, and token usage is a fixed function of the request
and the model, so a test can compute exactly what routing any traffic would have cost.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tagrouter_fast.core import TagDecider, TagScorer
from tagrouter_fast.serve.learn.outcomes import DuplicateOutcome
from tagrouter_fast.serve.shadow.runner import ShadowConfig, ShadowRequest, ShadowRunner
from tagrouter_fast.serve.shadow.spend import Price

BIG, SMALL, JUDGE = "big", "small", "judge"
PRICES = {BIG: Price(0.01, 0.03), SMALL: Price(0.001, 0.002), JUDGE: Price(0.0005, 0.0015)}
#: P(win), P(tie), P(loss) of the small model's answer against the big one's, per topic.
TRUTH = {"writing": (0.5, 0.45, 0.05), "maths": (0.1, 0.2, 0.7), "code": (0.1, 0.3, 0.6)}
TOPIC_TAGS = {
    "writing": [["Writing", "Poem"], ["Writing", "Essay"], ["Story", "Writing"]],
    "maths": [["Math", "Algebra"], ["Math", "Calculus"]],
    "code": [["Code", "Python"], ["Code", "Debugging"]],
}
#: Traffic mix of a scripted day.
MIX = (("writing", 0.5), ("maths", 0.25), ("code", 0.25))
T0 = 1_699_920_000.0  # midnight UTC, 2023-11-14


def accept_truth(topic: str) -> float:
    win, tie, _ = TRUTH[topic]
    return win + tie


def decider() -> TagDecider:
    """A router that learned the truth roughly: small on writing tags, big on the others."""
    recs = []
    for topic, tag_sets in TOPIC_TAGS.items():
        for i, tags in enumerate(tag_sets):
            for k in range(4):
                qid = f"{topic}-{i}-{k}"
                small = "win" if topic == "writing" else ("loss" if k < 3 else "tie")
                recs += [(qid, tags, SMALL, small), (qid, tags, BIG, "tie")]
    return TagDecider(TagScorer.from_records(recs), {BIG: 10.0, SMALL: 1.0})


def usage(model: str, rid: str) -> dict[str, int]:
    """The tokens a model's answer to request ``rid`` takes (deterministic)."""
    h = zlib.crc32(rid.encode())
    out = 150 + h % 200
    return {"prompt_tokens": 40 + (h >> 8) % 60,
            "completion_tokens": out if model == BIG else int(out * (0.8 + (h >> 16) % 40 / 100))}


def true_cost(model: str, rid: str) -> float:
    u = usage(model, rid)
    return PRICES[model].usd(u["prompt_tokens"], u["completion_tokens"])


@dataclass
class World:
    """The truth of a scripted day and the fake backends and judge over it."""

    outcome: dict[str, str] = field(default_factory=dict)  # request id -> small vs big
    topic: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    down: bool = False
    delay_s: float = 0.0
    gate: asyncio.Event | None = None

    async def call_backend(self, model: str, body: dict[str, Any]) -> tuple[str, Any]:
        rid = body["metadata"]["rid"]
        self.calls.append((model, rid))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.down:
            raise ConnectionError("backend down")
        return f"{model}|{rid}", usage(model, rid)

    async def judge(self, query: str, a: str, b: str) -> str:
        (ma, rid), (mb, _) = a.split("|"), b.split("|")
        truth = self.outcome[rid]
        if ma == SMALL and mb == BIG:
            return truth
        return {"win": "loss", "loss": "win", "tie": "tie"}[truth]


class Sink:
    """A learner stand-in: idempotent by id, like the real ones."""

    def __init__(self) -> None:
        self.got: dict[str, tuple[str, tuple[str, ...], str]] = {}
        self.calls = 0
        self.error: Exception | None = None

    async def feedback_async(self, decision_id: str, outcome: str | float, *,
                             decision: Any = None, key: str | None = None) -> int:
        self.calls += 1
        if self.error is not None:
            raise self.error
        if decision_id in self.got:
            raise DuplicateOutcome(decision_id)
        tags, model, _ = decision
        self.got[decision_id] = (str(outcome), tuple(tags), model)
        return len(self.got)


def config(**kw: Any) -> ShadowConfig:
    base: dict[str, Any] = dict(default_model=BIG, judge_url="http://judge.invalid/v1",
                                judge_model=JUDGE, prices=PRICES, sample=0.4, explore=0.3,
                                max_concurrency=10_000, seed=7)
    base.update(kw)
    return ShadowConfig(**base)


def clock_from(t: list[float]) -> Any:
    return lambda: t[0]


async def one_request(runner: ShadowRunner, world: World, dec: TagDecider, rid: str,
                      topic: str, tags: list[str], rng: random.Random) -> bool:
    """One routed request through the runner as the gateway would do it."""
    d = dec.decide(tags)
    served = runner.serve_model(d, rng)
    plan = runner.plan(d, rng, served=served)
    body: Mapping[str, Any] = {"model": "tagrouter", "stream": True, "metadata": {"rid": rid},
                               "messages": [{"role": "user", "content": f"{topic} {rid}"}]}
    answer, used = f"{served}|{rid}", usage(served, rid)
    return runner.submit(ShadowRequest(rid, f"{topic} {rid}", body, tags, d, served, answer,
                                       used), plan)


async def scripted_day(runner: ShadowRunner, world: World, n: int, seed: int,
                       now: list[float] | None = None) -> TagDecider:
    """``n`` requests of the day's mix; returns the decider that routed them."""
    dec = decider()
    rng = random.Random(seed)
    truth_rng = random.Random(seed + 1)
    for i in range(n):
        topic = rng.choices([t for t, _ in MIX], [w for _, w in MIX])[0]
        tags = rng.choice(TOPIC_TAGS[topic])
        rid = f"r{i:05d}"
        world.topic[rid] = topic
        world.outcome[rid] = truth_rng.choices(("win", "tie", "loss"), TRUTH[topic])[0]
        if now is not None:
            now[0] = T0 + i * 80_000.0 / max(1, n)  # one UTC day
        await one_request(runner, world, dec, rid, topic, tags, rng)
        await asyncio.sleep(0)
    return dec
