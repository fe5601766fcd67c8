"""Tags files: ``{query_id: [tag, ...]}`` as JSON (or such a mapping), the tags a store is
built from beside a routing table (`tagrouter_fast.data.table`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tagrouter_fast._core import split_tags
from tagrouter_fast.data.table import load_table


def read_tags(
    tags: str | os.PathLike[str] | Mapping[str, Sequence[str] | str],
) -> dict[str, list[str]]:
    """``{query_id: [tag, ...]}`` from a JSON file or a mapping, checked entry by entry."""
    if isinstance(tags, Mapping):
        raw: Any = tags
        where = "tags mapping"
    elif isinstance(tags, (str, os.PathLike)):
        where = os.fspath(tags)
        with open(tags, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(
                f"{where}: expected a JSON object {{query_id: [tags...]}}, got {type(raw).__name__}"
            )
    else:
        raise TypeError(
            f"tags must be a path to a JSON file or a mapping, got {type(tags).__name__}"
        )
    out: dict[str, list[str]] = {}
    for qid, value in raw.items():
        if not isinstance(qid, str):
            raise ValueError(f"{where}: query id {qid!r} is not a str")
        if isinstance(value, str):
            out[qid] = split_tags(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
            out[qid] = list(value)
        else:
            raise ValueError(
                f"{where}: tags of query {qid!r} must be a list of str or a 'a, b, c' string, "
                f"got {value!r}"
            )
    return out


def some_ids(ids: Sequence[str], shown: int = 10) -> str:
    """The first few ids, for error messages about possibly thousands of them."""
    head = ", ".join(repr(q) for q in ids[:shown])
    return head + (f", ... ({len(ids)} in all)" if len(ids) > shown else "")


def table_records(
    table_dir: str | os.PathLike[str],
    tags: str | os.PathLike[str] | Mapping[str, Sequence[str] | str],
    models: Sequence[str] | None = None,
    *,
    missing: str = "error",
    unknown: str = "error",
) -> list[tuple[str, list[str], str, str]]:
    """The ``(query_id, tags, model, outcome)`` records of a routing table and its tags file:
    what `TagScorer.from_table` builds a store from (its docstring says what each argument
    does and raises)."""
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    if unknown not in ("error", "ignore"):
        raise ValueError(f"unknown must be 'error' or 'ignore', got {unknown!r}")
    table = load_table(Path(table_dir))
    by_query = read_tags(tags)
    known = set(table.query_ids)
    strays = [q for q in by_query if q not in known]
    if strays and unknown == "error":
        raise ValueError(
            f"tags given for {len(strays)} query id(s) not in {table.source}: "
            f"{some_ids(strays)} (pass unknown='ignore' to leave them out)"
        )
    untagged = [q for q in table.query_ids if q not in by_query]
    if untagged and missing == "error":
        raise ValueError(
            f"{len(untagged)} query id(s) of {table.source} have no tags entry: "
            f"{some_ids(untagged)} (pass missing='skip' to leave them out)"
        )
    rows = [i for i, q in enumerate(table.query_ids) if q in by_query]
    if not rows:
        raise ValueError(f"no query of {table.source} has a tags entry")
    row_tags = [by_query.get(q, []) for q in table.query_ids]
    chosen = list(table.models) if models is None else list(models)
    return list(table.records(rows, chosen, row_tags))
