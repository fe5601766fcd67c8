"""Per-key spending budgets (``[budgets]``): what each client key may spend per UTC day and
month, in USD and in tokens, and what it has spent.

A key's spend is charged at the model that answered (`policy.spending`), from the usage the
backend reported or an estimate. This module holds the limits and the totals:

- `BudgetsConfig`: the ``[budgets]`` table (``over_budget``, ``cheaper_until``, ``state_dir``,
  ``[budgets.default]`` and ``[budgets.keys.<key id>]`` limits);
- `BudgetBook`: the totals per key and period, journalled to ``budgets-<YYYY-MM>.jsonl`` in the
  state directory (checksummed lines of `tagrouter_fast.journal`, no fsync: an OS crash may lose
  the newest charges, never makes the file lie) and read back on start, so a restart does not
  reset a budget. With ``[shared]`` set the totals of every replica meet in Redis
  (`learn.shared_budgets`), and a key's spend is the larger of this replica's journal and the
  shared total plus what this replica has not sent yet.

Levels: ``ok`` (under every limit); ``over`` (a limit reached, with ``over_budget = "cheaper"``
and below ``cheaper_until`` times the limit: routed requests go to cheaper candidates only);
``exhausted`` (429). Checks happen before a request and charges after it, so requests in flight
together may pass a limit by their own cost.

>>> cfg = BudgetsConfig.from_dict({"keys": {"app1": {"usd_per_day": 1.0}}}, Path("."),
...                               Path("/tmp/state"), ())
>>> cfg.limits_for("app1").usd_per_day, cfg.limits_for("other") is None
(1.0, True)
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tagrouter_fast import journal
from tagrouter_fast.serve.config import BackendConfig, ConfigError

if TYPE_CHECKING:
    from tagrouter_fast.serve.learn.shared_budgets import SharedBudgets

__all__ = ["BudgetBook", "BudgetStatus", "BudgetsConfig", "Limits", "OVER_BUDGET", "periods"]

OVER_BUDGET = ("cheaper", "reject")
Level = Literal["ok", "over", "exhausted"]
_LIMITS = (("usd_per_day", "usd", "d"), ("usd_per_month", "usd", "m"),
           ("tokens_per_day", "tokens", "d"), ("tokens_per_month", "tokens", "m"))


def periods(t: float) -> tuple[str, str]:
    """The UTC day and month of a Unix time: ``("d:YYYY-MM-DD", "m:YYYY-MM")``.

    >>> periods(0.0)
    ('d:1970-01-01', 'm:1970-01')
    """
    dt = datetime.fromtimestamp(t, tz=timezone.utc)
    return "d:" + dt.strftime("%Y-%m-%d"), "m:" + dt.strftime("%Y-%m")


def _seconds_to_next(period: str, t: float) -> int:
    """Seconds from ``t`` until ``period`` (a day or a month) ends: a 429's retry-after."""
    dt = datetime.fromtimestamp(t, tz=timezone.utc)
    if period.startswith("d:"):
        end = datetime(dt.year, dt.month, dt.day, tzinfo=timezone.utc).timestamp() + 86400
    else:
        y, m = (dt.year + 1, 1) if dt.month == 12 else (dt.year, dt.month + 1)
        end = datetime(y, m, 1, tzinfo=timezone.utc).timestamp()
    return max(1, math.ceil(end - t))


# ==== Config ====


