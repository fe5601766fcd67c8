"""What shadow work costs: prices per 1k tokens, usage read from a backend's answer, and a
daily spend ledger with a cap.

Shadow calls and judge calls are paid for and answer nobody, so they run under a daily cap
(UTC days). Each call is priced from the usage its backend reported (OpenAI's
``prompt_tokens``/``completion_tokens`` or Anthropic's ``input_tokens``/``output_tokens``);
when it reported none, the tokens are estimated from the text (about 4 characters a token) and
the charge says ``estimated``. A call is only started when its estimated price fits under the
cap together with what today already spent and what calls in flight reserved, so concurrent
calls cannot overshoot it together.

The ledger is a journal of charges (``shadow_spend.jsonl``, checksummed lines of
`tagrouter_fast.journal`), appended without fsync: an OS crash may lose the newest charges (the
cap then allows a little more that day), never makes the file lie. Today's total is read back
from it on start, so a restart does not reset the cap. Each replica keeps its own ledger: with
N replicas the fleet spends up to N caps.

>>> p = Price(input_per_1k=0.5, output_per_1k=1.5)
>>> c = price_call(p, {"prompt_tokens": 1000, "completion_tokens": 2000}, "", "")
>>> c.usd, c.estimated
(3.5, False)
>>> price_call(p, None, "x" * 400, "y" * 40).tokens_in
100
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tagrouter_fast import journal

__all__ = ["CHARS_PER_TOKEN", "Charge", "Price", "SpendLedger", "price_call", "usage_tokens",
           "utc_day"]

#: Rough characters per token of English text, for calls whose backend reported no usage.
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Price:
    """A model's price in USD per 1,000 input and output tokens."""

    input_per_1k: float
    output_per_1k: float

    def __post_init__(self) -> None:
        for name in ("input_per_1k", "output_per_1k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def usd(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_1k + tokens_out * self.output_per_1k) / 1000.0


@dataclass(frozen=True)
class Charge:
    """One priced call: its tokens, its price, and whether the tokens were estimated."""

    tokens_in: int
    tokens_out: int
    usd: float
    estimated: bool

    def usage(self) -> dict[str, int]:
        return {"in": self.tokens_in, "out": self.tokens_out}

    def __add__(self, other: Charge) -> Charge:
        return Charge(self.tokens_in + other.tokens_in, self.tokens_out + other.tokens_out,
                      self.usd + other.usd, self.estimated or other.estimated)


def _count(v: object) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return None
    return v


def usage_tokens(usage: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """``(input tokens, output tokens)`` of a reported usage, or None when it has no usable
    counts (missing, negative, not integers).

    >>> usage_tokens({"prompt_tokens": 12, "completion_tokens": 5})
    (12, 5)
    >>> usage_tokens({"input_tokens": 3, "output_tokens": 4}), usage_tokens({"total": 9})
    ((3, 4), None)
    """
    if not isinstance(usage, Mapping):
        return None
    for k_in, k_out in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"),
                        ("in", "out")):
        t_in, t_out = _count(usage.get(k_in)), _count(usage.get(k_out))
        if t_in is not None and t_out is not None:
            return t_in, t_out
    return None


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def price_call(
    price: Price, usage: Mapping[str, Any] | None, prompt_text: str, answer_text: str
) -> Charge:
    """The charge of one call: from its reported usage, else estimated from the prompt's and
    the answer's text (flagged ``estimated``)."""
    counted = usage_tokens(usage)
    if counted is not None:
        t_in, t_out = counted
        return Charge(t_in, t_out, price.usd(t_in, t_out), False)
    t_in, t_out = estimate_tokens(prompt_text), estimate_tokens(answer_text)
    return Charge(t_in, t_out, price.usd(t_in, t_out), True)


def utc_day(t: float) -> str:
    """The UTC calendar day of a Unix time, ``YYYY-MM-DD`` (the cap's period)."""
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d")


class SpendLedger:
    """Today's shadow spend against a daily cap, journalled to ``path``.

    Thread-safe (a lock around the totals and the append). ``cap_usd`` None: no cap, charges
    are still journalled.

    Raises:
        OSError: the ledger file cannot be opened or read (the message names it).
    """

    def __init__(self, path: str | os.PathLike[str], cap_usd: float | None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.cap_usd = cap_usd
        self._clock = clock
        self._lock = threading.Lock()
        self._day = utc_day(clock())
        self._spent = 0.0
        self._reserved = 0.0
        #: Lines of the file that failed their check when it was read (skipped, reported).
        self.damaged = 0
        if self.path.exists():
            for line in journal.scan(self.path):
                p = line.payload
                if p is None:
                    self.damaged += 1
                elif p.get("day") == self._day and isinstance(p.get("usd"), (int, float)):
                    self._spent += float(p["usd"])
        self._fd = journal.open_append(self.path)

    def _roll_locked(self) -> None:
        day = utc_day(self._clock())
        if day != self._day:  # a new UTC day: the cap starts over (reservations carry on)
            self._day, self._spent = day, 0.0

    def spent_today(self) -> float:
        with self._lock:
            self._roll_locked()
            return self._spent

    def reserve(self, usd: float) -> bool:
        """Sets ``usd`` aside for a call about to start, if it fits under today's cap with
        what was spent and reserved; False (nothing reserved) when it does not."""
        with self._lock:
            self._roll_locked()
            if self.cap_usd is not None and self._spent + self._reserved + usd > self.cap_usd:
                return False
            self._reserved += usd
            return True

    def release(self, usd: float) -> None:
        """Gives back a reservation (the call finished, was charged or failed)."""
        with self._lock:
            self._reserved = max(0.0, self._reserved - usd)

    def charge(self, kind: str, model: str, request_id: str, charge: Charge) -> None:
        """Adds a call's price to today's spend and journals it (no fsync). A failed append is
        logged by the caller's counters, never raised into the request path: the total in
        memory still counts it, so the cap holds in this process.

        Raises:
            OSError: the append failed (the charge is counted all the same).
        """
        t = self._clock()
        line = journal.encode_line({
            "t": t, "day": utc_day(t), "kind": kind, "model": model, "id": request_id,
            "usd": charge.usd, "in": charge.tokens_in, "out": charge.tokens_out,
            "estimated": charge.estimated,
        })
        with self._lock:
            self._roll_locked()
            self._spent += charge.usd
            journal.write_all(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
