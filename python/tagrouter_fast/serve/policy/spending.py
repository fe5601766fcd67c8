"""What answers cost and who pays: `Spending`, the gateway's prices, charges and key budgets.

Every answered request is charged at the backend that answered (a fallback's price when a
fallback answered), from the usage the backend reported, else estimated from the text (about 4
characters a token, `shadow.spend.CHARS_PER_TOKEN`) and flagged. A backend without a ``price``
is charged tokens only. The charge goes to the caller's key budget (`key_budgets.BudgetBook`),
to ``/metrics`` (``tagrouter_cost_usd_total{key,model}``, ``tagrouter_usage_tokens_total``,
``tagrouter_usage_estimated_total``) and to the answer (`cost_headers`) and access log.

Before routing, `status` says where the caller's key stands; past its limit a routed request is
restricted to the candidates `cheaper` than the model it was routed to, and `refusal` is the
429 (OpenAI's error shape; other protocols render the same `ApiError` in theirs).

Protocol-neutral: an edge module reads the usage and text sizes from its wire format and calls
`charge`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tagrouter_fast.serve.edge.errors import ApiError
from tagrouter_fast.serve.forward.backends import Backend
from tagrouter_fast.serve.learn.keys import ClientKey
from tagrouter_fast.serve.policy.key_budgets import OK, BudgetBook, BudgetStatus
from tagrouter_fast.serve.shadow.spend import CHARS_PER_TOKEN, Charge, Price, usage_tokens

if TYPE_CHECKING:
    from tagrouter_fast.serve.config import Config
    from tagrouter_fast.serve.metrics import GatewayMetrics

__all__ = ["Spending", "cost_headers", "price_order"]

log = logging.getLogger("tagrouter.serve")


def price_order(p: Price) -> float:
    """The number "cheaper" compares: USD per 1k input tokens plus per 1k output tokens."""
    return p.input_per_1k + p.output_per_1k


def cost_headers(charge: Charge | None, priced: bool) -> dict[str, str]:
    """``x-tagrouter-cost-usd`` (when the answering backend has a price) and
    ``x-tagrouter-cost-estimated: 1`` (when the usage was estimated)."""
    if charge is None or not priced:
        return {}
    h = {"x-tagrouter-cost-usd": f"{charge.usd:.8f}"}
    if charge.estimated:
        h["x-tagrouter-cost-estimated"] = "1"
    return h


class Spending:
    """The prices, charges and key budgets of one gateway (``enabled`` when a backend has a
    price or ``[budgets]`` is set; else every method is a no-op)."""

    def __init__(self, config: Config, metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.budgets = config.budgets
        self.enabled = self.budgets is not None or any(
            b.price is not None for b in config.backends)
        self.book: BudgetBook | None = None
        self._warned = 0.0

    # ---- lifecycle ----

    def open(self) -> None:
        """Reads the budget journal back and joins Redis (``[shared]``). Idempotent.

        Raises:
            OSError: the journal cannot be created or read.
        """
        if self.budgets is None or self.book is not None:
            return
        shared = None
        if self.config.shared is not None:
            from tagrouter_fast.serve.learn.shared_budgets import SharedBudgets

            shared = SharedBudgets(self.config.shared)
        self.book = BudgetBook(self.budgets, shared)
        if self.book.damaged:
            log.warning("key budgets: %d damaged line(s) of the journal in %s skipped",
                        self.book.damaged, self.budgets.state_dir)
        if shared is not None:
            shared.start()

    def close(self) -> None:
        if self.book is not None:
            self.book.close()
            self.book = None

    # ---- before routing ----

    def status(self, key: ClientKey) -> BudgetStatus:
        """Where ``key`` stands against its budget (`OK` without budgets)."""
        if self.book is None:
            return OK
        return self.book.status(key.id)

    def refusal(self, status: BudgetStatus, why: str = "") -> ApiError:
        """The 429 of a key past its budget, with ``retry-after`` at the period's end."""
        self.metrics.rejected.labels("budget").inc()
        msg = f"{status.message}; {why or 'requests are refused until the period ends'}"
        return ApiError(429, msg, kind="insufficient_quota", code="budget_exceeded",
                        headers={"retry-after": str(status.retry_after_s)})

    def cheaper(
        self, candidates: Iterable[str], routed: str, backends: Mapping[str, Backend]
    ) -> tuple[list[str], dict[str, str]]:
        """The candidates priced below ``routed``'s backend, and why each other one is out.
        Without a price on ``routed``, none is cheaper."""
        rb = backends.get(routed)
        top = None if rb is None or rb.config.price is None else price_order(rb.config.price)
        allowed: list[str] = []
        out: dict[str, str] = {}
        for name in candidates:
            b = backends.get(name)
            p = None if b is None else b.config.price
            if p is None or top is None:
                out[name] = "over budget: no price to compare"
            elif price_order(p) < top:
                allowed.append(name)
            else:
                out[name] = f"over budget: not cheaper than {routed}"
        return allowed, out

    # ---- after the answer ----

    def charge(
        self, key: ClientKey, backend: Backend, usage: Mapping[str, Any] | None,
        prompt_chars: int, answer_chars: int,
    ) -> Charge | None:
        """Charges one answered request to ``key`` at ``backend``: the reported ``usage``
        (OpenAI's or Anthropic's field names), else an estimate from the characters of the
        prompt and the answer (flagged). None when spending is off. Never raises: a journal
        that cannot be written is logged (the totals in memory still count the charge)."""
        if not self.enabled:
            return None
        counted = usage_tokens(usage)
        if counted is not None:
            t_in, t_out, estimated = counted[0], counted[1], False
        else:
            t_in = math.ceil(prompt_chars / CHARS_PER_TOKEN)
            t_out = math.ceil(answer_chars / CHARS_PER_TOKEN)
            estimated = True
        price = backend.config.price
        usd = price.usd(t_in, t_out) if price is not None else 0.0
        charge = Charge(t_in, t_out, usd, estimated)
        m, name = self.metrics, backend.name
        if price is not None:
            m.cost_usd.labels(key.id, name).inc(usd)
        m.usage_tokens.labels(key.id, name, "input").inc(t_in)
        m.usage_tokens.labels(key.id, name, "output").inc(t_out)
        if estimated:
            m.usage_estimated.labels(key.id, name).inc()
        if self.book is not None:
            try:
                self.book.charge(key.id, name, usd, t_in, t_out, estimated)
            except OSError as e:
                now = time.monotonic()
                if now - self._warned > 60.0:
                    self._warned = now
                    log.error("key budgets: cannot append to the journal in %s (%s); charges "
                              "count in memory only", self.book.config.state_dir, e)
        return charge
