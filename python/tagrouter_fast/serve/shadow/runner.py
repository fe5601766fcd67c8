"""Shadow mode: learn what routing would do before letting it answer anyone.

Modes (``[shadow] mode``):

- ``shadow``: every routed-alias request is answered by ``default_model``, exactly as without
  the gateway. The router still decides, and the decision is recorded; for a sampled share of
  requests the routed model (or, with probability ``explore``, another candidate) answers the
  same request in the background, a judge compares its answer with the default's, and the
  outcome is learned like any feedback. The default model is the reference.
- ``ab``: a share ``ab_share`` of requests is served by the routed model, the rest by the
  default; sampled requests are judged the same way (for a live-routed one the background call
  is the default's, the reference).
- ``route``: every request is served by the routed model; sampled ones are still judged.

Shadow work never delays, alters or fails the client's answer: `ShadowRunner.submit` only
appends a line and starts a task, never raises, and drops (counted) what does not fit under
``max_concurrency`` or the daily spend cap (`tagrouter_fast.serve.shadow.spend`).

Files in the state directory (checksummed lines of `tagrouter_fast.journal`), all the report
(`tagrouter_fast.serve.shadow.report`) needs:

- ``shadow_decisions.jsonl``: every routed request (sampled or not): time, tags, per-candidate
  scores ``S(M)``, M_LLM and M_SLM, the routed and the serving model, the served answer's
  usage and cost, what became of its shadow call. No fsync (losing the newest lines to an OS
  crash only makes the report see less traffic).
- ``shadow_pairs.jsonl``: every judged pair: the same decision fields, candidate and called
  model, outcome vs the default, usage and cost of both answers and of the judge, the
  ``estimated`` flag. fsynced before its outcome goes to the learner: this file is the outbox.
- ``shadow_learned.jsonl``: one mark per pair the learner took (or refused for good).
- ``shadow_spend.jsonl`` (the ledger) and ``shadow_mode.jsonl`` (mode and theta history).

Exactly once: a pair is recorded, then learned under its pair id (``shadow:<request id>``),
then marked. A pair is learned only once recorded; a crash or a learner outage between the two
leaves it unmarked, and `ShadowRunner.recover` feeds it again: the learner is idempotent by id
(a `DuplicateOutcome` means it already counted it). `ShadowRunner.aclose` cancels calls and
judgments in flight; a judgment that finished is still recorded and learned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tagrouter_fast import journal
from tagrouter_fast.core import Decision
from tagrouter_fast.serve.learn.outcomes import DuplicateOutcome, UnknownDecision
from tagrouter_fast.serve.shadow.config import MODES, ShadowConfig
from tagrouter_fast.serve.shadow.spend import (
    Charge,
    Price,
    SpendLedger,
    estimate_tokens,
    price_call,
)

__all__ = [
    "DECISIONS_FILE", "LEARNED_FILE", "MODE_FILE", "MODES", "PAIRS_FILE", "SPEND_FILE",
    "OutcomeSink", "ShadowConfig", "ShadowPlan", "ShadowRequest", "ShadowRunner",
]

log = logging.getLogger("tagrouter.shadow")

DECISIONS_FILE = "shadow_decisions.jsonl"
PAIRS_FILE = "shadow_pairs.jsonl"
LEARNED_FILE = "shadow_learned.jsonl"
SPEND_FILE = "shadow_spend.jsonl"
MODE_FILE = "shadow_mode.jsonl"
#: The key id journalled with shadow outcomes (the learner's ``key``).
SHADOW_KEY = "shadow"
#: For a judge that reports no usage: the prompt's own tokens and a reply's, per order.
JUDGE_PROMPT_TOKENS = 300
JUDGE_REPLY_TOKENS = 150

CallBackend = Callable[[str, dict[str, Any]], Awaitable[tuple[str, Mapping[str, Any] | None]]]
Judge = Callable[[str, str, str], Awaitable[Any]]


class OutcomeSink(Protocol):
    """What the runner needs of a learner (`tagrouter_fast.serve.learn.learner.Learner` is one)."""

    async def feedback_async(
        self, decision_id: str, outcome: str | float, *,
        decision: tuple[Sequence[str], str, float] | None = None, key: str | None = None,
    ) -> int: ...


# ==== Plans ====


@dataclass(frozen=True)
class ShadowPlan:
    """What one sampled request gets in the background.

    Attributes:
        served: the model that answers the client.
        candidate: the model judged against the default (the reference).
        call: the model called in the background (the candidate, or the default when the
            candidate served the client live).
        routed: the router's choice.
        explored: the candidate was drawn at random instead of being the routed model.
        p: the probability of this candidate among the sampled requests with this decision
            (for off-policy estimates).
    """

    served: str
    candidate: str
    call: str
    routed: str
    explored: bool
    p: float


@dataclass(frozen=True)
class ShadowRequest:
    """A routed request once its answer is in: what the runner records and shadows."""

    request_id: str
    query: str
    body: Mapping[str, Any]
    tags: Sequence[str]
    decision: Decision
    served: str
    answer: str
    usage: Mapping[str, Any] | None = None


@dataclass
class _Job:
    req: ShadowRequest
    plan: ShadowPlan
    t: float
    served: Charge
    reserved: float
    committing: bool = False


@dataclass
class ShadowCounters:
    """Numbers for /metrics (monotonic counts)."""

    shadow_calls: int = 0
    judged: int = 0
    learned: int = 0
    dropped_full: int = 0
    over_cap: int = 0
    unpriced: int = 0
    backend_errors: int = 0
    judge_errors: int = 0
    sink_errors: int = 0
    journal_errors: int = 0
    cancelled: int = 0
    internal_errors: int = 0


def _prompt_text(body: Mapping[str, Any]) -> str:
    """The request's input as text, to estimate its tokens when no usage was reported."""
    part = body.get("messages", body.get("prompt", ""))
    try:
        return part if isinstance(part, str) else json.dumps(part, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return ""


# ==== The runner ====


class ShadowRunner:
    """Records every routed decision and judges sampled requests in the background.

    Args:
        config: the ``[shadow]`` settings.
        state_dir: where the shadow files live (created if missing).
        call_backend: ``await call_backend(model, body) -> (answer text, usage or None)``
            (non-streaming; the body is a copy without ``stream``).
        judge: ``await judge(query, answer_a, answer_b)`` returning ``"win"``, ``"tie"`` or
            ``"loss"`` for ``answer_a``, or ``(outcome, usage)`` (`PairwiseJudge`).
        sink: the learner the outcomes go to; None records pairs without learning.
        theta: the decider's theta, written to the mode log.
        clock: Unix time (tests pass their own).

    Raises:
        OSError: the state directory or a file in it cannot be opened (the message names it).
    """

    def __init__(
        self, config: ShadowConfig, state_dir: str | os.PathLike[str], *,
        call_backend: CallBackend, judge: Judge, sink: OutcomeSink | None,
        theta: float | None = None, clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._call, self._judge, self._sink, self._clock = call_backend, judge, sink, clock
        self.rng = random.Random(config.seed)
        self.counters = ShadowCounters()
        self._tasks: dict[asyncio.Task[None], _Job] = {}
        self._closed = False
        _cut_torn_tail(self.dir / PAIRS_FILE)
        self.ledger = SpendLedger(self.dir / SPEND_FILE, config.daily_cap_usd, clock=clock)
        self._fds = {name: journal.open_append(self.dir / name)
                     for name in (DECISIONS_FILE, PAIRS_FILE, LEARNED_FILE, MODE_FILE)}
        self.note_mode(theta)

    # ---- decisions ----

    def serve_model(self, decision: Decision, rng: random.Random | None = None) -> str:
        """The model that answers the client: the default (shadow), the routed one (route),
        or the routed one for an ``ab_share`` of requests (ab)."""
        mode, default = self.config.mode, self.config.default_model
        if mode == "route" or (mode == "ab" and (rng or self.rng).random() < self.config.ab_share):
            return decision.model
        return default

    def plan(self, decision: Decision, rng: random.Random | None = None, *,
             served: str | None = None) -> ShadowPlan | None:
        """Whether this request gets a shadow call (with probability ``sample``) and which.

        Pure but for ``rng`` (default: the runner's, seeded by ``config.seed``). Served by
        another model than the default, that model is the candidate and the background call
        gets the reference. Served by the default: the routed model, or with probability
        ``explore`` a uniformly drawn other non-default candidate; None when that leaves the
        default itself (its answer is the reference: nothing to judge).
        """
        rng = rng or self.rng
        if rng.random() >= self.config.sample:
            return None
        default, routed = self.config.default_model, decision.model
        served = served or default
        if served != default:
            return ShadowPlan(served, served, default, routed, False, 1.0)
        others = sorted(m for m in decision.scores if m not in (default, routed))
        explore = self.config.explore if others else 0.0
        if rng.random() < explore:
            pick = others[rng.randrange(len(others))]
            return ShadowPlan(served, pick, pick, routed, True, explore / len(others))
        if routed == default:
            return None
        return ShadowPlan(served, routed, routed, routed, False, 1.0 - explore)

    def submit(self, req: ShadowRequest, plan: ShadowPlan | None) -> bool:
        """Records the request's decision and, with a plan, starts its shadow call and judgment
        in the background (on the running loop). Never raises, never waits: a plan that does
        not fit (``max_concurrency`` full, over the daily cap, an unpriced model, closed) is
        dropped and counted. Returns whether a shadow call was started."""
        try:
            return self._submit(req, plan)
        except Exception:  # the client's answer must not share a shadow fault
            self.counters.internal_errors += 1
            log.exception("shadow: request %s not recorded", getattr(req, "request_id", "?"))
            return False

    def _submit(self, req: ShadowRequest, plan: ShadowPlan | None) -> bool:
        cfg, c = self.config, self.counters
        if self._closed:  # shutting down: the files are closing, nothing more is recorded
            return False
        now = self._clock()
        prompt = _prompt_text(req.body)
        served_price = cfg.prices.get(req.served)
        served = price_call(served_price or Price(0.0, 0.0), req.usage, prompt, req.answer)
        status, job = None, None
        if plan is not None:
            loop = asyncio.get_running_loop()  # before anything is reserved
            call_price, judge_price = cfg.prices.get(plan.call), cfg.prices[cfg.judge_model]
            if len(self._tasks) >= cfg.max_concurrency:
                c.dropped_full += 1
                status = "dropped_full"
            elif call_price is None or served_price is None:
                c.unpriced += 1
                status = "unpriced"
            else:
                est = price_call(call_price, served.usage(), "", "").usd + _judge_estimate(
                    judge_price, req.query, req.answer, req.answer).usd
                if not self.ledger.reserve(est):
                    c.over_cap += 1
                    status = "over_cap"
                else:
                    status = "started"
                    job = _Job(req, plan, now, served, est)
        d = req.decision
        line = {
            "t": now, "id": req.request_id, "tags": list(req.tags), "scores": d.scores,
            "llm": d.llm, "slm": d.slm, "routed": d.model, "theta": d.theta,
            "default": cfg.default_model, "served": req.served, "usage": served.usage(),
            "cost": served.usd if served_price is not None else None,
            "estimated": served.estimated, "shadow": status,
        }
        self._append(DECISIONS_FILE, line, durable=False)
        if job is None:
            return False
        task = loop.create_task(self._run(job))
        self._tasks[task] = job
        task.add_done_callback(self._tasks.pop)
        c.shadow_calls += 1
        return True

    # ---- one shadow job ----

    async def _run(self, job: _Job) -> None:
        try:
            pair = await self._call_and_judge(job)
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            raise
        finally:
            self.ledger.release(job.reserved)
        if pair is not None:
            job.committing = True
            await self._commit(pair)

    async def _call_and_judge(self, job: _Job) -> dict[str, Any] | None:
        cfg, c, req, plan = self.config, self.counters, job.req, job.plan
        body = {k: v for k, v in req.body.items() if k not in ("stream", "stream_options")}
        body["model"] = plan.call
        try:
            text, usage = await asyncio.wait_for(self._call(plan.call, body), cfg.timeout_s)
            if not isinstance(text, str):
                raise TypeError(f"call_backend returned {type(text).__name__}, not str")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            c.backend_errors += 1
            log.warning("shadow call to %s failed: %s", plan.call, _why(e))
            return None
        called = price_call(cfg.prices[plan.call], usage, _prompt_text(req.body), text)
        self._charge("shadow", plan.call, req.request_id, called)
        if plan.call == plan.candidate:
            cand, ref, cand_cost, ref_cost = text, req.answer, called, job.served
        else:
            cand, ref, cand_cost, ref_cost = req.answer, text, job.served, called
        judging = asyncio.ensure_future(
            asyncio.wait_for(self._judge(req.query, cand, ref), cfg.timeout_s))
        try:
            result = await asyncio.shield(judging)
        except asyncio.CancelledError:
            # Cancelled (aclose) after the judge answered but before this task resumed: the
            # judgment is done and paid for, so it is kept.
            if not (judging.done() and not judging.cancelled() and judging.exception() is None):
                judging.cancel()
                raise
            result = judging.result()
        except Exception as e:
            c.judge_errors += 1
            log.warning("shadow judge failed on %s: %s", req.request_id, _why(e))
            return None
        outcome, judge_usage = result if isinstance(result, tuple) else (result, None)
        if outcome not in ("win", "tie", "loss"):
            c.judge_errors += 1
            log.warning("shadow judge answered %r, not win/tie/loss", outcome)
            return None
        judge_price = cfg.prices[cfg.judge_model]
        judged = (price_call(judge_price, judge_usage, "", "") if judge_usage is not None
                  else _judge_estimate(judge_price, req.query, cand, ref))
        if judge_usage is not None and judged.estimated:  # usage present but unreadable
            judged = _judge_estimate(judge_price, req.query, cand, ref)
        self._charge("judge", cfg.judge_model, req.request_id, judged)
        d = req.decision
        return {
            "t": job.t, "at": self._clock(), "pair": f"shadow:{req.request_id}",
            "id": req.request_id, "tags": list(req.tags), "scores": d.scores, "llm": d.llm,
            "slm": d.slm, "routed": d.model, "theta": d.theta, "default": cfg.default_model,
            "served": plan.served, "candidate": plan.candidate, "called": plan.call,
            "explored": plan.explored, "p": plan.p, "outcome": outcome,
            "candidate_usage": cand_cost.usage(), "candidate_cost": cand_cost.usd,
            "reference_usage": ref_cost.usage(), "reference_cost": ref_cost.usd,
            "judge_cost": judged.usd,
            "estimated": cand_cost.estimated or ref_cost.estimated or judged.estimated,
        }

    async def _commit(self, pair: dict[str, Any]) -> None:
        """Records a judged pair (fsynced: the outbox), then learns it. Never cancelled by
        `aclose`: a pair is learned only once recorded, and recorded before it is learned."""
        try:
            await asyncio.to_thread(self._append, PAIRS_FILE, pair, durable=True, strict=True)
        except OSError as e:
            log.error("shadow pair %s not recorded, not learned: %s", pair["pair"], e)
            return
        self.counters.judged += 1
        await self._learn(pair)

    async def _learn(self, pair: dict[str, Any]) -> None:
        if self._sink is None:
            return
        c = self.counters
        try:
            await self._sink.feedback_async(
                pair["pair"], pair["outcome"],
                decision=(pair["tags"], pair["candidate"], float(pair["t"])), key=SHADOW_KEY)
        except DuplicateOutcome:
            self._mark(pair["pair"], "duplicate")  # counted before (a replay): once is kept
        except (UnknownDecision, ValueError, TypeError) as e:
            c.sink_errors += 1  # refused for good (expired, invalid): retrying cannot help
            log.warning("shadow pair %s refused by the learner: %s", pair["pair"], e)
            self._mark(pair["pair"], "refused", why=str(e)[:300])
        except Exception as e:
            c.sink_errors += 1  # learner unavailable: left unmarked for recover()
            log.warning("shadow pair %s not learned yet (%s); recover() retries it",
                        pair["pair"], _why(e))
        else:
            c.learned += 1
            self._mark(pair["pair"], "learned")

    async def recover(self) -> int:
        """Feeds the learner every recorded pair without a mark (a crash or a learner outage
        came between recording and learning); call once at start and after an outage.
        Returns how many were fed."""
        if self._sink is None:
            return 0
        pairs, marked = await asyncio.to_thread(self._unmarked)
        todo = [p for p in pairs if p.get("pair") not in marked]
        for p in todo:
            await self._learn(p)
        return len(todo)

    def _unmarked(self) -> tuple[list[dict[str, Any]], set[str]]:
        pairs = [ln.payload for ln in journal.scan(self.dir / PAIRS_FILE)
                 if ln.payload is not None]
        marks = {str(ln.payload.get("pair")) for ln in journal.scan(self.dir / LEARNED_FILE)
                 if ln.payload is not None}
        return pairs, marks

    # ---- files ----

    def _append(self, name: str, obj: dict[str, Any], *, durable: bool,
                strict: bool = False) -> None:
        try:
            journal.append(self._fds[name], journal.encode_line(obj), durable=durable)
        except (OSError, KeyError, ValueError, TypeError) as e:  # KeyError: closed
            self.counters.journal_errors += 1
            if strict:
                raise OSError(f"{self.dir / name}: {e}") from e
            log.warning("shadow: cannot append to %s: %s", name, e)

    def _mark(self, pair_id: str, how: str, why: str | None = None) -> None:
        mark: dict[str, Any] = {"pair": pair_id, "at": self._clock(), "how": how}
        if why is not None:
            mark["why"] = why
        self._append(LEARNED_FILE, mark, durable=False)

    def _charge(self, kind: str, model: str, request_id: str, charge: Charge) -> None:
        try:
            self.ledger.charge(kind, model, request_id, charge)
        except OSError as e:
            self.counters.journal_errors += 1  # counted in memory all the same
            log.warning("shadow: cannot append to the spend ledger: %s", e)

    def note_mode(self, theta: float | None = None) -> None:
        """Appends the current mode (and theta) to the mode log, e.g. after /admin/theta."""
        cfg = self.config
        self._append(MODE_FILE, {
            "t": self._clock(), "mode": cfg.mode, "default": cfg.default_model,
            "sample": cfg.sample, "explore": cfg.explore, "ab_share": cfg.ab_share,
            "cap_usd": cfg.daily_cap_usd, "theta": theta,
            "prices": {m: [p.input_per_1k, p.output_per_1k] for m, p in cfg.prices.items()},
        }, durable=False)

    # ---- state ----

    def stats(self) -> dict[str, Any]:
        """Counters, calls in flight and today's spend, for /metrics and /readyz."""
        out: dict[str, Any] = dict(vars(self.counters))
        out["in_flight"] = len(self._tasks)
        out["spent_today_usd"] = self.ledger.spent_today()
        out["cap_usd"] = self.config.daily_cap_usd
        return out

    async def aclose(self) -> None:
        """Stops taking work, cancels calls and judgments in flight (a finished judgment is
        still recorded and learned), waits for the rest, closes the files. Idempotent."""
        if self._closed and not self._tasks:
            return
        self._closed = True
        for task, job in list(self._tasks.items()):
            if not job.committing:
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}
        self.ledger.close()


def _judge_estimate(price: Price, query: str, a: str, b: str) -> Charge:
    """An estimated judge charge: both orders, each the prompt plus the texts, and a reply."""
    t_in = 2 * (JUDGE_PROMPT_TOKENS + estimate_tokens(query + a + b))
    t_out = 2 * JUDGE_REPLY_TOKENS
    return Charge(t_in, t_out, price.usd(t_in, t_out), True)


def _cut_torn_tail(path: Path) -> None:
    """Cuts an unfinished last line (a crash during an append): that pair was never learned
    (it is learned only after its line is durable), so nothing it promised is lost."""
    if not path.exists():
        return
    data = path.read_bytes()
    lines = journal.scan_bytes(data)
    # Only a line without its newline is a write cut short; a damaged whole line may be a
    # learned pair and stays (the report counts it as damaged).
    if lines and lines[-1].payload is None and not data.endswith(b"\n"):
        log.warning("%s: cutting a torn last line at byte %d", path, lines[-1].offset)
        journal.truncate(path, lines[-1].offset, durable=True)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
