"""Shadow mode in the gateway: the glue between `ShadowRunner` and the request path.

`ShadowService` is built at start-up when the config has ``[shadow]`` (the state directory is
the gateway's ``[feedback] state_dir``) and holds:

- the runner, whose backend calls go through the gateway's own forwarder (the same upstream
  client, backend auth and deadlines; one non-streaming call) and whose judge is
  `PairwiseJudge` over `http_ask` to ``judge_url`` on that client;
- the per-request hooks of the edge: `steer` (who answers the client in the current mode, and
  the shadow plan) before the backend call, `after` (the request recorded and its shadow call
  started) once the client's answer is sent, `after_stream` the same once a streamed answer
  has ended;
- the mode switch (`switch`): mode, theta and ``ab_share`` at once, persisted in
  ``shadow_switch.json`` so that it survives restarts, and recorded in the mode log;
- the runner's counters on ``/metrics`` and the traffic summary of ``GET /admin/traffic``.

A streamed chat answer is relayed byte for byte while its text and usage are collected beside
it (`StreamMeter`); a stream that finished (``[DONE]``) is judged like a JSON answer, one cut
short records its decision only (docs/shadow.md, "Streams").

Shadow work never delays, alters or fails the client's answer: `after` runs after the response
is sent and `ShadowRunner.submit` never raises; a broken shadow backend or judge only counts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.background import BackgroundTask

from tagrouter_fast import journal
from tagrouter_fast.serve.config import ConfigError
from tagrouter_fast.serve.policy.capabilities import lacks
from tagrouter_fast.serve.shadow.config import MODES, ShadowConfig
from tagrouter_fast.serve.shadow.runner import (
    ShadowCounters,
    ShadowPlan,
    ShadowRequest,
    ShadowRunner,
)

if TYPE_CHECKING:
    from tagrouter_fast.serve.metrics import GatewayMetrics
    from tagrouter_fast.serve.policy.gateway import Gateway
    from tagrouter_fast.serve.policy.routing import Routed
    from tagrouter_fast.serve.shadow.judge import PairwiseJudge

__all__ = ["SWITCH_FILE", "ShadowCallError", "ShadowService", "answer_text", "routed_counts"]

log = logging.getLogger("tagrouter.shadow")

#: The last mode switch (``POST /admin/mode``), one checksummed line, replaced atomically.
SWITCH_FILE = "shadow_switch.json"
#: Reasons on ``x-tagrouter-reason`` and the routed counter when the default serves a request
#: the router decided: in mode ``shadow``, and for the default's share in mode ``ab``.
REASON_SHADOW = "shadow"
REASON_AB_DEFAULT = "ab_default"


class ShadowCallError(RuntimeError):
    """A shadow call's backend answered, but not with a usable completion (the runner counts
    it as a backend error)."""


def answer_text(body: bytes) -> tuple[str | None, Mapping[str, Any] | None]:
    """The text and usage of a non-streaming OpenAI answer (chat or completions); text None
    when the answer holds no text (a tool call, an unexpected shape)."""
    try:
        obj = json.loads(body)
        choice = obj["choices"][0]
        text = choice["message"].get("content") if "message" in choice else choice.get("text")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return None, None
    usage = obj.get("usage")
    return (text if isinstance(text, str) else None), (
        usage if isinstance(usage, Mapping) else None)


def judge_api_key(cfg: ShadowConfig) -> str | None:
    """The judge's API key from ``judge_api_key_env``, checked at start-up.

    Raises:
        ConfigError: the variable is named but not set.
    """
    env = cfg.judge_api_key_env
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise ConfigError("shadow.judge_api_key_env", f"environment variable {env} is not set")
    return key


def routed_counts(metrics: GatewayMetrics) -> list[dict[str, Any]]:
    """The routed counter's requests per answering model and reason, most first."""
    rows: list[dict[str, Any]] = []
    for metric in metrics.routed.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                rows.append({"model": s.labels["model"], "reason": s.labels["reason"],
                             "count": int(s.value)})
    rows.sort(key=lambda r: (-r["count"], r["model"], r["reason"]))
    return rows


