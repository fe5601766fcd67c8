"""Routing policy (policy's second layer): which backends a request goes to, and why.

Per request: the model asked for is an alias (route it) or a backend (passthrough, refused
with a 400 when that backend lacks what the request needs); the `candidates` are the routed
models whose backends can serve the request's needs (`capabilities`: tools, images,
structured output, context; and whatever the session's conversation used before), none left
is a 400 naming the need; a session mid tool-call loop stays on its model when it still can;
else the query is decided on the current store (`TagRouter.decide_many`, the router's one
composition) at the request's theta (its own, or its share budget's), restricted to the
candidates (the decider's ``among``: the same rule and explanation over the subset), and a
session moves only past its switch margin. The decision's backend leads the fallback chain,
which holds only backends that can serve. After the answer: metrics, the decision token, the
session (its model, tags and the capabilities used).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from tagrouter_fast.core import Decision
from tagrouter_fast.serve.edge.errors import ApiError
from tagrouter_fast.serve.forward.backends import Backend
from tagrouter_fast.serve.learn.keys import OVERRIDE, ClientKey
from tagrouter_fast.serve.policy.capabilities import NEED_WORDS, Needs, lacks
from tagrouter_fast.serve.policy.key_budgets import BudgetStatus
from tagrouter_fast.serve.policy.sessions import in_tool_loop, keep_or_switch
from tagrouter_fast.serve.policy.state import GatewayState

__all__ = ["Routed", "Routing"]

log = logging.getLogger("tagrouter.serve")


@dataclass
class Routed:
    """How one request is sent: the backends to try, and why the first."""

    chain: list[Backend]
    reason: str
    tags: list[str] = field(default_factory=list)
    decision: Decision | None = None
    session: str | None = None
    #: Candidates left out of this request's decision, and why (a key over its budget).
    filtered: dict[str, str] = field(default_factory=dict)
    #: The capabilities the conversation has used so far (remembered with its session).
    used: frozenset[str] = frozenset()
    #: What the request needs of a backend (`capabilities`).
    needs: Needs | None = None


class Routing(GatewayState):
    """The routing layer: decisions, the fallback chain, passthrough, sessions, tokens."""

    # ---- deciding ----

    def _decide(
        self, text: str, theta: float | None, extra: Sequence[str] = (),
        among: Sequence[str] | None = None,
    ) -> tuple[list[str], Decision]:
        t0 = time.perf_counter()
        batch = self.router.decide_many(
            [text], theta=theta, extra_tags=[extra] if extra else None,
            max_query_chars=self.config.router.max_query_chars, on_tagger_error="untagged",
        )
        if among is None:
            d = batch.decisions()[0]
        else:
            d = batch.decider.decide(batch.tags[0], among=among)
        self.metrics.decision_seconds.observe(time.perf_counter() - t0)
        return batch.tags[0], d

    async def decide(
        self, text: str, theta: float | None, extra: Sequence[str] = (),
        among: Sequence[str] | None = None,
    ) -> tuple[list[str], Decision]:
        """The tags and decision of one query (tagged in a worker thread when tagging is slow
        enough to be worth the hop, `GatewayState._warm_up`), among the routed models
        ``among`` (None: all)."""
        if self.tag_in_thread and text.strip():
            return await anyio.to_thread.run_sync(self._decide, text, theta, extra, among)
        return self._decide(text, theta, extra, among)

    def decide_many(
        self, qs: list[str], theta: float | None
    ) -> list[tuple[list[str], Decision]]:
        """Tags and decisions of a batch (blocking: call it in a worker thread)."""
        t0 = time.perf_counter()
        batch = self.router.decide_many(
            qs, theta=theta, max_query_chars=self.config.router.max_query_chars,
            on_tagger_error="untagged",
        )
        out = list(zip(batch.tags, batch.decisions(), strict=True))
        self.metrics.decision_seconds.observe((time.perf_counter() - t0) / len(qs))
        return out

    async def request_theta(self, theta: float | None, share: float | None) -> float | None:
        """The theta of a request: its own, or its ``llm_share``'s on the recent traffic
        (`ShareBudget.request_theta`)."""
        return await self.budget.request_theta(self.router.decider, theta, share)

    # ---- where a request may go ----

    def candidates(self, needs: Needs | None = None) -> tuple[str, ...]:
        """The routed models whose backends can serve a request needing ``needs``
        (`capabilities.lacks`), in the decider's order.

        Raises:
            ApiError: 400 naming the need, when no routed model can serve it.
        """
        models = self.router.decider.models
        if needs is None or (not needs.features and needs.max_tokens is None
                             and not self._limits_context):
            return tuple(models)
        out: list[str] = []
        unfit: dict[str, str] = {}
        backends = self.backends
        for m in models:
            b = backends.get(m)
            why = "no backend" if b is None else lacks(b, needs)
            if why is None:
                out.append(m)
            else:
                unfit[m] = why
        if not out:
            raise cannot_serve("no routed model", unfit)
        return tuple(out)

    @property
    def _limits_context(self) -> bool:
        return any(b.config.max_context_tokens is not None for b in self.backends.values())

    def chain(self, first: str, *, fallback: bool, needs: Needs | None = None) -> list[Backend]:
        """``first``'s backend, then (``fallback``) the others of ``fallback.order`` that can
        serve ``needs``, up to ``fallback.max_attempts`` in all."""
        backends = self.backends
        b = backends.get(first)
        if b is None:
            raise ApiError(503, f"model {first!r} has no backend", kind="server_error")
        out = [b]
        if fallback:
            limit = self.config.fallback.max_attempts
            for name in self.config.fallback.order:
                if len(out) >= limit:
                    break
                nb = backends.get(name)
                if nb is not None and nb not in out and (needs is None or lacks(nb, needs) is None):
                    out.append(nb)
        return out

    def passthrough(self, model: str) -> Backend | None:
        """The backend a client names (by backend name or upstream model id), if any."""
        backends = self.backends
        if model in backends:
            return backends[model]
        for b in backends.values():
            if b.model == model:
                return b
        return None

    # ---- one request ----

    async def route_request(
        self, model: str, text: str, messages: Sequence[Mapping[str, Any]] | None,
        caller: ClientKey, *, theta: float | None = None, share: float | None = None,
        session: str | None = None, needs: Needs | None = None, tool_loop: bool | None = None,
    ) -> Routed:
        """Where a request for ``model`` goes (``theta``/``share``: its own operating point,
        already allowed; ``session``: its session key, if any; ``needs``: what it needs of a
        backend (`capabilities`); ``tool_loop``: whether it is mid tool-call loop, else read
        from the chat ``messages``).

        Raises:
            ApiError: an unknown model (400), a need no candidate serves (400, naming it), a
                share with no traffic to calibrate it on (400), a decision for a model without
                a backend (503), a key past its budget (429; with ``over_budget = "cheaper"``
                only once no cheaper candidate is left, or past ``cheaper_until``).
        """
        budget = self.spending.status(caller)
        if budget.level == "exhausted":
            raise self.spending.refusal(budget)
        args = (model, text, messages, caller, theta, share, session, needs or Needs(),
                tool_loop)
        if budget.level == "over":
            if model not in self.aliases:  # the client chose the model: nothing to restrict
                raise self.spending.refusal(budget, "a request naming its model is refused; "
                                            f"ask for {sorted(self.aliases)[0]!r} to be routed "
                                            "to a cheaper model")
            routed = await self._route(*args)
            return self._cheaper(routed, budget, theta)
        return await self._route(*args)

    def _cheaper(self, routed: Routed, budget: BudgetStatus, theta: float | None) -> Routed:
        """``routed`` decided again among the candidates cheaper than its model (a key over
        its budget) that can serve the request, its fallback chain kept to them.

        Raises:
            ApiError: no cheaper candidate (429).
        """
        first = routed.chain[0].name
        allowed, filtered = self.spending.cheaper(self.candidates(routed.needs), first,
                                                  self.backends)
        if not allowed:
            raise self.spending.refusal(budget, f"no candidate is cheaper than {first!r}, the "
                                        "model this request was routed to")
        dec = self.router.decider
        # The operating point the routed decision used (a share resolved to its theta).
        if routed.decision is not None:
            theta = routed.decision.theta
        if theta is not None and theta != dec.theta:
            dec = dec.with_theta(theta)
        d = dec.decide(routed.tags, among=allowed)
        chain = [b for b in self.chain(d.model, fallback=True, needs=routed.needs)
                 if b.name in allowed]
        return Routed(chain, "over_budget", routed.tags, d, routed.session, filtered,
                      routed.used, routed.needs)

    async def _route(
        self, model: str, text: str, messages: Sequence[Mapping[str, Any]] | None,
        caller: ClientKey, theta: float | None, share: float | None, session: str | None,
        needs: Needs, tool_loop: bool | None,
    ) -> Routed:
        if model not in self.aliases:
            b = self.passthrough(model)
            if b is None:
                known = sorted(self.aliases) + sorted(self.backends)
                raise ApiError(400, f"model: unknown model {model!r}; known: {known}",
                               param="model", code="model_not_found")
            why = lacks(b, needs)
            if why is not None:
                raise cannot_serve(f"model {model!r}", {b.name: why})
            fb = self.config.fallback.passthrough
            tags: list[str] = []
            if self.config.router.learn_passthrough and b.name in self.router.decider.models \
                    and OVERRIDE in caller.scopes:
                # Tagged only to learn from the outcome: the model is the client's choice, so
                # scoring it is an override (else "pick small, report a win" teaches the router).
                tags, _ = await self.decide(text, None)
            return Routed(self.chain(b.name, fallback=fb, needs=needs), "passthrough", tags,
                          needs=needs)
        sess = self.sessions.get(session) if session is not None else None
        if sess is not None:
            # A conversation keeps needing what it used (its turns still hold the images and
            # tool calls; a model without them would fail or lose them).
            needs = needs.with_features(sess.used)
        used = needs.features - {"completions"}
        among = self.candidates(needs)
        if tool_loop is None:
            tool_loop = messages is not None and in_tool_loop(messages)
        if sess is not None and tool_loop and sess.model in self.backends \
                and lacks(self.backends[sess.model], needs) is None:
            # Mid tool-call loop: the model that issued the calls reads their results.
            return Routed(self.chain(sess.model, fallback=True, needs=needs), "tool_loop",
                          list(sess.tags), None, session, used=used, needs=needs)
        extra = sess.tags if (sess is not None and self.config.router.previous_turn_tags) else ()
        theta = await self.request_theta(theta, share)
        restricted = among if len(among) < len(self.router.decider.models) else None
        tags, d = await self.decide(text, theta, extra, restricted)
        self.budget.note(tags)
        chosen, reason = d.model, d.reason
        if sess is not None:
            chosen, _ = keep_or_switch(
                sess.model, d, self.config.sessions.switch_margin, among
            )
            if chosen != d.model:
                reason = "session"
        return Routed(self.chain(chosen, fallback=True, needs=needs), reason, tags, d, session,
                      used=used, needs=needs)

    # ---- after the decision ----

    def remember(self, decision_id: str, tags: Sequence[str], model: str, key: ClientKey) -> str:
        """The id of a decision that may be scored: a signed token carrying the tags, the
        model and the key (any replica verifies it; nothing is stored until an outcome comes).
        ``decision_id`` (a plain id) when the token would be too long."""
        token = self.tokens.issue(key.id, model, tags)
        if token is None:
            now = time.monotonic()
            if now - self._token_warned > 60.0:
                self._token_warned = now
                log.warning("decision %s: %d tags make a decision token over the size limit; "
                            "this answer cannot be scored", decision_id, len(tags))
            return decision_id
        return token

    def answered(self, decision_id: str, routed: Routed, answered: str, errors: Sequence[Any],
                 key: ClientKey) -> str:
        """Book-keeping of an answered request; returns the id its headers carry."""
        self.metrics.routed.labels(answered, "failover" if errors else routed.reason).inc()
        if routed.reason != "passthrough" or (routed.tags and not errors):
            # A passthrough is remembered only when tagged (learn_passthrough) and answered by
            # the model the client asked for.
            decision_id = self.remember(decision_id, routed.tags, answered, key)
        if routed.session is not None:
            self.sessions.put(routed.session, answered, routed.tags, routed.used)
        return decision_id

    def decided(self, tags: list[str], d: Decision, key: ClientKey) -> str:
        """Book-keeping of a ``/v1/route`` decision; returns its id. Remembered like a
        forwarded decision: a client that calls the model itself can still report the
        outcome."""
        self.budget.note(tags)
        decision_id = self.remember(uuid.uuid4().hex, tags, d.model, key)
        self.metrics.routed.labels(d.model, d.reason).inc()
        return decision_id


def cannot_serve(what: str, unfit: Mapping[str, str]) -> ApiError:
    """The 400 of a request that ``what`` cannot serve: each model and the need it lacks."""
    needs = sorted({why.split(" ", 1)[0] for why in unfit.values()} - {"no"})
    said = ", ".join(NEED_WORDS.get(n, n) for n in needs) or "a backend"
    lacking = "; ".join(f"{m} lacks {why}" for m, why in unfit.items())
    return ApiError(400, f"{what} can serve this request: it needs {said} ({lacking}); see "
                    "docs/serving.md, \"Routing by capability\"",
                    param=needs[0] if len(needs) == 1 else None, code="no_capable_model")
