"""Reading a state directory's shadow files back, checked, for the report.

`load` scans each file written by `tagrouter_fast.serve.shadow.runner` with the journal's checked
scan, keeps the records that have every field the report reads with the right type, and says
how many lines were damaged (failed their checksum, or cut short) and how many were invalid,
per file: nothing is dropped without being counted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tagrouter_fast import journal
from tagrouter_fast.serve.shadow.runner import (
    DECISIONS_FILE,
    LEARNED_FILE,
    MODE_FILE,
    PAIRS_FILE,
    SPEND_FILE,
)

__all__ = ["ShadowRecords", "load"]

OUTCOMES = ("win", "tie", "loss")


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str(v: object) -> bool:
    return isinstance(v, str) and bool(v)


def _decision_ok(p: dict[str, Any]) -> bool:
    scores = p.get("scores")
    tags = p.get("tags")
    return (
        _str(p.get("id")) and _num(p.get("t"))
        and isinstance(tags, list) and all(isinstance(t, str) for t in tags)
        and isinstance(scores, dict) and bool(scores)
        and all(_str(k) and _num(v) for k, v in scores.items())
        and all(_str(p.get(k)) for k in ("llm", "routed", "default", "served"))
        and (p.get("slm") is None or p.get("slm") in scores)
        and p.get("llm") in scores
        and (p.get("cost") is None or (_num(p.get("cost")) and p["cost"] >= 0))
    )


def _pair_ok(p: dict[str, Any]) -> bool:
    return (
        _decision_ok({**p, "cost": None})
        and _str(p.get("pair")) and p.get("outcome") in OUTCOMES
        and all(_str(p.get(k)) for k in ("candidate", "called"))
        and p.get("candidate") != p.get("default")
        and all(_num(p.get(k)) and p[k] >= 0
                for k in ("candidate_cost", "reference_cost", "judge_cost"))
    )


def _spend_ok(p: dict[str, Any]) -> bool:
    return (_str(p.get("day")) and p.get("kind") in ("shadow", "judge")
            and _num(p.get("usd")) and p["usd"] >= 0)


def _mode_ok(p: dict[str, Any]) -> bool:
    return _num(p.get("t")) and _str(p.get("mode")) and _str(p.get("default"))


@dataclass
class ShadowRecords:
    """The valid records of each file, in file order, and the count of lines left out."""

    decisions: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    learned: list[dict[str, Any]] = field(default_factory=list)
    spend: list[dict[str, Any]] = field(default_factory=list)
    modes: list[dict[str, Any]] = field(default_factory=list)
    #: Per file: ``{"lines": good records kept, "damaged": failed their check,
    #: "invalid": parsed but missing a field}``.
    files: dict[str, dict[str, int]] = field(default_factory=dict)


def _read(directory: Path, name: str, ok: Callable[[dict[str, Any]], bool],
          out: list[dict[str, Any]], files: dict[str, dict[str, int]]) -> None:
    path = directory / name
    stats = {"lines": 0, "damaged": 0, "invalid": 0}
    files[name] = stats
    if not path.exists():
        return
    for line in journal.scan(path):
        if line.payload is None:
            stats["damaged"] += 1
        elif not ok(line.payload):
            stats["invalid"] += 1
        else:
            stats["lines"] += 1
            out.append(line.payload)


def load(state_dir: str | os.PathLike[str]) -> ShadowRecords:
    """Every shadow file of ``state_dir`` (a missing file reads as empty).

    Raises:
        ValueError: ``state_dir`` is not a directory (naming it).
        OSError: a file cannot be read (naming it).
    """
    d = Path(state_dir)
    if not d.is_dir():
        raise ValueError(f"{d}: not a directory (give the gateway's [feedback] state_dir)")
    r = ShadowRecords()
    _read(d, DECISIONS_FILE, _decision_ok, r.decisions, r.files)
    _read(d, PAIRS_FILE, _pair_ok, r.pairs, r.files)
    _read(d, LEARNED_FILE, lambda p: _str(p.get("pair")), r.learned, r.files)
    _read(d, SPEND_FILE, _spend_ok, r.spend, r.files)
    _read(d, MODE_FILE, _mode_ok, r.modes, r.files)
    return r
