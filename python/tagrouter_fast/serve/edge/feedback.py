"""``POST /v1/route`` (a decision without a call: the client calls the model itself) and
``POST /v1/feedback`` (an outcome for a decision token): bodies checked here, the decision
and the learning done by policy (`Gateway.decide`) and the learner."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tagrouter_fast.core import Decision, finite_for_json
from tagrouter_fast.serve.edge.auth import authenticate, check_override
from tagrouter_fast.serve.edge.bodies import read_json, route_options
from tagrouter_fast.serve.edge.errors import ApiError, bad
from tagrouter_fast.serve.learn.keys import FEEDBACK, ROUTE, ClientKey
from tagrouter_fast.serve.learn.state import DuplicateOutcome, OutcomeStoreError, UnknownDecision
from tagrouter_fast.serve.learn.tokens import DecisionClaims, TokenError

if TYPE_CHECKING:
    from tagrouter_fast.serve.policy.gateway import Gateway

__all__ = ["feedback", "route_only", "verify_decision"]


async def route_only(gw: Gateway, request: Request) -> Response:
    key = authenticate(gw, request, ROUTE, "POST /v1/route")
    body = await read_json(request, gw.config.limits.max_body_bytes)
    theta, share = route_options(body, request)
    check_override(gw, key, theta, share)
    extra = sorted(set(body) - {"query", "queries"})
    if extra:
        raise bad(extra[0], "unknown field (known: query, queries, tagrouter)")
    if ("query" in body) == ("queries" in body):
        raise bad("query", "give exactly one of query (a string) or queries (an array)")
    if "query" in body:
        q = body["query"]
        if not isinstance(q, str):
            raise bad("query", "must be a string")
        theta = await gw.request_theta(theta, share)
        tags, d = await gw.decide(q, theta)
        return JSONResponse(_route_answer(gw, tags, d, key))
    qs = body["queries"]
    if not isinstance(qs, list) or not qs:
        raise bad("queries", "must be a non-empty array of strings")
    limit = gw.config.router.max_batch
    if len(qs) > limit:
        raise bad("queries", f"{len(qs)} queries is over the batch limit of {limit}")
    for i, q in enumerate(qs):
        if not isinstance(q, str):
            raise bad(f"queries[{i}]", "must be a string")
    theta = await gw.request_theta(theta, share)
    results = await anyio.to_thread.run_sync(gw.decide_many, qs, theta)
    return JSONResponse({"decisions": [_route_answer(gw, t, d, key) for t, d in results]})


def _route_answer(gw: Gateway, tags: list[str], d: Decision, key: ClientKey) -> dict[str, Any]:
    explanation: dict[str, Any] = finite_for_json(d.to_dict())
    explanation["tags"] = list(tags)
    return {
        "decision_id": gw.decided(tags, d, key), "model": d.model, "reason": d.reason,
        "tags": tags, "explanation": explanation,
    }


async def feedback(gw: Gateway, request: Request) -> Response:
    key = authenticate(gw, request, FEEDBACK, "POST /v1/feedback")
    body = await read_json(request, gw.config.limits.max_body_bytes)
    learner = gw.learner
    if learner is None:
        gw.metrics.feedback.labels("unavailable").inc()
        raise ApiError(503, "feedback is off: set [feedback] state_dir in the config",
                       kind="server_error")
    extra = sorted(set(body) - {"decision_id", "outcome"})
    if extra:
        raise bad(extra[0], "unknown field (known: decision_id, outcome)")
    did = body.get("decision_id")
    if not isinstance(did, str) or not did:
        gw.metrics.feedback.labels("invalid").inc()
        raise bad("decision_id", "missing" if did is None else "must be a non-empty string")
    outcome = body.get("outcome")
    if outcome is None:
        gw.metrics.feedback.labels("invalid").inc()
        raise bad("outcome", "missing (win, tie, loss or a score)")
    if isinstance(outcome, bool) or not isinstance(outcome, (str, int, float)):
        gw.metrics.feedback.labels("invalid").inc()
        raise bad("outcome", "must be win, tie, loss or a number")
    wait = gw.keyring.feedback_wait(key)
    if wait > 0:
        gw.metrics.feedback.labels("rate_limited").inc()
        raise ApiError(429, f"feedback rate limit of key {key.id!r} "
                       f"({key.feedback_per_s:g}/s): retry in {wait:.2f} s",
                       kind="rate_limit_error", code="feedback_rate_limit",
                       headers={"retry-after": str(max(1, math.ceil(wait)))})
    claims = verify_decision(gw, did, key)
    decision = (claims.tags, claims.model, claims.issued)
    try:
        # The local learner appends on the loop and waits for its group commit (no worker
        # thread per request); the shared one checks Redis in a worker thread.
        version = await learner.feedback_async(claims.id, outcome, decision=decision,
                                               key=key.id)
    except UnknownDecision as e:
        # With the decision in hand the store only refuses one past its idempotency window
        # (decision_ttl_s, or evicted by max_decisions): counting it could count it twice.
        gw.metrics.feedback.labels("expired").inc()
        raise ApiError(410, f"decision_id: {e}", param="decision_id",
                       code="expired_decision") from None
    except DuplicateOutcome:
        gw.metrics.feedback.labels("duplicate").inc()
        raise ApiError(409, f"decision_id: decision {did!r} already has an outcome",
                       param="decision_id", code="duplicate_outcome") from None
    except ValueError as e:
        gw.metrics.feedback.labels("invalid").inc()
        raise bad("outcome", str(e)) from None
    except OutcomeStoreError as e:
        gw.metrics.feedback.labels("unavailable").inc()
        raise ApiError(503, f"feedback not recorded: {e}", kind="server_error") from None
    gw.metrics.feedback.labels("accepted").inc()
    return JSONResponse({"decision_id": did, "outcome": outcome, "version": version})


def verify_decision(gw: Gateway, did: str, key: ClientKey) -> DecisionClaims:
    """The claims of ``did``, a decision token issued to ``key`` for a model still routed.
    No lookup: any replica holding the secret verifies any replica's token at once."""
    try:
        claims = gw.tokens.verify(did)
    except TokenError as e:
        gw.metrics.feedback.labels(e.code.removesuffix("_decision")).inc()
        raise ApiError(e.status, str(e), param="decision_id", code=e.code) from None
    if claims.key != key.id:
        gw.metrics.feedback.labels("forbidden").inc()
        raise ApiError(403, f"decision_id: issued to another key than {key.id!r}; a key "
                       "may post outcomes only for its own decisions", param="decision_id",
                       kind="permission_error", code="not_your_decision")
    if claims.model not in gw.router.decider.store_models:  # no store snapshot
        gw.metrics.feedback.labels("stale").inc()
        raise ApiError(410, f"decision_id: its model {claims.model!r} is no longer in the "
                       "store", param="decision_id", code="stale_decision")
    return claims
