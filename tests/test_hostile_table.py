"""Hostile routing tables and cache files: costs are never guessed, encodings are named by file
and line, the opaque score column is never a reason to reject a table, and a corrupted but
readable cache entry is recomputed, never used."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fake_taggers import CountingTagger
from routing_tables import write_table

from tagrouter_fast import build_router
from tagrouter_fast.data.table import DataError, load_table
from tagrouter_fast.tagging import cache

QUERIES = "query_id,query_text,subset\nq1,write a poem,a\nq2,solve 2+2,b\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGROUTER_CACHE", str(tmp_path / "cache"))


def test_model_without_cost_is_an_error_naming_model_and_file(tmp_path: Path) -> None:
    d = write_table(
        tmp_path / "t",
        QUERIES,
        "query_id,model,outcome,cost_usd\n"
        "q1,big,win,2\nq1,free,loss,\nq2,big,loss,2\nq2,free,win,\n",
    )
    table = load_table(d)  # other pools of the table stay usable
    assert table.mean_cost(["big"]) == {"big": 2.0}
    with pytest.raises(DataError, match=r"t/outcomes\.csv: model\(s\) \['free'\]"):
        table.mean_cost(["big", "free"])
    tagger = CountingTagger("hostile-table-tagger-v1")
    with pytest.raises(DataError, match="'free'"):
        build_router(table, ["big", "free"], tagger=tagger)
    assert tagger.seen == []  # refused before tagging the table
    priced = load_table(d, model_costs={"free": 0.5})
    assert priced.mean_cost(["big", "free"]) == {"big": 2.0, "free": 0.5}
    assert priced.cost_imputed_models == ["free"]


@pytest.mark.parametrize("bad", ["-0.01", "nan", "inf", "-inf"])
def test_negative_or_non_finite_cost_names_file_and_line(tmp_path: Path, bad: str) -> None:
    d = write_table(
        tmp_path / "t",
        QUERIES,
        f"query_id,model,outcome,cost_usd\nq1,big,win,2\nq2,big,loss,{bad}\n",
    )
    with pytest.raises(DataError, match=r"outcomes\.csv:3: cost_usd must be a finite number"):
        load_table(d)


def test_non_numeric_score_is_kept_opaque(tmp_path: Path) -> None:
    d = write_table(
        tmp_path / "t",
        QUERIES,
        "query_id,model,outcome,score,cost_usd\nq1,big,win,A+,1\nq2,big,loss,0.25,1\n",
    )
    t = load_table(d)
    assert math.isnan(t.scores[0, 0]) and t.scores[1, 0] == 0.25


def test_bom_is_accepted(tmp_path: Path) -> None:
    d = write_table(
        tmp_path / "t",
        b"\xef\xbb\xbf" + QUERIES.encode(),
        b"\xef\xbb\xbfquery_id,model,outcome\nq1,big,win\nq2,big,loss\n",
    )
    t = load_table(d)
    assert t.query_ids == ["q1", "q2"] and t.models == ["big"]


def test_non_utf8_byte_names_file_and_line(tmp_path: Path) -> None:
    d = write_table(
        tmp_path / "t",
        b"query_id,query_text\nq1,write a poem\nq2,caf\xe9\n",
        "query_id,model,outcome\nq1,big,win\n",
    )
    with pytest.raises(DataError, match=r"queries\.csv:3: not UTF-8"):
        load_table(d)


def test_corrupted_cached_tags_are_recomputed(tmp_path: Path) -> None:
    tagger = CountingTagger("hostile-table-tagger-v1")
    texts = ["write a poem", "solve 2+2"]
    want = cache.tag_cached(tagger, texts)
    (entry,) = (cache.cache_dir() / "tags" / tagger.fingerprint).glob("*.json")
    data = bytearray(entry.read_bytes())
    i = data.rindex(b"Math")
    data[i : i + 4] = b"Poem"  # still valid JSON, same length: a silently different route
    entry.write_bytes(bytes(data))
    tagger.seen.clear()
    with pytest.warns(UserWarning, match="checksum"):
        assert cache.tag_cached(tagger, texts) == want
    assert tagger.seen == texts  # recomputed ...
    tagger.seen.clear()
    assert cache.tag_cached(tagger, texts) == want
    assert tagger.seen == []  # ... and rewritten whole
