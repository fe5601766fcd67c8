"""Routing-table loading and validation."""

from __future__ import annotations

import numpy as np
import pytest
from routing_tables import write_table
from skip_policy import ALPACAEVAL, requires_alpacaeval

from tagrouter_fast.data.pools import POOLS, resolve_pool
from tagrouter_fast.data.table import DataError, load_table

DATA = ALPACAEVAL

QUERIES = 'query_id,query_text,subset\nq1,"two\nlines",a\nq2,hello,b\nq3,bye,a\n'
OUTCOMES_HEAD = "query_id,model,outcome,score,in_chars,out_chars,cost_usd\n"


def test_loads_dense_arrays_with_missing_pairs(tmp_path):
    rows = (
        "q1,big,win,0.9,1,2,0.010\nq2,big,loss,0.1,1,2,0.030\nq3,big,tie,0.5,1,2,\n"
        "q1,small,loss,0.2,1,2,0.001\nq3,small,win,0.8,1,2,0.003\n"
    )
    t = load_table(write_table(tmp_path, QUERIES, OUTCOMES_HEAD + rows))
    assert t.query_ids == ["q1", "q2", "q3"]
    assert t.texts[0] == "two\nlines"
    assert t.subsets == ["a", "b", "a"]
    assert t.outcomes(["big", "small"]).tolist() == [[0, 2], [2, -1], [1, 0]]
    # Missing is not a loss: it is excluded by complete_rows and not a record.
    assert t.complete_rows(["big", "small"]).tolist() == [True, False, True]
    assert t.accept(["big", "small"]).tolist() == [[True, False], [False, False], [True, True]]
    recs = t.records(np.arange(3), ["big", "small"], [["x"], ["y"], ["z"]])
    assert ("q2", ["y"], "small", "loss") not in recs and len(recs) == 5
    # Empty cost cell: the model's mean over its other rows; missing pair likewise.
    c = t.cost_matrix(["big", "small"])
    assert c[2, 0] == pytest.approx(0.02)
    assert c[1, 1] == pytest.approx(0.002)
    assert np.isnan(t.raw_costs[2, 0])


def test_pool_llm_defaults_to_most_expensive(tmp_path):
    rows = "q1,big,win,,,,0.01\nq1,small,loss,,,,0.001\n"
    t = load_table(write_table(tmp_path, QUERIES, OUTCOMES_HEAD + rows))
    assert resolve_pool(t, models=["small", "big"]) == (["small", "big"], "big")
    with pytest.raises(ValueError):
        resolve_pool(t, models=["small", "big"], llm="other")
    with pytest.raises(KeyError, match="nope"):
        resolve_pool(t, models=["small", "nope"])


def test_without_cost_column_costs_are_calls_or_given(tmp_path):
    outcomes = "query_id,model,outcome\nq1,a,win\nq1,b,loss\n"
    t = load_table(write_table(tmp_path, QUERIES, outcomes))
    assert t.cost_matrix(["a", "b"]).tolist()[0] == [1.0, 1.0]
    t = load_table(tmp_path, model_costs={"a": 5.0, "b": 0.5})
    assert t.cost_matrix(["a", "b"]).tolist()[0] == [5.0, 0.5]


def test_model_without_any_cost_is_an_error_unless_priced(tmp_path):
    rows = "q1,a,win,,,,0.01\nq1,b,loss,,,,0.03\nq1,c,loss,,,,\n"
    d = write_table(tmp_path, QUERIES, OUTCOMES_HEAD + rows)
    t = load_table(d)
    assert t.cost_matrix(["a", "b"]).shape[1] == 2
    with pytest.raises(DataError, match=r"outcomes\.csv: model\(s\) \['c'\] have no cost_usd"):
        t.cost_matrix(["a", "c"])
    t = load_table(d, model_costs={"c": 0.5})
    assert t.cost_imputed_models == ["c"]
    assert t.cost_matrix(["c"])[0, 0] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", ["-0.01", "nan", "inf"])
def test_negative_or_non_finite_cost_names_file_and_line(tmp_path, bad):
    rows = f"q1,a,win,,,,0.01\nq1,b,loss,,,,{bad}\n"
    with pytest.raises(DataError, match=r"outcomes\.csv:3: cost_usd must be a finite number"):
        load_table(write_table(tmp_path, QUERIES, OUTCOMES_HEAD + rows))


def test_score_is_opaque_bom_accepted_non_utf8_named(tmp_path):
    rows = "q1,a,win,great,,,0.01\nq1,b,loss,0.5,,,0.03\n"
    d = write_table(tmp_path, QUERIES, OUTCOMES_HEAD + rows)
    t = load_table(d)
    assert np.isnan(t.scores[0, 0]) and t.scores[0, 1] == 0.5
    q = d / "queries.csv"
    q.write_bytes(b"\xef\xbb\xbf" + q.read_bytes())
    assert load_table(d).query_ids == t.query_ids
    q.write_bytes(q.read_bytes() + b"q9,caf\xe9,x\n")
    with pytest.raises(DataError, match=r"queries\.csv:\d+: not UTF-8"):
        load_table(d)


@pytest.mark.parametrize(
    ("outcomes", "match"),
    [
        ("query_id,model\nq1,a\n", r"outcomes\.csv:1: missing column\(s\) \['outcome'\]"),
        (
            OUTCOMES_HEAD + "q1,a,win,,,,\nq1,a,draw,,,,\n",
            r"outcomes\.csv:3: unknown outcome label 'draw'",
        ),
        (
            OUTCOMES_HEAD + "q1,a,win,,,,\nq1,a,loss,,,,\n",
            r"outcomes\.csv:3: duplicate row .*first at line 2",
        ),
        (OUTCOMES_HEAD + "q9,a,win,,,,\n", r"outcomes\.csv:2: outcome for unknown query_id 'q9'"),
        (
            OUTCOMES_HEAD + "q1,a,win,,,,abc\n",
            r"outcomes\.csv:2: column 'cost_usd' is not a number",
        ),
    ],
)
def test_bad_outcomes_name_file_and_line(tmp_path, outcomes, match):
    write_table(tmp_path, QUERIES, outcomes)
    with pytest.raises(DataError, match=match):
        load_table(tmp_path)


def test_bad_queries_name_file_and_line(tmp_path):
    write_table(tmp_path, "query_id,text\nq1,x\n", OUTCOMES_HEAD)
    with pytest.raises(DataError, match=r"queries\.csv:1: missing column"):
        load_table(tmp_path)
    # The multi-line quoted text of q1 ends on line 3, so the duplicate is on line 5.
    write_table(tmp_path, QUERIES + "q2,again,a\n", OUTCOMES_HEAD)
    with pytest.raises(
        DataError, match=r"queries\.csv:6: duplicate query_id 'q2' \(first at line 4\)"
    ):
        load_table(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        load_table(tmp_path / "nowhere")


@pytest.mark.data
@requires_alpacaeval
def test_real_table_pools():
    t = load_table(DATA)
    assert t.n_queries == 805
    for name in POOLS:
        models, llm = resolve_pool(t, name)
        assert llm in models
        # A few models miss 1-3 queries: never more than that is dropped.
        assert t.complete_rows(models).sum() >= 800
    # The reference ties itself everywhere.
    assert t.accept(["gpt4_1106_preview"]).all()