class _LiveLearner:
    """The gateway's learner at the time of each outcome (a reload replaces it)."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw

    async def feedback_async(
        self, decision_id: str, outcome: str | float, *,
        decision: tuple[Sequence[str], str, float] | None = None, key: str | None = None,
    ) -> int:
        learner = self._gw.learner
        if learner is None:  # between a reload's close and reopen: recover() retries it
            raise RuntimeError("the learner is not open")
        return await learner.feedback_async(decision_id, outcome, decision=decision, key=key)


class ShadowService:
    """Shadow mode of one gateway (see the module docstring).

    Args:
        gw: the gateway; its forwarder and learner are read at each use (both are replaced
            over the gateway's life: the forwarder per lifespan, the learner by a reload).

    Raises:
        ConfigError: ``judge_api_key_env`` names an unset variable.
        OSError: a shadow file in the state directory cannot be opened (naming it).
    """

    def __init__(self, gw: Gateway) -> None:
        cfg = gw.config.shadow
        state_dir = gw.config.feedback.state_dir
        assert cfg is not None and state_dir is not None  # config_parse checks both
        self.gw = gw
        self._judge_key = judge_api_key(cfg)
        self._judge: PairwiseJudge | None = None
        self._judge_client: object | None = None
        self.switch_path = Path(state_dir) / SWITCH_FILE
        cfg, theta = self._restore(cfg)
        if theta is not None:
            gw.set_theta(theta)
        self.runner = ShadowRunner(
            cfg, state_dir, call_backend=self._call_backend, judge=self._ask_judge,
            sink=_LiveLearner(gw), theta=gw.router.decider.theta,
        )
        gw.metrics.registry.register(_Collector(self))

    # ---- the runner's two outside calls ----

    async def _call_backend(self, model: str, body: dict[str, Any]) -> tuple[str, Any]:
        """One non-streaming call of ``model`` through the gateway's forwarder."""
        gw = self.gw
        backend, forwarder = gw.backends.get(model), gw.forwarder
        if backend is None or forwarder is None:
            raise ShadowCallError(f"{model}: no backend (removed?) or the gateway is stopping")
        path = "/chat/completions" if "messages" in body else "/completions"
        payload = json.dumps({**body, "model": backend.model}, separators=(",", ":")).encode()
        answer = await forwarder.complete(backend, path, payload)
        if answer.status != 200:
            raise ShadowCallError(f"{model}: HTTP {answer.status}")
        text, usage = answer_text(answer.body)
        if text is None:
            raise ShadowCallError(f"{model}: the answer holds no text")
        return text, usage

    async def _ask_judge(self, query: str, a: str, b: str) -> Any:
        forwarder = self.gw.forwarder
        if forwarder is None:
            raise ShadowCallError("the gateway is stopping")
        if self._judge is None or self._judge_client is not forwarder.client:
            # Built on the upstream client of the running lifespan (one per lifespan).
            from tagrouter_fast.builder.judge import JudgeConfig
            from tagrouter_fast.serve.shadow.judge import PairwiseJudge, http_ask

            cfg = self.runner.config
            jc = JudgeConfig(url=cfg.judge_url, model=cfg.judge_model, api_key=self._judge_key,
                             timeout_s=cfg.timeout_s, retries=0)
            self._judge = PairwiseJudge(http_ask(forwarder.client, jc,
                                                 max_answer_bytes=forwarder.max_answer_bytes))
            self._judge_client = forwarder.client
        return await self._judge(query, a, b)

    # ---- the request path ----

    def steer(self, routed: Routed, *, stream: bool) -> tuple[Routed, ShadowPlan | None]:
        """Who answers a routed-alias request in the current mode, and its shadow plan.

        ``route``: as routed. ``shadow`` (and the default's share of ``ab``): the default
        model, on the chain a direct call to it would take (byte-identical answers). The
        router's decision is kept either way: it is what gets recorded."""
        d = routed.decision
        if d is None:
            return routed, None
        runner, gw = self.runner, self.gw
        cfg = runner.config
        served = routed.chain[0].name
        default = gw.backends.get(cfg.default_model)
        # A default that cannot serve the request (no vision for its image, too short a
        # context...) does not answer it: the routed model, which can, does.
        capable = default is not None and (routed.needs is None
                                            or lacks(default, routed.needs) is None)
        if capable and (cfg.mode == "shadow"
                        or (cfg.mode == "ab" and runner.serve_model(d) != d.model)):
            served = cfg.default_model
            routed = replace(
                routed, reason=REASON_SHADOW if cfg.mode == "shadow" else REASON_AB_DEFAULT,
                chain=gw.chain(served, fallback=gw.config.fallback.passthrough,
                               needs=routed.needs))
        plan = runner.plan(d, served=served)
        return routed, plan

    def after(self, request_id: str, query: str, body: Mapping[str, Any], routed: Routed,
              answered: str, raw: bytes, plan: ShadowPlan | None) -> BackgroundTask | None:
        """The task that records an answered request (and starts its shadow call) once the
        client has the answer; None when there is nothing to record."""
        if routed.decision is None:
            return None
        return BackgroundTask(self._record, request_id, query, body, routed, answered, raw, plan)

    def after_stream(self, request_id: str, query: str, body: Mapping[str, Any],
                     routed: Routed, answered: str, text: str | None,
                     usage: Mapping[str, Any] | None, plan: ShadowPlan | None) -> None:
        """Records a streamed answer once its stream has ended: ``text`` is what was relayed
        (None when the stream did not finish: the decision is recorded, nothing is judged)."""
        if routed.decision is None:
            return
        self._submit(request_id, query, body, routed, answered, text, usage, plan)

    async def _record(self, request_id: str, query: str, body: Mapping[str, Any],
                      routed: Routed, answered: str, raw: bytes,
                      plan: ShadowPlan | None) -> None:
        text, usage = answer_text(raw)
        self._submit(request_id, query, body, routed, answered, text, usage, plan)

    def _submit(self, request_id: str, query: str, body: Mapping[str, Any], routed: Routed,
                answered: str, text: str | None, usage: Mapping[str, Any] | None,
                plan: ShadowPlan | None) -> None:
        try:
            if answered != (plan.served if plan is not None else answered) or text is None:
                # A failover answered (the plan was for another model) or no text to judge:
                # the decision is recorded, nothing is shadowed.
                plan = None
            assert routed.decision is not None
            req = ShadowRequest(request_id, query, body, routed.tags, routed.decision,
                                answered, text or "", usage)
        except Exception:  # never the client's problem
            self.runner.counters.internal_errors += 1
            log.exception("shadow: request %s not recorded", request_id)
            return
        self.runner.submit(req, plan)

    # ---- mode, theta, share ----

    def _initial(self, cfg: ShadowConfig) -> dict[str, Any]:
        return {"mode": cfg.mode, "ab_share": cfg.ab_share, "theta": self.gw.config.router.theta}

    def _restore(self, cfg: ShadowConfig) -> tuple[ShadowConfig, float | None]:
        """The config with the last switch applied, and its theta. A switch made under other
        initial values (the operator edited the config since) gives way to the config."""
        if not self.switch_path.exists():
            return cfg, None
        saved = journal.decode_line(self.switch_path.read_bytes().rstrip(b"\n"))
        if saved is None:
            log.warning("%s: damaged; starting from the config's mode", self.switch_path)
            return cfg, None
        if saved.get("config") != self._initial(cfg):
            log.info("%s: the config changed since the last switch; the config's mode holds",
                     self.switch_path)
            return cfg, None
        try:
            restored = replace(cfg, mode=saved["mode"], ab_share=saved["ab_share"])
        except (KeyError, ValueError) as e:
            log.warning("%s: not a usable switch (%s); the config's mode holds",
                        self.switch_path, e)
            return cfg, None
        theta = saved.get("theta")
        return restored, float(theta) if isinstance(theta, (int, float)) else None

    def switch(self, mode: str | None = None, theta: float | None = None,
               share: float | None = None) -> dict[str, Any]:
        """Switches mode, theta and the ``ab`` share at once (blocking: the theta goes through
        the admin lock and the switch is written durably before it takes effect).

        Raises:
            ConfigError: an invalid combination (e.g. mode ``ab`` without a share > 0).
            OSError: the switch file cannot be written (nothing changed).
        """
        runner = self.runner
        old = runner.config
        mode = old.mode if mode is None else mode
        if mode not in MODES:
            raise ConfigError("mode", f"must be one of {list(MODES)}, got {mode!r}")
        if share is None:
            share = old.ab_share if mode == "ab" else 0.0
        elif mode != "ab":
            raise ConfigError("share", f"only applies to mode 'ab' (mode is {mode!r})")
        new = replace(old, mode=mode, ab_share=share)  # checks the combination
        new_theta = self.gw.router.decider.theta if theta is None else float(theta)
        line = journal.encode_line({
            "t": time.time(), "mode": mode, "ab_share": share, "theta": new_theta,
            "config": self._initial(self.gw.config.shadow or old),
        })
        journal.atomic_replace(self.switch_path, line)
        if theta is not None:
            self.gw.set_theta(new_theta)
        runner.config = new
        runner.note_mode(self.gw.router.decider.theta)
        return self.state()

    def state(self) -> dict[str, Any]:
        cfg = self.runner.config
        return {"mode": cfg.mode, "theta": self.gw.router.decider.theta,
                "share": cfg.ab_share, "default_model": cfg.default_model}

    def note_theta(self) -> None:
        """Records a theta changed by another admin call (``/admin/theta``) in the mode log."""
        self.runner.note_mode(self.gw.router.decider.theta)

    def traffic(self) -> dict[str, Any]:
        """``GET /admin/traffic``: mode, theta and the routed counter's requests per answering
        model and reason."""
        cfg = self.runner.config
        return {"mode": cfg.mode, "theta": self.gw.router.decider.theta,
                "share": cfg.ab_share, "default_model": cfg.default_model,
                "decisions": routed_counts(self.gw.metrics)}

    # ---- lifecycle ----

    async def recover(self) -> None:
        """Feeds the learner the pairs a crash or an outage left unlearned (at start)."""
        n = await self.runner.recover()
        if n:
            log.info("shadow: %d judged pair(s) fed to the learner again", n)

    async def aclose(self) -> None:
        await self.runner.aclose()


class _Collector:
    """The runner's counters, in-flight calls and spend, read at each scrape."""

    def __init__(self, service: ShadowService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        runner = self._service.runner
        stats = runner.stats()
        events = CounterMetricFamily(
            "tagrouter_shadow_events", "Shadow mode: calls started, pairs judged and learned, "
            "and what was dropped or failed, by event", labels=["event"])
        for name in vars(ShadowCounters()):
            events.add_metric([name], float(stats[name]))
        yield events
        yield GaugeMetricFamily("tagrouter_shadow_in_flight",
                                "Shadow calls and judgments in flight",
                                value=float(stats["in_flight"]))
        yield GaugeMetricFamily("tagrouter_shadow_spent_today_usd",
                                "Shadow and judge spend of the current UTC day",
                                value=float(stats["spent_today_usd"]))
        mode = GaugeMetricFamily("tagrouter_shadow_mode", "The current mode (1) among the modes",
                                 labels=["mode"])
        for m in MODES:
            mode.add_metric([m], 1.0 if runner.config.mode == m else 0.0)
        yield mode

