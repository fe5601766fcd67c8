"""The tests' routing-table writer (tests/routing_tables.py) writes what `load_table` reads back,
texts with commas, quotes and newlines included, and refuses rows it cannot name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from routing_tables import write_table

from tagrouter_fast.data.table import load_table


def test_rows_round_trip_through_load_table(make_table: Callable[..., Path]) -> None:
    texts = ['a poem, please', 'say "hi"', "two\nlines"]
    d = make_table(
        [(f"q{i}", t, "ab"[i % 2]) for i, t in enumerate(texts)],
        [(f"q{i}", m, o, c) for i in range(3) for m, o, c in
         (("big", "win", 0.01), ("small", "loss", 0.001))],
    )
    t = load_table(d)
    assert t.texts == texts and t.subsets == ["a", "b", "a"]
    assert t.models == ["big", "small"]
    assert t.outcomes(["big", "small"]).tolist() == [[0, 2]] * 3
    assert t.cost_matrix(["big", "small"]).tolist() == [[0.01, 0.001]] * 3


def test_columns_name_other_orders(tmp_path: Path) -> None:
    cols = ("query_id", "model", "outcome", "score", "cost_usd")
    d = write_table(tmp_path, [("q1", "x")], [("q1", "a", "tie", "", 2.5)], outcome_columns=cols)
    want = "query_id,model,outcome,score,cost_usd\nq1,a,tie,,2.5\n"
    assert (d / "outcomes.csv").read_text() == want
    assert load_table(d).cost_matrix(["a"]).tolist() == [[2.5]]


def test_text_and_bytes_are_written_verbatim(tmp_path: Path) -> None:
    raw = b"query_id,query_text\nq1,caf\xe9\n"  # Latin-1: the point of a hostile-table test
    d = write_table(tmp_path, raw, "query_id,model,outcome\nq1,a,win\n")
    assert (d / "queries.csv").read_bytes() == raw
    assert (d / "outcomes.csv").read_text() == "query_id,model,outcome\nq1,a,win\n"


def test_rows_it_cannot_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"queries\.csv: rows of different lengths \[2, 3\]"):
        write_table(tmp_path, [("q1", "x"), ("q2", "y", "s")], [("q1", "a", "win")])
    with pytest.raises(ValueError, match=r"outcomes\.csv: rows of 5 values"):
        write_table(tmp_path, [("q1", "x")], [("q1", "a", "win", 1.0, "extra")])