@dataclass(frozen=True)
class Limits:
    """One key's limits; None: no limit of that kind."""

    usd_per_day: float | None = None
    usd_per_month: float | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    @property
    def has_usd(self) -> bool:
        return self.usd_per_day is not None or self.usd_per_month is not None

    @classmethod
    def from_dict(cls, raw: object, where: str) -> Limits:
        if not isinstance(raw, Mapping):
            raise ConfigError(where, f"must be a table, got {type(raw).__name__}")
        known = [name for name, _, _ in _LIMITS]
        for k in raw:
            if k not in known:
                raise ConfigError(f"{where}.{k}", f"unknown key (known: {', '.join(known)})")
        if not raw:
            raise ConfigError(where, f"sets no limit (give one of {', '.join(known)})")
        out: dict[str, Any] = {}
        for name, unit, _ in _LIMITS:
            v = raw.get(name)
            if v is None:
                continue
            if unit == "tokens":
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ConfigError(f"{where}.{name}", f"must be an integer >= 0, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or \
                    not math.isfinite(v) or v < 0:
                raise ConfigError(f"{where}.{name}", f"must be a finite number >= 0, got {v!r}")
            out[name] = float(v) if unit == "usd" else v
        return cls(**out)


@dataclass(frozen=True)
class BudgetsConfig:
    """The ``[budgets]`` table.

    ``over_budget``: "cheaper" (a key past a limit is routed among the candidates priced below
    the routed model, until it reaches ``cheaper_until`` times the limit, then 429) or "reject"
    (429 at the limit). ``default``: the limits of every key without its own entry in ``keys``
    (anonymous callers included, as one principal). ``state_dir``: where the journal lives
    (default: ``[feedback] state_dir``).
    """

    state_dir: Path
    keys: Mapping[str, Limits] = field(default_factory=dict)
    default: Limits | None = None
    over_budget: str = "cheaper"
    cheaper_until: float = 1.25

    def limits_for(self, key_id: str) -> Limits | None:
        return self.keys.get(key_id, self.default)

    @classmethod
    def from_dict(cls, raw: object, base: Path, feedback_dir: Path | None,
                  backends: Sequence[BackendConfig]) -> BudgetsConfig:
        """Checks a parsed ``[budgets]`` table (each mistake one `ConfigError` naming
        ``budgets.<key>``); ``base`` anchors a relative ``state_dir``.

        Raises:
            ConfigError: a bad value, no state directory, or a USD limit while a backend has
                no ``price``.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError("budgets", f"must be a table, got {type(raw).__name__}")
        known = ("state_dir", "keys", "default", "over_budget", "cheaper_until")
        for k in raw:
            if k not in known:
                raise ConfigError(f"budgets.{k}", "unknown key")
        over = raw.get("over_budget", "cheaper")
        if over not in OVER_BUDGET:
            raise ConfigError("budgets.over_budget", f"must be one of {list(OVER_BUDGET)}, got "
                              f"{over!r}")
        until = raw.get("cheaper_until", 1.25)
        if isinstance(until, bool) or not isinstance(until, (int, float)) or \
                not math.isfinite(until) or until < 1.0:
            raise ConfigError("budgets.cheaper_until", f"must be a number >= 1 (a multiple of "
                              f"the limit), got {until!r}")
        sd = raw.get("state_dir")
        if sd is not None:
            if not isinstance(sd, str) or not sd.strip():
                raise ConfigError("budgets.state_dir", f"must be a non-empty string, got {sd!r}")
            p = Path(sd).expanduser()
            state_dir = p if p.is_absolute() else base / p
        elif feedback_dir is not None:
            state_dir = feedback_dir
        else:
            # Budgets kept in memory only would reset on every restart: refused, not assumed.
            raise ConfigError("budgets.state_dir", "missing: budgets are journalled so that a "
                              "restart keeps them; set budgets.state_dir or [feedback] state_dir")
        raw_keys = raw.get("keys", {})
        if not isinstance(raw_keys, Mapping):
            raise ConfigError("budgets.keys", "must be a table of [budgets.keys.<key id>]")
        keys = {str(k): Limits.from_dict(v, f"budgets.keys.{k}") for k, v in raw_keys.items()}
        default = None if raw.get("default") is None else \
            Limits.from_dict(raw["default"], "budgets.default")
        if any(lim.has_usd for lim in [*keys.values(), *([default] if default else [])]):
            for i, b in enumerate(backends):
                if b.price is None:
                    raise ConfigError(f"backends[{i}].price", f"missing: a USD budget needs "
                                      f"the price of every backend ({b.name!r} has none)")
        return cls(state_dir=state_dir, keys=keys, default=default, over_budget=over,
                   cheaper_until=float(until))


# ==== Totals ====


@dataclass(frozen=True)
class BudgetStatus:
    """Where a key stands: ``level`` and, past a limit, which one and by how much."""

    level: Level
    message: str = ""
    #: Seconds until the period of the limit that decided the level ends (for retry-after).
    retry_after_s: int = 0


OK = BudgetStatus("ok")


class BudgetBook:
    """The spend of every key per UTC day and month, journalled and read back on start.

    Thread-safe (one lock around the totals and the append).

    Args:
        config: the ``[budgets]`` table.
        shared: the Redis link of ``[shared]`` (None: this replica's totals alone).
        clock: the time source (tests move it).

    Raises:
        OSError: the journal cannot be created or read (the message names it).
    """

    def __init__(self, config: BudgetsConfig, shared: SharedBudgets | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.shared = shared
        self._clock = clock
        self._lock = threading.Lock()
        #: (key id, period) -> [usd, tokens], for the current day and month.
        self._totals: dict[tuple[str, str], list[float]] = {}
        #: Lines of the journal that failed their check when read (skipped, counted).
        self.damaged = 0
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self._day, self._month = periods(clock())
        self._fd = -1
        self._open_month()

    def _path(self, month: str) -> Path:
        return self.config.state_dir / f"budgets-{month[2:]}.jsonl"

    def _open_month(self) -> None:
        path = self._path(self._month)
        if path.exists():
            for line in journal.scan(path):
                p = line.payload
                if p is None or not isinstance(p.get("key"), str) or \
                        not isinstance(p.get("usd"), (int, float)) or \
                        not isinstance(p.get("tokens"), int):
                    self.damaged += 1
                    continue
                self._add_locked(p["key"], p.get("day"), float(p["usd"]), p["tokens"])
        self._fd = journal.open_append(path)

    def _add_locked(self, key: str, day: object, usd: float, tokens: int) -> None:
        for period in (self._month, day if day == self._day else None):
            if period is not None:
                t = self._totals.setdefault((key, period), [0.0, 0])
                t[0] += usd
                t[1] += tokens

    def _roll_locked(self) -> None:
        day, month = periods(self._clock())
        if month != self._month:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._day, self._month, self._totals = day, month, {}
            self._open_month()
        elif day != self._day:
            self._totals = {k: v for k, v in self._totals.items() if k[1] != self._day}
            self._day = day

    def spent(self, key_id: str, period: str) -> tuple[float, float]:
        """``(usd, tokens)`` spent by ``key_id`` in ``period`` (``"day"`` or ``"month"``), all
        replicas together when shared."""
        with self._lock:
            self._roll_locked()
            p = self._day if period in ("day", "d") else self._month
            local = self._totals.get((key_id, p), [0.0, 0])
            usd, tokens = float(local[0]), float(local[1])
        if self.shared is not None:
            s = self.shared.total(key_id, p)
            if s is not None:
                usd, tokens = max(usd, s[0]), max(tokens, s[1])
        return usd, tokens

    def status(self, key_id: str) -> BudgetStatus:
        """The key's level against its limits (`OK` when it has none)."""
        limits = self.config.limits_for(key_id)
        if limits is None:
            return OK
        if self.shared is not None:
            self.shared.track(key_id)
        worst, what, which = 0.0, "", "d"
        for name, unit, per in _LIMITS:
            limit = getattr(limits, name)
            if limit is None:
                continue
            spent = self.spent(key_id, per)[0 if unit == "usd" else 1]
            ratio = spent / limit if limit > 0 else math.inf
            if ratio >= 1.0 and ratio >= worst:
                worst, which = ratio, per
                amount = f"{spent:.4f} of {limit:.4f} USD" if unit == "usd" else \
                    f"{int(spent)} of {int(limit)} tokens"
                what = f"{amount} this UTC {'day' if per == 'd' else 'month'}"
        if worst < 1.0:
            return OK
        cfg = self.config
        now = self._clock()
        period = periods(now)[0 if which == "d" else 1]
        retry = _seconds_to_next(period, now)
        level: Level = "exhausted" if cfg.over_budget == "reject" or \
            worst >= cfg.cheaper_until else "over"
        return BudgetStatus(level, f"key {key_id!r} is over its budget ({what})", retry)

    def charge(self, key_id: str, model: str, usd: float, tokens_in: int, tokens_out: int,
               estimated: bool) -> None:
        """Adds one answered request to the key's day and month, journals it (no fsync) and
        hands it to the Redis link. The totals count it even when the append fails.

        Raises:
            OSError: the append failed (the charge is counted all the same).
        """
        t = self._clock()
        tokens = tokens_in + tokens_out
        with self._lock:
            self._roll_locked()
            self._add_locked(key_id, self._day, usd, tokens)
            day, month = self._day, self._month
            line = journal.encode_line({
                "t": round(t, 3), "day": day, "key": key_id, "model": model, "usd": usd,
                "tokens": tokens, "in": tokens_in, "out": tokens_out, "estimated": estimated,
            })
            if self.shared is not None:
                self.shared.push(key_id, (day, month), usd, tokens)
            journal.write_all(self._fd, line)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
