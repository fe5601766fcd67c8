"""TagScorer.from_table: a store from the shared routing-table format plus a tags file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from routing_tables import write_table

from tagrouter_fast.core import TagScorer

QUERIES = "query_id,query_text,subset\nq1,Write a poem,a\nq2,Solve 2+2,b\nq3,Rewrite this,a\n"
# q3 has no row for "small": missing data, which must give no record (not a loss).
OUTCOMES = (
    "query_id,model,outcome,cost_usd\n"
    "q1,big,win,0.01\nq1,small,tie,0.001\n"
    "q2,big,loss,0.01\nq2,small,win,0.001\n"
    "q3,big,tie,0.01\n"
)
TAGS = {"q1": ["Poem", "Creative Writing"], "q2": ["Math"], "q3": ["Text Rewriting", "Poem"]}
# The same data written out as records by hand.
RECORDS = [
    ("q1", ["Poem", "Creative Writing"], "big", "win"),
    ("q1", ["Poem", "Creative Writing"], "small", "tie"),
    ("q2", ["Math"], "big", "loss"),
    ("q2", ["Math"], "small", "win"),
    ("q3", ["Text Rewriting", "Poem"], "big", "tie"),
]


@pytest.fixture
def table(tmp_path: Path) -> Path:
    return write_table(tmp_path, QUERIES, OUTCOMES)


@pytest.fixture
def tags_file(tmp_path: Path) -> Path:
    p = tmp_path / "tags.json"
    p.write_text(json.dumps(TAGS))
    return p


def same_store(a: TagScorer, b: TagScorer) -> None:
    assert sorted(a.models) == sorted(b.models)
    assert sorted(a.tags) == sorted(b.tags)
    assert a.n_queries == b.n_queries and a.n_records == b.n_records
    for m in a.models:
        assert a.model_totals(m) == b.model_totals(m)
        for t in a.tags:
            assert a.counts(m, t) == b.counts(m, t), (m, t)
            assert a.score(m, t) == pytest.approx(b.score(m, t), rel=1e-12, abs=1e-15)


def test_from_table_equals_from_records(table, tags_file):
    scorer = TagScorer.from_table(table, tags_file)
    same_store(scorer, TagScorer.from_records(RECORDS))
    # The missing (q3, small) pair is not counted at all: q3's tags have no "small" record.
    assert scorer.counts("small", "Text Rewriting") == (0, 0, 0)
    assert scorer.tag_count("Poem") == 2


def test_tags_as_mapping_and_raw_strings(table):
    raw = {q: ", ".join(t) for q, t in TAGS.items()}
    same_store(TagScorer.from_table(table, raw), TagScorer.from_records(RECORDS))


def test_models_subset_and_score_params(table, tags_file):
    scorer = TagScorer.from_table(table, tags_file, models=["big"], s_tie=0.5, weighting="none")
    assert scorer.models == ["big"]
    assert (scorer.s_tie, scorer.weighting) == (0.5, "none")
    # weighting "none": score = sum_r count * s_r; Poem: big won q1, tied q3.
    assert scorer.score("big", "Poem") == pytest.approx(1.0 + 0.5)
    expected = TagScorer.from_records(
        [r for r in RECORDS if r[2] == "big"], s_tie=0.5, weighting="none"
    )
    np.testing.assert_array_equal(scorer.score_matrix(), expected.score_matrix())


def test_missing_tags_is_an_error_naming_the_ids(table):
    with pytest.raises(ValueError, match=r"2 query id\(s\).*no tags entry: 'q2', 'q3'"):
        TagScorer.from_table(table, {"q1": TAGS["q1"]})


def test_missing_skip_leaves_those_queries_out(table):
    scorer = TagScorer.from_table(table, {"q1": TAGS["q1"], "q3": TAGS["q3"]}, missing="skip")
    same_store(scorer, TagScorer.from_records([r for r in RECORDS if r[0] != "q2"]))
    assert "Math" not in scorer


def test_tags_for_unknown_queries(table):
    tags = {**TAGS, "q9": ["Poem"], "zz": ["Math"]}
    with pytest.raises(ValueError, match=r"2 query id\(s\) not in .*'q9', 'zz'"):
        TagScorer.from_table(table, tags)
    same_store(TagScorer.from_table(table, tags, unknown="ignore"), TagScorer.from_records(RECORDS))


def test_no_tagged_query_is_an_error(table):
    with pytest.raises(ValueError, match="no query"):
        TagScorer.from_table(table, {}, missing="skip")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "not valid JSON"),
        ('{"q1": [1]}', "tags of query 'q1' must be"),
        ('{"q1": {"a": 1}}', "tags of query 'q1' must be"),
    ],
)
def test_malformed_tags_file(table, tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        TagScorer.from_table(table, p)


def test_bad_arguments(table, tags_file, tmp_path):
    with pytest.raises(ValueError, match="missing must be"):
        TagScorer.from_table(table, tags_file, missing="drop")
    with pytest.raises(ValueError, match="unknown must be"):
        TagScorer.from_table(table, tags_file, unknown="skip")
    with pytest.raises(TypeError, match="s_wins"):
        TagScorer.from_table(table, tags_file, s_wins=2.0)
    with pytest.raises(TypeError, match="path to a JSON file or a mapping"):
        TagScorer.from_table(table, [("q1", ["Poem"])])  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="nope"):
        TagScorer.from_table(table, tags_file, models=["nope"])
    with pytest.raises(FileNotFoundError):
        TagScorer.from_table(table, tmp_path / "absent.json")
    with pytest.raises(ValueError, match="outcome"):
        (table / "outcomes.csv").write_text("query_id,model,outcome\nq1,big,great\n")
        TagScorer.from_table(table, tags_file)
