"""Write routing tables (``queries.csv`` + ``outcomes.csv``, the format `load_table` reads) for
tests: from rows, through the csv module so that commas and quotes in query texts are escaped,
or verbatim (``str``/``bytes``) for tables whose exact bytes are the point of the test.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

#: Column names a row of N values takes the first N of (override per call for other orders).
QUERY_COLUMNS: tuple[str, ...] = ("query_id", "query_text", "subset")
OUTCOME_COLUMNS: tuple[str, ...] = ("query_id", "model", "outcome", "cost_usd")

Rows = Sequence[Sequence[object]]


def _csv_text(rows: Rows, columns: Sequence[str], name: str) -> str:
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise ValueError(f"{name}: rows of different lengths {sorted(widths)}")
    width = widths.pop() if widths else len(columns)
    if not 0 < width <= len(columns):
        raise ValueError(f"{name}: rows of {width} values for columns {list(columns)}")
    out = io.StringIO()
    # "\n" as the files in ../shared/data are written; csv's default is "\r\n".
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns[:width])
    w.writerows(rows)
    return out.getvalue()


def _write(path: Path, body: Rows | str | bytes, columns: Sequence[str]) -> None:
    if isinstance(body, bytes):
        path.write_bytes(body)
    elif isinstance(body, str):
        path.write_bytes(body.encode("utf-8"))
    else:
        path.write_text(_csv_text(body, columns, path.name), encoding="utf-8")


def write_table(
    directory: Path,
    queries: Rows | str | bytes,
    outcomes: Rows | str | bytes,
    *,
    query_columns: Sequence[str] = QUERY_COLUMNS,
    outcome_columns: Sequence[str] = OUTCOME_COLUMNS,
) -> Path:
    """Write a routing table into ``directory`` (created when missing) and return it.

    Args:
        directory: where ``queries.csv`` and ``outcomes.csv`` go.
        queries: rows ``(query_id, query_text[, subset])``, or the file's exact text/bytes.
        outcomes: rows ``(query_id, model, outcome[, cost_usd])``, or the file's text/bytes.
        query_columns: header names; rows of N values take the first N.
        outcome_columns: likewise for outcomes (e.g. with ``score`` before ``cost_usd``).

    Raises:
        ValueError: rows of different lengths, or more values than column names.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "queries.csv", queries, query_columns)
    _write(directory / "outcomes.csv", outcomes, outcome_columns)
    return directory
