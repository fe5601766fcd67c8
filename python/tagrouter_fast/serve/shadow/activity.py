"""The report's bookkeeping sections: traffic and learning progress, spend against the cap and
the mode history of a shadow state directory (`tagrouter_fast.serve.shadow.report` puts them
beside its estimates)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from tagrouter_fast.serve.shadow.records import ShadowRecords


def rounded(x: Any) -> float | None:
    """A report number: 6 decimals (a stable JSON), None for a missing or non-finite one."""
    if x is None:
        return None
    x = float(x)
    return round(x, 6) + 0.0 if math.isfinite(x) else None  # + 0.0: no "-0.0"


_r = rounded


def traffic(rec: ShadowRecords, decisions: list[dict[str, Any]], pairs: list[dict[str, Any]],
            orphan_pairs: int) -> dict[str, Any]:
    """Decisions, judged pairs, who served, what became of shadow calls and of learning, and
    the learning progress over time."""
    marks = Counter(str(m.get("how")) for m in rec.learned)
    pair_ids = {p["pair"] for p in pairs}
    marked = {m["pair"] for m in rec.learned} & pair_ids
    ts = [d["t"] for d in decisions]
    return {
        "decisions": len(decisions), "pairs": len(pairs), "orphan_pairs": orphan_pairs,
        "served": dict(sorted(Counter(d["served"] for d in decisions).items())),
        "shadow": dict(sorted(Counter(str(d.get("shadow")) for d in decisions).items())),
        "learned": dict(sorted(marks.items())), "not_yet_learned": len(pair_ids - marked),
        "first_t": _r(min(ts)) if ts else None, "last_t": _r(max(ts)) if ts else None,
        "progress": _progress(ts, [p["t"] for p in pairs]),
    }


#: Points of the learning-progress series (the dashboard's "judged pairs over time").
PROGRESS_POINTS = 24


def _progress(decision_ts: list[float], pair_ts: list[float]) -> list[dict[str, Any]]:
    """Cumulative decisions and judged pairs at `PROGRESS_POINTS` evenly spaced times from the
    first decision to the last record: how fast the evidence grows."""
    every = decision_ts + pair_ts
    if not every:
        return []
    lo, hi = min(every), max(every)
    dec, pairs = np.sort(np.asarray(decision_ts)), np.sort(np.asarray(pair_ts))
    points = np.linspace(lo, hi, PROGRESS_POINTS) if hi > lo else np.asarray([hi])
    return [{"t": _r(float(t)),
             "decisions": int(np.searchsorted(dec, t, side="right")),
             "pairs": int(np.searchsorted(pairs, t, side="right"))} for t in points]


def spend(rec: ShadowRecords) -> dict[str, Any]:
    """Shadow and judge spend per UTC day against the daily cap."""
    caps = [m.get("cap_usd") for m in sorted(rec.modes, key=lambda m: m["t"])]
    cap = caps[-1] if caps and isinstance(caps[-1], (int, float)) else None
    days: dict[str, dict[str, float]] = {}
    for s in rec.spend:
        d = days.setdefault(s["day"], {"shadow_usd": 0.0, "judge_usd": 0.0, "estimated_usd": 0.0,
                                       "calls": 0.0})
        d[f"{s['kind']}_usd"] += s["usd"]
        d["calls"] += 1
        if s.get("estimated"):
            d["estimated_usd"] += s["usd"]
    rows = []
    for day in sorted(days):
        d = days[day]
        total = d["shadow_usd"] + d["judge_usd"]
        rows.append({"day": day, "shadow_usd": _r(d["shadow_usd"]), "judge_usd": _r(d["judge_usd"]),
                     "total_usd": _r(total), "estimated_usd": _r(d["estimated_usd"]),
                     "calls": int(d["calls"]), "cap_used": _r(total / cap) if cap else None})
    return {"cap_usd_per_day": _r(cap), "days": rows,
            "total_usd": _r(sum(d["shadow_usd"] + d["judge_usd"] for d in days.values()))}


def modes(rec: ShadowRecords) -> list[dict[str, Any]]:
    """Every start, mode switch and theta change, in time order."""
    keys = ("mode", "default", "sample", "explore", "ab_share", "cap_usd", "theta")
    return [{"t": _r(m["t"]), **{k: (_r(m.get(k)) if isinstance(m.get(k), (int, float)) else
                                     m.get(k)) for k in keys}}
            for m in sorted(rec.modes, key=lambda m: m["t"])]
